//! `[rate_limits]` budgets in the shared store: the same GCRA as the local tables
//! ([`crate::policy::limits`]: a rate `N/per` allows a burst of `N`, then one event every
//! `per / N`), decided by one Lua script on Redis's clock, so a client spreading its
//! messages over several nodes gets `N` in all, not `N` per node.
//!
//! One key per budget in use, `portcullis:rate:<rule>:<client key or login>` (the rule
//! without its `rate_limits.` prefix; the client key as [`ClientKey`] shows it: an IPv4
//! address or an IPv6 `/64`; a login cut to [`login_key`]), holding the theoretical arrival
//! time (TAT) in microseconds of Redis's `TIME`. An allowed event writes the new TAT with a
//! `PX` of the time until the budget is whole again, so a key vanishes exactly when it would
//! say nothing a missing key does not; a refused event writes nothing. Resolution: one
//! microsecond (`per / N` is rounded down to whole microseconds, at least one).

use std::sync::LazyLock;

use super::{Cluster, Unavailable};
use crate::config::Rate;
use crate::policy::limits::{ClientKey, RateLimit};
use crate::policy::lockout::login_key;
use crate::policy::store::RateKey;

/// KEYS[1]: the budget; ARGV[1]: the emission interval `per / N` (µs); ARGV[2]: the
/// tolerance `per` (µs); ARGV[3]: `1` to take one event, `0` to read. Returns
/// `{allowed, available}`: whether one more event fits now, and how many fit now (before
/// this one was taken).
const GCRA: &str = r"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local interval = tonumber(ARGV[1])
local tolerance = tonumber(ARGV[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0') or 0
if tat < now then tat = now end
local available = math.floor((tolerance - (tat - now)) / interval)
if available < 1 then return {0, 0} end
if ARGV[3] == '1' then
  local new = tat + interval
  redis.call('SET', KEYS[1], string.format('%.0f', new), 'PX', math.ceil((new - now) / 1000))
end
return {1, available}
";

static SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| redis::Script::new(GCRA));

/// The key of `limit`'s budget for `key`; `None` for a key of the wrong kind for `limit`
/// (never counted, as locally).
pub fn budget_key(limit: RateLimit, key: &RateKey) -> Option<String> {
    let rule = limit.rule().trim_start_matches("rate_limits.");
    match (limit, key) {
        (RateLimit::MessagesPerUser, RateKey::Login(login)) => {
            Some(super::key(&["rate", rule, login_key(login)]))
        }
        (RateLimit::MessagesPerUser, RateKey::Client(_)) | (_, RateKey::Login(_)) => None,
        (_, RateKey::Client(ip)) => Some(super::key(&[
            "rate",
            rule,
            &ClientKey::new(*ip).to_string(),
        ])),
    }
}

/// The script's arguments for `rate`: the emission interval and the tolerance, in µs.
fn arguments(rate: Rate) -> (u64, u64) {
    let per = u64::try_from(rate.per.as_micros())
        .unwrap_or(u64::MAX)
        .max(1);
    let interval = (per / u64::from(rate.count.max(1))).max(1);
    (interval, interval * u64::from(rate.count.max(1)))
}

/// Take one event from the budget `budget` (a [`budget_key`]) of `rate` on the store:
/// `true` when it fitted (and was taken), `false` when the budget is spent (nothing taken).
///
/// # Errors
/// [`Unavailable`] when the store did not answer (nothing is known to be taken).
pub async fn take(cluster: &Cluster, budget: &str, rate: Rate) -> Result<bool, Unavailable> {
    run(cluster, budget, rate, true).await.map(|(fits, _)| fits)
}

/// How many events the budget `budget` of `rate` lets through now, taking nothing.
///
/// # Errors
/// [`Unavailable`] when the store did not answer.
pub async fn available(cluster: &Cluster, budget: &str, rate: Rate) -> Result<u32, Unavailable> {
    run(cluster, budget, rate, false)
        .await
        .map(|(_, available)| u32::try_from(available).unwrap_or(0).min(rate.count))
}

async fn run(
    cluster: &Cluster,
    budget: &str,
    rate: Rate,
    take: bool,
) -> Result<(bool, i64), Unavailable> {
    let (interval, tolerance) = arguments(rate);
    let mut invocation = SCRIPT.key(budget);
    invocation.arg(interval).arg(tolerance).arg(u8::from(take));
    let (allowed, available): (i64, i64) = if take {
        cluster.script(&invocation).await?
    } else {
        cluster.read_script(&invocation).await?
    };
    Ok((allowed == 1, available))
}
