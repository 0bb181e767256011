//! Starting a runner: the one place where the supervisor crosses a privilege boundary.
//!
//! When the supervisor runs as root, each runner is started as the `--run-as` user with that
//! user's supplementary groups (looked up before the fork: NSS is not async-signal-safe),
//! `PR_SET_NO_NEW_PRIVS` (no setuid binary can give the job its privileges back) and
//! `PR_SET_PDEATHSIG` (the runner is told to stop if the supervisor dies, even by SIGKILL).
//! Its environment is emptied and rebuilt from a short list, so NATS credentials and anything
//! else of the supervisor's never reach a job.
#![allow(unsafe_code)] // pre_exec; each block carries its SAFETY argument.

use std::collections::HashSet;
use std::ffi::CString;
use std::io;
use std::path::Path;
use std::process::Stdio;
use std::sync::Mutex;

use anyhow::{anyhow, bail, Context};
use nix::sys::signal::Signal;
use nix::unistd::{getpid, getppid, Gid, Uid, User};
use tokio::process::{Child, Command};

/// The user runners run as, resolved once at start.
#[derive(Debug, Clone)]
pub struct RunAs {
    pub name: String,
    pub uid: Uid,
    pub gid: Gid,
    /// Supplementary groups, from `getgrouplist` (for shared drives reached by group).
    pub groups: Vec<Gid>,
    /// Whether spawning switches to this user (we are root and it is not root).
    pub switch: bool,
}

impl RunAs {
    /// Resolves `--run-as`: `nobody` by default when we are root; otherwise it must be us.
    pub fn resolve(requested: Option<&str>) -> anyhow::Result<Self> {
        let euid = nix::unistd::geteuid();
        if !euid.is_root() {
            let me = User::from_uid(euid)
                .ok()
                .flatten()
                .map_or_else(|| euid.to_string(), |u| u.name);
            if let Some(requested) = requested {
                if requested != me && requested != euid.to_string() {
                    bail!("--run-as {requested} needs the supervisor to start as root; it runs as {me}");
                }
            }
            return Ok(Self {
                name: me,
                uid: euid,
                gid: nix::unistd::getegid(),
                groups: Vec::new(),
                switch: false,
            });
        }
        let name = requested.unwrap_or("nobody");
        let user = match name.parse::<u32>() {
            Ok(uid) => User::from_uid(Uid::from_raw(uid)),
            Err(_) => User::from_name(name),
        }
        .with_context(|| format!("looking up --run-as user {name:?}"))?
        .ok_or_else(|| anyhow!("--run-as: there is no user {name:?} on this host"))?;
        let cname = CString::new(user.name.as_str()).context("--run-as: a user name with NUL")?;
        let groups = nix::unistd::getgrouplist(&cname, user.gid)
            .with_context(|| format!("looking up the groups of {}", user.name))?;
        Ok(Self {
            switch: !user.uid.is_root(),
            name: user.name,
            uid: user.uid,
            gid: user.gid,
            groups,
        })
    }

    /// How the user appears in messages.
    pub fn describe(&self) -> String {
        format!("{} (uid {})", self.name, self.uid)
    }

    /// Whether this user may enter (search) every folder on the way to `path`.
    pub fn can_traverse(&self, path: &Path) -> Result<(), String> {
        use std::os::unix::fs::MetadataExt;
        if self.uid.is_root() {
            return Ok(());
        }
        for dir in path.ancestors() {
            let meta = std::fs::metadata(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
            let mode = meta.mode();
            let allowed = if meta.uid() == self.uid.as_raw() {
                mode & 0o100 != 0
            } else if meta.gid() == self.gid.as_raw()
                || self.groups.iter().any(|g| g.as_raw() == meta.gid())
            {
                mode & 0o010 != 0
            } else {
                mode & 0o001 != 0
            };
            if !allowed {
                return Err(format!(
                    "{} (mode {:o}) cannot be entered by {}",
                    dir.display(),
                    mode & 0o7777,
                    self.describe()
                ));
            }
        }
        Ok(())
    }
}

/// Pids of runners alive right now, so that the sweep for orphans never touches one.
#[derive(Debug, Default)]
pub struct Runners {
    pids: Mutex<HashSet<i32>>,
}

impl Runners {
    fn insert(&self, pid: i32) {
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(pid);
    }

    pub fn remove(&self, pid: i32) {
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&pid);
    }

    pub fn contains(&self, pid: i32) -> bool {
        self.pids
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .contains(&pid)
    }
}

/// Starts `runner --pipe` as `run_as`, with stdin, stdout and stderr piped. The pid is
/// recorded in `runners` before anything else can run on this thread.
pub fn spawn_runner(runner: &Path, run_as: &RunAs, runners: &Runners) -> io::Result<(Child, i32)> {
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
        .process_group(0)
        .kill_on_drop(true);

    let switch = run_as.switch;
    let (uid, gid, groups) = (run_as.uid, run_as.gid, run_as.groups.clone());
    let parent = getpid();
    // SAFETY: the closure runs in the forked child before exec, where only async-signal-safe
    // calls are allowed. It calls nothing but setgroups, setgid, setuid, prctl and getppid —
    // direct system calls — on values computed before the fork (`groups` is only read), and
    // turns errors into io::Error with from_raw_os_error, which does not allocate.
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
            Ok(())
        });
    }
    let child = command.spawn()?;
    let pid = child
        .id()
        .and_then(|p| i32::try_from(p).ok())
        .ok_or_else(|| io::Error::other("the runner has no pid"))?;
    runners.insert(pid);
    Ok((child, pid))
}

/// `PATH` for runners and steps when the supervisor has none.
pub const DEFAULT_PATH: &str = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin";
