//! The reference cannot fall behind the code: every config key and every subcommand is
//! documented in README_SCHEDULE.md, and every documented key is accepted; the params a
//! config may give each built-in handler are exactly the ones its code reads.

use std::path::Path;

use turbosched::config::{
    self, ALERT_KEYS, API_KEYS, CALENDAR_KEYS, LOGGING_KEYS, POOL_KEYS, SCHEDULER_KEYS, TASK_KEYS,
};

fn reference() -> String {
    std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("README_SCHEDULE.md"))
        .unwrap()
}

#[test]
fn every_config_key_has_a_row_in_the_reference() {
    let text = reference();
    for key in SCHEDULER_KEYS
        .iter()
        .chain(API_KEYS)
        .chain(TASK_KEYS)
        .chain(LOGGING_KEYS)
        .chain(CALENDAR_KEYS)
        .chain(ALERT_KEYS)
        .chain(POOL_KEYS)
        .map(|key| key.name)
    {
        assert!(
            text.contains(&format!("| `{key}` |")),
            "README_SCHEDULE.md has no row for `{key}`"
        );
    }
}

#[test]
fn every_duration_bound_is_in_its_key_row() {
    let text = reference();
    for bound in config::DURATION_BOUNDS {
        let key = bound.key.split('.').next().unwrap_or(bound.key);
        let row = text
            .lines()
            .find(|line| line.starts_with(&format!("| `{key}` |")))
            .unwrap_or_else(|| panic!("README_SCHEDULE.md has no row for `{key}`"));
        assert!(
            row.contains(&format!("at most {}", bound.text)),
            "the row of `{key}` does not say \"at most {}\"",
            bound.text
        );
        assert_eq!(
            humantime::parse_duration(bound.text).ok(),
            Some(bound.max),
            "{}",
            bound.key
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

#[test]
fn the_params_config_accepts_are_the_params_each_handler_reads() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let readers = [
        "param_str(ctx, \"",
        "param_f64(\"",
        "param_u64(\"",
        "param_bool(\"",
        "nested_params(ctx, \"",
        "params().get(\"",
    ];
    for builtin in turbosched::builtins::BUILTINS {
        let handler = builtin.name;
        // A handler's code is the file named after it, wherever built-ins live.
        let candidates = [
            format!("src/pipeline/{handler}.rs"),
            format!("src/handlers/{handler}.rs"),
            format!("src/{handler}.rs"),
        ];
        let mut found = candidates.iter().filter(|file| root.join(file).is_file());
        let file = found
            .next()
            .unwrap_or_else(|| panic!("{handler}: no source file among {candidates:?}"));
        assert!(found.next().is_none(), "{handler}: two source files");
        let source = std::fs::read_to_string(root.join(file)).unwrap();
        // Maintenance reads its whole-number params through a local `number`.
        let local: &[&str] = if handler == "maintenance" {
            &["number(\""]
        } else {
            &[]
        };
        let mut read: Vec<&str> = readers
            .iter()
            .chain(local)
            .flat_map(|reader| source.split(reader).skip(1))
            .filter_map(|rest| rest.split('"').next())
            .collect();
        read.sort_unstable();
        read.dedup();
        assert_eq!(
            read, builtin.params,
            "{handler}: params read in {file} vs its row in builtins::BUILTINS"
        );
        assert_eq!(config::handler_params(handler), Some(builtin.params));
    }
}
