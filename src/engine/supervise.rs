//! Supervision on every heartbeat and poll: the instance's liveness, abort requests,
//! stalled workers, orphans, and runs queued by other processes.

use std::time::Duration;

use super::{blocking, Engine, Mode, Pending};
use crate::model::{RunId, RunState};
use crate::runner::StopReason;
use tracing::warn;

impl Engine {
    pub(super) fn on_heartbeat(&mut self) {
        let now = self.clock.now();
        self.publish(true);
        match self.store.heartbeat(&self.instance, now) {
            Ok(()) => self.store_ok(now),
            Err(err) => self.store_failed("recording the heartbeat", &err, now),
        }
        self.find_stalled();
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
        if self.mode == Mode::Serve {
            if let Err(err) = self.find_orphans(now) {
                warn!("cannot look for orphaned runs: {err}");
            }
        }
    }

    /// Adopts runs another process queued (the CLI), and drops from the queue runs that
    /// another process moved on (aborted while queued).
    pub(super) fn on_poll(&mut self) {
        let now = self.clock.now();
        let waiting = blocking(|| {
            self.store
                .ids_in_states(&[RunState::Queued, RunState::RetryWait])
        });
        // Oldest first: runs queued by other processes are admitted in FIFO order.
        let waiting_in_order: Vec<RunId> = match waiting {
            Ok(ids) => ids,
            Err(err) => {
                warn!("cannot poll for queued runs: {err}");
                return;
            }
        };
        let waiting: std::collections::HashSet<RunId> = waiting_in_order.iter().copied().collect();
        // Waiting runs another process ended (the CLI's abort): same follow-ups as ours.
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
        let known: std::collections::HashSet<RunId> = self
            .queue
            .iter()
            .map(|p| p.run)
            .chain(self.running.keys().copied())
            .chain(self.retry_pending.keys().copied())
            .collect();
        for run in waiting_in_order.iter().filter(|run| !known.contains(run)) {
            match self.store.run(*run) {
                Ok(Some(row)) if row.state == RunState::Queued => {
                    self.admit(Pending::from_row(&row), now)
                }
                Ok(_) => {}
                Err(err) => warn!(run = %run, "cannot read queued run: {err}"),
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
