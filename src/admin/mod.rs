//! The admin HTTP listener (`[admin]`): `/metrics`, `/healthz`, `/readyz`, `/` (the status
//! page), `/api/status`, `/api/explain-state` (what `portcullis policy explain` reads of
//! the running rate budgets and AUTH lockouts) and `/api/users` (what `portcullis user list`
//! reads of each login's messages in the last hour, [`users`]), served with axum on the
//! relay's tokio runtime; `portcullis listeners pause|resume` ([`pause`]); and `portcullis
//! user list|suspend|resume` ([`users`]).
//!
//! [`start`] binds the address and runs our own accept loop ([`server`]) around hyper's
//! HTTP/1.1 server, so every bound holds whatever a client does: at most
//! [`server::MAX_CONNECTIONS`] connections (and [`server::PROBE_CONNECTIONS`] more that
//! answer only the probes, so they stay answerable), request heads of at most
//! [`server::MAX_HEAD_SIZE`] octets, no request body, [`server::REQUEST_TIMEOUT`] per
//! request, `GET` and `HEAD` only. [`routes`] holds the handlers and the token check,
//! [`ready`] the readiness verdict of `/readyz`.

pub mod client;
pub mod offline;
pub mod page;
pub mod pause;
pub mod ready;
pub mod routes;
pub mod server;
pub mod summary;
pub mod users;

use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;
use tracing::info;

use crate::config::Admin;
use crate::observe::{ConfigSource, Telemetry};
use crate::policy::store::ClientStateSource;
use crate::queue::Spool;
use users::UsersSource;

/// Why the admin listener could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// `[admin] bind` could not be bound.
    #[error("admin listener: cannot bind {bind}: {source}")]
    Bind {
        /// `[admin] bind`.
        bind: SocketAddr,
        /// Why `bind(2)` failed.
        #[source]
        source: std::io::Error,
    },
}

/// What the handlers read: the telemetry, the spool (for readiness), the running
/// configuration (token, `limits.min_free_space`) and the listener's own address.
#[derive(Clone)]
pub struct AdminState {
    /// The relay's telemetry.
    pub telemetry: Arc<Telemetry>,
    /// The spool, whose free space and writability `/readyz` checks.
    pub spool: Spool,
    /// The configuration running now (a SIGHUP replaces it, so a new token applies at once).
    pub config: ConfigSource,
    /// The token the listener started with: used when a reload drops `[admin]` (the listener
    /// keeps running until a restart, and must not open up).
    pub start_token: Option<Arc<str>>,
    /// The address the listener is bound to (a bind takes a restart to change).
    pub bound: SocketAddr,
    /// What the running relay's stateful rules say of a client, read (never taken) by
    /// `/api/explain-state`; `None`: that route answers `404`.
    pub client_state: Option<ClientStateSource>,
    /// What the running relay knows of its logins, read by `/api/users`; `None`: that route
    /// answers `404`.
    pub users: Option<UsersSource>,
}

impl std::fmt::Debug for AdminState {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdminState")
            .field("bound", &self.bound)
            .finish_non_exhaustive()
    }
}

/// The running admin listener.
#[derive(Debug)]
pub struct AdminServer {
    /// Where it listens (the bound address, e.g. with port 0 resolved).
    pub local_addr: SocketAddr,
    task: JoinHandle<()>,
}

/// Bind `admin.bind` and serve until `shutdown` is cancelled (with the relay). Called by
/// `app` after the SMTP listeners are bound; `client_state` answers `/api/explain-state`,
/// `users` `/api/users`.
///
/// # Errors
/// [`StartError::Bind`] when the address cannot be bound (the relay does not start).
pub async fn start(
    admin: &Admin,
    telemetry: Arc<Telemetry>,
    spool: Spool,
    config: ConfigSource,
    client_state: ClientStateSource,
    users: UsersSource,
    shutdown: CancellationToken,
) -> Result<AdminServer, StartError> {
    let bind_error = |source| StartError::Bind {
        bind: admin.bind,
        source,
    };
    let socket = TcpListener::bind(admin.bind).await.map_err(bind_error)?;
    let local_addr = socket.local_addr().map_err(bind_error)?;
    let state = AdminState {
        telemetry,
        spool,
        config,
        start_token: admin.token.clone(),
        bound: local_addr,
        client_state: Some(client_state),
        users: Some(users),
    };
    info!(bind = %local_addr, token = admin.token.is_some(), "admin listening");
    let task = tokio::spawn(server::serve(
        socket,
        routes::router(state.clone()),
        routes::probe_router(state),
        shutdown,
    ));
    Ok(AdminServer { local_addr, task })
}

impl AdminServer {
    /// Wait for the accept loop to end (after the shutdown token was cancelled); connections
    /// still open are closed within [`server::SHUTDOWN_GRACE`].
    pub async fn stopped(self) {
        let _ = self.task.await;
    }
}
