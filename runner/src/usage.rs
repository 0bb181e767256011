//! Waiting for a step's shell with `wait4(2)`, and what the step's processes used.
//!
//! `wait4` returns, with the exit status, the shell's own resource usage together with that of
//! every descendant it waited for; `getrusage(RUSAGE_CHILDREN)` of the runner covers every
//! child the runner reaped — the shell, and the orphans a child subreaper inherits and reaps at
//! the end of the step. Neither std nor nix offers `wait4`, hence this small module.

#![allow(unsafe_code)] // wait4, with a SAFETY argument below.

use std::io;
use std::os::unix::process::ExitStatusExt;
use std::process::ExitStatus;

use nix::libc;
use nix::sys::resource::{getrusage, UsageWho};
use nix::sys::time::TimeVal;
use nix::unistd::Pid;

/// CPU time and peak memory of reaped processes.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Usage {
    pub(crate) user_ms: u64,
    pub(crate) system_ms: u64,
    /// The largest peak resident set size of any one of them, in bytes.
    pub(crate) max_rss_bytes: u64,
}

impl Usage {
    /// Everything this process's reaped children used so far. CPU only ever grows; the peak is
    /// the largest of all children ever reaped.
    pub(crate) fn children() -> Usage {
        match getrusage(UsageWho::RUSAGE_CHILDREN) {
            Ok(usage) => Usage {
                user_ms: ms(usage.user_time()),
                system_ms: ms(usage.system_time()),
                max_rss_bytes: kib(usage.max_rss()),
            },
            Err(_) => Usage::default(),
        }
    }

    /// What was used between `earlier` and `self` (both from [`Usage::children`]). The peak is
    /// only known if it grew: a step whose processes stayed below an earlier step's peak shows
    /// 0 here, which is why the shell's own `wait4` peak is taken too.
    pub(crate) fn since(self, earlier: Usage) -> Usage {
        Usage {
            user_ms: self.user_ms.saturating_sub(earlier.user_ms),
            system_ms: self.system_ms.saturating_sub(earlier.system_ms),
            max_rss_bytes: if self.max_rss_bytes > earlier.max_rss_bytes {
                self.max_rss_bytes
            } else {
                0
            },
        }
    }
}

/// Reaps `pid` if it has ended, without blocking: its status and its usage (its own and its
/// waited-for descendants'). `Ok(None)` while it runs.
pub(crate) fn try_wait(pid: Pid) -> io::Result<Option<(ExitStatus, Usage)>> {
    loop {
        let mut status: libc::c_int = 0;
        let mut rusage = std::mem::MaybeUninit::<libc::rusage>::zeroed();
        // SAFETY: wait4 writes only into `status` and `rusage`, both valid, live, writable and
        // of the right types for the duration of the call; `rusage` is read below only after a
        // successful return (> 0), when the kernel has filled it.
        let reaped = unsafe {
            libc::wait4(
                pid.as_raw(),
                &raw mut status,
                libc::WNOHANG,
                rusage.as_mut_ptr(),
            )
        };
        match reaped {
            0 => return Ok(None),
            -1 => {
                let e = io::Error::last_os_error();
                if e.kind() != io::ErrorKind::Interrupted {
                    return Err(e);
                }
            }
            _ => {
                // SAFETY: wait4 returned a pid, so it filled the whole struct (and it started
                // zeroed, which is a valid rusage anyway).
                let rusage = unsafe { rusage.assume_init() };
                let usage = Usage {
                    user_ms: ms(TimeVal::from(rusage.ru_utime)),
                    system_ms: ms(TimeVal::from(rusage.ru_stime)),
                    max_rss_bytes: kib(rusage.ru_maxrss),
                };
                return Ok(Some((ExitStatus::from_raw(status), usage)));
            }
        }
    }
}

fn ms(t: TimeVal) -> u64 {
    let micros = i128::from(t.tv_sec()) * 1_000_000 + i128::from(t.tv_usec());
    u64::try_from(micros / 1000).unwrap_or(0)
}

/// `ru_maxrss` is in KiB on Linux.
fn kib(n: libc::c_long) -> u64 {
    u64::try_from(n).unwrap_or(0).saturating_mul(1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    #[allow(clippy::zombie_processes)] // Reaped by `try_wait`, which is what is tested.
    fn reaps_a_child_with_its_cpu_time() {
        let before = Usage::children();
        let child = std::process::Command::new("/bin/sh")
            .args([
                "-c",
                "i=0; while [ $i -lt 200000 ]; do i=$((i+1)); done; exit 3",
            ])
            .spawn()
            .unwrap();
        let pid = Pid::from_raw(i32::try_from(child.id()).unwrap());
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
        let (status, usage) = loop {
            if let Some(done) = try_wait(pid).unwrap() {
                break done;
            }
            assert!(std::time::Instant::now() < deadline);
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert_eq!(status.code(), Some(3));
        assert!(usage.user_ms + usage.system_ms > 0, "{usage:?}");
        assert!(usage.max_rss_bytes > 0);
        let spent = Usage::children().since(before);
        assert!(spent.user_ms + spent.system_ms >= usage.user_ms + usage.system_ms - 1);
        assert!(try_wait(pid).is_err(), "reaped once");
    }
}
