//! How `portcullis trace` prints what it found: per message, its timeline (one line per
//! event: time, kind, the fields the event carries), then the refusals without queue id; or,
//! with `--json`, one JSON object per event in the same order.
//!
//! Every text from the network (addresses, Message-IDs, replies) goes through
//! [`report::clean`] (text) or [`report::json_line`] (JSON), so it can neither forge lines nor
//! drive the terminal.

use std::fmt::Write as _;

use time::OffsetDateTime;

use super::query::{Found, MAX_MESSAGES};
use crate::observe::Event;
use crate::queue::report;

/// Unix milliseconds as RFC 3339 UTC with milliseconds (`2026-05-01T12:00:00.250Z`).
pub fn rfc3339_ms(ms: u64) -> String {
    let t = i64::try_from(ms / 1000)
        .ok()
        .and_then(|s| OffsetDateTime::from_unix_timestamp(s).ok())
        .unwrap_or(OffsetDateTime::UNIX_EPOCH);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        ms % 1000
    )
}

/// The text report: a block per message (its queue id and Message-ID, then its events), a
/// block of refusals without queue id, and a summary line.
pub fn text(found: &Found) -> String {
    let mut out = String::new();
    for (id, events) in &found.messages {
        let mid = events.iter().find_map(|e| e.message_id.as_deref());
        let _ = writeln!(
            out,
            "message {id}{}",
            mid.map(|m| format!("  Message-ID {}", report::clean(m)))
                .unwrap_or_default()
        );
        for e in events {
            let _ = writeln!(out, "  {}", event_line(e));
        }
        out.push('\n');
    }
    if !found.refusals.is_empty() {
        out.push_str("refused without a queue id\n");
        for e in &found.refusals {
            let _ = writeln!(out, "  {}", event_line(e));
        }
        out.push('\n');
    }
    let n = found.messages.len();
    let r = found.refusals.len();
    let _ = writeln!(
        out,
        "{n} message{}, {r} refusal{} without a queue id",
        if n == 1 { "" } else { "s" },
        if r == 1 { "" } else { "s" }
    );
    if found.truncated > 0 {
        let _ = writeln!(
            out,
            "{} older matching messages not shown (at most {MAX_MESSAGES}); narrow with --since",
            found.truncated
        );
    }
    out
}

/// One event: time, kind, then `key=value` for each field it carries (the queue id is the
/// block's heading and not repeated; values with blanks are quoted).
pub fn event_line(e: &Event) -> String {
    let mut line = format!("{}  {:<11}", rfc3339_ms(e.at), e.kind.as_str());
    let mut field = |key: &str, value: &str| {
        let value = report::clean(value);
        if value.contains(' ') || value.is_empty() {
            let _ = write!(line, " {key}=\"{}\"", value.replace('"', "\\\""));
        } else {
            let _ = write!(line, " {key}={value}");
        }
    };
    let opt = |v: &Option<String>| v.clone();
    let client = e.client.map(|ip| ip.to_string());
    for (key, value) in [
        ("client", client),
        ("listener", opt(&e.listener)),
        ("login", opt(&e.login)),
        ("tls", opt(&e.tls)),
        // The null sender is journaled empty (older journals wrote `<>`): shown `<>`.
        (
            "from",
            e.from
                .as_ref()
                .map(|f| format!("<{}>", if f == "<>" { "" } else { f })),
        ),
    ] {
        if let Some(value) = value {
            field(key, &value);
        }
    }
    if !e.rcpts.is_empty() {
        let rcpts: Vec<String> = e.rcpts.iter().map(|r| format!("<{r}>")).collect();
        field("rcpts", &rcpts.join(","));
    }
    let size = e.size.map(|s| s.to_string());
    let seconds = e.seconds.map(|s| format!("{s:.3}"));
    for (key, value) in [
        ("message_id", opt(&e.message_id)),
        ("size", size),
        ("upstream", opt(&e.upstream)),
        ("upstream_id", opt(&e.upstream_id)),
        ("seconds", seconds),
        ("rule", opt(&e.rule)),
        ("reply", opt(&e.reply)),
        ("bounce_id", opt(&e.bounce_id)),
        ("adopted_from", opt(&e.adopted_from)),
        ("node", opt(&e.node)),
    ] {
        if let Some(value) = value {
            field(key, &value);
        }
    }
    line.truncate(line.trim_end().len());
    line
}

/// The `--json` report: one object per event (the journal's fields, plus `time`: RFC 3339
/// with milliseconds), messages first in the order of [`text`], then the refusals.
pub fn json_lines(found: &Found) -> String {
    let mut out = String::new();
    let events = found
        .messages
        .iter()
        .flat_map(|(_, events)| events)
        .chain(&found.refusals);
    for e in events {
        if let Ok(serde_json::Value::Object(mut map)) = serde_json::to_value(e) {
            map.insert("time".into(), rfc3339_ms(e.at).into());
            out.push_str(&report::json_line(&serde_json::Value::Object(map)));
            out.push('\n');
        }
    }
    out
}
