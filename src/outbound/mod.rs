//! Upstream SMTP client and the sending of delivery attempts.
//!
//! - [`client`]: one SMTP connection to an upstream (EHLO/HELO, STARTTLS, AUTH, pipelined
//!   transactions, dot-stuffing, per-recipient outcomes).
//! - [`error`]: what can go wrong with an upstream, by kind ([`error::ClientError`]); the
//!   caller's behaviour (stale retry, plaintext retry, circuit breaker) depends on the kind.
//! - [`tls`]: the rustls client configuration of each upstream.
//! - [`upstream`]: routing by recipient domain, failover order, circuit breakers and
//!   connection pools.
//! - [`events`]: the telemetry events of a transaction, and the upstream's own id read
//!   from its reply.
//! - [`deliver`]: the sending of one delivery attempt (the queue manager's
//!   [`Courier`](crate::queue::attempt::Courier)): reports per-recipient results, writes
//!   nothing.
//!
//! [`start`] wires them to the queue manager ([`crate::queue::manager`]), which decides when
//! each message is due, records outcomes and queues bounces: the returned sender is given to
//! the inbound side, which sends each message as soon as it is committed (with its bytes when
//! small, so the first attempt does not read the file back).

#![warn(clippy::too_many_lines)]

pub mod client;
pub mod deliver;
pub mod error;
pub mod events;

pub mod tls;
pub mod upstream;

#[cfg(test)]
mod wire_tests;

use std::sync::Arc;

use arc_swap::ArcSwap;
use tokio::sync::mpsc::{self, UnboundedSender};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use crate::config::Config;
use crate::queue::Spool;
use crate::queue::manager::Manager;

use crate::queue::Committed;
pub use deliver::Context;
pub use tls::ClientTlsError;

/// Delivery running in the background.
pub struct Delivery {
    /// Send each committed message here to have it delivered at once.
    pub wake: UnboundedSender<Committed>,
    /// The queue manager task; ends after `shutdown` is cancelled.
    pub manager: JoinHandle<()>,
    /// Attempts in flight.
    pub tracker: TaskTracker,
    /// The delivery context new attempts use; [`Delivery::reload`] swaps it.
    pub context: Arc<ArcSwap<Context>>,
    /// What each upstream can carry, for the inbound checks (read-only).
    pub capabilities: crate::routes::RouteCapabilities,
}

impl Delivery {
    /// Apply a reloaded configuration's `[[upstreams]]`, `[queue]` and host name: attempts
    /// started from now on use the new routes, upstreams and retry schedule, those in flight
    /// finish on the context they started with; the inbound checks at RCPT see the new routing
    /// table at once.
    ///
    /// When `[[upstreams]]` and the host name are unchanged and no upstream names a `ca`
    /// bundle, the running upstreams (routing table, capabilities, breakers, pools) carry on as
    /// they are and only `[queue]` changes.
    /// Otherwise the upstreams are built anew: an unchanged entry keeps its circuit breaker and
    /// connection slots ([`upstream::Upstreams::renew`]), every other starts with a closed
    /// breaker; the new upstreams are probed in the background for their capabilities (until
    /// then the ones the spool file recorded for the same name and address hold), then the
    /// previous upstreams' idle connections are closed.
    ///
    /// # Errors
    /// [`ClientTlsError`]: an upstream's TLS client configuration cannot be built; nothing is
    /// changed then.
    pub fn reload(&self, config: &Config, spool: &Spool) -> Result<(), ClientTlsError> {
        let old = self.context.load_full();
        // An upstream with a `ca` bundle gets a new TLS client even when its entry is
        // unchanged: the file may have been replaced under the same path.
        let same_upstreams = old.hostname == config.server.hostname
            && old.upstreams.configured_as(&config.upstreams)
            && config.upstreams.iter().all(|u| u.ca.is_none());
        if same_upstreams {
            self.context.store(Arc::new(Context {
                upstreams: old.upstreams.clone(),
                hostname: old.hostname.clone(),
                queue: config.queue.clone(),
                telemetry: old.telemetry.clone(),
            }));
            return Ok(());
        }
        let book = Arc::new(crate::routes::CapabilityBook::load(
            &config.upstreams,
            Some(spool.root()),
        ));
        let upstreams = upstream::Upstreams::renew(
            config,
            book.clone(),
            Some(&old.upstreams),
            old.telemetry.clone(),
        )?;
        let context = Arc::new(Context {
            upstreams: Arc::new(upstreams),
            hostname: config.server.hostname.clone(),
            queue: config.queue.clone(),
            telemetry: old.telemetry.clone(),
        });
        self.context.store(context.clone());
        self.capabilities.replace(book);
        // The status lists the upstreams configured now, each with its breaker as it is.
        context.upstreams.publish_states(&context.telemetry);
        // Not in `tracker`: the probe is no delivery, and shutdown does not wait for it.
        tokio::spawn(async move {
            context
                .upstreams
                .probe_all(&context.hostname, PROBE_WAIT)
                .await;
            old.upstreams.close_all().await;
        });
        Ok(())
    }
}

/// How long a reload's capability probe of the new upstreams may take.
const PROBE_WAIT: std::time::Duration = std::time::Duration::from_secs(5);

/// Start the queue manager over `spool` with `config`'s upstreams and queue policy, recording
/// what happens in `telemetry`; it holds the queued mail of the logins `containment`
/// suspends, and loads the queue once `recovered` is true (the startup recovery of `queue/`
/// done).
pub fn start(
    config: &Config,
    spool: Spool,
    shutdown: CancellationToken,
    telemetry: Arc<crate::observe::Telemetry>,
    containment: Arc<crate::policy::containment::Containment>,
    recovered: tokio::sync::watch::Receiver<bool>,
) -> Result<Delivery, ClientTlsError> {
    let (wake, incoming) = mpsc::unbounded_channel();
    let book = Arc::new(crate::routes::CapabilityBook::load(
        &config.upstreams,
        Some(spool.root()),
    ));
    let upstreams = upstream::Upstreams::new(config, book.clone(), telemetry.clone())?;
    upstreams.publish_states(&telemetry);
    let context = Arc::new(ArcSwap::from_pointee(Context {
        upstreams: Arc::new(upstreams),
        hostname: config.server.hostname.clone(),
        queue: config.queue.clone(),
        telemetry: telemetry.clone(),
    }));
    let tracker = TaskTracker::new();
    let manager = tokio::spawn(
        Manager::new(spool, context.clone(), incoming, shutdown, tracker.clone())
            .with_telemetry(telemetry)
            .with_containment(containment)
            .after_recovery(recovered)
            .run(),
    );
    Ok(Delivery {
        wake,
        manager,
        tracker,
        context,
        capabilities: crate::routes::RouteCapabilities::new(book),
    })
}

#[cfg(test)]
mod tests {
    use std::time::{Duration, Instant};

    use super::*;
    use crate::config::{Upstream, UpstreamTls};
    use crate::outbound::error::ClientError;

    /// An upstream on a loopback port nothing listens on.
    fn upstream(name: &str) -> Upstream {
        let mut up = Config::embedded_default().upstreams[0].clone();
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap();
        up.name = name.into();
        up.address = format!("127.0.0.1:{port}");
        up.tls = UpstreamTls::None;
        up
    }

    fn config(upstreams: &[&Upstream], retry_secs: u64) -> Config {
        let mut config = Config::embedded_default();
        config.upstreams = upstreams.iter().map(|u| (*u).clone()).collect();
        config.queue.retry = vec![Duration::from_secs(retry_secs)];
        config
    }

    /// Open the breaker of upstream `index` of the running context.
    fn trip(delivery: &Delivery, index: usize) {
        let up = delivery.context.load().upstreams.get(index).clone();
        let pass = up.available(Instant::now()).unwrap();
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        up.failed(Instant::now(), &ClientError::Connect(refused), pass);
    }

    /// Delivery started over a fresh spool with upstream `a` alone.
    struct Started {
        _dir: tempfile::TempDir,
        spool: Spool,
        shutdown: CancellationToken,
        telemetry: Arc<crate::observe::Telemetry>,
        delivery: Delivery,
    }

    fn started(a: &Upstream) -> Started {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let shutdown = CancellationToken::new();
        let telemetry = Arc::new(crate::observe::Telemetry::new("relay.test"));
        let delivery = start(
            &config(&[a], 60),
            spool.clone(),
            shutdown.clone(),
            telemetry.clone(),
            Arc::new(
                crate::policy::containment::Containment::open(
                    spool.clone(),
                    telemetry.clone(),
                    None,
                )
                .unwrap(),
            ),
            tokio::sync::watch::channel(true).1,
        )
        .unwrap();
        Started {
            _dir: dir,
            spool,
            shutdown,
            telemetry,
            delivery,
        }
    }

    fn down(delivery: &Delivery, index: usize) -> bool {
        delivery
            .context
            .load()
            .upstreams
            .get(index)
            .down()
            .is_some()
    }

    #[tokio::test]
    async fn a_reload_keeps_the_breakers_and_pools_of_unchanged_upstreams() {
        let (a, b) = (upstream("a"), upstream("b"));
        let Started {
            _dir,
            spool,
            shutdown,
            telemetry,
            delivery,
        } = started(&a);
        // What the status shows: (name, up) of each upstream.
        let board = || -> Vec<(String, bool)> {
            let states = telemetry.upstreams.snapshot(crate::envelope::unix_now());
            states.into_iter().map(|s| (s.name, s.up)).collect()
        };
        trip(&delivery, 0);
        let running = delivery.context.load().upstreams.clone();

        // [queue] only: the same upstreams carry on, the new retry schedule applies.
        delivery.reload(&config(&[&a], 5), &spool).unwrap();
        let now = delivery.context.load_full();
        assert!(Arc::ptr_eq(&now.upstreams, &running));
        assert_eq!(now.queue.retry, [Duration::from_secs(5)]);
        assert!(down(&delivery, 0));

        // An upstream added in front: `a` moves to index 1 and is still known to be down.
        delivery.reload(&config(&[&b, &a], 5), &spool).unwrap();
        assert!(!Arc::ptr_eq(&delivery.context.load().upstreams, &running));
        assert_eq!(delivery.context.load().upstreams.get(1).name(), "a");
        assert!(!down(&delivery, 0) && down(&delivery, 1));
        assert_eq!(board(), [("a".into(), false), ("b".into(), true)]);

        // `a` changed (another address): a new upstream, with a closed breaker.
        let moved = Upstream {
            address: upstream("a").address,
            ..a.clone()
        };
        delivery.reload(&config(&[&b, &moved], 5), &spool).unwrap();
        assert!(!down(&delivery, 1));
        assert_eq!(board(), [("a".into(), true), ("b".into(), true)]);
        // `b` alone: `a` is no longer listed.
        delivery.reload(&config(&[&b], 5), &spool).unwrap();
        assert_eq!(board(), [("b".into(), true)]);

        shutdown.cancel();
        delivery.manager.await.unwrap();
    }

    /// The capability probe leaves the breaker alone, but an upstream it could not reach is
    /// down on the board and in the gauges (breaker closed) until a connection reaches it;
    /// a reload keeps that for an unchanged entry, a delivery failure opens the breaker, and
    /// a success or `queue retry` brings it up.
    #[tokio::test]
    async fn a_failed_probe_shows_the_upstream_down_with_its_breaker_closed_until_reached() {
        let (a, b) = (upstream("a"), upstream("b"));
        let Started {
            _dir,
            spool,
            shutdown,
            telemetry,
            delivery,
        } = started(&a);
        // (up, breaker open, last error) on the board, and the two gauges, of `a`.
        let board = || {
            let states = telemetry.upstreams.snapshot(crate::envelope::unix_now());
            let s = states.into_iter().find(|s| s.name == "a").unwrap();
            let label = crate::observe::metrics::UpstreamLabel {
                upstream: "a".into(),
            };
            let m = &telemetry.metrics;
            let gauges = (
                m.upstream_up.get_or_create(&label).get(),
                m.upstream_breaker_open.get_or_create(&label).get(),
            );
            ((s.up, s.breaker_open, s.last_error), gauges)
        };
        let probe = || async {
            let upstreams = delivery.context.load_full().upstreams.clone();
            upstreams
                .probe_all("relay.test", Duration::from_secs(5))
                .await;
        };
        assert_eq!(board(), ((true, false, None), (1, 0)));

        probe().await;
        let ((up, open, error), gauges) = board();
        assert_eq!((up, open, gauges), (false, false, (0, 0)));
        assert!(error.unwrap().contains("refused"));
        assert!(!down(&delivery, 0), "the probe opened the breaker");

        // Renewed by a reload with `a` unchanged: still down; its successor shares that.
        delivery.reload(&config(&[&b, &a], 60), &spool).unwrap();
        assert!(!board().0.0);
        assert_eq!(delivery.context.load().upstreams.get(1).name(), "a");
        // A delivery that fails there opens the breaker; `queue retry` closes it: up.
        trip(&delivery, 1);
        assert!(!board().0.0);
        assert_eq!((board().0.1, board().1), (true, (0, 1)));
        delivery.context.load().upstreams.reset_all();
        assert_eq!(board(), ((true, false, board().0.2), (1, 0)));

        // Down again by a probe; a delivery that completes brings it up, breaker never open.
        probe().await;
        assert_eq!(board().1, (0, 0));
        delivery.context.load().upstreams.get(1).succeeded();
        assert_eq!(board().1, (1, 0));
        assert!(board().0.0);

        // Down again; a probe that reaches it brings it up.
        probe().await;
        assert_eq!(board().1, (0, 0));
        delivery.context.load().upstreams.get(1).probed(None);
        assert_eq!(board().1, (1, 0));

        shutdown.cancel();
        delivery.manager.await.unwrap();
    }
}
