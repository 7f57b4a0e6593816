//! The store several nodes share (`[cluster] redis`): rate budgets, AUTH failure records and
//! suspended logins kept in one Redis, so a client spreading its attempts over N nodes gets
//! one budget, not N.
//!
//! # What lives in Redis
//! Only counters and records that expire on their own (every key carries a TTL set in the
//! same atomic script that writes it) plus the suspended logins. No message ever depends on
//! Redis: each node keeps its own durable spool, and a node whose Redis is gone keeps
//! accepting and delivering (`on_error = "local"`) or answers with temporary refusals
//! (`"tempfail"`), never unlimited.
//!
//! Every key starts with [`KEY_PREFIX`]. Writes are Lua scripts run by Redis as one atomic
//! step (no read-modify-write across the network), using Redis's own clock (`TIME`) so nodes'
//! clocks need not agree.
//!
//! # Reaching the store
//! [`Cluster`] holds one multiplexed connection, opened on first use and again after any
//! failure. Every operation, connecting included (connect and the eviction check together),
//! is bounded by `[cluster] timeout`. A failed or slow operation marks the store *down*: for
//! [`RETRY_INTERVAL`] every operation fails at once, sessions queued behind a failed connect
//! included (no session waits on a dead store), then the next one tries again; the task of
//! [`Cluster::watch`] meanwhile writes a small probe key so the store comes back even without
//! traffic. A write refused for memory (`OOM`) marks the store *full* instead: it keeps the
//! connection, since reads still answer, and a lockout or a spent budget the store holds still
//! refuses (see [`store`]); the next write it takes ends it. Going down and coming back are
//! logged once each and raise and clear the `cluster_fallback` alert; a changed cause during an
//! outage (the store came back evicting, a password changed) is logged too, at most once per
//! [`CAUSE_LOG_INTERVAL`], and shown in the alert.
//!
//! Redis must run with `maxmemory-policy noeviction`: an evicting Redis would drop lockouts and
//! spent budgets under memory pressure, exactly what an attacker flooding the tables wants.
//! The policy is checked on every connect and every [`RETRY_INTERVAL`] by the watch task (an
//! operator may change it under a running node); a store found with another policy is
//! treated as down (logged as an error).

use std::sync::Arc;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use redis::aio::MultiplexedConnection;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, OnError, RedisUrl};
use crate::observe::Telemetry;
use crate::observe::alerts::{AlertName, External};

pub mod auth;
pub mod limits;
pub mod store;
#[doc(hidden)]
pub mod testing;

/// The prefix of every key portcullis writes (so one Redis can serve other software too).
pub const KEY_PREFIX: &str = "portcullis:";

/// How long a store found down is not asked again (operations fail at once meanwhile).
pub const RETRY_INTERVAL: Duration = Duration::from_secs(1);

/// Why the shared store did not answer. Whatever the cause, the node falls back
/// (`on_error`); the cause is logged when the store goes down and whenever it changes.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Unavailable {
    /// A recent operation failed; the store is not asked again until [`RETRY_INTERVAL`] has
    /// passed.
    #[error("shared store down (retrying)")]
    Down,
    /// No answer within `[cluster] timeout`.
    #[error("shared store did not answer within {0:?}")]
    Timeout(Duration),
    /// Redis answered with an error, or the connection failed (the text is redis-rs's, which
    /// never contains the password).
    #[error("shared store error: {0}")]
    Redis(String),
    /// Redis refused a write for memory (`OOM`: `maxmemory` reached under `noeviction`).
    /// Only the write is refused: the store is not marked down and keeps answering, and
    /// since every script reads before it writes, a lockout or a spent budget it holds is
    /// still answered as such by every node.
    #[error("shared store full: writes refused for memory (OOM, maxmemory reached)")]
    Full,
    /// Redis runs with an eviction policy other than `noeviction`.
    #[error("shared store runs with maxmemory-policy {0}; portcullis needs noeviction")]
    Evicting(String),
}

/// One operation for [`Cluster::send`]: a script (EVALSHA, loaded on first use) or a command.
enum Request<'a> {
    Script(&'a redis::ScriptInvocation<'a>),
    Command(&'a redis::Cmd),
}

/// What the node last said (log and alert) about the store.
#[derive(Debug, Default)]
struct Health {
    /// Why the store is down (unreachable, slow, an error, evicting); `None`: reachable.
    down: Option<Unavailable>,
    /// Whether the store refuses writes (`OOM`); cleared by the next write it takes.
    full: bool,
    /// The cause last logged, and when: a changed cause is logged at most once per
    /// [`CAUSE_LOG_INTERVAL`].
    logged: Option<(String, Instant)>,
}

/// How often a changed cause of an ongoing outage is logged at most.
pub const CAUSE_LOG_INTERVAL: Duration = Duration::from_secs(60);

/// The shared store of `[cluster]` and this node's view of whether it is reachable. Its log
/// lines carry no `node` field of their own: with `[cluster]` the log writer names the node
/// on every line.
pub struct Cluster {
    /// The store (its password never shown).
    url: RedisUrl,
    /// This node's name (`[cluster] node`).
    node: String,
    /// What to do while the store is unavailable.
    on_error: OnError,
    /// Bound on every operation, connecting included.
    timeout: Duration,
    /// The client (parses the URL once).
    client: redis::Client,
    /// The connection in use; `None` before the first operation and after a failure.
    connection: tokio::sync::Mutex<Option<(u64, MultiplexedConnection)>>,
    /// Connections opened so far: the number of the one in the slot, so that a failure on an
    /// older connection does not drop a newer one.
    opened: AtomicU64,
    /// Whether the store is reachable and takes writes (starts `true`: nothing is known to
    /// be wrong); [`Health`] says why not.
    up: AtomicBool,
    /// What was said about the store, and why it is not up.
    health: Mutex<Health>,
    /// Until when operations fail at once after a failure.
    retry_at: Mutex<Option<Instant>>,
    /// Operations sent to the store (for the benchmarks' operations per message).
    operations: AtomicU64,
    /// Where the alert and the log go.
    telemetry: Arc<Telemetry>,
}

impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("url", &self.url)
            .field("node", &self.node)
            .field("on_error", &self.on_error)
            .field("up", &self.up.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

impl Cluster {
    /// The store of `config`, or `None` without `[cluster] redis`. Nothing is connected yet.
    pub fn new(config: &config::Cluster, telemetry: Arc<Telemetry>) -> Option<Arc<Cluster>> {
        let url = config.redis.clone()?;
        // Checked when the policy was compiled (`RedisUrl::parse` opens a client the same
        // way), so this cannot fail; if it ever did, the node says so loudly and keeps its
        // own limits.
        let client = match redis::Client::open(url.expose()) {
            Ok(client) => client,
            Err(e) => {
                error!(redis = %url, error = %e, rule = "cluster_fallback",
                    "cannot use the shared store; this node counts on its own state");
                return None;
            }
        };
        Some(Arc::new(Cluster {
            url,
            node: config.node.clone(),
            on_error: config.on_error,
            timeout: config.timeout,
            client,
            connection: tokio::sync::Mutex::new(None),
            opened: AtomicU64::new(0),
            up: AtomicBool::new(true),
            health: Mutex::new(Health::default()),
            retry_at: Mutex::new(None),
            operations: AtomicU64::new(0),
            telemetry,
        }))
    }

    /// This node's name.
    pub fn node(&self) -> &str {
        &self.node
    }

    /// What to do while the store is unavailable.
    pub fn on_error(&self) -> OnError {
        self.on_error
    }

    /// Whether the store is reachable and takes writes, as far as the last operations tell
    /// (`true` until one fails).
    pub fn is_up(&self) -> bool {
        self.up.load(Ordering::Relaxed)
    }

    /// Operations sent to the store since the start.
    pub fn operations(&self) -> u64 {
        self.operations.load(Ordering::Relaxed)
    }

    /// The store's URL as it may be shown (password replaced).
    pub fn url(&self) -> &RedisUrl {
        &self.url
    }

    /// Run one script invocation atomically on the store (a write: its success shows the
    /// store takes writes again).
    ///
    /// # Errors
    /// [`Unavailable`] when the store is down, slow, full or answers an error (see the
    /// module's "Reaching the store").
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        self.send(Request::Script(invocation), true).await
    }

    /// Run one script that only reads (or writes only when the store lacks what it reads): as
    /// [`Cluster::script`], but its success does not show that the store takes writes.
    ///
    /// # Errors
    /// As [`Cluster::script`].
    pub async fn read_script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        self.send(Request::Script(invocation), false).await
    }

    /// Run one command on the store (taken as a read: its success does not show that the
    /// store takes writes).
    ///
    /// # Errors
    /// As [`Cluster::script`].
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, Unavailable> {
        self.send(Request::Command(command), false).await
    }

    /// Send `request` on the connection (opened if need be), bounded by the timeout, and
    /// record how it ended ([`Cluster::settle`]).
    async fn send<T: redis::FromRedisValue>(
        &self,
        request: Request<'_>,
        writes: bool,
    ) -> Result<T, Unavailable> {
        let (generation, mut connection) = self.connection().await?;
        let result = match request {
            Request::Script(s) => self.bounded(s.invoke_async(&mut connection)).await,
            Request::Command(c) => self.bounded(c.query_async(&mut connection)).await,
        };
        self.settle(result, writes, generation).await
    }

    /// `fut` bounded by the timeout, counted as one operation.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        self.operations.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) if is_oom(&e) => Err(Unavailable::Full),
            Ok(Err(e)) => Err(Unavailable::Redis(e.to_string())),
            Err(_) => Err(Unavailable::Timeout(self.timeout)),
        }
    }

    /// Record how an operation ended: a failure marks the store down (and drops the
    /// connection) or, for a refused write, full; a success marks it reachable again, and a
    /// write that succeeded, no longer full.
    async fn settle<T>(
        &self,
        result: Result<T, Unavailable>,
        writes: bool,
        generation: u64,
    ) -> Result<T, Unavailable> {
        match &result {
            Ok(_) => self.succeeded(writes),
            // The store is there and still answers reads: keep the connection.
            Err(e @ Unavailable::Full) => self.failed(e),
            Err(e) => {
                self.drop_connection(generation).await;
                self.failed(e);
            }
        }
        result
    }

    /// Drop the connection numbered `generation` if it is still the one in use.
    async fn drop_connection(&self, generation: u64) {
        let mut slot = self.connection.lock().await;
        if slot.as_ref().is_some_and(|(g, _)| *g == generation) {
            *slot = None;
        }
    }

    /// The connection, opened (and its eviction policy checked) if there is none; fails at
    /// once while the store is marked down and [`RETRY_INTERVAL`] has not passed (checked
    /// again once the connection is ours: sessions that queued behind a failed connect do not
    /// each try again).
    async fn connection(&self) -> Result<(u64, MultiplexedConnection), Unavailable> {
        self.retry_due()?;
        let mut slot = self.connection.lock().await;
        if let Some((generation, connection)) = slot.as_ref() {
            return Ok((*generation, connection.clone()));
        }
        self.retry_due()?;
        match self.open().await {
            Ok(connection) => {
                let generation = self.opened.fetch_add(1, Ordering::Relaxed) + 1;
                *slot = Some((generation, connection.clone()));
                Ok((generation, connection))
            }
            Err(e) => {
                drop(slot);
                self.failed(&e);
                Err(e)
            }
        }
    }

    /// `Err(Down)` while the store is not to be asked.
    fn retry_due(&self) -> Result<(), Unavailable> {
        let retry_at = *self.retry_at.lock().unwrap_or_else(|p| p.into_inner());
        match retry_at {
            Some(at) if Instant::now() < at => Err(Unavailable::Down),
            _ => Ok(()),
        }
    }

    /// Connect and check that the store never evicts keys, both within one timeout.
    async fn open(&self) -> Result<MultiplexedConnection, Unavailable> {
        self.operations.fetch_add(2, Ordering::Relaxed);
        let opening = async {
            let mut connection = self.client.get_multiplexed_async_connection().await?;
            let info: String = redis::cmd("INFO")
                .arg("memory")
                .query_async(&mut connection)
                .await?;
            Ok::<_, redis::RedisError>((connection, info))
        };
        let (connection, info) = match tokio::time::timeout(self.timeout, opening).await {
            Ok(Ok(opened)) => opened,
            Ok(Err(e)) => return Err(Unavailable::Redis(e.to_string())),
            Err(_) => return Err(Unavailable::Timeout(self.timeout)),
        };
        eviction_policy(&info)?;
        Ok(connection)
    }

    fn succeeded(&self, wrote: bool) {
        // Up: nothing to clear (no retry time is set while the store is up).
        if self.is_up() {
            return;
        }
        *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        health.down = None;
        if wrote {
            health.full = false;
        }
        self.announce(&mut health);
    }

    fn failed(&self, cause: &Unavailable) {
        let mut health = self.health.lock().unwrap_or_else(|p| p.into_inner());
        match cause {
            Unavailable::Down => return,
            Unavailable::Full => health.full = true,
            _ => {
                *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) =
                    Some(Instant::now() + RETRY_INTERVAL);
                health.down = Some(cause.clone());
            }
        }
        self.announce(&mut health);
    }

    /// Log and raise (or clear) `cluster_fallback` for the state `health` now says: going
    /// down and coming back once each, a changed cause at most once per
    /// [`CAUSE_LOG_INTERVAL`].
    fn announce(&self, health: &mut Health) {
        let cause = health
            .down
            .clone()
            .or_else(|| health.full.then_some(Unavailable::Full));
        self.up.store(cause.is_none(), Ordering::Relaxed);
        let Some(cause) = cause else {
            if health.logged.take().is_some() {
                info!(
                    redis = %self.url,
                    "shared store reachable again; limits, lockouts and suspensions are shared again"
                );
                (self.telemetry.alerts).set_external(AlertName::ClusterFallback, None);
            }
            return;
        };
        let now = Instant::now();
        let (still, quiet) = match &health.logged {
            None => (false, false),
            Some((last, _)) if *last == cause.to_string() => return,
            Some((_, at)) => (true, now < *at + CAUSE_LOG_INTERVAL),
        };
        (self.telemetry.alerts).set_external(
            AlertName::ClusterFallback,
            Some(External {
                value: "1".into(),
                threshold: "0".into(),
                text: format!("shared store {} unavailable: {cause}", self.url),
            }),
        );
        if quiet {
            return;
        }
        health.logged = Some((cause.to_string(), now));
        let fallback = match self.on_error {
            OnError::Local => "this node counts on its own state until it returns",
            OnError::Tempfail => "this node answers with temporary refusals until it returns",
        };
        let what = if still {
            "shared store still unavailable, now"
        } else {
            "shared store unavailable"
        };
        if matches!(cause, Unavailable::Evicting(_) | Unavailable::Full) {
            error!(redis = %self.url, error = %cause, rule = "cluster_fallback", "{what}: {fallback}");
        } else {
            warn!(redis = %self.url, error = %cause, rule = "cluster_fallback", "{what}: {fallback}");
        }
    }

    /// Until `stop`, every [`RETRY_INTERVAL`]: connect if there is no connection, check the
    /// store's eviction policy again (an operator may change it under a running node), and
    /// while it is down or full try a small write (`portcullis:probe:NODE`, expiring), so it
    /// is found again (and the alert cleared) without traffic.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RETRY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let probe = key(&["probe", &self.node]);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            self.check_eviction().await;
            if !self.is_up() {
                let mut write = redis::cmd("SET");
                write.arg(&probe).arg(1).arg("PX").arg(10_000);
                let _ = self.send::<()>(Request::Command(&write), true).await;
            }
        }
    }

    /// Read the eviction policy on the connection in use; a store that evicts is down.
    async fn check_eviction(&self) {
        let Ok(info) = self
            .command::<String>(redis::cmd("INFO").arg("memory"))
            .await
        else {
            return;
        };
        if let Err(e) = eviction_policy(&info) {
            *self.connection.lock().await = None;
            self.failed(&e);
        }
    }
}

/// `Err(Evicting)` unless `INFO memory` says `maxmemory_policy:noeviction`.
fn eviction_policy(info: &str) -> Result<(), Unavailable> {
    let policy = info
        .lines()
        .find_map(|l| l.strip_prefix("maxmemory_policy:"))
        .map(str::trim)
        .unwrap_or("unknown");
    if policy == "noeviction" {
        Ok(())
    } else {
        Err(Unavailable::Evicting(policy.to_string()))
    }
}

/// Whether Redis refused for memory: the `OOM` error, also when a script's write met it.
fn is_oom(e: &redis::RedisError) -> bool {
    e.code() == Some("OOM") || e.to_string().contains("OOM command not allowed")
}

/// A key of the store: [`KEY_PREFIX`], then the parts joined by `:`.
///
/// Each part is written as printable ASCII: an octet outside `!`..`~`, and `%`, is written
/// `%XX` (a login with a line break, a space or non-ASCII letters makes a key an operator
/// can list and pass on with `redis-cli --scan`). Parts are never empty in practice; a `:`
/// inside one is kept (an IPv6 prefix), since the last part is always the free-form one.
pub fn key(parts: &[&str]) -> String {
    let mut key = String::from(KEY_PREFIX);
    for (i, part) in parts.iter().enumerate() {
        if i > 0 {
            key.push(':');
        }
        key.push_str(&key_part(part));
    }
    key
}

/// `part` as [`key`] writes it.
pub fn key_part(part: &str) -> String {
    let mut out = String::with_capacity(part.len());
    for b in part.bytes() {
        if b.is_ascii_graphic() && b != b'%' {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_store;
