//! Deciding how a job message is settled (contract §6), as a pure function so every row of the
//! table is unit-tested: publish a final result then ack or terminate, nak with a delay to retry
//! a host fault, or leave the message alone when its lease is already lost.

use std::time::Duration;

use nats_fs::manifest::Reason;
use nats_fs::{JobOutcome, ResultMessage, Status};

use crate::backoff::Backoff;

/// The first retry delay of a host fault; it doubles with every delivery.
const FIRST_RETRY: Duration = Duration::from_secs(1);
/// The longest retry delay.
const MAX_RETRY: Duration = Duration::from_secs(60);

/// What to do with a job message once its run is over.
#[derive(Debug, Clone, PartialEq)]
pub enum Decision {
    /// Publish `result`, republish the request on the dead-letter subject when `dead_letter`
    /// gives a reason, then `ack`.
    Publish {
        result: Box<ResultMessage>,
        ack: Ack,
        dead_letter: Option<String>,
    },
    /// Nak with this delay so the job runs again (here or on another host).
    Retry { delay: Duration, why: String },
    /// Do nothing: the lease was lost, so the server redelivers (or already has) and a nak
    /// from this stale delivery could disturb the copy running elsewhere.
    Leave { why: String },
}

/// The final acknowledgement of a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ack {
    /// Done: `+ACK`.
    Ack,
    /// Never again: `+TERM`.
    Term,
}

/// The ack that goes with a final status: `error` terminates, everything else acks.
#[must_use]
pub fn ack_for(status: Status) -> Ack {
    if status == Status::Error {
        Ack::Term
    } else {
        Ack::Ack
    }
}

/// How long to wait before the next delivery after a host fault on delivery `delivered`.
#[must_use]
pub fn retry_delay(delivered: u64) -> Duration {
    let doublings = u32::try_from(delivered.saturating_sub(1)).unwrap_or(u32::MAX);
    Backoff::new(FIRST_RETRY, MAX_RETRY).nth(doublings)
}

/// Decides what to do with a message on its `delivered`-th delivery out of `max_deliver`.
#[must_use]
pub fn decide(
    id: &str,
    end: JobOutcome,
    delivered: u64,
    max_deliver: i64,
    lease_lost: bool,
) -> Decision {
    let last_delivery = i64::try_from(delivered).unwrap_or(i64::MAX) >= max_deliver;
    match end {
        JobOutcome::Final(result) => Decision::Publish {
            ack: ack_for(result.status),
            result,
            dead_letter: None,
        },
        // On the last delivery there is no copy to race: fall through to the final error.
        JobOutcome::Aborted { why } | JobOutcome::Fault { why } if lease_lost && !last_delivery => {
            Decision::Leave { why }
        }
        JobOutcome::Aborted { why } if !last_delivery => Decision::Retry {
            delay: Duration::ZERO,
            why,
        },
        JobOutcome::Fault { why } | JobOutcome::Busy { why } if !last_delivery => Decision::Retry {
            delay: retry_delay(delivered),
            why,
        },
        JobOutcome::Aborted { why } | JobOutcome::Fault { why } | JobOutcome::Busy { why } => {
            let error = format!("gave up after {delivered} of {max_deliver} deliveries; the last one ended with: {why}");
            Decision::Publish {
                // The job itself may be fine: this host (or the hosts it met) could not run it.
                result: Box::new(
                    ResultMessage {
                        attempt: Some(delivered),
                        ..ResultMessage::error(id, error.clone())
                    }
                    .because(Reason::Host),
                ),
                ack: Ack::Term,
                dead_letter: Some(error),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(status: Status) -> ResultMessage {
        ResultMessage {
            status,
            ..ResultMessage::error("j", "x")
        }
    }

    #[test]
    fn final_statuses_ack_except_error() {
        for status in [
            Status::Success,
            Status::Failed,
            Status::Timeout,
            Status::Cancelled,
        ] {
            let d = decide(
                "j",
                JobOutcome::Final(Box::new(result(status))),
                1,
                5,
                false,
            );
            assert!(
                matches!(
                    d,
                    Decision::Publish {
                        ack: Ack::Ack,
                        dead_letter: None,
                        ..
                    }
                ),
                "{status}"
            );
        }
        let d = decide(
            "j",
            JobOutcome::Final(Box::new(result(Status::Error))),
            1,
            5,
            false,
        );
        assert!(matches!(d, Decision::Publish { ack: Ack::Term, .. }));
        // A job that finished is published even if its lease was lost meanwhile.
        let d = decide(
            "j",
            JobOutcome::Final(Box::new(result(Status::Success))),
            1,
            5,
            true,
        );
        assert!(matches!(d, Decision::Publish { ack: Ack::Ack, .. }));
    }

    #[test]
    fn faults_retry_with_growing_delay_then_give_up() {
        let delays: Vec<_> = (1..5)
            .map(
                |n| match decide("j", JobOutcome::fault("disk"), n, 5, false) {
                    Decision::Retry { delay, .. } => delay,
                    other => panic!("{other:?}"),
                },
            )
            .collect();
        assert_eq!(delays, [1, 2, 4, 8].map(Duration::from_secs));
        match decide("j", JobOutcome::fault("disk"), 5, 5, false) {
            Decision::Publish {
                result,
                ack,
                dead_letter,
            } => {
                assert_eq!(result.status, Status::Error);
                assert_eq!(result.reason, Some(Reason::Host));
                assert_eq!(ack, Ack::Term);
                assert!(result.error.unwrap().contains("disk"));
                assert!(dead_letter.is_some());
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(retry_delay(40), MAX_RETRY);
    }

    #[test]
    fn a_busy_id_waits_then_becomes_a_dead_letter() {
        assert!(matches!(
            decide("j", JobOutcome::busy("running on h2"), 1, 5, false),
            Decision::Retry { delay, .. } if delay == FIRST_RETRY
        ));
        match decide("j", JobOutcome::busy("running on h2"), 5, 5, false) {
            Decision::Publish {
                result,
                ack: Ack::Term,
                dead_letter: Some(reason),
            } => {
                assert_eq!(result.status, Status::Error);
                assert!(reason.contains("running on h2"), "{reason}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn aborts_retry_at_once_unless_out_of_deliveries_or_lease() {
        assert_eq!(
            decide("j", JobOutcome::aborted("drain"), 1, 5, false),
            Decision::Retry {
                delay: Duration::ZERO,
                why: "drain".into()
            }
        );
        assert!(matches!(
            decide("j", JobOutcome::aborted("drain"), 5, 5, false),
            Decision::Publish { ack: Ack::Term, .. }
        ));
        assert!(matches!(
            decide("j", JobOutcome::aborted("lease"), 1, 5, true),
            Decision::Leave { .. }
        ));
        assert!(matches!(
            decide("j", JobOutcome::fault("x"), 4, 5, true),
            Decision::Leave { .. }
        ));
        // Out of deliveries, nothing else will run it: it must end with a final error.
        assert!(matches!(
            decide("j", JobOutcome::aborted("lease"), 5, 5, true),
            Decision::Publish { ack: Ack::Term, .. }
        ));
    }
}
