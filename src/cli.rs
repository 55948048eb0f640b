//! Subcommands: `serve`, `run`, `status`, `runs`, `show`, `abort`, `validate`, `next`,
//! `migrate`, `bench`, `bench-cluster`, `config-schema`, `completions`, `man`, and the
//! hidden `worker`.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context, Result};
use clap::{Parser, Subcommand};
use serde_json::Value;

use turbosched::config::{self, Config};
use turbosched::engine::{enqueue_manual, Clock, Engine, Mode, SystemClock};
use turbosched::model::{Instant, RunId, RunState, TaskName};
use turbosched::store::{AbortOutcome, InstanceRow, RunFilter, RunRow, Store, TaskStateRow};
use turbosched::times::Shown;
use turbosched::views;

/// `println!` that hands back the write's error instead of panicking, so that a closed
/// pipe (`turbosched status | head -3`) ends the command quietly: see [`StdoutClosed`].
macro_rules! out {
    ($($arg:tt)*) => {{
        use std::io::Write as _;
        writeln!(std::io::stdout().lock(), $($arg)*).map_err(stdout_error)
    }};
}

/// Whoever read our stdout has gone (`… | head -1`): the command ends with exit code 0
/// and says nothing, as ripgrep does. A type of its own, so that a broken pipe to a
/// worker, say, is never mistaken for it.
///
/// Why not restore the default SIGPIPE action instead: the process would then die by the
/// signal (status 141, not 0), and `serve` and a foreground `run` write to workers' pipes
/// and to sockets, where a peer that went away is an event to report, never a reason to die.
#[derive(Debug, thiserror::Error)]
#[error("stdout closed")]
struct StdoutClosed;

fn stdout_error(err: std::io::Error) -> anyhow::Error {
    if err.kind() == std::io::ErrorKind::BrokenPipe {
        anyhow::Error::new(StdoutClosed)
    } else {
        anyhow::Error::new(err).context("cannot write to stdout")
    }
}

#[derive(Parser)]
#[command(
    name = "turbosched",
    version,
    about = "An always-on task scheduler: cron in time zones, DAG checks, process-isolated runs, durable history"
)]
struct Cli {
    /// The config file.
    #[arg(
        long,
        global = true,
        default_value = "config/scheduler.toml",
        env = "TURBOSCHED_CONFIG"
    )]
    config: PathBuf,
    /// Show times in UTC rather than in the scheduler's zone (`[scheduler] timezone`).
    #[arg(long, global = true)]
    utc: bool,
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand)]
enum Cmd {
    /// Run the scheduler service in the foreground until SIGTERM or Ctrl-C.
    Serve,
    /// Run a task now: handed to the service if one is up, else run here under the same supervision.
    Run {
        /// The task.
        task: String,
        /// Wait until the run (and its downstream runs) finish, showing them as they go: the
        /// default when stdout is a terminal; always so without a service (the run is made here).
        #[arg(long, conflicts_with = "no_wait")]
        wait: bool,
        /// Return once the service has queued the run, printing its id: the default when
        /// stdout is not a terminal.
        #[arg(long)]
        no_wait: bool,
        /// Skip the dependency check.
        #[arg(long)]
        force: bool,
        /// Then run every task that depends on it, in dependency order.
        #[arg(long)]
        downstream: bool,
        /// A param of this run, merged over the task's (`--param sleep_sec=2`; the value
        /// read as a TOML scalar, else as text). Repeatable.
        #[arg(long = "param", value_name = "KEY=VALUE")]
        params: Vec<String>,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Queue the past ticks of a task's schedule from --from to --to (each at most once:
    /// a tick that already ran is not run again), oldest first; waits and shows progress.
    Backfill {
        /// The task.
        task: String,
        /// The first tick: RFC 3339 (`2026-01-05T09:00:00Z`), or a date `2026-01-05` in the
        /// task's zone (from that day's start).
        #[arg(long)]
        from: String,
        /// The last tick: RFC 3339, or a date in the task's zone (to that day's end).
        #[arg(long)]
        to: String,
        /// Each run then runs every task that depends on it, in dependency order.
        #[arg(long)]
        downstream: bool,
        /// List the ticks (and which already ran); queue nothing.
        #[arg(long)]
        dry_run: bool,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// The tasks, their next fires and last runs, and whether the service is up.
    Status {
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Recent runs, newest first.
    Runs {
        /// Only this task.
        #[arg(long)]
        task: Option<String>,
        /// Only this state (queued, running, retry_wait, succeeded, failed, timed_out, aborted, skipped, orphaned).
        #[arg(long)]
        state: Option<String>,
        /// At most this many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// One run with its attempts.
    Show {
        /// The run id.
        run_id: i64,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Abort a run: a queued one at once, a running one by its engine within a heartbeat interval.
    Abort {
        /// The run id.
        run_id: i64,
    },
    /// Check a config file and print every error with file, line and column.
    Validate {
        /// The file (default: --config).
        file: Option<PathBuf>,
    },
    /// Print the JSON Schema of the config file (editors complete and check keys with it).
    ConfigSchema,
    /// Print a shell completion script (e.g. `turbosched completions bash > /etc/bash_completion.d/turbosched`).
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
    /// Print the man page, roff (`turbosched man > /usr/local/share/man/man1/turbosched.1`), or write it and one page per subcommand into a folder.
    Man {
        /// Write turbosched.1 and turbosched-<subcommand>.1 here instead.
        #[arg(long)]
        out_dir: Option<PathBuf>,
    },
    /// The next fire times of a task, in its time zone.
    Next {
        /// The task.
        task: String,
        /// How many.
        #[arg(short = 'n', default_value_t = 5)]
        count: usize,
    },
    /// Print a task's log across its current and rotated files (`scheduler` for the service log).
    Logs {
        /// The task, or `scheduler`.
        task: String,
        /// Only this run's lines, searched in archived logs too.
        #[arg(long)]
        run: Option<i64>,
        /// Keep printing new lines as they are written.
        #[arg(long, short = 'f')]
        follow: bool,
        /// Print the last N existing lines (0: none, as `tail -n 0`).
        #[arg(long, short = 'n', default_value_t = 100)]
        lines: usize,
        /// Print every existing line.
        #[arg(long, conflicts_with = "lines")]
        all: bool,
    },
    /// Account for every tick: each scheduled task's ticks since --since, run or skipped or
    /// counted as dropped, none doubled, and the database sound (exit 1 if not).
    Audit {
        /// Ticks claimed since this long ago (`24h`, `7d`) or since an RFC 3339 instant.
        #[arg(long, default_value = "24h")]
        since: String,
        /// Print JSON.
        #[arg(long)]
        json: bool,
    },
    /// Archive old logs into a verified zip, prune old history, back up the database (what the maintenance task does).
    Archive {
        /// Print what would be done, change nothing.
        #[arg(long)]
        dry_run: bool,
    },
    /// Copy the SQLite history (runs, attempts, events, task state, instances) into an empty
    /// PostgreSQL database, in one transaction verified by row counts.
    Migrate {
        /// The PostgreSQL database to fill, which must be empty: postgresql://user@host:5432/db.
        #[arg(long)]
        to: String,
        /// The SQLite file to copy (default: `[scheduler] database` of --config).
        #[arg(long)]
        from: Option<PathBuf>,
        /// Copy even while an instance is live on the SQLite file (what it writes after the copy's snapshot stays behind).
        #[arg(long)]
        force: bool,
    },
    /// Measure fire lag and throughput with N per-second tasks running /bin/true.
    Bench {
        /// Tasks, each `* * * * * *`.
        #[arg(long, default_value_t = 1000)]
        tasks: usize,
        /// Seconds to measure.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Folder for the benchmark's database and logs (default: a temporary one).
        #[arg(long)]
        dir: Option<PathBuf>,
        /// The tasks on distinct hourly expressions, none due in the window, beside one per-second probe: a lone fire's latency and the RSS of distinct expressions.
        #[arg(long)]
        distinct: bool,
        /// After the window, start-up timed again with these task counts (comma-separated; 0 for none).
        #[arg(long, value_delimiter = ',', default_values_t = [2000, 10000])]
        startup_tasks: Vec<usize>,
    },
    /// Measure cluster mode: fire lag, misses and doubles of `serve` processes on SQLite, on PostgreSQL, and several on one PostgreSQL database.
    BenchCluster {
        /// Tasks, each `* * * * * *`.
        #[arg(long, default_value_t = 1000)]
        tasks: usize,
        /// Seconds (ticks) to measure in each setup.
        #[arg(long, default_value_t = 60)]
        seconds: u64,
        /// Instances of the cluster setup.
        #[arg(long, default_value_t = 3)]
        instances: usize,
        /// The PostgreSQL server (no database: a fresh one is created for each setup and dropped after).
        #[arg(long, default_value = "postgres://postgres@127.0.0.1:5432")]
        postgres: String,
    },
    /// Measure `ingest`: validated rows per second into a fresh market database.
    BenchIngest {
        /// Rows in all.
        #[arg(long, default_value_t = 1_000_000)]
        rows: usize,
        /// Spread over this many files (symbols).
        #[arg(long, default_value_t = 10)]
        files: usize,
    },
    /// Measure the features: 20 years of daily bars for N symbols.
    BenchFeatures {
        /// Symbols.
        #[arg(long, default_value_t = 100)]
        symbols: usize,
        /// Bars per symbol (252 a year).
        #[arg(long, default_value_t = 5040)]
        days: usize,
    },
    /// Measure the models: training, TreeSHAP, drift, and a 20-year walk-forward backtest.
    BenchModels {
        /// Training rows.
        #[arg(long, default_value_t = 100_000)]
        rows: usize,
        /// Features.
        #[arg(long, default_value_t = 20)]
        cols: usize,
        /// Trees of the benchmarked GBDT (xgboost's and lightgbm's quoted figures: 100).
        #[arg(long, default_value_t = 100)]
        trees: usize,
        /// Maximum depth of its trees (the references are quoted at 6, i.e. 64 leaves).
        #[arg(long, default_value_t = 3)]
        depth: usize,
        /// Its learning rate (the references: 0.1).
        #[arg(long, default_value_t = 0.05)]
        learning_rate: f32,
        /// Rows explained by TreeSHAP.
        #[arg(long, default_value_t = 1_000)]
        shap_rows: usize,
        /// Rows per side of the drift comparison.
        #[arg(long, default_value_t = 1_000_000)]
        drift_rows: usize,
    },
    /// Runs one attempt of a built-in handler (started by the service, not by people).
    #[command(hide = true)]
    Worker,
    /// Writes N finished runs into the history, for benchmarks (bench/status.sh).
    #[command(hide = true)]
    BenchSeed {
        /// How many runs.
        #[arg(long, default_value_t = 100_000)]
        runs: usize,
    },
}

/// Parses arguments, runs the subcommand, turns errors into exit codes.
pub(crate) fn main() -> ExitCode {
    let cli = Cli::parse();
    if matches!(cli.command, Cmd::Worker) {
        return ExitCode::from(turbosched::worker::main() as u8);
    }
    match dispatch(cli) {
        Ok(code) => code,
        Err(err) if err.is::<StdoutClosed>() => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("error: {err:#}");
            ExitCode::from(2)
        }
    }
}

fn dispatch(cli: Cli) -> Result<ExitCode> {
    match cli.command {
        Cmd::Validate { file } => validate(file.as_deref().unwrap_or(&cli.config)),
        Cmd::ConfigSchema => {
            let schema = serde_json::to_string_pretty(&config::json_schema())?;
            out!("{schema}")?;
            Ok(ExitCode::SUCCESS)
        }
        Cmd::Completions { shell } => completions(shell),
        Cmd::Man { out_dir } => man(out_dir.as_deref()),
        Cmd::Serve => serve(&cli.config),
        Cmd::Run {
            task,
            wait,
            no_wait,
            force,
            downstream,
            params,
            json,
        } => {
            let mut table = serde_json::Map::new();
            for param in &params {
                let (key, value) = config::parse_param(param).map_err(|err| anyhow!(err))?;
                table.insert(key, value);
            }
            let params = (!table.is_empty()).then_some(config::RunParams(table));
            run(
                &cli.config,
                &task,
                RunOptions {
                    wait: (wait || no_wait).then_some(wait),
                    force,
                    downstream,
                    json,
                },
                params,
                cli.utc,
            )
        }
        Cmd::Backfill {
            task,
            from,
            to,
            downstream,
            dry_run,
            json,
        } => backfill(
            &cli.config,
            &task,
            &from,
            &to,
            BackfillOptions {
                downstream,
                dry_run,
                json,
            },
            cli.utc,
        ),
        Cmd::Status { json } => status(&cli.config, json, cli.utc),
        Cmd::Runs {
            task,
            state,
            limit,
            json,
        } => runs(&cli.config, task, state, limit, json, cli.utc),
        Cmd::Show { run_id, json } => show(&cli.config, RunId(run_id), json, cli.utc),
        Cmd::Abort { run_id } => abort(&cli.config, RunId(run_id)),
        Cmd::Next { task, count } => next(&cli.config, &task, count, cli.utc),
        Cmd::Audit { since, json } => audit(&cli.config, &since, json),
        Cmd::Logs {
            task,
            run,
            follow,
            lines,
            all,
        } => logs(
            &cli.config,
            &task,
            run.map(RunId),
            follow,
            (!all).then_some(lines),
        ),
        Cmd::Archive { dry_run } => archive(&cli.config, dry_run),
        Cmd::Migrate { to, from, force } => migrate(&cli.config, &to, from, force),
        Cmd::Bench {
            tasks,
            seconds,
            dir,
            distinct,
            startup_tasks,
        } => crate::bench::run(&crate::bench::Settings {
            tasks,
            seconds,
            dir,
            distinct,
            startup_tasks: startup_tasks.into_iter().filter(|&n| n > 0).collect(),
        }),
        Cmd::BenchCluster {
            tasks,
            seconds,
            instances,
            postgres,
        } => crate::bench_cluster::run(&crate::bench_cluster::Settings {
            tasks,
            seconds,
            instances,
            postgres,
        }),
        Cmd::Worker => Ok(ExitCode::SUCCESS),
        Cmd::BenchIngest { rows, files } => crate::bench::ingest(rows, files),
        Cmd::BenchFeatures { symbols, days } => crate::bench::features(symbols, days),
        Cmd::BenchModels {
            rows,
            cols,
            trees,
            depth,
            learning_rate,
            shap_rows,
            drift_rows,
        } => crate::bench::models(&crate::bench::ModelsBench {
            rows,
            cols,
            trees,
            depth,
            learning_rate,
            shap_rows,
            drift_rows,
        }),
        Cmd::BenchSeed { runs } => crate::bench::seed(&load(&cli.config)?, runs),
    }
}

/// Loads the config; errors are printed one per line and end the process with code 2.
fn load(path: &Path) -> Result<Config> {
    config::load(path).map_err(|errors| anyhow!("invalid config:\n{errors}"))
}

fn open_store(config: &Config) -> Result<Store> {
    Ok(Store::open(&config.scheduler.database)?)
}

/// What a command that only reads the store or talks to the running service works from:
/// the config when the file is valid, else only the [`config::Locations`] read leniently
/// from it, so that a file in the middle of an edit does not take the CLI away.
struct Reading {
    config: Option<Arc<Config>>,
    locations: config::Locations,
    /// How times are shown: in the scheduler's zone, or UTC with `--utc`.
    shown: Shown,
}

impl Reading {
    fn open_store(&self) -> Result<Store> {
        Ok(Store::open(&self.locations.database)?)
    }
}

/// Loads the config for such a command. An invalid file is said once on stderr; a file
/// that cannot be read at all still ends the command (code 2): its store is unknown.
fn load_for_reading(path: &Path, utc: bool) -> Result<Reading> {
    match config::load(path) {
        Ok(config) => Ok(Reading {
            locations: config.locations(),
            shown: shown(config.scheduler.timezone, utc),
            config: Some(Arc::new(config)),
        }),
        Err(errors) => {
            let Ok(locations) = config::read_locations(path) else {
                return Err(anyhow!("invalid config:\n{errors}"));
            };
            let count = errors.0.len();
            eprintln!(
                "warning: {} is invalid ({count} error{}; `turbosched validate` shows them); reading the store at {}",
                path.display(),
                if count == 1 { "" } else { "s" },
                locations.database.display()
            );
            Ok(Reading {
                config: None,
                shown: shown(locations.timezone, utc),
                locations,
            })
        }
    }
}

/// Times for people: in `zone` (the scheduler's), or in UTC with `--utc`.
fn shown(zone: chrono_tz::Tz, utc: bool) -> Shown {
    if utc {
        Shown::utc()
    } else {
        Shown::in_zone(zone)
    }
}

/// Written whole to stdout: clap_complete panics on a write error, a buffer cannot fail.
fn completions(shell: clap_complete::Shell) -> Result<ExitCode> {
    let mut script = Vec::new();
    clap_complete::generate(shell, &mut completion_command(), "turbosched", &mut script);
    write_stdout(&script)?;
    Ok(ExitCode::SUCCESS)
}

/// [`Cli`] without its hidden subcommands: clap_complete offers hidden subcommands too
/// (clap issue 1335), and `worker` or `bench-seed` are not for people. `Command` has no
/// `remove_subcommand`, so the root is built again from `Cli`'s own arguments and its
/// visible subcommands; nothing of the command line is written twice.
fn completion_command() -> clap::Command {
    use clap::CommandFactory;
    let full = Cli::command();
    let mut command = clap::Command::new("turbosched")
        .version(env!("CARGO_PKG_VERSION"))
        .about(full.get_about().cloned().unwrap_or_default());
    for arg in full.get_arguments() {
        command = command.arg(arg.clone());
    }
    for sub in full.get_subcommands().filter(|sub| !sub.is_hide_set()) {
        command = command.subcommand(sub.clone());
    }
    command
}

fn man(out_dir: Option<&Path>) -> Result<ExitCode> {
    use clap::CommandFactory;
    if let Some(dir) = out_dir {
        std::fs::create_dir_all(dir)
            .with_context(|| format!("--out-dir {}: cannot create the folder", dir.display()))?;
        clap_mangen::generate_to(Cli::command(), dir)
            .with_context(|| format!("--out-dir {}: cannot write the man pages", dir.display()))?;
        out!("man pages written to {}", dir.display())?;
        return Ok(ExitCode::SUCCESS);
    }
    let mut page = Vec::new();
    clap_mangen::Man::new(Cli::command())
        .render(&mut page)
        .context("cannot render the man page")?;
    write_stdout(&page)?;
    Ok(ExitCode::SUCCESS)
}

fn write_stdout(bytes: &[u8]) -> Result<()> {
    use std::io::Write as _;
    let mut stdout = std::io::stdout().lock();
    stdout.write_all(bytes).map_err(stdout_error)?;
    stdout.flush().map_err(stdout_error)
}

fn validate(path: &Path) -> Result<ExitCode> {
    match config::load(path) {
        Ok(config) => {
            out!("{}: ok, {} task(s)", path.display(), config.tasks.len())?;
            Ok(ExitCode::SUCCESS)
        }
        Err(errors) => {
            for err in &errors.0 {
                eprintln!("{err}");
            }
            eprintln!("{} error(s)", errors.0.len());
            Ok(ExitCode::from(1))
        }
    }
}

fn audit(path: &Path, since: &str, json: bool) -> Result<ExitCode> {
    let config = load(path)?;
    let store = open_store(&config)?;
    let now = SystemClock.now();
    let since = match chrono::DateTime::parse_from_rfc3339(since) {
        Ok(at) => at.with_timezone(&chrono::Utc),
        Err(_) => {
            let ago = humantime::parse_duration(since).map_err(|err| {
                anyhow::anyhow!(
                    "--since: expected a duration such as \"24h\" or an RFC 3339 instant, found {since:?} ({err})"
                )
            })?;
            now - chrono::TimeDelta::from_std(ago).unwrap_or(chrono::TimeDelta::MAX)
        }
    };
    let audit = turbosched::audit::audit(&config, &store, since)?;
    if json {
        out!("{}", views::audit(since, &audit))?;
    } else {
        out!(
            "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}  states",
            "task",
            "expected",
            "claimed",
            "dropped",
            "missing",
            "doubled",
            "unfinished"
        )?;
        for t in &audit.tasks {
            let states: Vec<String> = t.by_state.iter().map(|(s, n)| format!("{s} {n}")).collect();
            out!(
                "{:<24} {:>8} {:>8} {:>8} {:>8} {:>8} {:>10}  {}{}",
                t.task,
                t.expected,
                t.claimed,
                t.dropped,
                t.missing,
                t.doubled,
                t.unfinished,
                states.join(", "),
                if t.uncounted {
                    " (ticks older than misfire_grace passed over: not counted)"
                } else {
                    ""
                }
            )?;
        }
        out!("integrity: {}", audit.integrity)?;
        out!(
            "{}",
            if audit.ok() {
                "ok: every tick accounted for, none doubled"
            } else {
                "NOT OK"
            }
        )?;
    }
    Ok(if audit.ok() {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    })
}

/// `turbosched migrate`: refuses a source that is no turbosched SQLite file, is newer than
/// this build, or has a live instance (unless `force`), and a target that is not empty
/// (`store::migrate` says why each); then copies, verifies and prints the counts.
fn migrate(path: &Path, to: &str, from: Option<PathBuf>, force: bool) -> Result<ExitCode> {
    use turbosched::store::migrate;
    let (source, heartbeat_timeout) = match from {
        // The config, when there is one, only says how long an instance's heartbeat lasts
        // (30 s, `[scheduler] heartbeat_timeout`'s default, without one).
        Some(from) => (
            from,
            config::read_locations(path)
                .map(|locations| locations.heartbeat_timeout)
                .unwrap_or(Duration::from_secs(30)),
        ),
        None => {
            let reading = load_for_reading(path, false)?;
            let database = reading.locations.database;
            let setting = database.to_string_lossy();
            if setting.starts_with("postgres://") || setting.starts_with("postgresql://") {
                bail!(
                    "{}: [scheduler] database is already a PostgreSQL URL; name the SQLite file to copy with --from",
                    path.display()
                );
            }
            (database, reading.locations.heartbeat_timeout)
        }
    };
    migrate::check_source(&source)?;
    {
        // Opened as every command opens it: an older file is brought forward here.
        let store = Store::open(&source)?;
        let now = SystemClock.now();
        let live = store.live_instances(heartbeat_timeout, now)?;
        if let Some(instance) = live.first().filter(|_| !force) {
            let ago = (now - instance.heartbeat_at).num_milliseconds() as f64 / 1000.0;
            bail!(
                "{}: instance {} (pid {} on {}, {}) is live, its last heartbeat {ago:.1} s ago: \
                 what it writes after the copy would be left behind; stop it (`kill -TERM {}`) \
                 and migrate again, or pass --force",
                source.display(),
                instance.id,
                instance.pid,
                instance.host,
                if instance.serving {
                    "serving"
                } else {
                    "a foreground `turbosched run`"
                },
                instance.pid
            );
        }
    }
    let migration = migrate::sqlite_to_postgres(&source, to)?;
    out!(
        "migrated {} -> {} in {:.2} s",
        migration.from.display(),
        migration.to,
        migration.elapsed.as_secs_f64()
    )?;
    out!("{:<16} {:>12} {:>12}", "table", "sqlite", "postgresql")?;
    for table in &migration.tables {
        out!(
            "{:<16} {:>12} {:>12}",
            table.name,
            table.sqlite,
            table.postgres
        )?;
    }
    out!(
        "ok: every count equal; new runs are numbered from {}",
        migration.max_run_id.unwrap_or(0) + 1
    )?;
    out!(
        "next: set database = \"{}\" under [scheduler] (with its password, if any) and start the service",
        migration.to
    )?;
    Ok(ExitCode::SUCCESS)
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        // Idle threads stay: a child started with PR_SET_PDEATHSIG (cluster mode) dies
        // with the thread that started it, which must therefore live as long as the
        // service (tokio ends idle threads after 10 s by default).
        .thread_keep_alive(Duration::from_secs(100 * 365 * 24 * 3600))
        .build()
        .context("cannot start the async runtime")
}

/// The service log: stderr, and with a config also `<log_dir>/scheduler.log` (rotated by
/// `[logging]`), each line `[<RFC 3339>] <logger> - <LEVEL> - <message>`. Keep the guard
/// alive: dropping it flushes the file writer.
fn init_tracing(config: Option<&Config>) -> Option<tracing_appender::non_blocking::WorkerGuard> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter = || {
        tracing_subscriber::EnvFilter::try_from_env("TURBOSCHED_LOG")
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"))
    };
    let stderr = tracing_subscriber::fmt::layer()
        .with_ansi(std::io::stderr().is_terminal())
        .with_writer(std::io::stderr)
        .with_filter(filter());
    let (file, guard) = match config {
        Some(config) => {
            let writer = turbosched::tasklog::RotatingFile::new(
                config.scheduler.log_dir.join("scheduler.log"),
                config.logging.max_size,
                config.logging.scheduler_backups,
            );
            let (writer, guard) = tracing_appender::non_blocking(writer);
            let layer = tracing_subscriber::fmt::layer()
                .event_format(LineFormat)
                .with_ansi(false)
                .with_writer(writer)
                .with_filter(filter());
            (Some(layer), Some(guard))
        }
        None => (None, None),
    };
    let _ = tracing_subscriber::registry()
        .with(stderr)
        .with(file)
        .try_init();
    guard
}

/// `[2026-11-22T16:30:00.001234Z] turbosched::engine - INFO - scheduler started tasks=2`
struct LineFormat;

impl<S, N> tracing_subscriber::fmt::FormatEvent<S, N> for LineFormat
where
    S: tracing::Subscriber + for<'a> tracing_subscriber::registry::LookupSpan<'a>,
    N: for<'a> tracing_subscriber::fmt::FormatFields<'a> + 'static,
{
    fn format_event(
        &self,
        ctx: &tracing_subscriber::fmt::FmtContext<'_, S, N>,
        mut writer: tracing_subscriber::fmt::format::Writer<'_>,
        event: &tracing::Event<'_>,
    ) -> std::fmt::Result {
        let metadata = event.metadata();
        let prefix = format!(
            "[{}] {} - {} - ",
            chrono::Utc::now().format("%Y-%m-%dT%H:%M:%S%.6fZ"),
            metadata.target(),
            metadata.level()
        );
        let mut message = String::new();
        let mut into = tracing_subscriber::fmt::format::Writer::new(&mut message);
        // The spans around the event (a run's runner: task, run, attempt) come first.
        if let Some(scope) = ctx.event_scope() {
            for span in scope.from_root() {
                let extensions = span.extensions();
                if let Some(fields) =
                    extensions.get::<tracing_subscriber::fmt::FormattedFields<N>>()
                {
                    if !fields.is_empty() {
                        write!(into, "{fields}: ")?;
                    }
                }
            }
        }
        ctx.field_format().format_fields(into.by_ref(), event)?;
        // A message of several lines (a reload's config errors) keeps the prefix on each,
        // so every line of the file can be grepped and parsed alike.
        for line in message.trim_end_matches('\n').split('\n') {
            writeln!(writer, "{prefix}{line}")?;
        }
        Ok(())
    }
}

/// Cancels the engine on SIGTERM or SIGINT.
/// The handlers are in place when this returns (a SIGTERM from then on is ours, even
/// during a long start-up), and the engine stops at its next check.
fn shutdown_on_signals(handle: turbosched::engine::Handle) {
    use tokio::signal::unix::{signal, SignalKind};
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        tracing::warn!("cannot listen for SIGTERM/SIGINT");
        return;
    };
    tokio::spawn(async move {
        tokio::select! {
            _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
            _ = int.recv() => tracing::info!("SIGINT: shutting down"),
        }
        handle.shutdown();
    });
}

fn serve(path: &Path) -> Result<ExitCode> {
    // First: it takes systemd's variables out of the environment, before any thread exists.
    let systemd = crate::systemd::Systemd::from_env()?;
    let config = Arc::new(load(path)?);
    let _log_guard = init_tracing(Some(&config));
    let token = turbosched::api::token_from_env(
        &config.api.token_env,
        std::env::var_os(&config.api.token_env),
    )
    .map_err(|err| anyhow!(err))?;
    turbosched::api::check_bind(&config.api.bind, &config.api.token_env, token.is_some())
        .map_err(|err| anyhow!(err))?;
    let token_note = if token.is_some() {
        format!(
            "token in force (from ${}): mutating routes need Authorization: Bearer <token>",
            config.api.token_env
        )
    } else {
        format!(
            "no token (${} unset): mutating routes are open to whoever reaches this loopback address",
            config.api.token_env
        )
    };
    let store = open_store(&config)?;
    // The API reads through a connection of its own, so reads never queue behind writes.
    let api_store = open_store(&config)?;
    let runtime = runtime()?;
    runtime.block_on(async {
        let mut engine = Engine::new(config.clone(), store, Arc::new(SystemClock), Mode::Serve);
        if let Some(systemd) = systemd {
            engine.set_service_manager(Arc::new(systemd));
        }
        shutdown_on_signals(engine.handle());
        let state = turbosched::api::ApiState::new(
            engine.handle(),
            engine.board(),
            engine.metrics(),
            api_store.written_by(engine.instance()),
            token,
        );
        let (server, address) = turbosched::api::start(state, &config.api.bind)
            .with_context(|| format!("cannot serve the API on {} ([api] bind)", config.api.bind))?;
        engine.set_api_address(address.to_string());
        tracing::info!("API listening on http://{address}; {token_note}");
        let server_handle = server.handle();
        tokio::spawn(server);
        reload_on_sighup(engine.handle());
        // Its own thread and its own connection: a hanging endpoint never holds a tick.
        let alerts = turbosched::alerts::AlertSender::start(
            config.alerts.clone(),
            Some(format!("http://{address}")),
            open_store(&config)?.written_by(engine.instance()),
            engine.metrics(),
            engine.instance().to_string(),
            Arc::new(SystemClock),
        );
        let result = engine.run().await;
        if let Some(alerts) = alerts {
            tokio::task::block_in_place(|| alerts.stop());
        }
        server_handle.stop(true).await;
        result.map_err(anyhow::Error::from)
    })?;
    Ok(ExitCode::SUCCESS)
}

/// SIGHUP reloads the config, as `POST /scheduler/reload` does; a bad file keeps the
/// running config and the reason goes to the log.
fn reload_on_sighup(handle: turbosched::engine::Handle) {
    tokio::spawn(async move {
        use tokio::signal::unix::{signal, SignalKind};
        let Ok(mut hangup) = signal(SignalKind::hangup()) else {
            tracing::warn!("cannot listen for SIGHUP");
            return;
        };
        while hangup.recv().await.is_some() {
            tracing::info!("SIGHUP: reloading the config");
            if let Err(err) = handle.reload().await {
                tracing::warn!("{err}");
            }
        }
    });
}

/// True when a service (not a foreground `turbosched run`) is up to take a run.
fn live_service(config: &Config, store: &Store) -> Result<bool> {
    Ok(store
        .live_instances(config.scheduler.heartbeat_timeout, SystemClock.now())?
        .iter()
        .any(|instance| instance.serving))
}

fn run(
    path: &Path,
    task: &str,
    options: RunOptions,
    params: Option<config::RunParams>,
    utc: bool,
) -> Result<ExitCode> {
    let reading = load_for_reading(path, utc)?;
    let Some(config) = reading.config.clone() else {
        return run_by_service(&reading, task, options, params);
    };
    let store = open_store(&config)?;
    let members = Members::of(Some(&config), task, options.downstream);
    if !options.json {
        // The breaker pauses the schedule only: a manual run goes ahead, and says so.
        if let Ok(Some(opened)) = turbosched::engine::open_circuit(&store, task) {
            out!(
                "note: the circuit of {task} is open since {} ({}); this manual run goes ahead",
                shown(config.scheduler.timezone, utc).at(opened.at),
                opened.message
            )?;
        }
    }
    if live_service(&config, &store)? {
        let root = enqueue_manual(
            &config,
            &store,
            SystemClock.now(),
            task,
            options.force,
            options.downstream,
            params,
        )?;
        return handed_over(&reading, &store, root, task, &members, options);
    }
    if options.wait == Some(false) {
        eprintln!(
            "note: no service is up to hand the run to: it runs here, and that is waiting for it"
        );
    }
    let _log_guard = init_tracing(Some(&config));
    let runtime = runtime()?;
    let mut watch = Watch::new(options.json, reading.shown);
    let done = std::sync::atomic::AtomicBool::new(false);
    let root = std::thread::scope(|scope| {
        runtime.block_on(async {
            let mut engine = Engine::new(
                config.clone(),
                store.clone(),
                Arc::new(SystemClock),
                Mode::Foreground,
            );
            let root = engine.enqueue_manual(task, options.force, options.downstream, params)?;
            if !options.json {
                out!("run {root} of {task}: no service is up, running it here")?;
            }
            shutdown_on_signals(engine.handle());
            let (store, watch, done) = (&store, &mut watch, &done);
            let members = &members;
            let watcher = scope.spawn(move || {
                follow(
                    store,
                    root,
                    members,
                    watch,
                    &|| done.load(std::sync::atomic::Ordering::SeqCst),
                    None,
                )
            });
            let ran = engine.run().await;
            done.store(true, std::sync::atomic::Ordering::SeqCst);
            let followed = watcher
                .join()
                .map_err(|_| anyhow!("the progress display stopped"))?;
            ran?;
            followed?;
            Ok::<RunId, anyhow::Error>(root)
        })
    })?;
    report_outcome(&store, root, &members, &mut watch)
}

/// What `turbosched run` was asked.
#[derive(Clone, Copy)]
struct RunOptions {
    /// `--wait` (`Some(true)`), `--no-wait` (`Some(false)`), or neither.
    wait: Option<bool>,
    force: bool,
    downstream: bool,
    json: bool,
}

impl RunOptions {
    /// Whether to wait for a run handed to the service: as asked, else when stdout is a
    /// terminal (someone is watching). A pipe or a file gets the run's id at once — a
    /// script that wants the outcome as exit code says `--wait`.
    fn waits(&self) -> bool {
        self.wait.unwrap_or_else(|| std::io::stdout().is_terminal())
    }
}

/// A run the service took: its id at once, or the run and its cascade followed to their
/// end, shown as a run made here is.
fn handed_over(
    reading: &Reading,
    store: &Store,
    root: RunId,
    task: &str,
    members: &Members,
    options: RunOptions,
) -> Result<ExitCode> {
    if !options.waits() {
        if options.json {
            out!("{}", views::handed_to_service(root))?;
        } else {
            out!(
                "run {root} of {task} queued; the service will start it (turbosched show {root})"
            )?;
        }
        return Ok(ExitCode::SUCCESS);
    }
    if !options.json {
        out!("run {root} of {task} queued with the running service; waiting (Ctrl-C stops waiting, not the run)")?;
    }
    let mut watch = Watch::new(options.json, reading.shown);
    let timeout = reading.locations.heartbeat_timeout;
    let service_gone = || -> Result<bool> {
        let live = store.live_instances(timeout, SystemClock.now())?;
        Ok(!live.iter().any(|instance| instance.serving))
    };
    if let Followed::ServiceGone(open) = follow(
        store,
        root,
        members,
        &mut watch,
        &|| false,
        Some(&service_gone),
    )? {
        watch.finish();
        let open: Vec<String> = open
            .iter()
            .map(|r| format!("{} {} (run {})", r.task, r.state, r.id))
            .collect();
        eprintln!(
            "turbosched: the service stopped while waiting (no live instance: no heartbeat for more than {}); still open: {}. Start it again (`turbosched serve`): it orphans and retries or fails them by policy",
            humantime::format_duration(timeout),
            open.join(", ")
        );
        return Ok(ExitCode::from(2));
    }
    report_outcome(store, root, members, &mut watch)
}

/// How [`follow`] ended.
enum Followed {
    /// The runs ended (or waiting was stopped).
    Ended,
    /// No service is left to move the runs on: these are still open.
    ServiceGone(Vec<RunRow>),
}

/// How often [`follow`] asks the store whether a service is still up.
const LIVENESS_EVERY: Duration = Duration::from_secs(1);

/// `run` with a broken config: only a running service, with the valid config it loaded,
/// can take the run. It is asked through its API (`POST /scheduler/tasks/<task>/run`, the
/// token from `[api] token_env`), as the file's task list is unknown here.
fn run_by_service(
    reading: &Reading,
    task: &str,
    options: RunOptions,
    params: Option<config::RunParams>,
) -> Result<ExitCode> {
    let store = reading.open_store()?;
    let instances = store.live_instances(reading.locations.heartbeat_timeout, SystemClock.now())?;
    let Some(address) = instances
        .iter()
        .filter(|i| i.serving)
        .find_map(|i| i.api.clone())
    else {
        bail!("cannot run {task}: the config is invalid and no service is up to take the run (`turbosched validate` shows the errors)");
    };
    if !task
        .chars()
        .all(|c| c.is_ascii_alphanumeric() || "_-.".contains(c))
    {
        bail!("unknown task \"{task}\"");
    }
    let token = std::env::var(&reading.locations.token_env)
        .ok()
        .filter(|token| !token.trim().is_empty());
    let body =
        views::trigger_options(options.force, options.downstream, params.map(|p| p.0)).to_string();
    let (code, answer) = http_post(
        &address,
        &format!("/scheduler/tasks/{task}/run"),
        &body,
        token.as_deref(),
    )
    .with_context(|| format!("cannot reach the service's API at http://{address}"))?;
    let root = match answer["run_id"].as_i64() {
        Some(id) if code / 100 == 2 => RunId(id),
        _ => bail!(
            "the service refused the run ({code}): {}",
            answer["error"]["message"].as_str().unwrap_or("no message")
        ),
    };
    let members = Members::of(None, task, options.downstream);
    handed_over(reading, &store, root, task, &members, options)
}

/// One HTTP/1.1 POST of a JSON body, answered with the status and the JSON body (`null`
/// if it is not JSON). The CLI's one request: no client library for it.
fn http_post(
    address: &str,
    path: &str,
    body: &str,
    token: Option<&str>,
) -> std::io::Result<(u16, Value)> {
    use std::io::{Read, Write};
    let mut stream = std::net::TcpStream::connect(address)?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let auth = token
        .map(|token| format!("Authorization: Bearer {token}\r\n"))
        .unwrap_or_default();
    write!(
        stream,
        "POST {path} HTTP/1.1\r\nHost: {address}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n{auth}Connection: close\r\n\r\n{body}",
        body.len()
    )?;
    let mut response = Vec::new();
    stream.read_to_end(&mut response)?;
    let text = String::from_utf8_lossy(&response);
    let (head, body) = text.split_once("\r\n\r\n").unwrap_or((&text, ""));
    let code = head
        .split_whitespace()
        .nth(1)
        .and_then(|code| code.parse().ok())
        .ok_or_else(|| {
            std::io::Error::new(std::io::ErrorKind::InvalidData, "not an HTTP answer")
        })?;
    Ok((code, serde_json::from_str(body).unwrap_or(Value::Null)))
}

/// The members of a run's cascade `run` follows: the root's task and, with
/// `--downstream` and a valid config, every task downstream of it (the engine queues
/// each when its upstreams end). Without a config the cascade's size is unknown.
struct Members {
    downstream: bool,
    /// The tasks expected, root first, in dependency order; `None`: unknown.
    tasks: Option<Vec<TaskName>>,
}

impl Members {
    fn of(config: Option<&Config>, task: &str, downstream: bool) -> Members {
        let root = TaskName(task.to_string());
        let tasks = match (downstream, config) {
            (false, _) => Some(vec![root]),
            (true, None) => None,
            (true, Some(config)) => {
                let below = config.downstream_of(&root);
                Some(std::iter::once(root).chain(below).collect())
            }
        };
        Members { downstream, tasks }
    }

    /// The cascade's runs so far, root first.
    fn runs(&self, store: &Store, root: RunId) -> Result<Vec<RunRow>> {
        Ok(if self.downstream {
            store.cascade_runs(root)?
        } else {
            store.run(root)?.into_iter().collect()
        })
    }

    /// The expected tasks without a run yet.
    fn unqueued(&self, runs: &[RunRow]) -> Vec<TaskName> {
        self.tasks
            .iter()
            .flatten()
            .filter(|task| !runs.iter().any(|run| &run.task == *task))
            .cloned()
            .collect()
    }
}

/// How `run` shows a run and its cascade while they go: a table redrawn in place when
/// stdout is a terminal; a line appended for each member's move otherwise (a pipe, a
/// file, a CI log); nothing with `--json`, whose stdout is the outcome alone.
struct Watch {
    shown: Shown,
    live: Option<indicatif::ProgressBar>,
    lines: bool,
    /// `--json`: nothing while it goes.
    json: bool,
    /// Each member's last (state, attempt) shown as a line.
    seen: std::collections::HashMap<RunId, (RunState, u32)>,
}

impl Watch {
    fn new(json: bool, shown: Shown) -> Watch {
        let terminal = !json && std::io::stdout().is_terminal();
        let live = terminal.then(|| {
            let bar = indicatif::ProgressBar::with_draw_target(
                None,
                indicatif::ProgressDrawTarget::stdout(),
            );
            bar.set_style(
                indicatif::ProgressStyle::with_template("{spinner} {elapsed}\n{msg}")
                    .unwrap_or_else(|_| indicatif::ProgressStyle::default_spinner()),
            );
            bar.enable_steady_tick(Duration::from_millis(200));
            bar
        });
        Watch {
            shown,
            live,
            lines: !json && !terminal,
            json,
            seen: std::collections::HashMap::new(),
        }
    }

    /// Shows where the members are now.
    fn show(&mut self, runs: &[RunRow], unqueued: &[TaskName], now: Instant) -> Result<()> {
        if let Some(bar) = &self.live {
            bar.set_message(cascade_table(runs, unqueued, now, false));
        }
        if !self.lines {
            return Ok(());
        }
        for run in runs {
            let key = (run.state, run.attempt.0);
            if self.seen.get(&run.id) == Some(&key) {
                continue;
            }
            self.seen.insert(run.id, key);
            let detail = match run.state {
                RunState::Queued => String::new(),
                RunState::Running | RunState::RetryWait => {
                    format!(", attempt {}/{}", run.attempt, run.max_attempts)
                }
                _ => {
                    let taken = duration_text(run);
                    let taken = if taken.is_empty() {
                        String::new()
                    } else {
                        format!(" after {taken}")
                    };
                    match run.error.as_ref().or(run.reason.as_ref()) {
                        Some(why) => format!("{taken}: {why}"),
                        None => taken,
                    }
                }
            };
            out!(
                "{}  run {} {}: {}{detail}",
                self.shown.clock(now),
                run.id,
                run.task,
                run.state
            )?;
        }
        Ok(())
    }

    /// Takes the live table away before the outcome is printed.
    fn finish(&mut self) {
        if let Some(bar) = self.live.take() {
            bar.finish_and_clear();
        }
    }
}

/// The members as a table: task, run, state, attempt, time taken (so far), progress;
/// the expected members without a run yet as `waiting` (or `never queued` at the end).
fn cascade_table(runs: &[RunRow], unqueued: &[TaskName], now: Instant, ended: bool) -> String {
    let mut text = format!(
        "{:<16} {:<7} {:<11} {:<8} {:<10} PROGRESS\n",
        "TASK", "RUN", "STATE", "ATTEMPT", "TIME"
    );
    for run in runs {
        let taken = match (run.started_at, run.finished_at) {
            (Some(start), end) => {
                let ms = (end.unwrap_or(now) - start).num_milliseconds().max(0) as u64;
                humantime::format_duration(Duration::from_millis(ms / 100 * 100)).to_string()
            }
            _ => "-".to_string(),
        };
        let progress = match (run.progress, &run.phase) {
            (Some(p), Some(phase)) => format!("{p:.0}% {phase}"),
            (Some(p), None) => format!("{p:.0}%"),
            (None, _) => String::new(),
        };
        text.push_str(&format!(
            "{:<16} {:<7} {:<11} {:<8} {:<10} {}\n",
            run.task,
            run.id,
            run.state,
            format!("{}/{}", run.attempt, run.max_attempts),
            taken,
            progress
        ));
    }
    for task in unqueued {
        let state = if ended { "never queued" } else { "waiting" };
        text.push_str(&format!("{task:<16} {:<7} {state}\n", "-"));
    }
    text.trim_end().to_string()
}

/// How long `follow` waits, once every run of a cascade has ended, for members that were
/// never queued: far above the service's 200 ms poll and a heartbeat.
const CASCADE_PATIENCE: Duration = Duration::from_secs(10);

/// Shows the run and its cascade until every member has ended (or `stop` says the engine
/// running them here has ended).
fn follow(
    store: &Store,
    root: RunId,
    members: &Members,
    watch: &mut Watch,
    stop: &dyn Fn() -> bool,
    service_gone: Option<&dyn Fn() -> Result<bool>>,
) -> Result<Followed> {
    let mut settled_since: Option<std::time::Instant> = None;
    let mut last_look = std::time::Instant::now();
    loop {
        // Read before the store: the last look after `stop` sees every end.
        let stopping = stop();
        let runs = members.runs(store, root)?;
        watch.show(&runs, &members.unqueued(&runs), SystemClock.now())?;
        if stopping {
            return Ok(Followed::Ended);
        }
        let settled = runs.iter().all(|r| r.state.is_terminal());
        // A service that died (kill -9, a crash, a host gone) moves nothing on: say so
        // instead of waiting for ever. Its heartbeat lapsing is the sign.
        if let Some(service_gone) = service_gone.filter(|_| !settled) {
            if last_look.elapsed() >= LIVENESS_EVERY {
                last_look = std::time::Instant::now();
                if service_gone()? {
                    let open = runs.into_iter().filter(|r| !r.state.is_terminal());
                    return Ok(Followed::ServiceGone(open.collect()));
                }
            }
        }
        // Every member the engine queues is queued when its upstreams end; one that stays
        // unqueued long after every run ended is a member the engine will not queue (its
        // task was removed by a reload, say): stop waiting for it rather than for ever.
        // Without a valid config the cascade's size is unknown: wait until it settles.
        let stalled = match (settled, settled_since) {
            (true, Some(since)) => since.elapsed() > CASCADE_PATIENCE,
            (true, None) => {
                settled_since = Some(std::time::Instant::now());
                false
            }
            (false, _) => {
                settled_since = None;
                false
            }
        };
        let all_there = members
            .tasks
            .as_ref()
            .is_some_and(|_| members.unqueued(&runs).is_empty());
        if !runs.is_empty() && settled && (all_there || stalled) {
            return Ok(Followed::Ended);
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The outcome of a run and its cascade: the members' table and where their outputs
/// are (or the JSON of both); exit code 0 when every member succeeded, else 1.
fn report_outcome(
    store: &Store,
    root: RunId,
    members: &Members,
    watch: &mut Watch,
) -> Result<ExitCode> {
    watch.finish();
    let runs = members.runs(store, root)?;
    if runs.is_empty() {
        bail!("run {root} not found");
    }
    let all_ok = runs.iter().all(|r| r.state == RunState::Succeeded);
    let code = if all_ok {
        ExitCode::SUCCESS
    } else {
        ExitCode::from(1)
    };
    if watch.json {
        out!("{}", views::run_outcome(root, &runs))?;
        return Ok(code);
    }
    let unqueued = members.unqueued(&runs);
    let succeeded = runs
        .iter()
        .filter(|r| r.state == RunState::Succeeded)
        .count();
    let total = runs.len() + unqueued.len();
    let failed: Vec<String> = runs
        .iter()
        .filter(|r| r.state != RunState::Succeeded)
        .map(|r| format!("{} {} (run {})", r.task, r.state, r.id))
        .collect();
    let root_task = &runs[0].task;
    let what = if members.downstream {
        format!("run {root} of {root_task} and its cascade")
    } else {
        format!("run {root} of {root_task}")
    };
    if failed.is_empty() && unqueued.is_empty() {
        out!("{what}: {succeeded} of {total} succeeded")?;
    } else {
        let mut not = failed;
        not.extend(unqueued.iter().map(|t| format!("{t} never queued")));
        out!(
            "{what}: {succeeded} of {total} succeeded; not: {}",
            not.join(", ")
        )?;
    }
    out!(
        "{}",
        cascade_table(&runs, &unqueued, SystemClock.now(), true)
    )?;
    let mut listed = false;
    for run in &runs {
        let outputs = turbosched::outputs::outputs_of_text(run.result.as_deref());
        if outputs.is_empty() {
            continue;
        }
        if !listed {
            out!("outputs:")?;
            listed = true;
        }
        out!("  {} (run {}):", run.task, run.id)?;
        for output in outputs {
            out!("    {:<16} {}", output.label, output.path.display())?;
        }
    }
    if !listed {
        out!("outputs: none named in the runs' results")?;
    }
    Ok(code)
}

fn status(path: &Path, json: bool, utc: bool) -> Result<ExitCode> {
    let reading = load_for_reading(path, utc)?;
    let store = reading.open_store()?;
    let now = SystemClock.now();
    let instances = live_instances_and_runs(
        &store,
        store.live_instances(reading.locations.heartbeat_timeout, now)?,
    )?;
    let Some(config) = &reading.config else {
        return status_from_store(&store, &instances, json, now, reading.shown);
    };
    let mut tasks = Vec::new();
    for spec in config.tasks.values() {
        let state = store.task_state(&spec.name)?;
        let last = store.runs(&RunFilter {
            task: Some(spec.name.0.clone()),
            limit: 1,
            ..RunFilter::default()
        })?;
        let running = store
            .runs(&RunFilter {
                task: Some(spec.name.0.clone()),
                state: Some(RunState::Running),
                limit: 10,
                ..RunFilter::default()
            })?
            .len();
        let next = state
            .next_fire_at
            .or_else(|| spec.schedule.as_ref().and_then(|s| s.next_after(now)));
        let circuit_open =
            state.paused && turbosched::engine::open_circuit(&store, spec.name.as_str())?.is_some();
        tasks.push(views::StoredTask {
            spec,
            paused: state.paused,
            circuit_open,
            next_fire: next,
            last: last.into_iter().next(),
            running,
        });
    }
    let pools = stored_pools(&store, config)?;
    if json {
        out!("{}", views::stored_status(&instances, &tasks, &pools, now))?;
        return Ok(ExitCode::SUCCESS);
    }
    print_service(&instances, now)?;
    for pool in &pools {
        out!(
            "pool {}: {}/{} running, {} waiting",
            pool.name,
            pool.running,
            pool.slots,
            pool.waiting
        )?;
    }
    out!(
        "{:<16} {:<22} {:<27} {:<8} {:<10} LAST RUN",
        "TASK",
        "SCHEDULE",
        "NEXT FIRE",
        "RUNNING",
        "LAST"
    )?;
    for views::StoredTask {
        spec,
        paused,
        circuit_open,
        next_fire: next,
        last,
        running,
    } in tasks
    {
        let schedule = spec
            .schedule
            .as_ref()
            .map(|s| s.expr().to_string())
            .unwrap_or_else(|| "(manual)".into());
        let next = if circuit_open {
            "circuit open".to_string()
        } else if paused {
            "paused".to_string()
        } else if !spec.enabled {
            "disabled".to_string()
        } else {
            next.map(|n| reading.shown.at(n))
                .unwrap_or_else(|| "-".into())
        };
        let (last_state, last_detail) = match last {
            Some(row) => (
                row.state.to_string(),
                format!("run {} {}", row.id, duration_text(&row)),
            ),
            None => ("-".into(), String::new()),
        };
        out!(
            "{:<16} {:<22} {:<27} {:<8} {:<10} {}",
            spec.name,
            schedule,
            next,
            running,
            last_state,
            last_detail
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// Every configured pool's occupancy as the store has it: the running and queued runs of
/// its tasks, whichever instance holds them.
fn stored_pools(store: &Store, config: &Config) -> Result<Vec<turbosched::engine::PoolSnapshot>> {
    let mut running = Vec::new();
    let mut queued = Vec::new();
    for spec in config.tasks.values().filter(|spec| spec.pool.is_some()) {
        for (state, counts) in [
            (RunState::Running, &mut running),
            (RunState::Queued, &mut queued),
        ] {
            let n = store
                .runs(&RunFilter {
                    task: Some(spec.name.0.clone()),
                    state: Some(state),
                    limit: 100_000,
                    ..RunFilter::default()
                })?
                .len();
            counts.push((spec.name.as_str(), n));
        }
    }
    Ok(turbosched::engine::PoolSnapshot::count(
        config, running, queued,
    ))
}

/// The live instances with the runs each is running (cluster mode shows them all).
fn live_instances_and_runs(
    store: &Store,
    live: Vec<InstanceRow>,
) -> Result<Vec<(InstanceRow, Vec<RunId>)>> {
    let running = store.runs(&RunFilter {
        state: Some(RunState::Running),
        limit: 100_000,
        ..RunFilter::default()
    })?;
    Ok(live
        .into_iter()
        .map(|row| {
            let mut runs: Vec<RunId> = running
                .iter()
                .filter(|run| run.owner.as_deref() == Some(row.id.as_str()))
                .map(|run| run.id)
                .collect();
            runs.sort();
            (row, runs)
        })
        .collect())
}

fn print_service(instances: &[(InstanceRow, Vec<RunId>)], now: Instant) -> Result<()> {
    let serving: Vec<&(InstanceRow, Vec<RunId>)> =
        instances.iter().filter(|(row, _)| row.serving).collect();
    match serving.as_slice() {
        [] => out!("service: not running")?,
        [(instance, _)] => out!(
            "service: up (pid {} on {}, instance {}){}",
            instance.pid,
            instance.host,
            instance.id,
            instance
                .api
                .as_ref()
                .map(|a| format!(", API http://{a}"))
                .unwrap_or_default()
        )?,
        several => {
            out!("service: up, {} instances", several.len())?;
            out!(
                "  {:<36} {:<22} {:<10} {:<12} RUNNING",
                "INSTANCE",
                "HOST (PID)",
                "LEASE AGE",
                "CONFIG"
            )?;
            for (instance, runs) in several {
                let age = (now - instance.heartbeat_at).to_std().unwrap_or_default();
                let runs: Vec<String> = runs.iter().map(|r| r.to_string()).collect();
                out!(
                    "  {:<36} {:<22} {:<10} {:<12} {}",
                    instance.id,
                    format!("{} ({})", instance.host, instance.pid),
                    format!("{} ms", age.as_millis()),
                    instance
                        .config_hash
                        .as_deref()
                        .map(|h| h.chars().take(12).collect::<String>())
                        .unwrap_or_else(|| "-".into()),
                    if runs.is_empty() {
                        "-".to_string()
                    } else {
                        runs.join(" ")
                    }
                )?;
            }
        }
    }
    Ok(())
}

/// `status` with a broken config: the tasks the store knows (a stored schedule, or a run
/// among the latest thousand), their stored next fire.
fn status_from_store(
    store: &Store,
    instances: &[(InstanceRow, Vec<RunId>)],
    json: bool,
    now: Instant,
    shown: Shown,
) -> Result<ExitCode> {
    let mut known: std::collections::BTreeMap<TaskName, TaskStateRow> =
        store.task_states()?.into_iter().collect();
    let recent = store.runs(&RunFilter {
        limit: 1000,
        ..RunFilter::default()
    })?;
    for row in recent {
        known.entry(row.task).or_default();
    }
    let mut tasks = Vec::new();
    for (task, state) in known {
        let last = store.runs(&RunFilter {
            task: Some(task.0.clone()),
            limit: 1,
            ..RunFilter::default()
        })?;
        let running = store
            .runs(&RunFilter {
                task: Some(task.0.clone()),
                state: Some(RunState::Running),
                limit: 10,
                ..RunFilter::default()
            })?
            .len();
        tasks.push(views::StoredOnly {
            task,
            state,
            last: last.into_iter().next(),
            running,
        });
    }
    if json {
        out!(
            "{}",
            views::stored_status_without_config(instances, &tasks, now)
        )?;
        return Ok(ExitCode::SUCCESS);
    }
    print_service(instances, now)?;
    out!(
        "{:<16} {:<22} {:<27} {:<8} {:<10} LAST RUN",
        "TASK",
        "STORED SCHEDULE",
        "NEXT FIRE",
        "RUNNING",
        "LAST"
    )?;
    for task in tasks {
        let next = if task.state.paused {
            "paused".to_string()
        } else {
            task.state
                .next_fire_at
                .map(|n| shown.at(n))
                .unwrap_or_else(|| "-".into())
        };
        let (last_state, last_detail) = match &task.last {
            Some(row) => (
                row.state.to_string(),
                format!("run {} {}", row.id, duration_text(row)),
            ),
            None => ("-".into(), String::new()),
        };
        out!(
            "{:<16} {:<22} {:<27} {:<8} {:<10} {}",
            task.task,
            task.state.schedule.as_deref().unwrap_or("-"),
            next,
            task.running,
            last_state,
            last_detail
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

fn runs(
    path: &Path,
    task: Option<String>,
    state: Option<String>,
    limit: usize,
    json: bool,
    utc: bool,
) -> Result<ExitCode> {
    let reading = load_for_reading(path, utc)?;
    let store = reading.open_store()?;
    let state = match state {
        Some(text) => Some(RunState::parse(&text).ok_or_else(|| {
            anyhow!(
                "unknown state {text:?}: expected one of {}",
                RunState::names()
            )
        })?),
        None => None,
    };
    let rows = store.runs(&RunFilter {
        task,
        state,
        limit,
        ..RunFilter::default()
    })?;
    if json {
        out!("{}", views::run_list(&rows))?;
    } else {
        print_runs(&rows, reading.shown)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn show(path: &Path, run: RunId, json: bool, utc: bool) -> Result<ExitCode> {
    let reading = load_for_reading(path, utc)?;
    let shown = reading.shown;
    let store = reading.open_store()?;
    let row = store
        .run(run)?
        .ok_or_else(|| anyhow!("no run with id {run}"))?;
    let attempts = store.attempts(run)?;
    if json {
        out!("{}", views::run_detail(&row, &attempts))?;
        return Ok(ExitCode::SUCCESS);
    }
    out!(
        "run {} of {} ({}), {}",
        row.id,
        row.task,
        row.trigger,
        row.state
    )?;
    out!("  scheduled for {}", shown.precise(row.scheduled_for))?;
    out!("  queued at     {}", shown.precise(row.queued_at))?;
    if let Some(at) = row.started_at {
        out!("  started at    {}", shown.precise(at))?;
    }
    if let Some(at) = row.finished_at {
        out!("  finished at   {}", shown.precise(at))?;
    }
    out!("  attempts      {} of {}", row.attempt, row.max_attempts)?;
    if let Some(params) = &row.params {
        out!("  params        {params}")?;
    }
    if let Some(progress) = row.progress {
        match &row.phase {
            Some(phase) => out!("  progress      {progress:.0}% {phase}")?,
            None => out!("  progress      {progress:.0}%")?,
        }
    }
    for (label, value) in [("reason", &row.reason), ("error", &row.error)] {
        if let Some(value) = value {
            out!("  {label:<13} {value}")?;
        }
    }
    // A handler's result and checkpoint are JSON, often kilobytes: one key a line.
    for (label, value) in [("result", &row.result), ("checkpoint", &row.checkpoint)] {
        if let Some(value) = value {
            out!("  {label}:")?;
            for line in pretty_json(value).lines() {
                out!("    {line}")?;
            }
        }
    }
    for attempt in attempts {
        out!(
            "  attempt {}: {} → {} {}{}",
            attempt.attempt,
            shown.precise(attempt.started_at),
            attempt
                .finished_at
                .map(|at| shown.precise(at))
                .unwrap_or_else(|| "…".into()),
            attempt.outcome.unwrap_or_else(|| "running".into()),
            attempt.error.map(|e| format!(": {e}")).unwrap_or_default()
        )?;
    }
    Ok(ExitCode::SUCCESS)
}

/// `text` indented if it is JSON, else as it is.
fn pretty_json(text: &str) -> String {
    serde_json::from_str::<serde_json::Value>(text)
        .ok()
        .and_then(|value| serde_json::to_string_pretty(&value).ok())
        .unwrap_or_else(|| text.to_string())
}

fn abort(path: &Path, run: RunId) -> Result<ExitCode> {
    let reading = load_for_reading(path, false)?;
    let store = reading.open_store()?;
    match store.request_abort(
        run,
        "abort requested from the command line",
        SystemClock.now(),
    )? {
        AbortOutcome::AbortedNow => out!("run {run} aborted before it started")?,
        AbortOutcome::Requested => out!(
            "abort of run {run} requested; its engine stops it within {}",
            humantime::format_duration(reading.locations.heartbeat_interval)
        )?,
        AbortOutcome::AlreadyFinished(state) => {
            out!("run {run} already finished: {state}")?;
            return Ok(ExitCode::from(1));
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// Refuses a broken file: the fire times come from the task's schedule in it. Shown in
/// the scheduler's zone (or UTC), with the task's own wall-clock time beside each when
/// its schedule is read in another zone.
fn next(path: &Path, task: &str, count: usize, utc: bool) -> Result<ExitCode> {
    let config = config::load(path).map_err(|errors| {
        anyhow!("invalid config (`next` needs the task's schedule from a valid file):\n{errors}")
    })?;
    let spec = config.task(task).ok_or_else(|| {
        anyhow!(
            "unknown task \"{task}\" (known tasks: {})",
            config.task_names().join(", ")
        )
    })?;
    if spec.schedule.is_none() {
        out!("{task} has no schedule: it runs only when triggered")?;
        return Ok(ExitCode::SUCCESS);
    }
    let shown = shown(config.scheduler.timezone, utc);
    // Ticks a calendar skips are listed too, marked, between the `count` that fire.
    for upcoming in spec.upcoming(SystemClock.now(), count) {
        let tick = upcoming.tick.with_timezone(&chrono::Utc);
        // The task's own wall-clock time too, when its zone is not the one shown.
        let own = if upcoming.tick.timezone().name() == shown.zone_name() {
            String::new()
        } else {
            format!(
                "  ({} {})",
                upcoming.tick.format("%Y-%m-%d %H:%M:%S %Z"),
                upcoming.tick.timezone().name()
            )
        };
        match upcoming.skipped {
            Some(reason) => out!("{}{own}  skipped: {reason}", shown.at(tick))?,
            None if spec.jitter.is_zero() => out!("{}{own}", shown.at(tick))?,
            // With a jitter: when it fires, then the tick it belongs to (its claim key).
            None => out!(
                "{}{own}  (tick {}, jitter +{})",
                shown.precise(upcoming.due.with_timezone(&chrono::Utc)),
                shown.clock(tick),
                humantime::format_duration(
                    (upcoming.due - upcoming.tick).to_std().unwrap_or_default()
                )
            )?,
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn archive(path: &Path, dry_run: bool) -> Result<ExitCode> {
    let config = load(path)?;
    let store = open_store(&config)?;
    // The maintenance task's params, when the config has one, else the defaults.
    let params = config
        .tasks
        .values()
        .find(|t| t.handler.name() == "maintenance")
        .map(|t| t.params.clone())
        .unwrap_or(Value::Null);
    let mut options = turbosched::maintenance::Options::from_params(&params, SystemClock.now())?;
    options.dry_run = dry_run;
    let report = turbosched::maintenance::run(&config, &store, &options)?;
    for line in report.lines() {
        out!("{line}")?;
    }
    Ok(ExitCode::SUCCESS)
}

fn logs(
    path: &Path,
    task: &str,
    run: Option<RunId>,
    follow: bool,
    last: Option<usize>,
) -> Result<ExitCode> {
    use turbosched::tasklog::{log_files, task_log_name, LogFollower};

    let reading = load_for_reading(path, false)?;
    let log_dir = &reading.locations.log_dir;
    let configured = reading
        .config
        .as_ref()
        .map(|config| config.task(task).is_some());
    let name = if task == "scheduler" && configured != Some(true) {
        "scheduler.log".to_string()
    } else if configured == Some(true) || !log_files(log_dir, &task_log_name(task)).is_empty() {
        task_log_name(task)
    } else {
        match &reading.config {
            Some(config) => bail!(
                "unknown task \"{task}\" (known tasks: {}; or scheduler)",
                config.task_names().join(", ")
            ),
            None => bail!(
                "no log of task \"{task}\" in {} (the config is invalid, so its tasks are unknown)",
                log_dir.display()
            ),
        }
    };
    let marker = run.map(|run| format!(" run={run} "));
    // Following starts before reading, so no line falls between the two; a line read by
    // both is left out by the follower (`skipping`).
    let follower = follow.then(|| {
        let follower = LogFollower::at_end(log_dir, &name);
        match &marker {
            Some(marker) => follower.only(marker.clone()),
            None => follower,
        }
    });
    let keep = |line: &str| marker.as_ref().is_none_or(|m| line.contains(m.as_str()));
    let archives = run
        .is_some()
        .then_some(reading.locations.archive_dir.as_path());
    let lines = turbosched::tasklog::read_lines(log_dir, archives, &name, &keep)
        .with_context(|| format!("cannot read the logs of {task}"))?;
    let start = last
        .map(|last| lines.len().saturating_sub(last))
        .unwrap_or(0);
    for line in &lines[start..] {
        out!("{line}")?;
    }
    let Some(follower) = follower else {
        return Ok(ExitCode::SUCCESS);
    };
    let already: Vec<String> = lines.iter().rev().take(200).cloned().collect();
    let mut follower = follower.skipping(already);
    loop {
        std::thread::sleep(Duration::from_millis(200));
        for line in follower
            .next_lines()
            .with_context(|| format!("cannot follow the log of {task}"))?
        {
            out!("{line}")?;
        }
    }
}

fn duration_text(row: &RunRow) -> String {
    match (row.started_at, row.finished_at) {
        (Some(start), Some(end)) => {
            let ms = (end - start).num_milliseconds().max(0) as u64;
            humantime::format_duration(Duration::from_millis(ms)).to_string()
        }
        _ => String::new(),
    }
}

fn print_runs(rows: &[RunRow], shown: Shown) -> Result<()> {
    out!(
        "{:<7} {:<16} {:<10} {:<10} {:<27} {:<8} DETAIL",
        "RUN",
        "TASK",
        "TRIGGER",
        "STATE",
        "SCHEDULED FOR",
        "ATTEMPT"
    )?;
    for row in rows {
        let detail = row
            .reason
            .clone()
            .or_else(|| row.error.clone())
            .unwrap_or_else(|| duration_text(row));
        out!(
            "{:<7} {:<16} {:<10} {:<10} {:<27} {:<8} {}",
            row.id,
            row.task,
            row.trigger,
            row.state,
            shown.precise(row.scheduled_for),
            format!("{}/{}", row.attempt, row.max_attempts),
            detail
        )?;
    }
    Ok(())
}

/// `turbosched backfill`'s switches.
struct BackfillOptions {
    downstream: bool,
    dry_run: bool,
    json: bool,
}

fn backfill(
    path: &Path,
    task: &str,
    from: &str,
    to: &str,
    options: BackfillOptions,
    utc: bool,
) -> Result<ExitCode> {
    let BackfillOptions {
        downstream,
        dry_run,
        json,
    } = options;
    let config = Arc::new(load(path)?);
    let shown = shown(config.scheduler.timezone, utc);
    let zone = turbosched::engine::backfill_zone(&config, task);
    let from = turbosched::engine::backfill_bound(from, zone, false, "--from")
        .map_err(|err| anyhow!(err))?;
    let to =
        turbosched::engine::backfill_bound(to, zone, true, "--to").map_err(|err| anyhow!(err))?;
    let store = open_store(&config)?;
    let service = live_service(&config, &store)?;
    let plan = turbosched::engine::backfill(
        &config,
        &store,
        SystemClock.now(),
        task,
        from,
        to,
        downstream,
        dry_run,
    )?;
    let runs: Vec<RunId> = plan.iter().filter_map(|t| t.run).collect();
    if json && (dry_run || runs.is_empty()) {
        out!("{}", views::backfill_plan(task, &plan, dry_run, &[]))?;
    } else if !json {
        for tick in &plan {
            let what = match (tick.run, tick.already) {
                (_, true) => "already ran: not run again".to_string(),
                (Some(run), false) => format!("run {run} queued"),
                (None, false) => "would be queued".to_string(),
            };
            out!("{}  {what}", shown.at(tick.tick))?;
        }
        let already = plan.iter().filter(|t| t.already).count();
        out!(
            "{} ticks of {task}: {} {}, {already} already ran",
            plan.len(),
            if dry_run {
                plan.len() - already
            } else {
                runs.len()
            },
            if dry_run { "to queue" } else { "queued" },
        )?;
    }
    if dry_run || runs.is_empty() {
        return Ok(ExitCode::SUCCESS);
    }
    if service {
        if !json {
            out!("queued with the running service, oldest first; waiting")?;
        }
    } else {
        let _log_guard = init_tracing(Some(&config));
        if !json {
            out!("no service is running: running them here, oldest first")?;
        }
        let runtime = runtime()?;
        let engine_store = store.clone();
        let roots = runs.clone();
        let config = config.clone();
        runtime.block_on(async move {
            let mut engine = Engine::new(
                config,
                engine_store,
                Arc::new(SystemClock),
                Mode::Foreground,
            );
            engine.adopt_roots(&roots);
            shutdown_on_signals(engine.handle());
            engine.run().await
        })?;
    }
    let (code, rows) = backfill_progress(&store, &runs, downstream, json)?;
    if json {
        out!("{}", views::backfill_plan(task, &plan, dry_run, &rows))?;
    }
    Ok(code)
}

/// Waits until every run of a backfill (and with `downstream`, its cascade) has ended,
/// printing `done/total` as it moves; exit code 0 only if every run succeeded.
fn backfill_progress(
    store: &Store,
    roots: &[RunId],
    downstream: bool,
    json: bool,
) -> Result<(ExitCode, Vec<turbosched::store::RunRow>)> {
    let mut shown = usize::MAX;
    loop {
        let mut rows = Vec::new();
        for root in roots {
            if downstream {
                rows.extend(store.cascade_runs(*root)?);
            } else {
                rows.extend(store.run(*root)?);
            }
        }
        let roots_done = rows
            .iter()
            .filter(|r| roots.contains(&r.id) && r.state.is_terminal())
            .count();
        let all_done = rows.iter().all(|r| r.state.is_terminal());
        if !json && roots_done != shown {
            out!("backfill: {roots_done}/{} ticks done", roots.len())?;
            shown = roots_done;
        }
        if roots_done == roots.len() && all_done {
            let failed = rows
                .iter()
                .filter(|r| r.state != RunState::Succeeded)
                .count();
            if !json {
                out!(
                    "backfill done: {} runs, {} succeeded, {failed} did not",
                    rows.len(),
                    rows.len() - failed
                )?;
            }
            let code = if failed == 0 {
                ExitCode::SUCCESS
            } else {
                ExitCode::from(1)
            };
            return Ok((code, rows));
        }
        std::thread::sleep(std::time::Duration::from_millis(200));
    }
}
