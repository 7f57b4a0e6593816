//! The status of a relay that does not answer (stopped, or without `[admin]`), rebuilt from
//! what it left on disk: the queue from the spool ([`census`]), and the last hour's flow,
//! refusals and each upstream's last success, last error and delivered-in-five-minutes from
//! the message journal (`queue::journal::scan`), replayed into a fresh [`Telemetry`] so the
//! numbers are counted exactly as the running relay counts them. `live` is false; the
//! counters since start ([`Totals`]) are zero, since a stopped relay has none; its one gauge,
//! `queue_oldest_seconds`, is the age of the oldest message found, as `queue.oldest` says.

use std::collections::BTreeMap;

use crate::config::Config;
use crate::observe::flow;
use crate::observe::status::{Status, Totals};
use crate::observe::{Event, EventKind, QueueCensus, TOP_SENDERS, Telemetry, UpstreamCount};
use crate::queue::census::Facts;
pub use crate::queue::census::NO_ROUTE;
use crate::queue::journal::{self, JournalError};
use crate::queue::{QueuedMessage, Spool, SpoolError};
use crate::routes::Routes;

use super::pause::{self, MarkerError};

/// How far back the journal is read: the status's hour of flow ([`flow::MINUTES`]).
const HOUR_MS: u64 = flow::MINUTES as u64 * 60_000;

/// Why the status could not be rebuilt.
#[derive(Debug, thiserror::Error)]
pub enum OfflineError {
    /// The queue could not be listed.
    #[error("cannot list the queue: {0}")]
    Spool(#[from] SpoolError),
    /// The journal could not be read.
    #[error("cannot read the journal: {0}")]
    Journal(#[from] JournalError),
    /// The pause marker could not be looked at.
    #[error("cannot tell whether the listeners are paused: {0}")]
    Marker(#[from] MarkerError),
    /// The blocking task reading them failed (panicked or was cancelled).
    #[error("reading the spool failed: {0}")]
    Task(String),
}

/// The status of the relay of `config` from `spool` and its journal, at `now_unix`.
///
/// Each upstream counts as up unless the last delivery attempt the journal holds for it was
/// deferred or failed (then down since that attempt, with its reply as the last error): a
/// stopped relay has no circuit breaker to ask.
///
/// # Errors
/// [`OfflineError`] when the queue or the journal cannot be read (a missing journal is none).
pub fn status(config: &Config, spool: &Spool, now_unix: u64) -> Result<Status, OfflineError> {
    let telemetry = Telemetry::new(config.cluster.node.clone());
    let names: Vec<String> = config.upstreams.iter().map(|u| u.name.clone()).collect();
    telemetry.upstreams.configure(&names, 0, &telemetry.metrics);
    let since_ms = (now_unix * 1000).saturating_sub(HOUR_MS);
    let mut last_attempt: BTreeMap<String, Event> = BTreeMap::new();
    journal::scan(spool, since_ms, &mut |event| {
        telemetry.record(event);
        if let (Some(upstream), true) = (&event.upstream, is_attempt(event.kind)) {
            last_attempt.insert(upstream.clone(), event.clone());
        }
    })?;
    for (name, event) in &last_attempt {
        let up = event.kind == EventKind::Delivered;
        let error = event.reply.as_deref().filter(|_| !up);
        telemetry
            .upstreams
            .set_up(name, up, error, event.at / 1000, &telemetry.metrics);
    }
    let messages = spool.list()?;
    telemetry.set_queue(census(&messages, config), now_unix);
    let mut status = Status::live(&telemetry, now_unix, Some("relay not answering".to_owned()));
    status.live = false;
    status.totals = Totals {
        queue_oldest_seconds: status
            .queue
            .oldest
            .as_ref()
            .map_or(0, |(_, at)| now_unix.saturating_sub(*at)),
        ..Totals::default()
    };
    // `portcullis listeners pause` leaves this marker; the relay obeys it when it starts.
    status.paused = pause::is_paused(spool.root())?;
    // Stopped or not, as the journal's markers say (readable on a full disk).
    status.journal = journal::state_on_disk(&journal::dir(spool.root()))
        .ok()
        .map(|(state, _)| state);
    Ok(status)
}

/// A delivery attempt's outcome.
fn is_attempt(kind: EventKind) -> bool {
    matches!(
        kind,
        EventKind::Delivered | EventKind::Deferred | EventKind::Failed
    )
}

/// The queue as the queue manager counts it: each message under the upstream that serves
/// its first pending recipient (by `config`'s routes; [`NO_ROUTE`] when none does), held
/// ones apart; the oldest message and the top senders among those not held.
pub fn census(messages: &[QueuedMessage], config: &Config) -> QueueCensus {
    let routes = Routes::new(&config.upstreams);
    let mut by_upstream: BTreeMap<String, UpstreamCount> = BTreeMap::new();
    let mut senders: BTreeMap<String, u64> = BTreeMap::new();
    let mut oldest: Option<(String, u64)> = None;
    for m in messages {
        let facts = Facts::of(m, |domain| {
            domain
                .and_then(|domain| routes.route(domain).first())
                .and_then(|&first| config.upstreams.get(first))
                .map_or_else(|| NO_ROUTE.to_owned(), |u| u.name.clone())
        });
        let count = by_upstream
            .entry(facts.upstream)
            .or_insert_with_key(|upstream| UpstreamCount {
                upstream: upstream.clone(),
                ..UpstreamCount::default()
            });
        if facts.held {
            count.held += 1;
            continue;
        }
        count.queued += 1;
        *senders.entry(facts.sender).or_default() += 1;
        let arrived = m.envelope.received_at;
        if oldest.as_ref().is_none_or(|(_, t)| arrived < *t) {
            oldest = Some((m.id().to_string(), arrived));
        }
    }
    let mut top_senders: Vec<(String, u64)> = senders.into_iter().collect();
    top_senders.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    top_senders.truncate(TOP_SENDERS);
    QueueCensus {
        by_upstream: by_upstream.into_values().collect(),
        oldest,
        top_senders,
        loading: false,
    }
}

#[cfg(test)]
mod tests;
