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
//! Runners are plain `std` children, not tokio's: [`crate::reaper`] reaps every child of the
//! supervisor, runners and orphaned steps alike, with one `waitpid(-1)` loop.
#![allow(unsafe_code)] // pre_exec and fork; each block carries its SAFETY argument.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use std::time::{Duration, Instant};

use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, getpid, getppid, ForkResult, Pid, Uid};
use tokio::net::unix::pipe;
use tokio::sync::oneshot::error::TryRecvError;

use crate::identity::Identity;
use crate::reaper::{Exit, Reaper};

/// `PATH` for runners and steps when the supervisor has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";

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
) -> io::Result<Spawned> {
    let mut command = Command::new(runner);
    command
        .arg("--pipe")
        .env_clear()
        .envs(crate::base_env())
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
    // calls are allowed. It calls nothing but setgroups, setgid, setuid, prctl, getppid,
    // close_range and fcntl — direct system calls — on values computed before the fork
    // (`groups` is only read), and turns errors into io::Error with from_raw_os_error, which
    // does not allocate.
    unsafe {
        command.pre_exec(move || {
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
