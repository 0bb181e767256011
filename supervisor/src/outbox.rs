//! Result messages and dead letters on their way out, delivered so that they are not lost.
//!
//! The result message is a core NATS message (contract §6), and core NATS drops what it cannot
//! deliver. Two holes matter in practice:
//! - a publish written into a connection that then dies is gone, although a flush on the *next*
//!   connection succeeds: so a flush only counts when the connection did not change meanwhile;
//! - an operator who keeps results (or dead letters) in a stream loses those published while
//!   the stream has no leader (a cluster node died): so when a stream captures the subject,
//!   the message is published through JetStream and retried until the stream acknowledges it.
//!
//! Retries are safe: every message carries a `Nats-Msg-Id`, and streams drop duplicates.

use std::collections::HashMap;
use std::sync::atomic::Ordering;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::HeaderMap;
use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::{sleep, timeout};
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::Shutdown;

/// How long a "does a stream capture this subject?" answer is trusted.
const CAPTURE_TTL: Duration = Duration::from_secs(30);
/// The bound on one delivery attempt.
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(5);

/// Sends results and dead letters.
#[derive(Debug)]
pub struct Outbox {
    client: async_nats::Client,
    js: jetstream::Context,
    shutdown: watch::Receiver<Shutdown>,
    /// Per subject prefix: whether a stream captures it, and when that was checked.
    captured: Mutex<HashMap<String, (Instant, bool)>>,
}

impl Outbox {
    pub fn new(client: async_nats::Client, shutdown: watch::Receiver<Shutdown>) -> Self {
        Self {
            js: jetstream::new(client.clone()),
            client,
            shutdown,
            captured: Mutex::new(HashMap::new()),
        }
    }

    /// Delivers one message on `subject` (under `prefix`), retrying through disconnections and
    /// leader elections until it is through. Gives up only when told to stop at once; `what`
    /// names it in the log.
    pub async fn send(
        &self,
        what: &str,
        prefix: &str,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> bool {
        let mut shutdown = self.shutdown.clone();
        let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
        loop {
            let attempt = self.attempt(prefix, subject.clone(), headers.clone(), payload.clone());
            match timeout(ATTEMPT_TIMEOUT, attempt).await {
                Ok(Ok(())) => return true,
                Ok(Err(e)) => warn!("{what} failed, will retry: {e}"),
                Err(_) => warn!("{what} timed out, will retry"),
            }
            tokio::select! {
                () = sleep(backoff.pause()) => {}
                _ = shutdown.wait_for(|s| *s == Shutdown::Now) => return false,
            }
        }
    }

    async fn attempt(
        &self,
        prefix: &str,
        subject: String,
        headers: HeaderMap,
        payload: Bytes,
    ) -> Result<(), async_nats::Error> {
        if self.captured(prefix, &subject).await {
            match self
                .js
                .publish_with_headers(subject.clone(), headers.clone(), payload.clone())
                .await?
                .await
            {
                Ok(_) => return Ok(()),
                // The stream went away since we looked: publish plainly.
                Err(e) if e.kind() == jetstream::context::PublishErrorKind::StreamNotFound => {
                    self.forget(prefix);
                }
                Err(e) => return Err(e.into()),
            }
        }
        let stats = self.client.statistics();
        let connects = stats.connects.load(Ordering::Acquire);
        self.client
            .publish_with_headers(subject, headers, payload)
            .await?;
        self.client.flush().await?;
        if stats.connects.load(Ordering::Acquire) != connects {
            return Err("the connection was re-established meanwhile".into());
        }
        Ok(())
    }

    /// Whether a stream captures `subject`, from a cache refreshed every `CAPTURE_TTL`. When
    /// the question cannot be answered, publishing plainly is the best that can be done.
    async fn captured(&self, prefix: &str, subject: &str) -> bool {
        if let Some(&(checked, captured)) = self.lock().get(prefix) {
            if checked.elapsed() < CAPTURE_TTL {
                return captured;
            }
        }
        let captured = match self.js.stream_by_subject(subject).await {
            Ok(stream) => {
                debug!(%stream, prefix, "a stream keeps these messages: publishing through JetStream");
                true
            }
            Err(e) if e.kind() == jetstream::context::GetStreamByNameErrorKind::NotFound => false,
            Err(e) => {
                debug!("cannot tell whether a stream keeps {prefix}: {e}");
                return false;
            }
        };
        self.lock()
            .insert(prefix.to_owned(), (Instant::now(), captured));
        captured
    }

    fn forget(&self, prefix: &str) {
        self.lock().remove(prefix);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, (Instant, bool)>> {
        self.captured
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}
