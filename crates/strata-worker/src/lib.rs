//! A strata node: its state directory and stores, and the worker that runs
//! build steps.
//!
//! * [`Node`] opens `$STRATA_HOME` (one process at a time: a lock file) and
//!   its stores: content, snapshots, images, the cache index.
//! * [`LocalWorker`] implements the solver's [`strata_solver::Worker`]: it
//!   measures step inputs ([`select::checksum`]), runs `RUN` through the
//!   sandbox executor, `COPY`/`ADD` and `WORKDIR` as file operations, each
//!   on an overlay snapshot, and commits the changes as a layer.
//! * [`build()`] is the embedded build: plan, solve, assemble the image
//!   ([`store_image`], which also applies `SOURCE_DATE_EPOCH`).
//! * [`export_rootfs`] and [`write_rootfs_tar`] write an image's files out
//!   (`--output type=local|tar`).
//! * [`import_cache`] and [`export_cache`] move cache entries and their
//!   layers between machines (`--cache-from`, `--cache-to`).
//! * [`prune()`] collects what no image, cache entry or running build holds.

mod bases;
mod build;
mod cache_io;
mod contexts;
mod copy;
mod engine;
mod error;
mod export;
mod fetch;
mod gc;
pub mod history;
mod memo;
mod node;
mod platforms;
mod run;
pub mod select;
mod timestamps;
mod users;
mod worker;

pub use bases::BaseImages;
pub use build::{BuildRequest, BuildResult, PlanInputs, build, ignore_for, plan_only};
pub use cache_io::{
    CacheFrom, CacheIoError, CacheLocation, CacheMode, CacheTo, Exported, Imported, export_cache,
    exported_keys, import_cache, parse_cache_from, parse_cache_to,
};
pub use contexts::{NamedContext, parse_named_context};
pub use copy::is_archive;
pub use engine::Engine;
pub use error::{AddError, BuildError, FileError, FlagError, FlagProblem, GcError};
pub use export::{ExportError, export_rootfs, write_rootfs_tar};
pub use gc::{
    CONTEXT_LABEL, EVICT_EVERY, EvictReport, GRACE, PULLED_LABEL, PruneReport, Usage, candidates,
    enforce, evict, keep_within, prune, usage,
};
pub use history::{BuildRecord, BuildStatus, History, HistoryError};
pub use memo::SelectionMemo;
pub use node::{Node, NodeError, default_home, default_slots};
pub use platforms::{check_runnable, native, registry_target, runnable};
pub use run::{Process, sandbox};
pub use timestamps::{SOURCE_DATE_EPOCH, Timestamps, parse_source_date_epoch, store_image};
pub use users::{Identity, UserError};
pub use worker::{Embedded, LayerTee, LocalWorker, MakeContext, TreeSelection};
