//! Delivery progress of one queued message: the `ID.state` file.
//!
//! The envelope is written once at DATA time and never changed; everything that changes while
//! a message waits (attempt count, next attempt, per-recipient outcome, history) lives here.
//! The file is replaced atomically (temp file in `tmp/`, fsync, rename, directory fsync), so a
//! reader sees either the previous state or the new one, never a mixture. A missing file means
//! a fresh message: no attempts yet, due at its reception time.

use serde::{Deserialize, Serialize};

use crate::envelope::{Address, Envelope, RcptStatus};

/// Delivery progress of one message, stored as JSON in `queue/ID.state`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DeliveryState {
    /// Delivery attempts made so far.
    pub attempts: u32,
    /// When the next attempt is due, in seconds since the Unix epoch.
    pub next_attempt: u64,
    /// The error of the most recent failed attempt, as logged (may quote an upstream reply).
    #[serde(default)]
    pub last_error: Option<String>,
    /// Status of each recipient, in the order of `Envelope::recipients`. Empty means every
    /// recipient is still pending (a fresh message has no state file at all).
    #[serde(default)]
    pub recipients: Vec<RcptStatus>,
    /// Every attempt, oldest first.
    #[serde(default)]
    pub history: Vec<Attempt>,
    /// Set while the message is held: the queue manager neither delivers, bounces nor
    /// expires it until it is released. Absent (and not written) when not held, so a state
    /// file of a message never held is the same as before holds existed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub hold: Option<Hold>,
    /// Seconds the message spent held before its last release: its expiry (`queue.max_age`)
    /// is pushed back by as much, so a hold never makes a message expire. Not written when 0.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub held_for: u64,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// Why and since when a message is held.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hold {
    /// When the hold was placed, in seconds since the Unix epoch.
    pub since: u64,
    /// Why, for the operator (e.g. `account contained`).
    pub reason: String,
}

/// A state file that does not belong to its envelope.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error("state lists {state} recipients, envelope has {envelope}")]
pub struct StateMismatch {
    /// Recipients the state lists.
    pub state: usize,
    /// Recipients the envelope has.
    pub envelope: usize,
}

/// One delivery attempt, kept in [`DeliveryState::history`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Attempt {
    /// When the attempt started, in seconds since the Unix epoch.
    pub at: u64,
    /// Name of the upstream tried, when one was reached or chosen.
    #[serde(default)]
    pub upstream: Option<String>,
    /// What happened, in words (e.g. `delivered`, `451 4.3.0 try later`, `connect: timeout`).
    pub outcome: String,
}

impl DeliveryState {
    /// The state of a message that has never been tried: due at `received_at`.
    pub fn fresh(received_at: u64) -> Self {
        DeliveryState {
            attempts: 0,
            next_attempt: received_at,
            last_error: None,
            recipients: Vec::new(),
            history: Vec::new(),
            hold: None,
            held_for: 0,
        }
    }

    /// Hold the message from `now` (Unix seconds) for `reason`; a held message stays held
    /// (since its first hold).
    pub fn hold(&mut self, now: u64, reason: &str) {
        self.hold.get_or_insert_with(|| Hold {
            since: now,
            reason: reason.to_owned(),
        });
    }

    /// Release a held message at `now` (Unix seconds): due at once, its expiry pushed back by
    /// the time it was held. No effect when not held.
    pub fn release(&mut self, now: u64) {
        if let Some(hold) = self.hold.take() {
            self.held_for = self.held_for.saturating_add(now.saturating_sub(hold.since));
            self.next_attempt = now;
        }
    }

    /// Status of recipient number `index` of the envelope (pending when not recorded).
    pub fn status_of(&self, index: usize) -> RcptStatus {
        self.recipients.get(index).copied().unwrap_or_default()
    }

    /// Check that this state fits `envelope`: the recipient list is empty or one entry per
    /// envelope recipient. Anything else means the state belongs to another message or was
    /// damaged, and must not be trusted.
    pub fn check_against(&self, envelope: &Envelope) -> Result<(), StateMismatch> {
        if self.recipients.is_empty() || self.recipients.len() == envelope.recipients.len() {
            Ok(())
        } else {
            Err(StateMismatch {
                state: self.recipients.len(),
                envelope: envelope.recipients.len(),
            })
        }
    }

    /// The envelope recipients still pending, in envelope order.
    pub fn pending<'a>(&'a self, envelope: &'a Envelope) -> impl Iterator<Item = &'a Address> {
        envelope
            .recipients
            .iter()
            .enumerate()
            .filter(|(i, _)| self.status_of(*i) == RcptStatus::Pending)
            .map(|(_, r)| &r.address)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_fields_default_and_round_trip() {
        let s: DeliveryState = serde_json::from_str(r#"{"attempts":2,"next_attempt":5}"#).unwrap();
        assert_eq!(s.attempts, 2);
        assert!(s.recipients.is_empty() && s.history.is_empty() && s.last_error.is_none());
        assert_eq!(s.status_of(3), RcptStatus::Pending);

        let full = DeliveryState {
            attempts: 1,
            next_attempt: 10,
            last_error: Some("451 later".into()),
            recipients: vec![RcptStatus::Delivered, RcptStatus::Pending],
            history: vec![Attempt {
                at: 9,
                upstream: Some("exchange".into()),
                outcome: "451 later".into(),
            }],
            hold: None,
            held_for: 0,
        };
        let json = serde_json::to_string(&full).unwrap();
        assert_eq!(serde_json::from_str::<DeliveryState>(&json).unwrap(), full);
        assert!(
            !json.contains("hold"),
            "a state never held is written as before: {json}"
        );

        let held = DeliveryState {
            hold: Some(Hold {
                since: 7,
                reason: "account contained".into(),
            }),
            ..full
        };
        let json = serde_json::to_string(&held).unwrap();
        assert_eq!(serde_json::from_str::<DeliveryState>(&json).unwrap(), held);
    }

    #[test]
    fn release_makes_due_now_and_pushes_expiry_back_by_the_time_held() {
        let mut s = DeliveryState::fresh(100);
        s.next_attempt = 500;
        s.hold(200, "contained");
        s.hold(250, "again"); // stays held since the first hold
        assert_eq!(
            s.hold.as_ref().map(|h| (h.since, h.reason.as_str())),
            Some((200, "contained"))
        );
        s.release(1_200);
        assert_eq!(
            (s.hold.clone(), s.held_for, s.next_attempt),
            (None, 1_000, 1_200)
        );
        s.release(2_000); // not held: nothing changes
        assert_eq!((s.held_for, s.next_attempt), (1_000, 1_200));
        s.hold(3_000, "again");
        s.release(3_500);
        assert_eq!(s.held_for, 1_500);
    }
}
