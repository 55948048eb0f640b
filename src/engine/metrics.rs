//! Prometheus metrics the engine keeps and `GET /metrics` renders: runs by task and
//! state, run duration and fire lag histograms, running and queued gauges, retries,
//! orphans, and the process collector (CPU, memory, file descriptors).

use std::collections::{BTreeSet, HashSet};
use std::sync::Mutex;

use prometheus::proto::{Counter, LabelPair, Metric, MetricFamily, MetricType};
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
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
    pub(super) circuits_opened: IntCounterVec,
    pub(super) deadlines_missed: IntCounterVec,
    /// Each `[pools.<name>]`: its slots, the runs of its tasks running here, those queued.
    pool_slots: IntGaugeVec,
    pool_running: IntGaugeVec,
    pool_waiting: IntGaugeVec,
    /// The pools the gauges show.
    pools_shown: Mutex<Vec<String>>,
    /// Every task configured since start: each has its per-task counters in the
    /// exposition, at zero until the first count.
    known: Mutex<BTreeSet<String>>,
    /// POSTs of `[[alerts]]` deliveries, by alert and outcome (`delivered`, `failed`: an
    /// attempt that will be retried, `given_up`).
    pub alert_posts: IntCounterVec,
}

const RUNS_HELP: &str = "Runs that reached a terminal state, by task and state";
const RETRIES_HELP: &str = "Attempts that failed and will be retried";
const CIRCUIT_OPENED_HELP: &str =
    "Times a task's circuit opened (max_consecutive_failures reached: schedule paused)";
const DEADLINE_MISSED_HELP: &str =
    "Scheduled runs not succeeded within their task's deadline of their tick";

/// The terminal states `turbosched_runs_total` counts, each shown at zero from the start.
const COUNTED_STATES: [&str; 5] = ["succeeded", "failed", "timed_out", "aborted", "skipped"];

impl Metrics {
    /// A fresh registry with every metric at zero.
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let runs = IntCounterVec::new(
            Opts::new("turbosched_runs_total", RUNS_HELP),
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
            Opts::new("turbosched_retries_total", RETRIES_HELP),
            &["task"],
        )
        .expect(CONSTANT);
        let orphans = IntCounter::new("turbosched_orphans_total", "Runs whose owner vanished")
            .expect(CONSTANT);
        let circuits_opened = IntCounterVec::new(
            Opts::new("turbosched_circuit_opened_total", CIRCUIT_OPENED_HELP),
            &["task"],
        )
        .expect(CONSTANT);
        let deadlines_missed = IntCounterVec::new(
            Opts::new("turbosched_deadline_missed_total", DEADLINE_MISSED_HELP),
            &["task"],
        )
        .expect(CONSTANT);
        let alert_posts = IntCounterVec::new(
            Opts::new(
                "turbosched_alert_posts_total",
                "POSTs of alert deliveries, by alert and outcome (delivered, failed, given_up)",
            ),
            &["alert", "outcome"],
        )
        .expect(CONSTANT);
        let pool_gauge = |name: &str, help: &str| {
            IntGaugeVec::new(Opts::new(name, help), &["pool"]).expect(CONSTANT)
        };
        let pool_slots = pool_gauge("turbosched_pool_slots", "Slots of each pool");
        let pool_running = pool_gauge(
            "turbosched_pool_running",
            "Runs of each pool's tasks running on this instance",
        );
        let pool_waiting = pool_gauge(
            "turbosched_pool_waiting",
            "Runs of each pool's tasks queued on this instance, waiting for a slot or a worker",
        );
        for collector in [
            Box::new(runs.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(pool_slots.clone()),
            Box::new(pool_running.clone()),
            Box::new(pool_waiting.clone()),
            Box::new(run_duration.clone()),
            Box::new(fire_lag.clone()),
            Box::new(running.clone()),
            Box::new(queued.clone()),
            Box::new(retries.clone()),
            Box::new(orphans.clone()),
            Box::new(circuits_opened.clone()),
            Box::new(deadlines_missed.clone()),
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
            circuits_opened,
            deadlines_missed,
            known: Mutex::new(BTreeSet::new()),
            alert_posts,
            pool_slots,
            pool_running,
            pool_waiting,
            pools_shown: Mutex::default(),
        }
    }

    /// Sets the pool gauges to `pools`, the configured pools (a pool removed by a reload
    /// disappears from the exposition).
    pub(super) fn set_pools(&self, pools: &[super::PoolSnapshot]) {
        let mut shown = self.pools_shown.lock().unwrap_or_else(|p| p.into_inner());
        for gone in shown
            .iter()
            .filter(|name| !pools.iter().any(|p| &p.name == *name))
        {
            for gauge in [&self.pool_slots, &self.pool_running, &self.pool_waiting] {
                let _ = gauge.remove_label_values(&[gone.as_str()]);
            }
        }
        *shown = pools.iter().map(|p| p.name.clone()).collect();
        for pool in pools {
            let labels = [pool.name.as_str()];
            self.pool_slots
                .with_label_values(&labels)
                .set(pool.slots as i64);
            self.pool_running
                .with_label_values(&labels)
                .set(pool.running as i64);
            self.pool_waiting
                .with_label_values(&labels)
                .set(pool.waiting as i64);
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

    /// Shows every per-task series at zero from now on, so a dashboard or an alert rule
    /// sees `turbosched_retries_total{task="x"} 0` before the first retry rather than
    /// nothing. The zeros are written at render time, not kept as series: six series a
    /// task were 3.8 MiB of the service's memory with 1,000 tasks.
    pub(super) fn know_tasks<'a>(&self, tasks: impl IntoIterator<Item = &'a str>) {
        let mut known = self.known.lock().unwrap_or_else(|p| p.into_inner());
        for task in tasks {
            if !known.contains(task) {
                known.insert(task.to_string());
            }
        }
    }

    /// The Prometheus text exposition.
    pub fn render(&self) -> String {
        let mut families = self.registry.gather();
        {
            let known = self.known.lock().unwrap_or_else(|p| p.into_inner());
            if !known.is_empty() {
                // `gather` leaves out a family without series: zeros need it there.
                for (name, help) in [
                    ("turbosched_retries_total", RETRIES_HELP),
                    ("turbosched_runs_total", RUNS_HELP),
                    ("turbosched_circuit_opened_total", CIRCUIT_OPENED_HELP),
                    ("turbosched_deadline_missed_total", DEADLINE_MISSED_HELP),
                ] {
                    if !families.iter().any(|family| family.name() == name) {
                        let mut family = MetricFamily::default();
                        family.set_name(name.to_string());
                        family.set_help(help.to_string());
                        family.set_field_type(MetricType::COUNTER);
                        families.push(family);
                    }
                }
                families.sort_by(|a, b| a.name().cmp(b.name()));
            }
            for family in &mut families {
                match family.name() {
                    "turbosched_retries_total"
                    | "turbosched_circuit_opened_total"
                    | "turbosched_deadline_missed_total" => add_zeros(family, &known, &[]),
                    "turbosched_runs_total" => add_zeros(family, &known, &COUNTED_STATES),
                    _ => {}
                }
            }
        }
        let mut buffer = Vec::new();
        // Encoding into memory fails only on invalid metric families, which the
        // constants above are not.
        let _ = TextEncoder::new().encode(&families, &mut buffer);
        String::from_utf8(buffer).unwrap_or_default()
    }
}

/// Adds to a per-task counter `family` a zero for each known task (and each of `states`,
/// when the family is labelled by state too) it has no series for, in the order `gather`
/// gives (labels by name, series by label values).
fn add_zeros(family: &mut MetricFamily, known: &BTreeSet<String>, states: &[&str]) {
    let label = |metric: &Metric, name: &str| -> String {
        metric
            .get_label()
            .iter()
            .find(|pair| pair.name() == name)
            .map(|pair| pair.value().to_string())
            .unwrap_or_default()
    };
    let present: HashSet<(String, String)> = family
        .get_metric()
        .iter()
        .map(|metric| (label(metric, "state"), label(metric, "task")))
        .collect();
    let pair = |name: &str, value: &str| {
        let mut pair = LabelPair::default();
        pair.set_name(name.to_string());
        pair.set_value(value.to_string());
        pair
    };
    let by_state: &[&str] = if states.is_empty() { &[""] } else { states };
    let mut added = false;
    for task in known {
        for state in by_state {
            if present.contains(&(state.to_string(), task.clone())) {
                continue;
            }
            let mut labels = Vec::new();
            if !state.is_empty() {
                labels.push(pair("state", state));
            }
            labels.push(pair("task", task));
            let mut metric = Metric::from_label(labels);
            let mut zero = Counter::default();
            zero.set_value(0.0);
            metric.set_counter(zero);
            family.mut_metric().push(metric);
            added = true;
        }
    }
    if added {
        family.mut_metric().sort_by(|a, b| {
            let values = |m: &Metric| -> Vec<String> {
                m.get_label()
                    .iter()
                    .map(|p| p.value().to_string())
                    .collect()
            };
            values(a).cmp(&values(b))
        });
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
    fn pool_gauges_show_each_configured_pool_and_drop_a_removed_one() {
        let metrics = Metrics::new();
        let pool = |name: &str, slots, running, waiting| super::super::PoolSnapshot {
            name: name.into(),
            slots,
            running,
            waiting,
        };
        metrics.set_pools(&[pool("cpu", 4, 0, 0), pool("gpu", 2, 1, 3)]);
        let text = metrics.render();
        for line in [
            "turbosched_pool_slots{pool=\"gpu\"} 2",
            "turbosched_pool_running{pool=\"gpu\"} 1",
            "turbosched_pool_waiting{pool=\"gpu\"} 3",
            "turbosched_pool_slots{pool=\"cpu\"} 4",
            "turbosched_pool_waiting{pool=\"cpu\"} 0",
        ] {
            assert!(text.contains(line), "{line} missing from:\n{text}");
        }
        metrics.set_pools(&[pool("gpu", 2, 0, 0)]);
        let text = metrics.render();
        assert!(!text.contains("pool=\"cpu\""), "{text}");
        assert!(
            text.contains("turbosched_pool_running{pool=\"gpu\"} 0"),
            "{text}"
        );
    }

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
            "turbosched_circuit_opened_total{task=\"drift\"} 0",
            "turbosched_deadline_missed_total{task=\"drift\"} 0",
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

    /// Issue 13, RSS: six series held per task were 3.8 MiB with 1,000 tasks. Known tasks
    /// hold no series; their zeros are written at render time, once each, in order.
    #[test]
    fn known_tasks_show_zero_counters_without_holding_a_series_each() {
        let metrics = Metrics::new();
        metrics.know_tasks(["b", "a"]);
        let held: usize = metrics
            .registry
            .gather()
            .iter()
            .filter(|family| {
                ["turbosched_runs_total", "turbosched_retries_total"].contains(&family.name())
            })
            .map(|family| family.get_metric().len())
            .sum();
        assert_eq!(held, 0, "no per-task series held before a count");
        metrics.runs.with_label_values(&["b", "failed"]).inc();
        let text = metrics.render();
        let lines: Vec<&str> = text
            .lines()
            .filter(|line| line.starts_with("turbosched_runs_total"))
            .collect();
        assert_eq!(lines.len(), 10, "5 states × 2 tasks:\n{text}");
        let a_failed = "turbosched_runs_total{state=\"failed\",task=\"a\"} 0";
        let b_failed = "turbosched_runs_total{state=\"failed\",task=\"b\"} 1";
        let a_skipped = "turbosched_runs_total{state=\"skipped\",task=\"a\"} 0";
        let position = |line: &str| lines.iter().position(|l| *l == line);
        assert!(
            position(a_failed) < position(b_failed) && position(b_failed) < position(a_skipped),
            "series in gather's order (by label values):\n{text}"
        );
        assert!(position(a_skipped).is_some(), "{text}");
        assert_eq!(
            text.matches("# TYPE turbosched_runs_total counter").count(),
            1
        );
        assert!(
            text.contains("turbosched_retries_total{task=\"a\"} 0"),
            "{text}"
        );
        assert!(
            text.contains("turbosched_retries_total{task=\"b\"} 0"),
            "{text}"
        );
    }
}
