//! Layers in and out, through real overlay mounts (needs root, as strata
//! itself does).

// Test helpers stop loudly.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::collections::BTreeMap;
use std::fs;
use std::io::Read;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::sync::Arc;

use strata_cas::ContentStore;
use strata_snapshot::{Error, Snapshotter, apply_tar, write_layer};
use tar::{EntryType, Header};

/// Builds a tar from (name, kind, mode, uid, data-or-link).
fn tar(entries: &[(&str, EntryType, u32, u64, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for &(name, kind, mode, uid, data) in entries {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(mode);
        h.set_uid(uid);
        h.set_gid(uid);
        h.set_mtime(1_000_000);
        match kind {
            EntryType::Symlink | EntryType::Link => {
                h.set_size(0);
                b.append_link(&mut h, name, data).unwrap();
            }
            _ => {
                h.set_size(data.len() as u64);
                b.append_data(&mut h, name, data.as_bytes()).unwrap();
            }
        }
    }
    b.into_inner().unwrap()
}

/// A tar whose names are written raw, bypassing the tar crate's own
/// refusal of `..` and absolute names: what a hostile layer looks like.
fn hostile(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
    let mut out = Vec::new();
    for &(name, kind, link) in entries {
        let mut h = Header::new_gnu();
        h.set_entry_type(kind);
        h.set_mode(0o644);
        h.set_size(0);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(0);
        let old = h.as_old_mut();
        old.name[..name.len()].copy_from_slice(name.as_bytes());
        old.linkname[..link.len()].copy_from_slice(link.as_bytes());
        h.set_cksum();
        out.extend_from_slice(h.as_bytes());
    }
    out.extend_from_slice(&[0u8; 1024]);
    out
}

/// name → (kind, mode, uid, content or link target) of every tar entry.
fn listing(tar_bytes: &[u8]) -> BTreeMap<String, (EntryType, u32, u64, String)> {
    let mut a = tar::Archive::new(tar_bytes);
    let mut out = BTreeMap::new();
    for e in a.entries().unwrap() {
        let mut e = e.unwrap();
        let h = e.header().clone();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let mut body = String::new();
        if let Some(l) = e.link_name_bytes() {
            body = String::from_utf8_lossy(&l).into_owned();
        } else {
            e.read_to_string(&mut body).unwrap();
        }
        out.insert(
            name,
            (h.entry_type(), h.mode().unwrap(), h.uid().unwrap(), body),
        );
    }
    out
}

fn setup() -> (tempfile::TempDir, Arc<ContentStore>, Arc<Snapshotter>) {
    let dir = tempfile::tempdir().unwrap();
    let cas = Arc::new(ContentStore::open(&dir.path().join("content")).unwrap());
    let snap = Arc::new(Snapshotter::open(dir.path(), Arc::clone(&cas)).unwrap());
    (dir, cas, snap)
}

#[test]
fn apply_then_diff_round_trips() {
    let src = tar(&[
        ("etc/", EntryType::Directory, 0o755, 0, ""),
        (
            "etc/passwd",
            EntryType::Regular,
            0o644,
            0,
            "root:x:0:0::/root:/bin/sh\n",
        ),
        ("usr/bin/", EntryType::Directory, 0o755, 0, ""),
        ("usr/bin/su", EntryType::Regular, 0o4755, 0, "#!suid"),
        ("usr/bin/sudo", EntryType::Link, 0o4755, 0, "usr/bin/su"),
        ("bin", EntryType::Symlink, 0o777, 0, "usr/bin"),
        ("tmp/", EntryType::Directory, 0o1777, 0, ""),
        ("home/app/", EntryType::Directory, 0o700, 1000, ""),
        ("home/app/notes", EntryType::Regular, 0o600, 1000, "mine"),
    ]);
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let stats = apply_tar(&root, src.as_slice()).unwrap();
    assert_eq!(stats.entries, 9);
    let su = fs::metadata(root.join("usr/bin/su")).unwrap();
    assert_eq!(su.mode() & 0o7777, 0o4755, "set-user-ID survives chown");
    assert_eq!(su.nlink(), 2);
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().mode() & 0o7777,
        0o1777
    );
    assert_eq!(
        fs::metadata(root.join("home/app/notes")).unwrap().uid(),
        1000
    );
    assert_eq!(fs::metadata(root.join("etc")).unwrap().mtime(), 1_000_000);

    let mut out = Vec::new();
    write_layer(&root, &mut out).unwrap();
    let got = listing(&out);
    assert_eq!(
        got["usr/bin/su"],
        (EntryType::Regular, 0o4755, 0, "#!suid".into())
    );
    assert_eq!(
        got["usr/bin/sudo"].0,
        EntryType::Link,
        "hard links stay links"
    );
    assert_eq!(got["bin"], (EntryType::Symlink, 0o777, 0, "usr/bin".into()));
    assert_eq!(got["home/app/"].1, 0o700);
    assert_eq!(got["home/app/notes"].2, 1000);
    // Same tree, same bytes.
    let mut again = Vec::new();
    write_layer(&root, &mut again).unwrap();
    assert_eq!(out, again);
}

#[test]
fn escaping_entries_are_refused_and_nothing_lands_outside() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir(&root).unwrap();
    let cases: Vec<Vec<u8>> = vec![
        hostile(&[("../outside", EntryType::Regular, "")]),
        hostile(&[("a/../../outside", EntryType::Regular, "")]),
        hostile(&[("/etc/outside", EntryType::Regular, "")]),
        hostile(&[
            ("esc", EntryType::Symlink, "../.."),
            ("esc/outside", EntryType::Regular, ""),
        ]),
        hostile(&[("link", EntryType::Link, "../outside")]),
        hostile(&[("link", EntryType::Link, "/etc/passwd")]),
    ];
    for (i, t) in cases.iter().enumerate() {
        let err = apply_tar(&root, t.as_slice()).unwrap_err();
        assert!(matches!(err, Error::Unsafe { .. }), "case {i}: {err}");
    }
    assert!(!dir.path().join("outside").exists());
    assert!(!Path::new("/outside").exists());
    // A symlink with an absolute target is followed inside the root.
    let ok = tar(&[
        ("etc/", EntryType::Directory, 0o755, 0, ""),
        ("conf", EntryType::Symlink, 0o777, 0, "/etc"),
        ("conf/app.conf", EntryType::Regular, 0o644, 0, "inside"),
    ]);
    apply_tar(&root, ok.as_slice()).unwrap();
    assert_eq!(
        fs::read_to_string(root.join("etc/app.conf")).unwrap(),
        "inside"
    );
}

#[test]
fn steps_become_layers_with_whiteouts() {
    let (_d, cas, snap) = setup();
    let base = cas
        .put(&tar(&[
            ("keep", EntryType::Regular, 0o644, 0, "keep"),
            ("gone", EntryType::Regular, 0o644, 0, "gone"),
            ("dir/", EntryType::Directory, 0o755, 0, ""),
            ("dir/old", EntryType::Regular, 0o644, 0, "old"),
            ("usr/bin/", EntryType::Directory, 0o755, 0, ""),
            ("bin", EntryType::Symlink, 0o777, 0, "usr/bin"),
        ]))
        .unwrap();

    let step = snap.active(&[base]).unwrap();
    let root = step.rootfs();
    assert_eq!(fs::read_to_string(root.join("keep")).unwrap(), "keep");
    fs::remove_file(root.join("gone")).unwrap();
    fs::remove_dir_all(root.join("dir")).unwrap();
    fs::create_dir(root.join("dir")).unwrap();
    fs::write(root.join("dir/new"), "new").unwrap();
    fs::write(root.join("added"), "added").unwrap();
    let layer = step.commit().unwrap().unwrap();

    let got = listing(&cas.read(&layer.digest).unwrap());
    assert!(got.contains_key(".wh.gone"), "{got:?}");
    assert!(got.contains_key("dir/.wh..wh..opq"), "{got:?}");
    assert_eq!(got["dir/new"].3, "new");
    assert_eq!(got["added"].3, "added");
    assert!(!got.contains_key("keep"));
    assert_eq!(
        cas.info(&layer.digest).unwrap().unwrap().sha256,
        layer.diff_id
    );

    // The next step sees the merged result.
    let next = snap.active(&[base, layer.digest]).unwrap();
    let root = next.rootfs();
    assert!(!root.join("gone").exists());
    assert!(!root.join("dir/old").exists());
    assert_eq!(fs::read_to_string(root.join("dir/new")).unwrap(), "new");
    // A step that changes nothing makes no layer.
    assert!(next.commit().unwrap().is_none());
}

/// Takes bytes until `fail_after` of them, then fails every write,
/// counting the failures.
struct Flaky {
    got: Vec<u8>,
    fail_after: usize,
    failures: usize,
}

impl std::io::Write for Flaky {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        if self.got.len() + buf.len() > self.fail_after {
            self.failures += 1;
            return Err(std::io::Error::other("the taker went away"));
        }
        self.got.extend_from_slice(buf);
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[test]
fn a_teed_commit_writes_the_layer_s_bytes_twice_and_a_failing_tee_fails_nothing() {
    let (_d, cas, snap) = setup();
    let big: String = "x".repeat(300_000);
    let make = |name: &str| {
        let step = snap.active(&[]).unwrap();
        fs::write(step.rootfs().join(name), &big).unwrap();
        step
    };
    // The tee gets exactly the stored blob.
    let mut tee = Flaky {
        got: Vec::new(),
        fail_after: usize::MAX,
        failures: 0,
    };
    let layer = make("a").commit_teeing(Some(&mut tee)).unwrap().unwrap();
    assert_eq!(tee.got, cas.read(&layer.digest).unwrap());

    // One that fails part way is dropped; the layer is whole.
    let mut flaky = Flaky {
        got: Vec::new(),
        fail_after: 100_000,
        failures: 0,
    };
    let layer = make("b").commit_teeing(Some(&mut flaky)).unwrap().unwrap();
    assert_eq!(flaky.failures, 1, "written to again after it failed");
    assert!(!flaky.got.is_empty() && flaky.got.len() <= 100_000);
    assert!(cas.verify(&layer.digest).unwrap());
    assert_eq!(listing(&cas.read(&layer.digest).unwrap())["b"].3, big);
}

#[test]
fn layers_apply_through_symlinked_directories() {
    let (_d, cas, snap) = setup();
    let base = cas
        .put(&tar(&[
            ("usr/bin/", EntryType::Directory, 0o755, 0, ""),
            ("bin", EntryType::Symlink, 0o777, 0, "usr/bin"),
            ("tmp/", EntryType::Directory, 0o1777, 0, ""),
        ]))
        .unwrap();
    let top = cas
        .put(&tar(&[
            ("bin/tool", EntryType::Regular, 0o755, 0, "tool"),
            ("tmp/x", EntryType::Regular, 0o644, 0, "x"),
        ]))
        .unwrap();
    let view = snap.view(&[base, top]).unwrap();
    let root = view.root();
    assert!(
        fs::symlink_metadata(root.join("bin"))
            .unwrap()
            .file_type()
            .is_symlink()
    );
    assert_eq!(
        fs::read_to_string(root.join("usr/bin/tool")).unwrap(),
        "tool"
    );
    assert_eq!(
        fs::metadata(root.join("tmp")).unwrap().permissions().mode() & 0o7777,
        0o1777
    );
}

#[test]
fn corrupt_layer_blob_is_not_extracted() {
    let (_d, cas, snap) = setup();
    // Large enough to be kept as a file, which can be damaged.
    let data = "data".repeat(20_000);
    let base = cas
        .put(&tar(&[("f", EntryType::Regular, 0o644, 0, &data)]))
        .unwrap();
    let path = cas.blob_path(&base);
    let mut bytes = fs::read(&path).unwrap();
    let last = bytes.len() - 1;
    bytes[last] ^= 1;
    fs::write(&path, bytes).unwrap();
    let err = snap.active(&[base]).unwrap_err();
    assert!(err.to_string().contains("corrupt"), "{err}");
    assert!(
        !snap
            .chain_dir(&strata_snapshot::chain_id(None, &base))
            .exists()
    );
}

#[test]
fn whiteouts_that_name_no_sibling_are_refused_and_remove_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(root.join("d/inner")).unwrap();
    fs::write(root.join("d/inner/keep"), "keep").unwrap();
    for name in [
        "d/inner/.wh..",
        "d/inner/.wh...",
        "d/inner/.wh.",
        "d/.wh..wh.other",
    ] {
        let layer = tar(&[(name, EntryType::Regular, 0, 0, "")]);
        let e = apply_tar(&root, layer.as_slice()).unwrap_err();
        assert!(matches!(e, Error::Unsafe { .. }), "{name}: {e}");
        assert_eq!(
            fs::read_to_string(root.join("d/inner/keep")).unwrap(),
            "keep",
            "{name} removed something"
        );
    }
    // An ordinary whiteout still removes its sibling.
    let layer = tar(&[("d/inner/.wh.keep", EntryType::Regular, 0, 0, "")]);
    apply_tar(&root, layer.as_slice()).unwrap();
    assert!(!root.join("d/inner/keep").exists());
}

#[test]
fn empty_owner_fields_read_as_root_as_docker_reads_them_and_garbage_is_refused() {
    // What `tar::Header::new_ustar` writes when no owner is set: NULs.
    let entry = |uid: &[u8]| {
        let mut h = Header::new_ustar();
        h.set_entry_type(EntryType::Regular);
        h.set_mode(0o640);
        h.set_size(2);
        h.set_mtime(0);
        h.as_old_mut().uid[..uid.len()].copy_from_slice(uid);
        h.set_cksum();
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut h, "f", &b"hi"[..]).unwrap();
        b.into_inner().unwrap()
    };
    let dir = tempfile::tempdir().unwrap();
    apply_tar(dir.path(), entry(b"").as_slice()).unwrap();
    let m = fs::metadata(dir.path().join("f")).unwrap();
    assert_eq!((m.uid(), m.gid(), m.mode() & 0o7777), (0, 0, 0o640));
    let other = tempfile::tempdir().unwrap();
    let e = apply_tar(other.path(), entry(b"x1").as_slice()).unwrap_err();
    assert!(matches!(e, Error::Tar(_)), "{e}");
}

#[test]
fn an_archive_add_unpacks_keeps_whiteout_names_as_files() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("root");
    fs::create_dir_all(&root).unwrap();
    fs::write(root.join("keep"), "keep").unwrap();
    let archive = tar(&[(".wh.keep", EntryType::Regular, 0o644, 0, "a file")]);
    strata_snapshot::apply_tar_with(&root, archive.as_slice(), strata_snapshot::TarKind::Archive)
        .unwrap();
    assert_eq!(fs::read_to_string(root.join("keep")).unwrap(), "keep");
    assert_eq!(fs::read_to_string(root.join(".wh.keep")).unwrap(), "a file");
}

#[test]
fn dropping_a_layer_removes_its_chains_and_those_on_top_only() {
    let (_d, cas, snap) = setup();
    let layer = |name: &str| {
        cas.put(&tar(&[(name, EntryType::Regular, 0o644, 0, name)]))
            .unwrap()
    };
    let (a, b, c, d) = (layer("a"), layer("b"), layer("c"), layer("d"));
    let ab = snap.prepare(&[a, b]).unwrap();
    let acd = snap.prepare(&[a, c, d]).unwrap();
    let dropped = std::collections::HashSet::from([c]);
    // a/c and a/c/d go; a and a/b stay.
    assert_eq!(snap.remove_chains_of(&dropped).unwrap(), 2);
    for (chain, kept) in [
        (ab[0], true),
        (ab[1], true),
        (acd[1], false),
        (acd[2], false),
    ] {
        assert_eq!(snap.chain_dir(&chain).is_dir(), kept, "{chain}");
    }
    // Extracting again after the layer came back works.
    assert_eq!(snap.prepare(&[a, c, d]).unwrap(), acd);
    assert!(snap.chain_dir(&acd[2]).is_dir());
}

#[test]
fn a_chain_a_mount_uses_is_not_removed_under_it() {
    let (_d, cas, snap) = setup();
    let a = cas
        .put(&tar(&[("bin-sh", EntryType::Regular, 0o755, 0, "sh")]))
        .unwrap();
    let dropped = std::collections::HashSet::from([a]);
    let active = snap.active(&[a]).unwrap();
    // Eviction dropped the layer's blob while a step had it mounted (the
    // blob came back, or the step's lease came first): its files stay.
    assert_eq!(snap.remove_chains_of(&dropped).unwrap(), 0);
    assert_eq!(
        fs::read_to_string(active.rootfs().join("bin-sh")).unwrap(),
        "sh"
    );
    let view = snap.view(&[a]).unwrap();
    drop(active);
    assert_eq!(snap.remove_chains_of(&dropped).unwrap(), 0);
    assert_eq!(
        fs::read_to_string(view.root().join("bin-sh")).unwrap(),
        "sh"
    );
    // Once nothing uses it, it goes.
    drop(view);
    assert_eq!(snap.remove_chains_of(&dropped).unwrap(), 1);
}
