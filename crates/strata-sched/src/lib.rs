//! strata's scheduling core: what the coordinator decides about workers,
//! with no I/O in it.
//!
//! - [`Fleet`]: the registered workers, their slots, leases, cordons and
//!   platforms, changed by events ([`Fleet::register`],
//!   [`Fleet::heartbeat`], [`Fleet::lose`], [`Fleet::expire`]) that carry
//!   the time, so a test or a simulation drives it on a virtual clock;
//!   [`Absences`]: which workers the records name are gone long enough to
//!   take off.
//! - [`place`]: which worker a stage goes to, under a [`Policy`].
//! - [`copies`]: how many copies of a layer to keep, where the next go,
//!   and what a worker dropping its copy loses.
//! - [`repair`]: the copies that bring layers a lost worker left short
//!   back to their wanted copies, as they may start, within the rate bound.
//! - [`evict`]: which blobs a store over its bounds drops.
//!
//! It must not know sockets, tasks, files or the replicated index: the
//! coordinator and the worker feed it what they hear and carry out what it
//! decides, and `benches/fleet_sim` drives the same code with a thousand
//! simulated workers. Each worker carries a link of the driver's choosing
//! (`L`: a connection for the coordinator, nothing for the simulator).

pub mod copies;
pub mod evict;
mod fleet;
pub mod place;
pub mod repair;

pub use copies::CopyKind;
pub use evict::{Candidate, Keep};
pub use fleet::{Absences, Fleet, Member, Spec, Ticket};
pub use place::{Pin, Policy, Stages, Want};
