//! Bounds on what one Dockerfile can make the frontend do.
//!
//! A Dockerfile is input from whoever submits a build, and a coordinator
//! parses and expands Dockerfiles from every client. Each limit below turns
//! an input that would exhaust the stack or memory into an error naming the
//! limit and the place. They are far above what real Dockerfiles use
//! (`docs/security.md` lists them with their reasons).

/// The largest Dockerfile accepted, in bytes (2 MiB).
pub const MAX_DOCKERFILE_BYTES: usize = 2 << 20;

/// The most instructions (`FROM` included) in one Dockerfile.
pub const MAX_INSTRUCTIONS: usize = 10_000;

/// The most stages in one Dockerfile.
pub const MAX_STAGES: usize = 256;

/// How deeply `${...}` expansions may nest within one word.
pub const MAX_NESTING: usize = 64;

/// The longest result of expanding one word, in bytes (1 MiB).
pub const MAX_EXPANSION_BYTES: usize = 1 << 20;

/// The most bytes of variables (names and values) in scope at any point of
/// a stage, or among the global `ARG`s (1 MiB). A `RUN` gets them as its
/// environment, and Linux refuses to start a process with more than 2 MiB
/// of arguments and environment together.
pub const MAX_SCOPE_BYTES: usize = 1 << 20;
