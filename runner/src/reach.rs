//! `--reach`: what an identity of the pool could do on the jobs folder, found out by trying.
//!
//! The supervisor's start-up probe makes a job folder as a controller would (a folder 0755
//! with a file 0644, the share user's) and starts `nats-fs-runner --reach FOLDER --as IDS` as
//! root. The runner becomes that identity for good (groups, gid, uid, as it gives a step its
//! identity) and tries to list the jobs folder and the job folder, read and open for writing
//! the file, and create a file there (removed again at once). It prints what worked as one
//! [`Reach`] JSON line: a step of that identity could do the same to any job's folder.

use std::fs;
use std::path::Path;
use std::process::ExitCode;

use nats_fs::share::Reach;
use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};

/// Runs the check for `folder` as `ids` (`UID:GID:GROUP,GROUP…`); exit 0 with the JSON line,
/// or 2 with why it could not try.
pub(crate) fn reach(folder: &Path, ids: &str) -> ExitCode {
    match become_identity(ids) {
        Ok(()) => {
            let found = try_everything(folder);
            match serde_json::to_string(&found) {
                Ok(line) => {
                    println!("{line}");
                    ExitCode::SUCCESS
                }
                Err(e) => fail(&format!("printing the result: {e}")),
            }
        }
        Err(e) => fail(&e),
    }
}

fn fail(problem: &str) -> ExitCode {
    eprintln!("nats-fs-runner --reach: {problem}");
    ExitCode::from(2)
}

fn become_identity(ids: &str) -> Result<(), String> {
    let bad = || format!("--as {ids:?}: expected UID:GID:GROUP,GROUP…");
    let mut parts = ids.splitn(3, ':');
    let uid: u32 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let gid: u32 = parts.next().and_then(|s| s.parse().ok()).ok_or_else(bad)?;
    let groups = parts
        .next()
        .unwrap_or("")
        .split(',')
        .filter(|g| !g.is_empty())
        .map(|g| g.parse().map(Gid::from_raw).map_err(|_| bad()))
        .collect::<Result<Vec<_>, _>>()?;
    if uid == 0 {
        return Err("--as: the pool never holds root".to_owned());
    }
    setgroups(&groups).map_err(|e| format!("setting the groups: {e}"))?;
    let gid = Gid::from_raw(gid);
    setresgid(gid, gid, gid).map_err(|e| format!("setting the gid: {e}"))?;
    let uid = Uid::from_raw(uid);
    setresuid(uid, uid, uid).map_err(|e| format!("setting the uid: {e}"))
}

fn try_everything(folder: &Path) -> Reach {
    let file = folder.join(Reach::FILE);
    let planted = folder.join(format!(".planted-{}", std::process::id()));
    let create = fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(&planted)
        .is_ok();
    if create {
        let _ = fs::remove_file(&planted);
    }
    Reach {
        list_jobs: folder
            .parent()
            .is_some_and(|jobs| fs::read_dir(jobs).is_ok_and(|mut l| l.next().is_some())),
        list_job: fs::read_dir(folder).is_ok_and(|mut l| l.next().is_some()),
        read: fs::read(&file).is_ok(),
        // Opened, never written: the file stays as it was.
        write: fs::OpenOptions::new().write(true).open(&file).is_ok(),
        create,
    }
}
