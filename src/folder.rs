//! Opening a job folder and its `results/` so that nothing can re-point them afterwards.
//!
//! A job folder lives on a shared drive that other people may be able to change. Every open
//! here refuses symlinks (`O_NOFOLLOW`) and returns a descriptor; whoever works in the folder
//! afterwards works through that descriptor ([`fd_path`]), never through the path again, so
//! swapping the folder for a link to another job's folder while a job starts changes nothing.
//! The runner opens both, with the share user's rights, once per run. Both read `job.json`
//! through [`read_job_json`], which cannot be made to hang or to read without end.

use std::fs::File;
use std::io::{self, Read};
use std::os::fd::{AsFd, AsRawFd, OwnedFd};
use std::path::{Path, PathBuf};

use nix::errno::Errno;
use nix::fcntl::{openat, OFlag, AT_FDCWD};
use nix::sys::stat::{mkdirat, Mode};

use crate::manifest::{ResultMessage, RESULTS_DIR};
use crate::outcome::JobOutcome;

/// The file in a job folder that lists its steps.
pub const JOB_FILE: &str = "job.json";
/// The largest `job.json` read; anything larger is refused, not read.
pub const MAX_JOB_FILE_BYTES: u64 = 16 << 20;

/// An opened job folder and its `results/` folder.
#[derive(Debug)]
pub struct JobFolder {
    /// `{jobs_dir}/{id}`, opened without following a symlink.
    pub dir: OwnedFd,
    /// `{jobs_dir}/{id}/results`, created when missing, opened without following a symlink.
    pub results: OwnedFd,
}

/// Why a job folder cannot be used. Only [`FolderError::Io`] is worth retrying: every other
/// variant is the job's own problem and stays so however often it is tried.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FolderError {
    #[error("the job folder {0} does not exist")]
    Missing(PathBuf),
    #[error("the job folder {0} is a symlink; it must be a real folder")]
    Symlink(PathBuf),
    #[error("{0} is not a folder")]
    NotAFolder(PathBuf),
    #[error("{0} is in the way: results must be a folder, not a file or a symlink")]
    ResultsInTheWay(PathBuf),
    #[error("{action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: Errno,
    },
}

impl FolderError {
    /// Whether the error is final: the job's folder is wrong, not the host.
    #[must_use]
    pub fn is_final(&self) -> bool {
        !matches!(self, Self::Io { .. })
    }

    /// What the error comes to for job `id`: a folder that is the job's own problem (missing,
    /// a symlink, not a folder, `results/` in the way) ends the job with a final `error`,
    /// reason `invalid`, without a manifest, whichever host tries it; one the host could not
    /// open (permissions, the shared drive) is a fault, and the job is tried again.
    #[must_use]
    pub fn outcome(&self, id: &str) -> JobOutcome {
        if self.is_final() {
            JobOutcome::final_result(ResultMessage::error(id, self.to_string()))
        } else {
            JobOutcome::fault(self.to_string())
        }
    }
}

impl JobFolder {
    /// Opens `path` for a run, refusing a symlink at it, and gives the run an empty `results/`:
    /// created (mode 0755) when missing, used as it is when empty, and otherwise first moved
    /// aside to the first free `results.N` ([`previous_results_name`]) — never emptied: what
    /// an earlier run (or anyone) left there stays on the drive. Returns the folder and the
    /// name an earlier `results/` was moved to, if one was.
    pub fn open(path: &Path) -> Result<(Self, Option<String>), FolderError> {
        let dir = Self::open_dir(path)?;
        let results_path = path.join(RESULTS_DIR);
        let io = |action: &'static str, path: &Path| {
            let path = path.to_owned();
            move |source| FolderError::Io {
                action,
                path,
                source,
            }
        };
        let mut moved = None;
        if let Some(results) = open_results(&dir, &results_path)? {
            if is_empty(&results).map_err(io("listing", &results_path))? {
                return Ok((Self { dir, results }, None));
            }
            drop(results);
            let aside = move_aside(&dir).map_err(io("moving aside", &results_path))?;
            moved = Some(aside);
        }
        match mkdirat(&dir, RESULTS_DIR, Mode::from_bits_truncate(0o755)) {
            // Another run of the same id between our two calls would be a broken lock.
            Ok(()) | Err(Errno::EEXIST) => {}
            Err(source) => {
                return Err(FolderError::Io {
                    action: "creating",
                    path: results_path,
                    source,
                })
            }
        }
        let results = open_results(&dir, &results_path)?.ok_or(FolderError::Io {
            action: "opening",
            path: results_path,
            source: Errno::ENOENT,
        })?;
        Ok((Self { dir, results }, moved))
    }

    /// [`JobFolder::open`] for job `id`: the one check, under a supervisor and standalone,
    /// of whether a job folder is usable, and what it comes to when it is not.
    pub fn open_job(path: &Path, id: &str) -> Result<(Self, Option<String>), JobOutcome> {
        Self::open(path).map_err(|e| e.outcome(id))
    }

    fn open_dir(path: &Path) -> Result<OwnedFd, FolderError> {
        match open_dir(AT_FDCWD, path) {
            Ok(dir) => Ok(dir),
            Err(Errno::ENOENT) => Err(FolderError::Missing(path.to_owned())),
            Err(Errno::ELOOP) => Err(FolderError::Symlink(path.to_owned())),
            // O_NOFOLLOW|O_DIRECTORY on a symlink to a file gives ENOTDIR, not ELOOP.
            Err(Errno::ENOTDIR) if is_symlink(path) => Err(FolderError::Symlink(path.to_owned())),
            Err(Errno::ENOTDIR) => Err(FolderError::NotAFolder(path.to_owned())),
            Err(source) => Err(FolderError::Io {
                action: "opening the job folder",
                path: path.to_owned(),
                source,
            }),
        }
    }
}

/// The name an earlier run's `results/` gets when a run finds it holding something:
/// `results.1`, `results.2`, … (the first that is free).
#[must_use]
pub fn previous_results_name(n: u32) -> String {
    format!("{RESULTS_DIR}.{n}")
}

/// Whether `name`, at the top of a job folder, is the worker's: `results` or an earlier run's
/// `results.N`. Staging leaves them out, and a change to them is not a change of the job.
#[must_use]
pub fn is_results_name(name: &std::ffi::OsStr) -> bool {
    let Some(name) = name.to_str() else {
        return false;
    };
    name == RESULTS_DIR
        || name
            .strip_prefix(RESULTS_DIR)
            .and_then(|rest| rest.strip_prefix('.'))
            .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
}

/// `results/` in `dir`, if there is one; an error if something else is at its name.
fn open_results(dir: &OwnedFd, shown: &Path) -> Result<Option<OwnedFd>, FolderError> {
    match open_dir(dir, Path::new(RESULTS_DIR)) {
        Ok(results) => Ok(Some(results)),
        Err(Errno::ENOENT) => Ok(None),
        Err(Errno::ELOOP | Errno::ENOTDIR) => Err(FolderError::ResultsInTheWay(shown.to_owned())),
        Err(source) => Err(FolderError::Io {
            action: "opening",
            path: shown.to_owned(),
            source,
        }),
    }
}

fn is_empty(dir: &OwnedFd) -> nix::Result<bool> {
    let errno = |e: io::Error| e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
    match std::fs::read_dir(fd_path(dir)).map_err(errno)?.next() {
        None => Ok(true),
        Some(entry) => entry.map(|_| false).map_err(errno),
    }
}

/// Renames `results` in `dir` to `results.N`, N one more than the highest there (one listing
/// of the job folder, however many earlier runs there were); returns that name. Never
/// replaces anything: a rename over an existing folder fails unless it is empty.
fn move_aside(dir: &OwnedFd) -> nix::Result<String> {
    let errno = |e: io::Error| e.raw_os_error().map_or(Errno::EIO, Errno::from_raw);
    let mut highest = 0;
    for entry in std::fs::read_dir(fd_path(dir)).map_err(errno)? {
        let name = entry.map_err(errno)?.file_name();
        if let Some(n) = name.to_str().and_then(|n| {
            n.strip_prefix(RESULTS_DIR)?
                .strip_prefix('.')?
                .parse::<u32>()
                .ok()
        }) {
            highest = highest.max(n);
        }
    }
    let name = previous_results_name(highest.checked_add(1).ok_or(Errno::EEXIST)?);
    nix::fcntl::renameat(dir, RESULTS_DIR, dir, name.as_str())?;
    Ok(name)
}

/// Opens a folder for `*at` calls: a symlink fails with `ELOOP`, anything else with `ENOTDIR`.
pub fn open_dir<Fd: AsFd>(at: Fd, path: &Path) -> nix::Result<OwnedFd> {
    openat(
        at,
        path,
        OFlag::O_RDONLY | OFlag::O_DIRECTORY | OFlag::O_NOFOLLOW | OFlag::O_CLOEXEC,
        Mode::empty(),
    )
}

/// A path that reaches exactly what `fd` has open, however the tree it came from changes:
/// `/proc/self/fd/N` is resolved by the kernel to the open file, not looked up by name.
/// Paths below it (`/proc/self/fd/N/name`) are looked up from that folder.
#[must_use]
pub fn fd_path(fd: &impl AsRawFd) -> PathBuf {
    PathBuf::from(format!("/proc/self/fd/{}", fd.as_raw_fd()))
}

fn is_symlink(path: &Path) -> bool {
    std::fs::symlink_metadata(path).is_ok_and(|m| m.file_type().is_symlink())
}

/// Why `job.json` could not be read. Every variant is the job's problem (a final `error`).
#[derive(Debug, thiserror::Error)]
pub enum JobFileError {
    #[error("{0} does not exist")]
    Missing(String),
    #[error("{path} is {kind}; it must be a regular file")]
    NotAFile { path: String, kind: &'static str },
    #[error("{path} is {size} bytes; a job file may have at most {MAX_JOB_FILE_BYTES} bytes")]
    TooLarge { path: String, size: u64 },
    #[error("reading {path}: {source}")]
    Io { path: String, source: io::Error },
}

/// Reads `job.json` from the folder at `dir` (`shown` names it in errors), within a second
/// whatever it is: it is opened without following a symlink and without blocking (a FIFO
/// would otherwise wait for a writer forever), must be a regular file, and at most
/// [`MAX_JOB_FILE_BYTES`] are read (a file that grows while it is read is cut there and then
/// fails to parse).
pub fn read_job_json(dir: &Path, shown: &Path) -> Result<Vec<u8>, JobFileError> {
    use std::os::unix::fs::{FileTypeExt, OpenOptionsExt};
    let path = dir.join(JOB_FILE);
    let shown = shown.join(JOB_FILE).display().to_string();
    let io = |source: io::Error| JobFileError::Io {
        path: shown.clone(),
        source,
    };
    let file = match File::options()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(&path)
    {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Err(JobFileError::Missing(shown)),
        Err(e) if e.raw_os_error() == Some(nix::libc::ELOOP) => {
            return Err(JobFileError::NotAFile {
                path: shown,
                kind: "a symlink",
            })
        }
        // A socket cannot be opened at all.
        Err(e) if e.raw_os_error() == Some(nix::libc::ENXIO) => {
            return Err(JobFileError::NotAFile {
                path: shown,
                kind: "a socket",
            })
        }
        Err(e) => return Err(io(e)),
    };
    let meta = file.metadata().map_err(io)?;
    let file_type = meta.file_type();
    if !file_type.is_file() {
        let kind = if file_type.is_dir() {
            "a folder"
        } else if file_type.is_fifo() {
            "a FIFO"
        } else if file_type.is_char_device() || file_type.is_block_device() {
            "a device"
        } else {
            "not a regular file"
        };
        return Err(JobFileError::NotAFile { path: shown, kind });
    }
    if meta.len() > MAX_JOB_FILE_BYTES {
        return Err(JobFileError::TooLarge {
            path: shown,
            size: meta.len(),
        });
    }
    let mut bytes = Vec::with_capacity(usize::try_from(meta.len()).unwrap_or(0));
    file.take(MAX_JOB_FILE_BYTES + 1)
        .read_to_end(&mut bytes)
        .map_err(io)?;
    if bytes.len() as u64 > MAX_JOB_FILE_BYTES {
        return Err(JobFileError::TooLarge {
            path: shown,
            size: bytes.len() as u64,
        });
    }
    Ok(bytes)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn opens_and_creates_results_but_refuses_links() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        std::fs::create_dir(&job).unwrap();
        let (folder, moved) = JobFolder::open(&job).unwrap();
        assert!(job.join("results").is_dir());
        assert_eq!(moved, None);
        // The descriptor path keeps reaching the folder after the name is re-pointed.
        std::fs::write(job.join("mark"), "x").unwrap();
        let moved = tmp.path().join("moved");
        std::fs::rename(&job, &moved).unwrap();
        symlink(tmp.path(), &job).unwrap();
        assert!(fd_path(&folder.dir).join("mark").exists());
        assert_eq!(
            JobFolder::open(&job).unwrap_err(),
            FolderError::Symlink(job.clone())
        );
        std::fs::remove_file(&job).unwrap();
        assert_eq!(
            JobFolder::open(&job).unwrap_err(),
            FolderError::Missing(job.clone())
        );
        std::fs::write(&job, "").unwrap();
        assert!(matches!(
            JobFolder::open(&job).unwrap_err(),
            FolderError::NotAFolder(_)
        ));
        std::fs::remove_dir(moved.join("results")).unwrap();
        symlink("/", moved.join("results")).unwrap();
        let err = JobFolder::open(&moved).unwrap_err();
        assert!(matches!(err, FolderError::ResultsInTheWay(_)), "{err}");
        assert!(err.is_final());
    }

    #[test]
    fn an_earlier_runs_results_are_moved_aside_never_emptied() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("job");
        std::fs::create_dir_all(job.join("results")).unwrap();
        // Empty: used as it is.
        assert_eq!(JobFolder::open(&job).unwrap().1, None);
        std::fs::write(job.join("results/step_0.log"), "first run\n").unwrap();
        std::fs::create_dir(job.join("results.1")).unwrap();
        let (folder, moved) = JobFolder::open(&job).unwrap();
        assert_eq!(moved.as_deref(), Some("results.2"));
        assert_eq!(
            std::fs::read_to_string(job.join("results.2/step_0.log")).unwrap(),
            "first run\n"
        );
        // The next after the highest, whatever lies below it.
        std::fs::write(job.join("results/step_0.log"), "second run\n").unwrap();
        std::fs::remove_dir(job.join("results.1")).unwrap();
        // `folder.results` is the folder this second run wrote to: it is the one moved.
        let (next, moved) = JobFolder::open(&job).unwrap();
        assert_eq!(moved.as_deref(), Some("results.3"));
        assert_eq!(
            std::fs::read_to_string(fd_path(&folder.results).join("step_0.log")).unwrap(),
            "second run\n"
        );
        assert_eq!(
            std::fs::read_dir(fd_path(&next.results)).unwrap().count(),
            0
        );
        assert!(is_results_name("results".as_ref()));
        assert!(is_results_name("results.2".as_ref()));
        for other in ["results.", "results.x", "results.2a", "result", "results2"] {
            assert!(!is_results_name(other.as_ref()), "{other}");
        }
    }

    #[test]
    fn an_unusable_folder_is_a_final_error_and_an_unreadable_one_a_fault() {
        let tmp = tempfile::tempdir().unwrap();
        let job = tmp.path().join("gone");
        let Err(JobOutcome::Final(result)) = JobFolder::open_job(&job, "gone") else {
            panic!("a missing folder is final");
        };
        assert_eq!(result.id, "gone");
        assert_eq!(result.status, crate::Status::Error);
        assert_eq!(result.exit_code, 1);
        assert_eq!(result.reason, Some(crate::manifest::Reason::Invalid));
        assert_eq!(result.manifest_file, None);
        assert_eq!(
            result.error.as_deref(),
            Some(format!("the job folder {} does not exist", job.display()).as_str())
        );
        let io = FolderError::Io {
            action: "opening the job folder",
            path: job.clone(),
            source: Errno::EACCES,
        };
        assert_eq!(
            io.outcome("gone"),
            JobOutcome::fault(format!(
                "opening the job folder {}: EACCES: Permission denied",
                job.display()
            ))
        );
        std::fs::create_dir(&job).unwrap();
        assert!(JobFolder::open_job(&job, "gone").is_ok());
    }

    #[test]
    fn job_json_must_be_a_small_regular_file() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let read = || read_job_json(dir, Path::new("/jobs/x"));
        assert!(matches!(read(), Err(JobFileError::Missing(p)) if p == "/jobs/x/job.json"));
        nix::unistd::mkfifo(&dir.join(JOB_FILE), Mode::S_IRWXU).unwrap();
        assert!(matches!(
            read(),
            Err(JobFileError::NotAFile { kind: "a FIFO", .. })
        ));
        std::fs::remove_file(dir.join(JOB_FILE)).unwrap();
        symlink("/dev/zero", dir.join(JOB_FILE)).unwrap();
        assert!(matches!(
            read(),
            Err(JobFileError::NotAFile {
                kind: "a symlink",
                ..
            })
        ));
        std::fs::remove_file(dir.join(JOB_FILE)).unwrap();
        let big = File::create(dir.join(JOB_FILE)).unwrap();
        big.set_len(MAX_JOB_FILE_BYTES + 1).unwrap();
        assert!(matches!(read(), Err(JobFileError::TooLarge { .. })));
        std::fs::write(dir.join(JOB_FILE), "{}").unwrap();
        assert_eq!(read().unwrap(), b"{}");
    }
}
