//! The `[auth]` lockout and spraying records in the shared store: the rules of
//! [`crate::policy::lockout`], kept in Redis so a brute-forcer spreading its guesses over
//! several nodes gets `max_failures` in all, and is locked out of every node at once.
//!
//! Keys (each written with its expiry by the script that writes it, on Redis's clock):
//! - `portcullis:auth:lock:<client key>`: present while the client is locked out
//!   (`PX` = `[auth] lockout`).
//! - `portcullis:auth:client:<client key>`: a hash: `f` failures in the window, `k` logins
//!   counted separately and `l:<login>` the failures of each, at most
//!   [`MAX_LOGINS_PER_CLIENT`] (further logins' failures count for no login, so a success
//!   never clears them). It expires `failure_window` after its first failure (a fixed window,
//!   as locally); reaching `max_failures` sets the lock and starts a new window.
//! - `portcullis:auth:inflight:<client key>`: a sorted set of the verifications in flight,
//!   each a reservation id scored by the time (Redis's, in ms) it lapses. Each counts as a
//!   failure until settled or released: failures plus reservations never exceed
//!   `max_failures`.
//! - `portcullis:auth:login:<login>`: a hash: `f` failures of the login from any client in
//!   the window, `n` distinct clients and `c:<client key>` each of them, at most
//!   [`MAX_CLIENTS_PER_LOGIN`]; expires `failure_window` after its first failure.
//!
//! A reservation its node never settles (the node died, or the store did not answer the
//! settle) lapses after the hold given to [`begin`] ([`RESERVATION_HOLD`] for the relay), so a
//! lost one never keeps a client out of AUTH for the rest of its window.

use std::net::IpAddr;
use std::sync::LazyLock;

use super::{Cluster, Unavailable, key};
use crate::policy::limits::ClientKey;
use crate::policy::lockout::{
    FailureReport, MAX_CLIENTS_PER_LOGIN, MAX_LOGINS_PER_CLIENT, Settings, login_key, spraying,
};

/// How long a reservation counts at most when its node never settles it: above the longest
/// a verification can take (twice the driver's AUTH wait, plus the longest spraying delay).
pub const RESERVATION_HOLD: std::time::Duration = std::time::Duration::from_secs(60);

/// KEYS: lock, client, login, in flight. ARGV: max_failures, reservation id, hold (ms).
/// Returns `{1}` locked out; `{2}` busy; `{0, login failures}` reserved.
const BEGIN: &str = r"
if redis.call('PTTL', KEYS[1]) > 0 then return {1} end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[4], '-inf', now)
local f = tonumber(redis.call('HGET', KEYS[2], 'f') or '0')
local max = tonumber(ARGV[1])
if f >= max then return {1} end
if f + redis.call('ZCARD', KEYS[4]) >= max then return {2} end
redis.call('ZADD', KEYS[4], now + tonumber(ARGV[3]), ARGV[2])
redis.call('PEXPIRE', KEYS[4], ARGV[3])
return {0, tonumber(redis.call('HGET', KEYS[3], 'f') or '0')}
";

/// KEYS: lock, client, login, in flight. ARGV: success (1/0), max_failures, failure_window
/// (ms), lockout (ms), login, client key, logins per client, clients per login, reservation
/// id. Returns `{locked out with (failures, or 0), login failures, login clients}`.
const SETTLE: &str = r"
redis.call('ZREM', KEYS[4], ARGV[9])
local field = 'l:' .. ARGV[5]
if ARGV[1] == '1' then
  local n = tonumber(redis.call('HGET', KEYS[2], field) or '0')
  if n > 0 then
    redis.call('HDEL', KEYS[2], field)
    redis.call('HINCRBY', KEYS[2], 'k', -1)
    local f = tonumber(redis.call('HGET', KEYS[2], 'f') or '0')
    redis.call('HSET', KEYS[2], 'f', math.max(f - n, 0))
  end
  return {0, 0, 0}
end
local f = redis.call('HINCRBY', KEYS[2], 'f', 1)
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[3]) end
if redis.call('HEXISTS', KEYS[2], field) == 1 then
  redis.call('HINCRBY', KEYS[2], field, 1)
elseif tonumber(redis.call('HGET', KEYS[2], 'k') or '0') < tonumber(ARGV[7]) then
  redis.call('HSET', KEYS[2], field, 1)
  redis.call('HINCRBY', KEYS[2], 'k', 1)
end
local locked = 0
if f >= tonumber(ARGV[2]) then
  locked = f
  redis.call('SET', KEYS[1], '1', 'PX', ARGV[4])
  redis.call('DEL', KEYS[2])
end
local lf = redis.call('HINCRBY', KEYS[3], 'f', 1)
if redis.call('PTTL', KEYS[3]) < 0 then redis.call('PEXPIRE', KEYS[3], ARGV[3]) end
local client = 'c:' .. ARGV[6]
if redis.call('HEXISTS', KEYS[3], client) == 0
    and tonumber(redis.call('HGET', KEYS[3], 'n') or '0') < tonumber(ARGV[8]) then
  redis.call('HSET', KEYS[3], client, 1)
  redis.call('HINCRBY', KEYS[3], 'n', 1)
end
local n = tonumber(redis.call('HGET', KEYS[3], 'n') or '0')
return {locked, lf, n}
";

/// KEYS: in flight. ARGV: reservation id. Gives the reservation back uncounted.
const RELEASE: &str = r"
return redis.call('ZREM', KEYS[1], ARGV[1])
";

static BEGIN_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(BEGIN));
static SETTLE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SETTLE));
static RELEASE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE));

/// What the shared records say of an AUTH before its password is verified.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Begun {
    /// The client is locked out (on any node): `454 4.7.0`.
    LockedOut,
    /// The client's failure budget is held by verifications in flight (on any node).
    Busy,
    /// A failure is reserved under `id` (settle or release it by that id); the login has
    /// this many failures in its window (for [`crate::policy::lockout::spray_delay`]).
    Reserved { login_failures: u32, id: String },
}

/// The keys of one (client, login) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    lock: String,
    client: String,
    login: String,
    in_flight: String,
    client_key: String,
    login_key: String,
}

impl Keys {
    /// The keys for an AUTH as `login` from `ip` (counted by its [`ClientKey`], the login by
    /// its [`login_key`]).
    pub fn new(ip: IpAddr, login: &str) -> Keys {
        let client_key = ClientKey::new(ip).to_string();
        let login_key = login_key(login).to_string();
        Keys {
            lock: lock_key(&client_key),
            in_flight: key(&["auth", "inflight", &client_key]),
            client: key(&["auth", "client", &client_key]),
            login: key(&["auth", "login", &login_key]),
            client_key,
            login_key,
        }
    }
}

/// The lock key of a client (by its [`ClientKey`] text).
fn lock_key(client_key: &str) -> String {
    key(&["auth", "lock", client_key])
}

/// A reservation id no other attempt on any node uses: this node, this process, a counter.
fn reservation_id(cluster: &Cluster) -> String {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    static START: LazyLock<u128> = LazyLock::new(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    });
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    format!("{}:{}:{}:{n}", cluster.node(), std::process::id(), *START)
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Reserve a failure for an AUTH (see [`Begun`]), counted until settled or released, or
/// for `hold` at most.
///
/// # Errors
/// [`Unavailable`] when the store did not answer (a reservation it may have made lapses
/// after `hold`).
pub async fn begin(
    cluster: &Cluster,
    keys: &Keys,
    s: Settings,
    hold: std::time::Duration,
) -> Result<Begun, Unavailable> {
    let id = reservation_id(cluster);
    let mut invocation = BEGIN_SCRIPT.key(&keys.lock);
    invocation
        .key(&keys.client)
        .key(&keys.login)
        .key(&keys.in_flight)
        .arg(s.max_failures)
        .arg(&id)
        .arg(millis(hold));
    let answer: Vec<i64> = cluster.script(&invocation).await?;
    match answer.as_slice() {
        [1] => Ok(Begun::LockedOut),
        [2] => Ok(Begun::Busy),
        [0, failures] => Ok(Begun::Reserved {
            login_failures: count(*failures),
            id,
        }),
        other => Err(Unavailable::Redis(format!(
            "unexpected answer of the AUTH gate script: {other:?}"
        ))),
    }
}

/// Record the result of a reserved AUTH: a success clears this login's failures of the
/// client; a failure counts for the client (locking it out at `max_failures`) and the login.
///
/// # Errors
/// [`Unavailable`] when the store did not answer (the reservation `id` then lapses after its
/// hold, uncounted).
pub async fn settle(
    cluster: &Cluster,
    keys: &Keys,
    id: &str,
    s: Settings,
    success: bool,
) -> Result<FailureReport, Unavailable> {
    let mut invocation = SETTLE_SCRIPT.key(&keys.lock);
    invocation
        .key(&keys.client)
        .key(&keys.login)
        .key(&keys.in_flight)
        .arg(u8::from(success))
        .arg(s.max_failures)
        .arg(millis(s.failure_window))
        .arg(millis(s.lockout))
        .arg(&keys.login_key)
        .arg(&keys.client_key)
        .arg(MAX_LOGINS_PER_CLIENT)
        .arg(MAX_CLIENTS_PER_LOGIN)
        .arg(id);
    let (locked, failures, clients): (i64, i64, i64) = cluster.script(&invocation).await?;
    let mut report = FailureReport::default();
    if success {
        return Ok(report);
    }
    if locked > 0 {
        report.locked_out = Some(count(locked));
    }
    report.spraying = spraying(count(failures), count(clients) as usize, s.max_failures);
    Ok(report)
}

/// Give the reservation `id` back uncounted (nothing was verified).
///
/// # Errors
/// [`Unavailable`] when the store did not answer (the reservation lapses after its hold).
pub async fn release(cluster: &Cluster, keys: &Keys, id: &str) -> Result<(), Unavailable> {
    let mut invocation = RELEASE_SCRIPT.key(&keys.in_flight);
    invocation.arg(id);
    let _: i64 = cluster.script(&invocation).await?;
    Ok(())
}

/// How long the client `ip` stays locked out, in milliseconds (`None`: not locked out),
/// reading only.
///
/// # Errors
/// [`Unavailable`] when the store did not answer.
pub async fn locked_out(cluster: &Cluster, ip: IpAddr) -> Result<Option<u64>, Unavailable> {
    let lock = lock_key(&ClientKey::new(ip).to_string());
    let ttl: i64 = cluster.command(redis::cmd("PTTL").arg(&lock)).await?;
    Ok(u64::try_from(ttl).ok().filter(|&t| t > 0))
}
