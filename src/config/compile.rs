//! Compilation of the raw mirror into a validated [`Config`]: defaults applied, every value
//! checked, every error collected with its key.
//!
//! Each section is compiled even when an earlier one failed; a bad value is replaced by its
//! default so later checks can still run, and the collected errors decide the result at the
//! end. Checks that depend on another section (a listener using TLS needs `[tls]`) skip
//! themselves when that section was present but broken, to avoid a second, misleading error.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use crate::envelope::{Address, AddressError, canonical_domain};

use super::raw::{
    RawAdmin, RawAlerts, RawAuth, RawCluster, RawContainment, RawDkim, RawDkimSign, RawDmarc,
    RawDns, RawDnsbl, RawDnsblZone, RawDoctor, RawHeaders, RawLimits, RawListener, RawLog,
    RawQueue, RawRateLimits, RawRelay, RawServer, RawSize, RawSpf, RawTls, RawUpstream,
};
use super::units::{UnitError, parse_duration, parse_rate, parse_size};
use super::value::{DomainProblem, ValueError};
use super::{
    Auth, AuthMode, BareLf, CertSource, Cluster, Config, ConfigError, ConfigErrors, Containment,
    Headers, Limits, Listener, ListenerTls, OnError, Queue, Rate, RateLimits, RedisUrl, Relay,
    Server, Tls, TlsVersion, Upstream, UpstreamTls, Verify, files, load,
};

mod checks;
mod observe;

/// Default `[server] spool_dir`.
const DEFAULT_SPOOL_DIR: &str = "/var/spool/portcullis";
/// Default `[headers] strip_untrusted`.
/// Exchange's internal header families: Exchange trusts them as set by its own servers (spam
/// verdict, internal authentication, cross-premises and cross-tenant routing), so nobody
/// outside may set them.
pub const DEFAULT_STRIP_UNTRUSTED: [&str; 4] = [
    "X-MS-Exchange-Organization-*",
    "X-MS-Exchange-Forest-*",
    "X-MS-Exchange-CrossPremises-*",
    "X-MS-Exchange-CrossTenant-*",
];
/// Default `[queue] retry`.
const DEFAULT_RETRY: [&str; 7] = ["1m", "5m", "15m", "30m", "1h", "2h", "4h"];
/// RFC 5321 §4.5.3.1.4: a command line of 512 octets must always be accepted.
const MIN_COMMAND_LENGTH: i64 = 512;
/// Upper bound on `max_command_length`: the session's line buffer is bounded by it.
const MAX_COMMAND_LENGTH: i64 = 65_536;

/// The largest count a `usize` field accepts (TOML integers are `i64`).
const MAX_USIZE: i64 = if (usize::MAX as u128) < (i64::MAX as u128) {
    usize::MAX as i64
} else {
    i64::MAX
};

/// A top-level table: absent, present but unusable (already reported), or parsed.
enum Section<T> {
    Absent,
    Broken,
    Parsed(T),
}

impl<T: Default> Section<T> {
    fn is_present(&self) -> bool {
        !matches!(self, Section::Absent)
    }
    /// The parsed table, or an empty one (all defaults) when absent or broken.
    fn or_default(self) -> T {
        match self {
            Section::Parsed(t) => t,
            _ => T::default(),
        }
    }
}

/// The document split into its top-level tables (the fields of `raw::RawConfig`).
struct Sections {
    server: Section<RawServer>,
    tls: Section<RawTls>,
    listeners: Section<Vec<Option<RawListener>>>,
    relay: Section<RawRelay>,
    auth: Section<RawAuth>,
    limits: Section<RawLimits>,
    rate_limits: Section<RawRateLimits>,
    upstreams: Section<Vec<Option<RawUpstream>>>,
    headers: Section<RawHeaders>,
    queue: Section<RawQueue>,
    dns: Section<RawDns>,
    spf: Section<RawSpf>,
    dkim: Section<RawDkim>,
    /// `[[dkim.sign]]`, read entry by entry apart from the rest of `[dkim]`.
    dkim_sign: Section<Vec<Option<RawDkimSign>>>,
    dmarc: Section<RawDmarc>,
    dnsbl: Section<RawDnsbl>,
    /// `[[dnsbl.zones]]`, read entry by entry apart from the rest of `[dnsbl]`.
    dnsbl_zones: Section<Vec<Option<RawDnsblZone>>>,
    doctor: Section<RawDoctor>,
    admin: Section<RawAdmin>,
    alerts: Section<RawAlerts>,
    log: Section<RawLog>,
    containment: Section<RawContainment>,
    cluster: Section<RawCluster>,
}

/// Compiles TOML text into a `Config`, or every error found.
pub(super) fn compile(text: &str, source: Option<&Path>) -> Result<Config, ConfigErrors> {
    let document = load::parse_document(text).map_err(|e| ConfigErrors(vec![e]))?;
    let mut c = Compiler { errors: Vec::new() };
    let s = c.split(document);
    // A key with a type error was removed before compiling its table; a later "is required"
    // for it would only repeat the first error, so later errors on those keys are dropped.
    let split_errors = c.errors.len();
    let typed: HashSet<String> = c
        .errors
        .iter()
        .filter(|e| e.message != "unknown key")
        .map(|e| e.key.clone())
        .collect();

    // A broken [tls] or [auth] counts as present: its own error was reported already.
    let tls_present = s.tls.is_present();
    let auth_present = s.auth.is_present();

    let server = c.server(s.server);
    let tls = match s.tls {
        Section::Parsed(raw) => Some(c.tls(raw)),
        _ => None,
    };
    let listeners = c.listeners(s.listeners, tls_present, auth_present);
    let relay = c.relay(s.relay.or_default(), &server.hostname);
    let auth = match s.auth {
        Section::Parsed(raw) => Some(c.auth(raw)),
        _ => None,
    };
    let limits = c.limits(s.limits.or_default());
    let rate_limits = c.rate_limits(s.rate_limits.or_default());
    let upstreams = c.upstreams(s.upstreams);
    let mut headers = c.headers(s.headers.or_default());
    let queue = c.queue(s.queue.or_default());
    let dns = c.dns(s.dns.or_default());
    let spf = c.spf(s.spf.or_default());
    let dkim = c.dkim(s.dkim.or_default(), s.dkim_sign);
    let dmarc = c.dmarc(s.dmarc.or_default());
    let dnsbl = c.dnsbl(s.dnsbl.or_default(), s.dnsbl_zones);
    let doctor = c.doctor(s.doctor.or_default());
    let admin = match s.admin {
        Section::Parsed(raw) => c.admin(raw),
        _ => None,
    };
    let alerts = c.alerts(s.alerts.or_default());
    let log = c.log(s.log.or_default());
    let containment = c.containment(s.containment.or_default());
    let cluster = c.cluster(s.cluster.or_default(), &server.hostname);
    // The quarantine field is ours to add: one arriving from a stranger is removed with the
    // other untrusted fields, so it cannot make a transport rule junk someone else's mail
    // (or, set by a spammer to something else, be mistaken for ours).
    let quarantine = &dmarc.quarantine_header.name;
    if dmarc.verify != Verify::Off
        && !headers
            .strip_untrusted
            .iter()
            .any(|p| p.eq_ignore_ascii_case(quarantine))
    {
        headers.strip_untrusted.push(quarantine.clone());
    }

    if !c.errors.is_empty() {
        let mut errors = c.errors;
        let later = errors.split_off(split_errors);
        errors.extend(later.into_iter().filter(|e| !typed.contains(&e.key)));
        return Err(ConfigErrors(errors));
    }
    Ok(Config {
        server,
        tls,
        listeners,
        relay,
        auth,
        limits,
        rate_limits,
        upstreams,
        headers,
        queue,
        dns,
        spf,
        dkim,
        dmarc,
        dnsbl,
        doctor,
        admin,
        alerts,
        log,
        containment,
        cluster,
        source: source.map(Path::to_path_buf),
    })
}

/// Accumulates errors while compiling.
struct Compiler {
    errors: Vec<ConfigError>,
}

impl Compiler {
    /// `[containment]`: every trigger optional, each from 1 to 1,000,000.
    fn containment(&mut self, raw: RawContainment) -> Containment {
        let mut trigger = |key: &str, raw: Option<i64>| {
            raw.map(|n| self.count(&format!("containment.{key}"), Some(n), 1, 1, 1_000_000))
        };
        Containment {
            rate_limit_hits: trigger("rate_limit_hits", raw.rate_limit_hits),
            recipient_domains_per_hour: trigger(
                "recipient_domains_per_hour",
                raw.recipient_domains_per_hour,
            ),
            client_ips_per_hour: trigger("client_ips_per_hour", raw.client_ips_per_hour),
        }
    }
}

impl Compiler {
    /// `[cluster]`: the Redis URL (`redis://` or `redis+unix://`/`unix://`, parsed by
    /// redis-rs; never echoed in an error, it may hold a password), the node name (1 to 64
    /// octets of letters, digits, `.`, `-`, `_`; default `server.hostname`), `on_error` and
    /// `timeout` (10 ms to 10 s).
    fn cluster(&mut self, raw: RawCluster, hostname: &str) -> Cluster {
        let redis = raw.redis.and_then(|url| match RedisUrl::parse(&url) {
            Ok(url) => Some(url),
            Err(e) => {
                self.err("cluster.redis", e);
                None
            }
        });
        let node = match raw.node {
            None => hostname.to_string(),
            Some(node) if Cluster::valid_node(&node) => node,
            Some(node) => {
                self.err(
                    "cluster.node",
                    format!(
                        "{:?} is not a node name (1 to 64 letters, digits, '.', '-', '_')",
                        node.chars().take(80).collect::<String>()
                    ),
                );
                hostname.to_string()
            }
        };
        let on_error = self.choice(
            "cluster.on_error",
            raw.on_error,
            OnError::Local,
            &[OnError::Local, OnError::Tempfail].map(|o| (o.as_str(), o)),
        );
        let timeout = self.duration("cluster.timeout", raw.timeout, "250ms", false);
        if !(Cluster::MIN_TIMEOUT..=Cluster::MAX_TIMEOUT).contains(&timeout) {
            self.err("cluster.timeout", "must be between 10ms and 10s");
        }
        Cluster {
            redis,
            node,
            on_error: on_error.unwrap_or(OnError::Local),
            timeout,
        }
    }
}

impl Compiler {
    fn err(&mut self, key: impl Into<String>, message: impl Into<String>) {
        self.errors.push(ConfigError::new(key, message));
    }

    /// Splits the document into its top-level tables; anything else is an unknown key.
    fn split(&mut self, document: toml::Table) -> Sections {
        fn section<T: serde::de::DeserializeOwned>(
            value: toml::Value,
            name: &str,
            errors: &mut Vec<ConfigError>,
        ) -> Section<T> {
            match load::table(value, name, &format!("[{name}]"), errors) {
                Some(t) => Section::Parsed(t),
                None => Section::Broken,
            }
        }
        fn array<T: serde::de::DeserializeOwned>(
            value: toml::Value,
            name: &str,
            errors: &mut Vec<ConfigError>,
        ) -> Section<Vec<Option<T>>> {
            match load::array_of_tables(value, name, errors) {
                Some(t) => Section::Parsed(t),
                None => Section::Broken,
            }
        }
        let mut s = Sections {
            server: Section::Absent,
            tls: Section::Absent,
            listeners: Section::Absent,
            relay: Section::Absent,
            auth: Section::Absent,
            limits: Section::Absent,
            rate_limits: Section::Absent,
            upstreams: Section::Absent,
            headers: Section::Absent,
            queue: Section::Absent,
            dns: Section::Absent,
            spf: Section::Absent,
            dkim: Section::Absent,
            dkim_sign: Section::Absent,
            dmarc: Section::Absent,
            dnsbl: Section::Absent,
            dnsbl_zones: Section::Absent,
            doctor: Section::Absent,
            admin: Section::Absent,
            alerts: Section::Absent,
            log: Section::Absent,
            containment: Section::Absent,
            cluster: Section::Absent,
        };
        let e = &mut self.errors;
        for (name, value) in document {
            match name.as_str() {
                "server" => s.server = section(value, &name, e),
                "tls" => s.tls = section(value, &name, e),
                "listeners" => s.listeners = array(value, &name, e),
                "relay" => s.relay = section(value, &name, e),
                "auth" => s.auth = section(value, &name, e),
                "limits" => s.limits = section(value, &name, e),
                "rate_limits" => s.rate_limits = section(value, &name, e),
                "upstreams" => s.upstreams = array(value, &name, e),
                "headers" => s.headers = section(value, &name, e),
                "queue" => s.queue = section(value, &name, e),
                "dns" => s.dns = section(value, &name, e),
                "spf" => s.spf = section(value, &name, e),
                "dkim" => {
                    let (table, sign) = split_off(value, "sign");
                    s.dkim = section(table, &name, e);
                    if let Some(sign) = sign {
                        s.dkim_sign = array(sign, "dkim.sign", e);
                    }
                }
                "dmarc" => s.dmarc = section(value, &name, e),
                "dnsbl" => {
                    let (table, zones) = split_off(value, "zones");
                    s.dnsbl = section(table, &name, e);
                    if let Some(zones) = zones {
                        s.dnsbl_zones = array(zones, "dnsbl.zones", e);
                    }
                }
                "doctor" => s.doctor = section(value, &name, e),
                "admin" => s.admin = section(value, &name, e),
                "alerts" => s.alerts = section(value, &name, e),
                "log" => s.log = section(value, &name, e),
                "containment" => s.containment = section(value, &name, e),
                "cluster" => s.cluster = section(value, &name, e),
                _ => e.push(ConfigError::new(name, "unknown key")),
            }
        }
        s
    }

    fn server(&mut self, raw: Section<RawServer>) -> Server {
        let broken = matches!(raw, Section::Broken);
        let raw = raw.or_default();
        let hostname = match raw.hostname {
            Some(h) => match check_domain(&h) {
                Ok(h) => h,
                Err(message) => {
                    self.err("server.hostname", message.to_string());
                    String::new()
                }
            },
            None => {
                if !broken {
                    self.err(
                        "server.hostname",
                        "is required (the name in the banner and EHLO, e.g. relay.example.com)",
                    );
                }
                String::new()
            }
        };
        let spool_dir = self.path("server.spool_dir", raw.spool_dir);
        let authserv_id = match raw.authserv_id {
            Some(id) => check_domain(&id).unwrap_or_else(|message| {
                self.err("server.authserv_id", message.to_string());
                String::new()
            }),
            None => hostname.clone(),
        };
        Server {
            authserv_id,
            hostname,
            spool_dir: spool_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_SPOOL_DIR)),
        }
    }

    /// `upstreams[i].tls_name`: a domain name (an IP address belongs in `address`), and only
    /// where TLS is used.
    fn tls_name(&mut self, at: &str, raw: Option<String>, tls: UpstreamTls) -> Option<String> {
        let name = match check_domain(&raw?) {
            Ok(name) => name,
            Err(message) => {
                self.err(format!("{at}.tls_name"), message.to_string());
                return None;
            }
        };
        if tls == UpstreamTls::None {
            self.err(
                format!("{at}.tls_name"),
                "needs tls = \"required\": with tls = \"none\" no certificate is seen",
            );
        }
        Some(name)
    }

    fn tls(&mut self, raw: RawTls) -> Tls {
        let min_version = self
            .choice(
                "tls.min_version",
                raw.min_version,
                TlsVersion::Tls12,
                &[("1.2", TlsVersion::Tls12), ("1.3", TlsVersion::Tls13)],
            )
            .unwrap_or(TlsVersion::Tls12);
        let cert = self.path("tls.cert", raw.cert);
        let key = self.path("tls.key", raw.key);
        let source = match (cert, key) {
            (Some(cert), Some(key)) => {
                files::check_pem(&cert, "tls.cert", &mut self.errors);
                files::check_pem(&key, "tls.key", &mut self.errors);
                CertSource::Files { cert, key }
            }
            (None, None) => CertSource::SelfSigned,
            (Some(_), None) => {
                self.err(
                    "tls.key",
                    "is required when tls.cert is given (leave out both for a self-signed certificate)",
                );
                CertSource::SelfSigned
            }
            (None, Some(_)) => {
                self.err(
                    "tls.cert",
                    "is required when tls.key is given (leave out both for a self-signed certificate)",
                );
                CertSource::SelfSigned
            }
        };
        Tls {
            source,
            min_version,
        }
    }

    fn listeners(
        &mut self,
        raw: Section<Vec<Option<RawListener>>>,
        tls_present: bool,
        auth_present: bool,
    ) -> Vec<Listener> {
        let broken = matches!(raw, Section::Broken);
        let raw = raw.or_default();
        if raw.is_empty() && !broken {
            self.err(
                "listeners",
                "at least one [[listeners]] is required (e.g. bind = \"0.0.0.0:25\")",
            );
        }
        let mut names = HashSet::new();
        let mut binds = HashSet::new();
        let mut listeners = Vec::new();
        for (i, raw) in raw.into_iter().enumerate() {
            let Some(raw) = raw else { continue };
            let at = format!("listeners[{i}]");
            let name = self.unique_name(&mut names, &at, raw.name, "listener", i);
            let bind = match raw.bind {
                Some(text) => match text.trim().parse::<SocketAddr>() {
                    Ok(addr) => {
                        if !binds.insert(addr) {
                            self.err(
                                format!("{at}.bind"),
                                format!("{addr} is bound by another listener"),
                            );
                        }
                        Some(addr)
                    }
                    Err(_) => {
                        self.err(
                            format!("{at}.bind"),
                            format!("{text:?} is not an address and port (use e.g. 0.0.0.0:25, [::]:25, 127.0.0.1:2525)"),
                        );
                        None
                    }
                },
                None => {
                    self.err(format!("{at}.bind"), "is required (e.g. \"0.0.0.0:25\")");
                    None
                }
            };
            // An invalid tls or auth value was reported; checks that depend on it are skipped.
            let tls_choice = self.choice(
                &format!("{at}.tls"),
                raw.tls,
                ListenerTls::StartTls,
                &[
                    ("none", ListenerTls::None),
                    ("starttls", ListenerTls::StartTls),
                    ("implicit", ListenerTls::Implicit),
                ],
            );
            let tls = tls_choice.unwrap_or(ListenerTls::StartTls);
            if tls_choice.is_some() && tls != ListenerTls::None && !tls_present {
                self.err(
                    format!("{at}.tls"),
                    format!(
                        "{} needs a [tls] table (with cert and key; without them a self-signed \
                         certificate is generated), or set tls = \"none\"",
                        match tls {
                            ListenerTls::Implicit => "tls = \"implicit\"",
                            _ => "tls = \"starttls\" (the default)",
                        }
                    ),
                );
            }
            let mut require_tls = raw.require_tls.unwrap_or(false);
            match tls_choice {
                Some(ListenerTls::None) if require_tls => self.err(
                    format!("{at}.require_tls"),
                    "cannot be true with tls = \"none\" (no client could ever send mail)",
                ),
                // The whole connection is TLS, so nothing is ever sent in clear.
                Some(ListenerTls::Implicit) => require_tls = true,
                _ => {}
            }
            let auth_choice = self.choice(
                &format!("{at}.auth"),
                raw.auth,
                AuthMode::Off,
                &[
                    ("off", AuthMode::Off),
                    ("optional", AuthMode::Optional),
                    ("required", AuthMode::Required),
                ],
            );
            let auth = auth_choice.unwrap_or(AuthMode::Off);
            if auth != AuthMode::Off && !auth_present {
                self.err(
                    format!("{at}.auth"),
                    "AUTH needs an [auth] table (with users_file), or set auth = \"off\"",
                );
            }
            let allow = self.nets(&format!("{at}.allow"), raw.allow, &["0.0.0.0/0", "::/0"]);
            if allow.is_empty() {
                self.err(
                    format!("{at}.allow"),
                    "is empty, so nobody could connect (leave it out to allow everyone)",
                );
            }
            let deny = self.nets(&format!("{at}.deny"), raw.deny, &[]);
            let bare_lf = self
                .choice(
                    &format!("{at}.bare_lf"),
                    raw.bare_lf,
                    BareLf::Trusted,
                    &[
                        ("reject", BareLf::Reject),
                        ("normalize", BareLf::Normalize),
                        ("trusted", BareLf::Trusted),
                    ],
                )
                .unwrap_or(BareLf::Trusted);
            let trusted_proxies =
                self.nets(&format!("{at}.trusted_proxies"), raw.trusted_proxies, &[]);
            if let Some(bind) = bind {
                listeners.push(Listener {
                    name,
                    bind,
                    tls,
                    require_tls,
                    auth,
                    allow,
                    deny,
                    bare_lf,
                    trusted_proxies: std::sync::Arc::new(trusted_proxies),
                });
            }
        }
        listeners
    }

    fn relay(&mut self, raw: RawRelay, hostname: &str) -> Relay {
        let accepted_domains = self.domains("relay.accepted_domains", raw.accepted_domains);
        let default_postmaster = format!(
            "postmaster@{}",
            accepted_domains.first().map_or(hostname, String::as_str)
        );
        let postmaster = match raw.postmaster {
            Some(text) => Address::parse(&text).unwrap_or_else(|e| {
                self.err(
                    "relay.postmaster",
                    format!("{text:?} is not an address ({e})"),
                );
                Address::parse(&default_postmaster).unwrap_or_else(|_| placeholder_postmaster())
            }),
            None => {
                Address::parse(&default_postmaster).unwrap_or_else(|_| placeholder_postmaster())
            }
        };
        let relay_networks = self.nets("relay.relay_networks", raw.relay_networks, &[]);
        let recipients_file = self.path("relay.recipients_file", raw.recipients_file);
        let recipients = recipients_file
            .as_ref()
            .map(|path| files::load_recipients(path, "relay.recipients_file", &mut self.errors));
        Relay {
            accepted_domains,
            relay_networks,
            recipients_file,
            recipients,
            postmaster,
        }
    }

    fn auth(&mut self, raw: RawAuth) -> Auth {
        let users_file = self.path("auth.users_file", raw.users_file);
        let users = users_file
            .as_ref()
            .map(|path| files::load_users(path, "auth.users_file", &mut self.errors))
            .unwrap_or_default();
        Auth {
            users_file,
            max_failures: self.count("auth.max_failures", raw.max_failures, 5, 1, u32::MAX.into()),
            failure_window: self.duration("auth.failure_window", raw.failure_window, "10m", false),
            lockout: self.duration("auth.lockout", raw.lockout, "15m", false),
            users,
            check_display_name: raw.check_display_name.unwrap_or(true),
        }
    }

    fn limits(&mut self, raw: RawLimits) -> Limits {
        let max_message_size = self.size(
            "limits.max_message_size",
            raw.max_message_size,
            25 << 20,
            false,
        );
        // Room for one more message of the largest size, plus half again for the queue's
        // own files; 0 explicitly disables the check.
        let free_default = max_message_size.saturating_add(max_message_size / 2);
        let max = MAX_USIZE;
        let max_connections: usize =
            self.count("limits.max_connections", raw.max_connections, 1000, 1, max);
        Limits {
            max_message_size,
            max_recipients: self.count("limits.max_recipients", raw.max_recipients, 100, 1, max),
            max_connections,
            max_connections_per_ip: self.count(
                "limits.max_connections_per_ip",
                raw.max_connections_per_ip,
                20,
                1,
                max,
            ),
            max_errors: self.count("limits.max_errors", raw.max_errors, 10, 1, u32::MAX.into()),
            max_command_length: self.count(
                "limits.max_command_length",
                raw.max_command_length,
                1024,
                MIN_COMMAND_LENGTH,
                MAX_COMMAND_LENGTH,
            ),
            min_free_space: self.size(
                "limits.min_free_space",
                raw.min_free_space,
                free_default,
                true,
            ),
            hop_limit: self.count("limits.hop_limit", raw.hop_limit, 100, 1, u32::MAX.into()),
            pregreet_wait: self.duration("limits.pregreet_wait", raw.pregreet_wait, "0s", true),
            command_timeout: self.duration(
                "limits.command_timeout",
                raw.command_timeout,
                "5m",
                false,
            ),
            data_timeout: self.duration("limits.data_timeout", raw.data_timeout, "10m", false),
            stress_connections: {
                let percent: usize =
                    self.count("limits.stress_threshold", raw.stress_threshold, 80, 1, 100);
                // Rounded up, at least one connection.
                max_connections.saturating_mul(percent).div_ceil(100).max(1)
            },
            stress_timeout: self.duration(
                "limits.stress_timeout",
                raw.stress_timeout,
                "10s",
                false,
            ),
            session_timeout: self.duration(
                "limits.session_timeout",
                raw.session_timeout,
                "1h",
                false,
            ),
            shutdown_grace: self.duration("limits.shutdown_grace", raw.shutdown_grace, "30s", true),
        }
    }

    fn rate_limits(&mut self, raw: RawRateLimits) -> RateLimits {
        RateLimits {
            connections_per_ip: self.rate("rate_limits.connections_per_ip", raw.connections_per_ip),
            messages_per_ip: self.rate("rate_limits.messages_per_ip", raw.messages_per_ip),
            messages_per_user: self.rate("rate_limits.messages_per_user", raw.messages_per_user),
            recipients_per_ip: self.rate("rate_limits.recipients_per_ip", raw.recipients_per_ip),
        }
    }

    fn upstreams(&mut self, raw: Section<Vec<Option<RawUpstream>>>) -> Vec<Upstream> {
        let broken = matches!(raw, Section::Broken);
        let raw = raw.or_default();
        if raw.is_empty() && !broken {
            self.err(
                "upstreams",
                "at least one [[upstreams]] is required (e.g. address = \"exchange.example.internal:25\")",
            );
        }
        let mut names = HashSet::new();
        let mut upstreams = Vec::new();
        for (i, raw) in raw.into_iter().enumerate() {
            let Some(raw) = raw else { continue };
            let at = format!("upstreams[{i}]");
            let name = self.unique_name(&mut names, &at, raw.name, "upstream", i);
            let address = match raw.address {
                Some(address) => {
                    if let Err(message) = check_host_port(&address) {
                        self.err(format!("{at}.address"), message.to_string());
                    }
                    address
                }
                None => {
                    self.err(
                        format!("{at}.address"),
                        "is required (host:port, e.g. \"10.0.0.5:25\")",
                    );
                    String::new()
                }
            };
            let tls = self
                .choice(
                    &format!("{at}.tls"),
                    raw.tls,
                    UpstreamTls::Required,
                    &[
                        ("none", UpstreamTls::None),
                        ("opportunistic", UpstreamTls::Opportunistic),
                        ("required", UpstreamTls::Required),
                    ],
                )
                .unwrap_or(UpstreamTls::Required);
            let ca = self.path(&format!("{at}.ca"), raw.ca);
            if let Some(ca) = &ca {
                files::check_pem(ca, &format!("{at}.ca"), &mut self.errors);
            }
            let tls_name = self.tls_name(&at, raw.tls_name, tls);
            let domains = self.domains(&format!("{at}.domains"), raw.domains);
            let auth_user = raw.auth_user;
            if auth_user.as_deref().is_some_and(|u| u.trim().is_empty()) {
                self.err(format!("{at}.auth_user"), "must not be empty");
            }
            let auth_password_file =
                self.path(&format!("{at}.auth_password_file"), raw.auth_password_file);
            let auth_password = match (&auth_user, &auth_password_file) {
                (Some(_), Some(file)) => files::load_password(
                    file,
                    &format!("{at}.auth_password_file"),
                    &mut self.errors,
                ),
                (Some(_), None) => {
                    self.err(
                        format!("{at}.auth_password_file"),
                        "is required when auth_user is set",
                    );
                    None
                }
                (None, Some(_)) => {
                    self.err(
                        format!("{at}.auth_user"),
                        "is required when auth_password_file is set",
                    );
                    None
                }
                (None, None) => None,
            };
            let max_connections = self.count(
                &format!("{at}.max_connections"),
                raw.max_connections,
                20,
                1,
                MAX_USIZE,
            );
            let connect_timeout = self.duration(
                &format!("{at}.connect_timeout"),
                raw.connect_timeout,
                "30s",
                false,
            );
            let timeout = self.duration(&format!("{at}.timeout"), raw.timeout, "5m", false);
            let backoff = self.duration(&format!("{at}.backoff"), raw.backoff, "30s", false);
            if tls == UpstreamTls::None && auth_user.is_some() {
                self.err(
                    format!("{at}.auth_user"),
                    "needs tls = \"opportunistic\" or \"required\": portcullis never sends the upstream password in plaintext",
                );
            }
            upstreams.push(Upstream {
                name,
                address,
                tls,
                ca,
                tls_name,
                domains,
                auth_user,
                auth_password_file,
                auth_password,
                max_connections,
                connect_timeout,
                timeout,
                backoff,
                sign: raw.sign.unwrap_or(false),
            });
        }
        upstreams
    }

    fn headers(&mut self, raw: RawHeaders) -> Headers {
        let patterns = raw
            .strip_untrusted
            .unwrap_or_else(|| DEFAULT_STRIP_UNTRUSTED.map(String::from).to_vec());
        let mut strip_untrusted = Vec::new();
        for (i, pattern) in patterns.into_iter().enumerate() {
            match check_header_pattern(&pattern) {
                Ok(()) => strip_untrusted.push(pattern),
                Err(message) => {
                    self.err(format!("headers.strip_untrusted[{i}]"), message.to_string());
                }
            }
        }
        Headers { strip_untrusted }
    }

    fn queue(&mut self, raw: RawQueue) -> Queue {
        let texts = raw
            .retry
            .unwrap_or_else(|| DEFAULT_RETRY.map(String::from).to_vec());
        if texts.is_empty() {
            self.err(
                "queue.retry",
                "must name at least one interval (e.g. [\"5m\", \"1h\"])",
            );
        }
        let retry = texts
            .into_iter()
            .enumerate()
            .map(|(i, t)| self.duration(&format!("queue.retry[{i}]"), Some(t), "1m", false))
            .collect();
        Queue {
            retry,
            max_age: self.duration("queue.max_age", raw.max_age, "5d", false),
            bounces: raw.bounces.unwrap_or(true),
            delivery_grace: self.duration("queue.delivery_grace", raw.delivery_grace, "10s", true),
            quarantine_keep: self.duration(
                "queue.quarantine_keep",
                raw.quarantine_keep,
                "7d",
                false,
            ),
        }
    }

    // ----- value helpers: each returns a usable value (the default on error) -----

    /// A path; empty is an error. Stored as written.
    fn path(&mut self, key: &str, raw: Option<String>) -> Option<PathBuf> {
        match raw {
            Some(p) if p.trim().is_empty() => {
                self.err(key, "must not be empty (leave the key out instead)");
                None
            }
            Some(p) => Some(PathBuf::from(p)),
            None => None,
        }
    }

    /// The `name` of entry `at` of an array of tables (`kind` is `listener` or `upstream`):
    /// as given, or `<kind><index>`; must be a plain word and unique among `seen`.
    fn unique_name(
        &mut self,
        seen: &mut HashSet<String>,
        at: &str,
        raw: Option<String>,
        kind: &str,
        index: usize,
    ) -> String {
        let key = format!("{at}.name");
        let name = match raw {
            Some(n) if n.is_empty() || n.chars().any(|c| c.is_control() || c.is_whitespace()) => {
                self.err(
                    &key,
                    format!("{n:?} is not a name (use letters, digits, - or _)"),
                );
                n
            }
            Some(n) => n,
            None => format!("{kind}{index}"),
        };
        if !seen.insert(name.clone()) {
            self.err(key, format!("duplicate {kind} name {name:?}"));
        }
        name
    }

    /// One of a fixed set of strings; `None` (error reported) when it is none of them, so
    /// that checks depending on the value can skip themselves.
    fn choice<T: Copy>(
        &mut self,
        key: &str,
        raw: Option<String>,
        default: T,
        options: &[(&str, T)],
    ) -> Option<T> {
        let Some(text) = raw else {
            return Some(default);
        };
        if let Some((_, value)) = options.iter().find(|(name, _)| *name == text) {
            return Some(*value);
        }
        let names: Vec<String> = options.iter().map(|(n, _)| format!("{n:?}")).collect();
        self.err(key, format!("{text:?} is not one of {}", names.join(", ")));
        None
    }

    fn duration(
        &mut self,
        key: &str,
        raw: Option<String>,
        default: &str,
        zero_ok: bool,
    ) -> Duration {
        let fallback = parse_duration(default).unwrap_or_default();
        let Some(text) = raw else { return fallback };
        match parse_duration(&text) {
            Ok(d) if d.is_zero() && !zero_ok => {
                self.err(key, "must be greater than zero");
                fallback
            }
            Ok(d) => d,
            Err(e) => {
                self.err(key, e.to_string());
                fallback
            }
        }
    }

    fn size(&mut self, key: &str, raw: Option<RawSize>, default: u64, zero_ok: bool) -> u64 {
        let parsed = match raw {
            None => return default,
            Some(RawSize::Bytes(n)) => u64::try_from(n).map_err(|_| UnitError::Negative(n)),
            Some(RawSize::Text(t)) => parse_size(&t),
        };
        match parsed {
            Ok(0) if !zero_ok => {
                self.err(key, "must be greater than zero");
                default
            }
            Ok(n) => n,
            Err(e) => {
                self.err(key, e.to_string());
                default
            }
        }
    }

    /// An integer in `min..=max`, converted to the field's type.
    fn count<T: TryFrom<i64>>(
        &mut self,
        key: &str,
        raw: Option<i64>,
        default: T,
        min: i64,
        max: i64,
    ) -> T {
        let Some(n) = raw else { return default };
        if n < min || n > max {
            let message = if min == 1 && n <= 0 {
                format!("must be at least 1 (got {n})")
            } else {
                format!("must be between {min} and {max} (got {n})")
            };
            self.err(key, message);
            return default;
        }
        match T::try_from(n) {
            Ok(v) => v,
            Err(_) => {
                self.err(key, format!("{n} is too large"));
                default
            }
        }
    }

    fn rate(&mut self, key: &str, raw: Option<String>) -> Option<Rate> {
        match parse_rate(&raw?) {
            Ok(rate) => Some(rate),
            Err(e) => {
                self.err(key, e.to_string());
                None
            }
        }
    }

    /// A list of CIDR prefixes; a bare address means that host alone. Host bits are cleared.
    fn nets(&mut self, key: &str, raw: Option<Vec<String>>, default: &[&str]) -> Vec<IpNet> {
        let texts = raw.unwrap_or_else(|| default.iter().map(|s| s.to_string()).collect());
        let mut nets = Vec::new();
        for (i, text) in texts.iter().enumerate() {
            let t = text.trim();
            let net = t
                .parse::<IpNet>()
                .or_else(|_| t.parse::<IpAddr>().map(IpNet::from));
            match net {
                Ok(net) => nets.push(net.trunc()),
                Err(_) => self.err(
                    format!("{key}[{i}]"),
                    format!(
                        "{text:?} is not a network (use e.g. 10.0.0.0/8, 192.0.2.7, 2001:db8::/32)"
                    ),
                ),
            }
        }
        nets
    }

    /// A list of domains, lower-cased, trailing dot removed.
    fn domains(&mut self, key: &str, raw: Option<Vec<String>>) -> Vec<String> {
        let mut domains = Vec::new();
        for (i, text) in raw.unwrap_or_default().iter().enumerate() {
            match check_domain(text) {
                Ok(d) => domains.push(d),
                Err(message) => self.err(format!("{key}[{i}]"), message.to_string()),
            }
        }
        domains
    }
}

/// `value` without its key `inner` (when `value` is a table holding it), and that key's value:
/// an array of tables inside a table is read entry by entry on its own, so that one bad entry
/// hides neither the others nor the table's other keys.
fn split_off(mut value: toml::Value, inner: &str) -> (toml::Value, Option<toml::Value>) {
    let taken = value.as_table_mut().and_then(|t| t.remove(inner));
    (value, taken)
}

/// Stands in for the postmaster address when the configuration is invalid anyway (a missing or
/// broken `server.hostname` was reported already): never reaches a running relay.
fn placeholder_postmaster() -> Address {
    Address::parse("postmaster@invalid").expect("a valid literal address")
}

/// Checks a domain name, in U-label or A-label form, and returns its canonical form (see
/// [`canonical_domain`]): the A-label form in lower case, without a trailing dot, so that it
/// compares equal to the domain of every address written either way.
pub(super) fn check_domain(text: &str) -> Result<String, ValueError> {
    let bad = |problem| {
        Err(ValueError::Domain {
            text: text.to_owned(),
            problem,
        })
    };
    let name = text.strip_suffix('.').unwrap_or(text);
    if name.is_empty() {
        return bad(DomainProblem::Empty);
    }
    if name.parse::<IpAddr>().is_ok() {
        return bad(DomainProblem::IpAddress);
    }
    match canonical_domain(name) {
        Ok(domain) => Ok(domain),
        Err(AddressError::BadIdna) => bad(DomainProblem::Idna),
        Err(_) => bad(DomainProblem::Labels),
    }
}

/// Checks a `senders` or recipients_file entry: an address (`local@domain`, the local part a
/// dot-string or a quoted-string, RFC 5321 §4.1.2) or `@domain` (a whole domain). Returns the
/// entry in canonical form: the address as [`Address`] writes it (domain as its A-label, lower
/// case), or `@` and the canonical domain. U-labels and UTF-8 local parts are accepted.
pub(super) fn check_sender(text: &str) -> Result<String, ValueError> {
    let text = text.trim();
    if let Some(domain) = text.strip_prefix('@') {
        return check_domain(domain).map(|d| format!("@{d}"));
    }
    let owned = || text.to_owned();
    if !text.contains('@') {
        return Err(ValueError::NotAnAddress { text: owned() });
    }
    match Address::parse(text) {
        Ok(address) if address.is_ip_literal() => Err(ValueError::AddressLiteral { text: owned() }),
        Ok(address) => Ok(address.to_string()),
        Err(AddressError::BadIdna | AddressError::BadDomain) => {
            let (_, domain) = text.rsplit_once('@').unwrap_or_default();
            Err(check_domain(domain)
                .err()
                .unwrap_or_else(|| ValueError::MalformedDomain { text: owned() }))
        }
        Err(reason) => Err(ValueError::Address {
            text: owned(),
            reason,
        }),
    }
}

/// Checks an upstream `host:port` (host a domain, IPv4 address or `[IPv6]`; port required).
pub(super) fn check_host_port(text: &str) -> Result<(), ValueError> {
    let bad = || ValueError::HostPort {
        text: text.to_owned(),
    };
    if text.parse::<SocketAddr>().is_ok() {
        return Ok(());
    }
    let (host, port) = text.rsplit_once(':').ok_or_else(bad)?;
    match port.parse::<u16>() {
        Ok(p) if p > 0 => {}
        _ => return Err(bad()),
    }
    if host.contains(':') || host.starts_with('[') {
        return Err(bad());
    }
    check_domain(host).map(|_| ()).map_err(|_| bad())
}

/// Checks a header name pattern: header-name characters, `*` only at the end.
pub(super) fn check_header_pattern(pattern: &str) -> Result<(), ValueError> {
    let name = pattern.strip_suffix('*').unwrap_or(pattern);
    let ok = !pattern.is_empty()
        && name
            .bytes()
            .all(|b| b.is_ascii_graphic() && b != b':' && b != b'*');
    if ok {
        Ok(())
    } else {
        Err(ValueError::HeaderPattern {
            pattern: pattern.to_owned(),
        })
    }
}
