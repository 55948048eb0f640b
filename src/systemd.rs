//! `turbosched serve` under systemd (`Type=notify`): the `sd_notify` datagrams, written
//! here with std's `UnixDatagram` (a datagram of `KEY=value` lines to the socket
//! `NOTIFY_SOCKET` names; a crate would add nothing but a dependency).
//!
//! - `READY=1` when the engine has started up (the schedule is armed),
//! - `WATCHDOG=1` from the engine's loop at half of `WATCHDOG_USEC`, so a hung loop stops
//!   pinging and systemd restarts the service (`WatchdogSec=` in the unit),
//! - `STOPPING=1` when shutdown begins, and `STATUS=` lines for `systemctl status`.
//!
//! Without `NOTIFY_SOCKET` nothing is sent. A datagram that cannot be sent is a warning in
//! the log, never a reason to stop scheduling.

use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use anyhow::{anyhow, Context, Result};
use turbosched::engine::ServiceManager;

/// The notification socket of the service manager that started this process.
pub(crate) struct Systemd {
    socket: UnixDatagram,
    address: SocketAddr,
    /// `WATCHDOG_USEC` when it is meant for this process.
    watchdog: Option<Duration>,
}

impl Systemd {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID`, and removes them from the
    /// environment so the tasks' processes do not inherit them (systemd ignores their
    /// datagrams under `NotifyAccess=main`, but a task that is itself a notify client
    /// would be confused). `None` when not started by a service manager.
    ///
    /// Must be called before any other thread exists: it changes the environment.
    pub(crate) fn from_env() -> Result<Option<Systemd>> {
        let socket = std::env::var_os("NOTIFY_SOCKET");
        let watchdog_usec = std::env::var("WATCHDOG_USEC").ok();
        let watchdog_pid = std::env::var("WATCHDOG_PID").ok();
        for name in ["NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID"] {
            std::env::remove_var(name);
        }
        let Some(socket) = socket.filter(|s| !s.is_empty()) else {
            return Ok(None);
        };
        let address = notify_address(&socket)?;
        let watchdog = match watchdog_usec {
            None => None,
            Some(usec) => {
                let for_us = watchdog_pid
                    .as_deref()
                    .is_none_or(|pid| pid.trim() == std::process::id().to_string());
                let usec: u64 = usec.trim().parse().map_err(|_| {
                    anyhow!(
                        "WATCHDOG_USEC: expected a whole number of microseconds, found {usec:?}"
                    )
                })?;
                (for_us && usec > 0).then(|| Duration::from_micros(usec))
            }
        };
        let socket = UnixDatagram::unbound().context("NOTIFY_SOCKET: cannot create a socket")?;
        Ok(Some(Systemd {
            socket,
            address,
            watchdog,
        }))
    }

    /// Sends one datagram; a failure is logged.
    fn send(&self, message: &str) {
        if let Err(err) = self.socket.send_to_addr(message.as_bytes(), &self.address) {
            tracing::warn!("cannot notify systemd ({message:?}): {err}");
        }
    }
}

/// `NOTIFY_SOCKET`: a path, or `@name` for a socket in the abstract namespace.
fn notify_address(socket: &std::ffi::OsStr) -> Result<SocketAddr> {
    use std::os::unix::ffi::OsStrExt;
    let bytes = socket.as_bytes();
    match bytes.strip_prefix(b"@") {
        Some(name) => {
            use std::os::linux::net::SocketAddrExt;
            SocketAddr::from_abstract_name(name)
        }
        None => SocketAddr::from_pathname(std::path::Path::new(socket)),
    }
    .with_context(|| {
        format!(
            "NOTIFY_SOCKET: expected a socket path or @name, found {:?}",
            socket.to_string_lossy()
        )
    })
}

impl ServiceManager for Systemd {
    fn ready(&self, tasks: usize) {
        self.send(&format!(
            "READY=1\nSTATUS=scheduling {tasks} task(s)\nMAINPID={}",
            std::process::id()
        ));
    }

    fn keepalive_every(&self) -> Option<Duration> {
        self.watchdog.map(|timeout| timeout / 2)
    }

    fn alive(&self) {
        self.send("WATCHDOG=1");
    }

    fn stopping(&self) {
        self.send("STOPPING=1\nSTATUS=stopping: letting running attempts finish");
    }
}
