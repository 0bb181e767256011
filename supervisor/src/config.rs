//! Configuration (contract §7): flags and environment variables with the original worker's names,
//! checked once at start so that a daemon that starts is a daemon that can work.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{bail, Context};
use clap::{Parser, ValueEnum};
use nats_fs::generate::Generate;
use nats_fs::job::{check_env_name, parse_default_timeout, parse_duration};
use nats_fs::limits::{parse_size, Kind, Limits};

use crate::identity::Pool;

/// Whether steps must be kept off the jobs folder (`--share-isolation`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ShareIsolation {
    /// A jobs folder that a step could read or change is refused.
    Required,
    /// Steps may be able to reach the jobs folder; the start-up line says when they can.
    Off,
}

/// Log line format.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    /// Human-readable lines.
    Text,
    /// One JSON object per line, for log shippers.
    Json,
}

/// The command line, as clap reads it. See [`Settings`] for the checked form.
#[derive(Debug, Clone, Parser)]
#[command(
    name = "nats-fs-supervisor",
    args_override_self = true,
    version,
    about = "Pull jobs from NATS JetStream and run each in a fresh, privilege-dropped nats-fs-runner.",
    long_about = "Pull jobs from NATS JetStream and run each in a fresh, privilege-dropped nats-fs-runner.\n\n\
    A job is a folder {jobs_dir}/{id}/ with a job.json listing shell steps; a controller publishes \
    {\"id\": \"...\"} on the input subject. The result message goes to {output_subject}.{id} once \
    results/result.json is written.\n\n\
    Every option can also be set through the environment variable shown with it. SIGTERM or SIGINT \
    drains (running jobs finish, then exit 0); a second signal stops them at once.",
    after_help = "Statuses: success (ack), failed (ack), timeout (ack), cancelled (ack), error (terminate). \
    Faults of the host are retried with a growing delay; after --max-deliver attempts the job ends as error."
)]
pub struct Args {
    /// NATS server URL(s), comma-separated.
    #[arg(
        short = 'u',
        long,
        env = "NATS_URL",
        default_value = "nats://localhost:4222"
    )]
    pub url: ServerUrl,

    /// User name for NATS.
    #[arg(short = 'n', long, env = "NATS_USERNAME")]
    pub username: Option<String>,

    /// Password for NATS (with --username).
    #[arg(short = 'p', long, env = "NATS_PASSWORD", hide_env_values = true)]
    pub password: Option<Secret>,

    /// Token for NATS.
    #[arg(short = 't', long, env = "NATS_TOKEN", hide_env_values = true)]
    pub token: Option<Secret>,

    /// NATS credentials file (JWT and `NKey` seed).
    #[arg(long, env = "NATS_CREDS", value_name = "FILE")]
    pub creds: Option<PathBuf>,

    /// Worker id: the durable consumer name (same on every host that shares the work) and the
    /// connection name.
    #[arg(
        short = 'i',
        long = "id",
        env = "WORKER_ID",
        default_value = "worker-01"
    )]
    pub worker_id: String,

    /// Folder holding one folder per job (`{jobs_dir}/{id}/job.json`), usually a shared drive.
    #[arg(
        short = 'j',
        long,
        env = "NATS_JOBS_DIR",
        default_value = "./jobs",
        value_name = "DIR"
    )]
    pub jobs_dir: PathBuf,

    /// Local folder for the private per-job workspaces (one supervisor per folder).
    #[arg(
        short = 'w',
        long,
        env = "NATS_WORKSPACES_DIR",
        default_value = "./workspaces",
        value_name = "DIR"
    )]
    pub workspaces_dir: PathBuf,

    /// JetStream stream name (created when missing: work-queue retention, file storage).
    #[arg(short = 's', long, env = "NATS_STREAM", default_value = "JOBS")]
    pub stream: String,

    /// Subject on which job requests arrive.
    #[arg(
        short = 'k',
        long,
        env = "NATS_INPUT_SUBJECT",
        default_value = "jobs.pending"
    )]
    pub input_subject: String,

    /// Prefix of the result subjects; results go to `{output_subject}.{id}`.
    #[arg(
        short = 'r',
        long,
        env = "NATS_OUTPUT_SUBJECT",
        default_value = "jobs.results"
    )]
    pub output_subject: String,

    /// A job's timeout when its job.json sets none ("90s", "10m", "1h"; a bare number means minutes).
    #[arg(short = 'o', long, env = "JOB_TIMEOUT", default_value = "30m", value_parser = parse_default_timeout)]
    pub timeout: Duration,

    /// Prefix of the cancel subjects; a message on `{cancel_subject}.{id}` cancels that job.
    #[arg(long, env = "NATS_FS_CANCEL_SUBJECT", default_value = "jobs.cancel")]
    pub cancel_subject: String,

    /// Prefix of the job event subjects: each job's lifecycle (started, step-started,
    /// step-finished, finished) is published on `{status_subject}.{id}`, best effort. Empty
    /// disables.
    #[arg(long, env = "NATS_FS_STATUS_SUBJECT", default_value = "jobs.status")]
    pub status_subject: String,

    /// Where rejected requests and jobs out of deliveries are republished, with the reason in
    /// the Nats-Fs-Reason header. Empty disables.
    #[arg(long, env = "NATS_FS_DEAD_LETTER_SUBJECT", default_value = "jobs.dead")]
    pub dead_letter_subject: String,

    /// How many jobs this host runs at once.
    #[arg(long, env = "NATS_FS_CONCURRENCY", default_value_t = 1)]
    pub concurrency: usize,

    /// Who the steps of a job run as: a user, a comma-separated list of users, or a range of
    /// uids such as 61184-61215 (no passwd entries needed). Each running job takes an identity
    /// of its own, so a list or range needs at least --concurrency entries, used by nothing
    /// else on the host [default: nobody when started as root, else the current user].
    #[arg(long, env = "NATS_FS_RUN_AS", value_name = "USERS")]
    pub run_as: Option<String>,

    /// Group every identity of --run-as runs with (name or gid); it must not reach the jobs
    /// folder [default: each user's own group; nogroup for uids without a user].
    #[arg(long, env = "NATS_FS_RUN_AS_GROUP", value_name = "GROUP")]
    pub run_as_group: Option<String>,

    /// JetStream key-value bucket in which hosts sharing the jobs folder record the job ids
    /// they are running, so that one id never runs twice at once (created when missing).
    /// Empty: one run per id on this host only.
    #[arg(long, env = "NATS_FS_LOCK_BUCKET", default_value = "nats-fs-running")]
    pub lock_bucket: String,

    /// Ack wait of the consumer; running jobs are kept alive with progress acks well inside it.
    #[arg(long, env = "NATS_FS_ACK_WAIT", default_value = "30s", value_parser = parse_duration)]
    pub ack_wait: Duration,

    /// Deliveries of a job before it gets a final error result.
    #[arg(long, env = "NATS_FS_MAX_DELIVER", default_value_t = 5)]
    pub max_deliver: i64,

    /// On SIGTERM, how long running jobs may take to finish before they are stopped and
    /// handed back for redelivery.
    #[arg(long, env = "NATS_FS_DRAIN_TIMEOUT", default_value = "5m", value_parser = parse_duration)]
    pub drain_timeout: Duration,

    /// Time between SIGTERM and SIGKILL when a step is stopped.
    #[arg(long, env = "NATS_FS_KILL_GRACE", default_value = "10s", value_parser = parse_duration)]
    pub kill_grace: Duration,

    /// Processes (and threads) a job's identity may have at once (`RLIMIT_NPROC`): the ceiling
    /// for a job's `limits.processes`, and its value for a job that sets none [default: no
    /// limit].
    #[arg(long, env = "NATS_FS_MAX_PROCESSES", value_name = "N")]
    pub max_processes: Option<String>,

    /// Open files per process of a job (`RLIMIT_NOFILE`): ceiling and default of
    /// `limits.openFiles` [default: no limit].
    #[arg(long, env = "NATS_FS_MAX_OPEN_FILES", value_name = "N")]
    pub max_open_files: Option<String>,

    /// Largest file a job's process may write, such as "2GiB" (`RLIMIT_FSIZE`): ceiling and
    /// default of `limits.fileSize` [default: no limit].
    #[arg(long, env = "NATS_FS_MAX_FILE_SIZE", value_name = "SIZE")]
    pub max_file_size: Option<String>,

    /// CPU time per process of a job, such as "1h" (`RLIMIT_CPU`): ceiling and default of
    /// `limits.cpuTime` [default: no limit].
    #[arg(long, env = "NATS_FS_MAX_CPU_TIME", value_name = "DURATION")]
    pub max_cpu_time: Option<String>,

    /// Resident memory of all of a job's processes together, such as "4GiB"; the supervisor
    /// ends a job that passes it (reason memory): ceiling and default of `limits.memory`
    /// [default: no limit].
    #[arg(long, env = "NATS_FS_MAX_MEMORY", value_name = "SIZE")]
    pub max_memory: Option<String>,

    /// Bytes a job may write into results/ (logs and artifacts), such as "10GiB": ceiling and
    /// default of `limits.output` [default: no limit].
    #[arg(long, env = "NATS_FS_MAX_OUTPUT", value_name = "SIZE")]
    pub max_output: Option<String>,

    /// The longest timeout a job may set in its job.json ("2h"); a job asking for more runs
    /// with this. At least --timeout [default: no ceiling].
    #[arg(long, env = "NATS_FS_MAX_TIMEOUT", value_name = "DURATION")]
    pub max_timeout: Option<String>,

    /// End a step as timeout (reason idle) when it prints nothing for this long, if its job
    /// sets no idleTimeout [default: off].
    #[arg(long, env = "NATS_FS_IDLE_TIMEOUT", value_name = "DURATION")]
    pub idle_timeout: Option<String>,

    /// Free space kept on the workspaces drive: a job is only started when its folder fits
    /// with this much to spare, otherwise it is handed back for another host ("0": no
    /// reserve).
    #[arg(
        long,
        env = "NATS_FS_MIN_FREE_SPACE",
        default_value = DEFAULT_MIN_FREE_SPACE,
        value_name = "SIZE"
    )]
    pub min_free_space: String,

    /// Comma-separated names of variables passed from this environment to the steps.
    #[arg(
        long,
        env = "NATS_FS_PASS_ENV",
        value_delimiter = ',',
        value_name = "NAMES"
    )]
    pub pass_env: Vec<String>,

    /// The user (`USER` or `USER:GROUP`, names or numbers) whose rights the worker uses on the
    /// jobs folder: the user the controller and the export agree on. What the worker writes
    /// there belongs to whoever the share makes this user [default: the owner of the jobs
    /// folder].
    #[arg(long, env = "NATS_FS_SHARE_USER", value_name = "USER[:GROUP]")]
    pub share_user: Option<String>,

    /// Whether steps must be unable to reach the jobs folder. `required` refuses to start (exit
    /// 2) where a step could read or change a job folder, and says how to fix the mount or the
    /// folder; `off` allows it [default: required when jobs run as other users, off otherwise].
    #[arg(long, env = "NATS_FS_SHARE_ISOLATION", value_enum)]
    pub share_isolation: Option<ShareIsolation>,

    /// How many file system calls on the jobs folder may be in flight at once while a job is
    /// staged and its artifacts copied (a network share answers each after a round trip).
    #[arg(long, env = "NATS_FS_SHARE_PARALLELISM", default_value_t = nats_fs::protocol::DEFAULT_SHARE_PARALLELISM, value_name = "N")]
    pub share_parallelism: usize,

    /// Path of the nats-fs-runner binary [default: next to this binary].
    #[arg(long, env = "NATS_FS_RUNNER", value_name = "PATH")]
    pub runner: Option<PathBuf>,

    /// Serve Prometheus metrics on `/metrics` and a health check on `/healthz` at this address,
    /// such as 127.0.0.1:9464 [default: off].
    #[arg(long, env = "NATS_FS_METRICS_LISTEN", value_name = "ADDR")]
    pub metrics_listen: Option<String>,

    /// Log format.
    #[arg(long, env = "NATS_FS_LOG_FORMAT", value_enum, default_value = "text")]
    pub log_format: LogFormat,

    /// Run ./test-payload.json once through the runner, without NATS, print the result
    /// message and exit (0 on success).
    #[arg(long)]
    pub dry_run: bool,

    /// Probe the jobs folder as the worker would at start, print what it allows and what the
    /// worker guarantees on it, and exit: 0 when the worker would run jobs there, 1 when jobs
    /// cannot run there yet (no folder, a read-only drive), 2 when it would refuse it. Needs no
    /// NATS.
    #[arg(long, conflicts_with = "dry_run")]
    pub check_jobs_dir: bool,

    /// Print the manual page or a shell's completions to stdout and exit, without checking
    /// anything else (for packaging).
    #[arg(long, value_enum, value_name = "WHAT", hide = true)]
    pub generate: Option<Generate>,
}

/// A password or token from the command line or the environment: debug output (of [`Args`],
/// say) shows `"***"` in its place, never the value.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl From<String> for Secret {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("\"***\"")
    }
}

/// A NATS server URL, or in [`Args`] a comma-separated list of them, as given. A URL may
/// carry a user and password (`nats://u:p@host`): debug and display output show
/// `nats://***@host`, never them; [`ServerUrl::as_str`] is for connecting.
#[derive(Clone, PartialEq, Eq)]
pub struct ServerUrl(String);

impl From<String> for ServerUrl {
    fn from(value: String) -> Self {
        Self(value)
    }
}

impl ServerUrl {
    /// The URL as given, credentials and all.
    #[must_use]
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The URLs of a comma-separated list, without blanks.
    fn split(&self) -> Vec<Self> {
        self.0
            .split(',')
            .map(str::trim)
            .filter(|u| !u.is_empty())
            .map(|u| Self(u.to_owned()))
            .collect()
    }
}

impl std::fmt::Display for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let shown: Vec<String> = self.0.split(',').map(without_secret).collect();
        f.write_str(&shown.join(","))
    }
}

impl std::fmt::Debug for ServerUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "\"{self}\"")
    }
}

/// A server URL without the user and password it may carry (`nats://u:p@host` →
/// `nats://***@host`).
fn without_secret(url: &str) -> String {
    let (scheme, rest) = match url.split_once("://") {
        Some((scheme, rest)) => (format!("{scheme}://"), rest),
        // The client takes `user:password@host` without a scheme too.
        None => (String::new(), url),
    };
    match rest.rsplit_once('@') {
        Some((_, host)) => format!("{scheme}***@{host}"),
        None => url.to_owned(),
    }
}

impl ServerUrl {
    /// Whether a URL of the list carries a user, password or token.
    #[must_use]
    pub fn has_secret(&self) -> bool {
        self.0.contains('@')
    }
}

/// How to authenticate to NATS.
#[derive(Clone)]
pub enum Auth {
    None,
    UserPassword { user: String, password: String },
    Token(String),
    Creds(PathBuf),
}

impl std::fmt::Debug for Auth {
    // Never print secrets, not even in debug output.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::None => f.write_str("none"),
            Self::UserPassword { user, .. } => write!(f, "user {user} with a password"),
            Self::Token(_) => f.write_str("token"),
            Self::Creds(path) => write!(f, "credentials file {}", path.display()),
        }
    }
}

impl Auth {
    fn from_args(args: &Args) -> anyhow::Result<Self> {
        Ok(
            match (
                set(args.username.as_ref()),
                set(args.password.as_ref().map(|secret| &secret.0)),
                set(args.token.as_ref().map(|secret| &secret.0)),
                args.creds.as_ref().filter(|p| !p.as_os_str().is_empty()),
            ) {
                (None, None, None, None) => Self::None,
                (Some(user), Some(password), None, None) => Self::UserPassword {
                    user: user.to_owned(),
                    password: password.to_owned(),
                },
                (Some(_), None, None, None) => {
                    bail!("--username (NATS_USERNAME) needs --password (NATS_PASSWORD)")
                }
                (None, Some(_), None, None) => {
                    bail!("--password (NATS_PASSWORD) needs --username (NATS_USERNAME)")
                }
                (None, None, Some(token), None) => Self::Token(token.to_owned()),
                (None, None, None, Some(creds)) => Self::Creds(creds.clone()),
                _ => {
                    bail!("give one way to authenticate: --username/--password, --token or --creds")
                }
            },
        )
    }
}

/// A string option that is set and not empty: an environment file line such as
/// `NATS_USERNAME=` means "not set", as it would for a shell script.
fn set(value: Option<&String>) -> Option<&str> {
    value.map(|v| v.trim()).filter(|v| !v.is_empty())
}

/// Checked configuration.
#[derive(Debug, Clone)]
pub struct Settings {
    pub urls: Vec<ServerUrl>,
    pub auth: Auth,
    pub worker_id: String,
    pub jobs_dir: PathBuf,
    pub workspaces_dir: PathBuf,
    pub stream: String,
    pub input_subject: String,
    pub output_subject: String,
    pub cancel_subject: String,
    /// Where job events go, if anywhere.
    pub status_subject: Option<String>,
    pub dead_letter_subject: Option<String>,
    pub default_timeout: Duration,
    pub concurrency: usize,
    /// The identities of `--run-as`.
    pub pool: Arc<Pool>,
    /// The key-value bucket of running job ids, if any.
    pub lock_bucket: Option<String>,
    /// Where to serve metrics, if anywhere.
    pub metrics_listen: Option<std::net::SocketAddr>,
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub drain_timeout: Duration,
    pub kill_grace: Duration,
    pub pass_env: Vec<String>,
    /// What every step's environment starts from, read once at start (this process's
    /// environment does not change): `PATH` and `LANG` ([`nats_fs::step_env::base_env`]), and
    /// the values of the `--pass-env` names that are set.
    pub base_env: BTreeMap<String, String>,
    pub pass_env_values: BTreeMap<String, String>,
    pub runner: PathBuf,
    /// The operator's limits (`--max-*`): ceilings of a job's own, and its values when it
    /// sets none. `None` is no limit.
    pub ceilings: Limits,
    /// Said once at start: ceilings lowered to what this process can give its runners.
    pub limit_warnings: Vec<String>,
    /// The longest timeout a job may set (`--max-timeout`).
    pub max_timeout: Option<Duration>,
    /// A step's idle timeout when its job sets none (`--idle-timeout`).
    pub idle_timeout: Option<Duration>,
    /// Bytes kept free on the workspaces drive (`--min-free-space`); 0 for no reserve.
    pub min_free_space: u64,
    /// `--share-user`, as given (resolved by the probe of the jobs folder, whose owner it is
    /// by default).
    pub share_user: Option<String>,
    /// Whether a jobs folder that steps could reach is refused.
    pub share_isolation: ShareIsolation,
    /// File system calls in flight at once on the jobs folder.
    pub share_parallelism: usize,
}

impl Settings {
    /// Checks the arguments; every error names the option and what is wrong with it.
    pub fn from_args(args: &Args) -> anyhow::Result<Self> {
        let urls = args.url.split();
        if urls.is_empty() {
            bail!("--url (NATS_URL) names no server");
        }
        let auth = Auth::from_args(args)?;
        check_name("--id (WORKER_ID)", &args.worker_id)?;
        check_name("--stream (NATS_STREAM)", &args.stream)?;
        let (dead_letter_subject, status_subject) = check_subjects(args)?;
        if args.concurrency == 0 || args.concurrency > 1024 {
            bail!(
                "--concurrency (NATS_FS_CONCURRENCY) must be between 1 and 1024, not {}",
                args.concurrency
            );
        }
        if args.max_deliver < 1 {
            bail!(
                "--max-deliver (NATS_FS_MAX_DELIVER) must be at least 1, not {}",
                args.max_deliver
            );
        }
        if args.ack_wait < Duration::from_secs(1) {
            bail!("--ack-wait (NATS_FS_ACK_WAIT) must be at least 1s");
        }
        let mut pass_env = Vec::new();
        for name in args
            .pass_env
            .iter()
            .map(|n| n.trim())
            .filter(|n| !n.is_empty())
        {
            check_env_name(name).map_err(|problem| {
                anyhow::anyhow!("--pass-env (NATS_FS_PASS_ENV): {name:?} {problem}")
            })?;
            pass_env.push(name.to_owned());
        }
        let runner = match args.runner.as_ref().filter(|p| !p.as_os_str().is_empty()) {
            Some(path) => runner_path(path)?,
            None => default_runner()?,
        };
        let pool = Arc::new(Pool::resolve(
            set(args.run_as.as_ref()),
            set(args.run_as_group.as_ref()),
        )?);
        pool.check_concurrency(args.concurrency)?;
        let metrics_listen = match set(args.metrics_listen.as_ref()) {
            None => None,
            Some(addr) => Some(addr.parse().map_err(|_| {
                anyhow::anyhow!(
                    "--metrics-listen (NATS_FS_METRICS_LISTEN) {addr:?} is not an address such as 127.0.0.1:9464"
                )
            })?),
        };
        let limits = LimitArgs::from_args(args)?;
        let (ceilings, limit_warnings) = crate::spawn::clamp_to_hard_limits(limits.ceilings);
        let share_isolation = share_isolation(args, &pool)?;
        let lock_bucket = match args.lock_bucket.trim() {
            "" => None,
            bucket => {
                check_name("--lock-bucket (NATS_FS_LOCK_BUCKET)", bucket)?;
                Some(bucket.to_owned())
            }
        };
        Ok(Self {
            urls,
            auth,
            worker_id: args.worker_id.clone(),
            jobs_dir: absolute(&args.jobs_dir)?,
            workspaces_dir: absolute(&args.workspaces_dir)?,
            stream: args.stream.clone(),
            input_subject: args.input_subject.clone(),
            output_subject: args.output_subject.clone(),
            cancel_subject: args.cancel_subject.clone(),
            status_subject,
            dead_letter_subject,
            default_timeout: args.timeout,
            concurrency: args.concurrency,
            pool,
            lock_bucket,
            metrics_listen,
            ack_wait: args.ack_wait,
            max_deliver: args.max_deliver,
            drain_timeout: args.drain_timeout,
            kill_grace: args.kill_grace,
            base_env: nats_fs::step_env::base_env(),
            pass_env_values: pass_env
                .iter()
                .filter_map(|name| std::env::var(name).ok().map(|value| (name.clone(), value)))
                .collect(),
            pass_env,
            runner,
            ceilings,
            limit_warnings,
            max_timeout: limits.max_timeout,
            idle_timeout: limits.idle_timeout,
            min_free_space: limits.min_free_space,
            share_user: set(args.share_user.as_ref()).map(str::to_owned),
            share_isolation,
            share_parallelism: args.share_parallelism,
        })
    }

    /// The subject a job's result is published on.
    pub fn result_subject(&self, id: &str) -> String {
        format!("{}.{id}", self.output_subject)
    }
}

/// `--share-isolation`, by default required when jobs run as other users; `--share-parallelism`
/// checked on the way.
fn share_isolation(args: &Args, pool: &Pool) -> anyhow::Result<ShareIsolation> {
    if args.share_parallelism == 0 || args.share_parallelism > 256 {
        bail!(
            "--share-parallelism (NATS_FS_SHARE_PARALLELISM) must be between 1 and 256, not {}",
            args.share_parallelism
        );
    }
    Ok(args.share_isolation.unwrap_or(if pool.switch {
        ShareIsolation::Required
    } else {
        ShareIsolation::Off
    }))
}

/// The containment options, checked.
struct LimitArgs {
    ceilings: Limits,
    max_timeout: Option<Duration>,
    idle_timeout: Option<Duration>,
    min_free_space: u64,
}

impl LimitArgs {
    /// Reads `--max-*`, `--idle-timeout` and `--min-free-space`; an empty value (an
    /// environment file's `NATS_FS_MAX_MEMORY=`) is "not set".
    fn from_args(args: &Args) -> anyhow::Result<Self> {
        let duration = |what: &str, value: Option<&String>| -> anyhow::Result<Option<Duration>> {
            set(value)
                .map(|v| match parse_duration(v) {
                    Ok(d) if d.is_zero() => bail!("{what} must be longer than zero"),
                    Ok(d) => Ok(d),
                    Err(problem) => bail!("{what} {problem}"),
                })
                .transpose()
        };
        let mut ceilings = Limits::default();
        for kind in Kind::ALL {
            let value = set(ceiling_arg(args, kind))
                .map(|v| {
                    kind.parse_str(v)
                        .map_err(|problem| anyhow::anyhow!("{} {problem}", ceiling_option(kind)))
                })
                .transpose()?;
            ceilings.set(kind, value);
        }
        let max_timeout = duration(
            "--max-timeout (NATS_FS_MAX_TIMEOUT)",
            args.max_timeout.as_ref(),
        )?;
        if let Some(max) = max_timeout {
            if max < args.timeout {
                bail!(
                    "--max-timeout (NATS_FS_MAX_TIMEOUT) {} is shorter than --timeout (JOB_TIMEOUT) {}: \
                     the timeout of a job that sets none must be within the ceiling",
                    humantime::format_duration(max),
                    humantime::format_duration(args.timeout)
                );
            }
        }
        let idle_timeout = duration(
            "--idle-timeout (NATS_FS_IDLE_TIMEOUT)",
            args.idle_timeout.as_ref(),
        )?;
        let min_free_space = match args.min_free_space.trim() {
            "0" => 0,
            "" => parse_size(DEFAULT_MIN_FREE_SPACE).map_err(anyhow::Error::msg)?,
            v => parse_size(v).map_err(|problem| {
                anyhow::anyhow!("--min-free-space (NATS_FS_MIN_FREE_SPACE) {problem}")
            })?,
        };
        Ok(Self {
            ceilings,
            max_timeout,
            idle_timeout,
            min_free_space,
        })
    }
}

/// The option that sets the ceiling of `kind`, as messages name it.
pub fn ceiling_option(kind: Kind) -> &'static str {
    match kind {
        Kind::Processes => "--max-processes (NATS_FS_MAX_PROCESSES)",
        Kind::OpenFiles => "--max-open-files (NATS_FS_MAX_OPEN_FILES)",
        Kind::FileSize => "--max-file-size (NATS_FS_MAX_FILE_SIZE)",
        Kind::CpuTime => "--max-cpu-time (NATS_FS_MAX_CPU_TIME)",
        Kind::Memory => "--max-memory (NATS_FS_MAX_MEMORY)",
        Kind::Output => "--max-output (NATS_FS_MAX_OUTPUT)",
    }
}

/// The value given for the ceiling of `kind`.
fn ceiling_arg(args: &Args, kind: Kind) -> Option<&String> {
    match kind {
        Kind::Processes => args.max_processes.as_ref(),
        Kind::OpenFiles => args.max_open_files.as_ref(),
        Kind::FileSize => args.max_file_size.as_ref(),
        Kind::CpuTime => args.max_cpu_time.as_ref(),
        Kind::Memory => args.max_memory.as_ref(),
        Kind::Output => args.max_output.as_ref(),
    }
}

/// `--min-free-space` when it is not set (or set empty).
const DEFAULT_MIN_FREE_SPACE: &str = "1GiB";

/// Checks the subject options; returns the dead-letter subject and the status subject (each
/// `None` when disabled by an empty value).
fn check_subjects(args: &Args) -> anyhow::Result<(Option<String>, Option<String>)> {
    check_subject(
        "--input-subject (NATS_INPUT_SUBJECT)",
        &args.input_subject,
        true,
    )?;
    check_subject(
        "--output-subject (NATS_OUTPUT_SUBJECT)",
        &args.output_subject,
        false,
    )?;
    check_subject(
        "--cancel-subject (NATS_FS_CANCEL_SUBJECT)",
        &args.cancel_subject,
        false,
    )?;
    let optional = |what: &str, value: &str| -> anyhow::Result<Option<String>> {
        match value.trim() {
            "" => Ok(None),
            subject => {
                check_subject(what, subject, false)?;
                Ok(Some(subject.to_owned()))
            }
        }
    };
    Ok((
        optional(
            "--dead-letter-subject (NATS_FS_DEAD_LETTER_SUBJECT)",
            &args.dead_letter_subject,
        )?,
        optional(
            "--status-subject (NATS_FS_STATUS_SUBJECT)",
            &args.status_subject,
        )?,
    ))
}

fn absolute(path: &Path) -> anyhow::Result<PathBuf> {
    std::path::absolute(path).with_context(|| format!("resolving {}", path.display()))
}

/// Where `--runner` is, as an absolute path (runners are started from `/`): a bare name is
/// looked up in `PATH` (the first file of that name, executable or not, unlike a shell); any
/// other relative path is taken from the directory the supervisor was started in. A runner
/// that cannot be executed fails each job as a host fault, naming the cause.
fn runner_path(given: &Path) -> anyhow::Result<PathBuf> {
    let mut parts = given.components();
    if let (Some(std::path::Component::Normal(_)), None) = (parts.next(), parts.next()) {
        let path =
            std::env::var_os("PATH").unwrap_or_else(|| nats_fs::step_env::DEFAULT_PATH.into());
        if let Some(found) = std::env::split_paths(&path)
            .map(|dir| dir.join(given))
            .find(|candidate| candidate.is_absolute() && candidate.is_file())
        {
            return Ok(found);
        }
    }
    std::path::absolute(given).with_context(|| format!("--runner {}", given.display()))
}

/// `nats-fs-runner` next to our own binary, as the package installs them.
fn default_runner() -> anyhow::Result<PathBuf> {
    let me =
        std::env::current_exe().context("finding this binary's path for the default --runner")?;
    Ok(me.with_file_name("nats-fs-runner"))
}

/// A durable consumer or stream name: letters, digits, `_` and `-`.
fn check_name(what: &str, name: &str) -> anyhow::Result<()> {
    if name.is_empty() || name.len() > 64 {
        bail!("{what} must be 1 to 64 characters long");
    }
    if let Some(bad) = name
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-')))
    {
        bail!("{what} {name:?} contains {bad:?}; use letters, digits, '_' and '-'");
    }
    Ok(())
}

/// A subject: dot-separated non-empty tokens without spaces; wildcards only where allowed.
fn check_subject(what: &str, subject: &str, wildcards: bool) -> anyhow::Result<()> {
    let tokens_ok = !subject.is_empty()
        && subject.split('.').all(|t| {
            !t.is_empty()
                && !t.chars().any(|c| c.is_whitespace() || c.is_control())
                && (wildcards || (t != "*" && t != ">"))
                && (t.len() == 1 || !t.contains(['*', '>']))
        });
    if !tokens_ok {
        bail!(
            "{what} {subject:?} is not a valid subject{}",
            if wildcards {
                ""
            } else {
                " prefix (no wildcards)"
            }
        );
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(extra: &[&str]) -> anyhow::Result<Settings> {
        let mut argv = vec!["nats-fs-supervisor", "--runner", "/bin/true"];
        argv.extend_from_slice(extra);
        Settings::from_args(&Args::try_parse_from(argv)?)
    }

    #[test]
    fn defaults_match_the_spec() {
        let args = Args::try_parse_from(["nats-fs-supervisor"]).unwrap();
        assert_eq!(args.url.as_str(), "nats://localhost:4222");
        assert_eq!(args.worker_id, "worker-01");
        assert_eq!(args.stream, "JOBS");
        assert_eq!(args.input_subject, "jobs.pending");
        assert_eq!(args.output_subject, "jobs.results");
        assert_eq!(args.cancel_subject, "jobs.cancel");
        assert_eq!(args.dead_letter_subject, "jobs.dead");
        assert_eq!(args.timeout, Duration::from_secs(1800));
        assert_eq!(args.concurrency, 1);
        assert_eq!(args.ack_wait, Duration::from_secs(30));
        assert_eq!(args.max_deliver, 5);
        assert_eq!(args.drain_timeout, Duration::from_secs(300));
        assert_eq!(args.kill_grace, Duration::from_secs(10));
        assert_eq!(args.log_format, LogFormat::Text);
    }

    #[test]
    fn generate_is_parsed_and_hidden_from_help() {
        let args = Args::try_parse_from(["x", "--generate", "complete-zsh"]).unwrap();
        assert_eq!(args.generate, Some(Generate::CompleteZsh));
        assert!(Args::try_parse_from(["x", "--generate", "html"]).is_err());
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        assert!(help.contains("--lock-bucket"), "{help}");
        assert!(!help.contains("--generate"), "{help}");
    }

    #[test]
    fn bare_job_timeout_is_minutes() {
        let args = Args::try_parse_from(["x", "--timeout", "2"]).unwrap();
        assert_eq!(args.timeout, Duration::from_secs(120));
    }

    #[test]
    fn url_lists_and_auth() {
        let s = parse(&["-u", "nats://a:4222, nats://b:4222"]).unwrap();
        let urls: Vec<&str> = s.urls.iter().map(ServerUrl::as_str).collect();
        assert_eq!(urls, ["nats://a:4222", "nats://b:4222"]);
        assert!(matches!(
            parse(&["-n", "u", "-p", "pw"]).unwrap().auth,
            Auth::UserPassword { .. }
        ));
        assert!(parse(&["-n", "u"])
            .unwrap_err()
            .to_string()
            .contains("needs --password"));
        assert!(parse(&["-t", "x", "-n", "u", "-p", "y"]).is_err());
        // Empty values (an environment file's `NATS_TOKEN=`) mean "not set".
        assert!(matches!(
            parse(&["-t", "", "-n", " "]).unwrap().auth,
            Auth::None
        ));
        let debug = format!("{:?}", parse(&["-t", "s3cret"]).unwrap());
        assert!(!debug.contains("s3cret"), "{debug}");
    }

    #[test]
    fn urls_never_show_their_user_and_password() {
        let args =
            Args::try_parse_from(["x", "-u", "nats://alice:pa55word@a:4222, t0ken@b,c:4222"])
                .unwrap();
        let settings = Settings::from_args(&args).unwrap();
        for shown in [
            format!("{args:?}"),
            format!("{settings:?}"),
            format!("{:#?}", settings.urls),
            args.url.to_string(),
        ] {
            assert!(
                !shown.contains("pa55word") && !shown.contains("alice") && !shown.contains("t0ken"),
                "{shown}"
            );
        }
        let shown: Vec<String> = settings.urls.iter().map(ToString::to_string).collect();
        assert_eq!(shown, ["nats://***@a:4222", "***@b", "c:4222"]);
        // The values themselves still reach the connection.
        assert_eq!(settings.urls[0].as_str(), "nats://alice:pa55word@a:4222");
    }

    #[test]
    fn args_never_show_the_password_or_the_token() {
        let args =
            Args::try_parse_from(["x", "-n", "alice", "-p", "pa55word", "-t", "t0ken"]).unwrap();
        let debug = format!("{args:?}");
        assert!(
            !debug.contains("pa55word") && !debug.contains("t0ken"),
            "{debug}"
        );
        assert!(debug.contains(r#"password: Some("***")"#), "{debug}");
        assert!(debug.contains(r#"token: Some("***")"#), "{debug}");
        assert!(debug.contains("alice"), "{debug}");
        // The values themselves still reach the connection.
        let auth = parse(&["-n", "alice", "-p", "pa55word"]).unwrap().auth;
        assert!(matches!(auth, Auth::UserPassword { password, .. } if password == "pa55word"));
        let auth = parse(&["-t", "t0ken"]).unwrap().auth;
        assert!(matches!(auth, Auth::Token(token) if token == "t0ken"));
        let pretty = format!("{:#?}", Args::try_parse_from(["x", "-t", "t0ken"]).unwrap());
        assert!(!pretty.contains("t0ken"), "{pretty}");
    }

    #[test]
    fn bad_values_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["--id", "a.b"], "--id"),
            (&["--stream", "a b"], "--stream"),
            (&["--output-subject", "jobs.*"], "--output-subject"),
            (&["--input-subject", "jobs..x"], "--input-subject"),
            (&["--concurrency", "0"], "--concurrency"),
            (&["--max-deliver", "0"], "--max-deliver"),
            (&["--ack-wait", "10ms"], "--ack-wait"),
            (&["--pass-env", "A=B"], "--pass-env"),
            (
                &["--dead-letter-subject", "dead.>"],
                "--dead-letter-subject",
            ),
        ];
        for (argv, want) in cases {
            let err = parse(argv).unwrap_err().to_string();
            assert!(err.contains(want), "{argv:?}: {err}");
        }
        assert!(parse(&["--input-subject", "jobs.*"]).is_ok());
        assert!(parse(&["--dead-letter-subject", ""])
            .unwrap()
            .dead_letter_subject
            .is_none());
    }

    #[test]
    fn limits_default_to_none_and_read_as_people_write_them() {
        let s = parse(&[]).unwrap();
        assert!(s.ceilings.is_empty());
        assert_eq!((s.max_timeout, s.idle_timeout), (None, None));
        assert_eq!(s.min_free_space, 1 << 30);
        let s = parse(&[
            "--max-processes",
            "50",
            "--max-open-files",
            "256",
            "--max-file-size",
            "2GiB",
            "--max-cpu-time",
            "1m 0.5s",
            "--max-memory",
            "512 MiB",
            "--max-output",
            "1000000",
            "--max-timeout",
            "2h",
            "--idle-timeout",
            "90s",
            "--min-free-space",
            "0",
        ])
        .unwrap();
        assert_eq!(
            s.ceilings,
            Limits {
                processes: Some(50),
                open_files: Some(256),
                file_size: Some(2 << 30),
                cpu_time: Some(61),
                memory: Some(512 << 20),
                output: Some(1_000_000),
            }
        );
        assert_eq!(s.max_timeout, Some(Duration::from_secs(7200)));
        assert_eq!(s.idle_timeout, Some(Duration::from_secs(90)));
        assert_eq!(s.min_free_space, 0);
        // Empty values (an environment file's `NATS_FS_MAX_MEMORY=`) mean "not set".
        let s = parse(&[
            "--max-memory",
            "",
            "--max-timeout",
            " ",
            "--min-free-space",
            "",
        ])
        .unwrap();
        assert_eq!((s.ceilings.memory, s.max_timeout), (None, None));
        assert_eq!(s.min_free_space, 1 << 30);
    }

    #[test]
    fn bad_limits_are_named() {
        let cases: &[(&[&str], &str)] = &[
            (&["--max-memory", "lots"], "--max-memory (NATS_FS_MAX_MEMORY) \"lots\" is not a size"),
            (&["--max-memory", "0"], "--max-memory"),
            (&["--max-processes", "0"], "--max-processes"),
            (&["--max-processes", "many"], "--max-processes"),
            (&["--max-open-files=-1"], "--max-open-files"),
            (&["--max-file-size", "2 parsecs"], "--max-file-size"),
            (&["--max-output", "x"], "--max-output"),
            (&["--max-cpu-time", "soon"], "--max-cpu-time"),
            (&["--max-cpu-time", "0s"], "--max-cpu-time"),
            (&["--idle-timeout", "0"], "--idle-timeout"),
            (&["--min-free-space", "plenty"], "--min-free-space"),
            (
                &["--max-timeout", "1m", "--timeout", "30m"],
                "--max-timeout (NATS_FS_MAX_TIMEOUT) 1m is shorter than --timeout (JOB_TIMEOUT) 30m",
            ),
        ];
        for (argv, want) in cases {
            let err = parse(argv).unwrap_err().to_string();
            assert!(err.contains(want), "{argv:?}: {err}");
        }
        // The ceiling may equal the default timeout.
        assert!(parse(&["--max-timeout", "30m"]).is_ok());
    }

    #[test]
    fn limit_options_are_in_the_help() {
        let help = <Args as clap::CommandFactory>::command()
            .render_long_help()
            .to_string();
        for name in [
            "NATS_FS_MAX_PROCESSES",
            "NATS_FS_MAX_OPEN_FILES",
            "NATS_FS_MAX_FILE_SIZE",
            "NATS_FS_MAX_CPU_TIME",
            "NATS_FS_MAX_MEMORY",
            "NATS_FS_MAX_OUTPUT",
            "NATS_FS_MAX_TIMEOUT",
            "NATS_FS_IDLE_TIMEOUT",
            "NATS_FS_MIN_FREE_SPACE",
        ] {
            assert!(help.contains(name), "{name} missing from --help");
        }
    }

    #[test]
    fn a_runner_path_is_made_absolute_and_a_bare_name_is_looked_up_in_path() {
        let here = std::env::current_dir().unwrap();
        let sh = runner_path(Path::new("sh")).unwrap();
        assert!(
            sh.is_absolute() && sh.is_file() && sh.ends_with("sh"),
            "{sh:?}"
        );
        for (given, expected) in [
            (
                "/opt/x/nats-fs-runner",
                PathBuf::from("/opt/x/nats-fs-runner"),
            ),
            ("./nats-fs-runner", here.join("nats-fs-runner")),
            ("bin/nats-fs-runner", here.join("bin/nats-fs-runner")),
            (
                "no-such-runner-anywhere",
                here.join("no-such-runner-anywhere"),
            ),
        ] {
            assert_eq!(runner_path(Path::new(given)).unwrap(), expected, "{given}");
        }
    }
}
