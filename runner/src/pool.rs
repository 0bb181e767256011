//! Several file system calls in flight at once, for a drive where every call is a round trip.
//!
//! On a network share (NFS, SMB, sshfs) opening, reading, listing and creating files each wait
//! for the server, and one file after another leaves the link idle for most of the time: a copy
//! of many small files is bound by latency, not bandwidth. [`run`] works through a queue of
//! tasks on up to `--share-parallelism` threads, the way `xcp`/`fcp`-style copiers do; a task
//! may add more (a folder listed adds its subfolders), so walks of different folders do not
//! wait on each other.
//!
//! Threads are started only when there is work queued that no thread is free to take, so a
//! job of one file starts none, and a small one few. The first error stops the rest: queued
//! tasks are dropped, running ones finish, and [`run`] returns that error.

use std::collections::VecDeque;
use std::sync::{Condvar, Mutex, MutexGuard, PoisonError};
use std::thread::Scope;

/// The shared queue, as a task sees it: where it adds more tasks.
pub(crate) struct Tasks<'scope, 'env, T, E> {
    shared: &'scope Shared<T, E>,
    scope: &'scope Scope<'scope, 'env>,
    work: &'scope Work<'scope, 'env, T, E>,
}

/// What a task is done with.
type Work<'scope, 'env, T, E> =
    dyn Fn(T, &Tasks<'scope, 'env, T, E>) -> Result<(), E> + Sync + 'scope;

impl<T, E> Clone for Tasks<'_, '_, T, E> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<T, E> Copy for Tasks<'_, '_, T, E> {}

struct Shared<T, E> {
    state: Mutex<State<T, E>>,
    wake: Condvar,
    most: usize,
}

struct State<T, E> {
    queue: VecDeque<T>,
    /// Threads working on a task.
    busy: usize,
    /// Threads waiting for one.
    idle: usize,
    /// Threads started that have not asked for a task yet.
    starting: usize,
    /// Threads in all, the caller's included.
    threads: usize,
    failed: Option<E>,
}

/// Runs `work` on every task of `first` and on every task the work adds, on the calling thread
/// and up to `threads - 1` more; returns once all are done, or the first error once the tasks
/// already running have finished.
pub(crate) fn run<T, E, F>(threads: usize, first: Vec<T>, work: F) -> Result<(), E>
where
    T: Send,
    E: Send,
    F: Fn(T, &Tasks<'_, '_, T, E>) -> Result<(), E> + Sync,
{
    let shared = Shared {
        state: Mutex::new(State {
            queue: first.into(),
            busy: 0,
            idle: 0,
            starting: 0,
            threads: 1,
            failed: None,
        }),
        wake: Condvar::new(),
        most: threads.max(1),
    };
    std::thread::scope(|scope| {
        let tasks = Tasks {
            shared: &shared,
            scope,
            work: &work,
        };
        // The caller takes the first task itself.
        tasks.grow(1);
        tasks.work(false);
    });
    let state = shared
        .state
        .into_inner()
        .unwrap_or_else(PoisonError::into_inner);
    state.failed.map_or(Ok(()), Err)
}

impl<T: Send, E: Send> Tasks<'_, '_, T, E> {
    /// Adds a task.
    pub(crate) fn push(&self, task: T) {
        self.lock().queue.push_back(task);
        self.shared.wake.notify_one();
        self.grow(0);
    }

    /// Starts threads for the queued tasks that no thread is free to take (but `reserved`,
    /// which a thread about to ask will), up to the most allowed.
    fn grow(&self, reserved: usize) {
        loop {
            {
                let mut state = self.lock();
                let unclaimed = state
                    .queue
                    .len()
                    .saturating_sub(state.idle + state.starting + reserved);
                if unclaimed == 0 || state.threads >= self.shared.most || state.failed.is_some() {
                    return;
                }
                state.threads += 1;
                state.starting += 1;
            }
            let tasks = *self;
            self.scope.spawn(move || tasks.work(true));
        }
    }

    /// Takes tasks until there are none left and none running, or one failed. `started`: this
    /// is a thread [`Tasks::grow`] started.
    fn work(&self, mut started: bool) {
        loop {
            let task = {
                let mut state = self.lock();
                if std::mem::take(&mut started) {
                    state.starting -= 1;
                }
                loop {
                    if state.failed.is_some() {
                        break None;
                    }
                    if let Some(task) = state.queue.pop_front() {
                        state.busy += 1;
                        break Some(task);
                    }
                    if state.busy == 0 {
                        break None;
                    }
                    state.idle += 1;
                    state = self
                        .shared
                        .wake
                        .wait(state)
                        .unwrap_or_else(PoisonError::into_inner);
                    state.idle -= 1;
                }
            };
            let Some(task) = task else {
                // Nothing left: the others may be waiting to hear it.
                self.shared.wake.notify_all();
                return;
            };
            let done = (self.work)(task, self);
            let mut state = self.lock();
            state.busy -= 1;
            if let Err(e) = done {
                state.queue.clear();
                state.failed.get_or_insert(e);
            }
            let over = state.busy == 0 && state.queue.is_empty() || state.failed.is_some();
            drop(state);
            if over {
                self.shared.wake.notify_all();
            }
        }
    }

    fn lock(&self) -> MutexGuard<'_, State<T, E>> {
        self.shared
            .state
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashSet;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::time::Duration;

    #[test]
    fn every_task_and_every_task_added_runs_once() {
        let seen = Mutex::new(Vec::new());
        // A tree: task n adds 2n+1 and 2n+2 below 1000.
        run(8, vec![0_u32], |n, tasks| -> Result<(), ()> {
            seen.lock().unwrap().push(n);
            for child in [2 * n + 1, 2 * n + 2] {
                if child < 1000 {
                    tasks.push(child);
                }
            }
            Ok(())
        })
        .unwrap();
        let seen = seen.into_inner().unwrap();
        assert_eq!(seen.len(), 1000);
        assert_eq!(seen.iter().collect::<HashSet<_>>().len(), 1000);
    }

    #[test]
    fn waits_overlap_on_several_threads_and_no_more_than_allowed() {
        let running = AtomicUsize::new(0);
        let most = AtomicUsize::new(0);
        let threads = Mutex::new(HashSet::new());
        let started = std::time::Instant::now();
        run(4, (0..16).collect(), |_: u32, _| -> Result<(), ()> {
            let now = running.fetch_add(1, Ordering::SeqCst) + 1;
            most.fetch_max(now, Ordering::SeqCst);
            threads.lock().unwrap().insert(std::thread::current().id());
            // A round trip to a server.
            std::thread::sleep(Duration::from_millis(20));
            running.fetch_sub(1, Ordering::SeqCst);
            Ok(())
        })
        .unwrap();
        assert_eq!(most.load(Ordering::SeqCst), 4);
        assert_eq!(threads.into_inner().unwrap().len(), 4);
        // 16 waits of 20 ms, four at a time: about 80 ms, not 320.
        assert!(started.elapsed() < Duration::from_millis(250));
    }

    #[test]
    fn a_single_task_starts_no_thread() {
        let me = std::thread::current().id();
        run(16, vec![()], |(), _| -> Result<(), ()> {
            assert_eq!(std::thread::current().id(), me);
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn the_first_error_stops_the_rest() {
        let ran = AtomicUsize::new(0);
        let err = run(2, (0..1000).collect(), |n: u32, _| {
            ran.fetch_add(1, Ordering::SeqCst);
            if n == 3 {
                Err(n)
            } else {
                Ok(())
            }
        })
        .unwrap_err();
        assert_eq!(err, 3);
        assert!(ran.load(Ordering::SeqCst) < 100);
    }
}
