//! The images a cluster names: tags in the group's replicated state,
//! each pointing at an image config and its layers, as `strata cluster
//! images`, `--push` from the cluster and the image endpoint read them.

use std::collections::HashSet;
use std::sync::{Arc, Mutex, PoisonError};

use strata_cas::Digest;
use strata_oci::LayerRef;
use strata_raft::Member;

use crate::error::ImageError;

/// `name`, as a user writes an image's name, parsed.
pub(crate) fn reference(name: &str) -> Result<strata_oci::Reference, ImageError> {
    name.parse().map_err(|source| ImageError::BadName {
        name: name.to_string(),
        source,
    })
}

/// The names in the group's state, through this coordinator's member.
pub(crate) struct Names {
    member: Arc<Member>,
    /// The layers of the images the cluster names, as of an applied
    /// index of the group's log.
    cache: Mutex<Option<(u64, Arc<HashSet<Digest>>)>>,
}

impl Names {
    pub(crate) fn new(member: Arc<Member>) -> Names {
        Names {
            member,
            cache: Mutex::default(),
        }
    }

    /// The names and images as the image endpoint looks them up.
    pub(crate) fn catalog(&self) -> Result<crate::distribution::Catalog, ImageError> {
        Ok(crate::distribution::Catalog::new(self.named()?))
    }

    /// Every name the cluster serves (normalized) and its image.
    pub(crate) fn named(&self) -> Result<Vec<(String, strata_raft::ClusterImage)>, ImageError> {
        self.member
            .local()
            .tags()
            .map_err(|e| ImageError::Index(e.into()))
    }

    /// The image the cluster names `name` (as a user writes it), and the
    /// name normalized; an error when it names none.
    pub(crate) fn named_image(
        &self,
        name: &str,
    ) -> Result<(String, strata_raft::ClusterImage), ImageError> {
        let full = reference(name)?.normalized();
        let image = self
            .member
            .local()
            .tag(&full)
            .map_err(|e| ImageError::Index(e.into()))?
            .ok_or_else(|| ImageError::NoSuchImage(name.to_string()))?;
        Ok((full, image))
    }

    /// The images the cluster names, by name.
    pub(crate) fn named_images(&self) -> Result<Vec<crate::protocol::NamedImage>, ImageError> {
        let tags = self.named()?;
        Ok(tags
            .into_iter()
            .map(|(name, image)| crate::protocol::NamedImage {
                name: name
                    .parse::<strata_oci::Reference>()
                    .map_or(name, |r| r.familiar()),
                id: strata_cas::Sha256::of(&image.config).to_string(),
                digest: strata_oci::image_manifest(&image.config, &image.layers).map_or_else(
                    |_| String::new(),
                    |m| strata_cas::Sha256::of(&m).to_string(),
                ),
                size: image.layers.iter().map(|l| l.size).sum(),
                tagged: image.tagged,
            })
            .collect())
    }

    /// Drops the image name `name` (a tag, as a user writes it).
    pub(crate) async fn untag(&self, name: &str) -> Result<(), ImageError> {
        let (full, _) = self.named_image(name)?;
        self.member
            .write(strata_raft::CommandV2::Untag { name: full })
            .await
            .map(drop)
            .map_err(|e| ImageError::Index(e.into()))
    }

    /// The layers of every image the cluster names. Read again from the
    /// group's state only when it applied an entry since the last read:
    /// every worker asks before it evicts.
    pub(crate) fn named_layers(&self) -> Result<Arc<HashSet<Digest>>, ImageError> {
        // The index is read first: an entry applied meanwhile makes the
        // next call read again.
        let applied = self
            .member
            .raft()
            .metrics()
            .borrow()
            .last_applied
            .map_or(0, |l| l.index);
        if let Some((at, layers)) = self
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .as_ref()
            && *at == applied
        {
            return Ok(Arc::clone(layers));
        }
        let layers: Arc<HashSet<Digest>> = Arc::new(
            self.named()?
                .iter()
                .flat_map(|(_, image)| image.layers.iter().map(|l| l.blob))
                .collect(),
        );
        *self.cache.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((applied, Arc::clone(&layers)));
        Ok(layers)
    }

    /// Points each of `tags` at the image of `config_json` and `layers` in
    /// the group's state, where `strata cluster images` and the registry
    /// endpoint find it. Returns the names, normalized.
    pub(crate) async fn name_image(
        &self,
        tags: &[String],
        config_json: &[u8],
        layers: &[LayerRef],
    ) -> Result<Vec<String>, ImageError> {
        let mut named = Vec::with_capacity(tags.len());
        for tag in tags {
            let name = reference(tag)?.normalized();
            let image = strata_raft::ClusterImage {
                config: config_json.to_vec(),
                layers: layers.to_vec(),
                tagged: strata_cas::now_unix(),
            };
            self.member
                .write(strata_raft::CommandV2::Tag {
                    name: name.clone(),
                    image,
                })
                .await
                .map_err(|source| ImageError::Name {
                    name: tag.clone(),
                    source,
                })?;
            named.push(name);
        }
        Ok(named)
    }
}
