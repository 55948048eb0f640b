//! Publishing the status board: a [`Snapshot`](super::Snapshot) built from the engine's
//! memory (never a history scan), at most every 50 ms and on every heartbeat.

use std::time::Duration;

use super::{
    board, Engine, FinishedRun, History, PoolSnapshot, RunningRun, Snapshot, Stats, TaskSnapshot,
};
use tracing::warn;

impl Engine {
    /// Publishes a new snapshot when something changed (at most every 50 ms) or when
    /// `force`d (every heartbeat, so readers can tell the loop is alive). Only a snapshot
    /// with news wakes the board's subscribers: whatever changes what the board shows sets
    /// `dirty` where it changes it, never the loop for every wake.
    pub(super) fn publish(&mut self, force: bool) {
        if !force && (!self.dirty || self.published_at.elapsed() < Duration::from_millis(50)) {
            return;
        }
        let now = self.clock.now();
        let config = self.config.clone();
        let tasks = config
            .tasks
            .values()
            .map(|spec| {
                let paused = self.paused.contains(spec.name.as_str());
                let recent = self.recent.get(&spec.name);
                TaskSnapshot {
                    name: spec.name.0.clone(),
                    paused,
                    circuit_open: paused && self.circuits.contains(spec.name.as_str()),
                    next_fire: if paused || !spec.enabled {
                        None
                    } else {
                        self.next_fire.get(&spec.name).copied()
                    },
                    running: self
                        .busy
                        .get(&spec.name)
                        .and_then(|run| self.running.get(run).map(|r| (run, r)))
                        .map(|(run, r)| RunningRun {
                            run: *run,
                            attempt: r.attempt,
                            started_at: r.attempt_started_at,
                        })
                        .into_iter()
                        .collect(),
                    last: recent.and_then(History::last),
                    stats: self.stats.get(&spec.name).copied().unwrap_or_default(),
                }
            })
            .collect();
        let pools = PoolSnapshot::count(
            &config,
            self.running.values().map(|r| (r.task.as_str(), 1)),
            self.queued_per_task.iter().map(|(t, n)| (t.as_str(), *n)),
        );
        self.version += 1;
        self.metrics.running.set(self.running.len() as i64);
        self.metrics.queued.set(self.queue.len() as i64);
        self.metrics.set_pools(&pools);
        let changed = self.dirty;
        self.board.publish(
            Snapshot {
                version: self.version,
                at: now,
                instance: self.instance.clone(),
                started_at: self.started_at,
                config,
                busy: self.running.len(),
                queued: self.queue.len(),
                retry_waiting: self.retry_due.len(),
                tasks,
                pools,
                store_fault: self.store_fault.clone(),
                clock_step: self.clock_step.clone(),
                cluster: self.clustered().then(|| self.cluster_view.clone()),
                reload_failure: self.reload_failure.clone(),
            },
            changed,
        );
        self.dirty = false;
        self.published_at = std::time::Instant::now();
    }

    /// Seeds the board's per-task history and pause flags from the store.
    pub(super) fn seed_board(&mut self) {
        match self.store.paused_tasks() {
            Ok(paused) => self.paused = paused,
            Err(err) => warn!("cannot read paused tasks: {err}"),
        }
        self.seed_circuits();
        let config = self.config.clone();
        for (index, name) in config.tasks.keys().enumerate() {
            if index % 256 == 255 && self.cancel.is_cancelled() {
                return;
            }
            let filter = crate::store::RunFilter {
                task: Some(name.0.clone()),
                limit: board::RECENT_RUNS,
                ..Default::default()
            };
            let Ok(rows) = self.store.runs(&filter) else {
                continue;
            };
            let mut recent = History::default();
            for finished in rows
                .iter()
                .rev()
                .filter(|row| row.state.is_terminal())
                .map(|row| FinishedRun {
                    run: row.id,
                    state: row.state,
                    finished_at: row.finished_at.unwrap_or(row.queued_at),
                    duration: row
                        .started_at
                        .zip(row.finished_at)
                        .and_then(|(start, end)| (end - start).to_std().ok()),
                })
            {
                recent.push(finished);
            }
            self.stats.insert(name.clone(), Stats::of(&recent));
            self.recent.insert(name.clone(), recent);
        }
    }
}
