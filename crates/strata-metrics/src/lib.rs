//! What a strata node reports, and where it is read.
//!
//! This crate owns the catalogue: every metric a node records is a
//! function here, so each name, label and help text is written once.
//! Library crates call these functions; they cost nothing until a process
//! installs the exporter with [`install`], as coordinators, workers and
//! the local daemon do. [`serve`] answers `/metrics`, `/healthz` and
//! `/readyz` over HTTP, or HTTPS with a bearer token when the address is
//! not loopback.
//!
//! It knows nothing of builds, stores or the network beyond these names.

pub mod serve;

use std::sync::OnceLock;

use metrics::{
    Unit, counter, describe_counter, describe_gauge, describe_histogram, gauge, histogram,
};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub use serve::{Health, NotReady, Serving, serve, spawn_router};

/// Why metrics could not be installed or served.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The exporter could not be set up.
    #[error("metrics: {0}")]
    Install(String),
    /// The address could not be listened on.
    #[error("metrics: cannot listen on {addr}: {source}")]
    Listen {
        /// The address.
        addr: std::net::SocketAddr,
        /// Why.
        source: std::io::Error,
    },
    /// A non-loopback address without TLS or a token.
    #[error(
        "metrics: {addr} is not a loopback address; serving metrics there needs TLS and a bearer token ({what} missing)"
    )]
    Exposed {
        /// The address.
        addr: std::net::SocketAddr,
        /// What is missing.
        what: &'static str,
    },
}

static HANDLE: OnceLock<Result<PrometheusHandle, String>> = OnceLock::new();

/// Bucket bounds of the duration histograms, in seconds: from a cached
/// step (milliseconds) to a long build (an hour).
const SECONDS: &[f64] = &[
    0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
    600.0, 1800.0, 3600.0,
];

/// Installs this process's exporter (once; later calls return the same
/// handle) and describes every metric of the catalogue.
pub fn install() -> Result<PrometheusHandle, Error> {
    HANDLE
        .get_or_init(|| {
            let recorder = PrometheusBuilder::new()
                .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
                .map_err(|e| e.to_string())?
                .build_recorder();
            let handle = recorder.handle();
            metrics::set_global_recorder(recorder).map_err(|e| e.to_string())?;
            describe();
            gauge!("strata_build_info", "version" => env!("CARGO_PKG_VERSION")).set(1.0);
            Ok(handle)
        })
        .clone()
        .map_err(Error::Install)
}

/// Help texts of every metric, as `/metrics` shows them.
fn describe() {
    describe_counter!(
        "strata_builds_started_total",
        "Builds this node started solving."
    );
    describe_counter!(
        "strata_builds_finished_total",
        "Builds this node finished solving, by outcome (succeeded, failed, cancelled)."
    );
    describe_histogram!(
        "strata_build_duration_seconds",
        Unit::Seconds,
        "How long solving a build took, by outcome."
    );
    describe_histogram!(
        "strata_step_duration_seconds",
        Unit::Seconds,
        "How long a step took, by instruction and result (cached: taken from the cache index; shared: run by a concurrent build; executed: run for this build)."
    );
    describe_counter!(
        "strata_cache_lookups_total",
        "Cache index lookups of steps, by result (hit: an entry whose layers are held; miss)."
    );
    describe_histogram!(
        "strata_step_queue_wait_seconds",
        Unit::Seconds,
        "How long a step to run waited for a slot."
    );
    describe_gauge!("strata_slots", "Steps this node runs at once at most.");
    describe_gauge!("strata_slots_busy", "Steps this node is running now.");
    describe_counter!(
        "strata_transfer_bytes_total",
        Unit::Bytes,
        "Bytes moved, by kind: peer_sent and peer_received (blobs between nodes), uploaded (build contexts received from clients), pulled and pushed (registries)."
    );
    describe_gauge!(
        "strata_store_bytes",
        Unit::Bytes,
        "Bytes of this node's state directory, by kind (blobs, snapshots, cache_mounts)."
    );
    describe_gauge!(
        "strata_replication_shortfall_blobs",
        "Cached layers held by fewer live workers than the replication factor asks (on the leader)."
    );
    describe_counter!(
        "strata_repair_bytes_total",
        Unit::Bytes,
        "Bytes copied to restore the replication factor after a worker was lost."
    );
    describe_gauge!(
        "strata_raft_term",
        "The replicated index's current Raft term."
    );
    describe_gauge!(
        "strata_raft_leader",
        "The id of the coordinator this one takes as leader (0: none known)."
    );
    describe_gauge!(
        "strata_raft_is_leader",
        "1 when this coordinator is the Raft leader."
    );
    describe_gauge!(
        "strata_raft_commit_index",
        "The highest log index this coordinator knows to be committed."
    );
    describe_gauge!(
        "strata_raft_applied_index",
        "The highest log index applied to this coordinator's state machine."
    );
    describe_counter!(
        "strata_raft_leader_changes_total",
        "Times this coordinator saw the leader change."
    );
    describe_counter!(
        "strata_handshake_errors_total",
        "Connections refused or failed during the TLS or version handshake, by kind."
    );
    describe_counter!(
        "strata_request_errors_total",
        "Requests from peers and clients that failed or were refused, by kind."
    );
    describe_gauge!("strata_build_info", "1, labelled with this node's version.");
}

/// How a build ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// It made its image.
    Succeeded,
    /// A step or the plan failed.
    Failed,
    /// Its client went or asked it to stop.
    Cancelled,
}

impl Outcome {
    fn label(self) -> &'static str {
        match self {
            Outcome::Succeeded => "succeeded",
            Outcome::Failed => "failed",
            Outcome::Cancelled => "cancelled",
        }
    }
}

/// A build began solving.
pub fn build_started() {
    counter!("strata_builds_started_total").increment(1);
}

/// A build ended after `seconds`.
pub fn build_finished(outcome: Outcome, seconds: f64) {
    counter!("strata_builds_finished_total", "outcome" => outcome.label()).increment(1);
    histogram!("strata_build_duration_seconds", "outcome" => outcome.label()).record(seconds);
}

/// Where a step's result came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepResult {
    /// From the cache index.
    Cached,
    /// From a concurrent build that ran the same step.
    Shared,
    /// Run for this build.
    Executed,
}

impl StepResult {
    fn label(self) -> &'static str {
        match self {
            StepResult::Cached => "cached",
            StepResult::Shared => "shared",
            StepResult::Executed => "executed",
        }
    }
}

/// The instructions a step's label may start with; anything else counts
/// as `other`, so a label never makes a new series.
const INSTRUCTIONS: &[&str] = &[
    "RUN",
    "COPY",
    "ADD",
    "WORKDIR",
    "ENV",
    "USER",
    "CMD",
    "ENTRYPOINT",
    "LABEL",
    "EXPOSE",
    "VOLUME",
    "ARG",
    "SHELL",
    "STOPSIGNAL",
    "HEALTHCHECK",
    "ONBUILD",
    "MAINTAINER",
];

/// The instruction a step label (`RUN make`, `COPY . /app`) is of.
pub fn instruction_kind(label: &str) -> &'static str {
    let word = label.split_whitespace().next().unwrap_or("");
    INSTRUCTIONS
        .iter()
        .find(|i| i.eq_ignore_ascii_case(word))
        .copied()
        .unwrap_or("other")
}

/// A step, labelled `label`, ended after `seconds`.
pub fn step_finished(label: &str, result: StepResult, seconds: f64) {
    histogram!(
        "strata_step_duration_seconds",
        "instruction" => instruction_kind(label),
        "result" => result.label(),
    )
    .record(seconds);
}

/// A step was looked up in the cache index.
pub fn cache_lookup(hit: bool) {
    let result = if hit { "hit" } else { "miss" };
    counter!("strata_cache_lookups_total", "result" => result).increment(1);
}

/// A step to run waited `seconds` for a slot.
pub fn queue_wait(seconds: f64) {
    histogram!("strata_step_queue_wait_seconds").record(seconds);
}

/// This node runs at most `n` steps at once.
pub fn slots(n: usize) {
    gauge!("strata_slots").set(n as f64);
    // Shown as 0 before any step runs.
    gauge!("strata_slots_busy").increment(0.0);
}

/// A running step: counted in `strata_slots_busy` while it lives.
#[derive(Debug)]
#[must_use = "the step counts as running only while this lives"]
pub struct Busy(());

/// A step starts running on this node.
pub fn busy() -> Busy {
    gauge!("strata_slots_busy").increment(1.0);
    Busy(())
}

impl Drop for Busy {
    fn drop(&mut self) {
        gauge!("strata_slots_busy").decrement(1.0);
    }
}

/// What bytes moved.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transfer {
    /// A blob sent to a peer.
    PeerSent,
    /// A blob received from a peer, checked.
    PeerReceived,
    /// A layer received from the peer writing it, as it wrote it.
    PeerStreamed,
    /// A build context received from a client.
    Uploaded,
    /// From a registry.
    Pulled,
    /// To a registry.
    Pushed,
}

impl Transfer {
    fn label(self) -> &'static str {
        match self {
            Transfer::PeerSent => "peer_sent",
            Transfer::PeerReceived => "peer_received",
            Transfer::PeerStreamed => "peer_streamed",
            Transfer::Uploaded => "uploaded",
            Transfer::Pulled => "pulled",
            Transfer::Pushed => "pushed",
        }
    }
}

/// `n` bytes moved as `kind`.
pub fn transferred(kind: Transfer, n: u64) {
    counter!("strata_transfer_bytes_total", "kind" => kind.label()).increment(n);
}

/// The state directory holds `n` bytes of `kind` (`blobs`, `snapshots`,
/// `cache_mounts`).
pub fn store_bytes(kind: &'static str, n: u64) {
    gauge!("strata_store_bytes", "kind" => kind).set(n as f64);
}

/// `n` cached layers are short of their copies.
pub fn replication_shortfall(n: usize) {
    gauge!("strata_replication_shortfall_blobs").set(n as f64);
}

/// `n` bytes were copied to restore the replication factor.
pub fn repaired(n: u64) {
    counter!("strata_repair_bytes_total").increment(n);
}

/// What a coordinator knows of its Raft group.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RaftState {
    /// The current term.
    pub term: u64,
    /// The leader it knows of.
    pub leader: Option<u64>,
    /// Whether it is the leader.
    pub is_leader: bool,
    /// The highest index known committed.
    pub committed: u64,
    /// The highest index applied.
    pub applied: u64,
}

/// Records the Raft group's state as this coordinator sees it.
pub fn raft(state: RaftState) {
    gauge!("strata_raft_term").set(state.term as f64);
    gauge!("strata_raft_leader").set(state.leader.unwrap_or(0) as f64);
    gauge!("strata_raft_is_leader").set(if state.is_leader { 1.0 } else { 0.0 });
    gauge!("strata_raft_commit_index").set(state.committed as f64);
    gauge!("strata_raft_applied_index").set(state.applied as f64);
}

/// The leader changed.
pub fn leader_changed() {
    counter!("strata_raft_leader_changes_total").increment(1);
}

/// A connection failed its handshake; `kind` is one of a few fixed words.
pub fn handshake_error(kind: &'static str) {
    counter!("strata_handshake_errors_total", "kind" => kind).increment(1);
}

/// A request failed or was refused; `kind` is one of a few fixed words.
pub fn request_error(kind: &'static str) {
    counter!("strata_request_errors_total", "kind" => kind).increment(1);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_label_names_its_instruction_and_nothing_else_makes_a_series() {
        assert_eq!(instruction_kind("RUN make -j4"), "RUN");
        assert_eq!(instruction_kind("copy . /app"), "COPY");
        assert_eq!(instruction_kind("FROM busybox"), "other");
        assert_eq!(instruction_kind(""), "other");
        assert_eq!(instruction_kind("\u{1F600} x"), "other");
    }

    #[test]
    fn recorded_values_appear_in_the_exposition() {
        let recorder = PrometheusBuilder::new()
            .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), SECONDS)
            .map(PrometheusBuilder::build_recorder);
        let Ok(recorder) = recorder else {
            unreachable!("the bucket list is not empty")
        };
        let handle = recorder.handle();
        metrics::with_local_recorder(&recorder, || {
            build_started();
            build_finished(Outcome::Failed, 2.0);
            step_finished("RUN true", StepResult::Executed, 0.3);
            cache_lookup(true);
            cache_lookup(false);
            cache_lookup(false);
            transferred(Transfer::PeerReceived, 1000);
            let running = busy();
            slots(4);
            raft(RaftState {
                term: 3,
                leader: Some(2),
                is_leader: false,
                committed: 10,
                applied: 9,
            });
            let text = handle.render();
            assert!(text.contains("strata_builds_started_total 1"), "{text}");
            assert!(
                text.contains("strata_builds_finished_total{outcome=\"failed\"} 1"),
                "{text}"
            );
            assert!(
                text.contains(
                    "strata_step_duration_seconds_bucket{instruction=\"RUN\",result=\"executed\",le=\"0.5\"} 1"
                ),
                "{text}"
            );
            assert!(
                text.contains("strata_cache_lookups_total{result=\"miss\"} 2"),
                "{text}"
            );
            assert!(
                text.contains("strata_transfer_bytes_total{kind=\"peer_received\"} 1000"),
                "{text}"
            );
            assert!(text.contains("strata_slots_busy 1"), "{text}");
            assert!(text.contains("strata_raft_term 3"), "{text}");
            drop(running);
            assert!(handle.render().contains("strata_slots_busy 0"));
        });
    }
}
