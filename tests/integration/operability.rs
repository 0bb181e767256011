//! Operability: what systemd, the `nats` CLI, Prometheus and a controller following a job see.

use std::os::unix::net::UnixDatagram;
use std::time::{Duration, Instant};

use nix::sys::signal::Signal;
use serde_json::json;

use crate::support::{
    http_request, no_process_with, sample, sleeper, within, Jobs, Nats, Server, Supervisor, SOON,
};

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
    assert_eq!(supervisor.count_event("supervisor_ready"), 1);

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
    assert!(got[5].get("reason").is_none(), "{}", got[5]);

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
    assert_eq!(got[3]["reason"], "exit");

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
    assert_eq!(got[3]["reason"], "cancelled");
}

/// Every answer to `subject` within `wait` (several services may answer one request).
async fn answers(nats: &Nats, subject: &str, want: usize) -> Vec<serde_json::Value> {
    use futures_util::StreamExt;
    let inbox = nats.client.new_inbox();
    let mut replies = nats.client.subscribe(inbox.clone()).await.unwrap();
    nats.client
        .publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .unwrap();
    let mut got = Vec::new();
    within(SOON, &format!("{want} answers on {subject}"), async {
        while got.len() < want {
            let msg = replies.next().await.unwrap();
            got.push(serde_json::from_slice(&msg.payload).unwrap());
        }
    })
    .await;
    got
}

#[tokio::test]
async fn the_fleet_answers_the_nats_service_api() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let one = Supervisor::start(&server.url, jobs.path(), &["--concurrency", "2"], &[]);
    let two = Supervisor::start(&server.url, jobs.path(), &[], &[]);
    one.ready().await;
    two.ready().await;
    let nats = Nats::connect(&server.url).await;

    let pings = answers(&nats, "$SRV.PING.nats-fs-worker", 2).await;
    let mut ids: Vec<&str> = pings.iter().map(|p| p["id"].as_str().unwrap()).collect();
    ids.sort_unstable();
    ids.dedup();
    assert_eq!(ids.len(), 2, "two instances: {pings:?}");
    assert!(pings.iter().all(|p| p["name"] == "nats-fs-worker"));
    let infos = answers(&nats, "$SRV.INFO.nats-fs-worker", 2).await;
    let host = nix::unistd::gethostname().unwrap().into_string().unwrap();
    for info in &infos {
        let metadata = &info["metadata"];
        assert_eq!(metadata["worker"], "worker-01", "{info}");
        assert_eq!(metadata["host"], host.as_str());
        assert_eq!(metadata["version"], env!("CARGO_PKG_VERSION"));
        assert_eq!(metadata["stream"], "JOBS");
        assert_eq!(metadata["subject"], "jobs.pending");
        assert_eq!(info["endpoints"][0]["name"], "jobs", "{info}");
    }
    let mut concurrency: Vec<&str> = infos
        .iter()
        .map(|i| i["metadata"]["concurrency"].as_str().unwrap())
        .collect();
    concurrency.sort_unstable();
    assert_eq!(concurrency, ["1", "2"]);
    // Addressed to one instance.
    let one_id = ids[0];
    let direct = answers(&nats, &format!("$SRV.PING.nats-fs-worker.{one_id}"), 1).await;
    assert_eq!(direct[0]["id"], one_id);

    // The jobs endpoint of a host lists what runs there.
    let (token, sleep) = sleeper();
    jobs.add(
        "listed",
        &json!({"steps": [{"run": sleep, "name": "wait"}]}),
    );
    let seq = nats.submit_id("listed").await;
    crate::support::eventually(SOON, "the step to run", || {
        crate::support::processes_with(&token).first().copied()
    })
    .await;
    let subject = infos[0]["endpoints"][0]["subject"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(subject.starts_with("nats-fs.worker-01."), "{subject}");
    // Both supervisors run on this host under one worker id: both answer the one subject.
    assert_eq!(infos[1]["endpoints"][0]["subject"], subject.as_str());
    let mut running = Vec::new();
    for reply in answers(&nats, &subject, 2).await {
        assert!(reply["counters"]["finished"]["success"].is_u64(), "{reply}");
        running.extend(reply["running"].as_array().unwrap().iter().cloned());
    }
    assert_eq!(running.len(), 1, "{running:?}");
    let job = &running[0];
    assert_eq!(job["id"], "listed");
    assert_eq!(job["seq"], seq);
    assert_eq!(job["attempt"], 1);
    assert_eq!(job["step"], 0);
    assert_eq!(job["stepName"], "wait");
    assert!(
        job["identity"].as_str().is_some_and(|i| !i.is_empty()),
        "{job}"
    );
    assert!(job["startedAt"].as_str().is_some(), "{job}");
    nats.client
        .publish("jobs.cancel.listed", "".into())
        .await
        .unwrap();
    no_process_with(&token, SOON).await;
    drop((one, two));
}

#[tokio::test]
async fn prometheus_metrics_and_health() {
    let mut server = Server::start_restartable(&[]);
    let jobs = Jobs::new();
    let port = crate::support::reserved_port();
    let listen = format!("127.0.0.1:{port}");
    let supervisor = Supervisor::start(
        &server.url,
        jobs.path(),
        &["--metrics-listen", &listen, "--concurrency", "2"],
        &[],
    );
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    // Ids of their own: a next delivery of the same id may come before the last one is acked
    // (its result is out first), find it still running, and be redelivered.
    for id in ["ok-1", "ok-2", "ok-3"] {
        jobs.add(id, &json!({"steps": ["true"]}));
    }
    jobs.add("bad", &json!({"steps": ["exit 2"]}));
    for id in ["ok-1", "ok-2", "ok-3", "bad"] {
        nats.submit_id(id).await;
        nats.result().await;
    }
    nats.submit("not json").await;
    // Each job leaves the running ones a moment after its result is out.
    let body = crate::support::eventually(SOON, "no job running", || {
        let (status, body) = http_request(port, "/metrics")?;
        assert_eq!(status, 200);
        (sample(&body, "nats_fs_jobs_running") == Some(0.0)).then_some(body)
    })
    .await;
    assert_eq!(
        sample(&body, r#"nats_fs_jobs_finished_total{status="success"}"#),
        Some(3.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, r#"nats_fs_jobs_finished_total{status="failed"}"#),
        Some(1.0)
    );
    assert_eq!(
        sample(&body, r#"nats_fs_jobs_finished_total{status="timeout"}"#),
        Some(0.0)
    );
    assert_eq!(
        sample(&body, "nats_fs_job_duration_seconds_count"),
        Some(4.0),
        "{body}"
    );
    assert_eq!(
        sample(&body, "nats_fs_stage_duration_seconds_count"),
        Some(4.0)
    );
    assert_eq!(
        sample(&body, "nats_fs_sync_duration_seconds_count"),
        Some(4.0)
    );
    assert_eq!(sample(&body, "nats_fs_free_slots"), Some(2.0));
    assert_eq!(sample(&body, "nats_fs_jobs_running"), Some(0.0));
    assert_eq!(sample(&body, "nats_fs_consumer_pending"), Some(0.0));
    for series in [
        "nats_fs_redeliveries_total",
        "nats_fs_host_faults_total",
        "nats_fs_nats_reconnects_total",
        "nats_fs_events_dropped_total",
    ] {
        assert_eq!(sample(&body, series), Some(0.0), "{series}");
    }
    crate::support::eventually(SOON, "the dead letter to be counted", || {
        let (_, body) = http_request(port, "/metrics")?;
        (sample(&body, "nats_fs_dead_letters_total") == Some(1.0)).then_some(())
    })
    .await;

    assert_eq!(http_request(port, "/healthz").unwrap().0, 200);
    server.kill();
    crate::support::eventually(SOON, "/healthz to say 503", || {
        (http_request(port, "/healthz")?.0 == 503).then_some(())
    })
    .await;
    server.restart();
    crate::support::eventually(SOON, "/healthz to say 200 again", || {
        (http_request(port, "/healthz")?.0 == 200).then_some(())
    })
    .await;
    let (_, body) = http_request(port, "/metrics").unwrap();
    assert_eq!(
        sample(&body, "nats_fs_nats_reconnects_total"),
        Some(1.0),
        "{body}"
    );
    assert_eq!(http_request(port, "/nothing").unwrap().0, 404);
}
