//! Stop requests reaching a running job, from whichever source: the supervisor over the pipe,
//! the pipe closing (the supervisor is gone), or a signal in standalone mode.
//!
//! A request only ever gets stronger: a final cancel beats an abort (the user asked for the job
//! to end, so it must not be redelivered), and "now" (skip the grace period) sticks once set.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nats_fs::protocol::CancelMode;
use tokio::sync::watch;

/// What a stop request asks for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Stop {
    /// The job ends `cancelled` with a manifest (true), or leaves nothing final so it can be
    /// redelivered (false).
    pub(crate) cancel: bool,
    /// Kill at once instead of TERM, grace, KILL; also interrupts staging and syncing.
    pub(crate) now: bool,
}

impl Stop {
    pub(crate) fn from_mode(mode: CancelMode) -> Self {
        match mode {
            CancelMode::Cancel => Self {
                cancel: true,
                now: false,
            },
            CancelMode::Abort => Self {
                cancel: false,
                now: false,
            },
            CancelMode::AbortNow => Self {
                cancel: false,
                now: true,
            },
        }
    }
}

/// The sending side, held by whatever listens for stop requests.
#[derive(Debug, Clone)]
pub(crate) struct StopHandle {
    tx: Arc<watch::Sender<Option<Stop>>>,
    interrupt: Arc<AtomicBool>,
}

/// The receiving side, held by the job.
#[derive(Debug, Clone)]
pub(crate) struct StopWatch {
    rx: watch::Receiver<Option<Stop>>,
    interrupt: Arc<AtomicBool>,
}

/// A connected pair.
pub(crate) fn channel() -> (StopHandle, StopWatch) {
    let (tx, rx) = watch::channel(None);
    let interrupt = Arc::new(AtomicBool::new(false));
    (
        StopHandle {
            tx: Arc::new(tx),
            interrupt: interrupt.clone(),
        },
        StopWatch { rx, interrupt },
    )
}

impl StopHandle {
    /// Records a request, merged with any earlier one.
    pub(crate) fn request(&self, stop: Stop) {
        if stop.now {
            self.interrupt.store(true, Ordering::Relaxed);
        }
        self.tx.send_modify(|current| {
            *current = Some(match *current {
                None => stop,
                Some(old) => Stop {
                    cancel: old.cancel || stop.cancel,
                    now: old.now || stop.now,
                },
            });
        });
    }

    /// Whether any request was made.
    pub(crate) fn is_requested(&self) -> bool {
        self.tx.borrow().is_some()
    }
}

impl StopWatch {
    /// The request so far, if any.
    pub(crate) fn current(&self) -> Option<Stop> {
        *self.rx.borrow()
    }

    /// Set once an immediate stop is requested; polled by staging and syncing.
    pub(crate) fn interrupt(&self) -> Arc<AtomicBool> {
        self.interrupt.clone()
    }

    /// Waits for a request (returns at once if one was made).
    pub(crate) async fn requested(&mut self) -> Stop {
        match self.rx.wait_for(Option::is_some).await {
            Ok(stop) => stop.unwrap_or(Stop {
                cancel: false,
                now: false,
            }),
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits for an immediate-stop request.
    pub(crate) async fn requested_now(&mut self) -> Stop {
        match self.rx.wait_for(|s| s.is_some_and(|s| s.now)).await {
            Ok(stop) => stop.unwrap_or(Stop {
                cancel: false,
                now: true,
            }),
            Err(_) => std::future::pending().await,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_only_get_stronger() {
        let (handle, watch) = channel();
        assert_eq!(watch.current(), None);
        handle.request(Stop::from_mode(CancelMode::Cancel));
        handle.request(Stop::from_mode(CancelMode::AbortNow));
        assert_eq!(
            watch.current(),
            Some(Stop {
                cancel: true,
                now: true
            })
        );
        assert!(watch.interrupt().load(Ordering::Relaxed));
    }
}
