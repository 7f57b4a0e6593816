//! Text behind `queue list --quarantined`, `queue purge --quarantine` and `queue restore`:
//! pure formatting, no I/O. Text from clients (addresses) goes through
//! [`report::clean`](crate::queue::report::clean) as in every `queue` command.

use std::fmt::Write as _;

use serde_json::json;

use super::{Quarantined, RestoreOutcome};
use crate::envelope::{QueueId, ReversePath};
use crate::queue::DeleteOutcome;
use crate::queue::report::{MAYBE_SENT_NOTE, clean, human_age, json_line, rfc3339};

/// Column titles of [`list_table`].
const COLUMNS: [&str; 7] = ["ID", "QUARANTINED", "AGE", "SIZE", "FROM", "RCPTS", "BY"];

/// Who quarantined `q`, in words: `queue purge --from @x.example (uid 1000)`, or `-` when
/// its record is lost.
fn by(q: &Quarantined) -> String {
    q.record.as_ref().map_or_else(
        || "-".to_owned(),
        |r| {
            let mut words = vec![r.command.clone()];
            words.extend(r.args.iter().cloned());
            format!("{} (uid {})", clean(&words.join(" ")), r.uid)
        },
    )
}

/// The `queue list --quarantined` table: a header row, then one row per message (id, time
/// of quarantine, how long ago, size, sender, pending recipients, the command that
/// quarantined it). `now` is the current Unix time.
pub fn list_table(msgs: &[Quarantined], now: u64) -> String {
    let rows: Vec<[String; 7]> = msgs
        .iter()
        .map(|q| {
            let at = q.at_ms / 1000;
            [
                q.msg.envelope.id.to_string(),
                rfc3339(at),
                human_age(now.saturating_sub(at)),
                q.msg.size.to_string(),
                clean(&q.msg.envelope.mail_from.to_string()),
                q.msg.pending().count().to_string(),
                by(q),
            ]
        })
        .collect();
    let mut widths = COLUMNS.map(str::len);
    for row in &rows {
        for (w, cell) in widths.iter_mut().zip(row) {
            *w = (*w).max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in std::iter::once(&COLUMNS.map(String::from)).chain(&rows) {
        let mut line = String::new();
        for (i, (cell, width)) in row.iter().zip(&widths).enumerate() {
            if i + 1 == row.len() {
                line.push_str(cell);
            } else {
                let _ = write!(line, "{cell:<width$}  ");
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `queue list --quarantined --json`: one JSON object per message per line. Keys: `id`,
/// `state` (`quarantined`), `quarantined_at` (RFC 3339), `quarantined_at_ms`, `command`,
/// `args`, `uid`, `login_uid` (null when unknown; the last four null when the record is
/// lost), `size`, `from`, `rcpts` (pending), `recipients_total`, `attempts`, `received_at`
/// (RFC 3339), `auth_user`.
pub fn list_json(msgs: &[Quarantined]) -> String {
    let mut out = String::new();
    for q in msgs {
        let env = &q.msg.envelope;
        let record = q.record.as_ref();
        let value = json!({
            "id": env.id.as_str(),
            "state": "quarantined",
            "quarantined_at": rfc3339(q.at_ms / 1000),
            "quarantined_at_ms": q.at_ms,
            "command": record.map(|r| r.command.clone()),
            "args": record.map(|r| r.args.clone()),
            "uid": record.map(|r| r.uid),
            "login_uid": record.and_then(|r| r.login_uid),
            "size": q.msg.size,
            "from": env.mail_from.to_string(),
            "rcpts": q.msg.pending().map(|a| a.to_string()).collect::<Vec<_>>(),
            "recipients_total": env.recipients.len(),
            "attempts": q.msg.state.attempts,
            "received_at": rfc3339(env.received_at),
            "auth_user": env.auth_user,
        });
        out.push_str(&json_line(&value));
        out.push('\n');
    }
    out
}

/// One line of `queue purge --quarantine`: `quarantined ID from SENDER [MAYBE_SENT_NOTE]`,
/// `would quarantine ID from SENDER` (dry run), or `gone ID from SENDER (left the queue
/// meanwhile)`.
pub fn quarantine_line(
    id: &QueueId,
    sender: &ReversePath,
    outcome: Option<DeleteOutcome>,
) -> String {
    let from = clean(&sender.to_string());
    match outcome {
        None => format!("would quarantine {id} from {from}"),
        Some(DeleteOutcome::Deleted) => format!("quarantined {id} from {from}"),
        Some(DeleteOutcome::DeletedMaybeSent) => {
            format!("quarantined {id} from {from} {MAYBE_SENT_NOTE}")
        }
        Some(DeleteOutcome::NotFound) => {
            format!("gone {id} from {from} (left the queue meanwhile)")
        }
    }
}

/// Last line of `queue purge --quarantine`: `3 messages quarantined` (`, 1 possibly
/// delivered`, `, 1 not found` when nonzero), or `3 messages would be quarantined (dry
/// run)`.
pub fn quarantine_summary(outcomes: &[Option<DeleteOutcome>], dry_run: bool) -> String {
    let count =
        |want: fn(&Option<DeleteOutcome>) -> bool| outcomes.iter().filter(|o| want(o)).count();
    if dry_run {
        return format!(
            "{} would be quarantined (dry run)",
            messages(outcomes.len())
        );
    }
    let moved = count(|o| {
        matches!(
            o,
            Some(DeleteOutcome::Deleted | DeleteOutcome::DeletedMaybeSent)
        )
    });
    let mut out = format!("{} quarantined", messages(moved));
    let maybe = count(|o| *o == Some(DeleteOutcome::DeletedMaybeSent));
    if maybe > 0 {
        let _ = write!(out, ", {maybe} possibly delivered");
    }
    let gone = count(|o| *o == Some(DeleteOutcome::NotFound));
    if gone > 0 {
        let _ = write!(out, ", {gone} not found");
    }
    out
}

/// One line of `queue restore` on stdout (`restored ID`, `would restore ID`), or, for an id
/// not restored, the complaint for stderr (`Err`).
pub fn restore_line(id: &QueueId, outcome: RestoreOutcome) -> Result<String, String> {
    match outcome {
        RestoreOutcome::Restored => Ok(format!("restored {id}")),
        RestoreOutcome::WouldRestore => Ok(format!("would restore {id}")),
        RestoreOutcome::NotQuarantined => Err(format!("no quarantined message {id}")),
        RestoreOutcome::AlreadyQueued => Err(format!(
            "{id} is queued already: not restored (the quarantined copy is kept)"
        )),
    }
}

/// Last line of `queue restore`: `2 messages restored` or `2 messages would be restored (dry
/// run)`, with `, 1 not found` and `, 1 already queued` when nonzero.
pub fn restore_summary(outcomes: &[RestoreOutcome], dry_run: bool) -> String {
    let count = |want: RestoreOutcome| outcomes.iter().filter(|o| **o == want).count();
    let mut out = if dry_run {
        let dry = count(RestoreOutcome::WouldRestore);
        format!("{} would be restored (dry run)", messages(dry))
    } else {
        format!("{} restored", messages(count(RestoreOutcome::Restored)))
    };
    let missing = count(RestoreOutcome::NotQuarantined);
    if missing > 0 {
        let _ = write!(out, ", {missing} not found");
    }
    let taken = count(RestoreOutcome::AlreadyQueued);
    if taken > 0 {
        let _ = write!(out, ", {taken} already queued");
    }
    out
}

/// `1 message`, `2 messages`.
fn messages(n: usize) -> String {
    format!("{n} message{}", if n == 1 { "" } else { "s" })
}
