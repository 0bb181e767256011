//! One run per job id at a time, on every host that shares the jobs folder: a lease on the id
//! in a JetStream key-value bucket (`--lock-bucket`, `nats-fs-running` by default).
//!
//! Two runs of one id would share its folder: the second would empty `results/` under the
//! first, and their logs, artifacts and manifests would mix. A delivery takes the key named
//! after the id with a create (which fails if the key is live) before it touches the folder,
//! and refreshes it while the job runs. The bucket's `max_age` is the lease: a host that
//! crashed stops refreshing, and its key disappears one lease later — about when the job's
//! message is redelivered. A delivery that finds the key taken is handed back with a delay,
//! and ends as a dead letter if it is still waiting after `--max-deliver` deliveries.
//!
//! A job that ends does not delete its key (one write per job is enough): the key names the
//! stream sequence of the message it answered, and once that message has left the work-queue
//! stream (acked or terminated) the key is stale, and the next delivery of the id takes it
//! over. A job handed back for another delivery (a host fault, a drain) deletes its key, since
//! its message stays in the stream.
//!
//! On one host, the same rule is kept without a round trip by the registry of running jobs;
//! the bucket is what other hosts see. A key left by this very supervisor's previous life (the
//! same host and workspaces folder, which only one live supervisor can hold) is taken over at
//! once instead of waited out.

use std::time::Duration;

use async_nats::jetstream::kv::{self, CreateErrorKind, UpdateErrorKind};
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, stream::StorageType};
use serde::{Deserialize, Serialize};
use tracing::{debug, info};

use crate::config::Settings;
use crate::intake::EnsureError;

/// Who holds a job's key: the value stored under it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
struct Holder {
    host: String,
    worker: String,
    workspaces: String,
    /// Random per supervisor start: tells this life from an earlier one on the same host.
    instance: String,
    #[serde(default)]
    seq: Option<u64>,
    #[serde(default)]
    attempt: u64,
}

/// The locks of one supervisor.
#[derive(Debug)]
pub struct Locks {
    store: Option<kv::Store>,
    /// The job stream, to tell whether a holder's message is still there.
    jobs: Option<jetstream::stream::Stream>,
    /// How long a key lives without a refresh.
    lease: Duration,
    me: Holder,
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
    /// Someone else runs the job: who.
    Busy(String),
    /// The bucket could not be asked: a fault of the host or of NATS.
    Failed(String),
}

/// Why a refresh did not work.
#[derive(Debug)]
pub enum RefreshError {
    /// The key was taken by someone else: the lease is gone.
    Lost,
    /// NATS did not answer; try again.
    Failed(String),
}

impl Locks {
    /// Opens (or creates) the bucket. Its lease is the bucket's `max_age`: set to the ack wait
    /// when this supervisor creates it, or whatever the bucket already has. A bucket made here
    /// has as many replicas as the job stream: losing a node must not stop jobs from running.
    pub async fn setup(
        settings: &Settings,
        js: &jetstream::Context,
        ack_wait: Duration,
        replicas: usize,
    ) -> Result<Self, EnsureError> {
        let me = holder(settings);
        let Some(bucket) = settings.lock_bucket.as_deref() else {
            return Ok(Self {
                store: None,
                jobs: None,
                lease: Duration::MAX,
                me,
            });
        };
        let jobs = js
            .get_stream(&settings.stream)
            .await
            .map_err(|e| EnsureError::Nats(format!("reading stream {}: {e}", settings.stream)))?;
        // The bucket's stream is made here rather than with `create_key_value`, which first
        // asks for the account's info and cannot read nats-server 2.9's answer. The settings
        // are those NATS gives a key-value bucket: one value per key, rollups, no deletes of
        // messages, direct gets, and `max_age` as the lease.
        js.get_or_create_stream(jetstream::stream::Config {
            name: format!("KV_{bucket}"),
            description: Some("nats-fs-worker: job ids running now (one run per id)".to_owned()),
            subjects: vec![format!("$KV.{bucket}.>")],
            max_messages_per_subject: 1,
            max_age: ack_wait,
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
        if max_age.is_zero() || max_age < Duration::from_secs(1) {
            return Err(EnsureError::Config(format!(
                "the lock bucket {bucket} keeps keys forever (max_age {max_age:?}): a crashed host's \
                 jobs would never run again; give it a max_age (e.g. the ack wait) or choose another --lock-bucket"
            )));
        }
        info!(
            bucket,
            lease_ms = u64::try_from(max_age.as_millis()).unwrap_or(u64::MAX),
            "one run per job id across hosts, through the lock bucket"
        );
        Ok(Self {
            store: Some(store),
            jobs: Some(jobs),
            lease: max_age,
            me,
        })
    }

    /// How often a held key must be refreshed, if there is a bucket.
    pub fn refresh_every(&self) -> Option<Duration> {
        self.store.as_ref().map(|_| self.lease / 3)
    }

    /// Takes the key of job `id` for delivery `seq`.
    pub async fn acquire(&self, id: &str, seq: u64, attempt: u64) -> Acquired {
        let Some(store) = &self.store else {
            return Acquired::Held(None);
        };
        let value = self.value(seq, attempt);
        let taken = match store.create(id, value.clone()).await {
            Ok(revision) => {
                return Acquired::Held(Some(JobLock {
                    key: id.to_owned(),
                    revision,
                }))
            }
            Err(e) if e.kind() == CreateErrorKind::AlreadyExists => e,
            Err(e) => return Acquired::Failed(format!("taking the job's lock: {e}")),
        };
        let entry = match store.entry(id).await {
            Ok(Some(entry)) => entry,
            // Gone meanwhile (expired or released): the next delivery will get it.
            Ok(None) => return Acquired::Busy(format!("its lock was just released ({taken})")),
            Err(e) => return Acquired::Failed(format!("reading the job's lock: {e}")),
        };
        let Ok(holder) = serde_json::from_slice::<Holder>(&entry.value) else {
            return Acquired::Busy(
                "its lock is held by something that is not a nats-fs supervisor".to_owned(),
            );
        };
        if holder.host == self.me.host
            && holder.workspaces == self.me.workspaces
            && holder.instance != self.me.instance
        {
            // Our own previous life: it is dead (we hold its workspaces folder).
            debug!(
                seq = holder.seq,
                "taking over a lock left by this host's previous supervisor"
            );
            return self.take_over(store, id, value, entry.revision).await;
        }
        match self.still_queued(holder.seq).await {
            Ok(false) => {
                // The holder's job was settled: its key is stale.
                return self.take_over(store, id, value, entry.revision).await;
            }
            Ok(true) => {}
            Err(e) => return Acquired::Failed(format!("checking the job's lock: {e}")),
        }
        Acquired::Busy(format!(
            "it is already running on {} (worker {}, stream sequence {})",
            holder.host,
            holder.worker,
            holder.seq.map_or_else(|| "?".to_owned(), |s| s.to_string())
        ))
    }

    /// Replaces a stale key (revision `revision`) with ours.
    async fn take_over(
        &self,
        store: &kv::Store,
        id: &str,
        value: bytes::Bytes,
        revision: u64,
    ) -> Acquired {
        match store.update(id, value, revision).await {
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

    /// Whether the job message `seq` is still in the stream (not yet acked or terminated).
    async fn still_queued(&self, seq: Option<u64>) -> Result<bool, String> {
        let (Some(jobs), Some(seq)) = (&self.jobs, seq) else {
            return Ok(true);
        };
        match jobs.get_raw_message(seq).await {
            Ok(_) => Ok(true),
            Err(e) if e.kind() == RawMessageErrorKind::NoMessageFound => Ok(false),
            Err(e) => Err(e.to_string()),
        }
    }

    /// Renews a held key for another lease.
    pub async fn refresh(
        &self,
        lock: &mut JobLock,
        seq: u64,
        attempt: u64,
    ) -> Result<(), RefreshError> {
        let Some(store) = &self.store else {
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
    /// Best effort, and never for long (NATS may be down): a key that stays expires by itself.
    pub async fn release(&self, lock: JobLock) {
        let Some(store) = &self.store else {
            return;
        };
        let deleted = store.delete_expect_revision(&lock.key, Some(lock.revision));
        match tokio::time::timeout(Duration::from_secs(2), deleted).await {
            Ok(Ok(())) => {}
            Ok(Err(e)) => debug!("releasing the job's lock: {e} (it expires by itself)"),
            Err(_) => debug!("releasing the job's lock: no answer (it expires by itself)"),
        }
    }

    fn value(&self, seq: u64, attempt: u64) -> bytes::Bytes {
        let holder = Holder {
            seq: Some(seq),
            attempt,
            ..self.me.clone()
        };
        serde_json::to_vec(&holder).unwrap_or_default().into()
    }
}

fn holder(settings: &Settings) -> Holder {
    Holder {
        host: nix::unistd::gethostname()
            .map(|h| h.to_string_lossy().into_owned())
            .unwrap_or_default(),
        worker: settings.worker_id.clone(),
        workspaces: settings.workspaces_dir.display().to_string(),
        instance: format!("{:016x}", rand_u64()),
        seq: None,
        attempt: 0,
    }
}

/// A random number: std seeds every `RandomState` from the kernel's random source.
fn rand_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    std::collections::hash_map::RandomState::new()
        .build_hasher()
        .finish()
}
