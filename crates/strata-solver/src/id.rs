//! Build ids: what names one build in a client's output, every node's log
//! lines and the build's history record.

use std::sync::atomic::{AtomicU64, Ordering};

/// How long an id is: 20 base-36 characters, about 103 bits.
const LEN: usize = 20;

/// The longest id a node accepts from a client.
pub const MAX_BUILD_ID: usize = 64;

/// A new build's id: 20 characters of `[0-9a-z]`, from the time, this
/// process and a counter, hashed: unique across nodes in practice.
pub fn new_build_id() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut seed = Vec::with_capacity(40);
    seed.extend_from_slice(&nanos.to_le_bytes());
    seed.extend_from_slice(&std::process::id().to_le_bytes());
    seed.extend_from_slice(&COUNTER.fetch_add(1, Ordering::Relaxed).to_le_bytes());
    let hash = strata_cas::Digest::of(&seed);
    let mut n = u128::from_le_bytes(hash.0[..16].try_into().unwrap_or([0; 16]));
    let digits = b"0123456789abcdefghijklmnopqrstuvwxyz";
    let mut id = String::with_capacity(LEN);
    for _ in 0..LEN {
        id.push(char::from(digits[(n % 36) as usize]));
        n /= 36;
    }
    id
}

/// Whether `id` is one a node takes from a client: 1 to
/// [`MAX_BUILD_ID`] characters of `[0-9a-z-]`, so that it is safe in a
/// log line, a file name and a URL.
pub fn valid_build_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= MAX_BUILD_ID
        && id
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_new_each_time_and_valid() {
        let a = new_build_id();
        let b = new_build_id();
        assert_ne!(a, b);
        assert_eq!(a.len(), LEN);
        assert!(valid_build_id(&a), "{a}");
    }

    #[test]
    fn ids_from_clients_are_checked() {
        assert!(valid_build_id("ci-1234"));
        assert!(!valid_build_id(""));
        assert!(!valid_build_id("../etc"));
        assert!(!valid_build_id("a\nforged log line"));
        assert!(!valid_build_id(&"a".repeat(MAX_BUILD_ID + 1)));
    }
}
