//! Startup recovery: bring the spool back to a state where everything in `queue/` is a
//! complete, readable message (plus its optional state), without ever deleting a committed
//! message.
//!
//! - `tmp/` holds only files whose writer is gone (a crash before commit, or a state update
//!   that was never renamed): nothing in it was acknowledged, so it is removed.
//! - In `queue/`, anything that is not a readable message `ID` or a parseable `ID.state` is
//!   moved to `quarantine/` for an operator to look at, never deleted: it may be a message we
//!   cannot read today (a newer format, a disk error) that someone can still save.
//! - An `ID.state` whose message is gone is removed: the message left the queue (delivered or
//!   deleted) and a crash came between the two unlinks of [`Spool::remove`].
//! - `control/` is left alone: a request made while the relay was stopped takes effect now.
//!
//! Recovery runs once at startup, before delivery workers start; it is not meant to run
//! concurrently with a relay using the same spool.

use std::collections::{HashMap, HashSet};
use std::ffi::OsStr;
use std::fmt;
use std::fs::{self, File};
use std::io::BufReader;
use std::path::{Path, PathBuf};

use super::{STATE_SUFFIX, Spool, SpoolError, exact_id, read_header, read_state_file, sync_dir};
use crate::envelope::QueueId;

/// What [`Spool::recover`] found and did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct RecoveryReport {
    /// Committed messages found intact and left in the queue.
    pub queued: usize,
    /// Files removed from `tmp/` (unfinished messages and state updates; none acknowledged).
    pub tmp_removed: usize,
    /// Where each quarantined file now is (inside `quarantine/`).
    pub quarantined: Vec<PathBuf>,
    /// State files removed because their message no longer exists.
    pub orphans_removed: usize,
}

impl fmt::Display for RecoveryReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} queued, {} temp files removed, {} quarantined, {} orphan states removed",
            self.queued,
            self.tmp_removed,
            self.quarantined.len(),
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

impl Spool {
    /// Recover the spool after a restart or crash (see the module docs of `recover`): empty
    /// `tmp/`, quarantine what cannot be understood in `queue/`, remove orphan state files.
    /// Each action is logged with `warn!`. Blocking; call before starting delivery.
    pub fn recover(&self) -> Result<RecoveryReport, SpoolError> {
        let mut report = RecoveryReport {
            tmp_removed: self.clear_tmp()?,
            ..RecoveryReport::default()
        };

        let queue = &self.inner.queue;
        let mut messages = Vec::new();
        let mut states = Vec::new();
        for entry in fs::read_dir(queue).map_err(SpoolError::io("readdir", queue))? {
            let entry = entry.map_err(SpoolError::io("readdir", queue))?;
            let path = entry.path();
            let is_file = entry.file_type().is_ok_and(|t| t.is_file());
            match classify(&entry.file_name()) {
                Entry::Message(id) if is_file => messages.push((id, path)),
                Entry::State(id) if is_file => states.push((id, path)),
                _ => self.quarantine(
                    &path,
                    "not a spool file name or not a regular file",
                    &mut report,
                )?,
            }
        }

        // Ids whose message file stays in queue/ (readable, or unreadable for a reason that
        // may pass, such as an I/O error: those are left alone, not quarantined).
        let mut present = HashSet::new();
        let mut quarantined_ids = HashSet::new();
        let mut envelopes = HashMap::new();
        for (id, path) in messages {
            match check_message(&id, &path) {
                Ok(envelope) => {
                    report.queued += 1;
                    envelopes.insert(id.clone(), envelope);
                    present.insert(id);
                }
                Err(SpoolError::Corrupt { reason, .. }) => {
                    self.quarantine(&path, &reason, &mut report)?;
                    quarantined_ids.insert(id);
                }
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "cannot read queued message; leaving it in place");
                    present.insert(id);
                }
            }
        }

        for (id, path) in states {
            if !present.contains(&id) {
                if quarantined_ids.contains(&id) {
                    // Keep the progress next to the message it describes.
                    self.quarantine(&path, "its message was quarantined", &mut report)?;
                } else {
                    tracing::warn!(queue_id = %id, path = %path.display(), "removing delivery state of a message no longer queued");
                    fs::remove_file(&path).map_err(SpoolError::io("unlink", &path))?;
                    report.orphans_removed += 1;
                }
                continue;
            }
            let parsed =
                read_state_file(&path).and_then(|state| match (state, envelopes.get(&id)) {
                    (Some(state), Some(envelope)) => state
                        .check_against(envelope)
                        .map_err(|reason| SpoolError::corrupt(&path, reason)),
                    _ => Ok(()),
                });
            match parsed {
                Ok(()) => {}
                Err(SpoolError::Corrupt { reason, .. }) => {
                    // The message stays queued and restarts with a fresh state: it may be
                    // delivered again to some recipients (at-least-once), never lost.
                    self.quarantine(&path, &reason, &mut report)?;
                }
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "cannot read delivery state; leaving it in place");
                }
            }
        }

        if !report.quarantined.is_empty() {
            sync_dir(&self.inner.quarantine)?;
        }
        if !report.quarantined.is_empty() || report.orphans_removed > 0 {
            sync_dir(queue)?;
        }
        Ok(report)
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
            let result = if is_dir {
                fs::remove_dir_all(&path)
            } else {
                fs::remove_file(&path)
            };
            result.map_err(SpoolError::io("unlink", &path))?;
            removed += 1;
        }
        if removed > 0 {
            sync_dir(tmp)?;
        }
        Ok(removed)
    }

    /// Move `path` into `quarantine/` under its own name (with a numeric suffix if taken).
    fn quarantine(
        &self,
        path: &Path,
        reason: &str,
        report: &mut RecoveryReport,
    ) -> Result<(), SpoolError> {
        let name = path.file_name().unwrap_or(OsStr::new("unnamed"));
        let mut dest = self.inner.quarantine.join(name);
        let mut n = 1u32;
        while fs::symlink_metadata(&dest).is_ok() {
            let mut suffixed = name.to_os_string();
            suffixed.push(format!(".{n}"));
            dest = self.inner.quarantine.join(suffixed);
            n += 1;
        }
        tracing::warn!(path = %path.display(), to = %dest.display(), reason, "quarantining spool file");
        fs::rename(path, &dest).map_err(SpoolError::io("rename", path))?;
        report.quarantined.push(dest);
        Ok(())
    }
}

/// Read the header of a message file and check its id against the file name.
fn check_message(id: &QueueId, path: &Path) -> Result<crate::envelope::Envelope, SpoolError> {
    let file = File::open(path).map_err(SpoolError::io("open", path))?;
    let (envelope, _) = read_header(&mut BufReader::new(file), path)?;
    if envelope.id != *id {
        return Err(SpoolError::corrupt(
            path,
            format!("envelope id {} does not match the file name", envelope.id),
        ));
    }
    Ok(envelope)
}
