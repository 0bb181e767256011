//! Crossing the privilege boundary: starting a runner, and killing every process of an
//! identity.
//!
//! A runner starts as the supervisor's own user (root, in production) with nothing of the
//! supervisor's: its environment is emptied and rebuilt from a short list, so NATS
//! credentials and anything else of the supervisor's never reach a job; its working folder is
//! `/`; its descriptors are exactly its three pipes (everything of the supervisor's is
//! close-on-exec, [`nats_fs::fds`]); it gets a process group of its own. Nothing else happens
//! between the fork and the exec, so std starts it the way `posix_spawn` does (a `vfork`: the
//! supervisor's memory is neither copied nor write-protected), with no code of ours in the
//! child. The runner then sets itself up (the supervisor's death signal, `no_new_privs`, its
//! OOM score) and gives each step the job's limits and identity just before the step's
//! `exec`: no process of a job ever shares the supervisor's memory, or runs as the runner.
//!
//! Runners are not tokio children: [`crate::reaper`] reaps every child of the supervisor,
//! runners and orphaned steps alike, with one `waitpid(-1)` loop, and [`Reaper::spawn`]
//! registers a runner's pid before it can be reaped.
#![allow(unsafe_code)] // kill_all_as forks; its block says why it is safe.

use std::collections::BTreeMap;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use nats_fs::limits::{Kind, Limits, RLIMITS};
use nix::sys::resource::getrlimit;
use nix::sys::signal::{kill, Signal};
use nix::unistd::{fork, ForkResult, Pid, Uid};
use tokio::net::unix::pipe;
use tokio::sync::oneshot::error::TryRecvError;

use crate::reaper::{Exit, Reaper};

/// What the supervisor sets its own `oom_score_adj` to, when it may (`CAP_SYS_RESOURCE`): the
/// kernel's OOM killer picks a job's processes (the runner sets 1000 for itself and its steps)
/// long before the daemon that reports them.
pub const SUPERVISOR_OOM_SCORE_ADJ: i32 = -900;

/// Lowers each rlimit ceiling that a runner could not give its steps to what it can: its
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

/// Starts `runner --pipe` with the environment `env` (see the module docs). Start it through
/// [`Reaper::spawn`], which registers it.
pub fn spawn_runner(runner: &Path, env: &BTreeMap<String, String>) -> io::Result<Spawned> {
    let mut command = Command::new(runner);
    command
        .arg("--pipe")
        .env_clear()
        .envs(env)
        .current_dir("/")
        // Its own process group: a Ctrl-C at the supervisor's terminal reaches only the
        // supervisor, which then decides what happens to the jobs.
        .process_group(0)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = command
        .spawn()
        .map_err(|e| io::Error::new(e.kind(), format!("executing it: {}", plain(&e))))?;
    let pid = Pid::from_raw(
        i32::try_from(child.id()).map_err(|_| io::Error::other("an impossible pid"))?,
    );
    let taken = || io::Error::other("a pipe of the runner is missing");
    let stdin = OwnedFd::from(child.stdin.take().ok_or_else(taken)?);
    let stdout = OwnedFd::from(child.stdout.take().ok_or_else(taken)?);
    let stderr = OwnedFd::from(child.stderr.take().ok_or_else(taken)?);
    // std's `Child` neither waits nor kills when dropped: the reaper collects the runner.
    drop(child);
    Ok(Spawned {
        pid,
        stdin: pipe::Sender::from_owned_fd(stdin)?,
        stdout: pipe::Receiver::from_owned_fd(stdout)?,
        stderr: pipe::Receiver::from_owned_fd(stderr)?,
    })
}

/// An I/O error as people read it: `No such file or directory`, without std's `(os error 2)`.
fn plain(e: &io::Error) -> String {
    match e.raw_os_error() {
        Some(errno) => nix::errno::Errno::from_raw(errno).desc().to_owned(),
        None => e.to_string(),
    }
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

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;

    use nix::sys::wait::{waitpid, WaitStatus};
    use tokio::io::AsyncReadExt as _;

    use super::*;

    fn env() -> BTreeMap<String, String> {
        nats_fs::step_env::base_env()
    }

    /// A "runner" that reports how it was started, then exits 7.
    fn reporter(dir: &Path) -> std::path::PathBuf {
        let path = dir.join("report");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(
            b"#!/bin/sh\n\
              while read -r line; do case $line in\n\
                SigBlk:*|Uid:*) echo \"$line\";;\n\
              esac; done < /proc/$$/status\n\
              echo \"args=$1 cwd=$(pwd) pgid=$(cut -d' ' -f5 /proc/$$/stat) pid=$$\"\n\
              env | sort\n\
              echo to-stderr >&2\n\
              echo fds:\n\
              exec sh -c 'ls /proc/self/fd; exit 7'\n",
        )
        .unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(0o755))
            .unwrap();
        path
    }

    #[tokio::test]
    async fn a_runner_starts_from_slash_with_its_pipes_and_nothing_else() {
        let dir = tempfile::tempdir().unwrap();
        // What the test process inherited (from cargo, a shell), as the supervisor's `main`
        // does first thing; and a descriptor of its own: close-on-exec, as everything Rust
        // opens.
        nats_fs::fds::close_on_exec_inherited();
        let _held = std::fs::File::open("/dev/null").unwrap();
        let mut spawned = spawn_runner(&reporter(dir.path()), &env()).unwrap();
        drop(spawned.stdin);
        let (mut out, mut err) = (String::new(), String::new());
        spawned.stdout.read_to_string(&mut out).await.unwrap();
        spawned.stderr.read_to_string(&mut err).await.unwrap();
        assert_eq!(
            waitpid(spawned.pid, None).unwrap(),
            WaitStatus::Exited(spawned.pid, 7)
        );
        assert_eq!(err, "to-stderr\n");
        let pid = spawned.pid.as_raw();
        assert!(
            out.contains(&format!("args=--pipe cwd=/ pgid={pid} pid={pid}\n")),
            "{out}"
        );
        assert!(out.contains("SigBlk:\t0000000000000000\n"), "{out}");
        let names: Vec<&str> = out
            .lines()
            .filter(|l| l.contains('=') && !l.contains(' '))
            .map(|l| l.split('=').next().unwrap())
            .filter(|name| !["PWD", "SHLVL", "_"].contains(name))
            .collect();
        assert_eq!(names, ["LANG", "PATH"], "{out}");
        // What ls inherits: stdio, and its handle on the folder it lists.
        let fds = out.split_once("fds:\n").unwrap().1;
        let listed: Vec<i32> = fds.lines().map(|n| n.parse().unwrap()).collect();
        assert_eq!(listed.len(), 4, "{fds}");
        assert!(listed.starts_with(&[0, 1, 2]), "{fds}");
    }

    #[tokio::test]
    async fn a_runner_that_cannot_be_executed_is_an_error_saying_why() {
        let dir = tempfile::tempdir().unwrap();
        let not_executable = dir.path().join("runner");
        std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
        for (path, why, says) in [
            (
                not_executable.as_path(),
                io::ErrorKind::PermissionDenied,
                "executing it: Permission denied",
            ),
            (
                Path::new("/nonexistent/runner"),
                io::ErrorKind::NotFound,
                "executing it: No such file or directory",
            ),
        ] {
            let e = spawn_runner(path, &env()).expect_err("it cannot start");
            assert_eq!(e.kind(), why, "{e}");
            assert_eq!(e.to_string(), says);
        }
    }
}
