//! Staging: copying a job folder into the private workspace (contract §4.1), and remembering what
//! was staged so that [`crate::sync`] can tell which files the steps created or changed.
//!
//! Regular files are copied with `io::copy`, which std turns into `copy_file_range(2)` between
//! two files (in-kernel, and a reflink where the filesystem offers one). Modes and mtimes are
//! kept; symlinks are recreated verbatim and never followed; FIFOs, sockets and devices are
//! skipped and reported. The top-level `results/` folder is not staged.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nats_fs::manifest::RESULTS_DIR;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

/// What a file or link looked like right after staging. Any step that writes, truncates,
/// replaces, renames over or chmods a file changes its ctime or inode, so comparing this tuple
/// finds every modified file without reading contents.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Fingerprint {
    ino: u64,
    size: u64,
    mtime: (i64, i64),
    ctime: (i64, i64),
    mode: u32,
}

impl Fingerprint {
    pub(crate) fn of(meta: &fs::Metadata) -> Self {
        Self {
            ino: meta.ino(),
            size: meta.size(),
            mtime: (meta.mtime(), meta.mtime_nsec()),
            ctime: (meta.ctime(), meta.ctime_nsec()),
            mode: meta.mode(),
        }
    }
}

/// The mode bits a copy keeps: permissions and the sticky bit, not setuid and setgid. Those
/// mean nothing in a private workspace (and under `no_new_privs`), a hardened service may forbid
/// setting them (systemd's `RestrictSUIDSGID=`), and a job must not be able to leave a setuid
/// file in `results/` on a shared drive.
const KEPT_MODE_BITS: u32 = 0o1777;

/// Files and links as staged, for telling later which ones the steps touched.
///
/// Keyed by inode, with the folder (by inode) and name each was staged under: the sync walk
/// visits every file of the workspace, and this lets it settle an unchanged input without
/// building or hashing its path. A file moved or renamed by a step is under another folder or
/// name, so it counts as new.
#[derive(Debug, Default, Clone)]
pub(crate) struct Snapshot {
    by_inode: HashMap<u64, (u64, OsString, Fingerprint)>,
}

impl Snapshot {
    fn insert(&mut self, folder: u64, name: OsString, meta: &fs::Metadata) {
        self.by_inode
            .insert(meta.ino(), (folder, name, Fingerprint::of(meta)));
    }

    /// Whether `name` in the folder with inode `folder`, as `meta` describes it now, is exactly
    /// what staging left there.
    pub(crate) fn unchanged(&self, folder: u64, name: &OsStr, meta: &fs::Metadata) -> bool {
        self.by_inode
            .get(&meta.ino())
            .is_some_and(|(f, n, fingerprint)| {
                *f == folder && n == name && *fingerprint == Fingerprint::of(meta)
            })
    }

    #[cfg(test)]
    pub(crate) fn len(&self) -> usize {
        self.by_inode.len()
    }
}

/// Totals of one staging.
#[derive(Debug, Default)]
pub(crate) struct Staged {
    pub(crate) files: u64,
    pub(crate) bytes: u64,
    pub(crate) snapshot: Snapshot,
    /// Entries not copied (FIFOs, sockets, devices), with why.
    pub(crate) skipped: Vec<String>,
}

/// A staging failure, with the path and what was being done.
#[derive(Debug, thiserror::Error)]
pub(crate) enum StageError {
    #[error("staging: {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("staging interrupted")]
    Interrupted,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StageError + 'a {
    move |source| StageError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// Copies `src` (a job folder) into `dst` (an existing, empty workspace). Checks `interrupt`
/// between entries so a runner told to stop at once does not finish a huge copy first.
pub(crate) fn stage(src: &Path, dst: &Path, interrupt: &AtomicBool) -> Result<Staged, StageError> {
    let mut staged = Staged::default();
    // Folders get their mode and times after their contents are written: writing changes a
    // folder's mtime, and a read-only source folder must stay writable until it is filled.
    let mut folders: Vec<(PathBuf, fs::Metadata)> = Vec::new();
    let root = fs::symlink_metadata(dst).map_err(io_err("inspecting", dst))?;
    let mut pending: Vec<(PathBuf, u64)> = vec![(PathBuf::new(), root.ino())];
    while let Some((rel, folder)) = pending.pop() {
        let from_dir = src.join(&rel);
        let entries = fs::read_dir(&from_dir).map_err(io_err("reading folder", &from_dir))?;
        for entry in entries {
            if interrupt.load(Ordering::Relaxed) {
                return Err(StageError::Interrupted);
            }
            let entry = entry.map_err(io_err("reading folder", &from_dir))?;
            let name = entry.file_name();
            if rel.as_os_str().is_empty() && name == RESULTS_DIR {
                continue;
            }
            let rel_path = rel.join(&name);
            let from = entry.path();
            let to = dst.join(&rel_path);
            let file_type = entry.file_type().map_err(io_err("inspecting", &from))?;
            if file_type.is_dir() {
                let meta = entry.metadata().map_err(io_err("inspecting", &from))?;
                fs::create_dir(&to).map_err(io_err("creating folder", &to))?;
                let made = fs::symlink_metadata(&to).map_err(io_err("inspecting", &to))?;
                folders.push((to, meta));
                pending.push((rel_path, made.ino()));
            } else if file_type.is_file() {
                let Some(meta) = copy_file(&from, &to)? else {
                    // Replaced by something else since the folder was listed.
                    staged.skipped.push(format!(
                        "skipped {}: it stopped being a regular file while it was staged",
                        rel_path.display()
                    ));
                    continue;
                };
                staged.files += 1;
                staged.bytes += meta.size();
                staged.snapshot.insert(folder, name, &meta);
            } else if file_type.is_symlink() {
                let target = fs::read_link(&from).map_err(io_err("reading link", &from))?;
                std::os::unix::fs::symlink(&target, &to).map_err(io_err("creating link", &to))?;
                let meta = entry.metadata().map_err(io_err("inspecting", &from))?;
                set_times_nofollow(&to, &meta).map_err(io_err("setting times of", &to))?;
                let meta = fs::symlink_metadata(&to).map_err(io_err("inspecting", &to))?;
                staged.files += 1;
                staged.snapshot.insert(folder, name, &meta);
            } else {
                staged.skipped.push(format!(
                    "skipped {} ({}): only files, folders and symlinks are staged",
                    rel_path.display(),
                    special_kind(file_type)
                ));
            }
        }
    }
    for (path, meta) in folders.iter().rev() {
        set_times_nofollow(path, meta).map_err(io_err("setting times of", path))?;
        fs::set_permissions(path, Permissions::from_mode(meta.mode() & KEPT_MODE_BITS))
            .map_err(io_err("setting mode of", path))?;
    }
    Ok(staged)
}

/// Copies one regular file, keeping mode and times; returns the copy's metadata, or `None`
/// when `from` is no longer a regular file.
fn copy_file(from: &Path, to: &Path) -> Result<Option<fs::Metadata>, StageError> {
    let Some((mut source, meta)) = open_regular(from).map_err(io_err("opening", from))? else {
        return Ok(None);
    };
    let mut target = create_copy(to).map_err(io_err("creating", to))?;
    io::copy(&mut source, &mut target).map_err(io_err("copying", from))?;
    finish_copy(&target, &meta).map_err(io_err("setting mode and times of", to))?;
    target
        .metadata()
        .map(Some)
        .map_err(io_err("inspecting", to))
}

/// Opens the source of a copy as it is now, staging or syncing: a tree a job can change while
/// it is copied. Opened without following a link and without blocking (a FIFO swapped in
/// would otherwise wait for a writer forever); `None` unless it is a regular file.
pub(crate) fn open_regular(from: &Path) -> io::Result<Option<(File, fs::Metadata)>> {
    let source = match OpenOptions::new()
        .read(true)
        .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
        .open(from)
    {
        Ok(source) => source,
        Err(e) if matches!(e.raw_os_error(), Some(nix::libc::ELOOP | nix::libc::ENXIO)) => {
            return Ok(None)
        }
        Err(e) => return Err(e),
    };
    let meta = source.metadata()?;
    Ok(meta.is_file().then_some((source, meta)))
}

/// Creates the target of a copy: a new file, never an existing one and never through a link,
/// readable by no one else until [`finish_copy`] gives it its source's mode.
pub(crate) fn create_copy(to: &Path) -> io::Result<File> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o600)
        .custom_flags(nix::libc::O_NOFOLLOW)
        .open(to)
}

/// Gives a freshly written copy the mode and times of its source.
pub(crate) fn finish_copy(target: &File, source: &fs::Metadata) -> io::Result<()> {
    target.set_permissions(Permissions::from_mode(source.mode() & KEPT_MODE_BITS))?;
    target.set_times(
        FileTimes::new()
            .set_accessed(source.accessed()?)
            .set_modified(source.modified()?),
    )
}

/// Sets atime and mtime of a path without following a final symlink.
fn set_times_nofollow(path: &Path, meta: &fs::Metadata) -> io::Result<()> {
    let atime = TimeSpec::new(meta.atime(), meta.atime_nsec());
    let mtime = TimeSpec::new(meta.mtime(), meta.mtime_nsec());
    utimensat(
        nix::fcntl::AT_FDCWD,
        path,
        &atime,
        &mtime,
        UtimensatFlags::NoFollowSymlink,
    )
    .map_err(io::Error::from)
}

fn special_kind(file_type: fs::FileType) -> &'static str {
    use std::os::unix::fs::FileTypeExt;
    if file_type.is_fifo() {
        "a FIFO"
    } else if file_type.is_socket() {
        "a socket"
    } else if file_type.is_char_device() {
        "a character device"
    } else if file_type.is_block_device() {
        "a block device"
    } else {
        "not a regular file"
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    #[test]
    fn copies_files_links_modes_and_times_but_not_results_or_fifos() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let s = src.path();
        fs::create_dir_all(s.join("a/b")).unwrap();
        fs::write(s.join("a/b/f.txt"), "hello").unwrap();
        fs::set_permissions(s.join("a/b/f.txt"), Permissions::from_mode(0o751)).unwrap();
        fs::create_dir(s.join("results")).unwrap();
        fs::write(s.join("results/old.log"), "stale").unwrap();
        fs::create_dir(s.join("ro")).unwrap();
        fs::write(s.join("ro/x"), "x").unwrap();
        fs::set_permissions(s.join("ro"), Permissions::from_mode(0o555)).unwrap();
        symlink("/etc/shadow", s.join("shadow")).unwrap();
        fs::create_dir(s.join("shared")).unwrap();
        fs::set_permissions(s.join("shared"), Permissions::from_mode(0o2775)).unwrap();
        fs::write(s.join("shared/tool"), "#!/bin/sh").unwrap();
        fs::set_permissions(s.join("shared/tool"), Permissions::from_mode(0o4755)).unwrap();
        nix::unistd::mkfifo(&s.join("fifo"), nix::sys::stat::Mode::S_IRWXU).unwrap();
        let old = std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1_000_000);
        File::options()
            .write(true)
            .open(s.join("a/b/f.txt"))
            .unwrap()
            .set_modified(old)
            .unwrap();

        let staged = stage(s, dst.path(), &AtomicBool::new(false)).unwrap();
        let d = dst.path();
        assert_eq!(fs::read_to_string(d.join("a/b/f.txt")).unwrap(), "hello");
        let meta = fs::metadata(d.join("a/b/f.txt")).unwrap();
        assert_eq!(meta.mode() & 0o7777, 0o751);
        assert_eq!(meta.modified().unwrap(), old);
        assert_eq!(
            fs::read_link(d.join("shadow")).unwrap(),
            Path::new("/etc/shadow")
        );
        assert!(!d.join("results").exists());
        assert!(!d.join("fifo").exists());
        assert_eq!(fs::metadata(d.join("ro")).unwrap().mode() & 0o777, 0o555);
        assert_eq!(
            fs::metadata(d.join("shared")).unwrap().mode() & 0o7777,
            0o775
        );
        assert_eq!(
            fs::metadata(d.join("shared/tool")).unwrap().mode() & 0o7777,
            0o755
        );
        assert_eq!(staged.files, 4);
        assert_eq!(staged.bytes, 15);
        assert_eq!(staged.skipped.len(), 1);
        assert!(staged.skipped[0].contains("fifo"), "{:?}", staged.skipped);
        assert_eq!(staged.snapshot.len(), 4);
        fs::set_permissions(s.join("ro"), Permissions::from_mode(0o755)).unwrap();
        fs::set_permissions(d.join("ro"), Permissions::from_mode(0o755)).unwrap();
    }

    #[test]
    fn interrupt_stops_staging() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("f"), "x").unwrap();
        let dst = tempfile::tempdir().unwrap();
        let err = stage(src.path(), dst.path(), &AtomicBool::new(true)).unwrap_err();
        assert!(matches!(err, StageError::Interrupted));
    }
}
