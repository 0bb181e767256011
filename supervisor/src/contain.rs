//! Containment: how the supervisor makes a job's limits hold, whatever its runner does.
//!
//! A run knows containment through one [`Containment`]: the runner's pid once it runs
//! ([`Containment::started`]), the limits the job was granted once its runner reports them
//! ([`Containment::granted`]), a limit that the job passed ([`Containment::exceeded`]), and
//! the end of the run ([`Containment::stopped`]).
//!
//! Today's: the operator's ceilings, which the runner gives each step as its hard rlimits (with
//! `RLIMIT_CORE` 0 and an `oom_score_adj` of 1000, set by the runner for itself and its steps),
//! and the job's memory summed over the runner's process tree a few times a second
//! ([`MemoryWatch`]). A cgroup v2 backend (a delegated subtree: `memory.max`, `pids.max`,
//! `cgroup.kill`) would place the runner in a cgroup of its own before it runs anything of the
//! job's, and report `memory.events` through [`Containment::exceeded`]. It is not here because these
//! hosts have hybrid cgroups v1, where it could not be tested.

use nats_fs::limits::Limits;
use nats_fs::manifest::Reason;
use nix::unistd::Pid;
use tracing::warn;

use crate::logging::event;
use crate::memory::{self, MemoryWatch};

/// A limit the job passed: the job must end now, `failed` with this reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Exceeded {
    pub reason: Reason,
    /// For people: what was used, and the limit.
    pub error: String,
}

/// The containment of one run.
#[derive(Debug)]
pub struct Containment {
    ceilings: Limits,
    /// The memory limit watched: the ceiling until the runner reports the job's own.
    memory: Option<u64>,
    runner: Option<Pid>,
    watch: Option<MemoryWatch>,
}

impl Containment {
    /// A run under the operator's `ceilings`.
    pub fn new(ceilings: Limits) -> Self {
        Self {
            ceilings,
            memory: ceilings.memory,
            runner: None,
            watch: None,
        }
    }

    /// The runner started as `pid`: from now on its processes are watched (a job without a
    /// memory limit is not sampled at all).
    pub fn started(&mut self, pid: Pid) {
        self.runner = Some(pid);
        self.watch_memory();
    }

    /// The runner reported the limits the job was granted. The runner runs as the job's
    /// identity, so a step can make it say anything: what it reports is believed only where it
    /// is lower than a ceiling ([`Limits::within`]). Returns the limits in force.
    pub fn granted(&mut self, reported: &Limits) -> Limits {
        let (limits, _) = reported.within(&self.ceilings);
        if limits.memory != self.memory {
            self.memory = limits.memory;
            self.watch_memory();
        }
        limits
    }

    /// The runner has exited: its pid may belong to another process from now on.
    pub fn stopped(&mut self) {
        self.runner = None;
        self.watch = None;
    }

    /// Resolves, once, when the job passes a limit that is watched here; never otherwise.
    pub async fn exceeded(&mut self) -> Exceeded {
        let over = memory::over(&mut self.watch).await;
        self.watch = None;
        let error = over.error();
        warn!(
            event = event::MEMORY_EXCEEDED,
            rss_bytes = over.usage.rss_bytes,
            limit_bytes = over.limit,
            processes = over.usage.processes,
            largest_rss_bytes = over.usage.largest_rss_bytes,
            "{error}; ending the job"
        );
        Exceeded {
            reason: Reason::Memory,
            error,
        }
    }

    fn watch_memory(&mut self) {
        self.watch = self
            .runner
            .zip(self.memory)
            .map(|(pid, limit)| MemoryWatch::start(pid, limit));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[tokio::test]
    async fn a_job_over_its_memory_is_reported_and_a_report_cannot_raise_the_ceiling() {
        let me = nix::unistd::getpid();
        let ceilings = Limits {
            memory: Some(u64::MAX / 2),
            ..Limits::default()
        };
        let mut contain = Containment::new(ceilings);
        contain.started(me);
        // A runner asking for more gets the ceiling.
        let asked = Limits {
            memory: Some(u64::MAX),
            processes: Some(7),
            ..Limits::default()
        };
        let granted = contain.granted(&asked);
        assert_eq!(granted.memory, Some(u64::MAX / 2));
        assert_eq!(granted.processes, Some(7));
        // Nor any other ceiling: a forged report cannot put more in the manifest either.
        let ceilings = Limits {
            output: Some(10),
            ..ceilings
        };
        let forged = Limits {
            output: Some(u64::MAX),
            ..asked
        };
        assert_eq!(Containment::new(ceilings).granted(&forged).output, Some(10));
        assert!(
            tokio::time::timeout(memory::SAMPLE_EVERY * 3, contain.exceeded())
                .await
                .is_err(),
            "this test process is not over u64::MAX / 2 bytes"
        );
        // One byte: this test process is over it.
        let lowered = Limits {
            memory: Some(1),
            ..Limits::default()
        };
        contain.granted(&lowered);
        let exceeded = tokio::time::timeout(Duration::from_secs(5), contain.exceeded())
            .await
            .expect("a report within 5 s");
        assert_eq!(exceeded.reason, Reason::Memory);
        assert!(
            exceeded.error.contains("over its limit of 1 B"),
            "{exceeded:?}"
        );
        // After the runner exits nothing is watched.
        contain.stopped();
        assert!(
            tokio::time::timeout(memory::SAMPLE_EVERY * 2, contain.exceeded())
                .await
                .is_err()
        );
    }
}
