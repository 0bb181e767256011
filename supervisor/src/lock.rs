//! One run per job id at a time, on every host that shares the jobs folder: which delivery of
//! an id owns its folder, recorded in a JetStream key-value bucket (`--lock-bucket`,
//! `nats-fs-running` by default).
//!
//! Two runs of one id would share its folder: the second would empty `results/` under the
//! first, and their logs, artifacts and manifests would mix. Before a delivery touches the
//! folder it takes the key named after the id with a create (which fails if the key exists).
//! A key that exists names the stream sequence of the delivery that holds it, and is taken
//! over when that delivery cannot be running any more:
//!
//! - it is the same message, delivered again: the server redelivers only once the holder lost
//!   its lease on it, and a holder stops its job before its lease runs out (see
//!   [`crate::lease`]), or it crashed;
//! - its message has left the work-queue stream: the holder's job was settled (acked or
//!   terminated). So a job that ends leaves its key to go stale rather than spend a write on
//!   deleting it; only a job handed back for another delivery deletes it.
//!
//! Otherwise the delivery is handed back with a delay, and ends as a dead letter if it is
//! still waiting after `--max-deliver` deliveries. Takeovers are compare-and-set on the key's
//! revision, so two deliveries never both win. The bucket's `max_age` only clears old keys;
//! a job that runs longer than that refreshes its key well before it would go.
//!
//! On one host, the same rule is kept without a round trip by the registry of running jobs;
//! the bucket is what other hosts see.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::{RawMessageErrorKind, StorageType};
use async_nats::jetstream::{self};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::config::Settings;
use crate::consumer::EnsureError;

/// How long a key lives without a refresh, in a bucket made here.
const KEY_LIFETIME: Duration = Duration::from_secs(600);

/// Who holds a job's key: the value stored under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    host: String,
    worker: String,
    /// The stream sequence of the holding delivery.
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    attempt: u64,
}

/// The locks of one supervisor.
#[derive(Debug)]
pub struct Locks {
    /// `None` without `--lock-bucket`: every id is ours to run.
    bucket: Option<Bucket>,
    host: String,
    worker: String,
}

/// The lock bucket, and what deciding about its keys needs.
#[derive(Debug)]
struct Bucket {
    store: kv::Store,
    /// The job stream, to tell whether a holder's message is still there.
    jobs: jetstream::stream::Stream,
    /// How long a key lives without a refresh.
    lifetime: Duration,
}

/// A held key.
#[derive(Debug)]
pub struct JobLock {
    key: String,
    revision: u64,
}

/// The outcome of asking for a job's key.
#[derive(Debug)]
pub enum Acquired {
    /// Ours until released (or no bucket is configured).
    Held(Option<JobLock>),
    /// Another delivery runs the job: which.
    Busy(String),
    /// The bucket could not be asked: a fault of the host or of NATS.
    Failed(String),
}

/// Why a refresh did not work.
#[derive(Debug)]
pub enum RefreshError {
    /// The key was taken by another delivery: it is not ours any more.
    Lost,
    /// NATS did not answer; try again.
    Failed(String),
}

impl Locks {
    /// Opens (or creates) the bucket. A bucket made here has as many replicas as the job
    /// stream: losing a node must not stop jobs from running.
    pub async fn setup(
        settings: &Settings,
        js: &jetstream::Context,
        replicas: usize,
    ) -> Result<Self, EnsureError> {
        let host = nats_fs::host_name();
        let worker = settings.worker_id.clone();
        let Some(bucket) = settings.lock_bucket.as_deref() else {
            return Ok(Self {
                bucket: None,
                host,
                worker,
            });
        };
        let jobs = js
            .get_stream(&settings.stream)
            .await
            .map_err(|e| EnsureError::Nats(format!("reading stream {}: {e}", settings.stream)))?;
        // The bucket's stream is made here rather than with `create_key_value`, which first
        // asks for the account's info and cannot read nats-server 2.9's answer. The settings
        // are those NATS gives a key-value bucket: one value per key, rollups, no deletes of
        // messages, direct gets.
        js.get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("nats-fs-worker: job ids running now (one run per id)".to_owned()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: KEY_LIFETIME,
            storage: StorageType::File,
            num_replicas: replicas,
            allow_rollup: true,
            deny_delete: true,
            allow_direct: true,
            discard: jetstream::stream::DiscardPolicy::New,
            ..Default::default()
        })
        .await
        .map_err(|e| EnsureError::Nats(format!("setting up the lock bucket {bucket}: {e}")))?;
        let store = js
            .get_key_value(bucket)
            .await
            .map_err(|e| EnsureError::Nats(format!("opening the lock bucket {bucket}: {e}")))?;
        let mut stream = store.stream.clone();
        let max_age = stream
            .info()
            .await
            .map_err(|e| EnsureError::Nats(format!("reading the lock bucket {bucket}: {e}")))?
            .config
            .max_age;
        let lifetime = if max_age.is_zero() {
            Duration::MAX
        } else {
            max_age
        };
        if lifetime < Duration::from_secs(3) {
            return Err(EnsureError::Config(format!(
                "the lock bucket {bucket} keeps keys for only {max_age:?}: running jobs could not \
                 keep theirs; give it a max_age of minutes or choose another --lock-bucket"
            )));
        }
        info!(
            bucket,
            "one run per job id across hosts, through the lock bucket"
        );
        Ok(Self {
            bucket: Some(Bucket {
                store,
                jobs,
                lifetime,
            }),
            host,
            worker,
        })
    }

    /// How often a held key must be refreshed, if there is a bucket that expires keys.
    pub fn refresh_every(&self) -> Option<Duration> {
        let lifetime = self.bucket.as_ref()?.lifetime;
        (lifetime != Duration::MAX).then_some(lifetime / 3)
    }

    /// Takes the key of job `id` for delivery `seq`.
    pub async fn acquire(&self, id: &str, seq: u64, attempt: u64) -> Acquired {
        let Some(Bucket { store, jobs, .. }) = &self.bucket else {
            return Acquired::Held(None);
        };
        let value = self.value(seq, attempt);
        match store.create(id, value.clone()).await {
            Ok(revision) => {
                return Acquired::Held(Some(JobLock {
                    key: id.to_owned(),
                    revision,
                }))
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => {}
            Err(e) => return Acquired::Failed(format!("taking the job's lock: {e}")),
        }
        let entry = match store.entry(id).await {
            Ok(Some(entry)) => entry,
            // Gone meanwhile (expired or released): the next delivery will get it.
            Ok(None) => return Acquired::Busy("its lock was just released".to_owned()),
            Err(e) => return Acquired::Failed(format!("reading the job's lock: {e}")),
        };
        let Ok(holder) = serde_json::from_slice::<Holder>(&entry.value) else {
            return Acquired::Busy(
                "its lock is held by something that is not a nats-fs supervisor".to_owned(),
            );
        };
        let stale = if holder.seq == Some(seq) {
            // This very message again: its earlier delivery lost its lease (or its host).
            debug!(host = %holder.host, "taking over the lock of an earlier delivery of this message");
            true
        } else {
            match still_queued(jobs, holder.seq).await {
                Ok(queued) => !queued,
                Err(e) => return Acquired::Failed(format!("checking the job's lock: {e}")),
            }
        };
        if !stale {
            return Acquired::Busy(format!(
                "it is already running on {} (worker {}, stream sequence {})",
                holder.host,
                holder.worker,
                holder.seq.map_or_else(|| "?".to_owned(), |s| s.to_string())
            ));
        }
        match store.update(id, value, entry.revision).await {
            Ok(revision) => Acquired::Held(Some(JobLock {
                key: id.to_owned(),
                revision,
            })),
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => {
                Acquired::Busy("another delivery took its lock first".to_owned())
            }
            Err(e) => Acquired::Failed(format!("taking over the job's lock: {e}")),
        }
    }

    /// Renews a held key, so that it outlives the bucket's `max_age`.
    pub async fn refresh(
        &self,
        lock: &mut JobLock,
        seq: u64,
        attempt: u64,
    ) -> Result<(), RefreshError> {
        let Some(Bucket { store, .. }) = &self.bucket else {
            return Ok(());
        };
        match store
            .update(&lock.key, self.value(seq, attempt), lock.revision)
            .await
        {
            Ok(revision) => {
                lock.revision = revision;
                Ok(())
            }
            Err(e) if e.kind() == UpdateErrorKind::WrongLastRevision => Err(RefreshError::Lost),
            Err(e) => Err(RefreshError::Failed(e.to_string())),
        }
    }

    /// Gives the key up (only if it is still ours), for a job whose message stays in the stream
    /// (handed back for another delivery); a settled job's key is simply left to go stale.
    /// Best effort, and never for long (NATS may be down): a key that stays is taken over by
    /// the message's next delivery anyway.
    pub async fn release(&self, lock: JobLock) {
        let Some(Bucket { store, .. }) = &self.bucket else {
            return;
        };
        let deleted = store.delete_expect_revision(&lock.key, Some(lock.revision));
        match tokio::time::timeout(Duration::from_secs(2), deleted).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!("releasing the job's lock: {e}"),
            Err(_) => debug!("releasing the job's lock: no answer"),
        }
    }

    fn value(&self, seq: u64, attempt: u64) -> bytes::Bytes {
        let holder = Holder {
            host: self.host.clone(),
            worker: self.worker.clone(),
            seq: Some(seq),
            attempt,
        };
        serde_json::to_vec(&holder).unwrap_or_default().into()
    }
}

/// Whether job message `seq` is still in the stream `jobs` (not yet acked or terminated); a
/// holder that did not record its sequence is taken to be running.
async fn still_queued(jobs: &jetstream::stream::Stream, seq: Option<u64>) -> Result<bool, String> {
    let Some(seq) = seq else {
        return Ok(true);
    };
    match jobs.get_raw_message(seq).await {
        Ok(_) => Ok(true),
        Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(false),
        Err(e) => Err(e.to_string()),
    }
}
