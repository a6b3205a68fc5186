//! `strata bench`: build throughput on a workload users describe, measured
//! on the targets they have (the local daemon, a cluster, and BuildKit
//! when a dockerd answers) in one run, so every number comes with its
//! baseline measured beside it.
//!
//! A workload ([`Workload`]) is a small TOML file; with its seed it
//! decides every build's Dockerfile and context ([`Workload::generate`]).
//! [`run::run`] builds them on a [`run::Target`] a few at a time, as a
//! user's commands would; [`report`] turns the measurements into numbers,
//! a table and an HTML page with plots.
//!
//! It knows how to start `strata build` and `docker build`, not how they
//! work.

pub mod report;
pub mod run;
pub mod workload;

use std::path::PathBuf;

pub use report::{Report, Summary, TargetRun};
pub use workload::{Job, Workload};

/// Why a benchmark could not run.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A file could not be read or written.
    #[error("{what} {}: {source}", path.display())]
    Io {
        /// What was being done.
        what: &'static str,
        /// The file.
        path: PathBuf,
        /// Why.
        source: std::io::Error,
    },
    /// The workload file is not one to run.
    #[error("workload {}: {detail}", path.display())]
    Workload {
        /// The file.
        path: PathBuf,
        /// What is wrong.
        detail: String,
    },
}
