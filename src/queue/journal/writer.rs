//! The journal's writer: appends events to the open segment, seals segments (writes their
//! sidecar) when they reach their size or age, removes the oldest ones past `journal_keep`,
//! `journal_max_size`, or when the spool's file system runs short of space.
//!
//! [`Writer`] is synchronous and owns the files; the relay drives it from one thread fed by a
//! bounded channel ([`super::Journal`]), and the benchmark drives it directly.

use std::collections::VecDeque;
use std::fs::{self, DirBuilder, File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use super::index::Sidecar;
use super::segment::{self, Contents, Segment};
use super::state::{self, Reason, Stop};
use crate::config::Log;
use crate::observe::Event;
use crate::observe::event::unix_millis;

/// Largest segment, in octets, before it is sealed and a new one opened.
pub const SEGMENT_MAX: u64 = 64 << 20;
/// Smallest segment limit, however small `journal_max_size` is.
const SEGMENT_MIN: u64 = 64 << 10;
/// Longest a segment stays open, in milliseconds.
pub const SEGMENT_AGE_MS: u64 = 3_600_000;
/// Space the journal leaves free above `limits.min_free_space`, at least: it stops writing
/// when less than `min_free_space` + this margin is free (the margin is `min_free_space`
/// itself when that is larger), and trims its oldest files below twice the margin.
pub const SPACE_MARGIN_MIN: u64 = 64 << 20;
/// Octets written between two looks at the free space (besides the look at every tick).
const SPACE_CHECK_BYTES: u64 = 1 << 20;

/// Free space for unprivileged writers on the journal's file system, in octets.
pub type FreeSpace = Box<dyn FnMut() -> io::Result<u64> + Send>;

/// What bounds the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limits {
    /// `journal_keep`, ms: sealed segments whose last event is older are removed.
    pub keep_ms: u64,
    /// `journal_max_size`, octets: segments and sidecars together; the oldest go first.
    pub max_size: u64,
    /// `limits.min_free_space`, octets (0: the check is off for mail; the journal still keeps
    /// [`SPACE_MARGIN_MIN`] free).
    pub min_free: u64,
    /// Size at which a segment is sealed: [`SEGMENT_MAX`], or an eighth of `max_size` when
    /// that is smaller, so retention removes at most an eighth of the journal at a time.
    pub segment_size: u64,
    /// Age at which a segment is sealed, ms.
    pub segment_age_ms: u64,
}

impl Limits {
    /// The limits of `[log]`, with the spool's `min_free_space` in octets.
    pub fn new(log: &Log, min_free: u64) -> Limits {
        Limits {
            keep_ms: u64::try_from(log.journal_keep.as_millis()).unwrap_or(u64::MAX),
            max_size: log.journal_max_size,
            min_free,
            segment_size: (log.journal_max_size / 8).clamp(SEGMENT_MIN, SEGMENT_MAX),
            segment_age_ms: SEGMENT_AGE_MS,
        }
    }
}

/// What the free space allows the journal.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Room {
    /// Write.
    Plenty,
    /// Write, and remove the oldest files until there is plenty again.
    Trim,
    /// Do not write (the rest is the spool's); remove the oldest files.
    Stop,
}

/// The journal's verdict on `free` octets free with `min_free_space` = `min_free`: stop below
/// `min_free + margin`, trim below `min_free + 2 × margin`, where margin is the larger of
/// `min_free` and [`SPACE_MARGIN_MIN`]. Mail is refused only below `min_free` (plus what is
/// reserved), so the journal never eats into what mail needs.
pub fn room(free: u64, min_free: u64) -> Room {
    let margin = min_free.max(SPACE_MARGIN_MIN);
    if free < min_free.saturating_add(margin) {
        Room::Stop
    } else if free < min_free.saturating_add(margin.saturating_mul(2)) {
        Room::Trim
    } else {
        Room::Plenty
    }
}

/// Octets the file system at `path` would offer unprivileged writers were it empty: its size
/// less the blocks kept for root (`statvfs`).
///
/// # Errors
/// The I/O error of `statvfs`.
pub fn file_system_size(path: &Path) -> io::Result<u64> {
    use std::os::unix::ffi::OsStrExt as _;
    let path = std::ffi::CString::new(path.as_os_str().as_bytes())
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
    let blocks = (stat.f_blocks as u64)
        .saturating_sub((stat.f_bfree as u64).saturating_sub(stat.f_bavail as u64));
    #[allow(clippy::unnecessary_cast)]
    Ok(blocks.saturating_mul(stat.f_frsize as u64))
}

/// check-config's warning when the spool at `spool_dir` (if it exists) is on a file system too
/// small for the journal even when empty: [`room`] would stop it or keep it trimming, so
/// `trace` would find little or nothing. `min_free` is `limits.min_free_space` in octets.
pub fn space_warning(spool_dir: &Path, min_free: u64) -> Option<String> {
    let size = file_system_size(spool_dir).ok()?;
    space_warning_for(spool_dir, size, min_free)
}

/// [`space_warning`] for a file system of `size` octets.
pub(super) fn space_warning_for(spool_dir: &Path, size: u64, min_free: u64) -> Option<String> {
    let margin = min_free.max(SPACE_MARGIN_MIN);
    let mib = |n: u64| n.div_ceil(1 << 20);
    let (what, needed) = match room(size, min_free) {
        Room::Plenty => return None,
        Room::Stop => ("would never write", min_free.saturating_add(margin)),
        Room::Trim => (
            "would keep deleting its oldest files",
            min_free.saturating_add(margin.saturating_mul(2)),
        ),
    };
    Some(format!(
        "server.spool_dir {} is on a file system of {} MiB: the message journal (portcullis \
         trace) {what}, since it leaves limits.min_free_space plus a margin of {} MiB to mail; \
         it needs a file system of more than {} MiB",
        spool_dir.display(),
        mib(size),
        mib(margin),
        mib(needed)
    ))
}

/// A sealed segment, as retention sees it.
#[derive(Debug)]
struct Sealed {
    path: PathBuf,
    /// Time of its last event, Unix ms.
    last_at: u64,
    /// Segment and sidecar, octets.
    bytes: u64,
}

/// The segment being written.
#[derive(Debug)]
struct Open {
    path: PathBuf,
    out: BufWriter<File>,
    opened_ms: u64,
    contents: Contents,
}

/// The journal's files in one directory, written by one writer.
pub struct Writer {
    dir: PathBuf,
    limits: Limits,
    open: Option<Open>,
    sealed: VecDeque<Sealed>,
    free_space: FreeSpace,
    /// Not writing since when and why (mirrored by a marker file, [`state`]): below the
    /// space floor events are not written; after a write error the next one tries again.
    stop: Option<Stop>,
    /// A segment was removed since gap markers were last pruned.
    removed: bool,
    since_space_check: u64,
    /// The line being written, kept between events so that serializing one allocates
    /// nothing once it has grown to the longest event.
    line: Vec<u8>,
}

impl std::fmt::Debug for Writer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Writer")
            .field("dir", &self.dir)
            .field("limits", &self.limits)
            .field("open", &self.open.as_ref().map(|o| &o.path))
            .field("sealed", &self.sealed.len())
            .field("stop", &self.stop)
            .finish()
    }
}

impl Writer {
    /// The writer of `dir` (created 0700 when missing). Segments a crash left without a
    /// sidecar are indexed now; stale temporary files and sidecars without segment removed.
    /// A stop the markers record carries on until the free space (looked at now) allows
    /// writing.
    ///
    /// # Errors
    /// The I/O error of creating or listing `dir`.
    pub fn open(dir: &Path, limits: Limits, free_space: FreeSpace) -> io::Result<Writer> {
        DirBuilder::new().recursive(true).mode(0o700).create(dir)?;
        remove_strays(dir)?;
        let sealed = segment::segment_paths(dir)?
            .iter()
            .map(|path| recover(path))
            .collect();
        let mut w = Writer {
            dir: dir.to_path_buf(),
            limits,
            open: None,
            sealed,
            free_space,
            stop: state::stopped(dir)?,
            removed: true,
            since_space_check: 0,
            line: Vec::with_capacity(1024),
        };
        // Before the first event: a journal that has no room must not write one.
        if let Err(e) = w.check_space() {
            warn!(error = %e, "journal: cannot look at the free space");
        }
        w.prune_gaps();
        Ok(w)
    }

    /// Append `event` at `now_ms` (Unix ms; opens a segment when none is). Returns false when
    /// the event was not written because space is short.
    ///
    /// # Errors
    /// The I/O error of opening the segment or writing to it (the event is lost).
    pub fn write(&mut self, event: &Event, now_ms: u64) -> io::Result<bool> {
        if self.stopped() {
            return Ok(false);
        }
        self.line.clear();
        serde_json::to_writer(&mut self.line, event).map_err(io::Error::other)?;
        self.line.push(b'\n');
        let len = self.line.len() as u64;
        if self.open.is_none() {
            self.open = Some(self.create(now_ms)?);
        }
        let open = self.open.as_mut().expect("opened above");
        open.out.write_all(&self.line)?;
        if self.stop.is_some() {
            // Stopped by a write error, and writing again.
            self.resume(now_ms);
        }
        let open = self.open.as_mut().expect("opened above");
        open.contents.span.length += len;
        open.contents.add(event);
        let full = open.contents.span.length >= self.limits.segment_size;
        self.since_space_check += len;
        if full {
            self.seal()?;
            self.enforce_size()?;
        }
        if self.since_space_check >= SPACE_CHECK_BYTES {
            self.check_space()?;
        }
        Ok(true)
    }

    /// Write what is buffered to the open segment (no fsync: see the module doc of
    /// `journal`).
    ///
    /// # Errors
    /// The I/O error of the write.
    pub fn flush(&mut self) -> io::Result<()> {
        match &mut self.open {
            Some(open) => open.out.flush(),
            None => Ok(()),
        }
    }

    /// Housekeeping at `now_ms`: flush, seal a segment open for [`Limits::segment_age_ms`],
    /// remove segments past `journal_keep` and `journal_max_size`, look at the free space.
    ///
    /// # Errors
    /// The first I/O error met.
    pub fn tick(&mut self, now_ms: u64) -> io::Result<()> {
        self.flush()?;
        let aged = self
            .open
            .as_ref()
            .is_some_and(|o| now_ms.saturating_sub(o.opened_ms) >= self.limits.segment_age_ms);
        if aged {
            self.seal()?;
        }
        let horizon = now_ms.saturating_sub(self.limits.keep_ms);
        while self.sealed.front().is_some_and(|s| s.last_at < horizon) {
            self.remove_oldest()?;
        }
        self.enforce_size()?;
        self.check_space()?;
        self.prune_gaps();
        Ok(())
    }

    /// Seal the open segment: flush it and write its sidecar. Nothing open: nothing done.
    ///
    /// # Errors
    /// The I/O error of the flush or the sidecar (the segment is then indexed at next start).
    pub fn seal(&mut self) -> io::Result<()> {
        let Some(mut open) = self.open.take() else {
            return Ok(());
        };
        let span = open.contents.span();
        let written = open
            .out
            .flush()
            .and_then(|()| open.contents.write_index(&open.path));
        let index_len = fs::metadata(Segment::index_path(&open.path)).map_or(0, |m| m.len());
        // Counted for retention even when its index could not be written.
        self.sealed.push_back(Sealed {
            path: open.path,
            last_at: span.last_at,
            bytes: span.length + index_len,
        });
        written
    }

    /// Octets of segments and sidecars, the open segment included.
    pub fn total_size(&self) -> u64 {
        let open = self.open.as_ref().map_or(0, |o| o.contents.span.length);
        self.sealed.iter().map(|s| s.bytes).sum::<u64>() + open
    }

    /// Whether events are refused for lack of space.
    pub fn stopped(&self) -> bool {
        self.stop.is_some_and(|s| s.reason == Reason::Space)
    }

    /// Since when and why it is not writing, if it is not.
    pub fn stop(&self) -> Option<Stop> {
        self.stop
    }

    /// A write failed at `now_ms`: stopped (and marked so) until a write succeeds.
    pub fn failed(&mut self, now_ms: u64) {
        self.stop_for(Reason::WriteError, now_ms);
    }

    /// Not writing from `now_ms` for `reason`: the marker says so even when the relay is
    /// stopped. A stop already in place keeps its time (and takes the new reason).
    fn stop_for(&mut self, reason: Reason, now_ms: u64) {
        match &mut self.stop {
            Some(stop) if stop.reason == reason => {}
            Some(stop) => {
                if let Err(e) = state::change_reason(&self.dir, stop.since_ms, stop.reason, reason)
                {
                    warn!(error = %e, "journal: cannot update its stopped marker");
                }
                stop.reason = reason;
            }
            None => {
                self.stop = Some(Stop {
                    since_ms: now_ms,
                    until_ms: None,
                    reason,
                });
                if let Err(e) = state::mark_stopped(&self.dir, now_ms, reason) {
                    warn!(error = %e, "journal: cannot leave its stopped marker");
                }
            }
        }
    }

    /// Writing again at `now_ms`: the stop's marker becomes a gap marker.
    fn resume(&mut self, now_ms: u64) {
        self.stop = None;
        if let Err(e) = state::mark_resumed(&self.dir, now_ms) {
            warn!(error = %e, "journal: cannot turn its stopped marker into a gap marker");
        }
    }

    /// Remove gap markers older than what the journal holds, after a segment went.
    fn prune_gaps(&mut self) {
        if !std::mem::take(&mut self.removed) {
            return;
        }
        let pruned =
            state::oldest_event(&self.dir).and_then(|oldest| state::prune_gaps(&self.dir, oldest));
        if let Err(e) = pruned {
            warn!(error = %e, "journal: cannot prune its gap markers");
        }
    }

    /// A new segment file named after `now_ms` (one millisecond later while the name is
    /// taken).
    fn create(&self, now_ms: u64) -> io::Result<Open> {
        let mut at = now_ms;
        loop {
            let path = self.dir.join(segment::name_at(at));
            let opened = OpenOptions::new()
                .append(true)
                .create_new(true)
                .mode(0o600)
                .open(&path);
            match opened {
                Ok(file) => {
                    return Ok(Open {
                        path,
                        out: BufWriter::with_capacity(64 << 10, file),
                        opened_ms: now_ms,
                        contents: Contents::default(),
                    });
                }
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => at += 1,
                Err(e) => return Err(e),
            }
        }
    }

    /// Remove the oldest sealed segments while the journal is over `journal_max_size`.
    fn enforce_size(&mut self) -> io::Result<()> {
        while self.total_size() > self.limits.max_size && !self.sealed.is_empty() {
            self.remove_oldest()?;
        }
        Ok(())
    }

    /// Act on the free space: trim while short, stop below the floor, resume above it.
    fn check_space(&mut self) -> io::Result<()> {
        self.since_space_check = 0;
        let min_free = self.limits.min_free;
        let mut verdict = room((self.free_space)()?, min_free);
        while verdict != Room::Plenty && !self.sealed.is_empty() {
            self.remove_oldest()?;
            verdict = room((self.free_space)()?, min_free);
        }
        if verdict == Room::Stop && self.open.is_some() {
            // Nothing sealed is left: the open segment goes too, before mail runs short.
            // It is removed at once: whether its index could be written does not matter.
            let _ = self.seal();
            self.remove_oldest()?;
            verdict = room((self.free_space)()?, min_free);
        }
        match (verdict, self.stop.map(|s| s.reason)) {
            (Room::Stop, Some(Reason::Space)) | (Room::Trim | Room::Plenty, None) => {}
            (Room::Stop, _) => {
                self.stop_for(Reason::Space, unix_millis());
                warn!(
                    min_free_space = min_free,
                    "journal: stopped, the spool's file system is short of space; events are \
                     not journaled until space returns"
                );
            }
            (Room::Plenty, Some(_)) => {
                self.resume(unix_millis());
                info!("journal: space returned, journaling again");
            }
            // Short of space but above the floor: a stop carries on until space returns
            // (a write error's stop ends at the next write that succeeds).
            (Room::Trim, Some(_)) => {}
        }
        Ok(())
    }

    fn remove_oldest(&mut self) -> io::Result<()> {
        let Some(oldest) = self.sealed.pop_front() else {
            return Ok(());
        };
        self.removed = true;
        remove_if_present(&oldest.path)?;
        remove_if_present(&Segment::index_path(&oldest.path))
    }
}

fn remove_if_present(path: &Path) -> io::Result<()> {
    match fs::remove_file(path) {
        Err(e) if e.kind() != io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// A segment found at start: its sidecar read, or written now when a crash left it
/// unsealed. A segment that cannot be indexed is still counted (and scanned in full by
/// queries) with its modification time as its last event.
fn recover(path: &Path) -> Sealed {
    let sidecar = Sidecar::open(&Segment::index_path(path)).or_else(|_| {
        info!(segment = %path.display(), "journal: indexing a segment left unsealed");
        segment::reindex(path)?;
        Sidecar::open(&Segment::index_path(path))
    });
    let seg_len = fs::metadata(path).map_or(0, |m| m.len());
    match sidecar {
        Ok(s) => {
            let idx_len = fs::metadata(Segment::index_path(path)).map_or(0, |m| m.len());
            Sealed {
                path: path.to_path_buf(),
                last_at: s.span.last_at,
                bytes: seg_len + idx_len,
            }
        }
        Err(e) => {
            warn!(segment = %path.display(), error = %e, "journal: cannot index segment");
            let mtime = fs::metadata(path)
                .and_then(|m| m.modified())
                .ok()
                .and_then(|t| t.duration_since(std::time::UNIX_EPOCH).ok())
                .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX));
            Sealed {
                path: path.to_path_buf(),
                last_at: mtime,
                bytes: seg_len,
            }
        }
    }
}

/// Remove temporary sidecars and sidecars whose segment is gone.
fn remove_strays(dir: &Path) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let path = entry?.path();
        let stray = match path.extension().and_then(|e| e.to_str()) {
            Some("tmp") => true,
            Some(segment::INDEX_EXT) => !path.with_extension(segment::SEGMENT_EXT).exists(),
            _ => false,
        };
        if stray {
            remove_if_present(&path)?;
        }
    }
    Ok(())
}
