//! SPF at MAIL FROM (or of the HELO name), iprev, and a message's DKIM signatures, ARC chain
//! and DMARC policy, through mail-auth and the relay's [`Resolver`](super::Resolver).
//!
//! Each check answers what it found; nothing here refuses. Every lookup is bounded by the
//! resolver's timeout, and a whole check by [`CHECK_DEADLINE_QUERIES`] of them: a check that
//! runs out of time is a `temperror`, never a pass.

use std::net::IpAddr;
use std::time::Duration;

use futures_util::future::join_all;
use mail_auth::common::crypto::Algorithm;
use mail_auth::common::resolver::ToFqdn;
use mail_auth::common::to_a_label;
use mail_auth::common::verify::{DomainKey, VerifySignature};
use mail_auth::dkim::{DkimError, Signature};
use mail_auth::dmarc::Policy;
use mail_auth::dmarc::verify::DmarcParameters;
use mail_auth::hickory_resolver::proto::rr::{Name, RData};
use mail_auth::spf::verify::SpfParameters;
use mail_auth::{
    AuthenticatedMessage, DkimOutput, DkimResult as LibDkim, DmarcResult as LibDmarc, DnsError,
    Error as AuthError, IprevResult as LibIprev, Parameters, RecordSet, ResolverCache, SpfOutput,
    SpfResult as LibSpf, Txt,
};
use mail_parser::HeaderValue;
use mail_parser::parsers::MessageStream;
use tokio::time::{Instant, timeout, timeout_at};

use super::Resolver;

/// A whole check (all its lookups) may take this many `[dns] timeout`s at most.
pub const CHECK_DEADLINE_QUERIES: u32 = 4;

/// SPF results (RFC 7208 §2.6).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfResult {
    Pass,
    Fail,
    SoftFail,
    Neutral,
    None,
    TempError,
    PermError,
}

/// Which identity SPF checked (RFC 7208 §2.3, §2.4).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfIdentity {
    /// The MAIL FROM reverse-path (`smtp.mailfrom`).
    MailFrom,
    /// The HELO name, for a null reverse-path (`smtp.helo`).
    Helo,
}

/// What SPF found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SpfCheck {
    pub result: SpfResult,
    pub identity: SpfIdentity,
    /// The identity checked: the reverse-path (`local@domain`) or the HELO name.
    pub subject: String,
    /// The domain whose record was evaluated (the reverse-path's domain, or the HELO name).
    pub domain: String,
    /// Why, for the log (a DNS error, a parse error, the record's explanation).
    pub detail: Option<String>,
}

/// iprev results (RFC 8601 §3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IprevResult {
    Pass,
    Fail,
    None,
    TempError,
    PermError,
}

/// What iprev found: the client's PTR name that resolved back to it, if any.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct IprevCheck {
    pub result: IprevResult,
    /// The confirmed name (pass), or the first PTR name.
    pub name: Option<String>,
}

/// DKIM results as recorded (RFC 8601 §2.7.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DkimResult {
    Pass,
    Fail,
    Neutral,
    /// The signature verified but uses what RFC 8301 forbids (an RSA key under 1024 bits,
    /// `rsa-sha1`): never a pass.
    Policy,
    TempError,
    PermError,
}

/// One DKIM signature's result.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimCheck {
    pub result: DkimResult,
    /// `d=`.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    /// `a=`, e.g. `rsa-sha256`, `ed25519-sha256`.
    pub algorithm: String,
    /// The first 8 characters of `b=` (RFC 6008 `header.b`), to tell signatures apart.
    pub b: String,
    /// Why, for the log.
    pub detail: Option<String>,
}

/// ARC chain validation results (RFC 8617 §5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ArcResult {
    Pass,
    Fail,
    None,
    TempError,
    PermError,
}

/// What ARC chain validation found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ArcCheck {
    pub result: ArcResult,
    /// Instances in the chain (`i=` of the last set), 0 when none.
    pub instances: u32,
    pub detail: Option<String>,
}

/// DMARC results (RFC 7489 §11.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcResult {
    Pass,
    Fail,
    None,
    TempError,
    PermError,
}

/// The policy a DMARC record asks for, after `sp`/`np` and `t=y` (one step lower).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DmarcPolicy {
    None,
    Quarantine,
    Reject,
}

/// What DMARC found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DmarcCheck {
    pub result: DmarcResult,
    /// The `From:` domain (`header.from`).
    pub domain: String,
    /// What the domain asks for a failing message; `Reject` for one of our own domains under
    /// `[dmarc] own_domains = "reject"`.
    pub policy: DmarcPolicy,
    /// The policy came from `own_domains = "reject"`, not from a record.
    pub own_domain: bool,
    pub detail: Option<String>,
}

/// The `From:` header's domains, as DMARC needs exactly one (RFC 7489 §6.6.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FromDomain {
    /// One `From:` field naming one domain (lower-case A-label).
    One(String),
    /// No `From:` field, or none with a domain.
    Missing,
    /// Several `From:` fields, or one naming several domains.
    Several,
}

/// What the session knew before the message (for DMARC's SPF side and the record).
#[derive(Debug, Clone, Copy)]
pub struct MessageFacts<'a> {
    pub client_ip: IpAddr,
    /// The HELO/EHLO name.
    pub helo: &'a str,
    /// The reverse-path's domain, or the HELO name for a null reverse-path.
    pub mail_from_domain: &'a str,
    /// SPF as checked at MAIL (required when `dmarc`).
    pub spf: Option<&'a SpfCheck>,
    /// Verify DKIM signatures and the ARC chain.
    pub dkim: bool,
    /// Evaluate DMARC (implies `dkim`).
    pub dmarc: bool,
    /// Our accepted domains when `[dmarc] own_domains = "reject"`, else empty.
    pub own_domains: &'a [String],
}

/// What the end-of-data checks found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageChecks {
    /// One per signature, in header order (none: DKIM was not run or found none).
    pub dkim: Vec<DkimCheck>,
    /// `None`: not run.
    pub arc: Option<ArcCheck>,
    /// `None`: not run, or no single `From:` domain (see `from`).
    pub dmarc: Option<DmarcCheck>,
    pub from: FromDomain,
}

/// `%{r}` in an SPF explanation is the checking host's name, which this layer does not know;
/// RFC 7208 §7.3 says to use "unknown" then.
const SPF_HOST_DOMAIN: &str = "unknown";

/// Longest tag value kept from a stranger's DKIM-Signature (for the log and the A-R field).
const MAX_TAG_CHARS: usize = 255;

impl Resolver {
    /// The time one whole check may take: [`CHECK_DEADLINE_QUERIES`] × `[dns] timeout`.
    pub fn check_deadline(&self) -> Duration {
        self.timeout().saturating_mul(CHECK_DEADLINE_QUERIES)
    }

    /// SPF for a transaction (RFC 7208 §2.3–2.4): check_host of the reverse-path's domain
    /// (`local@domain`), or of the HELO name when `reverse_path` is `None` (null
    /// reverse-path). The RFC 7208 §4.6.4 limit of 10 lookups is mail-auth's (a permerror
    /// past it); running out of [`Resolver::check_deadline`] is a temperror.
    pub async fn spf(&self, client_ip: IpAddr, helo: &str, reverse_path: Option<&str>) -> SpfCheck {
        let (identity, subject, domain) = match reverse_path {
            Some(path) => (
                SpfIdentity::MailFrom,
                path,
                path.rsplit_once('@').map_or(helo, |(_, d)| d),
            ),
            None => (SpfIdentity::Helo, helo, helo),
        };
        let mut check = SpfCheck {
            result: SpfResult::None,
            identity,
            subject: subject.to_string(),
            domain: domain.trim_end_matches('.').to_ascii_lowercase(),
            detail: None,
        };
        if !is_domain_name(domain) {
            // RFC 7208 §4.3: a malformed domain is "none" at once.
            check.detail = Some("not a domain name (RFC 7208 §4.3)".to_string());
            return check;
        }
        if self.records_of(domain, SPF_VERSION).await > 1 {
            // mail-auth would take the first record that parses.
            check.result = SpfResult::PermError;
            check.detail = Some("several SPF records (RFC 7208 §4.5)".to_string());
            return check;
        }
        let params = match identity {
            SpfIdentity::MailFrom => {
                SpfParameters::verify_mail_from(client_ip, helo, SPF_HOST_DOMAIN, subject)
            }
            SpfIdentity::Helo => SpfParameters::verify_ehlo(client_ip, helo, SPF_HOST_DOMAIN),
        };
        let budget = self.check_deadline();
        let voids = VoidCount::default();
        let caches = self.caches();
        let (txt, mx) = (
            voids.watch(&caches.txt, Kind::Other),
            voids.watch(&caches.mx, Kind::Other),
        );
        let (ipv4, ipv6) = (
            voids.watch(&caches.ipv4, Kind::Ipv4),
            voids.watch(&caches.ipv6, Kind::Ipv6),
        );
        let ptr = voids.watch(&caches.ptr, Kind::Other);
        let params = Parameters::new(params)
            .with_txt_cache(&txt)
            .with_mx_cache(&mx)
            .with_ipv4_cache(&ipv4)
            .with_ipv6_cache(&ipv6)
            .with_ptr_cache(&ptr);
        let evaluation = self.authenticator().check_host(params);
        match timeout(budget, evaluation).await {
            Ok(output)
                if output.result() != LibSpf::TempError && voids.total() > MAX_VOID_LOOKUPS =>
            {
                check.result = SpfResult::PermError;
                check.detail = Some(format!(
                    "more than {MAX_VOID_LOOKUPS} void lookups (RFC 7208 §4.6.4)"
                ));
            }
            Ok(output) => {
                check.result = spf_result(output.result());
                check.detail = match check.result {
                    SpfResult::TempError => Some("a DNS lookup failed".to_string()),
                    SpfResult::PermError => Some(
                        "the SPF record is malformed or exceeds the RFC 7208 §4.6.4 limits"
                            .to_string(),
                    ),
                    _ => output.explanation().map(printable),
                };
            }
            Err(_) => {
                check.result = SpfResult::TempError;
                check.detail = Some(format!("no result within {budget:?}"));
            }
        }
        check
    }

    /// iprev (RFC 8601 §3): the client's PTR names (the first two), each resolved forward;
    /// pass when one resolves back to `client_ip`. No PTR name (NXDOMAIN) is a fail.
    pub async fn iprev(&self, client_ip: IpAddr) -> IprevCheck {
        let lookup = self
            .authenticator()
            .verify_iprev(self.caches().parameters(client_ip));
        let Ok(output) = timeout(self.check_deadline(), lookup).await else {
            return IprevCheck {
                result: IprevResult::TempError,
                name: None,
            };
        };
        let result = match &output.result {
            LibIprev::Pass => IprevResult::Pass,
            LibIprev::Fail(_)
            | LibIprev::PermError(AuthError::Dns(DnsError::RecordNotFound(_))) => IprevResult::Fail,
            LibIprev::TempError(_) => IprevResult::TempError,
            LibIprev::PermError(_) => IprevResult::PermError,
            LibIprev::None => IprevResult::None,
        };
        let names: Vec<&str> = output
            .ptr
            .as_deref()
            .map(|names| names.iter().map(|n| &**n).collect())
            .unwrap_or_default();
        let confirmed = names.iter().take(2).find(|name| {
            let key = name.to_fqdn();
            match client_ip {
                IpAddr::V4(ip) => self
                    .caches()
                    .ipv4
                    .get(key.as_ref())
                    .is_some_and(|set| set.rrset.contains(&ip)),
                IpAddr::V6(ip) => self
                    .caches()
                    .ipv6
                    .get(key.as_ref())
                    .is_some_and(|set| set.rrset.contains(&ip)),
            }
        });
        let name = match result {
            IprevResult::Pass => confirmed.or(names.first()),
            _ => names.first(),
        };
        IprevCheck {
            result,
            name: name.map(|n| printable(n.trim_end_matches('.'))),
        }
    }

    /// DKIM, ARC and DMARC for `message` (the raw message: header section and body, CRLF, as
    /// it will be sent, our own `Received:` included).
    ///
    /// DKIM (RFC 6376) checks every signature when `facts.dkim || facts.dmarc`; one that
    /// verifies with `rsa-sha1` or an RSA key under 1024 bits is `policy`, never a pass, for
    /// DMARC too (RFC 8301 §3.1–3.2). ARC (RFC 8617) is validated alongside. DMARC (RFC 7489,
    /// as mail-auth 0.13 evaluates it) runs when `facts.dmarc` and the message has exactly one
    /// `From:` domain. All lookups share one [`Resolver::check_deadline`]; what runs out of
    /// it is a temperror.
    ///
    /// CPU: parsing hashes the whole body once per canonicalization (about 2–4 ms per MB);
    /// on a multi-threaded runtime that part runs under `block_in_place`, so other sessions
    /// move to another worker meanwhile.
    pub async fn authenticate(&self, message: &[u8], facts: MessageFacts<'_>) -> MessageChecks {
        let run_dkim = facts.dkim || facts.dmarc;
        let Some(mut parsed) = parse_off_reactor(message) else {
            return MessageChecks {
                dkim: Vec::new(),
                arc: run_dkim.then(|| ArcCheck {
                    result: ArcResult::PermError,
                    instances: 0,
                    detail: Some("the message has no header section".to_string()),
                }),
                dmarc: None,
                from: FromDomain::Missing,
            };
        };
        let from = from_domain(parsed.headers.iter().copied());
        if !run_dkim {
            return MessageChecks {
                dkim: Vec::new(),
                arc: None,
                dmarc: None,
                from,
            };
        }
        // Each signature on its own deadline, all at once: one whose key lookup never
        // answers is a temperror by itself and cannot make the others (an aligned one that
        // fails, say) temperrors too. Past MAX_SIGNATURES, signatures are not looked at.
        parsed.dkim_headers.truncate(MAX_SIGNATURES);
        let singles: Vec<AuthenticatedMessage<'_>> = parsed
            .dkim_headers
            .iter()
            .map(|header| AuthenticatedMessage {
                dkim_headers: vec![header.clone()],
                errors: Vec::new(),
                ..parsed.clone()
            })
            .collect();
        let deadline = Instant::now() + self.check_deadline();
        let outputs = join_all(singles.iter().map(|one| self.verify_one(one, deadline))).await;
        let (dkim, for_dmarc) = self.judge_signatures(&parsed, &outputs, deadline).await;
        let arc = Some(self.arc(&parsed).await);
        let (from, dmarc) = match (from, facts.dmarc) {
            (FromDomain::One(domain), true) => {
                match self.dmarc(&parsed, &for_dmarc, &facts, &domain).await {
                    Some(check) => (FromDomain::One(domain), Some(check)),
                    // mail-auth found other From: domains than we did: refused as several.
                    None => (FromDomain::Several, None),
                }
            }
            (from, _) => (from, None),
        };
        MessageChecks {
            dkim,
            arc,
            dmarc,
            from,
        }
    }

    /// Our result for each signature, in header order, and mail-auth's outputs with the
    /// RFC 8301 ones no longer passing (for DMARC's DKIM side).
    async fn judge_signatures<'x>(
        &self,
        parsed: &'x AuthenticatedMessage<'x>,
        outputs: &[DkimOutput<'x>],
        deadline: Instant,
    ) -> (Vec<DkimCheck>, Vec<DkimOutput<'x>>) {
        let mut checks = Vec::new();
        let mut for_dmarc = Vec::new();
        for (header, output) in parsed.dkim_headers.iter().zip(outputs) {
            let signature = &header.header;
            let (result, detail) = self.judge_signature(output, signature, deadline).await;
            if result == DkimResult::Policy {
                let refused = AuthError::Dkim(DkimError::UnsupportedAlgorithm);
                for_dmarc.push(DkimOutput::fail(refused).with_signature(signature));
            } else if result == DkimResult::TempError {
                // Never a pass for DMARC, whatever mail-auth said (the key size unknown).
                for_dmarc.push(DkimOutput::temp_err(deadline_error()).with_signature(signature));
            } else {
                for_dmarc.push(output.clone());
            }
            let check = DkimCheck {
                result,
                domain: printable(&signature.d.to_ascii_lowercase()),
                selector: printable(&signature.s),
                algorithm: algorithm_name(signature.a).to_string(),
                b: b_prefix(header.value),
                detail,
            };
            checks.push((offset_in(parsed.raw_message, header.value), check));
        }
        for header in &parsed.errors {
            if !is_field(header.name, "dkim-signature") {
                continue;
            }
            if checks.len() >= MAX_SIGNATURES {
                break;
            }
            let (result, detail) = match &header.header {
                AuthError::Dkim(DkimError::SignatureLength) => (
                    DkimResult::Policy,
                    "l= (a signed body length) is not accepted".to_string(),
                ),
                err => (DkimResult::PermError, format!("malformed signature: {err}")),
            };
            let check = DkimCheck {
                result,
                domain: tag(header.value, "d").unwrap_or_default(),
                selector: tag(header.value, "s").unwrap_or_default(),
                algorithm: tag(header.value, "a").unwrap_or_default(),
                b: b_prefix(header.value),
                detail: Some(detail),
            };
            checks.push((offset_in(parsed.raw_message, header.value), check));
        }
        checks.sort_by_key(|(position, _)| *position);
        (checks.into_iter().map(|(_, c)| c).collect(), for_dmarc)
    }

    /// One signature's result from mail-auth's, with RFC 8301 applied.
    async fn judge_signature(
        &self,
        output: &DkimOutput<'_>,
        signature: &Signature,
        deadline: Instant,
    ) -> (DkimResult, Option<String>) {
        let rsa = matches!(signature.a, Algorithm::RsaSha1 | Algorithm::RsaSha256);
        match output.result() {
            LibDkim::Pass if signature.a == Algorithm::RsaSha1 => (
                DkimResult::Policy,
                Some("rsa-sha1 is not accepted (RFC 8301 §3.1)".to_string()),
            ),
            LibDkim::Pass | LibDkim::Fail(AuthError::Crypto(_)) if rsa => {
                let passed = matches!(output.result(), LibDkim::Pass);
                match self.rsa_key_bits(signature, deadline).await {
                    Some(bits) if bits < 1024 => (
                        DkimResult::Policy,
                        Some(format!(
                            "RSA key of {bits} bits, under 1024 (RFC 8301 §3.2)"
                        )),
                    ),
                    Some(_) => plain_dkim(output.result()),
                    None if passed => (
                        DkimResult::TempError,
                        Some("the key could not be looked up again for its size".to_string()),
                    ),
                    None => plain_dkim(output.result()),
                }
            }
            result => plain_dkim(result),
        }
    }

    /// The size of the RSA key at the signature's selector (cached by the verification).
    async fn rsa_key_bits(&self, signature: &Signature, deadline: Instant) -> Option<usize> {
        let lookup = self
            .authenticator()
            .txt_lookup::<DomainKey>(signature.domain_key(), Some(&self.caches().txt));
        let key = timeout_at(deadline, lookup).await.ok()?.ok()?;
        Some(key.p.public_key_bits())
    }

    async fn arc(&self, parsed: &AuthenticatedMessage<'_>) -> ArcCheck {
        let deadline = Instant::now() + self.check_deadline();
        let instances = parsed
            .as_headers
            .iter()
            .map(|h| h.header.i)
            .max()
            .unwrap_or(0);
        let validation = self
            .authenticator()
            .verify_arc(self.caches().parameters(parsed));
        let Ok(output) = timeout_at(deadline, validation).await else {
            return ArcCheck {
                result: ArcResult::TempError,
                instances,
                detail: Some(deadline_error().to_string()),
            };
        };
        let (result, detail) = match output.result() {
            LibDkim::Pass => (ArcResult::Pass, None),
            LibDkim::None => (ArcResult::None, None),
            LibDkim::Fail(e) | LibDkim::Neutral(e) => (ArcResult::Fail, Some(e.to_string())),
            LibDkim::TempError(e) => (ArcResult::TempError, Some(e.to_string())),
            LibDkim::PermError(e) => (ArcResult::PermError, Some(e.to_string())),
        };
        ArcCheck {
            result,
            instances,
            detail,
        }
    }

    async fn dmarc<'x>(
        &self,
        parsed: &'x AuthenticatedMessage<'x>,
        dkim: &'x [DkimOutput<'x>],
        facts: &MessageFacts<'x>,
        from_domain: &str,
    ) -> Option<DmarcCheck> {
        let deadline = Instant::now() + self.check_deadline();
        let own = facts
            .own_domains
            .iter()
            .map(|d| d.trim_end_matches('.'))
            .any(|d| is_same_or_subdomain(from_domain, d));
        if self
            .records_of(&format!("_dmarc.{from_domain}"), DMARC_VERSION)
            .await
            > 1
        {
            // RFC 7489 §6.6.3: several records, no policy (mail-auth would use the first).
            let check = DmarcCheck {
                result: DmarcResult::PermError,
                domain: from_domain.to_string(),
                policy: DmarcPolicy::None,
                own_domain: false,
                detail: Some("several DMARC records (RFC 7489 §6.6.3)".to_string()),
            };
            return Some(own_domain_policy(check, own));
        }
        let spf = SpfOutput::new(facts.mail_from_domain.to_string()).with_result(
            facts
                .spf
                .map_or(LibSpf::None, |check| lib_spf_result(check.result)),
        );
        let params = DmarcParameters::new(parsed, dkim, facts.mail_from_domain, &spf);
        let evaluation = self
            .authenticator()
            .verify_dmarc(self.caches().parameters(params));
        let check = match timeout_at(deadline, evaluation).await {
            Ok(output) if output.domain() != from_domain => {
                // mail-auth reads the From: domains otherwise (it compares them as written):
                // no DMARC verdict, which must not pass for one.
                return None;
            }
            Ok(output) => DmarcCheck {
                result: match output.result() {
                    LibDmarc::Pass => DmarcResult::Pass,
                    LibDmarc::Fail(_) => DmarcResult::Fail,
                    LibDmarc::TempError(_) => DmarcResult::TempError,
                    LibDmarc::PermError(_) => DmarcResult::PermError,
                    LibDmarc::None => DmarcResult::None,
                },
                domain: from_domain.to_string(),
                policy: match output.policy() {
                    Policy::Reject => DmarcPolicy::Reject,
                    Policy::Quarantine => DmarcPolicy::Quarantine,
                    Policy::None | Policy::Unspecified => DmarcPolicy::None,
                },
                own_domain: false,
                detail: Some(format!(
                    "spf: {}; dkim: {}",
                    output.spf_result(),
                    output.dkim_result()
                )),
            },
            Err(_) => DmarcCheck {
                result: DmarcResult::TempError,
                domain: from_domain.to_string(),
                policy: DmarcPolicy::None,
                own_domain: false,
                detail: Some(deadline_error().to_string()),
            },
        };
        Some(own_domain_policy(check, own))
    }

    /// How many TXT records at `name` are records of `version` (an SPF or DMARC record: RFC
    /// 7208 §4.5 and RFC 7489 §6.6.3 make more than one an error, where mail-auth would take
    /// the first that parses). A lookup that fails counts none: the check itself then meets
    /// the same trouble.
    async fn records_of(&self, name: &str, version: &[u8]) -> usize {
        let Ok(name) = Name::from_str_relaxed(name.to_fqdn().as_ref()) else {
            return 0;
        };
        let lookup = self.authenticator().resolver().txt_lookup(name);
        let Ok(Ok(answers)) = timeout(self.timeout(), lookup).await else {
            return 0;
        };
        answers
            .answers()
            .iter()
            .filter(|record| match &record.data {
                RData::TXT(txt) => {
                    let text: Vec<u8> = txt
                        .txt_data
                        .iter()
                        .flat_map(|s| s.iter().copied())
                        .collect();
                    is_record_of(&text, version)
                }
                _ => false,
            })
            .count()
    }

    /// mail-auth's verification of the one signature of `one`, by `deadline`.
    async fn verify_one<'x>(
        &'x self,
        one: &'x AuthenticatedMessage<'x>,
        deadline: Instant,
    ) -> DkimOutput<'x> {
        let timed_out =
            || DkimOutput::temp_err(deadline_error()).with_signature(&one.dkim_headers[0].header);
        let verification = self
            .authenticator()
            .verify_dkim(self.caches().parameters(one));
        match timeout_at(deadline, verification).await {
            Ok(mut outputs) => outputs.pop().unwrap_or_else(timed_out),
            Err(_) => timed_out(),
        }
    }
}

/// DKIM signatures verified per message (in header order), and malformed ones recorded: the
/// rest are ignored, so a message of thousands of signatures costs no more than this many key
/// lookups and verifications, and our `Authentication-Results:` stays short.
pub const MAX_SIGNATURES: usize = 8;

/// RFC 7208 §4.6.4: void lookups (NXDOMAIN or no answer) one SPF check may make.
pub const MAX_VOID_LOOKUPS: u32 = 2;

/// Which cache a lookup went through (an `exists:` reads the A cache, then the AAAA cache).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Ipv4,
    Ipv6,
    Other,
}

/// Counts the void lookups of one SPF check as mail-auth's lookups go through the caches,
/// since mail-auth does not limit them. A cached answer that is empty or NXDOMAIN is void; a
/// cache miss that no answer follows (mail-auth caches every answer it gets) is void too,
/// except for `exists:`, whose answer mail-auth never caches (a miss in the A cache then in
/// the AAAA cache): those are not counted, so this never counts a lookup that answered.
#[derive(Debug, Default)]
struct VoidCount {
    state: std::sync::Mutex<VoidState>,
}

#[derive(Debug, Default)]
struct VoidState {
    voids: u32,
    /// A miss not yet followed by an answer.
    pending: Option<Kind>,
}

impl VoidCount {
    fn watch<'a, C>(&'a self, cache: &'a C, kind: Kind) -> Watched<'a, C> {
        Watched {
            cache,
            count: self,
            kind,
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, VoidState> {
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Void lookups so far, a last unanswered miss included.
    fn total(&self) -> u32 {
        let state = self.lock();
        state.voids + u32::from(state.pending.is_some())
    }

    fn looked_up(&self, kind: Kind, found: Option<bool>) {
        let mut state = self.lock();
        match (state.pending.take(), kind) {
            // exists: the same name in the AAAA cache after the A cache; answer unknown.
            (Some(Kind::Ipv4), Kind::Ipv6) => return,
            (Some(_), _) => state.voids += 1,
            (None, _) => {}
        }
        match found {
            Some(true) => state.voids += 1,
            Some(false) => {}
            None => state.pending = Some(kind),
        }
    }

    fn answered(&self, void: bool) {
        let mut state = self.lock();
        state.pending = None;
        state.voids += u32::from(void);
    }
}

/// An answer that says nothing exists (RFC 7208 §4.6.4 "void").
trait Void {
    fn is_void(&self) -> bool;
}

impl Void for Txt {
    fn is_void(&self) -> bool {
        matches!(
            self,
            Txt::Error(AuthError::Dns(DnsError::RecordNotFound(_)))
        )
    }
}

impl<T> Void for RecordSet<T> {
    fn is_void(&self) -> bool {
        self.rrset.is_empty()
    }
}

/// A cache whose reads and writes are counted by a [`VoidCount`].
struct Watched<'a, C> {
    cache: &'a C,
    count: &'a VoidCount,
    kind: Kind,
}

impl<K, V: Void, C: ResolverCache<K, V>> ResolverCache<K, V> for Watched<'_, C> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        let value = self.cache.get(name);
        self.count
            .looked_up(self.kind, value.as_ref().map(Void::is_void));
        value
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.cache.remove(name)
    }

    fn insert(&self, key: K, value: V, valid_until: std::time::Instant) {
        self.count.answered(value.is_void());
        self.cache.insert(key, value, valid_until);
    }
}

/// Parse (and hash the body of) `message`; on a multi-threaded runtime off the reactor.
fn parse_off_reactor(message: &[u8]) -> Option<AuthenticatedMessage<'_>> {
    let multi_thread = tokio::runtime::Handle::try_current()
        .is_ok_and(|h| h.runtime_flavor() == tokio::runtime::RuntimeFlavor::MultiThread);
    if multi_thread {
        tokio::task::block_in_place(|| AuthenticatedMessage::parse(message))
    } else {
        AuthenticatedMessage::parse(message)
    }
}

/// The `From:` domain (RFC 7489 §6.6.1) of a message whose header fields are `fields`
/// (name, value, as mail-auth splits them): the one DMARC judges and the one
/// [`super::sign::signers_for`] signs for, so that the relay never signs mail for a domain it
/// would not judge as that domain. The fields are counted here, since mail-auth merges the
/// addresses of every `From:` field into one list. An address without a domain, or whose
/// domain is not a host name as DMARC looks it up (a trailing dot, an empty or over-long
/// label, a domain literal, any octet outside letters, digits, `-` and `_` once in A-labels),
/// makes the whole field `Missing`: such a domain has no DMARC record to find, so it would
/// otherwise slip past enforcement.
pub(crate) fn from_domain<'x>(
    fields: impl IntoIterator<Item = (&'x [u8], &'x [u8])>,
) -> FromDomain {
    let mut from_fields = fields
        .into_iter()
        .filter(|(name, _)| is_field(name, "from"));
    let Some((_, value)) = from_fields.next() else {
        return FromDomain::Missing;
    };
    if from_fields.next().is_some() {
        return FromDomain::Several;
    }
    // The addresses as mail-auth reads them for DMARC (entries without one are skipped).
    let HeaderValue::Address(addresses) = MessageStream::new(value).parse_address() else {
        return FromDomain::Missing;
    };
    let mut domains = Vec::new();
    for address in addresses.iter().filter_map(|a| a.address.as_deref()) {
        let Some((_, domain)) = address.rsplit_once('@') else {
            return FromDomain::Missing;
        };
        let domain = to_a_label(&domain.to_lowercase()).to_ascii_lowercase();
        if !is_host_name(&domain) {
            return FromDomain::Missing;
        }
        domains.push(domain);
    }
    domains.sort();
    domains.dedup();
    match domains.len() {
        0 => FromDomain::Missing,
        1 => FromDomain::One(domains.remove(0)),
        _ => FromDomain::Several,
    }
}

/// `[dmarc] own_domains = "reject"`: a From: domain of ours (or a subdomain of one, as a
/// published `p=reject` covers subdomains without a record of their own through `sp`) is
/// judged as if it published p=reject. No record, or an unusable one, then means a failure;
/// a DNS trouble stays a temperror.
fn own_domain_policy(mut check: DmarcCheck, own: bool) -> DmarcCheck {
    if own && check.result != DmarcResult::Pass {
        if matches!(check.result, DmarcResult::None | DmarcResult::PermError) {
            check.result = DmarcResult::Fail;
        }
        check.policy = DmarcPolicy::Reject;
        check.own_domain = true;
    }
    check
}

/// `domain` is `parent` or a name under it (both lower-case A-labels).
fn is_same_or_subdomain(domain: &str, parent: &str) -> bool {
    let (domain, parent) = (domain.as_bytes(), parent.as_bytes());
    match domain.len().checked_sub(parent.len()) {
        Some(0) => domain.eq_ignore_ascii_case(parent),
        Some(dot) => domain[dot - 1] == b'.' && domain[dot..].eq_ignore_ascii_case(parent),
        None => false,
    }
}

/// The version tag an SPF record starts with (RFC 7208 §4.5).
const SPF_VERSION: &[u8] = b"v=spf1";
/// The version tag a DMARC record starts with (RFC 7489 §6.4).
const DMARC_VERSION: &[u8] = b"v=DMARC1";

/// A TXT record that starts with `version` (in any case), alone or followed by white space
/// or, for DMARC's tag list, `;`.
fn is_record_of(text: &[u8], version: &[u8]) -> bool {
    text.len() >= version.len()
        && text[..version.len()].eq_ignore_ascii_case(version)
        && text
            .get(version.len())
            .is_none_or(|&b| b == b' ' || b == b'\t' || b == b';')
}

/// A host name in A-labels (RFC 1123 §2.1, `_` allowed as DNS allows it): 1 to 63 octets per
/// label, at most 253 in all, at least two labels, no trailing dot.
fn is_host_name(domain: &str) -> bool {
    domain.len() <= 253
        && domain.contains('.')
        && domain.split('.').all(|label| {
            (1..=63).contains(&label.len())
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        })
}

/// A field name, white space inside it ignored (mail-auth reads `F r o m` as From).
fn is_field(name: &[u8], expected: &str) -> bool {
    let name: Vec<u8> = name
        .iter()
        .copied()
        .filter(|b| !b.is_ascii_whitespace())
        .collect();
    name.eq_ignore_ascii_case(expected.as_bytes())
}

fn plain_dkim(result: &LibDkim) -> (DkimResult, Option<String>) {
    match result {
        LibDkim::Pass => (DkimResult::Pass, None),
        // RFC 6376 §6.1.3: a body hash that does not verify is a failed signature.
        LibDkim::Neutral(e @ AuthError::Dkim(DkimError::FailedBodyHashMatch)) => {
            (DkimResult::Fail, Some(e.to_string()))
        }
        LibDkim::Neutral(e) => (DkimResult::Neutral, Some(e.to_string())),
        LibDkim::Fail(e) => (DkimResult::Fail, Some(e.to_string())),
        LibDkim::PermError(e) => (DkimResult::PermError, Some(e.to_string())),
        LibDkim::TempError(e) => (DkimResult::TempError, Some(e.to_string())),
        LibDkim::None => (DkimResult::PermError, Some("no result".to_string())),
    }
}

fn spf_result(result: LibSpf) -> SpfResult {
    match result {
        LibSpf::Pass => SpfResult::Pass,
        LibSpf::Fail => SpfResult::Fail,
        LibSpf::SoftFail => SpfResult::SoftFail,
        LibSpf::Neutral => SpfResult::Neutral,
        LibSpf::TempError => SpfResult::TempError,
        LibSpf::PermError => SpfResult::PermError,
        LibSpf::None => SpfResult::None,
    }
}

fn lib_spf_result(result: SpfResult) -> LibSpf {
    match result {
        SpfResult::Pass => LibSpf::Pass,
        SpfResult::Fail => LibSpf::Fail,
        SpfResult::SoftFail => LibSpf::SoftFail,
        SpfResult::Neutral => LibSpf::Neutral,
        SpfResult::TempError => LibSpf::TempError,
        SpfResult::PermError => LibSpf::PermError,
        SpfResult::None => LibSpf::None,
    }
}

fn algorithm_name(algorithm: Algorithm) -> &'static str {
    match algorithm {
        Algorithm::RsaSha1 => "rsa-sha1",
        Algorithm::RsaSha256 => "rsa-sha256",
        Algorithm::Ed25519Sha256 => "ed25519-sha256",
    }
}

fn deadline_error() -> AuthError {
    AuthError::Dns(DnsError::Resolver(
        "the check ran out of its deadline".to_string(),
    ))
}

/// Where `part` (a slice of `message`) starts in it; past the end if it is not inside.
fn offset_in(message: &[u8], part: &[u8]) -> usize {
    (part.as_ptr() as usize)
        .checked_sub(message.as_ptr() as usize)
        .unwrap_or(usize::MAX)
}

/// A tag's value from a DKIM-Signature, read leniently (the signature may be malformed):
/// white space removed, printable ASCII only, at most [`MAX_TAG_CHARS`].
fn tag(value: &[u8], name: &str) -> Option<String> {
    value.split(|&b| b == b';').find_map(|part| {
        let eq = part.iter().position(|&b| b == b'=')?;
        let key = part[..eq].trim_ascii();
        key.eq_ignore_ascii_case(name.as_bytes()).then(|| {
            part[eq + 1..]
                .iter()
                .filter(|b| b.is_ascii_graphic())
                .take(MAX_TAG_CHARS)
                .map(|&b| char::from(b))
                .collect()
        })
    })
}

/// RFC 6008 `header.b`: the first 8 characters of `b=`.
fn b_prefix(value: &[u8]) -> String {
    tag(value, "b")
        .unwrap_or_default()
        .chars()
        .take(8)
        .collect()
}

/// `text` without control characters, at most [`MAX_TAG_CHARS`] characters (it came from a
/// stranger's DNS or message).
fn printable(text: &str) -> String {
    text.chars()
        .filter(|c| !c.is_control())
        .take(MAX_TAG_CHARS)
        .collect()
}

/// A name check_host can look up (RFC 7208 §4.3): not a domain literal, labels of 1–63
/// octets, at most 253 octets, no white space or control characters.
fn is_domain_name(domain: &str) -> bool {
    let domain = domain.strip_suffix('.').unwrap_or(domain);
    !domain.is_empty()
        && domain.len() <= 253
        && !domain.starts_with('[')
        && domain
            .split('.')
            .all(|label| !label.is_empty() && label.len() <= 63)
        && !domain.chars().any(|c| c.is_whitespace() || c.is_control())
}

#[cfg(test)]
mod tests;
