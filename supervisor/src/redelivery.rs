//! Recognising a redelivery of a job that already finished (only the ack was lost), and
//! republishing its result instead of running it again.

use std::sync::Arc;

use async_nats::jetstream;
use nats_fs::job::JobId;
use nats_fs::manifest::Manifest;
use nats_fs::ResultMessage;
use tracing::{debug, info};

use crate::ctx::Ctx;
use crate::logging::event;
use crate::settle::{carry_out, Decision};
use crate::share::Verdict;

/// Republishes the result of an earlier attempt at this very delivery, if one finished (only
/// the ack was lost): true when it did, and the message is settled.
pub(crate) async fn republished(
    ctx: &Arc<Ctx>,
    msg: &jetstream::Message,
    id: &JobId,
    delivered: u64,
    seq: u64,
) -> bool {
    let earlier = {
        let job_dir = ctx.settings.jobs_dir.join(id.as_str());
        let verdict = ctx.drive.current();
        let id = id.clone();
        crate::blocking(move || already_finished(&job_dir, &id, seq, &verdict))
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

/// The manifest of an earlier attempt at this very delivery (same stream sequence), if it
/// recorded a final status and no job can have forged it (see [`crate::results`]): the job
/// ran to its end and only the ack was lost.
fn already_finished(
    job_dir: &std::path::Path,
    id: &JobId,
    seq: u64,
    verdict: &Verdict,
) -> Option<Manifest> {
    let share = verdict.share.as_ref().map(|s| s.ids);
    match crate::results::believable_manifest(job_dir, verdict.steps_kept_off(), share) {
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
