//! What an operator installs beside the binary: shell completions and man pages, made
//! from the clap definitions by the binary itself, so they name every subcommand.

use std::process::Command;

fn turbosched(args: &[&str]) -> String {
    let output = Command::new(env!("CARGO_BIN_EXE_turbosched"))
        .args(args)
        .output()
        .unwrap();
    assert!(output.status.success(), "{args:?}: {output:?}");
    String::from_utf8(output.stdout).unwrap()
}

/// The subcommands `--help` lists (the hidden ones are not for people).
fn subcommands() -> Vec<String> {
    let help = turbosched(&["--help"]);
    let commands: Vec<String> = help
        .split("Commands:")
        .nth(1)
        .unwrap()
        .lines()
        .skip(1)
        .map(str::trim)
        .take_while(|l| !l.is_empty())
        .filter_map(|l| l.split_whitespace().next())
        .filter(|c| *c != "help")
        .map(str::to_string)
        .collect();
    for expected in ["serve", "config-schema", "completions", "man"] {
        assert!(commands.iter().any(|c| c == expected), "{help}");
    }
    commands
}

#[test]
fn completions_name_every_subcommand_in_each_shell() {
    let commands = subcommands();
    for shell in ["bash", "zsh", "fish"] {
        let script = turbosched(&["completions", shell]);
        for command in &commands {
            assert!(
                script.contains(command.as_str()),
                "{shell} completions lack `{command}`"
            );
        }
        for hidden in ["bench-seed", "worker"] {
            assert!(
                !script.contains(hidden),
                "{shell}: hidden subcommand `{hidden}`"
            );
        }
    }
    let bash = turbosched(&["completions", "bash"]);
    assert!(bash.contains("complete -F _turbosched"), "{bash}");
}

#[test]
fn the_man_page_is_roff_naming_every_subcommand_and_each_has_a_page() {
    let commands = subcommands();
    let page = turbosched(&["man"]);
    assert!(page.contains(".TH turbosched 1"), "{page}");
    assert!(page.contains(".SH SUBCOMMANDS"), "{page}");
    for command in &commands {
        // roff escapes '-' as '\-'.
        let roff = command.replace('-', "\\-");
        assert!(
            page.contains(&format!("turbosched\\-{roff}(1)")),
            "the man page does not list `{command}`"
        );
    }
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("man1");
    turbosched(&["man", "--out-dir", out.to_str().unwrap()]);
    for command in &commands {
        let sub = std::fs::read_to_string(out.join(format!("turbosched-{command}.1")))
            .unwrap_or_else(|e| panic!("no page for `{command}`: {e}"));
        assert!(
            sub.contains(&format!(".TH turbosched-{command} 1")),
            "{sub}"
        );
    }
    assert!(out.join("turbosched.1").is_file());
}

/// deploy/turbosched.service: a notify service with the watchdog, restarted on failure,
/// hardened, writing only where its data and logs live; `systemd-analyze verify` accepts
/// it where systemd is installed.
#[test]
fn the_systemd_unit_is_a_hardened_notify_service_with_a_watchdog() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(root.join("deploy/turbosched.service")).unwrap();
    let settings: Vec<&str> = unit
        .lines()
        .map(str::trim)
        .filter(|l| !l.starts_with('#') && l.contains('='))
        .collect();
    for expected in [
        "Type=notify",
        "NotifyAccess=main",
        "WatchdogSec=30s",
        "Restart=on-failure",
        "KillMode=mixed",
        "NoNewPrivileges=yes",
        "ProtectSystem=strict",
        "ReadWritePaths=/var/lib/turbosched /var/log/turbosched",
        "PrivateTmp=yes",
        "ProtectHome=yes",
        "CapabilityBoundingSet=",
        "ExecStart=/usr/local/bin/turbosched --config /etc/turbosched/scheduler.toml serve",
        "ExecReload=/bin/kill -HUP $MAINPID",
    ] {
        assert!(settings.contains(&expected), "the unit lacks {expected}");
    }
    let analyze = std::path::Path::new("/usr/bin/systemd-analyze");
    if !analyze.exists() {
        return;
    }
    // verify wants the ExecStart binary to exist: point it at the one under test.
    let dir = tempfile::tempdir().unwrap();
    let copy = dir.path().join("turbosched.service");
    std::fs::write(
        &copy,
        unit.replace(
            "/usr/local/bin/turbosched",
            env!("CARGO_BIN_EXE_turbosched"),
        ),
    )
    .unwrap();
    let output = Command::new(analyze)
        .args(["verify", "--man=no"])
        .arg(&copy)
        .output()
        .unwrap();
    assert!(
        output.status.success() && output.stderr.is_empty(),
        "systemd-analyze verify: {}",
        String::from_utf8_lossy(&output.stderr)
    );
}
