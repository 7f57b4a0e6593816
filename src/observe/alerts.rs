//! The alerts of `[alerts]`, which need no Prometheus: each is evaluated from what the relay
//! knows (flow, queue census, upstream states), starts and ends once (the hysteresis below),
//! is logged at error level with `alert=NAME`, shows in `/metrics`, `/api/status` and the
//! status page, and is POSTed to `webhook` ([`super::webhook`]) without ever blocking mail.
//!
//! Three layers: [`evaluate`] is a pure function of the relay's state ([`Inputs`]), the
//! thresholds and the time, giving one [`Condition`] per configured alert; [`Engine`] is the
//! state machine that turns conditions into one start and one end per alert; [`task`] runs both
//! every [`task::INTERVAL`] and carries out the transitions (log, metrics, board, webhook).
//!
//! # What each alert watches (held messages never count)
//! - `no_inbound`: nothing accepted on any listener for the threshold, counted from the last
//!   accepted message, or from the relay's start when none was accepted since.
//! - `no_delivery`: messages queued and nothing delivered for the threshold, counted from the
//!   later of the last delivery and the moment the queue last became non-empty (a queue that
//!   was empty for an hour and got one message a second ago has not been stuck for an hour).
//! - `queue_depth`: at least `queue_depth` messages queued.
//! - `oldest_message`: the oldest queued message is at least the threshold old.
//! - `upstream_down`: an upstream has been down for the threshold: its circuit breaker open,
//!   or its last connection failed (the capability probe at start or reload).
//! - `user_suspended`, `cluster_fallback`: raised and cleared from elsewhere
//!   ([`AlertBoard::set_external`]).
//!
//! # Hysteresis: an alert starts once and ends once
//! Each evaluation gives every alert a [`Level`]: `Firing`, `Hold` or `Clear`.
//! - An alert **starts** at the first evaluation that finds it `Firing` (the time thresholds
//!   are part of the condition: "nothing delivered for 5m" is only true after 5 minutes).
//! - A started alert **ends** once it has been `Clear` at every evaluation for its clear time:
//!   [`CLEAR_AFTER`] (60 s), or the alert's own threshold when that is shorter (a 2 s
//!   `upstream_down` clears after 2 s up). A `Firing` or `Hold` evaluation restarts the clear
//!   time. External alerts end at the first `Clear` (their raiser owns the hysteresis).
//! - `Hold` is a band where a firing alert stays firing and a quiet one stays quiet:
//!   `queue_depth` is `Clear` only below 90 % of the threshold, `oldest_message` only below
//!   90 % of its age threshold, `upstream_down` only when every upstream is up (one down for
//!   less than the threshold holds).
//! - An alert whose key is removed by a reload ends at the next evaluation.
//! - A time counted from the relay's start (`no_inbound` with nothing accepted since,
//!   `no_delivery` with nothing delivered and messages queued since the start) that has not
//!   reached its threshold is `Hold`, not `Clear`: the relay cannot tell yet.
//!
//! # Across a restart
//! The firing alerts are kept under the spool ([`state`]) and seed the engine at the next
//! start ([`Engine::seed`]): one whose condition still holds carries on, same `since`, nothing
//! announced; one whose condition is over ends after its clear time with a `resolved`. The
//! `Hold` above is what lets a seeded `no_inbound` or `no_delivery` wait for its threshold
//! after the start instead of ending and starting again.
//!
//! `queue_depth`'s threshold is a count, so its clear time is always [`CLEAR_AFTER`].
//! Precision: one evaluation a second, and upstream and arrival times in whole seconds, so an
//! alert starts or ends up to about 2 s after the moment its rule names; thresholds shorter
//! than a few seconds are not meaningful.

pub mod state;
pub mod task;
#[cfg(test)]
mod tests;

use std::collections::BTreeMap;
use std::sync::Mutex;
use std::time::Duration;

use serde::{Deserialize, Serialize};

use crate::config::units::format_duration;
pub use task::spawn;

/// An alert name of the contract (also the `alert` label and the webhook's `alert`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum AlertName {
    NoInbound,
    NoDelivery,
    QueueDepth,
    OldestMessage,
    UpstreamDown,
    UserSuspended,
    ClusterFallback,
}

impl AlertName {
    /// Every alert, in the contract's order.
    pub const ALL: [AlertName; 7] = [
        AlertName::NoInbound,
        AlertName::NoDelivery,
        AlertName::QueueDepth,
        AlertName::OldestMessage,
        AlertName::UpstreamDown,
        AlertName::UserSuspended,
        AlertName::ClusterFallback,
    ];

    /// The alerts raised from elsewhere ([`AlertBoard::set_external`]) rather than evaluated
    /// from `[alerts]`.
    pub const EXTERNAL: [AlertName; 2] = [AlertName::UserSuspended, AlertName::ClusterFallback];

    /// The name as the contract spells it.
    pub fn as_str(self) -> &'static str {
        match self {
            AlertName::NoInbound => "no_inbound",
            AlertName::NoDelivery => "no_delivery",
            AlertName::QueueDepth => "queue_depth",
            AlertName::OldestMessage => "oldest_message",
            AlertName::UpstreamDown => "upstream_down",
            AlertName::UserSuspended => "user_suspended",
            AlertName::ClusterFallback => "cluster_fallback",
        }
    }
}

/// A firing alert.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ActiveAlert {
    pub alert: AlertName,
    /// Unix seconds when it started.
    pub since: u64,
    /// The value that keeps it firing (seconds as `125s`, or a message count), as of the last
    /// evaluation.
    pub value: String,
    /// The threshold it crossed, as written in the policy (`5m`, `10000`).
    pub threshold: String,
    /// One line for a person: what is wrong and where to look.
    pub text: String,
}

/// An alert raised from outside the evaluation ([`AlertBoard::set_external`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct External {
    /// What makes it fire, as text (as [`ActiveAlert::value`]).
    pub value: String,
    /// The limit that was crossed, as text.
    pub threshold: String,
    /// One line for a person.
    pub text: String,
}

/// The alerts firing now (written by the alert task, read by the status), and the external
/// alerts raised for the task to pick up.
#[derive(Debug, Default)]
pub struct AlertBoard {
    active: Mutex<Vec<ActiveAlert>>,
    external: Mutex<BTreeMap<AlertName, External>>,
}

impl AlertBoard {
    /// The firing alerts, in the contract's order.
    pub fn active(&self) -> Vec<ActiveAlert> {
        self.active
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Replace the firing alerts.
    pub fn set(&self, mut active: Vec<ActiveAlert>) {
        active.sort_by_key(|a| a.alert);
        *self.active.lock().unwrap_or_else(|p| p.into_inner()) = active;
    }

    /// Raise (`Some`) or clear (`None`) an alert decided elsewhere: `user_suspended` (a login
    /// suspended by containment) or `cluster_fallback` (the shared store unreachable). The
    /// alert task starts or ends it at its next evaluation (within [`task::INTERVAL`]), with
    /// the same log line, metric and webhook as the others. Names outside
    /// [`AlertName::EXTERNAL`] are evaluated from `[alerts]` and ignored here.
    pub fn set_external(&self, alert: AlertName, raised: Option<External>) {
        if !AlertName::EXTERNAL.contains(&alert) {
            return;
        }
        let mut external = self.external.lock().unwrap_or_else(|p| p.into_inner());
        match raised {
            Some(e) => external.insert(alert, e),
            None => external.remove(&alert),
        };
    }

    /// The external alerts as conditions: `Firing` when raised, else `Clear`.
    pub fn external_conditions(&self) -> Vec<Condition> {
        let external = self.external.lock().unwrap_or_else(|p| p.into_inner());
        AlertName::EXTERNAL
            .iter()
            .map(|&alert| match external.get(&alert) {
                Some(e) => Condition {
                    alert,
                    level: Level::Firing,
                    value: e.value.clone(),
                    threshold: e.threshold.clone(),
                    text: e.text.clone(),
                    clear_after: Duration::ZERO,
                },
                None => Condition {
                    alert,
                    level: Level::Clear,
                    value: String::new(),
                    threshold: String::new(),
                    text: format!("{} cleared", alert.as_str()),
                    clear_after: Duration::ZERO,
                },
            })
            .collect()
    }
}

/// Longest clear time: a started alert ends after its condition has been `Clear` this long
/// (or its threshold, when shorter).
pub const CLEAR_AFTER: Duration = Duration::from_secs(60);

/// What the relay knows at one evaluation. Times in Unix milliseconds unless said otherwise.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Inputs {
    /// When the relay started.
    pub started: u64,
    /// The last message accepted on any listener (0: none since start).
    pub last_accepted: u64,
    /// The last delivery an upstream accepted (0: none since start).
    pub last_delivered: u64,
    /// Messages queued, held ones not counted.
    pub queued: u64,
    /// Since when the queue (held messages not counted) has not been empty (`None`: empty).
    pub queue_nonempty_since: Option<u64>,
    /// Unix **seconds** of arrival of the oldest queued message that is not held.
    pub oldest_arrival: Option<u64>,
    /// The upstreams that are down: breaker open, or last connection failed.
    pub down: Vec<Down>,
    /// The listeners are paused (`portcullis listeners pause`): said in `no_inbound`'s text.
    pub paused: bool,
}

/// An upstream that is down: its circuit breaker is open, or its last connection (the
/// capability probe at start or reload, which leaves the breaker alone) failed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Down {
    /// `[[upstreams]] name`.
    pub name: String,
    /// Its circuit breaker is open (else only the probe failed).
    pub breaker_open: bool,
    /// Unix **seconds** since when.
    pub since: u64,
    /// Its last error, if known (shortened to [`ERROR_CHARS`] in the alert's text).
    pub error: Option<String>,
}

/// Most characters of an upstream's last error quoted in `upstream_down`'s text.
pub const ERROR_CHARS: usize = 200;

/// Where an alert stands at one evaluation (see the module doc for the hysteresis).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Level {
    /// The alert's condition holds: a quiet alert starts.
    Firing,
    /// Between: a firing alert stays firing, a quiet one stays quiet.
    Hold,
    /// The condition is over: a firing alert ends after its clear time of `Clear`.
    Clear,
}

/// One alert's state at one evaluation.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Condition {
    pub alert: AlertName,
    pub level: Level,
    /// The value measured (seconds as `125s`, or a count).
    pub value: String,
    /// The threshold, as the policy spells it.
    pub threshold: String,
    /// One line for a person.
    pub text: String,
    /// How long it must be `Clear` before a firing alert ends.
    pub clear_after: Duration,
}

/// Every alert `thresholds` configures, as it stands at `now` (Unix milliseconds) given
/// `inputs`, in the contract's order. Pure: no clock, no I/O.
pub fn evaluate(inputs: &Inputs, thresholds: &crate::config::Alerts, now: u64) -> Vec<Condition> {
    let mut out = Vec::new();
    if let Some(t) = thresholds.no_inbound {
        out.push(no_inbound(inputs, t, now));
    }
    if let Some(t) = thresholds.no_delivery {
        out.push(no_delivery(inputs, t, now));
    }
    if let Some(n) = thresholds.queue_depth {
        out.push(queue_depth(inputs, n));
    }
    if let Some(t) = thresholds.oldest_message {
        out.push(oldest_message(inputs, t, now));
    }
    if let Some(t) = thresholds.upstream_down {
        out.push(upstream_down(inputs, t, now));
    }
    out
}

/// `Firing` when `elapsed` reached `threshold`, else `Clear`.
fn reached(elapsed_ms: u64, threshold: Duration) -> Level {
    if u128::from(elapsed_ms) >= threshold.as_millis() {
        Level::Firing
    } else {
        Level::Clear
    }
}

/// `level` of a time that is counted from the relay's start (`from_start`): not `Clear` but
/// `Hold`, since it says only that the relay has not run for the threshold yet (module doc).
fn from_start(level: Level, from_start: bool) -> Level {
    match level {
        Level::Clear if from_start => Level::Hold,
        level => level,
    }
}

/// `Firing` at or over `threshold`, `Clear` below 90 % of it (in integers: value / threshold
/// < 9 / 10), `Hold` between (the band of `queue_depth` and `oldest_message`).
fn banded(value: u128, threshold: u128) -> Level {
    if value >= threshold {
        Level::Firing
    } else if value * 10 < threshold * 9 {
        Level::Clear
    } else {
        Level::Hold
    }
}

/// The clear time of an alert whose threshold is a duration.
fn clear_after(threshold: Duration) -> Duration {
    threshold.min(CLEAR_AFTER)
}

fn no_inbound(inputs: &Inputs, threshold: Duration, now: u64) -> Condition {
    let idle = now.saturating_sub(inputs.last_accepted.max(inputs.started));
    let mut text = if inputs.last_accepted == 0 {
        format!(
            "nothing accepted on any listener since the relay started {} ago",
            secs(idle)
        )
    } else {
        format!("nothing accepted on any listener for {}", secs(idle))
    };
    if inputs.paused {
        text.push_str(" (the listeners are paused: portcullis listeners resume)");
    }
    Condition {
        alert: AlertName::NoInbound,
        level: from_start(reached(idle, threshold), inputs.last_accepted == 0),
        value: secs(idle),
        threshold: format_duration(threshold),
        text,
        clear_after: clear_after(threshold),
    }
}

fn no_delivery(inputs: &Inputs, threshold: Duration, now: u64) -> Condition {
    let (level, stalled, text) = match inputs.queue_nonempty_since {
        Some(since) if inputs.queued > 0 => {
            let counted_from = inputs.last_delivered.max(since);
            let stalled = now.saturating_sub(counted_from);
            let text = format!(
                "{} queued and none delivered for {}: see portcullis status for the \
                 upstreams' last errors",
                messages(inputs.queued),
                secs(stalled)
            );
            let level = from_start(reached(stalled, threshold), counted_from <= inputs.started);
            (level, stalled, text)
        }
        _ => (Level::Clear, 0, "the queue is empty".to_owned()),
    };
    Condition {
        alert: AlertName::NoDelivery,
        level,
        value: secs(stalled),
        threshold: format_duration(threshold),
        text,
        clear_after: clear_after(threshold),
    }
}

fn queue_depth(inputs: &Inputs, threshold: u64) -> Condition {
    let queued = inputs.queued;
    let level = banded(u128::from(queued), u128::from(threshold));
    Condition {
        alert: AlertName::QueueDepth,
        level,
        value: queued.to_string(),
        threshold: threshold.to_string(),
        text: format!("{} queued (held messages not counted)", messages(queued)),
        clear_after: CLEAR_AFTER,
    }
}

fn oldest_message(inputs: &Inputs, threshold: Duration, now: u64) -> Condition {
    let age = inputs.oldest_arrival.map_or(0, |arrival| {
        now.saturating_sub(arrival.saturating_mul(1000))
    });
    let level = match inputs.oldest_arrival {
        Some(_) => banded(u128::from(age), threshold.as_millis()),
        None => Level::Clear,
    };
    let text = match inputs.oldest_arrival {
        Some(_) => format!("the oldest queued message (not held) is {} old", secs(age)),
        None => "no message queued".to_owned(),
    };
    Condition {
        alert: AlertName::OldestMessage,
        level,
        value: secs(age),
        threshold: format_duration(threshold),
        text,
        clear_after: clear_after(threshold),
    }
}

fn upstream_down(inputs: &Inputs, threshold: Duration, now: u64) -> Condition {
    let down_for = |since: u64| now.saturating_sub(since.saturating_mul(1000));
    let longest = inputs.down.iter().map(|d| down_for(d.since)).max();
    let level = match longest {
        None => Level::Clear,
        Some(ms) if reached(ms, threshold) == Level::Firing => Level::Firing,
        Some(_) => Level::Hold,
    };
    let text = if inputs.down.is_empty() {
        "every upstream is up".to_owned()
    } else {
        let each: Vec<String> = inputs
            .down
            .iter()
            .map(|d| {
                let mut one = format!("{} down for {}", d.name, secs(down_for(d.since)));
                if let Some(error) = &d.error {
                    let short: String = error.chars().take(ERROR_CHARS).collect();
                    one.push_str(&format!(" ({short})"));
                }
                one
            })
            .collect();
        let what = if inputs.down.iter().all(|d| d.breaker_open) {
            "circuit breaker open"
        } else {
            "upstream down"
        };
        format!("{what}: {}", each.join("; "))
    };
    Condition {
        alert: AlertName::UpstreamDown,
        level,
        value: secs(longest.unwrap_or(0)),
        threshold: format_duration(threshold),
        text,
        clear_after: clear_after(threshold),
    }
}

/// An alert's value as a number, for comparing two (text that is not one: 0).
fn number(value: &str) -> u64 {
    value.parse().unwrap_or(0)
}

/// `1 message`, `3 messages`.
fn messages(n: u64) -> String {
    if n == 1 {
        "1 message".to_owned()
    } else {
        format!("{n} messages")
    }
}

/// Milliseconds as whole seconds: `125s`.
fn secs(ms: u64) -> String {
    format!("{}s", ms / 1000)
}

/// A start or an end, for the alert task to announce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Transition {
    /// The alert started (its `since` is now).
    Started(ActiveAlert),
    /// The alert ended at `at` (Unix seconds): `alert` as it last stood, with the value and
    /// text of the evaluation that ended it.
    Ended { alert: ActiveAlert, at: u64 },
    /// A firing external alert whose value grew (another login suspended): announced again
    /// as firing, with its new value and text and its first `since`, so that the second
    /// compromised account is not missed while the first is still suspended.
    Grew(ActiveAlert),
}

/// A firing alert and since when its condition has been `Clear` (Unix milliseconds).
#[derive(Debug, Clone)]
struct Track {
    active: ActiveAlert,
    clear_since: Option<u64>,
}

/// The state machine of the hysteresis (module doc): which alerts are firing, and for each
/// since when it has been clear. Takes the time as an argument; no clock of its own.
#[derive(Debug, Default)]
pub struct Engine {
    tracks: BTreeMap<AlertName, Track>,
}

impl Engine {
    /// Apply one evaluation's `conditions` at `now` (Unix milliseconds); the starts and ends
    /// it makes, in the contract's order. A firing alert without a condition (its key removed
    /// by a reload) ends.
    pub fn step(&mut self, conditions: &[Condition], now: u64) -> Vec<Transition> {
        let mut out = Vec::new();
        for c in conditions {
            match (self.tracks.get_mut(&c.alert), c.level) {
                (None, Level::Firing) => {
                    let active = ActiveAlert {
                        alert: c.alert,
                        since: now / 1000,
                        value: c.value.clone(),
                        threshold: c.threshold.clone(),
                        text: c.text.clone(),
                    };
                    self.tracks.insert(
                        c.alert,
                        Track {
                            active: active.clone(),
                            clear_since: None,
                        },
                    );
                    out.push(Transition::Started(active));
                }
                (None, _) => {}
                (Some(track), level) => {
                    let grew = level == Level::Firing
                        && AlertName::EXTERNAL.contains(&c.alert)
                        && number(&c.value) > number(&track.active.value);
                    track.active.value.clone_from(&c.value);
                    track.active.threshold.clone_from(&c.threshold);
                    track.active.text.clone_from(&c.text);
                    if grew {
                        out.push(Transition::Grew(track.active.clone()));
                    }
                    if level != Level::Clear {
                        track.clear_since = None;
                        continue;
                    }
                    let since = *track.clear_since.get_or_insert(now);
                    if u128::from(now - since.min(now)) >= c.clear_after.as_millis() {
                        let alert = track.active.clone();
                        self.tracks.remove(&c.alert);
                        out.push(Transition::Ended {
                            alert,
                            at: now / 1000,
                        });
                    }
                }
            }
        }
        let unconfigured: Vec<AlertName> = self
            .tracks
            .keys()
            .filter(|name| !conditions.iter().any(|c| c.alert == **name))
            .copied()
            .collect();
        for name in unconfigured {
            if let Some(mut track) = self.tracks.remove(&name) {
                track.active.text = format!("{} is no longer configured", name.as_str());
                out.push(Transition::Ended {
                    alert: track.active,
                    at: now / 1000,
                });
            }
        }
        out.sort_by_key(|t| match t {
            Transition::Started(a) | Transition::Grew(a) | Transition::Ended { alert: a, .. } => {
                a.alert
            }
        });
        out
    }

    /// The firing alerts, in the contract's order.
    pub fn active(&self) -> Vec<ActiveAlert> {
        self.tracks.values().map(|t| t.active.clone()).collect()
    }

    /// Take up `alerts` as firing (kept from before a restart, [`state`]), each as it was:
    /// the next evaluations carry them on or end them, and never start them again.
    pub fn seed(&mut self, alerts: Vec<ActiveAlert>) {
        for active in alerts {
            self.tracks.insert(
                active.alert,
                Track {
                    active,
                    clear_since: None,
                },
            );
        }
    }
}
