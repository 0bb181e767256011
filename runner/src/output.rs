//! The job's output in `results/`: the `limits.output` quota, and a drive that fills up.
//!
//! **What counts.** Everything the job has in `results/`: the step logs, the artifacts the
//! runner copies, and files a step writes there directly through `$JOB_RESULTS_DIR`. The logs
//! are watched while their step runs (the step's poll); files written directly are counted
//! when their step ends (a walk of `results/`, only under an output limit), and a job whose
//! total then passes the quota fails `output` at that point — they are not removed, they are
//! the job's. Artifacts are checked against what is left before each is copied.
//!
//! **A full drive.** When the drive holding `results/` fills up (ENOSPC, EDQUOT) it is the
//! job's doing if the job has at least [`JOB_FILLED_DRIVE`] there: the job fails `output`, and
//! the largest log loses its tail (with a [marker line](drive_full_marker)) so that
//! `result.json` still fits. With less, the job is not the cause: the run is a fault of the
//! host and the job is retried later.

use std::fs::{self, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

use nats_fs::limits::size;

/// A job with at least this much in `results/` filled the drive itself.
pub(crate) const JOB_FILLED_DRIVE: u64 = 1 << 20;
/// What is cut from the largest log to make room for `result.json` on a full drive.
const ROOM_FOR_MANIFEST: u64 = 256 << 10;

/// The line that ends a log cut at the output quota.
pub(crate) fn quota_marker(limit: u64) -> String {
    format!(
        "[nats-fs] output limit of {} reached: the step was stopped\n",
        size(limit)
    )
}

/// The line that ends a log cut to make room on a full drive.
pub(crate) fn drive_full_marker() -> &'static str {
    "[nats-fs] the drive holding results/ is full: the end of this log was cut\n"
}

/// Whether an error means the drive (or the user's quota on it) is full.
pub(crate) fn is_no_space(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::ENOSPC | nix::libc::EDQUOT)
    )
}

/// Cuts the log at `path` to at most `keep` bytes and ends it with `marker` (on a line of its
/// own). A log that is not a regular file (a step replaced it) is left alone. Returns the
/// log's new size.
pub(crate) fn cut_log(path: &Path, keep: u64, marker: &str) -> io::Result<u64> {
    let mut log = OpenOptions::new()
        .read(true)
        .append(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK)
        .open(path)?;
    let meta = log.metadata()?;
    if !meta.is_file() {
        return Ok(0);
    }
    let keep = keep.min(meta.len());
    log.set_len(keep)?;
    let mut text = Vec::with_capacity(marker.len() + 1);
    if keep > 0 {
        let mut last = [0u8];
        log.seek(SeekFrom::Start(keep - 1))?;
        log.read_exact(&mut last)?;
        if last[0] != b'\n' {
            text.push(b'\n');
        }
    }
    text.extend_from_slice(marker.as_bytes());
    // Append mode: the marker lands at the (new) end whatever the read moved.
    log.write_all(&text)?;
    Ok(keep + text.len() as u64)
}

/// Makes room on a full drive by cutting [`ROOM_FOR_MANIFEST`] off the end of the largest of
/// `logs` (names in `results`), which then ends with [`drive_full_marker`]. Returns the log cut,
/// if one was large enough.
pub(crate) fn make_room(results: &Path, logs: &[String]) -> Option<PathBuf> {
    let largest = logs
        .iter()
        .map(|name| results.join(name))
        .filter_map(|path| Some((fs::symlink_metadata(&path).ok()?, path)))
        .filter(|(meta, _)| meta.is_file())
        .max_by_key(|(meta, _)| meta.len())?;
    let (meta, path) = largest;
    if meta.len() < ROOM_FOR_MANIFEST {
        return None;
    }
    cut_log(&path, meta.len() - ROOM_FOR_MANIFEST, drive_full_marker()).ok()?;
    Some(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cut_log_ends_with_one_marker_line() {
        let dir = tempfile::tempdir().unwrap();
        let log = dir.path().join("step_0.log");
        fs::write(&log, "y\ny\ny\ny\n").unwrap();
        let marker = quota_marker(5);
        assert_eq!(
            marker,
            "[nats-fs] output limit of 5 B reached: the step was stopped\n"
        );
        let size = cut_log(&log, 5, &marker).unwrap();
        let text = fs::read_to_string(&log).unwrap();
        assert_eq!(text, format!("y\ny\ny\n{marker}"));
        assert_eq!(size, text.len() as u64);
        // Cut at a line's end: no empty line before the marker.
        fs::write(&log, "ab\ncd\n").unwrap();
        cut_log(&log, 3, "[m]\n").unwrap();
        assert_eq!(fs::read_to_string(&log).unwrap(), "ab\n[m]\n");
    }

    #[test]
    fn room_is_made_in_the_largest_log() {
        let dir = tempfile::tempdir().unwrap();
        fs::write(dir.path().join("step_0.log"), "small\n").unwrap();
        fs::write(dir.path().join("step_1.log"), vec![b'x'; 300 << 10]).unwrap();
        let logs = vec!["step_0.log".to_owned(), "step_1.log".to_owned()];
        assert_eq!(nats_fs::tree::bytes_in(dir.path(), None), 6 + (300 << 10));
        let cut = make_room(dir.path(), &logs).unwrap();
        assert!(cut.ends_with("step_1.log"));
        let text = fs::read_to_string(&cut).unwrap();
        assert!(text.ends_with(drive_full_marker()));
        assert!(text.len() < (300 << 10) - (250 << 10));
        assert_eq!(
            fs::read_to_string(dir.path().join("step_0.log")).unwrap(),
            "small\n"
        );
        assert!(is_no_space(&io::Error::from_raw_os_error(
            nix::libc::ENOSPC
        )));
        assert!(nats_fs::tree::free_space(dir.path()).is_ok());
    }
}
