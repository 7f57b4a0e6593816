//! "An address or an `@domain`": the one pattern the recipient list (`recipients_file`), the
//! users' `senders` and `queue purge --from` all match addresses with.

use crate::envelope::{Address, canonical_domain};

/// An exact address or a whole domain.
///
/// Matching is [`Address::matches`] for an address: the domain in its canonical A-label form
/// (so U-labels and A-labels are one domain), an ASCII local part ignoring case, a non-ASCII
/// one byte for byte. A domain matches every address of exactly that domain, not its
/// subdomains.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum AddressPattern {
    /// One mailbox.
    Address(Address),
    /// A whole domain, canonical (A-label, lower case, no trailing dot).
    Domain(String),
}

impl AddressPattern {
    /// `@DOMAIN` (U-label or A-label) or an address in its RFC 5321 form; `None` when it is
    /// neither.
    pub fn parse(entry: &str) -> Option<AddressPattern> {
        match entry.strip_prefix('@') {
            Some(domain) => canonical_domain(domain).ok().map(AddressPattern::Domain),
            None => Address::parse(entry).ok().map(AddressPattern::Address),
        }
    }

    /// True when `address` is the pattern's address, or in its domain.
    pub fn matches(&self, address: &Address) -> bool {
        match self {
            AddressPattern::Address(a) => a.matches(address),
            AddressPattern::Domain(domain) => address.domain() == domain,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn addresses_match_as_mailboxes_and_domains_exactly() {
        let cases: &[(&str, &str, bool)] = &[
            ("alice@example.com", "ALICE@Example.COM", true),
            ("alice@example.com", "bob@example.com", false),
            ("@example.com", "anyone@EXAMPLE.com", true),
            ("@example.com", "a@sub.example.com", false),
            ("@bücher.example", "a@xn--bcher-kva.example", true),
            ("jörg@example.com", "JÖRG@example.com", false),
        ];
        for (pattern, address, expected) in cases {
            let p = AddressPattern::parse(pattern).unwrap();
            let a = Address::parse(address).unwrap();
            assert_eq!(p.matches(&a), *expected, "{pattern} ~ {address}");
        }
        assert_eq!(AddressPattern::parse("not an address"), None);
        assert_eq!(AddressPattern::parse("@"), None);
    }
}
