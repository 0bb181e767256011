//! The registry of the jobs running on this host: one delivery of an id at a time here, and
//! where cancel requests, draining and the service API find the running jobs.

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use nats_fs::job::JobId;
use nats_fs::protocol::CancelMode;
use tokio::sync::{mpsc, watch};

use crate::events::{JobEvents, JobState};

/// The jobs running on this host, by stream sequence, for cancel requests, draining and the
/// service API.
#[derive(Debug)]
pub struct Running {
    jobs: Mutex<HashMap<u64, RunningJob>>,
    /// How many there are, for whoever reports it.
    count: watch::Sender<usize>,
}

/// One entry of [`Running`].
#[derive(Debug)]
struct RunningJob {
    id: JobId,
    /// Stop requests for the job.
    control: mpsc::Sender<CancelMode>,
    /// What it is doing.
    events: JobEvents,
}

impl Default for Running {
    fn default() -> Self {
        Self {
            jobs: Mutex::default(),
            count: watch::channel(0).0,
        }
    }
}

impl Running {
    /// Registers delivery `seq` of job `id` — unless another delivery of `id` is running here:
    /// then `Err` with its stream sequence.
    pub(crate) fn register(
        &self,
        seq: u64,
        id: &JobId,
        tx: mpsc::Sender<CancelMode>,
        events: JobEvents,
    ) -> Result<Registered<'_>, u64> {
        let mut jobs = self.lock();
        if let Some((other, _)) = jobs.iter().find(|(_, job)| job.id == *id) {
            return Err(*other);
        }
        jobs.insert(
            seq,
            RunningJob {
                id: id.clone(),
                control: tx,
                events,
            },
        );
        self.count.send_replace(jobs.len());
        Ok(Registered { running: self, seq })
    }

    /// The number of running jobs, as it changes.
    pub fn watch_count(&self) -> watch::Receiver<usize> {
        self.count.subscribe()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, RunningJob>> {
        self.jobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// What every running job is doing, oldest delivery first.
    pub fn states(&self) -> Vec<JobState> {
        let mut states: Vec<JobState> =
            self.lock().values().map(|job| job.events.state()).collect();
        states.sort_by_key(|s| s.seq);
        states
    }

    /// Asks every job with this id to stop with `mode`; returns how many were asked.
    pub fn stop(&self, id: &JobId, mode: CancelMode) -> usize {
        self.lock()
            .values()
            .filter(|job| job.id == *id)
            .map(|job| usize::from(job.control.try_send(mode).is_ok()))
            .sum()
    }

    /// Asks every running job to stop with `mode`.
    pub fn stop_all(&self, mode: CancelMode) -> usize {
        self.lock()
            .values()
            .map(|job| usize::from(job.control.try_send(mode).is_ok()))
            .sum()
    }

    /// How many jobs are running.
    pub fn count(&self) -> usize {
        self.lock().len()
    }
}

/// Removes a job from [`Running`] when its task ends, however it ends.
pub(crate) struct Registered<'a> {
    running: &'a Running,
    seq: u64,
}

impl Drop for Registered<'_> {
    fn drop(&mut self) {
        let mut jobs = self.running.lock();
        jobs.remove(&self.seq);
        self.running.count.send_replace(jobs.len());
    }
}
