//! The checker of `jepsen.rs` on histories whose answer is known: each
//! anomaly a weaker check misses is found, and what a real group may do
//! (a write whose answer was lost taking effect late, or never) is not
//! called an anomaly.

#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

mod model;

use model::{Call, Entry, EntryOp, Model, Version, Worker, WorkerOp, WorkerRet, linearizable};

fn v(n: u64) -> Option<Version> {
    Some(Version {
        created: n,
        last_used: n,
    })
}

fn put(n: u64, start: u64, end: Option<u64>) -> Call<EntryOp, Option<Version>> {
    Call {
        start,
        end,
        op: EntryOp::Put(n),
        ret: None,
    }
}

fn read(seen: Option<Version>, start: u64, end: u64) -> Call<EntryOp, Option<Version>> {
    Call {
        start,
        end: Some(end),
        op: EntryOp::Read,
        ret: Some(seen),
    }
}

fn check<M: Model>(m: &M, h: &[Call<M::Op, M::Ret>]) -> bool {
    linearizable(m, h).is_ok()
}

#[test]
fn overlapping_reads_may_see_either_version_and_a_lost_answer_may_land_late_or_never() {
    let h = [
        put(1, 0, Some(10)),
        read(v(1), 5, 15),
        put(2, 20, Some(30)),
        read(v(1), 25, 35),
        read(v(2), 26, 36),
        // Never answered: it may take effect at any moment after 40.
        put(3, 40, None),
        read(v(2), 50, 60),
        read(v(3), 70, 80),
    ];
    assert!(check(&Entry, &h));
    // Or never.
    let h = [put(1, 0, Some(10)), put(2, 20, None), read(v(1), 30, 40)];
    assert!(check(&Entry, &h));
}

#[test]
fn a_read_going_backwards_is_found() {
    // Version 2 is still being written (no answer yet), so seeing it is
    // fine; seeing 1 after having seen 2 is not.
    let h = [
        put(1, 0, Some(10)),
        put(2, 20, None),
        read(v(2), 30, 40),
        read(v(1), 50, 60),
    ];
    let e = linearizable(&Entry, &h).unwrap_err();
    assert!(e.to_string().contains("Read"), "{e}");
}

#[test]
fn a_read_of_a_version_the_end_does_not_have_is_found() {
    let h = [
        put(2, 0, Some(10)),
        put(3, 20, None),
        read(v(3), 30, 40),
        // The last word: 2. Version 3 was seen, so it cannot be undone.
        read(v(2), 50, 60),
    ];
    assert!(!check(&Entry, &h));
}

#[test]
fn a_lost_write_hidden_by_a_higher_version_is_found() {
    // Two writers: 5 is acknowledged, then 3 is written and acknowledged;
    // the end must say 3. A check that an acknowledged version is not
    // above the final one passes this.
    let h = [
        put(5, 0, Some(10)),
        put(3, 20, Some(30)),
        read(v(5), 40, 50),
    ];
    assert!(!check(&Entry, &h));
    let h = [
        put(5, 0, Some(10)),
        put(3, 20, Some(30)),
        read(v(3), 40, 50),
    ];
    assert!(check(&Entry, &h));
}

#[test]
fn a_stale_read_is_found() {
    let h = [
        put(1, 0, Some(10)),
        put(2, 20, Some(30)),
        read(v(1), 31, 40),
    ];
    assert!(!check(&Entry, &h));
}

#[test]
fn touches_only_move_forward_and_removes_drop() {
    let touch = |at, start, end| Call {
        start,
        end: Some(end),
        op: EntryOp::Touch(at),
        ret: None,
    };
    let remove = |start, end| Call {
        start,
        end: Some(end),
        op: EntryOp::Remove,
        ret: None,
    };
    let used = |created, last_used| Some(Version { created, last_used });
    let h = [
        put(1, 0, Some(10)),
        touch(9, 20, 30),
        touch(4, 40, 50),
        read(used(1, 9), 60, 70),
        remove(80, 90),
        read(None, 100, 110),
    ];
    assert!(check(&Entry, &h));
    let h = [
        put(1, 0, Some(10)),
        touch(9, 20, 30),
        touch(4, 40, 50),
        read(used(1, 4), 60, 70),
    ];
    assert!(!check(&Entry, &h));
}

fn w(op: WorkerOp, start: u64, end: u64) -> Call<WorkerOp, WorkerRet> {
    Call {
        start,
        end: Some(end),
        op,
        ret: None,
    }
}

fn holds(bit: u32, yes: bool, start: u64, end: u64) -> Call<WorkerOp, WorkerRet> {
    Call {
        start,
        end: Some(end),
        op: WorkerOp::ReadHolds(bit),
        ret: Some(WorkerRet::Holds(yes)),
    }
}

#[test]
fn blobs_gained_in_a_registration_that_was_replaced_are_not_held() {
    let base = [
        w(WorkerOp::Registered { at: 2, blobs: 0b10 }, 0, 10),
        w(
            WorkerOp::Held {
                registration: 1,
                blobs: 0b01,
            },
            20,
            30,
        ),
    ];
    let mut fine = base.to_vec();
    fine.extend([holds(0, false, 40, 50), holds(1, true, 40, 50)]);
    assert!(check(&Worker, &fine));
    // The dangling location of the review's first finding.
    let mut dangling = base.to_vec();
    dangling.push(holds(0, true, 40, 50));
    assert!(!check(&Worker, &dangling));
}

#[test]
fn a_loss_counts_only_in_its_registration_and_a_forget_only_of_its_own() {
    let h = [
        w(WorkerOp::Registered { at: 1, blobs: 0b11 }, 0, 10),
        w(
            WorkerOp::Lost {
                registration: 1,
                blobs: 0b01,
            },
            20,
            30,
        ),
        w(WorkerOp::Registered { at: 2, blobs: 0b11 }, 40, 50),
        w(
            WorkerOp::Lost {
                registration: 1,
                blobs: 0b10,
            },
            60,
            70,
        ),
        w(WorkerOp::Forget { registered: 1 }, 80, 90),
        holds(0, true, 100, 110),
        holds(1, true, 100, 110),
        Call {
            start: 100,
            end: Some(110),
            op: WorkerOp::ReadRecord,
            ret: Some(WorkerRet::Record(Some(2))),
        },
        w(WorkerOp::Forget { registered: 2 }, 120, 130),
        holds(0, false, 140, 150),
        Call {
            start: 140,
            end: Some(150),
            op: WorkerOp::ReadRecord,
            ret: Some(WorkerRet::Record(None)),
        },
    ];
    assert!(check(&Worker, &h));
}

/// A small deterministic generator.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Histories made by a real sequential register, each call stretched
/// around the moment it took effect, some answers lost: linearizable by
/// construction, and checked in a bounded time however many calls overlap.
#[test]
fn long_histories_of_a_real_register_pass() {
    for seed in 1..=6u64 {
        let mut rng = Rng(seed.wrapping_mul(0x9e37_79b9_7f4a_7c15));
        let mut state = None;
        let mut h = Vec::new();
        for i in 0..3_000u64 {
            let at = i * 10;
            let start = at.saturating_sub(rng.next() % 60);
            let end = at + rng.next() % 60;
            if rng.next().is_multiple_of(3) {
                state = v(i + 1);
                let lost = rng.next().is_multiple_of(10);
                h.push(put(i + 1, start, (!lost).then_some(end)));
            } else {
                h.push(read(state, start, end));
            }
        }
        let begun = std::time::Instant::now();
        if let Err(e) = linearizable(&Entry, &h) {
            panic!("seed {seed}: {e}");
        }
        eprintln!("seed {seed}: {:?}", begun.elapsed());
        // One read made stale breaks it.
        let stale = h
            .iter()
            .rposition(|c| matches!(c.op, EntryOp::Read) && c.ret != Some(None))
            .unwrap();
        h[stale].ret = Some(v(0));
        assert!(linearizable(&Entry, &h).is_err(), "seed {seed}");
    }
}
