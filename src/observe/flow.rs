//! Mail flow per minute over the last hour: accepted, delivered, refused, deferred. What the
//! status page charts, `portcullis status` sums over 1/5/15/60 minutes, and the
//! `no_inbound`/`no_delivery` alerts read (with the time of the last accept and delivery).

use std::sync::Mutex;

use serde::{Deserialize, Serialize};

use super::event::{Event, EventKind};

/// Minutes kept.
pub const MINUTES: usize = 60;

/// The counts of one minute.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Minute {
    /// Unix time of the minute's start (a multiple of 60).
    pub start: u64,
    pub accepted: u64,
    pub delivered: u64,
    pub refused: u64,
    pub deferred: u64,
}

#[derive(Debug)]
struct Ring {
    /// Slot `(start / 60) % MINUTES` holds the minute starting at `start`; a slot whose
    /// `start` is older than an hour is stale and reads as zero.
    slots: [Minute; MINUTES],
    /// Unix milliseconds of the last message accepted / delivered (0: none since start).
    last_accepted: u64,
    last_delivered: u64,
}

impl Default for Ring {
    fn default() -> Ring {
        Ring {
            slots: [Minute::default(); MINUTES],
            last_accepted: 0,
            last_delivered: 0,
        }
    }
}

/// The flow counters (one short mutex; a few increments per message).
#[derive(Debug, Default)]
pub struct Flow {
    ring: Mutex<Ring>,
}

impl Flow {
    /// Count `event` in its minute.
    pub fn count(&self, event: &Event) {
        let field: fn(&mut Minute) -> &mut u64 = match event.kind {
            EventKind::Queued => |m| &mut m.accepted,
            EventKind::Delivered => |m| &mut m.delivered,
            EventKind::Refused => |m| &mut m.refused,
            EventKind::Deferred => |m| &mut m.deferred,
            _ => return,
        };
        let mut ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        match event.kind {
            EventKind::Queued => ring.last_accepted = ring.last_accepted.max(event.at),
            EventKind::Delivered => ring.last_delivered = ring.last_delivered.max(event.at),
            _ => {}
        }
        let start = event.at / 1000 / 60 * 60;
        let slot = &mut ring.slots[(start / 60) as usize % MINUTES];
        if slot.start != start {
            if slot.start > start {
                return; // an event from more than an hour before the newest: not charted
            }
            *slot = Minute {
                start,
                ..Minute::default()
            };
        }
        *field(slot) += 1;
    }

    /// The last [`MINUTES`] minutes up to and including the one holding `now_unix`, oldest
    /// first, minutes without events as zeros.
    pub fn minutes(&self, now_unix: u64) -> Vec<Minute> {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        let current = now_unix / 60 * 60;
        (0..MINUTES as u64)
            .rev()
            .map(|back| {
                let start = current.saturating_sub(back * 60);
                let slot = ring.slots[(start / 60) as usize % MINUTES];
                if slot.start == start {
                    slot
                } else {
                    Minute {
                        start,
                        ..Minute::default()
                    }
                }
            })
            .collect()
    }

    /// Unix milliseconds of the last accepted and last delivered message (0: none yet).
    pub fn last_times(&self) -> (u64, u64) {
        let ring = self.ring.lock().unwrap_or_else(|p| p.into_inner());
        (ring.last_accepted, ring.last_delivered)
    }
}

/// The sums of the last `n` of `minutes` (oldest first, as [`Flow::minutes`] gives them);
/// `start` is the last minute's.
pub fn last(minutes: &[Minute], n: usize) -> Minute {
    let mut sum = Minute::default();
    for m in &minutes[minutes.len().saturating_sub(n)..] {
        sum.start = m.start;
        sum.accepted += m.accepted;
        sum.delivered += m.delivered;
        sum.refused += m.refused;
        sum.deferred += m.deferred;
    }
    sum
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sums_cover_the_last_n_minutes_of_the_hour_only() {
        let flow = Flow::default();
        let now = 1_800_000_000 / 60 * 60 + 30; // 30 s into a minute
        let event = |kind, secs_ago: u64| Event::at(kind, (now - secs_ago) * 1000);
        flow.count(&event(EventKind::Queued, 0));
        flow.count(&event(EventKind::Queued, 60)); // the minute before
        flow.count(&event(EventKind::Delivered, 4 * 60));
        flow.count(&event(EventKind::Refused, 14 * 60));
        flow.count(&event(EventKind::Deferred, 59 * 60));
        flow.count(&event(EventKind::Queued, 61 * 60)); // over an hour: in no sum
        let minutes = flow.minutes(now);
        assert_eq!(minutes.len(), MINUTES);
        let counts = |m: Minute| (m.accepted, m.delivered, m.refused, m.deferred);
        assert_eq!(counts(last(&minutes, 1)), (1, 0, 0, 0));
        assert_eq!(counts(last(&minutes, 5)), (2, 1, 0, 0));
        assert_eq!(counts(last(&minutes, 15)), (2, 1, 1, 0));
        assert_eq!(counts(last(&minutes, 60)), (2, 1, 1, 1));
        assert_eq!(last(&minutes, 5).start, now / 60 * 60);
        assert_eq!(last(&minutes, 600), last(&minutes, 60));
    }
}
