//! Finding the events of a query: what `portcullis trace` asks.
//!
//! A query names a queue id, a Message-ID, an address or a client IP. The events that match it
//! directly are found first, through the sidecars: only segments whose filter may hold the key
//! (and segments without sidecar: the open one, or one a crash left) are read, and in them
//! only lines that contain the key's text are parsed. Their queue ids are then looked up the
//! same way, which gives each message's whole timeline (a `delivered` event names no
//! Message-ID, a `finished` one no address). Matching events without queue id (refusals) are
//! kept as they are.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::fmt;
use std::io;
use std::net::IpAddr;
use std::path::Path;
use std::str::FromStr;

use super::index::{self, KeyKind};
use super::segment::{self, Segment};
use crate::envelope::{Address, QueueId};
use crate::observe::{Event, EventKind};

/// Most messages a query returns; past it, the most recent ones are kept and
/// [`Found::truncated`] says how many were left out (narrow the query with `--since`).
pub const MAX_MESSAGES: usize = 10_000;
/// Most refusals without queue id a query returns (the most recent are kept).
pub const MAX_REFUSALS: usize = 10_000;
/// Above this many queue ids, a segment's whole filter is read once instead of one block
/// per id.
const LOAD_FILTER_ABOVE: usize = 8;

/// What `trace` looks for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Query {
    /// A queue id.
    Id(QueueId),
    /// A Message-ID, given with angle brackets (stored without them, lower case).
    MessageId(String),
    /// `local@domain` without brackets: an address, or a Message-ID written without its
    /// brackets (both are looked for). Stored in canonical form, lower case.
    AddressOrMessageId {
        /// The address in canonical form (IDNA A-label domain), lower case.
        address: String,
        /// The text as a Message-ID key.
        message_id: String,
    },
    /// A client IP.
    Client(IpAddr),
}

/// A query `trace` cannot take.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "{0:?} is not a queue id (16 characters of 0-9 and A-Z), a Message-ID (<…>), an address \
     (local@domain) or an IP address"
)]
pub struct BadQuery(pub String);

impl FromStr for Query {
    type Err = BadQuery;

    fn from_str(text: &str) -> Result<Query, BadQuery> {
        let t = text.trim();
        let bad = || BadQuery(text.to_string());
        if t.is_empty() || t.len() > 998 {
            return Err(bad());
        }
        if let Ok(id) = t.parse::<QueueId>() {
            return Ok(Query::Id(id));
        }
        if let Ok(ip) = t.parse::<IpAddr>() {
            return Ok(Query::Client(ip));
        }
        // An address the relay accepts, in any form it accepts (a quoted local part may hold
        // blanks, `<` and `>`), compared in the canonical form the journal stores.
        if let Ok(address) = Address::parse(t) {
            return Ok(Query::AddressOrMessageId {
                address: address.to_string().to_ascii_lowercase(),
                message_id: segment::message_id_key(t),
            });
        }
        if t.starts_with('<') && t.ends_with('>') && t.len() > 2 {
            return Ok(Query::MessageId(segment::message_id_key(t)));
        }
        if t.contains('@') && !t.contains(['<', '>']) && !t.chars().any(char::is_whitespace) {
            // Not an address: a Message-ID written without brackets (or an address the
            // journal may hold in an older form), looked for as both.
            return Ok(Query::AddressOrMessageId {
                address: t.to_ascii_lowercase(),
                message_id: segment::message_id_key(t),
            });
        }
        Err(bad())
    }
}

impl fmt::Display for Query {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Query::Id(id) => write!(f, "queue id {id}"),
            Query::MessageId(m) => write!(f, "Message-ID <{m}>"),
            Query::AddressOrMessageId { address, .. } => write!(f, "{address}"),
            Query::Client(ip) => write!(f, "client {ip}"),
        }
    }
}

impl Query {
    /// The index keys of the query (any may match).
    fn keys(&self) -> Vec<u64> {
        match self {
            Query::Id(id) => vec![index::key_hash(KeyKind::Id, id.as_str())],
            Query::MessageId(m) => vec![index::key_hash(KeyKind::MessageId, m)],
            Query::AddressOrMessageId {
                address,
                message_id,
            } => vec![
                index::key_hash(KeyKind::Address, address),
                index::key_hash(KeyKind::MessageId, message_id),
            ],
            Query::Client(ip) => vec![index::key_hash(KeyKind::Client, &ip.to_string())],
        }
    }

    /// Lower-case texts one of which a matching line contains (before JSON parsing). The
    /// JSON escaping of each is what is looked for, since that is how it is written.
    fn needles(&self) -> Vec<String> {
        let json = |s: &str| {
            let quoted = serde_json::to_string(s).unwrap_or_default();
            quoted[1..quoted.len().saturating_sub(1).max(1)].to_ascii_lowercase()
        };
        match self {
            Query::Id(id) => vec![json(id.as_str())],
            Query::MessageId(m) => vec![json(m)],
            Query::AddressOrMessageId {
                address,
                message_id,
            } => vec![json(address), json(message_id)],
            Query::Client(ip) => vec![json(&ip.to_string())],
        }
    }

    /// Whether `event` matches the query itself (not through its queue id).
    pub fn matches(&self, event: &Event) -> bool {
        let mid = |m: &str| {
            event
                .message_id
                .as_deref()
                .is_some_and(|e| segment::message_id_key(e) == m)
        };
        let addr = |a: &str| {
            event
                .from
                .iter()
                .chain(&event.rcpts)
                .any(|e| e.eq_ignore_ascii_case(a))
        };
        match self {
            Query::Id(id) => event.id.as_deref() == Some(id.as_str()),
            Query::MessageId(m) => mid(m),
            Query::AddressOrMessageId {
                address,
                message_id,
            } => addr(address) || mid(message_id),
            Query::Client(ip) => event.client == Some(*ip),
        }
    }
}

/// What a query found.
#[derive(Debug, Default, PartialEq)]
pub struct Found {
    /// Per message, its events in time order; messages ordered by their first event.
    pub messages: Vec<(String, Vec<Event>)>,
    /// Matching refusals without queue id, in time order.
    pub refusals: Vec<Event>,
    /// Messages that matched beyond [`MAX_MESSAGES`] (left out: the oldest).
    pub truncated: usize,
}

impl Found {
    /// Nothing matched.
    pub fn is_empty(&self) -> bool {
        self.messages.is_empty() && self.refusals.is_empty()
    }
}

/// Find the events of `query` at or after `since_ms` in the journal directory `dir`: at most
/// [`MAX_MESSAGES`] messages and [`MAX_REFUSALS`] refusals.
///
/// # Errors
/// The I/O error of listing `dir` or reading a segment or sidecar (a segment removed
/// meanwhile by retention is no error).
pub fn find(dir: &Path, query: &Query, since_ms: u64) -> io::Result<Found> {
    find_at_most(dir, query, since_ms, MAX_MESSAGES, MAX_REFUSALS)
}

/// [`find`] keeping the `max_messages` most recent messages and the `max_refusals` most
/// recent refusals. Refusals are cut back to the most recent while the segments are read, so
/// a client refused millions of times costs about twice the answer's memory, not the
/// journal's.
pub(super) fn find_at_most(
    dir: &Path,
    query: &Query,
    since_ms: u64,
    max_messages: usize,
    max_refusals: usize,
) -> io::Result<Found> {
    let segments: Vec<Segment> = segment::list(dir)?
        .into_iter()
        .filter(|s| s.reaches(since_ms))
        .collect();
    if let Query::Id(id) = query {
        // The query is the message's own key: its timeline is the whole answer.
        let ids = HashSet::from([id.to_string()]);
        return Ok(Found {
            messages: timelines(&segments, &ids, since_ms)?,
            ..Found::default()
        });
    }
    let keys = query.keys();
    let needles = query.needles();
    let mut first_seen: HashMap<String, u64> = HashMap::new();
    let mut refusals = Vec::new();
    for seg in &segments {
        if !may_hold_any(seg, &keys)? {
            continue;
        }
        scan_matching(seg, &needles, &mut |event| {
            if event.at < since_ms || !query.matches(&event) {
                return;
            }
            match event.id.clone() {
                Some(id) => {
                    let at = first_seen.entry(id).or_insert(event.at);
                    *at = (*at).min(event.at);
                }
                None if event.kind == EventKind::Refused => {
                    refusals.push(event);
                    if refusals.len() >= max_refusals.saturating_mul(2).max(1) {
                        keep_newest(&mut refusals, max_refusals);
                    }
                }
                None => {}
            }
        })?;
    }
    let (ids, truncated) = newest(first_seen, max_messages);
    let messages = timelines(&segments, &ids, since_ms)?;
    keep_newest(&mut refusals, max_refusals);
    Ok(Found {
        messages,
        refusals,
        truncated,
    })
}

/// Sort `events` by time (a stable sort: ties stay in the order read) and keep the `max`
/// most recent.
fn keep_newest(events: &mut Vec<Event>, max: usize) {
    events.sort_by_key(|e| e.at);
    if events.len() > max {
        events.drain(..events.len() - max);
    }
}

/// The `max` ids seen most recently, and how many were left out.
fn newest(first_seen: HashMap<String, u64>, max: usize) -> (HashSet<String>, usize) {
    let mut all: Vec<(String, u64)> = first_seen.into_iter().collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
    let left_out = all.len().saturating_sub(max);
    (
        all.into_iter().take(max).map(|(id, _)| id).collect(),
        left_out,
    )
}

/// Whether the segment may hold one of `keys` (always, without a sidecar).
fn may_hold_any(seg: &Segment, keys: &[u64]) -> io::Result<bool> {
    let Some(sidecar) = &seg.index else {
        return Ok(true);
    };
    if keys.len() > LOAD_FILTER_ABOVE {
        let filter = sidecar.load()?;
        return Ok(keys.iter().any(|&k| filter.may_contain(k)));
    }
    for &k in keys {
        if sidecar.may_contain(k)? {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Parse and hand to `visit` the lines of `seg` that contain one of `needles` (compared in
/// ASCII lower case).
fn scan_matching(
    seg: &Segment,
    needles: &[String],
    visit: &mut dyn FnMut(Event),
) -> io::Result<()> {
    let mut lower = String::new();
    segment::lines(&seg.path, &mut |line| {
        let Ok(text) = std::str::from_utf8(line) else {
            return;
        };
        lower.clear();
        lower.push_str(text);
        lower.make_ascii_lowercase();
        if needles.iter().any(|n| lower.contains(n.as_str()))
            && let Some(event) = segment::parse(line)
        {
            visit(event);
        }
    })
}

/// Every event of the messages `ids` at or after `since_ms`, per message in time order,
/// messages ordered by their first event.
fn timelines(
    segments: &[Segment],
    ids: &HashSet<String>,
    since_ms: u64,
) -> io::Result<Vec<(String, Vec<Event>)>> {
    if ids.is_empty() {
        return Ok(Vec::new());
    }
    let keys: Vec<u64> = ids
        .iter()
        .map(|id| index::key_hash(KeyKind::Id, id))
        .collect();
    let mut by_id: BTreeMap<String, Vec<Event>> = BTreeMap::new();
    for seg in segments {
        if !may_hold_any(seg, &keys)? {
            continue;
        }
        segment::lines(&seg.path, &mut |line| {
            let Some(id) = line_id(line) else { return };
            if !ids.contains(id) {
                return;
            }
            if let Some(event) =
                segment::parse(line).filter(|e| e.at >= since_ms && e.id.as_deref() == Some(id))
            {
                by_id.entry(id.to_string()).or_default().push(event);
            }
        })?;
    }
    let mut messages: Vec<(String, Vec<Event>)> = by_id.into_iter().collect();
    for (_, events) in &mut messages {
        events.sort_by_key(|e| e.at);
    }
    messages.sort_by(|a, b| a.1[0].at.cmp(&b.1[0].at).then_with(|| a.0.cmp(&b.0)));
    Ok(messages)
}

/// The queue id of a journal line, found without parsing it: the value of its `"id"` key.
/// Inside a JSON string a `"` is escaped, so `"id":"` can only be that key (`upstream_id`
/// and `bounce_id` end in `_id":"`, not `"id":"`). A line this misreads is still parsed and
/// its `id` compared before it is kept.
fn line_id(line: &[u8]) -> Option<&str> {
    const KEY: &[u8] = b"\"id\":\"";
    let start = line.windows(KEY.len()).position(|w| w == KEY)? + KEY.len();
    let rest = line.get(start..)?;
    let end = rest.iter().position(|&b| b == b'"')?;
    std::str::from_utf8(&rest[..end]).ok()
}
