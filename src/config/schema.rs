//! The JSON Schema of the config file (`turbosched config-schema`, shipped as
//! `config/scheduler.schema.json`, which `config/scheduler.toml` names in its
//! `#:schema` line for Taplo and Even Better TOML). Built from the key tables of
//! [`super::keys`], the handler list of `builtins::BUILTINS` and chrono-tz's zone list:
//! the definitions validation reads, so the schema cannot name a key validation refuses.
//!
//! The schema is the part of validation a value can tell alone (keys, types, words,
//! numeric bounds, zone names, handler params); what needs the whole file (cron
//! expressions, dependencies, cycles, duration bounds) stays `turbosched validate`'s.

use serde_json::{json, Map, Value};

use super::keys::{self, Key, Kind, MIN_SIZE, TASK_NAME_PATTERN};
use crate::builtins::BUILTINS;

/// Loose on purpose: a duration such as `"90m"` or `"1h 30m"`; humantime decides.
const DURATION_PATTERN: &str = r"^\s*[0-9]+\s*[A-Za-zµ]+(\s*[0-9]+\s*[A-Za-zµ]+)*\s*$";

/// A calendar date, `YYYY-MM-DD` (validation checks the date exists).
const DATE_PATTERN: &str = r"^[0-9]{4}-[0-9]{2}-[0-9]{2}$";

/// The schema, draft-07 (what Taplo reads).
pub fn json_schema() -> Value {
    let task = json!({
        "type": "object",
        "properties": properties(keys::TASK_KEYS, ""),
        "additionalProperties": false,
        "allOf": handler_params(),
    });
    json!({
        "$schema": "http://json-schema.org/draft-07/schema#",
        "title": "turbosched config",
        "description": "config/scheduler.toml of turbosched; README_SCHEDULE.md, \"Configuration reference\", says what each key does",
        "type": "object",
        "properties": {
            "scheduler": section(keys::SCHEDULER_KEYS, "the service-wide knobs"),
            "api": section(keys::API_KEYS, "the HTTP API"),
            "logging": section(keys::LOGGING_KEYS, "rotation of the log files and where archives go"),
            "defaults": {
                "description": "any task key, applied to every task that does not set it",
                "$ref": "#/definitions/task",
            },
            "calendars": {
                "description": "one table per calendar: [calendars.<name>], dates a task naming it does not fire on",
                "type": "object",
                "propertyNames": { "pattern": TASK_NAME_PATTERN },
                "additionalProperties": section(keys::CALENDAR_KEYS, "dates to skip, inline and/or from a file"),
            },
            "alerts": {
                "description": "one [[alerts]] table per endpoint told about failures",
                "type": "array",
                "items": {
                    "type": "object",
                    "properties": properties(keys::ALERT_KEYS, ""),
                    "required": ["events"],
                    "additionalProperties": false,
                },
            },
            "pools": {
                "description": "one table per pool: [pools.<name>] slots = N",
                "type": "object",
                "additionalProperties": {
                    "type": "object",
                    "properties": properties(keys::POOL_KEYS, ""),
                    "required": ["slots"],
                    "additionalProperties": false,
                },
            },
            "tasks": {
                "description": "one table per task: [tasks.<name>]",
                "type": "object",
                "propertyNames": { "pattern": TASK_NAME_PATTERN },
                "additionalProperties": { "$ref": "#/definitions/task" },
            },
        },
        "additionalProperties": false,
        "definitions": {
            "task": task,
            "zone": {
                "type": "string",
                "enum": chrono_tz::TZ_VARIANTS.iter().map(|tz| tz.name()).collect::<Vec<_>>(),
            },
        },
    })
}

fn section(keys: &[Key], description: &str) -> Value {
    json!({
        "description": description,
        "type": "object",
        "properties": properties(keys, ""),
        "additionalProperties": false,
    })
}

/// One property per key; `table` is where duration bounds are looked up.
fn properties(keys: &[Key], table: &str) -> Map<String, Value> {
    keys.iter()
        .map(|key| (key.name.to_string(), property(key, table)))
        .collect()
}

fn property(key: &Key, table: &str) -> Value {
    let mut schema = match key.kind {
        Kind::Text | Kind::Cron => json!({ "type": "string" }),
        Kind::Zone => json!({ "$ref": "#/definitions/zone" }),
        Kind::Duration => json!({ "type": "string", "pattern": DURATION_PATTERN }),
        Kind::Whole { min, max } => json!({ "type": "integer", "minimum": min, "maximum": max }),
        Kind::Number { min, max } => json!({ "type": "number", "minimum": min, "maximum": max }),
        Kind::Flag => json!({ "type": "boolean" }),
        Kind::Size => json!({
            "anyOf": [
                { "type": "integer", "minimum": MIN_SIZE },
                { "type": "string", "pattern": r"^\s*[0-9.]+\s*[A-Za-z]*\s*$" },
            ]
        }),
        Kind::Choice(words) => json!({ "type": "string", "enum": words }),
        Kind::Handler => json!({ "type": "string", "enum": super::handler_names() }),
        Kind::Params => json!({ "type": "object" }),
        Kind::Command => json!({
            "anyOf": [
                { "type": "array", "items": { "type": "string" }, "minItems": 1 },
                { "type": "string" },
            ]
        }),
        Kind::Env => json!({ "type": "object", "additionalProperties": { "type": "string" } }),
        Kind::Backoff => json!({
            "type": "object",
            "properties": properties(keys::BACKOFF_KEYS, key.name),
            "additionalProperties": false,
        }),
        Kind::TaskNames => json!({
            "type": "array",
            "items": { "type": "string", "pattern": TASK_NAME_PATTERN },
        }),
        Kind::Dates => json!({
            "type": "array",
            "items": { "type": "string", "pattern": DATE_PATTERN },
        }),
        Kind::Calendar => json!({ "type": "string", "pattern": TASK_NAME_PATTERN }),
        Kind::Events => json!({
            "type": "array",
            "items": { "type": "string", "enum": keys::ALERT_EVENTS },
            "minItems": 1,
        }),
    };
    let mut description = key.doc.to_string();
    if let Some(bound) = keys::duration_bound(table, key.name) {
        description.push_str(&format!("; at most {}", bound.text));
    }
    if let Some(object) = schema.as_object_mut() {
        object.insert("description".into(), Value::String(description));
        if let Some(default) = key.default.and_then(toml_value) {
            object.insert("default".into(), default);
        }
    }
    schema
}

/// A default written as TOML (`"5s"`, `4`, `2.0`), as JSON.
fn toml_value(text: &str) -> Option<Value> {
    let table: toml::Table = toml::from_str(&format!("v = {text}")).ok()?;
    serde_json::to_value(table.get("v")?).ok()
}

/// For each built-in handler, the params it reads and no others (as validation refuses
/// any other key of a built-in's `params`).
fn handler_params() -> Vec<Value> {
    BUILTINS
        .iter()
        .map(|builtin| {
            let params: Map<String, Value> = builtin
                .params
                .iter()
                .map(|p| (p.to_string(), json!({})))
                .collect();
            json!({
                "if": {
                    "properties": { "handler": { "const": builtin.name } },
                    "required": ["handler"],
                },
                "then": {
                    "properties": {
                        "params": { "type": "object", "properties": params, "additionalProperties": false },
                    },
                },
            })
        })
        .collect()
}
