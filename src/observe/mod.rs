//! What the relay knows about itself at run time, recorded by every layer and read by the
//! admin listener, the alerts and `portcullis status`: the Prometheus metrics
//! ([`metrics::Metrics`]), the mail flow per minute over the last hour ([`flow::Flow`]), each
//! upstream's state ([`upstreams::UpstreamBoard`]), the queue census the queue manager
//! publishes ([`QueueCensus`]), the active alerts ([`alerts::AlertBoard`]), whether the
//! listeners are paused ([`Gate`]), and the message journal (`queue::journal`) every event
//! also goes to.
//!
//! This module is a leaf: it knows the configuration types and the envelope's, never
//! `inbound`, `outbound` or `queue` (which call into it), and it does no I/O of its own except
//! the alerts' webhook and their state file under the spool ([`alerts::state`]). Recording is cheap and never blocks: atomics, short mutexes, and a
//! channel to the journal's writer thread. Nothing here can refuse mail: a full journal or a
//! webhook that hangs only costs their own records (DESIGN.md, `[log]`).

pub mod alerts;
pub mod event;
pub mod flow;
#[cfg(test)]
pub mod kept;
pub mod metrics;
pub mod status;
pub mod upstreams;
pub mod webhook;

use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, Ordering};

pub use event::{Event, EventKind};

/// The configuration running now (a reload replaces it): what the admin listener and the
/// alerts read at each request or evaluation, so a reloaded token or threshold applies at once.
pub type ConfigSource =
    std::sync::Arc<dyn Fn() -> std::sync::Arc<crate::config::Config> + Send + Sync>;

/// Everything the relay records about itself; one per process, shared by `Arc`.
#[derive(Debug)]
pub struct Telemetry {
    /// This node's name in alerts and the status (`[cluster] node`, else `server.hostname`).
    pub node: String,
    /// The Prometheus families of the contract.
    pub metrics: metrics::Metrics,
    /// Accepted, delivered, refused and deferred per minute over the last hour.
    pub flow: flow::Flow,
    /// Each upstream's state, last error and last success.
    pub upstreams: upstreams::UpstreamBoard,
    /// The queue as the queue manager last counted it.
    pub queue: Mutex<QueueCensus>,
    /// The alerts that are firing now.
    pub alerts: alerts::AlertBoard,
    /// Listeners bound, paused or not.
    pub gate: Gate,
    /// Where events are journaled (`None`: not journaled, e.g. in unit tests).
    journal: Option<Box<dyn EventSink>>,
}

/// Something events are appended to (the journal). Never blocks and never fails the caller:
/// an event it cannot keep is dropped and counted by the sink itself.
pub trait EventSink: Send + Sync + std::fmt::Debug {
    /// Keep `event`.
    fn append(&self, event: &Event);

    /// Whether it is keeping events (`None`: it cannot tell).
    fn state(&self) -> Option<status::JournalState> {
        None
    }

    /// Keep what was appended and stop (waits for it); later events are dropped.
    fn close(&self) {}
}

/// How many messages the queue holds, as the queue manager counts them (it publishes a new
/// census whenever it changes, at most every [`CENSUS_INTERVAL`]).
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct QueueCensus {
    /// Per upstream (the route of the message's first pending recipient), sorted by name.
    pub by_upstream: Vec<UpstreamCount>,
    /// Queue id and Unix time of arrival of the oldest message that is not held.
    pub oldest: Option<(String, u64)>,
    /// The envelope senders with the most queued messages (not held), most first, at most
    /// [`TOP_SENDERS`]; `<>` for bounces.
    pub top_senders: Vec<(String, u64)>,
    /// True from the start until the queue manager has loaded the queue (the recovery of
    /// `queue/` runs while the relay accepts mail, delivery waits for it): the counts above
    /// are not the queue yet.
    #[serde(default)]
    pub loading: bool,
}

/// Most senders in [`QueueCensus::top_senders`].
pub const TOP_SENDERS: usize = 10;
/// How often, at most, the queue manager publishes its census.
pub const CENSUS_INTERVAL: std::time::Duration = std::time::Duration::from_secs(1);

/// Queued and held messages routed to one upstream.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct UpstreamCount {
    /// `[[upstreams]] name` (or `"(none)"` for a domain no route serves).
    pub upstream: String,
    /// Messages waiting for delivery.
    pub queued: u64,
    /// Messages held by an operator or by containment.
    pub held: u64,
}

impl QueueCensus {
    /// Messages waiting for delivery (not held), all upstreams.
    pub fn queued(&self) -> u64 {
        self.by_upstream.iter().map(|u| u.queued).sum()
    }

    /// Held messages, all upstreams.
    pub fn held(&self) -> u64 {
        self.by_upstream.iter().map(|u| u.held).sum()
    }
}

/// Whether the listeners accept: bound once every listener is, paused by
/// `portcullis listeners pause` (the `SPOOL/paused` marker) until resumed.
#[derive(Debug, Default)]
pub struct Gate {
    bound: AtomicBool,
    paused: AtomicBool,
}

impl Gate {
    /// Every listener is bound and accepting.
    pub fn set_bound(&self, bound: bool) {
        self.bound.store(bound, Ordering::Relaxed);
    }

    /// True once every listener is bound (and until shutdown).
    pub fn bound(&self) -> bool {
        self.bound.load(Ordering::Relaxed)
    }

    /// Pause (true) or resume (false) accepting; returns the previous value.
    pub fn set_paused(&self, paused: bool) -> bool {
        self.paused.swap(paused, Ordering::Relaxed)
    }

    /// True while the listeners refuse new connections (`421 4.3.2`).
    pub fn paused(&self) -> bool {
        self.paused.load(Ordering::Relaxed)
    }
}

impl Telemetry {
    /// Telemetry for node `node` with no journal (tests, and commands that only read).
    pub fn new(node: impl Into<String>) -> Telemetry {
        Telemetry {
            node: node.into(),
            metrics: metrics::Metrics::new(),
            flow: flow::Flow::default(),
            upstreams: upstreams::UpstreamBoard::default(),
            queue: Mutex::new(QueueCensus::default()),
            alerts: alerts::AlertBoard::default(),
            gate: Gate::default(),
            journal: None,
        }
    }

    /// The same, appending every event to `sink` (the journal).
    #[must_use]
    pub fn with_journal(mut self, sink: Box<dyn EventSink>) -> Telemetry {
        self.journal = Some(sink);
        self
    }

    /// Record one event of a message's life: the metrics, flow and upstream state it counts
    /// towards (at the event's own time, `event.at`), then the journal.
    pub fn record(&self, event: &Event) {
        self.metrics.count(event);
        self.flow.count(event);
        self.upstreams.count(event);
        if let Some(journal) = &self.journal {
            journal.append(event);
        }
    }

    /// The journal's state, when there is a journal.
    pub fn journal_state(&self) -> Option<status::JournalState> {
        self.journal.as_ref().and_then(|j| j.state())
    }

    /// Close the journal (at shutdown, once nothing records any more): its last events are
    /// written and its open file sealed. Waits for its thread.
    pub fn close_journal(&self) {
        if let Some(journal) = &self.journal {
            journal.close();
        }
    }

    /// Publish the queue manager's census (and set the queue gauges from it).
    pub fn set_queue(&self, census: QueueCensus, now_unix: u64) {
        self.metrics.set_queue(&census, now_unix);
        *self.queue.lock().unwrap_or_else(|p| p.into_inner()) = census;
    }

    /// The census last published.
    pub fn queue(&self) -> QueueCensus {
        self.queue.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
}
