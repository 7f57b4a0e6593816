//! The admin listener's accept loop: hyper's HTTP/1.1 server (RFC 9112) on each connection,
//! with the bounds that keep a hostile or broken client from costing more than a slot.
//!
//! - At most [`MAX_CONNECTIONS`] connections at once. The next one is answered
//!   `503 Service Unavailable` (a fixed response written without reading its request) and
//!   closed, by a short task of its own: the accept loop never waits on a client.
//! - A request head (request line and header fields) of at most [`MAX_HEAD_SIZE`] octets;
//!   beyond it hyper answers `431 Request Header Fields Too Large` and closes.
//! - [`REQUEST_TIMEOUT`] to send a request head (an idle keep-alive connection included: it
//!   is then closed without a response), and again for the handler to answer (`408`).
//! - [`MAX_CONNECTION_AGE`] per connection, so a client that stops reading its response
//!   cannot keep its slot.
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
/// Largest request head, in octets (hyper's read buffer; 8 KiB is also hyper's minimum).
pub const MAX_HEAD_SIZE: usize = 8 * 1024;
/// How long a client has to send a request head, and a handler to answer it.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest a connection is kept: then it is closed after its request in flight (within
/// [`SHUTDOWN_GRACE`]), and a scraper simply connects again.
pub const MAX_CONNECTION_AGE: Duration = Duration::from_secs(60);
/// How long connections still open at shutdown are given to finish their request.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(1);
/// How long a client refused for [`MAX_CONNECTIONS`] is given to read its `503`.
const REFUSAL_TIMEOUT: Duration = Duration::from_secs(1);
/// Pause after a failed accept (e.g. out of file descriptors) before trying again.
const ACCEPT_ERROR_BACKOFF: Duration = Duration::from_millis(100);

/// The response to a connection beyond [`MAX_CONNECTIONS`].
const BUSY: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: text/plain\r\n\
Content-Length: 21\r\nConnection: close\r\nRetry-After: 1\r\n\r\ntoo many connections\n";

/// Accept on `socket` until `shutdown`, serving `router` on each connection; then give the
/// open connections [`SHUTDOWN_GRACE`] to finish.
pub async fn serve(socket: TcpListener, router: axum::Router, shutdown: CancellationToken) {
    let slots = std::sync::Arc::new(Semaphore::new(MAX_CONNECTIONS));
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
        let Ok(slot) = slots.clone().try_acquire_owned() else {
            info!(%peer, limit = MAX_CONNECTIONS, "admin connection refused: too many connections");
            tracker.spawn(refuse(tcp));
            continue;
        };
        let router = router.clone();
        let shutdown = shutdown.clone();
        tracker.spawn(async move {
            let _slot = slot;
            connection(tcp, peer, router, shutdown).await;
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
    shutdown: CancellationToken,
) {
    let _ = tcp.set_nodelay(true);
    let service =
        TowerToHyperService::new(router.layer(axum::Extension(super::routes::Peer(peer))));
    let mut builder = http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .max_buf_size(MAX_HEAD_SIZE)
        .header_read_timeout(REQUEST_TIMEOUT)
        .keep_alive(true);
    let conn = builder.serve_connection(TokioIo::new(tcp), service);
    tokio::pin!(conn);
    tokio::select! {
        r = conn.as_mut() => if let Err(e) = r {
            debug!(error = %e, "admin connection ended");
        },
        () = shutdown.cancelled() => {
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
        // Also a client that never reads its response (hyper would wait on the write for
        // ever) gives its slot back.
        () = tokio::time::sleep(MAX_CONNECTION_AGE) => {
            debug!("admin connection closed: too old");
            conn.as_mut().graceful_shutdown();
            let _ = tokio::time::timeout(SHUTDOWN_GRACE, conn).await;
        }
    }
}

/// Answer `503` to a connection beyond [`MAX_CONNECTIONS`], then close it. What the client
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
