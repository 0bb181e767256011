//! SIGTERM and SIGINT (contract §8): the first drains, the second stops running jobs at once.
//!
//! tokio's own signal module is used rather than signal-hook-tokio: it is already part of the
//! runtime we depend on, gives each signal a stream that fits `select!`, and needs no extra
//! crate. Handlers are registered once, here, from `main`. Once registered, a signal no longer
//! kills the process by default — which is exactly why the second one must escalate.

use std::io;

use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::watch;
use tracing::{info, warn};

use crate::logging::event;
use crate::Shutdown;

/// Registers the handlers and returns the task that turns signals into [`Shutdown`] levels.
pub fn listen(tx: watch::Sender<Shutdown>) -> io::Result<tokio::task::JoinHandle<()>> {
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    Ok(tokio::spawn(async move {
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        info!(event = event::DRAIN_REQUESTED, "{name}: draining — no new jobs; running ones may finish (send it again to stop them now)");
        tx.send_replace(Shutdown::Drain);
        let name = tokio::select! {
            _ = term.recv() => "SIGTERM",
            _ = int.recv() => "SIGINT",
        };
        warn!(
            event = event::STOP_NOW_REQUESTED,
            "second {name}: stopping running jobs now and handing them back"
        );
        tx.send_replace(Shutdown::Now);
    }))
}
