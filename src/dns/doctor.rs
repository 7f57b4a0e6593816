//! `portcullis doctor DOMAIN`: a pre-flight of our own outbound mail's published records.
//!
//! Through the relay's own [`Resolver`] it checks what receivers will check of mail we send
//! for DOMAIN: SPF (RFC 7208) authorises each `[doctor] egress` address, each `[[dkim.sign]]`
//! key of DOMAIN is the one published at its selector (RFC 6376 §3.6.2), the DMARC record
//! (RFC 7489 §6.3) parses and what it asks for, and each egress address has a
//! forward-confirmed PTR record (FCrDNS, RFC 8601 §3 iprev). Each finding says what to
//! publish to fix it. Nothing here changes anything; a lookup error is a finding too.

use std::net::IpAddr;

use mail_auth::DnsError;
use mail_auth::common::crypto::SigningKey as _;
use mail_auth::common::verify::DomainKey;
use mail_auth::dmarc::{Dmarc, Policy};
use mail_auth::spf::Spf;
use serde::Serialize;

use super::Resolver;
use super::verify::SpfResult;
use crate::config::Config;
use crate::queue::report::clean;

/// How a finding stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Status {
    /// As it should be.
    Ok,
    /// Works, but weaker than it should be, or could not be checked.
    Warn,
    /// Receivers will judge our mail badly.
    Fail,
}

impl Status {
    fn as_str(self) -> &'static str {
        match self {
            Status::Ok => "ok",
            Status::Warn => "warn",
            Status::Fail => "fail",
        }
    }
}

/// One finding.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Finding {
    /// ok, warn or fail.
    pub status: Status,
    /// `spf`, `dkim`, `dmarc` or `fcrdns`.
    pub check: &'static str,
    /// What was found.
    pub found: String,
    /// What to publish or configure to fix it (none when `status` is ok).
    pub fix: Option<String>,
}

/// Every finding for one domain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Report {
    /// The domain checked (as given, lower-cased).
    pub domain: String,
    /// SPF findings first, then DKIM (one per `[[dkim.sign]]` entry), DMARC, FCrDNS (one
    /// per egress address).
    pub findings: Vec<Finding>,
}

impl Report {
    /// One line per finding: `STATUS CHECK: FOUND` and, when there is one, `; fix: FIX`.
    pub fn text(&self) -> String {
        let mut out = String::new();
        for f in &self.findings {
            out.push_str(f.status.as_str());
            out.push(' ');
            out.push_str(f.check);
            out.push_str(": ");
            // Findings quote DNS data: no control or invisible character reaches the terminal.
            out.push_str(&clean(&f.found));
            if let Some(fix) = &f.fix {
                out.push_str("; fix: ");
                out.push_str(&clean(fix));
            }
            out.push('\n');
        }
        out
    }
}

fn finding(status: Status, check: &'static str, found: String, fix: Option<String>) -> Finding {
    Finding {
        status,
        check,
        found,
        fix,
    }
}

/// A lookup that found nothing usable. No record, or one that does not parse: `Fail`, with
/// `absent` as what was found and `fix` (publish). A DNS error (a timeout, SERVFAIL): `Warn`,
/// nothing is known, so no fix is suggested (publishing would replace what may be there).
fn lookup_failed(
    error: &mail_auth::Error,
    check: &'static str,
    name: &str,
    absent: String,
    fix: Option<String>,
) -> Finding {
    match error {
        mail_auth::Error::Dns(DnsError::Resolver(_)) => finding(
            Status::Warn,
            check,
            format!("could not look up {name} ({error}): what it publishes is unknown"),
            None,
        ),
        _ => finding(Status::Fail, check, absent, fix),
    }
}

/// The SPF mechanism that authorises `ip`.
fn spf_mechanism(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => format!("ip4:{v4}"),
        IpAddr::V6(v6) => format!("ip6:{v6}"),
    }
}

/// Run every check of `domain` (a domain name; compared as given, lower-cased) with
/// `config`'s `[doctor] egress`, `[[dkim.sign]]` and `server.hostname`.
pub async fn run(resolver: &Resolver, config: &Config, domain: &str) -> Report {
    let domain = domain.trim_end_matches('.').to_ascii_lowercase();
    let mut findings = Vec::new();
    findings.extend(spf(resolver, config, &domain).await);
    findings.extend(dkim(resolver, config, &domain).await);
    findings.push(dmarc(resolver, &domain).await);
    findings.extend(fcrdns(resolver, &config.doctor.egress).await);
    Report { domain, findings }
}

async fn spf(resolver: &Resolver, config: &Config, domain: &str) -> Vec<Finding> {
    let egress = &config.doctor.egress;
    let mechanisms: Vec<String> = egress.iter().copied().map(spf_mechanism).collect();
    let suggested = format!("publish TXT at {domain}: \"v=spf1 {} -all\"", {
        if mechanisms.is_empty() {
            "ip4:OUR-ADDRESS".to_string()
        } else {
            mechanisms.join(" ")
        }
    });
    let record = resolver
        .authenticator()
        .txt_lookup::<Spf>(domain, Some(&resolver.caches().txt))
        .await;
    let mut findings = vec![match record {
        Ok(_) => finding(
            Status::Ok,
            "spf",
            format!("the SPF record at {domain} parses"),
            None,
        ),
        Err(e) => lookup_failed(
            &e,
            "spf",
            domain,
            format!("no valid SPF record at {domain} ({e})"),
            Some(suggested),
        ),
    }];
    if egress.is_empty() {
        findings.push(finding(
            Status::Warn,
            "spf",
            "no [doctor] egress addresses configured: which addresses SPF must authorise is unknown".into(),
            Some("list our outbound addresses in [doctor] egress".into()),
        ));
    }
    let hostname = config.server.hostname.as_str();
    let sender = format!("postmaster@{domain}");
    for &ip in egress {
        // The relay's own check, so the doctor judges as the relay does (several SPF
        // records, void lookups, the deadline).
        let check = resolver.spf(ip, hostname, Some(&sender)).await;
        findings.push(match check.result {
            SpfResult::Pass => finding(
                Status::Ok,
                "spf",
                format!("{ip} is authorised for {domain} (pass)"),
                None,
            ),
            SpfResult::TempError => finding(
                Status::Warn,
                "spf",
                format!("{ip} could not be checked for {domain} (temperror)"),
                None,
            ),
            other => finding(
                Status::Fail,
                "spf",
                format!("{ip} is not authorised for {domain} ({other:?})"),
                Some(format!(
                    "add {} to the SPF record at {domain}",
                    spf_mechanism(ip)
                )),
            ),
        });
    }
    findings
}

/// A probe signed with our key and verified with the published one: the keys match exactly
/// when it verifies, whichever encoding `p=` uses (SubjectPublicKeyInfo or bare RSAPublicKey).
const PROBE: &[u8] = b"portcullis doctor: does the published key match ours?";

async fn dkim(resolver: &Resolver, config: &Config, domain: &str) -> Vec<Finding> {
    let entries: Vec<_> = config
        .dkim
        .sign
        .iter()
        .filter(|e| e.domain == domain)
        .collect();
    if entries.is_empty() {
        return vec![finding(
            Status::Warn,
            "dkim",
            format!("no [[dkim.sign]] entry for {domain}: its mail is not signed"),
            Some(format!(
                "add a [[dkim.sign]] entry with domain = \"{domain}\""
            )),
        )];
    }
    let mut findings = Vec::new();
    for entry in entries {
        let name = format!("{}._domainkey.{domain}", entry.selector);
        let publish = Some(format!(
            "publish TXT at {name}: \"{}\"",
            entry.key.dns_record()
        ));
        let record = resolver
            .authenticator()
            .txt_lookup::<DomainKey>(name.as_str(), Some(&resolver.caches().txt))
            .await;
        findings.push(match record {
            Ok(published) => {
                let key = entry.key.dkim_key();
                let matches = key
                    .sign(PROBE)
                    .and_then(|sig| published.p.verify_bytes(PROBE, &sig, key.algorithm()))
                    .is_ok();
                if matches {
                    finding(
                        Status::Ok,
                        "dkim",
                        format!("{name} publishes the key of {}", entry.key_path.display()),
                        None,
                    )
                } else {
                    finding(
                        Status::Fail,
                        "dkim",
                        format!(
                            "{name} publishes another key than {}",
                            entry.key_path.display()
                        ),
                        publish,
                    )
                }
            }
            Err(e) => lookup_failed(
                &e,
                "dkim",
                &name,
                format!("no valid DKIM key record at {name} ({e})"),
                publish,
            ),
        });
    }
    findings
}

fn policy_name(policy: Policy) -> &'static str {
    match policy {
        Policy::None | Policy::Unspecified => "none",
        Policy::Quarantine => "quarantine",
        Policy::Reject => "reject",
    }
}

async fn dmarc(resolver: &Resolver, domain: &str) -> Finding {
    let name = format!("_dmarc.{domain}");
    let suggested = Some(format!(
        "publish TXT at {name}: \"v=DMARC1; p=quarantine; rua=mailto:postmaster@{domain}\""
    ));
    let record = resolver
        .authenticator()
        .txt_lookup::<Dmarc>(name.as_str(), Some(&resolver.caches().txt))
        .await;
    let dmarc = match record {
        Ok(dmarc) => dmarc,
        Err(e) => {
            return lookup_failed(
                &e,
                "dmarc",
                &name,
                format!("no valid DMARC record at {name} ({e})"),
                suggested,
            );
        }
    };
    // mail-auth keeps the address of a `mailto:` URI only.
    let rua: Vec<String> = dmarc
        .rua
        .iter()
        .map(|u| format!("mailto:{}", u.uri()))
        .collect();
    let found = format!(
        "{name}: p={} sp={} np={}{} rua={}",
        policy_name(dmarc.p),
        policy_name(dmarc.sp),
        policy_name(dmarc.np),
        if dmarc.t {
            " t=y (testing: one step lower)"
        } else {
            ""
        },
        if rua.is_empty() {
            "none".into()
        } else {
            rua.join(",")
        },
    );
    if rua.is_empty() {
        finding(
            Status::Warn,
            "dmarc",
            found,
            Some(format!(
                "add rua=mailto:postmaster@{domain} to {name} to receive aggregate reports"
            )),
        )
    } else {
        finding(Status::Ok, "dmarc", found, None)
    }
}

async fn fcrdns(resolver: &Resolver, egress: &[IpAddr]) -> Vec<Finding> {
    let mut findings = Vec::new();
    for &ip in egress {
        findings.push(fcrdns_one(resolver, ip).await);
    }
    findings
}

async fn fcrdns_one(resolver: &Resolver, ip: IpAddr) -> Finding {
    let auth = resolver.authenticator();
    let caches = resolver.caches();
    let fix = Some(format!(
        "ask the owner of {ip} (the hosting or network provider) for a PTR record naming a host \
         whose {} record is {ip}",
        if ip.is_ipv4() { "A" } else { "AAAA" }
    ));
    let names = match auth.ptr_lookup(ip, Some(&caches.ptr)).await {
        Ok(names) if !names.rrset.is_empty() => names.rrset,
        Ok(_) => {
            return finding(
                Status::Fail,
                "fcrdns",
                format!("{ip} has no PTR record"),
                fix,
            );
        }
        Err(e) => {
            return lookup_failed(
                &e,
                "fcrdns",
                &ip.to_string(),
                format!("{ip} has no PTR record ({e})"),
                fix,
            );
        }
    };
    let shown: Vec<&str> = names.iter().map(|n| n.trim_end_matches('.')).collect();
    let forward_type = if ip.is_ipv4() { "A" } else { "AAAA" };
    // A forward lookup that failed leaves the name unconfirmed, not refuted.
    let mut failed = None;
    for (name, shown_name) in names.iter().zip(&shown) {
        let forward: Result<Vec<IpAddr>, _> = match ip {
            IpAddr::V4(_) => auth
                .ipv4_lookup(name.as_ref(), Some(&caches.ipv4))
                .await
                .map(|r| r.rrset.iter().copied().map(IpAddr::V4).collect()),
            IpAddr::V6(_) => auth
                .ipv6_lookup(name.as_ref(), Some(&caches.ipv6))
                .await
                .map(|r| r.rrset.iter().copied().map(IpAddr::V6).collect()),
        };
        match forward {
            Ok(addresses) if addresses.contains(&ip) => {
                return finding(
                    Status::Ok,
                    "fcrdns",
                    format!("{ip} -> {shown_name} -> {ip}"),
                    None,
                );
            }
            Ok(_) => {}
            Err(e) => {
                failed.get_or_insert((*shown_name, e));
            }
        }
    }
    let found = format!("{ip} -> {} does not resolve back to {ip}", shown.join(", "));
    let fix = Some(format!(
        "publish {forward_type} {ip} at {}",
        shown.first().copied().unwrap_or_default()
    ));
    match failed {
        Some((name, e)) => lookup_failed(&e, "fcrdns", name, found, fix),
        None => finding(Status::Fail, "fcrdns", found, fix),
    }
}

#[cfg(test)]
mod tests;
