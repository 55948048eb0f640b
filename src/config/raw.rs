//! Stage one: the TOML as written, with spans, and the checks a value can make alone.
//! [`resolve`] then performs stage two and builds the [`Config`].

use std::collections::{BTreeMap, BTreeSet, HashSet};
use std::net::SocketAddr;
use std::ops::Range;
use std::path::{Path, PathBuf};
use std::time::Duration;

use std::sync::Arc;

use chrono::{NaiveDate, Utc};
use chrono_tz::Tz;
use serde::de::DeserializeOwned;
use serde::Deserialize;
use toml::de::{DeTable, DeValue, ValueDeserializer};
use toml::Spanned;

use super::keys::{
    ALERT_ATTEMPTS, ALERT_EVENTS, BACKUPS, DURATION_BOUNDS, FACTOR, MIN_SIZE, MISFIRE_CHOICES,
    OVERLAP_CHOICES, POOL_SLOTS,
};
use super::{
    closest, handler_names, handler_params, AlertSpec, AlertTarget, ApiSettings, Backoff, Calendar,
    CommandSpec, Config, ConfigError, ConfigErrors, Handler, LoggingSettings, Overlap,
    SchedulerSettings, TaskSpec,
};
use crate::model::TaskName;
use crate::schedule::{MisfirePolicy, Schedule};

const SECTIONS: &[&str] = &[
    "scheduler",
    "api",
    "logging",
    "defaults",
    "calendars",
    "tasks",
    "alerts",
    "pools",
];

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScheduler {
    timezone: Option<Spanned<String>>,
    database: Option<String>,
    max_workers: Option<Spanned<i64>>,
    heartbeat_interval: Option<Spanned<String>>,
    heartbeat_timeout: Option<Spanned<String>>,
    kill_grace: Option<Spanned<String>>,
    shutdown_grace: Option<Spanned<String>>,
    log_dir: Option<String>,
    state_dir: Option<String>,
    poll_only: Option<bool>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawLogging {
    max_size: Option<Spanned<RawSize>>,
    task_backups: Option<Spanned<i64>>,
    scheduler_backups: Option<Spanned<i64>>,
    archive_dir: Option<String>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawSize {
    Bytes(u64),
    Text(String),
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawApi {
    bind: Option<Spanned<String>>,
    token_env: Option<String>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawTask {
    schedule: Option<Spanned<String>>,
    timezone: Option<Spanned<String>>,
    handler: Option<Spanned<String>>,
    params: Option<Spanned<toml::Table>>,
    timeout: Option<Spanned<String>>,
    retries: Option<Spanned<u32>>,
    retry_backoff: Option<RawBackoff>,
    depends_on: Option<Vec<Spanned<String>>>,
    dependency_max_age: Option<Spanned<String>>,
    misfire: Option<Spanned<String>>,
    misfire_grace: Option<Spanned<String>>,
    overlap: Option<Spanned<String>>,
    pool: Option<Spanned<String>>,
    enabled: Option<bool>,
    description: Option<String>,
    command: Option<Spanned<RawCommand>>,
    shell: Option<bool>,
    cwd: Option<String>,
    env: Option<BTreeMap<String, String>>,
    calendar: Option<Spanned<String>>,
    jitter: Option<Spanned<String>>,
    max_consecutive_failures: Option<Spanned<u32>>,
    deadline: Option<Spanned<String>>,
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCalendar {
    dates: Option<Vec<Spanned<String>>>,
    file: Option<Spanned<String>>,
    description: Option<String>,
}

/// A calendar's `file`: its own dates and description, nothing else.
#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawCalendarFile {
    dates: Option<Vec<Spanned<String>>>,
    description: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawPool {
    slots: Option<Spanned<i64>>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAlert {
    name: Option<Spanned<String>>,
    url: Option<Spanned<String>>,
    url_env: Option<Spanned<String>>,
    events: Option<Spanned<Vec<Spanned<String>>>>,
    tasks: Option<Vec<Spanned<String>>>,
    max_attempts: Option<Spanned<i64>>,
}

#[derive(Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawBackoff {
    initial: Option<Spanned<String>>,
    factor: Option<Spanned<f64>>,
    max: Option<Spanned<String>>,
    jitter: Option<bool>,
}

#[derive(Deserialize, Clone)]
#[serde(untagged)]
enum RawCommand {
    Argv(Vec<String>),
    Line(String),
}

/// Collects errors with their place, converting byte spans to line and column.
struct Report<'a> {
    text: &'a str,
    file: &'a Path,
    errors: Vec<ConfigError>,
    /// Every key of the document, to name the key an error's span falls in.
    entries: Vec<Entry>,
}

/// One key of the document: its full dotted path and where it and its value are.
#[derive(Debug)]
struct Entry {
    path: String,
    /// The key's own last part (`max_workers`).
    name: String,
    /// Tables above it (0 for a top-level key).
    depth: usize,
    key: Range<usize>,
    value: Range<usize>,
}

/// Every key in `table` and below, tables of arrays included.
fn entries(table: &DeTable<'_>, prefix: &str, depth: usize, out: &mut Vec<Entry>) {
    for (key, value) in table {
        let name = key.get_ref().to_string();
        let path = if prefix.is_empty() {
            name.clone()
        } else {
            format!("{prefix}.{name}")
        };
        out.push(Entry {
            path: path.clone(),
            name,
            depth,
            key: key.span(),
            value: value.span(),
        });
        match value.get_ref() {
            DeValue::Table(inner) => entries(inner, &path, depth + 1, out),
            DeValue::Array(items) => {
                for item in items {
                    if let DeValue::Table(inner) = item.get_ref() {
                        entries(inner, &path, depth + 1, out);
                    }
                }
            }
            _ => {}
        }
    }
}

/// The most specific key at `at`: the key whose own span it is, or whose value holds it.
fn locate<'e>(entries: &'e [Entry], at: &Range<usize>) -> Option<&'e Entry> {
    entries
        .iter()
        .filter(|e| e.key == *at || (e.value.start <= at.start && at.end <= e.value.end))
        .max_by_key(|e| e.depth)
}

impl Report<'_> {
    fn error(&mut self, span: Range<usize>, key: &str, message: impl Into<String>) {
        let (line, column) = line_column(self.text, span.start);
        let err = ConfigError {
            file: self.file.to_path_buf(),
            line,
            column,
            key: key.to_string(),
            message: message.into(),
        };
        if !self.errors.contains(&err) {
            self.errors.push(err);
        }
    }

    /// A section of named tables (`[tasks.<name>]`, `[calendars.<name>]`, `[pools.<name>]`):
    /// each name, the span of its key, and its table decoded (`None` when it did not
    /// decode: the name stays known). Anything but a table of tables is reported.
    fn named_tables<T: DeserializeOwned>(
        &mut self,
        value: Spanned<DeValue<'_>>,
        section: &str,
        example: &str,
    ) -> Vec<(String, Range<usize>, Option<T>)> {
        let span = value.span();
        let DeValue::Table(table) = value.into_inner() else {
            self.error(
                span,
                section,
                format!("expected a table of {section} such as {example}"),
            );
            return Vec::new();
        };
        table
            .into_iter()
            .map(|(key, value)| {
                let name = key.get_ref().to_string();
                let decoded = self.decode::<T>(value, &format!("{section}.{name}"));
                (name, key.span(), decoded)
            })
            .collect()
    }

    /// Deserializes one value, reporting a failure at its span under the full dotted key
    /// it falls in (`key` itself, or a key below it).
    ///
    /// Serde stops at the first unknown key: each one found is reported, taken out of the
    /// table and the table decoded again, so every unknown key of a table is reported in
    /// one pass (and the rest of it still checked).
    fn decode<T: DeserializeOwned>(
        &mut self,
        mut value: Spanned<DeValue<'_>>,
        key: &str,
    ) -> Option<T> {
        loop {
            let span = value.span();
            let err = match T::deserialize(ValueDeserializer::from(value.clone())) {
                Ok(decoded) => return Some(decoded),
                Err(err) => err,
            };
            let at = err.span().unwrap_or(span);
            let message = err.message().trim().to_string();
            let below = format!("{key}.");
            let inner = locate(&self.entries, &at)
                .filter(|e| e.path.starts_with(&below))
                .map(|e| e.path.clone());
            let Some((field, expected)) = unknown_field(&message) else {
                let path = inner.unwrap_or_else(|| key.to_string());
                self.error(at, &path, explain(&message));
                return None;
            };
            let hint = closest(&field, expected.iter().map(String::as_str))
                .map(|near| format!(" (did you mean \"{near}\"?)"))
                .unwrap_or_default();
            let direct = inner.is_none() || inner.as_deref() == Some(&format!("{key}.{field}"));
            let path = inner.unwrap_or_else(|| format!("{key}.{field}"));
            self.error(at, &path, format!("unknown key{hint}"));
            let removed = match value.get_mut() {
                DeValue::Table(table) if direct => table.remove(field.as_str()).is_some(),
                _ => false,
            };
            if !removed {
                return None;
            }
        }
    }

    /// Parses the duration at `key`, whose last part (after `tasks.<name>.`,
    /// `defaults.` or `scheduler.`) names its bound in [`DURATION_BOUNDS`]. A value past
    /// the bound is reported and the bound returned, so no check downstream trips on it.
    fn duration(
        &mut self,
        value: Option<&Spanned<String>>,
        key: &str,
        default: Duration,
    ) -> Duration {
        let Some(value) = value else { return default };
        let bound = DURATION_BOUNDS
            .iter()
            .find(|b| key.ends_with(&format!(".{}", b.key)));
        match humantime::parse_duration(value.get_ref().trim()) {
            Ok(duration) => match bound {
                Some(bound) if duration > bound.max => {
                    self.error(
                        value.span(),
                        key,
                        format!(
                            "expected a duration of at most {}, found {:?}",
                            bound.text,
                            value.get_ref()
                        ),
                    );
                    bound.max
                }
                _ => duration,
            },
            Err(_) => {
                self.error(
                    value.span(),
                    key,
                    format!(
                        "expected a duration such as \"90m\", found {:?}",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }

    fn timezone(&mut self, value: Option<&Spanned<String>>, key: &str, default: Tz) -> Tz {
        let Some(value) = value else { return default };
        match value.get_ref().parse::<Tz>() {
            Ok(tz) => tz,
            Err(_) => {
                self.error(
                    value.span(),
                    key,
                    format!(
                        "expected an IANA time zone such as \"America/New_York\", found {:?}",
                        value.get_ref()
                    ),
                );
                default
            }
        }
    }
}

/// Stage one and two: parse, check each value, then check across keys.
pub(super) fn resolve(text: &str, file: &Path) -> Result<Config, ConfigErrors> {
    let mut report = Report {
        text,
        file,
        errors: Vec::new(),
        entries: Vec::new(),
    };
    let document = match DeTable::parse(text) {
        Ok(document) => document,
        Err(err) => {
            syntax_error(&mut report, &err);
            return Err(ConfigErrors(report.errors));
        }
    };
    entries(document.get_ref(), "", 0, &mut report.entries);

    if document.get_ref().is_empty() {
        report.error(
            0..0,
            "",
            "the file is empty: it defines no tasks (add a [tasks.<name>] table)",
        );
        return Err(ConfigErrors(report.errors));
    }

    let mut scheduler: Option<RawScheduler> = None;
    let mut api: Option<RawApi> = None;
    let mut logging: Option<RawLogging> = None;
    let mut defaults = RawTask::default();
    let mut raw_calendars: Vec<(String, Range<usize>, RawCalendar)> = Vec::new();
    let mut raw_alerts: Vec<(Range<usize>, RawAlert)> = Vec::new();
    let mut raw_pools: Vec<(String, Range<usize>, Option<RawPool>)> = Vec::new();
    // (name, span of its key, the task if it decoded): a task that failed to decode keeps
    // its name known, so dependencies on it are not reported as well.
    let mut tasks: Vec<(Spanned<String>, Range<usize>, Option<RawTask>)> = Vec::new();
    for (key, value) in document.into_inner() {
        let name = key.get_ref().to_string();
        match name.as_str() {
            "scheduler" => scheduler = report.decode(value, "scheduler"),
            "api" => api = report.decode(value, "api"),
            "logging" => logging = report.decode(value, "logging"),
            "defaults" => defaults = report.decode(value, "defaults").unwrap_or_default(),
            "calendars" => {
                for (name, span, calendar) in
                    report.named_tables::<RawCalendar>(value, "calendars", "[calendars.nyse]")
                {
                    if let Some(calendar) = calendar {
                        raw_calendars.push((name, span, calendar));
                    }
                }
            }
            "pools" => {
                raw_pools = report.named_tables::<RawPool>(value, "pools", "[pools.gpu]");
            }
            "alerts" => {
                let span = value.span();
                let DeValue::Array(items) = value.into_inner() else {
                    report.error(
                        span,
                        "alerts",
                        "expected an array of tables such as [[alerts]]",
                    );
                    continue;
                };
                for item in items {
                    let span = item.span();
                    if let Some(alert) = report.decode::<RawAlert>(item, "alerts") {
                        raw_alerts.push((span, alert));
                    }
                }
            }
            "tasks" => {
                for (name, span, task) in
                    report.named_tables::<RawTask>(value, "tasks", "[tasks.ingestion]")
                {
                    tasks.push((Spanned::new(span.clone(), name), span, task));
                }
            }
            other => {
                let hint = closest(other, SECTIONS.iter().copied())
                    .map(|near| format!(" (did you mean [{near}]?)"))
                    .unwrap_or_else(|| format!(" (known sections: {})", SECTIONS.join(", ")));
                report.error(key.span(), other, format!("unknown section{hint}"));
            }
        }
    }

    let scheduler = resolve_scheduler(&mut report, scheduler);
    if let Some(bind) = api.as_ref().and_then(|a| a.bind.as_ref()) {
        check_bind(&mut report, bind);
    }
    let api = ApiSettings {
        bind: api
            .as_ref()
            .and_then(|a| a.bind.as_ref().map(|b| b.get_ref().clone()))
            .unwrap_or_else(|| "127.0.0.1:5000".into()),
        token_env: api
            .and_then(|a| a.token_env)
            .unwrap_or_else(|| "TURBOSCHED_TOKEN".into()),
    };

    let logging = resolve_logging(&mut report, logging.unwrap_or_default());
    let calendars = resolve_calendars(&mut report, raw_calendars);
    let pools = resolve_pools(&mut report, raw_pools);
    let known: BTreeSet<String> = tasks
        .iter()
        .map(|(name, _, _)| name.get_ref().clone())
        .collect();
    let mut specs = BTreeMap::new();
    let mut dependency_spans: BTreeMap<String, Range<usize>> = BTreeMap::new();
    for (name, span, task) in &tasks {
        let Some(task) = task else { continue };
        if let Some(spec) = resolve_task(
            &mut report,
            name,
            span.clone(),
            task,
            &defaults,
            &scheduler,
            &Names {
                tasks: &known,
                calendars: &calendars,
                pools: &pools,
            },
        ) {
            let first_dep = task
                .depends_on
                .as_ref()
                .and_then(|deps| deps.first().map(|d| d.span()))
                .unwrap_or(span.clone());
            dependency_spans.insert(name.get_ref().clone(), first_dep);
            specs.insert(spec.name.clone(), spec);
        }
    }

    let alerts = resolve_alerts(&mut report, &raw_alerts, &known);

    let topo_order = match order_tasks(&specs) {
        Ok(order) => order,
        Err(cycle) => {
            let first = cycle[0].clone();
            let span = dependency_spans.get(&first).cloned().unwrap_or(0..0);
            report.error(
                span,
                &format!("tasks.{first}.depends_on"),
                format!(
                    "dependency cycle: {} (each task depends on the next)",
                    cycle.join(" -> ")
                ),
            );
            Vec::new()
        }
    };

    if !report.errors.is_empty() {
        // The config file's own errors first, then those of calendar files.
        report
            .errors
            .sort_by_key(|e| (e.file != file, e.file.clone(), e.line, e.column));
        return Err(ConfigErrors(report.errors));
    }
    Ok(Config {
        source: file.to_path_buf(),
        hash: String::new(),
        scheduler,
        api,
        logging,
        calendars,
        any_jitter: specs.values().any(|spec: &TaskSpec| !spec.jitter.is_zero()),
        tasks: specs,
        topo_order,
        alerts,
        pools,
    })
}

/// Parses each `"YYYY-MM-DD"` of `dates` into `into`, reporting the others at their place.
fn parse_dates(
    report: &mut Report<'_>,
    dates: &[Spanned<String>],
    key: &str,
    into: &mut BTreeSet<NaiveDate>,
) {
    for date in dates {
        match NaiveDate::parse_from_str(date.get_ref().trim(), "%Y-%m-%d") {
            Ok(parsed) => {
                into.insert(parsed);
            }
            Err(_) => report.error(
                date.span(),
                key,
                format!(
                    "expected a date such as \"2025-12-25\", found {:?}",
                    date.get_ref()
                ),
            ),
        }
    }
}

/// Each pool's slots: a whole number within `POOL_SLOTS`, required.
fn resolve_pools(
    report: &mut Report<'_>,
    raw: Vec<(String, Range<usize>, Option<RawPool>)>,
) -> BTreeMap<String, usize> {
    let mut pools = BTreeMap::new();
    for (name, span, pool) in raw {
        let Some(pool) = pool else { continue };
        let key = format!("pools.{name}.slots");
        let slots = match pool.slots {
            Some(n) if (POOL_SLOTS.0..=POOL_SLOTS.1).contains(n.get_ref()) => *n.get_ref() as usize,
            Some(n) => {
                report.error(
                    n.span(),
                    &key,
                    format!(
                        "expected a whole number from {} to {}, found {}",
                        POOL_SLOTS.0,
                        POOL_SLOTS.1,
                        n.get_ref()
                    ),
                );
                1
            }
            None => {
                report.error(
                    span,
                    &key,
                    "slots is required: how many runs of the pool's tasks may run at once",
                );
                1
            }
        };
        pools.insert(name, slots);
    }
    pools
}

/// Builds each calendar: its inline dates and those of its file (read relative to the
/// config file's folder; its errors name that file, line and column).
fn resolve_calendars(
    report: &mut Report<'_>,
    raw: Vec<(String, Range<usize>, RawCalendar)>,
) -> BTreeMap<String, Arc<Calendar>> {
    let mut calendars = BTreeMap::new();
    for (name, span, calendar) in raw {
        let path = format!("calendars.{name}");
        if name.is_empty()
            || !name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        {
            report.error(
                span.clone(),
                &path,
                "calendar names may hold only letters, digits, '_' and '-'",
            );
        }
        if calendar.dates.is_none() && calendar.file.is_none() {
            report.error(
                span.clone(),
                &path,
                "a calendar needs dates = [\"YYYY-MM-DD\", …] or file = \"<path>\"",
            );
        }
        let mut dates = BTreeSet::new();
        parse_dates(
            report,
            calendar.dates.as_deref().unwrap_or_default(),
            &format!("{path}.dates"),
            &mut dates,
        );
        let mut description = calendar.description.clone();
        if let Some(file) = &calendar.file {
            let folder = report.file.parent().unwrap_or(Path::new(""));
            let location = folder.join(file.get_ref());
            match std::fs::read_to_string(&location) {
                Err(err) => report.error(
                    file.span(),
                    &format!("{path}.file"),
                    format!("cannot read calendar file {}: {err}", location.display()),
                ),
                Ok(text) => {
                    let from_file = calendar_file(&text, &location, &mut dates);
                    match from_file {
                        Ok(file_description) => {
                            description = description.or(file_description);
                        }
                        Err(errors) => report.errors.extend(errors),
                    }
                }
            }
        }
        calendars.insert(
            name.clone(),
            Arc::new(Calendar {
                name,
                description: description.unwrap_or_default(),
                dates,
            }),
        );
    }
    calendars
}

/// The dates of a calendar file into `dates`, and its description; or its errors, each
/// with the calendar file's own line and column.
fn calendar_file(
    text: &str,
    file: &Path,
    dates: &mut BTreeSet<NaiveDate>,
) -> Result<Option<String>, Vec<ConfigError>> {
    let mut report = Report {
        text,
        file,
        errors: Vec::new(),
        entries: Vec::new(),
    };
    let document = match DeTable::parse(text) {
        Ok(document) => document,
        Err(err) => {
            syntax_error(&mut report, &err);
            return Err(report.errors);
        }
    };
    entries(document.get_ref(), "", 0, &mut report.entries);
    let value = Spanned::new(0..text.len(), DeValue::Table(document.into_inner()));
    let decoded = report.decode::<RawCalendarFile>(value, "");
    // The file's keys are top-level: no table prefix before them.
    for err in &mut report.errors {
        if let Some(key) = err.key.strip_prefix('.') {
            err.key = key.to_string();
        }
    }
    let Some(raw) = decoded else {
        return Err(report.errors);
    };
    parse_dates(
        &mut report,
        raw.dates.as_deref().unwrap_or_default(),
        "dates",
        dates,
    );
    if report.errors.is_empty() {
        Ok(raw.description)
    } else {
        Err(report.errors)
    }
}

/// `[[alerts]]`: one endpoint each (`url` or `url_env`), the events it wants, the tasks
/// it is about; names unique.
fn resolve_alerts(
    report: &mut Report<'_>,
    raw: &[(Range<usize>, RawAlert)],
    known: &BTreeSet<String>,
) -> Vec<AlertSpec> {
    let mut alerts = Vec::new();
    let mut names: BTreeSet<String> = BTreeSet::new();
    for (index, (span, alert)) in raw.iter().enumerate() {
        let name = match &alert.name {
            Some(name) => {
                let text = name.get_ref().trim().to_string();
                if text.is_empty()
                    || !text
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
                {
                    report.error(
                        name.span(),
                        "alerts.name",
                        format!(
                            "expected letters, digits, _ and - only, found {:?}",
                            name.get_ref()
                        ),
                    );
                }
                if !names.insert(text.clone()) {
                    report.error(
                        name.span(),
                        "alerts.name",
                        format!("another alert is named {text:?}"),
                    );
                }
                text
            }
            None => {
                let text = format!("alert-{}", index + 1);
                names.insert(text.clone());
                text
            }
        };
        let target = match (&alert.url, &alert.url_env) {
            (Some(url), None) => {
                let text = url.get_ref().trim();
                if text.starts_with("https://") {
                    report.error(
                        url.span(),
                        "alerts.url",
                        "https is not supported by this build (no TLS): point it at an http:// relay on this host",
                    );
                } else if !text.starts_with("http://") || text.len() <= "http://".len() {
                    report.error(
                        url.span(),
                        "alerts.url",
                        format!("expected an http:// URL, found {:?}", url.get_ref()),
                    );
                }
                AlertTarget::Url(text.to_string())
            }
            (None, Some(env)) => {
                if env.get_ref().trim().is_empty() {
                    report.error(
                        env.span(),
                        "alerts.url_env",
                        "expected the name of an environment variable",
                    );
                }
                AlertTarget::Env(env.get_ref().trim().to_string())
            }
            (Some(url), Some(_)) => {
                report.error(url.span(), "alerts.url", "set url or url_env, not both");
                continue;
            }
            (None, None) => {
                report.error(
                    span.clone(),
                    "alerts",
                    format!("alert {name:?}: set url or url_env"),
                );
                continue;
            }
        };
        let mut events = Vec::new();
        match &alert.events {
            None => report.error(
                span.clone(),
                "alerts.events",
                format!(
                    "alert {name:?}: events is required, some of {}",
                    one_of(ALERT_EVENTS)
                ),
            ),
            Some(list) if list.get_ref().is_empty() => report.error(
                list.span(),
                "alerts.events",
                format!("expected at least one of {}", one_of(ALERT_EVENTS)),
            ),
            Some(list) => {
                for event in list.get_ref() {
                    let text = event.get_ref();
                    if ALERT_EVENTS.contains(&text.as_str()) {
                        if !events.contains(text) {
                            events.push(text.clone());
                        }
                    } else {
                        let hint = closest(text, ALERT_EVENTS.iter().copied())
                            .map(|near| format!(" (did you mean \"{near}\"?)"))
                            .unwrap_or_default();
                        report.error(
                            event.span(),
                            "alerts.events",
                            format!(
                                "unknown event {text:?}{hint}; expected {}",
                                one_of(ALERT_EVENTS)
                            ),
                        );
                    }
                }
            }
        }
        let tasks = alert.tasks.as_ref().map(|tasks| {
            let mut set = BTreeSet::new();
            for task in tasks {
                if known.contains(task.get_ref()) {
                    set.insert(TaskName::from(task.get_ref().as_str()));
                } else {
                    report.error(
                        task.span(),
                        "alerts.tasks",
                        format!("unknown task {:?}", task.get_ref()),
                    );
                }
            }
            set
        });
        let max_attempts = match &alert.max_attempts {
            None => 5,
            Some(n) if (ALERT_ATTEMPTS.0..=ALERT_ATTEMPTS.1).contains(n.get_ref()) => {
                *n.get_ref() as u32
            }
            Some(n) => {
                report.error(
                    n.span(),
                    "alerts.max_attempts",
                    format!(
                        "expected a whole number from {} to {}, found {}",
                        ALERT_ATTEMPTS.0,
                        ALERT_ATTEMPTS.1,
                        n.get_ref()
                    ),
                );
                5
            }
        };
        alerts.push(AlertSpec {
            name,
            target,
            events,
            tasks,
            max_attempts,
        });
    }
    alerts
}

/// `[api] bind` must be an IP address and a port: the API binds exactly that, and a
/// refusal at start-up would come without the file's line and column.
fn check_bind(report: &mut Report<'_>, bind: &Spanned<String>) {
    let text = bind.get_ref();
    if text.parse::<SocketAddr>().is_ok() {
        return;
    }
    let port_out_of_range = text.rsplit_once(':').is_some_and(|(_, port)| {
        !port.is_empty() && port.bytes().all(|b| b.is_ascii_digit()) && port.parse::<u16>().is_err()
    });
    let hint = if port_out_of_range {
        "a port is 0 to 65535"
    } else {
        "an IP address and a port"
    };
    report.error(
        bind.span(),
        "api.bind",
        format!("expected an address such as \"127.0.0.1:5000\", found {text:?} ({hint})"),
    );
}

/// A TOML syntax error, named by the key it falls in when the rest of the file tells.
/// A duplicate key is named in full, with the line it was first set on when known.
fn syntax_error(report: &mut Report<'_>, err: &toml::de::Error) {
    let span = err.span().unwrap_or(0..0);
    let message = lowercase_first(err.message().trim());
    // Best-effort recovery keeps the keys before and around the error.
    let (recovered, _) = DeTable::parse_recoverable(report.text);
    let mut known = Vec::new();
    entries(recovered.get_ref(), "", 0, &mut known);
    if message == "duplicate key" {
        let name = report
            .text
            .get(span.clone())
            .unwrap_or_default()
            .trim()
            .trim_matches(|c| c == '"' || c == '\'');
        // The latest table header before the key tells which table it is in; a header
        // is a table whose value span is its `[...]` line.
        let header = known
            .iter()
            .filter(|e| {
                e.value.end <= span.start
                    && report
                        .text
                        .get(e.value.clone())
                        .is_some_and(|t| t.starts_with('['))
            })
            .max_by_key(|e| e.value.start)
            .map(|e| format!("{}.", e.path));
        let earlier = |e: &&Entry| e.name == name && e.key.start <= span.start;
        let first = known
            .iter()
            .filter(earlier)
            .filter(|e| header.as_ref().is_none_or(|h| e.path.starts_with(h)))
            .max_by_key(|e| e.key.start)
            .or_else(|| known.iter().filter(earlier).max_by_key(|e| e.key.start));
        let (path, message) = match first {
            Some(first) if first.key.start < span.start => (
                first.path.clone(),
                format!(
                    "duplicate key (first set on line {})",
                    line_column(report.text, first.key.start).0
                ),
            ),
            Some(first) => (first.path.clone(), message),
            None => (name.to_string(), message),
        };
        report.error(span, &path, message);
        return;
    }
    let path = locate(&known, &span)
        .map(|e| e.path.clone())
        .unwrap_or_default();
    report.error(span, &path, format!("invalid TOML: {message}"));
}

/// A file that is not UTF-8, refused at its first bad byte under the key it falls in.
pub(super) fn invalid_utf8(bytes: &[u8], valid_up_to: usize, file: &Path) -> ConfigErrors {
    // Bytes before the first bad one are unchanged by the lossy decoding.
    let text = String::from_utf8_lossy(bytes);
    let (recovered, _) = DeTable::parse_recoverable(&text);
    let mut known = Vec::new();
    entries(recovered.get_ref(), "", 0, &mut known);
    let at = valid_up_to..valid_up_to + 1;
    let mut report = Report {
        text: &text,
        file,
        errors: Vec::new(),
        entries: Vec::new(),
    };
    let path = locate(&known, &at)
        .map(|e| e.path.clone())
        .unwrap_or_default();
    let byte = bytes.get(valid_up_to).copied().unwrap_or_default();
    report.error(
        at,
        &path,
        format!("expected UTF-8 text, found the byte 0x{byte:02X} (save the file as UTF-8)"),
    );
    ConfigErrors(report.errors)
}

fn resolve_scheduler(report: &mut Report<'_>, raw: Option<RawScheduler>) -> SchedulerSettings {
    let raw = raw.unwrap_or(RawScheduler {
        timezone: None,
        database: None,
        max_workers: None,
        heartbeat_interval: None,
        heartbeat_timeout: None,
        kill_grace: None,
        shutdown_grace: None,
        log_dir: None,
        state_dir: None,
        poll_only: None,
    });
    let timezone = report.timezone(raw.timezone.as_ref(), "scheduler.timezone", chrono_tz::UTC);
    let max_workers = match &raw.max_workers {
        Some(value) if *value.get_ref() < 1 => {
            report.error(
                value.span(),
                "scheduler.max_workers",
                format!(
                    "expected a whole number of at least 1, found {}",
                    value.get_ref()
                ),
            );
            1
        }
        Some(value) => usize::try_from(*value.get_ref()).unwrap_or(1),
        None => 4,
    };
    let heartbeat_interval = report.duration(
        raw.heartbeat_interval.as_ref(),
        "scheduler.heartbeat_interval",
        Duration::from_secs(5),
    );
    let heartbeat_timeout = report.duration(
        raw.heartbeat_timeout.as_ref(),
        "scheduler.heartbeat_timeout",
        Duration::from_secs(30),
    );
    if heartbeat_timeout <= heartbeat_interval {
        if let Some(value) = raw
            .heartbeat_timeout
            .as_ref()
            .or(raw.heartbeat_interval.as_ref())
        {
            report.error(
                value.span(),
                "scheduler.heartbeat_timeout",
                format!(
                    "must be longer than heartbeat_interval ({}), found {}",
                    humantime::format_duration(heartbeat_interval),
                    humantime::format_duration(heartbeat_timeout)
                ),
            );
        }
    }
    if heartbeat_interval.is_zero() {
        if let Some(value) = &raw.heartbeat_interval {
            report.error(
                value.span(),
                "scheduler.heartbeat_interval",
                "must be longer than zero",
            );
        }
    }
    SchedulerSettings {
        timezone,
        database: PathBuf::from(raw.database.unwrap_or_else(|| "data/scheduler.db".into())),
        max_workers,
        heartbeat_interval,
        heartbeat_timeout,
        kill_grace: report.duration(
            raw.kill_grace.as_ref(),
            "scheduler.kill_grace",
            Duration::from_secs(10),
        ),
        shutdown_grace: report.duration(
            raw.shutdown_grace.as_ref(),
            "scheduler.shutdown_grace",
            Duration::from_secs(30),
        ),
        log_dir: PathBuf::from(raw.log_dir.unwrap_or_else(|| "logs".into())),
        state_dir: PathBuf::from(raw.state_dir.unwrap_or_else(|| "data/state".into())),
        poll_only: raw.poll_only.unwrap_or(false),
    }
}

fn resolve_logging(report: &mut Report<'_>, raw: RawLogging) -> LoggingSettings {
    let max_size = match &raw.max_size {
        None => 10_000_000,
        Some(value) => {
            let parsed = match value.get_ref() {
                RawSize::Bytes(bytes) => Some(*bytes),
                RawSize::Text(text) => text
                    .trim()
                    .parse::<bytesize::ByteSize>()
                    .ok()
                    .map(|size| size.as_u64()),
            };
            match parsed {
                Some(bytes) if bytes >= MIN_SIZE => bytes,
                _ => {
                    let found = match value.get_ref() {
                        RawSize::Bytes(bytes) => bytes.to_string(),
                        RawSize::Text(text) => format!("{text:?}"),
                    };
                    report.error(
                        value.span(),
                        "logging.max_size",
                        format!("expected a size of at least 1KiB such as \"10MB\", found {found}"),
                    );
                    10_000_000
                }
            }
        }
    };
    let mut count = |value: &Option<Spanned<i64>>, key: &str, default: usize| match value {
        None => default,
        Some(value) if (BACKUPS.0..=BACKUPS.1).contains(value.get_ref()) => {
            *value.get_ref() as usize
        }
        Some(value) => {
            report.error(
                value.span(),
                key,
                format!(
                    "expected a whole number from {} to {}, found {}",
                    BACKUPS.0,
                    BACKUPS.1,
                    value.get_ref()
                ),
            );
            default
        }
    };
    LoggingSettings {
        max_size,
        task_backups: count(&raw.task_backups, "logging.task_backups", 5),
        scheduler_backups: count(&raw.scheduler_backups, "logging.scheduler_backups", 10),
        archive_dir: PathBuf::from(raw.archive_dir.unwrap_or_else(|| "archive".into())),
    }
}

/// Picks the task's own value, else the `[defaults]` one, with the key it came from.
fn pick<'a, T>(
    task: &'a Option<T>,
    defaults: &'a Option<T>,
    name: &str,
    field: &str,
) -> (Option<&'a T>, String) {
    match (task, defaults) {
        (Some(value), _) => (Some(value), format!("tasks.{name}.{field}")),
        (None, Some(value)) => (Some(value), format!("defaults.{field}")),
        (None, None) => (None, format!("tasks.{name}.{field}")),
    }
}

/// How many intervals between upcoming ticks `jitter` is checked against.
const JITTER_GAPS: usize = 50;

/// What a task may name: the other tasks, and the calendars.
#[derive(Clone, Copy)]
struct Names<'a> {
    tasks: &'a BTreeSet<String>,
    calendars: &'a BTreeMap<String, Arc<Calendar>>,
    pools: &'a BTreeMap<String, usize>,
}

fn resolve_task(
    report: &mut Report<'_>,
    name: &Spanned<String>,
    span: Range<usize>,
    task: &RawTask,
    defaults: &RawTask,
    scheduler: &SchedulerSettings,
    names: &Names<'_>,
) -> Option<TaskSpec> {
    let Names {
        tasks: known,
        calendars,
        pools,
    } = *names;
    let task_name = name.get_ref().as_str();
    let errors_before = report.errors.len();
    if task_name.is_empty()
        || !task_name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
    {
        report.error(
            span.clone(),
            &format!("tasks.{task_name}"),
            "task names may hold only letters, digits, '_' and '-' (they name log files and routes)",
        );
    }

    let (tz_value, tz_key) = pick(&task.timezone, &defaults.timezone, task_name, "timezone");
    let timezone = report.timezone(tz_value, &tz_key, scheduler.timezone);

    let (schedule_value, schedule_key) =
        pick(&task.schedule, &defaults.schedule, task_name, "schedule");
    let schedule = match schedule_value {
        Some(expr) => match Schedule::parse(expr.get_ref(), timezone) {
            // A date that does not exist (31 February) parses but has no next fire.
            Ok(schedule) if schedule.next_after(Utc::now()).is_none() => {
                report.error(
                    expr.span(),
                    &schedule_key,
                    format!(
                        "schedule {:?} never fires (no date matches)",
                        expr.get_ref()
                    ),
                );
                None
            }
            Ok(schedule) => Some(schedule),
            Err(err) => {
                report.error(expr.span(), &schedule_key, err.to_string());
                None
            }
        },
        None => None,
    };

    let handler = resolve_handler(report, task_name, span.clone(), task, defaults);

    let (timeout_value, timeout_key) = pick(&task.timeout, &defaults.timeout, task_name, "timeout");
    let timeout = report.duration(timeout_value, &timeout_key, Duration::from_secs(3600));
    if timeout.is_zero() {
        if let Some(value) = timeout_value {
            report.error(value.span(), &timeout_key, "must be longer than zero");
        }
    }
    let retries = pick(&task.retries, &defaults.retries, task_name, "retries")
        .0
        .map(|r| *r.get_ref())
        .unwrap_or(0);

    let backoff = {
        let own = task.retry_backoff.clone().unwrap_or_default();
        let base = defaults.retry_backoff.clone().unwrap_or_default();
        let (initial, initial_key) = pick(
            &own.initial,
            &base.initial,
            task_name,
            "retry_backoff.initial",
        );
        let (max, max_key) = pick(&own.max, &base.max, task_name, "retry_backoff.max");
        let initial = report.duration(initial, &initial_key, Duration::from_secs(30));
        let max = report.duration(max, &max_key, Duration::from_secs(600));
        let (factor_value, factor_key) =
            pick(&own.factor, &base.factor, task_name, "retry_backoff.factor");
        let factor = factor_value.map(|f| *f.get_ref()).unwrap_or(2.0);
        if !(FACTOR.0..=FACTOR.1).contains(&factor) {
            if let Some(value) = factor_value {
                report.error(
                    value.span(),
                    &factor_key,
                    format!(
                        "expected a factor from {:.1} to {:.1}, found {factor}",
                        FACTOR.0, FACTOR.1
                    ),
                );
            }
        }
        Backoff {
            initial,
            factor,
            max,
            jitter: own.jitter.or(base.jitter).unwrap_or(true),
        }
    };

    let mut depends_on = Vec::new();
    if let Some(deps) = &task.depends_on {
        let mut seen = HashSet::new();
        for dep in deps {
            let dep_name = dep.get_ref();
            if !known.contains(dep_name) {
                let hint = closest(dep_name, known.iter().map(String::as_str))
                    .map(|near| format!(" (did you mean \"{near}\"?)"))
                    .unwrap_or_default();
                report.error(
                    dep.span(),
                    &format!("tasks.{task_name}.depends_on"),
                    format!("unknown task \"{dep_name}\"{hint}"),
                );
            } else if seen.insert(dep_name.clone()) {
                depends_on.push(TaskName(dep_name.clone()));
            }
        }
    }

    let (age_value, age_key) = pick(
        &task.dependency_max_age,
        &defaults.dependency_max_age,
        task_name,
        "dependency_max_age",
    );
    let dependency_max_age =
        age_value.map(|_| report.duration(age_value, &age_key, Duration::ZERO));

    let (misfire_value, misfire_key) = pick(&task.misfire, &defaults.misfire, task_name, "misfire");
    let misfire = match misfire_value {
        Some(value) => MisfirePolicy::parse(value.get_ref()).unwrap_or_else(|| {
            report.error(
                value.span(),
                &misfire_key,
                format!(
                    "expected one of {}, found {:?}",
                    one_of(MISFIRE_CHOICES),
                    value.get_ref()
                ),
            );
            MisfirePolicy::RunOnce
        }),
        None => MisfirePolicy::RunOnce,
    };
    let (grace_value, grace_key) = pick(
        &task.misfire_grace,
        &defaults.misfire_grace,
        task_name,
        "misfire_grace",
    );
    let misfire_grace = report.duration(grace_value, &grace_key, Duration::from_secs(3600));

    let (overlap_value, overlap_key) = pick(&task.overlap, &defaults.overlap, task_name, "overlap");
    let overlap = match overlap_value.map(|v| (v, v.get_ref().as_str())) {
        Some((_, "skip")) | None => Overlap::Skip,
        Some((_, "queue")) => Overlap::Queue,
        Some((_, "replace")) => Overlap::Replace,
        Some((value, other)) => {
            report.error(
                value.span(),
                &overlap_key,
                format!(
                    "expected one of {}, found {other:?}",
                    one_of(OVERLAP_CHOICES)
                ),
            );
            Overlap::Skip
        }
    };

    let (pool_value, pool_key) = pick(&task.pool, &defaults.pool, task_name, "pool");
    let pool = pool_value.and_then(|value| {
        let name = value.get_ref();
        if pools.contains_key(name) {
            return Some(name.clone());
        }
        let known = pools.keys().map(String::as_str).collect::<Vec<_>>();
        let hint = closest(name, known.iter().copied())
            .map(|near| format!(" (did you mean \"{near}\"?)"))
            .unwrap_or_else(|| {
                if known.is_empty() {
                    " (no [pools.<name>] table defines one)".to_string()
                } else {
                    format!(" (known pools: {})", known.join(", "))
                }
            });
        report.error(
            value.span(),
            &pool_key,
            format!("unknown pool {name:?}{hint}"),
        );
        None
    });

    let (params_value, params_key) = pick(&task.params, &defaults.params, task_name, "params");
    if let (Some(table), Some(known)) = (
        params_value,
        handler.as_ref().and_then(|h| handler_params(h.name())),
    ) {
        let handler_name = handler.as_ref().map(Handler::name).unwrap_or_default();
        for key in table
            .get_ref()
            .keys()
            .filter(|k| !known.contains(&k.as_str()))
        {
            if let Some(why) = super::unknown_param(handler_name, key) {
                report.error(table.span(), &format!("{params_key}.{key}"), why);
            }
        }
    }
    let params = match params_value {
        Some(table) => serde_json::to_value(table.get_ref()).unwrap_or(serde_json::Value::Null),
        None => serde_json::Value::Object(Default::default()),
    };

    let (calendar_value, calendar_key) =
        pick(&task.calendar, &defaults.calendar, task_name, "calendar");
    let calendar = calendar_value.and_then(|value| {
        let found = calendars.get(value.get_ref()).cloned();
        if found.is_none() {
            let hint = closest(value.get_ref(), calendars.keys().map(String::as_str))
                .map(|near| format!(" (did you mean \"{near}\"?)"))
                .unwrap_or_else(|| {
                    if calendars.is_empty() {
                        " (no [calendars.<name>] table is defined)".to_string()
                    } else {
                        format!(
                            " (known calendars: {})",
                            calendars.keys().cloned().collect::<Vec<_>>().join(", ")
                        )
                    }
                });
            report.error(
                value.span(),
                &calendar_key,
                format!("unknown calendar \"{}\"{hint}", value.get_ref()),
            );
        }
        found
    });

    let (jitter_value, jitter_key) = pick(&task.jitter, &defaults.jitter, task_name, "jitter");
    let errors_before_jitter = report.errors.len();
    let jitter = report.duration(jitter_value, &jitter_key, Duration::ZERO);
    let jitter_parsed = report.errors.len() == errors_before_jitter;
    if let (Some(value), Some(schedule), true) = (jitter_value, &schedule, jitter_parsed) {
        // A jitter as long as the gap between two ticks would push a fire past the next
        // tick, which would then be "missed": refused, against the shortest gap of the
        // next ticks (only computed when a jitter is set).
        let shortest = schedule
            .ticks_after(Utc::now())
            .take(JITTER_GAPS + 1)
            .collect::<Vec<_>>()
            .windows(2)
            .filter_map(|pair| (pair[1] - pair[0]).to_std().ok())
            .min();
        if let Some(shortest) = shortest.filter(|gap| jitter >= *gap) {
            report.error(
                value.span(),
                &jitter_key,
                format!(
                    "must be shorter than the schedule's shortest interval between ticks ({}), found {:?}",
                    humantime::format_duration(shortest),
                    value.get_ref()
                ),
            );
        }
    }

    let (failures_value, failures_key) = pick(
        &task.max_consecutive_failures,
        &defaults.max_consecutive_failures,
        task_name,
        "max_consecutive_failures",
    );
    let max_consecutive_failures = failures_value.map(|value| *value.get_ref());
    if let Some(value) = failures_value.filter(|value| *value.get_ref() == 0) {
        report.error(
            value.span(),
            &failures_key,
            "expected a whole number of at least 1 (leave the key out for no circuit breaker), found 0",
        );
    }

    let (deadline_value, deadline_key) =
        pick(&task.deadline, &defaults.deadline, task_name, "deadline");
    let errors_before_deadline = report.errors.len();
    let deadline =
        deadline_value.map(|_| report.duration(deadline_value, &deadline_key, Duration::ZERO));
    let deadline_parsed = report.errors.len() == errors_before_deadline;
    if let Some(value) =
        deadline_value.filter(|_| deadline_parsed && deadline == Some(Duration::ZERO))
    {
        report.error(value.span(), &deadline_key, "must be longer than zero");
    }

    if let Some(handler) = &handler {
        for folder in super::output_folders(handler, &params) {
            if let Some(reason) = super::output_folder_refusal(&folder.path, scheduler) {
                report.error(
                    params_value.map(|t| t.span()).unwrap_or(span.clone()),
                    &format!("{params_key}.{}", folder.param),
                    format!("an output folder is served by GET /scheduler/files; {reason}"),
                );
            }
        }
    }

    if report.errors.len() > errors_before {
        return None;
    }
    Some(TaskSpec {
        name: TaskName(task_name.to_string()),
        schedule,
        timezone,
        handler: handler?,
        params,
        timeout,
        retries,
        backoff,
        depends_on,
        dependency_max_age,
        misfire,
        misfire_grace,
        overlap,
        pool,
        enabled: task.enabled.or(defaults.enabled).unwrap_or(true),
        description: task.description.clone().unwrap_or_default(),
        calendar,
        jitter,
        max_consecutive_failures,
        deadline,
    })
}

fn resolve_handler(
    report: &mut Report<'_>,
    task_name: &str,
    span: Range<usize>,
    task: &RawTask,
    defaults: &RawTask,
) -> Option<Handler> {
    let (handler_value, handler_key) = pick(&task.handler, &defaults.handler, task_name, "handler");
    let command_key = format!("tasks.{task_name}.command");
    let handler_name = match (handler_value, &task.command) {
        (Some(value), _) => value.get_ref().clone(),
        (None, Some(_)) => "command".to_string(),
        (None, None) => {
            report.error(
                span,
                &format!("tasks.{task_name}"),
                format!(
                    "no handler: set handler to one of {} or give command = [\"program\", \"arg\"]",
                    handler_names()
                        .iter()
                        .map(|h| format!("\"{h}\""))
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            );
            return None;
        }
    };
    if handler_name != "command" && handler_params(&handler_name).is_none() {
        let known = handler_names();
        let hint = closest(&handler_name, known.iter().copied())
            .map(|near| format!(" (did you mean \"{near}\"?)"))
            .unwrap_or_else(|| format!(" (known handlers: {})", known.join(", ")));
        let at = handler_value.map(|v| v.span()).unwrap_or(span);
        report.error(
            at,
            &handler_key,
            format!("unknown handler \"{handler_name}\" for task {task_name}{hint}"),
        );
        return None;
    }
    if handler_name != "command" {
        if let Some(command) = &task.command {
            report.error(
                command.span(),
                &command_key,
                format!("command is only for handler = \"command\"; task {task_name} uses \"{handler_name}\""),
            );
            return None;
        }
        return Some(Handler::Builtin(handler_name));
    }
    let Some(command) = &task.command else {
        report.error(
            span,
            &command_key,
            "handler \"command\" needs command = [\"program\", \"arg\", …]",
        );
        return None;
    };
    let shell = task.shell.unwrap_or(false);
    let argv = match (command.get_ref(), shell) {
        (RawCommand::Argv(argv), false) if !argv.is_empty() && !argv[0].is_empty() => argv.clone(),
        (RawCommand::Line(line), true) if !line.trim().is_empty() => vec![line.clone()],
        (RawCommand::Argv(_), false) | (RawCommand::Line(_), true) => {
            report.error(
                command.span(),
                &command_key,
                "expected a program to run, found an empty command",
            );
            return None;
        }
        (RawCommand::Line(line), false) => {
            report.error(
                command.span(),
                &command_key,
                format!(
                    "expected an array of arguments such as [\"/bin/echo\", \"hi\"], found the string {line:?}; \
                     set shell = true to run a command line through /bin/sh"
                ),
            );
            return None;
        }
        (RawCommand::Argv(_), true) => {
            report.error(
                command.span(),
                &command_key,
                "with shell = true, command is one string: the command line",
            );
            return None;
        }
    };
    Some(Handler::Command(CommandSpec {
        argv,
        shell,
        cwd: task.cwd.clone().map(PathBuf::from),
        env: task.env.clone().unwrap_or_default(),
    }))
}

/// Kahn's algorithm, alphabetical among equals. On a cycle, returns it (`a`, `b`, `a`).
fn order_tasks(specs: &BTreeMap<TaskName, TaskSpec>) -> Result<Vec<TaskName>, Vec<String>> {
    let mut indegree: BTreeMap<&TaskName, usize> = specs.keys().map(|k| (k, 0)).collect();
    for spec in specs.values() {
        for up in &spec.depends_on {
            if specs.contains_key(up) {
                *indegree.entry(&spec.name).or_default() += 1;
            }
        }
    }
    // Each task's downstream tasks, so the walk is linear in tasks and edges (ten thousand
    // tasks once took seconds here when every step scanned every task).
    let mut downstream: BTreeMap<&TaskName, Vec<&TaskName>> = BTreeMap::new();
    for spec in specs.values() {
        for up in spec.depends_on.iter().filter(|up| specs.contains_key(*up)) {
            downstream.entry(up).or_default().push(&spec.name);
        }
    }
    let mut ready: BTreeSet<&TaskName> = indegree
        .iter()
        .filter(|(_, d)| **d == 0)
        .map(|(k, _)| *k)
        .collect();
    let mut order = Vec::new();
    while let Some(next) = ready.pop_first() {
        order.push(next.clone());
        for task in downstream.get(next).into_iter().flatten() {
            let degree = indegree.entry(task).or_default();
            *degree = degree.saturating_sub(1);
            if *degree == 0 {
                ready.insert(task);
            }
        }
    }
    if order.len() == specs.len() {
        return Ok(order);
    }
    // Walk upstream edges from any task left over until a name repeats: that is a cycle.
    let left: BTreeSet<&TaskName> = indegree
        .iter()
        .filter(|(_, d)| **d > 0)
        .map(|(k, _)| *k)
        .collect();
    let Some(start) = left.first() else {
        return Err(Vec::new());
    };
    let mut path: Vec<&TaskName> = vec![start];
    loop {
        let current = path[path.len() - 1];
        let Some(up) = specs[current]
            .depends_on
            .iter()
            .find(|up| left.contains(up))
        else {
            return Err(path.iter().map(|n| n.0.clone()).collect());
        };
        if let Some(pos) = path.iter().position(|n| *n == up) {
            let mut cycle: Vec<String> = path[pos..].iter().map(|n| n.0.clone()).collect();
            cycle.push(cycle[0].clone());
            return Err(cycle);
        }
        path.push(up);
    }
}

/// 1-based line and column (in characters) of byte `offset`.
fn line_column(text: &str, offset: usize) -> (usize, usize) {
    let mut offset = offset.min(text.len());
    while !text.is_char_boundary(offset) {
        offset -= 1;
    }
    let before = &text[..offset];
    let line = before.matches('\n').count() + 1;
    let line_start = before.rfind('\n').map(|i| i + 1).unwrap_or(0);
    (line, before[line_start..].chars().count() + 1)
}

/// `unknown field `x`, expected one of `a`, `b`` → (`x`, [`a`, `b`]).
fn unknown_field(message: &str) -> Option<(String, Vec<String>)> {
    let rest = message.strip_prefix("unknown field `")?;
    let end = rest.find('`')?;
    let field = rest[..end].to_string();
    let expected = rest[end..]
        .split('`')
        .skip(2)
        .step_by(2)
        .map(str::to_string)
        .collect();
    Some((field, expected))
}

/// `"a", "b", "c"`: the words a key accepts, quoted.
fn one_of(choices: &[&str]) -> String {
    choices
        .iter()
        .map(|c| format!("{c:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// serde's "invalid type: string \"four\", expected i64" as "expected a whole number,
/// found string \"four\"", in the words of the config reference.
fn explain(message: &str) -> String {
    let mismatch = message
        .strip_prefix("invalid type: ")
        .or_else(|| message.strip_prefix("invalid value: "))
        .and_then(|rest| rest.rsplit_once(", expected "));
    if let Some((found, expected)) = mismatch {
        let expected = match expected {
            "i64" | "i32" | "usize" => "a whole number",
            "u32" => "a whole number from 0 to 4294967295",
            "u64" => "a whole number of at least 0",
            "f64" => "a number",
            "a sequence" => "an array",
            "a map" => "a table",
            other => other,
        };
        return format!("expected {expected}, found {found}");
    }
    if message.contains("untagged enum RawCommand") {
        return "expected an array of arguments such as [\"/bin/echo\", \"hi\"], or one string with shell = true".into();
    }
    if message.contains("untagged enum RawSize") {
        return "expected a size such as \"10MB\", or a number of bytes".into();
    }
    lowercase_first(message)
}

fn lowercase_first(text: &str) -> String {
    let mut chars = text.chars();
    match chars.next() {
        Some(first) => first
            .to_lowercase()
            .chain(chars)
            .collect::<String>()
            .trim_end_matches('.')
            .to_string(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::keys::{self, Key};

    /// The fields serde decodes for `T`, from its refusal of an unknown one.
    fn fields<T: DeserializeOwned>() -> Vec<String> {
        let table = DeTable::parse("zz_unknown = 0").expect("toml");
        let value = Spanned::new(0..0, DeValue::Table(table.into_inner()));
        let Err(err) = T::deserialize(ValueDeserializer::from(value)) else {
            panic!("an unknown key was accepted");
        };
        let (_, mut expected) = unknown_field(err.message()).expect("unknown field message");
        expected.sort();
        expected
    }

    fn names(keys: &[Key]) -> Vec<String> {
        let mut names: Vec<String> = keys.iter().map(|k| k.name.to_string()).collect();
        names.sort();
        names
    }

    /// The key tables of `keys.rs` (the JSON Schema's source) are the fields validation
    /// decodes: a key added to one and not the other fails here.
    #[test]
    fn the_key_tables_are_the_fields_validation_decodes() {
        assert_eq!(names(keys::SCHEDULER_KEYS), fields::<RawScheduler>());
        assert_eq!(names(keys::API_KEYS), fields::<RawApi>());
        assert_eq!(names(keys::LOGGING_KEYS), fields::<RawLogging>());
        assert_eq!(names(keys::TASK_KEYS), fields::<RawTask>());
        assert_eq!(names(keys::BACKOFF_KEYS), fields::<RawBackoff>());
        assert_eq!(names(keys::CALENDAR_KEYS), fields::<RawCalendar>());
        assert_eq!(names(keys::CALENDAR_FILE_KEYS), fields::<RawCalendarFile>());
        assert_eq!(names(keys::ALERT_KEYS), fields::<RawAlert>());
        assert_eq!(names(keys::POOL_KEYS), fields::<RawPool>());
        let mut sections: Vec<&str> = SECTIONS.to_vec();
        sections.sort_unstable();
        assert_eq!(
            sections,
            [
                "alerts",
                "api",
                "calendars",
                "defaults",
                "logging",
                "pools",
                "scheduler",
                "tasks"
            ]
        );
    }

    /// Every duration key of the tables has its bound, and every bound names a key.
    #[test]
    fn every_duration_key_has_a_bound_and_every_bound_a_key() {
        let tables: [(&str, &[Key]); 4] = [
            ("", keys::SCHEDULER_KEYS),
            ("", keys::TASK_KEYS),
            ("", keys::LOGGING_KEYS),
            ("retry_backoff", keys::BACKOFF_KEYS),
        ];
        let mut durations = 0;
        for (table, keys) in tables {
            for key in keys
                .iter()
                .filter(|k| matches!(k.kind, keys::Kind::Duration))
            {
                assert!(
                    keys::duration_bound(table, key.name).is_some(),
                    "{table}.{} has no bound",
                    key.name
                );
                durations += 1;
            }
        }
        assert_eq!(durations, DURATION_BOUNDS.len());
    }

    /// Every default the tables give is what validation takes when the key is absent.
    #[test]
    fn the_tables_defaults_are_validations_defaults() {
        let mut text = String::new();
        for (table, keys) in [
            ("scheduler", keys::SCHEDULER_KEYS),
            ("api", keys::API_KEYS),
            ("logging", keys::LOGGING_KEYS),
        ] {
            text.push_str(&format!("[{table}]\n"));
            for key in keys.iter().filter(|k| k.default.is_some()) {
                text.push_str(&format!(
                    "{} = {}\n",
                    key.name,
                    key.default.unwrap_or_default()
                ));
            }
        }
        text.push_str("[tasks.a]\nhandler = \"ping\"\n");
        for key in keys::TASK_KEYS.iter().filter(|k| k.default.is_some()) {
            text.push_str(&format!(
                "{} = {}\n",
                key.name,
                key.default.unwrap_or_default()
            ));
        }
        text.push_str("[tasks.a.retry_backoff]\n");
        for key in keys::BACKOFF_KEYS {
            text.push_str(&format!(
                "{} = {}\n",
                key.name,
                key.default.unwrap_or_default()
            ));
        }
        text.push_str("[tasks.b]\nhandler = \"ping\"\n");
        let explicit =
            resolve(&text, Path::new("t.toml")).unwrap_or_else(|e| panic!("{e}\n{text}"));
        let a = &explicit.tasks[&TaskName("a".into())];
        let b = &explicit.tasks[&TaskName("b".into())];
        assert_eq!(
            format!("{a:?}").replace("name: TaskName(\"a\")", ""),
            format!("{b:?}").replace("name: TaskName(\"b\")", "")
        );
        let bare = resolve("[tasks.b]\nhandler = \"ping\"\n", Path::new("t.toml")).expect("bare");
        assert_eq!(
            format!("{:?}", explicit.scheduler),
            format!("{:?}", bare.scheduler)
        );
        assert_eq!(format!("{:?}", explicit.api), format!("{:?}", bare.api));
        assert_eq!(explicit.logging, bare.logging);
    }
}
