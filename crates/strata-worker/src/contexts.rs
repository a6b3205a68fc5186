//! `--build-context NAME=VALUE`, as buildx takes it: what `FROM NAME`,
//! `COPY --from=NAME` and `RUN --mount=from=NAME` use instead of the image
//! of that name. A stage of the Dockerfile with that name is replaced by
//! the context, as buildx replaces it: its instructions are not built.
//!
//! Every kind becomes an image for the planner: `docker-image://REF` is
//! another reference resolved the usual way (locally, else pulled), an
//! `oci-layout://PATH` is imported, and a directory is packed as one layer
//! (what its own `.dockerignore` lets through, owned by root, as the main
//! context is), so its files are content-addressed and a step reading them
//! is cached by their content.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use strata_dockerfile::{Dockerfile, IgnoreMatcher, Platform};
use strata_oci::{ImageConfig, Reference};
use strata_plan::{ImageResolver, ResolvedImage};

use crate::error::{BuildError, ContextImageError, FlagError, FlagProblem};
use crate::node::Node;
use crate::select::{SourceRoot, select};

/// What a named context is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum NamedContext {
    /// `docker-image://REF`: another image.
    Image(String),
    /// `oci-layout://PATH`: the image of an OCI layout directory (the
    /// build's platform's, when it holds several).
    Layout(PathBuf),
    /// A directory.
    Dir(PathBuf),
}

impl NamedContext {
    /// The reference `name` stands for in a plan: the image's own for
    /// `docker-image://`, `context:NAME` for an image the building node
    /// makes (a reference no registry name can be, as `:` ends a name).
    pub fn reference(&self, name: &str) -> String {
        match self {
            NamedContext::Image(r) => r.clone(),
            NamedContext::Layout(_) | NamedContext::Dir(_) => format!("context:{name}"),
        }
    }
}

/// Parses `NAME=VALUE`; relative paths stay relative (the caller resolves
/// them against the client's directory).
pub fn parse_named_context(s: &str) -> Result<(String, NamedContext), FlagError> {
    let bad = |problem| FlagError {
        flag: "--build-context",
        value: format!("{s:?}"),
        problem,
    };
    let (name, value) = s
        .split_once('=')
        .ok_or_else(|| bad(FlagProblem::NotNameValue))?;
    let valid = !name.is_empty()
        && name.len() <= 255
        && name.bytes().all(|b| {
            b.is_ascii_lowercase()
                || b.is_ascii_digit()
                || matches!(b, b'.' | b'_' | b'-' | b'/' | b':')
        });
    if !valid {
        return Err(bad(FlagProblem::ContextName(name.into())));
    }
    let context = if let Some(r) = value.strip_prefix("docker-image://") {
        r.parse::<Reference>()
            .map_err(|e| bad(FlagProblem::Reference(e)))?;
        NamedContext::Image(r.to_string())
    } else if let Some(p) = value.strip_prefix("oci-layout://") {
        if p.contains('@') {
            return Err(bad(FlagProblem::LayoutDigest));
        }
        NamedContext::Layout(PathBuf::from(p))
    } else if value.starts_with("target:") {
        return Err(bad(FlagProblem::BakeTarget));
    } else if value.contains("://") || value.starts_with("git@") {
        return Err(bad(FlagProblem::UrlContext));
    } else if value.is_empty() {
        return Err(bad(FlagProblem::NoValue));
    } else {
        NamedContext::Dir(PathBuf::from(value))
    };
    Ok((name.to_string(), context))
}

/// Replaces every stage named as a context by a stage of nothing but
/// `FROM NAME`, which [`Named`] resolves to the context.
pub(crate) fn override_stages(df: &mut Dockerfile, contexts: &BTreeMap<String, String>) {
    for stage in &mut df.stages {
        if let Some(name) = &stage.name
            && contexts.contains_key(name)
        {
            stage.base.clone_from(name);
            stage.instructions.clear();
        }
    }
}

/// Resolves the names the build's contexts give before images of those
/// names, then `inner`.
pub(crate) struct Named<'a> {
    /// Name → the reference it stands for ([`NamedContext::reference`]).
    pub contexts: &'a BTreeMap<String, String>,
    /// `context:NAME` → the image made for it.
    pub made: &'a BTreeMap<String, ResolvedImage>,
    /// Everything else.
    pub inner: &'a dyn ImageResolver,
}

impl ImageResolver for Named<'_> {
    fn resolve(
        &self,
        reference: &str,
        platform: &Platform,
    ) -> Result<ResolvedImage, strata_plan::ResolveError> {
        let reference = self
            .contexts
            .get(reference)
            .map_or(reference, String::as_str);
        if let Some(img) = self.made.get(reference) {
            return Ok(img.clone());
        }
        self.inner.resolve(reference, platform)
    }
}

fn resolved(image: strata_oci::Image, reference: String) -> ResolvedImage {
    ResolvedImage {
        reference,
        manifest: image.manifest_digest,
        config: image.config,
        layers: image.layers,
    }
}

/// The image a directory or layout context stands for, stored (unnamed) on
/// `node`. The caller leases its layers for the build.
pub(crate) fn make_image(
    node: &Node,
    name: &str,
    context: &NamedContext,
    platform: &Platform,
) -> Result<ResolvedImage, BuildError> {
    make(node, name, context, platform).map_err(|source| BuildError::NamedContext {
        name: name.to_string(),
        source: Box::new(source),
    })
}

fn make(
    node: &Node,
    name: &str,
    context: &NamedContext,
    platform: &Platform,
) -> Result<ResolvedImage, ContextImageError> {
    match context {
        NamedContext::Image(_) => Err(ContextImageError::IsImage),
        NamedContext::Layout(path) => {
            if !path.join("oci-layout").is_file() {
                return Err(ContextImageError::NotLayout { path: path.clone() });
            }
            let (image, _) = strata_oci::import(
                &node.images,
                path,
                &node.home().join("tmp"),
                &platform.os,
                &platform.architecture,
            )
            .map_err(|source| ContextImageError::Import {
                path: path.clone(),
                source: Box::new(source),
            })?;
            Ok(resolved(image, format!("oci-layout://{}", path.display())))
        }
        NamedContext::Dir(dir) => {
            if !dir.is_dir() {
                return Err(ContextImageError::NotDirectory { path: dir.clone() });
            }
            let image = pack_dir(node, dir, platform)?;
            Ok(resolved(image, format!("context:{name}")))
        }
    }
}

/// The directory as a one-layer image.
fn pack_dir(
    node: &Node,
    dir: &Path,
    platform: &Platform,
) -> Result<strata_oci::Image, ContextImageError> {
    let ignore_file = dir.join(".dockerignore");
    let ignore = match std::fs::read(&ignore_file) {
        Ok(bytes) => IgnoreMatcher::from_dockerignore(&bytes)?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => IgnoreMatcher::default(),
        Err(source) => {
            return Err(ContextImageError::Read {
                path: ignore_file,
                source,
            });
        }
    };
    let src = SourceRoot {
        root: dir,
        ignore: Some(&ignore),
        keep_owner: false,
    };
    let items = select(&src, &[".".to_string()])?;
    let tmp = node.home().join("tmp");
    let scratch = |source| ContextImageError::Scratch {
        dir: tmp.clone(),
        source,
    };
    let mut file = tempfile::tempfile_in(&tmp).map_err(scratch)?;
    crate::select::pack(&src, &items, None, &mut file)?;
    use std::io::Seek as _;
    file.rewind().map_err(scratch)?;
    let layer = strata_oci::store_layer(
        node.content.as_ref(),
        file,
        &dir.display().to_string(),
        None,
    )
    .map_err(|e| ContextImageError::Store(Box::new(e)))?;
    let mut config = ImageConfig::scratch(
        &platform.os,
        &platform.architecture,
        platform.variant.as_deref(),
    );
    config.rootfs.diff_ids = vec![layer.diff_id.to_string()];
    node.images
        .create(&config, &[layer])
        .map_err(|e| ContextImageError::Store(Box::new(e)))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_and_kinds_as_buildx_takes_them() {
        assert_eq!(
            parse_named_context("alpine=docker-image://alpine:3.19").unwrap(),
            ("alpine".into(), NamedContext::Image("alpine:3.19".into()))
        );
        assert_eq!(
            parse_named_context("base=oci-layout:///tmp/layout").unwrap(),
            ("base".into(), NamedContext::Layout("/tmp/layout".into()))
        );
        assert_eq!(
            parse_named_context("docs=../docs").unwrap(),
            ("docs".into(), NamedContext::Dir("../docs".into()))
        );
        for (bad, says) in [
            ("docs", "expected NAME=VALUE"),
            ("Docs=.", "not a context name"),
            ("x=docker-image://UPPER", ""),
            ("x=https://example.com/repo.git", "URL context"),
            ("x=target:build", "bake"),
            ("x=oci-layout:///l@sha256:00", "by digest"),
            ("x=", "no value"),
        ] {
            let err = parse_named_context(bad).unwrap_err().to_string();
            assert!(err.contains(says), "{bad}: {err}");
        }
    }
}
