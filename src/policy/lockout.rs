//! AUTH failure accounting: lockout of brute-forcing clients and slow-down of sprayed logins.
//!
//! Two tables, both keyed and bounded, both taking the time as an input:
//! - per client ([`ClientKey`]: IPv4 address or IPv6 /64): `max_failures` failed AUTHs within
//!   `failure_window` lock that client out for `lockout`. While locked out every AUTH is
//!   answered `454 4.7.0` without the password being verified, so a brute-forcer learns
//!   nothing even when it guesses right. A success clears the client's count.
//! - per login: failures across all clients. Once a login has `max_failures` failures within
//!   the window (necessarily from several clients, or one that is now locked out), every AUTH
//!   for it waits before its reply, [`SPRAY_BASE_DELAY`] doubling with each further failure up
//!   to [`MAX_SPRAY_DELAY`]. The delay applies to right and wrong passwords alike (a sprayer
//!   must not learn to give up early on a slow answer), so the owner still gets in from a
//!   clean address, a few seconds late. When the failures come from two or more clients the
//!   attempt is reported as spraying. The login table counts unknown logins too: treating them
//!   differently would tell an attacker which logins exist.
//!
//! Windows are fixed, starting at the first failure of a key: simple, and at most twice
//! `max_failures` failures can fall in any `failure_window`.

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use super::limits::ClientKey;
use crate::config::Auth;

/// First delay for a sprayed login.
pub const SPRAY_BASE_DELAY: Duration = Duration::from_millis(500);

/// Longest delay for a sprayed login (well under any command timeout).
pub const MAX_SPRAY_DELAY: Duration = Duration::from_secs(8);

/// Clients tracked at most; beyond, stale entries are dropped, then the least recent.
pub const MAX_TRACKED_CLIENTS: usize = 50_000;

/// Logins tracked at most; beyond, stale entries are dropped, then the least recent.
pub const MAX_TRACKED_LOGINS: usize = 10_000;

/// Octets of a login kept as its key (longer logins are truncated: no such user exists).
pub const MAX_LOGIN_KEY: usize = 256;

/// Distinct clients remembered per login (reports say "at least" beyond).
pub const MAX_CLIENTS_PER_LOGIN: usize = 16;

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

/// What to do with an AUTH before verifying its password.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Gate {
    /// The client is locked out: answer `454 4.7.0`, verify nothing.
    LockedOut { remaining: Duration },
    /// Verify; do not reply before `delay` has passed.
    Proceed { delay: Duration },
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
    locked_until: Option<Instant>,
}

#[derive(Debug)]
struct LoginRecord {
    window: Window,
    clients: Vec<ClientKey>,
}

#[derive(Debug, Default)]
struct Tables {
    clients: HashMap<ClientKey, ClientRecord>,
    logins: HashMap<String, LoginRecord>,
}

/// The failure tables. Shared by every session; outlives a configuration when its
/// [`Settings`] do not change.
#[derive(Debug)]
pub struct AuthGuard {
    settings: Settings,
    tables: Mutex<Tables>,
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

/// Make room for one more entry: drop stale ones, then, if the table is still full, the
/// least recently touched tenth (so a flood pays for one scan per tenth of the table, not one
/// per entry).
fn make_room<K: Clone + Eq + std::hash::Hash, V>(
    map: &mut HashMap<K, V>,
    max: usize,
    stale: impl Fn(&V) -> bool,
    last: impl Fn(&V) -> Instant,
) {
    if map.len() < max {
        return;
    }
    map.retain(|_, v| !stale(v));
    if map.len() < max {
        return;
    }
    let mut ages: Vec<(Instant, K)> = map.iter().map(|(k, v)| (last(v), k.clone())).collect();
    let evict = (max / 10).max(1).min(ages.len());
    ages.select_nth_unstable_by_key(evict - 1, |(t, _)| *t);
    for (_, k) in &ages[..evict] {
        map.remove(k);
    }
}

impl AuthGuard {
    pub fn new(settings: Settings) -> AuthGuard {
        AuthGuard {
            settings,
            tables: Mutex::new(Tables::default()),
        }
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Tables> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Before verifying an AUTH for `login` from `ip` at `now`.
    pub fn gate(&self, ip: IpAddr, login: &str, now: Instant) -> Gate {
        let s = self.settings;
        let t = self.lock();
        if let Some(until) = t
            .clients
            .get(&ClientKey::new(ip))
            .and_then(|c| c.locked_until)
            .filter(|&until| until > now)
        {
            return Gate::LockedOut {
                remaining: until - now,
            };
        }
        let failures = t
            .logins
            .get(login_key(login))
            .filter(|r| !r.window.expired(now, s.failure_window))
            .map_or(0, |r| r.window.failures);
        Gate::Proceed {
            delay: spray_delay(failures, s.max_failures),
        }
    }

    /// A successful AUTH: the client's failures are forgotten (the login's are not: a
    /// sprayer does not get a fresh start because the owner logged in).
    pub fn success(&self, ip: IpAddr) {
        self.lock().clients.remove(&ClientKey::new(ip));
    }

    /// A failed AUTH for `login` from `ip` at `now`.
    pub fn failure(&self, ip: IpAddr, login: &str, now: Instant) -> FailureReport {
        let s = self.settings;
        let key = ClientKey::new(ip);
        let mut report = FailureReport::default();
        let mut t = self.lock();
        let t = &mut *t;

        if !t.clients.contains_key(&key) {
            make_room(
                &mut t.clients,
                MAX_TRACKED_CLIENTS,
                |c| {
                    c.window.expired(now, s.failure_window)
                        && c.locked_until.is_none_or(|u| u <= now)
                },
                |c| c.window.last,
            );
        }
        let client = t.clients.entry(key).or_insert_with(|| ClientRecord {
            window: Window::new(now),
            locked_until: None,
        });
        if client.window.expired(now, s.failure_window) {
            client.window = Window::new(now);
        }
        client.window.failures += 1;
        client.window.last = now;
        if client.window.failures >= s.max_failures {
            report.locked_out = Some(client.window.failures);
            client.locked_until = Some(now + s.lockout);
            client.window = Window::new(now);
        }

        let name = login_key(login);
        if !t.logins.contains_key(name) {
            make_room(
                &mut t.logins,
                MAX_TRACKED_LOGINS,
                |l| l.window.expired(now, s.failure_window),
                |l| l.window.last,
            );
        }
        let record = t
            .logins
            .entry(name.to_string())
            .or_insert_with(|| LoginRecord {
                window: Window::new(now),
                clients: Vec::new(),
            });
        if record.window.expired(now, s.failure_window) {
            record.window = Window::new(now);
            record.clients.clear();
        }
        record.window.failures += 1;
        record.window.last = now;
        if !record.clients.contains(&key) && record.clients.len() < MAX_CLIENTS_PER_LOGIN {
            record.clients.push(key);
        }
        // Report when the threshold is reached and at every further multiple of it, not on
        // every failure, so an attack does not flood the log.
        let f = record.window.failures;
        if record.clients.len() >= 2 && f >= s.max_failures && f.is_multiple_of(s.max_failures) {
            report.spraying = Some((f, record.clients.len()));
        }
        report
    }

    /// Entries held (clients, logins).
    pub fn len(&self) -> (usize, usize) {
        let t = self.lock();
        (t.clients.len(), t.logins.len())
    }
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
    use super::*;

    fn guard() -> AuthGuard {
        AuthGuard::new(Settings {
            max_failures: 3,
            failure_window: Duration::from_secs(600),
            lockout: Duration::from_secs(900),
        })
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    const NO_DELAY: Gate = Gate::Proceed {
        delay: Duration::ZERO,
    };

    #[test]
    fn brute_force_locks_the_client_out_for_the_lockout_only() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        assert_eq!(g.failure(a, "alice", t0), FailureReport::default());
        assert_eq!(g.failure(a, "bob", t0).locked_out, None);
        assert_eq!(g.gate(a, "carol", t0), NO_DELAY);
        assert_eq!(g.failure(a, "carol", t0).locked_out, Some(3));
        // Locked out whatever the login; other clients are not.
        let t1 = t0 + Duration::from_secs(60);
        assert_eq!(
            g.gate(a, "dave", t1),
            Gate::LockedOut {
                remaining: Duration::from_secs(840)
            }
        );
        assert_eq!(g.gate(ip("192.0.2.2"), "dave", t1), NO_DELAY);
        // The same /64 is the same client; IPv4-mapped is IPv4.
        assert!(matches!(
            g.gate(ip("::ffff:192.0.2.1"), "x", t1),
            Gate::LockedOut { .. }
        ));
        assert_eq!(g.gate(a, "dave", t0 + Duration::from_secs(900)), NO_DELAY);
    }

    #[test]
    fn failures_outside_the_window_do_not_add_up_and_success_clears() {
        let g = guard();
        let t0 = Instant::now();
        let a = ip("192.0.2.1");
        g.failure(a, "alice", t0);
        g.failure(a, "alice", t0 + Duration::from_secs(1));
        // The window (600 s from the first failure) is over: counting starts again.
        let t1 = t0 + Duration::from_secs(600);
        assert_eq!(g.failure(a, "alice", t1).locked_out, None);
        g.failure(a, "alice", t1);
        g.success(a);
        assert_eq!(g.failure(a, "alice", t1).locked_out, None);
        assert_eq!(g.failure(a, "alice", t1).locked_out, None);
        assert_eq!(g.failure(a, "alice", t1).locked_out, Some(3));
    }

    #[test]
    fn sprayed_login_is_slowed_and_reported_but_not_locked() {
        let g = guard();
        let t0 = Instant::now();
        let clients = ["198.51.100.1", "198.51.100.2", "198.51.100.3"];
        let mut reports = Vec::new();
        for (i, c) in clients.iter().cycle().take(6).enumerate() {
            let r = g.failure(ip(c), "alice", t0 + Duration::from_secs(i as u64));
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
        assert_eq!(
            g.gate(owner, "alice", t0),
            Gate::Proceed {
                delay: spray_delay(6, 3)
            }
        );
        assert_eq!(spray_delay(6, 3), Duration::from_secs(4));
        // Other logins are not slowed.
        assert_eq!(g.gate(owner, "bob", t0), NO_DELAY);
        // The delay ends with the window.
        assert_eq!(
            g.gate(owner, "alice", t0 + Duration::from_secs(600)),
            NO_DELAY
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
        let g = guard();
        let t0 = Instant::now();
        let long = "x".repeat(MAX_LOGIN_KEY);
        for i in 0..(MAX_TRACKED_LOGINS + 50) {
            let login = format!("{long}{i}");
            g.failure(
                ip("192.0.2.1"),
                &login,
                t0 + Duration::from_secs(700 * i as u64),
            );
        }
        let (clients, logins) = g.len();
        assert!(clients <= 1);
        // All those long logins share one truncated key.
        assert_eq!(logins, 1);
        for i in 0..(MAX_TRACKED_CLIENTS as u32 + 10) {
            let c = IpAddr::from(std::net::Ipv4Addr::from(0x0a00_0000 + i));
            g.failure(c, "u", t0);
        }
        let (clients, _) = g.len();
        assert!(clients <= MAX_TRACKED_CLIENTS, "{clients}");
        for i in 0..(MAX_TRACKED_LOGINS + 10) {
            g.failure(ip("192.0.2.9"), &format!("u{i}"), t0);
        }
        let (_, logins) = g.len();
        assert!(logins <= MAX_TRACKED_LOGINS, "{logins}");
    }
}
