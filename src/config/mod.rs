//! The validated policy: [`Config`] is compiled from the raw TOML mirror in [`raw`] and is the
//! only configuration type the rest of the crate sees.
//!
//! Compilation reports every error it can find in one pass, each with the key that is wrong
//! (unknown keys included), so an operator fixes a file in one round. Nothing here touches
//! sockets; reading the files a policy names (certificates, users, recipients) happens here
//! only to validate that they exist and parse, so a bad file never starts and never replaces a
//! running configuration (DESIGN.md invariant 6).

pub mod raw;
pub mod units;

mod checks;
mod compile;
pub mod files;
mod load;
mod observe;
pub mod perms;
mod report;
#[cfg(test)]
mod tests;
pub mod value;

pub use checks::{
    DEFAULT_DKIM_HEADERS, Dkim, DkimSign, Dmarc, Dns, Dnsbl, DnsblZone, Doctor, QuarantineHeader,
    Spf, Verify,
};
pub use observe::{Admin, Alerts, Log, LogFormat};

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::envelope::Address;

/// The embedded default policy (`config/default.toml`), used by `portcullis run` without
/// `--config`.
pub const DEFAULT_TOML: &str = include_str!("../../config/default.toml");

/// A fully validated configuration.
#[derive(Debug, Clone)]
pub struct Config {
    /// `[server]`.
    pub server: Server,
    /// `None` when no listener uses TLS and no `[tls]` table is given.
    pub tls: Option<Tls>,
    /// `[[listeners]]`, in file order; at least one, names and binds unique.
    pub listeners: Vec<Listener>,
    /// `[relay]`.
    pub relay: Relay,
    /// `None` when no listener allows AUTH and no `[auth]` table is given.
    pub auth: Option<Auth>,
    /// `[limits]`.
    pub limits: Limits,
    /// `[rate_limits]`.
    pub rate_limits: RateLimits,
    /// `[[upstreams]]`, in file order; at least one, names unique.
    pub upstreams: Vec<Upstream>,
    /// `[headers]`.
    pub headers: Headers,
    /// `[queue]`.
    pub queue: Queue,
    /// `[dns]`.
    pub dns: Dns,
    /// `[spf]`.
    pub spf: Spf,
    /// `[dkim]`.
    pub dkim: Dkim,
    /// `[dmarc]`.
    pub dmarc: Dmarc,
    /// `[dnsbl]`.
    pub dnsbl: Dnsbl,
    /// `[doctor]`.
    pub doctor: Doctor,
    /// `[admin]`: `None` when absent (no admin listener).
    pub admin: Option<Admin>,
    /// `[alerts]`.
    pub alerts: Alerts,
    /// `[log]`.
    pub log: Log,
    /// `[containment]`: every trigger off unless set.
    pub containment: Containment,
    /// `[cluster]`: the shared store and this node's name.
    pub cluster: Cluster,
    /// Where the file came from (`None` for the embedded default). Relative paths in the file
    /// are resolved against the process working directory, not this file's directory, and
    /// are stored as written.
    pub source: Option<PathBuf>,
}

/// `[server]`.
#[derive(Debug, Clone)]
pub struct Server {
    /// Name in the banner and EHLO: a valid domain name, lower-cased, no trailing dot.
    pub hostname: String,
    /// The spool directory (default `/var/spool/portcullis`), as written.
    pub spool_dir: PathBuf,
    /// The authserv-id (RFC 8601 §2.5) this relay's `Authentication-Results:` carry: a valid
    /// domain name, lower-cased, no trailing dot (default: `hostname`). Every node of a
    /// cluster uses the same one. Such a field arriving from untrusted mail is removed.
    pub authserv_id: String,
}

/// `[tls] min_version`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TlsVersion {
    /// `"1.2"` (default).
    Tls12,
    /// `"1.3"`.
    Tls13,
}

/// Where the TLS certificate comes from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CertSource {
    /// PEM files on disk (`[tls] cert` and `key`, stored as written; relative paths are
    /// relative to the working directory). Both were readable and looked like PEM at load.
    Files {
        /// PEM certificate chain.
        cert: PathBuf,
        /// PEM private key.
        key: PathBuf,
    },
    /// `[tls]` names neither `cert` nor `key`: a self-signed certificate is generated in memory
    /// at start. For trying portcullis out only (clients cannot verify it); `warnings()` says so.
    SelfSigned,
}

/// `[tls]`.
#[derive(Debug, Clone)]
pub struct Tls {
    /// Certificate files, or a self-signed certificate when neither is given.
    pub source: CertSource,
    /// Lowest TLS version accepted.
    pub min_version: TlsVersion,
}

/// `[[listeners]] tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListenerTls {
    /// `"none"`: plain text only.
    None,
    /// `"starttls"` (default): plain text, upgraded by STARTTLS.
    StartTls,
    /// `"implicit"`: TLS from the first byte (port 465); implies `require_tls`.
    Implicit,
}

/// `[[listeners]] auth`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthMode {
    /// `"off"` (default): AUTH is not offered.
    Off,
    /// `"optional"`: AUTH offered; unauthenticated clients follow the relay rules.
    Optional,
    /// `"required"`: MAIL before AUTH is refused.
    Required,
}

/// `[[listeners]] bare_lf`: what a bare LF inside DATA gets. In every mode the end of data is
/// only `<CRLF>.<CRLF>` (RFC 5321 §4.1.1.4), a bare CR in DATA is refused with `550 5.5.2`, and
/// command lines need CRLF (`500 5.5.2`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BareLf {
    /// `"reject"`: the message is refused with `550 5.5.2`.
    Reject,
    /// `"normalize"`: stored and forwarded as CRLF, dot-stuffing re-applied upstream.
    Normalize,
    /// `"trusted"` (default): normalize for authenticated sessions and `relay_networks`
    /// clients, reject for everyone else.
    Trusted,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone)]
pub struct Listener {
    /// Name in logs (default `listener<index>`), unique.
    pub name: String,
    /// Address to bind, unique.
    pub bind: SocketAddr,
    /// TLS mode; anything but `None` means `Config::tls` is `Some`.
    pub tls: ListenerTls,
    /// MAIL/AUTH before TLS → 530 5.7.0. Always true for `Implicit`, never with `None`.
    pub require_tls: bool,
    /// AUTH mode; anything but `Off` means `Config::auth` is `Some`.
    pub auth: AuthMode,
    /// Client networks allowed to connect (never empty; default everyone). Host bits cleared.
    pub allow: Vec<IpNet>,
    /// Client networks refused, checked before `allow`. Host bits cleared.
    pub deny: Vec<IpNet>,
    /// What a bare LF inside DATA gets.
    pub bare_lf: BareLf,
    /// Load balancers (networks, host bits cleared) whose connections must begin with a
    /// PROXY v1 or v2 header naming the client (see [`crate::inbound::proxy`]); empty: none,
    /// and a PROXY line is an SMTP command like any other. Behind an `Arc` (a thin pointer):
    /// every session holds its listener, and an idle session's size is kept small.
    pub trusted_proxies: std::sync::Arc<Vec<IpNet>>,
}

/// `[relay]`.
#[derive(Debug, Clone)]
pub struct Relay {
    /// Domains mail is accepted for from anyone allowed to connect, in canonical form (A-label,
    /// lower case, no trailing dot; see [`crate::envelope::canonical_domain`]).
    pub accepted_domains: Vec<String>,
    /// Clients that may send to any domain without AUTH. Host bits cleared.
    pub relay_networks: Vec<IpNet>,
    /// Where `recipients` came from, as written.
    pub recipients_file: Option<PathBuf>,
    /// The valid recipients read from `recipients_file` at load: addresses and `@domain`
    /// entries in canonical form (as [`crate::envelope::Address`] writes them; domains as
    /// A-labels). `None` without a file (every address in an accepted domain is valid).
    pub recipients: Option<Vec<String>>,
    /// Where `RCPT TO:<postmaster>` (RFC 5321 §4.5.1, no domain, any case) is delivered. Default:
    /// `postmaster@` the first accepted domain, or `postmaster@server.hostname` without one.
    pub postmaster: Address,
}

/// `[auth]`.
#[derive(Debug, Clone)]
pub struct Auth {
    /// `None` when `[auth]` names no users file: then there are no users and nobody can
    /// authenticate (`warnings()` says so when a listener allows AUTH).
    pub users_file: Option<PathBuf>,
    /// Failed AUTHs per client IP within `failure_window` before a lockout (≥ 1).
    pub max_failures: u32,
    /// Window in which failures are counted (> 0).
    pub failure_window: Duration,
    /// How long a locked-out IP gets 454 4.7.0 to every AUTH (> 0).
    pub lockout: Duration,
    /// The users read from `users_file` at load (empty without one). Names are unique.
    pub users: Vec<User>,
    /// Refuse (`550 5.7.1`) an authenticated message whose `From:` display name, after RFC
    /// 2047 decoding and unquoting, contains an address the user does not own (default true).
    pub check_display_name: bool,
}

/// One user from the users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name (unique, as written).
    pub name: String,
    /// argon2id PHC string; it parsed with `argon2::PasswordHash::new` at load.
    pub password_hash: String,
    /// Envelope senders this user may use: `local@domain` or `@domain` (a whole domain), in
    /// canonical form (as [`crate::envelope::Address`] writes them; domains as A-labels).
    pub senders: Vec<String>,
}

/// `[limits]`. Every count and timeout is > 0 unless said otherwise.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Largest message in bytes.
    pub max_message_size: u64,
    /// Recipients per message.
    pub max_recipients: usize,
    /// Concurrent connections over all listeners.
    pub max_connections: usize,
    /// Concurrent connections from one IP.
    pub max_connections_per_ip: usize,
    /// Errors per session before it is closed.
    pub max_errors: u32,
    /// Octets including CRLF, 512..=65536 (RFC 5321 §4.5.3.1.4 minimum).
    pub max_command_length: usize,
    /// Spool free space in bytes below which mail is deferred; default 1.5 ×
    /// `max_message_size`; 0 disables the check.
    pub min_free_space: u64,
    /// Most `Received:` headers a message may carry.
    pub hop_limit: u32,
    /// Pause before the banner (may be zero).
    pub pregreet_wait: Duration,
    /// Time allowed per command.
    pub command_timeout: Duration,
    /// Time allowed for the DATA phase.
    pub data_timeout: Duration,
    /// Stress mode (Postfix's `${stress?…}` model) starts when open connections reach this
    /// many (`stress_threshold` percent of `max_connections`, at least 1), or when a
    /// connection is refused for `max_connections`; it ends when they fall below half of it.
    pub stress_connections: usize,
    /// In stress mode: the time allowed per command, before the greeting and for a TLS
    /// handshake, and the longest a session in DATA may go without sending an octet (each at
    /// most its normal value). Default 10 s.
    pub stress_timeout: Duration,
    /// Time allowed for a whole session, from accept; then `421 4.4.2` and close, in the middle
    /// of a message too (RFC 5321 §4.5.3.2 allows the server to end a session that is too long).
    pub session_timeout: Duration,
    /// After SIGTERM or SIGINT: how long sessions still receiving a message may take to
    /// finish (each gets its `250` if it commits within it); then the relay exits and what
    /// they sent is not queued. Default 30 s; zero exits at once.
    pub shutdown_grace: Duration,
}

/// A rate: `count` events per `per`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    /// Events allowed per `per` (≥ 1).
    pub count: u32,
    /// One second, one minute or one hour.
    pub per: Duration,
}

/// `[rate_limits]`; `None` means unlimited.
#[derive(Debug, Clone, Default)]
pub struct RateLimits {
    /// New connections per client IP (→ 421 4.7.0).
    pub connections_per_ip: Option<Rate>,
    /// Messages per client IP (→ 451 4.7.1 at MAIL).
    pub messages_per_ip: Option<Rate>,
    /// Messages per authenticated user (→ 451 4.7.1 at MAIL).
    pub messages_per_user: Option<Rate>,
    /// Recipients per client IP (→ 451 4.7.1 at RCPT).
    pub recipients_per_ip: Option<Rate>,
}

/// `[[upstreams]] tls`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpstreamTls {
    /// `"none"`: never STARTTLS.
    None,
    /// `"opportunistic"`: STARTTLS when offered.
    Opportunistic,
    /// `"required"` (default): no delivery without TLS.
    Required,
}

/// One `[[upstreams]]` entry. Its `Debug` form leaves the password out.
#[derive(Clone, PartialEq, Eq)]
pub struct Upstream {
    /// Name in logs (default `upstream<index>`), unique.
    pub name: String,
    /// `host:port` as written; resolved at connect time.
    pub address: String,
    /// TLS policy towards this upstream.
    pub tls: UpstreamTls,
    /// PEM CA bundle to verify it with, instead of the system roots; as written.
    pub ca: Option<PathBuf>,
    /// The name sent as SNI and verified in the upstream's certificate (RFC 6125), in canonical
    /// form (A-label, lower case), instead of the host of `address`: for an address that is an
    /// IP or an internal alias while the certificate names the server. Never with `tls = "none"`.
    pub tls_name: Option<String>,
    /// Recipient domains routed here, in canonical form (A-label, lower case); empty means
    /// the default route.
    pub domains: Vec<String>,
    /// AUTH user at the upstream; set exactly when `auth_password_file` is.
    pub auth_user: Option<String>,
    /// File the password was read from, as written.
    pub auth_password_file: Option<PathBuf>,
    /// The password read from `auth_password_file` at load, trailing newline removed.
    pub auth_password: Option<String>,
    /// Concurrent connections to this upstream (≥ 1).
    pub max_connections: usize,
    /// Time allowed to open the TCP connection.
    pub connect_timeout: Duration,
    /// Time allowed for each reply (the reply to the final dot gets twice this).
    pub timeout: Duration,
    /// Circuit breaker: after a connection-level failure the upstream is left alone this long,
    /// doubling with each further failure up to 16 times; then one delivery probes it.
    pub backoff: Duration,
    /// `sign = true`: mail routed here is DKIM-signed per `[[dkim.sign]]` (a smarthost
    /// towards the internet).
    pub sign: bool,
}

impl std::fmt::Debug for Upstream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Upstream")
            .field("name", &self.name)
            .field("address", &self.address)
            .field("tls", &self.tls)
            .field("ca", &self.ca)
            .field("tls_name", &self.tls_name)
            .field("domains", &self.domains)
            .field("auth_user", &self.auth_user)
            .field("auth_password_file", &self.auth_password_file)
            .field(
                "auth_password",
                &self.auth_password.as_ref().map(|_| "<redacted>"),
            )
            .field("max_connections", &self.max_connections)
            .field("connect_timeout", &self.connect_timeout)
            .field("timeout", &self.timeout)
            .field("backoff", &self.backoff)
            .field("sign", &self.sign)
            .finish()
    }
}

/// `[headers]`.
#[derive(Debug, Clone)]
pub struct Headers {
    /// Header name patterns (case-insensitive, `*` as a trailing wildcard), removed from
    /// untrusted mail. While `[dmarc] verify` is not `"off"`, the name of
    /// `dmarc.quarantine_header` is among them (added at compilation), so only the relay sets
    /// that field.
    pub strip_untrusted: Vec<String>,
}

/// `[queue]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Queue {
    /// Wait before each retry (non-empty, each > 0); the last repeats until `max_age`.
    pub retry: Vec<Duration>,
    /// Age at which a message expires (> 0).
    pub max_age: Duration,
    /// Send non-delivery reports; false: log permanent failures only.
    pub bounces: bool,
    /// How long shutdown waits for deliveries in flight to finish their transaction (0 and
    /// up). One still running then is abandoned and tried again after the restart (at worst
    /// a duplicate, if its final dot was already sent). Default 10 s.
    pub delivery_grace: Duration,
    /// How long a message `queue purge --quarantine` put aside is kept (> 0), counted from
    /// its quarantine; the running relay then deletes it. Default 7 days.
    pub quarantine_keep: Duration,
}

/// `[containment]`: when an authenticated login is suspended automatically (see
/// [`crate::policy::containment`]). Each trigger is `None` (off) unless set; a set one is at
/// least 1. The hour is a sliding window; client addresses are counted as the rate limits count
/// them (IPv4 by address, IPv6 by /64).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Containment {
    /// `rate_limit_hits`: suspended at this many `messages_per_user` refusals within an hour.
    pub rate_limit_hits: Option<u32>,
    /// `recipient_domains_per_hour`: suspended when a recipient would make the login's
    /// distinct recipient domains within an hour more than this.
    pub recipient_domains_per_hour: Option<u32>,
    /// `client_ips_per_hour`: suspended when a successful AUTH would make the login's distinct
    /// client addresses within an hour more than this.
    pub client_ips_per_hour: Option<u32>,
}

impl Containment {
    /// Whether any trigger is set.
    pub fn any(&self) -> bool {
        self.rate_limit_hits.is_some()
            || self.recipient_domains_per_hour.is_some()
            || self.client_ips_per_hour.is_some()
    }
}

/// `[cluster]`: the Redis store several nodes share their rate budgets, AUTH failure records
/// and suspended logins through (see [`crate::cluster`]), and this node's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Cluster {
    /// `redis`: the shared store; `None` (the default): every node keeps its own state.
    pub redis: Option<RedisUrl>,
    /// `node`: this node's name in logs, the journal, the status, alerts and the `Received:`
    /// field it adds. Default `server.hostname`.
    pub node: String,
    /// `on_error`: what a node does while the store cannot be reached or does not answer
    /// within `timeout`.
    pub on_error: OnError,
    /// `timeout`: the longest one Redis operation (connecting included) may take, from
    /// [`Cluster::MIN_TIMEOUT`] to [`Cluster::MAX_TIMEOUT`]. Default 250 ms.
    pub timeout: Duration,
}

impl Cluster {
    /// Shortest `timeout`.
    pub const MIN_TIMEOUT: Duration = Duration::from_millis(10);
    /// Longest `timeout`: well under any SMTP command timeout.
    pub const MAX_TIMEOUT: Duration = Duration::from_secs(10);

    /// Whether `node` is a node name: 1 to 64 octets of ASCII letters, digits, `.`, `-`, `_`
    /// (it is written into log lines and a `Received:` field as it is).
    pub fn valid_node(node: &str) -> bool {
        (1..=64).contains(&node.len())
            && node
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
    }
}

/// `[cluster] on_error`: what a node does while the shared store is unavailable.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnError {
    /// `"local"`: each node counts on its own in-memory state (logged, the `cluster_fallback`
    /// alert) until the store answers again.
    Local,
    /// `"tempfail"`: refuse what needs the shared state with a temporary reply: `421 4.3.0`
    /// at the greeting, `454 4.7.0` to AUTH, `451 4.3.0` at MAIL and RCPT.
    Tempfail,
}

impl OnError {
    /// The value as the policy file writes it.
    pub fn as_str(self) -> &'static str {
        match self {
            OnError::Local => "local",
            OnError::Tempfail => "tempfail",
        }
    }
}

/// A Redis URL (`redis://[user:password@]host[:port][/db]`, `redis+unix:///path`,
/// `unix:///path`) as redis-rs reads it. Its password is never shown: `Display` and `Debug`
/// print [`RedisUrl::redacted`].
#[derive(Clone, PartialEq, Eq)]
pub struct RedisUrl(String);

impl RedisUrl {
    /// Check `url` the way the Redis client will read it.
    ///
    /// # Errors
    /// What is wrong, in words that never repeat the URL (it may hold a password): not a URL
    /// redis-rs reads, or `rediss://` (TLS to Redis is not built in: run Redis on a private
    /// network or a Unix socket).
    pub fn parse(url: &str) -> Result<RedisUrl, String> {
        if url.starts_with("rediss://") || url.starts_with("valkeys://") {
            return Err(
                "rediss:// (TLS to Redis) is not supported; use redis:// on a private \
                        network or redis+unix:// for a socket"
                    .to_string(),
            );
        }
        match redis::Client::open(url) {
            Ok(_) => Ok(RedisUrl(url.to_string())),
            Err(e) => Err(format!(
                "not a Redis URL (redis://host:port/db or redis+unix:///path): {}",
                e.detail().unwrap_or("unreadable")
            )),
        }
    }

    /// The URL as given, password included: only for connecting.
    pub fn expose(&self) -> &str {
        &self.0
    }

    /// The URL with any password replaced by `***`: the one in the user information
    /// (`redis://user:***@host`), and every query parameter's value but `db` and `protocol`
    /// (a `redis+unix://` URL carries its password as `?pass=`, however its name is encoded).
    pub fn redacted(&self) -> String {
        let Some((scheme, rest)) = self.0.split_once("://") else {
            return "(redis url)".to_string();
        };
        let (before_query, query) = match rest.split_once('?') {
            Some((before, query)) => (before, Some(query)),
            None => (rest, None),
        };
        let (authority, path) = match before_query.find('/') {
            Some(i) => before_query.split_at(i),
            None => (before_query, ""),
        };
        let authority = match authority.rsplit_once('@') {
            Some((userinfo, host)) => match userinfo.split_once(':') {
                Some((user, _)) => format!("{user}:***@{host}"),
                None => format!("{userinfo}@{host}"),
            },
            None => authority.to_string(),
        };
        let mut shown = format!("{scheme}://{authority}{path}");
        if let Some(query) = query {
            // Every value but the few harmless ones is hidden: redis-rs decodes parameter
            // names (`%70ass` is `pass`), so matching names as written would miss some.
            let params: Vec<String> = query
                .split('&')
                .map(|param| match param.split_once('=') {
                    Some((name, _)) if !matches!(name, "db" | "protocol") => {
                        format!("{name}=***")
                    }
                    _ => param.to_string(),
                })
                .collect();
            shown.push('?');
            shown.push_str(&params.join("&"));
        }
        shown
    }
}

impl std::fmt::Display for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.redacted())
    }
}

impl std::fmt::Debug for RedisUrl {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "RedisUrl({})", self.redacted())
    }
}

/// One thing wrong with a policy file: the dotted key that is wrong (`limits.max_errors`,
/// `listeners[1].bind`), or `(syntax)` / `(file)` when no key applies, and what is wrong.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{key}: {message}")]
pub struct ConfigError {
    /// Dotted path of the key, e.g. `listeners[1].require_tls`.
    pub key: String,
    /// What is wrong, for an administrator.
    pub message: String,
}

impl ConfigError {
    /// An error about `key`.
    pub fn new(key: impl Into<String>, message: impl Into<String>) -> Self {
        ConfigError {
            key: key.into(),
            message: message.into(),
        }
    }
}

/// Every error found in one pass over a policy file (never empty when returned as an `Err`).
/// `Display` prints one `key: message` per line.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub struct ConfigErrors(pub Vec<ConfigError>);

impl fmt::Display for ConfigErrors {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, error) in self.0.iter().enumerate() {
            if i > 0 {
                writeln!(f)?;
            }
            write!(f, "{error}")?;
        }
        Ok(())
    }
}

impl Config {
    /// Compiles a policy from TOML text. `source` is recorded in [`Config::source`]; files the
    /// policy names (users, recipients, passwords, certificates) are read now, relative to the
    /// working directory. Returns every error found, each with its key.
    pub fn from_toml(text: &str, source: Option<&Path>) -> Result<Config, ConfigErrors> {
        compile::compile(text, source)
    }

    /// Reads and compiles the policy file at `path`. A file that cannot be read is one error
    /// with key `(file)`.
    pub fn load(path: &Path) -> Result<Config, ConfigErrors> {
        let text = files::read_text(path).map_err(|e| {
            ConfigErrors(vec![ConfigError::new(
                "(file)",
                format!("cannot read {}: {e}", path.display()),
            )])
        })?;
        Self::from_toml(&text, Some(path))
    }

    /// The embedded default policy ([`DEFAULT_TOML`]).
    ///
    /// # Panics
    /// Only if the committed `config/default.toml` is invalid, which a unit test rules out.
    pub fn embedded_default() -> Config {
        match Self::from_toml(DEFAULT_TOML, None) {
            Ok(config) => config,
            Err(errors) => panic!("config/default.toml is invalid:\n{errors}"),
        }
    }

    /// A readable multi-line summary of the effective policy, for `portcullis check-config`.
    pub fn summary(&self) -> String {
        report::summary(self)
    }

    /// Dangerous but valid combinations, one sentence each, for the administrator.
    pub fn warnings(&self) -> Vec<String> {
        report::warnings(self)
    }
}
