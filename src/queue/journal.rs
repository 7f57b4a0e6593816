//! The message journal behind `portcullis trace`: every [`Event`] of every message, appended
//! under `SPOOL/journal/`, bounded by `[log] journal_keep` and `journal_max_size`, never
//! fsynced event by event, and never the cause of a refusal (DESIGN.md, `[log]`).
//!
//! # Writing
//!
//! [`Journal::append`] (through [`EventSink`]) never blocks: it hands a copy of the event to
//! the journal's thread through a channel of [`CHANNEL_CAPACITY`] events; when that is full
//! the event is dropped and counted, and the thread logs the count at most once a minute.
//! The thread ([`writer::Writer`]) appends one JSON line per event to the open segment through
//! a 64 KiB buffer, written out at least every [`FLUSH_INTERVAL`]. Nothing is fsynced: a crash
//! may lose the last events, never a message (the spool is the record of messages; the
//! journal is their history).
//!
//! # Files
//!
//! ```text
//! SPOOL/journal/20260501T120000.000Z.jsonl   a segment: one event per line, named after the
//!                                            UTC time it was opened (names sort by time)
//! SPOOL/journal/20260501T120000.000Z.idx     its sidecar, written when it is sealed
//! ```
//!
//! A segment is sealed at [`writer::SEGMENT_MAX`] (smaller when `journal_max_size` is small)
//! or after [`writer::SEGMENT_AGE_MS`], and at a clean stop. Sealed segments whose last event
//! is older than `journal_keep` are removed, and the oldest go first while segments and
//! sidecars together exceed `journal_max_size`. The space check: see [`writer::room`] — near
//! `limits.min_free_space` the journal removes its oldest files, closer still it stops writing
//! (logged once) until space returns. Files are 0600 and the directory 0700, like the spool.
//! While it is stopped (short of space, or after a write error) a zero-byte marker in the
//! directory says since when and why, and a gap marker records each past stop ([`state`]):
//! the status, `trace` and the offline status read them, the relay running or not.
//!
//! # Reading
//!
//! The sidecar ([`index`]) is a Bloom filter of the segment's queue ids, Message-IDs,
//! addresses and client IPs, so a query reads one block of each sidecar and scans only the
//! segments that may hold its key, plus those without sidecar: the open one (so `trace` sees
//! the running relay's events within [`FLUSH_INTERVAL`]) and any a crash left unsealed (the
//! writer indexes them at its next start). Lines that are cut short or not an event are
//! skipped. See [`query`] for how a query becomes timelines, [`show`] for how they print.

pub mod index;
pub mod query;
pub mod segment;
pub mod show;
pub mod state;
pub mod writer;

#[cfg(test)]
mod tests;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, SyncSender, TryRecvError, TrySendError};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use tracing::{error, warn};

use crate::config::Log;
use crate::observe::event::unix_millis;
use crate::observe::status::JournalState;
use crate::observe::{Event, EventSink};

pub use query::{BadQuery, Found, Query};

use super::Spool;

/// Events waiting for the journal's thread, at most; more are dropped (and counted).
pub const CHANNEL_CAPACITY: usize = 65_536;
/// Longest an appended event waits in the writer's buffer before it is written out.
pub const FLUSH_INTERVAL: Duration = Duration::from_millis(200);

/// How long the journal thread sleeps between taking what arrived: at most
/// [`CHANNEL_CAPACITY`] events may arrive meanwhile (over 100,000 events a second) before
/// events are dropped.
const DRAIN_INTERVAL: Duration = Duration::from_millis(50);
/// How often the writer looks at segment age, retention and free space.
const TICK: Duration = Duration::from_secs(1);
/// Least time between two log lines about dropped events.
const DROP_LOG_INTERVAL: Duration = Duration::from_secs(60);
/// Wait after a write error before the writer tries a new segment.
const RETRY_AFTER_ERROR: Duration = Duration::from_secs(10);

/// The journal's directory under the spool at `root`.
pub fn dir(root: &Path) -> PathBuf {
    root.join("journal")
}

/// What the journal's thread is sent.
#[derive(Debug)]
enum Msg {
    Event(Box<Event>),
    /// Write what is buffered, seal the open segment, end.
    Close,
}

/// Why the journal is not writing, as its thread last said: since when (Unix ms), and why.
type LiveStop = Arc<Mutex<Option<(u64, String)>>>;

/// The journal writer of one spool: a sender to its thread.
#[derive(Debug)]
pub struct Journal {
    dir: PathBuf,
    tx: Option<SyncSender<Msg>>,
    dropped: Arc<AtomicU64>,
    stop: LiveStop,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// The `[cluster] node` each event is recorded with ([`Journal::with_node`]).
    node: Option<String>,
}

impl Journal {
    /// The journal of `spool`, bounded as `log` says, leaving the space above
    /// `min_free_space` (octets, `limits.min_free_space`) to mail. Never fails: a journal
    /// that cannot be written is logged and drops its events (mail goes on).
    pub fn open(spool: &Spool, log: &Log, min_free_space: u64) -> Journal {
        let probe = spool.clone();
        Journal::start(
            dir(spool.root()),
            writer::Limits::new(log, min_free_space),
            Box::new(move || probe.free_space()),
        )
    }

    /// The same, recording `node` (`[cluster] node`) in each event that names none: `trace`
    /// then shows which node of a cluster saw it. `None`: events recorded as they are.
    #[must_use]
    pub fn with_node(mut self, node: Option<String>) -> Journal {
        self.node = node;
        self
    }

    /// The journal of directory `dir` with explicit limits and free-space source (the
    /// writer's tests; the relay uses [`Journal::open`]).
    pub fn start(dir: PathBuf, limits: writer::Limits, free_space: writer::FreeSpace) -> Journal {
        let (tx, rx) = mpsc::sync_channel(CHANNEL_CAPACITY);
        let dropped = Arc::new(AtomicU64::new(0));
        let stop: LiveStop = Arc::default();
        let shared = Shared {
            dropped: dropped.clone(),
            stop: stop.clone(),
        };
        let thread_dir = dir.clone();
        let spawned = std::thread::Builder::new()
            .name("journal".into())
            .spawn(move || run(&thread_dir, limits, free_space, &rx, &shared));
        match spawned {
            Ok(thread) => Journal {
                dir,
                tx: Some(tx),
                dropped,
                stop,
                thread: Mutex::new(Some(thread)),
                node: None,
            },
            Err(e) => {
                error!(error = %e, "journal: cannot start its thread; events are not journaled");
                *stop.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some((unix_millis(), format!("its thread cannot start: {e}")));
                Journal {
                    dir,
                    tx: None,
                    dropped,
                    stop,
                    thread: Mutex::new(None),
                    node: None,
                }
            }
        }
    }

    /// Events dropped so far (channel full, short of space, or a write error).
    pub fn dropped(&self) -> u64 {
        self.dropped.load(Ordering::Relaxed)
    }

    /// Stop: the thread writes what it has, seals the open segment, and ends; this waits for
    /// it (behind the events already sent). Events appended later are dropped and counted.
    /// Closing twice is closing once. (Dropping the journal ends the thread without waiting.)
    pub fn close(&self) {
        let thread = self
            .thread
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let Some(thread) = thread else { return };
        if let Some(tx) = &self.tx {
            // Blocks while the channel is full: the thread is draining it.
            let _ = tx.send(Msg::Close);
        }
        if thread.join().is_err() {
            error!("journal: its thread panicked");
        }
    }

    /// Its state now: the stop its thread reports, what it dropped, and its oldest event.
    pub fn state(&self) -> JournalState {
        let stop = self
            .stop
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let oldest = state::oldest_event(&self.dir).ok().flatten();
        JournalState {
            stopped_since: stop.as_ref().map(|(ms, _)| ms / 1000),
            why: stop.map(|(_, why)| why),
            dropped: Some(self.dropped()),
            oldest: oldest.map(|ms| ms / 1000),
        }
    }
}

impl EventSink for Journal {
    fn append(&self, event: &Event) {
        let mut event = Box::new(event.clone());
        if event.node.is_none() {
            event.node.clone_from(&self.node);
        }
        let sent = match &self.tx {
            Some(tx) => match tx.try_send(Msg::Event(event)) {
                Ok(()) => true,
                Err(TrySendError::Full(_) | TrySendError::Disconnected(_)) => false,
            },
            None => false,
        };
        if !sent {
            self.dropped.fetch_add(1, Ordering::Relaxed);
        }
    }

    fn state(&self) -> Option<JournalState> {
        Some(Journal::state(self))
    }

    fn close(&self) {
        Journal::close(self);
    }
}

/// The state of `dir`'s journal as its markers and files say (the relay running or not):
/// for `trace` and the offline status.
///
/// # Errors
/// The I/O error of listing `dir`.
pub fn state_on_disk(dir: &Path) -> std::io::Result<(JournalState, state::OnDisk)> {
    let disk = state::read(dir)?;
    let shown = JournalState {
        stopped_since: disk.stopped.map(|s| s.since_ms / 1000),
        why: disk.stopped.map(|s| s.reason.text().to_owned()),
        dropped: None,
        oldest: disk.oldest_ms.map(|ms| ms / 1000),
    };
    Ok((shown, disk))
}

/// What the journal's thread shares with its [`Journal`].
struct Shared {
    dropped: Arc<AtomicU64>,
    stop: LiveStop,
}

impl Shared {
    /// Publish the writer's stop (a lock only when it changed).
    fn publish(&self, stop: Option<state::Stop>, published: &mut Option<state::Stop>) {
        if stop == *published {
            return;
        }
        *published = stop;
        *self.stop.lock().unwrap_or_else(PoisonError::into_inner) =
            stop.map(|s| (s.since_ms, s.reason.text().to_owned()));
    }
}

/// The journal thread: open the writer (recovering what a crash left), then write events
/// until every sender is gone.
fn run(
    dir: &Path,
    limits: writer::Limits,
    free_space: writer::FreeSpace,
    rx: &Receiver<Msg>,
    shared: &Shared,
) {
    let dropped = &*shared.dropped;
    let mut w = match writer::Writer::open(dir, limits, free_space) {
        Ok(w) => w,
        Err(e) => {
            error!(dir = %dir.display(), error = %e, "journal: cannot open; events are not journaled");
            *shared.stop.lock().unwrap_or_else(PoisonError::into_inner) = Some((
                unix_millis(),
                format!("it cannot open {}: {e}", dir.display()),
            ));
            while let Ok(Msg::Event(_)) = rx.recv() {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            return;
        }
    };
    let mut published = None;
    shared.publish(w.stop(), &mut published);
    let mut state = Pace::new();
    // The thread never waits in `recv`: a receiver blocked there makes every `try_send` wake it
    // (a futex call and a context switch per event, several per message). It sleeps
    // DRAIN_INTERVAL instead and takes whatever arrived; senders then only touch atomics.
    'run: loop {
        loop {
            match rx.try_recv() {
                Ok(Msg::Event(event)) => state.write(&mut w, &event, dropped),
                Ok(Msg::Close) | Err(TryRecvError::Disconnected) => break 'run,
                Err(TryRecvError::Empty) => break,
            }
        }
        state.housekeep(&mut w, dropped);
        shared.publish(w.stop(), &mut published);
        std::thread::sleep(DRAIN_INTERVAL.min(state.wait()));
    }
    if let Err(e) = w.seal() {
        warn!(error = %e, "journal: cannot seal the open segment (indexed at next start)");
    }
}

/// When the writer thread flushes, ticks and logs.
struct Pace {
    dirty: bool,
    last_flush: Instant,
    next_tick: Instant,
    /// After a write error: no writing until then.
    paused_until: Option<Instant>,
    logged_drops: u64,
    last_drop_log: Option<Instant>,
}

impl Pace {
    fn new() -> Pace {
        let now = Instant::now();
        Pace {
            dirty: false,
            last_flush: now,
            next_tick: now + TICK,
            paused_until: None,
            logged_drops: 0,
            last_drop_log: None,
        }
    }

    /// How long to wait for the next event.
    fn wait(&self) -> Duration {
        let now = Instant::now();
        let tick = self.next_tick.saturating_duration_since(now);
        if self.dirty {
            tick.min((self.last_flush + FLUSH_INTERVAL).saturating_duration_since(now))
        } else {
            tick
        }
    }

    fn write(&mut self, w: &mut writer::Writer, event: &Event, dropped: &AtomicU64) {
        if self.paused_until.is_some_and(|t| Instant::now() < t) {
            dropped.fetch_add(1, Ordering::Relaxed);
            return;
        }
        self.paused_until = None;
        match w.write(event, unix_millis()) {
            Ok(true) => self.dirty = true,
            Ok(false) => {
                dropped.fetch_add(1, Ordering::Relaxed);
            }
            Err(e) => {
                dropped.fetch_add(1, Ordering::Relaxed);
                error!(error = %e, "journal: cannot write; events are dropped for a while");
                w.failed(unix_millis());
                if let Err(e) = w.seal() {
                    warn!(error = %e, "journal: cannot seal the segment (indexed at next start)");
                }
                self.paused_until = Some(Instant::now() + RETRY_AFTER_ERROR);
            }
        }
    }

    fn housekeep(&mut self, w: &mut writer::Writer, dropped: &AtomicU64) {
        let now = Instant::now();
        if self.dirty && now >= self.last_flush + FLUSH_INTERVAL {
            if let Err(e) = w.flush() {
                error!(error = %e, "journal: cannot write out its buffer");
            }
            self.dirty = false;
            self.last_flush = now;
        }
        if now < self.next_tick {
            return;
        }
        self.next_tick = now + TICK;
        if let Err(e) = w.tick(unix_millis()) {
            error!(error = %e, "journal: housekeeping failed");
        }
        let total = dropped.load(Ordering::Relaxed);
        let quiet = self
            .last_drop_log
            .is_none_or(|t| now.duration_since(t) >= DROP_LOG_INTERVAL);
        if total > self.logged_drops && quiet {
            warn!(
                dropped = total - self.logged_drops,
                total, "journal: events dropped (writer behind, short of space, or failing)"
            );
            self.logged_drops = total;
            self.last_drop_log = Some(now);
        }
    }
}

/// Why the journal could not be read.
#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    /// A journal file could not be listed or read.
    #[error("{path}: {source}")]
    Io {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
}

/// Call `visit` with every journaled event of `spool` at or after `since_ms` (Unix
/// milliseconds), segment by segment, each in the order the events were recorded: time order
/// to within the moment between an event's timestamp and its append (milliseconds). For
/// `portcullis status` without a running relay (the flow of the last hour) and for `trace`.
/// Corrupt or cut lines are skipped; segments that end before `since_ms` are not read.
///
/// # Errors
/// [`JournalError::Io`] when the journal directory or a file cannot be read (a missing
/// journal is no error: nothing is visited).
pub fn scan(
    spool: &Spool,
    since_ms: u64,
    visit: &mut dyn FnMut(&Event),
) -> Result<(), JournalError> {
    let dir = dir(spool.root());
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| JournalError::Io { path, source }
    };
    for seg in segment::list(&dir).map_err(io(&dir))? {
        if !seg.reaches(since_ms) {
            continue;
        }
        segment::lines(&seg.path, &mut |line| {
            if let Some(event) = segment::parse(line).filter(|e| e.at >= since_ms) {
                visit(&event);
            }
        })
        .map_err(io(&seg.path))?;
    }
    Ok(())
}

/// The events of `query` at or after `since_ms` in the journal of the spool at `root`: what
/// `portcullis trace` prints. A missing journal finds nothing.
///
/// # Errors
/// [`JournalError::Io`] when the journal cannot be listed or read.
pub fn trace(root: &Path, query: &Query, since_ms: u64) -> Result<Found, JournalError> {
    let dir = dir(root);
    query::find(&dir, query, since_ms).map_err(|source| JournalError::Io { path: dir, source })
}
