//! `turbosched bench-cluster` on the real PostgreSQL server (`TURBOSCHED_TEST_POSTGRES`,
//! default `postgres://postgres@127.0.0.1:5432`): it runs its three setups and prints
//! the comparison table. Its figures are printed, never asserted — but a doubled tick
//! is a broken claim whatever the machine's load, so that one is.

use crate::support::*;

#[test]
fn bench_cluster_prints_the_table_of_its_three_setups_with_no_tick_doubled() {
    let server = std::env::var("TURBOSCHED_TEST_POSTGRES")
        .unwrap_or_else(|_| "postgres://postgres@127.0.0.1:5432".to_string());
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_turbosched"))
        .args([
            "bench-cluster",
            "--tasks",
            "5",
            "--seconds",
            "3",
            "--instances",
            "2",
            "--postgres",
            &server,
        ])
        .output()
        .unwrap();
    let text = stdout(&output);
    assert_eq!(output.status.code(), Some(0), "{text}\n{}", stderr(&output));
    let header = text
        .lines()
        .find(|l| l.contains("1 × SQLite") && l.contains("2 × PostgreSQL"))
        .unwrap_or_else(|| panic!("no table header:\n{text}"));
    assert!(header.contains("1 × PostgreSQL"), "{text}");
    let row = |name: &str| -> Vec<String> {
        let line = text
            .lines()
            .find(|l| l.starts_with(name))
            .unwrap_or_else(|| panic!("no row {name}:\n{text}"));
        line[name.len()..]
            .split_whitespace()
            .map(str::to_string)
            .collect()
    };
    assert_eq!(
        row("doubled (tick with > 1 run)"),
        ["0", "0", "0"],
        "{text}"
    );
    assert_eq!(row("ticks measured"), ["3", "3", "3"], "{text}");
    assert_eq!(row("fires expected"), ["15", "15", "15"], "{text}");
    assert_eq!(row("lag tick → run start, p50 (ms)").len(), 3, "{text}");
    // The cluster's runs are spread over its two instances' columns: a/b.
    assert_eq!(row("runs per instance")[2].split('/').count(), 2, "{text}");
    assert!(text.contains("spawn cost:"), "{text}");
    // Its databases are dropped.
    assert!(
        !stderr(&output).contains("DROP DATABASE"),
        "{}",
        stderr(&output)
    );
}
