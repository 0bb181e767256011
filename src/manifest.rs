//! What a finished job leaves behind: `results/result.json` ([`Manifest`], contract §5) and the
//! result message published on `{output_subject}.{id}` ([`ResultMessage`], contract §6).
//!
//! The runner writes the manifest; the supervisor reads it back to recognise a redelivery of a
//! job whose previous attempt already finished (the ack was lost), and tests read it to check
//! the contract. Field names are camelCase, as in the original worker.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

use crate::limits::Limits;

/// The folder, inside a job folder, that receives logs, artifacts and the manifest.
pub const RESULTS_DIR: &str = "results";
/// The manifest's file name inside `results/`.
pub const MANIFEST_FILE: &str = "result.json";
/// The manifest's path relative to the job folder, as the result message names it.
pub const MANIFEST_PATH: &str = "results/result.json";
/// A manifest larger than this is not ours; reading it is refused.
const MAX_MANIFEST_BYTES: u64 = 16 << 20;

/// How a job ended (contract §6).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// Every step exited 0.
    Success,
    /// A step exited non-zero or died by a signal.
    Failed,
    /// A job or step timeout fired.
    Timeout,
    /// A cancel request stopped the job.
    Cancelled,
    /// The job cannot run as given (bad folder, `job.json` or steps), or gave up after its
    /// last delivery.
    Error,
}

impl Status {
    /// The conventional exit code of a status; `failed` carries its step's code instead.
    #[must_use]
    pub fn exit_code(self, failed_step_code: i32) -> i32 {
        match self {
            Self::Success => 0,
            Self::Failed => failed_step_code,
            Self::Timeout => 124,
            Self::Cancelled => 130,
            Self::Error => 1,
        }
    }

    /// The status as written in JSON.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Error => "error",
        }
    }
}

impl std::fmt::Display for Status {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Why a job that did not succeed ended, for machines (`reason` in `result.json` and the
/// result message); `error` says the same for people.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum Reason {
    /// A step exited with a non-zero code.
    Exit,
    /// A step was killed by a signal no limit of ours sent.
    Signal,
    /// The job's or a step's `timeout`.
    Timeout,
    /// A step printed nothing for its `idleTimeout`.
    Idle,
    /// A cancel request.
    Cancelled,
    /// The job's processes together passed `limits.memory`.
    Memory,
    /// The job wrote more than `limits.output` into `results/`, or filled the drive doing so.
    Output,
    /// A step failed while the job had as many processes as `limits.processes` allows.
    Processes,
    /// A process passed `limits.cpuTime` (SIGXCPU).
    CpuTime,
    /// A process passed `limits.fileSize` (SIGXFSZ).
    FileSize,
    /// The job cannot run as given: its folder, `job.json` or steps.
    Invalid,
    /// The host could not run it (its last delivery ended in a fault of the host).
    Host,
    /// A reason from a newer version.
    #[serde(other)]
    Other,
}

impl Reason {
    /// The reason as written in JSON.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Exit => "exit",
            Self::Signal => "signal",
            Self::Timeout => "timeout",
            Self::Idle => "idle",
            Self::Cancelled => "cancelled",
            Self::Memory => "memory",
            Self::Output => "output",
            Self::Processes => "processes",
            Self::CpuTime => "cpuTime",
            Self::FileSize => "fileSize",
            Self::Invalid => "invalid",
            Self::Host => "host",
            Self::Other => "other",
        }
    }
}

impl std::fmt::Display for Reason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What a step (or, summed, a job) used, from `getrusage` of its reaped processes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    /// CPU time in user mode, of every process that ended.
    pub cpu_user_ms: u64,
    /// CPU time in the kernel on their behalf.
    pub cpu_system_ms: u64,
    /// The peak resident memory of the largest single process, in bytes.
    pub peak_rss_bytes: u64,
    /// How many processes the step started (its shell included), as far as the runner saw
    /// them: see the README's "Limits and accounting".
    pub processes: u64,
}

impl Resources {
    /// The job's total: CPU and processes summed, the peak the largest.
    #[must_use]
    pub fn total<'a>(steps: impl IntoIterator<Item = &'a Resources>) -> Resources {
        steps
            .into_iter()
            .fold(Resources::default(), |sum, step| Resources {
                cpu_user_ms: sum.cpu_user_ms + step.cpu_user_ms,
                cpu_system_ms: sum.cpu_system_ms + step.cpu_system_ms,
                peak_rss_bytes: sum.peak_rss_bytes.max(step.peak_rss_bytes),
                processes: sum.processes + step.processes,
            })
    }
}

/// How one step ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum StepStatus {
    Success,
    Failed,
    Timeout,
    Cancelled,
    /// Not run, because an earlier step did not succeed.
    Skipped,
}

impl StepStatus {
    /// The status as written in JSON.
    #[must_use]
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Success => "success",
            Self::Failed => "failed",
            Self::Timeout => "timeout",
            Self::Cancelled => "cancelled",
            Self::Skipped => "skipped",
        }
    }
}

impl std::fmt::Display for StepStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `results/result.json`: a superset of the original worker's manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Manifest {
    pub job_id: String,
    pub status: Status,
    pub exit_code: i32,
    /// The delivery count of the job message (1 for the first attempt).
    pub attempt: u64,
    /// The worker id (durable consumer name) of the supervisor, if any.
    pub worker: Option<String>,
    pub host: String,
    pub timing: Timing,
    pub steps: Vec<StepRecord>,
    pub artifacts: Vec<Artifact>,
    pub error: Option<String>,
    /// Why the job did not succeed, for machines; absent on success.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    /// The limits the job ran under (its own, within the operator's ceilings).
    #[serde(default, skip_serializing_if = "Limits::is_empty")]
    pub limits: Limits,
    /// What the steps used together; absent when no step ran.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
    /// The JetStream stream sequence of the job message this run answered; lets a redelivery
    /// recognise that this attempt already finished. Absent for standalone runs.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stream_sequence: Option<u64>,
    /// Things the operator should know that did not fail the job (skipped special files, …).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub warnings: Vec<String>,
}

/// Wall-clock times of a run; `stageMs` and `syncMs` split out the file copying.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Timing {
    /// RFC 3339, UTC, milliseconds.
    pub start: String,
    pub end: String,
    pub duration_ms: u64,
    #[serde(default)]
    pub stage_ms: u64,
    #[serde(default)]
    pub sync_ms: u64,
}

/// One step as run (or skipped).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct StepRecord {
    pub index: usize,
    pub name: Option<String>,
    pub command: String,
    pub status: StepStatus,
    /// The shell's exit code, or 128+n when it died by signal n; null when skipped.
    pub exit_code: Option<i32>,
    /// The signal that ended the step's shell, such as `"SIGKILL"`.
    pub signal: Option<String>,
    pub duration_ms: u64,
    /// The log's file name inside `results/`; null when skipped.
    pub log: Option<String>,
    /// What the step used; absent when it did not run (or its runner could not tell).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resources: Option<Resources>,
}

/// A file (or symlink) the steps created or modified, copied to `results/<path>`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Artifact {
    /// Relative to the workspace and to `results/`.
    pub path: String,
    pub size: u64,
    /// Hex SHA-256 of the contents; null for symlinks.
    pub sha256: Option<String>,
    /// For a symlink: its target, verbatim (never followed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub link: Option<String>,
}

impl Manifest {
    /// Writes the manifest to `results_dir/result.json` atomically: a temp file in the same
    /// folder, then a rename, so readers see the old file or the whole new one, never a part.
    /// Whatever a step may have left at either name (a FIFO, a link, a folder) is removed
    /// first, never opened or written through.
    ///
    /// Not flushed to the drive here: this is the runner's write, on every job's dispatch
    /// path, where a flush costs milliseconds. The supervisor flushes it with
    /// [`Manifest::flush`] after publishing the result and before acking (contract §6.5), off
    /// that path; until then, a crash of the host may leave the file empty or missing, and
    /// the job, not acked, runs again.
    pub fn write_atomic(&self, results_dir: &Path) -> io::Result<PathBuf> {
        self.write_with(results_dir, |_| Ok(()))
    }

    /// [`Manifest::write_atomic`], with `prepare` called on the written temp file before the
    /// rename (to give it an owner, say: the manifest then never appears under its name
    /// without it).
    pub fn write_with(
        &self,
        results_dir: &Path,
        prepare: impl FnOnce(&File) -> io::Result<()>,
    ) -> io::Result<PathBuf> {
        let target = results_dir.join(MANIFEST_FILE);
        let tmp = results_dir.join(Self::temp_name());
        let mut bytes = serde_json::to_vec_pretty(self).map_err(io::Error::other)?;
        bytes.push(b'\n');
        crate::tree::remove_entry(&tmp)?;
        let written = (|| {
            let mut file = OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o644)
                .custom_flags(nix::libc::O_NOFOLLOW)
                .open(&tmp)?;
            file.write_all(&bytes)?;
            prepare(&file)?;
            if fs::symlink_metadata(&target).is_ok_and(|m| m.is_dir()) {
                crate::tree::remove_entry(&target)?;
            }
            fs::rename(&tmp, &target)
        })();
        if written.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        written.map(|()| target)
    }

    /// The name this process writes a manifest under before renaming it to `result.json`.
    #[must_use]
    pub fn temp_name() -> String {
        format!(".{MANIFEST_FILE}.{}.tmp", std::process::id())
    }

    /// Flushes `results_dir/result.json`, written by [`Manifest::write_atomic`], to the drive:
    /// the file, then the folder that holds its name. Once this returns the manifest survives
    /// a crash of the host. A missing manifest, or anything but a regular file at its name,
    /// is an error: the caller flushes a manifest it was told is there.
    pub fn flush(results_dir: &Path) -> io::Result<()> {
        let path = results_dir.join(MANIFEST_FILE);
        let file = open_manifest(&path)?;
        if !file.metadata()?.is_file() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a manifest file", path.display()),
            ));
        }
        file.sync_all()?;
        sync_dir(results_dir)
    }

    /// Reads `results_dir/result.json` without following a symlink and refusing anything
    /// larger than a manifest can be. `Ok(None)` when there is no manifest.
    pub fn read(results_dir: &Path) -> io::Result<Option<Self>> {
        let path = results_dir.join(MANIFEST_FILE);
        let file = match open_manifest(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(e),
        };
        Self::read_file(file, &path).map(Some)
    }

    /// Reads a manifest from an open file (`path` is for messages), refusing anything that is
    /// not a regular file or is larger than a manifest can be.
    pub fn read_file(file: File, path: &Path) -> io::Result<Self> {
        let meta = file.metadata()?;
        if !meta.is_file() || meta.len() > MAX_MANIFEST_BYTES {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                format!("{} is not a manifest file", path.display()),
            ));
        }
        let mut bytes = Vec::new();
        File::take(file, MAX_MANIFEST_BYTES).read_to_end(&mut bytes)?;
        serde_json::from_slice(&bytes).map_err(|e| io::Error::new(io::ErrorKind::InvalidData, e))
    }
}

/// Opens a manifest for reading without following a link or blocking on a FIFO planted at
/// its name.
fn open_manifest(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)
}

/// Flushes a folder's entries (a rename into it) to the drive. `results_dir` may be a
/// `/proc/self/fd/N` path, so the last component is followed; nothing is written through it.
/// A file system that cannot flush a folder (`EINVAL`) has nothing more to offer: not an error.
fn sync_dir(dir: &Path) -> io::Result<()> {
    let folder = OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_DIRECTORY | nix::libc::O_CLOEXEC)
        .open(dir)?;
    match folder.sync_all() {
        Err(e) if e.raw_os_error() == Some(nix::libc::EINVAL) => Ok(()),
        other => other,
    }
}

/// The name of step `index`'s log in `results/` (contract §4.3).
#[must_use]
pub fn step_log(index: usize) -> String {
    format!("step_{index}.log")
}

/// The message published on `{output_subject}.{id}` when a job ends (contract §6).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ResultMessage {
    pub id: String,
    pub status: Status,
    pub exit_code: i32,
    /// `results/result.json` (relative to the job folder), or null when none was written.
    pub manifest_file: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub attempt: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Why the job did not succeed, for machines (see [`Reason`]).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<Reason>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ms: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub worker: Option<String>,
}

impl ResultMessage {
    /// The message for a job that ended with `manifest` on disk.
    #[must_use]
    pub fn from_manifest(manifest: &Manifest) -> Self {
        Self {
            id: manifest.job_id.clone(),
            status: manifest.status,
            exit_code: manifest.exit_code,
            manifest_file: Some(MANIFEST_PATH.to_owned()),
            attempt: Some(manifest.attempt),
            error: manifest.error.clone(),
            reason: manifest.reason,
            duration_ms: Some(manifest.timing.duration_ms),
            worker: manifest.worker.clone(),
        }
    }

    /// A final `error` result for a job that has no manifest (bad request, missing folder,
    /// deliveries exhausted), with the reason `invalid` (see [`ResultMessage::because`]).
    #[must_use]
    pub fn error(id: &str, error: impl Into<String>) -> Self {
        Self {
            id: id.to_owned(),
            status: Status::Error,
            exit_code: Status::Error.exit_code(1),
            manifest_file: None,
            attempt: None,
            error: Some(error.into()),
            reason: Some(Reason::Invalid),
            duration_ms: None,
            worker: None,
        }
    }

    /// The same message with another reason.
    #[must_use]
    pub fn because(self, reason: Reason) -> Self {
        Self {
            reason: Some(reason),
            ..self
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            job_id: "j".into(),
            status: Status::Failed,
            exit_code: 3,
            attempt: 2,
            worker: Some("worker-01".into()),
            host: "h".into(),
            timing: Timing {
                start: "2026-11-29T01:26:51.134Z".into(),
                end: "2026-11-29T01:26:51.154Z".into(),
                duration_ms: 20,
                stage_ms: 1,
                sync_ms: 1,
            },
            steps: vec![StepRecord {
                index: 0,
                name: None,
                command: "exit 3".into(),
                status: StepStatus::Failed,
                exit_code: Some(3),
                signal: None,
                duration_ms: 6,
                log: Some("step_0.log".into()),
                resources: None,
            }],
            artifacts: vec![],
            error: None,
            reason: None,
            limits: Limits::default(),
            resources: None,
            stream_sequence: Some(7),
            warnings: vec![],
        }
    }

    #[test]
    fn exit_codes_follow_the_table() {
        assert_eq!(Status::Success.exit_code(9), 0);
        assert_eq!(Status::Failed.exit_code(9), 9);
        assert_eq!(Status::Timeout.exit_code(9), 124);
        assert_eq!(Status::Cancelled.exit_code(9), 130);
        assert_eq!(Status::Error.exit_code(9), 1);
    }

    #[test]
    fn manifest_uses_the_original_field_names() {
        let v = serde_json::to_value(sample()).unwrap();
        for key in [
            "jobId",
            "status",
            "exitCode",
            "attempt",
            "worker",
            "host",
            "timing",
            "steps",
            "artifacts",
            "error",
        ] {
            assert!(v.get(key).is_some(), "missing {key}");
        }
        assert_eq!(v["timing"]["durationMs"], 20);
        assert_eq!(v["steps"][0]["exitCode"], 3);
        assert_eq!(v["status"], "failed");
        assert!(v.get("warnings").is_none());
    }

    #[test]
    fn names_for_people_are_the_names_in_json() {
        use Reason as R;
        fn json<T: Serialize>(value: T) -> String {
            serde_json::to_value(value)
                .unwrap()
                .as_str()
                .unwrap()
                .to_owned()
        }
        for status in [
            Status::Success,
            Status::Failed,
            Status::Timeout,
            Status::Cancelled,
            Status::Error,
        ] {
            assert_eq!(status.as_str(), json(status));
        }
        for status in [
            StepStatus::Success,
            StepStatus::Failed,
            StepStatus::Timeout,
            StepStatus::Cancelled,
            StepStatus::Skipped,
        ] {
            assert_eq!(status.as_str(), json(status));
        }
        // `Other` stands for what a newer version may send; it is never written.
        for reason in [
            R::Exit,
            R::Signal,
            R::Timeout,
            R::Idle,
            R::Cancelled,
            R::Memory,
            R::Output,
            R::Processes,
            R::CpuTime,
            R::FileSize,
            R::Invalid,
            R::Host,
        ] {
            assert_eq!(reason.as_str(), json(reason));
        }
    }

    #[test]
    fn write_then_read_round_trips_and_leaves_no_temp_file() {
        let dir = tempfile::tempdir().unwrap();
        let m = sample();
        m.write_atomic(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(m));
        let names: Vec<_> = fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().file_name())
            .collect();
        assert_eq!(names, vec![std::ffi::OsString::from(MANIFEST_FILE)]);
    }

    #[test]
    fn a_written_manifest_is_flushed_and_a_planted_one_refused() {
        let dir = tempfile::tempdir().unwrap();
        // Told to flush a manifest that is not there.
        assert!(Manifest::flush(dir.path()).is_err());
        sample().write_atomic(dir.path()).unwrap();
        Manifest::flush(dir.path()).unwrap();
        // A FIFO at the name would block a plain open; a link would be followed.
        let path = dir.path().join(MANIFEST_FILE);
        fs::remove_file(&path).unwrap();
        nix::unistd::mkfifo(&path, nix::sys::stat::Mode::S_IRWXU).unwrap();
        assert!(Manifest::flush(dir.path()).is_err());
        fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink("/etc/hostname", &path).unwrap();
        assert!(Manifest::flush(dir.path()).is_err());
    }

    #[test]
    fn what_a_step_planted_at_either_name_is_replaced_not_written_through() {
        let dir = tempfile::tempdir().unwrap();
        let outside = tempfile::tempdir().unwrap();
        let tmp = dir
            .path()
            .join(format!(".{MANIFEST_FILE}.{}.tmp", std::process::id()));
        // A FIFO at the temp name would block the open; a folder at the final name would
        // make the rename fail.
        nix::unistd::mkfifo(&tmp, nix::sys::stat::Mode::S_IRWXU).unwrap();
        fs::create_dir_all(dir.path().join(MANIFEST_FILE).join("x")).unwrap();
        sample().write_atomic(dir.path()).unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(sample()));
        // A link at the temp name is replaced, its target left alone.
        std::os::unix::fs::symlink(outside.path().join("victim"), &tmp).unwrap();
        sample().write_atomic(dir.path()).unwrap();
        assert!(!outside.path().join("victim").exists());
        assert!(!tmp.exists());
    }

    #[test]
    fn a_prepared_temp_file_is_renamed_through_a_descriptor_path() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let results = crate::folder::open_dir(nix::fcntl::AT_FDCWD, dir.path()).unwrap();
        let through = crate::folder::fd_path(&results);
        let target = dir.path().join(MANIFEST_FILE);
        let written = sample()
            .write_with(&through, |file| {
                // Before the rename: the name is not there yet, and what is done here shows.
                assert!(!target.exists());
                file.set_permissions(fs::Permissions::from_mode(0o600))
            })
            .unwrap();
        assert_eq!(written, through.join(MANIFEST_FILE));
        assert_eq!(
            fs::metadata(&target).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(sample()));
        // A failing preparation leaves the old manifest and no temp file.
        let mut other = sample();
        other.job_id = "other".into();
        let failed = other.write_with(&through, |_| Err(io::Error::other("no")));
        assert!(failed.is_err());
        assert_eq!(Manifest::read(dir.path()).unwrap(), Some(sample()));
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn read_refuses_symlinks_and_tolerates_absence() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(Manifest::read(dir.path()).unwrap(), None);
        std::os::unix::fs::symlink("/etc/passwd", dir.path().join(MANIFEST_FILE)).unwrap();
        assert!(Manifest::read(dir.path()).is_err());
    }

    #[test]
    fn result_message_shape() {
        let msg = ResultMessage::from_manifest(&sample());
        let v = serde_json::to_value(&msg).unwrap();
        assert_eq!(v["id"], "j");
        assert_eq!(v["status"], "failed");
        assert_eq!(v["exitCode"], 3);
        assert_eq!(v["manifestFile"], "results/result.json");
        let err = serde_json::to_value(ResultMessage::error("j", "no folder")).unwrap();
        assert_eq!(err["manifestFile"], serde_json::Value::Null);
        assert_eq!(err["exitCode"], 1);
    }
}
