//! The validated policy: [`Config`] is compiled from the raw TOML mirror in [`raw`] and is the
//! only configuration type the rest of the crate sees.
//!
//! Compilation reports every error it can find in one pass, each with the key that is wrong
//! (unknown keys included), so an operator fixes a file in one round. Nothing here touches
//! sockets; reading the files a policy names (certificates, users, recipients) happens here
//! only to validate that they exist and parse, so a bad file never starts and never replaces a
//! running configuration (DESIGN.md invariant 6).

pub mod raw;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use ipnet::IpNet;

/// The embedded default policy (`config/default.toml`), used by `portcullis run` without
/// `--config`.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub server: Server,
    /// `None` when no listener uses TLS and no `[tls]` table is given.
    pub tls: Option<Tls>,
    pub listeners: Vec<Listener>,
    pub relay: Relay,
    /// `None` when no listener allows AUTH and no `[auth]` table is given.
    pub auth: Option<Auth>,
    pub limits: Limits,
    pub rate_limits: RateLimits,
    pub upstreams: Vec<Upstream>,
    pub headers: Headers,
    pub queue: Queue,
    /// Where the file came from (`None` for the embedded default); relative paths in the file
    /// are resolved against its directory.
    pub source: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Server {
    pub hostname: String,
    pub spool_dir: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    Tls12,
    Tls13,
}

/// Where the TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files on disk (paths already resolved).
    Files { cert: PathBuf, key: PathBuf },
    /// Generate a self-signed certificate in memory at start (the embedded default only; a
    /// warning is logged).
    SelfSigned,
}

#[derive(Debug, Clone)]
pub struct Tls {
    pub source: CertSource,
    pub min_version: TlsVersion,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTls {
    None,
    StartTls,
    Implicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    Off,
    Optional,
    Required,
}

#[derive(Debug, Clone)]
pub struct Listener {
    pub name: String,
    pub bind: SocketAddr,
    pub tls: ListenerTls,
    pub require_tls: bool,
    pub auth: AuthMode,
    pub allow: Vec<IpNet>,
    pub deny: Vec<IpNet>,
}

#[derive(Debug, Clone)]
pub struct Relay {
    /// Lower case, no trailing dot.
    pub accepted_domains: Vec<String>,
    pub relay_networks: Vec<IpNet>,
    pub recipients_file: Option<PathBuf>,
}

#[derive(Debug, Clone)]
pub struct Auth {
    pub users_file: PathBuf,
    pub max_failures: u32,
    pub failure_window: Duration,
    pub lockout: Duration,
}

#[derive(Debug, Clone)]
pub struct Limits {
    pub max_message_size: u64,
    pub max_recipients: usize,
    pub max_connections: usize,
    pub max_connections_per_ip: usize,
    pub max_errors: u32,
    /// Octets including CRLF.
    pub max_command_length: usize,
    pub min_free_space: u64,
    pub hop_limit: u32,
    pub pregreet_wait: Duration,
    pub command_timeout: Duration,
    pub data_timeout: Duration,
}

/// A rate: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u32,
    pub per: Duration,
}

#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    pub connections_per_ip: Option<Rate>,
    pub messages_per_ip: Option<Rate>,
    pub messages_per_user: Option<Rate>,
    pub recipients_per_ip: Option<Rate>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    None,
    Opportunistic,
    Required,
}

#[derive(Debug, Clone)]
pub struct Upstream {
    pub name: String,
    /// `host:port` as written; resolved at connect time.
    pub address: String,
    pub tls: UpstreamTls,
    pub ca: Option<PathBuf>,
    /// Lower case; empty means the default route.
    pub domains: Vec<String>,
    pub auth_user: Option<String>,
    pub auth_password_file: Option<PathBuf>,
    pub max_connections: usize,
}

#[derive(Debug, Clone)]
pub struct Headers {
    /// Header name patterns (case-insensitive, `*` as a trailing wildcard).
    pub strip_untrusted: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct Queue {
    pub retry: Vec<Duration>,
    pub max_age: Duration,
    pub bounces: bool,
}
