//! What a client may do beyond building: read the blobs of its own
//! builds ([`ReadRights`]) and upload so many bytes an hour
//! ([`UploadQuota`]). Both are plain state with the time passed in; the
//! nodes keep one of each behind a lock.

use std::collections::{HashMap, VecDeque};
use std::time::{Duration, Instant};

use strata_cas::Digest;

/// How long a client may read a blob of one of its builds after the
/// build ends: long enough to fetch the image, to retry, and to push it.
pub const READ_FOR: Duration = Duration::from_secs(3600);

/// Grants a node keeps at most, over all clients: past that the oldest
/// go first (a client whose grant is gone builds again, from the cache,
/// to read the blobs again).
pub const MAX_GRANTS: usize = 1_000_000;

/// The stream code a coordinator stops an upload over quota with.
pub const OVER_QUOTA: u32 = 4;

/// Why `peer`, a client, may not read a blob.
fn not_granted(peer: &strata_net::Peer) -> String {
    format!("{peer} may read only the layers of its own builds (for an hour after each build)")
}

/// Answers `peer`'s request for blob `d` from `cas` on `send`: nodes of
/// the cluster read any blob, a client only one `reads` grants it.
pub async fn serve_blob(
    reads: &std::sync::Mutex<ReadRights>,
    cas: &strata_cas::ContentStore,
    peer: &strata_net::Connection,
    d: &Digest,
    send: &mut quinn::SendStream,
) -> Result<(), strata_net::Error> {
    let granted = peer.peer.role != strata_net::Role::Client
        || reads
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .may_read(&peer.peer.name, d, Instant::now());
    if !granted {
        return strata_net::refuse_blob(send, &not_granted(&peer.peer), peer.addr).await;
    }
    let sent = strata_net::send_blob(send, cas, d, peer.addr).await?;
    strata_metrics::transferred(strata_metrics::Transfer::PeerSent, sent);
    Ok(())
}

/// Which client may read which blob, until when.
#[derive(Debug, Default)]
pub struct ReadRights {
    until: HashMap<(String, Digest), Instant>,
    /// Grants in the order they were made: their expiry times only grow.
    order: VecDeque<(Instant, String, Digest)>,
}

impl ReadRights {
    /// Lets `client` read `blobs` until `now + READ_FOR`.
    pub fn grant(&mut self, client: &str, blobs: &[Digest], now: Instant) {
        let until = now + READ_FOR;
        for b in blobs {
            self.until.insert((client.to_string(), *b), until);
            self.order.push_back((until, client.to_string(), *b));
        }
        self.prune(now);
    }

    /// Whether `client` may read `blob` at `now`.
    pub fn may_read(&self, client: &str, blob: &Digest, now: Instant) -> bool {
        self.until
            .get(&(client.to_string(), *blob))
            .is_some_and(|until| *until > now)
    }

    /// Grants held.
    #[cfg(test)]
    fn len(&self) -> usize {
        self.until.len()
    }

    fn prune(&mut self, now: Instant) {
        while let Some((until, _, _)) = self.order.front() {
            if *until > now && self.until.len() <= MAX_GRANTS {
                break;
            }
            let Some((until, client, blob)) = self.order.pop_front() else {
                break;
            };
            let key = (client, blob);
            // A later grant of the same blob keeps it.
            if self.until.get(&key) == Some(&until) {
                self.until.remove(&key);
            }
        }
    }
}

/// A client over its upload quota.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize, thiserror::Error)]
#[error(
    "{client} has uploaded {used} bytes in the last hour; {size} more would pass its quota of \
     {quota} bytes an hour (upload_quota_mib_per_hour in the coordinator's configuration)"
)]
pub struct OverQuota {
    /// The client's name.
    pub client: String,
    /// Bytes it uploaded in the last hour.
    pub used: u64,
    /// The upload refused.
    pub size: u64,
    /// Its quota.
    pub quota: u64,
}

/// Bytes each client may upload in any hour: each upload is counted at
/// the size announced before its first byte, and refused whole when it
/// would pass the quota.
#[derive(Debug)]
pub struct UploadQuota {
    per_hour: u64,
    uploads: HashMap<String, Window>,
}

/// One client's uploads of the last hour, oldest first, and their sum: a
/// context of 30,000 files is 30,000 uploads, each checked in constant
/// time.
#[derive(Debug, Default)]
struct Window {
    uploads: VecDeque<(Instant, u64)>,
    total: u64,
}

const HOUR: Duration = Duration::from_secs(3600);

impl UploadQuota {
    /// A quota of `per_hour` bytes per client.
    pub fn new(per_hour: u64) -> UploadQuota {
        UploadQuota {
            per_hour,
            uploads: HashMap::new(),
        }
    }

    /// Counts an upload of `size` bytes by `client` at `now`, or refuses
    /// it.
    pub fn reserve(&mut self, client: &str, size: u64, now: Instant) -> Result<(), OverQuota> {
        // Clients that uploaded nothing for an hour are forgotten.
        self.uploads.retain(|_, w| {
            while let Some(&(at, n)) = w.uploads.front()
                && now.saturating_duration_since(at) >= HOUR
            {
                w.uploads.pop_front();
                w.total -= n;
            }
            !w.uploads.is_empty()
        });
        let used = self.uploads.get(client).map_or(0, |w| w.total);
        if used.saturating_add(size) > self.per_hour {
            return Err(OverQuota {
                client: client.to_string(),
                used,
                size,
                quota: self.per_hour,
            });
        }
        let w = self.uploads.entry(client.to_string()).or_default();
        w.uploads.push_back((now, size));
        w.total += size;
        Ok(())
    }

    /// Gives back an upload [`reserve`](Self::reserve) counted that did
    /// not arrive (refused, broken off): only what is stored counts.
    pub fn refund(&mut self, client: &str, size: u64) {
        if let Some(w) = self.uploads.get_mut(client)
            && let Some(i) = w.uploads.iter().rposition(|(_, n)| *n == size)
        {
            w.uploads.remove(i);
            w.total -= size;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn blob(n: u8) -> Digest {
        Digest::of(&[n])
    }

    #[test]
    fn a_client_reads_what_it_was_granted_until_the_grant_lapses() {
        let mut r = ReadRights::default();
        let t0 = Instant::now();
        r.grant("team-a", &[blob(1), blob(2)], t0);
        assert!(r.may_read("team-a", &blob(1), t0));
        assert!(!r.may_read("team-b", &blob(1), t0));
        assert!(!r.may_read("team-a", &blob(3), t0));
        assert!(r.may_read("team-a", &blob(2), t0 + READ_FOR - Duration::from_secs(1)));
        assert!(!r.may_read("team-a", &blob(2), t0 + READ_FOR));
    }

    #[test]
    fn a_later_grant_outlives_the_pruning_of_an_earlier_one() {
        let mut r = ReadRights::default();
        let t0 = Instant::now();
        r.grant("a", &[blob(1)], t0);
        let t1 = t0 + READ_FOR / 2;
        r.grant("a", &[blob(1)], t1);
        // The first grant has lapsed and is pruned; the second stands.
        let t2 = t0 + READ_FOR + Duration::from_secs(1);
        r.grant("b", &[blob(9)], t2);
        assert!(r.may_read("a", &blob(1), t2));
        assert_eq!(r.len(), 2);
        r.grant("b", &[blob(9)], t1 + READ_FOR);
        assert!(!r.may_read("a", &blob(1), t1 + READ_FOR));
        assert_eq!(r.len(), 1);
    }

    #[test]
    fn uploads_past_the_hourly_quota_are_refused_and_the_hour_slides() {
        let mut q = UploadQuota::new(100);
        let t0 = Instant::now();
        q.reserve("a", 60, t0).unwrap();
        let e = q
            .reserve("a", 50, t0 + Duration::from_secs(10))
            .unwrap_err();
        assert_eq!((e.used, e.size, e.quota), (60, 50, 100));
        assert!(e.to_string().contains("upload_quota_mib_per_hour"), "{e}");
        // Another client has a quota of its own.
        q.reserve("b", 100, t0).unwrap();
        // A refunded upload does not count.
        q.reserve("a", 40, t0).unwrap();
        q.refund("a", 40);
        q.reserve("a", 40, t0).unwrap();
        // An hour after, the first upload no longer counts.
        q.reserve("a", 60, t0 + HOUR).unwrap();
        assert!(q.reserve("a", 41, t0 + HOUR).is_err());
        q.reserve("a", 40, t0 + HOUR).unwrap();
    }
}
