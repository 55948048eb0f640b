//! Starting a child process and reaping it: `posix_spawn` with the service's environment
//! read once, `/dev/null` opened once, from a spawner thread whose descriptor table holds
//! a handful of descriptors ([`spawners`]), and the exit watched through a pidfd on the
//! runtime's epoll — opened only when somebody waits for a child that has not exited.
//!
//! Why the pidfd waits: a descriptor open in the starting thread's table is copied into
//! the child and closed again at its `exec`, and the `fork` road and a kernel without
//! spawners start children from the service's own table, where each running child's
//! descriptors tax every other spawn. A short child's pipes reach end-of-file as it exits; a caller
//! that reads them first ([`crate::runner`] does) then finds it exited at its first
//! `waitpid`, and the pidfd, its epoll registration and its descriptor are never made.
//!
//! Why not `tokio::process::Command`: under it, `std::process::Command` re-reads and
//! copies the service's whole environment into a fresh map on every spawn that sets a
//! variable (every attempt sets `TURBOSCHED_RUN_ID` and five more), and opens `/dev/null`
//! for every stdin; at a thousand spawns a second that was 11 % of the service's CPU
//! (`perf`, 1,000 tasks × `* * * * * *`). The child here starts exactly as there: its own
//! process group, an empty signal mask, SIGPIPE back to its default, stdin on `/dev/null`,
//! stdout and stderr on pipes, every other descriptor of the service closed at `exec`.
//!
//! `std::process::Command` still starts the child where `posix_spawn` cannot: the
//! parent-death signal (cluster mode; a hook between `fork` and `exec`), a working directory, a `PATH` of
//! the task's own (resolved against the child's environment, as std does). Either way the
//! caller gets the same [`Child`].
//!
//! Invariant: a [`Child`] is reaped exactly once, by [`Child::wait`] or, when it is
//! dropped unreaped within the runtime, by a task on it (a thread of its blocking pool
//! where no pidfd is to be had); a zombie outlives its exit by no more than a wake-up once
//! somebody waits (the runner waits once the output has ended, or after 20 ms).

use std::borrow::Cow;
use std::ffi::{CStr, CString, OsStr, OsString};
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::PathBuf;
use std::process::{ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use nix::fcntl::OFlag;
use nix::spawn::{PosixSpawnAttr, PosixSpawnFileActions, PosixSpawnFlags};
use nix::sys::signal::{SigSet, Signal};
use nix::unistd::Pid;
use tokio::io::unix::AsyncFd;
use tokio::net::unix::pipe;

mod spawners;

/// What to start.
pub struct Launch {
    /// The program: a path, or a name looked up in `PATH`.
    pub program: OsString,
    /// Its arguments (after the program's name).
    pub args: Vec<OsString>,
    /// Variables set on top of the service's environment; a later one wins.
    pub env: Vec<(OsString, OsString)>,
    /// The child's working directory (the service's when `None`).
    pub cwd: Option<PathBuf>,
    /// A descriptor placed on `fd` in the child (a built-in worker's report pipe).
    pub extra_fd: Option<(OwnedFd, RawFd)>,
    /// The child's `argv[0]`, when it is not `program`.
    pub arg0: Option<OsString>,
    /// The kernel kills the child when the thread that started it exits
    /// (`PR_SET_PDEATHSIG`): needs a hook between `fork` and `exec`, so `fork`.
    pub die_with_parent: bool,
}

/// A started child: its pid, the read ends of its stdout and stderr, and its exit.
pub struct Child {
    pid: Pid,
    /// When it started.
    start: Start,
    /// Taken by whoever reads the output.
    pub stdout: Option<pipe::Receiver>,
    /// Taken by whoever reads the output.
    pub stderr: Option<pipe::Receiver>,
    /// How its exit is awaited: `None` until a wait finds it still running.
    exit: Option<Exit>,
    status: Option<ExitStatus>,
}

/// How a child's exit is awaited.
enum Exit {
    /// Readable once the child has exited (Linux ≥ 5.3).
    Pidfd(AsyncFd<OwnedFd>),
    /// No pidfd to be had: a blocking `waitpid` on the runtime's blocking pool.
    Thread(tokio::task::JoinHandle<io::Result<ExitStatus>>),
    /// That thread failed: the pid may no longer be ours to wait for.
    Lost,
}

/// Starts `launch`: from a spawner thread whose descriptor table holds a handful of
/// descriptors instead of the service's (see [`spawners`]), the caller waiting as for its
/// own `posix_spawn`; on the calling thread where no spawner can be had (a kernel before
/// 5.6, a seccomp filter) and for the launches only `std` can start. Must be called
/// within a Tokio runtime with I/O enabled (the pipes register with it, and the pidfd
/// when a wait needs one); outside one it is an error, not a panic.
pub fn spawn(launch: Launch) -> io::Result<Child> {
    one(start(vec![launch], true))
}

/// [`spawn`] on the calling thread: the lone start of an idle service, whose table is
/// small, spared the hand-over to a spawner thread and back.
pub fn spawn_here(launch: Launch) -> io::Result<Child> {
    one(start(vec![launch], false))
}

/// [`spawn`] for several launches at once, answered in their order: handed to the
/// spawner threads together, so that they start them back to back while the caller
/// waits once for all, not once for each (a burst's starts: each hand-over and answer
/// is a thread's sleep and wake, dear on a virtual machine).
pub fn spawn_all(launches: Vec<Launch>) -> Vec<io::Result<Child>> {
    start(launches, true)
}

/// Whether [`spawn`] and [`spawn_all`] start `launch` from the spawner threads (the
/// fast road, and spawners run here), not on the caller's thread.
pub fn apart(launch: &Launch) -> bool {
    fast(launch) && spawners::get().is_some()
}

/// The CPU time the spawner threads have spent starting children so far; `None` until
/// they start (or where they cannot run). Read by `turbosched bench`.
pub fn spawner_cpu() -> Option<std::time::Duration> {
    spawners::started().map(spawners::Spawners::cpu)
}

fn one(mut started: Vec<io::Result<Child>>) -> io::Result<Child> {
    started
        .pop()
        .unwrap_or_else(|| Err(io::Error::other("no child was started")))
}

/// Starts `launches`, from the spawner threads if `apart` and they can be had.
fn start(launches: Vec<Launch>, apart: bool) -> Vec<io::Result<Child>> {
    let Ok(runtime) = tokio::runtime::Handle::try_current() else {
        return launches
            .iter()
            .map(|_| {
                Err(io::Error::other(
                    "a child can only be started within the runtime",
                ))
            })
            .collect();
    };
    // The fast road's launches made ready here and started together; the rest at once.
    let mut started: Vec<Option<io::Result<Begun>>> = Vec::with_capacity(launches.len());
    let mut ready: Vec<(usize, Ready)> = Vec::new();
    for launch in launches {
        if fast(&launch) {
            match Ready::of(launch) {
                Ok(made) => ready.push((started.len(), made)),
                Err(err) => {
                    started.push(Some(Err(err)));
                    continue;
                }
            }
            started.push(None);
        } else {
            started.push(Some(std_spawn(launch)));
        }
    }
    let spawners = if apart { spawners::get() } else { None };
    let (places, ready): (Vec<usize>, Vec<Ready>) = ready.into_iter().unzip();
    for (place, begun) in places.into_iter().zip(posix_spawn(ready, spawners)) {
        started[place] = Some(begun);
    }
    let _entered = runtime.enter();
    started
        .into_iter()
        .map(|begun| {
            let (pid, start, stdout, stderr) =
                begun.unwrap_or_else(|| Err(io::Error::other("a launch was never started")))?;
            child(pid, start, stdout, stderr)
        })
        .collect()
}

/// A child begun: its pid, when it started (see [`Start`]), and the read ends of its
/// stdout and stderr.
type Begun = (Pid, Start, OwnedFd, OwnedFd);

/// When a child started: the monotonic clock just before its start, and the wall
/// clock's time just after.
#[derive(Clone, Copy)]
struct Start {
    began: std::time::Instant,
    at: std::time::SystemTime,
}

/// Whether `launch` can take the fast road: `posix_spawn`, with no hook between `fork`
/// and `exec`, the service's working directory, and `PATH` searched as the service's.
fn fast(launch: &Launch) -> bool {
    !launch.die_with_parent
        && launch.cwd.is_none()
        && !launch.env.iter().any(|(key, _)| key == "PATH")
}

/// The started child `pid`, its output's read ends put on the runtime. Within the runtime.
fn child(pid: Pid, start: Start, stdout: OwnedFd, stderr: OwnedFd) -> io::Result<Child> {
    let pipes = (|| Ok::<_, io::Error>((receiver(stdout)?, receiver(stderr)?)))();
    match pipes {
        Ok((stdout, stderr)) => Ok(Child {
            pid,
            start,
            stdout: Some(stdout),
            stderr: Some(stderr),
            exit: None,
            status: None,
        }),
        Err(err) => {
            // Started but its output cannot be read (out of descriptors, say): it must not
            // run unwatched.
            let _ = nix::sys::signal::killpg(pid, Signal::SIGKILL);
            let _ = wait_blocking(pid);
            Err(err)
        }
    }
}

/// A watch on the exit of the child `pid`, not yet reaped: its pidfd on the runtime's
/// epoll, or, with no pidfd to be had (a kernel before 5.3, a seccomp filter, no
/// descriptor left, epoll refusing it), a blocking `waitpid` on the blocking pool, one
/// thread while it runs. Must be called within the runtime.
fn watch(pid: Pid) -> Exit {
    if let Some(fd) = pidfd_open(pid) {
        // SAFETY: an `OwnedFd` keeps its one descriptor open until the `AsyncFd` drops it.
        if let Ok(fd) =
            unsafe { AsyncFd::register_with_interest(fd, tokio::io::Interest::READABLE) }
        {
            return Exit::Pidfd(fd);
        }
    }
    Exit::Thread(tokio::task::spawn_blocking(move || wait_blocking(pid)))
}

impl Child {
    /// The child's pid (also its process group's id).
    pub fn id(&self) -> u32 {
        self.pid.as_raw().unsigned_abs()
    }

    /// When the child started, by the wall clock (taken where it was started: a batch's
    /// children each at their own start, not when the batch was answered).
    pub fn started_at(&self) -> std::time::SystemTime {
        self.start.at
    }

    /// The monotonic clock just before the child's own start (a batch's children each
    /// at theirs): its run's time and timeout count from here.
    pub fn began(&self) -> std::time::Instant {
        self.start.began
    }

    /// Waits for the child to exit and reaps it. Cancel-safe: dropping the future loses
    /// nothing, the next call waits on. A child already exited is reaped at once; only
    /// one still running is watched (see the module's documentation).
    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        loop {
            if let Some(status) = self.status {
                return Ok(status);
            }
            if self.exit.is_none() {
                match reap(self.pid)? {
                    Some(status) => {
                        self.status = Some(status);
                        continue;
                    }
                    None => self.exit = Some(watch(self.pid)),
                }
            }
            match &mut self.exit {
                Some(Exit::Pidfd(fd)) => {
                    let mut ready = fd.readable().await?;
                    match reap(self.pid)? {
                        Some(status) => self.status = Some(status),
                        None => ready.clear_ready(),
                    }
                }
                Some(Exit::Thread(thread)) => {
                    let waited = thread.await;
                    // A thread that failed has ended: its handle is not polled again.
                    let failed = match waited {
                        Ok(Ok(status)) => {
                            self.status = Some(status);
                            continue;
                        }
                        Ok(Err(err)) => err,
                        Err(err) => io::Error::other(err),
                    };
                    self.exit = Some(Exit::Lost);
                    return Err(failed);
                }
                Some(Exit::Lost) | None => {
                    return Err(io::Error::other("the child's exit is no longer watched"))
                }
            }
        }
    }

    /// Whether the child's exit is watched by a pidfd or a thread: a wait found it
    /// running.
    #[cfg(test)]
    fn watched(&self) -> bool {
        self.exit.is_some()
    }
}

impl Drop for Child {
    fn drop(&mut self) {
        if self.status.is_some() {
            return;
        }
        let pid = self.pid;
        let fd = match self.exit.take() {
            // A blocking waiter reaps by itself: a `waitpid` here could take the status of
            // another child that has since been given the same pid.
            Some(Exit::Thread(_) | Exit::Lost) => return,
            Some(Exit::Pidfd(fd)) => Some(fd),
            // Never watched: nobody else reaps it, so its pid is still its own.
            None => None,
        };
        if let Ok(Some(_)) = reap(pid) {
            return;
        }
        // Still running: reaped when it exits.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let _entered = runtime.enter();
        let fd = match fd {
            Some(fd) => fd,
            None => match watch(pid) {
                Exit::Pidfd(fd) => fd,
                // The thread reaps it (`watch` makes no other kind).
                Exit::Thread(_) | Exit::Lost => return,
            },
        };
        runtime.spawn(async move {
            while let Ok(mut ready) = fd.readable().await {
                match reap(pid) {
                    Ok(None) => ready.clear_ready(),
                    _ => break,
                }
            }
        });
    }
}

/// The read end of a child's output pipe, on the runtime: made non-blocking with one
/// `fcntl` (it is a fresh pipe opened read-only, so tokio's own checks would only repeat
/// what is known, at two more system calls per pipe).
fn receiver(read_end: OwnedFd) -> io::Result<pipe::Receiver> {
    nix::fcntl::fcntl(&read_end, nix::fcntl::FcntlArg::F_SETFL(OFlag::O_NONBLOCK))?;
    pipe::Receiver::from_owned_fd_unchecked(read_end)
}

/// `waitpid(pid, WNOHANG)`: the status once the child has exited, `None` before.
fn reap(pid: Pid) -> io::Result<Option<ExitStatus>> {
    let mut status = 0;
    loop {
        // SAFETY: plain system call on our own child; `status` outlives it.
        let reaped = unsafe { libc::waitpid(pid.as_raw(), &mut status, libc::WNOHANG) };
        match reaped {
            0 => return Ok(None),
            -1 => {
                let err = io::Error::last_os_error();
                if err.kind() != io::ErrorKind::Interrupted {
                    return Err(err);
                }
            }
            _ => return Ok(Some(ExitStatus::from_raw(status))),
        }
    }
}

/// `waitpid(pid, 0)`: blocks until the child exits.
fn wait_blocking(pid: Pid) -> io::Result<ExitStatus> {
    let mut status = 0;
    loop {
        // SAFETY: as in `reap`.
        if unsafe { libc::waitpid(pid.as_raw(), &mut status, 0) } != -1 {
            return Ok(ExitStatus::from_raw(status));
        }
        let err = io::Error::last_os_error();
        if err.kind() != io::ErrorKind::Interrupted {
            return Err(err);
        }
    }
}

/// A pidfd of the child `pid`, or `None` when there is none to be had: the kernel lacks
/// `pidfd_open` or refuses it (remembered, not asked again), or no descriptor is left.
fn pidfd_open(pid: Pid) -> Option<OwnedFd> {
    static UNSUPPORTED: AtomicBool = AtomicBool::new(false);
    if UNSUPPORTED.load(Ordering::Relaxed) {
        return None;
    }
    // SAFETY: `pidfd_open(2)` takes a pid and flags and returns a new descriptor (always
    // close-on-exec) or -1; nothing else is touched.
    let fd = unsafe { libc::syscall(libc::SYS_pidfd_open, pid.as_raw(), 0) };
    if fd < 0 {
        if matches!(
            io::Error::last_os_error().raw_os_error(),
            Some(libc::ENOSYS | libc::EPERM)
        ) {
            UNSUPPORTED.store(true, Ordering::Relaxed);
        }
        return None;
    }
    let fd = RawFd::try_from(fd).ok()?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Some(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// One variable of the service's environment: `KEY=VALUE` and the length of `KEY`.
struct Inherited {
    pair: CString,
    key_len: usize,
}

impl Inherited {
    fn key(&self) -> &[u8] {
        &self.pair.as_bytes()[..self.key_len]
    }
}

/// The service's environment, read at the first spawn. The service never changes its
/// environment after start-up (systemd's variables are removed before any thread
/// starts), so once is enough.
fn service_environment() -> &'static [Inherited] {
    static ENVIRONMENT: OnceLock<Vec<Inherited>> = OnceLock::new();
    ENVIRONMENT.get_or_init(|| {
        std::env::vars_os()
            .filter_map(|(key, value)| {
                Some(Inherited {
                    pair: pair(&key, &value).ok()?,
                    key_len: key.len(),
                })
            })
            .collect()
    })
}

/// `/dev/null`, opened once for every child's stdin (a failure is not kept: the next
/// spawn tries again).
fn dev_null() -> io::Result<RawFd> {
    static DEV_NULL: OnceLock<OwnedFd> = OnceLock::new();
    if let Some(fd) = DEV_NULL.get() {
        return Ok(fd.as_raw_fd());
    }
    let opened = std::fs::File::open("/dev/null")
        .map_err(|err| io::Error::new(err.kind(), format!("cannot open /dev/null: {err}")))?;
    Ok(DEV_NULL.get_or_init(|| OwnedFd::from(opened)).as_raw_fd())
}

/// The value itself is not in the error: it may be a secret of the task's environment.
fn c_string(bytes: &[u8]) -> io::Result<CString> {
    CString::new(bytes).map_err(|_| {
        io::Error::new(
            io::ErrorKind::InvalidInput,
            "an argument or environment variable contains a NUL byte",
        )
    })
}

fn pair(key: &OsStr, value: &OsStr) -> io::Result<CString> {
    let mut bytes = Vec::with_capacity(key.len() + value.len() + 1);
    bytes.extend_from_slice(key.as_bytes());
    bytes.push(b'=');
    bytes.extend_from_slice(value.as_bytes());
    c_string(&bytes)
}

/// A fast-road launch made ready to start on any thread: the strings for `exec`, with no
/// descriptor in it (those are given at [`Prepared::start`], in the starting thread's
/// own table).
struct Prepared {
    program: CString,
    argv: Vec<CString>,
    /// The service's variables (borrowed, read once) and the task's own, in that order.
    envp: Vec<Cow<'static, CStr>>,
    /// `program` has no `/`: it is looked up in `PATH`.
    search: bool,
}

impl Prepared {
    fn of(launch: &Launch) -> io::Result<Prepared> {
        let program = c_string(launch.program.as_bytes())?;
        let mut argv = Vec::with_capacity(launch.args.len() + 1);
        argv.push(match &launch.arg0 {
            Some(arg0) => c_string(arg0.as_bytes())?,
            None => program.clone(),
        });
        for arg in &launch.args {
            argv.push(c_string(arg.as_bytes())?);
        }
        let mut envp: Vec<Cow<'static, CStr>> =
            Vec::with_capacity(service_environment().len() + launch.env.len());
        envp.extend(
            service_environment()
                .iter()
                .filter(|inherited| {
                    !launch
                        .env
                        .iter()
                        .any(|(key, _)| key.as_bytes() == inherited.key())
                })
                .map(|inherited| Cow::Borrowed(inherited.pair.as_c_str())),
        );
        // The task's variables, the last of each name winning, over the service's.
        for (index, (key, value)) in launch.env.iter().enumerate() {
            if !launch.env[index + 1..]
                .iter()
                .any(|(later, _)| later == key)
            {
                envp.push(Cow::Owned(pair(key, value)?));
            }
        }
        Ok(Prepared {
            search: !launch.program.as_bytes().contains(&b'/'),
            program,
            argv,
            envp,
        })
    }

    /// `posix_spawn` with `stdin`, `stdout`, `stderr` and `extra` (a descriptor and the
    /// number it takes in the child) of the calling thread's descriptor table.
    fn start(
        &self,
        stdin: RawFd,
        stdout: RawFd,
        stderr: RawFd,
        extra: Option<(RawFd, RawFd)>,
    ) -> io::Result<Pid> {
        let mut actions = PosixSpawnFileActions::init()?;
        actions.add_dup2(stdin, 0)?;
        actions.add_dup2(stdout, 1)?;
        actions.add_dup2(stderr, 2)?;
        // A descriptor that already sits at its target is copied elsewhere first: `dup2` of
        // a descriptor onto itself keeps its close-on-exec flag before glibc 2.29.
        let mut moved: Option<OwnedFd> = None;
        if let Some((fd, at)) = extra {
            let source = if fd == at {
                // SAFETY: `fd` is open for the duration of this call (the caller's).
                let borrowed = unsafe { std::os::fd::BorrowedFd::borrow_raw(fd) };
                let copy =
                    nix::fcntl::fcntl(borrowed, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(at + 1))?;
                // SAFETY: a fresh descriptor that nothing else owns; closed when this returns.
                moved
                    .insert(unsafe { OwnedFd::from_raw_fd(copy) })
                    .as_raw_fd()
            } else {
                fd
            };
            actions.add_dup2(source, at)?;
        }
        let mut attr = PosixSpawnAttr::init()?;
        attr.set_pgroup(Pid::from_raw(0))?;
        attr.set_sigmask(&SigSet::empty())?;
        let mut default = SigSet::empty();
        default.add(Signal::SIGPIPE);
        attr.set_sigdefault(&default)?;
        attr.set_flags(
            PosixSpawnFlags::POSIX_SPAWN_SETPGROUP
                | PosixSpawnFlags::POSIX_SPAWN_SETSIGMASK
                | PosixSpawnFlags::POSIX_SPAWN_SETSIGDEF,
        )?;
        let pid = if self.search {
            nix::spawn::posix_spawnp(&self.program, &actions, &attr, &self.argv, &self.envp)
        } else {
            nix::spawn::posix_spawn(
                self.program.as_c_str(),
                &actions,
                &attr,
                &self.argv,
                &self.envp,
            )
        }
        .map_err(|errno| io::Error::from_raw_os_error(errno as i32))?;
        drop(moved);
        Ok(pid)
    }
}

/// The fast road: pipes for stdout and stderr, then `posix_spawn`, from a spawner thread
/// when one is given, else on the calling thread.
/// A fast-road launch made ready on the caller's thread: its strings, and its pipes in
/// the service's table, whose write ends stay open until its child has started.
struct Ready {
    prepared: Prepared,
    stdout: OwnedFd,
    stderr: OwnedFd,
    writers: (OwnedFd, OwnedFd),
    extra: Option<(OwnedFd, RawFd)>,
}

impl Ready {
    fn of(launch: Launch) -> io::Result<Ready> {
        let prepared = Prepared::of(&launch)?;
        let (stdout, stdout_writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        let (stderr, stderr_writer) = nix::unistd::pipe2(OFlag::O_CLOEXEC)?;
        Ok(Ready {
            prepared,
            stdout,
            stderr,
            writers: (stdout_writer, stderr_writer),
            extra: launch.extra_fd,
        })
    }

    fn ends(&self) -> spawners::Ends {
        spawners::Ends {
            stdout: self.writers.0.as_raw_fd(),
            stderr: self.writers.1.as_raw_fd(),
            extra: self.extra.as_ref().map(|(fd, at)| (fd.as_raw_fd(), *at)),
        }
    }
}

/// Starts every launch of `ready` with `posix_spawn`: handed to `spawners` together, or
/// (none, or none left) one after another on this thread. Answers in their order.
fn posix_spawn(ready: Vec<Ready>, spawners: Option<&spawners::Spawners>) -> Vec<io::Result<Begun>> {
    if ready.is_empty() {
        return Vec::new();
    }
    let (prepared, rest): (Vec<Prepared>, Vec<_>) = ready
        .into_iter()
        .map(|made| {
            let ends = made.ends();
            let Ready {
                prepared,
                stdout,
                stderr,
                writers,
                extra,
            } = made;
            (prepared, (ends, stdout, stderr, writers, extra))
        })
        .unzip();
    let handed = match spawners {
        Some(spawners) => spawners.start(
            prepared
                .into_iter()
                .zip(rest.iter().map(|(ends, ..)| *ends))
                .collect(),
        ),
        None => Err(prepared),
    };
    let answers: Vec<io::Result<spawners::Started>> = match handed {
        Ok(answers) => answers,
        Err(prepared) => match dev_null() {
            Ok(null) => prepared
                .into_iter()
                .zip(rest.iter().map(|(ends, ..)| *ends))
                .map(|(prepared, ends)| {
                    let began = std::time::Instant::now();
                    let pid = prepared.start(null, ends.stdout, ends.stderr, ends.extra)?;
                    Ok((pid, began, std::time::SystemTime::now()))
                })
                .collect(),
            Err(err) => rest
                .iter()
                .map(|_| Err(io::Error::new(err.kind(), err.to_string())))
                .collect(),
        },
    };
    answers
        .into_iter()
        .zip(rest)
        .map(|(answer, (_, stdout, stderr, writers, extra))| {
            // The write ends close here: the child holds the only copies.
            drop((writers, extra));
            let (pid, began, at) = answer?;
            Ok((pid, Start { began, at }, stdout, stderr))
        })
        .collect()
}

/// Makes the kernel SIGKILL the child when the thread that started it exits
/// (`PR_SET_PDEATHSIG`): the service's runtime threads live as long as the service (the
/// serve runtime keeps idle threads alive), so that is when the service dies, `kill -9`
/// included. A service that died between `fork` and the `prctl` is caught by comparing
/// the parent pid. Costs a `fork` instead of `posix_spawn` per spawn, so only in cluster
/// mode, where an orphaned child would run beside its attempt's re-run on another
/// instance.
fn die_with_parent(command: &mut std::process::Command) {
    let parent = std::process::id();
    // SAFETY: the hook runs in the child between fork and exec and calls only
    // async-signal-safe functions (prctl, getppid, _exit); it allocates nothing.
    unsafe {
        command.pre_exec(move || {
            if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL) != 0 {
                return Err(io::Error::last_os_error());
            }
            if libc::getppid() as u32 != parent {
                libc::_exit(137);
            }
            Ok(())
        });
    }
}

fn std_spawn(launch: Launch) -> io::Result<Begun> {
    let began = std::time::Instant::now();
    use command_fds::{CommandFdExt, FdMapping};
    let mut command = std::process::Command::new(&launch.program);
    command
        .args(&launch.args)
        .envs(launch.env.iter().map(|(key, value)| (key, value)))
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0);
    if let Some(cwd) = &launch.cwd {
        command.current_dir(cwd);
    }
    if let Some((fd, at)) = launch.extra_fd {
        command
            .fd_mappings(vec![FdMapping {
                parent_fd: fd,
                child_fd: at,
            }])
            .map_err(|_| io::Error::other(format!("cannot map a descriptor to fd {at}")))?;
    }
    if let Some(arg0) = &launch.arg0 {
        command.arg0(arg0);
    }
    if launch.die_with_parent {
        die_with_parent(&mut command);
    }
    let mut child = command.spawn()?;
    let pid = Pid::from_raw(i32::try_from(child.id()).map_err(io::Error::other)?);
    let (Some(stdout), Some(stderr)) = (child.stdout.take(), child.stderr.take()) else {
        return Err(io::Error::other("the child's output pipes are missing"));
    };
    let at = std::time::SystemTime::now();
    // `command` owns the mapped descriptor's copy; dropping it leaves the child's.
    drop(command);
    Ok((
        pid,
        Start { began, at },
        OwnedFd::from(stdout),
        OwnedFd::from(stderr),
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn launch(program: &str, args: &[&str]) -> Launch {
        Launch {
            program: program.into(),
            args: args.iter().map(OsString::from).collect(),
            env: Vec::new(),
            cwd: None,
            extra_fd: None,
            arg0: None,
            die_with_parent: false,
        }
    }

    async fn output_of(mut child: Child) -> (String, String, ExitStatus) {
        use tokio::io::AsyncReadExt;
        let (mut out, mut err) = (String::new(), String::new());
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        let (read_out, read_err) = tokio::join!(
            stdout.read_to_string(&mut out),
            stderr.read_to_string(&mut err)
        );
        read_out.expect("stdout read");
        read_err.expect("stderr read");
        let status = child.wait().await.expect("reaped");
        (out, err, status)
    }

    #[tokio::test]
    async fn a_child_gets_the_service_environment_with_the_launch_variables_over_it() {
        let mut sh = launch(
            "/bin/sh",
            &[
                "-c",
                "echo \"$HOME|$TURBOSCHED_X|$PATH\"; echo to-stderr >&2; exit 3",
            ],
        );
        sh.env = vec![
            ("TURBOSCHED_X".into(), "first".into()),
            ("HOME".into(), "/nowhere".into()),
            ("TURBOSCHED_X".into(), "last".into()),
        ];
        let (out, err, status) = output_of(spawn(sh).expect("started")).await;
        let path = std::env::var("PATH").unwrap_or_default();
        assert_eq!(out, format!("/nowhere|last|{path}\n"));
        assert_eq!(err, "to-stderr\n");
        assert_eq!(status.code(), Some(3));
    }

    #[tokio::test]
    async fn a_child_runs_in_its_own_group_with_stdin_empty_and_sigpipe_default() {
        let sh = launch(
            "sh",
            &[
                "-c",
                // pgid = pid; stdin at end of file; SIGPIPE not ignored (`SigIgn` mask bit 13).
                "cut -d' ' -f5 /proc/$$/stat; echo $$; cat; grep SigIgn /proc/self/status",
            ],
        );
        let (out, _, status) = output_of(spawn(sh).expect("started")).await;
        assert!(status.success(), "{out}");
        let lines: Vec<&str> = out.lines().collect();
        assert_eq!(lines[0], lines[1], "the child leads its own process group");
        let ignored = u64::from_str_radix(lines[2].trim_start_matches("SigIgn:").trim(), 16)
            .expect("a hex mask");
        assert_eq!(
            ignored & (1 << (libc::SIGPIPE - 1)),
            0,
            "SIGPIPE is back to its default"
        );
    }

    /// A batch is answered in its order, each child its own: one that cannot start fails
    /// alone, between two that do; a launch for `std` (a working directory) starts
    /// beside the spawners' batch; each child is stamped with its own start.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_batch_is_answered_in_its_order_and_a_launch_that_fails_fails_alone() {
        let before = std::time::SystemTime::now();
        let mut in_tmp = launch("/bin/sh", &["-c", "pwd"]);
        in_tmp.cwd = Some("/tmp".into());
        let batch = vec![
            launch("/bin/echo", &["first"]),
            launch("/nonexistent/program", &[]),
            in_tmp,
            launch("/bin/echo", &["last"]),
        ];
        let mut answers = spawn_all(batch).into_iter();
        let mut next = || answers.next().expect("an answer for each launch");
        let first = next().expect("first started");
        let missing = next().err().expect("the missing program fails");
        let in_tmp = next().expect("the std launch started");
        let last = next().expect("last started");
        assert_eq!(missing.kind(), io::ErrorKind::NotFound, "{missing}");
        for child in [&first, &in_tmp, &last] {
            assert!(child.started_at() >= before, "stamped before the batch");
        }
        assert_eq!(output_of(first).await.0, "first\n");
        assert_eq!(output_of(in_tmp).await.0, "/tmp\n");
        assert_eq!(output_of(last).await.0, "last\n");
    }

    #[tokio::test]
    async fn a_missing_program_is_an_error_naming_the_cause() {
        let err = spawn(launch("/nonexistent/program", &[]))
            .err()
            .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
        let err = spawn(launch("no-such-program-anywhere", &[]))
            .err()
            .expect("refused");
        assert_eq!(err.kind(), io::ErrorKind::NotFound, "{err}");
    }

    /// Both roads of the fast start: a spawner thread's and the calling thread's.
    const ROADS: [fn(Launch) -> io::Result<Child>; 2] = [spawn, spawn_here];

    #[tokio::test]
    async fn a_descriptor_is_placed_where_asked_and_no_other_leaks_into_the_child() {
        for start in ROADS {
            a_descriptor_is_placed_where_asked_and_no_other_leaks(start).await;
        }
    }

    async fn a_descriptor_is_placed_where_asked_and_no_other_leaks(
        start: fn(Launch) -> io::Result<Child>,
    ) {
        let (reader, writer) = std::io::pipe().expect("pipe");
        let mut sh = launch("/bin/sh", &["-c", "echo reported >&3; ls /proc/self/fd"]);
        sh.extra_fd = Some((OwnedFd::from(writer), 3));
        let (out, _, status) = output_of(start(sh).expect("started")).await;
        assert!(status.success());
        let mut report = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(OwnedFd::from(reader)), &mut report)
            .expect("report read");
        assert_eq!(report, "reported\n");
        // Besides 0–3, the child holds only what this process leaves inheritable (a test
        // runner's jobserver pipe, say) and the one `ls` opens to read the folder.
        let inheritable: Vec<RawFd> = std::fs::read_dir("/proc/self/fd")
            .expect("fd folder")
            .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
            // SAFETY: F_GETFD only reads the descriptor's flags.
            .filter(|fd| unsafe { libc::fcntl(*fd, libc::F_GETFD) } == 0)
            .collect();
        let others: Vec<RawFd> = out
            .lines()
            .filter_map(|line| line.parse().ok())
            .filter(|fd| *fd > 3 && !inheritable.contains(fd))
            .collect();
        assert!(
            others.len() <= 1,
            "the child holds {others:?} of the service's descriptors"
        );
    }

    #[tokio::test]
    async fn a_descriptor_already_at_its_target_number_still_reaches_the_child() {
        for start in ROADS {
            a_descriptor_already_at_its_target_number_reaches(start).await;
        }
    }

    async fn a_descriptor_already_at_its_target_number_reaches(
        start: fn(Launch) -> io::Result<Child>,
    ) {
        let (reader, writer) = std::io::pipe().expect("pipe");
        // The writer moved to a free number of its own, then asked to stay there.
        let at = nix::fcntl::fcntl(&writer, nix::fcntl::FcntlArg::F_DUPFD_CLOEXEC(200))
            .expect("a free descriptor");
        drop(writer);
        // SAFETY: `at` was just returned by F_DUPFD_CLOEXEC and nothing else owns it.
        let writer = unsafe { OwnedFd::from_raw_fd(at) };
        // (`sh` names descriptors over 9 only through /proc.)
        let mut sh = launch(
            "/bin/sh",
            &["-c", &format!("echo reached > /proc/self/fd/{at}")],
        );
        sh.extra_fd = Some((writer, at));
        let (_, err, status) = output_of(start(sh).expect("started")).await;
        assert!(status.success(), "{err}");
        let mut report = String::new();
        std::io::Read::read_to_string(&mut std::fs::File::from(OwnedFd::from(reader)), &mut report)
            .expect("read");
        assert_eq!(report, "reached\n");
    }

    #[tokio::test]
    async fn a_child_can_be_given_its_own_argv0() {
        let mut sh = launch("/bin/sh", &["-c", "echo $0"]);
        sh.arg0 = Some("turbosched-worker".into());
        let (out, _, _) = output_of(spawn(sh).expect("started")).await;
        assert_eq!(out, "turbosched-worker\n");
    }

    #[tokio::test]
    async fn a_working_directory_and_a_task_path_take_the_std_road_with_the_same_result() {
        let mut sh = launch("sh", &["-c", "pwd; echo $PATH"]);
        sh.cwd = Some("/tmp".into());
        sh.env = vec![("PATH".into(), "/usr/bin:/bin".into())];
        let (out, _, status) = output_of(spawn(sh).expect("started")).await;
        assert!(status.success());
        assert_eq!(out, "/tmp\n/usr/bin:/bin\n");
    }

    /// What every short run does: its output read to the end, then its exit reaped with
    /// no pidfd opened (a descriptor, an epoll registration, four system calls saved).
    #[tokio::test]
    async fn a_child_whose_output_has_ended_is_reaped_without_a_pidfd() {
        use tokio::io::AsyncReadExt;
        let mut child = spawn(launch("/bin/sh", &["-c", "echo done; exit 4"])).expect("started");
        let (mut out, mut err) = (String::new(), String::new());
        let mut stdout = child.stdout.take().expect("stdout");
        let mut stderr = child.stderr.take().expect("stderr");
        stdout.read_to_string(&mut out).await.expect("stdout");
        stderr.read_to_string(&mut err).await.expect("stderr");
        // The pipes end in the child's exit, a moment before it becomes a zombie (a wait
        // in that moment finds it running and watches it: right, only slower).
        let stat = PathBuf::from(format!("/proc/{}/stat", child.pid));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !std::fs::read_to_string(&stat).is_ok_and(|text| text.contains(") Z ")) {
            assert!(std::time::Instant::now() < deadline, "never exited");
            tokio::task::yield_now().await;
        }
        assert_eq!(child.wait().await.expect("reaped").code(), Some(4));
        assert!(!child.watched(), "an exited child was watched");
        assert_eq!((out.as_str(), err.as_str()), ("done\n", ""));
    }

    #[tokio::test]
    async fn a_child_still_running_is_watched_until_it_exits() {
        let mut child = spawn(launch("/bin/sh", &["-c", "sleep 0.3; exit 5"])).expect("started");
        let started = std::time::Instant::now();
        let status = child.wait().await.expect("reaped");
        assert_eq!(status.code(), Some(5));
        assert!(child.watched());
        assert!(started.elapsed() >= std::time::Duration::from_millis(250));
        // Reaped once: asked again, the status is the one kept.
        assert_eq!(child.wait().await.expect("kept").code(), Some(5));
    }

    /// The size of `script`'s descriptor table (`FDSize` in `/proc`), started by `start`.
    async fn table_size_of(start: fn(Launch) -> io::Result<Child>) -> usize {
        let sh = launch("/bin/sh", &["-c", "exec grep FDSize /proc/self/status"]);
        let (out, err, status) = output_of(start(sh).expect("started")).await;
        assert!(status.success(), "{err}");
        out.trim_start_matches("FDSize:")
            .trim()
            .parse()
            .expect("a table size")
    }

    /// A child's table is copied from its parent thread's at `clone`, sized to the highest
    /// descriptor open there, and keeps that size through `exec`: so its size tells which
    /// table it was copied from (and what that copy cost).
    #[tokio::test]
    async fn a_child_is_copied_from_a_spawners_few_descriptors_not_the_services_many() {
        let held: Vec<OwnedFd> = (0..400)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").expect("opened")))
            .collect();
        let highest = held.iter().map(AsRawFd::as_raw_fd).max().unwrap_or(0);
        assert!(highest >= 400);
        let here = table_size_of(spawn_here).await;
        assert!(
            here > usize::try_from(highest).unwrap_or(0),
            "started on this thread, the child's table ({here}) is the service's size"
        );
        assert!(
            spawners::get().is_some(),
            "this kernel runs no spawner thread"
        );
        let spawned = table_size_of(spawn).await;
        assert!(
            spawned <= 64,
            "started by a spawner, the child's table has {spawned} slots, not a handful"
        );
        drop(held);
    }

    /// `turbosched bench` splits the service's CPU into what the spawner threads spend
    /// starting children and the rest: their clocks count the starts (each costs its
    /// spawner tens of µs; 5 µs is far below any start measured).
    #[tokio::test]
    async fn the_spawner_threads_clocks_count_the_children_they_start() {
        assert!(
            spawners::get().is_some(),
            "this kernel runs no spawner thread"
        );
        let before = spawner_cpu().expect("spawners started");
        let children = spawn_all((0..20).map(|_| launch("/bin/true", &[])).collect());
        for child in children {
            let status = child.expect("started").wait().await.expect("kept");
            assert!(status.success());
        }
        let spent = spawner_cpu().expect("spawners started") - before;
        assert!(
            spent >= std::time::Duration::from_micros(20 * 5),
            "20 starts cost the spawners {spent:?}"
        );
    }

    /// Starts `sh -c script`, drops the child unwaited, and awaits its reaping by the
    /// runtime: its /proc entry (a zombie's too) goes.
    async fn dropped_unwaited_is_reaped(script: &str) {
        let child = spawn(launch("/bin/sh", &["-c", script])).expect("started");
        let pid = child.pid;
        drop(child);
        let entry = PathBuf::from(format!("/proc/{pid}"));
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while entry.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "{script:?} never reaped"
            );
            tokio::time::sleep(std::time::Duration::from_millis(5)).await;
        }
    }

    #[tokio::test]
    async fn a_running_child_dropped_never_waited_for_is_reaped_when_it_exits() {
        dropped_unwaited_is_reaped("sleep 0.2").await;
    }

    #[tokio::test]
    async fn a_child_dropped_unwaited_is_reaped_when_it_exits() {
        dropped_unwaited_is_reaped("exit 0").await;
    }
}
