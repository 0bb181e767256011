//! What the supervisor does to a job's `results/` as root, always through the descriptor it
//! opened without following symlinks: empty it and lend it to the slot's identity before a run,
//! take it back after, write the manifest of a job it had to end itself, and decide whether a
//! `result.json` found there can be believed.
//!
//! While a job runs, its identity owns `results/` (the runner writes logs and artifacts there,
//! and so may the steps, through `JOB_RESULTS_DIR`). Identities are reused by later jobs, so
//! once the job's processes are all gone the supervisor gives the whole tree to the owner of
//! the job folder (the controller that made it; root if that is one of the pool) and takes
//! away group and other write access (which, with an ACL, also takes it from every named
//! entry). No later job can then change it. What a step planted that is not its own — a link
//! to someone else's file, a FIFO, a socket — is removed rather than given away.
//!
//! A `result.json` is believed (to republish a result whose ack was lost instead of running the
//! job again) only if no identity of the pool owns it or its folder: a step can write a
//! `result.json` with any content while it runs, but it cannot make one that the supervisor
//! gave away after the job.

use std::fs;
use std::io;
use std::os::fd::{AsFd, OwnedFd};
use std::path::Path;

use nats_fs::folder::{fd_path, open_dir, JobFolder};
use nats_fs::manifest::{Manifest, MANIFEST_FILE};
use nix::errno::Errno;
use nix::fcntl::{openat, AtFlags, OFlag};
use nix::sys::stat::{fchmod, fstat, fstatat, FileStat, Mode, SFlag};
use nix::unistd::{fchown, fchownat, unlinkat, Gid, Uid, UnlinkatFlags};

use crate::identity::{Identity, Pool};

/// How deep a tree is taken back; anything deeper is removed (no real build goes that deep,
/// and each level holds a descriptor open).
const MAX_DEPTH: usize = 256;
/// Permission bits kept when a tree is taken back: no group or other write, no setuid/setgid.
const KEPT_BITS: u32 = 0o1755;

/// Who gets a job's `results/` back: the job folder's owner, unless that is an identity of
/// the pool (a job may have made the folder), then root; the folder's group either way.
pub fn owner_after(folder: &JobFolder, pool: &Pool) -> io::Result<(Uid, Gid)> {
    let stat = fstat(&folder.dir)?;
    let uid = Uid::from_raw(stat.st_uid);
    let uid = if pool.contains(uid) {
        Uid::from_raw(0)
    } else {
        uid
    };
    Ok((uid, Gid::from_raw(stat.st_gid)))
}

/// Empties `results/` (whatever owns its entries: an earlier run's files are no longer the
/// identity's) and gives the folder to `identity` for the run.
pub fn lend(folder: &JobFolder, identity: &Identity) -> io::Result<()> {
    nats_fs::tree::empty_dir(&fd_path(&folder.results))?;
    fchown(&folder.results, Some(identity.uid), Some(identity.gid))?;
    let mode = fstat(&folder.results)?.st_mode;
    if mode & 0o700 != 0o700 {
        fchmod(&folder.results, Mode::from_bits_truncate(mode | 0o700))?;
    }
    Ok(())
}

/// What [`take_back`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TakenBack {
    /// Entries given to the new owner.
    pub given: usize,
    /// Entries removed: files and links that are not the job's own, anything that is not a
    /// file, folder or link, and folders nested too deep.
    pub removed: usize,
    /// Folders of someone else's that a step moved here: left as they are.
    pub left: usize,
}

/// Gives `results` and everything in it that `job_uid` owns to `owner`, without group or
/// other write access; removes names of files and links that are not `job_uid`'s (the file
/// itself lives on under its other names) and whatever is neither a file, a folder nor a link. `drop_manifest` removes `result.json` first (the run did not write a final one, so
/// one there was planted). Only call it when no process of `job_uid` can still run.
pub fn take_back(
    results: &OwnedFd,
    job_uid: Uid,
    owner: (Uid, Gid),
    drop_manifest: bool,
) -> io::Result<TakenBack> {
    let mut done = TakenBack::default();
    if drop_manifest {
        match unlinkat(results, MANIFEST_FILE, UnlinkatFlags::NoRemoveDir) {
            Ok(()) => done.removed += 1,
            Err(Errno::ENOENT) => {}
            Err(Errno::EISDIR) => {
                nats_fs::tree::remove_tree(&fd_path(results).join(MANIFEST_FILE))?;
                done.removed += 1;
            }
            Err(e) => return Err(e.into()),
        }
    }
    take_back_dir(results, job_uid, owner, 0, &mut done)?;
    give(results, &fstat(results)?, owner)?;
    done.given += 1;
    Ok(done)
}

fn take_back_dir(
    dir: &OwnedFd,
    job_uid: Uid,
    owner: (Uid, Gid),
    depth: usize,
    done: &mut TakenBack,
) -> io::Result<()> {
    let names: Vec<_> = fs::read_dir(fd_path(dir))?
        .map(|entry| entry.map(|e| e.file_name()))
        .collect::<io::Result<_>>()?;
    for name in names {
        let stat = match fstatat(dir, name.as_os_str(), AtFlags::AT_SYMLINK_NOFOLLOW) {
            Ok(stat) => stat,
            Err(Errno::ENOENT) => continue,
            Err(e) => return Err(e.into()),
        };
        let kind = SFlag::from_bits_truncate(stat.st_mode & SFlag::S_IFMT.bits());
        let ours = stat.st_uid == job_uid.as_raw();
        if kind == SFlag::S_IFLNK && ours {
            fchownat(
                dir,
                name.as_os_str(),
                Some(owner.0),
                Some(owner.1),
                AtFlags::AT_SYMLINK_NOFOLLOW,
            )?;
            done.given += 1;
            continue;
        }
        if ours && (kind == SFlag::S_IFREG || kind == SFlag::S_IFDIR) && depth < MAX_DEPTH {
            let flags = OFlag::O_RDONLY
                | OFlag::O_NOFOLLOW
                | OFlag::O_NONBLOCK
                | OFlag::O_NOCTTY
                | OFlag::O_CLOEXEC;
            match openat(dir, name.as_os_str(), flags, Mode::empty()) {
                Ok(fd) => {
                    let stat = fstat(&fd)?;
                    // Checked again on the open file: it is the one we will change.
                    if stat.st_uid == job_uid.as_raw() {
                        if kind == SFlag::S_IFDIR {
                            take_back_dir(&fd, job_uid, owner, depth + 1, done)?;
                        }
                        give(&fd, &stat, owner)?;
                        done.given += 1;
                        continue;
                    }
                }
                Err(Errno::ENOENT) => continue,
                Err(_) => {}
            }
        }
        if kind == SFlag::S_IFDIR && !ours {
            // Someone else's folder that the job could move here: not ours to give or delete.
            done.left += 1;
            continue;
        }
        remove(dir, &name, kind)?;
        done.removed += 1;
    }
    Ok(())
}

/// Gives an open file or folder to `owner`, without group/other write or setuid/setgid bits.
fn give(fd: impl AsFd, stat: &FileStat, owner: (Uid, Gid)) -> io::Result<()> {
    fchown(&fd, Some(owner.0), Some(owner.1))?;
    let mode = stat.st_mode & 0o7777;
    if mode & !KEPT_BITS != 0 {
        fchmod(&fd, Mode::from_bits_truncate(mode & KEPT_BITS))?;
    }
    Ok(())
}

fn remove(dir: &OwnedFd, name: &std::ffi::OsStr, kind: SFlag) -> io::Result<()> {
    if kind == SFlag::S_IFDIR {
        // std's remove_dir_all opens every level without following links.
        nats_fs::tree::remove_tree(&fd_path(dir).join(name))
    } else {
        match unlinkat(dir, name, UnlinkatFlags::NoRemoveDir) {
            Ok(()) | Err(Errno::ENOENT) => Ok(()),
            Err(e) => Err(e.into()),
        }
    }
}

/// Writes the manifest of a job the supervisor ended itself into `results`, owned by `owner`
/// ([`Manifest::write_with`]). The owner is given to the temp file before it is renamed, so
/// the manifest never appears without it; it reaches the drive before the ack, with every
/// other manifest (`settle`).
pub fn write_manifest(
    results: &OwnedFd,
    manifest: &Manifest,
    owner: Option<(Uid, Gid)>,
) -> io::Result<()> {
    manifest.write_with(&fd_path(results), |file| match owner {
        Some((uid, gid)) => Ok(fchown(file, Some(uid), Some(gid))?),
        None => Ok(()),
    })?;
    Ok(())
}

/// The manifest in `job_dir/results/`, if there is one that a job cannot have forged: a
/// regular file with one link, neither it nor its folder owned by an identity of the pool
/// (when the pool switches users; without that there is nothing to tell jobs and supervisor
/// apart). Read as root, so nothing on the way is followed if it is a symlink.
pub fn believable_manifest(job_dir: &Path, pool: &Pool) -> Result<Option<Manifest>, String> {
    let Ok(dir) = open_dir(nix::fcntl::AT_FDCWD, job_dir) else {
        return Ok(None);
    };
    let Ok(results) = open_dir(&dir, Path::new(nats_fs::manifest::RESULTS_DIR)) else {
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
    if pool.switch {
        let folder = fstat(&results).map_err(|e| e.to_string())?;
        let stat = fstat(&file).map_err(|e| e.to_string())?;
        let owned_by_pool = |uid| pool.contains(Uid::from_raw(uid));
        if owned_by_pool(folder.st_uid) || owned_by_pool(stat.st_uid) {
            return Err("it belongs to a job's identity, so a job may have written it".to_owned());
        }
        if stat.st_nlink != 1 {
            return Err("it has more than one name".to_owned());
        }
    }
    let path = job_dir
        .join(nats_fs::manifest::RESULTS_DIR)
        .join(MANIFEST_FILE);
    Manifest::read_file(fs::File::from(file), &path)
        .map(Some)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::{MetadataExt, PermissionsExt};

    #[test]
    fn a_manifest_the_supervisor_writes_has_its_owner_from_the_start() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: giving a file away needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        fs::create_dir(&job).unwrap();
        let folder = JobFolder::open(&job).unwrap();
        let manifest: Manifest = serde_json::from_value(serde_json::json!({
            "jobId": "j", "status": "error", "exitCode": 1, "attempt": 1, "worker": null,
            "host": "h", "timing": {"start": "", "end": "", "durationMs": 0},
            "steps": [], "artifacts": [], "error": "ended by the supervisor"
        }))
        .unwrap();
        let owner = (Uid::from_raw(4_000_000), Gid::from_raw(4_000_001));
        write_manifest(&folder.results, &manifest, Some(owner)).unwrap();
        let path = job.join("results").join(MANIFEST_FILE);
        let meta = fs::symlink_metadata(&path).unwrap();
        assert_eq!((meta.uid(), meta.gid()), (4_000_000, 4_000_001));
        assert_eq!(
            Manifest::read(&job.join("results")).unwrap(),
            Some(manifest)
        );
        assert_eq!(fs::read_dir(job.join("results")).unwrap().count(), 1);
    }

    #[test]
    fn takes_back_what_is_the_jobs_and_removes_the_rest() {
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: taking results back needs root");
            return;
        }
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        fs::create_dir(&job).unwrap();
        let folder = JobFolder::open(&job).unwrap();
        let r = job.join("results");
        let job_uid = Uid::from_raw(3_999_123);
        fs::create_dir(r.join("dist")).unwrap();
        fs::write(r.join("dist/app"), "x").unwrap();
        fs::set_permissions(r.join("dist/app"), fs::Permissions::from_mode(0o4777)).unwrap();
        fs::write(r.join("step_0.log"), "log").unwrap();
        std::os::unix::fs::symlink("/etc/passwd", r.join("link")).unwrap();
        nix::unistd::mkfifo(&r.join("fifo"), Mode::S_IRWXU).unwrap();
        fs::write(tmp.path().join("foreign"), "someone else's").unwrap();
        fs::hard_link(tmp.path().join("foreign"), r.join("hardlink")).unwrap();
        for path in ["dist", "dist/app", "step_0.log", "fifo"] {
            std::os::unix::fs::lchown(r.join(path), Some(job_uid.as_raw()), None).unwrap();
        }
        std::os::unix::fs::lchown(r.join("link"), Some(job_uid.as_raw()), None).unwrap();
        fchown(&folder.results, Some(job_uid), None).unwrap();

        let owner = (Uid::from_raw(4_000_000), Gid::from_raw(4_000_001));
        let done = take_back(&folder.results, job_uid, owner, true).unwrap();
        assert_eq!(done.removed, 2, "{done:?}"); // the FIFO and the foreign hard link
        assert!(!r.join("fifo").exists() && !r.join("hardlink").exists());
        assert_eq!(
            fs::read_to_string(tmp.path().join("foreign")).unwrap(),
            "someone else's"
        );
        for path in ["", "dist", "dist/app", "step_0.log", "link"] {
            let meta = fs::symlink_metadata(r.join(path)).unwrap();
            assert_eq!((meta.uid(), meta.gid()), (4_000_000, 4_000_001), "{path}");
        }
        assert_eq!(
            fs::metadata(r.join("dist/app")).unwrap().mode() & 0o7777,
            0o755
        );
    }
}
