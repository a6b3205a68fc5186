//! Which worker a stage goes to.
//!
//! A stage runs its steps on one worker, keeping its filesystem there;
//! placing it well saves fetching its base. The default policy,
//! [`Policy::Locality`], ranks the workers that can run it (up, not
//! cordoned, granting its entitlements, running its platform):
//!
//! 1. natively before under emulation: emulation is many times slower
//!    than any transfer it would save;
//! 2. the worker its base stage ran on (its filesystem is there);
//! 3. the most bytes of its base layers already held;
//! 4. the worker it was pinned to when its inputs were measured;
//! 5. the least loaded, then by name.
//!
//! The others are baselines for `benches/fleet_sim`: least loaded only,
//! random, and BuildKit's `loadbalance=sticky` (the buildx Kubernetes
//! driver's: a hash of the build's context picks the node).

use std::collections::BTreeMap;

use strata_dockerfile::Platform;
use strata_plan::Entitlements;

use crate::fleet::{Fleet, Member};

/// How stages are placed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    /// Where the stage's inputs are, as described in the module.
    Locality,
    /// The least loaded worker, wherever the inputs are.
    LeastLoaded,
    /// Any worker, by [`Want::key`].
    Random,
    /// The worker [`Want::key`] hashes to among those that can run the
    /// stage, busy or not, as buildx's sticky load balancing does.
    Sticky,
}

impl Policy {
    /// Every policy, the default first.
    pub const ALL: [Policy; 4] = [
        Policy::Locality,
        Policy::LeastLoaded,
        Policy::Random,
        Policy::Sticky,
    ];

    /// Its name in reports.
    pub fn name(self) -> &'static str {
        match self {
            Policy::Locality => "locality",
            Policy::LeastLoaded => "least-loaded",
            Policy::Random => "random",
            Policy::Sticky => "sticky (buildx)",
        }
    }
}

/// What a stage needs of its worker.
pub struct Want<'a> {
    /// The platform its steps run on; `None` when it runs no steps (any
    /// worker copies files).
    pub platform: Option<&'a Platform>,
    /// The entitlements its steps use.
    pub entitlements: &'a Entitlements,
    /// Only a worker with a slot free now (else a busy one is fine: the
    /// stage waits there).
    pub free_slot: bool,
    /// The worker its base stage ran on.
    pub base_worker: Option<&'a str>,
    /// The worker it was pinned to before.
    pub soft: Option<&'a str>,
    /// Bytes of its base layers a worker holds.
    pub held: &'a dyn Fn(&str) -> u64,
    /// What [`Policy::Random`] and [`Policy::Sticky`] hash: a fresh
    /// number, or the build's context.
    pub key: u64,
}

/// How a worker runs a stage's platform; better is greater.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum PlatformFit {
    /// Through an emulator.
    Emulated,
    /// Natively.
    Native,
}

/// Whether a worker that reported `runs` and `native` runs `p`, and how;
/// `None` if it does not.
pub fn platform_fit(p: &Platform, runs: &[Platform], native: &[Platform]) -> Option<PlatformFit> {
    let matches = |r: &Platform| r.matches(&p.os, &p.architecture, p.variant.as_deref());
    if native.iter().any(matches) {
        Some(PlatformFit::Native)
    } else if runs.iter().any(matches) {
        Some(PlatformFit::Emulated)
    } else {
        None
    }
}

/// How `m` runs what `want` asks, if it can run it at all.
fn fits<L>(fleet: &Fleet<L>, name: &str, m: &Member<L>, want: &Want<'_>) -> Option<PlatformFit> {
    if !m.alive() || fleet.is_cordoned(name) || !want.entitlements.is_subset(&m.spec().entitlements)
    {
        return None;
    }
    match want.platform {
        Some(p) => platform_fit(p, &m.spec().platforms, &m.spec().native),
        None => Some(PlatformFit::Native),
    }
}

/// The worker `policy` places a stage wanting `want` on, if any fits.
pub fn choose<'f, L>(fleet: &'f Fleet<L>, want: &Want<'_>, policy: Policy) -> Option<&'f str> {
    let able = fleet
        .iter()
        .filter_map(|(name, m)| fits(fleet, name, m, want).map(|fit| (name, m, fit)));
    let free = |m: &Member<L>| !want.free_slot || m.has_free_slot();
    match policy {
        Policy::Locality => able
            .filter(|(_, m, _)| free(m))
            .map(|(name, m, fit)| {
                let is = |w: Option<&str>| w == Some(name);
                (
                    std::cmp::Reverse((
                        fit,
                        is(want.base_worker),
                        (want.held)(name),
                        is(want.soft),
                    )),
                    m.load(),
                    name,
                )
            })
            .min()
            .map(|(_, _, name)| name),
        Policy::LeastLoaded => able
            .filter(|(_, m, _)| free(m))
            .map(|(name, m, fit)| (std::cmp::Reverse(fit), m.load(), name))
            .min()
            .map(|(_, _, name)| name),
        Policy::Random => able
            .filter(|(_, m, _)| free(m))
            .map(|(name, _, _)| (mix(want.key ^ hash(name)), name))
            .min()
            .map(|(_, name)| name),
        Policy::Sticky => {
            let able: Vec<(&str, &Member<L>)> = able.map(|(n, m, _)| (n, m)).collect();
            let n = u64::try_from(able.len()).ok().filter(|&n| n > 0)?;
            let i = usize::try_from(mix(want.key) % n).ok()?;
            able.get(i).filter(|(_, m)| free(m)).map(|(name, _)| *name)
        }
    }
}

/// Where one build's stages are: a stage is pinned to a worker when
/// its inputs are measured there, settled once a step ran there (its
/// filesystem is there, so its other steps go there too), and placed
/// afresh when it is done or its worker is lost.
#[derive(Debug, Default)]
pub struct Stages {
    placed: BTreeMap<usize, Pin>,
    /// Stage → the worker that ran its last step, whose filesystem it is.
    ran: BTreeMap<usize, String>,
}

/// Where a stage is.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pin {
    /// The worker.
    pub worker: String,
    /// A step of it ran there, so it stays.
    pub settled: bool,
}

impl Stages {
    /// Where stage `i` is now.
    pub fn pinned(&self, i: usize) -> Option<&Pin> {
        self.placed.get(&i)
    }

    /// Pins stage `i` to `worker` unless it is pinned already; returns
    /// where it is.
    pub fn pin(&mut self, i: usize, worker: &str) -> &str {
        &self
            .placed
            .entry(i)
            .or_insert_with(|| Pin {
                worker: worker.to_string(),
                settled: false,
            })
            .worker
    }

    /// A step of stage `i` runs on `worker`: the stage settles there.
    /// True when that is news (it was not settled there before).
    pub fn settle(&mut self, i: usize, worker: &str) -> bool {
        self.ran.insert(i, worker.to_string());
        let settled = Pin {
            worker: worker.to_string(),
            settled: true,
        };
        self.placed.insert(i, settled.clone()) != Some(settled)
    }

    /// The worker stage `i`'s filesystem is on.
    pub fn ran_on(&self, i: usize) -> Option<&str> {
        self.ran.get(&i).map(String::as_str)
    }

    /// Stage `i` is done: a later attempt of it is placed afresh.
    pub fn done(&mut self, i: usize) {
        self.placed.remove(&i);
    }

    /// `worker` is lost: the stages pinned or settled on it, each once,
    /// to start over elsewhere; what ran there is gone with it.
    pub fn lost(&mut self, worker: &str) -> Vec<usize> {
        let moved: Vec<usize> = self
            .placed
            .iter()
            .filter(|(_, p)| p.worker == worker)
            .map(|(&i, _)| i)
            .collect();
        for i in &moved {
            self.placed.remove(i);
        }
        self.ran.retain(|_, w| w != worker);
        moved
    }
}

/// FNV-1a of a name: stable across runs, unlike std's hasher.
fn hash(s: &str) -> u64 {
    s.bytes().fold(0xcbf2_9ce4_8422_2325, |h, b| {
        (h ^ u64::from(b)).wrapping_mul(0x0000_0100_0000_01b3)
    })
}

/// SplitMix64's finalizer: spreads a key over all 64 bits.
fn mix(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::fleet::Spec;

    fn p(s: &str) -> Platform {
        Platform::parse(s).unwrap()
    }

    fn fleet(workers: &[(&str, usize)]) -> Fleet<()> {
        let mut f = Fleet::default();
        for (name, slots) in workers {
            f.register(
                name,
                Spec {
                    slots: *slots,
                    platforms: vec![p("linux/amd64")],
                    native: vec![p("linux/amd64")],
                    ..Spec::default()
                },
                1,
                (),
                Instant::now(),
            );
        }
        f
    }

    fn want<'a>(held: &'a dyn Fn(&str) -> u64, none: &'a Entitlements) -> Want<'a> {
        Want {
            platform: None,
            entitlements: none,
            free_slot: true,
            base_worker: None,
            soft: None,
            held,
            key: 7,
        }
    }

    #[test]
    fn native_workers_beat_emulating_ones_and_others_do_not_fit() {
        let amd64_emulating_arm64 = (
            vec![p("linux/amd64"), p("linux/arm64")],
            vec![p("linux/amd64")],
        );
        let arm64 = (vec![p("linux/arm64")], vec![p("linux/arm64")]);
        let fit = |w: &(Vec<Platform>, Vec<Platform>), s: &str| platform_fit(&p(s), &w.0, &w.1);
        assert_eq!(fit(&arm64, "linux/arm64"), Some(PlatformFit::Native));
        assert_eq!(
            fit(&amd64_emulating_arm64, "linux/arm64"),
            Some(PlatformFit::Emulated)
        );
        assert_eq!(
            fit(&amd64_emulating_arm64, "linux/amd64"),
            Some(PlatformFit::Native)
        );
        assert_eq!(fit(&arm64, "linux/amd64"), None);
        assert!(PlatformFit::Native > PlatformFit::Emulated);
    }

    #[test]
    fn locality_prefers_the_worker_holding_the_base_then_the_least_loaded() {
        let mut f = fleet(&[("a", 2), ("b", 2), ("c", 2)]);
        let none = Entitlements::new();
        let held = |w: &str| if w == "c" { 300 } else { 0 };
        assert_eq!(choose(&f, &want(&held, &none), Policy::Locality), Some("c"));
        // Full, it is passed over for a free worker; the least loaded wins.
        let _t1 = f.take("c").unwrap();
        let _t2 = f.take("c").unwrap();
        let _t3 = f.take("a").unwrap();
        assert_eq!(choose(&f, &want(&held, &none), Policy::Locality), Some("b"));
        // A stage that waits anyway goes where its base is.
        let waiting = Want {
            free_slot: false,
            ..want(&held, &none)
        };
        assert_eq!(choose(&f, &waiting, Policy::Locality), Some("c"));
        // The worker its base stage ran on beats bytes held.
        let on_a = Want {
            base_worker: Some("a"),
            free_slot: false,
            ..want(&held, &none)
        };
        assert_eq!(choose(&f, &on_a, Policy::Locality), Some("a"));
    }

    #[test]
    fn no_policy_places_on_a_down_cordoned_unentitled_or_foreign_worker() {
        let mut f = fleet(&[("down", 1), ("cordoned", 1), ("ok", 1)]);
        f.lose("down", 1);
        f.cordon("cordoned", true);
        let none = Entitlements::new();
        let held = |_: &str| 0;
        for policy in Policy::ALL {
            for key in 0..50 {
                let w = Want {
                    key,
                    ..want(&held, &none)
                };
                let chosen = choose(&f, &w, policy);
                assert!(
                    chosen.is_none_or(|c| c == "ok"),
                    "{policy:?} chose {chosen:?}"
                );
            }
        }
        let insecure: Entitlements = [strata_plan::Entitlement::SecurityInsecure].into();
        let arm = p("linux/arm64");
        for policy in Policy::ALL {
            let w = Want {
                entitlements: &insecure,
                ..want(&held, &none)
            };
            assert_eq!(choose(&f, &w, policy), None);
            let w = Want {
                platform: Some(&arm),
                ..want(&held, &none)
            };
            assert_eq!(choose(&f, &w, policy), None);
        }
    }

    #[test]
    fn sticky_keeps_a_key_on_one_worker_even_when_it_is_busy() {
        let mut f = fleet(&[("a", 1), ("b", 1), ("c", 1), ("d", 1)]);
        let none = Entitlements::new();
        let held = |_: &str| 0;
        let first = choose(&f, &want(&held, &none), Policy::Sticky)
            .unwrap()
            .to_string();
        let _t = f.take(&first).unwrap();
        assert_eq!(choose(&f, &want(&held, &none), Policy::Sticky), None);
        let busy_ok = Want {
            free_slot: false,
            ..want(&held, &none)
        };
        assert_eq!(choose(&f, &busy_ok, Policy::Sticky), Some(first.as_str()));
        // Other keys spread over the fleet.
        let spread: std::collections::BTreeSet<&str> = (0..64)
            .filter_map(|key| {
                choose(
                    &f,
                    &Want {
                        key,
                        free_slot: false,
                        ..want(&held, &none)
                    },
                    Policy::Sticky,
                )
            })
            .collect();
        assert_eq!(spread.len(), 4);
    }

    #[test]
    fn a_lost_worker_s_stages_start_over_exactly_once_and_others_stay() {
        let mut stages = Stages::default();
        assert_eq!(stages.pin(0, "a"), "a");
        // Pinned already: it stays where it is.
        assert_eq!(stages.pin(0, "b"), "a");
        assert!(stages.settle(0, "a"));
        assert!(!stages.settle(0, "a"));
        stages.pin(1, "b");
        stages.settle(2, "a");
        assert_eq!(stages.ran_on(0), Some("a"));
        assert_eq!(stages.lost("a"), [0, 2]);
        // Asked again (another step of the same build hears of it), the
        // stages are not moved twice.
        assert!(stages.lost("a").is_empty());
        assert_eq!(stages.ran_on(0), None);
        assert_eq!(stages.pinned(1).map(|p| p.worker.as_str()), Some("b"));
        assert_eq!(stages.pin(0, "c"), "c");
        stages.done(0);
        assert!(stages.pinned(0).is_none());
    }
}
