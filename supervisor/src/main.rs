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
use nats_fs_supervisor::{dry_run, logging, signals, Shutdown};
use tokio::sync::watch;
use tracing::{error, warn};

/// Exit code for a configuration that cannot work.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    // Before anything else: nothing inherited from whoever started us may reach a job.
    nats_fs::fds::close_on_exec_inherited();
    let matches = Args::command().get_matches();
    let args = match Args::from_arg_matches(&matches) {
        Ok(args) => args,
        Err(e) => e.exit(),
    };
    // Packaging: nothing is checked, logged or started.
    if let Some(what) = args.generate {
        return nats_fs::generate::generate(Args::command(), what, ExitCode::FAILURE);
    }
    logging::init(args.log_format);
    for secret in ["password", "token"] {
        if matches.value_source(secret) == Some(clap::parser::ValueSource::CommandLine) {
            warn!(
                "the NATS {secret} was given on the command line, where every process on this host \
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
    match outcome {
        Ok(code) => code,
        Err(e) => {
            error!("{e:#}");
            ExitCode::FAILURE
        }
    }
}
