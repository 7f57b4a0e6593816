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

mod compile;
mod files;
mod load;
mod report;
#[cfg(test)]
mod tests;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
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
    /// Where the file came from (`None` for the embedded default). Relative paths in the file
    /// are resolved against the process working directory, not this file's directory, and
    /// are stored as written.
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
    /// The valid recipients read from `recipients_file` at load: lower-cased addresses and
    /// `@domain` entries. `None` without a file (every address in an accepted domain is valid).
    pub recipients: Option<Vec<String>>,
}

#[derive(Debug, Clone)]
pub struct Auth {
    /// `None` when `[auth]` names no users file: then there are no users and nobody can
    /// authenticate (`warnings()` says so when a listener allows AUTH).
    pub users_file: Option<PathBuf>,
    pub max_failures: u32,
    pub failure_window: Duration,
    pub lockout: Duration,
    /// The users read from `users_file` at load (empty without one). Names are unique.
    pub users: Vec<User>,
}

/// One user from the users file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct User {
    /// Login name (unique, as written).
    pub name: String,
    /// argon2id PHC string; it parsed with `argon2::PasswordHash::new` at load.
    pub password_hash: String,
    /// Envelope senders this user may use: `local@domain` or `@domain` (a whole domain); the
    /// domain is lower-cased, the local part kept as written.
    pub senders: Vec<String>,
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
    /// The password read from `auth_password_file` at load, trailing newline removed.
    pub auth_password: Option<String>,
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
        let text = std::fs::read_to_string(path).map_err(|e| {
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
