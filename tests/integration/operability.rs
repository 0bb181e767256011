//! Operability: what systemd, the `nats` CLI, Prometheus and a controller following a job see.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::{no_process_with, sleeper, within, Jobs, Nats, Server, Supervisor, SOON};

/// Datagrams a fake systemd received, with when.
fn received(socket: &UnixDatagram) -> Vec<(Instant, String)> {
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    while let Ok(n) = socket.recv(&mut buf) {
        got.push((
            Instant::now(),
            String::from_utf8_lossy(&buf[..n]).into_owned(),
        ));
    }
    got
}

#[tokio::test]
async fn systemd_hears_ready_status_watchdog_and_stopping() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("notify");
    let socket = UnixDatagram::bind(&path).unwrap();
    socket.set_nonblocking(true).unwrap();
    let path = path.to_str().unwrap().to_owned();
    let mut supervisor = Supervisor::start(
        &server.url,
        jobs.path(),
        &[],
        &[
            ("NOTIFY_SOCKET", path.as_str()),
            ("WATCHDOG_USEC", "400000"),
        ],
    );
    let nats = Nats::connect(&server.url).await;
    let mut log = Vec::new();
    // READY=1 comes once the consumer is bound (the supervisor made it).
    let ready_at = within(SOON, "READY=1", async {
        loop {
            log.extend(received(&socket));
            if let Some((at, _)) = log.iter().find(|(_, m)| m == "READY=1") {
                return *at;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    let consumer = nats.consumer("worker-01").await;
    assert_eq!(consumer.config.durable_name.as_deref(), Some("worker-01"));
    assert!(supervisor.log().contains("ready for jobs"));

    // A running job shows in the status line.
    let (token, sleep) = sleeper();
    jobs.add("slow", &json!({"steps": [sleep]}));
    nats.submit_id("slow").await;
    within(SOON, "STATUS=running 1 of 1 jobs", async {
        loop {
            log.extend(received(&socket));
            if log.iter().any(|(_, m)| m == "STATUS=running 1 of 1 jobs") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // Watchdog pings every half of WATCHDOG_USEC while the loop waits for a free slot.
    let watchdogs = log
        .iter()
        .filter(|(at, m)| m == "WATCHDOG=1" && *at > ready_at)
        .count();
    tokio::time::sleep(Duration::from_millis(700)).await;
    log.extend(received(&socket));
    let more = log.iter().filter(|(_, m)| m == "WATCHDOG=1").count();
    assert!(more >= watchdogs + 2, "{log:?}");

    // SIGTERM: STOPPING=1, then the drain's status.
    supervisor.signal(Signal::SIGTERM);
    within(SOON, "STOPPING=1", async {
        loop {
            log.extend(received(&socket));
            if log.iter().any(|(_, m)| m == "STOPPING=1") {
                return;
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await;
    // The drain keeps the watchdog fed while the job runs on.
    let before = log.iter().filter(|(_, m)| m == "WATCHDOG=1").count();
    tokio::time::sleep(Duration::from_millis(700)).await;
    log.extend(received(&socket));
    assert!(log.iter().filter(|(_, m)| m == "WATCHDOG=1").count() >= before + 2);
    assert!(
        log.iter().any(|(_, m)| m.starts_with("STATUS=draining")),
        "{log:?}"
    );
    // A second SIGTERM stops the job at once.
    supervisor.signal(Signal::SIGTERM);
    supervisor.exit(SOON).await;
    no_process_with(&token, SOON).await;
}

/// The events of job `id`, in order, until its `finished` event.
async fn events_until_finished(events: &mut async_nats::Subscriber) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    let mut got = Vec::new();
    within(SOON, "a finished event", async {
        while let Some(msg) = events.next().await {
            let event: serde_json::Value = serde_json::from_slice(&msg.payload).unwrap();
            let done = event["event"] == "finished";
            got.push(event);
            if done {
                return;
            }
        }
    })
    .await;
    got
}

#[tokio::test]
async fn a_controller_follows_a_job_on_its_status_subject() {
    let crate::support::Setup {
        server: _server,
        jobs,
        supervisor: _supervisor,
        nats,
    } = crate::support::setup(&[]).await;
    jobs.add(
        "two",
        &json!({"steps": ["true", {"run": "echo built", "name": "build"}]}),
    );
    jobs.add("fails", &json!({"steps": ["exit 3", "echo never"]}));
    let (token, sleep) = sleeper();
    jobs.add("cancelled", &json!({"steps": [sleep]}));

    let mut events = nats.client.subscribe("jobs.status.two").await.unwrap();
    nats.client.flush().await.unwrap();
    let seq = nats.submit_id("two").await;
    let got = events_until_finished(&mut events).await;
    let kinds: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        [
            "started",
            "step-started",
            "step-finished",
            "step-started",
            "step-finished",
            "finished"
        ]
    );
    assert_eq!(got[0]["seq"], seq);
    assert_eq!(got[0]["attempt"], 1);
    assert_eq!(got[0]["worker"], "worker-01");
    assert!(got[0]["host"].as_str().is_some_and(|h| !h.is_empty()));
    assert_eq!(got[3]["index"], 1);
    assert_eq!(got[3]["name"], "build");
    assert_eq!(got[4]["status"], "success");
    assert_eq!(got[4]["exitCode"], 0);
    assert!(got[4]["durationMs"].as_u64().is_some());
    assert_eq!(got[5]["status"], "success");
    assert_eq!(got[5]["exitCode"], 0);

    let mut events = nats.client.subscribe("jobs.status.fails").await.unwrap();
    nats.client.flush().await.unwrap();
    nats.submit_id("fails").await;
    let got = events_until_finished(&mut events).await;
    let kinds: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["started", "step-started", "step-finished", "finished"]
    );
    assert_eq!(got[2]["status"], "failed");
    assert_eq!(got[2]["exitCode"], 3);
    assert_eq!(got[3]["status"], "failed");
    assert_eq!(got[3]["exitCode"], 3);

    let mut events = nats
        .client
        .subscribe("jobs.status.cancelled")
        .await
        .unwrap();
    nats.client.flush().await.unwrap();
    nats.submit_id("cancelled").await;
    crate::support::eventually(SOON, "the step to run", || {
        crate::support::processes_with(&token).first().copied()
    })
    .await;
    nats.client
        .publish("jobs.cancel.cancelled", "".into())
        .await
        .unwrap();
    let got = events_until_finished(&mut events).await;
    let kinds: Vec<&str> = got.iter().map(|e| e["event"].as_str().unwrap()).collect();
    assert_eq!(
        kinds,
        ["started", "step-started", "step-finished", "finished"]
    );
    assert_eq!(got[2]["status"], "cancelled");
    assert_eq!(got[3]["status"], "cancelled");
    assert_eq!(got[3]["exitCode"], 130);
}
