//! The image model the buildah conformance cases compare: the config as
//! JSON and the filesystem as a tree, read from a `docker save` archive.
//!
//! Layers are applied in `diff_ids` order to an empty tree: a hard link
//! copies the entry it names, `.wh.x` deletes `x`, `.wh..wh..opq` empties
//! its directory, a directory over a directory keeps the children.
//! Modification times are left out: two builders run at different
//! times, and what is compared is what a container sees.

use std::collections::BTreeMap;
use std::io::Read;
use std::path::Path;

use serde_json::{Map, Value, json};
use sha2::Digest as _;

/// One node of the tree.
#[derive(Debug, Clone, Default)]
struct Node {
    attrs: Map<String, Value>,
    dir: Option<BTreeMap<String, Node>>,
}

impl Node {
    fn to_json(&self) -> Value {
        let mut m = self.attrs.clone();
        if let Some(children) = &self.dir {
            let c: Map<String, Value> = children
                .iter()
                .map(|(k, v)| (k.clone(), v.to_json()))
                .collect();
            m.insert("(dir)".into(), Value::Object(c));
        }
        Value::Object(m)
    }
}

/// An image read back: its config and its filesystem.
pub struct Model {
    /// The config blob as JSON.
    pub config: Value,
    /// The filesystem tree (see the module docs).
    pub fs: Value,
}

/// Reads a `docker save` archive (file) into a model.
pub fn read_docker_archive(path: &Path) -> Result<Model, String> {
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let f = std::fs::File::open(path).map_err(|e| format!("{}: {e}", path.display()))?;
    tar::Archive::new(f)
        .unpack(dir.path())
        .map_err(|e| format!("{}: {e}", path.display()))?;
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("manifest.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let entry = &manifest[0];
    let config_name = entry["Config"]
        .as_str()
        .ok_or("manifest.json has no Config")?;
    let config: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join(config_name)).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let mut root = Node {
        attrs: Map::new(),
        dir: Some(BTreeMap::new()),
    };
    for layer in entry["Layers"]
        .as_array()
        .ok_or("manifest.json has no Layers")?
    {
        let p = dir.path().join(layer.as_str().ok_or("bad layer name")?);
        let bytes = std::fs::read(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        let plain = if bytes.starts_with(&[0x1f, 0x8b]) {
            let mut out = Vec::new();
            flate2_decode(&bytes, &mut out)?;
            out
        } else {
            bytes
        };
        apply(&mut root, &plain)?;
    }
    Ok(Model {
        config,
        fs: root.to_json(),
    })
}

/// The top layer of image `tag` in `s`'s store, as `strata save` writes
/// it (an uncompressed tar).
pub fn top_layer(s: &crate::Strata, tag: &str) -> Result<Vec<u8>, String> {
    let archive = s.home().join("top-layer.tar");
    s.ok(&["save", "-o", &archive.to_string_lossy(), tag]);
    let dir = tempfile::tempdir().map_err(|e| e.to_string())?;
    let f = std::fs::File::open(&archive).map_err(|e| format!("{}: {e}", archive.display()))?;
    tar::Archive::new(f)
        .unpack(dir.path())
        .map_err(|e| format!("{}: {e}", archive.display()))?;
    let manifest: Value = serde_json::from_slice(
        &std::fs::read(dir.path().join("manifest.json")).map_err(|e| e.to_string())?,
    )
    .map_err(|e| e.to_string())?;
    let top = manifest[0]["Layers"]
        .as_array()
        .and_then(|l| l.last())
        .and_then(Value::as_str)
        .ok_or("manifest.json has no Layers")?;
    std::fs::read(dir.path().join(top)).map_err(|e| e.to_string())
}

fn flate2_decode(input: &[u8], out: &mut Vec<u8>) -> Result<(), String> {
    flate2::read::MultiGzDecoder::new(input)
        .read_to_end(out)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

fn apply(root: &mut Node, layer: &[u8]) -> Result<(), String> {
    let mut archive = tar::Archive::new(layer);
    let mut seen: BTreeMap<String, Map<String, Value>> = BTreeMap::new();
    for e in archive.entries().map_err(|e| e.to_string())? {
        let mut e = e.map_err(|e| e.to_string())?;
        let h = e.header().clone();
        let name = String::from_utf8_lossy(&e.path_bytes()).into_owned();
        let link = e
            .link_name_bytes()
            .map(|l| String::from_utf8_lossy(&l).into_owned())
            .unwrap_or_default();
        let mut xattrs = Map::new();
        if let Ok(Some(exts)) = e.pax_extensions() {
            for x in exts.flatten() {
                if let Some(k) = x
                    .key()
                    .ok()
                    .and_then(|k| k.strip_prefix("SCHILY.xattr.").map(str::to_string))
                {
                    xattrs.insert(
                        k,
                        Value::String(String::from_utf8_lossy(x.value_bytes()).into_owned()),
                    );
                }
            }
        }
        let mut content = Vec::new();
        e.read_to_end(&mut content).map_err(|e| e.to_string())?;
        let kind = h.entry_type().as_byte();
        let mut attrs = Map::new();
        if kind == b'1' {
            let target = seen
                .get(link.trim_start_matches("./"))
                .ok_or_else(|| format!("hard link {name} to {link}: no such entry in its layer"))?;
            attrs = target.clone();
        } else {
            attrs.insert("typeflag".into(), json!(kind));
            if !link.is_empty() {
                attrs.insert("linkname".into(), json!(link));
            }
            attrs.insert("size".into(), json!(h.size().unwrap_or(0)));
            attrs.insert("mode".into(), json!(h.mode().unwrap_or(0) & 0o7777));
            attrs.insert("uid".into(), json!(h.uid().unwrap_or(0)));
            attrs.insert("gid".into(), json!(h.gid().unwrap_or(0)));
            if matches!(kind, b'3' | b'4') {
                attrs.insert(
                    "devmajor".into(),
                    json!(h.device_major().ok().flatten().unwrap_or(0)),
                );
                attrs.insert(
                    "devminor".into(),
                    json!(h.device_minor().ok().flatten().unwrap_or(0)),
                );
            }
            if !xattrs.is_empty() {
                attrs.insert("xattrs".into(), Value::Object(xattrs));
            }
            if !content.is_empty() {
                attrs.insert(
                    "digest".into(),
                    json!(format!("sha256:{:x}", sha2::Sha256::digest(&content))),
                );
            }
        }
        let clean = name.trim_start_matches("./").trim_matches('/').to_string();
        seen.insert(clean.clone(), attrs.clone());
        if clean.is_empty() || clean == "." {
            continue;
        }
        let parts: Vec<&str> = clean.split('/').collect();
        let (base, parents) = parts.split_last().ok_or("empty name")?;
        let mut node = &mut *root;
        for p in parents {
            node = node
                .dir
                .as_mut()
                .and_then(|d| d.get_mut(*p))
                .ok_or_else(|| format!("{name}: parent {p} does not exist"))?;
        }
        let children = node
            .dir
            .as_mut()
            .ok_or_else(|| format!("{name}: parent is not a directory"))?;
        if *base == ".wh..wh..opq" {
            children.clear();
            continue;
        }
        if let Some(hidden) = base.strip_prefix(".wh.") {
            children.remove(hidden);
            continue;
        }
        let is_dir = kind == b'5';
        match children.get_mut(*base) {
            Some(existing) if is_dir && existing.dir.is_some() => existing.attrs = attrs,
            _ => {
                children.insert(
                    base.to_string(),
                    Node {
                        attrs,
                        dir: is_dir.then(BTreeMap::new),
                    },
                );
            }
        }
    }
    Ok(())
}

/// Compares `docker` with `strata` as the conformance cases do: every key
/// docker has must be in strata's with an equal value, except `skip`s
/// (`a:b` is key `b` inside `a`); `null` equals an empty value. With
/// `strict`, strata may not have keys docker lacks. Returns the differences.
pub fn compare(
    docker: &Value,
    strata: &Value,
    skip: &[String],
    strict: bool,
    at: &str,
    out: &mut Vec<String>,
) {
    let skipped = |k: &str| skip.iter().any(|s| s.eq_ignore_ascii_case(k));
    let nested = |k: &str| -> Vec<String> {
        skip.iter()
            .filter_map(|s| s.strip_prefix(&format!("{k}:")).map(str::to_string))
            .collect()
    };
    let empty = |v: &Value| match v {
        Value::Null => true,
        Value::String(s) => s.is_empty(),
        Value::Array(a) => a.is_empty(),
        Value::Object(o) => o.is_empty(),
        _ => false,
    };
    match (docker, strata) {
        (Value::Object(d), Value::Object(s)) => {
            for (k, dv) in d {
                if skipped(k) {
                    continue;
                }
                let path = format!("{at}/{k}");
                match s.get(k) {
                    None if empty(dv) => {
                        out.push(format!("{path}: docker has {dv}, strata has no such key"))
                    }
                    None => out.push(format!("{path}: docker has {dv}, strata has none")),
                    Some(sv) => compare(dv, sv, &nested(k), strict, &path, out),
                }
            }
            if strict {
                for k in s.keys().filter(|k| !d.contains_key(*k) && !skipped(k)) {
                    out.push(format!("{at}/{k}: only in strata"));
                }
            }
        }
        (Value::Array(d), Value::Array(s)) => {
            if d != s {
                out.push(format!("{at}: docker has {docker}, strata has {strata}"));
            }
        }
        (d, s) if empty(d) && empty(s) => {}
        (d, s) if d.is_number() && s.is_number() => {
            if d.as_f64() != s.as_f64() {
                out.push(format!("{at}: docker has {d}, strata has {s}"));
            }
        }
        (d, s) => {
            if d != s {
                out.push(format!("{at}: docker has {d}, strata has {s}"));
            }
        }
    }
}
