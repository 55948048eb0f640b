//! `turbosched bench`: it prints each of issue 13's figures beside the floor measured in
//! the same run. The figures are printed, never asserted — but a tick missed or doubled
//! at twenty tasks is a broken claim whatever the machine's load, so those are.

use crate::support::*;

/// The rest of the line that starts with `label`.
fn figure<'a>(text: &'a str, label: &str) -> &'a str {
    text.lines()
        .find_map(|line| line.strip_prefix(label))
        .unwrap_or_else(|| panic!("no line {label:?}:\n{text}"))
        .trim()
}

/// The number `figure` begins with.
fn leading<T: std::str::FromStr>(figure: &str) -> T {
    figure
        .split_whitespace()
        .next()
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no leading number: {figure}"))
}

/// `turbosched bench` of twenty tasks for two seconds (and `more` arguments) in `dir`:
/// its output, once it has ended well with no tick missed or doubled.
fn bench_of_twenty_tasks(dir: &std::path::Path, more: &[&str]) -> String {
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_turbosched"))
        .args([
            "bench",
            "--tasks",
            "20",
            "--seconds",
            "2",
            "--startup-tasks",
            "0",
        ])
        .args(more)
        .arg("--dir")
        .arg(dir)
        .output()
        .unwrap();
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}\n{}", stderr(&output));
    assert_eq!(figure(&text, "fires missed:"), "0", "{text}");
    assert_eq!(figure(&text, "fires doubled:"), "0", "{text}");
    text
}

#[test]
fn bench_prints_lag_cpu_children_descriptors_and_fsyncs_beside_the_floor_of_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let text = bench_of_twenty_tasks(dir.path(), &[]);
    // The floor's CPU per child, the spawning process's and the child's: real figures
    // (a failed `getrusage` would print 0 and every ratio "n/a").
    let floor = figure(&text, "burst floor:");
    let floor_cpu: Vec<f64> = floor
        .split_once("CPU per child:")
        .unwrap_or_else(|| panic!("no CPU per child: {floor}"))
        .1
        .split(" µs")
        .filter_map(|part| part.rsplit(' ').next()?.parse().ok())
        .collect();
    assert_eq!(floor_cpu.len(), 2, "{floor}");
    assert!(floor_cpu.iter().all(|cpu| *cpu > 0.0), "{floor}");
    let ratio = figure(&text, "burst ratio:");
    assert!(ratio.contains("lag p99 / burst floor"), "{text}");
    // The steady state beside every tick: from the second tick on, each task's log file
    // exists (the first run of a task creates it). A two-second window has two ticks.
    assert!(ratio.contains("from the second tick"), "{ratio}");
    assert!(!ratio.contains("no samples"), "{ratio}");
    let steady = figure(&text, "  from the second tick");
    assert!(steady.contains("(20 samples)"), "{text}");
    let cpu = figure(&text, "service CPU per run:");
    assert!(
        cpu.contains("× the floor's")
            && cpu.contains("from the second tick")
            && cpu.contains("target ≤ 100 µs"),
        "{cpu}"
    );
    // Split: the spawner threads' part (starting the children) and the scheduler's own.
    let split = figure(&text, "  of which spawners:");
    assert!(split.contains("the scheduler's own:"), "{split}");
    let spawners: f64 = leading(split);
    // Twenty starts a tick are handed to the spawner threads together: they spent CPU.
    assert!(spawners > 0.0, "{split}");
    let switches = figure(&text, "context switches:");
    let per_run: f64 = leading(switches);
    // Every run sleeps somewhere: a runner waits for its child's output.
    assert!(per_run > 0.0, "{switches}");
    assert!(
        figure(&text, "children CPU per run:").contains("× the floor's"),
        "{text}"
    );
    let descriptors: u64 = leading(figure(&text, "peak descriptors open:"));
    // Standard streams, the database and its WAL at the least.
    assert!(descriptors >= 5, "{text}");
    assert!(figure(&text, "commits (fsyncs):").contains("/s"), "{text}");
    assert!(
        figure(&text, "peak RSS (service):").ends_with("MiB"),
        "{text}"
    );
}

#[test]
fn bench_distinct_prints_the_lone_fire_beside_its_floor_of_the_same_run() {
    let dir = tempfile::tempdir().unwrap();
    let text = bench_of_twenty_tasks(dir.path(), &["--distinct"]);
    // The floor: a synced write and a spawn, real figures in milliseconds.
    let floor = figure(&text, "lone-fire floor:");
    let p99: f64 = floor
        .split("p99 ")
        .nth(1)
        .and_then(|rest| rest.split(" ms").next()?.parse().ok())
        .unwrap_or_else(|| panic!("no p99: {floor}"));
    assert!(p99 > 0.0, "{floor}");
    assert!(
        floor.contains("ms apart, as a fire claimed at its tick meets the machine"),
        "{floor}"
    );
    // Beside it, the same rounds back to back: what the machine does kept awake.
    let hot = figure(&text, "  back to back:");
    assert!(hot.contains("rounds with no pause"), "{hot}");
    // And the spawn without the commit: the floor of a fire claimed before its tick.
    let alone = figure(&text, "  spawn alone:");
    assert!(
        alone.contains("the start without the commit") && alone.contains(" ms  p99 "),
        "{alone}"
    );
    let latency = figure(&text, "lone-fire latency:");
    assert!(
        latency.contains("× the floor's p99")
            && latency.contains("× the spawn alone's")
            && latency.contains("target p99 ≤ 2 ms"),
        "{latency}"
    );
    // The floor's scratch file is gone; the database stays for a look afterwards.
    assert!(!dir.path().join("lone-floor.wal").exists());
    assert!(dir.path().join("bench.db").exists());
}
