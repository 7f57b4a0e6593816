//! SPF at MAIL FROM (or of the HELO name), iprev, and a message's DKIM signatures, ARC chain
//! and DMARC policy, through mail-auth and the relay's [`Resolver`](super::Resolver).
//!
//! Each check answers what it found; nothing here refuses. Every lookup is bounded by the
//! resolver's timeout, and a whole check by [`CHECK_DEADLINE_QUERIES`] of them: a check that
//! runs out of time is a `temperror`, never a pass.

use std::net::IpAddr;

use super::Resolver;

/// A whole check (all its lookups) may take this many `[dns] timeout`s at most.
pub const CHECK_DEADLINE_QUERIES: u32 = 4;

/// SPF results (RFC 7208 §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

/// Which identity SPF checked (RFC 7208 §2.3, §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfIdentity {
    /// The MAIL FROM reverse-path (`smtp.mailfrom`).
    MailFrom,
    /// The HELO name, for a null reverse-path (`smtp.helo`).
    Helo,
}

/// What SPF found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfCheck {
    pub result: SpfResult,
    pub identity: SpfIdentity,
    /// The identity checked: the reverse-path (`local@domain`) or the HELO name.
    pub subject: String,
    /// The domain whose record was evaluated (the reverse-path's domain, or the HELO name).
    pub domain: String,
    /// Why, for the log (a DNS error, a parse error, the record's explanation).
    pub detail: Option<String>,
}

/// iprev results (RFC 8601 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IprevResult {
    Pass,
    Fail,
    None,
    TempError,
    PermError,
}

/// What iprev found: the client's PTR name that resolved back to it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IprevCheck {
    pub result: IprevResult,
    /// The confirmed name (pass), or the first PTR name.
    pub name: Option<String>,
}

/// DKIM results as recorded (RFC 8601 §2.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimResult {
    Pass,
    Fail,
    Neutral,
    /// The signature verified but uses what RFC 8301 forbids (an RSA key under 1024 bits,
    /// `rsa-sha1`): never a pass.
    Policy,
    TempError,
    PermError,
}

/// One DKIM signature's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimCheck {
    pub result: DkimResult,
    /// `d=`.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    /// `a=`, e.g. `rsa-sha256`, `ed25519-sha256`.
    pub algorithm: String,
    /// The first 8 characters of `b=` (RFC 6008 `header.b`), to tell signatures apart.
    pub b: String,
    /// Why, for the log.
    pub detail: Option<String>,
}

/// ARC chain validation results (RFC 8617 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArcResult {
    Pass,
    Fail,
    None,
    TempError,
    PermError,
}

/// What ARC chain validation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcCheck {
    pub result: ArcResult,
    /// Instances in the chain (`i=` of the last set), 0 when none.
    pub instances: u32,
    pub detail: Option<String>,
}

/// DMARC results (RFC 7489 §11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcResult {
    Pass,
    Fail,
    None,
    TempError,
    PermError,
}

/// The policy a DMARC record asks for, after `sp`/`np` and `t=y` (one step lower).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

/// What DMARC found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcCheck {
    pub result: DmarcResult,
    /// The `From:` domain (`header.from`).
    pub domain: String,
    /// What the domain asks for a failing message; `Reject` for one of our own domains under
    /// `[dmarc] own_domains = "reject"`.
    pub policy: DmarcPolicy,
    /// The policy came from `own_domains = "reject"`, not from a record.
    pub own_domain: bool,
    pub detail: Option<String>,
}

/// The `From:` header's domains, as DMARC needs exactly one (RFC 7489 §6.6.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromDomain {
    /// One `From:` field naming one domain (lower-case A-label).
    One(String),
    /// No `From:` field, or none with a domain.
    Missing,
    /// Several `From:` fields, or one naming several domains.
    Several,
}

/// What the session knew before the message (for DMARC's SPF side and the record).
#[derive(Debug, Clone, Copy)]
pub struct MessageFacts<'a> {
    pub client_ip: IpAddr,
    /// The HELO/EHLO name.
    pub helo: &'a str,
    /// The reverse-path's domain, or the HELO name for a null reverse-path.
    pub mail_from_domain: &'a str,
    /// SPF as checked at MAIL (required when `dmarc`).
    pub spf: Option<&'a SpfCheck>,
    /// Verify DKIM signatures and the ARC chain.
    pub dkim: bool,
    /// Evaluate DMARC (implies `dkim`).
    pub dmarc: bool,
    /// Our accepted domains when `[dmarc] own_domains = "reject"`, else empty.
    pub own_domains: &'a [String],
}

/// What the end-of-data checks found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageChecks {
    /// One per signature, in header order (none: DKIM was not run or found none).
    pub dkim: Vec<DkimCheck>,
    /// `None`: not run.
    pub arc: Option<ArcCheck>,
    /// `None`: not run, or no single `From:` domain (see `from`).
    pub dmarc: Option<DmarcCheck>,
    pub from: FromDomain,
}

impl Resolver {
    /// SPF for a transaction (RFC 7208 §2.3–2.4): the reverse-path `reverse_path`
    /// (`local@domain`), or the HELO name when it is `None` (null reverse-path).
    pub async fn spf(&self, client_ip: IpAddr, helo: &str, reverse_path: Option<&str>) -> SpfCheck {
        let _ = (client_ip, helo, reverse_path);
        todo!()
    }

    /// iprev (RFC 8601 §3): the client's PTR names, each resolved forward.
    pub async fn iprev(&self, client_ip: IpAddr) -> IprevCheck {
        let _ = client_ip;
        todo!()
    }

    /// DKIM, ARC and DMARC for `message` (the raw message: header section and body, CRLF, as
    /// it will be sent, our own `Received:` included).
    pub async fn authenticate(&self, message: &[u8], facts: MessageFacts<'_>) -> MessageChecks {
        let _ = (message, facts);
        todo!()
    }
}
