//! Telling systemd how the supervisor is doing (`Type=notify`): `READY=1` once it can take
//! jobs, `STATUS=` with what it is doing, `STOPPING=1` when it drains, and `WATCHDOG=1` from the
//! pull loop while that loop answers, so that a wedged supervisor is restarted.
//!
//! The protocol is one datagram per message to the socket named by `NOTIFY_SOCKET` (a path, or
//! an abstract name when it starts with `@`); no library needed. Without `NOTIFY_SOCKET` (not
//! under systemd) every call does nothing. The variables are never passed on: runners get an
//! environment of their own, and `NotifyAccess=main` in the unit ignores anyone else anyway.

use std::io;
use std::os::unix::net::{SocketAddr, UnixDatagram};
use std::time::Duration;

use tracing::debug;

/// Where and how to notify systemd.
#[derive(Debug)]
pub struct Notifier {
    target: Option<(UnixDatagram, SocketAddr)>,
    /// Half the watchdog timeout systemd set for us (`WATCHDOG_USEC`), if any.
    watchdog_every: Option<Duration>,
}

impl Notifier {
    /// Reads `NOTIFY_SOCKET`, `WATCHDOG_USEC` and `WATCHDOG_PID` from the environment.
    pub fn from_env() -> Self {
        let target = std::env::var_os("NOTIFY_SOCKET").and_then(|path| {
            let path = path.to_string_lossy().into_owned();
            match connect(&path) {
                Ok(target) => Some(target),
                Err(e) => {
                    debug!("NOTIFY_SOCKET {path}: {e}");
                    None
                }
            }
        });
        // The watchdog is ours only if systemd set it for this very process.
        let for_us = std::env::var("WATCHDOG_PID")
            .ok()
            .is_none_or(|pid| pid.trim() == std::process::id().to_string());
        let watchdog_every = std::env::var("WATCHDOG_USEC")
            .ok()
            .and_then(|usec| usec.trim().parse::<u64>().ok())
            .filter(|usec| *usec > 0 && for_us && target.is_some())
            .map(|usec| Duration::from_micros(usec) / 2);
        Self {
            target,
            watchdog_every,
        }
    }

    /// A notifier that says nothing (tests, `--dry-run`).
    pub fn none() -> Self {
        Self {
            target: None,
            watchdog_every: None,
        }
    }

    /// How often to send `WATCHDOG=1`, if systemd watches us.
    pub fn watchdog_every(&self) -> Option<Duration> {
        self.watchdog_every
    }

    /// The consumer is bound and the first pull request is out.
    pub fn ready(&self) {
        self.send("READY=1");
    }

    /// One line of status, shown by `systemctl status`.
    pub fn status(&self, text: &str) {
        // A line break would end the field.
        let text: String = text.chars().filter(|c| !c.is_control()).collect();
        self.send(&format!("STATUS={text}"));
    }

    /// The drain has started.
    pub fn stopping(&self) {
        self.send("STOPPING=1");
    }

    /// The pull loop is alive.
    pub fn watchdog(&self) {
        self.send("WATCHDOG=1");
    }

    fn send(&self, message: &str) {
        if let Some((socket, addr)) = &self.target {
            if let Err(e) = socket.send_to_addr(message.as_bytes(), addr) {
                debug!("notifying systemd ({message}): {e}");
            }
        }
    }
}

fn connect(path: &str) -> io::Result<(UnixDatagram, SocketAddr)> {
    let addr = if let Some(name) = path.strip_prefix('@') {
        use std::os::linux::net::SocketAddrExt;
        SocketAddr::from_abstract_name(name.as_bytes())?
    } else {
        SocketAddr::from_pathname(path)?
    };
    Ok((UnixDatagram::unbound()?, addr))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sends_datagrams_to_the_socket() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notify");
        let listener = UnixDatagram::bind(&path).unwrap();
        let (socket, addr) = connect(path.to_str().unwrap()).unwrap();
        let notifier = Notifier {
            target: Some((socket, addr)),
            watchdog_every: None,
        };
        notifier.ready();
        notifier.status("running 1 of 2 jobs\nFAKE=1");
        let mut buf = [0u8; 128];
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"READY=1");
        let n = listener.recv(&mut buf).unwrap();
        assert_eq!(&buf[..n], b"STATUS=running 1 of 2 jobsFAKE=1");
        Notifier::none().ready();
    }
}
