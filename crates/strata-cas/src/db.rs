//! The metadata database a node's stores share.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rocksdb::{ColumnFamily, ColumnFamilyDescriptor, DB, Options};

/// One RocksDB database holding the metadata of a node's stores, each in
/// column families of its own (like containerd's single metadata database
/// with a bucket per subsystem).
///
/// One database rather than one per store because a CLI invocation opens
/// it, does a few reads and writes, and exits: the open is the cost that
/// matters, and RocksDB pays it per database (manifest rewrite, replay of
/// the write-ahead log, fsyncs).
pub struct MetaDb {
    db: DB,
    path: PathBuf,
    column_families: Vec<String>,
}

impl std::fmt::Debug for MetaDb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MetaDb")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// How many write-ahead logs may pile up before an open retires them.
const MAX_LOGS: usize = 8;

/// RocksDB before 8.3 starts a new write-ahead log on every open but only
/// deletes old ones after a memtable flush, so read-only invocations (a
/// fully cached build, `strata images`) leave an empty log each, and every
/// later open has to read them all. Once a few have piled up, one small
/// write and a flush move the database past them and RocksDB deletes them.
fn retire_empty_logs(db: &DB, path: &Path) -> Result<(), rocksdb::Error> {
    let logs = std::fs::read_dir(path)
        .map(|dir| {
            dir.flatten()
                .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
                .count()
        })
        .unwrap_or(0);
    if logs > MAX_LOGS {
        db.put(
            b"strata.last-log-retirement",
            crate::now_unix().to_le_bytes(),
        )?;
        db.flush()?;
    }
    Ok(())
}

impl Drop for MetaDb {
    /// Flushes what this process wrote into tables, so the next open has no
    /// log to replay: the invocation that wrote pays for its writes, and a
    /// fully cached build that follows one that was not stays fast. The
    /// log already made every write durable; a flush that fails only
    /// leaves the replay to the next open.
    fn drop(&mut self) {
        for name in &self.column_families {
            if let Some(cf) = self.db.cf_handle(name)
                && let Err(e) = self.db.flush_cf(cf)
            {
                tracing::debug!(path = %self.path.display(), cf = %name, error = %e, "flush on close failed");
            }
        }
    }
}

impl MetaDb {
    /// Opens (creating) the database at `path` with these column families.
    pub fn open(path: &Path, column_families: &[&str]) -> Result<Arc<MetaDb>, rocksdb::Error> {
        let mut opts = Options::default();
        opts.create_if_missing(true);
        opts.create_missing_column_families(true);
        // The default opens table files on 16 threads: for a database of a
        // few small tables, starting the threads costs more than the reads.
        opts.set_max_file_opening_threads(1);
        opts.set_skip_stats_update_on_db_open(true);
        opts.set_keep_log_file_num(2);
        let cfs = column_families
            .iter()
            .map(|n| ColumnFamilyDescriptor::new(*n, crate::store::column_family_options(n)));
        let db = DB::open_cf_descriptors(&opts, path, cfs)?;
        retire_empty_logs(&db, path)?;
        Ok(Arc::new(MetaDb {
            db,
            path: path.to_path_buf(),
            column_families: column_families.iter().map(|c| c.to_string()).collect(),
        }))
    }

    /// Where the database lives, for error messages.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The database.
    pub fn db(&self) -> &DB {
        &self.db
    }

    /// Fails unless the database was opened with all these column
    /// families; each store checks its own once, when it is created.
    pub fn require(&self, column_families: &[&'static str]) -> Result<(), crate::Error> {
        match column_families
            .iter()
            .find(|cf| self.db.cf_handle(cf).is_none())
        {
            Some(name) => Err(crate::Error::MissingColumnFamily {
                path: self.path.clone(),
                name,
            }),
            None => Ok(()),
        }
    }

    /// A column family the store checked with [`MetaDb::require`].
    ///
    /// # Panics
    /// If it was not: a store used with a database opened without its
    /// families is a programming error, caught by the store's constructor.
    pub fn cf(&self, column_family: &str) -> &ColumnFamily {
        #[allow(clippy::expect_used)]
        self.db
            .cf_handle(column_family)
            .expect("column family checked when the store was created")
    }

    /// Deletes every record in a column family; returns how many there
    /// were.
    pub fn clear(&self, column_family: &str) -> Result<usize, rocksdb::Error> {
        let cf = self.cf(column_family);
        let mut batch = rocksdb::WriteBatch::default();
        for item in self.db.iterator_cf(cf, rocksdb::IteratorMode::Start) {
            let (k, _) = item?;
            batch.delete_cf(cf, k);
        }
        let n = batch.len();
        self.db.write(batch)?;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn logs(dir: &Path) -> usize {
        std::fs::read_dir(dir)
            .unwrap()
            .flatten()
            .filter(|e| e.file_name().to_string_lossy().ends_with(".log"))
            .count()
    }

    #[test]
    fn records_survive_reopening_and_idle_opens_do_not_pile_up_logs() {
        let dir = tempfile::tempdir().unwrap();
        {
            let db = MetaDb::open(dir.path(), &["a", "b"]).unwrap();
            db.require(&["a", "b"]).unwrap();
            db.db().put_cf(db.cf("a"), b"k", b"v").unwrap();
        }
        for _ in 0..3 * MAX_LOGS {
            let db = MetaDb::open(dir.path(), &["a", "b"]).unwrap();
            assert_eq!(db.db().get_cf(db.cf("a"), b"k").unwrap().unwrap(), b"v");
        }
        assert!(
            logs(dir.path()) <= MAX_LOGS + 1,
            "{} logs",
            logs(dir.path())
        );
        // RocksDB refuses to open without every family it holds.
        let e = MetaDb::open(dir.path(), &["a"]).unwrap_err();
        assert!(e.to_string().contains("not opened: b"), "{e}");
    }

    #[test]
    fn a_store_is_refused_a_database_without_its_families() {
        let dir = tempfile::tempdir().unwrap();
        let db = MetaDb::open(dir.path(), &["a"]).unwrap();
        let e = db.require(&["a", "missing"]).unwrap_err();
        assert!(e.to_string().contains("no column family missing"), "{e}");
        assert_eq!(db.clear("a").unwrap(), 0);
        db.db().put_cf(db.cf("a"), b"1", b"").unwrap();
        db.db().put_cf(db.cf("a"), b"2", b"").unwrap();
        assert_eq!(db.clear("a").unwrap(), 2);
        assert_eq!(db.clear("a").unwrap(), 0);
    }
}
