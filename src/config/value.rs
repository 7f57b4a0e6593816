//! Why one configuration value is refused: the typed errors of the value checks (domains,
//! sender entries, upstream addresses, header patterns, password hashes).
//!
//! Each check returns one of these; the compiler files it under the value's key as a
//! [`ConfigError`](super::ConfigError). The `Display` text is what `check-config` prints after
//! the key, so it speaks to an administrator and says how to write the value instead.

use crate::envelope::AddressError;

/// Why a configuration value is not acceptable.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ValueError {
    /// Not a domain name (RFC 1035 §2.3.1 labels, or U-labels that UTS #46 maps).
    #[error("{text:?} is not a domain name ({problem})")]
    Domain {
        /// The value as written.
        text: String,
        /// What is wrong with it.
        problem: DomainProblem,
    },
    /// A `senders` or recipients-file entry without `@`: neither `local@domain` nor `@domain`.
    #[error("{text:?} is not an address (use local@domain, or @domain for a whole domain)")]
    NotAnAddress {
        /// The entry as written.
        text: String,
    },
    /// An address whose domain is an address literal (`[192.0.2.1]`, RFC 5321 §4.1.3): the
    /// entries name domains.
    #[error("{text:?} has an address literal as its domain; use a domain name")]
    AddressLiteral {
        /// The entry as written.
        text: String,
    },
    /// An address whose domain the address parser refuses although the domain on its own
    /// passes the domain check.
    #[error("{text:?} is not an address (malformed domain)")]
    MalformedDomain {
        /// The entry as written.
        text: String,
    },
    /// An address the parser refuses for its local part, length or characters (RFC 5321
    /// §4.1.2).
    #[error("{text:?} is not an address: {reason}")]
    Address {
        /// The entry as written.
        text: String,
        /// The parser's reason.
        reason: AddressError,
    },
    /// An upstream address that is not `host:port` (a domain, IPv4 address or `[IPv6]`, and a
    /// port from 1 to 65535).
    #[error(
        "{text:?} is not host:port (use e.g. exchange.example.internal:25, 10.0.0.5:25, [2001:db8::5]:25)"
    )]
    HostPort {
        /// The value as written.
        text: String,
    },
    /// A header name pattern with a character a field name cannot have (RFC 5322 §3.6.8), or
    /// `*` anywhere but at the end.
    #[error(
        "{pattern:?} is not a header name pattern (e.g. \"X-Spam-*\": a name, optionally ending in *)"
    )]
    HeaderPattern {
        /// The pattern as written.
        pattern: String,
    },
    /// A `[dns] nameservers` entry that is not `IP` or `IP:PORT` (IPv6 as `[::1]:53` or a bare
    /// `::1`; port 1 to 65535, default 53).
    #[error(
        "{text:?} is not a name server address (use e.g. 127.0.0.1, 192.0.2.53:5353, ::1 or [::1]:53)"
    )]
    Nameserver {
        /// The entry as written.
        text: String,
    },
    /// A header field name with a character RFC 5322 §3.6.8 does not allow (printable ASCII
    /// but `:`), or empty.
    #[error("{name:?} is not a header field name (printable ASCII without spaces or colons)")]
    HeaderName {
        /// The name as written.
        name: String,
    },
    /// A `quarantine_header` that is not one `Name: value` field we may add.
    #[error("{text:?} is not one header field \"Name: value\" ({problem})")]
    QuarantineHeader {
        /// The value as written.
        text: String,
        /// What is wrong with it.
        problem: &'static str,
    },
    /// A DKIM selector that is not a sequence of DNS labels (RFC 6376 §3.1).
    #[error(
        "{text:?} is not a DKIM selector (labels of letters, digits, hyphens or underscores \
         separated by dots, e.g. s2026)"
    )]
    Selector {
        /// The selector as written.
        text: String,
    },
    /// A DNSBL `answers` entry that is not an IPv4 address in 127.0.0.0/8 (RFC 5782 §2.1).
    #[error("{text:?} is not a DNSBL answer: an IPv4 address in 127.0.0.0/8, e.g. 127.0.0.2")]
    DnsblAnswer {
        /// The entry as written.
        text: String,
    },
    /// A DNSBL `answers` entry in 127.255.255.0/24: lists answer so when they refuse our
    /// queries (e.g. ones arriving through a public resolver), never to mean "listed".
    #[error(
        "{text:?} is in 127.255.255.0/24, which lists answer when they refuse our queries \
         (e.g. through a public resolver); it never means listed"
    )]
    DnsblRefusalAnswer {
        /// The entry as written.
        text: String,
    },
    /// A public zone name (shown in SMTP replies) that is empty or not printable ASCII.
    #[error("{text:?} cannot be shown in a reply: use printable ASCII, e.g. the zone's own name")]
    ReplyText {
        /// The value as written.
        text: String,
    },
    /// An address in a list of addresses (`[doctor] egress`) that is not an IP address.
    #[error("{text:?} is not an IP address (e.g. 198.51.100.7 or 2001:db8::7)")]
    IpAddress {
        /// The entry as written.
        text: String,
    },
    /// A password hash that cannot be used; see [`HashProblem`].
    #[error("{0}")]
    PasswordHash(#[from] HashProblem),
}

/// What is wrong with a domain name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum DomainProblem {
    /// Nothing (or only the root's dot).
    #[error("empty")]
    Empty,
    /// An IP address where a name is needed.
    #[error("it is an IP address")]
    IpAddress,
    /// A U-label or `xn--` label that UTS #46 (non-transitional) refuses (RFC 5891).
    #[error(
        "not a valid internationalised name: UTS #46 refuses it; write it in U-labels, e.g. \
         bücher.example, or as A-labels, e.g. xn--bcher-kva.example"
    )]
    Idna,
    /// Labels out of the LDH rule or too long (RFC 1035 §2.3.4: 63 octets a label, 253 in all).
    #[error(
        "labels between dots of 1 to 63 letters, digits or hyphens, not starting or ending \
         with a hyphen; at most 253 characters in all"
    )]
    Labels,
}

/// Why a `password_hash` cannot be used: it must be an argon2id PHC string (what
/// `portcullis passwd` prints) with parameters argon2 accepts. The text follows the key
/// (`users[0].password_hash: is not a PHC ...`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum HashProblem {
    /// Not a PHC string at all.
    #[error("is not a PHC password hash ({0}); make one with `portcullis passwd`")]
    NotPhc(argon2::password_hash::Error),
    /// A PHC string of another algorithm (argon2i, argon2d, bcrypt, ...).
    #[error("uses {algorithm}, not argon2id; make a new one with `portcullis passwd`")]
    NotArgon2id {
        /// The PHC algorithm identifier.
        algorithm: String,
    },
    /// No hash value after the salt.
    #[error("has no hash value")]
    NoHashValue,
    /// Parameters argon2 refuses (e.g. `m=1`): every AUTH for the user would be a local
    /// failure, so it is refused at load instead.
    #[error(
        "has argon2 parameters that cannot be used ({0}); make a new one with `portcullis passwd`"
    )]
    UnusableParams(argon2::password_hash::Error),
    /// A version field argon2 does not know.
    #[error("has an unsupported argon2 version ({0})")]
    UnsupportedVersion(argon2::Error),
    /// No salt.
    #[error("has no salt")]
    NoSalt,
    /// A salt that is not valid B64 or is longer than 64 bytes decoded.
    #[error("has a salt that cannot be decoded ({0})")]
    BadSalt(argon2::password_hash::Error),
}
