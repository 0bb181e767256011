//! Staging: copying a job folder into the private workspace (contract §4.1), and remembering what
//! was staged so that [`crate::sync`] can tell which files the steps created or changed.
//!
//! The job folder is read with the share user's rights and the copy made with the job
//! identity's ([`Rights`]), so the workspace is the job's own. The copy runs in two passes,
//! each with up to `--share-parallelism` calls in flight ([`crate::pool`]), since on a network
//! share every call waits for the server: first the folders are listed (each listing on a
//! thread of its own, so walks of different folders do not wait on each other) and created in
//! the workspace; then, once it is known that the copy fits on the workspaces drive, the files
//! are copied. Regular files are read and written through a buffer (an in-kernel copy between
//! two drives fails and costs a call of its own on a share). Modes and mtimes are kept; symlinks are recreated verbatim and never followed; FIFOs,
//! sockets and devices are skipped and reported. The worker's own `results/` and earlier
//! runs' `results.N` at the top are not staged.

use std::collections::HashMap;
use std::ffi::{OsStr, OsString};
use std::fs::{self, File, FileTimes, OpenOptions, Permissions};
use std::io;
use std::os::unix::fs::{MetadataExt, OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nats_fs::folder::is_results_name;
use nix::sys::stat::{utimensat, UtimensatFlags};
use nix::sys::time::TimeSpec;

use crate::pool;
use crate::rights::Rights;

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
pub(crate) const KEPT_MODE_BITS: u32 = 0o1777;

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
    /// The copy does not fit on the workspaces drive with the reserve to spare.
    #[error("the job folder's copy does not fit")]
    NoRoom { free: u64, needed: u64 },
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StageError + 'a {
    move |source| StageError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// How a staging goes: where from and to, with whose rights, how many calls at once.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan<'a> {
    /// The job folder (a `/proc/self/fd/N` path).
    pub(crate) from: &'a Path,
    /// The workspace: an existing, empty folder.
    pub(crate) to: &'a Path,
    pub(crate) rights: Rights,
    pub(crate) parallelism: usize,
    /// Bytes to keep free on the workspace's drive besides the copy.
    pub(crate) reserve: u64,
    /// Checked between calls: a runner told to stop at once does not finish a huge copy.
    pub(crate) interrupt: &'a AtomicBool,
}

/// A folder to list: its path relative to the job folder, and the inode of its copy.
struct Folder {
    rel: PathBuf,
    copy_ino: u64,
}

/// What a listing found to copy once the folders are made.
enum Entry {
    File {
        rel: PathBuf,
        folder: u64,
        name: OsString,
        /// As the listing found it: the size for the room check, the mode and times for the
        /// copy.
        meta: fs::Metadata,
    },
    Link {
        rel: PathBuf,
        folder: u64,
        name: OsString,
        meta: fs::Metadata,
    },
}

/// What the listing pass collects.
#[derive(Default)]
struct Listed {
    entries: Vec<Entry>,
    /// Folders made in the workspace, with their source's metadata, for their modes and times.
    folders: Vec<(PathBuf, fs::Metadata)>,
    skipped: Vec<String>,
}

/// Copies the job folder into the workspace (see the module docs).
pub(crate) fn stage(plan: &Plan<'_>) -> Result<Staged, StageError> {
    let root = plan
        .rights
        .as_job(|| fs::symlink_metadata(plan.to))
        .map_err(io_err("inspecting", plan.to))?;
    let listed = Mutex::new(Listed::default());
    let first = vec![Folder {
        rel: PathBuf::new(),
        copy_ino: root.ino(),
    }];
    pool::run(plan.parallelism, first, |folder, tasks| {
        list(plan, &folder, &listed, |next| tasks.push(next))
    })?;
    let listed = listed
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    let needed: u64 = listed
        .entries
        .iter()
        .map(|e| match e {
            Entry::File { meta, .. } => meta.size(),
            Entry::Link { .. } => 0,
        })
        .sum();
    let free = nats_fs::tree::free_space(plan.to)
        .map_err(io_err("checking the free space of", plan.to))?;
    if free < needed.saturating_add(plan.reserve) {
        return Err(StageError::NoRoom { free, needed });
    }
    let staged = Mutex::new(Staged {
        skipped: listed.skipped,
        ..Staged::default()
    });
    pool::run(plan.parallelism, listed.entries, |entry, _| {
        copy_entry(plan, entry, &staged)
    })?;
    // Folders get their mode and times once their contents are written: writing changes a
    // folder's mtime, and a read-only folder must stay writable until it is filled. Deepest
    // first, so that a folder closed to its owner is closed last.
    let mut folders = listed.folders;
    folders.sort_by_key(|(path, _)| std::cmp::Reverse(path.components().count()));
    plan.rights.as_job(|| {
        for (path, meta) in &folders {
            set_times_nofollow(path, meta).map_err(io_err("setting times of", path))?;
            fs::set_permissions(path, Permissions::from_mode(meta.mode() & KEPT_MODE_BITS))
                .map_err(io_err("setting mode of", path))?;
        }
        Ok::<(), StageError>(())
    })?;
    Ok(staged
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner))
}

/// Lists one folder of the job folder: makes its subfolders in the workspace (and hands them to
/// `more`), and notes its files and links.
fn list(
    plan: &Plan<'_>,
    folder: &Folder,
    listed: &Mutex<Listed>,
    more: impl Fn(Folder),
) -> Result<(), StageError> {
    let from_dir = plan.from.join(&folder.rel);
    let entries: Vec<(OsString, fs::Metadata)> = plan.rights.on_share(|| {
        let mut entries = Vec::new();
        for entry in fs::read_dir(&from_dir).map_err(io_err("reading folder", &from_dir))? {
            if plan.interrupt.load(Ordering::Relaxed) {
                return Err(StageError::Interrupted);
            }
            let entry = entry.map_err(io_err("reading folder", &from_dir))?;
            let name = entry.file_name();
            if folder.rel.as_os_str().is_empty() && is_results_name(&name) {
                continue;
            }
            // Not following a symlink.
            match entry.metadata() {
                Ok(meta) => entries.push((name, meta)),
                // Gone since the folder was listed.
                Err(e) if e.kind() == io::ErrorKind::NotFound => {}
                Err(e) => return Err(io_err("inspecting", &entry.path())(e)),
            }
        }
        Ok(entries)
    })?;
    let mut found = Listed::default();
    for (name, meta) in entries {
        let rel = folder.rel.join(&name);
        let file_type = meta.file_type();
        if file_type.is_dir() {
            let to = plan.to.join(&rel);
            let made = plan.rights.as_job(|| {
                fs::create_dir(&to)?;
                fs::symlink_metadata(&to)
            });
            let made = made.map_err(io_err("creating folder", &to))?;
            found.folders.push((to, meta));
            more(Folder {
                rel,
                copy_ino: made.ino(),
            });
        } else if file_type.is_file() {
            found.entries.push(Entry::File {
                rel,
                folder: folder.copy_ino,
                name,
                meta,
            });
        } else if file_type.is_symlink() {
            found.entries.push(Entry::Link {
                rel,
                folder: folder.copy_ino,
                name,
                meta,
            });
        } else {
            found.skipped.push(format!(
                "skipped {} ({}): only files, folders and symlinks are staged",
                rel.display(),
                special_kind(file_type)
            ));
        }
    }
    let mut listed = listed
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    listed.entries.append(&mut found.entries);
    listed.folders.append(&mut found.folders);
    listed.skipped.append(&mut found.skipped);
    Ok(())
}

/// Copies one file or link into the workspace and records it in the snapshot.
fn copy_entry(plan: &Plan<'_>, entry: Entry, staged: &Mutex<Staged>) -> Result<(), StageError> {
    if plan.interrupt.load(Ordering::Relaxed) {
        return Err(StageError::Interrupted);
    }
    match entry {
        Entry::File {
            rel,
            folder,
            name,
            meta,
        } => {
            let from = plan.from.join(&rel);
            let to = plan.to.join(&rel);
            let Some(copy) = copy_file(plan.rights, &from, &to, &meta)? else {
                // Replaced by something else since the folder was listed.
                lock(staged).skipped.push(format!(
                    "skipped {}: it stopped being a regular file while it was staged",
                    rel.display()
                ));
                return Ok(());
            };
            let mut staged = lock(staged);
            staged.files += 1;
            staged.bytes += copy.size();
            staged.snapshot.insert(folder, name, &copy);
        }
        Entry::Link {
            rel,
            folder,
            name,
            meta,
        } => {
            let from = plan.from.join(&rel);
            let to = plan.to.join(&rel);
            let target = plan
                .rights
                .on_share(|| fs::read_link(&from))
                .map_err(io_err("reading link", &from))?;
            let copy = plan.rights.as_job(|| {
                std::os::unix::fs::symlink(&target, &to).map_err(io_err("creating link", &to))?;
                set_times_nofollow(&to, &meta).map_err(io_err("setting times of", &to))?;
                fs::symlink_metadata(&to).map_err(io_err("inspecting", &to))
            })?;
            let mut staged = lock(staged);
            staged.files += 1;
            staged.snapshot.insert(folder, name, &copy);
        }
    }
    Ok(())
}

fn lock(staged: &Mutex<Staged>) -> std::sync::MutexGuard<'_, Staged> {
    staged
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// Copies one regular file, keeping mode and times (`meta`, as the listing found it): opened
/// on the share, created in the workspace. Returns the copy's metadata, or `None` when `from`
/// is no longer there or no longer a regular file.
///
/// Every call on a network share is a round trip, so this makes as few as it can: the file is
/// opened (without following a link, without blocking on a FIFO swapped in), read to its end
/// and closed; no `fstat` of it (the listing's is used), no attempt at an in-kernel copy
/// between two drives, which fails and costs a call of its own. What is read is the file as
/// it is when read: a folder swapped in fails the read, anything else that is not a regular
/// file reads as empty.
fn copy_file(
    rights: Rights,
    from: &Path,
    to: &Path,
    meta: &fs::Metadata,
) -> Result<Option<fs::Metadata>, StageError> {
    let opened = rights.on_share(|| {
        OpenOptions::new()
            .read(true)
            .custom_flags(nix::libc::O_NOFOLLOW | nix::libc::O_NONBLOCK | nix::libc::O_NOCTTY)
            .open(from)
    });
    let mut source = match opened {
        Ok(source) => source,
        Err(e)
            if e.kind() == io::ErrorKind::NotFound
                || matches!(e.raw_os_error(), Some(nix::libc::ELOOP | nix::libc::ENXIO)) =>
        {
            return Ok(None)
        }
        Err(e) => return Err(io_err("opening", from)(e)),
    };
    let mut target = rights
        .as_job(|| create_copy(to))
        .map_err(io_err("creating", to))?;
    copy_through(&mut source, &mut target, meta.size()).map_err(|e| match e {
        Copy::Read(e) => io_err("reading", from)(e),
        Copy::Write(e) => io_err("writing", to)(e),
    })?;
    drop(source);
    finish_copy(&target, meta).map_err(io_err("setting mode and times of", to))?;
    target
        .metadata()
        .map(Some)
        .map_err(io_err("inspecting", to))
}

/// Which side of a copy failed.
enum Copy {
    Read(io::Error),
    Write(io::Error),
}

thread_local! {
    static BUFFER: std::cell::RefCell<Vec<u8>> = const { std::cell::RefCell::new(Vec::new()) };
}

/// Copies `source` to `target` through this thread's buffer (up to 1 MiB; a file of `size`
/// bytes or less is read in one call and its end found in the next).
fn copy_through(source: &mut File, target: &mut File, size: u64) -> Result<(), Copy> {
    use std::io::{Read, Write};
    BUFFER.with_borrow_mut(|buf| {
        let want = usize::try_from(size.saturating_add(1)).unwrap_or(usize::MAX);
        let len = want.clamp(64 << 10, 1 << 20);
        if buf.len() < len {
            buf.resize(len, 0);
        }
        loop {
            let n = match source.read(&mut buf[..len]) {
                Ok(0) => return Ok(()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(Copy::Read(e)),
            };
            target.write_all(&buf[..n]).map_err(Copy::Write)?;
        }
    })
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
pub(crate) mod tests {
    use super::*;
    use std::os::unix::fs::symlink;

    /// Stages `src` into `dst` as this process, several calls at once.
    pub(crate) fn stage_here(
        src: &Path,
        dst: &Path,
        interrupt: bool,
    ) -> Result<Staged, StageError> {
        stage(&Plan {
            from: src,
            to: dst,
            rights: Rights::default(),
            parallelism: 4,
            reserve: 0,
            interrupt: &AtomicBool::new(interrupt),
        })
    }

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
        fs::create_dir(s.join("results.2")).unwrap();
        fs::write(s.join("results.2/older.log"), "staler").unwrap();
        fs::create_dir(s.join("results.x")).unwrap();
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

        let staged = stage_here(s, dst.path(), false).unwrap();
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
        assert!(!d.join("results.2").exists());
        assert!(d.join("results.x").is_dir(), "not a name of the worker's");
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
    fn a_wide_and_deep_tree_is_copied_whole() {
        let src = tempfile::tempdir().unwrap();
        let dst = tempfile::tempdir().unwrap();
        let mut expected = 0;
        for a in 0..8 {
            for b in 0..5 {
                let dir = src.path().join(format!("d{a}/e{b}"));
                fs::create_dir_all(&dir).unwrap();
                for f in 0..7 {
                    fs::write(dir.join(format!("f{f}")), format!("{a}{b}{f}")).unwrap();
                    expected += 1;
                }
            }
        }
        let staged = stage_here(src.path(), dst.path(), false).unwrap();
        assert_eq!(staged.files, expected);
        assert_eq!(
            fs::read_to_string(dst.path().join("d7/e4/f6")).unwrap(),
            "746"
        );
        assert_eq!(nats_fs::tree::bytes_in(dst.path(), None), 3 * expected);
    }

    #[test]
    fn interrupt_stops_staging() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("f"), "x").unwrap();
        let dst = tempfile::tempdir().unwrap();
        let err = stage_here(src.path(), dst.path(), true).unwrap_err();
        assert!(matches!(err, StageError::Interrupted));
    }

    #[test]
    fn a_copy_that_does_not_fit_is_refused_before_any_file_is_copied() {
        let src = tempfile::tempdir().unwrap();
        fs::write(src.path().join("f"), "x").unwrap();
        let dst = tempfile::tempdir().unwrap();
        let err = stage(&Plan {
            from: src.path(),
            to: dst.path(),
            rights: Rights::default(),
            parallelism: 4,
            reserve: u64::MAX / 2,
            interrupt: &AtomicBool::new(false),
        })
        .unwrap_err();
        assert!(
            matches!(err, StageError::NoRoom { needed: 1, .. }),
            "{err:?}"
        );
        assert!(!dst.path().join("f").exists());
    }
}
