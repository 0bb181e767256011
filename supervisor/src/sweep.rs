//! The workspaces folder: created with modes the runner's user can traverse, locked so that one
//! supervisor owns it, and swept at start of whatever crashed attempts left behind (contract §4.6).

use std::fs::{self, File};
use std::os::unix::fs::{DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use anyhow::{bail, Context};
use tracing::{info, warn};

use crate::identity::Pool;

const LOCK_FILE: &str = ".nats-fs-supervisor.lock";

/// Holds the workspaces folder for this supervisor until dropped.
#[derive(Debug)]
pub struct WorkspacesLock {
    _file: File,
}

/// Prepares `dir` for runners of `pool`, takes its lock, and removes leftover workspaces.
pub fn prepare_workspaces(dir: &Path, pool: &Pool) -> anyhow::Result<WorkspacesLock> {
    ensure_workspaces_dir(dir, pool)?;
    let file = File::options()
        .create(true)
        .truncate(false)
        .write(true)
        .open(dir.join(LOCK_FILE))
        .with_context(|| format!("creating the lock file in {}", dir.display()))?;
    if file.try_lock().is_err() {
        bail!(
            "another nats-fs-supervisor is using the workspaces folder {}; give each supervisor its own --workspaces-dir",
            dir.display()
        );
    }
    let mut swept = 0;
    for entry in fs::read_dir(dir).with_context(|| format!("listing {}", dir.display()))? {
        let entry = entry.with_context(|| format!("listing {}", dir.display()))?;
        if entry.file_name() == LOCK_FILE {
            continue;
        }
        let path = entry.path();
        let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
            nats_fs::tree::remove_tree(&path)
        } else {
            fs::remove_file(&path)
        };
        match removed {
            Ok(()) => swept += 1,
            Err(e) => warn!(
                "removing the stale workspace {}: {e}; left in place",
                path.display()
            ),
        }
    }
    if swept > 0 {
        info!(count = swept, "removed workspaces left by an earlier run");
    }
    Ok(WorkspacesLock { _file: file })
}

/// Creates `dir` if missing (mode 0711) and checks that every identity of `pool` can reach
/// into it.
pub fn ensure_workspaces_dir(dir: &Path, pool: &Pool) -> anyhow::Result<()> {
    if !dir.exists() {
        // Others may traverse but not list: each runner reaches only its own 0700 workspace.
        fs::DirBuilder::new()
            .recursive(true)
            .mode(0o711)
            .create(dir)
            .with_context(|| format!("creating the workspaces folder {}", dir.display()))?;
        fs::set_permissions(dir, fs::Permissions::from_mode(0o711))
            .with_context(|| format!("setting the mode of {}", dir.display()))?;
    }
    let meta = fs::metadata(dir)
        .with_context(|| format!("reading the workspaces folder {}", dir.display()))?;
    if !meta.is_dir() {
        bail!("the workspaces folder {} is not a folder", dir.display());
    }
    if meta.uid() != nix::unistd::geteuid().as_raw() {
        warn!(
            "the workspaces folder {} belongs to someone else (uid {})",
            dir.display(),
            meta.uid()
        );
    }
    if let Err(problem) = pool.can_traverse(dir) {
        bail!(
            "runners run as {} and must reach their workspaces under {}, but {problem}; \
             give that folder mode 0711 (or choose another --workspaces-dir)",
            pool.describe(),
            dir.display()
        );
    }
    Ok(())
}
