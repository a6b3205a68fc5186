use super::*;

fn store() -> (tempfile::TempDir, Arc<ContentStore>) {
    let dir = tempfile::tempdir().unwrap();
    let s = Arc::new(ContentStore::open(dir.path()).unwrap());
    (dir, s)
}

#[test]
fn put_read_and_dedupe() {
    let (_d, s) = store();
    let a = s.put(b"hello world").unwrap();
    assert_eq!(a, Digest::of(b"hello world"));
    assert_eq!(s.read(&a).unwrap(), b"hello world");
    assert_eq!(s.put(b"hello world").unwrap(), a);
    let info = s.info(&a).unwrap().unwrap();
    assert_eq!(info.size, 11);
    assert_eq!(info.sha256, Sha256::of(b"hello world"));
    assert_eq!(s.by_sha256(&info.sha256).unwrap(), Some(a));
    assert_eq!(s.list().unwrap().len(), 1);
}

/// A blob too large to be kept inline: it is a file.
fn large(fill: u8) -> Vec<u8> {
    vec![fill; INLINE_UP_TO as usize + 1]
}

#[test]
fn corruption_is_detected_not_served() {
    let (_d, s) = store();
    let bytes = large(b'p');
    let a = s.put(&bytes).unwrap();
    let mut damaged = bytes.clone();
    damaged[7] = b'q';
    fs::write(s.blob_path(&a), &damaged).unwrap();
    assert!(matches!(s.read(&a), Err(Error::Corrupt { .. })));
    assert!(!s.verify(&a).unwrap());
    damaged.push(b'p');
    fs::write(s.blob_path(&a), &damaged).unwrap();
    assert!(matches!(s.read(&a), Err(Error::Corrupt { .. })));
    fs::remove_file(s.blob_path(&a)).unwrap();
    let e = s.read(&a).unwrap_err();
    assert!(e.to_string().contains("is missing"), "{e}");
}

#[test]
fn damaged_inline_bytes_are_detected_not_served() {
    let (_d, s) = store();
    let a = s.put(b"precious bytes").unwrap();
    assert!(matches!(
        s.stored(&a).unwrap(),
        Some((_, Stored::Inline(_)))
    ));
    let db = s.meta.db();
    db.put_cf(s.cf(CF_INLINE), a.0, b"precious bytez").unwrap();
    assert!(matches!(s.read(&a), Err(Error::Corrupt { .. })));
    assert!(!s.verify(&a).unwrap());
    db.put_cf(s.cf(CF_INLINE), a.0, b"precious").unwrap();
    assert!(!s.present(&a).unwrap());
}

#[test]
fn small_blobs_are_kept_inline_and_large_ones_as_files() {
    let (_d, s) = store();
    let small = vec![b's'; INLINE_UP_TO as usize];
    let a = s.put(&small).unwrap();
    let b = s.put(&large(b'l')).unwrap();
    assert!(!s.blob_path(&a).exists(), "a small blob makes no file");
    assert!(s.blob_path(&b).exists());
    assert_eq!(s.read(&a).unwrap(), small);
    assert_eq!(s.read(&b).unwrap(), large(b'l'));
    assert!(s.present(&a).unwrap() && s.present(&b).unwrap());
    // Streamed in pieces, a blob spills to a file only once it is large.
    let mut w = s.writer().unwrap();
    for chunk in large(b'w').chunks(1000) {
        w.write_all(chunk).unwrap();
    }
    let c = w.commit().unwrap();
    assert!(s.blob_path(&c).exists());
    assert_eq!(fs::read_dir(s.root().join("ingest")).unwrap().count(), 0);
    // Deleted, an inline blob is gone with its record.
    assert!(s.delete(&a).unwrap());
    assert!(!s.present(&a).unwrap());
    assert!(s.stored(&a).unwrap().is_none());
    assert_eq!(s.put(&small).unwrap(), a);
    assert_eq!(s.read(&a).unwrap(), small);
}

/// Writes `bytes` into `batch`, uncommitted.
fn stage(s: &ContentStore, batch: &mut Batch, bytes: &[u8]) {
    let mut w = s.writer().unwrap();
    w.write_all(bytes).unwrap();
    w.finish_into(batch, Digest::of(bytes)).unwrap();
}

#[test]
fn a_batch_stores_small_and_large_blobs_together_each_once() {
    let (_d, s) = store();
    let blobs = [
        b"one".to_vec(),
        large(b'2'),
        b"one".to_vec(),
        b"three".to_vec(),
    ];
    let mut batch = s.batch();
    batch.label("context", "1");
    for b in &blobs {
        stage(&s, &mut batch, b);
    }
    assert_eq!(batch.commit().unwrap(), 3);
    for b in &blobs {
        let d = Digest::of(b);
        assert_eq!(&s.read(&d).unwrap(), b);
        assert_eq!(s.info(&d).unwrap().unwrap().labels["context"], "1");
    }
    assert_eq!(fs::read_dir(s.root().join("ingest")).unwrap().count(), 0);
    // More files than are synced one by one: the filesystem is synced.
    let many: Vec<Vec<u8>> = (0..6).map(|i| large(b'a' + i)).collect();
    let mut batch = s.batch();
    for b in &many {
        stage(&s, &mut batch, b);
    }
    assert_eq!(batch.commit().unwrap(), 6);
    for b in &many {
        assert_eq!(&s.read(&Digest::of(b)).unwrap(), b);
        assert!(s.blob_path(&Digest::of(b)).exists());
    }
    // A dropped batch leaves nothing behind.
    let mut batch = s.batch();
    stage(&s, &mut batch, &large(b'x'));
    drop(batch);
    assert!(!s.contains(&Digest::of(&large(b'x'))).unwrap());
    assert_eq!(fs::read_dir(s.root().join("ingest")).unwrap().count(), 0);
}

#[test]
fn uncommitted_writes_leave_nothing() {
    let (_d, s) = store();
    {
        let mut w = s.writer().unwrap();
        w.write_all(b"half a blob").unwrap();
    }
    assert!(s.list().unwrap().is_empty());
    assert_eq!(fs::read_dir(s.root().join("ingest")).unwrap().count(), 0);
    let mut w = s.writer().unwrap();
    w.write_all(b"x").unwrap();
    assert!(matches!(
        w.commit_expecting(Digest::of(b"y"), None),
        Err(Error::Unexpected { .. })
    ));
    assert!(s.list().unwrap().is_empty());
}

#[test]
fn a_claimed_sha256_is_checked_and_a_mapping_never_moves() {
    let (_d, s) = store();
    let real = s.put(b"busybox rootfs").unwrap();
    let real_sha = s.info(&real).unwrap().unwrap().sha256;

    // A sender names other bytes with busybox's sha256 (its diff_id):
    // refused, nothing stored, the mapping stands.
    let forged = b"a filesystem of the attacker's";
    let mut w = s.writer().unwrap();
    w.write_all(forged).unwrap();
    let e = w
        .commit_expecting(Digest::of(forged), Some(&real_sha))
        .unwrap_err();
    assert!(matches!(e, Error::UnexpectedSha256 { .. }), "{e}");
    assert!(e.to_string().contains(&real_sha.to_string()), "{e}");
    assert!(!s.contains(&Digest::of(forged)).unwrap());
    assert_eq!(s.by_sha256(&real_sha).unwrap(), Some(real));
    assert_eq!(fs::read_dir(s.root().join("ingest")).unwrap().count(), 0);

    // The truth is taken, and stored under its own sha256.
    let mut w = s.writer().unwrap();
    w.write_all(forged).unwrap();
    let sha = w.sha256();
    let d = w.commit_expecting(Digest::of(forged), Some(&sha)).unwrap();
    assert_eq!(s.info(&d).unwrap().unwrap().sha256, Sha256::of(forged));
    assert_eq!(s.by_sha256(&real_sha).unwrap(), Some(real));

    // Deleting a blob removes only its own mapping.
    assert!(s.delete(&d).unwrap());
    assert_eq!(s.by_sha256(&real_sha).unwrap(), Some(real));
    assert_eq!(s.by_sha256(&Sha256::of(forged)).unwrap(), None);
}

#[test]
fn reopen_keeps_blobs_and_clears_ingest() {
    let dir = tempfile::tempdir().unwrap();
    let a = {
        let s = ContentStore::open(dir.path()).unwrap();
        fs::write(dir.path().join("ingest/leftover"), b"killed mid-write").unwrap();
        s.put(b"kept").unwrap()
    };
    let s = ContentStore::open(dir.path()).unwrap();
    assert_eq!(s.read(&a).unwrap(), b"kept");
    assert_eq!(fs::read_dir(dir.path().join("ingest")).unwrap().count(), 0);
}

#[test]
fn leases_block_deletion() {
    let (_d, s) = store();
    let a = s.put(b"in use").unwrap();
    {
        let mut lease = s.lease();
        lease.hold(a);
        assert!(!s.delete(&a).unwrap());
        assert!(s.contains(&a).unwrap());
    }
    assert!(s.delete(&a).unwrap());
    assert!(!s.contains(&a).unwrap());
    assert!(!s.blob_path(&a).exists());
    assert!(matches!(s.read(&a), Err(Error::NotFound(_))));
}

#[test]
fn labels_and_references() {
    let (_d, s) = store();
    let a = s.put(b"layer").unwrap();
    let b = s.put(b"layer.gz").unwrap();
    s.set_label(&a, "ref.gzip", Some(&b.to_string())).unwrap();
    s.set_label(&a, "note", Some("x")).unwrap();
    let info = s.info(&a).unwrap().unwrap();
    assert_eq!(info.references().collect::<Vec<_>>(), [b]);
    s.set_label(&a, "note", None).unwrap();
    assert_eq!(s.info(&a).unwrap().unwrap().labels.len(), 1);
}

#[test]
fn the_count_of_changes_moves_with_what_the_store_holds() {
    let (_d, s) = store();
    let start = s.changes();
    let d = s.put(b"one").unwrap();
    let added = s.changes();
    assert_ne!(added, start);
    // Storing it again changes nothing.
    s.put(b"one").unwrap();
    assert_eq!(s.changes(), added);
    assert!(s.delete(&d).unwrap());
    assert_ne!(s.changes(), added);
}

#[test]
fn the_count_of_removals_moves_only_when_a_blob_goes() {
    let (_d, s) = store();
    let start = s.removals();
    let d = s.put(b"one").unwrap();
    s.put(b"two").unwrap();
    assert_eq!(s.removals(), start, "adding removes nothing");
    // A leased blob is not deleted, and the count stays.
    let mut lease = s.lease();
    lease.hold(d);
    assert!(!s.delete(&d).unwrap());
    assert_eq!(s.removals(), start);
    drop(lease);
    assert!(s.delete(&d).unwrap());
    assert_ne!(s.removals(), start);
    assert!(!s.contains(&d).unwrap());
}

#[test]
fn a_batch_stores_its_blobs_together_and_refuses_a_wrong_one() {
    let (d, s) = store();
    let already = s.put(b"already here").unwrap();
    let mut batch = s.batch();
    for bytes in [&b"one"[..], b"two", b"already here"] {
        let mut w = s.writer().unwrap();
        w.write_all(bytes).unwrap();
        w.finish_into(&mut batch, Digest::of(bytes)).unwrap();
    }
    let mut w = s.writer().unwrap();
    w.write_all(b"forged").unwrap();
    assert!(matches!(
        w.finish_into(&mut batch, Digest::of(b"something else")),
        Err(Error::Unexpected { .. })
    ));
    assert!(
        !s.contains(&Digest::of(b"one")).unwrap(),
        "not before the commit"
    );
    assert_eq!(batch.len(), 3);
    assert_eq!(
        batch.commit().unwrap(),
        2,
        "the stored one is not stored again"
    );
    for bytes in [&b"one"[..], b"two"] {
        assert_eq!(s.read(&Digest::of(bytes)).unwrap(), bytes);
        let info = s.info(&Digest::of(bytes)).unwrap().unwrap();
        assert_eq!(info.sha256, Sha256::of(bytes));
    }
    assert_eq!(s.read(&already).unwrap(), b"already here");
    // A batch dropped uncommitted leaves nothing behind.
    let mut batch = s.batch();
    let mut w = s.writer().unwrap();
    w.write_all(b"dropped").unwrap();
    w.finish_into(&mut batch, Digest::of(b"dropped")).unwrap();
    drop(batch);
    assert!(!s.contains(&Digest::of(b"dropped")).unwrap());
    assert_eq!(
        std::fs::read_dir(d.path().join("ingest")).unwrap().count(),
        0,
        "no temporary file is left"
    );
}

#[test]
fn absent_names_exactly_the_blobs_not_stored_in_order() {
    let (_d, s) = store();
    let stored: Vec<Digest> = (0..1000u32)
        .map(|i| s.put(&i.to_le_bytes()).unwrap())
        .collect();
    let never = |i: u32| Digest::of(format!("never {i}").as_bytes());
    let mut asked = Vec::new();
    for i in 0..1000u32 {
        asked.push(stored[i as usize]);
        if i % 100 == 0 {
            asked.push(never(i));
        }
    }
    let expected: Vec<Digest> = (0..1000u32).step_by(100).map(never).collect();
    assert_eq!(s.absent(&asked).unwrap(), expected);
    assert!(s.absent(&stored).unwrap().is_empty());
    assert!(s.absent(&[]).unwrap().is_empty());
    // The same answer as one lookup at a time.
    assert!(
        asked
            .iter()
            .all(|d| s.contains(d).unwrap() != expected.contains(d))
    );
}
