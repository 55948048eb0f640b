//! `turbosched serve` under systemd (`Type=notify`, deploy/turbosched.service): the real
//! binary with `NOTIFY_SOCKET` naming a datagram socket this test reads.

use std::os::unix::net::UnixDatagram;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use turbosched::model::TaskName;

use crate::support::{signal, Sandbox};

/// Kills the service if the test fails before it stops it.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The next datagram, or `None` once `deadline` has passed.
fn next_message(socket: &UnixDatagram, deadline: Instant) -> Option<String> {
    let left = deadline.checked_duration_since(Instant::now())?;
    socket
        .set_read_timeout(Some(left.max(Duration::from_millis(1))))
        .unwrap();
    let mut buffer = [0u8; 4096];
    let n = socket.recv(&mut buffer).ok()?;
    Some(String::from_utf8_lossy(&buffer[..n]).into_owned())
}

/// Reads datagrams until one has the line `line`; returns it and every one before it.
fn wait_for_line(
    socket: &UnixDatagram,
    line: &str,
    within: Duration,
    stderr: &std::path::Path,
) -> (String, Vec<String>) {
    let deadline = Instant::now() + within;
    let mut before = Vec::new();
    while let Some(message) = next_message(socket, deadline) {
        if message.lines().any(|l| l == line) {
            return (message, before);
        }
        before.push(message);
    }
    panic!(
        "no {line} within {within:?}; got {before:?}\nservice log:\n{}",
        std::fs::read_to_string(stderr).unwrap_or_default()
    );
}

#[test]
fn serve_tells_systemd_ready_after_arming_then_pings_the_watchdog_and_stops_on_sigterm() {
    let sandbox = Sandbox::new("[tasks.nightly]\nhandler = \"ping\"\nschedule = \"0 3 * * *\"\n");
    let socket_path = sandbox.path().join("notify.sock");
    let socket = UnixDatagram::bind(&socket_path).unwrap();
    let stderr = sandbox.path().join("serve.log");
    let child = sandbox
        .command(&["serve"])
        .env("NOTIFY_SOCKET", &socket_path)
        .env("WATCHDOG_USEC", "2000000")
        .env("TURBOSCHED_LOG", "debug")
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&stderr).unwrap())
        .spawn()
        .unwrap();
    let mut service = Running(child);
    let pid = service.0.id();

    // READY=1 comes once the schedule is armed: at that instant the instance is
    // registered, the start event written and the task's next fire stored.
    let (ready, before) = wait_for_line(&socket, "READY=1", Duration::from_secs(30), &stderr);
    assert!(
        before.iter().all(|m| !m.contains("WATCHDOG=1")),
        "a watchdog ping before READY=1: {before:?}"
    );
    assert!(ready.contains("STATUS=scheduling 1 task(s)"), "{ready:?}");
    assert!(ready.contains(&format!("MAINPID={pid}")), "{ready:?}");
    let store = sandbox.store();
    let live = store
        .live_instances(Duration::from_secs(30), chrono::Utc::now())
        .unwrap();
    assert!(
        live.iter().any(|i| i.pid == i64::from(pid) && i.serving),
        "READY=1 before the instance was registered: {live:?}"
    );
    let state = store.task_state(&TaskName("nightly".into())).unwrap();
    assert!(
        state.next_fire_at.is_some(),
        "READY=1 before the schedule was armed: {state:?}"
    );
    let events = store.events_after(0, 100).unwrap();
    assert!(
        events.iter().any(|e| e.kind == "scheduler_started"),
        "READY=1 before the start was recorded"
    );

    // WATCHDOG_USEC=2s: the loop pings every second.
    let started = Instant::now();
    let mut pings = 0;
    let deadline = started + Duration::from_secs(6);
    while pings < 3 {
        let Some(message) = next_message(&socket, deadline) else {
            break;
        };
        if message.lines().any(|l| l == "WATCHDOG=1") {
            pings += 1;
        }
    }
    assert!(
        pings >= 3,
        "{pings} watchdog ping(s) in {:?}, expected one a second",
        started.elapsed()
    );
    assert!(
        started.elapsed() < Duration::from_millis(3_900),
        "three pings took {:?}, expected about 2s to 3s",
        started.elapsed()
    );

    signal(pid, nix::sys::signal::Signal::SIGTERM);
    let (stopping, _) = wait_for_line(&socket, "STOPPING=1", Duration::from_secs(10), &stderr);
    assert!(stopping.contains("STATUS=stopping"), "{stopping:?}");
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = service.0.try_wait().unwrap() {
            break status;
        }
        assert!(Instant::now() < deadline, "no exit after SIGTERM");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "exit after SIGTERM: {status}");
    assert!(
        !std::fs::read_to_string(&stderr)
            .unwrap_or_default()
            .contains("cannot notify systemd"),
        "a notification failed"
    );
}

#[test]
fn serve_refuses_a_watchdog_timeout_it_cannot_read() {
    let sandbox = Sandbox::new("[tasks.nightly]\nhandler = \"ping\"\nschedule = \"0 3 * * *\"\n");
    let output = sandbox
        .command(&["serve"])
        .env("NOTIFY_SOCKET", sandbox.path().join("notify.sock"))
        .env("WATCHDOG_USEC", "soon")
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(
        stderr.contains("WATCHDOG_USEC: expected a whole number of microseconds, found \"soon\""),
        "{stderr}"
    );
}
