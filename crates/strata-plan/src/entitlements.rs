//! Entitlements: what a step may ask for beyond the default sandbox, as
//! BuildKit names them. A build gets one only when the client asks for it
//! (`--allow`) and the node that runs it grants it in its configuration;
//! both default to nothing.

use std::collections::BTreeSet;
use std::fmt;

use serde::{Deserialize, Serialize};

use crate::{Op, Plan};

/// One thing a step may be granted beyond the default sandbox.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Entitlement {
    /// `RUN --network=host`: the host's network namespace.
    #[serde(rename = "network.host")]
    NetworkHost,
    /// `RUN --security=insecure`: every capability, nothing masked.
    #[serde(rename = "security.insecure")]
    SecurityInsecure,
}

impl Entitlement {
    /// Every entitlement.
    pub const ALL: [Entitlement; 2] = [Entitlement::NetworkHost, Entitlement::SecurityInsecure];

    /// BuildKit's name for it (`network.host`).
    pub fn name(self) -> &'static str {
        match self {
            Entitlement::NetworkHost => "network.host",
            Entitlement::SecurityInsecure => "security.insecure",
        }
    }

    /// The `RUN` flag that asks for it.
    pub fn flag(self) -> &'static str {
        match self {
            Entitlement::NetworkHost => "--network=host",
            Entitlement::SecurityInsecure => "--security=insecure",
        }
    }
}

impl fmt::Display for Entitlement {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Entitlement {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        Entitlement::ALL
            .into_iter()
            .find(|e| e.name() == s)
            .ok_or_else(|| {
                format!(
                    "unknown entitlement {s:?}: strata knows {}",
                    Entitlement::ALL.map(Entitlement::name).join(" and ")
                )
            })
    }
}

/// A set of entitlements.
pub type Entitlements = BTreeSet<Entitlement>;

/// Why a build may not have an entitlement.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum EntitlementError {
    /// A step needs it and the client did not ask for it.
    #[error(
        "{file}:{line}: {label}: {flag} needs the entitlement {entitlement}: pass `--allow {entitlement}` to strata build"
    )]
    NotAllowed {
        /// The Dockerfile.
        file: String,
        /// The step's line.
        line: usize,
        /// The step's instruction.
        label: String,
        /// The flag that asks for it.
        flag: &'static str,
        /// What it needs.
        entitlement: Entitlement,
    },
    /// The client asked for it and the node does not grant it.
    #[error("granting the entitlement {entitlement} is not allowed by {node}: {setting} grants it")]
    NotGranted {
        /// What was asked for.
        entitlement: Entitlement,
        /// Which node refused (`this machine`, `worker worker-1`).
        node: String,
        /// The setting that would grant it there.
        setting: String,
    },
}

impl Op {
    /// The entitlements this step needs.
    pub fn entitlements(&self) -> Entitlements {
        let mut out = Entitlements::new();
        if let Op::Exec(e) = self {
            if e.host_network {
                out.insert(Entitlement::NetworkHost);
            }
            if e.insecure {
                out.insert(Entitlement::SecurityInsecure);
            }
        }
        out
    }
}

impl Plan {
    /// The entitlements the steps of stage `i` need.
    pub fn stage_entitlements(&self, i: usize) -> Entitlements {
        self.stages
            .get(i)
            .into_iter()
            .flat_map(|s| &s.steps)
            .flat_map(|s| s.op.entitlements())
            .collect()
    }

    /// An error naming the first step that needs an entitlement the
    /// client did not ask for (`allowed`); `file` names the Dockerfile.
    pub fn check_entitlements(
        &self,
        file: &str,
        allowed: &Entitlements,
    ) -> Result<(), EntitlementError> {
        for stage in &self.stages {
            for step in &stage.steps {
                if let Some(&missing) = step.op.entitlements().difference(allowed).next() {
                    return Err(EntitlementError::NotAllowed {
                        file: file.to_string(),
                        line: step.line,
                        label: step.label.clone(),
                        flag: missing.flag(),
                        entitlement: missing,
                    });
                }
            }
        }
        Ok(())
    }
}

/// What a node grants: the entitlements its configuration allows, and
/// how to tell a user where that is set.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Grants {
    /// The entitlements granted.
    pub granted: Entitlements,
    /// The node, as errors name it (`this machine`, `worker worker-1`).
    pub node: String,
    /// The setting that grants one, `{}` standing for its name
    /// (`insecure_entitlements = ["{}"] in worker.toml`).
    pub setting: String,
}

impl Grants {
    /// An error unless every one of `wanted` is granted. A build asking
    /// (`--allow`) for one its node does not grant is refused whether or
    /// not a step uses it, as BuildKit refuses it; a step is refused the
    /// same way before it runs.
    pub fn check(&self, wanted: &Entitlements) -> Result<(), EntitlementError> {
        match wanted.difference(&self.granted).next() {
            Some(&entitlement) => Err(EntitlementError::NotGranted {
                entitlement,
                node: self.node.clone(),
                setting: self.setting.replace("{}", entitlement.name()),
            }),
            None => Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_ones_are_refused() {
        for e in Entitlement::ALL {
            assert_eq!(e.name().parse::<Entitlement>(), Ok(e));
        }
        let err = "network.hots".parse::<Entitlement>().unwrap_err();
        assert!(err.contains("network.host and security.insecure"), "{err}");
    }

    #[test]
    fn an_allow_the_node_does_not_grant_is_refused() {
        let allowed: Entitlements = [Entitlement::SecurityInsecure].into();
        let mut grants = Grants {
            granted: Entitlements::new(),
            node: "worker w1".into(),
            setting: "insecure_entitlements = [\"{}\"] in worker.toml".into(),
        };
        let e = grants.check(&allowed).unwrap_err();
        assert_eq!(
            e.to_string(),
            "granting the entitlement security.insecure is not allowed by worker w1: \
             insecure_entitlements = [\"security.insecure\"] in worker.toml grants it"
        );
        assert!(grants.check(&Entitlements::new()).is_ok());
        grants.granted = allowed.clone();
        assert!(grants.check(&allowed).is_ok());
    }
}
