//! Compilation of the mail-authentication and reputation sections: `[dns]`, `[spf]`,
//! `[dkim]` with `[[dkim.sign]]`, `[dmarc]`, `[dnsbl]` with `[[dnsbl.zones]]`, `[doctor]`.

use std::collections::HashSet;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use super::super::checks::DEFAULT_DKIM_HEADERS;
use super::super::raw::{
    RawDkim, RawDkimSign, RawDmarc, RawDns, RawDnsbl, RawDnsblZone, RawDoctor,
};
use super::super::value::ValueError;
use super::super::{
    Dkim, DkimSign, Dmarc, Dns, Dnsbl, DnsblZone, Doctor, QuarantineHeader, Spf, Verify,
};
use super::{Compiler, Section, check_domain};
use crate::dns::keys::SigningKey;

/// Default `[dns] timeout`.
const DEFAULT_DNS_TIMEOUT: &str = "5s";
/// Longest `[dns] timeout`: a query that may take longer would hold a session (and, for SPF
/// at MAIL, the client) past any reasonable SMTP command timeout.
const MAX_DNS_TIMEOUT: Duration = Duration::from_secs(60);
/// The port of a name server written without one.
const DNS_PORT: u16 = 53;
/// Default `[dmarc] quarantine_header`.
pub const DEFAULT_QUARANTINE_HEADER: &str = "X-Portcullis-Quarantine: dmarc";

/// [`DEFAULT_QUARANTINE_HEADER`], split.
fn default_quarantine_header() -> QuarantineHeader {
    QuarantineHeader {
        name: "X-Portcullis-Quarantine".to_owned(),
        value: "dmarc".to_owned(),
    }
}
/// Longest `quarantine_header`, `Name: value` (RFC 5322 §2.1.1 recommends lines of at most
/// 78 characters; 998 is the hard limit).
const MAX_QUARANTINE_HEADER: usize = 200;
/// Longest DNSBL `name` shown in a reply.
const MAX_REPLY_NAME: usize = 255;

/// Header fields a quarantine header may not be named after: it is removed from untrusted
/// mail, and removing any of these would damage every message from the internet (or let a
/// stranger's field through as ours).
const RESERVED_FIELDS: [&str; 18] = [
    "From",
    "Sender",
    "Reply-To",
    "To",
    "Cc",
    "Bcc",
    "Message-ID",
    "In-Reply-To",
    "References",
    "Subject",
    "Date",
    "Received",
    "Return-Path",
    "MIME-Version",
    "DKIM-Signature",
    "Authentication-Results",
    "Received-SPF",
    "Comments",
];
/// Field name prefixes reserved for the same reason (MIME, ARC, resent and list fields).
const RESERVED_PREFIXES: [&str; 4] = ["Content-", "ARC-", "Resent-", "List-"];

const VERIFY: [(&str, Verify); 3] = [
    ("off", Verify::Off),
    ("record", Verify::Record),
    ("enforce", Verify::Enforce),
];

impl Compiler {
    pub(super) fn dns(&mut self, raw: RawDns) -> Dns {
        let mut nameservers = Vec::new();
        for (i, text) in raw.nameservers.unwrap_or_default().iter().enumerate() {
            match check_nameserver(text) {
                Ok(addr) => nameservers.push(addr),
                Err(e) => self.err(format!("dns.nameservers[{i}]"), e.to_string()),
            }
        }
        let mut timeout = self.duration("dns.timeout", raw.timeout, DEFAULT_DNS_TIMEOUT, false);
        if timeout > MAX_DNS_TIMEOUT {
            self.err(
                "dns.timeout",
                format!(
                    "must be at most {}s (a lookup must not outlast the SMTP command it serves)",
                    MAX_DNS_TIMEOUT.as_secs()
                ),
            );
            timeout = Duration::from_secs(5);
        }
        Dns {
            nameservers,
            timeout,
        }
    }

    pub(super) fn spf(&mut self, raw: super::super::raw::RawSpf) -> Spf {
        Spf {
            verify: self
                .choice("spf.verify", raw.verify, Verify::Off, &VERIFY)
                .unwrap_or(Verify::Off),
        }
    }

    pub(super) fn dkim(
        &mut self,
        raw: RawDkim,
        entries: Section<Vec<Option<RawDkimSign>>>,
    ) -> Dkim {
        let verify = self
            .choice(
                "dkim.verify",
                raw.verify,
                false,
                &[("off", false), ("record", true)],
            )
            .unwrap_or(false);
        let mut seen = HashSet::new();
        let mut sign = Vec::new();
        for (i, entry) in entries.or_default().into_iter().enumerate() {
            let Some(entry) = entry else { continue };
            if let Some(entry) = self.dkim_sign(&format!("dkim.sign[{i}]"), entry, &mut seen) {
                sign.push(entry);
            }
        }
        Dkim { verify, sign }
    }

    /// One `[[dkim.sign]]` entry at `at`; `None` when it has an error (reported).
    fn dkim_sign(
        &mut self,
        at: &str,
        raw: RawDkimSign,
        seen: &mut HashSet<(String, String)>,
    ) -> Option<DkimSign> {
        let before = self.errors.len();
        let domain = match raw.domain {
            Some(text) => check_domain(&text).unwrap_or_else(|e| {
                self.err(format!("{at}.domain"), e.to_string());
                String::new()
            }),
            None => {
                self.err(
                    format!("{at}.domain"),
                    "is required (the From: domain signed, e.g. \"example.com\")",
                );
                String::new()
            }
        };
        let selector = match raw.selector {
            Some(text) => check_selector(&text).unwrap_or_else(|e| {
                self.err(format!("{at}.selector"), e.to_string());
                String::new()
            }),
            None => {
                self.err(format!("{at}.selector"), "is required (e.g. \"s2026\")");
                String::new()
            }
        };
        if self.errors.len() == before && !seen.insert((domain.clone(), selector.clone())) {
            self.err(
                format!("{at}.selector"),
                format!(
                    "{selector}._domainkey.{domain} is used by another [[dkim.sign]] entry (a \
                     second signature needs its own selector)"
                ),
            );
        }
        let headers = self.dkim_headers(&format!("{at}.headers"), raw.headers);
        let key_path = self.path(&format!("{at}.key"), raw.key);
        let key = match &key_path {
            Some(path) => match SigningKey::load(path) {
                Ok(key) => Some(Arc::new(key)),
                Err(e) => {
                    self.err(format!("{at}.key"), e.to_string());
                    None
                }
            },
            None => {
                self.err(
                    format!("{at}.key"),
                    "is required (a PEM private key file, e.g. \"/etc/portcullis/dkim/s2026.pem\")",
                );
                None
            }
        };
        if self.errors.len() != before {
            return None;
        }
        Some(DkimSign {
            domain,
            selector,
            key_path: key_path?,
            key: key?,
            headers,
        })
    }

    /// `[[dkim.sign]] headers`: field names, `From` among them (RFC 6376 §5.4).
    fn dkim_headers(&mut self, key: &str, raw: Option<Vec<String>>) -> Vec<String> {
        let Some(names) = raw else {
            return DEFAULT_DKIM_HEADERS.map(String::from).to_vec();
        };
        let mut headers = Vec::new();
        for (i, name) in names.into_iter().enumerate() {
            match check_field_name(&name) {
                Ok(()) => headers.push(name),
                Err(e) => self.err(format!("{key}[{i}]"), e.to_string()),
            }
        }
        if !headers.iter().any(|h| h.eq_ignore_ascii_case("From")) {
            self.err(
                key,
                "must include \"From\" (RFC 6376 §5.4: the From: field is always signed)",
            );
        }
        headers
    }

    pub(super) fn dmarc(&mut self, raw: RawDmarc) -> Dmarc {
        let verify = self
            .choice("dmarc.verify", raw.verify, Verify::Off, &VERIFY)
            .unwrap_or(Verify::Off);
        let text = raw
            .quarantine_header
            .unwrap_or_else(|| DEFAULT_QUARANTINE_HEADER.to_owned());
        let quarantine_header = check_quarantine_header(&text).unwrap_or_else(|e| {
            self.err("dmarc.quarantine_header", e.to_string());
            default_quarantine_header()
        });
        let own_domains_reject = self
            .choice(
                "dmarc.own_domains",
                raw.own_domains,
                false,
                &[("reject", true)],
            )
            .unwrap_or(false);
        Dmarc {
            verify,
            quarantine_header,
            own_domains_reject,
        }
    }

    pub(super) fn dnsbl(
        &mut self,
        raw: RawDnsbl,
        zones: Section<Vec<Option<RawDnsblZone>>>,
    ) -> Dnsbl {
        let threshold = self.count("dnsbl.threshold", raw.threshold, 1, 1, u32::MAX.into());
        let exempt = self.nets("dnsbl.exempt", raw.exempt, &[]);
        let mut seen = HashSet::new();
        let mut compiled = Vec::new();
        for (i, zone) in zones.or_default().into_iter().enumerate() {
            let Some(zone) = zone else { continue };
            if let Some(zone) = self.dnsbl_zone(&format!("dnsbl.zones[{i}]"), zone, &mut seen) {
                compiled.push(zone);
            }
        }
        Dnsbl {
            threshold,
            exempt,
            zones: compiled,
        }
    }

    /// One `[[dnsbl.zones]]` entry at `at`; `None` when it has an error (reported).
    fn dnsbl_zone(
        &mut self,
        at: &str,
        raw: RawDnsblZone,
        seen: &mut HashSet<String>,
    ) -> Option<DnsblZone> {
        let before = self.errors.len();
        let zone = match raw.zone {
            Some(text) => match check_domain(&text) {
                Ok(zone) => {
                    if !seen.insert(zone.clone()) {
                        self.err(format!("{at}.zone"), format!("{zone} is listed twice"));
                    }
                    zone
                }
                Err(e) => {
                    self.err(format!("{at}.zone"), e.to_string());
                    String::new()
                }
            },
            None => {
                self.err(
                    format!("{at}.zone"),
                    "is required (the list's DNS zone, e.g. \"zen.spamhaus.org\")",
                );
                String::new()
            }
        };
        let name = match raw.name {
            Some(name) => {
                if let Err(e) = check_reply_text(&name) {
                    self.err(format!("{at}.name"), e.to_string());
                }
                name
            }
            None => zone.clone(),
        };
        let weight = self.count(&format!("{at}.weight"), raw.weight, 1, 1, u32::MAX.into());
        let answers = raw.answers.map(|texts| {
            if texts.is_empty() {
                self.err(
                    format!("{at}.answers"),
                    "is empty, so nothing would ever count as listed (leave it out for any \
                     address in 127.0.0.0/8)",
                );
            }
            let mut answers = Vec::new();
            for (j, text) in texts.iter().enumerate() {
                match check_dnsbl_answer(text) {
                    Ok(ip) => answers.push(IpAddr::V4(ip)),
                    Err(e) => self.err(format!("{at}.answers[{j}]"), e.to_string()),
                }
            }
            answers
        });
        (self.errors.len() == before).then_some(DnsblZone {
            zone,
            name,
            weight,
            answers,
        })
    }

    pub(super) fn doctor(&mut self, raw: RawDoctor) -> Doctor {
        let mut egress = Vec::new();
        for (i, text) in raw.egress.unwrap_or_default().iter().enumerate() {
            match text.trim().parse::<IpAddr>() {
                Ok(ip) => egress.push(ip),
                Err(_) => self.err(
                    format!("doctor.egress[{i}]"),
                    ValueError::IpAddress { text: text.clone() }.to_string(),
                ),
            }
        }
        Doctor { egress }
    }
}

/// A `[dns] nameservers` entry: `IP:PORT`, `[IPv6]:PORT`, a bare IP or `[IPv6]` (port 53).
pub(in crate::config) fn check_nameserver(text: &str) -> Result<SocketAddr, ValueError> {
    let bad = || ValueError::Nameserver {
        text: text.to_owned(),
    };
    let t = text.trim();
    let addr = if let Ok(addr) = t.parse::<SocketAddr>() {
        addr
    } else {
        let bare = t
            .strip_prefix('[')
            .and_then(|rest| rest.strip_suffix(']'))
            .unwrap_or(t);
        let ip = bare.parse::<IpAddr>().map_err(|_| bad())?;
        // "[192.0.2.1]" is no way to write an IPv4 address.
        if bare.len() != t.len() && ip.is_ipv4() {
            return Err(bad());
        }
        SocketAddr::new(ip, DNS_PORT)
    };
    if addr.port() == 0 {
        return Err(bad());
    }
    Ok(addr)
}

/// A header field name: printable ASCII but `:` (RFC 5322 §3.6.8 ftext), at least one.
pub(in crate::config) fn check_field_name(name: &str) -> Result<(), ValueError> {
    if !name.is_empty() && name.bytes().all(|b| b.is_ascii_graphic() && b != b':') {
        Ok(())
    } else {
        Err(ValueError::HeaderName {
            name: name.to_owned(),
        })
    }
}

/// A DKIM selector (RFC 6376 §3.1): dot-separated labels of letters, digits, hyphens (and
/// underscores, which DNS allows and some providers use), 1 to 63 octets each; lower-cased.
pub(in crate::config) fn check_selector(text: &str) -> Result<String, ValueError> {
    let ok = !text.is_empty()
        && text.len() <= 200
        && text.split('.').all(|label| {
            !label.is_empty()
                && label.len() <= 63
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        });
    if ok {
        Ok(text.to_ascii_lowercase())
    } else {
        Err(ValueError::Selector {
            text: text.to_owned(),
        })
    }
}

/// `quarantine_header`: one field `Name: value` we may add to a message and remove from
/// untrusted mail: a field name that is none of the standard fields, and a value of printable
/// ASCII and spaces (nothing that could end the line or the header section).
pub(in crate::config) fn check_quarantine_header(
    text: &str,
) -> Result<QuarantineHeader, ValueError> {
    let bad = |problem| ValueError::QuarantineHeader {
        text: text.to_owned(),
        problem,
    };
    let (name, value) = text.split_once(':').ok_or_else(|| bad("no colon"))?;
    if check_field_name(name).is_err() || name.contains('*') {
        return Err(bad(
            "the name must be printable ASCII without spaces, colons or *",
        ));
    }
    let reserved = RESERVED_FIELDS.iter().any(|f| f.eq_ignore_ascii_case(name))
        || RESERVED_PREFIXES.iter().any(|p| {
            name.get(..p.len())
                .is_some_and(|head| head.eq_ignore_ascii_case(p))
        });
    if reserved {
        return Err(bad(
            "a standard field; it would be removed from all mail from the internet",
        ));
    }
    let value = value.trim_matches(' ');
    if value.is_empty() {
        return Err(bad("the value is empty"));
    }
    if !value.bytes().all(|b| b.is_ascii_graphic() || b == b' ') {
        return Err(bad("the value must be printable ASCII and spaces"));
    }
    if text.len() > MAX_QUARANTINE_HEADER {
        return Err(bad("longer than 200 characters"));
    }
    Ok(QuarantineHeader {
        name: name.to_owned(),
        value: value.to_owned(),
    })
}

/// A DNSBL zone's public `name`, put in SMTP replies: printable ASCII and spaces, not empty.
pub(in crate::config) fn check_reply_text(text: &str) -> Result<(), ValueError> {
    let ok = !text.trim().is_empty()
        && text.len() <= MAX_REPLY_NAME
        && text.bytes().all(|b| b.is_ascii_graphic() || b == b' ');
    if ok {
        Ok(())
    } else {
        Err(ValueError::ReplyText {
            text: text.to_owned(),
        })
    }
}

/// A DNSBL `answers` entry: an IPv4 address in 127.0.0.0/8 (RFC 5782 §2.1), but not in
/// 127.255.255.0/24, which lists answer to say they refuse our queries.
pub(in crate::config) fn check_dnsbl_answer(text: &str) -> Result<Ipv4Addr, ValueError> {
    let bad = || ValueError::DnsblAnswer {
        text: text.to_owned(),
    };
    let ip = text.trim().parse::<Ipv4Addr>().map_err(|_| bad())?;
    let [a, b, c, _] = ip.octets();
    if a != 127 {
        return Err(bad());
    }
    if (b, c) == (255, 255) {
        return Err(ValueError::DnsblRefusalAnswer {
            text: text.to_owned(),
        });
    }
    Ok(ip)
}
