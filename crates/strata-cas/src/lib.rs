//! strata's content store: every blob (layer tar, image config, manifest,
//! `COPY --from` artifact) lives here once, named by its blake3 digest.
//!
//! * [`ContentStore`] keeps blobs' metadata ([`BlobInfo`]: size, sha256,
//!   times, labels) in RocksDB, the bytes of small blobs (up to
//!   [`INLINE_UP_TO`]) beside it, and larger blobs as files under `blobs/`.
//! * [`BlobWriter`] ingests: bytes go to memory, and past
//!   [`INLINE_UP_TO`] to a temp file under `ingest/`, while both digests
//!   are computed. `commit` records a small blob with its bytes in one
//!   synced write; it fsyncs a file and renames it into place and only
//!   then records it. A killed process leaves either no blob or a complete
//!   one, never metadata pointing at nothing.
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
    Batch, BlobInfo, BlobReader, BlobWriter, ContentStore, Error, INLINE_UP_TO,
    LAST_USED_GRANULARITY, Lease, Result, Stored, last_used_is_stale, now_unix,
};
