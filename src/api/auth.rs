//! The bearer token of mutating routes, compared in constant time.

use actix_web::http::header;
use actix_web::http::StatusCode;
use actix_web::HttpRequest;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use super::errors::ApiError;
use super::ApiState;

/// Mutating routes need `Authorization: Bearer <token>` when a token is configured: the
/// scheme in any case (RFC 6750), exactly one space, then the token with no whitespace.
/// Anything else is 401; a well-formed but wrong token is 403.
pub(super) fn authorize(request: &HttpRequest, state: &ApiState) -> Result<(), ApiError> {
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
