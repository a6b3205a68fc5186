//! What `strata build` flags give every `RUN` step of a build, as
//! `docker buildx build` does: `--network`, `--add-host`, `--shm-size` and
//! `--ulimit`. They change what a step can see and do, so they are part of
//! its op (and its cache key), as in BuildKit's exec op.

use std::net::IpAddr;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// `--network`: the network a `RUN` without its own `--network` gets.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    /// A network namespace of its own, outbound through NAT.
    #[default]
    Default,
    /// Only loopback.
    None,
    /// The host's network: needs the `network.host` entitlement.
    Host,
}

impl FromStr for NetworkMode {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "" | "default" => Ok(NetworkMode::Default),
            "none" => Ok(NetworkMode::None),
            "host" => Ok(NetworkMode::Host),
            other => Err(format!(
                "network mode {other:?} is not supported: use default, none or host"
            )),
        }
    }
}

/// `--add-host NAME:IP`: a line of every step's `/etc/hosts`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ExtraHost {
    /// The host name.
    pub name: String,
    /// Its address, as given (validated).
    pub ip: String,
}

impl FromStr for ExtraHost {
    type Err = String;

    /// `NAME:IP` or `NAME=IP`, as Docker takes them (`=` first, since an
    /// IPv6 address has colons).
    fn from_str(s: &str) -> Result<Self, String> {
        let (name, ip) = s
            .split_once('=')
            .or_else(|| s.split_once(':'))
            .ok_or_else(|| format!("--add-host {s:?}: expected NAME:IP"))?;
        let valid_name = !name.is_empty()
            && name.len() <= 253
            && name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '.' | '_'));
        if !valid_name {
            return Err(format!("--add-host {s:?}: {name:?} is not a host name"));
        }
        if ip == "host-gateway" {
            return Err(format!(
                "--add-host {s:?}: host-gateway is not supported: give the address"
            ));
        }
        let ip = ip.trim_start_matches('[').trim_end_matches(']');
        let parsed: IpAddr = ip
            .parse()
            .map_err(|_| format!("--add-host {s:?}: {ip:?} is not an IP address"))?;
        Ok(ExtraHost {
            name: name.to_string(),
            ip: parsed.to_string(),
        })
    }
}

/// The resource limits `--ulimit` may set, with their names in the OCI
/// runtime spec.
const RLIMITS: &[(&str, &str)] = &[
    ("as", "RLIMIT_AS"),
    ("core", "RLIMIT_CORE"),
    ("cpu", "RLIMIT_CPU"),
    ("data", "RLIMIT_DATA"),
    ("fsize", "RLIMIT_FSIZE"),
    ("locks", "RLIMIT_LOCKS"),
    ("memlock", "RLIMIT_MEMLOCK"),
    ("msgqueue", "RLIMIT_MSGQUEUE"),
    ("nice", "RLIMIT_NICE"),
    ("nofile", "RLIMIT_NOFILE"),
    ("nproc", "RLIMIT_NPROC"),
    ("rss", "RLIMIT_RSS"),
    ("rtprio", "RLIMIT_RTPRIO"),
    ("rttime", "RLIMIT_RTTIME"),
    ("sigpending", "RLIMIT_SIGPENDING"),
    ("stack", "RLIMIT_STACK"),
];

/// `--ulimit NAME=SOFT[:HARD]`; `-1` is unlimited.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Ulimit {
    /// Docker's name (`nofile`).
    pub name: String,
    /// Soft limit.
    pub soft: u64,
    /// Hard limit.
    pub hard: u64,
}

impl Ulimit {
    /// The limit's name in the runtime spec (`RLIMIT_NOFILE`).
    pub fn rlimit(&self) -> &'static str {
        RLIMITS
            .iter()
            .find(|(n, _)| *n == self.name)
            .map_or("RLIMIT_NOFILE", |(_, r)| r)
    }
}

impl FromStr for Ulimit {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let (name, limits) = s
            .split_once('=')
            .ok_or_else(|| format!("--ulimit {s:?}: expected NAME=SOFT[:HARD]"))?;
        if !RLIMITS.iter().any(|(n, _)| *n == name) {
            let known: Vec<&str> = RLIMITS.iter().map(|(n, _)| *n).collect();
            return Err(format!(
                "--ulimit {s:?}: unknown limit {name:?} (one of {})",
                known.join(", ")
            ));
        }
        let value = |v: &str| -> Result<u64, String> {
            match v.parse::<i64>() {
                Ok(-1) => Ok(u64::MAX),
                Ok(n) if n >= 0 => Ok(n as u64),
                _ => Err(format!("--ulimit {s:?}: {v:?} is not a limit")),
            }
        };
        let (soft, hard) = match limits.split_once(':') {
            Some((soft, hard)) => (value(soft)?, value(hard)?),
            None => {
                let v = value(limits)?;
                (v, v)
            }
        };
        if soft > hard {
            return Err(format!(
                "--ulimit {s:?}: the soft limit is above the hard limit"
            ));
        }
        Ok(Ulimit {
            name: name.to_string(),
            soft,
            hard,
        })
    }
}

/// `--shm-size`: bytes, with Docker's binary units (`64m` is 64 MiB).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct ShmSize(pub u64);

impl FromStr for ShmSize {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, String> {
        let t = s.trim();
        let split = t.find(|c: char| !c.is_ascii_digit()).unwrap_or(t.len());
        let (num, unit) = t.split_at(split);
        let n: u64 = num
            .parse()
            .map_err(|_| format!("--shm-size {s:?}: expected a size such as 64m"))?;
        let shift = match unit.to_ascii_lowercase().trim_end_matches('b') {
            "" => 0,
            "k" | "ki" => 10,
            "m" | "mi" => 20,
            "g" | "gi" => 30,
            "t" | "ti" => 40,
            _ => return Err(format!("--shm-size {s:?}: unknown unit {unit:?}")),
        };
        let bytes = n
            .checked_mul(1u64 << shift)
            .filter(|b| *b > 0)
            .ok_or_else(|| format!("--shm-size {s:?}: out of range"))?;
        Ok(ShmSize(bytes))
    }
}

/// What every `RUN` of a build gets from the build's flags.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunSettings {
    /// `--network`.
    pub network: NetworkMode,
    /// `--add-host`s.
    pub extra_hosts: Vec<ExtraHost>,
    /// `--shm-size`: of `/dev/shm`, bytes (default: 64 MiB).
    pub shm_size: Option<u64>,
    /// `--ulimit`s.
    pub ulimits: Vec<Ulimit>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_host_takes_both_separators_and_ipv6() {
        let h: ExtraHost = "db:10.0.0.5".parse().unwrap();
        assert_eq!((h.name.as_str(), h.ip.as_str()), ("db", "10.0.0.5"));
        let h: ExtraHost = "v6=::1".parse().unwrap();
        assert_eq!(h.ip, "::1");
        let h: ExtraHost = "v6:[fe80::1]".parse().unwrap();
        assert_eq!(h.ip, "fe80::1");
        assert!("db".parse::<ExtraHost>().is_err());
        assert!("db:not-an-ip".parse::<ExtraHost>().is_err());
        assert!("bad name:1.2.3.4".parse::<ExtraHost>().is_err());
        assert!(
            "gw:host-gateway"
                .parse::<ExtraHost>()
                .unwrap_err()
                .contains("host-gateway")
        );
    }

    #[test]
    fn ulimits_as_docker_spells_them() {
        let u: Ulimit = "nofile=1024:2048".parse().unwrap();
        assert_eq!((u.soft, u.hard, u.rlimit()), (1024, 2048, "RLIMIT_NOFILE"));
        let u: Ulimit = "core=-1".parse().unwrap();
        assert_eq!((u.soft, u.hard), (u64::MAX, u64::MAX));
        assert!("nofile=2048:1024".parse::<Ulimit>().is_err());
        assert!("files=1".parse::<Ulimit>().unwrap_err().contains("nofile"));
        assert!("nofile=x".parse::<Ulimit>().is_err());
    }

    #[test]
    fn shm_size_units_are_binary() {
        assert_eq!("64m".parse::<ShmSize>().unwrap().0, 64 << 20);
        assert_eq!("1g".parse::<ShmSize>().unwrap().0, 1 << 30);
        assert_eq!("2GB".parse::<ShmSize>().unwrap().0, 2 << 30);
        assert_eq!("4096".parse::<ShmSize>().unwrap().0, 4096);
        assert!("0".parse::<ShmSize>().is_err());
        assert!("1x".parse::<ShmSize>().is_err());
        assert!("99999999999t".parse::<ShmSize>().is_err());
    }

    #[test]
    fn network_modes() {
        assert_eq!("host".parse::<NetworkMode>().unwrap(), NetworkMode::Host);
        assert!(
            "bridge"
                .parse::<NetworkMode>()
                .unwrap_err()
                .contains("default, none or host")
        );
    }
}
