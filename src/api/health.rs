//! `/health` (each component's check, 503 when one failed) and `/metrics` (Prometheus).

use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::web::{self, Data};
use actix_web::HttpResponse;

use crate::views::{self, HealthCheck};

use super::errors::{ApiError, ApiResult};
use super::ApiState;

/// `healthy` | `degraded` | `unhealthy`, with each component's check; 503 when unhealthy.
pub(super) async fn health(state: Data<ApiState>) -> ApiResult {
    let snapshot = state.board.snapshot();
    // The engine's clock: database time in cluster mode.
    let now = snapshot
        .as_ref()
        .map_or_else(chrono::Utc::now, |snapshot| snapshot.engine_now());
    let store = state.store.clone();
    let (probe, errors) = web::block(move || {
        let probe = store.probe_write(Duration::from_secs(1), now);
        let errors = store.count_events(
            &["run_failed", "run_timed_out", "run_orphaned"],
            now - chrono::Duration::hours(1),
        );
        (probe, errors)
    })
    .await
    .map_err(ApiError::internal)?;
    let mut checks = Vec::new();
    let mut worst = 0u8;
    let mut check = |name: &'static str, level: u8, detail: String| {
        worst = worst.max(level);
        let status = ["ok", "degraded", "failed"][usize::from(level)];
        checks.push(HealthCheck {
            name,
            status,
            detail,
        });
    };
    let fault = snapshot.as_ref().and_then(|s| s.store_fault.as_ref());
    match (probe, fault) {
        (Err(err), _) => check("store", 2, format!("not writable within 1s: {err}")),
        (Ok(()), Some(fault)) => check(
            "store",
            2,
            format!(
                "refusing the engine's writes since {} ({}): {}",
                fault.since.to_rfc3339(),
                fault.doing,
                fault.error
            ),
        ),
        (Ok(()), None) => check("store", 0, "writable (a probe write committed)".into()),
    }
    match snapshot.as_ref().and_then(|s| s.clock_step.as_ref()) {
        Some(step) if step.repeating(now) => check(
            "clock",
            1,
            format!(
                "{}: ticks already claimed up to {} are not run again",
                step.describe(),
                step.until.to_rfc3339()
            ),
        ),
        Some(step) => check("clock", 0, format!("last step: {}", step.describe())),
        None => check("clock", 0, "no step of the wall clock seen".into()),
    }
    if let Some(snapshot) = &snapshot {
        match &snapshot.reload_failure {
            Some(failure) => check(
                "config",
                1,
                format!(
                    "the file on disk failed to reload at {} and is not what runs (still sha256 {}): {}",
                    failure.at.to_rfc3339(),
                    snapshot.config.hash,
                    failure.error.lines().next().unwrap_or("")
                ),
            ),
            None => check(
                "config",
                0,
                format!("running sha256 {}", snapshot.config.hash),
            ),
        }
    }
    if let Some(cluster) = snapshot.as_ref().and_then(|s| s.cluster.as_ref()) {
        let offset = format!(
            "this host's clock is {} ms {} the database's",
            cluster.offset.num_milliseconds().abs(),
            if cluster.offset < chrono::TimeDelta::zero() {
                "behind"
            } else {
                "ahead of"
            }
        );
        if cluster.fenced {
            check(
                "cluster",
                2,
                "fenced: the lease could not be renewed; no runs are claimed or started here"
                    .into(),
            );
        } else if !cluster.conflicts.is_empty() {
            let tasks: Vec<String> = cluster
                .conflicts
                .iter()
                .map(|(task, c)| format!("{task} (here \"{}\", cluster \"{}\")", c.ours, c.stored))
                .collect();
            check(
                "cluster",
                1,
                format!(
                    "config differs from the cluster's, not firing: {}",
                    tasks.join(", ")
                ),
            );
        } else if cluster.offset_too_large() {
            check(
                "cluster",
                1,
                format!("{offset} (more than 1 s): fix the host's time sync"),
            );
        } else {
            check("cluster", 0, format!("lease held; {offset}"));
        }
    }
    match &snapshot {
        None => check("timer_loop", 2, "the engine has not started".into()),
        Some(snapshot) => {
            let age = (now - snapshot.at).to_std().unwrap_or_default();
            let limit = snapshot.config.scheduler.heartbeat_interval * 3 + Duration::from_secs(2);
            let detail = format!("last loop {} ms ago", age.as_millis());
            check("timer_loop", if age > limit { 2 } else { 0 }, detail);
        }
    }
    if let Some(snapshot) = &snapshot {
        match nix::sys::statvfs::statvfs(snapshot.config.scheduler.log_dir.as_path())
            .or_else(|_| nix::sys::statvfs::statvfs("."))
        {
            Ok(stats) => {
                let free = stats.blocks_available() * stats.fragment_size();
                let total = (stats.blocks() * stats.fragment_size()).max(1);
                let share = free as f64 / total as f64;
                let level = if share < 0.01 || free < 50 << 20 {
                    2
                } else if share < 0.05 || free < 500 << 20 {
                    1
                } else {
                    0
                };
                check(
                    "disk",
                    level,
                    format!(
                        "{} MiB free in the log folder ({:.1}%)",
                        free >> 20,
                        share * 100.0
                    ),
                );
            }
            Err(err) => check("disk", 1, format!("cannot read free space: {err}")),
        }
        let stuck: Vec<String> = snapshot
            .tasks
            .iter()
            .flat_map(|task| task.running.iter().map(move |r| (task, r)))
            .filter_map(|(task, running)| {
                let spec = snapshot.config.task(&task.name)?;
                let limit = spec.timeout
                    + snapshot.config.scheduler.kill_grace
                    + snapshot.config.scheduler.heartbeat_timeout;
                let age = (now - running.started_at).to_std().ok()?;
                (age > limit).then(|| {
                    format!(
                        "run {} of {} has run {}s, past its timeout",
                        running.run,
                        task.name,
                        age.as_secs()
                    )
                })
            })
            .collect();
        if stuck.is_empty() {
            check("stuck_runs", 0, "none".into());
        } else {
            check("stuck_runs", 1, stuck.join("; "));
        }
    }
    match errors {
        Ok(0) => check(
            "errors_last_hour",
            0,
            "no failed, timed-out or orphaned run".into(),
        ),
        Ok(count) => check(
            "errors_last_hour",
            1,
            format!("{count} failed, timed-out or orphaned run(s) in the last hour"),
        ),
        Err(err) => check("errors_last_hour", 1, format!("cannot count: {err}")),
    }
    let status = ["healthy", "degraded", "unhealthy"][usize::from(worst)];
    let code = if worst == 2 {
        StatusCode::SERVICE_UNAVAILABLE
    } else {
        StatusCode::OK
    };
    Ok(HttpResponse::build(code).json(views::health(status, &checks)))
}

pub(super) async fn metrics(state: Data<ApiState>) -> ApiResult {
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render()))
}
