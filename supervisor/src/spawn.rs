//! Crossing the privilege boundary: starting a runner as a slot's identity, and killing every
//! process of an identity.
//!
//! When the supervisor runs as root, each runner starts as its slot's identity with that
//! identity's groups (looked up at start: NSS is not async-signal-safe), `PR_SET_NO_NEW_PRIVS`
//! (no setuid binary can give the job privileges back) and `PR_SET_PDEATHSIG` (the runner is
//! told to stop if the supervisor dies, even by SIGKILL). Its environment is emptied and
//! rebuilt from a short list, so NATS credentials and anything else of the supervisor's never
//! reach a job; its descriptors are exactly its three pipes plus the job folder and `results/`
//! that the supervisor opened for it.
//!
//! Containment starts here too: each runner is given the operator's ceilings as hard rlimits
//! (`--max-processes`, `--max-open-files`, `--max-file-size`, `--max-cpu-time`; no core dumps)
//! and an `oom_score_adj` of 1000, both while it is still root, so neither the runner nor its
//! steps can take them back ([`RunnerLimits`]).
//!
//! Runners are plain `std` children, not tokio's: [`crate::reaper`] reaps every child of the
//! supervisor, runners and orphaned steps alike, with one `waitpid(-1)` loop.
#![allow(unsafe_code)] // pre_exec and fork; each block carries its SAFETY argument.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use nats_fs::limits::{Kind, Limits, RLIMITS};
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, getpid, getppid, ForkResult, Pid, Uid};
use tokio::net::unix::pipe;
use tokio::sync::oneshot::error::TryRecvError;

use crate::identity::Identity;
use crate::reaper::{Exit, Reaper};

/// What every runner's `oom_score_adj` is set to, as the bytes written to
/// `/proc/self/oom_score_adj` (1000): the kernel's OOM killer picks the largest job's
/// processes first, and never the supervisor (see [`lower_own_oom_score`]).
const RUNNER_OOM_SCORE_ADJ_TEXT: &[u8] = b"1000";
/// What the supervisor sets its own `oom_score_adj` to, when it may (`CAP_SYS_RESOURCE`).
pub const SUPERVISOR_OOM_SCORE_ADJ: i32 = -900;

/// The hard rlimits a runner starts with: the operator's ceilings, as values computed before
/// the fork (the child may only make plain system calls).
///
/// Soft and hard are both set to the ceiling, before the privilege drop: once the runner runs
/// as the job's identity it cannot raise them again, and neither can its steps; the runner
/// lowers the soft limits of the steps to the job's own values. `RLIMIT_CORE` is always 0: a
/// crashing step must not fill the disk with cores (or hand its memory to whoever reads them).
///
/// `RLIMIT_NPROC` counts every process of the real uid, not a process tree. With one identity
/// per slot (a `--run-as` list or range) that is exactly one job's processes; with one identity
/// shared by every slot (such as the default `nobody`) it counts the processes of all the jobs
/// running as it (and of anything else of that user) together.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunnerLimits {
    set: [(Option<Resource>, u64); 4],
}

impl RunnerLimits {
    /// The rlimits for `ceilings` (already clamped by [`clamp_to_hard_limits`]).
    #[must_use]
    pub fn new(ceilings: &Limits) -> Self {
        let mut set = [(None, 0); 4];
        for (slot, (kind, resource)) in set.iter_mut().zip(RLIMITS) {
            if let Some(value) = ceilings.get(kind) {
                *slot = (Some(resource), value);
            }
        }
        Self { set }
    }

    /// Applies them to the calling process. Async-signal-safe: `setrlimit` only.
    fn apply(&self) -> nix::Result<()> {
        for (resource, value) in self.set {
            if let Some(resource) = resource {
                setrlimit(resource, value, value)?;
            }
        }
        setrlimit(Resource::RLIMIT_CORE, 0, 0)
    }
}

/// Lowers each rlimit ceiling that this process could not give a runner to what it can: its
/// own hard limit when it may not raise it (no `CAP_SYS_RESOURCE`: not root, or root under a
/// systemd unit that keeps few capabilities), and the kernel's `nr_open` for open files. Returns
/// the ceilings that are used, and a warning for each one lowered.
#[must_use]
pub fn clamp_to_hard_limits(mut ceilings: Limits) -> (Limits, Vec<String>) {
    let may_raise = has_cap_sys_resource();
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mut warnings = Vec::new();
    for (kind, resource) in RLIMITS {
        let Some(wanted) = ceilings.get(kind) else {
            continue;
        };
        let mut most = u64::MAX;
        if !may_raise {
            if let Ok((_, hard)) = getrlimit(resource) {
                most = most.min(hard);
            }
        }
        if kind == Kind::OpenFiles {
            most = most.min(nr_open.unwrap_or(u64::MAX));
        }
        if wanted > most {
            warnings.push(format!(
                "{} {} is more than this process may give its runners ({}); jobs run with {}",
                crate::config::ceiling_option(kind),
                kind.show(wanted),
                if may_raise {
                    "the kernel's nr_open"
                } else {
                    "its own hard limit, without CAP_SYS_RESOURCE"
                },
                kind.show(most)
            ));
            ceilings.set(kind, Some(most));
        }
    }
    (ceilings, warnings)
}

/// Whether this process may raise hard rlimits and lower `oom_score_adj`: `CAP_SYS_RESOURCE`
/// (bit 24) in its effective set.
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Makes the supervisor the last process the kernel's OOM killer picks
/// ([`SUPERVISOR_OOM_SCORE_ADJ`]), so that memory pressure ends a job, never the daemon that
/// reports it. Needs `CAP_SYS_RESOURCE`; without it the score stays as it is (said at debug
/// level: an unprivileged supervisor is a supported set-up).
pub fn lower_own_oom_score() {
    match std::fs::write(
        "/proc/self/oom_score_adj",
        SUPERVISOR_OOM_SCORE_ADJ.to_string(),
    ) {
        Ok(()) => tracing::debug!(
            oom_score_adj = SUPERVISOR_OOM_SCORE_ADJ,
            "lowered this process's OOM score"
        ),
        Err(e) => tracing::debug!(
            "keeping this process's OOM score: setting oom_score_adj to {SUPERVISOR_OOM_SCORE_ADJ}: {e}"
        ),
    }
}

/// A started runner: its pid (not yet reaped: see [`crate::reaper`]) and its pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

/// Starts `runner --pipe` as `identity` (when `switch`), with stdin, stdout and stderr piped
/// and the descriptors `keep` left open across exec, at the same numbers; every other
/// descriptor is closed at exec. Start it through [`Reaper::spawn`], which registers it.
pub fn spawn_runner(
    runner: &Path,
    identity: &Identity,
    switch: bool,
    keep: [RawFd; 2],
    limits: RunnerLimits,
) -> io::Result<Spawned> {
    let mut command = Command::new(runner);
    command
        .arg("--pipe")
        .env_clear()
        .envs(nats_fs::step_env::base_env())
        .current_dir("/")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        // Its own process group: a Ctrl-C at the supervisor's terminal reaches only the
        // supervisor, which then decides what happens to the jobs.
        .process_group(0);

    let (uid, gid, groups) = (identity.uid, identity.gid, identity.groups.clone());
    let parent = getpid();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It calls nothing but setrlimit, open, write, close, setgroups,
    // setgid, setuid, prctl, getppid, close_range and fcntl — direct system calls — on values
    // computed before the fork (`groups` and `limits` are only read; the path is a static C
    // string), and turns errors into io::Error with from_raw_os_error, which does not allocate.
    unsafe {
        command.pre_exec(move || {
            // While still root: a process may lower its hard limits but not raise them.
            limits.apply()?;
            // Also while still root (`CAP_SYS_RESOURCE`): the kernel then records 1000 as the
            // lowest score this process and its children may set, so neither the runner nor a
            // step can make itself less likely to be picked by the OOM killer. Best effort: a
            // system without /proc/self/oom_score_adj still runs jobs.
            let fd = nix::libc::open(
                c"/proc/self/oom_score_adj".as_ptr(),
                nix::libc::O_WRONLY | nix::libc::O_CLOEXEC,
            );
            if fd >= 0 {
                nix::libc::write(
                    fd,
                    RUNNER_OOM_SCORE_ADJ_TEXT.as_ptr().cast(),
                    RUNNER_OOM_SCORE_ADJ_TEXT.len(),
                );
                nix::libc::close(fd);
            }
            if switch {
                // Order matters: groups and gid while we still may, uid last.
                nix::unistd::setgroups(&groups)?;
                nix::unistd::setgid(gid)?;
                nix::unistd::setuid(uid)?;
            }
            nix::sys::prctl::set_no_new_privs()?;
            // After setuid, which clears it. The runner treats SIGTERM as "stop now".
            nix::sys::prctl::set_pdeathsig(Signal::SIGTERM)?;
            // The supervisor may have died between fork and prctl; then nobody would tell us.
            if getppid() != parent {
                return Err(io::Error::from_raw_os_error(nix::libc::ESRCH));
            }
            // Nothing but stdio and `keep` may cross the exec, whatever the supervisor holds.
            // (Marked, not closed: std reports a failed exec through a close-on-exec pipe.)
            if nix::libc::close_range(
                3,
                nix::libc::c_uint::MAX,
                nix::libc::CLOSE_RANGE_CLOEXEC.cast_signed(),
            ) != 0
            {
                return Err(io::Error::last_os_error());
            }
            for fd in keep {
                if nix::libc::fcntl(fd, nix::libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
    let mut child = command.spawn()?;
    let pid = i32::try_from(child.id()).map_err(|_| io::Error::other("a pid out of range"))?;
    let pipes = (child.stdin.take(), child.stdout.take(), child.stderr.take());
    let (Some(stdin), Some(stdout), Some(stderr)) = pipes else {
        return Err(io::Error::other("the runner's pipes are missing"));
    };
    // The std handle is dropped without waiting: the reaper collects the exit status.
    drop(child);
    Ok(Spawned {
        pid: Pid::from_raw(pid),
        stdin: pipe::Sender::from_owned_fd(OwnedFd::from(stdin))?,
        stdout: pipe::Receiver::from_owned_fd(OwnedFd::from(stdout))?,
        stderr: pipe::Receiver::from_owned_fd(OwnedFd::from(stderr))?,
    })
}

/// Sends SIGKILL to every process whose uid is `uid`: what a job left behind, wherever it is
/// — stopped, double-forked, in a namespace of its own — when its runner could not see to it
/// (it died, or was stopped and killed).
///
/// `kill(-1, SIGKILL)` reaches every process the caller may signal: from a process whose uid
/// is `uid`, exactly the processes of `uid`. A process forking at that moment cannot slip
/// through: the kernel signals under the task-list lock, and a fork whose parent has a fatal
/// signal pending fails. The call is made by a short-lived child of the supervisor that
/// switches to `uid` for good: a separate process, because anything running as `uid` may be
/// signalled by the job's own processes (a thread of the supervisor could be stopped, taking
/// the supervisor with it). If that child does not report within a second (a job's process
/// stopped it first), it is killed and `Err` returned; the caller then kills by `/proc`.
///
/// Only for a dedicated identity: it must never be root or the supervisor's own uid.
pub fn kill_all_as(uid: Uid, reaper: &Reaper) -> io::Result<()> {
    if uid.is_root() || uid == nix::unistd::geteuid() {
        return Err(io::Error::other(format!(
            "refusing to kill every process of uid {uid}: it is ours"
        )));
    }
    let raw = uid.as_raw();
    let (child, mut exited) = reaper.spawn(|| {
        // SAFETY: the child runs nothing but three raw system calls and _exit (async-signal-
        // safe, touching no memory of the parent's but the integer `raw`), and never returns.
        match unsafe { fork() }? {
            ForkResult::Child => unsafe {
                if nix::libc::syscall(nix::libc::SYS_setresuid, raw, raw, raw) != 0 {
                    nix::libc::_exit(2);
                }
                nix::libc::kill(-1, nix::libc::SIGKILL);
                nix::libc::_exit(0)
            },
            ForkResult::Parent { child } => Ok((child, child)),
        }
    })?;
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match exited.try_recv() {
            Ok(Exit::Code(0)) => return Ok(()),
            Ok(other) => {
                return Err(io::Error::other(format!(
                    "the process killing them {}",
                    other.describe()
                )))
            }
            Err(TryRecvError::Closed) => return Err(io::Error::other("the reaper is gone")),
            Err(TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(TryRecvError::Empty) => {
                if reaper.is_watched(child) {
                    let _ = kill(child, Signal::SIGKILL);
                }
                return Err(io::Error::other(
                    "the process killing them did not finish (stopped by one of them?)",
                ));
            }
        }
    }
}
