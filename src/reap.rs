//! Finding and killing the leftover children of this process.
//!
//! The runner (and the supervisor, for runners that crashed) are child subreapers
//! (`PR_SET_CHILD_SUBREAPER`): a process orphaned below them — a `sleep 300 &`, a `setsid`
//! daemon, a `nohup` job — is re-parented to them rather than to init. Nothing else keeps track
//! of such processes, so we find them the way `ps` does, by scanning `/proc` for our pid as
//! parent. (`/proc/<pid>/task/*/children` would be cheaper but needs `CONFIG_PROC_CHILDREN`,
//! which these kernels lack.)
//!
//! Only specific pids are ever waited for: a blanket `waitpid(-1)` would steal the exit status
//! of processes tokio is waiting for.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag};
use nix::unistd::{getpgrp, getpid, Pid};

/// The pids whose parent is `parent` (live or zombie), from `/proc/<pid>/stat`.
#[must_use]
pub fn children_of(parent: Pid) -> Vec<Pid> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut children = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(pid) = name.to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        // A process that exits between the listing and the read is simply skipped.
        let Ok(stat) = fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        if parent_in_stat(&stat) == Some(parent.as_raw()) {
            children.push(Pid::from_raw(pid));
        }
    }
    children
}

/// The ppid field of a `/proc/<pid>/stat` line. The command name is in parentheses and may
/// itself contain spaces and parentheses, so fields are counted after the last `)`.
fn parent_in_stat(stat: &str) -> Option<i32> {
    let rest = &stat[stat.rfind(')')? + 1..];
    rest.split_ascii_whitespace().nth(1)?.parse().ok()
}

/// Whether this process has any child at all, live or zombie, without reaping one.
#[must_use]
pub fn has_children() -> bool {
    // P_ALL + WNOWAIT only peeks; ECHILD means there is no child whatsoever.
    waitid(
        Id::All,
        WaitPidFlag::WEXITED | WaitPidFlag::WNOHANG | WaitPidFlag::WNOWAIT,
    ) != Err(Errno::ECHILD)
}

/// What [`kill_children`] did.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Sweep {
    /// Children killed and reaped.
    pub killed: usize,
    /// Children still present when the deadline passed (stuck in the kernel, e.g. on NFS).
    pub left: usize,
}

/// Kills with SIGKILL every child of this process for which `keep` is false, together with
/// the process groups they lead (a `setsid` child's own descendants), and reaps them. Killing
/// a child re-parents its own children to us, so this repeats until no such child is left or
/// `timeout` passes. `also_group`, when given, is SIGKILLed every round too (a step's group,
/// whose members may still have a living parent below us).
pub fn kill_children(
    keep: impl Fn(Pid) -> bool,
    also_group: Option<Pid>,
    timeout: Duration,
) -> Sweep {
    let me = getpid();
    let my_group = getpgrp();
    let deadline = Instant::now() + timeout;
    let mut sweep = Sweep::default();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(group) = also_group {
            let _ = killpg(group, Signal::SIGKILL);
        }
        let children: Vec<Pid> = children_of(me).into_iter().filter(|&p| !keep(p)).collect();
        if children.is_empty() {
            return sweep;
        }
        for &child in &children {
            if let Ok(group) = nix::unistd::getpgid(Some(child)) {
                if group == child && group != my_group {
                    let _ = killpg(group, Signal::SIGKILL);
                }
            }
            let _ = kill(child, Signal::SIGKILL);
        }
        let mut alive = 0;
        for &child in &children {
            match waitpid(child, Some(WaitPidFlag::WNOHANG)) {
                Ok(nix::sys::wait::WaitStatus::StillAlive) => alive += 1,
                Ok(_) => sweep.killed += 1,
                Err(_) => {}
            }
        }
        if alive > 0 {
            if Instant::now() >= deadline {
                sweep.left = alive;
                return sweep;
            }
            // A SIGKILLed process needs a moment to exit; back off gently.
            thread::sleep(pause);
            pause = (pause * 2).min(Duration::from_millis(50));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_ppid_after_a_hostile_command_name() {
        assert_eq!(parent_in_stat("42 (a) b (c) S 17 42 42 0"), Some(17));
        assert_eq!(parent_in_stat("42 (sh) R 1 42"), Some(1));
        assert_eq!(parent_in_stat("garbage"), None);
    }

    #[test]
    fn finds_our_own_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        assert!(children_of(getpid()).contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }
}
