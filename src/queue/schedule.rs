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
//! - [`after_attempt`]: what the manager does with the message then, given the operator
//!   requests (retry, hold, release) that came while the attempt was in flight.
//!
//! Times are Unix seconds.

use std::collections::BTreeMap;
use std::time::Duration;

use super::attempt::AttemptEnd;
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
    /// Enhanced status code (RFC 3463), e.g. `5.1.1`, or `4.4.7` for an expired message. The
    /// DSN reports anything that is not `4.x.y` or `5.x.y` as `5.0.0`.
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

/// Settle `state` after an attempt that started at `facts.now`: when the bounce for `failed` could not
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

/// What the queue manager does with a message once its attempt has ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AfterAttempt {
    /// Nothing: it left the queue, or it is held and stays so.
    Nothing,
    /// Put it back in the schedule, due at this time (Unix seconds; 0: now).
    Due(u64),
    /// Hold it (true) or release it (false), as an operator asked during the attempt.
    Hold(bool),
}

/// Decide what follows an attempt that ended with `end`, given the requests that came while it
/// was in flight: `retry` (`queue retry`: due now rather than at its next attempt) and `hold`
/// (the last hold (true) or release (false) asked for, if any). A release that arrives while a
/// held message is being looked at is carried out, not lost.
pub fn after_attempt(end: AttemptEnd, retry: bool, hold: Option<bool>) -> AfterAttempt {
    match (end, hold) {
        // A suspended login's message is held whatever was asked meanwhile.
        (AttemptEnd::Suspended, _) => AfterAttempt::Hold(true),
        (AttemptEnd::Left, _) | (AttemptEnd::Held, None | Some(true)) => AfterAttempt::Nothing,
        (AttemptEnd::Held, Some(false)) | (AttemptEnd::Due(_), Some(true)) => {
            AfterAttempt::Hold(hold == Some(true))
        }
        (AttemptEnd::Due(next), None | Some(false)) => {
            AfterAttempt::Due(if retry { 0 } else { next })
        }
    }
}

/// The facts of an attempt that [`settle`] needs.
#[derive(Debug, Clone, Copy)]
pub struct AttemptFacts<'a> {
    /// When the attempt started (Unix seconds): the next attempt is counted from it.
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::sample_envelope;

    const T0: u64 = 1_700_000_000;

    fn queue(retry: &[u64], max_age: u64, bounces: bool) -> config::Queue {
        config::Queue {
            retry: retry.iter().map(|s| Duration::from_secs(*s)).collect(),
            max_age: Duration::from_secs(max_age),
            bounces,
            delivery_grace: Duration::from_secs(10),
            quarantine_keep: Duration::from_secs(7 * 86_400),
        }
    }

    fn message(rcpts: &[&str], statuses: &[RcptStatus]) -> QueuedMessage {
        let envelope = sample_envelope(rcpts);
        let mut state = DeliveryState::fresh(envelope.received_at);
        state.recipients = statuses.to_vec();
        QueuedMessage {
            envelope,
            state,
            size: 10,
            path: "/spool/queue/X".into(),
        }
    }

    /// Route by domain: `a.example` → [0, 1], `b.example` → [2], anything else → none.
    fn route(domain: &str) -> Vec<usize> {
        match domain {
            "a.example" => vec![0, 1],
            "b.example" => vec![2],
            _ => vec![],
        }
    }

    fn failed(index: usize, address: &str, diagnostic: Diagnostic) -> FailedRcpt {
        FailedRcpt {
            index,
            address: Address::parse(address).unwrap(),
            status: "5.1.1".into(),
            diagnostic,
            upstream: None,
        }
    }

    #[test]
    fn plan_groups_pending_recipients_by_route_in_envelope_order() {
        use RcptStatus::{Delivered, Failed, Pending};
        let q = queue(&[60], 3600, true);
        let rcpts = [
            "1@a.example",
            "2@b.example",
            "3@a.example",
            "4@c.example",
            "5@a.example",
        ];
        let cases: [(&[RcptStatus], Vec<RouteGroup>); 3] = [
            (
                &[],
                vec![
                    RouteGroup {
                        route: vec![],
                        rcpts: vec![3],
                    },
                    RouteGroup {
                        route: vec![0, 1],
                        rcpts: vec![0, 2, 4],
                    },
                    RouteGroup {
                        route: vec![2],
                        rcpts: vec![1],
                    },
                ],
            ),
            (
                &[Delivered, Pending, Failed, Delivered, Pending],
                vec![
                    RouteGroup {
                        route: vec![0, 1],
                        rcpts: vec![4],
                    },
                    RouteGroup {
                        route: vec![2],
                        rcpts: vec![1],
                    },
                ],
            ),
            (&[Delivered, Delivered, Failed, Failed, Delivered], vec![]),
        ];
        for (statuses, want) in cases {
            let msg = message(&rcpts, statuses);
            assert_eq!(
                plan(&msg, T0 + 10, &q, route),
                Plan::Send(want),
                "{statuses:?}"
            );
        }
    }

    #[test]
    fn plan_expires_pending_recipients_at_max_age_with_4_4_7_and_the_last_error() {
        let q = queue(&[60], 3600, true);
        let mut msg = message(
            &["1@a.example", "2@a.example"],
            &[RcptStatus::Delivered, RcptStatus::Pending],
        );
        assert!(matches!(plan(&msg, T0 + 3599, &q, route), Plan::Send(_)));
        msg.state.last_error = Some("upstream x: 451 4.3.0 later".into());
        let want = failed(
            1,
            "2@a.example",
            Diagnostic::Local(
                "delivery time expired: not delivered within 1h; last error: upstream x: 451 4.3.0 later".into(),
            ),
        );
        let want = FailedRcpt {
            status: "4.4.7".into(),
            ..want
        };
        assert_eq!(plan(&msg, T0 + 3600, &q, route), Plan::Expired(vec![want]));
        // Time spent held pushes expiry back.
        msg.state.held_for = 100;
        assert!(matches!(plan(&msg, T0 + 3650, &q, route), Plan::Send(_)));
        assert!(matches!(plan(&msg, T0 + 3700, &q, route), Plan::Expired(_)));
    }

    #[test]
    fn expiry_reason_reads_as_before() {
        assert_eq!(
            expiry_reason(Duration::from_secs(5 * 86_400), None),
            "delivery time expired: not delivered within 5d"
        );
    }

    #[test]
    fn a_held_message_is_neither_sent_nor_expired() {
        let q = queue(&[60], 3600, true);
        let mut msg = message(&["1@a.example"], &[]);
        msg.state.hold(T0, "contained");
        assert_eq!(plan(&msg, T0 + 10, &q, route), Plan::Held);
        assert_eq!(plan(&msg, T0 + 100_000, &q, route), Plan::Held);
        msg.state.release(T0 + 100_000);
        assert!(matches!(plan(&msg, T0 + 100_000, &q, route), Plan::Send(_)));
    }

    #[test]
    fn next_attempt_follows_the_schedule_breakers_and_expiry() {
        let retry = [60, 300, 900].map(Duration::from_secs);
        // (attempts, now, not_before, expires) → due
        let cases = [
            (1, 1000, 0, 99_999, 1060),
            (2, 1000, 0, 99_999, 1300),
            (3, 1000, 0, 99_999, 1900),
            (9, 1000, 0, 99_999, 1900),    // the last interval repeats
            (1, 1000, 5000, 99_999, 5000), // a breaker open until later
            (3, 1000, 0, 1200, 1200),      // capped at expiry
            (3, 1000, 0, 900, 1001),       // already expired: next second
            (0, 1000, 0, 99_999, 1060),
        ];
        for (attempts, now, not_before, expires, want) in cases {
            assert_eq!(
                next_attempt(attempts, now, &retry, not_before, expires),
                want,
                "{attempts} {now} {not_before} {expires}"
            );
        }
        assert_eq!(next_attempt(1, 1000, &[Duration::ZERO], 0, 99_999), 1001);
    }

    #[test]
    fn bounce_decision_spares_the_null_sender_and_names_lost_dsns() {
        let mut env = sample_envelope(&["1@a.example"]);
        let sender = Address::parse("sender@example.org").unwrap();
        assert_eq!(
            bounce_decision(&env, true),
            BounceDecision::Send(sender.clone())
        );
        assert_eq!(
            bounce_decision(&env, false),
            BounceDecision::Disabled(sender)
        );
        env.mail_from = ReversePath::Null;
        assert_eq!(
            bounce_decision(&env, true),
            BounceDecision::NullSender { dsn_lost: false }
        );
        env.listener = BOUNCE_LISTENER.into();
        assert_eq!(
            bounce_decision(&env, false),
            BounceDecision::NullSender { dsn_lost: true }
        );
    }

    #[test]
    fn record_then_settle_finishes_or_reschedules() {
        let q = queue(&[60, 300], 3600, true);
        let mut msg = message(&["1@a.example", "2@a.example", "3@b.example"], &[]);
        let gone = failed(
            1,
            "2@a.example",
            crate::queue::bounce::smtp("550 5.1.1 no such user"),
        );
        let report = AttemptReport {
            results: vec![
                (0, RcptResult::Delivered),
                (1, RcptResult::Failed(gone.clone())),
            ],
            history: vec![Attempt {
                at: T0,
                upstream: Some("x".into()),
                outcome: "..".into(),
            }],
            errors: vec!["upstream y: connect: refused".into()],
            not_before: 0,
            deleted: false,
        };
        let fails = record(&mut msg.state, 3, report);
        assert_eq!(fails, vec![gone.clone()]);
        use RcptStatus::{Delivered, Failed, Pending};
        assert_eq!(msg.state.recipients, [Delivered, Failed, Pending]);
        let facts = AttemptFacts {
            now: T0 + 10,
            failed: &fails,
            bounce_queued: true,
            not_before: 0,
            errors: &["upstream y: connect: refused".into()],
        };
        let settled = settle(&mut msg.state, &msg.envelope, &q, &facts);
        assert_eq!(settled, Settled::Due(T0 + 70));
        assert_eq!((msg.state.attempts, msg.state.next_attempt), (1, T0 + 70));
        assert_eq!(
            msg.state.last_error.as_deref(),
            Some("upstream y: connect: refused")
        );
        assert_eq!(msg.state.history.len(), 1);

        let last = AttemptReport {
            results: vec![(2, RcptResult::Delivered)],
            ..AttemptReport::default()
        };
        assert!(record(&mut msg.state, 3, last).is_empty());
        let facts = AttemptFacts {
            errors: &[],
            failed: &[],
            ..facts
        };
        let settled = settle(&mut msg.state, &msg.envelope, &q, &facts);
        assert_eq!(
            settled,
            Settled::Finished {
                delivered: 2,
                failed: 1
            }
        );
    }

    #[test]
    fn failed_recipients_stay_pending_when_their_bounce_was_not_queued() {
        let q = queue(&[60], 3600, true);
        let mut msg = message(&["1@a.example"], &[]);
        let gone = failed(0, "1@a.example", crate::queue::bounce::smtp("550 5.1.1 no"));
        let report = AttemptReport {
            results: vec![(0, RcptResult::Failed(gone))],
            ..AttemptReport::default()
        };
        let fails = record(&mut msg.state, 1, report);
        let facts = AttemptFacts {
            now: T0,
            failed: &fails,
            bounce_queued: false,
            not_before: 0,
            errors: &[],
        };
        assert_eq!(
            settle(&mut msg.state, &msg.envelope, &q, &facts),
            Settled::Due(T0 + 60)
        );
        assert_eq!(msg.state.recipients, [RcptStatus::Pending]);
    }

    #[test]
    fn after_an_attempt_requests_that_came_meanwhile_are_carried_out() {
        use AfterAttempt::{Due, Hold, Nothing};
        let due = AttemptEnd::Due(T0 + 60);
        let cases = [
            // (end, retry, hold or release, what follows)
            (due, false, None, Due(T0 + 60)),
            (due, true, None, Due(0)),
            (due, false, Some(true), Hold(true)),
            (due, true, Some(true), Hold(true)),
            // A hold then a release during the attempt: as if neither came.
            (due, false, Some(false), Due(T0 + 60)),
            (due, true, Some(false), Due(0)),
            (AttemptEnd::Held, false, None, Nothing),
            (AttemptEnd::Held, true, Some(true), Nothing),
            // Released while its attempt found it held: the release is not lost.
            (AttemptEnd::Held, false, Some(false), Hold(false)),
            (AttemptEnd::Held, true, Some(false), Hold(false)),
            (AttemptEnd::Left, true, Some(true), Nothing),
            (AttemptEnd::Left, false, Some(false), Nothing),
            (AttemptEnd::Suspended, false, None, Hold(true)),
            (AttemptEnd::Suspended, true, Some(false), Hold(true)),
        ];
        for (end, retry, hold, expected) in cases {
            assert_eq!(
                after_attempt(end, retry, hold),
                expected,
                "{end:?} retry={retry} hold={hold:?}"
            );
        }
    }
}
