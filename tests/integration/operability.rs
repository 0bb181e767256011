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
