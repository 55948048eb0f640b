//! Runs one attempt as a child process and says how it ended.
//!
//! Lifecycle of an attempt: spawn (own process group, report pipe on fd 3, stdout and
//! stderr into the task log) → messages stream to the engine → the child exits, or the
//! attempt is stopped (timeout, abort, shutdown): SIGTERM to the whole process group,
//! `kill_grace`, then SIGKILL to the group. Whatever the child left behind in its group
//! is killed when it ends, so no grandchild outlives its attempt.
//!
//! Invariants: the runner never touches the store and never decides about retries; it
//! reports an [`Outcome`] and the engine acts on it. No command string reaches a shell
//! unless the task says `shell = true`.

use std::ffi::OsString;
use std::os::fd::OwnedFd;
use std::path::PathBuf;
use std::process::ExitStatus;
use std::time::{Duration, Instant as MonoInstant};

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncRead, BufReader};
use tokio::sync::{mpsc, watch};

use crate::config::Handler;
use crate::model::{Attempt, RunId, Trigger};
use crate::spawn::{Child, Launch};
use crate::tasklog::{Level, TaskLog};
use crate::worker::protocol::{parse_stdout_line, Msg, Report};

/// The report pipe's descriptor number in a built-in worker.
pub const REPORT_FD: i32 = 3;

/// Read buffer per child pipe: bounds memory when a thousand attempts run at once.
const OUTPUT_BUFFER: usize = 1024;

/// The longest output line kept whole; the rest of a longer line is cut (and said so), so
/// one child printing a gigabyte without a newline cannot take the service's memory.
pub const MAX_OUTPUT_LINE: usize = 64 * 1024;

/// The longest report line (JSON on fd 3) read; a longer one is dropped with a warning.
pub const MAX_REPORT_LINE: usize = 1024 * 1024;

/// How many runner events may wait for the engine; a runner whose child reports faster
/// than the engine records waits (the child then blocks on its pipe), nothing grows.
pub const EVENT_QUEUE: usize = 4096;

/// How long an attempt waits for its child's output to end before it watches the child's
/// exit by itself (a pidfd): a child that lives longer is watched from then on.
const EXIT_WATCH_GRACE: Duration = Duration::from_millis(20);

/// The process group of a child with pid `pid`: `None` for a pid that cannot be a child's
/// group (0 is our own group, 1 is init, and anything over `i32::MAX` would wrap to a
/// negative id, which `kill` reads as "every process").
pub fn process_group(pid: u32) -> Option<Pid> {
    i32::try_from(pid)
        .ok()
        .filter(|pid| *pid > 1)
        .map(Pid::from_raw)
}

/// Everything needed to run one attempt.
#[derive(Clone)]
pub struct AttemptSpec {
    /// The run.
    pub run: RunId,
    /// Its task.
    pub task: String,
    /// This attempt's number.
    pub attempt: Attempt,
    /// What started the run (the child reads it as `TURBOSCHED_TRIGGER`).
    pub trigger: Trigger,
    /// What to run.
    pub handler: Handler,
    /// The task's params, as JSON.
    pub params: serde_json::Value,
    /// Per-attempt limit.
    pub timeout: Duration,
    /// SIGTERM → SIGKILL delay.
    pub kill_grace: Duration,
    /// Where the last checkpoint is (may not exist yet).
    pub checkpoint_path: PathBuf,
    /// The service's config file (for the `maintenance` worker).
    pub config_path: PathBuf,
    /// The task's log.
    pub log: TaskLog,
    /// The child is killed if the service dies (cluster mode: another instance will run
    /// the attempt again once the lease expires, so none may outlive its instance).
    pub die_with_parent: bool,
}

/// Why the engine stops an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StopReason {
    /// Abort request: the run ends `aborted`.
    Abort,
    /// Graceful shutdown ran out of time: the run goes back to the queue.
    Shutdown,
    /// A built-in worker stopped beating its heartbeat (stopped, hung): the attempt is
    /// orphaned and retried by policy.
    Stalled,
    /// The instance could not renew its lease (cluster mode): the attempt goes back to
    /// the queue, unless another instance has reaped it already.
    Fenced,
}

/// How an attempt ended.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Exit code 0.
    Succeeded,
    /// Non-zero exit, a signal, or a child that could not start.
    Failed {
        /// Exit code, if it exited.
        exit_code: Option<i32>,
        /// What happened, for the run's error text.
        error: String,
        /// The child said retrying cannot help.
        fatal: bool,
    },
    /// Ran past its timeout and was stopped.
    TimedOut,
    /// Stopped by the engine.
    Stopped(StopReason),
}

/// What the runner tells the engine while an attempt runs.
#[derive(Debug, Clone)]
pub enum RunnerEvent {
    /// The child is running with this pid (= its process group id), since this instant.
    Spawned(u32, crate::model::Instant),
    /// A protocol message (heartbeat, progress, checkpoint, result, error), decoded.
    Report(Report),
    /// The attempt is over.
    Finished {
        /// How.
        outcome: Outcome,
        /// Wall time of the attempt.
        elapsed: Duration,
    },
}

/// A runner event, addressed.
#[derive(Debug, Clone)]
pub struct Envelope {
    /// The run.
    pub run: RunId,
    /// The attempt.
    pub attempt: Attempt,
    /// What happened.
    pub event: RunnerEvent,
}

/// Promises that an attempt's end reaches the engine even if its runner task panics:
/// dropped without [`Finisher::finish`], it kills the child's group and reports the
/// attempt failed, so the run is never left `running` with fresh heartbeats for ever.
struct Finisher {
    events: mpsc::Sender<Envelope>,
    run: RunId,
    attempt: Attempt,
    group: Option<Pid>,
    started: MonoInstant,
    done: bool,
}

impl Finisher {
    async fn send(&self, event: RunnerEvent) {
        // The engine outlives every runner; a closed channel means it is shutting down
        // and nobody needs the event any more.
        let _ = self
            .events
            .send(Envelope {
                run: self.run,
                attempt: self.attempt,
                event,
            })
            .await;
    }

    async fn finish(mut self, outcome: Outcome) {
        self.done = true;
        let elapsed = self.started.elapsed();
        self.send(RunnerEvent::Finished { outcome, elapsed }).await;
    }
}

impl Drop for Finisher {
    fn drop(&mut self) {
        if self.done {
            return;
        }
        if let Some(group) = self.group {
            let _ = killpg(group, Signal::SIGKILL);
        }
        let envelope = Envelope {
            run: self.run,
            attempt: self.attempt,
            event: RunnerEvent::Finished {
                outcome: Outcome::Failed {
                    exit_code: None,
                    error: "the service's runner of this attempt failed (a panic); its process group was killed".into(),
                    fatal: false,
                },
                elapsed: self.started.elapsed(),
            },
        };
        let events = self.events.clone();
        match tokio::runtime::Handle::try_current() {
            Ok(runtime) => {
                runtime.spawn(async move {
                    let _ = events.send(envelope).await;
                });
            }
            Err(_) => {
                let _ = events.try_send(envelope);
            }
        }
    }
}

/// A child started by [`spawn_child`]: when the attempt began (just before the spawn),
/// and the process with the read end of its report pipe (built-in workers) and its wall
/// instant, or why it could not start.
pub struct Spawned {
    began: MonoInstant,
    child: Result<(Child, Option<OwnedFd>, crate::model::Instant), String>,
}

/// Starts the attempt's child on the caller's thread, for [`run_attempt`] to supervise:
/// the engine does so for a lone start, which would otherwise wait for another thread
/// to wake and take the runner task (0.4–1.5 ms measured). Must be called within the
/// runtime (the child's pipes register with it).
pub fn spawn_child(spec: &AttemptSpec) -> Spawned {
    spawned_by(spec, crate::spawn::spawn_here)
}

/// What starts an attempt's child, made ready by the engine ([`Launched::of`]) to be
/// spawned in a batch ([`spawn_children`]).
pub struct Launched {
    launch: Launch,
    /// The read end of the report pipe (built-in workers).
    reports: Option<OwnedFd>,
    /// The program, for an error.
    program_name: String,
}

impl Launched {
    /// The launch of `spec`'s child, when it is started from the spawner threads and so
    /// can join a batch; `None` for one that starts on its caller's thread (the `fork`
    /// road, or no spawner here), or cannot be made: its runner task starts it (or says
    /// why not).
    pub fn of(spec: &AttemptSpec) -> Option<Launched> {
        // Cluster mode's launches take the `fork` road: not built twice for nothing.
        if spec.die_with_parent {
            return None;
        }
        let (launch, reports, program_name) = launch_of(spec).ok()?;
        crate::spawn::apart(&launch).then_some(Launched {
            launch,
            reports,
            program_name,
        })
    }
}

/// Starts the children of several attempts together ([`crate::spawn::spawn_all`]), for
/// [`run_attempt`] to supervise, answered in their order: a wake's starts, handed to the
/// spawner threads at once rather than one by each runner task, which would each wait
/// for its own. Each attempt's time counts from just before its own child's start. Must
/// be called within the runtime.
pub fn spawn_children(launches: Vec<Launched>) -> Vec<Spawned> {
    let began = MonoInstant::now();
    let (launches, rest): (Vec<Launch>, Vec<_>) = launches
        .into_iter()
        .map(|launched| (launched.launch, (launched.reports, launched.program_name)))
        .unzip();
    crate::spawn::spawn_all(launches)
        .into_iter()
        .zip(rest)
        .map(|(child, (reports, program_name))| {
            let child = child
                .map(|child| {
                    let at = chrono::DateTime::<chrono::Utc>::from(child.started_at());
                    (child, reports, at)
                })
                .map_err(|err| format!("cannot start {program_name}: {err}"));
            // Each child's time from its own start; a launch that failed, the batch's.
            let began = child.as_ref().map_or(began, |(child, ..)| child.began());
            Spawned { began, child }
        })
        .collect()
}

/// Starts the attempt's child with `start`, timing it.
fn spawned_by(spec: &AttemptSpec, start: fn(Launch) -> std::io::Result<Child>) -> Spawned {
    let began = MonoInstant::now();
    let child = spawn(spec, start).map(|(child, reports)| {
        let at = chrono::DateTime::<chrono::Utc>::from(child.started_at());
        (child, reports, at)
    });
    Spawned { began, child }
}

/// Runs one attempt to its end, sending events to `events`. Stop it by sending
/// `Some(reason)` on `stop`. `spawned` is its child if the caller started it
/// ([`spawn_child`]); otherwise the runner starts it. The attempt's time and its
/// timeout count from just before the spawn.
pub async fn run_attempt(
    spec: AttemptSpec,
    events: mpsc::Sender<Envelope>,
    mut stop: watch::Receiver<Option<StopReason>>,
    spawned: Option<Spawned>,
) {
    let spawned = match spawned {
        Some(spawned) => spawned,
        None => spawned_by(&spec, crate::spawn::spawn),
    };
    let mut finisher = Finisher {
        events: events.clone(),
        run: spec.run,
        attempt: spec.attempt,
        group: None,
        started: spawned.began,
        done: false,
    };
    let (mut child, report_reader, spawned_at) = match spawned.child {
        Ok(spawned) => spawned,
        Err(error) => {
            spec.log.line(spec.run, spec.attempt, Level::Error, &error);
            finisher
                .finish(Outcome::Failed {
                    exit_code: None,
                    error,
                    fatal: false,
                })
                .await;
            return;
        }
    };
    let pid = child.id();
    let Some(group) = process_group(pid) else {
        // Never signal a group we cannot name: 0 would be the service's own.
        let status = child.wait().await;
        finisher
            .finish(Outcome::Failed {
                exit_code: status.ok().and_then(|s| s.code()),
                error: "lost track of the child process: no usable pid".into(),
                fatal: false,
            })
            .await;
        return;
    };
    finisher.group = Some(group);
    tracing::debug!(pid, "child started");
    finisher.send(RunnerEvent::Spawned(pid, spawned_at)).await;

    // The child's output is read in this task, beside the wait for its exit: one task per
    // attempt, and one wake when the child ends and its pipes close together.
    let (last_stderr_tx, last_stderr_rx) = watch::channel(String::new());
    let stdout = child
        .stdout
        .take()
        .map(|stdout| pump_output(stdout, Source::of(&spec), Level::Info, events.clone(), None));
    let stderr = child.stderr.take().map(|stderr| {
        pump_output(
            stderr,
            Source::of(&spec),
            Level::Warn,
            events.clone(),
            Some(last_stderr_tx),
        )
    });
    let output = async move {
        tokio::join!(
            async {
                if let Some(pump) = stdout {
                    pump.await;
                }
            },
            async {
                if let Some(pump) = stderr {
                    pump.await;
                }
            },
        );
    };
    // Boxed: inline, the two readers' state made every runner task one large allocation,
    // and a burst's peak RSS grew from 33 to 42 MiB (measured, 1,000 tasks).
    let mut output = Box::pin(output);
    let mut output_done = false;
    let reported_error = report_reader
        .map(|reader| tokio::spawn(pump_reports(reader, spec.run, spec.attempt, events.clone())));

    // A timeout past what an instant can hold (a config's "100 years") never ends.
    let timeout = match spawned.began.checked_add(spec.timeout) {
        Some(at) => tokio::time::sleep_until(at.into()),
        None => tokio::time::sleep(spec.timeout),
    };
    tokio::pin!(timeout);
    // Stopping: SIGTERM to the group, then SIGKILL once `kill_grace` has passed; the
    // output is read on meanwhile. The timer is armed (and first polled) only then.
    let kill_timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(kill_timer);
    // The child's exit is awaited once its output has ended — a short child has then
    // exited, and is reaped with no pidfd made for it (`spawn`'s documentation says why
    // that matters) — or once `EXIT_WATCH_GRACE` has passed: a child that left a
    // grandchild holding its pipes is still seen to exit.
    let exit_grace = tokio::time::sleep(EXIT_WATCH_GRACE);
    tokio::pin!(exit_grace);
    let mut exit_watched = false;
    let mut stopping = false;
    let mut killed = false;
    let mut stop_reason: Option<StopReason> = None;
    let mut timed_out = false;
    let status: std::io::Result<ExitStatus> = loop {
        let stop_now = tokio::select! {
            status = child.wait(), if exit_watched || output_done => break status,
            () = &mut output, if !output_done => {
                output_done = true;
                false
            }
            () = &mut exit_grace, if !exit_watched && !output_done => {
                exit_watched = true;
                false
            }
            () = &mut kill_timer, if stopping && !killed => {
                killed = true;
                let _ = killpg(group, Signal::SIGKILL);
                false
            }
            _ = &mut timeout, if !timed_out && stop_reason.is_none() => {
                timed_out = true;
                spec.log.line(spec.run, spec.attempt, Level::Error, &format!(
                    "timed out after {}; stopping process group {pid}", humantime::format_duration(spec.timeout)));
                true
            }
            changed = stop.changed(), if stop_reason.is_none() && !timed_out => {
                if changed.is_err() {
                    // The engine dropped its handle: treat as shutdown.
                    stop_reason = Some(StopReason::Shutdown);
                } else {
                    stop_reason = *stop.borrow();
                }
                if let Some(reason) = stop_reason {
                    spec.log.line(spec.run, spec.attempt, Level::Warn, &format!(
                        "{}; stopping process group {pid}",
                        match reason {
                            StopReason::Abort => "abort requested",
                            StopReason::Shutdown => "service shutting down",
                            StopReason::Stalled => "no heartbeat from the worker",
                            StopReason::Fenced => "this instance lost its lease",
                        }));
                }
                stop_reason.is_some()
            }
        };
        if stop_now && !stopping {
            stopping = true;
            let _ = killpg(group, Signal::SIGTERM);
            kill_timer
                .as_mut()
                .reset(tokio::time::Instant::now() + spec.kill_grace);
        }
    };
    // Whatever the child left in its group dies with the attempt.
    let _ = killpg(group, Signal::SIGKILL);
    if !output_done {
        // A grandchild may hold the pipes open: its group is killed, so they close soon.
        let _ = tokio::time::timeout(Duration::from_secs(1), &mut output).await;
    }
    let reported = match reported_error {
        Some(reader) => tokio::time::timeout(Duration::from_secs(1), reader)
            .await
            .ok()
            .and_then(Result::ok)
            .flatten(),
        None => None,
    };
    let elapsed = finisher.started.elapsed();

    let outcome = if timed_out {
        Outcome::TimedOut
    } else if let Some(reason) = stop_reason {
        Outcome::Stopped(reason)
    } else {
        match status {
            Ok(status) if status.success() => Outcome::Succeeded,
            Ok(status) => {
                let (fatal, reported_message) = match reported {
                    Some((message, fatal)) => (fatal, Some(message)),
                    None => (false, None),
                };
                let last_stderr = last_stderr_rx.borrow().clone();
                let how = describe_exit(status, elapsed);
                let detail =
                    reported_message.or_else(|| (!last_stderr.is_empty()).then_some(last_stderr));
                Outcome::Failed {
                    exit_code: status.code(),
                    error: match detail {
                        Some(detail) => format!("{how}: {detail}"),
                        None => how,
                    },
                    fatal,
                }
            }
            Err(err) => Outcome::Failed {
                exit_code: None,
                error: format!("lost track of the child process: {err}"),
                fatal: false,
            },
        }
    };
    tracing::debug!(?outcome, "attempt ended");
    finisher.finish(outcome).await;
}

/// The turbosched binary, for built-in workers: the program to start and its name for
/// `argv[0]`. The program is `/proc/self/exe`, the very binary this service runs even
/// when a package upgrade has replaced the file since (a worker of another version could
/// speak another report protocol); its path when `/proc` is not mounted.
fn current_exe() -> Result<&'static (PathBuf, PathBuf), String> {
    static EXE: std::sync::OnceLock<Result<(PathBuf, PathBuf), String>> =
        std::sync::OnceLock::new();
    EXE.get_or_init(|| {
        let path = std::env::current_exe()
            .map_err(|err| format!("cannot find the turbosched binary: {err}"))?;
        let own = PathBuf::from("/proc/self/exe");
        Ok(if own.exists() {
            (own, path)
        } else {
            (path.clone(), path)
        })
    })
    .as_ref()
    .map_err(Clone::clone)
}

/// Starts the child ([`crate::spawn`]: `posix_spawn` unless the task needs `fork`). Only
/// a built-in worker gets the report pipe on fd 3. External commands report on stdout
/// (`::progress::`, `::checkpoint::`, `::result::` lines) instead.
fn spawn(
    spec: &AttemptSpec,
    start: fn(Launch) -> std::io::Result<Child>,
) -> Result<(Child, Option<OwnedFd>), String> {
    let (launch, report_reader, program_name) = launch_of(spec)?;
    // The launch owns the report pipe's write end; once the child has started, the child
    // holds the only copy, so the reader sees end-of-file when the child's group is gone.
    let child = start(launch).map_err(|err| format!("cannot start {program_name}: {err}"))?;
    Ok((child, report_reader))
}

/// What starts the attempt's child: the launch, the read end of its report pipe
/// (built-in workers), and the program's name for an error.
fn launch_of(spec: &AttemptSpec) -> Result<(Launch, Option<OwnedFd>, String), String> {
    let mut env: Vec<(OsString, OsString)> = Vec::with_capacity(10);
    let mut cwd = None;
    let mut arg0 = None;
    let (program, args): (OsString, Vec<OsString>) = match &spec.handler {
        Handler::Builtin(name) => {
            env.push(("TURBOSCHED_HANDLER".into(), name.into()));
            env.push((
                "TURBOSCHED_CONFIG_FILE".into(),
                spec.config_path.clone().into_os_string(),
            ));
            let (program, name) = current_exe()?;
            arg0 = Some(name.clone().into_os_string());
            (program.clone().into_os_string(), vec!["worker".into()])
        }
        Handler::Command(command) => {
            cwd.clone_from(&command.cwd);
            env.extend(
                command
                    .env
                    .iter()
                    .map(|(key, value)| (key.into(), value.into())),
            );
            if command.shell {
                (
                    "/bin/sh".into(),
                    vec!["-c".into(), (&command.argv[0]).into()],
                )
            } else {
                (
                    (&command.argv[0]).into(),
                    command.argv[1..].iter().map(OsString::from).collect(),
                )
            }
        }
    };
    for (key, value) in [
        ("TURBOSCHED_RUN_ID", spec.run.to_string()),
        ("TURBOSCHED_TASK", spec.task.clone()),
        ("TURBOSCHED_ATTEMPT", spec.attempt.to_string()),
        ("TURBOSCHED_TRIGGER", spec.trigger.as_str().to_string()),
        ("TURBOSCHED_PARAMS", spec.params.to_string()),
    ] {
        env.push((key.into(), value.into()));
    }
    env.push((
        "TURBOSCHED_CHECKPOINT".into(),
        spec.checkpoint_path.clone().into_os_string(),
    ));
    let mut extra_fd = None;
    let mut report_reader = None;
    if let Handler::Builtin(_) = spec.handler {
        let (reader, writer) =
            std::io::pipe().map_err(|err| format!("cannot create the report pipe: {err}"))?;
        env.push(("TURBOSCHED_REPORT_FD".into(), REPORT_FD.to_string().into()));
        extra_fd = Some((OwnedFd::from(writer), REPORT_FD));
        report_reader = Some(OwnedFd::from(reader));
    }
    let program_name = match &spec.handler {
        Handler::Builtin(name) => format!("worker {name}"),
        Handler::Command(c) => c.argv.join(" "),
    };
    let launch = Launch {
        program,
        args,
        env,
        cwd,
        extra_fd,
        arg0,
        die_with_parent: spec.die_with_parent,
    };
    Ok((launch, report_reader, program_name))
}

fn describe_exit(status: ExitStatus, elapsed: Duration) -> String {
    use std::os::unix::process::ExitStatusExt;
    let after = humantime::format_duration(Duration::from_secs(elapsed.as_secs()));
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code} after {after}"),
        (None, Some(signal)) => format!("killed by signal {signal} after {after}"),
        (None, None) => format!("ended after {after}"),
    }
}

/// Reads one line of at most `max` bytes (without its newline); the rest of a longer
/// line is consumed and counted, never held. `None` at the end of the stream.
async fn read_line_bounded<R: AsyncBufRead + Unpin>(
    reader: &mut R,
    max: usize,
) -> std::io::Result<Option<(String, usize)>> {
    let mut line: Vec<u8> = Vec::new();
    let mut cut = 0usize;
    let mut read_any = false;
    loop {
        let available = reader.fill_buf().await?;
        if available.is_empty() {
            break;
        }
        read_any = true;
        let newline = available.iter().position(|b| *b == b'\n');
        let mut end = newline.unwrap_or(available.len());
        if newline.is_some() && end > 0 && available[end - 1] == b'\r' {
            end -= 1;
        }
        let chunk = &available[..end];
        let keep = chunk.len().min(max.saturating_sub(line.len()));
        line.extend_from_slice(&chunk[..keep]);
        cut += chunk.len() - keep;
        let used = newline.map_or(available.len(), |at| at + 1);
        reader.consume(used);
        if newline.is_some() {
            break;
        }
    }
    if !read_any {
        return Ok(None);
    }
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    Ok(Some((String::from_utf8_lossy(&line).into_owned(), cut)))
}

/// Whose output a pump reads: what its lines are logged and reported under (not the
/// whole [`AttemptSpec`], whose handler and params each pump would copy).
struct Source {
    run: RunId,
    attempt: Attempt,
    log: TaskLog,
}

impl Source {
    fn of(spec: &AttemptSpec) -> Source {
        Source {
            run: spec.run,
            attempt: spec.attempt,
            log: spec.log.clone(),
        }
    }
}

async fn pump_output(
    stream: impl AsyncRead + Unpin,
    spec: Source,
    level: Level,
    events: mpsc::Sender<Envelope>,
    last_line: Option<watch::Sender<String>>,
) {
    let mut reader = BufReader::with_capacity(OUTPUT_BUFFER, stream);
    while let Ok(Some((mut line, cut))) = read_line_bounded(&mut reader, MAX_OUTPUT_LINE).await {
        if cut > 0 {
            line.push_str(&format!(
                " … [{cut} more bytes of this line cut: lines are kept to {} KiB]",
                MAX_OUTPUT_LINE / 1024
            ));
        }
        if let Some(msg) = parse_stdout_line(&line) {
            let _ = events
                .send(Envelope {
                    run: spec.run,
                    attempt: spec.attempt,
                    event: RunnerEvent::Report(Report::from(msg)),
                })
                .await;
        }
        spec.log.line(spec.run, spec.attempt, level, &line);
        if let Some(last) = &last_line {
            if !line.trim().is_empty() {
                let _ = last.send(line.trim().to_string());
            }
        }
    }
}

/// Forwards protocol messages; returns the last `error` message the child reported.
async fn pump_reports(
    reader: OwnedFd,
    run: RunId,
    attempt: Attempt,
    events: mpsc::Sender<Envelope>,
) -> Option<(String, bool)> {
    let receiver = tokio::net::unix::pipe::Receiver::from_owned_fd(reader).ok()?;
    let mut reader = BufReader::with_capacity(OUTPUT_BUFFER, receiver);
    let mut reported = None;
    while let Ok(Some((line, cut))) = read_line_bounded(&mut reader, MAX_REPORT_LINE).await {
        if cut > 0 {
            tracing::warn!(run = %run, attempt = %attempt, "dropped a report line over {} KiB", MAX_REPORT_LINE / 1024);
            continue;
        }
        let Some(msg) = Msg::parse(&line) else {
            continue;
        };
        if let Msg::Error { message, fatal } = &msg {
            reported = Some((message.clone(), *fatal));
        }
        let _ = events
            .send(Envelope {
                run,
                attempt,
                event: RunnerEvent::Report(Report::from(msg)),
            })
            .await;
    }
    reported
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_real_child_pid_names_a_process_group() {
        assert_eq!(process_group(0), None, "0 is the service's own group");
        assert_eq!(process_group(1), None);
        assert_eq!(
            process_group(u32::MAX),
            None,
            "would wrap to -1: every process"
        );
        assert_eq!(process_group(4242), Some(Pid::from_raw(4242)));
    }

    #[tokio::test]
    async fn a_line_longer_than_the_limit_is_cut_and_the_next_line_is_whole() {
        let mut text = vec![b'x'; 10_000];
        text.extend_from_slice(b"\r\nnext\nlast without newline");
        let mut reader = BufReader::with_capacity(64, &text[..]);
        let (first, cut) = read_line_bounded(&mut reader, 100).await.unwrap().unwrap();
        assert_eq!((first.len(), cut), (100, 9_900));
        let (next, cut) = read_line_bounded(&mut reader, 100).await.unwrap().unwrap();
        assert_eq!((next.as_str(), cut), ("next", 0));
        let (last, _) = read_line_bounded(&mut reader, 100).await.unwrap().unwrap();
        assert_eq!(last, "last without newline");
        assert!(read_line_bounded(&mut reader, 100).await.unwrap().is_none());
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_runner_that_panics_still_reports_its_attempt_failed() {
        let (events, mut received) = mpsc::channel(8);
        let runner = tokio::spawn(async move {
            let _finisher = Finisher {
                events,
                run: RunId(7),
                attempt: Attempt(1),
                group: None,
                started: MonoInstant::now(),
                done: false,
            };
            panic!("a bug in the runner");
        });
        assert!(runner.await.is_err(), "the task panicked");
        let envelope = tokio::time::timeout(Duration::from_secs(5), received.recv())
            .await
            .expect("reported in time")
            .expect("an event");
        assert_eq!((envelope.run, envelope.attempt), (RunId(7), Attempt(1)));
        match envelope.event {
            RunnerEvent::Finished {
                outcome: Outcome::Failed { error, fatal, .. },
                ..
            } => {
                assert!(error.contains("panic"), "{error}");
                assert!(!fatal, "retried by policy");
            }
            other => panic!("expected a failed finish, got {other:?}"),
        }
    }
}
