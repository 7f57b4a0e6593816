//! The status page (`/`): one server-rendered HTML5 document with inline CSS and inline SVG
//! charts, no script and no external asset (no font, image or style by URL), readable on a
//! 390-pixel-wide phone (one column that wraps), refreshed by the browser every
//! [`REFRESH_SECS`] seconds.
//!
//! Order, for a person opening it during an outage: the verdict, the active alerts, each
//! upstream, the queue, the flow per minute over the last hour (charts, then sums over 1, 5, 15
//! and 60 minutes), the top refusal rules, then the counters since start. Times are UTC, RFC
//! 3339.
//!
//! Every number that `/metrics` also serves sits in an element with `data-metric` (the family
//! name as scraped) and one `data-LABEL` attribute per label (`data-upstream`, `data-state`,
//! `data-rule`, `data-listener`, `data-alert`); where the text is formatted (a time, an age,
//! up/down) the raw value is in `data-value`. Scripts and tests read the page through these.
//!
//! Every string from outside (upstream names and errors, rule names, senders, alert texts) is
//! escaped by [`escape`]; nothing is written into the document unescaped.

use std::fmt::Write as _;

use crate::observe::flow::Minute;
use crate::observe::status::Status;
use crate::observe::upstreams::UpstreamState;
use crate::queue::report::{human_age, rfc3339};
use crate::text::is_invisible;

/// Seconds between the browser's reloads (`<meta http-equiv="refresh">`).
pub const REFRESH_SECS: u32 = 30;

/// The page for `status`, a complete HTML document.
pub fn render(status: &Status) -> String {
    let verdict = Verdict::of(status);
    let mut out = String::with_capacity(24 * 1024);
    head(&mut out, status, &verdict);
    header(&mut out, status, &verdict);
    alerts(&mut out, status);
    upstreams(&mut out, status);
    queue(&mut out, status);
    flow(&mut out, status);
    refusals(&mut out, status);
    since_start(&mut out, status);
    out.push_str("</main>\n</body>\n</html>\n");
    out
}

/// `text` made safe for HTML element content and for quoted attribute values: `& < > " '`
/// become character references, and control characters (which HTML forbids) and invisible
/// ones ([`is_invisible`]: bidirectional overrides, zero-width characters, which could hide
/// text or make an address display as another) become U+FFFD, as the terminal's
/// `queue::report::clean` treats the same characters.
pub fn escape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    for c in text.chars() {
        match c {
            '&' => out.push_str("&amp;"),
            '<' => out.push_str("&lt;"),
            '>' => out.push_str("&gt;"),
            '"' => out.push_str("&quot;"),
            '\'' => out.push_str("&#39;"),
            '\t' | '\n' => out.push(' '),
            c if c.is_control() || is_invisible(c) => out.push('\u{FFFD}'),
            c => out.push(c),
        }
    }
    out
}

/// `n` with a comma between groups of three digits (`1,234`), for the headline.
fn grouped(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// How bad things are: the headline's colour.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Severity {
    Ok,
    Warn,
    Bad,
}

impl Severity {
    fn class(self) -> &'static str {
        match self {
            Severity::Ok => "ok",
            Severity::Warn => "warn",
            Severity::Bad => "bad",
        }
    }
}

/// The headline: one sentence answering "is mail flowing?", already escaped.
#[derive(Debug)]
struct Verdict {
    severity: Severity,
    text: String,
}

impl Verdict {
    /// The worst thing first: paused, an upstream down, not ready, alerts, else flowing.
    fn of(status: &Status) -> Verdict {
        let queued = status.queue.queued();
        let queued_text = format!("{} queued", grouped(queued));
        let down: Vec<&UpstreamState> = status.upstreams.iter().filter(|u| !u.up).collect();
        let (severity, text) = if status.paused {
            (
                Severity::Bad,
                format!("Paused: listeners refuse new connections — {queued_text}"),
            )
        } else if let Some(first) = down.first() {
            let names: Vec<String> = down.iter().map(|u| escape(&u.name)).collect();
            let since = down.iter().map(|u| u.since).min().unwrap_or(first.since);
            let noun = if down.len() == 1 {
                "Upstream"
            } else {
                "Upstreams"
            };
            (
                Severity::Bad,
                format!(
                    "{noun} {} down since {} — {queued_text}",
                    names.join(", "),
                    rfc3339(since)
                ),
            )
        } else if let Some(reason) = &status.not_ready {
            (
                Severity::Bad,
                format!("Not ready: {} — {queued_text}", escape(reason)),
            )
        } else if !status.alerts.is_empty() {
            let n = status.alerts.len();
            let s = if n == 1 { "" } else { "s" };
            (
                Severity::Warn,
                format!("{n} alert{s} firing — {queued_text}"),
            )
        } else {
            (Severity::Ok, format!("Mail is flowing — {queued_text}"))
        };
        Verdict { severity, text }
    }
}

const STYLE: &str = "\
*{box-sizing:border-box}\
body{margin:0;font:15px/1.45 system-ui,-apple-system,'Segoe UI',Roboto,sans-serif;color:#1c1e21;background:#f4f5f7}\
main{max-width:64rem;margin:0 auto;padding:.75rem}\
h1{font-size:1.3rem;margin:0;padding:.8rem 1rem;border-radius:.5rem;color:#fff;overflow-wrap:anywhere}\
h1.ok{background:#1f7a3a}h1.warn{background:#a86400}h1.bad{background:#b3261e}\
h2{font-size:1.05rem;margin:.3rem 0 .4rem}h3{font-size:.95rem;margin:.2rem 0}\
.meta{color:#555;font-size:.85rem;margin:.4rem 0 0}\
section{background:#fff;border-radius:.5rem;padding:.6rem .8rem;margin:.6rem 0;box-shadow:0 1px 2px #0002}\
table{border-collapse:collapse;width:100%}\
th,td{text-align:left;padding:.2rem .4rem;border-bottom:1px solid #e3e5e8;vertical-align:top;overflow-wrap:anywhere}\
td.n,th.n{text-align:right;font-variant-numeric:tabular-nums;white-space:nowrap}\
table.kv th{width:1%;white-space:nowrap}\
.cards{display:grid;grid-template-columns:repeat(auto-fit,minmax(17rem,1fr));gap:.6rem}\
.card{border:1px solid #e3e5e8;border-radius:.4rem;padding:.5rem .6rem}\
.card dl{display:grid;grid-template-columns:auto 1fr;gap:.1rem .6rem;margin:.3rem 0 0}\
.card dt{color:#555}.card dd{margin:0;overflow-wrap:anywhere}\
.up{color:#1f7a3a;font-weight:600}.down{color:#b3261e;font-weight:600}\
.alert{border-left:.3rem solid #b3261e;padding:.3rem .6rem;margin:.3rem 0;overflow-wrap:anywhere}\
.none{color:#555}\
.charts{display:grid;grid-template-columns:repeat(auto-fit,minmax(17rem,1fr));gap:.6rem}\
svg{width:100%;height:auto;display:block}\
svg text{font:10px system-ui,sans-serif;fill:#555}\
code{font-size:.85em;overflow-wrap:anywhere}";

fn head(out: &mut String, status: &Status, verdict: &Verdict) {
    let _ = write!(
        out,
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n\
         <meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n\
         <meta http-equiv=\"refresh\" content=\"{REFRESH_SECS}\">\n\
         <title>{} — portcullis {}</title>\n<style>{STYLE}</style>\n</head>\n<body>\n<main>\n",
        verdict.text,
        escape(&status.node),
    );
}

fn header(out: &mut String, status: &Status, verdict: &Verdict) {
    let ready = status.readiness(escape);
    let _ = write!(
        out,
        "<header>\n<h1 id=\"verdict\" class=\"{}\">{}</h1>\n\
         <p class=\"meta\">{} · portcullis {} · {} · as of <time>{}</time>{}</p>\n</header>\n",
        verdict.severity.class(),
        verdict.text,
        escape(&status.node),
        escape(&status.version),
        ready,
        rfc3339(status.now),
        if status.live {
            ""
        } else {
            " · not live: from the spool and journal"
        },
    );
}

fn alerts(out: &mut String, status: &Status) {
    out.push_str("<section id=\"alerts\">\n<h2>Active alerts</h2>\n");
    if status.alerts.is_empty() {
        out.push_str("<p class=\"none\">None.</p>\n");
    }
    for a in &status.alerts {
        let name = a.alert.as_str();
        let _ = writeln!(
            out,
            "<div class=\"alert\"><strong data-metric=\"portcullis_alert_active\" \
             data-alert=\"{name}\" data-value=\"1\">{name}</strong> since <time>{}</time>: {} \
             <span class=\"meta\">(value {}, threshold {})</span></div>",
            rfc3339(a.since),
            escape(&a.text),
            escape(&a.value),
            escape(&a.threshold),
        );
    }
    out.push_str("</section>\n");
}

/// A `(name, count)` list as a lookup.
fn count_of(list: &[(String, u64)], name: &str) -> Option<u64> {
    list.iter().find(|(n, _)| n == name).map(|(_, c)| *c)
}

fn upstreams(out: &mut String, status: &Status) {
    out.push_str("<section id=\"upstreams\">\n<h2>Upstreams</h2>\n<div class=\"cards\">\n");
    if status.upstreams.is_empty() {
        out.push_str("<p class=\"none\">None configured.</p>\n");
    }
    for u in &status.upstreams {
        upstream_card(out, status, u);
    }
    out.push_str("</div>\n</section>\n");
}

fn upstream_card(out: &mut String, status: &Status, u: &UpstreamState) {
    let name = escape(&u.name);
    let (class, word) = if u.up { ("up", "up") } else { ("down", "down") };
    let _ = write!(
        out,
        "<div class=\"card\"><h3>{name} <span class=\"{class}\" \
         data-metric=\"portcullis_upstream_up\" data-upstream=\"{name}\" data-value=\"{}\">{word}\
         </span> since <time>{}</time></h3>\n<dl>\n",
        u8::from(u.up),
        rfc3339(u.since),
    );
    let error = u.last_error.as_deref().map_or_else(
        || "none".to_owned(),
        |e| format!("<code>{}</code>", escape(e)),
    );
    let _ = writeln!(out, "<dt>Last error</dt><dd>{error}</dd>");
    let _ = writeln!(
        out,
        "<dt>Circuit breaker</dt><dd data-metric=\"portcullis_upstream_breaker_open\" \
         data-upstream=\"{name}\" data-value=\"{}\">{}</dd>",
        u8::from(u.breaker_open),
        if u.breaker_open { "open" } else { "closed" }
    );
    let _ = writeln!(out, "<dt>Delivered, 5 min</dt><dd>{}</dd>", u.delivered_5m);
    match u.last_success {
        Some(at) => {
            let _ = writeln!(
                out,
                "<dt>Last success</dt><dd \
                 data-metric=\"portcullis_upstream_last_success_timestamp_seconds\" \
                 data-upstream=\"{name}\" data-value=\"{at}\"><time>{}</time></dd>",
                rfc3339(at)
            );
        }
        None => out.push_str("<dt>Last success</dt><dd>never since start</dd>\n"),
    }
    let totals = &status.totals;
    for (label, family, list) in [
        (
            "Delivered since start",
            "portcullis_messages_delivered_total",
            &totals.delivered,
        ),
        (
            "Deferred since start",
            "portcullis_messages_deferred_total",
            &totals.deferred,
        ),
        (
            "Expired since start",
            "portcullis_messages_expired_total",
            &totals.expired,
        ),
    ] {
        if let Some(n) = count_of(list, &u.name) {
            let _ = writeln!(
                out,
                "<dt>{label}</dt><dd data-metric=\"{family}\" data-upstream=\"{name}\">{n}</dd>"
            );
        }
    }
    out.push_str("</dl></div>\n");
}

fn queue(out: &mut String, status: &Status) {
    let q = &status.queue;
    let _ = write!(
        out,
        "<section id=\"queue\">\n<h2>Queue</h2>\n<table class=\"kv\">\n\
         <tr><th>Queued (not held)</th><td class=\"n\" id=\"queued\">{}</td></tr>\n\
         <tr><th>Held</th><td class=\"n\" id=\"held\">{}</td></tr>\n",
        q.queued(),
        q.held()
    );
    match &q.oldest {
        Some((id, arrived)) => {
            let age = status.now.saturating_sub(*arrived);
            let _ = writeln!(
                out,
                "<tr><th>Oldest</th><td data-metric=\"portcullis_queue_oldest_seconds\" \
                 data-value=\"{}\">{} <code>{}</code> since <time>{}</time></td></tr>",
                if status.live {
                    status.totals.queue_oldest_seconds
                } else {
                    age
                },
                human_age(age),
                escape(id),
                rfc3339(*arrived),
            );
        }
        None => out.push_str("<tr><th>Oldest</th><td>none</td></tr>\n"),
    }
    out.push_str("</table>\n");
    if q.loading {
        out.push_str(
            "<p class=\"warn\">Loading after the start: the spool is being recovered; delivery \
             waits for it. The counts below are not the queue yet.</p>\n",
        );
    }
    out.push_str("<h3>By upstream</h3>\n");
    if q.by_upstream.is_empty() {
        out.push_str("<p class=\"none\">Empty.</p>\n");
    } else {
        out.push_str(
            "<table>\n<tr><th>Upstream</th><th class=\"n\">Queued</th><th class=\"n\">Held</th></tr>\n",
        );
        for u in &q.by_upstream {
            let name = escape(&u.upstream);
            let _ = writeln!(
                out,
                "<tr><td>{name}</td>\
                 <td class=\"n\" data-metric=\"portcullis_queue_messages\" data-upstream=\"{name}\" \
                 data-state=\"queued\">{}</td>\
                 <td class=\"n\" data-metric=\"portcullis_queue_messages\" data-upstream=\"{name}\" \
                 data-state=\"held\">{}</td></tr>",
                u.queued, u.held
            );
        }
        out.push_str("</table>\n");
    }
    pairs_table(out, "Top senders", "Sender", "Queued", &q.top_senders, None);
    out.push_str("</section>\n");
}

/// A two-column table of `(name, count)`; with `metric`, each count carries
/// `data-metric=FAMILY data-LABEL=name`.
fn pairs_table(
    out: &mut String,
    title: &str,
    name_head: &str,
    count_head: &str,
    rows: &[(String, u64)],
    metric: Option<(&str, &str)>,
) {
    let _ = writeln!(out, "<h3>{title}</h3>");
    if rows.is_empty() {
        out.push_str("<p class=\"none\">None.</p>\n");
        return;
    }
    let _ = writeln!(
        out,
        "<table>\n<tr><th>{name_head}</th><th class=\"n\">{count_head}</th></tr>"
    );
    for (name, count) in rows {
        let name = escape(name);
        let attrs = metric.map_or_else(String::new, |(family, label)| {
            format!(" data-metric=\"{family}\" data-{label}=\"{name}\"")
        });
        let _ = writeln!(
            out,
            "<tr><td><code>{name}</code></td><td class=\"n\"{attrs}>{count}</td></tr>"
        );
    }
    out.push_str("</table>\n");
}

/// One count of a [`Minute`].
pub(crate) type MinuteField = fn(&Minute) -> u64;

/// The four series of the flow, in the order charted: title, field, colour.
pub(crate) const SERIES: [(&str, MinuteField, &str); 4] = [
    ("Accepted", |m| m.accepted, "#1f6feb"),
    ("Delivered", |m| m.delivered, "#1f7a3a"),
    ("Refused", |m| m.refused, "#b3261e"),
    ("Deferred", |m| m.deferred, "#a86400"),
];

fn flow(out: &mut String, status: &Status) {
    out.push_str(
        "<section id=\"flow\">\n<h2>Flow per minute, last hour (UTC)</h2>\n<div class=\"charts\">\n",
    );
    for (title, value, colour) in SERIES {
        let values: Vec<u64> = status.minutes.iter().map(value).collect();
        let first = status.minutes.first().map_or(status.now, |m| m.start);
        let last = status.minutes.last().map_or(status.now, |m| m.start);
        let _ = writeln!(
            out,
            "<figure style=\"margin:0\"><h3>{title}</h3>{}</figure>",
            chart(title, &values, colour, first, last)
        );
    }
    out.push_str("</div>\n<h3>Sums</h3>\n<table class=\"kv\">\n<tr><th></th>");
    let sums = [
        ("1 min", &status.last_1m),
        ("5 min", &status.last_5m),
        ("15 min", &status.last_15m),
        ("60 min", &status.last_60m),
    ];
    for (span, _) in sums {
        let _ = write!(out, "<th class=\"n\">{span}</th>");
    }
    out.push_str("</tr>\n");
    for (title, value, _) in SERIES {
        let _ = write!(out, "<tr><th>{title}</th>");
        for (span, m) in sums {
            let _ = write!(
                out,
                "<td class=\"n\" data-sum=\"{}\" data-span=\"{}\">{}</td>",
                title.to_ascii_lowercase(),
                span.trim_end_matches(" min"),
                value(m)
            );
        }
        out.push_str("</tr>\n");
    }
    out.push_str("</table>\n</section>\n");
}

/// Plot area of a chart, in its viewBox units (320 × 130).
const PLOT_LEFT: f64 = 34.0;
const PLOT_RIGHT: f64 = 312.0;
const PLOT_TOP: f64 = 8.0;
const PLOT_BOTTOM: f64 = 104.0;

/// One series as an inline SVG line chart: a point per minute (`values`, oldest first), the
/// y axis from 0 to the series' maximum (labelled), the x axis labelled with the first and
/// last minute (`first`, `last`, Unix seconds) and "−30 min".
fn chart(title: &str, values: &[u64], colour: &str, first: u64, last: u64) -> String {
    let max = values.iter().copied().max().unwrap_or(0).max(1);
    let steps = values.len().saturating_sub(1).max(1);
    #[allow(clippy::cast_precision_loss)] // counts per minute and indexes below 2^52
    let points: Vec<String> = values
        .iter()
        .enumerate()
        .map(|(i, v)| {
            let x = PLOT_LEFT + (PLOT_RIGHT - PLOT_LEFT) * i as f64 / steps as f64;
            let y = PLOT_BOTTOM - (PLOT_BOTTOM - PLOT_TOP) * *v as f64 / max as f64;
            format!("{x:.1},{y:.1}")
        })
        .collect();
    let hhmm = |secs: u64| {
        let t = rfc3339(secs);
        t.get(11..16).map_or(t.clone(), str::to_owned)
    };
    let mid = f64::midpoint(PLOT_LEFT, PLOT_RIGHT);
    format!(
        "<svg viewBox=\"0 0 320 130\" role=\"img\" aria-label=\"{title} per minute, last hour\" \
         data-series=\"{series}\"><title>{title} per minute, last hour</title>\
         <line x1=\"{PLOT_LEFT}\" y1=\"{PLOT_TOP}\" x2=\"{PLOT_LEFT}\" y2=\"{PLOT_BOTTOM}\" stroke=\"#888\"/>\
         <line x1=\"{PLOT_LEFT}\" y1=\"{PLOT_BOTTOM}\" x2=\"{PLOT_RIGHT}\" y2=\"{PLOT_BOTTOM}\" stroke=\"#888\"/>\
         <text x=\"{yl}\" y=\"{ty}\" text-anchor=\"end\">{max}</text>\
         <text x=\"{yl}\" y=\"{by}\" text-anchor=\"end\">0</text>\
         <text x=\"{PLOT_LEFT}\" y=\"118\" text-anchor=\"start\">{from}</text>\
         <text x=\"{mid}\" y=\"118\" text-anchor=\"middle\">−30 min</text>\
         <text x=\"{PLOT_RIGHT}\" y=\"118\" text-anchor=\"end\">{to}</text>\
         <text x=\"{mid}\" y=\"129\" text-anchor=\"middle\">minute (UTC) · messages per minute</text>\
         <polyline fill=\"none\" stroke=\"{colour}\" stroke-width=\"1.8\" stroke-linejoin=\"round\" \
         points=\"{points}\"/></svg>",
        series = title.to_ascii_lowercase(),
        yl = PLOT_LEFT - 4.0,
        ty = PLOT_TOP + 4.0,
        by = PLOT_BOTTOM,
        from = hhmm(first),
        to = hhmm(last),
        points = points.join(" "),
    )
}

fn refusals(out: &mut String, status: &Status) {
    out.push_str("<section id=\"refusals\">\n<h2>Top refusal rules since start</h2>\n");
    pairs_table(
        out,
        "By rule",
        "Rule",
        "Refusals",
        &status.top_refusals,
        Some(("portcullis_refusals_total", "rule")),
    );
    out.push_str("</section>\n");
}

fn since_start(out: &mut String, status: &Status) {
    let t = &status.totals;
    out.push_str("<section id=\"totals\">\n<h2>Since start</h2>\n");
    pairs_table(
        out,
        "Accepted by listener",
        "Listener",
        "Messages",
        &t.accepted,
        Some(("portcullis_messages_accepted_total", "listener")),
    );
    sessions(out, &t.sessions);
    pairs_table(
        out,
        "DNS errors by check",
        "Check",
        "Errors",
        &t.dns_errors,
        Some(("portcullis_dns_errors_total", "check")),
    );
    pairs_table(
        out,
        "Removed by an operator",
        "How",
        "Messages",
        &t.removed,
        Some(("portcullis_messages_removed_total", "how")),
    );
    let _ = write!(
        out,
        "<h3>Other</h3>\n<table class=\"kv\">\n\
         <tr><th>Bounced</th><td class=\"n\" data-metric=\"portcullis_messages_bounced_total\">{}</td></tr>\n\
         <tr><th>AUTH successes</th><td class=\"n\" data-metric=\"portcullis_auth_successes_total\">{}</td></tr>\n\
         <tr><th>AUTH failures</th><td class=\"n\" data-metric=\"portcullis_auth_failures_total\">{}</td></tr>\n\
         </table>\n</section>\n",
        t.bounced, t.auth_successes, t.auth_failures
    );
}

/// Sessions ended, by listener and TLS version.
fn sessions(out: &mut String, sessions: &[(String, String, u64)]) {
    out.push_str("<h3>Sessions by listener and TLS</h3>\n");
    if sessions.is_empty() {
        out.push_str("<p class=\"none\">None.</p>\n");
        return;
    }
    out.push_str("<table>\n<tr><th>Listener</th><th>TLS</th><th class=\"n\">Sessions</th></tr>\n");
    for (listener, tls, n) in sessions {
        let (listener, tls) = (escape(listener), escape(tls));
        let _ = writeln!(
            out,
            "<tr><td>{listener}</td><td>{tls}</td><td class=\"n\" \
             data-metric=\"portcullis_sessions_total\" data-listener=\"{listener}\" \
             data-tls=\"{tls}\">{n}</td></tr>"
        );
    }
    out.push_str("</table>\n");
}

#[cfg(test)]
mod tests;
