//! Query and body parameters: flags, `wait`, trigger options, run ids, instants. Each
//! refusal says what the parameter accepts.

use std::time::Duration;

use actix_web::web::Bytes;
use actix_web::HttpRequest;
use serde_json::Value;

use crate::model::{Instant, RunId};

use super::errors::ApiError;

#[derive(Clone, Copy)]
pub(super) enum WaitFor {
    Flag(bool),
    Seconds(u64),
}

impl WaitFor {
    /// The longest wait a caller may ask for, in seconds.
    const MAX_SECONDS: u64 = 3600;

    pub(super) fn limit(self) -> Option<Duration> {
        match self {
            WaitFor::Flag(false) | WaitFor::Seconds(0) => None,
            WaitFor::Flag(true) => Some(Duration::from_secs(300)),
            WaitFor::Seconds(seconds) => Some(Duration::from_secs(seconds)),
        }
    }

    fn error(code: &'static str, found: impl std::fmt::Display) -> ApiError {
        ApiError::bad_request(
            code,
            format!(
                "wait: expected true, false or a number of seconds from 0 to {}, found {found}",
                WaitFor::MAX_SECONDS
            ),
        )
    }

    /// `?wait=`: a whole number is seconds (so `1` is one second), else a flag.
    fn from_query(value: &str) -> Result<WaitFor, ApiError> {
        if let Ok(seconds) = value.parse::<u64>() {
            if seconds <= WaitFor::MAX_SECONDS {
                return Ok(WaitFor::Seconds(seconds));
            }
        } else if let Some(flag) = flag_value(value).filter(|_| value != "1" && value != "0") {
            return Ok(WaitFor::Flag(flag));
        }
        Err(WaitFor::error("bad_query", format!("{value:?}")))
    }

    /// `"wait"` in a JSON body: `true`, `false` or a whole number of seconds up to 3600.
    fn from_json(value: &Value) -> Result<WaitFor, ApiError> {
        match value {
            Value::Bool(flag) => Ok(WaitFor::Flag(*flag)),
            Value::Number(number) => number
                .as_u64()
                .filter(|seconds| *seconds <= WaitFor::MAX_SECONDS)
                .map(WaitFor::Seconds)
                .ok_or_else(|| WaitFor::error("bad_body", number)),
            other => Err(WaitFor::error("bad_body", other)),
        }
    }
}

/// The spellings of a query flag, the ones `/openapi.json` lists: `?force` alone is true.
const FLAG_SPELLINGS: [(&str, bool); 7] = [
    ("true", true),
    ("false", false),
    ("1", true),
    ("0", false),
    ("yes", true),
    ("no", false),
    ("", true),
];

fn flag_value(value: &str) -> Option<bool> {
    FLAG_SPELLINGS
        .iter()
        .find(|(spelling, _)| *spelling == value)
        .map(|(_, flag)| *flag)
}

pub(super) fn parse_flag(key: &str, value: &str) -> Result<bool, ApiError> {
    flag_value(value).ok_or_else(|| {
        ApiError::bad_request(
            "bad_query",
            format!("{key}: expected true, false, 1, 0, yes or no, found {value:?}"),
        )
    })
}

/// What a trigger asks for, from its query and body.
#[derive(Default)]
pub(super) struct Trigger {
    pub(super) force: Option<bool>,
    pub(super) downstream: Option<bool>,
    pub(super) wait: Option<WaitFor>,
    /// The run's own params (`{"params": {…}}`), merged over the task's.
    pub(super) params: Option<serde_json::Map<String, Value>>,
}

/// Query `?force=1&downstream=true&wait=30` and/or a JSON body with the same keys.
pub(super) fn trigger_options(request: &HttpRequest, body: &Bytes) -> Result<Trigger, ApiError> {
    let mut options = Trigger::default();
    for pair in request.query_string().split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "force" => options.force = Some(parse_flag(key, value)?),
            "downstream" => options.downstream = Some(parse_flag(key, value)?),
            "wait" => options.wait = Some(WaitFor::from_query(value)?),
            other => {
                return Err(ApiError::bad_request(
                    "bad_query",
                    format!("unknown parameter {other:?} (known: force, downstream, wait)"),
                ))
            }
        }
    }
    // No body: nothing but JSON's own whitespace (RFC 8259: space, tab, line feed,
    // carriage return). Not `is_ascii_whitespace`, which also takes a form feed: a body
    // of one was taken for none.
    if !body
        .iter()
        .all(|byte| matches!(byte, b' ' | b'\t' | b'\n' | b'\r'))
    {
        let bad =
            |message: String| ApiError::bad_request("bad_body", format!("request body: {message}"));
        let value: Value = serde_json::from_slice(body).map_err(|err| bad(err.to_string()))?;
        let Value::Object(fields) = value else {
            return Err(bad(format!(
                "expected an object such as {{\"force\": true}}, found {value}"
            )));
        };
        // Exactly the schema in /openapi.json (`TriggerOptions`): no nulls, no other keys.
        for (key, value) in &fields {
            match (key.as_str(), value) {
                ("force", Value::Bool(flag)) => options.force = Some(*flag),
                ("downstream", Value::Bool(flag)) => options.downstream = Some(*flag),
                ("force" | "downstream", other) => {
                    return Err(bad(format!("{key}: expected true or false, found {other}")))
                }
                ("wait", value) => options.wait = Some(WaitFor::from_json(value)?),
                ("params", Value::Object(params)) => {
                    if let Some((key, value)) = params.iter().find(|(_, v)| {
                        matches!(v, Value::Object(_) | Value::Array(_) | Value::Null)
                    }) {
                        return Err(bad(format!(
                            "params.{key}: expected a string, number or true/false, found {value}"
                        )));
                    }
                    options.params = Some(params.clone());
                }
                ("params", other) => {
                    return Err(bad(format!(
                        "params: expected an object such as {{\"sleep_sec\": 2}}, found {other}"
                    )))
                }
                (other, _) => {
                    return Err(bad(format!(
                        "unknown field {other:?} (known: force, downstream, wait, params)"
                    )))
                }
            }
        }
    }
    Ok(options)
}

pub(super) fn parse_instant(text: &str) -> Option<Instant> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

pub(super) fn parse_run_id(text: &str) -> Result<RunId, ApiError> {
    text.parse::<i64>()
        .ok()
        .filter(|n| *n > 0)
        .map(RunId)
        .ok_or_else(|| {
            ApiError::bad_request(
                "bad_run_id",
                format!("expected a run id (a positive whole number), found {text:?}"),
            )
        })
}

/// The body of `POST /scheduler/tasks/<task>/backfill` (`BackfillOptions` in /openapi.json).
pub(super) struct Backfill {
    pub(super) from: String,
    pub(super) to: String,
    pub(super) downstream: bool,
    pub(super) dry_run: bool,
}

/// `{"from": "2026-01-05", "to": "2026-01-09T17:00:00Z", "downstream": true, "dry_run": false}`.
pub(super) fn backfill_options(body: &Bytes) -> Result<Backfill, ApiError> {
    let bad =
        |message: String| ApiError::bad_request("bad_body", format!("request body: {message}"));
    let value: Value = serde_json::from_slice(body).map_err(|err| bad(err.to_string()))?;
    let Value::Object(fields) = value else {
        return Err(bad(format!(
            "expected an object such as {{\"from\": \"2026-01-05\", \"to\": \"2026-01-09\"}}, found {value}"
        )));
    };
    let (mut from, mut to, mut downstream, mut dry_run) = (None, None, false, false);
    for (key, value) in &fields {
        match (key.as_str(), value) {
            ("from", Value::String(text)) => from = Some(text.clone()),
            ("to", Value::String(text)) => to = Some(text.clone()),
            ("downstream", Value::Bool(flag)) => downstream = *flag,
            ("dry_run", Value::Bool(flag)) => dry_run = *flag,
            ("from" | "to", other) => {
                return Err(bad(format!(
                    "{key}: expected RFC 3339 or a date, found {other}"
                )))
            }
            ("downstream" | "dry_run", other) => {
                return Err(bad(format!("{key}: expected true or false, found {other}")))
            }
            (other, _) => {
                return Err(bad(format!(
                    "unknown field {other:?} (known: from, to, downstream, dry_run)"
                )))
            }
        }
    }
    let (Some(from), Some(to)) = (from, to) else {
        return Err(bad("from and to are required".into()));
    };
    Ok(Backfill {
        from,
        to,
        downstream,
        dry_run,
    })
}
