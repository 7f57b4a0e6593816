//! Each upstream's state as the status shows it: up or down since when, its last error, its
//! last success, and how many transactions it accepted in the last five minutes. Fed by the
//! delivery events and by the circuit breakers' transitions (`outbound`).

use std::collections::BTreeMap;
use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::event::{Event, EventKind};
use super::metrics::{Metrics, UpstreamLabel};

/// One upstream, as the status reports it.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct UpstreamState {
    /// `[[upstreams]] name`.
    pub name: String,
    /// False while its circuit breaker is open, and while its last connection (the capability
    /// probe at start or reload) failed and nothing has reached it since.
    pub up: bool,
    /// Its circuit breaker is open (deliveries skip it). An upstream can be down with its
    /// breaker closed: the probe's failure leaves the breaker alone.
    #[serde(default)]
    pub breaker_open: bool,
    /// Unix seconds of the last change between up and down (the start, if none).
    pub since: u64,
    /// The last error (connection failure, or a reply that deferred or failed mail).
    pub last_error: Option<String>,
    /// Unix seconds of the last accepted delivery.
    pub last_success: Option<u64>,
    /// Accepted transactions per minute: (minute start in Unix seconds, count), the last
    /// [`RECENT_MINUTES`] minutes (read with [`UpstreamBoard::snapshot`]).
    #[serde(skip)]
    recent: [(u64, u64); RECENT_MINUTES],
    /// Transactions accepted in the last five minutes, as of the snapshot.
    pub delivered_5m: u64,
}

/// Minutes of "recent" deliveries: the current one and the four before it.
const RECENT_MINUTES: usize = 5;

/// Every upstream's state.
#[derive(Debug, Default)]
pub struct UpstreamBoard {
    states: Mutex<BTreeMap<String, UpstreamState>>,
}

impl UpstreamBoard {
    /// Declare the configured upstreams (at start and on reload): each new one is up since
    /// `now_unix`; ones no longer configured are forgotten. Their gauges are set in `metrics`.
    pub fn configure(&self, names: &[String], now_unix: u64, metrics: &Metrics) {
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states.retain(|name, _| names.contains(name));
        for name in names {
            states.entry(name.clone()).or_insert_with(|| {
                let label = UpstreamLabel {
                    upstream: name.clone(),
                };
                metrics.upstream_up.get_or_create(&label).set(1);
                metrics.upstream_breaker_open.get_or_create(&label).set(0);
                UpstreamState {
                    name: name.clone(),
                    up: true,
                    since: now_unix,
                    ..UpstreamState::default()
                }
            });
        }
    }

    /// The breaker of `name` opened (`up` false, with the error that opened it) or closed.
    pub fn set_up(
        &self,
        name: &str,
        up: bool,
        error: Option<&str>,
        now_unix: u64,
        metrics: &Metrics,
    ) {
        self.set_state(name, up, !up, error, now_unix, metrics);
    }

    /// `name` is `up` or down, its breaker open or not (down with a closed breaker: its last
    /// connection failed outside a delivery), `error` the failure that made it down. `since`
    /// moves only when `up` changes.
    pub fn set_state(
        &self,
        name: &str,
        up: bool,
        breaker_open: bool,
        error: Option<&str>,
        now_unix: u64,
        metrics: &Metrics,
    ) {
        let label = UpstreamLabel {
            upstream: name.to_owned(),
        };
        metrics.upstream_up.get_or_create(&label).set(i64::from(up));
        metrics
            .upstream_breaker_open
            .get_or_create(&label)
            .set(i64::from(breaker_open));
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let state = states.entry(name.to_owned()).or_default();
        state.name = name.to_owned();
        state.breaker_open = breaker_open;
        if state.up != up || state.since == 0 {
            state.up = up;
            state.since = now_unix;
        }
        if let Some(error) = error {
            state.last_error = Some(error.to_owned());
        }
    }

    /// Follow a delivery event (last success, last error, recent deliveries).
    pub fn count(&self, event: &Event) {
        let Some(name) = &event.upstream else { return };
        let now = event.at / 1000;
        let mut states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        let Some(state) = states.get_mut(name) else {
            return;
        };
        match event.kind {
            EventKind::Delivered => {
                state.last_success = Some(now);
                let minute = now / 60 * 60;
                let slot = &mut state.recent[(now / 60) as usize % RECENT_MINUTES];
                if slot.0 != minute {
                    *slot = (minute, 0);
                }
                slot.1 += 1;
            }
            EventKind::Deferred | EventKind::Failed => {
                state.last_error.clone_from(&event.reply);
            }
            _ => {}
        }
    }

    /// Every upstream, by name, with `delivered_5m` counted up to `now_unix`.
    pub fn snapshot(&self, now_unix: u64) -> Vec<UpstreamState> {
        let states = self.states.lock().unwrap_or_else(|p| p.into_inner());
        states
            .values()
            .map(|s| {
                let mut s = s.clone();
                let oldest = (now_unix / 60 * 60).saturating_sub(60 * (RECENT_MINUTES as u64 - 1));
                s.delivered_5m = s
                    .recent
                    .iter()
                    .filter(|(start, _)| *start >= oldest)
                    .map(|(_, n)| n)
                    .sum();
                s
            })
            .collect()
    }
}
