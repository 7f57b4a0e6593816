//! Compilation of `[admin]`, `[alerts]` and `[log]`.

use std::net::SocketAddr;
use std::sync::Arc;

use super::super::files;
use super::super::observe::{
    Admin, Alerts, DEFAULT_JOURNAL_KEEP, DEFAULT_JOURNAL_MAX_SIZE, Log, LogFormat,
};
use super::super::raw::{RawAdmin, RawAlerts, RawLog};
use super::Compiler;

/// The `[log] format` names.
const LOG_FORMATS: [(&str, LogFormat); 2] = [("text", LogFormat::Text), ("json", LogFormat::Json)];

impl Compiler {
    /// `[admin]`: `None` (error reported) without a usable `bind`.
    pub(super) fn admin(&mut self, raw: RawAdmin) -> Option<Admin> {
        let token_file = self.path("admin.token_file", raw.token_file);
        let token = token_file.as_ref().and_then(|path| {
            let text = files::read(path, "admin.token_file", &mut self.errors)?;
            let token = text.trim();
            if token.is_empty() {
                self.err("admin.token_file", format!("{} is empty", path.display()));
                return None;
            }
            Some(Arc::<str>::from(token))
        });
        let Some(text) = raw.bind else {
            self.err(
                "admin.bind",
                "is required in [admin] (e.g. \"127.0.0.1:9025\")",
            );
            return None;
        };
        let bind = match text.trim().parse::<SocketAddr>() {
            Ok(bind) => bind,
            Err(_) => {
                self.err(
                    "admin.bind",
                    format!("{text:?} is not an IP:PORT socket address"),
                );
                return None;
            }
        };
        if !bind.ip().is_loopback() && token_file.is_none() {
            self.err(
                "admin.token_file",
                format!(
                    "is required when admin.bind ({bind}) is not a loopback address: the status \
                     and the queue would be open to the network"
                ),
            );
        }
        Some(Admin {
            bind,
            token_file,
            token,
        })
    }

    /// `[alerts]`: every key optional.
    pub(super) fn alerts(&mut self, raw: RawAlerts) -> Alerts {
        let mut after = |key: &str, raw: Option<String>| {
            raw.map(|text| self.duration(&format!("alerts.{key}"), Some(text), "1m", false))
        };
        let no_inbound = after("no_inbound", raw.no_inbound);
        let no_delivery = after("no_delivery", raw.no_delivery);
        let oldest_message = after("oldest_message", raw.oldest_message);
        let upstream_down = after("upstream_down", raw.upstream_down);
        let queue_depth = raw
            .queue_depth
            .map(|n| self.count("alerts.queue_depth", Some(n), 1, 1, i64::MAX));
        let webhook = raw.webhook.and_then(|url| match check_webhook(&url) {
            Ok(()) => Some(url),
            Err(message) => {
                self.err("alerts.webhook", message);
                None
            }
        });
        Alerts {
            no_inbound,
            no_delivery,
            queue_depth,
            oldest_message,
            upstream_down,
            webhook,
        }
    }

    /// `[log]`.
    pub(super) fn log(&mut self, raw: RawLog) -> Log {
        let format = self
            .choice("log.format", raw.format, LogFormat::Text, &LOG_FORMATS)
            .unwrap_or_default();
        let journal_keep = self.duration(
            "log.journal_keep",
            raw.journal_keep,
            DEFAULT_JOURNAL_KEEP,
            false,
        );
        let journal_max_size = self.size(
            "log.journal_max_size",
            raw.journal_max_size,
            DEFAULT_JOURNAL_MAX_SIZE,
            false,
        );
        Log {
            format,
            journal_keep,
            journal_max_size,
        }
    }
}

/// A webhook URL: absolute `http://` or `https://`, a host name or IP address, a port (when
/// written) in 1..=65535, no fragment. `hyper::Uri` alone lets through a port that is not a
/// number (`:notaport`, `:80800`, `:`: the webhook would then post to the default port, with
/// the credentials) and drops a fragment silently; both are refused here. The message quotes
/// the URL with its user information masked ([`masked_url`]): it is printed by check-config
/// and logged by a refused reload.
fn check_webhook(url: &str) -> Result<(), String> {
    let shown = masked_url(url);
    let bad = |why: &str| format!("{shown:?} is not an http:// or https:// URL{why}");
    let uri: hyper::Uri = url.parse().map_err(|_| bad(""))?;
    if !matches!(uri.scheme_str(), Some("http" | "https")) {
        return Err(bad(""));
    }
    if url.contains('#') {
        return Err(bad(" (it has a #fragment)"));
    }
    let Some(authority) = uri.authority() else {
        return Err(bad(""));
    };
    let host_port = authority
        .as_str()
        .rsplit_once('@')
        .map_or(authority.as_str(), |(_, h)| h);
    let (host, port) = split_host_port(host_port);
    if !valid_host(host) {
        return Err(bad(" (no valid host name or IP address)"));
    }
    match port {
        None => Ok(()),
        Some(p)
            if p.bytes().all(|b| b.is_ascii_digit()) && p.parse::<u16>().is_ok_and(|n| n > 0) =>
        {
            Ok(())
        }
        Some(_) => Err(bad(" (its port is not a number in 1..=65535)")),
    }
}

/// `host[:port]` split at the port's colon (after the `]` of an IPv6 literal); the port as
/// written, possibly empty.
fn split_host_port(text: &str) -> (&str, Option<&str>) {
    let host_end = if text.starts_with('[') {
        text.find(']').map_or(text.len(), |i| i + 1)
    } else {
        text.find(':').unwrap_or(text.len())
    };
    let (host, rest) = text.split_at(host_end);
    (
        host,
        rest.strip_prefix(':')
            .or(if rest.is_empty() { None } else { Some(rest) }),
    )
}

/// A host the webhook can connect to: `[IPv6]`, or a DNS name / IPv4 address (letters,
/// digits, `-` and `.`, not starting or ending with a dot or hyphen).
fn valid_host(host: &str) -> bool {
    if let Some(inner) = host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
        return inner.parse::<std::net::Ipv6Addr>().is_ok();
    }
    !host.is_empty()
        && host
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        && !host.starts_with(['.', '-'])
        && !host.ends_with('-')
        && !host.contains("..")
}

/// `url` with the user information of its authority masked: `user:***@` (`***@` without a
/// colon, where the whole of it may be a token). Works on any text, a URL or not, so that a
/// value refused for any reason is never quoted with its secret.
pub(crate) fn masked_url(url: &str) -> String {
    let start = url.find("://").map_or(0, |i| i + 3);
    let end = url[start..]
        .find(['/', '?', '#'])
        .map_or(url.len(), |i| start + i);
    let Some(at) = url[start..end].rfind('@').map(|i| start + i) else {
        return url.to_owned();
    };
    let userinfo = &url[start..at];
    let shown = match userinfo.split_once(':') {
        Some((user, _)) => format!("{user}:***"),
        None => "***".to_owned(),
    };
    format!("{}{shown}{}", &url[..start], &url[at..])
}
