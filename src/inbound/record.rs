//! What the receiving side tells [`Telemetry`], each kind in one place.
//!
//! A refusal's log line and its `Refused` event come from one function, [`refused`], so no
//! refusal is logged without being counted (`portcullis_refusals_total{rule}`, the flow) and
//! journaled, and none is counted twice. The other events (`Connect`, `Queued`) and the
//! direct counters (sessions, AUTH outcomes) are recorded by the session driver through the
//! helpers here; DNS errors by the effect runner where the lookups end.
//!
//! Recording never blocks and never fails mail (see [`crate::observe`]): an event is one
//! allocation, the metrics are atomics, the journal a channel.

use std::net::IpAddr;

use tracing::{info, warn};

use crate::envelope::{Address, TlsInfo};
use crate::observe::{Event, EventKind, Telemetry};
use crate::policy::{Detail, Refusal};
use crate::smtp::Reply;

/// A refusal's log line, at warning level when `$warning`.
macro_rules! rejected {
    ($warning:expr, $($rest:tt)*) => {
        if $warning {
            warn!($($rest)*)
        } else {
            info!($($rest)*)
        }
    };
}

/// The AUTH refusals counted in `portcullis_auth_failures_total`: the client's credentials
/// were judged and refused (wrong password, unknown login, a suspended login), or the client
/// is locked out after such failures and still trying (a guessing client keeps showing in
/// the count while the lockout answers it). Not counted: a temporary failure on our side (`auth_busy`,
/// `auth_verifier_failed`: nothing was judged) and what the protocol engine refuses by
/// itself before any password is looked at (`auth_malformed`, `auth_cancelled`,
/// `auth_mechanism`, `auth_without_tls`, `auth_authzid_mismatch`, …). Each of these still
/// counts in `portcullis_refusals_total{rule}`.
pub const AUTH_FAILURE_RULES: [&str; 4] = [
    "auth_bad_password",
    "auth_unknown_user",
    "auth_lockout",
    "auth_suspended",
];

/// The session an event belongs to: what every event of the receiving side carries.
#[derive(Debug, Clone, Copy)]
pub struct Client<'a> {
    /// `[[listeners]] name`.
    pub listener: &'a str,
    /// The client's address (after a PROXY header, the address in it).
    pub ip: IpAddr,
    /// The session's TLS, once established.
    pub tls: Option<&'a TlsInfo>,
    /// The authenticated login.
    pub login: Option<&'a str>,
}

impl Client<'_> {
    /// An event of `kind`, now, about this session (client, listener, TLS version, login).
    pub fn event(&self, kind: EventKind) -> Event {
        let mut event = Event::now(kind);
        event.client = Some(crate::policy::access::normalize(self.ip));
        event.listener = Some(self.listener.to_owned());
        event.tls = tls_version(self.tls).map(str::to_owned);
        event.login = self.login.map(str::to_owned);
        event
    }
}

/// The TLS version as the metrics' `tls` label and the events' `tls` field show it: `1.2`
/// or `1.3` (the only versions the listeners offer); `None` for plaintext. Any other
/// version string (none is negotiated) is `other`, so the label stays a fixed set.
pub fn tls_version(tls: Option<&TlsInfo>) -> Option<&'static str> {
    Some(match tls?.version.as_str() {
        "TLSv1.3" => "1.3",
        "TLSv1.2" => "1.2",
        _ => "other",
    })
}

/// The forward-paths as events carry them.
pub fn recipients<'a>(rcpts: impl IntoIterator<Item = &'a Address>) -> Vec<String> {
    rcpts.into_iter().map(Address::to_string).collect()
}

/// A refusal as it is logged and recorded: the rule that fired, the reply sent, what else
/// the log line says, and its level.
#[derive(Debug, Clone, Copy)]
pub struct Refused<'a> {
    /// The `rule=` of the log line and the event (and the metric's label).
    pub rule: &'static str,
    /// The reply sent; `None` when none could be (the connection was closed during a TLS
    /// handshake or while the client was not reading) or none was due (commands discarded).
    pub reply: Option<&'a Reply>,
    /// The log line's other field (`limit=`, `login=`, `detail=`, …).
    pub detail: Option<&'a Detail>,
    /// Logged at warning level (else info).
    pub warning: bool,
    /// The log line's message.
    pub what: &'static str,
}

impl<'a> Refused<'a> {
    /// A refusal of the policy, as its verdict says.
    pub fn of(refusal: &'a Refusal) -> Refused<'a> {
        Refused {
            rule: refusal.rule,
            reply: Some(&refusal.reply),
            detail: refusal.detail.as_ref(),
            warning: refusal.warning,
            what: "rejected",
        }
    }

    /// A refusal by `rule` with `reply`, at info level.
    pub fn rule(rule: &'static str, reply: &'a Reply) -> Refused<'a> {
        Refused {
            rule,
            reply: Some(reply),
            detail: None,
            warning: false,
            what: "rejected",
        }
    }

    /// A refusal by `rule` that no reply tells (the connection is closed, or commands are
    /// discarded unanswered), logged as `what`, at warning level.
    pub fn unanswered(rule: &'static str, what: &'static str) -> Refused<'a> {
        Refused {
            rule,
            reply: None,
            detail: None,
            warning: true,
            what,
        }
    }

    /// At warning level.
    #[must_use]
    pub fn warning(self) -> Refused<'a> {
        Refused {
            warning: true,
            ..self
        }
    }

    /// Logged as `what` ("rejected at connect").
    #[must_use]
    pub fn saying(self, what: &'static str) -> Refused<'a> {
        Refused { what, ..self }
    }

    /// With `detail` on the log line.
    #[must_use]
    pub fn with_detail(self, detail: &'a Detail) -> Refused<'a> {
        Refused {
            detail: Some(detail),
            ..self
        }
    }
}

/// Log the refusal `r` and record it: `event` says whose session it was and what it was
/// about (sender, recipients, queue id, Message-ID); its kind, rule and reply are set here.
/// The line is written in the caller's span (the session's: its listener and peer).
pub fn refused(telemetry: &Telemetry, mut event: Event, r: &Refused<'_>) {
    let reply = r.reply.map(ToString::to_string);
    log_refusal(r, event.login.as_deref(), reply.as_deref().unwrap_or("-"));
    event.kind = EventKind::Refused;
    event.rule = Some(r.rule.to_owned());
    event.reply = reply;
    telemetry.record(&event);
}

/// The log line of a refusal: its rule, its reply (written bare, as `reply=550 5.7.1 …`)
/// and what else it says.
fn log_refusal(r: &Refused<'_>, login: Option<&str>, reply: &str) {
    let (rule, what, user) = (r.rule, r.what, login.unwrap_or("-"));
    match r.detail {
        None => rejected!(r.warning, user, rule, reply = %reply, "{what}"),
        Some(Detail::Limit(limit)) => {
            rejected!(r.warning, user, rule, limit = %limit, reply = %reply, "{what}");
        }
        Some(Detail::Login(login)) => {
            rejected!(r.warning, login = login.as_str(), rule, reply = %reply, "{what}");
        }
        Some(Detail::FromHeader(from)) => rejected!(
            r.warning,
            user,
            from_header = from.as_str(),
            rule,
            reply = %reply,
            "{what}"
        ),
        Some(Detail::Text(detail)) => {
            rejected!(r.warning, user, rule, reply = %reply, detail = %detail, "{what}");
        }
        Some(Detail::Dnsbl(listed)) => {
            rejected!(r.warning, user, rule, reply = %reply, dnsbl = %listed, "{what}");
        }
    }
}

/// Count the outcome of an AUTH stage: a success, or a failure of
/// [`AUTH_FAILURE_RULES`].
pub fn auth_outcome(telemetry: &Telemetry, verdict: &Result<(), Refusal>) {
    let counter = match verdict {
        Ok(()) => &telemetry.metrics.auth_successes,
        Err(r) if AUTH_FAILURE_RULES.contains(&r.rule) => &telemetry.metrics.auth_failures,
        Err(_) => return,
    };
    counter.inc();
}
