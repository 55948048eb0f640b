//! The route table and the handlers of the plain request/response routes: status, tasks,
//! triggers, runs, aborts, retries, pauses, reloads, the OpenAPI description and the
//! dashboard. Each handler parses ([`super::params`]), asks the engine or reads the store,
//! and answers with a shape from [`crate::views`].

use std::sync::Arc;
use std::time::Duration;

use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, Data};
use actix_web::{HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::config::Config;
use crate::engine::{EngineError, Snapshot};
use crate::model::{RunId, RunState};
use crate::store::{AbortOutcome, RunFilter};
use crate::views;

use super::auth::authorize;
use super::errors::{blocking, method_not_allowed, ApiError, ApiResult};
use super::files::file;
use super::health::{health, metrics};
use super::params::{parse_instant, parse_run_id, trigger_options, WaitFor};
use super::streams::{events, run_log};
use super::ApiState;

/// Every route, each refusing other methods with a JSON 405.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/scheduler/status"),
    ("POST", "/scheduler/run_{task}"),
    ("GET", "/scheduler/tasks"),
    ("GET", "/scheduler/tasks/{task}"),
    ("POST", "/scheduler/tasks/{task}/run"),
    ("POST", "/scheduler/tasks/{task}/backfill"),
    ("POST", "/scheduler/tasks/{task}/pause"),
    ("POST", "/scheduler/tasks/{task}/resume"),
    ("GET", "/scheduler/runs"),
    ("GET", "/scheduler/runs/{id}"),
    ("POST", "/scheduler/runs/{id}/abort"),
    ("POST", "/scheduler/runs/{id}/retry"),
    ("GET", "/scheduler/runs/{id}/log"),
    ("GET", "/scheduler/files"),
    ("POST", "/scheduler/reload"),
    ("GET", "/scheduler/events"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
];

pub(super) fn routes(cfg: &mut web::ServiceConfig) {
    let resource = |path: &str| web::resource(path).default_service(web::to(method_not_allowed));
    cfg.service(resource("/scheduler/status").route(web::get().to(status)))
        .service(resource("/scheduler/run_{task}").route(web::post().to(trigger)))
        .service(resource("/scheduler/tasks").route(web::get().to(tasks)))
        .service(resource("/scheduler/tasks/{task}").route(web::get().to(task_detail)))
        .service(resource("/scheduler/tasks/{task}/run").route(web::post().to(trigger)))
        .service(resource("/scheduler/tasks/{task}/backfill").route(web::post().to(backfill)))
        .service(resource("/scheduler/tasks/{task}/pause").route(web::post().to(pause)))
        .service(resource("/scheduler/tasks/{task}/resume").route(web::post().to(resume)))
        .service(resource("/scheduler/runs").route(web::get().to(runs)))
        .service(resource("/scheduler/runs/{id}").route(web::get().to(run_detail)))
        .service(resource("/scheduler/runs/{id}/abort").route(web::post().to(abort)))
        .service(resource("/scheduler/runs/{id}/retry").route(web::post().to(retry)))
        .service(resource("/scheduler/runs/{id}/log").route(web::get().to(run_log)))
        .service(resource("/scheduler/files").route(web::get().to(file)))
        .service(resource("/scheduler/reload").route(web::post().to(reload)))
        .service(resource("/scheduler/events").route(web::get().to(events)))
        .service(resource("/health").route(web::get().to(health)))
        .service(resource("/metrics").route(web::get().to(metrics)))
        .service(resource("/openapi.json").route(web::get().to(openapi)))
        .service(resource("/").route(web::get().to(dashboard)));
}

pub(super) fn snapshot(state: &ApiState) -> Result<Arc<Snapshot>, ApiError> {
    state.board.snapshot().ok_or_else(|| {
        ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            "starting",
            "the scheduler is starting",
        )
    })
}

async fn status(state: Data<ApiState>) -> ApiResult {
    let snapshot = snapshot(&state)?;
    let body = {
        let mut cache = state.status_cache.lock().unwrap_or_else(|p| p.into_inner());
        match &*cache {
            Some((version, body)) if *version == snapshot.version => body.clone(),
            _ => {
                let body = Bytes::from(views::status(&snapshot).to_string());
                *cache = Some((snapshot.version, body.clone()));
                body
            }
        }
    };
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(body))
}

async fn trigger(
    request: HttpRequest,
    task: web::Path<String>,
    body: Bytes,
    state: Data<ApiState>,
) -> ApiResult {
    authorize(&request, &state)?;
    let options = trigger_options(&request, &body)?;
    let run = state
        .handle
        .trigger(
            &task,
            options.force.unwrap_or(false),
            options.downstream.unwrap_or(false),
            options.params.map(crate::config::RunParams),
        )
        .await?;
    let Some(limit) = options.wait.and_then(WaitFor::limit) else {
        let store = state.store.clone();
        let name = task.to_string();
        // Read after the run is queued; a failed read only leaves the note out.
        let circuit = blocking(move || crate::engine::open_circuit(&store, &name))
            .await
            .ok()
            .flatten()
            .map(|opened| opened.message);
        return Ok(HttpResponse::Accepted().json(views::run_queued(
            run,
            &task,
            circuit.as_deref(),
        )));
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let store = state.store.clone();
        let row = blocking(move || store.run(run)).await?;
        if let Some(row) = row.filter(|r| r.state.is_terminal()) {
            return Ok(HttpResponse::Ok().json(views::run_waited(&row)));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(HttpResponse::Accepted().json(views::run_pending(run, &task)));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn tasks(state: Data<ApiState>) -> ApiResult {
    let snapshot = snapshot(&state)?;
    Ok(HttpResponse::Ok().json(views::task_list(&snapshot)))
}

async fn task_detail(task: web::Path<String>, state: Data<ApiState>) -> ApiResult {
    let snapshot = snapshot(&state)?;
    let config: &Config = &snapshot.config;
    let Some(spec) = config.task(&task) else {
        return Err(EngineError::UnknownTask {
            task: task.to_string(),
            known: config.task_names().join(", "),
        }
        .into());
    };
    let store = state.store.clone();
    let filter = RunFilter {
        task: Some(task.to_string()),
        limit: 10,
        ..RunFilter::default()
    };
    let recent = blocking(move || store.runs(&filter)).await?;
    Ok(HttpResponse::Ok().json(views::task_detail(&snapshot, spec, &recent)))
}

async fn backfill(
    request: HttpRequest,
    task: web::Path<String>,
    body: Bytes,
    state: Data<ApiState>,
) -> ApiResult {
    authorize(&request, &state)?;
    let options = super::params::backfill_options(&body)?;
    let plan = state
        .handle
        .backfill(
            &task,
            &options.from,
            &options.to,
            options.downstream,
            options.dry_run,
        )
        .await?;
    let answer = views::backfill_plan(&task, &plan, options.dry_run, &[]);
    Ok(if options.dry_run {
        HttpResponse::Ok().json(answer)
    } else {
        HttpResponse::Accepted().json(answer)
    })
}

async fn pause(request: HttpRequest, task: web::Path<String>, state: Data<ApiState>) -> ApiResult {
    set_paused(request, task, state, true).await
}

async fn resume(request: HttpRequest, task: web::Path<String>, state: Data<ApiState>) -> ApiResult {
    set_paused(request, task, state, false).await
}

async fn set_paused(
    request: HttpRequest,
    task: web::Path<String>,
    state: Data<ApiState>,
    paused: bool,
) -> ApiResult {
    authorize(&request, &state)?;
    state.handle.pause(&task, paused).await?;
    Ok(HttpResponse::Ok().json(views::task_paused(&task, paused)))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    task: Option<String>,
    state: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
    cascade: Option<String>,
}

async fn runs(query: web::Query<RunsQuery>, state: Data<ApiState>) -> ApiResult {
    let query = query.into_inner();
    if let Some(text) = &query.cascade {
        return cascade_runs(text, &query, &state).await;
    }
    let run_state = match &query.state {
        Some(text) => Some(RunState::parse(text).ok_or_else(|| {
            ApiError::bad_request(
                "bad_query",
                format!(
                    "state: expected one of {}, found {text:?}",
                    RunState::names()
                ),
            )
        })?),
        None => None,
    };
    let limit = match &query.limit {
        None => 50,
        Some(text) => text
            .parse::<usize>()
            .ok()
            .filter(|n| (1..=1000).contains(n))
            .ok_or_else(|| {
                ApiError::bad_request(
                    "bad_query",
                    format!("limit: expected 1 to 1000, found {text:?}"),
                )
            })?,
    };
    let since = match &query.since {
        None => None,
        Some(text) => Some(parse_instant(text).ok_or_else(|| {
            ApiError::bad_request(
                "bad_query",
                format!(
                    "since: expected an RFC 3339 time such as 2026-11-22T16:00:00Z, found {text:?}"
                ),
            )
        })?),
    };
    let before = match &query.cursor {
        None => None,
        Some(text) => Some(RunId(
            text.parse::<i64>().ok().filter(|n| *n > 0).ok_or_else(|| {
                ApiError::bad_request(
                    "bad_query",
                    format!("cursor: expected a run id, found {text:?}"),
                )
            })?,
        )),
    };
    let filter = RunFilter {
        task: query.task.clone(),
        state: run_state,
        before,
        since,
        limit,
    };
    let store = state.store.clone();
    let rows = blocking(move || store.runs(&filter)).await?;
    let next_cursor = (rows.len() == limit)
        .then(|| rows.last().map(|r| r.id))
        .flatten();
    Ok(HttpResponse::Ok().json(views::run_page(&rows, next_cursor)))
}

/// `?cascade=<root>`: the root run of a `--downstream` cascade and every run of it, oldest
/// first, in one page; no other filter applies.
async fn cascade_runs(text: &str, query: &RunsQuery, state: &ApiState) -> ApiResult {
    let root = parse_run_id(text).map_err(|_| {
        ApiError::bad_request(
            "bad_query",
            format!("cascade: expected the root run's id, found {text:?}"),
        )
    })?;
    let other = [
        ("task", &query.task),
        ("state", &query.state),
        ("since", &query.since),
        ("limit", &query.limit),
        ("cursor", &query.cursor),
    ];
    if let Some((name, _)) = other.iter().find(|(_, value)| value.is_some()) {
        return Err(ApiError::bad_request(
            "bad_query",
            format!("cascade: lists a whole cascade, and takes no {name}"),
        ));
    }
    let store = state.store.clone();
    let rows = blocking(move || {
        let mut rows: Vec<_> = store.run(root)?.into_iter().collect();
        rows.extend(
            store
                .cascade_runs(root)?
                .into_iter()
                .filter(|r| r.id != root),
        );
        Ok(rows)
    })
    .await?;
    if rows.is_empty() {
        return Err(EngineError::RunNotFound(root).into());
    }
    Ok(HttpResponse::Ok().json(views::run_page(&rows, None)))
}

async fn run_detail(id: web::Path<String>, state: Data<ApiState>) -> ApiResult {
    let run = parse_run_id(&id)?;
    let store = state.store.clone();
    let (row, attempts) = blocking(move || Ok((store.run(run)?, store.attempts(run)?))).await?;
    let row = row.ok_or_else(|| ApiError::from(EngineError::RunNotFound(run)))?;
    Ok(HttpResponse::Ok().json(views::run_detail(&row, &attempts)))
}

async fn abort(request: HttpRequest, id: web::Path<String>, state: Data<ApiState>) -> ApiResult {
    authorize(&request, &state)?;
    let run = parse_run_id(&id)?;
    let store = state.store.clone();
    if blocking(move || store.run(run)).await?.is_none() {
        return Err(EngineError::RunNotFound(run).into());
    }
    match state.handle.abort(run).await? {
        AbortOutcome::AbortedNow => Ok(HttpResponse::Ok().json(views::run_abort(run, true))),
        AbortOutcome::Requested => Ok(HttpResponse::Accepted().json(views::run_abort(run, false))),
        AbortOutcome::AlreadyFinished(finished) => Err(ApiError::new(
            StatusCode::CONFLICT,
            "already_finished",
            format!("run {run} already finished: {finished}"),
        )),
    }
}

async fn retry(request: HttpRequest, id: web::Path<String>, state: Data<ApiState>) -> ApiResult {
    authorize(&request, &state)?;
    let old = parse_run_id(&id)?;
    let run = state.handle.retry(old).await?;
    Ok(HttpResponse::Accepted().json(views::run_retried(run, old)))
}

async fn reload(request: HttpRequest, state: Data<ApiState>) -> ApiResult {
    authorize(&request, &state)?;
    let hash = state.handle.reload().await?;
    Ok(HttpResponse::Ok().json(views::reloaded(&hash)))
}

/// The OpenAPI description of every route.
pub const OPENAPI: &str = include_str!("openapi.json");

/// The dashboard: one static page, embedded in the binary, fed by the routes above and
/// the event stream.
const DASHBOARD: &str = include_str!("dashboard.html");

async fn dashboard() -> ApiResult {
    Ok(HttpResponse::Ok()
        .content_type("text/html; charset=utf-8")
        .body(DASHBOARD))
}

async fn openapi() -> ApiResult {
    Ok(HttpResponse::Ok()
        .content_type("application/json")
        .body(OPENAPI))
}
