//! The `[auth]` lockout and spraying records in the shared store: the rules of
//! [`crate::policy::lockout`], kept in Redis so a brute-forcer spreading its guesses over
//! several nodes gets `max_failures` in all, and is locked out of every node at once.
//!
//! Keys (each written with its expiry by the script that writes it, on Redis's clock):
//! - `portcullis:auth:lock:<client key>`: present while the client is locked out
//!   (`PX` = `[auth] lockout`).
//! - `portcullis:auth:client:<client key>`: a hash: `f` failures in the window, `r`
//!   verifications in flight (each counts as a failure until settled: `f + r` never exceeds
//!   `max_failures`), `k` logins counted separately and `l:<login>` the failures of each, at
//!   most [`MAX_LOGINS_PER_CLIENT`] (further logins' failures count for no login, so a
//!   success never clears them). It expires `failure_window` after it was created (a fixed
//!   window, as locally); reaching `max_failures` sets the lock and starts a new window.
//! - `portcullis:auth:login:<login>`: a hash: `f` failures of the login from any client in
//!   the window, `n` distinct clients and `c:<client key>` each of them, at most
//!   [`MAX_CLIENTS_PER_LOGIN`]; expires `failure_window` after its first failure.
//!
//! A node that dies during a verification leaves its reservation counted until the client's
//! window ends: a failure, as locally for an attempt dropped without a result.

use std::net::IpAddr;
use std::sync::LazyLock;

use super::{Cluster, Unavailable, key};
use crate::policy::limits::ClientKey;
use crate::policy::lockout::{
    FailureReport, MAX_CLIENTS_PER_LOGIN, MAX_LOGINS_PER_CLIENT, Settings, login_key,
};

/// KEYS: lock, client, login. ARGV: max_failures, failure_window (ms). Returns `{1, pttl}`
/// locked out; `{2}` busy; `{0, login failures, login clients}` reserved.
const BEGIN: &str = r"
local ttl = redis.call('PTTL', KEYS[1])
if ttl > 0 then return {1, ttl} end
local f = tonumber(redis.call('HGET', KEYS[2], 'f') or '0')
local r = tonumber(redis.call('HGET', KEYS[2], 'r') or '0')
if f + r >= tonumber(ARGV[1]) then return {2} end
redis.call('HINCRBY', KEYS[2], 'r', 1)
if redis.call('PTTL', KEYS[2]) < 0 then redis.call('PEXPIRE', KEYS[2], ARGV[2]) end
local lf = tonumber(redis.call('HGET', KEYS[3], 'f') or '0')
local n = tonumber(redis.call('HGET', KEYS[3], 'n') or '0')
return {0, lf, n}
";

/// KEYS: lock, client, login. ARGV: success (1/0), max_failures, failure_window (ms),
/// lockout (ms), login, client key, logins per client, clients per login. Returns
/// `{locked out with (failures, or 0), login failures, login clients}`.
const SETTLE: &str = r"
local r = tonumber(redis.call('HGET', KEYS[2], 'r') or '0')
if r > 0 then redis.call('HINCRBY', KEYS[2], 'r', -1) end
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
  local held = tonumber(redis.call('HGET', KEYS[2], 'r') or '0')
  redis.call('DEL', KEYS[2])
  if held > 0 then
    redis.call('HSET', KEYS[2], 'r', held)
    redis.call('PEXPIRE', KEYS[2], ARGV[3])
  end
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

/// KEYS: client. Gives one reservation back uncounted.
const RELEASE: &str = r"
local r = tonumber(redis.call('HGET', KEYS[1], 'r') or '0')
if r > 0 then redis.call('HINCRBY', KEYS[1], 'r', -1) end
return r
";

static BEGIN_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(BEGIN));
static SETTLE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(SETTLE));
static RELEASE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(RELEASE));

/// What the shared records say of an AUTH before its password is verified.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Begun {
    /// The client is locked out for this many more milliseconds: `454 4.7.0`.
    LockedOut { remaining_ms: u64 },
    /// The client's failure budget is held by verifications in flight (on any node).
    Busy,
    /// A failure is reserved; the login has this many failures in its window, from this
    /// many distinct clients (for [`crate::policy::lockout::spray_delay`]).
    Reserved { login_failures: u32, clients: u32 },
}

/// The keys of one (client, login) pair.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Keys {
    lock: String,
    client: String,
    login: String,
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
            lock: key(&["auth", "lock", &client_key]),
            client: key(&["auth", "client", &client_key]),
            login: key(&["auth", "login", &login_key]),
            client_key,
            login_key,
        }
    }

    /// The lock key of the client.
    pub fn lock(&self) -> &str {
        &self.lock
    }
}

fn millis(d: std::time::Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX).max(1)
}

fn count(n: i64) -> u32 {
    u32::try_from(n.max(0)).unwrap_or(u32::MAX)
}

/// Reserve a failure for an AUTH (see [`Begun`]).
///
/// # Errors
/// [`Unavailable`] when the store did not answer (nothing is known to be reserved).
pub async fn begin(cluster: &Cluster, keys: &Keys, s: Settings) -> Result<Begun, Unavailable> {
    let mut invocation = BEGIN_SCRIPT.key(&keys.lock);
    invocation
        .key(&keys.client)
        .key(&keys.login)
        .arg(s.max_failures)
        .arg(millis(s.failure_window));
    let answer: Vec<i64> = cluster.script(&invocation).await?;
    match answer.as_slice() {
        [1, ttl] => Ok(Begun::LockedOut {
            remaining_ms: u64::try_from(*ttl).unwrap_or(1),
        }),
        [2] => Ok(Begun::Busy),
        [0, failures, clients] => Ok(Begun::Reserved {
            login_failures: count(*failures),
            clients: count(*clients),
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
/// [`Unavailable`] when the store did not answer (the reservation then stays counted until
/// the client's window ends).
pub async fn settle(
    cluster: &Cluster,
    keys: &Keys,
    s: Settings,
    success: bool,
) -> Result<FailureReport, Unavailable> {
    let mut invocation = SETTLE_SCRIPT.key(&keys.lock);
    invocation
        .key(&keys.client)
        .key(&keys.login)
        .arg(u8::from(success))
        .arg(s.max_failures)
        .arg(millis(s.failure_window))
        .arg(millis(s.lockout))
        .arg(&keys.login_key)
        .arg(&keys.client_key)
        .arg(MAX_LOGINS_PER_CLIENT)
        .arg(MAX_CLIENTS_PER_LOGIN);
    let (locked, failures, clients): (i64, i64, i64) = cluster.script(&invocation).await?;
    let mut report = FailureReport::default();
    if success {
        return Ok(report);
    }
    if locked > 0 {
        report.locked_out = Some(count(locked));
    }
    // As locally: reported at the threshold and every further multiple of it.
    let (f, n) = (count(failures), count(clients));
    if n >= 2 && f >= s.max_failures && f.is_multiple_of(s.max_failures) {
        report.spraying = Some((f, n as usize));
    }
    Ok(report)
}

/// Give a reservation back uncounted (nothing was verified).
///
/// # Errors
/// [`Unavailable`] when the store did not answer.
pub async fn release(cluster: &Cluster, keys: &Keys) -> Result<(), Unavailable> {
    let invocation = RELEASE_SCRIPT.key(&keys.client);
    let _: i64 = cluster.script(&invocation).await?;
    Ok(())
}

/// How long the client `ip` stays locked out, in milliseconds (`None`: not locked out),
/// reading only.
///
/// # Errors
/// [`Unavailable`] when the store did not answer.
pub async fn locked_out(cluster: &Cluster, ip: IpAddr) -> Result<Option<u64>, Unavailable> {
    let lock = key(&["auth", "lock", &ClientKey::new(ip).to_string()]);
    let ttl: i64 = cluster.command(redis::cmd("PTTL").arg(&lock)).await?;
    Ok(u64::try_from(ttl).ok().filter(|&t| t > 0))
}
