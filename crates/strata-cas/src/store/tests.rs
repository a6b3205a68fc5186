use super::*;

fn store() -> (tempfile::TempDir, ContentStore) {
    let dir = tempfile::tempdir().unwrap();
    let s = ContentStore::open(dir.path()).unwrap();
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

#[test]
fn corruption_is_detected_not_served() {
    let (_d, s) = store();
    let a = s.put(b"precious bytes").unwrap();
    fs::write(s.blob_path(&a), b"precious bytez").unwrap();
    assert!(matches!(s.read(&a), Err(Error::Corrupt { .. })));
    assert!(!s.verify(&a).unwrap());
    fs::write(s.blob_path(&a), b"precious bytes and more").unwrap();
    assert!(matches!(s.read(&a), Err(Error::Corrupt { .. })));
    fs::remove_file(s.blob_path(&a)).unwrap();
    let e = s.read(&a).unwrap_err();
    assert!(e.to_string().contains("is missing"), "{e}");
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
