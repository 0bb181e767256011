//! Running one step (SPEC §4.2–4.3): `/bin/sh -c`, its own process group, a clean environment,
//! stdin from `/dev/null`, stdout and stderr both onto the step's log file.
//!
//! The log file *is* the step's stdout and stderr — one open file description in append mode,
//! shared by both — so output lands in `results/step_N.log` the moment it is written, in
//! arrival order, with no copy through the runner: nothing to buffer, nothing lost when one
//! stream closes before the other, and the runner's memory does not depend on how much a step
//! prints.
//!
//! Ending a step: when the shell exits, everything else the step started is killed (SIGKILL)
//! and reaped — its process group, plus anything that left the group with `setsid`, which the
//! runner finds as its own children because it is a child subreaper. On a timeout or a stop
//! request the group gets SIGTERM first and SIGKILL after the kill grace.

use std::collections::BTreeMap;
use std::fs::File;
use std::io;
use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nats_fs::reap;
use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::{Child, Command};
use tokio::time::{sleep, sleep_until, Instant};

use crate::control::{Stop, StopWatch};

/// How long to keep killing leftovers that refuse to die (stuck in the kernel) before giving up.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(5);

/// What ended a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The shell exited on its own.
    Exited,
    /// The step's or the job's deadline passed.
    TimedOut,
    /// A stop request arrived.
    Stopped(Stop),
}

/// A finished step.
#[derive(Debug)]
pub(crate) struct Finished {
    pub(crate) ending: Ending,
    pub(crate) status: ExitStatus,
    /// Leftover processes killed at the end of the step.
    pub(crate) leftovers: usize,
    /// Leftovers that could not be reaped in time.
    pub(crate) stuck: usize,
}

impl Finished {
    /// The shell's exit code, or 128+n when a signal ended it.
    pub(crate) fn exit_code(&self) -> i32 {
        self.status
            .code()
            .unwrap_or_else(|| 128 + self.status.signal().unwrap_or(0))
    }

    /// The name of the signal that ended the shell, if one did.
    pub(crate) fn signal_name(&self) -> Option<String> {
        self.status.signal().map(reap::signal_name)
    }
}

/// One step, ready to start.
#[derive(Debug)]
pub(crate) struct StepCommand<'a> {
    pub(crate) run: &'a str,
    pub(crate) cwd: &'a Path,
    pub(crate) env: &'a BTreeMap<String, String>,
    pub(crate) log: File,
    pub(crate) deadline: Option<Instant>,
    pub(crate) grace: Duration,
}

/// Starts the step's shell; `Err` means it could not be started at all.
pub(crate) fn spawn(step: StepCommand<'_>) -> io::Result<Running> {
    let err = step.log.try_clone()?;
    let child = Command::new("/bin/sh")
        .arg("-c")
        .arg(step.run)
        .current_dir(step.cwd)
        .env_clear()
        .envs(step.env)
        .stdin(Stdio::null())
        .stdout(step.log)
        .stderr(err)
        // A group of its own: signals for the step reach all of it and nothing else, and a
        // terminal's Ctrl-C aimed at the runner does not reach it directly.
        .process_group(0)
        .spawn()?;
    let pid = child
        .id()
        .and_then(|id| i32::try_from(id).ok())
        .ok_or_else(|| io::Error::other("the step's shell has no pid"))?;
    Ok(Running {
        child,
        group: Pid::from_raw(pid),
        deadline: step.deadline,
        grace: step.grace,
    })
}

/// A started step.
#[derive(Debug)]
pub(crate) struct Running {
    child: Child,
    group: Pid,
    deadline: Option<Instant>,
    grace: Duration,
}

impl Running {
    /// The shell's pid (also the step's process group id).
    pub(crate) fn pid(&self) -> u32 {
        self.group.as_raw().unsigned_abs()
    }

    /// Waits for the step to end, enforcing its deadline and stop requests, then kills and
    /// reaps everything the step left behind.
    pub(crate) async fn wait(mut self, stop: &mut StopWatch) -> io::Result<Finished> {
        let ending = tokio::select! {
            status = self.child.wait() => {
                return Ok(self.sweep(Ending::Exited, status?));
            }
            () = until(self.deadline) => Ending::TimedOut,
            stop = stop.requested() => Ending::Stopped(stop),
        };
        let now = matches!(ending, Ending::Stopped(s) if s.now);
        let status = self.terminate(now, stop).await?;
        Ok(self.sweep(ending, status))
    }

    /// SIGTERM to the group, then SIGKILL after the grace period, or at once when `now` (or
    /// when an immediate stop arrives during the grace period).
    async fn terminate(&mut self, now: bool, stop: &mut StopWatch) -> io::Result<ExitStatus> {
        if !now {
            let _ = killpg(self.group, Signal::SIGTERM);
            tokio::select! {
                status = self.child.wait() => return status,
                () = sleep(self.grace) => {}
                _ = stop.requested_now() => {}
            }
        }
        let _ = killpg(self.group, Signal::SIGKILL);
        self.child.wait().await
    }

    /// Kills and reaps whatever the step left running. The shell has been reaped by tokio at
    /// this point, so every remaining child of the runner is a leftover of this step.
    fn sweep(&self, ending: Ending, status: ExitStatus) -> Finished {
        // Whatever of the step outlived its shell descends from it and was re-parented to us
        // (we are a subreaper), or still has such a parent: no child means nothing is left.
        if !reap::has_children() {
            return Finished {
                ending,
                status,
                leftovers: 0,
                stuck: 0,
            };
        }
        // Counted before the kill, and only when the shell ended by itself: after a timeout
        // or a stop request the group was killed on purpose.
        let leftovers = if ending == Ending::Exited {
            reap::count_live(Some(self.group))
        } else {
            0
        };
        let swept = reap::kill_children(|_| false, Some(self.group), SWEEP_TIMEOUT);
        Finished {
            ending,
            status,
            leftovers,
            stuck: swept.left,
        }
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
