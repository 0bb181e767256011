//! `nats-fs-supervisor` against a real nats-server: the contract end to end, rejected input,
//! privilege drop, leases, cancel, concurrency and the dry run.

use std::fs;
use std::process::Command;
use std::time::Duration;

use futures_util::StreamExt;
use nats_fs::manifest::StepStatus;
use nats_fs::Status;
use serde_json::json;

use crate::support::{
    bin, eventually, is_root, no_process_with, open_dir, processes_with, run_with_timeout, setup,
    skip, sleeper, within, Jobs, Nats, Server, Supervisor, SOON,
};

#[tokio::test]
async fn the_contract_end_to_end() {
    let mut s = setup(&[]).await;
    s.jobs.add(
        "job_2026_01",
        &json!({"steps": ["echo building; mkdir -p dist && echo app > dist/app.js", {"run": "echo $NODE_ENV", "name": "show"}], "env": {"NODE_ENV": "production"}}),
    );
    let seq = s.nats.submit_id("job_2026_01").await;
    let got = s.nats.result().await;
    assert_eq!(got.subject, "jobs.results.job_2026_01");
    assert_eq!(
        got.msg_id.as_deref(),
        Some(format!("job_2026_01-{seq}").as_str())
    );
    assert_eq!(got.raw["id"], "job_2026_01");
    assert_eq!(got.raw["status"], "success");
    assert_eq!(got.raw["exitCode"], 0);
    assert_eq!(got.raw["manifestFile"], "results/result.json");
    assert_eq!(got.raw["attempt"], 1);
    assert_eq!(got.raw["worker"], "worker-01");
    assert!(got.raw["durationMs"].is_u64());

    let results = s.jobs.results("job_2026_01");
    assert_eq!(
        fs::read_to_string(results.join("dist/app.js")).unwrap(),
        "app\n"
    );
    assert_eq!(s.jobs.log("job_2026_01", 0), "building\n");
    assert_eq!(s.jobs.log("job_2026_01", 1), "production\n");
    let manifest = s.jobs.manifest("job_2026_01");
    assert_eq!(manifest.job_id, "job_2026_01");
    assert_eq!(manifest.status, Status::Success);
    assert_eq!(manifest.attempt, 1);
    assert_eq!(manifest.worker.as_deref(), Some("worker-01"));
    assert!(!manifest.host.is_empty());
    assert!(manifest.timing.start.ends_with('Z') && manifest.timing.end.ends_with('Z'));
    assert_eq!(manifest.stream_sequence, Some(seq));
    assert_eq!(manifest.steps.len(), 2);
    assert_eq!(manifest.steps[1].name.as_deref(), Some("show"));
    assert_eq!(manifest.artifacts.len(), 1);
    assert_eq!(manifest.artifacts[0].path, "dist/app.js");
    let info = s.nats.drained("worker-01").await;
    assert_eq!(info.num_redelivered, 0);
    // The workspace goes right after the ack (off the path of the next job); then only the
    // lock file stays.
    eventually(SOON, "only the lock file in the workspaces folder", || {
        let left = fs::read_dir(&s.supervisor.workspaces).unwrap().count();
        (left == 1).then_some(())
    })
    .await;
}

#[tokio::test]
async fn payload_steps_override_job_json() {
    let mut s = setup(&[]).await;
    let dir = s
        .jobs
        .add("over", &json!({"steps": ["touch from-job-json"]}));
    s.nats
        .submit(json!({"id": "over", "steps": ["touch from-payload"]}).to_string())
        .await;
    let got = s.nats.result().await;
    assert_eq!(got.result.status, Status::Success);
    assert!(dir.join("results/from-payload").exists());
    assert!(!dir.join("results/from-job-json").exists());
}

#[tokio::test]
async fn a_failing_step_fails_the_job_and_is_acked() {
    let mut s = setup(&[]).await;
    s.jobs.add(
        "bad-step",
        &json!({"steps": ["echo one", "exit 4", "echo never"]}),
    );
    s.nats.submit_id("bad-step").await;
    let got = s.nats.result().await;
    assert_eq!(got.result.status, Status::Failed);
    assert_eq!(got.result.exit_code, 4);
    let manifest = s.jobs.manifest("bad-step");
    assert_eq!(manifest.steps[2].status, StepStatus::Skipped);
    let info = s.nats.drained("worker-01").await;
    assert_eq!(info.num_redelivered, 0);
}

#[tokio::test]
async fn rejected_payloads_are_terminated_and_dead_lettered_without_touching_disk() {
    let mut s = setup(&[]).await;
    let mut dead = s.nats.client.subscribe("jobs.dead").await.unwrap();
    s.nats.client.flush().await.unwrap();
    let long_id = "a".repeat(129);
    let hostile: Vec<Vec<u8>> = vec![
        b"not json".to_vec(),
        Vec::new(),
        b"[1, 2]".to_vec(),
        b"{}".to_vec(),
        json!({"id": 5}).to_string().into_bytes(),
        json!({"id": null}).to_string().into_bytes(),
        json!({"id": ".."}).to_string().into_bytes(),
        json!({"id": "/x"}).to_string().into_bytes(),
        json!({"id": "a/b"}).to_string().into_bytes(),
        json!({"id": "a..b"}).to_string().into_bytes(),
        json!({"id": "a\u{7}b"}).to_string().into_bytes(),
        json!({"id": "../../etc", "steps": ["touch /tmp/pwned"]})
            .to_string()
            .into_bytes(),
        json!({ "id": long_id }).to_string().into_bytes(),
    ];
    for payload in &hostile {
        s.nats.submit(payload.clone()).await;
    }
    // Valid ids with bad input get an error result.
    s.nats
        .submit(json!({"id": "bad-steps", "steps": "echo hi"}).to_string())
        .await;
    s.nats.submit_id("no-folder").await;
    let bad_json = s.jobs.add("bad-json", &json!({}));
    fs::write(bad_json.join("job.json"), "{ not json").unwrap();
    s.nats.submit_id("bad-json").await;
    s.jobs.add("not-a-list", &json!({"steps": "echo hi"}));
    s.nats.submit_id("not-a-list").await;

    let results = s.nats.results(4, SOON).await;
    for (id, needle) in [
        ("bad-steps", "steps must be a list"),
        ("no-folder", "does not exist"),
        ("bad-json", "not valid JSON"),
        ("not-a-list", "steps must be a list"),
    ] {
        let got = &results[id];
        assert_eq!(got.result.status, Status::Error, "{id}");
        assert_eq!(got.result.exit_code, 1, "{id}");
        let error = got.result.error.as_deref().unwrap_or_default();
        assert!(error.contains(needle), "{id}: {error}");
    }
    // A job folder the runner could use gets a manifest; a missing one is not created.
    assert_eq!(s.jobs.manifest("bad-json").status, Status::Error);
    assert!(!s.jobs.path().join("no-folder").exists());
    assert!(!s.jobs.path().join("bad-steps").exists());

    // Every rejected request (and the bad-steps one) is dead-lettered with a reason.
    for _ in 0..=hostile.len() {
        let letter = within(SOON, "a dead letter", dead.next()).await.unwrap();
        let reason = letter
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Fs-Reason"))
            .map(ToString::to_string);
        assert!(
            reason.is_some_and(|r| !r.is_empty()),
            "a dead letter without a reason"
        );
    }
    let info = s.nats.drained("worker-01").await;
    assert_eq!(info.num_redelivered, 0);
    s.nats.no_more_results(Duration::from_millis(300)).await;
    assert!(
        s.supervisor.is_running(),
        "a bad payload stopped the supervisor"
    );
    assert!(!std::path::Path::new("/tmp/pwned").exists());
    let mut entries: Vec<_> = fs::read_dir(s.jobs.path())
        .unwrap()
        .map(|e| e.unwrap().file_name())
        .collect();
    entries.sort();
    assert_eq!(
        entries,
        ["bad-json", "not-a-list"],
        "something was created in the jobs folder"
    );
    // It still works.
    s.jobs.add("after", &json!({"steps": ["true"]}));
    s.nats.submit_id("after").await;
    assert_eq!(s.nats.result().await.result.status, Status::Success);
    drop(s.server);
}

#[tokio::test]
async fn steps_run_as_nobody_without_nats_credentials() {
    if !is_root() {
        return skip("dropping privileges needs root");
    }
    let server = Server::start(&["--auth", "s3cret-token"]);
    let jobs = Jobs::new();
    let supervisor = Supervisor::start(
        &server.url,
        jobs.path(),
        &["--run-as", "nobody"],
        &[
            ("NATS_TOKEN", "s3cret-token"),
            ("SUPERVISOR_ONLY", "leaky-value"),
        ],
    );
    supervisor.ready().await;
    let mut nats = Nats::connect_with(
        &server.url,
        async_nats::ConnectOptions::with_token("s3cret-token".into()),
    )
    .await;
    jobs.add("who", &json!({"steps": ["id -u; id -g; env; cat /proc/$$/status | grep -E '^(NoNewPrivs|CapEff)'"]}));
    nats.submit_id("who").await;
    let got = nats.result().await;
    assert_eq!(got.result.status, Status::Success, "{:?}", got.result.error);
    let log = jobs.log("who", 0);
    let mut lines = log.lines();
    assert_eq!(lines.next(), Some("65534"), "{log}");
    assert!(log.contains("NoNewPrivs:\t1"), "{log}");
    assert!(log.contains("CapEff:\t0000000000000000"), "{log}");
    assert!(
        !log.contains("s3cret-token"),
        "the NATS token reached a step:\n{log}"
    );
    assert!(
        !log.contains("leaky-value"),
        "the supervisor's environment reached a step:\n{log}"
    );
    assert!(
        !supervisor.log().contains("s3cret-token"),
        "the token was logged"
    );
}

#[tokio::test]
async fn a_job_longer_than_the_ack_wait_runs_once() {
    let mut s = setup(&["--ack-wait", "2s"]).await;
    let scratch = open_dir(true);
    let counter = scratch.path().join("runs");
    s.jobs.add(
        "long",
        &json!({"steps": [format!("echo run >> {}; sleep 5", counter.display())]}),
    );
    s.nats.submit_id("long").await;
    let got = s.nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(got.result.status, Status::Success);
    assert_eq!(got.result.attempt, Some(1));
    assert_eq!(fs::read_to_string(&counter).unwrap(), "run\n");
    let info = s.nats.drained("worker-01").await;
    assert_eq!(info.num_redelivered, 0);
    assert_eq!(info.config.ack_wait, Duration::from_secs(2));
}

#[tokio::test]
async fn a_cancel_request_stops_the_job() {
    let mut s = setup(&[]).await;
    let (token, sleep) = sleeper();
    s.jobs.add(
        "stop-me",
        &json!({"steps": [sleep, "echo never".to_owned()]}),
    );
    s.nats.submit_id("stop-me").await;
    s.supervisor.wait_event("step_started", 1).await;
    // Cancels for other ids, and hostile subjects, change nothing.
    s.nats
        .client
        .publish("jobs.cancel.other", "".into())
        .await
        .unwrap();
    s.nats
        .client
        .publish("jobs.cancel.stop-me", "".into())
        .await
        .unwrap();
    let got = s.nats.result().await;
    assert_eq!(got.result.status, Status::Cancelled);
    assert_eq!(got.result.exit_code, 130);
    let manifest = s.jobs.manifest("stop-me");
    assert_eq!(manifest.steps[0].status, StepStatus::Cancelled);
    assert_eq!(manifest.steps[1].status, StepStatus::Skipped);
    no_process_with(&token, Duration::from_secs(1)).await;
    s.nats.drained("worker-01").await;
}

#[tokio::test]
async fn concurrency_3_runs_three_jobs_at_once() {
    let mut s = setup(&["--concurrency", "3"]).await;
    let scratch = open_dir(true);
    // Each job announces itself, then waits until all three have: only jobs that run at the
    // same time can all succeed.
    let step = format!(
        "touch {dir}/$JOB_ID; n=0; while [ $(ls {dir} | wc -l) -lt 3 ]; do n=$((n+1)); [ $n -gt 300 ] && exit 9; sleep 0.05; done",
        dir = scratch.path().display()
    );
    for id in ["c1", "c2", "c3"] {
        s.jobs.add(id, &json!({ "steps": [step] }));
        s.nats.submit_id(id).await;
    }
    let results = s.nats.results(3, Duration::from_secs(40)).await;
    for (id, got) in &results {
        assert_eq!(
            got.result.status,
            Status::Success,
            "{id} did not see the others running"
        );
    }
}

#[tokio::test]
async fn one_slot_means_one_job_at_a_time() {
    let mut s = setup(&["--concurrency", "1"]).await;
    let scratch = open_dir(true);
    let step = format!(
        "touch {dir}/$JOB_ID; [ $(ls {dir} | wc -l) -eq 1 ] || exit 7; sleep 0.3; rm {dir}/$JOB_ID",
        dir = scratch.path().display()
    );
    for id in ["s1", "s2", "s3"] {
        s.jobs.add(id, &json!({ "steps": [step] }));
        s.nats.submit_id(id).await;
    }
    for (id, got) in s.nats.results(3, Duration::from_secs(40)).await {
        assert_eq!(
            got.result.status,
            Status::Success,
            "{id} ran beside another job"
        );
    }
}

#[tokio::test]
async fn a_stream_that_misses_the_input_subject_is_a_clear_startup_error() {
    let server = Server::start(&[]);
    let nats = Nats::connect(&server.url).await;
    nats.js
        .create_stream(async_nats::jetstream::stream::Config {
            name: "JOBS".into(),
            subjects: vec!["other.>".into()],
            ..Default::default()
        })
        .await
        .unwrap();
    let jobs = Jobs::new();
    let mut supervisor = Supervisor::start(&server.url, jobs.path(), &[], &[]);
    let status = supervisor.exit(SOON).await;
    assert!(!status.success());
    let log = supervisor.log();
    assert!(
        log.contains("does not capture the input subject jobs.pending"),
        "{log}"
    );
}

#[tokio::test]
async fn bad_configuration_is_refused_with_the_option_named() {
    let jobs = Jobs::new();
    for (args, needle) in [
        (vec!["--concurrency", "0"], "--concurrency"),
        (vec!["--id", "a.b"], "--id"),
        (vec!["--run-as", "no-such-user-here"], "--run-as"),
        (vec!["--timeout", "soon"], "--timeout"),
    ] {
        let output = run_with_timeout(
            Command::new(bin("nats-fs-supervisor"))
                .args(["--url", "nats://127.0.0.1:1", "--jobs-dir"])
                .arg(jobs.path())
                .args(&args),
            SOON,
        );
        assert!(!output.status.success(), "{args:?} was accepted");
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(stderr.contains(needle), "{args:?}: {stderr}");
    }
    // A bad value from the environment (a settings file) is named by its variable, and the
    // exit status is the one the unit does not restart on.
    let output = run_with_timeout(
        Command::new(bin("nats-fs-supervisor")).env("NATS_FS_KILL_GRACE", "notaduration"),
        SOON,
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("NATS_FS_KILL_GRACE"), "{stderr}");
}

#[test]
fn dry_run_without_a_server() {
    let cwd = open_dir(false);
    fs::write(
        cwd.path().join("test-payload.json"),
        json!({"steps": ["id -u > who.txt", "echo dry-output"]}).to_string(),
    )
    .unwrap();
    let output = run_with_timeout(
        Command::new(bin("nats-fs-supervisor"))
            .current_dir(cwd.path())
            .args(["--dry-run", "--url", "nats://127.0.0.1:1"]),
        SOON,
    );
    let stdout = String::from_utf8_lossy(&output.stdout);
    assert!(
        output.status.success(),
        "{stdout}\n{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let result: serde_json::Value = serde_json::from_str(stdout.trim()).unwrap();
    assert_eq!(result["id"], "dry-run");
    assert_eq!(result["status"], "success");
    let results = cwd.path().join("jobs/dry-run/results");
    let uid = fs::read_to_string(results.join("who.txt")).unwrap();
    // The same privilege path as a real job: as root, the steps run as nobody.
    let expected = if is_root() {
        "65534".to_owned()
    } else {
        nix::unistd::geteuid().to_string()
    };
    assert_eq!(uid.trim(), expected);
    assert_eq!(
        fs::read_to_string(results.join("step_1.log")).unwrap(),
        "dry-output\n"
    );

    fs::write(
        cwd.path().join("test-payload.json"),
        json!({"id": "dry-fail", "steps": ["exit 5"]}).to_string(),
    )
    .unwrap();
    let output = run_with_timeout(
        Command::new(bin("nats-fs-supervisor"))
            .current_dir(cwd.path())
            .arg("--dry-run"),
        SOON,
    );
    assert_eq!(output.status.code(), Some(1));
    let result: serde_json::Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["status"], "failed");
    assert_eq!(result["exitCode"], 5);
    assert!(processes_with("dry-fail").is_empty());
}

/// A supervisor started with signals ignored (`nohup`, `&` in a script, a service manager
/// that ignores SIGHUP) must not pass that on: a step that ignores SIGINT or SIGTERM by
/// accident behaves differently from the same build run by hand, and outlives its timeout's
/// TERM.
#[test]
fn steps_get_no_ignored_signal_from_the_supervisor() {
    let cwd = open_dir(false);
    fs::write(
        cwd.path().join("test-payload.json"),
        json!({"id": "sigign", "steps": ["grep SigIgn /proc/self/status > sigign.txt"]})
            .to_string(),
    )
    .unwrap();
    // `trap ''` ignores the signals, and the exec'd supervisor inherits that.
    let output = run_with_timeout(
        Command::new("/bin/sh")
            .current_dir(cwd.path())
            .args([
                "-c",
                r#"trap '' HUP INT QUIT USR1 TERM; exec "$0" --dry-run"#,
            ])
            .arg(bin("nats-fs-supervisor")),
        SOON,
    );
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    let line = fs::read_to_string(cwd.path().join("jobs/sigign/results/sigign.txt")).unwrap();
    let mask = u64::from_str_radix(line.trim().trim_start_matches("SigIgn:").trim(), 16).unwrap();
    // Signals 1–31 (bit n-1 is signal n). 32 and 33 are glibc's own: its posix_spawn leaves
    // them ignored in every child, no program can use them through glibc, and glibc's
    // sigaction refuses to touch them.
    let standard = mask & ((1 << 31) - 1);
    assert_eq!(
        standard, 0,
        "the step was started with signals ignored: {line}"
    );
}

#[tokio::test]
async fn symlinks_never_lead_the_supervisor_out_of_the_job_folder() {
    use std::os::unix::fs::MetadataExt;
    let mut s = setup(&[]).await;
    // Somewhere a job must not reach: a folder with a `results` inside, owned by us.
    let elsewhere = open_dir(false);
    fs::create_dir(elsewhere.path().join("results")).unwrap();
    let owner = fs::metadata(elsewhere.path().join("results"))
        .unwrap()
        .uid();
    std::os::unix::fs::symlink(elsewhere.path(), s.jobs.path().join("linked")).unwrap();
    let dir = s.jobs.add("results-linked", &json!({"steps": ["true"]}));
    std::os::unix::fs::symlink(elsewhere.path(), dir.join("results")).unwrap();

    s.nats.submit_id("linked").await;
    let got = s.nats.result().await;
    assert_eq!(got.result.status, Status::Error);
    assert!(
        got.result
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("is a symlink"),
        "{:?}",
        got.result.error
    );
    s.nats.submit_id("results-linked").await;
    let got = s.nats.result().await;
    assert_eq!(got.result.status, Status::Error);
    assert!(
        got.result
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("is in the way"),
        "{:?}",
        got.result.error
    );

    // Nothing out there was created, given away or emptied.
    assert_eq!(
        fs::metadata(elsewhere.path().join("results"))
            .unwrap()
            .uid(),
        owner
    );
    assert_eq!(fs::read_dir(elsewhere.path()).unwrap().count(), 1);
    s.nats.drained("worker-01").await;
}
