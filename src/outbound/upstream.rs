//! The upstreams at run time: routing, a circuit breaker and a connection pool for each.
//!
//! Routing: a recipient domain listed in an upstream's `domains` goes to the upstreams that
//! list it, in file order; any other domain to the upstreams with empty `domains` (the default
//! route), in file order. The first available one is tried, then the next (failover).
//!
//! Circuit breaker: a connection-level failure (refused connection, timeout, broken TLS, a
//! `421` or `452 4.3.1` back-pressure reply) marks the upstream down for its `backoff`,
//! doubling with each further failure up to 16 times. While down, deliveries skip it. When
//! the back-off has passed, one delivery probes it (the breaker half-opens: the others keep
//! skipping it until the probe ends); a success closes the breaker. `queue retry` closes it
//! at once.
//!
//! Pool: at most `max_connections` connections per upstream, idle or busy. A connection that
//! finished a transaction cleanly goes back to the pool and carries the next message (after
//! RSET); one idle for longer than [`IDLE_TIMEOUT`] is closed. One found closed by the
//! upstream (at its RSET) makes the whole idle pool go, and the delivery retries once on a
//! new connection: after an upstream restart every pooled connection is dead.

use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use super::client::{Connection, Failure};
use super::tls::{ClientTls, ClientTlsError, client_tls};
use crate::config::{Config, Upstream, UpstreamTls};

/// How long an idle upstream connection is kept for the next message.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The back-off grows to at most this many times the configured `backoff`.
const MAX_BACKOFF_FACTOR: u32 = 16;

/// All upstreams and the routing table.
pub struct Upstreams {
    list: Vec<Arc<UpstreamRt>>,
    by_domain: HashMap<String, Vec<usize>>,
    default_route: Vec<usize>,
}

impl Upstreams {
    /// Build the run-time upstreams (TLS client configurations included) from `config`.
    pub fn new(config: &Config) -> Result<Upstreams, ClientTlsError> {
        let mut list = Vec::new();
        let mut by_domain: HashMap<String, Vec<usize>> = HashMap::new();
        let mut default_route = Vec::new();
        for (i, up) in config.upstreams.iter().enumerate() {
            list.push(Arc::new(UpstreamRt {
                tls: client_tls(up)?,
                config: up.clone(),
                slots: Arc::new(Semaphore::new(up.max_connections)),
                idle: Mutex::new(Vec::new()),
                breaker: Mutex::new(Breaker::default()),
            }));
            if up.domains.is_empty() {
                default_route.push(i);
            }
            for d in &up.domains {
                by_domain.entry(d.clone()).or_default().push(i);
            }
        }
        Ok(Upstreams {
            list,
            by_domain,
            default_route,
        })
    }

    /// The upstreams for a recipient domain, in failover order. Empty when no upstream lists
    /// the domain and there is no default route. `domain` is an [`Address::domain`]: the
    /// canonical A-label form in lower case, the form `upstreams[].domains` is compiled to,
    /// so `bücher.example` and `xn--bcher-kva.example` take the same route.
    ///
    /// [`Address::domain`]: crate::envelope::Address::domain
    pub fn route(&self, domain: &str) -> &[usize] {
        self.by_domain.get(domain).unwrap_or(&self.default_route)
    }

    /// Upstream number `i`.
    pub fn get(&self, i: usize) -> &Arc<UpstreamRt> {
        &self.list[i]
    }

    /// Every upstream.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<UpstreamRt>> {
        self.list.iter()
    }

    /// Close every breaker (operator `queue retry --all`).
    pub fn reset_all(&self) {
        for up in &self.list {
            up.reset_breaker();
        }
    }

    /// Close connections idle for longer than [`IDLE_TIMEOUT`].
    pub fn reap_idle(&self) {
        for up in &self.list {
            let expired: Vec<Connection> = {
                let mut idle = up.idle();
                let (keep, old) = idle
                    .drain(..)
                    .partition(|c| c.conn.idle_since.elapsed() < IDLE_TIMEOUT);
                *idle = keep;
                old.into_iter().map(|c: Pooled| c.conn).collect()
            };
            for conn in expired {
                tokio::spawn(conn.quit());
            }
        }
    }

    /// Close every idle connection (shutdown).
    pub async fn close_all(&self) {
        for up in &self.list {
            let idle: Vec<Pooled> = up.idle().drain(..).collect();
            for c in idle {
                c.conn.quit().await;
            }
        }
    }
}

/// One upstream at run time.
pub struct UpstreamRt {
    pub config: Upstream,
    tls: Option<ClientTls>,
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Pooled>>,
    breaker: Mutex<Breaker>,
}

/// An idle connection with its pool slot.
struct Pooled {
    conn: Connection,
    permit: OwnedSemaphorePermit,
}

/// A connection checked out of the pool; give it back with [`UpstreamRt::release`].
pub struct Lease {
    pub conn: Connection,
    permit: OwnedSemaphorePermit,
}

impl UpstreamRt {
    /// The upstream's name.
    pub fn name(&self) -> &str {
        &self.config.name
    }

    fn idle(&self) -> MutexGuard<'_, Vec<Pooled>> {
        self.idle.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn breaker(&self) -> MutexGuard<'_, Breaker> {
        self.breaker.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// May a delivery use this upstream now? Takes the probe slot when the back-off has just
    /// ended.
    pub fn available(&self, now: Instant) -> bool {
        self.breaker().try_pass(now, self.config.backoff)
    }

    /// Why the breaker is open and how long it stays so (None: it is closed).
    pub fn down(&self) -> Option<(Instant, String)> {
        let b = self.breaker();
        Some((b.down_until?, b.last_failure.clone().unwrap_or_default()))
    }

    /// Record a connection-level failure.
    pub fn failed(&self, now: Instant, failure: &Failure) {
        let backoff = {
            let mut b = self.breaker();
            b.last_failure = Some(failure.to_string());
            b.trip(now, self.config.backoff)
        };
        warn!(
            upstream = %self.name(), error = %failure, backoff_secs = backoff.as_secs(),
            "upstream marked down"
        );
    }

    /// Record a completed conversation.
    pub fn succeeded(&self) {
        if self.breaker().close() {
            info!(upstream = %self.name(), "upstream is up again");
        }
    }

    /// Close the breaker (operator `queue retry`).
    pub fn reset_breaker(&self) {
        if self.breaker().close() {
            info!(upstream = %self.name(), "circuit breaker reset by queue retry");
        }
    }

    /// A connection: an idle one from the pool, or a new one once a slot is free.
    pub async fn lease(&self, hostname: &str) -> Result<Lease, Failure> {
        if let Some(lease) = self.take_idle() {
            return Ok(lease);
        }
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| Failure {
                stage: "connect",
                detail: "shutting down".into(),
                stale: false,
            })?;
        // A connection may have come back while we waited.
        if let Some(lease) = self.take_idle() {
            return Ok(lease);
        }
        let conn = match Connection::open(&self.config, self.tls.as_ref(), hostname, true).await {
            Ok(conn) => conn,
            Err(f)
                if self.config.tls == UpstreamTls::Opportunistic && f.stage == "TLS handshake" =>
            {
                warn!(
                    upstream = %self.name(), error = %f,
                    "opportunistic TLS failed; retrying this upstream in plaintext"
                );
                Connection::open(&self.config, None, hostname, false).await?
            }
            Err(f) => return Err(f),
        };
        Ok(Lease { conn, permit })
    }

    /// Close every idle connection of this upstream: one of them was found closed by the
    /// upstream (a restart, or its own idle timeout), and the others, pooled over the same
    /// period, most likely are too. Retrying on each in turn would fail as many times and
    /// trip the circuit breaker over connections that were merely stale.
    pub fn discard_idle(&self) {
        let idle: Vec<Pooled> = self.idle().drain(..).collect();
        for p in idle {
            tokio::spawn(p.conn.quit());
        }
    }

    fn take_idle(&self) -> Option<Lease> {
        let mut idle = self.idle();
        while let Some(p) = idle.pop() {
            if p.conn.idle_since.elapsed() < IDLE_TIMEOUT {
                return Some(Lease {
                    conn: p.conn,
                    permit: p.permit,
                });
            }
            tokio::spawn(p.conn.quit());
        }
        None
    }

    /// Return a connection: back to the pool when reusable, closed otherwise.
    pub fn release(&self, lease: Lease) {
        if lease.conn.reusable {
            self.idle().push(Pooled {
                conn: lease.conn,
                permit: lease.permit,
            });
        } else {
            drop(lease.permit);
            tokio::spawn(lease.conn.quit());
        }
    }
}

/// Circuit breaker state of one upstream.
#[derive(Debug, Default)]
struct Breaker {
    /// Consecutive failures.
    failures: u32,
    /// Down until then; `None`: closed.
    down_until: Option<Instant>,
    /// The failure that opened it, for the queue's `last_error`.
    last_failure: Option<String>,
}

impl Breaker {
    fn backoff(&self, base: Duration) -> Duration {
        let factor = 1u32 << self.failures.saturating_sub(1).min(4);
        base * factor.min(MAX_BACKOFF_FACTOR)
    }

    fn try_pass(&mut self, now: Instant, base: Duration) -> bool {
        match self.down_until {
            None => true,
            Some(until) if now >= until => {
                // Half-open: this caller probes; others wait for another back-off.
                self.down_until = Some(now + self.backoff(base));
                true
            }
            Some(_) => false,
        }
    }

    fn trip(&mut self, now: Instant, base: Duration) -> Duration {
        self.failures = self.failures.saturating_add(1);
        let backoff = self.backoff(base);
        self.down_until = Some(now + backoff);
        backoff
    }

    /// Close; true when it was open.
    fn close(&mut self) -> bool {
        let was_open = self.down_until.is_some();
        self.failures = 0;
        self.down_until = None;
        was_open
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn breaker_backs_off_doubling_and_probes_once() {
        let base = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut b = Breaker::default();
        assert!(b.try_pass(t0, base));
        assert_eq!(b.trip(t0, base), Duration::from_secs(30));
        assert!(!b.try_pass(t0 + Duration::from_secs(29), base));
        // Back-off over: one probe passes, the next caller does not.
        let t1 = t0 + Duration::from_secs(30);
        assert!(b.try_pass(t1, base));
        assert!(!b.try_pass(t1, base));
        assert_eq!(b.trip(t1, base), Duration::from_secs(60));
        for _ in 0..10 {
            b.trip(t1, base);
        }
        assert_eq!(b.backoff(base), base * MAX_BACKOFF_FACTOR);
        assert!(b.close());
        assert!(b.try_pass(t1, base));
        assert!(!b.close());
    }
}
