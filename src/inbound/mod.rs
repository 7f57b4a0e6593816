//! Listeners, the per-connection session driver and TLS.

pub mod tls;
