//! Listeners, the per-connection session driver and TLS.
//!
//! [`listener`] accepts connections and enforces the connection caps (refusing with `421`
//! rather than blocking); [`connection`] drives one [`crate::smtp::Session`] over a plain or
//! TLS stream, carrying out its events against the policy and the spool; [`tls`] builds the
//! rustls configuration. Nothing here decides policy: it asks [`crate::policy`].

#![warn(clippy::too_many_lines)]

pub mod assembly;
pub mod connection;
pub mod limits;
pub mod listener;
pub mod tls;
pub mod verifier;

use std::sync::Arc;

use tokio_rustls::rustls::ServerConfig;

use crate::config::Config;
use crate::policy::Policy;

/// One configuration snapshot as the inbound side uses it. A session takes an `Arc` of this
/// at accept time and keeps it to the end, so a reload never changes the rules under a
/// session's feet.
#[derive(Debug)]
pub struct Runtime {
    pub config: Arc<Config>,
    pub policy: Policy,
    /// `None` when no listener uses TLS.
    pub tls: Option<Arc<ServerConfig>>,
}
