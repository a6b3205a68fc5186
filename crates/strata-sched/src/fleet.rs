//! The registered workers, as events tell of them.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use strata_dockerfile::Platform;
use strata_plan::Entitlements;

/// What a worker says of itself when it registers.
#[derive(Debug, Clone, Default)]
pub struct Spec {
    /// Steps it runs at once (at least one is counted).
    pub slots: usize,
    /// The platforms it runs steps for, natively or emulated.
    pub platforms: Vec<Platform>,
    /// Those it runs natively.
    pub native: Vec<Platform>,
    /// The entitlements it grants: only stages needing no more go there.
    pub entitlements: Entitlements,
    /// Its store's bound in bytes (`keep_storage`), if it has one.
    pub keep_storage: Option<u64>,
}

/// One registered worker.
#[derive(Debug)]
pub struct Member<L> {
    /// What the driver keeps with it (its connection, say).
    pub link: L,
    spec: Spec,
    epoch: u64,
    running: usize,
    alive: bool,
    last_seen: Instant,
    stored: u64,
}

impl<L> Member<L> {
    /// What it said of itself.
    pub fn spec(&self) -> &Spec {
        &self.spec
    }

    /// Its slots (at least one).
    pub fn slots(&self) -> usize {
        self.spec.slots.max(1)
    }

    /// Steps running on it now.
    pub fn running(&self) -> usize {
        self.running
    }

    /// Whether it is up: registered, and heard from within its lease.
    pub fn alive(&self) -> bool {
        self.alive
    }

    /// The registration it is under (the driver's connection id, say): an
    /// event of an older one is about a worker that has since come back.
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether a step may start on it now.
    pub fn has_free_slot(&self) -> bool {
        self.alive && self.running < self.slots()
    }

    /// How busy it is: running steps per thousand slots.
    pub fn load(&self) -> usize {
        self.running * 1000 / self.slots()
    }

    /// It said its store holds `bytes`.
    pub fn set_stored(&mut self, bytes: u64) {
        self.stored = bytes;
    }

    /// How full its store is: thousandths of its bound, past a thousand
    /// when over it; 0 when it has no bound.
    pub fn fullness(&self) -> u64 {
        match self.spec.keep_storage {
            Some(keep) => self.stored.saturating_mul(1000) / keep.max(1),
            None => 0,
        }
    }
}

/// A slot taken on a worker; give it back with [`Fleet::release`].
#[derive(Debug, PartialEq, Eq)]
#[must_use = "a slot not released stays taken"]
pub struct Ticket {
    worker: String,
    epoch: u64,
}

impl Ticket {
    /// The worker it is on.
    pub fn worker(&self) -> &str {
        &self.worker
    }
}

/// The workers a coordinator knows, by name.
#[derive(Debug)]
pub struct Fleet<L> {
    members: BTreeMap<String, Member<L>>,
    cordoned: BTreeSet<String>,
}

impl<L> Default for Fleet<L> {
    fn default() -> Self {
        Fleet {
            members: BTreeMap::new(),
            cordoned: BTreeSet::new(),
        }
    }
}

impl<L> Fleet<L> {
    /// `name` registered at `now` under `epoch`: it is up, with no step
    /// running (those of an earlier registration are not its any more).
    /// Returns the member it replaces.
    pub fn register(
        &mut self,
        name: &str,
        spec: Spec,
        epoch: u64,
        link: L,
        now: Instant,
    ) -> Option<Member<L>> {
        self.members.insert(
            name.to_string(),
            Member {
                link,
                spec,
                epoch,
                running: 0,
                alive: true,
                last_seen: now,
                stored: 0,
            },
        )
    }

    /// `name` is up and registered under `epoch`: the member, to update.
    pub fn current(&mut self, name: &str, epoch: u64) -> Option<&mut Member<L>> {
        self.members
            .get_mut(name)
            .filter(|m| m.alive && m.epoch == epoch)
    }

    /// `name` was heard from at `now` under `epoch`: the member, to
    /// update with what it said; `None` if that is not its live
    /// registration (it must register again).
    pub fn heartbeat(&mut self, name: &str, epoch: u64, now: Instant) -> Option<&mut Member<L>> {
        let m = self.current(name, epoch)?;
        m.last_seen = now;
        Some(m)
    }

    /// `name`'s registration `epoch` ended (its connection closed); true
    /// if that took it down.
    pub fn lose(&mut self, name: &str, epoch: u64) -> bool {
        match self.current(name, epoch) {
            Some(m) => {
                m.alive = false;
                true
            }
            None => false,
        }
    }

    /// Takes down every live worker not heard from within `lease` of
    /// `now`, and names them.
    pub fn expire(&mut self, now: Instant, lease: Duration) -> Vec<String> {
        self.members
            .iter_mut()
            .filter(|(_, m)| m.alive && now.saturating_duration_since(m.last_seen) > lease)
            .map(|(name, m)| {
                m.alive = false;
                name.clone()
            })
            .collect()
    }

    /// Drops `name` from the fleet altogether.
    pub fn forget(&mut self, name: &str) -> Option<Member<L>> {
        self.cordoned.remove(name);
        self.members.remove(name)
    }

    /// Keeps new stages off `name` (or lets them on again); false if no
    /// worker of that name registered.
    pub fn cordon(&mut self, name: &str, cordoned: bool) -> bool {
        if !self.members.contains_key(name) {
            return false;
        }
        if cordoned {
            self.cordoned.insert(name.to_string());
        } else {
            self.cordoned.remove(name);
        }
        true
    }

    /// Whether new stages are kept off `name`.
    pub fn is_cordoned(&self, name: &str) -> bool {
        self.cordoned.contains(name)
    }

    /// A slot on `name`, if it is up and has one free.
    pub fn take(&mut self, name: &str) -> Option<Ticket> {
        let m = self.members.get_mut(name).filter(|m| m.has_free_slot())?;
        m.running += 1;
        Some(Ticket {
            worker: name.to_string(),
            epoch: m.epoch,
        })
    }

    /// Gives a slot back. One taken under an earlier registration is not
    /// counted: the worker started again with none running.
    pub fn release(&mut self, ticket: Ticket) {
        if let Some(m) = self.members.get_mut(&ticket.worker)
            && m.epoch == ticket.epoch
        {
            m.running = m.running.saturating_sub(1);
        }
    }

    /// The worker named `name`, up or not.
    pub fn get(&self, name: &str) -> Option<&Member<L>> {
        self.members.get(name)
    }

    /// The worker named `name`, up or not, to update.
    pub fn get_mut(&mut self, name: &str) -> Option<&mut Member<L>> {
        self.members.get_mut(name)
    }

    /// The worker named `name` if it is up.
    pub fn live(&self, name: &str) -> Option<&Member<L>> {
        self.members.get(name).filter(|m| m.alive)
    }

    /// Every worker, by name.
    pub fn iter(&self) -> impl Iterator<Item = (&str, &Member<L>)> {
        self.members.iter().map(|(n, m)| (n.as_str(), m))
    }

    /// Every worker, by name, to update.
    pub fn iter_mut(&mut self) -> impl Iterator<Item = (&str, &mut Member<L>)> {
        self.members.iter_mut().map(|(n, m)| (n.as_str(), m))
    }

    /// Workers up now.
    pub fn live_count(&self) -> usize {
        self.members.values().filter(|m| m.alive).count()
    }

    /// The entitlements some live worker grants.
    pub fn granted(&self) -> Entitlements {
        self.members
            .values()
            .filter(|m| m.alive)
            .flat_map(|m| m.spec.entitlements.iter().copied())
            .collect()
    }
}

/// Workers the group's records name that are not up, and since when this
/// coordinator has seen them so: one gone long enough is taken off the
/// records.
#[derive(Debug, Default)]
pub struct Absences {
    since: std::collections::HashMap<String, Instant>,
}

impl Absences {
    /// A look at `now`: `recorded` names the workers on the records and
    /// `alive` says whether one is up here. Returns those gone for longer
    /// than `after`, to take off; each is counted gone from `now` again
    /// (if taking it off does not take, it is asked once more later).
    pub fn look<'a>(
        &mut self,
        recorded: impl IntoIterator<Item = &'a str>,
        alive: &dyn Fn(&str) -> bool,
        now: Instant,
        after: Duration,
    ) -> Vec<String> {
        let gone: BTreeSet<&str> = recorded.into_iter().filter(|n| !alive(n)).collect();
        self.since.retain(|n, _| gone.contains(n.as_str()));
        let mut out = Vec::new();
        for name in gone {
            let since = *self.since.entry(name.to_string()).or_insert(now);
            if now.saturating_duration_since(since) > after {
                self.since.insert(name.to_string(), now);
                out.push(name.to_string());
            }
        }
        out
    }

    /// Forgets what it saw: a member that stops leading does not keep
    /// counting.
    pub fn clear(&mut self) {
        self.since.clear();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_worker_is_taken_off_the_records_once_gone_long_enough_and_not_if_it_came_back() {
        let (t0, after) = (Instant::now(), Duration::from_secs(600));
        let at = |s: u64| t0 + Duration::from_secs(s);
        let mut absences = Absences::default();
        let recorded = ["a", "b", "c"];
        let up = |names: &'static [&'static str]| move |n: &str| names.contains(&n);
        assert!(
            absences
                .look(recorded, &up(&["a"]), at(0), after)
                .is_empty()
        );
        // b comes back before its time is up: its count starts over when
        // it goes again.
        assert!(
            absences
                .look(recorded, &up(&["a", "b"]), at(300), after)
                .is_empty()
        );
        assert!(
            absences
                .look(recorded, &up(&["a"]), at(400), after)
                .is_empty()
        );
        assert_eq!(absences.look(recorded, &up(&["a"]), at(601), after), ["c"]);
        // c is asked again only after another full wait.
        assert!(
            absences
                .look(recorded, &up(&["a"]), at(700), after)
                .is_empty()
        );
        assert_eq!(absences.look(recorded, &up(&["a"]), at(1001), after), ["b"]);
        assert_eq!(absences.look(recorded, &up(&["a"]), at(1202), after), ["c"]);
        // Taken off the records: nothing more to count.
        assert!(
            absences
                .look(["a"], &up(&["a"]), at(5000), after)
                .is_empty()
        );
        assert!(absences.since.is_empty());
    }

    fn spec(slots: usize) -> Spec {
        Spec {
            slots,
            ..Spec::default()
        }
    }

    #[test]
    fn a_worker_silent_past_its_lease_goes_down_once() {
        let t0 = Instant::now();
        let lease = Duration::from_secs(10);
        let mut fleet = Fleet::default();
        fleet.register("a", spec(2), 1, (), t0);
        fleet.register("b", spec(2), 1, (), t0);
        assert!(
            fleet
                .heartbeat("b", 1, t0 + Duration::from_secs(8))
                .is_some()
        );
        assert!(fleet.expire(t0 + Duration::from_secs(10), lease).is_empty());
        assert_eq!(fleet.expire(t0 + Duration::from_secs(11), lease), ["a"]);
        assert!(fleet.expire(t0 + Duration::from_secs(12), lease).is_empty());
        assert_eq!(fleet.live_count(), 1);
        // A heartbeat does not bring it back: it must register again.
        assert!(
            fleet
                .heartbeat("a", 1, t0 + Duration::from_secs(12))
                .is_none()
        );
        fleet.register("a", spec(2), 2, (), t0 + Duration::from_secs(13));
        assert!(fleet.live("a").is_some());
    }

    #[test]
    fn slots_are_bounded_and_a_slot_of_an_earlier_registration_is_not_given_back_twice() {
        let t0 = Instant::now();
        let mut fleet = Fleet::default();
        fleet.register("a", spec(2), 1, (), t0);
        let one = fleet.take("a").unwrap();
        let two = fleet.take("a").unwrap();
        assert!(fleet.take("a").is_none());
        assert_eq!(fleet.get("a").unwrap().load(), 1000);
        // It comes back: nothing runs on the new registration.
        fleet.register("a", spec(2), 2, (), t0);
        let three = fleet.take("a").unwrap();
        fleet.release(one);
        fleet.release(two);
        assert_eq!(fleet.get("a").unwrap().running(), 1);
        fleet.release(three);
        assert_eq!(fleet.get("a").unwrap().running(), 0);
    }

    #[test]
    fn losing_an_old_connection_does_not_take_down_the_new_one() {
        let t0 = Instant::now();
        let mut fleet = Fleet::default();
        fleet.register("a", spec(1), 1, (), t0);
        fleet.register("a", spec(1), 2, (), t0);
        assert!(!fleet.lose("a", 1));
        assert!(fleet.live("a").is_some());
        assert!(fleet.lose("a", 2));
        assert!(fleet.live("a").is_none());
        assert!(fleet.take("a").is_none());
    }

    #[test]
    fn cordons_name_registered_workers_only() {
        let mut fleet = Fleet::default();
        fleet.register("a", spec(1), 1, (), Instant::now());
        assert!(!fleet.cordon("b", true));
        assert!(fleet.cordon("a", true));
        assert!(fleet.is_cordoned("a"));
        assert!(fleet.cordon("a", false));
        assert!(!fleet.is_cordoned("a"));
    }
}
