//! Finding, killing and reaping the leftover children of this process.
//!
//! The runner (and the supervisor, for runners that crashed) are child subreapers
//! (`PR_SET_CHILD_SUBREAPER`): a process orphaned below them — a `sleep 300 &`, a `setsid`
//! daemon, a `nohup` job — is re-parented to them rather than to init. Nothing else keeps track
//! of such processes, so we find them the way `ps` does, by scanning `/proc`.
//! (`/proc/<pid>/task/*/children` would be cheaper but needs `CONFIG_PROC_CHILDREN`, which
//! these kernels lack.)
//!
//! Only specific pids are ever waited for: a blanket `waitpid(-1)` would steal the exit status
//! of processes tokio is waiting for.

use std::fs;
use std::thread;
use std::time::{Duration, Instant};

use nix::errno::Errno;
use nix::sys::signal::{kill, killpg, Signal};
use nix::sys::wait::{waitid, waitpid, Id, WaitPidFlag, WaitStatus};
use nix::unistd::{getpgrp, getpid, Pid};

/// One line of `/proc/<pid>/stat`, the parts we need.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Proc {
    pid: i32,
    ppid: i32,
    pgrp: i32,
    /// Dead, waiting to be reaped.
    zombie: bool,
    /// Resident set size, in pages.
    rss_pages: u64,
    /// Threads (what `RLIMIT_NPROC` counts).
    threads: u64,
}

/// Every process visible in `/proc`. One that exits during the scan is simply missed.
fn scan() -> Vec<Proc> {
    let Ok(entries) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    entries
        .flatten()
        .filter_map(|entry| {
            let pid: i32 = entry.file_name().to_str()?.parse().ok()?;
            let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
            parse_stat(pid, &stat)
        })
        .collect()
}

/// Parses state, ppid, pgrp, thread count and resident pages from a `/proc/<pid>/stat` line. The command name is in
/// parentheses and may itself hold spaces and parentheses, so fields are counted after the
/// last `)`.
fn parse_stat(pid: i32, stat: &str) -> Option<Proc> {
    let mut fields = stat[stat.rfind(')')? + 1..].split_ascii_whitespace();
    let state = fields.next()?;
    let parent = fields.next()?.parse().ok()?;
    let group = fields.next()?.parse().ok()?;
    // Fields 20 and 24 of proc(5), counting from 1 with the state as field 3.
    let threads = fields.nth(14).and_then(|f| f.parse().ok()).unwrap_or(1);
    let rss_pages = fields.nth(3).and_then(|f| f.parse().ok()).unwrap_or(0);
    Some(Proc {
        pid,
        ppid: parent,
        pgrp: group,
        zombie: state == "Z",
        rss_pages,
        threads,
    })
}

/// What the processes of a tree use right now ([`tree_usage`]).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct TreeUsage {
    /// Live processes in the tree, its root included.
    pub processes: usize,
    /// Their resident memory, summed (pages shared between them count once per process).
    pub rss_bytes: u64,
    /// The resident memory of the largest of them.
    pub largest_rss_bytes: u64,
}

/// The live processes descending from `root` (and `root` itself): how many, and their resident
/// memory, from one scan of `/proc`. A process that re-parents during the scan may be missed
/// once; a runner is a child subreaper, so nothing a job starts leaves its tree while the
/// runner lives.
#[must_use]
pub fn tree_usage(root: Pid) -> TreeUsage {
    tree_members(root)
        .iter()
        .fold(TreeUsage::default(), |usage, member| TreeUsage {
            processes: usage.processes + 1,
            rss_bytes: usage.rss_bytes + member.rss_bytes,
            largest_rss_bytes: usage.largest_rss_bytes.max(member.rss_bytes),
        })
}

/// One live process of a tree ([`tree_members`]).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub pid: i32,
    /// Its resident memory now, in bytes.
    pub rss_bytes: u64,
    /// Its threads (at least 1): what `RLIMIT_NPROC` counts.
    pub threads: u64,
}

/// The live processes descending from `root` (and `root` itself), from one scan of `/proc`:
/// what [`tree_usage`] sums, by pid, so that a caller can tell processes apart across scans.
#[must_use]
pub fn tree_members(root: Pid) -> Vec<Member> {
    let procs = scan();
    let mut children: std::collections::HashMap<i32, Vec<&Proc>> = std::collections::HashMap::new();
    for p in &procs {
        children.entry(p.ppid).or_default().push(p);
    }
    let page = page_size();
    let mut members = Vec::new();
    let mut pending: Vec<&Proc> = procs.iter().filter(|p| p.pid == root.as_raw()).collect();
    // A pid has one parent, so the links form a tree and each process is met once.
    while let Some(p) = pending.pop() {
        if let Some(below) = children.get(&p.pid) {
            pending.extend(below.iter().copied());
        }
        if !p.zombie {
            members.push(Member {
                pid: p.pid,
                rss_bytes: p.rss_pages * page,
                threads: p.threads,
            });
        }
    }
    members
}

fn page_size() -> u64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::PAGE_SIZE)
        .ok()
        .flatten()
        .and_then(|n| u64::try_from(n).ok())
        .unwrap_or(4096)
}

/// The live processes that are this process's children or members of `group`: what a step
/// left running after its shell exited.
#[must_use]
pub fn live_pids(group: Option<Pid>) -> Vec<i32> {
    let me = getpid().as_raw();
    let group = group.map(Pid::as_raw);
    scan()
        .iter()
        .filter(|p| !p.zombie && (p.ppid == me || Some(p.pgrp) == group))
        .map(|p| p.pid)
        .collect()
}

/// The name of signal `n` (`"SIGKILL"`), or `"signal n"` for one nix does not know.
#[must_use]
pub fn signal_name(n: i32) -> String {
    Signal::try_from(n).map_or_else(|_| format!("signal {n}"), |s| s.as_str().to_owned())
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
    /// Children killed (or already dead) and reaped.
    pub reaped: usize,
    /// Children still there when the time ran out (stuck in the kernel, e.g. on NFS).
    pub left: usize,
}

/// Kills with SIGKILL every child of this process for which `keep` is false, together with
/// the process groups they lead (a `setsid` child's own descendants), and reaps them. Killing
/// a child re-parents its own children to us, so this repeats until no such child is left or
/// `timeout` passes. `also_group`, when given, is killed every round too (a step's group, whose
/// members may still have a living parent below us).
pub fn kill_children(
    keep: impl Fn(Pid) -> bool,
    also_group: Option<Pid>,
    timeout: Duration,
) -> Sweep {
    let me = getpid().as_raw();
    let my_group = getpgrp().as_raw();
    let deadline = Instant::now() + timeout;
    let mut sweep = Sweep::default();
    let mut pause = Duration::from_millis(1);
    loop {
        if let Some(group) = also_group {
            let _ = killpg(group, Signal::SIGKILL);
        }
        let children: Vec<Proc> = scan()
            .into_iter()
            .filter(|p| p.ppid == me && !keep(Pid::from_raw(p.pid)))
            .collect();
        if children.is_empty() {
            return sweep;
        }
        for child in children.iter().filter(|p| !p.zombie) {
            if child.pgrp == child.pid && child.pgrp != my_group {
                let _ = killpg(Pid::from_raw(child.pgrp), Signal::SIGKILL);
            }
            let _ = kill(Pid::from_raw(child.pid), Signal::SIGKILL);
        }
        let mut alive = 0;
        for child in &children {
            match waitpid(Pid::from_raw(child.pid), Some(WaitPidFlag::WNOHANG)) {
                Ok(WaitStatus::StillAlive) => alive += 1,
                Ok(_) => sweep.reaped += 1,
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

/// Kills with SIGKILL every live process whose real uid is `uid`, found by scanning `/proc`,
/// until none is left or `timeout` passes (a process forked meanwhile is found by the next
/// scan; a killed one can fork no more). For root, as a fallback when killing from that uid
/// itself did not work. Returns how many were killed and how many were still there at the end.
#[must_use]
pub fn kill_uid(uid: u32, timeout: Duration) -> Sweep {
    let deadline = Instant::now() + timeout;
    let mut sweep = Sweep::default();
    let mut pause = Duration::from_millis(1);
    loop {
        let found: Vec<i32> = scan()
            .into_iter()
            .filter(|p| !p.zombie && real_uid(p.pid) == Some(uid))
            .map(|p| p.pid)
            .collect();
        if found.is_empty() {
            return sweep;
        }
        for pid in &found {
            if kill(Pid::from_raw(*pid), Signal::SIGKILL).is_ok() {
                sweep.reaped += 1;
            }
        }
        if Instant::now() >= deadline {
            sweep.left = found.len();
            return sweep;
        }
        thread::sleep(pause);
        pause = (pause * 2).min(Duration::from_millis(50));
    }
}

/// The real uid of `pid`, from `/proc/<pid>/status` (whatever its dumpable flag says).
#[must_use]
pub fn real_uid(pid: i32) -> Option<u32> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status
        .lines()
        .find_map(|line| line.strip_prefix("Uid:"))?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

#[cfg(test)]
mod tests {

    #[test]
    fn tree_usage_counts_a_tree_and_its_memory() {
        use std::os::unix::process::CommandExt;
        let mut child = std::process::Command::new("/bin/sh")
            .args(["-c", "sleep 30 & sleep 30 & wait"])
            .process_group(0)
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        let deadline = Instant::now() + Duration::from_secs(10);
        let usage = loop {
            let usage = tree_usage(pid);
            if usage.processes == 3 || Instant::now() > deadline {
                break usage;
            }
            thread::yield_now();
        };
        killpg(pid, Signal::SIGKILL).unwrap();
        let _ = child.wait();
        assert_eq!(usage.processes, 3, "{usage:?}");
        assert!(usage.rss_bytes >= usage.largest_rss_bytes && usage.largest_rss_bytes > 0);
        assert_eq!(tree_usage(Pid::from_raw(i32::MAX)), TreeUsage::default());
    }
    use super::*;

    #[test]
    fn parses_stat_after_a_hostile_command_name() {
        let p = parse_stat(42, "42 (a) b (c) S 17 40 40 0").unwrap();
        assert_eq!((p.ppid, p.pgrp, p.zombie), (17, 40, false));
        assert!(parse_stat(42, "42 (sh) Z 1 42 42").unwrap().zombie);
        assert_eq!(parse_stat(1, "garbage"), None);
        let full = parse_stat(
            1,
            "1 (init) S 0 1 1 0 -1 4194560 100 200 0 0 1 2 3 4 20 0 7 0 5 1000 250 18446744073709551615",
        )
        .unwrap();
        assert_eq!((full.threads, full.rss_pages), (7, 250));
    }

    #[test]
    fn names_signals() {
        assert_eq!(signal_name(9), "SIGKILL");
        assert_eq!(signal_name(99), "signal 99");
    }

    #[test]
    fn finds_our_own_child() {
        let mut child = std::process::Command::new("sleep")
            .arg("5")
            .spawn()
            .unwrap();
        let pid = i32::try_from(child.id()).unwrap();
        assert!(scan()
            .iter()
            .any(|p| p.pid == pid && p.ppid == getpid().as_raw()));
        assert!(live_pids(None).contains(&pid));
        child.kill().unwrap();
        child.wait().unwrap();
    }

    #[test]
    fn kills_every_process_of_a_uid_and_nothing_else() {
        use std::os::unix::process::CommandExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: starting processes as another uid needs root");
            return;
        }
        // A uid of its own (no other test uses it), with a process that left a child behind
        // in a session of its own, as a job's leftovers would be.
        let uid = 3_999_321;
        let mut child = std::process::Command::new("sh")
            .args(["-c", "setsid sleep 30 & exec sleep 30"])
            .uid(uid)
            .gid(uid)
            .spawn()
            .unwrap();
        let mut bystander = std::process::Command::new("sleep")
            .arg("30")
            .spawn()
            .unwrap();
        let of_uid = || {
            scan()
                .into_iter()
                .filter(|p| !p.zombie && real_uid(p.pid) == Some(uid))
                .count()
        };
        let deadline = Instant::now() + Duration::from_secs(5);
        while of_uid() < 2 {
            assert!(Instant::now() < deadline, "the processes did not start");
            thread::sleep(Duration::from_millis(10));
        }
        let sweep = kill_uid(uid, Duration::from_secs(5));
        assert_eq!(sweep.left, 0, "{sweep:?}");
        assert!(sweep.reaped >= 2, "{sweep:?}");
        assert_eq!(of_uid(), 0);
        child.wait().unwrap();
        // Our own process (another uid) was not touched.
        assert_eq!(bystander.try_wait().unwrap(), None);
        bystander.kill().unwrap();
        bystander.wait().unwrap();
    }
}
