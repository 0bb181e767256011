//! Job limits as the runner enforces them, with the real binaries on real folders: the output
//! quota (a log cut with one marker line, an artifact not copied), the idle timeout, the
//! rlimits of the steps (cpuTime, fileSize, openFiles, processes), a drive the job fills, and
//! the resources each step reports.

use std::fs;
use std::process::Output;
use std::time::{Duration, Instant};

use nats_fs::manifest::{Reason, StepStatus};
use nats_fs::{Manifest, Status};
use serde_json::{json, Value};

use crate::support::{is_root, run_runner, setup, skip, Jobs, Nats, Server, Supervisor, Tmpfs};

/// The line the runner ends a log with when the output quota stopped its step (1 MiB here).
const QUOTA_MARKER: &str = "[nats-fs] output limit of 1.0 MiB reached: the step was stopped\n";
/// The line it ends the largest log with when the job filled the drive.
const FULL_MARKER: &str =
    "[nats-fs] the drive holding results/ is full: the end of this log was cut\n";

/// Runs `nats-fs-runner --job` on `{jobs}/{id}`; its output, its result message, and how long
/// it took.
fn run(jobs: &Jobs, id: &str) -> (Output, Value, Duration) {
    let began = Instant::now();
    let (output, result) = run_runner(jobs, id, &[]);
    (output, result, began.elapsed())
}

/// A job that runs `steps` with `limits`, run standalone; the result message and manifest.
fn run_limited(id: &str, steps: &Value, limits: &Value) -> (Value, Manifest, Duration, Jobs) {
    let jobs = Jobs::new();
    jobs.add(id, &json!({"steps": steps, "limits": limits}));
    let (_, result, took) = run(&jobs, id);
    let manifest = jobs.manifest(id);
    (result, manifest, took, jobs)
}

fn assert_one_marker_at_the_end(log: &str, marker: &str) {
    assert!(
        log.ends_with(marker),
        "the log does not end with {marker:?}: …{:?}",
        &log[log.len().saturating_sub(200)..]
    );
    assert_eq!(log.matches("[nats-fs]").count(), 1, "one marker line only");
}

#[test]
fn a_step_printing_forever_is_stopped_at_the_output_limit() {
    let (result, manifest, took, jobs) =
        run_limited("yes", &json!(["yes"]), &json!({"output": "1MiB"}));
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(result["reason"], "output");
    assert_eq!(manifest.reason, Some(Reason::Output));
    assert_eq!(manifest.limits.output, Some(1 << 20));
    assert_eq!(manifest.steps[0].status, StepStatus::Failed);
    let error = manifest.error.unwrap_or_default();
    assert!(error.contains("output limit of 1.0 MiB"), "{error}");
    let log = jobs.log("yes", 0);
    assert_one_marker_at_the_end(&log, QUOTA_MARKER);
    assert!(
        log.len() <= (1 << 20) + QUOTA_MARKER.len() + 1,
        "the log has {} bytes",
        log.len()
    );
    assert!(log.len() > (1 << 20) - 4096, "the log was cut too short");
    assert!(took < Duration::from_secs(20), "took {took:?}");
}

#[test]
fn a_step_that_passes_the_output_limit_and_ends_before_the_first_look_is_cut_too() {
    // 2 MiB in a few milliseconds, well before the poll's first look at 50 ms.
    let (result, manifest, _, jobs) = run_limited(
        "burst",
        &json!(["head -c 2097152 /dev/zero | tr '\\0' x"]),
        &json!({"output": "1MiB"}),
    );
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(result["reason"], "output");
    assert_ne!(result["exitCode"], 0, "{result}");
    assert_eq!(manifest.steps[0].status, StepStatus::Failed);
    let log = jobs.log("burst", 0);
    assert_one_marker_at_the_end(&log, QUOTA_MARKER);
    assert!(
        log.len() <= (1 << 20) + QUOTA_MARKER.len() + 1,
        "the log has {} bytes",
        log.len()
    );
}

/// A step that writes past the quota straight into `$JOB_RESULTS_DIR` (around the log and the
/// sync, where the quota is watched) is caught when it ends — whether it then succeeds or fails
/// on its own — and the next step does not run.
#[test]
fn writing_past_the_output_limit_straight_into_results_is_caught() {
    for (id, then, code) in [("direct-ok", "true", 1), ("direct-fails", "exit 3", 3)] {
        let (result, manifest, _, _) = run_limited(
            id,
            &json!([
                format!("head -c 5M /dev/zero > \"$JOB_RESULTS_DIR/x.bin\"; {then}"),
                "echo never"
            ]),
            &json!({"output": "1MiB"}),
        );
        assert_eq!(result["status"], "failed", "{result}");
        assert_eq!(result["reason"], "output", "{result}");
        // The step's own code when it failed, 1 when it exited 0: a failed job never exits 0.
        assert_eq!(result["exitCode"], code, "{result}");
        let error = manifest.error.unwrap_or_default();
        assert!(error.contains("more than its output limit"), "{error}");
        assert_eq!(manifest.steps[1].status, StepStatus::Skipped);
    }
}

#[test]
fn an_artifact_over_the_output_limit_is_not_copied() {
    let (result, manifest, _, jobs) = run_limited(
        "big",
        &json!(["head -c 5M /dev/zero > big.bin && echo small > small.txt"]),
        &json!({"output": "1MiB"}),
    );
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(result["reason"], "output");
    let error = manifest.error.unwrap_or_default();
    assert!(error.contains("big.bin"), "{error}");
    assert!(!jobs.results("big").join("big.bin").exists());
    let paths: Vec<_> = manifest.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["small.txt"]);
    // No partial copy anywhere in results/.
    let names: Vec<_> = fs::read_dir(jobs.results("big"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    assert!(names.iter().all(|n| !n.contains("big")), "{names:?}");
}

#[test]
fn an_idle_step_ends_as_a_timeout() {
    let jobs = Jobs::new();
    jobs.add(
        "idle",
        &json!({"steps": [{"run": "echo start; sleep 60", "name": "wait", "idleTimeout": 1}]}),
    );
    let (_, result, took) = run(&jobs, "idle");
    assert_eq!(result["status"], "timeout", "{result}");
    assert_eq!(result["reason"], "idle");
    let error = result["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("step 0 (wait) printed nothing for 1s"),
        "{error}"
    );
    assert!(took < Duration::from_secs(10), "took {took:?}");
    assert_eq!(jobs.manifest("idle").steps[0].status, StepStatus::Timeout);
}

#[test]
fn a_step_that_keeps_printing_is_not_idle() {
    let jobs = Jobs::new();
    jobs.add(
        "chatty",
        &json!({"steps": ["for i in 1 2 3 4 5 6 7 8 9 10; do echo $i; sleep 0.2; done"],
                "idleTimeout": 1}),
    );
    let (_, result, _) = run(&jobs, "chatty");
    assert_eq!(result["status"], "success", "{result}");
    assert_eq!(jobs.log("chatty", 0).lines().count(), 10);
}

#[test]
fn resources_are_reported_per_step_and_in_total() {
    let jobs = Jobs::new();
    jobs.add(
        "busy",
        // CPU time, not wall time: a busy machine must not starve the loop below a second.
        &json!({"steps": ["perl -e '1 while (times)[0] < 1.1'", "echo done"]}),
    );
    let (_, result, _) = run(&jobs, "busy");
    assert_eq!(result["status"], "success", "{result}");
    let manifest = jobs.manifest("busy");
    let busy = manifest.steps[0].resources.expect("resources of step 0");
    assert!(
        busy.cpu_user_ms + busy.cpu_system_ms >= 900,
        "a second of CPU: {busy:?}"
    );
    assert!(busy.peak_rss_bytes > 0, "{busy:?}");
    assert!(busy.processes >= 1, "{busy:?}");
    let echo = manifest.steps[1].resources.expect("resources of step 1");
    assert!(echo.peak_rss_bytes > 0 && echo.processes >= 1, "{echo:?}");
    let total = manifest.resources.expect("the job's resources");
    assert_eq!(total.cpu_user_ms, busy.cpu_user_ms + echo.cpu_user_ms);
    assert_eq!(total.cpu_system_ms, busy.cpu_system_ms + echo.cpu_system_ms);
    assert_eq!(total.processes, busy.processes + echo.processes);
    assert_eq!(
        total.peak_rss_bytes,
        busy.peak_rss_bytes.max(echo.peak_rss_bytes)
    );
}

#[test]
fn cpu_time_limit_kills_a_busy_loop() {
    let (result, manifest, took, _) = run_limited(
        "cpu",
        &json!(["while :; do :; done"]),
        &json!({"cpuTime": 1}),
    );
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(result["reason"], "cpuTime");
    assert_eq!(manifest.steps[0].signal.as_deref(), Some("SIGXCPU"));
    assert!(took < Duration::from_secs(10), "took {took:?}");
}

#[test]
fn file_size_limit_stops_a_large_write() {
    let (result, manifest, _, _) = run_limited(
        "fsize",
        &json!(["head -c 2M /dev/zero > f"]),
        &json!({"fileSize": "1MiB"}),
    );
    assert_eq!(result["status"], "failed", "{result}");
    assert_eq!(result["reason"], "fileSize");
    let error = manifest.error.unwrap_or_default();
    assert!(error.contains("SIGXFSZ"), "{error}");
}

#[test]
fn open_files_limit_is_the_steps_ulimit() {
    let (result, _, _, jobs) = run_limited(
        "nofile",
        &json!(["ulimit -Sn; ulimit -Hn"]),
        &json!({"openFiles": 64}),
    );
    assert_eq!(result["status"], "success", "{result}");
    // Standalone there is no ceiling: the job's value is the hard limit too.
    assert_eq!(jobs.log("nofile", 0), "64\n64\n");
}

#[test]
fn a_job_without_limits_reports_none_and_no_reason_on_success() {
    let jobs = Jobs::new();
    jobs.add("plain", &json!({"steps": ["exit 3"]}));
    let (_, result, _) = run(&jobs, "plain");
    assert_eq!(result["reason"], "exit");
    let text = fs::read_to_string(jobs.results("plain").join("result.json")).unwrap();
    let raw: Value = serde_json::from_str(&text).unwrap();
    assert!(raw.get("limits").is_none(), "{raw}");
    assert_eq!(raw["reason"], "exit");
    jobs.add(
        "bad",
        &json!({"steps": ["true"], "limits": {"memory": "lots"}}),
    );
    let (_, result, _) = run(&jobs, "bad");
    assert_eq!(result["status"], "error");
    assert_eq!(result["reason"], "invalid");
    assert!(result["error"]
        .as_str()
        .is_some_and(|e| e.contains("limits.memory")));
}

#[tokio::test]
async fn ceilings_cap_a_job_and_the_output_limit_is_final_under_a_supervisor() {
    let mut s = setup(&["--max-output", "1MiB", "--max-open-files", "128"]).await;
    s.jobs.add(
        "capped",
        &json!({"steps": ["ulimit -Sn; ulimit -Hn", "yes"],
                "limits": {"output": "10MiB", "openFiles": 64}}),
    );
    s.nats.submit_id("capped").await;
    let received = s.nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(received.result.status, Status::Failed, "{:?}", received.raw);
    assert_eq!(received.result.reason, Some(Reason::Output));
    assert_eq!(received.result.attempt, Some(1));
    let manifest = s.jobs.manifest("capped");
    assert_eq!(manifest.limits.output, Some(1 << 20));
    assert_eq!(manifest.limits.open_files, Some(64));
    assert!(
        manifest
            .warnings
            .iter()
            .any(|w| w.contains("limits.output asks for 10.0 MiB")
                && w.contains("runs with 1.0 MiB")),
        "{:?}",
        manifest.warnings
    );
    // Under a ceiling the job's value is the soft limit; the ceiling stays the hard one.
    assert_eq!(s.jobs.log("capped", 0), "64\n128\n");
    assert_one_marker_at_the_end(&s.jobs.log("capped", 1), QUOTA_MARKER);
    // Final: acknowledged once, never delivered again.
    let info = s.nats.drained("worker-01").await;
    assert_eq!(info.num_redelivered, 0);
    s.nats.no_more_results(Duration::from_secs(2)).await;
}

#[tokio::test]
async fn a_step_failing_at_the_process_limit_says_so() {
    if !is_root() {
        // RLIMIT_NPROC counts the processes of a uid; only the supervisor's pool gives a job
        // a uid of its own (and root itself is exempt).
        return skip("a job uid of its own needs root");
    }
    let mut s = setup(&[]).await;
    s.jobs.add(
        "forks",
        &json!({"steps": ["for i in 1 2 3 4 5 6 7 8 9 10; do sleep 30 & done; wait"],
                "limits": {"processes": 6}}),
    );
    s.nats.submit_id("forks").await;
    let received = s.nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(received.result.status, Status::Failed, "{:?}", received.raw);
    assert_eq!(received.result.reason, Some(Reason::Processes));
    let error = received.result.error.unwrap_or_default();
    assert!(error.contains("limits.processes"), "{error}");
}

#[tokio::test]
async fn a_job_that_fills_the_drive_fails_once_and_the_next_job_gets_its_result() {
    if !is_root() {
        return skip("mounting a tmpfs needs root");
    }
    let Some(drive) = Tmpfs::mount("8m") else {
        return skip("mount -t tmpfs is not allowed here");
    };
    let server = Server::start(&[]);
    let jobs = Jobs::new_in(drive.path());
    let supervisor = Supervisor::start(&server.url, jobs.path(), &["--min-free-space", "0"], &[]);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;

    jobs.add("fill", &json!({"steps": ["yes"]}));
    jobs.add("after", &json!({"steps": ["echo hello"]}));
    nats.submit_id("fill").await;
    let received = nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(received.result.id, "fill");
    assert_eq!(received.result.status, Status::Failed, "{:?}", received.raw);
    assert_eq!(received.result.reason, Some(Reason::Output));
    assert_eq!(received.result.attempt, Some(1));
    let manifest = jobs.manifest("fill");
    let error = manifest.error.unwrap_or_default();
    assert!(error.contains("filled the drive"), "{error}");
    assert_one_marker_at_the_end(&jobs.log("fill", 0), FULL_MARKER);

    // The drive full again, by someone else: the next job cannot blame itself, so it is a
    // fault of the host and retried — and succeeds once there is room.
    let filler = drive.fill();
    nats.submit_id("after").await;
    supervisor.wait_event("job_retry_later", 1).await;
    let retry = &supervisor.events("job_retry_later")[0];
    assert!(
        retry["message"]
            .as_str()
            .is_some_and(|m| m.contains("full")),
        "{retry}"
    );
    fs::remove_file(&filler).expect("freeing the drive");
    let received = nats.result_within(Duration::from_secs(60)).await;
    assert_eq!(received.result.id, "after", "{:?}", received.raw);
    assert_eq!(
        received.result.status,
        Status::Success,
        "{:?}",
        received.raw
    );
    assert_eq!(jobs.manifest("after").status, Status::Success);
    assert_eq!(jobs.log("after", 0), "hello\n");
    // "fill" was acknowledged once and never ran again.
    let info = nats.drained("worker-01").await;
    assert_eq!(info.delivered.stream_sequence, 2);
    nats.no_more_results(Duration::from_secs(2)).await;
    drop(supervisor);
}

#[tokio::test]
async fn a_memory_limit_the_supervisor_reports_ends_the_job_with_its_artifacts() {
    let mut s = setup(&[]).await;
    s.jobs.add(
        "hog",
        &json!({"steps": ["echo kept > kept.txt",
                          "x=$(head -c 100M /dev/zero | tr '\\0' a); echo held; sleep 30",
                          "echo never"],
                "limits": {"memory": "50MiB"}}),
    );
    let began = Instant::now();
    s.nats.submit_id("hog").await;
    let received = s.nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(received.result.status, Status::Failed, "{:?}", received.raw);
    assert_eq!(received.result.reason, Some(Reason::Memory));
    assert!(
        began.elapsed() < Duration::from_secs(20),
        "the sleep was not cut short"
    );
    // The runner ended it (not the supervisor's fallback): steps, artifacts and the manifest.
    let manifest = s.jobs.manifest("hog");
    assert_eq!(manifest.reason, Some(Reason::Memory));
    let statuses: Vec<_> = manifest.steps.iter().map(|step| step.status).collect();
    assert_eq!(
        statuses,
        [StepStatus::Success, StepStatus::Failed, StepStatus::Skipped]
    );
    let paths: Vec<_> = manifest.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["kept.txt"]);
    assert!(manifest.error.is_some_and(|e| !e.is_empty()));
}
