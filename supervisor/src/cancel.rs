//! Cancel requests: a message on `{cancel_subject}.{id}` (`jobs.cancel.{id}`) stops every
//! running delivery of that job here.

use std::sync::Arc;
use std::time::Duration;

use futures_util::StreamExt;
use nats_fs::job::JobId;
use nats_fs::protocol::CancelMode;
use tokio::time::sleep;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::ctx::Ctx;

/// Stops running jobs named on `{cancel_subject}.{id}`. A subscription that ends is made
/// again: cancels must keep working as long as the supervisor runs.
pub async fn listen_for_cancels(ctx: Arc<Ctx>) {
    let prefix = format!("{}.", ctx.settings.cancel_subject);
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    loop {
        let mut subscription = match ctx.client.subscribe(format!("{prefix}>")).await {
            Ok(subscription) => subscription,
            Err(e) => {
                warn!(
                    retry_in_ms = backoff.next_ms(),
                    "subscribing to cancel requests: {e}"
                );
                sleep(backoff.pause()).await;
                continue;
            }
        };
        backoff.reset();
        while let Some(msg) = subscription.next().await {
            let Some(id) = msg.subject.strip_prefix(&prefix) else {
                continue;
            };
            let Ok(id) = JobId::parse(id) else {
                debug!(subject = %msg.subject, "ignoring a cancel request for an invalid id");
                continue;
            };
            let stopped = ctx.running.stop(&id, CancelMode::Cancel);
            if stopped > 0 {
                info!(%id, "cancel requested: stopping the job");
            } else {
                debug!(%id, "cancel requested for a job that is not running here");
            }
        }
        warn!("the cancel subscription ended; subscribing again");
    }
}
