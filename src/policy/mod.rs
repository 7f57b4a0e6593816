//! Pure policy decisions compiled from the configuration, named after the SMTP stage they act
//! on. Every stage is evaluated the same way ([`stage`]): [`Policy::evaluate`] runs the
//! stage's checks in the order [`stage::Stage::checks`] declares, and answers with one
//! [`stage::Verdict`]: accept, refuse (a reply and a rule), or an effect the driver carries
//! out (a rate budget, the AUTH lockout gate, a password verification, a spool reservation,
//! a DNS lookup, the message's verification or signing) before evaluation goes on. Which
//! mail SPF, DKIM, DMARC, DNSBL and signing apply to, and what their results mean, is
//! [`mailauth`]. The DATA-start decisions, which refuse nothing, are
//! [`Policy::data_start`]. Nothing here touches a socket or reads a clock; the driver asks,
//! carries out the verdict and logs the rule that fired.
//!
//! A verdict that refuses carries the reply for the client (which never names the rule) and
//! the rule name for the log.
//!
//! Where a new check goes: a pure check is a [`stage::Check`] variant placed in its stage's
//! list; one that needs I/O or shared state adds an [`stage::Effect`] (and its answer) that
//! the driver's effect runner carries out. Rate budgets and AUTH failure records live in the
//! [`store::Store`], carried from one `Policy` to the next on reload when their settings did
//! not change, so a SIGHUP neither hands out fresh budgets nor lifts lockouts.

pub mod access;
pub mod capability;
pub mod containment;
pub mod credentials;
pub mod limits;
pub mod lockout;
pub mod mailauth;
pub mod pattern;
pub mod prefix;
pub mod senders;
pub mod stage;
pub mod store;

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use ipnet::IpNet;

use crate::config::{BareLf, Config, Listener};
use crate::envelope::{Address, ReversePath};
use crate::smtp::Reply;
use crate::smtp::headers::{NamePattern, StripRules};
use crate::smtp::reply;
use access::{contains, normalize};
use pattern::AddressPattern;
use senders::{FromCheck, Senders};
use store::Store;

/// A refusal: what the client is told and which rule fired.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Refusal {
    pub reply: Reply,
    /// The `rule=` of the log line; never shown to the client (DESIGN.md invariant 3).
    pub rule: &'static str,
    /// What else the log line says.
    pub detail: Option<Detail>,
    /// Logged as a warning: the refusal may mean an attack or a local problem.
    pub warning: bool,
}

impl Refusal {
    /// A refusal with `reply`, logged as `rule`.
    pub fn new(reply: Reply, rule: &'static str) -> Refusal {
        Refusal {
            reply,
            rule,
            detail: None,
            warning: false,
        }
    }

    /// The same, with `detail` in the log line.
    pub fn with_detail(self, detail: Detail) -> Refusal {
        Refusal {
            detail: Some(detail),
            ..self
        }
    }

    /// The same, logged as a warning.
    pub fn warning(self) -> Refusal {
        Refusal {
            warning: true,
            ..self
        }
    }
}

/// What a refusal's log line says besides its rule and reply, each under its own field name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Detail {
    /// `limit=`: the rate limit exceeded, as the policy file writes it (`120/min`).
    Limit(String),
    /// `login=`: the SASL authentication identity, cut to
    /// [`lockout::MAX_LOGIN_KEY`] octets.
    Login(String),
    /// `from_header=`: the `From:` address that is not owned.
    FromHeader(String),
    /// `dnsbl=`: the lists that list the client, with their answers and the score.
    Dnsbl(String),
    /// `detail=`: anything else (free-space numbers, an I/O error, a field name).
    Text(String),
}

/// What the DATA stage applies to the message while it is received (nothing here refuses).
#[derive(Debug)]
pub struct DataRules {
    /// A bare LF is stored as CRLF (true) or refused (`bare_lf`).
    pub normalize_bare_lf: bool,
    /// The headers to remove before queuing.
    pub header_rules: Arc<StripRules>,
    /// The `From:` check of an authenticated message, fed by the header reader.
    pub from_check: Option<FromCheck>,
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
    /// The entries of `recipients_file`.
    recipients: Option<KnownRecipients>,
    /// The header firewall for mail from strangers.
    untrusted_headers: Arc<StripRules>,
    /// Nothing is stripped from trusted mail.
    trusted_headers: Arc<StripRules>,
    /// The addresses each user (by login) may send as.
    senders: HashMap<String, Arc<Senders>>,
    /// `[auth] check_display_name`.
    check_display_name: bool,
    /// Rate budgets and AUTH failure records (shared with the next policy where unchanged).
    store: Store,
    /// `[limits] max_message_size`: the space a MAIL without SIZE reserves.
    max_message_size: u64,
    /// `[limits] hop_limit`.
    hop_limit: usize,
    /// Each user's argon2 PHC string, by login.
    password_hashes: HashMap<String, Arc<str>>,
    /// What unknown logins are verified against ([`credentials::dummy_hash`]).
    dummy_hash: Arc<str>,
    /// SPF, DKIM, DMARC, DNSBL and signing ([`mailauth`]).
    mail_auth: mailauth::MailAuth,
    /// `[containment]`: its triggers.
    containment: crate::config::Containment,
}

impl Policy {
    /// Compile `config`. The stateful tables of `previous` (the policy being replaced on
    /// reload) are kept where their settings are unchanged; `now` anchors new tables' clocks.
    pub fn new(config: &Config, previous: Option<&Policy>, now: Instant) -> Policy {
        let mail_auth = mailauth::MailAuth::new(config);
        Policy {
            containment: config.containment,
            store: Store::new(config, previous.map(|p| &p.store), now),
            max_message_size: config.limits.max_message_size,
            hop_limit: usize::try_from(config.limits.hop_limit).unwrap_or(usize::MAX),
            senders: config
                .auth
                .iter()
                .flat_map(|a| &a.users)
                .map(|u| (u.name.clone(), Arc::new(Senders::new(&u.name, &u.senders))))
                .collect(),
            check_display_name: config.auth.as_ref().is_none_or(|a| a.check_display_name),
            password_hashes: config
                .auth
                .iter()
                .flat_map(|a| &a.users)
                .map(|u| (u.name.clone(), Arc::from(u.password_hash.as_str())))
                .collect(),
            dummy_hash: Arc::from(credentials::dummy_hash(
                config
                    .auth
                    .iter()
                    .flat_map(|a| &a.users)
                    .map(|u| u.password_hash.as_str()),
            )),
            accepted_domains: config.relay.accepted_domains.clone(),
            relay_networks: config.relay.relay_networks.clone(),
            recipients: config
                .relay
                .recipients
                .as_ref()
                .map(|list| KnownRecipients::new(list)),
            untrusted_headers: Arc::new(StripRules {
                names: untrusted_names(&config.headers.strip_untrusted, &mail_auth),
                auth_results_for: Some(config.server.authserv_id.clone()),
            }),
            trusted_headers: Arc::new(StripRules::default()),
            mail_auth,
        }
    }

    /// Data stage: which headers to remove before queuing. Mail from an authenticated user or a
    /// relay network is trusted as it is; from anyone else, the `[headers] strip_untrusted`
    /// names and any `Authentication-Results` claiming our authserv-id are removed, so nobody on
    /// the internet can set an Exchange spam score or internal-auth header.
    fn header_rules(&self, facts: &SessionFacts<'_>) -> Arc<StripRules> {
        if self.untrusted(facts) {
            self.untrusted_headers.clone()
        } else {
            self.trusted_headers.clone()
        }
    }

    /// The store that answers the stage evaluators' rate and lockout effects.
    pub fn store(&self) -> &Store {
        &self.store
    }

    /// DATA stage, at `354`: the bare-LF rule of `listener`, the header firewall and the
    /// `From:` check, for the session `facts`.
    pub fn data_start(&self, listener: &Listener, facts: &SessionFacts<'_>) -> DataRules {
        DataRules {
            normalize_bare_lf: self.normalize_bare_lf(listener, facts),
            header_rules: self.header_rules(facts),
            from_check: self.header_from_check(facts),
        }
    }

    /// The PHC string to verify `login`'s password against: the user's own hash, or, for an
    /// unknown login, a dummy hash with the parameters most users have, so that an unknown
    /// login costs what a known one costs (no timing oracle for which logins exist). The flag
    /// says whether the login is known.
    fn auth_hash(&self, login: &str) -> (Arc<str>, bool) {
        match self.password_hashes.get(login) {
            Some(hash) => (Arc::clone(hash), true),
            None => (Arc::clone(&self.dummy_hash), false),
        }
    }

    /// MAIL stage: an authenticated user may use only the senders it owns (or `<>`; see
    /// [`senders`]). Unauthenticated senders are not checked here.
    fn mail(&self, facts: &SessionFacts<'_>, from: &ReversePath) -> Result<(), Refusal> {
        let (Some(user), ReversePath::Address(address)) = (facts.user, from) else {
            return Ok(());
        };
        if self.senders.get(user).is_some_and(|s| s.owns(address)) {
            Ok(())
        } else {
            Err(Refusal::new(reply::SENDER_NOT_OWNED, "sender_not_owned"))
        }
    }

    /// The `From:` check an authenticated message gets during DATA (`None` for other mail):
    /// fed every `From:` field by the header reader, judged at the end of data
    /// ([`stage::Check::FromHeader`]).
    fn header_from_check(&self, facts: &SessionFacts<'_>) -> Option<FromCheck> {
        let user = facts.user?;
        let senders = self
            .senders
            .get(user)
            .cloned()
            // A login without an entry owns nothing (it cannot authenticate anyway).
            .unwrap_or_else(|| Arc::new(Senders::new("", &[])));
        Some(FromCheck::new(senders, self.check_display_name))
    }

    /// DATA stage: whether a bare LF in the message is stored as CRLF (true) or refused, per
    /// the listener's `bare_lf`; `trusted` normalises for authenticated sessions and
    /// `relay_networks` clients only.
    fn normalize_bare_lf(&self, listener: &Listener, facts: &SessionFacts<'_>) -> bool {
        match listener.bare_lf {
            BareLf::Reject => false,
            BareLf::Normalize => true,
            BareLf::Trusted => !self.untrusted(facts),
        }
    }

    /// True for a session whose mail is judged: neither authenticated nor from
    /// `relay_networks`. The one line between trusted and untrusted mail: the header
    /// firewall, `bare_lf = "trusted"`, SPF, DKIM verification, DMARC, DNSBL and signing
    /// all draw it here.
    pub fn untrusted(&self, facts: &SessionFacts<'_>) -> bool {
        facts.user.is_none() && !self.is_relay_client(facts.client_ip)
    }

    /// True when the client may relay to any domain without authenticating.
    pub fn is_relay_client(&self, ip: IpAddr) -> bool {
        contains(&self.relay_networks, normalize(ip))
    }

    /// True when mail for `domain` (canonical: an [`Address::domain`]) is accepted from anyone
    /// allowed to connect.
    pub fn is_accepted_domain(&self, domain: &str) -> bool {
        self.accepted_domains.iter().any(|d| d == domain)
    }

    /// RCPT stage, before [`Policy::rcpt`]: true for a postmaster recipient, which is accepted
    /// from anyone the listener takes unauthenticated mail from, whatever `recipients_file`
    /// says (RFC 5321 §4.5.1): `<postmaster>` without a domain (`bare`, already mapped to
    /// `[relay] postmaster`), and `postmaster@` every accepted domain, in any case. Listeners
    /// with `auth = "required"` refuse MAIL before AUTH, so this opens nothing there.
    fn is_postmaster(&self, to: &Address, bare: bool) -> bool {
        bare || (to.local().eq_ignore_ascii_case("postmaster")
            && self.is_accepted_domain(to.domain()))
    }

    /// RCPT stage: recipients in accepted domains are taken from anyone (and checked against
    /// the recipient list when one is configured); other domains need AUTH or a relay network.
    fn rcpt(&self, facts: &SessionFacts<'_>, to: &Address) -> Result<(), Refusal> {
        if self.is_accepted_domain(to.domain()) {
            if routed(to) {
                return Err(Refusal::new(reply::RELAY_DENIED, "routed_address"));
            }
            if self.recipients.as_ref().is_some_and(|k| !k.contains(to)) {
                return Err(Refusal::new(reply::UNKNOWN_USER, "recipients_file"));
            }
            return Ok(());
        }
        if facts.user.is_some() || self.is_relay_client(facts.client_ip) {
            return Ok(());
        }
        Err(Refusal::new(reply::RELAY_DENIED, "relay_denied"))
    }
}

/// The header names removed from untrusted mail: `[headers] strip_untrusted`, and the
/// `[dmarc] quarantine_header` field, which only the relay may set (an Exchange transport
/// rule trusts it), whatever `[dmarc] verify` says.
fn untrusted_names(strip: &[String], mail_auth: &mailauth::MailAuth) -> Vec<NamePattern> {
    let mut names: Vec<NamePattern> = strip.iter().map(|p| NamePattern::new(p)).collect();
    let quarantine = mail_auth.quarantine_name();
    if !quarantine.is_empty() && !names.iter().any(|n| n.matches(quarantine)) {
        names.push(NamePattern::new(quarantine));
    }
    names
}

/// The entries of `recipients_file` ([`AddressPattern`]s), in sets for lookups that match as
/// [`AddressPattern::matches`] does.
#[derive(Debug, Clone)]
struct KnownRecipients {
    /// Exact addresses, in [`Address::for_matching`] form.
    addresses: HashSet<Address>,
    /// `@domain` entries: canonical domains.
    domains: HashSet<String>,
}

impl KnownRecipients {
    /// From the canonical entries config compiled; an entry that does not parse (config
    /// refuses those) matches nothing, so the list can only shrink, never open up.
    fn new(entries: &[String]) -> KnownRecipients {
        let mut known = KnownRecipients {
            addresses: HashSet::new(),
            domains: HashSet::new(),
        };
        for pattern in entries.iter().filter_map(|e| AddressPattern::parse(e)) {
            match pattern {
                AddressPattern::Domain(domain) => known.domains.insert(domain),
                AddressPattern::Address(a) => known.addresses.insert(a.for_matching()),
            };
        }
        known
    }

    fn contains(&self, to: &Address) -> bool {
        self.domains.contains(to.domain()) || self.addresses.contains(&to.for_matching())
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
        let policy = Policy::new(&config, None, Instant::now());
        (config, policy)
    }

    fn facts(ip: &str, user: Option<&'static str>) -> SessionFacts<'static> {
        SessionFacts {
            client_ip: ip.parse().unwrap(),
            user,
        }
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

    #[test]
    fn recipients_file_matches_ascii_case_only_and_domains_as_a_labels() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("recipients.txt");
        std::fs::write(
            &file,
            "kate@example.com\n\"John Doe\"@example.com\nJörg@bücher.example\n# c\n",
        )
        .unwrap();
        let (_, p) = policy(&format!(
            "accepted_domains = [\"example.com\", \"xn--bcher-kva.example\"]\n\
             recipients_file = {:?}",
            file.display().to_string()
        ));
        let rule = |to: &str| {
            p.rcpt(&facts("192.0.2.1", None), &Address::parse(to).unwrap())
                .err()
                .map(|r| r.rule)
        };
        assert_eq!(rule("KATE@example.com"), None);
        // U+212A KELVIN SIGN lower-cases to `k` in Unicode: not the same mailbox.
        assert_eq!(rule("\u{212A}ate@example.com"), Some("recipients_file"));
        assert_eq!(rule("\"john doe\"@example.com"), None);
        assert_eq!(rule("john.doe@example.com"), Some("recipients_file"));
        assert_eq!(rule("Jörg@xn--bcher-kva.example"), None);
        assert_eq!(rule("Jörg@BÜCHER.example"), None);
        // Non-ASCII local parts are byte-exact: no case folding.
        assert_eq!(rule("jörg@bücher.example"), Some("recipients_file"));
    }

    /// A policy with users `alice` (senders alice@example.com) and `bob@example.com` (none),
    /// plus `more` (further `[auth]` keys, then tables).
    fn with_users(dir: &std::path::Path, more: &str) -> (Config, Policy) {
        let users = dir.join("users.toml");
        let hash = credentials::DUMMY_HASH;
        std::fs::write(
            &users,
            format!(
                "[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n\
                 senders = [\"alice@example.com\"]\n\
                 [[users]]\nname = \"bob@example.com\"\npassword_hash = \"{hash}\"\n"
            ),
        )
        .unwrap();
        policy(&format!(
            "accepted_domains = [\"example.com\"]\n[auth]\nusers_file = {:?}\n{more}",
            users.display().to_string()
        ))
    }

    fn sender(s: &str) -> ReversePath {
        ReversePath::Address(Address::parse(s).unwrap())
    }

    #[test]
    fn mail_checks_ownership_only_after_auth() {
        let dir = tempfile::tempdir().unwrap();
        let (_, p) = with_users(dir.path(), "");
        let rule = |user, from: &ReversePath| {
            p.mail(&facts("192.0.2.1", user), from)
                .err()
                .map(|r| (r.rule, r.reply.code, r.reply.enhanced))
        };
        let spoof = sender("ceo@example.com");
        assert_eq!(rule(None, &spoof), None);
        assert_eq!(
            rule(Some("alice"), &spoof),
            Some(("sender_not_owned", 553, "5.7.1"))
        );
        assert_eq!(rule(Some("alice"), &sender("alice@Example.COM")), None);
        assert_eq!(rule(Some("alice"), &ReversePath::Null), None);
        assert_eq!(
            rule(Some("bob@example.com"), &sender("bob@example.com")),
            None
        );
        assert!(rule(Some("bob@example.com"), &spoof).is_some());
        // A login the policy does not know owns nothing.
        assert!(rule(Some("mallory"), &sender("mallory@example.com")).is_some());
    }

    #[test]
    fn data_checks_the_from_header_of_authenticated_mail_only() {
        let dir = tempfile::tempdir().unwrap();
        let (_, p) = with_users(dir.path(), "");
        let check = |user, section: &str| {
            let mut from = p.header_from_check(&facts("192.0.2.1", user));
            let mut reader =
                crate::smtp::headers::HeaderFilter::with_inspector(Arc::default(), from.take());
            let mut out = Vec::new();
            reader.push(section.as_bytes(), &mut out);
            reader.finish(&mut out);
            stage::from_header(reader.into_inspector().as_ref())
                .err()
                .map(|r| (r.rule, r.reply.code, r.reply.enhanced, r.detail))
        };
        assert_eq!(check(None, "From: ceo@example.com\r\n"), None);
        assert!(
            p.header_from_check(&facts("192.0.2.1", Some("alice")))
                .is_some()
        );
        assert!(p.header_from_check(&facts("192.0.2.1", None)).is_none());
        assert_eq!(
            check(
                Some("alice"),
                "From: \"ceo@example.com\" <alice@example.com>\r\n"
            ),
            Some((
                "from_display_name",
                550,
                "5.7.1",
                Some(Detail::FromHeader("ceo@example.com".to_string()))
            ))
        );
        assert_eq!(check(Some("alice"), "From: <alice@example.com>\r\n"), None);
        assert_eq!(
            check(Some("alice"), "From: CEO <ceo@example.com>\r\n"),
            Some((
                "from_header_not_owned",
                550,
                "5.7.1",
                Some(Detail::FromHeader("ceo@example.com".to_string()))
            ))
        );
        assert_eq!(
            check(Some("alice"), "Subject: x\r\n"),
            Some(("from_header_missing", 550, "5.7.1", None))
        );
    }
}
