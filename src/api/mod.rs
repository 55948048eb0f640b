//! The HTTP API: a thin skin over [`engine::Handle`](crate::engine::Handle), the engine's
//! [`Board`] and the store's read queries.
//!
//! `turbosched serve` runs it in the same process as the engine, on actix-web's own worker
//! threads; the engine stays on the main tokio runtime. Every route's JSON shape comes from
//! [`crate::views`], the crate's one JSON module (the command line prints the same shapes);
//! errors always read `{"error": {"code", "message"}}`; bad input is a 4xx, never a 5xx.
//!
//! One file per reason to change:
//! - `mod.rs`: start-up (bind and token checks, assembling the server) and [`ApiState`];
//! - `guard.rs`: each connection's request head, checked before actix's codec;
//! - `body.rs`: the 64 KiB bound on every request body;
//! - `routes.rs`: the route table ([`ROUTES`]) and the request/response handlers;
//! - `params.rs`: query and body parameters (flags, `wait`, run ids, instants);
//! - `auth.rs`: the bearer token of mutating routes;
//! - `files.rs`: what runs produced, served read-only from the configured output folders;
//! - `streams.rs`: the long answers: server-sent events and a followed run log;
//! - `health.rs`: `/health` and `/metrics`;
//! - `errors.rs`: `ApiError`, the JSON error shape, and the catch-all
//!   that puts every other error into it.
//!
//! Invariants: no scheduling decision is taken here (triggers, aborts, pauses, reloads and
//! retries are engine commands); no database crate and no SQL (reads go through
//! [`Store`]); no JSON shape of its own but the error envelope; `GET /scheduler/status` is
//! served from the board, cached per board version, never from a scan of the history.

mod auth;
mod body;
mod errors;
mod files;
mod guard;
mod health;
mod params;
mod routes;
mod streams;

pub use routes::{OPENAPI, ROUTES};

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::StatusCode;
use actix_web::web::{self, Bytes, Data};
use actix_web::App;
use sha2::{Digest, Sha256};

use crate::engine::{Board, Handle, Metrics};
use crate::store::Store;

use body::MAX_BODY;
use errors::ApiError;

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
        .wrap(actix_web::middleware::from_fn(body::bounded_body))
        .wrap(actix_web::middleware::ErrorHandlers::new().default_handler(errors::json_errors))
        .configure(routes::routes)
        .default_service(web::to(errors::not_found))
}
