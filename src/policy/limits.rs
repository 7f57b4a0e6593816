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
//! # What a flood cannot do to a table
//!
//! A limit must never fail open, and the tables must stay bounded however many distinct
//! clients an attacker has (IPv6 /64s are cheap). So:
//!
//! - **A budget in use is never forgotten.** Only a key whose budget is fully restored (its
//!   state says nothing a fresh key would not) is ever dropped: every [`PRUNE_INTERVAL`], and
//!   from a full level when a new key needs room (at most once per [`SWEEP_INTERVAL`](prefix::SWEEP_INTERVAL), a
//!   sweep being a scan of the level). No table is ever emptied, so a client that is being
//!   limited stays limited until its budget refills with time, however many others arrive.
//! - **New clients of a full table are counted under a coarser prefix.** When the table holds
//!   [`MAX_KEYS`] exact clients whose budgets are in use, a new client is counted under its
//!   IPv4 /24, then /16, then /8, then one key for all of IPv4 (IPv6: /48, /32, /16, then all
//!   of IPv6), the same prefixes as the AUTH lockout table ([`PREFIXES_V4`](prefix::PREFIXES_V4), [`PREFIXES_V6`](prefix::PREFIXES_V6)),
//!   with at most [`MAX_COARSE_KEYS`] keys per level (IPv4 and IPv6 together; the last level
//!   holds at most two keys). Every client in such a prefix shares its budget: under a flood,
//!   bystanders in an attacker's prefix are limited with it, and a flood that exhausts the
//!   prefixes reaches the family's single key, where newcomers of that family share one
//!   budget. Clients already counted keep their own budget. A client is always counted by
//!   the finest key that holds a budget for it, and a key is created only for a client that
//!   no key covers, so a client never moves to a fresh budget while its own is in use. This
//!   also holds after the flood: a prefix key counts every newcomer it covers until its
//!   budget is restored (at most `per` after its last event) and pruned, since the table
//!   cannot tell them from the clients it counted.
//! - **Logins** exist only after a successful AUTH, so their number is at most the users in
//!   the users file; the table is bounded anyway, at [`MAX_USERS`] logins (keys cut to
//!   [`MAX_LOGIN_KEY`](super::lockout::MAX_LOGIN_KEY) octets), beyond which new logins share
//!   one overflow budget, under the same rules.
//!
//! A table that starts counting new keys coarser logs a warning ("rate limit table full"),
//! and a pruning that finds room again logs it too: at most once per [`PRUNE_INTERVAL`] each,
//! never once per key.
//!
//! Memory: a client table holds at most `MAX_KEYS + 3 × MAX_COARSE_KEYS + 2` keys of 32
//! octets in hash tables: 11.3 MiB with every level full, 12.4 MiB at the peak of growing
//! there (measured with a counting allocator), and pruning gives it back once the flood's
//! budgets are restored. A login table holds at most `MAX_USERS + 1` logins: 3.1 MiB for
//! logins of 25 octets, 14.3 MiB for logins of `MAX_LOGIN_KEY` octets.

use std::fmt;
use std::hash::Hash;
use std::net::{IpAddr, Ipv6Addr};
use std::num::NonZeroU32;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use governor::clock::Clock;
use governor::middleware::NoOpMiddleware;
use governor::nanos::Nanos;
use governor::state::StateStore;
use governor::{Quota, RateLimiter};
use ipnet::IpNet;
use tracing::{info, warn};

use super::access::normalize;
use super::lockout::login_key;
use super::prefix::{self, LEVELS};
use super::store::RateKey;
use crate::config::units::format_rate;
use crate::config::{Rate, RateLimits};
use crate::smtp::{Reply, reply};

/// How often keys whose budgets are fully restored are dropped from a table.
pub const PRUNE_INTERVAL: Duration = Duration::from_secs(60);

/// Exact clients (IPv4 address, IPv6 /64) one table holds at most; beyond, new clients are
/// counted under a coarser prefix.
pub const MAX_KEYS: usize = 200_000;

/// Keys per coarser prefix level (IPv4 /24, /16, /8 with IPv6 /48, /32, /16) one table holds
/// at most; beyond, the next coarser level is used, down to one key per address family.
pub const MAX_COARSE_KEYS: usize = 20_000;

/// Logins one `messages_per_user` table holds at most; beyond, new logins share one budget.
pub const MAX_USERS: usize = 50_000;

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

/// How many keys a table holds at each level.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bounds {
    /// Exact keys (clients or logins).
    pub exact: usize,
    /// Keys per coarser level, the last level excepted: it has no bound, and holds one key
    /// per address family (clients) or the one overflow key (logins).
    pub coarse: usize,
}

/// A key of a [`KeyedLimit`], and the coarser keys that count it when the table is full.
pub trait TableKey: Hash + Eq + Clone {
    /// A key of the coarser levels.
    type Coarse: Hash + Eq + Clone;
    /// Coarser levels (at least one); the last one has no bound, so it must hold few keys.
    const COARSE_LEVELS: usize;
    /// The size of the relay's tables for this kind of key.
    const BOUNDS: Bounds;
    /// The key that counts `self` at coarser level `level`, from 1 (finest) to
    /// [`TableKey::COARSE_LEVELS`].
    fn coarse(&self, level: usize) -> Self::Coarse;
}

/// Clients: IPv4 /24, /16, /8, all; IPv6 /48, /32, /16, all ([`PREFIXES_V4`](prefix::PREFIXES_V4), [`PREFIXES_V6`](prefix::PREFIXES_V6)).
impl TableKey for ClientKey {
    type Coarse = IpNet;
    const COARSE_LEVELS: usize = LEVELS - 1;
    const BOUNDS: Bounds = Bounds {
        exact: MAX_KEYS,
        coarse: MAX_COARSE_KEYS,
    };

    fn coarse(&self, level: usize) -> IpNet {
        prefix::prefix(self.0, level)
    }
}

/// Logins: one overflow key shared by the logins that find the table full.
impl TableKey for String {
    type Coarse = ();
    const COARSE_LEVELS: usize = 1;
    const BOUNDS: Bounds = Bounds {
        exact: MAX_USERS,
        coarse: 0,
    };

    fn coarse(&self, _level: usize) {}
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

/// One of the `[rate_limits]` budgets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RateLimit {
    /// `connections_per_ip`, at connect: `421 4.7.0`.
    ConnectionsPerIp,
    /// `messages_per_ip`, at MAIL: `451 4.7.1`.
    MessagesPerIp,
    /// `messages_per_user`, at MAIL of an authenticated session: `451 4.7.1`.
    MessagesPerUser,
    /// `recipients_per_ip`, at RCPT: `451 4.7.1`.
    RecipientsPerIp,
}

impl RateLimit {
    /// The policy key, also the `rule=` of a refusal.
    pub fn rule(self) -> &'static str {
        match self {
            RateLimit::ConnectionsPerIp => CONNECTIONS_PER_IP,
            RateLimit::MessagesPerIp => MESSAGES_PER_IP,
            RateLimit::MessagesPerUser => MESSAGES_PER_USER,
            RateLimit::RecipientsPerIp => RECIPIENTS_PER_IP,
        }
    }
}

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

    /// Nanoseconds since `origin`: the latest time any caller passed in.
    fn nanos(&self) -> u64 {
        self.now.load(Ordering::Acquire)
    }
}

impl Clock for InputClock {
    type Instant = Duration;

    fn now(&self) -> Duration {
        Duration::from_nanos(self.nanos())
    }
}

/// One level of a table: GCRA theoretical arrival times (nanoseconds on the table's clock) by
/// key.
type Level<Q> = prefix::Level<Q, u64, u64>;

/// A theoretical arrival time not after `now` lets a full burst through, exactly as a key
/// never seen: such a key may be dropped.
fn in_use(tat: u64, now: u64) -> bool {
    tat > now
}

#[derive(Debug)]
struct Tables<K: TableKey> {
    exact: Level<K>,
    /// Levels 1 ..= `K::COARSE_LEVELS`, finest first.
    coarse: Vec<Level<K::Coarse>>,
    /// New keys are being counted at a coarser level (for logging the change once).
    coarsening: bool,
}

impl<K: TableKey> Tables<K> {
    fn new() -> Tables<K> {
        Tables {
            exact: Level::default(),
            coarse: (0..K::COARSE_LEVELS).map(|_| Level::default()).collect(),
            coarsening: false,
        }
    }

    fn len(&self) -> usize {
        self.exact.map.len() + self.coarse.iter().map(|l| l.map.len()).sum::<usize>()
    }

    fn get(&self, level: usize, key: &K) -> Option<u64> {
        match level {
            0 => self.exact.map.get(key).copied(),
            l => self.coarse[l - 1].map.get(&key.coarse(l)).copied(),
        }
    }

    fn insert(&mut self, level: usize, key: &K, tat: u64) {
        match level {
            0 => self.exact.map.insert(key.clone(), tat),
            l => self.coarse[l - 1].map.insert(key.coarse(l), tat),
        };
    }

    /// The level that counts `key` ([`prefix::home`]; the last level has no bound).
    fn home(&mut self, key: &K, now: u64, bounds: Bounds) -> usize {
        prefix::home(&mut KeyLevels {
            tables: self,
            key,
            bounds,
            now,
        })
    }

    /// The level that holds `key` already, making no room ([`prefix::held_at`]); `None`: no
    /// level counts it yet, so its budget is whole.
    fn held_at(&mut self, key: &K, now: u64, bounds: Bounds) -> Option<usize> {
        prefix::held_at(&KeyLevels {
            tables: self,
            key,
            bounds,
            now,
        })
    }

    /// Drop every restored budget; release memory a flood left behind.
    fn prune(&mut self, now: u64) {
        self.exact.map.retain(|_, &mut tat| in_use(tat, now));
        self.exact.map.shrink_to_fit();
        for level in &mut self.coarse {
            level.map.retain(|_, &mut tat| in_use(tat, now));
            level.map.shrink_to_fit();
        }
    }
}

/// A table's levels for one key, as [`prefix::home`] sees them.
struct KeyLevels<'t, K: TableKey> {
    tables: &'t mut Tables<K>,
    key: &'t K,
    bounds: Bounds,
    now: u64,
}

impl<K: TableKey> prefix::Levels for KeyLevels<'_, K> {
    fn levels(&self) -> usize {
        K::COARSE_LEVELS + 1
    }

    fn holds(&self, level: usize) -> bool {
        self.tables.get(level, self.key).is_some()
    }

    fn make_room(&mut self, level: usize) -> bool {
        let now = self.now;
        let keep = |&tat: &u64| in_use(tat, now);
        match level {
            0 => self.tables.exact.make_room(self.bounds.exact, now, keep),
            l => self.tables.coarse[l - 1].make_room(self.bounds.coarse, now, keep),
        }
    }
}

/// The budgets behind one [`KeyedLimit`]: it maps each key to the level that counts it, under
/// one lock, so the bounds hold exactly however many checks run at once.
struct Budgets<K: TableKey> {
    bounds: Bounds,
    clock: InputClock,
    /// The policy key, for the log.
    rule: &'static str,
    rate: Rate,
    tables: Mutex<Tables<K>>,
}

impl<K: TableKey> Budgets<K> {
    fn lock(&self) -> MutexGuard<'_, Tables<K>> {
        self.tables.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Run governor's decision `f` on `key`'s theoretical arrival time and, when `f` allows
    /// the event and `replace`, store the new time (`replace` false: a dry check, nothing
    /// taken).
    fn measure_and_replace<T, E>(
        &self,
        key: &K,
        replace: bool,
        f: impl Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    ) -> Result<T, E> {
        // The latest time any caller passed in: never earlier than the time governor reads
        // for this check, so a key swept as restored is restored for it too (or was restored
        // microseconds before, for a check racing one with a later time).
        let now = self.clock.nanos();
        let mut t = self.lock();
        if !replace {
            // A dry check reads: making room for a key no level holds yet would evict (and
            // spend the once-per-interval allowance) on behalf of a client that never came.
            let held = (t.held_at(key, now, self.bounds)).and_then(|level| t.get(level, key));
            return f(held.map(Nanos::new)).map(|(result, _)| result);
        }
        let level = t.home(key, now, self.bounds);
        let held = t.get(level, key);
        let outcome = f(held.map(Nanos::new));
        if let Ok((_, tat)) = &outcome {
            t.insert(level, key, tat.as_u64());
        }
        // Log when new keys start going to a coarser level, not for each of them.
        let new_coarse = level > 0 && held.is_none();
        let started_coarsening = new_coarse && !t.coarsening;
        t.coarsening |= new_coarse;
        let keys = t.len();
        drop(t);
        if started_coarsening {
            warn!(
                table = self.rule,
                limit = %format_rate(self.rate),
                keys,
                "rate limit table full of budgets in use; new clients are counted by prefix \
                 (new logins share one budget)"
            );
        }
        outcome.map(|(result, _)| result)
    }

    fn prune(&self, now: u64) {
        let mut t = self.lock();
        t.prune(now);
        let room_again = t.coarsening && t.exact.map.len() < self.bounds.exact;
        t.coarsening &= !room_again;
        let keys = t.len();
        drop(t);
        if room_again {
            info!(
                table = self.rule,
                limit = %format_rate(self.rate),
                keys,
                "rate limit table has room again; new clients are counted exactly"
            );
        }
    }
}

/// The [`StateStore`] a governor limiter reads and writes: a handle on the [`Budgets`] that
/// [`KeyedLimit`] also holds, for pruning. `dry`: the limiter only reads (see
/// [`KeyedLimit::available`]): governor's own decision, nothing taken.
struct SharedBudgets<K: TableKey> {
    budgets: Arc<Budgets<K>>,
    dry: bool,
}

impl<K: TableKey> StateStore for SharedBudgets<K> {
    type Key = K;

    fn measure_and_replace<T, F, E>(&self, key: &K, f: F) -> Result<T, E>
    where
        F: Fn(Option<Nanos>) -> Result<(T, Nanos), E>,
    {
        self.budgets.measure_and_replace(key, !self.dry, f)
    }
}

type Limiter<K> = RateLimiter<K, SharedBudgets<K>, InputClock, NoOpMiddleware<Duration>>;

/// One keyed limit: a rate and the budgets of every key seen recently (bounded as the module
/// docs say).
pub struct KeyedLimit<K: TableKey> {
    rate: Rate,
    store: Arc<Budgets<K>>,
    limiter: Limiter<K>,
    /// The same limit over the same budgets, reading only ([`KeyedLimit::available`]).
    dry_limiter: Limiter<K>,
    /// Clock reading (nanoseconds) of the last pruning.
    last_prune: AtomicU64,
}

impl<K: TableKey> fmt::Debug for KeyedLimit<K> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("KeyedLimit")
            .field("rule", &self.store.rule)
            .field("rate", &format_rate(self.rate))
            .field("keys", &self.len())
            .finish()
    }
}

impl<K: TableKey> KeyedLimit<K> {
    /// A fresh table for `rate` of the relay's size ([`TableKey::BOUNDS`]), its clock starting
    /// at `origin`.
    pub fn new(rate: Rate, origin: Instant) -> KeyedLimit<K> {
        Self::build(rate, origin, K::BOUNDS, "rate_limits")
    }

    fn build(rate: Rate, origin: Instant, bounds: Bounds, rule: &'static str) -> KeyedLimit<K> {
        let count = NonZeroU32::new(rate.count).unwrap_or(NonZeroU32::MIN);
        let period = (rate.per / count.get()).max(Duration::from_nanos(1));
        let quota = Quota::with_period(period)
            .expect("period is at least one nanosecond")
            .allow_burst(count);
        // The limiter takes its start from the clock, at 0 here: the theoretical arrival
        // times it stores are then readings of the same clock, which pruning compares them to.
        let clock = InputClock::new(origin);
        let store = Arc::new(Budgets {
            bounds,
            clock: clock.clone(),
            rule,
            rate,
            tables: Mutex::new(Tables::new()),
        });
        let shared = |dry| SharedBudgets {
            budgets: Arc::clone(&store),
            dry,
        };
        let limiter = RateLimiter::new(quota, shared(false), clock.clone());
        let dry_limiter = RateLimiter::new(quota, shared(true), clock);
        KeyedLimit {
            rate,
            store,
            limiter,
            dry_limiter,
            last_prune: AtomicU64::new(0),
        }
    }

    /// The configured rate.
    pub fn rate(&self) -> Rate {
        self.rate
    }

    /// Take one event from `key`'s budget at `now` (the budget of the prefix or overflow key
    /// that counts it when the table is full); false when the budget is spent (nothing is
    /// taken then).
    pub fn check(&self, key: &K, now: Instant) -> bool {
        let t = self.store.clock.set(now);
        self.housekeep(t);
        self.limiter.check_key(key).is_ok()
    }

    /// How many events `key`'s budget would let through at `now`, taking nothing: the
    /// largest `n` (at most the rate's count) that governor's own check of `n` events at once
    /// allows, so the next `n` calls of [`KeyedLimit::check`] at `now` succeed and the one
    /// after fails (unless time passes). 0: the next check fails.
    pub fn available(&self, key: &K, now: Instant) -> u32 {
        let t = self.store.clock.set(now);
        self.housekeep(t);
        let fits = |n: u32| {
            NonZeroU32::new(n)
                .is_none_or(|n| matches!(self.dry_limiter.check_key_n(key, n), Ok(Ok(()))))
        };
        // `fits` is monotone: binary search for the largest n that fits.
        let (mut low, mut high) = (0, self.rate.count.max(1));
        while low < high {
            let mid = low + (high - low).div_ceil(2);
            if fits(mid) {
                low = mid;
            } else {
                high = mid - 1;
            }
        }
        low
    }

    /// Keys held now, at every level.
    pub fn len(&self) -> usize {
        self.store.lock().len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn housekeep(&self, t: u64) {
        let last = self.last_prune.load(Ordering::Acquire);
        // One caller prunes; the others go on with their check.
        if Duration::from_nanos(t.saturating_sub(last)) >= PRUNE_INTERVAL
            && self
                .last_prune
                .compare_exchange(last, t, Ordering::AcqRel, Ordering::Acquire)
                .is_ok()
        {
            self.store.prune(t);
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
fn table<K: TableKey>(
    rate: Option<Rate>,
    previous: Option<&Arc<KeyedLimit<K>>>,
    origin: Instant,
    rule: &'static str,
) -> Option<Arc<KeyedLimit<K>>> {
    let rate = rate?;
    match previous {
        Some(p) if p.rate() == rate => Some(p.clone()),
        _ => Some(Arc::new(KeyedLimit::build(rate, origin, K::BOUNDS, rule))),
    }
}

fn take<K: TableKey>(
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
                CONNECTIONS_PER_IP,
            ),
            messages_per_ip: table(
                config.messages_per_ip,
                previous.and_then(|p| p.messages_per_ip.as_ref()),
                origin,
                MESSAGES_PER_IP,
            ),
            messages_per_user: table(
                config.messages_per_user,
                previous.and_then(|p| p.messages_per_user.as_ref()),
                origin,
                MESSAGES_PER_USER,
            ),
            recipients_per_ip: table(
                config.recipients_per_ip,
                previous.and_then(|p| p.recipients_per_ip.as_ref()),
                origin,
                RECIPIENTS_PER_IP,
            ),
        }
    }

    /// Take one event from the `limit` budget of `key` at `now` (see
    /// [`super::store::Store::take`]). A login's budget is keyed by
    /// [`login_key`]; a key of the wrong kind for `limit` is not counted.
    ///
    /// # Errors
    /// [`Limited`] when the budget is spent.
    pub fn take(&self, limit: RateLimit, key: &RateKey, now: Instant) -> Result<(), Limited> {
        let rule = limit.rule();
        match self.keyed(limit, key) {
            Some(Keyed::Client(table, key)) => take(table, rule, &key, now),
            Some(Keyed::Login(table, key)) => take(table, rule, &key, now),
            None => Ok(()),
        }
    }

    /// What `limit`'s budget of `key` would let through at `now`, taking nothing (see
    /// [`KeyedLimit::available`]) and its configured rate; `None` when the limit is not
    /// configured or `key` is of the wrong kind for it (never limited, as in
    /// [`Limiters::take`]).
    pub fn available(&self, limit: RateLimit, key: &RateKey, now: Instant) -> Option<(u32, Rate)> {
        match self.keyed(limit, key)? {
            Keyed::Client(Some(table), key) => Some((table.available(&key, now), table.rate())),
            Keyed::Login(Some(table), key) => Some((table.available(&key, now), table.rate())),
            _ => None,
        }
    }

    /// The configured rate of `limit`; `None`: not configured (never limited).
    pub fn rate(&self, limit: RateLimit) -> Option<Rate> {
        match limit {
            RateLimit::ConnectionsPerIp => self.connections_per_ip.as_ref().map(|t| t.rate()),
            RateLimit::MessagesPerIp => self.messages_per_ip.as_ref().map(|t| t.rate()),
            RateLimit::MessagesPerUser => self.messages_per_user.as_ref().map(|t| t.rate()),
            RateLimit::RecipientsPerIp => self.recipients_per_ip.as_ref().map(|t| t.rate()),
        }
    }

    /// The table of `limit` and the key it counts `key` by; `None` for a key of the wrong
    /// kind. A login's budget is keyed by [`login_key`].
    fn keyed(&self, limit: RateLimit, key: &RateKey) -> Option<Keyed<'_>> {
        let clients = match limit {
            RateLimit::ConnectionsPerIp => &self.connections_per_ip,
            RateLimit::MessagesPerIp => &self.messages_per_ip,
            RateLimit::RecipientsPerIp => &self.recipients_per_ip,
            RateLimit::MessagesPerUser => {
                return match key {
                    RateKey::Login(user) => Some(Keyed::Login(
                        &self.messages_per_user,
                        login_key(user).to_string(),
                    )),
                    RateKey::Client(_) => None,
                };
            }
        };
        match key {
            RateKey::Client(ip) => Some(Keyed::Client(clients, ClientKey::new(*ip))),
            RateKey::Login(_) => None,
        }
    }
}

/// A table of [`Limiters`] and the key one budget is counted by there.
enum Keyed<'a> {
    Client(&'a Option<Arc<KeyedLimit<ClientKey>>>, ClientKey),
    Login(&'a Option<Arc<KeyedLimit<String>>>, String),
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;

    use super::super::lockout::MAX_LOGIN_KEY;

    use super::*;

    /// The checks of each stage, as the MAIL stage orders them (user before client).
    impl Limiters {
        fn connection(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
            self.take(RateLimit::ConnectionsPerIp, &RateKey::Client(ip), now)
        }

        fn message(&self, ip: IpAddr, user: Option<&str>, now: Instant) -> Result<(), Limited> {
            if let Some(user) = user {
                let login = RateKey::Login(user.to_string());
                self.take(RateLimit::MessagesPerUser, &login, now)?;
            }
            self.take(RateLimit::MessagesPerIp, &RateKey::Client(ip), now)
        }

        fn recipient(&self, ip: IpAddr, now: Instant) -> Result<(), Limited> {
            self.take(RateLimit::RecipientsPerIp, &RateKey::Client(ip), now)
        }
    }

    fn rate(count: u32, secs: u64) -> Rate {
        Rate {
            count,
            per: Duration::from_secs(secs),
        }
    }

    fn ip(s: &str) -> IpAddr {
        s.parse().unwrap()
    }

    fn client(s: &str) -> ClientKey {
        ClientKey::new(ip(s))
    }

    /// A client table with `exact` exact keys and `coarse` keys per coarser level.
    fn small(r: Rate, t0: Instant, exact: usize, coarse: usize) -> KeyedLimit<ClientKey> {
        KeyedLimit::build(r, t0, Bounds { exact, coarse }, "test")
    }

    /// Keys held at each level, exact first.
    fn levels<K: TableKey>(l: &KeyedLimit<K>) -> Vec<usize> {
        let t = l.store.lock();
        std::iter::once(t.exact.map.len())
            .chain(t.coarse.iter().map(|l| l.map.len()))
            .collect()
    }

    /// Spend `key`'s whole budget at `now`: every check passes until one is refused.
    fn exhaust<K: TableKey>(l: &KeyedLimit<K>, key: &K, now: Instant) {
        let mut taken = 0;
        while l.check(key, now) {
            taken += 1;
            assert!(taken <= 1_000_000, "the budget never ran out");
        }
    }

    #[test]
    fn a_dry_read_of_a_full_table_makes_no_room_and_takes_nothing() {
        let t0 = Instant::now();
        let l = small(rate(10, 3600), t0, 2, 1);
        assert!(l.check(&client("192.0.2.1"), t0));
        assert!(l.check(&client("192.0.2.2"), t0));
        // The exact table is full of budgets in use: a real check of a stranger would look
        // for room; a dry read must not.
        let later = t0 + Duration::from_secs(1);
        let before = levels(&l);
        assert_eq!(before[0], 2);
        assert_eq!(l.available(&client("198.51.100.7"), later), 10);
        assert_eq!(levels(&l), before, "a dry read made room");
        assert_eq!(l.available(&client("192.0.2.1"), later), 9);
        assert_eq!(
            l.available(&client("192.0.2.1"), later),
            9,
            "a dry read took one"
        );
        assert_eq!(levels(&l), before);
    }

    #[test]
    fn burst_then_one_per_period() {
        let t0 = Instant::now();
        let l = KeyedLimit::new(rate(3, 60), t0);
        let k = client("192.0.2.1");
        assert!(l.check(&k, t0));
        assert!(l.check(&k, t0));
        assert!(l.check(&k, t0));
        assert!(!l.check(&k, t0));
        assert!(!l.check(&k, t0 + Duration::from_secs(19)));
        // One event comes back every 60 s / 3 = 20 s.
        assert!(l.check(&k, t0 + Duration::from_secs(20)));
        assert!(!l.check(&k, t0 + Duration::from_secs(21)));
        // Another key has its own budget.
        assert!(l.check(&client("192.0.2.2"), t0));
    }

    #[test]
    fn keys_map_ipv4_in_ipv6_and_group_ipv6_by_64() {
        assert_eq!(client("::ffff:192.0.2.1"), client("192.0.2.1"));
        assert_eq!(client("2001:db8:1:2::1"), client("2001:db8:1:2:ffff::9"));
        assert_ne!(client("2001:db8:1:2::1"), client("2001:db8:1:3::1"));
        assert_eq!(client("2001:db8:1:2::1").to_string(), "2001:db8:1:2::/64");
        assert_eq!(
            client("192.0.2.77").coarse(1),
            "192.0.2.0/24".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            client("2001:db8:1:2::1").coarse(2),
            "2001:db8::/32".parse::<IpNet>().unwrap()
        );
        assert_eq!(
            client("2001:db8:1:2::1").coarse(ClientKey::COARSE_LEVELS),
            "::/0".parse::<IpNet>().unwrap()
        );
    }

    #[test]
    fn only_restored_budgets_are_pruned() {
        let t0 = Instant::now();
        let l = small(rate(1, 1), t0, 10, 4);
        for k in 0..5u32 {
            assert!(l.check(&ClientKey(IpAddr::from(Ipv4Addr::from(k))), t0));
        }
        assert_eq!(l.len(), 5);
        // After the prune interval the five are as good as new and dropped.
        assert!(l.check(&client("192.0.2.99"), t0 + PRUNE_INTERVAL));
        assert_eq!(l.len(), 1);
        // Budgets still in use (one event an hour) are kept by every pruning.
        let l = small(rate(1, 3600), t0, 10, 4);
        for k in 0..10u32 {
            assert!(l.check(&ClientKey(IpAddr::from(Ipv4Addr::from(k))), t0));
        }
        let later = t0 + PRUNE_INTERVAL * 59;
        assert!(!l.check(&ClientKey(IpAddr::from(Ipv4Addr::from(3))), later));
        assert_eq!(levels(&l), [10, 0, 0, 0, 0]);
        // At the hour they are restored, and the next pruning drops them.
        assert!(l.check(&client("192.0.2.1"), t0 + Duration::from_secs(3600)));
        assert_eq!(levels(&l), [1, 0, 0, 0, 0]);
    }

    #[test]
    fn flooding_the_rate_table_never_restores_a_limited_clients_budget() {
        // 10 an hour: one event back every 6 minutes. A table of 8 exact clients and 4 keys
        // per coarser level, flooded by 50,000 distinct addresses over 250 s.
        let t0 = Instant::now();
        let l = small(rate(10, 3600), t0, 8, 4);
        let spammer = client("192.0.2.1");
        exhaust(&l, &spammer, t0);
        let step = Duration::from_millis(5);
        let mut now = t0;
        for i in 0..50_000u32 {
            now = t0 + step * i;
            l.check(
                &ClientKey(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i))),
                now,
            );
            if i % 997 == 0 {
                assert!(!l.check(&spammer, now), "the flood restored its budget");
            }
            assert!(l.len() <= 8 + 3 * 4 + 2, "{:?}", levels(&l));
        }
        assert!(!l.check(&spammer, now), "the flood restored its budget");
        // The flood filled the exact table, four /24s (10.0.0-3.0/24), then went on in its
        // /16, which its own burst spent: bystanders in that /16 share its budget ...
        assert_eq!(levels(&l), [8, 4, 1, 0, 0]);
        assert!(!l.check(&client("10.0.250.1"), now));
        // ... and those elsewhere get their own prefix's budget.
        assert!(l.check(&client("198.51.100.7"), now));
        assert_eq!(levels(&l), [8, 4, 2, 0, 0]);
        // The spammer's budget comes back with time only: one event after 6 minutes.
        let refill = t0 + Duration::from_secs(360);
        assert!(!l.check(&spammer, refill - Duration::from_millis(1)));
        assert!(l.check(&spammer, refill));
        assert!(!l.check(&spammer, refill));
    }

    #[test]
    fn restored_budgets_make_room_for_exact_keys_again() {
        let t0 = Instant::now();
        // 1 a second: a client's budget is restored a second after its event.
        let l = small(rate(1, 1), t0, 4, 2);
        let limited = client("192.0.2.1");
        exhaust(&l, &limited, t0);
        for i in 1..=3u32 {
            assert!(l.check(
                &ClientKey(IpAddr::from(Ipv4Addr::from(0x0a00_0000 + i))),
                t0
            ));
        }
        // Full: a newcomer is counted by its /24 and spends that.
        assert!(l.check(&client("198.51.100.1"), t0));
        assert!(!l.check(&client("198.51.100.2"), t0));
        assert_eq!(levels(&l), [4, 1, 0, 0, 0]);
        // A second later every budget is restored: a sweep of the full level makes room.
        let t1 = t0 + prefix::SWEEP_INTERVAL;
        assert!(l.check(&client("203.0.113.5"), t1));
        assert_eq!(levels(&l), [1, 1, 0, 0, 0]);
        // The /24 key is restored too but not yet pruned: its clients keep using it until it
        // is, which costs them nothing (a restored budget is a full one).
        assert!(l.check(&client("198.51.100.2"), t1));
    }

    #[test]
    fn an_ipv6_flood_is_counted_by_its_own_prefixes() {
        let t0 = Instant::now();
        let l = small(rate(5, 3600), t0, 8, 4);
        // A limited client, and one with a budget in use.
        let limited = client("3fff:1:2:3::1");
        exhaust(&l, &limited, t0);
        let regular = client("3fff:2:0:1::1");
        assert!(l.check(&regular, t0));
        // An attacker with 2001:db8::/32 takes a fresh /48 and /64 for every connection.
        for i in 0..20_000u32 {
            let a = IpAddr::from(Ipv6Addr::new(0x2001, 0xdb8, i as u16, i as u16, 0, 0, 0, 1));
            l.check(&ClientKey::new(a), t0 + Duration::from_millis(u64::from(i)));
            assert!(l.len() <= 8 + 3 * 4 + 2, "{:?}", levels(&l));
        }
        let now = t0 + Duration::from_secs(20);
        // Exact table full (2 clients and 6 of the flood's /64s), four of its /48s, then its
        // whole /32, whose budget it spent at once.
        assert_eq!(levels(&l), [8, 4, 1, 0, 0]);
        assert!(!l.check(&client("2001:db8:ffff:1::1"), now));
        assert!(!l.check(&limited, now), "the flood restored a budget");
        // The client counted before the flood keeps its own budget (4 of 5 left).
        for _ in 0..4 {
            assert!(l.check(&regular, now));
        }
        assert!(!l.check(&regular, now));
        // A newcomer from another /32 is counted by that /32, an IPv4 one by its /16 (the
        // /24-/48 level is full of the flood's /48s).
        assert!(l.check(&client("3fff:3::1"), now));
        assert!(l.check(&client("192.0.2.1"), now));
        assert_eq!(levels(&l), [8, 4, 3, 0, 0]);
        // The limited client gets one event back after 12 minutes, not before.
        let refill = t0 + Duration::from_secs(720);
        assert!(!l.check(&limited, refill - Duration::from_millis(1)));
        assert!(l.check(&limited, refill));
    }

    #[test]
    fn a_flood_past_every_prefix_level_shares_one_budget_per_family() {
        let t0 = Instant::now();
        let l = small(rate(3, 3600), t0, 2, 2);
        let limited = client("192.0.2.1");
        exhaust(&l, &limited, t0);
        // Every connection from another IPv6 /16.
        for i in 0..1000u32 {
            let a = IpAddr::from(Ipv6Addr::new(0x2000 + i as u16, 1, 2, 3, 0, 0, 0, 1));
            l.check(&ClientKey::new(a), t0);
        }
        // 2 exact, 2 per coarser level, then the one key of all of IPv6, spent at once.
        assert_eq!(levels(&l), [2, 2, 2, 2, 1]);
        assert!(!l.check(&client("3fff::1"), t0));
        assert!(!l.check(&limited, t0));
        // IPv4 newcomers share the IPv4 key instead: the IPv6 flood does not spend it.
        assert!(l.check(&client("198.51.100.1"), t0));
        assert!(l.check(&client("203.0.113.1"), t0));
        assert_eq!(levels(&l), [2, 2, 2, 2, 2]);
    }

    #[test]
    fn logins_beyond_the_table_share_one_overflow_budget_and_never_reset_a_limited_one() {
        let t0 = Instant::now();
        let l: KeyedLimit<String> = KeyedLimit::build(
            rate(2, 3600),
            t0,
            Bounds {
                exact: 4,
                coarse: 0,
            },
            "test",
        );
        let alice = "alice".to_string();
        exhaust(&l, &alice, t0);
        for i in 0..1000 {
            l.check(&format!("user{i}"), t0 + Duration::from_millis(i));
            assert!(l.len() <= 5, "{:?}", levels(&l));
        }
        let now = t0 + Duration::from_secs(1);
        assert!(!l.check(&alice, now), "new logins restored a budget");
        assert_eq!(levels(&l), [4, 1]);
        // Users seen before the table filled keep their own budgets ...
        assert!(l.check(&"user0".to_string(), now));
        // ... those after it share the overflow budget, which the others spent.
        assert!(!l.check(&"user999".to_string(), now));
        assert!(!l.check(&"newcomer".to_string(), now));
        // Alice gets one message back after half an hour.
        let refill = t0 + Duration::from_secs(1800);
        assert!(!l.check(&alice, refill - Duration::from_millis(1)));
        assert!(l.check(&alice, refill));
    }

    #[test]
    fn tables_of_the_relay_stay_within_their_bounds() {
        let t0 = Instant::now();
        let l: KeyedLimit<ClientKey> = KeyedLimit::new(rate(1, 3600), t0);
        // A distinct /24 (and so a distinct /16 every 256) per connection.
        for i in 0..(MAX_KEYS + 2 * MAX_COARSE_KEYS + 10) as u32 {
            l.check(&ClientKey(IpAddr::from(Ipv4Addr::from(i << 8))), t0);
        }
        let held = levels(&l);
        assert_eq!(held[0], MAX_KEYS);
        assert_eq!(held[1], MAX_COARSE_KEYS);
        assert!(held[2] <= MAX_COARSE_KEYS && held[3] <= 256 && held[4] <= 2);
        // Logins: long ones are cut to one key, and the table has its own bound.
        let l = Limiters::new(
            &RateLimits {
                messages_per_user: Some(rate(2, 3600)),
                ..RateLimits::default()
            },
            None,
            t0,
        );
        let long = "x".repeat(MAX_LOGIN_KEY);
        let a = ip("192.0.2.1");
        assert!(l.message(a, Some(&format!("{long}1")), t0).is_ok());
        assert!(l.message(a, Some(&format!("{long}2")), t0).is_ok());
        assert!(l.message(a, Some(&format!("{long}3")), t0).is_err());
        let users = l.messages_per_user.as_ref().unwrap();
        assert_eq!(users.len(), 1);
        assert_eq!(String::BOUNDS.exact, MAX_USERS);
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
