//! Domain types shared by every layer: queue ids, validated mail addresses and the envelope
//! of one accepted message.
//!
//! This module owns no I/O. Everything here is plain data that can be serialised into the
//! spool and read back by the queue commands; it must not depend on `smtp`, `inbound`,
//! `queue` or `outbound`.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// Crockford base32 alphabet: no I, L, O, U, so ids survive being read aloud or retyped.
const ID_ALPHABET: &[u8; 32] = b"0123456789ABCDEFGHJKMNPQRSTVWXYZ";

/// Length of a queue id in characters.
pub const QUEUE_ID_LEN: usize = 16;

/// What [`ID_DIGITS`] gives a byte that is no character of [`ID_ALPHABET`].
const NOT_DIGIT: u8 = u8::MAX;

/// The value of each byte as a digit of [`ID_ALPHABET`], a lower-case letter counting as its
/// capital, or [`NOT_DIGIT`]: one lookup a character where ids are read by the hundred
/// thousand (`queue list`, the queue's load at start).
const ID_DIGITS: [u8; 256] = {
    let mut table = [NOT_DIGIT; 256];
    let mut i = 0;
    while i < ID_ALPHABET.len() {
        let c = ID_ALPHABET[i];
        table[c as usize] = i as u8;
        table[c.to_ascii_lowercase() as usize] = i as u8;
        i += 1;
    }
    table
};

/// Whether `s` has the shape of a queue id, in either case.
fn is_queue_id(s: &str) -> bool {
    s.len() == QUEUE_ID_LEN && s.bytes().all(|b| ID_DIGITS[usize::from(b)] != NOT_DIGIT)
}

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

/// The epoch of the time part of queue ids: November 2023, in Unix microseconds.
const ID_EPOCH_MICROS: u64 = 1_700_000_000_000_000;
/// Bits of a queue id below its time part (the counter mixed with randomness).
const ID_TAIL_BITS: u32 = 30;

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
        let time_part = micros.wrapping_sub(ID_EPOCH_MICROS) & ((1 << 50) - 1);
        let tail = (count.wrapping_mul(0x9E37_79B9) ^ salt) & ((1 << ID_TAIL_BITS) - 1);
        QueueId::from_bits(((time_part as u128) << ID_TAIL_BITS) | tail as u128)
    }

    /// The id whose 80 bits are the low 80 bits of `bits` (the inverse of
    /// [`QueueId::to_bits`]).
    pub fn from_bits(bits: u128) -> QueueId {
        let mut value = bits;
        let mut out = [0u8; QUEUE_ID_LEN];
        for slot in out.iter_mut().rev() {
            *slot = ID_ALPHABET[(value & 31) as usize];
            value >>= 5;
        }
        QueueId(String::from_utf8(out.to_vec()).expect("alphabet is ASCII"))
    }

    /// The 80 bits this id encodes, as a number: 16 bytes without allocation, ordered as the
    /// ids are (by age), for tables that hold many ids.
    pub fn to_bits(&self) -> u128 {
        self.0.bytes().fold(0u128, |value, b| {
            // The constructors admit only alphabet characters.
            (value << 5) | u128::from(ID_DIGITS[usize::from(b)] & 31)
        })
    }

    /// When the id was made (the message's arrival), in Unix seconds, from its time part.
    /// Ids made 35.7 years after the epoch of their time part wrap around.
    pub fn created_at(&self) -> u64 {
        Self::created_at_bits(self.to_bits())
    }

    /// [`QueueId::created_at`] of the id with these [`QueueId::to_bits`].
    pub fn created_at_bits(bits: u128) -> u64 {
        let micros = u64::try_from(bits >> ID_TAIL_BITS).unwrap_or(0);
        micros.saturating_add(ID_EPOCH_MICROS) / 1_000_000
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
        if is_queue_id(s) {
            Ok(QueueId(s.to_ascii_uppercase()))
        } else {
            Err(BadQueueId(s.to_string()))
        }
    }
}

impl TryFrom<String> for QueueId {
    type Error = BadQueueId;
    /// [`QueueId::from_str`], reusing the string (how ids are read from the spool's JSON).
    fn try_from(mut s: String) -> Result<Self, Self::Error> {
        if is_queue_id(&s) {
            s.make_ascii_uppercase();
            Ok(QueueId(s))
        } else {
            Err(BadQueueId(s))
        }
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

/// A mailbox `Local-part@Domain` (RFC 5321 §4.1.2, with the UTF-8 extensions of RFC 6531),
/// validated and held in one canonical form, so that what policy checks is exactly what is
/// written upstream, into DSNs, logs, the spool and the queue commands.
///
/// - The local part is kept as its *content*: the quoted-string `"john doe"` is stored as
///   `john doe`, quoted-pairs resolved (`"a\"b"` is `a"b`). [`fmt::Display`] writes it back
///   as a Dot-string when it is one, else as a Quoted-string with only `"` and `\` escaped
///   (RFC 5321 §4.1.2: no needless quoted-pairs). So `"a.b"@x` and `a.b@x` are one address,
///   and a `>`, space or `;` inside the local part always stays inside quotes: it can neither
///   end the path nor add a parameter on the next hop. The content is at least one
///   character of printable ASCII, space, or non-ASCII other than control characters and
///   white space.
/// - The domain is a domain name in its A-label form, lower case (UTS #46 ToASCII,
///   non-transitional, so `faß.example` is `xn--fa-hia.example` and stays distinct from
///   `fass.example`), without a trailing root dot; or an address literal (RFC 5321 §4.1.3),
///   `[192.0.2.1]` or `[IPv6:2001:db8::1]`, with the address in its standard text form.
/// - The whole canonical text is at most [`MAX_ADDRESS_LEN`] octets.
///
/// Derived equality is exact (same content, same domain): it is what the round trip
/// `parse(format(a)) == a` promises. Policy compares mailboxes with [`Address::matches`],
/// which also ignores ASCII case in the local part.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(try_from = "StoredAddress", into = "String")]
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
    #[error("address local part is neither a dot-string nor a quoted-string")]
    BadLocalPart,
    #[error("address domain is empty or malformed")]
    BadDomain,
    /// A domain with non-ASCII characters or an `xn--` label that UTS #46 refuses (RFC 5891).
    #[error("address domain is not a valid internationalised domain name")]
    BadIdna,
    #[error("address is longer than 254 octets")]
    TooLong,
    #[error("address contains a control character or space")]
    ControlCharacter,
}

/// Longest address in octets: RFC 5321 §4.5.3.1.3 allows a path of 256 octets, and the path
/// is the address between `<` and `>`. Applies to the input and to the canonical form.
pub const MAX_ADDRESS_LEN: usize = 254;

impl Address {
    /// Parse the RFC 5321 text form `Local-part@Domain`, as it stands between `<` and `>`
    /// (source route already removed).
    ///
    /// The local part is a Dot-string (RFC 5321 §4.1.2; RFC 6531 adds non-ASCII characters
    /// to `atext`) or a Quoted-string; the domain a domain name in U-label or A-label form
    /// (one trailing dot tolerated) or an address literal.
    ///
    /// # Errors
    /// [`AddressError::BadIdna`] for a domain that UTS #46 refuses, [`AddressError::TooLong`]
    /// when the input or the canonical form is over [`MAX_ADDRESS_LEN`] octets, and the
    /// other variants for the syntax fault they name.
    pub fn parse(s: &str) -> Result<Address, AddressError> {
        if s.len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong);
        }
        let (local, domain) = split_local_part(s)?;
        let address = Address {
            local,
            domain: parse_domain_part(domain)?,
        };
        if address.to_string().len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong);
        }
        Ok(address)
    }

    /// An address from its local part's *content* (quotes and quoted-pairs already removed)
    /// and a domain, as an RFC 5322 reader such as mail-parser reports an addr-spec
    /// (`"john doe"@x` as `john doe` and `x`). Same rules and canonical form as
    /// [`Address::parse`].
    ///
    /// # Errors
    /// [`AddressError::EmptyLocalPart`], [`AddressError::ControlCharacter`] for a character
    /// no local part may hold, the domain errors of [`Address::parse`], and
    /// [`AddressError::TooLong`] when the canonical form is over [`MAX_ADDRESS_LEN`] octets.
    #[cfg(test)]
    pub fn from_parts(local: &str, domain: &str) -> Result<Address, AddressError> {
        if local.is_empty() {
            return Err(AddressError::EmptyLocalPart);
        }
        if local.len() > MAX_ADDRESS_LEN || domain.len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong);
        }
        if !local.chars().all(is_content_char) {
            return Err(AddressError::ControlCharacter);
        }
        let address = Address {
            local: local.to_owned(),
            domain: parse_domain_part(domain)?,
        };
        if address.to_string().len() > MAX_ADDRESS_LEN {
            return Err(AddressError::TooLong);
        }
        Ok(address)
    }

    /// Read an address from the spool. Message files written before the canonical form
    /// stored the local part's content unquoted (`john.doe@x`, or `x>y@x` for `"x>y"@x`);
    /// text that is not a valid RFC 5321 address is read that way: split at the last `@`,
    /// the local part taken as content. Both forms agree on every Dot-string, so the only
    /// text read differently from how it was meant is an old local part that itself has
    /// the shape of a quoted-string (`"a"`, from a client that sent `"\"a\""`); it is read
    /// as `a`, an address the same client could have sent directly. No length limit is
    /// applied to the old form, so a message accepted then is still delivered now.
    pub fn from_stored(s: &str) -> Result<Address, AddressError> {
        match Address::parse(s) {
            Ok(a) => Ok(a),
            Err(first) => {
                let (local, domain) = s.rsplit_once('@').ok_or(first.clone())?;
                // The older parser refused spaces and control characters too.
                if local.is_empty() || !local.chars().all(|c| c != ' ' && is_content_char(c)) {
                    return Err(first);
                }
                Ok(Address {
                    local: local.to_owned(),
                    domain: parse_domain_part(domain).map_err(|_| first)?,
                })
            }
        }
    }

    /// The local part's content (quotes and quoted-pairs removed); see [`Address`].
    pub fn local(&self) -> &str {
        &self.local
    }

    /// The canonical domain: a lower-case A-label domain name or an address literal.
    pub fn domain(&self) -> &str {
        &self.domain
    }

    /// True when the domain is an address literal such as `[192.0.2.1]`.
    pub fn is_ip_literal(&self) -> bool {
        self.domain.starts_with('[')
    }

    /// True when the address needs SMTPUTF8 to be relayed (RFC 6531): its local part has
    /// non-ASCII characters. The canonical domain is always ASCII.
    pub fn is_utf8(&self) -> bool {
        !self.local.is_ascii()
    }

    /// True when `self` and `other` name the same mailbox for policy: the same domain, and
    /// local parts equal ignoring ASCII case when both are ASCII, byte for byte otherwise.
    ///
    /// No Unicode case folding or normalisation: U+212A KELVIN SIGN lower-cases to `k`, so
    /// folding would let `\u{212A}ate@x` pass a check written for `kate@x` and then be
    /// delivered as itself. The same rule serves the relay check, recipients_file, sender
    /// ownership and `queue purge --from`.
    pub fn matches(&self, other: &Address) -> bool {
        self.domain == other.domain && local_parts_match(&self.local, &other.local)
    }

    /// The form under which this address is looked up in a set built from the same form:
    /// ASCII local parts lower-cased, others unchanged (see [`Address::matches`]), so
    /// `a.for_matching() == b.for_matching()` exactly when `a.matches(b)`.
    pub fn for_matching(&self) -> Address {
        if self.local.is_ascii() {
            Address {
                local: self.local.to_ascii_lowercase(),
                domain: self.domain.clone(),
            }
        } else {
            self.clone()
        }
    }
}

/// Local parts compared the way [`Address::matches`] documents.
fn local_parts_match(a: &str, b: &str) -> bool {
    if a.is_ascii() && b.is_ascii() {
        a.eq_ignore_ascii_case(b)
    } else {
        a == b
    }
}

/// A character allowed in a local part's content: printable ASCII or space, or non-ASCII
/// that is neither a control character nor white space (U+0085, U+2028 and the like would
/// end a line in some readers).
fn is_content_char(c: char) -> bool {
    if c.is_ascii() {
        matches!(c, ' '..='~')
    } else {
        !c.is_control() && !c.is_whitespace()
    }
}

/// RFC 5322 `atext` with RFC 6531's UTF8-non-ascii: what a Dot-string atom is made of.
fn is_atext(c: char) -> bool {
    if c.is_ascii() {
        c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c)
    } else {
        is_content_char(c)
    }
}

/// True when `local` can be written as an RFC 5321 Dot-string.
fn is_dot_string(local: &str) -> bool {
    local
        .split('.')
        .all(|atom| !atom.is_empty() && atom.chars().all(is_atext))
}

/// Splits `Local-part@rest`, returning the local part's content and the text after `@`.
fn split_local_part(s: &str) -> Result<(String, &str), AddressError> {
    if let Some(quoted) = s.strip_prefix('"') {
        let mut content = String::new();
        let mut chars = quoted.char_indices();
        while let Some((i, c)) = chars.next() {
            match c {
                '"' => {
                    let rest = &quoted[i + 1..];
                    let domain = rest.strip_prefix('@').ok_or(if rest.is_empty() {
                        AddressError::MissingDomain
                    } else {
                        AddressError::BadLocalPart
                    })?;
                    if content.is_empty() {
                        return Err(AddressError::EmptyLocalPart);
                    }
                    return Ok((content, domain));
                }
                // quoted-pairSMTP: a backslash and one printable ASCII character or space.
                '\\' => match chars.next() {
                    Some((_, e)) if matches!(e, ' '..='~') => content.push(e),
                    Some((_, e)) if e.is_control() => return Err(AddressError::ControlCharacter),
                    _ => return Err(AddressError::BadLocalPart),
                },
                c if is_content_char(c) => content.push(c),
                c if c.is_control() || c.is_whitespace() => {
                    return Err(AddressError::ControlCharacter);
                }
                _ => return Err(AddressError::BadLocalPart),
            }
        }
        return Err(AddressError::BadLocalPart);
    }
    let (local, domain) = s.split_once('@').ok_or(AddressError::MissingDomain)?;
    if local.is_empty() {
        return Err(AddressError::EmptyLocalPart);
    }
    if local.chars().any(|c| c.is_control() || c.is_whitespace()) {
        return Err(AddressError::ControlCharacter);
    }
    if !is_dot_string(local) {
        return Err(AddressError::BadLocalPart);
    }
    Ok((local.to_owned(), domain))
}

/// The domain of an address: an address literal or a domain name (see [`canonical_domain`]).
fn parse_domain_part(text: &str) -> Result<String, AddressError> {
    if let Some(literal) = text.strip_prefix('[') {
        let inner = literal.strip_suffix(']').ok_or(AddressError::BadDomain)?;
        return match inner.get(..5) {
            Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => inner[5..]
                .parse::<Ipv6Addr>()
                .map(|ip| format!("[IPv6:{ip}]"))
                .map_err(|_| AddressError::BadDomain),
            _ => inner
                .parse::<Ipv4Addr>()
                .map(|ip| format!("[{ip}]"))
                .map_err(|_| AddressError::BadDomain),
        };
    }
    canonical_domain(text)
}

/// The canonical form of a domain name: UTS #46 ToASCII (non-transitional, STD3 ASCII rules,
/// hyphens checked in the first and last position only, DNS lengths verified: labels of 1
/// to 63 octets, at most 253 in all), which yields the A-label form in lower case. One
/// trailing root dot is removed first. `Bücher.Example.` and `xn--bcher-kva.example` both
/// give `xn--bcher-kva.example`; `faß.example` gives `xn--fa-hia.example`, not
/// `fass.example`.
///
/// Used for every domain that is compared: addresses, `accepted_domains`, upstream
/// `domains`, `senders` and recipients_file entries, and `queue purge --from @DOMAIN`.
///
/// # Errors
/// [`AddressError::BadIdna`] when the name has non-ASCII characters or an `xn--` label and
/// UTS #46 refuses it (RFC 5891 §4), [`AddressError::BadDomain`] for any other malformed
/// name.
pub fn canonical_domain(text: &str) -> Result<String, AddressError> {
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() || name.len() > 1024 {
        return Err(AddressError::BadDomain);
    }
    idna::uts46::Uts46::new()
        .to_ascii(
            name.as_bytes(),
            idna::uts46::AsciiDenyList::STD3,
            idna::uts46::Hyphens::CheckFirstLast,
            idna::uts46::DnsLength::Verify,
        )
        .map(|a| a.into_owned())
        .map_err(|_| {
            let lower = name.to_ascii_lowercase();
            if !name.is_ascii() || lower.starts_with("xn--") || lower.contains(".xn--") {
                AddressError::BadIdna
            } else {
                AddressError::BadDomain
            }
        })
}

impl fmt::Display for Address {
    /// The canonical RFC 5321 text: Dot-string or Quoted-string, `@`, canonical domain.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local) {
            f.write_str(&self.local)?;
        } else {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        write!(f, "@{}", self.domain)
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

/// An address as stored in the spool (serde only): read with [`Address::from_stored`], so
/// message files written in the older unquoted form still load.
#[derive(Deserialize)]
#[serde(transparent)]
struct StoredAddress(String);

impl TryFrom<StoredAddress> for Address {
    type Error = AddressError;
    fn try_from(s: StoredAddress) -> Result<Self, Self::Error> {
        Address::from_stored(&s.0)
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

    /// The sender as events and the journal carry it: the bare address, empty for `<>`
    /// ([`crate::observe::Event::from`]). Its `Display` writes `<>` instead.
    pub fn bare(&self) -> String {
        self.address().map_or_else(String::new, ToString::to_string)
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

/// The spool form (serde): empty or `<>` for the null sender, else an address read with
/// [`Address::from_stored`].
impl TryFrom<String> for ReversePath {
    type Error = AddressError;
    fn try_from(s: String) -> Result<Self, Self::Error> {
        if s.is_empty() || s == "<>" {
            Ok(ReversePath::Null)
        } else {
            Address::from_stored(&s).map(ReversePath::Address)
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

/// One recipient of a queued message: its forward-path. Its delivery status is kept in the
/// queue's state file ([`crate::queue::DeliveryState`]), the one place it is written. Spool
/// files of earlier versions also carry a `status` here, always `pending`: it is ignored when
/// read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Recipient {
    pub address: Address,
}

impl Recipient {
    pub fn new(address: Address) -> Self {
        Recipient { address }
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
    fn queue_id_bits_round_trip_sort_as_the_ids_and_carry_the_creation_time() {
        let (a, b) = (QueueId::generate(), QueueId::generate());
        assert_eq!(QueueId::from_bits(a.to_bits()), a);
        assert_eq!(a.cmp(&b), a.to_bits().cmp(&b.to_bits()));
        let now = unix_now();
        assert!(
            (now - 1..=now).contains(&a.created_at()),
            "{}",
            a.created_at()
        );
        // The epoch, 90 seconds later.
        let id = QueueId::from_bits(90_000_000u128 << ID_TAIL_BITS | 12345);
        assert_eq!(id.created_at(), 1_700_000_090);
    }

    #[test]
    fn queue_id_rejects_paths_and_wrong_lengths() {
        for bad in [
            "",
            "../../etc/passwd",
            "0123456789ABCDE",
            "0123456789ABCDEFG",
            "0123456789ABCDE/",
            // I, L, O and U are not in the alphabet, in either case; nor is anything else.
            "0123456789ABCDEI",
            "0123456789ABCDEl",
            "0123456789ABCDEO",
            "0123456789ABCDEu",
            "0123456789ABCD\u{e9}",
            "0123456789ABCDE\0",
        ] {
            assert!(bad.parse::<QueueId>().is_err(), "{bad:?} accepted");
            assert!(
                QueueId::try_from(bad.to_owned()).is_err(),
                "{bad:?} accepted"
            );
        }
        // Every character of the alphabet, in either case, and its value.
        for (value, &c) in ID_ALPHABET.iter().enumerate() {
            for c in [c, c.to_ascii_lowercase()] {
                let text = format!("000000000000000{}", char::from(c));
                let id: QueueId = text.parse().unwrap();
                assert_eq!(id, QueueId::try_from(text).unwrap());
                assert_eq!(id.to_bits(), value as u128);
                assert_eq!(id.as_str(), id.as_str().to_ascii_uppercase());
            }
        }
    }

    #[test]
    fn address_parsing_table() {
        // (input, local part content, canonical domain, canonical text)
        let ok = [
            (
                "user@example.com",
                "user",
                "example.com",
                "user@example.com",
            ),
            (
                "User@Example.COM.",
                "User",
                "example.com",
                "User@example.com",
            ),
            (
                "a.b+c@example.com",
                "a.b+c",
                "example.com",
                "a.b+c@example.com",
            ),
            (
                "\"a@b\"@example.com",
                "a@b",
                "example.com",
                "\"a@b\"@example.com",
            ),
            (
                "\"x>y\"@example.com",
                "x>y",
                "example.com",
                "\"x>y\"@example.com",
            ),
            (
                "\"john doe\"@example.com",
                "john doe",
                "example.com",
                "\"john doe\"@example.com",
            ),
            ("\"a\\\"b\"@x.test", "a\"b", "x.test", "\"a\\\"b\"@x.test"),
            ("\"a\\\\b\"@x.test", "a\\b", "x.test", "\"a\\\\b\"@x.test"),
            // Needless quoting and quoted-pairs are dropped: one address, one form.
            ("\"a.b\"@x.test", "a.b", "x.test", "a.b@x.test"),
            ("\"\\a\"@x.test", "a", "x.test", "a@x.test"),
            ("\"a..b\"@x.test", "a..b", "x.test", "\"a..b\"@x.test"),
            ("\".a\"@x.test", ".a", "x.test", "\".a\"@x.test"),
            ("\"a;b c\"@x.test", "a;b c", "x.test", "\"a;b c\"@x.test"),
            ("x@[192.0.2.1]", "x", "[192.0.2.1]", "x@[192.0.2.1]"),
            ("x@[IPv6:::1]", "x", "[IPv6:::1]", "x@[IPv6:::1]"),
            ("x@[ipv6:0:0::1]", "x", "[IPv6:::1]", "x@[IPv6:::1]"),
            (
                "δοκιμή@παράδειγμα.δοκιμή",
                "δοκιμή",
                "xn--hxajbheg2az3al.xn--jxalpdlp",
                "δοκιμή@xn--hxajbheg2az3al.xn--jxalpdlp",
            ),
            (
                "info@Bücher.example",
                "info",
                "xn--bcher-kva.example",
                "info@xn--bcher-kva.example",
            ),
            (
                "info@XN--BCHER-KVA.example",
                "info",
                "xn--bcher-kva.example",
                "info@xn--bcher-kva.example",
            ),
        ];
        for (input, local, domain, text) in ok {
            let a = Address::parse(input).unwrap_or_else(|e| panic!("{input}: {e}"));
            assert_eq!((a.local(), a.domain()), (local, domain), "{input}");
            assert_eq!(a.to_string(), text, "{input}");
        }
        let bad = [
            ("", AddressError::MissingDomain),
            ("user", AddressError::MissingDomain),
            ("@example.com", AddressError::EmptyLocalPart),
            ("\"\"@example.com", AddressError::EmptyLocalPart),
            ("user@", AddressError::BadDomain),
            ("user@.com", AddressError::BadDomain),
            ("user@exa mple.com", AddressError::BadDomain),
            ("user@-bad.com", AddressError::BadDomain),
            ("user@a_b.com", AddressError::BadDomain),
            ("user@[999.1.1.1]", AddressError::BadDomain),
            ("user@[::1]", AddressError::BadDomain),
            ("user@[IPv6:1.2.3.4]", AddressError::BadDomain),
            ("us\ner@example.com", AddressError::ControlCharacter),
            ("us er@example.com", AddressError::ControlCharacter),
            ("a\u{2028}b@example.com", AddressError::ControlCharacter),
            ("\"a\rb\"@example.com", AddressError::ControlCharacter),
            ("\"a\\\nb\"@example.com", AddressError::ControlCharacter),
            ("x>y@example.com", AddressError::BadLocalPart),
            ("a..b@example.com", AddressError::BadLocalPart),
            (".a@example.com", AddressError::BadLocalPart),
            ("a.@example.com", AddressError::BadLocalPart),
            ("a\"b\"@example.com", AddressError::BadLocalPart),
            ("\"ab\"c@example.com", AddressError::BadLocalPart),
            ("\"ab@example.com", AddressError::BadLocalPart),
            ("\"ab\\\u{e9}\"@example.com", AddressError::BadLocalPart),
            ("a@b@example.com", AddressError::BadDomain),
            ("x@xn--a.example", AddressError::BadIdna),
            ("x@b\u{fffd}cher.example", AddressError::BadIdna),
        ];
        for (input, error) in bad {
            assert_eq!(Address::parse(input), Err(error), "{input:?}");
        }
        assert_eq!(
            Address::parse(&format!("{}@example.com", "a".repeat(300))),
            Err(AddressError::TooLong)
        );
        // 252 octets in, but the A-label makes the canonical form 258.
        let long = format!("{}@bücher.example", "a".repeat(236));
        assert!(long.len() <= MAX_ADDRESS_LEN);
        assert_eq!(Address::parse(&long), Err(AddressError::TooLong));
    }

    #[test]
    fn idn_domains_compare_as_a_labels_and_sharp_s_is_not_ss() {
        let u = Address::parse("info@bücher.example").unwrap();
        let a = Address::parse("info@xn--bcher-kva.example").unwrap();
        assert_eq!(u, a);
        assert!(!u.is_utf8(), "the canonical domain is ASCII");
        let sharp = canonical_domain("faß.example").unwrap();
        assert_eq!(sharp, "xn--fa-hia.example", "UTS #46 non-transitional");
        assert_ne!(sharp, canonical_domain("fass.example").unwrap());
        assert_eq!(canonical_domain("Example.COM.").unwrap(), "example.com");
        assert_eq!(canonical_domain("a.b.."), Err(AddressError::BadDomain));
        assert_eq!(
            canonical_domain(&format!("{}.example", "a".repeat(64))),
            Err(AddressError::BadDomain)
        );
    }

    #[test]
    fn ascii_local_parts_match_ignoring_case_and_others_byte_for_byte() {
        let p = |s: &str| Address::parse(s).unwrap();
        assert!(p("Kate@Example.com").matches(&p("kate@example.com")));
        assert!(p("\"John Doe\"@x.test").matches(&p("\"john doe\"@x.test")));
        // U+212A KELVIN SIGN lower-cases to `k` with Unicode rules: never folded here.
        assert!(!p("\u{212A}ate@example.com").matches(&p("kate@example.com")));
        assert!(!p("Élise@x.test").matches(&p("élise@x.test")));
        // No normalisation: precomposed é and e + combining acute are different mailboxes.
        assert!(!p("\u{e9}@x.test").matches(&p("e\u{301}@x.test")));
        assert!(p("élise@x.test").matches(&p("élise@X.TEST")));
        assert!(!p("kate@example.com").matches(&p("kate@example.org")));
        for (a, b) in [
            ("Kate@x.test", "kate@x.test"),
            ("\u{212A}ate@x.test", "kate@x.test"),
            ("Élise@x.test", "élise@x.test"),
        ] {
            let (a, b) = (p(a), p(b));
            assert_eq!(
                a.matches(&b),
                a.for_matching() == b.for_matching(),
                "{a} {b}"
            );
        }
    }

    /// Checks the canonical text: no CR or LF anywhere, no `>`, space or `"` outside the
    /// quotes of the local part, and it is `Local-part@Domain` with a quoted local part only
    /// when the content is not a dot-string.
    fn assert_canonical_text(text: &str) {
        assert!(!text.contains(['\r', '\n']), "{text:?}");
        let rest = match text.strip_prefix('"') {
            Some(q) => {
                let mut chars = q.char_indices();
                let mut end = None;
                while let Some((i, c)) = chars.next() {
                    match c {
                        '\\' => {
                            chars.next();
                        }
                        '"' => {
                            end = Some(i + 1);
                            break;
                        }
                        _ => {}
                    }
                }
                &q[end.unwrap_or_else(|| panic!("unterminated quotes in {text:?}"))..]
            }
            None => text,
        };
        assert!(!rest.contains(['>', ' ', '"', '<']), "{text:?}");
    }

    #[test]
    fn every_parsed_address_formats_to_text_that_parses_back_to_it() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        const PIECES: &[&str] = &[
            "a",
            "Z",
            "0",
            ".",
            "..",
            "@",
            "\"",
            "\\",
            " ",
            ">",
            "<",
            ";",
            ",",
            ":",
            "(",
            ")",
            "[",
            "]",
            "!",
            "#",
            "{",
            "}",
            "~",
            "=",
            "\r",
            "\n",
            "\t",
            "\0",
            "\u{7f}",
            "é",
            "ß",
            "\u{212A}",
            "δ",
            "\u{85}",
            "\u{a0}",
            "\u{2028}",
            "\u{200d}",
            "\u{fffd}",
            "xn--",
            "bücher",
            "-",
            "1",
            "\"a\"",
            "\\\"",
            "\\\\",
            "[IPv6:",
            "192.0.2.1",
            "::1",
            "faß",
        ];
        let mut rng = StdRng::seed_from_u64(0x5EED_ADD5);
        let mut accepted = 0;
        for _ in 0..100_000 {
            let n = rng.random_range(1..12);
            let mut s = String::new();
            if rng.random_bool(0.3) {
                s.push('"');
            }
            for _ in 0..n {
                s.push_str(PIECES[rng.random_range(0..PIECES.len())]);
            }
            if rng.random_bool(0.7) {
                let domains = [
                    "x.test",
                    "Bücher.example",
                    "[192.0.2.1]",
                    "faß.EXAMPLE.",
                    "a",
                ];
                s.push_str(if rng.random_bool(0.3) { "\"@" } else { "@" });
                s.push_str(domains[rng.random_range(0..domains.len())]);
            }
            let Ok(a) = Address::parse(&s) else { continue };
            accepted += 1;
            let text = a.to_string();
            assert_eq!(Address::parse(&text).as_ref(), Ok(&a), "{s:?} -> {text:?}");
            assert_canonical_text(&text);
            // The spool reads its own form back unchanged.
            assert_eq!(Address::from_stored(&text).as_ref(), Ok(&a), "{text:?}");
        }
        assert!(
            accepted > 3_000,
            "generator too narrow: {accepted} accepted"
        );
    }

    #[test]
    fn any_local_part_content_survives_quoting() {
        use rand::rngs::StdRng;
        use rand::{Rng, SeedableRng};
        let alphabet: Vec<char> = (' '..='~').chain("é\u{212A}δß中😀".chars()).collect();
        let mut rng = StdRng::seed_from_u64(7);
        for _ in 0..20_000 {
            let content: String = (0..rng.random_range(1..30))
                .map(|_| alphabet[rng.random_range(0..alphabet.len())])
                .collect();
            let escaped: String = content
                .chars()
                .flat_map(|c| match c {
                    '"' | '\\' => vec!['\\', c],
                    c => vec![c],
                })
                .collect();
            let a = Address::parse(&format!("\"{escaped}\"@x.test"))
                .unwrap_or_else(|e| panic!("{content:?}: {e}"));
            assert_eq!(a.local(), content);
            let text = a.to_string();
            assert_canonical_text(&text);
            assert_eq!(Address::parse(&text), Ok(a));
        }
    }

    #[test]
    fn from_parts_takes_content_as_an_rfc_5322_reader_reports_it() {
        let a = Address::from_parts("john doe", "Example.COM").unwrap();
        assert_eq!(a, Address::parse("\"john doe\"@example.com").unwrap());
        assert_eq!(
            Address::from_parts("x>y", "bücher.example")
                .unwrap()
                .to_string(),
            "\"x>y\"@xn--bcher-kva.example"
        );
        assert_eq!(
            Address::from_parts("", "x.test"),
            Err(AddressError::EmptyLocalPart)
        );
        assert_eq!(
            Address::from_parts("a\r\nb", "x.test"),
            Err(AddressError::ControlCharacter)
        );
        assert_eq!(
            Address::from_parts("a", "xn--a.test"),
            Err(AddressError::BadIdna)
        );
    }

    #[test]
    fn spool_reads_the_older_unquoted_form() {
        // Written before the canonical form: the local part's content, unquoted.
        for (old, local, text) in [
            ("x>y@example.com", "x>y", "\"x>y\"@example.com"),
            ("a\"b@example.com", "a\"b", "\"a\\\"b\"@example.com"),
            ("a@b@example.com", "a@b", "\"a@b\"@example.com"),
            ("plain@Example.COM", "plain", "plain@example.com"),
        ] {
            let a = Address::from_stored(old).unwrap_or_else(|e| panic!("{old}: {e}"));
            assert_eq!((a.local(), a.to_string().as_str()), (local, text));
        }
        for bad in [
            "no-at",
            "@x.test",
            "a b@x.test",
            "a\r\n@x.test",
            "a@-x.test",
        ] {
            assert!(Address::from_stored(bad).is_err(), "{bad:?}");
        }
        let json = r#"{"id":"0123456789ABCDEF","received_at":1,"listener":"mx","client_ip":"192.0.2.1",
            "client_port":1,"helo":"h","mail_from":"x>y@example.com",
            "recipients":[{"address":"a;b@example.com"}]}"#;
        let env: Envelope = serde_json::from_str(json).unwrap();
        assert_eq!(env.mail_from.to_string(), "\"x>y\"@example.com");
        assert_eq!(env.recipients[0].address.to_string(), "\"a;b\"@example.com");
        // And what is written now is the canonical form.
        let again = serde_json::to_string(&env).unwrap();
        assert!(
            again.contains(r#""mail_from":"\"x>y\"@example.com""#),
            "{again}"
        );
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
