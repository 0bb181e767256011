//! Log output: readable text or JSON lines on stderr, with every control character that a
//! value may carry escaped.
//!
//! Job ids are checked, but step names, file names, commands and the runner's stderr come from
//! jobs: a file named `x\nINFO job finished` would otherwise write a fake line into the text
//! log (JSON output escapes by itself). [`EscapedFields`] formats fields as tracing's default
//! does, then escapes line breaks and other control characters in everything it wrote.

use std::fmt;

use std::io::IsTerminal;

use tracing_subscriber::field::RecordFields;
use tracing_subscriber::fmt::format::{DefaultFields, Writer};
use tracing_subscriber::fmt::FormatFields;

use crate::config::LogFormat;

/// The names in the `event` field of the supervisor's key log lines. A name, once given, stays;
/// the message beside it may be reworded.
pub mod event {
    // The supervisor's own life.
    /// Starting, with the effective settings.
    pub const SUPERVISOR_STARTING: &str = "supervisor_starting";
    /// Connected, the stream and consumer set up: pulling jobs.
    pub const SUPERVISOR_READY: &str = "supervisor_ready";
    /// The connection to NATS is up (again).
    pub const NATS_CONNECTED: &str = "nats_connected";
    /// The connection to NATS is lost; reconnecting.
    pub const NATS_DISCONNECTED: &str = "nats_disconnected";
    /// A first SIGTERM or SIGINT: no new jobs.
    pub const DRAIN_REQUESTED: &str = "drain_requested";
    /// A second one: running jobs are stopped at once.
    pub const STOP_NOW_REQUESTED: &str = "stop_now_requested";
    /// Waiting (up to the drain timeout) for the running jobs.
    pub const DRAIN_STARTED: &str = "drain_started";
    /// The drain timeout passed: the jobs still running are stopped and handed back.
    pub const DRAIN_TIMEOUT: &str = "drain_timeout";
    /// The supervisor is done.
    pub const SUPERVISOR_STOPPED: &str = "supervisor_stopped";

    /// `--run-as` gives one identity to several slots: jobs can reach each other.
    pub const SHARED_IDENTITY: &str = "shared_identity";
    /// A NATS password, token or URL with credentials was given on the command line (field
    /// `secret`: `password`, `token` or `url`).
    pub const SECRET_ON_COMMAND_LINE: &str = "secret_on_command_line";
    /// The jobs folder was probed: what it allows and what the worker guarantees on it.
    pub const JOBS_DIR_PROBED: &str = "jobs_dir_probed";
    /// The jobs folder was probed and refused: data would be lost, or steps could reach it.
    pub const JOBS_DIR_REFUSED: &str = "jobs_dir_refused";

    // One job.
    /// The job runs here (its delivery is registered and its id locked).
    pub const JOB_STARTED: &str = "job_started";
    /// The runner process has started.
    pub const RUNNER_STARTED: &str = "runner_started";
    /// The job's copy is in its workspace.
    pub const JOB_STAGED: &str = "job_staged";
    /// A step has started.
    pub const STEP_STARTED: &str = "step_started";
    /// A step has ended.
    pub const STEP_FINISHED: &str = "step_finished";
    /// The job's new and changed files are in `results/`.
    pub const ARTIFACTS_SYNCED: &str = "artifacts_synced";
    /// The job has a final status (published next).
    pub const JOB_FINISHED: &str = "job_finished";
    /// A request that is not a valid job was rejected.
    pub const JOB_REJECTED: &str = "job_rejected";
    /// An earlier attempt had finished this delivery; its result was republished.
    pub const RESULT_REPUBLISHED: &str = "result_republished";
    /// The job was handed back at once for redelivery (a drain, a stop).
    pub const JOB_HANDED_BACK: &str = "job_handed_back";
    /// The job could not run here; it is retried after a delay.
    pub const JOB_RETRY_LATER: &str = "job_retry_later";
    /// The job is left to its redelivery (its lease was lost).
    pub const JOB_LEFT: &str = "job_left";
    /// No progress ack was confirmed within the ack wait: the job is stopped.
    pub const LEASE_LOST: &str = "lease_lost";
    /// The job's lock was taken by another host: the job is stopped.
    pub const LOCK_LOST: &str = "lock_lost";
    /// The request was republished on the dead-letter subject.
    pub const DEAD_LETTERED: &str = "dead_lettered";
    /// The result could not be published before shutdown.
    pub const RESULT_UNPUBLISHED: &str = "result_unpublished";
    /// The manifest could not be flushed to the drive before the ack.
    pub const MANIFEST_NOT_FLUSHED: &str = "manifest_not_flushed";
    /// Another delivery of the job's id is running (here or on another host): retried later.
    pub const JOB_BUSY: &str = "job_busy";
    /// The final ack or term was not confirmed.
    pub const ACK_UNCONFIRMED: &str = "ack_unconfirmed";
    /// The workspaces drive has no room for the job: handed back for another host.
    pub const NO_ROOM: &str = "no_room";
    /// The job's processes together passed its memory limit: the job is being ended.
    pub const MEMORY_EXCEEDED: &str = "memory_exceeded";
    /// The runner did not end the job cleanly: every process it left was killed.
    pub const LEFTOVERS_KILLED: &str = "leftovers_killed";
}

/// tracing's default field formatting, with control characters escaped.
#[derive(Debug, Default)]
pub struct EscapedFields(DefaultFields);

impl<'writer> FormatFields<'writer> for EscapedFields {
    fn format_fields<R: RecordFields>(
        &self,
        mut writer: Writer<'writer>,
        fields: R,
    ) -> fmt::Result {
        let mut escaping = Escaping(&mut writer);
        self.0.format_fields(Writer::new(&mut escaping), fields)
    }
}

/// Writes through, escaping control characters: `\n` as `\n`, others as `\u{..}`.
struct Escaping<'a, W: fmt::Write>(&'a mut W);

impl<W: fmt::Write> fmt::Write for Escaping<'_, W> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        for piece in s.split_inclusive(char::is_control) {
            let mut chars = piece.chars();
            match chars.next_back() {
                Some(c) if c.is_control() => {
                    self.0.write_str(chars.as_str())?;
                    match c {
                        '\n' => self.0.write_str("\\n")?,
                        '\r' => self.0.write_str("\\r")?,
                        '\t' => self.0.write_str("\\t")?,
                        c => write!(self.0, "\\u{{{:x}}}", u32::from(c))?,
                    }
                }
                _ => self.0.write_str(piece)?,
            }
        }
        Ok(())
    }
}

/// Sets up logging to stderr in `format`; `RUST_LOG` filters (info by default, the NATS client
/// at warn).
pub fn init(format: LogFormat) {
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
    // Under systemd, stderr goes to the journal, which stamps every line itself.
    let journal = std::env::var_os("JOURNAL_STREAM").is_some();
    match format {
        LogFormat::Text if journal => tracing_subscriber::registry()
            .with(
                layer
                    .fmt_fields(EscapedFields::default())
                    .without_time()
                    .with_ansi(false),
            )
            .with(filter)
            .init(),
        LogFormat::Text => tracing_subscriber::registry()
            .with(
                layer
                    .fmt_fields(EscapedFields::default())
                    .with_ansi(std::io::stderr().is_terminal()),
            )
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;

    #[test]
    fn control_characters_are_escaped() {
        let mut out = String::new();
        write!(Escaping(&mut out), "a\nb\rc\u{1b}[31md\u{7}é").unwrap();
        assert_eq!(out, "a\\nb\\rc\\u{1b}[31md\\u{7}é");
    }
}
