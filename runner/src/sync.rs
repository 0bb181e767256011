//! Syncing artifacts (contract §4.4): every file or symlink in the workspace that differs from its
//! staged [`Fingerprint`] (or was not staged at all) is copied to `results/<same path>`, with
//! its size and SHA-256 recorded for the manifest. Unchanged inputs stay where they are.
//!
//! Symlinks are recreated as links and never followed, and nothing is written outside
//! `results/`: an entry in the way inside `results/` (a file where a folder is needed, or a link
//! a step planted there) is removed rather than written through.
//!
//! Under an output quota, a file that would pass what is left of it is not copied (a copy that
//! grows past it is removed), and a copy that fills the drive is removed and ends the sync:
//! no partial artifact stays in `results/` ([`crate::output`] says what counts).

use std::fs;
use std::io::{self, Read, Write};
use std::os::unix::fs::MetadataExt;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};

use nats_fs::manifest::Artifact;
use sha2::{Digest, Sha256};

use crate::output::is_no_space;
use crate::stage::{create_copy, finish_copy, open_regular, Snapshot};

/// What one sync copied.
#[derive(Debug, Default)]
pub(crate) struct Synced {
    pub(crate) artifacts: Vec<Artifact>,
    pub(crate) bytes: u64,
    /// Entries that could not be synced and did not fail the job (a FIFO a step made, a file
    /// a step made unreadable), with why.
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

/// Copies what the steps created or modified from `workspace` to `results`, at most
/// `quota_left` bytes of it when given.
pub(crate) fn sync(
    workspace: &Path,
    results: &Path,
    staged: &Snapshot,
    interrupt: &AtomicBool,
    quota_left: Option<u64>,
) -> Result<Synced, SyncError> {
    let mut synced = Synced::default();
    let root = fs::symlink_metadata(workspace).map_err(io_err("inspecting", workspace))?;
    let mut pending = vec![(PathBuf::new(), root.ino())];
    'walk: while let Some((rel, folder)) = pending.pop() {
        let dir = workspace.join(&rel);
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
            if interrupt.load(Ordering::Relaxed) {
                return Err(SyncError::Interrupted);
            }
            let Ok(entry) = entry else { continue };
            let Ok(meta) = entry.metadata() else { continue };
            let file_type = meta.file_type();
            let name = entry.file_name();
            // The common case, an input the steps left alone, is settled without building or
            // hashing its path: this walk visits every file of the workspace.
            if !file_type.is_dir() && staged.unchanged(folder, &name, &meta) {
                continue;
            }
            let rel_path = rel.join(&name);
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
            let left = quota_left.map(|left| left.saturating_sub(synced.bytes));
            if file_type.is_file() && left.is_some_and(|left| meta.len() > left) {
                synced.refused.push((display(&rel_path), meta.len()));
                continue;
            }
            let from = entry.path();
            let to = prepare_target(results, &rel_path)?;
            if file_type.is_symlink() {
                let target = fs::read_link(&from).map_err(io_err("reading link", &from))?;
                std::os::unix::fs::symlink(&target, &to).map_err(io_err("creating link", &to))?;
                synced.artifacts.push(Artifact {
                    path: display(&rel_path),
                    size: 0,
                    sha256: None,
                    link: Some(target.to_string_lossy().into_owned()),
                });
                continue;
            }
            match copy_hashed(&from, &to, left.unwrap_or(u64::MAX)) {
                Ok((size, sha256)) => {
                    synced.bytes += size;
                    synced.artifacts.push(Artifact {
                        path: display(&rel_path),
                        size,
                        sha256: Some(sha256),
                        link: None,
                    });
                }
                Err(CopyError::Read(e)) => {
                    let _ = fs::remove_file(&to);
                    synced
                        .skipped
                        .push(format!("not synced {}: {e}", display(&rel_path)));
                }
                Err(CopyError::TooBig(size)) => {
                    let _ = fs::remove_file(&to);
                    synced.refused.push((display(&rel_path), size));
                }
                Err(CopyError::Write(e)) => {
                    let _ = fs::remove_file(&to);
                    if is_no_space(&e) {
                        synced.no_space = Some(display(&rel_path));
                        break 'walk;
                    }
                    return Err(io_err("writing", &to)(e));
                }
            }
        }
    }
    synced.artifacts.sort_by(|a, b| a.path.cmp(&b.path));
    Ok(synced)
}

/// Makes sure `results/<rel>`'s folders exist as real folders and nothing is at `<rel>`
/// itself; returns the path to write. Only ever removes entries inside `results/`.
fn prepare_target(results: &Path, rel: &Path) -> Result<PathBuf, SyncError> {
    let mut at = results.to_owned();
    let mut components = rel.components().peekable();
    while let Some(component) = components.next() {
        let Component::Normal(name) = component else {
            // Paths come from read_dir, so this cannot happen; refuse rather than escape.
            return Err(io_err("refusing path", rel)(io::Error::from(
                io::ErrorKind::InvalidInput,
            )));
        };
        at.push(name);
        let last = components.peek().is_none();
        match fs::symlink_metadata(&at) {
            Ok(meta) if !last && meta.is_dir() => {}
            Ok(meta) if meta.is_dir() => {
                nats_fs::tree::remove_tree(&at).map_err(io_err("replacing folder", &at))?;
            }
            Ok(_) => fs::remove_file(&at).map_err(io_err("replacing", &at))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(io_err("inspecting", &at)(e)),
        }
        if !last {
            match fs::create_dir(&at) {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {}
                Err(e) => return Err(io_err("creating folder", &at)(e)),
            }
        }
    }
    Ok(at)
}

enum CopyError {
    Read(io::Error),
    Write(io::Error),
    /// The file grew past `max` while being copied; how far it got.
    TooBig(u64),
}

/// Copies one file while hashing it: one pass over the data, memory bounded by the buffer.
/// A file longer than `max` bytes is not copied whole ([`CopyError::TooBig`]).
fn copy_hashed(from: &Path, to: &Path, max: u64) -> Result<(u64, String), CopyError> {
    let (mut source, meta) = open_regular(from)
        .map_err(CopyError::Read)?
        .ok_or_else(|| CopyError::Read(io::Error::other("not a regular file")))?;
    let mut target = create_copy(to).map_err(CopyError::Write)?;
    let mut hasher = Sha256::new();
    let mut buf = vec![0u8; 256 * 1024];
    let mut size = 0u64;
    loop {
        let n = match source.read(&mut buf) {
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
    finish_copy(&target, &meta).map_err(CopyError::Write)?;
    Ok((size, base16ct::lower::encode_string(&hasher.finalize())))
}

fn display(rel: &Path) -> String {
    rel.to_string_lossy().into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stage::stage;

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
        let staged = stage(src.path(), ws.path(), &AtomicBool::new(false)).unwrap();

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

        let synced = sync(
            ws.path(),
            results.path(),
            &staged.snapshot,
            &AtomicBool::new(false),
            None,
        )
        .unwrap();
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
    fn never_writes_through_a_link_planted_in_results() {
        let outside = tempfile::tempdir().unwrap();
        let ws = tempfile::tempdir().unwrap();
        let results = tempfile::tempdir().unwrap();
        fs::create_dir(ws.path().join("dist")).unwrap();
        fs::write(ws.path().join("dist/app.js"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), results.path().join("dist")).unwrap();
        sync(
            ws.path(),
            results.path(),
            &Snapshot::default(),
            &AtomicBool::new(false),
            None,
        )
        .unwrap();
        assert!(results.path().join("dist").is_dir());
        assert!(!fs::symlink_metadata(results.path().join("dist"))
            .unwrap()
            .is_symlink());
        assert_eq!(fs::read_dir(outside.path()).unwrap().count(), 0);
    }
}

#[cfg(test)]
mod quota_tests {
    use super::*;

    #[test]
    fn a_file_over_the_quota_is_not_copied_and_others_are() {
        let ws = tempfile::tempdir().unwrap();
        let results = tempfile::tempdir().unwrap();
        fs::write(ws.path().join("big.bin"), vec![0u8; 5000]).unwrap();
        fs::write(ws.path().join("small.txt"), "ok").unwrap();
        let synced = sync(
            ws.path(),
            results.path(),
            &Snapshot::default(),
            &AtomicBool::new(false),
            Some(1000),
        )
        .unwrap();
        assert_eq!(synced.refused, [("big.bin".to_owned(), 5000)]);
        assert_eq!(synced.artifacts.len(), 1);
        assert!(!results.path().join("big.bin").exists());
        assert!(results.path().join("small.txt").exists());
    }
}
