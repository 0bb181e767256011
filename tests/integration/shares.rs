//! The jobs folder on real shares, as build farms mount them, each set up and torn down by its
//! test (root only: mounting needs it, as CI has):
//!
//! - a local disk, the jobs folder a controller user's;
//! - bindfs `--chown-deny --create-as-user` (owners kept, root may not chown: an NFS export
//!   with `root_squash`, as far as a FUSE mount can be one);
//! - bindfs `--force-user` (one owner for every file: SMB/CIFS with `uid=`);
//! - sshfs over loopback to a private `sshd`, with a key the test makes (every file the remote
//!   user's, every call an SFTP round trip: NFS `all_squash`).
//!
//! On each, the whole contract end to end — success with artifacts and the steps' own results
//! folder, failure, timeout, cancel, a log line readable on the share while its step runs, and a
//! redelivery after the supervisor is killed — and the attacks: a step that tries to read
//! another running job's folder, write into its `results/`, or plant files in its own job
//! folder outside its artifacts fails, and the victim's results are exactly its own. The start-up
//! probe's verdict is asserted for each mount, and a mount that lets steps in (sshfs with
//! `allow_other`), a read-only share and overlapping folders are shown to be refused or to end
//! jobs with a clear error.

use std::fmt::Write as _;
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use nats_fs::manifest::Reason;
use nats_fs::Status;
use serde_json::json;

use crate::mounts::{controller, Kind, Share, CONTROLLER};
use crate::support::{bin, eventually, run_with_timeout, Jobs, Nats, Server, Supervisor, SOON};

/// The verdict line the supervisor logged when it probed the jobs folder.
fn verdict(supervisor: &Supervisor) -> String {
    let probed = supervisor.events("jobs_dir_probed");
    let line = probed.first().expect("a probe of the jobs folder");
    line["message"].as_str().unwrap_or_default().to_owned()
}

/// What the probe must have found on each kind.
fn expected_facts(kind: Kind) -> &'static [&'static str] {
    match kind {
        Kind::Local => &[
            "(a local disk)",
            "share user nats-fs-test-ctl",
            "owners kept",
            "root may create and chown there",
            "steps cannot reach job folders",
        ],
        Kind::RootSquash => &[
            "(FUSE)",
            "share user nats-fs-test-ctl",
            "owners kept",
            "root may not chown there",
            "steps cannot reach job folders",
        ],
        Kind::OneOwner => &[
            "(FUSE)",
            "share user nats-fs-test-ctl",
            "root may not chown there",
            "steps cannot reach job folders",
        ],
        Kind::Sshfs => &[
            "fuse.sshfs",
            "share user nats-fs-test-ctl",
            "root may not chown there",
            "steps cannot reach job folders",
        ],
        Kind::SshfsAllowOther | Kind::ReadOnly => &[],
    }
}

/// The whole contract, and the attacks, on one kind of share.
async fn contract_on(kind: Kind) {
    let Some(share) = Share::mount(kind) else {
        return;
    };
    let server = Server::start(&[]);
    // Named where the default (the jobs folder's owner) would do as well.
    let named = format!("{CONTROLLER}:{CONTROLLER}");
    let share_user: &[&str] = if kind == Kind::RootSquash {
        &["--share-user", &named]
    } else {
        &[]
    };
    let mut supervisor = share.supervisor(&server, &[&["--concurrency", "3"], share_user].concat());
    supervisor.ready().await;
    let line = verdict(&supervisor);
    for fact in expected_facts(kind) {
        assert!(line.contains(fact), "{kind:?}: {fact:?} not in {line}");
    }
    let (status, report) = share.check();
    assert_eq!(status, Some(0), "{kind:?}: {report}");
    assert!(report.contains("usable: jobs run here"), "{report}");

    let mut nats = Nats::connect(&server.url).await;
    let jobs = &share.jobs;
    success_failure_timeout_and_cancel(kind, &share, &mut nats).await;
    steps_cannot_reach_the_share(kind, &share, &mut nats).await;
    a_log_line_is_on_the_share_while_its_step_runs(&share, &mut nats).await;
    // Redelivery: the supervisor dies (kill -9) while a step runs; the restarted one runs the
    // job again. What the dead run wrote is moved aside, never deleted.
    let gate = share.base.path().join("gate");
    jobs.add(
        "crash",
        &json!({"steps": [format!("echo attempt $JOB_ATTEMPT; while [ ! -e {} ]; do sleep 0.05; done", gate.display())]}),
    );
    nats.submit_id("crash").await;
    eventually(SOON, "the first attempt's log", || {
        jobs.log("crash", 0).contains("attempt 1").then_some(())
    })
    .await;
    supervisor.kill();
    fs::write(&gate, "").unwrap();
    let supervisor = share.supervisor(&server, &[]);
    let got = nats.result_within(Duration::from_secs(40)).await;
    assert_eq!(got.result.id, "crash");
    assert_eq!(
        got.result.status,
        Status::Success,
        "{kind:?}: {:?}",
        got.raw
    );
    assert_eq!(got.result.attempt, Some(2));
    assert_eq!(jobs.log("crash", 0), "attempt 2\n");
    let earlier = jobs.path().join("crash/results.1/step_0.log");
    assert_eq!(
        fs::read_to_string(&earlier).unwrap_or_default(),
        "attempt 1\n",
        "{kind:?}: the dead run's log was not kept"
    );
    assert_eq!(jobs.manifest("crash").status, Status::Success);
    drop(supervisor);
}

/// Success (logs, artifacts, the steps' own results folder, a manifest owned as the share
/// makes the share user's files), failure, timeout and cancel.
async fn success_failure_timeout_and_cancel(kind: Kind, share: &Share, nats: &mut Nats) {
    let jobs = &share.jobs;
    let dir = jobs.add(
        "ok",
        &json!({"steps": [
            "echo hello; cat input.txt",
            "mkdir -p out && echo art > out/a.txt && printf '#!/bin/sh\\n' > out/tool && chmod 755 out/tool && ln -s a.txt out/link",
            "echo extra > \"$JOB_RESULTS_DIR/extra.txt\"; echo changed >> input.txt",
        ]}),
    );
    fs::write(dir.join("input.txt"), "an input\n").unwrap();
    jobs.own(&dir.join("input.txt"));
    jobs.add(
        "fails",
        &json!({"steps": ["echo before; exit 3", "echo never"]}),
    );
    jobs.add("slow", &json!({"steps": ["sleep 60"], "timeout": "1s"}));
    jobs.add("cancel-me", &json!({"steps": ["echo started; sleep 60"]}));
    for id in ["ok", "fails", "slow", "cancel-me"] {
        nats.submit_id(id).await;
    }
    eventually(SOON, "cancel-me to start", || {
        jobs.log("cancel-me", 0).contains("started").then_some(())
    })
    .await;
    nats.client
        .publish("jobs.cancel.cancel-me", "".into())
        .await
        .unwrap();
    let results = nats.results(4, Duration::from_secs(60)).await;
    let status = |id: &str| results[id].result.status;
    assert_eq!(
        status("ok"),
        Status::Success,
        "{kind:?}: {:?}",
        results["ok"].raw
    );
    assert_eq!(status("fails"), Status::Failed);
    assert_eq!(results["fails"].result.exit_code, 3);
    assert_eq!(status("slow"), Status::Timeout);
    assert_eq!(status("cancel-me"), Status::Cancelled);
    for id in ["ok", "fails", "slow", "cancel-me"] {
        assert_eq!(
            results[id].result.manifest_file.as_deref(),
            Some("results/result.json"),
            "{kind:?} {id}"
        );
        assert_eq!(jobs.manifest(id).status, status(id), "{kind:?} {id}");
    }
    assert_eq!(jobs.log("ok", 0), "hello\nan input\n");
    assert_eq!(jobs.log("fails", 0), "before\n");
    let manifest = jobs.manifest("ok");
    let paths: Vec<&str> = manifest.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(
        paths,
        [
            "extra.txt",
            "input.txt",
            "out/a.txt",
            "out/link",
            "out/tool"
        ],
        "{kind:?}"
    );
    let results_dir = jobs.results("ok");
    assert_eq!(
        fs::read_to_string(results_dir.join("out/a.txt")).unwrap(),
        "art\n"
    );
    assert_eq!(
        fs::read_to_string(results_dir.join("extra.txt")).unwrap(),
        "extra\n"
    );
    assert_eq!(
        fs::read_link(results_dir.join("out/link")).unwrap(),
        Path::new("a.txt")
    );
    // The input in the job folder is the controller's, untouched; its changed copy is an
    // artifact.
    assert_eq!(
        fs::read_to_string(dir.join("input.txt")).unwrap(),
        "an input\n"
    );
    // Everything the worker wrote is the share user's (the controller's), as the share shows
    // it, and nobody else may write it.
    let (uid, _) = controller();
    let shown = share.mount.join("ok/results");
    for path in ["", "step_0.log", "result.json", "out", "out/a.txt"] {
        let meta = fs::symlink_metadata(shown.join(path)).unwrap();
        assert_eq!(meta.uid(), uid, "{kind:?} {path}");
        assert_eq!(
            meta.mode() & 0o022,
            0,
            "{kind:?} {path} is writable by others"
        );
    }
    assert_eq!(
        fs::metadata(results_dir.join("out/tool")).unwrap().mode() & 0o777,
        0o755
    );
}

/// A step of one job tries what it should not, on the worker's path of the share and on the
/// controller's, while a victim job runs: read the victim's folder, write into its results,
/// plant files in its own job folder. Nothing works, and the victim's results are its own.
async fn steps_cannot_reach_the_share(kind: Kind, share: &Share, nats: &mut Nats) {
    let jobs = &share.jobs;
    let gate = share.base.path().join("victim-gate");
    let victim = jobs.add(
        "victim",
        &json!({"steps": [format!(
            "cp secret.txt got.txt; echo victim-log; while [ ! -e {} ]; do sleep 0.05; done",
            gate.display()
        )]}),
    );
    fs::write(victim.join("secret.txt"), "s3cr3t\n").unwrap();
    jobs.own(&victim.join("secret.txt"));
    nats.submit_id("victim").await;
    eventually(SOON, "the victim to run", || {
        jobs.log("victim", 0).contains("victim-log").then_some(())
    })
    .await;
    let mut attempts = Vec::new();
    for root in [share.mount.clone(), jobs.path().to_owned()] {
        let r = root.display();
        attempts.extend([
            format!("cat {r}/victim/secret.txt"),
            format!("cat {r}/victim/job.json"),
            format!("ls {r}/victim"),
            format!("ls {r}"),
            format!("echo forged > {r}/victim/results/step_0.log"),
            format!("echo forged > {r}/victim/results/result.json"),
            format!("touch {r}/victim/results/planted"),
            format!("touch {r}/attacker/planted"),
            format!("touch {r}/attacker/results/planted"),
            format!("mkdir {r}/attacker/results.9"),
        ]);
    }
    let mut script = String::new();
    for a in &attempts {
        let _ = write!(
            script,
            "if {a} >/dev/null 2>&1; then echo 'BROKE {a}'; fi; "
        );
    }
    jobs.add(
        "attacker",
        &json!({"steps": [format!("{script}echo tried")]}),
    );
    nats.submit_id("attacker").await;
    let got = nats.result().await;
    assert_eq!(got.result.id, "attacker");
    assert_eq!(got.result.status, Status::Success, "{:?}", got.raw);
    let log = jobs.log("attacker", 0);
    assert!(!log.contains("BROKE"), "{kind:?}: {log}");
    assert!(log.ends_with("tried\n"), "{log}");
    fs::write(&gate, "").unwrap();
    let got = nats.result().await;
    assert_eq!(got.result.id, "victim");
    assert_eq!(got.result.status, Status::Success);
    let manifest = jobs.manifest("victim");
    let paths: Vec<&str> = manifest.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(paths, ["got.txt"]);
    let mut found: Vec<String> = fs::read_dir(jobs.results("victim"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    found.sort();
    assert_eq!(found, ["got.txt", "result.json", "step_0.log"]);
    assert_eq!(jobs.log("victim", 0), "victim-log\n");
    let mut own: Vec<String> = fs::read_dir(jobs.path().join("attacker"))
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    own.sort();
    assert_eq!(own, ["job.json", "results"], "{kind:?}");
}

/// A line a step prints is in its log on the share while the step still runs.
async fn a_log_line_is_on_the_share_while_its_step_runs(share: &Share, nats: &mut Nats) {
    let jobs = &share.jobs;
    let gate = share.base.path().join("stream-gate");
    jobs.add(
        "stream",
        &json!({"steps": [format!(
            "echo first line; while [ ! -e {} ]; do sleep 0.02; done; echo second line",
            gate.display()
        )]}),
    );
    nats.submit_id("stream").await;
    eventually(SOON, "the first line on the share", || {
        (jobs.log("stream", 0) == "first line\n").then_some(())
    })
    .await;
    fs::write(&gate, "").unwrap();
    let got = nats.result().await;
    assert_eq!(got.result.status, Status::Success);
    assert_eq!(jobs.log("stream", 0), "first line\nsecond line\n");
}

#[tokio::test]
async fn the_contract_holds_on_a_local_disk_with_a_controller_user() {
    contract_on(Kind::Local).await;
}

#[tokio::test]
async fn the_contract_holds_where_root_may_not_chown() {
    contract_on(Kind::RootSquash).await;
}

#[tokio::test]
async fn the_contract_holds_where_every_file_has_one_owner() {
    contract_on(Kind::OneOwner).await;
}

#[tokio::test]
async fn the_contract_holds_on_sshfs() {
    contract_on(Kind::Sshfs).await;
}

/// sshfs with `allow_other` lets every local user do what the remote user may: a step could
/// read and change every job folder. Refused at start (exit 2, with how to fix the mount), and
/// by `--check-jobs-dir`; accepted with `--share-isolation off`, which the start-up line says.
#[tokio::test]
async fn a_share_that_lets_steps_in_is_refused() {
    let Some(share) = Share::mount(Kind::SshfsAllowOther) else {
        return;
    };
    let server = Server::start(&[]);
    let mut refused = share.supervisor(&server, &[]);
    let status = refused.exit(SOON).await;
    assert_eq!(status.code(), Some(2), "{}", refused.log());
    let log = refused.log();
    assert!(log.contains("jobs_dir_refused"), "{log}");
    assert!(log.contains("allow_other"), "{log}");
    assert!(log.contains("list a job folder"), "{log}");
    let (status, report) = share.check();
    assert_eq!(status, Some(2), "{report}");
    assert!(report.contains("REFUSED"), "{report}");
    let accepted = share.supervisor(&server, &["--share-isolation", "off"]);
    accepted.ready().await;
    assert!(verdict(&accepted).contains("steps CAN reach job folders"));
    drop(accepted);
    // The fix the refusal names: the same mount inside a folder only the share user may
    // enter, which this host's kernel checks before the share sees anything.
    let Some(mut guarded) = Share::new(Kind::SshfsAllowOther) else {
        return;
    };
    guarded.guard();
    guarded.attach();
    let supervisor = guarded.supervisor(&server, &[]);
    supervisor.ready().await;
    assert!(
        verdict(&supervisor).contains("steps cannot reach job folders"),
        "{}",
        verdict(&supervisor)
    );
}

/// The jobs folder mounted while the supervisor runs (it started on the empty mount point, a
/// local folder): the next job finds it on another device, probes it again, and here, as the
/// new mount lets steps in, hands the job back with the refusal.
#[tokio::test]
async fn a_jobs_folder_mounted_anew_is_probed_again() {
    let Some(mut share) = Share::new(Kind::SshfsAllowOther) else {
        return;
    };
    fs::set_permissions(&share.mount, fs::Permissions::from_mode(0o700)).unwrap();
    let server = Server::start(&[]);
    let supervisor = share.supervisor(&server, &["--max-deliver", "1"]);
    supervisor.ready().await;
    assert!(verdict(&supervisor).contains("(a local disk)"));
    share.attach();
    share
        .jobs
        .add("after-mount", &json!({"steps": ["echo never"]}));
    let mut nats = Nats::connect(&server.url).await;
    nats.submit_id("after-mount").await;
    let got = nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(got.result.status, Status::Error, "{:?}", got.raw);
    let error = got.result.error.unwrap_or_default();
    assert!(
        error.contains("cannot be used") && error.contains("allow_other"),
        "{error}"
    );
    supervisor.wait_event("jobs_dir_refused", 1).await;
    assert!(supervisor.log().contains("the jobs folder changed"));
    assert!(!share.jobs.results("after-mount").exists());
}

/// A jobs folder the share user cannot write (0500): the worker starts, says so, and hands the
/// job back; once the folder is fixed in place (same device), the next delivery runs it.
#[tokio::test]
async fn a_jobs_folder_fixed_in_place_is_used_without_a_restart() {
    let Some(share) = Share::mount(Kind::Local) else {
        return;
    };
    fs::set_permissions(share.jobs.path(), fs::Permissions::from_mode(0o700)).unwrap();
    share.jobs.add("waits", &json!({"steps": ["echo ran"]}));
    fs::set_permissions(share.jobs.path(), fs::Permissions::from_mode(0o500)).unwrap();
    let server = Server::start(&[]);
    let supervisor = share.supervisor(&server, &["--max-deliver", "10"]);
    supervisor.ready().await;
    assert!(
        verdict(&supervisor).contains("cannot create"),
        "{}",
        verdict(&supervisor)
    );
    let (status, report) = share.check();
    assert_eq!(status, Some(1), "{report}");
    let mut nats = Nats::connect(&server.url).await;
    nats.submit_id("waits").await;
    supervisor.wait_event("job_retry_later", 1).await;
    fs::set_permissions(share.jobs.path(), fs::Permissions::from_mode(0o700)).unwrap();
    let got = nats.result_within(Duration::from_secs(40)).await;
    assert_eq!(got.result.status, Status::Success, "{:?}", got.raw);
    assert_eq!(share.jobs.log("waits", 0), "ran\n");
    assert!(supervisor.log().contains("probed the jobs folder again"));
}

/// A read-only share: the worker starts (it may be remounted), says why jobs cannot run, and
/// hands each back until it gives up with an error that names the jobs folder and why.
#[tokio::test]
async fn a_read_only_share_ends_jobs_with_a_clear_error() {
    let Some(share) = Share::mount(Kind::ReadOnly) else {
        return;
    };
    share.jobs.add("ro", &json!({"steps": ["echo never"]}));
    let server = Server::start(&[]);
    let supervisor = share.supervisor(&server, &["--max-deliver", "1"]);
    supervisor.ready().await;
    let warned = supervisor.events("jobs_dir_probed");
    assert!(
        warned[0]["message"]
            .as_str()
            .is_some_and(|m| m.contains("read-only")),
        "{warned:?}"
    );
    let mut nats = Nats::connect(&server.url).await;
    nats.submit_id("ro").await;
    let got = nats.result_within(Duration::from_secs(30)).await;
    assert_eq!(got.result.status, Status::Error, "{:?}", got.raw);
    assert_eq!(got.result.reason, Some(Reason::Host));
    assert_eq!(got.result.manifest_file, None);
    let error = got.result.error.unwrap_or_default();
    assert!(
        error.contains(&share.mount.display().to_string()) && error.contains("read-only"),
        "{error}"
    );
    assert!(!share.jobs.results("ro").exists());
}

/// Workspaces inside the jobs folder: the start-up clean-up of workspaces would remove job
/// folders. Refused at start.
#[tokio::test]
async fn overlapping_jobs_and_workspaces_folders_are_refused() {
    let jobs = Jobs::new();
    let server = Server::start(&[]);
    let mut command = Command::new(bin("nats-fs-supervisor"));
    command
        .arg("--url")
        .arg(&server.url)
        .arg("--jobs-dir")
        .arg(jobs.path())
        .arg("--workspaces-dir")
        .arg(jobs.path().join("workspaces"));
    let out = run_with_timeout(&mut command, SOON);
    assert_eq!(out.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(stderr.contains("overlap"), "{stderr}");
}
