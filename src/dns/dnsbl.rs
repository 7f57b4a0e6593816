//! DNSBL lookups (RFC 5782): the client's address reversed (by octet for IPv4, by nibble for
//! IPv6) under each zone, all zones queried at once. Only answers the zone's `answers` accept
//! count; an error, a timeout or another answer counts as not listed (and is logged; a
//! `127.255.255.x` answer as a warning, since lists answer so when they refuse our queries).

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use futures_util::future::join_all;

use super::Resolver;
use crate::config::DnsblZone;

/// One zone that lists the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The zone's public `name`.
    pub name: String,
    /// The zone's `weight`, added towards `[dnsbl] threshold`.
    pub weight: u32,
    /// The A record that counted.
    pub answer: IpAddr,
}

/// What the DNSBL lookups found.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct DnsblCheck {
    /// The zones listing the client, in configuration order.
    pub listed: Vec<Listing>,
    /// The sum of their weights.
    pub score: u32,
    /// Zones whose lookup failed (SERVFAIL, refused, no answer) or timed out, counted as
    /// not listing the client; "no such name" is an answer, not a failure. For
    /// `portcullis_dns_errors_total{check="dnsbl"}`.
    pub errors: u32,
}

/// What one zone's lookup found.
enum ZoneAnswer {
    Listed(Listing),
    NotListed,
    Failed,
}

/// The name queried for `ip` under `zone` (RFC 5782 §2.1, §2.4): IPv4 octets in reverse
/// order (`9.0.0.127.zone`), IPv6 as 32 reversed lower-case nibbles; an IPv4-mapped IPv6
/// address (`::ffff:a.b.c.d`) is the IPv4 client it stands for. No trailing dot.
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let ip = match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    };
    let mut name = String::with_capacity(64 + 1 + zone.len());
    match ip {
        IpAddr::V4(v4) => {
            let [a, b, c, d] = v4.octets();
            let _ = write!(name, "{d}.{c}.{b}.{a}.");
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0x0f, byte >> 4);
            }
        }
    }
    name.push_str(zone);
    name
}

/// What one A record in a zone's answer means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Answer {
    /// The zone lists the client.
    Listed,
    /// `127.255.255.0/24` (RFC 5782 §2.1 leaves it to lists; the big ones answer so when they
    /// refuse our queries, e.g. through a public resolver): not listed, worth a warning.
    Refused,
    /// Any other answer: not listed.
    Other,
}

/// How `answer` counts for a zone whose `answers` are `accepted` (`None`: any address in
/// 127.0.0.0/8 except 127.255.255.0/24).
pub fn classify(answer: Ipv4Addr, accepted: Option<&[IpAddr]>) -> Answer {
    let refusal = answer.octets()[..3] == [127, 255, 255];
    let listed = match accepted {
        Some(list) => list.contains(&IpAddr::V4(answer)),
        None => answer.octets()[0] == 127 && !refusal,
    };
    if listed {
        Answer::Listed
    } else if refusal {
        Answer::Refused
    } else {
        Answer::Other
    }
}

impl Resolver {
    /// Look `ip` up in every zone at once, each lookup bounded by [`Resolver::timeout`];
    /// answers are cached within their TTL (the resolver's A cache). Never fails: a zone that
    /// errs or times out does not list the client.
    pub async fn dnsbl(&self, ip: IpAddr, zones: &[DnsblZone]) -> DnsblCheck {
        let lookups = zones.iter().map(|zone| self.zone_lookup(ip, zone));
        let mut check = DnsblCheck::default();
        for answer in join_all(lookups).await {
            match answer {
                ZoneAnswer::Listed(listing) => {
                    check.score = check.score.saturating_add(listing.weight);
                    check.listed.push(listing);
                }
                ZoneAnswer::NotListed => {}
                ZoneAnswer::Failed => check.errors += 1,
            }
        }
        check
    }

    async fn zone_lookup(&self, ip: IpAddr, zone: &DnsblZone) -> ZoneAnswer {
        let name = query_name(ip, &zone.zone);
        let lookup = self
            .authenticator()
            .ipv4_lookup(name.as_str(), Some(&self.caches().ipv4));
        let answers = match tokio::time::timeout(self.timeout(), lookup).await {
            Ok(Ok(records)) => records.rrset,
            Ok(Err(mail_auth::Error::Dns(mail_auth::DnsError::RecordNotFound(_)))) => {
                tracing::debug!(zone = %zone.name, %ip, "dnsbl: not listed");
                return ZoneAnswer::NotListed;
            }
            Ok(Err(error)) => {
                tracing::info!(zone = %zone.name, %ip, %error, "dnsbl: lookup failed, counted as not listed");
                return ZoneAnswer::Failed;
            }
            Err(_) => {
                tracing::info!(zone = %zone.name, %ip, timeout = ?self.timeout(), "dnsbl: lookup timed out, counted as not listed");
                return ZoneAnswer::Failed;
            }
        };
        let mut listing = None;
        for answer in answers.iter().copied() {
            match classify(answer, zone.answers.as_deref()) {
                Answer::Listed => {
                    listing.get_or_insert(Listing {
                        name: zone.name.clone(),
                        weight: zone.weight,
                        answer: IpAddr::V4(answer),
                    });
                }
                Answer::Refused => {
                    tracing::warn!(zone = %zone.name, %answer, "dnsbl: the list refuses our queries (answer in 127.255.255.0/24); counted as not listed");
                }
                Answer::Other => {
                    tracing::info!(zone = %zone.name, %ip, %answer, "dnsbl: answer not in the zone's answers, counted as not listed");
                }
            }
        }
        listing.map_or(ZoneAnswer::NotListed, ZoneAnswer::Listed)
    }
}

#[cfg(test)]
mod tests;
