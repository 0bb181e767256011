//! File-tree helpers both processes need.
//!
//! Job steps run arbitrary commands, so the trees we clean up may hold folders a step made
//! unreadable (`chmod 000`). [`remove_tree`] and [`empty_dir`] give the owner's permissions back
//! and retry instead of leaving the tree behind. Neither ever follows a symlink: std's
//! `remove_dir_all` unlinks links, and permissions are only changed on real folders.

use std::fs;
use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::Path;

/// Removes `path` and everything below it. A missing path is not an error.
pub fn remove_tree(path: &Path) -> io::Result<()> {
    match fs::remove_dir_all(path) {
        Err(e) if e.kind() == io::ErrorKind::PermissionDenied => {
            make_removable(path);
            ignore_missing(fs::remove_dir_all(path))
        }
        other => ignore_missing(other),
    }
}

/// Removes whatever is at `path` — a file, a link (not what it points to) or a folder tree.
/// Nothing there is fine.
pub fn remove_entry(path: &Path) -> io::Result<()> {
    match fs::symlink_metadata(path) {
        Ok(meta) if meta.is_dir() => remove_tree(path),
        Ok(_) => ignore_missing(fs::remove_file(path)),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(e),
    }
}

/// Removes everything inside `dir` but keeps `dir` itself (its owner may differ from ours).
pub fn empty_dir(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let path = entry.path();
        if entry.file_type()?.is_dir() {
            remove_tree(&path)?;
        } else {
            ignore_missing(fs::remove_file(&path))?;
        }
    }
    Ok(())
}

/// Gives every real folder under `path` (not following links) its owner's rwx back, so its
/// entries can be listed and unlinked. Best effort: what we do not own stays as it is.
fn make_removable(path: &Path) {
    let Ok(meta) = fs::symlink_metadata(path) else {
        return;
    };
    if !meta.is_dir() {
        return;
    }
    let mode = meta.permissions().mode();
    if mode & 0o700 != 0o700 {
        let _ = fs::set_permissions(path, fs::Permissions::from_mode(mode | 0o700));
    }
    if let Ok(entries) = fs::read_dir(path) {
        for entry in entries.flatten() {
            if entry.file_type().is_ok_and(|t| t.is_dir()) {
                make_removable(&entry.path());
            }
        }
    }
}

fn ignore_missing(result: io::Result<()>) -> io::Result<()> {
    match result {
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// Bytes of the regular files below `dir`, symlinks never followed, leaving out the entry
/// named `skip` at its top (`results/` of a job folder). What vanishes or cannot be read counts
/// nothing: the total is what the caller can see.
#[must_use]
pub fn bytes_in(dir: &Path, skip: Option<&str>) -> u64 {
    let mut total = 0u64;
    let mut pending = vec![(dir.to_owned(), true)];
    while let Some((dir, top)) = pending.pop() {
        let Ok(entries) = fs::read_dir(&dir) else {
            continue;
        };
        for entry in entries.flatten() {
            if top && skip.is_some_and(|skip| entry.file_name() == skip) {
                continue;
            }
            // `DirEntry::metadata` does not follow a symlink.
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                pending.push((entry.path(), false));
            } else if meta.is_file() {
                total = total.saturating_add(meta.len());
            }
        }
    }
    total
}

/// Bytes an unprivileged writer can still put on the drive holding `dir`.
pub fn free_space(dir: &Path) -> io::Result<u64> {
    let stat = nix::sys::statvfs::statvfs(dir)?;
    Ok(stat.blocks_available().saturating_mul(stat.fragment_size()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn removes_locked_folders_but_not_link_targets() {
        let outside = tempfile::tempdir().unwrap();
        fs::write(outside.path().join("keep"), "x").unwrap();
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("t");
        fs::create_dir_all(tree.join("a/b")).unwrap();
        fs::write(tree.join("a/b/f"), "x").unwrap();
        std::os::unix::fs::symlink(outside.path(), tree.join("link")).unwrap();
        fs::set_permissions(tree.join("a"), fs::Permissions::from_mode(0o000)).unwrap();
        remove_tree(&tree).unwrap();
        assert!(!tree.exists());
        assert!(outside.path().join("keep").exists());
        remove_tree(&tree).unwrap();
    }

    #[test]
    fn empty_dir_keeps_the_folder() {
        let dir = tempfile::tempdir().unwrap();
        fs::create_dir(dir.path().join("sub")).unwrap();
        fs::write(dir.path().join("f"), "x").unwrap();
        std::os::unix::fs::symlink("/nonexistent", dir.path().join("l")).unwrap();
        empty_dir(dir.path()).unwrap();
        assert!(dir.path().is_dir());
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 0);
    }
}
