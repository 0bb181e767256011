//! Descriptor hygiene: nothing a process inherited from whoever started it reaches the
//! processes it starts.
//!
//! Rust opens every file close-on-exec, but descriptors inherited from a parent shell or a
//! service manager are not: without this, a step could read a root-only file through a
//! descriptor the supervisor was started with. Both binaries call [`close_on_exec_inherited`]
//! first thing; what they hand on is passed on purpose (the runner's pipe, the job folder).

#![allow(unsafe_code)] // Two system calls on raw descriptors; each carries its SAFETY argument.

use std::fs;
use std::os::fd::{BorrowedFd, RawFd};

use nix::fcntl::{fcntl, FcntlArg, FdFlag};

/// Marks every open descriptor from 3 up close-on-exec. They stay usable here; an exec drops
/// them. Call it while the process has one thread.
pub fn close_on_exec_inherited() {
    // SAFETY: close_range(2) with CLOSE_RANGE_CLOEXEC closes nothing and touches no memory; it
    // only sets a flag on descriptors, which no Rust object here relies on being clear.
    let done = unsafe {
        nix::libc::close_range(
            3,
            nix::libc::c_uint::MAX,
            nix::libc::CLOSE_RANGE_CLOEXEC.cast_signed(),
        )
    } == 0;
    if done {
        return;
    }
    // Kernels before 5.11: one descriptor at a time.
    for fd in open_fds().into_iter().filter(|&fd| fd > 2) {
        // SAFETY: `fd` was open a moment ago and this process has one thread, so nothing closes
        // it before the call; the borrow ends with the call.
        let fd = unsafe { BorrowedFd::borrow_raw(fd) };
        // The listing's own descriptor is gone by now: EBADF for it is expected.
        let _ = fcntl(fd, FcntlArg::F_SETFD(FdFlag::FD_CLOEXEC));
    }
}

/// The descriptors this process has open, from `/proc/self/fd` (for tests and diagnostics).
#[must_use]
pub fn open_fds() -> Vec<RawFd> {
    let mut fds: Vec<RawFd> = fs::read_dir("/proc/self/fd")
        .map(|entries| {
            entries
                .flatten()
                .filter_map(|e| e.file_name().to_str()?.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    fds.sort_unstable();
    fds
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::fd::AsRawFd;

    #[test]
    fn inherited_descriptors_do_not_survive_exec() {
        let file = fs::File::open("/dev/null").unwrap();
        // Make it look inherited: clear the flag Rust set.
        fcntl(&file, FcntlArg::F_SETFD(FdFlag::empty())).unwrap();
        close_on_exec_inherited();
        let flags = fcntl(&file, FcntlArg::F_GETFD).unwrap();
        assert_ne!(flags & FdFlag::FD_CLOEXEC.bits(), 0);
        assert!(open_fds().contains(&file.as_raw_fd()));
    }
}
