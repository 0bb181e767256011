//! Counters and gauges of the supervisor, kept always (they are cheap) and served in the
//! Prometheus text format on `--metrics-listen` (off by default), with `/healthz` beside them.
//!
//! The same counters answer the NATS service API's jobs endpoint ([`crate::service`]), so an
//! operator sees the same numbers whichever way they ask.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use async_nats::connection::State;
use async_nats::jetstream::consumer::PullConsumer;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use nats_fs::Status;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tracing::{debug, info, warn};

/// How stale the consumer's pending count may be when it is scraped.
const PENDING_REFRESH: Duration = Duration::from_secs(5);

/// The `status` label of finished jobs.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct StatusLabel {
    status: &'static str,
}

/// The supervisor's numbers.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    jobs_finished: Family<StatusLabel, Counter>,
    job_seconds: Histogram,
    stage_seconds: Histogram,
    sync_seconds: Histogram,
    running: Gauge,
    free_slots: Gauge,
    redeliveries: Counter,
    dead_letters: Counter,
    host_faults: Counter,
    reconnects: Counter,
    pending: Gauge,
    /// When `pending` was last read from the server.
    pending_read: Mutex<Option<Instant>>,
    events_dropped: Counter,
}

impl Metrics {
    pub fn new(concurrency: usize) -> Self {
        let mut registry = Registry::with_prefix("nats_fs");
        let jobs_finished = Family::<StatusLabel, Counter>::default();
        registry.register(
            "jobs_finished",
            "Jobs that ended with a final status (the result was published), by status",
            jobs_finished.clone(),
        );
        // 5 ms up to about 3 hours.
        let seconds = || Histogram::new(exponential_buckets(0.005, 4.0, 12));
        let job_seconds = seconds();
        registry.register(
            "job_duration_seconds",
            "Wall time of finished jobs, from the runner's start to its end",
            job_seconds.clone(),
        );
        let stage_seconds = seconds();
        registry.register(
            "stage_duration_seconds",
            "Time spent copying job folders into workspaces",
            stage_seconds.clone(),
        );
        let sync_seconds = seconds();
        registry.register(
            "sync_duration_seconds",
            "Time spent copying new and changed files to results/",
            sync_seconds.clone(),
        );
        let gauge = |registry: &mut Registry, name: &str, help: &str| {
            let gauge = Gauge::default();
            registry.register(name, help, gauge.clone());
            gauge
        };
        let counter = |registry: &mut Registry, name: &str, help: &str| {
            let counter = Counter::default();
            registry.register(name, help, counter.clone());
            counter
        };
        let running = gauge(
            &mut registry,
            "jobs_running",
            "Jobs running on this host now",
        );
        let free_slots = gauge(&mut registry, "free_slots", "Slots free for another job");
        free_slots.set(i64::try_from(concurrency).unwrap_or(i64::MAX));
        let pending = gauge(
            &mut registry,
            "consumer_pending",
            "Jobs waiting in the stream for this durable consumer (refreshed every few seconds)",
        );
        let metrics = Self {
            redeliveries: counter(
                &mut registry,
                "redeliveries",
                "Deliveries of a job message after its first",
            ),
            dead_letters: counter(
                &mut registry,
                "dead_letters",
                "Requests republished on the dead-letter subject",
            ),
            host_faults: counter(
                &mut registry,
                "host_faults",
                "Deliveries handed back because of a fault of this host (retried later)",
            ),
            reconnects: counter(
                &mut registry,
                "nats_reconnects",
                "Connections to NATS after the first",
            ),
            events_dropped: counter(
                &mut registry,
                "events_dropped",
                "Job events not published because too many were waiting",
            ),
            registry,
            jobs_finished,
            job_seconds,
            stage_seconds,
            sync_seconds,
            running,
            free_slots,
            pending,
            pending_read: Mutex::new(None),
        };
        for status in STATUSES {
            // Every status from the start, at 0: a rate over a series that appears late is wrong.
            drop(metrics.jobs_finished.get_or_create(&label(status)));
        }
        metrics
    }

    /// A job ended with `status` after `duration`, if known.
    pub fn finished(&self, status: Status, duration: Option<Duration>) {
        self.jobs_finished.get_or_create(&label(status)).inc();
        if let Some(duration) = duration {
            self.job_seconds.observe(duration.as_secs_f64());
        }
    }

    /// Jobs finished so far, by status.
    pub fn finished_counts(&self) -> HashMap<&'static str, u64> {
        STATUSES
            .into_iter()
            .map(|status| {
                let count = self.jobs_finished.get_or_create(&label(status)).get();
                (status.as_str(), count)
            })
            .collect()
    }

    pub fn staged(&self, duration: Duration) {
        self.stage_seconds.observe(duration.as_secs_f64());
    }

    pub fn synced(&self, duration: Duration) {
        self.sync_seconds.observe(duration.as_secs_f64());
    }

    /// `running` jobs of `concurrency` slots.
    pub fn running(&self, running: usize, concurrency: usize) {
        self.running.set(i64::try_from(running).unwrap_or(i64::MAX));
        self.free_slots
            .set(i64::try_from(concurrency.saturating_sub(running)).unwrap_or(0));
    }

    pub fn redelivered(&self) {
        self.redeliveries.inc();
    }

    pub fn redeliveries(&self) -> u64 {
        self.redeliveries.get()
    }

    pub fn dead_lettered(&self) {
        self.dead_letters.inc();
    }

    pub fn dead_letters(&self) -> u64 {
        self.dead_letters.get()
    }

    pub fn host_fault(&self) {
        self.host_faults.inc();
    }

    pub fn host_faults(&self) -> u64 {
        self.host_faults.get()
    }

    /// A job event was dropped: too many were waiting to be published.
    pub fn event_dropped(&self) {
        self.events_dropped.inc();
    }

    /// Job events dropped so far.
    #[cfg(test)]
    pub(crate) fn events_dropped(&self) -> u64 {
        self.events_dropped.get()
    }

    /// The registry in the Prometheus text format, after bringing the numbers that are read
    /// rather than counted up to date.
    async fn render(&self, sources: &Sources) -> String {
        let connects = sources.client.statistics().connects.load(Ordering::Relaxed);
        let reconnects = connects.saturating_sub(1);
        let counted = self.reconnects.get();
        if reconnects > counted {
            self.reconnects.inc_by(reconnects - counted);
        }
        self.refresh_pending(&sources.consumer).await;
        let mut text = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut text, &self.registry) {
            warn!("encoding the metrics: {e}");
        }
        text
    }

    /// Reads the consumer's pending count, at most every [`PENDING_REFRESH`].
    async fn refresh_pending(&self, consumer: &PullConsumer) {
        {
            let mut read = self
                .pending_read
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if read.is_some_and(|at| at.elapsed() < PENDING_REFRESH) {
                return;
            }
            *read = Some(Instant::now());
        }
        let mut consumer = consumer.clone();
        match tokio::time::timeout(Duration::from_secs(2), consumer.info()).await {
            Ok(Ok(info)) => {
                self.pending
                    .set(i64::try_from(info.num_pending).unwrap_or(i64::MAX));
            }
            Ok(Err(e)) => debug!("reading the consumer's pending count: {e}"),
            Err(_) => debug!("reading the consumer's pending count: no answer"),
        }
    }
}

const STATUSES: [Status; 5] = [
    Status::Success,
    Status::Failed,
    Status::Timeout,
    Status::Cancelled,
    Status::Error,
];

fn label(status: Status) -> StatusLabel {
    StatusLabel {
        status: status.as_str(),
    }
}

/// What the HTTP endpoints read besides the counters.
#[derive(Debug, Clone)]
pub struct Sources {
    pub client: async_nats::Client,
    pub consumer: PullConsumer,
}

/// Serves `/metrics` and `/healthz` on `addr` until the task is dropped. Binding is done
/// before it returns, so a taken port is a start-up error.
pub async fn serve(
    addr: SocketAddr,
    metrics: Arc<Metrics>,
    sources: Sources,
) -> std::io::Result<tokio::task::JoinHandle<()>> {
    let listener = TcpListener::bind(addr).await?;
    info!(%addr, "serving /metrics and /healthz");
    Ok(tokio::spawn(async move {
        loop {
            let (stream, _) = match listener.accept().await {
                Ok(accepted) => accepted,
                Err(e) => {
                    debug!("accepting a metrics connection: {e}");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let (metrics, sources) = (metrics.clone(), sources.clone());
            tokio::spawn(async move {
                let handle = service_fn(move |request| {
                    let (metrics, sources) = (metrics.clone(), sources.clone());
                    async move { Ok::<_, hyper::Error>(answer(&request, &metrics, &sources).await) }
                });
                if let Err(e) = http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), handle)
                    .await
                {
                    debug!("a metrics connection: {e}");
                }
            });
        }
    }))
}

async fn answer(
    request: &Request<Incoming>,
    metrics: &Metrics,
    sources: &Sources,
) -> Response<Full<Bytes>> {
    let respond = |status: StatusCode, content_type: &str, body: String| {
        Response::builder()
            .status(status)
            .header("content-type", content_type)
            .body(Full::new(Bytes::from(body)))
            .unwrap_or_default()
    };
    if request.method() != Method::GET {
        return respond(
            StatusCode::METHOD_NOT_ALLOWED,
            "text/plain",
            "GET only\n".to_owned(),
        );
    }
    match request.uri().path() {
        "/metrics" => respond(
            StatusCode::OK,
            "application/openmetrics-text; version=1.0.0; charset=utf-8",
            metrics.render(sources).await,
        ),
        "/healthz" => {
            // Connected to NATS; the consumer was bound before this server started.
            if sources.client.connection_state() == State::Connected {
                respond(StatusCode::OK, "text/plain", "ok\n".to_owned())
            } else {
                respond(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "text/plain",
                    "not connected to NATS\n".to_owned(),
                )
            }
        }
        _ => respond(
            StatusCode::NOT_FOUND,
            "text/plain",
            "try /metrics or /healthz\n".to_owned(),
        ),
    }
}
