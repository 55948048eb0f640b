//! The tick accounting: for each scheduled task, is every tick of its schedule between
//! its first and its last claimed tick accounted for — a run (whatever its end, `skipped`
//! included) or a tick counted as dropped in a `misfire` event — and is none claimed
//! twice? This is what the kill -9 storm checks after its kills (`bench/storm.sh`,
//! `tests/it/chaos.rs`), and what an operator can ask after any incident
//! (`turbosched audit`).
//!
//! The accounting is against the schedules of the config given: ticks of an expression
//! the task no longer has are not expected. Ticks older than `misfire_grace` that a
//! `misfire` event says were passed over have no count; such a task is reported as not
//! countable rather than as missing ticks.

use std::collections::{BTreeMap, HashMap};

use crate::config::Config;
use crate::model::Instant;
use crate::schedule::dropped_in_misfire_event;
use crate::store::{RunFilter, Store, StoreError};

/// The accounting of one task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskAudit {
    /// The task.
    pub task: String,
    /// Its first and last claimed tick in the window, if any.
    pub span: Option<(Instant, Instant)>,
    /// Ticks of its schedule from the first to the last claimed one.
    pub expected: usize,
    /// Scheduled and catch-up runs in that span.
    pub claimed: usize,
    /// Ticks with more than one run (the claim key makes this 0, and the audit proves it).
    pub doubled: usize,
    /// Ticks that `misfire` events say were neither run nor recorded.
    pub dropped: usize,
    /// Whether uncounted ticks older than `misfire_grace` were passed over.
    pub uncounted: bool,
    /// Scheduled ticks without a run and not dropped: `expected - (claimed - doubled) - dropped`.
    pub missing: i64,
    /// Runs of the task not in a terminal state (queued, waiting, running, orphaned):
    /// reported, not an error — a stopped service leaves its interrupted runs queued for
    /// the next start. After a clean stop none may be `running` or `orphaned`.
    pub unfinished: usize,
    /// Runs (of every trigger) by state.
    pub by_state: BTreeMap<&'static str, usize>,
}

/// The accounting of every scheduled task, and the database's own check.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Audit {
    /// One entry per scheduled task of the config.
    pub tasks: Vec<TaskAudit>,
    /// `PRAGMA integrity_check`: "ok" when the database is sound.
    pub integrity: String,
}

impl Audit {
    /// True when no tick is doubled or missing and the database is sound.
    pub fn ok(&self) -> bool {
        self.integrity == "ok" && self.tasks.iter().all(TaskAudit::ok)
    }
}

/// Accounts for the ticks of every scheduled task of `config` claimed at or after `since`.
pub fn audit(config: &Config, store: &Store, since: Instant) -> Result<Audit, StoreError> {
    let events = store.events_after(0, usize::MAX >> 1)?;
    let mut tasks = Vec::new();
    for spec in config.tasks.values() {
        let Some(schedule) = &spec.schedule else {
            continue;
        };
        let runs = store.runs(&RunFilter {
            task: Some(spec.name.0.clone()),
            since: Some(since),
            limit: usize::MAX >> 1,
            ..RunFilter::default()
        })?;
        let mut by_state: BTreeMap<&'static str, usize> = BTreeMap::new();
        let mut per_tick: HashMap<Instant, usize> = HashMap::new();
        let mut unfinished = 0;
        for run in &runs {
            *by_state.entry(run.state.as_str()).or_default() += 1;
            if !run.state.is_terminal() {
                unfinished += 1;
            }
            if run.trigger.is_tick() {
                *per_tick.entry(run.scheduled_for).or_default() += 1;
            }
        }
        let span = per_tick
            .keys()
            .min()
            .copied()
            .zip(per_tick.keys().max().copied());
        let (mut dropped, mut uncounted) = (0, false);
        for event in events.iter().filter(|e| {
            e.kind == "misfire" && e.task.as_deref() == Some(spec.name.as_str()) && e.at >= since
        }) {
            if let Some((count, older)) = dropped_in_misfire_event(&event.message) {
                dropped += count;
                uncounted |= older;
            }
        }
        let expected = match span {
            Some((first, last)) => schedule
                .ticks_after(first - chrono::TimeDelta::microseconds(1))
                .take_while(|tick| *tick <= last)
                .count(),
            None => 0,
        };
        let claimed: usize = per_tick.values().sum();
        let doubled = per_tick.values().filter(|n| **n > 1).count();
        let distinct = per_tick.len();
        let missing = if uncounted {
            0
        } else {
            expected as i64 - distinct as i64 - dropped as i64
        };
        tasks.push(TaskAudit {
            task: spec.name.0.clone(),
            span,
            expected,
            claimed,
            doubled,
            dropped,
            uncounted,
            missing,
            unfinished,
            by_state,
        });
    }
    Ok(Audit {
        tasks,
        integrity: store.integrity_check()?,
    })
}

impl TaskAudit {
    /// Whether every tick is accounted for and none is doubled.
    pub fn ok(&self) -> bool {
        self.doubled == 0 && self.missing == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::Trigger;
    use crate::store::NewRun;

    fn tick(second: i64) -> Instant {
        chrono::DateTime::from_timestamp(1_800_000_000 + second, 0).expect("in range")
    }

    fn claim(store: &Store, second: i64) {
        let run = NewRun {
            task: "every".into(),
            trigger: Trigger::Schedule,
            scheduled_for: tick(second),
            max_attempts: 1,
            force: false,
            downstream: false,
            cascade: None,
            params: None,
        };
        store.claim_fire(&run, tick(second), None).expect("claimed");
    }

    #[test]
    fn a_gap_between_claimed_ticks_is_missing_unless_a_misfire_event_counts_it() {
        let dir = tempfile::tempdir().unwrap();
        let config = crate::config::parse(
            "[tasks.every]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\n",
            &dir.path().join("scheduler.toml"),
        )
        .expect("valid");
        let store = Store::open(&dir.path().join("runs.db")).unwrap();
        for second in [0, 1, 3, 4] {
            claim(&store, second);
        }
        let since = tick(-10);
        let audit = audit(&config, &store, since).unwrap();
        let every = &audit.tasks[0];
        assert_eq!((every.expected, every.claimed, every.missing), (5, 4, 1));
        assert_eq!(every.unfinished, 4, "claimed runs are queued");
        assert!(!audit.ok());

        store
            .record_event(
                "misfire",
                Some("every"),
                None,
                "1 missed tick(s) not run under misfire policy run_once",
                tick(3),
            )
            .unwrap();
        let audit = super::audit(&config, &store, since).unwrap();
        assert_eq!((audit.tasks[0].dropped, audit.tasks[0].missing), (1, 0));
        assert_eq!(audit.tasks[0].doubled, 0);
        assert_eq!(audit.integrity, "ok");
    }
}
