//! The engine's front door: the [`Handle`] in-process callers (the HTTP layer, signal
//! handlers) send [`Command`]s through, the [`EngineError`]s they get back, the injectable
//! [`Clock`] and the [`Mode`] an engine runs in.

use tokio::sync::{mpsc, oneshot};
use tokio_util::sync::CancellationToken;

use crate::model::{Instant, RunId, RunState};
use crate::store::{AbortOutcome, StoreError};

/// The wall clock, injectable.
pub trait Clock: Send + Sync {
    /// Now, UTC.
    fn now(&self) -> Instant;
}

/// The system clock.
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> Instant {
        chrono::Utc::now()
    }
}

/// How the engine runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// The service: fires schedules, adopts runs, finds orphans, runs until shut down.
    Serve,
    /// `turbosched run` with no service up: runs only the runs it is given (and their
    /// downstream cascade), then returns.
    Foreground,
}

/// What can go wrong when asking the engine for something.
#[derive(Debug, thiserror::Error)]
pub enum EngineError {
    /// A backfill that cannot be made (no schedule, an empty or too long range).
    #[error("{0}")]
    Backfill(String),
    /// A run's own params the task's handler does not read.
    #[error("{0}")]
    BadParams(String),
    /// No such task.
    #[error("unknown task \"{task}\" (known tasks: {known})")]
    UnknownTask {
        /// Asked for.
        task: String,
        /// Configured.
        known: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// The engine has stopped.
    #[error("the engine is not running")]
    Stopped,
    /// The task's overlap policy refuses a new run while this one is active.
    #[error("task {task} already has run {run} {what}; its overlap policy is skip")]
    Overlap {
        /// Task.
        task: String,
        /// The active run.
        run: RunId,
        /// "running" or "queued".
        what: &'static str,
    },
    /// No such run.
    #[error("no run with id {0}")]
    RunNotFound(RunId),
    /// Only a finished run can be retried.
    #[error("run {run} is {state}: only a finished run can be retried")]
    NotRetryable {
        /// Run.
        run: RunId,
        /// Its state.
        state: RunState,
    },
    /// The config file on disk is invalid; the running config was kept.
    #[error("config not reloaded, the running config is kept:\n{0}")]
    Config(crate::config::ConfigErrors),
}

/// A request to the engine.
pub enum Command {
    /// Queue a manual run.
    Trigger {
        /// Task.
        task: String,
        /// Bypass the dependency check.
        force: bool,
        /// Then run the tasks that depend on it.
        downstream: bool,
        /// The run's own params, merged over the task's.
        params: Option<crate::config::RunParams>,
        /// Answer.
        reply: oneshot::Sender<Result<RunId, EngineError>>,
    },
    /// Queue the past ticks of a task ([`super::backfill`]); `from`/`to` as the CLI
    /// takes them (RFC 3339, or a date in the task's zone).
    Backfill {
        /// Task.
        task: String,
        /// First tick.
        from: String,
        /// Last tick.
        to: String,
        /// Then run the tasks that depend on it.
        downstream: bool,
        /// List only.
        dry_run: bool,
        /// Answer.
        reply: oneshot::Sender<Result<Vec<super::BackfillTick>, EngineError>>,
    },
    /// Abort a run.
    Abort {
        /// Run.
        run: RunId,
        /// Answer.
        reply: oneshot::Sender<Result<AbortOutcome, EngineError>>,
    },
    /// Pause or resume a task (persisted).
    Pause {
        /// Task.
        task: String,
        /// Pause (true) or resume (false).
        paused: bool,
        /// Answer.
        reply: oneshot::Sender<Result<(), EngineError>>,
    },
    /// Read the config file again; swap only if it is valid.
    Reload {
        /// Answer: the new config's hash.
        reply: oneshot::Sender<Result<String, EngineError>>,
    },
    /// Run a finished run's task again, resuming from its last checkpoint.
    Retry {
        /// The finished run.
        run: RunId,
        /// Answer: the new run.
        reply: oneshot::Sender<Result<RunId, EngineError>>,
    },
}

/// The front door for other in-process parts (the HTTP layer): a cheap, cloneable way to
/// send [`Command`]s and to stop the engine.
#[derive(Clone)]
pub struct Handle {
    pub(super) commands: mpsc::Sender<Command>,
    pub(super) cancel: CancellationToken,
}

impl Handle {
    /// Queues a manual run of `task`.
    pub async fn trigger(
        &self,
        task: &str,
        force: bool,
        downstream: bool,
        params: Option<crate::config::RunParams>,
    ) -> Result<RunId, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Trigger {
                task: task.to_string(),
                force,
                downstream,
                params,
                reply,
            })
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Aborts `run`.
    pub async fn abort(&self, run: RunId) -> Result<AbortOutcome, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.commands
            .send(Command::Abort { run, reply })
            .await
            .map_err(|_| EngineError::Stopped)?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Pauses (`true`) or resumes (`false`) `task`.
    pub async fn pause(&self, task: &str, paused: bool) -> Result<(), EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Pause {
            task: task.to_string(),
            paused,
            reply,
        })
        .await?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Queues the past ticks of `task` from `from` to `to` ([`super::backfill`]).
    pub async fn backfill(
        &self,
        task: &str,
        from: &str,
        to: &str,
        downstream: bool,
        dry_run: bool,
    ) -> Result<Vec<super::BackfillTick>, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Backfill {
            task: task.to_string(),
            from: from.to_string(),
            to: to.to_string(),
            downstream,
            dry_run,
            reply,
        })
        .await?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Reloads the config file; on errors the running config stays.
    pub async fn reload(&self) -> Result<String, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Reload { reply }).await?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    /// Queues a new run of a finished run's task, resuming from its checkpoint.
    pub async fn retry(&self, run: RunId) -> Result<RunId, EngineError> {
        let (reply, answer) = oneshot::channel();
        self.send(Command::Retry { run, reply }).await?;
        answer.await.map_err(|_| EngineError::Stopped)?
    }

    async fn send(&self, command: Command) -> Result<(), EngineError> {
        self.commands
            .send(command)
            .await
            .map_err(|_| EngineError::Stopped)
    }

    /// Resolves once a shutdown has begun (long-lived readers, such as event streams, end
    /// on it so the HTTP server can stop).
    pub async fn stopping(&self) {
        self.cancel.cancelled().await;
    }

    /// Starts a graceful shutdown.
    pub fn shutdown(&self) {
        self.cancel.cancel();
    }
}
