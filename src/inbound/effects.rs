//! The effect runner: carries out what a stage evaluator ([`crate::policy::stage`]) asks for
//! and hands the answer back, until the stage accepts or refuses.
//!
//! The session driver calls [`Effects::decide`] for every stage; it never orders checks
//! itself. Each [`Effect`] is carried out here once, whichever stage asks for it: rate
//! budgets and the AUTH lockout gate by the policy's [`crate::policy::store::Store`],
//! passwords by the [`super::verifier::Verifier`] pool, free space by the spool, DNS
//! lookups (DNSBL, iprev, SPF) and the message's verification by the snapshot's
//! [`Resolver`], DKIM signing off the reactor. State an effect leaves for a later stage (the
//! transaction's space reservation and SPF result, lookups started at one stage and read at
//! later ones, what the message's checks found) is kept in [`Effects`], one per session; the
//! AUTH attempt between the gate and the verification lives only as long as its stage.
//!
//! No DNS error stops a session: every lookup is bounded ([`check_deadline`]) and a failed
//! one answers what the policy counts it as (`temperror`, or "not listed" for a DNSBL).

use std::sync::Arc;
use std::time::Duration;

use tokio::task::JoinHandle;
use tokio::time::Instant;
use tracing::{Instrument, info, warn};

use super::Runtime;
use super::assembly::Assembly;
use super::connection::Shared;
use super::verifier::Lane;
use crate::cluster::store::{Attempt, Gate, SHARED_BUSY_POLL, SharedStore, Taken};
use crate::dns::Resolver;
use crate::dns::dnsbl::DnsblCheck;
use crate::dns::verify::{
    CHECK_DEADLINE_QUERIES, IprevCheck, IprevResult, MessageChecks, MessageFacts, SpfCheck,
    SpfResult,
};
use crate::envelope::ReversePath;
use crate::observe::Telemetry;
use crate::policy::Refusal;
use crate::policy::credentials::CheckError;
use crate::policy::limits::{Limited, RateLimit};
use crate::policy::lockout::{FailureReport, login_key};
use crate::policy::stage::{
    Answer, Effect, Evaluation, Input, Lookup, LookupResult, StageFacts, Verdict,
};
use crate::policy::store::RateKey;
use crate::queue::reserve::Reservation;

/// How long an AUTH waits for its client's verifications in flight before `454 4.7.0`, and
/// again how long it waits for its own verification to be run (rule `auth_busy` either way,
/// the failure budget given back): at most twice this in all.
pub const AUTH_WAIT: Duration = Duration::from_secs(10);

/// What one step of an evaluation works with.
#[derive(Clone, Copy)]
struct Step<'a> {
    runtime: &'a Runtime,
    shared: &'a Shared,
    facts: &'a StageFacts<'a>,
    /// The message, at the end-of-data stage.
    message: Option<&'a Assembly>,
}

/// Verifications of messages (DKIM, ARC, DMARC) in flight at once, per available core:
/// each holds a whole message in reach (mapped or, up to `KEEP_MAX`, in memory) and spends
/// CPU on hashes and signatures, so their number is bounded whatever the number of
/// sessions; twice the cores keeps the cores busy while some verifications wait for DNS.
/// A session finding no slot free waits for one, at most `[limits] data_timeout`, then
/// gets `451 4.3.0` (rule `mail_auth_busy`).
pub const VERIFICATIONS_PER_CORE: usize = 2;

/// The bound of [`VERIFICATIONS_PER_CORE`] on this machine.
pub fn verification_slots() -> usize {
    let cores = std::thread::available_parallelism().map_or(1, std::num::NonZeroUsize::get);
    cores * VERIFICATIONS_PER_CORE
}

/// What one session keeps between effects.
#[derive(Debug, Default)]
pub struct Effects {
    /// Free space held for the current transaction from MAIL to its end (see
    /// [`crate::queue::reserve`]).
    pub reservation: Option<Reservation>,
    /// Lookups started at one stage and read at later ones.
    lookups: Lookups,
    /// SPF of the current transaction (checked at MAIL), until RSET or the next MAIL.
    spf: Option<SpfCheck>,
    /// What the current message's verification found, until the message is done.
    message: Option<Box<MessageChecks>>,
    /// The current message's `DKIM-Signature:` fields, until the message is done.
    signatures: Option<String>,
}

impl Effects {
    /// Evaluate the stage `facts` are about ([`Input::stage`]) to its verdict, carrying out
    /// every effect it asks for.
    ///
    /// # Errors
    /// The [`Refusal`] of the check that refused.
    pub async fn decide(
        &mut self,
        runtime: &Runtime,
        shared: &Shared,
        facts: &StageFacts<'_>,
    ) -> Result<(), Refusal> {
        let evaluation = Evaluation::new(facts.input.stage());
        self.decide_with(evaluation, runtime, shared, facts).await
    }

    /// [`Effects::decide`] for the end-of-data stage of `message`, whose bytes the
    /// verification and signing effects read.
    pub async fn decide_message(
        &mut self,
        runtime: &Runtime,
        shared: &Shared,
        facts: &StageFacts<'_>,
        message: &Assembly,
    ) -> Result<(), Refusal> {
        let evaluation = Evaluation::new(facts.input.stage());
        let step = Step {
            runtime,
            shared,
            facts,
            message: Some(message),
        };
        self.run(evaluation, step).await
    }

    /// [`Effects::decide`] with an evaluation of the caller's (a list of checks of its own).
    pub(super) async fn decide_with(
        &mut self,
        evaluation: Evaluation,
        runtime: &Runtime,
        shared: &Shared,
        facts: &StageFacts<'_>,
    ) -> Result<(), Refusal> {
        let step = Step {
            runtime,
            shared,
            facts,
            message: None,
        };
        self.run(evaluation, step).await
    }

    async fn run(&mut self, mut evaluation: Evaluation, step: Step<'_>) -> Result<(), Refusal> {
        let mut answer = None;
        // The AUTH attempt the gate let through, until its password is verified: it lives
        // only as long as the stage (dropped unsettled, it counts as a failure).
        let mut attempt = None;
        loop {
            match step
                .runtime
                .policy
                .evaluate(&mut evaluation, step.facts, answer.take())
            {
                Verdict::Accept => return Ok(()),
                Verdict::Refuse(refusal) => return Err(refusal),
                Verdict::Effect(effect) => {
                    answer = Some(self.carry_out(effect, step, &mut attempt).await);
                }
            }
        }
    }

    async fn carry_out(
        &mut self,
        effect: Effect,
        step: Step<'_>,
        attempt: &mut Option<Attempt>,
    ) -> Answer {
        let Step {
            runtime,
            shared,
            facts,
            ..
        } = step;
        let store = runtime.policy.store();
        let now = Instant::now().into_std();
        match effect {
            Effect::Rate(limit, key) => {
                let stores = SharedStore::new(store, shared.cluster.as_ref());
                match stores.take(limit, &key, now).await {
                    Taken::Allowed => Answer::Allowed,
                    Taken::Limited(limited) => {
                        rate_limited(runtime, shared, limited, (limit, &key)).await
                    }
                    Taken::Unavailable => Answer::Unavailable,
                }
            }
            Effect::AuthGate { login } => auth_gate(runtime, shared, facts, &login, attempt).await,
            Effect::VerifyPassword { hash, known } => {
                let Input::Auth { login, password } = facts.input else {
                    return Answer::Busy;
                };
                let attempt = attempt.take().unwrap_or_else(Attempt::unguarded);
                let password = password.to_string();
                let ip = facts.session.client_ip;
                let who = Who { runtime, login, ip };
                verify(shared, attempt, (hash, known), who, password).await
            }
            Effect::RecipientDomain => {
                let (Some(login), Input::Rcpt(r)) = (facts.session.user, &facts.input) else {
                    return Answer::Allowed;
                };
                let settings = &runtime.config.containment;
                let containment = &shared.containment;
                match containment.recipient(settings, login, r.to.domain(), now) {
                    Some(trip) => {
                        containment.suspend(login, trip).await;
                        Answer::Suspended
                    }
                    None => Answer::Allowed,
                }
            }
            Effect::ReserveSpace { bytes } => self.reserve(runtime, shared, bytes),
            Effect::Start(lookup) => {
                let (resolver, zones) = (runtime.resolver.clone(), zones(runtime, lookup));
                let telemetry = Arc::clone(&shared.telemetry);
                (self.lookups).start(lookup, resolver, telemetry, zones, facts.session.client_ip);
                Answer::Allowed
            }
            Effect::Await(lookup) => Answer::Looked(self.lookups.finish(lookup).await),
            Effect::Spf => self.spf(runtime, &shared.telemetry, facts).await,
            Effect::Authenticate { dmarc } => self.authenticate(step, dmarc).await,
            Effect::Sign => self.sign(step).await,
        }
    }

    /// SPF of the transaction: the reverse-path, or the HELO name for `<>`; kept for the
    /// transaction.
    async fn spf(
        &mut self,
        runtime: &Runtime,
        telemetry: &Telemetry,
        facts: &StageFacts<'_>,
    ) -> Answer {
        let Input::Mail { from, helo, .. } = facts.input else {
            return Answer::Allowed;
        };
        let check = spf_check(
            runtime.resolver.as_ref(),
            telemetry,
            facts.session.client_ip,
            helo,
            from,
        )
        .await;
        self.spf = Some(check.clone());
        Answer::Spf(check)
    }

    /// DKIM, ARC and (when `dmarc`) DMARC of the message, in one of the bounded
    /// verification slots ([`verification_slots`]); what it found is kept for the message.
    async fn authenticate(&mut self, step: Step<'_>, dmarc: bool) -> Answer {
        let (Some(assembly), Input::DataEnd(end)) = (step.message, &step.facts.input) else {
            return Answer::Allowed;
        };
        let Some(resolver) = &step.runtime.resolver else {
            return Answer::AuthenticationBusy;
        };
        // The wait for a slot and the verification together: at most the data timeout (the
        // dns functions bound each check; this is the backstop).
        let until = Instant::now() + step.runtime.config.limits.data_timeout;
        let slots = &step.shared.verifications;
        let Ok(Ok(_slot)) = tokio::time::timeout_at(until, slots.acquire()).await else {
            return Answer::AuthenticationBusy;
        };
        let bytes = match assembly.message() {
            Ok(bytes) => bytes,
            Err(e) => {
                warn!(error = %e, "cannot read the message back for verification");
                return Answer::AuthenticationBusy;
            }
        };
        let config = &step.runtime.config;
        let own_domains: &[String] = if config.dmarc.own_domains_reject {
            &config.relay.accepted_domains
        } else {
            &[]
        };
        let mail_from_domain = match end.transaction.from {
            ReversePath::Address(a) => a.domain(),
            ReversePath::Null => end.helo,
        };
        let facts = MessageFacts {
            client_ip: step.facts.session.client_ip,
            helo: end.helo,
            mail_from_domain,
            spf: self.spf.as_ref(),
            dkim: true,
            dmarc,
            own_domains,
        };
        let Ok(checks) = tokio::time::timeout_at(until, resolver.authenticate(&bytes, facts)).await
        else {
            warn!("message verification did not finish within the data timeout");
            return Answer::AuthenticationBusy;
        };
        count_dns_errors(&step.shared.telemetry, &checks);
        self.message = Some(Box::new(checks.clone()));
        Answer::Authenticated(Box::new(checks))
    }

    /// Sign the message with the `[[dkim.sign]]` entries of its `From:` domain, off the
    /// reactor; the fields are kept for the message.
    async fn sign(&mut self, step: Step<'_>) -> Answer {
        let Some(assembly) = step.message else {
            return Answer::Allowed;
        };
        let bytes = match assembly.message() {
            Ok(bytes) => bytes,
            Err(e) => {
                return Answer::SignFailed(crate::dns::sign::SignError::Failed {
                    domain: String::new(),
                    selector: String::new(),
                    reason: format!("cannot read the message back: {e}"),
                });
            }
        };
        let entries: Vec<crate::config::DkimSign> =
            crate::dns::sign::signers_for(&bytes, &step.runtime.config.dkim.sign)
                .into_iter()
                .cloned()
                .collect();
        if entries.is_empty() {
            return Answer::Signed(0);
        }
        let count = entries.len();
        let signed = tokio::task::spawn_blocking(move || {
            let entries: Vec<&crate::config::DkimSign> = entries.iter().collect();
            crate::dns::sign::sign(&bytes, &entries)
        })
        .await;
        match signed {
            Ok(Ok(fields)) => {
                self.signatures = Some(fields);
                Answer::Signed(count)
            }
            Ok(Err(e)) => Answer::SignFailed(e),
            Err(e) => Answer::SignFailed(crate::dns::sign::SignError::Failed {
                domain: String::new(),
                selector: String::new(),
                reason: format!("signing task failed: {e}"),
            }),
        }
    }

    /// What the message's checks left to put above it: the `DKIM-Signature:` fields of a
    /// signed message, or, for untrusted mail (`session`), our `Authentication-Results:`
    /// (when a check ran) and the quarantine field. `queue_id` is logged with the results.
    pub async fn message_fields(
        &mut self,
        runtime: &Runtime,
        session: &crate::policy::SessionFacts<'_>,
        queue_id: &str,
    ) -> String {
        if let Some(signatures) = self.signatures.take() {
            return signatures;
        }
        // A client that authenticated after connect may have an iprev result: not recorded.
        if !runtime.policy.untrusted(session) {
            return String::new();
        }
        let client_ip = session.client_ip;
        let message = self.message.take();
        let iprev = match self.lookups.finish(Lookup::Iprev).await {
            LookupResult::Iprev(check) => Some(check),
            _ => None,
        };
        if self.spf.is_none() && message.is_none() && iprev.is_none() {
            return String::new();
        }
        log_results(
            queue_id,
            self.spf.as_ref(),
            iprev.as_ref(),
            message.as_deref(),
        );
        let recorded = crate::dns::results::Recorded {
            authserv_id: &runtime.config.server.authserv_id,
            client_ip,
            spf: self.spf.as_ref(),
            iprev: iprev.as_ref(),
            message: message.as_deref(),
        };
        let mut fields = crate::dns::results::authentication_results(&recorded);
        if let Some(quarantine) = message.and_then(|m| runtime.policy.quarantine_field(&m)) {
            info!(
                queue_id,
                rule = "dmarc",
                "DMARC quarantine: marked with the quarantine header"
            );
            fields.push_str(&quarantine);
        }
        fields
    }

    /// The transaction is over (RSET, refused, or its message done or refused): its space
    /// reservation, if the assembly did not take it, is given back.
    pub fn transaction_ended(&mut self) {
        self.reservation = None;
        self.spf = None;
        self.message_ended();
    }

    /// The message is done (committed or refused): what its checks found is dropped; the
    /// transaction's SPF result stays until the transaction ends.
    pub fn message_ended(&mut self) {
        self.message = None;
        self.signatures = None;
    }

    /// Lookups started and not yet finished.
    #[cfg(test)]
    pub(super) fn pending_lookups(&self) -> usize {
        self.lookups
            .0
            .iter()
            .filter(|(_, p)| matches!(p, Pending::Running(_)))
            .count()
    }

    /// Hold `bytes` of spool space for the transaction (replacing any earlier reservation).
    fn reserve(&mut self, runtime: &Runtime, shared: &Shared, bytes: u64) -> Answer {
        self.reservation = None;
        let min_free = runtime.config.limits.min_free_space;
        match shared.spool.reserve(bytes, min_free) {
            Ok(Ok(reservation)) => {
                self.reservation = Some(reservation);
                Answer::Allowed
            }
            Ok(Err(short)) => Answer::NoSpace(short),
            Err(e) => Answer::SpaceUnknown(e),
        }
    }
}

/// The AUTH gate: a locked-out client is answered at once; while the client's failure
/// budget is held by verifications in flight, wait until one ends (every attempt of this
/// node that ends wakes the waiters, see [`crate::policy::lockout::AuthGuard::settled`];
/// one held on the shared store, possibly by another node, is asked again every
/// [`SHARED_BUSY_POLL`]), for at most [`AUTH_WAIT`], then [`Answer::Busy`].
async fn auth_gate(
    runtime: &Runtime,
    shared: &Shared,
    facts: &StageFacts<'_>,
    login: &str,
    attempt: &mut Option<Attempt>,
) -> Answer {
    let store = runtime.policy.store();
    let stores = SharedStore::new(store, shared.cluster.as_ref());
    let deadline = Instant::now() + AUTH_WAIT;
    loop {
        // Registered before the check, so an attempt ending in between is not missed.
        let settled = store.auth_settled();
        tokio::pin!(settled);
        if let Some(settled) = settled.as_mut().as_pin_mut() {
            settled.enable();
        }
        let now = Instant::now().into_std();
        let poll = match stores.auth_gate(facts.session.client_ip, login, now).await {
            Gate::LockedOut => return Answer::LockedOut,
            Gate::Unavailable => return Answer::Unavailable,
            Gate::Proceed(proceed) => {
                *attempt = Some(proceed);
                return Answer::Allowed;
            }
            Gate::Busy { shared } => shared,
        };
        let Some(settled) = settled.as_pin_mut() else {
            return Answer::Busy;
        };
        if poll {
            // Not woken by this node's attempts ending: each would make every waiter ask
            // the store again at once (and its own gate's check wake the others).
            tokio::time::sleep_until(deadline.min(Instant::now() + SHARED_BUSY_POLL)).await;
        } else {
            let _ = tokio::time::timeout_at(deadline, settled).await;
        }
        if Instant::now() >= deadline {
            return Answer::Busy;
        }
    }
}

/// A spent budget: [`Answer::Limited`], unless it is a login's `messages_per_user` refusal
/// that trips `[containment] rate_limit_hits`: then the login is suspended
/// ([`Answer::Suspended`]).
async fn rate_limited(
    runtime: &Runtime,
    shared: &Shared,
    limited: Limited,
    budget: (RateLimit, &RateKey),
) -> Answer {
    if let (RateLimit::MessagesPerUser, RateKey::Login(login)) = budget {
        let settings = &runtime.config.containment;
        let now = Instant::now().into_std();
        if let Some(trip) = shared.containment.rate_limited(settings, login, now) {
            shared.containment.suspend(login, trip).await;
            return Answer::Suspended;
        }
    }
    Answer::Limited(limited)
}

/// Who an AUTH is from: the login and the client, under the configuration running now.
#[derive(Clone, Copy)]
struct Who<'a> {
    runtime: &'a Runtime,
    login: &'a str,
    ip: std::net::IpAddr,
}

/// Verify on the verifier pool, settle the attempt with the result, and answer no
/// sooner than the attempt's delay (a sprayed login). The right password of a suspended
/// login, or of one this login suspends (`[containment] client_ips_per_hour`), is answered
/// [`Answer::Suspended`] at the same moment, and its attempt given back uncounted: neither a
/// failure towards the lockout and spraying counters nor a success that clears them.
async fn verify(
    shared: &Shared,
    attempt: Attempt,
    (hash, known): (Arc<str>, bool),
    who: Who<'_>,
    password: String,
) -> Answer {
    let login = who.login;
    let lane = if attempt.known {
        Lane::Known
    } else {
        Lane::Other
    };
    let delay = attempt.delay;
    let answer_at = Instant::now() + delay;
    let Ok(mut result) = shared.verifier.submit(hash, password, login, lane) else {
        // Nothing was verified: the reservation is given back, not counted.
        attempt.release().await;
        return Answer::Busy;
    };
    // The wait for a verifier thread is bounded too: under a flood that outlasts
    // AUTH_WAIT, `454 4.7.0` now. The verification may already be running, so its
    // reservation is not given back here: it is kept until the result is known and then
    // recorded like any other (a failure counts), so a client cannot have more checks in
    // flight than the lockout allows by letting earlier ones time out.
    let Ok(result) = tokio::time::timeout(AUTH_WAIT, &mut result).await else {
        let (containment, login) = (Arc::clone(&shared.containment), login.to_string());
        tokio::spawn(async move {
            match result.await {
                // A suspended login's right password counts neither way, late or not.
                Ok(Ok(true)) if known && containment.is_suspended(&login) => {
                    attempt.release().await;
                }
                Ok(Ok(matched)) => {
                    attempt
                        .settle(matched && known, Instant::now().into_std())
                        .await;
                }
                // Not verified (a local failure): nothing to count.
                _ => attempt.release().await,
            }
        });
        return Answer::Busy;
    };
    // `Err`: the verifier thread is gone and dropped the sender: not the client's fault.
    let matched = match result.unwrap_or(Err(CheckError::VerifierGone)) {
        Ok(matched) => matched,
        Err(error) => {
            // Given back, not recorded: a broken verifier cannot lock users out.
            attempt.release().await;
            return Answer::VerifierFailed(error);
        }
    };
    if matched && known && suspended(shared, who).await {
        attempt.release().await;
        tokio::time::sleep_until(answer_at).await;
        return Answer::Suspended;
    }
    let report = attempt
        .settle(matched && known, Instant::now().into_std())
        .await;
    // A sprayed login is answered no sooner than `delay`, right password or wrong.
    tokio::time::sleep_until(answer_at).await;
    log_auth_report(login, &report, delay);
    Answer::Password { matched }
}

/// Whether the right password of `who` must be refused: its login is suspended, or this
/// login, from a client address new to it, suspends it now.
async fn suspended(shared: &Shared, who: Who<'_>) -> bool {
    let containment = &shared.containment;
    if containment.is_suspended(who.login) {
        return true;
    }
    let settings = &who.runtime.config.containment;
    let now = Instant::now().into_std();
    match containment.authenticated(settings, who.login, who.ip, now) {
        Some(trip) => {
            containment.suspend(who.login, trip).await;
            true
        }
        None => false,
    }
}

/// Log what an AUTH outcome led to: a lockout, a spraying alert, a delayed answer. The login
/// is shown cut to a bounded length (a SASL response may be 12 KiB).
fn log_auth_report(login: &str, report: &FailureReport, delay: Duration) {
    let login = login_key(login);
    if let Some(failures) = report.locked_out {
        warn!(
            login,
            failures,
            rule = "auth_lockout",
            "client locked out after repeated AUTH failures"
        );
    }
    if let Some((failures, clients)) = report.spraying {
        warn!(
            login,
            failures,
            distinct_ips = clients,
            rule = "auth_spraying",
            "password spraying against one login from several clients"
        );
    }
    if !delay.is_zero() {
        info!(
            login,
            delay_ms = delay.as_millis() as u64,
            rule = "auth_spraying",
            "AUTH answer delayed"
        );
    }
}

/// SPF of a transaction from `ip` (RFC 7208 §2.3–2.4): the reverse-path `from`, or the HELO
/// name for `<>`, within [`check_deadline`]; without a resolver, or out of time, `temperror`
/// (counted in `telemetry`'s DNS errors when the resolver failed).
pub(super) async fn spf_check(
    resolver: Option<&Resolver>,
    telemetry: &Telemetry,
    ip: std::net::IpAddr,
    helo: &str,
    from: &ReversePath,
) -> SpfCheck {
    let reverse_path = match from {
        ReversePath::Address(a) => Some(a.to_string()),
        ReversePath::Null => None,
    };
    let Some(resolver) = resolver else {
        return spf_timed_out(helo, reverse_path.as_deref());
    };
    let deadline = check_deadline(resolver);
    let spf = resolver.spf(ip, helo, reverse_path.as_deref());
    let check = match tokio::time::timeout(deadline, spf).await {
        Ok(check) => check,
        Err(_) => spf_timed_out(helo, reverse_path.as_deref()),
    };
    if check.result == SpfResult::TempError {
        telemetry.metrics.dns_error("spf");
    }
    check
}

/// The time one whole check may take: [`CHECK_DEADLINE_QUERIES`] queries' timeouts (the dns
/// functions bound themselves; this is the backstop that keeps a session from waiting on a
/// resolver that never answers).
fn check_deadline(resolver: &Resolver) -> Duration {
    resolver.timeout() * CHECK_DEADLINE_QUERIES
}

/// The SPF result of a check that could not finish: `temperror`, never a pass.
fn spf_timed_out(helo: &str, reverse_path: Option<&str>) -> SpfCheck {
    use crate::dns::verify::SpfIdentity;
    let (identity, subject) = match reverse_path {
        Some(path) => (SpfIdentity::MailFrom, path),
        None => (SpfIdentity::Helo, helo),
    };
    let domain = subject.rsplit_once('@').map_or(subject, |(_, d)| d);
    SpfCheck {
        result: SpfResult::TempError,
        identity,
        subject: subject.to_string(),
        domain: domain.to_string(),
        detail: Some("SPF check did not finish in time".to_string()),
    }
}

/// Count the checks of a message that ended in `temperror` (a DNS lookup failed or timed
/// out) in `portcullis_dns_errors_total{check}`: each DKIM signature, ARC and DMARC. Each
/// check is counted where its resolver answered, once (SPF in [`Effects::spf`], iprev and
/// DNSBL in [`resolve`]); without a resolver nothing is looked up and nothing counted.
fn count_dns_errors(telemetry: &Telemetry, m: &MessageChecks) {
    use crate::dns::verify::{ArcResult, DkimResult, DmarcResult};
    let metrics = &telemetry.metrics;
    for _ in m.dkim.iter().filter(|d| d.result == DkimResult::TempError) {
        metrics.dns_error("dkim");
    }
    if m.arc
        .as_ref()
        .is_some_and(|a| a.result == ArcResult::TempError)
    {
        metrics.dns_error("arc");
    }
    if m.dmarc
        .as_ref()
        .is_some_and(|d| d.result == DmarcResult::TempError)
    {
        metrics.dns_error("dmarc");
    }
}

/// The one log line of a message's authentication results, with its queue id.
fn log_results(
    queue_id: &str,
    spf: Option<&SpfCheck>,
    iprev: Option<&IprevCheck>,
    message: Option<&MessageChecks>,
) {
    let spf = spf.map_or_else(
        || "-".to_string(),
        |c| format!("{:?}", c.result).to_lowercase(),
    );
    let iprev = iprev.map_or_else(
        || "-".to_string(),
        |c| format!("{:?}", c.result).to_lowercase(),
    );
    let dkim = message.map_or_else(
        || "-".to_string(),
        |m| {
            if m.dkim.is_empty() {
                return "none".to_string();
            }
            m.dkim
                .iter()
                .map(|d| format!("{}:{}", d.domain, format!("{:?}", d.result).to_lowercase()))
                .collect::<Vec<_>>()
                .join(",")
        },
    );
    let arc = message.and_then(|m| m.arc.as_ref()).map_or_else(
        || "-".to_string(),
        |a| format!("{:?}", a.result).to_lowercase(),
    );
    let dmarc = message.and_then(|m| m.dmarc.as_ref()).map_or_else(
        || "-".to_string(),
        |d| format!("{:?}", d.result).to_lowercase(),
    );
    info!(
        queue_id,
        spf, dkim, dmarc, arc, iprev, "mail authentication"
    );
}

/// A lookup in flight, or its result (kept: a lookup awaited at several RCPTs answers each
/// time).
#[derive(Debug)]
enum Pending {
    Running(JoinHandle<LookupResult>),
    Done(LookupResult),
}

/// Lookups a session started ([`Effect::Start`]) and their results once read
/// ([`Effect::Await`]). Dropping the table (the session ended) abandons those in flight.
#[derive(Debug, Default)]
struct Lookups(Vec<(Lookup, Pending)>);

impl Lookups {
    /// Start `lookup` for the client `ip` (its DNSBL `zones`, if it is one) through
    /// `resolver`, counting its DNS errors in `telemetry`.
    fn start(
        &mut self,
        lookup: Lookup,
        resolver: Option<Resolver>,
        telemetry: Arc<Telemetry>,
        zones: Vec<crate::config::DnsblZone>,
        ip: std::net::IpAddr,
    ) {
        // A lookup started twice is run once: keep the first.
        if self.0.iter().all(|(l, _)| *l != lookup) {
            // In the session's span: its log lines (a listing, a timeout) name the client.
            let resolving = resolve(lookup, resolver, telemetry, zones, ip).in_current_span();
            let task = tokio::spawn(resolving);
            self.0.push((lookup, Pending::Running(task)));
        }
    }

    async fn finish(&mut self, lookup: Lookup) -> LookupResult {
        let Some((_, pending)) = self.0.iter_mut().find(|(l, _)| *l == lookup) else {
            return LookupResult::NotStarted;
        };
        if let Pending::Running(task) = pending {
            let result = task.await.unwrap_or_else(|e| {
                warn!(error = %e, lookup = ?lookup, "lookup task failed; counted as not done");
                LookupResult::NotStarted
            });
            *pending = Pending::Done(result);
        }
        match pending {
            Pending::Done(result) => result.clone(),
            Pending::Running(_) => LookupResult::NotStarted,
        }
    }
}

impl Drop for Lookups {
    fn drop(&mut self) {
        for (_, pending) in &self.0 {
            if let Pending::Running(task) = pending {
                task.abort();
            }
        }
    }
}

/// The zones a DNSBL lookup queries (none for other lookups).
fn zones(runtime: &Runtime, lookup: Lookup) -> Vec<crate::config::DnsblZone> {
    match lookup {
        Lookup::Dnsbl => runtime.config.dnsbl.zones.clone(),
        _ => Vec::new(),
    }
}

/// Carry out one lookup, within [`check_deadline`]: a DNSBL lookup that fails or times out
/// is "not listed", an iprev one `temperror`. What the resolver could not answer is counted
/// in `portcullis_dns_errors_total{check}` of `telemetry` (each DNSBL zone that failed, an
/// iprev `temperror`); without a resolver nothing is looked up and nothing counted.
pub(super) async fn resolve(
    lookup: Lookup,
    resolver: Option<Resolver>,
    telemetry: Arc<Telemetry>,
    zones: Vec<crate::config::DnsblZone>,
    ip: std::net::IpAddr,
) -> LookupResult {
    let iprev_failed = || IprevCheck {
        result: IprevResult::TempError,
        name: None,
    };
    match (lookup, resolver) {
        (Lookup::Dnsbl, Some(r)) => {
            let found = tokio::time::timeout(check_deadline(&r), r.dnsbl(ip, &zones)).await;
            let check = found.unwrap_or_else(|_| {
                warn!("DNSBL lookups did not finish in time; counted as not listed");
                // Every zone's lookup is a failed one.
                let errors = u32::try_from(zones.len()).unwrap_or(u32::MAX);
                DnsblCheck {
                    errors,
                    ..DnsblCheck::default()
                }
            });
            if !check.listed.is_empty() {
                info!(dnsbl = %crate::policy::mailauth::dnsbl_field(&check), "client listed");
            }
            for _ in 0..check.errors {
                telemetry.metrics.dns_error("dnsbl");
            }
            LookupResult::Dnsbl(check)
        }
        (Lookup::Dnsbl, None) => LookupResult::Dnsbl(DnsblCheck::default()),
        (Lookup::Iprev, Some(r)) => {
            let found = tokio::time::timeout(check_deadline(&r), r.iprev(ip)).await;
            let check = found.unwrap_or_else(|_| iprev_failed());
            if check.result == IprevResult::TempError {
                telemetry.metrics.dns_error("iprev");
            }
            LookupResult::Iprev(check)
        }
        (Lookup::Iprev, None) => LookupResult::Iprev(iprev_failed()),
        #[cfg(test)]
        (Lookup::Echo(n), _) => {
            tokio::task::yield_now().await;
            LookupResult::Echo(n)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn a_started_lookup_answers_every_read_and_one_never_started_reads_as_such() {
        let mut lookups = Lookups::default();
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let telemetry = Arc::new(Telemetry::new("relay.test"));
        let mut start = |l| lookups.start(l, None, Arc::clone(&telemetry), Vec::new(), ip);
        start(Lookup::Echo(7));
        // Started twice, run once.
        start(Lookup::Echo(7));
        start(Lookup::Echo(8));
        assert_eq!(lookups.0.len(), 2);
        assert_eq!(lookups.finish(Lookup::Echo(7)).await, LookupResult::Echo(7));
        // Read again (a second RCPT): the kept result.
        assert_eq!(lookups.finish(Lookup::Echo(7)).await, LookupResult::Echo(7));
        assert_eq!(
            lookups.finish(Lookup::Echo(9)).await,
            LookupResult::NotStarted
        );
        assert_eq!(lookups.finish(Lookup::Echo(8)).await, LookupResult::Echo(8));
    }

    #[tokio::test(start_paused = true)]
    async fn lookups_without_a_resolver_count_as_not_listed_and_temperror() {
        let ip: std::net::IpAddr = "192.0.2.1".parse().unwrap();
        let telemetry = Arc::new(Telemetry::new("relay.test"));
        let resolve = |lookup| resolve(lookup, None, Arc::clone(&telemetry), Vec::new(), ip);
        assert_eq!(
            resolve(Lookup::Dnsbl).await,
            LookupResult::Dnsbl(DnsblCheck::default())
        );
        let LookupResult::Iprev(iprev) = resolve(Lookup::Iprev).await else {
            panic!("an iprev lookup answers iprev");
        };
        assert_eq!(iprev.result, IprevResult::TempError);
        // Nothing was looked up: no DNS error is counted.
        let errors = telemetry.metrics.encode();
        assert!(!errors.contains("portcullis_dns_errors_total{"), "{errors}");
    }
}
