//! What the supervisor does to a job's `results/`: write the manifest of a job it had to end
//! itself, flush a manifest to the drive, and decide whether a `result.json` found there can
//! be believed. Always with the share user's rights ([`crate::share`]), and never following a
//! symlink on the way.
//!
//! A `result.json` is believed (to republish a result whose ack was lost instead of running the
//! job again) only where steps cannot reach the jobs folder, as the probe found out by trying
//! ([`crate::share::Verdict::steps_kept_off`]): then only the worker (or the controller) can
//! have written it. Where steps can reach it, any `result.json` may be a step's forgery, and the
//! job runs again.

use std::fs;
use std::io;
use std::path::Path;

use nats_fs::folder::{fd_path, open_dir};
use nats_fs::manifest::{Manifest, MANIFEST_FILE, RESULTS_DIR};
use nats_fs::share::{as_ids, FsIds};
use nix::errno::Errno;
use nix::fcntl::{openat, OFlag};
use nix::sys::stat::{fstat, Mode};

/// `job_dir/results`, opened without following a symlink at either name.
fn open_results(job_dir: &Path) -> nix::Result<std::os::fd::OwnedFd> {
    let dir = open_dir(nix::fcntl::AT_FDCWD, job_dir)?;
    open_dir(&dir, Path::new(RESULTS_DIR))
}

/// Writes the manifest of a job the supervisor ended itself into `job_dir/results/`, as
/// `share` ([`Manifest::write_atomic`]); it reaches the drive before the ack, with every other
/// manifest (`settle`).
pub fn write_manifest(job_dir: &Path, manifest: &Manifest, share: Option<FsIds>) -> io::Result<()> {
    as_ids(share, || {
        let results = open_results(job_dir)?;
        manifest.write_atomic(&fd_path(&results))?;
        Ok(())
    })
}

/// Flushes `job_dir/results/result.json` to the drive, as `share` ([`Manifest::flush`]).
pub fn flush_manifest(job_dir: &Path, share: Option<FsIds>) -> io::Result<()> {
    as_ids(share, || {
        let results = open_results(job_dir)?;
        Manifest::flush(&fd_path(&results))
    })
}

/// The manifest in `job_dir/results/`, if there is one that a job cannot have forged: a
/// regular file with one link, on a jobs folder the steps cannot reach (`trusted`). Read as
/// `share`, without following a link.
pub fn believable_manifest(
    job_dir: &Path,
    trusted: bool,
    share: Option<FsIds>,
) -> Result<Option<Manifest>, String> {
    if !trusted {
        return Err(
            "steps can reach the jobs folder here, so a job may have written it".to_owned(),
        );
    }
    as_ids(share, || {
        let Ok(results) = open_results(job_dir) else {
            return Ok(None);
        };
        let file = match openat(
            &results,
            MANIFEST_FILE,
            OFlag::O_RDONLY | OFlag::O_NOFOLLOW | OFlag::O_NONBLOCK | OFlag::O_CLOEXEC,
            Mode::empty(),
        ) {
            Ok(file) => file,
            Err(Errno::ENOENT) => return Ok(None),
            Err(e) => return Err(format!("opening it: {e}")),
        };
        let stat = fstat(&file).map_err(|e| e.to_string())?;
        if stat.st_nlink != 1 {
            return Err("it has more than one name".to_owned());
        }
        let path = job_dir.join(RESULTS_DIR).join(MANIFEST_FILE);
        Manifest::read_file(fs::File::from(file), &path)
            .map(Some)
            .map_err(|e| e.to_string())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn manifest() -> Manifest {
        serde_json::from_value(serde_json::json!({
            "jobId": "j", "status": "error", "exitCode": 1, "attempt": 1, "worker": null,
            "host": "h", "timing": {"start": "", "end": "", "durationMs": 0},
            "steps": [], "artifacts": [], "error": "ended by the supervisor"
        }))
        .unwrap()
    }

    #[test]
    fn a_manifest_is_written_read_back_and_flushed() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        fs::create_dir_all(job.join("results")).unwrap();
        write_manifest(&job, &manifest(), None).unwrap();
        assert_eq!(
            believable_manifest(&job, true, None).unwrap(),
            Some(manifest())
        );
        flush_manifest(&job, None).unwrap();
        assert!(believable_manifest(&job, false, None).is_err());
        // A second name makes it suspect; none is no manifest.
        fs::hard_link(
            job.join("results/result.json"),
            tmp.path().join("second-name"),
        )
        .unwrap();
        assert!(believable_manifest(&job, true, None).is_err());
        assert_eq!(
            believable_manifest(&tmp.path().join("missing"), true, None).unwrap(),
            None
        );
    }

    #[test]
    fn a_manifest_is_never_written_through_a_link() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        let elsewhere = tmp.path().join("elsewhere");
        fs::create_dir_all(&job).unwrap();
        fs::create_dir_all(&elsewhere).unwrap();
        std::os::unix::fs::symlink(&elsewhere, job.join("results")).unwrap();
        assert!(write_manifest(&job, &manifest(), None).is_err());
        assert_eq!(fs::read_dir(&elsewhere).unwrap().count(), 0);
    }
}
