//! `nats-fs-runner`: runs one job folder, then exits.
//!
//! Two ways in, one code path ([`run::run`]):
//! - `--pipe`: how `nats-fs-supervisor` starts it, as root when the supervisor is root. One
//!   [`ToRunner::Start`] line on stdin; events as JSON lines on stdout; a `cancel` line or the
//!   closing of stdin (the supervisor is gone) stops the job. The runner is the worker's
//!   trusted part: it reads and writes the job folder with the share user's rights
//!   ([`rights`]) and starts every step as the job's identity ([`child`]); no step ever runs
//!   as the runner's user, so none can signal, trace or read it.
//! - `--job <dir>`: a person debugging a job runs it by hand, as themselves; progress goes to
//!   stderr and the result message to stdout. `--watch` runs it again whenever the folder
//!   changes.
//!
//! (A third, hidden: `--reach`, with which the supervisor's start-up probe finds out what an
//! identity of the pool could do on the jobs folder: see [`reach`].)
//!
//! Its first instructions make it a child subreaper, so every process a step starts — even one
//! that double-forks or calls `setsid` — stays below it and can be killed and reaped when the
//! step ends; make it non-dumpable, so no process can trace it or read its memory, environment
//! or descriptors through `/proc` unless it could trace root; turn core dumps off for itself
//! and its steps; and mark every inherited descriptor close-on-exec, so a step gets exactly
//! stdin, stdout and stderr. Under a supervisor it also asks the kernel for SIGTERM should the
//! supervisor die (`PR_SET_PDEATHSIG`), sets `PR_SET_NO_NEW_PRIVS` (which its steps keep),
//! makes itself and its steps the OOM killer's first choice, and gives every signal the
//! supervisor was started with ignored its default action back, so steps start with none
//! ignored.
//!
//! The job's limits (`limits` in `job.json`, within the operator's ceilings) apply to the steps
//! only, and ignores SIGXFSZ and SIGXCPU (its own writes fail with EFBIG instead of killing it;
//! the steps get the default actions back at `exec`).
//!
//! # Layout
//! - `run`: one run of a job, start to end, ending in a `JobOutcome`.
//! - `grant`: the job's limits and timeouts under the operator's settings.
//! - `rights`: whose rights a file system call uses: the share user's, the job's.
//! - `stage` / `sync`: copying the folder in, and new or changed files back out, several
//!   calls in flight (`pool`).
//! - `logs`: a step's output, through a pipe, onto its log on the share.
//! - `step`: one step's process group, deadline, watched limits, kill sequence and sweep.
//! - `child`: the step's rlimits and identity, set between fork and exec.
//! - `usage`: reaping the shell with `wait4`, and what the step's processes used.
//! - `output`: the output quota and a drive that fills up.
//! - `control`: stop requests (cancel, abort, now, an exceeded limit) from the pipe or signals.
//! - `report`: events as JSON lines (pipe) or log lines (standalone).
//! - `watch`: `--watch`, re-running on changes.

mod child;
mod control;
mod grant;
mod logs;
mod output;
mod pool;
mod reach;
mod report;
mod rights;
mod run;
mod stage;
mod step;
mod sync;
mod usage;
mod watch;

use std::collections::BTreeMap;
use std::io::{BufRead, IsTerminal};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::Parser;
use nats_fs::generate::Generate;
use nats_fs::job::{parse_default_timeout, parse_duration, steps_from_value, JobId, Step};
use nats_fs::protocol::{CancelMode, FromRunner, StartJob, ToRunner, PROTOCOL_VERSION};
use nats_fs::{millis, JobOutcome};
use tokio::signal::unix::{signal, Signal, SignalKind};
use tokio::sync::mpsc;
use tracing::warn;

use crate::control::{Stop, StopHandle};
use crate::report::{Human, Pipe, Report};

/// Exit code for a runner that could not even start (bad arguments, bad start message).
const EXIT_USAGE: u8 = 2;

#[derive(Debug, Parser)]
#[command(
    name = "nats-fs-runner",
    version,
    about = "Run one nats-fs job folder: stage it, run its steps, stream logs, sync artifacts, write results/result.json.",
    long_about = "Run one nats-fs job folder: stage it into a private workspace, run its steps \
    with /bin/sh -c, stream each step's output to results/step_N.log, copy new and modified \
    files to results/, and write results/result.json.\n\n\
    With --job DIR it runs that folder as the invoking user and prints the result message on \
    stdout (exit 0 on success, 1 otherwise). With --pipe it is driven by nats-fs-supervisor."
)]
struct Cli {
    /// Run this job folder standalone and print the result message.
    #[arg(
        long,
        value_name = "DIR",
        conflicts_with = "pipe",
        required_unless_present_any = ["pipe", "generate", "reach"]
    )]
    job: Option<PathBuf>,

    /// Take the job from a supervisor over stdin/stdout (JSON lines).
    #[arg(long)]
    pipe: bool,

    /// Folder in which to create the private workspace [default: $TMPDIR or /tmp].
    #[arg(short = 'w', long, value_name = "DIR")]
    workspaces_dir: Option<PathBuf>,

    /// Steps as a JSON list, replacing those of job.json, e.g. `["make", "make test"]`.
    #[arg(long, value_name = "JSON")]
    steps: Option<String>,

    /// The job id [default: the folder's name].
    #[arg(long)]
    id: Option<String>,

    /// The job's timeout when job.json sets none (a bare number means minutes).
    #[arg(short = 'o', long, default_value = "30m", value_parser = parse_default_timeout)]
    timeout: Duration,

    /// Time between SIGTERM and SIGKILL when a step is stopped.
    #[arg(long, default_value = "10s", value_parser = parse_duration)]
    kill_grace: Duration,

    /// Comma-separated names of variables passed from this environment to the steps.
    #[arg(long, value_delimiter = ',', value_name = "NAMES")]
    pass_env: Vec<String>,

    /// Run the job again whenever its folder changes (outside results/ and earlier runs'
    /// results.N); stop with Ctrl-C.
    #[arg(long, requires = "job")]
    watch: bool,

    /// How many file system calls on the job folder may be in flight at once while it is
    /// staged and its artifacts copied (a network share answers each after a round trip).
    #[arg(long, value_name = "N", default_value_t = nats_fs::protocol::DEFAULT_SHARE_PARALLELISM,
          value_parser = parse_parallelism)]
    share_parallelism: usize,

    /// Print the manual page or a shell's completions to stdout and exit, running nothing
    /// (for packaging).
    #[arg(long, value_enum, value_name = "WHAT", hide = true)]
    generate: Option<Generate>,

    /// For the supervisor's probe: as the identity `--as`, try what a step could do to the
    /// folder DIR in the jobs folder, and print it as JSON.
    #[arg(long, value_name = "DIR", hide = true, requires = "reach_as")]
    reach: Option<PathBuf>,

    /// The identity of `--reach`: `UID:GID:GROUP,GROUP…`.
    #[arg(long = "as", value_name = "IDS", hide = true)]
    reach_as: Option<String>,
}

/// `--share-parallelism`: 1 to 256.
fn parse_parallelism(value: &str) -> Result<usize, String> {
    match value.parse::<usize>() {
        Ok(n) if (1..=256).contains(&n) => Ok(n),
        _ => Err(format!("{value:?} is not a number from 1 to 256")),
    }
}

fn main() -> ExitCode {
    // First of all, before anything of a job exists (see the crate docs).
    if let Err(e) = nix::sys::prctl::set_child_subreaper(true) {
        eprintln!("nats-fs-runner: cannot become a child subreaper: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(e) = nix::sys::prctl::set_dumpable(false) {
        eprintln!("nats-fs-runner: cannot make itself non-dumpable: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if let Err(e) = child::disable_core_dumps() {
        eprintln!("nats-fs-runner: cannot turn core dumps off: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    nats_fs::fds::close_on_exec_inherited();
    let cli = Cli::parse();
    if let Some(what) = cli.generate {
        let command = <Cli as clap::CommandFactory>::command();
        return nats_fs::generate::generate(command, what, ExitCode::from(EXIT_USAGE));
    }
    if let (Some(folder), Some(ids)) = (&cli.reach, &cli.reach_as) {
        return reach::reach(folder, ids);
    }
    if cli.pipe {
        if let Err(e) = under_a_supervisor() {
            eprintln!("nats-fs-runner: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    }
    init_tracing(cli.pipe);
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            eprintln!("nats-fs-runner: starting the runtime: {e}");
            return ExitCode::from(EXIT_USAGE);
        }
    };
    if let Err(e) = runtime.block_on(async { survive_rlimit_signals() }) {
        eprintln!("nats-fs-runner: listening for SIGXFSZ and SIGXCPU: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    if cli.pipe {
        return runtime.block_on(pipe_mode());
    }
    match runtime.block_on(standalone(cli)) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("nats-fs-runner: {e:#}");
            ExitCode::from(EXIT_USAGE)
        }
    }
}

fn init_tracing(pipe: bool) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| Targets::new().with_default(LevelFilter::INFO));
    // Under a supervisor, stderr lines are relayed into the supervisor's log, which adds its
    // own time and job fields.
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    if pipe {
        tracing_subscriber::registry()
            .with(layer.without_time().with_ansi(false).with_level(true))
            .with(filter)
            .init();
    } else {
        // Colours only for a person at a terminal, not in a file or a pipe.
        tracing_subscriber::registry()
            .with(layer.with_ansi(std::io::stderr().is_terminal()))
            .with(filter)
            .init();
    }
}

/// The set-up of a runner a supervisor started (see the crate docs): the supervisor's death
/// ends it, nothing it starts can gain privileges, the OOM killer picks it and its steps
/// first, and no signal is ignored.
fn under_a_supervisor() -> Result<(), String> {
    // SIGTERM is "stop now" (see `pipe_mode`). The supervisor may have died before this: then
    // stdin is closed already, which stops the run as well.
    nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGTERM)
        .map_err(|e| format!("setting PR_SET_PDEATHSIG: {e}"))?;
    nix::sys::prctl::set_no_new_privs().map_err(|e| format!("setting PR_SET_NO_NEW_PRIVS: {e}"))?;
    // As root (with CAP_SYS_RESOURCE), 1000 also becomes the lowest score the runner's
    // processes may set: no step can make itself less likely to be picked. Best effort: a
    // system without the file still runs jobs.
    let _ = std::fs::write("/proc/self/oom_score_adj", "1000");
    child::default_ignored_signals().map_err(|e| format!("resetting ignored signals: {e}"))
}

/// Installs handlers for SIGXFSZ and SIGXCPU, whose default action would kill the runner when
/// its own writes pass `RLIMIT_FSIZE` or its CPU time passes the soft `RLIMIT_CPU`: with a
/// handler, a write that is too large fails with EFBIG (an error the run reports), and the
/// CPU warning is logged. Handlers are reset at `exec`, so steps keep the default actions.
/// Registered once; tokio keeps a handler installed for the life of the process.
fn survive_rlimit_signals() -> std::io::Result<()> {
    for (kind, what) in [
        (
            SignalKind::from_raw(nix::libc::SIGXFSZ),
            "the runner wrote past its own file size limit (SIGXFSZ)",
        ),
        (
            SignalKind::from_raw(nix::libc::SIGXCPU),
            "the runner passed its own CPU time limit (SIGXCPU)",
        ),
    ] {
        let mut received = signal(kind)?;
        tokio::spawn(async move {
            while received.recv().await.is_some() {
                warn!("{what}");
            }
        });
    }
    Ok(())
}

/// Driven by the supervisor: start message in, events out.
async fn pipe_mode() -> ExitCode {
    let mut lines = StdinLines::new();
    let start = match lines.next().await {
        Some(Ok(line)) => match serde_json::from_str::<ToRunner>(&line) {
            Ok(ToRunner::Start(start)) => start,
            Ok(other) => return refuse(&format!("expected a start message first, got {other:?}")),
            Err(e) => return refuse(&format!("reading the start message: {e}")),
        },
        Some(Err(e)) => return refuse(&format!("reading stdin: {e}")),
        None => return refuse("stdin closed before a start message arrived"),
    };
    let (handle, mut watch) = control::channel();
    tokio::spawn(listen_to_supervisor(lines, handle.clone()));
    // Any signal here means the supervisor died (PR_SET_PDEATHSIG) or someone is tearing the
    // host down: stop at once, leave nothing final, let the job be redelivered.
    tokio::spawn(on_signals(
        handle,
        Stop::from_mode(CancelMode::AbortNow),
        Stop::from_mode(CancelMode::AbortNow),
    ));
    let outcome = run::run(&start, &mut Pipe, &mut watch).await;
    clean_workspace(&start.workspace, false);
    if let (true, Some(identity)) = (start.kill_uid_at_end, &start.identity) {
        // Whatever of the job escaped the step sweeps dies before the job is said to be over.
        // The runner has nothing left to do as root: it becomes the job's uid for good, and
        // as that uid kill(-1) reaches exactly the other processes of the uid.
        if let Err(e) = child::kill_every_other_process_as(identity.uid) {
            warn!("killing what is left of uid {}: {e}", identity.uid);
        }
    }
    let code = exit_code(&outcome);
    Pipe.event(&FromRunner::Ended(outcome));
    code
}

fn refuse(problem: &str) -> ExitCode {
    Pipe.event(&FromRunner::Ended(JobOutcome::fault(format!(
        "runner: {problem}"
    ))));
    ExitCode::from(EXIT_USAGE)
}

/// The lines of stdin. Under a supervisor stdin is a pipe, read by the runtime itself;
/// anything else (a terminal, a file: someone trying `--pipe` by hand) is read on a plain
/// thread, as a read blocked in the kernel cannot be cancelled, and on tokio's blocking pool it
/// would hold up the runtime's shutdown.
enum StdinLines {
    Pipe(tokio::io::Lines<tokio::io::BufReader<tokio::net::unix::pipe::Receiver>>),
    Thread(mpsc::UnboundedReceiver<std::io::Result<String>>),
}

impl StdinLines {
    fn new() -> Self {
        use std::os::fd::AsFd;
        use tokio::io::AsyncBufReadExt;
        let pipe = std::io::stdin()
            .as_fd()
            .try_clone_to_owned()
            .and_then(tokio::net::unix::pipe::Receiver::from_owned_fd);
        if let Ok(pipe) = pipe {
            return Self::Pipe(tokio::io::BufReader::new(pipe).lines());
        }
        let (tx, rx) = mpsc::unbounded_channel();
        std::thread::spawn(move || {
            for line in std::io::stdin().lock().lines() {
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Self::Thread(rx)
    }

    /// The next line; `None` at the end.
    async fn next(&mut self) -> Option<std::io::Result<String>> {
        match self {
            Self::Pipe(lines) => lines.next_line().await.transpose(),
            Self::Thread(lines) => lines.recv().await,
        }
    }
}

/// Applies cancel requests from the supervisor; the end of stdin means it is gone.
async fn listen_to_supervisor(mut lines: StdinLines, handle: StopHandle) {
    while let Some(Ok(line)) = lines.next().await {
        match serde_json::from_str::<ToRunner>(&line) {
            Ok(ToRunner::Cancel { mode }) => handle.request(Stop::from_mode(mode)),
            Ok(ToRunner::Exceeded { reason, error }) => {
                handle.request(Stop::exceeded(reason, error));
            }
            Ok(ToRunner::Start(_)) => warn!("ignoring a second start message"),
            Ok(ToRunner::Unknown) => {}
            Err(e) => warn!("ignoring an unreadable message from the supervisor: {e}"),
        }
    }
    handle.request(Stop::from_mode(CancelMode::AbortNow));
}

/// SIGTERM and SIGINT: the first requests `first`, any later one `then`.
async fn on_signals(handle: StopHandle, first: Stop, then: Stop) {
    let Ok(mut signals) = Signals::new() else {
        warn!("cannot listen for signals");
        return;
    };
    signals.recv().await;
    handle.request(first);
    loop {
        signals.recv().await;
        handle.request(then.clone());
    }
}

/// SIGTERM and SIGINT as one stream. Registered once; after that, Ctrl-C no longer kills the
/// process by default, so every handler here must lead to an exit.
struct Signals {
    term: Signal,
    int: Signal,
}

impl Signals {
    fn new() -> std::io::Result<Self> {
        Ok(Self {
            term: signal(SignalKind::terminate())?,
            int: signal(SignalKind::interrupt())?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => {}
            _ = self.int.recv() => {}
        }
    }
}

/// The job as given on the command line.
#[derive(Debug, Clone)]
struct Standalone {
    dir: PathBuf,
    id: JobId,
    steps: Option<Vec<Step>>,
    workspaces_dir: PathBuf,
    default_timeout: Duration,
    kill_grace: Duration,
    pass_env: BTreeMap<String, String>,
    share_parallelism: usize,
}

async fn standalone(cli: Cli) -> anyhow::Result<ExitCode> {
    let Some(dir) = cli.job else {
        bail!("give --job DIR (or --pipe, as the supervisor does)");
    };
    let dir = std::path::absolute(&dir).with_context(|| format!("resolving {}", dir.display()))?;
    let name = match &cli.id {
        Some(id) => id.clone(),
        None => dir
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default(),
    };
    let id = JobId::parse(&name)
        .with_context(|| format!("{name:?} cannot be a job id; name the job with --id"))?;
    let steps = match &cli.steps {
        None => None,
        Some(text) => {
            let value: serde_json::Value =
                serde_json::from_str(text).context("--steps is not valid JSON")?;
            Some(steps_from_value(&value, "--steps")?)
        }
    };
    let mut pass_env = BTreeMap::new();
    for name in cli.pass_env.iter().filter(|n| !n.is_empty()) {
        if let Ok(value) = std::env::var(name) {
            pass_env.insert(name.clone(), value);
        }
    }
    let job = Standalone {
        dir,
        id,
        steps,
        workspaces_dir: cli.workspaces_dir.unwrap_or_else(std::env::temp_dir),
        default_timeout: cli.timeout,
        kill_grace: cli.kill_grace,
        pass_env,
        share_parallelism: cli.share_parallelism,
    };
    let mut signals = Signals::new().context("listening for signals")?;
    if cli.watch {
        watch::watch(&job, &mut signals).await
    } else {
        let (outcome, _) = run_once(&job, &mut signals).await?;
        print_result(&job.id, &outcome);
        Ok(exit_code(&outcome))
    }
}

/// One standalone run in a fresh workspace. Ctrl-C cancels (TERM, grace, KILL); a second
/// Ctrl-C kills at once. Also says whether a signal arrived.
async fn run_once(job: &Standalone, signals: &mut Signals) -> anyhow::Result<(JobOutcome, bool)> {
    std::fs::create_dir_all(&job.workspaces_dir)
        .with_context(|| format!("creating {}", job.workspaces_dir.display()))?;
    // The workspace and the steps' results folder, side by side in a private folder.
    let private = tempfile::Builder::new()
        .prefix(&format!("{}.", job.id))
        .tempdir_in(&job.workspaces_dir)
        .with_context(|| format!("creating a workspace in {}", job.workspaces_dir.display()))?;
    let workspace = private.path().join("workspace");
    let outputs = private.path().join("results");
    for folder in [&workspace, &outputs] {
        std::fs::create_dir(folder).with_context(|| format!("creating {}", folder.display()))?;
    }
    let start = StartJob {
        version: PROTOCOL_VERSION,
        id: job.id.clone(),
        attempt: 1,
        stream_sequence: None,
        job_dir: job.dir.clone(),
        share: None,
        identity: None,
        kill_uid_at_end: false,
        workspace,
        outputs_dir: Some(outputs),
        tmp_dir: None,
        steps: job.steps.clone(),
        default_timeout_ms: millis(job.default_timeout),
        kill_grace_ms: millis(job.kill_grace),
        base_env: nats_fs::step_env::base_env(),
        pass_env: job.pass_env.clone(),
        worker: None,
        ceilings: nats_fs::limits::Limits::default(),
        max_timeout_ms: None,
        idle_timeout_ms: None,
        share_parallelism: job.share_parallelism,
        push_logs_every_ms: None,
        min_free_space: 0,
    };
    let (handle, mut stop) = control::channel();
    let mut human = Human;
    let run = run::run(&start, &mut human, &mut stop);
    tokio::pin!(run);
    let outcome = loop {
        tokio::select! {
            outcome = &mut run => break outcome,
            () = signals.recv() => {
                let now = handle.is_requested();
                if !now {
                    warn!("stopping the job (press Ctrl-C again to kill it at once)");
                }
                handle.request(Stop { cancel: true, now, exceeded: None });
            }
        }
    };
    clean_workspace(private.path(), true);
    Ok((outcome, handle.is_requested()))
}

/// Removes the workspace (or, under a supervisor that owns the folder itself, its contents).
fn clean_workspace(workspace: &Path, remove_folder: bool) {
    let cleaned = if remove_folder {
        nats_fs::tree::remove_tree(workspace)
    } else {
        nats_fs::tree::empty_dir(workspace)
    };
    if let Err(e) = cleaned {
        warn!("removing workspace {}: {e}", workspace.display());
    }
}

fn print_result(id: &JobId, outcome: &JobOutcome) {
    match serde_json::to_string(&outcome.clone().into_result(id.as_str())) {
        Ok(line) => println!("{line}"),
        Err(e) => eprintln!("nats-fs-runner: printing the result: {e}"),
    }
}

fn exit_code(outcome: &JobOutcome) -> ExitCode {
    if outcome.is_success() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    }
}
