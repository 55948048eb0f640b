//! The reference cannot fall behind the code: every config key and every subcommand is
//! documented in README_SCHEDULE.md, and every documented key is accepted.

use std::path::Path;

use turbosched::config::{self, KNOWN_LOGGING_KEYS, KNOWN_SCHEDULER_KEYS, KNOWN_TASK_KEYS};

fn reference() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README_SCHEDULE.md"))
        .unwrap()
}

#[test]
fn every_config_key_has_a_row_in_the_reference() {
    let text = reference();
    for key in KNOWN_SCHEDULER_KEYS
        .iter()
        .chain(KNOWN_TASK_KEYS)
        .chain(KNOWN_LOGGING_KEYS)
    {
        assert!(
            text.contains(&format!("| `{key}` |")),
            "README_SCHEDULE.md has no row for `{key}`"
        );
    }
}

#[test]
fn every_documented_scheduler_key_is_accepted() {
    let text = reference();
    let section = text
        .split("### `[scheduler]`")
        .nth(1)
        .unwrap()
        .split("###")
        .next()
        .unwrap();
    let mut toml = String::from("[scheduler]\n");
    for line in section.lines().filter(|l| l.starts_with("| `")) {
        let key = line.split('`').nth(1).unwrap();
        let default = line.split('|').nth(2).unwrap().trim().trim_matches('`');
        toml.push_str(&format!("{key} = {default}\n"));
    }
    config::parse(&toml, Path::new("reference.toml"))
        .unwrap_or_else(|e| panic!("documented defaults refused:\n{e}\n{toml}"));
}

#[test]
fn every_subcommand_is_documented() {
    let text = reference();
    let output = std::process::Command::new(env!("CARGO_BIN_EXE_turbosched"))
        .arg("--help")
        .output()
        .unwrap();
    let help = String::from_utf8_lossy(&output.stdout);
    let commands: Vec<&str> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .collect();
    assert!(commands.len() >= 8, "{help}");
    for command in commands {
        assert!(
            text.contains(&format!("`turbosched {command}")),
            "README_SCHEDULE.md does not document `{command}`"
        );
    }
}
