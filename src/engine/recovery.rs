//! What the engine does when it (re)starts, and on every heartbeat: find runs whose
//! owner is gone, and rebuild its queue and timers from the store.
//!
//! Promise: a `running` run is orphaned when its owner instance stopped, when the owner
//! ran on this host and its process is gone, or when its heartbeat is older than
//! `heartbeat_timeout`. Its process group is killed if still alive (after checking that
//! the process really is that run's child), then it is queued again if attempts remain,
//! else failed. Nothing is left `running` or `orphaned`.

use std::time::Duration;

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::unistd::Pid;
use tracing::{info, warn};

use super::{hostname, ClockStep, Engine, Pending};
use crate::model::{Attempt, Instant, RunState, TaskName};
use crate::schedule::Schedule;
use crate::store::{Change, Move, RunRow, StoreError};
use crate::tasklog::Level;

/// The string stored beside `next_fire_at`: a change of expression or zone invalidates it.
pub(super) fn schedule_key(schedule: &Schedule) -> String {
    format!("{} @ {}", schedule.expr(), schedule.timezone())
}

impl Engine {
    /// Start-up: orphans first, then adopt queued and waiting runs.
    pub(super) fn recover(&mut self, now: Instant) -> Result<(), StoreError> {
        self.find_orphans(now)?;
        for row in self.store.unfinished_runs()? {
            match row.state {
                RunState::Queued => self.admit(Pending::from_row(&row), now),
                RunState::RetryWait => {
                    let at = row.next_attempt_at.unwrap_or(now);
                    self.retry_due.insert((at, row.id));
                    let mut pending = Pending::from_row(&row);
                    pending.force = true;
                    self.retry_pending.insert(row.id, pending);
                }
                _ => {}
            }
        }
        Ok(())
    }

    /// Start-up: each scheduled task resumes from its persisted next fire; ticks missed
    /// while the service was down go through the task's misfire policy.
    pub(super) fn plan_startup_fires(&mut self, now: Instant) {
        let config = self.config.clone();
        let mut due = Vec::new();
        let mut behind = chrono::TimeDelta::zero();
        // New next fires are written together: one transaction, not one per task.
        let mut fresh: Vec<(TaskName, Option<Instant>, String)> = Vec::new();
        let mut states = self.store.task_states().unwrap_or_else(|err| {
            warn!("cannot read the tasks' stored next fires: {err}");
            Default::default()
        });
        for (index, spec) in config.tasks.values().enumerate() {
            if index % 256 == 255 && self.cancel.is_cancelled() {
                return;
            }
            let Some(schedule) = &spec.schedule else {
                continue;
            };
            let key = schedule_key(schedule);
            let state = states.remove(&spec.name).unwrap_or_default();
            match (state.next_fire_at, state.schedule) {
                (Some(next), Some(stored)) if stored == key && spec.due_at(next) <= now => {
                    due.push((spec.name.clone(), next));
                }
                (Some(next), Some(stored)) if stored == key => {
                    self.next_fire.insert(spec.name.clone(), next);
                    // A stored next fire beyond the first tick after now was computed on a
                    // wall clock that is now behind: it was stepped back while we were down.
                    if let Some(first) = schedule.next_after(now).filter(|first| *first < next) {
                        behind = behind.max(next - first);
                    }
                }
                _ => {
                    let next = schedule.next_after(now);
                    if let Some(at) = next {
                        self.next_fire.insert(spec.name.clone(), at);
                    }
                    fresh.push((spec.name.clone(), next, key));
                }
            }
        }
        if !fresh.is_empty() {
            self.dirty = true;
            // Started, never written over a peer: another instance may have started a
            // schedule, and fired from it, since the read above (a cluster starting at
            // once). Its next fire stands; a next fire moved back would plan ticks it
            // claimed already as missed.
            let written = self.store.batch(|batch| {
                fresh
                    .iter()
                    .map(|(task, next, key)| batch.start_schedule(task, *next, Some(key)))
                    .collect::<Result<Vec<_>, _>>()
            });
            match written {
                Ok(stored) => {
                    for ((task, next, _), stored) in fresh.iter().zip(stored) {
                        if stored == *next {
                            continue;
                        }
                        match stored {
                            Some(at) => {
                                self.next_fire.insert(task.clone(), at);
                                if self.due_at(task, at) <= now {
                                    due.push((task.clone(), at));
                                }
                            }
                            None => {
                                self.next_fire.remove(task);
                            }
                        }
                    }
                }
                Err(err) => warn!(tasks = fresh.len(), "cannot store the next fires: {err}"),
            }
        }
        // A step back of this host's clock while it was down. In a cluster the engine's
        // clock is the database's, and a next fire a peer stored ahead of this host's
        // clock is the peer's advance, not a step.
        if behind > chrono::TimeDelta::zero() && !self.clustered() {
            let step = ClockStep {
                at: now,
                by: -behind,
                until: now + behind,
            };
            let moved = self.resume_schedules(now, step.until);
            let message = format!(
                "the wall clock is up to {} behind the stored next fires (stepped back while the service was down?): ticks already claimed are not run again; {moved} schedule(s) resume from the new wall time",
                humantime::format_duration(Duration::from_secs(behind.num_seconds().max(0) as u64))
            );
            warn!("{message}");
            self.log_event("clock_step", None, None, &message, now);
            self.clock_step = Some(step);
        }
        if !due.is_empty() {
            self.fire_due(&due, now, true);
        }
    }

    /// Orphans every `running` run whose owner is gone, and settles `orphaned` ones.
    pub(super) fn find_orphans(&mut self, now: Instant) -> Result<(), StoreError> {
        for row in self.store.unfinished_runs()? {
            match row.state {
                RunState::Running if row.owner.as_deref() != Some(self.instance.as_str()) => {
                    if let Some(reason) = self.orphan_reason(&row, now)? {
                        self.orphan(&row, &reason, now);
                    }
                }
                RunState::Running if !self.running.contains_key(&row.id) => {
                    // Ours in the store but not in memory: cannot happen unless a start
                    // failed half-way; the run is an orphan all the same.
                    self.orphan(&row, "attempt lost by its own engine", now);
                }
                RunState::Orphaned => self.settle_orphan(&row, "orphaned earlier", now),
                _ => {}
            }
        }
        Ok(())
    }

    fn orphan_reason(&self, row: &RunRow, now: Instant) -> Result<Option<String>, StoreError> {
        let owner = row.owner.clone().unwrap_or_default();
        let Some(instance) = self.store.instance(&owner)? else {
            return Ok(Some(format!("owner instance {owner:?} is unknown")));
        };
        if instance.stopped_at.is_some() {
            return Ok(Some(format!("owner instance {owner} stopped")));
        }
        if instance.host == hostname() && !process_alive(instance.pid) {
            return Ok(Some(format!(
                "owner instance {owner} (pid {}) is gone",
                instance.pid
            )));
        }
        let timeout = self.config.scheduler.heartbeat_timeout;
        let last = row
            .heartbeat_at
            .unwrap_or(row.queued_at)
            .max(instance.heartbeat_at);
        let silent = (now - last).to_std().unwrap_or(Duration::ZERO);
        if silent > timeout {
            return Ok(Some(format!(
                "no heartbeat from owner instance {owner} for {}",
                humantime::format_duration(Duration::from_secs(silent.as_secs()))
            )));
        }
        Ok(None)
    }

    fn orphan(&mut self, row: &RunRow, reason: &str, now: Instant) {
        warn!(run = %row.id, task = %row.task, "orphaned: {reason}");
        self.metrics.orphans.inc();
        if let Some(pid) = row.pid {
            kill_orphan_group(row, pid);
        }
        self.logs.task(row.task.as_str()).line(
            row.id,
            row.attempt,
            Level::Warn,
            &format!("orphaned: {reason}"),
        );
        let change = Change {
            reason: Some(format!("orphaned: {reason}")),
            error: Some(format!(
                "run {} ({}, attempt {}): orphaned: {reason}",
                row.id, row.task, row.attempt
            )),
            ..Change::default()
        };
        if self.apply(
            &Move {
                run: row.id,
                attempt: row.attempt,
                from: RunState::Running,
                to: RunState::Orphaned,
            },
            &change,
            now,
        ) {
            self.settle_orphan(row, reason, now);
        }
    }

    /// `orphaned → queued` while attempts remain, else `orphaned → failed`.
    pub(super) fn settle_orphan(&mut self, row: &RunRow, reason: &str, now: Instant) {
        let attempt: Attempt = row.attempt;
        if attempt.0 < row.max_attempts && self.config.tasks.contains_key(&row.task) {
            let change = Change {
                reason: Some(format!(
                    "retrying after orphaned attempt {attempt}: {reason}"
                )),
                ..Change::default()
            };
            if self.apply(
                &Move {
                    run: row.id,
                    attempt,
                    from: RunState::Orphaned,
                    to: RunState::Queued,
                },
                &change,
                now,
            ) {
                info!(run = %row.id, task = %row.task, "orphaned run queued again");
                let mut pending = Pending::from_row(row);
                pending.state = RunState::Queued;
                // Its dependency check passed when it first started.
                pending.force = true;
                self.admit(pending, now);
            }
        } else {
            let change = Change {
                error: Some(format!(
                    "run {} ({}, attempt {attempt}): orphaned ({reason}) with no attempts left",
                    row.id, row.task
                )),
                ..Change::default()
            };
            if self.apply(
                &Move {
                    run: row.id,
                    attempt,
                    from: RunState::Orphaned,
                    to: RunState::Failed,
                },
                &change,
                now,
            ) {
                self.note_finished(&row.task, row.id, RunState::Failed, None, now);
                if let Some(root) = row.cascade {
                    self.continue_cascade(root, now);
                }
            }
        }
    }
}

fn process_alive(pid: i64) -> bool {
    let Ok(pid) = i32::try_from(pid) else {
        return false;
    };
    !matches!(kill(Pid::from_raw(pid), None), Err(Errno::ESRCH))
}

/// Kills what is left of an orphaned attempt's process group. The leader is checked to be
/// that run's child (its environment names the run); if the leader is gone, Linux does not
/// reuse its pid while the group exists, so the group id still names the old group.
fn kill_orphan_group(row: &RunRow, pid: i64) {
    let Ok(pid) = i32::try_from(pid) else { return };
    if pid <= 1 {
        return;
    }
    let environ = std::fs::read(format!("/proc/{pid}/environ"));
    let ours = match environ {
        Ok(bytes) => {
            let marker = format!("TURBOSCHED_RUN_ID={}", row.id);
            bytes
                .split(|b| *b == 0)
                .any(|entry| entry == marker.as_bytes())
        }
        Err(_) => true,
    };
    if ours {
        match killpg(Pid::from_raw(pid), Signal::SIGKILL) {
            Ok(()) => info!(run = %row.id, pid, "killed the orphaned attempt's process group"),
            Err(Errno::ESRCH) => {}
            Err(err) => warn!(run = %row.id, pid, "cannot kill orphaned process group: {err}"),
        }
    } else {
        warn!(run = %row.id, pid, "pid now belongs to another process; not killing it");
    }
}
