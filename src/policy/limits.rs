//! Keyed rate limits (`[rate_limits]`) on governor's GCRA, driven by a time the caller passes in.
//!
//! A rate `N/per` allows a burst of `N` and then one more event every `per / N`: a compromised
//! account with `messages_per_user = "600/hour"` sends at most 600 messages in its first hour
//! and ten a minute after that, whatever it tries.
//!
//! Clients are keyed by [`ClientKey`]: an IPv4 address (IPv4-mapped IPv6 included), or the /64
//! of an IPv6 address, since one IPv6 host usually holds a whole /64 and could otherwise take
//! a fresh budget for every address in it. Users are keyed by login.
//!
//! Memory is bounded: keys whose state is indistinguishable from a fresh one are dropped every
//! [`PRUNE_INTERVAL`], and a table that still holds [`MAX_KEYS`] after pruning is started over
//! (and says so in the log) rather than grow without end. Starting over forgets budgets, which
//! lets the offenders of such a flood through for a moment; refusing every newcomer instead
//! would let anyone with enough addresses shut the relay for everybody.

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use arc_swap::ArcSwap;
use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::state::keyed::HashMapStateStore;
use governor::{Quota, RateLimiter};
use tracing::warn;

use super::access::normalize;
use crate::config::units::format_rate;
use crate::config::{Rate, RateLimits};
use crate::smtp::{Reply, reply};

/// How often stale keys are dropped from a table.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Most keys one table holds (about 100 bytes each) before it is started over.
pub const MAX_KEYS: usize = 200_000;

/// A table that is full is pruned at most this often.
const FULL_PRUNE_INTERVAL: Duration = Duration::from_secs(1);

/// The key of a client for per-IP limits and AUTH failure counting.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct ClientKey(IpAddr);

impl ClientKey {
    /// IPv4 (and IPv4-mapped IPv6) addresses as they are; IPv6 addresses by their /64.
    pub fn new(ip: IpAddr) -> ClientKey {
        match normalize(ip) {
            IpAddr::V6(v6) => {
                let prefix = u128::from(v6) & !((1u128 << 64) - 1);
                ClientKey(IpAddr::V6(Ipv6Addr::from(prefix)))
            }
            v4 => ClientKey(v4),
        }
    }
}

impl fmt::Display for ClientKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.0 {
            IpAddr::V6(v6) => write!(f, "{v6}/64"),
            v4 => write!(f, "{v4}"),
        }
    }
}

/// A rate limit was exceeded: which one, for the log, and the reply for the client.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Limited {
    /// The policy key, e.g. `rate_limits.messages_per_ip`.
    pub rule: &'static str,
    /// The configured rate.
    pub limit: Rate,
}

impl Limited {
    /// `421 4.7.0` (and close) for connections, `451 4.7.1` for messages and recipients.
    pub fn reply(&self) -> Reply {
        if self.rule == CONNECTIONS_PER_IP {
            reply::CONNECTION_RATE
        } else {
            reply::RATE_LIMITED
        }
    }

    /// The limit as the policy file writes it (`120/min`), for the log.
    pub fn limit_text(&self) -> String {
        format_rate(self.limit)
    }
}

const CONNECTIONS_PER_IP: &str = "rate_limits.connections_per_ip";
const MESSAGES_PER_IP: &str = "rate_limits.messages_per_ip";
const MESSAGES_PER_USER: &str = "rate_limits.messages_per_user";
const RECIPIENTS_PER_IP: &str = "rate_limits.recipients_per_ip";

/// A governor clock that shows the time the caller last passed in (never going backwards), so
/// decisions take the time as an input and tests need no sleeping.
#[derive(Debug, Clone)]
struct InputClock {
    origin: Instant,
    /// Nanoseconds since `origin`.
    now: Arc<AtomicU64>,
}

impl InputClock {
    fn new(origin: Instant) -> InputClock {
        InputClock {
            origin,
            now: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Advance to `at` (earlier times leave the clock where it is) and return it.
    fn set(&self, at: Instant) -> u64 {
        let nanos =
            u64::try_from(at.saturating_duration_since(self.origin).as_nanos()).unwrap_or(u64::MAX);
        self.now.fetch_max(nanos, Ordering::AcqRel).max(nanos)
    }
}

impl Clock for InputClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_nanos(self.now.load(Ordering::Acquire))
    }
}

type Limiter<K> = RateLimiter<K, HashMapStateStore<K>, InputClock, NoOpMiddleware<Duration>>;

/// One keyed limit: a rate and the budgets of every key seen recently.
pub struct KeyedLimit<K: Hash + Eq + Clone> {
    rate: Rate,
    quota: Quota,
    clock: InputClock,
    limiter: ArcSwap<Limiter<K>>,
    /// Clock reading (nanoseconds) of the last pruning.
    last_prune: AtomicU64,
    max_keys: usize,
}

impl<K: Hash + Eq + Clone> fmt::Debug for KeyedLimit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimit")
            .field("rate", &format_rate(self.rate))
            .field("keys", &self.limiter.load().len())
            .finish()
    }
}

impl<K: Hash + Eq + Clone> KeyedLimit<K> {
    /// A fresh table for `rate`, its clock starting at `origin`.
    pub fn new(rate: Rate, origin: Instant) -> KeyedLimit<K> {
        Self::with_max_keys(rate, origin, MAX_KEYS)
    }

    fn with_max_keys(rate: Rate, origin: Instant, max_keys: usize) -> KeyedLimit<K> {
        let count = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
        let period = (rate.per / count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("period is at least one nanosecond")
            .allow_burst(count);
        let clock = InputClock::new(origin);
        let limiter = RateLimiter::hashmap_with_clock(quota, clock.clone());
        KeyedLimit {
            rate,
            quota,
            clock,
            limiter: ArcSwap::from_pointee(limiter),
            last_prune: AtomicU64::new(0),
            max_keys,
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Take one event from `key`'s budget at `now`; false when the budget is spent (nothing
    /// is taken then).
    pub fn check(&self, key: &K, now: Instant) -> bool {
        let t = self.clock.set(now);
        self.housekeep(t);
        self.limiter.load().check_key(key).is_ok()
    }

    /// Keys held now.
    pub fn len(&self) -> usize {
        self.limiter.load().len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn housekeep(&self, t: u64) {
        let last = self.last_prune.load(Ordering::Acquire);
        let since = Duration::from_nanos(t.saturating_sub(last));
        let limiter = self.limiter.load();
        let due = since >= PRUNE_INTERVAL
            || (since >= FULL_PRUNE_INTERVAL && limiter.len() >= self.max_keys);
        // One caller prunes; the others go on with their check.
        if !due
            || self
                .last_prune
                .compare_exchange(last, t, Ordering::AcqRel, Ordering::Acquire)
                .is_err()
        {
            return;
        }
        limiter.retain_recent();
        limiter.shrink_to_fit();
        if limiter.len() >= self.max_keys {
            warn!(
                keys = limiter.len(),
                limit = %format_rate(self.rate),
                "rate limit table full of active keys; starting it over"
            );
            self.limiter.store(Arc::new(RateLimiter::hashmap_with_clock(
                self.quota,
                self.clock.clone(),
            )));
        }
    }
}

/// The `[rate_limits]` tables. They outlive a configuration: on reload each table whose rate
/// did not change is carried over, so a reload does not hand out fresh budgets.
#[derive(Debug, Clone, Default)]
pub struct Limiters {
    connections_per_ip: Option<Arc<KeyedLimit<ClientKey>>>,
    messages_per_ip: Option<Arc<KeyedLimit<ClientKey>>>,
    messages_per_user: Option<Arc<KeyedLimit<String>>>,
    recipients_per_ip: Option<Arc<KeyedLimit<ClientKey>>>,
}

/// The table for `rate`: `previous` when its rate is the same, else a fresh one.
fn table<K: Hash + Eq + Clone>(
    rate: Option<Rate>,
    previous: Option<&Arc<KeyedLimit<K>>>,
    origin: Instant,
) -> Option<Arc<KeyedLimit<K>>> {
    let rate = rate?;
    match previous {
        Some(p) if p.rate() == rate => Some(p.clone()),
        _ => Some(Arc::new(KeyedLimit::new(rate, origin))),
    }
}

fn take<K: Hash + Eq + Clone>(
    table: &Option<Arc<KeyedLimit<K>>>,
    rule: &'static str,
    key: &K,
    now: Instant,
) -> Result<(), Limited> {
    match table {
        Some(t) if !t.check(key, now) => Err(Limited {
            rule,
            limit: t.rate(),
        }),
        _ => Ok(()),
    }
}

impl Limiters {
    /// Tables for `config`, reusing those of `previous` whose rate is unchanged. `origin` is
    /// the clock origin of new tables (any instant not after the first check).
    pub fn new(config: &RateLimits, previous: Option<&Limiters>, origin: Instant) -> Limiters {
        Limiters {
            connections_per_ip: table(
                config.connections_per_ip,
                previous.and_then(|p| p.connections_per_ip.as_ref()),
                origin,
            ),
            messages_per_ip: table(
                config.messages_per_ip,
                previous.and_then(|p| p.messages_per_ip.as_ref()),
                origin,
            ),
            messages_per_user: table(
                config.messages_per_user,
                previous.and_then(|p| p.messages_per_user.as_ref()),
                origin,
            ),
            recipients_per_ip: table(
                config.recipients_per_ip,
                previous.and_then(|p| p.recipients_per_ip.as_ref()),
                origin,
            ),
        }
    }

    /// A new connection from `ip`.
    pub fn connection(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
        take(
            &self.connections_per_ip,
            CONNECTIONS_PER_IP,
            &ClientKey::new(ip),
            now,
        )
    }

    /// A new message (MAIL) from `ip`, by `user` when authenticated. The user's budget is
    /// checked first: a compromised account is stopped wherever it connects from.
    pub fn message(&self, ip: IpAddr, user: Option<&str>, now: Instant) -> Result<(), Limited> {
        if let Some(user) = user {
            take(
                &self.messages_per_user,
                MESSAGES_PER_USER,
                &user.to_string(),
                now,
            )?;
        }
        take(
            &self.messages_per_ip,
            MESSAGES_PER_IP,
            &ClientKey::new(ip),
            now,
        )
    }

    /// One more recipient (RCPT) from `ip`.
    pub fn recipient(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
        take(
            &self.recipients_per_ip,
            RECIPIENTS_PER_IP,
            &ClientKey::new(ip),
            now,
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    #[test]
    fn burst_then_one_per_period() {
        let t0 = Instant::now();
        let l = KeyedLimit::new(rate(3, 60), t0);
        let k = ClientKey::new(ip("192.0.2.1"));
        assert!(l.check(&k, t0));
        assert!(l.check(&k, t0));
        assert!(l.check(&k, t0));
        assert!(!l.check(&k, t0));
        assert!(!l.check(&k, t0 + Duration::from_secs(19)));
        // One event comes back every 60 s / 3 = 20 s.
        assert!(l.check(&k, t0 + Duration::from_secs(20)));
        assert!(!l.check(&k, t0 + Duration::from_secs(21)));
        // Another key has its own budget.
        assert!(l.check(&ClientKey::new(ip("192.0.2.2")), t0));
    }

    #[test]
    fn keys_map_ipv4_in_ipv6_and_group_ipv6_by_64() {
        assert_eq!(
            ClientKey::new(ip("::ffff:192.0.2.1")),
            ClientKey::new(ip("192.0.2.1"))
        );
        assert_eq!(
            ClientKey::new(ip("2001:db8:1:2::1")),
            ClientKey::new(ip("2001:db8:1:2:ffff::9"))
        );
        assert_ne!(
            ClientKey::new(ip("2001:db8:1:2::1")),
            ClientKey::new(ip("2001:db8:1:3::1"))
        );
        assert_eq!(
            ClientKey::new(ip("2001:db8:1:2::1")).to_string(),
            "2001:db8:1:2::/64"
        );
    }

    #[test]
    fn stale_keys_are_pruned_and_a_full_table_starts_over() {
        let t0 = Instant::now();
        let l: KeyedLimit<u32> = KeyedLimit::with_max_keys(rate(1, 1), t0, 10);
        for k in 0..5 {
            assert!(l.check(&k, t0));
        }
        assert_eq!(l.len(), 5);
        // After the prune interval the five are as good as new and dropped.
        assert!(l.check(&99, t0 + PRUNE_INTERVAL));
        assert_eq!(l.len(), 1);
        // Ten keys that stay live (one event an hour) fill a table; a check a second later
        // finds it still full after pruning and starts it over.
        let l: KeyedLimit<u32> = KeyedLimit::with_max_keys(rate(1, 3600), t0, 10);
        for k in 0..10 {
            assert!(l.check(&k, t0));
        }
        assert_eq!(l.len(), 10);
        assert!(!l.check(&3, t0));
        assert!(l.check(&3, t0 + FULL_PRUNE_INTERVAL));
        assert_eq!(l.len(), 1);
    }

    #[test]
    fn limiters_report_the_rule_and_carry_unchanged_tables_over() {
        let t0 = Instant::now();
        let config = RateLimits {
            connections_per_ip: Some(rate(1, 60)),
            messages_per_ip: Some(rate(2, 60)),
            messages_per_user: Some(rate(1, 3600)),
            recipients_per_ip: None,
        };
        let l = Limiters::new(&config, None, t0);
        let a = ip("192.0.2.1");
        assert!(l.connection(a, t0).is_ok());
        let c = l.connection(a, t0).unwrap_err();
        assert_eq!(c.rule, "rate_limits.connections_per_ip");
        assert_eq!((c.reply().code, c.reply().enhanced), (421, "4.7.0"));
        assert_eq!(c.limit_text(), "1/min");
        assert!(l.message(a, Some("alice"), t0).is_ok());
        // The user's budget is spent, from any address.
        let m = l
            .message(ip("198.51.100.7"), Some("alice"), t0)
            .unwrap_err();
        assert_eq!(m.rule, "rate_limits.messages_per_user");
        assert_eq!((m.reply().code, m.reply().enhanced), (451, "4.7.1"));
        assert!(l.message(a, None, t0).is_ok());
        let m = l.message(a, None, t0).unwrap_err();
        assert_eq!(m.rule, "rate_limits.messages_per_ip");
        // No recipient limit configured: never limited.
        for _ in 0..1000 {
            assert!(l.recipient(a, t0).is_ok());
        }

        // Reload: unchanged rates keep their state, a changed one starts afresh.
        let mut changed = config.clone();
        changed.messages_per_ip = Some(rate(3, 60));
        changed.recipients_per_ip = Some(rate(1, 60));
        let r = Limiters::new(&changed, Some(&l), t0);
        assert!(r.connection(a, t0).is_err());
        assert!(r.message(ip("198.51.100.7"), Some("alice"), t0).is_err());
        assert!(r.message(a, None, t0).is_ok());
        assert!(r.recipient(a, t0).is_ok());
        let rc = r.recipient(a, t0).unwrap_err();
        assert_eq!(rc.rule, "rate_limits.recipients_per_ip");
        // A limit removed on reload is gone.
        let none = Limiters::new(&RateLimits::default(), Some(&r), t0);
        assert!(none.connection(a, t0).is_ok());
    }
}
