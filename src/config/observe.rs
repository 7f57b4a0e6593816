//! Compiled observability sections: `[admin]` (the HTTP listener), `[alerts]` and `[log]`
//! (log format and the message journal). See DESIGN.md, "Wave 2 contract".

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

/// `[admin]`: the admin HTTP listener (`/metrics`, `/healthz`, `/readyz`, `/`, `/api/status`).
/// Absent: no admin listener.
#[derive(Clone, PartialEq, Eq)]
pub struct Admin {
    /// Where it listens. Outside loopback only with a token (check-config refuses otherwise).
    pub bind: SocketAddr,
    /// `token_file`, as written.
    pub token_file: Option<PathBuf>,
    /// The token read from `token_file` at load, trimmed of whitespace; never empty. Required
    /// for everything but `/healthz` and `/readyz` when set.
    pub token: Option<Arc<str>>,
}

impl std::fmt::Debug for Admin {
    /// The token is never printed.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Admin")
            .field("bind", &self.bind)
            .field("token_file", &self.token_file)
            .field("token", &self.token.as_ref().map(|_| "(set)"))
            .finish()
    }
}

/// `[alerts]`: each threshold absent is that alert off.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Alerts {
    /// `no_inbound`: nothing accepted on any listener for this long.
    pub no_inbound: Option<Duration>,
    /// `no_delivery`: messages queued (not held) and none delivered for this long.
    pub no_delivery: Option<Duration>,
    /// `queue_depth`: messages queued, not counting held ones (at least 1).
    pub queue_depth: Option<u64>,
    /// `oldest_message`: age of the oldest queued message that is not held.
    pub oldest_message: Option<Duration>,
    /// `upstream_down`: an upstream down (breaker open) for this long.
    pub upstream_down: Option<Duration>,
    /// `webhook`: an `http://` or `https://` URL, POSTed to when an alert starts and ends.
    pub webhook: Option<String>,
}

/// `[log] format`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum LogFormat {
    /// Human-readable lines (tracing's default format).
    #[default]
    Text,
    /// One JSON object per line, with the span fields (queue id, peer) in it.
    Json,
}

/// `[log]`: the log format and the message journal behind `portcullis trace`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Log {
    /// `format` (`"text"`).
    pub format: LogFormat,
    /// `journal_keep` (`7d`): journal files older than this are removed.
    pub journal_keep: Duration,
    /// `journal_max_size` (`1GiB`, in octets): beyond it, the oldest journal files are removed.
    pub journal_max_size: u64,
}

/// Default `[log] journal_keep`.
pub const DEFAULT_JOURNAL_KEEP: &str = "7d";
/// Default `[log] journal_max_size` (1 GiB).
pub const DEFAULT_JOURNAL_MAX_SIZE: u64 = 1 << 30;

impl Default for Log {
    fn default() -> Log {
        Log {
            format: LogFormat::Text,
            journal_keep: Duration::from_secs(7 * 24 * 3600),
            journal_max_size: DEFAULT_JOURNAL_MAX_SIZE,
        }
    }
}
