//! strata's content store: every blob (layer tar, image config, manifest,
//! `COPY --from` artifact) lives here once, named by its blake3 digest.
//!
//! * [`ContentStore`] keeps blobs as files under `blobs/` and their
//!   metadata ([`BlobInfo`]: size, sha256, times, labels) in RocksDB.
//! * [`BlobWriter`] ingests: bytes go to a temp file under `ingest/` while
//!   both digests are computed; `commit` fsyncs and renames into place and
//!   only then records the metadata, so a killed process leaves either no
//!   blob or a complete one, never metadata pointing at nothing.
//! * [`BlobReader`] verifies the blake3 digest as it reads: a blob damaged
//!   on disk is reported, never served.
//! * [`Lease`] marks blobs a running build holds; garbage collection
//!   (which lives with whoever knows the roots) must skip them.
//!
//! * [`MetaDb`] is the RocksDB database a node's stores share, each in
//!   its own column families.
//!
//! The store knows nothing of images, layers or caches: labels whose key
//! starts with `ref.` are the only edges it records, for collectors to
//! follow.

mod db;
mod digest;
mod store;

pub use db::MetaDb;

pub use digest::{Digest, ParseDigestError, Sha256};
pub use store::{
    Batch, BlobInfo, BlobReader, BlobWriter, ContentStore, Error, LAST_USED_GRANULARITY, Lease,
    Result, last_used_is_stale, now_unix,
};
