//! CIDR matching for allow/deny lists and relay networks.

use std::net::IpAddr;

use ipnet::IpNet;

/// IPv4-mapped IPv6 addresses (`::ffff:192.0.2.1`, what a dual-stack socket reports for an
/// IPv4 client) are treated as the IPv4 address they carry.
pub fn normalize(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map(IpAddr::V4).unwrap_or(ip),
        v4 => v4,
    }
}

/// True when `ip` (already normalised) is in any of `nets`.
pub fn contains(nets: &[IpNet], ip: IpAddr) -> bool {
    nets.iter().any(|n| n.contains(&ip))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapped_addresses_match_ipv4_networks() {
        let nets: Vec<IpNet> = vec!["127.0.0.0/8".parse().unwrap()];
        let mapped: IpAddr = "::ffff:127.0.0.2".parse().unwrap();
        assert!(contains(&nets, normalize(mapped)));
        assert!(!contains(&nets, normalize("::1".parse().unwrap())));
        assert!(!contains(&nets, normalize("10.0.0.1".parse().unwrap())));
    }
}
