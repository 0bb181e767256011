//! Isolation, attacked for real: jobs that try to read, disturb and forge each other's work, a
//! step that stops its own runner, hostile job folders, inherited descriptors, duplicate
//! deliveries, and a soak that must leave no zombie. Everything here drops privileges to uids
//! of its own, so it needs root (as CI has); without root each test says SKIPPED.

use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nats_fs::manifest::StepStatus;
use nats_fs::Status;
use serde_json::json;

use crate::support::{
    bin, children_of, eventually, is_root, no_process_with, open_dir, processes_of_uids,
    processes_with, run_with_timeout, setup, skip, sleeper, uid_block, uid_pool, within, Jobs,
    Nats, RunnerSignaller, Server, Setup, Supervisor, SOON,
};
use nix::sys::signal::Signal;

/// Writes a shell script readable by every uid; returns its path.
fn script(dir: &Path, name: &str, body: &str) -> PathBuf {
    let path = dir.join(name);
    fs::write(&path, body).unwrap();
    fs::set_permissions(&path, fs::Permissions::from_mode(0o755)).unwrap();
    path
}

/// `ptrace(PTRACE_ATTACH, pid)` from a step, through perl (always on Debian: perl-base is
/// essential); exits 0 only if the attach worked. x86-64 numbers: `SYS_ptrace` 101, `PTRACE_ATTACH` 16.
const PTRACE: &str = r"perl -e 'exit(syscall(101, 16, $ARGV[0], 0, 0) == 0 ? 0 : 1)'";

#[tokio::test]
async fn two_running_jobs_cannot_touch_each_other() {
    if !is_root() {
        return skip("isolation between identities needs root");
    }
    let (first, run_as) = uid_pool();
    let Setup {
        server: _server,
        jobs,
        supervisor,
        mut nats,
    } = setup(&["--concurrency", "2", "--run-as", &run_as]).await;
    let scratch = open_dir(true);
    let s = scratch.path().display();
    let j = jobs.path().display();
    // The victim says where it is, then waits until the attacker is done, keeping a secret in
    // its environment and a file in its workspace. Both scripts are sourced by the step's
    // shell, so that $$ is the step and $PPID its runner.
    let victim = script(
        scratch.path(),
        "victim.sh",
        &format!(
            "echo mine > mine.txt\n\
             echo secret > \"$TMPDIR/mine\"\n\
             echo \"$$ $PPID $JOB_WORKSPACE $TMPDIR\" > {s}/victim.ids\n\
             i=0; while [ ! -e {s}/attacked ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n\
             echo victim-done; ls; mkdir -p out; echo artifact > out/a.txt\n"
        ),
    );
    let attack = script(
        scratch.path(),
        "attack.sh",
        &format!(
            "i=0; while [ ! -e {s}/victim.ids ] && [ $i -lt 600 ]; do sleep 0.05; i=$((i+1)); done\n\
             read step runner ws tmp < {s}/victim.ids\n\
             try() {{ if sh -c \"$2\" >/dev/null 2>&1; then echo \"BROKE $1\"; else echo \"held $1\"; fi; }}\n\
             try environ \"grep -q victim-secret /proc/$step/environ\"\n\
             try runner-environ \"cat /proc/$runner/environ\"\n\
             try cwd \"ls /proc/$step/cwd/\"\n\
             try runner-fd \"ls /proc/$runner/fd/\"\n\
             try runner-mem \"head -c1 /proc/$runner/mem\"\n\
             try workspace-read \"ls $ws\"\n\
             try workspace-write \"touch $ws/planted\"\n\
             try tmp-read \"cat $tmp/mine\"\n\
             try signal-step \"kill -0 $step\"\n\
             try stop-runner \"kill -STOP $runner\"\n\
             try log-append \"echo forged >> {j}/victim/results/step_0.log\"\n\
             try results-write \"touch {j}/victim/results/planted\"\n\
             try results-remove \"rm -f {j}/victim/results/step_0.log\"\n\
             try ptrace-runner \"{PTRACE} $runner\"\n\
             try ptrace-step \"{PTRACE} $step\"\n\
             # The checks can fail: the same attacks on itself work.\n\
             grep -q attacker-secret /proc/$$/environ && echo self-environ-ok\n\
             touch {s}/attacked\n"
        ),
    );
    jobs.add(
        "victim",
        &json!({"steps": [format!(". {}", victim.display())], "env": {"SECRET": "victim-secret"}}),
    );
    jobs.add(
        "attacker",
        &json!({"steps": [format!(". {}", attack.display())], "env": {"SECRET": "attacker-secret"}}),
    );
    nats.submit_id("victim").await;
    nats.submit_id("attacker").await;
    let results = nats.results(2, Duration::from_secs(60)).await;
    assert_eq!(results["victim"].result.status, Status::Success);
    assert_eq!(results["attacker"].result.status, Status::Success);

    let attacks = jobs.log("attacker", 0);
    assert!(!attacks.contains("BROKE"), "an attack worked:\n{attacks}");
    assert_eq!(attacks.matches("held ").count(), 15, "{attacks}");
    assert!(attacks.contains("self-environ-ok"), "{attacks}");
    // The victim's result, log and artifacts are exactly its own.
    assert_eq!(jobs.log("victim", 0), "victim-done\njob.json\nmine.txt\n");
    let manifest = jobs.manifest("victim");
    let artifacts: Vec<_> = manifest.artifacts.iter().map(|a| a.path.as_str()).collect();
    assert_eq!(artifacts, ["mine.txt", "out/a.txt"]);
    let mut names: Vec<_> = fs::read_dir(jobs.results("victim"))
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    assert_eq!(names, ["mine.txt", "out", "result.json", "step_0.log"]);
    // Nothing of either job is left running under the pool's uids. (That the two ran as
    // different identities is what made `signal-step` and `ptrace-*` fail above.)
    assert!(processes_of_uids(first, 16).is_empty());
    drop(supervisor);
}

#[tokio::test]
async fn a_step_cannot_inspect_its_own_runner() {
    if !is_root() {
        return skip("a non-dumpable runner is only tested under a dropped identity (root)");
    }
    let Setup {
        server: _server,
        jobs,
        supervisor,
        mut nats,
    } = setup(&[]).await;
    let scratch = open_dir(true);
    let probe = script(
        scratch.path(),
        "probe.sh",
        &format!(
            "try() {{ if sh -c \"$2\" >/dev/null 2>&1; then echo \"BROKE $1\"; else echo \"held $1\"; fi; }}\n\
             try environ \"cat /proc/$PPID/environ\"\n\
             try fd \"ls /proc/$PPID/fd/\"\n\
             try mem \"head -c1 /proc/$PPID/mem\"\n\
             try ptrace \"{PTRACE} $PPID\"\n\
             ls /proc/$$/fd/ >/dev/null && echo own-fd-ok\n"
        ),
    );
    // Sourced, so that $PPID is the runner.
    jobs.add(
        "curious",
        &json!({"steps": [format!(". {}", probe.display())]}),
    );
    nats.submit_id("curious").await;
    assert_eq!(nats.result().await.result.status, Status::Success);
    let log = jobs.log("curious", 0);
    assert!(!log.contains("BROKE"), "{log}");
    assert_eq!(log.matches("held ").count(), 4, "{log}");
    assert!(log.contains("own-fd-ok"), "{log}");
    drop(supervisor);
}

#[tokio::test]
async fn a_later_job_cannot_change_an_earlier_jobs_results() {
    if !is_root() {
        return skip("taking results back needs root");
    }
    // One uid for every job: the later job runs as the very uid that wrote the earlier results.
    let uid = uid_block();
    let Setup {
        server: _server,
        jobs,
        supervisor,
        mut nats,
    } = setup(&["--run-as", &uid.to_string()]).await;
    jobs.add(
        "first",
        &json!({"steps": ["mkdir -p out && echo original > out/a.txt && chmod -R a+rwx out && echo log"]}),
    );
    nats.submit_id("first").await;
    assert_eq!(nats.result().await.result.status, Status::Success);
    let results = jobs.results("first");
    for path in ["", "out", "out/a.txt", "step_0.log", "result.json"] {
        let meta = fs::symlink_metadata(results.join(path)).unwrap();
        assert_eq!(meta.uid(), 0, "{path} is still the job's");
        assert_eq!(meta.mode() & 0o022, 0, "{path} is writable by others");
    }
    let r = results.display();
    jobs.add(
        "second",
        &json!({"steps": [format!(
            "for a in 'echo forged > {r}/out/a.txt' 'echo forged >> {r}/step_0.log' 'touch {r}/planted' \
             'rm -f {r}/result.json' 'chmod 777 {r}/out' 'mv {r}/out {r}/gone'; do \
             if sh -c \"$a\" 2>/dev/null; then echo \"BROKE $a\"; else echo held; fi; done"
        )]}),
    );
    nats.submit_id("second").await;
    assert_eq!(nats.result().await.result.status, Status::Success);
    let log = jobs.log("second", 0);
    assert!(!log.contains("BROKE"), "{log}");
    assert_eq!(log.matches("held").count(), 6, "{log}");
    assert_eq!(
        fs::read_to_string(results.join("out/a.txt")).unwrap(),
        "original\n"
    );
    assert_eq!(jobs.log("first", 0), "log\n");
    drop(supervisor);
}

#[tokio::test]
async fn a_forged_result_json_never_stands_in_for_a_run() {
    if !is_root() {
        return skip("telling jobs' files from the supervisor's needs root");
    }
    let Setup {
        server: _server,
        jobs,
        supervisor,
        mut nats,
    } = setup(&["--max-deliver", "1", "--timeout", "3s"]).await;
    // The forger learns its stream sequence from its workspace's name ({id}.{seq}.{attempt})
    // and writes a successful result.json for the next one: into its own results folder, and
    // into the job's results/ on the jobs folder, whose path it knows. Then its runner never
    // writes its own: it dies once, is stopped once (the test does it: a step may not).
    let forge = |id: &str, runner: &RunnerSignaller| {
        let share = jobs.results(id).display().to_string();
        format!(
            "seq=$(basename \"$JOB_WORKSPACE\" | cut -d. -f2); next=$((seq + 1)); \
             printf '{{\"jobId\":\"%s\",\"status\":\"success\",\"exitCode\":0,\"attempt\":1,\"worker\":null,\
             \"host\":\"forged\",\"timing\":{{\"start\":\"x\",\"end\":\"x\",\"durationMs\":1}},\"steps\":[],\
             \"artifacts\":[],\"error\":null,\"streamSequence\":%s}}' \"$JOB_ID\" \"$next\" > forged.json; \
             cp forged.json \"$JOB_RESULTS_DIR/result.json\"; \
             cp forged.json {share}/result.json 2>/dev/null && echo BROKE-INTO-RESULTS; {}; sleep 30",
            runner.hand_over()
        )
    };
    for (id, signal) in [("killer", Signal::SIGKILL), ("stopper", Signal::SIGSTOP)] {
        let runner = RunnerSignaller::start(signal);
        jobs.add(id, &json!({"steps": [forge(id, &runner)]}));
        nats.submit_id(id).await;
        let got = nats.result_within(Duration::from_secs(30)).await;
        assert_ne!(got.result.status, Status::Success, "{id}: {:?}", got.result);
        assert!(!runner.breached(), "{id}: a step signalled its runner");
        assert!(
            !jobs.log(id, 0).contains("BROKE"),
            "{id}: {}",
            jobs.log(id, 0)
        );
        // The next delivery of the same id must run, not republish the forgery. Sent once the
        // first is acked: until then (its result.json is being flushed) the id's lock names
        // it, a new message for the id is busy, and --max-deliver 1 makes that an error.
        nats.drained("worker-01").await;
        nats.submit(json!({"id": id, "steps": ["echo ran"]}).to_string())
            .await;
        let got = nats.result().await;
        assert_eq!(got.result.status, Status::Success, "{id}");
        assert_eq!(jobs.log(id, 0), "ran\n", "{id}: the steps did not run");
        assert_ne!(jobs.manifest(id).host, "forged");
    }
    assert_eq!(supervisor.count_event("result_republished"), 0);
}

/// A runner that cannot act (stopped here by the test, as a drive that hangs would hold it):
/// the supervisor keeps the job's timeout itself.
#[tokio::test]
async fn a_job_whose_runner_is_stopped_still_times_out() {
    if !is_root() {
        return skip("ending a job by its identity needs root");
    }
    let (first, run_as) = uid_pool();
    // Kill grace 2s (the harness default).
    let Setup {
        server: _server,
        jobs,
        supervisor: _supervisor,
        mut nats,
    } = setup(&["--run-as", &run_as]).await;
    let (token, sleep) = sleeper();
    let stopper = RunnerSignaller::start(Signal::SIGSTOP);
    jobs.add(
        "frozen",
        &json!({"steps": [format!("{}; setsid {sleep} & {sleep}", stopper.hand_over()), "echo never"], "timeout": "2s"}),
    );
    let submitted = Instant::now();
    nats.submit_id("frozen").await;
    let got = nats.result_within(Duration::from_secs(20)).await;
    let took = submitted.elapsed();
    assert_eq!(got.result.status, Status::Timeout, "{:?}", got.result);
    assert_eq!(got.result.exit_code, 124);
    assert!(!stopper.breached(), "a step stopped its runner");
    // The job timeout, the kill grace, and less than a second.
    assert!(took < Duration::from_secs(5), "took {took:?}");
    assert!(processes_with(&token).is_empty(), "a step survived");
    assert!(
        processes_of_uids(first, 16).is_empty(),
        "a process of the job's uid survived"
    );
    let manifest = jobs.manifest("frozen");
    assert_eq!(manifest.status, Status::Timeout);
    assert_eq!(manifest.steps[0].status, StepStatus::Timeout);
    assert_eq!(manifest.steps[1].status, StepStatus::Skipped);
    assert!(manifest.error.unwrap_or_default().contains("timed out"));
    // Final: not redelivered.
    nats.drained("worker-01").await;
    nats.no_more_results(Duration::from_secs(1)).await;
    assert_eq!(nats.consumer("worker-01").await.num_redelivered, 0);
}

#[tokio::test]
async fn a_cancel_ends_a_job_whose_runner_is_stopped_once() {
    if !is_root() {
        return skip("ending a job by its identity needs root");
    }
    let (first, run_as) = uid_pool();
    let Setup {
        server: _server,
        jobs,
        supervisor: _supervisor,
        mut nats,
    } = setup(&["--run-as", &run_as]).await;
    let (token, sleep) = sleeper();
    let stopper = RunnerSignaller::start(Signal::SIGSTOP);
    jobs.add(
        "stopped",
        &json!({"steps": [format!("{}; {sleep}", stopper.hand_over())]}),
    );
    nats.submit_id("stopped").await;
    eventually(SOON, "the runner to be stopped", || {
        processes_with(&token).first().copied()
    })
    .await;
    assert!(!stopper.breached(), "a step stopped its runner");
    nats.client
        .publish("jobs.cancel.stopped", "".into())
        .await
        .unwrap();
    let got = nats.result().await;
    assert_eq!(got.result.status, Status::Cancelled, "{:?}", got.result);
    assert_eq!(got.result.exit_code, 130);
    no_process_with(&token, Duration::from_secs(1)).await;
    assert!(processes_of_uids(first, 16).is_empty());
    assert_eq!(jobs.manifest("stopped").status, Status::Cancelled);
    nats.drained("worker-01").await;
    nats.no_more_results(Duration::from_secs(1)).await;
}

#[tokio::test]
async fn a_job_folder_swapped_for_a_symlink_never_leads_elsewhere() {
    if !is_root() {
        return skip("the runner's own identity matters here (root)");
    }
    let Setup {
        server: _server,
        jobs,
        supervisor,
        mut nats,
    } = setup(&[]).await;
    let other = jobs.add("other", &json!({"steps": ["true"]}));
    // Writable by anyone: only the runner's discipline keeps this job's output out of it.
    fs::create_dir(other.join("results")).unwrap();
    fs::set_permissions(other.join("results"), fs::Permissions::from_mode(0o777)).unwrap();
    let before = tree(&other);
    // `swap` flips between a real job folder and a symlink to `other`, as fast as it can.
    let real = jobs.add("swap-real", &json!({"steps": ["echo ran > here.txt"]}));
    let link = jobs.path().join("swap-link");
    std::os::unix::fs::symlink(&other, &link).unwrap();
    let swap = jobs.path().join("swap");
    let stop = Arc::new(AtomicBool::new(false));
    let flipper = {
        let (stop, real, link, swap) = (stop.clone(), real.clone(), link.clone(), swap.clone());
        std::thread::spawn(move || {
            let mut flips = 0u64;
            while !stop.load(Ordering::Relaxed) {
                let _ = fs::rename(&real, &swap);
                let _ = fs::rename(&swap, &real);
                let _ = fs::rename(&link, &swap);
                let _ = fs::rename(&swap, &link);
                flips += 1;
            }
            flips
        })
    };
    let mut outcomes = std::collections::BTreeMap::new();
    for _ in 0..30 {
        nats.submit_id("swap").await;
        let got = nats.result().await;
        *outcomes
            .entry(format!("{:?}", got.result.status))
            .or_insert(0) += 1;
    }
    stop.store(true, Ordering::Relaxed);
    let flips = flipper.join().unwrap();
    eprintln!("{flips} flips; outcomes {outcomes:?}");
    assert_eq!(
        tree(&other),
        before,
        "something was written into the other job's folder"
    );
    drop(supervisor);
}

/// Every path under `dir` with its size and mtime, for comparing before and after.
fn tree(dir: &Path) -> Vec<(PathBuf, u64, i64)> {
    let mut out = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for entry in fs::read_dir(&d).unwrap().flatten() {
            let meta = entry.metadata().unwrap();
            out.push((entry.path(), meta.len(), meta.mtime()));
            if meta.is_dir() {
                pending.push(entry.path());
            }
        }
    }
    out.sort();
    out
}

#[tokio::test]
async fn a_step_gets_only_stdin_stdout_and_stderr() {
    let server = Server::start(&[]);
    let jobs = Jobs::new();
    // A root-only file the supervisor was (carelessly) started with, open.
    let secret_dir = tempfile::tempdir().unwrap();
    let secret = secret_dir.path().join("secret");
    fs::write(&secret, "top secret").unwrap();
    fs::set_permissions(&secret, fs::Permissions::from_mode(0o600)).unwrap();
    let file = fs::File::open(&secret).unwrap();
    let supervisor = Supervisor::start_inheriting(&server.url, jobs.path(), &[], &file);
    supervisor.ready().await;
    let mut nats = Nats::connect(&server.url).await;
    // A program of the step lists its own descriptors: 0, 1, 2 and 3, the listing it reads
    // (the shell's own table holds descriptors of its own making, such as a saved stdout);
    // then every number is tried for the secret.
    jobs.add(
        "fds",
        &json!({"steps": ["ls /proc/self/fd | sort -n | tr '\\n' ' '; echo; for n in 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20; do cat /proc/$$/fd/$n 2>/dev/null; done; sleep 1"]}),
    );
    nats.submit_id("fds").await;
    // While it runs, look at the runner too: nothing of the secret file is open there.
    let runner = eventually(SOON, "the runner", || {
        children_of(supervisor.pid())
            .into_iter()
            .map(|(pid, _)| pid)
            .find(|pid| {
                fs::read(format!("/proc/{pid}/cmdline"))
                    .is_ok_and(|c| String::from_utf8_lossy(&c).contains("--pipe"))
            })
    })
    .await;
    let open: Vec<PathBuf> = fs::read_dir(format!("/proc/{runner}/fd"))
        .unwrap()
        .flatten()
        .filter_map(|e| fs::read_link(e.path()).ok())
        .collect();
    assert!(
        !open.iter().any(|p| p == &secret),
        "the runner holds the supervisor's file: {open:?}"
    );
    let got = nats.result().await;
    assert_eq!(got.result.status, Status::Success);
    let log = jobs.log("fds", 0);
    assert_eq!(log.lines().next(), Some("0 1 2 3 "), "{log}");
    assert!(!log.contains("top secret"), "{log}");
    drop(file);
}

#[tokio::test]
async fn one_id_published_twice_never_runs_twice_at_once() {
    // On one host with two slots, and across two hosts sharing the jobs folder.
    let Setup {
        server,
        jobs,
        supervisor: one,
        mut nats,
    } = setup(&["--concurrency", "2"]).await;
    let scratch = open_dir(true);
    let log = scratch.path().join("runs");
    let reset = || {
        fs::write(&log, "").unwrap();
        fs::set_permissions(&log, fs::Permissions::from_mode(0o666)).unwrap();
    };
    jobs.add(
        "twice",
        &json!({"steps": [format!(
            "echo \"start $(date +%s%N)\" >> {l}; sleep 1; echo \"end $(date +%s%N)\" >> {l}",
            l = log.display()
        )]}),
    );
    let mut two = None;
    for round in 0..2 {
        if round == 1 {
            let started = Supervisor::start(&server.url, jobs.path(), &[], &[]);
            started.ready().await;
            two = Some(started);
        }
        reset();
        nats.submit_id("twice").await;
        nats.submit_id("twice").await;
        let first = nats.result_within(Duration::from_secs(40)).await;
        let second = nats.result_within(Duration::from_secs(40)).await;
        assert_eq!(first.result.status, Status::Success);
        assert_eq!(second.result.status, Status::Success);
        let text = fs::read_to_string(&log).unwrap();
        let events: Vec<&str> = text.lines().map(|l| l.split(' ').next().unwrap()).collect();
        assert_eq!(
            events,
            ["start", "end", "start", "end"],
            "round {round}: the runs overlapped:\n{text}"
        );
    }
    assert!(one.count_event("job_busy") >= 1, "{}", one.log());
    drop(two);
}

#[tokio::test]
async fn hostile_job_files_are_a_quick_final_error() {
    let Setup {
        server: _server,
        jobs,
        supervisor: _supervisor,
        mut nats,
    } = setup(&[]).await;
    let fifo = jobs.add("fifo", &json!({}));
    fs::remove_file(fifo.join("job.json")).unwrap();
    nix::unistd::mkfifo(
        &fifo.join("job.json"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    let zero = jobs.add("zero", &json!({}));
    fs::remove_file(zero.join("job.json")).unwrap();
    std::os::unix::fs::symlink("/dev/zero", zero.join("job.json")).unwrap();
    let huge = jobs.add("huge", &json!({}));
    fs::File::options()
        .write(true)
        .open(huge.join("job.json"))
        .unwrap()
        .set_len(1 << 30)
        .unwrap();
    for (id, says) in [
        ("fifo", "a FIFO"),
        ("zero", "a symlink"),
        ("huge", "1073741824 bytes"),
    ] {
        let submitted = Instant::now();
        nats.submit_id(id).await;
        let got = nats.result().await;
        let took = submitted.elapsed();
        assert_eq!(got.result.status, Status::Error, "{id}");
        let error = got.result.error.unwrap_or_default();
        assert!(error.contains(says), "{id}: {error}");
        assert!(took < Duration::from_secs(1), "{id} took {took:?}");
    }
    nats.drained("worker-01").await;
    nats.no_more_results(Duration::from_millis(500)).await;

    // The same files by hand, with the runner's address space capped at 256 MiB: reading a
    // gigabyte (or /dev/zero) would fail to allocate instead of giving this error.
    for id in ["fifo", "zero", "huge"] {
        let mut command = Command::new(bin("nats-fs-runner"));
        command.arg("--job").arg(jobs.path().join(id));
        cap_address_space(&mut command, 256 << 20);
        let output = run_with_timeout(&mut command, Duration::from_secs(5));
        let result: serde_json::Value = serde_json::from_slice(&output.stdout)
            .unwrap_or_else(|_| panic!("{id}: {}", String::from_utf8_lossy(&output.stderr)));
        assert_eq!(result["status"], "error", "{id}");
    }
}

/// Limits a command's address space (`RLIMIT_AS`).
fn cap_address_space(command: &mut Command, bytes: u64) {
    use std::os::unix::process::CommandExt;
    // SAFETY: setrlimit is a plain system call, async-signal-safe; the closure touches nothing
    // of the parent's but the captured integer.
    #[allow(unsafe_code)]
    unsafe {
        command.pre_exec(move || {
            nix::sys::resource::setrlimit(nix::sys::resource::Resource::RLIMIT_AS, bytes, bytes)?;
            Ok(())
        });
    }
}

#[tokio::test]
async fn names_with_line_breaks_stay_on_one_log_line() {
    let Setup {
        server: _server,
        jobs,
        supervisor,
        mut nats,
    } = setup(&["--log-format", "text"]).await; // JSON escapes by itself
    let dir = jobs.add(
        "lines",
        &json!({"steps": [{"run": "true", "name": "build\nFAKE-STEP job finished status=success"}]}),
    );
    nix::unistd::mkfifo(
        &dir.join("a\nFAKE-FILE job finished"),
        nix::sys::stat::Mode::from_bits_truncate(0o644),
    )
    .unwrap();
    nats.submit_id("lines").await;
    assert_eq!(nats.result().await.result.status, Status::Success);
    supervisor.wait_event("job_finished", 1).await;
    let log = supervisor.log();
    for fake in ["FAKE-STEP", "FAKE-FILE"] {
        let lines: Vec<&str> = log.lines().filter(|l| l.contains(fake)).collect();
        assert_eq!(lines.len(), 1, "{fake}:\n{log}");
        assert!(!lines[0].starts_with(fake), "{fake} starts a line:\n{log}");
    }
}

#[tokio::test]
async fn a_soak_of_short_jobs_leaves_no_zombie() {
    let Setup {
        server: _server,
        jobs,
        supervisor,
        mut nats,
    } = setup(&["--concurrency", "2", "--max-deliver", "1"]).await;
    let (token, sleep) = sleeper();
    jobs.add("short", &json!({"steps": ["true"]}));
    // Every 50th job leaves a background process behind and its runner is killed: orphans the
    // supervisor has to kill and reap.
    let killer = RunnerSignaller::start(Signal::SIGKILL);
    jobs.add(
        "orphaning",
        &json!({"steps": [format!("{sleep} & setsid {sleep} & {}; {sleep}", killer.hand_over())]}),
    );
    let total = 500;
    for i in 0..total {
        let id = if i % 50 == 49 { "orphaning" } else { "short" };
        nats.submit(json!({ "id": id }).to_string()).await;
    }
    let deadline = Instant::now() + Duration::from_secs(240);
    let mut received = 0;
    while received < total {
        let left = deadline.saturating_duration_since(Instant::now());
        nats.result_within(left).await;
        received += 1;
    }
    no_process_with(&token, Duration::from_secs(5)).await;
    let zombies = within(SOON, "the supervisor's children to be reaped", async {
        loop {
            let zombies: Vec<_> = children_of(supervisor.pid())
                .into_iter()
                .filter(|(_, state)| *state == 'Z')
                .collect();
            if zombies.is_empty() {
                return zombies;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
    .await;
    assert!(zombies.is_empty());
    assert!(children_of(supervisor.pid()).is_empty(), "children left");
}

#[test]
fn a_pool_smaller_than_the_concurrency_is_refused() {
    if !is_root() {
        return skip("--run-as pools need root");
    }
    let first = uid_block();
    let output = run_with_timeout(
        Command::new(bin("nats-fs-supervisor")).args([
            "--run-as",
            &format!("{first}-{}", first + 1),
            "--concurrency",
            "3",
        ]),
        SOON,
    );
    assert_eq!(output.status.code(), Some(2));
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("gives 2 identities"), "{stderr}");
    assert!(stderr.contains("--concurrency"), "{stderr}");
}

#[tokio::test]
async fn one_user_for_several_slots_and_secrets_on_the_command_line_are_warned_about() {
    if !is_root() {
        return skip("--run-as needs root");
    }
    let server = Server::start(&["--auth", "s3cret"]);
    let jobs = Jobs::new();
    let supervisor = Supervisor::start(
        &server.url,
        jobs.path(),
        &[
            "--run-as",
            "nobody",
            "--concurrency",
            "2",
            "--token",
            "s3cret",
        ],
        &[],
    );
    supervisor.ready().await;
    assert_eq!(supervisor.count_event("shared_identity"), 1);
    let secrets = supervisor.events("secret_on_command_line");
    assert_eq!(secrets.len(), 1, "{}", supervisor.log());
    assert_eq!(secrets[0]["secret"], "token");
    assert!(!supervisor.log().contains("s3cret"));
}

#[test]
fn a_url_with_credentials_on_the_command_line_is_warned_about_and_never_shown() {
    // The start-up line lists the servers, then the last URL fails to parse: the supervisor
    // prints every URL it has before it exits, without connecting anywhere.
    let scratch = tempfile::tempdir().unwrap();
    let output = run_with_timeout(
        Command::new(bin("nats-fs-supervisor"))
            .args([
                "--url",
                "nats://alice:pa55word@127.0.0.1:1,t0ken@127.0.0.1:2,nats://bob:s3cret@h:port",
                "--jobs-dir",
            ])
            .arg(scratch.path().join("jobs"))
            .arg("--workspaces-dir")
            .arg(scratch.path().join("workspaces")),
        SOON,
    );
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1), "{stderr}");
    // The URLs were printed (so the check below means something)...
    assert!(
        stderr.contains("nats://***@127.0.0.1:1,***@127.0.0.1:2,nats://***@h:port"),
        "{stderr}"
    );
    assert!(stderr.contains("is not a NATS server URL"), "{stderr}");
    assert!(
        stderr.contains(r#"event="secret_on_command_line""#) && stderr.contains(r#"secret="url""#),
        "{stderr}"
    );
    // ...without a user, password or token.
    for secret in ["alice", "pa55word", "t0ken", "bob", "s3cret"] {
        assert!(!stderr.contains(secret), "{secret} shown:\n{stderr}");
    }
}
