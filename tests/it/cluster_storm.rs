//! Cluster mode under fire: real `turbosched serve` processes on the real PostgreSQL.
//! Three instances kill -9'd at random instants for two minutes; a PostgreSQL server
//! restarted under two instances; the `queue` and `replace` overlap policies across
//! instances; a DST night on the database's clock. Every (task, tick) runs once, whichever
//! instance fires it and whatever dies, and nothing is left running.
//!
//! The storm's length: `TURBOSCHED_CLUSTER_STORM_SECS` (default 120); its kills are
//! drawn from a seed it prints, which `TURBOSCHED_STORM_SEED` replays.

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use turbosched::model::RunState;
use turbosched::store::{RunFilter, RunRow, Store};

use crate::cluster::{claims, config_on, sql_on, Database};
use crate::support::*;

fn instance_on(url: &str, max_workers: usize, tasks: &str) -> Sandbox {
    Sandbox::with_config_on(&config_on(url, max_workers, tasks), url)
}

/// Rows of `sql` on the database at `url`.
fn query(url: &str, sql: &str) -> Vec<tokio_postgres::Row> {
    try_query(url, sql).unwrap_or_else(|err| panic!("{sql}: {err}"))
}

/// Rows of `sql` on the database at `url`, or why not.
fn try_query(url: &str, sql: &str) -> Result<Vec<tokio_postgres::Row>, tokio_postgres::Error> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls).await?;
        let driver = tokio::spawn(connection);
        let rows = client.query(sql, &[]).await;
        drop(client);
        let _ = driver.await;
        rows
    })
}

fn store_at(url: &str) -> Store {
    Store::open(Path::new(url)).expect("open the cluster's store")
}

fn all_runs(url: &str) -> Vec<RunRow> {
    let mut rows = store_at(url)
        .runs(&RunFilter {
            limit: 10_000_000,
            ..RunFilter::default()
        })
        .unwrap();
    rows.reverse();
    rows
}

/// Every attempt: (run, attempt, started µs, finished µs, owner, pid).
type AttemptSpan = (i64, i64, i64, Option<i64>, Option<String>, Option<i64>);

fn all_attempts(url: &str) -> Vec<AttemptSpan> {
    query(
        url,
        "SELECT run_id, attempt, started_at, finished_at, owner, pid FROM attempts
         ORDER BY started_at",
    )
    .iter()
    .map(|row| {
        (
            row.get(0),
            row.get(1),
            row.get(2),
            row.get(3),
            row.get(4),
            row.get(5),
        )
    })
    .collect()
}

/// Asserts no two attempts of the same task were running at once (the spans of `task`'s
/// attempts, in start order, do not overlap) and returns how many there were.
fn assert_never_two_at_once(url: &str, task: &str) -> usize {
    let runs: HashSet<i64> = all_runs(url)
        .iter()
        .filter(|r| r.task.as_str() == task)
        .map(|r| r.id.0)
        .collect();
    let spans: Vec<AttemptSpan> = all_attempts(url)
        .into_iter()
        .filter(|a| runs.contains(&a.0))
        .collect();
    for pair in spans.windows(2) {
        let ended = pair[0].3.expect("every attempt of a stopped cluster ended");
        assert!(
            ended <= pair[1].2,
            "two attempts of {task} at once: {:?} and {:?}",
            pair[0],
            pair[1]
        );
    }
    spans.len()
}

/// The instance id of the service with `pid`, as registered in the store.
fn instance_id(url: &str, pid: u32) -> String {
    store_at(url)
        .live_instances(Duration::from_secs(60), chrono::Utc::now())
        .unwrap()
        .into_iter()
        .find(|i| i.pid == pid as i64)
        .map(|i| i.id)
        .unwrap_or_else(|| panic!("no live instance with pid {pid}"))
}

/// The `misfire` events of `task`: (seq, instance, message).
fn misfire_events(url: &str, task: &str) -> Vec<(i64, Option<String>, String)> {
    query(
        url,
        &format!(
            "SELECT seq, instance, message FROM events WHERE task = '{task}' AND kind = 'misfire'
             ORDER BY seq"
        ),
    )
    .iter()
    .map(|row| (row.get(0), row.get(1), row.get(2)))
    .collect()
}

/// POSTs to a service's API without a body; answers the status.
fn post(service: &Service, path: &str) -> u16 {
    let agent: ureq::Agent = ureq::Agent::config_builder()
        .http_status_as_error(false)
        .timeout_global(Some(Duration::from_secs(30)))
        .build()
        .into();
    agent
        .post(format!("{}{path}", service.api))
        .send_empty()
        .unwrap_or_else(|err| panic!("POST {path}: {err}"))
        .status()
        .as_u16()
}

/// Waits until `what` has lasted `length` (an outage, a gap between kills): the
/// condition is time itself.
fn wait_for(what: &str, length: Duration) {
    let from = Instant::now();
    wait_until(what, length + Duration::from_secs(10), || {
        (from.elapsed() >= length).then_some(())
    });
}

/// Asserts every attempt's child is dead.
fn assert_no_child_alive(url: &str) -> usize {
    let mut children = 0;
    for (run, attempt, started_at, _, _, pid) in all_attempts(url) {
        if let Some(pid) = pid {
            children += 1;
            // Its child was spawned within seconds of the attempt's start (even under the
            // storm's load); a process that got the pid a minute later is another one.
            assert!(
                !process_alive_started_by(pid, started_at + 60_000_000),
                "attempt {attempt} of run {run} (pid {pid}) outlived its instance"
            );
        }
    }
    children
}

/// The storm's tasks: mostly `run_all` within an hour, some `skip`, some `run_once`, and
/// slower ones with retries so the kills hit runs in flight.
fn storm_tasks() -> (String, BTreeMap<String, &'static str>) {
    let mut config = String::new();
    let mut policies = BTreeMap::new();
    for index in 0..200 {
        let (name, misfire, command, extra) = match index {
            0..150 => (format!("all{index:03}"), "run_all", "\"/bin/true\"", ""),
            150..170 => (format!("skip{index:03}"), "skip", "\"/bin/true\"", ""),
            170..190 => (format!("once{index:03}"), "run_once", "\"/bin/true\"", ""),
            _ => (
                format!("slow{index:03}"),
                "run_all",
                "\"/bin/sleep\", \"0.5\"",
                "retries = 2\n",
            ),
        };
        config.push_str(&format!(
            "[tasks.{name}]\ncommand = [{command}]\nschedule = \"* * * * * *\"\nmisfire = \"{misfire}\"\nmisfire_grace = \"1h\"\n{extra}\n"
        ));
        policies.insert(name, misfire);
    }
    (config, policies)
}

#[test]
fn a_kill_9_storm_on_three_instances_fires_every_tick_once_and_leaves_nothing_running() {
    let seconds: u64 = std::env::var("TURBOSCHED_CLUSTER_STORM_SECS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(120);
    let seed: u64 = std::env::var("TURBOSCHED_STORM_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("cluster storm: seed {seed} (TURBOSCHED_STORM_SEED={seed} replays it), {seconds} s");
    let mut random = rand::rngs::StdRng::seed_from_u64(seed);
    let database = Database::create();
    let url = database.url();
    let (tasks, policies) = storm_tasks();
    let instances: Vec<Sandbox> = (0..3).map(|_| instance_on(&url, 64, &tasks)).collect();
    let mut services: Vec<Option<Service>> = instances.iter().map(|i| Some(i.serve())).collect();
    let began = Instant::now();
    let first_second = chrono::Utc::now().timestamp() + 1;
    let mut killed_pids = Vec::new();
    let mut kills = 0;
    while began.elapsed() < Duration::from_secs(seconds) {
        // A random instant 1–4 s on, a random instance.
        wait_for(
            "the next kill instant",
            Duration::from_millis(random.gen_range(1_000..4_000)),
        );
        let victim = random.gen_range(0..instances.len());
        let service = services[victim].take().expect("serving");
        killed_pids.push(service.pid());
        service.kill9();
        kills += 1;
        services[victim] = Some(instances[victim].serve());
    }
    let storm_secs = began.elapsed().as_secs_f64();
    // The storm is over: the cluster claims every task again (the instances it left are
    // not stuck) ...
    let storm_end = chrono::Utc::now().timestamp_micros();
    wait_until(
        "every task claimed again after the storm",
        Duration::from_secs(120),
        || {
            let rows = query(
                &url,
                &format!("SELECT count(DISTINCT task) FROM runs WHERE queued_at > {storm_end}"),
            );
            (rows[0].get::<_, i64>(0) == 200).then_some(())
        },
    );
    // ... then every task is paused (the pause is the cluster's), and every run claimed
    // settles: the runs in flight at the kills were orphaned and run again or failed by
    // their policy, the backlog drains.
    // The flag is written in the database, where every instance reads it when it holds
    // the task's schedule row (the cluster's pause is that flag): a saturated instance's
    // API answers only after its engine's current turn.
    database.sql("UPDATE task_state SET paused = TRUE");
    let paused_at = chrono::Utc::now();
    wait_until(
        "every run to end after the pause",
        Duration::from_secs(300),
        || {
            let unfinished = store_at(&url).unfinished_runs().ok()?;
            unfinished.is_empty().then_some(())
        },
    );
    let settle_secs = (chrono::Utc::now() - paused_at).num_milliseconds() as f64 / 1000.0;
    for service in services.into_iter().flatten() {
        service.stop_cleanly();
    }

    // The tick accounting by `turbosched audit` (on the config's database).
    let (code, audit) = instances[0].cli_json(&["audit", "--since", "1h", "--json"]);
    assert_eq!(audit["integrity"], "ok");
    let audited = audit["tasks"].as_array().expect("tasks");
    assert_eq!(audited.len(), 200);
    for task in audited {
        assert_eq!(task["doubled"], 0, "{task}");
        let name = task["task"].as_str().unwrap_or("");
        // Every tick is run or counted dropped exactly once: a tick counted dropped by
        // two instances, or dropped and run, would make `missing` negative.
        assert_eq!(
            task["missing"],
            0,
            "{task}: its misfire events {:#?}",
            misfire_events(&url, name)
        );
    }
    assert_eq!(code, 0, "every tick accounted for: {audit:#}");
    // And directly: one run per (task, tick); under run_all and skip, a run for every
    // second from the first tick to the last; every task fired after the storm.
    let runs = all_runs(&url);
    let ticks = claims(&runs);
    let doubled: Vec<_> = ticks.iter().filter(|(_, runs)| runs.len() > 1).collect();
    assert!(doubled.is_empty(), "ticks run twice: {doubled:?}");
    let mut per_task: BTreeMap<&str, BTreeSet<i64>> = BTreeMap::new();
    for (task, second) in ticks.keys() {
        per_task.entry(task.as_str()).or_default().insert(*second);
    }
    assert_eq!(per_task.len(), 200, "every task fired");
    let mut dropped_by_run_once = 0;
    for (task, seconds) in &per_task {
        let first = *seconds.first().unwrap();
        let last = *seconds.last().unwrap();
        assert!(first <= first_second + 2, "{task} began at {first}");
        let gaps = (first..=last).filter(|s| !seconds.contains(s)).count();
        match policies[*task] {
            "run_once" => dropped_by_run_once += gaps,
            _ => assert_eq!(gaps, 0, "{task} ({}) lost ticks", policies[*task]),
        }
    }
    // Nothing left non-terminal after the settle and the clean stop.
    let mut states: BTreeMap<String, usize> = BTreeMap::new();
    for run in &runs {
        *states.entry(run.state.to_string()).or_default() += 1;
        assert!(
            run.state.is_terminal(),
            "run {} of {} left {}",
            run.id,
            run.task,
            run.state
        );
    }
    // No child outlives its instance, and no killed instance lives on.
    let children = assert_no_child_alive(&url);
    assert!(killed_pids.iter().all(|pid| !process_alive(*pid as i64)));
    let attempts = all_attempts(&url);
    let owners: HashSet<&str> = attempts.iter().filter_map(|a| a.4.as_deref()).collect();
    let orphaned = database.events_of_kind("run_orphaned").len();
    assert!(orphaned > 0, "the kills hit runs in flight");
    assert!(
        owners.len() >= 3 + kills / 2,
        "instances that ran attempts: {}",
        owners.len()
    );
    // How late ticks were claimed (queued_at − tick), and how many were catch-ups.
    let mut lags: Vec<i64> = runs
        .iter()
        .map(|r| (r.queued_at - r.scheduled_for).num_milliseconds())
        .collect();
    lags.sort_unstable();
    let lag = |q: f64| lags[((lags.len() - 1) as f64 * q) as usize];
    let catchups = runs
        .iter()
        .filter(|r| r.trigger == turbosched::model::Trigger::Catchup)
        .count();
    eprintln!(
        "cluster storm: seed {seed}, {storm_secs:.0} s of storm, {kills} kills, {settle_secs:.0} s to settle after the pause, {} (task, tick) claims over {} tasks, {} runs ({catchups} catch-ups; claim lag p50 {} ms, p99 {} ms, max {} ms), {} attempts ({children} children) by {} instance processes, {orphaned} runs orphaned by the kills, {dropped_by_run_once} ticks folded by run_once, states {states:?}",
        ticks.len(),
        per_task.len(),
        runs.len(),
        lag(0.5),
        lag(0.99),
        lag(1.0),
        attempts.len(),
        owners.len(),
    );
}

/// A PostgreSQL server of the test's own (initdb in a temporary folder, a free port),
/// stopped and removed when dropped, even when the test fails.
struct PrivateServer {
    bin: PathBuf,
    data: PathBuf,
    port: u16,
    /// Extra environment of the server (a fake clock).
    env: Vec<(String, String)>,
    _dir: tempfile::TempDir,
}

impl PrivateServer {
    fn start(env: &[(&str, &str)]) -> PrivateServer {
        let bin = postgres_bin();
        let dir = tempfile::tempdir().expect("temp dir");
        let data = dir.path().join("data");
        std::fs::create_dir(&data).unwrap();
        run_checked(
            Command::new("chown")
                .args(["-R", "postgres:postgres"])
                .arg(dir.path()),
        );
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .expect("a free port")
            .port();
        let server = PrivateServer {
            bin,
            data,
            port,
            env: env
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            _dir: dir,
        };
        server.postgres(&[
            "initdb",
            "-D",
            server.data.to_str().unwrap(),
            "-A",
            "trust",
            "-U",
            "postgres",
        ]);
        server.start_again();
        sql_on(&server.url("postgres"), "CREATE DATABASE turbosched");
        server
    }

    fn url(&self, database: &str) -> String {
        format!("postgresql://postgres@127.0.0.1:{}/{database}", self.port)
    }

    fn start_again(&self) {
        let options = format!(
            "-p {} -k {} -c listen_addresses=127.0.0.1",
            self.port,
            self.data.display()
        );
        self.postgres(&[
            "pg_ctl",
            "-D",
            self.data.to_str().unwrap(),
            "-o",
            &options,
            "-l",
            self.data.join("server.log").to_str().unwrap(),
            "-w",
            "start",
        ]);
    }

    fn stop(&self, mode: &str) {
        self.postgres(&[
            "pg_ctl",
            "-D",
            self.data.to_str().unwrap(),
            "-m",
            mode,
            "-w",
            "stop",
        ]);
    }

    /// Runs one of the server's programs as user postgres; panics if it fails.
    fn postgres(&self, args: &[&str]) {
        let mut command = Command::new("runuser");
        command
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join(args[0]))
            .args(&args[1..])
            .envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        run_checked(&mut command);
    }
}

impl Drop for PrivateServer {
    fn drop(&mut self) {
        // Never panics: the folder goes with `_dir` after this.
        let _ = Command::new("runuser")
            .args(["-u", "postgres", "--"])
            .arg(self.bin.join("pg_ctl"))
            .args([
                "-D",
                self.data.to_str().unwrap_or(""),
                "-m",
                "immediate",
                "stop",
            ])
            .output();
    }
}

fn run_checked(command: &mut Command) {
    let output = command.output().expect("run a PostgreSQL program");
    assert!(
        output.status.success(),
        "{command:?}: {}\n{}",
        stdout(&output),
        stderr(&output)
    );
}

/// The newest installed PostgreSQL's bin folder (`/usr/lib/postgresql/<version>/bin`).
fn postgres_bin() -> PathBuf {
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .expect("PostgreSQL is installed under /usr/lib/postgresql")
        .filter_map(|entry| {
            let entry = entry.ok()?;
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    versions
        .pop()
        .expect("an initdb under /usr/lib/postgresql")
        .1
}

const OUTAGE_TASKS: &str = r#"
[tasks.sleeper]
command = ["/bin/sleep", "1"]
schedule = "* * * * * *"
misfire = "run_all"
misfire_grace = "1h"
retries = 2

[tasks.tick]
command = ["/bin/true"]
schedule = "* * * * * *"
misfire = "run_all"
misfire_grace = "1h"
"#;

#[test]
fn a_postgresql_restart_mid_run_doubles_nothing_and_every_instance_fires_again() {
    let server = PrivateServer::start(&[]);
    let url = server.url("turbosched");
    let instances: Vec<Sandbox> = (0..2)
        .map(|_| instance_on(&url, 16, OUTAGE_TASKS))
        .collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    let first = chrono::Utc::now().timestamp() + 1;
    wait_until("a sleeper in flight", Duration::from_secs(30), || {
        let runs = store_at(&url).unfinished_runs().ok()?;
        runs.iter()
            .any(|r| {
                r.task.as_str() == "sleeper" && r.state == RunState::Running && r.pid.is_some()
            })
            .then_some(())
    });
    let down = chrono::Utc::now();
    server.stop("fast");
    wait_for("a few ticks without the database", Duration::from_secs(4));
    server.start_again();
    let up = chrono::Utc::now();
    // Every instance reconnects and starts attempts again.
    let ids: Vec<String> = services
        .iter()
        .map(|s| instance_id(&url, s.pid()))
        .collect();
    wait_until(
        "both instances to start attempts again",
        Duration::from_secs(40),
        || {
            let attempts = all_attempts(&url);
            ids.iter()
                .all(|id| {
                    attempts.iter().any(|a| {
                        a.4.as_deref() == Some(id.as_str())
                            && a.2 > up.timestamp_micros() + 1_000_000
                    })
                })
                .then_some(())
        },
    );
    let settle_mark = chrono::Utc::now() + chrono::Duration::seconds(2);
    wait_until(
        "every run before the mark to end",
        Duration::from_secs(60),
        || {
            let unfinished = store_at(&url).unfinished_runs().ok()?;
            (chrono::Utc::now() > settle_mark + chrono::Duration::seconds(2)
                && unfinished.iter().all(|r| r.scheduled_for > settle_mark))
            .then_some(())
        },
    );
    for service in services {
        service.stop_cleanly();
    }
    let runs = all_runs(&url);
    let ticks = claims(&runs);
    let last = settle_mark.timestamp();
    for task in ["sleeper", "tick"] {
        for second in first..=last {
            let runs = ticks.get(&(task.to_string(), second));
            assert_eq!(
                runs.map_or(0, Vec::len),
                1,
                "{task} at {second}: runs {runs:?}"
            );
        }
    }
    // The ticks of the outage ran later, each once (run_all).
    let outage: Vec<&RunRow> = runs
        .iter()
        .filter(|r| r.task.as_str() == "tick" && r.scheduled_for > down && r.scheduled_for < up)
        .collect();
    assert!(outage.len() >= 3, "{outage:?}");
    assert!(
        outage
            .iter()
            .all(|r| r.queued_at >= up - chrono::Duration::seconds(1)
                && r.state == RunState::Succeeded),
        "{outage:#?}"
    );
    for run in &runs {
        assert!(
            !matches!(run.state, RunState::Running | RunState::Orphaned),
            "run {} of {} left {}",
            run.id,
            run.task,
            run.state
        );
        assert!(
            run.state.is_terminal() || run.scheduled_for > settle_mark,
            "run {} of {} left {}",
            run.id,
            run.task,
            run.state
        );
    }
    assert_never_two_at_once(&url, "sleeper");
    assert_no_child_alive(&url);
    let store = store_at(&url);
    let kinds: BTreeMap<String, usize> = store
        .events_after(0, 1_000_000)
        .unwrap()
        .into_iter()
        .fold(BTreeMap::new(), |mut kinds, event| {
            *kinds.entry(event.kind).or_default() += 1;
            kinds
        });
    eprintln!(
        "postgresql restart: {} runs, {} outage ticks of tick run later; events {kinds:?}",
        runs.len(),
        outage.len()
    );
}

/// A per-second task longer than a second under `overlap`, on two instances, paused
/// (on the cluster) once `enough` of its runs exist; answers the runs once all ended.
fn overlapping_on_two_instances(overlap: &str, enough: impl Fn(&[RunRow]) -> bool) -> Vec<RunRow> {
    let database = Database::create();
    let tasks = format!(
        r#"
[tasks.slow]
command = ["/bin/sleep", "1.6"]
schedule = "* * * * * *"
overlap = "{overlap}"
misfire = "run_all"
misfire_grace = "1h"
"#
    );
    let instances: Vec<Sandbox> = (0..2)
        .map(|_| instance_on(&database.url(), 16, &tasks))
        .collect();
    let services: Vec<Service> = instances.iter().map(Sandbox::serve).collect();
    wait_until("enough runs", Duration::from_secs(60), || {
        enough(&database.runs_of("slow")).then_some(())
    });
    assert_eq!(post(&services[0], "/scheduler/tasks/slow/pause"), 200);
    wait_until("every run to end", Duration::from_secs(60), || {
        let runs = database.runs_of("slow");
        runs.iter().all(|r| r.state.is_terminal()).then_some(())
    });
    for service in services {
        service.stop_cleanly();
    }
    let spans = assert_never_two_at_once(&database.url(), "slow");
    let runs = database.runs_of("slow");
    let ticks = claims(&runs);
    assert!(ticks.values().all(|runs| runs.len() == 1), "{ticks:?}");
    let owners: HashSet<String> = all_attempts(&database.url())
        .into_iter()
        .filter_map(|a| a.4)
        .collect();
    // Which instance starts a run is the database's choice: one may start them all.
    eprintln!(
        "{overlap}: {} runs, {spans} attempts, by {} instance(s)",
        runs.len(),
        owners.len()
    );
    runs
}

#[test]
fn the_queue_overlap_policy_holds_across_instances() {
    let runs = overlapping_on_two_instances("queue", |runs| {
        runs.iter()
            .filter(|r| r.state == RunState::Succeeded)
            .count()
            >= 4
    });
    // Every run waited its turn and ran; none was refused.
    assert!(
        runs.iter().all(|r| r.state == RunState::Succeeded),
        "{runs:#?}"
    );
    let waited = runs
        .iter()
        .filter(|r| {
            r.started_at
                .is_some_and(|s| s - r.queued_at > chrono::Duration::seconds(1))
        })
        .count();
    assert!(waited >= 2, "runs waited for the one before: {runs:#?}");
}

#[test]
fn the_replace_overlap_policy_holds_across_instances() {
    let runs = overlapping_on_two_instances("replace", |runs| {
        runs.iter()
            .filter(|r| r.state == RunState::Aborted && r.attempt.0 > 0)
            .count()
            >= 4
    });
    let aborted: Vec<&RunRow> = runs
        .iter()
        .filter(|r| r.state == RunState::Aborted)
        .collect();
    for run in &aborted {
        let reason = run.reason.as_deref().unwrap_or("");
        let by: i64 = reason
            .strip_prefix("replaced by run ")
            .and_then(|id| id.parse().ok())
            .unwrap_or_else(|| panic!("run {} aborted for {reason:?}", run.id));
        assert!(
            by > run.id.0,
            "run {} replaced by an older run {by}",
            run.id
        );
    }
    // The newest run was replaced by none: it ran to its end.
    let last = runs.last().expect("runs");
    assert_eq!(last.state, RunState::Succeeded, "{last:?}");
    assert!(
        runs.iter()
            .all(|r| matches!(r.state, RunState::Aborted | RunState::Succeeded)),
        "{runs:#?}"
    );
}

/// A `turbosched serve` whose readiness is judged on the database's clock (the harness's
/// `serve` compares heartbeats with this host's clock, which the DST test's database
/// does not share); killed when dropped.
struct Serving {
    child: std::process::Child,
    log: PathBuf,
}

impl Serving {
    fn start(sandbox: &Sandbox, url: &str) -> Serving {
        let log = sandbox.path().join("serve.log");
        let child = sandbox
            .command(&["serve"])
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(&log).unwrap())
            .spawn()
            .expect("start serve");
        let serving = Serving { child, log };
        let pid = serving.child.id();
        wait_until(
            &format!("service pid {pid} registered"),
            Duration::from_secs(30),
            || {
                // The table exists once the instance has migrated the database.
                let rows = try_query(
                    url,
                    &format!(
                        "SELECT count(*) FROM instances
                         WHERE pid = {pid} AND api IS NOT NULL AND stopped_at IS NULL"
                    ),
                )
                .ok()?;
                (rows[0].get::<_, i64>(0) == 1).then_some(())
            },
        );
        serving
    }

    /// SIGTERM; answers whether it exited cleanly.
    fn stop(mut self) -> bool {
        signal(self.child.id(), nix::sys::signal::Signal::SIGTERM);
        let child = &mut self.child;
        let status = wait_until("a clean exit", Duration::from_secs(30), || {
            child.try_wait().expect("try_wait")
        });
        if !status.success() {
            eprintln!("{}", std::fs::read_to_string(&self.log).unwrap_or_default());
        }
        status.success()
    }
}

impl Drop for Serving {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The database's clock, in microseconds.
fn database_micros(url: &str) -> i64 {
    query(
        url,
        "SELECT (extract(epoch FROM clock_timestamp()) * 1000000)::BIGINT",
    )[0]
    .get(0)
}

const DST_NIGHT: &str = r#"
[tasks.every]
command = ["/bin/true"]
schedule = "* * * * * *"
timezone = "America/New_York"
misfire = "run_all"
misfire_grace = "1h"

# 02:00:10 does not exist on the night: once, right after the jump.
[tasks.gap]
command = ["/bin/true"]
schedule = "10 0 2 * * *"
timezone = "America/New_York"

# An interval job in the gap: no fire there.
[tasks.interval]
command = ["/bin/true"]
schedule = "*/5 * 2 * * *"
timezone = "America/New_York"
"#;

/// Due-ness is judged on the database's clock, so the night is the database's: the
/// private server runs under libfaketime from 06:59:40 UTC on 2026-03-08, twenty seconds
/// before New York springs forward (02:00 EST → 03:00 EDT); the two instances keep this
/// host's true clock and correct it by the offset they measure.
#[test]
fn a_dst_night_on_the_databases_clock_fires_each_tick_once_on_two_instances() {
    let library = crate::cluster::faketime_library();
    let server = PrivateServer::start(&[
        ("LD_PRELOAD", library.as_str()),
        ("FAKETIME", "@2026-03-08 06:59:40"),
        ("FAKETIME_DONT_FAKE_MONOTONIC", "1"),
        ("TZ", "UTC"),
    ]);
    let url = server.url("turbosched");
    let jump = chrono::DateTime::parse_from_rfc3339("2026-03-08T07:00:00Z")
        .unwrap()
        .with_timezone(&chrono::Utc);
    let started = database_micros(&url);
    assert!(
        started < jump.timestamp_micros(),
        "the database's clock is not before the jump: {started}"
    );
    let instances: Vec<Sandbox> = (0..2).map(|_| instance_on(&url, 16, DST_NIGHT)).collect();
    let services: Vec<Serving> = instances.iter().map(|i| Serving::start(i, &url)).collect();
    let end = jump + chrono::Duration::seconds(15);
    wait_until(
        "the database's clock past the jump, and every run ended",
        Duration::from_secs(90),
        || {
            let now = database_micros(&url);
            let unfinished = store_at(&url).unfinished_runs().ok()?;
            (now > end.timestamp_micros() + 2_000_000
                && unfinished.iter().all(|r| r.scheduled_for > end))
            .then_some(())
        },
    );
    // Both served the night, each judging every tick's due-ness on the database's clock:
    // a tick one of them judged wrongly (the gap's twice, the interval's in the gap) would
    // be a claim the other did not make, and shows below whichever instance won the
    // others. Who wins each claim is a race, not a promise: one instance may win them all.
    let database_now = chrono::DateTime::from_timestamp_micros(database_micros(&url)).unwrap();
    let live = store_at(&url)
        .live_instances(Duration::from_secs(60), database_now)
        .unwrap();
    assert_eq!(live.len(), 2, "both instances serving: {live:?}");
    for service in services {
        assert!(service.stop());
    }
    let runs = all_runs(&url);
    let ticks = claims(&runs);
    assert!(ticks.values().all(|runs| runs.len() == 1), "{ticks:?}");
    let seconds_of = |task: &str| -> Vec<i64> {
        ticks
            .keys()
            .filter(|(t, _)| t == task)
            .map(|(_, second)| *second)
            .collect()
    };
    // Every real second across the jump, once each.
    let every = seconds_of("every");
    let first = *every.first().expect("runs of every");
    assert!(first < jump.timestamp() - 3, "first tick {first}");
    for second in first..=end.timestamp() {
        assert!(every.contains(&second), "every: tick {second} missing");
    }
    // The fixed time in the gap fires once, at the schedule's tick right after the jump.
    let schedule =
        turbosched::schedule::Schedule::parse("10 0 2 * * *", chrono_tz::America::New_York)
            .unwrap();
    let expected = schedule
        .ticks_after(jump - chrono::Duration::seconds(30))
        .next()
        .unwrap();
    assert!(
        expected >= jump && expected <= jump + chrono::Duration::seconds(10),
        "the schedule's tick after the jump: {expected}"
    );
    assert_eq!(seconds_of("gap"), vec![expected.timestamp()]);
    // The interval job has no tick in the gap, and none elsewhere in the window.
    assert_eq!(seconds_of("interval"), Vec::<i64>::new());
    // Every run of the window succeeded; a tick claimed after it as the services stopped
    // may be left queued, recorded for the next start.
    assert!(
        runs.iter()
            .filter(|r| r.scheduled_for <= end)
            .all(|r| r.state == RunState::Succeeded),
        "{runs:#?}"
    );
}

/// Regression (two engine bugs the storm found): an instance busy with a steady stream of
/// worker reports (more runs due than it can start, a backlog) still fires every tick and
/// renews its lease. Its loop's biased `select!` let a ready report win over a tick due
/// now (a fresh zero-length sleep is not ready at its first poll) and over the heartbeat,
/// so it stopped firing altogether, and fenced itself and killed its children every few
/// seconds.
#[test]
fn an_instance_with_a_backlog_keeps_firing_and_renews_its_lease() {
    let database = Database::create();
    let tasks: String = (0..250)
        .map(|index| {
            format!(
                "[tasks.t{index:03}]\ncommand = [\"/bin/true\"]\nschedule = \"* * * * * *\"\nmisfire = \"run_all\"\nmisfire_grace = \"1h\"\noverlap = \"queue\"\n"
            )
        })
        .collect();
    let sandbox = instance_on(&database.url(), 64, &tasks);
    let service = sandbox.serve();
    let start = chrono::Utc::now().timestamp() + 1;
    wait_until(
        "fifteen seconds of ticks claimed",
        Duration::from_secs(60),
        || {
            database
                .runs_of("t000")
                .iter()
                .any(|r| r.scheduled_for.timestamp() >= start + 15)
                .then_some(())
        },
    );
    service.stop_cleanly();
    let ticks = claims(&database.runs_of("t000"));
    for second in start..=start + 15 {
        let runs = ticks.get(&("t000".to_string(), second));
        assert_eq!(runs.map_or(0, Vec::len), 1, "t000 at {second}: {runs:?}");
    }
    let fenced = database.events_of_kind("instance_fenced");
    assert!(fenced.is_empty(), "{fenced:#?}");
}
