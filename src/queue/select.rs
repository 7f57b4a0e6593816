//! Which queued messages an operator command selects, and the text of `queue hold|release`.
//!
//! `queue purge`, `queue hold` and `queue release` pick messages by criteria ([`Selection`]):
//! the envelope sender (`--from`, as [`PurgeFilter`] compares it), the authenticated login
//! that submitted it (`--user`), its age (`--since` / `--older-than`) and the domains of its
//! pending recipients (`--to @DOMAIN`). Every criterion given must hold (AND); a selection
//! with none selects nothing by itself (the commands ask for `--all` explicitly). Pure: the
//! caller lists the spool and passes the time.
//!
//! Whether a message is held, as a command sees it ([`held_now`]), is its recorded hold
//! ([`super::DeliveryState::hold`]) unless a request not yet taken by the relay says
//! otherwise (`control/holds.SEQ.NONCE`, see [`super::hold`]): `queue hold X` followed at once by
//! `queue release X` must release X, although the relay has not yet written the hold.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::time::Duration;

use super::report::clean;
use super::{PurgeFilter, QueuedMessage};
use crate::envelope::{QueueId, ReversePath, canonical_domain};

/// Longest login accepted by `--user`, in octets (a users file name is far shorter).
pub const MAX_LOGIN: usize = 256;

/// Message age bound: `--since DUR` or `--older-than DUR`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Age {
    /// Received within the last this many seconds (age at most this; `--since`).
    Since(u64),
    /// Received more than this many seconds ago (`--older-than`). For one duration and one
    /// moment, `Since` and `OlderThan` split the queue in two with nothing left out.
    OlderThan(u64),
}

impl Age {
    /// `--since DUR` (whole seconds; `ms` are rounded down).
    pub fn since(dur: Duration) -> Age {
        Age::Since(dur.as_secs())
    }

    /// `--older-than DUR` (whole seconds; `ms` are rounded down).
    pub fn older_than(dur: Duration) -> Age {
        Age::OlderThan(dur.as_secs())
    }

    /// True when a message received at `received_at` is selected at `now` (Unix seconds). A
    /// reception time in the future (clock moved back) counts as age 0.
    pub fn matches(self, received_at: u64, now: u64) -> bool {
        let age = now.saturating_sub(received_at);
        match self {
            Age::Since(max) => age <= max,
            Age::OlderThan(min) => age > min,
        }
    }
}

/// A criterion an operator gave that is not one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum BadSelection {
    /// `--user` empty, too long, or holding whitespace or control characters (no login has
    /// them).
    #[error("--user {0:?} is not a login")]
    Login(String),
    /// `--to` is not `@DOMAIN` with a valid domain name.
    #[error("--to {0:?} is not @DOMAIN")]
    ToDomain(String),
}

/// The criteria of a selection; `None` is "any". See the module docs.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selection {
    /// The envelope sender (`--from`).
    pub from: Option<PurgeFilter>,
    /// The login that submitted the message: `Envelope::auth_user` equal to this, byte for
    /// byte (`--user`). Messages not submitted with AUTH never match.
    pub user: Option<String>,
    /// The message's age, from its reception time.
    pub age: Option<Age>,
    /// A canonical domain (A-label, lower case): at least one pending recipient is in it
    /// (`--to @DOMAIN`; not its subdomains; recipients already delivered or failed do not
    /// count).
    pub to: Option<String>,
}

impl Selection {
    /// True when no criterion is set.
    pub fn is_empty(&self) -> bool {
        self.from.is_none() && self.user.is_none() && self.age.is_none() && self.to.is_none()
    }

    /// Check a `--user` argument.
    ///
    /// # Errors
    /// [`BadSelection::Login`] when empty, over [`MAX_LOGIN`] octets, or holding whitespace,
    /// control or invisible characters.
    pub fn parse_user(arg: &str) -> Result<String, BadSelection> {
        let bad = arg.is_empty()
            || arg.len() > MAX_LOGIN
            || arg
                .chars()
                .any(|c| c.is_whitespace() || c.is_control() || super::report::is_invisible(c));
        if bad {
            Err(BadSelection::Login(arg.to_owned()))
        } else {
            Ok(arg.to_owned())
        }
    }

    /// Check a `--to` argument: `@DOMAIN` (U-label or A-label, any case, a trailing dot
    /// ignored); the canonical domain.
    ///
    /// # Errors
    /// [`BadSelection::ToDomain`] for anything else (an address included: `--to` selects
    /// domains).
    pub fn parse_to(arg: &str) -> Result<String, BadSelection> {
        arg.strip_prefix('@')
            .and_then(|d| canonical_domain(d).ok())
            .ok_or_else(|| BadSelection::ToDomain(arg.to_owned()))
    }

    /// True when `m` meets every criterion at `now` (Unix seconds).
    pub fn matches(&self, m: &QueuedMessage, now: u64) -> bool {
        let env = &m.envelope;
        self.from.as_ref().is_none_or(|f| f.matches(&env.mail_from))
            && self
                .user
                .as_ref()
                .is_none_or(|u| env.auth_user.as_ref() == Some(u))
            && self.age.is_none_or(|a| a.matches(env.received_at, now))
            && self
                .to
                .as_ref()
                .is_none_or(|d| m.pending().any(|r| r.domain() == d))
    }
}

/// Whether `m` is held as a command sees it: a pending request (`pending`, from
/// [`super::Spool::pending_holds`]: true for hold, false for release) wins over the recorded
/// state.
pub fn held_now(m: &QueuedMessage, pending: &HashMap<QueueId, bool>) -> bool {
    pending
        .get(m.id())
        .copied()
        .unwrap_or(m.state.hold.is_some())
}

/// `queue hold` (true) or `queue release` (false).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HoldAction {
    /// `queue hold`.
    Hold,
    /// `queue release`.
    Release,
}

impl HoldAction {
    /// True for [`HoldAction::Hold`] (the argument of [`super::Spool::request_holds`]).
    pub fn holds(self) -> bool {
        self == HoldAction::Hold
    }

    /// The last line of the command's output (not with `--dry-run`).
    pub fn note(self) -> &'static str {
        match self {
            HoldAction::Hold => HOLD_NOTE,
            HoldAction::Release => RELEASE_NOTE,
        }
    }

    /// `hold` or `release`.
    pub fn verb(self) -> &'static str {
        match self {
            HoldAction::Hold => "hold",
            HoldAction::Release => "release",
        }
    }

    /// True when `held` (as [`held_now`] says) means there is nothing to do.
    pub fn already(self, held: bool) -> bool {
        held == self.holds()
    }
}

/// One line of `queue hold|release` output for a message acted on:
/// `hold requested for ID from SENDER` (or `release …`), or with `dry_run`
/// `would hold ID from SENDER` (`would release …`).
pub fn hold_line(action: HoldAction, id: &QueueId, sender: &ReversePath, dry_run: bool) -> String {
    let from = clean(&sender.to_string());
    if dry_run {
        format!("would {} {id} from {from}", action.verb())
    } else {
        format!("{} requested for {id} from {from}", action.verb())
    }
}

/// The line of `queue hold|release ID…` for an id that needs nothing:
/// `ID already held` or `ID not held`.
pub fn skipped_line(action: HoldAction, id: &QueueId) -> String {
    match action {
        HoldAction::Hold => format!("{id} already held"),
        HoldAction::Release => format!("{id} not held"),
    }
}

/// The count line of `queue hold|release`: `hold requested for 3 messages`, with
/// `, 1 already held` / `, 1 not held` when some needed nothing; with `dry_run`,
/// `3 messages would be held (dry run)` / `… released (dry run)`.
pub fn hold_summary(action: HoldAction, acted: usize, skipped: usize, dry_run: bool) -> String {
    let n = format!("{acted} message{}", if acted == 1 { "" } else { "s" });
    let mut out = if dry_run {
        let done = match action {
            HoldAction::Hold => "held",
            HoldAction::Release => "released",
        };
        format!("{n} would be {done} (dry run)")
    } else {
        format!("{} requested for {n}", action.verb())
    };
    if skipped > 0 {
        let what = match action {
            HoldAction::Hold => "already held",
            HoldAction::Release => "not held",
        };
        let _ = write!(out, ", {skipped} {what}");
    }
    out
}

/// Last line of `queue hold` (not with `--dry-run`): when the request takes effect.
pub const HOLD_NOTE: &str = "the running relay records this within a second (a stopped relay \
     when it next starts); a message being sent at that moment is held once its attempt ends";

/// Last line of `queue release` (not with `--dry-run`): when the request takes effect.
pub const RELEASE_NOTE: &str = "the running relay records this within a second (a stopped \
     relay when it next starts); released messages are due at once";

#[cfg(test)]
mod tests {
    use std::net::{IpAddr, Ipv4Addr};

    use super::*;
    use crate::envelope::{Address, Envelope, MailParams, Recipient};
    use crate::queue::DeliveryState;

    fn msg(from: &str, user: Option<&str>, received_at: u64, rcpts: &[&str]) -> QueuedMessage {
        let envelope = Envelope {
            id: QueueId::generate(),
            received_at,
            listener: "mx".into(),
            client_ip: IpAddr::V4(Ipv4Addr::LOCALHOST),
            client_port: 1,
            helo: "c".into(),
            tls: None,
            auth_user: user.map(String::from),
            mail_from: if from.is_empty() {
                ReversePath::Null
            } else {
                ReversePath::Address(Address::parse(from).unwrap())
            },
            mail_params: MailParams::default(),
            recipients: rcpts
                .iter()
                .map(|r| Recipient::new(Address::parse(r).unwrap()))
                .collect(),
        };
        QueuedMessage {
            state: DeliveryState::fresh(received_at),
            size: 1,
            path: "x".into(),
            envelope,
        }
    }

    #[test]
    fn every_criterion_must_hold() {
        let now = 10_000;
        let m = msg(
            "a@junk.example",
            Some("alice"),
            now - 600,
            &["x@Victim.example"],
        );
        let sel = |f: &dyn Fn(&mut Selection)| {
            let mut s = Selection::default();
            f(&mut s);
            s.matches(&m, now)
        };
        let from = |a: &str| Some(PurgeFilter::parse_from(a).unwrap());
        assert!(sel(&|_| {}));
        assert!(sel(&|s| s.from = from("@junk.example")));
        assert!(!sel(&|s| s.from = from("@other.example")));
        assert!(sel(&|s| s.user = Some("alice".into())));
        assert!(!sel(&|s| s.user = Some("Alice".into())));
        assert!(sel(&|s| s.age = Some(Age::Since(600))));
        assert!(!sel(&|s| s.age = Some(Age::Since(599))));
        assert!(sel(&|s| s.age = Some(Age::OlderThan(599))));
        assert!(!sel(&|s| s.age = Some(Age::OlderThan(600))));
        assert!(sel(&|s| s.to = Some("victim.example".into())));
        assert!(!sel(&|s| s.to = Some("example".into())));
        assert!(sel(&|s| {
            s.from = from("a@JUNK.example");
            s.user = Some("alice".into());
            s.to = Some("victim.example".into());
        }));
        assert!(!sel(&|s| {
            s.from = from("a@junk.example");
            s.user = Some("bob".into());
        }));
        let anonymous = msg("", None, now, &["x@victim.example"]);
        let mut s = Selection {
            user: Some("alice".into()),
            ..Selection::default()
        };
        assert!(!s.matches(&anonymous, now));
        s.user = None;
        s.from = from("<>");
        assert!(s.matches(&anonymous, now));
    }

    #[test]
    fn to_counts_pending_recipients_only() {
        let mut m = msg(
            "a@b.example",
            None,
            0,
            &["x@victim.example", "y@other.example"],
        );
        let s = Selection {
            to: Some("victim.example".into()),
            ..Selection::default()
        };
        assert!(s.matches(&m, 0));
        m.state.recipients = vec![
            crate::envelope::RcptStatus::Delivered,
            crate::envelope::RcptStatus::Pending,
        ];
        assert!(!s.matches(&m, 0));
    }

    #[test]
    fn arguments_are_checked() {
        assert_eq!(Selection::parse_user("alice"), Ok("alice".into()));
        for bad in ["", "a b", "a\nb", "a\u{202e}b", &"x".repeat(MAX_LOGIN + 1)] {
            assert!(Selection::parse_user(bad).is_err(), "{bad:?}");
        }
        assert_eq!(
            Selection::parse_to("@Bücher.Example."),
            Ok("xn--bcher-kva.example".into())
        );
        for bad in [
            "victim.example",
            "a@victim.example",
            "@",
            "@-x-.example",
            "",
        ] {
            assert!(Selection::parse_to(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn a_pending_request_wins_over_the_recorded_hold() {
        let mut m = msg("a@b.example", None, 0, &["x@c.example"]);
        let none = HashMap::new();
        assert!(!held_now(&m, &none));
        let pending = HashMap::from([(m.id().clone(), true)]);
        assert!(held_now(&m, &pending));
        m.state.hold(5, "queue hold");
        assert!(held_now(&m, &none));
        let pending = HashMap::from([(m.id().clone(), false)]);
        assert!(!held_now(&m, &pending));
    }

    #[test]
    fn output_lines() {
        let id: QueueId = "0000000000000000".parse().unwrap();
        let from = ReversePath::Address(Address::parse("a@b.example").unwrap());
        assert_eq!(
            hold_line(HoldAction::Hold, &id, &from, false),
            "hold requested for 0000000000000000 from a@b.example"
        );
        assert_eq!(
            hold_line(HoldAction::Release, &id, &ReversePath::Null, true),
            "would release 0000000000000000 from <>"
        );
        assert_eq!(
            hold_summary(HoldAction::Hold, 1, 2, false),
            "hold requested for 1 message, 2 already held"
        );
        assert_eq!(
            hold_summary(HoldAction::Release, 3, 0, true),
            "3 messages would be released (dry run)"
        );
        assert_eq!(
            skipped_line(HoldAction::Release, &id),
            "0000000000000000 not held"
        );
    }
}
