//! The 64 KiB bound on every request body, whether or not its route reads one.

use actix_web::body::MessageBody;
use actix_web::dev::{ServiceRequest, ServiceResponse};
use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::middleware::Next;
use actix_web::{web, HttpMessage, ResponseError};

use super::errors::ApiError;

/// The most a request body may hold, on every route (413 beyond).
pub(super) const MAX_BODY: usize = 64 * 1024;

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
pub(super) async fn bounded_body(
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
