//! Mail authentication and reputation as policy: which sessions SPF, DNSBL, DKIM, ARC, DMARC
//! and iprev apply to, which mail is DKIM-signed, and what their results mean for the reply.
//!
//! "Untrusted" mail is mail that is neither authenticated nor from `relay_networks`
//! ([`Policy::untrusted`], the line the header firewall draws): the checks apply to it only, and signing to the rest
//! only. What a check found comes from `crate::dns` as a `*Check` value; the decisions here
//! are pure functions of it and the compiled `[spf]`, `[dkim]`, `[dmarc]` and `[dnsbl]`.

use ipnet::IpNet;

use super::access::{contains, normalize};
use super::stage::{Input, Lookup, StageFacts};
use super::{Detail, Policy, Refusal, SessionFacts};
use crate::config::{Config, QuarantineHeader, Verify};
use crate::dns::dnsbl::DnsblCheck;
use crate::dns::verify::{
    DmarcPolicy, DmarcResult, FromDomain, MessageChecks, SpfCheck, SpfResult,
};
use crate::routes::Routes;
use crate::smtp::reply;

/// The compiled mail-authentication policy of one configuration.
#[derive(Debug, Clone)]
pub(super) struct MailAuth {
    /// `[spf] verify`.
    pub(super) spf: Verify,
    /// `[dkim] verify = "record"`.
    pub(super) dkim_verify: bool,
    /// `[dmarc] verify`.
    pub(super) dmarc: Verify,
    /// SPF runs for untrusted mail ([`Config::spf_runs`]).
    spf_runs: bool,
    /// Any check of untrusted mail runs ([`Config::message_checks_run`]).
    message_checks: bool,
    /// `[dmarc] quarantine_header`.
    quarantine: QuarantineHeader,
    /// `[dnsbl]`, when it has zones.
    dnsbl: Option<DnsblRule>,
    /// Where signed mail goes, when `[[dkim.sign]]` has entries and an upstream signs.
    signing: Option<Signing>,
}

/// `[dnsbl]` as the RCPT check uses it.
#[derive(Debug, Clone)]
struct DnsblRule {
    /// At least 1: a client no zone lists is never refused.
    threshold: u32,
    exempt: Vec<IpNet>,
}

/// The routes of trusted mail that is signed: an upstream with `sign = true` in a recipient
/// domain's route.
#[derive(Debug, Clone)]
struct Signing {
    routes: Routes,
    /// `[[upstreams]] sign`, by index.
    sign: Vec<bool>,
}

impl MailAuth {
    /// Compile the mail-authentication sections of `config`.
    pub(super) fn new(config: &Config) -> MailAuth {
        let signs = config.upstreams.iter().any(|u| u.sign);
        MailAuth {
            spf: config.spf.verify,
            dkim_verify: config.dkim.verify,
            dmarc: config.dmarc.verify,
            spf_runs: config.spf_runs(),
            message_checks: config.message_checks_run(),
            quarantine: config.dmarc.quarantine_header.clone(),
            dnsbl: (!config.dnsbl.zones.is_empty()).then(|| DnsblRule {
                threshold: config.dnsbl.threshold.max(1),
                exempt: config.dnsbl.exempt.clone(),
            }),
            signing: (signs && !config.dkim.sign.is_empty()).then(|| Signing {
                routes: Routes::new(&config.upstreams),
                sign: config.upstreams.iter().map(|u| u.sign).collect(),
            }),
        }
    }

    /// The name of the quarantine header, removed from untrusted mail.
    pub(super) fn quarantine_name(&self) -> &str {
        &self.quarantine.name
    }
}

impl Policy {
    /// Whether `lookup` is started for this session at connect: DNSBL for an untrusted
    /// client outside `[dnsbl] exempt` when zones are configured; iprev for an untrusted
    /// client when any check that records it runs.
    pub(super) fn lookup_applies(&self, lookup: Lookup, facts: &SessionFacts<'_>) -> bool {
        match lookup {
            Lookup::Dnsbl => self.dnsbl_applies(facts),
            Lookup::Iprev => self.untrusted(facts) && self.mail_auth.message_checks,
            #[cfg(test)]
            Lookup::Echo(_) => true,
        }
    }

    /// The DNSBL check applies: zones configured, the client untrusted and not exempt.
    pub(super) fn dnsbl_applies(&self, facts: &SessionFacts<'_>) -> bool {
        self.mail_auth.dnsbl.as_ref().is_some_and(|rule| {
            self.untrusted(facts) && !contains(&rule.exempt, normalize(facts.client_ip))
        })
    }

    /// SPF runs at MAIL for an untrusted transaction when `[spf]` or `[dmarc]` verifies
    /// (DMARC needs SPF's result whatever `[spf]` says).
    pub(super) fn spf_runs(&self, facts: &SessionFacts<'_>) -> bool {
        self.untrusted(facts) && self.mail_auth.spf_runs
    }

    /// Trusted mail is signed when a recipient's route has an upstream with `sign = true`
    /// (mail for Exchange only is not: Exchange may still change it).
    pub(super) fn signs_for(&self, recipients: &[crate::envelope::Address]) -> bool {
        let Some(signing) = &self.mail_auth.signing else {
            return false;
        };
        recipients.iter().any(|to| {
            signing
                .routes
                .route(to.domain())
                .iter()
                .any(|&i| signing.sign.get(i).copied().unwrap_or(false))
        })
    }

    /// What SPF's result means under `[spf] verify` (RFC 7372): only `enforce` refuses, and
    /// only `fail` (`550 5.7.23`) and `temperror` (`451 4.7.24`). SPF run only for DMARC
    /// never refuses.
    pub(super) fn spf_refusal(&self, check: &SpfCheck) -> Option<Refusal> {
        if self.mail_auth.spf != Verify::Enforce {
            return None;
        }
        let detail = || {
            Detail::Text(format!(
                "{}={} {}",
                match check.identity {
                    crate::dns::verify::SpfIdentity::MailFrom => "smtp.mailfrom",
                    crate::dns::verify::SpfIdentity::Helo => "smtp.helo",
                },
                check.subject,
                check.detail.as_deref().unwrap_or("")
            ))
        };
        match check.result {
            SpfResult::Fail => Some(Refusal::new(reply::SPF_FAIL, "spf").with_detail(detail())),
            SpfResult::TempError => {
                Some(Refusal::new(reply::SPF_TEMPERROR, "spf").with_detail(detail()))
            }
            _ => None,
        }
    }

    /// At RCPT: a client whose listings add up to `[dnsbl] threshold` or more is refused,
    /// naming the lists (the one refusal that says where it comes from, so the sender can
    /// get delisted).
    pub(super) fn dnsbl_refusal(
        &self,
        facts: &StageFacts<'_>,
        check: &DnsblCheck,
    ) -> Option<Refusal> {
        let rule = self.mail_auth.dnsbl.as_ref()?;
        if !matches!(facts.input, Input::Rcpt(_))
            || check.listed.is_empty()
            || check.score < rule.threshold
        {
            return None;
        }
        let names: Vec<&str> = check.listed.iter().map(|l| l.name.as_str()).collect();
        let reply = reply::dnsbl_listed(normalize(facts.session.client_ip), &names);
        Some(Refusal::new(reply, "dnsbl").with_detail(Detail::Dnsbl(dnsbl_field(check))))
    }

    /// After the final dot, under `[dmarc] verify = "enforce"`: a message without exactly
    /// one `From:` domain (which DMARC cannot judge: RFC 7489 §6.6.1), or failing DMARC
    /// for a domain asking for `reject` (`p`, `sp` or `np`, after `t=y`; or one of ours
    /// under `own_domains = "reject"`), is refused with `550 5.7.1`. Quarantine and
    /// temperror are accepted (see [`Policy::quarantine_field`]).
    pub(super) fn dmarc_refusal(&self, checks: &MessageChecks) -> Option<Refusal> {
        if self.mail_auth.dmarc != Verify::Enforce {
            return None;
        }
        let no_single = |what: &str| {
            Refusal::new(reply::DMARC_NO_SINGLE_FROM, "dmarc")
                .with_detail(Detail::Text(what.to_string()))
        };
        match checks.from {
            FromDomain::Missing => return Some(no_single("no From: domain")),
            FromDomain::Several => return Some(no_single("several From: fields or domains")),
            FromDomain::One(_) => {}
        }
        let dmarc = checks.dmarc.as_ref()?;
        (dmarc.result == DmarcResult::Fail && dmarc.policy == DmarcPolicy::Reject).then(|| {
            let source = if dmarc.own_domain {
                "own_domains"
            } else {
                "record"
            };
            Refusal::new(reply::DMARC_REJECT, "dmarc").with_detail(Detail::Text(format!(
                "header.from={} policy=reject ({source})",
                dmarc.domain
            )))
        })
    }

    /// The quarantine field (`Name: value` CRLF) for a message DMARC failed whose domain
    /// asks for quarantine, under `[dmarc] verify = "enforce"`; `None` otherwise.
    pub fn quarantine_field(&self, checks: &MessageChecks) -> Option<String> {
        let a = &self.mail_auth;
        let dmarc = checks.dmarc.as_ref()?;
        (a.dmarc == Verify::Enforce
            && dmarc.result == DmarcResult::Fail
            && dmarc.policy == DmarcPolicy::Quarantine)
            .then(|| format!("{}: {}\r\n", a.quarantine.name, a.quarantine.value))
    }
}

/// The `dnsbl=` log field: each listing zone's name and the answer that counted, and the
/// score (`bl.example=127.0.0.2 score=1`).
pub fn dnsbl_field(check: &DnsblCheck) -> String {
    let mut out = String::new();
    for l in &check.listed {
        out.push_str(&format!("{}={} ", l.name, l.answer));
    }
    out.push_str(&format!("score={}", check.score));
    out
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::envelope::Address;

    /// Two upstreams: `exchange` for example.com (never signs) and the default route
    /// `smarthost` (signs).
    fn policy() -> Policy {
        let text = "[server]\nhostname = \"relay.test\"\n[[listeners]]\nbind = \"127.0.0.1:2525\"\n\
             tls = \"none\"\n[relay]\naccepted_domains = [\"example.com\"]\n\
             [[upstreams]]\nname = \"exchange\"\naddress = \"127.0.0.1:25\"\n\
             domains = [\"example.com\"]\n\
             [[upstreams]]\nname = \"smarthost\"\naddress = \"127.0.0.1:26\"\n";
        let mut config = Config::from_toml(text, None).expect("valid test policy");
        config.upstreams[1].sign = true;
        let mut policy = Policy::new(&config, None, Instant::now());
        // As `[[dkim.sign]]` entries would make it (their keys are loaded by the config).
        policy.mail_auth.signing = Some(Signing {
            routes: Routes::new(&config.upstreams),
            sign: config.upstreams.iter().map(|u| u.sign).collect(),
        });
        policy
    }

    fn to(list: &[&str]) -> Vec<Address> {
        list.iter().map(|a| Address::parse(a).unwrap()).collect()
    }

    #[test]
    fn mail_is_signed_when_a_recipient_routes_to_a_signing_upstream() {
        let p = policy();
        assert!(p.signs_for(&to(&["x@internet.test"])));
        assert!(p.signs_for(&to(&["u@example.com", "x@internet.test"])));
        // Mail handed to Exchange only is not signed here.
        assert!(!p.signs_for(&to(&["u@example.com"])));
        assert!(!p.signs_for(&[]));
    }

    #[test]
    fn without_signing_entries_nothing_is_signed() {
        let mut p = policy();
        p.mail_auth.signing = None;
        assert!(!p.signs_for(&to(&["x@internet.test"])));
    }

    #[test]
    fn the_quarantine_header_is_removed_from_untrusted_mail_only() {
        let p = policy();
        let untrusted = SessionFacts {
            client_ip: "192.0.2.1".parse().unwrap(),
            user: None,
        };
        let rules = p.header_rules(&untrusted);
        assert!(
            rules
                .names
                .iter()
                .any(|n| n.matches("x-portcullis-quarantine"))
        );
        let trusted = SessionFacts {
            user: Some("alice"),
            ..untrusted
        };
        assert!(p.header_rules(&trusted).names.is_empty());
    }
}
