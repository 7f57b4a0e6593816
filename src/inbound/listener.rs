//! Accept loop of one listener: connection caps, then one task per session (whose driver runs
//! the connect stage), instrumented with a `session` span that gives every log line of the
//! session its listener and peer.
//!
//! When a cap is reached, or the listeners are paused (`portcullis listeners pause`), the
//! client is told `421` and closed by a short task of its own; the accept loop itself never
//! waits on a client.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::{Instrument, info, info_span, warn};

use super::Runtime;
use super::connection::{SessionDriver, Shared};
use super::pressure::{ConnectionCounter, Full};
use super::record::{self, Client, Refused};
use crate::config::Listener;
use crate::observe::EventKind;
use crate::smtp::{Reply, reply};

/// How long a client refused at connect with a `421` is given to read it.
pub const REFUSAL_WRITE_TIMEOUT: Duration = Duration::from_secs(5);

/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// Everything one accept loop needs.
pub struct ListenerTask {
    /// The listener as configured at start (binds need a restart to change).
    pub config: Listener,
    pub socket: TcpListener,
    /// The current configuration snapshot; replaced on reload.
    pub runtime: Arc<ArcSwap<Runtime>>,
    pub shared: Shared,
    pub counter: ConnectionCounter,
    pub tracker: TaskTracker,
}

impl ListenerTask {
    /// Accept until shutdown.
    pub async fn run(self) {
        info!(listener = %self.config.name, bind = %self.config.bind, "listening");
        loop {
            let accepted = tokio::select! {
                r = self.socket.accept() => r,
                _ = self.shared.shutdown.cancelled() => break,
            };
            let (tcp, peer) = match accepted {
                Ok(a) => a,
                Err(e) => {
                    warn!(listener = %self.config.name, error = %e, "accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            };
            let _ = tcp.set_nodelay(true);
            // The peer last, so a line reads `…peer=192.0.2.1}: session end …`. The
            // refusals at connect carry it too.
            let span = info_span!("session", listener = %self.config.name,
                client_port = peer.port(), peer = %peer.ip());
            if self.shared.telemetry.gate.paused() {
                // `portcullis listeners pause` (delivery is not affected); at info level:
                // the operator asked for it.
                let (paused, rule) = AtAccept::Paused.refusal();
                let refused = Refused::rule(rule, &paused);
                span.in_scope(|| self.refuse_at_connect(tcp, peer, refused));
                continue;
            }
            let runtime = self.runtime.load_full();
            let listener = self.current(&runtime);
            let limits = &runtime.config.limits;
            match self.counter.admit(
                peer.ip(),
                limits.max_connections,
                limits.max_connections_per_ip,
                limits.stress_connections,
            ) {
                Ok(slot) => {
                    let shared = self.shared.clone();
                    self.tracker.spawn(
                        async move {
                            let _slot = slot;
                            SessionDriver::new(runtime, listener, shared, peer)
                                .run(tcp)
                                .await;
                        }
                        .instrument(span),
                    );
                }
                Err(full) => {
                    let (reply, rule) = AtAccept::Full(full).refusal();
                    let full = Refused::rule(rule, &reply).warning();
                    span.in_scope(|| self.refuse_at_connect(tcp, peer, full));
                }
            }
        }
        info!(listener = %self.config.name, "stopped listening");
    }

    /// Refuse `peer` before any session (the listeners are paused, or a connection cap is
    /// reached): log and record `refused` (in the caller's span), then send its `421` and
    /// close, by a short task of its own (closed at once if `refused` has no reply).
    fn refuse_at_connect(&self, tcp: TcpStream, peer: SocketAddr, refused: Refused<'_>) {
        let client = Client {
            listener: &self.config.name,
            ip: peer.ip(),
            tls: None,
            login: None,
        };
        let refused = refused.saying("rejected at connect");
        record::refused(
            &self.shared.telemetry,
            client.event(EventKind::Refused),
            &refused,
        );
        if let Some(reply) = refused.reply.cloned() {
            self.tracker.spawn(async move { refuse(tcp, &reply).await });
        }
    }

    /// This listener as `runtime` configures it: a reload may have changed its lists and
    /// flags (not its bind).
    fn current(&self, runtime: &Runtime) -> Listener {
        runtime
            .config
            .listeners
            .iter()
            .find(|l| l.name == self.config.name)
            .cloned()
            .unwrap_or_else(|| self.config.clone())
    }
}

/// Tell a client it cannot be served now (a `421`: RFC 5321 §3.8, the server closes the
/// channel), then close; a client that does not read it within [`REFUSAL_WRITE_TIMEOUT`] is
/// closed anyway. Used for the connection caps here and for a `421` of the connect stage
/// (the connection rate) in the session driver.
pub(super) async fn refuse<S: AsyncWrite + Unpin>(mut io: S, reply: &Reply) {
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(REFUSAL_WRITE_TIMEOUT, async {
        io.write_all(&out).await?;
        io.shutdown().await
    })
    .await;
}

/// Why the accept loop refuses a connection before any session starts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AtAccept {
    /// `portcullis listeners pause`.
    Paused,
    /// A connection cap is reached.
    Full(Full),
}

impl AtAccept {
    /// Every refusal at accept, for [`AtAccept::from_rule`].
    const ALL: [AtAccept; 3] = [
        AtAccept::Paused,
        AtAccept::Full(Full::Total),
        AtAccept::Full(Full::PerIp),
    ];

    /// The reply the client gets (then the connection is closed) and the rule logged.
    pub fn refusal(self) -> (Reply, &'static str) {
        match self {
            AtAccept::Paused => (reply::PAUSED, "paused"),
            AtAccept::Full(Full::Total) => (reply::TOO_MANY_CONNECTIONS, "max_connections"),
            AtAccept::Full(Full::PerIp) => (reply::TOO_MANY_FROM_IP, "max_connections_per_ip"),
        }
    }

    /// The refusal whose rule is `rule`, if any.
    pub fn from_rule(rule: &str) -> Option<AtAccept> {
        AtAccept::ALL.into_iter().find(|a| a.refusal().1 == rule)
    }
}
