//! The Prometheus families of the contract (DESIGN.md, "Metric names"), registered with
//! `prometheus-client` and served as OpenMetrics text on `/metrics`.
//!
//! Counters are registered without `_total` (the crate appends it). Every family is
//! registered from the start, so each shows its HELP and TYPE lines before its first sample.
//! Label values are bounded: listener and upstream names from the policy, rule names from the
//! code, and the fixed sets below; never an address or an IP.

use std::sync::atomic::AtomicU64;

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{Histogram, exponential_buckets};
use prometheus_client::registry::Registry;

use super::QueueCensus;
use super::event::{Event, EventKind};

/// The exposed family names, as a scrape shows them (counters with `_total`): the
/// contract's list, which a test compares with what `/metrics` serves.
pub const FAMILY_NAMES: [&str; 18] = [
    "portcullis_sessions_total",
    "portcullis_refusals_total",
    "portcullis_messages_accepted_total",
    "portcullis_messages_delivered_total",
    "portcullis_messages_deferred_total",
    "portcullis_messages_bounced_total",
    "portcullis_messages_expired_total",
    "portcullis_messages_removed_total",
    "portcullis_queue_messages",
    "portcullis_queue_oldest_seconds",
    "portcullis_upstream_up",
    "portcullis_upstream_breaker_open",
    "portcullis_upstream_last_success_timestamp_seconds",
    "portcullis_delivery_seconds",
    "portcullis_auth_successes_total",
    "portcullis_auth_failures_total",
    "portcullis_dns_errors_total",
    "portcullis_alert_active",
];

/// The `Content-Type` of [`Metrics::encode`]'s output.
pub const CONTENT_TYPE: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// `{listener, tls}`; `tls` is `none`, `1.2` or `1.3`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct SessionLabels {
    pub listener: String,
    pub tls: String,
}

/// `{rule}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RuleLabel {
    pub rule: String,
}

/// `{listener}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ListenerLabel {
    pub listener: String,
}

/// `{upstream}`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct UpstreamLabel {
    pub upstream: String,
}

/// `{how}`: `delete`, `purge` or `quarantine`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct HowLabel {
    pub how: String,
}

/// `{upstream, state}`; `state` is `queued` or `held`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct QueueLabels {
    pub upstream: String,
    pub state: String,
}

/// `{check}`: `spf`, `dkim`, `dmarc`, `arc`, `iprev` or `dnsbl`.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CheckLabel {
    pub check: String,
}

/// `{alert}`: an alert name of the contract.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct AlertLabel {
    pub alert: String,
}

/// Buckets of `portcullis_delivery_seconds`: 5 ms to about 80 s.
fn delivery_buckets() -> impl Iterator<Item = f64> {
    exponential_buckets(0.005, 2.0, 15)
}

/// Registers each metric wrapped in [`AlwaysExposed`].
struct Exposed<'r>(&'r mut Registry);

impl Exposed<'_> {
    fn register<M>(&mut self, name: &str, help: &str, metric: M)
    where
        M: prometheus_client::encoding::EncodeMetric + std::fmt::Debug + Send + Sync + 'static,
    {
        self.0.register(name, help, AlwaysExposed(metric));
    }
}

/// A metric whose family is encoded (HELP and TYPE lines) even before it has a sample:
/// prometheus-client leaves an empty labelled family out of the exposition, and the contract
/// says every family is there from the start, so dashboards and alert rules can rely on it.
#[derive(Debug)]
struct AlwaysExposed<M>(M);

impl<M: prometheus_client::encoding::EncodeMetric> prometheus_client::encoding::EncodeMetric
    for AlwaysExposed<M>
{
    fn encode(
        &self,
        encoder: prometheus_client::encoding::MetricEncoder,
    ) -> Result<(), std::fmt::Error> {
        self.0.encode(encoder)
    }

    fn metric_type(&self) -> prometheus_client::metrics::MetricType {
        self.0.metric_type()
    }

    fn is_empty(&self) -> bool {
        false
    }
}

/// The registry and every family in it.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    pub sessions: Family<SessionLabels, Counter>,
    pub refusals: Family<RuleLabel, Counter>,
    pub accepted: Family<ListenerLabel, Counter>,
    pub delivered: Family<UpstreamLabel, Counter>,
    pub deferred: Family<UpstreamLabel, Counter>,
    pub bounced: Counter,
    pub expired: Family<UpstreamLabel, Counter>,
    pub removed: Family<HowLabel, Counter>,
    pub queue_messages: Family<QueueLabels, Gauge>,
    pub queue_oldest_seconds: Gauge,
    pub upstream_up: Family<UpstreamLabel, Gauge>,
    pub upstream_breaker_open: Family<UpstreamLabel, Gauge>,
    pub upstream_last_success: Family<UpstreamLabel, Gauge<f64, AtomicU64>>,
    pub delivery_seconds: Histogram,
    pub auth_successes: Counter,
    pub auth_failures: Counter,
    pub dns_errors: Family<CheckLabel, Counter>,
    pub alert_active: Family<AlertLabel, Gauge>,
    /// The rules that have refused something (for [`Metrics::top_refusals`]).
    rules: std::sync::Mutex<std::collections::BTreeSet<String>>,
    /// The listeners that have ended a session or accepted a message (for
    /// [`Metrics::accepted_by_listener`] and [`Metrics::sessions_by_listener`]).
    listeners: std::sync::Mutex<std::collections::BTreeSet<String>>,
}

impl Default for Metrics {
    fn default() -> Metrics {
        Metrics::new()
    }
}

impl Metrics {
    /// Every family of the contract, registered and empty.
    pub fn new() -> Metrics {
        let mut registry = Registry::default();
        let m = Metrics {
            registry: Registry::default(),
            sessions: Family::default(),
            refusals: Family::default(),
            accepted: Family::default(),
            delivered: Family::default(),
            deferred: Family::default(),
            bounced: Counter::default(),
            expired: Family::default(),
            removed: Family::default(),
            queue_messages: Family::default(),
            queue_oldest_seconds: Gauge::default(),
            upstream_up: Family::default(),
            upstream_breaker_open: Family::default(),
            upstream_last_success: Family::default(),
            delivery_seconds: Histogram::new(delivery_buckets()),
            auth_successes: Counter::default(),
            auth_failures: Counter::default(),
            dns_errors: Family::default(),
            alert_active: Family::default(),
            rules: std::sync::Mutex::default(),
            listeners: std::sync::Mutex::default(),
        };
        // Every family shows its HELP and TYPE lines from the start (DESIGN.md, "Metric names").
        let r = &mut Exposed(&mut registry);
        r.register(
            "portcullis_sessions",
            "SMTP sessions ended, by listener and TLS version",
            m.sessions.clone(),
        );
        r.register(
            "portcullis_refusals",
            "Refusals (connections, commands, messages) by the rule that fired",
            m.refusals.clone(),
        );
        r.register(
            "portcullis_messages_accepted",
            "Messages acknowledged with 250 and queued, by listener",
            m.accepted.clone(),
        );
        r.register(
            "portcullis_messages_delivered",
            "Delivery transactions an upstream accepted, by upstream",
            m.delivered.clone(),
        );
        r.register(
            "portcullis_messages_deferred",
            "Delivery transactions left for a later attempt, by upstream",
            m.deferred.clone(),
        );
        r.register(
            "portcullis_messages_bounced",
            "Messages with a permanent failure (bounce queued, or logged when none can be sent)",
            m.bounced.clone(),
        );
        r.register(
            "portcullis_messages_expired",
            "Messages that reached [queue] max_age, by upstream",
            m.expired.clone(),
        );
        r.register(
            "portcullis_messages_removed",
            "Messages removed by an operator, by how (delete, purge, quarantine)",
            m.removed.clone(),
        );
        r.register(
            "portcullis_queue_messages",
            "Messages in the queue, by upstream and state (queued, held)",
            m.queue_messages.clone(),
        );
        r.register(
            "portcullis_queue_oldest_seconds",
            "Age of the oldest queued message that is not held, in seconds",
            m.queue_oldest_seconds.clone(),
        );
        r.register(
            "portcullis_upstream_up",
            "1 while the upstream's circuit breaker is closed",
            m.upstream_up.clone(),
        );
        r.register(
            "portcullis_upstream_breaker_open",
            "1 while the upstream's circuit breaker is open",
            m.upstream_breaker_open.clone(),
        );
        r.register(
            "portcullis_upstream_last_success_timestamp_seconds",
            "Unix time of the upstream's last accepted delivery",
            m.upstream_last_success.clone(),
        );
        r.register(
            "portcullis_delivery_seconds",
            "Duration of delivery transactions, in seconds",
            m.delivery_seconds.clone(),
        );
        r.register(
            "portcullis_auth_successes",
            "Successful AUTH",
            m.auth_successes.clone(),
        );
        r.register(
            "portcullis_auth_failures",
            "AUTH refused for its credentials (wrong password, unknown login) or by the lockout",
            m.auth_failures.clone(),
        );
        r.register(
            "portcullis_dns_errors",
            "DNS lookups that failed (timeout, SERVFAIL), by check",
            m.dns_errors.clone(),
        );
        r.register(
            "portcullis_alert_active",
            "1 while the alert is firing",
            m.alert_active.clone(),
        );
        Metrics { registry, ..m }
    }

    /// The OpenMetrics text of every family ([`CONTENT_TYPE`]).
    pub fn encode(&self) -> String {
        let mut out = String::new();
        // Writing into a String cannot fail.
        let _ = prometheus_client::encoding::text::encode(&mut out, &self.registry);
        out
    }

    /// Count what `event` counts towards. On the per-message path: one label built per
    /// family touched, and the sets of rules and listeners seen locked only when a series is
    /// new (the first refusal by a rule, the first message on a listener).
    pub fn count(&self, event: &Event) {
        let upstream = || UpstreamLabel {
            upstream: event.upstream.clone().unwrap_or_default(),
        };
        match event.kind {
            EventKind::Refused => {
                let label = RuleLabel {
                    rule: event.rule.clone().unwrap_or_default(),
                };
                if inc_is_new(&self.refusals, &label) {
                    seen(&self.rules, label.rule);
                }
            }
            EventKind::Queued => {
                let label = ListenerLabel {
                    listener: event.listener.clone().unwrap_or_default(),
                };
                if inc_is_new(&self.accepted, &label) {
                    seen(&self.listeners, label.listener);
                }
            }
            EventKind::Delivered => {
                let label = upstream();
                self.delivered.get_or_create(&label).inc();
                #[allow(clippy::cast_precision_loss)] // Unix milliseconds fit in f64's 52 bits
                self.upstream_last_success
                    .get_or_create(&label)
                    .set(event.at as f64 / 1000.0);
                if let Some(seconds) = event.seconds {
                    self.delivery_seconds.observe(seconds);
                }
            }
            EventKind::Deferred => {
                self.deferred.get_or_create(&upstream()).inc();
                if let Some(seconds) = event.seconds {
                    self.delivery_seconds.observe(seconds);
                }
            }
            EventKind::Bounced => {
                self.bounced.inc();
            }
            EventKind::Expired => {
                self.expired.get_or_create(&upstream()).inc();
            }
            EventKind::Deleted | EventKind::Purged | EventKind::Quarantined => {
                let how = match event.kind {
                    EventKind::Deleted => "delete",
                    EventKind::Purged => "purge",
                    _ => "quarantine",
                };
                self.removed
                    .get_or_create(&HowLabel {
                        how: how.to_owned(),
                    })
                    .inc();
            }
            EventKind::Connect
            | EventKind::Failed
            | EventKind::Finished
            | EventKind::Held
            | EventKind::Released
            | EventKind::Restored
            | EventKind::Adopted => {}
        }
    }

    /// A session ended on `listener`, in TLS `tls` (`None`: plaintext).
    pub fn session_ended(&self, listener: &str, tls: Option<&str>) {
        let labels = SessionLabels {
            listener: listener.to_owned(),
            tls: tls.unwrap_or("none").to_owned(),
        };
        if inc_is_new(&self.sessions, &labels) {
            seen(&self.listeners, labels.listener);
        }
    }

    /// A DNS lookup of `check` failed (timeout, SERVFAIL).
    pub fn dns_error(&self, check: &'static str) {
        let labels = CheckLabel {
            check: check.to_owned(),
        };
        self.dns_errors.get_or_create(&labels).inc();
    }

    /// Set the queue gauges from `census` (every series replaced, so an upstream no longer
    /// holding mail shows 0 rather than a stale count).
    pub fn set_queue(&self, census: &QueueCensus, now_unix: u64) {
        for u in &census.by_upstream {
            for (state, n) in [("queued", u.queued), ("held", u.held)] {
                let labels = QueueLabels {
                    upstream: u.upstream.clone(),
                    state: state.to_owned(),
                };
                self.queue_messages
                    .get_or_create(&labels)
                    .set(i64::try_from(n).unwrap_or(i64::MAX));
            }
        }
        let oldest = census
            .oldest
            .as_ref()
            .map_or(0, |(_, arrived)| now_unix.saturating_sub(*arrived));
        self.queue_oldest_seconds
            .set(i64::try_from(oldest).unwrap_or(i64::MAX));
    }

    /// Whether `alert` is firing.
    pub fn set_alert(&self, alert: &str, active: bool) {
        let labels = AlertLabel {
            alert: alert.to_owned(),
        };
        self.alert_active
            .get_or_create(&labels)
            .set(i64::from(active));
    }
}

impl Metrics {
    /// Refusals since start by rule, most first (ties by name), at most `n`.
    pub fn top_refusals(&self, n: usize) -> Vec<(String, u64)> {
        let mut rules: Vec<(String, u64)> = Vec::new();
        // prometheus-client has no iterator over a family; the rules seen are kept beside it.
        let seen: Vec<String> = self
            .rules
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect();
        for rule in seen {
            let count = self
                .refusals
                .get_or_create(&RuleLabel { rule: rule.clone() })
                .get();
            rules.push((rule, count));
        }
        rules.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        rules.truncate(n);
        rules
    }
}

/// The `tls` label values of `portcullis_sessions_total`.
pub const TLS_LABELS: [&str; 3] = ["none", "1.2", "1.3"];
/// The `check` label values of `portcullis_dns_errors_total`.
pub const DNS_CHECKS: [&str; 6] = ["spf", "dkim", "dmarc", "arc", "iprev", "dnsbl"];
/// The `how` label values of `portcullis_messages_removed_total`.
pub const REMOVED_HOW: [&str; 3] = ["delete", "purge", "quarantine"];

/// Increment the series of `labels` in `family`, creating it when there is none; true when
/// it was created (two threads may both see it new: the callers' sets do not mind).
fn inc_is_new<S>(family: &Family<S, Counter>, labels: &S) -> bool
where
    S: Clone + std::hash::Hash + Eq,
{
    // The read guard of `get` is dropped before `get_or_create` may take the write lock.
    let existed = family.get(labels).map(|counter| counter.inc()).is_some();
    if !existed {
        family.get_or_create(labels).inc();
    }
    !existed
}

/// Add `name` to a set of label values seen.
fn seen(set: &std::sync::Mutex<std::collections::BTreeSet<String>>, name: String) {
    set.lock().unwrap_or_else(|p| p.into_inner()).insert(name);
}

impl Metrics {
    fn seen_listeners(&self) -> Vec<String> {
        self.listeners
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .cloned()
            .collect()
    }

    /// `portcullis_sessions_total` as `(listener, tls, count)`, the series that exist, by
    /// listener then TLS version (read only: no series is created).
    pub fn sessions_by_listener(&self) -> Vec<(String, String, u64)> {
        let mut out = Vec::new();
        for listener in self.seen_listeners() {
            for tls in TLS_LABELS {
                let labels = SessionLabels {
                    listener: listener.clone(),
                    tls: tls.to_owned(),
                };
                if let Some(counter) = self.sessions.get(&labels) {
                    out.push((listener.clone(), tls.to_owned(), counter.get()));
                }
            }
        }
        out
    }

    /// `portcullis_dns_errors_total` by check, the series that exist.
    pub fn dns_errors_by_check(&self) -> Vec<(String, u64)> {
        existing(&self.dns_errors, DNS_CHECKS, |check| CheckLabel { check })
    }

    /// `portcullis_messages_removed_total` by how, the series that exist.
    pub fn removed_by_how(&self) -> Vec<(String, u64)> {
        existing(&self.removed, REMOVED_HOW, |how| HowLabel { how })
    }

    /// `portcullis_messages_accepted_total` by listener, sorted by name: the series that
    /// exist (a listener that accepted nothing since start has none).
    pub fn accepted_by_listener(&self) -> Vec<(String, u64)> {
        existing(&self.accepted, self.seen_listeners(), |listener| {
            ListenerLabel { listener }
        })
    }

    /// The series of `family` for each upstream in `names` that has one, in that order
    /// (read only: no series is created).
    pub fn by_upstream(
        &self,
        family: &Family<UpstreamLabel, Counter>,
        names: &[String],
    ) -> Vec<(String, u64)> {
        existing(family, names, |upstream| UpstreamLabel { upstream })
    }
}

/// `(value, count)` for each label value of `values` whose series exists in `family`, in
/// that order (read only: no series is created); `labels` makes the label set of a value.
fn existing<S, V>(
    family: &Family<S, Counter>,
    values: impl IntoIterator<Item = V>,
    labels: impl Fn(String) -> S,
) -> Vec<(String, u64)>
where
    S: Clone + std::hash::Hash + Eq,
    V: AsRef<str>,
{
    values
        .into_iter()
        .filter_map(|value| {
            let value = value.as_ref();
            let count = family.get(&labels(value.to_owned()))?.get();
            Some((value.to_owned(), count))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn event(kind: EventKind, f: impl FnOnce(&mut Event)) -> Event {
        let mut e = Event::at(kind, 1_000);
        f(&mut e);
        e
    }

    #[test]
    fn series_read_back_count_every_event_not_only_the_first() {
        let m = Metrics::new();
        for rule in ["dnsbl", "rate", "dnsbl", "dnsbl", "rate", "spf"] {
            m.count(&event(EventKind::Refused, |e| e.rule = Some(rule.into())));
        }
        for listener in ["mx", "submission", "mx"] {
            m.count(&event(EventKind::Queued, |e| {
                e.listener = Some(listener.into())
            }));
        }
        m.session_ended("mx", Some("1.3"));
        m.session_ended("mx", None);
        m.session_ended("mx", Some("1.3"));
        m.session_ended("relay", None);
        let owned = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
        };
        assert_eq!(
            m.top_refusals(10),
            owned(&[("dnsbl", 3), ("rate", 2), ("spf", 1)])
        );
        assert_eq!(m.top_refusals(1), owned(&[("dnsbl", 3)]));
        assert_eq!(
            m.accepted_by_listener(),
            owned(&[("mx", 2), ("submission", 1)])
        );
        let sessions: Vec<(String, String, u64)> =
            [("mx", "none", 1), ("mx", "1.3", 2), ("relay", "none", 1)]
                .iter()
                .map(|(l, t, n)| ((*l).to_owned(), (*t).to_owned(), *n))
                .collect();
        assert_eq!(m.sessions_by_listener(), sessions);
    }

    #[test]
    fn read_backs_list_the_existing_series_in_the_order_asked() {
        let m = Metrics::new();
        m.dns_error("dnsbl");
        m.dns_error("spf");
        m.dns_error("dnsbl");
        m.count(&event(EventKind::Purged, |_| {}));
        for upstream in ["smarthost", "exchange", "smarthost"] {
            m.count(&event(EventKind::Delivered, |e| {
                e.upstream = Some(upstream.into())
            }));
        }
        let owned = |v: &[(&str, u64)]| -> Vec<(String, u64)> {
            v.iter().map(|(s, n)| ((*s).to_owned(), *n)).collect()
        };
        assert_eq!(m.dns_errors_by_check(), owned(&[("spf", 1), ("dnsbl", 2)]));
        assert_eq!(m.removed_by_how(), owned(&[("purge", 1)]));
        let names = ["exchange", "idle", "smarthost"].map(str::to_owned);
        assert_eq!(
            m.by_upstream(&m.delivered, &names),
            owned(&[("exchange", 1), ("smarthost", 2)])
        );
        assert_eq!(m.by_upstream(&m.deferred, &names), owned(&[]));
    }
}
