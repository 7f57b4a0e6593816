//! Upstream SMTP client and delivery workers.
//!
//! - [`client`]: one SMTP connection to an upstream (EHLO/HELO, STARTTLS, AUTH, pipelined
//!   transactions, dot-stuffing, per-recipient outcomes).
//! - [`error`]: what can go wrong with an upstream, by kind ([`error::ClientError`]); the
//!   caller's behaviour (stale retry, plaintext retry, circuit breaker) depends on the kind.
//! - [`reply`]: upstream replies, parsed and classified.
//! - [`tls`]: the rustls client configuration of each upstream.
//! - [`upstream`]: routing by recipient domain, failover order, circuit breakers and
//!   connection pools.
//! - [`deliver`]: one delivery attempt of one message, and what it records in the spool.
//! - [`bounce`]: queueing a delivery status notification.
//! - [`scheduler`]: when each message is due; starts deliveries.
//!
//! [`start`] wires them: the returned sender is given to the inbound side, which sends each
//! message as soon as it is committed (with its bytes when small, so the first attempt does
//! not read the file back).

#![warn(clippy::too_many_lines)]

pub mod bounce;
pub mod client;
pub mod deliver;
pub mod error;
pub mod reply;
pub mod scheduler;
pub mod tls;
pub mod upstream;

#[cfg(test)]
mod wire_tests;

use std::sync::Arc;

use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::queue::Spool;

pub use deliver::Context;
pub use tls::ClientTlsError;

/// A committed message for the scheduler, to be delivered at once: the hand-off type is the
/// queue's ([`crate::queue::Committed`]), so the inbound side never names this module.
pub use crate::queue::Committed as NewMessage;

/// Delivery running in the background.
pub struct Delivery {
    /// Send each committed message here to have it delivered at once.
    pub wake: UnboundedSender<NewMessage>,
    /// The scheduler task; ends after `shutdown` is cancelled.
    pub scheduler: JoinHandle<()>,
    /// Deliveries in flight.
    pub tracker: TaskTracker,
    /// Shared with the deliveries (to close idle connections at shutdown).
    pub context: Arc<Context>,
    /// What each upstream can carry, for the inbound checks (read-only).
    pub capabilities: crate::routes::RouteCapabilities,
}

/// Start the scheduler over `spool` with `config`'s upstreams and queue policy.
pub fn start(
    config: &Config,
    spool: Spool,
    shutdown: CancellationToken,
) -> Result<Delivery, ClientTlsError> {
    let (wake, incoming) = mpsc::unbounded_channel();
    let book = Arc::new(crate::routes::CapabilityBook::load(
        &config.upstreams,
        Some(spool.root()),
    ));
    let context = Arc::new(Context {
        upstreams: upstream::Upstreams::new(config, book.clone())?,
        spool,
        hostname: config.server.hostname.clone(),
        queue: config.queue.clone(),
        wake: wake.clone(),
    });
    let tracker = TaskTracker::new();
    let scheduler = tokio::spawn(
        scheduler::Scheduler::new(context.clone(), incoming, shutdown, tracker.clone()).run(),
    );
    Ok(Delivery {
        wake,
        scheduler,
        tracker,
        context,
        capabilities: crate::routes::RouteCapabilities::new(book),
    })
}
