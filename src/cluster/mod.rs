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
//! failure. Every operation, connecting included, is bounded by `[cluster] timeout`. A failed
//! or slow operation marks the store *down*: for [`RETRY_INTERVAL`] every operation fails at
//! once (no session waits on a dead store), then the next one tries again; the task of
//! [`Cluster::watch`] pings it meanwhile so it comes back even without traffic. Going down and
//! coming back are logged once each and raise and clear the `cluster_fallback` alert.
//!
//! Redis must run with `maxmemory-policy noeviction`: an evicting Redis would drop lockouts and
//! spent budgets under memory pressure, exactly what an attacker flooding the tables wants.
//! A store found with another policy is treated as unavailable (logged as an error), and a
//! write it refuses for memory (`OOM`) is an error like any other.

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
/// (`on_error`); the cause is logged when the store goes down.
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
    /// Redis runs with an eviction policy other than `noeviction`.
    #[error("shared store runs with maxmemory-policy {0}; portcullis needs noeviction")]
    Evicting(String),
}

/// The shared store of `[cluster]` and this node's view of whether it is reachable.
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
    connection: tokio::sync::Mutex<Option<MultiplexedConnection>>,
    /// Whether the last operation succeeded (starts `true`: nothing is known to be wrong).
    up: AtomicBool,
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
        // Checked when the policy was compiled; a failure here would be a redis-rs change.
        let client = redis::Client::open(url.expose()).ok()?;
        Some(Arc::new(Cluster {
            url,
            node: config.node.clone(),
            on_error: config.on_error,
            timeout: config.timeout,
            client,
            connection: tokio::sync::Mutex::new(None),
            up: AtomicBool::new(true),
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

    /// Whether the last operation reached the store (`true` until one fails).
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

    /// Run one script invocation atomically on the store.
    ///
    /// # Errors
    /// [`Unavailable`] when the store is down, slow or answers an error (the store is then
    /// marked down; see the module's "Reaching the store").
    pub async fn script<T: redis::FromRedisValue>(
        &self,
        invocation: &redis::ScriptInvocation<'_>,
    ) -> Result<T, Unavailable> {
        let mut connection = self.connection().await?;
        let result = self
            .bounded(async { invocation.invoke_async(&mut connection).await })
            .await;
        self.settle(result).await
    }

    /// Run one command on the store.
    ///
    /// # Errors
    /// As [`Cluster::script`].
    pub async fn command<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, Unavailable> {
        let mut connection = self.connection().await?;
        let result = self
            .bounded(async { command.query_async(&mut connection).await })
            .await;
        self.settle(result).await
    }

    /// `fut` bounded by the timeout, counted as one operation.
    async fn bounded<T>(
        &self,
        fut: impl Future<Output = redis::RedisResult<T>>,
    ) -> Result<T, Unavailable> {
        self.operations.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(self.timeout, fut).await {
            Ok(Ok(value)) => Ok(value),
            Ok(Err(e)) => Err(Unavailable::Redis(e.to_string())),
            Err(_) => Err(Unavailable::Timeout(self.timeout)),
        }
    }

    /// Record how an operation ended: a failure marks the store down (and drops the
    /// connection), a success after a failure marks it up again.
    async fn settle<T>(&self, result: Result<T, Unavailable>) -> Result<T, Unavailable> {
        match &result {
            Ok(_) => self.mark_up(),
            Err(e) => {
                *self.connection.lock().await = None;
                self.mark_down(e);
            }
        }
        result
    }

    /// The connection, opened (and its eviction policy checked) if there is none; fails at
    /// once while the store is marked down and [`RETRY_INTERVAL`] has not passed.
    async fn connection(&self) -> Result<MultiplexedConnection, Unavailable> {
        let retry_at = *self.retry_at.lock().unwrap_or_else(|p| p.into_inner());
        if retry_at.is_some_and(|at| Instant::now() < at) {
            return Err(Unavailable::Down);
        }
        let mut slot = self.connection.lock().await;
        if let Some(connection) = slot.as_ref() {
            return Ok(connection.clone());
        }
        let opened = self.open().await;
        match opened {
            Ok(connection) => {
                *slot = Some(connection.clone());
                Ok(connection)
            }
            Err(e) => {
                drop(slot);
                self.mark_down(&e);
                Err(e)
            }
        }
    }

    /// Connect and check that the store never evicts keys.
    async fn open(&self) -> Result<MultiplexedConnection, Unavailable> {
        let mut connection = self
            .bounded(self.client.get_multiplexed_async_connection())
            .await?;
        let info: String = self
            .bounded(async {
                redis::cmd("INFO")
                    .arg("memory")
                    .query_async(&mut connection)
                    .await
            })
            .await?;
        let policy = info
            .lines()
            .find_map(|l| l.strip_prefix("maxmemory_policy:"))
            .map(str::trim)
            .unwrap_or("unknown");
        if policy != "noeviction" {
            return Err(Unavailable::Evicting(policy.to_string()));
        }
        Ok(connection)
    }

    fn mark_up(&self) {
        *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) = None;
        if !self.up.swap(true, Ordering::Relaxed) {
            info!(
                redis = %self.url,
                node = %self.node,
                "shared store reachable again; limits, lockouts and suspensions are shared again"
            );
            (self.telemetry.alerts).set_external(AlertName::ClusterFallback, None);
        }
    }

    fn mark_down(&self, cause: &Unavailable) {
        *self.retry_at.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(Instant::now() + RETRY_INTERVAL);
        if matches!(cause, Unavailable::Down) || !self.up.swap(false, Ordering::Relaxed) {
            return;
        }
        let fallback = match self.on_error {
            OnError::Local => "this node counts on its own state until it returns",
            OnError::Tempfail => "this node answers with temporary refusals until it returns",
        };
        if let Unavailable::Evicting(_) = cause {
            error!(redis = %self.url, node = %self.node, error = %cause, rule = "cluster_fallback", "shared store refused: {fallback}");
        } else {
            warn!(redis = %self.url, node = %self.node, error = %cause, rule = "cluster_fallback", "shared store unavailable: {fallback}");
        }
        (self.telemetry.alerts).set_external(
            AlertName::ClusterFallback,
            Some(External {
                value: "1".into(),
                threshold: "0".into(),
                text: format!("shared store {} unavailable: {cause}", self.url),
            }),
        );
    }

    /// Until `stop`: connect at once, then while the store is down ping it every
    /// [`RETRY_INTERVAL`], so it is found again (and the alert cleared) without traffic.
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(RETRY_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            if !self.is_up() || self.connection.lock().await.is_none() {
                let _ = self.command::<String>(&redis::cmd("PING")).await;
            }
        }
    }
}

/// A key of the store: [`KEY_PREFIX`], then the parts joined by `:`.
pub fn key(parts: &[&str]) -> String {
    let mut key = String::from(KEY_PREFIX);
    key.push_str(&parts.join(":"));
    key
}

#[cfg(test)]
mod tests;
#[cfg(test)]
mod tests_store;
