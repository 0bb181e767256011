//! Whose rights the runner's file system calls use.
//!
//! Under a supervisor running as root the runner is root too, and never acts on a drive with
//! root's own rights: on the jobs folder it acts as the share user (the supervisor's
//! `--share-user`), and in the job's private folders as the job's identity, so that what it
//! stages there is the job's own and what it reads there is what the job itself could read.
//! Each call that touches one of them is wrapped in [`Rights::on_share`] or
//! [`Rights::as_job`], which switch the calling thread's file system ids for the call
//! ([`nats_fs::share::FsIds`]). Standalone (`--job`) both are `None`: the runner acts as the
//! person who started it.

use nats_fs::protocol::StartJob;
use nats_fs::share::{as_ids, FsIds};

/// The ids for the two sides of a run.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub(crate) struct Rights {
    /// On the jobs folder: the share user.
    pub(crate) share: Option<FsIds>,
    /// In the workspace, `TMPDIR` and the job's own results folder: the job's identity.
    pub(crate) job: Option<FsIds>,
}

impl Rights {
    pub(crate) fn of(start: &StartJob) -> Self {
        Self {
            share: start.share,
            job: start.identity.as_ref().map(|i| FsIds {
                uid: i.uid,
                gid: i.gid,
            }),
        }
    }

    /// Runs `work` with the share user's rights.
    pub(crate) fn on_share<T>(self, work: impl FnOnce() -> T) -> T {
        as_ids(self.share, work)
    }

    /// Runs `work` with the job identity's rights.
    pub(crate) fn as_job<T>(self, work: impl FnOnce() -> T) -> T {
        as_ids(self.job, work)
    }
}
