//! The one error shape, `{"error": {"code", "message"}}`: [`ApiError`], how engine and
//! store errors become one, and the catch-all that rewrites every other error response
//! (an extractor's, actix's own, an unknown route or method) into it.

use actix_web::body::BoxBody;
use actix_web::http::header::{self, HeaderValue};
use actix_web::http::StatusCode;
use actix_web::web;
use actix_web::{HttpRequest, HttpResponse, ResponseError};
use serde_json::{json, Value};

use crate::engine::EngineError;

use super::routes::ROUTES;

/// The error envelope, also written by the guard for the heads it refuses.
pub(super) fn envelope(code: &str, message: &str, details: Option<&Value>) -> Value {
    let mut error = json!({ "code": code, "message": message });
    if let Some(details) = details {
        error["details"] = details.clone();
    }
    json!({ "error": error })
}

/// The one error shape: `{"error": {"code", "message"}}`, plus `details` for config errors.
#[derive(Debug)]
pub(super) struct ApiError {
    status: StatusCode,
    code: &'static str,
    message: String,
    details: Option<Value>,
}

impl ApiError {
    pub(super) fn new(
        status: StatusCode,
        code: &'static str,
        message: impl Into<String>,
    ) -> ApiError {
        ApiError {
            status,
            code,
            message: message.into(),
            details: None,
        }
    }

    pub(super) fn bad_request(code: &'static str, message: impl Into<String>) -> ApiError {
        ApiError::new(StatusCode::BAD_REQUEST, code, message)
    }

    /// A store error: 503 `store_unavailable` when the database cannot take the operation
    /// (full disk, I/O error, read-only), so a client knows to try again; else 500.
    pub(super) fn store(err: crate::store::StoreError) -> ApiError {
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

    pub(super) fn internal(message: impl std::fmt::Display) -> ApiError {
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
        let mut response = HttpResponse::build(self.status);
        if self.status == StatusCode::UNAUTHORIZED {
            response.insert_header((header::WWW_AUTHENTICATE, "Bearer"));
        }
        response.json(envelope(self.code, &self.message, self.details.as_ref()))
    }
}

impl From<EngineError> for ApiError {
    fn from(err: EngineError) -> ApiError {
        let message = err.to_string();
        match err {
            EngineError::Backfill(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_backfill", message)
            }
            EngineError::BadParams(_) => {
                ApiError::new(StatusCode::UNPROCESSABLE_ENTITY, "bad_params", message)
            }
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

pub(super) type ApiResult = Result<HttpResponse, ApiError>;

/// Runs blocking store work off the actix worker thread.
pub(super) async fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> Result<T, crate::store::StoreError> + Send + 'static,
) -> Result<T, ApiError> {
    web::block(work)
        .await
        .map_err(ApiError::internal)?
        .map_err(ApiError::store)
}

/// Any error response that is not already in the JSON shape (an extractor's or actix's
/// own, such as 413 for an oversized body) is rewritten into it.
pub(super) fn json_errors<B: actix_web::body::MessageBody + 'static>(
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

pub(super) async fn not_found(request: HttpRequest) -> ApiResult {
    Err(ApiError::new(
        StatusCode::NOT_FOUND,
        "not_found",
        format!("no route {} {}", request.method(), request.path()),
    ))
}

/// 405 with `Allow` listing the methods [`ROUTES`] gives the matched path.
pub(super) async fn method_not_allowed(request: HttpRequest) -> HttpResponse {
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
