//! Listeners, the per-connection session driver and TLS.
//!
//! [`listener`] accepts connections and enforces the connection caps (refusing with `421`
//! rather than blocking), opening a `session` tracing span per connection; [`pressure`]
//! counts connections and decides stress mode; [`connection`] drives one
//! [`crate::smtp::Session`] over any byte stream (plain, then TLS), dispatching each event to
//! its stage; [`effects`] carries out what the policy's stage evaluators ask for (rate
//! budgets, the AUTH gate, password verification on the [`verifier`] pool, spool space,
//! lookups); [`tls`] builds the rustls configuration. Nothing here decides policy: it asks
//! [`crate::policy`].

#![warn(clippy::too_many_lines)]

pub mod connection;
pub mod effects;
pub mod listener;
pub mod pressure;
pub mod tls;
pub mod verifier;

#[cfg(test)]
mod tests;

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
