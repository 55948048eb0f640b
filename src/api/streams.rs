//! The long answers: server-sent events from the persisted event log, and a run's log
//! followed as it grows. Both end when the service stops.

use std::time::Duration;

use actix_web::http::header::{self, HeaderValue};
use actix_web::web::{self, Bytes, Data};
use actix_web::{HttpRequest, HttpResponse};
use serde::Deserialize;

use crate::engine::{EngineError, Handle};
use crate::model::RunId;
use crate::store::Store;
use crate::tasklog::LogFollower;
use crate::views;

use super::errors::{blocking, ApiError, ApiResult};
use super::params::{parse_flag, parse_run_id};
use super::routes::snapshot;
use super::ApiState;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct LogQuery {
    follow: Option<String>,
}

pub(super) async fn run_log(
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
    let (follower, lines) = web::block(move || {
        // Following starts before reading: a line appended while we read is then read
        // twice rather than never, and the follower leaves out the repeat.
        let follower = follow.then(|| LogFollower::at_end(&log_dir, &name).only(marker.clone()));
        let lines = crate::tasklog::read_lines(&log_dir, Some(&archive_dir), &name, &|l| {
            l.contains(&marker)
        })?;
        Ok::<_, std::io::Error>((follower, lines))
    })
    .await
    .map_err(ApiError::internal)?
    .map_err(ApiError::internal)?;
    let mut text = lines.join("\n");
    if !text.is_empty() {
        text.push('\n');
    }
    let Some(follower) = follower else {
        return Ok(HttpResponse::Ok()
            .content_type("text/plain; charset=utf-8")
            .body(text));
    };
    let already: Vec<String> = lines.iter().rev().take(200).cloned().collect();
    let follow = LogFollow {
        first: Some(Bytes::from(text)),
        follower: Some(follower.skipping(already)),
        store: state.store.clone(),
        run,
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

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventsQuery {
    since: Option<String>,
}

/// Server-sent events from the persisted event log. The stream starts after
/// `Last-Event-ID` (a reconnecting client), else after `?since=`, else at the newest
/// event; every event carries its sequence number as its id, so a client that
/// reconnects loses nothing. A comment line keeps idle connections alive.
///
/// A client ahead of the store (its id beyond the newest event: the database was restored
/// from a backup or replaced) would otherwise wait for ids that are not coming: it is
/// told so by a `resync` event, whose id is the newest, and the stream goes on from there.
pub(super) async fn events(
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
    let store = state.store.clone();
    let newest = blocking(move || store.last_event_seq()).await?;
    let resync = (from > newest).then_some(Resync {
        requested: from,
        newest,
    });
    let wake = state.board.subscribe();
    let cursor = EventCursor {
        last: from.min(newest),
        resync,
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

/// A run's log as it grows: the lines so far, then new lines of that run (read by the
/// shared [`LogFollower`]) until it ends or the service stops.
struct LogFollow {
    first: Option<Bytes>,
    /// Taken while a read runs on the blocking pool.
    follower: Option<LogFollower>,
    store: Store,
    run: RunId,
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
            let mut follower = self.follower.take()?;
            let (store, run) = (self.store.clone(), self.run);
            // Whether the run had ended is read before the lines, so its last lines come
            // with the last chunk.
            let (follower, finished, lines) = web::block(move || {
                let finished = store
                    .run(run)
                    .ok()
                    .flatten()
                    .is_none_or(|r| r.state.is_terminal());
                let lines = follower.next_lines();
                (follower, finished, lines)
            })
            .await
            .ok()?;
            self.follower = Some(follower);
            let Ok(lines) = lines else { continue };
            let text: String = lines.iter().map(|line| format!("{line}\n")).collect();
            if !text.is_empty() || finished {
                self.done = finished;
                return Some(Bytes::from(text));
            }
        }
    }
}

/// A client's id beyond the newest event, and that newest event.
struct Resync {
    requested: i64,
    newest: i64,
}

struct EventCursor {
    last: i64,
    /// Said once, with the greeting.
    resync: Option<Resync>,
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
            let mut greeting = format!(": connected, after event {}\n", self.last);
            if let Some(Resync { requested, newest }) = self.resync.take() {
                greeting.push_str(&format!(
                    ": event {requested} is ahead of the newest event ({newest}): resynchronised, continuing after {newest}\n"
                ));
                greeting.push_str("retry: 2000\n\n");
                greeting.push_str(&views::sse_resync(requested, newest));
            } else {
                greeting.push_str("retry: 2000\n\n");
            }
            return Some(Bytes::from(greeting));
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
