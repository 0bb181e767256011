//! The pull loop: it asks for exactly as many messages as there are free slots and waits for a
//! slot before asking again, so a host never holds a job it cannot start while another host
//! could. Each message goes to a job task ([`crate::job_task`]).

use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::pull::BatchConfig;
use async_nats::jetstream::{self, AckKind};
use async_nats::StatusCode;
use futures_util::StreamExt;
use tokio::sync::{watch, OwnedSemaphorePermit, Semaphore};
use tokio::time::{sleep, timeout, Instant};
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

use crate::backoff::{jitter, Backoff};
use crate::consumer::{ensure, Intake};
use crate::ctx::Ctx;
use crate::job_task;
use crate::logging::event;
use crate::Shutdown;

/// How long one pull request waits on the server for messages: 15 s plus up to 10 s of jitter.
///
/// Long, because an idle request costs nothing and shutdown does not wait for it (see
/// [`pull`]); jittered, because nats-server 2.9.10 loses a redelivery that falls due at the
/// very moment a pull request expires (probed: a nak of 2 s under 1 s pulls issued right
/// after the nak lost 8 redeliveries in 10; 1.3 s and 5 s pulls lost none). Retry delays are
/// whole seconds, so requests of a fixed whole-second length would meet them on the dot.
fn pull_expiry() -> Duration {
    Duration::from_secs(15) + jitter(Duration::from_secs(10))
}

/// Pulls messages while there are free slots, and hands each to a job task. Returns once
/// shutdown starts.
///
/// All pull requests name one inbox whose subscription lives as long as the loop, so a message
/// that arrives late (after its request's 408, or after a reconnect) is still received, and
/// run if a slot is free. On shutdown the inbox is unsubscribed: nats-server then skips the
/// outstanding request (it checks the reply subject's interest), so no job is sent to a
/// supervisor that is going away; anything already on its way is handed straight back.
///
/// If the inbox subscription ends for good (the client closed it), a new inbox is subscribed;
/// if that cannot be done, `Err`: the supervisor must not sit there without taking jobs, and
/// exits with a failure so that its service manager restarts it.
pub async fn pull(
    ctx: Arc<Ctx>,
    mut intake: Intake,
    js: jetstream::Context,
    tracker: TaskTracker,
) -> anyhow::Result<()> {
    let mut shutdown = ctx.shutdown.clone();
    let mut inbox = ctx.client.new_inbox();
    let Some(mut deliveries) = subscribe(&ctx, &inbox, &mut shutdown).await? else {
        return Ok(());
    };
    let mut puller = Puller {
        slots: Arc::new(Semaphore::new(ctx.settings.concurrency)),
        permits: Vec::new(),
        outstanding: 0,
        expires_at: Instant::now(),
        connects: 0,
        failures: 0,
    };
    let stats = ctx.client.statistics();
    let mut watch_connection = tokio::time::interval(Duration::from_millis(250));
    // WATCHDOG=1 comes from this loop, between its waits, so that systemd restarts a wedged one.
    let mut watchdog = ctx.notifier.watchdog_every().map(tokio::time::interval);
    let mut ready = false;
    'pulling: while *shutdown.borrow() == Shutdown::Run {
        if puller.outstanding == 0 {
            if puller.failures > 0 {
                puller.back_off(&ctx, &mut intake, &js, &mut shutdown).await;
                if *shutdown.borrow() != Shutdown::Run {
                    break;
                }
            }
            // A free slot (waiting for one is safe to interrupt), then the request (not).
            let first = loop {
                tokio::select! {
                    permit = puller.slots.clone().acquire_owned() => match permit {
                        Ok(permit) => break permit,
                        Err(_) => break 'pulling,
                    },
                    () = tick(&mut watchdog) => ctx.notifier.watchdog(),
                    _ = shutdown.changed() => break 'pulling,
                }
            };
            let connects = stats.connects.load(Ordering::Acquire);
            if !puller.request(first, &intake, &inbox, connects).await {
                continue;
            }
            if !ready {
                ready = true;
                info!(event = event::SUPERVISOR_READY, "ready for jobs");
                ctx.notifier.ready();
            }
        }
        tokio::select! {
            delivery = deliveries.next() => {
                let Some(delivery) = delivery else {
                    warn!("the job inbox subscription ended; subscribing a new one");
                    puller.end_request();
                    inbox = ctx.client.new_inbox();
                    match subscribe(&ctx, &inbox, &mut shutdown).await? {
                        Some(subscription) => deliveries = subscription,
                        None => break,
                    }
                    continue;
                };
                puller.receive(&ctx, &js, &tracker, delivery).await;
            }
            () = tokio::time::sleep_until(puller.expires_at), if puller.outstanding > 0 => {
                // No answer at all: the request is gone.
                puller.end_request();
            }
            _ = watch_connection.tick(), if puller.outstanding > 0 => {
                // A new connection (a restarted server, another cluster node) does not know the
                // request: ask again rather than wait for it to expire.
                if stats.connects.load(Ordering::Acquire) != puller.connects {
                    puller.end_request();
                }
            }
            () = tick(&mut watchdog) => ctx.notifier.watchdog(),
            _ = shutdown.changed() => break,
        }
    }
    // Shutting down: no more jobs for us. Whatever was already sent goes straight back.
    puller.end_request();
    if let Err(e) = deliveries.unsubscribe().await {
        debug!("unsubscribing the job inbox: {e}");
    }
    let _ = timeout(Duration::from_secs(2), ctx.client.flush()).await;
    while let Ok(Some(delivery)) = timeout(Duration::from_millis(100), deliveries.next()).await {
        if delivery.status.is_none() {
            let msg = jetstream::Message {
                message: delivery,
                context: js.clone(),
            };
            let _ = msg.ack_with(AckKind::Nak(None)).await;
        }
    }
    Ok(())
}

/// Subscribes the job inbox, retrying for a while: `Err` if it cannot be done, `Ok(None)` if
/// shutdown started meanwhile.
async fn subscribe(
    ctx: &Ctx,
    inbox: &str,
    shutdown: &mut watch::Receiver<Shutdown>,
) -> anyhow::Result<Option<async_nats::Subscriber>> {
    let mut backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));
    for _ in 0..10 {
        match ctx.client.subscribe(inbox.to_owned()).await {
            Ok(subscription) => return Ok(Some(subscription)),
            Err(e) => warn!(
                retry_in_ms = backoff.next_ms(),
                "subscribing to the job inbox: {e}"
            ),
        }
        tokio::select! {
            () = sleep(backoff.pause()) => {}
            _ = shutdown.wait_for(|s| *s != Shutdown::Run) => return Ok(None),
        }
    }
    anyhow::bail!("the job inbox cannot be subscribed (is the NATS connection closed?)")
}

/// The next tick of an interval; never, without one.
async fn tick(interval: &mut Option<tokio::time::Interval>) {
    match interval {
        Some(interval) => {
            interval.tick().await;
        }
        None => std::future::pending().await,
    }
}

/// The pause after the pull loop's n-th consecutive failure (from 200 ms: the first failure
/// is n = 1).
const PULL_BACKOFF: Backoff = Backoff::new(Duration::from_millis(100), Duration::from_secs(5));

/// The pull loop's bookkeeping: slots, the permits held for the outstanding request, and how
/// many messages it may still bring.
struct Puller {
    slots: Arc<Semaphore>,
    permits: Vec<OwnedSemaphorePermit>,
    outstanding: usize,
    /// When to give up on the outstanding request if the server never answers.
    expires_at: Instant,
    /// The connection count when the outstanding request was sent.
    connects: u64,
    /// Consecutive failures to ask for or receive jobs.
    failures: u32,
}

impl Puller {
    /// With `first` (a free slot), takes every free slot and asks for that many messages.
    /// `false` if the request could not be sent.
    async fn request(
        &mut self,
        first: OwnedSemaphorePermit,
        intake: &Intake,
        inbox: &str,
        connects: u64,
    ) -> bool {
        self.permits.push(first);
        while let Ok(permit) = self.slots.clone().try_acquire_owned() {
            self.permits.push(permit);
        }
        let expires = pull_expiry();
        let request = BatchConfig {
            batch: self.permits.len(),
            expires: Some(expires),
            ..BatchConfig::default()
        };
        match intake.consumer.request_batch(request, inbox.into()).await {
            Ok(()) => {
                self.outstanding = self.permits.len();
                self.connects = connects;
                self.expires_at = Instant::now() + expires + Duration::from_secs(5);
                true
            }
            Err(e) => {
                warn!("asking for jobs failed ({e}); asking again after a pause");
                self.failures += 1;
                self.end_request();
                false
            }
        }
    }

    /// The outstanding request is over: release the slots it held.
    fn end_request(&mut self) {
        self.outstanding = 0;
        self.permits.clear();
    }

    /// Handles one message on the inbox: a job, or a status about the request.
    async fn receive(
        &mut self,
        ctx: &Arc<Ctx>,
        js: &jetstream::Context,
        tracker: &TaskTracker,
        delivery: async_nats::Message,
    ) {
        match delivery.status {
            None | Some(StatusCode::OK) => {}
            Some(StatusCode::IDLE_HEARTBEAT) => return,
            // The request expired, or (no_wait) found nothing: normal ends.
            Some(StatusCode::TIMEOUT | StatusCode::NOT_FOUND) => {
                self.failures = 0;
                return self.end_request();
            }
            Some(status) => {
                warn!(
                    "asking for jobs: the server answered {status} {}",
                    delivery.description.as_deref().unwrap_or_default()
                );
                self.failures += 1;
                return self.end_request();
            }
        }
        self.failures = 0;
        self.outstanding = self.outstanding.saturating_sub(1);
        let msg = jetstream::Message {
            message: delivery,
            context: js.clone(),
        };
        let permit = self
            .permits
            .pop()
            .or_else(|| self.slots.clone().try_acquire_owned().ok());
        let Some(permit) = permit else {
            // A late delivery while every slot is busy: hand it straight back.
            let _ = msg.ack_with(AckKind::Nak(None)).await;
            return;
        };
        if self.outstanding == 0 {
            self.permits.clear();
        }
        let ctx = ctx.clone();
        tracker.spawn(job_task::handle(ctx, msg, permit));
    }

    /// After failures, waits a growing pause; after several, sets the consumer up again (it
    /// may have been deleted under us).
    async fn back_off(
        &mut self,
        ctx: &Ctx,
        intake: &mut Intake,
        js: &jetstream::Context,
        shutdown: &mut watch::Receiver<Shutdown>,
    ) {
        let pause = PULL_BACKOFF.nth(self.failures);
        tokio::select! {
            () = sleep(pause) => {}
            _ = shutdown.changed() => return,
        }
        if self.failures >= 3 {
            match ensure(&ctx.settings, js).await {
                Ok(fresh) => {
                    info!("set up the consumer again");
                    *intake = fresh;
                }
                Err(e) => warn!("setting up the consumer again failed ({e}); trying again"),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_pull_loop_backs_off_from_200_ms_to_5_s() {
        use std::time::Duration;
        let pauses: Vec<_> = (1..=8).map(|n| super::PULL_BACKOFF.nth(n)).collect();
        let ms = Duration::from_millis;
        assert_eq!(
            pauses,
            [
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(3200),
                ms(5000),
                ms(5000),
                ms(5000)
            ]
        );
    }
}
