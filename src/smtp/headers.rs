//! The header-field reader: one streaming reading of the header section (RFC 5322 §2.2, §3.6)
//! shared by every end-of-data check, so no two checks can see different fields.
//!
//! [`HeaderFilter`] is fed the message octets as they arrive and, per field:
//! - counts `Received:` fields (the loop detector);
//! - removes the fields an untrusted sender must not set (the header firewall,
//!   [`StripRules`]), including an `Authentication-Results:` or `ARC-Authentication-Results:`
//!   in our name (RFC 8601 §5, RFC 8617 §4.1.1);
//! - hands each complete `From:` and `Sender:` field to a [`FieldInspector`] (the ownership
//!   check of authenticated mail);
//! - keeps the value of the first `Message-ID:` field (RFC 5322 §3.6.4), unfolded, for the
//!   journal ([`HeaderFilter::message_id`]); it streams like any other field, a copy of at
//!   most [`MAX_MESSAGE_ID`] octets is all that is held.
//!
//! Field names are read the way a conformant RFC 5322 reader (mail-parser 0.11) reads them:
//! the name ends at the first colon; white space before the colon (RFC 5322 §4.5.3, obsolete
//! syntax that receivers must accept) is not part of the name; colons before the first name
//! character are skipped; a line with no colon is not a field and is passed on as it is.
//! Lines that continue no field are removed, whatever the rules: folded lines before the first
//! field (upstream they would continue the `Received:` field the relay prepends), and a line
//! without colon followed by folded lines (`Name\r\n : value`: a reader that unfolds first
//! reads the first line as the name, mail-parser the last one, so readers disagree). White space inside a name does not
//! hide a standard one (mail-parser reads `Fr om:` as `From:`), and strip patterns match the
//! name with or without it. A line that starts with white space
//! continues the field before it (folding, §2.2.3).
//!
//! Memory is bounded whatever the client sends: the reader holds at most [`MAX_BUFFERED`]
//! octets. A field that is passed on or removed is decided by its name and then streamed (its
//! value is never held, so lines over 998 octets pass); only the name is held until its colon.
//! `From:`, `Sender:` and `Authentication-Results:` are held whole, up to
//! [`MAX_WHOLE_FIELD`]. A field name or a held field longer than that makes the message
//! refused ([`HeaderFilter::too_large`], `552 5.3.4`): no size ever turns a check off.
//!
//! Differences from mail-parser (checked by the `header_fields` fuzz target):
//! - mail-parser ends the header section at a line of only white space that does not continue
//!   a field; this reader ends it only at an empty line, so such a line and what follows are
//!   still read as header fields (filtering more, never less).
//! - mail-parser's date parser (`Date:`, `Resent-Date:`, the date in `Received:`) reads two
//!   octets after a time-zone letter without looking for a line end, so `Date: -k` swallows
//!   the next line (or the empty line ending the section). RFC 5322 ends the field at that
//!   line end, and so does this reader.

use std::sync::Arc;

use crate::text::{fold_lookalike, is_invisible};

/// The largest field held whole (`From:`, `Sender:`, `Authentication-Results:`), and the
/// largest field name (octets before the colon), in octets including CRLFs: 64 KiB. Longer:
/// the message is refused with `552 5.3.4`.
pub const MAX_WHOLE_FIELD: usize = 64 * 1024;

/// Octets the reader holds at most at any time, whatever the client sends: one field name or
/// one whole field.
pub const MAX_BUFFERED: usize = MAX_WHOLE_FIELD;

/// The longest `Message-ID:` value kept for the journal, in octets as received (folding
/// included): the line limit of RFC 5322 §2.1.1. A longer one is not kept (the message
/// passes; its events have no Message-ID), so no client can make the journal hold more.
pub const MAX_MESSAGE_ID: usize = 998;

/// A header-name pattern: exact (case-insensitive) or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    prefix: String,
    wildcard: bool,
}

impl NamePattern {
    pub fn new(pattern: &str) -> NamePattern {
        match pattern.strip_suffix('*') {
            Some(prefix) => NamePattern {
                prefix: prefix.to_ascii_lowercase(),
                wildcard: true,
            },
            None => NamePattern {
                prefix: pattern.to_ascii_lowercase(),
                wildcard: false,
            },
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        let head = if self.wildcard {
            name.get(..self.prefix.len())
        } else {
            (name.len() == self.prefix.len()).then_some(name)
        };
        head.is_some_and(|h| h.eq_ignore_ascii_case(&self.prefix))
    }
}

/// What to remove from the header section. Compiled once per policy and shared by every
/// message it applies to.
#[derive(Debug, Clone, Default)]
pub struct StripRules {
    /// Header names to remove.
    pub names: Vec<NamePattern>,
    /// Remove every `Authentication-Results:` and `ARC-Authentication-Results:` whose
    /// authserv-id (RFC 8601 §2.5) is this domain (lower case, no trailing dot; compared as
    /// a domain, see `same_domain`), or cannot be read at all: only our own server may claim
    /// to have authenticated a message.
    pub auth_results_for: Option<String>,
}

/// The fields read whole (the `Authentication-Results:` kinds are decided on when complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WholeField {
    From,
    Sender,
    AuthenticationResults,
    /// `ARC-Authentication-Results:` (RFC 8617 §4.1.1): `i=N;` then an
    /// Authentication-Results value.
    ArcAuthenticationResults,
}

impl WholeField {
    fn of(name: &[u8]) -> Option<WholeField> {
        if name.eq_ignore_ascii_case(b"From") {
            Some(WholeField::From)
        } else if name.eq_ignore_ascii_case(b"Sender") {
            Some(WholeField::Sender)
        } else if name.eq_ignore_ascii_case(b"Authentication-Results") {
            Some(WholeField::AuthenticationResults)
        } else if name.eq_ignore_ascii_case(b"ARC-Authentication-Results") {
            Some(WholeField::ArcAuthenticationResults)
        } else {
            None
        }
    }
}

/// Receives each complete `From:` and `Sender:` field (name, colon, value and CRLFs, as
/// received), in order, however far down the header section it stands.
pub trait FieldInspector {
    /// `field` is the whole field as received (name, colon, value, CRLFs); `value` the part
    /// after the colon that ends its name, as the reader found it.
    fn field(&mut self, kind: WholeField, field: &[u8], value: &[u8]);

    /// Every field name as read (white space trimmed), before anything is decided on it.
    fn name(&mut self, _name: &[u8]) {}
}

/// No inspection.
impl FieldInspector for () {
    fn field(&mut self, _: WholeField, _: &[u8], _: &[u8]) {}
}

impl<T: FieldInspector> FieldInspector for Option<T> {
    fn field(&mut self, kind: WholeField, field: &[u8], value: &[u8]) {
        if let Some(inner) = self {
            inner.field(kind, field, value);
        }
    }
}

/// Names of removed fields kept for the log (each cut to 64 characters); the rest are only
/// counted, so a message of many removed fields costs no memory.
pub const MAX_LOGGED_STRIPPED: usize = 16;

/// The name logged for folded lines at the very start of the header section, which continue
/// no field and are removed.
pub const LEADING_FOLDED: &[u8] = b"(folded line before the first field)";

/// Where the reader is in the header section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ReaderState {
    /// At the start of a line that begins a new field (or the end of the section).
    LineStart,
    /// After a CR at the start of a line: the blank line ending the section, if LF follows.
    BlankCr,
    /// Reading a field name (held in `buf`) up to its colon.
    Name,
    /// After the LF ending a line without colon: a space or tab next continues it (folding
    /// before the colon: the field is removed); anything else makes the line no field.
    NameLineEnd,
    /// In a field's value; `Action` says what happens to its octets.
    Value(Action),
    /// After the LF ending a line of the field: a space or tab next continues it.
    LineEnd(Action),
    /// The header section has ended: octets pass untouched.
    Body,
    /// A field was too long: nothing more is emitted, the message is refused.
    TooLarge,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Action {
    /// Emitted as it arrives.
    Pass,
    /// Dropped as it arrives.
    Strip,
    /// Held in `buf` until the field ends.
    Hold(WholeField),
}

/// Streaming header-field reader and filter over the message octets.
#[derive(Debug)]
pub struct HeaderFilter<I: FieldInspector = ()> {
    state: ReaderState,
    /// The current field's name, or the whole field; never over [`MAX_BUFFERED`].
    buf: Vec<u8>,
    /// In `Name`: where the name's first octet is in `buf` (None: not seen yet).
    name_start: Option<usize>,
    /// Of a held field: where its name is in `buf`, and where its value starts (after the
    /// colon that ended the name, which need not be the first colon of the line).
    name_at: (usize, usize),
    value_at: usize,
    rules: Arc<StripRules>,
    received: u32,
    stripped: Vec<String>,
    stripped_count: usize,
    too_large: Option<String>,
    /// False until the first line of the header section has begun.
    started: bool,
    /// A non-ASCII octet was written for the header section (removed fields do not count).
    non_ascii: bool,
    /// The first `Message-ID:` field's value while it is read (at most [`MAX_MESSAGE_ID`]
    /// octets, then `overflow`).
    message_id: MessageIdCapture,
    inspector: I,
}

/// The first `Message-ID:` field of the header section, as it is read.
#[derive(Debug, Default)]
enum MessageIdCapture {
    /// None seen yet.
    #[default]
    Waiting,
    /// Reading its value (the octets so far).
    Reading(Vec<u8>),
    /// Read: its value unfolded and trimmed (`None`: empty, or over [`MAX_MESSAGE_ID`]).
    Done(Option<String>),
}

impl MessageIdCapture {
    /// Octets of the value being read; over the bound, the value is dropped for good.
    fn take_value(&mut self, line: &[u8]) {
        if let MessageIdCapture::Reading(value) = self {
            if value.len() + line.len() > MAX_MESSAGE_ID {
                *self = MessageIdCapture::Done(None);
            } else {
                value.extend_from_slice(line);
            }
        }
    }

    /// The field ended: unfold (RFC 5322 §2.2.3: a CRLF before white space is removed; a
    /// bare CR or LF, refused anyway, is removed too) and trim it.
    fn field_ended(&mut self) {
        if let MessageIdCapture::Reading(value) = self {
            let unfolded: Vec<u8> = value
                .iter()
                .copied()
                .filter(|&b| b != b'\r' && b != b'\n')
                .collect();
            let text = String::from_utf8_lossy(unfolded.trim_ascii());
            *self = MessageIdCapture::Done((!text.is_empty()).then(|| text.into_owned()));
        }
    }
}

impl HeaderFilter<()> {
    /// A filter with no field inspection.
    pub fn new(rules: Arc<StripRules>) -> HeaderFilter<()> {
        HeaderFilter::with_inspector(rules, ())
    }
}

impl<I: FieldInspector> HeaderFilter<I> {
    /// A filter handing `From:` and `Sender:` fields to `inspector`.
    pub fn with_inspector(rules: Arc<StripRules>, inspector: I) -> HeaderFilter<I> {
        HeaderFilter {
            state: ReaderState::LineStart,
            buf: Vec::new(),
            name_start: None,
            name_at: (0, 0),
            value_at: 0,
            rules,
            received: 0,
            stripped: Vec::new(),
            stripped_count: 0,
            too_large: None,
            started: false,
            non_ascii: false,
            message_id: MessageIdCapture::Waiting,
            inspector,
        }
    }

    /// True when the header section as written (after filtering) has a non-ASCII octet: such
    /// a message needs SMTPUTF8 when the client declared it (RFC 6531 §3.4), and one whose
    /// envelope and header section are ASCII does not, whatever was declared.
    pub fn non_ascii(&self) -> bool {
        self.non_ascii
    }

    /// The value of the first `Message-ID:` field (RFC 5322 §3.6.4) as received, angle
    /// brackets included, unfolded and trimmed of white space; `None` when there is none, it
    /// is empty, removed by the rules, or longer than [`MAX_MESSAGE_ID`] octets. Complete
    /// once the header section has ended (after [`HeaderFilter::finish`] at the latest).
    /// Octets that are not UTF-8 are replaced by U+FFFD.
    pub fn message_id(&self) -> Option<&str> {
        match &self.message_id {
            MessageIdCapture::Done(id) => id.as_deref(),
            _ => None,
        }
    }

    /// Number of `Received:` fields in the header section.
    pub fn received_count(&self) -> u32 {
        self.received
    }

    /// Names of the first [`MAX_LOGGED_STRIPPED`] fields removed, in order (for the log).
    pub fn stripped(&self) -> &[String] {
        &self.stripped
    }

    /// Number of fields removed.
    pub fn stripped_count(&self) -> usize {
        self.stripped_count
    }

    fn note_stripped(&mut self, name: &[u8]) {
        self.stripped_count += 1;
        if self.stripped.len() < MAX_LOGGED_STRIPPED {
            // Cut: a name may be up to 64 KiB long.
            // Control characters (a folded name holds CRLFs) are shown as spaces.
            let shown = String::from_utf8_lossy(name)
                .chars()
                .map(|c| if c.is_control() { ' ' } else { c })
                .take(64)
                .collect();
            self.stripped.push(shown);
        }
    }

    /// Appends to `buf` without letting its capacity pass [`MAX_BUFFERED`] (the caller
    /// checked the length).
    fn hold(&mut self, bytes: &[u8]) {
        let needed = self.buf.len() + bytes.len();
        if needed > self.buf.capacity() {
            let target = (self.buf.capacity() * 2).clamp(needed.max(256), MAX_BUFFERED.max(needed));
            self.buf.reserve_exact(target - self.buf.len());
        }
        self.buf.extend_from_slice(bytes);
    }

    /// The name (cut to 64 characters) of a field or field name longer than
    /// [`MAX_WHOLE_FIELD`]: the message must be refused with `552 5.3.4`. Nothing is emitted
    /// after it.
    pub fn too_large(&self) -> Option<&str> {
        self.too_large.as_deref()
    }

    /// The inspector, with what it saw.
    #[cfg(test)]
    pub fn inspector(&self) -> &I {
        &self.inspector
    }

    /// The inspector, to take what it found.
    pub fn inspector_mut(&mut self) -> &mut I {
        &mut self.inspector
    }

    /// Gives the inspector back (call after [`HeaderFilter::finish`]).
    pub fn into_inspector(self) -> I {
        self.inspector
    }

    /// Octets currently held (at most [`MAX_BUFFERED`]).
    pub fn buffered(&self) -> usize {
        self.buf.len()
    }

    /// Feed message octets; octets ready to be written go to `out`. In the body this returns
    /// `false` and leaves `out` alone: the caller writes `chunk` itself (no copy).
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> bool {
        match self.state {
            ReaderState::Body => return false,
            ReaderState::TooLarge => return true,
            _ => {}
        }
        let from = out.len();
        let mut body_from = None;
        let mut rest = chunk;
        while !rest.is_empty() {
            rest = match self.state {
                ReaderState::Body => {
                    body_from = Some(out.len());
                    out.extend_from_slice(rest);
                    &[]
                }
                ReaderState::TooLarge => &[],
                ReaderState::LineStart => self.line_start(rest, out),
                ReaderState::BlankCr => {
                    if rest[0] == b'\n' {
                        out.extend_from_slice(b"\r\n");
                        self.state = ReaderState::Body;
                        &rest[1..]
                    } else {
                        // A CR alone (the DATA phase refuses the message anyway): read as
                        // the start of a name, where a reader treats it as white space.
                        self.begin_name(b"\r");
                        rest
                    }
                }
                ReaderState::Name => self.name(rest, out),
                ReaderState::NameLineEnd => {
                    if matches!(rest[0], b' ' | b'\t') {
                        // A name folded before its colon: a reader that unfolds first
                        // reads the first line as the name, mail-parser the last line.
                        // Readers disagree, so the field is removed, whatever its name.
                        let first = self.buf.split(|&b| b == b'\n').next().unwrap_or(&[]);
                        let first = trim_end(first.trim_ascii_start()).to_vec();
                        self.note_stripped(&first);
                        self.buf.clear();
                        self.state = ReaderState::Value(Action::Strip);
                    } else {
                        // No colon: not a field. Passed on as it is.
                        out.append(&mut self.buf);
                        self.state = ReaderState::LineStart;
                    }
                    rest
                }
                ReaderState::Value(action) => self.value(action, rest, out),
                ReaderState::LineEnd(action) => {
                    if matches!(rest[0], b' ' | b'\t') {
                        self.state = ReaderState::Value(action);
                    } else {
                        self.end_field(action, out);
                    }
                    rest
                }
            };
        }
        let header_end = body_from.unwrap_or(out.len());
        self.non_ascii |= !out[from..header_end].is_ascii();
        true
    }

    /// End of message: a message with no body (no blank line) is all header section.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        let from = out.len();
        match self.state {
            ReaderState::BlankCr => {
                out.push(b'\r');
            }
            ReaderState::NameLineEnd => {
                out.append(&mut self.buf);
            }
            ReaderState::Name => {
                // mail-parser reads a last line without colon as a field name: decide on it
                // the same way, so a name at the very end is filtered too.
                let end = self.buf.len();
                match self.name_start {
                    Some(start) => self.named(start, end, out),
                    None => out.append(&mut self.buf),
                }
                if let ReaderState::Value(action) = self.state {
                    self.end_field(action, out);
                }
            }
            ReaderState::Value(action) | ReaderState::LineEnd(action) => {
                self.end_field(action, out)
            }
            ReaderState::LineStart | ReaderState::Body | ReaderState::TooLarge => {}
        }
        self.non_ascii |= !out[from..].is_ascii();
        if self.state != ReaderState::TooLarge {
            self.state = ReaderState::Body;
        }
    }

    fn line_start<'a>(&mut self, rest: &'a [u8], out: &mut Vec<u8>) -> &'a [u8] {
        let first = !std::mem::replace(&mut self.started, true);
        match rest[0] {
            b' ' | b'\t' if first => {
                // White space at the very start continues no field of the message, but it
                // would continue the `Received:` field the relay prepends: removed with
                // its continuation lines, so nobody can write into our trace field.
                self.note_stripped(LEADING_FOLDED);
                self.state = ReaderState::Value(Action::Strip);
                rest
            }
            b'\r' => {
                self.state = ReaderState::BlankCr;
                &rest[1..]
            }
            b'\n' => {
                out.push(b'\n');
                self.state = ReaderState::Body;
                &rest[1..]
            }
            _ => {
                self.begin_name(&[]);
                rest
            }
        }
    }

    fn begin_name(&mut self, held: &[u8]) {
        self.buf.clear();
        self.buf.extend_from_slice(held);
        self.name_start = None;
        self.state = ReaderState::Name;
    }

    /// Reads name octets up to the colon, the end of the line, or the bound.
    fn name<'a>(&mut self, rest: &'a [u8], out: &mut Vec<u8>) -> &'a [u8] {
        for (i, &b) in rest.iter().enumerate() {
            if self.buf.len() >= MAX_WHOLE_FIELD {
                self.refuse();
                return &[];
            }
            self.hold(&[b]);
            match b {
                b'\n' => {
                    // No colon: not a field, unless a continuation line follows (`Name\r\n
                    // : v` is field `Name` to a reader that unfolds first, RFC 5322 §2.2.3).
                    self.state = ReaderState::NameLineEnd;
                    return &rest[i + 1..];
                }
                b':' => {
                    if let Some(start) = self.name_start {
                        let end = self.buf.len() - 1;
                        self.named(start, end, out);
                        return &rest[i + 1..];
                    }
                }
                b if b.is_ascii_whitespace() => {}
                _ => {
                    if self.name_start.is_none() {
                        self.name_start = Some(self.buf.len() - 1);
                    }
                }
            }
        }
        &[]
    }

    /// The name is `buf[start..end]` (white space at its end trimmed here): decide what to
    /// do with the field.
    fn named(&mut self, start: usize, end: usize, out: &mut Vec<u8>) {
        let name = trim_end(&self.buf[start..end]);
        self.name_at = (start, start + name.len());
        self.value_at = (end + 1).min(self.buf.len());
        self.inspector.name(name);
        // mail-parser recognises a standard name with white space inside it ("Fr om" is
        // From); for names it does not know it keeps the white space. Decide on both forms.
        let compact: Vec<u8> = name
            .iter()
            .copied()
            .filter(|b| !b.is_ascii_whitespace())
            .collect();
        let text = String::from_utf8_lossy(name);
        let compact_text = String::from_utf8_lossy(&compact);
        if compact.eq_ignore_ascii_case(b"Received") {
            self.received += 1;
        }
        let strip = |p: &NamePattern| p.matches(&text) || p.matches(&compact_text);
        let action = if self.rules.names.iter().any(strip) {
            Action::Strip
        } else if let Some(kind) = WholeField::of(&compact) {
            Action::Hold(kind)
        } else {
            Action::Pass
        };
        match action {
            Action::Strip => {
                let name = name.to_vec();
                self.note_stripped(&name);
                self.buf.clear();
            }
            Action::Pass => {
                if matches!(self.message_id, MessageIdCapture::Waiting)
                    && compact.eq_ignore_ascii_case(b"Message-ID")
                {
                    self.message_id = MessageIdCapture::Reading(Vec::new());
                }
                out.append(&mut self.buf);
            }
            Action::Hold(_) => {}
        }
        self.state = ReaderState::Value(action);
    }

    /// Value octets up to and including the next LF.
    fn value<'a>(&mut self, action: Action, rest: &'a [u8], out: &mut Vec<u8>) -> &'a [u8] {
        let (line, after, ended) = match rest.iter().position(|&b| b == b'\n') {
            Some(p) => (&rest[..=p], &rest[p + 1..], true),
            None => (rest, &[][..], false),
        };
        match action {
            Action::Pass => {
                self.message_id.take_value(line);
                out.extend_from_slice(line);
            }
            Action::Strip => {}
            Action::Hold(_) => {
                if self.buf.len() + line.len() > MAX_WHOLE_FIELD {
                    self.refuse();
                    return &[];
                }
                self.hold(line);
            }
        }
        if ended {
            self.state = ReaderState::LineEnd(action);
        }
        after
    }

    fn end_field(&mut self, action: Action, out: &mut Vec<u8>) {
        self.message_id.field_ended();
        if let Action::Hold(kind) = action {
            match kind {
                WholeField::AuthenticationResults | WholeField::ArcAuthenticationResults
                    if self.ours(kind, &self.buf[self.value_at..]) =>
                {
                    let name = self.buf[self.name_at.0..self.name_at.1].to_vec();
                    self.note_stripped(&name);
                }
                WholeField::From | WholeField::Sender => {
                    self.inspector
                        .field(kind, &self.buf, &self.buf[self.value_at..]);
                    out.extend_from_slice(&self.buf);
                }
                WholeField::AuthenticationResults | WholeField::ArcAuthenticationResults => {
                    out.extend_from_slice(&self.buf)
                }
            }
            self.buf.clear();
        }
        self.state = ReaderState::LineStart;
    }

    /// True when the `Authentication-Results:` field with this value must be removed: it
    /// claims our authserv-id, or has none that can be read (a reader might take it for ours).
    /// An `ARC-Authentication-Results:` value is read past its `i=N;` instance tag.
    fn ours(&self, kind: WholeField, value: &[u8]) -> bool {
        let Some(id) = &self.rules.auth_results_for else {
            return false;
        };
        let value = match kind {
            WholeField::ArcAuthenticationResults => match after_instance_tag(value) {
                Some(rest) => rest,
                None => return true,
            },
            _ => value,
        };
        match authserv_id(value) {
            Some(found) => same_domain(&found, id),
            None => true,
        }
    }

    fn refuse(&mut self) {
        let name = match self.name_start {
            Some(start) if matches!(self.state, ReaderState::Name) => &self.buf[start..],
            _ => &self.buf[self.name_at.0..self.name_at.1],
        };
        self.too_large = Some(String::from_utf8_lossy(name).chars().take(64).collect());
        self.buf = Vec::new();
        self.state = ReaderState::TooLarge;
    }
}

fn trim_end(b: &[u8]) -> &[u8] {
    let n = b
        .iter()
        .rev()
        .take_while(|c| c.is_ascii_whitespace())
        .count();
    &b[..b.len() - n]
}

/// Every field name a header section contains, as this reader sees them (white space
/// trimmed), in order; for tests and the fuzz target that compares it with mail-parser.
pub fn field_names(section: &[u8]) -> Vec<Vec<u8>> {
    struct Names(Vec<Vec<u8>>);
    impl FieldInspector for Names {
        fn field(&mut self, _: WholeField, _: &[u8], _: &[u8]) {}
        fn name(&mut self, name: &[u8]) {
            self.0.push(name.to_vec());
        }
    }
    let mut filter = HeaderFilter::with_inspector(Arc::default(), Names(Vec::new()));
    let mut out = Vec::new();
    filter.push(section, &mut out);
    filter.finish(&mut out);
    filter.into_inspector().0
}

/// The authserv-id of an `Authentication-Results:` value (RFC 8601 §2.2: `[CFWS]
/// authserv-id`, where authserv-id is a `value`, a token or a quoted-string of RFC 2045
/// §5.1), unquoted; `None` when the value does not start with one.
pub fn authserv_id(value: &[u8]) -> Option<Vec<u8>> {
    let mut i = skip_cfws(value, 0)?;
    match value.get(i)? {
        b'"' => {
            let mut id = Vec::new();
            i += 1;
            loop {
                match *value.get(i)? {
                    b'"' => return (!id.is_empty()).then_some(id),
                    b'\\' => {
                        id.push(*value.get(i + 1)?);
                        i += 2;
                    }
                    // Folding inside a quoted-string is not part of it (RFC 5322 §3.2.4).
                    b'\r' | b'\n' => i += 1,
                    b => {
                        id.push(b);
                        i += 1;
                    }
                }
            }
        }
        _ => {
            let id: Vec<u8> = value[i..]
                .iter()
                .copied()
                .take_while(|&b| is_token_octet(b))
                .collect();
            (!id.is_empty()).then_some(id)
        }
    }
}

/// RFC 2045 §5.1 token: any octet but SP, CTLs and tspecials (UTF-8 octets allowed, RFC
/// 6532).
fn is_token_octet(b: u8) -> bool {
    b > b' ' && b != 0x7f && !b"()<>@,;:\\\"/[]?=".contains(&b)
}

/// Skips white space, folding and (nested) comments (RFC 5322 §3.2.2 CFWS); `None` for a
/// comment that never ends.
fn skip_cfws(v: &[u8], mut i: usize) -> Option<usize> {
    loop {
        match v.get(i) {
            Some(b' ' | b'\t' | b'\r' | b'\n') => i += 1,
            Some(b'(') => {
                let mut depth = 1usize;
                i += 1;
                while depth > 0 {
                    match *v.get(i)? {
                        b'\\' => i += 1,
                        b'(' => depth += 1,
                        b')' => depth -= 1,
                        _ => {}
                    }
                    i += 1;
                }
            }
            _ => return Some(i),
        }
    }
}

/// The rest of an `ARC-Authentication-Results:` value after its instance tag (RFC 8617
/// §4.1.1: `[CFWS] "i" [CFWS] "=" [CFWS] 1*2DIGIT [CFWS] ";"`); `None` when it has none.
fn after_instance_tag(v: &[u8]) -> Option<&[u8]> {
    let mut i = skip_cfws(v, 0)?;
    if !v.get(i)?.eq_ignore_ascii_case(&b'i') {
        return None;
    }
    i = skip_cfws(v, i + 1)?;
    if *v.get(i)? != b'=' {
        return None;
    }
    i = skip_cfws(v, i + 1)?;
    let digits = v[i..].iter().take_while(|b| b.is_ascii_digit()).count();
    if digits == 0 {
        return None;
    }
    i = skip_cfws(v, i + digits)?;
    if *v.get(i)? != b';' {
        return None;
    }
    Some(&v[i + 1..])
}

/// `found` names the domain `ours` (lower case, no trailing dot). Compared as a domain the
/// way a reader displaying it would: white space (Unicode, e.g. U+00A0) and invisible
/// format characters anywhere in it are dropped, trailing dots ignored, and both sides go
/// through [`crate::envelope::canonical_domain`] (UTS #46: case, U+3002 and other dot
/// look-alikes, U-labels).
fn same_domain(found: &[u8], ours: &str) -> bool {
    let text: String = String::from_utf8_lossy(found)
        .chars()
        .filter(|&c| !c.is_whitespace() && !is_invisible(c))
        .map(fold_lookalike)
        .collect();
    let text = text.trim_end_matches('.');
    if text.eq_ignore_ascii_case(ours) {
        return true;
    }
    let canon = |d: &str| crate::envelope::canonical_domain(d).ok();
    matches!((canon(text), canon(ours)), (Some(a), Some(b)) if a == b)
}

#[cfg(test)]
mod tests;
