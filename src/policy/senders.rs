//! Sender ownership: which addresses an authenticated user may send as, in the envelope
//! (`MAIL FROM`) and in the `From:` header.
//!
//! Decisions (documented for operators in `docs/policy.md`):
//! - An entry of a user's `senders` is an exact address or `@domain` (every address of exactly
//!   that domain, not its subdomains). Addresses match as [`Address::matches`] says: the
//!   domain in its canonical A-label form (so U-labels and A-labels are one domain), an ASCII
//!   local part ignoring case, a non-ASCII one byte for byte.
//! - A user with no `senders` owns its login when the login is an address, and nothing
//!   otherwise.
//! - The null sender `<>` is allowed in the envelope: read receipts (RFC 8098) and some
//!   auto-replies use it, and a message sent with it can draw no bounce. Its `From:` header is
//!   still checked, so it spoofs nobody.
//! - Every address of every `From:` field must be owned (RFC 5322 allows several authors;
//!   a message with two `From:` fields is checked on both, whichever a reader shows). A
//!   message without a `From:` address is refused: it would be displayed as from anyone.
//!   `Sender:` is not checked.
//! - Every `From:` field of the whole header section is checked, as the shared header reader
//!   ([`crate::smtp::headers`]) reads it; a `From:` field over 64 KiB refuses the message.
//! - A `From:` field must be an unambiguous mailbox-list (RFC 5322 §3.4): group syntax, an `@`
//!   outside the angle brackets of a mailbox with an angle-addr, and unterminated quotes,
//!   comments or angle brackets are refused ([`FromProblem::Ambiguous`]), because readers
//!   disagree on who the author is. A bare addr-spec with CFWS inside is read as the address
//!   it denotes. Addresses must be owned in this reading and in mail-parser's.
//! - A display name that, after RFC 2047 decoding and unquoting, contains an address the user
//!   does not own (`"ceo@example.com" <alice@example.com>`) is refused like a foreign address
//!   (`[auth] check_display_name`, on by default). Phrases, comments and encoded words are
//!   searched, after dropping invisible characters and reading `@`/`.` look-alikes as ASCII.

use std::sync::Arc;

use super::pattern::AddressPattern;
use crate::envelope::Address;
use crate::text::{fold_lookalike, is_invisible};

/// The addresses one user may send as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Senders(Vec<AddressPattern>);

impl Senders {
    /// From the user's `senders` entries; with none, the login if it is an address.
    pub fn new(login: &str, entries: &[String]) -> Senders {
        let patterns = if entries.is_empty() {
            AddressPattern::parse(login)
                .filter(|p| matches!(p, AddressPattern::Address(_)))
                .into_iter()
                .collect()
        } else {
            entries
                .iter()
                .filter_map(|e| AddressPattern::parse(e))
                .collect()
        };
        Senders(patterns)
    }

    /// True when the user may send as `address`.
    pub fn owns(&self, address: &Address) -> bool {
        self.0.iter().any(|p| p.matches(address))
    }
}

/// Why the `From:` header of an authenticated message is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromProblem {
    /// No `From:` field with an address.
    Missing,
    /// This `From:` address (as written, cut to 256 characters for the log) is not owned, or
    /// is not an address at all.
    NotOwned(String),
    /// A display name (RFC 5322 §3.4), after RFC 2047 decoding and unquoting, contains this
    /// address, which the user does not own.
    DisplayName(String),
    /// The `From:` field is not an unambiguous mailbox-list: group syntax (`:` or `;`
    /// outside quotes, comments and angle brackets), an `@` outside the angle brackets of a
    /// mailbox that has an angle-addr, two angle-addrs in one mailbox, or an unterminated
    /// quoted-string, comment or angle-addr. Readers disagree on who the author of such a
    /// field is. The field as written, cut to 256 characters for the log.
    Ambiguous(String),
}

/// The `From:` check of one authenticated message, fed each `From:` field as the header
/// reader ([`crate::smtp::headers::HeaderFilter`]) completes it, however far down the header
/// section it stands. Holds only its verdict, not the fields.
#[derive(Debug, Clone)]
pub struct FromCheck {
    /// Shared with the policy: a message's check copies no list.
    senders: Arc<Senders>,
    display_names: bool,
    seen: bool,
    problem: Option<FromProblem>,
}

impl FromCheck {
    /// A check against `senders`; `display_names` also refuses display names that contain an
    /// address not owned (`[auth] check_display_name`).
    pub fn new(senders: Arc<Senders>, display_names: bool) -> FromCheck {
        FromCheck {
            senders,
            display_names,
            seen: false,
            problem: None,
        }
    }

    /// Checks one complete `From:` field (name, colon, value, CRLFs as received); `value` is
    /// its part after the colon, as the header reader found it (one reading of the name for
    /// the filter and the check).
    pub fn from_field(&mut self, field: &[u8], value: &[u8]) {
        if self.problem.is_some() {
            return;
        }
        if let Err(p) = self.check(field, value) {
            self.problem = Some(p);
        }
    }

    fn check(&mut self, field: &[u8], value: &[u8]) -> Result<(), FromProblem> {
        let whole = || shown(&String::from_utf8_lossy(field));
        // Our own reading first: it refuses what readers may disagree on, and gives each
        // mailbox's address and every text a reader may show as its name.
        let mailboxes = mailbox_list(value).ok_or_else(|| FromProblem::Ambiguous(whole()))?;
        for m in &mailboxes {
            match Address::parse(&m.address) {
                Ok(a) if self.senders.owns(&a) => {}
                _ => return Err(FromProblem::NotOwned(shown(&m.address))),
            }
        }
        // mail-parser's reading too (the reading of a conformant RFC 5322 reader): both must
        // name only owned addresses.
        let parsed = mail_parser::MessageParser::new().parse_headers(field);
        let value = parsed
            .as_ref()
            .and_then(|m| m.header_values(mail_parser::HeaderName::From).next());
        let Some(list) = value.and_then(|v| v.as_address()) else {
            // A From: field that is not an address list names nobody we could check.
            return Err(FromProblem::NotOwned(whole()));
        };
        let mut any = false;
        for addr in list.iter() {
            let text = addr.address().unwrap_or_default();
            // mail-parser keeps the white space of `alice @ example.com`; the address it
            // denotes has none.
            let compact: String = text.chars().filter(|c| !c.is_whitespace()).collect();
            match Address::parse(text).or_else(|_| Address::parse(&compact)) {
                Ok(a) if self.senders.owns(&a) => any = true,
                _ => return Err(FromProblem::NotOwned(shown(text))),
            }
            if self.display_names
                && let Some(name) = addr.name()
                && let Some(foreign) = foreign_address_in(&self.senders, name)
            {
                return Err(FromProblem::DisplayName(shown(&foreign)));
            }
        }
        if self.display_names {
            for m in &mailboxes {
                let decoded = decode_encoded_words(&m.shown);
                if let Some(foreign) = foreign_address_in(&self.senders, &decoded) {
                    return Err(FromProblem::DisplayName(shown(&foreign)));
                }
            }
        }
        if !any || mailboxes.is_empty() {
            return Err(FromProblem::NotOwned(whole()));
        }
        self.seen = true;
        Ok(())
    }

    /// The verdict once the header section has been read: the first problem found, or
    /// [`FromProblem::Missing`] when there was no `From:` field.
    pub fn verdict(&self) -> Result<(), FromProblem> {
        match &self.problem {
            Some(p) => Err(p.clone()),
            None if self.seen => Ok(()),
            None => Err(FromProblem::Missing),
        }
    }
}

impl crate::smtp::headers::FieldInspector for FromCheck {
    fn field(&mut self, kind: crate::smtp::headers::WholeField, field: &[u8], value: &[u8]) {
        if kind == crate::smtp::headers::WholeField::From {
            self.from_field(field, value);
        }
    }
}

/// One mailbox of a `From:` field as [`mailbox_list`] reads it.
#[derive(Debug, Clone, PartialEq, Eq)]
struct Mailbox {
    /// The address: an angle-addr's content, or the bare addr-spec, with comments and
    /// white space removed (quoted-strings kept, for [`Address::parse`] to resolve).
    address: String,
    /// Everything else a reader may show: the phrase (quoted-strings unquoted), comments
    /// (unescaped) and stray atoms, joined by spaces; RFC 2047 words still encoded.
    shown: String,
}

/// Reads a `From:` value as an RFC 5322 §3.4 mailbox-list, strictly: `None` when it is not
/// an unambiguous one (see [`FromProblem::Ambiguous`]). Folding is removed first; empty
/// list elements (RFC 5322 §4.4 obs-mbox-list) are skipped.
fn mailbox_list(value: &[u8]) -> Option<Vec<Mailbox>> {
    let unfolded: Vec<u8> = value
        .iter()
        .copied()
        .filter(|&b| b != b'\r' && b != b'\n')
        .collect();
    let text = String::from_utf8_lossy(&unfolded);
    let mut chars = text.chars().peekable();
    let mut list = Vec::new();
    let mut m = Reading::default();
    while let Some(c) = chars.next() {
        match c {
            '"' => {
                read_quoted(&mut chars, &mut m.bare, Some(&mut m.words))?;
                m.words.push(' ');
            }
            '(' => read_comment(&mut chars, &mut m.comments)?,
            '<' => {
                if m.angle.is_some() {
                    return None;
                }
                let mut inner = String::new();
                loop {
                    match chars.next()? {
                        '>' => break,
                        '(' => read_comment(&mut chars, &mut m.comments)?,
                        '"' => read_quoted(&mut chars, &mut inner, None)?,
                        '<' => return None,
                        w if w.is_whitespace() => {}
                        a => inner.push(a),
                    }
                }
                m.angle = Some(inner);
            }
            ':' | ';' | '>' => return None,
            ',' => list.extend(std::mem::take(&mut m).finish()?),
            '[' => {
                m.bare.push('[');
                loop {
                    let d = chars.next()?;
                    m.bare.push(d);
                    if d == ']' {
                        break;
                    }
                }
            }
            w if w.is_whitespace() => m.words.push(' '),
            '=' if chars.peek() == Some(&'?') => {
                // An RFC 2047 encoded word is one atom to the readers that decode it
                // (mail-parser decodes one with specials inside it): read it whole.
                let mut word = String::from('=');
                let mut marks = 0;
                loop {
                    let e = chars.next()?;
                    if e.is_whitespace() {
                        return None;
                    }
                    word.push(e);
                    if e == '?' {
                        marks += 1;
                    }
                    if marks >= 4 && e == '=' && word.ends_with("?=") {
                        break;
                    }
                }
                m.bare.push_str(&word);
                m.words.push_str(&word);
            }
            a => {
                if a == '@' {
                    m.at_outside = true;
                }
                m.bare.push(a);
                m.words.push(a);
            }
        }
    }
    list.extend(m.finish()?);
    Some(list)
}

/// One mailbox being read by [`mailbox_list`].
#[derive(Debug, Default)]
struct Reading {
    /// Outside comments and angle brackets, white space dropped: the addr-spec when there
    /// is no angle-addr.
    bare: String,
    /// Atoms and unquoted quoted-strings outside the angle brackets, with spaces.
    words: String,
    /// Comment contents, unescaped, each followed by a space.
    comments: String,
    /// The angle-addr's content.
    angle: Option<String>,
    /// An `@` outside quotes, comments and angle brackets.
    at_outside: bool,
}

impl Reading {
    /// The mailbox read, `Ok(None)` for an empty list element, `None` when ambiguous.
    fn finish(self) -> Option<Option<Mailbox>> {
        let mailbox = match self.angle {
            // An `@` outside the angle brackets: one reader takes it for the address,
            // another for the display name.
            Some(_) if self.at_outside => return None,
            Some(address) => Mailbox {
                address,
                shown: format!("{} {}", self.words, self.comments),
            },
            None => Mailbox {
                address: self.bare,
                shown: self.comments,
            },
        };
        let empty = mailbox.address.is_empty() && mailbox.shown.trim().is_empty();
        Some((!empty).then_some(mailbox))
    }
}

/// Reads a quoted-string (RFC 5322 §3.2.4; the opening `"` already read): appended to `raw` as
/// written, quotes and quoted-pairs included (for [`Address::parse`] to resolve), and its
/// content unescaped to `unquoted` (what a reader shows). `None` when it never ends.
fn read_quoted(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    raw: &mut String,
    mut unquoted: Option<&mut String>,
) -> Option<()> {
    raw.push('"');
    loop {
        let c = match chars.next()? {
            '"' => break,
            '\\' => {
                raw.push('\\');
                chars.next()?
            }
            c => c,
        };
        raw.push(c);
        if let Some(shown) = unquoted.as_mut() {
            shown.push(c);
        }
    }
    raw.push('"');
    Some(())
}

/// Reads a comment (the `(` already read) into `shown`, unescaped, nested comments
/// included; `None` when it never ends.
fn read_comment(
    chars: &mut std::iter::Peekable<std::str::Chars<'_>>,
    shown: &mut String,
) -> Option<()> {
    let mut depth = 1usize;
    loop {
        match chars.next()? {
            '\\' => shown.push(chars.next()?),
            '(' => {
                depth += 1;
                shown.push(' ');
            }
            ')' => {
                depth -= 1;
                shown.push(' ');
                if depth == 0 {
                    return Some(());
                }
            }
            c => shown.push(c),
        }
    }
}

/// Decodes the RFC 2047 encoded words of `text` (as mail-parser does in unstructured text).
fn decode_encoded_words(text: &str) -> String {
    if !text.contains("=?") {
        return text.to_string();
    }
    let field = format!("Subject: {}\r\n", text.replace(['\r', '\n'], " "));
    mail_parser::MessageParser::new()
        .parse_headers(field.as_bytes())
        .and_then(|m| m.subject().map(str::to_string))
        .unwrap_or_else(|| text.to_string())
}

/// The first address-like text (`local@domain`, RFC 5322 §3.4.1 dot-atom form) in a display
/// name (already decoded and unquoted) that `senders` does not own. Comments, angle brackets
/// and quotes around it do not hide it, nor do invisible characters inside it (dropped, see
/// [`is_invisible`]), `@` and `.` look-alikes (read as ASCII, see [`fold_lookalike`]) or
/// white space around the `@` (`ceo @ example.com`: counted when the domain has a dot, so
/// `Alice @ Example` is still a name).
fn foreign_address_in(senders: &Senders, name: &str) -> Option<String> {
    let name: String = name
        .chars()
        .filter(|&c| !is_invisible(c))
        .map(fold_lookalike)
        .collect();
    // Collapse white space around each `@`, remembering which `@` had some.
    let mut collapsed = String::with_capacity(name.len());
    let mut spaced = Vec::new();
    let mut rest = name.as_str();
    while let Some(at) = rest.find('@') {
        let before = &rest[..at];
        let trimmed = before.trim_end();
        collapsed.push_str(trimmed);
        let after = &rest[at + 1..];
        let after_trimmed = after.trim_start();
        if trimmed.len() != before.len() || after_trimmed.len() != after.len() {
            spaced.push(collapsed.len());
        }
        collapsed.push('@');
        rest = after_trimmed;
    }
    collapsed.push_str(rest);
    let name = collapsed.as_str();
    let local_char = |c: char| c.is_alphanumeric() || "!#$%&'*+-/=?^_`{|}~.".contains(c);
    let domain_char = |c: char| c.is_alphanumeric() || c == '-' || c == '.';
    for (at, _) in name.match_indices('@') {
        let local_start = name[..at]
            .char_indices()
            .rev()
            .take_while(|&(_, c)| local_char(c))
            .last()
            .map_or(at, |(i, _)| i);
        let domain_end = name[at + 1..]
            .char_indices()
            .take_while(|&(_, c)| domain_char(c))
            .last()
            .map_or(at + 1, |(i, c)| at + 1 + i + c.len_utf8());
        let local = name[local_start..at].trim_matches('.');
        let domain = name[at + 1..domain_end].trim_matches('.');
        if local.is_empty() || domain.is_empty() {
            continue;
        }
        if spaced.binary_search(&at).is_ok() && !domain.contains('.') {
            continue;
        }
        let text = format!("{local}@{domain}");
        match Address::parse(&text) {
            Ok(a) if senders.owns(&a) => {}
            // An address the user does not own, or text shaped like one that is not a valid
            // address: either reads as someone else to the recipient.
            _ => return Some(text),
        }
    }
    None
}

/// Check every `From:` field of `section` (a whole header section) against `senders`,
/// display names included: what [`FromCheck`] does during DATA.
pub fn check_from_header(senders: &Senders, section: &[u8]) -> Result<(), FromProblem> {
    let check = FromCheck::new(Arc::new(senders.clone()), true);
    let mut reader =
        crate::smtp::headers::HeaderFilter::with_inspector(std::sync::Arc::default(), check);
    let mut out = Vec::new();
    reader.push(section, &mut out);
    reader.finish(&mut out);
    reader.into_inspector().verdict()
}

/// A header value cut to a length fit for a log line.
fn shown(text: &str) -> String {
    text.chars().take(256).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The part of a test `From:` line after its colon.
    fn value_of(field: &str) -> &[u8] {
        field.split_once(':').unwrap().1.as_bytes()
    }

    fn senders(login: &str, entries: &[&str]) -> Senders {
        let entries: Vec<String> = entries.iter().map(|s| s.to_string()).collect();
        Senders::new(login, &entries)
    }

    fn owns(s: &Senders, a: &str) -> bool {
        s.owns(&Address::parse(a).unwrap())
    }

    #[test]
    fn exact_addresses_and_whole_domains() {
        let s = senders("alice", &["alice@example.com", "@Sales.Example.COM"]);
        assert!(owns(&s, "alice@example.com"));
        assert!(owns(&s, "alice@EXAMPLE.com."));
        assert!(
            owns(&s, "Alice@example.com"),
            "ASCII local parts are compared ignoring case"
        );
        assert!(!owns(&s, "bob@example.com"));
        assert!(owns(&s, "anyone@sales.example.com"));
        assert!(!owns(&s, "anyone@eu.sales.example.com"), "not subdomains");
        assert!(!owns(&s, "alice@example.com.evil.test"));
    }

    #[test]
    fn empty_senders_own_the_login_if_it_is_an_address() {
        assert!(owns(&senders("bob@example.com", &[]), "bob@Example.com"));
        assert!(!owns(&senders("bob@example.com", &[]), "eve@example.com"));
        let nothing = senders("bob", &[]);
        assert!(!owns(&nothing, "bob@example.com"));
        // An explicit list replaces the login.
        assert!(!owns(
            &senders("bob@example.com", &["b@example.org"]),
            "bob@example.com"
        ));
    }

    #[test]
    fn utf8_senders_match_in_either_domain_form_without_case_folding() {
        let s = senders("jörg", &["jörg@bücher.example", "@faß.example"]);
        assert!(owns(&s, "jörg@xn--bcher-kva.example"));
        assert!(owns(&s, "jörg@BÜCHER.example"));
        assert!(
            !owns(&s, "JÖRG@bücher.example"),
            "non-ASCII local parts are byte-exact"
        );
        assert!(owns(&s, "anyone@xn--fa-hia.example"));
        assert!(
            !owns(&s, "anyone@fass.example"),
            "ß is not ss (non-transitional)"
        );
        let k = senders("kate", &["kate@example.com"]);
        assert!(!owns(&k, "\u{212A}ate@example.com"));
    }

    #[test]
    fn from_header_table() {
        let s = senders("alice", &["alice@example.com", "@example.org"]);
        let check = |headers: &str| check_from_header(&s, headers.as_bytes());
        let cases: &[(&str, Result<(), FromProblem>)] = &[
            ("From: alice@example.com\r\nSubject: x\r\n", Ok(())),
            ("From: \"Alice\" <alice@EXAMPLE.com>\r\n", Ok(())),
            ("Subject: x\r\nfrom: Someone <x@example.org>\r\n", Ok(())),
            ("From: alice@example.com, anyone@example.org\r\n", Ok(())),
            (
                "From: Alice <alice@example.com>, CEO <ceo@example.com>\r\n",
                Err(FromProblem::NotOwned("ceo@example.com".into())),
            ),
            (
                "From: CEO <ceo@example.com>\r\n",
                Err(FromProblem::NotOwned("ceo@example.com".into())),
            ),
            // Two From fields: both are checked.
            (
                "From: alice@example.com\r\nFrom: ceo@example.com\r\n",
                Err(FromProblem::NotOwned("ceo@example.com".into())),
            ),
            (
                "From: ceo@example.com\r\nFrom: alice@example.com\r\n",
                Err(FromProblem::NotOwned("ceo@example.com".into())),
            ),
            // Folded header.
            ("From: \"Alice\"\r\n <alice@example.com>\r\n", Ok(())),
            ("Subject: no from\r\n", Err(FromProblem::Missing)),
            ("", Err(FromProblem::Missing)),
        ];
        for (headers, expected) in cases {
            assert_eq!(&check(headers), expected, "{headers:?}");
        }
        // Not an address at all.
        assert!(matches!(
            check("From: undisclosed\r\n"),
            Err(FromProblem::NotOwned(_)) | Err(FromProblem::Missing)
        ));
    }

    #[test]
    fn display_names_naming_someone_else_are_refused() {
        let s = senders("alice", &["alice@example.com"]);
        let check = |headers: &str| check_from_header(&s, headers.as_bytes());
        let spoofs = [
            "From: \"CEO (ceo@example.com)\" <alice@example.com>\r\n",
            "From: =?utf-8?Q?CEO_<ceo=40example.com>?= <alice@example.com>\r\n",
            "From: \"ceo@example.com\" <alice@example.com>\r\n",
            "From: =?utf-8?B?Q0VPIDxjZW9AZXhhbXBsZS5jb20+?= <alice@example.com>\r\n",
            "From: \"Alice\" <alice@example.com>\r\nFrom: \"via ceo@example.com\" <alice@example.com>\r\n",
        ];
        for spoof in spoofs {
            assert_eq!(
                check(spoof),
                Err(FromProblem::DisplayName("ceo@example.com".into())),
                "{spoof:?}"
            );
        }
        let honest = [
            "From: Alice Example <alice@example.com>\r\n",
            "From: \"alice@example.com\" <alice@example.com>\r\n",
            "From: =?utf-8?Q?Al=C3=AFce?= <alice@example.com>\r\n",
            "From: \"Alice @ Example\" <alice@example.com>\r\n",
        ];
        for h in honest {
            assert_eq!(check(h), Ok(()), "{h:?}");
        }
        // Off: only the addresses count.
        let mut off = FromCheck::new(Arc::new(s.clone()), false);
        off.from_field(spoofs[0].as_bytes(), value_of(spoofs[0]));
        assert_eq!(off.verdict(), Ok(()));
    }

    #[test]
    fn a_second_from_anywhere_in_the_section_is_checked() {
        let s = senders("alice", &["alice@example.com"]);
        let mut section = b"From: alice@example.com\r\n".to_vec();
        for _ in 0..2000 {
            section.extend_from_slice(format!("X-Pad: {}\r\n", "p".repeat(100)).as_bytes());
        }
        section.extend_from_slice(b"From : ceo@example.com\r\n");
        assert_eq!(
            check_from_header(&s, &section),
            Err(FromProblem::NotOwned("ceo@example.com".into()))
        );
    }

    #[test]
    fn group_syntax_and_at_signs_outside_the_angle_addr_are_ambiguous() {
        let s = senders("alice", &["alice@example.com"]);
        let check = |headers: &str| check_from_header(&s, headers.as_bytes());
        // Each is read as from ceo@example.com by python's email package (policy=default).
        let ambiguous = [
            "From: CEO <ceo@example.com>: alice@example.com;\r\n",
            "From: ceo@example.com: alice@example.com;\r\n",
            "From: <ceo@example.com>:;alice@example.com\r\n",
            "From: ceo @ example.com <alice@example.com>\r\n",
            "From: \"ceo\"@example.com <alice@example.com>\r\n",
            "From: ceo(x)@example.com <alice@example.com>\r\n",
            "From: ceo\r\n @example.com <alice@example.com>\r\n",
            "From: \"ceo@example.com\": alice@example.com;\r\n",
            "From: ceo@example.com <alice@example.com>\r\n",
            "From: <alice@example.com> <ceo@example.com>\r\n",
            "From: <alice@example.com> ceo@example.com\r\n",
            "From: Alice <alice@example.com\r\n",
            "From: \"Alice <alice@example.com>\r\n",
            "From: (Alice <alice@example.com>\r\n",
            "From: alice@example.com>\r\n",
            "From: =?utf-8?Q?ceo@example.com <alice@example.com>\r\n",
        ];
        for h in ambiguous {
            assert!(
                matches!(check(h), Err(FromProblem::Ambiguous(_))),
                "{h:?}: {:?}",
                check(h)
            );
        }
        // Still refused with the display-name rule off.
        let mut off = FromCheck::new(Arc::new(s.clone()), false);
        off.from_field(ambiguous[3].as_bytes(), value_of(ambiguous[3]));
        assert!(matches!(off.verdict(), Err(FromProblem::Ambiguous(_))));
        let fine = [
            "From: Alice <alice@example.com>, alice@example.com (Alice)\r\n",
            "From: \"Alice: the boss; really\" <alice@example.com>\r\n",
            "From: alice@example.com,\r\n",
            "From: <\"alice\"@example.com>\r\n",
            "From: Alice <alice@example.com> (work)\r\n",
        ];
        for h in fine {
            assert_eq!(check(h), Ok(()), "{h:?}");
        }
    }

    #[test]
    fn a_bare_addr_spec_with_cfws_inside_is_read_as_the_address_it_denotes() {
        let s = senders("alice", &["alice@example.com"]);
        let check = |headers: &str| check_from_header(&s, headers.as_bytes());
        for (h, read) in [
            ("From: ceo @ example.com\r\n", "ceo@example.com"),
            ("From: \"ceo\"@example.com\r\n", "\"ceo\"@example.com"),
            ("From: ceo(x)@example.com\r\n", "ceo@example.com"),
            ("From: ceo\r\n @example.com\r\n", "ceo@example.com"),
        ] {
            assert_eq!(check(h), Err(FromProblem::NotOwned(read.into())), "{h:?}");
        }
        assert_eq!(check("From: alice @ example.com\r\n"), Ok(()));
        // mail-parser reads these as name "alice", address "@example.com": where the two
        // readings differ, the field is refused.
        assert!(check("From: \"alice\"@example.com\r\n").is_err());
        assert!(check("From: alice(x)@example.com\r\n").is_err());
        assert!(check("From: alice\r\n @example.com\r\n").is_err());
        assert_eq!(
            check("From: alice@example.com (ceo@example.com)\r\n"),
            Err(FromProblem::DisplayName("ceo@example.com".into()))
        );
    }

    #[test]
    fn invisible_and_look_alike_characters_do_not_hide_an_address_in_a_display_name() {
        let s = senders("alice", &["alice@example.com"]);
        let check = |headers: &str| check_from_header(&s, headers.as_bytes());
        let spoofs = [
            "From: \"ceo\u{200b}@example.com\" <alice@example.com>\r\n",
            "From: =?utf-8?Q?ceo=E2=80=8B=40example.com?= <alice@example.com>\r\n",
            "From: =?utf-8?Q?ceo=E2=80=8B@example.com?= <alice@example.com>\r\n",
            "From: \"ceo\u{00ad}@example.com\" <alice@example.com>\r\n",
            "From: \"ceo@\u{200b}example.com\" <alice@example.com>\r\n",
            "From: \"ceo\u{ff20}example.com\" <alice@example.com>\r\n",
            "From: \"ceo\u{fe6b}example.com\" <alice@example.com>\r\n",
            "From: \"ceo@example\u{3002}com\" <alice@example.com>\r\n",
            "From: \"ceo @ example.com\" <alice@example.com>\r\n",
            "From: \"c\u{feff}eo\u{2060}@\u{034f}example\u{ff0e}com\" <alice@example.com>\r\n",
            "From: Alice (ceo@example.com) <alice@example.com>\r\n",
            "From: Alice <alice@example.com> (ceo@example.com)\r\n",
            "From: Alice <(ceo@example.com)alice@example.com>\r\n",
        ];
        for spoof in spoofs {
            assert_eq!(
                check(spoof),
                Err(FromProblem::DisplayName("ceo@example.com".into())),
                "{spoof:?}"
            );
        }
        assert_eq!(
            check("From: \"Alice @ Example\" <alice@example.com>\r\n"),
            Ok(())
        );
        assert_eq!(
            check("From: \"alice\u{200b}@example.com\" <alice@example.com>\r\n"),
            Ok(())
        );
    }
}
