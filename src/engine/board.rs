//! The engine's published picture, for readers such as the HTTP layer.
//!
//! The engine rebuilds a [`Snapshot`] when something changed (at most every 50 ms, and on
//! every heartbeat) and swaps it in; readers clone an `Arc` and never touch the engine or
//! scan the run history. Success rates and durations come from the last
//! [`RECENT_RUNS`] finished runs per task that were not skipped ([`History`]), kept in
//! memory and seeded from the store at start-up.

use std::collections::VecDeque;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::config::Config;
use crate::model::{Attempt, Instant, RunId, RunState};

/// How many finished runs per task the statistics cover.
pub const RECENT_RUNS: usize = 100;

/// The latest snapshot, shared.
pub struct Board {
    current: RwLock<Option<Arc<Snapshot>>>,
    changes: tokio::sync::watch::Sender<u64>,
}

impl Default for Board {
    fn default() -> Self {
        Board {
            current: RwLock::new(None),
            changes: tokio::sync::watch::channel(0).0,
        }
    }
}

impl Board {
    /// A receiver that changes whenever something changed: a snapshot with news, or events
    /// appended (for event streams to wake up instead of polling).
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changes.subscribe()
    }

    /// The latest snapshot (`None` before the engine has started).
    pub fn snapshot(&self) -> Option<Arc<Snapshot>> {
        self.current
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in `snapshot`; wakes the subscribers only if `changed` (a snapshot that only
    /// proves the loop alive wakes no event stream).
    pub(super) fn publish(&self, snapshot: Snapshot, changed: bool) {
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(snapshot));
        if changed {
            self.touch();
        }
    }

    /// Wakes the subscribers: the engine wrote something they may want to read (events).
    pub(super) fn touch(&self) {
        self.changes.send_modify(|generation| *generation += 1);
    }
}

/// The scheduler at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    /// Increases with every publication.
    pub version: u64,
    /// When it was built.
    pub at: Instant,
    /// This engine's instance id.
    pub instance: String,
    /// When the engine started.
    pub started_at: Instant,
    /// The config in force.
    pub config: Arc<Config>,
    /// Attempts running.
    pub busy: usize,
    /// Runs waiting for a worker slot.
    pub queued: usize,
    /// Runs waiting for their next attempt.
    pub retry_waiting: usize,
    /// Every task.
    pub tasks: Vec<TaskSnapshot>,
    /// Every configured pool's occupancy on this instance, by name.
    pub pools: Vec<PoolSnapshot>,
    /// Set while the store refuses the engine's writes.
    pub store_fault: Option<super::StoreFault>,
    /// The last step of the wall clock the engine saw.
    pub clock_step: Option<super::ClockStep>,
    /// Cluster mode only: the offset from the database's clock, the lease, the tasks
    /// whose schedule here is not the cluster's.
    pub cluster: Option<super::ClusterView>,
    /// The last reload failed: the file on disk is not the running config.
    pub reload_failure: Option<super::ReloadFailure>,
}

impl Snapshot {
    /// Now on the engine's clock (database time in cluster mode), from the local clock.
    pub fn engine_now(&self) -> Instant {
        let local = chrono::Utc::now();
        match &self.cluster {
            Some(cluster) => local - cluster.offset,
            None => local,
        }
    }
}

/// One task at one instant.
#[derive(Debug, Clone)]
pub struct TaskSnapshot {
    /// Name.
    pub name: String,
    /// Paused (persisted).
    pub paused: bool,
    /// Paused by its circuit breaker (`max_consecutive_failures`), not by an operator.
    pub circuit_open: bool,
    /// Next fire, if scheduled and not paused.
    pub next_fire: Option<Instant>,
    /// Its running attempts.
    pub running: Vec<RunningRun>,
    /// Its latest finished run.
    pub last: Option<FinishedRun>,
    /// Statistics over the recent finished runs.
    pub stats: Stats,
}

/// A pool's occupancy (`[pools.<name>]`): its slots, the runs of its tasks running and
/// those queued.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolSnapshot {
    /// `[pools.<name>]`.
    pub name: String,
    /// `slots`.
    pub slots: usize,
    /// Runs of its tasks running (on this instance, for the engine).
    pub running: usize,
    /// Runs of its tasks queued, waiting for a slot (or a worker).
    pub waiting: usize,
}

impl PoolSnapshot {
    /// Every configured pool, counted from the pool each running and queued run's task
    /// names in `config`: `running` and `queued` give a task and how many of its runs.
    pub fn count<'a>(
        config: &Config,
        running: impl IntoIterator<Item = (&'a str, usize)>,
        queued: impl IntoIterator<Item = (&'a str, usize)>,
    ) -> Vec<PoolSnapshot> {
        let mut pools: Vec<PoolSnapshot> = config
            .pools
            .iter()
            .map(|(name, slots)| PoolSnapshot {
                name: name.clone(),
                slots: *slots,
                running: 0,
                waiting: 0,
            })
            .collect();
        if pools.is_empty() {
            return pools;
        }
        let mut add = |task: &str, n: usize, waiting: bool| {
            let pool = config.task(task).and_then(|spec| spec.pool.as_deref());
            if let Some(entry) = pool.and_then(|pool| pools.iter_mut().find(|p| p.name == pool)) {
                if waiting {
                    entry.waiting += n;
                } else {
                    entry.running += n;
                }
            }
        };
        for (task, n) in running {
            add(task, n, false);
        }
        for (task, n) in queued {
            add(task, n, true);
        }
        pools
    }
}

/// A running attempt.
#[derive(Debug, Clone)]
pub struct RunningRun {
    /// Run.
    pub run: RunId,
    /// Attempt.
    pub attempt: Attempt,
    /// When this attempt started.
    pub started_at: Instant,
}

/// A finished run, as the board remembers it.
#[derive(Debug, Clone, Copy)]
pub struct FinishedRun {
    /// Run.
    pub run: RunId,
    /// Terminal state.
    pub state: RunState,
    /// When it finished.
    pub finished_at: Instant,
    /// From first start to finish (none for skipped runs).
    pub duration: Option<Duration>,
}

/// Success rate and duration percentiles over the recent finished runs (skipped runs do
/// not count).
#[derive(Debug, Clone, Copy, Default)]
pub struct Stats {
    /// Runs counted.
    pub runs: usize,
    /// Share that succeeded, 0–1.
    pub success_rate: Option<f64>,
    /// Median duration of the successful ones.
    pub p50: Option<Duration>,
    /// 95th percentile.
    pub p95: Option<Duration>,
}

impl Stats {
    /// Statistics of a task's [`History`].
    pub fn of(history: &History) -> Stats {
        let counted = history.outcomes.len();
        if counted == 0 {
            return Stats::default();
        }
        let mut durations: Vec<u64> = history
            .outcomes
            .iter()
            .filter(|o| *o & SUCCEEDED != 0 && *o & !SUCCEEDED != NO_DURATION)
            .map(|o| o & !SUCCEEDED)
            .collect();
        let succeeded = history
            .outcomes
            .iter()
            .filter(|o| *o & SUCCEEDED != 0)
            .count();
        durations.sort_unstable();
        let percentile = |q: f64| -> Option<Duration> {
            let index = ((durations.len() as f64 - 1.0) * q).round() as usize;
            durations.get(index).map(|us| Duration::from_micros(*us))
        };
        Stats {
            runs: counted,
            success_rate: Some(succeeded as f64 / counted as f64),
            p50: percentile(0.50),
            p95: percentile(0.95),
        }
    }
}

/// Top bit of an outcome: the run succeeded. The rest: its duration in µs.
const SUCCEEDED: u64 = 1 << 63;
/// The duration bits of a run without a duration.
const NO_DURATION: u64 = SUCCEEDED - 1;

/// One task's recent history, compact: the last finished run in full, and for the
/// statistics one `u64` per run of the last [`RECENT_RUNS`] that were not skipped
/// (succeeded or not, duration in µs). A thousand tasks keep under 1 MiB.
#[derive(Debug, Clone, Default)]
pub struct History {
    last: Option<FinishedRun>,
    outcomes: VecDeque<u64>,
}

impl History {
    /// Records a finished run (oldest first).
    pub fn push(&mut self, run: FinishedRun) {
        self.last = Some(run);
        if run.state == RunState::Skipped {
            return;
        }
        if self.outcomes.capacity() == 0 {
            self.outcomes.reserve_exact(RECENT_RUNS);
        }
        if self.outcomes.len() == RECENT_RUNS {
            self.outcomes.pop_front();
        }
        let micros = run
            .duration
            .map_or(NO_DURATION, |d| (d.as_micros() as u64).min(NO_DURATION - 1));
        let succeeded = if run.state == RunState::Succeeded {
            SUCCEEDED
        } else {
            0
        };
        self.outcomes.push_back(succeeded | micros);
    }

    /// The last finished run, skipped or not.
    pub fn last(&self) -> Option<FinishedRun> {
        self.last
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn finished(state: RunState, millis: u64) -> FinishedRun {
        FinishedRun {
            run: RunId(1),
            state,
            finished_at: chrono::Utc::now(),
            duration: Some(Duration::from_millis(millis)),
        }
    }

    #[test]
    fn pool_counts_add_each_pooled_tasks_running_and_queued_runs_and_ignore_the_rest() {
        let text = "[pools.gpu]\nslots = 2\n[pools.cpu]\nslots = 4\n\
            [tasks.a]\nhandler = \"ping\"\npool = \"gpu\"\n\
            [tasks.b]\nhandler = \"ping\"\npool = \"gpu\"\n\
            [tasks.free]\nhandler = \"ping\"\n";
        let config = crate::config::parse(text, std::path::Path::new("scheduler.toml"))
            .unwrap_or_else(|errors| panic!("{errors}"));
        let pools = PoolSnapshot::count(
            &config,
            [("a", 1), ("b", 1), ("free", 1), ("gone", 1)],
            [("a", 2), ("b", 1), ("free", 5)],
        );
        let pool = |name: &str, slots, running, waiting| PoolSnapshot {
            name: name.into(),
            slots,
            running,
            waiting,
        };
        assert_eq!(pools, [pool("cpu", 4, 0, 0), pool("gpu", 2, 2, 3)]);
    }

    #[test]
    fn stats_count_successes_and_percentiles_of_successful_durations() {
        let mut history = History::default();
        for n in 1..=19 {
            history.push(finished(RunState::Succeeded, n * 10));
        }
        history.push(finished(RunState::Failed, 5_000));
        history.push(finished(RunState::Skipped, 0));
        let stats = Stats::of(&history);
        assert_eq!(stats.runs, 20, "skipped runs are not counted");
        assert_eq!(stats.success_rate, Some(0.95));
        assert_eq!(stats.p50, Some(Duration::from_millis(100)));
        assert_eq!(stats.p95, Some(Duration::from_millis(180)));
        assert_eq!(history.last().map(|r| r.state), Some(RunState::Skipped));
        assert_eq!(Stats::of(&History::default()).success_rate, None);
    }

    #[test]
    fn history_keeps_the_last_hundred_counted_runs_with_microsecond_durations() {
        let mut history = History::default();
        for n in 0..250u64 {
            let mut run = finished(RunState::Succeeded, 0);
            run.duration = Some(Duration::from_micros(1_000 + n));
            history.push(run);
        }
        let stats = Stats::of(&history);
        assert_eq!(stats.runs, RECENT_RUNS);
        // The last 100 durations are 1150 … 1249 µs: the median (index 49.5 → 50) is 1200.
        assert_eq!(stats.p50, Some(Duration::from_micros(1_200)));
        let mut unknown = finished(RunState::Succeeded, 0);
        unknown.duration = None;
        let mut only_unknown = History::default();
        only_unknown.push(unknown);
        let stats = Stats::of(&only_unknown);
        assert_eq!(
            (stats.runs, stats.success_rate, stats.p50),
            (1, Some(1.0), None)
        );
    }
}
