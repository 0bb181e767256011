//! Stop requests reaching a running job, from whichever source: the supervisor over the pipe,
//! the pipe closing (the supervisor is gone), or a signal in standalone mode.
//!
//! A request only ever gets stronger: a final cancel beats an abort (the user asked for the job
//! to end, so it must not be redelivered), and "now" (skip the grace period) sticks once set.
//! A limit the supervisor watches (`memory`) arrives as an [`Exceeded`] stop: the step is
//! killed at once, the job ends `failed` with that reason, and, unlike "now", syncing still
//! runs, so that what the job produced so far is kept.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use nats_fs::manifest::Reason;
use nats_fs::protocol::CancelMode;
use tokio::sync::watch;

/// What a stop request asks for.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct Stop {
    /// The job ends `cancelled` with a manifest (true), or leaves nothing final so it can be
    /// redelivered (false).
    pub(crate) cancel: bool,
    /// Kill at once instead of TERM, grace, KILL; also interrupts staging and syncing.
    pub(crate) now: bool,
    /// The job passed a limit the supervisor watches; the first one reported wins.
    pub(crate) exceeded: Option<Exceeded>,
}

/// A limit passed, as the supervisor reported it (`ToRunner::Exceeded`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) struct Exceeded {
    pub(crate) reason: Reason,
    pub(crate) error: String,
}

impl Stop {
    pub(crate) fn from_mode(mode: CancelMode) -> Self {
        match mode {
            CancelMode::Cancel => Self {
                cancel: true,
                ..Self::default()
            },
            CancelMode::Abort => Self::default(),
            CancelMode::AbortNow => Self {
                now: true,
                ..Self::default()
            },
        }
    }

    /// A stop for a limit the supervisor saw passed.
    pub(crate) fn exceeded(reason: Reason, error: String) -> Self {
        Self {
            exceeded: Some(Exceeded { reason, error }),
            ..Self::default()
        }
    }

    /// Whether the step is killed without a grace period.
    pub(crate) fn kills_now(&self) -> bool {
        self.now || self.exceeded.is_some()
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
            *current = Some(match current.take() {
                None => stop,
                Some(old) => Stop {
                    cancel: old.cancel || stop.cancel,
                    now: old.now || stop.now,
                    exceeded: old.exceeded.or(stop.exceeded),
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
        self.rx.borrow().clone()
    }

    /// Set once an immediate stop is requested; polled by staging and syncing.
    pub(crate) fn interrupt(&self) -> Arc<AtomicBool> {
        self.interrupt.clone()
    }

    /// Waits for a request (returns at once if one was made).
    pub(crate) async fn requested(&mut self) -> Stop {
        match self.rx.wait_for(Option::is_some).await {
            Ok(stop) => stop.clone().unwrap_or_default(),
            Err(_) => std::future::pending().await,
        }
    }

    /// Waits for a request that kills without a grace period ([`Stop::kills_now`]).
    pub(crate) async fn requested_now(&mut self) -> Stop {
        match self
            .rx
            .wait_for(|s| s.as_ref().is_some_and(Stop::kills_now))
            .await
        {
            Ok(stop) => stop.clone().unwrap_or_default(),
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
                now: true,
                exceeded: None,
            })
        );
        assert!(watch.interrupt().load(Ordering::Relaxed));
    }

    #[test]
    fn an_exceeded_limit_kills_now_but_does_not_interrupt_syncing() {
        let (handle, watch) = channel();
        handle.request(Stop::exceeded(Reason::Memory, "too big".into()));
        handle.request(Stop::exceeded(Reason::Output, "later".into()));
        let stop = watch.current().unwrap();
        assert!(stop.kills_now() && !stop.now && !stop.cancel);
        assert_eq!(stop.exceeded.unwrap().reason, Reason::Memory);
        assert!(!watch.interrupt().load(Ordering::Relaxed));
    }
}
