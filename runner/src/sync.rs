//! Syncing artifacts (contract §4.4): every file or symlink in the workspace that differs from its
//! staged [`Fingerprint`](crate::stage::Fingerprint) (or was not staged at all), and everything
//! the steps put in their own results folder (`$JOB_RESULTS_DIR`), is copied to
//! `results/<same path>`, with its size and SHA-256 recorded for the manifest. Unchanged inputs
//! stay where they are.
//!
//! Three passes. The workspace and the steps' results folder are walked with the job
//! identity's rights (what cannot be read as the job is not copied, so a step cannot make the
//! runner read anything for it), which decides what to copy and what the output quota leaves
//! out. Then the folders those files need are made in `results/`, and the files copied, with
//! the share user's rights and up to `--share-parallelism` calls in flight. `results/` is new
//! for this run (contract §4.3): nothing in it is replaced but what the run wrote itself, and
//! an artifact whose name is one of the run's own files there (a step's log, `result.json`)
//! is not copied. Symlinks are recreated as links and never followed, and files are created
//! without following a link.
//!
//! Under an output quota, a file that would pass what is left of it is not copied (a copy that
//! grows past its share is removed), and a copy that fills the drive is removed and ends the
//! sync: no partial artifact stays in `results/` ([`crate::output`] says what counts).

use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, Read, Write};
use std::os::unix::fs::{DirBuilderExt, MetadataExt};
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;

use nats_fs::manifest::Artifact;
use sha2::{Digest, Sha256};

use crate::output::is_no_space;
use crate::pool;
use crate::rights::Rights;
use crate::stage::{create_copy, open_regular, Snapshot};

/// The buffer each copying thread hashes through.
const COPY_BUFFER: usize = 128 * 1024;
/// The mode bits an artifact keeps: its owner's, and read and execute for others; never write
/// for group or others (nobody but the share user changes a job's results), setuid or setgid.
const RESULTS_MODE_BITS: u32 = 0o1755;

/// What one sync copied.
#[derive(Debug, Default)]
pub(crate) struct Synced {
    pub(crate) artifacts: Vec<Artifact>,
    pub(crate) bytes: u64,
    /// Entries that could not be synced and did not fail the job (a FIFO a step made, a file
    /// a step made unreadable, a name that is the run's own), with why.
    pub(crate) skipped: Vec<String>,
    /// Files not copied because they would pass the output quota: path and size.
    pub(crate) refused: Vec<(String, u64)>,
    /// The file whose copy found the drive full; syncing stopped there.
    pub(crate) no_space: Option<String>,
}

/// A sync failure: writing to `results/` failed, which is a fault of the host or drive.
#[derive(Debug, thiserror::Error)]
pub(crate) enum SyncError {
    #[error("syncing artifacts: {action} {path}: {source}")]
    Io {
        action: &'static str,
        path: PathBuf,
        source: io::Error,
    },
    #[error("syncing interrupted")]
    Interrupted,
}

fn io_err<'a>(action: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> SyncError + 'a {
    move |source| SyncError::Io {
        action,
        path: path.to_owned(),
        source,
    }
}

/// What to sync, from where to where, with whose rights.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Plan<'a> {
    pub(crate) workspace: &'a Path,
    /// The steps' own results folder (`$JOB_RESULTS_DIR`): all of it is copied.
    pub(crate) outputs: Option<&'a Path>,
    /// `results/` (a `/proc/self/fd/N` path).
    pub(crate) results: &'a Path,
    /// Names at the top of `results/` that are the run's own (its logs, the manifest).
    pub(crate) reserved: &'a BTreeSet<String>,
    pub(crate) staged: &'a Snapshot,
    pub(crate) rights: Rights,
    pub(crate) parallelism: usize,
    pub(crate) interrupt: &'a AtomicBool,
    /// What is left of the output quota, if there is one.
    pub(crate) quota_left: Option<u64>,
}

/// One entry to copy.
#[derive(Debug)]
struct Change {
    /// Where it is now.
    from: PathBuf,
    /// Its path below `results/`.
    rel: PathBuf,
    link: bool,
    /// The most bytes its copy may have (what the quota left it).
    max: u64,
}

/// Copies what the steps created or modified, and what they put in their results folder,
/// to `results/` (see the module docs).
pub(crate) fn sync(plan: &Plan<'_>) -> Result<Synced, SyncError> {
    let mut synced = Synced::default();
    let mut found = BTreeMap::new();
    plan.rights.as_job(|| -> Result<(), SyncError> {
        if let Some(outputs) = plan.outputs {
            walk(plan, outputs, None, &mut found, &mut synced)?;
        }
        walk(
            plan,
            plan.workspace,
            Some(plan.staged),
            &mut found,
            &mut synced,
        )
    })?;
    // In path order, so that what the quota leaves out does not depend on the walk.
    let mut changes = Vec::with_capacity(found.len());
    let mut left = plan.quota_left;
    for (rel, (from, meta)) in found {
        let rel: PathBuf = rel;
        let meta: fs::Metadata = meta;
        let link = meta.file_type().is_symlink();
        let max = match &mut left {
            Some(left) if !link => {
                if meta.len() > *left {
                    synced.refused.push((display(&rel), meta.len()));
                    continue;
                }
                *left -= meta.len();
                meta.len()
            }
            _ => u64::MAX,
        };
        changes.push(Change {
            from,
            rel,
            link,
            max,
        });
    }
    make_folders(plan, &changes)?;
    let done = Mutex::new(synced);
    let outcome = pool::run(plan.parallelism, changes, |change, _| {
        copy_change(plan, &change, &done)
    });
    let mut synced = done
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    match outcome {
        Ok(()) | Err(Stop::NoSpace) => {}
        Err(Stop::Failed(e)) => return Err(e),
    }
    synced.artifacts.sort_by(|a, b| a.path.cmp(&b.path));
    synced.refused.sort();
    Ok(synced)
}

/// Walks `root`, adding to `found` (by path below `root`) what is to be copied: with a
/// `staged` snapshot, what differs from it; without one, everything. A path already found
/// (in the steps' results folder) is not taken again from the workspace.
fn walk(
    plan: &Plan<'_>,
    root: &Path,
    staged: Option<&Snapshot>,
    found: &mut BTreeMap<PathBuf, (PathBuf, fs::Metadata)>,
    synced: &mut Synced,
) -> Result<(), SyncError> {
    let top = fs::symlink_metadata(root).map_err(io_err("inspecting", root))?;
    let mut pending = vec![(PathBuf::new(), top.ino())];
    while let Some((rel, folder)) = pending.pop() {
        let dir = root.join(&rel);
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) => {
                // The steps own the workspace; a folder they locked is their choice, not a fault.
                synced
                    .skipped
                    .push(format!("not synced {}: {e}", display(&rel)));
                continue;
            }
        };
        for entry in entries {
            if plan.interrupt.load(Ordering::Relaxed) {
                return Err(SyncError::Interrupted);
            }
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            let file_type = meta.file_type();
            let name = entry.file_name();
            // The common case, an input the steps left alone, is settled without building or
            // hashing its path: this walk visits every file of the workspace.
            if !file_type.is_dir() && staged.is_some_and(|s| s.unchanged(folder, &name, &meta)) {
                continue;
            }
            let rel_path = rel.join(&name);
            if rel.as_os_str().is_empty()
                && name.to_str().is_some_and(|n| plan.reserved.contains(n))
            {
                synced.skipped.push(format!(
                    "not synced {}: results/{} is the run's own",
                    display(&rel_path),
                    display(&rel_path)
                ));
                continue;
            }
            if file_type.is_dir() {
                pending.push((rel_path, meta.ino()));
                continue;
            }
            if !(file_type.is_file() || file_type.is_symlink()) {
                synced.skipped.push(format!(
                    "not synced {}: not a file, folder or symlink",
                    display(&rel_path)
                ));
                continue;
            }
            if staged.is_some() && found.contains_key(&rel_path) {
                synced.skipped.push(format!(
                    "not synced {} from the workspace: the one in $JOB_RESULTS_DIR is",
                    display(&rel_path)
                ));
                continue;
            }
            found.insert(rel_path, (entry.path(), meta));
        }
    }
    Ok(())
}

/// Makes the folders of `results/` that the changes need, parents first, as the share user.
/// `results/` is new for this run, so a folder found there is one this sync made.
fn make_folders(plan: &Plan<'_>, changes: &[Change]) -> Result<(), SyncError> {
    let mut folders = BTreeSet::new();
    for change in changes {
        let mut at = PathBuf::new();
        let mut components = change.rel.components().peekable();
        while let Some(component) = components.next() {
            let Component::Normal(name) = component else {
                // Paths come from read_dir, so this cannot happen; refuse rather than escape.
                return Err(io_err("refusing path", &change.rel)(io::Error::from(
                    io::ErrorKind::InvalidInput,
                )));
            };
            if components.peek().is_none() {
                break;
            }
            at.push(name);
            folders.insert((at.components().count(), at.clone()));
        }
    }
    let mut by_depth: BTreeMap<usize, Vec<PathBuf>> = BTreeMap::new();
    for (depth, folder) in folders {
        by_depth.entry(depth).or_default().push(folder);
    }
    for (_, level) in by_depth {
        pool::run(plan.parallelism, level, |rel, _| {
            let path = plan.results.join(&rel);
            plan.rights
                .on_share(|| match fs::DirBuilder::new().mode(0o755).create(&path) {
                    Ok(()) => Ok(()),
                    // Made by this sync already, if it is a real folder.
                    Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                        match fs::symlink_metadata(&path) {
                            Ok(meta) if meta.is_dir() => Ok(()),
                            _ => Err(io_err("creating folder", &path)(e)),
                        }
                    }
                    Err(e) => Err(io_err("creating folder", &path)(e)),
                })
        })?;
    }
    Ok(())
}

/// Why the copying pass stopped early.
enum Stop {
    /// The drive filled up: what was copied stays, the rest is not copied.
    NoSpace,
    Failed(SyncError),
}

impl From<SyncError> for Stop {
    fn from(e: SyncError) -> Self {
        Self::Failed(e)
    }
}

/// Copies one change into `results/` and records it.
fn copy_change(plan: &Plan<'_>, change: &Change, synced: &Mutex<Synced>) -> Result<(), Stop> {
    if plan.interrupt.load(Ordering::Relaxed) {
        return Err(SyncError::Interrupted.into());
    }
    let to = plan.results.join(&change.rel);
    let path = display(&change.rel);
    let lock = || {
        synced
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    };
    if change.link {
        let target = match plan.rights.as_job(|| fs::read_link(&change.from)) {
            Ok(target) => target,
            Err(e) => {
                lock().skipped.push(format!("not synced {path}: {e}"));
                return Ok(());
            }
        };
        match plan
            .rights
            .on_share(|| std::os::unix::fs::symlink(&target, &to))
        {
            Ok(()) => {}
            Err(e) if is_no_space(&e) => {
                lock().no_space.get_or_insert(path);
                return Err(Stop::NoSpace);
            }
            Err(e) if is_unsupported(&e) => {
                lock().skipped.push(format!(
                    "not synced {path}: the drive holding results/ cannot hold a symlink ({e})"
                ));
                return Ok(());
            }
            Err(e) => return Err(io_err("creating link", &to)(e).into()),
        }
        lock().artifacts.push(Artifact {
            path,
            size: 0,
            sha256: None,
            link: Some(target.to_string_lossy().into_owned()),
        });
        return Ok(());
    }
    let copied = copy_hashed(plan.rights, &change.from, &to, change.max);
    let remove = || {
        let _ = plan.rights.on_share(|| fs::remove_file(&to));
    };
    match copied {
        Ok(copied) => {
            let mut synced = lock();
            if let Some(problem) = copied.unkept {
                synced.skipped.push(format!(
                    "{path}: its mode and times could not be kept on the drive holding results/ ({problem})"
                ));
            }
            synced.bytes += copied.size;
            synced.artifacts.push(Artifact {
                path,
                size: copied.size,
                sha256: Some(copied.sha256),
                link: None,
            });
            Ok(())
        }
        Err(CopyError::Read(e)) => {
            remove();
            lock().skipped.push(format!("not synced {path}: {e}"));
            Ok(())
        }
        Err(CopyError::TooBig(size)) => {
            remove();
            lock().refused.push((path, size));
            Ok(())
        }
        Err(CopyError::Write(e)) => {
            remove();
            if is_no_space(&e) {
                lock().no_space.get_or_insert(path);
                return Err(Stop::NoSpace);
            }
            Err(io_err("writing", &to)(e).into())
        }
    }
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
    /// The file grew past `max` while being copied; how far it got.
    TooBig(u64),
}

/// A file copied and hashed.
struct Copied {
    size: u64,
    sha256: String,
    /// Why the copy could not be given its source's mode and times, if it could not.
    unkept: Option<io::Error>,
}

thread_local! {
    static BUFFER: RefCell<Vec<u8>> = const { RefCell::new(Vec::new()) };
}

/// Copies one file while hashing it: one pass over the data, memory bounded by the buffer.
/// The source is opened as the job, the copy created as the share user. A file longer than
/// `max` bytes is not copied whole ([`CopyError::TooBig`]).
fn copy_hashed(rights: Rights, from: &Path, to: &Path, max: u64) -> Result<Copied, CopyError> {
    let (mut source, meta) = rights
        .as_job(|| open_regular(from))
        .map_err(CopyError::Read)?
        .ok_or_else(|| CopyError::Read(io::Error::other("not a regular file")))?;
    let mut target = rights
        .on_share(|| create_copy(to))
        .map_err(CopyError::Write)?;
    let (size, sha256) = BUFFER.with_borrow_mut(|buf| {
        buf.resize(COPY_BUFFER, 0);
        hash_through(&mut source, &mut target, buf, max)
    })?;
    let unkept = rights
        .on_share(|| keep_mode_and_times(&target, &meta))
        .err();
    Ok(Copied {
        size,
        sha256,
        unkept,
    })
}

fn hash_through(
    source: &mut File,
    target: &mut File,
    buf: &mut [u8],
    max: u64,
) -> Result<(u64, String), CopyError> {
    let mut hasher = Sha256::new();
    let mut size = 0u64;
    loop {
        let n = match source.read(buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(CopyError::Read(e)),
        };
        size += n as u64;
        if size > max {
            return Err(CopyError::TooBig(size));
        }
        hasher.update(&buf[..n]);
        target.write_all(&buf[..n]).map_err(CopyError::Write)?;
    }
    Ok((size, base16ct::lower::encode_string(&hasher.finalize())))
}

/// Gives a copy on the share its source's mode (less group and other write) and times. A share
/// may not keep them (SMB
/// without Unix extensions answers with an error, or ignores them): the artifact is there all
/// the same.
fn keep_mode_and_times(target: &File, source: &fs::Metadata) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    target.set_permissions(fs::Permissions::from_mode(
        source.mode() & RESULTS_MODE_BITS,
    ))?;
    target.set_times(
        fs::FileTimes::new()
            .set_accessed(source.accessed()?)
            .set_modified(source.modified()?),
    )
}

/// Whether an error says the drive does not do this at all (symlinks on SMB without Unix
/// extensions, say).
fn is_unsupported(e: &io::Error) -> bool {
    matches!(
        e.raw_os_error(),
        Some(nix::libc::EPERM | nix::libc::EOPNOTSUPP | nix::libc::ENOSYS)
    )
}

fn display(rel: &Path) -> String {
    rel.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::tests::stage_here;

    /// Syncs `ws` (and `outputs`) into `results` with the run's own names `reserved`, nothing
    /// interrupting it.
    fn sync_into(
        ws: &Path,
        outputs: Option<&Path>,
        results: &Path,
        reserved: &[&str],
        staged: &Snapshot,
        quota_left: Option<u64>,
    ) -> Result<Synced, SyncError> {
        let reserved = reserved.iter().map(ToString::to_string).collect();
        sync(&Plan {
            workspace: ws,
            outputs,
            results,
            reserved: &reserved,
            staged,
            rights: Rights::default(),
            parallelism: 4,
            interrupt: &AtomicBool::new(false),
            quota_left,
        })
    }

    #[test]
    fn only_new_and_changed_files_are_synced() {
        let src = tempfile::tempdir().unwrap();
        fs::create_dir(src.path().join("in")).unwrap();
        fs::write(src.path().join("in/keep"), "same").unwrap();
        fs::write(src.path().join("in/edit"), "old").unwrap();
        fs::write(src.path().join("in/moved"), "moved").unwrap();
        fs::write(src.path().join("in/renamed"), "renamed").unwrap();
        let ws = tempfile::tempdir().unwrap();
        let results = tempfile::tempdir().unwrap();
        let staged = stage_here(src.path(), ws.path(), false).unwrap();

        fs::write(ws.path().join("in/edit"), "new!").unwrap();
        // Moves keep the inode (and, within one clock tick, even the ctime): still new files.
        fs::create_dir(ws.path().join("elsewhere")).unwrap();
        fs::rename(
            ws.path().join("in/moved"),
            ws.path().join("elsewhere/moved"),
        )
        .unwrap();
        fs::rename(ws.path().join("in/renamed"), ws.path().join("in/renamed2")).unwrap();
        fs::create_dir_all(ws.path().join("out/deep")).unwrap();
        fs::write(ws.path().join("out/deep/a.txt"), "abc").unwrap();
        std::os::unix::fs::symlink("/etc/shadow", ws.path().join("out/shadow")).unwrap();

        let synced =
            sync_into(ws.path(), None, results.path(), &[], &staged.snapshot, None).unwrap();
        let paths: Vec<_> = synced.artifacts.iter().map(|a| a.path.as_str()).collect();
        assert_eq!(
            paths,
            [
                "elsewhere/moved",
                "in/edit",
                "in/renamed2",
                "out/deep/a.txt",
                "out/shadow"
            ]
        );
        assert_eq!(
            synced.artifacts[3].sha256.as_deref(),
            Some("ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad")
        );
        assert_eq!(synced.artifacts[4].link.as_deref(), Some("/etc/shadow"));
        assert!(!results.path().join("in/keep").exists());
        assert_eq!(
            fs::read_to_string(results.path().join("in/edit")).unwrap(),
            "new!"
        );
        assert_eq!(
            fs::read_link(results.path().join("out/shadow")).unwrap(),
            Path::new("/etc/shadow")
        );
        assert_eq!(synced.bytes, 7 + 5 + 7);
    }

    #[test]
    fn the_steps_results_folder_is_copied_whole_and_the_runs_own_names_are_kept() {
        let ws = tempfile::tempdir().unwrap();
        let outputs = tempfile::tempdir().unwrap();
        let results = tempfile::tempdir().unwrap();
        fs::write(results.path().join("step_0.log"), "the log\n").unwrap();
        fs::write(ws.path().join("step_0.log"), "an artifact by that name").unwrap();
        fs::write(ws.path().join("both"), "from the workspace").unwrap();
        fs::create_dir(outputs.path().join("report")).unwrap();
        fs::write(outputs.path().join("report/index.html"), "<p>").unwrap();
        fs::write(outputs.path().join("both"), "from JOB_RESULTS_DIR").unwrap();
        fs::write(outputs.path().join("result.json"), "{}").unwrap();
        let synced = sync_into(
            ws.path(),
            Some(outputs.path()),
            results.path(),
            &["step_0.log", "result.json"],
            &Snapshot::default(),
            None,
        )
        .unwrap();
        let paths: Vec<_> = synced.artifacts.iter().map(|a| a.path.as_str()).collect();
        assert_eq!(paths, ["both", "report/index.html"]);
        assert_eq!(
            fs::read_to_string(results.path().join("both")).unwrap(),
            "from JOB_RESULTS_DIR"
        );
        assert_eq!(
            fs::read_to_string(results.path().join("step_0.log")).unwrap(),
            "the log\n"
        );
        assert!(!results.path().join("result.json").exists());
        assert_eq!(synced.skipped.len(), 3, "{:?}", synced.skipped);
    }

    #[test]
    fn a_file_over_the_quota_is_not_copied_and_others_are() {
        let ws = tempfile::tempdir().unwrap();
        let results = tempfile::tempdir().unwrap();
        fs::write(ws.path().join("big.bin"), vec![0u8; 5000]).unwrap();
        fs::write(ws.path().join("small.txt"), "ok").unwrap();
        let synced = sync_into(
            ws.path(),
            None,
            results.path(),
            &[],
            &Snapshot::default(),
            Some(1000),
        )
        .unwrap();
        assert_eq!(synced.refused, [("big.bin".to_owned(), 5000)]);
        assert_eq!(synced.artifacts.len(), 1);
        assert!(!results.path().join("big.bin").exists());
        assert!(results.path().join("small.txt").exists());
    }

    #[test]
    fn many_files_in_many_folders_arrive_whole() {
        let ws = tempfile::tempdir().unwrap();
        let results = tempfile::tempdir().unwrap();
        for d in 0..10 {
            fs::create_dir_all(ws.path().join(format!("a{d}/b"))).unwrap();
            for f in 0..20 {
                fs::write(ws.path().join(format!("a{d}/b/f{f}")), format!("{d}.{f}")).unwrap();
            }
        }
        let synced = sync_into(
            ws.path(),
            None,
            results.path(),
            &[],
            &Snapshot::default(),
            None,
        )
        .unwrap();
        assert_eq!(synced.artifacts.len(), 200);
        assert_eq!(
            fs::read_to_string(results.path().join("a9/b/f19")).unwrap(),
            "9.19"
        );
    }
}
