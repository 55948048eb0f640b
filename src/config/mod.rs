//! The operator's one file, `config/scheduler.toml`, read in two stages.
//!
//! 1. [`raw`] mirrors the TOML with spans and checks what a value can tell alone (a
//!    duration parses and stays within its bound in [`DURATION_BOUNDS`], a time zone
//!    exists, a schedule fires at least once more, `[api] bind` is an address, no
//!    unknown key).
//! 2. [`Config`] is built once the whole file is read: cron compiled, handlers known,
//!    dependencies known and free of cycles. The engine only ever sees a `Config`.
//!
//! Every error names file, line, column, the key and the reason
//! (`config/scheduler.toml:14:11: tasks.training.timeout: expected a duration such as
//! "90m", found "2 hours"`), and [`load`] reports all of them, not only the first.
//!
//! Relative paths in the file (database, log folder, a command's `cwd`) are taken from
//! the directory the service is started in, as every shipped example assumes.

mod keys;
mod raw;
mod schema;

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use chrono::NaiveDate;
use chrono_tz::Tz;
use sha2::{Digest, Sha256};

use crate::builtins::{self, BUILTINS};
use crate::model::TaskName;
use crate::schedule::{MisfirePolicy, Schedule};

pub use keys::{
    DurationBound, Key, Kind, ALERT_EVENTS, ALERT_KEYS, API_KEYS, BACKOFF_KEYS, CALENDAR_FILE_KEYS,
    CALENDAR_KEYS, DURATION_BOUNDS, LOGGING_KEYS, POOL_KEYS, SCHEDULER_KEYS, TASK_KEYS,
};
pub use schema::json_schema;

/// The params built-in handler `name` reads (its row in [`BUILTINS`]); `None` for
/// `command` and unknown names. Any other key in a task's `params` is a config error.
pub fn handler_params(name: &str) -> Option<&'static [&'static str]> {
    builtins::find(name).map(|builtin| builtin.params)
}

/// The output folders of a task (`GET /scheduler/files` serves nothing else): the ones
/// its params name, else its built-in's defaults.
pub fn output_folders(
    handler: &Handler,
    params: &serde_json::Value,
) -> Vec<crate::outputs::OutputFolder> {
    let defaults = match handler {
        Handler::Builtin(name) => builtins::output_defaults(name),
        Handler::Command(_) => Vec::new(),
    };
    crate::outputs::output_folders(params, &defaults)
}

/// Why `folder` must not be served (`outputs::refusal`): it is, or holds, the service's
/// working directory, database, state folder or log folder.
pub fn output_folder_refusal(folder: &Path, scheduler: &SchedulerSettings) -> Option<String> {
    let base = std::env::current_dir().unwrap_or_default();
    crate::outputs::refusal(
        folder,
        &base,
        &[
            ("database", scheduler.database.as_path()),
            ("state folder", scheduler.state_dir.as_path()),
            ("log folder", scheduler.log_dir.as_path()),
        ],
    )
}

/// Why `key` is refused as a param of handler `handler`, or `None` when it may be given
/// (a key the built-in reads, or any key of a `command` task). The config and a run's
/// own params (`turbosched run --param`, `POST /scheduler/run_<task>`) say the same.
pub fn unknown_param(handler: &str, key: &str) -> Option<String> {
    let known = handler_params(handler)?;
    if known.contains(&key) {
        return None;
    }
    let hint = closest(key, known.iter().copied())
        .map(|near| format!("did you mean \"{near}\"?"))
        .unwrap_or_else(|| format!("it reads {}", known.join(", ")));
    Some(format!("unknown param for handler \"{handler}\" ({hint})"))
}

/// Checks a run's own params against what `spec`'s handler reads: every refusal, as
/// `params.<key>: <why>` (the known params named).
pub fn check_run_params(
    spec: &TaskSpec,
    params: &serde_json::Map<String, serde_json::Value>,
) -> Result<(), String> {
    let handler = spec.handler.name();
    let refused: Vec<String> = params
        .keys()
        .filter_map(|key| {
            unknown_param(handler, key).map(|why| {
                let known = handler_params(handler).unwrap_or_default().join(", ");
                format!("params.{key}: {why}; task {} takes {known}", spec.name)
            })
        })
        .collect();
    if refused.is_empty() {
        Ok(())
    } else {
        Err(refused.join("; "))
    }
}

/// A run's own params (`--param`, the API's `params`): a table of scalars, merged over
/// the task's when the run starts. The engine carries it without looking inside.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct RunParams(pub serde_json::Map<String, serde_json::Value>);

impl RunParams {
    /// [`check_run_params`], then the text stored on the run (`None` when empty).
    pub fn checked_text(&self, spec: &TaskSpec) -> Result<Option<String>, String> {
        if self.0.is_empty() {
            return Ok(None);
        }
        check_run_params(spec, &self.0)?;
        Ok(Some(serde_json::Value::Object(self.0.clone()).to_string()))
    }
}

/// The params an attempt gets: the task's, with a run's own (`run`, the JSON object text
/// stored on the run) over them. Stored params that are no object (never written so)
/// leave the task's as they are.
pub fn merged_params(task: &serde_json::Value, run: Option<&str>) -> serde_json::Value {
    let mut merged = task.clone();
    let own = run.and_then(|text| serde_json::from_str::<serde_json::Value>(text).ok());
    if let (serde_json::Value::Object(into), Some(serde_json::Value::Object(own))) =
        (&mut merged, own)
    {
        into.extend(own);
    }
    merged
}

/// One `--param key=value`: the value read as a TOML scalar (`3`, `2.5`, `true`,
/// `"text"`, `2026-01-02`), else as the text itself.
pub fn parse_param(text: &str) -> Result<(String, serde_json::Value), String> {
    let Some((key, value)) = text.split_once('=') else {
        return Err(format!("--param {text:?}: expected key=value"));
    };
    let key = key.trim();
    if key.is_empty() {
        return Err(format!("--param {text:?}: the key is empty"));
    }
    let parsed = toml::from_str::<toml::Table>(&format!("v = {value}"))
        .ok()
        .and_then(|mut table| table.remove("v"))
        .filter(|v| !matches!(v, toml::Value::Table(_) | toml::Value::Array(_)))
        .and_then(|v| serde_json::to_value(v).ok())
        .unwrap_or_else(|| serde_json::Value::String(value.to_string()));
    Ok((key.to_string(), parsed))
}

/// Every handler a task may name, sorted: the built-ins of [`BUILTINS`] and `command`.
pub fn handler_names() -> Vec<&'static str> {
    let mut names: Vec<&'static str> = BUILTINS.iter().map(|builtin| builtin.name).collect();
    names.push("command");
    names.sort_unstable();
    names
}

/// One problem in a config file, with its place.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// The file the problem is in.
    pub file: PathBuf,
    /// 1-based line, or 0 when the problem has no place (the file cannot be read).
    pub line: usize,
    /// 1-based column.
    pub column: usize,
    /// The dotted key, e.g. `tasks.training.timeout`; empty for syntax errors.
    pub key: String,
    /// What is wrong, lowercase, no trailing full stop.
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.file.display())?;
        if self.line > 0 {
            write!(f, ":{}:{}", self.line, self.column)?;
        }
        if !self.key.is_empty() {
            write!(f, ": {}", self.key)?;
        }
        write!(f, ": {}", self.message)
    }
}

/// Every problem found in one file. Never empty.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, err) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{err}")?;
        }
        Ok(())
    }
}

/// The validated configuration the engine runs on.
#[derive(Debug, Clone)]
pub struct Config {
    /// The file it was read from.
    pub source: PathBuf,
    /// sha256 of the file's bytes, hex.
    pub hash: String,
    /// `[scheduler]`.
    pub scheduler: SchedulerSettings,
    /// `[api]`.
    pub api: ApiSettings,
    /// `[logging]`.
    pub logging: LoggingSettings,
    /// Every `[calendars.<name>]`, by name.
    pub calendars: BTreeMap<String, Arc<Calendar>>,
    /// Every task, by name.
    pub tasks: BTreeMap<TaskName, TaskSpec>,
    /// Some task has a `jitter` (the engine's fast path when none has).
    pub any_jitter: bool,
    /// Task names in dependency order: every task after all of its upstreams.
    pub topo_order: Vec<TaskName>,
    /// `[[alerts]]`, in the file's order.
    pub alerts: Vec<AlertSpec>,
    /// `[pools.<name>] slots`: at most this many runs of the pool's tasks at once.
    pub pools: BTreeMap<String, usize>,
}

/// One `[[alerts]]` table: an endpoint told about some events.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AlertSpec {
    /// Its name (`name`, or `alert-<n>`): the key of its deliveries in the store.
    pub name: String,
    /// Where it is POSTed.
    pub target: AlertTarget,
    /// The event kinds it wants (each one of [`ALERT_EVENTS`]).
    pub events: Vec<String>,
    /// Only events of these tasks, when set.
    pub tasks: Option<BTreeSet<TaskName>>,
    /// POSTs per event before it is given up.
    pub max_attempts: u32,
}

/// Where an alert is POSTed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AlertTarget {
    /// `url`.
    Url(String),
    /// `url_env`: the variable's value, read when the alert is sent.
    Env(String),
}

impl AlertSpec {
    /// Whether an event of `kind` about `task` is for this alert.
    pub fn wants(&self, kind: &str, task: Option<&str>) -> bool {
        self.events.iter().any(|e| e == kind)
            && match (&self.tasks, task) {
                (None, _) => true,
                (Some(tasks), Some(task)) => tasks.contains(&TaskName::from(task)),
                (Some(_), None) => false,
            }
    }

    /// The endpoint now (`url_env` read from the environment), or why there is none.
    pub fn url(&self) -> Result<String, String> {
        match &self.target {
            AlertTarget::Url(url) => Ok(url.clone()),
            AlertTarget::Env(name) => match std::env::var(name) {
                Ok(url) if !url.trim().is_empty() => Ok(url.trim().to_string()),
                _ => Err(format!(
                    "the environment variable {name} (url_env) is not set"
                )),
            },
        }
    }
}

/// `[scheduler]`: the service-wide knobs.
#[derive(Debug, Clone)]
pub struct SchedulerSettings {
    /// Default zone for schedules.
    pub timezone: Tz,
    /// SQLite file of the run history, or a `postgres://` URL (`Store::open` decides).
    pub database: PathBuf,
    /// Attempts running at once, over all tasks.
    pub max_workers: usize,
    /// How often the engine records that its running attempts are alive, and checks
    /// for abort requests.
    pub heartbeat_interval: Duration,
    /// A running run whose heartbeat is older than this is orphaned.
    pub heartbeat_timeout: Duration,
    /// Time between SIGTERM and SIGKILL when an attempt is stopped.
    pub kill_grace: Duration,
    /// On shutdown, how long running attempts may finish before they are stopped.
    pub shutdown_grace: Duration,
    /// Where task logs go.
    pub log_dir: PathBuf,
    /// Where checkpoints go.
    pub state_dir: PathBuf,
    /// PostgreSQL: no LISTEN, runs queued elsewhere, aborts and schedule changes found by
    /// polling alone (for PgBouncer in transaction mode, where LISTEN does not work).
    pub poll_only: bool,
}

/// `[logging]`: rotation of the log files and where archives go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoggingSettings {
    /// A log file is rotated once it has grown past this many bytes (never inside a line).
    pub max_size: u64,
    /// Rotated files kept per task log (`task_<name>.log.1` … `.N`).
    pub task_backups: usize,
    /// Rotated files kept of `scheduler.log`.
    pub scheduler_backups: usize,
    /// Where log archives and database backups go.
    pub archive_dir: PathBuf,
}

/// `[api]`: read now, served by the HTTP layer.
#[derive(Debug, Clone)]
pub struct ApiSettings {
    /// Address to bind.
    pub bind: String,
    /// Name of the env var holding the bearer token.
    pub token_env: String,
}

/// What a task runs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Handler {
    /// A handler compiled into turbosched, run by the hidden `worker` subcommand.
    Builtin(String),
    /// An external program.
    Command(CommandSpec),
}

impl Handler {
    /// The config spelling (`command` for external programs).
    pub fn name(&self) -> &str {
        match self {
            Handler::Builtin(name) => name,
            Handler::Command(_) => "command",
        }
    }
}

/// An external program: argv (or one line for `sh -c` when `shell = true`), cwd, env.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CommandSpec {
    /// The program and its arguments; with `shell`, a single command line.
    pub argv: Vec<String>,
    /// Run `argv[0]` through `/bin/sh -c`.
    pub shell: bool,
    /// Working directory.
    pub cwd: Option<PathBuf>,
    /// Extra environment.
    pub env: BTreeMap<String, String>,
}

/// `overlap`: what a new run does when one of the same task is still running.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Overlap {
    /// The new run is recorded as skipped, naming the running one.
    Skip,
    /// The new run waits until the running one ends.
    Queue,
    /// The running one is aborted; the new run starts once it has stopped.
    Replace,
}

impl Overlap {
    /// The config spelling.
    pub fn as_str(self) -> &'static str {
        match self {
            Overlap::Skip => "skip",
            Overlap::Queue => "queue",
            Overlap::Replace => "replace",
        }
    }
}

/// `retry_backoff`: delay before attempt n+1 is `min(max, initial * factor^(n-1))`,
/// drawn uniformly from `[0, that]` when `jitter` ("full jitter").
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Backoff {
    /// Delay after the first failure.
    pub initial: Duration,
    /// Growth per further failure.
    pub factor: f64,
    /// Cap.
    pub max: Duration,
    /// Full jitter on (default) or off.
    pub jitter: bool,
}

impl Backoff {
    /// The delay after failed attempt `attempt` (1-based), before jitter.
    pub fn ceiling(&self, attempt: u32) -> Duration {
        let exp = attempt.saturating_sub(1).min(64) as i32;
        let secs = self.initial.as_secs_f64() * self.factor.powi(exp);
        let capped = secs.min(self.max.as_secs_f64());
        Duration::try_from_secs_f64(capped).unwrap_or(self.max)
    }

    /// The delay to wait after failed attempt `attempt`, jitter applied.
    pub fn delay(&self, attempt: u32) -> Duration {
        let ceiling = self.ceiling(attempt);
        if self.jitter && !ceiling.is_zero() {
            let fraction: f64 = rand::random();
            ceiling.mul_f64(fraction)
        } else {
            ceiling
        }
    }
}

/// One `[calendars.<name>]`: the dates a task naming it does not fire on, its inline
/// `dates` and those of its `file` together.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Calendar {
    /// Its name (the `<name>` of `[calendars.<name>]`).
    pub name: String,
    /// Free text (the table's, else its file's).
    pub description: String,
    /// The listed dates.
    pub dates: BTreeSet<NaiveDate>,
}

impl Calendar {
    /// Why the tick at `tick` is not fired, when its date in `tz` is listed: the reason a
    /// skipped run records (`calendar nyse: 2025-12-25 is a listed date`).
    pub fn skip_reason(&self, tick: crate::model::Instant, tz: Tz) -> Option<String> {
        let date = tick.with_timezone(&tz).date_naive();
        self.dates
            .contains(&date)
            .then(|| format!("calendar {}: {date} is a listed date", self.name))
    }
}

/// One `[tasks.<name>]`, defaults applied.
#[derive(Debug, Clone)]
pub struct TaskSpec {
    /// Its name.
    pub name: TaskName,
    /// `None`: runs only when triggered.
    pub schedule: Option<Schedule>,
    /// The zone of its schedule.
    pub timezone: Tz,
    /// What it runs.
    pub handler: Handler,
    /// Passed to the handler as JSON.
    pub params: serde_json::Value,
    /// Per attempt.
    pub timeout: Duration,
    /// Attempts after the first.
    pub retries: u32,
    /// Delay between attempts.
    pub backoff: Backoff,
    /// Upstream tasks.
    pub depends_on: Vec<TaskName>,
    /// Upstream success must be at most this old; otherwise since its latest tick.
    pub dependency_max_age: Option<Duration>,
    /// What to do with missed ticks.
    pub misfire: MisfirePolicy,
    /// Missed ticks older than this are dropped.
    pub misfire_grace: Duration,
    /// What a new run does while one is running.
    pub overlap: Overlap,
    /// The pool whose slots its runs take (`pool`), if any.
    pub pool: Option<String>,
    /// Disabled tasks never fire on schedule (manual runs still work).
    pub enabled: bool,
    /// Free text.
    pub description: String,
    /// Dates it does not fire on (`calendar = "<name>"`).
    pub calendar: Option<Arc<Calendar>>,
    /// Each scheduled fire waits [`jitter_delay`] of this after its tick (zero: none).
    pub jitter: Duration,
    /// The circuit breaker: pause the schedule after this many failed runs in a row.
    pub max_consecutive_failures: Option<u32>,
    /// A scheduled run must succeed within this long of its tick, or `deadline_missed`.
    pub deadline: Option<Duration>,
}

impl TaskSpec {
    /// Attempts in all: `retries + 1`.
    pub fn max_attempts(&self) -> u32 {
        self.retries.saturating_add(1)
    }

    /// How long after its nominal `tick` this task's scheduled fire waits: its `jitter`
    /// drawn by [`jitter_delay`], the same in every process.
    pub fn jitter_for(&self, tick: crate::model::Instant) -> Duration {
        jitter_delay(self.name.as_str(), tick, self.jitter)
    }

    /// When the fire of nominal `tick` is due: the tick plus [`TaskSpec::jitter_for`]. The
    /// run's claim key (`scheduled_for`) stays the tick.
    pub fn due_at(&self, tick: crate::model::Instant) -> crate::model::Instant {
        if self.jitter.is_zero() {
            return tick;
        }
        let delay = chrono::TimeDelta::from_std(self.jitter_for(tick)).unwrap_or_default();
        tick.checked_add_signed(delay).unwrap_or(tick)
    }

    /// The next `count` ticks after `after` that fire, each preceded by the ticks between
    /// that its calendar skips (at most [`MAX_SKIPPED_SHOWN`] of those in all): what
    /// `turbosched next` prints. Empty without a schedule.
    pub fn upcoming(&self, after: crate::model::Instant, count: usize) -> Vec<Upcoming> {
        let Some(schedule) = &self.schedule else {
            return Vec::new();
        };
        let mut out = Vec::new();
        let (mut firing, mut skipped) = (0, 0);
        for tick in schedule.ticks_after(after) {
            if firing >= count {
                break;
            }
            let skip = self
                .calendar
                .as_ref()
                .and_then(|calendar| calendar.skip_reason(tick, self.timezone));
            match skip {
                Some(_) if skipped >= MAX_SKIPPED_SHOWN => continue,
                Some(_) => skipped += 1,
                None => firing += 1,
            }
            out.push(Upcoming {
                tick: tick.with_timezone(&schedule.timezone()),
                due: self.due_at(tick).with_timezone(&schedule.timezone()),
                skipped: skip,
            });
        }
        out
    }
}

/// The delay of task `task`'s fire of nominal `tick` under `jitter = bound`: a value in
/// `[0, bound)`, to the microsecond, that depends only on the task's name and the tick —
/// every instance of a cluster, every restart and every build computes the same, so
/// instances agree on when a tick is due while the fires of many tasks on one tick are
/// spread out. The hash is FNV-1a (64-bit) over the name, a separator byte and the tick's
/// microseconds (little-endian), finished by SplitMix64's mixer so that neighbouring ticks
/// land far apart; written here (a few lines, no crate) because its output is a promise:
/// std's `DefaultHasher` is seeded randomly per process and a crate's algorithm may change
/// between versions. `jitter_delay_is_pinned` holds its values.
pub fn jitter_delay(task: &str, tick: crate::model::Instant, bound: Duration) -> Duration {
    let micros = u64::try_from(bound.as_micros()).unwrap_or(u64::MAX);
    if micros == 0 {
        return Duration::ZERO;
    }
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    let tick_bytes = tick.timestamp_micros().to_le_bytes();
    for byte in task.bytes().chain([0xff]).chain(tick_bytes) {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash = (hash ^ (hash >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash = (hash ^ (hash >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^= hash >> 31;
    Duration::from_micros(hash % micros)
}

/// At most this many calendar-skipped ticks are listed by [`TaskSpec::upcoming`] (a
/// calendar listing every date would otherwise never let it end).
pub const MAX_SKIPPED_SHOWN: usize = 1000;

/// One upcoming tick of a task.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Upcoming {
    /// The nominal tick, in the schedule's zone.
    pub tick: chrono::DateTime<Tz>,
    /// When it fires: the tick plus its jitter.
    pub due: chrono::DateTime<Tz>,
    /// Why it will not fire, when its calendar lists its date.
    pub skipped: Option<String>,
}

impl Config {
    /// The task called `name`, if configured.
    pub fn task(&self, name: &str) -> Option<&TaskSpec> {
        self.tasks.get(&TaskName(name.to_string()))
    }

    /// Every task that depends on `name`, directly or not, in dependency order.
    pub fn downstream_of(&self, name: &TaskName) -> Vec<TaskName> {
        let mut reached: BTreeSet<&TaskName> = BTreeSet::new();
        reached.insert(name);
        let mut out = Vec::new();
        for task in &self.topo_order {
            if task == name {
                continue;
            }
            let spec = &self.tasks[task];
            if spec.depends_on.iter().any(|up| reached.contains(up)) {
                reached.insert(task);
                out.push(task.clone());
            }
        }
        out
    }

    /// Names of all tasks, for "known tasks are …" messages.
    pub fn task_names(&self) -> Vec<&str> {
        self.tasks.keys().map(|name| name.as_str()).collect()
    }
}

/// Where the store and the logs are, and how to reach the service: all that the commands
/// which only read the store or talk to the running service need. Read from a valid
/// [`Config`] ([`Config::locations`]), or leniently from a file with errors
/// ([`read_locations`]), so that an operator in the middle of an edit can still read a
/// log or abort a run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Locations {
    /// `[scheduler] database`.
    pub database: PathBuf,
    /// `[scheduler] log_dir`.
    pub log_dir: PathBuf,
    /// `[logging] archive_dir`.
    pub archive_dir: PathBuf,
    /// `[scheduler] heartbeat_interval`.
    pub heartbeat_interval: Duration,
    /// `[scheduler] heartbeat_timeout`.
    pub heartbeat_timeout: Duration,
    /// `[api] token_env`.
    pub token_env: String,
    /// `[scheduler] timezone`: the zone times are shown to people in.
    pub timezone: Tz,
}

impl Config {
    /// Where this config puts the store and the logs.
    pub fn locations(&self) -> Locations {
        Locations {
            database: self.scheduler.database.clone(),
            log_dir: self.scheduler.log_dir.clone(),
            archive_dir: self.logging.archive_dir.clone(),
            heartbeat_interval: self.scheduler.heartbeat_interval,
            heartbeat_timeout: self.scheduler.heartbeat_timeout,
            token_env: self.api.token_env.clone(),
            timezone: self.scheduler.timezone,
        }
    }
}

/// The [`Locations`] of a file that may have errors: each value the file gives, if it
/// parses on its own, else its default (the defaults of [`load`]). A file that is not
/// TOML at all gives every default. Only a file that cannot be read is an error.
pub fn read_locations(path: &Path) -> std::io::Result<Locations> {
    let bytes = std::fs::read(path)?;
    let document: toml::Table = std::str::from_utf8(&bytes)
        .ok()
        .and_then(|text| toml::from_str(text).ok())
        .unwrap_or_default();
    let value = |section: &str, key: &str| -> Option<String> {
        document
            .get(section)?
            .as_table()?
            .get(key)?
            .as_str()
            .map(str::to_string)
    };
    let duration = |key: &str, default: u64| {
        value("scheduler", key)
            .and_then(|text| humantime::parse_duration(text.trim()).ok())
            .filter(|duration| !duration.is_zero())
            .unwrap_or(Duration::from_secs(default))
    };
    Ok(Locations {
        database: PathBuf::from(
            value("scheduler", "database").unwrap_or_else(|| "data/scheduler.db".into()),
        ),
        log_dir: PathBuf::from(value("scheduler", "log_dir").unwrap_or_else(|| "logs".into())),
        archive_dir: PathBuf::from(
            value("logging", "archive_dir").unwrap_or_else(|| "archive".into()),
        ),
        heartbeat_interval: duration("heartbeat_interval", 5),
        heartbeat_timeout: duration("heartbeat_timeout", 30),
        token_env: value("api", "token_env").unwrap_or_else(|| "TURBOSCHED_TOKEN".into()),
        timezone: value("scheduler", "timezone")
            .and_then(|name| name.trim().parse::<Tz>().ok())
            .unwrap_or(Tz::UTC),
    })
}

/// Reads and validates `path`.
pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
    let bytes = std::fs::read(path).map_err(|err| {
        ConfigErrors(vec![ConfigError {
            file: path.to_path_buf(),
            line: 0,
            column: 0,
            key: String::new(),
            message: format!("cannot read config file: {err}"),
        }])
    })?;
    match std::str::from_utf8(&bytes) {
        Ok(text) => parse(text, path),
        Err(err) => Err(raw::invalid_utf8(&bytes, err.valid_up_to(), path)),
    }
}

/// Validates `text` as if read from `path` (which only names the file in errors).
pub fn parse(text: &str, path: &Path) -> Result<Config, ConfigErrors> {
    let mut config = raw::resolve(text, path)?;
    // The calendars' dates count too: a calendar file edited on one instance of a
    // cluster and not another is a config disagreement.
    let mut hasher = Sha256::new();
    hasher.update(text.as_bytes());
    for calendar in config.calendars.values() {
        hasher.update(format!("\n[calendar {}]", calendar.name));
        for date in &calendar.dates {
            hasher.update(format!(" {date}"));
        }
    }
    config.hash = hex(&hasher.finalize());
    Ok(config)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Suggests the closest of `known` to `found`, for "did you mean" hints.
///
/// Close means a few edits away (two, or a third of the known word), or the start or the
/// end of the known word: `backups` is close to `task_backups` though five letters short.
pub(crate) fn closest<'a>(
    found: &str,
    known: impl IntoIterator<Item = &'a str>,
) -> Option<&'a str> {
    // Shorter pieces than this are the start or end of too many words to mean one.
    const MIN_AFFIX: usize = 4;
    let is_affix = |candidate: &str| {
        found.len() >= MIN_AFFIX && (candidate.starts_with(found) || candidate.ends_with(found))
    };
    known
        .into_iter()
        .map(|candidate| (strsim::damerau_levenshtein(found, candidate), candidate))
        .filter(|(distance, candidate)| {
            *distance <= 2.max(candidate.len() / 3) || is_affix(candidate)
        })
        .min()
        .map(|(_, candidate)| candidate)
}

#[cfg(test)]
mod tests;
