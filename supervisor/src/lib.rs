//! `nats-fs-supervisor`: the host daemon of nats-fs-worker.
//!
//! It owns the NATS connection and a durable pull consumer (the same durable name on many
//! hosts makes them competing consumers). For every job it spawns one fresh
//! `nats-fs-runner` and talks to it over a pipe; the runner runs each step as the job's
//! identity, and the supervisor never runs a job's commands itself. When the runner is done it publishes the result message and acks.
//!
//! ```text
//!  jobs.pending ──free slots only──▶ pull ─────────▶ job_task ────────▶ execute ──spawn──▶ runner
//!                                                     │ lease: progress acks │  JSON lines   │
//!  jobs.results.{id} ◀──publish, then ack── settle ◀──┘                      ◀──events───────┘
//!  jobs.cancel.{id} ──▶ cancel ──▶ running (registry) ──cancel──▶ runner
//! ```
//!
//! # Layout
//! - `backoff`: growing pauses between retries, and jitter.
//! - `config`: flags and environment (contract §7), checked at start.
//! - `identity`: the pool of identities (`--run-as`), one per running job.
//! - `connection`: connecting to NATS, and reconnecting for as long as the supervisor runs.
//! - `consumer`: the stream and the durable pull consumer (contract §7), set up and checked;
//!   waiting while NATS is unreachable.
//! - `pull`: the pull loop: asks for as many messages as there are free slots.
//! - `cancel`: cancel requests on `jobs.cancel.{id}`.
//! - `ctx`: what every job task shares with the rest of the supervisor.
//! - `running`: the registry of running jobs: one delivery of an id at a time on this host.
//! - `job_task`: one message from delivery to settlement: rejects, busy ids, the run.
//! - `lease`: keeping a running job's lease: progress acks, and refreshes of its lock.
//! - `redelivery`: recognising a redelivery of a job that already finished.
//! - `settle`: how a message is settled: the pure decision, then publishing the result,
//!   flushing the manifest to the drive, the dead letter and the ack (retried).
//! - `lock`: one run per job id at a time, across hosts (a key-value lease).
//! - `execute`: one run through a runner: folders, spawn, pipe conversation, deadlines,
//!   cleanup.
//! - `contain`: how a job's limits hold: what the runner gives its steps, and
//!   the limits watched while it runs (its only caller is `execute`).
//! - `memory`: the memory watch of a running job (`limits.memory`).
//! - `share`: the jobs folder: the share user, the probe of what the drive allows, the verdict.
//! - `results`: the supervisor's own manifests, flushes, and believable manifests.
//! - `outbox`: results and dead letters, delivered so that they are not lost.
//! - `events`: each job's lifecycle on `jobs.status.{id}`, best effort.
//! - `metrics`: counters and gauges; `/metrics` and `/healthz` on `--metrics-listen`.
//! - `spawn`: starting a runner (a plain `posix_spawn`), and killing every process of an
//!   identity.
//! - `reaper`: reaping every child, runners and orphaned steps.
//! - `service`: the NATS micro service `nats-fs-worker` and its `jobs` endpoint.
//! - `sweep`: the workspaces folder, its lock, and what crashed runs left behind.
//! - `signals`: SIGTERM/SIGINT to drain, twice to stop now.
//! - `logging`: log output, with control characters from jobs escaped.
//! - `notify`: systemd readiness, status, stopping and watchdog (`NOTIFY_SOCKET`).
//! - `dry_run`: `--dry-run`.

pub mod backoff;
pub mod cancel;
pub mod config;
pub mod connection;
pub mod consumer;
pub mod contain;
pub mod ctx;
pub mod dry_run;
pub mod events;
pub mod execute;
pub mod identity;
pub mod job_task;
pub mod lease;
pub mod lock;
pub mod logging;
pub mod memory;
pub mod metrics;
pub mod notify;
pub mod outbox;
pub mod pull;
pub mod reaper;
pub mod redelivery;
pub mod results;
pub mod running;
pub mod service;
pub mod settle;
pub mod share;
pub mod signals;
pub mod spawn;
pub mod sweep;

use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use async_nats::jetstream;
use nats_fs::protocol::CancelMode;
use tokio::sync::watch;
use tokio::time::{sleep, timeout};
use tokio_util::task::TaskTracker;
use tracing::{info, warn};

use crate::config::Settings;
use crate::ctx::Ctx;
use crate::identity::Identities;
use crate::reaper::Reaper;
use crate::running::Running;

/// How far along shutdown is (contract §8).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Shutdown {
    /// Taking jobs.
    Run,
    /// No new jobs; running ones may finish within the drain timeout.
    Drain,
    /// Stop running jobs at once and hand them back.
    Now,
}

/// Runs the supervisor until `shutdown` says stop and the running jobs are dealt with.
pub async fn run(
    settings: Settings,
    mut shutdown: watch::Receiver<Shutdown>,
) -> anyhow::Result<()> {
    // Runners that crash leave their steps orphaned; as a subreaper we inherit them, and the
    // reaper collects every child that ends.
    nix::sys::prctl::set_child_subreaper(true).context("becoming a child subreaper")?;
    let reaper = Reaper::start().context("listening for SIGCHLD")?;
    // Before the workspaces folder is cleared of what earlier runs left.
    refuse_overlap(&settings)?;
    let _lock = sweep::prepare_workspaces(&settings.workspaces_dir, &settings.pool)?;
    spawn::lower_own_oom_score();
    if settings.pool.switch {
        // No process of a job ever shares the supervisor's memory, but a core dump of a
        // daemon that holds NATS credentials is nobody's business either.
        nix::sys::prctl::set_dumpable(false).context("making this process non-dumpable")?;
    }
    check_surroundings(&settings);
    let drive = probe_jobs_dir(&settings, &reaper)?;
    log_settings(&settings);
    let client = connection::connect(&settings).await?;
    let js = jetstream::new(client.clone());
    let Some(intake) = consumer::ensure_patiently(&settings, &js, &mut shutdown).await? else {
        return Ok(());
    };
    let Some(locks) = consumer::patiently(&mut shutdown, "the lock bucket", || {
        lock::Locks::setup(&settings, &js, intake.replicas)
    })
    .await?
    else {
        return Ok(());
    };
    let metrics = Arc::new(metrics::Metrics::new(settings.concurrency));
    let events = events::Events::start(
        client.clone(),
        settings.status_subject.clone(),
        &settings.worker_id,
        metrics.clone(),
    );
    let metrics_server = match settings.metrics_listen {
        Some(addr) => {
            let sources = metrics::Sources {
                client: client.clone(),
                consumer: intake.consumer.clone(),
            };
            Some(
                metrics::serve(addr, metrics.clone(), sources)
                    .await
                    .with_context(|| format!("--metrics-listen {addr}: listening"))?,
            )
        }
        None => None,
    };
    let ctx = Arc::new(Ctx {
        notifier: notify::Notifier::from_env(),
        metrics,
        events,
        outbox: outbox::Outbox::new(client.clone(), shutdown.clone()),
        identities: Identities::new(settings.pool.clone()),
        drive,
        flushing: Arc::new(tokio::sync::Semaphore::new(settings.concurrency)),
        settings,
        client,
        running: Running::default(),
        reaper,
        locks,
        ack_wait: intake.ack_wait,
        max_deliver: intake.max_deliver,
        shutdown: shutdown.clone(),
    });
    let cancels = tokio::spawn(cancel::listen_for_cancels(ctx.clone()));
    let statuses = tokio::spawn(report_status(ctx.clone()));
    let service = service::start(ctx.clone()).await?;
    let tracker = TaskTracker::new();
    let pulled = pull::pull(ctx.clone(), intake, js, tracker.clone()).await;
    ctx.notifier.stopping();
    // The pull loop fed the watchdog; a drain may take minutes and must not look wedged.
    let watchdog = ctx.notifier.watchdog_every().map(|every| {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let mut ticks = tokio::time::interval(every);
            loop {
                ticks.tick().await;
                ctx.notifier.watchdog();
            }
        })
    });
    tracker.close();
    drain(&ctx, &tracker, shutdown).await;
    statuses.abort();
    if let Some(watchdog) = watchdog {
        watchdog.abort();
    }
    if let Some(server) = metrics_server {
        server.abort();
    }
    service.abort();
    cancels.abort();
    let _ = timeout(Duration::from_secs(5), ctx.client.flush()).await;
    pulled?;
    info!(event = logging::event::SUPERVISOR_STOPPED, "stopped");
    Ok(())
}

/// Refuses a workspaces folder and a jobs folder that share a tree (see [`share::overlap`]).
fn refuse_overlap(settings: &Settings) -> anyhow::Result<()> {
    match share::overlap(&settings.jobs_dir, &settings.workspaces_dir) {
        Some(why) => {
            tracing::error!(event = logging::event::JOBS_DIR_REFUSED, "{why}");
            Err(share::Refused(why).into())
        }
        None => Ok(()),
    }
}

/// Probes the jobs folder and logs what it found; `Err` when it must be refused.
fn probe_jobs_dir(settings: &Settings, reaper: &Arc<Reaper>) -> anyhow::Result<Arc<share::Drive>> {
    let verdict = share::probe(settings, Some(reaper));
    share::log(&verdict, "probed the jobs folder");
    if let Some(refusal) = verdict.refusal.clone() {
        return Err(share::Refused(refusal).into());
    }
    Ok(Arc::new(share::Drive::new(verdict, reaper.clone())))
}

/// The effective settings, in one line at start (secrets only by kind: `token`, never the
/// value).
fn log_settings(settings: &Settings) {
    let millis = nats_fs::millis;
    info!(
        event = logging::event::SUPERVISOR_STARTING,
        version = env!("CARGO_PKG_VERSION"),
        url = %settings.urls.iter().map(ToString::to_string).collect::<Vec<_>>().join(","),
        auth = ?settings.auth,
        worker = %settings.worker_id,
        jobs_dir = %settings.jobs_dir.display(),
        workspaces_dir = %settings.workspaces_dir.display(),
        stream = %settings.stream,
        subject = %settings.input_subject,
        results = %settings.output_subject,
        cancels = %settings.cancel_subject,
        statuses = settings.status_subject.as_deref().unwrap_or("off"),
        dead_letters = settings.dead_letter_subject.as_deref().unwrap_or("off"),
        lock_bucket = settings.lock_bucket.as_deref().unwrap_or("off"),
        concurrency = settings.concurrency,
        run_as = %settings.pool.describe(),
        default_timeout_ms = millis(settings.default_timeout),
        ack_wait_ms = millis(settings.ack_wait),
        max_deliver = settings.max_deliver,
        drain_timeout_ms = millis(settings.drain_timeout),
        kill_grace_ms = millis(settings.kill_grace),
        pass_env = %settings.pass_env.join(","),
        runner = %settings.runner.display(),
        metrics = %settings.metrics_listen.map_or_else(|| "off".to_owned(), |a| a.to_string()),
        limits = %settings.ceilings,
        max_timeout = %settings.max_timeout.map_or_else(|| "none".to_owned(), |d| humantime::format_duration(d).to_string()),
        idle_timeout = %settings.idle_timeout.map_or_else(|| "off".to_owned(), |d| humantime::format_duration(d).to_string()),
        min_free_space = %nats_fs::limits::size(settings.min_free_space),
        "starting"
    );
}

/// Keeps systemd's status line (`systemctl status`) saying how many jobs run.
async fn report_status(ctx: Arc<Ctx>) {
    let mut running = ctx.running.watch_count();
    let mut shutdown = ctx.shutdown.clone();
    loop {
        let count = *running.borrow_and_update();
        ctx.metrics.running(count, ctx.settings.concurrency);
        let draining = *shutdown.borrow_and_update() != Shutdown::Run;
        let status = if draining {
            format!("draining: {count} job(s) still running")
        } else {
            format!("running {count} of {} jobs", ctx.settings.concurrency)
        };
        ctx.notifier.status(&status);
        tokio::select! {
            changed = running.changed() => if changed.is_err() { return },
            changed = shutdown.changed() => if changed.is_err() { return },
        }
    }
}

/// What a drain stops: the running jobs ([`Running`]; the tests count).
trait Stop {
    /// How many jobs are running.
    fn count(&self) -> usize;
    /// Asks every running job to stop with `mode`; returns how many were asked.
    fn stop_all(&self, mode: CancelMode) -> usize;
}

impl Stop for Running {
    fn count(&self) -> usize {
        Running::count(self)
    }

    fn stop_all(&self, mode: CancelMode) -> usize {
        Running::stop_all(self, mode)
    }
}

/// Lets running jobs finish within the drain timeout, then stops what is left and waits for
/// it to be handed back. A second signal skips the wait.
async fn drain(ctx: &Ctx, tracker: &TaskTracker, shutdown: watch::Receiver<Shutdown>) {
    drain_jobs(&ctx.running, ctx.settings.drain_timeout, tracker, shutdown).await;
}

/// [`drain`], for the jobs of `tracker`, stopped through `running`.
async fn drain_jobs(
    running: &impl Stop,
    drain_timeout: Duration,
    tracker: &TaskTracker,
    mut shutdown: watch::Receiver<Shutdown>,
) {
    if tracker.is_empty() {
        return;
    }
    info!(
        event = logging::event::DRAIN_STARTED,
        running = running.count(),
        "waiting up to {} for running jobs to finish",
        humantime::format_duration(drain_timeout)
    );
    tokio::select! {
        () = tracker.wait() => return,
        () = sleep(drain_timeout) => {
            let stopped = running.stop_all(CancelMode::Abort);
            warn!(event = logging::event::DRAIN_TIMEOUT, stopped, "drain timeout passed: stopping the running jobs and handing them back");
        }
        _ = shutdown.wait_for(|s| *s == Shutdown::Now) => {
            running.stop_all(CancelMode::AbortNow);
        }
    }
    tokio::select! {
        () = tracker.wait() => {}
        _ = shutdown.wait_for(|s| *s == Shutdown::Now) => {
            running.stop_all(CancelMode::AbortNow);
            tracker.wait().await;
        }
    }
}

/// Warns about what would make every job fail, without refusing to start: a runner binary
/// may be installed by the next upgrade. (The jobs folder is [`share::probe`]'s.) Also warns,
/// once, when jobs running at the same time would share one identity.
fn check_surroundings(settings: &Settings) {
    let pool = &settings.pool;
    if pool.shared_by_slots(settings.concurrency) {
        warn!(
            event = logging::event::SHARED_IDENTITY,
            "--run-as gives one user ({}) for {} slots: jobs running at the same time share it and \
             can see, signal and change each other's processes and files. Give each slot a user of \
             its own (a comma-separated list, or a uid range such as 61184-61215)",
            pool.describe(),
            settings.concurrency
        );
    }
    for warning in &settings.limit_warnings {
        warn!("{warning}");
    }
    if !pool.switch && nix::unistd::geteuid().is_root() {
        warn!("jobs run as root: --run-as names root");
    }
    if !settings.runner.is_file() {
        warn!(
            "the runner {} does not exist; jobs will be retried until it does (see --runner)",
            settings.runner.display()
        );
    }
    if let Err(problem) = pool.can_traverse(&settings.workspaces_dir) {
        warn!("steps may not reach their workspaces: {problem}");
    }
}

/// Sleeps until `at`; never, without one (for an optional deadline in a `select!`).
pub(crate) async fn until(at: Option<tokio::time::Instant>) {
    match at {
        Some(at) => tokio::time::sleep_until(at).await,
        None => std::future::pending().await,
    }
}

/// Runs `work` on tokio's blocking pool inside the current tracing span, so that what it
/// logs still names the job (its id, attempt and stream sequence).
pub(crate) fn blocking<T: Send + 'static>(
    work: impl FnOnce() -> T + Send + 'static,
) -> tokio::task::JoinHandle<T> {
    let span = tracing::Span::current();
    tokio::task::spawn_blocking(move || span.in_scope(work))
}

#[cfg(test)]
mod tests {
    use std::sync::Mutex;

    use tokio::time::Instant;

    use super::*;

    /// Running jobs that record each stop request (mode, and seconds since the start), and
    /// end when asked with one of the modes in `obey`.
    struct Jobs {
        start: Instant,
        stops: Mutex<Vec<(CancelMode, u64)>>,
        obey: Vec<CancelMode>,
        end: watch::Sender<bool>,
    }

    impl Jobs {
        fn new(obey: &[CancelMode]) -> Self {
            Self {
                start: Instant::now(),
                stops: Mutex::default(),
                obey: obey.to_vec(),
                end: watch::channel(false).0,
            }
        }

        /// Starts a job on `tracker` that ends after `runs`, or when stopped.
        fn spawn(&self, tracker: &TaskTracker, runs: Duration) {
            let mut end = self.end.subscribe();
            tracker.spawn(async move {
                tokio::select! {
                    () = sleep(runs) => {}
                    _ = end.wait_for(|end| *end) => {}
                }
            });
        }

        fn stops(&self) -> Vec<(CancelMode, u64)> {
            self.stops.lock().unwrap().clone()
        }
    }

    impl Stop for Jobs {
        fn count(&self) -> usize {
            self.end.receiver_count()
        }

        fn stop_all(&self, mode: CancelMode) -> usize {
            let at = self.start.elapsed().as_secs();
            self.stops.lock().unwrap().push((mode, at));
            if self.obey.contains(&mode) {
                self.end.send_replace(true);
            }
            1
        }
    }

    const MINUTE: Duration = Duration::from_secs(60);

    /// Drains `jobs` with a drain timeout of a minute, a second signal coming after
    /// `second_signal`: when the drain returned, in seconds.
    async fn drain(jobs: &Jobs, tracker: &TaskTracker, second_signal: Option<Duration>) -> u64 {
        tracker.close();
        let (tx, rx) = watch::channel(Shutdown::Drain);
        if let Some(after) = second_signal {
            tokio::spawn(async move {
                sleep(after).await;
                tx.send_replace(Shutdown::Now);
                // Kept open: the drain waits for the signal, not for the sender to go.
                std::future::pending::<()>().await;
            });
        }
        drain_jobs(jobs, MINUTE, tracker, rx).await;
        jobs.start.elapsed().as_secs()
    }

    /// The jobs were told to stop now at `at`, and nothing else. (They may be told twice: the
    /// wait that follows sees the same signal; a second `AbortNow` changes nothing.)
    fn assert_now(stops: &[(CancelMode, u64)], at: u64) {
        assert!(!stops.is_empty());
        assert!(
            stops.iter().all(|stop| *stop == (CancelMode::AbortNow, at)),
            "{stops:?}"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn without_running_jobs_a_drain_is_over_at_once() {
        let jobs = Jobs::new(&[]);
        assert_eq!(drain(&jobs, &TaskTracker::new(), None).await, 0);
        assert!(jobs.stops().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn jobs_that_finish_within_the_drain_timeout_are_left_alone() {
        let jobs = Jobs::new(&[]);
        let tracker = TaskTracker::new();
        jobs.spawn(&tracker, Duration::from_secs(10));
        jobs.spawn(&tracker, Duration::from_secs(50));
        assert_eq!(drain(&jobs, &tracker, None).await, 50);
        assert!(jobs.stops().is_empty());
    }

    #[tokio::test(start_paused = true)]
    async fn after_the_drain_timeout_the_jobs_are_aborted_and_waited_for() {
        let jobs = Jobs::new(&[CancelMode::Abort]);
        let tracker = TaskTracker::new();
        jobs.spawn(&tracker, Duration::from_secs(3600));
        assert_eq!(drain(&jobs, &tracker, None).await, 60);
        assert_eq!(jobs.stops(), [(CancelMode::Abort, 60)]);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_stops_the_jobs_now_without_waiting_for_the_timeout() {
        let jobs = Jobs::new(&[CancelMode::AbortNow]);
        let tracker = TaskTracker::new();
        jobs.spawn(&tracker, Duration::from_secs(3600));
        assert_eq!(
            drain(&jobs, &tracker, Some(Duration::from_secs(5))).await,
            5
        );
        assert_now(&jobs.stops(), 5);
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_after_the_timeout_stops_jobs_that_take_long_to_abort() {
        // They do not end when aborted (a runner with a long kill grace, say).
        let jobs = Jobs::new(&[CancelMode::AbortNow]);
        let tracker = TaskTracker::new();
        jobs.spawn(&tracker, Duration::from_secs(3600));
        assert_eq!(
            drain(&jobs, &tracker, Some(Duration::from_secs(70))).await,
            70
        );
        assert_eq!(
            jobs.stops(),
            [(CancelMode::Abort, 60), (CancelMode::AbortNow, 70)]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_second_signal_before_the_drain_began_stops_the_jobs_at_once() {
        let jobs = Jobs::new(&[CancelMode::AbortNow]);
        let tracker = TaskTracker::new();
        jobs.spawn(&tracker, Duration::from_secs(3600));
        assert_eq!(drain(&jobs, &tracker, Some(Duration::ZERO)).await, 0);
        assert_now(&jobs.stops(), 0);
    }
}
