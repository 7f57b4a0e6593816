//! Whether the journal is writing, kept where `trace` and the offline status can read it even
//! when the relay is stopped or the disk is full: zero-byte marker files in `SPOOL/journal/`
//! (creating an empty file needs no data block).
//!
//! ```text
//! stopped-since-1796121720000-short-of-space      the writer has not written since then (Unix ms)
//! gap-1796121720000-1796125320000-short-of-space  it did not write from the first time to the second
//! ```
//!
//! The writer creates the `stopped-…` marker when it stops and renames it to a `gap-…` marker
//! when it writes again; gaps older than the oldest segment are removed, and at most
//! [`MAX_GAPS`] are kept. Markers are no segments: listing and retention ignore them.

use std::fs::{self, OpenOptions};
use std::io::{self, BufRead, BufReader};
use std::os::unix::fs::OpenOptionsExt;
use std::path::Path;

use super::segment::{self, Segment};

/// Name prefix of the marker of a stopped writer.
const STOPPED: &str = "stopped-since-";
/// Name prefix of the marker of a past stop.
const GAP: &str = "gap-";
/// Most gap markers kept (the newest).
pub const MAX_GAPS: usize = 16;

/// Why the writer stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reason {
    /// The spool's file system is below the journal's margin: the rest is the mail's.
    Space,
    /// Writing failed (the log says how).
    WriteError,
}

impl Reason {
    /// Its name in a marker.
    pub fn slug(self) -> &'static str {
        match self {
            Reason::Space => "short-of-space",
            Reason::WriteError => "write-error",
        }
    }

    /// One line for the status and `trace`.
    pub fn text(self) -> &'static str {
        match self {
            Reason::Space => {
                "the spool's file system is short of space (the journal leaves \
                 min_free_space plus its margin to mail)"
            }
            Reason::WriteError => "its files cannot be written (see the log)",
        }
    }

    fn from_slug(slug: &str) -> Option<Reason> {
        [Reason::Space, Reason::WriteError]
            .into_iter()
            .find(|r| r.slug() == slug)
    }
}

/// A stop, current or past: from `since_ms` to `until_ms` (`None`: still stopped).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stop {
    /// Unix ms when the writer stopped.
    pub since_ms: u64,
    /// Unix ms when it wrote again, for a past stop.
    pub until_ms: Option<u64>,
    /// Why.
    pub reason: Reason,
}

/// What the journal directory says about the writer.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct OnDisk {
    /// Stopped now (as far as the markers say).
    pub stopped: Option<Stop>,
    /// Past stops, oldest first.
    pub gaps: Vec<Stop>,
    /// Unix ms of the oldest event the journal holds.
    pub oldest_ms: Option<u64>,
}

/// Mark the writer of `dir` stopped since `since_ms` for `reason` (a marker already there is
/// kept: it holds the earlier time).
///
/// # Errors
/// The I/O error of listing `dir` or creating the marker.
pub fn mark_stopped(dir: &Path, since_ms: u64, reason: Reason) -> io::Result<()> {
    if read_markers(dir)?.0.is_some() {
        return Ok(());
    }
    let name = format!("{STOPPED}{since_ms}-{}", reason.slug());
    OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(false)
        .mode(0o600)
        .open(dir.join(name))
        .map(drop)
}

/// The stop of `dir` since `since_ms` goes on for another reason: its marker says so.
///
/// # Errors
/// The I/O error of renaming the marker.
pub fn change_reason(dir: &Path, since_ms: u64, from: Reason, to: Reason) -> io::Result<()> {
    fs::rename(
        dir.join(format!("{STOPPED}{since_ms}-{}", from.slug())),
        dir.join(format!("{STOPPED}{since_ms}-{}", to.slug())),
    )
}

/// The writer of `dir` writes again at `now_ms`: its `stopped-…` marker becomes a gap.
///
/// # Errors
/// The I/O error of listing `dir` or renaming the marker.
pub fn mark_resumed(dir: &Path, now_ms: u64) -> io::Result<()> {
    for entry in fs::read_dir(dir)? {
        let entry = entry?;
        let name = entry.file_name();
        let Some(stop) = name.to_str().and_then(parse_stopped) else {
            continue;
        };
        let gap = format!(
            "{GAP}{}-{}-{}",
            stop.since_ms,
            now_ms.max(stop.since_ms),
            stop.reason.slug()
        );
        fs::rename(entry.path(), dir.join(gap))?;
    }
    Ok(())
}

/// The stop `dir`'s markers record now (`None` when writing).
///
/// # Errors
/// The I/O error of listing `dir` (a missing `dir`: not stopped).
pub fn stopped(dir: &Path) -> io::Result<Option<Stop>> {
    Ok(read_markers(dir)?.0)
}

/// Remove the gap markers that end before `oldest_ms` (nothing older is journaled anyway) and
/// all but the newest [`MAX_GAPS`].
///
/// # Errors
/// The I/O error of listing `dir` or removing a marker.
pub fn prune_gaps(dir: &Path, oldest_ms: Option<u64>) -> io::Result<()> {
    let (_, gaps) = read_markers(dir)?;
    let excess = gaps.len().saturating_sub(MAX_GAPS);
    for (i, gap) in gaps.iter().enumerate() {
        let until = gap.until_ms.unwrap_or(u64::MAX);
        if i < excess || oldest_ms.is_none_or(|oldest| until < oldest) {
            match fs::remove_file(dir.join(gap_name(gap))) {
                Err(e) if e.kind() != io::ErrorKind::NotFound => return Err(e),
                _ => {}
            }
        }
    }
    Ok(())
}

/// Everything `dir` says: the markers and the time of the oldest event.
///
/// # Errors
/// The I/O error of listing `dir` (a missing `dir` says nothing).
pub fn read(dir: &Path) -> io::Result<OnDisk> {
    let (stopped, gaps) = read_markers(dir)?;
    Ok(OnDisk {
        stopped,
        gaps,
        oldest_ms: oldest_event(dir)?,
    })
}

/// Unix ms of the first event of the oldest segment of `dir` (its sidecar's, else its first
/// line's); `None` when there is no segment or it holds no event yet.
///
/// # Errors
/// The I/O error of listing `dir`.
pub fn oldest_event(dir: &Path) -> io::Result<Option<u64>> {
    for path in segment::segment_paths(dir)? {
        if let Ok(sidecar) = super::index::Sidecar::open(&Segment::index_path(&path))
            && sidecar.span.events > 0
        {
            return Ok(Some(sidecar.span.first_at));
        }
        let Ok(file) = fs::File::open(&path) else {
            continue;
        };
        let mut first = Vec::new();
        let mut reader = BufReader::new(io::Read::take(file, segment::MAX_LINE as u64));
        if reader.read_until(b'\n', &mut first).is_ok()
            && let Some(event) = segment::parse(first.strip_suffix(b"\n").unwrap_or(&first))
        {
            return Ok(Some(event.at));
        }
    }
    Ok(None)
}

/// The current stop and the past ones (oldest first) of `dir`'s markers.
fn read_markers(dir: &Path) -> io::Result<(Option<Stop>, Vec<Stop>)> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok((None, Vec::new())),
        Err(e) => return Err(e),
    };
    let mut stopped: Option<Stop> = None;
    let mut gaps = Vec::new();
    for entry in entries {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(stop) = parse_stopped(name) {
            // Two markers (a crash between steps): the earlier time holds.
            if stopped.is_none_or(|s| stop.since_ms < s.since_ms) {
                stopped = Some(stop);
            }
        } else if let Some(gap) = parse_gap(name) {
            gaps.push(gap);
        }
    }
    gaps.sort_by_key(|g| (g.since_ms, g.until_ms));
    Ok((stopped, gaps))
}

fn gap_name(gap: &Stop) -> String {
    format!(
        "{GAP}{}-{}-{}",
        gap.since_ms,
        gap.until_ms.unwrap_or(gap.since_ms),
        gap.reason.slug()
    )
}

fn parse_stopped(name: &str) -> Option<Stop> {
    let (since, slug) = name.strip_prefix(STOPPED)?.split_once('-')?;
    Some(Stop {
        since_ms: since.parse().ok()?,
        until_ms: None,
        reason: Reason::from_slug(slug)?,
    })
}

fn parse_gap(name: &str) -> Option<Stop> {
    let mut parts = name.strip_prefix(GAP)?.splitn(3, '-');
    let since_ms = parts.next()?.parse().ok()?;
    let until_ms = parts.next()?.parse().ok()?;
    Some(Stop {
        since_ms,
        until_ms: Some(until_ms),
        reason: Reason::from_slug(parts.next()?)?,
    })
}
