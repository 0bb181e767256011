//! The job's rlimits, applied to each step's shell between `fork` and `exec`.
//!
//! The runner itself keeps the operator's ceilings (the supervisor made them its hard and soft
//! limits): it needs descriptors, file size and CPU of its own to stage, sync and write the
//! manifest. Only the steps get the job's values, as *soft* limits: the kernel enforces them
//! (EAGAIN from `fork`, EMFILE, SIGXFSZ, SIGXCPU) and a job cannot go above the ceiling, which
//! stays the hard limit. Where there is no ceiling (a standalone `--job`, or a kind the operator
//! does not limit) the job's value is the hard limit too, so a step cannot simply raise it.
//! Core dumps are off for every step: the runner turns them off for itself when it starts
//! (`disable_core_dumps`), and steps inherit that.
//!
//! Only a limit that differs from the runner's own is set in the child. Under a supervisor a
//! job that asks for nothing has exactly the runner's limits (the ceilings), and then the step
//! is started without a `pre_exec` hook at all: std can then use `posix_spawn` (a `vfork`)
//! instead of a `fork` that copies the runner's page tables, a quarter of a millisecond of
//! every trivial job's dispatch time.

#![allow(unsafe_code)] // pre_exec, with a SAFETY argument below.

use std::io;
use std::os::unix::process::CommandExt;
use std::process::Command;

use nats_fs::limits::{Kind, Limits, RLIMITS};
use nix::sys::resource::{getrlimit, setrlimit, Resource};

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
    /// standalone), clamped to this process's current hard limits (the kernel refuses more),
    /// leaving out those the runner has already.
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
            let hard = current.1;
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

    /// Makes `command` apply these limits in the child, just before `exec`; leaves it alone
    /// when there is nothing to change.
    pub(crate) fn apply(self, command: &mut Command) {
        if self.len == 0 {
            return;
        }
        // SAFETY: the closure runs in the forked child, where only async-signal-safe calls are
        // allowed. It reads a plain array copied into the closure (no allocation, no lock) and
        // makes only setrlimit(2) system calls; errors become an `io::Error` from the errno,
        // which allocates nothing.
        unsafe {
            command.pre_exec(move || {
                for &(resource, soft, hard) in &self.settings[..self.len] {
                    setrlimit(resource, soft, hard).map_err(io::Error::from)?;
                }
                Ok(())
            });
        }
    }
}

/// Turns core dumps off for the runner and everything it starts (`RLIMIT_CORE` 0, soft and
/// hard): a crashing step must not write its memory to the drive. Under a supervisor it is off
/// already.
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
        let (_, cpu_hard) = getrlimit(Resource::RLIMIT_CPU).unwrap();
        assert_eq!(
            set[1],
            (Resource::RLIMIT_CPU, cpu_hard.min(u64::MAX - 1), cpu_hard)
        );
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
