//! Pure policy decisions compiled from the configuration, named after the SMTP stage they act
//! on: [`Policy::connect`], [`Policy::rcpt`]. Nothing here touches a socket or a clock; the
//! driver asks, carries out the verdict and logs the rule that fired.
//!
//! A verdict that refuses carries the reply for the client (which never names the rule) and
//! the rule name for the log.

pub mod access;
pub mod credentials;

use std::collections::HashSet;
use std::net::IpAddr;
use std::sync::Arc;

use ipnet::IpNet;

use crate::config::{Config, Listener};
use crate::envelope::Address;
use crate::smtp::Reply;
use crate::smtp::headers::{NamePattern, StripRules};
use crate::smtp::reply;
use access::{contains, normalize};

/// A refusal: what the client is told and which rule fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    pub rule: &'static str,
}

impl Refusal {
    fn new(reply: Reply, rule: &'static str) -> Refusal {
        Refusal { reply, rule }
    }
}

/// Facts about the session a decision may depend on.
#[derive(Debug, Clone, Copy)]
pub struct SessionFacts<'a> {
    pub client_ip: IpAddr,
    pub user: Option<&'a str>,
}

/// The compiled policy of one configuration snapshot.
#[derive(Debug, Clone)]
pub struct Policy {
    accepted_domains: Vec<String>,
    relay_networks: Vec<IpNet>,
    /// Lower-case addresses and `@domain` entries of `recipients_file`.
    recipients: Option<HashSet<String>>,
    /// The header firewall for mail from strangers.
    untrusted_headers: Arc<StripRules>,
    /// Nothing is stripped from trusted mail.
    trusted_headers: Arc<StripRules>,
}

impl Policy {
    pub fn new(config: &Config) -> Policy {
        Policy {
            accepted_domains: config.relay.accepted_domains.clone(),
            relay_networks: config.relay.relay_networks.clone(),
            recipients: config
                .relay
                .recipients
                .as_ref()
                .map(|list| list.iter().cloned().collect()),
            untrusted_headers: Arc::new(StripRules {
                names: config
                    .headers
                    .strip_untrusted
                    .iter()
                    .map(|p| NamePattern::new(p))
                    .collect(),
                auth_results_for: Some(config.server.hostname.to_ascii_lowercase()),
            }),
            trusted_headers: Arc::new(StripRules::default()),
        }
    }

    /// Data stage: which headers to remove before queuing. Mail from an authenticated user or a
    /// relay network is trusted as it is; from anyone else, the `[headers] strip_untrusted`
    /// names and any `Authentication-Results` claiming our hostname are removed, so nobody on
    /// the internet can set an Exchange spam score or internal-auth header.
    pub fn header_rules(&self, facts: &SessionFacts<'_>) -> Arc<StripRules> {
        if facts.user.is_some() || self.is_relay_client(facts.client_ip) {
            self.trusted_headers.clone()
        } else {
            self.untrusted_headers.clone()
        }
    }

    /// Connect stage: the listener's deny list first, then its allow list.
    pub fn connect(&self, listener: &Listener, ip: IpAddr) -> Result<(), Refusal> {
        let ip = normalize(ip);
        if contains(&listener.deny, ip) {
            return Err(Refusal::new(reply::ACCESS_DENIED, "listener_deny"));
        }
        if !contains(&listener.allow, ip) {
            return Err(Refusal::new(reply::ACCESS_DENIED, "listener_allow"));
        }
        Ok(())
    }

    /// True when the client may relay to any domain without authenticating.
    pub fn is_relay_client(&self, ip: IpAddr) -> bool {
        contains(&self.relay_networks, normalize(ip))
    }

    /// True when mail for `domain` (lower case) is accepted from anyone allowed to connect.
    pub fn is_accepted_domain(&self, domain: &str) -> bool {
        self.accepted_domains.iter().any(|d| d == domain)
    }

    /// RCPT stage: recipients in accepted domains are taken from anyone (and checked against
    /// the recipient list when one is configured); other domains need AUTH or a relay network.
    pub fn rcpt(&self, facts: &SessionFacts<'_>, to: &Address) -> Result<(), Refusal> {
        let domain = to.domain_lower();
        if self.is_accepted_domain(&domain) {
            if routed(to) {
                return Err(Refusal::new(reply::RELAY_DENIED, "routed_address"));
            }
            if let Some(known) = &self.recipients {
                let wildcard = format!("@{domain}");
                let full = format!("{}{wildcard}", to.local().to_lowercase());
                if !known.contains(&full) && !known.contains(&wildcard) {
                    return Err(Refusal::new(reply::UNKNOWN_USER, "recipients_file"));
                }
            }
            return Ok(());
        }
        if facts.user.is_some() || self.is_relay_client(facts.client_ip) {
            return Ok(());
        }
        Err(Refusal::new(reply::RELAY_DENIED, "relay_denied"))
    }
}

/// Addresses that route mail onward from the named domain (percent hack `u%other@ours`,
/// bang paths `other!u@ours`, IP literals): accepting them for an accepted domain would let
/// the next hop relay for strangers.
fn routed(to: &Address) -> bool {
    to.local().contains(['%', '!', '@']) || to.is_ip_literal()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn policy(relay: &str) -> (Config, Policy) {
        let text = format!(
            "[server]\nhostname = \"relay.test\"\n[[listeners]]\nbind = \"127.0.0.1:2525\"\n\
             tls = \"none\"\ndeny = [\"192.0.2.66/32\"]\nallow = [\"192.0.2.0/24\", \"2001:db8::/32\"]\n\
             [relay]\n{relay}\n[[upstreams]]\naddress = \"127.0.0.1:25\"\n"
        );
        let config = Config::from_toml(&text, None).expect("valid test policy");
        let policy = Policy::new(&config);
        (config, policy)
    }

    fn facts(ip: &str, user: Option<&'static str>) -> SessionFacts<'static> {
        SessionFacts {
            client_ip: ip.parse().unwrap(),
            user,
        }
    }

    #[test]
    fn connect_checks_deny_before_allow_and_maps_ipv4_in_ipv6() {
        let (config, p) = policy("");
        let l = &config.listeners[0];
        let rule = |ip: &str| p.connect(l, ip.parse().unwrap()).err().map(|r| r.rule);
        assert_eq!(rule("192.0.2.1"), None);
        assert_eq!(rule("::ffff:192.0.2.1"), None);
        assert_eq!(rule("2001:db8::1"), None);
        assert_eq!(rule("192.0.2.66"), Some("listener_deny"));
        assert_eq!(rule("::ffff:192.0.2.66"), Some("listener_deny"));
        assert_eq!(rule("198.51.100.1"), Some("listener_allow"));
    }

    #[test]
    fn relay_table() {
        let (_, p) =
            policy("accepted_domains = [\"example.com\"]\nrelay_networks = [\"10.0.0.0/8\"]");
        let cases: &[(&str, Option<&'static str>, &str, Option<&str>)] = &[
            ("192.0.2.1", None, "u@example.com", None),
            ("192.0.2.1", None, "u@EXAMPLE.com.", None),
            ("192.0.2.1", None, "u@other.test", Some("relay_denied")),
            ("192.0.2.1", Some("alice"), "u@other.test", None),
            ("10.1.2.3", None, "u@other.test", None),
            ("::ffff:10.1.2.3", None, "u@other.test", None),
            (
                "192.0.2.1",
                None,
                "u%other.test@example.com",
                Some("routed_address"),
            ),
            (
                "192.0.2.1",
                None,
                "other.test!u@example.com",
                Some("routed_address"),
            ),
        ];
        for (ip, user, to, expected) in cases {
            let to = Address::parse(to).unwrap();
            let got = p.rcpt(&facts(ip, *user), &to).err().map(|r| r.rule);
            assert_eq!(got, *expected, "{ip} {user:?} {to}");
        }
    }

    #[test]
    fn recipients_file_refuses_unknown_users_of_accepted_domains_only() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("recipients.txt");
        std::fs::write(&file, "Alice@example.com\n@sales.example.com\n").unwrap();
        let (_, p) = policy(&format!(
            "accepted_domains = [\"example.com\", \"sales.example.com\"]\nrecipients_file = {:?}",
            file.display().to_string()
        ));
        let rule = |to: &str, user| {
            p.rcpt(&facts("192.0.2.1", user), &Address::parse(to).unwrap())
                .err()
                .map(|r| (r.rule, r.reply.code))
        };
        assert_eq!(rule("alice@example.com", None), None);
        assert_eq!(rule("ALICE@Example.COM", None), None);
        assert_eq!(rule("anyone@sales.example.com", None), None);
        assert_eq!(
            rule("bob@example.com", None),
            Some(("recipients_file", 550))
        );
        // Mail relayed by an authenticated user to other domains is not checked against it.
        assert_eq!(rule("bob@other.test", Some("alice")), None);
    }
}
