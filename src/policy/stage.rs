//! The stage evaluator: one verdict type for every SMTP stage, and the order of the checks of
//! each stage declared once, here ([`Stage::checks`]).
//!
//! A stage is evaluated by [`Policy::evaluate`], sans-IO: each call runs the stage's checks in
//! order until one refuses ([`Verdict::Refuse`]), one needs something only the driver can do
//! ([`Verdict::Effect`]), or all have passed ([`Verdict::Accept`]). The driver carries an
//! effect out and calls again with its [`Answer`]; evaluation goes on from the check that
//! asked. So a check that needs a shared counter, a password verification or (next) a DNS
//! lookup is a new [`Check`] and, when it needs something new done, a new [`Effect`]: the
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
use super::{Policy, Refusal, SessionFacts};
use crate::config::Listener;
use crate::envelope::{Address, MailParams, ReversePath};
use crate::policy::access::{contains, normalize};
use crate::policy::credentials::CheckError;
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
    /// `[rate_limits] connections_per_ip` (an effect): `421 4.7.0`.
    ConnectionRate,
    /// The AUTH lockout gate (an effect): `454 4.7.0`, rule `auth_lockout`; a client whose
    /// budget stays held by verifications in flight: `454 4.7.0`, rule `auth_busy`.
    AuthLockout,
    /// Verify the password (an effect): `535 5.7.8`, rule `auth_bad_password` or
    /// `auth_unknown_user`; a verifier that cannot check: `454 4.7.0`,
    /// `auth_verifier_failed`; no verifier free: `auth_busy`.
    AuthPassword,
    /// An authenticated user may use only the senders it owns: `553 5.7.1`, rule
    /// `sender_not_owned`.
    SenderOwned,
    /// `[rate_limits] messages_per_user` (an effect, authenticated sessions): `451 4.7.1`.
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
            Stage::Connect => &[ListenerDeny, ListenerAllow, ConnectionRate],
            // Nothing is checked at HELO yet (an SPF check of the HELO name would go here).
            Stage::Helo => &[],
            Stage::Auth => &[AuthLockout, AuthPassword],
            // The user's budget first: a compromised account is stopped wherever it
            // connects from. Space is reserved last, once the message may come.
            Stage::Mail => &[SenderOwned, UserMessageRate, ClientMessageRate, SpoolSpace],
            Stage::Rcpt => &[RecipientAllowed, RouteCarries, RecipientRate],
            Stage::DataEnd => &[HeaderSize, HopLimit, SpoolWritten, FromHeader, RoutesCarry],
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
}

/// An asynchronous lookup that may be started at one stage and read at a later one. A DNS
/// lookup (DNSBL, SPF) is a variant here, answered by the driver's resolver.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Lookup {
    /// A lookup that answers its own number: shows the start/await shape in tests.
    #[cfg(test)]
    Echo(u32),
}

/// What a lookup found.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LookupResult {
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
    /// The verification itself failed (not the client's fault): nothing counted.
    VerifierFailed(CheckError),
    /// The spool's free space, minus messages in flight, is below `min_free_space`; the
    /// numbers for the log.
    NoSpace(String),
    /// The spool's free space could not be read.
    SpaceUnknown(String),
    /// What a lookup found.
    Looked(LookupResult),
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
    /// MAIL FROM with its declared SIZE (RFC 1870), if any.
    Mail {
        from: &'a ReversePath,
        size: Option<u64>,
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
    /// The `From:` check of an authenticated message (see [`Policy::from_check`]), fed the
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

    /// Run one check: [`Verdict::Accept`] when it passes.
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
            (Check::Start(lookup), _) => effect(Effect::Start(lookup)),
            (Check::Await(lookup), _) => effect(Effect::Await(lookup)),
            (check, Input::DataEnd(end)) => refused(self.end_of_data(check, end)),
            _ => Verdict::Accept,
        }
    }

    /// RCPT: the relay rules, postmaster excepted (RFC 5321 §4.5.1).
    fn recipient_allowed(&self, facts: &StageFacts<'_>, r: &RcptFacts<'_>) -> Result<(), Refusal> {
        if self.is_postmaster(r.to, r.bare_postmaster) {
            tracing::debug!(to = %r.to, "postmaster recipient");
            return Ok(());
        }
        self.rcpt(&facts.session, r.to)
    }

    /// One check of the end-of-data stage.
    fn end_of_data(&self, check: Check, end: &EndOfData<'_>) -> Result<(), Refusal> {
        match check {
            Check::HeaderSize => match end.header_too_large {
                Some(name) => Err(Refusal::new(reply::HEADER_TOO_LARGE, "header_too_large")
                    .with_detail(format!("field {name}"))),
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
        let shown = || super::lockout::login_key(login).to_string();
        let refusal = match answer {
            Answer::Allowed | Answer::Looked(_) => return None,
            Answer::Limited(l) => Refusal::new(l.reply(), l.rule)
                .with_detail(format!("limit {}", l.limit_text()))
                .warning(),
            Answer::LockedOut => Refusal::new(reply::AUTH_LOCKED_OUT, "auth_lockout")
                .with_detail(shown())
                .warning(),
            Answer::Busy => Refusal::new(reply::AUTH_TEMPORARY, "auth_busy").with_detail(shown()),
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
                    .with_detail(format!("{}: {error}", shown()))
                    .warning()
            }
            Answer::NoSpace(detail) => Refusal::new(reply::INSUFFICIENT_STORAGE, "min_free_space")
                .with_detail(detail)
                .warning(),
            Answer::SpaceUnknown(detail) => {
                Refusal::new(reply::LOCAL_ERROR, "spool_statvfs").with_detail(detail)
            }
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
            Some(a) => r.with_detail(a),
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
