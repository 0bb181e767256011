//! The supervisor as a NATS micro service, so that the standard tooling lists the fleet:
//! `nats micro ls`, `nats micro info nats-fs-worker`, `nats micro stats nats-fs-worker` (the
//! `$SRV.PING|INFO|STATS` protocol, answered by async-nats). Every supervisor is one instance of
//! the service `nats-fs-worker`, with its worker id, host, version, stream, subject and
//! concurrency in the metadata, and one endpoint, `jobs`, on `nats-fs.{worker}.{host}.jobs`:
//! `nats req nats-fs.worker-01.build1.jobs ''` answers with the jobs running there and the
//! counters since start.

use std::collections::HashMap;
use std::sync::Arc;

use futures_util::StreamExt;
use serde::Serialize;
use tracing::{debug, info};

use crate::ctx::Ctx;
use crate::events::JobState;

/// The service's name, as `nats micro` lists it.
pub const NAME: &str = "nats-fs-worker";

/// The jobs endpoint's answer.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct JobsReply {
    worker: String,
    host: String,
    concurrency: usize,
    running: Vec<JobState>,
    counters: Counters,
}

/// Counts since the supervisor started.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Counters {
    /// Jobs that ended with a final status, by status.
    finished: HashMap<&'static str, u64>,
    redeliveries: u64,
    dead_letters: u64,
    host_faults: u64,
}

/// `host` as one subject token: letters, digits, `-` and `_`, anything else as `_`.
pub fn subject_token(host: &str) -> String {
    let token: String = host
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if token.is_empty() {
        "unknown".to_owned()
    } else {
        token
    }
}

/// Registers the service and answers its jobs endpoint until the task is dropped.
pub async fn start(ctx: Arc<Ctx>) -> anyhow::Result<tokio::task::JoinHandle<()>> {
    use async_nats::service::ServiceExt;
    let settings = &ctx.settings;
    let host = nats_fs::host_name();
    let metadata = HashMap::from([
        ("worker".to_owned(), settings.worker_id.clone()),
        ("host".to_owned(), host.clone()),
        ("version".to_owned(), env!("CARGO_PKG_VERSION").to_owned()),
        ("stream".to_owned(), settings.stream.clone()),
        ("subject".to_owned(), settings.input_subject.clone()),
        ("concurrency".to_owned(), settings.concurrency.to_string()),
    ]);
    let service = ctx
        .client
        .service_builder()
        .description("nats-fs-worker: runs shared-drive jobs in fresh, privilege-dropped processes")
        .metadata(metadata)
        .start(NAME, env!("CARGO_PKG_VERSION"))
        .await
        .map_err(|e| anyhow::anyhow!("registering the NATS service {NAME}: {e}"))?;
    let subject = format!(
        "nats-fs.{}.{}.jobs",
        settings.worker_id,
        subject_token(&host)
    );
    // A queue group of its own: when two supervisors of one worker id share a host (and so
    // the subject), both answer (`nats req --replies 0`), rather than one of them at random.
    let instance = service.info().await.id;
    let mut endpoint = service
        .endpoint_builder()
        .name("jobs")
        .queue_group(format!("nats-fs-{instance}"))
        .add(subject.clone())
        .await
        .map_err(|e| anyhow::anyhow!("adding the service endpoint {subject}: {e}"))?;
    info!(service = NAME, jobs = %subject, "answering the NATS service API");
    Ok(tokio::spawn(async move {
        // The service lives as long as this task: dropping it would stop answering $SRV.
        let _service = service;
        while let Some(request) = endpoint.next().await {
            let reply = jobs_reply(&ctx, &host);
            let payload = serde_json::to_vec(&reply).unwrap_or_default();
            if let Err(e) = request.respond(Ok(payload.into())).await {
                debug!("answering a jobs request: {e}");
            }
        }
    }))
}

fn jobs_reply(ctx: &Ctx, host: &str) -> JobsReply {
    let metrics = &ctx.metrics;
    JobsReply {
        worker: ctx.settings.worker_id.clone(),
        host: host.to_owned(),
        concurrency: ctx.settings.concurrency,
        running: ctx.running.states(),
        counters: Counters {
            finished: metrics.finished_counts(),
            redeliveries: metrics.redeliveries(),
            dead_letters: metrics.dead_letters(),
            host_faults: metrics.host_faults(),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_names_become_one_token() {
        assert_eq!(subject_token("build1.example.com"), "build1_example_com");
        assert_eq!(subject_token("a b*>"), "a_b__");
        assert_eq!(subject_token(""), "unknown");
    }
}
