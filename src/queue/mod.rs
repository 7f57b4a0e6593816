//! The durable spool: one file per accepted message, committed before the client hears `250`.
//!
//! This module owns everything under the spool directory. It knows envelopes and message
//! bytes, not sockets or SMTP: the inbound driver streams DATA into a [`SpoolWriter`], the
//! queue manager ([`manager`]) decides when each message is attempted ([`schedule`], pure),
//! hands the attempt to the outbound side (an [`attempt::Courier`]) and records its outcome
//! with [`Spool::write_state`] ([`attempt`]), and the `queue` commands use [`report`].
//!
//! # On-disk format
//!
//! ```text
//! SPOOL/tmp/             messages being received (read by nobody but their writer)
//! SPOOL/queue/ID         committed messages, one file each
//! SPOOL/queue/ID.state   delivery progress (optional, replaced atomically)
//! SPOOL/rejected/        files recovery refused: unparseable, or not written by the relay
//!                        (wrong owner or mode, not a regular file); moved here, never deleted,
//!                        never delivered, listed or restored by any command
//! SPOOL/control/         operator requests to the running relay (`retry.ID`, `retry.all`,
//!                        `holds.SEQ.NONCE`, `restore.ID`, `adopted.ID.FROM`) and removal
//!                        notices (`removed.NONCE`)
//! SPOOL/quarantine/      messages `queue purge --quarantine` put aside (`ID`, `ID.state`,
//!                        `ID.quarantined`): never delivered, kept `[queue] quarantine_keep`,
//!                        put back by `queue restore` (see [`quarantine`])
//! SPOOL/relay.lock       locked by the running relay (see [`running`])
//! SPOOL/suspended/       suspended logins, one record each: written by containment and
//!                        `user suspend`, removed by `user resume` (see [`suspended`])
//! SPOOL/free/            files of finished messages, reused for new ones (see [`recycle`])
//! SPOOL/journal/         the message journal behind `portcullis trace`: event segments and
//!                        their indexes, bounded by `[log]` (see [`journal`])
//! SPOOL/upstream-capabilities.json   what each upstream last announced; written by
//!                        `crate::routes`, not by this module
//! SPOOL/alerts.json     the firing alerts, kept over a restart; written by
//!                        `crate::observe::alerts::state`, not by this module
//! SPOOL/audit.jsonl     the operator commands that changed something, one JSON line each
//!                        (and `audit.jsonl.1`, the previous 16 MiB); see [`audit`]
//! SPOOL/adoptions.jsonl  the messages `queue adopt` took from other nodes' spools (which id
//!                        there became which id here), so none is taken twice; see [`adopt`]
//! SPOOL/adopted          present only in a spool another node adopted: the relay refuses
//!                        to start on it (see [`adopt`])
//! ```
//!
//! A message file is the line `PORTCULLIS-SPOOL 1\n`, then the [`Envelope`] as one line of
//! JSON and `\n`, then the raw message bytes exactly as they will be sent upstream (CRLF line
//! endings, already un-dot-stuffed). The envelope is known before DATA starts, so the header is
//! written first and the message is streamed after it; the message size is the file length
//! minus the header length. `ID.state` is a JSON [`DeliveryState`]; when absent the message is
//! fresh (no attempts, due at its reception time).
//!
//! # Durability order (DESIGN invariant 1)
//!
//! [`SpoolWriter::commit`] does, in this order: flush the buffer, `fsync` the data
//! (`sync_data`), `rename(tmp/ID, queue/ID)`, `fsync` the `queue/` directory, and only then
//! returns. Why each step:
//!
//! - data fsync before rename: otherwise a power loss can leave a renamed, visible file whose
//!   blocks were never written (zero-length or holes) — a "committed" message that is garbage;
//! - rename as the commit point: it is atomic, so `queue/` only ever holds complete files and a
//!   crash leaves either a leftover in `tmp/` (removed by [`Spool::recover`]) or in `free/` (a
//!   reused file, junk until written over again; see the `recycle` module) or the whole file;
//! - directory fsync before replying: the rename itself is a change to the directory, and until
//!   the directory is on disk a crash may undo it, losing a message already acknowledged.
//!
//! If a step fails the caller answers with a temporary error (4xx) instead of `250`. If only
//! the final directory fsync fails the file is already visible in `queue/`: it is unlinked
//! again (no worker knows of it yet: the queue manager is handed a message only after a
//! commit succeeds), so it neither waits unscheduled until the next start nor goes out beside
//! the copy the client sends again. A crash before that unlink leaves it to recovery, and it
//! may then be delivered twice, which invariant 1 allows (at-least-once).
//! `ID.state` is replaced the same way (temp file in `tmp/`, fsync, rename, directory fsync).
//!
//! # Use from async code
//!
//! Every method here is blocking. [`SpoolWriter::write`] only appends to a 64 KiB buffer and the
//! page cache, so the relay calls it inline on the reactor. [`SpoolWriter::commit`] and
//! [`Spool::write_state`] wait for the disk (fsync) and must run inside
//! `tokio::task::spawn_blocking`; so should [`Spool::recover`], [`Spool::list`] and the reads
//! of whole messages.
//!
//! # Recovery
//!
//! [`Spool::recover`] runs once at startup, before any worker reads the queue: it empties
//! `tmp/`, moves whatever it does not understand or did not write in `queue/` to `rejected/`, and
//! removes state files whose message is gone. It never deletes a committed message (STYLE 10).
//!
//! # Who may write the spool
//!
//! A message file is trusted as written by the relay: its envelope carries `auth_user`, and it
//! is sent upstream without the `Received:` header or header firewall of a live session. So
//! only the relay's user may write the spool. [`Spool::check_safe`] (at startup) refuses a
//! spool directory or subdirectory that is group- or world-writable, not a directory, or owned
//! by another user than the relay's; every message and state file is checked when opened (see
//! `trust`): a file not owned by the spool's owner, with group or other write permission, or
//! not a regular file, is never read as a message. The spool's owner is the owner of the spool
//! directory, so a `queue` command run as root judges files as the relay does, and creates its
//! files for that owner (see [`Spool::open`]).
//!
//! Everything is safe to use from several processes at once (the relay and a `queue` command):
//! file names are unique per writer and every visible change is a single rename or unlink.
//! How the `queue retry|delete|purge` commands reach a running relay, and how a deletion is
//! coordinated with a worker sending the same message, is described in [`control`].
//!
//! # Bounces
//!
//! [`bounce`] builds RFC 3464 delivery status notifications (pure) and queues one with
//! [`Spool::enqueue`] like any other message ([`bounce::enqueue`]); [`schedule`] decides
//! whether one is due.
//!
//! # Hold
//!
//! A held message ([`DeliveryState::hold`]) is neither attempted, bounced nor expired until
//! released; the time it spends held pushes its expiry back. Holds are asked for through
//! `control/` ([`Spool::request_holds`]: one file names up to [`control::NOTICE_MAX_IDS`] messages, and
//! the last asked wins, see [`hold`]; `queue hold|release`, whose selection is [`select`]) and
//! written by the queue manager, which owns the state files of a
//! running relay: all the requests it reads at once together ([`Spool::record_holds`], in
//! `hold.rs`), before its first attempt at startup.
//!
//! Quarantine is not a queue state but a place: a quarantined message is moved out of
//! `queue/` into `quarantine/` with its state file unchanged ([`quarantine`]), so nothing that
//! reads the queue (the manager, the census, `queue list`, recovery) sees it, and `restore` gives
//! back the very files. A new queue state goes the way hold did: a field of [`DeliveryState`]
//! (absent from files that do not use it, so older spools read as before), a [`schedule::Plan`] that
//! [`schedule::plan`] answers for it, the [`attempt::AttemptEnd`] its attempt reports, what
//! the manager does then in [`schedule::after_attempt`], and how the [`census`] counts it
//! (apart from waiting messages, as held ones are).
//!
//! # Census
//!
//! The queue manager counts the queue as it changes ([`census`]: queued and held messages
//! per upstream, the oldest waiting, the top senders) for the telemetry, without rescanning
//! the spool.

#![warn(clippy::too_many_lines)]

pub mod adopt;
pub mod attempt;
pub mod audit;
pub mod bounce;
pub mod census;
pub mod control;
mod group;
pub mod hold;
pub mod journal;
pub mod manager;
pub mod quarantine;
mod recover;
mod recycle;
pub mod report;
pub mod reserve;
pub mod running;
pub mod schedule;
pub mod select;
mod state;
pub mod suspended;
mod writer;

use std::ffi::CString;
use std::fs::{self, File, OpenOptions};
use std::io::{self, BufRead, BufReader, Read, Seek, SeekFrom, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use crate::envelope::{Body, Envelope, QueueId};
use crate::failpoint;

pub use control::{
    BadPurgeFilter, DeleteOutcome, PurgeFilter, Purged, Removal, RemovedHow, Request, RetryTarget,
    SendLock,
};
pub use recover::RecoveryReport;
pub use state::{Attempt, DeliveryState, Hold, StateMismatch};
pub use writer::{Committed, SpoolWriter, WrittenMessage};

/// First line of every message file: format name and version.
pub const MAGIC: &[u8] = b"PORTCULLIS-SPOOL 1\n";

/// Longest envelope line accepted when reading a message file (bounds memory on a damaged or
/// hostile file). A legal envelope with hundreds of 256-octet recipients is far smaller.
pub const MAX_ENVELOPE_LINE: u64 = 1024 * 1024;

/// Longest `ID.state` file read. The history grows by one short entry per attempt and retries
/// stop at `queue.max_age`, so a real state file stays far below this.
pub const MAX_STATE_FILE: u64 = 4 * 1024 * 1024;

/// Most threads [`Spool::list`] reads a large queue on.
const LIST_THREADS: usize = 4;
/// Fewest messages per thread of [`Spool::list`] (a small queue is read on one thread).
const LIST_PER_THREAD: usize = 4096;

/// Suffix of delivery state files in `queue/`.
pub const STATE_SUFFIX: &str = ".state";

/// The subdirectories of the spool (see the module docs).
const SUBDIRS: [&str; 7] = [
    "tmp",
    "queue",
    "rejected",
    "control",
    "free",
    quarantine::DIR,
    suspended::DIR,
];

/// Permissions of spool directories: messages are private to the relay's user.
const DIR_MODE: u32 = 0o700;
/// Permissions of spool files.
const FILE_MODE: u32 = 0o600;

/// Mode bits that let someone other than the owner write (group and other write).
const FOREIGN_WRITE: u32 = 0o022;

/// Per-process counter making temp file names unique (with the pid).
static TEMP_COUNTER: AtomicU64 = AtomicU64::new(0);

/// Errors of the spool. I/O errors are temporary (the client gets 4xx and retries); the rest
/// describe a message that is absent or unreadable.
#[derive(Debug, thiserror::Error)]
pub enum SpoolError {
    /// A file system operation failed; `op` names it (e.g. `fsync`, `rename`), `path` is the
    /// file or directory involved.
    #[error("spool {op} {}: {source}", path.display())]
    Io {
        /// The operation that failed.
        op: &'static str,
        /// The file or directory it was applied to.
        path: PathBuf,
        /// The underlying error.
        #[source]
        source: io::Error,
    },
    /// No committed message has this id.
    #[error("no queued message {0}")]
    NotFound(QueueId),
    /// A committed message with this id already exists (an id collision: retrying with a
    /// fresh id succeeds).
    #[error("queued message {0} already exists")]
    AlreadyExists(QueueId),
    /// A spool file does not have the expected format.
    #[error("corrupt spool file {}: {reason}", path.display())]
    Corrupt {
        /// The file that failed to parse.
        path: PathBuf,
        /// What was wrong with it.
        reason: String,
    },
    /// A spool file was not written by the relay (wrong owner, group- or world-writable, not a
    /// regular file): it is never read as a message (recovery moves it to `rejected/`).
    #[error("untrusted spool file {}: {reason}", path.display())]
    Untrusted {
        /// The file.
        path: PathBuf,
        /// Which check failed (owner, mode, file type).
        reason: String,
    },
    /// The spool directory or one of its subdirectories may be written by someone other than
    /// the relay's user: the relay refuses to start (exit status 2).
    #[error("unsafe spool directory {}: {problem}; fix: {fix}", path.display())]
    Unsafe {
        /// The directory.
        path: PathBuf,
        /// What is wrong with it.
        problem: String,
        /// The command that fixes it (e.g. `chmod 700 PATH`).
        fix: String,
    },
    /// An envelope or state could not be encoded as JSON.
    #[error("cannot encode {what} as JSON: {source}")]
    Encode {
        /// What was being encoded (`envelope`, `state`).
        what: &'static str,
        /// The underlying error.
        #[source]
        source: serde_json::Error,
    },
}

impl SpoolError {
    /// True when retrying later may succeed (I/O trouble, id collision): the SMTP reply is 4xx.
    pub fn is_temporary(&self) -> bool {
        match self {
            SpoolError::Io { .. } | SpoolError::AlreadyExists(_) => true,
            SpoolError::NotFound(_)
            | SpoolError::Corrupt { .. }
            | SpoolError::Untrusted { .. }
            | SpoolError::Unsafe { .. }
            | SpoolError::Encode { .. } => false,
        }
    }

    fn io(op: &'static str, path: &Path) -> impl FnOnce(io::Error) -> SpoolError {
        let path = path.to_path_buf();
        move |source| SpoolError::Io { op, path, source }
    }

    fn corrupt(path: &Path, reason: impl Into<String>) -> SpoolError {
        SpoolError::Corrupt {
            path: path.to_path_buf(),
            reason: reason.into(),
        }
    }
}

/// One committed message as read from the spool.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QueuedMessage {
    /// The envelope written at DATA time.
    pub envelope: Envelope,
    /// Delivery progress (fresh when there is no state file).
    pub state: DeliveryState,
    /// Size of the message bytes (without the spool header).
    pub size: u64,
    /// Path of the message file.
    pub path: PathBuf,
}

impl QueuedMessage {
    /// The queue id.
    pub fn id(&self) -> &QueueId {
        &self.envelope.id
    }

    /// Addresses of the recipients still pending.
    pub fn pending(&self) -> impl Iterator<Item = &crate::envelope::Address> {
        self.state.pending(&self.envelope)
    }
}

/// What a delivery attempt works from: the message, its bytes when small enough to hold in
/// memory, and the open `queue/ID` as its [`SendLock`]. From [`Spool::load_with_body`], or
/// straight from [`SpoolWriter::commit_and_keep`] for a message just received.
#[derive(Debug)]
pub struct Loaded {
    pub msg: QueuedMessage,
    pub body: Option<Vec<u8>>,
    pub lock: SendLock,
}

/// Handle on a spool directory. Cheap to clone (an `Arc` inside) and shareable across threads.
#[derive(Debug, Clone)]
pub struct Spool {
    inner: Arc<Dirs>,
}

#[derive(Debug)]
struct Dirs {
    root: PathBuf,
    tmp: PathBuf,
    queue: PathBuf,
    rejected: PathBuf,
    control: PathBuf,
    /// Owner (uid, gid) of the spool directory: the relay's user. Files not owned by it are
    /// never read as messages; files a `queue` command run as root creates are given to it.
    owner: (u32, u32),
    /// `free/`, the files kept for reuse.
    free: recycle::FreePool,
    /// Shared fsyncs of `queue/` for commits.
    queue_sync: group::DirSync,
    /// Space promised to messages in flight (see [`reserve`]).
    space: Arc<reserve::SpaceReserve>,
}

impl Spool {
    /// Open the spool at `root` for writing, creating it and `tmp/`, `queue/`, `rejected/`,
    /// `control/` and `free/` (mode 0700) when missing, and check that it is writable by
    /// creating and removing a probe file in `tmp/`. Does not run recovery. What it creates
    /// is given to the owner of `root` when that is not the caller (a `queue` command run as
    /// root on the relay's spool), so the relay can still write it. Loads `free/` for reuse:
    /// for the relay only (see [`Spool::open_for_command`]).
    pub fn open(root: &Path) -> Result<Spool, SpoolError> {
        Spool::open_with(root, true)
    }

    /// [`Spool::open`] for a `queue` command that writes, beside a running relay: `free/` is
    /// neither read nor changed (it is the relay's; a command unlinks, it never recycles).
    pub fn open_for_command(root: &Path) -> Result<Spool, SpoolError> {
        Spool::open_with(root, false)
    }

    fn open_with(root: &Path, recycle: bool) -> Result<Spool, SpoolError> {
        let mut builder = fs::DirBuilder::new();
        builder.recursive(true).mode(DIR_MODE);
        builder
            .create(root)
            .map_err(SpoolError::io("mkdir", root))?;
        let owner = owner_of(root)?;
        for sub in SUBDIRS {
            let dir = root.join(sub);
            if fs::symlink_metadata(&dir).is_ok() {
                continue;
            }
            builder
                .create(&dir)
                .map_err(SpoolError::io("mkdir", &dir))?;
            give_to(&dir, owner)?;
        }
        let free = root.join("free");
        let pool = if recycle {
            recycle::FreePool::load(&free, owner.0).map_err(SpoolError::io("readdir", &free))?
        } else {
            recycle::FreePool::empty(&free)
        };
        let spool = Spool::with(root, owner, pool);
        let probe = spool.temp_path("probe");
        let mut file = create_new(&probe)?;
        let written = file
            .write_all(b"probe\n")
            .map_err(SpoolError::io("write", &probe));
        drop(file);
        fs::remove_file(&probe).map_err(SpoolError::io("unlink", &probe))?;
        written?;
        Ok(spool)
    }

    /// Open an existing spool without creating, changing or removing anything (for the `queue`
    /// commands that only read, or only unlink messages): no directory is made, no probe
    /// written, `free/` is not looked at. Fails with [`SpoolError::NotFound`]-free I/O errors
    /// when `root` cannot be read.
    pub fn open_existing(root: &Path) -> Result<Spool, SpoolError> {
        let owner = owner_of(root)?;
        let pool = recycle::FreePool::empty(&root.join("free"));
        Ok(Spool::with(root, owner, pool))
    }

    fn with(root: &Path, owner: (u32, u32), free: recycle::FreePool) -> Spool {
        Spool {
            inner: Arc::new(Dirs {
                root: root.to_path_buf(),
                tmp: root.join("tmp"),
                queue: root.join("queue"),
                rejected: root.join("rejected"),
                control: root.join("control"),
                owner,
                free,
                queue_sync: group::DirSync::new(root.join("queue")),
                space: Arc::default(),
            }),
        }
    }

    /// Refuse a spool another user could write into (DESIGN "Spool directories"): the spool
    /// directory and each of its subdirectories must be a directory (not a symlink), owned by
    /// `uid` (the relay's effective uid), without group or other write permission; a missing
    /// subdirectory passes (it is created private). The error names the path and the command
    /// that fixes it. Blocking (a few `lstat`s).
    pub fn check_safe(&self, uid: u32) -> Result<(), SpoolError> {
        let dirs = std::iter::once(self.root().to_path_buf())
            .chain(SUBDIRS.iter().map(|s| self.root().join(s)));
        for dir in dirs {
            let meta = match fs::symlink_metadata(&dir) {
                Ok(meta) => meta,
                // Not made yet: `open` creates it private.
                Err(e) if e.kind() == io::ErrorKind::NotFound => continue,
                Err(e) => return Err(SpoolError::io("stat", &dir)(e)),
            };
            let unsafe_dir = |problem: String, fix: String| SpoolError::Unsafe {
                path: dir.clone(),
                problem,
                fix,
            };
            if !meta.file_type().is_dir() {
                return Err(unsafe_dir(
                    "not a directory (a symlink or a file)".into(),
                    format!(
                        "replace it with a directory: rm {0} && mkdir -m 700 {0}",
                        dir.display()
                    ),
                ));
            }
            if meta.uid() != uid {
                return Err(unsafe_dir(
                    format!(
                        "owned by uid {}, but the relay runs as uid {uid}",
                        meta.uid()
                    ),
                    format!(
                        "chown -R {uid} {} (or run the relay as its owner)",
                        self.root().display()
                    ),
                ));
            }
            if meta.mode() & FOREIGN_WRITE != 0 {
                return Err(unsafe_dir(
                    format!(
                        "group- or world-writable (mode {:04o})",
                        meta.mode() & 0o7777
                    ),
                    format!("chmod 700 {}", dir.display()),
                ));
            }
        }
        Ok(())
    }

    /// The spool directory.
    pub fn root(&self) -> &Path {
        &self.inner.root
    }

    /// Free space for unprivileged writers on the spool's file system, in bytes
    /// (`f_bavail * f_frsize` of `statvfs`).
    pub fn free_space(&self) -> io::Result<u64> {
        let path = CString::new(self.root().as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))?;
        // SAFETY: statvfs is plain old data, valid when zeroed; `path` is a NUL-terminated
        // string that outlives the call and `stat` is a valid out-pointer.
        let mut stat: libc::statvfs = unsafe { std::mem::zeroed() };
        let rc = unsafe { libc::statvfs(path.as_ptr(), &mut stat) };
        if rc != 0 {
            return Err(io::Error::last_os_error());
        }
        // The field types differ between platforms (u32 / u64), hence the casts.
        #[allow(clippy::unnecessary_cast)]
        Ok((stat.f_bavail as u64).saturating_mul(stat.f_frsize as u64))
    }

    /// Reserve `bytes` of free space for a transaction about to write a message of at most
    /// that size, unless that would take the free space (minus what other transactions have
    /// reserved) below `min_free` bytes; `min_free == 0` disables the check. See [`reserve`].
    /// Blocking (`statvfs`), but cheap.
    pub fn reserve(
        &self,
        bytes: u64,
        min_free: u64,
    ) -> io::Result<Result<reserve::Reservation, reserve::Insufficient>> {
        self.inner
            .space
            .reserve(|| self.free_space(), min_free, bytes)
    }

    /// Keep `reservation` ahead of a message that has written `written` bytes (one larger
    /// than its declared `SIZE`), under the rule of [`Spool::reserve`]: see
    /// [`reserve::SpaceReserve::hold`]. `statvfs` only when it must grow.
    pub fn hold_reservation(
        &self,
        reservation: &mut reserve::Reservation,
        written: u64,
        min_free: u64,
    ) -> io::Result<Result<(), reserve::Insufficient>> {
        self.inner
            .space
            .hold(reservation, || self.free_space(), min_free, written)
    }

    /// Start receiving a message: create `tmp/ID` (ID = `envelope.id`) and write the spool
    /// header. Fails with [`SpoolError::AlreadyExists`] if `queue/ID` is already taken.
    pub fn create(&self, envelope: &Envelope) -> Result<SpoolWriter, SpoolError> {
        let id = envelope.id.clone();
        // Fail fast, before the client sends the message; commit refuses atomically too.
        if self.message_path(&id).exists() {
            return Err(SpoolError::AlreadyExists(id));
        }
        let json = serde_json::to_vec(envelope).map_err(|source| SpoolError::Encode {
            what: "envelope",
            source,
        })?;
        let (file, path, reused) = match self.inner.free.take() {
            Some((file, path, length)) => (file, path, Some(length)),
            None => {
                let tmp = self.inner.tmp.join(id.as_str());
                (create_new(&tmp)?, tmp, None)
            }
        };
        // Room for `BODY=8BITMIME`, should the message turn out to be 8-bit without declaring
        // it (SpoolWriter::rewrite_mail_params): at most the whole field, since `MailParams`
        // leaves out what is not set. A constant, so no second serialization per message.
        const ROOM: usize = r#""body":"8bitmime","#.len();
        let room = if envelope.mail_params.body == Some(Body::EightBitMime) {
            0
        } else {
            ROOM
        };
        let mut writer = SpoolWriter::new(envelope, file, path, reused, self.inner.clone());
        writer.write_header(&json, room)?;
        Ok(writer)
    }

    /// Queue a complete message in one call (for messages the relay makes itself, such as
    /// bounces): create, write, commit. Blocking (fsync).
    pub fn enqueue(&self, envelope: &Envelope, message: &[u8]) -> Result<QueueId, SpoolError> {
        let mut writer = self.create(envelope)?;
        writer.write(message)?;
        writer.commit()
    }

    /// Every committed message, sorted by id (that is, by age). Temp files are not looked at; a
    /// file that cannot be parsed or was not written by the relay is skipped with a warning
    /// (recovery moves it to `rejected/`) and a
    /// message removed while listing is silently left out.
    pub fn list(&self) -> Result<Vec<QueuedMessage>, SpoolError> {
        self.list_map(|m| m)
    }

    /// [`Spool::list`], each message turned into `f(message)` on the thread that read it, in
    /// the same order: a large queue is read and turned on a few threads, and only what `f`
    /// keeps stays in memory (a table row, say, rather than the whole envelope). Blocking.
    ///
    /// # Errors
    /// `queue/` cannot be read.
    pub fn list_map<T: Send>(
        &self,
        f: impl Fn(QueuedMessage) -> T + Sync,
    ) -> Result<Vec<T>, SpoolError> {
        Ok(self.load_many_map(&self.queued_ids()?, f))
    }

    /// [`Spool::list_map`] for a report to an operator (`queue list`): a message whose
    /// `ID.state` was not in the directory listing is taken as never attempted without a
    /// second look, which spares a failed `open` per such message (a fifth of the listing's
    /// system calls at 100,000 fresh messages). A state written between the listing and the
    /// read is therefore not seen, as one written just after the read is not: a snapshot.
    /// Whatever acts on a message's state (holds, releases, delivery) uses
    /// [`Spool::list_map`], which always looks. Blocking.
    ///
    /// # Errors
    /// `queue/` cannot be read.
    pub fn report_map<T: Send>(
        &self,
        f: impl Fn(QueuedMessage) -> T + Sync,
    ) -> Result<Vec<T>, SpoolError> {
        let (ids, states) = self.listing()?;
        let load = |id: &QueueId| {
            self.load_open_as(id, states.binary_search(id).is_ok())
                .map(|(msg, _)| msg)
        };
        Ok(self.load_many_split(&ids, load, f, LIST_PER_THREAD))
    }

    /// The ids of the messages in `queue/`, sorted (oldest first). Blocking.
    ///
    /// # Errors
    /// `queue/` cannot be read.
    pub fn queued_ids(&self) -> Result<Vec<QueueId>, SpoolError> {
        self.listing().map(|(ids, _)| ids)
    }

    /// One listing of `queue/`: the ids of its messages and the ids of its `ID.state` files,
    /// each sorted. Blocking.
    fn listing(&self) -> Result<(Vec<QueueId>, Vec<QueueId>), SpoolError> {
        let dir = &self.inner.queue;
        let entries = fs::read_dir(dir).map_err(SpoolError::io("readdir", dir))?;
        let (mut ids, mut states) = (Vec::new(), Vec::new());
        for entry in entries {
            let entry = entry.map_err(SpoolError::io("readdir", dir))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            if let Some(id) = exact_id(name) {
                ids.push(id);
            } else if let Some(id) = name.strip_suffix(STATE_SUFFIX).and_then(exact_id) {
                states.push(id);
            }
        }
        ids.sort();
        states.sort();
        Ok((ids, states))
    }

    /// [`Spool::load`] of each of `ids`, in order, leaving out those gone and (logged) those
    /// unreadable; a long list is read on a few threads. Blocking.
    pub fn load_many(&self, ids: &[QueueId]) -> Vec<QueuedMessage> {
        self.load_many_map(ids, |m| m)
    }

    /// [`Spool::load_many`], each message turned into `f(message)` on the thread that read it.
    fn load_many_map<T: Send>(
        &self,
        ids: &[QueueId],
        f: impl Fn(QueuedMessage) -> T + Sync,
    ) -> Vec<T> {
        self.load_many_split(ids, |id| self.load(id), f, LIST_PER_THREAD)
    }

    /// [`Spool::load_many_map`], each message read by `load`, with at least `per_thread`
    /// messages on each thread.
    fn load_many_split<T: Send>(
        &self,
        ids: &[QueueId],
        load: impl Fn(&QueueId) -> Result<QueuedMessage, SpoolError> + Sync,
        f: impl Fn(QueuedMessage) -> T + Sync,
        per_thread: usize,
    ) -> Vec<T> {
        // Reading is one open, read and parse per message, mostly system calls on cached
        // files: a large queue is read on a few threads (in id order all the same).
        let threads = std::thread::available_parallelism()
            .map_or(1, usize::from)
            .min(LIST_THREADS)
            .min(ids.len() / per_thread.max(1))
            .max(1);
        if threads == 1 {
            return load_all(ids, &load, &f);
        }
        let chunk = ids.len().div_ceil(threads);
        let (load, f) = (&load, &f);
        std::thread::scope(|scope| {
            let parts: Vec<_> = ids
                .chunks(chunk)
                .map(|part| scope.spawn(move || load_all(part, load, f)))
                .collect();
            parts
                .into_iter()
                .flat_map(|p| p.join().unwrap_or_else(|e| std::panic::resume_unwind(e)))
                .collect()
        })
    }

    /// Read one committed message's envelope, state and size. A state file that cannot be
    /// parsed (or is untrusted) is logged and treated as fresh (recovery rejects it): retrying a message is
    /// safe, losing it is not.
    pub fn load(&self, id: &QueueId) -> Result<QueuedMessage, SpoolError> {
        self.load_open(id).map(|(msg, _)| msg)
    }

    /// [`Spool::load`], and the message bytes too when they are at most `in_memory` octets,
    /// read through the same open file (what a delivery attempt needs, with one open and one
    /// header parse per message). No bytes for a bigger message: stream it with
    /// [`Spool::open_message`]. The file stays open as the attempt's [`SendLock`].
    pub fn load_with_body(&self, id: &QueueId, in_memory: u64) -> Result<Loaded, SpoolError> {
        let (msg, mut reader) = self.load_open(id)?;
        let body = if msg.size > in_memory {
            None
        } else {
            let mut body = Vec::with_capacity(usize::try_from(msg.size).unwrap_or(0));
            reader
                .read_to_end(&mut body)
                .map_err(SpoolError::io("read", &msg.path))?;
            Some(body)
        };
        let path = msg.path.clone();
        Ok(Loaded {
            msg,
            body,
            lock: SendLock::new(id.clone(), reader.into_inner(), path),
        })
    }

    /// Open `queue/ID`, parse its header and state; the reader is positioned at the message.
    fn load_open(&self, id: &QueueId) -> Result<(QueuedMessage, BufReader<File>), SpoolError> {
        self.load_open_as(id, true)
    }

    /// [`Spool::load_open`], looking for `ID.state` only when `has_state` (false for
    /// [`Spool::report_map`] when its listing held none: the message is taken as never
    /// attempted).
    fn load_open_as(
        &self,
        id: &QueueId,
        has_state: bool,
    ) -> Result<(QueuedMessage, BufReader<File>), SpoolError> {
        let (reader, envelope, header_len, path, len) = self.open_verified(id)?;
        let state = match has_state.then(|| self.read_state(id, &envelope)) {
            Some(Ok(Some(state))) => state,
            None | Some(Ok(None)) => DeliveryState::fresh(envelope.received_at),
            Some(Err(e)) => {
                tracing::warn!(queue_id = %id, error = %e, "ignoring unreadable delivery state");
                DeliveryState::fresh(envelope.received_at)
            }
        };
        let msg = QueuedMessage {
            size: len.saturating_sub(header_len),
            envelope,
            state,
            path,
        };
        Ok((msg, reader))
    }

    /// The raw message bytes of a committed message (for tests and `queue show`; delivery
    /// streams with [`Spool::open_message`] instead).
    pub fn read_message(&self, id: &QueueId) -> Result<Vec<u8>, SpoolError> {
        self.read_message_head(id, u64::MAX)
    }

    /// At most `limit` bytes from the start of a message (its headers, for `queue show`).
    pub fn read_message_head(&self, id: &QueueId, limit: u64) -> Result<Vec<u8>, SpoolError> {
        let (file, _) = self.open_message(id)?;
        let mut out = Vec::new();
        file.take(limit)
            .read_to_end(&mut out)
            .map_err(SpoolError::io("read", &self.message_path(id)))?;
        Ok(out)
    }

    /// Open a committed message for streaming: the file, positioned at the first message byte,
    /// and that offset. The open file stays readable even if the message is removed meanwhile.
    pub fn open_message(&self, id: &QueueId) -> Result<(File, u64), SpoolError> {
        let (reader, _, offset, path, _) = self.open_verified(id)?;
        let mut file = reader.into_inner();
        file.seek(SeekFrom::Start(offset))
            .map_err(SpoolError::io("seek", &path))?;
        Ok((file, offset))
    }

    /// Open `queue/ID` and read its header, checking the envelope belongs to this file name.
    /// Returns the reader (past the header), the envelope, the header length and the path.
    fn open_verified(
        &self,
        id: &QueueId,
    ) -> Result<(BufReader<File>, Envelope, u64, PathBuf, u64), SpoolError> {
        let path = self.message_path(id);
        let (file, meta) = open_message_file(&path, id, self.inner.owner.0)?;
        let mut reader = BufReader::new(file);
        let (envelope, header_len) = read_header(&mut reader, &path)?;
        if envelope.id != *id {
            return Err(SpoolError::corrupt(
                &path,
                format!("envelope id {} does not match the file name", envelope.id),
            ));
        }
        Ok((reader, envelope, header_len, path, meta.len()))
    }

    /// Replace the delivery state of a message atomically: temp file in `tmp/`, fsync, rename
    /// to `queue/ID.state`, directory fsync. Blocking (call from `spawn_blocking`). Fails with
    /// [`SpoolError::NotFound`] when the message is gone (e.g. deleted by an operator).
    pub fn write_state(&self, id: &QueueId, state: &DeliveryState) -> Result<(), SpoolError> {
        self.stage_state(id, state)?;
        failpoint::step("spool.state.dir_fsync")
            .map_err(SpoolError::io("fsync", &self.inner.queue))?;
        sync_dir(&self.inner.queue)
    }

    /// [`Spool::write_state`] without the directory fsync, which the caller makes (once for
    /// many states) before it relies on them.
    fn stage_state(&self, id: &QueueId, state: &DeliveryState) -> Result<(), SpoolError> {
        let json = serde_json::to_vec(state).map_err(|source| SpoolError::Encode {
            what: "state",
            source,
        })?;
        let tmp = self.temp_path(&format!("{id}{STATE_SUFFIX}"));
        let result = self.write_state_via(&tmp, id, &json);
        if result.is_err() {
            // Best effort: a leftover in tmp/ is harmless and removed at the next recovery.
            let _ = fs::remove_file(&tmp);
        }
        result
    }

    fn write_state_via(&self, tmp: &Path, id: &QueueId, json: &[u8]) -> Result<(), SpoolError> {
        let mut file = create_new(tmp)?;
        failpoint::step("spool.state.write")
            .and_then(|()| file.write_all(json))
            .map_err(SpoolError::io("write", tmp))?;
        failpoint::step("spool.state.fsync")
            .and_then(|()| file.sync_data())
            .map_err(SpoolError::io("fsync", tmp))?;
        drop(file);
        // Narrows (does not close) the window in which a state could be written for a message
        // being deleted; recovery removes such orphans.
        if !self.message_path(id).exists() {
            let _ = fs::remove_file(tmp);
            return Err(SpoolError::NotFound(id.clone()));
        }
        let dest = self.state_path(id);
        failpoint::step("spool.state.rename")
            .and_then(|()| fs::rename(tmp, &dest))
            .map_err(SpoolError::io("rename", &dest))
    }

    /// Remove a message from the queue: `ID`, then `ID.state`, then fsync the directory.
    /// Removing the message first means a crash in between leaves an orphan state (cleaned up
    /// by recovery), never a message that forgot its progress. The caller logs the reason
    /// (DESIGN invariant 2).
    pub fn remove(&self, id: &QueueId) -> Result<(), SpoolError> {
        let path = self.message_path(id);
        let removed =
            match failpoint::step("spool.remove.unlink").and_then(|()| fs::remove_file(&path)) {
                Ok(()) => true,
                Err(e) if e.kind() == io::ErrorKind::NotFound => false,
                Err(e) => return Err(SpoolError::io("unlink", &path)(e)),
            };
        self.remove_state(id)?;
        failpoint::step("spool.remove.dir_fsync")
            .map_err(SpoolError::io("fsync", &self.inner.queue))?;
        sync_dir(&self.inner.queue)?;
        found(removed, id)
    }

    /// Remove a message every recipient of which is done (delivered, or failed with its bounce
    /// queued): out of `queue/` into `free/` for reuse when it is small (see the `recycle` module), or
    /// unlinked; then its state. Unlike [`Spool::remove`], no directory fsync: if a crash
    /// undoes it, the message comes back and is delivered again, which invariant 1 allows
    /// (at-least-once); it can never be lost this way, and the next fsync of `queue/` (the
    /// next commit, typically milliseconds later) makes it durable anyway. This saves one disk
    /// flush per message on the busiest path. `size` (the message's, as loaded) decides
    /// whether the file is kept for reuse; a message with no `attempts` recorded has a state
    /// file to remove only if a hold and its release wrote one (looked for; an unreadable
    /// one, loaded as fresh, is removed the same way).
    pub fn remove_finished(
        &self,
        id: &QueueId,
        size: u64,
        attempts: u32,
    ) -> Result<(), SpoolError> {
        let path = self.message_path(id);
        // The header is small; what matters is whether the file is worth keeping.
        let removed = failpoint::step("spool.remove.unlink")
            .and_then(|()| self.inner.free.give(&path, id.as_str(), size))
            .map_err(SpoolError::io("unlink", &path))?;
        if self.has_state(id, attempts) {
            self.remove_state(id)?;
        }
        found(removed, id)
    }

    /// Whether `queue/ID.state` may exist for a message loaded with `attempts`: always after an
    /// attempt; before one, when a hold (released since) wrote it. An error of the `lstat`
    /// counts as "may".
    fn has_state(&self, id: &QueueId, attempts: u32) -> bool {
        attempts > 0
            || !matches!(fs::symlink_metadata(self.state_path(id)),
                Err(e) if e.kind() == io::ErrorKind::NotFound)
    }

    /// [`Spool::remove_finished`] when it needs no disk wait, so it may run on the reactor: the
    /// message has no state file (no attempt, no hold) and its file goes into `free/` by one rename
    /// (see [`FreePool::recycle`](recycle::FreePool::recycle)). `None` when that does not
    /// apply or the rename failed other than by the file being gone (nothing done: call
    /// [`Spool::remove_finished`] off the reactor); else its outcome, as that would give it.
    /// The caller's open descriptor of the file is then safe to close on the reactor after
    /// `Some(Ok(()))` only: the file still has a name, so closing it frees nothing.
    pub fn recycle_finished(
        &self,
        id: &QueueId,
        size: u64,
        attempts: u32,
    ) -> Option<Result<(), SpoolError>> {
        if self.has_state(id, attempts) {
            return None;
        }
        let path = self.message_path(id);
        if let Err(e) = failpoint::step("spool.remove.unlink") {
            return Some(Err(SpoolError::io("unlink", &path)(e)));
        }
        match self.inner.free.recycle(&path, id.as_str(), size)? {
            Ok(renamed) => Some(found(renamed, id)),
            Err(_) => None,
        }
    }

    /// How many files `free/` holds for reuse.
    pub fn free_files(&self) -> usize {
        self.inner.free.len()
    }

    /// Unlink `queue/ID.state`, if there is one.
    fn remove_state(&self, id: &QueueId) -> Result<(), SpoolError> {
        let state = self.state_path(id);
        match failpoint::step("spool.remove.state").and_then(|()| fs::remove_file(&state)) {
            Err(e) if e.kind() != io::ErrorKind::NotFound => {
                Err(SpoolError::io("unlink", &state)(e))
            }
            _ => Ok(()),
        }
    }

    /// `queue/ID`.
    fn message_path(&self, id: &QueueId) -> PathBuf {
        // QueueId admits only [0-9A-Z]{16}, so this cannot name anything outside queue/.
        self.inner.queue.join(id.as_str())
    }

    /// `queue/ID.state`.
    fn state_path(&self, id: &QueueId) -> PathBuf {
        self.inner.queue.join(format!("{id}{STATE_SUFFIX}"))
    }

    /// A fresh, unique path in `tmp/` for a file named after `what`.
    fn temp_path(&self, what: &str) -> PathBuf {
        let n = TEMP_COUNTER.fetch_add(1, Ordering::Relaxed);
        self.inner
            .tmp
            .join(format!("{what}.{}.{n}.tmp", std::process::id()))
    }

    /// Read `queue/ID.state`: `None` when absent, an error when unreadable or not matching.
    fn read_state(
        &self,
        id: &QueueId,
        envelope: &Envelope,
    ) -> Result<Option<DeliveryState>, SpoolError> {
        let path = self.state_path(id);
        let state = match read_state_file(&path, self.inner.owner.0)? {
            Some(state) => state,
            None => return Ok(None),
        };
        state
            .check_against(envelope)
            .map_err(|mismatch| SpoolError::corrupt(&path, mismatch.to_string()))?;
        Ok(Some(state))
    }
}

/// `load` of each of `ids`, in order, turned into `f(message)`; those gone are left out and
/// those unreadable logged and left out.
fn load_all<T>(
    ids: &[QueueId],
    load: impl Fn(&QueueId) -> Result<QueuedMessage, SpoolError>,
    f: impl Fn(QueuedMessage) -> T,
) -> Vec<T> {
    let mut out = Vec::with_capacity(ids.len());
    for id in ids {
        match load(id) {
            Ok(msg) => out.push(f(msg)),
            Err(SpoolError::NotFound(_)) => {}
            Err(e) => {
                tracing::warn!(queue_id = %id, error = %e, "skipping unreadable queue file")
            }
        }
    }
    out
}

/// The id a `queue/` file name stands for, if it is exactly a queue id (upper case, as
/// written). Anything else (state files, lower case, stray names) is not a message.
fn exact_id(name: &str) -> Option<QueueId> {
    // Half the names in queue/ are states (`ID.state`): refused before any allocation.
    if name.len() != crate::envelope::QUEUE_ID_LEN {
        return None;
    }
    name.parse::<QueueId>()
        .ok()
        .filter(|id| id.as_str() == name)
}

/// Open a message file, mapping "absent" to [`SpoolError::NotFound`]. Symlinks are not
/// followed: nothing legitimate puts one in `queue/`, and following it could read a file
/// outside the spool.
/// Also the open file's metadata.
fn open_message_file(
    path: &Path,
    id: &QueueId,
    owner: u32,
) -> Result<(File, fs::Metadata), SpoolError> {
    open_trusted_with_meta(path, owner, false).map_err(|e| match e {
        Opened::Io(e) if e.kind() == io::ErrorKind::NotFound => SpoolError::NotFound(id.clone()),
        e => e.into_spool_error(path),
    })
}

/// Why [`open_trusted`] gave no file.
pub(crate) enum Opened {
    /// The open or the `fstat` failed (`NotFound` included).
    Io(io::Error),
    /// The file is there but the relay did not write it: why ([`trust`]).
    Untrusted(String),
}

impl Opened {
    fn into_spool_error(self, path: &Path) -> SpoolError {
        match self {
            Opened::Io(e) => SpoolError::io("open", path)(e),
            Opened::Untrusted(reason) => SpoolError::Untrusted {
                path: path.to_path_buf(),
                reason,
            },
        }
    }
}

/// Open a file the relay wrote: without following a link (`O_NOFOLLOW`), without blocking on
/// a planted FIFO (`O_NONBLOCK`), and only when the open file itself (`fstat`, so nothing can
/// be swapped in between) passes [`trust`] for `owner`. For reading, or for writing when
/// `write`. Every reader of spool files goes through here.
pub(crate) fn open_trusted(path: &Path, owner: u32, write: bool) -> Result<File, Opened> {
    open_trusted_with_meta(path, owner, write).map(|(file, _)| file)
}

/// [`open_trusted`], and the metadata of the open file it checked (one `fstat` for both).
pub(crate) fn open_trusted_with_meta(
    path: &Path,
    owner: u32,
    write: bool,
) -> Result<(File, fs::Metadata), Opened> {
    let file = OpenOptions::new()
        .read(!write)
        .write(write)
        .custom_flags(libc::O_NOFOLLOW | libc::O_NONBLOCK)
        .open(path)
        .map_err(Opened::Io)?;
    let meta = file.metadata().map_err(Opened::Io)?;
    trust(&meta, owner).map_err(|d| Opened::Untrusted(d.to_string()))?;
    Ok((file, meta))
}

/// Why a spool file is not trusted as written by the relay.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub(crate) enum Distrust {
    /// A directory, symlink, FIFO, device or socket.
    #[error("not a regular file")]
    NotRegular,
    /// Owned by another user than the spool's owner.
    #[error("owned by uid {uid}, not by the spool's owner (uid {owner})")]
    ForeignOwner { uid: u32, owner: u32 },
    /// Writable by the group or others (`mode`: the permission bits).
    #[error("group- or world-writable (mode {mode:04o})")]
    ForeignWritable { mode: u32 },
}

/// Whether a spool file's metadata says the relay wrote it: a regular file owned by `owner`
/// (the spool's owner) that no one else may write. `Err` says which check failed. Taken from
/// the open file (`fstat`) or from `lstat`, never by following a symlink.
pub(crate) fn trust(meta: &fs::Metadata, owner: u32) -> Result<(), Distrust> {
    if !meta.file_type().is_file() {
        return Err(Distrust::NotRegular);
    }
    if meta.uid() != owner {
        return Err(Distrust::ForeignOwner {
            uid: meta.uid(),
            owner,
        });
    }
    if meta.mode() & FOREIGN_WRITE != 0 {
        return Err(Distrust::ForeignWritable {
            mode: meta.mode() & 0o7777,
        });
    }
    Ok(())
}

/// Owner (uid, gid) of the spool directory.
fn owner_of(root: &Path) -> Result<(u32, u32), SpoolError> {
    let meta = fs::metadata(root).map_err(SpoolError::io("stat", root))?;
    Ok((meta.uid(), meta.gid()))
}

/// Give `path` (just created by this process) to `owner` when this process is not that user,
/// as when root runs a `queue` command on the relay's spool: otherwise the relay could not
/// write what the command created, or would refuse to start.
fn give_to(path: &Path, owner: (u32, u32)) -> Result<(), SpoolError> {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } == owner.0 {
        return Ok(());
    }
    std::os::unix::fs::lchown(path, Some(owner.0), Some(owner.1))
        .map_err(SpoolError::io("chown", path))
}

/// Create a new private file (never reusing an existing one).
fn create_new(path: &Path) -> Result<File, SpoolError> {
    OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(FILE_MODE)
        .open(path)
        .map_err(SpoolError::io("create", path))
}

/// Rename `from` to `to` unless `to` exists, atomically (`renameat2` with
/// `RENAME_NOREPLACE`), so a committed message is never overwritten. File systems without it
/// fall back to a check then a plain rename.
fn rename_noreplace(from: &Path, to: &Path) -> io::Result<()> {
    let c = |p: &Path| {
        CString::new(p.as_os_str().as_bytes())
            .map_err(|e| io::Error::new(io::ErrorKind::InvalidInput, e))
    };
    let (src, dst) = (c(from)?, c(to)?);
    // SAFETY: both are NUL-terminated strings that outlive the call.
    let rc = unsafe {
        libc::renameat2(
            libc::AT_FDCWD,
            src.as_ptr(),
            libc::AT_FDCWD,
            dst.as_ptr(),
            libc::RENAME_NOREPLACE,
        )
    };
    if rc == 0 {
        return Ok(());
    }
    let err = io::Error::last_os_error();
    match err.raw_os_error() {
        Some(libc::EINVAL) | Some(libc::ENOSYS) => {
            if to.exists() {
                return Err(io::ErrorKind::AlreadyExists.into());
            }
            fs::rename(from, to)
        }
        _ => Err(err),
    }
}

/// `Ok` when a removal found the message, [`SpoolError::NotFound`] otherwise.
fn found(removed: bool, id: &QueueId) -> Result<(), SpoolError> {
    if removed {
        Ok(())
    } else {
        Err(SpoolError::NotFound(id.clone()))
    }
}

/// Whether `e`, from renaming `from`, means that `from` is gone. A rename fails with ENOENT
/// for a missing source and for a missing destination directory alike (`free/` or
/// `quarantine/` removed by hand): only an `lstat` of `from` tells them apart, and it runs only
/// on that error.
pub(crate) fn rename_source_gone(e: &io::Error, from: &Path) -> bool {
    e.kind() == io::ErrorKind::NotFound
        && matches!(fs::symlink_metadata(from), Err(gone) if gone.kind() == io::ErrorKind::NotFound)
}

/// fsync a directory, making renames and unlinks in it durable.
fn sync_dir(dir: &Path) -> Result<(), SpoolError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(SpoolError::io("fsync", dir))
}

/// Parse the spool header (magic line and envelope line) from the start of a message file.
/// Returns the envelope and the header length, i.e. the offset of the message bytes.
fn read_header(reader: &mut impl BufRead, path: &Path) -> Result<(Envelope, u64), SpoolError> {
    let mut magic = Vec::with_capacity(MAGIC.len());
    reader
        .take(MAGIC.len() as u64)
        .read_until(b'\n', &mut magic)
        .map_err(SpoolError::io("read", path))?;
    if magic != MAGIC {
        return Err(SpoolError::corrupt(
            path,
            "missing PORTCULLIS-SPOOL 1 header",
        ));
    }
    let mut line = Vec::new();
    reader
        .take(MAX_ENVELOPE_LINE)
        .read_until(b'\n', &mut line)
        .map_err(SpoolError::io("read", path))?;
    if line.last() != Some(&b'\n') {
        return Err(SpoolError::corrupt(
            path,
            "envelope line truncated or longer than the limit",
        ));
    }
    let envelope: Envelope = serde_json::from_slice(&line)
        .map_err(|e| SpoolError::corrupt(path, format!("envelope JSON: {e}")))?;
    Ok((envelope, (MAGIC.len() + line.len()) as u64))
}

/// Read and parse a state file: `None` when absent.
fn read_state_file(path: &Path, owner: u32) -> Result<Option<DeliveryState>, SpoolError> {
    let (mut file, meta) = match open_trusted_with_meta(path, owner, false) {
        Ok(opened) => opened,
        Err(Opened::Io(e)) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
        Err(e) => return Err(e.into_spool_error(path)),
    };
    if meta.len() > MAX_STATE_FILE {
        return Err(SpoolError::corrupt(path, "state file too large"));
    }
    // A state file is replaced by a rename, never written in place: its length is the one
    // of the open file, read in one call (no probe for the end).
    let mut bytes = vec![0; meta.len() as usize];
    file.read_exact(&mut bytes)
        .map_err(SpoolError::io("read", path))?;
    serde_json::from_slice(&bytes)
        .map(Some)
        .map_err(|e| SpoolError::corrupt(path, format!("state JSON: {e}")))
}

#[cfg(test)]
mod manager_tests;
#[cfg(test)]
mod tests;
