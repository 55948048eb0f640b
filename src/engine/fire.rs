//! Firing: the due ticks of each task claimed in the store (one transaction a wake) and
//! handed to the queue, the next fire of each task, and the wall clock watched for steps.
//!
//! Promise: a tick is never passed over unclaimed. When the claim batch fails, every next
//! fire stays where it was and the claims are tried again after `STORE_RETRY`; a clock
//! stepped back resumes each schedule at its first unclaimed tick.

use std::collections::HashMap;

use super::cluster::HOLD_RETRY;
use super::faults::STORE_RETRY;
use super::recovery::schedule_key;
use super::{blocking, Engine, Pending};
use crate::config::{Overlap, TaskSpec};
use crate::model::{Attempt, Instant, RunState, TaskName, Trigger};
use crate::schedule::{plan_due, TickAction};
use crate::store::{Change, Move, NewRun, StoreError};
use tracing::{debug, warn};

impl Engine {
    /// The timer woke `wake_early` (`WAKE_EARLY`) ahead of the earliest fire or retry. Its
    /// ticks are claimed now, as of their deadline, and started when it comes: the claim's commit
    /// (the disk's sync) is made while the deadline is still ahead, not after it. The
    /// loop handles nothing else meanwhile, as it handled nothing while it waited before
    /// claiming; a crash between the commit and the deadline leaves what a crash between
    /// a commit and its spawn always left (recovery's orphans and queued runs).
    ///
    /// Not in cluster mode: the database judges due-ness on its own clock there, and a
    /// tick claimed ahead of it would be deferred.
    pub(super) fn on_tick_wake(&mut self) {
        let deadline = self.deadline_ahead();
        match deadline.filter(|_| !self.clustered()) {
            Some(deadline) => {
                self.hold = Some(deadline);
                self.on_tick_at(deadline.wall);
                // Taken by `fire_due` after its commit; left when it claimed nothing.
                self.hold = None;
                self.wait_for(Some(&deadline));
                // Whatever comes due in the microseconds since: the next turn, at once.
            }
            None => {
                self.wait_for(deadline.as_ref());
                self.on_tick();
            }
        }
    }

    pub(super) fn on_tick(&mut self) {
        let now = self.clock.now();
        self.on_tick_at(now);
    }

    /// Claims every tick due by `now`, and queues every retry due by then.
    fn on_tick_at(&mut self, now: Instant) {
        if !self.may_claim() {
            // Fenced: the ticks stay due until the lease is renewed; retries wait too.
            self.claim_retry_at = Some(std::time::Instant::now() + HOLD_RETRY * 20);
            return;
        }
        // Due once the tick plus its jitter has come; the claim key stays the tick.
        let due: Vec<(TaskName, Instant)> = self
            .next_fire
            .iter()
            .filter(|(task, at)| **at <= now && self.due_at(task, **at) <= now)
            .map(|(task, at)| (task.clone(), *at))
            .collect();
        if !due.is_empty() {
            self.fire_due(&due, now, false);
        }
        while let Some((at, run)) = self.retry_due.first().copied() {
            if at > now {
                break;
            }
            self.retry_due.pop_first();
            if let Some(pending) = self.retry_pending.remove(&run) {
                self.queue_push(pending);
            }
        }
    }

    /// Claims and handles every due tick of every task in `due` (task, first due tick) up
    /// to `now`, in one transaction.
    pub(super) fn fire_due(&mut self, due: &[(TaskName, Instant)], now: Instant, at_startup: bool) {
        let config = self.config.clone();
        // In task order, as on every instance: two instances' multi-row claims of tasks
        // neither holds a row of yet (first fires) never wait on each other in a circle.
        let mut due = due.to_vec();
        due.sort_by(|a, b| a.0.cmp(&b.0));
        let due = due.as_slice();
        struct TaskPlan<'a> {
            task: &'a TaskName,
            first_due: Instant,
            key: String,
            plan: crate::schedule::DuePlan,
            spec: &'a TaskSpec,
            fire: bool,
        }
        let mut plans = Vec::new();
        for (task, first_due) in due {
            let Some(spec) = config.tasks.get(task) else {
                self.next_fire.remove(task);
                continue;
            };
            let Some(schedule) = &spec.schedule else {
                self.next_fire.remove(task);
                continue;
            };
            let plan = plan_due(
                schedule,
                *first_due,
                now,
                spec.misfire,
                spec.misfire_grace,
                at_startup,
            );
            // Disabled tasks, and tasks paused in the store (read when their row is held,
            // below), let their ticks pass unclaimed.
            let fire = spec.enabled;
            plans.push(TaskPlan {
                task,
                first_due: *first_due,
                key: schedule_key(schedule),
                plan,
                spec,
                fire,
            });
        }

        // A lone tick that the dispatch after the claim would start at once is started in
        // the claim's transaction instead: `queued` and `running` in one commit (one sync
        // of the disk before the child is spawned, not two; nothing between the claim
        // and the start for a crash to split). The rest wait for the dispatch, as before.
        let mut at_once = vec![false; plans.len()];
        if self.start_with_claim && !self.cancel.is_cancelled() {
            let mut slots = self.slots();
            for (index, plan) in plans.iter().enumerate() {
                if !plan.fire {
                    continue;
                }
                let ticks = plan.plan.ticks.as_slice();
                match ticks {
                    [(tick, TickAction::Fire(Trigger::Schedule))] => {
                        let closed = plan.spec.calendar.as_ref().is_some_and(|calendar| {
                            calendar.skip_reason(*tick, plan.spec.timezone).is_some()
                        });
                        if !closed {
                            at_once[index] = self.starts_at_once(plan.spec, &mut slots, now);
                        }
                    }
                    // Recorded skipped: no slot taken.
                    _ if ticks.iter().all(|(_, action)| *action == TickAction::Skip) => {}
                    // Catch-ups, several ticks: queued, ahead of the claims after them,
                    // which then wait for the dispatch too (it keeps the FIFO order).
                    _ => break,
                }
            }
        }
        // Under `overlap = "skip"`, a scheduled tick of a task with a run running or queued
        // here is skipped, and recorded so in its claim's transaction, as a calendar's.
        let overlaps: Vec<Option<String>> = plans
            .iter()
            .map(|plan| {
                (plan.fire && plan.spec.overlap == Overlap::Skip)
                    .then(|| self.overlap_skip_reason(plan.task))
                    .flatten()
            })
            .collect();
        let change = Change {
            owner: Some(self.instance.clone()),
            ..Change::default()
        };

        /// One tick claimed.
        struct Claimed {
            pending: Pending,
            action: TickAction,
            /// A tick on a date of the task's calendar, or a scheduled tick under
            /// `overlap = "skip"` while another run of its task runs or waits: why it is
            /// skipped.
            closed: Option<String>,
            /// A run started with its claim: the store's answer to the start.
            started: Option<Result<Attempt, StoreError>>,
            /// A tick skipped at its claim (a calendar date, misfire `skip`, overlap
            /// `skip`), recorded skipped in the claim's transaction: why.
            skipped: Option<String>,
        }
        /// What one transaction of claims did, task by task.
        #[derive(Default)]
        struct Fired {
            /// Each claim.
            claims: Vec<Claimed>,
            /// Held by another instance, or not due by the database's clock: look again.
            deferred: Vec<TaskName>,
            /// Another instance moved the next fire on: this is where it is now.
            adopted: Vec<(TaskName, Option<Instant>)>,
            /// Stored under another config's schedule (task, stored key).
            disagreeing: Vec<(TaskName, String)>,
            /// The stored pause flags (another instance may have changed them).
            paused: Vec<(TaskName, bool)>,
        }
        let store = self.store.clone();
        let names: Vec<TaskName> = plans.iter().map(|plan| plan.task.clone()).collect();
        let fired = blocking(|| {
            store.batch(|batch| {
                let mut fired = Fired::default();
                // The compare-and-set: fire a task only from the next fire and schedule
                // the store holds; another instance's advance is adopted, not repeated.
                let held = batch.hold_schedules(&names)?;
                let mut claims: Vec<(NewRun, Option<crate::model::Instant>)> = Vec::new();
                let mut actions: Vec<(usize, TickAction)> = Vec::new();
                let mut firing: Vec<usize> = Vec::new();
                for (index, plan) in plans.iter().enumerate() {
                    let Some(held) = held.get(plan.task) else {
                        fired.deferred.push(plan.task.clone());
                        continue;
                    };
                    let stored = &held.state;
                    if let Some(key) = stored.schedule.as_deref() {
                        if key != plan.key {
                            fired.disagreeing.push((plan.task.clone(), key.to_string()));
                            continue;
                        }
                    }
                    // A row with a key, or with a next fire (a claim wrote it), is
                    // compared; only a row nobody has fired from is not.
                    let compared = stored.schedule.is_some() || stored.next_fire_at.is_some();
                    if compared && stored.next_fire_at != Some(plan.first_due) {
                        fired.adopted.push((plan.task.clone(), stored.next_fire_at));
                        continue;
                    }
                    if !held.due {
                        // Due by this host's clock, not yet by the database's.
                        fired.deferred.push(plan.task.clone());
                        continue;
                    }
                    // The stored pause flag is the truth: a pause or resume made on
                    // another instance holds here too.
                    fired.paused.push((plan.task.clone(), stored.paused));
                    if !plan.fire || stored.paused {
                        batch.set_next_fire(plan.task, plan.plan.next, Some(&plan.key))?;
                        continue;
                    }
                    if let Some(message) = plan.plan.misfire_message(plan.spec.misfire) {
                        warn!(task = %plan.task, "{message}");
                        batch.record_event("misfire", Some(plan.task.as_str()), None, &message, now)?;
                    }
                    firing.push(index);
                    for (tick, action) in &plan.plan.ticks {
                        let new_run = NewRun {
                            task: plan.task.clone(),
                            trigger: match action {
                                TickAction::Fire(trigger) => *trigger,
                                TickAction::Skip => Trigger::Catchup,
                            },
                            scheduled_for: *tick,
                            max_attempts: plan.spec.max_attempts(),
                            force: false,
                            downstream: false,
                            cascade: None,
                            params: None,
                        };
                        claims.push((new_run, plan.plan.next));
                        actions.push((index, *action));
                    }
                }
                // Every tick of the wake claimed in one go (PostgreSQL: a few statements
                // for the whole batch, not a round trip per row).
                let ids = batch.claim_fires(&claims, now)?;
                let mut claimed_any = vec![false; plans.len()];
                let mut starts: Vec<(usize, Move)> = Vec::new();
                for ((new_run, _), ((index, action), id)) in
                    claims.iter().zip(actions.iter().zip(ids))
                {
                    match id {
                        Some(run) => {
                            claimed_any[*index] = true;
                            // A tick on a calendar date is claimed (it is consumed: never
                            // fired later as a catch-up) and recorded skipped.
                            let spec = plans[*index].spec;
                            let closed = spec
                                .calendar
                                .as_ref()
                                .and_then(|calendar| {
                                    calendar.skip_reason(new_run.scheduled_for, spec.timezone)
                                })
                                .or_else(|| match action {
                                    TickAction::Fire(Trigger::Schedule) => overlaps[*index].clone(),
                                    _ => None,
                                });
                            let pending = Pending::new_run(run, new_run);
                            if at_once[*index] && closed.is_none() {
                                starts.push((
                                    fired.claims.len(),
                                    Move {
                                        run,
                                        attempt: pending.attempt,
                                        from: pending.state,
                                        to: RunState::Running,
                                    },
                                ));
                            }
                            fired.claims.push(Claimed {
                                pending,
                                action: *action,
                                closed,
                                started: None,
                                skipped: None,
                            });
                        }
                        None => {
                            debug!(task = %new_run.task, tick = %new_run.scheduled_for, "tick already claimed elsewhere");
                        }
                    }
                }
                // In task order, as a dispatch starts them (the claims are).
                if !starts.is_empty() {
                    let steps: Vec<Move> = starts.iter().map(|(_, step)| *step).collect();
                    let outcomes = batch.transitions(&steps, &change, now);
                    for ((at, _), outcome) in starts.iter().zip(outcomes) {
                        fired.claims[*at].started = Some(outcome);
                    }
                }
                // A tick skipped at its claim is recorded skipped in the claim's
                // transaction: a crash after a separate commit of the claim left it
                // `queued`, and the next start ran it (on a calendar's closed date, too).
                let skips: Vec<(usize, String, Move)> = fired
                    .claims
                    .iter()
                    .enumerate()
                    .filter(|(_, claimed)| claimed.started.is_none())
                    .filter_map(|(at, claimed)| {
                        let reason = match &claimed.closed {
                            Some(reason) => reason.clone(),
                            None if claimed.action == TickAction::Skip => {
                                misfire_skip_reason(at_startup).to_string()
                            }
                            None => return None,
                        };
                        let pending = &claimed.pending;
                        let step = Move {
                            run: pending.run,
                            attempt: pending.attempt,
                            from: pending.state,
                            to: RunState::Skipped,
                        };
                        Some((at, reason, step))
                    })
                    .collect();
                if !skips.is_empty() {
                    let moves: Vec<(Move, Change)> = skips
                        .iter()
                        .map(|(_, reason, step)| {
                            let change = Change {
                                reason: Some(reason.clone()),
                                ..Change::default()
                            };
                            (*step, change)
                        })
                        .collect();
                    let outcomes = batch.finishes(&moves, now);
                    for ((at, reason, _), outcome) in skips.into_iter().zip(outcomes) {
                        // A skip the store refused would leave its claim queued, to be
                        // run: the whole batch is rolled back and tried again instead.
                        outcome?;
                        fired.claims[at].skipped = Some(reason);
                    }
                }
                // A claim writes the next fire; with no claim (no tick, or each one
                // claimed already) it is written here, or the store keeps the old one.
                for index in firing {
                    if !claimed_any[index] {
                        let plan = &plans[index];
                        batch.set_next_fire(plan.task, plan.plan.next, Some(&plan.key))?;
                    }
                }
                Ok(fired)
            })
        });
        let claims = fired.map(|fired| {
            let Fired {
                claims,
                deferred,
                adopted,
                disagreeing,
                paused,
            } = fired;
            for (task, paused) in paused {
                let changed = if paused {
                    self.paused.insert(task.as_str().to_string())
                } else {
                    // Resumed (here or on another instance): no circuit holds it.
                    self.circuits.remove(task.as_str());
                    self.paused.remove(task.as_str())
                };
                self.dirty |= changed;
            }
            (claims, deferred, adopted, disagreeing)
        });
        let (claims, deferred, adopted, disagreeing) = match claims {
            Ok(fired) => fired,
            Err(err) => {
                // Nothing of the batch was committed: no tick was claimed, so none may be
                // passed over. Each task's next fire stays at its first unclaimed tick and
                // the claims are tried again after STORE_RETRY; once the store takes them,
                // the ticks missed meanwhile meet the task's misfire policy.
                for (task, first_due) in due {
                    let at = self
                        .next_fire
                        .get(task)
                        .map_or(*first_due, |at| (*at).min(*first_due));
                    self.next_fire.insert(task.clone(), at);
                }
                self.claim_retry_at = Some(std::time::Instant::now() + STORE_RETRY);
                self.store_failed(
                    &format!("claiming the due ticks of {} task(s)", plans.len()),
                    &err,
                    now,
                );
                return;
            }
        };
        self.claim_retry_at = None;
        self.store_ok(now);
        // Claimed ahead of their deadline: started only once it has come.
        if let Some(deadline) = self.hold.take() {
            self.wait_for(Some(&deadline));
        }
        self.dirty |= !plans.is_empty();
        let deferred: std::collections::HashSet<TaskName> = deferred.into_iter().collect();
        let disagreeing: HashMap<TaskName, String> = disagreeing.into_iter().collect();
        let adopted: HashMap<TaskName, Option<Instant>> = adopted.into_iter().collect();
        for plan in &plans {
            if deferred.contains(plan.task) {
                // Still due: another instance is firing it, or the database's clock has
                // not reached it yet. Looked at again from its first due tick.
                self.claim_retry_at = Some(std::time::Instant::now() + HOLD_RETRY);
                self.next_fire
                    .entry(plan.task.clone())
                    .or_insert(plan.first_due);
                continue;
            }
            let next = match adopted.get(plan.task) {
                Some(stored) => *stored,
                None => plan.plan.next,
            };
            match disagreeing.get(plan.task) {
                Some(stored) => self.config_disagrees(plan.task, &plan.key, stored, now),
                None => self.config_agrees(plan.task),
            }
            match next {
                Some(at) => self.next_fire.insert(plan.task.clone(), at),
                None => self.next_fire.remove(plan.task),
            };
        }
        // The skips of this wake (misfire, overlap, calendar) are written together at its end.
        self.skips = Some(Vec::new());
        let lone = claims
            .iter()
            .filter(|claim| matches!(claim.started, Some(Ok(_))))
            .count()
            == 1;
        for Claimed {
            pending,
            started,
            skipped,
            ..
        } in claims
        {
            if let Some(started) = started {
                self.spawn_here = lone;
                self.started(pending, started, now);
                self.spawn_here = false;
            } else if let Some(reason) = skipped {
                self.skipped_with_claim(&pending, &reason, now);
            } else {
                self.admit(pending, now);
            }
        }
        // The claims' starts spawn now, not behind the skips' commit and the dispatch.
        self.launch_gathered();
        self.flush_skips(now);
    }

    /// When the fire of `task`'s nominal tick `at` is due: `at` plus the task's jitter.
    pub(super) fn due_at(&self, task: &TaskName, at: Instant) -> Instant {
        if !self.config.any_jitter {
            return at;
        }
        self.config
            .tasks
            .get(task)
            .map_or(at, |spec| spec.due_at(at))
    }

    pub(super) fn set_next_fire(&mut self, task: &TaskName, next: Option<Instant>, key: &str) {
        self.dirty = true;
        match next {
            Some(at) => {
                self.next_fire.insert(task.clone(), at);
            }
            None => {
                self.next_fire.remove(task);
            }
        }
        if let Err(err) = self.store.set_next_fire(task, next, Some(key)) {
            warn!(task = %task, "cannot store next fire: {err}");
        }
    }

    /// Notices a step of the wall clock between two wakes. Stepped back: schedules resume
    /// at their first unclaimed tick after the new wall time. Stepped forward: the ticks
    /// passed over are simply due, and meet each task's misfire policy.
    pub(super) fn watch_clock(&mut self) {
        let now = self.clock.now();
        let Some(step) = self.wall.observe(now) else {
            return;
        };
        if self.clustered() {
            // Cluster mode: the engine's clock is the database's; a step of this host's
            // clock is corrected by measuring the offset again, now — no schedule is
            // planned anew from a host clock that moved.
            self.measure_offset_now(true);
            self.wall = super::faults::WallWatch::new(self.clock.now());
            let message = format!(
                "{} on this host: due ticks follow the database's clock; its offset was measured again",
                step.describe()
            );
            warn!("{message}");
            self.log_event("clock_step", None, None, &message, self.clock.now());
            return;
        }
        let message = if step.by < chrono::TimeDelta::zero() {
            let moved = self.resume_schedules(now, step.until);
            format!(
                "{}: ticks already claimed (up to {}) are not run again; {moved} schedule(s) resume from the new wall time",
                step.describe(),
                step.until.to_rfc3339()
            )
        } else {
            format!(
                "{}: the ticks passed over meet each task's misfire policy",
                step.describe()
            )
        };
        warn!("{message}");
        self.log_event("clock_step", None, None, &message, now);
        self.clock_step = Some(step);
        self.dirty = true;
    }

    /// After the wall clock went back to `now` (from `until`): each scheduled task's next
    /// fire becomes its first tick after `now` that no run has claimed (a claimed tick is
    /// never run twice). Returns how many next fires moved.
    pub(super) fn resume_schedules(&mut self, now: Instant, until: Instant) -> usize {
        let config = self.config.clone();
        let mut moved = 0;
        for spec in config.tasks.values() {
            let Some(schedule) = &spec.schedule else {
                continue;
            };
            let Some(old) = self.next_fire.get(&spec.name).copied() else {
                continue;
            };
            let claimed = match self.store.claimed_ticks(&spec.name, now, old.max(until)) {
                Ok(claimed) => claimed,
                Err(err) => {
                    warn!(task = %spec.name, "cannot read claimed ticks after a clock step: {err}");
                    continue;
                }
            };
            let next = schedule
                .ticks_after(now)
                .take_while(|tick| *tick < old)
                .take(100_000)
                .find(|tick| !claimed.contains(tick));
            if let Some(next) = next {
                let key = schedule_key(schedule);
                self.set_next_fire(&spec.name, Some(next), &key);
                moved += 1;
            }
        }
        moved
    }
}

/// Why a tick missed under misfire `skip` is skipped.
fn misfire_skip_reason(at_startup: bool) -> &'static str {
    if at_startup {
        "misfire policy skip: tick missed while the scheduler was down"
    } else {
        "misfire policy skip: tick missed while the scheduler could not fire it"
    }
}
