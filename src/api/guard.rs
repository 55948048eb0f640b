//! The request-head guard: each connection's request head is read and checked here before
//! actix's HTTP/1 codec sees it.
//!
//! The codec answers a head it refuses by itself (a target over 64 KiB, more than 96
//! headers, a head over 128 KiB, a malformed line, a slow head) with an empty-bodied
//! 400/431/408 that no middleware ever sees, and its limits are constants. So the guard
//! applies lower limits of its own and every check the codec would make, and answers in the
//! API's JSON error shape; a head the guard passes is one the codec accepts. The API serves
//! one request per connection (no keep-alive), so the first head is the only one.
//!
//! Invariant: the guard never changes the bytes it passes on.

use std::future::Future;
use std::io;
use std::pin::Pin;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use actix_web::http::{Method, StatusCode, Uri};
use actix_web::rt::net::TcpStream;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

/// The longest request target (path and query), in bytes: 414 beyond.
pub(super) const MAX_TARGET: usize = 8 * 1024;
/// The most header fields a request may carry: 431 beyond.
pub(super) const MAX_HEADERS: usize = 64;
/// The largest request head (request line and headers), in bytes: 431 beyond.
pub(super) const MAX_HEAD: usize = 32 * 1024;
/// How long a client has to send its whole request head: 408 after.
pub(super) const HEAD_TIMEOUT: Duration = Duration::from_secs(5);

/// A connection whose first request head has to pass [`check`] before anything reaches
/// the codec.
pub(super) struct Guarded {
    io: TcpStream,
    state: State,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

enum State {
    /// Reading the head; nothing passed on yet. The flag: its first line is complete.
    Head(Vec<u8>, bool),
    /// The head passed: handing over what was read, then [`State::Through`].
    Replay(Vec<u8>, usize),
    Through,
    /// The head was refused: writing this answer, then closing.
    Refuse(Vec<u8>, usize),
    /// Answer written and write side shut: reading what the client still sends, up to a
    /// bound, so closing does not reset the connection under the answer.
    Drain(usize),
    Closed,
}

impl Guarded {
    pub(super) fn new(io: TcpStream) -> Guarded {
        Guarded {
            io,
            state: State::Head(Vec::new(), false),
            deadline: Box::pin(tokio::time::sleep(HEAD_TIMEOUT)),
        }
    }
}

/// What the guard makes of the bytes of a head so far.
#[derive(Debug, PartialEq)]
enum Verdict {
    Incomplete,
    Pass,
    Refuse(StatusCode, &'static str, String),
}

fn bad(message: impl Into<String>) -> Verdict {
    Verdict::Refuse(StatusCode::BAD_REQUEST, "bad_request", message.into())
}

fn too_large(message: impl Into<String>) -> Verdict {
    Verdict::Refuse(
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
        "headers_too_large",
        message.into(),
    )
}

fn uri_too_long(length: usize) -> Verdict {
    Verdict::Refuse(
        StatusCode::URI_TOO_LONG,
        "uri_too_long",
        format!("request target of {length} bytes or more: at most {MAX_TARGET} bytes"),
    )
}

/// Checks a request head as actix-http's decoder would, with the API's lower limits.
fn check(head: &[u8]) -> Verdict {
    // The request line alone: the target's length is known before the head is complete.
    let line_end = head.iter().position(|b| *b == b'\n');
    let line = &head[..line_end.unwrap_or(head.len())];
    let target = line.split(|b| *b == b' ').nth(1).unwrap_or_default();
    if target.len() > MAX_TARGET {
        return uri_too_long(target.len());
    }
    if line_end.is_none() {
        return if head.len() > MAX_TARGET + 64 {
            uri_too_long(head.len())
        } else {
            Verdict::Incomplete
        };
    }
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut request = httparse::Request::new(&mut fields);
    let length = match request.parse(head) {
        Ok(httparse::Status::Complete(length)) => length,
        Ok(httparse::Status::Partial) if head.len() > MAX_HEAD => {
            return too_large(format!("request head over {MAX_HEAD} bytes"))
        }
        Ok(httparse::Status::Partial) => return Verdict::Incomplete,
        Err(httparse::Error::TooManyHeaders) => {
            return too_large(format!("more than {MAX_HEADERS} header fields"))
        }
        Err(err) => return bad(format!("malformed request head: {err}")),
    };
    if length > MAX_HEAD {
        return too_large(format!("request head over {MAX_HEAD} bytes"));
    }
    let (Some(method), Some(path), Some(version)) = (request.method, request.path, request.version)
    else {
        return bad("malformed request line");
    };
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return bad(format!("invalid method {method:?}"));
    };
    if let Err(err) = Uri::try_from(path) {
        return bad(format!("invalid request target: {err}"));
    }
    let http11 = version == 1;
    let (mut host, mut content_length, mut transfer_encoding) = (0, None, None);
    for field in request.headers.iter() {
        let Ok(value) = std::str::from_utf8(field.value) else {
            continue;
        };
        if field.name.eq_ignore_ascii_case("host") {
            host += 1;
        } else if field.name.eq_ignore_ascii_case("content-length") {
            let value = value.trim();
            if content_length.is_some() {
                return bad("more than one Content-Length");
            }
            if value.starts_with('+') || value.parse::<u64>().is_err() {
                return bad(format!(
                    "Content-Length: expected a number of bytes, found {value:?}"
                ));
            }
            content_length = Some(value);
        } else if field.name.eq_ignore_ascii_case("transfer-encoding") {
            if transfer_encoding.is_some() {
                return bad("more than one Transfer-Encoding");
            }
            transfer_encoding = Some(value.trim());
        }
    }
    for field in request.headers.iter() {
        let is_checked = ["content-length", "transfer-encoding"]
            .iter()
            .any(|name| field.name.eq_ignore_ascii_case(name));
        if is_checked && std::str::from_utf8(field.value).is_err() {
            return bad(format!("{}: not text", field.name));
        }
    }
    if host > 1 {
        return bad("more than one Host");
    }
    if http11 && host == 0 {
        return bad("an HTTP/1.1 request needs a Host header");
    }
    if let Some(encoding) = transfer_encoding {
        if !http11 {
            return bad("Transfer-Encoding is not allowed in HTTP/1.0");
        }
        if !encoding.eq_ignore_ascii_case("chunked") {
            return bad(format!(
                "Transfer-Encoding: only chunked is supported, found {encoding:?}"
            ));
        }
        if content_length.is_some() {
            return bad("both Content-Length and Transfer-Encoding");
        }
    }
    if !http11 && method == Method::POST && content_length.is_none() {
        return bad("an HTTP/1.0 POST needs a Content-Length");
    }
    Verdict::Pass
}

/// The whole answer to a refused head, in the API's error shape.
fn answer(status: StatusCode, code: &str, message: &str) -> Vec<u8> {
    let body = super::errors::envelope(code, message, None).to_string();
    format!(
        "HTTP/1.1 {} {}\r\ncontent-type: application/json\r\ncontent-length: {}\r\n\
         connection: close\r\n\r\n{body}",
        status.as_u16(),
        status.canonical_reason().unwrap_or(""),
        body.len()
    )
    .into_bytes()
}

/// How much a refused client may still send, and for how long, before the connection is
/// dropped.
const DRAIN_LIMIT: usize = 1 << 20;
const DRAIN_TIMEOUT: Duration = Duration::from_secs(1);

impl AsyncRead for Guarded {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let this = self.get_mut();
        loop {
            match &mut this.state {
                State::Through => return Pin::new(&mut this.io).poll_read(cx, buf),
                State::Replay(bytes, at) => {
                    let count = (bytes.len() - *at).min(buf.remaining());
                    buf.put_slice(&bytes[*at..*at + count]);
                    *at += count;
                    if *at == bytes.len() {
                        this.state = State::Through;
                    }
                    return Poll::Ready(Ok(()));
                }
                State::Head(head, first_line) => {
                    let mut chunk = [0u8; 8192];
                    let mut read = ReadBuf::new(&mut chunk);
                    match Pin::new(&mut this.io).poll_read(cx, &mut read) {
                        Poll::Ready(result) => result?,
                        Poll::Pending => {
                            ready!(this.deadline.as_mut().poll(cx));
                            if head.is_empty() {
                                // Nothing asked (a browser's spare connection): just close.
                                this.state = State::Closed;
                                continue;
                            }
                            this.state = State::Refuse(
                                answer(
                                    StatusCode::REQUEST_TIMEOUT,
                                    "request_timeout",
                                    &format!(
                                        "request head not complete within {}s",
                                        HEAD_TIMEOUT.as_secs()
                                    ),
                                ),
                                0,
                            );
                            continue;
                        }
                    }
                    if read.filled().is_empty() {
                        // The client closed: pass on what came; the codec ends the connection.
                        this.state = match std::mem::take(head) {
                            rest if rest.is_empty() => State::Closed,
                            rest => State::Replay(rest, 0),
                        };
                        continue;
                    }
                    head.extend_from_slice(read.filled());
                    // Parse again only when the verdict can have changed: a line ended or a
                    // limit was crossed (so a head sent a byte at a time costs one parse a
                    // line, not one a byte).
                    let line_ended = read.filled().contains(&b'\n');
                    *first_line |= line_ended;
                    let crossed =
                        head.len() > MAX_HEAD || (!*first_line && head.len() > MAX_TARGET + 64);
                    if !line_ended && !crossed {
                        continue;
                    }
                    match check(head) {
                        Verdict::Incomplete => {}
                        Verdict::Pass => this.state = State::Replay(std::mem::take(head), 0),
                        Verdict::Refuse(status, code, message) => {
                            tracing::debug!("request head refused: {status} {message}");
                            this.state = State::Refuse(answer(status, code, &message), 0);
                        }
                    }
                }
                State::Refuse(bytes, at) => {
                    while *at < bytes.len() {
                        let written = ready!(Pin::new(&mut this.io).poll_write(cx, &bytes[*at..]))?;
                        if written == 0 {
                            return Poll::Ready(Err(io::ErrorKind::WriteZero.into()));
                        }
                        *at += written;
                    }
                    ready!(Pin::new(&mut this.io).poll_shutdown(cx))?;
                    this.deadline
                        .as_mut()
                        .reset(tokio::time::Instant::now() + DRAIN_TIMEOUT);
                    this.state = State::Drain(0);
                }
                State::Drain(drained) => {
                    let mut chunk = [0u8; 8192];
                    let mut read = ReadBuf::new(&mut chunk);
                    if Pin::new(&mut this.io)
                        .poll_read(cx, &mut read)?
                        .is_pending()
                    {
                        ready!(this.deadline.as_mut().poll(cx));
                        this.state = State::Closed;
                        continue;
                    }
                    *drained += read.filled().len();
                    if read.filled().is_empty() || *drained > DRAIN_LIMIT {
                        this.state = State::Closed;
                    }
                }
                State::Closed => return Poll::Ready(Ok(())),
            }
        }
    }
}

impl AsyncWrite for Guarded {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write(cx, buf)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().io).poll_shutdown(cx)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_head(head: &str) -> Verdict {
        check(head.as_bytes())
    }

    #[test]
    fn heads_the_codec_accepts_pass_and_partial_heads_wait() {
        assert_eq!(
            check_head("GET /health HTTP/1.1\r\nHost: x\r\n\r\n"),
            Verdict::Pass
        );
        assert_eq!(check_head("GET /health HTTP/1.0\r\n\r\n"), Verdict::Pass);
        assert_eq!(
            check_head("POST /x HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"),
            Verdict::Pass
        );
        assert_eq!(
            check_head("GET /health HTTP/1.1\r\nHo"),
            Verdict::Incomplete
        );
        assert_eq!(check_head("GET /hea"), Verdict::Incomplete);
    }

    #[test]
    fn heads_the_codec_refuses_are_refused_with_the_same_status_or_a_lower_limit() {
        let status = |head: &str| match check_head(head) {
            Verdict::Refuse(status, ..) => status.as_u16(),
            other => panic!("{head:?}: {other:?}"),
        };
        assert_eq!(
            status(&format!("GET /{} HTTP/1.1\r\n", "a".repeat(9000))),
            414
        );
        assert_eq!(status(&format!("GET /{}", "a".repeat(9000))), 414);
        let many: String = (0..65).map(|i| format!("X-{i}: 1\r\n")).collect();
        assert_eq!(
            status(&format!("GET / HTTP/1.1\r\nHost: x\r\n{many}\r\n")),
            431
        );
        let big = format!("GET / HTTP/1.1\r\nHost: x\r\nX: {}", "b".repeat(40_000));
        assert_eq!(status(&big), 431);
        for head in [
            "GET / HTTP/1.1\r\n\r\n",
            "GET / HTTP/1.1\r\nHost: x\r\nHost: y\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: +1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: gzip\r\n\r\n",
            "POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\nContent-Length: 1\r\n\r\n",
            "POST / HTTP/1.0\r\n\r\n",
            "GET / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n",
            "G@T / HTTP/1.1\r\nHost: x\r\n\r\n",
            "GET / HTTP/1.1\r\nBad Name: 1\r\n\r\n",
        ] {
            assert_eq!(status(head), 400, "{head:?}");
        }
    }
}
