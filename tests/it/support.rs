//! The harness: a sandbox folder with its own config, database and logs; the real
//! `turbosched` binary run in it; and waiting on conditions instead of sleeping.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use turbosched::model::{RunId, RunState};
use turbosched::store::{RunFilter, RunRow, Store};

/// Fast timings so supervision shows within a test's patience.
pub const FAST_SCHEDULER: &str = r#"
[scheduler]
timezone = "UTC"
database = "data/scheduler.db"
max_workers = 4
heartbeat_interval = "200ms"
heartbeat_timeout = "3s"
kill_grace = "500ms"
shutdown_grace = "1s"

[api]
bind = "127.0.0.1:0"
"#;

pub struct Sandbox {
    dir: tempfile::TempDir,
    /// Its config's `database`: a file under the folder, or a PostgreSQL URL.
    database: PathBuf,
}

pub struct Service {
    child: Option<Child>,
    stderr: PathBuf,
    /// `http://127.0.0.1:<port>` of its API.
    pub api: String,
}

impl Sandbox {
    /// A folder with `config/scheduler.toml` = FAST_SCHEDULER + `tasks`.
    pub fn new(tasks: &str) -> Sandbox {
        Sandbox::with_config(&format!("{FAST_SCHEDULER}\n{tasks}"))
    }

    pub fn with_config(config: &str) -> Sandbox {
        let dir = tempfile::tempdir().expect("temp dir");
        std::fs::create_dir_all(dir.path().join("config")).unwrap();
        std::fs::write(dir.path().join("config/scheduler.toml"), config).unwrap();
        let database = dir.path().join("data/scheduler.db");
        Sandbox { dir, database }
    }

    /// A folder whose config (which names `database` itself) keeps its runs in
    /// `database`, a PostgreSQL URL.
    pub fn with_config_on(config: &str, database: &str) -> Sandbox {
        let mut sandbox = Sandbox::with_config(config);
        sandbox.database = PathBuf::from(database);
        sandbox
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_turbosched"));
        command
            .args(args)
            .current_dir(self.path())
            .env_remove("TURBOSCHED_CONFIG");
        command
    }

    /// Runs a CLI command to its end.
    pub fn cli(&self, args: &[&str]) -> Output {
        self.command(args)
            .stdin(Stdio::null())
            .output()
            .expect("run turbosched")
    }

    /// Runs a CLI command with `--json` output and parses it.
    pub fn cli_json(&self, args: &[&str]) -> (i32, Value) {
        let output = self.cli(args);
        let stdout = String::from_utf8_lossy(&output.stdout);
        let value = serde_json::from_str(stdout.trim()).unwrap_or_else(|err| {
            panic!(
                "{args:?}: not JSON ({err}):\n{stdout}\nstderr:\n{}",
                String::from_utf8_lossy(&output.stderr)
            )
        });
        (output.status.code().unwrap_or(-1), value)
    }

    /// Starts `turbosched serve` and waits until it has registered.
    pub fn serve(&self) -> Service {
        self.serve_with(&[])
    }

    /// Starts `turbosched serve` with extra environment.
    pub fn serve_with(&self, env: &[(&str, &str)]) -> Service {
        self.start_serving(env, &self.database)
    }

    /// Starts `turbosched serve` whose config names `database` (a file, or a PostgreSQL
    /// URL), and waits until it has registered there.
    pub fn serve_on(&self, database: &Path) -> Service {
        self.start_serving(&[], database)
    }

    fn start_serving(&self, env: &[(&str, &str)], database: &Path) -> Service {
        let stderr = self.path().join(format!(
            "serve-{}.log",
            std::process::id() as u128 + now_nanos()
        ));
        let child = self
            .command(&["serve"])
            .envs(env.iter().copied())
            .env("TURBOSCHED_LOG", "debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&stderr).unwrap())
            .spawn()
            .expect("start serve");
        let mut service = Service {
            child: Some(child),
            stderr,
            api: String::new(),
        };
        let pid = service.pid();
        // A service that does not register says why: its log is in the failure, at once
        // when it has exited.
        let log = service.stderr.clone();
        let tail = move || {
            let text = std::fs::read_to_string(&log).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(40).collect();
            let tail: Vec<&str> = tail.into_iter().rev().collect();
            tail.join("\n")
        };
        let what = {
            let tail = tail.clone();
            move || {
                format!(
                    "service pid {pid} registered; the last lines of its log:\n{}",
                    tail()
                )
            }
        };
        let child = service.child.as_mut().expect("started");
        let api = wait_until_said(what, Duration::from_secs(20), || {
            if let Ok(Some(status)) = child.try_wait() {
                panic!(
                    "service pid {pid} exited ({status}) before it registered; the last lines of its log:\n{}",
                    tail()
                );
            }
            let store = Store::open(database).ok()?;
            let live = store
                .live_instances(Duration::from_secs(30), chrono::Utc::now())
                .ok()?;
            live.into_iter()
                .find(|i| i.pid == pid as i64)
                .and_then(|i| i.api)
        });
        service.api = format!("http://{api}");
        service
    }

    pub fn store(&self) -> Store {
        Store::open(&self.database).expect("open store")
    }

    pub fn runs_of(&self, task: &str) -> Vec<RunRow> {
        runs_of(&self.store(), task)
    }

    pub fn run(&self, id: RunId) -> RunRow {
        self.store().run(id).unwrap().expect("run exists")
    }

    /// Waits until run `id` is in `state`.
    pub fn wait_for_state(&self, id: RunId, state: RunState, within: Duration) -> RunRow {
        wait_until(&format!("run {id} {state}"), within, || {
            let row = self.store().run(id).ok()??;
            (row.state == state).then_some(row)
        })
    }

    pub fn log(&self, task: &str) -> String {
        std::fs::read_to_string(self.path().join(format!("logs/task_{task}.log")))
            .unwrap_or_default()
    }

    pub fn event_kinds(&self, run: RunId) -> Vec<String> {
        self.store()
            .events_after(0, 100_000)
            .unwrap()
            .into_iter()
            .filter(|e| e.run_id == Some(run))
            .map(|e| e.kind)
            .collect()
    }
}

impl Service {
    pub fn pid(&self) -> u32 {
        self.child.as_ref().map(|c| c.id()).unwrap_or(0)
    }

    /// What the service has written to its stderr so far (its log, at debug).
    pub fn stderr_text(&self) -> String {
        std::fs::read_to_string(&self.stderr).unwrap_or_default()
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(mut self) -> std::process::ExitStatus {
        let mut child = self.child.take().expect("running");
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        wait_child(&mut child, Duration::from_secs(30), &self.stderr)
    }

    /// SIGTERM, and the service must exit 0; else the failure shows its log.
    pub fn stop_cleanly(mut self) {
        let mut child = self.child.take().expect("running");
        signal(child.id(), nix::sys::signal::Signal::SIGTERM);
        let status = wait_child(&mut child, Duration::from_secs(30), &self.stderr);
        assert!(
            status.success(),
            "the service stopped with {status}:\n{}",
            std::fs::read_to_string(&self.stderr).unwrap_or_default()
        );
    }

    /// kill -9, reaped, so the pid is really gone.
    pub fn kill9(mut self) {
        let mut child = self.child.take().expect("running");
        child.kill().expect("SIGKILL");
        child.wait().expect("reap");
    }
}

impl Drop for Service {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

fn wait_child(child: &mut Child, within: Duration, stderr: &Path) -> std::process::ExitStatus {
    let deadline = Instant::now() + within;
    loop {
        if let Some(status) = child.try_wait().expect("try_wait") {
            return status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            panic!(
                "service did not exit within {within:?}:\n{}",
                std::fs::read_to_string(stderr).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub fn signal(pid: u32, signal: nix::sys::signal::Signal) {
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), signal)
        .unwrap_or_else(|err| panic!("kill({pid}, {signal}): {err}"));
}

/// True while the process `pid` that started no later than `latest_start` (Unix µs)
/// exists and is not a zombie. With `pid_max` at 32,768 a busy suite reuses pids within
/// minutes: a process under the same pid started later is another one.
pub fn process_alive_started_by(pid: i64, latest_start: i64) -> bool {
    let started = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .ok()
        .and_then(|stat| {
            // Field 22, the start time in clock ticks since boot; fields counted after
            // the command's closing parenthesis start at field 3.
            let ticks: i64 = stat
                .rsplit(')')
                .next()?
                .split_whitespace()
                .nth(19)?
                .parse()
                .ok()?;
            let boot: i64 = std::fs::read_to_string("/proc/stat")
                .ok()?
                .lines()
                .find_map(|line| line.strip_prefix("btime ")?.trim().parse().ok())?;
            // SAFETY: sysconf only reads a configuration value.
            let per_second = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1);
            Some(boot * 1_000_000 + ticks * 1_000_000 / per_second)
        });
    match started {
        // The boot time is whole seconds: a second of slack.
        Some(started) if started > latest_start + 1_000_000 => false,
        _ => process_alive(pid),
    }
}

/// True while `pid` exists and is not a zombie.
pub fn process_alive(pid: i64) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(stat) => {
            let state = stat
                .rsplit(')')
                .next()
                .and_then(|rest| rest.split_whitespace().next());
            state != Some("Z") && state != Some("X")
        }
        Err(_) => false,
    }
}

/// Polls `check` every 20 ms until it answers, or panics after `within` naming `what`.
pub fn wait_until<T>(what: &str, within: Duration, check: impl FnMut() -> Option<T>) -> T {
    wait_until_said(|| what.to_string(), within, check)
}

/// [`wait_until`] whose `what` is said only when it times out (a log read then).
pub fn wait_until_said<T>(
    what: impl FnOnce() -> String,
    within: Duration,
    mut check: impl FnMut() -> Option<T>,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        if let Some(value) = check() {
            return value;
        }
        if Instant::now() > deadline {
            panic!("timed out after {within:?} waiting for {}", what());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}

fn now_nanos() -> u128 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or(0)
}

pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).to_string()
}

pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).to_string()
}

/// The run id printed by `run --json`.
pub fn run_id(value: &Value) -> RunId {
    RunId(
        value["run_id"]
            .as_i64()
            .unwrap_or_else(|| panic!("no run_id in {value}")),
    )
}

/// Every run of `task` in `store`, oldest first.
pub fn runs_of(store: &Store, task: &str) -> Vec<RunRow> {
    let mut rows = store
        .runs(&RunFilter {
            task: Some(task.into()),
            limit: 1_000_000,
            ..RunFilter::default()
        })
        .unwrap();
    rows.reverse();
    rows
}
