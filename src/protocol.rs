//! The pipe between `nats-fs-supervisor` and the `nats-fs-runner` it spawns for one job.
//!
//! JSON lines in both directions. The supervisor writes one [`ToRunner::Start`] and, later, at
//! most a [`ToRunner::Cancel`]; closing the runner's stdin means "the supervisor is gone: stop
//! now". The runner answers with [`FromRunner`] events and ends with exactly one
//! [`FromRunner::Ended`], which carries the job's [`JobOutcome`]. Step output never crosses
//! the pipe: it goes to `results/step_N.log`.
//!
//! Both enums are internally tagged (`"type": "…"`) and carry an `Unknown` fallback, so a
//! supervisor and a runner of neighbouring versions ignore the messages they do not know
//! instead of failing. [`JobOutcome`] has none: an `ended` line whose outcome is unknown is
//! unreadable, and the job ends as a fault of the host when the runner exits. The
//! [`PROTOCOL_VERSION`] changes only when a message changes meaning.

use std::collections::BTreeMap;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::job::{JobId, Step};
use crate::limits::Limits;
use crate::manifest::{Reason, StepStatus};
use crate::outcome::JobOutcome;
use crate::share::FsIds;

/// Bumped when a message changes meaning; the runner refuses a start of another version.
pub const PROTOCOL_VERSION: u32 = 4;

/// Supervisor → runner.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum ToRunner {
    /// Run this job. Sent once, first.
    Start(Box<StartJob>),
    /// Stop the job (TERM to the step's group, the kill grace, then KILL).
    Cancel {
        /// Final (`cancelled`, manifest written) or not (the job will be redelivered).
        mode: CancelMode,
    },
    /// The job passed a limit that the supervisor watches (`memory`): kill its processes at
    /// once and end it `failed` with this reason and error, artifacts synced and manifest
    /// written. A runner that does not know this message ignores it, and the supervisor ends
    /// the job itself when the runner has not ended it in time.
    Exceeded { reason: Reason, error: String },
    /// A message from a newer supervisor; ignored.
    #[serde(other)]
    Unknown,
}

/// Why a job is being stopped, which decides what it leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum CancelMode {
    /// A cancel request: the job ends `cancelled`, artifacts are synced, the manifest written.
    Cancel,
    /// Drain deadline or lost lease: stop and write nothing final, so the job can run again.
    Abort,
    /// As `Abort`, but without the grace period (a second shutdown signal).
    AbortNow,
}

/// Everything a runner needs to run one job. Built by the supervisor, or by the runner itself
/// in standalone mode (`--job`), so both modes run the same code.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StartJob {
    /// Must equal [`PROTOCOL_VERSION`].
    pub version: u32,
    pub id: JobId,
    /// The delivery count (1 on the first attempt).
    pub attempt: u64,
    /// The stream sequence of the job message, recorded in the manifest.
    pub stream_sequence: Option<u64>,
    /// `{jobs_dir}/{id}`: the job folder, on the shared drive. The runner opens it (without
    /// following a symlink, as the share user) once, and works through that descriptor.
    pub job_dir: PathBuf,
    /// Whose rights the runner uses on the jobs folder (`--share-user`): it stages the folder,
    /// writes the logs, artifacts and manifest with them. Absent: the runner's own.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<FsIds>,
    /// Who the steps run as: the slot's identity, which the runner (root) gives each step's
    /// shell just before `exec`, and whose rights it uses in the job's private folders.
    /// Absent: the steps run as the runner.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub identity: Option<StepIdentity>,
    /// The runner's uid belongs to this job alone: before its final event the runner kills
    /// every other process of its uid (`kill(-1, SIGKILL)`), whatever its steps left behind.
    #[serde(default)]
    pub kill_uid_at_end: bool,
    /// An empty, private folder owned by the job's identity, to stage into.
    pub workspace: PathBuf,
    /// A private folder owned by the job's identity, the steps' `JOB_RESULTS_DIR`: what they
    /// put there is copied to `results/` at the end, whether or not a step changed it. Absent
    /// in standalone runs (the runner makes one beside the workspace).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub outputs_dir: Option<PathBuf>,
    /// A private folder for temporary files, the steps' `TMPDIR` (the host's `/tmp` is shared
    /// by every job). Absent in standalone runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tmp_dir: Option<PathBuf>,
    /// Steps from the request, replacing those of `job.json`.
    pub steps: Option<Vec<Step>>,
    /// The job timeout when `job.json` sets none, in milliseconds.
    pub default_timeout_ms: u64,
    /// SIGTERM → SIGKILL grace, in milliseconds.
    pub kill_grace_ms: u64,
    /// `PATH` and `LANG` for the steps.
    pub base_env: BTreeMap<String, String>,
    /// Variables the operator passes through (`--pass-env`), applied last.
    pub pass_env: BTreeMap<String, String>,
    /// The operator's limits: ceilings, and defaults for a job that asks for nothing. The
    /// supervisor has already made them the runner's own hard rlimits; the runner applies the
    /// job's lower values to the steps.
    #[serde(default)]
    pub ceilings: Limits,
    /// The longest timeout a job may set (`--max-timeout`), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_timeout_ms: Option<u64>,
    /// The idle timeout of a step whose job sets none (`--idle-timeout`), in milliseconds.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_timeout_ms: Option<u64>,
    /// The worker id, for the manifest.
    pub worker: Option<String>,
    /// How many file system calls on the jobs folder may be in flight at once while staging
    /// and syncing (`--share-parallelism`).
    #[serde(default = "default_share_parallelism")]
    pub share_parallelism: usize,
    /// Push a growing log out to the drive (`fdatasync`) at most this often, in milliseconds:
    /// on a drive that holds writes back (NFS), other hosts see a log only once it is pushed.
    /// Absent: never while the step runs (local disks, FUSE, SMB).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub push_logs_every_ms: Option<u64>,
    /// Bytes to keep free on the workspaces drive besides the job's copy (`--min-free-space`):
    /// a job whose folder does not fit is handed back before it is staged.
    #[serde(default)]
    pub min_free_space: u64,
}

/// The default of [`StartJob::share_parallelism`]: enough requests in flight to hide a network
/// round trip behind the others, few enough not to swamp a file server.
pub const DEFAULT_SHARE_PARALLELISM: usize = 16;

fn default_share_parallelism() -> usize {
    DEFAULT_SHARE_PARALLELISM
}

/// The identity a job's steps run as.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepIdentity {
    /// For messages: `nats-fs-1 (uid 990)`.
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    /// Supplementary groups.
    pub groups: Vec<u32>,
}

/// Runner → supervisor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum FromRunner {
    /// `job.json` is read: the job's timeout and its steps. Sent before anything of the job
    /// runs, so the supervisor can enforce the timeout itself whatever later happens to the
    /// runner, and can account for every step if it has to end the job on the runner's behalf.
    Loaded {
        timeout_ms: u64,
        steps: Vec<StepInfo>,
        /// The limits the job runs under: its own within the ceilings. The supervisor watches
        /// `memory` (never above its own ceiling, whatever this says).
        #[serde(default)]
        limits: Limits,
    },
    /// The job folder's copy does not fit on the workspaces drive with `min_free_space` to
    /// spare: the runner hands the job back (its `ended` outcome is a fault) for a host with
    /// room. Sent just before `ended`.
    NoRoom {
        free_bytes: u64,
        needed_bytes: u64,
        reserve_bytes: u64,
    },
    /// The job folder is copied into the workspace.
    Staged {
        files: u64,
        bytes: u64,
        duration_ms: u64,
    },
    /// A step's shell was started.
    StepStarted {
        index: usize,
        name: Option<String>,
        pid: u32,
    },
    /// A step ended and every process it started is gone.
    StepFinished {
        index: usize,
        status: StepStatus,
        exit_code: Option<i32>,
        signal: Option<String>,
        duration_ms: u64,
    },
    /// New and modified files are copied to `results/`.
    Synced {
        files: u64,
        bytes: u64,
        duration_ms: u64,
    },
    /// Something the operator should know that does not fail the job.
    Warning { message: String },
    /// The last event: how the job ended. A final result names `results/result.json` in
    /// `manifest_file` when it is on disk.
    Ended(JobOutcome),
    /// An event from a newer runner; ignored.
    #[serde(other)]
    Unknown,
}

/// A step as [`FromRunner::Loaded`] lists it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StepInfo {
    pub name: Option<String>,
    pub command: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn unknown_messages_are_tolerated() {
        let msg: ToRunner = serde_json::from_str(r#"{"type":"resize","rows":3}"#).unwrap();
        assert_eq!(msg, ToRunner::Unknown);
        let ev: FromRunner = serde_json::from_str(r#"{"type":"progress","pct":50}"#).unwrap();
        assert_eq!(ev, FromRunner::Unknown);
    }

    #[test]
    fn messages_are_tagged_snake_case() {
        let line = serde_json::to_string(&ToRunner::Cancel {
            mode: CancelMode::AbortNow,
        })
        .unwrap();
        assert_eq!(line, r#"{"type":"cancel","mode":"abort_now"}"#);
        let line = serde_json::to_string(&FromRunner::Ended(JobOutcome::fault("x"))).unwrap();
        assert_eq!(line, r#"{"type":"ended","outcome":"fault","why":"x"}"#);
    }

    #[test]
    fn the_last_event_carries_the_outcome() {
        let result = crate::ResultMessage {
            manifest_file: Some(crate::manifest::MANIFEST_PATH.to_owned()),
            duration_ms: Some(12),
            ..crate::ResultMessage::error("j", "step 0 exited with code 3").because(Reason::Exit)
        };
        let ended = FromRunner::Ended(JobOutcome::final_result(result));
        let line = serde_json::to_string(&ended).unwrap();
        assert!(
            line.starts_with(r#"{"type":"ended","outcome":"final","id":"j","status":"error","#),
            "{line}"
        );
        let back: FromRunner = serde_json::from_str(&line).unwrap();
        assert_eq!(back, ended);
        for outcome in [
            JobOutcome::aborted("drain"),
            JobOutcome::fault("disk"),
            JobOutcome::busy("h2"),
        ] {
            let line = serde_json::to_string(&FromRunner::Ended(outcome.clone())).unwrap();
            assert_eq!(
                serde_json::from_str::<FromRunner>(&line).unwrap(),
                FromRunner::Ended(outcome)
            );
        }
    }

    #[test]
    fn start_round_trips() {
        let start = ToRunner::Start(Box::new(StartJob {
            version: PROTOCOL_VERSION,
            id: JobId::parse("a.b").unwrap(),
            attempt: 2,
            stream_sequence: Some(9),
            job_dir: "/jobs/a.b".into(),
            share: Some(FsIds {
                uid: 1000,
                gid: 1000,
            }),
            identity: Some(StepIdentity {
                name: "ci1".into(),
                uid: 990,
                gid: 990,
                groups: vec![990, 4],
            }),
            kill_uid_at_end: true,
            workspace: "/ws/a.b-9".into(),
            outputs_dir: Some("/ws/a.b-9.results".into()),
            tmp_dir: None,
            steps: Some(vec![Step::shell("true")]),
            default_timeout_ms: 1000,
            kill_grace_ms: 10,
            base_env: BTreeMap::from([("PATH".into(), "/bin".into())]),
            pass_env: BTreeMap::new(),
            worker: Some("w".into()),
            ceilings: Limits {
                memory: Some(1 << 30),
                ..Limits::default()
            },
            max_timeout_ms: Some(60_000),
            idle_timeout_ms: None,
            share_parallelism: 4,
            push_logs_every_ms: Some(20),
            min_free_space: 1 << 30,
        }));
        let line = serde_json::to_string(&start).unwrap();
        assert!(
            line.starts_with(r#"{"type":"start","version":4,"#),
            "{line}"
        );
        let back: ToRunner = serde_json::from_str(&line).unwrap();
        assert_eq!(back, start);
    }

    #[test]
    fn start_rejects_a_hostile_id() {
        let line = r#"{"type":"start","version":4,"id":"../x","attempt":1,"stream_sequence":null,
            "job_dir":"/j","workspace":"/w","steps":null,"default_timeout_ms":1,"kill_grace_ms":1,
            "base_env":{},"pass_env":{},"worker":null}"#;
        assert!(serde_json::from_str::<ToRunner>(line).is_err());
    }
}
