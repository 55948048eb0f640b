//! Cascades: `--downstream` runs queued as their upstreams within the cascade end, and the
//! runs a succeeded run's result asked for.

use super::{Engine, Pending, RunRequest};
use crate::model::Attempt;
use crate::model::{Instant, RunId, TaskName, Trigger};
use crate::store::NewRun;
use crate::tasklog::Level;
use tracing::{info, warn};

impl Engine {
    /// Queues the runs a succeeded run's result asked for, in the requesting run's cascade
    /// (so `run … --downstream` waits for them too, and a requested run's own requests —
    /// drift → training → predictions — join it). Only known tasks and the `drift` trigger
    /// are accepted; anything else is logged and refused.
    pub(super) fn queue_requested_runs(
        &mut self,
        by: RunId,
        cascade: Option<RunId>,
        requests: &[RunRequest],
        now: Instant,
    ) {
        for request in requests {
            let log = |message: &str| warn!(run = %by, task = %request.task, "{message}");
            if Trigger::parse(&request.trigger) != Some(Trigger::Drift) {
                log("refused a requested run: only the \"drift\" trigger may be requested");
                continue;
            }
            let Some(spec) = self
                .config
                .tasks
                .get(&TaskName::from(request.task.as_str()))
            else {
                log("refused a requested run: no such task");
                continue;
            };
            let new_run = NewRun {
                task: spec.name.clone(),
                trigger: Trigger::Drift,
                scheduled_for: now,
                max_attempts: spec.max_attempts(),
                force: false,
                downstream: false,
                cascade,
                params: None,
            };
            match self.store.enqueue(&new_run, now) {
                Ok(id) => {
                    info!(run = %id, task = %spec.name, requested_by = %by, "queued a requested run: {}", request.reason);
                    self.logs.task(spec.name.as_str()).line(
                        id,
                        Attempt(1),
                        Level::Info,
                        &format!("queued at the request of run {by}: {}", request.reason),
                    );
                    self.admit(Pending::new_run(id, &new_run), now);
                }
                Err(err) => warn!(task = %spec.name, "cannot queue a requested run: {err}"),
            }
        }
    }

    /// After a run of a `--downstream` cascade ends, queues every task of the cascade whose
    /// upstreams within it have all finished. The dependency check then decides.
    pub(super) fn continue_cascade(&mut self, root: RunId, now: Instant) {
        let Ok(Some(root_row)) = self.store.run(root) else {
            return;
        };
        let members = self.config.downstream_of(&root_row.task);
        let Ok(runs) = self.store.cascade_runs(root) else {
            return;
        };
        let mut in_cascade: Vec<TaskName> = vec![root_row.task.clone()];
        in_cascade.extend(members.iter().cloned());
        for member in &members {
            if runs.iter().any(|r| &r.task == member) {
                continue;
            }
            let Some(spec) = self.config.tasks.get(member) else {
                continue;
            };
            let ready = spec
                .depends_on
                .iter()
                .filter(|up| in_cascade.contains(up))
                .all(|up| runs.iter().any(|r| &r.task == up && r.state.is_terminal()));
            if !ready {
                continue;
            }
            // A backfill's cascade is about its past tick: the downstream run is for that
            // tick, and its upstreams in the cascade having succeeded for it is the
            // dependency check (the latest scheduled fire, now, would refuse every one).
            let backfill = root_row.trigger == Trigger::Backfill;
            let upstreams_succeeded = spec
                .depends_on
                .iter()
                .filter(|up| in_cascade.contains(up))
                .all(|up| {
                    runs.iter()
                        .any(|r| &r.task == up && r.state == crate::model::RunState::Succeeded)
                });
            let new_run = NewRun {
                task: member.clone(),
                trigger: Trigger::Downstream,
                scheduled_for: if backfill {
                    root_row.scheduled_for
                } else {
                    now
                },
                max_attempts: spec.max_attempts(),
                force: backfill && upstreams_succeeded,
                downstream: true,
                cascade: Some(root),
                params: None,
            };
            match self.store.enqueue(&new_run, now) {
                Ok(id) => self.admit(Pending::new_run(id, &new_run), now),
                Err(err) => warn!(task = %member, "cannot queue downstream run: {err}"),
            }
        }
    }
}
