//! Operator commands to a running relay, and deletion coordinated with delivery workers.
//!
//! The `queue` commands run in a separate process from the relay, so everything here goes
//! through files in the spool; no socket, no signal, no shared memory.
//!
//! # Requests: `SPOOL/control/`
//!
//! [`Spool::request_retry`] writes an empty file named `retry.all` or `retry.ID` into
//! `control/`, atomically (created in `tmp/`, renamed into `control/`, directory fsynced so a
//! request made while the relay is stopped survives a crash until its next start). The name is
//! the whole request: asking twice for the same thing replaces the file, which is the same
//! request. The relay calls [`Spool::take_requests`] at startup and about every 500 ms: it
//! lists `control/`, unlinks each file, and only then returns the requests to act on. Acting
//! after the unlink is what makes the protocol lossless: a request renamed in between the
//! listing and the unlink is consumed, but the action that follows covers it too. Names it does
//! not understand are removed with a warning (nothing but requests belongs there). Batches
//! of holds are the exception: they stay until their holds are recorded (see [`super::hold`]),
//! since a lost retry only waits for the next scheduled attempt but a lost hold sends mail an
//! operator stopped.
//! [`Spool::request_holds`] asks to hold or release messages with files that list them
//! (`holds.SEQ.NONCE`, read as removal notices are, below), numbered under a lock so that the
//! last asked wins for a message whatever order the relay reads them in; the relay's queue
//! manager records the hold in `ID.state`. [`Spool::pending_holds`] lists the requests not
//! yet taken, which `queue hold|release` count as done. See [`super::hold`].
//! [`Spool::request_restore`] asks it (`restore.ID`) to load and schedule a message `queue
//! restore` put back into `queue/` (see [`super::quarantine`]); [`Spool::request_adopted`]
//! (`adopted.ID.FROM`) the same for a message `queue adopt` imported, `FROM` being its id in
//! the spool it came from (see [`super::adopt`]).
//!
//! # Removal notices: `SPOOL/control/removed.NONCE`
//!
//! `queue delete` and `queue purge` remove messages themselves (see below); afterwards they
//! tell the relay what they removed, so that it counts and journals each removal and stops
//! counting the message in its census: [`Spool::notify_removed`] writes a file whose lines are
//! `delete ID UNIX_MS`, `purge ID UNIX_MS` or `quarantine ID UNIX_MS` (at most
//! [`NOTICE_MAX_IDS`] lines; a larger purge writes several files), the same way as a request
//! (`tmp/`, fsync, rename, directory fsync), under a name no other notice has (the process id,
//! a counter and the time). A notice has contents, so the relay cannot act only on its name; it
//! still acts after the unlink, as for
//! every request: it opens the file, unlinks it (if the unlink finds it gone, a concurrent
//! consumer took it and acts on it), and only then reads it through the open descriptor. The
//! name being unique, the file read is the file unlinked, never a later one renamed over it;
//! and a notice is acted on once (a crash between the unlink and the recording loses that
//! notice's journal lines, never a message). A relay that is not running reads it at its
//! next start (the census, rebuilt from the spool then, no longer has the messages).
//!
//! The CLI never writes `queue/ID.state` to make a message due: a delivery worker may be
//! replacing that file at the same moment, and one of the two writes would be lost. The relay
//! owns the schedule; a request only asks it to change it.
//!
//! # Deletion while a worker sends: a lock on `queue/ID`
//!
//! The commit point of a deletion is the unlink of `queue/ID`. A worker that holds the message
//! in memory (or an open file) must not send its final dot after that, and an operator must be
//! told when it already had. A worker keeps `queue/ID` open for its whole attempt (its
//! [`SendLock`]); the two sides use `flock(2)` on that open file and its link count:
//!
//! ```text
//! worker, before the final dot                 operator, Spool::delete
//! (SendLock::begin_final_dot)                  (opens queue/ID first)
//!   1. shared lock (non-blocking)                a. unlink queue/ID, then ID.state, fsync
//!        refused → being deleted: abort          b. exclusive lock (non-blocking)?
//!   2. link count still 1?                            refused → DeletedMaybeSent
//!        no  → deleted: abort (RSET)                  granted → Deleted
//!        yes → send the dot, keep the lock
//!              until the outcome is recorded
//! ```
//!
//! A shared and an exclusive lock exclude each other. If 1 came after b, the worker is refused
//! (the operator still holds its lock) or, once the operator has closed the file, sees the link
//! count at 0 (a came before b). Otherwise 1 came before b and the operator is refused. Either
//! the worker sees the deletion or the operator sees the lock; never neither. The converse is
//! not exact: when 1 < a < 2 < b the worker aborts yet the operator is told the message may
//! have been sent. That errs on the side of the warning, which is the safe side.
//!
//! The worker holds the lock until the outcome is recorded in the spool (message removed, or
//! state written), not merely until the reply to the dot arrives: otherwise a deletion between
//! the two would report a delivered message as simply deleted. The kernel drops the lock when
//! the file is closed, so a crash leaves nothing stale behind, and the handshake costs two
//! system calls on an already open file (no file is created or removed per message).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io;
use std::os::fd::AsRawFd;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;

use super::{QueuedMessage, Spool, SpoolError, create_new, exact_id, give_to, hold, sync_dir};
use crate::envelope::{Address, QueueId, ReversePath};
use crate::failpoint;
use crate::policy::pattern::AddressPattern;

/// Prefix of retry request file names in `control/`.
const RETRY_PREFIX: &str = "retry.";
/// Name of the "retry everything" request.
const RETRY_ALL: &str = "retry.all";
/// Prefix of restore request file names in `control/`.
const RESTORE_PREFIX: &str = "restore.";
/// Prefix of adoption request file names in `control/` (`adopted.ID.FROM`).
const ADOPTED_PREFIX: &str = "adopted.";
/// Prefix of removal notice file names in `control/`.
const REMOVED_PREFIX: &str = "removed.";
/// Most removals listed in one notice (a line is at most 40 octets).
pub const NOTICE_MAX_IDS: usize = 10_000;
/// Largest removal notice read, in octets (a larger file is not one we wrote).
const MAX_NOTICE: u64 = 1024 * 1024;

/// How an operator removed a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RemovedHow {
    /// `queue delete ID`.
    Delete,
    /// `queue purge`.
    Purge,
    /// `queue purge --quarantine`: moved to `quarantine/`, not deleted.
    Quarantine,
}

impl RemovedHow {
    /// The word in a removal notice (and the `how` label of
    /// `portcullis_messages_removed_total`).
    pub fn as_str(self) -> &'static str {
        match self {
            RemovedHow::Delete => "delete",
            RemovedHow::Purge => "purge",
            RemovedHow::Quarantine => "quarantine",
        }
    }

    fn parse(word: &str) -> Option<RemovedHow> {
        match word {
            "delete" => Some(RemovedHow::Delete),
            "purge" => Some(RemovedHow::Purge),
            "quarantine" => Some(RemovedHow::Quarantine),
            _ => None,
        }
    }
}

/// One message an operator removed, as a removal notice lists it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Removal {
    pub id: QueueId,
    pub how: RemovedHow,
    /// When, in Unix milliseconds.
    pub at_ms: u64,
}

/// Which messages a retry request is about.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RetryTarget {
    /// Every queued message.
    All,
    /// These messages (sorted, no duplicates, when returned by [`Spool::take_requests`]).
    Ids(Vec<QueueId>),
}

/// A request from an operator to the running relay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Request {
    /// Make these messages due now, overriding back-off, and reset the circuit breaker of
    /// their upstream.
    Retry(RetryTarget),
    /// Hold (true: not delivered, bounced or expired until released) or release (false: due
    /// now) each message of `asks`, in the order asked: when a message is named more than
    /// once, the last wins (see [`super::hold`]). `files` are the `holds.SEQ.NONCE` files
    /// they were read from, in `SEQ` order, each with the number of asks it gave (the last
    /// ones of `asks`; those before come from an earlier version's `hold.ID` and
    /// `release.ID`), still in `control/`: unlink them with [`Spool::finish_holds`] once
    /// their asks are recorded, so that a crash before that finds them again at the next start.
    Holds {
        asks: Vec<(QueueId, bool)>,
        files: Vec<(PathBuf, usize)>,
    },
    /// A `queue delete` or `queue purge` removed these messages.
    Removed(Vec<Removal>),
    /// `queue restore` put these messages back into `queue/` (sorted, no duplicates): load
    /// and schedule them.
    Restore(Vec<QueueId>),
    /// `queue adopt` imported these messages: (id here, id in the spool they came from),
    /// sorted, no duplicates. Load and schedule them.
    Adopted(Vec<(QueueId, QueueId)>),
}

/// One file of `control/`, understood.
enum Parsed {
    RetryAll,
    Retry(QueueId),
    /// A `hold.ID` (true) or `release.ID` (false) of an earlier version.
    LegacyHold(QueueId, bool),
    /// `holds.SEQ.NONCE`: hold and release requests, in the order of `SEQ`.
    Holds(u64),
    Restore(QueueId),
    Adopted(QueueId, QueueId),
    Removed,
}

/// The request a `control/` file name stands for, if any.
fn parse_request(name: &str) -> Option<Parsed> {
    if name == RETRY_ALL {
        return Some(Parsed::RetryAll);
    }
    if name.strip_prefix(REMOVED_PREFIX).is_some_and(|nonce| {
        !nonce.is_empty()
            && nonce
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-')
    }) {
        return Some(Parsed::Removed);
    }
    if let Some(seq) = hold::batch_seq(name) {
        return Some(Parsed::Holds(seq));
    }
    if let Some((id, hold)) = hold::legacy_request(name) {
        return Some(Parsed::LegacyHold(id, hold));
    }
    if let Some((id, from)) = name
        .strip_prefix(ADOPTED_PREFIX)
        .and_then(|rest| rest.split_once('.'))
        .and_then(|(id, from)| Some((exact_id(id)?, exact_id(from)?)))
    {
        return Some(Parsed::Adopted(id, from));
    }
    let id = |prefix: &str| name.strip_prefix(prefix).and_then(exact_id);
    id(RETRY_PREFIX)
        .map(Parsed::Retry)
        .or_else(|| id(RESTORE_PREFIX).map(Parsed::Restore))
}

/// What [`Spool::delete`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteOutcome {
    /// The message was removed before any worker sent its final dot (a worker holding it
    /// aborts its transaction).
    Deleted,
    /// The message was removed, but a worker had already sent (or was sending) its final dot:
    /// the upstream may have accepted it.
    DeletedMaybeSent,
    /// No such message was queued.
    NotFound,
}

/// Remove a `control/` entry; false when it was already gone (taken by a concurrent caller).
fn take_file(entry: &fs::DirEntry) -> Result<bool, SpoolError> {
    let path = entry.path();
    let removed = if entry.file_type().is_ok_and(|t| t.is_dir()) {
        fs::remove_dir_all(&path)
    } else {
        fs::remove_file(&path)
    };
    match removed {
        Ok(()) => Ok(true),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(false),
        Err(e) => Err(SpoolError::io("unlink", &path)(e)),
    }
}

/// Which messages `queue purge` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PurgeFilter {
    /// Every queued message.
    All,
    /// Messages from the null sender `<>` (bounces), given as `--from '<>'`.
    NullSender,
    /// Messages whose envelope sender is this address, or (`--from @DOMAIN`) in this domain,
    /// compared as [`AddressPattern::matches`] does everywhere else: the canonical domain
    /// (A-label, lower case; subdomains do not match), an ASCII local part ignoring case, a
    /// non-ASCII one byte for byte. (The interface contract in DESIGN.md says "exactly, domain
    /// case-insensitive"; this departs from it on purpose so that every comparison of an
    /// address in the relay is the same one: what the relay check and sender ownership treat
    /// as one mailbox, purge treats as one too.)
    Sender(AddressPattern),
}

/// Why a `--from` argument is not a filter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("--from {0:?} is not an address, @domain or <>")]
pub struct BadPurgeFilter(pub String);

impl PurgeFilter {
    /// Parse a `--from` argument: `<>` for the null sender, `@DOMAIN` for a whole domain
    /// (U-label or A-label), otherwise an address in its RFC 5321 form, quoted local part
    /// included (surrounding angle brackets allowed, a trailing dot on the domain ignored, as
    /// at MAIL FROM).
    pub fn parse_from(arg: &str) -> Result<PurgeFilter, BadPurgeFilter> {
        let bad = || BadPurgeFilter(arg.to_string());
        if arg == "<>" {
            return Ok(PurgeFilter::NullSender);
        }
        if arg.starts_with('@') {
            return AddressPattern::parse(arg)
                .map(PurgeFilter::Sender)
                .ok_or_else(bad);
        }
        let bare = match (arg.strip_prefix('<'), arg.ends_with('>')) {
            (Some(inner), true) => &inner[..inner.len() - 1],
            (None, false) => arg,
            // One bracket without the other is a typo, not a strange local part.
            _ => return Err(bad()),
        };
        Address::parse(bare)
            .map(|a| PurgeFilter::Sender(AddressPattern::Address(a)))
            .map_err(|_| bad())
    }

    /// True when a message from `sender` is selected.
    pub fn matches(&self, sender: &ReversePath) -> bool {
        match (self, sender) {
            (PurgeFilter::All, _) => true,
            (PurgeFilter::NullSender, ReversePath::Null) => true,
            (PurgeFilter::Sender(want), ReversePath::Address(got)) => want.matches(got),
            _ => false,
        }
    }
}

/// One message selected by [`Spool::purge`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Purged {
    /// The queue id.
    pub id: QueueId,
    /// Its envelope sender.
    pub sender: ReversePath,
    /// What the deletion did; `None` in a dry run.
    pub outcome: Option<DeleteOutcome>,
}

/// `queue/ID`, held open by a delivery worker for its whole attempt; the final-dot handshake
/// with [`Spool::delete`] locks it (see the module docs). Dropping it releases the lock.
#[derive(Debug)]
pub struct SendLock {
    id: QueueId,
    file: File,
    /// `queue/ID`, where the file must still be when its final dot is sent.
    path: std::path::PathBuf,
}

impl SendLock {
    pub(super) fn new(id: QueueId, file: File, path: std::path::PathBuf) -> Self {
        SendLock { id, file, path }
    }

    /// The message this lock is on.
    pub fn id(&self) -> &QueueId {
        &self.id
    }

    /// Called right before the final dot: takes the shared lock, then checks that the message
    /// is still queued: linked, and still `queue/ID` (a quarantine moves the file, which
    /// keeps its link). `false` means it was deleted or quarantined, or is being: abort the
    /// transaction (RSET) and drop the message. The lock stays held until `self` is dropped,
    /// which must come after the outcome is recorded in the spool. Three system calls, no
    /// I/O.
    pub fn begin_final_dot(&self) -> Result<bool, SpoolError> {
        if !try_flock(&self.file, libc::LOCK_SH).map_err(|e| self.error("flock", e))? {
            return Ok(false);
        }
        let meta = self.file.metadata().map_err(|e| self.error("stat", e))?;
        let here = match std::fs::symlink_metadata(&self.path) {
            Ok(at) => at.dev() == meta.dev() && at.ino() == meta.ino(),
            Err(e) if e.kind() == io::ErrorKind::NotFound => false,
            Err(e) => return Err(self.error("stat", e)),
        };
        Ok(meta.nlink() > 0 && here)
    }

    fn error(&self, op: &'static str, source: io::Error) -> SpoolError {
        SpoolError::Io {
            op,
            path: std::path::PathBuf::from(format!("queue/{}", self.id)),
            source,
        }
    }
}

/// `flock(file, how | LOCK_NB)`: `Ok(false)` when another open file holds a conflicting lock.
pub(super) fn try_flock(file: &File, how: libc::c_int) -> io::Result<bool> {
    // SAFETY: flock only reads its arguments; the descriptor is open for as long as `file`.
    if unsafe { libc::flock(file.as_raw_fd(), how | libc::LOCK_NB) } == 0 {
        return Ok(true);
    }
    let e = io::Error::last_os_error();
    if e.kind() == io::ErrorKind::WouldBlock {
        Ok(false)
    } else {
        Err(e)
    }
}

impl Spool {
    /// Ask the running relay to retry `target` now (see the module docs). Blocking: writes
    /// and fsyncs. Does not check that the messages exist; the relay ignores ids it does not
    /// hold.
    ///
    /// When it fails, the requests it renamed into `control/` are unlinked again, so that a
    /// command that says it failed has asked nothing (a failed directory fsync leaves them
    /// visible but not durable). Best effort: one the relay took meanwhile is acted on, which
    /// is harmless, since a retry asked twice is one retry.
    pub fn request_retry(&self, target: &RetryTarget) -> Result<(), SpoolError> {
        let names: Vec<String> = match target {
            RetryTarget::All => vec![RETRY_ALL.to_owned()],
            RetryTarget::Ids(ids) => ids.iter().map(|id| format!("{RETRY_PREFIX}{id}")).collect(),
        };
        let mut written = 0;
        let result = names
            .iter()
            .try_for_each(|name| {
                self.write_request(name, &[])?;
                written += 1;
                Ok(())
            })
            .and_then(|()| self.sync_control());
        if result.is_err() {
            for name in &names[..written] {
                let _ = fs::remove_file(self.inner.control.join(name));
            }
        }
        result
    }

    /// fsync `control/`, making the requests renamed into it durable.
    pub(super) fn sync_control(&self) -> Result<(), SpoolError> {
        let dir = &self.inner.control;
        failpoint::step("control.dir_fsync").map_err(SpoolError::io("fsync", dir))?;
        sync_dir(dir)
    }

    /// Put the file `name` into `control/`: made in `tmp/` with `contents` (fsynced when
    /// there are any: a removal notice, a batch of holds), given to the relay's user, renamed
    /// in. The caller syncs the directory.
    pub(super) fn write_request(&self, name: &str, contents: &[u8]) -> Result<(), SpoolError> {
        use std::io::Write as _;
        let tmp = self.temp_path(name);
        let mut file = create_new(&tmp)?;
        let written = failpoint::step("control.write")
            .and_then(|()| {
                if contents.is_empty() {
                    Ok(())
                } else {
                    file.write_all(contents).and_then(|()| file.sync_data())
                }
            })
            .map_err(SpoolError::io("write", &tmp));
        drop(file);
        // Run as root on the relay's spool, the request must still be the relay's to remove.
        if let Err(e) = written.and_then(|()| give_to(&tmp, self.inner.owner)) {
            let _ = fs::remove_file(&tmp);
            return Err(e);
        }
        let dest = self.inner.control.join(name);
        let renamed = failpoint::step("control.rename").and_then(|()| fs::rename(&tmp, &dest));
        renamed.map_err(|e| {
            let _ = fs::remove_file(&tmp);
            SpoolError::io("rename", &dest)(e)
        })
    }

    /// Ask the running relay to load the messages `queue restore` put back and schedule them
    /// (`restore.ID`, as [`Spool::request_retry`]). Blocking.
    pub fn request_restore(&self, ids: &[QueueId]) -> Result<(), SpoolError> {
        for id in ids {
            self.write_request(&format!("{RESTORE_PREFIX}{id}"), &[])?;
        }
        self.sync_control()
    }

    /// Ask the running relay to load the messages `queue adopt` imported and schedule them
    /// (`adopted.ID.FROM` for each (id here, id it came with), as [`Spool::request_retry`]).
    /// Blocking.
    pub fn request_adopted(&self, ids: &[(QueueId, QueueId)]) -> Result<(), SpoolError> {
        for (id, from) in ids {
            self.write_request(&format!("{ADOPTED_PREFIX}{id}.{from}"), &[])?;
        }
        self.sync_control()
    }

    /// Consume the pending operator requests: each file in `control/` is read and unlinked
    /// before this returns, so act on every request returned; except the batches of holds
    /// (`holds.SEQ.NONCE`), which stay until [`Spool::finish_holds`] (a crash between taking
    /// and recording a hold must not lose it), and are not read again while their path is in
    /// `applied` (the files taken and applied already by this process). Retries are merged into at
    /// most one [`Request::Retry`] (first); then the holds and releases, merged into at most
    /// one [`Request::Holds`] in the order they were asked (those of an earlier version's
    /// `hold.ID`/`release.ID` first, then each `holds.SEQ.NONCE` by `SEQ`); then removal
    /// notices ([`Request::Removed`], one per notice) in name order; restores, merged
    /// into one [`Request::Restore`]; adoptions last, merged into one [`Request::Adopted`]. Unknown names are removed with a warning, and so is a
    /// file with contents (a notice, a batch of holds) the relay's user did not write
    /// (unread). Blocking.
    pub fn take_requests(&self, applied: &HashSet<PathBuf>) -> Result<Vec<Request>, SpoolError> {
        let dir = &self.inner.control;
        let mut entries: Vec<fs::DirEntry> = fs::read_dir(dir)
            .map_err(SpoolError::io("readdir", dir))?
            .collect::<Result<_, _>>()
            .map_err(SpoolError::io("readdir", dir))?;
        entries.sort_by_key(fs::DirEntry::file_name);
        let mut taken = Taken::default();
        // A batch of holds that cannot be opened now stops the later ones (in name order,
        // which is SEQ order) for this pass: they are applied after it, never before.
        let mut holds_blocked = false;
        for entry in entries {
            let path = entry.path();
            let parsed = entry.file_name().to_str().and_then(parse_request);
            if let Some(Parsed::Holds(seq)) = parsed {
                // Left in place until its holds are recorded (Spool::finish_holds); read
                // once per start.
                if !applied.contains(&path) && !holds_blocked {
                    match self.open_contents(&path) {
                        Ok(Some(contents)) => {
                            taken.add(Parsed::Holds(seq), Some(contents), &path);
                        }
                        Ok(None) => _ = take_file(&entry)?,
                        Err(()) => holds_blocked = true,
                    }
                }
                continue;
            }
            // A file with contents is opened before its unlink and read after it (see the
            // module docs).
            let contents = match parsed {
                Some(Parsed::Removed) => match self.open_contents(&path) {
                    Ok(contents) => contents,
                    Err(()) => continue,
                },
                _ => None,
            };
            if !take_file(&entry)? {
                // Consumed by a concurrent caller: it acts on it.
                continue;
            }
            match parsed {
                Some(parsed) => taken.add(parsed, contents, &path),
                None => {
                    tracing::warn!(path = %path.display(), "removed unknown file from the spool control directory")
                }
            }
        }
        Ok(taken.into_requests())
    }

    /// Unlink the `holds.SEQ.NONCE` files of [`Request::Holds`] once their holds are
    /// recorded, oldest first, then fsync `control/` once: a crash before that fsync may
    /// leave some of them, which the next start applies again, in order. Stops at the first
    /// failure: the files from there on stay. Blocking.
    pub fn finish_holds(&self, files: &[PathBuf]) -> Result<(), SpoolError> {
        for file in files {
            match fs::remove_file(file) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => {
                    return Err(SpoolError::io("unlink", file)(e));
                }
                _ => {}
            }
        }
        self.sync_control()
    }

    /// Tell the relay that `ids` were removed `how`, now (see the module docs): one notice
    /// per [`NOTICE_MAX_IDS`] ids, nothing when `ids` is empty. Blocking: writes and fsyncs.
    pub fn notify_removed(&self, how: RemovedHow, ids: &[QueueId]) -> Result<(), SpoolError> {
        if ids.is_empty() {
            return Ok(());
        }
        let at_ms = crate::observe::event::unix_millis();
        for chunk in ids.chunks(NOTICE_MAX_IDS) {
            let mut text = String::with_capacity(chunk.len() * 40);
            for id in chunk {
                text.push_str(&format!("{} {id} {at_ms}\n", how.as_str()));
            }
            let n = super::TEMP_COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            let name = format!("{REMOVED_PREFIX}{}-{n}-{at_ms}", std::process::id());
            self.write_request(&name, text.as_bytes())?;
        }
        self.sync_control()
    }

    /// Open the request file (a removal notice, a batch of holds) at `path` if the relay's
    /// user wrote it (else it is removed unread, with a warning).
    /// `Ok(None)`: not the relay's, to be removed unread; `Err`: it cannot be opened now
    /// (e.g. out of file descriptors), left for the next pass; both logged.
    fn open_contents(&self, path: &std::path::Path) -> Result<Option<File>, ()> {
        match super::open_trusted(path, self.inner.owner.0, false) {
            Ok(file) => Ok(Some(file)),
            Err(super::Opened::Untrusted(reason)) => {
                tracing::warn!(path = %path.display(), reason, "control file not written by the relay; removing it unread");
                Ok(None)
            }
            Err(super::Opened::Io(e)) => {
                tracing::warn!(path = %path.display(), error = %e, "cannot open a control file; tried again");
                Err(())
            }
        }
    }

    /// True when `queue/ID` exists (a committed message, possibly leaving at this moment).
    pub fn contains(&self, id: &QueueId) -> bool {
        fs::symlink_metadata(self.message_path(id)).is_ok()
    }

    /// Delete a message on an operator's command: unlink `queue/ID` (the commit point), then
    /// `ID.state`, fsync `queue/`; then report whether a worker had begun its final dot (see
    /// the module docs). The caller reports the deletion (DESIGN invariant 2). Blocking.
    pub fn delete(&self, id: &QueueId) -> Result<DeleteOutcome, SpoolError> {
        let path = self.message_path(id);
        // Opened before the unlink, so the lock can still be asked for afterwards.
        let file = match File::open(&path) {
            Ok(file) => Some(file),
            Err(e) if e.kind() == io::ErrorKind::NotFound => None,
            Err(e) => return Err(SpoolError::io("open", &path)(e)),
        };
        match self.remove(id) {
            Ok(()) => {}
            Err(SpoolError::NotFound(_)) => return Ok(DeleteOutcome::NotFound),
            Err(e) => return Err(e),
        }
        let sending = match &file {
            Some(file) => {
                !try_flock(file, libc::LOCK_EX).map_err(SpoolError::io("flock", &path))?
            }
            // Created between our open and unlink: no worker had it long enough to send it.
            None => false,
        };
        Ok(if sending {
            DeleteOutcome::DeletedMaybeSent
        } else {
            DeleteOutcome::Deleted
        })
    }

    /// Delete every message `filter` selects (see [`Spool::delete`]), or with `dry_run` only
    /// list them; in queue order. A message that leaves the queue meanwhile is reported with
    /// [`DeleteOutcome::NotFound`]. The caller tells the relay what was removed
    /// ([`Spool::notify_removed`]); when a deletion fails, this tells it about those removed
    /// before, then returns the error. Blocking.
    pub fn purge(&self, filter: &PurgeFilter, dry_run: bool) -> Result<Vec<Purged>, SpoolError> {
        self.purge_where(|m| filter.matches(&m.envelope.mail_from), dry_run)
    }

    /// [`Spool::purge`] of the messages `select` picks (e.g. a [`super::select::Selection`]).
    pub fn purge_where(
        &self,
        select: impl Fn(&QueuedMessage) -> bool,
        dry_run: bool,
    ) -> Result<Vec<Purged>, SpoolError> {
        let selected: Vec<QueuedMessage> = self.list()?.into_iter().filter(select).collect();
        let mut out = Vec::with_capacity(selected.len());
        let mut removed = Vec::new();
        let mut failure = None;
        for m in selected {
            let outcome = if dry_run {
                None
            } else {
                match self.delete(m.id()) {
                    Ok(outcome) => Some(outcome),
                    Err(e) => {
                        // Gone all the same when a step after its unlink failed (see
                        // `queue delete` in main.rs): the relay hears of it too.
                        if !self.contains(m.id()) {
                            removed.push(m.envelope.id.clone());
                        }
                        failure = Some(e);
                        break;
                    }
                }
            };
            if outcome.is_some_and(|o| o != DeleteOutcome::NotFound) {
                removed.push(m.envelope.id.clone());
            }
            out.push(Purged {
                id: m.envelope.id,
                sender: m.envelope.mail_from,
                outcome,
            });
        }
        match failure {
            Some(e) => {
                // The error is the one to report; the relay still hears of those removed.
                let _ = self.notify_removed(RemovedHow::Purge, &removed);
                Err(e)
            }
            None => Ok(out),
        }
    }
}

/// One `holds.SEQ.NONCE` file: its `SEQ`, its requests and its path.
type HoldBatch = (u64, Vec<(QueueId, bool)>, PathBuf);

/// The requests of one pass of [`Spool::take_requests`], as they are taken.
#[derive(Default)]
struct Taken {
    /// Someone asked `retry.all`.
    all: bool,
    retries: Vec<QueueId>,
    /// `hold.ID` (true) and `release.ID` (false) of an earlier version, in name order.
    legacy_holds: Vec<(QueueId, bool)>,
    /// Each `holds.SEQ.NONCE`, left in `control/`.
    hold_batches: Vec<HoldBatch>,
    removed: Vec<Request>,
    restores: Vec<QueueId>,
    adopted: Vec<(QueueId, QueueId)>,
}

impl Taken {
    /// Add the request of a file already unlinked; `contents`: the file, opened before the
    /// unlink, of a request that has contents (`None` when it was not to be read).
    fn add(&mut self, parsed: Parsed, contents: Option<File>, path: &std::path::Path) {
        match parsed {
            Parsed::Removed => {
                if let Some(file) = contents {
                    self.removed.push(Request::Removed(read_notice(file, path)));
                }
            }
            Parsed::Holds(seq) => {
                if let Some(file) = contents {
                    let asks = hold::read_batch(file, path);
                    self.hold_batches.push((seq, asks, path.to_path_buf()));
                }
            }
            Parsed::RetryAll => self.all = true,
            Parsed::Retry(id) => self.retries.push(id),
            Parsed::LegacyHold(id, hold) => self.legacy_holds.push((id, hold)),
            Parsed::Restore(id) => self.restores.push(id),
            Parsed::Adopted(id, from) => self.adopted.push((id, from)),
        }
    }

    /// The requests in the order [`Spool::take_requests`] documents.
    fn into_requests(mut self) -> Vec<Request> {
        self.retries.sort();
        self.retries.dedup();
        let retry = if self.all {
            Some(RetryTarget::All)
        } else {
            (!self.retries.is_empty()).then_some(RetryTarget::Ids(self.retries))
        };
        // Stable: two batches with one sequence number (possible only if one was written
        // without the lock) keep their name order.
        self.hold_batches.sort_by_key(|(seq, _, _)| *seq);
        let mut asks = self.legacy_holds;
        let mut files = Vec::with_capacity(self.hold_batches.len());
        for (_, batch, path) in self.hold_batches {
            files.push((path, batch.len()));
            asks.extend(batch);
        }
        let holds =
            (!asks.is_empty() || !files.is_empty()).then_some(Request::Holds { asks, files });
        self.restores.sort();
        self.restores.dedup();
        // Last: a removal notice read in the same pass is older than the restore.
        let restore = (!self.restores.is_empty()).then_some(Request::Restore(self.restores));
        self.adopted.sort();
        self.adopted.dedup();
        let adopted = (!self.adopted.is_empty()).then_some(Request::Adopted(self.adopted));
        retry
            .map(Request::Retry)
            .into_iter()
            .chain(holds)
            .chain(self.removed)
            .chain(restore)
            .chain(adopted)
            .collect()
    }
}

/// The removals a notice lists (read through `file`, already unlinked); a line that is not
/// `HOW ID UNIX_MS` is skipped with a warning, and at most [`MAX_NOTICE`] octets are read.
fn read_notice(file: File, path: &std::path::Path) -> Vec<Removal> {
    use std::io::Read as _;
    let mut text = String::new();
    if let Err(e) = file.take(MAX_NOTICE).read_to_string(&mut text) {
        tracing::warn!(path = %path.display(), error = %e, "cannot read a removal notice");
    }
    let mut removals = Vec::new();
    for line in text.lines() {
        match parse_removal(line) {
            Some(r) => removals.push(r),
            None => {
                tracing::warn!(path = %path.display(), line = %line.escape_debug(), "not a removal in a removal notice")
            }
        }
    }
    removals
}

/// One line of a removal notice: `delete ID UNIX_MS`, `purge ID UNIX_MS` or `quarantine ID
/// UNIX_MS`.
fn parse_removal(line: &str) -> Option<Removal> {
    let mut words = line.split(' ');
    let how = RemovedHow::parse(words.next()?)?;
    let id = exact_id(words.next()?)?;
    let at_ms = words.next()?.parse().ok()?;
    words.next().is_none().then_some(Removal { id, how, at_ms })
}

#[cfg(test)]
mod tests {
    use std::os::unix::fs::PermissionsExt as _;

    use super::*;

    fn spool() -> (tempfile::TempDir, Spool) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        (dir, spool)
    }

    /// Every removal the pending requests list, in order.
    fn removals(spool: &Spool) -> Vec<Removal> {
        let mut out = Vec::new();
        for request in spool.take_requests(&Default::default()).unwrap() {
            match request {
                Request::Removed(list) => out.extend(list),
                other => panic!("not a removal: {other:?}"),
            }
        }
        out
    }

    #[test]
    fn removal_notices_are_read_once_in_chunks_and_leave_nothing_behind() {
        let (_dir, spool) = spool();
        let ids: Vec<QueueId> = (0..=NOTICE_MAX_IDS).map(|_| QueueId::generate()).collect();
        let before = crate::observe::event::unix_millis();
        spool.notify_removed(RemovedHow::Purge, &ids).unwrap();
        spool.notify_removed(RemovedHow::Delete, &ids[..1]).unwrap();
        spool.notify_removed(RemovedHow::Delete, &[]).unwrap();
        let control = spool.root().join("control");
        assert_eq!(fs::read_dir(&control).unwrap().count(), 3);

        let got = removals(&spool);
        assert_eq!(got.len(), ids.len() + 1);
        let purged: Vec<&QueueId> = got
            .iter()
            .filter(|r| r.how == RemovedHow::Purge)
            .map(|r| &r.id)
            .collect();
        assert_eq!(purged, ids.iter().collect::<Vec<_>>());
        assert!(got.iter().all(|r| r.at_ms >= before));
        assert_eq!(fs::read_dir(&control).unwrap().count(), 0);
        assert!(spool.take_requests(&Default::default()).unwrap().is_empty());
    }

    #[test]
    fn a_damaged_or_foreign_removal_notice_yields_only_its_valid_lines() {
        let (_dir, spool) = spool();
        let id = QueueId::generate();
        let control = spool.root().join("control");
        let text = format!(
            "delete {id} 1700000000000\nrestore {id} 1\ndelete ../../etc 1\npurge {id}\n\
             purge {id} 12 extra\n\u{202e}delete {id} 1\npurge {} 5\n",
            id.as_str().to_lowercase()
        );
        fs::write(control.join("removed.1-2-3"), text).unwrap();
        let got = removals(&spool);
        assert_eq!(
            got,
            [Removal {
                id: id.clone(),
                how: RemovedHow::Delete,
                at_ms: 1_700_000_000_000,
            }]
        );
        // Group-writable: not the relay's; removed unread. A name with a path in it is no
        // notice either.
        let path = control.join("removed.4-5-6");
        fs::write(&path, format!("delete {id} 1\n")).unwrap();
        fs::set_permissions(&path, fs::Permissions::from_mode(0o620)).unwrap();
        fs::write(control.join("removed."), format!("delete {id} 1\n")).unwrap();
        assert!(spool.take_requests(&Default::default()).unwrap().is_empty());
        assert_eq!(fs::read_dir(&control).unwrap().count(), 0);
    }
}

#[cfg(test)]
mod adopted_tests {
    use super::*;

    #[test]
    fn adoption_requests_name_both_ids_and_malformed_ones_are_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(&dir.path().join("spool")).unwrap();
        let (a, b, c) = (
            QueueId::generate(),
            QueueId::generate(),
            QueueId::generate(),
        );
        spool
            .request_adopted(&[(b.clone(), c.clone()), (a.clone(), a.clone())])
            .unwrap();
        spool.request_restore(std::slice::from_ref(&c)).unwrap();
        let control = spool.root().join("control");
        for bad in [
            format!("adopted.{a}"),
            format!("adopted.{a}."),
            format!("adopted.{a}.{b}.{c}"),
            format!("adopted.{}.{b}", a.as_str().to_lowercase()),
            "adopted..".to_owned(),
        ] {
            fs::write(control.join(bad), b"").unwrap();
        }
        let mut pairs = vec![(a.clone(), a), (b, c.clone())];
        pairs.sort();
        assert_eq!(
            spool.take_requests(&Default::default()).unwrap(),
            [Request::Restore(vec![c]), Request::Adopted(pairs)]
        );
        assert_eq!(fs::read_dir(&control).unwrap().count(), 0);
    }
}
