//! What a step's shell is given between `fork` and `exec`: the job's rlimits, then the job's
//! identity.
//!
//! **Rlimits.** The runner itself is not limited by the job: it needs descriptors, file size
//! and CPU of its own to stage, sync and write the manifest. The steps get the operator's
//! ceilings as *hard* limits and the job's values as *soft* ones: the kernel enforces them
//! (EAGAIN from `fork`, EMFILE, SIGXFSZ, SIGXCPU), and no process of the job can raise a hard
//! limit. Where there is no ceiling (a standalone `--job`, or a kind the operator does not
//! limit) the job's value is the hard limit too, so a step cannot simply raise it. Core dumps
//! are off for every step: the runner turns them off for itself when it starts
//! (`disable_core_dumps`), and steps inherit that.
//!
//! **Identity.** Under a supervisor the runner is root and each step's shell becomes the job's
//! identity just before it executes: its supplementary groups, gid and uid, in that order
//! (after the uid, the others could no longer be set), after the rlimits (which only root may
//! raise). `PR_SET_NO_NEW_PRIVS`, which the runner set for itself, stays: no setuid program
//! gives a step privileges back. The runner never runs anything of the job as itself, so no
//! step can signal, trace or read it.
//!
//! With neither to set (a standalone run with no limits), the step is started without a
//! `pre_exec` hook at all: std can then use `posix_spawn` (a `vfork`) instead of a `fork`.

#![allow(unsafe_code)] // pre_exec, with a SAFETY argument below.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nats_fs::limits::{Kind, Limits, RLIMITS};
use nats_fs::protocol::StepIdentity;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

/// At most one setting per rlimit a job may lower (processes, open files, file size, CPU time).
const MAX: usize = RLIMITS.len();

/// The rlimits a step gets, worked out before `fork` so that the child only makes system calls.
#[derive(Debug, Clone, Copy)]
pub(crate) struct StepRlimits {
    settings: [(Resource, u64, u64); MAX],
    len: usize,
}

impl StepRlimits {
    /// The settings for `granted` under `ceilings` (the operator's, `Limits::default()` when
    /// standalone), leaving out those the runner has already. A ceiling is the hard limit (the
    /// supervisor lowered each to what it can give); without one, the job's value is, never
    /// above the runner's own hard limit.
    pub(crate) fn new(granted: &Limits, ceilings: &Limits) -> io::Result<Self> {
        let mut rlimits = Self {
            settings: [(Resource::RLIMIT_CORE, 0, 0); MAX],
            len: 0,
        };
        for (kind, resource) in RLIMITS {
            let Some(value) = granted.get(kind) else {
                continue;
            };
            let current = getrlimit(resource).map_err(io::Error::from)?;
            let hard = ceilings.get(kind).unwrap_or(current.1);
            let soft = value.min(hard);
            // No ceiling: nothing above the job's own value is the operator's to keep. For
            // CPU time the hard limit is a second later: at the hard limit the kernel sends
            // SIGKILL, and the step should first get SIGXCPU, which says what happened.
            let hard = match (ceilings.get(kind), kind) {
                (Some(_), _) => hard,
                (None, Kind::CpuTime) => soft.saturating_add(1).min(hard),
                (None, _) => soft,
            };
            if (soft, hard) != current {
                rlimits.settings[rlimits.len] = (resource, soft, hard);
                rlimits.len += 1;
            }
        }
        Ok(rlimits)
    }
}

/// Makes `command` apply `rlimits` and then take `identity` in the child, just before `exec`;
/// leaves it alone when there is nothing to do.
pub(crate) fn prepare(
    command: &mut Command,
    rlimits: StepRlimits,
    identity: Option<&StepIdentity>,
) {
    let identity = identity.map(|i| {
        (
            Uid::from_raw(i.uid),
            Gid::from_raw(i.gid),
            i.groups
                .iter()
                .copied()
                .map(Gid::from_raw)
                .collect::<Vec<_>>(),
        )
    });
    if rlimits.len == 0 && identity.is_none() {
        return;
    }
    // SAFETY: the closure runs in the forked child, where only async-signal-safe calls are
    // allowed. It reads a plain array and a vector made before the fork (copied into the
    // closure: no allocation, no lock) and makes only setrlimit(2), setgroups(2),
    // setresgid(2) and setresuid(2) system calls, through glibc's thin wrappers (in a child of
    // fork there is one thread, so glibc has no other thread to pass the ids on to); errors
    // become an `io::Error` from the errno, which allocates nothing.
    unsafe {
        command.pre_exec(move || {
            for &(resource, soft, hard) in &rlimits.settings[..rlimits.len] {
                setrlimit(resource, soft, hard).map_err(io::Error::from)?;
            }
            if let Some((uid, gid, groups)) = &identity {
                setgroups(groups).map_err(io::Error::from)?;
                setresgid(*gid, *gid, *gid).map_err(io::Error::from)?;
                setresuid(*uid, *uid, *uid).map_err(io::Error::from)?;
            }
            Ok(())
        });
    }
}

/// Gives every signal this process was started with ignored its default action back: steps
/// inherit what is ignored across `exec`, and a supervisor started with, say, SIGHUP ignored
/// (`nohup`) must not pass that on to every build. SIGPIPE stays as std set it for the runner
/// (std gives children the default back). Only the signals `/proc/self/status` lists as
/// ignored are touched (usually none but SIGPIPE: this runs for every job). Call it before any
/// thread or signal handler of the runner's exists.
pub(crate) fn default_ignored_signals() -> nix::Result<()> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let ignored = std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("SigIgn:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .ok_or(nix::errno::Errno::EIO)?;
    let default = SigAction::new(SigHandler::SigDfl, SaFlags::empty(), SigSet::empty());
    for signal in Signal::iterator() {
        let bit = 1u64 << (signal as i32 - 1);
        if ignored & bit == 0 || signal == Signal::SIGPIPE {
            continue;
        }
        // SAFETY: the default action runs no code of ours, and the signal was ignored, so no
        // handler of ours is replaced (the process has one thread, and installs its own
        // handlers only later).
        unsafe { sigaction(signal, &default) }?;
    }
    Ok(())
}

/// Becomes `uid` for good and kills every other process of it (`kill(-1, SIGKILL)` reaches
/// exactly the processes a process may signal, which for a non-root uid are its own): the last
/// thing a runner does for a job whose identity is its own alone. Changes every thread's
/// credentials (glibc passes `setresuid` on to them).
pub(crate) fn kill_every_other_process_as(uid: u32) -> nix::Result<()> {
    let uid = Uid::from_raw(uid);
    setresuid(uid, uid, uid)?;
    match nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(-1),
        nix::sys::signal::Signal::SIGKILL,
    ) {
        // Nothing else of the uid is left.
        Ok(()) | Err(nix::errno::Errno::ESRCH) => Ok(()),
        Err(e) => Err(e),
    }
}

/// Turns core dumps off for the runner and everything it starts (`RLIMIT_CORE` 0, soft and
/// hard): a crashing step must not write its memory to the drive.
pub(crate) fn disable_core_dumps() -> nix::Result<()> {
    setrlimit(Resource::RLIMIT_CORE, 0, 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_granted_kinds_are_set_and_never_above_the_hard_limit() {
        let granted = Limits {
            open_files: Some(64),
            cpu_time: Some(u64::MAX - 1),
            memory: Some(1 << 30),
            ..Limits::default()
        };
        let ceilings = Limits {
            cpu_time: Some(u64::MAX - 1),
            ..Limits::default()
        };
        let rlimits = StepRlimits::new(&granted, &ceilings).unwrap();
        let set = &rlimits.settings[..rlimits.len];
        assert_eq!(set.len(), 2, "{set:?}");
        // No ceiling for open files: the job's value is the hard limit too.
        assert_eq!(set[0], (Resource::RLIMIT_NOFILE, 64, 64));
        // The ceiling is the hard limit.
        assert_eq!(set[1], (Resource::RLIMIT_CPU, u64::MAX - 1, u64::MAX - 1));
    }

    #[test]
    fn limits_the_runner_has_already_are_not_set_again() {
        // Under a supervisor the runner's limits are the ceilings, soft and hard.
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        let ceilings = Limits {
            open_files: Some(hard),
            ..Limits::default()
        };
        let granted = Limits {
            open_files: Some(soft),
            ..Limits::default()
        };
        let rlimits = StepRlimits::new(&granted, &ceilings).unwrap();
        assert_eq!(rlimits.len, 0, "{:?}", &rlimits.settings[..rlimits.len]);
        assert!(
            StepRlimits::new(&Limits::default(), &Limits::default())
                .unwrap()
                .len
                == 0
        );
    }
}
