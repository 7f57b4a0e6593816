//! Holds and releases: how `queue hold|release` ask for them, and how the queue manager
//! records them in the messages' state files, many at once.
//!
//! # Requests: `SPOOL/control/holds.SEQ.NONCE`
//!
//! [`Spool::request_holds`] asks the running relay to hold or release messages with one file
//! per [`NOTICE_MAX_IDS`] messages (a hold of 25,000 messages is three files, not 25,000), each
//! a line `hold ID` or `release ID` per message, written as a removal notice is (made in
//! `tmp/`, fsynced, given to the relay's user, renamed into `control/`, the directory fsynced
//! before the command returns, so a request made while the relay is stopped survives a crash
//! until its next start). Unlike every other request, the relay leaves a batch in `control/`
//! after reading it ([`Spool::take_requests`]) until every hold it asks for is recorded, then
//! unlinks it ([`Spool::finish_holds`]): a relay that dies between taking a hold and recording
//! it (or cannot record it) finds the file again, at its next start (or pass), and applies it
//! again, with every later batch, in order. Asking twice for the same hold changes nothing,
//! so applying a batch again is harmless; the running relay does not read a batch it took
//! twice.
//!
//! The last asked wins for a message, whatever order the relay reads the files in: `SEQ` (20
//! zero-padded digits) orders them. A writer takes an exclusive `flock(2)` on the `control/`
//! directory itself (no lock file to create or clean up; the kernel drops it when the process
//! dies), lists `control/`, numbers its files from one above the highest `SEQ` present, renames
//! them in and fsyncs the directory, and only then lets go of the lock. A pass of the relay
//! lists `control/` in full before it unlinks anything, and applies the batches it took in
//! `SEQ` order, passes in the order they ran. That order is the order the requests were asked
//! in. A file the relay has not unlinked is still there when the next writer lists under the
//! lock, so that writer numbers above it; one the writer does not see was unlinked, so a pass
//! had listed it before, and that pass cannot take the new file (renamed in after the
//! writer's listing): it is applied first. So numbering may start again at 1 once the relay
//! has recorded (and unlinked) every file. `NONCE` (process id, a counter and the time) keeps names unique, so
//! the file the relay reads is the one it unlinked. [`Spool::pending_holds`] reads the pending
//! files in the same order, for `queue hold|release` to count as done what is already asked.
//!
//! The relay's queue manager records holds in `ID.state`, since it owns that file; at startup
//! it does so before its first attempt. One it cannot record is logged and asked again after
//! `manager::HOLD_RETRY`, unless a later request names the message first; the file stays
//! meanwhile. It still reads the `hold.ID` and `release.ID` files of an earlier version (one
//! per message, empty), before the numbered ones: a command of this version came after them;
//! those are unlinked when taken, as before.
//!
//! # Recording
//!
//! `queue hold --user LOGIN` may ask for thousands of holds in one go. Written one by one
//! ([`Spool::write_state`]: file fsync, rename, directory fsync), each costs two disk flushes,
//! and the queue manager does nothing else meanwhile. [`Spool::record_holds`] writes every
//! state file of a batch (each still fsynced before its rename: a state file is never seen
//! half written) on a few threads at once, then fsyncs `queue/` once for all, before it
//! returns: what it reports as recorded is durable.

use std::collections::HashMap;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::thread;

use super::control::NOTICE_MAX_IDS;
use super::{DeliveryState, Opened, Spool, SpoolError, exact_id, open_trusted, sync_dir};
use crate::envelope::QueueId;
use crate::failpoint;

/// Prefix of the hold and release request files in `control/` (`holds.SEQ.NONCE`).
const BATCH_PREFIX: &str = "holds.";
/// Digits of `SEQ` in a request file's name: zero-padded, so names sort as the numbers do.
const SEQ_DIGITS: usize = 20;
/// Largest request file read, in octets (a line is at most 40; a larger file is not one we
/// wrote).
const MAX_BATCH: u64 = 1024 * 1024;
/// Prefix of a hold request of an earlier version (`hold.ID`, empty).
const LEGACY_HOLD: &str = "hold.";
/// Prefix of a release request of an earlier version (`release.ID`, empty).
const LEGACY_RELEASE: &str = "release.";

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

/// The `SEQ` of a request file named `holds.SEQ.NONCE`, if `name` is one.
pub(super) fn batch_seq(name: &str) -> Option<u64> {
    let (seq, nonce) = name.strip_prefix(BATCH_PREFIX)?.split_once('.')?;
    let nonce_ok = !nonce.is_empty()
        && nonce
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-');
    let seq_ok = seq.len() == SEQ_DIGITS && seq.bytes().all(|b| b.is_ascii_digit());
    if nonce_ok && seq_ok {
        seq.parse().ok()
    } else {
        None
    }
}

/// The message and the ask (true: hold) of an earlier version's request `hold.ID` or
/// `release.ID`, if `name` is one.
pub(super) fn legacy_request(name: &str) -> Option<(QueueId, bool)> {
    let id = |prefix: &str| name.strip_prefix(prefix).and_then(exact_id);
    id(LEGACY_HOLD)
        .map(|id| (id, true))
        .or_else(|| id(LEGACY_RELEASE).map(|id| (id, false)))
}

/// The asks (true: hold) a request file lists, in order, read through `file` (at most
/// [`MAX_BATCH`] octets); a line that is not `hold ID` or `release ID` is skipped with a
/// warning.
pub(super) fn read_batch(file: File, path: &Path) -> Vec<(QueueId, bool)> {
    use std::io::Read as _;
    let mut text = String::new();
    if let Err(e) = file.take(MAX_BATCH).read_to_string(&mut text) {
        tracing::warn!(path = %path.display(), error = %e, "cannot read a hold request");
    }
    let mut asks = Vec::new();
    for line in text.lines() {
        let ask = match line.split_once(' ') {
            Some(("hold", id)) => exact_id(id).map(|id| (id, true)),
            Some(("release", id)) => exact_id(id).map(|id| (id, false)),
            _ => None,
        };
        match ask {
            Some(ask) => asks.push(ask),
            None => {
                tracing::warn!(path = %path.display(), line = %line.escape_debug(), "not a hold or release in a hold request")
            }
        }
    }
    asks
}

/// `flock(file, LOCK_EX)`, waiting for it (a concurrent `queue hold|release` holds it for
/// the time it takes to write its requests).
fn lock_exclusive(file: &File) -> io::Result<()> {
    loop {
        // SAFETY: flock only reads its arguments; the descriptor is open for as long as
        // `file`.
        if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX) } == 0 {
            return Ok(());
        }
        let e = io::Error::last_os_error();
        if e.kind() != io::ErrorKind::Interrupted {
            return Err(e);
        }
    }
}

impl Spool {
    /// Ask the running relay to hold `id` (`hold` true) or release it (false): a request
    /// file of one line (see the module docs). Blocking.
    pub fn request_hold(&self, id: &QueueId, hold: bool) -> Result<(), SpoolError> {
        self.request_holds(std::slice::from_ref(id), hold)
    }

    /// Ask the running relay to hold (`hold` true) or release each of `ids`: one request file
    /// per [`NOTICE_MAX_IDS`] ids, numbered after every pending one under the lock on
    /// `control/`, so this request wins over any made before it (see the module docs).
    /// Nothing is written when `ids` is empty. Does not check that the messages exist; the
    /// relay ignores ids it does not hold. When it fails, the files written before the
    /// failure stay and are acted on. Blocking: writes and fsyncs.
    pub fn request_holds(&self, ids: &[QueueId], hold: bool) -> Result<(), SpoolError> {
        use std::fmt::Write as _;
        if ids.is_empty() {
            return Ok(());
        }
        let control = &self.inner.control;
        // Held until this returns: from the listing to the directory fsync.
        let lock = File::open(control).map_err(SpoolError::io("open", control))?;
        lock_exclusive(&lock).map_err(SpoolError::io("flock", control))?;
        let mut seq = self.last_batch_seq()?;
        let verb = if hold { "hold" } else { "release" };
        let at_ms = crate::observe::event::unix_millis();
        for chunk in ids.chunks(NOTICE_MAX_IDS) {
            // 2^64 requests are never reached; saturating keeps the names valid regardless.
            seq = seq.saturating_add(1);
            let mut text = String::with_capacity(chunk.len() * 40);
            for id in chunk {
                let _ = writeln!(text, "{verb} {id}");
            }
            let n = super::TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!(
                "{BATCH_PREFIX}{seq:0width$}.{}-{n}-{at_ms}",
                std::process::id(),
                width = SEQ_DIGITS
            );
            self.write_request(&name, text.as_bytes())?;
        }
        self.sync_control()
    }

    /// The highest `SEQ` of the request files in `control/`; 0 when there are none.
    fn last_batch_seq(&self) -> Result<u64, SpoolError> {
        let dir = &self.inner.control;
        let mut last = 0;
        for entry in fs::read_dir(dir).map_err(SpoolError::io("readdir", dir))? {
            let entry = entry.map_err(SpoolError::io("readdir", dir))?;
            if let Some(seq) = entry.file_name().to_str().and_then(batch_seq) {
                last = last.max(seq);
            }
        }
        Ok(last)
    }

    /// The hold (true) and release (false) requests the relay has not recorded yet (a batch
    /// stays in `control/` until its holds are recorded), by message: the last asked for
    /// each, in the order the relay applies them. A file the relay unlinks meanwhile, or one
    /// it would not read (not written by its user), is left out. Read only: nothing is
    /// removed. Blocking.
    pub fn pending_holds(&self) -> Result<HashMap<QueueId, bool>, SpoolError> {
        let dir = &self.inner.control;
        let mut out = HashMap::new();
        let mut batches = Vec::new();
        for entry in fs::read_dir(dir).map_err(SpoolError::io("readdir", dir))? {
            let entry = entry.map_err(SpoolError::io("readdir", dir))?;
            let Some(name) = entry.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            if let Some(seq) = batch_seq(&name) {
                batches.push((seq, name));
            } else if let Some((id, hold)) = legacy_request(&name) {
                out.insert(id, hold);
            }
        }
        batches.sort();
        for (_, name) in batches {
            let path = dir.join(name);
            match open_trusted(&path, self.inner.owner.0, false) {
                Ok(file) => out.extend(read_batch(file, &path)),
                Err(Opened::Io(e)) if e.kind() == io::ErrorKind::NotFound => {}
                Err(Opened::Untrusted(_)) => {}
                Err(e) => return Err(e.into_spool_error(&path)),
            }
        }
        Ok(out)
    }

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
        let synced = || {
            failpoint::step("spool.state.dir_fsync")
                .map_err(SpoolError::io("fsync", &self.inner.queue))
                .and_then(|()| sync_dir(&self.inner.queue))
        };
        // Also when nothing was written: a state found as asked may be one an earlier call
        // renamed in and could not make durable, and this call's success is what lets the
        // request go (Spool::finish_holds).
        if results.iter().any(Result::is_ok)
            && let Err(e) = synced()
        {
            // Not durable: report every one as failed (the manager keeps the message as it
            // was and asks again; a crash may undo the renames, which is the same).
            for r in &mut results {
                if r.is_ok() {
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
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;
    use crate::envelope::{Address, Envelope, MailParams, Recipient, ReversePath};
    use crate::queue::Request;

    fn spool() -> (tempfile::TempDir, Spool) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        (dir, spool)
    }

    fn control_names(spool: &Spool) -> Vec<String> {
        let mut names: Vec<String> = fs::read_dir(spool.root().join("control"))
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        names.sort();
        names
    }

    /// The asks of the one [`Request::Holds`] the pending requests make; its files finished.
    fn take_holds(spool: &Spool) -> Vec<(QueueId, bool)> {
        match spool.take_requests(&Default::default()).unwrap().as_slice() {
            [Request::Holds { asks, files }] => {
                spool
                    .finish_holds(&files.iter().map(|(f, _)| f.clone()).collect::<Vec<_>>())
                    .unwrap();
                asks.clone()
            }
            other => panic!("not one Holds: {other:?}"),
        }
    }

    #[test]
    fn a_large_hold_is_one_file_per_notice_max_ids_taken_once_in_order() {
        let (dir, spool) = spool();
        let ids: Vec<QueueId> = (0..2 * NOTICE_MAX_IDS + 1)
            .map(|_| QueueId::generate())
            .collect();
        spool.request_holds(&ids, true).unwrap();
        spool.request_holds(&[], false).unwrap();
        let names = control_names(&spool);
        let seqs: Vec<Option<u64>> = names.iter().map(|n| batch_seq(n)).collect();
        assert_eq!(seqs, [Some(1), Some(2), Some(3)], "{names:?}");
        let pending = spool.pending_holds().unwrap();
        assert_eq!(pending.len(), ids.len());
        assert!(pending.values().all(|hold| *hold));

        let want: Vec<(QueueId, bool)> = ids.iter().map(|id| (id.clone(), true)).collect();
        assert_eq!(take_holds(&spool), want);
        assert!(control_names(&spool).is_empty());
        assert!(spool.take_requests(&Default::default()).unwrap().is_empty());
        assert!(spool.pending_holds().unwrap().is_empty());
        let tmp = fs::read_dir(dir.path().join("spool/tmp")).unwrap().count();
        assert_eq!(tmp, 0);
        // Nothing pending: numbering starts again.
        spool.request_hold(&ids[0], false).unwrap();
        assert_eq!(batch_seq(&control_names(&spool)[0]), Some(1));
    }

    #[test]
    fn the_last_asked_wins_whatever_order_the_requests_are_listed_in() {
        let (_dir, spool) = spool();
        let (a, b) = (QueueId::generate(), QueueId::generate());
        // A: hold then release; B: release then hold; each named more than once.
        spool.request_holds(&[a.clone(), b.clone()], true).unwrap();
        spool.request_holds(&[b.clone(), a.clone()], false).unwrap();
        spool.request_holds(std::slice::from_ref(&b), true).unwrap();
        let want_pending = HashMap::from([(a.clone(), false), (b.clone(), true)]);
        assert_eq!(spool.pending_holds().unwrap(), want_pending);
        // A later file with a name that lists first: the number orders, not the nonce.
        let control = spool.root().join("control");
        let names = control_names(&spool);
        fs::rename(
            control.join(&names[2]),
            control.join(format!("holds.{:020}.0-0-0", 3)),
        )
        .unwrap();
        assert_eq!(spool.pending_holds().unwrap(), want_pending);
        let got = take_holds(&spool);
        let last: HashMap<QueueId, bool> = got.iter().cloned().collect();
        assert_eq!(last, want_pending);
        assert_eq!(
            got,
            [
                (a.clone(), true),
                (b.clone(), true),
                (b.clone(), false),
                (a, false),
                (b, true)
            ]
        );
    }

    #[test]
    fn a_new_request_is_numbered_after_every_pending_one_even_when_written_at_once() {
        let (_dir, spool) = spool();
        let ids: Vec<QueueId> = (0..4).map(|_| QueueId::generate()).collect();
        // A pending request numbered 41 (as after 40 others were taken): the next is 42.
        let control = spool.root().join("control");
        fs::write(
            control.join(format!("holds.{:020}.1-2-3", 41)),
            format!("hold {}\n", ids[0]),
        )
        .unwrap();
        spool.request_hold(&ids[0], false).unwrap();
        let seqs = |spool: &Spool| -> Vec<u64> {
            (control_names(spool).iter())
                .filter_map(|n| batch_seq(n))
                .collect()
        };
        assert_eq!(seqs(&spool), [41, 42]);
        // Writers at once: the lock gives each file a number of its own.
        std::thread::scope(|scope| {
            for (i, id) in ids.iter().enumerate() {
                let spool = &spool;
                scope.spawn(move || {
                    for k in 0..25 {
                        spool.request_hold(id, (i + k) % 2 == 0).unwrap();
                    }
                });
            }
        });
        assert_eq!(seqs(&spool), (41..=142).collect::<Vec<u64>>());
    }

    #[test]
    fn a_damaged_or_foreign_hold_request_yields_only_its_valid_lines() {
        let (_dir, spool) = spool();
        let id = QueueId::generate();
        let control = spool.root().join("control");
        let text = format!(
            "hold {id}\nhold ../../etc\nrelease  {id}\nrelease {}\nhold {id} x\n\
             purge {id}\n\u{202e}release {id}\nrelease {id}",
            id.as_str().to_lowercase()
        );
        fs::write(control.join(format!("holds.{:020}.9", 1)), text).unwrap();
        // Group-writable: not the relay's; neither counted nor read. Names that are not a
        // request (a short number, no nonce, a path) are removed.
        let foreign = control.join(format!("holds.{:020}.8", 2));
        fs::write(&foreign, format!("hold {id}\n")).unwrap();
        fs::set_permissions(&foreign, fs::Permissions::from_mode(0o620)).unwrap();
        for junk in ["holds.1.x", "holds.00000000000000000003.", "holds.x.y"] {
            fs::write(control.join(junk), format!("hold {id}\n")).unwrap();
        }
        let want = [(id.clone(), true), (id.clone(), false)];
        assert_eq!(
            spool.pending_holds().unwrap(),
            HashMap::from([(id.clone(), false)])
        );
        assert_eq!(take_holds(&spool), want);
        assert!(
            control_names(&spool).is_empty(),
            "{:?}",
            control_names(&spool)
        );
    }

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
