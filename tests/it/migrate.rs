//! Moving up (issue 12, test 8): `turbosched migrate --to postgresql://…` copies a real
//! SQLite history into an empty PostgreSQL database, nothing lost, counts equal, and the
//! service then serves from PostgreSQL where the history left off. Each test on a
//! database of its own on the server of `TURBOSCHED_TEST_POSTGRES` (default
//! `postgres://postgres@127.0.0.1:5432`), dropped after, even on failure.

use std::path::Path;
use std::time::Duration;

use turbosched::model::{RunState, Trigger};
use turbosched::store::{RunFilter, Store};

use crate::support::*;

/// A per-second task that succeeds, one that fails every attempt (three, with retries),
/// and one run only by hand.
const TASKS: &str = r#"
[tasks.tick]
handler = "ping"
schedule = "* * * * * *"
[tasks.flaky]
handler = "ping"
schedule = "* * * * * *"
params = { fail_times = 9 }
retries = 2
retry_backoff = { initial = "10ms", jitter = false }
[tasks.by_hand]
handler = "ping"
"#;

/// The tables compared on both sides.
const TABLES: [&str; 5] = ["runs", "attempts", "events", "task_state", "instances"];

#[test]
fn migrate_copies_a_real_history_to_postgres_and_the_service_goes_on_from_there() {
    let sandbox = Sandbox::new(TASKS);
    let service = sandbox.serve();
    let (code, manual) = sandbox.cli_json(&["run", "by_hand", "--json"]);
    assert_eq!(code, 0, "{manual}");
    let manual = run_id(&manual);
    wait_until(
        "3 tick runs succeeded, a flaky run failed after 3 attempts, the manual run succeeded",
        Duration::from_secs(30),
        || {
            let ticks = sandbox.runs_of("tick");
            let succeeded = ticks
                .iter()
                .filter(|r| r.state == RunState::Succeeded)
                .count();
            let failed = sandbox
                .runs_of("flaky")
                .iter()
                .any(|r| r.state == RunState::Failed && r.attempt.0 == 3);
            let by_hand = sandbox.run(manual).state == RunState::Succeeded;
            (succeeded >= 3 && failed && by_hand).then_some(())
        },
    );
    service.stop();

    let sqlite = sandbox.path().join("data/scheduler.db");
    let before = sqlite_counts(&sqlite);
    let old_runs = all_runs(&sandbox.store());
    let old_max = old_runs.iter().map(|r| r.id.0).max().expect("runs");
    let old_events = sandbox.store().events_after(0, 1_000_000).unwrap();
    let old_seq = sandbox.store().last_event_seq().unwrap();

    let database = ScratchDatabase::create();
    let url = database.url();
    let output = sandbox.cli(&["migrate", "--to", &url]);
    let printed = stdout(&output);
    assert_eq!(
        output.status.code(),
        Some(0),
        "{printed}{}",
        stderr(&output)
    );
    assert!(
        printed.starts_with("migrated data/scheduler.db -> "),
        "{printed}"
    );
    assert!(printed.contains(" s\n"), "the time it took: {printed}");
    for (table, count) in TABLES.iter().zip(&before) {
        let line = format!("\n{table:<16} {count:>12} {count:>12}\n");
        assert!(printed.contains(&line), "{line:?} in\n{printed}");
    }
    assert!(
        printed.contains(&format!(
            "ok: every count equal; new runs are numbered from {}",
            old_max + 1
        )),
        "{printed}"
    );

    // Counted by PostgreSQL itself.
    assert_eq!(
        postgres_counts(&url),
        before,
        "runs, attempts, events, task_state, instances"
    );
    assert!(
        before[0] >= 5 && before[1] > before[0] && before[2] > before[1],
        "{before:?}"
    );

    // Field by field, through the store on each side: every run with its attempts, and
    // every event with its seq.
    let pg = Store::open(Path::new(&url)).expect("open the migrated database");
    let new_runs = all_runs(&pg);
    assert_eq!(new_runs.len(), old_runs.len());
    for (old, new) in old_runs.iter().zip(&new_runs) {
        assert_eq!(format!("{old:?}"), format!("{new:?}"));
        assert_eq!(
            format!("{:?}", sandbox.store().attempts(old.id).unwrap()),
            format!("{:?}", pg.attempts(new.id).unwrap()),
            "attempts of run {}",
            old.id
        );
    }
    let flaky = new_runs
        .iter()
        .find(|r| r.task.as_str() == "flaky" && r.state == RunState::Failed)
        .expect("a failed flaky run");
    assert_eq!(pg.attempts(flaky.id).unwrap().len(), 3);
    let by_hand = pg.run(manual).unwrap().expect("the manual run");
    assert_eq!(by_hand.trigger, Trigger::Manual);
    assert_eq!(by_hand.state, RunState::Succeeded);
    assert_eq!(
        format!("{old_events:?}"),
        format!("{:?}", pg.events_after(0, 1_000_000).unwrap())
    );
    assert_eq!(pg.last_event_seq().unwrap(), old_seq);
    assert_eq!(pg.integrity_check().unwrap(), "ok");
    drop(pg);

    // Serving from PostgreSQL: new runs numbered after the old ones, events after the old
    // seq, the CLI sees both, the audit accounts for every tick.
    std::fs::write(
        sandbox.path().join("config/scheduler.toml"),
        format!("{FAST_SCHEDULER}\n{TASKS}").replace(
            "database = \"data/scheduler.db\"",
            &format!("database = \"{url}\""),
        ),
    )
    .unwrap();
    let service = sandbox.serve_on(Path::new(&url));
    let pg = Store::open(Path::new(&url)).unwrap();
    let new_ticks = wait_until(
        "2 new tick runs to succeed on PostgreSQL",
        Duration::from_secs(20),
        || {
            let ticks: Vec<_> = all_runs(&pg)
                .into_iter()
                .filter(|r| r.id.0 > old_max && r.task.as_str() == "tick")
                .filter(|r| r.state == RunState::Succeeded)
                .collect();
            (ticks.len() >= 2).then_some(ticks)
        },
    );
    service.stop();
    let (code, listed) = sandbox.cli_json(&["runs", "--limit", "100000", "--json"]);
    assert_eq!(code, 0, "{listed}");
    let listed: Vec<i64> = listed
        .as_array()
        .unwrap_or_else(|| panic!("a list of runs: {listed}"))
        .iter()
        .filter_map(|run| run["id"].as_i64())
        .collect();
    for run in old_runs
        .iter()
        .map(|r| r.id)
        .chain(new_ticks.iter().map(|r| r.id))
    {
        assert!(
            listed.contains(&run.0),
            "run {run} in `turbosched runs`: {listed:?}"
        );
    }
    let events = pg.events_after(old_seq, 1_000_000).unwrap();
    assert!(
        events.first().is_some_and(|e| e.seq == old_seq + 1),
        "events go on from seq {old_seq}: {:?}",
        events.first()
    );
    let audit = sandbox.cli(&["audit", "--since", "1h"]);
    assert_eq!(
        audit.status.code(),
        Some(0),
        "{}{}",
        stdout(&audit),
        stderr(&audit)
    );
    assert!(
        stdout(&audit).contains("integrity: ok"),
        "{}",
        stdout(&audit)
    );
    assert!(stdout(&audit).contains("ok: every tick accounted for, none doubled"));
    drop(pg);
}

#[test]
fn migrate_into_a_database_that_is_not_empty_is_refused_and_changes_nothing() {
    let sandbox = Sandbox::new(TASKS);
    // A foreground run (no service up) writes a small history.
    let output = sandbox.cli(&["run", "by_hand"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    let database = ScratchDatabase::create();
    let url = database.url();
    let first = sandbox.cli(&["migrate", "--to", &url]);
    assert_eq!(first.status.code(), Some(0), "{}", stderr(&first));
    let counts = postgres_counts(&url);
    let counter = event_counter(&url);

    let again = sandbox.cli(&["migrate", "--to", &url]);
    assert_eq!(again.status.code(), Some(2), "{}", stdout(&again));
    let err = stderr(&again);
    assert!(
        err.contains(&format!(
            "error: {url} is not empty: found {} runs, {} attempts, {} task_state rows, {} events, {} instances, 0 alert cursors, 0 alert deliveries; migrate copies into an empty database only",
            counts[0], counts[1], counts[3], counts[2], counts[4]
        )),
        "{err}"
    );
    assert!(stdout(&again).is_empty(), "{}", stdout(&again));
    assert_eq!(postgres_counts(&url), counts);
    assert_eq!(event_counter(&url), counter);
}

#[test]
fn migrate_refuses_a_live_instance_a_file_that_is_no_run_database_and_a_url_that_is_no_postgres() {
    let sandbox = Sandbox::new(TASKS);
    std::fs::write(sandbox.path().join("notes.db"), "not a database").unwrap();
    let output = sandbox.cli(&[
        "migrate",
        "--from",
        "notes.db",
        "--to",
        "postgresql://127.0.0.1:1/none",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("error: notes.db: not a turbosched run database: expected a SQLite file with the tables runs, attempts, task_state, events, instances, meta, found a file that is not a SQLite database"),
        "{}",
        stderr(&output)
    );
    let output = sandbox.cli(&[
        "migrate",
        "--from",
        "missing.db",
        "--to",
        "postgresql://x/y",
    ]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("error: missing.db: no such file"),
        "{}",
        stderr(&output)
    );

    let service = sandbox.serve();
    let output = sandbox.cli(&["migrate", "--to", "postgresql://127.0.0.1:1/none"]);
    assert_eq!(output.status.code(), Some(2));
    let err = stderr(&output);
    assert!(
        err.contains(&format!(
            "error: data/scheduler.db: instance {}",
            sandbox
                .store()
                .live_instances(Duration::from_secs(30), chrono::Utc::now())
                .unwrap()[0]
                .id
        )) && err.contains(&format!("(pid {} on ", service.pid()))
            && err.contains("is live")
            && err.contains("or pass --force"),
        "{err}"
    );
    service.stop();

    let output = sandbox.cli(&["migrate", "--to", "data/other.db"]);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains(
            "error: --to: expected a PostgreSQL URL such as postgresql://user@host:5432/db, found \"data/other.db\""
        ),
        "{}",
        stderr(&output)
    );
}

/// Every run of `store`, oldest first.
fn all_runs(store: &Store) -> Vec<turbosched::store::RunRow> {
    let mut runs = store
        .runs(&RunFilter {
            limit: 1_000_000,
            ..RunFilter::default()
        })
        .unwrap();
    runs.sort_by_key(|r| r.id);
    runs
}

/// Rows of [`TABLES`] in the SQLite file.
fn sqlite_counts(path: &Path) -> Vec<i64> {
    let connection = rusqlite::Connection::open(path).unwrap();
    TABLES
        .iter()
        .map(|table| {
            connection
                .query_row(&format!("SELECT count(*) FROM {table}"), [], |row| {
                    row.get(0)
                })
                .unwrap()
        })
        .collect()
}

/// Rows of [`TABLES`] in the PostgreSQL database.
fn postgres_counts(url: &str) -> Vec<i64> {
    TABLES
        .iter()
        .map(|table| query_i64(url, &format!("SELECT count(*) FROM {table}")))
        .collect()
}

fn event_counter(url: &str) -> i64 {
    query_i64(url, "SELECT value FROM meta WHERE key = 'event_seq'")
}

/// One number from `sql` on the database at `url`.
fn query_i64(url: &str, sql: &str) -> i64 {
    on_postgres(url, |client| async move {
        client.query_one(sql, &[]).await.unwrap().get(0)
    })
}

/// Runs `work` with a connection to `url` on a runtime of its own.
fn on_postgres<T, F, Fut>(url: &str, work: F) -> T
where
    F: FnOnce(std::rc::Rc<tokio_postgres::Client>) -> Fut,
    Fut: std::future::Future<Output = T>,
{
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let result = runtime.block_on(async {
        let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
            .await
            .unwrap_or_else(|err| panic!("connect to {url}: {err}"));
        let driver = tokio::spawn(connection);
        let client = std::rc::Rc::new(client);
        let result = work(client.clone()).await;
        drop(client);
        let _ = driver.await;
        result
    });
    runtime.shutdown_background();
    result
}

/// A database of its own for one test: `CREATE DATABASE ts_<random>`, dropped `WITH
/// (FORCE)` when the guard drops, whether the test passed or not.
struct ScratchDatabase {
    server: String,
    name: String,
}

impl ScratchDatabase {
    fn create() -> ScratchDatabase {
        let server = std::env::var("TURBOSCHED_TEST_POSTGRES")
            .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string());
        let name = format!("ts_{}", uuid::Uuid::new_v4().simple());
        admin(&server, &format!("CREATE DATABASE {name}"));
        ScratchDatabase { server, name }
    }

    fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }
}

impl Drop for ScratchDatabase {
    /// Never panics: it also runs while a failed test unwinds.
    fn drop(&mut self) {
        let drop_it = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(err) = try_admin(&self.server, &drop_it) {
            eprintln!("{}: {drop_it}: {err}", self.server);
        }
    }
}

fn admin(server: &str, sql: &str) {
    try_admin(server, sql).unwrap_or_else(|err| panic!("{server}: {sql}: {err}"));
}

/// Runs `sql` on the `postgres` database of `server`.
fn try_admin(server: &str, sql: &str) -> Result<(), String> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|err| err.to_string())?;
    let result = runtime.block_on(async {
        let (client, connection) =
            tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
                .await
                .map_err(|err| err.to_string())?;
        let driver = tokio::spawn(connection);
        let result = client
            .batch_execute(sql)
            .await
            .map_err(|err| err.to_string());
        drop(client);
        let _ = driver.await;
        result
    });
    runtime.shutdown_background();
    result
}
