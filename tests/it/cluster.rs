//! Cluster mode: several `turbosched serve` processes, each in its own folder, sharing one
//! PostgreSQL database (the real server on 127.0.0.1:5432; a database of its own per
//! test, dropped after). The database decides every claim: every (task, tick) runs once
//! whichever instance fires it, a dead or stopped instance's runs move to a live one
//! after its lease, a late result of a reaped attempt is refused, an instance whose
//! config differs for a task does not fire it, and a host clock far from the database's
//! neither fires early nor twice.

use std::collections::{BTreeMap, HashMap};
use std::time::Duration;

use turbosched::model::{RunId, RunState};
use turbosched::store::{RunRow, Store};

use serde_json::json;

use crate::faults::{get_json, post_json};
use crate::support::*;

/// A database of its own on the test server (`TURBOSCHED_TEST_POSTGRES`, default
/// `postgres://postgres@127.0.0.1:5432`), dropped with `WITH (FORCE)` when dropped.
pub struct Database {
    server: String,
    name: String,
}

impl Database {
    pub fn create() -> Database {
        let server = std::env::var("TURBOSCHED_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string());
        let name = format!("ts_it_{}", uuid::Uuid::new_v4().simple());
        sql_on(
            &format!("{server}/postgres"),
            &format!("CREATE DATABASE {name}"),
        );
        Database { server, name }
    }

    pub fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }

    /// Runs `sql` on this database.
    pub fn sql(&self, sql: &str) {
        sql_on(&self.url(), sql);
    }

    pub fn store(&self) -> Store {
        Store::open(std::path::Path::new(&self.url())).expect("open the cluster's store")
    }

    /// Every run of `task`, oldest first.
    pub fn runs_of(&self, task: &str) -> Vec<RunRow> {
        runs_of(&self.store(), task)
    }

    pub fn events_of_kind(&self, kind: &str) -> Vec<turbosched::store::EventRow> {
        self.store()
            .events_after(0, 1_000_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.kind == kind)
            .collect()
    }
}

impl Drop for Database {
    fn drop(&mut self) {
        sql_on(
            &format!("{}/postgres", self.server),
            &format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name),
        );
    }
}

pub(crate) fn sql_on(url: &str, sql: &str) {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        let driver = tokio::spawn(connection);
        client
            .batch_execute(sql)
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
        drop(client);
        let _ = driver.await;
    });
}

/// A config for one instance on the database at `url`: fast leases (3 s), its own
/// folders, `max_workers`, `tasks`.
pub(crate) fn config_on(url: &str, max_workers: usize, tasks: &str) -> String {
    format!(
        r#"
[scheduler]
timezone = "UTC"
database = "{url}"
max_workers = {max_workers}
heartbeat_interval = "200ms"
heartbeat_timeout = "3s"
kill_grace = "500ms"
shutdown_grace = "1s"

[api]
bind = "127.0.0.1:0"

{tasks}
"#
    )
}

/// A config for one instance of the cluster: fast leases, its own folders, `tasks`.
pub fn instance_config(database: &Database, tasks: &str) -> String {
    config_on(&database.url(), 16, tasks)
}

/// One instance: a folder with its config, on the cluster's database.
pub fn instance(database: &Database, tasks: &str) -> Sandbox {
    Sandbox::with_config_on(&instance_config(database, tasks), &database.url())
}

/// Queues a run of `task` through `sandbox`'s command line and waits until a child
/// runs it; returns the run as it is then.
fn start_run(database: &Database, sandbox: &Sandbox, task: &str) -> RunRow {
    let (code, body) = sandbox.cli_json(&["run", task, "--json"]);
    assert_eq!(code, 0, "{body}");
    let run = run_id(&body);
    wait_until("the run's child started", Duration::from_secs(20), || {
        let row = database.store().run(run).ok()??;
        (row.state == RunState::Running && row.pid.is_some()).then_some(row)
    })
}

/// Every run, grouped by (task, tick) for the scheduled and catch-up ones.
pub(crate) fn claims(runs: &[RunRow]) -> BTreeMap<(String, i64), Vec<RunId>> {
    let mut ticks: BTreeMap<(String, i64), Vec<RunId>> = BTreeMap::new();
    for run in runs {
        if matches!(
            run.trigger,
            turbosched::model::Trigger::Schedule | turbosched::model::Trigger::Catchup
        ) {
            ticks
                .entry((run.task.to_string(), run.scheduled_for.timestamp()))
                .or_default()
                .push(run.id);
        }
    }
    ticks
}

/// Asserts every second from `first` to `last` (inclusive) has exactly one run of `task`.
fn assert_every_tick_once(database: &Database, task: &str, first: i64, last: i64) {
    let runs = database.runs_of(task);
    let ticks = claims(&runs);
    for second in first..=last {
        let runs = ticks.get(&(task.to_string(), second));
        assert_eq!(
            runs.map_or(0, Vec::len),
            1,
            "{task} at {second}: runs {runs:?}"
        );
    }
}

const EVERY_SECOND_TRUE: &str = r#"
[tasks.tick]
command = ["/bin/true"]
schedule = "* * * * * *"
misfire = "run_all"
misfire_grace = "1h"
"#;

#[test]
fn three_instances_fire_every_tick_once_between_them() {
    let database = Database::create();
    let instances: Vec<Sandbox> = (0..3)
        .map(|_| instance(&database, EVERY_SECOND_TRUE))
        .collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    let start = chrono::Utc::now().timestamp() + 1;
    wait_until("six seconds of ticks", Duration::from_secs(30), || {
        let runs = database.runs_of("tick");
        runs.iter()
            .any(|r| r.scheduled_for.timestamp() >= start + 6 && r.state.is_terminal())
            .then_some(())
    });
    for service in services {
        service.stop_cleanly();
    }
    assert_every_tick_once(&database, "tick", start, start + 6);
    let runs = database.runs_of("tick");
    assert!(
        runs.iter().all(|r| r.state == RunState::Succeeded),
        "{runs:?}"
    );
}

#[test]
fn every_instance_shows_the_whole_cluster_and_streams_every_instances_events() {
    let database = Database::create();
    let first = instance(&database, SLEEPER);
    let second = instance(&database, SLEEPER);
    let services = [first.serve(), second.serve()];
    let (code, body) = first.cli_json(&["run", "sleeper", "--json"]);
    assert_eq!(code, 0, "{body}");
    let run = run_id(&body);
    let owner = wait_until("the run started", Duration::from_secs(20), || {
        let row = database.store().run(run).ok()??;
        (row.state == RunState::Running).then_some(row.owner?)
    });
    // Any instance's status lists both, with their lease age and config, and which one
    // runs the run.
    for service in &services {
        let status = wait_until(
            "both instances and the run on the board",
            Duration::from_secs(10),
            || {
                let (_, status) = get_json(service, "/scheduler/status");
                let instances = status["cluster"]["instances"].as_array()?.clone();
                let runs_it = instances.iter().any(|i| {
                    i["instance"] == owner.as_str()
                        && i["runs"]
                            .as_array()
                            .is_some_and(|r| r.contains(&json!(run.0)))
                });
                (instances.len() == 2 && runs_it).then_some(status)
            },
        );
        let instances = status["cluster"]["instances"].as_array().unwrap();
        let hashes: Vec<&serde_json::Value> = instances.iter().map(|i| &i["config_hash"]).collect();
        assert!(
            hashes[0].is_string() && hashes[0] == hashes[1],
            "{status:#}"
        );
        assert!(
            instances
                .iter()
                .all(|i| i["lease_age_ms"].as_u64().unwrap_or(u64::MAX) < 3_000),
            "{status:#}"
        );
        assert_eq!(status["cluster"]["fenced"], false);
    }
    // The command line shows the cluster too.
    let text = stdout(&second.cli(&["status"]));
    assert!(text.contains("service: up, 2 instances"), "{text}");
    assert!(
        text.contains(&owner) && text.contains(&run.0.to_string()),
        "{text}"
    );
    // One event stream: the second instance streams the first's events, each naming it.
    let api = crate::api::Api::new(&services[1], None);
    let events = crate::api::subscribe(&api, "?since=0", None);
    let seen = crate::api::collect(&events, |seen| {
        seen.iter()
            .any(|e| e.event == "run_succeeded" && e.data["run_id"] == run.0)
    });
    let started: std::collections::HashSet<String> = seen
        .iter()
        .filter(|e| e.event == "scheduler_started")
        .filter_map(|e| e.data["instance"].as_str().map(str::to_string))
        .collect();
    assert_eq!(
        started.len(),
        2,
        "each instance's start, named: {started:?}"
    );
    let run_started = seen
        .iter()
        .find(|e| e.event == "run_started" && e.data["run_id"] == run.0)
        .expect("run_started");
    assert_eq!(run_started.data["instance"], owner.as_str());
    for service in services {
        service.stop_cleanly();
    }
}

#[test]
fn maintenance_on_postgres_archives_and_prunes_and_leaves_the_backup_to_pg_dump() {
    let database = Database::create();
    let sandbox = instance(
        &database,
        "[tasks.maintenance]\nhandler = \"maintenance\"\nparams = { archive_after_days = 30, retention_days = 90, keep_backups = 2 }\n",
    );
    let (code, value) = sandbox.cli_json(&["run", "maintenance", "--json"]);
    assert_eq!(code, 0, "{value}");
    let result = &value["runs"][0]["result"];
    assert_eq!(result["backup"], serde_json::Value::Null, "{result}");
    assert!(
        result["backup_skipped"]
            .as_str()
            .unwrap_or("")
            .contains("pg_dump"),
        "{result}"
    );
    assert_eq!(value["runs"][0]["state"], "succeeded", "{value}");
}

const LONG_SLEEP: &str = r#"
[tasks.long]
command = ["/bin/sleep", "60"]
"#;

#[test]
fn an_abort_asked_of_any_instance_stops_the_run_where_it_runs() {
    let database = Database::create();
    let first = instance(&database, LONG_SLEEP);
    let second = instance(&database, LONG_SLEEP);
    let services = [first.serve(), second.serve()];
    let row = start_run(&database, &first, "long");
    let run = row.id;
    let owner = row.owner.clone().expect("owner");
    // Ask the instance that does not run it.
    let other = services
        .iter()
        .find(|service| {
            let (_, status) = get_json(service, "/scheduler/status");
            status["scheduler"]["instance"] != owner.as_str()
        })
        .expect("an instance that does not own the run");
    let (status, body) = post_json(other, &format!("/scheduler/runs/{run}/abort"));
    assert_eq!(status, 202, "{body}");
    let done = wait_until("the run aborted", Duration::from_secs(15), || {
        let row = database.store().run(run).ok()??;
        row.state.is_terminal().then_some(row)
    });
    assert_eq!(done.state, RunState::Aborted, "{done:?}");
    assert!(!process_alive(row.pid.unwrap_or(0)), "the child lives on");
    for service in services {
        service.stop_cleanly();
    }
}

#[test]
fn a_pause_asked_of_one_instance_holds_on_every_instance() {
    let database = Database::create();
    let instances: Vec<Sandbox> = (0..2)
        .map(|_| instance(&database, EVERY_SECOND_TRUE))
        .collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    wait_until("a first run", Duration::from_secs(20), || {
        (!database.runs_of("tick").is_empty()).then_some(())
    });
    let (status, body) = post_json(&services[0], "/scheduler/tasks/tick/pause");
    assert_eq!(status, 200, "{body}");
    let paused_at = chrono::Utc::now();
    // Four seconds on: no tick after the pause fired, on either instance.
    wait_until("four seconds paused", Duration::from_secs(10), || {
        (chrono::Utc::now() - paused_at > chrono::Duration::seconds(4)).then_some(())
    });
    let late: Vec<RunRow> = database
        .runs_of("tick")
        .into_iter()
        .filter(|r| r.scheduled_for > paused_at + chrono::Duration::seconds(1))
        .collect();
    assert!(late.is_empty(), "fired while paused: {late:?}");
    // Resumed through the other instance: firing goes on.
    let (status, body) = post_json(&services[1], "/scheduler/tasks/tick/resume");
    assert_eq!(status, 200, "{body}");
    let resumed_at = chrono::Utc::now();
    wait_until("a run after the resume", Duration::from_secs(10), || {
        database
            .runs_of("tick")
            .iter()
            .any(|r| r.scheduled_for > resumed_at)
            .then_some(())
    });
    for service in services {
        service.stop_cleanly();
    }
}

#[test]
fn a_host_clock_stepped_back_in_a_cluster_is_corrected_by_the_database_clock_not_replanned() {
    // The host clock of one instance is stepped back 10 s mid-run (libfaketime reading
    // its offset from a file). Due-ness is the database's: the instance measures its
    // offset again at once and keeps firing on time, with no misfire and no tick twice.
    let database = Database::create();
    let sandbox = instance(&database, RUN_ONCE);
    let offset_file = sandbox.path().join("faketime");
    std::fs::write(&offset_file, "+0\n").unwrap();
    let library = faketime_library();
    let offset_path = offset_file.display().to_string();
    let service = sandbox.serve_with(&[
        ("LD_PRELOAD", library.as_str()),
        ("FAKETIME_TIMESTAMP_FILE", offset_path.as_str()),
        ("FAKETIME_NO_CACHE", "1"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
    ]);
    wait_until("a first run", Duration::from_secs(20), || {
        (!database.runs_of("once").is_empty()).then_some(())
    });
    std::fs::write(&offset_file, "-10s\n").unwrap();
    let stepped = chrono::Utc::now().timestamp();
    wait_until("six ticks after the step", Duration::from_secs(30), || {
        database
            .runs_of("once")
            .iter()
            .any(|r| r.scheduled_for.timestamp() >= stepped + 6 && r.state.is_terminal())
            .then_some(())
    });
    service.stop_cleanly();
    assert_every_tick_once(&database, "once", stepped + 1, stepped + 6);
    let runs = database.runs_of("once");
    let late: Vec<&RunRow> = runs
        .iter()
        .filter(|r| r.scheduled_for.timestamp() > stepped)
        .filter(|r| (r.queued_at - r.scheduled_for) > chrono::Duration::seconds(2))
        .collect();
    assert!(late.is_empty(), "claimed late after the step: {late:?}");
    assert!(database.events_of_kind("misfire").is_empty());
    let steps = database.events_of_kind("clock_step");
    assert!(
        steps.iter().any(|e| e.message.contains("database")),
        "{steps:?}"
    );
}

const LONG_CHILD: &str = r#"
[tasks.long]
command = ["/bin/sleep", "2"]
retries = 2
"#;

#[test]
fn an_instance_killed_with_its_child_running_loses_the_child_and_a_peer_runs_the_attempt_again() {
    let database = Database::create();
    let first = instance(&database, LONG_CHILD);
    let second = instance(&database, LONG_CHILD);
    let doomed = first.serve();
    let row = start_run(&database, &first, "long");
    let run = row.id;
    let child = row.pid.expect("pid");
    // The peer starts after the run is running: it did not take the run away.
    let peer = second.serve();
    doomed.kill9();
    wait_until(
        "the child to die with its instance",
        Duration::from_secs(5),
        || (!process_alive(child)).then_some(()),
    );
    let done = wait_until("the peer to run it again", Duration::from_secs(30), || {
        let row = database.store().run(run).ok()??;
        (row.state == RunState::Succeeded).then_some(row)
    });
    assert_eq!(done.attempt.0, 2, "{done:?}");
    let attempts = database.store().attempts(run).unwrap();
    assert_eq!(attempts.len(), 2, "{attempts:?}");
    assert_eq!(
        attempts[0].outcome.as_deref(),
        Some("orphaned"),
        "{attempts:?}"
    );
    assert_eq!(
        attempts[1].outcome.as_deref(),
        Some("succeeded"),
        "{attempts:?}"
    );
    assert_ne!(attempts[0].owner, attempts[1].owner);
    peer.stop_cleanly();
}

const SLEEPER: &str = r#"
[tasks.sleeper]
command = ["/bin/sleep", "1.5"]
retries = 2
"#;

#[test]
fn an_instance_stopped_past_its_lease_fences_itself_and_its_late_result_is_refused() {
    let database = Database::create();
    let first = instance(&database, SLEEPER);
    let second = instance(&database, SLEEPER);
    let stopped = first.serve();
    let row = start_run(&database, &first, "sleeper");
    let run = row.id;
    let owner = row.owner.clone().expect("owner");
    let peer = second.serve();
    signal(stopped.pid(), nix::sys::signal::Signal::SIGSTOP);
    // The peer reaps the silent owner's run after the lease (3 s) and runs it again.
    let rerun = wait_until("the peer's attempt", Duration::from_secs(30), || {
        let row = database.store().run(run).ok()??;
        (row.attempt.0 >= 2 && row.owner.as_deref() != Some(owner.as_str())).then_some(row)
    });
    assert!(
        !process_alive(row.pid.unwrap_or(0)),
        "the first attempt's child lives on"
    );
    signal(stopped.pid(), nix::sys::signal::Signal::SIGCONT);
    wait_until(
        "the stopped instance to fence itself",
        Duration::from_secs(10),
        || {
            let fenced = database.events_of_kind("instance_fenced");
            (!fenced.is_empty()).then_some(())
        },
    );
    let done = wait_until("the run to finish", Duration::from_secs(30), || {
        let row = database.store().run(run).ok()??;
        row.state.is_terminal().then_some(row)
    });
    assert_eq!(done.state, RunState::Succeeded, "{done:?}");
    assert_eq!(done.attempt, rerun.attempt, "no attempt after the peer's");
    let attempts = database.store().attempts(run).unwrap();
    let succeeded: Vec<_> = attempts
        .iter()
        .filter(|a| a.outcome.as_deref() == Some("succeeded"))
        .collect();
    assert_eq!(succeeded.len(), 1, "{attempts:?}");
    assert_eq!(
        attempts[0].outcome.as_deref(),
        Some("orphaned"),
        "{attempts:?}"
    );
    // The stopped instance works again once its heartbeat renews the lease.
    wait_until(
        "the fenced instance to renew its lease",
        Duration::from_secs(10),
        || (!database.events_of_kind("instance_unfenced").is_empty()).then_some(()),
    );
    stopped.stop_cleanly();
    peer.stop_cleanly();
}

#[test]
fn an_instance_whose_schedule_differs_does_not_fire_the_task_and_says_so() {
    let database = Database::create();
    let every_second = instance(&database, EVERY_SECOND_TRUE);
    let every_two = instance(
        &database,
        &EVERY_SECOND_TRUE.replace("\"* * * * * *\"", "\"*/2 * * * * *\""),
    );
    let old = every_second.serve();
    wait_until("a first run", Duration::from_secs(20), || {
        (!database.runs_of("tick").is_empty()).then_some(())
    });
    // The instance started last with another schedule stores its own: it fires the task,
    // the other stops firing it and says why.
    let new = every_two.serve();
    wait_until(
        "the old instance to notice",
        Duration::from_secs(20),
        || (!database.events_of_kind("config_mismatch").is_empty()).then_some(()),
    );
    let since = chrono::Utc::now().timestamp() + 1;
    // The board is published within a loop or two of the event.
    let health = wait_until(
        "health to show the conflict",
        Duration::from_secs(5),
        || {
            let (status, health) = get_json(&old, "/health");
            (status == 200 && health["checks"]["cluster"]["status"] == "degraded").then_some(health)
        },
    );
    let detail = health["checks"]["cluster"]["detail"].as_str().unwrap_or("");
    assert!(detail.contains("tick"), "{detail}");
    wait_until("six more seconds of runs", Duration::from_secs(30), || {
        database
            .runs_of("tick")
            .iter()
            .any(|r| r.scheduled_for.timestamp() >= since + 6 && r.state.is_terminal())
            .then_some(())
    });
    let late: Vec<i64> = database
        .runs_of("tick")
        .iter()
        .map(|r| r.scheduled_for.timestamp())
        .filter(|second| *second >= since)
        .collect();
    assert!(late.len() >= 3, "{late:?}");
    assert!(
        late.iter().all(|second| second % 2 == 0),
        "odd ticks fired: {late:?}"
    );
    let message = &database.events_of_kind("config_mismatch")[0].message;
    assert!(message.contains("*/2 * * * * *"), "{message}");
    old.stop_cleanly();
    new.stop_cleanly();
}

#[test]
fn hosts_thirty_seconds_ahead_and_behind_fire_neither_early_nor_twice() {
    if std::process::Command::new("faketime")
        .arg("--version")
        .output()
        .is_err()
    {
        panic!("faketime is not installed (apt-get install faketime; .ci/run installs it)");
    }
    let database = Database::create();
    let ahead = instance(&database, EVERY_SECOND_TRUE);
    let behind = instance(&database, EVERY_SECOND_TRUE);
    let skewed = |sandbox: &Sandbox, offset: &str| {
        let library = faketime_library();
        sandbox.serve_with(&[
            ("LD_PRELOAD", library.as_str()),
            ("FAKETIME", offset),
            ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
            ("FAKETIME_NO_CACHE", "1"),
        ])
    };
    let services = [skewed(&ahead, "+30s"), skewed(&behind, "-30s")];
    // Watch the runs appear, on the true clock, for eight seconds of ticks.
    let mut first_seen: HashMap<RunId, chrono::DateTime<chrono::Utc>> = HashMap::new();
    let start = chrono::Utc::now().timestamp() + 1;
    wait_until("eight seconds of ticks", Duration::from_secs(40), || {
        let runs = database.runs_of("tick");
        // Read after the query: a run it returned was committed before this instant, so
        // an instant before the run's tick proves an early fire.
        let now = chrono::Utc::now();
        for run in &runs {
            first_seen.entry(run.id).or_insert(now);
        }
        runs.iter()
            .any(|r| r.scheduled_for.timestamp() >= start + 8 && r.state.is_terminal())
            .then_some(())
    });
    // Each instance measured its offset from the database's clock and shows it.
    for (service, way) in services.iter().zip(["ahead of", "behind"]) {
        let (_, health) = get_json(service, "/health");
        assert_eq!(
            health["checks"]["cluster"]["status"], "degraded",
            "{health}"
        );
        let detail = health["checks"]["cluster"]["detail"].as_str().unwrap_or("");
        assert!(detail.contains(way), "{detail}");
    }
    for service in services {
        service.stop_cleanly();
    }
    let runs = database.runs_of("tick");
    for run in &runs {
        let seen = first_seen[&run.id];
        // Seen no earlier than its tick (the poll may see it late; 30 s early shows).
        assert!(
            seen >= run.scheduled_for,
            "run {} for {} appeared at {seen}, early",
            run.id,
            run.scheduled_for
        );
    }
    assert_every_tick_once(&database, "tick", start + 1, start + 8);
}

pub(crate) fn faketime_library() -> String {
    for candidate in [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ] {
        if std::path::Path::new(candidate).exists() {
            return candidate.to_string();
        }
    }
    panic!("libfaketime.so.1 not found (apt-get install faketime)");
}

const OVERLAPPING: &str = r#"
[tasks.slow]
command = ["/bin/sleep", "2.5"]
schedule = "* * * * * *"
overlap = "skip"
"#;

#[test]
fn the_skip_overlap_policy_holds_across_instances() {
    let database = Database::create();
    let instances: Vec<Sandbox> = (0..2).map(|_| instance(&database, OVERLAPPING)).collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    wait_until("two finished runs", Duration::from_secs(40), || {
        (database
            .runs_of("slow")
            .iter()
            .filter(|r| r.state == RunState::Succeeded)
            .count()
            >= 2)
            .then_some(())
    });
    for service in services {
        service.stop_cleanly();
    }
    let runs = database.runs_of("slow");
    // Never two attempts at once, whichever instance ran them.
    let mut spans: Vec<(i64, i64)> = runs
        .iter()
        .flat_map(|r| database.store().attempts(r.id).unwrap())
        .filter_map(|a| {
            Some((
                a.started_at.timestamp_micros(),
                a.finished_at?.timestamp_micros(),
            ))
        })
        .collect();
    spans.sort();
    for pair in spans.windows(2) {
        assert!(pair[0].1 <= pair[1].0, "attempts overlap: {pair:?}");
    }
    let skipped: Vec<&RunRow> = runs
        .iter()
        .filter(|r| r.state == RunState::Skipped)
        .collect();
    assert!(!skipped.is_empty(), "{runs:?}");
    assert!(
        skipped.iter().all(|r| r
            .reason
            .as_deref()
            .unwrap_or("")
            .starts_with("overlap policy skip")),
        "{skipped:?}"
    );
}

const RUN_ONCE: &str = r#"
[tasks.once]
command = ["/bin/true"]
schedule = "* * * * * *"
misfire = "run_once"
misfire_grace = "1h"
"#;

#[test]
fn all_instances_down_across_ticks_apply_the_misfire_policy_once_not_once_each() {
    let database = Database::create();
    let instances: Vec<Sandbox> = (0..2).map(|_| instance(&database, RUN_ONCE)).collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    wait_until("a first run", Duration::from_secs(20), || {
        (!database.runs_of("once").is_empty()).then_some(())
    });
    for service in services {
        service.stop_cleanly();
    }
    let stopped_at = chrono::Utc::now();
    let down = std::time::Instant::now();
    wait_until("four ticks missed", Duration::from_secs(10), || {
        (down.elapsed() > Duration::from_secs(4)).then_some(())
    });
    // Both come back at once: one run for the ticks missed while all were down, between
    // them, and one misfire record.
    let restarted_at = chrono::Utc::now();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    let back = chrono::Utc::now().timestamp() + 2;
    wait_until("runs after the restart", Duration::from_secs(20), || {
        database
            .runs_of("once")
            .iter()
            .any(|r| r.scheduled_for.timestamp() >= back && r.state.is_terminal())
            .then_some(())
    });
    for service in services {
        service.stop_cleanly();
    }
    // Ticks from the stop to the restart: all missed while every instance was down.
    let missed: Vec<RunRow> = database
        .runs_of("once")
        .into_iter()
        .filter(|r| r.scheduled_for > stopped_at && r.scheduled_for <= restarted_at)
        .collect();
    assert_eq!(missed.len(), 1, "run_once: one run for the gap: {missed:?}");
    assert_eq!(missed[0].trigger, turbosched::model::Trigger::Catchup);
    let misfires = database.events_of_kind("misfire");
    assert_eq!(misfires.len(), 1, "{misfires:?}");
    let ticks = claims(&database.runs_of("once"));
    assert!(ticks.values().all(|runs| runs.len() == 1), "{ticks:?}");
}

#[test]
fn connections_terminated_by_the_server_are_replaced_and_firing_goes_on() {
    let database = Database::create();
    let instances: Vec<Sandbox> = (0..2)
        .map(|_| instance(&database, EVERY_SECOND_TRUE))
        .collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    wait_until("a first run", Duration::from_secs(20), || {
        (!database.runs_of("tick").is_empty()).then_some(())
    });
    let start = chrono::Utc::now().timestamp() + 1;
    for _ in 0..3 {
        let cut = chrono::Utc::now().timestamp();
        database.sql(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity
             WHERE datname = current_database() AND pid <> pg_backend_pid()",
        );
        wait_until(
            "a tick fired after the cut",
            Duration::from_secs(20),
            || {
                database
                    .runs_of("tick")
                    .iter()
                    .any(|r| r.scheduled_for.timestamp() > cut && r.state.is_terminal())
                    .then_some(())
            },
        );
    }
    let after = chrono::Utc::now().timestamp() + 1;
    wait_until(
        "runs after the terminations",
        Duration::from_secs(30),
        || {
            database
                .runs_of("tick")
                .iter()
                .any(|r| r.scheduled_for.timestamp() >= after + 3 && r.state.is_terminal())
                .then_some(())
        },
    );
    for service in services {
        service.stop_cleanly();
    }
    assert_every_tick_once(&database, "tick", start, after + 3);
}

// Wake-ups (issue 12, "What it must show" 7): LISTEN/NOTIFY brings work forward, the poll
// always backs it up.

/// How many connections `LISTEN` on the database (one per instance's engine).
fn listeners(database: &Database) -> i64 {
    query_i64(
        database,
        &format!(
            "SELECT COUNT(*) FROM pg_stat_activity WHERE datname = '{}' AND query LIKE 'LISTEN%'",
            database.name
        ),
    )
}

/// Terminates every connection listening on the database; how many there were.
fn terminate_listeners(database: &Database) -> i64 {
    query_i64(
        database,
        &format!(
            "SELECT COUNT(pg_terminate_backend(pid)) FROM pg_stat_activity
             WHERE datname = '{}' AND query LIKE 'LISTEN%' AND pid <> pg_backend_pid()",
            database.name
        ),
    )
}

/// The one BIGINT `sql` returns, read on the server's `postgres` database.
fn query_i64(database: &Database, sql: &str) -> i64 {
    let url = format!("{}/postgres", database.server);
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(&url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        let driver = tokio::spawn(connection);
        let row = client
            .query_one(sql, &[])
            .await
            .unwrap_or_else(|err| panic!("{sql}: {err}"));
        drop(client);
        let _ = driver.await;
        row.get(0)
    })
}

#[test]
fn the_listen_connection_dropped_runs_still_fire_through_the_poll_and_it_comes_back() {
    let database = Database::create();
    let instances: Vec<Sandbox> = (0..2)
        .map(|_| instance(&database, EVERY_SECOND_TRUE))
        .collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    wait_until("both instances listening", Duration::from_secs(20), || {
        (listeners(&database) == 2).then_some(())
    });
    wait_until("a first run", Duration::from_secs(20), || {
        (!database.runs_of("tick").is_empty()).then_some(())
    });
    let start = chrono::Utc::now().timestamp() + 1;
    // Cut the listeners as soon as they are back, for three seconds (paced, not awaited:
    // the outage is the point).
    let outage = std::time::Instant::now();
    let mut cut = 0;
    while outage.elapsed() < Duration::from_secs(3) {
        cut += terminate_listeners(&database);
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(cut >= 2, "no LISTEN connection was found to terminate");
    let after = chrono::Utc::now().timestamp() + 1;
    // Each listener connects again and says so.
    wait_until("both listening again", Duration::from_secs(20), || {
        (listeners(&database) == 2).then_some(())
    });
    for service in &services {
        wait_until(
            "the listener's return logged",
            Duration::from_secs(10),
            || {
                service
                    .stderr_text()
                    .contains("listening for wake-ups again")
                    .then_some(())
            },
        );
        let log = service.stderr_text();
        let warnings = log
            .matches("listening for wake-ups (LISTEN turbosched) is down")
            .count();
        assert!(
            (1..=cut as usize).contains(&warnings),
            "{warnings} warnings for {cut} terminations:\n{log}"
        );
    }
    wait_until("ticks after the outage", Duration::from_secs(30), || {
        database
            .runs_of("tick")
            .iter()
            .any(|r| r.scheduled_for.timestamp() >= after + 2 && r.state.is_terminal())
            .then_some(())
    });
    for service in services {
        service.stop_cleanly();
    }
    assert_every_tick_once(&database, "tick", start, after + 2);
}

const BUSY: &str = r#"
[tasks.hold]
command = ["/bin/sleep", "60"]

[tasks.quick]
command = ["/bin/true"]
"#;

/// Two instances of one worker slot each; `hold` occupies one of them, then `quick` is
/// queued through that busy instance's API and started by the other. Returns the time
/// from `quick`'s queueing to its start (both on the database's clock), and the time
/// from `hold`'s abort, requested through the idle instance, to its end.
fn queued_on_a_busy_instance(poll_only: bool) -> (Duration, Duration) {
    let database = Database::create();
    let config = instance_config(&database, BUSY).replace(
        "max_workers = 16",
        &format!("max_workers = 1\npoll_only = {poll_only}"),
    );
    let sandboxes: Vec<Sandbox> = (0..2)
        .map(|_| Sandbox::with_config_on(&config, &database.url()))
        .collect();
    let services: Vec<Service> = sandboxes.iter().map(Sandbox::serve).collect();
    let expected = if poll_only { 0 } else { 2 };
    wait_until("the listeners", Duration::from_secs(20), || {
        (listeners(&database) == expected).then_some(())
    });
    let (status, body) = crate::faults::post_json(&services[0], "/scheduler/tasks/hold/run");
    assert_eq!(status, 202, "{body}");
    let hold = run_id(&body);
    // Either instance may start it; the one that does is the busy one.
    let held = wait_until("hold running", Duration::from_secs(20), || {
        let row = database.store().run(hold).ok()??;
        (row.state == RunState::Running).then_some(row)
    });
    let busy_owner = held.owner.clone().expect("owner");
    let busy_api = database
        .store()
        .instance(&busy_owner)
        .unwrap()
        .and_then(|i| i.api)
        .expect("the busy instance's API");
    let (busy, idle) = if services[0].api.ends_with(&busy_api) {
        (&services[0], &services[1])
    } else {
        (&services[1], &services[0])
    };
    let (status, body) = crate::faults::post_json(busy, "/scheduler/tasks/quick/run");
    assert_eq!(status, 202, "{body}");
    let quick = run_id(&body);
    let started = wait_until(
        "quick started by the idle peer",
        Duration::from_secs(20),
        || {
            let row = database.store().run(quick).ok()??;
            row.started_at.map(|_| row)
        },
    );
    let attempts = database.store().attempts(quick).unwrap();
    assert_ne!(attempts[0].owner.as_deref(), Some(busy_owner.as_str()));
    let to_start = (started.started_at.unwrap() - started.queued_at)
        .to_std()
        .unwrap_or_default();
    // An abort sent to the idle instance reaches the owner.
    let asked = std::time::Instant::now();
    let (status, body) =
        crate::faults::post_json(idle, &format!("/scheduler/runs/{}/abort", hold.0));
    assert!(status < 300, "{status} {body}");
    wait_until("hold aborted", Duration::from_secs(20), || {
        let row = database.store().run(hold).ok()??;
        (row.state == RunState::Aborted).then_some(())
    });
    let to_abort = asked.elapsed();
    for service in services {
        service.stop_cleanly();
    }
    (to_start, to_abort)
}

#[test]
fn a_run_queued_on_a_busy_instance_is_started_by_a_peer_at_once_thanks_to_the_hint() {
    let (to_start, to_abort) = queued_on_a_busy_instance(false);
    println!(
        "with LISTEN/NOTIFY: queued on the busy instance → started by its peer in {to_start:?}; abort through the peer → aborted in {to_abort:?}"
    );
    // Without the hint it would wait for the peer's poll (every second while hints
    // arrive); generous bound for a loaded machine.
    assert!(to_start < Duration::from_secs(3), "{to_start:?}");
}

#[test]
fn poll_only_instances_fire_every_tick_once_and_open_no_listen_connection() {
    let database = Database::create();
    let config = instance_config(&database, EVERY_SECOND_TRUE)
        .replace("max_workers = 16", "max_workers = 16\npoll_only = true");
    let instances: Vec<Sandbox> = (0..2)
        .map(|_| Sandbox::with_config_on(&config, &database.url()))
        .collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    let start = chrono::Utc::now().timestamp() + 1;
    wait_until("five seconds of ticks", Duration::from_secs(30), || {
        database
            .runs_of("tick")
            .iter()
            .any(|r| r.scheduled_for.timestamp() >= start + 5 && r.state.is_terminal())
            .then_some(())
    });
    assert_eq!(listeners(&database), 0);
    for service in services {
        service.stop_cleanly();
    }
    assert_every_tick_once(&database, "tick", start, start + 5);
    // A run queued on a busy instance still moves to its peer, by the poll (200 ms).
    let (to_start, to_abort) = queued_on_a_busy_instance(true);
    println!(
        "poll_only: queued on the busy instance → started by its peer in {to_start:?}; abort through the peer → aborted in {to_abort:?}"
    );
    assert!(to_start < Duration::from_secs(3), "{to_start:?}");
}

/// Calendars and jitter across a cluster on PostgreSQL: two instances agree on which
/// ticks a calendar skips (each recorded once, skipped, naming the calendar) and on when
/// each jittered tick is due (never claimed before its tick plus its jitter).
#[test]
fn two_instances_skip_calendar_dates_once_and_agree_on_jittered_instants() {
    let database = Database::create();
    let today = chrono::Utc::now().date_naive();
    let tomorrow = today + chrono::Days::new(1);
    let tasks = format!(
        "[calendars.shut]\ndates = [\"{today}\", \"{tomorrow}\"]\n\
         [tasks.closed]\nhandler = \"ping\"\nschedule = \"* * * * * *\"\ncalendar = \"shut\"\n\
         [tasks.spread]\nhandler = \"ping\"\nschedule = \"*/2 * * * * *\"\njitter = \"1500ms\"\noverlap = \"queue\"\n"
    );
    let first = instance(&database, &tasks);
    let second = instance(&database, &tasks);
    let a = first.serve();
    let b = second.serve();
    wait_until("skipped and jittered runs", Duration::from_secs(30), || {
        (database.runs_of("closed").len() >= 4 && database.runs_of("spread").len() >= 4)
            .then_some(())
    });
    drop(a);
    drop(b);
    let closed = database.runs_of("closed");
    for run in &closed {
        assert_eq!(run.state, RunState::Skipped, "{run:?}");
        let date = run.scheduled_for.date_naive();
        assert_eq!(
            run.reason.as_deref(),
            Some(format!("calendar shut: {date} is a listed date").as_str())
        );
    }
    let spread = database.runs_of("spread");
    let all: Vec<RunRow> = closed.iter().chain(&spread).cloned().collect();
    assert!(
        claims(&all).values().all(|runs| runs.len() == 1),
        "each tick claimed once"
    );
    let config = turbosched::config::parse(&tasks_config(&tasks), std::path::Path::new("t.toml"))
        .expect("config");
    let spec = config.task("spread").expect("spread");
    for run in &spread {
        let due = spec.due_at(run.scheduled_for);
        assert!(
            run.queued_at >= due,
            "run {} queued at {} before its jittered instant {}",
            run.id,
            run.queued_at,
            due
        );
        assert!(
            run.queued_at - due < chrono::TimeDelta::seconds(5),
            "{run:?}"
        );
    }
}

/// `tasks` under a minimal config, for reading a task's spec in a test.
fn tasks_config(tasks: &str) -> String {
    format!("[scheduler]\ntimezone = \"UTC\"\n{tasks}")
}
