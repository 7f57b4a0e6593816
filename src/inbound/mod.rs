//! Listeners, the per-connection session driver, message assembly and TLS.
//!
//! [`start`] binds every listener and returns the [`Inbound`] handle `app` stops them with;
//! [`listener`] accepts connections and enforces the connection caps (refusing with `421`
//! rather than blocking), opening a `session` tracing span per connection; [`proxy`] reads the
//! PROXY header of a connection from a listener's `trusted_proxies`; [`pressure`]
//! counts connections and decides stress mode; [`connection`] drives one
//! [`crate::smtp::Session`] over any byte stream (plain, then TLS), dispatching each event to
//! its stage; [`effects`] carries out what the policy's stage evaluators ask for (rate
//! budgets, the AUTH gate, password verification on the [`verifier`] pool, spool space,
//! DNS lookups, the message's DKIM/ARC/DMARC verification in a bounded number of slots, DKIM
//! signing); [`assembly`] turns one message into a committed spool file, our
//! `Authentication-Results:` or `DKIM-Signature:` fields above it; [`record`] is what the
//! side tells [`crate::observe::Telemetry`] (a refusal's log line and its event come from one
//! function, so none is logged uncounted); [`tls`] builds the rustls configuration. Nothing
//! here decides policy (it asks [`crate::policy`]) and nothing here knows delivery: a
//! committed message leaves as a [`Committed`] on the channel `app` gives [`start`].

#![warn(clippy::too_many_lines)]

pub mod assembly;
pub mod connection;
pub mod effects;
pub mod explain;
pub mod listener;
pub mod pressure;
pub mod proxy;
pub mod record;
pub mod tls;
pub mod verifier;

#[cfg(test)]
mod tests;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::TcpListener;
use tokio::sync::mpsc::UnboundedSender;
use tokio::task::JoinHandle;
use tokio_rustls::rustls::ServerConfig;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::warn;

use crate::config::Config;
use crate::policy::Policy;
use crate::queue::{Committed, Spool};
use crate::routes::RouteCapabilities;
use connection::Shared;
use listener::ListenerTask;
pub use pressure::ConnectionCounter;
use verifier::{MAX_WAITING_VERIFICATIONS, Verifier, hash_slots};

/// One configuration snapshot as the inbound side uses it. A session takes an `Arc` of this
/// at accept time and keeps it to the end, so a reload never changes the rules under a
/// session's feet.
#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub policy: Policy,
    /// `None` when no listener uses TLS.
    pub tls: Option<Arc<ServerConfig>>,
    /// The resolver built from this snapshot's `[dns]` (shared with the previous snapshot
    /// when `[dns]` did not change); `None` when no check needs DNS.
    pub resolver: Option<crate::dns::Resolver>,
}

/// What the inbound side is given by the rest of the relay (only `app` builds this).
#[derive(Debug)]
pub struct Deps {
    /// Where messages are written.
    pub spool: Spool,
    /// Told of each committed message, after its `250` is queued; whoever holds the receiver
    /// delivers it. A closed channel is fine: the message is on disk.
    pub queued: UnboundedSender<Committed>,
    /// What the route to each recipient can carry (checked at RCPT and after the final dot).
    pub capabilities: RouteCapabilities,
    /// Where session events are recorded, and the listeners' gate (paused, bound).
    pub telemetry: Arc<crate::observe::Telemetry>,
    /// `[containment]`'s counters and the suspended logins.
    pub containment: Arc<crate::policy::containment::Containment>,
    /// The store shared with the other nodes (`[cluster] redis`), if any.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// Why the inbound side could not start.
#[derive(Debug, thiserror::Error)]
pub enum StartError {
    /// A listener could not bind its address.
    #[error("listener {name}: cannot bind {bind}: {source}")]
    Bind {
        /// `[[listeners]] name`.
        name: String,
        /// `[[listeners]] bind`.
        bind: SocketAddr,
        /// Why `bind(2)` failed.
        #[source]
        source: std::io::Error,
    },
    /// The password verifier threads could not be started.
    #[error("password verifier: {0}")]
    Verifier(#[source] std::io::Error),
}

/// The running inbound side: every listener's accept loop and the sessions they started.
#[derive(Debug)]
pub struct Inbound {
    listeners: Vec<JoinHandle<()>>,
    sessions: TaskTracker,
    counter: ConnectionCounter,
    /// Stops accepting; idle sessions are told `421 4.3.0` at once.
    shutdown: CancellationToken,
}

/// Start the inbound side on the configuration `runtime` holds now (a reload replaces it for
/// new sessions; binds take a restart): start the password verifier and bind every listener,
/// then accept on each. Nothing accepts until every listener is bound.
///
/// # Errors
/// [`StartError::Bind`] for the first listener that cannot bind (none is then accepting),
/// [`StartError::Verifier`] when the verifier threads cannot start.
pub async fn start(runtime: Arc<ArcSwap<Runtime>>, deps: Deps) -> Result<Inbound, StartError> {
    let counter = ConnectionCounter::default();
    let shutdown = CancellationToken::new();
    let verifier =
        Verifier::start(hash_slots(), MAX_WAITING_VERIFICATIONS).map_err(StartError::Verifier)?;
    let shared = Arc::new(Shared {
        spool: deps.spool,
        shutdown: shutdown.clone(),
        verifier: Arc::new(verifier),
        queued: deps.queued,
        capabilities: deps.capabilities,
        stress: counter.stress(),
        verifications: Arc::new(tokio::sync::Semaphore::new(effects::verification_slots())),
        telemetry: deps.telemetry,
        containment: deps.containment,
        cluster: deps.cluster,
    });
    let sessions = TaskTracker::new();
    let snapshot = runtime.load_full();
    let mut tasks = Vec::new();
    for listener in &snapshot.config.listeners {
        let socket = TcpListener::bind(listener.bind)
            .await
            .map_err(|source| StartError::Bind {
                name: listener.name.clone(),
                bind: listener.bind,
                source,
            })?;
        tasks.push(ListenerTask {
            config: listener.clone(),
            socket,
            runtime: runtime.clone(),
            shared: shared.clone(),
            counter: counter.clone(),
            tracker: sessions.clone(),
        });
    }
    let listeners = tasks.into_iter().map(|t| tokio::spawn(t.run())).collect();
    Ok(Inbound {
        listeners,
        sessions,
        counter,
        shutdown,
    })
}

impl Inbound {
    /// The open connections, counted as the listeners count them (for
    /// [`explain::running_state`]).
    pub fn connections(&self) -> ConnectionCounter {
        self.counter.clone()
    }

    /// Stop: close every listener, tell idle sessions `421 4.3.0`, and give sessions in DATA
    /// up to `grace` (`[limits] shutdown_grace`) to finish their message. False when some were
    /// still open after it: they are abandoned (their spool files are removed as they drop,
    /// or by recovery at the next start), their messages not queued.
    pub async fn stop(self, grace: Duration) -> bool {
        self.shutdown.cancel();
        for listener in self.listeners {
            let _ = listener.await;
        }
        self.sessions.close();
        if tokio::time::timeout(grace, self.sessions.wait())
            .await
            .is_err()
        {
            warn!(
                sessions = self.counter.total(),
                grace_secs = grace.as_secs_f32(),
                "sessions still open after the shutdown grace period; closing them"
            );
            return false;
        }
        true
    }
}
