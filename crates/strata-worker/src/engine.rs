//! One build's course, the same for the embedded build and a coordinator:
//! what the build asks is checked against what the engine grants
//! ([`Engine::admit`]), it is planned with its base images pulled as
//! planning finds them missing, and every stage that runs steps is
//! checked to run where the engine runs them ([`Engine::plan`]); then the
//! plan is solved on the engine's worker with its cache index, sharing
//! the steps in flight with the engine's other builds ([`Engine::solve`]).
//! Each engine brings its own worker (a [`crate::LocalWorker`] on one
//! machine, a placement of stages on a cluster's workers) and does its
//! own work around the build (a local image store, or the cluster's
//! names and read grants).

use std::sync::Arc;

use strata_dockerfile::Platform;
use strata_plan::{Entitlements, Grants, Plan};
use strata_solver::{Flights, SolveError, SolveOptions, Solved, Solver, Worker};

use crate::bases::BaseImages;
use crate::error::BuildError;

/// Where builds run: what it grants them, the platforms its steps run
/// on, its cache index and the steps in flight for any of its builds.
pub struct Engine<'a> {
    /// What it grants builds (`--allow`).
    pub grants: &'a Grants,
    /// The platforms its steps run on.
    pub runnable: &'a [Platform],
    /// What errors call them: "this machine", "the cluster's live
    /// workers".
    pub runs_on: &'a str,
    /// Its cache index.
    pub index: Arc<dyn strata_cache::CacheIndex>,
    /// Steps running for any of its builds: concurrent builds run an
    /// identical step once.
    pub flights: &'a Flights,
}

impl Engine<'_> {
    /// Refuses a build that asks for an entitlement the engine does not
    /// grant, before anything is done for it.
    pub fn admit(&self, allow: &Entitlements) -> Result<(), BuildError> {
        Ok(self.grants.check(allow)?)
    }

    /// Plans a build: `pass` plans it once through `bases` (and whatever
    /// resolver the engine puts in front of it), and runs again after
    /// each round of pulls it asked for ([`BaseImages::plan`]); the plan
    /// is refused if a stage that runs steps is for a platform the engine
    /// does not run. `pass` may return more than the plan (what it
    /// resolved, for workers), and fail with an error of its own.
    pub async fn plan<T, E: From<BuildError>>(
        &self,
        bases: &BaseImages<'_>,
        pass: impl Fn() -> Result<(Plan, T), E>,
    ) -> Result<(Plan, T), E> {
        let (plan, more) = bases.plan(pass).await?;
        crate::platforms::check_runnable(&plan, self.runnable, self.runs_on)?;
        Ok((plan, more))
    }

    /// Solves `plan` on `worker` with the engine's index and flights.
    pub async fn solve(
        &self,
        plan: &Arc<Plan>,
        worker: Arc<dyn Worker>,
        options: SolveOptions,
    ) -> Result<Solved, SolveError> {
        Arc::new(Solver::sharing(
            worker,
            Arc::clone(&self.index),
            self.flights.clone(),
        ))
        .solve(Arc::clone(plan), options)
        .await
    }
}
