//! Watching a running job's memory: the resident memory of all of its processes together,
//! against its `limits.memory`.
//!
//! No rlimit can do this (`RLIMIT_AS` and `RLIMIT_DATA` are per process, and count address
//! space, not memory used), and this host has no cgroup v2 memory controller to delegate, so
//! the supervisor samples the runner's process tree ([`reap::tree_usage`], one scan of `/proc`)
//! every [`SAMPLE_EVERY`]. The scan reads one small file per process on the host, so it runs on
//! tokio's blocking pool: the supervisor's single runtime thread keeps every other job's lease
//! going meanwhile. A job without a memory limit is never sampled.
//!
//! The runner is a child subreaper, so every process a step starts (even one that calls
//! `setsid`) stays in the runner's tree while the runner lives. A process forked and gone
//! between two samples is not seen; what matters is memory that stays.

use std::time::Duration;

use nats_fs::reap::{self, TreeUsage};
use nix::unistd::Pid;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;
use tokio::time::{interval_at, Instant, MissedTickBehavior};

/// How often a job's processes are measured.
pub const SAMPLE_EVERY: Duration = Duration::from_millis(250);

/// The job's processes together used more memory than its limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Over {
    pub usage: TreeUsage,
    pub limit: u64,
}

impl Over {
    /// What the job is told, and its manifest says.
    pub fn error(&self) -> String {
        format!(
            "the job's processes used {} of memory together, over its limit of {}",
            nats_fs::limits::size(self.usage.rss_bytes),
            nats_fs::limits::size(self.limit)
        )
    }
}

/// Samples the tree below a runner until it passes `limit` (then reports once and stops), or
/// until dropped.
#[derive(Debug)]
pub struct MemoryWatch {
    task: JoinHandle<()>,
    over: oneshot::Receiver<Over>,
}

impl MemoryWatch {
    /// Starts watching the processes below (and including) `runner`.
    pub fn start(runner: Pid, limit: u64) -> Self {
        let (tx, over) = oneshot::channel();
        let task = tokio::spawn(async move {
            let mut ticks = interval_at(Instant::now() + SAMPLE_EVERY, SAMPLE_EVERY);
            ticks.set_missed_tick_behavior(MissedTickBehavior::Delay);
            loop {
                ticks.tick().await;
                let Ok(usage) = tokio::task::spawn_blocking(move || reap::tree_usage(runner)).await
                else {
                    return;
                };
                if usage.processes == 0 {
                    // The runner is gone: nothing left to watch.
                    return;
                }
                if usage.rss_bytes > limit {
                    let _ = tx.send(Over { usage, limit });
                    return;
                }
            }
        });
        Self { task, over }
    }

    /// Resolves when the job has passed its limit; never, if it does not.
    pub async fn over(&mut self) -> Over {
        match (&mut self.over).await {
            Ok(over) => over,
            Err(_) => std::future::pending().await,
        }
    }
}

impl Drop for MemoryWatch {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Resolves when `watch` reports; never without one (for a `select!`).
pub async fn over(watch: &mut Option<MemoryWatch>) -> Over {
    match watch {
        Some(watch) => watch.over().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_error_names_use_and_limit() {
        let over = Over {
            usage: TreeUsage {
                processes: 3,
                rss_bytes: 612 << 20,
                largest_rss_bytes: 600 << 20,
            },
            limit: 500 << 20,
        };
        assert_eq!(
            over.error(),
            "the job's processes used 612.0 MiB of memory together, over its limit of 500.0 MiB"
        );
    }

    #[tokio::test]
    async fn a_tree_over_its_limit_is_reported() {
        let me = nix::unistd::getpid();
        // This test process uses more than one byte.
        let mut watch = Some(MemoryWatch::start(me, 1));
        let over = tokio::time::timeout(Duration::from_secs(5), super::over(&mut watch))
            .await
            .expect("a report within 5 s");
        assert!(
            over.usage.rss_bytes > 1 && over.usage.processes >= 1,
            "{over:?}"
        );
        // Under its limit: nothing.
        let mut watch = Some(MemoryWatch::start(me, u64::MAX));
        assert!(
            tokio::time::timeout(SAMPLE_EVERY * 3, super::over(&mut watch))
                .await
                .is_err()
        );
    }
}
