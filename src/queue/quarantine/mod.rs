//! Quarantine: messages `queue purge --quarantine` took out of the queue, kept in
//! `SPOOL/quarantine/` for `[queue] quarantine_keep`, and put back by `queue restore` exactly as
//! they were (same id, same state, same bytes).
//!
//! # On disk
//!
//! ```text
//! SPOOL/quarantine/ID              the message file, moved (renamed) from queue/ID
//! SPOOL/quarantine/ID.state        its delivery state, moved from queue/ID.state (if any)
//! SPOOL/quarantine/ID.quarantined  when and by which command ([`Record`], JSON)
//! ```
//!
//! Files are moved with `rename(2)` inside the spool's file system, never copied: the bytes
//! are the very file the relay committed. Nothing in `quarantine/` is delivered, listed as
//! queued, counted by the census or touched by startup recovery (which only settles a move a
//! crash interrupted, below). `SPOOL/rejected/` is another thing: files recovery refused are
//! never restored.
//!
//! # Moving out: [`Spool::quarantine_selected`]
//!
//! 1. open `queue/ID` (for the lock, as [`Spool::delete`] does);
//! 2. rename `queue/ID` to `quarantine/ID` without replacing (the commit point: the message
//!    has left the queue);
//! 3. rename `queue/ID.state` to `quarantine/ID.state`;
//! 4. ask for the exclusive lock on the open file: refused means a delivery worker had begun
//!    its final dot ([`DeleteOutcome::DeletedMaybeSent`], the operator is told it may have been
//!    sent). A worker checks, under its shared lock, that its file is still `queue/ID`
//!    ([`super::SendLock::begin_final_dot`]), so it sees the move or the operator sees the
//!    lock, never neither (the argument of [`super::control`] with "unlinked" read as "moved");
//! 5. write the [`Record`] (not fsynced: losing it loses the command's name, and the time falls
//!    back to the file's change time, which the rename set).
//!
//! After the batch, `quarantine/` then `queue/` are fsynced, and only then is anything printed
//! or the relay told (a removal notice `quarantine ID MS`).
//!
//! # Moving back: [`Spool::restore`]
//!
//! The state goes first, then the message (rename without replacing: an id already queued is
//! refused before anything moves), then the record is removed; both directories are fsynced
//! and the relay is asked (`control/restore.ID`) to load the message and schedule it. State
//! first, because a relay that sees `queue/ID` treats a missing state as a fresh message.
//!
//! # A crash between the two renames: which file wins
//!
//! A rename is atomic, so a message file is in `queue/` or in `quarantine/`, never both and
//! never neither; only its state can be left on the other side. The rules (applied by startup
//! recovery, [`Spool::settle_quarantine`], and followed by `restore`):
//!
//! - `queue/ID.state` without `queue/ID`, while `quarantine/ID` exists: the message is
//!   quarantined (a quarantine stopped before its state moved, or a restore before its message
//!   moved). That state is the newest one (a worker may have written it just after the
//!   quarantine read the old one), so it goes into `quarantine/`, replacing the other;
//!   `restore` keeps it where it is and drops the quarantined copy.
//! - `quarantine/ID.state` without `quarantine/ID`, while `queue/ID` exists with no state of
//!   its own: a file system that made the second rename durable before the first; the state
//!   goes back to `queue/`.
//! - Any other state or record without its message in `quarantine/` is a leftover, removed by
//!   the sweep.
//!
//! So a crash never loses a message, never duplicates one, and never puts a quarantined one
//! back into the queue.
//!
//! # Expiry: [`Spool::sweep_quarantine`]
//!
//! The running relay's queue manager deletes quarantined messages older than
//! `[queue] quarantine_keep` (counted from the time of quarantine), at its start, when the
//! oldest one is due, and at least hourly; each is logged with its id.

use std::fs::{self, File};
use std::io::{self, BufReader, Read as _};
use std::os::unix::fs::MetadataExt as _;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::control::{Purged, try_flock};
use super::{
    DeleteOutcome, DeliveryState, QueuedMessage, STATE_SUFFIX, Spool, SpoolError, create_new,
    exact_id, give_to, open_message_file, read_header, read_state_file, rename_noreplace, sync_dir,
};
use crate::envelope::QueueId;

pub mod report;
#[cfg(test)]
mod tests;

/// Name of the quarantine directory under the spool root.
pub const DIR: &str = "quarantine";
/// Suffix of the record of a quarantined message.
pub const RECORD_SUFFIX: &str = ".quarantined";
/// Largest record read, in octets (a larger file is not one we wrote).
const MAX_RECORD: u64 = 64 * 1024;
/// The sweep runs at least this often, whatever `quarantine_keep` is.
pub const SWEEP_INTERVAL: Duration = Duration::from_secs(3600);

/// When a message was quarantined and by which command: `quarantine/ID.quarantined`, in the
/// audit log's form (the command that moved it; `affected` left empty).
pub type Record = super::audit::Entry;

/// One quarantined message, as `queue list --quarantined` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Quarantined {
    /// The message as it will be restored (`path` is its place in `quarantine/`).
    pub msg: QueuedMessage,
    /// Its record; `None` when missing or unreadable (a crash right after the move).
    pub record: Option<Record>,
    /// When it was quarantined, in Unix milliseconds: from the record, else the change time
    /// of the message file (set by the rename that quarantined it).
    pub at_ms: u64,
}

/// What [`Spool::restore`] did with one id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RestoreOutcome {
    /// Back in `queue/` with its state.
    Restored,
    /// A dry run: it would be restored.
    WouldRestore,
    /// No such message in `quarantine/` (never quarantined, restored or expired meanwhile).
    NotQuarantined,
    /// A message with this id is queued already: refused, nothing moved.
    AlreadyQueued,
}

/// What [`Spool::sweep_quarantine`] did.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Sweep {
    /// Messages deleted because `quarantine_keep` had passed, in id order.
    pub expired: Vec<QueueId>,
    /// States and records without their message, removed.
    pub leftovers: usize,
    /// When the oldest message kept expires, in Unix milliseconds (`None`: none kept).
    pub next_ms: Option<u64>,
}

/// What a name in `quarantine/` is.
enum Name {
    Message(QueueId),
    State(QueueId),
    Record(QueueId),
    Stray,
}

fn classify(name: &str) -> Name {
    if let Some(id) = exact_id(name) {
        return Name::Message(id);
    }
    let suffixed = |suffix: &str| name.strip_suffix(suffix).and_then(exact_id);
    suffixed(STATE_SUFFIX)
        .map(Name::State)
        .or_else(|| suffixed(RECORD_SUFFIX).map(Name::Record))
        .unwrap_or(Name::Stray)
}

/// `Ok(true)` when `from` was renamed to `to`, `Ok(false)` when `from` did not exist (a
/// missing destination directory is an error).
fn rename_if_there(from: &Path, to: &Path) -> Result<bool, SpoolError> {
    match fs::rename(from, to) {
        Ok(()) => Ok(true),
        Err(e) if super::rename_source_gone(&e, from) => Ok(false),
        Err(e) => Err(SpoolError::io("rename", from)(e)),
    }
}

/// Unlink `path`; `Ok(false)` when it was not there.
fn unlink_if_there(path: &Path) -> Result<bool, SpoolError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SpoolError::io("unlink", path)(e)),
    }
}

impl Spool {
    /// `SPOOL/quarantine/`.
    pub fn quarantine_dir(&self) -> PathBuf {
        self.root().join(DIR)
    }

    pub(in crate::queue) fn quarantined_path(&self, id: &QueueId, suffix: &str) -> PathBuf {
        self.quarantine_dir().join(format!("{id}{suffix}"))
    }

    /// Create `quarantine/` (private, the spool owner's) when a spool made before it existed
    /// is used by a command before the relay's next start.
    fn ensure_quarantine_dir(&self) -> Result<(), SpoolError> {
        use std::os::unix::fs::DirBuilderExt as _;
        let dir = self.quarantine_dir();
        if fs::symlink_metadata(&dir).is_ok() {
            return Ok(());
        }
        match fs::DirBuilder::new().mode(super::DIR_MODE).create(&dir) {
            Ok(()) => give_to(&dir, self.inner.owner),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => Ok(()),
            Err(e) => Err(SpoolError::io("mkdir", &dir)(e)),
        }
    }

    /// Quarantine every message `filter` selects (see the module docs), or with `dry_run`
    /// only list them; in queue order, outcomes as [`Spool::purge`] reports them
    /// (`Deleted` meaning moved to `quarantine/`). Blocking.
    ///
    /// # Errors
    /// As [`Spool::quarantine_selected`].
    pub fn purge_quarantine(
        &self,
        select: impl Fn(&QueuedMessage) -> bool,
        record: &Record,
        dry_run: bool,
    ) -> Result<Vec<Purged>, SpoolError> {
        let selected = self.list()?.into_iter().filter(select).collect();
        self.quarantine_selected(selected, record, dry_run)
    }

    /// Move `selected` into `quarantine/` (or list them, `dry_run`), recording `record` for
    /// each; both directories are fsynced before this returns. A message that left the queue
    /// meanwhile is [`DeleteOutcome::NotFound`]. The caller tells the relay
    /// ([`Spool::notify_removed`] with [`super::RemovedHow::Quarantine`]). Blocking.
    ///
    /// # Errors
    /// The first I/O error, after syncing what was moved before it and telling the relay
    /// about it; [`SpoolError::AlreadyExists`] when `quarantine/ID` is taken.
    pub fn quarantine_selected(
        &self,
        selected: Vec<QueuedMessage>,
        record: &Record,
        dry_run: bool,
    ) -> Result<Vec<Purged>, SpoolError> {
        if !dry_run {
            self.ensure_quarantine_dir()?;
        }
        let mut out = Vec::with_capacity(selected.len());
        let mut failure = None;
        for m in selected {
            let outcome = if dry_run {
                None
            } else {
                match self.quarantine_one(m.id(), record) {
                    Ok(outcome) => Some(outcome),
                    Err(e) => {
                        failure = Some(e);
                        break;
                    }
                }
            };
            out.push(Purged {
                id: m.envelope.id,
                sender: m.envelope.mail_from,
                outcome,
            });
        }
        if dry_run {
            return Ok(out);
        }
        let synced = sync_dir(&self.quarantine_dir()).and_then(|()| sync_dir(&self.inner.queue));
        match failure.map_or(synced, Err) {
            Ok(()) => Ok(out),
            Err(e) => {
                let moved: Vec<QueueId> = out
                    .into_iter()
                    .filter(|p| p.outcome.is_some_and(|o| o != DeleteOutcome::NotFound))
                    .map(|p| p.id)
                    .collect();
                let _ = self.notify_removed(super::RemovedHow::Quarantine, &moved);
                Err(e)
            }
        }
    }

    /// Steps 1 to 5 of the module docs for one message; no directory fsync.
    fn quarantine_one(&self, id: &QueueId, record: &Record) -> Result<DeleteOutcome, SpoolError> {
        let path = self.message_path(id);
        let file = match File::open(&path) {
            Ok(file) => file,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(DeleteOutcome::NotFound),
            Err(e) => return Err(SpoolError::io("open", &path)(e)),
        };
        let dest = self.quarantined_path(id, "");
        match rename_noreplace(&path, &dest) {
            Ok(()) => {}
            Err(e) if super::rename_source_gone(&e, &path) => return Ok(DeleteOutcome::NotFound),
            Err(e) if e.kind() == io::ErrorKind::AlreadyExists => {
                return Err(SpoolError::AlreadyExists(id.clone()));
            }
            Err(e) => return Err(SpoolError::io("rename", &path)(e)),
        }
        let _ = crate::failpoint::step("quarantine.move");
        rename_if_there(
            &self.state_path(id),
            &self.quarantined_path(id, STATE_SUFFIX),
        )?;
        let sending = !try_flock(&file, libc::LOCK_EX).map_err(SpoolError::io("flock", &path))?;
        if let Err(e) = self.write_record(id, record) {
            tracing::warn!(queue_id = %id, error = %e, "quarantined without its record; its age is taken from the file");
        }
        Ok(if sending {
            DeleteOutcome::DeletedMaybeSent
        } else {
            DeleteOutcome::Deleted
        })
    }

    /// Write `quarantine/ID.quarantined` (made in `tmp/`, renamed in; not fsynced).
    fn write_record(&self, id: &QueueId, record: &Record) -> Result<(), SpoolError> {
        use std::io::Write as _;
        let json = serde_json::to_vec(record).map_err(|source| SpoolError::Encode {
            what: "quarantine record",
            source,
        })?;
        let tmp = self.temp_path(&format!("{id}{RECORD_SUFFIX}"));
        let mut file = create_new(&tmp)?;
        let written = file
            .write_all(&json)
            .map_err(SpoolError::io("write", &tmp))
            .and_then(|()| give_to(&tmp, self.inner.owner));
        drop(file);
        let dest = self.quarantined_path(id, RECORD_SUFFIX);
        let renamed =
            written.and_then(|()| fs::rename(&tmp, &dest).map_err(SpoolError::io("rename", &dest)));
        if renamed.is_err() {
            let _ = fs::remove_file(&tmp);
        }
        renamed
    }

    /// Every quarantined message, sorted by id. A file that cannot be read or was not
    /// written by the relay is skipped with a warning. Blocking.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when `quarantine/` cannot be listed (a spool without one has no
    /// quarantined messages).
    pub fn quarantined(&self) -> Result<Vec<Quarantined>, SpoolError> {
        let ids = self.quarantined_ids()?;
        let mut out = Vec::with_capacity(ids.len());
        for id in ids {
            match self.load_quarantined(&id) {
                Ok(q) => out.push(q),
                Err(SpoolError::NotFound(_)) => {}
                Err(e) => {
                    tracing::warn!(queue_id = %id, error = %e, "skipping unreadable quarantined file");
                }
            }
        }
        Ok(out)
    }

    /// The ids of the quarantined messages, sorted (their files are not read). Blocking.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when `quarantine/` cannot be listed.
    pub fn quarantined_ids(&self) -> Result<Vec<QueueId>, SpoolError> {
        let dir = self.quarantine_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(SpoolError::io("readdir", &dir)(e)),
        };
        let mut ids = Vec::new();
        for entry in entries {
            let entry = entry.map_err(SpoolError::io("readdir", &dir))?;
            if let Some(Name::Message(id)) = entry.file_name().to_str().map(classify) {
                ids.push(id);
            }
        }
        ids.sort();
        Ok(ids)
    }

    /// Open `quarantine/ID` as the relay's and read its header, checking the envelope's id
    /// against the name: the envelope, the header length and the file's metadata.
    fn open_quarantined(
        &self,
        id: &QueueId,
    ) -> Result<(crate::envelope::Envelope, u64, fs::Metadata), SpoolError> {
        let path = self.quarantined_path(id, "");
        let (file, _) = open_message_file(&path, id, self.inner.owner.0)?;
        let meta = file.metadata().map_err(SpoolError::io("stat", &path))?;
        let (envelope, header_len) = read_header(&mut BufReader::new(file), &path)?;
        if envelope.id != *id {
            return Err(SpoolError::corrupt(
                &path,
                format!("envelope id {} does not match the file name", envelope.id),
            ));
        }
        Ok((envelope, header_len, meta))
    }

    /// Read one quarantined message: envelope (its id checked against the name), size,
    /// state (fresh when absent or unreadable), record.
    fn load_quarantined(&self, id: &QueueId) -> Result<Quarantined, SpoolError> {
        let path = self.quarantined_path(id, "");
        let (envelope, header_len, meta) = self.open_quarantined(id)?;
        let state_path = self.quarantined_path(id, STATE_SUFFIX);
        let state = read_state_file(&state_path, self.inner.owner.0)
            .ok()
            .flatten()
            .filter(|s| s.check_against(&envelope).is_ok())
            .unwrap_or_else(|| DeliveryState::fresh(envelope.received_at));
        let record = self.read_record(id);
        let ctime_ms = u64::try_from(meta.ctime())
            .unwrap_or(0)
            .saturating_mul(1000);
        Ok(Quarantined {
            at_ms: record.as_ref().map_or(ctime_ms, |r| r.at_ms),
            record,
            msg: QueuedMessage {
                size: meta.len().saturating_sub(header_len),
                envelope,
                state,
                path,
            },
        })
    }

    /// `quarantine/ID.quarantined`, when present and readable.
    fn read_record(&self, id: &QueueId) -> Option<Record> {
        let path = self.quarantined_path(id, RECORD_SUFFIX);
        let file = super::open_trusted(&path, self.inner.owner.0, false).ok()?;
        let mut bytes = Vec::new();
        file.take(MAX_RECORD).read_to_end(&mut bytes).ok()?;
        serde_json::from_slice(&bytes).ok()
    }

    /// Put quarantined message `id` back into the queue as it was (see the module docs), or
    /// with `dry_run` only say whether it would be. No directory fsync: call
    /// [`Spool::finish_restore`] after a batch. Blocking.
    ///
    /// # Errors
    /// [`SpoolError::Corrupt`] or [`SpoolError::Untrusted`] for a file in `quarantine/` that
    /// is not a message the relay wrote (it is never put into the queue), I/O errors.
    pub fn restore(&self, id: &QueueId, dry_run: bool) -> Result<RestoreOutcome, SpoolError> {
        // A damaged or planted file never reaches the queue.
        match self.open_quarantined(id) {
            Ok(_) => {}
            Err(SpoolError::NotFound(_)) => return Ok(RestoreOutcome::NotQuarantined),
            Err(e) => return Err(e),
        }
        let queued = self.message_path(id);
        if fs::symlink_metadata(&queued).is_ok() {
            return Ok(RestoreOutcome::AlreadyQueued);
        }
        if dry_run {
            return Ok(RestoreOutcome::WouldRestore);
        }
        let state = self.state_path(id);
        let kept_state = self.quarantined_path(id, STATE_SUFFIX);
        let moved_state = if fs::symlink_metadata(&state).is_ok() {
            // Left by an interrupted move: the newest state (module docs).
            unlink_if_there(&kept_state)?;
            false
        } else {
            rename_if_there(&kept_state, &state)?
        };
        let _ = crate::failpoint::step("restore.move");
        let kept = self.quarantined_path(id, "");
        if let Err(e) = rename_noreplace(&kept, &queued) {
            if moved_state {
                let _ = fs::rename(&state, &kept_state);
            }
            return if super::rename_source_gone(&e, &kept) {
                Ok(RestoreOutcome::NotQuarantined)
            } else if e.kind() == io::ErrorKind::AlreadyExists {
                Ok(RestoreOutcome::AlreadyQueued)
            } else {
                Err(SpoolError::io("rename", &queued)(e))
            };
        }
        unlink_if_there(&self.quarantined_path(id, RECORD_SUFFIX))?;
        Ok(RestoreOutcome::Restored)
    }

    /// Make a batch of [`Spool::restore`]s durable: fsync `queue/` and `quarantine/`.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when a directory cannot be synced.
    pub fn finish_restore(&self) -> Result<(), SpoolError> {
        sync_dir(&self.inner.queue)?;
        sync_dir(&self.quarantine_dir())
    }

    /// Delete the quarantined messages whose time of quarantine is `keep` or more before
    /// `now_ms` (message, then state and record; each logged with its id), and the leftovers
    /// of interrupted moves (module docs). Blocking.
    ///
    /// # Errors
    /// [`SpoolError::Io`] when `quarantine/` cannot be listed or a file cannot be removed.
    pub fn sweep_quarantine(&self, keep: Duration, now_ms: u64) -> Result<Sweep, SpoolError> {
        let dir = self.quarantine_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Sweep::default()),
            Err(e) => return Err(SpoolError::io("readdir", &dir)(e)),
        };
        let (mut messages, mut others) = (Vec::new(), Vec::new());
        for entry in entries {
            let entry = entry.map_err(SpoolError::io("readdir", &dir))?;
            match entry.file_name().to_str().map(classify) {
                Some(Name::Message(id)) => messages.push(id),
                Some(Name::State(id)) => others.push((id, STATE_SUFFIX)),
                Some(Name::Record(id)) => others.push((id, RECORD_SUFFIX)),
                Some(Name::Stray) | None => {}
            }
        }
        messages.sort();
        let keep_ms = u64::try_from(keep.as_millis()).unwrap_or(u64::MAX);
        let mut sweep = Sweep::default();
        for id in &messages {
            let Some(at_ms) = self.quarantined_at(id) else {
                continue;
            };
            let expires = at_ms.saturating_add(keep_ms);
            if expires > now_ms {
                sweep.next_ms = Some(sweep.next_ms.map_or(expires, |n| n.min(expires)));
                continue;
            }
            if unlink_if_there(&self.quarantined_path(id, ""))? {
                unlink_if_there(&self.quarantined_path(id, STATE_SUFFIX))?;
                unlink_if_there(&self.quarantined_path(id, RECORD_SUFFIX))?;
                tracing::info!(queue_id = %id, "quarantined message deleted: quarantine_keep has passed");
                sweep.expired.push(id.clone());
            }
        }
        for (id, suffix) in others {
            if self.is_leftover(&id, suffix)
                && unlink_if_there(&self.quarantined_path(&id, suffix))?
            {
                sweep.leftovers += 1;
            }
        }
        if !sweep.expired.is_empty() || sweep.leftovers > 0 {
            sync_dir(&dir)?;
        }
        Ok(sweep)
    }

    /// When `id` was quarantined (record, else the file's change time); `None` when it is
    /// gone.
    fn quarantined_at(&self, id: &QueueId) -> Option<u64> {
        if let Some(record) = self.read_record(id) {
            return Some(record.at_ms);
        }
        let meta = fs::symlink_metadata(self.quarantined_path(id, "")).ok()?;
        Some(
            u64::try_from(meta.ctime())
                .unwrap_or(0)
                .saturating_mul(1000),
        )
    }

    /// True when `quarantine/ID{suffix}` belongs to no message: its message is in neither
    /// place, or (a record) not in `quarantine/`; a state whose message is queued without one
    /// is not a leftover but the state of that message, which recovery moves back.
    fn is_leftover(&self, id: &QueueId, suffix: &str) -> bool {
        let exists = |p: PathBuf| fs::symlink_metadata(p).is_ok();
        if exists(self.quarantined_path(id, "")) {
            return false;
        }
        suffix != STATE_SUFFIX || !exists(self.message_path(id)) || exists(self.state_path(id))
    }

    /// Startup recovery, for `queue/ID.state` without `queue/ID`: when the message is in
    /// `quarantine/`, move the state there (replacing the older one; see the module docs) and
    /// return true; false (nothing done) otherwise. No directory fsync (recovery syncs).
    pub(super) fn adopt_quarantined_state(&self, id: &QueueId) -> Result<bool, SpoolError> {
        // Only "no such file" means not quarantined: any other error (EACCES, EIO) must stop
        // recovery rather than let it drop the state of a message that is in quarantine.
        let message = self.quarantined_path(id, "");
        match fs::symlink_metadata(&message) {
            Ok(_) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(false),
            Err(e) => return Err(SpoolError::io("stat", &message)(e)),
        }
        let moved = rename_if_there(
            &self.state_path(id),
            &self.quarantined_path(id, STATE_SUFFIX),
        )?;
        if moved {
            tracing::warn!(queue_id = %id, "moved the delivery state of a quarantined message into quarantine/ (a move a crash interrupted)");
            sync_dir(&self.quarantine_dir())?;
        }
        Ok(moved)
    }

    /// Startup recovery, before `queue/` is scanned: every `quarantine/ID.state` without
    /// `quarantine/ID` whose message is queued without a state goes back to `queue/` (see the
    /// module docs). Returns how many moved; both directories are fsynced when any did.
    pub(super) fn return_quarantined_states(&self) -> Result<usize, SpoolError> {
        let dir = self.quarantine_dir();
        let entries = match fs::read_dir(&dir) {
            Ok(entries) => entries,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
            Err(e) => return Err(SpoolError::io("read", &dir)(e)),
        };
        let exists = |p: PathBuf| fs::symlink_metadata(p).is_ok();
        let mut back = 0;
        for entry in entries.flatten() {
            let Some(Name::State(id)) = entry.file_name().to_str().map(classify) else {
                continue;
            };
            if !exists(self.quarantined_path(&id, ""))
                && exists(self.message_path(&id))
                && !exists(self.state_path(&id))
                && rename_if_there(&entry.path(), &self.state_path(&id))?
            {
                tracing::warn!(queue_id = %id, "moved the delivery state of a queued message back from quarantine/ (a move a crash interrupted)");
                back += 1;
            }
        }
        if back > 0 {
            sync_dir(&self.inner.queue)?;
            sync_dir(&dir)?;
        }
        Ok(back)
    }
}
