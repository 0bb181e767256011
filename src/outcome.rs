//! How a job ended (contract §6): one type from the runner that decides it, through the pipe
//! that carries it (contract §13), to the supervisor that settles its message.
//!
//! A job ends in one of four ways. Only [`JobOutcome::Final`] is an answer to the controller;
//! the other three write nothing final and leave the job to run again, until its deliveries run
//! out. What each means for the message (ack, term, nak with which delay, or nothing) is decided
//! in one place, the supervisor's `settle::decide`.

use serde::{Deserialize, Serialize};

use crate::manifest::{Reason, ResultMessage, Status};

/// How a job ended.
///
/// On the pipe it is the runner's last event, tagged `"outcome"` inside the event's `"type":
/// "ended"`: `{"type":"ended","outcome":"final","id":"…","status":"success",…}`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "outcome", rename_all = "snake_case")]
pub enum JobOutcome {
    /// A final status, as the result message to publish; its `manifest_file` is set when
    /// `results/result.json` is on disk.
    Final(Box<ResultMessage>),
    /// Stopped on purpose before it finished (a drain, a lost lease): nothing final was
    /// written, and the job runs again at once.
    Aborted { why: String },
    /// A fault of the host (disk, permissions, the shared drive), not of the job: nothing
    /// final was written, and the job is tried again after a growing delay.
    Fault { why: String },
    /// Another delivery of the same id is running, here or on another host: tried again
    /// later. Only the supervisor ends a job this way.
    Busy { why: String },
}

impl JobOutcome {
    #[must_use]
    pub fn final_result(result: ResultMessage) -> Self {
        Self::Final(Box::new(result))
    }

    #[must_use]
    pub fn aborted(why: impl Into<String>) -> Self {
        Self::Aborted { why: why.into() }
    }

    #[must_use]
    pub fn fault(why: impl Into<String>) -> Self {
        Self::Fault { why: why.into() }
    }

    #[must_use]
    pub fn busy(why: impl Into<String>) -> Self {
        Self::Busy { why: why.into() }
    }

    /// Whether the job ended in success.
    #[must_use]
    pub fn is_success(&self) -> bool {
        matches!(self, Self::Final(result) if result.status == Status::Success)
    }

    /// The final result, if the job has one.
    #[must_use]
    pub fn result(&self) -> Option<&ResultMessage> {
        match self {
            Self::Final(result) => Some(result),
            _ => None,
        }
    }

    /// The result to show where nothing will try job `id` again (`nats-fs-runner --job`,
    /// `--dry-run`): the final one, or an `error` saying why there is none — reason
    /// `cancelled` for a stop, `host` for a fault.
    #[must_use]
    pub fn into_result(self, id: &str) -> ResultMessage {
        match self {
            Self::Final(result) => *result,
            Self::Aborted { why } => ResultMessage::error(id, why).because(Reason::Cancelled),
            Self::Fault { why } | Self::Busy { why } => {
                ResultMessage::error(id, why).because(Reason::Host)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_final_success_is_success() {
        let ok = ResultMessage {
            status: Status::Success,
            ..ResultMessage::error("j", "x")
        };
        assert!(JobOutcome::final_result(ok).is_success());
        assert!(!JobOutcome::final_result(ResultMessage::error("j", "x")).is_success());
        assert!(!JobOutcome::fault("disk").is_success());
    }

    #[test]
    fn without_retries_every_outcome_is_a_result() {
        let r = JobOutcome::aborted("stopped").into_result("j");
        assert_eq!(
            (r.status, r.reason, r.error.as_deref()),
            (Status::Error, Some(Reason::Cancelled), Some("stopped"))
        );
        let r = JobOutcome::busy("running on h2").into_result("j");
        assert_eq!((r.status, r.reason), (Status::Error, Some(Reason::Host)));
    }
}
