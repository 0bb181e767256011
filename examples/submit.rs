//! A controller in a few lines: publish a job request, wait for its result message.
//!
//! ```text
//! cargo run --example submit -- nats://localhost:4222 my-job            # steps from job.json
//! cargo run --example submit -- nats://localhost:4222 my-job '["make"]' # steps in the request
//! ```
//! The job folder `{jobs_dir}/my-job/job.json` must exist where the supervisor can see it.

use std::time::Duration;

use futures_util::StreamExt;
use serde_json::json;

#[tokio::main]
async fn main() -> Result<(), async_nats::Error> {
    let mut args = std::env::args().skip(1);
    let (Some(url), Some(id)) = (args.next(), args.next()) else {
        return Err("usage: submit NATS_URL JOB_ID [STEPS_JSON]".into());
    };
    let mut request = json!({ "id": id });
    if let Some(steps) = args.next() {
        request["steps"] = serde_json::from_str(&steps)?;
    }

    let client = async_nats::connect(url).await?;
    // Subscribe before publishing, so the result cannot slip past.
    let mut results = client.subscribe(format!("jobs.results.{id}")).await?;
    let jetstream = async_nats::jetstream::new(client);
    jetstream
        .publish("jobs.pending", request.to_string().into())
        .await? // sent
        .await?; // stored by the stream

    let result = tokio::time::timeout(Duration::from_secs(300), results.next())
        .await
        .map_err(|_| "no result within 5 minutes")?
        .ok_or("the connection closed")?;
    println!("{}", String::from_utf8_lossy(&result.payload));
    Ok(())
}
