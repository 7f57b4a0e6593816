use super::*;
use crate::observe::alerts::{ActiveAlert, AlertName};
use crate::observe::flow::MINUTES;
use crate::observe::status::Totals;
use crate::observe::{QueueCensus, UpstreamCount};

/// 2026-12-01T10:42:00Z.
const OUTAGE_START: u64 = 1_796_121_720;
const NOW: u64 = OUTAGE_START + 18 * 60 + 5;

fn upstream(name: &str, up: bool, since: u64, error: Option<&str>) -> UpstreamState {
    let mut u = UpstreamState::default();
    u.name = name.to_owned();
    u.up = up;
    u.breaker_open = !up;
    u.since = since;
    u.last_error = error.map(str::to_owned);
    u.last_success = Some(since - 3);
    u.delivered_5m = if up { 17 } else { 0 };
    u
}

fn minutes(now: u64) -> Vec<Minute> {
    let current = now / 60 * 60;
    (0..MINUTES as u64)
        .rev()
        .map(|back| Minute {
            start: current - back * 60,
            accepted: 20 + back % 7,
            delivered: if back > 18 { 19 } else { 0 },
            refused: back % 3,
            deferred: if back > 18 { 0 } else { 21 },
        })
        .collect()
}

/// An upstream down for 18 minutes with 1,234 messages queued behind it.
fn outage() -> Status {
    let minutes = minutes(NOW);
    let sum = |n: usize| {
        let mut s = Minute::default();
        for m in minutes.iter().rev().take(n) {
            s.accepted += m.accepted;
            s.delivered += m.delivered;
            s.refused += m.refused;
            s.deferred += m.deferred;
        }
        s
    };
    Status {
        node: "edge-1".into(),
        version: "0.1.0".into(),
        now: NOW,
        live: true,
        ready: true,
        not_ready: None,
        paused: false,
        upstreams: vec![
            upstream(
                "exchange",
                false,
                OUTAGE_START,
                Some("connect 10.0.0.5:25: connection refused"),
            ),
            upstream("smarthost", true, OUTAGE_START - 86_400, None),
        ],
        queue: QueueCensus {
            by_upstream: vec![
                UpstreamCount {
                    upstream: "exchange".into(),
                    queued: 1_230,
                    held: 2,
                },
                UpstreamCount {
                    upstream: "smarthost".into(),
                    queued: 4,
                    held: 0,
                },
            ],
            oldest: Some(("0A1B2C3D4E5F".into(), OUTAGE_START + 2)),
            top_senders: vec![("billing@example.com".into(), 311)],
            loading: false,
        },
        last_1m: sum(1),
        last_5m: sum(5),
        last_15m: sum(15),
        last_60m: sum(60),
        minutes,
        alerts: vec![ActiveAlert {
            alert: AlertName::UpstreamDown,
            since: OUTAGE_START + 300,
            value: "1085".into(),
            threshold: "5m".into(),
            text: "upstream exchange down for 18m".into(),
        }],
        top_refusals: vec![("spf".into(), 40), ("dnsbl".into(), 12)],
        totals: Totals {
            accepted: vec![("mx".into(), 5_000)],
            delivered: vec![("exchange".into(), 3_500), ("smarthost".into(), 80)],
            deferred: vec![("exchange".into(), 2_200)],
            expired: vec![],
            bounced: 3,
            auth_successes: 9,
            auth_failures: 1,
            queue_oldest_seconds: NOW - OUTAGE_START - 2,
            sessions: vec![
                ("mx".into(), "1.3".into(), 4_100),
                ("mx".into(), "none".into(), 950),
            ],
            dns_errors: vec![("spf".into(), 7)],
            removed: vec![("purge".into(), 12)],
        },
        journal: None,
    }
}

/// The text of the element whose start tag contains `attrs`.
fn element_text<'a>(html: &'a str, attrs: &str) -> Option<&'a str> {
    let at = html.find(attrs)?;
    let rest = &html[at..];
    let start = rest.find('>')? + 1;
    let end = rest[start..].find('<')? + start;
    Some(&rest[start..end])
}

#[test]
fn escape_neutralises_markup_and_control_characters() {
    assert_eq!(
        escape("<script>alert(\"x\")</script> & 'y'\u{7}\u{1b}[0m"),
        "&lt;script&gt;alert(&quot;x&quot;)&lt;/script&gt; &amp; &#39;y&#39;\u{FFFD}\u{FFFD}[0m"
    );
    assert_eq!(escape("plain text ü"), "plain text ü");
}

#[test]
fn escape_neutralises_invisible_characters_that_disguise_an_address() {
    // Right-to-left override: shows as a trusted-looking address; zero-width space and the
    // isolates hide characters.
    assert_eq!(
        escape("<\u{202E}gro.elpmaxe@knab-ecivres>"),
        "&lt;\u{FFFD}gro.elpmaxe@knab-ecivres&gt;"
    );
    assert_eq!(
        escape("ex\u{200B}change\u{2066}\u{FEFF}"),
        "ex\u{FFFD}change\u{FFFD}\u{FFFD}"
    );
    let mut status = outage();
    let disguised = "a\u{202E}b@example.org";
    status.queue.top_senders = vec![(disguised.into(), 2)];
    status.upstreams[0].last_error = Some(disguised.into());
    let html = render(&status);
    assert!(!html.contains('\u{202E}'), "{html}");
    assert!(html.contains("a\u{FFFD}b@example.org"));
}

#[test]
fn strings_from_outside_are_escaped_everywhere() {
    let mut status = outage();
    let hostile = "<img src=x onerror=alert(1)>\"'";
    status.upstreams[0].last_error = Some(hostile.into());
    status.upstreams[0].name = format!("ex{hostile}");
    status.top_refusals = vec![(hostile.into(), 1)];
    status.queue.top_senders = vec![(hostile.into(), 2)];
    status.queue.oldest = Some((hostile.into(), OUTAGE_START));
    status.alerts[0].text = hostile.into();
    status.node = hostile.into();
    let html = render(&status);
    assert!(!html.contains("<img"), "raw markup in the page:\n{html}");
    assert!(!html.contains("onerror=alert(1)>"));
    let escaped = "&lt;img src=x onerror=alert(1)&gt;&quot;&#39;";
    // node (title, meta), headline, card name, card attribute, error, oldest, sender, rule, alert.
    assert!(html.matches(escaped).count() >= 10, "{html}");
}

#[test]
fn an_upstream_outage_is_the_headline() {
    let html = render(&outage());
    assert_eq!(
        element_text(&html, "id=\"verdict\""),
        Some("Upstream exchange down since 2026-12-01T10:42:00Z — 1,234 queued")
    );
    assert!(html.contains("<h1 id=\"verdict\" class=\"bad\">"));
    // The alert follows the headline, the upstreams follow the alerts, and so on.
    let order = [
        "id=\"verdict\"",
        "id=\"alerts\"",
        "id=\"upstreams\"",
        "id=\"queue\"",
        "id=\"flow\"",
        "id=\"refusals\"",
    ];
    let positions: Vec<usize> = order.iter().map(|s| html.find(s).expect(s)).collect();
    assert!(
        positions.is_sorted(),
        "sections out of order: {positions:?}"
    );
}

#[test]
fn headline_says_paused_first_and_flowing_when_all_is_well() {
    let mut status = outage();
    status.paused = true;
    assert_eq!(
        element_text(&render(&status), "id=\"verdict\""),
        Some("Paused: listeners refuse new connections — 1,234 queued")
    );
    status.paused = false;
    status.upstreams[0].up = true;
    status.alerts.clear();
    status.queue = QueueCensus::default();
    let html = render(&status);
    assert_eq!(
        element_text(&html, "id=\"verdict\""),
        Some("Mail is flowing — 0 queued")
    );
    assert!(html.contains("class=\"ok\""));
    status.alerts = outage().alerts;
    assert_eq!(
        element_text(&render(&status), "id=\"verdict\""),
        Some("1 alert firing — 0 queued")
    );
}

#[test]
fn each_chart_has_sixty_points_scaled_to_its_maximum() {
    let html = render(&outage());
    for series in ["accepted", "delivered", "refused", "deferred"] {
        let svg_at = html
            .find(&format!("data-series=\"{series}\""))
            .unwrap_or_else(|| panic!("no chart for {series}"));
        let svg = &html[svg_at..];
        let svg = &svg[..svg.find("</svg>").expect("closed svg")];
        let points = svg.split("points=\"").nth(1).expect("a polyline");
        let points: Vec<&str> = points[..points.find('"').unwrap()].split(' ').collect();
        assert_eq!(points.len(), 60, "{series}");
        // The y axis is labelled with the maximum, the x axis with the first and last minute.
        assert!(svg.contains(">0</text>"), "{series}");
        assert!(
            svg.contains(">10:01</text>") && svg.contains(">11:00</text>"),
            "{svg}"
        );
    }
    // Deferred: 21 a minute for the last 19 minutes, 0 before: the highest point is at the top.
    let deferred = &html[html.find("data-series=\"deferred\"").unwrap()..];
    assert!(deferred.contains(">21</text>"));
    assert!(
        deferred.contains("312.0,8.0\"/>"),
        "last point at the top right"
    );
}

#[test]
fn numbers_in_metrics_carry_data_metric_attributes() {
    let html = render(&outage());
    let cases = [
        (
            "data-metric=\"portcullis_queue_messages\" data-upstream=\"exchange\" data-state=\"queued\"",
            "1230",
        ),
        (
            "data-metric=\"portcullis_queue_messages\" data-upstream=\"exchange\" data-state=\"held\"",
            "2",
        ),
        (
            "data-metric=\"portcullis_refusals_total\" data-rule=\"spf\"",
            "40",
        ),
        (
            "data-metric=\"portcullis_messages_accepted_total\" data-listener=\"mx\"",
            "5000",
        ),
        (
            "data-metric=\"portcullis_messages_delivered_total\" data-upstream=\"exchange\"",
            "3500",
        ),
        (
            "data-metric=\"portcullis_messages_deferred_total\" data-upstream=\"exchange\"",
            "2200",
        ),
        ("data-metric=\"portcullis_messages_bounced_total\"", "3"),
        ("data-metric=\"portcullis_auth_failures_total\"", "1"),
        (
            "data-metric=\"portcullis_sessions_total\" data-listener=\"mx\" data-tls=\"1.3\"",
            "4100",
        ),
        (
            "data-metric=\"portcullis_dns_errors_total\" data-check=\"spf\"",
            "7",
        ),
        (
            "data-metric=\"portcullis_messages_removed_total\" data-how=\"purge\"",
            "12",
        ),
    ];
    for (attrs, text) in cases {
        assert_eq!(element_text(&html, attrs), Some(text), "{attrs}");
    }
    assert!(html.contains(
        "data-metric=\"portcullis_upstream_up\" data-upstream=\"exchange\" data-value=\"0\">down"
    ));
    assert!(html.contains(
        "data-metric=\"portcullis_upstream_breaker_open\" data-upstream=\"exchange\" data-value=\"1\">open"
    ));
    assert!(html.contains(&format!(
        "data-metric=\"portcullis_queue_oldest_seconds\" data-value=\"{}\"",
        NOW - OUTAGE_START - 2
    )));
    assert!(html.contains(
        "data-metric=\"portcullis_alert_active\" data-alert=\"upstream_down\" data-value=\"1\""
    ));
}

#[test]
fn the_page_stands_alone_and_refreshes() {
    let html = render(&outage());
    assert!(html.starts_with("<!DOCTYPE html>"));
    assert!(html.contains("<meta http-equiv=\"refresh\" content=\"30\">"));
    assert!(
        html.contains("<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">")
    );
    for forbidden in ["<script", "http://", "https://", " src=", "<link", "url("] {
        assert!(!html.contains(forbidden), "{forbidden} in the page");
    }
    assert!(html.ends_with("</html>\n"));
}

#[test]
fn sums_over_one_five_fifteen_and_sixty_minutes_are_shown() {
    let status = outage();
    let html = render(&status);
    assert_eq!(
        element_text(&html, "data-sum=\"deferred\" data-span=\"15\""),
        Some("315")
    );
    assert_eq!(
        element_text(&html, "data-sum=\"accepted\" data-span=\"60\""),
        Some(status.last_60m.accepted.to_string().as_str())
    );
}

#[test]
fn a_node_not_ready_says_why_with_the_reason_escaped() {
    let mut status = outage();
    status.ready = false;
    status.not_ready = Some("spool <not> writable".into());
    let html = render(&status);
    assert!(
        html.contains("not ready: spool &lt;not&gt; writable"),
        "{html}"
    );
    assert!(!html.contains("spool <not>"));
}

#[test]
fn no_string_from_outside_brings_an_invisible_character_into_the_page() {
    // A bidi override, a zero-width space, an isolate and a tag character in every string
    // the page shows, with and without a down upstream and a not-ready reason.
    let hide = |s: &str| format!("{s}\u{202E}\u{200B}\u{2066}\u{E0041}");
    for variant in 0..3 {
        let mut status = outage();
        status.node = hide("edge");
        status.version = hide("1");
        for u in &mut status.upstreams {
            u.name = hide(&u.name);
            u.last_error = Some(hide("421 busy"));
        }
        status.alerts[0].text = hide("text");
        status.alerts[0].value = hide("125s");
        status.alerts[0].threshold = hide("5m");
        status.queue.oldest = Some((hide("id"), OUTAGE_START));
        for u in &mut status.queue.by_upstream {
            u.upstream = hide(&u.upstream);
        }
        status.queue.top_senders = vec![(hide("a@example.org"), 2)];
        status.top_refusals = vec![(hide("rule"), 1)];
        let totals = &mut status.totals;
        totals.accepted = vec![(hide("mx"), 1)];
        totals.sessions = vec![(hide("mx"), hide("1.3"), 1)];
        totals.dns_errors = vec![(hide("spf"), 1)];
        totals.removed = vec![(hide("purge"), 1)];
        match variant {
            0 => {}
            1 => {
                status.upstreams.iter_mut().for_each(|u| u.up = true);
                status.ready = false;
                status.not_ready = Some(hide("spool not writable"));
            }
            _ => status.upstreams.iter_mut().for_each(|u| u.up = true),
        }
        let html = render(&status);
        let shown: Vec<char> = html
            .chars()
            .filter(|&c| crate::text::is_invisible(c))
            .collect();
        assert!(shown.is_empty(), "variant {variant}: {shown:?}\n{html}");
    }
}
