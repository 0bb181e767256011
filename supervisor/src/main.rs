//! `nats-fs-supervisor`: parse the configuration, set up logging and signals, run.
//!
//! The runtime is tokio's current-thread flavour on purpose: a runner's `PR_SET_PDEATHSIG`
//! fires when the *thread* that spawned it exits, so every runner must be spawned from a
//! thread that lives as long as the process — here, the main thread, which runs every task.
//! The supervisor's work is waiting on pipes and sockets; one thread is plenty.

use std::io::IsTerminal;
use std::process::ExitCode;

use clap::Parser;
use nats_fs_supervisor::config::{Args, LogFormat, Settings};
use nats_fs_supervisor::{dry_run, signals, Shutdown};
use tokio::sync::watch;
use tracing::error;

/// Exit code for a configuration that cannot work.
const EXIT_CONFIG: u8 = 2;

fn main() -> ExitCode {
    let args = Args::parse();
    init_tracing(args.log_format);
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

fn init_tracing(format: LogFormat) {
    use tracing_subscriber::filter::{LevelFilter, Targets};
    use tracing_subscriber::prelude::*;
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|s| s.parse::<Targets>().ok())
        .unwrap_or_else(|| {
            Targets::new()
                .with_default(LevelFilter::INFO)
                .with_target("async_nats", LevelFilter::WARN)
        });
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Text => tracing_subscriber::registry()
            .with(layer.with_ansi(std::io::stderr().is_terminal()))
            .with(filter)
            .init(),
        LogFormat::Json => tracing_subscriber::registry()
            .with(
                layer
                    .json()
                    .flatten_event(true)
                    .with_current_span(true)
                    .with_span_list(false),
            )
            .with(filter)
            .init(),
    }
}
