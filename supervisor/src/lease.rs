//! Keeping a running job's lease: progress acks on its message, each confirmed by the server,
//! and refreshes of its id's lock ([`crate::lock`]); a job whose lease is lost is stopped at
//! once rather than run twice.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use nats_fs::protocol::CancelMode;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tokio::time::{sleep_until, timeout, Instant};
use tracing::{debug, error};

use crate::lock::{JobLock, Locks, RefreshError};
use crate::logging::event;
use crate::until;

/// What a lease renews: the message, with progress acks, and the id's lock, when one is held.
/// [`Renewals`] talks to NATS; the tests answer as they please, under paused time.
pub(crate) trait Renew {
    /// Sends a progress ack and waits for the server's confirmation. The lease runs it as a
    /// task of its own, so it borrows nothing.
    fn progress(&self) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static;
    /// How often the lock needs refreshing; `None` without a lock (or one that never expires).
    fn refresh_every(&self) -> Option<Duration>;
    /// Refreshes the lock.
    fn refresh(&mut self) -> impl std::future::Future<Output = Result<(), RefreshError>>;
}

/// The renewals of a delivered message and its id's lock.
pub(crate) struct Renewals<'a> {
    pub(crate) msg: Arc<jetstream::Message>,
    pub(crate) locks: &'a Locks,
    pub(crate) lock: Option<&'a mut JobLock>,
    pub(crate) seq: u64,
    pub(crate) attempt: u64,
}

impl Renew for Renewals<'_> {
    fn progress(&self) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
        let msg = self.msg.clone();
        async move {
            msg.double_ack_with(AckKind::Progress)
                .await
                .map_err(|e| e.to_string())
        }
    }

    fn refresh_every(&self) -> Option<Duration> {
        self.lock.as_ref()?;
        self.locks.refresh_every()
    }

    async fn refresh(&mut self) -> Result<(), RefreshError> {
        match self.lock.as_deref_mut() {
            Some(held) => self.locks.refresh(held, self.seq, self.attempt).await,
            None => Ok(()),
        }
    }
}

/// What keeps a running job's message (and its id's lock) ours.
pub(crate) struct Lease<'a, R> {
    /// The consumer's ack wait.
    pub(crate) ack_wait: Duration,
    /// When the message arrived: the server started its timer a little before.
    pub(crate) received: Instant,
    /// Where the job is told to stop when the lease is lost.
    pub(crate) control: &'a mpsc::Sender<CancelMode>,
    pub(crate) renew: R,
}

impl<R: Renew> Lease<'_, R> {
    /// Drives the job while keeping its lease: a progress ack every third of the ack wait,
    /// each confirmed by the server, and the id's lock refreshed as often as its bucket needs.
    /// If no confirmation has been seen for nearly an ack wait (the connection is down), the
    /// server is about to hand the job to someone else; if the lock was taken by someone else,
    /// someone else runs it already: either way the job is stopped here at once rather than
    /// run twice. Returns how the job ended, and whether the lease was lost.
    pub(crate) async fn keep<T>(
        mut self,
        execution: impl std::future::Future<Output = T>,
    ) -> (T, bool) {
        let ack_wait = self.ack_wait;
        let every = ack_wait / 3;
        let margin = (ack_wait / 10).max(Duration::from_millis(200));
        let mut confirmed = self.received;
        let mut next_progress = self.received + every;
        let mut in_flight: Option<JoinHandle<Option<Instant>>> = None;
        let refresh_every = self.renew.refresh_every();
        let mut next_refresh = refresh_every.map(|every| Instant::now() + every);
        let mut lease_lost = false;
        tokio::pin!(execution);
        loop {
            let expires = confirmed + ack_wait - margin;
            tokio::select! {
                end = &mut execution => {
                    if let Some(task) = in_flight {
                        task.abort();
                    }
                    return (end, lease_lost);
                }
                () = sleep_until(next_progress), if in_flight.is_none() => {
                    let ack = self.renew.progress();
                    in_flight = Some(tokio::spawn(async move {
                        let sent = Instant::now();
                        match timeout(every, ack).await {
                            Ok(Ok(())) => Some(sent),
                            Ok(Err(e)) => { debug!("progress ack failed: {e}"); None }
                            Err(_) => { debug!("progress ack not confirmed in time"); None }
                        }
                    }));
                }
                done = finished(&mut in_flight), if in_flight.is_some() => {
                    in_flight = None;
                    if let Ok(Some(sent)) = done {
                        confirmed = confirmed.max(sent);
                        next_progress = sent + every;
                    } else {
                        // Not confirmed: try again soon, but not in a tight loop.
                        next_progress = soon(every);
                    }
                }
                () = until(next_refresh), if !lease_lost => {
                    let every = refresh_every.unwrap_or(ack_wait / 3);
                    match timeout(every, self.renew.refresh()).await {
                        Ok(Ok(())) => next_refresh = Some(Instant::now() + every),
                        Ok(Err(RefreshError::Lost)) => {
                            lease_lost = true;
                            error!(event = event::LOCK_LOST, "lost this job's lock to another host: stopping it so that it does not run twice");
                            let _ = self.control.try_send(CancelMode::AbortNow);
                        }
                        Ok(Err(RefreshError::Failed(e))) => {
                            debug!("refreshing the job's lock: {e}");
                            next_refresh = Some(soon(every));
                        }
                        Err(_) => {
                            debug!("refreshing the job's lock: no answer in time");
                            next_refresh = Some(soon(every));
                        }
                    }
                }
                () = sleep_until(expires), if !lease_lost => {
                    lease_lost = true;
                    error!(
                        event = event::LEASE_LOST,
                        unconfirmed_ms = nats_fs::millis(confirmed.elapsed()),
                        ack_wait_ms = nats_fs::millis(ack_wait),
                        "lost the lease on this job (no progress ack confirmed within the ack wait): stopping it so that it does not run twice"
                    );
                    let _ = self.control.try_send(CancelMode::AbortNow);
                }
            }
        }
    }
}

/// When to try again after a renewal that runs every `every` did not work: soon, but not in
/// a tight loop.
fn soon(every: Duration) -> Instant {
    Instant::now() + (every / 4).max(Duration::from_millis(100))
}

/// Waits for an in-flight task; pending forever when there is none.
async fn finished<T>(task: &mut Option<JoinHandle<T>>) -> Result<T, tokio::task::JoinError> {
    match task {
        Some(task) => task.await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    //! The lease's timing, under paused time: tokio's clock only moves when every task waits,
    //! and then straight to the next timer, so these run at once and to the millisecond.

    use std::collections::VecDeque;
    use std::sync::Mutex;

    use tokio::time::sleep;

    use super::*;

    /// How a fake renewal answers.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Ok,
        Fail,
        /// Never: the server does not answer.
        Hang,
        /// The lock was taken by another delivery.
        Lost,
    }

    /// Renewals that record when they were asked for and answer from a script (`Ok` once
    /// it runs out).
    #[derive(Debug, Clone)]
    struct Fake {
        start: Instant,
        acks: Arc<Mutex<Vec<Duration>>>,
        ack_answers: Arc<Mutex<VecDeque<Answer>>>,
        refreshes: Arc<Mutex<Vec<Duration>>>,
        refresh_answers: Arc<Mutex<VecDeque<Answer>>>,
        refresh_every: Option<Duration>,
    }

    impl Fake {
        fn new(acks: &[Answer]) -> Self {
            Self {
                start: Instant::now(),
                acks: Arc::default(),
                ack_answers: Arc::new(Mutex::new(acks.iter().copied().collect())),
                refreshes: Arc::default(),
                refresh_answers: Arc::default(),
                refresh_every: None,
            }
        }

        fn with_lock(mut self, every: Duration, answers: &[Answer]) -> Self {
            self.refresh_every = Some(every);
            self.refresh_answers = Arc::new(Mutex::new(answers.iter().copied().collect()));
            self
        }

        /// When progress acks were sent, in seconds since the start.
        fn acks(&self) -> Vec<f64> {
            seconds(&self.acks.lock().unwrap())
        }

        fn refreshes(&self) -> Vec<f64> {
            seconds(&self.refreshes.lock().unwrap())
        }
    }

    fn seconds(at: &[Duration]) -> Vec<f64> {
        at.iter().map(Duration::as_secs_f64).collect()
    }

    fn next(answers: &Mutex<VecDeque<Answer>>) -> Answer {
        answers.lock().unwrap().pop_front().unwrap_or(Answer::Ok)
    }

    impl Renew for Fake {
        fn progress(
            &self,
        ) -> impl std::future::Future<Output = Result<(), String>> + Send + 'static {
            self.acks.lock().unwrap().push(self.start.elapsed());
            let answer = next(&self.ack_answers);
            async move {
                match answer {
                    Answer::Ok => Ok(()),
                    Answer::Fail | Answer::Lost => Err("no responders".to_owned()),
                    Answer::Hang => std::future::pending().await,
                }
            }
        }

        fn refresh_every(&self) -> Option<Duration> {
            self.refresh_every
        }

        async fn refresh(&mut self) -> Result<(), RefreshError> {
            self.refreshes.lock().unwrap().push(self.start.elapsed());
            match next(&self.refresh_answers) {
                Answer::Ok => Ok(()),
                Answer::Fail => Err(RefreshError::Failed("no responders".to_owned())),
                Answer::Lost => Err(RefreshError::Lost),
                Answer::Hang => std::future::pending().await,
            }
        }
    }

    /// Keeps a lease of `ack_wait` (the message received now) on a job that ends after `runs`
    /// or when it is told to stop: the stop request, if any, when it came, and whether the
    /// lease was lost.
    async fn keep(
        fake: &Fake,
        ack_wait: Duration,
        runs: Duration,
    ) -> (Option<(CancelMode, f64)>, bool) {
        let (tx, mut rx) = mpsc::channel(4);
        let lease = Lease {
            ack_wait,
            received: Instant::now(),
            control: &tx,
            renew: fake.clone(),
        };
        let start = fake.start;
        let job = async move {
            tokio::select! {
                () = sleep(runs) => None,
                mode = rx.recv() => mode.map(|m| (m, start.elapsed().as_secs_f64())),
            }
        };
        lease.keep(job).await
    }

    const S30: Duration = Duration::from_secs(30);

    #[tokio::test(start_paused = true)]
    async fn progress_acks_come_every_third_of_the_ack_wait() {
        let fake = Fake::new(&[]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(95)).await;
        assert_eq!((stopped, lost), (None, false));
        assert_eq!(
            fake.acks(),
            [10.0, 20.0, 30.0, 40.0, 50.0, 60.0, 70.0, 80.0, 90.0]
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_failed_progress_ack_is_retried_after_a_quarter_period() {
        let fake = Fake::new(&[Answer::Fail]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(35)).await;
        assert_eq!((stopped, lost), (None, false));
        // 10 fails; 12.5 (10 + 10/4) is confirmed, so the next is a period after that.
        assert_eq!(fake.acks(), [10.0, 12.5, 22.5, 32.5]);
    }

    #[tokio::test(start_paused = true)]
    async fn an_unanswered_progress_ack_counts_as_failed_after_a_period() {
        let fake = Fake::new(&[Answer::Hang]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(35)).await;
        // Given up at 20, retried at 22.5 and confirmed: within the 27 s (30 − 3) it had.
        assert_eq!((stopped, lost), (None, false));
        assert_eq!(fake.acks(), [10.0, 22.5, 32.5]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_is_lost_a_margin_before_the_ack_wait_without_a_confirmation() {
        let fake = Fake::new(&[Answer::Hang; 10]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(600)).await;
        // Nothing confirmed since the message came: lost at 30 − 30/10, the job stopped at once.
        assert_eq!(stopped, Some((CancelMode::AbortNow, 27.0)));
        assert!(lost);
        assert_eq!(fake.acks(), [10.0, 22.5]);

        // The margin is at least 200 ms, and failed acks are retried no faster than 100 ms.
        let fake = Fake::new(&[Answer::Fail; 10]);
        let (stopped, lost) = keep(&fake, Duration::from_secs(1), Duration::from_secs(60)).await;
        assert_eq!(
            stopped.map(|(mode, at)| (mode, (at * 1000.0).round())),
            Some((CancelMode::AbortNow, 800.0))
        );
        assert!(lost);
        let acks: Vec<f64> = fake.acks().iter().map(|s| (s * 1000.0).round()).collect();
        // (tokio's timers fire on whole milliseconds: a third of a second is 334 ms.)
        assert_eq!(acks, [334.0, 434.0, 534.0, 634.0, 734.0]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lease_counts_from_the_last_confirmation() {
        // Confirmed at 10, then nothing: lost at 10 + 27.
        let fake = Fake::new(&[Answer::Ok, Answer::Hang, Answer::Hang, Answer::Hang]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(600)).await;
        assert_eq!(stopped, Some((CancelMode::AbortNow, 37.0)));
        assert!(lost);
        assert_eq!(fake.acks(), [10.0, 20.0, 32.5]);
    }

    #[tokio::test(start_paused = true)]
    async fn the_lock_is_refreshed_retried_soon_and_a_lost_lock_stops_the_job_at_once() {
        let fake = Fake::new(&[]).with_lock(
            Duration::from_secs(4),
            &[Answer::Ok, Answer::Fail, Answer::Hang, Answer::Lost],
        );
        let (stopped, lost) = keep(&fake, Duration::from_secs(60), Duration::from_secs(600)).await;
        // 4 refreshed; 8 fails, retried a quarter period later (9); 9 hangs until 13, retried
        // at 14 and lost.
        assert_eq!(fake.refreshes(), [4.0, 8.0, 9.0, 14.0]);
        assert_eq!(stopped, Some((CancelMode::AbortNow, 14.0)));
        assert!(lost);
    }

    #[tokio::test(start_paused = true)]
    async fn a_job_that_ends_ends_the_lease() {
        let fake = Fake::new(&[]).with_lock(Duration::from_secs(4), &[]);
        let (stopped, lost) = keep(&fake, S30, Duration::from_secs(5)).await;
        assert_eq!((stopped, lost), (None, false));
        assert!(fake.acks().is_empty());
        assert_eq!(fake.refreshes(), [4.0]);
        assert_eq!(fake.start.elapsed(), Duration::from_secs(5));
    }
}
