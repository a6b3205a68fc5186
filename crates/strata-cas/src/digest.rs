//! Digests: blake3 names every blob inside strata; sha256 is what OCI
//! images and registries speak.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

/// The blake3 hash of a blob: its name in the store.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Digest(pub [u8; 32]);

/// A sha256 hash, as OCI digests (`sha256:<hex>`) carry it.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Sha256(pub [u8; 32]);

/// A string that is not a digest of the expected form.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid {algorithm} digest {text:?}: expected {algorithm}:<64 hex digits>")]
pub struct ParseDigestError {
    algorithm: &'static str,
    text: String,
}

fn hex(bytes: &[u8; 32]) -> String {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut s = String::with_capacity(64);
    for b in bytes {
        s.push(HEX[(b >> 4) as usize] as char);
        s.push(HEX[(b & 15) as usize] as char);
    }
    s
}

fn parse_hex(s: &str) -> Option<[u8; 32]> {
    if s.len() != 64 {
        return None;
    }
    let mut out = [0u8; 32];
    for (i, pair) in s.as_bytes().chunks(2).enumerate() {
        let nib = |c: u8| match c {
            b'0'..=b'9' => Some(c - b'0'),
            b'a'..=b'f' => Some(c - b'a' + 10),
            _ => None,
        };
        out[i] = nib(pair[0])? << 4 | nib(pair[1])?;
    }
    Some(out)
}

macro_rules! digest_type {
    ($t:ident, $alg:literal) => {
        impl $t {
            /// The 64 lower-case hex digits.
            pub fn hex(&self) -> String {
                hex(&self.0)
            }

            /// Parses the bare 64 hex digits.
            pub fn from_hex(s: &str) -> Result<Self, ParseDigestError> {
                parse_hex(s).map($t).ok_or_else(|| ParseDigestError {
                    algorithm: $alg,
                    text: s.to_string(),
                })
            }
        }

        impl fmt::Display for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                write!(f, concat!($alg, ":{}"), self.hex())
            }
        }

        impl fmt::Debug for $t {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                fmt::Display::fmt(self, f)
            }
        }

        impl FromStr for $t {
            type Err = ParseDigestError;

            /// Parses `<alg>:<hex>`.
            fn from_str(s: &str) -> Result<Self, Self::Err> {
                s.strip_prefix(concat!($alg, ":"))
                    .and_then(parse_hex)
                    .map($t)
                    .ok_or_else(|| ParseDigestError {
                        algorithm: $alg,
                        text: s.to_string(),
                    })
            }
        }
    };
}

digest_type!(Digest, "blake3");
digest_type!(Sha256, "sha256");

impl Digest {
    /// The blake3 digest of `data`.
    pub fn of(data: &[u8]) -> Digest {
        Digest(*blake3::hash(data).as_bytes())
    }
}

impl Sha256 {
    /// The sha256 digest of `data`.
    pub fn of(data: &[u8]) -> Sha256 {
        use sha2::Digest as _;
        Sha256(sha2::Sha256::digest(data).into())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let d = Digest::of(b"hello");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert_eq!(Digest::from_hex(&d.hex()).unwrap(), d);
        let s = Sha256::of(b"");
        assert_eq!(
            s.to_string(),
            "sha256:e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
        );
        assert!("sha256:xyz".parse::<Sha256>().is_err());
        assert!(s.to_string().parse::<Digest>().is_err());
    }
}
