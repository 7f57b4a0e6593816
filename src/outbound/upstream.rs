//! The upstreams at run time: routing, a circuit breaker and a connection pool for each.
//!
//! Routing: a recipient domain listed in an upstream's `domains` goes to the upstreams that
//! list it, in file order; any other domain to the upstreams with empty `domains` (the default
//! route), in file order. The first available one is tried, then the next (failover).
//!
//! Circuit breaker: a connection-level failure (refused connection, timeout, broken TLS, a
//! `421` or `452 4.3.1` back-pressure reply; [`ClientError::is_upstream_fault`], so not a
//! stale pooled connection nor an unreadable spool file) marks the upstream down for its
//! `backoff`, doubling with each failed probe up to 16 times. While down, deliveries skip it. When
//! the back-off has passed, one delivery probes it (the breaker half-opens: the others keep
//! skipping it until the probe ends); a success closes the breaker. `queue retry` closes it
//! at once.
//!
//! The capability probe at start and reload ([`Upstreams::probe_all`]) is no delivery and
//! leaves the breaker alone: mail recovered at start, or routed after a reload, does not wait
//! out a back-off for a connection made before any delivery was due. What it learns still
//! shows: an upstream it could not reach at the connection level is down on the board (the
//! status, `upstream_up`, the `upstream_down` alert) with its breaker closed, until a
//! connection reaches it (a delivery or the next probe) or `queue retry`; a delivery that
//! fails there opens the breaker as usual, keeping the down's `since`.
//!
//! One back-off step per probe, not per failing message: each delivery that passes the
//! breaker holds a [`Pass`] naming the breaker's period (closed, or one half-open probe). The
//! first failure of a period opens the breaker and starts a new period; failures of deliveries
//! that passed in an earlier period (six queued messages started together while the breaker
//! was closed, all failing within milliseconds) only confirm what is known and leave the
//! back-off as it is.
//!
//! Pool: at most `max_connections` connections per upstream, idle or busy. A connection that
//! finished a transaction cleanly goes back to the pool and carries the next message (after
//! RSET); one idle for longer than [`IDLE_TIMEOUT`] is closed. One found closed by the
//! upstream (at its RSET) makes the whole idle pool go, and the delivery retries once on a
//! new connection: after an upstream restart every pooled connection is dead.
//!
//! Reload ([`super::Delivery::reload`]): unchanged `[[upstreams]]` (and host name) keep the
//! running upstreams as they are, pools and breakers included. Otherwise the upstreams are
//! built anew ([`Upstreams::renew`]); each one whose entry did not change keeps its breaker and
//! its connection slots, and only its idle connections are closed.

use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{info, warn};

use super::client::UpstreamConnection;
use super::error::ClientError;
use super::tls::{ClientTls, ClientTlsError, client_tls};
use crate::config::{Config, Upstream, UpstreamTls};
use crate::envelope::unix_now;
use crate::observe::Telemetry;
use crate::routes::CapabilityBook;

/// How long an idle upstream connection is kept for the next message.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(10);

/// The back-off grows to at most this many times the configured `backoff`.
const MAX_BACKOFF_FACTOR: u32 = 16;

/// All upstreams and the routing table.
pub struct Upstreams {
    list: Vec<Arc<UpstreamRt>>,
    /// Holds the routing table ([`CapabilityBook::routes`]): one table for delivery and for
    /// the checks at RCPT.
    book: Arc<CapabilityBook>,
}

impl Upstreams {
    /// Build the run-time upstreams (TLS client configurations included) from `config`; each
    /// records what it learns from EHLO in `book`, and its breaker's changes in `telemetry`.
    pub fn new(
        config: &Config,
        book: Arc<CapabilityBook>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Upstreams, ClientTlsError> {
        Upstreams::renew(config, book, None, telemetry)
    }

    /// Like [`Upstreams::new`], for a reload that replaces `previous`: an upstream whose
    /// `[[upstreams]]` entry is unchanged (same name, same settings) keeps its circuit breaker
    /// and its connection slots, so a reload neither forgets that it is down nor lets the
    /// attempts still in flight on `previous` and the new ones together open more than its
    /// `max_connections`. Its idle pool starts empty (`previous`'s is closed by the caller).
    ///
    /// # Errors
    /// [`ClientTlsError`] when an upstream's TLS client configuration cannot be built.
    pub fn renew(
        config: &Config,
        book: Arc<CapabilityBook>,
        previous: Option<&Upstreams>,
        telemetry: Arc<Telemetry>,
    ) -> Result<Upstreams, ClientTlsError> {
        let mut list = Vec::new();
        for (i, up) in config.upstreams.iter().enumerate() {
            let mut rt = UpstreamRt::new(i, up, book.clone(), telemetry.clone())?;
            if let Some(same) = previous.and_then(|p| p.iter().find(|old| old.config == *up)) {
                rt.slots = same.slots.clone();
                rt.breaker = same.breaker.clone();
            }
            list.push(Arc::new(rt));
        }
        Ok(Upstreams { list, book })
    }

    /// Are these the upstreams `upstreams` configures, entry for entry and in order?
    pub fn configured_as(&self, upstreams: &[Upstream]) -> bool {
        self.list.len() == upstreams.len()
            && self
                .list
                .iter()
                .zip(upstreams)
                .all(|(rt, up)| rt.config == *up)
    }

    /// The upstreams for a recipient domain (lower case), in failover order ([`crate::routes::Routes::route`]).
    pub fn route(&self, domain: &str) -> &[usize] {
        self.book.routes().route(domain)
    }

    /// Connect to every upstream once, so each one's capabilities are known before mail is
    /// accepted; the connection stays in the pool for the first delivery. Waits at most
    /// `limit`; a failure is logged and leaves the breaker alone (the capabilities from the
    /// spool, or [`crate::policy::capability::Capabilities::UNKNOWN`], stay in force), but a
    /// connection-level one shows the upstream down ([`UpstreamRt::probed`], module doc).
    pub async fn probe_all(&self, hostname: &str, limit: Duration) {
        let mut probes = tokio::task::JoinSet::new();
        for up in &self.list {
            let (up, hostname) = (up.clone(), hostname.to_owned());
            probes.spawn(async move {
                match up.lease(&hostname).await {
                    Ok(lease) => {
                        up.probed(None);
                        up.release(lease);
                    }
                    Err(f) => {
                        warn!(
                            upstream = %up.name(), error = %f,
                            "capability probe failed; using the capabilities last seen"
                        );
                        up.probed(Some(&f));
                    }
                }
            });
        }
        let all = async { while probes.join_next().await.is_some() {} };
        if tokio::time::timeout(limit, all).await.is_err() {
            // Dropping the set aborts the probes still waiting.
            warn!(
                limit_secs = limit.as_secs(),
                "capability probes did not all finish in time; using the capabilities last seen for the rest"
            );
        }
    }

    /// Upstream number `i`.
    pub fn get(&self, i: usize) -> &Arc<UpstreamRt> {
        &self.list[i]
    }

    /// Every upstream.
    pub fn iter(&self) -> impl Iterator<Item = &Arc<UpstreamRt>> {
        self.list.iter()
    }

    /// Declare these upstreams to `telemetry` (one no longer configured is forgotten), each
    /// as its breaker knows it now: at start every one is up; after a reload an upstream that
    /// kept its breaker may be down, one built anew is up (until its probe says otherwise).
    pub fn publish_states(&self, telemetry: &Telemetry) {
        let names: Vec<String> = self.list.iter().map(|u| u.name().to_owned()).collect();
        (telemetry.upstreams).configure(&names, unix_now(), &telemetry.metrics);
        for up in &self.list {
            up.publish();
        }
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
            let expired: Vec<UpstreamConnection> = {
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
    /// Its position in `[[upstreams]]`, its key in `book`.
    index: usize,
    /// Where the capabilities it announces are recorded.
    book: Arc<CapabilityBook>,
    tls: Option<ClientTls>,
    /// At most `max_connections` leases; shared like `breaker`.
    slots: Arc<Semaphore>,
    idle: Mutex<Vec<Pooled>>,
    /// Shared with the same upstream's successor after a reload ([`Upstreams::renew`]).
    breaker: Arc<Mutex<Breaker>>,
    /// Where the breaker's openings and closings are published (`upstream_up`,
    /// `upstream_breaker_open`, the status's upstream state).
    telemetry: Arc<Telemetry>,
}

/// An idle connection with its pool slot.
struct Pooled {
    conn: UpstreamConnection,
    permit: OwnedSemaphorePermit,
}

/// A connection checked out of the pool; give it back with [`UpstreamRt::release`].
pub struct Lease {
    pub conn: UpstreamConnection,
    permit: OwnedSemaphorePermit,
}

impl UpstreamRt {
    /// Upstream number `index` of `[[upstreams]]`, with its TLS client configuration, an
    /// empty pool and a closed breaker; what it learns from EHLO goes to `book`, its
    /// breaker's changes to `telemetry`.
    ///
    /// # Errors
    /// [`ClientTlsError`] when its TLS client configuration cannot be built.
    pub fn new(
        index: usize,
        config: &Upstream,
        book: Arc<CapabilityBook>,
        telemetry: Arc<Telemetry>,
    ) -> Result<UpstreamRt, ClientTlsError> {
        Ok(UpstreamRt {
            index,
            book,
            tls: client_tls(config)?,
            config: config.clone(),
            slots: Arc::new(Semaphore::new(config.max_connections)),
            idle: Mutex::new(Vec::new()),
            breaker: Arc::new(Mutex::new(Breaker::default())),
            telemetry,
        })
    }

    /// Publish the state the breaker holds: down while it is open or while the last probe
    /// failed (module doc), with the failure that made it so; up otherwise. Published under
    /// the breaker's lock, so two changes in quick succession reach the board in their order.
    fn publish(&self) {
        let b = self.breaker();
        let open = b.down_until.is_some();
        let up = !open && !b.unreachable;
        let error = b.last_failure.as_deref().filter(|_| !up);
        let telemetry = &self.telemetry;
        telemetry
            .upstreams
            .set_state(self.name(), up, open, error, unix_now(), &telemetry.metrics);
    }

    /// The capability probe's outcome (`Some`: its failure). A connection-level failure
    /// ([`ClientError::is_upstream_fault`]) while the breaker is closed shows the upstream
    /// down, the breaker left closed; a connection that reached it shows it up again unless
    /// its breaker is open.
    pub fn probed(&self, failure: Option<&ClientError>) {
        let changed = {
            let mut b = self.breaker();
            match failure {
                Some(f) if !f.is_upstream_fault() => false,
                Some(_) if b.down_until.is_some() => false,
                Some(f) => {
                    b.last_failure = Some(f.to_string());
                    b.unreachable = true;
                    true
                }
                None => std::mem::take(&mut b.unreachable),
            }
        };
        if changed {
            if failure.is_none() {
                info!(upstream = %self.name(), "upstream reached again after a failed probe");
            }
            self.publish();
        }
    }

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

    /// May a delivery use this upstream now? `Some` (hand it to [`UpstreamRt::failed`] if the
    /// delivery fails) takes the probe slot when the back-off has just ended.
    pub fn available(&self, now: Instant) -> Option<Pass> {
        self.breaker().try_pass(now, self.config.backoff)
    }

    /// Why the breaker is open and how long it stays so (None: it is closed).
    pub fn down(&self) -> Option<(Instant, String)> {
        let b = self.breaker();
        Some((b.down_until?, b.last_failure.clone().unwrap_or_default()))
    }

    /// Record a connection-level failure of a delivery that passed the breaker with `pass`.
    /// Only the upstream's own failures count ([`ClientError::is_upstream_fault`]): a stale
    /// pooled connection or an unreadable spool file leaves the breaker as it is.
    pub fn failed(&self, now: Instant, failure: &ClientError, pass: Pass) {
        if !failure.is_upstream_fault() {
            return;
        }
        let tripped = {
            let mut b = self.breaker();
            b.last_failure = Some(failure.to_string());
            b.trip(now, self.config.backoff, pass)
        };
        match tripped {
            Trip::Opened { backoff, failures } => {
                warn!(
                    rule = "upstream_down", upstream = %self.name(), error = %failure, backoff_secs = backoff.as_secs(),
                    failed_probes = failures, "upstream marked down"
                );
                self.publish();
            }
            Trip::Stale { remaining } => info!(
                upstream = %self.name(), error = %failure, down_for_secs = remaining.as_secs(),
                "delivery failed after the upstream was already marked down (or up again); back-off unchanged"
            ),
        }
    }

    /// Record a completed conversation: the breaker closes, and an upstream only the probe
    /// found down is up again too.
    pub fn succeeded(&self) {
        let (was_open, was_down) = self.breaker().close();
        if was_open {
            info!(upstream = %self.name(), "upstream is up again");
        } else if was_down {
            info!(upstream = %self.name(), "upstream reached again after a failed probe");
        }
        if was_down {
            self.publish();
        }
    }

    /// Close the breaker (operator `queue retry`), and forget a failed probe: the next
    /// delivery finds out.
    pub fn reset_breaker(&self) {
        let (was_open, was_down) = self.breaker().close();
        if was_open {
            info!(upstream = %self.name(), "circuit breaker reset by queue retry");
        }
        if was_down {
            self.publish();
        }
    }

    /// A connection: an idle one from the pool, or a new one once a slot is free.
    ///
    /// # Errors
    /// What [`UpstreamConnection::open`] returns, after the plaintext retry of an
    /// opportunistic upstream whose TLS handshake failed; [`ClientError::ShuttingDown`].
    pub async fn lease(&self, hostname: &str) -> Result<Lease, ClientError> {
        if let Some(lease) = self.take_idle() {
            return Ok(lease);
        }
        let permit = self
            .slots
            .clone()
            .acquire_owned()
            .await
            .map_err(|_| ClientError::ShuttingDown)?;
        // A connection may have come back while we waited.
        if let Some(lease) = self.take_idle() {
            return Ok(lease);
        }
        let tls = self.tls.as_ref();
        let conn = match UpstreamConnection::open(&self.config, tls, hostname, true).await {
            Ok(conn) => conn,
            Err(f) if self.config.tls == UpstreamTls::Opportunistic && f.is_tls_handshake() => {
                warn!(
                    upstream = %self.name(), error = %f,
                    "opportunistic TLS failed; retrying this upstream in plaintext"
                );
                UpstreamConnection::open(&self.config, None, hostname, false).await?
            }
            Err(f) => return Err(f),
        };
        self.book.record(self.index, conn.capabilities());
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

    /// The most recent idle connection that is still fresh and whose EHLO matches the
    /// capabilities last learnt for this upstream. A connection opened before the upstream
    /// changed its extensions would carry out a transaction under other rules than those the
    /// message was accepted by at RCPT, and fail it permanently (a bounce): it is closed
    /// instead, and the caller opens a new one.
    fn take_idle(&self) -> Option<Lease> {
        let current = self.book.get(self.index);
        let mut idle = self.idle();
        while let Some(p) = idle.pop() {
            if p.conn.idle_since.elapsed() < IDLE_TIMEOUT && p.conn.capabilities() == current {
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

/// A delivery's passage through the breaker: the breaker period it started in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Pass {
    period: u64,
}

/// What a failure did to the breaker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Trip {
    /// The first failure of its period: the breaker is open for `backoff`, after `failures`
    /// consecutive failed periods.
    Opened { backoff: Duration, failures: u32 },
    /// The delivery passed in an earlier period: a concurrent delivery's failure already
    /// opened the breaker for it, or a success closed it since. Nothing changes; it stays
    /// open for `remaining` (zero when closed).
    Stale { remaining: Duration },
}

/// Circuit breaker state of one upstream.
#[derive(Debug, Default)]
struct Breaker {
    /// Consecutive failed periods (each one back-off step).
    failures: u32,
    /// Down until then; `None`: closed.
    down_until: Option<Instant>,
    /// The current period: a new one starts when the breaker opens and when a probe passes.
    period: u64,
    /// The failure that opened it (or that made the probe fail), for the queue's `last_error`
    /// and the status.
    last_failure: Option<String>,
    /// The capability probe failed at the connection level and nothing reached the upstream
    /// since: down on the board, the breaker itself closed (module doc).
    unreachable: bool,
}

impl Breaker {
    fn backoff(&self, base: Duration) -> Duration {
        let factor = 1u32 << self.failures.saturating_sub(1).min(4);
        base * factor.min(MAX_BACKOFF_FACTOR)
    }

    fn try_pass(&mut self, now: Instant, base: Duration) -> Option<Pass> {
        match self.down_until {
            None => Some(Pass {
                period: self.period,
            }),
            Some(until) if now >= until => {
                // Half-open: this caller probes, in a period of its own; others wait for
                // another back-off.
                self.period += 1;
                self.down_until = Some(now + self.backoff(base));
                Some(Pass {
                    period: self.period,
                })
            }
            Some(_) => None,
        }
    }

    fn trip(&mut self, now: Instant, base: Duration, pass: Pass) -> Trip {
        if pass.period != self.period {
            return Trip::Stale {
                remaining: self
                    .down_until
                    .map_or(Duration::ZERO, |u| u.saturating_duration_since(now)),
            };
        }
        self.period += 1;
        self.failures = self.failures.saturating_add(1);
        let backoff = self.backoff(base);
        self.down_until = Some(now + backoff);
        Trip::Opened {
            backoff,
            failures: self.failures,
        }
    }

    /// Close, and forget a failed probe: (was open, was down: open or probe failed). A new
    /// period starts, so failures of deliveries that passed before cannot reopen it without a
    /// step of their own being counted afresh.
    fn close(&mut self) -> (bool, bool) {
        let was_open = self.down_until.is_some();
        if was_open {
            self.period += 1;
        }
        let was_down = was_open || self.unreachable;
        self.failures = 0;
        self.down_until = None;
        self.unreachable = false;
        (was_open, was_down)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn telemetry() -> Arc<Telemetry> {
        Arc::new(Telemetry::new("relay.test"))
    }

    fn opened(backoff: u64, failures: u32) -> Trip {
        Trip::Opened {
            backoff: Duration::from_secs(backoff),
            failures,
        }
    }

    #[test]
    fn breaker_backs_off_doubling_and_probes_once() {
        let base = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut b = Breaker::default();
        let pass = b.try_pass(t0, base).unwrap();
        assert_eq!(b.trip(t0, base, pass), opened(30, 1));
        assert!(b.try_pass(t0 + Duration::from_secs(29), base).is_none());
        // Back-off over: one probe passes, the next caller does not.
        let t1 = t0 + Duration::from_secs(30);
        let probe = b.try_pass(t1, base).unwrap();
        assert!(b.try_pass(t1, base).is_none());
        assert_eq!(b.trip(t1, base, probe), opened(60, 2));
        let mut t = t1;
        for _ in 0..10 {
            t += b.backoff(base);
            let probe = b.try_pass(t, base).unwrap();
            b.trip(t, base, probe);
        }
        assert_eq!(b.backoff(base), base * MAX_BACKOFF_FACTOR);
        assert!(b.close().0);
        assert!(b.try_pass(t, base).is_some());
        assert!(!b.close().0);
    }

    /// Six queued messages started together while the breaker was closed and all failed
    /// within milliseconds: one back-off step (30 s), not six (480 s).
    #[test]
    fn concurrent_failures_of_one_period_double_the_backoff_at_most_once() {
        let base = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut b = Breaker::default();
        let passes: Vec<Pass> = (0..6).map(|_| b.try_pass(t0, base).unwrap()).collect();
        let trips: Vec<Trip> = passes
            .iter()
            .enumerate()
            .map(|(i, &p)| b.trip(t0 + Duration::from_millis(3 * i as u64), base, p))
            .collect();
        assert_eq!(trips[0], opened(30, 1));
        for (i, t) in trips.iter().enumerate().skip(1) {
            assert_eq!(
                *t,
                Trip::Stale {
                    remaining: Duration::from_secs(30) - Duration::from_millis(3 * i as u64)
                }
            );
        }
        assert_eq!(b.backoff(base), base);
        assert!(b.try_pass(t0 + Duration::from_secs(29), base).is_none());

        // The probe after the back-off fails: the second step (60 s). A straggler from the
        // first period failing after the probe passed changes nothing.
        let t1 = t0 + Duration::from_secs(30);
        let probe = b.try_pass(t1, base).unwrap();
        assert!(matches!(b.trip(t1, base, passes[0]), Trip::Stale { .. }));
        assert_eq!(b.trip(t1, base, probe), opened(60, 2));
        assert_eq!(
            b.trip(t1, base, probe),
            Trip::Stale {
                remaining: Duration::from_secs(60)
            }
        );
    }

    /// A stale pooled connection, an unreadable spool file or shutdown says nothing about the
    /// upstream: the breaker stays closed. A refused connection opens it.
    #[test]
    fn only_the_upstreams_own_failures_open_its_breaker() {
        let config = Config::embedded_default();
        let book = Arc::new(CapabilityBook::load(&config.upstreams, None));
        let up = UpstreamRt::new(0, &config.upstreams[0], book, telemetry()).unwrap();
        let io = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let not_its_fault = [
            ClientError::Stale(Box::new(ClientError::Closed {
                stage: super::super::error::UpstreamStage::Rset,
            })),
            ClientError::Local {
                stage: super::super::error::UpstreamStage::Data,
                source: std::io::Error::other("EIO"),
            },
            ClientError::ShuttingDown,
        ];
        for failure in &not_its_fault {
            let pass = up.available(Instant::now()).unwrap();
            up.failed(Instant::now(), failure, pass);
            assert!(up.down().is_none(), "{failure} opened the breaker");
        }
        let pass = up.available(Instant::now()).unwrap();
        up.failed(Instant::now(), &ClientError::Connect(io()), pass);
        assert!(up.down().is_some());
        assert!(up.available(Instant::now()).is_none());
    }

    /// Renewed for a reload, an unchanged upstream shares its breaker and its connection slots
    /// with its predecessor (wherever it now stands in the list), so attempts still in flight
    /// on the old one and new ones together stay within `max_connections`; a changed one
    /// shares nothing.
    #[test]
    fn a_renewed_upstream_keeps_breaker_and_slots_only_when_its_entry_is_unchanged() {
        let config = Config::embedded_default();
        let book = || Arc::new(CapabilityBook::load(&config.upstreams, None));
        let old = Upstreams::new(&config, book(), telemetry()).unwrap();
        let mut added = config.upstreams[0].clone();
        added.name = "added".into();
        let mut changed = config.upstreams[0].clone();
        changed.max_connections += 1;
        let mut next = config.clone();
        next.upstreams = vec![added, config.upstreams[0].clone()];
        let new = Upstreams::renew(&next, book(), Some(&old), telemetry()).unwrap();
        assert!(Arc::ptr_eq(&new.get(1).slots, &old.get(0).slots));
        assert!(Arc::ptr_eq(&new.get(1).breaker, &old.get(0).breaker));
        assert!(!Arc::ptr_eq(&new.get(0).slots, &old.get(0).slots));
        assert!(new.configured_as(&next.upstreams) && !old.configured_as(&next.upstreams));

        next.upstreams = vec![changed];
        let new = Upstreams::renew(&next, book(), Some(&old), telemetry()).unwrap();
        assert!(!Arc::ptr_eq(&new.get(0).slots, &old.get(0).slots));
        assert!(!Arc::ptr_eq(&new.get(0).breaker, &old.get(0).breaker));
    }

    /// A delivery that passed before a close and fails after it changes nothing: a success
    /// closed the breaker since it started.
    #[test]
    fn a_failure_from_before_a_close_does_not_count_against_the_next_period() {
        let base = Duration::from_secs(30);
        let t0 = Instant::now();
        let mut b = Breaker::default();
        let early = b.try_pass(t0, base).unwrap();
        let other = b.try_pass(t0, base).unwrap();
        assert_eq!(b.trip(t0, base, other), opened(30, 1));
        assert!(b.close().0);
        assert!(matches!(b.trip(t0, base, early), Trip::Stale { .. }));
        assert!(b.try_pass(t0, base).is_some());
    }
}
