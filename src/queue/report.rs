//! Text behind `portcullis queue list|show|retry|delete|purge`: pure formatting, no I/O.
//!
//! The table and JSON shapes are an interface (DESIGN "Interface contract"): `list` prints a
//! header row then exactly one row per message starting with its id; `list --json` prints one
//! JSON object per line. Anything that came from a client or an upstream (HELO, addresses,
//! errors, message headers) is passed through [`clean`] so it cannot break a row in two or send
//! escape sequences to the operator's terminal.

use std::fmt::Write as _;
use std::net::SocketAddr;

use serde_json::json;

use super::{DeleteOutcome, DeliveryState, QueuedMessage};
use crate::envelope::{Envelope, QueueId, RcptStatus, ReversePath};
pub use crate::text::is_invisible;

/// Most bytes of message headers [`show`] prints.
pub const SHOW_HEADER_LIMIT: usize = 64 * 1024;

/// Longest LAST ERROR shown in the table (the full text is in `list --json` and `show`).
const TABLE_ERROR_WIDTH: usize = 80;

/// Column titles of [`list_table`].
const COLUMNS: [&str; 8] = [
    "ID",
    "AGE",
    "SIZE",
    "FROM",
    "RCPTS",
    "ATTEMPTS",
    "NEXT",
    "LAST ERROR",
];

/// The `queue list` table: a header row, then one row per message, columns aligned. An empty
/// queue gives the header row alone. `now` is the current Unix time (for AGE). The command
/// itself makes each row on the thread that read its message ([`table_row`], then [`table`]).
#[cfg(test)]
pub fn list_table(msgs: &[QueuedMessage], now: u64) -> String {
    let rows: Vec<TableRow> = msgs.iter().map(|m| table_row(m, now)).collect();
    table(&rows)
}

/// One message's cells of the `queue list` table, before the columns are aligned (made on the
/// thread that read the message, by `Spool::list_map`).
pub struct TableRow([String; 8]);

/// The cells of `m`'s row of the `queue list` table; `now` is the current Unix time (for AGE).
pub fn table_row(m: &QueuedMessage, now: u64) -> TableRow {
    let error = m.state.last_error.as_deref().map_or_else(
        || "-".to_string(),
        |e| truncate(&clean(e), TABLE_ERROR_WIDTH),
    );
    TableRow([
        m.envelope.id.to_string(),
        human_age(now.saturating_sub(m.envelope.received_at)),
        m.size.to_string(),
        clean(&m.envelope.mail_from.to_string()),
        m.pending().count().to_string(),
        m.state.attempts.to_string(),
        next_cell(&m.state),
        error,
    ])
}

/// The `queue list` table of rows made by [`table_row`]: the header row, then each row, columns
/// aligned.
pub fn table(rows: &[TableRow]) -> String {
    let mut widths = COLUMNS.map(str::len);
    for TableRow(row) in rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::with_capacity(rows.len() * widths.iter().sum::<usize>());
    push_row(&mut out, &COLUMNS, &widths);
    for TableRow(row) in rows {
        push_row(&mut out, row, &widths);
    }
    out
}

/// The NEXT cell of [`list_table`]: the next attempt, or `held (REASON)` for a held message
/// (it has no next attempt until released).
fn next_cell(state: &DeliveryState) -> String {
    match &state.hold {
        Some(hold) => format!("held ({})", clean(&hold.reason)),
        None => rfc3339(state.next_attempt),
    }
}

/// One aligned row (its trailing spaces trimmed) and its newline, appended to `out`.
fn push_row(out: &mut String, cells: &[impl AsRef<str>; 8], widths: &[usize; 8]) {
    let start = out.len();
    for (i, (cell, width)) in cells.iter().zip(widths).enumerate() {
        let cell = cell.as_ref();
        out.push_str(cell);
        if i + 1 < cells.len() {
            let pad = width.saturating_sub(cell.chars().count()) + 2;
            out.extend(std::iter::repeat_n(' ', pad));
        }
    }
    let end = start + out[start..].trim_end().len();
    out.truncate(end);
    out.push('\n');
}

/// `queue list --json`: one JSON object per message per line (nothing for an empty queue).
/// Keys: `id`, `age_secs`, `size`, `from` (`<>` for the null sender), `rcpts` (pending
/// recipient addresses), `recipients_total`, `attempts`, `next_attempt` (RFC 3339),
/// `last_error` (null or string), `received_at` (RFC 3339), `listener`, `client_ip`,
/// `auth_user` (null or string), `state` (`queued` or `held`), `hold` (null, or `since`
/// (RFC 3339) and `reason` of the hold). The command itself writes [`json_row`] of each
/// message, made on the thread that read it.
#[cfg(test)]
pub fn list_json(msgs: &[QueuedMessage], now: u64) -> String {
    msgs.iter().map(|m| json_row(m, now)).collect()
}

/// `m`'s line of `queue list --json` (keys: see `list_json`), with its newline; `now` is the current Unix time.
pub fn json_row(m: &QueuedMessage, now: u64) -> String {
    let env = &m.envelope;
    let value = json!({
        "id": env.id.as_str(),
        "age_secs": now.saturating_sub(env.received_at),
        "size": m.size,
        "from": env.mail_from.to_string(),
        "rcpts": m.pending().map(|a| a.to_string()).collect::<Vec<_>>(),
        "recipients_total": env.recipients.len(),
        "attempts": m.state.attempts,
        "next_attempt": rfc3339(m.state.next_attempt),
        "last_error": m.state.last_error,
        "received_at": rfc3339(env.received_at),
        "listener": env.listener,
        "client_ip": env.client_ip.to_string(),
        "auth_user": env.auth_user,
        "state": if m.state.hold.is_some() { "held" } else { "queued" },
        "hold": m.state.hold.as_ref().map(|h| json!({
            "since": rfc3339(h.since),
            "reason": h.reason,
        })),
    });
    // serde_json escapes control characters, so one object is always one line;
    // json_line escapes the invisible ones too.
    let mut line = json_line(&value);
    line.push('\n');
    line
}

/// `queue show ID`: the envelope, the delivery state, then the message header section taken
/// from `message_head` (up to the first blank line, at most [`SHOW_HEADER_LIMIT`] bytes).
/// Pass the first `SHOW_HEADER_LIMIT` bytes of the message, as returned by
/// `Spool::read_message_head(id, SHOW_HEADER_LIMIT as u64)`: a shorter slice is taken to be
/// the whole message.
pub fn show(msg: &QueuedMessage, message_head: &[u8]) -> String {
    let mut out = String::new();
    show_envelope(&mut out, &msg.envelope, &msg.state, msg.size);
    let state = &msg.state;
    let _ = writeln!(out, "\nDelivery");
    let _ = writeln!(out, "  attempts:     {}", state.attempts);
    let _ = writeln!(out, "  next attempt: {}", rfc3339(state.next_attempt));
    // Only for a held message, so the output of every other one is as it always was.
    if let Some(hold) = &state.hold {
        let _ = writeln!(
            out,
            "  held:         since {} ({}): not delivered, bounced or expired until released",
            rfc3339(hold.since),
            clean(&hold.reason)
        );
    }
    let _ = writeln!(
        out,
        "  last error:   {}",
        state.last_error.as_deref().map_or("-".into(), clean)
    );
    if state.history.is_empty() {
        let _ = writeln!(out, "  history:      -");
    } else {
        let _ = writeln!(out, "  history:");
        for attempt in &state.history {
            let _ = writeln!(
                out,
                "    {}  {}  {}",
                rfc3339(attempt.at),
                attempt.upstream.as_deref().map_or("-".into(), clean),
                clean(&attempt.outcome)
            );
        }
    }
    let _ = writeln!(out, "\nHeaders");
    let (head, complete) = header_section(message_head);
    for line in String::from_utf8_lossy(head).lines() {
        let _ = writeln!(out, "  {}", clean(line));
    }
    if !complete {
        let _ = writeln!(out, "  [header section truncated]");
    }
    out
}

fn show_envelope(out: &mut String, env: &Envelope, state: &DeliveryState, size: u64) {
    let _ = writeln!(out, "Message {}", env.id);
    let _ = writeln!(out, "  received:     {}", rfc3339(env.received_at));
    let _ = writeln!(out, "  size:         {size} bytes");
    let _ = writeln!(out, "  listener:     {}", clean(&env.listener));
    let _ = writeln!(
        out,
        "  client:       {}",
        SocketAddr::new(env.client_ip, env.client_port)
    );
    let _ = writeln!(out, "  helo:         {}", clean(&env.helo));
    let tls = env
        .tls
        .as_ref()
        .map_or("none".into(), |t| clean(&t.to_string()));
    let _ = writeln!(out, "  tls:          {tls}");
    let user = env.auth_user.as_deref().map_or("-".into(), clean);
    let _ = writeln!(out, "  auth user:    {user}");
    let _ = writeln!(out, "  from:         {}", clean(&env.mail_from.to_string()));
    let mut params = Vec::new();
    if let Some(body) = env.mail_params.body {
        params.push(match body {
            crate::envelope::Body::SevenBit => "BODY=7BIT".to_string(),
            crate::envelope::Body::EightBitMime => "BODY=8BITMIME".to_string(),
        });
    }
    if env.mail_params.smtputf8 {
        params.push("SMTPUTF8".into());
    }
    if let Some(size) = env.mail_params.size {
        params.push(format!("SIZE={size}"));
    }
    let params = if params.is_empty() {
        "-".to_string()
    } else {
        params.join(" ")
    };
    let _ = writeln!(out, "  params:       {params}");
    let _ = writeln!(out, "  recipients:");
    for (i, r) in env.recipients.iter().enumerate() {
        let status = match state.status_of(i) {
            RcptStatus::Pending => "pending",
            RcptStatus::Delivered => "delivered",
            RcptStatus::Failed => "failed",
        };
        let _ = writeln!(out, "    {}  {status}", clean(&r.address.to_string()));
    }
}

/// Last line of `queue retry`: when the request takes effect.
pub const RETRY_NOTE: &str =
    "the running relay acts on this within a second (a stopped relay when it next starts)";

/// Added to the line of a message deleted after a worker sent (or began sending) its final dot.
pub const MAYBE_SENT_NOTE: &str =
    "(its final dot had already been sent upstream; it may have been delivered)";

/// One line of `queue delete` / `queue purge` output:
/// `deleted ID [from SENDER] [MAYBE_SENT_NOTE]`, `would delete ID from SENDER` (dry run:
/// `outcome` is `None`), or `gone ID [from SENDER] (left the queue meanwhile)`.
pub fn deletion_line(
    id: &QueueId,
    sender: Option<&ReversePath>,
    outcome: Option<DeleteOutcome>,
) -> String {
    let from = sender.map_or(String::new(), |s| {
        format!(" from {}", clean(&s.to_string()))
    });
    match outcome {
        None => format!("would delete {id}{from}"),
        Some(DeleteOutcome::Deleted) => format!("deleted {id}{from}"),
        Some(DeleteOutcome::DeletedMaybeSent) => format!("deleted {id}{from} {MAYBE_SENT_NOTE}"),
        Some(DeleteOutcome::NotFound) => format!("gone {id}{from} (left the queue meanwhile)"),
    }
}

/// Counts behind the summary line of `queue delete` / `queue purge`.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Tally {
    /// Deleted (including those possibly sent).
    pub deleted: usize,
    /// Deleted after their final dot was sent.
    pub maybe_sent: usize,
    /// Not queued (unknown id, or left the queue meanwhile).
    pub not_found: usize,
    /// Listed by a dry run.
    pub would_delete: usize,
    /// Counting a dry run (nothing deleted).
    pub dry_run: bool,
}

impl Tally {
    /// An empty tally, for a dry run or not.
    pub fn new(dry_run: bool) -> Self {
        Tally {
            dry_run,
            ..Tally::default()
        }
    }

    /// Count one message (`None`: listed by a dry run).
    pub fn add(&mut self, outcome: Option<DeleteOutcome>) {
        match outcome {
            None => self.would_delete += 1,
            Some(DeleteOutcome::Deleted) => self.deleted += 1,
            Some(DeleteOutcome::DeletedMaybeSent) => {
                self.deleted += 1;
                self.maybe_sent += 1;
            }
            Some(DeleteOutcome::NotFound) => self.not_found += 1,
        }
    }

    /// `3 messages deleted`, with `, 1 possibly delivered` and `, 1 not found` when nonzero;
    /// a dry run: `3 messages would be deleted (dry run)`.
    pub fn summary(&self) -> String {
        let mut out = if self.dry_run {
            format!("{} would be deleted (dry run)", messages(self.would_delete))
        } else {
            format!("{} deleted", messages(self.deleted))
        };
        if self.maybe_sent > 0 {
            let _ = write!(out, ", {} possibly delivered", self.maybe_sent);
        }
        if self.not_found > 0 {
            let _ = write!(out, ", {} not found", self.not_found);
        }
        out
    }
}

/// `1 message`, `2 messages`.
fn messages(n: usize) -> String {
    format!("{n} message{}", if n == 1 { "" } else { "s" })
}

/// The header section of a message: everything before the first empty line, at most
/// [`SHOW_HEADER_LIMIT`] bytes; and whether the section ended (blank line or end of message)
/// within what was given.
fn header_section(head: &[u8]) -> (&[u8], bool) {
    if head.starts_with(b"\r\n") || head.starts_with(b"\n") {
        return (&[], true);
    }
    let capped = &head[..head.len().min(SHOW_HEADER_LIMIT)];
    // Keep the line end of the last header, drop the empty line.
    let end = [&b"\r\n\r\n"[..], b"\n\n"]
        .iter()
        .filter_map(|sep| find(capped, sep).map(|i| i + sep.len() / 2))
        .min();
    match end {
        Some(end) => (&capped[..end], true),
        None => (capped, head.len() < SHOW_HEADER_LIMIT),
    }
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

/// Unix seconds as RFC 3339 in UTC: the observe layer's one function.
pub use crate::observe::webhook::rfc3339;

/// An age in the largest whole unit: `45s`, `12m`, `3h`, `2d`.
pub fn human_age(secs: u64) -> String {
    match secs {
        0..60 => format!("{secs}s"),
        60..3600 => format!("{}m", secs / 60),
        3600..86400 => format!("{}h", secs / 3600),
        _ => format!("{}d", secs / 86400),
    }
}

/// Replace control characters (newlines, escapes, DEL, C1) and invisible format characters
/// (see [`is_invisible`]: bidirectional overrides, zero-width characters) with `?`, so text from
/// the network can neither forge table rows, drive the terminal, nor display as something it
/// is not (`<\u{202E}gro.elpmaxe@knab-ecivres>` shows as a trusted-looking address). Tabs
/// become spaces.
pub fn clean(text: &str) -> String {
    // Printable ASCII, by far the most common text, has nothing to replace.
    if text.bytes().all(|b| (0x20..0x7f).contains(&b)) {
        return text.to_string();
    }
    text.chars()
        .map(|c| match c {
            '\t' => ' ',
            c if c.is_control() || is_invisible(c) => '?',
            c => c,
        })
        .collect()
}

/// Serialize one JSON value on one line with every invisible character (see
/// [`is_invisible`]) written as a `\uXXXX` escape, as serde_json already writes control
/// characters: the data is unchanged for a JSON reader, and a terminal shows the escape
/// instead of obeying it. These characters can only occur inside strings, where the escape
/// is valid.
pub fn json_line(value: &serde_json::Value) -> String {
    let raw = value.to_string();
    crate::text::escape_invisible(&raw, |c, out| {
        let mut units = [0u16; 2];
        for unit in c.encode_utf16(&mut units) {
            let _ = write!(out, "\\u{unit:04x}");
        }
    })
    .into_owned()
}

fn truncate(text: &str, max_chars: usize) -> String {
    if text.chars().count() <= max_chars {
        text.to_string()
    } else {
        let mut cut: String = text.chars().take(max_chars.saturating_sub(3)).collect();
        cut.push_str("...");
        cut
    }
}
