//! Platforms (`linux/amd64`, `linux/arm64/v8`) and the build arguments
//! BuildKit predefines from them.

use std::fmt;

use crate::shell::EnvList;

/// An OS, architecture and optional variant, as in OCI image indexes.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Platform {
    /// `linux`, `windows`, …
    pub os: String,
    /// In Go's (and OCI's) naming: `amd64`, `arm64`, `arm`, `386`, …
    pub architecture: String,
    /// `v7`, `v8`, … when the architecture has variants.
    pub variant: Option<String>,
}

impl Platform {
    /// The platform this process runs on.
    pub fn host() -> Platform {
        let architecture = match std::env::consts::ARCH {
            "x86_64" => "amd64",
            "x86" => "386",
            "aarch64" => "arm64",
            "powerpc64" => "ppc64le",
            "loongarch64" => "loong64",
            other => other,
        };
        Platform {
            os: std::env::consts::OS.to_string(),
            architecture: architecture.to_string(),
            variant: None,
        }
    }

    /// Parses `os/arch[/variant]`, normalizing the common aliases
    /// (`x86_64`, `aarch64`) as containerd does.
    pub fn parse(s: &str) -> Result<Platform, String> {
        let parts: Vec<&str> = s.split('/').collect();
        let bad = || {
            format!(
                "invalid platform {}: expected os/arch[/variant]",
                crate::go_quote(s)
            )
        };
        let (os, arch, variant) = match parts.as_slice() {
            [os, arch] => (*os, *arch, None),
            [os, arch, variant] => (*os, *arch, Some(*variant)),
            _ => return Err(bad()),
        };
        if os.is_empty() || arch.is_empty() || variant.is_some_and(str::is_empty) {
            return Err(bad());
        }
        let os = os.to_lowercase();
        let (architecture, variant) = match (arch.to_lowercase().as_str(), variant) {
            ("x86_64" | "x86-64" | "amd64", v) => ("amd64".to_string(), v.map(str::to_string)),
            ("aarch64" | "arm64", Some("v8") | None) => ("arm64".to_string(), None),
            ("aarch64" | "arm64", v) => ("arm64".to_string(), v.map(str::to_string)),
            ("armhf", _) => ("arm".to_string(), Some("v7".to_string())),
            ("armel", _) => ("arm".to_string(), Some("v6".to_string())),
            ("arm", None) => ("arm".to_string(), Some("v7".to_string())),
            ("i386" | "386", v) => ("386".to_string(), v.map(str::to_string)),
            (a, v) => (a.to_string(), v.map(str::to_string)),
        };
        if !KNOWN_OS.contains(&os.as_str()) || !KNOWN_ARCH.contains(&architecture.as_str()) {
            return Err(format!(
                "invalid platform {}: unknown operating system or architecture",
                crate::go_quote(s)
            ));
        }
        Ok(Platform {
            os,
            architecture,
            variant,
        })
    }
}

/// The operating systems and architectures Go (and so OCI) names.
const KNOWN_OS: &[&str] = &[
    "aix",
    "android",
    "darwin",
    "dragonfly",
    "freebsd",
    "illumos",
    "ios",
    "js",
    "linux",
    "netbsd",
    "openbsd",
    "plan9",
    "solaris",
    "wasip1",
    "windows",
];
const KNOWN_ARCH: &[&str] = &[
    "386", "amd64", "arm", "arm64", "loong64", "mips", "mips64", "mips64le", "mipsle", "ppc64",
    "ppc64le", "riscv64", "s390x", "wasm",
];

impl Platform {
    /// Whether an image config's platform is this one (a config without a
    /// variant matches any variant of its architecture, as containerd's
    /// matcher lets it).
    pub fn matches(&self, os: &str, architecture: &str, variant: Option<&str>) -> bool {
        self.os == os
            && self.architecture == architecture
            && (variant.is_none() || self.variant.is_none() || self.variant.as_deref() == variant)
    }
}

impl fmt::Display for Platform {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.os, self.architecture)?;
        if let Some(v) = &self.variant {
            write!(f, "/{v}")?;
        }
        Ok(())
    }
}

/// The arguments every Dockerfile may declare without a default:
/// `BUILDPLATFORM`, `TARGETARCH`, `TARGETSTAGE` and the rest.
pub fn predefined_args(build: &Platform, target: &Platform, target_stage: Option<&str>) -> EnvList {
    let mut env = EnvList::new();
    let variant = |p: &Platform| p.variant.clone().unwrap_or_default();
    for (k, v) in [
        ("BUILDPLATFORM", build.to_string()),
        ("BUILDOS", build.os.clone()),
        ("BUILDOSVERSION", String::new()),
        ("BUILDARCH", build.architecture.clone()),
        ("BUILDVARIANT", variant(build)),
        ("TARGETPLATFORM", target.to_string()),
        ("TARGETOS", target.os.clone()),
        ("TARGETOSVERSION", String::new()),
        ("TARGETARCH", target.architecture.clone()),
        ("TARGETVARIANT", variant(target)),
        ("TARGETSTAGE", target_stage.unwrap_or("default").to_string()),
    ] {
        env.set(k, &v);
    }
    env
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Env;

    #[test]
    fn parse_and_normalize() {
        let p = Platform::parse("linux/x86_64").unwrap();
        assert_eq!(p.to_string(), "linux/amd64");
        assert_eq!(
            Platform::parse("linux/arm64/v8").unwrap().to_string(),
            "linux/arm64"
        );
        assert_eq!(
            Platform::parse("linux/arm").unwrap().to_string(),
            "linux/arm/v7"
        );
        assert!(Platform::parse("linux").is_err());
        assert!(Platform::parse("linux//").is_err());
        let unknown = Platform::parse("foo/bar").unwrap_err();
        assert!(
            unknown.contains("unknown operating system or architecture"),
            "{unknown}"
        );
        assert!(Platform::parse("linux/amd64,linux/arm64").is_err());
    }

    #[test]
    fn predefined() {
        let host = Platform::parse("linux/amd64").unwrap();
        let env = predefined_args(&host, &host, Some("builder"));
        assert_eq!(env.get("TARGETARCH"), Some("amd64"));
        assert_eq!(env.get("BUILDPLATFORM"), Some("linux/amd64"));
        assert_eq!(env.get("TARGETSTAGE"), Some("builder"));
    }
}
