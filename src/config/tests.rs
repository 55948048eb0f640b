//! TOML in, `Config` or errors out. Each error is written as the operator sees it.

use std::path::Path;
use std::time::Duration;

use super::*;

const FILE: &str = "config/scheduler.toml";

/// `text` must be refused with exactly `expected` (without the file name prefix).
fn check_errors(text: &str, expected: &[&str]) {
    let errors = parse(text, Path::new(FILE)).expect_err("config should be refused");
    let got: Vec<String> = errors
        .0
        .iter()
        .map(|e| {
            e.to_string()
                .trim_start_matches(&format!("{FILE}:"))
                .to_string()
        })
        .collect();
    assert_eq!(got, expected, "\n--- config ---\n{text}");
}

fn check_ok(text: &str) -> Config {
    match parse(text, Path::new(FILE)) {
        Ok(config) => config,
        Err(errors) => panic!("config refused:\n{errors}"),
    }
}

const PING: &str = "[tasks.a]\nhandler = \"ping\"\n";

#[test]
fn a_minimal_task_gets_every_default() {
    let config = check_ok(PING);
    let task = config.task("a").unwrap();
    assert_eq!(task.handler, Handler::Builtin("ping".into()));
    assert!(task.schedule.is_none());
    assert_eq!(task.timeout, Duration::from_secs(3600));
    assert_eq!(task.retries, 0);
    assert_eq!(task.misfire, MisfirePolicy::RunOnce);
    assert_eq!(task.overlap, Overlap::Skip);
    assert!(task.enabled);
    assert_eq!(config.scheduler.max_workers, 4);
    assert_eq!(config.scheduler.timezone, chrono_tz::UTC);
    assert_eq!(config.hash.len(), 64);
}

#[test]
fn defaults_apply_to_every_task_and_a_task_overrides_them() {
    let config = check_ok(
        r#"
[scheduler]
timezone = "Europe/Berlin"
[defaults]
timeout = "90m"
retries = 2
retry_backoff = { initial = "1s", factor = 3.0 }
[tasks.a]
handler = "ping"
schedule = "0 30 2 * * *"
[tasks.b]
handler = "ping"
timeout = "5s"
timezone = "America/New_York"
retry_backoff = { max = "20s", jitter = false }
"#,
    );
    let a = config.task("a").unwrap();
    let b = config.task("b").unwrap();
    assert_eq!(a.timeout, Duration::from_secs(5400));
    assert_eq!(b.timeout, Duration::from_secs(5));
    assert_eq!((a.retries, b.retries), (2, 2));
    assert_eq!(a.timezone, chrono_tz::Europe::Berlin);
    assert_eq!(b.timezone, chrono_tz::America::New_York);
    assert_eq!(
        b.backoff,
        Backoff {
            initial: Duration::from_secs(1),
            factor: 3.0,
            max: Duration::from_secs(20),
            jitter: false
        }
    );
}

#[test]
fn commands_are_argv_unless_shell_is_asked_for() {
    let config = check_ok(
        r#"
[tasks.argv]
command = ["/bin/echo", "hello world"]
cwd = "/tmp"
env = { GREETING = "hi" }
[tasks.line]
command = "echo $HOME | wc -c"
shell = true
"#,
    );
    let Handler::Command(argv) = &config.task("argv").unwrap().handler else {
        panic!("not a command")
    };
    assert_eq!(argv.argv, vec!["/bin/echo", "hello world"]);
    assert!(!argv.shell);
    assert_eq!(argv.env.get("GREETING").map(String::as_str), Some("hi"));
    let Handler::Command(line) = &config.task("line").unwrap().handler else {
        panic!("not a command")
    };
    assert!(line.shell);
}

/// Issue 15, item 2: serde stops at a table's first unknown key; every one is reported,
/// with the other errors of the file, in one pass.
#[test]
fn every_unknown_key_of_a_task_and_every_other_error_is_reported_in_one_pass() {
    check_errors(
        "[tasks.a]\nhandler = \"ping\"\nschedul = \"* * * * *\"\ntimout = \"10s\"\n\
         [tasks.b]\nhandler = \"ping\"\nschedule = \"61 * * * *\"\n",
        &[
            "3:1: tasks.a.schedul: unknown key (did you mean \"schedule\"?)",
            "4:1: tasks.a.timout: unknown key (did you mean \"timeout\"?)",
            "7:12: tasks.b.schedule: invalid cron expression \"61 * * * *\": minute field \"61\": expected 0–59, found 61",
        ],
    );
}

#[test]
fn unknown_keys_are_refused_with_a_suggestion() {
    check_errors(
        "[tasks.a]\nhandler = \"ping\"\ntimout = \"5m\"\n",
        &["3:1: tasks.a.timout: unknown key (did you mean \"timeout\"?)"],
    );
    check_errors(
        "[schedular]\n",
        &["1:2: schedular: unknown section (did you mean [scheduler]?)"],
    );
    check_errors(
        "[scheduler]\nmax_worker = 3\n",
        &["2:1: scheduler.max_worker: unknown key (did you mean \"max_workers\"?)"],
    );
}

/// Issue "One room per job": a key that is the end or the start of a known key is close
/// to it, however many letters the known key adds.
#[test]
fn an_unknown_key_that_is_part_of_a_known_key_gets_a_suggestion() {
    check_errors(
        "[logging]\nbackups = 3\n",
        &["2:1: logging.backups: unknown key (did you mean \"task_backups\"?)"],
    );
    check_errors(
        "[logging]\nsize = \"10MB\"\n",
        &["2:1: logging.size: unknown key (did you mean \"max_size\"?)"],
    );
}

#[test]
fn a_bad_cron_expression_is_refused_at_its_value() {
    let errors = parse(
        &format!("{PING}schedule = \"61 * * * *\"\n"),
        Path::new(FILE),
    )
    .unwrap_err();
    assert_eq!(errors.0.len(), 1);
    let err = &errors.0[0];
    assert_eq!(
        (err.line, err.column, err.key.as_str()),
        (3, 12, "tasks.a.schedule")
    );
    // Issue 15, item 9: the field, its range and what was found.
    assert_eq!(
        err.message,
        "invalid cron expression \"61 * * * *\": minute field \"61\": expected 0–59, found 61"
    );
}

#[test]
fn a_bad_duration_says_what_was_expected_and_found() {
    check_errors(
        "[tasks.training]\nhandler = \"ping\"\ntimeout = \"2 hourz\"\n",
        &["3:11: tasks.training.timeout: expected a duration such as \"90m\", found \"2 hourz\""],
    );
}

#[test]
fn an_unknown_handler_is_refused_with_a_suggestion() {
    check_errors(
        "[tasks.training]\nhandler = \"pnig\"\n",
        &["2:11: tasks.training.handler: unknown handler \"pnig\" for task training (did you mean \"ping\"?)"],
    );
}

#[test]
fn an_unknown_dependency_is_refused_at_its_name() {
    check_errors(
        "[tasks.ingestion]\nhandler = \"ping\"\n[tasks.training]\nhandler = \"ping\"\ndepends_on = [\"ingestoin\"]\n",
        &["5:15: tasks.training.depends_on: unknown task \"ingestoin\" (did you mean \"ingestion\"?)"],
    );
}

#[test]
fn a_dependency_cycle_is_named_in_full() {
    check_errors(
        r#"[tasks.a]
handler = "ping"
depends_on = ["c"]
[tasks.b]
handler = "ping"
depends_on = ["a"]
[tasks.c]
handler = "ping"
depends_on = ["b"]
"#,
        &["3:15: tasks.a.depends_on: dependency cycle: a -> c -> b -> a (each task depends on the next)"],
    );
    check_errors(
        "[tasks.a]\nhandler = \"ping\"\ndepends_on = [\"a\"]\n",
        &["3:15: tasks.a.depends_on: dependency cycle: a -> a (each task depends on the next)"],
    );
}

#[test]
fn a_bad_time_zone_is_refused() {
    check_errors(
        "[scheduler]\ntimezone = \"America/Gotham\"\n",
        &["2:12: scheduler.timezone: expected an IANA time zone such as \"America/New_York\", found \"America/Gotham\""],
    );
}

#[test]
fn bad_enumerations_list_the_choices() {
    check_errors(
        &format!("{PING}misfire = \"sometimes\"\noverlap = \"stack\"\n"),
        &[
            "3:11: tasks.a.misfire: expected one of \"run_once\", \"skip\", \"run_all\", found \"sometimes\"",
            "4:11: tasks.a.overlap: expected one of \"skip\", \"queue\", \"replace\", found \"stack\"",
        ],
    );
}

#[test]
fn a_command_string_without_shell_is_refused_and_the_fix_is_offered() {
    check_errors(
        "[tasks.a]\ncommand = \"rm -rf /tmp/x\"\n",
        &["2:11: tasks.a.command: expected an array of arguments such as [\"/bin/echo\", \"hi\"], found the string \"rm -rf /tmp/x\"; set shell = true to run a command line through /bin/sh"],
    );
}

#[test]
fn a_task_without_handler_or_command_is_refused() {
    let errors = parse("[tasks.a]\nschedule = \"@daily\"\n", Path::new(FILE)).unwrap_err();
    assert_eq!(errors.0[0].key, "tasks.a");
    assert!(
        errors.0[0].message.starts_with("no handler"),
        "{}",
        errors.0[0].message
    );
}

#[test]
fn invalid_toml_is_refused_with_its_place() {
    let errors = parse("[tasks.a]\nhandler = \"ping\n", Path::new(FILE)).unwrap_err();
    assert_eq!(errors.0.len(), 1);
    assert_eq!(errors.0[0].line, 2);
    assert!(
        errors.0[0].message.starts_with("invalid TOML"),
        "{}",
        errors.0[0].message
    );
}

#[test]
fn every_error_in_the_file_is_reported_not_only_the_first() {
    let errors = parse(
        r#"[tasks.a]
handler = "ping"
timeout = "soon"
[tasks.b]
handler = "pong"
[tasks.c]
handler = "ping"
schedule = "every day"
"#,
        Path::new(FILE),
    )
    .unwrap_err();
    let lines: Vec<usize> = errors.0.iter().map(|e| e.line).collect();
    assert_eq!(lines, vec![3, 5, 8]);
}

#[test]
fn scheduler_limits_are_checked() {
    check_errors(
        "[scheduler]\nmax_workers = 0\n",
        &["2:15: scheduler.max_workers: expected a whole number of at least 1, found 0"],
    );
    check_errors(
        "[scheduler]\nheartbeat_interval = \"10s\"\nheartbeat_timeout = \"5s\"\n",
        &["3:21: scheduler.heartbeat_timeout: must be longer than heartbeat_interval (10s), found 5s"],
    );
}

#[test]
fn an_unreadable_file_is_an_error_without_a_place() {
    let err = load(Path::new("/nonexistent/scheduler.toml")).unwrap_err();
    assert!(
        err.to_string()
            .starts_with("/nonexistent/scheduler.toml: cannot read config file"),
        "{err}"
    );
}

#[test]
fn downstream_tasks_come_in_dependency_order() {
    let config = check_ok(
        r#"
[tasks.ingestion]
handler = "ping"
[tasks.training]
handler = "ping"
depends_on = ["ingestion"]
[tasks.predictions]
handler = "ping"
depends_on = ["training"]
[tasks.backtest]
handler = "ping"
depends_on = ["ingestion"]
[tasks.drift]
handler = "ping"
depends_on = ["training", "backtest"]
[tasks.maintenance]
handler = "ping"
"#,
    );
    let names = |tasks: Vec<TaskName>| tasks.into_iter().map(|t| t.0).collect::<Vec<_>>();
    assert_eq!(
        names(config.downstream_of(&TaskName::from("ingestion"))),
        vec!["backtest", "training", "drift", "predictions"]
    );
    assert_eq!(
        names(config.downstream_of(&TaskName::from("backtest"))),
        vec!["drift"]
    );
}

#[test]
fn backoff_grows_by_its_factor_up_to_its_cap() {
    let backoff = Backoff {
        initial: Duration::from_secs(1),
        factor: 2.0,
        max: Duration::from_secs(5),
        jitter: false,
    };
    let delays: Vec<u64> = (1..=5).map(|n| backoff.delay(n).as_secs()).collect();
    assert_eq!(delays, vec![1, 2, 4, 5, 5]);
    let jittered = Backoff {
        jitter: true,
        ..backoff
    };
    for attempt in 1..=5 {
        assert!(jittered.delay(attempt) <= backoff.ceiling(attempt));
    }
}

#[test]
fn the_shipped_config_is_valid() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/scheduler.toml");
    let config = load(&path).unwrap_or_else(|e| panic!("{e}"));
    assert!(!config.tasks.is_empty());
}

#[test]
fn a_param_the_handler_does_not_read_is_refused_with_a_suggestion() {
    check_errors(
        "[tasks.training]\nhandler = \"train\"\nparams = { min_acu = 0.6, model = \"gbdt\" }\n\
         [tasks.check]\nhandler = \"ping\"\nparams = { colour = \"red\" }\n",
        &[
            "3:10: tasks.training.params.min_acu: unknown param for handler \"train\" (did you mean \"min_auc\"?)",
            "6:10: tasks.check.params.colour: unknown param for handler \"ping\" (it reads fail_times, fatal, progress, sleep_sec)",
        ],
    );
    // External commands get no params checking: their params are not read by turbosched.
    check_ok("[tasks.x]\ncommand = [\"true\"]\nparams = { anything = 1 }\n");
}

// Regression tests for "No fire lost under the faults operators meet", item 7: configs
// that can never work are refused, each error at its value.

#[test]
fn a_schedule_that_never_fires_is_refused_naming_its_line() {
    check_errors(
        &format!("{PING}schedule = \"0 0 0 30 2 *\"\n"),
        &["3:12: tasks.a.schedule: schedule \"0 0 0 30 2 *\" never fires (no date matches)"],
    );
    check_errors(
        "[defaults]\nschedule = \"0 0 31 2 *\"\n[tasks.a]\nhandler = \"ping\"\n",
        &["2:12: defaults.schedule: schedule \"0 0 31 2 *\" never fires (no date matches)"],
    );
    // Once every four years is still a schedule.
    check_ok(&format!("{PING}schedule = \"0 0 29 2 *\"\n"));
}

#[test]
fn a_year_field_is_refused_as_a_seventh_field() {
    check_errors(
        &format!("{PING}schedule = \"0 0 0 1 1 * 2020\"\n"),
        &["3:12: tasks.a.schedule: invalid cron expression \"0 0 0 1 1 * 2020\": expected 5 or 6 fields (min hour dom month dow, or sec min hour dom month dow), found 7"],
    );
    check_errors(
        &format!("{PING}schedule = \"0 0 1 1\"\n"),
        &["3:12: tasks.a.schedule: invalid cron expression \"0 0 1 1\": expected 5 or 6 fields (min hour dom month dow, or sec min hour dom month dow), found 4"],
    );
}

#[test]
fn an_absurd_kill_grace_is_refused_naming_its_bound() {
    check_errors(
        "[scheduler]\nkill_grace = \"500000000000d\"\n",
        &["2:14: scheduler.kill_grace: expected a duration of at most 1h, found \"500000000000d\""],
    );
    check_ok(&format!("[scheduler]\nkill_grace = \"1h\"\n{PING}"));
}

#[test]
fn every_duration_key_has_an_upper_bound() {
    check_errors(
        r#"[scheduler]
heartbeat_interval = "11m"
heartbeat_timeout = "61m"
shutdown_grace = "61m"
[defaults]
misfire_grace = "367d"
[tasks.a]
handler = "ping"
timeout = "8d"
dependency_max_age = "367d"
retry_backoff = { initial = "2d", max = "25h" }
"#,
        &[
            "2:22: scheduler.heartbeat_interval: expected a duration of at most 10m, found \"11m\"",
            "3:21: scheduler.heartbeat_timeout: expected a duration of at most 1h, found \"61m\"",
            "4:18: scheduler.shutdown_grace: expected a duration of at most 1h, found \"61m\"",
            "6:17: defaults.misfire_grace: expected a duration of at most 366d, found \"367d\"",
            "9:11: tasks.a.timeout: expected a duration of at most 7d, found \"8d\"",
            "10:22: tasks.a.dependency_max_age: expected a duration of at most 366d, found \"367d\"",
            "11:29: tasks.a.retry_backoff.initial: expected a duration of at most 1d, found \"2d\"",
            "11:41: tasks.a.retry_backoff.max: expected a duration of at most 1d, found \"25h\"",
        ],
    );
    // Each bound itself is accepted.
    check_ok(
        r#"[scheduler]
heartbeat_interval = "10m"
heartbeat_timeout = "1h"
kill_grace = "1h"
shutdown_grace = "1h"
[tasks.a]
handler = "ping"
timeout = "7d"
misfire_grace = "366d"
dependency_max_age = "366d"
retry_backoff = { initial = "1d", max = "1d" }
"#,
    );
}

#[test]
fn an_empty_file_is_refused_at_its_start() {
    let expected = ["1:1: the file is empty: it defines no tasks (add a [tasks.<name>] table)"];
    check_errors("", &expected);
    check_errors("\n  \n# only a comment\n", &expected);
}

#[test]
fn an_api_address_that_cannot_be_bound_is_refused_at_its_value() {
    check_errors(
        &format!("[api]\nbind = \"127.0.0.1:99999\"\n{PING}"),
        &["2:8: api.bind: expected an address such as \"127.0.0.1:5000\", found \"127.0.0.1:99999\" (a port is 0 to 65535)"],
    );
    check_errors(
        &format!("[api]\nbind = \"localhost:5000\"\n{PING}"),
        &["2:8: api.bind: expected an address such as \"127.0.0.1:5000\", found \"localhost:5000\" (an IP address and a port)"],
    );
    check_ok(&format!("[api]\nbind = \"[::1]:0\"\n{PING}"));
}

// Regression tests for "No fire lost under the faults operators meet", item 8: every
// error names its full dotted key, its line and its column.

#[test]
fn a_wrong_value_type_names_its_key_line_and_column() {
    check_errors(
        "[scheduler]\nmax_workers = \"four\"\n",
        &["2:15: scheduler.max_workers: expected a whole number, found string \"four\""],
    );
    check_errors(
        r#"[tasks.a]
handler = "ping"
retries = "three"
[tasks.b]
handler = "ping"
retry_backoff = { factor = "fast" }
[tasks.c]
command = 5
[tasks.d]
handler = "ping"
retries = -1
"#,
        &[
            "3:11: tasks.a.retries: expected a whole number from 0 to 4294967295, found string \"three\"",
            "6:28: tasks.b.retry_backoff.factor: expected a number, found string \"fast\"",
            "8:11: tasks.c.command: expected an array of arguments such as [\"/bin/echo\", \"hi\"], or one string with shell = true",
            "11:11: tasks.d.retries: expected a whole number from 0 to 4294967295, found integer `-1`",
        ],
    );
}

#[test]
fn a_duplicate_key_names_its_key_and_its_first_line() {
    check_errors(
        "[scheduler]\nmax_workers = 2\nmax_workers = 3\n",
        &["3:1: scheduler.max_workers: duplicate key (first set on line 2)"],
    );
    check_errors(
        "[tasks.a]\nhandler = \"ping\"\nretry_backoff = { max = \"1s\", max = \"2s\" }\n",
        &["3:31: tasks.a.retry_backoff.max: duplicate key (first set on line 3)"],
    );
    check_errors(
        "[tasks.a]\nhandler = \"ping\"\n[tasks.b]\nhandler = \"ping\"\n[tasks.a]\n",
        // TOML's recovery keeps no place of the first [tasks.a]: the line is not named.
        &["5:8: tasks.a: duplicate key"],
    );
}

#[test]
fn invalid_utf8_is_refused_at_its_first_bad_byte() {
    let dir = tempfile::tempdir().expect("temp dir");
    let path = dir.path().join("scheduler.toml");
    std::fs::write(
        &path,
        b"[tasks.a]\nhandler = \"ping\"\ndescription = \"caf\xE9 au lait\"\n",
    )
    .expect("write config");
    let errors = load(&path).expect_err("config should be refused");
    let got: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    assert_eq!(
        got,
        [format!(
            "{}:3:19: tasks.a.description: expected UTF-8 text, found the byte 0xE9 (save the file as UTF-8)",
            path.display()
        )]
    );
}

#[test]
fn an_unknown_key_in_an_inline_table_is_named_in_full() {
    check_errors(
        "[tasks.a]\nhandler = \"ping\"\nretry_backoff = { inital = \"1s\" }\n",
        &["3:19: tasks.a.retry_backoff.inital: unknown key (did you mean \"initial\"?)"],
    );
}

/// Writes `text` to a temporary file and reads its locations leniently.
fn check_locations(text: &str) -> Locations {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("scheduler.toml");
    std::fs::write(&path, text).unwrap();
    read_locations(&path).unwrap()
}

#[test]
fn a_broken_file_still_names_its_store_and_log_folder() {
    // Issue 15, item 1: the store-reading commands keep working mid-edit.
    let text = "[scheduler]\ndatabase = \"var/x.db\"\nlog_dir = \"var/logs\"\nheartbeat_timeout = \"soon\"\n[tasks.a]\nhandler = \"ping\"\ntimout = \"10s\"\n";
    assert!(parse(text, Path::new(FILE)).is_err());
    let locations = check_locations(text);
    assert_eq!(locations.database, Path::new("var/x.db"));
    assert_eq!(locations.log_dir, Path::new("var/logs"));
    assert_eq!(locations.heartbeat_timeout, Duration::from_secs(30));
    assert_eq!(locations.timezone, chrono_tz::Tz::UTC);
}

#[test]
fn a_broken_file_still_names_the_zone_times_are_shown_in() {
    // Issue 15, item 6: `status` mid-edit shows times in the scheduler's zone, named.
    let text = "[scheduler]\ntimezone = \"America/New_York\"\n[tasks.a]\nhandler = \"ping\"\ntimout = \"10s\"\n";
    assert_eq!(check_locations(text).timezone, chrono_tz::America::New_York);
    let unknown = "[scheduler]\ntimezone = \"Mars/Olympus\"\n";
    assert_eq!(check_locations(unknown).timezone, chrono_tz::Tz::UTC);
}

#[test]
fn a_file_that_is_not_toml_gives_the_default_locations() {
    let locations = check_locations("[scheduler\ndatabase = \"var/x.db\"\n");
    assert_eq!(locations, check_ok(PING).locations());
}

#[test]
fn poll_only_is_off_by_default_and_takes_a_boolean() {
    assert!(!check_ok(PING).scheduler.poll_only);
    let config = check_ok(&format!("[scheduler]\npoll_only = true\n{PING}"));
    assert!(config.scheduler.poll_only);
    check_errors(
        &format!("[scheduler]\npoll_only = \"yes\"\n{PING}"),
        &["2:13: scheduler.poll_only: expected a boolean, found string \"yes\""],
    );
    check_errors(
        &format!("[scheduler]\npoll_onyl = true\n{PING}"),
        &["2:1: scheduler.poll_onyl: unknown key (did you mean \"poll_only\"?)"],
    );
}

/// Easter Sunday of `year`: the anonymous Gregorian algorithm (Meeus/Jones/Butcher).
fn easter(year: i32) -> NaiveDate {
    let a = year % 19;
    let b = year / 100;
    let c = year % 100;
    let d = b / 4;
    let e = b % 4;
    let f = (b + 8) / 25;
    let g = (b - f + 1) / 3;
    let h = (19 * a + b - d - g + 15) % 30;
    let i = c / 4;
    let k = c % 4;
    let l = (32 + 2 * e + 2 * i - h - k) % 7;
    let m = (a + 11 * h + 22 * l) / 451;
    let month = (h + l - 7 * m + 114) / 31;
    let day = (h + l - 7 * m + 114) % 31 + 1;
    NaiveDate::from_ymd_opt(year, month as u32, day as u32).expect("a date")
}

fn date(year: i32, month: u32, day: u32) -> NaiveDate {
    NaiveDate::from_ymd_opt(year, month, day).expect("a date")
}

/// The `n`th `weekday` of a month (1-based).
fn nth(year: i32, month: u32, weekday: chrono::Weekday, n: u8) -> NaiveDate {
    NaiveDate::from_weekday_of_month_opt(year, month, weekday, n).expect("a date")
}

/// The last `weekday` of a month.
fn last(year: i32, month: u32, weekday: chrono::Weekday) -> NaiveDate {
    let mut day = date(year, month + 1, 1).pred_opt().expect("a date");
    while chrono::Datelike::weekday(&day) != weekday {
        day = day.pred_opt().expect("a date");
    }
    day
}

/// Saturday → the Friday before, Sunday → the Monday after.
fn observed(day: NaiveDate) -> NaiveDate {
    match chrono::Datelike::weekday(&day) {
        chrono::Weekday::Sat => day.pred_opt().expect("a date"),
        chrono::Weekday::Sun => day.succ_opt().expect("a date"),
        _ => day,
    }
}

#[test]
fn the_easter_algorithm_gives_the_known_easter_sundays() {
    assert_eq!(easter(2024), date(2024, 3, 31));
    assert_eq!(easter(2025), date(2025, 4, 20));
    assert_eq!(easter(2026), date(2026, 4, 5));
    assert_eq!(easter(2027), date(2027, 3, 28));
}

#[test]
fn nyse_calendar_is_its_rules_plus_the_one_off_closures() {
    use chrono::Weekday::{Mon, Sat, Thu};
    let mut expected = BTreeSet::new();
    for year in 2024..=2027 {
        let new_year = date(year, 1, 1);
        // New Year's Day on a Saturday is not observed on the Friday before.
        if chrono::Datelike::weekday(&new_year) != Sat {
            expected.insert(observed(new_year));
        }
        expected.insert(nth(year, 1, Mon, 3));
        expected.insert(nth(year, 2, Mon, 3));
        expected.insert(easter(year) - chrono::Days::new(2));
        expected.insert(last(year, 5, Mon));
        expected.insert(observed(date(year, 6, 19)));
        expected.insert(observed(date(year, 7, 4)));
        expected.insert(nth(year, 9, Mon, 1));
        expected.insert(nth(year, 11, Thu, 4));
        expected.insert(observed(date(year, 12, 25)));
    }
    // One-off: national day of mourning for President Carter.
    expected.insert(date(2025, 1, 9));
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = match parse(
        "[calendars.nyse]\nfile = \"calendars/nyse.toml\"\n[tasks.a]\nhandler = \"ping\"\ncalendar = \"nyse\"\n",
        &root.join("config/scheduler.toml"),
    ) {
        Ok(config) => config,
        Err(errors) => panic!("{errors}"),
    };
    let nyse = &config.calendars["nyse"];
    assert_eq!(nyse.dates, expected);
    assert_eq!(nyse.dates.len(), 41);
    assert!(
        !nyse.dates.contains(&date(2027, 12, 31)),
        "2028-01-01 is a Saturday"
    );
    assert!(nyse.description.starts_with("NYSE"));
}

#[test]
fn the_shipped_market_tasks_skip_nyse_closures() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let config = load(&root.join("config/scheduler.toml")).unwrap_or_else(|e| panic!("{e}"));
    for task in ["ingestion", "training", "predictions"] {
        let calendar = config.task(task).and_then(|t| t.calendar.as_ref());
        assert_eq!(calendar.map(|c| c.name.as_str()), Some("nyse"), "{task}");
    }
}

#[test]
fn a_calendar_date_is_read_in_the_tasks_zone() {
    let config = check_ok(
        "[calendars.h]\ndates = [\"2026-12-25\"]\n[tasks.a]\nhandler = \"ping\"\ncalendar = \"h\"\n",
    );
    let calendar = config
        .task("a")
        .and_then(|t| t.calendar.clone())
        .expect("calendar");
    // 2026-12-26 03:30 UTC is still the 25th in New York, already the 26th in UTC.
    let tick = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 12, 26, 3, 30, 0).unwrap();
    assert_eq!(
        calendar
            .skip_reason(tick, chrono_tz::America::New_York)
            .as_deref(),
        Some("calendar h: 2026-12-25 is a listed date")
    );
    assert_eq!(calendar.skip_reason(tick, chrono_tz::UTC), None);
}

#[test]
fn calendar_mistakes_are_refused_at_their_place() {
    check_errors(
        "[calendars.holidays]\ndates = [\"2026-02-30\"]\n[tasks.a]\nhandler = \"ping\"\ncalendar = \"holiday\"\n[tasks.b]\nhandler = \"ping\"\ncalendar = \"zzz\"\n",
        &[
            "2:10: calendars.holidays.dates: expected a date such as \"2025-12-25\", found \"2026-02-30\"",
            "5:12: tasks.a.calendar: unknown calendar \"holiday\" (did you mean \"holidays\"?)",
            "8:12: tasks.b.calendar: unknown calendar \"zzz\" (known calendars: holidays)",
        ],
    );
    check_errors(
        "[calendars.empty]\ndescription = \"nothing\"\n[tasks.a]\nhandler = \"ping\"\n",
        &["1:12: calendars.empty: a calendar needs dates = [\"YYYY-MM-DD\", …] or file = \"<path>\""],
    );
}

#[test]
fn an_error_in_a_calendar_file_names_that_file_line_and_column() {
    let dir = tempfile::tempdir().expect("temp dir");
    std::fs::write(
        dir.path().join("days.toml"),
        "# closures\ndates = [\n  \"2026-01-01\",\n  \"Jan 2\",\n]\ndescriptio = \"x\"\n",
    )
    .expect("written");
    let config_file = dir.path().join("scheduler.toml");
    let errors = parse(
        "[calendars.days]\nfile = \"days.toml\"\n[tasks.a]\nhandler = \"ping\"\ncalendar = \"days\"\n",
        &config_file,
    )
    .expect_err("refused");
    let shown: Vec<String> = errors.0.iter().map(ToString::to_string).collect();
    let days = dir.path().join("days.toml").display().to_string();
    assert_eq!(
        shown,
        vec![
            format!("{days}:4:3: dates: expected a date such as \"2025-12-25\", found \"Jan 2\""),
            format!("{days}:6:1: descriptio: unknown key (did you mean \"description\"?)"),
        ]
    );
    let missing = parse(
        "[calendars.days]\nfile = \"nowhere.toml\"\n[tasks.a]\nhandler = \"ping\"\n",
        &config_file,
    )
    .expect_err("refused");
    assert!(
        missing.0[0]
            .to_string()
            .contains("2:8: calendars.days.file: cannot read calendar file"),
        "{missing}"
    );
}

fn jitter_task(jitter: &str, schedule: &str) -> TaskSpec {
    let config = check_ok(&format!(
        "[tasks.a]\nhandler = \"ping\"\nschedule = \"{schedule}\"\njitter = \"{jitter}\"\n"
    ));
    config.task("a").cloned().expect("task a")
}

#[test]
fn jitter_delay_is_pinned() {
    // These values are a promise between instances and between versions: a change of
    // the hash would make two instances of different builds disagree on when a tick is
    // due.
    let tick = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 6, 1, 12, 0, 0).unwrap();
    let bound = Duration::from_secs(30);
    let got: Vec<Duration> = ["ingestion", "training", "predictions"]
        .iter()
        .map(|task| jitter_delay(task, tick, bound))
        .collect();
    assert_eq!(got, PINNED_JITTER);
    assert_eq!(
        jitter_delay("ingestion", tick, Duration::ZERO),
        Duration::ZERO
    );
}

#[test]
fn jitter_stays_within_its_bound_and_spreads_ticks_and_tasks() {
    let task = jitter_task("30s", "0 * * * * *");
    let start = chrono::TimeZone::with_ymd_and_hms(&chrono::Utc, 2026, 6, 1, 12, 0, 0).unwrap();
    let delays: Vec<Duration> = (0..1000)
        .map(|minute| task.jitter_for(start + chrono::TimeDelta::minutes(minute)))
        .collect();
    assert!(delays.iter().all(|d| *d < Duration::from_secs(30)));
    // Spread over the whole bound: each 3-second tenth of it is hit.
    for tenth in 0..10 {
        let low = Duration::from_secs(3 * tenth);
        let high = low + Duration::from_secs(3);
        assert!(
            delays.iter().any(|d| *d >= low && *d < high),
            "no delay in [{low:?}, {high:?})"
        );
    }
    assert_eq!(
        task.due_at(start),
        start + chrono::TimeDelta::from_std(task.jitter_for(start)).unwrap()
    );
    assert_ne!(
        jitter_delay("a", start, Duration::from_secs(30)),
        jitter_delay("b", start, Duration::from_secs(30))
    );
}

#[test]
fn a_jitter_as_long_as_the_schedules_interval_is_refused() {
    check_errors(
        "[tasks.a]\nhandler = \"ping\"\nschedule = \"0 */5 * * * *\"\njitter = \"5m\"\n",
        &["4:10: tasks.a.jitter: must be shorter than the schedule's shortest interval between ticks (5m), found \"5m\""],
    );
    check_errors(
        "[tasks.a]\nhandler = \"ping\"\nschedule = \"0 0 * * * *\"\njitter = \"2d\"\n",
        &["4:10: tasks.a.jitter: expected a duration of at most 1d, found \"2d\""],
    );
    assert_eq!(
        jitter_task("4m59s", "0 */5 * * * *").jitter,
        Duration::from_secs(299)
    );
}

/// FNV-1a + SplitMix64 of ("ingestion" | "training" | "predictions", 0xff, the
/// microseconds of 2026-06-01T12:00:00Z) modulo 30 s, computed independently (Python).
const PINNED_JITTER: [Duration; 3] = [
    Duration::from_micros(566_691),
    Duration::from_micros(5_256_522),
    Duration::from_micros(22_164_821),
];

#[test]
fn an_output_folder_that_would_serve_the_working_directory_or_the_service_files_is_refused() {
    check_errors(
        "[tasks.b]\nhandler = \"backtest\"\nparams = { report_dir = \"\" }\n\
         [tasks.c]\nhandler = \"drift\"\nparams = { report_dir = \".\" }\n\
         [tasks.d]\nhandler = \"train\"\nparams = { shap_dir = \"/\" }\n\
         [tasks.e]\nhandler = \"train\"\nparams = { model_dir = \"data\" }\n\
         [tasks.f]\nhandler = \"backtest\"\nparams = { report_dir = \"logs/../logs\" }\n",
        &[
            "3:10: tasks.b.params.report_dir: an output folder is served by GET /scheduler/files; \"\" would serve the service's working directory (its database, config and logs)",
            "6:10: tasks.c.params.report_dir: an output folder is served by GET /scheduler/files; \".\" would serve the service's working directory (its database, config and logs)",
            "9:10: tasks.d.params.shap_dir: an output folder is served by GET /scheduler/files; \"/\" would serve the service's working directory (its database, config and logs)",
            "12:10: tasks.e.params.model_dir: an output folder is served by GET /scheduler/files; \"data\" holds the database data/scheduler.db",
            "15:10: tasks.f.params.report_dir: an output folder is served by GET /scheduler/files; \"logs/../logs\" holds the log folder logs",
        ],
    );
    check_ok(
        "[tasks.b]\nhandler = \"backtest\"\nparams = { report_dir = \"reports/backtest\" }\n\
         [tasks.e]\nhandler = \"train\"\nparams = { model_dir = \"data/models\" }\n",
    );
}

#[test]
fn alerts_take_a_url_or_an_env_var_their_events_and_a_task_filter() {
    let config = check_ok(
        r#"
[[alerts]]
name = "ops"
url = "http://127.0.0.1:9000/hook"
events = ["run_failed", "deadline_missed", "circuit_opened", "run_failed"]

[[alerts]]
url_env = "SLACK_RELAY"
events = ["drift_detected"]
tasks = ["a"]
max_attempts = 2

[tasks.a]
handler = "ping"
"#,
    );
    assert_eq!(
        config.alerts,
        [
            AlertSpec {
                name: "ops".into(),
                target: AlertTarget::Url("http://127.0.0.1:9000/hook".into()),
                events: vec![
                    "run_failed".into(),
                    "deadline_missed".into(),
                    "circuit_opened".into()
                ],
                tasks: None,
                max_attempts: 5,
            },
            AlertSpec {
                name: "alert-2".into(),
                target: AlertTarget::Env("SLACK_RELAY".into()),
                events: vec!["drift_detected".into()],
                tasks: Some([TaskName::from("a")].into_iter().collect()),
                max_attempts: 2,
            },
        ]
    );
    let ops = &config.alerts[0];
    assert!(ops.wants("run_failed", Some("a")) && ops.wants("circuit_opened", None));
    assert!(!ops.wants("run_succeeded", Some("a")));
    let only_a = &config.alerts[1];
    assert!(only_a.wants("drift_detected", Some("a")));
    assert!(!only_a.wants("drift_detected", Some("b")) && !only_a.wants("drift_detected", None));
}

#[test]
fn a_bad_alert_is_refused_at_its_key() {
    check_errors(
        r#"[[alerts]]
url = "https://hooks.slack.com/x"
events = ["run_faild", "run_timed_out"]
tasks = ["nope"]
max_attempts = 0
colour = "red"

[[alerts]]
events = []

[[alerts]]
name = "ops"
url = "http://h/"
url_env = "X"
events = ["run_failed"]

[tasks.a]
handler = "ping"
"#,
        &[
            "2:7: alerts.url: https is not supported by this build (no TLS): point it at an http:// relay on this host",
            "3:11: alerts.events: unknown event \"run_faild\" (did you mean \"run_failed\"?); expected \"run_failed\", \"run_timed_out\", \"run_orphaned\", \"deadline_missed\", \"circuit_opened\", \"drift_detected\", \"config_reload_failed\"",
            "4:10: alerts.tasks: unknown task \"nope\"",
            "5:16: alerts.max_attempts: expected a whole number from 1 to 100, found 0",
            "6:1: alerts.colour: unknown key",
            "8:1: alerts: alert \"alert-2\": set url or url_env",
            "13:7: alerts.url: set url or url_env, not both",
        ],
    );
}

#[test]
fn a_param_on_the_command_line_is_a_toml_scalar_or_else_text() {
    let cases = [
        ("n=3", serde_json::json!(3)),
        ("x=2.5", serde_json::json!(2.5)),
        ("flag=true", serde_json::json!(true)),
        ("s=\"quoted\"", serde_json::json!("quoted")),
        ("word=hello world", serde_json::json!("hello world")),
        ("list=[1, 2]", serde_json::json!("[1, 2]")),
        ("empty=", serde_json::json!("")),
        ("eq=a=b", serde_json::json!("a=b")),
    ];
    for (text, value) in cases {
        let (key, parsed) = parse_param(text).unwrap();
        assert_eq!(key, text.split('=').next().unwrap());
        assert_eq!(parsed, value, "{text}");
    }
    assert_eq!(
        parse_param("noequals").unwrap_err(),
        "--param \"noequals\": expected key=value"
    );
    assert!(parse_param("=1").is_err());
}

#[test]
fn run_params_are_checked_as_the_config_checks_params() {
    let config = check_ok("[tasks.a]\nhandler = \"ping\"\n[tasks.c]\ncommand = [\"true\"]\n");
    let table = |pairs: &[(&str, serde_json::Value)]| {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.clone()))
            .collect::<serde_json::Map<_, _>>()
    };
    let ping = config.task("a").unwrap();
    assert_eq!(
        check_run_params(
            ping,
            &table(&[("sleep_sec", 1.into()), ("fatal", true.into())])
        ),
        Ok(())
    );
    assert_eq!(
        check_run_params(ping, &table(&[("fail_time", 1.into()), ("colour", "red".into())])),
        Err("params.colour: unknown param for handler \"ping\" (it reads fail_times, fatal, progress, sleep_sec); task a takes fail_times, fatal, progress, sleep_sec; \
             params.fail_time: unknown param for handler \"ping\" (did you mean \"fail_times\"?); task a takes fail_times, fatal, progress, sleep_sec"
            .to_string())
    );
    let command = config.task("c").unwrap();
    assert_eq!(
        check_run_params(command, &table(&[("anything", 1.into())])),
        Ok(())
    );
}

#[test]
fn a_pool_needs_its_slots_and_a_task_names_a_known_pool() {
    let config =
        check_ok("[pools.gpu]\nslots = 2\n[tasks.a]\nhandler = \"ping\"\npool = \"gpu\"\n");
    assert_eq!(config.pools.get("gpu"), Some(&2));
    assert_eq!(config.task("a").unwrap().pool.as_deref(), Some("gpu"));
    check_errors(
        "[pools.gpu]\nslots = 0\n[pools.cpu]\n[tasks.a]\nhandler = \"ping\"\npool = \"gpv\"\n",
        &[
            "2:9: pools.gpu.slots: expected a whole number from 1 to 4294967295, found 0",
            "3:8: pools.cpu.slots: slots is required: how many runs of the pool's tasks may run at once",
            "6:8: tasks.a.pool: unknown pool \"gpv\" (did you mean \"gpu\"?)",
        ],
    );
}
