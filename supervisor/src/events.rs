//! Job lifecycle events on `{status_subject}.{id}` (`jobs.status.{id}` by default), so that a
//! controller can follow a job live (`nats sub 'jobs.status.job_2026_01'`) without reading the
//! shared drive: `started`, `step-started`, `step-finished`, `finished`.
//!
//! Core NATS, best effort, and never in a job's way: events go into a bounded queue that one
//! task publishes from, in order; when the queue is full (NATS is down for long) events are
//! dropped and counted (`nats_fs_events_dropped_total`) rather than waited for.

use std::sync::{Arc, Mutex, PoisonError};
use std::time::SystemTime;

use bytes::Bytes;
use nats_fs::manifest::{Reason, ResultMessage, StepStatus};
use serde::Serialize;
use tokio::sync::mpsc;

use crate::metrics::Metrics;

/// Events waiting to be published, at most.
const QUEUE: usize = 4096;

/// One event, as published.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Published<'a> {
    event: &'static str,
    id: &'a str,
    attempt: u64,
    seq: u64,
    /// RFC 3339, UTC, milliseconds.
    time: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    host: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    worker: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    index: Option<usize>,
    #[serde(skip_serializing_if = "Option::is_none")]
    name: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    status: Option<&'a str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    exit_code: Option<i32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    reason: Option<&'static str>,
    #[serde(skip_serializing_if = "Option::is_none")]
    duration_ms: Option<u64>,
}

/// The supervisor's event publisher (and, for the durations the events carry, its metrics).
#[derive(Debug, Clone)]
pub struct Events {
    inner: Option<Arc<Inner>>,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug)]
struct Inner {
    prefix: String,
    host: String,
    worker: String,
    queue: mpsc::Sender<(String, Bytes)>,
}

impl Events {
    /// Publishes on `{prefix}.{id}` through `client` (`None` publishes nothing), and records
    /// staging and syncing times in `metrics`.
    pub fn start(
        client: async_nats::Client,
        prefix: Option<String>,
        worker: &str,
        metrics: Arc<Metrics>,
    ) -> Self {
        let Some(prefix) = prefix else {
            return Self {
                inner: None,
                metrics: Some(metrics),
            };
        };
        let (queue, mut pending) = mpsc::channel::<(String, Bytes)>(QUEUE);
        tokio::spawn(async move {
            while let Some((subject, payload)) = pending.recv().await {
                // Best effort: a lost event is not worth holding the others back for.
                let _ = client.publish(subject, payload).await;
            }
        });
        Self {
            inner: Some(Arc::new(Inner {
                prefix,
                host: nats_fs::host_name(),
                worker: worker.to_owned(),
                queue,
            })),
            metrics: Some(metrics),
        }
    }

    /// Publishes and records nothing.
    pub fn none() -> Self {
        Self {
            inner: None,
            metrics: None,
        }
    }

    /// Delivery `seq` (attempt `attempt`) of job `id` ended with a final status (its result is
    /// being published).
    pub fn finished(&self, (id, seq, attempt): (&str, u64, u64), result: &ResultMessage) {
        self.publish(&Published {
            status: Some(result.status.as_str()),
            exit_code: Some(result.exit_code),
            reason: result.reason.map(Reason::as_str),
            duration_ms: result.duration_ms,
            ..Published::new("finished", id, seq, attempt)
        });
    }

    /// Queues `event` for `{prefix}.{id}`; counts it as dropped if the queue is full.
    fn publish(&self, event: &Published<'_>) {
        let Some(inner) = &self.inner else {
            return;
        };
        let Ok(payload) = serde_json::to_vec(event) else {
            return;
        };
        let subject = format!("{}.{}", inner.prefix, event.id);
        if inner.queue.try_send((subject, payload.into())).is_err() {
            if let Some(metrics) = &self.metrics {
                metrics.event_dropped();
            }
        }
    }

    /// The events of delivery `seq` (attempt `attempt`) of job `id`.
    pub fn job(&self, id: &str, seq: u64, attempt: u64) -> JobEvents {
        JobEvents {
            events: self.clone(),
            id: id.to_owned(),
            seq,
            attempt,
            state: Arc::new(Mutex::new(JobState {
                id: id.to_owned(),
                attempt,
                seq,
                identity: None,
                step: None,
                step_name: None,
                started_at: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            })),
        }
    }
}

/// What a running job is doing, as the service API reports it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
#[serde(rename_all = "camelCase")]
pub struct JobState {
    pub id: String,
    pub attempt: u64,
    pub seq: u64,
    /// The identity it runs as.
    pub identity: Option<String>,
    /// The step it is on (the last one started).
    pub step: Option<usize>,
    pub step_name: Option<String>,
    /// RFC 3339, UTC.
    pub started_at: String,
}

/// The events of one delivery of one job, and what it is doing.
#[derive(Debug, Clone)]
pub struct JobEvents {
    events: Events,
    id: String,
    seq: u64,
    attempt: u64,
    state: Arc<Mutex<JobState>>,
}

impl JobEvents {
    /// Events of nothing (`--dry-run`).
    pub fn none() -> Self {
        Events::none().job("", 0, 0)
    }

    /// What the job is doing now.
    pub fn state(&self) -> JobState {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// The job runs as `identity`.
    pub fn identity(&self, identity: String) {
        self.state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .identity = Some(identity);
    }

    /// The job starts here.
    pub fn started(&self) {
        let Some(inner) = &self.events.inner else {
            return;
        };
        self.send(&Published {
            host: Some(&inner.host),
            worker: Some(&inner.worker),
            ..self.event("started")
        });
    }

    /// Step `index` started.
    pub fn step_started(&self, index: usize, name: Option<&str>) {
        {
            let mut state = self.state.lock().unwrap_or_else(PoisonError::into_inner);
            state.step = Some(index);
            state.step_name = name.map(str::to_owned);
        }
        self.send(&Published {
            index: Some(index),
            name,
            ..self.event("step-started")
        });
    }

    /// Step `index` ended.
    pub fn step_finished(
        &self,
        index: usize,
        name: Option<&str>,
        status: StepStatus,
        exit_code: Option<i32>,
        duration_ms: u64,
    ) {
        self.send(&Published {
            index: Some(index),
            name,
            status: Some(status.as_str()),
            exit_code,
            duration_ms: Some(duration_ms),
            ..self.event("step-finished")
        });
    }

    /// The job folder was copied into the workspace in `duration`.
    pub fn staged(&self, duration: std::time::Duration) {
        if let Some(metrics) = &self.events.metrics {
            metrics.staged(duration);
        }
    }

    /// New and changed files were copied to `results/` in `duration`.
    pub fn synced(&self, duration: std::time::Duration) {
        if let Some(metrics) = &self.events.metrics {
            metrics.synced(duration);
        }
    }

    fn event(&self, event: &'static str) -> Published<'_> {
        Published::new(event, &self.id, self.seq, self.attempt)
    }

    fn send(&self, event: &Published<'_>) {
        self.events.publish(event);
    }
}

impl<'a> Published<'a> {
    /// Event `event` of delivery `seq` (attempt `attempt`) of job `id`, now.
    fn new(event: &'static str, id: &'a str, seq: u64, attempt: u64) -> Self {
        Self {
            event,
            id,
            attempt,
            seq,
            time: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
            host: None,
            worker: None,
            index: None,
            name: None,
            status: None,
            exit_code: None,
            reason: None,
            duration_ms: None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_that_do_not_fit_the_queue_are_dropped_and_counted() {
        let metrics = Arc::new(Metrics::new(1));
        // A queue of two that nothing empties, as when NATS is down for long.
        let (queue, mut pending) = mpsc::channel(2);
        let events = Events {
            inner: Some(Arc::new(Inner {
                prefix: "jobs.status".to_owned(),
                host: "h".to_owned(),
                worker: "w".to_owned(),
                queue,
            })),
            metrics: Some(metrics.clone()),
        };
        let job = events.job("j1", 7, 1);
        job.started();
        job.step_started(0, Some("build"));
        job.step_finished(0, Some("build"), StepStatus::Success, Some(0), 5);
        events.finished(
            ("j1", 7, 1),
            &ResultMessage::error("j1", "no folder").because(Reason::Host),
        );
        assert_eq!(metrics.events_dropped(), 2);
        let (subject, payload) = pending.try_recv().unwrap();
        assert_eq!(subject, "jobs.status.j1");
        let first: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(first["event"], "started");
        assert_eq!(
            (first["seq"].as_u64(), first["host"].as_str()),
            (Some(7), Some("h"))
        );
        let (_, payload) = pending.try_recv().unwrap();
        let second: serde_json::Value = serde_json::from_slice(&payload).unwrap();
        assert_eq!(second["name"], "build");
    }
}
