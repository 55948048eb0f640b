//! Every key the config file accepts, once: its table, its kind of value, its default and
//! its bounds. Validation reads its choices and bounds from here (`MISFIRE_CHOICES`,
//! `OVERLAP_CHOICES`, `BACKUPS`, `FACTOR`, [`DURATION_BOUNDS`]), a test holds the
//! tables equal to the fields `raw.rs` deserializes, the JSON Schema of `turbosched
//! config-schema` (`super::schema`) is built from them, and the docs tests check each
//! key has its row in README_SCHEDULE.md.

use std::time::Duration;

/// One key of a config table.
#[derive(Debug, Clone, Copy)]
pub struct Key {
    /// The key as written (`max_workers`).
    pub name: &'static str,
    /// What its value is.
    pub kind: Kind,
    /// Its default as a TOML value (`"5s"`, `4`), when the default is a plain value.
    pub default: Option<&'static str>,
    /// One line for editors (the reference, README_SCHEDULE.md, says the rest).
    pub doc: &'static str,
}

/// What a key's value is, as far as it can be told alone.
#[derive(Debug, Clone, Copy)]
pub enum Kind {
    /// Free text (a path, a URL, an address, a description).
    Text,
    /// An IANA time zone name.
    Zone,
    /// A duration such as `"90m"`, bounded by its row in [`DURATION_BOUNDS`].
    Duration,
    /// A whole number in `min..=max`.
    Whole {
        /// The smallest value accepted.
        min: i64,
        /// The largest value accepted.
        max: i64,
    },
    /// A number in `min..=max`.
    Number {
        /// The smallest value accepted.
        min: f64,
        /// The largest value accepted.
        max: f64,
    },
    /// `true` or `false`.
    Flag,
    /// A size: `"10MB"`, `"512KiB"`, or bytes; at least `MIN_SIZE` bytes.
    Size,
    /// A cron expression.
    Cron,
    /// One of a fixed list of words.
    Choice(&'static [&'static str]),
    /// A handler name (`super::handler_names`).
    Handler,
    /// A table of handler params (`super::handler_params` tells which, per handler).
    Params,
    /// A program and its arguments, or one command line.
    Command,
    /// A table of environment variables (strings).
    Env,
    /// A table of the keys in [`BACKOFF_KEYS`].
    Backoff,
    /// A list of task names.
    TaskNames,
    /// A list of dates, `"YYYY-MM-DD"`.
    Dates,
    /// The name of a `[calendars.<name>]` table.
    Calendar,
    /// A list of event kinds an alert may want ([`ALERT_EVENTS`]).
    Events,
}

/// `[[alerts]] events`: the event kinds an alert may be sent for. `deadline_missed` and
/// `circuit_opened` are accepted before a build raises them.
pub const ALERT_EVENTS: &[&str] = &[
    "run_failed",
    "run_timed_out",
    "run_orphaned",
    "deadline_missed",
    "circuit_opened",
    "drift_detected",
    "config_reload_failed",
];
/// `[pools.<name>] slots`.
pub(super) const POOL_SLOTS: (i64, i64) = (1, u32::MAX as i64);
/// `[[alerts]] max_attempts`.
pub(super) const ALERT_ATTEMPTS: (i64, i64) = (1, 100);

/// `misfire`: what to do with missed ticks.
pub(super) const MISFIRE_CHOICES: &[&str] = &["run_once", "skip", "run_all"];
/// `overlap`: a new run while one of the task is active.
pub(super) const OVERLAP_CHOICES: &[&str] = &["skip", "queue", "replace"];
/// `[logging] task_backups` and `scheduler_backups`: rotated files kept.
pub(super) const BACKUPS: (i64, i64) = (1, 10_000);
/// `retry_backoff.factor`.
pub(super) const FACTOR: (f64, f64) = (1.0, 100.0);
/// `[logging] max_size`: the smallest size accepted, in bytes.
pub(super) const MIN_SIZE: u64 = 1024;
/// What a task name may hold: letters, digits, `_` and `-` (they name log files and routes).
pub(super) const TASK_NAME_PATTERN: &str = "^[A-Za-z0-9_-]+$";

const fn key(
    name: &'static str,
    kind: Kind,
    default: Option<&'static str>,
    doc: &'static str,
) -> Key {
    Key {
        name,
        kind,
        default,
        doc,
    }
}

/// Every key `[scheduler]` accepts.
pub const SCHEDULER_KEYS: &[Key] = &[
    key(
        "timezone",
        Kind::Zone,
        Some("\"UTC\""),
        "IANA zone for every schedule without its own timezone",
    ),
    key(
        "database",
        Kind::Text,
        Some("\"data/scheduler.db\""),
        "SQLite file of the run history, or a postgres:// URL",
    ),
    key(
        "max_workers",
        Kind::Whole {
            min: 1,
            max: u32::MAX as i64,
        },
        Some("4"),
        "attempts running at once over all tasks",
    ),
    key(
        "heartbeat_interval",
        Kind::Duration,
        Some("\"5s\""),
        "how often the service records it is alive and reads abort requests",
    ),
    key(
        "heartbeat_timeout",
        Kind::Duration,
        Some("\"30s\""),
        "a running run whose owner is silent this long is orphaned; longer than heartbeat_interval",
    ),
    key(
        "kill_grace",
        Kind::Duration,
        Some("\"10s\""),
        "time between SIGTERM and SIGKILL when an attempt is stopped",
    ),
    key(
        "shutdown_grace",
        Kind::Duration,
        Some("\"30s\""),
        "on SIGTERM/SIGINT, how long running attempts may finish",
    ),
    key(
        "log_dir",
        Kind::Text,
        Some("\"logs\""),
        "where task_<name>.log files go",
    ),
    key(
        "state_dir",
        Kind::Text,
        Some("\"data/state\""),
        "where checkpoints go",
    ),
    key(
        "poll_only",
        Kind::Flag,
        Some("false"),
        "PostgreSQL only: no LISTEN, find other instances' work by polling alone",
    ),
];

/// Every key `[api]` accepts.
pub const API_KEYS: &[Key] = &[
    key(
        "bind",
        Kind::Text,
        Some("\"127.0.0.1:5000\""),
        "address of the HTTP API: an IP address and a port",
    ),
    key(
        "token_env",
        Kind::Text,
        Some("\"TURBOSCHED_TOKEN\""),
        "env var holding the bearer token for mutating endpoints",
    ),
];

/// Every key `[logging]` accepts.
pub const LOGGING_KEYS: &[Key] = &[
    key(
        "max_size",
        Kind::Size,
        Some("\"10MB\""),
        "a log file is rotated once it has grown past this size",
    ),
    key(
        "task_backups",
        Kind::Whole {
            min: BACKUPS.0,
            max: BACKUPS.1,
        },
        Some("5"),
        "rotated files kept per task log",
    ),
    key(
        "scheduler_backups",
        Kind::Whole {
            min: BACKUPS.0,
            max: BACKUPS.1,
        },
        Some("10"),
        "rotated files kept of scheduler.log",
    ),
    key(
        "archive_dir",
        Kind::Text,
        Some("\"archive\""),
        "where log archives and database backups are written",
    ),
];

/// Every key a `[tasks.<name>]` or `[defaults]` table accepts.
pub const TASK_KEYS: &[Key] = &[
    key("schedule", Kind::Cron, None, "cron: 5 fields, 6 with seconds first, or @hourly @daily @weekly @monthly @yearly; none: runs only when triggered"),
    key("timezone", Kind::Zone, None, "IANA zone this task's schedule is read in (default: [scheduler] timezone)"),
    key("handler", Kind::Handler, None, "a built-in handler or \"command\" (the default when command is set)"),
    key("params", Kind::Params, None, "table passed to the handler as JSON; a built-in handler refuses a key it does not read"),
    key("timeout", Kind::Duration, Some("\"1h\""), "per attempt; then SIGTERM to the process group, kill_grace, SIGKILL"),
    key("retries", Kind::Whole { min: 0, max: u32::MAX as i64 }, Some("0"), "attempts after the first"),
    key("retry_backoff", Kind::Backoff, None, "delay before attempt n+1 = min(max, initial*factor^(n-1)), full jitter"),
    key("depends_on", Kind::TaskNames, None, "upstream tasks (a DAG; cycles are refused)"),
    key("dependency_max_age", Kind::Duration, None, "an upstream success must have finished within this long"),
    key("misfire", Kind::Choice(MISFIRE_CHOICES), Some("\"run_once\""), "what to do with missed ticks"),
    key("misfire_grace", Kind::Duration, Some("\"1h\""), "missed ticks older than this are dropped"),
    key("overlap", Kind::Choice(OVERLAP_CHOICES), Some("\"skip\""), "a new run while one of the task is active"),
    key("pool", Kind::Text, None, "a [pools.<name>] whose slots this task's runs take: at most slots of them run at once, the rest wait in order"),
    key("enabled", Kind::Flag, Some("true"), "false: never fires on schedule (manual runs still work)"),
    key("description", Kind::Text, Some("\"\""), "free text"),
    key("command", Kind::Command, None, "for handler = \"command\": [\"program\", \"arg\", ...], run without a shell"),
    key("shell", Kind::Flag, Some("false"), "true: command is one string run by /bin/sh -c"),
    key("cwd", Kind::Text, None, "working directory of the command (default: the service's)"),
    key("env", Kind::Env, None, "extra environment of the command"),
    key("jitter", Kind::Duration, Some("\"0s\""), "each scheduled fire is delayed by a pseudo-random amount in [0, jitter) fixed by (task, tick): every instance agrees; shorter than the schedule's shortest interval"),
    key("max_consecutive_failures", Kind::Whole { min: 1, max: u32::MAX as i64 }, None, "circuit breaker: after this many failed or timed-out runs in a row the schedule is paused (circuit_opened) until resume"),
    key("deadline", Kind::Duration, None, "a scheduled run not succeeded this long after its tick (not its start) raises deadline_missed once"),
    key("calendar", Kind::Calendar, None, "a [calendars.<name>] table: a tick on one of its dates (in the task's zone) is recorded as skipped, not fired"),
];

/// Every key a `[calendars.<name>]` table accepts (a calendar's `file` takes
/// [`CALENDAR_FILE_KEYS`]).
pub const CALENDAR_KEYS: &[Key] = &[
    key(
        "dates",
        Kind::Dates,
        None,
        "dates to skip, \"YYYY-MM-DD\", in each task's own zone",
    ),
    key(
        "file",
        Kind::Text,
        None,
        "a TOML file of more dates (its own dates and description), relative to the config file",
    ),
    key("description", Kind::Text, Some("\"\""), "free text"),
];

/// Every key a calendar `file` accepts.
pub const CALENDAR_FILE_KEYS: &[Key] = &[
    key("dates", Kind::Dates, None, "dates to skip, \"YYYY-MM-DD\""),
    key("description", Kind::Text, Some("\"\""), "free text"),
];

/// Every key an `[[alerts]]` table accepts.
pub const ALERT_KEYS: &[Key] = &[
    key("name", Kind::Text, None, "names the alert in the alert_deliveries table and /metrics (default: alert-<n>, its place in the file)"),
    key("url", Kind::Text, None, "http:// endpoint the JSON envelope is POSTed to (or url_env)"),
    key("url_env", Kind::Text, None, "the environment variable holding the endpoint (for secrets), instead of url"),
    key("events", Kind::Events, None, "the event kinds to send"),
    key("tasks", Kind::TaskNames, None, "only events of these tasks (default: every task, and events about none)"),
    key("max_attempts", Kind::Whole { min: ALERT_ATTEMPTS.0, max: ALERT_ATTEMPTS.1 }, Some("5"), "POSTs per event before it is given up (backoff 1s, 2s, 4s, … at most 5m)"),
];

/// Every key a `[pools.<name>]` table accepts.
pub const POOL_KEYS: &[Key] = &[key(
    "slots",
    Kind::Whole {
        min: POOL_SLOTS.0,
        max: POOL_SLOTS.1,
    },
    None,
    "at most this many runs of the pool's tasks run at once (per instance)",
)];

/// Every key `retry_backoff` accepts.
pub const BACKOFF_KEYS: &[Key] = &[
    key(
        "initial",
        Kind::Duration,
        Some("\"30s\""),
        "delay before the second attempt",
    ),
    key(
        "factor",
        Kind::Number {
            min: FACTOR.0,
            max: FACTOR.1,
        },
        Some("2.0"),
        "each delay is the previous one times this",
    ),
    key("max", Kind::Duration, Some("\"10m\""), "the longest delay"),
    key(
        "jitter",
        Kind::Flag,
        Some("true"),
        "each delay drawn uniformly from [0, delay]",
    ),
];

/// The longest value a duration key accepts, as the reference writes it.
#[derive(Debug, Clone, Copy)]
pub struct DurationBound {
    /// The key within its table (`kill_grace`, `retry_backoff.initial`).
    pub key: &'static str,
    /// The bound, inclusive.
    pub max: Duration,
    /// The bound as README_SCHEDULE.md writes it ("1h").
    pub text: &'static str,
}

const MINUTE: u64 = 60;
const HOUR: u64 = 60 * MINUTE;
const DAY: u64 = 24 * HOUR;

/// Every duration key and its upper bound. A value past the bound is a mistake (an
/// absurd `kill_grace` lets a run that ignores SIGTERM outlive its timeout for ever), and
/// the bounds keep every deadline far from `Instant` overflow.
pub const DURATION_BOUNDS: &[DurationBound] = &[
    bound("heartbeat_interval", 10 * MINUTE, "10m"),
    bound("heartbeat_timeout", HOUR, "1h"),
    bound("kill_grace", HOUR, "1h"),
    bound("shutdown_grace", HOUR, "1h"),
    bound("timeout", 7 * DAY, "7d"),
    bound("retry_backoff.initial", DAY, "1d"),
    bound("retry_backoff.max", DAY, "1d"),
    bound("dependency_max_age", 366 * DAY, "366d"),
    bound("misfire_grace", 366 * DAY, "366d"),
    bound("jitter", DAY, "1d"),
    bound("deadline", 7 * DAY, "7d"),
];

const fn bound(key: &'static str, secs: u64, text: &'static str) -> DurationBound {
    DurationBound {
        key,
        max: Duration::from_secs(secs),
        text,
    }
}

/// The bound of duration key `name` in table `table` (`retry_backoff` for its keys, else
/// empty), if it has one.
pub(super) fn duration_bound(table: &str, name: &str) -> Option<&'static DurationBound> {
    DURATION_BOUNDS
        .iter()
        .find(|b| match b.key.split_once('.') {
            Some((t, k)) => t == table && k == name,
            None => table.is_empty() && b.key == name,
        })
}
