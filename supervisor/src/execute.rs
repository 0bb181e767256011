//! Running one job through a runner: prepare the folders the runner needs, spawn it, hold the
//! pipe conversation, and clean up after it whatever happened. Shared by the NATS path
//! ([`crate::job_task`]) and `--dry-run`; knows nothing of acks.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::ExitStatus;
use std::time::Duration;

use nats_fs::job::JobRequest;
use nats_fs::manifest::{ResultMessage, RESULTS_DIR};
use nats_fs::protocol::{CancelMode, FromRunner, StartJob, ToRunner, PROTOCOL_VERSION};
use nats_fs::reap;
use nats_fs::Status;
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::{mkdirat, Mode};
use nix::unistd::fchown;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::process::{Child, ChildStderr, ChildStdin, ChildStdout};
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::spawn::{spawn_runner, RunAs, Runners};

/// How many of the runner's last stderr lines are kept to explain a crash.
const STDERR_TAIL: usize = 8;
/// After a stop request, how much longer than the kill grace a runner gets before SIGKILL.
const RUNNER_SLACK: Duration = Duration::from_secs(5);
/// How long to keep killing a crashed runner's leftovers.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(5);

/// How a job ended, from the supervisor's side.
#[derive(Debug, Clone, PartialEq)]
pub enum JobEnd {
    /// A final status; publish the result and settle the message.
    Final(Box<ResultMessage>),
    /// Stopped on purpose before it finished; nothing final was written.
    Aborted(String),
    /// A fault of the host: retry later.
    Fault(String),
}

/// One job to run.
#[derive(Debug)]
pub struct JobRun<'a> {
    pub settings: &'a Settings,
    pub request: &'a JobRequest,
    /// The delivery count, 1 for the first attempt.
    pub attempt: u64,
    pub stream_sequence: Option<u64>,
    /// Distinguishes the workspace folder (the stream sequence, or "dry").
    pub tag: String,
}

impl JobRun<'_> {
    /// `{jobs_dir}/{id}`.
    fn job_dir(&self) -> PathBuf {
        self.settings.jobs_dir.join(self.request.id.as_str())
    }

    fn workspace(&self) -> PathBuf {
        self.settings
            .workspaces_dir
            .join(format!("{}.{}.{}", self.request.id, self.tag, self.attempt))
    }
}

/// Runs the job to its end. `control` carries stop requests (cancel, drain, lost lease).
///
/// The file work before and after the runner runs on tokio's blocking pool: the job folder is
/// usually on a shared drive, and a drive that hangs must not stall the other jobs' leases.
pub async fn execute(
    job: &JobRun<'_>,
    runners: &Runners,
    control: &mut mpsc::Receiver<CancelMode>,
) -> JobEnd {
    let job_dir = job.job_dir();
    let workspace = job.workspace();
    let prepared = {
        let (job_dir, workspace) = (job_dir.clone(), workspace.clone());
        let run_as = job.settings.run_as.clone();
        let id = job.request.id.to_string();
        tokio::task::spawn_blocking(move || prepare(&job_dir, &workspace, &run_as, &id)).await
    };
    match prepared {
        Ok(Ok(())) => {}
        Ok(Err(end)) => return end,
        Err(e) => return JobEnd::Fault(format!("preparing the job: {e}")),
    }
    let end = converse(job, &job_dir, &workspace, runners, control).await;
    let removed = {
        let workspace = workspace.clone();
        tokio::task::spawn_blocking(move || nats_fs::tree::remove_tree(&workspace)).await
    };
    if let Ok(Err(e)) = removed {
        warn!("removing the workspace {}: {e}", workspace.display());
    }
    end
}

/// Checks the job folder, readies `results/` and creates the workspace.
///
/// Everything done in the job folder as root goes through a descriptor opened without
/// following symlinks: a job folder, or a `results` inside it, that is (or is swapped for) a
/// link to somewhere else can never make the supervisor create or give away a folder there.
fn prepare(job_dir: &Path, workspace: &Path, run_as: &RunAs, id: &str) -> Result<(), JobEnd> {
    let dir = match open_folder(AT_FDCWD, job_dir) {
        Ok(dir) => dir,
        Err(Errno::ENOENT) => {
            return Err(final_error(
                id,
                format!("the job folder {} does not exist", job_dir.display()),
            ))
        }
        Err(Errno::ELOOP | Errno::ENOTDIR) if is_symlink(job_dir) => {
            return Err(final_error(
                id,
                format!(
                    "the job folder {} is a symlink; it must be a real folder",
                    job_dir.display()
                ),
            ))
        }
        Err(Errno::ENOTDIR) => {
            return Err(final_error(
                id,
                format!("{} is not a folder", job_dir.display()),
            ))
        }
        Err(e) => {
            return Err(JobEnd::Fault(format!(
                "opening the job folder {}: {e}",
                job_dir.display()
            )))
        }
    };
    prepare_results(&dir, &job_dir.join(RESULTS_DIR), run_as, id)?;
    create_workspace(workspace, run_as).map_err(|e| {
        JobEnd::Fault(format!(
            "creating the workspace {}: {e}",
            workspace.display()
        ))
    })
}

/// Opens `job_dir/results/result.json` without following a symlink anywhere on the way.
pub fn open_manifest(job_dir: &Path) -> nix::Result<fs::File> {
    let dir = open_folder(AT_FDCWD, job_dir)?;
    let results = open_folder(&dir, Path::new(RESULTS_DIR))?;
    let file = openat(
        &results,
        nats_fs::manifest::MANIFEST_FILE,
        OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
        Mode::empty(),
    )?;
    Ok(fs::File::from(file))
}

fn is_symlink(path: &Path) -> bool {
    fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Opens a folder for `*at` calls; a symlink fails with `ELOOP`, anything else with `ENOTDIR`.
fn open_folder<Fd: AsFd>(at: Fd, path: &Path) -> nix::Result<OwnedFd> {
    openat(
        at,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// Makes sure `results/` is a real folder owned by the runner's user; `path` is for messages.
fn prepare_results(job: &OwnedFd, path: &Path, run_as: &RunAs, id: &str) -> Result<(), JobEnd> {
    match mkdirat(job, RESULTS_DIR, Mode::from_bits_truncate(0o755)) {
        Ok(()) | Err(Errno::EEXIST) => {}
        Err(e) => return Err(JobEnd::Fault(format!("creating {}: {e}", path.display()))),
    }
    let results = match open_folder(job, Path::new(RESULTS_DIR)) {
        Ok(results) => results,
        Err(Errno::ELOOP | Errno::ENOTDIR) => {
            return Err(final_error(
                id,
                format!(
                    "{} is in the way: results must be a folder, not a file or a symlink",
                    path.display()
                ),
            ))
        }
        Err(e) => return Err(JobEnd::Fault(format!("opening {}: {e}", path.display()))),
    };
    if run_as.switch {
        if let Err(e) = fchown(&results, Some(run_as.uid), Some(run_as.gid)) {
            // A root-squashed NFS export refuses this; the runner may still be able to write.
            debug!("giving {} to {}: {e}", path.display(), run_as.describe());
        }
    }
    Ok(())
}

/// A fresh, private workspace owned by the runner's user (removing a stale one first).
fn create_workspace(workspace: &Path, run_as: &RunAs) -> io::Result<()> {
    nats_fs::tree::remove_tree(workspace)?;
    fs::DirBuilder::new().mode(0o700).create(workspace)?;
    fs::set_permissions(workspace, fs::Permissions::from_mode(0o700))?;
    if run_as.switch {
        std::os::unix::fs::lchown(
            workspace,
            Some(run_as.uid.as_raw()),
            Some(run_as.gid.as_raw()),
        )?;
    }
    Ok(())
}

/// Spawns the runner and talks to it until it exits.
async fn converse(
    job: &JobRun<'_>,
    job_dir: &Path,
    workspace: &Path,
    runners: &Runners,
    control: &mut mpsc::Receiver<CancelMode>,
) -> JobEnd {
    let settings = job.settings;
    let (mut child, pid) = match spawn_runner(&settings.runner, &settings.run_as, runners) {
        Ok(spawned) => spawned,
        Err(e) => {
            return JobEnd::Fault(format!(
                "starting the runner {}: {e}",
                settings.runner.display()
            ));
        }
    };
    debug!(pid, "runner started");
    let (Some(stdin), Some(stdout), Some(stderr)) =
        (child.stdin.take(), child.stdout.take(), child.stderr.take())
    else {
        return JobEnd::Fault("the runner's pipes are missing".to_owned());
    };
    let mut talk = Talk {
        stdin: Some(stdin),
        tail: Vec::new(),
        last: None,
    };
    // Never logged: the start message carries the values of --pass-env variables.
    if let Err(e) = talk.send(&start_message(job, job_dir, workspace)).await {
        warn!("sending the job to the runner: {e}");
    }
    talk.listen(
        stdout,
        stderr,
        control,
        settings.kill_grace,
        &mut child,
        pid,
    )
    .await;
    let status = child.wait().await;
    runners.remove(pid);
    let clean = matches!(&status, Ok(s) if s.code().is_some()) && talk.last.is_some();
    if !clean {
        // A runner that died abnormally cannot have killed its steps: they were re-parented to
        // us (we are a child subreaper). Kill them before anything else runs.
        let swept = reap::kill_children(|p| runners.contains(p.as_raw()), None, SWEEP_TIMEOUT);
        if swept.reaped > 0 || swept.left > 0 {
            warn!(
                reaped = swept.reaped,
                stuck = swept.left,
                "killed processes left by the runner"
            );
        }
    }
    interpret(job, talk.last, status, &talk.tail)
}

fn start_message(job: &JobRun<'_>, job_dir: &Path, workspace: &Path) -> ToRunner {
    let settings = job.settings;
    ToRunner::Start(Box::new(StartJob {
        version: PROTOCOL_VERSION,
        id: job.request.id.clone(),
        attempt: job.attempt,
        stream_sequence: job.stream_sequence,
        job_dir: job_dir.to_owned(),
        workspace: workspace.to_owned(),
        steps: job.request.steps.clone(),
        default_timeout_ms: millis(settings.default_timeout),
        kill_grace_ms: millis(settings.kill_grace),
        base_env: crate::base_env(),
        pass_env: settings
            .pass_env
            .iter()
            .filter_map(|name| std::env::var(name).ok().map(|value| (name.clone(), value)))
            .collect(),
        worker: Some(settings.worker_id.clone()),
    }))
}

/// The supervisor's side of one pipe conversation.
struct Talk {
    /// Open until the runner is done: closing it tells the runner to stop at once.
    stdin: Option<ChildStdin>,
    /// The runner's last stderr lines, to explain a crash.
    tail: Vec<String>,
    /// The runner's final event, once it came.
    last: Option<FromRunner>,
}

impl Talk {
    async fn send(&mut self, message: &ToRunner) -> io::Result<()> {
        let Some(pipe) = self.stdin.as_mut() else {
            return Err(io::Error::from(io::ErrorKind::BrokenPipe));
        };
        let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
        line.push(b'\n');
        pipe.write_all(&line).await?;
        pipe.flush().await
    }

    /// Relays events and stderr to the log and stop requests to the runner, until the runner
    /// closes its output. A runner that ignores a stop request past the kill grace is killed.
    async fn listen(
        &mut self,
        stdout: ChildStdout,
        stderr: ChildStderr,
        control: &mut mpsc::Receiver<CancelMode>,
        kill_grace: Duration,
        child: &mut Child,
        pid: i32,
    ) {
        let mut events = BufReader::new(stdout).lines();
        let mut errors = BufReader::new(stderr).lines();
        let mut kill_at: Option<Instant> = None;
        let (mut events_open, mut errors_open, mut control_open) = (true, true, true);
        while events_open || errors_open {
            tokio::select! {
                line = events.next_line(), if events_open => match line {
                    Ok(Some(line)) => self.event(&line),
                    Ok(None) | Err(_) => events_open = false,
                },
                line = errors.next_line(), if errors_open => match line {
                    Ok(Some(line)) => {
                        info!(target: "nats_fs_runner", "{line}");
                        if self.tail.len() == STDERR_TAIL {
                            self.tail.remove(0);
                        }
                        self.tail.push(line);
                    }
                    Ok(None) | Err(_) => errors_open = false,
                },
                mode = control.recv(), if control_open => match mode {
                    Some(mode) => {
                        if let Err(e) = self.send(&ToRunner::Cancel { mode }).await {
                            debug!("telling the runner to stop: {e}");
                        }
                        let grace = if mode == CancelMode::AbortNow { Duration::ZERO } else { kill_grace };
                        let deadline = Instant::now() + grace + RUNNER_SLACK;
                        kill_at = Some(kill_at.map_or(deadline, |at| at.min(deadline)));
                    }
                    None => control_open = false,
                },
                () = until(kill_at) => {
                    warn!(pid, "the runner did not stop in time; killing it");
                    let _ = child.start_kill();
                    kill_at = None;
                }
            }
        }
        self.stdin = None;
    }

    fn event(&mut self, line: &str) {
        match serde_json::from_str::<FromRunner>(line) {
            Ok(event) => {
                log_event(&event);
                if event.is_last() {
                    self.last = Some(event);
                }
            }
            Err(e) => warn!("unreadable line from the runner ({e}): {line:.200}"),
        }
    }
}

/// Maps the runner's last event (or its absence) to a [`JobEnd`].
fn interpret(
    job: &JobRun<'_>,
    last: Option<FromRunner>,
    status: io::Result<ExitStatus>,
    tail: &[String],
) -> JobEnd {
    let id = job.request.id.as_str();
    match last {
        Some(FromRunner::Finished {
            status,
            exit_code,
            error,
            manifest,
            duration_ms,
        }) => JobEnd::Final(Box::new(ResultMessage {
            id: id.to_owned(),
            status,
            exit_code,
            manifest_file: manifest.then(|| nats_fs::manifest::MANIFEST_PATH.to_owned()),
            attempt: Some(job.attempt),
            error,
            duration_ms: Some(duration_ms),
            worker: Some(job.settings.worker_id.clone()),
        })),
        Some(FromRunner::Aborted { reason }) => JobEnd::Aborted(reason),
        Some(FromRunner::Fault { error }) => JobEnd::Fault(error),
        _ => {
            let how = match status {
                Ok(status) => describe_exit(status),
                Err(e) => format!("could not be waited for ({e})"),
            };
            let said = tail
                .last()
                .map(|l| format!("; it said: {l}"))
                .unwrap_or_default();
            JobEnd::Fault(format!("the runner {how} before finishing the job{said}"))
        }
    }
}

fn describe_exit(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(code), _) => format!("exited with code {code}"),
        (None, Some(signal)) => format!("was killed by {}", reap::signal_name(signal)),
        _ => "ended".to_owned(),
    }
}

fn log_event(event: &FromRunner) {
    match event {
        FromRunner::Staged {
            files,
            bytes,
            duration_ms,
        } => info!(files, bytes, duration_ms, "staged"),
        FromRunner::StepStarted { index, name, pid } => {
            info!(step = index, name = name.as_deref(), pid, "step started");
        }
        FromRunner::StepFinished {
            index,
            status,
            exit_code,
            signal,
            duration_ms,
        } => info!(
            step = index,
            status = %status,
            exit_code,
            signal = signal.as_deref(),
            duration_ms,
            "step finished"
        ),
        FromRunner::Synced {
            files,
            bytes,
            duration_ms,
        } => info!(files, bytes, duration_ms, "synced artifacts"),
        FromRunner::Warning { message } => warn!("{message}"),
        FromRunner::Finished { status, error, .. } => {
            debug!(%status, error = error.as_deref(), "runner finished");
        }
        FromRunner::Aborted { reason } => info!("runner stopped: {reason}"),
        FromRunner::Fault { error } => warn!("runner fault: {error}"),
        FromRunner::Unknown => {}
    }
}

/// A final `error` with no manifest.
fn final_error(id: &str, error: String) -> JobEnd {
    JobEnd::Final(Box::new(ResultMessage::error(id, error)))
}

impl JobEnd {
    /// Whether the job ended in success.
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Final(result) if result.status == Status::Success)
    }
}

async fn until(at: Option<Instant>) {
    match at {
        Some(at) => sleep_until(at).await,
        None => std::future::pending().await,
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
