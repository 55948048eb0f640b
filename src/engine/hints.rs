//! Wake-ups from the database: runs queued, aborts requested, schedules changed and
//! events appended by other processes (in cluster mode, other instances), told by the
//! store's [`Hints`] (PostgreSQL LISTEN/NOTIFY) so they are acted on within milliseconds
//! rather than at the next poll.
//!
//! Promise: a hint only brings work forward; the poll always runs too, so a lost hint (a
//! dropped listening connection, PgBouncer in transaction mode with `poll_only`) delays
//! work by one poll interval, never loses it. The poll runs every [`POLL`], and every
//! [`POLL_WITH_HINTS`] while hints arrive.

use std::time::Duration;

use tracing::{info, warn};

use super::Engine;
use crate::store::{Hint, Hints};

/// How often runs queued by other processes are looked for without hints.
pub(super) const POLL: Duration = Duration::from_millis(200);

/// How often they are looked for while hints arrive: the backstop for a lost hint.
pub(super) const POLL_WITH_HINTS: Duration = Duration::from_secs(1);

/// The next hint of `hints`; never, without a feed.
pub(super) async fn next_hint(hints: &mut Option<Hints>) -> Option<Hint> {
    match hints {
        Some(hints) => hints.next().await,
        None => std::future::pending().await,
    }
}

impl Engine {
    /// Subscribes to the store's hints in cluster mode, unless `poll_only`.
    pub(super) fn subscribe_hints(&mut self) {
        if !self.clustered() {
            return;
        }
        if self.config.scheduler.poll_only {
            info!(
                "poll_only: no LISTEN; runs queued elsewhere are looked for every {}",
                humantime::format_duration(POLL)
            );
            return;
        }
        self.hints = self.store.hints();
    }

    /// The poll's interval now: slower while hints arrive.
    pub(super) fn poll_interval(&self) -> Duration {
        match &self.hints {
            Some(hints) if hints.live() => POLL_WITH_HINTS,
            _ => POLL,
        }
    }

    /// What another process changed: the poll's work at once for runs queued (and
    /// schedules changed), the abort check for aborts, and event streams woken for
    /// events. `None`: the feed ended; polling alone from now on.
    pub(super) fn on_hint(&mut self, hint: Option<Hint>) {
        let Some(hint) = hint else {
            warn!(
                "wake-ups from the database ended: polling every {}",
                humantime::format_duration(POLL)
            );
            self.hints = None;
            return;
        };
        if hint.schedule {
            match self.store.paused_tasks() {
                Ok(paused) if paused != self.paused => {
                    self.paused = paused;
                    self.dirty = true;
                }
                Ok(_) => {}
                Err(err) => warn!("cannot read paused tasks: {err}"),
            }
        }
        if hint.queued || hint.schedule {
            self.polled_at = std::time::Instant::now();
            self.on_poll();
        }
        if hint.abort {
            self.check_abort_requests();
        }
        if hint.event {
            self.board.touch();
        }
    }
}
