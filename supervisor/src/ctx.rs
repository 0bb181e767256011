//! The context every job task shares with the rest of the supervisor: settings, the NATS
//! client, the running jobs, and the services they report to.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::{watch, Semaphore};

use crate::config::Settings;
use crate::identity::Identities;
use crate::lock::Locks;
use crate::outbox::Outbox;
use crate::reaper::Reaper;
use crate::running::Running;
use crate::Shutdown;

/// Everything a job task shares with the rest of the supervisor.
#[derive(Debug)]
pub struct Ctx {
    pub settings: Settings,
    pub client: async_nats::Client,
    pub outbox: Outbox,
    pub running: Running,
    /// systemd, told how the supervisor is doing.
    pub notifier: crate::notify::Notifier,
    /// Job lifecycle events for controllers.
    pub events: crate::events::Events,
    /// Counters, for `/metrics` and the service API.
    pub metrics: Arc<crate::metrics::Metrics>,
    pub reaper: Arc<Reaper>,
    pub identities: Identities,
    /// The jobs folder's verdict, probed again when it is mounted anew.
    pub drive: Arc<crate::share::Drive>,
    pub locks: Locks,
    /// The consumer's ack wait and max deliver as the server has them (an existing consumer
    /// may differ from the flags).
    pub ack_wait: Duration,
    pub max_deliver: i64,
    pub shutdown: watch::Receiver<Shutdown>,
    /// Permits to flush a finished job's manifest before its ack, as many as job slots: a
    /// job gives its slot back once its result is published and it holds one of these (see
    /// `settle::publish`), and the permit goes back when the flush returns, so at most
    /// `--concurrency` flushes are in flight.
    pub flushing: Arc<Semaphore>,
}
