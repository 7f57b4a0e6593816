//! Scheduling decisions: pure functions of a queued message, the queue policy and the time.
//!
//! The queue manager ([`super::manager`]) asks these what to do and carries out the answer
//! (reads, deliveries, bounces, state writes); nothing here touches the spool, a socket or
//! the clock, so every decision is tested by a table.
//!
//! - [`plan`]: which recipients an attempt sends to, grouped by route, or that the message
//!   expired (`queue.max_age`) or is held;
//! - [`record`]: a delivery's per-recipient results written into the [`DeliveryState`];
//! - [`bounce_decision`]: whether failed recipients are reported to the sender (RFC 3464);
//! - [`settle`]: what the attempt leaves (finished, or due again at [`next_attempt`]).
//!
//! Times are Unix seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use super::bounce::{BOUNCE_LISTENER, Diagnostic};
use super::state::{Attempt, DeliveryState};
use super::{QueuedMessage, report::human_age};
use crate::config;
use crate::envelope::{Address, Envelope, RcptStatus, ReversePath};

/// Enhanced status of a message that expired in the queue (RFC 3463: "delivery time expired").
pub const EXPIRED_STATUS: &str = "4.4.7";

/// A recipient that failed for good, for the bounce.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FailedRcpt {
    /// Its position in the envelope's recipients.
    pub index: usize,
    /// The forward-path.
    pub address: Address,
    /// Enhanced status code (RFC 3463), e.g. `5.1.1`.
    pub status: String,
    /// The upstream's reply, unchanged, or our reason.
    pub diagnostic: Diagnostic,
    /// Host name of the upstream that refused it (the DSN's `Remote-MTA`, RFC 3464 §2.3.5):
    /// only when an upstream actually answered, and only when it is configured by host name.
    pub upstream: Option<String>,
}

/// What happened to one recipient in a delivery attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RcptResult {
    /// The upstream took responsibility (its reply to the final dot).
    Delivered,
    /// Try again later; the reason is also in [`AttemptReport::errors`].
    Deferred,
    /// Refused for good.
    Failed(FailedRcpt),
}

/// Everything one delivery attempt reports back: per-recipient results, one history entry
/// per upstream tried, the errors (first one becomes `last_error`), and when to try again at
/// the earliest because every upstream of a route had its circuit breaker open.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct AttemptReport {
    /// (index into the envelope's recipients, result). Recipients not listed stay pending.
    pub results: Vec<(usize, RcptResult)>,
    /// One entry per upstream tried, in order.
    pub history: Vec<Attempt>,
    /// Why recipients are still pending, in order (e.g. `upstream exchange: connect: …`).
    pub errors: Vec<String>,
    /// Unix seconds before which no upstream of some route takes mail (circuit breaker); 0: none.
    pub not_before: u64,
    /// An operator deleted the message during the attempt: nothing is recorded.
    pub deleted: bool,
}

/// The recipients one attempt sends over one route.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RouteGroup {
    /// Upstream indexes in failover order (empty: no upstream serves these domains).
    pub route: Vec<usize>,
    /// Indexes into the envelope's recipients, in envelope order.
    pub rcpts: Vec<usize>,
}

/// What an attempt of a message is to do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Plan {
    /// Held: neither delivered, bounced nor expired until released.
    Held,
    /// Older than `queue.max_age`: every pending recipient fails with [`EXPIRED_STATUS`].
    Expired(Vec<FailedRcpt>),
    /// Send to these groups, one transaction per route (usually one group).
    Send(Vec<RouteGroup>),
}

/// When a message expires: its reception plus `max_age`, plus the time it was held (Unix
/// seconds).
pub fn expires_at(envelope: &Envelope, state: &DeliveryState, max_age: Duration) -> u64 {
    envelope
        .received_at
        .saturating_add(max_age.as_secs())
        .saturating_add(state.held_for)
}

/// The reason given for an expired recipient, in the log and in its DSN.
pub fn expiry_reason(max_age: Duration, last_error: Option<&str>) -> String {
    format!(
        "delivery time expired: not delivered within {}{}",
        human_age(max_age.as_secs()),
        match last_error {
            Some(e) => format!("; last error: {e}"),
            None => String::new(),
        }
    )
}

/// Plan an attempt of `msg` at `now`: held, expired, or the pending recipients grouped by
/// the route `route` gives for their domain (upstream indexes in failover order).
pub fn plan(
    msg: &QueuedMessage,
    now: u64,
    queue: &config::Queue,
    route: impl Fn(&str) -> Vec<usize>,
) -> Plan {
    if msg.state.hold.is_some() {
        return Plan::Held;
    }
    let pending = pending_indexes(&msg.state, &msg.envelope);
    if now >= expires_at(&msg.envelope, &msg.state, queue.max_age) {
        let reason = expiry_reason(queue.max_age, msg.state.last_error.as_deref());
        let failed = pending
            .into_iter()
            .map(|index| FailedRcpt {
                index,
                address: msg.envelope.recipients[index].address.clone(),
                status: EXPIRED_STATUS.into(),
                diagnostic: Diagnostic::Local(reason.clone()),
                upstream: None,
            })
            .collect();
        return Plan::Expired(failed);
    }
    let mut groups: BTreeMap<Vec<usize>, Vec<usize>> = BTreeMap::new();
    for index in pending {
        let domain = msg.envelope.recipients[index].address.domain();
        groups.entry(route(domain)).or_default().push(index);
    }
    Plan::Send(
        groups
            .into_iter()
            .map(|(route, rcpts)| RouteGroup { route, rcpts })
            .collect(),
    )
}

/// Indexes of the recipients still pending, in envelope order.
pub fn pending_indexes(state: &DeliveryState, envelope: &Envelope) -> Vec<usize> {
    (0..envelope.recipients.len())
        .filter(|&i| state.status_of(i) == RcptStatus::Pending)
        .collect()
}

/// Write an attempt's results into `state` (of a message with `count` recipients): delivered
/// and failed recipients leave the pending set, the history grows. Returns the recipients
/// that failed for good, for [`bounce_decision`].
pub fn record(state: &mut DeliveryState, count: usize, report: AttemptReport) -> Vec<FailedRcpt> {
    if state.recipients.is_empty() {
        state.recipients = vec![RcptStatus::Pending; count];
    }
    let mut failed = Vec::new();
    for (index, result) in report.results {
        match result {
            RcptResult::Delivered => state.recipients[index] = RcptStatus::Delivered,
            RcptResult::Deferred => {}
            RcptResult::Failed(f) => {
                state.recipients[index] = RcptStatus::Failed;
                failed.push(f);
            }
        }
    }
    state.history.extend(report.history);
    failed
}

/// Whether the failure of some recipients is reported to the envelope sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum BounceDecision {
    /// Queue a DSN to this reverse-path.
    Send(Address),
    /// The reverse-path is `<>` (RFC 5321 §4.5.5: no notification to it). `dsn_lost`: the
    /// message is one of our own DSNs, so a sender is never told their mail failed, which an
    /// operator must hear of.
    NullSender { dsn_lost: bool },
    /// `[queue] bounces = false`: log the failure only.
    Disabled(Address),
}

/// Decide whether failures of `envelope`'s recipients are bounced (`bounces`: `[queue]
/// bounces`).
pub fn bounce_decision(envelope: &Envelope, bounces: bool) -> BounceDecision {
    match &envelope.mail_from {
        ReversePath::Null => BounceDecision::NullSender {
            dsn_lost: envelope.listener == BOUNCE_LISTENER,
        },
        ReversePath::Address(a) if bounces => BounceDecision::Send(a.clone()),
        ReversePath::Address(a) => BounceDecision::Disabled(a.clone()),
    }
}

/// When to try again after the `attempts`-th attempt (counting from 1) ended at `now`: the
/// retry schedule's wait for it (the last one repeats; at least 1 s), no sooner than
/// `not_before` (an open circuit breaker), no later than `expires` (so expiry is noticed on
/// time) but always after `now`.
pub fn next_attempt(
    attempts: u32,
    now: u64,
    retry: &[Duration],
    not_before: u64,
    expires: u64,
) -> u64 {
    let step = (attempts.max(1) as usize - 1).min(retry.len().saturating_sub(1));
    let wait = retry.get(step).map_or(1, |d| d.as_secs().max(1));
    (now + wait).max(not_before).min(expires.max(now + 1))
}

/// What an attempt leaves behind.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Settled {
    /// Nothing is pending: the message leaves the queue.
    Finished { delivered: usize, failed: usize },
    /// Recipients remain: due again at this time (Unix seconds).
    Due(u64),
}

/// Settle `state` after an attempt that ended at `now`: when the bounce for `failed` could not
/// be queued (`bounce_queued` false), those recipients become pending again so the failure
/// is reported at the next attempt rather than lost; then either nothing is pending
/// (finished) or the attempt count, next attempt time and last error are updated.
pub fn settle(
    state: &mut DeliveryState,
    msg: &Envelope,
    queue: &config::Queue,
    facts: &AttemptFacts<'_>,
) -> Settled {
    if state.recipients.is_empty() {
        state.recipients = vec![RcptStatus::Pending; msg.recipients.len()];
    }
    if !facts.bounce_queued {
        for f in facts.failed {
            state.recipients[f.index] = RcptStatus::Pending;
        }
    }
    let count = |s: RcptStatus| state.recipients.iter().filter(|r| **r == s).count();
    if count(RcptStatus::Pending) == 0 {
        let failed = count(RcptStatus::Failed);
        return Settled::Finished {
            delivered: state.recipients.len() - failed,
            failed,
        };
    }
    let expires = expires_at(msg, state, queue.max_age);
    state.attempts += 1;
    state.next_attempt = next_attempt(
        state.attempts,
        facts.now,
        &queue.retry,
        facts.not_before,
        expires,
    );
    if let Some(e) = facts.errors.first() {
        state.last_error = Some(e.clone());
    }
    Settled::Due(state.next_attempt)
}

/// The facts of an attempt that [`settle`] needs.
#[derive(Debug, Clone, Copy)]
pub struct AttemptFacts<'a> {
    /// When the attempt ended (Unix seconds).
    pub now: u64,
    /// Recipients that failed for good in it.
    pub failed: &'a [FailedRcpt],
    /// The bounce for `failed` is on disk (or none was due).
    pub bounce_queued: bool,
    /// From [`AttemptReport::not_before`].
    pub not_before: u64,
    /// From [`AttemptReport::errors`].
    pub errors: &'a [String],
}
