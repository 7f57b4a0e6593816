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
//! - A display name that, after RFC 2047 decoding and unquoting, contains an address the user
//!   does not own (`"ceo@example.com" <alice@example.com>`) is refused like a foreign address
//!   (`[auth] check_display_name`, on by default).

use crate::envelope::{Address, canonical_domain};

/// One `senders` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Pattern {
    /// One mailbox.
    Address(Address),
    /// A whole domain, canonical (A-label, lower case).
    Domain(String),
}

impl Pattern {
    /// An entry in either form (config has already checked and canonicalised it; the login
    /// of a user without `senders` has not been, so anything else is `None`).
    fn parse(entry: &str) -> Option<Pattern> {
        match entry.strip_prefix('@') {
            Some(domain) => canonical_domain(domain).ok().map(Pattern::Domain),
            None => Address::parse(entry).ok().map(Pattern::Address),
        }
    }

    fn matches(&self, a: &Address) -> bool {
        match self {
            Pattern::Address(owned) => owned.matches(a),
            Pattern::Domain(domain) => a.domain() == domain,
        }
    }
}

/// The addresses one user may send as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Senders(Vec<Pattern>);

impl Senders {
    /// From the user's `senders` entries; with none, the login if it is an address.
    pub fn new(login: &str, entries: &[String]) -> Senders {
        let patterns = if entries.is_empty() {
            Pattern::parse(login)
                .filter(|p| matches!(p, Pattern::Address { .. }))
                .into_iter()
                .collect()
        } else {
            entries.iter().filter_map(|e| Pattern::parse(e)).collect()
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
}

/// The `From:` check of one authenticated message, fed each `From:` field as the header
/// reader ([`crate::smtp::headers::HeaderFilter`]) completes it, however far down the header
/// section it stands. Holds only its verdict, not the fields.
#[derive(Debug, Clone)]
pub struct FromCheck {
    senders: Senders,
    display_names: bool,
    seen: bool,
    problem: Option<FromProblem>,
}

impl FromCheck {
    /// A check against `senders`; `display_names` also refuses display names that contain an
    /// address not owned (`[auth] check_display_name`).
    pub fn new(senders: Senders, display_names: bool) -> FromCheck {
        FromCheck {
            senders,
            display_names,
            seen: false,
            problem: None,
        }
    }

    /// Checks one complete `From:` field (name, colon, value, CRLFs as received).
    pub fn from_field(&mut self, field: &[u8]) {
        if self.problem.is_some() {
            return;
        }
        if let Err(p) = self.check(field) {
            self.problem = Some(p);
        }
    }

    fn check(&mut self, field: &[u8]) -> Result<(), FromProblem> {
        let parsed = mail_parser::MessageParser::new().parse_headers(field);
        let value = parsed
            .as_ref()
            .and_then(|m| m.header_values(mail_parser::HeaderName::From).next());
        let Some(list) = value.and_then(|v| v.as_address()) else {
            // A From: field that is not an address list names nobody we could check.
            return Err(FromProblem::NotOwned(shown(&String::from_utf8_lossy(
                field,
            ))));
        };
        let mut any = false;
        for addr in list.iter() {
            let text = addr.address().unwrap_or_default();
            match Address::parse(text) {
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
        if !any {
            return Err(FromProblem::NotOwned(shown(&String::from_utf8_lossy(
                field,
            ))));
        }
        self.seen = true;
        Ok(())
    }

    /// The verdict once the header section has been read: the first problem found, or
    /// [`FromProblem::Missing`] when there was no `From:` field.
    pub fn finish(self) -> Result<(), FromProblem> {
        match self.problem {
            Some(p) => Err(p),
            None if self.seen => Ok(()),
            None => Err(FromProblem::Missing),
        }
    }
}

impl crate::smtp::headers::FieldInspector for FromCheck {
    fn field(&mut self, kind: crate::smtp::headers::WholeField, field: &[u8]) {
        if kind == crate::smtp::headers::WholeField::From {
            self.from_field(field);
        }
    }
}

/// The first address-like text (`local@domain`, RFC 5322 §3.4.1 dot-atom form) in a display
/// name (already decoded and unquoted by the parser) that `senders` does not own. Comments,
/// angle brackets and quotes around it do not hide it.
fn foreign_address_in(senders: &Senders, name: &str) -> Option<String> {
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
    let check = FromCheck::new(senders.clone(), true);
    let mut reader =
        crate::smtp::headers::HeaderFilter::with_inspector(std::sync::Arc::default(), check);
    let mut out = Vec::new();
    reader.push(section, &mut out);
    reader.finish(&mut out);
    reader.into_inspector().finish()
}

/// A header value cut to a length fit for a log line.
fn shown(text: &str) -> String {
    text.chars().take(256).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

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
            "From: ceo@example.com <alice@example.com>\r\n",
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
        let mut off = FromCheck::new(s.clone(), false);
        off.from_field(spoofs[0].as_bytes());
        assert_eq!(off.finish(), Ok(()));
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
}
