//! AUTH failure accounting: lockout of brute-forcing clients and slow-down of sprayed logins.
//!
//! Two tables, both bounded, both taking the time as an input:
//! - per client (an IPv4 address or IPv6 /64; under a flood a coarser prefix, see below):
//!   at most `max_failures` failed verifications within `failure_window`, then the client is
//!   locked out for `lockout`. While locked out every AUTH is answered `454 4.7.0` without the
//!   password being verified, so a brute-forcer learns nothing even when it guesses right.
//! - per login: failures across all clients. Once a login has `max_failures` failures within
//!   the window (necessarily from several clients, or one that is now locked out), every AUTH
//!   for it waits before its reply, [`SPRAY_BASE_DELAY`] doubling with each further failure up
//!   to [`MAX_SPRAY_DELAY`]. The delay applies to right and wrong passwords alike (a sprayer
//!   must not learn to give up early on a slow answer), so the owner still gets in from a
//!   clean address, a few seconds late. When the failures come from two or more clients the
//!   attempt is reported as spraying. The login table counts unknown logins too: treating them
//!   differently would tell an attacker which logins exist.
//!
//! # What an attacker cannot do to the client table
//!
//! - **Reset it by logging in.** A success clears only the failures of the login that
//!   succeeded (a client's failures are counted per login, [`MAX_LOGINS_PER_CLIENT`] of them;
//!   failures of further logins are counted for no login and never cleared by a success), so
//!   knowing one password does not buy fresh guesses at another.
//! - **Overshoot it with parallel connections.** [`AuthGuard::begin`] reserves a failure
//!   before the password is verified, and the reservation counts as a failure until
//!   [`AuthAttempt::settle`] records the result: `failures + in flight` never exceeds
//!   `max_failures`. A client has at most [`MAX_IN_FLIGHT_PER_CLIENT`] verification in flight;
//!   a further AUTH from it gets [`GateDecision::Busy`] and waits for that result (the driver bounds the
//!   wait), so the colleagues of an office behind one NAT address are verified one after
//!   another rather than refused, and a correct password waits for at most the verifications
//!   ahead of it. An attempt dropped without a result stays counted as a failure.
//! - **Evict a lockout by flooding.** Entries that are locked, in flight, or hold failures
//!   inside their window are never removed. When the exact table is full (after dropping
//!   settled entries, at most once per [`SWEEP_INTERVAL`](super::prefix::SWEEP_INTERVAL)), a new client is counted under its
//!   coarser prefix instead: IPv4 /24, /16, /8, then one entry for all of IPv4; IPv6 /48, /32,
//!   /16, then one for all of IPv6 ([`PREFIXES_V4`](super::prefix::PREFIXES_V4), [`PREFIXES_V6`](super::prefix::PREFIXES_V6)). A lockout of a prefix
//!   applies to every address in it, so a flood locks out its own prefixes (and whoever shares
//!   them) and never lifts anyone's lockout. The table holds at most [`MAX_TRACKED_CLIENTS`]
//!   exact entries plus [`MAX_COARSE_CLIENTS`] per coarser level plus the two catch-all
//!   entries: about 70,000 entries of at most about 300 bytes (8 logins each), about 20 MiB.
//!
//! The login table likewise never evicts a login with failures in its window: when it holds
//! [`MAX_TRACKED_LOGINS`], further logins share one overflow entry (so a flood of invented
//! logins slows those logins, and cannot clear the record of a sprayed one): at most about
//! 7 MiB (a 256-octet key and 16 clients per login). The known pairs of [`AuthAttempt::known`]
//! take under 1 MiB ([`MAX_KNOWN_PAIRS`]).
//!
//! Windows are fixed, starting at the first failure of a key: simple, and at most twice
//! `max_failures` failures can fall in any `failure_window`.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ipnet::IpNet;

use super::limits::ClientKey;
use super::prefix::{LEVELS, Level, Levels, home, prefixes};
use crate::config::Auth;

/// First delay for a sprayed login.
pub const SPRAY_BASE_DELAY: Duration = Duration::from_millis(500);

/// Longest delay for a sprayed login (well under any command timeout).
pub const MAX_SPRAY_DELAY: Duration = Duration::from_secs(8);

/// Exact clients (IPv4 address, IPv6 /64) tracked at most; beyond, new clients are counted
/// under a coarser prefix.
pub const MAX_TRACKED_CLIENTS: usize = 50_000;

/// Entries per coarser prefix level (IPv4 /24, /16, /8 with IPv6 /48, /32, /16) at most;
/// beyond, the next coarser level is used, down to one entry per address family.
pub const MAX_COARSE_CLIENTS: usize = 5_000;

/// Logins tracked at most; beyond, new logins share one overflow entry.
pub const MAX_TRACKED_LOGINS: usize = 10_000;

/// Octets of a login kept as its key (longer logins are truncated: no such user exists).
pub const MAX_LOGIN_KEY: usize = 256;

/// Distinct clients remembered per login (reports say "at least" beyond).
pub const MAX_CLIENTS_PER_LOGIN: usize = 16;

/// Logins whose failures a client record counts separately (so a success clears only its
/// own); failures of further logins are counted for no login.
pub const MAX_LOGINS_PER_CLIENT: usize = 8;

/// Verifications in flight per client entry at most; further AUTHs wait ([`GateDecision::Busy`]).
pub const MAX_IN_FLIGHT_PER_CLIENT: u32 = 1;

/// How long a successful AUTH of a login from a client makes that pair "known": its later
/// AUTHs are verified ahead of strangers' ([`AuthAttempt::known`]).
pub const KNOWN_PAIR_TTL: Duration = Duration::from_secs(7 * 24 * 3600);

/// (client, login) pairs remembered as known at most; beyond, the oldest are forgotten (which
/// only costs them their priority).
pub const MAX_KNOWN_PAIRS: usize = 10_000;

/// How many entries each table may hold. [`GuardBounds::DEFAULT`] is what the relay uses; tests
/// use small tables.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct GuardBounds {
    /// Exact client entries ([`MAX_TRACKED_CLIENTS`]).
    pub clients: usize,
    /// Entries per coarser prefix level ([`MAX_COARSE_CLIENTS`]).
    pub coarse: usize,
    /// Login entries, the overflow entry not counted ([`MAX_TRACKED_LOGINS`]).
    pub logins: usize,
}

impl GuardBounds {
    pub const DEFAULT: GuardBounds = GuardBounds {
        clients: MAX_TRACKED_CLIENTS,
        coarse: MAX_COARSE_CLIENTS,
        logins: MAX_TRACKED_LOGINS,
    };

    fn level(&self, level: usize) -> usize {
        match level {
            0 => self.clients,
            l if l == LEVELS - 1 => usize::MAX,
            _ => self.coarse,
        }
    }
}

/// The `[auth]` settings the tables use; tables are carried over a reload only when these
/// are unchanged.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    pub max_failures: u32,
    pub failure_window: Duration,
    pub lockout: Duration,
}

impl Settings {
    pub fn from_config(auth: &Auth) -> Settings {
        Settings {
            max_failures: auth.max_failures.max(1),
            failure_window: auth.failure_window,
            lockout: auth.lockout,
        }
    }
}

/// A lockout at any level the client (its prefixes `nets`) belongs to holds, whichever level
/// counts it now: how long the longest still runs at `now`.
fn locked(t: &Tables, nets: &[IpNet; LEVELS], now: Instant) -> Option<Duration> {
    nets.iter()
        .zip(&t.clients)
        .filter_map(|(net, level)| level.map.get(net).and_then(|r| r.locked(now)))
        .max()
}

/// What to do with an AUTH before verifying its password.
#[derive(Debug)]
pub enum GateDecision {
    /// The client (or a prefix it is counted under) is locked out: answer `454 4.7.0`,
    /// verify nothing.
    LockedOut { remaining: Duration },
    /// The client's failure budget is taken by verifications in flight, or it has
    /// [`MAX_IN_FLIGHT_PER_CLIENT`] of them: ask again when one has settled.
    Busy,
    /// Verify, then [`AuthAttempt::settle`]; do not reply before `attempt.delay` has passed.
    Proceed(AuthAttempt),
}

/// What a failed AUTH led to, for the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct FailureReport {
    /// This failure locked the client out (its failure count within the window).
    pub locked_out: Option<u32>,
    /// The login is being sprayed: failures within the window and distinct clients.
    pub spraying: Option<(u32, usize)>,
}

#[derive(Debug)]
struct Window {
    start: Instant,
    failures: u32,
    last: Instant,
}

impl Window {
    fn new(now: Instant) -> Window {
        Window {
            start: now,
            failures: 0,
            last: now,
        }
    }

    fn expired(&self, now: Instant, window: Duration) -> bool {
        now.saturating_duration_since(self.start) >= window
    }
}

#[derive(Debug)]
struct ClientRecord {
    window: Window,
    /// Failures within the window per login (by keyed hash of the login); their sum is at
    /// most `window.failures`, the rest belongs to no login.
    logins: Vec<(u64, u32)>,
    /// Verifications started and not settled; each counts as a failure until it settles.
    in_flight: u32,
    locked_until: Option<Instant>,
}

impl ClientRecord {
    fn new(now: Instant) -> ClientRecord {
        ClientRecord {
            window: Window::new(now),
            logins: Vec::new(),
            in_flight: 0,
            locked_until: None,
        }
    }

    fn locked(&self, now: Instant) -> Option<Duration> {
        self.locked_until
            .filter(|&until| until > now)
            .map(|until| until - now)
    }

    /// Start the window again if it is over.
    fn refresh(&mut self, now: Instant, window: Duration) {
        if self.window.expired(now, window) {
            self.window = Window::new(now);
            self.logins.clear();
        }
    }

    /// Nothing here that a fresh record would not say: it may be dropped.
    fn settled(&self, now: Instant, window: Duration) -> bool {
        self.in_flight == 0
            && self.locked(now).is_none()
            && (self.window.failures == 0 || self.window.expired(now, window))
    }
}

#[derive(Debug)]
struct LoginRecord {
    window: Window,
    clients: Vec<ClientKey>,
}

impl LoginRecord {
    fn new(now: Instant) -> LoginRecord {
        LoginRecord {
            window: Window::new(now),
            clients: Vec::new(),
        }
    }
}

#[derive(Debug)]
struct Tables {
    /// Indexed like [`PREFIXES_V4`](super::prefix::PREFIXES_V4) / [`PREFIXES_V6`](super::prefix::PREFIXES_V6): exact clients first.
    clients: Vec<Level<IpNet, ClientRecord, Instant>>,
    logins: Level<String, LoginRecord, Instant>,
    /// The failures of logins that found the login table full.
    overflow: LoginRecord,
    /// (exact client, login hash) pairs with a successful AUTH, and when.
    known: HashMap<(ClientKey, u64), Instant>,
}

/// The failure tables. Shared by every session; outlives a configuration when its
/// [`Settings`] do not change.
#[derive(Debug)]
pub struct AuthGuard {
    settings: Settings,
    bounds: GuardBounds,
    /// Keys the hashes of logins kept per client (random per process, so nobody can choose
    /// logins that collide).
    hasher: RandomState,
    tables: Mutex<Tables>,
    /// Told whenever a reservation ends (settled, released or dropped): an AUTH held back by
    /// [`GateDecision::Busy`] waits on it ([`AuthGuard::settled`]) before asking again.
    settled: tokio::sync::Notify,
}

/// An AUTH allowed to verify: it holds a reservation in its client's entry that counts as a
/// failure until [`AuthAttempt::settle`] (or, if dropped unsettled, for good).
#[derive(Debug)]
pub struct AuthAttempt {
    /// Answer no sooner than this (a sprayed login).
    pub delay: Duration,
    /// This login succeeded from this client within [`KNOWN_PAIR_TTL`]: verify it ahead of
    /// strangers, so a flood of invented logins does not keep the real users out. It says
    /// nothing an attacker can use: a pair becomes known only by a right password.
    pub known: bool,
    reservation: Option<FailureReservation>,
}

/// The failure an attempt holds in the lockout tables until it is settled.
#[derive(Debug)]
struct FailureReservation {
    guard: Arc<AuthGuard>,
    level: usize,
    net: IpNet,
    ip: IpAddr,
    login: String,
    started: Instant,
}

impl AuthAttempt {
    /// An attempt that nothing counts (a policy without `[auth]`).
    pub fn unguarded() -> AuthAttempt {
        AuthAttempt {
            delay: Duration::ZERO,
            known: false,
            reservation: None,
        }
    }

    /// Record the result of the verification at `now`: a success clears the failures of this
    /// login from the client's entry; a failure is counted for the client and the login.
    pub fn settle(mut self, success: bool, now: Instant) -> FailureReport {
        match self.reservation.take() {
            Some(r) => r.guard.settle(&r, success, now),
            None => FailureReport::default(),
        }
    }
}

impl AuthAttempt {
    /// Nothing was verified (the verifier was busy): give the reservation back uncounted.
    pub fn release(mut self) {
        if let Some(r) = self.reservation.take() {
            r.guard.release(&r);
        }
    }
}

impl Drop for AuthAttempt {
    /// A verification whose result never arrived stays a failure (at the time it started).
    fn drop(&mut self) {
        if let Some(r) = self.reservation.take() {
            r.guard.settle(&r, false, r.started);
        }
    }
}

/// `login` cut to at most [`MAX_LOGIN_KEY`] octets (on a character boundary): its key in the
/// login table, and the form shown in logs.
pub fn login_key(login: &str) -> &str {
    if login.len() <= MAX_LOGIN_KEY {
        return login;
    }
    let mut end = MAX_LOGIN_KEY;
    while !login.is_char_boundary(end) {
        end -= 1;
    }
    &login[..end]
}

/// The client table's levels for one client, as [`home`] sees them.
struct ClientLevels<'t> {
    levels: &'t mut [Level<IpNet, ClientRecord, Instant>],
    nets: &'t [IpNet; LEVELS],
    bounds: GuardBounds,
    now: Instant,
    window: Duration,
}

impl Levels for ClientLevels<'_> {
    fn levels(&self) -> usize {
        LEVELS
    }

    fn holds(&self, level: usize) -> bool {
        self.levels[level].map.contains_key(&self.nets[level])
    }

    fn make_room(&mut self, level: usize) -> bool {
        let (now, window) = (self.now, self.window);
        self.levels[level].make_room(self.bounds.level(level), now, |r| !r.settled(now, window))
    }
}

impl AuthGuard {
    /// Tables of the default size ([`GuardBounds::DEFAULT`]).
    pub fn new(settings: Settings) -> AuthGuard {
        AuthGuard::with_bounds(settings, GuardBounds::DEFAULT)
    }

    pub fn with_bounds(settings: Settings, bounds: GuardBounds) -> AuthGuard {
        AuthGuard {
            settings,
            bounds,
            hasher: RandomState::new(),
            tables: Mutex::new(Tables {
                clients: (0..LEVELS).map(|_| Level::default()).collect(),
                logins: Level::default(),
                overflow: LoginRecord::new(Instant::now()),
                known: HashMap::new(),
            }),
            settled: tokio::sync::Notify::new(),
        }
    }

    /// Resolves once any attempt has ended (settled, released, or dropped without a
    /// result). Create it before asking [`AuthGuard::begin`] (and `enable` it), so an end in
    /// between is not missed. Every way an attempt ends tells it, so a waiter needs no
    /// polling.
    pub fn settled(&self) -> tokio::sync::futures::Notified<'_> {
        self.settled.notified()
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn login_hash(&self, login: &str) -> u64 {
        self.hasher.hash_one(login_key(login))
    }

    /// Before verifying an AUTH for `login` from `ip` at `now`: refuse a locked-out client,
    /// hold back a client whose budget is taken by verifications in flight, or reserve one
    /// failure and let it verify.
    pub fn begin(self: &Arc<Self>, ip: IpAddr, login: &str, now: Instant) -> GateDecision {
        let s = self.settings;
        let nets = prefixes(ip);
        let mut t = self.lock();
        let t = &mut *t;
        if let Some(remaining) = locked(t, &nets, now) {
            return GateDecision::LockedOut { remaining };
        }
        let level = self.home(t, &nets, now);
        let record = t.clients[level]
            .map
            .entry(nets[level])
            .or_insert_with(|| ClientRecord::new(now));
        record.refresh(now, s.failure_window);
        if record.in_flight >= MAX_IN_FLIGHT_PER_CLIENT
            || record.window.failures + record.in_flight >= s.max_failures
        {
            return GateDecision::Busy;
        }
        record.in_flight += 1;
        let name = login_key(login);
        let failures = match t.logins.map.get(name) {
            Some(r) if !r.window.expired(now, s.failure_window) => r.window.failures,
            Some(_) => 0,
            None if t.logins.map.len() >= self.bounds.logins
                && !t.overflow.window.expired(now, s.failure_window) =>
            {
                t.overflow.window.failures
            }
            None => 0,
        };
        let known = t
            .known
            .get(&(ClientKey::new(ip), self.login_hash(login)))
            .is_some_and(|&at| now.saturating_duration_since(at) < KNOWN_PAIR_TTL);
        GateDecision::Proceed(AuthAttempt {
            delay: spray_delay(failures, s.max_failures),
            known,
            reservation: Some(FailureReservation {
                guard: Arc::clone(self),
                level,
                net: nets[level],
                ip,
                login: name.to_string(),
                started: now,
            }),
        })
    }

    /// How long the client `ip` stays locked out of AUTH at `now` (`None`: not locked out),
    /// as [`AuthGuard::begin`] decides it, recording nothing.
    pub fn locked_out(&self, ip: IpAddr, now: Instant) -> Option<Duration> {
        locked(&self.lock(), &prefixes(ip), now)
    }

    /// The level that counts a client ([`home`]).
    fn home(&self, t: &mut Tables, nets: &[IpNet; LEVELS], now: Instant) -> usize {
        home(&mut ClientLevels {
            levels: &mut t.clients,
            nets,
            bounds: self.bounds,
            now,
            window: self.settings.failure_window,
        })
    }

    fn release(&self, r: &FailureReservation) {
        let mut t = self.lock();
        if let Some(client) = t.clients[r.level].map.get_mut(&r.net) {
            client.in_flight = client.in_flight.saturating_sub(1);
        }
        drop(t);
        self.settled.notify_waiters();
    }

    /// Record a result (see [`AuthAttempt::settle`]) and wake the AUTHs waiting for one.
    fn settle(&self, r: &FailureReservation, success: bool, now: Instant) -> FailureReport {
        let report = self.record(r, success, now);
        self.settled.notify_waiters();
        report
    }

    fn record(&self, r: &FailureReservation, success: bool, now: Instant) -> FailureReport {
        let s = self.settings;
        let login_hash = self.login_hash(&r.login);
        let mut report = FailureReport::default();
        let mut t = self.lock();
        let t = &mut *t;
        // In-flight entries are never dropped, so the entry is there; should it not be, the
        // result is still counted.
        let client = t.clients[r.level]
            .map
            .entry(r.net)
            .or_insert_with(|| ClientRecord::new(now));
        client.in_flight = client.in_flight.saturating_sub(1);
        client.refresh(now, s.failure_window);
        if success {
            if let Some(i) = client.logins.iter().position(|&(h, _)| h == login_hash) {
                let (_, n) = client.logins.swap_remove(i);
                client.window.failures = client.window.failures.saturating_sub(n);
            }
            remember_known(&mut t.known, (ClientKey::new(r.ip), login_hash), now);
            return report;
        }
        client.window.failures += 1;
        client.window.last = now;
        if let Some((_, n)) = client.logins.iter_mut().find(|(h, _)| *h == login_hash) {
            *n += 1;
        } else if client.logins.len() < MAX_LOGINS_PER_CLIENT {
            client.logins.push((login_hash, 1));
        }
        if client.window.failures >= s.max_failures {
            report.locked_out = Some(client.window.failures);
            client.locked_until = Some(now + s.lockout);
            client.window = Window::new(now);
            client.logins.clear();
        }

        let key = ClientKey::new(r.ip);
        let record = self.login_record(t, &r.login, now);
        if record.window.expired(now, s.failure_window) {
            *record = LoginRecord::new(now);
        }
        record.window.failures += 1;
        record.window.last = now;
        if !record.clients.contains(&key) && record.clients.len() < MAX_CLIENTS_PER_LOGIN {
            record.clients.push(key);
        }
        report.spraying = spraying(record.window.failures, record.clients.len(), s.max_failures);
        report
    }

    /// The record counting `login`'s failures: its own, or the overflow when the table is full
    /// of logins with failures in their window.
    fn login_record<'t>(&self, t: &'t mut Tables, name: &str, now: Instant) -> &'t mut LoginRecord {
        let window = self.settings.failure_window;
        if !t.logins.map.contains_key(name)
            && !t
                .logins
                .make_room(self.bounds.logins, now, |l| !l.window.expired(now, window))
        {
            return &mut t.overflow;
        }
        t.logins
            .map
            .entry(name.to_string())
            .or_insert_with(|| LoginRecord::new(now))
    }

    /// Entries held (clients at every level, logins without the overflow entry).
    pub fn len(&self) -> (usize, usize) {
        let t = self.lock();
        (
            t.clients.iter().map(|l| l.map.len()).sum(),
            t.logins.map.len(),
        )
    }
}

/// Remember a known pair; a full table first forgets expired pairs, then the oldest tenth
/// (one scan per tenth of the table, not one per success).
fn remember_known(
    known: &mut HashMap<(ClientKey, u64), Instant>,
    pair: (ClientKey, u64),
    now: Instant,
) {
    if !known.contains_key(&pair) && known.len() >= MAX_KNOWN_PAIRS {
        known.retain(|_, &mut at| now.saturating_duration_since(at) < KNOWN_PAIR_TTL);
        if known.len() >= MAX_KNOWN_PAIRS {
            let mut ages: Vec<(Instant, (ClientKey, u64))> =
                known.iter().map(|(k, &at)| (at, *k)).collect();
            let evict = (MAX_KNOWN_PAIRS / 10).max(1);
            ages.select_nth_unstable_by_key(evict - 1, |(at, _)| *at);
            for (_, k) in &ages[..evict] {
                known.remove(k);
            }
        }
    }
    known.insert(pair, now);
}

/// What a login's failure record reports as spraying: `(failures, clients)` when the failures
/// come from two or more clients and reach `max_failures` or a further multiple of it (not
/// every failure, so an attack does not flood the log); else `None`.
pub fn spraying(failures: u32, clients: usize, max_failures: u32) -> Option<(u32, usize)> {
    (clients >= 2 && failures >= max_failures && failures.is_multiple_of(max_failures))
        .then_some((failures, clients))
}

/// The delay before answering an AUTH for a login with `failures` recent failures.
pub fn spray_delay(failures: u32, max_failures: u32) -> Duration {
    if failures < max_failures {
        return Duration::ZERO;
    }
    let doublings = (failures - max_failures).min(16);
    (SPRAY_BASE_DELAY * (1u32 << doublings)).min(MAX_SPRAY_DELAY)
}

#[cfg(test)]
mod tests {
    use std::future::Future;

    use super::*;

    fn settings(max_failures: u32) -> Settings {
        Settings {
            max_failures,
            failure_window: Duration::from_secs(600),
            lockout: Duration::from_secs(900),
        }
    }

    fn guard() -> Arc<AuthGuard> {
        Arc::new(AuthGuard::new(settings(3)))
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn proceed(g: &Arc<AuthGuard>, a: IpAddr, login: &str, now: Instant) -> AuthAttempt {
        match g.begin(a, login, now) {
            GateDecision::Proceed(attempt) => attempt,
            other => panic!("{a} {login}: expected to proceed, got {other:?}"),
        }
    }

    /// One wrong password for `login` from `a` at `now`.
    fn fail(g: &Arc<AuthGuard>, a: IpAddr, login: &str, now: Instant) -> FailureReport {
        proceed(g, a, login, now).settle(false, now)
    }

    fn locked(g: &Arc<AuthGuard>, a: IpAddr, now: Instant) -> bool {
        matches!(g.begin(a, "anyone", now), GateDecision::LockedOut { .. })
    }

    fn delay(g: &Arc<AuthGuard>, a: IpAddr, login: &str, now: Instant) -> Duration {
        let attempt = proceed(g, a, login, now);
        let d = attempt.delay;
        attempt.settle(true, now);
        d
    }

    #[test]
    fn every_way_an_attempt_ends_wakes_the_auths_waiting_for_one() {
        // A second AUTH from a client with a verification in flight waits for it to end; it
        // is woken whether that attempt is settled, released or dropped (no polling).
        let g = guard();
        let (a, t0) = (ip("192.0.2.1"), Instant::now());
        let ends: [fn(AuthAttempt, Instant); 3] = [
            |attempt, now| {
                attempt.settle(false, now);
            },
            |attempt, _| attempt.release(),
            |attempt, _| drop(attempt),
        ];
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        for end in ends {
            let attempt = proceed(&g, a, "alice", t0);
            let waiter = g.settled();
            tokio::pin!(waiter);
            waiter.as_mut().enable();
            assert!(matches!(g.begin(a, "alice", t0), GateDecision::Busy));
            assert!(waiter.as_mut().poll(&mut cx).is_pending());
            end(attempt, t0);
            assert!(waiter.as_mut().poll(&mut cx).is_ready());
        }
    }

    #[test]
    fn brute_force_locks_the_client_out_for_the_lockout_only() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(fail(&g, a, "alice", t0), FailureReport::default());
        assert_eq!(fail(&g, a, "bob", t0).locked_out, None);
        assert_eq!(delay(&g, a, "carol", t0), Duration::ZERO);
        assert_eq!(fail(&g, a, "carol", t0).locked_out, Some(3));
        // Locked out whatever the login; other clients are not.
        let t1 = t0 + Duration::from_secs(60);
        assert!(matches!(
            g.begin(a, "dave", t1),
            GateDecision::LockedOut { remaining } if remaining == Duration::from_secs(840)
        ));
        assert_eq!(delay(&g, ip("192.0.2.2"), "dave", t1), Duration::ZERO);
        // The same /64 is the same client; IPv4-mapped is IPv4.
        assert!(locked(&g, ip("::ffff:192.0.2.1"), t1));
        assert!(!locked(&g, a, t0 + Duration::from_secs(900)));
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        fail(&g, a, "alice", t0);
        fail(&g, a, "alice", t0 + Duration::from_secs(1));
        // The window (600 s from the first failure) is over: counting starts again.
        let t1 = t0 + Duration::from_secs(600);
        assert_eq!(fail(&g, a, "alice", t1).locked_out, None);
        assert_eq!(fail(&g, a, "alice", t1).locked_out, None);
        assert_eq!(fail(&g, a, "alice", t1).locked_out, Some(3));
    }

    #[test]
    fn success_as_another_login_does_not_reset_the_clients_failures() {
        // The reported attack: rounds of wrong passwords for bob, each followed by a correct
        // login as alice from the same address. The lockout must come at max_failures.
        let g = Arc::new(AuthGuard::new(settings(5)));
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let mut verified_guesses = 0;
        'rounds: for round in 0..6 {
            for _ in 0..4 {
                match g.begin(a, "bob", t0) {
                    GateDecision::Proceed(attempt) => {
                        verified_guesses += 1;
                        attempt.settle(false, t0);
                    }
                    GateDecision::LockedOut { .. } => break 'rounds,
                    GateDecision::Busy => panic!("nothing is in flight"),
                }
            }
            assert!(round == 0, "still not locked out in round {round}");
            proceed(&g, a, "alice", t0).settle(true, t0);
        }
        assert_eq!(verified_guesses, 5);
        assert!(locked(&g, a, t0));
    }

    #[test]
    fn success_clears_the_failures_of_its_own_login() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        fail(&g, a, "alice", t0);
        fail(&g, a, "alice", t0);
        // The owner typed it wrong twice, then right: those two are forgiven.
        proceed(&g, a, "alice", t0).settle(true, t0);
        assert_eq!(fail(&g, a, "alice", t0).locked_out, None);
        assert_eq!(fail(&g, a, "alice", t0).locked_out, None);
        assert_eq!(fail(&g, a, "alice", t0).locked_out, Some(3));
    }

    #[test]
    fn failures_beyond_the_tracked_logins_are_never_cleared_by_a_success() {
        let g = Arc::new(AuthGuard::new(settings(MAX_LOGINS_PER_CLIENT as u32 + 3)));
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for i in 0..MAX_LOGINS_PER_CLIENT {
            fail(&g, a, &format!("u{i}"), t0);
        }
        fail(&g, a, "alice", t0);
        fail(&g, a, "alice", t0);
        // Alice's two failures found no room of their own: her success cannot clear them.
        proceed(&g, a, "alice", t0).settle(true, t0);
        assert_eq!(
            fail(&g, a, "x", t0).locked_out,
            Some(MAX_LOGINS_PER_CLIENT as u32 + 3)
        );
    }

    #[test]
    fn parallel_attempts_cannot_overshoot_because_verifications_in_flight_count() {
        // 20 connections × 3 AUTHs from one address, all trying to start at once.
        let g = Arc::new(AuthGuard::new(settings(5)));
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let mut verified = 0;
        let mut in_flight: Vec<AuthAttempt> = Vec::new();
        for _ in 0..60 {
            match g.begin(a, "bob", t0) {
                GateDecision::Proceed(attempt) => in_flight.push(attempt),
                GateDecision::Busy => {
                    // Only one verification at a time per client: settle it, as a worker would.
                    assert_eq!(in_flight.len(), MAX_IN_FLIGHT_PER_CLIENT as usize);
                    verified += 1;
                    in_flight.pop().unwrap().settle(false, t0);
                }
                GateDecision::LockedOut { .. } => {}
            }
        }
        verified += in_flight.len();
        drop(in_flight);
        assert_eq!(verified, 5);
        assert!(locked(&g, a, t0));
    }

    #[test]
    fn budget_held_by_a_verification_in_flight_makes_others_wait_not_fail() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        fail(&g, a, "bob", t0);
        fail(&g, a, "bob", t0);
        // A colleague behind the same address is being verified with the last failure left.
        let colleague = proceed(&g, a, "carol", t0);
        // Alice is held back, not locked out and not counted ...
        assert!(matches!(g.begin(a, "alice", t0), GateDecision::Busy));
        // ... and goes ahead as soon as the colleague's login turns out right.
        colleague.settle(true, t0);
        proceed(&g, a, "alice", t0).settle(true, t0);
        // Had it been wrong, the address would be locked out.
        let colleague = proceed(&g, a, "carol", t0);
        assert_eq!(colleague.settle(false, t0).locked_out, Some(3));
        assert!(locked(&g, a, t0));
    }

    #[test]
    fn only_a_login_that_succeeded_from_a_client_is_known_there() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        let first = proceed(&g, a, "alice", t0);
        assert!(!first.known);
        first.settle(true, t0);
        let again = proceed(&g, a, "alice", t0 + Duration::from_secs(60));
        assert!(again.known);
        again.settle(false, t0);
        // Not another login from there, nor the login from elsewhere; not forever.
        assert!(!proceed(&g, a, "bob", t0).known);
        assert!(!proceed(&g, ip("192.0.2.2"), "alice", t0).known);
        assert!(!proceed(&g, a, "alice", t0 + KNOWN_PAIR_TTL).known);
    }

    #[test]
    fn an_attempt_dropped_without_a_result_counts_as_a_failure() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        for _ in 0..3 {
            drop(proceed(&g, a, "bob", t0));
        }
        assert!(locked(&g, a, t0));
    }

    #[test]
    fn flooding_the_client_table_never_lifts_a_lockout() {
        // The reported attack, scaled down: a lockout of an hour, then 50,500 failures from
        // distinct addresses over 13 minutes against a table of 8 exact entries.
        let g = Arc::new(AuthGuard::with_bounds(
            Settings {
                max_failures: 5,
                failure_window: Duration::from_secs(600),
                lockout: Duration::from_secs(3600),
            },
            GuardBounds {
                clients: 8,
                coarse: 4,
                logins: 4,
            },
        ));
        let t0 = Instant::now();
        let victim = ip("127.3.0.1");
        for _ in 0..5 {
            fail(&g, victim, "alice", t0);
        }
        assert!(locked(&g, victim, t0));
        let step = Duration::from_millis(16);
        let mut now = t0;
        for i in 0..50_500u32 {
            now = t0 + step * i;
            let a = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            if let GateDecision::Proceed(attempt) = g.begin(a, &format!("user{i}"), now) {
                attempt.settle(false, now);
            }
            let (clients, logins) = g.len();
            assert!(clients <= 8 + 3 * 4 + 2, "{clients} client entries");
            assert!(logins <= 4, "{logins} login entries");
        }
        assert!(now >= t0 + Duration::from_secs(13 * 60) - step);
        assert!(locked(&g, victim, now), "the flood lifted the lockout");
        // The flood locked out its own prefix (10.0.0.0/16 here), not bystanders elsewhere.
        assert!(locked(&g, ip("10.0.200.1"), now));
        assert_eq!(delay(&g, ip("192.0.2.1"), "bob", now), Duration::ZERO);
        // The lockout ends when it expires, not before.
        assert!(!locked(&g, victim, t0 + Duration::from_secs(3600)));
    }

    #[test]
    fn flooding_the_login_table_never_clears_a_sprayed_login() {
        let g = Arc::new(AuthGuard::with_bounds(
            settings(3),
            GuardBounds {
                clients: 1000,
                coarse: 10,
                logins: 4,
            },
        ));
        let t0 = Instant::now();
        for c in ["198.51.100.1", "198.51.100.2", "198.51.100.3"] {
            fail(&g, ip(c), "alice", t0);
        }
        for i in 0..100u32 {
            let a = IpAddr::from(std::net::Ipv4Addr::from(0xc633_6400 + 10 + i));
            fail(&g, a, &format!("invented{i}"), t0 + Duration::from_secs(2));
        }
        assert_eq!(g.len().1, 4);
        let owner = ip("203.0.113.9");
        assert_eq!(delay(&g, owner, "alice", t0), spray_delay(3, 3));
        // Invented logins beyond the table share the overflow entry, and are slowed by it.
        assert!(delay(&g, owner, "invented99", t0 + Duration::from_secs(3)) > Duration::ZERO);
    }

    #[test]
    fn sprayed_login_is_slowed_and_reported_but_not_locked() {
        let g = guard();
        let t0 = Instant::now();
        let clients = ["198.51.100.1", "198.51.100.2", "198.51.100.3"];
        let mut reports = Vec::new();
        for (i, c) in clients.iter().cycle().take(6).enumerate() {
            let r = fail(&g, ip(c), "alice", t0 + Duration::from_secs(i as u64));
            assert_eq!(
                r.locked_out, None,
                "two failures per client stay under the lockout"
            );
            reports.push(r.spraying);
        }
        assert_eq!(
            reports,
            vec![None, None, Some((3, 3)), None, None, Some((6, 3))]
        );
        // The owner from a clean client proceeds, after a capped delay.
        let owner = ip("203.0.113.9");
        assert_eq!(delay(&g, owner, "alice", t0), spray_delay(6, 3));
        assert_eq!(spray_delay(6, 3), Duration::from_secs(4));
        // Other logins are not slowed.
        assert_eq!(delay(&g, owner, "bob", t0), Duration::ZERO);
        // The delay ends with the window.
        assert_eq!(
            delay(&g, owner, "alice", t0 + Duration::from_secs(600)),
            Duration::ZERO
        );
    }

    #[test]
    fn delay_grows_and_is_capped() {
        assert_eq!(spray_delay(0, 5), Duration::ZERO);
        assert_eq!(spray_delay(4, 5), Duration::ZERO);
        assert_eq!(spray_delay(5, 5), SPRAY_BASE_DELAY);
        assert_eq!(spray_delay(6, 5), SPRAY_BASE_DELAY * 2);
        assert_eq!(spray_delay(100, 5), MAX_SPRAY_DELAY);
        assert_eq!(spray_delay(u32::MAX, 1), MAX_SPRAY_DELAY);
    }

    #[test]
    fn tables_are_bounded() {
        let g = Arc::new(AuthGuard::new(settings(1_000_000)));
        let t0 = Instant::now();
        let long = "x".repeat(MAX_LOGIN_KEY);
        for i in 0..50 {
            fail(&g, ip("192.0.2.1"), &format!("{long}{i}"), t0);
        }
        // All those long logins share one truncated key.
        assert_eq!(g.len(), (1, 1));
        for i in 0..(MAX_TRACKED_CLIENTS as u32 + 10) {
            let c = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            fail(&g, c, "u", t0);
        }
        let (clients, _) = g.len();
        assert!(
            clients <= MAX_TRACKED_CLIENTS + 3 * MAX_COARSE_CLIENTS + 2,
            "{clients}"
        );
        for i in 0..(MAX_TRACKED_LOGINS + 10) {
            fail(&g, ip("192.0.2.9"), &format!("u{i}"), t0);
        }
        let (_, logins) = g.len();
        assert!(logins <= MAX_TRACKED_LOGINS, "{logins}");
    }
}
