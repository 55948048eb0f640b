//! Every JSON shape turbosched prints, the HTTP API's and the command line's: promises to
//! curl scripts, the dashboard and shell scripts. Built by hand from engine, store and
//! audit types (they serialize nothing); change them only by adding fields.
//!
//! One run has one shape ([`run`], and [`run_detail`] with its attempts and links),
//! whichever edge prints it: `turbosched show 12 --json` prints exactly what
//! `GET /scheduler/runs/12` returns. The one shape not here is the API's error envelope
//! (`{"error": {"code", "message"}}`), which lives with the API's errors.
//!
//! Invariant: builds values, decides nothing, reads nothing (no store, no files); the
//! edges (`api`, `cli.rs`) build no JSON of their own (`tests/it/boundaries.rs`).

use serde_json::{json, Map, Value};

use crate::audit::Audit;
use crate::config::{Handler, TaskSpec};
use crate::engine::{PoolSnapshot, Snapshot, TaskSnapshot};
use crate::model::{Instant, RunId, TaskName};
use crate::store::{AttemptRow, EventRow, InstanceRow, RunRow, TaskStateRow};

/// Every time in every shape: [`crate::times::json`] (RFC 3339, UTC, `+00:00`).
fn time(at: Instant) -> String {
    crate::times::json(at)
}

fn millis(duration: std::time::Duration) -> u64 {
    duration.as_millis() as u64
}

/// `GET /scheduler/status`: the scheduler and every task, from the engine's board.
pub fn status(snapshot: &Snapshot) -> Value {
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
        "pools": pools(&snapshot.pools),
        "cluster": snapshot.cluster.as_ref().map(|cluster| json!({
            "offset_ms": cluster.offset.num_milliseconds(),
            "fenced": cluster.fenced,
            "config_conflicts": cluster.conflicts.iter().map(|(task, c)| json!({
                "task": task, "here": c.ours, "cluster": c.stored,
            })).collect::<Vec<_>>(),
            "instances": cluster.instances.iter()
                .map(|(row, runs)| instance(row, runs, snapshot.at))
                .collect::<Vec<_>>(),
        })),
    })
}

/// Every configured pool's occupancy, `[{name, slots, running, waiting}]`: in
/// `GET /scheduler/status` (this instance's runs) and `turbosched status --json` (the
/// store's).
pub fn pools(pools: &[PoolSnapshot]) -> Value {
    Value::Array(
        pools
            .iter()
            .map(|p| json!({"name": p.name, "slots": p.slots, "running": p.running, "waiting": p.waiting}))
            .collect(),
    )
}

/// `GET /scheduler/tasks`: every task's summary.
pub fn task_list(snapshot: &Snapshot) -> Value {
    json!({ "tasks": tasks(snapshot) })
}

fn tasks(snapshot: &Snapshot) -> Vec<Value> {
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
        "schedule_description": spec.schedule.as_ref()
            .map(|s| crate::schedule::describe(s.expr()).unwrap_or_else(|| s.expr().to_string())),
        "timezone": spec.timezone.name(),
        "handler": spec.handler.name(),
        "depends_on": spec.depends_on.iter().map(|d| d.as_str()).collect::<Vec<_>>(),
        "enabled": spec.enabled,
        "paused": task.paused,
        "circuit_open": task.circuit_open,
        "next_fire": task.next_fire.map(time),
        "next_due": task.next_fire.map(|at| time(spec.due_at(at))),
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

/// `GET /scheduler/tasks/{task}`: a task's summary, its resolved config, its next fires
/// and its last runs.
pub fn task_detail(snapshot: &Snapshot, spec: &TaskSpec, recent: &[RunRow]) -> Value {
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
            .map(crate::times::json_of)
            .collect::<Vec<_>>())
        .unwrap_or_default());
    // The next fires as `turbosched next` lists them: each tick, when it fires (its
    // jitter added) and, for a tick its calendar skips, why.
    view["upcoming"] = json!(spec
        .upcoming(chrono::Utc::now(), 5)
        .iter()
        .map(|upcoming| json!({
            "tick": crate::times::json_of(&upcoming.tick),
            "due": crate::times::json_of(&upcoming.due),
            "skipped": upcoming.skipped,
        }))
        .collect::<Vec<_>>());
    view["last_runs"] = json!(recent.iter().map(run).collect::<Vec<_>>());
    view
}

/// Where a run's routes are.
pub fn run_links(run: RunId) -> Value {
    json!({
        "self": format!("/scheduler/runs/{run}"),
        "log": format!("/scheduler/runs/{run}/log"),
        "abort": format!("/scheduler/runs/{run}/abort"),
        "retry": format!("/scheduler/runs/{run}/retry"),
    })
}

/// The JSON shape of a run: in the API's lists and answers, in `turbosched run`, `runs`
/// and `status --json`.
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
        "force": row.force,
        "downstream": row.downstream,
        "params": row.params.as_deref().and_then(|p| serde_json::from_str::<Value>(p).ok()),
    })
}

/// Where `GET /scheduler/files` serves `path` (a file or a folder's listing).
pub fn file_href(path: &str) -> String {
    let mut href = String::from("/scheduler/files?path=");
    for byte in path.bytes() {
        match byte {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                href.push(byte as char)
            }
            other => href.push_str(&format!("%{other:02X}")),
        }
    }
    href
}

/// `GET /scheduler/files?path=<folder>`: the files of an output folder.
pub fn output_folder(path: &str, files: &[(String, u64)]) -> Value {
    let prefix = path.trim_end_matches('/');
    json!({
        "path": path,
        "files": files.iter().map(|(name, bytes)| {
            let path = format!("{prefix}/{name}");
            json!({ "name": name, "bytes": bytes, "href": file_href(&path), "path": path })
        }).collect::<Vec<_>>(),
    })
}

/// One run with its checkpoint, its attempts and its links: `GET /scheduler/runs/{id}`
/// and `turbosched show <id> --json`.
pub fn run_detail(row: &RunRow, attempts: &[AttemptRow]) -> Value {
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
    view["outputs"] = outputs(row);
    view
}

/// What a run produced (`crate::outputs`), each `{label, kind, path, href}` (`href`: where
/// `GET /scheduler/files` serves it, a folder as its listing): in a run's detail.
pub fn outputs(row: &RunRow) -> Value {
    output_views(crate::outputs::outputs_of_text(row.result.as_deref()))
}

fn output_views(outputs: Vec<crate::outputs::Output>) -> Value {
    Value::Array(
        outputs
            .into_iter()
            .map(|o| {
                let href = file_href(&o.path.to_string_lossy());
                json!({"label": o.label, "kind": o.kind.as_str(), "path": o.path, "href": href})
            })
            .collect(),
    )
}

/// One server-sent event: its sequence number is the SSE id.
pub fn sse_event(event: &EventRow) -> String {
    let data = json!({
        "seq": event.seq,
        "at": time(event.at),
        "kind": event.kind,
        "task": event.task,
        "run_id": event.run_id.map(|r| r.0),
        "attempt": event.attempt.map(|a| a.0),
        "message": event.message,
        "instance": event.instance,
    });
    format!(
        "id: {}\nevent: {}\ndata: {}\n\n",
        event.seq, event.kind, data
    )
}

/// The event an event stream opens with when the client asked to start after an event
/// beyond the newest (`requested`): its id is the newest, so an `EventSource` that
/// reconnects resumes from there.
pub fn sse_resync(requested: i64, newest: i64) -> String {
    let data = json!({
        "requested_after": requested,
        "newest": newest,
        "message": format!("event {requested} is ahead of the newest event ({newest}): resynchronised, continuing after {newest}"),
    });
    format!("id: {newest}\nevent: resync\ndata: {data}\n\n")
}

/// A page of runs, newest first: `GET /scheduler/runs`. `next_cursor` is the id to pass as
/// `cursor` for the next page (`null` on the last).
pub fn run_page(rows: &[RunRow], next_cursor: Option<RunId>) -> Value {
    json!({
        "runs": rows.iter().map(run).collect::<Vec<_>>(),
        "next_cursor": next_cursor.map(|c| c.0),
    })
}

/// A trigger accepted: the run is queued (202).
pub fn run_queued(run: RunId, task: &str, circuit: Option<&str>) -> Value {
    let mut view =
        json!({"run_id": run.0, "task": task, "state": "queued", "links": run_links(run)});
    // A manual run goes ahead while the task's circuit is open: the answer says so.
    view["circuit_open"] = json!(circuit.is_some());
    if let Some(message) = circuit {
        view["circuit"] = json!(message);
    }
    view
}

/// The body of `POST /scheduler/tasks/<task>/run` as the CLI sends it (`TriggerOptions`).
pub fn trigger_options(force: bool, downstream: bool, params: Option<Map<String, Value>>) -> Value {
    let mut body = json!({"force": force, "downstream": downstream});
    if let (Some(params), Some(object)) = (params, body.as_object_mut()) {
        object.insert("params".into(), Value::Object(params));
    }
    body
}

/// A trigger that waited for its run, which finished (200).
pub fn run_waited(row: &RunRow) -> Value {
    json!({"run_id": row.id.0, "run": run(row), "links": run_links(row.id)})
}

/// A trigger that waited as long as asked, its run still unfinished (202).
pub fn run_pending(run: RunId, task: &str) -> Value {
    json!({"run_id": run.0, "task": task, "state": "pending", "waited": true, "links": run_links(run)})
}

/// A retry queued as a new run.
pub fn run_retried(run: RunId, retry_of: RunId) -> Value {
    json!({"run_id": run.0, "retry_of": retry_of.0, "state": "queued", "links": run_links(run)})
}

/// An abort: done at once (`aborted`), or asked of a running run's engine.
pub fn run_abort(run: RunId, aborted_now: bool) -> Value {
    if aborted_now {
        json!({"run_id": run.0, "state": "aborted"})
    } else {
        json!({"run_id": run.0, "state": "running", "abort_requested": true})
    }
}

/// A task paused or resumed.
pub fn task_paused(task: &str, paused: bool) -> Value {
    json!({"task": task, "paused": paused})
}

/// The config reloaded.
pub fn reloaded(config_hash: &str) -> Value {
    json!({"reloaded": true, "config_hash": config_hash})
}

/// One component's check in `GET /health`.
pub struct HealthCheck {
    /// `store`, `clock`, `timer_loop`, `disk`, `stuck_runs`, `errors_last_hour`.
    pub name: &'static str,
    /// `ok`, `degraded` or `failed`.
    pub status: &'static str,
    /// What was seen, for people.
    pub detail: String,
}

/// `GET /health`: `healthy` | `degraded` | `unhealthy`, with each component's check.
pub fn health(status: &str, checks: &[HealthCheck]) -> Value {
    let checks: Map<String, Value> = checks
        .iter()
        .map(|check| {
            let view = json!({"status": check.status, "detail": check.detail});
            (check.name.to_string(), view)
        })
        .collect();
    json!({"status": status, "checks": checks})
}

/// `turbosched run --json` when a service took the run.
pub fn handed_to_service(run: RunId) -> Value {
    json!({"run_id": run.0, "handed_to_service": true})
}

/// `turbosched run --json` once the run (and its cascade) ended.
pub fn run_outcome(root: RunId, runs: &[RunRow]) -> Value {
    let runs: Vec<Value> = runs
        .iter()
        .map(|row| {
            let mut view = run(row);
            view["outputs"] = outputs(row);
            view
        })
        .collect();
    json!({"run_id": root.0, "runs": runs})
}

/// `turbosched runs --json`: the runs, as the API lists them.
pub fn run_list(rows: &[RunRow]) -> Value {
    Value::Array(rows.iter().map(run).collect())
}

/// A task as `turbosched status` reads it from the store (no service needed).
pub struct StoredTask<'a> {
    /// Its config.
    pub spec: &'a TaskSpec,
    /// Paused by an operator or by its circuit breaker.
    pub paused: bool,
    /// Paused by its circuit breaker (`max_consecutive_failures`).
    pub circuit_open: bool,
    /// The persisted next fire, else the schedule's next tick.
    pub next_fire: Option<Instant>,
    /// Its newest run.
    pub last: Option<RunRow>,
    /// How many of its runs are running.
    pub running: usize,
}

/// `turbosched status --json`: the live instances, every task and every pool, read from
/// the store.
pub fn stored_status(
    instances: &[(InstanceRow, Vec<RunId>)],
    tasks: &[StoredTask<'_>],
    pool_counts: &[PoolSnapshot],
    now: Instant,
) -> Value {
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|task| {
            let spec = task.spec;
            json!({
                "task": spec.name.as_str(),
                "schedule": spec.schedule.as_ref().map(|s| s.expr()),
                "timezone": spec.timezone.name(),
                "handler": spec.handler.name(),
                "enabled": spec.enabled,
                "paused": task.paused,
                "circuit_open": task.circuit_open,
                "next_fire": task.next_fire.map(time),
                "running": task.running,
                "last_run": task.last.as_ref().map(run),
            })
        })
        .collect();
    let service: Vec<Value> = instances
        .iter()
        .map(|(row, runs)| instance(row, runs, now))
        .collect();
    json!({"service": service, "tasks": tasks, "pools": pools(pool_counts)})
}

/// One live instance: where it runs, how old its lease is (since its last heartbeat), the
/// config it serves, and the runs it is running.
pub fn instance(row: &InstanceRow, runs: &[RunId], now: Instant) -> Value {
    let lease_age = (now - row.heartbeat_at).to_std().unwrap_or_default();
    json!({
        "instance": row.id,
        "pid": row.pid,
        "host": row.host,
        "api": row.api,
        "heartbeat_at": time(row.heartbeat_at),
        "lease_age_ms": millis(lease_age),
        "config_hash": row.config_hash,
        "runs": runs.iter().map(|r| r.0).collect::<Vec<_>>(),
    })
}

/// One task as the store alone knows it, for `status` with a broken config: its name,
/// stored schedule and next fire, and its latest run.
pub struct StoredOnly {
    /// The task.
    pub task: TaskName,
    /// What the store remembers of it.
    pub state: TaskStateRow,
    /// Its latest run.
    pub last: Option<RunRow>,
    /// How many of its runs are running.
    pub running: usize,
}

/// `turbosched status --json` when the config file is invalid: what the store knows,
/// with `"config_valid": false`; the zone of a task is unknown, so times are UTC.
pub fn stored_status_without_config(
    instances: &[(InstanceRow, Vec<RunId>)],
    tasks: &[StoredOnly],
    now: Instant,
) -> Value {
    let tasks: Vec<Value> = tasks
        .iter()
        .map(|task| {
            json!({
                "task": task.task.as_str(),
                "schedule": task.state.schedule,
                "paused": task.state.paused,
                "next_fire": task.state.next_fire_at.map(time),
                "running": task.running,
                "last_run": task.last.as_ref().map(run),
            })
        })
        .collect();
    let service: Vec<Value> = instances
        .iter()
        .map(|(row, runs)| instance(row, runs, now))
        .collect();
    json!({"service": service, "config_valid": false, "tasks": tasks})
}

/// `turbosched audit --json`: every scheduled task's tick accounting.
pub fn audit(since: Instant, audit: &Audit) -> Value {
    let tasks: Vec<Value> = audit
        .tasks
        .iter()
        .map(|t| {
            json!({
                "task": t.task,
                "first_tick": t.span.map(|(first, _)| time(first)),
                "last_tick": t.span.map(|(_, last)| time(last)),
                "expected": t.expected,
                "claimed": t.claimed,
                "doubled": t.doubled,
                "dropped": t.dropped,
                "uncounted": t.uncounted,
                "missing": t.missing,
                "unfinished": t.unfinished,
                "by_state": t.by_state,
                "ok": t.ok(),
            })
        })
        .collect();
    json!({"since": time(since), "ok": audit.ok(), "integrity": audit.integrity, "tasks": tasks})
}

/// The body an `[[alerts]]` endpoint receives for one event (README_SCHEDULE.md,
/// "Alerts"): the event, where to look, and a Slack-compatible `text`.
pub fn alert_envelope(alert: &str, event: &EventRow, api_base: Option<&str>) -> String {
    let link = api_base.map(|base| match event.run_id {
        Some(run) => format!("{base}/scheduler/runs/{run}"),
        None => format!("{base}/"),
    });
    let mut text = format!("[turbosched] {}", event.kind);
    if let Some(task) = &event.task {
        text.push_str(&format!(" {task}"));
    }
    if let Some(run) = event.run_id {
        text.push_str(&format!(" (run {run})"));
    }
    if !event.message.is_empty() {
        text.push_str(&format!(": {}", event.message));
    }
    if let Some(link) = &link {
        text.push_str(&format!(" {link}"));
    }
    json!({
        "version": 1,
        "alert": alert,
        "event": event.kind,
        "seq": event.seq,
        "task": event.task,
        "run_id": event.run_id.map(|r| r.0),
        "attempt": event.attempt.map(|a| a.0),
        "message": event.message,
        "instance": event.instance,
        "at": time(event.at),
        "link": link,
        "text": text,
    })
    .to_string()
}

/// `turbosched backfill --json`: the ticks of the range, each with its run or why none,
/// and (once they ended) the runs, their cascades' included.
pub fn backfill_plan(
    task: &str,
    ticks: &[crate::engine::BackfillTick],
    dry_run: bool,
    runs: &[RunRow],
) -> Value {
    json!({
        "task": task,
        "dry_run": dry_run,
        "ticks": ticks.iter().map(|t| json!({
            "tick": time(t.tick),
            "run_id": t.run.map(|r| r.0),
            "already_ran": t.already,
        })).collect::<Vec<_>>(),
        "runs": runs.iter().map(run).collect::<Vec<_>>(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_runs_outputs_carry_where_the_api_serves_them() {
        let result = json!({
            "report_dir": "reports/backtest/run_7", "chart": "reports/backtest/run_7/equity.svg",
            "shap_log": "shap logs/shap_run_7.json",
        });
        let views = output_views(crate::outputs::outputs_of(Some(&result)));
        let hrefs: Vec<(&str, &str)> = views
            .as_array()
            .unwrap()
            .iter()
            .map(|o| (o["kind"].as_str().unwrap(), o["href"].as_str().unwrap()))
            .collect();
        assert_eq!(
            hrefs,
            [
                ("folder", "/scheduler/files?path=reports/backtest/run_7"),
                (
                    "chart",
                    "/scheduler/files?path=reports/backtest/run_7/equity.svg"
                ),
                ("shap", "/scheduler/files?path=shap%20logs/shap_run_7.json"),
            ]
        );
    }

    #[test]
    fn a_file_href_escapes_what_a_query_cannot_carry() {
        assert_eq!(
            file_href("/srv/r&d/a+b#1?.svg"),
            "/scheduler/files?path=/srv/r%26d/a%2Bb%231%3F.svg"
        );
        assert_eq!(file_href("é"), "/scheduler/files?path=%C3%A9");
    }
}
