//! strata's planner: a Dockerfile becomes a [`Plan`], the stages the target
//! needs, each a base and a list of [`Step`]s whose [`Op`]s are fully
//! resolved, plus the image config each stage ends with.
//!
//! The planner applies BuildKit's semantics instruction by instruction:
//! variable scope, `WORKDIR` and `COPY` destination resolution, the shell
//! form, heredocs, `RUN --mount`s, `ONBUILD` triggers of base images and
//! stages, and every image-config field. It resolves `FROM` through an
//! [`ImageResolver`] and pins each base to its manifest digest.
//!
//! What a step's cache key is made of is decided here ([`key`]); the keys
//! themselves are computed by the solver, because a `COPY --from` step's key
//! depends on the content its source stage produced.
//!
//! It knows nothing of how steps run, where layers live or what is cached.

mod entitlements;
pub mod key;
mod ops;
mod planner;
mod run_settings;

pub use entitlements::{Entitlement, EntitlementError, Entitlements, Grants};
pub use ops::{
    CopyOp, ExecOp, ImageSource, InlineFile, MkdirOp, Op, Read, RemoteFile, RunMount, RunMountKind,
    Source,
};
pub use planner::{
    Base, BaseError, HistoryEntry, ImageResolver, Options, Plan, PlanError, ResolveError,
    ResolvedImage, StagePlan, Step, StepMade, history_with_layers, image_created, plan,
};
pub use run_settings::{ExtraHost, NetworkMode, RunSettings, ShmSize, Ulimit};
