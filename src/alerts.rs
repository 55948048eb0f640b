//! `[[alerts]]`: the events an operator wants to hear about, POSTed to their endpoints.
//!
//! Durable outbox, derived from the event log: per alert, a cursor (`alerts.cursor`)
//! says up to which event seq deliveries were derived; each event after it that the
//! alert wants becomes a pending row of `alert_deliveries`, and the cursor moves, in one
//! transaction. Events are durable before an alert is derived from them, so a delivery
//! pending when the service stops (or is killed) is there at its next start; one per
//! alert and event, whatever instance derives it (the row's key).
//!
//! The sender is a thread of its own, outside the engine loop: a dead or hanging
//! endpoint costs it, never a tick. Each pass derives new deliveries, claims the due
//! ones (`Tx::claim_deliveries`: one instance holds a delivery at a time, PostgreSQL
//! `FOR UPDATE SKIP LOCKED`, for [`CLAIM`]), POSTs them concurrently with a timeout
//! ([`POST_TIMEOUT`]), and records each outcome: delivered on a 2xx; otherwise retried
//! after 1 s, 2 s, 4 s, … at most [`MAX_BACKOFF`], until `max_attempts` POSTs, then given
//! up. Every POST is counted in `/metrics` (`turbosched_alert_posts_total`).
//!
//! Invariants: no engine state touched; the store is the only thing shared.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use crate::config::AlertSpec;
use crate::engine::{Clock, Metrics};
use crate::store::{DeliveryOutcome, DeliveryRow, NewDelivery, Store, StoreError};

/// A POST gets this long (connect, send, answer) before it counts as failed.
pub const POST_TIMEOUT: Duration = Duration::from_secs(10);
/// A claim on a delivery lapses after this long (longer than a POST), so a delivery
/// held by an instance that died is sent by another.
const CLAIM: Duration = Duration::from_secs(30);
/// The longest wait between two POSTs of one delivery.
const MAX_BACKOFF: Duration = Duration::from_secs(300);
/// Between two passes.
const PASS: Duration = Duration::from_millis(200);
/// Events read per alert and pass; deliveries claimed per pass.
const BATCH: usize = 500;
const CLAIMS: usize = 32;

/// The running sender: stop it with [`AlertSender::stop`].
pub struct AlertSender {
    stop: Arc<AtomicBool>,
    thread: Option<JoinHandle<()>>,
}

impl AlertSender {
    /// Starts the sender for `alerts` (none: nothing is started). `api_base`
    /// (`http://host:port`) makes the envelope's link.
    pub fn start(
        alerts: Vec<AlertSpec>,
        api_base: Option<String>,
        store: Store,
        metrics: Arc<Metrics>,
        instance: String,
        clock: Arc<dyn Clock>,
    ) -> Option<AlertSender> {
        if alerts.is_empty() {
            return None;
        }
        metrics.know_alerts(alerts.iter().map(|a| a.name.as_str()));
        let stop = Arc::new(AtomicBool::new(false));
        let sender = Sender {
            alerts,
            api_base,
            store,
            metrics,
            instance,
            clock,
            agent: ureq::Agent::config_builder()
                .http_status_as_error(false)
                .timeout_global(Some(POST_TIMEOUT))
                .build()
                .into(),
        };
        let flag = stop.clone();
        let thread = std::thread::Builder::new()
            .name("alerts".into())
            .spawn(move || sender.run(&flag))
            .map_err(|err| tracing::error!("cannot start the alert sender: {err}"))
            .ok()?;
        Some(AlertSender {
            stop,
            thread: Some(thread),
        })
    }

    /// Stops the sender after its current pass (a POST in flight is finished or timed
    /// out first; a delivery not sent stays pending in the store).
    pub fn stop(mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

struct Sender {
    alerts: Vec<AlertSpec>,
    api_base: Option<String>,
    store: Store,
    metrics: Arc<Metrics>,
    instance: String,
    clock: Arc<dyn Clock>,
    agent: ureq::Agent,
}

impl Sender {
    fn run(&self, stop: &AtomicBool) {
        let mut failing = false;
        while !stop.load(Ordering::Relaxed) {
            match self.pass() {
                Ok(()) if failing => {
                    tracing::info!("alert sender: the run database answers again");
                    failing = false;
                }
                Ok(()) => {}
                Err(err) if !failing => {
                    tracing::warn!("alert sender: {err}; deliveries wait in the store");
                    failing = true;
                }
                Err(_) => {}
            }
            std::thread::sleep(PASS);
        }
    }

    /// Derives, claims, POSTs, records.
    fn pass(&self) -> Result<(), StoreError> {
        for alert in &self.alerts {
            self.derive(alert)?;
        }
        let now = self.clock.now();
        let until = now + chrono::Duration::from_std(CLAIM).unwrap_or_default();
        let claimed = self
            .store
            .batch(|tx| tx.claim_deliveries(&self.instance, now, until, CLAIMS))?;
        if claimed.is_empty() {
            return Ok(());
        }
        let outcomes: Vec<(DeliveryRow, DeliveryOutcome)> = std::thread::scope(|scope| {
            let posts: Vec<_> = claimed
                .into_iter()
                .map(|delivery| scope.spawn(move || self.post(delivery)))
                .collect();
            posts
                .into_iter()
                .filter_map(|post| post.join().ok())
                .collect()
        });
        let now = self.clock.now();
        self.store.batch(|tx| {
            for (delivery, outcome) in &outcomes {
                tx.record_delivery(
                    &delivery.alert,
                    delivery.event_seq,
                    &self.instance,
                    outcome,
                    now,
                )?;
            }
            Ok(())
        })?;
        for (delivery, outcome) in &outcomes {
            let label = match outcome {
                DeliveryOutcome::Delivered { .. } => "delivered",
                DeliveryOutcome::Retry { error, .. } => {
                    tracing::warn!(
                        alert = delivery.alert,
                        "alert {} (event {}) not delivered, will retry: {error}",
                        delivery.kind,
                        delivery.event_seq
                    );
                    "failed"
                }
                DeliveryOutcome::GaveUp { error, .. } => {
                    tracing::error!(
                        alert = delivery.alert,
                        "alert {} (event {}) given up after {} attempts: {error}",
                        delivery.kind,
                        delivery.event_seq,
                        delivery.attempts + 1
                    );
                    "given_up"
                }
            };
            self.metrics
                .alert_posts
                .with_label_values(&[delivery.alert.as_str(), label])
                .inc();
        }
        Ok(())
    }

    /// Turns the events after `alert`'s cursor into its deliveries. A new alert starts
    /// at the newest event: it is told about what happens from now on.
    fn derive(&self, alert: &AlertSpec) -> Result<(), StoreError> {
        let now = self.clock.now();
        let Some(mut cursor) = self.store.alert_cursor(&alert.name)? else {
            let newest = self.store.last_event_seq()?;
            return self
                .store
                .batch(|tx| tx.add_deliveries(&alert.name, &[], newest, now));
        };
        loop {
            let events = self.store.events_after(cursor, BATCH)?;
            let Some(last) = events.last().map(|e| e.seq) else {
                return Ok(());
            };
            let deliveries: Vec<NewDelivery> = events
                .iter()
                .filter(|event| alert.wants(&event.kind, event.task.as_deref()))
                .map(|event| NewDelivery {
                    event_seq: event.seq,
                    kind: event.kind.clone(),
                    task: event.task.clone(),
                    run_id: event.run_id,
                    payload: crate::views::alert_envelope(
                        &alert.name,
                        event,
                        self.api_base.as_deref(),
                    ),
                })
                .collect();
            self.store
                .batch(|tx| tx.add_deliveries(&alert.name, &deliveries, last, now))?;
            cursor = last;
            if events.len() < BATCH {
                return Ok(());
            }
        }
    }

    /// One POST of `delivery`, and what to record.
    fn post(&self, delivery: DeliveryRow) -> (DeliveryRow, DeliveryOutcome) {
        let attempts = delivery.attempts + 1;
        let max_attempts = self
            .alerts
            .iter()
            .find(|a| a.name == delivery.alert)
            .map_or(1, |a| a.max_attempts);
        let url = match self.alerts.iter().find(|a| a.name == delivery.alert) {
            Some(alert) => alert.url(),
            None => Err(format!(
                "no alert named {:?} in the config any more",
                delivery.alert
            )),
        };
        let result = url.and_then(|url| {
            self.agent
                .post(&url)
                .header("content-type", "application/json")
                .send(delivery.payload.as_str())
                .map(|response| i32::from(response.status().as_u16()))
                .map_err(|err| format!("POST {url}: {err}"))
        });
        let outcome = match result {
            Ok(status) if (200..300).contains(&status) => DeliveryOutcome::Delivered { status },
            failed => {
                let (status, error) = match failed {
                    Ok(status) => (Some(status), format!("the endpoint answered {status}")),
                    Err(error) => (None, error),
                };
                if attempts >= max_attempts {
                    DeliveryOutcome::GaveUp { status, error }
                } else {
                    DeliveryOutcome::Retry {
                        status,
                        error,
                        at: self.clock.now() + backoff(attempts),
                    }
                }
            }
        };
        (delivery, outcome)
    }
}

/// The wait after the `attempts`-th failed POST: 1 s, 2 s, 4 s, … at most [`MAX_BACKOFF`].
fn backoff(attempts: u32) -> chrono::Duration {
    let seconds = 1u64
        .checked_shl(attempts.saturating_sub(1))
        .unwrap_or(u64::MAX)
        .min(MAX_BACKOFF.as_secs());
    chrono::Duration::seconds(seconds as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_backoff_doubles_from_one_second_up_to_five_minutes() {
        let waits: Vec<i64> = (1..=12).map(|n| backoff(n).num_seconds()).collect();
        assert_eq!(waits, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(backoff(200).num_seconds(), 300);
    }
}
