//! Recording holds and releases in the messages' state files, many at once.
//!
//! `queue hold --user LOGIN` may ask for thousands of holds in one go. Written one by one
//! ([`Spool::write_state`]: file fsync, rename, directory fsync), each costs two disk flushes,
//! and the queue manager does nothing else meanwhile. [`Spool::record_holds`] writes every
//! state file of a batch (each still fsynced before its rename: a state file is never seen
//! half written) on a few threads at once, then fsyncs `queue/` once for all, before it
//! returns: what it reports as recorded is durable.

use std::thread;

use super::{DeliveryState, Spool, SpoolError, sync_dir};
use crate::envelope::QueueId;

/// Most threads writing state files at once for one batch (the flushes overlap on the disk;
/// more threads only queue up).
const WRITERS: usize = 8;

/// Fewest holds per writer thread: a small batch is written on the caller's thread alone.
const PER_WRITER: usize = 64;

/// What [`Spool::record_holds`] did to one message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HoldChange {
    /// Held before.
    pub was: bool,
    /// Held now.
    pub held: bool,
    /// Its next attempt now (Unix seconds): the time of the release for a released message.
    pub next_attempt: u64,
}

impl Spool {
    /// Hold (`true`) or release (`false`) each message of `asks` at `now` (Unix seconds), a
    /// hold with `reason`, and record it in the message's state; one result per ask, in
    /// order. A message already as asked is left unwritten. A message that is gone is
    /// [`SpoolError::NotFound`]. Blocking: call it from `spawn_blocking`.
    pub fn record_holds(
        &self,
        asks: &[(QueueId, bool)],
        now: u64,
        reason: &str,
    ) -> Vec<Result<HoldChange, SpoolError>> {
        let threads = (asks.len() / PER_WRITER).clamp(1, WRITERS);
        let chunk = asks.len().div_ceil(threads).max(1);
        let mut results: Vec<Result<HoldChange, SpoolError>> = if threads == 1 {
            asks.iter()
                .map(|(id, hold)| self.stage_hold(id, *hold, now, reason))
                .collect()
        } else {
            thread::scope(|scope| {
                let workers: Vec<_> = asks
                    .chunks(chunk)
                    .map(|part| {
                        scope.spawn(move || {
                            part.iter()
                                .map(|(id, hold)| self.stage_hold(id, *hold, now, reason))
                                .collect::<Vec<_>>()
                        })
                    })
                    .collect();
                workers
                    .into_iter()
                    .flat_map(|w| {
                        w.join()
                            .unwrap_or_else(|panic| std::panic::resume_unwind(panic))
                    })
                    .collect()
            })
        };
        let written = results
            .iter()
            .any(|r| r.as_ref().is_ok_and(|c| c.was != c.held));
        if written && let Err(e) = sync_dir(&self.inner.queue) {
            // Not durable: report every change as failed (the manager keeps the message as it
            // was; a crash may undo the renames, which is the same).
            for r in &mut results {
                if r.as_ref().is_ok_and(|c| c.was != c.held) {
                    *r = Err(clone_error(&e));
                }
            }
        }
        results
    }

    /// Change one message's hold and write its state file (no directory fsync).
    fn stage_hold(
        &self,
        id: &QueueId,
        hold: bool,
        now: u64,
        reason: &str,
    ) -> Result<HoldChange, SpoolError> {
        let mut state: DeliveryState = self.load(id)?.state;
        let was = state.hold.is_some();
        if hold != was {
            if hold {
                state.hold(now, reason);
            } else {
                state.release(now);
            }
            self.stage_state(id, &state)?;
        }
        Ok(HoldChange {
            was,
            held: state.hold.is_some(),
            next_attempt: state.next_attempt,
        })
    }
}

/// A copy of a directory fsync error, for each message it concerns.
fn clone_error(e: &SpoolError) -> SpoolError {
    match e {
        SpoolError::Io { op, path, source } => SpoolError::Io {
            op,
            path: path.clone(),
            source: std::io::Error::new(source.kind(), source.to_string()),
        },
        other => SpoolError::Io {
            op: "fsync",
            path: std::path::PathBuf::new(),
            source: std::io::Error::other(other.to_string()),
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::envelope::{Address, Envelope, MailParams, Recipient, ReversePath};

    fn queue(spool: &Spool, n: usize) -> Vec<QueueId> {
        (0..n)
            .map(|_| {
                let envelope = Envelope {
                    id: QueueId::generate(),
                    received_at: 1_000,
                    listener: "mx".into(),
                    client_ip: "192.0.2.1".parse().unwrap(),
                    client_port: 1,
                    helo: "c".into(),
                    tls: None,
                    auth_user: None,
                    mail_from: ReversePath::Null,
                    mail_params: MailParams::default(),
                    recipients: vec![Recipient::new(Address::parse("a@b.example").unwrap())],
                };
                spool.enqueue(&envelope, b"x\r\n").unwrap()
            })
            .collect()
    }

    #[test]
    fn a_batch_records_each_hold_and_release_and_skips_what_is_already_so() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        // Enough for several writer threads.
        let ids = queue(&spool, PER_WRITER * 3);
        let asks: Vec<(QueueId, bool)> = ids.iter().map(|id| (id.clone(), true)).collect();
        let got = spool.record_holds(&asks, 2_000, "queue hold");
        let held = HoldChange {
            was: false,
            held: true,
            next_attempt: 1_000,
        };
        assert!(got.iter().all(|r| r.as_ref().ok() == Some(&held)));
        for id in &ids {
            let hold = spool.load(id).unwrap().state.hold.unwrap();
            assert_eq!((hold.since, hold.reason.as_str()), (2_000, "queue hold"));
        }

        let gone = QueueId::generate();
        let asks = [
            (ids[0].clone(), false),
            (ids[1].clone(), true),
            (gone.clone(), true),
        ];
        let got = spool.record_holds(&asks, 2_500, "queue hold");
        let ok = |i: usize| got[i].as_ref().ok().copied();
        let released = HoldChange {
            was: true,
            held: false,
            next_attempt: 2_500,
        };
        assert_eq!(ok(0), Some(released));
        assert_eq!(ok(1), Some(HoldChange { was: true, ..held }));
        assert!(matches!(&got[2], Err(SpoolError::NotFound(id)) if *id == gone));
        let state = spool.load(&ids[0]).unwrap().state;
        assert_eq!((state.hold, state.held_for), (None, 500));
        // Nothing left behind in tmp/.
        assert_eq!(
            std::fs::read_dir(dir.path().join("spool/tmp"))
                .unwrap()
                .count(),
            0
        );
    }
}
