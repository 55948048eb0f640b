//! Several instances on one database (PostgreSQL): the engine's part of it. The database
//! decides every claim (DESIGN.md, "Several instances"); here the engine keeps to
//! database time, watches its own lease, and says when its config and the cluster's
//! disagree.
//!
//! Promises:
//! - Due-ness is judged on the database's clock: the engine's clock is the local clock
//!   plus the offset from the database measured at start and at every heartbeat (the local
//!   clock only sizes timers), and the store holds a schedule row only when it is due by
//!   the server's own clock. An offset over [`OFFSET_WARNING`] is a warning in the log and
//!   `/health`. A reading with a slow round trip does not move the clock, a correction is
//!   not taken for a step of the wall clock, and a step of the host's clock makes the
//!   engine measure the offset again at once instead of planning schedules anew
//!   (`fire::watch_clock`): database time did not move.
//! - A lease: the instance's heartbeat renews it (one statement for the instance and the
//!   runs it owns); a peer reaps a run whose owner has not renewed for
//!   `heartbeat_timeout`. An instance that has not renewed for `heartbeat_timeout −
//!   kill_grace` (its monotonic clock: a stopped process notices at once when it
//!   resumes) fences itself before any other work: its children are stopped, it claims
//!   and starts nothing until a heartbeat goes through again, and any late result of a
//!   reaped attempt is refused by the store (`Fenced`).
//! - Config agreement: a task's schedule key is stored beside its next fire; an instance
//!   whose key differs from the stored one (another instance started or reloaded with
//!   another schedule for it) does not fire that task, and says so — a warning and a
//!   `config_mismatch` event when it starts disagreeing, the board (`/health` degraded,
//!   status) while it does.
//!
//! Nothing here runs on SQLite: one instance owns an embedded database, and a store that
//! cannot be written is not a reason to stop its children (see `faults.rs`).

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tracing::{error, info, warn};

use super::{Clock, Engine};
use crate::model::{Instant, RunId, TaskName};
use crate::runner::StopReason;
use crate::store::InstanceRow;

/// An offset between this host's clock and the database's larger than this is shown.
pub const OFFSET_WARNING: chrono::TimeDelta = chrono::TimeDelta::seconds(1);

/// A due schedule row another instance holds (it is firing it), or one not due yet by the
/// database's clock: look again after this.
pub(super) const HOLD_RETRY: Duration = Duration::from_millis(25);

/// A clock reading whose round trip took longer than this does not move the offset.
const NOISY_ROUND_TRIP: Duration = Duration::from_millis(200);

/// Offsets that differ by less than this are the same offset (a round trip's noise).
const OFFSET_NOISE: chrono::TimeDelta = chrono::TimeDelta::milliseconds(20);

/// The local clock corrected by the measured offset from the database's clock.
pub struct DatabaseClock {
    local: Arc<dyn Clock>,
    offset_micros: AtomicI64,
}

impl DatabaseClock {
    fn new(local: Arc<dyn Clock>) -> DatabaseClock {
        DatabaseClock {
            local,
            offset_micros: AtomicI64::new(0),
        }
    }

    fn offset(&self) -> chrono::TimeDelta {
        chrono::TimeDelta::microseconds(self.offset_micros.load(Ordering::Relaxed))
    }

    fn set_offset(&self, offset: chrono::TimeDelta) {
        let micros = offset.num_microseconds().unwrap_or(0);
        self.offset_micros.store(micros, Ordering::Relaxed);
    }
}

impl Clock for DatabaseClock {
    fn now(&self) -> Instant {
        self.local.now() + self.offset()
    }
}

/// What this instance knows of the cluster.
pub(super) struct Cluster {
    clock: Arc<DatabaseClock>,
    /// The last time a heartbeat renewed the lease (monotonic).
    renewed: std::time::Instant,
    /// The lease lapsed: children stopped, no claims or starts until renewed.
    fenced: bool,
}

/// The cluster as the board shows it.
#[derive(Debug, Clone, Default)]
pub struct ClusterView {
    /// This host's clock minus the database's (positive: the host is ahead).
    pub offset: chrono::TimeDelta,
    /// The instance could not renew its lease and stopped its work.
    pub fenced: bool,
    /// Tasks whose stored schedule is another config's: task → the stored key.
    pub conflicts: BTreeMap<String, ConfigConflict>,
    /// The live instances (as of the last heartbeat) and the runs each is running.
    pub instances: Vec<(InstanceRow, Vec<RunId>)>,
}

/// A task this instance does not fire because the cluster's schedule for it is another.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigConflict {
    /// This instance's schedule key (`expression @ zone`).
    pub ours: String,
    /// The one stored by the instance that last started or reloaded with it.
    pub stored: String,
}

impl ClusterView {
    /// True when the offset from the database's clock is over [`OFFSET_WARNING`].
    pub fn offset_too_large(&self) -> bool {
        self.offset.abs() > OFFSET_WARNING
    }
}

impl Engine {
    /// Joins the cluster when the store has a clock of its own (PostgreSQL): the engine's
    /// clock becomes database time. Called once, before anything reads the clock.
    pub(super) fn join_cluster(&mut self) {
        match self.store.database_now() {
            Ok(None) => return,
            Ok(Some(_)) => {}
            // Only a database with a clock of its own fails to tell it: measure again at
            // the next heartbeat.
            Err(err) => warn!("cannot read the database's clock: {err}"),
        }
        let clock = Arc::new(DatabaseClock::new(self.clock.clone()));
        self.clock = clock.clone();
        self.cluster = Some(Cluster {
            clock,
            renewed: std::time::Instant::now(),
            fenced: false,
        });
        self.measure_offset_now(true);
        self.wall = super::faults::WallWatch::new(self.clock.now());
        self.started_at = self.clock.now();
        info!(
            instance = %self.instance,
            "cluster mode: due ticks and leases on the database's clock"
        );
    }

    /// Measures this host's offset from the database's clock (the round trip's midpoint)
    /// and corrects the engine's clock by it; a reading whose round trip took longer than
    /// [`NOISY_ROUND_TRIP`] is too uncertain to move the clock by (a loaded machine).
    ///
    /// A correction larger than a step is a step of the host's clock that came between
    /// this wake's look at the wall clock (`watch_clock`) and this reading: said as one.
    pub(super) fn measure_offset(&mut self) {
        let Some(moved) = self.measure_offset_now(false) else {
            return;
        };
        if moved.abs() > super::faults::STEP_TOLERANCE {
            let message = format!(
                "the host's clock moved {} against the database's on this host: due ticks follow the database's clock; its offset was measured again",
                humantime::format_duration(Duration::from_millis(
                    moved.num_milliseconds().unsigned_abs()
                ))
            );
            warn!("{message}");
            let now = self.clock.now();
            self.log_event("clock_step", None, None, &message, now);
        }
    }

    /// [`Engine::measure_offset`]; `force` takes the reading whatever its round trip (at
    /// start, and after a step of the host's clock, when the old offset is wrong anyway).
    /// Answers how far the correction moved (host minus database), if it did.
    pub(super) fn measure_offset_now(&mut self, force: bool) -> Option<chrono::TimeDelta> {
        let Some(cluster) = &self.cluster else {
            return None;
        };
        let started = std::time::Instant::now();
        let before = cluster.clock.local.now();
        let reading = self.store.database_now();
        let after = cluster.clock.local.now();
        if !force && started.elapsed() > NOISY_ROUND_TRIP {
            return None;
        }
        let database = match reading {
            Ok(Some(database)) => database,
            Ok(None) => return None,
            Err(err) => {
                warn!("cannot read the database's clock: {err}");
                return None;
            }
        };
        let local = before + (after - before) / 2;
        // Host minus database: the correction is its opposite.
        let offset = local - database;
        let old = -cluster.clock.offset();
        if (offset - old).abs() < OFFSET_NOISE {
            return None;
        }
        cluster.clock.set_offset(-offset);
        // The engine's clock moved by the correction, not by a step of the wall clock.
        self.wall = super::faults::WallWatch::new(self.clock.now());
        let was_large = self.cluster_view.offset_too_large();
        self.cluster_view.offset = offset;
        self.dirty = true;
        let size = humantime::format_duration(Duration::from_millis(
            offset.num_milliseconds().unsigned_abs(),
        ));
        let way = if offset < chrono::TimeDelta::zero() {
            "behind"
        } else {
            "ahead of"
        };
        if self.cluster_view.offset_too_large() {
            warn!("this host's clock is {size} {way} the database's: due ticks and leases follow the database's clock; fix the host's time sync");
        } else if was_large {
            info!("this host's clock is within {size} of the database's again");
        }
        Some(offset - old)
    }

    /// Before any other work of a wake: an instance whose lease may have been reaped fences
    /// itself — stops its children and claims nothing until a heartbeat renews the lease.
    pub(super) fn check_lease(&mut self) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        if cluster.fenced {
            return;
        }
        let limit = self
            .config
            .scheduler
            .heartbeat_timeout
            .saturating_sub(self.config.scheduler.kill_grace);
        let silent = cluster.renewed.elapsed();
        if silent <= limit {
            return;
        }
        cluster.fenced = true;
        self.cluster_view.fenced = true;
        self.dirty = true;
        let why = format!(
            "this instance has not renewed its lease for {} (heartbeat_timeout {} minus kill_grace {}): another instance may have taken its runs",
            humantime::format_duration(Duration::from_secs(silent.as_secs())),
            humantime::format_duration(self.config.scheduler.heartbeat_timeout),
            humantime::format_duration(self.config.scheduler.kill_grace),
        );
        error!("fenced: {why}; stopping its {} attempt(s), claiming nothing until the lease is renewed", self.running.len());
        let now = self.clock.now();
        self.log_event("instance_fenced", None, None, &why, now);
        let runs: Vec<RunId> = self.running.keys().copied().collect();
        for run in runs {
            self.stop_run(run, StopReason::Fenced, "this instance lost its lease");
        }
    }

    /// A heartbeat went through: the lease is renewed, and a fenced instance works again.
    pub(super) fn lease_renewed(&mut self) {
        let Some(cluster) = &mut self.cluster else {
            return;
        };
        cluster.renewed = std::time::Instant::now();
        if cluster.fenced {
            cluster.fenced = false;
            self.cluster_view.fenced = false;
            self.dirty = true;
            info!("lease renewed: claiming and starting runs again");
            let now = self.clock.now();
            self.log_event(
                "instance_unfenced",
                None,
                None,
                "lease renewed: claiming and starting runs again",
                now,
            );
        }
    }

    /// Every heartbeat in cluster mode: the live instances and the runs each is running,
    /// for the board (`/scheduler/status`, the dashboard).
    pub(super) fn survey_cluster(&mut self, now: Instant) {
        if self.cluster.is_none() {
            return;
        }
        let live = match self
            .store
            .live_instances(self.config.scheduler.heartbeat_timeout, now)
        {
            Ok(live) => live,
            Err(err) => {
                warn!("cannot read the live instances: {err}");
                return;
            }
        };
        self.cluster_view.instances = live
            .into_iter()
            .filter(|row| row.serving)
            .map(|row| {
                let runs = self
                    .running_by_owner
                    .get(&row.id)
                    .cloned()
                    .unwrap_or_default();
                (row, runs)
            })
            .collect();
        self.dirty = true;
    }

    /// False while this instance is fenced: it claims and starts nothing.
    pub(super) fn may_claim(&self) -> bool {
        !self.cluster.as_ref().is_some_and(|c| c.fenced)
    }

    /// True in cluster mode (a database several instances share).
    pub(super) fn clustered(&self) -> bool {
        self.cluster.is_some()
    }

    /// The stored schedule of `task` is another config's: this instance does not fire it.
    pub(super) fn config_disagrees(
        &mut self,
        task: &TaskName,
        ours: &str,
        stored: &str,
        now: Instant,
    ) {
        let conflict = ConfigConflict {
            ours: ours.to_string(),
            stored: stored.to_string(),
        };
        if self.cluster_view.conflicts.get(task.as_str()) == Some(&conflict) {
            return;
        }
        let message = format!(
            "not firing {task}: its schedule here is \"{ours}\", but the cluster's (stored by the instance that last started or reloaded with it) is \"{stored}\"; give every instance the same config"
        );
        warn!(task = %task, "{message}");
        self.log_event("config_mismatch", Some(task.as_str()), None, &message, now);
        self.cluster_view
            .conflicts
            .insert(task.as_str().to_string(), conflict);
        self.dirty = true;
    }

    /// `task`'s stored schedule is ours (again).
    pub(super) fn config_agrees(&mut self, task: &TaskName) {
        if self.cluster_view.conflicts.remove(task.as_str()).is_some() {
            info!(task = %task, "the cluster's schedule for {task} is this instance's again: firing it");
            self.dirty = true;
        }
    }
}
