//! The admin HTTP listener (`[admin]`): `/metrics`, `/healthz`, `/readyz`, `/` (the status
//! page) and `/api/status`, served with axum on the relay's tokio runtime.
//!
//! SKELETON: the admin part of the observability issue fills this in.

pub mod client;
pub mod offline;
pub mod page;
pub mod summary;
