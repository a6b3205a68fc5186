//! Cache keys: what makes two steps the same work.
//!
//! A step's key is blake3 over a versioned, canonical encoding of its
//! parent's key, its op (fully expanded, host-specific fields blanked) and
//! the content digests of its inputs. See `docs/cache-keys.md`.

use strata_cas::Digest;

use crate::ops::{Op, RunMountKind, Source};

/// Changing what goes into keys, or how, bumps this: old entries then
/// simply stop matching.
pub const KEY_VERSION: &[u8] = b"strata.key.v1\0";

fn hasher(kind: &[u8]) -> blake3::Hasher {
    let mut h = blake3::Hasher::new();
    h.update(KEY_VERSION);
    h.update(kind);
    h.update(b"\0");
    h
}

fn field(h: &mut blake3::Hasher, bytes: &[u8]) {
    h.update(&(bytes.len() as u64).to_le_bytes());
    h.update(bytes);
}

/// The key of an empty filesystem for `platform` (`linux/amd64`).
pub fn scratch_key(platform: &str) -> Digest {
    let mut h = hasher(b"scratch");
    field(&mut h, platform.as_bytes());
    Digest(*h.finalize().as_bytes())
}

/// The key of an image's filesystem: its manifest's sha256 (hex).
pub fn image_key(manifest_hex: &str) -> Digest {
    let mut h = hasher(b"image");
    field(&mut h, manifest_hex.as_bytes());
    Digest(*h.finalize().as_bytes())
}

/// The key of a step: its parent's key, its op and its inputs' contents.
pub fn step_key(parent: &Digest, op: &Op, inputs: &[Digest]) -> Digest {
    let mut h = hasher(b"step");
    h.update(&parent.0);
    field(&mut h, &op_key_bytes(op));
    h.update(&(inputs.len() as u64).to_le_bytes());
    for i in inputs {
        h.update(&i.0);
    }
    Digest(*h.finalize().as_bytes())
}

/// The op's canonical encoding with what must not matter blanked: which
/// plan position a source stage has (its content is an input instead), the
/// layers of an image source (its manifest digest stays), and cache-mount
/// ids (a cache mount's content never decides a step's result).
pub fn op_key_bytes(op: &Op) -> Vec<u8> {
    let mut op = op.clone();
    let blank = |s: &mut Source| match s {
        Source::Stage(i) => *i = 0,
        Source::Image(img) => img.layers.clear(),
        Source::Context => {}
    };
    match &mut op {
        Op::Copy(c) => blank(&mut c.from),
        Op::Exec(e) => {
            for m in &mut e.mounts {
                match &mut m.kind {
                    RunMountKind::Bind { from, .. } => blank(from),
                    RunMountKind::Cache { id, .. } => id.clear(),
                    _ => {}
                }
            }
        }
        Op::Mkdir(_) => {}
    }
    // Plain data without maps: the encoding is deterministic and cannot fail.
    bincode::serde::encode_to_vec(&op, bincode::config::standard()).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::ops::{CopyOp, MkdirOp};

    fn copy(from: Source) -> Op {
        Op::Copy(CopyOp {
            from,
            sources: vec!["/out/app".into()],
            inline: vec![],
            dest: "/app".into(),
            chown: None,
            chmod: None,
            parents: false,
            excludes: vec![],
            unpack: false,
            urls: vec![],
        })
    }

    #[test]
    fn keys_depend_on_parent_op_and_inputs_only() {
        let parent = scratch_key("linux/amd64");
        let input = Digest::of(b"builder output");
        let a = step_key(&parent, &copy(Source::Stage(1)), &[input]);
        assert_eq!(
            a,
            step_key(&parent, &copy(Source::Stage(7)), &[input]),
            "plan position is not content"
        );
        assert_ne!(
            a,
            step_key(&parent, &copy(Source::Stage(1)), &[Digest::of(b"other")])
        );
        assert_ne!(
            a,
            step_key(&image_key("ab"), &copy(Source::Stage(1)), &[input])
        );
        let mk = |p: &str| {
            Op::Mkdir(MkdirOp {
                path: p.into(),
                user: String::new(),
            })
        };
        assert_ne!(
            step_key(&parent, &mk("/a"), &[]),
            step_key(&parent, &mk("/b"), &[])
        );
        assert_ne!(scratch_key("linux/amd64"), scratch_key("linux/arm64"));
    }
}
