//! Startup recovery: bring the spool back to a state where everything in `queue/` is a
//! complete, readable message (plus its optional state), without ever deleting a committed
//! message.
//!
//! - `tmp/` holds only files whose writer is gone (a crash before commit, or a state update
//!   that was never renamed): nothing in it was acknowledged, so it is removed.
//! - In `queue/`, anything that is not a readable message `ID` or a parseable `ID.state`, and
//!   any file the relay did not write (not owned by the spool's owner, group- or
//!   world-writable, not a regular file: see [`super::trust`]), is moved to `rejected/` for an
//!   operator to look at, logged with its id and the reason, never deleted: it may be a
//!   message we cannot read today (a newer format, a disk error) that someone can still save.
//!   Nothing in `rejected/` is ever delivered, listed or restored by a command: a file planted
//!   by another user must not be sent upstream with its forged envelope (`auth_user`).
//! - An `ID.state` whose message is gone is removed: the message left the queue (delivered or
//!   deleted) and a crash came between the two unlinks of [`Spool::remove`].
//! - `control/` is left alone: a request made while the relay was stopped takes effect now.
//! - `quarantine/` is left alone (never delivered, never rejected), except that a delivery
//!   state a crash left on the wrong side of a quarantine or restore goes to where its message
//!   is (see [`super::quarantine`]): an orphan `queue/ID.state` whose message is quarantined
//!   is moved into `quarantine/`, not removed.
//!
//! Recovery runs once at startup, in two parts. [`Spool::recover_start`] (the small
//! directories: `tmp/`, and the states a quarantine or restore left behind) runs before the
//! listeners open. [`Spool::recover_queue`] (every file of `queue/`: 100,000 messages take
//! seconds with a warm page cache, half a minute with a cold one) may run while the relay
//! already accepts mail, before the delivery scheduler loads the queue: a message committed
//! meanwhile is a complete file the check passes, and a state written for one after the
//! listing started is never taken for an orphan (its message is looked for again first).
//! Delivery starts once it is done. Neither part is meant to run beside another relay on
//! the same spool (the spool lock forbids it).

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};
use std::thread;

use super::{STATE_SUFFIX, Spool, SpoolError, exact_id, read_header, read_state_file, sync_dir};
use crate::envelope::{Envelope, QueueId};
use crate::failpoint;

/// What [`Spool::recover`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Committed messages found intact and left in the queue.
    pub queued: usize,
    /// Files removed from `tmp/` (unfinished messages and state updates; none acknowledged).
    pub tmp_removed: usize,
    /// Where each rejected file now is (inside `rejected/`).
    pub rejected: Vec<PathBuf>,
    /// State files removed because their message no longer exists.
    pub orphans_removed: usize,
    /// Files to be set aside or removed that could not be (each logged with
    /// `rule=spool_recovery`): left where they are, tried again at the next start. The relay
    /// never delivers them: it skips what it cannot read or trust.
    pub left: usize,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} queued, {} temp files removed, {} rejected, {} orphan states removed",
            self.queued,
            self.tmp_removed,
            self.rejected.len(),
            self.orphans_removed
        )?;
        if self.left > 0 {
            write!(f, ", {} left in place (see the errors above)", self.left)?;
        }
        Ok(())
    }
}

/// How a name in `queue/` is classified before anything is read.
enum Entry {
    Message(QueueId),
    State(QueueId),
    Stray,
}

fn classify(name: &OsStr) -> Entry {
    let Some(name) = name.to_str() else {
        return Entry::Stray;
    };
    if let Some(id) = exact_id(name) {
        return Entry::Message(id);
    }
    match name.strip_suffix(STATE_SUFFIX).and_then(exact_id) {
        Some(id) => Entry::State(id),
        None => Entry::Stray,
    }
}

/// What [`Spool::recover`] found in `queue/` (trusted files, by id).
#[derive(Default)]
struct Scan {
    messages: Vec<(QueueId, PathBuf)>,
    states: Vec<(QueueId, PathBuf)>,
    /// Messages already rejected (not written by the relay).
    rejected: HashSet<QueueId>,
}

/// Threads reading the files of `queue/` during recovery: the reads are I/O-bound with a cold
/// page cache, where more requests in flight shorten the wait.
const RECOVER_THREADS: usize = 8;
/// Files below which recovery reads them on one thread.
const RECOVER_PER_THREAD: usize = 1024;

/// `check` of each item of `items` on up to [`RECOVER_THREADS`] threads, results in order.
fn check_all<T: Sync, R: Send>(items: &[T], check: impl Fn(&T) -> R + Sync) -> Vec<R> {
    let threads = RECOVER_THREADS.min(items.len() / RECOVER_PER_THREAD).max(1);
    if threads == 1 {
        return items.iter().map(&check).collect();
    }
    let chunk = items.len().div_ceil(threads);
    let check = &check;
    thread::scope(|scope| {
        let parts: Vec<_> = items
            .chunks(chunk)
            .map(|part| scope.spawn(move || part.iter().map(check).collect::<Vec<R>>()))
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
            .collect()
    })
}

/// The messages after their envelopes (and states) were read.
struct Checked {
    /// Ids whose message file stays in `queue/`.
    present: HashSet<QueueId>,
    rejected: HashSet<QueueId>,
    /// The state files of present messages that failed their check, by id. Each state is
    /// read with its message, so no envelope is kept: memory stays flat however long the
    /// queue.
    bad_states: HashMap<QueueId, SpoolError>,
}

/// What the check of one message found: the message's envelope check, and its state's
/// (`None`: it has no state file, or its message is not present).
type MessageCheck = (Result<(), SpoolError>, Option<Result<(), SpoolError>>);

impl Spool {
    /// Recover the spool after a restart or crash (see the module docs of `recover`): empty
    /// `tmp/`, reject what cannot be understood or was not written by the relay in `queue/`, remove orphan state files.
    /// Each action is logged with `warn!`. Blocking; call before starting delivery.
    pub fn recover(&self) -> Result<RecoveryReport, SpoolError> {
        let mut report = self.recover_start()?;
        self.recover_queue(&mut report)?;
        Ok(report)
    }

    /// The first part of [`Spool::recover`], before anything is accepted: empty `tmp/`, and
    /// put back the states a quarantine or restore left on the wrong side (so that they are
    /// checked with their message). Reads only those two directories. Blocking.
    ///
    /// # Errors
    /// The first I/O error (the relay then refuses to start, the spool as it was).
    pub fn recover_start(&self) -> Result<RecoveryReport, SpoolError> {
        let report = RecoveryReport {
            tmp_removed: self.clear_tmp()?,
            ..RecoveryReport::default()
        };
        // Before the scan, so a state moved back is checked with its message.
        self.return_quarantined_states()?;
        Ok(report)
    }

    /// The second part of [`Spool::recover`], adding to `report`: check every file of
    /// `queue/`, reject and remove as the module docs say. Safe while new messages are
    /// committed (module docs); the delivery of queued mail must wait for it. Blocking: reads
    /// on up to [`RECOVER_THREADS`] threads.
    ///
    /// # Errors
    /// `queue/` cannot be listed. A file that cannot be read, set aside or removed is logged
    /// and left in place instead (counted in [`RecoveryReport::left`]): one bad file must not
    /// stop the delivery of the rest.
    pub fn recover_queue(&self, report: &mut RecoveryReport) -> Result<(), SpoolError> {
        let report = &mut *report;
        let scan = self.scan_queue(report)?;
        let checked = self.check_messages(scan.messages, &scan.states, scan.rejected, report)?;
        self.check_states(scan.states, checked, report)?;
        // Without these fsyncs a power cut may undo a move or removal, which the next start
        // does again: an error is logged, not fatal.
        let mut dirs = Vec::new();
        if !report.rejected.is_empty() {
            dirs.push(&self.inner.rejected);
        }
        if !report.rejected.is_empty() || report.orphans_removed > 0 {
            dirs.push(&self.inner.queue);
        }
        for dir in dirs {
            if let Err(e) = sync_dir(dir) {
                tracing::error!(error = %e, rule = "spool_recovery", "cannot fsync the spool after its recovery");
            }
        }
        Ok(())
    }

    /// [`Spool::reject`], and when that fails, the file logged and counted as left in place.
    fn set_aside(&self, path: &Path, reason: &str, report: &mut RecoveryReport) {
        if let Err(e) = self.reject(path, reason, report) {
            left_in_place(path, &format!("cannot set aside ({reason})"), &e, report);
        }
    }

    /// Whether the orphan state `path` of `id` belongs to a quarantined message and went to
    /// it; an error is logged and counted as left in place (true: nothing more to do).
    fn moved_to_quarantine(&self, id: &QueueId, path: &Path, report: &mut RecoveryReport) -> bool {
        self.adopt_quarantined_state(id).unwrap_or_else(|e| {
            left_in_place(
                path,
                "cannot move a state to its quarantined message",
                &e,
                report,
            );
            true
        })
    }

    /// List `queue/`: message and state files the relay wrote, by id; reject the rest.
    fn scan_queue(&self, report: &mut RecoveryReport) -> Result<Scan, SpoolError> {
        let queue = &self.inner.queue;
        let mut scan = Scan::default();
        for entry in fs::read_dir(queue).map_err(SpoolError::io("readdir", queue))? {
            let entry = entry.map_err(SpoolError::io("readdir", queue))?;
            let path = entry.path();
            // lstat: a symlink is judged as itself, never by what it points to.
            let trusted = match entry.metadata() {
                Ok(meta) => super::trust(&meta, self.inner.owner.0),
                // Gone since the directory was read (a `queue delete` beside the start).
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => continue,
                // Judged when it is opened below, which checks the open file again: an I/O
                // error that may pass leaves a file in place, it never rejects it for good.
                Err(_) => Ok(()),
            };
            match (classify(&entry.file_name()), trusted) {
                (Entry::Message(id), Ok(())) => scan.messages.push((id, path)),
                (Entry::State(id), Ok(())) => scan.states.push((id, path)),
                (Entry::Message(id), Err(reason)) => {
                    self.set_aside(&path, &reason.to_string(), report);
                    scan.rejected.insert(id);
                }
                (Entry::State(_), Err(reason)) => {
                    self.set_aside(&path, &reason.to_string(), report);
                }
                (Entry::Stray, _) => self.set_aside(&path, "not a spool file name", report),
            }
        }
        Ok(scan)
    }

    /// Read every message's envelope, and its state against it; reject the messages that
    /// cannot be understood or were not written by the relay (joining `rejected`).
    fn check_messages(
        &self,
        messages: Vec<(QueueId, PathBuf)>,
        states: &[(QueueId, PathBuf)],
        mut rejected: HashSet<QueueId>,
        report: &mut RecoveryReport,
    ) -> Result<Checked, SpoolError> {
        // Ids whose message file stays in queue/ (readable, or unreadable for a reason that
        // may pass, such as an I/O error: those are left alone, not rejected).
        let mut present = HashSet::new();
        let mut bad_states = HashMap::new();
        let with_state: HashMap<&QueueId, &PathBuf> = states.iter().map(|(i, p)| (i, p)).collect();
        let owner = self.inner.owner.0;
        let results = check_all(&messages, |(id, path)| -> MessageCheck {
            let state = |envelope| with_state.get(id).map(|p| check_state(p, envelope, owner));
            match check_message(id, path, owner) {
                Ok(envelope) => (Ok(()), state(Some(&envelope))),
                Err(
                    e @ (SpoolError::Corrupt { .. }
                    | SpoolError::Untrusted { .. }
                    | SpoolError::NotFound(_)),
                ) => (Err(e), None),
                // Present, unreadable now (an I/O error that may pass): its state is still
                // parsed.
                Err(e) => (Err(e), state(None)),
            }
        });
        for ((id, path), (result, state)) in messages.into_iter().zip(results) {
            if let Some(Err(e)) = state {
                bad_states.insert(id.clone(), e);
            }
            match result {
                Ok(()) => {
                    report.queued += 1;
                    present.insert(id);
                }
                Err(SpoolError::Corrupt { reason, .. } | SpoolError::Untrusted { reason, .. }) => {
                    self.set_aside(&path, &reason, report);
                    rejected.insert(id);
                }
                // Deleted by a `queue` command since the listing.
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "cannot read queued message; leaving it in place");
                    present.insert(id);
                }
            }
        }
        Ok(Checked {
            present,
            rejected,
            bad_states,
        })
    }

    /// Keep the state files of present messages that fit them; reject or remove the others.
    fn check_states(
        &self,
        states: Vec<(QueueId, PathBuf)>,
        mut checked: Checked,
        report: &mut RecoveryReport,
    ) -> Result<(), SpoolError> {
        for (id, path) in states {
            if !checked.present.contains(&id) {
                if checked.rejected.contains(&id) {
                    // Keep the progress next to the message it describes.
                    self.set_aside(&path, "its message was rejected", report);
                } else if self.moved_to_quarantine(&id, &path, report) {
                    // Its message is quarantined: the state went with it.
                } else if fs::symlink_metadata(self.message_path(&id)).is_ok() {
                    // Its message was committed after the listing passed its name (the relay
                    // accepts mail during recovery), then attempted: not an orphan.
                } else {
                    match failpoint::step("recover.orphan").and_then(|()| fs::remove_file(&path)) {
                        Ok(()) => {
                            tracing::warn!(queue_id = %id, path = %path.display(), "removed the delivery state of a message no longer queued");
                            report.orphans_removed += 1;
                        }
                        // Moved or removed by a `queue` command since the listing.
                        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                        Err(e) => left_in_place(
                            &path,
                            "cannot remove the delivery state of a message no longer queued",
                            &SpoolError::io("unlink", &path)(e),
                            report,
                        ),
                    }
                }
                continue;
            }
            match checked.bad_states.remove(&id) {
                None => {}
                Some(SpoolError::Corrupt { reason, .. } | SpoolError::Untrusted { reason, .. }) => {
                    // The message stays queued and restarts with a fresh state: it may be
                    // delivered again to some recipients (at-least-once), never lost.
                    self.set_aside(&path, &reason, report);
                }
                Some(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "cannot read delivery state; leaving it in place");
                }
            }
        }
        Ok(())
    }

    /// Remove everything in `tmp/`; returns how many entries were removed.
    fn clear_tmp(&self) -> Result<usize, SpoolError> {
        let tmp = &self.inner.tmp;
        let mut removed = 0;
        for entry in fs::read_dir(tmp).map_err(SpoolError::io("readdir", tmp))? {
            let entry = entry.map_err(SpoolError::io("readdir", tmp))?;
            let path = entry.path();
            tracing::warn!(path = %path.display(), "removing unfinished spool file");
            let is_dir = entry.file_type().is_ok_and(|t| t.is_dir());
            let result = failpoint::step("recover.tmp").and_then(|()| {
                if is_dir {
                    fs::remove_dir_all(&path)
                } else {
                    fs::remove_file(&path)
                }
            });
            result.map_err(SpoolError::io("unlink", &path))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(tmp)?;
        }
        Ok(removed)
    }

    /// Move `path` into `rejected/` under its own name (with a numeric suffix if taken), and
    /// log it with its queue id (when the name is one) and `reason`.
    fn reject(
        &self,
        path: &Path,
        reason: &str,
        report: &mut RecoveryReport,
    ) -> Result<(), SpoolError> {
        let name = path.file_name().unwrap_or(OsStr::new("unnamed"));
        let mut dest = self.inner.rejected.join(name);
        let mut n = 1u32;
        while fs::symlink_metadata(&dest).is_ok() {
            let mut suffixed = name.to_os_string();
            suffixed.push(format!(".{n}"));
            dest = self.inner.rejected.join(suffixed);
            n += 1;
        }
        let queue_id = name
            .to_str()
            .map(|n| n.strip_suffix(STATE_SUFFIX).unwrap_or(n))
            .and_then(exact_id)
            .map_or_else(|| "-".to_string(), |id| id.to_string());
        match fs::rename(path, &dest) {
            // Removed meanwhile (a `queue delete` beside the start): nothing left to reject.
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            r => r.map_err(SpoolError::io("rename", path))?,
        }
        tracing::warn!(queue_id, path = %path.display(), to = %dest.display(), reason,
            rule = "spool_rejected", "spool file rejected: never delivered");
        report.rejected.push(dest);
        Ok(())
    }
}

/// Log a file recovery could not deal with (`what`, `error`) and count it in `report.left`.
fn left_in_place(path: &Path, what: &str, error: &SpoolError, report: &mut RecoveryReport) {
    tracing::error!(path = %path.display(), %error, rule = "spool_recovery",
        "{what}; left in place, tried again at the next start");
    report.left += 1;
}

/// Read the state file at `path` and check it against its message's `envelope` (when the
/// message could be read).
fn check_state(path: &Path, envelope: Option<&Envelope>, owner: u32) -> Result<(), SpoolError> {
    match (read_state_file(path, owner)?, envelope) {
        (Some(state), Some(envelope)) => state
            .check_against(envelope)
            .map_err(|mismatch| SpoolError::corrupt(path, mismatch.to_string())),
        _ => Ok(()),
    }
}

/// Read the header of a message file and check its id against the file name.
fn check_message(
    id: &QueueId,
    path: &Path,
    owner: u32,
) -> Result<crate::envelope::Envelope, SpoolError> {
    let (file, _) = super::open_message_file(path, id, owner)?;
    let (envelope, _) = read_header(&mut BufReader::new(file), path)?;
    if envelope.id != *id {
        return Err(SpoolError::corrupt(
            path,
            format!("envelope id {} does not match the file name", envelope.id),
        ));
    }
    Ok(envelope)
}

#[cfg(test)]
mod tests {
    use super::super::tests::{commit, spool};
    use super::*;
    use crate::envelope::sample_envelope;
    use crate::queue::DeliveryState;

    /// Recovery of `queue/` runs while the relay accepts mail: a message committed after
    /// the listing passed its name, then attempted, has a state the listing saw without its
    /// message. That state is kept; a true orphan is removed.
    #[test]
    fn a_state_whose_message_came_after_the_listing_is_no_orphan() {
        let (_dir, spool) = spool();
        let late = commit(
            &spool,
            &sample_envelope(&["b@example.com"]),
            b"Subject: late\r\n\r\nx\r\n",
        );
        spool.write_state(&late, &DeliveryState::fresh(9)).unwrap();
        let gone = QueueId::generate();
        let orphan = spool.state_path(&gone);
        fs::copy(spool.state_path(&late), &orphan).unwrap();
        // What a listing made before `late` was committed would hold.
        let checked = Checked {
            present: HashSet::new(),
            rejected: HashSet::new(),
            bad_states: HashMap::new(),
        };
        let states = vec![
            (late.clone(), spool.state_path(&late)),
            (gone, orphan.clone()),
        ];
        let mut report = RecoveryReport::default();
        spool.check_states(states, checked, &mut report).unwrap();
        assert_eq!(report.orphans_removed, 1);
        assert!(!orphan.exists());
        assert_eq!(spool.load(&late).unwrap().state.next_attempt, 9);
    }
}
