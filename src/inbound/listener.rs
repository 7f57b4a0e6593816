//! Accept loop of one listener: connection caps, then one task per session (whose driver runs
//! the connect stage), instrumented with a `session` span that gives every log line of the
//! session its listener and peer.
//!
//! When a cap is reached, or the listeners are paused (`portcullis listeners pause`), the
//! client is told `421` and closed by a short task of its own; the accept loop itself never
//! waits on a client.
//!
//! A connection from one of the listener's `trusted_proxies` counts only towards
//! `max_connections` at accept; its session task first reads the PROXY header
//! ([`super::proxy`]) and only then counts the client it names towards
//! `max_connections_per_ip` (a slow proxy never holds up the accept loop). From there on that
//! client is the session's peer for every rule, log line (the span's `peer`; the proxy is its
//! `proxy` field), event and `Received:` field. A `LOCAL` header (or one naming no TCP
//! client) makes a session from the proxy itself; a connection that closes before sending a
//! byte (a TCP health check) is not logged above debug; a missing, malformed, oversized or
//! late header closes the connection (`rule=proxy_header`). A PROXY line from any other peer
//! is an SMTP command like any other (`500`), never believed.

use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::io::{AsyncWrite, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::task::TaskTracker;
use tracing::field::{Empty, display};
use tracing::{Instrument, Span, debug, info, info_span, warn};

use super::Runtime;
use super::connection::{Io, SessionDriver, Shared};
use super::pressure::{ConnectionCounter, Full, Slot};
use super::proxy::{self, HeaderError, Origin};
use super::record::{self, Client, Refused};
use crate::config::{Limits, Listener};
use crate::observe::EventKind;
use crate::policy::Detail;
use crate::policy::access::{contains, normalize};
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
    pub shared: Arc<Shared>,
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
            self.admit(tcp, peer);
        }
        info!(listener = %self.config.name, "stopped listening");
    }

    /// Admit the connection from `peer` (or refuse it) and start its session task, in a
    /// `session` span that gives every line of the session its listener and peer (and, from a
    /// trusted proxy, the proxy; the peer is then the client its header names).
    fn admit(&self, tcp: TcpStream, peer: SocketAddr) {
        // The peer last, so a line reads `…peer=192.0.2.1}: session end …`. The refusals at
        // connect carry it too. Recorded once known: after the PROXY header from a proxy.
        let span = info_span!("session", listener = %self.config.name, proxy = Empty,
            client_port = Empty, peer = Empty);
        let runtime = self.runtime.load_full();
        let listener = self.current(&runtime);
        let proxied = from_proxy(&listener, peer.ip());
        if proxied {
            span.record("proxy", display(peer.ip()));
        } else {
            record_peer(&span, peer);
        }
        if self.shared.telemetry.gate.paused() {
            // `portcullis listeners pause` (delivery is not affected); at info level:
            // the operator asked for it.
            let (paused, rule) = AtAccept::Paused.refusal();
            let refused = Refused::rule(rule, &paused);
            span.in_scope(|| self.refuse_at_connect(tcp, peer, refused));
            return;
        }
        match take_slot(&self.counter, &runtime.config.limits, peer.ip(), proxied) {
            Ok(slot) => {
                let accepted = Accepted {
                    runtime,
                    listener,
                    shared: self.shared.clone(),
                    peer,
                    slot,
                };
                self.tracker
                    .spawn(accepted.serve(tcp, proxied).instrument(span));
            }
            Err(full) => {
                let (reply, rule) = AtAccept::Full(full).refusal();
                let full = Refused::rule(rule, &reply).warning();
                span.in_scope(|| self.refuse_at_connect(tcp, peer, full));
            }
        }
    }

    /// Refuse `peer` before any session (the listeners are paused, or a connection cap is
    /// reached): log and record `refused` (in the caller's span), then send its `421` and
    /// close, by a short task of its own (closed at once if `refused` has no reply).
    fn refuse_at_connect(&self, tcp: TcpStream, peer: SocketAddr, refused: Refused<'_>) {
        let refused = refused.saying("rejected at connect");
        record_at_connect(&self.shared, &self.config.name, peer, &refused);
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

/// Log and record a refusal of `peer` on `listener` before its session started (in the
/// caller's span).
fn record_at_connect(shared: &Shared, listener: &str, peer: SocketAddr, refused: &Refused<'_>) {
    let client = Client {
        listener,
        ip: peer.ip(),
        tls: None,
        login: None,
    };
    record::refused(&shared.telemetry, client.event(EventKind::Refused), refused);
}

/// Whether `peer` is one of `listener`'s `trusted_proxies`: its connections must begin with
/// a PROXY header.
pub(super) fn from_proxy(listener: &Listener, peer: IpAddr) -> bool {
    contains(&listener.trusted_proxies, normalize(peer))
}

/// Take the connection slot of a connection from `peer` under `limits`: counted towards
/// both caps, or only towards `max_connections` when it comes from a trusted proxy
/// (`proxied`; its client is counted once its header names it, [`Slot::claim`]).
///
/// # Errors
/// The cap that refuses it.
pub(super) fn take_slot(
    counter: &ConnectionCounter,
    limits: &Limits,
    peer: IpAddr,
    proxied: bool,
) -> Result<Slot, Full> {
    let (total, stress_at) = (limits.max_connections, limits.stress_connections);
    if proxied {
        counter.admit_proxied(total, stress_at)
    } else {
        counter.admit(peer, total, limits.max_connections_per_ip, stress_at)
    }
}

/// Record the session's client in its span (`client_port`, then `peer`).
fn record_peer(span: &Span, client: SocketAddr) {
    span.record("client_port", client.port());
    span.record("peer", display(client.ip()));
}

/// One admitted connection: what its session task needs.
pub(super) struct Accepted {
    /// The configuration snapshot the session keeps to its end.
    pub runtime: Arc<Runtime>,
    /// The listener as that snapshot configures it.
    pub listener: Listener,
    pub shared: Arc<Shared>,
    /// The TCP peer: the client, or a trusted proxy.
    pub peer: SocketAddr,
    /// Its place in the connection counts, held until the session ends.
    pub slot: Slot,
}

impl Accepted {
    /// Serve the connection `io`: with `proxied` (its peer is one of the listener's
    /// `trusted_proxies`), first read its PROXY header ([`proxy::read_header`], bounded by
    /// [`proxy::HEADER_TIMEOUT`]) and count the client it names towards
    /// `max_connections_per_ip`; then the session, whose client is that address (or the
    /// proxy's own for a `LOCAL` header).
    pub(super) async fn serve<S: Io>(mut self, mut io: S, proxied: bool) {
        let client = if proxied {
            match self.proxied_client(&mut io).await {
                Some(client) => client,
                None => return,
            }
        } else {
            self.peer
        };
        let mut driver = SessionDriver::new(self.runtime, self.listener, self.shared, client);
        driver.run(io).await;
        drop(self.slot);
    }

    /// The client a trusted proxy's connection is from, per its header; `None`: closed
    /// (no valid header, logged with `rule=proxy_header`; or over the client's
    /// `max_connections_per_ip`, told `421`).
    async fn proxied_client<S: Io>(&mut self, io: &mut S) -> Option<SocketAddr> {
        let span = Span::current();
        let origin = match proxy::read_header(io).await {
            Ok(origin) => origin,
            // A TCP health check: it connects and leaves.
            Err(HeaderError::Silent) => {
                debug!("trusted proxy closed without sending anything");
                return None;
            }
            Err(e) => {
                let detail = Detail::Text(e.to_string());
                let what = "closed: no valid PROXY header from a trusted proxy";
                let refused = Refused::unanswered("proxy_header", what).with_detail(&detail);
                // No client is known: the line names the proxy as the peer too, so a search
                // by either address finds it.
                record_peer(&span, self.peer);
                record_at_connect(&self.shared, &self.listener.name, self.peer, &refused);
                return None;
            }
        };
        let Origin::Client(client) = origin else {
            // The proxy's own session: its address counts only towards max_connections.
            record_peer(&span, self.peer);
            if origin == Origin::Unknown {
                info!(
                    "PROXY header names no TCP client (UNKNOWN or UNSPEC): the proxy's own session"
                );
            }
            return Some(self.peer);
        };
        record_peer(&span, client);
        // A header naming the proxy itself (HAProxy's v1 health check names its own
        // connection) leaves it counted towards max_connections only.
        let max_per_ip = self.runtime.config.limits.max_connections_per_ip;
        if !from_proxy(&self.listener, client.ip())
            && let Err(full) = self.slot.claim(client.ip(), max_per_ip)
        {
            let (reply, rule) = AtAccept::Full(full).refusal();
            let refused = Refused::rule(rule, &reply)
                .warning()
                .saying("rejected at connect");
            record_at_connect(&self.shared, &self.listener.name, client, &refused);
            refuse(&mut *io, &reply).await;
            return None;
        }
        Some(client)
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
