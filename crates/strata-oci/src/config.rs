//! The image configuration, in the form Docker and BuildKit write it.
//!
//! oci-spec's `ImageConfiguration` follows the OCI spec only and drops
//! Docker's extensions (`Healthcheck`, `OnBuild`, `Shell`), which base
//! images carry and Dockerfiles set, so this type is the superset.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

/// The `PATH` BuildKit gives images that set none.
pub const DEFAULT_PATH: &str = "PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

/// An image config blob.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct ImageConfig {
    /// Creation time, RFC 3339.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// `MAINTAINER`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// CPU architecture (`amd64`).
    #[serde(default)]
    pub architecture: String,
    /// Architecture variant (`v8`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub variant: Option<String>,
    /// Operating system (`linux`).
    #[serde(default)]
    pub os: String,
    /// OS version, for Windows.
    #[serde(
        rename = "os.version",
        default,
        skip_serializing_if = "Option::is_none"
    )]
    pub os_version: Option<String>,
    /// How containers run by default.
    #[serde(default)]
    pub config: ContainerConfig,
    /// The layers, by uncompressed digest.
    #[serde(default)]
    pub rootfs: RootFs,
    /// One entry per instruction.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub history: Vec<History>,
}

/// The defaults for containers started from the image.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct ContainerConfig {
    /// `USER`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub user: String,
    /// `EXPOSE`, as `port/proto` keys.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub exposed_ports: BTreeMap<String, Empty>,
    /// `ENV`, as `KEY=value`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub env: Vec<String>,
    /// `ENTRYPOINT`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub entrypoint: Option<Vec<String>>,
    /// `CMD`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cmd: Option<Vec<String>>,
    /// `VOLUME`.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub volumes: BTreeMap<String, Empty>,
    /// `WORKDIR`.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub working_dir: String,
    /// `LABEL`.
    #[serde(
        default,
        skip_serializing_if = "BTreeMap::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub labels: BTreeMap<String, String>,
    /// `STOPSIGNAL`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stop_signal: Option<String>,
    /// Whether `Cmd`/`Entrypoint` are already escaped (Windows).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub args_escaped: bool,
    /// `HEALTHCHECK`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub healthcheck: Option<HealthConfig>,
    /// `ONBUILD` triggers, as source text. Written as `null` when there
    /// are none, as BuildKit writes it.
    #[serde(
        default,
        deserialize_with = "null_as_default",
        serialize_with = "empty_as_null"
    )]
    pub on_build: Vec<String>,
    /// `SHELL`.
    #[serde(
        default,
        skip_serializing_if = "Vec::is_empty",
        deserialize_with = "null_as_default"
    )]
    pub shell: Vec<String>,
}

/// Serializes as `{}`: the value of port and volume maps.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Empty {}

/// Docker's health check settings; durations in nanoseconds.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "PascalCase")]
pub struct HealthConfig {
    /// `["NONE"]`, `["CMD", args…]` or `["CMD-SHELL", command]`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub test: Vec<String>,
    /// Between checks.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub interval: i64,
    /// Before a check is considered hung.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub timeout: i64,
    /// Grace period after start.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_period: i64,
    /// Between checks during the start period.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub start_interval: i64,
    /// Failures before unhealthy.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub retries: i64,
}

fn is_zero(v: &i64) -> bool {
    *v == 0
}

/// The layers of the image.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RootFs {
    /// Always `layers`.
    #[serde(rename = "type")]
    pub kind: String,
    /// sha256 of each uncompressed layer tar, bottom first.
    #[serde(default, deserialize_with = "null_as_default")]
    pub diff_ids: Vec<String>,
}

impl Default for RootFs {
    fn default() -> Self {
        RootFs {
            kind: "layers".into(),
            diff_ids: Vec::new(),
        }
    }
}

/// One step of the image's history.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct History {
    /// When it was made.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created: Option<String>,
    /// The instruction.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub created_by: Option<String>,
    /// Who made it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub author: Option<String>,
    /// Free text (BuildKit writes `buildkit.dockerfile.v0`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub comment: Option<String>,
    /// True when the step added no layer.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub empty_layer: bool,
}

fn empty_as_null<S: serde::Serializer>(v: &[String], s: S) -> Result<S::Ok, S::Error> {
    if v.is_empty() {
        s.serialize_none()
    } else {
        s.collect_seq(v)
    }
}

fn null_as_default<'de, D, T>(d: D) -> Result<T, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Default + Deserialize<'de>,
{
    Ok(Option::<T>::deserialize(d)?.unwrap_or_default())
}

impl ImageConfig {
    /// The config of an empty image for `os`/`architecture`, as BuildKit
    /// starts `FROM scratch`: default `PATH`, working directory `/`.
    pub fn scratch(os: &str, architecture: &str, variant: Option<&str>) -> ImageConfig {
        ImageConfig {
            architecture: architecture.to_string(),
            os: os.to_string(),
            variant: variant.map(str::to_string),
            config: ContainerConfig {
                env: vec![DEFAULT_PATH.to_string()],
                working_dir: "/".to_string(),
                ..Default::default()
            },
            ..Default::default()
        }
    }

    /// Canonical JSON bytes: the blob that names this config.
    pub fn to_json(&self) -> Vec<u8> {
        // Serializing plain data with string keys cannot fail.
        serde_json::to_vec(self).unwrap_or_default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_docker_configs_with_nulls_and_extensions() {
        let raw = r#"{"architecture":"amd64","os":"linux","config":{"Env":null,"Cmd":["sh"],
            "Healthcheck":{"Test":["CMD","true"],"Interval":5000000000},"OnBuild":null,
            "ExposedPorts":{"80/tcp":{}},"Shell":["/bin/bash","-c"]},
            "rootfs":{"type":"layers","diff_ids":["sha256:aa"]},"container_config":{"Hostname":"x"}}"#;
        let c: ImageConfig = serde_json::from_str(raw).unwrap();
        assert!(c.config.env.is_empty());
        assert_eq!(c.config.cmd.as_deref(), Some(&["sh".to_string()][..]));
        assert_eq!(
            c.config.healthcheck.as_ref().unwrap().interval,
            5_000_000_000
        );
        assert!(c.config.exposed_ports.contains_key("80/tcp"));
        assert_eq!(c.config.shell, ["/bin/bash", "-c"]);
        let back = String::from_utf8(c.to_json()).unwrap();
        assert!(back.contains(r#""ExposedPorts":{"80/tcp":{}}"#), "{back}");
        assert!(back.contains(r#""OnBuild":null"#), "{back}");
    }

    #[test]
    fn scratch_has_buildkit_defaults() {
        let c = ImageConfig::scratch("linux", "amd64", None);
        assert_eq!(c.config.env, [DEFAULT_PATH]);
        assert_eq!(c.config.working_dir, "/");
        assert_eq!(c.rootfs.kind, "layers");
    }
}
