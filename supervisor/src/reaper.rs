//! Reaping every child of the supervisor: runners, and whatever a dead runner's steps left
//! behind.
//!
//! The supervisor is a child subreaper, so a step orphaned by its runner (a runner that
//! crashed, or that the supervisor killed) becomes the supervisor's child, and dies as a zombie
//! that no one else will ever wait for. So one `waitpid(-1)` loop, run on every SIGCHLD (and
//! every few seconds, in case one was coalesced away), collects every child that has ended;
//! the exit status of a child started through [`Reaper::spawn`] goes to whoever waits for it,
//! anything else is forgotten. This is why runners are not tokio children: tokio
//! waits for its own pids and would find them gone.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use nix::errno::Errno;
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::Pid;
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;
use tracing::debug;

/// How a child ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Exit {
    /// It exited with this code.
    Code(i32),
    /// A signal killed it.
    Signal(i32),
}

impl Exit {
    /// In words, for messages: `exited with code 3`, `was killed by SIGKILL`.
    pub fn describe(self) -> String {
        match self {
            Self::Code(code) => format!("exited with code {code}"),
            Self::Signal(signal) => format!("was killed by {}", nats_fs::reap::signal_name(signal)),
        }
    }
}

/// The supervisor's children and who waits for which.
#[derive(Debug, Default)]
pub struct Reaper {
    waiting: Mutex<HashMap<i32, oneshot::Sender<Exit>>>,
}

impl Reaper {
    /// Starts reaping on the current runtime. Call once, before the first child is started.
    pub fn start() -> std::io::Result<Arc<Self>> {
        let mut children = signal(SignalKind::child())?;
        let reaper = Arc::new(Self::default());
        let task = reaper.clone();
        tokio::spawn(async move {
            let mut safety_net = tokio::time::interval(Duration::from_secs(5));
            loop {
                tokio::select! {
                    _ = children.recv() => {}
                    _ = safety_net.tick() => {}
                }
                task.reap();
            }
        });
        Ok(reaper)
    }

    /// Starts a child with `start` (which returns its pid and whatever else the caller needs)
    /// and registers it; its exit status arrives on the receiver. The reaper cannot collect the
    /// child before it is registered: starting and registering hold the lock that reaping
    /// takes, so this works from any thread.
    pub fn spawn<T>(
        &self,
        start: impl FnOnce() -> std::io::Result<(Pid, T)>,
    ) -> std::io::Result<(T, oneshot::Receiver<Exit>)> {
        let mut waiting = self.lock();
        let (pid, started) = start()?;
        let (tx, rx) = oneshot::channel();
        waiting.insert(pid.as_raw(), tx);
        Ok((started, rx))
    }

    /// Whether `pid` is a watched child not yet reaped: its pid cannot have been reused, so it
    /// is safe to signal.
    pub fn is_watched(&self, pid: Pid) -> bool {
        self.lock().contains_key(&pid.as_raw())
    }

    /// Collects every child that has ended.
    pub fn reap(&self) {
        // Held throughout, so that a child being started is registered before it is reaped.
        let mut waiting = self.lock();
        loop {
            let (pid, exit) = match waitpid(None::<Pid>, Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::Exited(pid, code)) => (pid, Exit::Code(code)),
                Ok(WaitStatus::Signaled(pid, signal, _)) => (pid, Exit::Signal(signal as i32)),
                // Nothing more has ended, or there is no child at all.
                Ok(WaitStatus::StillAlive) | Err(Errno::ECHILD) => return,
                Ok(_) | Err(Errno::EINTR) => continue,
                Err(e) => {
                    debug!("waiting for children: {e}");
                    return;
                }
            };
            if let Some(waiter) = waiting.remove(&pid.as_raw()) {
                let _ = waiter.send(exit);
            } else {
                debug!(pid = pid.as_raw(), "reaped an orphaned process");
            }
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<i32, oneshot::Sender<Exit>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
