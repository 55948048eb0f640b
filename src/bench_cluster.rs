//! `turbosched bench-cluster`: cluster mode's speed, measured and printed, never asserted.
//!
//! Three setups, one after another, each as real `turbosched serve` processes (this very
//! executable) started in folders of their own with the same generated config (the
//! `bench` config: N tasks `* * * * * *` running `/bin/true`, misfire `skip`, as many
//! workers as tasks, a heartbeat a second): (a) one instance on a SQLite file, (b) one
//! instance on PostgreSQL, (c) M instances on one PostgreSQL database. Each PostgreSQL
//! setup gets a fresh database on the server given, dropped (`WITH (FORCE)`) after.
//!
//! Once every instance has written its `scheduler_started` event, the ticks measured are
//! the S whole seconds from the next one on; the instances get SIGTERM 900 ms after the
//! last of them (the next tick has not come), and the store (`turbosched::store::Store`,
//! either backend) is read: per task and tick measured, its runs — none is a miss, more
//! than one a double — and each run's first attempt: the lag from the tick to the
//! attempt's start (`attempts.started_at`) and to its child's spawn
//! (`attempts.spawned_at`), and the instance that ran it (`attempts.owner`).

use std::collections::HashMap;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use chrono::{DateTime, TimeZone, Utc};

use turbosched::model::{RunState, Trigger};
use turbosched::store::{RunFilter, RunRow, Store};

use crate::bench::{config_text, rss_kib_of, spawn_cost_ms, spawn_floor_line, Lag};

/// What `bench-cluster` is asked to measure.
pub(crate) struct Settings {
    /// Tasks, each `* * * * * *`.
    pub(crate) tasks: usize,
    /// Seconds (ticks) measured per setup.
    pub(crate) seconds: u64,
    /// Instances of the cluster setup.
    pub(crate) instances: usize,
    /// The PostgreSQL server, without a database: `postgres://user@host:port`.
    pub(crate) postgres: String,
}

/// Where one setup keeps its history.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Backend {
    Sqlite,
    Postgres,
}

/// The figures of one setup.
struct Figures {
    label: String,
    ticks: u64,
    expected: u64,
    runs: u64,
    missed: u64,
    doubled: u64,
    by_state: Vec<(String, u64)>,
    extra_attempts: u64,
    start_lag: Option<Lag>,
    spawn_lag: Option<Lag>,
    /// Runs (first attempts) per instance, in the order the instances were started.
    per_instance: Vec<u64>,
    /// Attempts whose owner is none of the instances started.
    unknown_owner: u64,
    peak_rss_kib: u64,
    load_before: String,
    load_after: String,
}

pub(crate) fn run(settings: &Settings) -> Result<ExitCode> {
    let Settings {
        tasks,
        seconds,
        instances,
        ..
    } = *settings;
    if tasks == 0 || seconds == 0 || instances == 0 {
        bail!("--tasks, --seconds and --instances must be at least 1");
    }
    let server = settings.postgres.trim_end_matches('/').to_string();
    let executable = std::env::current_exe().context("cannot find this executable")?;
    let root =
        std::env::temp_dir().join(format!("turbosched-bench-cluster-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    std::fs::create_dir_all(&root).with_context(|| format!("cannot create {}", root.display()))?;

    println!(
        "turbosched bench-cluster: {tasks} tasks × `* * * * * *` → /bin/true, {seconds} s measured per setup, `serve` processes of {}",
        executable.display()
    );
    let spawn_ms = spawn_cost_ms(200)?;
    println!("{}", spawn_floor_line(spawn_ms, tasks));

    let setups = [
        ("1 × SQLite".to_string(), Backend::Sqlite, 1),
        ("1 × PostgreSQL".to_string(), Backend::Postgres, 1),
        (
            format!("{instances} × PostgreSQL"),
            Backend::Postgres,
            instances,
        ),
    ];
    let mut all = Vec::new();
    for (index, (label, backend, count)) in setups.into_iter().enumerate() {
        let folder = root.join(format!("setup{}", index + 1));
        let figures = match backend {
            Backend::Sqlite => {
                let database = folder.join("instance1").join("bench.db");
                measure(
                    &label,
                    &executable,
                    &folder,
                    &database,
                    count,
                    tasks,
                    seconds,
                )?
            }
            Backend::Postgres => {
                let scratch = ScratchDatabase::create(&server)?;
                measure(
                    &label,
                    &executable,
                    &folder,
                    Path::new(&scratch.url()),
                    count,
                    tasks,
                    seconds,
                )?
                // `scratch` drops the database here.
            }
        };
        print_summary(&figures);
        all.push(figures);
    }
    println!();
    print_table(&all, spawn_ms, tasks);
    let _ = std::fs::remove_dir_all(&root);
    Ok(ExitCode::SUCCESS)
}

/// Runs one setup: `count` instances in `folder/instance<k>` on `database`, and reads
/// the figures back.
fn measure(
    label: &str,
    executable: &Path,
    folder: &Path,
    database: &Path,
    count: usize,
    tasks: usize,
    seconds: u64,
) -> Result<Figures> {
    println!("\n{label}: starting {count} instance(s) …");
    let database_text = database.display().to_string();
    let text = config_text(&database_text, tasks, "logs", "state", Some("127.0.0.1:0"));
    // The store first: the schema exists before any instance opens it.
    let store = Store::open(database).with_context(|| format!("cannot open {database_text}"))?;
    let launched = Utc::now() - chrono::Duration::seconds(1);
    let mut children = Vec::new();
    for k in 1..=count {
        let dir = folder.join(format!("instance{k}"));
        std::fs::create_dir_all(&dir)
            .with_context(|| format!("cannot create {}", dir.display()))?;
        std::fs::write(dir.join("bench.toml"), &text)
            .with_context(|| format!("cannot write {}", dir.display()))?;
        let output = dir.join("serve.out");
        let stdout = std::fs::File::create(&output)
            .with_context(|| format!("cannot create {}", output.display()))?;
        let stderr = stdout.try_clone()?;
        let child = Command::new(executable)
            .args(["--config", "bench.toml", "serve"])
            .current_dir(&dir)
            .stdin(Stdio::null())
            .stdout(stdout)
            .stderr(stderr)
            .spawn()
            .with_context(|| format!("cannot start {}", executable.display()))?;
        children.push(Instance { child, output });
    }
    let result = drive(&store, &mut children, launched, tasks, seconds, label);
    // Whatever happened, no instance outlives the setup.
    for instance in &mut children {
        instance.stop();
    }
    result
}

struct Instance {
    child: Child,
    output: PathBuf,
}

impl Instance {
    /// SIGTERM, then up to 60 s for a clean stop, then SIGKILL.
    fn stop(&mut self) {
        if matches!(self.child.try_wait(), Ok(Some(_))) {
            return;
        }
        let pid = nix::unistd::Pid::from_raw(self.child.id() as i32);
        let _ = nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGTERM);
        let deadline = std::time::Instant::now() + Duration::from_secs(60);
        while std::time::Instant::now() < deadline {
            if matches!(self.child.try_wait(), Ok(Some(_))) {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "instance pid {} did not stop within 60 s of SIGTERM: killed",
            self.child.id()
        );
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last lines the instance wrote to stdout and stderr.
    fn tail(&self) -> String {
        let mut text = String::new();
        if let Ok(mut file) = std::fs::File::open(&self.output) {
            let length = file.metadata().map(|m| m.len()).unwrap_or(0);
            let _ = file.seek(SeekFrom::Start(length.saturating_sub(2000)));
            let _ = file.read_to_string(&mut text);
        }
        text
    }
}

/// Waits for every instance to be up, lets them run `seconds` whole ticks, stops them and
/// reads the figures.
fn drive(
    store: &Store,
    children: &mut [Instance],
    launched: DateTime<Utc>,
    tasks: usize,
    seconds: u64,
    label: &str,
) -> Result<Figures> {
    let count = children.len() as u64;
    let started_waiting = std::time::Instant::now();
    loop {
        for instance in children.iter_mut() {
            if let Ok(Some(status)) = instance.child.try_wait() {
                bail!(
                    "an instance ended during start-up ({status}):\n{}",
                    instance.tail()
                );
            }
        }
        if store.count_events(&["scheduler_started"], launched)? >= count {
            break;
        }
        if started_waiting.elapsed() > Duration::from_secs(300) {
            bail!("the instances were not all up within 300 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let up = Utc::now();
    // Which registered instance is which child, by pid.
    let pids: Vec<i64> = children.iter().map(|c| i64::from(c.child.id())).collect();
    let owners: HashMap<String, usize> = store
        .live_instances(Duration::from_secs(3600), up)?
        .into_iter()
        .filter_map(|row| {
            pids.iter()
                .position(|pid| *pid == row.pid)
                .map(|k| (row.id, k))
        })
        .collect();
    println!(
        "{label}: all up {:.1} s after launch",
        started_waiting.elapsed().as_secs_f64()
    );
    let first_tick = up.timestamp() + 1;
    let last_tick = first_tick + seconds as i64 - 1;
    let stop_at = at_micros((last_tick * 1000 + 900) * 1000)?;
    let load_before = loadavg();
    let mut peak_rss_kib = 0;
    loop {
        let now = Utc::now();
        if now >= stop_at {
            break;
        }
        for instance in children.iter_mut() {
            peak_rss_kib = peak_rss_kib.max(rss_kib_of(&instance.child.id().to_string()));
            if let Ok(Some(status)) = instance.child.try_wait() {
                bail!(
                    "an instance ended while measured ({status}):\n{}",
                    instance.tail()
                );
            }
        }
        let left = (stop_at - now).to_std().unwrap_or_default();
        std::thread::sleep(left.min(Duration::from_millis(200)));
    }
    let load_after = loadavg();
    for instance in children.iter_mut() {
        instance.stop();
    }
    analyse(
        store,
        label,
        tasks,
        (first_tick, last_tick),
        up - chrono::Duration::seconds(5),
        &owners,
        children.len(),
    )
    .map(|mut figures| {
        figures.peak_rss_kib = peak_rss_kib;
        figures.load_before = load_before;
        figures.load_after = load_after;
        figures
    })
}

/// Reads the runs of the ticks `first..=last` (whole seconds) back from the store.
fn analyse(
    store: &Store,
    label: &str,
    tasks: usize,
    (first, last): (i64, i64),
    since: DateTime<Utc>,
    owners: &HashMap<String, usize>,
    count: usize,
) -> Result<Figures> {
    let from = at_micros(first * 1_000_000)?;
    let to = at_micros(last * 1_000_000)?;
    let runs: Vec<RunRow> = store
        .runs(&RunFilter {
            since: Some(since),
            limit: usize::MAX >> 1,
            ..RunFilter::default()
        })?
        .into_iter()
        .filter(|run| {
            matches!(run.trigger, Trigger::Schedule | Trigger::Catchup)
                && run.scheduled_for >= from
                && run.scheduled_for <= to
        })
        .collect();
    let ticks = (last - first + 1) as u64;
    let expected = ticks * tasks as u64;
    let mut per_tick: HashMap<(&str, i64), u64> = HashMap::new();
    let mut by_state: HashMap<RunState, u64> = HashMap::new();
    for run in &runs {
        *per_tick
            .entry((run.task.0.as_str(), run.scheduled_for.timestamp_micros()))
            .or_default() += 1;
        *by_state.entry(run.state).or_default() += 1;
    }
    let distinct = per_tick.len() as u64;
    let doubled = per_tick.values().filter(|n| **n > 1).count() as u64;
    let mut by_state: Vec<(String, u64)> = by_state
        .into_iter()
        .map(|(state, n)| (state.as_str().to_string(), n))
        .collect();
    by_state.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));

    // Each run's attempts, read on a few threads (one query a run).
    let threads = 4usize;
    let chunk = runs.len().div_ceil(threads).max(1);
    let read: Vec<Result<Vec<Sample>>> = std::thread::scope(|scope| {
        let handles: Vec<_> = runs
            .chunks(chunk)
            .map(|part| {
                let store = store.clone();
                scope.spawn(move || -> Result<Vec<Sample>> {
                    let mut samples = Vec::with_capacity(part.len());
                    for run in part {
                        let attempts = store.attempts(run.id)?;
                        let first = attempts.iter().min_by_key(|a| a.attempt.0);
                        samples.push(Sample {
                            attempts: attempts.len() as u64,
                            start_ms: first.map(|a| lag_ms(a.started_at, run.scheduled_for)),
                            spawn_ms: first
                                .and_then(|a| a.spawned_at)
                                .map(|at| lag_ms(at, run.scheduled_for)),
                            owner: first.and_then(|a| a.owner.clone()),
                        });
                    }
                    Ok(samples)
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join()
                    .unwrap_or_else(|_| Err(anyhow::anyhow!("a reader thread panicked")))
            })
            .collect()
    });
    let mut start = Vec::new();
    let mut spawn = Vec::new();
    let mut extra_attempts = 0;
    let mut per_instance = vec![0u64; count];
    let mut unknown_owner = 0;
    for part in read {
        for sample in part? {
            extra_attempts += sample.attempts.saturating_sub(1);
            start.extend(sample.start_ms);
            spawn.extend(sample.spawn_ms);
            match sample.owner.as_ref().and_then(|o| owners.get(o)) {
                Some(k) => per_instance[*k] += 1,
                None if sample.attempts > 0 => unknown_owner += 1,
                None => {}
            }
        }
    }
    start.sort_by(f64::total_cmp);
    spawn.sort_by(f64::total_cmp);
    Ok(Figures {
        label: label.to_string(),
        ticks,
        expected,
        runs: runs.len() as u64,
        missed: expected.saturating_sub(distinct),
        doubled,
        by_state,
        extra_attempts,
        start_lag: Lag::of_sorted(&start),
        spawn_lag: Lag::of_sorted(&spawn),
        per_instance,
        unknown_owner,
        peak_rss_kib: 0,
        load_before: String::new(),
        load_after: String::new(),
    })
}

struct Sample {
    attempts: u64,
    start_ms: Option<f64>,
    spawn_ms: Option<f64>,
    owner: Option<String>,
}

fn lag_ms(at: DateTime<Utc>, tick: DateTime<Utc>) -> f64 {
    (at - tick).num_microseconds().unwrap_or(i64::MAX) as f64 / 1000.0
}

fn at_micros(micros: i64) -> Result<DateTime<Utc>> {
    Utc.timestamp_micros(micros)
        .single()
        .context("a time out of range")
}

/// The 1-, 5- and 15-minute load averages.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|text| {
            text.split_whitespace()
                .take(3)
                .collect::<Vec<_>>()
                .join(" ")
        })
        .unwrap_or_else(|_| "?".into())
}

fn print_summary(f: &Figures) {
    let states: Vec<String> = f
        .by_state
        .iter()
        .map(|(state, n)| format!("{state} {n}"))
        .collect();
    println!(
        "{}: {} ticks, {} fires expected, {} runs ({}), missed {}, doubled {}, load {} → {}",
        f.label,
        f.ticks,
        f.expected,
        f.runs,
        states.join(", "),
        f.missed,
        f.doubled,
        f.load_before,
        f.load_after
    );
}

fn print_table(all: &[Figures], spawn_ms: f64, tasks: usize) {
    let width = 18;
    let mut header = format!("{:<34}", "");
    for f in all {
        header.push_str(&format!("{:>width$}", f.label));
    }
    println!("{header}");
    let row = |name: &str, value: &dyn Fn(&Figures) -> String| {
        let mut line = format!("{name:<34}");
        for f in all {
            line.push_str(&format!("{:>width$}", value(f)));
        }
        println!("{line}");
    };
    row("ticks measured", &|f| f.ticks.to_string());
    row("fires expected", &|f| f.expected.to_string());
    row("runs recorded", &|f| f.runs.to_string());
    row("missed (tick without a run)", &|f| f.missed.to_string());
    row("doubled (tick with > 1 run)", &|f| f.doubled.to_string());
    row("skipped (misfire skip)", &|f| {
        state_count(f, "skipped").to_string()
    });
    row("attempts beyond the first", &|f| {
        f.extra_attempts.to_string()
    });
    type Pick = fn(&Lag) -> f64;
    let quantiles: [(&str, Pick); 4] = [
        ("p50", |l| l.p50),
        ("p90", |l| l.p90),
        ("p99", |l| l.p99),
        ("max", |l| l.max),
    ];
    for (name, pick) in quantiles {
        row(&format!("lag tick → run start, {name} (ms)"), &|f| {
            f.start_lag
                .as_ref()
                .map_or("-".into(), |l| format!("{:.1}", pick(l)))
        });
    }
    for (name, pick) in quantiles {
        row(&format!("lag tick → child spawned, {name} (ms)"), &|f| {
            f.spawn_lag
                .as_ref()
                .map_or("-".into(), |l| format!("{:.1}", pick(l)))
        });
    }
    row("runs per instance", &|f| {
        f.per_instance
            .iter()
            .map(u64::to_string)
            .collect::<Vec<_>>()
            .join("/")
    });
    row("runs of an unknown instance", &|f| {
        f.unknown_owner.to_string()
    });
    row("peak RSS, largest instance (MiB)", &|f| {
        format!("{:.1}", f.peak_rss_kib as f64 / 1024.0)
    });
    row("load average 1 min, start → end", &|f| {
        format!(
            "{} → {}",
            f.load_before.split(' ').next().unwrap_or("?"),
            f.load_after.split(' ').next().unwrap_or("?")
        )
    });
    println!("{}", spawn_floor_line(spawn_ms, tasks));
}

fn state_count(f: &Figures, state: &str) -> u64 {
    f.by_state
        .iter()
        .find(|(s, _)| s == state)
        .map_or(0, |(_, n)| *n)
}

/// A database of its own on the server, `turbosched_bench_<random>`, dropped with
/// `WITH (FORCE)` when this is dropped.
struct ScratchDatabase {
    server: String,
    name: String,
}

impl ScratchDatabase {
    fn create(server: &str) -> Result<ScratchDatabase> {
        let name = format!("turbosched_bench_{}", uuid::Uuid::new_v4().simple());
        admin(server, &format!("CREATE DATABASE {name}"))
            .with_context(|| format!("cannot create database {name} on {}", redacted(server)))?;
        Ok(ScratchDatabase {
            server: server.to_string(),
            name,
        })
    }

    fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }
}

impl Drop for ScratchDatabase {
    fn drop(&mut self) {
        let sql = format!("DROP DATABASE IF EXISTS {} WITH (FORCE)", self.name);
        if let Err(err) = admin(&self.server, &sql) {
            eprintln!("{}: {sql}: {err:#}", redacted(&self.server));
        }
    }
}

/// Runs `sql` on the `postgres` database of `server`.
fn admin(server: &str, sql: &str) -> Result<()> {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    runtime.block_on(async {
        let (client, connection) =
            tokio_postgres::connect(&format!("{server}/postgres"), tokio_postgres::NoTls)
                .await
                .context("cannot connect")?;
        let driver = tokio::spawn(connection);
        let result = client.batch_execute(sql).await.context("refused");
        drop(client);
        let _ = driver.await;
        result
    })
}

/// `server` without its password, if it has one.
fn redacted(server: &str) -> String {
    match (server.find("://"), server.rfind('@')) {
        (Some(scheme), Some(at)) if at > scheme => {
            let credentials = &server[scheme + 3..at];
            match credentials.split_once(':') {
                Some((user, _)) => format!("{}{user}:***{}", &server[..scheme + 3], &server[at..]),
                None => server.to_string(),
            }
        }
        _ => server.to_string(),
    }
}
