//! `portcullis policy explain`: a session played without a socket, through the same code a
//! real one runs, to show why a client would be refused (or accepted) and with which reply.
//!
//! The dialogue is the protocol engine's ([`crate::smtp::Session`], configured for the
//! listener by `connection::session_config`, as the session driver configures it):
//! the greeting, `EHLO`, `STARTTLS` when asked for (the handshake is taken as done), `AUTH
//! PLAIN` as the login when one is given, `MAIL FROM`, then each `RCPT TO`. Every stage is
//! decided by [`Policy::evaluate`] with the checks of [`crate::policy::stage::Stage::checks`];
//! what the engine refuses by itself (`require_tls`, `auth = "required"`, AUTH before TLS)
//! comes from the engine. Nothing here decides a rule: only the effects are answered
//! differently from a session's (`Answers`):
//!
//! - the pause and the connection caps of the accept loop, rate budgets and the AUTH lockout
//!   gate from a [`ClientState`]: the running relay's ([`running_state`], read through its
//!   admin API, nothing taken) or a fresh store's ("empty state": no connection open, not
//!   paused). A budget is counted down within the run (two recipients take two), never on
//!   the relay;
//! - the password is not verified: the login is taken as authenticated (a login the users
//!   file does not hold is refused as the relay refuses it);
//! - spool space is not reserved;
//! - DNS lookups (DNSBL, SPF) run through the configured resolver, exactly as a session's
//!   ([`super::effects`]), unless `--no-dns`; iprev is not looked up (it only feeds the
//!   `Authentication-Results:` field).
//!
//! End-of-data checks need the message and are listed as not evaluated.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use serde::Serialize;

use super::connection::{rcpt_input, session_config};
use super::effects::{resolve, spf_check};
use super::listener::AtAccept;
use crate::config::units::parse_rate;
use crate::config::{Config, Listener, ListenerTls, Rate};
use crate::dns::Resolver;
use crate::dns::verify::{SpfCheck, SpfIdentity, SpfResult};
use crate::envelope::{Address, ReversePath};
use crate::observe::Telemetry;
use crate::policy::limits::{Limited, RateLimit};
use crate::policy::stage::{
    Answer, Check, Effect, Evaluation, Input, Lookup, LookupResult, StageFacts, Verdict,
};
use crate::policy::store::ClientState;
use crate::policy::{Policy, Refusal, SessionFacts};
use crate::queue::Spool;
use crate::queue::suspended::Suspension;
use crate::routes::CapabilityBook;
use crate::smtp::{Event, Session};

/// What the running relay's stateful rules say of the client `ip` (and `login`) now, taking
/// nothing: the pause and connection caps (`counter`, the listeners' own count; `paused`,
/// the listeners' gate), then the rate budgets and the AUTH lockout of `runtime`'s store.
/// The relay answers `/api/explain-state` with it.
pub fn running_state(
    runtime: &super::Runtime,
    counter: &super::ConnectionCounter,
    paused: bool,
    ip: IpAddr,
    login: Option<&str>,
) -> ClientState {
    let mut state = runtime
        .policy
        .store()
        .client_state(ip, login, Instant::now());
    let limits = &runtime.config.limits;
    let refused = if paused {
        Some(AtAccept::Paused)
    } else {
        counter
            .admission(ip, limits.max_connections, limits.max_connections_per_ip)
            .err()
            .map(AtAccept::Full)
    };
    state.at_accept = refused.map(|r| r.refusal().1.to_string());
    state
}

/// The HELO name used when none is given.
pub const DEFAULT_HELO: &str = "client.invalid";

/// The password sent in the played `AUTH` (never verified).
const PLAYED_PASSWORD: &str = "not-verified";

/// The end-of-data checks, which need the message: listed as not evaluated.
pub const NOT_EVALUATED: [&str; 4] = ["From: ownership", "DKIM", "DMARC", "header firewall"];

/// Why there is nothing to explain: the operator's input does not fit the policy (exit 2).
#[derive(Debug, thiserror::Error)]
pub enum ExplainError {
    /// `--listener` names no `[[listeners]]` entry.
    #[error("no listener named {name:?} (the policy has: {known})")]
    UnknownListener {
        /// The name given.
        name: String,
        /// The names the policy has, comma-separated.
        known: String,
    },
    /// `--from` or `--rcpt` is not an address.
    #[error("{option} {value:?}: not an address ({reason})")]
    BadAddress {
        /// `--from` or `--rcpt`.
        option: &'static str,
        /// What was given.
        value: String,
        /// Why it does not parse.
        reason: String,
    },
    /// `--helo` is not a name the engine could be sent in one command line.
    #[error("--helo {0:?}: not a HELO name")]
    BadHelo(String),
    /// `--user` cannot be sent in an AUTH command.
    #[error("--user {0:?}: not a login that can be sent")]
    BadUser(String),
}

/// What to explain: the command line of `portcullis policy explain`.
#[derive(Debug, Clone)]
pub struct Request {
    /// `--listener`: a `[[listeners]] name`.
    pub listener: String,
    /// `--ip`: the client's address.
    pub ip: IpAddr,
    /// `--helo` ([`DEFAULT_HELO`] when not given).
    pub helo: String,
    /// `--tls`: the client starts TLS (STARTTLS on a `starttls` listener).
    pub tls: bool,
    /// `--user`: the login the client authenticates as (its password is not checked).
    pub user: Option<String>,
    /// `--from`: the reverse-path (`<>` or an empty string: the null sender).
    pub from: String,
    /// `--rcpt`, in order (at least one).
    pub rcpts: Vec<String>,
    /// DNS checks run (false: `--no-dns`).
    pub dns: bool,
}

/// Where the stateful rules' answers came from.
#[derive(Debug, Clone, Serialize)]
pub struct StateOrigin {
    /// Read from the running relay's admin API.
    pub live: bool,
    /// `running relay at ADDR`, or `empty state: WHY`.
    pub text: String,
}

/// One check of a stage and what it found.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct CheckOutcome {
    /// The check, e.g. `listener_allow`, `rate(rate_limits.messages_per_ip)`.
    pub check: String,
    /// `passed`, `refused`, or what its effect was answered (`allowed: 4 left`).
    pub outcome: String,
}

/// One command of the played dialogue.
#[derive(Debug, Clone, Serialize)]
pub struct Step {
    /// `connect`, `ehlo`, `starttls`, `auth`, `mail` or `rcpt`.
    pub stage: &'static str,
    /// The command sent (`AUTH PLAIN` without its response), or the connection.
    pub command: String,
    /// The policy checks run, in order (none when the engine answered by itself).
    pub checks: Vec<CheckOutcome>,
    /// The rule that refused (`None`: accepted).
    pub rule: Option<String>,
    /// The reply the client gets (its first line for a multi-line reply).
    pub reply: String,
    /// The connection is closed after this reply.
    pub closed: bool,
}

/// The whole explanation.
#[derive(Debug, Clone, Serialize)]
pub struct Report {
    /// The listener's name.
    pub listener: String,
    /// The client's address.
    pub ip: IpAddr,
    /// `--tls` was given.
    pub tls: bool,
    /// The login the client authenticated as (`--user`).
    pub user: Option<String>,
    /// Where rate budgets and lockouts came from.
    pub state: StateOrigin,
    /// Always false: explain never verifies a password (a login is taken as authenticated).
    pub password_checked: bool,
    /// DNS checks were performed (false: `--no-dns`).
    pub dns: bool,
    /// The policy has DNS checks (DNSBL zones, SPF, DKIM or DMARC verification).
    pub dns_configured: bool,
    /// The played commands, in order, up to the first refusal before RCPT (every RCPT).
    pub steps: Vec<Step>,
    /// Checks that need the message, not evaluated.
    pub not_evaluated: Vec<&'static str>,
    /// The verdict: the first refusal's reply, else the last reply.
    pub reply: String,
    /// The rule of the first refusal (`None`: accepted).
    pub rule: Option<String>,
}

/// Explain `request` under `config`. `state`: the running relay's [`ClientState`] for the
/// client and login with where it came from, or `Err(why)` for empty state (`why` is said in
/// the output). `resolver`: the one DNS checks use (`None`: no DNS check looks anything up).
///
/// # Errors
/// [`ExplainError`] when the request does not fit the policy (unknown listener, a malformed
/// address).
pub async fn explain(
    config: &Config,
    request: &Request,
    state: Result<(ClientState, String), String>,
    resolver: Option<Resolver>,
) -> Result<Report, ExplainError> {
    let listener = config
        .listeners
        .iter()
        .find(|l| l.name == request.listener)
        .ok_or_else(|| ExplainError::UnknownListener {
            name: request.listener.clone(),
            known: config
                .listeners
                .iter()
                .map(|l| l.name.as_str())
                .collect::<Vec<_>>()
                .join(", "),
        })?;
    let commands = Commands::of(request)?;
    let now = Instant::now();
    let policy = Policy::new(config, None, now);
    let (client_state, origin) = match state {
        Ok((s, text)) => (s, StateOrigin { live: true, text }),
        Err(why) => (
            policy
                .store()
                .client_state(request.ip, request.user.as_deref(), now),
            StateOrigin {
                live: false,
                text: format!("empty state: {why}"),
            },
        ),
    };
    let answers = Answers::new(config, client_state, request, resolver);
    let mut play = Play {
        policy,
        listener,
        ip: request.ip,
        session: Session::new(session_config(config, listener, config.tls.is_some())),
        routes: CapabilityBook::load(&config.upstreams, Some(&config.server.spool_dir)),
        answers,
        steps: Vec::new(),
    };
    play.run(&commands, request).await;
    let mut report = play.report(request, origin);
    report.dns_configured = config.needs_resolver();
    Ok(report)
}

/// The command lines to play, checked before anything is played.
struct Commands {
    helo: String,
    auth: Option<String>,
    mail: String,
    rcpts: Vec<String>,
}

impl Commands {
    fn of(request: &Request) -> Result<Commands, ExplainError> {
        let line_safe = |s: &str| !s.is_empty() && !s.bytes().any(|b| b.is_ascii_control());
        if !line_safe(&request.helo) || request.helo.contains(' ') {
            return Err(ExplainError::BadHelo(request.helo.clone()));
        }
        let auth = match &request.user {
            Some(user) if !line_safe(user) => return Err(ExplainError::BadUser(user.clone())),
            Some(user) => Some(auth_plain(user)),
            None => None,
        };
        let from = request.from.trim();
        let from = from
            .strip_prefix('<')
            .and_then(|f| f.strip_suffix('>'))
            .unwrap_or(from);
        if !from.is_empty() {
            parse_address("--from", from)?;
        }
        let rcpts = request
            .rcpts
            .iter()
            .map(|r| {
                let r = r.trim();
                let r = r
                    .strip_prefix('<')
                    .and_then(|r| r.strip_suffix('>'))
                    .unwrap_or(r);
                // `<postmaster>` without a domain is a recipient of its own (RFC 5321 §4.5.1).
                if !r.eq_ignore_ascii_case("postmaster") {
                    parse_address("--rcpt", r)?;
                }
                Ok(format!("RCPT TO:<{r}>"))
            })
            .collect::<Result<Vec<_>, ExplainError>>()?;
        // A client with a non-ASCII address says SMTPUTF8 (RFC 6531 §3.4), as any would.
        let utf8 = !from.is_ascii() || request.rcpts.iter().any(|r| !r.is_ascii());
        let smtputf8 = if utf8 { " SMTPUTF8" } else { "" };
        Ok(Commands {
            helo: format!("EHLO {}", request.helo),
            auth,
            mail: format!("MAIL FROM:<{from}>{smtputf8}"),
            rcpts,
        })
    }
}

fn parse_address(option: &'static str, value: &str) -> Result<Address, ExplainError> {
    if value.bytes().any(|b| b.is_ascii_control() || b == b'>') {
        return Err(ExplainError::BadAddress {
            option,
            value: value.to_string(),
            reason: "control character or '>'".to_string(),
        });
    }
    Address::parse(value).map_err(|e| ExplainError::BadAddress {
        option,
        value: value.to_string(),
        reason: e.to_string(),
    })
}

/// `AUTH PLAIN` with the initial response for `login` (RFC 4616).
fn auth_plain(login: &str) -> String {
    use base64::Engine as _;
    let response = format!("\0{login}\0{PLAYED_PASSWORD}");
    let encoded = base64::engine::general_purpose::STANDARD.encode(response);
    format!("AUTH PLAIN {encoded}")
}

/// The played session.
struct Play<'a> {
    policy: Policy,
    listener: &'a Listener,
    ip: IpAddr,
    session: Session,
    routes: CapabilityBook,
    answers: Answers,
    steps: Vec<Step>,
}

impl Play<'_> {
    /// Connect, then each command until one before RCPT is refused or the connection
    /// closes; every RCPT is played.
    async fn run(&mut self, commands: &Commands, request: &Request) {
        if !self.connect().await {
            return;
        }
        let mut lines = vec![("ehlo", commands.helo.clone())];
        if request.tls && self.listener.tls != ListenerTls::Implicit {
            lines.push(("starttls", "STARTTLS".to_string()));
            lines.push(("ehlo", commands.helo.clone()));
        }
        if let Some(auth) = &commands.auth {
            lines.push(("auth", auth.clone()));
        }
        lines.push(("mail", commands.mail.clone()));
        for (stage, line) in lines {
            let step = self.command(stage, &line).await;
            let stop = step.rule.is_some() || step.closed;
            self.steps.push(step);
            if stop {
                return;
            }
        }
        for line in &commands.rcpts {
            let step = self.command("rcpt", line).await;
            let closed = step.closed;
            self.steps.push(step);
            if closed {
                return;
            }
        }
    }

    /// The connect stage and the greeting; false when the client is refused.
    async fn connect(&mut self) -> bool {
        let command = format!("connection from {} to {}", self.ip, self.listener.name);
        // Refused by the accept loop (paused, a connection cap): no session at all.
        let at_accept = self.answers.state.at_accept.as_deref();
        if let Some(refused) = at_accept.and_then(AtAccept::from_rule) {
            let (reply, rule) = refused.refusal();
            self.session.close_with(&reply);
            let reply = self.take_reply();
            self.steps.push(Step {
                stage: "connect",
                command,
                checks: vec![CheckOutcome {
                    check: "accept".to_string(),
                    outcome: format!("refused ({rule})"),
                }],
                rule: Some(rule.to_string()),
                reply,
                closed: true,
            });
            return false;
        }
        let mut checks = Vec::new();
        let verdict = {
            let facts = StageFacts {
                session: SessionFacts {
                    client_ip: self.ip,
                    user: None,
                },
                listener: self.listener,
                input: Input::Connect,
            };
            decide(&self.policy, &mut self.answers, &facts, &mut checks).await
        };
        let (rule, closed) = match &verdict {
            // A `421` closes the connection at once (see the session driver's run).
            Err(r) if r.reply.code == 421 => {
                self.session.close_with(&r.reply);
                (Some(r.rule.to_string()), true)
            }
            Err(r) => {
                self.session.refuse(&r.reply);
                (Some(r.rule.to_string()), false)
            }
            Ok(()) => {
                self.session.greet();
                (None, false)
            }
        };
        let refused = rule.is_some();
        let reply = self.take_reply();
        self.steps.push(Step {
            stage: "connect",
            command,
            checks,
            rule,
            reply,
            closed,
        });
        !refused
    }

    /// Send one command line and answer the engine's events as the session driver does.
    async fn command(&mut self, stage: &'static str, line: &str) -> Step {
        let mut step = Step {
            stage,
            command: shown(line),
            checks: Vec::new(),
            rule: None,
            reply: String::new(),
            closed: false,
        };
        self.session.receive(format!("{line}\r\n").as_bytes());
        loop {
            match self.session.poll() {
                Event::NeedInput | Event::Flush => break,
                Event::Close => {
                    step.closed = true;
                    break;
                }
                Event::Rejected { rule, .. } => step.rule = Some(rule.to_string()),
                Event::StartTls { .. } => self.session.tls_started(),
                Event::Helo { name, .. } => {
                    let input = Input::Helo { name: &name };
                    let verdict = self.stage(input, &mut step.checks).await;
                    self.answer(verdict, &mut step);
                }
                Event::Auth(credentials) => {
                    let input = Input::Auth {
                        login: &credentials.login,
                        password: &credentials.password,
                    };
                    let verdict = self.stage(input, &mut step.checks).await;
                    self.answer(verdict, &mut step);
                }
                Event::Mail { from, params } => {
                    let verdict = self.mail(&from, params.size, &mut step.checks).await;
                    self.answer(verdict, &mut step);
                }
                Event::Rcpt(to) => {
                    let verdict = self.rcpt(&to, &mut step.checks).await;
                    self.answer(verdict, &mut step);
                }
                // Nothing played reaches DATA.
                Event::DataStart | Event::DataChunk | Event::DataEnd | Event::DataRejected(_) => {
                    break;
                }
            }
        }
        step.reply = self.take_reply();
        step
    }

    async fn mail(
        &mut self,
        from: &ReversePath,
        size: Option<u64>,
        checks: &mut Vec<CheckOutcome>,
    ) -> Result<(), Refusal> {
        let helo = self.session.helo().unwrap_or_default().to_string();
        let input = Input::Mail {
            from,
            size,
            helo: &helo,
        };
        self.stage(input, checks).await
    }

    async fn rcpt(&mut self, to: &Address, checks: &mut Vec<CheckOutcome>) -> Result<(), Refusal> {
        let route = self.routes.for_domain(to.domain());
        let session = &self.session;
        let facts = StageFacts {
            session: SessionFacts {
                client_ip: self.ip,
                user: session.user(),
            },
            listener: self.listener,
            input: rcpt_input(session, to, route),
        };
        decide(&self.policy, &mut self.answers, &facts, checks).await
    }

    /// Evaluate the stage of `input` for the session as it stands.
    async fn stage(
        &mut self,
        input: Input<'_>,
        checks: &mut Vec<CheckOutcome>,
    ) -> Result<(), Refusal> {
        let facts = StageFacts {
            session: SessionFacts {
                client_ip: self.ip,
                user: self.session.user(),
            },
            listener: self.listener,
            input,
        };
        decide(&self.policy, &mut self.answers, &facts, checks).await
    }

    fn answer(&mut self, verdict: Result<(), Refusal>, step: &mut Step) {
        match verdict {
            Ok(()) => self.session.accept(),
            Err(r) => {
                step.rule = Some(r.rule.to_string());
                self.session.reject(&r.reply);
            }
        }
    }

    /// The reply the engine queued (its first line, as `CODE TEXT`), taken off its output.
    fn take_reply(&mut self) -> String {
        let out = String::from_utf8_lossy(self.session.output()).into_owned();
        self.session.clear_output();
        let first = out.lines().next().unwrap_or_default();
        // `250-name` of a multi-line reply shown as `250 name`.
        match first.as_bytes().get(3) {
            Some(b'-') => format!("{} {}", &first[..3], &first[4..]),
            _ => first.to_string(),
        }
    }

    fn report(self, request: &Request, state: StateOrigin) -> Report {
        let refused = self.steps.iter().find(|s| s.rule.is_some() || s.closed);
        let last = refused.or(self.steps.last());
        Report {
            listener: self.listener.name.clone(),
            ip: self.ip,
            tls: request.tls,
            user: request.user.clone(),
            state,
            password_checked: false,
            dns: request.dns,
            dns_configured: false,
            reply: last.map(|s| s.reply.clone()).unwrap_or_default(),
            rule: refused.and_then(|s| s.rule.clone()),
            not_evaluated: NOT_EVALUATED.to_vec(),
            steps: self.steps,
        }
    }
}

/// A command as shown: `AUTH PLAIN` without its response.
fn shown(line: &str) -> String {
    if line.starts_with("AUTH PLAIN ") {
        "AUTH PLAIN (as the login, password not sent)".to_string()
    } else {
        line.to_string()
    }
}

/// Evaluate the stage of `facts` to its verdict, answering each effect from `answers` and
/// noting each check's outcome in `checks`.
async fn decide(
    policy: &Policy,
    answers: &mut Answers,
    facts: &StageFacts<'_>,
    checks: &mut Vec<CheckOutcome>,
) -> Result<(), Refusal> {
    let mut evaluation = Evaluation::new(facts.input.stage());
    let mut answer = None;
    let mut seen = 0;
    let passed = |checks: &mut Vec<CheckOutcome>, ran: &[Check]| {
        for &c in ran {
            // A check that works through an effect and asked for none does not apply here
            // (no user for a user budget, no `[spf]`, a trusted client for the DNSBL).
            let outcome = if asks_effects(c) {
                "does not apply"
            } else {
                "passed"
            };
            checks.push(CheckOutcome {
                check: check_name(c),
                outcome: outcome.to_string(),
            });
        }
    };
    loop {
        let verdict = policy.evaluate(&mut evaluation, facts, answer.take());
        let ran = evaluation.ran();
        match verdict {
            Verdict::Accept => {
                passed(checks, &ran[seen..]);
                return Ok(());
            }
            Verdict::Refuse(refusal) => {
                if ran.len() > seen {
                    passed(checks, &ran[seen..ran.len() - 1]);
                    checks.push(CheckOutcome {
                        check: check_name(ran[ran.len() - 1]),
                        outcome: "refused".to_string(),
                    });
                } else if let Some(last) = checks.last_mut() {
                    // Refused by the answer to its effect.
                    last.outcome = format!("{}: refused", last.outcome);
                }
                return Err(refusal);
            }
            Verdict::Effect(effect) => {
                passed(checks, &ran[seen..ran.len().saturating_sub(1)]);
                let (given, outcome) = answers.answer(&effect, facts).await;
                checks.push(CheckOutcome {
                    check: effect_name(&effect, ran.last().copied()),
                    outcome,
                });
                answer = Some(given);
                seen = ran.len();
            }
        }
    }
}

/// Whether `check` decides through an effect (when it applies) rather than by itself. An
/// exhaustive match: a new check must be placed here.
fn asks_effects(check: Check) -> bool {
    match check {
        Check::ListenerDeny
        | Check::ListenerAllow
        | Check::SenderOwned
        | Check::RecipientAllowed
        | Check::RouteCarries
        | Check::HeaderSize
        | Check::HopLimit
        | Check::SpoolWritten
        | Check::FromHeader
        | Check::RoutesCarry => false,
        Check::ConnectionRate
        | Check::AuthLockout
        | Check::AuthPassword
        | Check::UserMessageRate
        | Check::ClientMessageRate
        | Check::SpoolSpace
        | Check::RecipientRate
        | Check::RecipientDomains
        | Check::Spf
        | Check::Dnsbl
        | Check::Authenticate
        | Check::Sign
        | Check::Start(_)
        | Check::Await(_) => true,
    }
}

/// A check's name: `ListenerDeny` as `listener_deny`, `Start(Dnsbl)` as `start(dnsbl)`.
fn check_name(check: Check) -> String {
    let debug = format!("{check:?}");
    let mut name = String::with_capacity(debug.len() + 4);
    let mut previous = '(';
    for c in debug.chars() {
        if c.is_ascii_uppercase() {
            if previous.is_ascii_alphanumeric() {
                name.push('_');
            }
            name.push(c.to_ascii_lowercase());
        } else {
            name.push(c);
        }
        previous = c;
    }
    name
}

/// The name of the check that asked for `effect`: a rate check names its budget.
fn effect_name(effect: &Effect, check: Option<Check>) -> String {
    match effect {
        Effect::Rate(limit, _) => limit.rule().to_string(),
        _ => check.map_or_else(|| format!("{effect:?}"), check_name),
    }
}

/// How the played session's effects are answered (see the module doc).
struct Answers {
    state: ClientState,
    config_rates: [(RateLimit, Option<Rate>); 4],
    /// `None`: DNS checks skipped (`--no-dns`) or no check needs DNS.
    resolver: Option<Resolver>,
    dns: bool,
    zones: Vec<crate::config::DnsblZone>,
    /// Nothing is recorded anywhere: a telemetry of this run only, for the lookups' counters.
    telemetry: Arc<Telemetry>,
    lookups: Vec<(Lookup, LookupResult)>,
    /// The login's suspension as recorded under the spool (the running relay's too), or
    /// why it could not be read.
    suspension: Result<Option<Suspension>, String>,
}

impl Answers {
    fn new(
        config: &Config,
        state: ClientState,
        request: &Request,
        resolver: Option<Resolver>,
    ) -> Answers {
        let r = &config.rate_limits;
        Answers {
            state,
            config_rates: [
                (RateLimit::ConnectionsPerIp, r.connections_per_ip),
                (RateLimit::MessagesPerIp, r.messages_per_ip),
                (RateLimit::MessagesPerUser, r.messages_per_user),
                (RateLimit::RecipientsPerIp, r.recipients_per_ip),
            ],
            resolver: resolver.filter(|_| request.dns),
            dns: request.dns,
            zones: config.dnsbl.zones.clone(),
            telemetry: Arc::new(Telemetry::new(config.server.hostname.clone())),
            lookups: Vec::new(),
            suspension: match &request.user {
                // No spool yet: nothing is suspended.
                Some(_) if !config.server.spool_dir.exists() => Ok(None),
                Some(login) => Spool::open_existing(&config.server.spool_dir)
                    .and_then(|spool| spool.suspension(login))
                    .map_err(|e| e.to_string()),
                None => Ok(None),
            },
        }
    }

    /// The answer to `effect`, and what it was, for the output.
    async fn answer(&mut self, effect: &Effect, facts: &StageFacts<'_>) -> (Answer, String) {
        match effect {
            Effect::Rate(limit, _) => self.rate(*limit),
            Effect::AuthGate { .. } => match self.state.locked_out_secs {
                Some(secs) => (Answer::LockedOut, format!("locked out for {secs}s more")),
                None => (Answer::Allowed, "not locked out".to_string()),
            },
            Effect::VerifyPassword { .. } => match &self.suspension {
                Ok(Some(s)) => (
                    Answer::Suspended,
                    format!(
                        "not verified; the login is suspended ({}: {}), answered as a wrong password",
                        s.rule,
                        crate::queue::report::clean(&s.reason)
                    ),
                ),
                Ok(None) => (
                    Answer::Password { matched: true },
                    "not verified: taken as right; not suspended".to_string(),
                ),
                Err(why) => (
                    Answer::Password { matched: true },
                    format!("not verified: taken as right; suspension unknown ({why})"),
                ),
            },
            Effect::RecipientDomain => (
                Answer::Allowed,
                "not counted: explain counts nothing, and reads no containment counters"
                    .to_string(),
            ),
            Effect::ReserveSpace { .. } => (
                Answer::Allowed,
                "not reserved (spool space not checked)".to_string(),
            ),
            Effect::Start(lookup) => self.start(*lookup, facts.session.client_ip).await,
            Effect::Await(lookup) => self.read(*lookup),
            Effect::Spf => self.spf(facts).await,
            // End-of-data effects: never asked before DATA.
            Effect::Authenticate { .. } | Effect::Sign => {
                (Answer::Allowed, "not evaluated".to_string())
            }
        }
    }

    /// A budget: counted down within this run (never on the relay). The rate is the one the
    /// budget was read with (the running relay's), else the policy file's.
    fn rate(&mut self, limit: RateLimit) -> (Answer, String) {
        let configured = self
            .config_rates
            .iter()
            .find(|(l, _)| *l == limit)
            .and_then(|(_, r)| *r);
        let Some(b) = self
            .state
            .budgets
            .iter_mut()
            .find(|b| b.rule == limit.rule())
        else {
            return (Answer::Allowed, "not configured".to_string());
        };
        let rate = parse_rate(&b.limit).ok().or(configured);
        match (b.available, rate) {
            (0, Some(rate)) => (
                Answer::Limited(Limited {
                    rule: limit.rule(),
                    limit: rate,
                }),
                format!("spent ({})", b.limit),
            ),
            (available, _) => {
                b.available = available.saturating_sub(1);
                let left = b.available;
                (
                    Answer::Allowed,
                    format!("allowed ({left} left of {})", b.limit),
                )
            }
        }
    }

    async fn start(&mut self, lookup: Lookup, ip: IpAddr) -> (Answer, String) {
        if lookup != Lookup::Dnsbl {
            return (
                Answer::Allowed,
                "not looked up (only recorded in Authentication-Results:)".to_string(),
            );
        }
        if !self.dns {
            return (Answer::Allowed, "skipped (--no-dns)".to_string());
        }
        let telemetry = Arc::clone(&self.telemetry);
        let result = resolve(
            lookup,
            self.resolver.clone(),
            telemetry,
            self.zones.clone(),
            ip,
        )
        .await;
        let outcome = match &result {
            LookupResult::Dnsbl(c) if c.listed.is_empty() => {
                format!("looked up: not listed ({} lookups failed)", c.errors)
            }
            LookupResult::Dnsbl(c) => format!(
                "looked up: listed ({})",
                crate::policy::mailauth::dnsbl_field(c).trim()
            ),
            _ => "looked up".to_string(),
        };
        self.lookups.push((lookup, result));
        (Answer::Allowed, outcome)
    }

    fn read(&self, lookup: Lookup) -> (Answer, String) {
        let found = self
            .lookups
            .iter()
            .find(|(l, _)| *l == lookup)
            .map(|(_, r)| r.clone());
        match found {
            Some(result) => {
                let listed = matches!(&result, LookupResult::Dnsbl(c) if !c.listed.is_empty());
                let outcome = if listed { "listed" } else { "not listed" };
                (Answer::Looked(result), outcome.to_string())
            }
            None if !self.dns => (
                Answer::Looked(LookupResult::NotStarted),
                "skipped (--no-dns)".to_string(),
            ),
            None => (
                Answer::Looked(LookupResult::NotStarted),
                "not looked up".to_string(),
            ),
        }
    }

    async fn spf(&mut self, facts: &StageFacts<'_>) -> (Answer, String) {
        let Input::Mail { from, helo, .. } = facts.input else {
            return (Answer::Allowed, "not evaluated".to_string());
        };
        if !self.dns {
            // No result to act on: what a check that found nothing says (`none`).
            let check = SpfCheck {
                result: SpfResult::None,
                identity: SpfIdentity::MailFrom,
                subject: from.to_string(),
                domain: String::new(),
                detail: None,
            };
            return (Answer::Spf(check), "skipped (--no-dns)".to_string());
        }
        let ip = facts.session.client_ip;
        let check = spf_check(self.resolver.as_ref(), &self.telemetry, ip, helo, from).await;
        let outcome = format!("spf {:?}", check.result).to_lowercase();
        (Answer::Spf(check), outcome)
    }
}

/// The report as text: one block per step, the checks not evaluated, then the reply a
/// client would get as the last line.
pub fn text(report: &Report) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let _ = writeln!(
        out,
        "client {} on listener {}{}{}",
        report.ip,
        report.listener,
        if report.tls { ", TLS" } else { "" },
        report
            .user
            .as_ref()
            .map(|u| format!(", AUTH as {u} (assumed authenticated: the password is not checked)"))
            .unwrap_or_default()
    );
    let _ = writeln!(
        out,
        "pause, connection caps, rate limits, AUTH lockout: {}",
        report.state.text
    );
    let dns = match (report.dns, report.dns_configured) {
        (true, true) => "performed",
        (true, false) => "none configured",
        (false, _) => "skipped (--no-dns)",
    };
    let _ = writeln!(out, "DNS checks: {dns}");
    for step in &report.steps {
        let _ = writeln!(out, "\n{}: {}", step.stage, step.command);
        for c in &step.checks {
            let _ = writeln!(out, "  {}: {}", c.check, c.outcome);
        }
        let decided = step.rule.as_deref().unwrap_or("passed");
        let _ = writeln!(out, "  decided by: {decided}");
        let closed = if step.closed {
            " (connection closed)"
        } else {
            ""
        };
        let _ = writeln!(out, "  reply: {}{closed}", step.reply);
    }
    let _ = writeln!(
        out,
        "\nnot evaluated (needs the message): {}",
        report.not_evaluated.join(", ")
    );
    let _ = writeln!(out, "{}", report.reply);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A policy with one open listener `mx`, example.com accepted, `recipients_per_ip =
    /// "2/hour"`.
    fn config() -> Config {
        let text = "[server]\nhostname = \"relay.test\"\n[[listeners]]\nname = \"mx\"\n\
                    bind = \"127.0.0.1:2525\"\ntls = \"none\"\n\
                    [relay]\naccepted_domains = [\"example.com\"]\n\
                    [rate_limits]\nrecipients_per_ip = \"2/hour\"\n\
                    [[upstreams]]\naddress = \"127.0.0.1:25\"\n";
        Config::from_toml(text, None).expect("valid test policy")
    }

    fn request(from: &str, rcpts: &[&str]) -> Request {
        Request {
            listener: "mx".to_string(),
            ip: "192.0.2.1".parse().unwrap(),
            helo: DEFAULT_HELO.to_string(),
            tls: false,
            user: None,
            from: from.to_string(),
            rcpts: rcpts.iter().map(|r| r.to_string()).collect(),
            dns: false,
        }
    }

    async fn run(request: &Request) -> Report {
        let why = Err("test".to_string());
        explain(&config(), request, why, None)
            .await
            .expect("explained")
    }

    #[tokio::test]
    async fn a_budget_is_counted_down_within_one_explanation_only() {
        let r = request(
            "a@sender.test",
            &["u@example.com", "v@example.com", "w@example.com"],
        );
        let report = run(&r).await;
        let replies: Vec<&str> = report.steps.iter().map(|s| s.reply.as_str()).collect();
        assert_eq!(
            replies,
            [
                "220 relay.test ESMTP ready",
                "250 relay.test",
                "250 2.1.0 Sender ok",
                "250 2.1.5 Recipient ok",
                "250 2.1.5 Recipient ok",
                "451 4.7.1 Rate limit exceeded, try again later",
            ]
        );
        assert_eq!(
            report.rule.as_deref(),
            Some("rate_limits.recipients_per_ip")
        );
        assert_eq!(report.reply, replies[5]);
        let checks = &report.steps[4].checks;
        assert_eq!(
            checks
                .iter()
                .find(|c| c.check == "rate_limits.recipients_per_ip"),
            Some(&CheckOutcome {
                check: "rate_limits.recipients_per_ip".to_string(),
                outcome: "allowed (0 left of 2/hour)".to_string(),
            })
        );
        // A second explanation starts from the same state: nothing was taken.
        let again = run(&request("a@sender.test", &["u@example.com"])).await;
        assert_eq!(again.reply, "250 2.1.5 Recipient ok");
        assert!(text(&again).ends_with("\n250 2.1.5 Recipient ok\n"));
        assert!(text(&again).contains("DNS checks: skipped (--no-dns)\n"));
    }

    #[tokio::test]
    async fn the_first_refusal_is_the_verdict_and_a_non_ascii_address_says_smtputf8() {
        let report = run(&request(
            "a@sender.test",
            &["x@elsewhere.test", "u@example.com"],
        ))
        .await;
        assert_eq!(report.reply, "550 5.7.1 Relay access denied");
        assert_eq!(report.rule.as_deref(), Some("relay_denied"));
        assert_eq!(report.steps.last().unwrap().reply, "250 2.1.5 Recipient ok");
        let report = run(&request("jörg@sender.test", &["u@example.com"])).await;
        assert_eq!(
            report.steps[2].command,
            "MAIL FROM:<jörg@sender.test> SMTPUTF8"
        );
    }

    #[tokio::test]
    async fn bad_input_is_an_error_before_anything_is_played() {
        let mut r = request("a@sender.test", &["u@example.com"]);
        r.listener = "submission".to_string();
        let e = explain(&config(), &r, Err(String::new()), None)
            .await
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "no listener named \"submission\" (the policy has: mx)"
        );
        for (from, rcpt) in [("a@b>c", "u@example.com"), ("a@sender.test", "bare")] {
            let r = request(from, &[rcpt]);
            let e = explain(&config(), &r, Err(String::new()), None).await;
            assert!(matches!(e, Err(ExplainError::BadAddress { .. })), "{e:?}");
        }
    }

    #[test]
    fn check_names_are_snake_case() {
        assert_eq!(check_name(Check::ListenerDeny), "listener_deny");
        assert_eq!(check_name(Check::Start(Lookup::Dnsbl)), "start(dnsbl)");
        assert_eq!(check_name(Check::Spf), "spf");
    }
}
