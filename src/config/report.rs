//! What `portcullis check-config` prints about a valid policy: a summary of the effective
//! policy and warnings about dangerous but valid combinations.

use std::fmt::Write as _;

use ipnet::IpNet;

use super::units::{format_duration, format_rate, format_size};
use super::{
    AuthMode, BareLf, CertSource, Config, ListenerTls, OnError, Rate, TlsVersion, UpstreamTls,
    Verify,
};

/// IPv4 (or IPv6) prefixes this short or shorter in `relay_networks` make an open relay.
const OPEN_RELAY_MAX_PREFIX: u8 = 7;

fn is_everyone(net: &IpNet) -> bool {
    net.prefix_len() == 0
}

/// `[containment]` triggers that can never trip.
fn containment_warnings(config: &Config, auth_used: bool) -> Vec<String> {
    let c = &config.containment;
    let mut w = Vec::new();
    if c.any() && !auth_used {
        w.push(
            "[containment] is set but no listener allows AUTH: it only ever suspends \
             authenticated logins, so it does nothing here."
                .to_owned(),
        );
    }
    if c.rate_limit_hits.is_some() && config.rate_limits.messages_per_user.is_none() {
        w.push(
            "containment.rate_limit_hits counts rate_limits.messages_per_user refusals, and \
             messages_per_user is not set: it never trips."
                .to_owned(),
        );
    }
    w
}

/// `[cluster]` settings that share less than an operator would think.
fn cluster_warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if config.cluster.redis.is_none() {
        return w;
    }
    if config
        .listeners
        .iter()
        .any(|l| l.trusted_proxies.is_empty())
        && config
            .listeners
            .iter()
            .any(|l| !l.trusted_proxies.is_empty())
    {
        w.push(
            "[cluster] is set and some listeners have no trusted_proxies while others do: behind \
             a load balancer every listener it forwards to needs them, or every client is seen as \
             the load balancer."
                .to_owned(),
        );
    }
    if config.cluster.node == config.server.hostname {
        w.push(format!(
            "[cluster] node is {:?}, the server.hostname: nodes behind one load balancer or MX name \
             usually share the host name, and would then share one node name in logs, the \
             journal and Received:; give each node its own [cluster] node.",
            config.cluster.node
        ));
    }
    if config.cluster.on_error == OnError::Tempfail {
        w.push(
            "cluster.on_error = \"tempfail\": while Redis is unreachable every new session is \
             refused with 421 4.3.0; a Redis outage stops all mail."
                .to_owned(),
        );
    }
    w
}

/// Warnings, one sentence each.
pub(super) fn warnings(config: &Config) -> Vec<String> {
    let mut w = Vec::new();
    let open: Vec<String> = config
        .relay
        .relay_networks
        .iter()
        .filter(|n| n.prefix_len() <= OPEN_RELAY_MAX_PREFIX)
        .map(ToString::to_string)
        .collect();
    if !open.is_empty() {
        w.push(format!(
            "relay.relay_networks contains {}: clients from a large part of the internet may send \
             mail to any domain without authenticating, which makes this an open relay.",
            open.join(", ")
        ));
    }
    for l in &config.listeners {
        if l.auth != AuthMode::Off && l.tls == ListenerTls::None {
            w.push(format!(
                "Listener {:?} allows AUTH but has tls = \"none\": passwords would cross the \
                 network unencrypted; use tls = \"starttls\" or \"implicit\".",
                l.name
            ));
        }
        if l.require_tls && l.bind.port() == 25 && l.allow.iter().any(is_everyone) {
            w.push(format!(
                "Listener {:?} requires TLS on port 25 and is open to everyone: a publicly \
                 referenced MX must not require TLS (RFC 3207 section 4), or mail from servers \
                 without TLS is lost; require TLS only where port 25 is restricted to known peers.",
                l.name
            ));
        }
        let wide: Vec<String> = (l.trusted_proxies.iter())
            .filter(|n| n.prefix_len() <= OPEN_RELAY_MAX_PREFIX)
            .map(ToString::to_string)
            .collect();
        if !wide.is_empty() {
            w.push(format!(
                "Listener {:?} trusts PROXY headers from {}: anyone there can claim any client \
                 address (and with it relay_networks); list only the load balancers' addresses.",
                l.name,
                wide.join(", ")
            ));
        }
        // A LOCAL/UNKNOWN header (a health check, a UNIX-socket frontend) is a session of the
        // proxy itself, with the proxy's rights.
        let relaying: Vec<String> = (l.trusted_proxies.iter())
            .filter(|p| {
                (config.relay.relay_networks.iter())
                    .any(|r| r.contains(&p.network()) || p.contains(&r.network()))
            })
            .map(ToString::to_string)
            .collect();
        if !relaying.is_empty() {
            w.push(format!(
                "Listener {:?} trusts PROXY headers from {}, which relay.relay_networks also \
                 covers: a session the proxy opens for itself (a health check, a LOCAL or UNKNOWN \
                 header) may relay to any domain; keep the load balancers out of relay_networks.",
                l.name,
                relaying.join(", ")
            ));
        }
    }
    if !config.relay.accepted_domains.is_empty() && config.relay.recipients_file.is_none() {
        for l in &config.listeners {
            if l.auth != AuthMode::Required && l.allow.iter().any(is_everyone) {
                w.push(format!(
                    "Listener {:?} is open to everyone and accepts mail for accepted_domains \
                     without relay.recipients_file: mail to unknown recipients is accepted, then \
                     bounced to its possibly forged sender (backscatter); export the valid \
                     recipients to a recipients_file (see docs/policy.md).",
                    l.name
                ));
            }
        }
    }
    if let Some(tls) = &config.tls
        && tls.source == CertSource::SelfSigned
    {
        w.push(
            "No [tls] cert and key: a self-signed certificate is generated in memory at start; \
             clients cannot verify it. Use it for trying portcullis out only."
                .to_owned(),
        );
    }
    let auth_used = config.listeners.iter().any(|l| l.auth != AuthMode::Off);
    if let Some(auth) = &config.auth
        && auth_used
        && auth.users.is_empty()
    {
        w.push(
            "[auth] has no users (no users_file, or an empty one): nobody can authenticate."
                .to_owned(),
        );
    }
    w.extend(containment_warnings(config, auth_used));
    w.extend(cluster_warnings(config));
    if let Some(auth) = &config.auth
        && auth_used
    {
        if config.rate_limits.messages_per_user.is_none() && !auth.users.is_empty() {
            w.push(
                "A listener allows AUTH but rate_limits.messages_per_user is not set: a \
                 compromised account can send without limit."
                    .to_owned(),
            );
        }
        w.extend(password_hash_warnings(&auth.users));
        for u in &auth.users {
            if u.senders.is_empty() && !u.name.contains('@') {
                w.push(format!(
                    "User {:?} has no senders and its login is not an address: after AUTH it \
                     may send as nobody (every MAIL FROM but <> is refused).",
                    u.name
                ));
            }
        }
    }
    for u in &config.upstreams {
        // Only "required" verifies: "opportunistic" encrypts when it can but takes any
        // certificate, and "none" never starts TLS. An operator who names a CA expects it used.
        if u.ca.is_some() && u.tls != UpstreamTls::Required {
            w.push(format!(
                "Upstream {:?} sets ca but has tls = \"{}\": its certificate is not verified \
                 against that CA (only tls = \"required\" verifies); use tls = \"required\".",
                u.name,
                if u.tls == UpstreamTls::None {
                    "none"
                } else {
                    "opportunistic"
                }
            ));
        }
        if u.tls_name.is_some() && u.tls == UpstreamTls::Opportunistic {
            w.push(format!(
                "Upstream {:?} sets tls_name but has tls = \"opportunistic\": the name is sent \
                 as SNI, never verified in the certificate (only tls = \"required\" verifies); \
                 use tls = \"required\".",
                u.name
            ));
        }
        if u.auth_user.is_some() && u.tls != UpstreamTls::Required {
            w.push(format!(
                "Upstream {:?} authenticates with tls = \"opportunistic\": the upstream's \
                 certificate is not verified, so a machine in the middle could collect the \
                 password; use tls = \"required\" (with ca when it has a private CA).",
                u.name
            ));
        }
    }
    if !config.upstreams.is_empty() && config.upstreams.iter().all(|u| !u.domains.is_empty()) {
        w.push(
            "No [[upstreams]] has empty domains (the default route): mail for any other domain \
             (e.g. from relay_networks or authenticated users) cannot be delivered and waits in \
             the queue until it expires."
                .to_owned(),
        );
    }
    w.extend(check_warnings(config));
    if !config.queue.bounces {
        w.push(
            "queue.bounces = false: senders are not told when their mail cannot be delivered \
             (failures are only logged)."
                .to_owned(),
        );
    }
    w
}

/// The names of the DNS checks that run on untrusted mail.
fn dns_checks(c: &Config) -> Vec<&'static str> {
    let dmarc = c.dmarc.verify != Verify::Off;
    let mut checks = Vec::new();
    if c.spf_runs() {
        checks.push("SPF");
    }
    if c.dkim_runs() {
        checks.push("DKIM");
    }
    if dmarc {
        checks.push("DMARC");
    }
    if !c.dnsbl.zones.is_empty() {
        checks.push("DNSBL");
    }
    checks
}

/// The names of the upstreams with `sign = true`, in file order.
fn signing_upstreams(c: &Config) -> Vec<&str> {
    c.upstreams
        .iter()
        .filter(|u| u.sign)
        .map(|u| u.name.as_str())
        .collect()
}

/// Warnings about the mail-authentication, DNSBL and signing sections.
fn check_warnings(c: &Config) -> Vec<String> {
    let mut w = Vec::new();
    if c.spf.verify == Verify::Enforce {
        w.push(
            "[spf] verify = \"enforce\" refuses mail whose SPF result is fail at MAIL FROM, \
             which includes mail forwarded by mailing lists and forwarders that DKIM would \
             have passed under DMARC (RFC 7489 section 10.1); prefer verify = \"record\" with \
             [dmarc] verify = \"enforce\"."
                .to_owned(),
        );
    }
    let signers = signing_upstreams(c);
    if !signers.is_empty() && c.dkim.sign.is_empty() {
        w.push(format!(
            "{} {} sign = true but there is no [[dkim.sign]]: no mail is signed.",
            if signers.len() == 1 {
                "Upstream"
            } else {
                "Upstreams"
            },
            quoted(&signers),
        ));
    }
    if signers.is_empty() && !c.dkim.sign.is_empty() {
        w.push(
            "[[dkim.sign]] is set but no [[upstreams]] has sign = true: no mail is signed (set \
             sign = true on the smarthost towards the internet)."
                .to_owned(),
        );
    }
    let checks = dns_checks(c);
    if !checks.is_empty() && c.dns.nameservers.is_empty() {
        w.push(format!(
            "{} {} the system resolver (/etc/resolv.conf, no [dns] nameservers): DNSBLs refuse \
             queries that arrive through public resolvers (answering 127.255.255.x), and the \
             results are only as trustworthy as that resolver; set [dns] nameservers to a \
             validating resolver of your own.",
            checks.join(", "),
            if checks.len() == 1 { "uses" } else { "use" },
        ));
    }
    let weights: u64 = c.dnsbl.zones.iter().map(|z| u64::from(z.weight)).sum();
    if !c.dnsbl.zones.is_empty() && weights < u64::from(c.dnsbl.threshold) {
        w.push(format!(
            "dnsbl.threshold is {} but the weights of all zones add up to {weights}: no client \
             is ever refused.",
            c.dnsbl.threshold
        ));
    }
    if c.dmarc.own_domains_reject && c.dmarc.verify == Verify::Off {
        w.push(
            "dmarc.own_domains = \"reject\" has no effect while [dmarc] verify = \"off\"."
                .to_owned(),
        );
    }
    w
}

/// Users whose hashes are weaker than every argon2id configuration of the OWASP Password
/// Storage Cheat Sheet, and users files mixing parameter sets: an unknown login costs what
/// the most common set costs, so a user with another set is told apart from an unknown login
/// by the time the answer takes.
fn password_hash_warnings(users: &[super::User]) -> Vec<String> {
    use crate::policy::credentials::{HashParams, OWASP_MIN_M_KIB, OWASP_MIN_M_T};
    let mut w = Vec::new();
    let mut sets: Vec<(HashParams, Vec<&str>)> = Vec::new();
    for u in users {
        let Some(p) = HashParams::of(&u.password_hash) else {
            continue;
        };
        match sets.iter_mut().find(|(q, _)| *q == p) {
            Some((_, names)) => names.push(&u.name),
            None => sets.push((p, vec![&u.name])),
        }
    }
    for (p, names) in &sets {
        if p.below_owasp() {
            w.push(format!(
                "{} {} {} password hashes with {p}, weaker than every argon2id configuration \
                 of the OWASP Password Storage Cheat Sheet (argon2id with m >= \
                 {OWASP_MIN_M_KIB} KiB and m*t >= {OWASP_MIN_M_T}): a stolen users file is \
                 cheap to crack; set new passwords with `portcullis passwd`.",
                if names.len() == 1 { "User" } else { "Users" },
                quoted(names),
                if names.len() == 1 { "has" } else { "have" },
            ));
        }
    }
    if sets.len() > 1 {
        let common = crate::policy::credentials::most_common_params(
            users.iter().map(|u| u.password_hash.as_str()),
        );
        let others: Vec<String> = sets
            .iter()
            .filter(|(p, _)| *p != common)
            .map(|(p, names)| format!("{p} ({})", quoted(names)))
            .collect();
        w.push(format!(
            "The users file mixes argon2 parameter sets: most users have {common}, others {}. \
             Unknown logins are checked at the cost of {common}, so the time AUTH takes tells \
             those other users apart from unknown logins; give every user the same parameters \
             (`portcullis passwd`).",
            others.join(", ")
        ));
    }
    w
}

fn quoted(names: &[&str]) -> String {
    names
        .iter()
        .map(|n| format!("{n:?}"))
        .collect::<Vec<_>>()
        .join(", ")
}

fn nets(list: &[IpNet]) -> String {
    if list.is_empty() {
        return "(none)".to_owned();
    }
    list.iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

fn list(items: &[String]) -> String {
    if items.is_empty() {
        "(none)".to_owned()
    } else {
        items.join(", ")
    }
}

fn rate(r: Option<Rate>) -> String {
    r.map_or_else(|| "unlimited".to_owned(), format_rate)
}

/// A readable multi-line summary of the effective policy.
pub(super) fn summary(c: &Config) -> String {
    // Writing to a String cannot fail; the results are ignored for that reason only.
    let mut s = String::new();
    let source = c.source.as_ref().map_or_else(
        || "embedded default".to_owned(),
        |p| p.display().to_string(),
    );
    let _ = writeln!(s, "policy: {source}");
    let _ = writeln!(s, "hostname: {}", c.server.hostname);
    let _ = writeln!(s, "spool: {}", c.server.spool_dir.display());
    match &c.tls {
        Some(tls) => {
            let version = match tls.min_version {
                TlsVersion::Tls12 => "1.2",
                TlsVersion::Tls13 => "1.3",
            };
            let cert = match &tls.source {
                CertSource::Files { cert, key } => {
                    format!("cert {}, key {}", cert.display(), key.display())
                }
                CertSource::SelfSigned => "self-signed (generated in memory)".to_owned(),
            };
            let _ = writeln!(s, "tls: {cert}, minimum version {version}");
        }
        None => {
            let _ = writeln!(s, "tls: not configured");
        }
    }
    let _ = writeln!(s, "listeners:");
    for l in &c.listeners {
        let tls = match l.tls {
            ListenerTls::None => "none",
            ListenerTls::StartTls => "starttls",
            ListenerTls::Implicit => "implicit",
        };
        let auth = match l.auth {
            AuthMode::Off => "off",
            AuthMode::Optional => "optional",
            AuthMode::Required => "required",
        };
        let bare_lf = match l.bare_lf {
            BareLf::Reject => "reject",
            BareLf::Normalize => "normalize",
            BareLf::Trusted => "trusted",
        };
        let _ = writeln!(
            s,
            "  {} on {}: tls {tls}, require_tls {}, auth {auth}, bare_lf {bare_lf}, allow {}, deny {}",
            l.name,
            l.bind,
            l.require_tls,
            nets(&l.allow),
            nets(&l.deny)
        );
        if !l.trusted_proxies.is_empty() {
            let _ = writeln!(
                s,
                "    trusted proxies (PROXY v1/v2 header required, its client used by every rule): {}",
                nets(&l.trusted_proxies)
            );
        }
    }
    let _ = writeln!(s, "relay:");
    let _ = writeln!(s, "  accepted domains: {}", list(&c.relay.accepted_domains));
    let _ = writeln!(s, "  relay networks: {}", nets(&c.relay.relay_networks));
    let _ = writeln!(s, "  postmaster: {}", c.relay.postmaster);
    match (&c.relay.recipients_file, &c.relay.recipients) {
        (Some(file), Some(r)) => {
            let _ = writeln!(
                s,
                "  recipients: {} entries from {}",
                r.len(),
                file.display()
            );
        }
        _ => {
            let _ = writeln!(s, "  recipients: any address in an accepted domain");
        }
    }
    match &c.auth {
        Some(a) => {
            let file = a
                .users_file
                .as_ref()
                .map_or_else(|| "no users file".to_owned(), |p| p.display().to_string());
            let _ = writeln!(
                s,
                "auth: {} users ({file}); lockout {} after {} failures within {}",
                a.users.len(),
                format_duration(a.lockout),
                a.max_failures,
                format_duration(a.failure_window)
            );
            let _ = writeln!(
                s,
                "  From: display names naming addresses a user does not own: {}",
                if a.check_display_name {
                    "refused"
                } else {
                    "not checked"
                }
            );
        }
        None => {
            let _ = writeln!(s, "auth: not configured");
        }
    }
    let l = &c.limits;
    let _ = writeln!(s, "limits:");
    let _ = writeln!(
        s,
        "  message size {}, recipients {}, hops {}, errors {}, command line {} octets",
        format_size(l.max_message_size),
        l.max_recipients,
        l.hop_limit,
        l.max_errors,
        l.max_command_length
    );
    let _ = writeln!(
        s,
        "  connections {} total, {} per IP; min free space {}",
        l.max_connections,
        l.max_connections_per_ip,
        format_size(l.min_free_space)
    );
    let _ = writeln!(
        s,
        "  timeouts: command {}, data {}, session {}; pregreet wait {}; shutdown grace {}",
        format_duration(l.command_timeout),
        format_duration(l.data_timeout),
        format_duration(l.session_timeout),
        format_duration(l.pregreet_wait),
        format_duration(l.shutdown_grace)
    );
    let r = &c.rate_limits;
    let _ = writeln!(
        s,
        "rate limits: connections/IP {}, messages/IP {}, messages/user {}, recipients/IP {}",
        rate(r.connections_per_ip),
        rate(r.messages_per_ip),
        rate(r.messages_per_user),
        rate(r.recipients_per_ip)
    );
    let k = &c.containment;
    let trigger = |n: Option<u32>| n.map_or_else(|| "off".to_owned(), |n| n.to_string());
    let _ = writeln!(
        s,
        "containment: rate-limit hits {}, recipient domains/hour {}, client addresses/hour {}",
        trigger(k.rate_limit_hits),
        trigger(k.recipient_domains_per_hour),
        trigger(k.client_ips_per_hour)
    );
    let cl = &c.cluster;
    let _ = match &cl.redis {
        Some(url) => writeln!(
            s,
            "cluster: node {}, shared store {url} (rate limits, AUTH lockouts, suspensions), \
             on error {}, timeout {}",
            cl.node,
            cl.on_error.as_str(),
            format_duration(cl.timeout)
        ),
        None => writeln!(s, "cluster: node {}, no shared store", cl.node),
    };
    let _ = writeln!(s, "upstreams:");
    for u in &c.upstreams {
        let tls = match u.tls {
            UpstreamTls::None => "none",
            UpstreamTls::Opportunistic => "opportunistic",
            UpstreamTls::Required => "required",
        };
        let route = if u.domains.is_empty() {
            "default route".to_owned()
        } else {
            format!("for {}", u.domains.join(", "))
        };
        let auth = u
            .auth_user
            .as_ref()
            .map_or_else(|| "no auth".to_owned(), |user| format!("auth as {user}"));
        let sign = if u.sign { ", DKIM-signs" } else { "" };
        let tls = match &u.tls_name {
            Some(name) => format!("{tls} (certificate name {name})"),
            None => tls.to_owned(),
        };
        let _ = writeln!(
            s,
            "  {} at {}: {route}, tls {tls}, {auth}, max {} connections, timeout {:?}, \
             circuit breaker back-off {:?}{sign}",
            u.name, u.address, u.max_connections, u.timeout, u.backoff
        );
    }
    let _ = writeln!(
        s,
        "headers stripped from untrusted mail: {}, and Authentication-Results for {}",
        list(&c.headers.strip_untrusted),
        c.server.authserv_id
    );
    checks_summary(&mut s, c);
    let retry: Vec<String> = c.queue.retry.iter().map(|d| format_duration(*d)).collect();
    let _ = write!(
        s,
        "queue: retry {}, expire after {}, bounces {}, delivery grace {}, quarantine kept {}",
        retry.join(" "),
        format_duration(c.queue.max_age),
        if c.queue.bounces { "on" } else { "off" },
        format_duration(c.queue.delivery_grace),
        format_duration(c.queue.quarantine_keep)
    );
    observe_summary(&mut s, c);
    s
}

/// The `[admin]`, `[alerts]` and `[log]` lines (each after a newline).
fn observe_summary(s: &mut String, c: &Config) {
    match &c.admin {
        Some(a) => {
            let token = match &a.token_file {
                Some(file) => format!("token from {}", file.display()),
                None => "no token (open to local users)".to_owned(),
            };
            let _ = write!(
                s,
                "\nadmin: http://{} (/metrics /healthz /readyz / /api/status), {token}",
                a.bind
            );
        }
        None => {
            let _ = write!(s, "\nadmin: not configured");
        }
    }
    let al = &c.alerts;
    let mut on = Vec::new();
    let mut after = |name: &str, d: Option<std::time::Duration>| {
        if let Some(d) = d {
            on.push(format!("{name} after {}", format_duration(d)));
        }
    };
    after("no_inbound", al.no_inbound);
    after("no_delivery", al.no_delivery);
    after("oldest_message", al.oldest_message);
    after("upstream_down", al.upstream_down);
    if let Some(n) = al.queue_depth {
        on.push(format!("queue_depth at {n}"));
    }
    let on = if on.is_empty() {
        "none".to_owned()
    } else {
        on.join(", ")
    };
    let webhook = al
        .webhook
        .as_deref()
        .and_then(|url| url.parse::<hyper::Uri>().ok())
        // The host and port only: never userinfo a URL may carry.
        .and_then(|uri| {
            let host = uri.host()?;
            Some(match uri.port_u16() {
                Some(port) => format!("{host}:{port}"),
                None => host.to_owned(),
            })
        })
        .map_or_else(
            || "no webhook".to_owned(),
            |host| format!("webhook to {host}"),
        );
    let _ = write!(s, "\nalerts: {on}; {webhook}");
    let format = match c.log.format {
        super::LogFormat::Text => "text",
        super::LogFormat::Json => "json",
    };
    let _ = write!(
        s,
        "\nlog: format {format}; journal kept {}, at most {}",
        format_duration(c.log.journal_keep),
        format_size(c.log.journal_max_size)
    );
}

/// How a check's `verify` reads in the summary.
fn verify(v: Verify) -> &'static str {
    match v {
        Verify::Off => "off",
        Verify::Record => "record",
        Verify::Enforce => "enforce",
    }
}

/// The mail-authentication, DNSBL and signing part of the summary.
fn checks_summary(s: &mut String, c: &Config) {
    let dmarc_on = c.dmarc.verify != Verify::Off;
    let _ = writeln!(s, "mail authentication (untrusted mail only):");
    let servers: Vec<String> = c.dns.nameservers.iter().map(ToString::to_string).collect();
    let _ = writeln!(
        s,
        "  resolver: {}, timeout {} per query",
        if servers.is_empty() {
            "the system's (/etc/resolv.conf)".to_owned()
        } else {
            servers.join(", ")
        },
        format_duration(c.dns.timeout)
    );
    let spf = match c.spf.verify {
        Verify::Off if dmarc_on => "record (run for DMARC)",
        Verify::Enforce => "enforce (fail: 550 5.7.23 at MAIL, temperror: 451 4.7.24)",
        v => verify(v),
    };
    let _ = writeln!(s, "  spf: {spf}");
    let dkim = match (c.dkim.verify, dmarc_on) {
        (true, _) => "record",
        (false, true) => "record (run for DMARC)",
        (false, false) => "off",
    };
    let arc = if dkim == "off" {
        ""
    } else {
        "; arc and iprev recorded with it"
    };
    let _ = writeln!(s, "  dkim verification: {dkim}{arc}");
    let q = &c.dmarc.quarantine_header;
    let dmarc = match c.dmarc.verify {
        Verify::Enforce => format!(
            "enforce (p=reject: 550 5.7.1 after the final dot; p=quarantine: adds \"{}: {}\", \
             removed from untrusted mail)",
            q.name, q.value
        ),
        v => verify(v).to_owned(),
    };
    let own = if c.dmarc.own_domains_reject {
        "; mail from strangers in our accepted domains judged as p=reject"
    } else {
        ""
    };
    let _ = writeln!(s, "  dmarc: {dmarc}{own}");
    if c.dnsbl.zones.is_empty() {
        let _ = writeln!(s, "  dnsbl: off");
    } else {
        let zones: Vec<String> = c.dnsbl.zones.iter().map(zone_summary).collect();
        let _ = writeln!(
            s,
            "  dnsbl: {}; refused at RCPT (550 5.7.1) at weight {} or more; exempt {}",
            zones.join(", "),
            c.dnsbl.threshold,
            nets(&c.dnsbl.exempt)
        );
    }
    let _ = writeln!(s, "dkim signing (authenticated and relay_networks mail):");
    if c.dkim.sign.is_empty() {
        let _ = writeln!(s, "  no keys");
    }
    for k in &c.dkim.sign {
        let _ = writeln!(
            s,
            "  {} selector {}: {}, key {}, headers {}",
            k.domain,
            k.selector,
            k.key.algorithm(),
            k.key_path.display(),
            k.headers.join(" ")
        );
    }
    let signers = signing_upstreams(c);
    let _ = writeln!(
        s,
        "  signed when routed to: {}",
        if signers.is_empty() {
            "no upstream".to_owned()
        } else {
            signers.join(", ")
        }
    );
    if !c.doctor.egress.is_empty() {
        let egress: Vec<String> = c.doctor.egress.iter().map(ToString::to_string).collect();
        let _ = writeln!(s, "doctor egress addresses: {}", egress.join(", "));
    }
}

fn zone_summary(z: &super::DnsblZone) -> String {
    // A zone with its own name may hold an access key (Spamhaus DQS): never printed.
    let zone = if z.name == z.zone {
        z.zone.clone()
    } else {
        format!("{:?} (zone not shown: it may hold an access key)", z.name)
    };
    let answers = match &z.answers {
        None => "any 127.0.0.0/8 answer".to_owned(),
        Some(list) => list
            .iter()
            .map(ToString::to_string)
            .collect::<Vec<_>>()
            .join(" "),
    };
    format!("{zone} (weight {}, {answers})", z.weight)
}
