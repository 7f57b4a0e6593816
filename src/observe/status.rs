//! The relay's status as one value: what `/api/status` serves as JSON, the status page
//! renders, and `portcullis status` prints (live from the admin API, or rebuilt from the spool
//! and journal when the relay is not running, with `live` false).

use serde::{Deserialize, Serialize};

use super::alerts::ActiveAlert;
use super::flow::{self, Minute};
use super::metrics::Metrics;
use super::upstreams::UpstreamState;
use super::{QueueCensus, Telemetry};

/// Most rules in [`Status::top_refusals`].
pub const TOP_REFUSALS: usize = 10;

/// The status at one moment.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Status {
    /// This node (`[cluster] node`, else `server.hostname`).
    pub node: String,
    /// The relay's version.
    pub version: String,
    /// Unix seconds when this was taken.
    pub now: u64,
    /// True when read from the running relay; false when rebuilt from the spool and journal.
    pub live: bool,
    /// `/readyz`: listeners bound, not paused, spool writable above `min_free_space`.
    pub ready: bool,
    /// Why not ready (one line), when not.
    pub not_ready: Option<String>,
    /// `portcullis listeners pause` in effect.
    pub paused: bool,
    /// Every configured upstream. When not live, each is up unless the journal's last
    /// delivery attempt to it was deferred or failed (`admin::offline`).
    pub upstreams: Vec<UpstreamState>,
    /// The queue.
    pub queue: QueueCensus,
    /// The last 60 minutes, oldest first.
    pub minutes: Vec<Minute>,
    /// Sums over the last 1, 5, 15 and 60 minutes.
    pub last_1m: Minute,
    pub last_5m: Minute,
    pub last_15m: Minute,
    pub last_60m: Minute,
    /// Firing alerts.
    pub alerts: Vec<ActiveAlert>,
    /// Refusals since the relay started, by rule, most first, at most [`TOP_REFUSALS`].
    pub top_refusals: Vec<(String, u64)>,
    /// Counters since the relay started, as `/metrics` serves them (all zero when rebuilt
    /// from the spool and journal: a stopped relay has no counters).
    #[serde(default)]
    pub totals: Totals,
    /// Whether the message journal behind `portcullis trace` is writing (`None`: the relay
    /// has none, e.g. a status from a relay older than this field).
    #[serde(default)]
    pub journal: Option<JournalState>,
}

/// The message journal's state: writing, or stopped since when and why, and what it still
/// holds. Live it comes from the journal's writer; rebuilt from the spool it comes from the
/// marker the writer leaves in `SPOOL/journal/` while it is stopped (`queue::journal`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct JournalState {
    /// Unix seconds since which it has not written, when it is stopped.
    pub stopped_since: Option<u64>,
    /// Why it is stopped (one line), when it is.
    pub why: Option<String>,
    /// Events not journaled since the relay started (writer behind, stopped, or failing);
    /// `None` when not read from the running relay.
    pub dropped: Option<u64>,
    /// Unix seconds of the start of its oldest file: `trace` finds nothing older.
    pub oldest: Option<u64>,
}

impl JournalState {
    /// True unless it is stopped.
    pub fn writing(&self) -> bool {
        self.stopped_since.is_none()
    }
}

/// The counters of `/metrics` the status shows, since the relay started. Each list is sorted
/// by name and holds the series `/metrics` has (a listener that accepted nothing yet has none).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct Totals {
    /// `portcullis_messages_accepted_total`, by listener.
    pub accepted: Vec<(String, u64)>,
    /// `portcullis_messages_delivered_total`, by upstream.
    pub delivered: Vec<(String, u64)>,
    /// `portcullis_messages_deferred_total`, by upstream.
    pub deferred: Vec<(String, u64)>,
    /// `portcullis_messages_expired_total`, by upstream.
    pub expired: Vec<(String, u64)>,
    /// `portcullis_messages_bounced_total`.
    pub bounced: u64,
    /// `portcullis_auth_successes_total`.
    pub auth_successes: u64,
    /// `portcullis_auth_failures_total`.
    pub auth_failures: u64,
    /// `portcullis_queue_oldest_seconds`: the gauge as the queue manager last set it.
    pub queue_oldest_seconds: u64,
    /// `portcullis_sessions_total`: (listener, TLS version or `none`, sessions).
    #[serde(default)]
    pub sessions: Vec<(String, String, u64)>,
    /// `portcullis_dns_errors_total`, by check.
    #[serde(default)]
    pub dns_errors: Vec<(String, u64)>,
    /// `portcullis_messages_removed_total`, by how (delete, purge, quarantine).
    #[serde(default)]
    pub removed: Vec<(String, u64)>,
}

impl Status {
    /// The live status from `telemetry` at `now_unix`; `not_ready` is the readiness verdict
    /// (`None`: ready) the admin listener computed.
    pub fn live(telemetry: &Telemetry, now_unix: u64, not_ready: Option<String>) -> Status {
        // One read of the flow, so the charts and the sums agree.
        let minutes = telemetry.flow.minutes(now_unix);
        let upstreams = telemetry.upstreams.snapshot(now_unix);
        Status {
            node: telemetry.node.clone(),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            now: now_unix,
            live: true,
            ready: not_ready.is_none(),
            not_ready,
            paused: telemetry.gate.paused(),
            last_1m: flow::last(&minutes, 1),
            last_5m: flow::last(&minutes, 5),
            last_15m: flow::last(&minutes, 15),
            last_60m: flow::last(&minutes, 60),
            minutes,
            queue: telemetry.queue(),
            alerts: telemetry.alerts.active(),
            top_refusals: telemetry.metrics.top_refusals(TOP_REFUSALS),
            totals: Totals::live(&telemetry.metrics, &upstreams),
            upstreams,
            journal: telemetry.journal_state(),
        }
    }
}

impl Status {
    /// Readiness in words, as the page and `portcullis status` show it: `ready`,
    /// `not ready: REASON`, or `not ready`; the reason (text from outside, such as an I/O
    /// error's) passed through `escape` for the medium.
    pub fn readiness(&self, escape: impl Fn(&str) -> String) -> String {
        match (&self.not_ready, self.ready) {
            (_, true) => "ready".to_owned(),
            (Some(reason), false) => format!("not ready: {}", escape(reason)),
            (None, false) => "not ready".to_owned(),
        }
    }
}

impl Totals {
    /// The counters of `metrics`, per upstream for the configured `upstreams`.
    fn live(metrics: &Metrics, upstreams: &[UpstreamState]) -> Totals {
        let names: Vec<String> = upstreams.iter().map(|u| u.name.clone()).collect();
        Totals {
            accepted: metrics.accepted_by_listener(),
            delivered: metrics.by_upstream(&metrics.delivered, &names),
            deferred: metrics.by_upstream(&metrics.deferred, &names),
            expired: metrics.by_upstream(&metrics.expired, &names),
            bounced: metrics.bounced.get(),
            auth_successes: metrics.auth_successes.get(),
            auth_failures: metrics.auth_failures.get(),
            queue_oldest_seconds: u64::try_from(metrics.queue_oldest_seconds.get()).unwrap_or(0),
            sessions: metrics.sessions_by_listener(),
            dns_errors: metrics.dns_errors_by_check(),
            removed: metrics.removed_by_how(),
        }
    }
}
