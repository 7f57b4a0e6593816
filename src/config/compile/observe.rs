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

/// A webhook URL: absolute `http://` or `https://` with a host.
fn check_webhook(url: &str) -> Result<(), String> {
    let bad = || format!("{url:?} is not an http:// or https:// URL");
    let uri: hyper::Uri = url.parse().map_err(|_| bad())?;
    match uri.scheme_str() {
        Some("http" | "https") if uri.host().is_some_and(|h| !h.is_empty()) => Ok(()),
        _ => Err(bad()),
    }
}
