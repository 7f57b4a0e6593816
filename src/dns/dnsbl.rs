//! DNSBL lookups (RFC 5782): the client's address reversed (by octet for IPv4, by nibble for
//! IPv6) under each zone, all zones queried at once. Only answers the zone's `answers` accept
//! count; an error, a timeout or another answer counts as not listed (and is logged; a
//! `127.255.255.x` answer as a warning, since lists answer so when they refuse our queries).

use std::net::IpAddr;

use super::Resolver;
use crate::config::DnsblZone;

/// One zone that lists the client.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listing {
    /// The zone's public `name`.
    pub name: String,
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
}

/// The name queried for `ip` under `zone` (RFC 5782 §2.1, §2.4).
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let _ = (ip, zone);
    todo!()
}

impl Resolver {
    /// Look `ip` up in every zone at once.
    pub async fn dnsbl(&self, ip: IpAddr, zones: &[DnsblZone]) -> DnsblCheck {
        let _ = (ip, zones);
        todo!()
    }
}
