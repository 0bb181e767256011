//! Reliability under faults: crashes, server restarts, drains, competition, host
//! faults, lost acks, lost leases, a clustered server and dead letters. Each test injects the
//! fault for real and checks that nothing is lost, nothing runs twice, nothing is left running.

use std::collections::BTreeMap;
use std::fs;
use std::time::{Duration, Instant};

use async_nats::jetstream::stream;
use futures_util::StreamExt;
use nats_fs::manifest::{Manifest, StepRecord, StepStatus, Timing};
use nats_fs::Status;
use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::support::{
    alive, eventually, http_request, no_process_with, open_dir, parent, processes_with,
    reserved_port, sample, skip, sleeper, within, Cluster, Jobs, Nats, RunnerSignaller, Server,
    Supervisor, SOON,
};

/// A step that hangs on the first attempt only: `(token, command)`.
fn hang_on_first_attempt() -> (String, String) {
    let (token, sleep) = sleeper();
    (
        token,
        format!("if [ \"$JOB_ATTEMPT\" = 1 ]; then {sleep}; fi; echo done"),
    )
}

/// The stream the supervisor would create, made by the test (a controller may do the same).
async fn jobs_stream(nats: &Nats, replicas: usize) {
    nats.js
        .get_or_create_stream(stream::Config {
            name: "JOBS".into(),
            subjects: vec!["jobs.pending".into()],
            retention: stream::RetentionPolicy::WorkQueue,
            storage: stream::StorageType::File,
            num_replicas: replicas,
            ..Default::default()
        })
        .await
        .expect("creating the JOBS stream");
}

#[tokio::test]
async fn supervisor_killed_mid_job_loses_nothing_and_leaves_nothing() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let args = ["--ack-wait", "2s"];
    let mut supervisor = Supervisor::start(&server.url, jobs.path(), &args, &[]);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let (token, step) = hang_on_first_attempt();
    jobs.add("crash", &json!({ "steps": [step] }));
    let seq = nats.submit_id("crash").await;
    let step_pid = eventually(SOON, "the step to run", || {
        processes_with(&token).first().copied()
    })
    .await;
    let runner_pid = parent(step_pid);
    let old_workspace = supervisor.workspaces.join(format!("crash.{seq}.1"));
    assert!(old_workspace.exists());

    supervisor.kill();
    let killed = Instant::now();
    eventually(
        Duration::from_secs(1),
        "the runner and its step to die with the supervisor",
        || (!alive(runner_pid) && processes_with(&token).is_empty()).then_some(()),
    )
    .await;
    eprintln!(
        "runner and step gone {:?} after the supervisor's SIGKILL",
        killed.elapsed()
    );

    let supervisor = supervisor.restart(&server.url, jobs.path(), &args, &[]);
    supervisor.ready().await;
    assert!(
        !old_workspace.exists(),
        "the crashed attempt's workspace was not swept"
    );
    assert!(supervisor
        .log()
        .contains("removed workspaces left by an earlier run"));
    let got = nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(got.result.status, Status::Success);
    assert_eq!(got.result.attempt, Some(2));
    nats.drained("worker-01").await;
    nats.no_more_results(Duration::from_millis(500)).await;
}

#[tokio::test]
async fn nats_restarted_mid_job_runs_it_once() {
    let mut server = Server::start_restartable(&[]);
    let jobs = Jobs::new();
    let supervisor = Supervisor::start(&server.url, jobs.path(), &["--ack-wait", "10s"], &[]);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let scratch = open_dir(true);
    let runs = scratch.path().join("runs");
    let go = scratch.path().join("go");
    // The step waits for the test's go-ahead, so the restart surely falls inside it.
    jobs.add(
        "through-restart",
        &json!({"steps": [format!(
            "echo run >> {runs}; n=0; while [ ! -e {go} ]; do n=$((n+1)); [ $n -gt 600 ] && exit 9; sleep 0.05; done",
            runs = runs.display(), go = go.display()
        )]}),
    );
    nats.submit_id("through-restart").await;
    eventually(SOON, "the step to start", || runs.exists().then_some(())).await;

    server.restart();
    supervisor.wait_event("nats_disconnected", 1).await;
    supervisor.wait_event("nats_connected", 2).await;
    // Our own client reconnects too; make sure its subscription is back before the result.
    within(SOON, "the test client to reconnect", async {
        while nats.client.flush().await.is_err() {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    })
    .await;
    fs::write(&go, "").unwrap();

    let got = nats.result().await;
    assert_eq!(got.result.status, Status::Success);
    assert_eq!(got.result.attempt, Some(1));
    assert_eq!(
        fs::read_to_string(&runs).unwrap(),
        "run\n",
        "the job ran more than once"
    );
    let info = nats.drained("worker-01").await;
    assert_eq!(info.num_redelivered, 0);
}

#[tokio::test]
async fn sigterm_drains_the_running_job_and_takes_no_new_one() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let mut supervisor = Supervisor::start(&server.url, jobs.path(), &["--concurrency", "2"], &[]);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let scratch = open_dir(true);
    let go = scratch.path().join("go");
    jobs.add(
        "finishing",
        &json!({"steps": [format!("n=0; while [ ! -e {go} ]; do n=$((n+1)); [ $n -gt 600 ] && exit 9; sleep 0.05; done", go = go.display())]}),
    );
    jobs.add("later", &json!({"steps": ["true"]}));
    nats.submit_id("finishing").await;
    supervisor.wait_event("step_started", 1).await;

    supervisor.signal(Signal::SIGTERM);
    supervisor.wait_event("drain_requested", 1).await;
    nats.submit_id("later").await;
    fs::write(&go, "").unwrap();
    let got = nats.result().await;
    assert_eq!(got.result.id, "finishing");
    assert_eq!(got.result.status, Status::Success);
    let status = supervisor.exit(SOON).await;
    assert!(
        status.success(),
        "the drained supervisor exited with {status}"
    );
    assert_eq!(
        supervisor.count_event("job_started"),
        1,
        "a job was taken during the drain"
    );

    // The job that arrived during the drain is still there for the next supervisor.
    let next = Supervisor::start(&server.url, jobs.path(), &[], &[]);
    let got = nats.result().await;
    assert_eq!(got.result.id, "later");
    assert_eq!(got.result.status, Status::Success);
    nats.drained("worker-01").await;
    drop(next);
}

/// Ack wait for tests that must tell a nak from a redelivery by timeout: a job handed back
/// with a nak returns at once, one that was not only after this long.
const LONG_ACK_WAIT: &str = "60s";

#[tokio::test]
async fn a_drain_deadline_hands_the_job_to_another_supervisor() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let args = ["--drain-timeout", "1s", "--ack-wait", LONG_ACK_WAIT];
    let mut first = Supervisor::start(&server.url, jobs.path(), &args, &[]);
    first.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let (token, step) = hang_on_first_attempt();
    jobs.add("handed-over", &json!({ "steps": [step] }));
    nats.submit_id("handed-over").await;
    first.wait_event("step_started", 1).await;

    first.signal(Signal::SIGTERM);
    let status = first.exit(SOON).await;
    assert!(status.success(), "exit status {status}");
    assert_eq!(first.count_event("drain_timeout"), 1);
    assert_eq!(first.count_event("job_handed_back"), 1);
    assert!(
        processes_with(&token).is_empty(),
        "the stopped job left processes"
    );

    // Well inside the ack wait: only a nak can have made it available again.
    let second = Supervisor::start(&server.url, jobs.path(), &args, &[]);
    second.ready().await;
    let got = nats.result_within(SOON).await;
    assert_eq!(got.result.status, Status::Success);
    assert_eq!(got.result.attempt, Some(2));
    nats.drained("worker-01").await;
}

#[tokio::test]
async fn a_second_sigterm_skips_the_drain_wait() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let args = ["--drain-timeout", "5m", "--ack-wait", LONG_ACK_WAIT];
    let mut supervisor = Supervisor::start(&server.url, jobs.path(), &args, &[]);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let (token, step) = hang_on_first_attempt();
    jobs.add("impatient", &json!({ "steps": [step] }));
    nats.submit_id("impatient").await;
    supervisor.wait_event("step_started", 1).await;
    supervisor.signal(Signal::SIGTERM);
    supervisor.wait_event("drain_started", 1).await;
    let second = Instant::now();
    supervisor.signal(Signal::SIGTERM);
    let status = supervisor.exit(Duration::from_secs(10)).await;
    assert!(status.success());
    eprintln!("exited {:?} after the second SIGTERM", second.elapsed());
    no_process_with(&token, Duration::from_secs(1)).await;
    // Handed back with a nak: the next supervisor gets it long before the ack wait.
    let next = Supervisor::start(&server.url, jobs.path(), &args, &[]);
    let got = nats.result_within(SOON).await;
    assert_eq!(got.result.status, Status::Success);
    assert_eq!(got.result.attempt, Some(2));
    drop(next);
}

#[tokio::test]
async fn competing_supervisors_run_each_job_exactly_once() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let supervisors: Vec<_> = (0..3)
        .map(|_| Supervisor::start(&server.url, jobs.path(), &[], &[]))
        .collect();
    for supervisor in &supervisors {
        supervisor.ready().await;
    }
    let mut nats = Nats::connect(&server.url).await;
    let scratch = open_dir(true);
    let step = format!("echo $JOB_ATTEMPT >> {}/$JOB_ID", scratch.path().display());
    for i in 0..100 {
        let id = format!("many-{i:03}");
        jobs.add(&id, &json!({ "steps": [step] }));
        nats.submit_id(&id).await;
    }
    let results = nats.results(100, Duration::from_secs(120)).await;
    assert!(results.values().all(|r| r.result.status == Status::Success));
    nats.no_more_results(Duration::from_millis(500)).await;
    for i in 0..100 {
        let runs = fs::read_to_string(scratch.path().join(format!("many-{i:03}"))).unwrap();
        assert_eq!(
            runs,
            "1\n",
            "many-{i:03} ran {} times",
            runs.lines().count()
        );
    }
    let shares: Vec<usize> = supervisors
        .iter()
        .map(|s| s.count_event("job_started"))
        .collect();
    eprintln!("jobs per supervisor: {shares:?}");
    assert_eq!(shares.iter().sum::<usize>(), 100);
    assert!(
        shares.iter().all(|&n| n > 0),
        "a supervisor got no work: {shares:?}"
    );
    nats.drained("worker-01").await;
}

#[tokio::test]
async fn a_missing_runner_is_retried_with_growing_delays_then_ends_as_error() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let mut supervisor = Supervisor::start(
        &server.url,
        jobs.path(),
        &[
            "--runner",
            "/nonexistent/nats-fs-runner",
            "--max-deliver",
            "3",
        ],
        &[],
    );
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let mut dead = nats.client.subscribe("jobs.dead").await.unwrap();
    nats.client.flush().await.unwrap();
    jobs.add("no-runner", &json!({"steps": ["true"]}));
    let started = Instant::now();
    nats.submit_id("no-runner").await;
    let got = nats.result_within(Duration::from_secs(30)).await;
    let took = started.elapsed();
    assert_eq!(got.result.status, Status::Error);
    assert_eq!(got.result.attempt, Some(3));
    let error = got.result.error.unwrap_or_default();
    assert!(error.contains("gave up after 3 of 3 deliveries"), "{error}");
    assert!(
        error.contains(
            "starting the runner /nonexistent/nats-fs-runner: executing it: No such file or directory"
        ),
        "{error}"
    );
    // Naks of 1 s, then 2 s: the delay grows.
    let delays: Vec<Value> = supervisor
        .events("job_retry_later")
        .iter()
        .map(|line| line["retry_in_ms"].clone())
        .collect();
    assert_eq!(delays, [1000, 2000], "{}", supervisor.log());
    assert!(
        took >= Duration::from_secs(3),
        "retries came too fast: {took:?}"
    );
    let letter = within(SOON, "the dead letter", dead.next()).await.unwrap();
    assert_eq!(&letter.payload[..], br#"{"id":"no-runner"}"#);
    nats.drained("worker-01").await;
    assert!(
        supervisor.is_running(),
        "a host fault stopped the supervisor"
    );
}

#[tokio::test]
async fn an_unusable_workspace_folder_delays_the_job_until_it_is_fixed() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let mut supervisor = Supervisor::start(&server.url, jobs.path(), &[], &[]);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    // Break the workspaces folder: a file where the folder should be.
    let workspaces = supervisor.workspaces.clone();
    let aside = workspaces.with_extension("aside");
    fs::rename(&workspaces, &aside).unwrap();
    fs::write(&workspaces, "not a folder").unwrap();
    jobs.add("blocked", &json!({"steps": ["true"]}));
    nats.submit_id("blocked").await;
    supervisor.wait_event("job_retry_later", 1).await;
    assert!(supervisor.log().contains("creating the workspace"));
    // The operator fixes it; the retry succeeds.
    fs::remove_file(&workspaces).unwrap();
    fs::rename(&aside, &workspaces).unwrap();
    let got = nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(got.result.status, Status::Success);
    assert_eq!(got.result.attempt, Some(2));
    assert!(supervisor.is_running());
}

#[tokio::test]
async fn a_runner_killed_by_sigkill_is_retried_and_its_orphans_are_killed() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let mut supervisor = Supervisor::start(&server.url, jobs.path(), &["--max-deliver", "2"], &[]);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let (token, sleep) = sleeper();
    let killer = RunnerSignaller::start(Signal::SIGKILL);
    jobs.add(
        "runner-dies",
        &json!({"steps": [format!("{sleep} & setsid {sleep} & {}; {sleep}", killer.hand_over())]}),
    );
    nats.submit_id("runner-dies").await;
    let got = nats.result_within(Duration::from_secs(30)).await;
    assert!(!killer.breached(), "a step killed its runner");
    assert_eq!(killer.signalled(), 2);
    assert_eq!(got.result.status, Status::Error);
    let error = got.result.error.unwrap_or_default();
    assert!(error.contains("was killed by SIGKILL"), "{error}");
    assert_eq!(supervisor.count_event("leftovers_killed"), 2);
    assert!(
        processes_with(&token).is_empty(),
        "a crashed runner's steps survived"
    );
    assert!(supervisor.is_running());
    nats.drained("worker-01").await;
}

#[tokio::test]
async fn a_redelivery_of_a_finished_job_republishes_instead_of_running_again() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let mut nats = Nats::connect(&server.url).await;
    jobs_stream(&nats, 1).await;
    let dir = jobs.add("done-before", &json!({"steps": ["touch ran-again"]}));
    let seq = nats.submit_id("done-before").await;
    // What the previous attempt left: a final manifest for this very stream sequence; its
    // supervisor died before the ack reached the server.
    let manifest = Manifest {
        job_id: "done-before".into(),
        status: Status::Failed,
        exit_code: 3,
        attempt: 1,
        worker: Some("worker-01".into()),
        host: "elsewhere".into(),
        timing: Timing {
            start: "2026-11-29T01:00:00.000Z".into(),
            end: "2026-11-29T01:00:01.000Z".into(),
            duration_ms: 1000,
            stage_ms: 0,
            sync_ms: 0,
        },
        steps: vec![StepRecord {
            index: 0,
            name: None,
            command: "touch ran-again".into(),
            status: StepStatus::Failed,
            exit_code: Some(3),
            signal: None,
            duration_ms: 1000,
            log: Some("step_0.log".into()),
            resources: None,
        }],
        artifacts: vec![],
        error: Some("step 0 exited with code 3".into()),
        reason: Some(nats_fs::manifest::Reason::Exit),
        limits: nats_fs::limits::Limits::default(),
        resources: None,
        stream_sequence: Some(seq),
        warnings: vec![],
    };
    fs::create_dir(dir.join("results")).unwrap();
    manifest.write_atomic(&dir.join("results")).unwrap();

    let supervisor = Supervisor::start(&server.url, jobs.path(), &[], &[]);
    let got = nats.result().await;
    assert_eq!(got.result.status, Status::Failed);
    assert_eq!(got.result.exit_code, 3);
    assert_eq!(
        got.msg_id.as_deref(),
        Some(format!("done-before-{seq}").as_str())
    );
    assert!(
        !dir.join("results/ran-again").exists(),
        "the steps ran again"
    );
    assert_eq!(jobs.manifest("done-before"), manifest);
    assert_eq!(supervisor.count_event("result_republished"), 1);
    nats.drained("worker-01").await;

    // A new request for the same id is a new job: it runs.
    nats.submit_id("done-before").await;
    let got = nats.result().await;
    assert_eq!(got.result.status, Status::Success);
    assert!(dir.join("results/ran-again").exists());
}

#[tokio::test]
async fn a_lost_lease_stops_the_job_rather_than_racing_a_redelivery() {
    let mut server = Server::start_restartable(&[]);
    let jobs = Jobs::new();
    let supervisor = Supervisor::start(&server.url, jobs.path(), &["--ack-wait", "2s"], &[]);
    supervisor.ready().await;
    let nats = Nats::connect(&server.url).await;
    // The result comes while this client may still be reconnecting: keep it in a stream.
    nats.keep_results().await;
    let (token, step) = hang_on_first_attempt();
    jobs.add("leased", &json!({ "steps": [step] }));
    nats.submit_id("leased").await;
    supervisor.wait_event("step_started", 1).await;

    server.kill();
    supervisor.wait_event("lease_lost", 1).await;
    no_process_with(&token, Duration::from_secs(2)).await;
    supervisor.wait_event("job_left", 1).await;

    server.restart();
    let got = nats.stored_result("leased", Duration::from_secs(30)).await;
    assert_eq!(got.status, Status::Success);
    assert_eq!(got.attempt, Some(2));
    nats.drained("worker-01").await;
}

#[tokio::test]
async fn a_clustered_server_loses_a_node_and_no_job() {
    let mut cluster = Cluster::start();
    let nats = Nats::connect_with(&cluster.urls(), async_nats::ConnectOptions::new()).await;
    // The cluster elects its JetStream leaders in its own time.
    let deadline = Instant::now() + Duration::from_secs(60);
    let results_stream = loop {
        let made = async {
            jobs_stream(&nats, 3).await;
            nats.js
                .get_or_create_stream(stream::Config {
                    name: "RESULTS".into(),
                    subjects: vec!["jobs.results.>".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
        };
        match tokio::time::timeout(Duration::from_secs(5), made).await {
            Ok(Ok(stream)) => break stream,
            _ if Instant::now() < deadline => tokio::time::sleep(Duration::from_millis(200)).await,
            other => panic!(
                "the cluster did not become ready: {:?}",
                other.map(Result::err)
            ),
        }
    };
    let jobs = Jobs::new();
    let supervisor = Supervisor::start(&cluster.urls(), jobs.path(), &["--concurrency", "2"], &[]);
    supervisor.ready().await;
    let scratch = open_dir(true);
    let step = format!(
        "echo $JOB_ATTEMPT >> {}/$JOB_ID; sleep 0.1",
        scratch.path().display()
    );
    let total = 40;
    for i in 0..total {
        let id = format!("clustered-{i:02}");
        jobs.add(&id, &json!({ "steps": [step] }));
        nats.submit_id(&id).await;
    }
    supervisor.wait_event("job_finished", 10).await;
    let node = cluster
        .node_with_client("worker-01")
        .expect("the node the supervisor is connected to");
    cluster.kill(node);
    eprintln!(
        "killed node {} with jobs in flight",
        cluster.nodes[node].name
    );

    // Results are kept in a stream, as an operator would: duplicates (same Nats-Msg-Id) are
    // dropped there, so exactly one per job must be stored.
    let mut results_stream = results_stream;
    eventually(
        Duration::from_secs(90),
        "a stored result for every job",
        || {
            let done = (0..total)
                .filter(|i| scratch.path().join(format!("clustered-{i:02}")).exists())
                .count();
            (done == total).then_some(())
        },
    )
    .await;
    let stored = within(Duration::from_secs(60), "all results stored", async {
        loop {
            if let Ok(info) = results_stream.info().await {
                if info.state.messages >= total as u64 {
                    return info.state.messages;
                }
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    })
    .await;
    assert_eq!(stored, total as u64, "results lost or duplicated");
    let mut runs = BTreeMap::new();
    for i in 0..total {
        let id = format!("clustered-{i:02}");
        let lines = fs::read_to_string(scratch.path().join(&id))
            .unwrap()
            .lines()
            .count();
        runs.insert(id, lines);
    }
    assert!(
        runs.values().all(|&n| n == 1),
        "jobs that ran more than once: {runs:?}"
    );
}

#[tokio::test]
async fn rejected_and_exhausted_jobs_become_dead_letters_in_a_stream() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let nats = Nats::connect(&server.url).await;
    let dead = nats
        .js
        .get_or_create_stream(stream::Config {
            name: "DEAD".into(),
            subjects: vec!["jobs.dead".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let supervisor = Supervisor::start(&server.url, jobs.path(), &["--max-deliver", "1"], &[]);
    supervisor.ready().await;
    nats.submit(r#"{"id": "../escape"}"#).await;
    let killer = RunnerSignaller::start(Signal::SIGKILL);
    jobs.add("exhausted", &json!({"steps": [killer.hand_over()]}));
    let seq = nats.submit_id("exhausted").await;
    let mut dead = dead;
    let deadline = Instant::now() + SOON;
    while dead.info().await.unwrap().state.messages < 2 {
        assert!(Instant::now() < deadline, "the dead letters did not arrive");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rejected = dead.get_raw_message(1).await.unwrap();
    assert_eq!(&rejected.payload[..], br#"{"id": "../escape"}"#);
    let reason = rejected
        .headers
        .get("Nats-Fs-Reason")
        .map(ToString::to_string)
        .unwrap();
    assert!(reason.contains("not a valid job id"), "{reason}");
    let exhausted = dead.get_raw_message(2).await.unwrap();
    let reason = exhausted
        .headers
        .get("Nats-Fs-Reason")
        .map(ToString::to_string)
        .unwrap();
    assert!(
        reason.contains("gave up after 1 of 1 deliveries"),
        "{reason}"
    );
    assert!(reason.contains("killed by SIGKILL"), "{reason}");
    assert_eq!(
        exhausted
            .headers
            .get("Nats-Fs-Stream-Sequence")
            .map(ToString::to_string),
        Some(seq.to_string())
    );
    nats.drained("worker-01").await;
}

#[tokio::test]
async fn an_empty_dead_letter_subject_disables_dead_letters() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let mut nats = Nats::connect(&server.url).await;
    let mut dead = nats.client.subscribe("jobs.dead").await.unwrap();
    nats.client.flush().await.unwrap();
    let supervisor = Supervisor::start(
        &server.url,
        jobs.path(),
        &["--dead-letter-subject", ""],
        &[],
    );
    supervisor.ready().await;
    nats.submit(r#"{"id": 42}"#).await;
    nats.submit(r#"{"id": "bad-steps", "steps": [3]}"#).await;
    let got = nats.result().await;
    assert_eq!(got.result.status, Status::Error);
    nats.drained("worker-01").await;
    assert!(
        tokio::time::timeout(Duration::from_millis(300), dead.next())
            .await
            .is_err(),
        "a dead letter was published although disabled"
    );
}

#[tokio::test]
async fn a_crashed_hosts_hold_on_a_job_id_ends_with_its_redelivery() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let args = ["--ack-wait", "2s"];
    let mut first = Supervisor::start(&server.url, jobs.path(), &args, &[]);
    first.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let (token, step) = hang_on_first_attempt();
    jobs.add("held", &json!({ "steps": [step] }));
    nats.submit_id("held").await;
    eventually(SOON, "the step to run", || {
        processes_with(&token).first().copied()
    })
    .await;
    // The first host dies holding the id's lock; another host shares the work.
    first.kill();
    let second = Supervisor::start(&server.url, jobs.path(), &args, &[]);
    second.ready().await;
    let got = nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(got.result.status, Status::Success);
    assert_eq!(got.result.attempt, Some(2));
    assert_eq!(second.count_event("job_busy"), 0, "{}", second.log());
    nats.drained("worker-01").await;
}

/// Removing a finished job's private folders can take seconds (many thousands of entries on a
/// slow drive). It runs on tokio's blocking pool (`execute::Leftovers::clear`), as all blocking
/// work does, so the supervisor's only runtime thread — and with it every other running job's
/// progress acks — goes on meanwhile.
///
/// How this test can fail: were the removal made on the runtime thread, nothing else would
/// run there while it lasts, so job B, running all through it, would see no progress ack for
/// longer than the 2 s ack wait. Once the runtime ran again, B's lease loop would find no
/// confirmation within the ack wait less its margin (1.8 s) and stop B (`lease_lost`, then
/// `job_left`): B's result would come from attempt 2, and the redelivery would be counted.
/// Verified by building the supervisor with the removal made inline (`spawn_blocking` in
/// `Leftovers::clear` replaced by a direct call): this test then fails on B's attempt. The
/// test also checks its own premise — that the removal outlasted the ack wait — and says so
/// when the drive is too fast for that (a tmpfs), rather than pass without proving anything.
#[tokio::test]
async fn a_slow_cleanup_does_not_hold_up_another_jobs_lease() {
    const ACK_WAIT: Duration = Duration::from_secs(2);
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    let port = reserved_port();
    let listen = format!("127.0.0.1:{port}");
    let args = [
        "--concurrency",
        "2",
        "--ack-wait",
        "2s",
        "--metrics-listen",
        &listen,
    ];
    let supervisor = Supervisor::start(&server.url, jobs.path(), &args, &[]);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    let scratch = open_dir(true);
    let mark = |name: &str| scratch.path().join(name).display().to_string();
    let (made, go, b_running) = (mark("made"), mark("go"), mark("b-running"));

    // A fills its TMPDIR (never synced back) with 33,000 nested folders, then waits for the
    // test's go.
    let litter = format!(
        "cd \"$TMPDIR\" && awk 'BEGIN {{ for (a = 0; a < 32; a++) for (b = 0; b < 32; b++) \
         for (c = 0; c < 32; c++) print \"t/\" a \"/\" b \"/\" c }}' | xargs mkdir -p && \
         touch {made} && n=0; while [ ! -e {go} ]; do n=$((n+1)); [ $n -gt 2400 ] && exit 9; \
         sleep 0.05; done"
    );
    jobs.add("litter", &json!({ "steps": [litter] }));
    let seq = nats.submit_id("litter").await;
    let tmp = supervisor.workspaces.join(format!("litter.{seq}.1.tmp"));
    eventually(Duration::from_secs(120), "job A to make its tree", || {
        std::path::Path::new(&made).exists().then_some(())
    })
    .await;

    // B runs for three ack waits, and on until A's TMPDIR is gone: all through its removal.
    let patient = format!(
        "touch {b_running}; sleep 6 & while [ -e {tmp} ]; do sleep 0.1; done; wait",
        tmp = tmp.display()
    );
    jobs.add("patient", &json!({ "steps": [patient] }));
    nats.submit_id("patient").await;
    eventually(SOON, "job B to run", || {
        std::path::Path::new(&b_running).exists().then_some(())
    })
    .await;
    fs::write(&go, "").unwrap();

    let got = nats.result_within(SOON).await;
    assert_eq!(
        (got.result.id.as_str(), got.result.status),
        ("litter", Status::Success)
    );
    let removal = Instant::now();
    let removed_in = eventually(
        Duration::from_secs(300),
        "job A's TMPDIR to be removed",
        || (!tmp.exists()).then(|| removal.elapsed()),
    )
    .await;
    let got = nats.result_within(SOON).await;
    assert_eq!(got.result.id, "patient");
    assert_eq!(got.result.status, Status::Success, "{:?}", got.result);
    assert_eq!(got.result.attempt, Some(1), "job B was redelivered");
    assert_eq!(supervisor.count_event("lease_lost"), 0);
    let (_, body) = http_request(port, "/metrics").unwrap();
    assert_eq!(
        sample(&body, "nats_fs_redeliveries_total"),
        Some(0.0),
        "{body}"
    );
    eprintln!("removing job A's TMPDIR took {removed_in:?}");
    if removed_in < ACK_WAIT {
        skip(&format!(
            "removing job A's TMPDIR took {removed_in:?}, less than the ack wait: this drive is \
             too fast for the test to show that a slow removal leaves the lease alone"
        ));
    }
}
