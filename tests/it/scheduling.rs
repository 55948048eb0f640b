//! Cron firing by the service: on the tick, once per tick, and missed ticks after downtime.

use std::collections::BTreeSet;
use std::time::Duration;

use chrono::Timelike;
use turbosched::model::{RunState, Trigger};

use crate::support::*;

#[test]
fn serve_fires_a_one_second_schedule_with_scheduled_for_on_the_tick() {
    let sandbox = Sandbox::new("[tasks.tick]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\n");
    let service = sandbox.serve();
    let runs = wait_until(
        "4 scheduled runs to succeed",
        Duration::from_secs(20),
        || {
            let runs = sandbox.runs_of("tick");
            (runs
                .iter()
                .filter(|r| r.state == RunState::Succeeded)
                .count()
                >= 4)
                .then_some(runs)
        },
    );
    service.stop();
    let done: Vec<_> = runs
        .iter()
        .filter(|r| r.state == RunState::Succeeded)
        .collect();
    for run in &done {
        assert_eq!(run.trigger, Trigger::Schedule);
        assert_eq!(
            run.scheduled_for.nanosecond(),
            0,
            "nominal time is the tick itself: {}",
            run.scheduled_for
        );
        let lag = run.started_at.unwrap() - run.scheduled_for;
        assert!(
            lag >= chrono::Duration::zero(),
            "never started before its tick: {lag}"
        );
        assert!(
            lag < chrono::Duration::milliseconds(900),
            "started within the tick's second: {lag}"
        );
    }
    for pair in done.windows(2) {
        assert_eq!(
            (pair[1].scheduled_for - pair[0].scheduled_for).num_seconds(),
            1,
            "consecutive ticks, none skipped"
        );
    }
}

/// Serves until every task has run at least once, stops, waits until at least three
/// ticks have passed on the wall clock, and serves again.
fn downtime(sandbox: &Sandbox, tasks: &[&str]) -> chrono::DateTime<chrono::Utc> {
    let service = sandbox.serve();
    wait_until("every task to fire once", Duration::from_secs(20), || {
        tasks
            .iter()
            .all(|t| !sandbox.runs_of(t).is_empty())
            .then_some(())
    });
    service.stop();
    let stopped = chrono::Utc::now();
    wait_until("three ticks of downtime", Duration::from_secs(10), || {
        (chrono::Utc::now() - stopped >= chrono::Duration::milliseconds(3200)).then_some(())
    });
    stopped
}

#[test]
fn after_downtime_each_misfire_policy_does_what_it_says() {
    let sandbox = Sandbox::new(
        r#"
[defaults]
handler = "ping"
schedule = "* * * * * *"
misfire_grace = "1h"
overlap = "queue"
[tasks.once]
misfire = "run_once"
[tasks.skipper]
misfire = "skip"
[tasks.every]
misfire = "run_all"
"#,
    );
    let stopped = downtime(&sandbox, &["once", "skipper", "every"]);
    let before: Vec<usize> = ["once", "skipper", "every"]
        .iter()
        .map(|t| sandbox.runs_of(t).len())
        .collect();
    let service = sandbox.serve();
    let restarted = chrono::Utc::now();
    wait_until("catch-up runs to finish", Duration::from_secs(20), || {
        let caught_up = sandbox
            .runs_of("every")
            .iter()
            .any(|r| r.trigger == Trigger::Schedule && r.scheduled_for > restarted);
        let settled = ["once", "skipper", "every"].iter().all(|t| {
            sandbox
                .runs_of(t)
                .iter()
                .all(|r| r.state.is_terminal() || r.scheduled_for > restarted)
        });
        (caught_up && settled).then_some(())
    });
    service.stop();

    let catchups = |task: &str, index: usize| -> Vec<_> {
        sandbox.runs_of(task)[before[index]..]
            .iter()
            .filter(|r| r.trigger == Trigger::Catchup)
            .cloned()
            .collect()
    };
    let once = catchups("once", 0);
    assert_eq!(once.len(), 1, "run_once: exactly one catch-up run");
    assert_eq!(once[0].state, RunState::Succeeded);

    let skipped = catchups("skipper", 1);
    assert!(
        skipped.len() >= 3,
        "skip: every missed tick recorded ({})",
        skipped.len()
    );
    assert!(skipped.iter().all(|r| r.state == RunState::Skipped));
    assert!(skipped[0]
        .reason
        .as_deref()
        .unwrap_or("")
        .starts_with("misfire policy skip"));

    let every = catchups("every", 2);
    assert!(
        every.len() >= 3,
        "run_all: every missed tick runs ({})",
        every.len()
    );
    assert!(every.iter().all(|r| r.state == RunState::Succeeded));
    assert!(every
        .iter()
        .all(|r| r.scheduled_for > stopped - chrono::Duration::seconds(1)
            && r.scheduled_for < restarted));

    // run_all loses no tick: from the first run to the last, every second is there once.
    let ticks: Vec<_> = sandbox
        .runs_of("every")
        .iter()
        .map(|r| r.scheduled_for)
        .collect();
    let unique: BTreeSet<_> = ticks.iter().collect();
    assert_eq!(unique.len(), ticks.len(), "no tick doubled");
    let span = (*ticks.iter().max().unwrap() - *ticks.iter().min().unwrap()).num_seconds() as usize;
    assert_eq!(ticks.len(), span + 1, "no tick lost across the downtime");
}

#[test]
fn a_paused_task_keeps_its_schedule_but_does_not_fire() {
    let sandbox = Sandbox::new("[tasks.tick]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\n[tasks.other]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\n");
    sandbox
        .store()
        .set_paused(&"tick".into(), true, chrono::Utc::now())
        .unwrap();
    let service = sandbox.serve();
    wait_until(
        "the other task to fire 3 times",
        Duration::from_secs(20),
        || (sandbox.runs_of("other").len() >= 3).then_some(()),
    );
    service.stop();
    assert!(sandbox.runs_of("tick").is_empty());
    let state = sandbox.store().task_state(&"tick".into()).unwrap();
    assert!(
        state.next_fire_at.is_some(),
        "its next fire is still tracked"
    );
}
