//! `portcullis status` as text for a terminal: the state, active alerts, each upstream, the
//! queue, the flow over the last 1/5/15/60 minutes and the top refusal rules. Times are UTC,
//! RFC 3339; every string from outside (errors, senders, rules) passes through
//! [`clean`] so it cannot move the cursor or hide text.

use std::fmt::Write as _;

use crate::observe::flow::Minute;
use crate::observe::status::Status;
use crate::queue::report::{clean, human_age, rfc3339};

/// The status as lines of text, ending in a newline.
pub fn text(status: &Status) -> String {
    let mut out = String::new();
    state(&mut out, status);
    alerts(&mut out, status);
    upstreams(&mut out, status);
    queue(&mut out, status);
    journal(&mut out, status);
    flow(&mut out, status);
    let rules: Vec<String> = status
        .top_refusals
        .iter()
        .map(|(rule, n)| format!("{} {n}", clean(rule)))
        .collect();
    let span = if status.live {
        "since start"
    } else {
        "last hour"
    };
    let _ = writeln!(
        out,
        "top refusal rules ({span}): {}",
        if rules.is_empty() {
            "none".to_owned()
        } else {
            rules.join(", ")
        }
    );
    out
}

fn state(out: &mut String, status: &Status) {
    let ready = status.readiness(clean);
    let _ = writeln!(
        out,
        "node {} (portcullis {}) at {}: {}{}",
        clean(&status.node),
        clean(&status.version),
        rfc3339(status.now),
        if status.live {
            ready.as_str()
        } else {
            "not live"
        },
        if status.paused {
            ", listeners PAUSED"
        } else {
            ""
        }
    );
}

fn alerts(out: &mut String, status: &Status) {
    // Alerts live in the running relay only: from the spool and journal, none is known.
    if !status.live {
        out.push_str("alerts: unknown (live state unavailable)\n");
        return;
    }
    if status.alerts.is_empty() {
        out.push_str("alerts: none\n");
        return;
    }
    out.push_str("alerts:\n");
    for a in &status.alerts {
        let _ = writeln!(
            out,
            "  {} since {}: {} (value {}, threshold {})",
            a.alert.as_str(),
            rfc3339(a.since),
            clean(&a.text),
            clean(&a.value),
            clean(&a.threshold)
        );
    }
}

fn upstreams(out: &mut String, status: &Status) {
    out.push_str("upstreams:\n");
    for u in &status.upstreams {
        let state = match (u.up, u.since) {
            (true, 0) => "up".to_owned(),
            (true, since) => format!("up since {}", rfc3339(since)),
            (false, since) => format!("DOWN since {}", rfc3339(since)),
        };
        let success = u.last_success.map_or_else(|| "none".to_owned(), rfc3339);
        let _ = writeln!(
            out,
            "  {}: {state}; delivered in the last 5 min: {}; last success: {success}",
            clean(&u.name),
            u.delivered_5m
        );
        if let Some(error) = &u.last_error {
            let _ = writeln!(out, "    last error: {}", clean(error));
        }
    }
}

/// One line when the status has the journal's state: writing or STOPPED, and what it holds.
fn journal(out: &mut String, status: &Status) {
    let Some(j) = &status.journal else { return };
    let state = match (j.stopped_since, &j.why) {
        (None, _) => "writing".to_owned(),
        (Some(since), why) => format!(
            "STOPPED since {}{}",
            rfc3339(since),
            why.as_deref()
                .map(|w| format!(" ({})", clean(w)))
                .unwrap_or_default()
        ),
    };
    let oldest = j.oldest.map_or_else(
        || "; empty".to_owned(),
        |t| format!("; oldest event {}", rfc3339(t)),
    );
    let dropped = j
        .dropped
        .filter(|&n| n > 0)
        .map(|n| format!("; {n} events dropped since start"))
        .unwrap_or_default();
    let _ = writeln!(out, "journal: {state}{oldest}{dropped}");
}

fn queue(out: &mut String, status: &Status) {
    let q = &status.queue;
    let oldest = q.oldest.as_ref().map_or_else(String::new, |(id, at)| {
        format!(
            "; oldest {} ({}, since {})",
            human_age(status.now.saturating_sub(*at)),
            clean(id),
            rfc3339(*at)
        )
    });
    if q.loading {
        let _ = writeln!(
            out,
            "queue: loading after the start (recovery of the spool): delivery waits for it; counted so far: {} queued, {} held",
            q.queued(),
            q.held()
        );
    } else {
        let _ = writeln!(
            out,
            "queue: {} queued, {} held{oldest}",
            q.queued(),
            q.held()
        );
    }
    for u in &q.by_upstream {
        let _ = writeln!(
            out,
            "  {}: {} queued, {} held",
            clean(&u.upstream),
            u.queued,
            u.held
        );
    }
    if !q.top_senders.is_empty() {
        let senders: Vec<String> = q
            .top_senders
            .iter()
            .map(|(s, n)| format!("{} {n}", clean(s)))
            .collect();
        let _ = writeln!(out, "  top senders: {}", senders.join(", "));
    }
}

fn flow(out: &mut String, status: &Status) {
    let sums: [&Minute; 4] = [
        &status.last_1m,
        &status.last_5m,
        &status.last_15m,
        &status.last_60m,
    ];
    let _ = writeln!(
        out,
        "flow        {:>8} {:>8} {:>8} {:>8}",
        "1 min", "5 min", "15 min", "60 min"
    );
    for (title, value, _) in super::page::SERIES {
        let name = title.to_ascii_lowercase();
        let _ = writeln!(
            out,
            "  {name:<9} {:>8} {:>8} {:>8} {:>8}",
            value(sums[0]),
            value(sums[1]),
            value(sums[2]),
            value(sums[3])
        );
    }
}

#[cfg(test)]
mod tests;
