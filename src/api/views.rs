//! The JSON shapes of the API: promises to curl scripts and the dashboard. Built by hand
//! from engine and store types; change them only by adding fields.

use chrono::SecondsFormat;
use serde_json::{json, Value};

use crate::config::{Handler, TaskSpec};
use crate::engine::{Snapshot, TaskSnapshot};
use crate::model::{Instant, RunId};
use crate::store::{AttemptRow, EventRow, RunRow};

fn time(at: Instant) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

fn millis(duration: std::time::Duration) -> u64 {
    duration.as_millis() as u64
}

pub(super) fn status(snapshot: &Snapshot) -> Value {
    let config = &snapshot.config;
    json!({
        "scheduler": {
            "up_since": time(snapshot.started_at),
            "instance": snapshot.instance,
            "timezone": config.scheduler.timezone.name(),
            "config_file": config.source.display().to_string(),
            "config_hash": config.hash,
            "workers_busy": snapshot.busy,
            "max_workers": config.scheduler.max_workers,
            "queue_depth": snapshot.queued,
            "retry_waiting": snapshot.retry_waiting,
            "as_of": time(snapshot.at),
        },
        "tasks": tasks(snapshot),
    })
}

pub(super) fn tasks(snapshot: &Snapshot) -> Vec<Value> {
    snapshot
        .tasks
        .iter()
        .filter_map(|task| Some(task_summary(task, snapshot.config.task(&task.name)?)))
        .collect()
}

fn task_summary(task: &TaskSnapshot, spec: &TaskSpec) -> Value {
    json!({
        "task": task.name,
        "description": spec.description,
        "schedule": spec.schedule.as_ref().map(|s| s.expr()),
        "timezone": spec.timezone.name(),
        "handler": spec.handler.name(),
        "depends_on": spec.depends_on.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        "enabled": spec.enabled,
        "paused": task.paused,
        "next_fire": task.next_fire.map(time),
        "running": task.running.iter().map(|r| json!({
            "run_id": r.run.0, "attempt": r.attempt.0, "started_at": time(r.started_at)
        })).collect::<Vec<_>>(),
        "last_run": task.last.map(|last| json!({
            "run_id": last.run.0,
            "state": last.state.as_str(),
            "finished_at": time(last.finished_at),
            "duration_ms": last.duration.map(millis),
        })),
        "stats": {
            "runs": task.stats.runs,
            "success_rate": task.stats.success_rate,
            "p50_ms": task.stats.p50.map(millis),
            "p95_ms": task.stats.p95.map(millis),
        },
    })
}

pub(super) fn task_detail(snapshot: &Snapshot, spec: &TaskSpec, recent: &[RunRow]) -> Value {
    let mut view = snapshot
        .tasks
        .iter()
        .find(|t| t.name == spec.name.as_str())
        .map(|task| task_summary(task, spec))
        .unwrap_or_else(|| json!({ "task": spec.name.as_str() }));
    let command = match &spec.handler {
        Handler::Command(command) => json!({
            "argv": command.argv, "shell": command.shell,
            "cwd": command.cwd.as_ref().map(|c| c.display().to_string()),
            "env": command.env,
        }),
        Handler::Builtin(_) => Value::Null,
    };
    view["config"] = json!({
        "params": spec.params,
        "command": command,
        "timeout_ms": millis(spec.timeout),
        "retries": spec.retries,
        "retry_backoff": {
            "initial_ms": millis(spec.backoff.initial),
            "factor": spec.backoff.factor,
            "max_ms": millis(spec.backoff.max),
            "jitter": spec.backoff.jitter,
        },
        "dependency_max_age_ms": spec.dependency_max_age.map(millis),
        "misfire": spec.misfire.as_str(),
        "misfire_grace_ms": millis(spec.misfire_grace),
        "overlap": spec.overlap.as_str(),
    });
    view["next_fires"] = json!(spec
        .schedule
        .as_ref()
        .map(|s| s
            .upcoming(chrono::Utc::now(), 5)
            .iter()
            .map(|t| t.to_rfc3339())
            .collect::<Vec<_>>())
        .unwrap_or_default());
    view["last_runs"] = json!(recent.iter().map(run).collect::<Vec<_>>());
    view
}

pub(super) fn run_links(run: RunId) -> Value {
    json!({
        "self": format!("/scheduler/runs/{run}"),
        "log": format!("/scheduler/runs/{run}/log"),
        "abort": format!("/scheduler/runs/{run}/abort"),
        "retry": format!("/scheduler/runs/{run}/retry"),
    })
}

/// The JSON shape of a run, shared by the API and `turbosched … --json`.
pub fn run(row: &RunRow) -> Value {
    json!({
        "id": row.id.0,
        "task": row.task.as_str(),
        "trigger": row.trigger.as_str(),
        "state": row.state.as_str(),
        "scheduled_for": time(row.scheduled_for),
        "queued_at": time(row.queued_at),
        "started_at": row.started_at.map(time),
        "finished_at": row.finished_at.map(time),
        "attempts": row.attempt.0,
        "max_attempts": row.max_attempts,
        "next_attempt_at": row.next_attempt_at.map(time),
        "exit_code": row.exit_code,
        "error": row.error,
        "reason": row.reason,
        "progress": row.progress,
        "phase": row.phase,
        "result": row.result.as_deref().and_then(|r| serde_json::from_str::<Value>(r).ok()),
        "abort_requested": row.abort_requested,
        "cascade": row.cascade.map(|c| c.0),
    })
}

pub(super) fn run_detail(row: &RunRow, attempts: &[AttemptRow]) -> Value {
    let mut view = run(row);
    view["checkpoint"] = json!(row
        .checkpoint
        .as_deref()
        .and_then(|c| serde_json::from_str::<Value>(c).ok()));
    view["attempts_history"] = json!(attempts
        .iter()
        .map(|a| json!({
            "attempt": a.attempt.0,
            "started_at": time(a.started_at),
            "spawned_at": a.spawned_at.map(time),
            "finished_at": a.finished_at.map(time),
            "outcome": a.outcome,
            "exit_code": a.exit_code,
            "error": a.error,
            "pid": a.pid,
        }))
        .collect::<Vec<_>>());
    view["links"] = run_links(row.id);
    view
}

/// One server-sent event: its sequence number is the SSE id.
pub(super) fn sse_event(event: &EventRow) -> String {
    let data = json!({
        "seq": event.seq,
        "at": time(event.at),
        "kind": event.kind,
        "task": event.task,
        "run_id": event.run_id.map(|r| r.0),
        "attempt": event.attempt.map(|a| a.0),
        "message": event.message,
    });
    format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.seq, event.kind, data
    )
}
