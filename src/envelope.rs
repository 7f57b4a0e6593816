//! Domain types shared by every layer: queue ids, validated mail addresses and the envelope
//! of one accepted message.
//!
//! This module owns no I/O. Everything here is plain data that can be serialised into the
//! spool and read back by the queue commands; it must not depend on `smtp`, `inbound`,
//! `queue` or `outbound`.

use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Crockford base32 alphabet: no I, L, O, U, so ids survive being read aloud or retyped.
const ID_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Length of a queue id in characters.
pub const QUEUE_ID_LEN: usize = 16;

/// Identifier of one queued message: 16 characters of Crockford base32.
///
/// The first ten characters encode the microsecond of creation (so ids sort by age), the
/// last six a per-process counter mixed with randomness, so two relays writing the same
/// spool, or one restarted within a microsecond, do not collide. Because ids become file
/// names, [`QueueId::from_str`] accepts only this exact shape: an operator typing
/// `../../etc/passwd` gets an error, not a path.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct QueueId(String);

static ID_COUNTER: AtomicU32 = AtomicU32::new(0);

impl QueueId {
    /// A fresh id for a message received now.
    pub fn generate() -> Self {
        let micros = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_micros() as u64)
            .unwrap_or(0);
        let count = ID_COUNTER.fetch_add(1, Ordering::Relaxed);
        let salt: u32 = rand::random();
        // 50 bits of microseconds since November 2023 (2^50 µs is 35.7 years) and 30 bits of
        // counter mixed with randomness: 80 bits, 16 base32 characters.
        let time_part = micros.wrapping_sub(1_700_000_000_000_000) & ((1 << 50) - 1);
        let tail = (count.wrapping_mul(0x9E37_79B9) ^ salt) & ((1 << 30) - 1);
        let mut value: u128 = ((time_part as u128) << 30) | tail as u128;
        let mut out = [0u8; QUEUE_ID_LEN];
        for slot in out.iter_mut().rev() {
            *slot = ID_ALPHABET[(value & 31) as usize];
            value >>= 5;
        }
        QueueId(String::from_utf8(out.to_vec()).expect("alphabet is ASCII"))
    }

    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// Error for a string that is not a queue id.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a queue id: {0:?} (expected {QUEUE_ID_LEN} characters of 0-9 and A-Z)")]
pub struct BadQueueId(pub String);

impl FromStr for QueueId {
    type Err = BadQueueId;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let upper = s.to_ascii_uppercase();
        if upper.len() == QUEUE_ID_LEN && upper.bytes().all(|b| ID_ALPHABET.contains(&b)) {
            Ok(QueueId(upper))
        } else {
            Err(BadQueueId(s.to_string()))
        }
    }
}

impl TryFrom<String> for QueueId {
    type Error = BadQueueId;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        s.parse()
    }
}

impl From<QueueId> for String {
    fn from(id: QueueId) -> String {
        id.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// A mailbox `local@domain` as it appeared in a MAIL or RCPT command, validated.
///
/// The local part is kept exactly as the client sent it (it is the recipient domain's to
/// interpret); the domain is kept as sent too, and compared case-insensitively through
/// [`Address::domain_lower`]. A trailing dot on the domain is removed at parse time so
/// `user@example.com.` and `user@example.com` are one address.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct Address {
    local: String,
    domain: String,
}

/// Why a string is not an acceptable address.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address has no @domain part")]
    MissingDomain,
    #[error("address has an empty local part")]
    EmptyLocalPart,
    #[error("address domain is empty or malformed")]
    BadDomain,
    #[error("address is longer than 256 octets")]
    TooLong,
    #[error("address contains a control character or space")]
    ControlCharacter,
}

/// RFC 5321 §4.5.3.1.3: a path is at most 256 octets including the angle brackets.
pub const MAX_ADDRESS_LEN: usize = 254;

impl Address {
    /// Parse `local@domain`, splitting at the last `@` (a quoted local part may contain one).
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong);
        }
        if s.chars().any(|c| c.is_control() || c == ' ') {
            return Err(AddressError::ControlCharacter);
        }
        let (local, domain) = s.rsplit_once('@').ok_or(AddressError::MissingDomain)?;
        if local.is_empty() {
            return Err(AddressError::EmptyLocalPart);
        }
        let domain = domain.strip_suffix('.').unwrap_or(domain);
        if !valid_domain(domain) {
            return Err(AddressError::BadDomain);
        }
        Ok(Address {
            local: local.to_string(),
            domain: domain.to_string(),
        })
    }

    pub fn local(&self) -> &str {
        &self.local
    }

    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// The domain in lower case, for matching against configured domains.
    pub fn domain_lower(&self) -> String {
        self.domain.to_ascii_lowercase()
    }

    /// True when the domain is an address literal such as `[192.0.2.1]`.
    pub fn is_ip_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    /// True when the address contains non-ASCII characters (needs SMTPUTF8 to be relayed).
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii() || !self.domain.is_ascii()
    }
}

/// A domain name (dot-separated labels of letters, digits, hyphens and, for internationalised
/// names, non-ASCII characters) or an address literal in brackets.
fn valid_domain(domain: &str) -> bool {
    if domain.is_empty() || domain.len() > 253 {
        return false;
    }
    if let Some(literal) = domain.strip_prefix('[') {
        let Some(inner) = literal.strip_suffix(']') else {
            return false;
        };
        let inner = inner.strip_prefix("IPv6:").unwrap_or(inner);
        return inner.parse::<IpAddr>().is_ok();
    }
    domain.split('.').all(|label| {
        !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii())
    })
}

impl fmt::Display for Address {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}@{}", self.local, self.domain)
    }
}

impl FromStr for Address {
    type Err = AddressError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Address::parse(s)
    }
}

impl TryFrom<String> for Address {
    type Error = AddressError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        Address::parse(&s)
    }
}

impl From<Address> for String {
    fn from(a: Address) -> String {
        a.to_string()
    }
}

/// The reverse path of MAIL FROM: an address, or the null sender `<>` used by bounces.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub enum ReversePath {
    Null,
    Address(Address),
}

impl ReversePath {
    pub fn address(&self) -> Option<&Address> {
        match self {
            ReversePath::Null => None,
            ReversePath::Address(a) => Some(a),
        }
    }
}

impl fmt::Display for ReversePath {
    /// `<>` for the null sender, the bare address otherwise.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Address(a) => a.fmt(f),
        }
    }
}

impl TryFrom<String> for ReversePath {
    type Error = AddressError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.is_empty() || s == "<>" {
            Ok(ReversePath::Null)
        } else {
            Address::parse(&s).map(ReversePath::Address)
        }
    }
}

impl From<ReversePath> for String {
    fn from(p: ReversePath) -> String {
        match p {
            ReversePath::Null => String::new(),
            ReversePath::Address(a) => a.to_string(),
        }
    }
}

/// The BODY= parameter of MAIL FROM (RFC 6152).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Body {
    #[serde(rename = "7bit")]
    SevenBit,
    #[serde(rename = "8bitmime")]
    EightBitMime,
}

/// ESMTP parameters of MAIL FROM that portcullis honours and passes upstream. They are stored
/// as parsed values, so the upstream envelope is rebuilt from these, never copied from client
/// text.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct MailParams {
    /// BODY=7BIT / BODY=8BITMIME, when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub body: Option<Body>,
    /// SMTPUTF8 was requested (RFC 6531).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub smtputf8: bool,
    /// SIZE= as declared by the client (RFC 1870), when given.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
}

/// The TLS state of the inbound session that delivered a message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TlsInfo {
    /// e.g. `TLSv1.3`.
    pub version: String,
    /// e.g. `TLS13_AES_256_GCM_SHA384`.
    pub cipher: String,
}

impl fmt::Display for TlsInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} with cipher {}", self.version, self.cipher)
    }
}

/// Delivery state of one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
#[serde(rename_all = "lowercase")]
pub enum RcptStatus {
    /// Not yet delivered; will be tried (again).
    #[default]
    Pending,
    /// Accepted by the upstream.
    Delivered,
    /// Refused permanently (or expired); a bounce covers it.
    Failed,
}

/// One recipient of a queued message.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: Address,
    #[serde(default)]
    pub status: RcptStatus,
}

impl Recipient {
    pub fn new(address: Address) -> Self {
        Recipient {
            address,
            status: RcptStatus::Pending,
        }
    }
}

/// Everything known about one accepted message besides its bytes. Written into the spool at
/// DATA time, before the message itself, and never changed afterwards (delivery progress is
/// kept separately by the queue).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Envelope {
    pub id: QueueId,
    /// Seconds since the Unix epoch when the message was received.
    pub received_at: u64,
    /// Name of the listener that accepted it.
    pub listener: String,
    pub client_ip: IpAddr,
    pub client_port: u16,
    /// The EHLO/HELO argument the client gave.
    pub helo: String,
    /// TLS of the inbound session, if any.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<TlsInfo>,
    /// SASL login of the client, if it authenticated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub auth_user: Option<String>,
    pub mail_from: ReversePath,
    #[serde(default)]
    pub mail_params: MailParams,
    pub recipients: Vec<Recipient>,
}

/// Seconds since the Unix epoch, now.
pub fn unix_now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// An envelope for unit tests: TLS, a sender at example.org and `rcpts`.
#[cfg(test)]
pub(crate) fn sample_envelope(rcpts: &[&str]) -> Envelope {
    Envelope {
        id: QueueId::generate(),
        received_at: 1_700_000_000,
        listener: "mx".into(),
        client_ip: "192.0.2.7".parse().unwrap(),
        client_port: 40000,
        helo: "client.example".into(),
        tls: Some(TlsInfo {
            version: "TLSv1.3".into(),
            cipher: "TLS13_AES_128_GCM_SHA256".into(),
        }),
        auth_user: None,
        mail_from: ReversePath::Address(Address::parse("sender@example.org").unwrap()),
        mail_params: MailParams::default(),
        recipients: rcpts
            .iter()
            .map(|r| Recipient::new(Address::parse(r).unwrap()))
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queue_ids_are_unique_sortable_and_round_trip() {
        let a = QueueId::generate();
        std::thread::sleep(std::time::Duration::from_millis(2));
        let b = QueueId::generate();
        assert_ne!(a, b);
        assert!(a < b, "{a} should sort before {b}");
        assert_eq!(a.as_str().len(), QUEUE_ID_LEN);
        assert_eq!(a.as_str().parse::<QueueId>().unwrap(), a);
        assert_eq!(a.as_str().to_lowercase().parse::<QueueId>().unwrap(), a);
    }

    #[test]
    fn queue_id_rejects_paths_and_wrong_lengths() {
        for bad in [
            "",
            "../../etc/passwd",
            "0123456789ABCDE",
            "0123456789ABCDEFG",
            "0123456789ABCDE/",
        ] {
            assert!(bad.parse::<QueueId>().is_err(), "{bad:?} accepted");
        }
    }

    #[test]
    fn address_parsing_table() {
        let ok = [
            ("user@example.com", "user", "example.com"),
            ("User@Example.COM.", "User", "Example.COM"),
            ("\"a@b\"@example.com", "\"a@b\"", "example.com"),
            ("x@[192.0.2.1]", "x", "[192.0.2.1]"),
            ("x@[IPv6:::1]", "x", "[IPv6:::1]"),
            ("δοκιμή@παράδειγμα.δοκιμή", "δοκιμή", "παράδειγμα.δοκιμή"),
        ];
        for (input, local, domain) in ok {
            let a = Address::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((a.local(), a.domain()), (local, domain), "{input}");
        }
        let bad = [
            "",
            "user",
            "@example.com",
            "user@",
            "user@.com",
            "user@exa mple.com",
            "user@-bad.com",
            "user@[999.1.1.1]",
            "us\ner@example.com",
        ];
        for input in bad {
            assert!(Address::parse(input).is_err(), "{input:?} accepted");
        }
        assert!(Address::parse(&format!("{}@example.com", "a".repeat(300))).is_err());
    }

    #[test]
    fn envelope_round_trips_through_json() {
        let mut env = sample_envelope(&["a@example.com"]);
        env.mail_from = ReversePath::Null;
        env.mail_params = MailParams {
            body: Some(Body::EightBitMime),
            smtputf8: false,
            size: Some(1234),
        };
        let json = serde_json::to_string(&env).unwrap();
        let back: Envelope = serde_json::from_str(&json).unwrap();
        assert_eq!(env, back);
        assert!(json.contains("\"mail_from\":\"\""));
    }
}
