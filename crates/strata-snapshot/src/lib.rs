//! strata's snapshotter: filesystem states as stacks of layers.
//!
//! * [`apply_tar`] writes an OCI layer tar below a root, honoring
//!   whiteouts, opaque directories, hard links, devices, owners, modes and
//!   extended attributes, and refusing any entry that would land outside
//!   the root (`..`, absolute names, escaping symlinks and hard links).
//! * [`write_layer`] turns an overlay upper dir into an OCI layer tar with
//!   OCI whiteouts, deterministically.
//! * [`clamp_times`] copies a layer tar with no time later than a given
//!   one (`SOURCE_DATE_EPOCH`), every other byte of every entry kept.
//! * [`Snapshotter`] keeps extracted layer chains as overlay lower dirs and
//!   hands out [`Active`] (writable, one step) and [`View`] (read-only)
//!   mounts; [`Active::commit`] turns a step's changes into a [`Layer`].
//!
//! It reads and writes layer blobs through the content store and knows
//! nothing of images, Dockerfiles or caches.

mod apply;
mod clamp;
mod diff;
mod error;
mod mount;
mod resolve;
mod store;

pub use apply::{ApplyStats, TarKind, apply_tar, apply_tar_with, set_mtime};
pub use clamp::clamp_times;
pub use diff::{DiffStats, is_empty_dir, strip_overlay_attrs, write_layer};
pub use error::{Error, Result};
pub use mount::{OverlayMount, mounts_under, unmount};
pub use resolve::{Escapes, entry_components, resolve_in_root, resolve_in_root_with, resolve_path};
pub use store::{Active, Layer, Snapshotter, View, chain_id};
