//! `turbosched bench`: the scheduler core's speed, measured and printed, never asserted.
//!
//! N tasks, each `* * * * * *` running `/bin/true` as a real child process, every run
//! durably recorded in a real SQLite file, for S seconds. Prints: fires expected and
//! claimed (missed = expected − claimed), outcomes, lag from the nominal tick to the
//! child's start (the instant the process was spawned) and to the `running` transition,
//! and the peak resident memory of the process (engine, store and runners; the children
//! are separate processes).

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use rusqlite::Connection;

use turbosched::config;
use turbosched::engine::{Engine, Mode, SystemClock};
use turbosched::store::Store;

/// What `turbosched bench` measures.
pub(crate) struct Settings {
    /// Tasks, each `* * * * * *` (or, with `distinct`, each on its own hourly expression).
    pub(crate) tasks: usize,
    /// Seconds measured.
    pub(crate) seconds: u64,
    /// Folder for the database and logs; a temporary one when `None`.
    pub(crate) dir: Option<PathBuf>,
    /// The tasks on distinct hourly expressions that do not come due in the window, and
    /// one per-second probe beside them: a lone fire's latency and the RSS of distinct
    /// expressions.
    pub(crate) distinct: bool,
    /// Start-up measured again with these task counts (fresh database and log folder).
    pub(crate) startup_tasks: Vec<usize>,
}

pub(crate) fn run(settings: &Settings) -> Result<ExitCode> {
    let Settings {
        tasks,
        seconds,
        distinct,
        ..
    } = *settings;
    let temporary = tempfile_dir()?;
    let dir = settings.dir.clone().unwrap_or_else(|| temporary.clone());
    std::fs::create_dir_all(&dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let database = dir.join("bench.db");
    remove_database(&database);
    let logs = dir.join("logs");
    let _ = std::fs::remove_dir_all(&logs);
    let state = dir.join("state").display().to_string();
    let text = if distinct {
        distinct_config_text(
            &database.display().to_string(),
            tasks,
            &logs.display().to_string(),
            &state,
            chrono::Utc::now(),
        )
    } else {
        config_text(
            &database.display().to_string(),
            tasks,
            &logs.display().to_string(),
            &state,
            None,
        )
    };
    let config_path = dir.join("bench.toml");
    std::fs::write(&config_path, &text)?;
    let config = Arc::new(config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?);
    let store = Store::open(&database)?;
    // The per-second tasks: every one of them fires at every tick.
    let every_second = if distinct { 1 } else { tasks };

    if distinct {
        println!(
            "turbosched bench --distinct: {tasks} tasks on distinct hourly expressions (none due in the window) + 1 probe `* * * * * *` → /bin/true, {seconds}s, database {}",
            database.display()
        );
    } else {
        println!(
            "turbosched bench: {tasks} tasks × `* * * * * *` → /bin/true, {seconds}s, database {}",
            database.display()
        );
    }
    println!("machine load:           {} (before)", load_average());
    let spawn_ms = spawn_cost_ms(200)?;
    println!("{}", spawn_floor_line(spawn_ms, every_second));
    let (floor, floor_cpu, lone) = if distinct {
        let hot = lone_floor(&dir, LONE_ROUNDS, Duration::ZERO, true)?;
        let lone = lone_floor(&dir, LONE_QUIET_ROUNDS, LONE_QUIET, true)?;
        let spawn_only = lone_floor(&dir, LONE_QUIET_ROUNDS, LONE_QUIET, false)?;
        println!(
            "lone-fire floor:        p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms ({LONE_QUIET_ROUNDS} rounds {} ms apart, as a fire claimed at its tick meets the machine: a 40 KiB write + fdatasync in the database's folder, then posix_spawn of /bin/true with two pipes; one durable commit and one start, nothing else)",
            lone.p50,
            lone.p90,
            lone.p99,
            LONE_QUIET.as_millis()
        );
        println!(
            "  back to back:         p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms ({LONE_ROUNDS} rounds with no pause: the CPUs and the disk kept awake)",
            hot.p50, hot.p90, hot.p99
        );
        println!(
            "  spawn alone:          p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms ({LONE_QUIET_ROUNDS} rounds {} ms apart, the start without the commit: what a fire claimed before its tick meets, as turbosched's are)",
            spawn_only.p50,
            spawn_only.p90,
            spawn_only.p99,
            LONE_QUIET.as_millis()
        );
        (0.0, Cpu::default(), Some((lone, spawn_only)))
    } else {
        let (floor, floor_cpu) = burst_floor(every_second, BURST_THREADS)?;
        println!(
            "burst floor:            {floor:.0} ms for {BURST_THREADS} threads to start and reap {every_second} /bin/true (posix_spawn + wait, no bookkeeping; median of 3); CPU per child: {:.0} µs the spawning process, {:.0} µs the child",
            floor_cpu.own, floor_cpu.children
        );
        (floor, floor_cpu, None)
    };
    let peak_rss = Arc::new(AtomicU64::new(0));
    let peak_fds = Arc::new(AtomicU64::new(0));
    let sampling_ns = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let (started, serving, stopped, cpu, steady_cpu, commits) = runtime.block_on(async {
        let mut engine = Engine::new(
            config.clone(),
            store.clone(),
            Arc::new(SystemClock),
            Mode::Serve,
        );
        let ready = Arc::new(Ready::default());
        engine.set_service_manager(ready.clone());
        let handle = engine.handle();
        let started = chrono::Utc::now();
        let sampler = {
            let peak = peak_rss.clone();
            let fds = peak_fds.clone();
            let spent = sampling_ns.clone();
            tokio::spawn(async move {
                loop {
                    // Listing a thousand descriptors costs CPU the service does not spend:
                    // counted here, taken out of the service's figure.
                    let from = thread_cpu_ns();
                    peak.fetch_max(rss_kib(), Ordering::Relaxed);
                    fds.fetch_max(open_descriptors(), Ordering::Relaxed);
                    spent.fetch_add(thread_cpu_ns().saturating_sub(from), Ordering::Relaxed);
                    tokio::time::sleep(Duration::from_millis(100)).await;
                }
            })
        };
        let engine_task = tokio::spawn(engine.run());
        ready.notify.notified().await;
        let serving = chrono::Utc::now();
        let window_end = tokio::time::Instant::now() + Duration::from_secs(seconds);
        // The service's own CPU from serving to stop: start-up is its own figure.
        let cpu_from = Cpu::now();
        let sampling_from = sampling_ns.load(Ordering::Relaxed);
        // And from the second tick on: the first run of each task also creates its log
        // file, which a service that has been serving has done long ago.
        let second_tick = second_tick_of(serving);
        let to_second_tick = (second_tick - chrono::Utc::now())
            .to_std()
            .unwrap_or_default();
        tokio::time::sleep_until((tokio::time::Instant::now() + to_second_tick).min(window_end))
            .await;
        let steady_from = (Cpu::now(), sampling_ns.load(Ordering::Relaxed));
        let spawners_from = (spawner_seconds(), context_switches());
        tokio::time::sleep_until(window_end).await;
        let steady_spawners = spawner_seconds() - spawners_from.0;
        let switched = context_switches();
        let steady_switches = (
            switched.0.saturating_sub(spawners_from.1 .0),
            switched.1.saturating_sub(spawners_from.1 .1),
        );
        let own_cpu_since = |from: Cpu, sampling_from: u64| {
            let mut cpu = Cpu::now().since(from);
            let sampling = sampling_ns.load(Ordering::Relaxed) - sampling_from;
            cpu.own -= sampling as f64 / 1e9;
            cpu
        };
        let cpu = own_cpu_since(cpu_from, sampling_from);
        // And the spawner threads' part of it (starting the children).
        let steady_cpu = (
            own_cpu_since(steady_from.0, steady_from.1),
            steady_spawners,
            steady_switches,
        );
        let stopped = chrono::Utc::now();
        let commits = store.commits();
        // The window's last ticks are still claimed when the loop was stalled as it ended
        // (a slow fsync on a busy disk): a tick claimed late is counted, not missed.
        tokio::time::sleep(Duration::from_secs(3)).await;
        handle.shutdown();
        let _ = engine_task.await;
        // Children count once reaped: every child of the window and of its tail is by now.
        let children = Cpu::now().since(cpu_from).children;
        sampler.abort();
        let cpu = Cpu {
            own: cpu.own,
            children,
        };
        (started, serving, stopped, cpu, steady_cpu, commits)
    });
    let load_after = load_average();

    // Every whole second strictly after the service was serving (its `ready`: recovery
    // done, fires planned) and at or before stop is a tick of every per-second task.
    let connection = Connection::open(&database)?;
    let up = serving.timestamp();
    println!(
        "start-up:               {:.0} ms from engine start to serving ({tasks} tasks)",
        (serving - started).num_microseconds().unwrap_or(0) as f64 / 1000.0
    );
    let first_tick = up + 1;
    let last_tick = stopped.timestamp();
    let ticks = (last_tick - first_tick + 1).max(0) as u64;
    let expected = ticks * every_second as u64;
    // A tick claimed late is a `catchup` run (skipped under misfire `skip`): recorded,
    // not missed.
    let window = "r.trigger IN ('schedule', 'catchup') AND r.scheduled_for BETWEEN ?1 AND ?2";
    let bounds = [first_tick * 1_000_000, last_tick * 1_000_000];
    let claimed: i64 = connection.query_row(
        &format!("SELECT COUNT(*) FROM runs r WHERE {window}"),
        bounds,
        |row| row.get(0),
    )?;
    let claimed = claimed as u64;
    let doubled: i64 = connection.query_row(
        &format!(
            "SELECT COUNT(*) - COUNT(DISTINCT r.task || '@' || r.scheduled_for) FROM runs r WHERE {window}"
        ),
        bounds,
        |row| row.get(0),
    )?;
    // Every run the service recorded while serving, whatever its tick (CPU per run).
    let recorded: i64 = connection.query_row(
        "SELECT COUNT(*) FROM runs WHERE queued_at BETWEEN ?1 AND ?2",
        [serving.timestamp_micros(), stopped.timestamp_micros()],
        |row| row.get(0),
    )?;
    let mut outcomes = connection.prepare(&format!(
        "SELECT r.state, COUNT(*) FROM runs r WHERE {window} GROUP BY r.state ORDER BY 2 DESC"
    ))?;
    let outcomes: Vec<(String, i64)> = outcomes
        .query_map(bounds, |row| Ok((row.get(0)?, row.get(1)?)))?
        .collect::<Result<_, _>>()?;
    let lags = |column: &str, bounds: [i64; 2]| -> Result<Vec<f64>> {
        let mut statement = connection.prepare(&format!(
            "SELECT a.{column} - r.scheduled_for FROM runs r JOIN attempts a ON a.run_id = r.id AND a.attempt = 1
             WHERE {window} AND a.{column} IS NOT NULL"
        ))?;
        let mut values: Vec<f64> = statement
            .query_map(bounds, |row| row.get::<_, i64>(0))?
            .map(|v| v.map(|micros| micros as f64 / 1000.0))
            .collect::<Result<_, _>>()?;
        values.sort_by(|a, b| a.total_cmp(b));
        Ok(values)
    };
    let spawn_lag = lags("spawned_at", bounds)?;
    let start_lag = lags("started_at", bounds)?;
    let second_tick = second_tick_of(serving);
    let steady_bounds = [second_tick.timestamp_micros(), bounds[1]];
    let steady_lag = lags("spawned_at", steady_bounds)?;
    let steady_recorded: i64 = connection.query_row(
        "SELECT COUNT(*) FROM runs WHERE queued_at BETWEEN ?1 AND ?2",
        [second_tick.timestamp_micros(), stopped.timestamp_micros()],
        |row| row.get(0),
    )?;

    println!(
        "ticks measured:         {ticks} (every second from {} to {})",
        first_tick, last_tick
    );
    println!("fires expected:         {expected}");
    println!("fires claimed:          {claimed}");
    println!(
        "fires missed:           {}",
        expected.saturating_sub(claimed)
    );
    println!("fires doubled:          {doubled}");
    for (state, count) in &outcomes {
        println!("  runs {state:<12}      {count}");
    }
    let late: i64 = connection.query_row(
        &format!("SELECT COUNT(*) FROM runs r WHERE {window} AND r.trigger = 'catchup'"),
        bounds,
        |row| row.get(0),
    )?;
    if late > 0 {
        println!(
            "  of them claimed late:  {late} (`catchup`: the loop fell behind its ticks; misfire `skip` records them skipped)"
        );
    }
    let who = if distinct { "probe " } else { "" };
    print_lag(&format!("{who}lag tick → child spawned"), &spawn_lag);
    if !distinct {
        print_lag("  from the second tick ", &steady_lag);
    }
    print_lag(&format!("{who}lag tick → run started  "), &start_lag);
    if let Some(lag) = Lag::of_sorted(&spawn_lag) {
        if let Some((lone, spawn_only)) = lone {
            println!(
                "lone-fire latency:      p99 {:.2} ms tick → child spawned = {} the floor's p99 {:.2} ms, {} the spawn alone's {:.2} ms; p50 {:.2} ms = {} the floor's {:.2} ms, {} the spawn alone's {:.2} ms (target p99 ≤ 2 ms)",
                lag.p99,
                times(lag.p99, lone.p99),
                lone.p99,
                times(lag.p99, spawn_only.p99),
                spawn_only.p99,
                lag.p50,
                times(lag.p50, lone.p50),
                lone.p50,
                times(lag.p50, spawn_only.p50),
                spawn_only.p50
            );
        } else {
            let steady = Lag::of_sorted(&steady_lag).map_or_else(
                || "no samples".to_string(),
                |steady| {
                    format!(
                        "{:.0} / {floor:.0} ms = {}",
                        steady.p99,
                        times(steady.p99, floor)
                    )
                },
            );
            println!(
                "burst ratio:            lag p99 / burst floor = {:.0} / {floor:.0} ms = {}; from the second tick {steady} (target ≤ 1.2 ×; the first tick also creates every task's log file)",
                lag.p99,
                times(lag.p99, floor)
            );
        }
    }
    // Children from serving to the end (the window and its tail), per child spawned.
    let spawned: i64 = connection.query_row(
        "SELECT COUNT(*) FROM attempts WHERE spawned_at >= ?1",
        [serving.timestamp_micros()],
        |row| row.get(0),
    )?;
    let per_run = Cpu {
        own: cpu.micros_per(recorded.max(0) as usize).own,
        children: cpu.micros_per(spawned.max(0) as usize).children,
    };
    if distinct {
        // One run a second beside a thousand idle tasks: the cost is the idle service's,
        // not a run's, and a floor of one child says nothing.
        println!(
            "service CPU:            {:.2} % of one core ({:.3} s over {seconds} s serving, {recorded} runs; children and the bench's own sampling excluded)",
            cpu.own * 100.0 / seconds.max(1) as f64,
            cpu.own
        );
    } else {
        let (steady_cpu, steady_spawners, (spawner_switches, other_switches)) = steady_cpu;
        let steady_own = steady_cpu.micros_per(steady_recorded.max(0) as usize).own;
        println!(
            "service CPU per run:    {:.0} µs = {} the floor's {:.0} µs per child; from the second tick {steady_own:.0} µs = {} (user + system of this process; children and the bench's own sampling of RSS and descriptors excluded; {:.2} s over {recorded} runs recorded while serving, {:.2} s over {steady_recorded} from the second tick; target ≤ 100 µs)",
            per_run.own,
            times(per_run.own, floor_cpu.own),
            floor_cpu.own,
            times(steady_own, floor_cpu.own),
            cpu.own,
            steady_cpu.own
        );
        let steady_spawners = steady_spawners * 1e6 / steady_recorded.max(1) as f64;
        println!(
            "  of which spawners:    {steady_spawners:.0} µs per run from the second tick, starting the children (the floor's threads spend {:.0} µs per child starting and reaping theirs); the rest, the scheduler's own: {:.0} µs per run",
            floor_cpu.own,
            steady_own - steady_spawners
        );
        let per_steady_run = |count: u64| count as f64 / steady_recorded.max(1) as f64;
        println!(
            "context switches:       {:.2} per run from the second tick (spawner threads {:.2}, the others {:.2}; each is a sleep and a wake, dear on a virtual machine)",
            per_steady_run(spawner_switches + other_switches),
            per_steady_run(spawner_switches),
            per_steady_run(other_switches)
        );
        println!(
            "children CPU per run:   {:.0} µs = {} the floor's {:.0} µs ({spawned} children; each descriptor the service holds open is copied into every child and closed at its exec)",
            per_run.children,
            times(per_run.children, floor_cpu.children),
            floor_cpu.children
        );
    }
    println!(
        "peak RSS (service):     {:.1} MiB",
        peak_rss.load(Ordering::Relaxed) as f64 / 1024.0
    );
    println!(
        "peak descriptors open:  {} (service, sampled every 100 ms: pipes and pidfds of running children, task logs kept open, database, sockets)",
        peak_fds.load(Ordering::Relaxed)
    );
    println!(
        "throughput:             {:.0} runs/s recorded",
        claimed as f64 / ticks.max(1) as f64
    );
    let seconds_run = (stopped - started).num_milliseconds().max(1) as f64 / 1000.0;
    println!(
        "commits (fsyncs):       {} in {seconds_run:.1} s = {:.0}/s (synchronous = FULL: each commit syncs the WAL)",
        commits,
        commits as f64 / seconds_run
    );
    println!("machine load:           {load_after} (after)");
    for &count in &settings.startup_tasks {
        let millis = startup_ms(&dir.join(format!("startup-{count}")), count)?;
        println!(
            "start-up {count:>6} tasks:  {millis:.0} ms from config load to serving (fresh database and log folder; target 10,000 in ≤ 2,000 ms)"
        );
    }
    if dir == temporary {
        let _ = std::fs::remove_dir_all(&temporary);
    }
    Ok(ExitCode::SUCCESS)
}

/// Threads of the burst floor (the floor: four threads).
const BURST_THREADS: usize = 4;

/// Says when the engine is serving (its `ready`).
#[derive(Default)]
struct Ready {
    notify: tokio::sync::Notify,
}

impl turbosched::engine::ServiceManager for Ready {
    fn ready(&self, _tasks: usize) {
        self.notify.notify_one();
    }
    fn keepalive_every(&self) -> Option<Duration> {
        None
    }
    fn alive(&self) {}
    fn stopping(&self) {}
}

fn remove_database(database: &std::path::Path) {
    for suffix in ["", "-wal", "-shm"] {
        let _ = std::fs::remove_file(format!("{}{suffix}", database.display()));
    }
}

/// Milliseconds from loading a config of `tasks` per-second tasks to the engine serving
/// them, in a fresh `dir`; the engine is stopped at once.
fn startup_ms(dir: &std::path::Path, tasks: usize) -> Result<f64> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let database = dir.join("bench.db");
    let text = config_text(
        &database.display().to_string(),
        tasks,
        &dir.join("logs").display().to_string(),
        &dir.join("state").display().to_string(),
        None,
    );
    let config_path = dir.join("bench.toml");
    std::fs::write(&config_path, &text)?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    let millis = runtime.block_on(async {
        let started = std::time::Instant::now();
        let config = Arc::new(config::load(&config_path).map_err(|e| anyhow::anyhow!("{e}"))?);
        let store = Store::open(&database)?;
        let mut engine = Engine::new(config, store, Arc::new(SystemClock), Mode::Serve);
        let ready = Arc::new(Ready::default());
        engine.set_service_manager(ready.clone());
        let handle = engine.handle();
        let engine_task = tokio::spawn(engine.run());
        ready.notify.notified().await;
        let millis = started.elapsed().as_secs_f64() * 1000.0;
        handle.shutdown();
        let _ = engine_task.await;
        anyhow::Ok(millis)
    })?;
    let _ = std::fs::remove_dir_all(dir);
    Ok(millis)
}

/// Rounds of the lone-fire floor back to back.
const LONE_ROUNDS: usize = 200;

/// Rounds of the lone-fire floor after a quiet spell each, and the spell: a lone fire
/// comes after a second of nothing, when an idle CPU (on a VM, a halted vCPU) and the disk
/// take longer to answer than in a tight loop: twice as long, measured on a 2-vCPU VM.
const LONE_QUIET_ROUNDS: usize = 60;
const LONE_QUIET: Duration = Duration::from_millis(50);

/// The least a lone fire claimed at its tick can take here and now: a commit's worth of
/// bytes written and synced (`fdatasync`, as SQLite syncs its WAL under `synchronous =
/// FULL`) in `dir`, then `posix_spawn` of `/bin/true` with its stdout and stderr on
/// pipes, timed together, `rounds` times, `quiet` apart (the child is reaped outside the
/// timing). Without `commit`, the spawn alone: the least for a fire claimed before its
/// tick.
fn lone_floor(dir: &Path, rounds: usize, quiet: Duration, commit: bool) -> Result<Lag> {
    use std::os::unix::fs::FileExt;
    const COMMIT: usize = 40 * 1024;
    let path = dir.join("lone-floor.wal");
    let file = std::fs::File::create(&path)
        .with_context(|| format!("cannot create {}", path.display()))?;
    let frames = vec![0x5a_u8; COMMIT];
    file.write_all_at(&vec![0; COMMIT * 16], 0)?;
    file.sync_all()?;
    let mut samples = Vec::with_capacity(rounds);
    for round in 0..rounds {
        if !quiet.is_zero() {
            std::thread::sleep(quiet);
        }
        let began = std::time::Instant::now();
        if commit {
            file.write_all_at(&frames, ((round % 16) * COMMIT) as u64)?;
            file.sync_data()?;
        }
        let mut child = std::process::Command::new("/bin/true")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::piped())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .context("cannot start /bin/true")?;
        samples.push(began.elapsed().as_secs_f64() * 1000.0);
        child.wait()?;
    }
    drop(file);
    let _ = std::fs::remove_file(&path);
    samples.sort_by(f64::total_cmp);
    Lag::of_sorted(&samples).context("no rounds")
}

/// Median milliseconds, over three bursts, for `threads` threads to start and reap
/// `children` `/bin/true` between them (each `posix_spawn` + wait, nothing recorded): the
/// least a burst of `children` fires of one tick can take on this machine now; and the
/// CPU per child it took, this process's and the child's own.
fn burst_floor(children: usize, threads: usize) -> Result<(f64, Cpu)> {
    let mut samples = Vec::new();
    let cpu_from = Cpu::now();
    for _ in 0..3 {
        let started = std::time::Instant::now();
        std::thread::scope(|scope| -> Result<()> {
            let workers: Vec<_> = (0..threads)
                .map(|thread| {
                    let share = children / threads + usize::from(thread < children % threads);
                    scope.spawn(move || -> Result<()> {
                        for _ in 0..share {
                            std::process::Command::new("/bin/true")
                                .status()
                                .context("cannot run /bin/true")?;
                        }
                        Ok(())
                    })
                })
                .collect();
            for worker in workers {
                worker
                    .join()
                    .map_err(|_| anyhow::anyhow!("a spawning thread panicked"))??;
            }
            Ok(())
        })?;
        samples.push(started.elapsed().as_secs_f64() * 1000.0);
    }
    let cpu = Cpu::now().since(cpu_from).micros_per(3 * children);
    samples.sort_by(f64::total_cmp);
    Ok((samples[samples.len() / 2], cpu))
}

/// User + system CPU seconds of this process and, apart, of its children reaped so far
/// (`getrusage`), so the service's own cost and its children's are two figures.
#[derive(Debug, Clone, Copy, Default)]
struct Cpu {
    own: f64,
    children: f64,
}

impl Cpu {
    fn now() -> Cpu {
        fn seconds(who: libc::c_int) -> f64 {
            // SAFETY: `getrusage` writes only into the zeroed struct it is given.
            let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
            if unsafe { libc::getrusage(who, &mut usage) } != 0 {
                return 0.0;
            }
            let time = |t: libc::timeval| t.tv_sec as f64 + t.tv_usec as f64 / 1e6;
            time(usage.ru_utime) + time(usage.ru_stime)
        }
        Cpu {
            own: seconds(libc::RUSAGE_SELF),
            children: seconds(libc::RUSAGE_CHILDREN),
        }
    }

    fn since(self, earlier: Cpu) -> Cpu {
        Cpu {
            own: self.own - earlier.own,
            children: self.children - earlier.children,
        }
    }

    /// Microseconds per one of `count`.
    fn micros_per(self, count: usize) -> Cpu {
        let count = count.max(1) as f64;
        Cpu {
            own: self.own * 1e6 / count,
            children: self.children * 1e6 / count,
        }
    }
}

/// Context switches (voluntary and not) of this process's threads so far, from
/// `/proc/self/task/*/status`: the spawner threads' and the others'. A thread that has
/// ended is no longer counted.
fn context_switches() -> (u64, u64) {
    let Ok(tasks) = std::fs::read_dir("/proc/self/task") else {
        return (0, 0);
    };
    let (mut spawners, mut others) = (0, 0);
    for task in tasks.flatten() {
        let Ok(status) = std::fs::read_to_string(task.path().join("status")) else {
            continue;
        };
        let mut spawner = false;
        let mut switches = 0u64;
        for line in status.lines() {
            if let Some(name) = line.strip_prefix("Name:") {
                spawner = name.trim().starts_with("spawner-");
            } else if let Some(count) = line
                .strip_prefix("voluntary_ctxt_switches:")
                .or_else(|| line.strip_prefix("nonvoluntary_ctxt_switches:"))
            {
                switches += count.trim().parse::<u64>().unwrap_or(0);
            }
        }
        if spawner {
            spawners += switches;
        } else {
            others += switches;
        }
    }
    (spawners, others)
}

/// The CPU seconds the spawner threads have spent so far (0 before they start).
fn spawner_seconds() -> f64 {
    turbosched::spawn::spawner_cpu().map_or(0.0, |spent| spent.as_secs_f64())
}

/// `/proc/loadavg`'s three load averages, or "unknown".
pub(crate) fn load_average() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .ok()
        .map(|text| {
            let averages: Vec<&str> = text.split_whitespace().take(3).collect();
            format!("load average {}", averages.join(", "))
        })
        .unwrap_or_else(|| "load average unknown".to_string())
}

/// The benchmark's config: `tasks` tasks `t0000`…, each `* * * * * *` running `/bin/true`
/// (misfire `skip`, timeout 30 s), as many workers as tasks, a heartbeat a second; with
/// `api_bind`, an `[api]` section binding it (`bench-cluster`'s instances bind port 0).
pub(crate) fn config_text(
    database: &str,
    tasks: usize,
    log_dir: &str,
    state_dir: &str,
    api_bind: Option<&str>,
) -> String {
    let mut text = scheduler_section(database, tasks, log_dir, state_dir);
    if let Some(bind) = api_bind {
        text.push_str(&format!("[api]\nbind = {bind:?}\n"));
    }
    for n in 0..tasks {
        text.push_str(&task_section(&format!("t{n:04}"), "* * * * * *"));
    }
    text
}

/// `--distinct`'s config: `tasks` tasks `t0000`…, each on an hourly expression of its own
/// (second `n % 60` of a minute at least half an hour from `now`'s, so none comes due in a
/// window shorter than that), and `probe`, `* * * * * *`.
fn distinct_config_text(
    database: &str,
    tasks: usize,
    log_dir: &str,
    state_dir: &str,
    now: chrono::DateTime<chrono::Utc>,
) -> String {
    use chrono::Timelike;
    let mut text = scheduler_section(database, tasks + 1, log_dir, state_dir);
    let base = now.minute() as usize + 30;
    for n in 0..tasks {
        let second = n % 60;
        let minute = (base + (n / 60) % 30) % 60;
        // 1,800 distinct (second, minute) pairs; past them the hour step tells them apart.
        let hours = match n / 1800 {
            0 => "*".to_string(),
            step => format!("*/{}", step + 1),
        };
        text.push_str(&task_section(
            &format!("t{n:04}"),
            &format!("{second} {minute} {hours} * * *"),
        ));
    }
    text.push_str(&task_section("probe", "* * * * * *"));
    text
}

fn scheduler_section(database: &str, workers: usize, log_dir: &str, state_dir: &str) -> String {
    format!(
        "[scheduler]\ntimezone = \"UTC\"\ndatabase = {database:?}\nmax_workers = {}\nlog_dir = {log_dir:?}\nstate_dir = {state_dir:?}\nheartbeat_interval = \"1s\"\nshutdown_grace = \"5s\"\n",
        workers.max(1),
    )
}

fn task_section(name: &str, schedule: &str) -> String {
    format!(
        "[tasks.{name}]\nschedule = \"{schedule}\"\ncommand = [\"/bin/true\"]\ntimeout = \"30s\"\nmisfire = \"skip\"\n"
    )
}

/// The second whole second after the service was serving: the per-second tasks' second
/// tick in the window (the first is the first whole second after serving).
fn second_tick_of(serving: chrono::DateTime<chrono::Utc>) -> chrono::DateTime<chrono::Utc> {
    let second = serving.timestamp() + 2;
    chrono::DateTime::from_timestamp(second, 0).unwrap_or(serving)
}

fn print_lag(label: &str, sorted_ms: &[f64]) {
    match Lag::of_sorted(sorted_ms) {
        None => println!("{label}: no samples"),
        Some(lag) => println!(
            "{label}: p50 {:.2} ms  p90 {:.2} ms  p99 {:.2} ms  max {:.2} ms  ({} samples)",
            lag.p50, lag.p90, lag.p99, lag.max, lag.samples
        ),
    }
}

/// Percentiles of a lag, in milliseconds (nearest rank on the sorted samples).
#[derive(Debug, Clone, Copy)]
pub(crate) struct Lag {
    pub(crate) p50: f64,
    pub(crate) p90: f64,
    pub(crate) p99: f64,
    pub(crate) max: f64,
    pub(crate) samples: usize,
}

impl Lag {
    /// `None` without samples; `sorted_ms` ascending.
    pub(crate) fn of_sorted(sorted_ms: &[f64]) -> Option<Lag> {
        let last = *sorted_ms.last()?;
        let at = |q: f64| sorted_ms[((sorted_ms.len() as f64 - 1.0) * q).round() as usize];
        Some(Lag {
            p50: at(0.50),
            p90: at(0.90),
            p99: at(0.99),
            max: last,
            samples: sorted_ms.len(),
        })
    }
}

/// Writes `runs` finished runs (spread over the configured tasks, one a second back from
/// now, every tenth failed) through the store's batch API, 1,000 per transaction.
pub(crate) fn seed(config: &turbosched::config::Config, runs: usize) -> Result<ExitCode> {
    use turbosched::model::{Attempt, RunState, Trigger};
    use turbosched::store::{Change, Move, NewRun};
    let store = Store::open(&config.scheduler.database)?;
    let tasks: Vec<_> = config.tasks.keys().cloned().collect();
    anyhow::ensure!(!tasks.is_empty(), "the config has no task to seed runs for");
    let now = chrono::Utc::now();
    let started = std::time::Instant::now();
    let mut written = 0usize;
    while written < runs {
        let chunk = (runs - written).min(1000);
        store.batch(|batch| {
            for n in written..written + chunk {
                let at = now - chrono::Duration::seconds((runs - n) as i64);
                let new_run = NewRun {
                    task: tasks[n % tasks.len()].clone(),
                    trigger: Trigger::Manual,
                    scheduled_for: at,
                    max_attempts: 1,
                    force: false,
                    downstream: false,
                    cascade: None,
                    params: None,
                };
                let run = batch.enqueue(&new_run, at)?;
                let attempt = batch.transition(
                    &Move {
                        run,
                        attempt: Attempt(0),
                        from: RunState::Queued,
                        to: RunState::Running,
                    },
                    &Change::default(),
                    at,
                )?;
                let end = if n % 10 == 0 {
                    RunState::Failed
                } else {
                    RunState::Succeeded
                };
                let finished = at + chrono::Duration::milliseconds(200 + (n % 50) as i64 * 10);
                batch.transition(
                    &Move {
                        run,
                        attempt,
                        from: RunState::Running,
                        to: end,
                    },
                    &Change::default(),
                    finished,
                )?;
            }
            Ok(())
        })?;
        written += chunk;
    }
    println!(
        "seeded {written} runs in {:.1}s into {}",
        started.elapsed().as_secs_f64(),
        config.scheduler.database.display()
    );
    Ok(ExitCode::SUCCESS)
}

/// `ingest` speed: writes `files` Yahoo-layout CSV files holding `rows` valid daily bars
/// in all, then ingests them into a fresh market database and prints rows per second.
pub(crate) fn ingest(rows: usize, files: usize) -> Result<ExitCode> {
    use turbosched::pipeline::{ingest, market_db};
    let dir = tempfile_dir()?.with_extension("ingest");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir)?;
    let files = files.max(1);
    let per_file = rows.div_ceil(files);
    let start = chrono::NaiveDate::from_ymd_opt(1800, 1, 1).context("start date")?;
    let mut inputs = Vec::new();
    for file in 0..files {
        let mut text = String::from("Date,Open,High,Low,Close,Adj Close,Volume\n");
        for day in 0..per_file {
            let date = start + chrono::Duration::days(day as i64);
            let base = 100.0 + (day % 97) as f64 * 0.5;
            text.push_str(&format!(
                "{},{base},{},{},{},{},{}\n",
                date.format("%-m/%-d/%Y"),
                base + 2.0,
                base - 1.5,
                base + 0.5,
                base + 0.5,
                1_000_000 + day
            ));
        }
        inputs.push((format!("SYM{file:03}.csv"), text.into_bytes()));
    }
    let mut connection = market_db::open(&dir.join("market.db")).map_err(|e| anyhow::anyhow!(e))?;
    let layout = ingest::Layout::default();
    let started = std::time::Instant::now();
    let mut read = 0u64;
    for (name, bytes) in &inputs {
        let report = ingest::ingest_file(&mut connection, name, bytes, "bench", &layout, 0)
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        anyhow::ensure!(report.inserted == report.rows_read, "{name}: {report:?}");
        read += report.rows_read;
    }
    let seconds = started.elapsed().as_secs_f64();
    println!("ingest: {read} validated rows in {files} files, {seconds:.2} s → {:.0} rows/s (fresh market database, WAL)", read as f64 / seconds);
    let _ = std::fs::remove_dir_all(&dir);
    Ok(ExitCode::SUCCESS)
}

/// Feature speed: `symbols` random-walk series of `days` bars each, features computed per
/// symbol (as training and prediction do), timed.
pub(crate) fn features(symbols: usize, days: usize) -> Result<ExitCode> {
    use turbosched::pipeline::features::compute;
    let series = random_walk(symbols, days)?;
    let started = std::time::Instant::now();
    let rows: usize = series.iter().map(|bars| compute(bars, 1).len()).sum();
    let seconds = started.elapsed().as_secs_f64();
    println!(
        "features: {symbols} symbols × {days} bars → {rows} rows of {} features in {seconds:.3} s ({:.0} bars/s)",
        turbosched::pipeline::features::NAMES.len(),
        (symbols * days) as f64 / seconds
    );
    Ok(ExitCode::SUCCESS)
}

/// Synthetic random-walk bars, `days` per symbol (the shape of real daily bars).
fn random_walk(
    symbols: usize,
    days: usize,
) -> Result<Vec<Vec<turbosched::pipeline::features::Bar>>> {
    use turbosched::pipeline::features::Bar;
    let start = chrono::NaiveDate::from_ymd_opt(2000, 1, 3).context("start date")?;
    Ok((0..symbols)
        .map(|symbol| {
            let mut close = 100.0 + symbol as f64;
            (0..days)
                .map(|day| {
                    let step = ((day * 7919 + symbol * 104_729) % 2001) as f64 / 1000.0 - 1.0;
                    close = (close * (1.0 + step * 0.02)).max(1.0);
                    Bar {
                        ts: (start + chrono::Duration::days(day as i64))
                            .format("%Y-%m-%d")
                            .to_string(),
                        open: close,
                        high: close * 1.01,
                        low: close * 0.99,
                        close,
                        volume: 1e6 + (day % 13) as f64 * 1e4,
                    }
                })
                .collect()
        })
        .collect())
}

/// What `bench-models` measures: the training set's shape, the benchmarked GBDT, and the
/// sizes of the TreeSHAP and drift measurements.
pub(crate) struct ModelsBench {
    /// Training rows.
    pub(crate) rows: usize,
    /// Features.
    pub(crate) cols: usize,
    /// Trees.
    pub(crate) trees: usize,
    /// Maximum tree depth.
    pub(crate) depth: usize,
    /// Learning rate.
    pub(crate) learning_rate: f32,
    /// Rows explained by TreeSHAP.
    pub(crate) shap_rows: usize,
    /// Rows per side of the drift comparison.
    pub(crate) drift_rows: usize,
}

/// Model speed: training (GBDT, `trees` of depth `depth`) on `rows` × `cols`, exact
/// TreeSHAP on `shap_rows` rows with its local-accuracy error (max |Σφ + E − raw|), drift
/// over `drift_rows` × `cols` (baseline and current), the exact KS p-value at 10,000 × 60,
/// and a 20-year walk-forward over two symbols with monthly retraining.
pub(crate) fn models(settings: &ModelsBench) -> Result<ExitCode> {
    use rand::{Rng, SeedableRng};
    use std::collections::BTreeMap;
    use turbosched::pipeline::model::{Gbdt, GbdtParams, Model, Table};
    use turbosched::pipeline::{backtest, drift};
    let ModelsBench {
        rows,
        cols,
        trees,
        depth,
        learning_rate,
        shap_rows,
        drift_rows,
    } = *settings;
    anyhow::ensure!(
        cols >= 3,
        "--cols: expected at least 3 features, found {cols}"
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(7);
    let mut x = Table::with_columns(cols);
    let mut y = Vec::with_capacity(rows);
    for _ in 0..rows {
        let row: Vec<f64> = (0..cols).map(|_| rng.gen::<f64>() * 2.0 - 1.0).collect();
        let signal = row[0] + 0.5 * row[1] - 0.25 * row[2] + rng.gen::<f64>() - 0.5;
        y.push(if signal > 0.0 { 1.0 } else { 0.0 });
        x.push(&row);
    }
    let mut model = Gbdt::new(GbdtParams {
        iterations: trees,
        max_depth: depth,
        learning_rate,
        ..GbdtParams::default()
    });
    let started = std::time::Instant::now();
    model.fit(&x, &y).map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "train: GBDT, {trees} trees (depth {depth}, learning rate {learning_rate}) on {rows} rows × {cols} features in {:.2} s",
        started.elapsed().as_secs_f64()
    );
    let sample = x.select(&(0..shap_rows.min(rows)).collect::<Vec<_>>());
    let started = std::time::Instant::now();
    let explanation = model.explain(&sample);
    let shap_seconds = started.elapsed().as_secs_f64();
    // Local accuracy: each row's contributions plus the expected value give its raw output.
    let local_accuracy = explanation
        .values
        .iter()
        .zip(model.raw(&sample))
        .map(|(phi, raw)| (phi.iter().sum::<f64>() + explanation.expected_value - raw).abs())
        .fold(0.0, f64::max);
    println!(
        "shap: exact TreeSHAP for {} rows × {cols} features in {shap_seconds:.3} s; local accuracy max |Σφ + E − raw| = {local_accuracy:.1e}",
        explanation.values.len(),
    );

    let names: Vec<String> = (0..cols).map(|j| format!("f{j}")).collect();
    let name_refs: Vec<&str> = names.iter().map(String::as_str).collect();
    let column = |rng: &mut rand::rngs::StdRng, shift: f64| -> Vec<f64> {
        (0..drift_rows).map(|_| rng.gen::<f64>() + shift).collect()
    };
    let mut baselines: Vec<Vec<f64>> = (0..cols).map(|_| column(&mut rng, 0.0)).collect();
    for b in &mut baselines {
        b.sort_unstable_by(f64::total_cmp); // training stores its baseline sorted
    }
    let current: Vec<Vec<f64>> = (0..cols)
        .map(|j| column(&mut rng, j as f64 * 0.01))
        .collect();
    let started = std::time::Instant::now();
    let results = drift::compare_all(
        &name_refs,
        &baselines,
        current,
        10,
        drift::Thresholds::default(),
    );
    println!(
        "drift: PSI, KL and KS over {drift_rows} rows × {cols} features (baseline and current; {} drifted) in {:.3} s",
        results.iter().filter(|r| r.drifted).count(),
        started.elapsed().as_secs_f64()
    );

    // The exact KS p-value at the largest sample it is used for: 10,000 baseline values
    // against a 60-day window.
    let mut baseline: Vec<f64> = (0..drift::KS_EXACT_MAX_N)
        .map(|_| rng.gen::<f64>())
        .collect();
    let mut window: Vec<f64> = (0..60).map(|_| rng.gen::<f64>() * 0.9 + 0.05).collect();
    baseline.sort_unstable_by(f64::total_cmp);
    window.sort_unstable_by(f64::total_cmp);
    let d = drift::ks_statistic(&baseline, &window);
    let (p, method) = drift::ks_p_value(d, baseline.len(), window.len());
    let (n, m) = (baseline.len(), window.len());
    println!(
        "ks: exact two-sided p-value at {n} × {m}: {:.3} ms per call at D = {d:.4} (p = {p:.4}, {method:?}); {:.3} ms at D = 0.5",
        ks_ms_per_call(d, n, m),
        ks_ms_per_call(0.5, n, m),
    );

    let bars: BTreeMap<String, _> = random_walk(2, 5040)?
        .into_iter()
        .enumerate()
        .map(|(i, series)| (format!("S{i}"), series))
        .collect();
    // The shipped defaults: 756-day rolling window, retrained every 21 days, GBDT.
    let plan = backtest::Plan::default();
    let started = std::time::Instant::now();
    let predictions =
        backtest::walk_forward(&bars, &plan, |_| {}).map_err(|e| anyhow::anyhow!(e))?;
    println!(
        "backtest: 20-year daily walk-forward over 2 symbols, GBDT retrained every 21 days on a 756-day window → {} predictions in {:.2} s",
        predictions.len(),
        started.elapsed().as_secs_f64()
    );
    Ok(ExitCode::SUCCESS)
}

/// Mean milliseconds of one KS p-value for D = `d` and samples of `n` and `m` values.
fn ks_ms_per_call(d: f64, n: usize, m: usize) -> f64 {
    let calls = 200;
    let started = std::time::Instant::now();
    for _ in 0..calls {
        std::hint::black_box(turbosched::pipeline::drift::ks_p_value(
            std::hint::black_box(d),
            n,
            m,
        ));
    }
    started.elapsed().as_secs_f64() * 1000.0 / f64::from(calls)
}

/// Mean milliseconds to start and reap `/bin/true`, one at a time.
pub(crate) fn spawn_cost_ms(count: u32) -> Result<f64> {
    let started = std::time::Instant::now();
    for _ in 0..count {
        std::process::Command::new("/bin/true")
            .status()
            .context("cannot run /bin/true")?;
    }
    Ok(started.elapsed().as_secs_f64() * 1000.0 / f64::from(count))
}

/// CPU time of the calling thread, in nanoseconds (0 if the clock cannot be read).
fn thread_cpu_ns() -> u64 {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: `clock_gettime` writes only into the struct it is given.
    if unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut now) } != 0 {
        return 0;
    }
    u64::try_from(now.tv_sec).unwrap_or(0) * 1_000_000_000 + u64::try_from(now.tv_nsec).unwrap_or(0)
}

/// Descriptors this process has open now (not counting the one that lists them).
fn open_descriptors() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map_or(0, |entries| (entries.count() as u64).saturating_sub(1))
}

/// `a / b` as "1.23 ×", or "n/a ×" when `b` is not a positive figure (`getrusage` failed).
fn times(a: f64, b: f64) -> String {
    if b > 0.0 && a.is_finite() {
        format!("{:.2} ×", a / b)
    } else {
        "n/a ×".to_string()
    }
}

fn rss_kib() -> u64 {
    rss_kib_of("self")
}

/// Resident memory of process `pid` (`"self"` for this one) in KiB, 0 when unknown
/// (the process is gone).
pub(crate) fn rss_kib_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find(|line| line.starts_with("VmRSS:"))
                .and_then(|line| line.split_whitespace().nth(1))
                .and_then(|kib| kib.parse().ok())
        })
        .unwrap_or(0)
}

/// The spawn-cost line both `bench` and `bench-cluster` print.
pub(crate) fn spawn_floor_line(spawn_ms: f64, tasks: usize) -> String {
    let cores = std::thread::available_parallelism()
        .map(|n| n.get())
        .unwrap_or(1);
    format!(
        "spawn cost:             {spawn_ms:.3} ms per /bin/true (posix_spawn + wait, serial); {tasks} children of one tick need ≥ {:.0} ms on {cores} core(s): the floor of the last child's lag",
        spawn_ms * tasks as f64 / cores as f64
    )
}

fn tempfile_dir() -> Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("turbosched-bench-{}", std::process::id()));
    Ok(dir)
}
