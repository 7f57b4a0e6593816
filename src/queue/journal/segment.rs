//! Journal segment files: their names, listing them, reading their lines, and the keys an
//! event is indexed under.
//!
//! A segment is `SPOOL/journal/YYYYMMDDTHHMMSS.mmmZ.jsonl` (the UTC time it was opened, so
//! names sort by time), one [`Event`] as JSON per line. Once sealed it has a sidecar
//! `….idx` ([`super::index`]).

use std::collections::HashSet;
use std::fs::{self, File};
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};

use super::index::{self, KeyKind, Sidecar};
use crate::observe::Event;

/// Extension of a segment.
pub const SEGMENT_EXT: &str = "jsonl";
/// Extension of a sidecar index.
pub const INDEX_EXT: &str = "idx";
/// Longest journal line read, in octets; a longer one (hostile, or corrupt) is skipped. An
/// event with 1,000 recipients of 254 octets is about 260 KB.
pub const MAX_LINE: usize = 1 << 20;

/// The file name of a segment opened at `ms` (Unix milliseconds): its
/// [`super::show::rfc3339_ms`] time without the `-` and `:` separators.
pub fn name_at(ms: u64) -> String {
    let mut name = super::show::rfc3339_ms(ms);
    name.retain(|c| c != '-' && c != ':');
    name.push('.');
    name.push_str(SEGMENT_EXT);
    name
}

/// One segment on disk.
#[derive(Debug)]
pub struct Segment {
    /// The `.jsonl` file.
    pub path: PathBuf,
    /// Its sidecar, when it has a valid one (sealed).
    pub index: Option<Sidecar>,
}

impl Segment {
    /// The sidecar's path of the segment at `path`.
    pub fn index_path(path: &Path) -> PathBuf {
        path.with_extension(INDEX_EXT)
    }

    /// Whether the segment may hold events at or after `since_ms` (true when unknown).
    pub fn reaches(&self, since_ms: u64) -> bool {
        self.index
            .as_ref()
            .is_none_or(|i| i.span.last_at >= since_ms)
    }
}

/// Every segment in `dir`, oldest first, with its sidecar opened when valid. A missing `dir`
/// is an empty journal.
///
/// # Errors
/// The I/O error of listing `dir`.
pub fn list(dir: &Path) -> io::Result<Vec<Segment>> {
    Ok(segment_paths(dir)?
        .into_iter()
        .map(|path| {
            let index = Sidecar::open(&Segment::index_path(&path)).ok();
            Segment { path, index }
        })
        .collect())
}

/// The paths of the segments in `dir`, oldest first (their names sort by time; none when
/// `dir` is missing).
pub fn segment_paths(dir: &Path) -> io::Result<Vec<PathBuf>> {
    let entries = match fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(e),
    };
    let mut paths = Vec::new();
    for entry in entries {
        let path = entry?.path();
        if path.extension().is_some_and(|e| e == SEGMENT_EXT) {
            paths.push(path);
        }
    }
    paths.sort();
    Ok(paths)
}

/// Call `visit` with every whole line of the segment at `path` (without its `\n`). A final
/// line without `\n` (being written right now, or cut by a crash) and lines over
/// [`MAX_LINE`] are skipped. A segment removed meanwhile (retention) reads as empty.
///
/// # Errors
/// The I/O error of opening or reading the file.
pub fn lines(path: &Path, visit: &mut dyn FnMut(&[u8])) -> io::Result<()> {
    let file = match File::open(path) {
        Ok(file) => file,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
        Err(e) => return Err(e),
    };
    let mut reader = BufReader::with_capacity(1 << 20, file);
    let mut line = Vec::with_capacity(1024);
    loop {
        line.clear();
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(());
        }
        if line.last() != Some(&b'\n') {
            if line.len() <= MAX_LINE {
                // End of file inside a line: not whole yet.
                return Ok(());
            }
            skip_line(&mut reader)?;
            continue;
        }
        line.pop();
        visit(&line);
    }
}

/// Read up to and including the next `\n` without keeping it.
fn skip_line(reader: &mut impl BufRead) -> io::Result<()> {
    loop {
        let buf = reader.fill_buf()?;
        if buf.is_empty() {
            return Ok(());
        }
        match buf.iter().position(|&b| b == b'\n') {
            Some(i) => {
                reader.consume(i + 1);
                return Ok(());
            }
            None => {
                let n = buf.len();
                reader.consume(n);
            }
        }
    }
}

/// One journal line as an event; `None` for anything else (corrupt, truncated, foreign).
pub fn parse(line: &[u8]) -> Option<Event> {
    serde_json::from_slice(line).ok()
}

/// A Message-ID as indexed and compared: without surrounding blanks and angle brackets,
/// ASCII lower case.
pub fn message_id_key(text: &str) -> String {
    let t = text.trim();
    let t = t.strip_prefix('<').unwrap_or(t);
    let t = t.strip_suffix('>').unwrap_or(t);
    t.to_ascii_lowercase()
}

/// Add the key hashes of `event` to `keys`: its queue id, Message-ID, sender and
/// recipients, client IP.
fn add_keys(event: &Event, keys: &mut HashSet<u64>) {
    if let Some(id) = &event.id {
        keys.insert(index::key_hash(KeyKind::Id, id));
    }
    if let Some(mid) = &event.message_id {
        keys.insert(index::key_hash(KeyKind::MessageId, &message_id_key(mid)));
    }
    for addr in event.from.iter().chain(&event.rcpts) {
        if !addr.is_empty() {
            keys.insert(index::key_hash(
                KeyKind::Address,
                &addr.to_ascii_lowercase(),
            ));
        }
    }
    if let Some(ip) = event.client {
        keys.insert(index::key_hash(KeyKind::Client, &ip.to_string()));
    }
}

/// What a segment's sidecar is made of, gathered event by event: the key hashes of its
/// events and its [`Span`](index::Span) (the writer adds each line's length to
/// `span.length`; [`reindex`] takes the file's).
#[derive(Debug)]
pub struct Contents {
    /// Times and count of the events added, and the segment's length.
    pub span: index::Span,
    keys: HashSet<u64>,
}

impl Default for Contents {
    fn default() -> Contents {
        Contents {
            span: index::Span {
                first_at: u64::MAX,
                last_at: 0,
                events: 0,
                length: 0,
            },
            keys: HashSet::new(),
        }
    }
}

impl Contents {
    /// Count `event`: its keys and time.
    pub fn add(&mut self, event: &Event) {
        add_keys(event, &mut self.keys);
        self.span.first_at = self.span.first_at.min(event.at);
        self.span.last_at = self.span.last_at.max(event.at);
        self.span.events += 1;
    }

    /// The span as the sidecar records it (`first_at` 0 when no event was added).
    pub fn span(&self) -> index::Span {
        let mut span = self.span;
        if span.events == 0 {
            span.first_at = 0;
        }
        span
    }

    /// Write the sidecar of the segment at `path`.
    ///
    /// # Errors
    /// The I/O error of [`index::write`].
    pub fn write_index(&self, path: &Path) -> io::Result<()> {
        index::write(&Segment::index_path(path), &self.keys, self.span())
    }
}

/// Index the segment at `path` from its contents (a segment left without sidecar by a
/// crash): collect its keys and span, and write its sidecar.
///
/// # Errors
/// The I/O error of reading the segment or writing the sidecar.
pub fn reindex(path: &Path) -> io::Result<()> {
    let mut contents = Contents::default();
    contents.span.length = fs::metadata(path)?.len();
    lines(path, &mut |line| {
        if let Some(event) = parse(line) {
            contents.add(&event);
        }
    })?;
    contents.write_index(path)
}
