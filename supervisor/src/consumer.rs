//! Where jobs come from: the stream and the durable pull consumer (contract §7), set up or
//! reused and checked, and waited for while NATS is unreachable.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{pull, AckPolicy, DeliverPolicy, PullConsumer};
use async_nats::jetstream::stream::{self, RetentionPolicy, StorageType};
use tokio::sync::watch;
use tokio::time::sleep;
use tracing::warn;

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::Shutdown;

/// The consumer and the limits the server actually applies to it.
#[derive(Debug)]
pub struct Intake {
    pub consumer: PullConsumer,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    /// The stream's replicas: state kept beside it (the lock bucket) is kept as safely.
    pub replicas: usize,
}

/// Why the stream or consumer could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum EnsureError {
    /// Will not get better by waiting: a configuration mismatch.
    #[error("{0}")]
    Config(String),
    /// NATS is unreachable or failing; try again.
    #[error("{0}")]
    Nats(String),
}

/// Creates the stream and the durable consumer when missing, reuses them when present, and
/// checks that what exists can serve: the stream must capture the input subject, and the
/// consumer must filter on it with explicit acks.
pub async fn ensure(settings: &Settings, js: &jetstream::Context) -> Result<Intake, EnsureError> {
    let nats = |what: &str| {
        let what = what.to_owned();
        move |e: Box<dyn std::error::Error + Send + Sync>| EnsureError::Nats(format!("{what}: {e}"))
    };
    let mut stream = js
        .get_or_create_stream(stream::Config {
            name: settings.stream.clone(),
            subjects: vec![settings.input_subject.clone()],
            retention: RetentionPolicy::WorkQueue,
            storage: StorageType::File,
            ..Default::default()
        })
        .await
        .map_err(|e| nats(&format!("setting up stream {}", settings.stream))(e.into()))?;
    let config = &stream
        .info()
        .await
        .map_err(|e| nats(&format!("reading stream {}", settings.stream))(e.into()))?
        .config;
    let (subjects, replicas) = (config.subjects.clone(), config.num_replicas.max(1));
    if !subjects.iter().any(|s| covers(s, &settings.input_subject)) {
        return Err(EnsureError::Config(format!(
            "stream {} exists but does not capture the input subject {} (its subjects: {}); \
             add the subject to the stream or choose another --stream",
            settings.stream,
            settings.input_subject,
            subjects.join(", ")
        )));
    }
    let consumer: PullConsumer = stream
        .get_or_create_consumer(
            &settings.worker_id,
            pull::Config {
                durable_name: Some(settings.worker_id.clone()),
                description: Some("nats-fs-worker job runners".to_owned()),
                ack_policy: AckPolicy::Explicit,
                deliver_policy: DeliverPolicy::All,
                filter_subject: settings.input_subject.clone(),
                ack_wait: settings.ack_wait,
                max_deliver: settings.max_deliver,
                ..Default::default()
            },
        )
        .await
        .map_err(|e| nats(&format!("setting up consumer {}", settings.worker_id))(e.into()))?;
    let config = &consumer.cached_info().config;
    if config.filter_subject != settings.input_subject || config.ack_policy != AckPolicy::Explicit {
        return Err(EnsureError::Config(format!(
            "consumer {} on stream {} exists with filter {:?} and ack policy {:?}; it needs filter {:?} \
             and explicit acks: delete it or choose another --id",
            settings.worker_id, settings.stream, config.filter_subject, config.ack_policy, settings.input_subject
        )));
    }
    if config.ack_wait != settings.ack_wait || config.max_deliver != settings.max_deliver {
        warn!(
            "consumer {} already exists with ack wait {} and max deliver {}; using those, not the flags \
             (ack wait {}, max deliver {}). Update or delete the consumer to change them.",
            settings.worker_id,
            humantime::format_duration(config.ack_wait),
            config.max_deliver,
            humantime::format_duration(settings.ack_wait),
            settings.max_deliver
        );
    }
    Ok(Intake {
        replicas,
        ack_wait: config.ack_wait,
        // -1 (unlimited) on a consumer someone else made: never give up.
        max_deliver: if config.max_deliver > 0 {
            config.max_deliver
        } else {
            i64::MAX
        },
        consumer,
    })
}

/// Whether stream subject `pattern` captures every subject `subject` stands for.
fn covers(pattern: &str, subject: &str) -> bool {
    let mut pattern = pattern.split('.');
    let mut subject = subject.split('.');
    loop {
        match (pattern.next(), subject.next()) {
            (None, None) | (Some(">"), Some(_)) => return true,
            (Some("*"), Some(token)) if token != ">" => {}
            (Some(p), Some(s)) if p == s => {}
            _ => return false,
        }
    }
}

/// Sets up the stream and consumer, waiting (and saying so) while NATS is unreachable.
/// `Ok(None)` when shutdown was requested meanwhile.
pub async fn ensure_patiently(
    settings: &Settings,
    js: &jetstream::Context,
    shutdown: &mut watch::Receiver<Shutdown>,
) -> anyhow::Result<Option<Intake>> {
    patiently(shutdown, "NATS JetStream", || ensure(settings, js)).await
}

/// Runs `attempt` until it succeeds, waiting (and saying for `what`) while NATS is unreachable;
/// a configuration problem ends it. `Ok(None)` when shutdown was requested meanwhile.
pub async fn patiently<T, F: std::future::Future<Output = Result<T, EnsureError>>>(
    shutdown: &mut watch::Receiver<Shutdown>,
    what: &str,
    mut attempt: impl FnMut() -> F,
) -> anyhow::Result<Option<T>> {
    let mut backoff = Backoff::new(Duration::from_millis(250), Duration::from_secs(10));
    loop {
        let attempted = tokio::select! {
            attempted = attempt() => attempted,
            _ = shutdown.wait_for(|s| *s != Shutdown::Run) => return Ok(None),
        };
        match attempted {
            Ok(done) => return Ok(Some(done)),
            Err(EnsureError::Config(problem)) => anyhow::bail!(problem),
            Err(EnsureError::Nats(problem)) => warn!(
                retry_in_ms = backoff.next_ms(),
                "waiting for {what}: {problem}"
            ),
        }
        tokio::select! {
            () = sleep(backoff.pause()) => {}
            _ = shutdown.wait_for(|s| *s != Shutdown::Run) => return Ok(None),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::covers;

    #[test]
    fn subject_coverage() {
        assert!(covers("jobs.pending", "jobs.pending"));
        assert!(covers("jobs.*", "jobs.pending"));
        assert!(covers("jobs.>", "jobs.pending.x"));
        assert!(covers(">", "jobs.pending"));
        assert!(covers("jobs.>", "jobs.*"));
        assert!(!covers("jobs.*", "jobs.pending.x"));
        assert!(!covers("jobs.pending", "jobs.*"));
        assert!(!covers("jobs.*", "jobs.>"));
        assert!(!covers("other", "jobs.pending"));
        assert!(!covers("jobs.pending.x", "jobs.pending"));
    }
}
