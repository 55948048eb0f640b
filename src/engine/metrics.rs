//! Prometheus metrics the engine keeps and `GET /metrics` renders: runs by task and
//! state, run duration and fire lag histograms, running and queued gauges, retries,
//! orphans, and the process collector (CPU, memory, file descriptors).

use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry, TextEncoder,
};

/// The engine's metrics.
pub struct Metrics {
    registry: Registry,
    pub(super) runs: IntCounterVec,
    pub(super) run_duration: HistogramVec,
    pub(super) fire_lag: Histogram,
    pub(super) running: IntGauge,
    pub(super) queued: IntGauge,
    pub(super) retries: IntCounterVec,
    pub(super) orphans: IntCounter,
    /// POSTs of `[[alerts]]` deliveries, by alert and outcome (`delivered`, `failed`: an
    /// attempt that will be retried, `given_up`).
    pub alert_posts: IntCounterVec,
}

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let runs = IntCounterVec::new(
            Opts::new(
                "turbosched_runs_total",
                "Runs that reached a terminal state, by task and state",
            ),
            &["task", "state"],
        )
        .expect(CONSTANT);
        let run_duration = HistogramVec::new(
            HistogramOpts::new(
                "turbosched_run_duration_seconds",
                "Duration of finished runs, first start to end",
            )
            .buckets(vec![
                0.01, 0.05, 0.1, 0.5, 1.0, 5.0, 15.0, 60.0, 300.0, 900.0, 3600.0, 7200.0,
            ]),
            &["task"],
        )
        .expect(CONSTANT);
        let fire_lag = Histogram::with_opts(
            HistogramOpts::new(
                "turbosched_fire_lag_seconds",
                "From a scheduled tick to its child process start",
            )
            .buckets(vec![
                0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
            ]),
        )
        .expect(CONSTANT);
        let running = IntGauge::new("turbosched_running", "Attempts running").expect(CONSTANT);
        let queued =
            IntGauge::new("turbosched_queued", "Runs waiting for a worker slot").expect(CONSTANT);
        let retries = IntCounterVec::new(
            Opts::new(
                "turbosched_retries_total",
                "Attempts that failed and will be retried",
            ),
            &["task"],
        )
        .expect(CONSTANT);
        let orphans = IntCounter::new("turbosched_orphans_total", "Runs whose owner vanished")
            .expect(CONSTANT);
        let alert_posts = IntCounterVec::new(
            Opts::new(
                "turbosched_alert_posts_total",
                "POSTs of alert deliveries, by alert and outcome (delivered, failed, given_up)",
            ),
            &["alert", "outcome"],
        )
        .expect(CONSTANT);
        for collector in [
            Box::new(runs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(run_duration.clone()),
            Box::new(fire_lag.clone()),
            Box::new(running.clone()),
            Box::new(queued.clone()),
            Box::new(retries.clone()),
            Box::new(orphans.clone()),
            Box::new(alert_posts.clone()),
            Box::new(prometheus::process_collector::ProcessCollector::for_self()),
        ] {
            // Names are distinct constants: registration cannot collide.
            let _ = registry.register(collector);
        }
        Metrics {
            registry,
            runs,
            run_duration,
            fire_lag,
            running,
            queued,
            retries,
            orphans,
            alert_posts,
        }
    }

    /// Creates every alert's series at zero.
    pub fn know_alerts<'a>(&self, alerts: impl IntoIterator<Item = &'a str>) {
        for alert in alerts {
            for outcome in ["delivered", "failed", "given_up"] {
                self.alert_posts.with_label_values(&[alert, outcome]);
            }
        }
    }

    /// Creates every per-task series at zero, so a dashboard or an alert rule sees
    /// `turbosched_retries_total{task="x"} 0` before the first retry rather than nothing.
    pub(super) fn know_tasks<'a>(&self, tasks: impl IntoIterator<Item = &'a str>) {
        for task in tasks {
            self.retries.with_label_values(&[task]);
            for state in ["succeeded", "failed", "timed_out", "aborted", "skipped"] {
                self.runs.with_label_values(&[task, state]);
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut buffer = Vec::new();
        // Encoding into memory fails only on invalid metric families, which the
        // constants above are not.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}

/// Every metric's name, help and buckets are constants that `prometheus` accepts; only
/// a programming error could make a constructor fail, and the unit test below catches it.
const CONSTANT: &str = "metric options are valid constants";

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_metric_is_registered_and_rendered() {
        let metrics = Metrics::new();
        metrics
            .runs
            .with_label_values(&["ingestion", "succeeded"])
            .inc();
        metrics
            .run_duration
            .with_label_values(&["ingestion"])
            .observe(1.5);
        metrics.retries.with_label_values(&["ingestion"]).inc();
        metrics.know_tasks(["drift"]);
        let text = metrics.render();
        for name in [
            "turbosched_retries_total{task=\"drift\"} 0",
            "turbosched_runs_total{state=\"failed\",task=\"drift\"} 0",
            "turbosched_runs_total{state=\"succeeded\",task=\"ingestion\"} 1",
            "turbosched_run_duration_seconds_count{task=\"ingestion\"} 1",
            "turbosched_fire_lag_seconds_count 0",
            "turbosched_running 0",
            "turbosched_queued 0",
            "turbosched_retries_total{task=\"ingestion\"} 1",
            "turbosched_orphans_total 0",
            "process_resident_memory_bytes",
        ] {
            assert!(text.contains(name), "{name} missing from:\n{text}");
        }
    }
}
