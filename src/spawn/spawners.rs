//! Spawner threads: children started from threads whose descriptor table holds a handful
//! of descriptors, not the service's thousand.
//!
//! Why: a child gets a copy of its parent thread's descriptor table at `clone` (the
//! parent pays for each open descriptor) and closes every close-on-exec one at `exec`
//! (the child pays again). During a burst the service holds two pipe ends per running
//! child, ~1,000 descriptors, and every spawn copied and closed them all: 60–90 µs of CPU
//! per child (a C probe on this kernel: 688–699 → 613–641 µs per `/bin/true` started and
//! reaped beside 1,000 descriptors, from a thread with its own table).
//!
//! How: each spawner thread `unshare(CLONE_FILES)`s, closes its copy of everything from 3
//! up, and opens a pidfd of its own process. For each launch it copies the write ends of
//! the child's pipes (made by the caller, in the service's table) into its own table with
//! `pidfd_getfd`, which the kernel allows within one thread group without any ptrace
//! permission, then `posix_spawn`s, closes its copies and answers. The caller waits for
//! the answer, as it waited for its own `posix_spawn` before: it holds the write ends
//! open meanwhile, and closes them in its own table (the service's) once answered. A
//! batch of launches (a wake's starts) is queued at once and answered together: the
//! spawners take its launches back to back and the caller sleeps once for all of them.
//!
//! Invariants:
//! - A spawner thread never closes a descriptor of the service's table (a number there
//!   means something else in its own), and touches none after its answer.
//! - A spawner thread never wakes a task of the runtime and never handles a signal: a
//!   wake may write to the runtime's event descriptor by number, and a signal handler to
//!   its signal pipe, which in the spawner's table are closed or another file (SIGTERM was
//!   lost so). So it blocks every signal, and its queue and its answers wake threads
//!   through condition variables (a futex), never through a descriptor.
//! - Where any of this is refused (`pidfd_getfd` needs Linux 5.6; a seccomp filter may
//!   forbid `unshare`), no spawner runs and every child starts on its caller's thread.

use std::collections::VecDeque;
use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::{Arc, Condvar, Mutex, MutexGuard, OnceLock, PoisonError};

use super::{dev_null, Prepared};
use nix::unistd::Pid;

/// Spawner threads: as many as a batch keeps busy on a few cores while its caller
/// waits.
const SPAWNERS: usize = 4;

/// Enough for `posix_spawn`, which gives the child a stack of its own.
const STACK: usize = 256 * 1024;

/// A child's descriptors, in the service's table, open until the caller has its answer:
/// stdout's and stderr's write ends, and an extra descriptor with its number in the child.
#[derive(Clone, Copy)]
pub(super) struct Ends {
    pub stdout: RawFd,
    pub stderr: RawFd,
    pub extra: Option<(RawFd, RawFd)>,
}

struct Job {
    prepared: Prepared,
    ends: Ends,
    answers: Arc<Answers>,
    /// This launch's place among its batch's answers.
    slot: usize,
}

impl Drop for Job {
    fn drop(&mut self) {
        // Never answered (the spawner ended mid-launch): the caller must not wait for ever.
        self.answers.give_once(
            self.slot,
            Err(io::Error::other("a spawner thread dropped the launch")),
        );
    }
}

/// The answers to a batch of launches: each given by a spawner, all waited for at once
/// by their caller, who sleeps once for the batch rather than once for each.
struct Answers {
    given: Mutex<Given>,
    all_given: Condvar,
    /// Each launch's program, to name those a caller has waited for too long.
    programs: Vec<std::ffi::CString>,
}

/// How long a caller waits for a batch before it says which programs have not started,
/// and again each time as long: `posix_spawn` returns only once the child has `exec`'d,
/// and an `exec` whose program is on a file system that does not answer (a hung network
/// mount) does not return, so neither does the spawner, nor the engine's wake that waits
/// for it. Said, not cured: the engine's loop waits on.
const STALL_REPORT: std::time::Duration = std::time::Duration::from_secs(5);

struct Given {
    results: Vec<Option<io::Result<Started>>>,
    /// Answers not given yet.
    left: usize,
}

/// A child started: its pid, the monotonic clock just before its start, and the wall
/// clock's time just after.
pub(super) type Started = (Pid, std::time::Instant, std::time::SystemTime);

impl Answers {
    fn new(programs: Vec<std::ffi::CString>) -> Answers {
        let launches = programs.len();
        Answers {
            given: Mutex::new(Given {
                results: (0..launches).map(|_| None).collect(),
                left: launches,
            }),
            all_given: Condvar::new(),
            programs,
        }
    }

    /// Gives `result` to `slot` unless an answer was given there already.
    fn give_once(&self, slot: usize, result: io::Result<Started>) {
        let mut given = lock(&self.given);
        let Some(place) = given.results.get_mut(slot) else {
            return;
        };
        if place.is_none() {
            *place = Some(result);
            given.left -= 1;
            if given.left == 0 {
                self.all_given.notify_one();
            }
        }
    }

    /// Every answer, in the order of the launches, once all are given; says in the
    /// service log which programs have not started each [`STALL_REPORT`] it waits.
    fn wait(&self) -> Vec<io::Result<Started>> {
        self.wait_saying(STALL_REPORT, |stalled| tracing::warn!("{stalled}"))
    }

    /// [`Answers::wait`], telling `say` each `every` it has waited.
    fn wait_saying(
        &self,
        every: std::time::Duration,
        mut say: impl FnMut(String),
    ) -> Vec<io::Result<Started>> {
        let began = std::time::Instant::now();
        let mut given = lock(&self.given);
        while given.left > 0 {
            let (now, waited) = self
                .all_given
                .wait_timeout(given, every)
                .unwrap_or_else(PoisonError::into_inner);
            given = now;
            if waited.timed_out() && given.left > 0 {
                let waiting: Vec<String> = given
                    .results
                    .iter()
                    .zip(&self.programs)
                    .filter(|(result, _)| result.is_none())
                    .map(|(_, program)| program.to_string_lossy().into_owned())
                    .collect();
                say(format!(
                    "{} of {} children not started after {} s: posix_spawn has not returned for {} (an exec whose program's file system does not answer?); the scheduler's loop waits for them",
                    given.left,
                    given.results.len(),
                    began.elapsed().as_secs(),
                    waiting.join(", ")
                ));
            }
        }
        // Taken whole: a job dropped after this (a spawner drops each job after its
        // answer) then finds no slot to give to.
        std::mem::take(&mut given.results)
            .into_iter()
            .map(|result| {
                result.unwrap_or_else(|| Err(io::Error::other("a launch was never answered")))
            })
            .collect()
    }
}

/// The launches waiting for a spawner. Waits park at once on a condition variable (a
/// futex, never a descriptor). Not `crossbeam-channel`: its receive spins and then yields
/// before it parks, and in a burst the idle spawners and the waiting callers spent 16 % of
/// the service's threads' CPU in `sched_yield` (perf, 1,000 runs a second).
#[derive(Default)]
struct Queue {
    state: Mutex<Queued>,
    ready: Condvar,
}

#[derive(Default)]
struct Queued {
    jobs: VecDeque<Job>,
    /// No job will come, or no spawner is left to take one.
    closed: bool,
    /// Spawner threads serving this queue.
    serving: usize,
}

impl Queue {
    /// Queues a batch of launches and returns their answers to wait for; gives the
    /// launches back when no spawner is left to take them.
    fn push(&self, launches: Vec<(Prepared, Ends)>) -> Result<Arc<Answers>, Vec<Prepared>> {
        let mut state = lock(&self.state);
        if state.closed {
            return Err(launches.into_iter().map(|(prepared, _)| prepared).collect());
        }
        let count = launches.len();
        let answers = Arc::new(Answers::new(
            launches
                .iter()
                .map(|(prepared, _)| prepared.program.clone())
                .collect(),
        ));
        state.jobs.extend(
            launches
                .into_iter()
                .enumerate()
                .map(|(slot, (prepared, ends))| Job {
                    prepared,
                    ends,
                    answers: answers.clone(),
                    slot,
                }),
        );
        drop(state);
        if count == 1 {
            self.ready.notify_one();
        } else {
            self.ready.notify_all();
        }
        Ok(answers)
    }

    /// The next job; `None` once the queue is closed.
    fn pop(&self) -> Option<Job> {
        let mut state = lock(&self.state);
        loop {
            if let Some(job) = state.jobs.pop_front() {
                return Some(job);
            }
            if state.closed {
                return None;
            }
            state = self
                .ready
                .wait(state)
                .unwrap_or_else(PoisonError::into_inner);
        }
    }

    fn close(&self) {
        lock(&self.state).closed = true;
        self.ready.notify_all();
    }

    /// A spawner begins to serve, until the [`Serving`] is dropped.
    fn serving(&self) -> Serving<'_> {
        lock(&self.state).serving += 1;
        Serving(self)
    }
}

/// A spawner serving its queue. Dropped when the thread ends, by a panic too: the last
/// one closes the queue and answers the launches still in it with an error, so no caller
/// waits for ever, and later launches start on their callers' threads.
struct Serving<'a>(&'a Queue);

impl Drop for Serving<'_> {
    fn drop(&mut self) {
        let mut state = lock(&self.0.state);
        state.serving -= 1;
        if state.serving == 0 {
            state.closed = true;
            // Each job answers its caller as it drops (`Job`'s `Drop`), after the lock.
            let stranded = std::mem::take(&mut state.jobs);
            drop(state);
            drop(stranded);
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The running spawner threads.
pub(super) struct Spawners {
    queue: Arc<Queue>,
    /// Each thread's CPU-time clock: what starting the children has cost ([`Spawners::cpu`]).
    clocks: Vec<libc::clockid_t>,
}

static RUNNING: OnceLock<Option<Spawners>> = OnceLock::new();

/// The spawner threads, started at the first launch that asks for them; `None` where they
/// cannot run (said once in the service log).
pub(super) fn get() -> Option<&'static Spawners> {
    RUNNING
        .get_or_init(|| match Spawners::begin() {
            Ok(spawners) => Some(spawners),
            Err(err) => {
                tracing::info!(
                    "children start on the runtime's threads (no spawner thread of its own descriptor table: {err})"
                );
                None
            }
        })
        .as_ref()
}

/// The spawner threads if they have been started, without starting them.
pub(super) fn started() -> Option<&'static Spawners> {
    RUNNING.get()?.as_ref()
}

impl Spawners {
    fn begin() -> io::Result<Spawners> {
        let service_dev_null = dev_null()?;
        let queue = Arc::new(Queue::default());
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let started = (0..SPAWNERS).try_for_each(|index| {
            let (queue, ready) = (queue.clone(), ready_tx.clone());
            std::thread::Builder::new()
                .name(format!("spawner-{index}"))
                .stack_size(STACK)
                .spawn(move || {
                    let _serving = queue.serving();
                    match Table::own(service_dev_null) {
                        Ok(table) => {
                            let _ = ready.send(Ok(own_cpu_clock()));
                            drop(ready);
                            table.serve(&queue);
                        }
                        Err(err) => {
                            let _ = ready.send(Err(err));
                        }
                    }
                })
                .map(drop)
        });
        drop(ready_tx);
        // Every thread answers before it serves: either all serve, or none ever gets a
        // job and each ends when the queue closes.
        let ready = started.and_then(|()| ready_rx.iter().collect::<io::Result<Vec<_>>>());
        match ready {
            Ok(clocks) => Ok(Spawners {
                queue,
                clocks: clocks.into_iter().flatten().collect(),
            }),
            Err(err) => {
                queue.close();
                Err(err)
            }
        }
    }

    /// The CPU time (user + system) the spawner threads have spent so far: the part of
    /// the service's CPU that starts the children, which a bare `posix_spawn` pays too.
    pub(super) fn cpu(&self) -> std::time::Duration {
        self.clocks
            .iter()
            .filter_map(|clock| {
                // SAFETY: `clock_gettime` writes only into the zeroed struct it is given.
                let mut spent: libc::timespec = unsafe { std::mem::zeroed() };
                (unsafe { libc::clock_gettime(*clock, &mut spent) } == 0).then(|| {
                    std::time::Duration::new(
                        u64::try_from(spent.tv_sec).unwrap_or_default(),
                        u32::try_from(spent.tv_nsec).unwrap_or_default(),
                    )
                })
            })
            .sum()
    }

    /// Starts each of `launches` (each `prepared` with its `ends`) from the spawner
    /// threads, blocking until every one has started or failed; the `ends` must stay open
    /// until this returns. Answers in the order of `launches`. Gives the launches back when
    /// no spawner is left (each ended by a panic): the caller starts them itself.
    pub(super) fn start(
        &self,
        launches: Vec<(Prepared, Ends)>,
    ) -> Result<Vec<io::Result<Started>>, Vec<Prepared>> {
        Ok(self.queue.push(launches)?.wait())
    }
}

/// The calling thread's CPU-time clock, which any thread of the process can read.
fn own_cpu_clock() -> Option<libc::clockid_t> {
    let mut clock: libc::clockid_t = 0;
    // SAFETY: `pthread_getcpuclockid` of the calling thread writes only into `clock`.
    (unsafe { libc::pthread_getcpuclockid(libc::pthread_self(), &mut clock) } == 0).then_some(clock)
}

/// A spawner thread's own descriptor table: its pidfd of the process and its `/dev/null`.
struct Table {
    process: OwnedFd,
    dev_null: OwnedFd,
}

impl Table {
    /// Gives the calling thread a table of its own, closes its copy of the service's
    /// descriptors from 3 up, and fetches `/dev/null` from the service's table at
    /// `service_dev_null`, which proves that `pidfd_getfd` works here.
    fn own(service_dev_null: RawFd) -> io::Result<Table> {
        // First: a signal handled here would write to the runtime's signal descriptor by
        // its number, in this table closed or another file (a child's pipe), and be lost.
        // The children get an empty mask of their own (`POSIX_SPAWN_SETSIGMASK`).
        nix::sys::signal::pthread_sigmask(
            nix::sys::signal::SigmaskHow::SIG_BLOCK,
            Some(&nix::sys::signal::SigSet::all()),
            None,
        )?;
        // SAFETY: `unshare` only changes the calling thread's descriptor table, which from
        // here on nothing but this thread uses.
        if unsafe { libc::unshare(libc::CLONE_FILES) } != 0 {
            return Err(io::Error::last_os_error());
        }
        close_from(3)?;
        // SAFETY: `pidfd_open(2)` takes a pid and flags and returns a new descriptor.
        let process = unsafe { libc::syscall(libc::SYS_pidfd_open, libc::getpid(), 0) };
        let process = owned(process)?;
        let dev_null = fetch(&process, service_dev_null)?;
        Ok(Table { process, dev_null })
    }

    fn serve(&self, queue: &Queue) {
        while let Some(job) = queue.pop() {
            let began = std::time::Instant::now();
            let started = self.launch(&job.prepared, &job.ends);
            let started = started.map(|pid| (pid, began, std::time::SystemTime::now()));
            job.answers.give_once(job.slot, started);
        }
    }

    fn launch(&self, prepared: &Prepared, ends: &Ends) -> io::Result<Pid> {
        let stdout = fetch(&self.process, ends.stdout)?;
        let stderr = fetch(&self.process, ends.stderr)?;
        let extra = match ends.extra {
            Some((fd, at)) => Some((fetch(&self.process, fd)?, at)),
            None => None,
        };
        // The copies close here, in this thread's table: the child holds its own.
        prepared.start(
            self.dev_null.as_raw_fd(),
            stdout.as_raw_fd(),
            stderr.as_raw_fd(),
            extra.as_ref().map(|(fd, at)| (fd.as_raw_fd(), *at)),
        )
    }
}

/// A copy, in the calling thread's table, of the descriptor `fd` of the process's main
/// table (its thread-group leader's, which every thread but the spawners shares).
fn fetch(process: &OwnedFd, fd: RawFd) -> io::Result<OwnedFd> {
    // SAFETY: `pidfd_getfd(2)` takes a pidfd, a descriptor number and flags, and returns a
    // new close-on-exec descriptor in the caller's table; nothing else is touched.
    owned(unsafe { libc::syscall(libc::SYS_pidfd_getfd, process.as_raw_fd(), fd, 0) })
}

/// A system call's new descriptor, or its error.
fn owned(returned: libc::c_long) -> io::Result<OwnedFd> {
    if returned < 0 {
        return Err(io::Error::last_os_error());
    }
    let fd = RawFd::try_from(returned).map_err(io::Error::other)?;
    // SAFETY: a fresh descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Closes the calling thread's descriptors from `first` up: `close_range` (Linux 5.9),
/// else one by one as `/proc/thread-self/fd` lists them.
fn close_from(first: RawFd) -> io::Result<()> {
    // SAFETY: closes descriptors of this thread's own table, which nothing else uses.
    if unsafe { libc::syscall(libc::SYS_close_range, first, libc::c_uint::MAX, 0) } == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() != Some(libc::ENOSYS) {
        return Err(err);
    }
    let open: Vec<RawFd> = std::fs::read_dir("/proc/thread-self/fd")?
        .filter_map(|entry| entry.ok()?.file_name().to_str()?.parse().ok())
        .filter(|fd| *fd >= first)
        .collect();
    for fd in open {
        // SAFETY: as above; the listing's own descriptor is already closed (EBADF).
        unsafe { libc::close(fd) };
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_spawner_thread_holds_only_its_own_few_descriptors() {
        let service: Vec<OwnedFd> = (0..50)
            .map(|_| OwnedFd::from(std::fs::File::open("/dev/null").expect("opened")))
            .collect();
        let counted = std::thread::spawn(|| {
            let _table = Table::own(dev_null().expect("dev null")).expect("own table");
            std::fs::read_dir("/proc/thread-self/fd")
                .expect("listed")
                .count()
        })
        .join()
        .expect("joined");
        // 0–2, the pidfd, /dev/null, and the listing's own descriptor.
        assert!(counted <= 6, "the spawner's table holds {counted}");
        drop(service);
    }

    /// A signal sent to the service may be handled on any thread that does not block it,
    /// and the runtime's handler writes to its own descriptor by number: on a spawner that
    /// number is closed or another file (a child's pipe), and SIGTERM was lost (a service
    /// that never stopped, found by `it::scheduling`). So spawners block every signal.
    #[test]
    fn every_spawner_thread_blocks_every_signal() {
        assert!(get().is_some(), "this kernel runs no spawner");
        // Every spawner alive: one that ended (a panic) is missing here.
        let masks: Vec<(String, String)> = std::fs::read_dir("/proc/self/task")
            .expect("threads listed")
            .filter_map(|task| {
                let task = task.ok()?.path();
                let name = std::fs::read_to_string(task.join("comm")).ok()?;
                if !name.starts_with("spawner-") {
                    return None;
                }
                let status = std::fs::read_to_string(task.join("status")).ok()?;
                let blocked = status
                    .lines()
                    .find_map(|line| line.strip_prefix("SigBlk:"))?
                    .trim()
                    .to_string();
                Some((name.trim().to_string(), blocked))
            })
            .collect();
        assert_eq!(masks.len(), SPAWNERS, "{masks:?}");
        for (name, blocked) in masks {
            let blocked = u64::from_str_radix(&blocked, 16).expect("a hex mask");
            for signal in [libc::SIGTERM, libc::SIGINT, libc::SIGHUP, libc::SIGCHLD] {
                assert_ne!(
                    blocked & (1 << (signal - 1)),
                    0,
                    "{name} does not block signal {signal}"
                );
            }
        }
    }

    fn prepared_true() -> Prepared {
        Prepared::of(&super::super::Launch {
            program: "/bin/true".into(),
            args: Vec::new(),
            env: Vec::new(),
            cwd: None,
            extra_fd: None,
            arg0: None,
            die_with_parent: false,
        })
        .expect("prepared")
    }

    const NO_ENDS: Ends = Ends {
        stdout: -1,
        stderr: -1,
        extra: None,
    };

    /// The last spawner gone (a panic): the launch still queued is answered with an
    /// error, and later launches are given back for their callers to start.
    #[test]
    fn a_queue_whose_last_spawner_ended_answers_what_waits_and_takes_no_more() {
        let queue = Queue::default();
        let serving = queue.serving();
        let waiting = queue
            .push(vec![(prepared_true(), NO_ENDS)])
            .ok()
            .expect("queued");
        let (told, answered) = std::sync::mpsc::channel();
        std::thread::spawn(move || told.send(waiting.wait()));
        drop(serving);
        let answered = answered
            .recv_timeout(std::time::Duration::from_secs(10))
            .expect("the stranded launch's caller still waits");
        assert!(
            answered.iter().all(Result::is_err),
            "the stranded launch was answered as started"
        );
        assert!(
            queue.push(vec![(prepared_true(), NO_ENDS)]).is_err(),
            "a launch was queued with no spawner left"
        );
    }

    /// A batch of one launch (`/bin/true`, no descriptors): its answers and its job.
    fn lone_job() -> (Arc<Answers>, Job) {
        let answers = Arc::new(Answers::new(vec![c"/bin/true".to_owned()]));
        let job = Job {
            prepared: prepared_true(),
            ends: NO_ENDS,
            answers: answers.clone(),
            slot: 0,
        };
        (answers, job)
    }

    #[test]
    fn a_launch_dropped_unanswered_answers_its_caller_with_an_error() {
        let (answers, job) = lone_job();
        let caller = std::thread::spawn(move || answers.wait());
        drop(job);
        let answered = caller.join().expect("joined");
        assert!(
            matches!(answered.as_slice(), [Err(err)] if err.to_string().contains("dropped the launch")),
            "the caller was not told"
        );
    }

    /// A spawner drops its job after answering it, by which time its caller may have
    /// taken every answer: that drop must find nothing to answer. (It counted one answer
    /// too many: an overflow that ended the spawner thread in a debug build.)
    #[test]
    fn a_job_dropped_after_its_caller_took_the_answers_gives_nothing() {
        let (answers, job) = lone_job();
        answers.give_once(
            0,
            Ok((
                Pid::from_raw(1),
                std::time::Instant::now(),
                std::time::SystemTime::now(),
            )),
        );
        let taken = answers.wait();
        assert!(matches!(taken.as_slice(), [Ok(_)]));
        drop(job);
        assert_eq!(lock(&answers.given).left, 0);
    }

    /// A caller that has waited long for a batch says which programs have not started
    /// (an `exec` that does not return holds its spawner, and the engine with it), then
    /// goes on waiting, and takes the late answer.
    #[test]
    fn a_batch_waited_for_too_long_names_the_programs_not_started_and_takes_them_late() {
        let answers = Arc::new(Answers::new(vec![
            c"/bin/true".to_owned(),
            c"/mnt/hung/report".to_owned(),
        ]));
        let started = || {
            Ok((
                Pid::from_raw(1),
                std::time::Instant::now(),
                std::time::SystemTime::now(),
            ))
        };
        answers.give_once(0, started());
        let (said, heard) = std::sync::mpsc::channel();
        let late = {
            let answers = answers.clone();
            // The late launch answers only once the caller has said it waits for it.
            std::thread::spawn(move || {
                let stalled: String = heard.recv().expect("the caller said nothing");
                answers.give_once(1, started());
                stalled
            })
        };
        let taken = answers.wait_saying(std::time::Duration::from_millis(20), |stalled| {
            let _ = said.send(stalled);
        });
        let stalled = late.join().expect("joined");
        assert!(
            stalled.starts_with("1 of 2 children not started")
                && stalled.contains("/mnt/hung/report")
                && !stalled.contains("/bin/true"),
            "{stalled}"
        );
        assert!(matches!(taken.as_slice(), [Ok(_), Ok(_)]), "{taken:?}");
    }

    /// POSIX record locks (SQLite's) belong to the table that took them: a spawner
    /// closing its copies of the service's descriptors releases none of them.
    #[test]
    fn a_spawner_closing_its_copies_releases_none_of_the_services_locks() {
        use std::ffi::CString;
        use std::os::unix::ffi::OsStrExt;
        let dir = tempfile::tempdir().expect("temporary folder");
        let path = dir.path().join("locked");
        let file = std::fs::File::create(&path).expect("created");
        // SAFETY: a zeroed `flock` is a valid value of the C struct.
        let mut lock: libc::flock = unsafe { std::mem::zeroed() };
        lock.l_type = libc::F_WRLCK as libc::c_short;
        lock.l_whence = libc::SEEK_SET as libc::c_short;
        // SAFETY: F_SETLK on our own open file with a valid `flock`.
        assert_eq!(
            unsafe { libc::fcntl(file.as_raw_fd(), libc::F_SETLK, &lock) },
            0
        );
        std::thread::spawn(|| Table::own(dev_null().expect("dev null")).map(drop))
            .join()
            .expect("joined")
            .expect("own table");
        // Another process asks who holds the lock (only async-signal-safe calls after fork).
        let c_path = CString::new(path.as_os_str().as_bytes()).expect("no NUL");
        // SAFETY: the child calls only open, fcntl and _exit before it ends.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: as above.
            unsafe {
                let fd = libc::open(c_path.as_ptr(), libc::O_RDWR);
                let mut asked: libc::flock = std::mem::zeroed();
                asked.l_type = libc::F_WRLCK as libc::c_short;
                asked.l_whence = libc::SEEK_SET as libc::c_short;
                let held = fd >= 0
                    && libc::fcntl(fd, libc::F_GETLK, &mut asked) == 0
                    && asked.l_type != libc::F_UNLCK as libc::c_short;
                libc::_exit(if held { 0 } else { 1 });
            }
        }
        let mut status = 0;
        // SAFETY: waiting for the child just forked.
        assert_eq!(unsafe { libc::waitpid(pid, &mut status, 0) }, pid);
        assert!(
            libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0,
            "the service's lock was released by the spawner's close"
        );
        drop(file);
    }
}
