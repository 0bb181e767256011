//! `nats-fs-runner --job`: one job folder, end to end, with the real binary on real folders.

use std::fs;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nats_fs::manifest::StepStatus;
use nats_fs::{Manifest, Status};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use serde_json::{json, Value};

use crate::support::{
    bin, eventually, no_process_with, processes_with, run_runner, run_with_timeout, sleeper, Jobs,
    SOON,
};

/// Runs `nats-fs-runner --job` on `{jobs}/{id}` and returns its output and result message.
fn run(jobs: &Jobs, id: &str, extra: &[&str]) -> (Output, Value) {
    run_runner(jobs, id, extra)
}

#[test]
fn success_with_artifacts_in_nested_folders() {
    let jobs = Jobs::new();
    let dir = jobs.add(
        "ok",
        &json!({"steps": ["mkdir -p dist/js/min && echo app > dist/js/min/app.js", {"run": "echo $GREETING > dist/hello.txt", "name": "greet", "env": {"GREETING": "hi"}}]}),
    );
    let (output, result) = run(&jobs, "ok", &[]);
    assert!(
        output.status.success(),
        "{}",
        String::from_utf8_lossy(&output.stderr)
    );
    assert_eq!(result["status"], "success");
    assert_eq!(result["exitCode"], 0);
    assert_eq!(result["manifestFile"], "results/result.json");
    assert_eq!(
        fs::read_to_string(dir.join("results/dist/js/min/app.js")).unwrap(),
        "app\n"
    );
    assert_eq!(
        fs::read_to_string(dir.join("results/dist/hello.txt")).unwrap(),
        "hi\n"
    );
    let manifest = jobs.manifest("ok");
    assert_eq!(manifest.status, Status::Success);
    assert_eq!(manifest.job_id, "ok");
    let paths: Vec<_> = manifest.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["dist/hello.txt", "dist/js/min/app.js"]);
    assert_eq!(manifest.steps[1].name.as_deref(), Some("greet"));
    assert_eq!(manifest.steps[1].log.as_deref(), Some("step_1.log"));
    assert!(manifest.artifacts[0]
        .sha256
        .as_deref()
        .is_some_and(|h| h.len() == 64));
}

#[test]
fn unchanged_inputs_stay_out_and_modified_inputs_are_synced() {
    let jobs = Jobs::new();
    let dir = jobs.add(
        "sync",
        &json!({"steps": ["echo more >> src/edited.txt; touch -d 2001-01-01 src/old.txt"]}),
    );
    fs::create_dir(dir.join("src")).unwrap();
    for name in ["kept.txt", "edited.txt", "old.txt"] {
        fs::write(dir.join("src").join(name), "input\n").unwrap();
    }
    let (_, result) = run(&jobs, "sync", &[]);
    assert_eq!(result["status"], "success");
    let manifest = jobs.manifest("sync");
    let paths: Vec<_> = manifest.artifacts.iter().map(|a| a.path.as_str()).collect();
    // A touched file is modified too: its mtime is part of what a build sees.
    assert_eq!(paths, ["src/edited.txt", "src/old.txt"]);
    assert!(!dir.join("results/src/kept.txt").exists());
    assert!(!dir.join("results/job.json").exists());
    assert_eq!(
        fs::read_to_string(dir.join("results/src/edited.txt")).unwrap(),
        "input\nmore\n"
    );
}

#[test]
fn a_failing_step_stops_the_job_with_its_exit_code() {
    let jobs = Jobs::new();
    let dir = jobs.add(
        "fail",
        &json!({"steps": ["echo before", "exit 3", "touch never"]}),
    );
    let (output, result) = run(&jobs, "fail", &[]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(result["status"], "failed");
    assert_eq!(result["exitCode"], 3);
    let manifest = jobs.manifest("fail");
    let statuses: Vec<_> = manifest.steps.iter().map(|s| s.status).collect();
    assert_eq!(
        statuses,
        [StepStatus::Success, StepStatus::Failed, StepStatus::Skipped]
    );
    assert_eq!(manifest.steps[1].exit_code, Some(3));
    assert!(manifest
        .error
        .as_deref()
        .is_some_and(|e| e.contains("exited with code 3")));
    assert!(!dir.join("results/never").exists());
    assert!(!dir.join("results/step_2.log").exists());
}

#[test]
fn a_step_killed_by_a_signal_fails_with_128_plus_n() {
    let jobs = Jobs::new();
    jobs.add("sig", &json!({"steps": ["kill -9 $$"]}));
    let (_, result) = run(&jobs, "sig", &[]);
    assert_eq!(result["status"], "failed");
    assert_eq!(result["exitCode"], 137);
    let manifest = jobs.manifest("sig");
    assert_eq!(manifest.steps[0].signal.as_deref(), Some("SIGKILL"));
}

#[test]
fn a_step_timeout_kills_the_whole_group() {
    let jobs = Jobs::new();
    let (token, sleep) = sleeper();
    jobs.add(
        "steptimeout",
        &json!({"steps": [{"run": format!("{sleep} & {sleep}"), "timeout": "1s"}, "touch never"]}),
    );
    let (_, result) = run(&jobs, "steptimeout", &[]);
    assert_eq!(result["status"], "timeout");
    assert_eq!(result["exitCode"], 124);
    assert!(
        processes_with(&token).is_empty(),
        "a step process outlived its timeout"
    );
    let manifest = jobs.manifest("steptimeout");
    assert_eq!(manifest.steps[0].status, StepStatus::Timeout);
    assert_eq!(manifest.steps[1].status, StepStatus::Skipped);
    assert!(manifest
        .error
        .as_deref()
        .is_some_and(|e| e.contains("step 0 timed out after 1s")));
}

#[test]
fn a_job_timeout_kills_the_whole_group_even_when_it_ignores_sigterm() {
    let jobs = Jobs::new();
    let (token, sleep) = sleeper();
    jobs.add(
        "jobtimeout",
        &json!({"timeout": 1, "steps": ["true", format!("trap '' TERM; {sleep} & {sleep}")]}),
    );
    let (_, result) = run(&jobs, "jobtimeout", &[]);
    assert_eq!(result["status"], "timeout");
    assert_eq!(result["exitCode"], 124);
    assert!(
        processes_with(&token).is_empty(),
        "a step process outlived the job timeout"
    );
    let manifest = jobs.manifest("jobtimeout");
    assert!(manifest
        .error
        .as_deref()
        .is_some_and(|e| e.contains("the job timed out after 1s")));
}

#[test]
fn background_setsid_and_nohup_children_are_killed_at_step_end() {
    let jobs = Jobs::new();
    let (token, sleep) = sleeper();
    jobs.add(
        "leftovers",
        &json!({"steps": [format!("{sleep} & setsid {sleep} & nohup {sleep} >/dev/null 2>&1 & (setsid sh -c '{sleep} & {sleep}' &) ; echo started")]}),
    );
    let (_, result) = run(&jobs, "leftovers", &[]);
    assert_eq!(result["status"], "success");
    // The runner reaps before it reports: nothing may be left at this point, not even briefly.
    assert_eq!(
        processes_with(&token),
        Vec::<i32>::new(),
        "leftover step processes"
    );
    let manifest = jobs.manifest("leftovers");
    assert!(
        manifest
            .warnings
            .iter()
            .any(|w| w.contains("left") && w.contains("killed")),
        "{:?}",
        manifest.warnings
    );
}

#[test]
fn links_are_never_followed() {
    let jobs = Jobs::new();
    let dir = jobs.add(
        "links",
        &json!({"steps": ["test -L shadow && echo staged-as-link; ln -s /etc/shadow made; ln -s ../../../../etc dir-link"]}),
    );
    symlink("/etc/shadow", dir.join("shadow")).unwrap();
    let (_, result) = run(&jobs, "links", &[]);
    assert_eq!(result["status"], "success");
    assert!(jobs.log("links", 0).contains("staged-as-link"));
    let results = dir.join("results");
    for (name, target) in [("made", "/etc/shadow"), ("dir-link", "../../../../etc")] {
        let meta = fs::symlink_metadata(results.join(name)).unwrap();
        assert!(
            meta.file_type().is_symlink(),
            "{name} was not synced as a link"
        );
        assert_eq!(
            fs::read_link(results.join(name)).unwrap(),
            Path::new(target)
        );
    }
    // The input link is unchanged, so it is not an artifact.
    assert!(fs::symlink_metadata(results.join("shadow")).is_err());
    let manifest = jobs.manifest("links");
    let made = manifest
        .artifacts
        .iter()
        .find(|a| a.path == "made")
        .unwrap();
    assert_eq!(made.link.as_deref(), Some("/etc/shadow"));
    assert_eq!(made.sha256, None);
}

#[test]
fn a_fifo_in_the_job_folder_is_skipped_without_failing_the_job() {
    let jobs = Jobs::new();
    let dir = jobs.add(
        "fifo",
        &json!({"steps": ["test ! -e pipe && echo no-fifo"]}),
    );
    nix::unistd::mkfifo(
        &dir.join("pipe"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let (_, result) = run(&jobs, "fifo", &[]);
    assert_eq!(result["status"], "success");
    assert!(jobs.log("fifo", 0).contains("no-fifo"));
    let manifest = jobs.manifest("fifo");
    assert!(
        manifest
            .warnings
            .iter()
            .any(|w| w.contains("pipe") && w.contains("FIFO")),
        "{:?}",
        manifest.warnings
    );
}

#[test]
fn results_from_an_earlier_run_are_emptied_first() {
    let jobs = Jobs::new();
    let dir = jobs.add("stale", &json!({"steps": ["true"]}));
    fs::create_dir_all(dir.join("results/old/deep")).unwrap();
    fs::write(dir.join("results/old/deep/artifact"), "stale").unwrap();
    fs::write(dir.join("results/step_7.log"), "stale").unwrap();
    let (_, result) = run(&jobs, "stale", &[]);
    assert_eq!(result["status"], "success");
    let mut names: Vec<_> = fs::read_dir(dir.join("results"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["result.json", "step_0.log"]);
}

#[tokio::test]
async fn a_line_is_in_the_log_while_the_step_still_runs() {
    let jobs = Jobs::new();
    let (token, sleep) = sleeper();
    jobs.add(
        "live",
        &json!({"steps": [format!("echo first-line; {sleep}")]}),
    );
    let workspaces = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("nats-fs-runner"))
        .arg("--job")
        .arg(jobs.path().join("live"))
        .arg("--workspaces-dir")
        .arg(workspaces.path())
        .args(["--kill-grace", "1s"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    eventually(SOON, "the first line in step_0.log", || {
        jobs.log("live", 0).contains("first-line").then_some(())
    })
    .await;
    assert!(
        child.try_wait().unwrap().is_none(),
        "the runner finished before the step did"
    );
    assert!(
        !processes_with(&token).is_empty(),
        "the step is not running any more"
    );
    // Ctrl-C cancels the job.
    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGINT,
    )
    .unwrap();
    let status = eventually(SOON, "the runner to exit", || child.try_wait().unwrap()).await;
    assert_eq!(status.code(), Some(1));
    assert_eq!(jobs.manifest("live").status, Status::Cancelled);
    no_process_with(&token, Duration::from_secs(1)).await;
}

#[test]
fn stdout_and_stderr_lose_no_line() {
    let jobs = Jobs::new();
    jobs.add(
        "streams",
        &json!({"steps": ["i=0; while [ $i -lt 300 ]; do echo o; echo e >&2; i=$((i+1)); done"]}),
    );
    let (_, result) = run(&jobs, "streams", &[]);
    assert_eq!(result["status"], "success");
    let log = jobs.log("streams", 0);
    assert_eq!(log.lines().filter(|l| *l == "o").count(), 300);
    assert_eq!(log.lines().filter(|l| *l == "e").count(), 300);
    assert_eq!(log.lines().count(), 600);
}

/// The runner's own peak RSS, read by a step from its parent's /proc status after `output`.
fn runner_peak_kib(output: &str) -> u64 {
    let jobs = Jobs::new();
    jobs.add(
        "rss",
        &json!({"steps": [output, "grep VmHWM /proc/$PPID/status"]}),
    );
    let (_, result) = run(&jobs, "rss", &[]);
    assert_eq!(result["status"], "success");
    let log = jobs.log("rss", 1);
    log.split_whitespace()
        .nth(1)
        .and_then(|kib| kib.parse().ok())
        .unwrap_or_else(|| panic!("no VmHWM in {log:?}"))
}

#[test]
fn printing_300_mb_keeps_the_runners_memory_flat() {
    let quiet = runner_peak_kib("echo small");
    let loud = runner_peak_kib("head -c 300000000 /dev/zero | tr '\\0' 'x'");
    eprintln!("runner peak RSS: {quiet} KiB after a line, {loud} KiB after 300 MB");
    assert!(
        loud < quiet + 2048,
        "the runner grew from {quiet} KiB to {loud} KiB"
    );
}

#[test]
fn steps_get_a_clean_environment() {
    let jobs = Jobs::new();
    jobs.add(
        "env",
        &json!({"env": {"JOBVAR": "j", "OVER": "job"}, "steps": [{"run": "env", "env": {"OVER": "step"}}]}),
    );
    let workspaces = tempfile::tempdir().unwrap();
    let output = run_with_timeout(
        Command::new(bin("nats-fs-runner"))
            .arg("--job")
            .arg(jobs.path().join("env"))
            .arg("--workspaces-dir")
            .arg(workspaces.path())
            .args(["--pass-env", "PASSED"])
            .env("NATS_TOKEN", "s3cret-token")
            .env("PASSED", "yes"),
        SOON,
    );
    assert!(output.status.success());
    let log = jobs.log("env", 0);
    let names: Vec<&str> = log.lines().filter_map(|l| l.split('=').next()).collect();
    for name in [
        "PATH",
        "HOME",
        "LANG",
        "JOB_ID",
        "JOB_ATTEMPT",
        "JOB_WORKSPACE",
        "JOB_RESULTS_DIR",
        "JOBVAR",
        "OVER",
        "PASSED",
    ] {
        assert!(names.contains(&name), "{name} missing from {names:?}");
    }
    assert!(
        log.contains("OVER=step\n") && log.contains("JOB_ID=env\n") && log.contains("PASSED=yes\n")
    );
    assert!(
        !log.contains("s3cret-token"),
        "the runner's environment leaked into a step"
    );
    // What the shell itself adds (PWD, SHLVL, _) is all that may be extra.
    let allowed_extra = ["PWD", "SHLVL", "_", "OLDPWD"];
    let extra: Vec<_> = names
        .iter()
        .filter(|n| !allowed_extra.contains(n))
        .filter(|n| {
            ![
                "PATH",
                "HOME",
                "LANG",
                "JOB_ID",
                "JOB_ATTEMPT",
                "JOB_WORKSPACE",
                "JOB_RESULTS_DIR",
                "JOBVAR",
                "OVER",
                "PASSED",
            ]
            .contains(n)
        })
        .collect();
    assert!(extra.is_empty(), "unexpected variables: {extra:?}");
}

#[test]
fn steps_from_the_command_line_replace_job_json() {
    let jobs = Jobs::new();
    let dir = jobs.add("override", &json!({"steps": ["touch from-job-json"]}));
    let (_, result) = run(&jobs, "override", &["--steps", r#"["touch from-flag"]"#]);
    assert_eq!(result["status"], "success");
    assert!(dir.join("results/from-flag").exists());
    assert!(!dir.join("results/from-job-json").exists());
}

#[test]
fn a_bad_job_is_an_error_with_a_clear_message() {
    let jobs = Jobs::new();
    let dir = jobs.add(
        "bad",
        &json!({"steps": [{"run": "true", "timeout": "soon"}]}),
    );
    let (output, result) = run(&jobs, "bad", &[]);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(result["status"], "error");
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .contains("steps[0].timeout"),
        "{result}"
    );
    let manifest: Manifest = jobs.manifest("bad");
    assert_eq!(manifest.status, Status::Error);
    assert!(manifest.steps.is_empty());
    fs::remove_dir_all(&dir).unwrap();
    fs::create_dir(&dir).unwrap();
    let (_, result) = run(&jobs, "bad", &[]);
    assert_eq!(result["status"], "error");
    assert!(
        result["error"]
            .as_str()
            .unwrap()
            .contains("job.json does not exist"),
        "{result}"
    );
}

#[tokio::test]
async fn watch_runs_the_job_again_when_its_folder_changes() {
    use std::io::BufRead;
    let jobs = Jobs::new();
    let dir = jobs.add("watched", &json!({"steps": ["cat input.txt"]}));
    fs::write(dir.join("input.txt"), "first\n").unwrap();
    let workspaces = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("nats-fs-runner"))
        .arg("--job")
        .arg(&dir)
        .arg("--workspaces-dir")
        .arg(workspaces.path())
        .arg("--watch")
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let next_result = || {
        let line = rx.recv_timeout(SOON).expect("a result line from --watch");
        serde_json::from_str::<Value>(&line).unwrap()
    };
    assert_eq!(next_result()["status"], "success");
    assert_eq!(jobs.log("watched", 0), "first\n");
    // Writing results/ (which every run does) must not trigger a run; changing an input does.
    fs::write(dir.join("input.txt"), "second\n").unwrap();
    assert_eq!(next_result()["status"], "success");
    assert_eq!(jobs.log("watched", 0), "second\n");
    kill(
        Pid::from_raw(i32::try_from(child.id()).unwrap()),
        Signal::SIGINT,
    )
    .unwrap();
    let status = eventually(SOON, "the watcher to exit", || child.try_wait().unwrap()).await;
    assert!(status.success(), "{status}");
    assert!(
        rx.try_recv().is_err(),
        "a run was triggered by the runner's own writes"
    );
}

#[test]
fn a_missing_workspaces_folder_is_created_and_a_pipe_gets_no_colours() {
    let jobs = Jobs::new();
    jobs.add("fresh", &json!({"steps": ["echo hi"]}));
    let parent = tempfile::tempdir().unwrap();
    let workspaces = parent.path().join("not/there/yet");
    // stderr is a pipe here (run_with_timeout reads it): no terminal, so no colour codes.
    let output = run_with_timeout(
        Command::new(bin("nats-fs-runner"))
            .arg("--job")
            .arg(jobs.path().join("fresh"))
            .arg("--workspaces-dir")
            .arg(&workspaces),
        SOON,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(workspaces.is_dir());
    assert!(
        !stderr.contains('\u{1b}'),
        "colour codes in a pipe:\n{stderr}"
    );
    assert!(stderr.contains("step finished"), "{stderr}");
}

#[test]
fn a_second_ctrl_c_while_staging_cancels_the_job() {
    let jobs = Jobs::new();
    let dir = jobs.add("big", &json!({"steps": ["echo never"]}));
    // Enough files that staging takes a while.
    for i in 0..200 {
        let sub = dir.join(format!("d{i}"));
        fs::create_dir(&sub).unwrap();
        for j in 0..100 {
            fs::write(sub.join(format!("f{j}")), "x").unwrap();
        }
    }
    let workspaces = tempfile::tempdir().unwrap();
    let mut child = Command::new(bin("nats-fs-runner"))
        .arg("--job")
        .arg(&dir)
        .arg("--workspaces-dir")
        .arg(workspaces.path())
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
    let mut stderr = std::io::BufReader::new(child.stderr.take().unwrap());
    let mut seen = String::new();
    // The job is loaded (signals are handled from here on); staging comes next.
    read_until(&mut stderr, &mut seen, "step(s), timeout");
    // Two separate presses: the second once the first was taken (signals sent together may
    // arrive as one).
    kill(pid, Signal::SIGINT).unwrap();
    read_until(&mut stderr, &mut seen, "press Ctrl-C again");
    kill(pid, Signal::SIGINT).unwrap();
    let mut rest = String::new();
    std::io::Read::read_to_string(&mut stderr, &mut rest).unwrap();
    let output = child.wait_with_output().unwrap();
    let result: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(result["status"], "cancelled", "{result}\n{seen}{rest}");
    let all = format!("{seen}{rest}{result}");
    assert!(!all.contains("supervisor"), "{all}");
    // Stopped while staging: no step ran.
    assert!(!all.contains("step started"), "{all}");
    assert_eq!(jobs.manifest("big").steps[0].status, StepStatus::Skipped);
}

/// Reads lines from `from` into `seen` until one holds `needle`; fails at the end of input.
fn read_until(from: &mut impl std::io::BufRead, seen: &mut String, needle: &str) {
    while !seen.contains(needle) {
        let mut line = String::new();
        assert!(
            from.read_line(&mut line).unwrap() > 0,
            "no {needle:?} in:\n{seen}"
        );
        seen.push_str(&line);
    }
}
