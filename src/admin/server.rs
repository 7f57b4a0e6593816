//! The admin listener's accept loop: hyper's HTTP/1.1 server (RFC 9112) on each connection,
//! with the bounds that keep a hostile or broken client from costing more than a slot.
//!
//! - At most [`MAX_CONNECTIONS`] connections at once. Beyond them, [`PROBE_CONNECTIONS`] more
//!   are served by the same hyper stack with a router that answers only the probes
//!   (`/healthz`, `/readyz`; anything else `503`), one request each, whose head must come
//!   within [`PROBE_HEAD_TIMEOUT`]: whoever holds the general slots open cannot make a load
//!   balancer's probe fail for longer than that. The connection after those is answered
//!   `503 Service Unavailable` (a fixed response written without reading its request) and
//!   closed, by a short task of its own: the accept loop never waits on a client.
//! - A request head (request line and header fields) of at most [`MAX_HEAD_SIZE`] octets;
//!   beyond it hyper answers `431 Request Header Fields Too Large` and closes.
//! - [`REQUEST_TIMEOUT`] to send a request head (an idle keep-alive connection included: it
//!   is then closed without a response), and again for the handler to answer (`408`).
//! - [`MAX_CONNECTION_AGE`] per connection, so a client that stops reading its response
//!   cannot keep its slot.
//! - A client that half-closes after its request (`shutdown(SHUT_WR)`) still gets the
//!   response (hyper's `half_close`).
//! - No request body and only `GET`/`HEAD`: enforced by the router ([`super::routes`]).

use std::time::Duration;

use hyper::server::conn::http1;
use hyper_util::rt::{TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{debug, info, warn};

/// Most admin connections open at once.
pub const MAX_CONNECTIONS: usize = 64;
/// Connections served beyond [`MAX_CONNECTIONS`], for the probes only.
pub const PROBE_CONNECTIONS: usize = 16;
/// How long a probe-only connection has to send its request head (and, for the handler to
/// answer, [`REQUEST_TIMEOUT`]).
pub const PROBE_HEAD_TIMEOUT: Duration = Duration::from_secs(2);
/// Largest request head, in octets (hyper's read buffer; 8 KiB is also hyper's minimum).
pub const MAX_HEAD_SIZE: usize = 8 * 1024;
/// How long a client has to send a request head, and a handler to answer it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept: then it is closed after its request in flight (within
/// [`SHUTDOWN_GRACE`]), and a scraper simply connects again.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long connections still open at shutdown are given to finish their request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a client refused beyond [`PROBE_CONNECTIONS`] is given to read its `503`.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The response to a connection beyond [`MAX_CONNECTIONS`] and [`PROBE_CONNECTIONS`].
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 21\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many connections\n";

/// The bounds of one kind of connection.
#[derive(Debug, Clone, Copy)]
struct Bounds {
    /// Time to send a request head (an idle keep-alive connection included).
    head_timeout: Duration,
    /// Whether more than one request is served on the connection.
    keep_alive: bool,
    /// The longest the connection is kept.
    max_age: Duration,
}

/// A connection in one of the [`MAX_CONNECTIONS`] general slots.
const GENERAL: Bounds = Bounds {
    head_timeout: REQUEST_TIMEOUT,
    keep_alive: true,
    max_age: MAX_CONNECTION_AGE,
};

/// A connection in one of the [`PROBE_CONNECTIONS`] slots: one probe, quickly, then closed.
const PROBE: Bounds = Bounds {
    head_timeout: PROBE_HEAD_TIMEOUT,
    keep_alive: false,
    max_age: REQUEST_TIMEOUT,
};

/// Accept on `socket` until `shutdown`, serving `router` on each of [`MAX_CONNECTIONS`]
/// connections, or `probes` on [`PROBE_CONNECTIONS`] more (one request each, its head within
/// [`PROBE_HEAD_TIMEOUT`]); then give the open connections
/// [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(
    socket: TcpListener,
    router: axum::Router,
    probes: axum::Router,
    shutdown: CancellationToken,
) {
    let slots = std::sync::Arc::new(Semaphore::new(MAX_CONNECTIONS));
    let probe_slots = std::sync::Arc::new(Semaphore::new(PROBE_CONNECTIONS));
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            r = socket.accept() => match r {
                Ok(accepted) => accepted,
                Err(e) => {
                    warn!(error = %e, "admin accept failed");
                    tokio::time::sleep(ACCEPT_ERROR_BACKOFF).await;
                    continue;
                }
            },
            () = shutdown.cancelled() => break,
        };
        let (slot, router, bounds) = match slots.clone().try_acquire_owned() {
            Ok(slot) => (slot, router.clone(), GENERAL),
            Err(_) => match probe_slots.clone().try_acquire_owned() {
                Ok(slot) => {
                    debug!(%peer, limit = MAX_CONNECTIONS, "admin connection served for the probes only");
                    (slot, probes.clone(), PROBE)
                }
                Err(_) => {
                    info!(%peer, limit = MAX_CONNECTIONS + PROBE_CONNECTIONS, "admin connection refused: too many connections");
                    tracker.spawn(refuse(tcp));
                    continue;
                }
            },
        };
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _slot = slot;
            connection(tcp, peer, router, bounds, shutdown).await;
            debug!(%peer, "admin connection closed");
        });
    }
    tracker.close();
    drop(socket);
    let _ = tokio::time::timeout(SHUTDOWN_GRACE * 2, tracker.wait()).await;
}

/// Serve one connection until the client closes it, a bound closes it, or shutdown.
async fn connection(
    tcp: TcpStream,
    peer: std::net::SocketAddr,
    router: axum::Router,
    bounds: Bounds,
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let service =
        TowerToHyperService::new(router.layer(axum::Extension(super::routes::Peer(peer))));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEAD_SIZE)
        .header_read_timeout(bounds.head_timeout)
        // A client may send its request and shut down its side at once (`nc -N`): the
        // response is still written, instead of the connection being dropped at EOF.
        .half_close(true)
        .keep_alive(bounds.keep_alive);
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            debug!(%peer, error = %e, "admin connection ended");
        },
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
        // Also a client that never reads its response (hyper would wait on the write for
        // ever) gives its slot back.
        () = tokio::time::sleep(bounds.max_age) => {
            debug!(%peer, "admin connection closed: too old");
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// Answer `503` to a connection beyond every slot, then close it. What the client
/// sent is read (and discarded) for a moment after the response, so closing does not reset
/// the connection before the client has read the `503`.
async fn refuse(mut tcp: TcpStream) {
    let _ = tokio::time::timeout(REFUSAL_TIMEOUT, async {
        tcp.write_all(BUSY).await?;
        tcp.shutdown().await?;
        let mut sink = [0u8; 1024];
        let mut left = MAX_HEAD_SIZE;
        while left > 0 {
            let n = tcp.read(&mut sink).await?;
            if n == 0 {
                break;
            }
            left = left.saturating_sub(n);
        }
        Ok::<_, std::io::Error>(())
    })
    .await;
}
