//! Pure policy decisions compiled from the configuration, named after the SMTP stage they act
//! on: [`Policy::connect`], [`Policy::auth_gate`], [`Policy::mail`], [`Policy::rcpt`],
//! [`Policy::data`] and the rate checks beside them. Nothing here touches a socket or reads a
//! clock; stateful decisions (rate limits, AUTH failures) take the time as an argument. The
//! driver asks, carries out the verdict and logs the rule that fired.
//!
//! A verdict that refuses carries the reply for the client (which never names the rule) and
//! the rule name for the log.
//!
//! The stateful tables ([`limits::Limiters`], [`lockout::AuthGuard`]) are shared through
//! `Arc`s and carried from one `Policy` to the next on reload when their settings did not
//! change, so a SIGHUP neither hands out fresh budgets nor lifts lockouts.

pub mod access;
pub mod capability;
pub mod credentials;
pub mod limits;
pub mod lockout;
pub mod senders;

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
use limits::{Limited, Limiters};
use lockout::{Attempt, AuthGuard, Gate, Settings};
use senders::{FromCheck, FromProblem, Senders};

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
    /// `[rate_limits]` tables (shared with the next policy where unchanged).
    limiters: Limiters,
    /// AUTH failure tables; `None` without `[auth]`.
    auth_guard: Option<Arc<AuthGuard>>,
    /// Each user's argon2 PHC string, by login.
    password_hashes: HashMap<String, Arc<str>>,
    /// What unknown logins are verified against ([`credentials::dummy_hash`]).
    dummy_hash: Arc<str>,
}

/// Why an AUTH does not go on to verification now.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AuthHold {
    /// Refuse it (a locked-out client).
    Refused(Refusal),
    /// The client's budget is held by verifications in flight: ask again once one settles.
    Wait,
}

impl Policy {
    /// Compile `config`. The stateful tables of `previous` (the policy being replaced on
    /// reload) are kept where their settings are unchanged; `now` anchors new tables' clocks.
    pub fn new(config: &Config, previous: Option<&Policy>, now: Instant) -> Policy {
        let auth_guard = config.auth.as_ref().map(|auth| {
            let settings = Settings::from_config(auth);
            previous
                .and_then(|p| p.auth_guard.as_ref())
                .filter(|g| g.settings() == settings)
                .cloned()
                .unwrap_or_else(|| Arc::new(AuthGuard::new(settings)))
        });
        Policy {
            senders: config
                .auth
                .iter()
                .flat_map(|a| &a.users)
                .map(|u| (u.name.clone(), Arc::new(Senders::new(&u.name, &u.senders))))
                .collect(),
            check_display_name: config.auth.as_ref().is_none_or(|a| a.check_display_name),
            limiters: Limiters::new(&config.rate_limits, previous.map(|p| &p.limiters), now),
            auth_guard,
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
                names: config
                    .headers
                    .strip_untrusted
                    .iter()
                    .map(|p| NamePattern::new(p))
                    .collect(),
                auth_results_for: Some(config.server.authserv_id.clone()),
            }),
            trusted_headers: Arc::new(StripRules::default()),
        }
    }

    /// Data stage: which headers to remove before queuing. Mail from an authenticated user or a
    /// relay network is trusted as it is; from anyone else, the `[headers] strip_untrusted`
    /// names and any `Authentication-Results` claiming our authserv-id are removed, so nobody on
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

    /// Connect stage, after the access lists: `[rate_limits] connections_per_ip`.
    pub fn connection_rate(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
        self.limiters.connection(ip, now)
    }

    /// AUTH stage, before the password is verified: a locked-out client is refused without
    /// verifying anything; a client whose failure budget is held by verifications in flight
    /// waits ([`AuthHold::Wait`]); otherwise the attempt reserves one failure (see
    /// [`lockout`]) and says how long a sprayed login's answer is delayed. Settle the returned
    /// [`Attempt`] with the verification's result.
    pub fn auth_gate(&self, ip: IpAddr, login: &str, now: Instant) -> Result<Attempt, AuthHold> {
        match self.auth_guard.as_ref().map(|g| g.begin(ip, login, now)) {
            Some(Gate::LockedOut { .. }) => Err(AuthHold::Refused(Refusal::new(
                reply::AUTH_LOCKED_OUT,
                "auth_lockout",
            ))),
            Some(Gate::Busy) => Err(AuthHold::Wait),
            Some(Gate::Proceed(attempt)) => Ok(attempt),
            None => Ok(Attempt::unguarded()),
        }
    }

    /// The PHC string to verify `login`'s password against: the user's own hash, or, for an
    /// unknown login, a dummy hash with the parameters most users have, so that an unknown
    /// login costs what a known one costs (no timing oracle for which logins exist). The flag
    /// says whether the login is known.
    pub fn auth_hash(&self, login: &str) -> (Arc<str>, bool) {
        match self.password_hashes.get(login) {
            Some(hash) => (Arc::clone(hash), true),
            None => (Arc::clone(&self.dummy_hash), false),
        }
    }

    /// MAIL stage: an authenticated user may use only the senders it owns (or `<>`; see
    /// [`senders`]). Unauthenticated senders are not checked here.
    pub fn mail(&self, facts: &SessionFacts<'_>, from: &ReversePath) -> Result<(), Refusal> {
        let (Some(user), ReversePath::Address(address)) = (facts.user, from) else {
            return Ok(());
        };
        if self.senders.get(user).is_some_and(|s| s.owns(address)) {
            Ok(())
        } else {
            Err(Refusal::new(reply::SENDER_NOT_OWNED, "sender_not_owned"))
        }
    }

    /// MAIL stage, after [`Policy::mail`]: `messages_per_user` and `messages_per_ip`.
    pub fn message_rate(&self, facts: &SessionFacts<'_>, now: Instant) -> Result<(), Limited> {
        self.limiters.message(facts.client_ip, facts.user, now)
    }

    /// RCPT stage, after [`Policy::rcpt`] accepted the recipient: `recipients_per_ip`.
    pub fn recipient_rate(&self, facts: &SessionFacts<'_>, now: Instant) -> Result<(), Limited> {
        self.limiters.recipient(facts.client_ip, now)
    }

    /// The `From:` check an authenticated message gets during DATA (`None` for other mail):
    /// fed every `From:` field by the header reader, judged by [`Policy::data`].
    pub fn from_check(&self, facts: &SessionFacts<'_>) -> Option<FromCheck> {
        let user = facts.user?;
        let senders = self
            .senders
            .get(user)
            .cloned()
            // A login without an entry owns nothing (it cannot authenticate anyway).
            .unwrap_or_else(|| Arc::new(Senders::new("", &[])));
        Some(FromCheck::new(senders, self.check_display_name))
    }

    /// Data stage, before the message is committed: the `From:` header of an authenticated
    /// message must name only addresses its user owns, in its addresses and (with `[auth]
    /// check_display_name`) its display names. `check` is what [`Policy::from_check`] gave,
    /// after the header section was read. On refusal the offending address, if any, comes
    /// along for the log.
    pub fn data(&self, check: Option<FromCheck>) -> Result<(), (Refusal, Option<String>)> {
        let Some(check) = check else {
            return Ok(());
        };
        let refuse =
            |rule, address| Err((Refusal::new(reply::FROM_HEADER_NOT_OWNED, rule), address));
        match check.finish() {
            Ok(()) => Ok(()),
            Err(FromProblem::Missing) => refuse("from_header_missing", None),
            Err(FromProblem::NotOwned(a)) => refuse("from_header_not_owned", Some(a)),
            Err(FromProblem::DisplayName(a)) => refuse("from_display_name", Some(a)),
            Err(FromProblem::Ambiguous(a)) => refuse("from_header_ambiguous", Some(a)),
        }
    }

    /// DATA stage: whether a bare LF in the message is stored as CRLF (true) or refused, per
    /// the listener's `bare_lf`; `trusted` normalises for authenticated sessions and
    /// `relay_networks` clients only.
    pub fn normalize_bare_lf(&self, listener: &Listener, facts: &SessionFacts<'_>) -> bool {
        match listener.bare_lf {
            BareLf::Reject => false,
            BareLf::Normalize => true,
            BareLf::Trusted => facts.user.is_some() || self.is_relay_client(facts.client_ip),
        }
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
    pub fn is_postmaster(&self, to: &Address, bare: bool) -> bool {
        bare || (to.local().eq_ignore_ascii_case("postmaster")
            && self.is_accepted_domain(to.domain()))
    }

    /// RCPT stage: recipients in accepted domains are taken from anyone (and checked against
    /// the recipient list when one is configured); other domains need AUTH or a relay network.
    pub fn rcpt(&self, facts: &SessionFacts<'_>, to: &Address) -> Result<(), Refusal> {
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

/// The entries of `recipients_file`, for lookups that match as [`Address::matches`] says.
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
        for entry in entries {
            if let Some(domain) = entry.strip_prefix('@') {
                known.domains.insert(domain.to_owned());
            } else if let Ok(a) = Address::parse(entry) {
                known.addresses.insert(a.for_matching());
            }
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
            let mut from = p.from_check(&facts("192.0.2.1", user));
            let mut reader =
                crate::smtp::headers::HeaderFilter::with_inspector(Arc::default(), from.take());
            let mut out = Vec::new();
            reader.push(section.as_bytes(), &mut out);
            reader.finish(&mut out);
            p.data(reader.into_inspector())
                .err()
                .map(|(r, a)| (r.rule, r.reply.code, r.reply.enhanced, a))
        };
        assert_eq!(check(None, "From: ceo@example.com\r\n"), None);
        assert!(p.from_check(&facts("192.0.2.1", Some("alice"))).is_some());
        assert!(p.from_check(&facts("192.0.2.1", None)).is_none());
        assert_eq!(
            check(
                Some("alice"),
                "From: \"ceo@example.com\" <alice@example.com>\r\n"
            ),
            Some((
                "from_display_name",
                550,
                "5.7.1",
                Some("ceo@example.com".to_string())
            ))
        );
        assert_eq!(check(Some("alice"), "From: <alice@example.com>\r\n"), None);
        assert_eq!(
            check(Some("alice"), "From: CEO <ceo@example.com>\r\n"),
            Some((
                "from_header_not_owned",
                550,
                "5.7.1",
                Some("ceo@example.com".to_string())
            ))
        );
        assert_eq!(
            check(Some("alice"), "Subject: x\r\n"),
            Some(("from_header_missing", 550, "5.7.1", None))
        );
    }

    #[test]
    fn auth_gate_locks_out_and_state_survives_a_rebuild_with_equal_settings() {
        let dir = tempfile::tempdir().unwrap();
        let more = "max_failures = 2\n[rate_limits]\nmessages_per_ip = \"1/hour\"\n";
        let (config, p) = with_users(dir.path(), more);
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let fail = |p: &Policy| p.auth_gate(ip, "alice", t0).unwrap().settle(false, t0);
        assert_eq!(fail(&p).locked_out, None);
        assert_eq!(fail(&p).locked_out, Some(2));
        let Err(AuthHold::Refused(locked)) = p.auth_gate(ip, "alice", t0) else {
            panic!("not locked out");
        };
        assert_eq!(
            (locked.rule, locked.reply.code, locked.reply.enhanced),
            ("auth_lockout", 454, "4.7.0")
        );
        assert!(p.message_rate(&facts("192.0.2.1", None), t0).is_ok());
        assert!(p.message_rate(&facts("192.0.2.1", None), t0).is_err());

        // Rebuilt from the same settings: the lockout and the spent budget remain.
        let same = Policy::new(&config, Some(&p), t0);
        assert!(same.auth_gate(ip, "bob@example.com", t0).is_err());
        assert!(same.message_rate(&facts("192.0.2.1", None), t0).is_err());

        // Changed settings start afresh.
        let dir2 = tempfile::tempdir().unwrap();
        let (changed, _) = with_users(
            dir2.path(),
            "max_failures = 3\n[rate_limits]\nmessages_per_ip = \"2/hour\"\n",
        );
        let fresh = Policy::new(&changed, Some(&same), t0);
        assert!(fresh.auth_gate(ip, "alice", t0).is_ok());
        assert!(fresh.message_rate(&facts("192.0.2.1", None), t0).is_ok());
    }
}
