//! Running one job through a runner: make the job's private folders, spawn the runner, hold the
//! pipe conversation, enforce the job's timeout and stop requests even against a runner that no
//! longer answers, then make sure nothing of the job is left. Shared by the NATS path
//! ([`crate::job_task`]) and `--dry-run`; knows nothing of acks.
//!
//! The supervisor never opens the job folder for a run: the runner does, with the share user's
//! rights ([`crate::share`]), and the job's steps never touch it. The supervisor makes the
//! job's private folders (workspace, `TMPDIR`, and the steps' own results folder) on the local
//! workspaces drive, owned by the slot's identity, and tells the runner who the steps run as.
//!
//! The runner is root, but it runs code of the job's (its steps) and reads what they wrote, and
//! a bug or a hung drive can keep it from finishing. So the supervisor trusts the runner with
//! doing the work, never with ending it. It keeps its own deadline — the job's timeout
//! (which the runner reports before any step runs) plus the kill grace and a little slack — and
//! its own deadline for a stop request; a runner that has not finished its steps by then is
//! killed with everything of its identity, and the job ends `timeout` or `cancelled` all the
//! same (or `failed` for a limit it passed), with a manifest the supervisor writes. A drain or a lost lease, which hand the job
//! back, stay hand-backs.

use std::collections::VecDeque;
use std::fs;
use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use nats_fs::job::JobRequest;
use nats_fs::limits::{size, Limits};
use nats_fs::manifest::{
    step_log, Manifest, Reason, ResultMessage, StepRecord, StepStatus, Timing,
};
use nats_fs::protocol::{
    CancelMode, FromRunner, StartJob, StepIdentity, StepInfo, ToRunner, PROTOCOL_VERSION,
};
use nats_fs::reap;
use nats_fs::{millis, JobOutcome, Status};
use nix::sys::signal::{kill, Signal};
use nix::unistd::Pid;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::unix::pipe;
use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tracing::{debug, info, warn};

use crate::config::Settings;
use crate::contain::{Containment, Exceeded};
use crate::events::JobEvents;
use crate::identity::{Held, Identities, Identity};
use crate::logging::event;
use crate::reaper::{Exit, Reaper};
use crate::results;
use crate::share::{Drive, Verdict};
use crate::spawn::{kill_all_as, spawn_runner};
use crate::until;

/// How many of the runner's last stderr lines are kept to explain a crash.
const STDERR_TAIL: usize = 8;
/// How long after the job's timeout plus the kill grace (or a stop request plus the grace) a
/// runner still busy with steps is given before the supervisor ends the job itself. The runner
/// needs a few milliseconds to report the end of its steps; a runner that is stopped needs
/// forever.
const DEADLINE_SLACK: Duration = Duration::from_millis(500);
/// How long a runner that has finished its steps may take to sync and write the manifest past
/// those deadlines: nothing of the job runs any more that could stop it.
const FINISHING_ALLOWANCE: Duration = Duration::from_secs(30);
/// How long to keep killing a dead runner's leftovers.
const SWEEP_TIMEOUT: Duration = Duration::from_secs(5);
/// How long to wait for the runner's pipes to close once it has exited.
const PIPES_AFTER_EXIT: Duration = Duration::from_secs(1);

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
    /// Where the job's step events go.
    pub events: JobEvents,
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

    /// The steps' `TMPDIR`, beside the workspace: private like it, but never synced.
    fn tmp_dir(&self) -> PathBuf {
        self.private_dir("tmp")
    }

    /// The steps' results folder (`$JOB_RESULTS_DIR`), beside the workspace: all of it is
    /// copied to `results/` at the end.
    fn outputs_dir(&self) -> PathBuf {
        self.private_dir("results")
    }

    fn private_dir(&self, what: &str) -> PathBuf {
        self.settings.workspaces_dir.join(format!(
            "{}.{}.{}.{what}",
            self.request.id, self.tag, self.attempt
        ))
    }
}

/// What a run needs from the rest of the supervisor.
#[derive(Debug, Clone, Copy)]
pub struct Env<'a> {
    pub reaper: &'a Arc<Reaper>,
    pub identities: &'a Identities,
    /// The jobs folder's verdict.
    pub drive: &'a Arc<Drive>,
}

/// Runs the job to its end. `control` carries stop requests (cancel, drain, lost lease).
/// When it returns, nothing of the job runs any more and `results/` is final; what is left
/// ([`Leftovers`]: the private folders, and the identity) is for the caller to clear once the
/// result is out, off the path of the next job.
///
/// The file work before and after the runner runs on tokio's blocking pool: the job folder is
/// usually on a shared drive, and a drive that hangs must not stall the other jobs' leases.
pub async fn execute<'a>(
    job: &JobRun<'_>,
    env: Env<'a>,
    control: &mut mpsc::Receiver<CancelMode>,
) -> (JobOutcome, Leftovers<'a>) {
    let held = env.identities.acquire().await;
    let identity = held.identity().clone();
    job.events.identity(identity.describe());
    let leftovers = Leftovers {
        private: [job.workspace(), job.tmp_dir(), job.outputs_dir()],
        held,
    };
    let prepared = {
        let (drive, settings) = (env.drive.clone(), job.settings.clone());
        let (private, switch) = (leftovers.private.clone(), env.identities.pool().switch);
        let identity = identity.clone();
        let room = Room {
            workspaces: job.settings.workspaces_dir.clone(),
            reserve: job.settings.min_free_space,
        };
        crate::blocking(move || {
            let verdict = drive.for_job(&settings);
            if let Some(why) = verdict.unusable() {
                return Err(JobOutcome::fault(format!(
                    "the jobs folder {} cannot be used: {why}",
                    settings.jobs_dir.display()
                )));
            }
            prepare(&private, &identity, switch, &room)?;
            Ok(verdict)
        })
        .await
    };
    let verdict = match prepared {
        Ok(Ok(verdict)) => verdict,
        Ok(Err(end)) => return (end, leftovers),
        Err(e) => {
            return (
                JobOutcome::fault(format!("preparing the job: {e}")),
                leftovers,
            )
        }
    };
    let exclusive = leftovers.held.exclusive();
    let talk = converse(job, env, &verdict, (&identity, exclusive), control).await;
    // Written into results/ by the cleanup, and published: one and the same.
    let forced_manifest = talk.forced_manifest(job);
    let cleanup = Cleanup {
        job_dir: job.job_dir(),
        share: verdict.share.as_ref().map(|s| s.ids),
        identity,
        exclusive,
        sweep: talk.start_error.is_none() && !talk.clean(),
        manifest: forced_manifest.clone(),
        reaper: env.reaper.clone(),
    };
    let forced_written = match crate::blocking(move || cleanup.run()).await {
        Ok(written) => written,
        Err(e) => {
            warn!("cleaning up after the job: {e}");
            false
        }
    };
    let forced_manifest = forced_manifest.map(|manifest| (manifest, forced_written));
    (talk.end(job, forced_manifest), leftovers)
}

/// What a finished job still holds: its private folders (workspace and `TMPDIR`), and its
/// identity, which may serve another job only once they are gone (their names are easy to
/// guess, and a later job of the same uid could open them).
#[derive(Debug)]
pub struct Leftovers<'a> {
    private: [PathBuf; 3],
    held: Held<'a>,
}

impl Leftovers<'_> {
    /// Removes the private folders (as root: they are on the local workspaces drive), then
    /// gives the identity back.
    pub async fn clear(self) {
        let private = self.private;
        let removed = crate::blocking(move || {
            for folder in &private {
                if let Err(e) = nats_fs::tree::remove_tree(folder) {
                    warn!(
                        "removing the workspace {}: {e}; it is removed at the next start",
                        folder.display()
                    );
                }
            }
        })
        .await;
        if let Err(e) = removed {
            warn!("removing the workspace: {e}");
        }
        drop(self.held);
    }
}

/// Where a job is staged, and how much of that drive must stay free (`--min-free-space`).
#[derive(Debug)]
struct Room {
    workspaces: PathBuf,
    reserve: u64,
}

/// Checks that the workspaces drive has its reserve free and makes the job's private folders,
/// owned by the identity. Whether the job folder's copy fits, the runner finds out as it lists
/// the folder.
fn prepare(
    private: &[PathBuf; 3],
    identity: &Identity,
    switch: bool,
    room: &Room,
) -> Result<(), JobOutcome> {
    preflight(room)?;
    for folder in private {
        create_private(folder, identity, switch).map_err(|e| {
            JobOutcome::fault(format!("creating the workspace {}: {e}", folder.display()))
        })?;
    }
    Ok(())
}

/// Hands the job back (a fault of this host: another host may have room) when the workspaces
/// drive has less free space than the reserve: a full drive would otherwise fail the job
/// half-way through staging, or starve the other jobs staged on it.
fn preflight(room: &Room) -> Result<(), JobOutcome> {
    let drive = room.workspaces.display();
    let free = match nats_fs::tree::free_space(&room.workspaces) {
        Ok(free) => free,
        Err(e) => {
            return Err(JobOutcome::fault(format!(
                "checking the free space of the workspaces drive {drive}: {e}"
            )))
        }
    };
    if free >= room.reserve {
        return Ok(());
    }
    let message = format!(
        "the workspaces drive {drive} has {} free, less than the {} reserve (--min-free-space)",
        size(free),
        size(room.reserve)
    );
    warn!(
        event = event::NO_ROOM,
        free_bytes = free,
        reserve_bytes = room.reserve,
        "not enough room to stage the job here; handing it back for another host: {message}"
    );
    Err(JobOutcome::fault(message))
}

/// A fresh, private folder owned by the identity (removing a stale one first).
fn create_private(folder: &Path, identity: &Identity, switch: bool) -> io::Result<()> {
    nats_fs::tree::remove_tree(folder)?;
    fs::DirBuilder::new().mode(0o700).create(folder)?;
    fs::set_permissions(folder, fs::Permissions::from_mode(0o700))?;
    if switch {
        std::os::unix::fs::lchown(
            folder,
            Some(identity.uid.as_raw()),
            Some(identity.gid.as_raw()),
        )?;
    }
    Ok(())
}

/// Why the supervisor ended a job itself.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Forced {
    /// The job passed a limit the supervisor watches (memory), and its runner did not end it
    /// at once when told: the reason and the error of the `Exceeded` message.
    Limit(Reason, String),
    /// The job's timeout (plus grace and slack) passed with steps still running.
    Timeout,
    /// A cancel request was not carried out in time.
    Cancelled,
    /// A drain or a lost lease was not carried out in time.
    Aborted,
}

/// What the supervisor learned of a run.
struct Talk {
    started_at: SystemTime,
    started: Instant,
    /// How the runner said the job ended, once it did.
    ended: Option<JobOutcome>,
    /// How the runner process ended.
    exit: Option<Exit>,
    /// Set when the supervisor ended the job itself.
    forced: Option<Forced>,
    /// The job's timeout, as the runner reported it (or the default).
    timeout: Duration,
    /// The limits the job runs under: the ceilings until the runner reports the job's own,
    /// then what [`Containment::granted`] lets hold of them.
    limits: Limits,
    /// The steps, as the runner reported them.
    steps: Vec<StepInfo>,
    /// What happened to each step so far.
    records: Vec<Option<StepRecord>>,
    /// The step the runner is on, and since when: the one it reported starting, or, once the
    /// job is staged, the first it has not reported finished (a step can stop its runner
    /// before the runner has said that the step started).
    running: Option<(usize, Instant)>,
    /// Whether the runner has reported the end of the job's steps.
    steps_done: bool,
    stage_ms: u64,
    /// The runner's last stderr lines, to explain a crash.
    tail: VecDeque<String>,
    /// A start failure, before there was a runner at all.
    start_error: Option<String>,
    /// Where step events go.
    events: JobEvents,
}

/// Spawns the runner and talks to it until it has exited and its pipes are closed, applying
/// stop requests from `control` and enforcing the deadlines.
// One `select!` over everything a run can meet: each arm is short, and splitting the loop
// would only scatter its state.
#[allow(clippy::too_many_lines)]
async fn converse(
    job: &JobRun<'_>,
    env: Env<'_>,
    verdict: &Verdict,
    (identity, exclusive): (&Identity, bool),
    control: &mut mpsc::Receiver<CancelMode>,
) -> Talk {
    let settings = job.settings;
    let mut talk = Talk::new(
        settings.default_timeout,
        settings.ceilings,
        job.events.clone(),
    );
    let switch = env.identities.pool().switch;
    let mut contain = Containment::new(settings.ceilings);
    // On this thread, never the blocking pool: the runner's PR_SET_PDEATHSIG fires when the
    // thread that started it exits, and the pool retires idle threads (see main.rs). This
    // thread waits only until the runner is executed (a `vfork`).
    let started = env.reaper.spawn(|| {
        spawn_runner(&settings.runner, &settings.base_env).map(|spawned| (spawned.pid, spawned))
    });
    let (spawned, mut exited) = match started {
        Ok(started) => started,
        Err(e) => {
            talk.start_error = Some(format!(
                "starting the runner {}: {e}",
                settings.runner.display()
            ));
            return talk;
        }
    };
    let pid = spawned.pid;
    debug!(event = event::RUNNER_STARTED, pid = pid.as_raw(), identity = %identity.describe(), "runner started");
    contain.started(pid);
    let mut stdin = Some(spawned.stdin);
    let start = start_message(job, verdict, switch.then_some(identity), exclusive);
    // Never logged: the start message carries the values of --pass-env variables.
    if let Err(e) = send(&mut stdin, &start).await {
        warn!("sending the job to the runner: {e}; the runner will end without it, and the job is retried");
    }
    let mut events = BufReader::new(spawned.stdout).lines();
    let mut errors = BufReader::new(spawned.stderr).lines();
    let (mut events_open, mut errors_open, mut control_open) = (true, true, true);
    let mut deadlines = Deadlines::new(talk.started, talk.timeout, settings.kill_grace);
    let mut pipes_by: Option<Instant> = None;
    // Set once the runner has been sent SIGKILL: its exit is all that is left to wait for.
    let mut killed = false;
    loop {
        if talk.exit.is_some() && !events_open && !errors_open {
            break;
        }
        let running = !killed && talk.exit.is_none();
        tokio::select! {
            line = events.next_line(), if events_open => match line {
                Ok(Some(line)) => {
                    if talk.event(&line) {
                        deadlines.set_timeout(talk.started, talk.timeout);
                        talk.limits = contain.granted(&talk.limits);
                    }
                }
                Ok(None) | Err(_) => events_open = false,
            },
            line = errors.next_line(), if errors_open => match line {
                Ok(Some(line)) => talk.stderr(line),
                Ok(None) | Err(_) => errors_open = false,
            },
            mode = control.recv(), if control_open && talk.forced.is_none() => match mode {
                Some(mode) => {
                    if let Err(e) = send(&mut stdin, &ToRunner::Cancel { mode }).await {
                        debug!("telling the runner to stop: {e}");
                    }
                    deadlines.stop_requested(mode);
                }
                None => control_open = false,
            },
            exceeded = contain.exceeded(), if running && talk.forced.is_none() => {
                end_over_limit(exceeded, &mut stdin, &mut deadlines).await;
            }
            () = sleep_until(deadlines.timeout_at), if running => {
                if deadlines.timeout_passed(talk.steps_done) {
                    if talk.ended.is_none() {
                        warn!(
                            pid = pid.as_raw(),
                            timeout_ms = millis(talk.timeout),
                            "the job's timeout has passed and its runner has not ended it; ending the job here"
                        );
                        talk.forced = Some(Forced::Timeout);
                    } else {
                        warn!(pid = pid.as_raw(), "the runner reported the end of the job but did not exit; killing it");
                    }
                    kill_runner(env.reaper, pid);
                    killed = true;
                }
            }
            () = until(deadlines.stop_by), if running => {
                if let Some(forced) = deadlines.stop_passed(talk.steps_done) {
                    warn!(pid = pid.as_raw(), "the runner did not stop in time; ending the job here");
                    if talk.ended.is_none() {
                        talk.forced = Some(forced);
                    }
                    kill_runner(env.reaper, pid);
                    killed = true;
                }
            }
            exit = &mut exited, if talk.exit.is_none() => {
                contain.stopped();
                talk.exit = Some(exit.unwrap_or(Exit::Signal(Signal::SIGKILL as i32)));
                stdin = None;
                pipes_by = Some(Instant::now() + PIPES_AFTER_EXIT);
            }
            () = until(pipes_by) => {
                // Something else holds the runner's pipes; the runner is gone, so stop here.
                break;
            }
        }
    }
    talk
}

/// The job passed a limit watched here: tell the runner to end the job at once, and give it
/// no grace ([`Deadlines::limit_exceeded`]).
async fn end_over_limit(
    exceeded: Exceeded,
    stdin: &mut Option<pipe::Sender>,
    deadlines: &mut Deadlines,
) {
    let message = ToRunner::Exceeded {
        reason: exceeded.reason,
        error: exceeded.error.clone(),
    };
    if let Err(e) = send(stdin, &message).await {
        debug!("telling the runner the job passed a limit: {e}");
    }
    deadlines.limit_exceeded(exceeded.reason, exceeded.error);
}

/// The supervisor's own deadlines for a run: the job's timeout, and a stop request's.
#[derive(Debug)]
struct Deadlines {
    grace: Duration,
    /// When the job's timeout, the kill grace and the slack have passed.
    timeout_at: Instant,
    timeout_extended: bool,
    /// When a stop request, the grace (unless "now") and the slack have passed.
    stop_by: Option<Instant>,
    stop_extended: bool,
    /// Whether a stop request was a cancel (final) rather than a hand-back.
    cancel: bool,
    /// A limit the job passed (the runner was told to end it at once).
    exceeded: Option<(Reason, String)>,
}

impl Deadlines {
    fn new(started: Instant, timeout: Duration, grace: Duration) -> Self {
        Self {
            grace,
            timeout_at: started + timeout + grace + DEADLINE_SLACK,
            timeout_extended: false,
            stop_by: None,
            stop_extended: false,
            cancel: false,
            exceeded: None,
        }
    }

    /// The runner reported the job's own timeout.
    fn set_timeout(&mut self, started: Instant, timeout: Duration) {
        self.timeout_at = started + timeout + self.grace + DEADLINE_SLACK;
    }

    fn stop_requested(&mut self, mode: CancelMode) {
        self.cancel |= mode == CancelMode::Cancel;
        let grace = if mode == CancelMode::AbortNow {
            Duration::ZERO
        } else {
            self.grace
        };
        let by = Instant::now() + grace + DEADLINE_SLACK;
        self.stop_by = Some(self.stop_by.map_or(by, |at| at.min(by)));
    }

    /// The job passed a limit: the runner must end it at once, without a grace period (as
    /// after a second shutdown signal).
    fn limit_exceeded(&mut self, reason: Reason, error: String) {
        self.exceeded.get_or_insert((reason, error));
        let by = Instant::now() + DEADLINE_SLACK;
        self.stop_by = Some(self.stop_by.map_or(by, |at| at.min(by)));
    }

    /// The timeout deadline passed: true if the job must be ended here. A runner done with
    /// the steps gets [`FINISHING_ALLOWANCE`] once more to sync and write the manifest.
    fn timeout_passed(&mut self, steps_done: bool) -> bool {
        if steps_done && !self.timeout_extended {
            self.timeout_extended = true;
            self.timeout_at += FINISHING_ALLOWANCE;
            return false;
        }
        true
    }

    /// The stop deadline passed: how the job ends if it must be ended here.
    fn stop_passed(&mut self, steps_done: bool) -> Option<Forced> {
        if steps_done && !self.stop_extended {
            self.stop_extended = true;
            self.stop_by = self.stop_by.map(|at| at + FINISHING_ALLOWANCE);
            return None;
        }
        Some(if let Some((reason, error)) = &self.exceeded {
            Forced::Limit(*reason, error.clone())
        } else if self.cancel {
            Forced::Cancelled
        } else {
            Forced::Aborted
        })
    }
}

/// Kills the runner with SIGKILL, if it has not been reaped (so its pid is still its own).
fn kill_runner(reaper: &Reaper, pid: Pid) {
    if reaper.is_watched(pid) {
        let _ = kill(pid, Signal::SIGKILL);
    }
}

/// The job, for the runner: who the share user is, who the steps run as (`identity`, when the
/// supervisor switches users), the private folders, the limits.
fn start_message(
    job: &JobRun<'_>,
    verdict: &Verdict,
    identity: Option<&Identity>,
    exclusive: bool,
) -> ToRunner {
    let settings = job.settings;
    let root = nix::unistd::geteuid().is_root();
    ToRunner::Start(Box::new(StartJob {
        version: PROTOCOL_VERSION,
        id: job.request.id.clone(),
        attempt: job.attempt,
        stream_sequence: job.stream_sequence,
        job_dir: job.job_dir(),
        share: verdict.share.as_ref().filter(|_| root).map(|s| s.ids),
        identity: identity.map(|i| StepIdentity {
            name: i.name.clone(),
            uid: i.uid.as_raw(),
            gid: i.gid.as_raw(),
            groups: i.groups.iter().map(|g| g.as_raw()).collect(),
        }),
        kill_uid_at_end: exclusive,
        workspace: job.workspace(),
        outputs_dir: Some(job.outputs_dir()),
        tmp_dir: Some(job.tmp_dir()),
        steps: job.request.steps.clone(),
        default_timeout_ms: millis(settings.default_timeout),
        kill_grace_ms: millis(settings.kill_grace),
        base_env: settings.base_env.clone(),
        pass_env: settings.pass_env_values.clone(),
        worker: Some(settings.worker_id.clone()),
        ceilings: settings.ceilings,
        max_timeout_ms: settings.max_timeout.map(millis),
        idle_timeout_ms: settings.idle_timeout.map(millis),
        share_parallelism: settings.share_parallelism,
        push_logs_every_ms: verdict.push_logs_every().map(millis),
        min_free_space: settings.min_free_space,
    }))
}

async fn send(stdin: &mut Option<pipe::Sender>, message: &ToRunner) -> io::Result<()> {
    let Some(pipe) = stdin.as_mut() else {
        return Err(io::Error::from(io::ErrorKind::BrokenPipe));
    };
    let mut line = serde_json::to_vec(message).map_err(io::Error::other)?;
    line.push(b'\n');
    pipe.write_all(&line).await?;
    pipe.flush().await
}

impl Talk {
    fn new(default_timeout: Duration, ceilings: Limits, events: JobEvents) -> Self {
        Self {
            limits: ceilings,
            started_at: SystemTime::now(),
            started: Instant::now(),
            ended: None,
            exit: None,
            forced: None,
            timeout: default_timeout,
            steps: Vec::new(),
            records: Vec::new(),
            running: None,
            steps_done: false,
            stage_ms: 0,
            tail: VecDeque::with_capacity(STDERR_TAIL),
            start_error: None,
            events,
        }
    }

    /// Relays a line of the runner's stderr to the log, and keeps the last ones.
    fn stderr(&mut self, line: String) {
        info!(target: "nats_fs_runner", "{line}");
        if self.tail.len() == STDERR_TAIL {
            self.tail.pop_front();
        }
        self.tail.push_back(line);
    }

    /// Takes in (and logs) one event line; true when it was `Loaded` (the deadline changes).
    fn event(&mut self, line: &str) -> bool {
        let event = match serde_json::from_str::<FromRunner>(line) {
            Ok(event) => event,
            Err(e) => {
                warn!("ignoring an unreadable line from the runner ({e}): {line:.200}");
                return false;
            }
        };
        let mut loaded = false;
        match &event {
            FromRunner::Loaded {
                timeout_ms,
                steps,
                limits,
            } => {
                debug!(steps = steps.len(), timeout_ms, %limits, "job loaded");
                // As reported: `Containment::granted` decides what holds.
                self.limits = *limits;
                self.timeout = Duration::from_millis(*timeout_ms);
                self.steps.clone_from(steps);
                self.records = vec![None; steps.len()];
                self.steps_done = steps.is_empty();
                loaded = true;
            }
            FromRunner::Staged {
                files,
                bytes,
                duration_ms,
            } => {
                info!(
                    event = event::JOB_STAGED,
                    files, bytes, duration_ms, "staged"
                );
                self.stage_ms = *duration_ms;
                self.events.staged(Duration::from_millis(*duration_ms));
                self.running = (!self.steps.is_empty()).then(|| (0, Instant::now()));
            }
            FromRunner::StepStarted { index, name, pid } => {
                info!(
                    event = event::STEP_STARTED,
                    step = index,
                    name = name.as_deref(),
                    pid,
                    "step started"
                );
                self.running = Some((*index, Instant::now()));
                self.events.step_started(*index, name.as_deref());
            }
            FromRunner::StepFinished {
                index,
                status,
                exit_code,
                signal,
                duration_ms,
            } => self.step_finished(*index, *status, *exit_code, signal.clone(), *duration_ms),
            FromRunner::Synced {
                files,
                bytes,
                duration_ms,
            } => {
                info!(
                    event = event::ARTIFACTS_SYNCED,
                    files, bytes, duration_ms, "synced artifacts"
                );
                self.events.synced(Duration::from_millis(*duration_ms));
            }
            FromRunner::Warning { message } => warn!("{message}"),
            FromRunner::NoRoom {
                free_bytes,
                needed_bytes,
                reserve_bytes,
            } => warn!(
                event = event::NO_ROOM,
                free_bytes,
                needed_bytes,
                reserve_bytes,
                "not enough room to stage the job here; handing it back for another host"
            ),
            FromRunner::Ended(JobOutcome::Final(result)) => {
                debug!(status = %result.status, error = result.error.as_deref(), "runner finished");
            }
            FromRunner::Ended(JobOutcome::Aborted { why }) => info!("runner stopped: {why}"),
            FromRunner::Ended(JobOutcome::Fault { why } | JobOutcome::Busy { why }) => {
                warn!("runner fault: {why}");
            }
            FromRunner::Unknown => {}
        }
        if let FromRunner::Ended(outcome) = event {
            self.steps_done = true;
            self.ended = Some(outcome);
        }
        loaded
    }

    /// A step ended, as the runner reports it.
    fn step_finished(
        &mut self,
        index: usize,
        status: StepStatus,
        exit_code: Option<i32>,
        signal: Option<String>,
        duration_ms: u64,
    ) {
        info!(
            event = event::STEP_FINISHED,
            step = index,
            status = %status,
            exit_code,
            signal = signal.as_deref(),
            duration_ms,
            "step finished"
        );
        self.running = (status == StepStatus::Success && index + 1 < self.steps.len())
            .then(|| (index + 1, Instant::now()));
        let name = self.steps.get(index).and_then(|s| s.name.as_deref());
        self.events
            .step_finished(index, name, status, exit_code, duration_ms);
        if let Some(slot) = self.records.get_mut(index) {
            let info = &self.steps[index];
            *slot = Some(StepRecord {
                index,
                name: info.name.clone(),
                command: info.command.clone(),
                status,
                exit_code,
                signal,
                duration_ms,
                log: Some(step_log(index)),
                resources: None,
            });
        }
        if status != StepStatus::Success || index + 1 >= self.steps.len() {
            self.steps_done = true;
        }
    }

    /// Whether the runner ended by itself, having said how the job ended.
    fn clean(&self) -> bool {
        self.forced.is_none() && self.ended.is_some() && matches!(self.exit, Some(Exit::Code(_)))
    }

    /// The manifest of a job the supervisor ended as `timeout`, `cancelled` or `failed` (a
    /// limit): every step the
    /// runner reported, the one it was running ended by the supervisor, the rest skipped.
    fn forced_manifest(&self, job: &JobRun<'_>) -> Option<Manifest> {
        let (status, step_status, reason) = match self.forced.as_ref()? {
            Forced::Timeout => (Status::Timeout, StepStatus::Timeout, Reason::Timeout),
            Forced::Cancelled => (Status::Cancelled, StepStatus::Cancelled, Reason::Cancelled),
            Forced::Limit(reason, _) => (Status::Failed, StepStatus::Failed, *reason),
            Forced::Aborted => return None,
        };
        let steps = self
            .steps
            .iter()
            .enumerate()
            .map(|(index, info)| {
                if let Some(Some(record)) = self.records.get(index) {
                    return record.clone();
                }
                let running = self.running.filter(|(i, _)| *i == index);
                StepRecord {
                    index,
                    name: info.name.clone(),
                    command: info.command.clone(),
                    status: if running.is_some() {
                        step_status
                    } else {
                        StepStatus::Skipped
                    },
                    exit_code: None,
                    signal: running.map(|_| "SIGKILL".to_owned()),
                    duration_ms: running.map_or(0, |(_, at)| millis(at.elapsed())),
                    log: running.map(|_| step_log(index)),
                    resources: None,
                }
            })
            .collect();
        let error = match (self.forced.as_ref()?, status) {
            (Forced::Limit(_, error), _) => format!(
                "{error}; its runner did not end the job at once, so the supervisor killed every \
                 process of the job"
            ),
            (_, Status::Timeout) => format!(
                "the job timed out after {} and its runner did not end it (stopped or unresponsive): \
                 the supervisor killed every process of the job",
                humantime::format_duration(self.timeout)
            ),
            _ => "cancelled by request; the runner did not stop in time, so the supervisor killed \
                  every process of the job"
                .to_owned(),
        };
        Some(Manifest {
            job_id: job.request.id.to_string(),
            status,
            // Killed: 128 + SIGKILL, as a step killed by a signal.
            exit_code: status.exit_code(128 + Signal::SIGKILL as i32),
            attempt: job.attempt,
            worker: Some(job.settings.worker_id.clone()),
            host: nats_fs::host_name(),
            timing: Timing {
                start: humantime::format_rfc3339_millis(self.started_at).to_string(),
                end: humantime::format_rfc3339_millis(SystemTime::now()).to_string(),
                duration_ms: millis(self.started.elapsed()),
                stage_ms: self.stage_ms,
                sync_ms: 0,
            },
            steps,
            artifacts: Vec::new(),
            error: Some(error),
            reason: Some(reason),
            limits: self.limits,
            resources: None,
            stream_sequence: job.stream_sequence,
            warnings: vec![
                "artifacts were not synced: the job was ended by the supervisor".to_owned(),
            ],
        })
    }

    /// How the job ended; `forced_manifest` is what [`Talk::forced_manifest`] made, and
    /// whether it was written. What the runner says of the job is its status; who the job is,
    /// which delivery, and where the manifest lies are the supervisor's to say.
    fn end(self, job: &JobRun<'_>, forced_manifest: Option<(Manifest, bool)>) -> JobOutcome {
        if let Some(error) = self.start_error {
            return JobOutcome::fault(error);
        }
        if let Some((manifest, written)) = forced_manifest {
            let result = ResultMessage::from_manifest(&manifest);
            return JobOutcome::final_result(ResultMessage {
                manifest_file: result.manifest_file.filter(|_| written),
                ..result
            });
        }
        if matches!(self.forced, Some(Forced::Aborted)) {
            return JobOutcome::aborted(
                "stopped by the supervisor (the runner did not stop in time); it will run again",
            );
        }
        match self.ended {
            Some(JobOutcome::Final(result)) => JobOutcome::final_result(ResultMessage {
                id: job.request.id.to_string(),
                manifest_file: result
                    .manifest_file
                    .map(|_| nats_fs::manifest::MANIFEST_PATH.to_owned()),
                attempt: Some(job.attempt),
                worker: Some(job.settings.worker_id.clone()),
                ..*result
            }),
            // Only the supervisor knows of other deliveries: a runner saying so is confused.
            Some(JobOutcome::Busy { why }) => JobOutcome::fault(why),
            Some(other) => other,
            None => {
                let how = self
                    .exit
                    .map_or_else(|| "vanished".to_owned(), Exit::describe);
                let said = self
                    .tail
                    .back()
                    .map(|l| format!("; it said: {l}"))
                    .unwrap_or_default();
                JobOutcome::fault(format!("the runner {how} before finishing the job{said}"))
            }
        }
    }
}

/// What is left to do once the runner is gone, on the blocking pool.
struct Cleanup {
    /// The job folder, for the supervisor's own manifest.
    job_dir: PathBuf,
    /// Whose rights to write it with.
    share: Option<nats_fs::share::FsIds>,
    identity: Identity,
    /// Whether every process of the identity's uid is this job's (the runner was asked to
    /// kill them all before it ends).
    exclusive: bool,
    /// Whether the runner did not end cleanly, so its steps may be left over.
    sweep: bool,
    /// The manifest the supervisor writes for a job it ended itself.
    manifest: Option<Manifest>,
    reaper: Arc<Reaper>,
}

impl Cleanup {
    /// Returns whether the supervisor's own manifest, when it has one, was written.
    fn run(self) -> bool {
        // First, nothing of the job may run any more. A runner that finished cleanly has seen
        // to that itself (and, with an identity of its own, killed every process of its uid
        // before it said so). One that did not cannot have: its steps were re-parented to us
        // (we are a child subreaper).
        if self.sweep {
            let reaper = &self.reaper;
            let uid = self.identity.uid;
            if self.exclusive {
                if let Err(e) = kill_all_as(uid, reaper) {
                    let swept = reap::kill_uid(uid.as_raw(), SWEEP_TIMEOUT);
                    warn!(
                        killed = swept.reaped,
                        stuck = swept.left,
                        "killing the processes of {} from its own uid failed ({e}); killed them one by one",
                        self.identity.describe()
                    );
                }
            }
            let swept = reap::kill_children(|p| reaper.is_watched(p), None, SWEEP_TIMEOUT);
            warn!(
                event = event::LEFTOVERS_KILLED,
                identity = %self.identity.describe(),
                found = swept.reaped,
                stuck = swept.left,
                "the runner did not finish the job: killed every process it left behind"
            );
        }
        let Some(manifest) = &self.manifest else {
            return false;
        };
        match results::write_manifest(&self.job_dir, manifest, self.share) {
            Ok(()) => true,
            Err(e) => {
                warn!("writing the manifest of the ended job: {e}; its result names none");
                false
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_passed_limit_stops_without_grace_and_ends_the_job_with_its_reason() {
        let start = Instant::now();
        let mut deadlines = Deadlines::new(start, Duration::from_secs(60), Duration::from_secs(10));
        deadlines.limit_exceeded(Reason::Memory, "too much".into());
        let by = deadlines.stop_by.expect("a stop deadline");
        assert!(by <= Instant::now() + DEADLINE_SLACK, "no grace period");
        // A runner still busy with steps at the deadline: the supervisor ends the job.
        assert_eq!(
            deadlines.stop_passed(false),
            Some(Forced::Limit(Reason::Memory, "too much".into()))
        );
        // A runner done with the steps gets the finishing allowance once.
        let mut deadlines = Deadlines::new(start, Duration::from_secs(60), Duration::from_secs(10));
        deadlines.stop_requested(CancelMode::Cancel);
        deadlines.limit_exceeded(Reason::Memory, "too much".into());
        assert_eq!(deadlines.stop_passed(true), None);
        assert!(matches!(
            deadlines.stop_passed(true),
            Some(Forced::Limit(Reason::Memory, _))
        ));
    }
}
