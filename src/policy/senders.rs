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
//!   Display names and `Sender:` are not checked.
//! - The header check reads at most [`MAX_HEADER_CHECK`] octets of the header section; a
//!   `From:` beyond that is not seen, so the message counts as having none.

use crate::envelope::{Address, canonical_domain};

/// Octets of the header section kept for the `From:` check of an authenticated message.
pub const MAX_HEADER_CHECK: usize = 64 * 1024;

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
}

/// Check every `From:` address in `section` (the message's header section, possibly cut at
/// [`MAX_HEADER_CHECK`]) against `senders`.
pub fn check_from_header(senders: &Senders, section: &[u8]) -> Result<(), FromProblem> {
    let parsed = mail_parser::MessageParser::new().parse_headers(section);
    let Some(message) = parsed else {
        return Err(FromProblem::Missing);
    };
    let mut seen = false;
    for value in message.header_values(mail_parser::HeaderName::From) {
        let Some(list) = value.as_address() else {
            return Err(FromProblem::NotOwned(shown(&format!("{value:?}"))));
        };
        for addr in list.iter() {
            let text = addr.address().unwrap_or_default();
            match Address::parse(text) {
                Ok(a) if senders.owns(&a) => seen = true,
                _ => return Err(FromProblem::NotOwned(shown(text))),
            }
        }
    }
    if seen {
        Ok(())
    } else {
        Err(FromProblem::Missing)
    }
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
}
