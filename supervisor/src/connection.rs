//! Connecting to NATS, and reconnecting for as long as the supervisor runs.

use std::time::Duration;

use anyhow::Context as _;
use async_nats::{ConnectOptions, Event, ServerAddr};
use tracing::{debug, error, info, warn};

use crate::backoff::Backoff;
use crate::config::{Auth, Settings};
use crate::logging::event;

/// The longest pause between reconnection attempts.
const MAX_RECONNECT_DELAY: Duration = Duration::from_secs(2);

/// Connects to NATS. Returns at once: the client connects (and reconnects, forever) in the
/// background, and every connection change is logged.
pub async fn connect(settings: &Settings) -> anyhow::Result<async_nats::Client> {
    let addrs = settings
        .urls
        .iter()
        .map(|url| {
            url.as_str()
                .parse::<ServerAddr>()
                .with_context(|| format!("--url: {url:?} is not a NATS server URL"))
        })
        .collect::<anyhow::Result<Vec<_>>>()?;
    let options = match &settings.auth {
        Auth::None => ConnectOptions::new(),
        Auth::UserPassword { user, password } => {
            ConnectOptions::with_user_and_password(user.clone(), password.clone())
        }
        Auth::Token(token) => ConnectOptions::with_token(token.clone()),
        Auth::Creds(path) => ConnectOptions::with_credentials_file(path)
            .await
            .with_context(|| format!("--creds: reading {}", path.display()))?,
    };
    let client = options
        .name(&settings.worker_id)
        .retry_on_initial_connect()
        .max_reconnects(None)
        .ping_interval(Duration::from_secs(10))
        .reconnect_delay_callback(reconnect_delay)
        .event_callback(|event| async move {
            match event {
                Event::Connected => info!(event = event::NATS_CONNECTED, "connected to NATS"),
                Event::Disconnected => {
                    warn!(
                        event = event::NATS_DISCONNECTED,
                        "disconnected from NATS; reconnecting"
                    );
                }
                Event::LameDuckMode => warn!("the NATS server is entering lame duck mode"),
                Event::SlowConsumer(sid) => warn!(sid, "NATS slow consumer"),
                Event::ServerError(e) => error!("NATS server error: {e}"),
                Event::ClientError(e) => warn!("NATS connection: {e}"),

                Event::Draining | Event::Closed => debug!("NATS connection {event}"),
            }
        })
        .connect(addrs)
        .await
        .context("connecting to NATS")?;
    Ok(client)
}

/// The pause before connection attempt `attempts` (counted from 1, reset by a success): none
/// for the first, then 100 ms doubling up to `MAX_RECONNECT_DELAY`. Short, because a job's
/// lease runs out if the connection stays down for an ack wait.
fn reconnect_delay(attempts: usize) -> Duration {
    match attempts {
        0 | 1 => Duration::ZERO,
        n => Backoff::new(Duration::from_millis(100), MAX_RECONNECT_DELAY)
            .nth(u32::try_from(n - 2).unwrap_or(u32::MAX)),
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn reconnects_at_once_then_backs_off_to_a_cap() {
        use std::time::Duration;
        let delays: Vec<_> = (1..=8).map(super::reconnect_delay).collect();
        let ms = |n| Duration::from_millis(n);
        assert_eq!(
            delays,
            [
                ms(0),
                ms(100),
                ms(200),
                ms(400),
                ms(800),
                ms(1600),
                ms(2000),
                ms(2000)
            ]
        );
    }
}
