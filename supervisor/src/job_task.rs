//! One job message, from delivery to settlement: decode and validate the request, recognise a
//! redelivery of a job that already finished, make sure no other delivery of the same id runs
//! (here or, through [`crate::lock`], on another host), run it while keeping its lease with
//! progress acks, then publish the result and ack — or nak, terminate, or leave it, per
//! [`decide`].

use std::collections::HashMap;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use nats_fs::job::{JobId, JobRequest, RequestError};
use nats_fs::manifest::Manifest;
use nats_fs::protocol::CancelMode;
use nats_fs::{JobOutcome, ResultMessage, Status};
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit};
use tokio::task::JoinHandle;
use tokio::time::{sleep, sleep_until, timeout, Instant};
use tracing::{debug, error, info, info_span, warn, Instrument, Span};

use crate::backoff::Backoff;
use crate::config::Settings;
use crate::events::{JobEvents, JobState};
use crate::execute::{execute, Env, JobRun};
use crate::identity::Identities;
use crate::lock::{Acquired, JobLock, Locks, RefreshError};
use crate::logging::event;
use crate::outbox::Outbox;
use crate::reaper::Reaper;
use crate::settle::{decide, Ack, Decision};
use crate::until;
use crate::Shutdown;

/// Everything a job task shares with the rest of the supervisor.
#[derive(Debug)]
pub struct Ctx {
    pub settings: Settings,
    pub client: async_nats::Client,
    pub outbox: Outbox,
    pub running: Running,
    /// systemd, told how the supervisor is doing.
    pub notifier: crate::notify::Notifier,
    /// Job lifecycle events for controllers.
    pub events: crate::events::Events,
    /// Counters, for `/metrics` and the service API.
    pub metrics: Arc<crate::metrics::Metrics>,
    pub reaper: Arc<Reaper>,
    pub identities: Identities,
    pub locks: Locks,
    /// The consumer's ack wait and max deliver as the server has them (an existing consumer
    /// may differ from the flags).
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub shutdown: watch::Receiver<Shutdown>,
}

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
    fn register(
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
struct Registered<'a> {
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

/// Handles one delivered message to the end. Every log line inside carries the job's id,
/// attempt and stream sequence. `slot` is the pull loop's permit for this job: it is given
/// back as soon as the message is settled, so the next job is asked for while this one's
/// leftovers are cleared.
pub async fn handle(ctx: Arc<Ctx>, msg: jetstream::Message, slot: OwnedSemaphorePermit) {
    let received = Instant::now();
    let (delivered, seq) = match msg.info() {
        Ok(info) => (
            u64::try_from(info.delivered).unwrap_or(1),
            info.stream_sequence,
        ),
        Err(e) => {
            warn!("ignoring a message that is not a JetStream delivery: {e}");
            return;
        }
    };
    if delivered > 1 {
        ctx.metrics.redelivered();
    }
    let span = info_span!("job", id = tracing::field::Empty, attempt = delivered, seq);
    process(ctx, Arc::new(msg), delivered, seq, received, slot)
        .instrument(span)
        .await;
}

async fn process(
    ctx: Arc<Ctx>,
    msg: Arc<jetstream::Message>,
    delivered: u64,
    seq: u64,
    received: Instant,
    slot: OwnedSemaphorePermit,
) {
    let request = match JobRequest::decode(&msg.payload) {
        Ok(request) => request,
        Err(rejected) => return reject(&ctx, &msg, &rejected, delivered, seq).await,
    };
    Span::current().record("id", request.id.as_str());
    if republished(&ctx, &msg, &request.id, delivered, seq).await {
        return;
    }
    let (tx, mut rx) = mpsc::channel(4);
    let events = ctx.events.job(request.id.as_str(), seq, delivered);
    // One run per id: not beside another delivery of it here...
    let registered = match ctx
        .running
        .register(seq, &request.id, tx.clone(), events.clone())
    {
        Ok(registered) => registered,
        Err(other) => {
            let why = format!(
                "job {} is already running here (stream sequence {other})",
                request.id
            );
            return busy(&ctx, &msg, &request.id, why, delivered, seq).await;
        }
    };
    // ...nor on another host that shares the jobs folder.
    let mut lock = match ctx.locks.acquire(request.id.as_str(), seq, delivered).await {
        Acquired::Held(lock) => lock,
        Acquired::Busy(who) => {
            let why = format!("job {} {who}", request.id);
            return busy(&ctx, &msg, &request.id, why, delivered, seq).await;
        }
        Acquired::Failed(why) => {
            ctx.metrics.host_fault();
            let decision = decide(
                request.id.as_str(),
                JobOutcome::fault(why),
                delivered,
                ctx.max_deliver,
                false,
            );
            return carry_out(&ctx, &msg, decision, &request.id, delivered, seq).await;
        }
    };
    info!(event = event::JOB_STARTED, "job started");
    events.started();
    let job = JobRun {
        settings: &ctx.settings,
        request: &request,
        attempt: delivered,
        stream_sequence: Some(seq),
        tag: seq.to_string(),
        events,
    };
    let env = Env {
        reaper: &ctx.reaper,
        identities: &ctx.identities,
    };
    let execution = execute(&job, env, &mut rx);
    let lease = Lease {
        ack_wait: ctx.ack_wait,
        received,
        control: &tx,
        renew: Renewals {
            msg: msg.clone(),
            locks: &ctx.locks,
            lock: lock.as_mut(),
            seq,
            attempt: delivered,
        },
    };
    let ((end, leftovers), lease_lost) = lease.keep(execution).await;
    if matches!(end, JobOutcome::Fault { .. }) {
        ctx.metrics.host_fault();
    }
    let decision = decide(
        request.id.as_str(),
        end,
        delivered,
        ctx.max_deliver,
        lease_lost,
    );
    let settled = matches!(decision, Decision::Publish { .. });
    carry_out(&ctx, &msg, decision, &request.id, delivered, seq).await;
    // Settled (or handed back), and results/ is final: the id may run again, here or
    // elsewhere (a settled job's lock is stale by now), and the slot may take the next job
    // while this one's leftovers go; its identity is only given back once they are gone.
    if let (Some(lock), false) = (lock, settled) {
        ctx.locks.release(lock).await;
    }
    drop(registered);
    drop(slot);
    leftovers.clear().await;
}

/// Republishes the result of an earlier attempt at this very delivery, if one finished (only
/// the ack was lost): true when it did, and the message is settled.
async fn republished(
    ctx: &Arc<Ctx>,
    msg: &jetstream::Message,
    id: &JobId,
    delivered: u64,
    seq: u64,
) -> bool {
    let earlier = {
        let job_dir = ctx.settings.jobs_dir.join(id.as_str());
        let ctx = ctx.clone();
        let id = id.clone();
        tokio::task::spawn_blocking(move || already_finished(&job_dir, &id, seq, &ctx.settings))
            .await
            .ok()
            .flatten()
    };
    if let Some(manifest) = earlier {
        info!(
            event = event::RESULT_REPUBLISHED,
            status = %manifest.status,
            "attempt {} already finished this delivery; republishing its result instead of running it again",
            manifest.attempt
        );
        let result = Box::new(ResultMessage::from_manifest(&manifest));
        let decision = Decision::Publish {
            ack: crate::settle::ack_for(result.status),
            result,
            dead_letter: None,
        };
        carry_out(ctx, msg, decision, id, delivered, seq).await;
        return true;
    }
    false
}

/// Hands back a delivery of a job that is running elsewhere (see [`decide`]).
async fn busy(
    ctx: &Ctx,
    msg: &jetstream::Message,
    id: &JobId,
    why: String,
    delivered: u64,
    seq: u64,
) {
    let decision = decide(
        id.as_str(),
        JobOutcome::busy(why),
        delivered,
        ctx.max_deliver,
        false,
    );
    carry_out(ctx, msg, decision, id, delivered, seq).await;
}

/// What a lease renews: the message, with progress acks, and the id's lock, when one is held.
/// [`Renewals`] talks to NATS; the tests answer as they please, under paused time.
trait Renew {
    /// Sends a progress ack and waits for the server's confirmation. The lease runs it as a
    /// task of its own, so it borrows nothing.
    fn progress(&self) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static;
    /// How often the lock needs refreshing; `None` without a lock (or one that never expires).
    fn refresh_every(&self) -> Option<Duration>;
    /// Refreshes the lock.
    fn refresh(&mut self) -> impl std::future::Future<Output = Result<(), RefreshError>>;
}

/// The renewals of a delivered message and its id's lock.
struct Renewals<'a> {
    msg: Arc<jetstream::Message>,
    locks: &'a Locks,
    lock: Option<&'a mut JobLock>,
    seq: u64,
    attempt: u64,
}

impl Renew for Renewals<'_> {
    fn progress(&self) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        let msg = self.msg.clone();
        async move {
            msg.double_ack_with(AckKind::Progress)
                .await
                .map_err(|e| e.to_string())
        }
    }

    fn refresh_every(&self) -> Option<Duration> {
        self.lock.as_ref()?;
        self.locks.refresh_every()
    }

    async fn refresh(&mut self) -> Result<(), RefreshError> {
        match self.lock.as_deref_mut() {
            Some(held) => self.locks.refresh(held, self.seq, self.attempt).await,
            None => Ok(()),
        }
    }
}

/// What keeps a running job's message (and its id's lock) ours.
struct Lease<'a, R> {
    /// The consumer's ack wait.
    ack_wait: Duration,
    /// When the message arrived: the server started its timer a little before.
    received: Instant,
    /// Where the job is told to stop when the lease is lost.
    control: &'a mpsc::Sender<CancelMode>,
    renew: R,
}

impl<R: Renew> Lease<'_, R> {
    /// Drives the job while keeping its lease: a progress ack every third of the ack wait,
    /// each confirmed by the server, and the id's lock refreshed as often as its bucket needs.
    /// If no confirmation has been seen for nearly an ack wait (the connection is down), the
    /// server is about to hand the job to someone else; if the lock was taken by someone else,
    /// someone else runs it already: either way the job is stopped here at once rather than
    /// run twice. Returns how the job ended, and whether the lease was lost.
    async fn keep<T>(mut self, execution: impl std::future::Future<Output = T>) -> (T, bool) {
        let ack_wait = self.ack_wait;
        let every = ack_wait / 3;
        let margin = (ack_wait / 10).max(Duration::from_millis(200));
        let mut confirmed = self.received;
        let mut next_progress = self.received + every;
        let mut in_flight: Option<JoinHandle<Option<Instant>>> = None;
        let refresh_every = self.renew.refresh_every();
        let mut next_refresh = refresh_every.map(|every| Instant::now() + every);
        let mut lease_lost = false;
        tokio::pin!(execution);
        loop {
            let expires = confirmed + ack_wait - margin;
            tokio::select! {
                end = &mut execution => {
                    if let Some(task) = in_flight {
                        task.abort();
                    }
                    return (end, lease_lost);
                }
                () = sleep_until(next_progress), if in_flight.is_none() => {
                    let ack = self.renew.progress();
                    in_flight = Some(tokio::spawn(async move {
                        let sent = Instant::now();
                        match timeout(every, ack).await {
                            Ok(Ok(())) => Some(sent),
                            Ok(Err(e)) => { debug!("progress ack failed: {e}"); None }
                            Err(_) => { debug!("progress ack not confirmed in time"); None }
                        }
                    }));
                }
                done = finished(&mut in_flight), if in_flight.is_some() => {
                    in_flight = None;
                    if let Ok(Some(sent)) = done {
                        confirmed = confirmed.max(sent);
                        next_progress = sent + every;
                    } else {
                        // Not confirmed: try again soon, but not in a tight loop.
                        next_progress = soon(every);
                    }
                }
                () = until(next_refresh), if !lease_lost => {
                    let every = refresh_every.unwrap_or(ack_wait / 3);
                    match timeout(every, self.renew.refresh()).await {
                        Ok(Ok(())) => next_refresh = Some(Instant::now() + every),
                        Ok(Err(RefreshError::Lost)) => {
                            lease_lost = true;
                            error!(event = event::LOCK_LOST, "lost this job's lock to another host: stopping it so that it does not run twice");
                            let _ = self.control.try_send(CancelMode::AbortNow);
                        }
                        Ok(Err(RefreshError::Failed(e))) => {
                            debug!("refreshing the job's lock: {e}");
                            next_refresh = Some(soon(every));
                        }
                        Err(_) => {
                            debug!("refreshing the job's lock: no answer in time");
                            next_refresh = Some(soon(every));
                        }
                    }
                }
                () = sleep_until(expires), if !lease_lost => {
                    lease_lost = true;
                    error!(
                        event = event::LEASE_LOST,
                        unconfirmed_ms = u64::try_from(confirmed.elapsed().as_millis()).unwrap_or(u64::MAX),
                        ack_wait_ms = u64::try_from(ack_wait.as_millis()).unwrap_or(u64::MAX),
                        "lost the lease on this job (no progress ack confirmed within the ack wait): stopping it so that it does not run twice"
                    );
                    let _ = self.control.try_send(CancelMode::AbortNow);
                }
            }
        }
    }
}

/// When to try again after a renewal that runs every `every` did not work: soon, but not in
/// a tight loop.
fn soon(every: Duration) -> Instant {
    Instant::now() + (every / 4).max(Duration::from_millis(100))
}

/// Waits for an in-flight task; pending forever when there is none.
async fn finished<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

/// The manifest of an earlier attempt at this very delivery (same stream sequence), if it
/// recorded a final status and no job can have forged it (see [`crate::results`]): the job
/// ran to its end and only the ack was lost.
fn already_finished(
    job_dir: &std::path::Path,
    id: &JobId,
    seq: u64,
    settings: &Settings,
) -> Option<Manifest> {
    match crate::results::believable_manifest(job_dir, &settings.pool) {
        Ok(Some(manifest))
            if manifest.stream_sequence == Some(seq) && manifest.job_id == id.as_str() =>
        {
            Some(manifest)
        }
        Ok(_) => None,
        Err(why) => {
            debug!("not believing the result.json already in results/: {why}");
            None
        }
    }
}

/// A payload that fails contract §2: never touches the disk, never runs, never comes back.
async fn reject(
    ctx: &Ctx,
    msg: &jetstream::Message,
    rejected: &RequestError,
    delivered: u64,
    seq: u64,
) {
    warn!(event = event::JOB_REJECTED, reason = %rejected, "rejected a job request");
    let reason = rejected.to_string();
    if let Some(id) = rejected.id() {
        Span::current().record("id", id.as_str());
        let decision = Decision::Publish {
            result: Box::new(ResultMessage {
                attempt: Some(delivered),
                ..ResultMessage::error(id.as_str(), reason.clone())
            }),
            ack: Ack::Term,
            dead_letter: Some(reason),
        };
        carry_out(ctx, msg, decision, id, delivered, seq).await;
    } else {
        dead_letter(ctx, msg, &reason, delivered, seq).await;
        settle(ctx, msg, Ack::Term).await;
    }
}

/// Publishes, dead-letters and acks as decided.
async fn carry_out(
    ctx: &Ctx,
    msg: &jetstream::Message,
    decision: Decision,
    id: &JobId,
    delivered: u64,
    seq: u64,
) {
    match decision {
        Decision::Publish {
            result,
            ack,
            dead_letter: reason,
        } => {
            ctx.events.finished((id.as_str(), seq, delivered), &result);
            ctx.metrics
                .finished(result.status, result.duration_ms.map(Duration::from_millis));
            let level_ok = matches!(result.status, Status::Success);
            if level_ok {
                info!(event = event::JOB_FINISHED, status = %result.status, exit_code = result.exit_code, "job finished");
            } else {
                warn!(event = event::JOB_FINISHED, status = %result.status, exit_code = result.exit_code, reason = result.reason.map(nats_fs::manifest::Reason::as_str), error = result.error.as_deref(), "job finished");
            }
            if !publish_result(ctx, id, seq, &result).await {
                warn!(event = event::RESULT_UNPUBLISHED, "the result could not be published before shutdown; the job will be redelivered and its result republished");
                return;
            }
            if let Some(reason) = reason {
                dead_letter(ctx, msg, &reason, delivered, seq).await;
            }
            settle(ctx, msg, ack).await;
        }
        Decision::Retry { delay, why } => {
            if delay.is_zero() {
                info!(
                    event = event::JOB_HANDED_BACK,
                    "handing the job back for redelivery: {why}"
                );
            } else {
                warn!(
                    event = event::JOB_RETRY_LATER,
                    retry_in_ms = u64::try_from(delay.as_millis()).unwrap_or(u64::MAX),
                    "job could not run here: {why}"
                );
            }
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                warn!("nak failed ({e}); the job will be redelivered after the ack wait");
            }
        }
        Decision::Leave { why } => {
            warn!(
                event = event::JOB_LEFT,
                "leaving the job to its redelivery: {why}"
            );
        }
    }
}

/// Publishes the result on `{output}.{id}` with `Nats-Msg-Id: {id}-{seq}`, retrying through a
/// disconnection. Gives up only when told to stop at once.
async fn publish_result(ctx: &Ctx, id: &JobId, seq: u64, result: &ResultMessage) -> bool {
    let subject = ctx.settings.result_subject(id.as_str());
    let payload = match serde_json::to_vec(result) {
        Ok(payload) => bytes::Bytes::from(payload),
        Err(e) => {
            error!("encoding the result: {e}");
            return false;
        }
    };
    let mut headers = HeaderMap::new();
    headers.insert("Nats-Msg-Id", format!("{id}-{seq}").as_str());
    ctx.outbox
        .send(
            "publishing the result",
            &ctx.settings.output_subject,
            subject,
            headers,
            payload,
        )
        .await
}

/// Republishes a request on the dead-letter subject, with why in `Nats-Fs-Reason`.
async fn dead_letter(ctx: &Ctx, msg: &jetstream::Message, reason: &str, delivered: u64, seq: u64) {
    let Some(subject) = &ctx.settings.dead_letter_subject else {
        return;
    };
    let mut headers = HeaderMap::new();
    // Header values cannot hold line breaks.
    let reason: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    headers.insert("Nats-Fs-Reason", reason.as_str());
    headers.insert("Nats-Fs-Subject", msg.subject.as_str());
    headers.insert("Nats-Fs-Stream-Sequence", seq.to_string().as_str());
    headers.insert("Nats-Fs-Delivered", delivered.to_string().as_str());
    headers.insert("Nats-Fs-Worker", ctx.settings.worker_id.as_str());
    headers.insert("Nats-Msg-Id", format!("dead-{seq}").as_str());
    let sent = ctx
        .outbox
        .send(
            "publishing the dead letter",
            subject,
            subject.clone(),
            headers,
            msg.payload.clone(),
        )
        .await;
    if sent {
        ctx.metrics.dead_lettered();
        info!(event = event::DEAD_LETTERED, subject = %subject, "republished on the dead-letter subject");
    }
}

/// Acks or terminates, with the server's confirmation, retrying for up to an ack wait. If it
/// never gets through, the message is redelivered and recognised as finished.
async fn settle(ctx: &Ctx, msg: &jetstream::Message, ack: Ack) {
    let kind = match ack {
        Ack::Ack => AckKind::Ack,
        Ack::Term => AckKind::Term,
    };
    let give_up = Instant::now() + ctx.ack_wait;
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
    loop {
        match msg.double_ack_with(kind).await {
            Ok(()) => return,
            Err(e) if Instant::now() >= give_up || *ctx.shutdown.borrow() == Shutdown::Now => {
                warn!(event = event::ACK_UNCONFIRMED, "could not confirm the {ack:?} ({e}); a redelivery will be recognised as finished");
                return;
            }
            Err(e) => debug!("{ack:?} not confirmed yet: {e}"),
        }
        sleep(backoff.pause()).await;
    }
}

#[cfg(test)]
mod tests {
    //! The lease's timing, under paused time: tokio's clock only moves when every task waits,
    //! and then straight to the next timer, so these run at once and to the millisecond.

    use std::collections::VecDeque;

    use super::*;

    /// How a fake renewal answers.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Ok,
        Fail,
        /// Never: the server does not answer.
        Hang,
        /// The lock was taken by another delivery.
        Lost,
    }

    /// Renewals that record when they were asked for and answer from a script (`Ok` once
    /// it runs out).
    #[derive(Debug, Clone)]
    struct Fake {
        start: Instant,
        acks: Arc<Mutex<Vec<Duration>>>,
        ack_answers: Arc<Mutex<VecDeque<Answer>>>,
        refreshes: Arc<Mutex<Vec<Duration>>>,
        refresh_answers: Arc<Mutex<VecDeque<Answer>>>,
        refresh_every: Option<Duration>,
    }

    impl Fake {
        fn new(acks: &[Answer]) -> Self {
            Self {
                start: Instant::now(),
                acks: Arc::default(),
                ack_answers: Arc::new(Mutex::new(acks.iter().copied().collect())),
                refreshes: Arc::default(),
                refresh_answers: Arc::default(),
                refresh_every: None,
            }
        }

        fn with_lock(mut self, every: Duration, answers: &[Answer]) -> Self {
            self.refresh_every = Some(every);
            self.refresh_answers = Arc::new(Mutex::new(answers.iter().copied().collect()));
            self
        }

        /// When progress acks were sent, in seconds since the start.
        fn acks(&self) -> Vec<f64> {
            seconds(&self.acks.lock().unwrap())
        }

        fn refreshes(&self) -> Vec<f64> {
            seconds(&self.refreshes.lock().unwrap())
        }
    }

    fn seconds(at: &[Duration]) -> Vec<f64> {
        at.iter().map(Duration::as_secs_f64).collect()
    }

    fn next(answers: &Mutex<VecDeque<Answer>>) -> Answer {
        answers.lock().unwrap().pop_front().unwrap_or(Answer::Ok)
    }

    impl Renew for Fake {
        fn progress(
            &self,
        ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
            self.acks.lock().unwrap().push(self.start.elapsed());
            let answer = next(&self.ack_answers);
            async move {
                match answer {
                    Answer::Ok => Ok(()),
                    Answer::Fail | Answer::Lost => Err("no responders".to_owned()),
                    Answer::Hang => std::future::pending().await,
                }
            }
        }

        fn refresh_every(&self) -> Option<Duration> {
            self.refresh_every
        }

        async fn refresh(&mut self) -> Result<(), RefreshError> {
            self.refreshes.lock().unwrap().push(self.start.elapsed());
            match next(&self.refresh_answers) {
                Answer::Ok => Ok(()),
                Answer::Fail => Err(RefreshError::Failed("no responders".to_owned())),
                Answer::Lost => Err(RefreshError::Lost),
                Answer::Hang => std::future::pending().await,
            }
        }
    }

    /// Keeps a lease of `ack_wait` (the message received now) on a job that ends after `runs`
    /// or when it is told to stop: the stop request, if any, when it came, and whether the
    /// lease was lost.
    async fn keep(
        fake: &Fake,
        ack_wait: Duration,
        runs: Duration,
    ) -> (Option<(CancelMode, f64)>, bool) {
        let (tx, mut rx) = mpsc::channel(4);
        let lease = Lease {
            ack_wait,
            received: Instant::now(),
            control: &tx,
            renew: fake.clone(),
        };
        let start = fake.start;
        let job = async move {
            tokio::select! {
                () = sleep(runs) => None,
                mode = rx.recv() => mode.map(|m| (m, start.elapsed().as_secs_f64())),
            }
        };
        lease.keep(job).await
    }

    const S30: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn progress_acks_come_every_third_of_the_ack_wait() {
        let fake = Fake::new(&[]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(95)).await;
        assert_eq!((stopped, lost), (None, false));
        assert_eq!(
            fake.acks(),
            [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_progress_ack_is_retried_after_a_quarter_period() {
        let fake = Fake::new(&[Answer::Fail]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(35)).await;
        assert_eq!((stopped, lost), (None, false));
        // 10 fails; 12.5 (10 + 10/4) is confirmed, so the next is a period after that.
        assert_eq!(fake.acks(), [10.0, 12.5, 22.5, 32.5]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_progress_ack_counts_as_failed_after_a_period() {
        let fake = Fake::new(&[Answer::Hang]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(35)).await;
        // Given up at 20, retried at 22.5 and confirmed: within the 27 s (30 − 3) it had.
        assert_eq!((stopped, lost), (None, false));
        assert_eq!(fake.acks(), [10.0, 22.5, 32.5]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_lost_a_margin_before_the_ack_wait_without_a_confirmation() {
        let fake = Fake::new(&[Answer::Hang; 10]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(600)).await;
        // Nothing confirmed since the message came: lost at 30 − 30/10, the job stopped at once.
        assert_eq!(stopped, Some((CancelMode::AbortNow, 27.0)));
        assert!(lost);
        assert_eq!(fake.acks(), [10.0, 22.5]);

        // The margin is at least 200 ms, and failed acks are retried no faster than 100 ms.
        let fake = Fake::new(&[Answer::Fail; 10]);
        let (stopped, lost) = keep(&fake, Duration::from_secs(1), Duration::from_secs(60)).await;
        assert_eq!(
            stopped.map(|(mode, at)| (mode, (at * 1000.0).round())),
            Some((CancelMode::AbortNow, 800.0))
        );
        assert!(lost);
        let acks: Vec<f64> = fake.acks().iter().map(|s| (s * 1000.0).round()).collect();
        // (tokio's timers fire on whole milliseconds: a third of a second is 334 ms.)
        assert_eq!(acks, [334.0, 434.0, 534.0, 634.0, 734.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_counts_from_the_last_confirmation() {
        // Confirmed at 10, then nothing: lost at 10 + 27.
        let fake = Fake::new(&[Answer::Ok, Answer::Hang, Answer::Hang, Answer::Hang]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(600)).await;
        assert_eq!(stopped, Some((CancelMode::AbortNow, 37.0)));
        assert!(lost);
        assert_eq!(fake.acks(), [10.0, 20.0, 32.5]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lock_is_refreshed_retried_soon_and_a_lost_lock_stops_the_job_at_once() {
        let fake = Fake::new(&[]).with_lock(
            Duration::from_secs(4),
            &[Answer::Ok, Answer::Fail, Answer::Hang, Answer::Lost],
        );
        let (stopped, lost) = keep(&fake, Duration::from_secs(60), Duration::from_secs(600)).await;
        // 4 refreshed; 8 fails, retried a quarter period later (9); 9 hangs until 13, retried
        // at 14 and lost.
        assert_eq!(fake.refreshes(), [4.0, 8.0, 9.0, 14.0]);
        assert_eq!(stopped, Some((CancelMode::AbortNow, 14.0)));
        assert!(lost);
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_ends_ends_the_lease() {
        let fake = Fake::new(&[]).with_lock(Duration::from_secs(4), &[]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(5)).await;
        assert_eq!((stopped, lost), (None, false));
        assert!(fake.acks().is_empty());
        assert_eq!(fake.refreshes(), [4.0]);
        assert_eq!(fake.start.elapsed(), Duration::from_secs(5));
    }
}
