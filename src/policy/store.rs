//! The store that answers the stateful effects of the stage evaluators ([`super::stage`]):
//! rate budgets (`[rate_limits]`) and the AUTH failure tables (`[auth]` lockout and
//! spraying). The session driver carries an [`Effect`](super::stage::Effect) out by asking
//! the store and hands the answer back to the evaluator, so where the state lives is the
//! store's business: in this process ([`Store::Local`]). With `[cluster]` the store several
//! nodes share (Redis) is asked too, and decides while it answers; the two are composed in
//! one place, `crate::cluster::store`, and these tables keep counting as its fallback.
//!
//! Every call takes the time as an argument; nothing here reads a clock or touches a socket.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::Instant;

use super::limits::{Limited, Limiters, RateLimit};
use super::lockout::{AuthGuard, GateDecision, Settings};
use crate::config::Config;

/// Where the rate budgets and AUTH failure records live.
#[derive(Debug, Clone)]
pub enum Store {
    /// In this process: the tables of [`super::limits`] and [`super::lockout`]. They outlive
    /// a configuration (see [`Store::new`]).
    Local(LocalStore),
}

/// The tables of a [`Store::Local`].
#[derive(Debug, Clone)]
pub struct LocalStore {
    /// `[rate_limits]` tables.
    limiters: Limiters,
    /// AUTH failure tables; `None` without `[auth]`.
    auth_guard: Option<Arc<AuthGuard>>,
}

/// Whom a rate budget belongs to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RateKey {
    /// A client address (counted by [`super::limits::ClientKey`]).
    Client(IpAddr),
    /// An authenticated login.
    Login(String),
}

impl Store {
    /// The store for `config`. The tables of `previous` (the store being replaced on reload)
    /// are kept where their settings are unchanged, so a SIGHUP neither hands out fresh
    /// budgets nor lifts lockouts; `now` anchors new tables' clocks.
    pub fn new(config: &Config, previous: Option<&Store>, now: Instant) -> Store {
        let previous = previous.map(|Store::Local(l)| l);
        let auth_guard = config.auth.as_ref().map(|auth| {
            let settings = Settings::from_config(auth);
            previous
                .and_then(|p| p.auth_guard.as_ref())
                .filter(|g| g.settings() == settings)
                .cloned()
                .unwrap_or_else(|| Arc::new(AuthGuard::new(settings)))
        });
        Store::Local(LocalStore {
            limiters: Limiters::new(&config.rate_limits, previous.map(|p| &p.limiters), now),
            auth_guard,
        })
    }

    /// Take one event from the `limit` budget of `key` at `now`.
    ///
    /// # Errors
    /// [`Limited`] when the budget is spent (nothing is taken then). A limit that is not
    /// configured, or a key of the wrong kind for it, always has room.
    pub fn take(&self, limit: RateLimit, key: &RateKey, now: Instant) -> Result<(), Limited> {
        match self {
            Store::Local(l) => l.limiters.take(limit, key, now),
        }
    }

    /// Before verifying an AUTH for `login` from `ip` at `now`: see
    /// [`AuthGuard::begin`]. Without `[auth]` every attempt proceeds, uncounted.
    pub fn auth_gate(&self, ip: IpAddr, login: &str, now: Instant) -> GateDecision {
        match self {
            Store::Local(l) => match &l.auth_guard {
                Some(guard) => guard.begin(ip, login, now),
                None => GateDecision::Proceed(super::lockout::AuthAttempt::unguarded()),
            },
        }
    }
}

impl Store {
    /// The configured rate of `limit` (`None`: not configured), as a shared store counts it.
    pub fn rate(&self, limit: RateLimit) -> Option<crate::config::Rate> {
        let Store::Local(l) = self;
        l.limiters.rate(limit)
    }

    /// The `[auth]` lockout settings; `None` without `[auth]` (nothing is counted).
    pub fn auth_settings(&self) -> Option<Settings> {
        let Store::Local(l) = self;
        l.auth_guard.as_ref().map(|g| g.settings())
    }
}

/// What the running relay's stateful rules say of a client (its address and, optionally,
/// login) now, read without taking anything: what the admin API's `/api/explain-state`
/// answers (the relay builds it from its store, connection counts and pause state, and the
/// shared store's records when `[cluster]` is configured, hence a future).
pub type ClientStateSource = Arc<
    dyn Fn(IpAddr, Option<String>) -> futures_util::future::BoxFuture<'static, ClientState>
        + Send
        + Sync,
>;

/// What the stateful rules would say of one client (and login) now, read without taking a
/// budget or recording anything: what `portcullis policy explain` answers the stage
/// evaluators' rate and lockout effects with.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct ClientState {
    /// The rule that refuses a new connection before any session (`paused`,
    /// `max_connections`, `max_connections_per_ip`); `None`: it would be accepted (a
    /// store knows no connections: always `None` from [`Store::client_state`]).
    #[serde(default)]
    pub at_accept: Option<String>,
    /// Seconds the client stays locked out of AUTH (`None`: not locked out).
    pub locked_out_secs: Option<u64>,
    /// Every configured `[rate_limits]` budget of the client (and of the login, for
    /// `messages_per_user`).
    pub budgets: Vec<Budget>,
    /// With `[cluster]`: where the budgets and the lockout were read: `shared` (the store
    /// every node shares), or `local (...)` with why the shared store did not answer (the
    /// node decides by its own tables then, under `on_error = "local"`). Absent without
    /// `[cluster]`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub store: Option<String>,
}

/// One `[rate_limits]` budget in a [`ClientState`].
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    /// The policy key, e.g. `rate_limits.messages_per_ip`.
    pub rule: String,
    /// Events the budget lets through now (0: the next one is refused).
    pub available: u32,
    /// The configured rate as the policy file writes it (`120/min`).
    pub limit: String,
}

/// Every `[rate_limits]` budget of the client `ip` and of its `login` (`None` for
/// `messages_per_user` without one), in the order a [`ClientState`] lists them.
pub fn budgets_of(ip: IpAddr, login: Option<&str>) -> [(RateLimit, Option<RateKey>); 4] {
    [
        (RateLimit::ConnectionsPerIp, Some(RateKey::Client(ip))),
        (
            RateLimit::MessagesPerUser,
            login.map(|l| RateKey::Login(l.to_string())),
        ),
        (RateLimit::MessagesPerIp, Some(RateKey::Client(ip))),
        (RateLimit::RecipientsPerIp, Some(RateKey::Client(ip))),
    ]
}

impl Store {
    /// What the stateful rules say of the client `ip` (and `login`, if any) at `now`, taking
    /// nothing and recording nothing.
    pub fn client_state(&self, ip: IpAddr, login: Option<&str>, now: Instant) -> ClientState {
        let Store::Local(l) = self;
        let budgets = budgets_of(ip, login)
            .into_iter()
            .filter_map(|(limit, key)| {
                let (available, rate) = l.limiters.available(limit, &key?, now)?;
                Some(Budget {
                    rule: limit.rule().to_string(),
                    available,
                    limit: crate::config::units::format_rate(rate),
                })
            })
            .collect();
        let locked_out = l.auth_guard.as_ref().and_then(|g| g.locked_out(ip, now));
        ClientState {
            at_accept: None,
            locked_out_secs: locked_out.map(|d| d.as_secs().max(1)),
            budgets,
            store: None,
        }
    }
}

impl Store {
    /// Resolves once any AUTH attempt of this store has ended; `None` when there are no
    /// AUTH failure records (the gate never holds an attempt back then). See
    /// [`AuthGuard::settled`].
    pub fn auth_settled(&self) -> Option<tokio::sync::futures::Notified<'_>> {
        match self {
            Store::Local(l) => l.auth_guard.as_ref().map(|g| g.settled()),
        }
    }
}

/// A policy with `[auth]` naming a users file that holds alice (`DUMMY_HASH`), then `extra`
/// (more `[auth]` keys, other tables), in a fresh directory kept alive by the returned guard.
#[cfg(test)]
pub(crate) fn alice_policy(extra: &str) -> (tempfile::TempDir, Config) {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users.toml");
    let hash = crate::policy::credentials::DUMMY_HASH;
    std::fs::write(
        &users,
        format!("[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n"),
    )
    .unwrap();
    let text = format!(
        "[server]\nhostname = \"relay.test\"\n[[listeners]]\nbind = \"127.0.0.1:2525\"\n\
         tls = \"none\"\n[auth]\nusers_file = {:?}\n{extra}\n\
         [[upstreams]]\naddress = \"127.0.0.1:25\"\n",
        users.display().to_string()
    );
    (
        dir,
        Config::from_toml(&text, None).expect("valid test policy"),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::lockout::GateDecision;

    fn config(auth: &str, rates: &str) -> (tempfile::TempDir, Config) {
        alice_policy(&format!("{auth}\n[rate_limits]\n{rates}"))
    }

    #[test]
    fn a_rebuilt_store_keeps_lockouts_and_spent_budgets_unless_their_settings_changed() {
        let (_d, c) = config("max_failures = 2", "messages_per_ip = \"1/hour\"");
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let store = Store::new(&c, None, t0);
        let fail = |s: &Store| match s.auth_gate(ip, "alice", t0) {
            GateDecision::Proceed(a) => a.settle(false, t0),
            other => panic!("{other:?}"),
        };
        assert_eq!(fail(&store).locked_out, None);
        assert_eq!(fail(&store).locked_out, Some(2));
        assert!(matches!(
            store.auth_gate(ip, "alice", t0),
            GateDecision::LockedOut { .. }
        ));
        let client = RateKey::Client(ip);
        assert!(store.take(RateLimit::MessagesPerIp, &client, t0).is_ok());
        let limited = store
            .take(RateLimit::MessagesPerIp, &client, t0)
            .unwrap_err();
        assert_eq!(limited.rule, "rate_limits.messages_per_ip");

        let same = Store::new(&c, Some(&store), t0);
        assert!(matches!(
            same.auth_gate(ip, "bob", t0),
            GateDecision::LockedOut { .. }
        ));
        assert!(same.take(RateLimit::MessagesPerIp, &client, t0).is_err());

        let (_d2, changed) = config("max_failures = 3", "messages_per_ip = \"2/hour\"");
        let fresh = Store::new(&changed, Some(&same), t0);
        assert!(matches!(
            fresh.auth_gate(ip, "alice", t0),
            GateDecision::Proceed(_)
        ));
        assert!(fresh.take(RateLimit::MessagesPerIp, &client, t0).is_ok());
    }

    #[test]
    fn client_state_reads_budgets_and_lockouts_without_taking_or_recording() {
        let (_d, c) = config(
            "max_failures = 1\nlockout = \"1h\"",
            "messages_per_ip = \"3/hour\"\nmessages_per_user = \"2/hour\"",
        );
        let t0 = Instant::now();
        let ip: IpAddr = "192.0.2.1".parse().unwrap();
        let store = Store::new(&c, None, t0);
        let available = |s: &ClientState, rule: &str| {
            s.budgets
                .iter()
                .find(|b| b.rule == rule)
                .map(|b| (b.available, b.limit.clone()))
        };
        let fresh = store.client_state(ip, Some("alice"), t0);
        assert_eq!(
            available(&fresh, "rate_limits.messages_per_ip"),
            Some((3, "3/hour".to_string()))
        );
        assert_eq!(
            available(&fresh, "rate_limits.messages_per_user"),
            Some((2, "2/hour".to_string()))
        );
        // Not configured: not listed; no login: no user budget.
        assert_eq!(available(&fresh, "rate_limits.recipients_per_ip"), None);
        let anonymous = store.client_state(ip, None, t0);
        assert_eq!(available(&anonymous, "rate_limits.messages_per_user"), None);
        assert_eq!(fresh.locked_out_secs, None);
        // Reading took nothing: the whole budget is still there.
        let key = RateKey::Client(ip);
        for _ in 0..3 {
            store.client_state(ip, Some("alice"), t0);
            assert!(store.take(RateLimit::MessagesPerIp, &key, t0).is_ok());
        }
        let spent = store.client_state(ip, Some("alice"), t0);
        assert_eq!(
            available(&spent, "rate_limits.messages_per_ip").unwrap().0,
            0
        );
        assert!(store.take(RateLimit::MessagesPerIp, &key, t0).is_err());
        // A lockout is read, and reading it does not lock anyone else out.
        match store.auth_gate(ip, "alice", t0) {
            GateDecision::Proceed(a) => a.settle(false, t0),
            other => panic!("{other:?}"),
        };
        let locked = store.client_state(ip, None, t0);
        assert_eq!(locked.locked_out_secs, Some(3600));
        let other: IpAddr = "198.51.100.1".parse().unwrap();
        assert_eq!(store.client_state(other, None, t0).locked_out_secs, None);
        assert!(matches!(
            store.auth_gate(other, "alice", t0),
            GateDecision::Proceed(_)
        ));
    }
}
