//! Where a run's events go: JSON lines on stdout for the supervisor ([`Pipe`]), or readable log
//! lines on stderr for a person running `nats-fs-runner --job` ([`Human`]).

use std::io::{self, Write};

use nats_fs::protocol::FromRunner;
use tracing::{info, warn};

/// Receives the events of a run.
pub(crate) trait Report {
    fn event(&mut self, event: &FromRunner);
}

/// The supervisor's pipe: one JSON object per line, flushed at once.
#[derive(Debug, Default)]
pub(crate) struct Pipe;

impl Report for Pipe {
    fn event(&mut self, event: &FromRunner) {
        // If the supervisor is gone, writing fails with EPIPE (std ignores SIGPIPE); the closed
        // stdin tells the run to stop, so the error itself needs no handling here.
        let mut out = io::stdout().lock();
        let _ = serde_json::to_writer(&mut out, event);
        let _ = out.write_all(b"\n");
        let _ = out.flush();
    }
}

/// Log lines for a person at a terminal.
#[derive(Debug, Default)]
pub(crate) struct Human;

impl Report for Human {
    fn event(&mut self, event: &FromRunner) {
        match event {
            FromRunner::Loaded {
                timeout_ms,
                steps,
                limits,
            } => info!(
                "{} step(s), timeout {}, limits: {limits}",
                steps.len(),
                humantime::format_duration(std::time::Duration::from_millis(*timeout_ms))
            ),
            FromRunner::Staged {
                files,
                bytes,
                duration_ms,
            } => info!("staged {files} files ({bytes} bytes) in {duration_ms} ms"),
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
                %status,
                exit_code,
                signal = signal.as_deref(),
                "step finished in {duration_ms} ms"
            ),
            FromRunner::Synced {
                files,
                bytes,
                duration_ms,
            } => info!("synced {files} artifacts ({bytes} bytes) in {duration_ms} ms"),
            FromRunner::Warning { message } => warn!("{message}"),
            // The end goes to the pipe only; standalone, the result is printed instead (and a
            // fault for want of room says what `NoRoom` does).
            FromRunner::NoRoom { .. } | FromRunner::Ended(_) | FromRunner::Unknown => {}
        }
    }
}
