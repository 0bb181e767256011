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
#![allow(unsafe_code)] // pre_exec and a per-thread setresuid; each block carries its SAFETY argument.

use std::io;
use std::os::fd::{OwnedFd, RawFd};
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};

use nix::errno::Errno;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{getpid, getppid, Pid, Uid};
use tokio::net::unix::pipe;

use crate::identity::Identity;

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
/// descriptor is closed at exec. The caller must register the pid with the reaper before it
/// next awaits anything.
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
        .env(
            "PATH",
            std::env::var("PATH").unwrap_or_else(|_| DEFAULT_PATH.to_owned()),
        )
        .env(
            "LANG",
            std::env::var("LANG").unwrap_or_else(|_| "C.UTF-8".to_owned()),
        )
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
/// — stopped, double-forked, in a namespace of its own — and whatever its runner said.
///
/// `kill(-1, SIGKILL)` reaches every process the caller may signal: as `uid`, exactly the
/// processes of `uid`. A process forking at that moment cannot slip through: the kernel signals
/// under the task-list lock, and a fork whose parent has a fatal signal pending fails. The
/// call is made from a short-lived thread whose own credentials (and only its own: the raw
/// system call, unlike libc's `setresuid`, does not change the other threads) are switched to
/// `uid` for good; the thread then ends. Killed processes that were ours become zombies the
/// reaper collects.
///
/// Only for a dedicated identity: it must never be root or the supervisor's own uid.
pub fn kill_all_as(uid: Uid) -> io::Result<()> {
    if uid.is_root() || uid == nix::unistd::geteuid() {
        return Err(io::Error::other(format!(
            "refusing to kill every process of uid {uid}: it is ours"
        )));
    }
    let raw = uid.as_raw();
    std::thread::Builder::new()
        .name("kill-as".to_owned())
        .spawn(move || {
            // SAFETY: a plain system call with integer arguments; it changes the credentials of
            // this thread only, which ends right after and shares no state that depends on them.
            let switched =
                unsafe { nix::libc::syscall(nix::libc::SYS_setresuid, raw, raw, raw) } == 0;
            if !switched {
                return Err(io::Error::last_os_error());
            }
            match kill(Pid::from_raw(-1), Signal::SIGKILL) {
                // ESRCH: not a single other process on the system.
                Ok(()) | Err(Errno::ESRCH) => Ok(()),
                Err(e) => Err(io::Error::from(e)),
            }
        })?
        .join()
        .map_err(|_| io::Error::other("the kill thread panicked"))?
}
