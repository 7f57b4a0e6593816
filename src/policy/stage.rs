//! The stage evaluator: one verdict type for every SMTP stage, and the order of the checks of
//! each stage declared once, here ([`Stage::checks`]).
//!
//! A stage is evaluated by [`Policy::evaluate`], sans-IO: each call runs the stage's checks in
//! order until one refuses ([`Verdict::Refuse`]), one needs something only the driver can do
//! ([`Verdict::Effect`]), or all have passed ([`Verdict::Accept`]). The driver carries an
//! effect out and calls again with its [`Answer`]; evaluation goes on from the check that
//! asked. So a check that needs a shared counter, a password verification or a DNS lookup
//! (SPF at MAIL, DNSBL at RCPT, DKIM/ARC/DMARC and signing after the final dot) is a new
//! [`Check`] and, when it needs something new done, a new [`Effect`]: the
//! driver's effect runner learns the effect once, and no stage handler changes.
//!
//! Effects: rate budgets and the AUTH lockout gate are answered by the
//! [`Store`](super::store::Store) the driver holds (in this process today, shared between
//! nodes later); a password is verified off the reactor; free space is reserved in the spool.
//! An effect may also be started at one stage and awaited at a later one
//! ([`Effect::Start`] / [`Effect::Await`]): a DNSBL lookup started at connect and read at
//! RCPT. The driver keeps started effects in its session's table of pending effects.
//!
//! Nothing here reads a clock, touches a socket or the spool: facts come in as
//! [`StageFacts`], including everything the driver looked up for the stage (the route of a
//! recipient, what the message assembly found).

use std::sync::Arc;

use super::capability::{self, Capabilities};
use super::limits::{Limited, RateLimit};
use super::senders::{FromCheck, FromProblem};
use super::store::RateKey;
use super::{Detail, Policy, Refusal, SessionFacts};
use crate::config::{Listener, Verify};
use crate::dns::dnsbl::DnsblCheck;
use crate::dns::sign::SignError;
use crate::dns::verify::{IprevCheck, MessageChecks, SpfCheck};
use crate::envelope::{Address, MailParams, ReversePath};
use crate::policy::access::{contains, normalize};
use crate::policy::credentials::CheckError;
use crate::queue::reserve::Insufficient;
use crate::smtp::reply;

/// The SMTP stages a policy decides at (RFC 5321 §3: session initiation, client
/// initiation, AUTH (RFC 4954), the mail transaction, end of data).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stage {
    /// A client connected, before the greeting.
    Connect,
    /// HELO or EHLO (RFC 5321 §4.1.1.1).
    Helo,
    /// AUTH with the SASL exchange done (RFC 4954 §4).
    Auth,
    /// MAIL FROM (RFC 5321 §4.1.1.2).
    Mail,
    /// RCPT TO (RFC 5321 §4.1.1.3).
    Rcpt,
    /// After the final dot, before the message is committed (RFC 5321 §4.1.1.4).
    DataEnd,
}

/// One check of a stage. Each stage's list is [`Stage::checks`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Check {
    /// The listener's `deny` list: `554 5.7.1`, rule `listener_deny`.
    ListenerDeny,
    /// The listener's `allow` list: `554 5.7.1`, rule `listener_allow`.
    ListenerAllow,
    /// `[rate_limits] connections_per_ip` (an effect): `421 4.7.0`. Not for the listener's
    /// `trusted_proxies` themselves: a session from a proxy's own address is its health
    /// check (every client it forwards is counted by the address in its header).
    ConnectionRate,
    /// The AUTH lockout gate (an effect): `454 4.7.0`, rule `auth_lockout`; a client whose
    /// budget stays held by verifications in flight: `454 4.7.0`, rule `auth_busy`.
    AuthLockout,
    /// Verify the password (an effect): `535 5.7.8`, rule `auth_bad_password` or
    /// `auth_unknown_user`; a verifier that cannot check: `454 4.7.0`,
    /// `auth_verifier_failed`; no verifier free: `auth_busy`. The right password of a
    /// suspended login (or one whose login now trips `[containment] client_ips_per_hour`):
    /// the same `535 5.7.8`, rule `auth_suspended`, not counted as a failure.
    AuthPassword,
    /// An authenticated user may use only the senders it owns: `553 5.7.1`, rule
    /// `sender_not_owned`.
    SenderOwned,
    /// `[rate_limits] messages_per_user` (an effect, authenticated sessions): `451 4.7.1`;
    /// the refusal that trips `[containment] rate_limit_hits` suspends the login: `421 4.7.0`,
    /// rule `account_suspended`, and the session closes.
    UserMessageRate,
    /// `[rate_limits] messages_per_ip` (an effect): `451 4.7.1`.
    ClientMessageRate,
    /// Reserve spool space for the transaction (an effect): `452 4.3.1`, rule
    /// `min_free_space`; free space unreadable: `451 4.3.0`, rule `spool_statvfs`.
    SpoolSpace,
    /// Relaying: accepted domains (and `recipients_file`), postmaster, AUTH or
    /// `relay_networks` (rules `relay_denied`, `routed_address`, `recipients_file`).
    RecipientAllowed,
    /// A route exists for the recipient and can carry the transaction (rules `no_route`,
    /// `route_smtputf8`, `route_8bitmime`, `route_size`).
    RouteCarries,
    /// `[rate_limits] recipients_per_ip` (an effect): `451 4.7.1`.
    RecipientRate,
    /// `[containment] recipient_domains_per_hour` (an effect, authenticated sessions): a
    /// recipient domain past the login's hourly count suspends the login, `421 4.7.0`, rule
    /// `account_suspended`, and the session closes.
    RecipientDomains,
    /// A header field over [`crate::smtp::headers::MAX_WHOLE_FIELD`]: `552`, rule
    /// `header_too_large`.
    HeaderSize,
    /// More `Received:` fields than `[limits] hop_limit` (RFC 5321 §6.3): `554 5.4.6`.
    HopLimit,
    /// The spool file could not be written: `452 4.3.1` (`min_free_space`) or `451 4.3.0`
    /// (`spool_write`).
    SpoolWritten,
    /// The `From:` header of authenticated mail names only owned addresses: `550 5.7.1`.
    FromHeader,
    /// Every recipient's route can carry the message as received.
    RoutesCarry,
    /// SPF of an untrusted transaction (an effect, RFC 7208): the reverse-path, or the HELO
    /// name for `<>`, when `[spf]` or `[dmarc]` verify. `[spf] verify = "enforce"`: `fail`
    /// → `550 5.7.23`, `temperror` → `451 4.7.24` (RFC 7372), rule `spf`.
    Spf,
    /// An untrusted client listed by `[[dnsbl.zones]]` at or over `[dnsbl] threshold` (an
    /// effect: the lookup started at connect): `550 5.7.1` naming the lists, rule `dnsbl`,
    /// postmaster excepted (RFC 5321 §4.5.1).
    Dnsbl,
    /// DKIM, ARC and DMARC of an untrusted message (an effect) when `[dkim] verify` or
    /// `[dmarc] verify`: under `[dmarc] verify = "enforce"`, a `From:` without exactly one
    /// domain or a DMARC `fail` of a `p=reject` domain → `550 5.7.1`, rule `dmarc`; no
    /// verification slot in time → `451 4.3.0`, rule `mail_auth_busy`.
    Authenticate,
    /// DKIM-sign trusted mail routed to an upstream with `sign = true` (an effect): a
    /// signing failure → `451 4.3.0`, rule `dkim_sign`.
    Sign,
    /// Start an asynchronous lookup, read at a later stage.
    Start(Lookup),
    /// Read a lookup started at an earlier stage.
    Await(Lookup),
}

impl Stage {
    /// The checks of this stage, in the order they run. This is the one place the order is
    /// written; the first check that refuses decides the reply.
    pub fn checks(self) -> &'static [Check] {
        use Check::*;
        match self {
            // The lookups start only once the client may stay, and never delay the greeting
            // (the driver starts them and goes on).
            Stage::Connect => &[
                ListenerDeny,
                ListenerAllow,
                ConnectionRate,
                Start(Lookup::Dnsbl),
                Start(Lookup::Iprev),
            ],
            // Nothing is checked at HELO yet (an SPF check of the HELO name would go here).
            Stage::Helo => &[],
            Stage::Auth => &[AuthLockout, AuthPassword],
            // The user's budget first: a compromised account is stopped wherever it
            // connects from. SPF after the budgets (a flood costs no DNS queries). Space is
            // reserved last, once the message may come.
            Stage::Mail => &[
                SenderOwned,
                UserMessageRate,
                ClientMessageRate,
                Spf,
                SpoolSpace,
            ],
            // A relay attempt is refused as such whether or not the client is listed.
            Stage::Rcpt => &[
                RecipientAllowed,
                Dnsbl,
                RouteCarries,
                RecipientRate,
                RecipientDomains,
            ],
            // The cheap checks of what was received first; signatures are verified (or
            // made) only for a message nothing else refuses.
            Stage::DataEnd => &[
                HeaderSize,
                HopLimit,
                SpoolWritten,
                FromHeader,
                RoutesCarry,
                Authenticate,
                Sign,
            ],
        }
    }
}

/// What one evaluation step says.
#[derive(Debug)]
pub enum Verdict {
    /// Every check passed: the command is accepted.
    Accept,
    /// A check refused: this reply, and this rule in the log.
    Refuse(Refusal),
    /// Carry this out and call [`Policy::evaluate`] again with its [`Answer`].
    Effect(Effect),
}

/// Something only the driver can do; its result comes back as an [`Answer`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Effect {
    /// Take one event from a `[rate_limits]` budget ([`super::store::Store::take`]):
    /// [`Answer::Allowed`] or [`Answer::Limited`].
    Rate(RateLimit, RateKey),
    /// Ask the lockout gate whether this client may verify a password for `login` now
    /// ([`super::store::Store::auth_gate`]), waiting a bounded time while its budget is held
    /// by verifications in flight: [`Answer::Allowed`] (the driver keeps the attempt for
    /// [`Effect::VerifyPassword`]), [`Answer::LockedOut`] or [`Answer::Busy`].
    AuthGate { login: String },
    /// Verify the AUTH's password against the PHC string `hash` off the reactor, settle the
    /// attempt and answer no sooner than its delay: [`Answer::Password`],
    /// [`Answer::VerifierFailed`] or [`Answer::Busy`]. `known`: the login exists (an unknown
    /// login is verified against a dummy hash, so it costs the same).
    VerifyPassword { hash: Arc<str>, known: bool },
    /// Hold `bytes` octets of spool free space until the transaction ends:
    /// [`Answer::Allowed`], [`Answer::NoSpace`] or [`Answer::SpaceUnknown`].
    ReserveSpace { bytes: u64 },
    /// Start `Lookup` and keep it in the session's pending effects: [`Answer::Allowed`].
    Start(Lookup),
    /// The result of a `Lookup` started earlier: [`Answer::Looked`].
    Await(Lookup),
    /// SPF of the transaction (RFC 7208 §2.3–2.4) through the relay's resolver; the driver
    /// keeps the result for the transaction (`Authentication-Results:`, DMARC) until RSET or
    /// the next MAIL: [`Answer::Spf`].
    Spf,
    /// Verify the message: its DKIM signatures and ARC chain, and DMARC when `dmarc`, in a
    /// bounded number of verifications at once: [`Answer::Authenticated`] or
    /// [`Answer::AuthenticationBusy`].
    Authenticate { dmarc: bool },
    /// DKIM-sign the message with the `[[dkim.sign]]` entries of its `From:` domain (none:
    /// nothing to do) off the reactor: [`Answer::Signed`] or [`Answer::SignFailed`].
    Sign,
    /// Count the RCPT's domain among the recipient domains of the session's login within the
    /// hour ([`crate::policy::containment::Containment::recipient`]); past
    /// `recipient_domains_per_hour` the login is suspended: [`Answer::Allowed`] or
    /// [`Answer::Suspended`].
    RecipientDomain,
}

/// An asynchronous lookup that may be started at one stage and read at a later one. A DNS
/// lookup (DNSBL, SPF) is a variant here, answered by the driver's resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// The client's address in every `[[dnsbl.zones]]` (RFC 5782): started at connect, read
    /// at each RCPT.
    Dnsbl,
    /// iprev (RFC 8601 §3) of the client: started at connect, read for the
    /// `Authentication-Results:` field.
    Iprev,
    /// A lookup that answers its own number: shows the start/await shape in tests.
    #[cfg(test)]
    Echo(u32),
}

/// What a lookup found. A finished lookup answers the same result to every await.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupResult {
    /// The zones that list the client (none: not listed, or the lookups failed).
    Dnsbl(DnsblCheck),
    /// The client's confirmed PTR name, or why not.
    Iprev(IprevCheck),
    /// The answer of [`Lookup::Echo`].
    #[cfg(test)]
    Echo(u32),
    /// The lookup was never started in this session.
    NotStarted,
}

/// The driver's answer to an [`Effect`].
#[derive(Debug)]
pub enum Answer {
    /// Done: a budget had room, the gate let the attempt through, space was reserved, a
    /// lookup was started.
    Allowed,
    /// A rate budget is spent.
    Limited(Limited),
    /// The client is locked out of AUTH.
    LockedOut,
    /// No verification could be made in time (the client's budget stayed held, or every
    /// verifier was busy): nothing counted.
    Busy,
    /// The password was verified: whether it matched.
    Password { matched: bool },
    /// The login is suspended (by containment or an operator), or has just been.
    Suspended,
    /// The verification itself failed (not the client's fault): nothing counted.
    VerifierFailed(CheckError),
    /// The shared store (`[cluster]`) did not answer and `on_error = "tempfail"`: a
    /// temporary refusal, rule `cluster_unavailable` (`421 4.3.0` at connect, closing;
    /// `454 4.7.0` to AUTH; `451 4.3.0` otherwise).
    Unavailable,
    /// The spool's free space, minus messages in flight, is below `min_free_space`.
    NoSpace(Insufficient),
    /// The spool's free space could not be read (`statvfs` failed).
    SpaceUnknown(std::io::Error),
    /// What a lookup found.
    Looked(LookupResult),
    /// What SPF found for the transaction.
    Spf(SpfCheck),
    /// What the message's verification found.
    Authenticated(Box<MessageChecks>),
    /// No verification slot was free within the data timeout: nothing was verified.
    AuthenticationBusy,
    /// The message was signed with this many signatures (0: its `From:` domain has no key).
    Signed(usize),
    /// Signing failed.
    SignFailed(SignError),
}

/// How writing the message into the spool failed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WriteFailure {
    /// The message outgrew its reservation and the free space could not hold more.
    StorageFull,
    /// An I/O error.
    Io,
}

/// What the stage being evaluated is about.
#[derive(Debug)]
pub enum Input<'a> {
    /// A connection: nothing more than the session facts.
    Connect,
    /// HELO/EHLO `name`.
    Helo { name: &'a str },
    /// AUTH as `login` (the SASL authentication identity) with `password`.
    Auth { login: &'a str, password: &'a str },
    /// MAIL FROM with its declared SIZE (RFC 1870), if any, and the HELO/EHLO name (SPF's
    /// identity for a null reverse-path).
    Mail {
        from: &'a ReversePath,
        size: Option<u64>,
        helo: &'a str,
    },
    /// RCPT TO.
    Rcpt(RcptFacts<'a>),
    /// After the final dot.
    DataEnd(EndOfData<'a>),
}

impl Input<'_> {
    /// The stage these facts are for.
    pub fn stage(&self) -> Stage {
        match self {
            Input::Connect => Stage::Connect,
            Input::Helo { .. } => Stage::Helo,
            Input::Auth { .. } => Stage::Auth,
            Input::Mail { .. } => Stage::Mail,
            Input::Rcpt(_) => Stage::Rcpt,
            Input::DataEnd(_) => Stage::DataEnd,
        }
    }
}

/// A transaction's reverse-path and MAIL parameters.
#[derive(Debug, Clone, Copy)]
pub struct TransactionFacts<'a> {
    pub from: &'a ReversePath,
    pub params: &'a MailParams,
}

/// RCPT TO facts.
#[derive(Debug, Clone, Copy)]
pub struct RcptFacts<'a> {
    /// The forward-path.
    pub to: &'a Address,
    /// `<postmaster>` without a domain (RFC 5321 §4.5.1), already mapped to
    /// `[relay] postmaster`.
    pub bare_postmaster: bool,
    /// The transaction the recipient is for (`None` only if the session has none).
    pub transaction: Option<TransactionFacts<'a>>,
    /// What the route to `to` can carry; `None`: no route.
    pub route: Option<Capabilities>,
}

/// End-of-data facts, as the message assembly found them.
pub struct EndOfData<'a> {
    /// A header field over the size bound: its name.
    pub header_too_large: Option<&'a str>,
    /// `Received:` fields in the header section.
    pub received_count: usize,
    /// Writing the spool file failed.
    pub write_failed: Option<WriteFailure>,
    /// The `From:` check of an authenticated message (see [`Policy::data_start`]), fed the
    /// whole header section.
    pub from_check: Option<&'a FromCheck>,
    /// The header section has a non-ASCII octet.
    pub header_utf8: bool,
    /// The message has an octet over 127.
    pub eight_bit: bool,
    /// The message's size in octets as it would be sent.
    pub size: u64,
    /// The transaction.
    pub transaction: TransactionFacts<'a>,
    /// The forward-paths.
    pub recipients: &'a [Address],
    /// The HELO/EHLO name (for DMARC's SPF side when the reverse-path is null).
    pub helo: &'a str,
    /// What the route to a domain can carry (`None`: no route, which is not refused here:
    /// RCPT refused it, and one may have gone since).
    pub route: &'a (dyn Fn(&str) -> Option<Capabilities> + Sync),
}

impl std::fmt::Debug for EndOfData<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("EndOfData")
            .field("header_too_large", &self.header_too_large)
            .field("received_count", &self.received_count)
            .field("write_failed", &self.write_failed)
            .field("size", &self.size)
            .finish_non_exhaustive()
    }
}

/// Everything a stage decides on.
#[derive(Debug)]
pub struct StageFacts<'a> {
    pub session: SessionFacts<'a>,
    /// The listener the client connected to.
    pub listener: &'a Listener,
    pub input: Input<'a>,
}

/// Where one stage's evaluation stands: create it with [`Evaluation::new`] and hand it to
/// each [`Policy::evaluate`] call of that stage.
#[derive(Debug)]
pub struct Evaluation {
    checks: &'static [Check],
    /// The next check to run; the one before it asked for the effect being answered.
    next: usize,
}

impl Evaluation {
    /// An evaluation of `stage` from its first check.
    pub fn new(stage: Stage) -> Evaluation {
        Evaluation::of(stage.checks())
    }

    /// An evaluation of a list of checks of its own (a stage's list with one more check).
    pub fn of(checks: &'static [Check]) -> Evaluation {
        Evaluation { checks, next: 0 }
    }

    /// The checks run so far, in order: the last one asked for the effect being answered,
    /// or refused (for `portcullis policy explain`, which shows each check's outcome).
    pub fn ran(&self) -> &'static [Check] {
        &self.checks[..self.next]
    }
}

impl Policy {
    /// The next verdict of `evaluation`. `answer` is the driver's answer to the effect the
    /// previous call asked for (`None` on the first call). A stage is done at the first
    /// [`Verdict::Accept`] or [`Verdict::Refuse`].
    pub fn evaluate(
        &self,
        evaluation: &mut Evaluation,
        facts: &StageFacts<'_>,
        answer: Option<Answer>,
    ) -> Verdict {
        if let Some(answer) = answer
            && let Some(refusal) = self.answered(answer, facts)
        {
            return Verdict::Refuse(refusal);
        }
        while let Some(&check) = evaluation.checks.get(evaluation.next) {
            evaluation.next += 1;
            match self.check(check, facts) {
                Verdict::Accept => {}
                other => return other,
            }
        }
        Verdict::Accept
    }

    /// Run one check: [`Verdict::Accept`] when it passes. A check that does not apply to the
    /// stage's input (only possible in a list of one's own, [`Evaluation::of`]) passes.
    fn check(&self, check: Check, facts: &StageFacts<'_>) -> Verdict {
        let ip = facts.session.client_ip;
        let client = || RateKey::Client(ip);
        let refused = |r: Result<(), Refusal>| r.err().map_or(Verdict::Accept, Verdict::Refuse);
        match (check, &facts.input) {
            (Check::ListenerDeny, _) if contains(&facts.listener.deny, normalize(ip)) => {
                Verdict::Refuse(Refusal::new(reply::ACCESS_DENIED, "listener_deny"))
            }
            (Check::ListenerAllow, _) if !contains(&facts.listener.allow, normalize(ip)) => {
                Verdict::Refuse(Refusal::new(reply::ACCESS_DENIED, "listener_allow"))
            }
            (Check::ConnectionRate, _)
                if contains(&facts.listener.trusted_proxies, normalize(ip)) =>
            {
                Verdict::Accept
            }
            (Check::ConnectionRate, _) => {
                effect(Effect::Rate(RateLimit::ConnectionsPerIp, client()))
            }
            (Check::AuthLockout, Input::Auth { login, .. }) => effect(Effect::AuthGate {
                login: (*login).to_string(),
            }),
            (Check::AuthPassword, Input::Auth { login, .. }) => {
                let (hash, known) = self.auth_hash(login);
                effect(Effect::VerifyPassword { hash, known })
            }
            (Check::SenderOwned, Input::Mail { from, .. }) => {
                refused(self.mail(&facts.session, from))
            }
            (Check::UserMessageRate, _) => match facts.session.user {
                Some(user) => effect(Effect::Rate(
                    RateLimit::MessagesPerUser,
                    RateKey::Login(user.to_string()),
                )),
                None => Verdict::Accept,
            },
            (Check::ClientMessageRate, _) => {
                effect(Effect::Rate(RateLimit::MessagesPerIp, client()))
            }
            (Check::SpoolSpace, Input::Mail { size, .. }) => effect(Effect::ReserveSpace {
                bytes: size.map_or(self.max_message_size, |s| s.min(self.max_message_size)),
            }),
            (Check::RecipientAllowed, Input::Rcpt(r)) => refused(self.recipient_allowed(facts, r)),
            (Check::RouteCarries, Input::Rcpt(r)) => refused(route_carries(r)),
            (Check::RecipientRate, _) => effect(Effect::Rate(RateLimit::RecipientsPerIp, client())),
            (Check::RecipientDomains, Input::Rcpt(_))
                if self.containment.recipient_domains_per_hour.is_some()
                    && facts.session.user.is_some() =>
            {
                effect(Effect::RecipientDomain)
            }
            (Check::Start(lookup), _) if self.lookup_applies(lookup, &facts.session) => {
                effect(Effect::Start(lookup))
            }
            (Check::Start(_), _) => Verdict::Accept,
            (Check::Await(lookup), _) => effect(Effect::Await(lookup)),
            (Check::Spf, Input::Mail { .. }) if self.spf_runs(&facts.session) => {
                effect(Effect::Spf)
            }
            (Check::Dnsbl, Input::Rcpt(r))
                if self.dnsbl_applies(&facts.session)
                    && !self.is_postmaster(r.to, r.bare_postmaster) =>
            {
                effect(Effect::Await(Lookup::Dnsbl))
            }
            (Check::Authenticate, Input::DataEnd(_)) if self.untrusted(&facts.session) => {
                match (self.mail_auth.dkim_verify, self.mail_auth.dmarc) {
                    (false, Verify::Off) => Verdict::Accept,
                    (_, dmarc) => effect(Effect::Authenticate {
                        dmarc: dmarc != Verify::Off,
                    }),
                }
            }
            (Check::Sign, Input::DataEnd(end))
                if !self.untrusted(&facts.session) && self.signs_for(end.recipients) =>
            {
                effect(Effect::Sign)
            }
            (check, Input::DataEnd(end)) => refused(self.end_of_data(check, end)),
            _ => Verdict::Accept,
        }
    }

    /// RCPT: the relay rules, postmaster excepted (RFC 5321 §4.5.1).
    fn recipient_allowed(&self, facts: &StageFacts<'_>, r: &RcptFacts<'_>) -> Result<(), Refusal> {
        if self.is_postmaster(r.to, r.bare_postmaster) {
            return Ok(());
        }
        self.rcpt(&facts.session, r.to)
    }

    /// One check of the end-of-data stage.
    fn end_of_data(&self, check: Check, end: &EndOfData<'_>) -> Result<(), Refusal> {
        match check {
            Check::HeaderSize => match end.header_too_large {
                Some(name) => Err(Refusal::new(reply::HEADER_TOO_LARGE, "header_too_large")
                    .with_detail(Detail::Text(format!("header field {name} too large")))),
                None => Ok(()),
            },
            Check::HopLimit if end.received_count > self.hop_limit => {
                Err(Refusal::new(reply::TOO_MANY_HOPS, "hop_limit"))
            }
            Check::SpoolWritten => match end.write_failed {
                Some(WriteFailure::StorageFull) => {
                    Err(Refusal::new(reply::INSUFFICIENT_STORAGE, "min_free_space"))
                }
                Some(WriteFailure::Io) => Err(Refusal::new(reply::LOCAL_ERROR, "spool_write")),
                None => Ok(()),
            },
            Check::FromHeader => from_header(end.from_check),
            Check::RoutesCarry => routes_carry(end),
            // Effects, asked for in `check` when they apply.
            _ => Ok(()),
        }
    }
}

fn effect(e: Effect) -> Verdict {
    Verdict::Effect(e)
}

impl Policy {
    /// What the answer to the effect a check asked for means: a refusal, or go on.
    fn answered(&self, answer: Answer, facts: &StageFacts<'_>) -> Option<Refusal> {
        let login = match facts.input {
            Input::Auth { login, .. } => login,
            _ => "",
        };
        let shown = || Detail::Login(super::lockout::login_key(login).to_string());
        let refusal = match answer {
            Answer::Allowed | Answer::Signed(_) => return None,
            Answer::Looked(LookupResult::Dnsbl(check)) => {
                return self.dnsbl_refusal(facts, &check);
            }
            Answer::Looked(_) => return None,
            Answer::Spf(check) => return self.spf_refusal(&check),
            Answer::Authenticated(checks) => return self.dmarc_refusal(&checks),
            Answer::AuthenticationBusy => {
                Refusal::new(reply::AUTHENTICATION_BUSY, "mail_auth_busy").warning()
            }
            Answer::SignFailed(error) => Refusal::new(reply::LOCAL_ERROR, "dkim_sign")
                .with_detail(Detail::Text(error.to_string()))
                .warning(),
            Answer::Limited(l) => Refusal::new(l.reply(), l.rule)
                .with_detail(Detail::Limit(l.limit_text()))
                .warning(),
            Answer::LockedOut => Refusal::new(reply::AUTH_LOCKED_OUT, "auth_lockout")
                .with_detail(shown())
                .warning(),
            Answer::Busy => Refusal::new(reply::AUTH_TEMPORARY, "auth_busy").with_detail(shown()),
            Answer::Unavailable => {
                let reply = match facts.input {
                    Input::Connect => reply::STORE_UNAVAILABLE,
                    Input::Auth { .. } => reply::AUTH_TEMPORARY,
                    _ => reply::LOCAL_ERROR,
                };
                Refusal::new(reply, "cluster_unavailable").warning()
            }
            // No oracle: the reply of a wrong password, only the rule in the log differs.
            Answer::Suspended if matches!(facts.input, Input::Auth { .. }) => {
                Refusal::new(reply::AUTH_FAILED, "auth_suspended")
                    .with_detail(shown())
                    .warning()
            }
            Answer::Suspended => {
                Refusal::new(reply::ACCOUNT_SUSPENDED, "account_suspended").warning()
            }
            Answer::Password { matched } => {
                let known = self.password_hashes.contains_key(login);
                if matched && known {
                    return None;
                }
                let rule = if known {
                    "auth_bad_password"
                } else {
                    "auth_unknown_user"
                };
                Refusal::new(reply::AUTH_FAILED, rule).with_detail(shown())
            }
            // RFC 4954 §6: 454 4.7.0 for a temporary failure, nothing counted.
            Answer::VerifierFailed(error) => {
                Refusal::new(reply::AUTH_TEMPORARY, "auth_verifier_failed")
                    .with_detail(Detail::Text(format!(
                        "{}: {error}",
                        super::lockout::login_key(login)
                    )))
                    .warning()
            }
            Answer::NoSpace(short) => Refusal::new(reply::INSUFFICIENT_STORAGE, "min_free_space")
                .with_detail(Detail::Text(short.to_string()))
                .warning(),
            Answer::SpaceUnknown(error) => Refusal::new(reply::LOCAL_ERROR, "spool_statvfs")
                .with_detail(Detail::Text(format!(
                    "cannot read spool free space: {error}"
                ))),
        };
        Some(refusal)
    }
}

/// RCPT: is there a route for the recipient, and can it carry this transaction (SMTPUTF8,
/// 8BITMIME, SIZE)? Decided now, since a message accepted for a route that cannot take it
/// could only be bounced (or, without a route, wait in the queue until it expires).
fn route_carries(r: &RcptFacts<'_>) -> Result<(), Refusal> {
    let Some(tx) = r.transaction else {
        return Ok(());
    };
    let Some(caps) = r.route else {
        return Err(Refusal::new(reply::NO_ROUTE, "no_route"));
    };
    capability::rcpt(&caps, tx.from, tx.params, r.to)
}

/// End of data: can the route of every recipient carry the message as received, by what is
/// known of the routes now (the envelope is checked again: an upstream may have been seen
/// with other capabilities while the message was being received)?
fn routes_carry(end: &EndOfData<'_>) -> Result<(), Refusal> {
    let tx = end.transaction;
    end.recipients.iter().try_for_each(|to| {
        let Some(caps) = (end.route)(to.domain()) else {
            return Ok(());
        };
        capability::rcpt_at_data(&caps, tx.from, tx.params, to)?;
        capability::data(&caps, tx.params, end.header_utf8, end.eight_bit, end.size)
    })
}

/// The `From:` header of an authenticated message must name only addresses its user owns,
/// in its addresses and (with `[auth] check_display_name`) its display names. The offending
/// address, if any, is the refusal's detail.
pub(super) fn from_header(check: Option<&FromCheck>) -> Result<(), Refusal> {
    let Some(check) = check else {
        return Ok(());
    };
    let refuse = |rule, address: Option<String>| {
        let r = Refusal::new(reply::FROM_HEADER_NOT_OWNED, rule);
        Err(match address {
            Some(a) => r.with_detail(Detail::FromHeader(a)),
            None => r,
        })
    };
    match check.verdict() {
        Ok(()) => Ok(()),
        Err(FromProblem::Missing) => refuse("from_header_missing", None),
        Err(FromProblem::NotOwned(a)) => refuse("from_header_not_owned", Some(a)),
        Err(FromProblem::DisplayName(a)) => refuse("from_display_name", Some(a)),
        Err(FromProblem::Ambiguous(a)) => refuse("from_header_ambiguous", Some(a)),
    }
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::config::{Config, Rate};
    use crate::dns::verify::{DmarcPolicy, DmarcResult, FromDomain, SpfResult};
    use crate::policy::credentials::DUMMY_HASH;

    /// A policy with `accepted_domains = ["example.com"]`, user `alice` (sender
    /// alice@example.com), `max_message_size = 1000` and `hop_limit = 2`.
    fn policy() -> (tempfile::TempDir, Config, Policy) {
        policy_with(|_| {})
    }

    /// [`policy`], with `change` made to the compiled configuration first (the checks'
    /// sections are set here, as the policy file would set them).
    fn policy_with(change: impl FnOnce(&mut Config)) -> (tempfile::TempDir, Config, Policy) {
        let dir = tempfile::tempdir().unwrap();
        let users = dir.path().join("users.toml");
        std::fs::write(
            &users,
            format!(
                "[[users]]\nname = \"alice\"\npassword_hash = \"{DUMMY_HASH}\"\n\
                 senders = [\"alice@example.com\"]\n"
            ),
        )
        .unwrap();
        let text = format!(
            "[server]\nhostname = \"relay.test\"\n[[listeners]]\nbind = \"127.0.0.1:2525\"\n\
             tls = \"none\"\ndeny = [\"192.0.2.66/32\"]\nallow = [\"192.0.2.0/24\"]\n\
             [relay]\naccepted_domains = [\"example.com\"]\n[auth]\nusers_file = {:?}\n\
             [limits]\nmax_message_size = 1000\nhop_limit = 2\n\
             [[upstreams]]\naddress = \"127.0.0.1:25\"\n",
            users.display().to_string()
        );
        let mut config = Config::from_toml(&text, None).expect("valid test policy");
        config.relay.relay_networks = vec!["192.0.2.128/25".parse().unwrap()];
        change(&mut config);
        let policy = Policy::new(&config, None, Instant::now());
        (dir, config, policy)
    }

    /// Evaluate to the end, answering each effect with `answer`: the effects asked for, in
    /// order, and the rule that refused (`None`: accepted).
    fn run(
        policy: &Policy,
        mut evaluation: Evaluation,
        facts: &StageFacts<'_>,
        mut answer: impl FnMut(&Effect) -> Answer,
    ) -> (Vec<Effect>, Option<&'static str>) {
        let mut asked = Vec::new();
        let mut given = None;
        loop {
            match policy.evaluate(&mut evaluation, facts, given.take()) {
                Verdict::Accept => return (asked, None),
                Verdict::Refuse(r) => return (asked, Some(r.rule)),
                Verdict::Effect(e) => {
                    given = Some(answer(&e));
                    asked.push(e);
                }
            }
        }
    }

    fn facts<'a>(
        config: &'a Config,
        ip: &str,
        user: Option<&'a str>,
        input: Input<'a>,
    ) -> StageFacts<'a> {
        StageFacts {
            session: SessionFacts {
                client_ip: ip.parse().unwrap(),
                user,
            },
            listener: &config.listeners[0],
            input,
        }
    }

    /// The route of an accepted domain's upstream: 8BITMIME, no SMTPUTF8, no SIZE.
    const ROUTE: Capabilities = Capabilities {
        smtputf8: false,
        eightbitmime: true,
        size: None,
    };

    /// RCPT TO:<`to`> in the transaction MAIL FROM:<`from`> with `params`, routed by `route`.
    fn rcpt_in_transaction<'a>(
        to: &'a Address,
        from: &'a ReversePath,
        params: &'a MailParams,
        route: Option<Capabilities>,
    ) -> Input<'a> {
        Input::Rcpt(RcptFacts {
            to,
            bare_postmaster: false,
            transaction: Some(TransactionFacts { from, params }),
            route,
        })
    }

    fn limited(limit: RateLimit) -> Answer {
        Answer::Limited(Limited {
            rule: limit.rule(),
            limit: Rate {
                count: 1,
                per: std::time::Duration::from_secs(60),
            },
        })
    }

    fn allowed(_: &Effect) -> Answer {
        Answer::Allowed
    }

    fn client(ip: &str) -> RateKey {
        RateKey::Client(ip.parse().unwrap())
    }

    #[test]
    fn connect_checks_deny_then_allow_then_the_connection_rate() {
        let (_d, c, p) = policy();
        let rate = Effect::Rate(RateLimit::ConnectionsPerIp, client("192.0.2.1"));
        let connect = |ip, answer: fn(&Effect) -> Answer| {
            run(
                &p,
                Evaluation::new(Stage::Connect),
                &facts(&c, ip, None, Input::Connect),
                answer,
            )
        };
        // Refused by the lists: no budget is taken.
        assert_eq!(
            connect("192.0.2.66", allowed),
            (vec![], Some("listener_deny"))
        );
        assert_eq!(
            connect("::ffff:192.0.2.66", allowed),
            (vec![], Some("listener_deny"))
        );
        assert_eq!(
            connect("198.51.100.1", allowed),
            (vec![], Some("listener_allow"))
        );
        assert_eq!(connect("192.0.2.1", allowed), (vec![rate.clone()], None));
        let over = connect("192.0.2.1", |_| limited(RateLimit::ConnectionsPerIp));
        assert_eq!(over, (vec![rate], Some("rate_limits.connections_per_ip")));
    }

    #[test]
    fn a_trusted_proxys_own_sessions_take_no_connection_budget() {
        let (_d, c, p) = policy_with(|c| {
            c.listeners[0].trusted_proxies = Arc::new(vec!["192.0.2.5/32".parse().unwrap()])
        });
        let connect = |ip| {
            let facts = facts(&c, ip, None, Input::Connect);
            run(&p, Evaluation::new(Stage::Connect), &facts, allowed)
        };
        // Its health checks (a v2 LOCAL header: the session is the proxy's own).
        assert_eq!(connect("192.0.2.5"), (vec![], None));
        assert_eq!(connect("::ffff:192.0.2.5"), (vec![], None));
        // A client it forwards, and everyone else, are counted.
        let rate = Effect::Rate(RateLimit::ConnectionsPerIp, client("192.0.2.6"));
        assert_eq!(connect("192.0.2.6"), (vec![rate], None));
    }

    #[test]
    fn mail_checks_ownership_then_user_then_client_budget_then_reserves_space() {
        let (_d, c, p) = policy();
        let owned = ReversePath::Address(Address::parse("alice@example.com").unwrap());
        let spoof = ReversePath::Address(Address::parse("ceo@example.com").unwrap());
        let mail = |user, from, size, answer: &dyn Fn(&Effect) -> Answer| {
            let input = Input::Mail {
                from,
                size,
                helo: "client.test",
            };
            run(
                &p,
                Evaluation::new(Stage::Mail),
                &facts(&c, "192.0.2.1", user, input),
                answer,
            )
        };
        let user_rate = Effect::Rate(RateLimit::MessagesPerUser, RateKey::Login("alice".into()));
        let ip_rate = Effect::Rate(RateLimit::MessagesPerIp, client("192.0.2.1"));
        let reserve = |bytes| Effect::ReserveSpace { bytes };
        assert_eq!(
            mail(Some("alice"), &spoof, None, &allowed),
            (vec![], Some("sender_not_owned"))
        );
        assert_eq!(
            mail(Some("alice"), &owned, Some(10), &allowed),
            (vec![user_rate.clone(), ip_rate.clone(), reserve(10)], None)
        );
        // Unauthenticated: no user budget; no SIZE, or one over the cap: the cap is held.
        assert_eq!(
            mail(None, &spoof, None, &allowed),
            (vec![ip_rate.clone(), reserve(1000)], None)
        );
        assert_eq!(mail(None, &spoof, Some(5000), &allowed).0[1], reserve(1000));
        let user_spent = |e: &Effect| match e {
            Effect::Rate(RateLimit::MessagesPerUser, _) => limited(RateLimit::MessagesPerUser),
            _ => Answer::Allowed,
        };
        assert_eq!(
            mail(Some("alice"), &owned, None, &user_spent),
            (vec![user_rate], Some("rate_limits.messages_per_user"))
        );
        let full = |e: &Effect| match e {
            Effect::ReserveSpace { .. } => Answer::NoSpace(Insufficient {
                free: 100,
                reserved: 50,
                bytes: 1000,
                min_free: 10,
            }),
            _ => Answer::Allowed,
        };
        assert_eq!(mail(None, &owned, None, &full).1, Some("min_free_space"));
        let unknown = |e: &Effect| match e {
            Effect::ReserveSpace { .. } => {
                Answer::SpaceUnknown(std::io::ErrorKind::PermissionDenied.into())
            }
            _ => Answer::Allowed,
        };
        assert_eq!(mail(None, &owned, None, &unknown).1, Some("spool_statvfs"));
    }

    #[test]
    fn rcpt_checks_relaying_then_the_route_then_the_recipient_budget() {
        let (_d, c, p) = policy();
        let from = ReversePath::Null;
        let params = MailParams::default();
        let rcpt = |to: &str, route, answer: &dyn Fn(&Effect) -> Answer| {
            let to = Address::parse(to).unwrap();
            let input = rcpt_in_transaction(&to, &from, &params, route);
            run(
                &p,
                Evaluation::new(Stage::Rcpt),
                &facts(&c, "192.0.2.1", None, input),
                answer,
            )
        };
        let rate = Effect::Rate(RateLimit::RecipientsPerIp, client("192.0.2.1"));
        // Relaying is refused before the route is looked at or a budget is taken.
        assert_eq!(
            rcpt("u@other.test", None, &allowed),
            (vec![], Some("relay_denied"))
        );
        assert_eq!(
            rcpt("u@example.com", None, &allowed),
            (vec![], Some("no_route"))
        );
        assert_eq!(
            rcpt("jörg@example.com", Some(ROUTE), &allowed),
            (vec![], Some("route_smtputf8"))
        );
        assert_eq!(
            rcpt("u@example.com", Some(ROUTE), &allowed),
            (vec![rate.clone()], None)
        );
        let spent = |_: &Effect| limited(RateLimit::RecipientsPerIp);
        assert_eq!(
            rcpt("u@example.com", Some(ROUTE), &spent),
            (vec![rate], Some("rate_limits.recipients_per_ip"))
        );
    }

    #[test]
    fn auth_asks_the_lockout_gate_before_verifying_and_names_the_outcome() {
        let (_d, c, p) = policy();
        let auth = |login, answer: &dyn Fn(&Effect) -> Answer| {
            let input = Input::Auth {
                login,
                password: "pw",
            };
            let (asked, rule) = run(
                &p,
                Evaluation::new(Stage::Auth),
                &facts(&c, "192.0.2.1", None, input),
                answer,
            );
            let kinds: Vec<&str> = asked
                .iter()
                .map(|e| match e {
                    Effect::AuthGate { .. } => "gate",
                    Effect::VerifyPassword { known: true, .. } => "verify known",
                    Effect::VerifyPassword { known: false, .. } => "verify unknown",
                    _ => "other",
                })
                .collect();
            (kinds, rule)
        };
        let verified = |matched| {
            move |e: &Effect| match e {
                Effect::VerifyPassword { .. } => Answer::Password { matched },
                _ => Answer::Allowed,
            }
        };
        assert_eq!(
            auth("alice", &|_| Answer::LockedOut),
            (vec!["gate"], Some("auth_lockout"))
        );
        assert_eq!(
            auth("alice", &|_| Answer::Busy),
            (vec!["gate"], Some("auth_busy"))
        );
        assert_eq!(
            auth("alice", &verified(true)),
            (vec!["gate", "verify known"], None)
        );
        assert_eq!(
            auth("alice", &verified(false)),
            (vec!["gate", "verify known"], Some("auth_bad_password"))
        );
        // An unknown login is verified too (against the dummy hash) and never succeeds.
        assert_eq!(
            auth("mallory", &verified(true)),
            (vec!["gate", "verify unknown"], Some("auth_unknown_user"))
        );
        let broken = |e: &Effect| match e {
            Effect::VerifyPassword { .. } => Answer::VerifierFailed(CheckError::VerifierPanicked),
            _ => Answer::Allowed,
        };
        assert_eq!(auth("alice", &broken).1, Some("auth_verifier_failed"));
    }

    #[test]
    fn end_of_data_refuses_by_the_first_rule_that_fires() {
        let (_d, c, p) = policy();
        let from = ReversePath::Null;
        let params = MailParams::default();
        let recipients = [Address::parse("u@example.com").unwrap()];
        let seven_bit = |_: &str| {
            Some(Capabilities {
                smtputf8: false,
                eightbitmime: false,
                size: Some(100),
            })
        };
        let check = p.header_from_check(&SessionFacts {
            client_ip: "192.0.2.1".parse().unwrap(),
            user: Some("alice"),
        });
        let end = |too_large, hops, failed, from_check, size| {
            let input = Input::DataEnd(EndOfData {
                header_too_large: too_large,
                received_count: hops,
                write_failed: failed,
                from_check,
                header_utf8: false,
                eight_bit: false,
                size,
                transaction: TransactionFacts {
                    from: &from,
                    params: &params,
                },
                recipients: &recipients,
                helo: "client.test",
                route: &seven_bit,
            });
            run(
                &p,
                Evaluation::new(Stage::DataEnd),
                &facts(&c, "192.0.2.1", None, input),
                allowed,
            )
            .1
        };
        // Every rule would fire; each row takes away the one that fired before.
        let io = Some(WriteFailure::Io);
        let full = Some(WriteFailure::StorageFull);
        let no_from = check.as_ref();
        assert_eq!(
            end(Some("Subject"), 3, io, no_from, 500),
            Some("header_too_large")
        );
        assert_eq!(end(None, 3, io, no_from, 500), Some("hop_limit"));
        assert_eq!(end(None, 2, io, no_from, 500), Some("spool_write"));
        assert_eq!(end(None, 2, full, no_from, 500), Some("min_free_space"));
        assert_eq!(
            end(None, 2, None, no_from, 500),
            Some("from_header_missing")
        );
        assert_eq!(end(None, 2, None, None, 500), Some("route_size"));
        assert_eq!(end(None, 2, None, None, 50), None);
    }

    #[test]
    fn a_lookup_started_at_connect_is_awaited_at_rcpt() {
        // The shape a DNSBL check takes: started with the connection, read at each RCPT.
        let (_d, c, p) = policy();
        const AT_CONNECT: &[Check] = &[Check::ListenerAllow, Check::Start(Lookup::Echo(7))];
        const AT_RCPT: &[Check] = &[Check::Await(Lookup::Echo(7))];
        let connect = facts(&c, "192.0.2.1", None, Input::Connect);
        let (asked, rule) = run(&p, Evaluation::of(AT_CONNECT), &connect, allowed);
        assert_eq!((asked, rule), (vec![Effect::Start(Lookup::Echo(7))], None));
        let mut read = Evaluation::of(AT_RCPT);
        let Verdict::Effect(Effect::Await(Lookup::Echo(7))) = p.evaluate(&mut read, &connect, None)
        else {
            panic!("the lookup is not awaited");
        };
        let answer = Answer::Looked(LookupResult::Echo(7));
        assert!(matches!(
            p.evaluate(&mut read, &connect, Some(answer)),
            Verdict::Accept
        ));
    }

    fn spf(result: SpfResult) -> SpfCheck {
        SpfCheck {
            result,
            identity: crate::dns::verify::SpfIdentity::MailFrom,
            subject: "a@sender.test".into(),
            domain: "sender.test".into(),
            detail: None,
        }
    }

    fn bl_zone(threshold: u32) -> impl FnOnce(&mut Config) {
        move |c: &mut Config| {
            c.dnsbl.threshold = threshold;
            c.dnsbl.exempt = vec!["192.0.2.77/32".parse().unwrap()];
            c.dnsbl.zones = vec![crate::config::DnsblZone {
                zone: "key.bl.test".into(),
                name: "bl.test".into(),
                weight: 1,
                answers: None,
            }];
        }
    }

    #[test]
    fn connect_starts_dnsbl_and_iprev_lookups_for_untrusted_clients_only() {
        let rate = |ip| Effect::Rate(RateLimit::ConnectionsPerIp, client(ip));
        let connect = |p: &Policy, c: &Config, ip| {
            run(
                p,
                Evaluation::new(Stage::Connect),
                &facts(c, ip, None, Input::Connect),
                allowed,
            )
        };
        let (_d, c, p) = policy();
        assert_eq!(
            connect(&p, &c, "192.0.2.1"),
            (vec![rate("192.0.2.1")], None)
        );
        let (_d, c, p) = policy_with(|c| {
            bl_zone(1)(c);
            c.spf.verify = Verify::Record;
        });
        let (dnsbl, iprev) = (Effect::Start(Lookup::Dnsbl), Effect::Start(Lookup::Iprev));
        assert_eq!(
            connect(&p, &c, "192.0.2.1"),
            (vec![rate("192.0.2.1"), dnsbl, iprev.clone()], None)
        );
        // `[dnsbl] exempt` is never looked up; relay_networks are looked up for nothing.
        assert_eq!(
            connect(&p, &c, "192.0.2.77"),
            (vec![rate("192.0.2.77"), iprev], None)
        );
        assert_eq!(
            connect(&p, &c, "192.0.2.130"),
            (vec![rate("192.0.2.130")], None)
        );
        // Refused at connect: nothing is looked up.
        assert_eq!(
            connect(&p, &c, "192.0.2.66"),
            (vec![], Some("listener_deny"))
        );
    }

    #[test]
    fn mail_checks_spf_after_the_budgets_and_before_space_and_refuses_only_under_enforce() {
        let from = ReversePath::Address(Address::parse("a@sender.test").unwrap());
        let mail = |p: &Policy, c: &Config, ip, user, result| {
            let input = Input::Mail {
                from: &from,
                size: Some(10),
                helo: "client.test",
            };
            let answer = move |e: &Effect| match e {
                Effect::Spf => Answer::Spf(spf(result)),
                _ => Answer::Allowed,
            };
            let (asked, rule) = run(
                p,
                Evaluation::new(Stage::Mail),
                &facts(c, ip, user, input),
                answer,
            );
            let kinds: Vec<&str> = asked
                .iter()
                .map(|e| match e {
                    Effect::Spf => "spf",
                    Effect::ReserveSpace { .. } => "space",
                    _ => "rate",
                })
                .collect();
            (kinds, rule)
        };
        let (_d, c, p) = policy_with(|c| c.spf.verify = Verify::Enforce);
        let ip = "192.0.2.1";
        assert_eq!(
            mail(&p, &c, ip, None, SpfResult::Fail),
            (vec!["rate", "spf"], Some("spf"))
        );
        assert_eq!(mail(&p, &c, ip, None, SpfResult::TempError).1, Some("spf"));
        for recorded in [
            SpfResult::SoftFail,
            SpfResult::PermError,
            SpfResult::None,
            SpfResult::Neutral,
        ] {
            assert_eq!(
                mail(&p, &c, ip, None, recorded),
                (vec!["rate", "spf", "space"], None),
                "{recorded:?}"
            );
        }
        // Trusted senders are not checked.
        assert_eq!(
            mail(&p, &c, "192.0.2.130", None, SpfResult::Fail),
            (vec!["rate", "space"], None)
        );
        let owned = ReversePath::Address(Address::parse("alice@example.com").unwrap());
        let input = Input::Mail {
            from: &owned,
            size: Some(10),
            helo: "client.test",
        };
        let (asked, rule) = run(
            &p,
            Evaluation::new(Stage::Mail),
            &facts(&c, ip, Some("alice"), input),
            allowed,
        );
        assert!(!asked.contains(&Effect::Spf) && rule.is_none(), "{asked:?}");
        // record, or SPF run only for DMARC: never refused.
        let (_d, c, p) = policy_with(|c| c.spf.verify = Verify::Record);
        assert_eq!(
            mail(&p, &c, ip, None, SpfResult::Fail),
            (vec!["rate", "spf", "space"], None)
        );
        let (_d, c, p) = policy_with(|c| c.dmarc.verify = Verify::Enforce);
        assert_eq!(
            mail(&p, &c, ip, None, SpfResult::Fail),
            (vec!["rate", "spf", "space"], None)
        );
        let (_d, c, p) = policy();
        assert_eq!(
            mail(&p, &c, ip, None, SpfResult::Fail),
            (vec!["rate", "space"], None)
        );
    }

    #[test]
    fn spf_refusals_carry_the_rfc_7372_codes() {
        let (_d, _c, p) = policy_with(|c| c.spf.verify = Verify::Enforce);
        let fail = p.spf_refusal(&spf(SpfResult::Fail)).unwrap();
        assert_eq!(
            (fail.reply.code, fail.reply.enhanced, fail.rule),
            (550, "5.7.23", "spf")
        );
        let temp = p.spf_refusal(&spf(SpfResult::TempError)).unwrap();
        assert_eq!(
            (temp.reply.code, temp.reply.enhanced, temp.rule),
            (451, "4.7.24", "spf")
        );
        assert!(p.spf_refusal(&spf(SpfResult::Pass)).is_none());
    }

    fn listed(score: u32) -> DnsblCheck {
        DnsblCheck {
            listed: vec![crate::dns::dnsbl::Listing {
                name: "bl.test".into(),
                weight: score,
                answer: "127.0.0.2".parse().unwrap(),
            }],
            score,
            errors: 0,
        }
    }

    #[test]
    fn rcpt_refuses_a_listed_client_at_each_recipient_but_postmaster() {
        let from = ReversePath::Null;
        let params = MailParams::default();
        let rcpt = |p: &Policy, c: &Config, ip, to: &str, found: DnsblCheck| {
            let to = Address::parse(to).unwrap();
            let input = rcpt_in_transaction(&to, &from, &params, Some(ROUTE));
            let answer = move |e: &Effect| match e {
                Effect::Await(Lookup::Dnsbl) => Answer::Looked(LookupResult::Dnsbl(found.clone())),
                _ => Answer::Allowed,
            };
            let (asked, rule) = run(
                p,
                Evaluation::new(Stage::Rcpt),
                &facts(c, ip, None, input),
                answer,
            );
            (asked.contains(&Effect::Await(Lookup::Dnsbl)), rule)
        };
        let (_d, c, p) = policy_with(bl_zone(1));
        let ip = "192.0.2.1";
        assert_eq!(
            rcpt(&p, &c, ip, "u@example.com", listed(1)),
            (true, Some("dnsbl"))
        );
        assert_eq!(
            rcpt(&p, &c, ip, "u@example.com", DnsblCheck::default()),
            (true, None)
        );
        // Relaying is refused as such first; postmaster is never refused by a list.
        assert_eq!(
            rcpt(&p, &c, ip, "u@other.test", listed(1)),
            (false, Some("relay_denied"))
        );
        assert_eq!(
            rcpt(&p, &c, ip, "PostMaster@example.com", listed(1)),
            (false, None)
        );
        assert_eq!(
            rcpt(&p, &c, "192.0.2.77", "u@example.com", listed(1)),
            (false, None)
        );
        let (_d, c, p) = policy_with(bl_zone(2));
        assert_eq!(rcpt(&p, &c, ip, "u@example.com", listed(1)), (true, None));
        assert_eq!(
            rcpt(&p, &c, ip, "u@example.com", listed(2)).1,
            Some("dnsbl")
        );
    }

    #[test]
    fn a_dnsbl_refusal_names_the_client_and_the_lists() {
        let (_d, c, p) = policy_with(bl_zone(1));
        let to = Address::parse("u@example.com").unwrap();
        let input = Input::Rcpt(RcptFacts {
            to: &to,
            bare_postmaster: false,
            transaction: None,
            route: None,
        });
        let f = facts(&c, "::ffff:192.0.2.9", None, input);
        let r = p.dnsbl_refusal(&f, &listed(1)).expect("refused");
        assert_eq!(
            r.reply.to_string(),
            "550 5.7.1 Service unavailable; client [192.0.2.9] blocked using bl.test"
        );
        assert_eq!(
            r.detail,
            Some(Detail::Dnsbl("bl.test=127.0.0.2 score=1".into()))
        );
    }

    fn checks(from: FromDomain, result: DmarcResult, policy: DmarcPolicy) -> MessageChecks {
        MessageChecks {
            dkim: Vec::new(),
            arc: None,
            dmarc: Some(crate::dns::verify::DmarcCheck {
                result,
                domain: "spoof.test".into(),
                policy,
                own_domain: false,
                detail: None,
            }),
            from,
        }
    }

    /// The end-of-data stage with every other check passing, answering the verification
    /// with `found`: whether it was asked for, and the rule that refused.
    fn end_of_data(
        p: &Policy,
        c: &Config,
        ip: &str,
        user: Option<&str>,
        found: Answer,
    ) -> (Vec<Effect>, Option<&'static str>) {
        let from = ReversePath::Null;
        let params = MailParams::default();
        let recipients = [Address::parse("u@example.com").unwrap()];
        let route = |_: &str| None;
        let input = Input::DataEnd(EndOfData {
            header_too_large: None,
            received_count: 0,
            write_failed: None,
            from_check: None,
            header_utf8: false,
            eight_bit: false,
            size: 10,
            transaction: TransactionFacts {
                from: &from,
                params: &params,
            },
            recipients: &recipients,
            helo: "client.test",
            route: &route,
        });
        let mut found = Some(found);
        run(
            p,
            Evaluation::new(Stage::DataEnd),
            &facts(c, ip, user, input),
            move |_| found.take().unwrap_or(Answer::Allowed),
        )
    }

    #[test]
    fn end_of_data_verifies_untrusted_mail_and_enforces_dmarc_reject_and_single_from() {
        use DmarcPolicy::{Quarantine, Reject};
        use DmarcResult::{Fail, Pass, TempError};
        let one = || FromDomain::One("spoof.test".into());
        let authenticated =
            |from, result, policy| Answer::Authenticated(Box::new(checks(from, result, policy)));
        let (_d, c, p) = policy_with(|c| c.dmarc.verify = Verify::Enforce);
        let ip = "192.0.2.1";
        let rule = |answer| end_of_data(&p, &c, ip, None, answer).1;
        assert_eq!(rule(authenticated(one(), Fail, Reject)), Some("dmarc"));
        assert_eq!(
            rule(authenticated(FromDomain::Missing, Pass, Reject)),
            Some("dmarc")
        );
        assert_eq!(
            rule(authenticated(FromDomain::Several, Pass, Reject)),
            Some("dmarc")
        );
        assert_eq!(rule(authenticated(one(), Fail, Quarantine)), None);
        assert_eq!(rule(authenticated(one(), TempError, Reject)), None);
        assert_eq!(rule(authenticated(one(), Pass, Reject)), None);
        assert_eq!(rule(Answer::AuthenticationBusy), Some("mail_auth_busy"));
        assert_eq!(
            end_of_data(&p, &c, ip, None, Answer::Allowed).0,
            vec![Effect::Authenticate { dmarc: true }]
        );
        // Trusted mail is not verified.
        assert_eq!(
            end_of_data(&p, &c, "192.0.2.130", None, Answer::AuthenticationBusy),
            (vec![], None)
        );
        assert_eq!(
            end_of_data(&p, &c, ip, Some("alice"), Answer::AuthenticationBusy),
            (vec![], None)
        );
        // record: verified and recorded, never refused.
        let (_d, c, p) = policy_with(|c| c.dmarc.verify = Verify::Record);
        let rule = |answer| end_of_data(&p, &c, ip, None, answer).1;
        assert_eq!(rule(authenticated(one(), Fail, Reject)), None);
        assert_eq!(rule(authenticated(FromDomain::Missing, Pass, Reject)), None);
        // DKIM alone: no DMARC asked for.
        let (_d, c, p) = policy_with(|c| c.dkim.verify = true);
        assert_eq!(
            end_of_data(&p, &c, ip, None, Answer::Allowed).0,
            vec![Effect::Authenticate { dmarc: false }]
        );
        let (_d, c, p) = policy();
        assert_eq!(
            end_of_data(&p, &c, ip, None, Answer::Allowed),
            (vec![], None)
        );
    }

    #[test]
    fn the_quarantine_field_is_added_for_dmarc_quarantine_under_enforce_only() {
        let one = || FromDomain::One("spoof.test".into());
        let (_d, _c, p) = policy_with(|c| c.dmarc.verify = Verify::Enforce);
        let quarantine = checks(one(), DmarcResult::Fail, DmarcPolicy::Quarantine);
        assert_eq!(
            p.quarantine_field(&quarantine).as_deref(),
            Some("X-Portcullis-Quarantine: dmarc\r\n")
        );
        assert_eq!(
            p.quarantine_field(&checks(one(), DmarcResult::Pass, DmarcPolicy::Quarantine)),
            None
        );
        assert_eq!(
            p.quarantine_field(&checks(one(), DmarcResult::Fail, DmarcPolicy::None)),
            None
        );
        let (_d, _c, p) = policy_with(|c| c.dmarc.verify = Verify::Record);
        assert_eq!(p.quarantine_field(&quarantine), None);
    }

    #[test]
    fn a_signing_failure_is_a_temporary_refusal() {
        let (_d, _c, p) = policy();
        let failed = Answer::SignFailed(SignError::Failed {
            domain: "example.com".into(),
            selector: "s".into(),
            reason: "key".into(),
        });
        let f = StageFacts {
            session: SessionFacts {
                client_ip: "192.0.2.130".parse().unwrap(),
                user: None,
            },
            listener: &_c.listeners[0],
            input: Input::Connect,
        };
        let r = p.answered(failed, &f).expect("refused");
        assert_eq!(
            (r.reply.code, r.reply.enhanced, r.rule),
            (451, "4.3.0", "dkim_sign")
        );
    }
}
