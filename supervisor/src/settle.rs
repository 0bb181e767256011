//! Settling a job message (contract §6): deciding how, then doing it.
//!
//! Deciding is a pure function, [`decide`], so every row of the table is unit-tested: publish
//! a final result then ack or terminate, nak with a delay to retry a host fault, or leave the
//! message alone when its lease is already lost. `carry_out` does what was decided: it
//! publishes the result (`publish`), then flushes the manifest to the drive, dead-letters the
//! request and acks or terminates (`Unacked::finish`) — or naks.

use std::io;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use async_nats::HeaderMap;
use nats_fs::job::JobId;
use nats_fs::manifest::Reason;
use nats_fs::{JobOutcome, ResultMessage, Status};
use tokio::sync::OwnedSemaphorePermit;
use tokio::time::{sleep, Instant};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::ctx::Ctx;
use crate::logging::event;
use crate::Shutdown;

/// The first retry delay of a host fault; it doubles with every delivery.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest retry delay.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// What to do with a job message once its run is over.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Publish `result`, flush its manifest to the drive, republish the request on the
    /// dead-letter subject when `dead_letter` gives a reason, then `ack`.
    Publish {
        result: Box<ResultMessage>,
        ack: Ack,
        dead_letter: Option<String>,
    },
    /// Nak with this delay so the job runs again (here or on another host).
    Retry { delay: Duration, why: String },
    /// Do nothing: the lease was lost, so the server redelivers (or already has) and a nak
    /// from this stale delivery could disturb the copy running elsewhere.
    Leave { why: String },
}

/// The final acknowledgement of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Done: `+ACK`.
    Ack,
    /// Never again: `+TERM`.
    Term,
}

/// The ack that goes with a final status: `error` terminates, everything else acks.
#[must_use]
pub fn ack_for(status: Status) -> Ack {
    if status == Status::Error {
        Ack::Term
    } else {
        Ack::Ack
    }
}

/// How long to wait before the next delivery after a host fault on delivery `delivered`.
#[must_use]
pub fn retry_delay(delivered: u64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
    Backoff::new(FIRST_RETRY, MAX_RETRY).nth(doublings)
}

/// Decides what to do with a message on its `delivered`-th delivery out of `max_deliver`.
#[must_use]
pub fn decide(
    id: &str,
    end: JobOutcome,
    delivered: u64,
    max_deliver: i64,
    lease_lost: bool,
) -> Decision {
    let last_delivery = i64::try_from(delivered).unwrap_or(i64::MAX) >= max_deliver;
    match end {
        JobOutcome::Final(result) => Decision::Publish {
            ack: ack_for(result.status),
            result,
            dead_letter: None,
        },
        // On the last delivery there is no copy to race: fall through to the final error.
        JobOutcome::Aborted { why } | JobOutcome::Fault { why } if lease_lost && !last_delivery => {
            Decision::Leave { why }
        }
        JobOutcome::Aborted { why } if !last_delivery => Decision::Retry {
            delay: Duration::ZERO,
            why,
        },
        JobOutcome::Fault { why } | JobOutcome::Busy { why } if !last_delivery => Decision::Retry {
            delay: retry_delay(delivered),
            why,
        },
        JobOutcome::Aborted { why } | JobOutcome::Fault { why } | JobOutcome::Busy { why } => {
            let error = format!("gave up after {delivered} of {max_deliver} deliveries; the last one ended with: {why}");
            Decision::Publish {
                // The job itself may be fine: this host (or the hosts it met) could not run it.
                result: Box::new(
                    ResultMessage {
                        attempt: Some(delivered),
                        ..ResultMessage::error(id, error.clone())
                    }
                    .because(Reason::Host),
                ),
                ack: Ack::Term,
                dead_letter: Some(error),
            }
        }
    }
}

/// Publishes, dead-letters and acks as decided.
pub(crate) async fn carry_out(
    ctx: &Ctx,
    msg: &jetstream::Message,
    decision: Decision,
    id: &JobId,
    delivered: u64,
    seq: u64,
) {
    if let Some(unacked) = publish(ctx, msg, decision, id, delivered, seq).await {
        unacked.finish().await;
    }
}

/// The first half of [`carry_out`]: publishes the result, or naks, or leaves the message, as
/// decided. What is left of a published result — flushing its manifest, the dead letter, the
/// ack — is returned, for the caller to finish once it has given back what the job held: the
/// job is over for everyone but the drive.
pub(crate) async fn publish<'a>(
    ctx: &'a Ctx,
    msg: &'a jetstream::Message,
    decision: Decision,
    id: &'a JobId,
    delivered: u64,
    seq: u64,
) -> Option<Unacked<'a>> {
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
                warn!(event = event::JOB_FINISHED, status = %result.status, exit_code = result.exit_code, reason = result.reason.map(Reason::as_str), error = result.error.as_deref(), "job finished");
            }
            if !publish_result(ctx, id, seq, &result).await {
                warn!(event = event::RESULT_UNPUBLISHED, "the result could not be published before shutdown; the job will be redelivered and its result republished");
                return None;
            }
            // Taken before the caller gives the job's slot back, and held until the flush
            // returns (even one given up on): at most `--concurrency` flushes are in flight,
            // and a drive that hangs stops this host from taking jobs instead of piling up
            // threads that wait for it.
            let flush = if result.manifest_file.is_some() {
                let permit = unless_stopping_now(ctx, ctx.flushing.clone().acquire_owned());
                Some(permit.await?.ok()?)
            } else {
                None
            };
            Some(Unacked {
                ctx,
                msg,
                id,
                ack,
                dead_letter: reason.map(|reason| (reason, delivered, seq)),
                flush,
            })
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
                    retry_in_ms = nats_fs::millis(delay),
                    "job could not run here: {why}"
                );
            }
            if let Err(e) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                warn!("nak failed ({e}); the job will be redelivered after the ack wait");
            }
            None
        }
        Decision::Leave { why } => {
            warn!(
                event = event::JOB_LEFT,
                "leaving the job to its redelivery: {why}"
            );
            None
        }
    }
}

/// A published result, not yet acked.
#[must_use = "the message is acked by `finish`"]
pub(crate) struct Unacked<'a> {
    ctx: &'a Ctx,
    msg: &'a jetstream::Message,
    id: &'a JobId,
    ack: Ack,
    /// Why to dead-letter the request, its delivery count and stream sequence.
    dead_letter: Option<(String, u64, u64)>,
    /// The permit to flush the manifest; `None` when there is no manifest.
    flush: Option<OwnedSemaphorePermit>,
}

impl Unacked<'_> {
    /// Flushes the manifest (contract §6.5: acked only once `result.json` is on disk),
    /// dead-letters the request if so decided, and acks.
    pub(crate) async fn finish(self) {
        if let Some(permit) = self.flush {
            if !flush_manifest(self.ctx, self.id, permit).await {
                return;
            }
        }
        if let Some((reason, delivered, seq)) = &self.dead_letter {
            dead_letter(self.ctx, self.msg, reason, *delivered, *seq).await;
        }
        acknowledge(self.ctx, self.msg, self.ack).await;
    }
}

/// Flushes the job's `results/result.json` to the drive, so that an acked job's manifest
/// survives a crash of the host (contract §6.5). Written by the runner without a flush, to
/// keep the flush off the dispatch path: the result is published first. A flush that fails,
/// or takes longer than one ack wait, is logged and the job acked all the same: its result is
/// out, and a redelivery would meet the same drive. (No progress is sent once the run is over,
/// so the server may redeliver before that wait is up; the redelivery then republishes the
/// result.) False when the supervisor is stopping now: then nothing is acked, and the
/// redelivery republishes.
async fn flush_manifest(ctx: &Ctx, id: &JobId, permit: OwnedSemaphorePermit) -> bool {
    let job_dir = ctx.settings.jobs_dir.join(id.as_str());
    let share = ctx.drive.current().share.as_ref().map(|s| s.ids);
    let flush = crate::blocking(move || {
        let flushed = crate::results::flush_manifest(&job_dir, share);
        drop(permit);
        flushed
    });
    let Some(flushed) = unless_stopping_now(ctx, tokio::time::timeout(ctx.ack_wait, flush)).await
    else {
        return false;
    };
    let flushed = match flushed {
        Ok(joined) => joined.map_err(io::Error::other).and_then(|r| r),
        Err(_) => Err(io::Error::from(io::ErrorKind::TimedOut)),
    };
    if let Err(e) = flushed {
        warn!(
            event = event::MANIFEST_NOT_FLUSHED,
            "flushing result.json to the drive: {e}; a crash of this host could lose it"
        );
    }
    true
}

/// `work`'s output, or `None` (said as `manifest_not_flushed`) if the supervisor is told to
/// stop at once first: the job is then left unacked to its redelivery.
async fn unless_stopping_now<T>(
    ctx: &Ctx,
    work: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        done = work => Some(done),
        () = stopping_now(ctx) => {
            warn!(event = event::MANIFEST_NOT_FLUSHED, "stopping now before result.json was flushed: the job is left to its redelivery, which republishes its result");
            None
        }
    }
}

/// Resolves once the supervisor is told to stop at once (a second signal).
async fn stopping_now(ctx: &Ctx) {
    let mut shutdown = ctx.shutdown.clone();
    if shutdown.wait_for(|s| *s == Shutdown::Now).await.is_err() {
        std::future::pending::<()>().await;
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
pub(crate) async fn dead_letter(
    ctx: &Ctx,
    msg: &jetstream::Message,
    reason: &str,
    delivered: u64,
    seq: u64,
) {
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
pub(crate) async fn acknowledge(ctx: &Ctx, msg: &jetstream::Message, ack: Ack) {
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
    use super::*;

    fn result(status: Status) -> ResultMessage {
        ResultMessage {
            status,
            ..ResultMessage::error("j", "x")
        }
    }

    #[test]
    fn final_statuses_ack_except_error() {
        for status in [
            Status::Success,
            Status::Failed,
            Status::Timeout,
            Status::Cancelled,
        ] {
            let d = decide(
                "j",
                JobOutcome::Final(Box::new(result(status))),
                1,
                5,
                false,
            );
            assert!(
                matches!(
                    d,
                    Decision::Publish {
                        ack: Ack::Ack,
                        dead_letter: None,
                        ..
                    }
                ),
                "{status}"
            );
        }
        let d = decide(
            "j",
            JobOutcome::Final(Box::new(result(Status::Error))),
            1,
            5,
            false,
        );
        assert!(matches!(d, Decision::Publish { ack: Ack::Term, .. }));
        // A job that finished is published even if its lease was lost meanwhile.
        let d = decide(
            "j",
            JobOutcome::Final(Box::new(result(Status::Success))),
            1,
            5,
            true,
        );
        assert!(matches!(d, Decision::Publish { ack: Ack::Ack, .. }));
    }

    #[test]
    fn faults_retry_with_growing_delay_then_give_up() {
        let delays: Vec<_> = (1..5)
            .map(
                |n| match decide("j", JobOutcome::fault("disk"), n, 5, false) {
                    Decision::Retry { delay, .. } => delay,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(delays, [1, 2, 4, 8].map(Duration::from_secs));
        match decide("j", JobOutcome::fault("disk"), 5, 5, false) {
            Decision::Publish {
                result,
                ack,
                dead_letter,
            } => {
                assert_eq!(result.status, Status::Error);
                assert_eq!(result.reason, Some(Reason::Host));
                assert_eq!(ack, Ack::Term);
                assert!(result.error.unwrap().contains("disk"));
                assert!(dead_letter.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(retry_delay(40), MAX_RETRY);
    }

    #[test]
    fn a_busy_id_waits_then_becomes_a_dead_letter() {
        assert!(matches!(
            decide("j", JobOutcome::busy("running on h2"), 1, 5, false),
            Decision::Retry { delay, .. } if delay == FIRST_RETRY
        ));
        match decide("j", JobOutcome::busy("running on h2"), 5, 5, false) {
            Decision::Publish {
                result,
                ack: Ack::Term,
                dead_letter: Some(reason),
            } => {
                assert_eq!(result.status, Status::Error);
                assert!(reason.contains("running on h2"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn aborts_retry_at_once_unless_out_of_deliveries_or_lease() {
        assert_eq!(
            decide("j", JobOutcome::aborted("drain"), 1, 5, false),
            Decision::Retry {
                delay: Duration::ZERO,
                why: "drain".into()
            }
        );
        assert!(matches!(
            decide("j", JobOutcome::aborted("drain"), 5, 5, false),
            Decision::Publish { ack: Ack::Term, .. }
        ));
        assert!(matches!(
            decide("j", JobOutcome::aborted("lease"), 1, 5, true),
            Decision::Leave { .. }
        ));
        assert!(matches!(
            decide("j", JobOutcome::fault("x"), 4, 5, true),
            Decision::Leave { .. }
        ));
        // Out of deliveries, nothing else will run it: it must end with a final error.
        assert!(matches!(
            decide("j", JobOutcome::aborted("lease"), 5, 5, true),
            Decision::Publish { ack: Ack::Term, .. }
        ));
    }
}
