//! Crossing the privilege boundary: starting a runner as a slot's identity, and killing every
//! process of an identity.
//!
//! When the supervisor runs as root, each runner starts as its slot's identity with that
//! identity's groups (looked up at start: NSS is not async-signal-safe), `PR_SET_NO_NEW_PRIVS`
//! (no setuid binary can give the job privileges back) and `PR_SET_PDEATHSIG` (the runner is
//! told to stop if the supervisor dies, even by SIGKILL). Its environment is emptied and
//! rebuilt from a short list, so NATS credentials and anything else of the supervisor's never
//! reach a job; its descriptors are exactly its three pipes plus the job folder and `results/`
//! that the supervisor opened for it.
//!
//! Containment starts here too: each runner is given the operator's ceilings as hard rlimits
//! (`--max-processes`, `--max-open-files`, `--max-file-size`, `--max-cpu-time`; no core dumps)
//! and an `oom_score_adj` of 1000, both while it is still root, so neither the runner nor its
//! steps can take them back ([`RunnerLimits`]).
//!
//! Runners are started the way `posix_spawn` starts a process (a `CLONE_VM | CLONE_VFORK`
//! child that executes the runner), not as `std` or tokio children: [`crate::reaper`] reaps
//! every child of the supervisor, runners and orphaned steps alike, with one `waitpid(-1)` loop.
//! While the child sets itself up it shares the supervisor's memory, and once it has the job's
//! uid a process of the job's user could reach it: so the supervisor is non-dumpable and
//! refuses `fs.suid_dumpable` = 1 ([`prepare_to_switch`]), and a set-up that does not reach
//! exec in time is killed (the `watchdog`).
#![allow(unsafe_code)] // clone, fork and what their children do; each block says why it is safe.

// The raw setgroups, setresgid and setresuid calls below take 32-bit ids on 64-bit Linux; on
// 32-bit x86 and ARM they are the old 16-bit calls, and a uid above 65535 would be cut short.
#[cfg(not(target_pointer_width = "64"))]
compile_error!(
    "spawn.rs changes ids with system calls that take 32-bit ids only on 64-bit targets"
);

use std::collections::BTreeMap;
use std::ffi::CString;
use std::io;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::ffi::OsStrExt;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicI32, Ordering};
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::{Duration, Instant};

use nats_fs::limits::{Kind, Limits, RLIMITS};
use nix::fcntl::OFlag;
use nix::libc;
use nix::sys::resource::{getrlimit, setrlimit, Resource};
use nix::sys::signal::{kill, SigSet, SigmaskHow, Signal};
use nix::unistd::{fork, getpid, pipe2, ForkResult, Pid, Uid};
use tokio::net::unix::pipe;
use tokio::sync::oneshot::error::TryRecvError;

use crate::identity::Identity;
use crate::reaper::{Exit, Reaper};

/// What every runner's `oom_score_adj` is set to, as the bytes written to
/// `/proc/self/oom_score_adj` (1000): the kernel's OOM killer picks the largest job's
/// processes first, and never the supervisor (see [`lower_own_oom_score`]).
const RUNNER_OOM_SCORE_ADJ_TEXT: &[u8] = b"1000";
/// What the supervisor sets its own `oom_score_adj` to, when it may (`CAP_SYS_RESOURCE`).
pub const SUPERVISOR_OOM_SCORE_ADJ: i32 = -900;

/// The hard rlimits a runner starts with: the operator's ceilings, as values computed before
/// the fork (the child may only make plain system calls).
///
/// Soft and hard are both set to the ceiling, before the privilege drop: once the runner runs
/// as the job's identity it cannot raise them again, and neither can its steps; the runner
/// lowers the soft limits of the steps to the job's own values. `RLIMIT_CORE` is always 0: a
/// crashing step must not fill the disk with cores (or hand its memory to whoever reads them).
///
/// `RLIMIT_NPROC` counts every process of the real uid, not a process tree. With one identity
/// per slot (a `--run-as` list or range) that is exactly one job's processes; with one identity
/// shared by every slot (such as the default `nobody`) it counts the processes of all the jobs
/// running as it (and of anything else of that user) together.
#[derive(Debug, Clone, Copy, Default)]
pub struct RunnerLimits {
    set: [(Option<Resource>, u64); 4],
}

impl RunnerLimits {
    /// The rlimits for `ceilings` (already clamped by [`clamp_to_hard_limits`]).
    #[must_use]
    pub fn new(ceilings: &Limits) -> Self {
        let mut set = [(None, 0); 4];
        for (slot, (kind, resource)) in set.iter_mut().zip(RLIMITS) {
            if let Some(value) = ceilings.get(kind) {
                *slot = (Some(resource), value);
            }
        }
        Self { set }
    }

    /// Applies them to the calling process. Async-signal-safe: `setrlimit` only.
    fn apply(&self) -> nix::Result<()> {
        for (resource, value) in self.set {
            if let Some(resource) = resource {
                setrlimit(resource, value, value)?;
            }
        }
        setrlimit(Resource::RLIMIT_CORE, 0, 0)
    }
}

/// Lowers each rlimit ceiling that this process could not give a runner to what it can: its
/// own hard limit when it may not raise it (no `CAP_SYS_RESOURCE`: not root, or root under a
/// systemd unit that keeps few capabilities), and the kernel's `nr_open` for open files. Returns
/// the ceilings that are used, and a warning for each one lowered.
#[must_use]
pub fn clamp_to_hard_limits(mut ceilings: Limits) -> (Limits, Vec<String>) {
    let may_raise = has_cap_sys_resource();
    let nr_open = std::fs::read_to_string("/proc/sys/fs/nr_open")
        .ok()
        .and_then(|s| s.trim().parse::<u64>().ok());
    let mut warnings = Vec::new();
    for (kind, resource) in RLIMITS {
        let Some(wanted) = ceilings.get(kind) else {
            continue;
        };
        let mut most = u64::MAX;
        if !may_raise {
            if let Ok((_, hard)) = getrlimit(resource) {
                most = most.min(hard);
            }
        }
        if kind == Kind::OpenFiles {
            most = most.min(nr_open.unwrap_or(u64::MAX));
        }
        if wanted > most {
            warnings.push(format!(
                "{} {} is more than this process may give its runners ({}); jobs run with {}",
                crate::config::ceiling_option(kind),
                kind.show(wanted),
                if may_raise {
                    "the kernel's nr_open"
                } else {
                    "its own hard limit, without CAP_SYS_RESOURCE"
                },
                kind.show(most)
            ));
            ceilings.set(kind, Some(most));
        }
    }
    (ceilings, warnings)
}

/// Whether this process may raise hard rlimits and lower `oom_score_adj`: `CAP_SYS_RESOURCE`
/// (bit 24) in its effective set.
fn has_cap_sys_resource() -> bool {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|status| {
            let hex = status.lines().find_map(|l| l.strip_prefix("CapEff:"))?;
            u64::from_str_radix(hex.trim(), 16).ok()
        })
        .is_some_and(|caps| caps & (1 << 24) != 0)
}

/// Makes the supervisor the last process the kernel's OOM killer picks
/// ([`SUPERVISOR_OOM_SCORE_ADJ`]), so that memory pressure ends a job, never the daemon that
/// reports it. Needs `CAP_SYS_RESOURCE`; without it the score stays as it is (said at debug
/// level: an unprivileged supervisor is a supported set-up).
pub fn lower_own_oom_score() {
    match std::fs::write(
        "/proc/self/oom_score_adj",
        SUPERVISOR_OOM_SCORE_ADJ.to_string(),
    ) {
        Ok(()) => tracing::debug!(
            oom_score_adj = SUPERVISOR_OOM_SCORE_ADJ,
            "lowered this process's OOM score"
        ),
        Err(e) => tracing::debug!(
            "keeping this process's OOM score: setting oom_score_adj to {SUPERVISOR_OOM_SCORE_ADJ}: {e}"
        ),
    }
}

/// Makes ready to start runners as other identities, once, at start: refuses a host where a
/// job could write into the supervisor's memory (see `dumpable_refusal`), and makes the
/// supervisor non-dumpable itself — which the kernel would otherwise do at the first runner
/// started, as the runner's set-up changes its credentials on the supervisor's memory.
pub fn prepare_to_switch() -> anyhow::Result<()> {
    if let Some(refusal) = dumpable_refusal() {
        anyhow::bail!(refusal);
    }
    nix::sys::prctl::set_dumpable(false)
        .map_err(|e| anyhow::anyhow!("making this process non-dumpable: {e}"))
}

/// Why runners may not be started as other identities on this host, if they may not.
///
/// A runner's set-up shares the supervisor's memory until it executes the runner, and it
/// changes its uid before that. The kernel then marks that memory dumpable as
/// `fs.suid_dumpable` says: at 1 ("debug"), a process of the job's uid could trace the set-up
/// in that moment and write into the supervisor's memory. At 0 (the default) and 2 only root
/// can.
///
/// Read before every runner (the setting may change while the supervisor runs): one `pread`
/// of a descriptor opened once, as a sysctl file gives its current value at every read.
fn dumpable_refusal() -> Option<String> {
    use std::os::unix::fs::FileExt as _;
    static SETTING: OnceLock<Option<std::fs::File>> = OnceLock::new();
    let file = SETTING
        .get_or_init(|| std::fs::File::open("/proc/sys/fs/suid_dumpable").ok())
        .as_ref()?;
    let mut value = [0; 4];
    let read = file.read_at(&mut value, 0).ok()?;
    refusal_for(std::str::from_utf8(&value[..read]).ok()?)
}

/// [`dumpable_refusal`] for this value of `fs.suid_dumpable`.
fn refusal_for(setting: &str) -> Option<String> {
    (setting.trim() == "1").then(|| {
        "fs.suid_dumpable is 1: a job could trace its runner while it starts and write into \
         this process's memory; set it to 0 or 2 (sysctl -w fs.suid_dumpable=2)"
            .to_owned()
    })
}

/// A started runner: its pid (not yet reaped: see [`crate::reaper`]) and its pipes.
#[derive(Debug)]
pub struct Spawned {
    pub pid: Pid,
    pub stdin: pipe::Sender,
    pub stdout: pipe::Receiver,
    pub stderr: pipe::Receiver,
}

/// Starts `runner --pipe` with the environment `env`, as `identity` (when `switch`), with
/// stdin, stdout and stderr piped and the descriptors `keep` left open across exec, at the same
/// numbers; every other descriptor is closed at exec. Start it through [`Reaper::spawn`], which registers it.
///
/// The child is made the way `posix_spawn` makes one: `clone(CLONE_VM | CLONE_VFORK)` on a
/// stack of its own, so the supervisor's memory is neither copied nor write-protected (with
/// `fork`, the copy and the copy-on-write faults after it were about 7 % of all CPU time
/// when trivial jobs ran back to back).
/// This thread waits until the child has called `execve` or failed. Until then the child
/// shares the supervisor's memory, so it only reads a `Plan` made beforehand and makes
/// plain system calls (`Plan::become_runner`).
pub fn spawn_runner(
    runner: &Path,
    env: &BTreeMap<String, String>,
    identity: &Identity,
    switch: bool,
    keep: [RawFd; 2],
    limits: RunnerLimits,
) -> io::Result<Spawned> {
    let (stdin, to_stdin) = pipe2(OFlag::O_CLOEXEC)?;
    let (from_stdout, stdout) = pipe2(OFlag::O_CLOEXEC)?;
    let (from_stderr, stderr) = pipe2(OFlag::O_CLOEXEC)?;
    // Ours, ready before the child exists: nothing may fail once it runs unregistered.
    let ours = (
        pipe::Sender::from_owned_fd(to_stdin)?,
        pipe::Receiver::from_owned_fd(from_stdout)?,
        pipe::Receiver::from_owned_fd(from_stderr)?,
    );
    let plan = Plan::new(
        runner,
        env,
        [stdin.as_raw_fd(), stdout.as_raw_fd(), stderr.as_raw_fd()],
        keep,
        limits,
        switch.then(|| Switch {
            uid: identity.uid.as_raw(),
            gid: identity.gid.as_raw(),
            groups: identity.groups.iter().map(|g| g.as_raw()).collect(),
        }),
    )?;
    let pid = plan.start()?;
    // The child's ends: it has its own copies now.
    drop((stdin, stdout, stderr));
    let (stdin, stdout, stderr) = ours;
    Ok(Spawned {
        pid,
        stdin,
        stdout,
        stderr,
    })
}

/// The identity a runner switches to, as raw ids.
struct Switch {
    uid: libc::uid_t,
    gid: libc::gid_t,
    groups: Vec<libc::gid_t>,
}

/// The step of [`Plan::become_runner`] that failed, for the error message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(i32)]
enum Step {
    Signals = 1,
    Stdio,
    ProcessGroup,
    WorkingDirectory,
    Rlimits,
    Groups,
    Gid,
    Uid,
    NoNewPrivs,
    DeathSignal,
    Orphaned,
    Descriptors,
    Exec,
}

impl Step {
    const ALL: [Self; 13] = [
        Self::Signals,
        Self::Stdio,
        Self::ProcessGroup,
        Self::WorkingDirectory,
        Self::Rlimits,
        Self::Groups,
        Self::Gid,
        Self::Uid,
        Self::NoNewPrivs,
        Self::DeathSignal,
        Self::Orphaned,
        Self::Descriptors,
        Self::Exec,
    ];

    fn describe(self) -> &'static str {
        match self {
            Self::Signals => "resetting its signal handlers",
            Self::Stdio => "connecting its pipes",
            Self::ProcessGroup => "giving it a process group of its own",
            Self::WorkingDirectory => "changing to /",
            Self::Rlimits => "setting its rlimits",
            Self::Groups => "setting its supplementary groups",
            Self::Gid => "setting its group id",
            Self::Uid => "setting its user id",
            Self::NoNewPrivs => "setting PR_SET_NO_NEW_PRIVS",
            Self::DeathSignal => "setting PR_SET_PDEATHSIG",
            Self::Orphaned => "checking that the supervisor is still its parent",
            Self::Descriptors => "closing the supervisor's descriptors",
            Self::Exec => "executing it",
        }
    }
}

/// Everything the child of [`spawn_runner`] needs, made before the clone: the child may read
/// it but allocates nothing, takes no lock and touches no other memory of the supervisor's.
struct Plan {
    /// The runner's path, `argv` and `envp` point into these.
    _strings: Vec<CString>,
    path: *const libc::c_char,
    argv: Vec<*const libc::c_char>,
    envp: Vec<*const libc::c_char>,
    /// The child's ends of its stdin, stdout and stderr pipes.
    stdio: [RawFd; 3],
    keep: [RawFd; 2],
    limits: RunnerLimits,
    switch: Option<Switch>,
    /// The supervisor's pid: the runner's parent must still be it once `PR_SET_PDEATHSIG` is set.
    parent: libc::pid_t,
    /// Written by the child when it fails: the [`Step`] and the errno.
    failed: [AtomicI32; 2],
    /// The child's pid, for the [`watchdog`].
    set_up: Arc<SetUp>,
    /// Tests only: the child stops itself just before it executes the runner.
    #[cfg(test)]
    stop_itself: bool,
}

impl Plan {
    fn new(
        runner: &Path,
        env: &BTreeMap<String, String>,
        stdio: [RawFd; 3],
        keep: [RawFd; 2],
        limits: RunnerLimits,
        switch: Option<Switch>,
    ) -> io::Result<Self> {
        if let Some(refusal) = switch.as_ref().and_then(|_| dumpable_refusal()) {
            return Err(io::Error::other(refusal));
        }
        let c = |bytes: Vec<u8>| {
            CString::new(bytes)
                .map_err(|_| io::Error::other("a NUL byte in the runner's path or environment"))
        };
        let mut strings = vec![
            c(runner.as_os_str().as_bytes().to_vec())?,
            c(b"--pipe".to_vec())?,
        ];
        for (name, value) in env {
            strings.push(c(format!("{name}={value}").into_bytes())?);
        }
        let pointers: Vec<_> = strings.iter().map(|s| s.as_ptr()).collect();
        let null = std::ptr::null();
        Ok(Self {
            path: pointers[0],
            argv: vec![pointers[0], pointers[1], null],
            envp: pointers[2..].iter().copied().chain([null]).collect(),
            _strings: strings,
            stdio,
            keep,
            limits,
            switch,
            parent: getpid().as_raw(),
            failed: [AtomicI32::new(0), AtomicI32::new(0)],
            set_up: Arc::default(),
            #[cfg(test)]
            stop_itself: tests::STOP_BEFORE_EXEC.with(std::cell::Cell::get),
        })
    }

    /// Clones the child that becomes the runner, and returns its pid once it has executed the
    /// runner. If it failed before, it has exited (the reaper collects it) and `Err` says why.
    fn start(&self) -> io::Result<Pid> {
        const STACK: usize = 64 * 1024;
        let watch = watchdog::watch(&self.set_up)?;
        // The child's stack: from the heap, uninitialised (the child writes before it reads).
        let mut stack = Box::<[u8]>::new_uninit_slice(STACK);
        // Every signal is blocked across the clone, so that none runs one of the supervisor's
        // handlers in the child (on the shared memory); the child resets them before it
        // unblocks any. Ours are restored right after.
        let before = SigSet::all().thread_swap_mask(SigmaskHow::SIG_SETMASK)?;
        // SAFETY: `child` only reads `self`, which outlives the call (this thread is suspended
        // until the child has executed or exited), and runs on `stack`, which lives as long,
        // from its top aligned down to 16 bytes. SIGCHLD makes it an ordinary child for the
        // reaper's waitpid(-1).
        let (pid, clone_error) = unsafe {
            let end = stack.as_mut_ptr_range().end;
            let top = end.wrapping_sub(end as usize % 16).cast::<libc::c_void>();
            let pid = libc::clone(
                child,
                top,
                libc::CLONE_VM | libc::CLONE_VFORK | libc::SIGCHLD,
                std::ptr::from_ref(self).cast_mut().cast(),
            );
            (pid, io::Error::last_os_error())
        };
        let _ = before.thread_set_mask();
        let killed = watch.end();
        if pid < 0 {
            return Err(clone_error);
        }
        if killed {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                format!(
                    "it did not get as far as executing the runner within {} s (stopped by a \
                     process of the job's user?), and was killed",
                    watchdog::LIMIT.as_secs()
                ),
            ));
        }
        let [step, errno] = self.failed.each_ref().map(|a| a.load(Ordering::SeqCst));
        if step == 0 {
            return Ok(Pid::from_raw(pid));
        }
        let step = Step::ALL
            .into_iter()
            .find(|s| *s as i32 == step)
            .map_or("starting it", Step::describe);
        let errno = io::Error::from_raw_os_error(errno);
        Err(io::Error::new(errno.kind(), format!("{step}: {errno}")))
    }

    /// What the child does between the clone and the runner. It returns only when a step
    /// failed; on success `execve` does not return.
    ///
    /// # Safety
    /// Only in the child of [`Plan::start`], which shares the supervisor's memory: everything
    /// here is a plain system call on values of `self`. The uid, gid and groups are changed
    /// with raw system calls, not glibc's wrappers, which would signal every *supervisor*
    /// thread to change its credentials too (they share the supervisor's thread list).
    unsafe fn become_runner(&self) -> (Step, i32) {
        let errno = || nix::errno::Errno::last_raw();
        // Every signal at its default: no handler of the supervisor's may run here, and the
        // runner ignores nothing the supervisor ignores (Rust programs ignore SIGPIPE). The
        // kernel's struct sigaction (handler, flags, restorer, mask) all zero is SIG_DFL. A raw
        // system call, as glibc's wrapper refuses glibc's own two signals, which the
        // supervisor may have been started with ignored.
        let default = [0_u64; 4];
        for signal in 1..=libc::SIGRTMAX() {
            if signal == libc::SIGKILL || signal == libc::SIGSTOP {
                continue; // They cannot be caught, nor reset.
            }
            let size_of_sigset: libc::size_t = 8;
            if libc::syscall(
                libc::SYS_rt_sigaction,
                signal,
                default.as_ptr(),
                std::ptr::null_mut::<u64>(),
                size_of_sigset,
            ) != 0
            {
                return (Step::Signals, errno());
            }
        }
        for (fd, target) in self.stdio.into_iter().zip(0..) {
            let done = if fd == target {
                libc::fcntl(fd, libc::F_SETFD, 0)
            } else {
                libc::dup2(fd, target)
            };
            if done < 0 {
                return (Step::Stdio, errno());
            }
        }
        // Its own process group: a Ctrl-C at the supervisor's terminal reaches only the
        // supervisor, which then decides what happens to the jobs.
        if libc::setpgid(0, 0) != 0 {
            return (Step::ProcessGroup, errno());
        }
        if libc::chdir(c"/".as_ptr()) != 0 {
            return (Step::WorkingDirectory, errno());
        }
        // While still root (`CAP_SYS_RESOURCE`): the kernel then records 1000 as the lowest
        // score this process and its children may set, so neither the runner nor a step can
        // make itself less likely to be picked by the OOM killer. Before the rlimits, as a low
        // --max-open-files would leave no descriptor to open it with. Best effort: a system
        // without /proc/self/oom_score_adj still runs jobs. Raw system calls: glibc's open,
        // write and close are cancellation points, which touch the supervisor thread's state.
        let fd = libc::syscall(
            libc::SYS_openat,
            libc::AT_FDCWD,
            c"/proc/self/oom_score_adj".as_ptr(),
            libc::O_WRONLY | libc::O_CLOEXEC,
        );
        if fd >= 0 {
            libc::syscall(
                libc::SYS_write,
                fd,
                RUNNER_OOM_SCORE_ADJ_TEXT.as_ptr(),
                RUNNER_OOM_SCORE_ADJ_TEXT.len(),
            );
            libc::syscall(libc::SYS_close, fd);
        }
        // Also while still root: a process may lower its hard limits but not raise them.
        if let Err(e) = self.limits.apply() {
            return (Step::Rlimits, e as i32);
        }
        if let Some(to) = &self.switch {
            // Order matters: groups and gid while we still may, uid last.
            if libc::syscall(libc::SYS_setgroups, to.groups.len(), to.groups.as_ptr()) != 0 {
                return (Step::Groups, errno());
            }
            if libc::syscall(libc::SYS_setresgid, to.gid, to.gid, to.gid) != 0 {
                return (Step::Gid, errno());
            }
            if libc::syscall(libc::SYS_setresuid, to.uid, to.uid, to.uid) != 0 {
                return (Step::Uid, errno());
            }
        }
        // No setuid binary can give the job privileges back.
        if libc::prctl(libc::PR_SET_NO_NEW_PRIVS, 1, 0, 0, 0) != 0 {
            return (Step::NoNewPrivs, errno());
        }
        // After the uid change, which clears it. The runner treats SIGTERM as "stop now".
        if libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGTERM, 0, 0, 0) != 0 {
            return (Step::DeathSignal, errno());
        }
        // The supervisor may have died before the prctl; then nobody would tell us.
        if libc::getppid() != self.parent {
            return (Step::Orphaned, libc::ESRCH);
        }
        // Nothing but stdio and `keep` may cross the exec, whatever the supervisor holds.
        if libc::close_range(
            3,
            libc::c_uint::MAX,
            libc::CLOSE_RANGE_CLOEXEC.cast_signed(),
        ) != 0
        {
            return (Step::Descriptors, errno());
        }
        for fd in self.keep {
            if libc::fcntl(fd, libc::F_SETFD, 0) != 0 {
                return (Step::Descriptors, errno());
            }
        }
        #[cfg(test)]
        if self.stop_itself {
            libc::syscall(
                libc::SYS_kill,
                libc::syscall(libc::SYS_getpid),
                libc::SIGSTOP,
            );
        }
        let empty: libc::sigset_t = std::mem::zeroed();
        libc::sigprocmask(libc::SIG_SETMASK, &raw const empty, std::ptr::null_mut());
        libc::execve(self.path, self.argv.as_ptr(), self.envp.as_ptr());
        (Step::Exec, errno())
    }
}

/// The child's entry point: becomes the runner, or records why not and exits.
extern "C" fn child(plan: *mut libc::c_void) -> libc::c_int {
    // SAFETY: `plan` is the `Plan` that `Plan::start` passed, alive while the parent waits.
    unsafe {
        let plan = &*plan.cast::<Plan>();
        #[allow(clippy::cast_possible_truncation)] // A pid is an i32 in a long.
        let pid = libc::syscall(libc::SYS_getpid) as i32;
        plan.set_up.pid.store(pid, Ordering::SeqCst);
        let (step, errno) = plan.become_runner();
        plan.failed[1].store(errno, Ordering::SeqCst);
        plan.failed[0].store(step as i32, Ordering::SeqCst);
        libc::_exit(127)
    }
}

/// A runner's set-up in progress, as the [`watchdog`] sees it.
#[derive(Debug, Default)]
struct SetUp {
    /// The child's pid, written by the child first thing (0 until then).
    pid: AtomicI32,
    /// Whether the watchdog killed it.
    killed: AtomicBool,
}

/// Kills a runner's set-up that has not executed the runner within [`watchdog::LIMIT`].
///
/// The thread that starts a runner waits until the child has executed it, and from the moment
/// the child has the job's uid, any process of that user may stop it (SIGSTOP): with a pool of
/// one user, another job could freeze the supervisor's only runtime thread that way. So one
/// thread, started with the first runner, looks twice a second at the set-ups in progress and
/// sends SIGKILL to one past its time, which ends the wait; the start then fails (a host
/// fault: the job is retried). The pid cannot have been reused: the child is not reaped before
/// [`Reaper::spawn`] has registered it, after the wait.
mod watchdog {
    use super::{Arc, Duration, Instant, Mutex, Ordering, PoisonError, SetUp};

    /// How long a set-up may take: it is a few dozen system calls.
    pub(super) const LIMIT: Duration = Duration::from_secs(1);

    /// The set-ups in progress, each with its deadline.
    type SetUps = Vec<(Instant, Arc<SetUp>)>;

    /// Whether the thread runs, and the set-ups it watches.
    static WATCHING: Mutex<(bool, SetUps)> = Mutex::new((false, Vec::new()));

    /// Watches `set_up` until [`Watch::end`].
    pub(super) fn watch(set_up: &Arc<SetUp>) -> std::io::Result<Watch> {
        let mut watching = WATCHING.lock().unwrap_or_else(PoisonError::into_inner);
        if !watching.0 {
            std::thread::Builder::new()
                .name("spawn-watchdog".to_owned())
                .stack_size(64 * 1024)
                .spawn(look_forever)?;
            watching.0 = true;
        }
        watching.1.push((Instant::now() + LIMIT, set_up.clone()));
        Ok(Watch(set_up.clone()))
    }

    /// A set-up being watched, until this is dropped.
    pub(super) struct Watch(Arc<SetUp>);

    impl Watch {
        /// Stops watching; whether the watchdog killed it.
        pub(super) fn end(self) -> bool {
            let set_up = self.0.clone();
            drop(self);
            set_up.killed.load(Ordering::SeqCst)
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            let mut watching = WATCHING.lock().unwrap_or_else(PoisonError::into_inner);
            watching.1.retain(|(_, s)| !Arc::ptr_eq(s, &self.0));
        }
    }

    fn look_forever() {
        loop {
            std::thread::sleep(LIMIT / 2);
            let now = Instant::now();
            let watching = WATCHING.lock().unwrap_or_else(PoisonError::into_inner);
            for (deadline, set_up) in &watching.1 {
                let pid = set_up.pid.load(Ordering::SeqCst);
                if now >= *deadline && pid > 0 && !set_up.killed.swap(true, Ordering::SeqCst) {
                    // Our child, not yet reaped: the pid is still its own.
                    let _ = nix::sys::signal::kill(
                        nix::unistd::Pid::from_raw(pid),
                        nix::sys::signal::Signal::SIGKILL,
                    );
                }
            }
        }
    }
}

/// Sends SIGKILL to every process whose uid is `uid`: what a job left behind, wherever it is
/// — stopped, double-forked, in a namespace of its own — when its runner could not see to it
/// (it died, or was stopped and killed).
///
/// `kill(-1, SIGKILL)` reaches every process the caller may signal: from a process whose uid
/// is `uid`, exactly the processes of `uid`. A process forking at that moment cannot slip
/// through: the kernel signals under the task-list lock, and a fork whose parent has a fatal
/// signal pending fails. The call is made by a short-lived child of the supervisor that
/// switches to `uid` for good: a separate process, because anything running as `uid` may be
/// signalled by the job's own processes (a thread of the supervisor could be stopped, taking
/// the supervisor with it). If that child does not report within a second (a job's process
/// stopped it first), it is killed and `Err` returned; the caller then kills by `/proc`.
///
/// Only for a dedicated identity: it must never be root or the supervisor's own uid.
pub fn kill_all_as(uid: Uid, reaper: &Reaper) -> io::Result<()> {
    if uid.is_root() || uid == nix::unistd::geteuid() {
        return Err(io::Error::other(format!(
            "refusing to kill every process of uid {uid}: it is ours"
        )));
    }
    let raw = uid.as_raw();
    let (child, mut exited) = reaper.spawn(|| {
        // SAFETY: the child runs nothing but three raw system calls and _exit (async-signal-
        // safe, touching no memory of the parent's but the integer `raw`), and never returns.
        match unsafe { fork() }? {
            ForkResult::Child => unsafe {
                if nix::libc::syscall(nix::libc::SYS_setresuid, raw, raw, raw) != 0 {
                    nix::libc::_exit(2);
                }
                nix::libc::kill(-1, nix::libc::SIGKILL);
                nix::libc::_exit(0)
            },
            ForkResult::Parent { child } => Ok((child, child)),
        }
    })?;
    let deadline = Instant::now() + Duration::from_secs(1);
    loop {
        match exited.try_recv() {
            Ok(Exit::Code(0)) => return Ok(()),
            Ok(other) => {
                return Err(io::Error::other(format!(
                    "the process killing them {}",
                    other.describe()
                )))
            }
            Err(TryRecvError::Closed) => return Err(io::Error::other("the reaper is gone")),
            Err(TryRecvError::Empty) if Instant::now() < deadline => {
                std::thread::sleep(Duration::from_micros(200));
            }
            Err(TryRecvError::Empty) => {
                if reaper.is_watched(child) {
                    let _ = kill(child, Signal::SIGKILL);
                }
                return Err(io::Error::other(
                    "the process killing them did not finish (stopped by one of them?)",
                ));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use std::io::Write as _;
    use std::os::unix::fs::PermissionsExt as _;

    use nix::sys::wait::{waitpid, WaitStatus};
    use nix::unistd::{Gid, Uid};
    use tokio::io::AsyncReadExt as _;

    use super::*;

    fn env() -> BTreeMap<String, String> {
        nats_fs::step_env::base_env()
    }

    fn me() -> Identity {
        Identity {
            name: "me".to_owned(),
            uid: Uid::current(),
            gid: Gid::current(),
            groups: Vec::new(),
        }
    }

    /// A "runner" in a folder anyone may read that reports how it was started, then exits 7.
    fn reporter(dir: &Path) -> std::path::PathBuf {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755)).unwrap();
        let path = dir.join("report");
        let mut file = std::fs::File::create(&path).unwrap();
        file.write_all(
            // The status first, with builtins only: the shell blocks every signal while it
            // forks, and a child reading its status then would see that.
            b"#!/bin/sh\n\
              while read -r line; do case $line in\n\
                SigBlk:*|SigIgn:*|NoNewPrivs:*|Uid:*|Gid:*|Groups:*) echo \"$line\";;\n\
              esac; done < /proc/$$/status\n\
              echo \"args=$1 cwd=$(pwd) pgid=$(cut -d' ' -f5 /proc/$$/stat) pid=$$\"\n\
              echo \"core=$(ulimit -c) oom=$(cat /proc/self/oom_score_adj)\"\n\
              env | sort\n\
              echo to-stderr >&2\n\
              echo fds:\n\
              exec sh -c 'ls /proc/self/fd; exit 7'\n",
        )
        .unwrap();
        file.set_permissions(std::fs::Permissions::from_mode(0o755))
            .unwrap();
        path
    }

    /// Starts the reporter as `identity` and returns what it printed on stdout.
    async fn report(
        identity: &Identity,
        switch: bool,
        keep: [RawFd; 2],
        limits: RunnerLimits,
    ) -> String {
        let dir = tempfile::tempdir().unwrap();
        let mut spawned = spawn_runner(
            &reporter(dir.path()),
            &env(),
            identity,
            switch,
            keep,
            limits,
        )
        .unwrap();
        drop(spawned.stdin);
        let (mut out, mut err) = (String::new(), String::new());
        spawned.stdout.read_to_string(&mut out).await.unwrap();
        spawned.stderr.read_to_string(&mut err).await.unwrap();
        assert_eq!(
            waitpid(spawned.pid, None).unwrap(),
            WaitStatus::Exited(spawned.pid, 7)
        );
        assert_eq!(err, "to-stderr\n");
        let pid = spawned.pid.as_raw();
        assert!(
            out.contains(&format!("args=--pipe cwd=/ pgid={pid} pid={pid}\n")),
            "{out}"
        );
        out
    }

    #[tokio::test]
    async fn a_runner_starts_from_slash_with_its_pipes_limits_defaults_and_nothing_else() {
        let keep = [
            std::fs::File::open("/dev/null").unwrap(),
            std::fs::File::open("/dev/null").unwrap(),
        ];
        // A descriptor that must not reach the child, left open across exec as a careless
        // library might leave one: only the child's close_range can keep it out.
        let stray = std::fs::File::open("/dev/null").unwrap();
        nix::fcntl::fcntl(&stray, nix::fcntl::F_SETFD(nix::fcntl::FdFlag::empty())).unwrap();
        let oom_before = std::fs::read_to_string("/proc/self/oom_score_adj").unwrap();
        let out = report(
            &me(),
            false,
            keep.each_ref().map(AsRawFd::as_raw_fd),
            RunnerLimits::default(),
        )
        .await;
        // The OOM score is the runner's alone: the set-up shares the supervisor's memory.
        assert!(out.contains("core=0 oom=1000\n"), "{out}");
        assert_eq!(
            std::fs::read_to_string("/proc/self/oom_score_adj").unwrap(),
            oom_before
        );
        assert!(out.contains("NoNewPrivs:\t1\n"), "{out}");
        // This test process ignores SIGPIPE (as every Rust program does) and the clone ran with
        // every signal blocked: the runner has neither.
        assert!(out.contains("SigBlk:\t0000000000000000\n"), "{out}");
        assert!(out.contains("SigIgn:\t0000000000000000\n"), "{out}");
        let names: Vec<&str> = out
            .lines()
            .filter(|l| l.contains('=') && !l.contains(' '))
            .map(|l| l.split('=').next().unwrap())
            .filter(|name| !["PWD", "SHLVL", "_"].contains(name))
            .collect();
        assert_eq!(names, ["LANG", "PATH"], "{out}");
        // What ls inherits through the runner's exec and a shell of its own: stdio, the two
        // kept descriptors, and ls's handle on the folder it lists; not `stray`.
        let fds = out.split_once("fds:\n").unwrap().1;
        let mut listed: Vec<i32> = fds.lines().map(|n| n.parse().unwrap()).collect();
        listed.sort_unstable();
        assert!(listed.starts_with(&[0, 1, 2]), "{fds}");
        for fd in &keep {
            assert!(listed.contains(&fd.as_raw_fd()), "{fds}");
        }
        assert!(!listed.contains(&stray.as_raw_fd()), "{fds}");
        assert_eq!(listed.len(), 6, "{fds}; kept {keep:?}, stray {stray:?}");
    }

    #[tokio::test]
    async fn a_runner_started_by_root_runs_as_its_identity_and_groups_only() {
        if !Uid::effective().is_root() {
            eprintln!("skipped: switching identities needs root");
            return;
        }
        let nobody = Identity {
            name: "nobody".to_owned(),
            uid: Uid::from_raw(65534),
            gid: Gid::from_raw(65533),
            groups: vec![Gid::from_raw(65532)],
        };
        let out = report(&nobody, true, [0, 0], RunnerLimits::default()).await;
        assert!(out.contains("Uid:\t65534\t65534\t65534\t65534\n"), "{out}");
        assert!(out.contains("Gid:\t65533\t65533\t65533\t65533\n"), "{out}");
        assert!(out.contains("Groups:\t65532\n"), "{out}");
        // The credentials changed in the child only.
        assert!(Uid::current().is_root() && Gid::current().as_raw() == 0);
    }

    #[tokio::test]
    async fn a_low_open_files_ceiling_still_gets_the_runner_its_oom_score() {
        // Every descriptor below 40 taken here, so the child's lowest free one is above the
        // ceiling until its exec closes them.
        let held: Vec<_> = (0..40)
            .map(|_| std::fs::File::open("/dev/null").unwrap())
            .collect();
        assert!(held.last().unwrap().as_raw_fd() >= 40);
        let mut ceilings = Limits::default();
        ceilings.set(Kind::OpenFiles, Some(32));
        let out = report(&me(), false, [0, 0], RunnerLimits::new(&ceilings)).await;
        assert!(out.contains("core=0 oom=1000\n"), "{out}");
    }

    thread_local! {
        /// Makes the children of this thread's next spawns stop themselves before exec.
        pub static STOP_BEFORE_EXEC: std::cell::Cell<bool> = const { std::cell::Cell::new(false) };
    }

    #[tokio::test]
    async fn a_set_up_stopped_before_exec_is_killed_and_the_start_fails() {
        let dir = tempfile::tempdir().unwrap();
        STOP_BEFORE_EXEC.with(|stop| stop.set(true));
        let started = Instant::now();
        let e = spawn_runner(
            &reporter(dir.path()),
            &env(),
            &me(),
            false,
            [0, 0],
            RunnerLimits::default(),
        )
        .expect_err("a stopped set-up cannot start a runner");
        STOP_BEFORE_EXEC.with(|stop| stop.set(false));
        let took = started.elapsed();
        assert_eq!(e.kind(), io::ErrorKind::TimedOut, "{e}");
        assert!(e.to_string().contains("was killed"), "{e}");
        assert!(
            took >= watchdog::LIMIT && took < watchdog::LIMIT * 3,
            "{took:?}"
        );
        // And the next start, not stopped, works.
        let out = report(&me(), false, [0, 0], RunnerLimits::default()).await;
        assert!(out.contains("core=0"), "{out}");
    }

    #[test]
    fn only_a_suid_dumpable_of_1_is_refused() {
        for (setting, refused) in [("0\n", false), ("1\n", true), ("2\n", false)] {
            assert_eq!(refusal_for(setting).is_some(), refused, "{setting}");
        }
        assert!(refusal_for("1")
            .unwrap()
            .contains("sysctl -w fs.suid_dumpable=2"));
    }

    #[tokio::test]
    async fn a_runner_that_cannot_be_executed_is_an_error_naming_the_step() {
        let dir = tempfile::tempdir().unwrap();
        let not_executable = dir.path().join("runner");
        std::fs::write(&not_executable, "#!/bin/sh\n").unwrap();
        for (path, why) in [
            (not_executable.as_path(), io::ErrorKind::PermissionDenied),
            (Path::new("/nonexistent/runner"), io::ErrorKind::NotFound),
        ] {
            // The failed child is left a zombie here: reaping it is the reaper's job.
            let e = spawn_runner(path, &env(), &me(), false, [0, 0], RunnerLimits::default())
                .expect_err("it cannot start");
            assert_eq!(e.kind(), why, "{e}");
            assert!(e.to_string().starts_with("executing it: "), "{e}");
        }
    }
}
