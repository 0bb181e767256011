//! Running one step (contract §4.2–4.3): `/bin/sh -c`, its own process group, a clean environment,
//! stdin from `/dev/null`, stdout and stderr both onto one pipe that the log's copier reads
//! ([`crate::logs`]), the job's rlimits and identity ([`crate::child`]).
//!
//! One pipe for both streams keeps the output in arrival order, and nothing is lost when one
//! stream closes before the other. The runner's memory does not depend on how much a step
//! prints: the copier passes it on through one buffer.
//!
//! While the step runs, and only when a limit needs it, a poll looks at how much the log has
//! grown — for `idleTimeout` (the log stopped growing) — and, every [`SCAN`], at the job's
//! processes (one `/proc` scan), for `limits.processes` and for accounting. A step with none of
//! these is not polled at all. The copier says at once when the step has printed past what is
//! left of `limits.output`.
//!
//! Ending a step: when the shell exits, everything else the step started is killed (SIGKILL)
//! and reaped — its process group, plus anything that left the group with `setsid`, which the
//! runner finds as its own children because it is a child subreaper. On a timeout, an idle
//! timeout or a stop request the group gets SIGTERM first and SIGKILL after the kill grace; on
//! a passed output quota or a limit the supervisor reports, SIGKILL at once.
//!
//! The shell is reaped with our own `wait4` (driven by SIGCHLD), not tokio's: `wait4` also
//! returns what the shell and the processes it waited for used ([`usage`](crate::usage)).

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io;
use std::os::unix::process::{CommandExt, ExitStatusExt};
use std::path::Path;
use std::process::{Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::Duration;

use nats_fs::manifest::Resources;
use nats_fs::reap;
use nix::sys::signal::{killpg, Signal as Sig};
use nix::unistd::{getpid, Pid};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::time::{interval_at, sleep, sleep_until, Instant, Interval, MissedTickBehavior};

use nats_fs::protocol::StepIdentity;

use crate::child::{self, StepRlimits};
use crate::control::{Stop, StopWatch};
use crate::logs::Progress;
use crate::usage::{self, Usage};

/// How long to keep killing leftovers that refuse to die (stuck in the kernel) before giving up.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How often the log is looked at for an idle timeout.
const POLL_IDLE: Duration = Duration::from_millis(100);
/// How often the job's processes are counted (a `/proc` scan, a few milliseconds on a busy
/// host), for `limits.processes` and accounting. The count that matters most for the limit is
/// taken anyway when a step ends with processes left; a step shorter than this is not scanned.
const SCAN: Duration = Duration::from_millis(500);

/// What ended a step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum Ending {
    /// The shell exited on its own.
    Exited,
    /// The step's or the job's deadline passed.
    TimedOut,
    /// The log did not grow for the idle timeout.
    Idle,
    /// The step printed past what was left of the job's output quota.
    OutputExceeded,
    /// The drive refused a write of the step's log: its output had nowhere to go.
    LogFailed,
    /// A stop request arrived.
    Stopped(Stop),
}

/// What the poll watches while the step runs.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Watched {
    /// End the step when its log does not grow for this long.
    pub(crate) idle: Option<Duration>,
    /// Count the job's processes every [`SCAN`] (`limits.processes`).
    pub(crate) processes: bool,
}

impl Watched {
    fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    fn interval(&self) -> Duration {
        if self.idle.is_some() {
            POLL_IDLE
        } else {
            SCAN
        }
    }
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
    /// What the step used.
    pub(crate) resources: Resources,
    /// The most processes of the job seen at once, counted as `RLIMIT_NPROC` counts them: every
    /// thread, the runner's included. Counted at each scan of a watched step (every [`SCAN`])
    /// and, when [`Watched::processes`] asks for it, once more at the end; 0 for a step that
    /// was never scanned. A lower bound: the poll sees what lives at its moments, and the
    /// limit counts every process of the uid (standalone, the invoking user's others too).
    pub(crate) peak_processes: u64,
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

    /// The signal that ended the step: the one that killed the shell, or the one that killed
    /// the command the shell ran last (a shell exits with 128+n for it).
    pub(crate) fn killed_by(&self) -> Option<i32> {
        self.status
            .signal()
            .or_else(|| self.status.code().filter(|c| *c > 128).map(|c| c - 128))
    }
}

/// One step, ready to start.
#[derive(Debug)]
pub(crate) struct StepCommand<'a> {
    pub(crate) run: &'a str,
    pub(crate) cwd: &'a Path,
    pub(crate) env: &'a BTreeMap<String, String>,
    /// The write end of the log's pipe: the step's stdout and stderr.
    pub(crate) output: File,
    /// What the log's copier has done, for the watch.
    pub(crate) progress: Arc<Progress>,
    pub(crate) deadline: Option<Instant>,
    pub(crate) grace: Duration,
    pub(crate) rlimits: StepRlimits,
    pub(crate) identity: Option<&'a StepIdentity>,
    pub(crate) watched: Watched,
}

/// Starts the step's shell; `Err` means it could not be started at all.
pub(crate) fn spawn(step: StepCommand<'_>) -> io::Result<Running> {
    // Before the fork, so that the SIGCHLD of a shell that exits at once is not missed.
    let sigchld = signal(SignalKind::child())?;
    let err = step.output.try_clone()?;
    let before = Usage::children();
    let mut command = Command::new("/bin/sh");
    command
        .arg("-c")
        .arg(step.run)
        .current_dir(step.cwd)
        .env_clear()
        .envs(step.env)
        .stdin(Stdio::null())
        .stdout(step.output)
        .stderr(err)
        // A group of its own: signals for the step reach all of it and nothing else, and a
        // terminal's Ctrl-C aimed at the runner does not reach it directly.
        .process_group(0);
    child::prepare(&mut command, step.rlimits, step.identity);
    // std's Child neither waits nor kills when dropped: the shell is ours to reap. Dropping
    // the command closes the runner's copies of the pipe's write end: the pipe ends when the
    // step's last process does.
    let child = command.spawn()?;
    drop(command);
    let pid = i32::try_from(child.id())
        .map_err(|_| io::Error::other("the step's shell has an impossible pid"))?;
    Ok(Running {
        group: Pid::from_raw(pid),
        sigchld,
        deadline: step.deadline,
        grace: step.grace,
        watched: step.watched,
        progress: step.progress,
        runner_counted: step.identity.is_none(),
        before,
        seen: HashSet::from([pid]),
        peak_rss: 0,
        peak_processes: 0,
    })
}

/// A started step.
#[derive(Debug)]
pub(crate) struct Running {
    group: Pid,
    sigchld: Signal,
    deadline: Option<Instant>,
    grace: Duration,
    watched: Watched,
    /// What the log's copier has done.
    progress: Arc<Progress>,
    /// Whether the runner runs as the step's uid (no identity to give it), so that its threads
    /// count against the step's process limit too.
    runner_counted: bool,
    /// The runner's children's usage when the step started.
    before: Usage,
    /// Every process of the step seen so far, the shell included.
    seen: HashSet<i32>,
    peak_rss: u64,
    peak_processes: u64,
}

/// What woke the step's wait.
enum Event {
    Exited(io::Result<(ExitStatus, Usage)>),
    Deadline,
    Stop(Stop),
    Poll,
    LogStopped,
}

/// The poll's memory of the log.
struct LogState {
    size: u64,
    grew_at: Instant,
    scanned_at: Instant,
}

impl Running {
    /// The shell's pid (also the step's process group id).
    pub(crate) fn pid(&self) -> u32 {
        self.group.as_raw().unsigned_abs()
    }

    /// Waits for the step to end, enforcing its deadline, its watched limits and stop
    /// requests, then kills and reaps everything the step left behind.
    pub(crate) async fn wait(mut self, stop: &mut StopWatch) -> io::Result<Finished> {
        let started = Instant::now();
        let mut poll = (!self.watched.is_empty()).then(|| {
            // The first look one period in: a step that ends sooner costs nothing.
            let period = self.watched.interval();
            let mut poll = interval_at(started + period, period);
            poll.set_missed_tick_behavior(MissedTickBehavior::Delay);
            poll
        });
        let mut state = LogState {
            size: 0,
            grew_at: started,
            scanned_at: started,
        };
        let ending = loop {
            let event = tokio::select! {
                exited = exited(self.group, &mut self.sigchld) => Event::Exited(exited),
                () = until(self.deadline) => Event::Deadline,
                stop = stop.requested() => Event::Stop(stop),
                () = tick(poll.as_mut()) => Event::Poll,
                () = self.progress.stopped() => Event::LogStopped,
            };
            match event {
                Event::Exited(exited) => {
                    let (status, usage) = exited?;
                    return Ok(self.finish(Ending::Exited, status, usage));
                }
                Event::Deadline => break Ending::TimedOut,
                Event::Stop(stop) => break Ending::Stopped(stop),
                Event::LogStopped => {
                    // At once, without a grace period: what it prints now is dropped anyway.
                    let _ = killpg(self.group, Sig::SIGKILL);
                    break if self.progress.over_quota() {
                        Ending::OutputExceeded
                    } else {
                        Ending::LogFailed
                    };
                }
                Event::Poll => {
                    if let Some(ending) = self.look(&mut state) {
                        break ending;
                    }
                }
            }
        };
        let now = match &ending {
            Ending::OutputExceeded | Ending::LogFailed => true,
            Ending::Stopped(stop) => stop.kills_now(),
            _ => false,
        };
        let (status, usage) = self.terminate(now, stop).await?;
        Ok(self.finish(ending, status, usage))
    }

    /// One look at the log and, when due, the processes; the ending, if a limit was passed.
    fn look(&mut self, state: &mut LogState) -> Option<Ending> {
        let now = Instant::now();
        // Half a period of slack: the ticks come at fixed times, and a look that is a little
        // early must not put the scan off by a whole period.
        if now.duration_since(state.scanned_at) + self.watched.interval() / 2 >= SCAN {
            state.scanned_at = now;
            self.scan();
        }
        let size = self.progress.printed();
        if size != state.size {
            state.size = size;
            state.grew_at = now;
        } else if self
            .watched
            .idle
            .is_some_and(|idle| now.duration_since(state.grew_at) >= idle)
        {
            return Some(Ending::Idle);
        }
        None
    }

    /// Counts the job's live processes and remembers the step's.
    fn scan(&mut self) {
        let me = getpid();
        let members = reap::tree_members(me);
        self.count_threads(&members);
        for member in members.iter().filter(|m| m.pid != me.as_raw()) {
            self.seen.insert(member.pid);
            self.peak_rss = self.peak_rss.max(member.rss_bytes);
        }
    }

    /// Counts what `RLIMIT_NPROC` counts for the step's uid: every thread of the step's
    /// processes, and the runner's too when it runs as that uid (standalone).
    fn count_threads(&mut self, members: &[reap::Member]) {
        let me = getpid().as_raw();
        let threads = members
            .iter()
            .filter(|m| self.runner_counted || m.pid != me)
            .map(|m| m.threads)
            .sum();
        self.peak_processes = self.peak_processes.max(threads);
    }

    /// SIGTERM to the group, then SIGKILL after the grace period, or at once when `now` (or
    /// when an immediate stop arrives during the grace period).
    async fn terminate(
        &mut self,
        now: bool,
        stop: &mut StopWatch,
    ) -> io::Result<(ExitStatus, Usage)> {
        if !now {
            let _ = killpg(self.group, Sig::SIGTERM);
            tokio::select! {
                exited = exited(self.group, &mut self.sigchld) => return exited,
                () = sleep(self.grace) => {}
                _ = stop.requested_now() => {}
            }
        }
        let _ = killpg(self.group, Sig::SIGKILL);
        exited(self.group, &mut self.sigchld).await
    }

    /// Kills and reaps whatever the step left running, and adds up what the step used. The
    /// shell has been reaped at this point, so every remaining child of the runner is a
    /// leftover of this step.
    fn finish(mut self, ending: Ending, status: ExitStatus, shell: Usage) -> Finished {
        let (leftovers, stuck) = self.sweep(&ending);
        // After the sweep: the leftovers' CPU time counts once they are reaped.
        let spent = Usage::children().since(self.before);
        let resources = Resources {
            cpu_user_ms: spent.user_ms,
            cpu_system_ms: spent.system_ms,
            peak_rss_bytes: shell
                .max_rss_bytes
                .max(spent.max_rss_bytes)
                .max(self.peak_rss),
            processes: self.seen.len() as u64,
        };
        Finished {
            ending,
            status,
            leftovers,
            stuck,
            resources,
            peak_processes: self.peak_processes,
        }
    }

    /// Kills and reaps the leftovers: how many there were (only when the shell ended by itself:
    /// after a timeout or a stop request the group was killed on purpose) and how many would
    /// not die.
    fn sweep(&mut self, ending: &Ending) -> (usize, usize) {
        // Whatever of the step outlived its shell descends from it and was re-parented to us
        // (we are a subreaper), or still has such a parent: no child means nothing is left.
        if !reap::has_children() {
            return (0, 0);
        }
        if self.watched.processes {
            // What is left of a step that failed to fork is still there: the count that
            // tells whether the process limit was the cause.
            self.count_threads(&reap::tree_members(getpid()));
        }
        let live = reap::live_pids(Some(self.group));
        self.seen.extend(&live);
        let leftovers = if *ending == Ending::Exited {
            live.len()
        } else {
            0
        };
        let swept = reap::kill_children(|_| false, Some(self.group), SWEEP_TIMEOUT);
        (leftovers, swept.left)
    }
}

/// Waits for the shell to end and reaps it (and only it: see [`reap`]).
async fn exited(pid: Pid, sigchld: &mut Signal) -> io::Result<(ExitStatus, Usage)> {
    loop {
        if let Some(done) = usage::try_wait(pid)? {
            return Ok(done);
        }
        // Any child's end wakes this; the loop checks whether it was the shell's.
        if sigchld.recv().await.is_none() {
            return Err(io::Error::other("the SIGCHLD listener ended"));
        }
    }
}

async fn tick(poll: Option<&mut Interval>) {
    match poll {
        Some(poll) => {
            poll.tick().await;
        }
        None => std::future::pending().await,
    }
}

async fn until(deadline: Option<Instant>) {
    match deadline {
        Some(deadline) => sleep_until(deadline).await,
        None => std::future::pending().await,
    }
}
