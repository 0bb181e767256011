//! One job message, from delivery to settlement: decode and validate the request (rejecting a
//! payload that fails), recognise a redelivery of a job that already finished
//! ([`crate::redelivery`]), make sure no other delivery of the same id runs (here, through
//! [`crate::running`], or, through [`crate::lock`], on another host), run it
//! ([`crate::execute`]) while keeping its lease with progress acks ([`crate::lease`]), then
//! publish the result and ack — or nak, terminate, or leave it, per [`decide`]
//! ([`crate::settle`]).

use std::sync::Arc;

use async_nats::jetstream;
use nats_fs::job::{JobId, JobRequest, RequestError};
use nats_fs::{JobOutcome, ResultMessage};
use tokio::sync::{mpsc, OwnedSemaphorePermit};
use tokio::time::Instant;
use tracing::{info, info_span, warn, Instrument, Span};

use crate::ctx::Ctx;
use crate::execute::{execute, Env, JobRun};
use crate::lease::{Lease, Renewals};
use crate::lock::Acquired;
use crate::logging::event;
use crate::redelivery::republished;
use crate::settle::{acknowledge, carry_out, dead_letter, decide, publish, Ack, Decision};

/// Handles one delivered message to the end. Every log line inside carries the job's id,
/// attempt and stream sequence. `slot` is the pull loop's permit for this job: it is given
/// back as soon as the result is published (or the message handed back), so the next job is
/// asked for while this one's manifest is flushed, its message acked and its leftovers
/// cleared.
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
        drive: &ctx.drive,
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
    let unacked = publish(&ctx, &msg, decision, &request.id, delivered, seq).await;
    // Published (or handed back), and results/ is final: the id's running entry goes now.
    // A new message for the id is then judged by the lock alone, which names this message
    // until the ack takes it out of the stream (a settled job's lock is left to go stale):
    // busy, and retried, while this one's manifest is flushed. Without a lock bucket it may
    // start at once; if it empties results/ during the flush, the flush may log
    // `manifest_not_flushed`. The slot may take the next job while this one's manifest is
    // flushed and acked and its leftovers go; its identity is given back once they are gone,
    // which does not wait for the ack.
    if let (Some(lock), false) = (lock, settled) {
        ctx.locks.release(lock).await;
    }
    drop(registered);
    drop(slot);
    let settling = async {
        if let Some(unacked) = unacked {
            unacked.finish().await;
        }
    };
    tokio::join!(settling, leftovers.clear());
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
    info!(event = event::JOB_BUSY, "{why}");
    let decision = decide(
        id.as_str(),
        JobOutcome::busy(why),
        delivered,
        ctx.max_deliver,
        false,
    );
    carry_out(ctx, msg, decision, id, delivered, seq).await;
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
        acknowledge(ctx, msg, Ack::Term).await;
    }
}
