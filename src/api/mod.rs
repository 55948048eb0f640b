//! The HTTP API: a thin skin over [`engine::Handle`], the engine's [`Board`] and the
//! store's read queries.
//!
//! `turbosched serve` runs it in the same process as the engine, on actix-web's own worker
//! threads; the engine stays on the main tokio runtime. Every route's JSON shape is built
//! here, by hand, from the engine's and store's types (they serialize nothing). Errors
//! always read `{"error": {"code", "message"}}`; bad input is a 4xx, never a 5xx.
//!
//! Invariants: no scheduling decision is taken here (triggers, aborts, pauses, reloads and
//! retries are engine commands); no database crate and no SQL (reads go through
//! [`Store`]); `GET /scheduler/status` is served from the board, cached per board version,
//! never from a scan of the history.

mod guard;
mod views;

pub use views::run as run_view;

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::{BoxBody, MessageBody};
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::web::{self, Bytes, Data};
use actix_web::{App, HttpMessage, HttpRequest, HttpResponse, ResponseError};
use serde::Deserialize;
use serde_json::{json, Value};
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::config::Config;
use crate::engine::{Board, EngineError, Handle, Metrics};
use crate::model::{Instant, RunId, RunState};
use crate::store::{AbortOutcome, RunFilter, Store};

/// Everything the handlers share.
#[derive(Clone)]
pub struct ApiState {
    handle: Handle,
    board: Arc<Board>,
    metrics: Arc<Metrics>,
    store: Store,
    token_digest: Option<[u8; 32]>,
    status_cache: Arc<Mutex<Option<(u64, Bytes)>>>,
}

impl ApiState {
    /// `store` should be a connection of its own (reads must not queue behind the engine).
    pub fn new(
        handle: Handle,
        board: Arc<Board>,
        metrics: Arc<Metrics>,
        store: Store,
        token: Option<String>,
    ) -> ApiState {
        ApiState {
            handle,
            board,
            metrics,
            store,
            token_digest: token.map(|t| Sha256::digest(t.as_bytes()).into()),
            status_cache: Arc::new(Mutex::new(None)),
        }
    }
}

/// Refuses to serve a non-loopback address without a token.
pub fn check_bind(bind: &str, token_env: &str, has_token: bool) -> Result<(), String> {
    let address: SocketAddr = bind.parse().map_err(|_| {
        format!("[api] bind: expected an address such as \"127.0.0.1:5000\", found {bind:?}")
    })?;
    if !address.ip().is_loopback() && !has_token {
        return Err(format!(
            "refusing to serve the API on {bind} without a token: set {token_env} (named by [api] token_env), \
             or bind to 127.0.0.1"
        ));
    }
    Ok(())
}

/// The API token from the variable named by `[api] token_env` (`value`, as read from the
/// environment). Unset means no token. Set but empty, with surrounding or inner whitespace,
/// or not printable ASCII is refused: an empty token would silently turn auth off, and a
/// token no `Authorization: Bearer <token>` header can carry would lock every client out.
pub fn token_from_env(
    token_env: &str,
    value: Option<std::ffi::OsString>,
) -> Result<Option<String>, String> {
    let Some(value) = value else {
        return Ok(None);
    };
    let problem = match value.to_str() {
        None => "is not valid UTF-8",
        Some(text) if text.trim().is_empty() => "is set but empty",
        Some(text) if text.chars().any(char::is_whitespace) => "contains whitespace",
        Some(text) if !text.bytes().all(|b| b.is_ascii_graphic()) => {
            "holds characters other than printable ASCII"
        }
        Some(text) => return Ok(Some(text.to_string())),
    };
    Err(format!(
        "{token_env} (named by [api] token_env) {problem}: set it to a token of printable \
         ASCII without spaces (such as the output of `openssl rand -hex 32`), or unset it to \
         serve on loopback without auth"
    ))
}

/// Binds `bind` and returns the server (not yet running) and the address it listens on.
///
/// The server is put together by hand rather than with `HttpServer`, so that each
/// connection goes through [`guard`] before actix's HTTP/1 codec: one request per
/// connection (no keep-alive), its head checked against the API's limits.
pub fn start(state: ApiState, bind: &str) -> std::io::Result<(actix_web::dev::Server, SocketAddr)> {
    use actix_service::{map_config, ServiceFactoryExt};
    use actix_web::dev::{fn_service, AppConfig};

    let data = Data::new(state);
    let listener = std::net::TcpListener::bind(bind)?;
    let address = listener.local_addr()?;
    let server = actix_web::dev::Server::build()
        .workers(2)
        .disable_signals()
        // Backstop: streams end when the engine stops (see `EventCursor`); anything still
        // open after this is closed.
        .shutdown_timeout(3)
        .listen("turbosched-api", listener, move || {
            let http = actix_http::HttpService::build()
                .keep_alive(actix_http::KeepAlive::Disabled)
                // The guard times out slow heads itself, with a JSON 408.
                .client_request_timeout(Duration::ZERO)
                .local_addr(address)
                .h1(map_config(app(data.clone()), |()| AppConfig::default()));
            fn_service(|io: actix_web::rt::net::TcpStream| async move {
                let peer = io.peer_addr().ok();
                Ok((guard::Guarded::new(io), peer))
            })
            .and_then(http)
        })?
        .run();
    Ok((server, address))
}

/// The application: routes, extractor limits and the JSON error shape.
fn app(
    data: Data<ApiState>,
) -> App<
    impl actix_web::dev::ServiceFactory<
        ServiceRequest,
        Config = (),
        Response = ServiceResponse<impl MessageBody>,
        Error = actix_web::Error,
        InitError = (),
    >,
> {
    App::new()
        .app_data(data)
        .app_data(
            web::JsonConfig::default()
                .limit(MAX_BODY)
                .error_handler(|err, _| {
                    let status = match err {
                        actix_web::error::JsonPayloadError::Overflow { .. }
                        | actix_web::error::JsonPayloadError::OverflowKnownLength { .. } => {
                            StatusCode::PAYLOAD_TOO_LARGE
                        }
                        _ => StatusCode::BAD_REQUEST,
                    };
                    ApiError::new(status, "bad_body", format!("request body: {err}")).into()
                }),
        )
        .app_data(web::QueryConfig::default().error_handler(|err, _| {
            ApiError::bad_request("bad_query", format!("query string: {err}")).into()
        }))
        .app_data(web::PayloadConfig::default().limit(MAX_BODY))
        .wrap(actix_web::middleware::from_fn(bounded_body))
        .wrap(actix_web::middleware::ErrorHandlers::new().default_handler(json_errors))
        .configure(routes)
        .default_service(web::to(not_found))
}

/// The most a request body may hold, on every route (413 beyond).
const MAX_BODY: usize = 64 * 1024;

fn payload_too_large() -> ApiError {
    ApiError::new(
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
        format!("request body larger than 64 KiB ({MAX_BODY} bytes)"),
    )
}

/// Bounds every request's body, whether or not its route reads one: a declared length over
/// [`MAX_BODY`] is refused unread; any other body (chunked included) is read here up to the
/// limit and handed on in memory, so no route can be made to take more.
async fn bounded_body(
    mut request: ServiceRequest,
    next: Next<impl MessageBody + 'static>,
) -> Result<ServiceResponse<impl MessageBody>, actix_web::Error> {
    use futures_util::StreamExt;
    let declared = request
        .headers()
        .get(header::CONTENT_LENGTH)
        .and_then(|value| value.to_str().ok())
        .and_then(|value| value.parse::<u64>().ok());
    if declared.is_some_and(|length| length > MAX_BODY as u64) {
        let response = payload_too_large().error_response();
        return Ok(request.into_response(response).map_into_right_body());
    }
    let mut payload = request.take_payload();
    let mut body = web::BytesMut::new();
    while let Some(chunk) = payload.next().await {
        let refused = match chunk {
            Ok(chunk) if body.len() + chunk.len() <= MAX_BODY => {
                body.extend_from_slice(&chunk);
                continue;
            }
            Ok(_) => payload_too_large(),
            Err(err) => ApiError::bad_request("bad_body", format!("request body: {err}")),
        };
        return Ok(request
            .into_response(refused.error_response())
            .map_into_right_body());
    }
    request.set_payload(actix_web::dev::Payload::from(body.freeze()));
    Ok(next.call(request).await?.map_into_left_body())
}

/// Every route, each refusing other methods with a JSON 405.
pub const ROUTES: &[(&str, &str)] = &[
    ("GET", "/scheduler/status"),
    ("POST", "/scheduler/run_{task}"),
    ("GET", "/scheduler/tasks"),
    ("GET", "/scheduler/tasks/{task}"),
    ("POST", "/scheduler/tasks/{task}/run"),
    ("POST", "/scheduler/tasks/{task}/pause"),
    ("POST", "/scheduler/tasks/{task}/resume"),
    ("GET", "/scheduler/runs"),
    ("GET", "/scheduler/runs/{id}"),
    ("POST", "/scheduler/runs/{id}/abort"),
    ("POST", "/scheduler/runs/{id}/retry"),
    ("GET", "/scheduler/runs/{id}/log"),
    ("POST", "/scheduler/reload"),
    ("GET", "/scheduler/events"),
    ("GET", "/health"),
    ("GET", "/metrics"),
    ("GET", "/openapi.json"),
    ("GET", "/"),
];

fn routes(cfg: &mut web::ServiceConfig) {
    let resource = |path: &str| web::resource(path).default_service(web::to(method_not_allowed));
    cfg.service(resource("/scheduler/status").route(web::get().to(status)))
        .service(resource("/scheduler/run_{task}").route(web::post().to(trigger)))
        .service(resource("/scheduler/tasks").route(web::get().to(tasks)))
        .service(resource("/scheduler/tasks/{task}").route(web::get().to(task_detail)))
        .service(resource("/scheduler/tasks/{task}/run").route(web::post().to(trigger)))
        .service(resource("/scheduler/tasks/{task}/pause").route(web::post().to(pause)))
        .service(resource("/scheduler/tasks/{task}/resume").route(web::post().to(resume)))
        .service(resource("/scheduler/runs").route(web::get().to(runs)))
        .service(resource("/scheduler/runs/{id}").route(web::get().to(run_detail)))
        .service(resource("/scheduler/runs/{id}/abort").route(web::post().to(abort)))
        .service(resource("/scheduler/runs/{id}/retry").route(web::post().to(retry)))
        .service(resource("/scheduler/runs/{id}/log").route(web::get().to(run_log)))
        .service(resource("/scheduler/reload").route(web::post().to(reload)))
        .service(resource("/scheduler/events").route(web::get().to(events)))
        .service(resource("/health").route(web::get().to(health)))
        .service(resource("/metrics").route(web::get().to(metrics)))
        .service(resource("/openapi.json").route(web::get().to(openapi)))
        .service(resource("/").route(web::get().to(dashboard)));
}

/// The one error shape: `{"error": {"code", "message"}}`, plus `details` for config errors.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    fn new(status: StatusCode, code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A store error: 503 `store_unavailable` when the database cannot take the operation
    /// (full disk, I/O error, read-only), so a client knows to try again; else 500.
    fn store(err: crate::store::StoreError) -> ApiError {
        if err.is_unavailable() {
            ApiError::new(
                StatusCode::SERVICE_UNAVAILABLE,
                "store_unavailable",
                format!("the run database cannot be written now: {err}"),
            )
        } else {
            ApiError::internal(err)
        }
    }

    fn internal(message: impl std::fmt::Display) -> ApiError {
        ApiError::new(
            StatusCode::INTERNAL_SERVER_ERROR,
            "internal",
            message.to_string(),
        )
    }
}

impl std::fmt::Display for ApiError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl ResponseError for ApiError {
    fn status_code(&self) -> StatusCode {
        self.status
    }

    fn error_response(&self) -> HttpResponse<BoxBody> {
        let mut error = json!({ "code": self.code, "message": self.message });
        if let Some(details) = &self.details {
            error["details"] = details.clone();
        }
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(json!({ "error": error }))
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> ApiError {
        let message = err.to_string();
        match err {
            EngineError::UnknownTask { .. } => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_task", message)
            }
            EngineError::RunNotFound(_) => {
                ApiError::new(StatusCode::NOT_FOUND, "unknown_run", message)
            }
            EngineError::Overlap { .. } => ApiError::new(StatusCode::CONFLICT, "overlap", message),
            EngineError::NotRetryable { .. } => {
                ApiError::new(StatusCode::CONFLICT, "not_finished", message)
            }
            EngineError::Config(errors) => {
                let details: Vec<Value> = errors
                    .0
                    .iter()
                    .map(|e| {
                        json!({"file": e.file.display().to_string(), "line": e.line, "column": e.column, "key": e.key, "message": e.message})
                    })
                    .collect();
                ApiError {
                    status: StatusCode::UNPROCESSABLE_ENTITY,
                    code: "invalid_config",
                    message: format!(
                        "config not reloaded, the running config is kept: {} error(s)",
                        errors.0.len()
                    ),
                    details: Some(Value::Array(details)),
                }
            }
            EngineError::Stopped => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, "stopping", message)
            }
            EngineError::Store(err) => ApiError::store(err),
        }
    }
}

type ApiResult = Result<HttpResponse, ApiError>;

/// Runs blocking store work off the actix worker thread.
async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(work)
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::store)
}

/// Mutating routes need `Authorization: Bearer <token>` when a token is configured: the
/// scheme in any case (RFC 6750), exactly one space, then the token with no whitespace.
/// Anything else is 401; a well-formed but wrong token is 403.
fn authorize(request: &HttpRequest, state: &ApiState) -> Result<(), ApiError> {
    let Some(expected) = &state.token_digest else {
        return Ok(());
    };
    let unauthorized = |message: &str| {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            message.to_string(),
        )
    };
    let value = request
        .headers()
        .get(header::AUTHORIZATION)
        .ok_or_else(|| unauthorized("this route needs Authorization: Bearer <token>"))?;
    let given = bearer_token(value.as_bytes()).ok_or_else(|| {
        unauthorized("expected Authorization: Bearer <token> (one space, no other whitespace)")
    })?;
    let digest: [u8; 32] = Sha256::digest(given).into();
    if bool::from(digest.ct_eq(expected)) {
        Ok(())
    } else {
        Err(ApiError::new(
            StatusCode::FORBIDDEN,
            "forbidden",
            "the token is not valid",
        ))
    }
}

/// The token of `Bearer <token>`: scheme case-insensitive, one space, a token of printable
/// ASCII without whitespace.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let (scheme, token) = value.split_at_checked(7)?;
    (scheme.eq_ignore_ascii_case(b"bearer ")
        && !token.is_empty()
        && token.iter().all(u8::is_ascii_graphic))
    .then_some(token)
}

fn snapshot(state: &ApiState) -> Result<Arc<crate::engine::Snapshot>, ApiError> {
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

#[derive(Clone, Copy)]
enum WaitFor {
    Flag(bool),
    Seconds(u64),
}

impl WaitFor {
    /// The longest wait a caller may ask for, in seconds.
    const MAX_SECONDS: u64 = 3600;

    fn limit(self) -> Option<Duration> {
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

fn parse_flag(key: &str, value: &str) -> Result<bool, ApiError> {
    flag_value(value).ok_or_else(|| {
        ApiError::bad_request(
            "bad_query",
            format!("{key}: expected true, false, 1, 0, yes or no, found {value:?}"),
        )
    })
}

/// What a trigger asks for, from its query and body.
#[derive(Default)]
struct Trigger {
    force: Option<bool>,
    downstream: Option<bool>,
    wait: Option<WaitFor>,
}

/// Query `?force=1&downstream=true&wait=30` and/or a JSON body with the same keys.
fn trigger_options(request: &HttpRequest, body: &Bytes) -> Result<Trigger, ApiError> {
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
    if !body.iter().all(u8::is_ascii_whitespace) {
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
                (other, _) => {
                    return Err(bad(format!(
                        "unknown field {other:?} (known: force, downstream, wait)"
                    )))
                }
            }
        }
    }
    Ok(options)
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
        )
        .await?;
    let links = views::run_links(run);
    let Some(limit) = options.wait.and_then(WaitFor::limit) else {
        return Ok(HttpResponse::Accepted().json(
            json!({"run_id": run.0, "task": task.as_str(), "state": "queued", "links": links}),
        ));
    };
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        let store = state.store.clone();
        let row = blocking(move || store.run(run)).await?;
        if let Some(row) = row.filter(|r| r.state.is_terminal()) {
            return Ok(HttpResponse::Ok()
                .json(json!({"run_id": run.0, "run": views::run(&row), "links": links})));
        }
        if tokio::time::Instant::now() >= deadline {
            return Ok(HttpResponse::Accepted().json(json!({"run_id": run.0, "task": task.as_str(), "state": "pending", "waited": true, "links": links})));
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

async fn tasks(state: Data<ApiState>) -> ApiResult {
    let snapshot = snapshot(&state)?;
    Ok(HttpResponse::Ok().json(json!({ "tasks": views::tasks(&snapshot) })))
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
    Ok(HttpResponse::Ok().json(json!({"task": task.as_str(), "paused": paused})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RunsQuery {
    task: Option<String>,
    state: Option<String>,
    since: Option<String>,
    limit: Option<String>,
    cursor: Option<String>,
}

async fn runs(query: web::Query<RunsQuery>, state: Data<ApiState>) -> ApiResult {
    let query = query.into_inner();
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
        .then(|| rows.last().map(|r| r.id.0))
        .flatten();
    Ok(HttpResponse::Ok().json(json!({
        "runs": rows.iter().map(views::run).collect::<Vec<_>>(),
        "next_cursor": next_cursor,
    })))
}

fn parse_instant(text: &str) -> Option<Instant> {
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

fn parse_run_id(text: &str) -> Result<RunId, ApiError> {
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
        AbortOutcome::AbortedNow => {
            Ok(HttpResponse::Ok().json(json!({"run_id": run.0, "state": "aborted"})))
        }
        AbortOutcome::Requested => Ok(HttpResponse::Accepted()
            .json(json!({"run_id": run.0, "state": "running", "abort_requested": true}))),
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
    Ok(HttpResponse::Accepted().json(json!({"run_id": run.0, "retry_of": old.0, "state": "queued", "links": views::run_links(run)})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct LogQuery {
    follow: Option<String>,
}

async fn run_log(
    id: web::Path<String>,
    query: web::Query<LogQuery>,
    state: Data<ApiState>,
) -> ApiResult {
    let run = parse_run_id(&id)?;
    let follow = match query.follow.as_deref() {
        None => false,
        Some(value) => parse_flag("follow", value)?,
    };
    let snapshot = snapshot(&state)?;
    let store = state.store.clone();
    let row = blocking(move || store.run(run))
        .await?
        .ok_or_else(|| ApiError::from(EngineError::RunNotFound(run)))?;
    let log_dir = snapshot.config.scheduler.log_dir.clone();
    let archive_dir = snapshot.config.logging.archive_dir.clone();
    let name = crate::tasklog::task_log_name(row.task.as_str());
    let marker = format!(" run={run} ");
    // Where following starts, taken before reading: a line appended while we read is then
    // read twice rather than never, and the follower drops the repeat (lines carry µs
    // timestamps, so equal text is the same line).
    let current = log_dir.join(&name);
    let start = std::fs::metadata(&current).map(|m| m.len()).unwrap_or(0);
    let lines = {
        let (log_dir, name, marker) = (log_dir.clone(), name.clone(), marker.clone());
        web::block(move || {
            crate::tasklog::read_lines(&log_dir, Some(&archive_dir), &name, &|l: &str| {
                l.contains(&marker)
            })
        })
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::internal)?
    };
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    if !follow {
        return Ok(HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(text));
    }
    let already: Vec<String> = lines.iter().rev().take(200).cloned().collect();
    let follow = LogFollow {
        first: Some(Bytes::from(text)),
        already,
        offset: start,
        store: state.store.clone(),
        run,
        path: current,
        marker,
        handle: state.handle.clone(),
        done: false,
    };
    let stream = futures_util::stream::unfold(follow, |mut follow| async move {
        let chunk = follow.next_chunk().await?;
        Some((Ok::<Bytes, actix_web::Error>(chunk), follow))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/plain; charset=utf-8")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .streaming(stream))
}

async fn reload(request: HttpRequest, state: Data<ApiState>) -> ApiResult {
    authorize(&request, &state)?;
    let hash = state.handle.reload().await?;
    Ok(HttpResponse::Ok().json(json!({"reloaded": true, "config_hash": hash})))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct EventsQuery {
    since: Option<String>,
}

/// Server-sent events from the persisted event log. The stream starts after
/// `Last-Event-ID` (a reconnecting client), else after `?since=`, else at the newest
/// event; every event carries its sequence number as its id, so a client that
/// reconnects loses nothing. A comment line keeps idle connections alive.
async fn events(
    request: HttpRequest,
    query: web::Query<EventsQuery>,
    state: Data<ApiState>,
) -> ApiResult {
    let parse = |what: &str, text: &str| {
        text.trim()
            .parse::<i64>()
            .ok()
            .filter(|n| *n >= 0)
            .ok_or_else(|| {
                ApiError::bad_request(
                    "bad_event_id",
                    format!("{what}: expected an event sequence number, found {text:?}"),
                )
            })
    };
    let from = match request
        .headers()
        .get("Last-Event-ID")
        .map(HeaderValue::to_str)
    {
        Some(Ok(text)) => parse("Last-Event-ID", text)?,
        Some(Err(_)) => {
            return Err(ApiError::bad_request(
                "bad_event_id",
                "Last-Event-ID is not text",
            ))
        }
        None => match &query.since {
            Some(text) => parse("since", text)?,
            None => {
                let store = state.store.clone();
                blocking(move || store.last_event_seq()).await?
            }
        },
    };
    let wake = state.board.subscribe();
    let cursor = EventCursor {
        last: from,
        store: state.store.clone(),
        wake,
        quiet_since: tokio::time::Instant::now(),
        greeted: false,
        handle: state.handle.clone(),
    };
    let stream = futures_util::stream::unfold(cursor, |mut cursor| async move {
        let chunk = cursor.next_chunk().await?;
        Some((Ok::<Bytes, actix_web::Error>(chunk), cursor))
    });
    Ok(HttpResponse::Ok()
        .content_type("text/event-stream")
        .insert_header((header::CACHE_CONTROL, "no-cache"))
        .insert_header(("X-Accel-Buffering", "no"))
        .streaming(stream))
}

/// A run's log as it grows: the lines so far, then new lines of that run until it ends
/// (or the service stops).
struct LogFollow {
    first: Option<Bytes>,
    /// The last lines already sent, which the first read from `offset` may repeat.
    already: Vec<String>,
    offset: u64,
    store: Store,
    run: RunId,
    path: std::path::PathBuf,
    marker: String,
    handle: Handle,
    done: bool,
}

impl LogFollow {
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if let Some(first) = self.first.take() {
            return Some(first);
        }
        if self.done {
            return None;
        }
        loop {
            tokio::select! {
                _ = self.handle.stopping() => return None,
                _ = tokio::time::sleep(Duration::from_millis(250)) => {}
            }
            let (path, store, run, offset) =
                (self.path.clone(), self.store.clone(), self.run, self.offset);
            let read = web::block(move || -> std::io::Result<(Vec<u8>, u64, bool)> {
                use std::io::{Read, Seek};
                let finished = store
                    .run(run)
                    .ok()
                    .flatten()
                    .is_none_or(|r| r.state.is_terminal());
                let mut file = std::fs::File::open(&path)?;
                // A rotation shows as the file being shorter than where we were.
                let from = if file.metadata()?.len() < offset {
                    0
                } else {
                    offset
                };
                file.seek(std::io::SeekFrom::Start(from))?;
                let mut bytes = Vec::new();
                file.read_to_end(&mut bytes)?;
                Ok((bytes, from, finished))
            })
            .await;
            let Ok(Ok((bytes, from, finished))) = read else {
                continue;
            };
            let complete = bytes
                .iter()
                .rposition(|b| *b == b'\n')
                .map(|i| i + 1)
                .unwrap_or(0);
            self.offset = from + complete as u64;
            let text: String = String::from_utf8_lossy(&bytes[..complete])
                .lines()
                .filter(|line| line.contains(&self.marker))
                .filter(|line| !self.already.iter().any(|sent| sent == line))
                .map(|line| format!("{line}\n"))
                .collect();
            self.already.clear();
            if !text.is_empty() || finished {
                self.done = finished;
                return Some(Bytes::from(text));
            }
        }
    }
}

struct EventCursor {
    last: i64,
    store: Store,
    wake: tokio::sync::watch::Receiver<u64>,
    quiet_since: tokio::time::Instant,
    greeted: bool,
    handle: Handle,
}

impl EventCursor {
    const KEEP_ALIVE: Duration = Duration::from_secs(15);

    /// The next piece of the stream; `None` ends it (the service is stopping: clients
    /// reconnect with their last id and lose nothing).
    async fn next_chunk(&mut self) -> Option<Bytes> {
        if !self.greeted {
            self.greeted = true;
            return Some(Bytes::from(format!(
                ": connected, after event {}\nretry: 2000\n\n",
                self.last
            )));
        }
        loop {
            let (store, after) = (self.store.clone(), self.last);
            if let Ok(Ok(events)) = web::block(move || store.events_after(after, 500)).await {
                if let Some(last) = events.last() {
                    self.last = last.seq;
                    self.quiet_since = tokio::time::Instant::now();
                    let text: String = events.iter().map(views::sse_event).collect();
                    return Some(Bytes::from(text));
                }
            }
            if self.quiet_since.elapsed() >= Self::KEEP_ALIVE {
                self.quiet_since = tokio::time::Instant::now();
                return Some(Bytes::from_static(b": keep-alive\n\n"));
            }
            // Wake on the engine's next publication, or after a short while for events
            // written by other processes (the CLI); end when the service stops.
            tokio::select! {
                _ = self.handle.stopping() => return None,
                _ = tokio::time::timeout(Duration::from_millis(250), self.wake.changed()) => {}
            }
        }
    }
}

/// `healthy` | `degraded` | `unhealthy`, with each component's check; 503 when unhealthy.
async fn health(state: Data<ApiState>) -> ApiResult {
    let now = chrono::Utc::now();
    let snapshot = state.board.snapshot();
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
    let mut checks = serde_json::Map::new();
    let mut worst = 0u8;
    let mut check = |name: &str, level: u8, detail: String| {
        worst = worst.max(level);
        let status = ["ok", "degraded", "failed"][usize::from(level)];
        checks.insert(
            name.to_string(),
            json!({"status": status, "detail": detail}),
        );
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
    Ok(HttpResponse::build(code).json(json!({"status": status, "checks": checks})))
}

async fn metrics(state: Data<ApiState>) -> ApiResult {
    Ok(HttpResponse::Ok()
        .content_type("text/plain; version=0.0.4; charset=utf-8")
        .body(state.metrics.render()))
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

/// Any error response that is not already in the JSON shape (an extractor's or actix's
/// own, such as 413 for an oversized body) is rewritten into it.
fn json_errors<B: actix_web::body::MessageBody + 'static>(
    response: actix_web::dev::ServiceResponse<B>,
) -> actix_web::Result<actix_web::middleware::ErrorHandlerResponse<B>> {
    use actix_web::middleware::ErrorHandlerResponse;
    let is_json = response
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|value| value.as_bytes().starts_with(b"application/json"));
    if is_json {
        return Ok(ErrorHandlerResponse::Response(
            response.map_into_left_body(),
        ));
    }
    let status = response.status();
    let (code, message) = match status {
        StatusCode::PAYLOAD_TOO_LARGE => (
            "payload_too_large",
            "request body larger than 64 KiB".to_string(),
        ),
        StatusCode::NOT_FOUND => ("not_found", "no such route".to_string()),
        StatusCode::METHOD_NOT_ALLOWED => (
            "method_not_allowed",
            "method not allowed on this route".to_string(),
        ),
        other if other.is_client_error() => (
            "bad_request",
            other
                .canonical_reason()
                .unwrap_or("bad request")
                .to_lowercase(),
        ),
        other => (
            "internal",
            other
                .canonical_reason()
                .unwrap_or("internal error")
                .to_lowercase(),
        ),
    };
    let (request, _) = response.into_parts();
    let replaced = ApiError::new(status, code, message).error_response();
    Ok(ErrorHandlerResponse::Response(
        actix_web::dev::ServiceResponse::new(request, replaced).map_into_right_body(),
    ))
}

async fn not_found(request: HttpRequest) -> ApiResult {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}", request.method(), request.path()),
    ))
}

/// 405 with `Allow` listing the methods [`ROUTES`] gives the matched path.
async fn method_not_allowed(request: HttpRequest) -> HttpResponse {
    let pattern = request.match_pattern().unwrap_or_default();
    let allowed: Vec<&str> = ROUTES
        .iter()
        .filter(|(_, path)| *path == pattern)
        .map(|(method, _)| *method)
        .collect();
    let mut response = ApiError::new(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!(
            "{} is not allowed on {} (allowed: {})",
            request.method(),
            request.path(),
            allowed.join(", ")
        ),
    )
    .error_response();
    if let Ok(value) = HeaderValue::from_str(&allowed.join(", ")) {
        response.headers_mut().insert(header::ALLOW, value);
    }
    response
}
