//! One run of a job, start to end (SPEC §4): empty `results/`, read `job.json`, stage, run the
//! steps, sync, write the manifest. Both modes of the runner — the supervisor's pipe and
//! `--job` — call [`run`]; only how events are reported differs.
//!
//! The job folder and its `results/` are reached only through the descriptors in the start
//! message (opened by the supervisor, or by `--job`, without following symlinks), as
//! `/proc/self/fd/N` paths: a folder re-pointed by name after it was opened changes nothing
//! here. Messages name the folder by its real path.
//!
//! How a job ended is data ([`Outcome`]), never an `Err`: the job's own problems end as a status
//! with a manifest; problems of the host (disk, permissions, shared drive) end as
//! [`Outcome::Fault`] so the supervisor retries the job later instead of failing it.

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nats_fs::folder::{read_job_json, FolderError, JobFileError};
use nats_fs::job::{JobSpec, Step};
use nats_fs::manifest::{
    Artifact, Manifest, StepRecord, StepStatus, Timing, MANIFEST_FILE, RESULTS_DIR,
};
use nats_fs::protocol::{FromRunner, StartJob, StepInfo, PROTOCOL_VERSION};
use nats_fs::Status;
use tokio::time::Instant;

use crate::control::StopWatch;
use crate::report::Report;
use crate::stage::{self, Staged};
use crate::step::{self, Ending, StepCommand};
use crate::sync::{self, Synced};

/// How a run ended.
#[derive(Debug)]
pub(crate) enum Outcome {
    /// A final status; `manifest` is on disk when present.
    Finished {
        status: Status,
        exit_code: i32,
        error: Option<String>,
        manifest: Option<Box<Manifest>>,
        duration_ms: u64,
    },
    /// Stopped for redelivery; nothing final written.
    Aborted { reason: String },
    /// A fault of the host; nothing final written; worth retrying.
    Fault { error: String },
}

impl Outcome {
    /// The end of a run whose job folder could not be opened.
    pub(crate) fn from_folder_error(e: &FolderError) -> Self {
        if e.is_final() {
            Self::Finished {
                status: Status::Error,
                exit_code: Status::Error.exit_code(1),
                error: Some(e.to_string()),
                manifest: None,
                duration_ms: 0,
            }
        } else {
            fault(e.to_string())
        }
    }

    /// The last event of the pipe conversation.
    pub(crate) fn event(&self) -> FromRunner {
        match self {
            Self::Finished {
                status,
                exit_code,
                error,
                manifest,
                duration_ms,
            } => FromRunner::Finished {
                status: *status,
                exit_code: *exit_code,
                error: error.clone(),
                reason: None,
                manifest: manifest.is_some(),
                duration_ms: *duration_ms,
            },
            Self::Aborted { reason } => FromRunner::Aborted {
                reason: reason.clone(),
            },
            Self::Fault { error } => FromRunner::Fault {
                error: error.clone(),
            },
        }
    }

    pub(crate) fn is_success(&self) -> bool {
        matches!(
            self,
            Self::Finished {
                status: Status::Success,
                ..
            }
        )
    }
}

/// Runs the job described by `start`, reporting progress to `report`.
pub(crate) async fn run(
    start: &StartJob,
    report: &mut dyn Report,
    stop: &mut StopWatch,
) -> Outcome {
    if start.version != PROTOCOL_VERSION {
        return Outcome::Fault {
            error: format!(
                "the supervisor speaks pipe protocol {} but this runner speaks {PROTOCOL_VERSION}: install matching versions",
                start.version
            ),
        };
    }
    let (Some(job_fd), Some(results_fd)) = (start.job_fd, start.results_fd) else {
        return fault("the start message names no job folder descriptors".to_owned());
    };
    let job_dir = PathBuf::from(format!("/proc/self/fd/{job_fd}"));
    let results = PathBuf::from(format!("/proc/self/fd/{results_fd}"));
    if !(job_dir.is_dir() && results.is_dir()) {
        return fault(format!(
            "descriptors {job_fd} and {results_fd} are not the open job folder and results/"
        ));
    }
    let mut job = Job::new(start, job_dir, results);
    match job.run(report, stop).await {
        Ok(outcome) | Err(outcome) => outcome,
    }
}

/// The state of one run, for building the manifest.
struct Job<'a> {
    start: &'a StartJob,
    host: String,
    started_at: SystemTime,
    started: Instant,
    /// The job folder and `results/`, as `/proc/self/fd/N`: how this run reaches them.
    dir: PathBuf,
    results: PathBuf,
    /// `results/` by its real name, for messages and the steps' `JOB_RESULTS_DIR`.
    shown_results: PathBuf,
    warnings: Vec<String>,
    stage_ms: u64,
    sync_ms: u64,
}

impl<'a> Job<'a> {
    fn new(start: &'a StartJob, dir: PathBuf, results: PathBuf) -> Self {
        Self {
            start,
            host: nats_fs::host_name(),
            started_at: SystemTime::now(),
            started: Instant::now(),
            dir,
            results,
            shown_results: start.job_dir.join(RESULTS_DIR),
            warnings: Vec::new(),
            stage_ms: 0,
            sync_ms: 0,
        }
    }

    /// The run proper; `Err` carries an early end, so `?` reads naturally.
    async fn run(
        &mut self,
        report: &mut dyn Report,
        stop: &mut StopWatch,
    ) -> Result<Outcome, Outcome> {
        self.empty_results()?;
        let spec = match self.load_spec() {
            Ok(spec) => spec,
            Err(problem) => {
                return self.finish(Status::Error, Vec::new(), Vec::new(), Some(problem));
            }
        };
        let timeout = spec
            .timeout
            .unwrap_or(Duration::from_millis(self.start.default_timeout_ms));
        report.event(&FromRunner::Loaded {
            limits: nats_fs::limits::Limits::default(),
            timeout_ms: ms(timeout),
            steps: spec
                .steps
                .iter()
                .map(|step| StepInfo {
                    name: step.name.clone(),
                    command: step.run.clone(),
                })
                .collect(),
        });
        let interrupt = stop.interrupt();

        let clock = Instant::now();
        let staged = match self.stage(interrupt.clone()).await {
            Ok(staged) => staged,
            Err(outcome) => return self.cancelled_instead(outcome, stop, &spec),
        };
        self.stage_ms = ms(clock.elapsed());
        report.event(&FromRunner::Staged {
            files: staged.files,
            bytes: staged.bytes,
            duration_ms: self.stage_ms,
        });
        for message in &staged.skipped {
            self.warn(report, message.clone());
        }

        let job_deadline = self.started.checked_add(timeout);
        let mut records = Vec::with_capacity(spec.steps.len());
        let mut verdict = Verdict::Success;
        for (index, step) in spec.steps.iter().enumerate() {
            if verdict != Verdict::Success {
                records.push(skipped(index, step));
                continue;
            }
            if let Some(requested) = stop.current() {
                verdict = Verdict::Stopped {
                    cancel: requested.cancel,
                };
                records.push(skipped(index, step));
                continue;
            }
            let (record, step_verdict) = self
                .run_step(index, step, &spec, job_deadline, timeout, report, stop)
                .await?;
            records.push(record);
            verdict = step_verdict;
        }

        let (status, failed_code, error) = match verdict {
            Verdict::Success => (Status::Success, 0, None),
            Verdict::Failed { code, what } => (Status::Failed, code, Some(what)),
            Verdict::TimedOut { what } => (Status::Timeout, 0, Some(what)),
            Verdict::Stopped { cancel: true } => (
                Status::Cancelled,
                0,
                Some("cancelled by request".to_owned()),
            ),
            Verdict::Stopped { cancel: false } => {
                return Err(Outcome::Aborted {
                    reason: "stopped by the supervisor before it finished; it will run again"
                        .to_owned(),
                })
            }
        };

        let clock = Instant::now();
        let synced = self.sync(&staged, interrupt).await?;
        self.sync_ms = ms(clock.elapsed());
        report.event(&FromRunner::Synced {
            files: synced.artifacts.len() as u64,
            bytes: synced.bytes,
            duration_ms: self.sync_ms,
        });
        for message in &synced.skipped {
            self.warn(report, message.clone());
        }
        self.finish_with_code(
            status,
            status.exit_code(failed_code),
            records,
            synced.artifacts,
            error,
        )
    }

    /// Empties `results/`: nothing of an earlier run may be mistaken for this run's output.
    /// (Under a supervisor it is empty already: the supervisor emptied it, as the earlier run's
    /// files no longer belong to the runner's user.)
    fn empty_results(&self) -> Result<(), Outcome> {
        nats_fs::tree::empty_dir(&self.results).map_err(|e| {
            fault(format!(
                "emptying {} (it must be writable by {}): {e}",
                self.shown_results.display(),
                whoami()
            ))
        })
    }

    /// An immediate stop ended the run early (`outcome`): if the stop was a cancel, the job
    /// ends `cancelled` with every step skipped, rather than as a hand-back.
    fn cancelled_instead(
        &self,
        outcome: Outcome,
        stop: &StopWatch,
        spec: &JobSpec,
    ) -> Result<Outcome, Outcome> {
        if !matches!(outcome, Outcome::Aborted { .. }) || !stop.current().is_some_and(|s| s.cancel)
        {
            return Err(outcome);
        }
        let steps = spec
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| skipped(index, step))
            .collect();
        self.finish(
            Status::Cancelled,
            steps,
            Vec::new(),
            Some("cancelled by request".to_owned()),
        )
    }

    /// Reads `job.json` and applies the request's steps. `Err` is the job's own problem.
    fn load_spec(&self) -> Result<JobSpec, String> {
        let overridden = self.start.steps.is_some();
        let mut spec = match read_job_json(&self.dir, &self.start.job_dir) {
            Ok(bytes) => JobSpec::parse(&bytes, !overridden).map_err(|e| e.to_string())?,
            Err(JobFileError::Missing(_)) if overridden => JobSpec::default(),
            Err(e) => return Err(e.to_string()),
        };
        if let Some(steps) = &self.start.steps {
            spec.steps.clone_from(steps);
        }
        Ok(spec)
    }

    /// A message with the `/proc/self/fd/N` paths this run works through replaced by the real
    /// names of the job folder and `results/`.
    fn shown(&self, message: &str) -> String {
        let results = self.results.to_string_lossy();
        let job = self.dir.to_string_lossy();
        message
            .replace(results.as_ref(), &self.shown_results.to_string_lossy())
            .replace(job.as_ref(), &self.start.job_dir.to_string_lossy())
    }

    async fn stage(&self, interrupt: Arc<AtomicBool>) -> Result<Staged, Outcome> {
        let from = self.dir.clone();
        let to = self.start.workspace.clone();
        let staged = tokio::task::spawn_blocking(move || stage::stage(&from, &to, &interrupt))
            .await
            .map_err(|e| fault(format!("staging: {e}")))?;
        staged.map_err(|e| match e {
            stage::StageError::Interrupted => aborted(),
            e @ stage::StageError::Io { .. } => fault(format!(
                "{} (the runner runs as {})",
                self.shown(&e.to_string()),
                whoami()
            )),
        })
    }

    async fn sync(&self, staged: &Staged, interrupt: Arc<AtomicBool>) -> Result<Synced, Outcome> {
        let workspace = self.start.workspace.clone();
        let results = self.results.clone();
        let snapshot = staged.snapshot.clone();
        let synced = tokio::task::spawn_blocking(move || {
            sync::sync(&workspace, &results, &snapshot, &interrupt)
        })
        .await
        .map_err(|e| fault(format!("syncing: {e}")))?;
        match synced {
            Ok(synced) => Ok(synced),
            Err(sync::SyncError::Interrupted) => Ok(Synced {
                skipped: vec!["syncing was interrupted by an immediate stop".to_owned()],
                ..Synced::default()
            }),
            Err(e) => Err(fault(self.shown(&e.to_string()))),
        }
    }

    /// Runs step `index` and says how the job goes on.
    #[allow(clippy::too_many_arguments)]
    async fn run_step(
        &mut self,
        index: usize,
        step: &Step,
        spec: &JobSpec,
        job_deadline: Option<Instant>,
        job_timeout: Duration,
        report: &mut dyn Report,
        stops: &mut StopWatch,
    ) -> Result<(StepRecord, Verdict), Outcome> {
        let log_name = format!("step_{index}.log");
        let log = open_log(&self.results.join(&log_name)).map_err(|e| {
            fault(format!(
                "creating {}: {e}",
                self.shown_results.join(&log_name).display()
            ))
        })?;
        let began = Instant::now();
        let step_deadline = step.timeout.and_then(|t| began.checked_add(t));
        let deadline = match (step_deadline, job_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let env = self.step_env(spec, step);
        let running = step::spawn(StepCommand {
            run: &step.run,
            cwd: &self.start.workspace,
            env: &env,
            log,
            deadline,
            grace: Duration::from_millis(self.start.kill_grace_ms),
        })
        .map_err(|e| fault(format!("starting /bin/sh for step {index}: {e}")))?;
        report.event(&FromRunner::StepStarted {
            index,
            name: step.name.clone(),
            pid: running.pid(),
        });
        let finished = running
            .wait(stops)
            .await
            .map_err(|e| fault(format!("waiting for step {index}: {e}")))?;
        let duration_ms = ms(began.elapsed());
        let label = step_label(index, step);
        if finished.leftovers > 0 {
            self.warn(
                report,
                format!(
                    "{label} left {} process(es) running after it ended; they were killed",
                    finished.leftovers
                ),
            );
        }
        if finished.stuck > 0 {
            self.warn(
                report,
                format!(
                    "{label} left {} process(es) that did not die after SIGKILL",
                    finished.stuck
                ),
            );
        }
        let code = finished.exit_code();
        let (status, verdict) = judge(
            &finished,
            &label,
            step.timeout,
            step_deadline == deadline,
            job_timeout,
        );
        report.event(&FromRunner::StepFinished {
            index,
            status,
            exit_code: Some(code),
            signal: finished.signal_name(),
            duration_ms,
        });
        let record = StepRecord {
            index,
            name: step.name.clone(),
            command: step.run.clone(),
            status,
            exit_code: Some(code),
            signal: finished.signal_name(),
            duration_ms,
            log: Some(log_name),
            resources: None,
        };
        Ok((record, verdict))
    }

    /// The step's environment, in the order of SPEC §4.2: base, job variables, the job's and
    /// the step's `env`, then what the operator passes through.
    fn step_env(&self, spec: &JobSpec, step: &Step) -> BTreeMap<String, String> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut env = self.start.base_env.clone();
        env.insert("HOME".into(), path(&self.start.workspace));
        env.insert("JOB_ID".into(), self.start.id.to_string());
        env.insert("JOB_ATTEMPT".into(), self.start.attempt.to_string());
        env.insert("JOB_WORKSPACE".into(), path(&self.start.workspace));
        env.insert("JOB_RESULTS_DIR".into(), path(&self.shown_results));
        if let Some(tmp) = &self.start.tmp_dir {
            env.insert("TMPDIR".into(), path(tmp));
        }
        env.extend(spec.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(step.env.iter().map(|(k, v)| (k.clone(), v.clone())));
        env.extend(
            self.start
                .pass_env
                .iter()
                .map(|(k, v)| (k.clone(), v.clone())),
        );
        env
    }

    fn warn(&mut self, report: &mut dyn Report, message: String) {
        report.event(&FromRunner::Warning {
            message: message.clone(),
        });
        self.warnings.push(message);
    }

    fn finish(
        &self,
        status: Status,
        steps: Vec<StepRecord>,
        artifacts: Vec<Artifact>,
        error: Option<String>,
    ) -> Result<Outcome, Outcome> {
        self.finish_with_code(status, status.exit_code(1), steps, artifacts, error)
    }

    /// Writes the manifest, last, and ends the run.
    fn finish_with_code(
        &self,
        status: Status,
        exit_code: i32,
        steps: Vec<StepRecord>,
        artifacts: Vec<Artifact>,
        error: Option<String>,
    ) -> Result<Outcome, Outcome> {
        let duration_ms = ms(self.started.elapsed());
        let manifest = Manifest {
            job_id: self.start.id.to_string(),
            status,
            exit_code,
            attempt: self.start.attempt,
            worker: self.start.worker.clone(),
            host: self.host.clone(),
            timing: Timing {
                start: humantime::format_rfc3339_millis(self.started_at).to_string(),
                end: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                duration_ms,
                stage_ms: self.stage_ms,
                sync_ms: self.sync_ms,
            },
            steps,
            artifacts,
            error: error.clone(),
            reason: None,
            limits: nats_fs::limits::Limits::default(),
            resources: None,
            stream_sequence: self.start.stream_sequence,
            warnings: self.warnings.clone(),
        };
        manifest.write_atomic(&self.results).map_err(|e| {
            fault(format!(
                "writing {}: {e}",
                self.shown_results.join(MANIFEST_FILE).display()
            ))
        })?;
        Ok(Outcome::Finished {
            status,
            exit_code,
            error,
            manifest: Some(Box::new(manifest)),
            duration_ms,
        })
    }
}

/// Creates a step's log in `results/`. Whatever a step may have put at that name (a FIFO that
/// would block the open, a link that would redirect the log) is removed first; the log is
/// created anew, never opened through a link.
fn open_log(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    nats_fs::tree::remove_entry(path)?;
    fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// How the job goes on after a step.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Verdict {
    Success,
    Failed { code: i32, what: String },
    TimedOut { what: String },
    Stopped { cancel: bool },
}

/// The step's status and how the job goes on, from how the step ended. `step_deadline_first`
/// says whether the step's own deadline (not the job's) was the one that applied.
fn judge(
    finished: &step::Finished,
    label: &str,
    step_timeout: Option<Duration>,
    step_deadline_first: bool,
    job_timeout: Duration,
) -> (StepStatus, Verdict) {
    let code = finished.exit_code();
    match finished.ending {
        Ending::Exited if code == 0 => (StepStatus::Success, Verdict::Success),
        Ending::Exited => {
            let what = match finished.signal_name() {
                Some(signal) => format!("{label} was killed by {signal}"),
                None => format!("{label} exited with code {code}"),
            };
            (StepStatus::Failed, Verdict::Failed { code, what })
        }
        Ending::TimedOut => {
            let what = match step_timeout {
                Some(timeout) if step_deadline_first => {
                    format!(
                        "{label} timed out after {}",
                        humantime::format_duration(timeout)
                    )
                }
                _ => format!(
                    "the job timed out after {} during {label}",
                    humantime::format_duration(job_timeout)
                ),
            };
            (StepStatus::Timeout, Verdict::TimedOut { what })
        }
        Ending::Stopped(requested) => (
            StepStatus::Cancelled,
            Verdict::Stopped {
                cancel: requested.cancel,
            },
        ),
    }
}

fn skipped(index: usize, step: &Step) -> StepRecord {
    StepRecord {
        index,
        name: step.name.clone(),
        command: step.run.clone(),
        status: StepStatus::Skipped,
        exit_code: None,
        signal: None,
        duration_ms: 0,
        log: None,
        resources: None,
    }
}

fn step_label(index: usize, step: &Step) -> String {
    match &step.name {
        Some(name) => format!("step {index} ({name})"),
        None => format!("step {index}"),
    }
}

fn fault(error: String) -> Outcome {
    Outcome::Fault { error }
}

fn aborted() -> Outcome {
    Outcome::Aborted {
        reason: "stopped at once before it finished; nothing final was written".to_owned(),
    }
}

/// The user the runner runs as, for error messages about permissions.
fn whoami() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => format!("{} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}

fn ms(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
