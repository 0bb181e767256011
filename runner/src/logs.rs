//! A step's log: its output, through a pipe, onto the shared drive as it is written.
//!
//! A step's stdout and stderr are both the write end of one pipe, so its output arrives in
//! order, and the step never holds a descriptor of anything on the share. A
//! thread of the runner's ([`Copier`]) reads the pipe and appends what arrives to
//! `results/step_N.log`, opened by the runner with the share user's rights: a line written by
//! the step is on the drive within a read and a write. On a drive that holds writes back
//! (NFS), it also pushes the log out (`fdatasync`) at most every `push_every`, so that other
//! hosts see it grow.
//!
//! The copier keeps the count the output quota needs: it writes at most `quota` bytes, then
//! says so ([`Progress::stopped`]) and drops the rest, so a log is never longer than the quota
//! allows and the step can be killed at once. A write the drive refuses (full, or an error) is
//! remembered, said the same way, and the rest dropped too: the step is killed, as its output
//! has nowhere to go. The pipe is always read to its end, so a step never blocks on, or dies
//! of, a log the drive no longer takes. Memory stays the size of the buffer, however much a
//! step prints.

use std::fs::File;
use std::io::{self, Read, Write};
use std::os::fd::AsFd;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use nix::poll::{poll, PollFd, PollFlags, PollTimeout};
use tokio::sync::Notify;
use tokio::task::JoinHandle;

/// Bytes read from the pipe at a time.
const BUFFER: usize = 64 * 1024;

/// What the copier has done so far, for the step's watch.
#[derive(Debug, Default)]
pub(crate) struct Progress {
    /// Bytes the step printed (whether or not they all went into the log).
    printed: AtomicU64,
    /// Bytes written to the log.
    written: AtomicU64,
    /// Whether the step printed more than the quota allowed.
    over_quota: AtomicBool,
    /// Whether the drive refused a write of the log.
    failed: AtomicBool,
    /// Said when the log stops taking the step's output (the quota passed, a write refused).
    stopped: Notify,
}

impl Progress {
    /// Bytes the step has printed so far.
    pub(crate) fn printed(&self) -> u64 {
        self.printed.load(Ordering::Relaxed)
    }

    /// Bytes in the log so far.
    #[cfg(test)]
    pub(crate) fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether the step printed more than its quota.
    pub(crate) fn over_quota(&self) -> bool {
        self.over_quota.load(Ordering::Relaxed)
    }

    /// Whether the drive refused a write of the log.
    pub(crate) fn failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    /// Resolves once the log no longer takes the step's output: the step has printed more
    /// than its quota, or the drive refused a write. What it prints from then on is lost, so
    /// the step must end.
    pub(crate) async fn stopped(&self) {
        loop {
            let stopped = self.stopped.notified();
            if self.over_quota() || self.failed() {
                return;
            }
            stopped.await;
        }
    }

    fn stop(&self, flag: &AtomicBool) {
        flag.store(true, Ordering::Relaxed);
        self.stopped.notify_waiters();
    }
}

/// How a log ended.
#[derive(Debug, Default)]
pub(crate) struct Copied {
    /// Bytes in the log.
    pub(crate) written: u64,
    /// Whether output was dropped at the quota.
    pub(crate) over_quota: bool,
    /// The first write the drive refused, after which the rest was dropped.
    pub(crate) failed: Option<io::Error>,
}

/// The thread copying one step's output to its log.
#[derive(Debug)]
pub(crate) struct Copier {
    done: JoinHandle<(Copied, File)>,
}

impl Copier {
    /// Starts copying `pipe` (the read end) to `log` (opened for appending), at most `quota`
    /// bytes, pushing the log out at most every `push_every`, telling `progress` how far it
    /// got. Start it once the step runs: the pipe holds what the step prints until then, and
    /// a thread woken now would only slow the step's start down.
    pub(crate) fn start(
        pipe: File,
        log: File,
        quota: Option<u64>,
        push_every: Option<Duration>,
        progress: Arc<Progress>,
    ) -> Self {
        // A read blocked on the pipe is a thread of the pool held for the step's life; the
        // runner runs one step at a time.
        let done = tokio::task::spawn_blocking(move || {
            let mut log = log;
            let copied = copy(&pipe, &mut log, &progress, quota, push_every);
            (copied, log)
        });
        Self { done }
    }

    /// Waits, at most `patience`, for the pipe to end (every writer gone) and the log to be
    /// written; returns how it ended and the log. `None` when a writer still holds the pipe
    /// (a process that could not be killed): then the copier is left to finish on its own.
    pub(crate) async fn finish(self, patience: Duration) -> Option<(Copied, File)> {
        tokio::time::timeout(patience, self.done).await.ok()?.ok()
    }
}

/// The copier's loop: until the pipe's end.
fn copy(
    pipe: &File,
    log: &mut File,
    progress: &Progress,
    quota: Option<u64>,
    push_every: Option<Duration>,
) -> Copied {
    let mut copied = Copied::default();
    let mut buf = vec![0u8; BUFFER];
    // When the log was last written and not yet pushed out.
    let mut unpushed: Option<Instant> = None;
    loop {
        if let (Some(every), Some(since)) = (push_every, unpushed) {
            // Wait for more output only until the push is due.
            let due = every.saturating_sub(since.elapsed());
            if due.is_zero() || !readable_within(pipe, due) {
                push(log, &mut copied);
                unpushed = None;
                continue;
            }
        }
        let n = match (&*pipe).read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                copied.failed.get_or_insert(e);
                break;
            }
        };
        progress.printed.fetch_add(n as u64, Ordering::Relaxed);
        let mut take = n;
        if let Some(quota) = quota {
            let room = quota.saturating_sub(copied.written);
            if (n as u64) > room {
                take = usize::try_from(room).unwrap_or(n);
                if !copied.over_quota {
                    copied.over_quota = true;
                    progress.stop(&progress.over_quota);
                }
            }
        }
        if take == 0 || copied.failed.is_some() {
            continue;
        }
        match log.write_all(&buf[..take]) {
            Ok(()) => {
                copied.written += take as u64;
                progress.written.store(copied.written, Ordering::Relaxed);
                unpushed.get_or_insert_with(Instant::now);
            }
            Err(e) => {
                copied.failed = Some(e);
                progress.stop(&progress.failed);
            }
        }
    }
    if unpushed.is_some() {
        push(log, &mut copied);
    }
    copied
}

/// Whether `pipe` has something to read (or its end) within `wait`.
fn readable_within(pipe: &File, wait: Duration) -> bool {
    let mut fds = [PollFd::new(pipe.as_fd(), PollFlags::POLLIN)];
    let millis = u16::try_from(wait.as_millis().max(1)).unwrap_or(u16::MAX);
    matches!(poll(&mut fds, PollTimeout::from(millis)), Ok(n) if n > 0)
}

/// Sends what the log holds to the drive, so that other hosts see it.
fn push(log: &File, copied: &mut Copied) {
    if let Err(e) = log.sync_data() {
        copied.failed.get_or_insert(e);
    }
}

impl Copied {
    /// Whether the drive refused a write because it was full.
    pub(crate) fn drive_full(&self) -> bool {
        self.failed.as_ref().is_some_and(crate::output::is_no_space)
    }
}

/// A pipe for a step's output: the read end for the copier, the write end for the step's
/// stdout and stderr. Both close-on-exec; the step gets its end as its stdio.
pub(crate) fn pipe() -> io::Result<(File, File)> {
    let (read, write) = std::io::pipe()?;
    Ok((
        File::from(std::os::fd::OwnedFd::from(read)),
        File::from(std::os::fd::OwnedFd::from(write)),
    ))
}

/// Makes the log's pipe hold up to 1 MiB, so a step printing in bursts does not wait for a
/// slow drive after every 64 KiB. Best effort.
pub(crate) fn widen(pipe: &File) {
    let _ = nix::fcntl::fcntl(pipe, nix::fcntl::FcntlArg::F_SETPIPE_SZ(1 << 20));
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Seek;

    async fn copied_from(
        quota: Option<u64>,
        push_every: Option<Duration>,
        feed: impl FnOnce(File) + Send + 'static,
    ) -> (Copied, String) {
        let dir = tempfile::tempdir().unwrap();
        let log = File::options()
            .read(true)
            .append(true)
            .create(true)
            .open(dir.path().join("step_0.log"))
            .unwrap();
        let (read, write) = pipe().unwrap();
        let streaming = Copier::start(read, log, quota, push_every, Arc::default());
        std::thread::spawn(move || feed(write));
        let (copied, mut log) = streaming.finish(Duration::from_secs(10)).await.unwrap();
        let mut text = String::new();
        log.rewind().unwrap();
        log.read_to_string(&mut text).unwrap();
        (copied, text)
    }

    #[tokio::test]
    async fn output_arrives_whole_and_in_order() {
        let (copied, text) = copied_from(None, None, |mut w| {
            for i in 0..1000 {
                writeln!(w, "line {i}").unwrap();
            }
        })
        .await;
        assert_eq!(text.lines().count(), 1000);
        assert!(text.starts_with("line 0\n") && text.ends_with("line 999\n"));
        assert_eq!(copied.written, text.len() as u64);
        assert!(!copied.over_quota && copied.failed.is_none());
    }

    #[tokio::test]
    async fn the_log_stops_at_the_quota_and_the_pipe_is_still_drained() {
        let (copied, text) = copied_from(Some(100), Some(Duration::from_millis(5)), |mut w| {
            // Ten times the quota: the writer must never block or see EPIPE.
            for _ in 0..100 {
                w.write_all(&[b'y'; 10]).unwrap();
            }
        })
        .await;
        assert_eq!(text.len(), 100);
        assert!(copied.over_quota);
        assert_eq!(copied.written, 100);
    }

    #[tokio::test]
    async fn a_line_is_in_the_log_before_the_step_ends() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("step_0.log");
        let log = File::options()
            .append(true)
            .create(true)
            .open(&path)
            .unwrap();
        let (read, mut write) = pipe().unwrap();
        let progress = Arc::new(Progress::default());
        let streaming = Copier::start(
            read,
            log,
            None,
            Some(Duration::from_millis(20)),
            progress.clone(),
        );
        write.write_all(b"first\n").unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while std::fs::read_to_string(&path).unwrap() != "first\n" {
            assert!(Instant::now() < deadline, "the line never reached the log");
            tokio::time::sleep(Duration::from_millis(1)).await;
        }
        assert_eq!(progress.written(), 6);
        drop(write);
        let (copied, _) = streaming.finish(Duration::from_secs(5)).await.unwrap();
        assert_eq!(copied.written, 6);
    }
}
