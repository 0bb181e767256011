//! One run of a job, start to end (contract §4): empty `results/`, read `job.json`, stage, run the
//! steps, sync, write the manifest. Both modes of the runner — the supervisor's pipe and
//! `--job` — call [`run`]; only how events are reported differs.
//!
//! The job folder is opened once, with the share user's rights and without following a
//! symlink ([`JobFolder::open`], which also gives the run an empty `results/`: an earlier
//! run's is moved aside, never emptied), and reached from then on only through those
//! descriptors, as `/proc/self/fd/N` paths: a folder re-pointed by name after it was opened
//! changes nothing here. Messages name the folder by its real path. The steps never touch
//! the job folder: they work in the workspace, write into their own results folder
//! (`$JOB_RESULTS_DIR`, copied to `results/` at the end) and print into a pipe that the runner
//! copies to their log ([`crate::logs`]).
//!
//! How a job ended is data ([`JobOutcome`]), never an `Err`: the job's own problems end as a
//! final status with a manifest; problems of the host (disk, permissions, shared drive) end as
//! [`JobOutcome::Fault`] so the supervisor retries the job later instead of failing it. A drive
//! that the job's own output filled is the job's problem ([`crate::output`]).
//!
//! Every end but success carries a [`Reason`] for machines: `exit`, `signal`, `timeout`,
//! `idle`, `cancelled`, `memory`, `output`, `processes`, `cpuTime`, `fileSize`, `invalid`.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nats_fs::folder::{fd_path, read_job_json, JobFileError, JobFolder};
use nats_fs::job::{JobSpec, Step};
use nats_fs::limits::{size, Kind, Limits};
use nats_fs::manifest::{
    Artifact, Manifest, Reason, Resources, StepRecord, StepStatus, Timing, MANIFEST_FILE,
    RESULTS_DIR,
};
use nats_fs::protocol::{FromRunner, StartJob, StepInfo, PROTOCOL_VERSION};
use nats_fs::{millis, JobOutcome, ResultMessage, Status};
use nix::sys::signal::Signal;
use tokio::time::Instant;

use crate::child::StepRlimits;
use crate::control::StopWatch;
use crate::grant::{self, Grant};
use crate::logs::{self, Copier};
use crate::output;
use crate::report::Report;
use crate::rights::Rights;
use crate::stage::{self, Staged};
use crate::step::{self, Ending, StepCommand, Watched};
use crate::sync::{self, Synced};

/// A step that fails with this many processes (or fewer) short of `limits.processes` failed
/// because of it, as far as anyone can tell: fork's EAGAIN leaves no other trace.
const NEAR_PROCESS_LIMIT: u64 = 2;
/// How long a step's log may take to reach its end once every process of the step is gone.
const LOG_PATIENCE: Duration = Duration::from_secs(5);

/// Runs the job described by `start`, reporting progress to `report`.
pub(crate) async fn run(
    start: &StartJob,
    report: &mut dyn Report,
    stop: &mut StopWatch,
) -> JobOutcome {
    if start.version != PROTOCOL_VERSION {
        return fault(format!(
            "the supervisor speaks pipe protocol {} but this runner speaks {PROTOCOL_VERSION}: install matching versions",
            start.version
        ));
    }
    let rights = Rights::of(start);
    let opened = rights.on_share(|| JobFolder::open_job(&start.job_dir, start.id.as_str()));
    let (folder, moved) = match opened {
        Ok(opened) => opened,
        Err(JobOutcome::Fault { why }) => {
            return fault(format!("{why} (as {})", share_user(start)));
        }
        Err(outcome) => return outcome,
    };
    let mut job = Job::new(start, folder, rights);
    if let Some(moved) = moved {
        job.warn(
            report,
            format!("results/ held an earlier run's files: moved them to {moved}"),
        );
    }
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
    /// The job folder and its `results/`, open; as `/proc/self/fd/N` in `dir` and `results`:
    /// how this run reaches them.
    _folder: JobFolder,
    dir: PathBuf,
    results: PathBuf,
    rights: Rights,
    /// `results/` by its real name, for messages and the steps' `JOB_RESULTS_DIR`.
    shown_results: PathBuf,
    warnings: Vec<String>,
    stage_ms: u64,
    sync_ms: u64,
    /// The limits the job runs under (none until `job.json` is read).
    limits: Limits,
    /// The names of the logs created so far, in `results/`.
    logs: Vec<String>,
    /// Bytes written into those logs.
    logged: u64,
}

/// How a run ends, for the manifest.
#[derive(Debug)]
struct End {
    status: Status,
    exit_code: i32,
    error: Option<String>,
    reason: Option<Reason>,
}

impl End {
    /// An end in `status` with the exit code of the table.
    fn of(status: Status, error: Option<String>, reason: Option<Reason>) -> Self {
        Self {
            status,
            exit_code: status.exit_code(1),
            error,
            reason,
        }
    }

    /// So far so good: the next step runs.
    fn success() -> Self {
        Self::of(Status::Success, None, None)
    }

    /// `failed` with the failing step's exit `code` (1 for a step that exited 0 just as a
    /// limit ended it: a failed job never exits 0).
    fn failed(code: i32, error: String, reason: Reason) -> Self {
        Self {
            status: Status::Failed,
            exit_code: if code == 0 { 1 } else { code },
            error: Some(error),
            reason: Some(reason),
        }
    }

    fn cancelled() -> Self {
        Self::of(
            Status::Cancelled,
            Some("cancelled by request".to_owned()),
            Some(Reason::Cancelled),
        )
    }

    /// Whether the job goes on with its next step.
    fn goes_on(&self) -> bool {
        self.status == Status::Success
    }

    /// A step failed on its own (its exit code or a signal), not because of a limit.
    fn failed_on_its_own(&self) -> bool {
        self.status == Status::Failed && matches!(self.reason, Some(Reason::Exit | Reason::Signal))
    }
}

/// What every step of a job shares.
struct Terms<'a> {
    spec: &'a JobSpec,
    grant: &'a Grant,
    rlimits: StepRlimits,
    job_deadline: Option<Instant>,
}

impl<'a> Job<'a> {
    fn new(start: &'a StartJob, folder: JobFolder, rights: Rights) -> Self {
        Self {
            start,
            host: nats_fs::host_name(),
            started_at: SystemTime::now(),
            started: Instant::now(),
            dir: fd_path(&folder.dir),
            results: fd_path(&folder.results),
            _folder: folder,
            rights,
            shown_results: start.job_dir.join(RESULTS_DIR),
            warnings: Vec::new(),
            stage_ms: 0,
            sync_ms: 0,
            limits: Limits::default(),
            logs: Vec::new(),
            logged: 0,
        }
    }

    /// The run proper; `Err` carries an early end, so `?` reads naturally.
    async fn run(
        &mut self,
        report: &mut dyn Report,
        stop: &mut StopWatch,
    ) -> Result<JobOutcome, JobOutcome> {
        let spec = match self.load_spec() {
            Ok(spec) => spec,
            Err(problem) => {
                return self.finish(
                    Vec::new(),
                    Vec::new(),
                    End::of(Status::Error, Some(problem), Some(Reason::Invalid)),
                );
            }
        };
        let grant = grant::grant(&spec, self.start);
        self.limits = grant.limits;
        report.event(&FromRunner::Loaded {
            limits: grant.limits,
            timeout_ms: millis(grant.timeout),
            steps: spec
                .steps
                .iter()
                .map(|step| StepInfo {
                    name: step.name.clone(),
                    command: step.run.clone(),
                })
                .collect(),
        });
        for warning in &grant.warnings {
            self.warn(report, warning.clone());
        }
        let rlimits = StepRlimits::new(&grant.limits, &self.start.ceilings)
            .map_err(|e| fault(format!("reading the runner's own rlimits: {e}")))?;
        let interrupt = stop.interrupt();

        let clock = Instant::now();
        let staged = match self.stage(interrupt.clone(), report).await {
            Ok(staged) => staged,
            Err(outcome) => return self.cancelled_instead(outcome, stop, &spec),
        };
        self.stage_ms = millis(clock.elapsed());
        report.event(&FromRunner::Staged {
            files: staged.files,
            bytes: staged.bytes,
            duration_ms: self.stage_ms,
        });
        for message in &staged.skipped {
            self.warn(report, message.clone());
        }

        let terms = Terms {
            spec: &spec,
            grant: &grant,
            rlimits,
            job_deadline: self.started.checked_add(grant.timeout),
        };
        let (records, end) = self.run_steps(&terms, report, stop).await?;

        let clock = Instant::now();
        let synced = self.sync(&staged, &spec, interrupt).await?;
        self.sync_ms = millis(clock.elapsed());
        report.event(&FromRunner::Synced {
            files: synced.artifacts.len() as u64,
            bytes: synced.bytes,
            duration_ms: self.sync_ms,
        });
        for message in &synced.skipped {
            self.warn(report, message.clone());
        }
        let end = self.judge_sync(&synced, end, report)?;
        self.finish(records, synced.artifacts, end)
    }

    /// Runs the steps in order until one does not succeed; the rest are skipped. `Err` is a
    /// stop that hands the job back.
    async fn run_steps(
        &mut self,
        terms: &Terms<'_>,
        report: &mut dyn Report,
        stop: &mut StopWatch,
    ) -> Result<(Vec<StepRecord>, End), JobOutcome> {
        let steps = &terms.spec.steps;
        let mut records = Vec::with_capacity(steps.len());
        let mut end = End::success();
        for (index, step) in steps.iter().enumerate() {
            if !end.goes_on() {
                records.push(skipped(index, step));
                continue;
            }
            if let Some(requested) = stop.current() {
                end = match requested.exceeded {
                    Some(exceeded) => End::failed(1, exceeded.error, exceeded.reason),
                    None if requested.cancel => End::cancelled(),
                    None => return Err(handed_back()),
                };
                records.push(skipped(index, step));
                continue;
            }
            let (record, step_end) = self.run_step(index, step, terms, report, stop).await?;
            records.push(record);
            end = step_end;
        }
        Ok((records, end))
    }

    /// The end after syncing: artifacts refused by the output quota, or a drive that filled up
    /// while copying, fail a job that had succeeded (and are warnings for one that had not).
    fn judge_sync(
        &mut self,
        synced: &Synced,
        end: End,
        report: &mut dyn Report,
    ) -> Result<End, JobOutcome> {
        let mut problem = None;
        if let (Some((path, bytes)), Some(quota)) = (synced.refused.first(), self.limits.output) {
            let more = match synced.refused.len() {
                1 => String::new(),
                n => format!(" (nor {} more)", n - 1),
            };
            problem = Some(format!(
                "artifact {path} ({}) would pass the job's output limit of {}: it was not copied{more}",
                size(*bytes),
                size(quota)
            ));
        }
        if let Some(path) = &synced.no_space {
            let used = self.logged + synced.bytes;
            if used < output::JOB_FILLED_DRIVE {
                return Err(fault(format!(
                    "the drive holding {} is full (copying artifact {path}); the job has only {} there, so it will be retried",
                    self.shown_results.display(),
                    size(used)
                )));
            }
            self.rights
                .on_share(|| output::make_room(&self.results, &self.logs));
            problem = Some(format!(
                "copying artifact {path} filled the drive holding results/ (the job's output there: {}); it was not copied",
                size(used)
            ));
        }
        let Some(problem) = problem else {
            return Ok(end);
        };
        if end.status != Status::Success {
            self.warn(report, problem);
            return Ok(end);
        }
        Ok(End::of(Status::Failed, Some(problem), Some(Reason::Output)))
    }

    /// An immediate stop ended the run early (`outcome`): if the stop was a cancel, the job
    /// ends `cancelled` with every step skipped, rather than as a hand-back.
    fn cancelled_instead(
        &self,
        outcome: JobOutcome,
        stop: &StopWatch,
        spec: &JobSpec,
    ) -> Result<JobOutcome, JobOutcome> {
        if !matches!(outcome, JobOutcome::Aborted { .. })
            || !stop.current().is_some_and(|s| s.cancel)
        {
            return Err(outcome);
        }
        let steps = spec
            .steps
            .iter()
            .enumerate()
            .map(|(index, step)| skipped(index, step))
            .collect();
        self.finish(steps, Vec::new(), End::cancelled())
    }

    /// Reads `job.json` and applies the request's steps. `Err` is the job's own problem.
    fn load_spec(&self) -> Result<JobSpec, String> {
        let overridden = self.start.steps.is_some();
        let read = self
            .rights
            .on_share(|| read_job_json(&self.dir, &self.start.job_dir));
        let mut spec = match read {
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

    async fn stage(
        &self,
        interrupt: Arc<AtomicBool>,
        report: &mut dyn Report,
    ) -> Result<Staged, JobOutcome> {
        let from = self.dir.clone();
        let to = self.start.workspace.clone();
        let (rights, parallelism) = (self.rights, self.start.share_parallelism);
        let reserve = self.start.min_free_space;
        let staged = tokio::task::spawn_blocking(move || {
            stage::stage(&stage::Plan {
                from: &from,
                to: &to,
                rights,
                parallelism,
                reserve,
                interrupt: &interrupt,
            })
        })
        .await
        .map_err(|e| fault(format!("staging: {e}")))?;
        staged.map_err(|e| match e {
            stage::StageError::Interrupted => aborted(),
            stage::StageError::NoRoom { free, needed } => {
                report.event(&FromRunner::NoRoom {
                    free_bytes: free,
                    needed_bytes: needed,
                    reserve_bytes: reserve,
                });
                let drive = self.start.workspace.parent().unwrap_or(&self.start.workspace);
                fault(format!(
                    "the workspaces drive {} has {} free; job {} needs {} plus the {} reserve (--min-free-space)",
                    drive.display(),
                    size(free),
                    self.start.id,
                    size(needed),
                    size(reserve)
                ))
            }
            e @ stage::StageError::Io { .. } => fault(format!(
                "{} (reading it as {}, writing the workspace as {})",
                self.shown(&e.to_string()),
                share_user(self.start),
                job_user(self.start)
            )),
        })
    }

    async fn sync(
        &self,
        staged: &Staged,
        spec: &JobSpec,
        interrupt: Arc<AtomicBool>,
    ) -> Result<Synced, JobOutcome> {
        let workspace = self.start.workspace.clone();
        let outputs = self.start.outputs_dir.clone();
        let results = self.results.clone();
        let snapshot = staged.snapshot.clone();
        let reserved = reserved_names(spec);
        let quota_left = self
            .limits
            .output
            .map(|quota| quota.saturating_sub(self.logged));
        let (rights, parallelism) = (self.rights, self.start.share_parallelism);
        let synced = tokio::task::spawn_blocking(move || {
            sync::sync(&sync::Plan {
                workspace: &workspace,
                outputs: outputs.as_deref(),
                results: &results,
                reserved: &reserved,
                staged: &snapshot,
                rights,
                parallelism,
                interrupt: &interrupt,
                quota_left,
            })
        })
        .await
        .map_err(|e| fault(format!("syncing: {e}")))?;
        match synced {
            Ok(synced) => Ok(synced),
            Err(sync::SyncError::Interrupted) => Ok(Synced {
                skipped: vec!["syncing was interrupted by an immediate stop".to_owned()],
                ..Synced::default()
            }),
            Err(e) => Err(fault(format!(
                "{} (writing results/ as {})",
                self.shown(&e.to_string()),
                share_user(self.start)
            ))),
        }
    }

    /// Runs step `index` and says how the job goes on (`Err`: a fault, or a stop that hands
    /// the job back).
    async fn run_step(
        &mut self,
        index: usize,
        step: &Step,
        terms: &Terms<'_>,
        report: &mut dyn Report,
        stops: &mut StopWatch,
    ) -> Result<(StepRecord, End), JobOutcome> {
        let log_name = nats_fs::manifest::step_log(index);
        let log_path = self.results.join(&log_name);
        let log = self.rights.on_share(|| open_log(&log_path)).map_err(|e| {
            fault(format!(
                "creating {} (as {}): {e}",
                self.shown_results.join(&log_name).display(),
                share_user(self.start)
            ))
        })?;
        self.logs.push(log_name.clone());
        // What this step's log may grow to: the quota less what the job has produced so far
        // (its earlier logs, and what its steps put in their results folder).
        let used = self.output_so_far();
        let log_quota = self.limits.output.map(|quota| quota.saturating_sub(used));
        let (pipe, output) =
            logs::pipe().map_err(|e| fault(format!("making step {index}'s output pipe: {e}")))?;
        logs::widen(&pipe);
        let progress = Arc::new(logs::Progress::default());
        let idle = terms.grant.idle_timeout(step);
        let began = Instant::now();
        let step_deadline = step.timeout.and_then(|t| began.checked_add(t));
        let deadline = match (step_deadline, terms.job_deadline) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        let env = self.step_env(terms.spec, step);
        let running = step::spawn(StepCommand {
            run: &step.run,
            cwd: &self.start.workspace,
            env: &env,
            output,
            progress: progress.clone(),
            deadline,
            grace: Duration::from_millis(self.start.kill_grace_ms),
            rlimits: terms.rlimits,
            identity: self.start.identity.as_ref(),
            watched: Watched {
                idle,
                processes: self.limits.processes.is_some(),
            },
        })
        .map_err(|e| fault(format!("starting /bin/sh for step {index}: {e}")))?;
        let streaming = Copier::start(
            pipe,
            log,
            log_quota,
            self.start.push_logs_every_ms.map(Duration::from_millis),
            progress,
        );
        report.event(&FromRunner::StepStarted {
            index,
            name: step.name.clone(),
            pid: running.pid(),
        });
        let mut finished = running
            .wait(stops)
            .await
            .map_err(|e| fault(format!("waiting for step {index}: {e}")))?;
        let duration_ms = millis(began.elapsed());
        let label = step_label(index, step);
        let copied = self
            .finish_log(streaming, &log_name, &label, &mut finished, report)
            .await?;
        self.warn_leftovers(report, &label, &finished);
        let code = finished.exit_code();
        let (status, end) = judge(
            &finished,
            &Judging {
                label: &label,
                step_timeout: step.timeout,
                step_deadline_first: step_deadline == deadline,
                job_timeout: terms.grant.timeout,
                idle,
                limits: &self.limits,
            },
        );
        let end = match end {
            Ok(end) => Ok(self.judge_output(end, &label, copied.drive_full())?),
            handed_back => handed_back,
        };
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
            resources: Some(finished.resources),
        };
        Ok((record, end?))
    }

    /// Waits for a step's log to reach its end, once every process of the step is gone (the
    /// pipe ends once the copier has read it all), and ends a log cut at the quota with its
    /// marker. A step that printed past its share and ended before the watch saw it got away
    /// with nothing: its ending is the same as one the watch caught. `Err`: the drive refused
    /// the log for another reason than a full drive (a fault of the host).
    async fn finish_log(
        &mut self,
        streaming: Copier,
        log_name: &str,
        label: &str,
        finished: &mut step::Finished,
        report: &mut dyn Report,
    ) -> Result<logs::Copied, JobOutcome> {
        let Some((copied, log)) = streaming.finish(LOG_PATIENCE).await else {
            self.warn(
                report,
                format!(
                    "{log_name} may miss its end: a process of {label} still held its output after {}s",
                    LOG_PATIENCE.as_secs()
                ),
            );
            return Ok(logs::Copied::default());
        };
        if copied.over_quota {
            if finished.ending == Ending::Exited {
                finished.ending = Ending::OutputExceeded;
            }
            let marker = output::quota_marker(self.limits.output.unwrap_or_default());
            if let Err(e) = end_with(&log, copied.written, &marker) {
                self.warn(
                    report,
                    format!("marking {log_name} at the output limit: {e}"),
                );
            }
        }
        self.logged += copied.written;
        if let Some(e) = copied.failed.as_ref().filter(|_| !copied.drive_full()) {
            return Err(fault(format!(
                "writing {} (as {}): {e}",
                self.shown_results.join(log_name).display(),
                share_user(self.start)
            )));
        }
        Ok(copied)
    }

    /// Warns about processes a step left behind.
    fn warn_leftovers(&mut self, report: &mut dyn Report, label: &str, finished: &step::Finished) {
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
    }

    /// What the job has produced so far: its logs, and what its steps put in their results
    /// folder (which is copied to `results/` at the end).
    fn output_so_far(&self) -> u64 {
        let outputs = self.start.outputs_dir.as_deref().map_or(0, |dir| {
            self.rights.as_job(|| nats_fs::tree::bytes_in(dir, None))
        });
        self.logged.saturating_add(outputs)
    }

    /// What the job has produced after a step: under an output limit, files the step wrote
    /// into its results folder count, and passing the limit fails the job. A step whose log
    /// found the drive holding `results/` full failed because of the job's own output if the
    /// job has enough there (then the largest log is cut to make room for the manifest), and
    /// because of the host otherwise (a fault: the job is retried).
    fn judge_output(&self, end: End, label: &str, drive_full: bool) -> Result<End, JobOutcome> {
        // A step that failed on its own may have written past the quota too; then the quota is
        // what the job is told about (with the step's own code).
        let code = if end.goes_on() { 1 } else { end.exit_code };
        if let (true, Some(quota)) = (end.goes_on() || end.failed_on_its_own(), self.limits.output)
        {
            let used = self.output_so_far();
            if used > quota {
                return Ok(End::failed(
                    code,
                    format!(
                        "the job has produced {} after {label} (its logs and its results folder), more than its output limit of {} (files a step writes into $JOB_RESULTS_DIR count too)",
                        size(used),
                        size(quota)
                    ),
                    Reason::Output,
                ));
            }
        }
        if !drive_full {
            return Ok(end);
        }
        if self.logged < output::JOB_FILLED_DRIVE {
            return Err(fault(format!(
                "the drive holding {} is full ({label}'s log could not be written), and the job has only {} there: the host is the cause, the job will be retried",
                self.shown_results.display(),
                size(self.logged)
            )));
        }
        self.rights
            .on_share(|| output::make_room(&self.results, &self.logs));
        Ok(End::failed(
            end.exit_code,
            format!(
                "{label}'s output ({} in the job's logs) filled the drive holding results/",
                size(self.logged)
            ),
            Reason::Output,
        ))
    }

    /// The step's environment, in the order of contract §4.2: base, job variables, the job's and
    /// the step's `env`, then what the operator passes through.
    fn step_env(&self, spec: &JobSpec, step: &Step) -> BTreeMap<String, String> {
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let mut env = self.start.base_env.clone();
        env.insert("HOME".into(), path(&self.start.workspace));
        env.insert("JOB_ID".into(), self.start.id.to_string());
        env.insert("JOB_ATTEMPT".into(), self.start.attempt.to_string());
        env.insert("JOB_WORKSPACE".into(), path(&self.start.workspace));
        if let Some(outputs) = &self.start.outputs_dir {
            env.insert("JOB_RESULTS_DIR".into(), path(outputs));
        }
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

    /// Writes the manifest, last, and ends the run. On a full drive the job's own output (if
    /// it has enough in `results/`) gives way: the largest log loses its tail, and a job that
    /// had succeeded fails `output`.
    fn finish(
        &self,
        steps: Vec<StepRecord>,
        artifacts: Vec<Artifact>,
        end: End,
    ) -> Result<JobOutcome, JobOutcome> {
        let duration_ms = millis(self.started.elapsed());
        let ran: Vec<&Resources> = steps.iter().filter_map(|s| s.resources.as_ref()).collect();
        let mut manifest = Manifest {
            job_id: self.start.id.to_string(),
            status: end.status,
            exit_code: end.exit_code,
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
            resources: (!ran.is_empty()).then(|| Resources::total(ran)),
            steps,
            artifacts,
            error: end.error,
            reason: end.reason,
            limits: self.limits,
            stream_sequence: self.start.stream_sequence,
            warnings: self.warnings.clone(),
        };
        let write = |manifest: &Manifest| {
            self.rights
                .on_share(|| manifest.write_atomic(&self.results))
        };
        let written = match write(&manifest) {
            Err(e) if output::is_no_space(&e) => {
                let used = self
                    .logged
                    .saturating_add(manifest.artifacts.iter().map(|a| a.size).sum::<u64>());
                if used < output::JOB_FILLED_DRIVE
                    || self
                        .rights
                        .on_share(|| output::make_room(&self.results, &self.logs))
                        .is_none()
                {
                    Err(e)
                } else {
                    let what = format!(
                        "the job's output ({}) filled the drive holding results/; the end of its largest log was cut to make room for result.json",
                        size(used)
                    );
                    if manifest.status == Status::Success {
                        manifest.status = Status::Failed;
                        manifest.exit_code = Status::Failed.exit_code(1);
                        manifest.error = Some(what);
                        manifest.reason = Some(Reason::Output);
                    } else {
                        manifest.warnings.push(what);
                    }
                    write(&manifest)
                }
            }
            other => other,
        };
        written.map_err(|e| {
            fault(format!(
                "writing {} (as {}): {e}",
                self.shown_results.join(MANIFEST_FILE).display(),
                share_user(self.start)
            ))
        })?;
        Ok(JobOutcome::final_result(ResultMessage::from_manifest(
            &manifest,
        )))
    }
}

/// The names at the top of `results/` that are the run's own: every step's log, the manifest
/// and its temporary file. No artifact takes them.
fn reserved_names(spec: &JobSpec) -> BTreeSet<String> {
    (0..spec.steps.len())
        .map(nats_fs::manifest::step_log)
        .chain([MANIFEST_FILE.to_owned(), Manifest::temp_name()])
        .collect()
}

/// Creates a step's log in `results/`, which is new for this run: never an existing file and
/// never through a link.
fn open_log(path: &Path) -> io::Result<fs::File> {
    use std::os::unix::fs::OpenOptionsExt;
    fs::OpenOptions::new()
        .append(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(path)
}

/// Ends a log of `written` bytes with `marker`, on a line of its own.
fn end_with(log: &fs::File, written: u64, marker: &str) -> io::Result<()> {
    let mut text = Vec::with_capacity(marker.len() + 1);
    if written > 0 && !ends_with_newline(log, written)? {
        text.push(b'\n');
    }
    text.extend_from_slice(marker.as_bytes());
    (&*log).write_all(&text)
}

fn ends_with_newline(log: &fs::File, written: u64) -> io::Result<bool> {
    use std::os::unix::fs::FileExt;
    let mut last = [0u8];
    // The log is open for appending only: read the last byte through a second descriptor.
    let reader = fs::File::open(format!(
        "/proc/self/fd/{}",
        std::os::fd::AsRawFd::as_raw_fd(log)
    ))?;
    reader.read_exact_at(&mut last, written - 1)?;
    Ok(last[0] == b'\n')
}

/// What [`judge`] needs to know besides how the step ended.
struct Judging<'a> {
    label: &'a str,
    step_timeout: Option<Duration>,
    /// Whether the step's own deadline (not the job's) was the one that applied.
    step_deadline_first: bool,
    job_timeout: Duration,
    idle: Option<Duration>,
    limits: &'a Limits,
}

/// The step's status and how the job goes on, from how the step ended (`Err`: a stop that
/// hands the job back).
fn judge(finished: &step::Finished, at: &Judging<'_>) -> (StepStatus, Result<End, JobOutcome>) {
    let label = at.label;
    let code = finished.exit_code();
    let (status, end) = match &finished.ending {
        Ending::Exited if code == 0 => (StepStatus::Success, End::success()),
        Ending::Exited => {
            let (what, reason) = failure(finished, at);
            (StepStatus::Failed, End::failed(code, what, reason))
        }
        Ending::TimedOut => {
            let what = match at.step_timeout {
                Some(timeout) if at.step_deadline_first => {
                    format!(
                        "{label} timed out after {}",
                        humantime::format_duration(timeout)
                    )
                }
                _ => format!(
                    "the job timed out after {} during {label}",
                    humantime::format_duration(at.job_timeout)
                ),
            };
            (
                StepStatus::Timeout,
                End::of(Status::Timeout, Some(what), Some(Reason::Timeout)),
            )
        }
        Ending::Idle => {
            let what = format!(
                "{label} printed nothing for {}",
                humantime::format_duration(at.idle.unwrap_or_default())
            );
            (
                StepStatus::Timeout,
                End::of(Status::Timeout, Some(what), Some(Reason::Idle)),
            )
        }
        Ending::OutputExceeded => {
            let what = format!(
                "{label} wrote more into results/ than the job's output limit of {} allows; its log was cut there",
                size(at.limits.output.unwrap_or_default())
            );
            (StepStatus::Failed, End::failed(code, what, Reason::Output))
        }
        // What the drive made of it decides the job's end (`Job::judge_output`).
        Ending::LogFailed => {
            let what = format!("{label}'s log could not be written: it was stopped");
            (StepStatus::Failed, End::failed(code, what, Reason::Output))
        }
        Ending::Stopped(requested) => match &requested.exceeded {
            Some(exceeded) => (
                StepStatus::Failed,
                End::failed(code, exceeded.error.clone(), exceeded.reason),
            ),
            None if requested.cancel => (StepStatus::Cancelled, End::cancelled()),
            None => return (StepStatus::Cancelled, Err(handed_back())),
        },
    };
    (status, Ok(end))
}

/// Why a step that ended by itself failed. A signal of an rlimit (SIGXCPU, SIGXFSZ) names its
/// limit — also when it killed the shell's last command, which makes the shell exit with
/// 128+n, as long as that limit is set. A failure with the job's processes at (or within
/// [`NEAR_PROCESS_LIMIT`] of) `limits.processes` is put down to that limit.
fn failure(finished: &step::Finished, at: &Judging<'_>) -> (String, Reason) {
    let label = at.label;
    let limits = at.limits;
    let own_signal = finished.signal_name().is_some();
    let how = match finished.signal_name() {
        Some(signal) => format!("was killed by {signal}"),
        None => format!("exited with code {}", finished.exit_code()),
    };
    let limit_signal = |signal: Signal, kind: Kind| {
        finished.killed_by() == Some(signal as i32) && (own_signal || limits.get(kind).is_some())
    };
    // At the hard limit the kernel sends SIGKILL instead (when the job's value is the ceiling,
    // soft and hard are the same): a SIGKILL nobody here sent, after that much CPU time.
    let cpu_ms = finished.resources.cpu_user_ms + finished.resources.cpu_system_ms;
    let killed_at_hard_cpu_limit = finished.killed_by() == Some(Signal::SIGKILL as i32)
        && limits
            .cpu_time
            .is_some_and(|secs| cpu_ms + 100 >= secs.saturating_mul(1000));
    // The shell's own death says it; a shell that exited 128+n gets the signal named (the one
    // seen: SIGKILL at the hard CPU limit).
    let by = |signal: Signal| {
        if own_signal {
            how.clone()
        } else {
            let seen = finished.killed_by().unwrap_or(signal as i32);
            format!(
                "{how} (its command was killed by {})",
                nats_fs::reap::signal_name(seen)
            )
        }
    };
    if killed_at_hard_cpu_limit || limit_signal(Signal::SIGXCPU, Kind::CpuTime) {
        return (
            format!(
                "{label} used more CPU time than limits.cpuTime allows ({}) and {}",
                show(limits, Kind::CpuTime),
                by(Signal::SIGXCPU)
            ),
            Reason::CpuTime,
        );
    }
    if limit_signal(Signal::SIGXFSZ, Kind::FileSize) {
        return (
            format!(
                "{label} wrote a file larger than limits.fileSize allows ({}) and {}",
                show(limits, Kind::FileSize),
                by(Signal::SIGXFSZ)
            ),
            Reason::FileSize,
        );
    }
    if let Some(limit) = limits.processes {
        if finished.peak_processes + NEAR_PROCESS_LIMIT >= limit {
            return (
                format!(
                    "{label} {how} while the job had {} processes, at its limit of {limit} (limits.processes): it could not start more",
                    finished.peak_processes
                ),
                Reason::Processes,
            );
        }
    }
    let reason = if own_signal {
        Reason::Signal
    } else {
        Reason::Exit
    };
    (format!("{label} {how}"), reason)
}

/// A limit's value as people read it, or "unknown" when the job has none of its kind (the
/// signal came from a limit the runner did not set).
fn show(limits: &Limits, kind: Kind) -> String {
    limits
        .get(kind)
        .map_or_else(|| "unknown".to_owned(), |value| kind.show(value))
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

fn fault(error: String) -> JobOutcome {
    JobOutcome::fault(error)
}

/// An immediate stop (of staging or syncing).
fn aborted() -> JobOutcome {
    JobOutcome::aborted("stopped at once before it finished; nothing final was written")
}

/// A stop between or during steps that hands the job back.
fn handed_back() -> JobOutcome {
    JobOutcome::aborted("stopped by the supervisor before it finished; it will run again")
}

/// Who the runner is on the jobs folder, for error messages about permissions.
fn share_user(start: &StartJob) -> String {
    match start.share {
        Some(ids) => format!("the share user, {ids}"),
        None => whoami(),
    }
}

/// Who the runner is in the workspace: the job's identity.
fn job_user(start: &StartJob) -> String {
    match &start.identity {
        Some(identity) => format!("{} (uid {})", identity.name, identity.uid),
        None => whoami(),
    }
}

/// The user the runner runs as.
fn whoami() -> String {
    let uid = nix::unistd::geteuid();
    match nix::unistd::User::from_uid(uid) {
        Ok(Some(user)) => format!("{} (uid {uid})", user.name),
        _ => format!("uid {uid}"),
    }
}
