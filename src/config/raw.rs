//! Mirror of the TOML policy file (serde only, no logic).
//!
//! Every key is `Option` so that defaults are applied, and every value is checked, in one place:
//! the compiler in [`super`]. Values that carry units (durations, sizes, rates) and enumerations
//! (`tls = "starttls"`) are kept as strings here so that a bad one becomes a clear, keyed error
//! in compilation instead of stopping deserialization. Unknown keys are not rejected here
//! (`deny_unknown_fields` would stop at the first): the loader collects them all with
//! `serde_ignored`.

use serde::Deserialize;

/// The whole policy file. The loader deserializes each top-level table on its own (so that a
/// type error in one does not hide the others); this struct names them all.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawConfig {
    /// `[server]`
    pub server: Option<RawServer>,
    /// `[tls]`
    pub tls: Option<RawTls>,
    /// `[[listeners]]`
    pub listeners: Option<Vec<RawListener>>,
    /// `[relay]`
    pub relay: Option<RawRelay>,
    /// `[auth]`
    pub auth: Option<RawAuth>,
    /// `[limits]`
    pub limits: Option<RawLimits>,
    /// `[rate_limits]`
    pub rate_limits: Option<RawRateLimits>,
    /// `[[upstreams]]`
    pub upstreams: Option<Vec<RawUpstream>>,
    /// `[headers]`
    pub headers: Option<RawHeaders>,
    /// `[queue]`
    pub queue: Option<RawQueue>,
    /// `[dns]`
    pub dns: Option<RawDns>,
    /// `[spf]`
    pub spf: Option<RawSpf>,
    /// `[dkim]` (with `[[dkim.sign]]`)
    pub dkim: Option<RawDkim>,
    /// `[dmarc]`
    pub dmarc: Option<RawDmarc>,
    /// `[dnsbl]` (with `[[dnsbl.zones]]`)
    pub dnsbl: Option<RawDnsbl>,
    /// `[doctor]`
    pub doctor: Option<RawDoctor>,
    /// `[admin]`
    pub admin: Option<RawAdmin>,
    /// `[alerts]`
    pub alerts: Option<RawAlerts>,
    /// `[log]`
    pub log: Option<RawLog>,
    /// `[containment]`
    pub containment: Option<RawContainment>,
    /// `[cluster]`
    pub cluster: Option<RawCluster>,
}

/// `[server]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawServer {
    /// Banner and EHLO name (required).
    pub hostname: Option<String>,
    /// Spool directory.
    pub spool_dir: Option<String>,
    /// The authserv-id of our `Authentication-Results:` (RFC 8601).
    pub authserv_id: Option<String>,
}

/// `[tls]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawTls {
    /// PEM certificate chain.
    pub cert: Option<String>,
    /// PEM private key.
    pub key: Option<String>,
    /// `"1.2"` or `"1.3"`.
    pub min_version: Option<String>,
}

/// One `[[listeners]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawListener {
    /// Name used in logs.
    pub name: Option<String>,
    /// Socket address to bind.
    pub bind: Option<String>,
    /// `"none"`, `"starttls"` or `"implicit"`.
    pub tls: Option<String>,
    /// Refuse MAIL/AUTH before TLS.
    pub require_tls: Option<bool>,
    /// `"off"`, `"optional"` or `"required"`.
    pub auth: Option<String>,
    /// Client CIDRs allowed to connect.
    pub allow: Option<Vec<String>>,
    /// Client CIDRs refused (checked first).
    pub deny: Option<Vec<String>>,
    /// `"reject"`, `"normalize"` or `"trusted"`.
    pub bare_lf: Option<String>,
    /// Load balancers whose connections start with a PROXY v1/v2 header (CIDRs).
    pub trusted_proxies: Option<Vec<String>>,
}

/// `[relay]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRelay {
    /// Domains mail is accepted for.
    pub accepted_domains: Option<Vec<String>>,
    /// Networks that may relay to any domain without AUTH.
    pub relay_networks: Option<Vec<String>>,
    /// One address or `@domain` per line.
    pub recipients_file: Option<String>,
    /// Where `RCPT TO:<postmaster>` is delivered.
    pub postmaster: Option<String>,
}

/// `[auth]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAuth {
    /// TOML file of `[[users]]`.
    pub users_file: Option<String>,
    /// Failures per client IP within `failure_window` before a lockout.
    pub max_failures: Option<i64>,
    /// Window for counting failures.
    pub failure_window: Option<String>,
    /// Length of a lockout.
    pub lockout: Option<String>,
    /// Refuse a `From:` display name that names an address the user does not own.
    pub check_display_name: Option<bool>,
}

/// A size: an integer (bytes) or a string with a unit (`"25MiB"`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RawSize {
    /// A bare TOML integer: bytes.
    Bytes(i64),
    /// A string such as `"25MiB"`.
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct SizeVisitor;
        impl serde::de::Visitor<'_> for SizeVisitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size: an integer (bytes) or a string such as \"25MiB\"")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawSize, E> {
                i64::try_from(v)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::custom("size is too large"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_owned()))
            }
        }
        deserializer.deserialize_any(SizeVisitor)
    }
}

/// `[limits]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawLimits {
    /// Largest message accepted.
    pub max_message_size: Option<RawSize>,
    /// Recipients per message.
    pub max_recipients: Option<i64>,
    /// Concurrent connections, all listeners together.
    pub max_connections: Option<i64>,
    /// Concurrent connections from one IP.
    pub max_connections_per_ip: Option<i64>,
    /// Errors per session before it is closed.
    pub max_errors: Option<i64>,
    /// Octets per command line, CRLF included.
    pub max_command_length: Option<i64>,
    /// Spool free space below which mail is deferred.
    pub min_free_space: Option<RawSize>,
    /// Maximum `Received:` headers.
    pub hop_limit: Option<i64>,
    /// Pause before the banner.
    pub pregreet_wait: Option<String>,
    /// Time allowed per command.
    pub command_timeout: Option<String>,
    /// Time allowed for the whole DATA phase.
    pub data_timeout: Option<String>,
    /// Percent of `max_connections` at which stress mode starts.
    pub stress_threshold: Option<i64>,
    /// Command, idle and handshake timeout in stress mode.
    pub stress_timeout: Option<String>,
    /// Time allowed for a whole session.
    pub session_timeout: Option<String>,
    /// Time sessions in DATA may take to finish after a shutdown signal.
    pub shutdown_grace: Option<String>,
}

/// `[rate_limits]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawRateLimits {
    /// New connections per client IP.
    pub connections_per_ip: Option<String>,
    /// Messages per client IP.
    pub messages_per_ip: Option<String>,
    /// Messages per authenticated user.
    pub messages_per_user: Option<String>,
    /// Recipients per client IP.
    pub recipients_per_ip: Option<String>,
}

/// One `[[upstreams]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawUpstream {
    /// Name used in logs.
    pub name: Option<String>,
    /// `host:port`.
    pub address: Option<String>,
    /// `"none"`, `"opportunistic"` or `"required"`.
    pub tls: Option<String>,
    /// PEM CA bundle used instead of the system roots.
    pub ca: Option<String>,
    /// The name verified in the upstream's certificate, instead of the host in `address`.
    pub tls_name: Option<String>,
    /// Recipient domains routed here; empty: the default route.
    pub domains: Option<Vec<String>>,
    /// AUTH user at the upstream.
    pub auth_user: Option<String>,
    /// File holding the AUTH password.
    pub auth_password_file: Option<String>,
    /// Concurrent connections to this upstream.
    pub max_connections: Option<i64>,
    /// Time allowed to open a TCP connection.
    pub connect_timeout: Option<String>,
    /// Time allowed for each reply.
    pub timeout: Option<String>,
    /// Circuit breaker: how long the upstream is left alone after a failure.
    pub backoff: Option<String>,
    /// DKIM-sign mail routed here per `[[dkim.sign]]`.
    pub sign: Option<bool>,
}

/// `[headers]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawHeaders {
    /// Header name patterns removed from mail that did not come from a trusted source.
    pub strip_untrusted: Option<Vec<String>>,
}

/// `[queue]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawQueue {
    /// Back-off schedule between attempts.
    pub retry: Option<Vec<String>>,
    /// Age after which a message expires.
    pub max_age: Option<String>,
    /// Send non-delivery reports.
    pub bounces: Option<bool>,
    /// How long shutdown waits for deliveries in flight.
    pub delivery_grace: Option<String>,
    /// How long `queue purge --quarantine` keeps messages.
    pub quarantine_keep: Option<String>,
}

/// `[dns]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawDns {
    /// `"IP"` or `"IP:PORT"` (IPv6 as `"[::1]:53"` or `"::1"`).
    pub nameservers: Option<Vec<String>>,
    /// Time allowed for one query.
    pub timeout: Option<String>,
}

/// `[spf]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawSpf {
    /// `"off"`, `"record"` or `"enforce"`.
    pub verify: Option<String>,
}

/// `[dkim]`. The loader reads `sign` entry by entry (like `[[listeners]]`), so this table is
/// deserialized without it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawDkim {
    /// `"off"` or `"record"`.
    pub verify: Option<String>,
    /// `[[dkim.sign]]`
    pub sign: Option<Vec<RawDkimSign>>,
}

/// One `[[dkim.sign]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawDkimSign {
    /// The signing domain (`d=`).
    pub domain: Option<String>,
    /// The selector (`s=`).
    pub selector: Option<String>,
    /// PEM private key file.
    pub key: Option<String>,
    /// Header fields signed (`h=`).
    pub headers: Option<Vec<String>>,
}

/// `[dmarc]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawDmarc {
    /// `"off"`, `"record"` or `"enforce"`.
    pub verify: Option<String>,
    /// `"Name: value"`.
    pub quarantine_header: Option<String>,
    /// `"reject"`.
    pub own_domains: Option<String>,
}

/// `[dnsbl]`. The loader reads `zones` entry by entry, so this table is deserialized
/// without it.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawDnsbl {
    /// Sum of the listing zones' weights at which a client is refused.
    pub threshold: Option<i64>,
    /// Client networks never looked up.
    pub exempt: Option<Vec<String>>,
    /// `[[dnsbl.zones]]`
    pub zones: Option<Vec<RawDnsblZone>>,
}

/// One `[[dnsbl.zones]]` entry.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawDnsblZone {
    /// The zone queried.
    pub zone: Option<String>,
    /// The name shown in refusals.
    pub name: Option<String>,
    /// What a listing adds towards the threshold.
    pub weight: Option<i64>,
    /// The A records that count as listed.
    pub answers: Option<Vec<String>>,
}

/// `[doctor]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawDoctor {
    /// Our outbound addresses.
    pub egress: Option<Vec<String>>,
}

/// `[admin]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAdmin {
    /// Socket address of the admin HTTP listener.
    pub bind: Option<String>,
    /// File holding the bearer token.
    pub token_file: Option<String>,
}

/// `[alerts]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawAlerts {
    /// Nothing accepted for this long.
    pub no_inbound: Option<String>,
    /// Messages queued and none delivered for this long.
    pub no_delivery: Option<String>,
    /// Messages queued (not held).
    pub queue_depth: Option<i64>,
    /// Age of the oldest queued message that is not held.
    pub oldest_message: Option<String>,
    /// An upstream down for this long.
    pub upstream_down: Option<String>,
    /// URL the alerts are POSTed to.
    pub webhook: Option<String>,
}

/// `[containment]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawContainment {
    /// `messages_per_user` refusals of one login within an hour that suspend it.
    pub rate_limit_hits: Option<i64>,
    /// Distinct recipient domains one login may send to within an hour.
    pub recipient_domains_per_hour: Option<i64>,
    /// Distinct client addresses one login may authenticate from within an hour.
    pub client_ips_per_hour: Option<i64>,
}

/// `[cluster]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawCluster {
    /// The Redis URL of the shared store.
    pub redis: Option<String>,
    /// This node's name.
    pub node: Option<String>,
    /// `"local"` or `"tempfail"`.
    pub on_error: Option<String>,
    /// How long one Redis operation may take.
    pub timeout: Option<String>,
}

/// `[log]`
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawLog {
    /// `"text"` or `"json"`.
    pub format: Option<String>,
    /// How long journal files are kept.
    pub journal_keep: Option<String>,
    /// Most space the journal takes.
    pub journal_max_size: Option<RawSize>,
}

/// The users file named by `auth.users_file`.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawUsersFile {
    /// `[[users]]`
    pub users: Option<Vec<RawUser>>,
}

/// One `[[users]]` entry of the users file.
#[derive(Debug, Clone, Default, Deserialize)]
pub struct RawUser {
    /// Login name.
    pub name: Option<String>,
    /// argon2id PHC string (`portcullis passwd`).
    pub password_hash: Option<String>,
    /// Envelope senders this user may use: `local@domain` or `@domain`.
    pub senders: Option<Vec<String>>,
}
