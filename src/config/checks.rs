//! The mail-authentication and reputation sections of the policy: `[dns]`, `[spf]`, `[dkim]`
//! (verification and `[[dkim.sign]]`), `[dmarc]`, `[dnsbl]` and `[doctor]`. Every check is
//! off unless configured, and applies to untrusted mail only (neither authenticated nor from
//! `relay_networks`); signing applies to trusted mail only.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use ipnet::IpNet;

use crate::dns::keys::SigningKey;

/// `[dns]`: where the relay's own lookups (SPF, DKIM, DMARC, ARC, iprev, DNSBL, `doctor`) go.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dns {
    /// Name servers, tried in order; empty: the system's (`/etc/resolv.conf`).
    pub nameservers: Vec<SocketAddr>,
    /// Time allowed for one query (default 5 s). For SPF, DKIM and DMARC a timeout is a
    /// temporary error; for a DNSBL it counts as not listed.
    pub timeout: Duration,
}

/// How a check's result is used (`verify = "off" | "record" | "enforce"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Verify {
    /// Not run.
    #[default]
    Off,
    /// Run, logged and written into `Authentication-Results:`; never refuses.
    Record,
    /// Run, recorded, and its failures refused as the check's section says.
    Enforce,
}

/// `[spf]` (RFC 7208), checked at MAIL FROM, or of the HELO name for a null reverse-path.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Spf {
    /// enforce: `fail` → `550 5.7.23`, `temperror` → `451 4.7.24` (RFC 7372).
    pub verify: Verify,
}

/// `[dkim]`: verification (RFC 6376) and `[[dkim.sign]]`.
#[derive(Debug, Clone, Default)]
pub struct Dkim {
    /// `verify = "record"`: every signature is verified and recorded (never enforced by
    /// itself; DMARC uses the results).
    pub verify: bool,
    /// `[[dkim.sign]]`, in file order: several entries for one domain each add a signature.
    pub sign: Vec<DkimSign>,
}

/// The header fields `[[dkim.sign]]` signs by default (`h=`): `From` twice, so that a second
/// `From:` added in transit breaks the signature (oversigning, RFC 6376 §8.15), then the
/// fields receivers display or use to thread and decode the message.
pub const DEFAULT_DKIM_HEADERS: [&str; 10] = [
    "From",
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "MIME-Version",
    "Content-Type",
];

/// One `[[dkim.sign]]` entry.
#[derive(Debug, Clone)]
pub struct DkimSign {
    /// The signing domain (`d=`), lower-case A-label; mail whose `From:` domain is this is
    /// signed.
    pub domain: String,
    /// The selector (`s=`).
    pub selector: String,
    /// Where the key was read from (as written in the policy).
    pub key_path: PathBuf,
    /// The private key, loaded and checked (RSA of at least 2048 bits, or Ed25519).
    pub key: Arc<SigningKey>,
    /// The header fields signed (`h=`), in order; a name twice is oversigned.
    pub headers: Vec<String>,
}

/// `[dmarc]` (RFC 7489, as mail-auth 0.13 evaluates it).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dmarc {
    /// Any value but `Off` runs SPF and DKIM for DMARC whatever `[spf]` and `[dkim]` say.
    pub verify: Verify,
    /// The field added to mail whose domain asks for quarantine (default
    /// `X-Portcullis-Quarantine: dmarc`); the same field arriving from untrusted senders is
    /// removed.
    pub quarantine_header: QuarantineHeader,
    /// `own_domains = "reject"`: mail from strangers whose `From:` domain is one of our
    /// accepted domains is judged as if that domain published `p=reject`.
    pub own_domains_reject: bool,
}

/// One header field, `Name: value`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct QuarantineHeader {
    /// The field name, as written.
    pub name: String,
    /// The field body, without the leading space.
    pub value: String,
}

/// `[dnsbl]` (RFC 5782).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dnsbl {
    /// A client whose listing zones' weights add up to this or more is refused at RCPT
    /// (default 1).
    pub threshold: u32,
    /// Clients never looked up (`relay_networks` are not looked up either).
    pub exempt: Vec<IpNet>,
    /// `[[dnsbl.zones]]`, in file order; empty: no DNSBL check.
    pub zones: Vec<DnsblZone>,
}

/// One `[[dnsbl.zones]]` entry.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DnsblZone {
    /// The zone queried (lower-case A-label, no trailing dot).
    pub zone: String,
    /// The name shown in refusals (default: `zone`; set it when the zone holds an access key).
    pub name: String,
    /// What a listing adds towards the threshold (default 1).
    pub weight: u32,
    /// The A records that count as listed; `None`: any address in 127.0.0.0/8 except
    /// 127.255.255.0/24 (which lists use to say they refuse our queries).
    pub answers: Option<Vec<IpAddr>>,
}

/// `[doctor]`: facts about our own outbound mail for `portcullis doctor`.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Doctor {
    /// Our outbound addresses (the ones receivers see).
    pub egress: Vec<IpAddr>,
}

impl super::Config {
    /// SPF runs for untrusted mail: `[spf]` verifies, or `[dmarc]` needs its result.
    pub fn spf_runs(&self) -> bool {
        self.spf.verify != Verify::Off || self.dmarc.verify != Verify::Off
    }

    /// DKIM signatures (and the ARC chain) are verified for untrusted mail: `[dkim] verify`,
    /// or `[dmarc]` needs the results.
    pub fn dkim_runs(&self) -> bool {
        self.dkim.verify || self.dmarc.verify != Verify::Off
    }

    /// Any check of untrusted mail's sender or content runs (iprev is recorded with them).
    pub fn message_checks_run(&self) -> bool {
        self.spf_runs() || self.dkim_runs()
    }

    /// Something needs the resolver: a check of untrusted mail, or a DNSBL zone.
    pub fn needs_resolver(&self) -> bool {
        self.message_checks_run() || !self.dnsbl.zones.is_empty()
    }
}
