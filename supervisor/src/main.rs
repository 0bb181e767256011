//! `nats-fs-supervisor`: parse the configuration, set up logging and signals, run.
//!
//! The runtime is tokio's current-thread flavour on purpose: a runner's `PR_SET_PDEATHSIG`
//! fires when the *thread* that spawned it exits, so every runner must be spawned from a
//! thread that lives as long as the process — here, the main thread, which runs every task.
//! The supervisor's work is waiting on pipes and sockets; one thread is plenty.
//! (Blocking file work goes to tokio's blocking pool, which spawns no runner.)

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches};
use nats_fs_supervisor::config::{Args, Settings};
use nats_fs_supervisor::{dry_run, logging, share, signals, Shutdown};
use tokio::sync::watch;
use tracing::{error, warn};

/// Exit code for a configuration that cannot work.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // Before anything else: nothing inherited from whoever started us may reach a job.
    nats_fs::fds::close_on_exec_inherited();
    let matches = match Args::command().try_get_matches() {
        Ok(matches) => matches,
        Err(e) => exit_naming_the_variable(&e),
    };
    let args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => exit_naming_the_variable(&e),
    };
    // Packaging: nothing is checked, logged or started.
    if let Some(what) = args.generate {
        return nats_fs::generate::generate(Args::command(), what, ExitCode::FAILURE);
    }
    logging::init(args.log_format);
    for (secret, what) in [
        ("password", "password"),
        ("token", "token"),
        ("url", "user and password in --url"),
    ] {
        let given = matches.value_source(secret) == Some(clap::parser::ValueSource::CommandLine);
        if given && (secret != "url" || args.url.has_secret()) {
            warn!(
                event = logging::event::SECRET_ON_COMMAND_LINE,
                secret,
                "the NATS {what} was given on the command line, where every process on this host \
                 (every job step included) can read it with ps: set it in the environment instead \
                 (/etc/default/nats-fs-supervisor) or use --creds"
            );
        }
    }
    let settings = match Settings::from_args(&args) {
        Ok(settings) => settings,
        Err(e) => {
            error!("{e:#}");
            return ExitCode::from(EXIT_CONFIG);
        }
    };
    if args.check_jobs_dir {
        let verdict = share::probe(&settings, None);
        print!("{}", verdict.report());
        return match (&verdict.refusal, &verdict.problem) {
            (Some(_), _) => ExitCode::from(EXIT_CONFIG),
            (None, Some(_)) => ExitCode::FAILURE,
            (None, None) => ExitCode::SUCCESS,
        };
    }
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(e) => {
            error!("starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let outcome = runtime.block_on(async {
        let (tx, rx) = watch::channel(Shutdown::Run);
        signals::listen(tx).map_err(|e| anyhow::anyhow!("listening for signals: {e}"))?;
        if args.dry_run {
            dry_run::run(&settings, rx).await
        } else {
            nats_fs_supervisor::run(settings, rx)
                .await
                .map(|()| ExitCode::SUCCESS)
        }
    });
    // A blocking task stuck on a drive that hangs (a flush, a workspace removal) must not
    // keep the process from exiting; what it leaves is swept at the next start.
    runtime.shutdown_timeout(std::time::Duration::from_secs(5));
    match outcome {
        Ok(code) => code,
        // Said when the jobs folder was probed.
        Err(e) if e.downcast_ref::<share::Refused>().is_some() => ExitCode::from(EXIT_CONFIG),
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}

/// Exits for a command-line error as clap does (status 2), adding which environment variable
/// the bad value came from: an operator who edited `NATS_FS_KILL_GRACE` in a settings file
/// should not have to translate `--kill-grace` back.
fn exit_naming_the_variable(error: &clap::Error) -> ! {
    use clap::error::{ContextKind, ContextValue};
    let text = |kind| match error.get(kind) {
        Some(ContextValue::String(s)) => Some(s.clone()),
        _ => None,
    };
    let from_env = text(ContextKind::InvalidArg)
        .zip(text(ContextKind::InvalidValue))
        .and_then(|(arg, value)| {
            let long = arg
                .split_whitespace()
                .next()?
                .trim_start_matches('-')
                .to_owned();
            let command = Args::command();
            let env = command
                .get_arguments()
                .find(|a| a.get_long() == Some(long.as_str()))?
                .get_env()?
                .to_string_lossy()
                .into_owned();
            (std::env::var(&env).ok()? == value).then_some(env)
        });
    let _ = error.print();
    if let Some(env) = from_env {
        eprintln!(
            "  (the value comes from the environment variable {env}, e.g. in /etc/default/nats-fs-supervisor)"
        );
    }
    std::process::exit(error.exit_code());
}
