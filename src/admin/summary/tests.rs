use super::*;
use crate::observe::alerts::{ActiveAlert, AlertName};
use crate::observe::{Event, EventKind, QueueCensus, Telemetry, UpstreamCount};

/// 2026-12-01T10:42:00Z.
const T: u64 = 1_796_121_720;

/// `exchange` down since T with 1,234 queued, one alert, three refusals; at T + 65.
fn outage() -> Status {
    let telemetry = Telemetry::new("edge-1");
    let names = ["exchange".to_owned(), "smarthost".to_owned()];
    telemetry
        .upstreams
        .configure(&names, T - 60, &telemetry.metrics);
    telemetry.upstreams.set_up(
        "exchange",
        false,
        Some("connect: Connection refused\u{1b}[2J"),
        T,
        &telemetry.metrics,
    );
    for (kind, upstream, rule) in [
        (EventKind::Delivered, Some("smarthost"), None),
        (EventKind::Refused, None, Some("spf")),
        (EventKind::Refused, None, Some("spf")),
        (EventKind::Refused, None, Some("relay_denied")),
        (EventKind::Queued, None, None),
    ] {
        let mut event = Event::at(kind, (T + 30) * 1000);
        event.upstream = upstream.map(str::to_owned);
        event.rule = rule.map(str::to_owned);
        event.listener = Some("mx".into());
        telemetry.record(&event);
    }
    let census = QueueCensus {
        by_upstream: vec![UpstreamCount {
            upstream: "exchange".into(),
            queued: 1_234,
            held: 2,
        }],
        oldest: Some(("0A1B2C3D4E5F".into(), T + 5)),
        top_senders: vec![("billing@example.com".into(), 900), ("<>".into(), 3)],
        loading: false,
    };
    telemetry.set_queue(census, T + 65);
    telemetry.alerts.set(vec![ActiveAlert {
        alert: AlertName::UpstreamDown,
        since: T + 60,
        value: "60".into(),
        threshold: "1m".into(),
        text: "upstream exchange down for 1m".into(),
    }]);
    Status::live(&telemetry, T + 65, None)
}

#[test]
fn an_outage_reads_line_by_line() {
    let text = text(&outage());
    let expected = "\
node edge-1 (portcullis VERSION) at 2026-12-01T10:43:05Z: ready
alerts:
  upstream_down since 2026-12-01T10:43:00Z: upstream exchange down for 1m (value 60, threshold 1m)
upstreams:
  exchange: DOWN since 2026-12-01T10:42:00Z; delivered in the last 5 min: 0; last success: none
    last error: connect: Connection refused?[2J
  smarthost: up since 2026-12-01T10:41:00Z; delivered in the last 5 min: 1; last success: 2026-12-01T10:42:30Z
queue: 1234 queued, 2 held; oldest 1m (0A1B2C3D4E5F, since 2026-12-01T10:42:05Z)
  exchange: 1234 queued, 2 held
  top senders: billing@example.com 900, <> 3
flow           1 min    5 min   15 min   60 min
  accepted         0        1        1        1
  delivered        0        1        1        1
  refused          0        3        3        3
  deferred         0        0        0        0
top refusal rules (since start): spf 2, relay_denied 1
"
    .replace("VERSION", env!("CARGO_PKG_VERSION"));
    assert_eq!(text, expected);
}

#[test]
fn a_status_from_the_spool_says_it_is_not_live() {
    let mut status = outage();
    status.live = false;
    status.paused = true;
    let text = text(&status);
    assert!(
        text.starts_with("node edge-1 (portcullis ")
            && text
                .lines()
                .next()
                .unwrap()
                .ends_with(": not live, listeners PAUSED"),
        "{text}"
    );
    assert!(text.ends_with("top refusal rules (last hour): spf 2, relay_denied 1\n"));
}

#[test]
fn alerts_from_the_spool_are_unknown_not_none() {
    let mut status = outage();
    status.live = false;
    for alerts in [status.alerts.clone(), Vec::new()] {
        status.alerts = alerts;
        let text = text(&status);
        assert!(
            text.lines()
                .any(|l| l == "alerts: unknown (live state unavailable)"),
            "{text}"
        );
        assert!(!text.contains("alerts: none"), "{text}");
    }
}

#[test]
fn a_node_not_ready_says_why_with_the_reason_cleaned() {
    let mut status = outage();
    status.ready = false;
    status.not_ready = Some("spool not writable: \u{1b}[2J\u{202E}".into());
    let text = text(&status);
    let first = text.lines().next().unwrap();
    assert!(
        first.ends_with(": not ready: spool not writable: ?[2J?"),
        "{first}"
    );
    status.not_ready = None;
    assert!(text_first_line(&status).ends_with(": not ready"));
}

fn text_first_line(status: &Status) -> String {
    text(status).lines().next().unwrap().to_owned()
}

#[test]
fn a_queue_still_loading_after_the_start_says_so() {
    let mut status = outage();
    status.queue.loading = true;
    let text = text(&status);
    assert!(
        text.contains(
            "queue: loading after the start (recovery of the spool): delivery waits for it; \
             counted so far: 1234 queued, 2 held\n"
        ),
        "{text}"
    );
}
