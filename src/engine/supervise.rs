//! Supervision on every heartbeat and poll: the instance's liveness, abort requests,
//! stalled workers, orphans, and runs queued by other processes.

use std::collections::HashSet;
use std::time::Duration;

use super::{blocking, Engine, Mode, Pending};
use crate::model::{RunId, RunState, Trigger};
use crate::runner::StopReason;
use crate::store::RunRow;
use tracing::warn;

/// In a cluster, a run queued by another instance is left to it for this long: then it
/// is anyone's (its claimer has no free worker slot, or is gone).
const ADOPT_AFTER: Duration = Duration::from_secs(1);

impl Engine {
    pub(super) fn on_heartbeat(&mut self) {
        let now = self.clock.now();
        self.publish(true);
        match self.store.heartbeat(&self.instance, now) {
            Ok(()) => {
                self.store_ok(now);
                self.lease_renewed();
            }
            Err(err) => self.store_failed("recording the heartbeat", &err, now),
        }
        self.measure_offset();
        self.survey_cluster(now);
        self.find_stalled();
        self.check_abort_requests();
        if self.mode == Mode::Serve {
            if let Err(err) = self.find_orphans(now) {
                warn!("cannot look for orphaned runs: {err}");
            }
            self.check_deadlines(now);
        }
    }

    /// Stops this instance's running runs whose abort was requested (every heartbeat, and
    /// at once on an abort hint).
    pub(super) fn check_abort_requests(&mut self) {
        match self.store.abort_requests(&self.instance) {
            Ok(runs) => {
                for (run, reason) in runs {
                    self.stop_run(
                        run,
                        StopReason::Abort,
                        reason.as_deref().unwrap_or("abort requested"),
                    );
                }
            }
            Err(err) => warn!("cannot read abort requests: {err}"),
        }
    }

    /// Adopts runs another process queued (the CLI; in cluster mode, another instance),
    /// drops from the queue runs that another process moved on (aborted while queued,
    /// started elsewhere), and notes which tasks run on other instances.
    pub(super) fn on_poll(&mut self) {
        let now = self.clock.now();
        // Everything below follows from other processes' writes: with none since the last
        // poll (SQLite says so), there is nothing to read. A busy service's own commits
        // made every poll read hundreds of running rows to learn nothing (5 % of its CPU
        // at 1,000 runs/s).
        let version = match self.store.data_version() {
            Ok(Some(version)) if self.polled_version == Some(version) => return,
            Ok(version) => version,
            Err(err) => {
                warn!("cannot ask the store for other processes' writes: {err}");
                None
            }
        };
        let unfinished = match blocking(|| self.store.unfinished_runs()) {
            Ok(rows) => rows,
            Err(err) => {
                warn!("cannot poll for queued runs: {err}");
                return;
            }
        };
        self.polled_version = version;
        // Oldest first: runs queued by other processes are admitted in FIFO order.
        let waiting: HashSet<RunId> = unfinished
            .iter()
            .filter(|row| matches!(row.state, RunState::Queued | RunState::RetryWait))
            .map(|row| row.id)
            .collect();
        self.running_by_owner.clear();
        for row in unfinished
            .iter()
            .filter(|row| row.state == RunState::Running)
        {
            if let Some(owner) = &row.owner {
                self.running_by_owner
                    .entry(owner.clone())
                    .or_default()
                    .push(row.id);
            }
        }
        self.busy_elsewhere = unfinished
            .iter()
            .filter(|row| {
                row.state == RunState::Running
                    && row.owner.as_deref() != Some(self.instance.as_str())
            })
            .map(|row| (row.task.clone(), row.id))
            .collect();
        // Waiting runs another process ended or started: same follow-ups as ours.
        let mut ended = self.queue_retain(|p| waiting.contains(&p.run));
        let gone: Vec<RunId> = self
            .retry_pending
            .keys()
            .filter(|run| !waiting.contains(run))
            .copied()
            .collect();
        for run in gone {
            ended.extend(self.retry_pending.remove(&run));
            self.retry_due.retain(|(_, r)| *r != run);
        }
        for pending in ended {
            match self.store.run(pending.run) {
                Ok(Some(row)) if row.state.is_terminal() => {
                    self.end_waiting_run(&pending, row.state, None, now);
                }
                Ok(_) => {}
                Err(err) => {
                    warn!(run = %pending.run, "cannot read a run that left the queue: {err}")
                }
            }
        }
        let known: HashSet<RunId> = self
            .queue
            .iter()
            .map(|p| p.run)
            .chain(self.running.keys().copied())
            .chain(self.retry_pending.keys().copied())
            .collect();
        let clustered = self.clustered();
        // In a cluster, a task this instance's config does not have is another
        // instance's (a rolling change of config): its runs are left to them.
        let config = self.config.clone();
        let ours = |row: &&RunRow| !clustered || config.tasks.contains_key(&row.task);
        for row in unfinished
            .iter()
            .filter(|row| !known.contains(&row.id))
            .filter(ours)
        {
            match row.state {
                // In a cluster, the instance that claimed a run starts it; the others
                // take it only when it has waited (its claimer is busy or gone).
                RunState::Queued
                    if !clustered
                        || row.trigger == Trigger::Manual
                        || (now - row.queued_at).to_std().unwrap_or_default() > ADOPT_AFTER =>
                {
                    self.admit(Pending::from_row(row), now)
                }
                // A retry whose instance is gone: whoever reaches it first starts it.
                RunState::RetryWait if clustered => {
                    let at = row.next_attempt_at.unwrap_or(now);
                    self.retry_due.insert((at, row.id));
                    let mut pending = Pending::from_row(row);
                    pending.force = true;
                    self.retry_pending.insert(row.id, pending);
                }
                _ => {}
            }
        }
    }

    pub(super) fn stop_run(&mut self, run: RunId, reason: StopReason, why: &str) {
        if let Some(running) = self.running.get_mut(&run) {
            if running.stopping.is_none() {
                running.stopping = Some((reason, why.to_string()));
                let _ = running.stop.send(Some(reason));
            }
        }
    }

    /// Stops every built-in worker that has not reported for longer than
    /// `heartbeat_timeout` (at least three of its one-second heartbeats): a stopped
    /// (SIGSTOP) or hung worker would otherwise hold its slot until its timeout. Its group
    /// is killed and the attempt orphaned, then retried or failed by policy.
    pub(super) fn find_stalled(&mut self) {
        let limit = self
            .config
            .scheduler
            .heartbeat_timeout
            .max(Duration::from_secs(3));
        let stalled: Vec<(RunId, Duration)> = self
            .running
            .iter()
            .filter(|(_, r)| r.beats && r.stopping.is_none())
            .map(|(run, r)| (*run, r.last_report.elapsed()))
            .filter(|(_, silent)| *silent > limit)
            .collect();
        for (run, silent) in stalled {
            let why = format!(
                "no heartbeat from its worker for {} (heartbeat_timeout {})",
                humantime::format_duration(Duration::from_secs(silent.as_secs())),
                humantime::format_duration(limit)
            );
            warn!(run = %run, "stalled: {why}");
            self.stop_run(run, StopReason::Stalled, &why);
        }
    }
}
