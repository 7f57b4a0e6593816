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
//! Recovery runs once at startup, before delivery workers start; it is not meant to run
//! concurrently with a relay using the same spool.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs;
use std::io::BufReader;
use std::path::{Path, PathBuf};

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
        )
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

/// The messages after their envelopes were read.
struct Checked {
    /// Ids whose message file stays in `queue/`.
    present: HashSet<QueueId>,
    rejected: HashSet<QueueId>,
    envelopes: HashMap<QueueId, Envelope>,
}

impl Spool {
    /// Recover the spool after a restart or crash (see the module docs of `recover`): empty
    /// `tmp/`, reject what cannot be understood or was not written by the relay in `queue/`, remove orphan state files.
    /// Each action is logged with `warn!`. Blocking; call before starting delivery.
    pub fn recover(&self) -> Result<RecoveryReport, SpoolError> {
        let mut report = RecoveryReport {
            tmp_removed: self.clear_tmp()?,
            ..RecoveryReport::default()
        };
        // Before the scan, so a state moved back is checked with its message.
        self.return_quarantined_states()?;
        let scan = self.scan_queue(&mut report)?;
        let checked = self.check_messages(scan.messages, scan.rejected, &mut report)?;
        self.check_states(scan.states, &checked, &mut report)?;
        if !report.rejected.is_empty() {
            sync_dir(&self.inner.rejected)?;
        }
        if !report.rejected.is_empty() || report.orphans_removed > 0 {
            sync_dir(&self.inner.queue)?;
        }
        Ok(report)
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
                    self.reject(&path, &reason.to_string(), report)?;
                    scan.rejected.insert(id);
                }
                (Entry::State(_), Err(reason)) => {
                    self.reject(&path, &reason.to_string(), report)?;
                }
                (Entry::Stray, _) => self.reject(&path, "not a spool file name", report)?,
            }
        }
        Ok(scan)
    }

    /// Read every message's envelope; reject those that cannot be understood or were not
    /// written by the relay (joining `rejected`).
    fn check_messages(
        &self,
        messages: Vec<(QueueId, PathBuf)>,
        mut rejected: HashSet<QueueId>,
        report: &mut RecoveryReport,
    ) -> Result<Checked, SpoolError> {
        // Ids whose message file stays in queue/ (readable, or unreadable for a reason that
        // may pass, such as an I/O error: those are left alone, not rejected).
        let mut present = HashSet::new();
        let mut envelopes = HashMap::new();
        for (id, path) in messages {
            match check_message(&id, &path, self.inner.owner.0) {
                Ok(envelope) => {
                    report.queued += 1;
                    envelopes.insert(id.clone(), envelope);
                    present.insert(id);
                }
                Err(SpoolError::Corrupt { reason, .. } | SpoolError::Untrusted { reason, .. }) => {
                    self.reject(&path, &reason, report)?;
                    rejected.insert(id);
                }
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "cannot read queued message; leaving it in place");
                    present.insert(id);
                }
            }
        }
        Ok(Checked {
            present,
            rejected,
            envelopes,
        })
    }

    /// Keep the state files of present messages that fit them; reject or remove the others.
    fn check_states(
        &self,
        states: Vec<(QueueId, PathBuf)>,
        checked: &Checked,
        report: &mut RecoveryReport,
    ) -> Result<(), SpoolError> {
        for (id, path) in states {
            if !checked.present.contains(&id) {
                if checked.rejected.contains(&id) {
                    // Keep the progress next to the message it describes.
                    self.reject(&path, "its message was rejected", report)?;
                } else if self.adopt_quarantined_state(&id)? {
                    // Its message is quarantined: the state went with it.
                } else {
                    tracing::warn!(queue_id = %id, path = %path.display(), "removing delivery state of a message no longer queued");
                    failpoint::step("recover.orphan")
                        .and_then(|()| fs::remove_file(&path))
                        .map_err(SpoolError::io("unlink", &path))?;
                    report.orphans_removed += 1;
                }
                continue;
            }
            let parsed = read_state_file(&path, self.inner.owner.0).and_then(|state| {
                match (state, checked.envelopes.get(&id)) {
                    (Some(state), Some(envelope)) => state
                        .check_against(envelope)
                        .map_err(|mismatch| SpoolError::corrupt(&path, mismatch.to_string())),
                    _ => Ok(()),
                }
            });
            match parsed {
                Ok(()) => {}
                Err(SpoolError::Corrupt { reason, .. } | SpoolError::Untrusted { reason, .. }) => {
                    // The message stays queued and restarts with a fresh state: it may be
                    // delivered again to some recipients (at-least-once), never lost.
                    self.reject(&path, &reason, report)?;
                }
                Err(e) => {
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

/// Read the header of a message file and check its id against the file name.
fn check_message(
    id: &QueueId,
    path: &Path,
    owner: u32,
) -> Result<crate::envelope::Envelope, SpoolError> {
    let file = super::open_message_file(path, id, owner)?;
    let (envelope, _) = read_header(&mut BufReader::new(file), path)?;
    if envelope.id != *id {
        return Err(SpoolError::corrupt(
            path,
            format!("envelope id {} does not match the file name", envelope.id),
        ));
    }
    Ok(envelope)
}
