//! End to end: the real relay's alerts reach a local webhook receiver when the upstream is
//! down and mail is stuck, and are resolved once delivery works again.

mod common;

use std::time::Duration;

use common::http;
use common::sink::{Sink, SinkConfig};
use common::webhook::WebhookReceiver;
use common::{Relay, SmtpClient, free_port, listener, queue_id};

/// Longest wait for one alert transition: the 2 s threshold (or clear time), the 1 s
/// evaluation, and slack for a loaded machine.
const WAIT: Duration = Duration::from_secs(8);

/// One MX listener, loopback may relay, one upstream `up` at `upstream_port` whose breaker
/// stays open (backoff 1h) and whose messages wait (retry 1h) until `queue retry`, both
/// alerts at 2 s, and the admin listener on `admin` (loopback, no token).
fn config(upstream_port: u16, webhook: &str, admin: u16) -> String {
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n\
         [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{upstream_port}\"\ntls = \"none\"\n\
         backoff = \"1h\"\nconnect_timeout = \"2s\"\n\n\
         [relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n[queue]\nretry = [\"1h\"]\n\n\
         [alerts]\nupstream_down = \"2s\"\nno_delivery = \"2s\"\nwebhook = \"{webhook}\"\n\n\
         [admin]\nbind = \"127.0.0.1:{admin}\"\n",
        listener("mx", free_port(), "none")
    )
}

/// The `alert` names of `/api/status`'s `alerts`.
fn status_alerts(admin: u16) -> Vec<String> {
    let status = http::get(admin, "/api/status", &[]);
    assert_eq!(status.status, 200);
    let json: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    json["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| a["alert"].as_str().unwrap().to_owned())
        .collect()
}

fn send_one(relay: &Relay) -> String {
    let mut c = SmtpClient::greeted(relay.port(0));
    let body = "From: <a@example.org>\r\nTo: <b@example.com>\r\nSubject: stuck\r\n\r\nx\r\n";
    let (code, text) = c.send_message("a@example.org", &["b@example.com"], body);
    assert_eq!(code, 250, "message refused: {code} {text}");
    c.cmd("QUIT");
    queue_id(&text).expect("queue id in the 250")
}

#[test]
fn upstream_down_and_no_delivery_fire_on_the_webhook_and_resolve_after_queue_retry() {
    let receiver = WebhookReceiver::start();
    let upstream_port = free_port(); // nothing listens there yet
    let admin = free_port();
    let mut relay = Relay::start(&config(upstream_port, &receiver.url(), admin));
    assert!(
        http::wait_accepting(admin, WAIT),
        "admin listener not accepting on {admin}"
    );
    // Every alert's series exists from the start.
    assert_eq!(http::alert_gauge(admin, "upstream_down"), "0");
    assert_eq!(http::alert_gauge(admin, "cluster_fallback"), "0");
    send_one(&relay);

    for alert in ["upstream_down", "no_delivery"] {
        assert!(
            receiver.wait_for(alert, "firing", WAIT),
            "no firing {alert}: {:?}",
            receiver.states()
        );
    }
    assert!(relay.has_fields(&[("alert", "upstream_down")]));
    assert!(relay.has_fields(&[("alert", "no_delivery")]));
    let bodies = receiver.bodies();
    let firing = bodies
        .iter()
        .find(|b| b["alert"] == "upstream_down")
        .unwrap();
    // Exactly the contract's keys (DESIGN.md, [alerts] webhook).
    let mut keys: Vec<&str> = firing
        .as_object()
        .expect("a JSON object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(
        keys,
        [
            "alert",
            "node",
            "since",
            "state",
            "text",
            "threshold",
            "value"
        ],
        "{firing}"
    );
    assert_eq!(firing["node"], "relay.test");
    assert_eq!(firing["threshold"], "2s");
    let value = firing["value"].as_str().unwrap_or_default();
    assert!(
        value
            .strip_suffix('s')
            .is_some_and(|n| n.parse::<u64>().is_ok_and(|n| n >= 2)),
        "value is how long it has been down, at least the threshold: {firing}"
    );
    let since = firing["since"].as_str().unwrap();
    assert!(
        since.len() == 20 && since.ends_with('Z') && &since[10..11] == "T",
        "since is RFC 3339 UTC: {since}"
    );
    // Down from the start's probe (breaker closed), or from the delivery (breaker open).
    let text = firing["text"].as_str().unwrap();
    assert!(
        text.starts_with("upstream down: up down for ")
            || text.starts_with("circuit breaker open: up down for "),
        "{firing}"
    );

    let sink = Sink::start_on(upstream_port, SinkConfig::default());
    let out = relay.command(&["queue", "retry", "--all"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        sink.wait_for(1, WAIT),
        "the retried message was not delivered"
    );
    for alert in ["upstream_down", "no_delivery"] {
        assert!(
            receiver.wait_for(alert, "resolved", WAIT),
            "no resolved {alert}: {:?}",
            receiver.states()
        );
    }

    assert_eq!(http::alert_gauge(admin, "upstream_down"), "0");
    assert_eq!(http::alert_gauge(admin, "no_delivery"), "0");
    assert!(status_alerts(admin).is_empty());

    // Once the relay has stopped nothing more can arrive: each alert started and ended once.
    relay.stop();
    let mut states = receiver.states();
    states.sort();
    let pair = |a: &str, s: &str| (a.to_owned(), s.to_owned());
    assert_eq!(
        states,
        [
            pair("no_delivery", "firing"),
            pair("no_delivery", "resolved"),
            pair("upstream_down", "firing"),
            pair("upstream_down", "resolved"),
        ]
    );
}

/// `up`, `breaker_open` and `last_error` of upstream `name` in `/api/status`.
fn status_upstream(admin: u16, name: &str) -> (bool, bool, String) {
    let status = http::get(admin, "/api/status", &[]);
    assert_eq!(status.status, 200);
    let json: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    let up = json["upstreams"]
        .as_array()
        .unwrap()
        .iter()
        .find(|u| u["name"] == name)
        .unwrap_or_else(|| panic!("no upstream {name}: {json}"))
        .clone();
    (
        up["up"].as_bool().unwrap(),
        up["breaker_open"].as_bool().unwrap(),
        up["last_error"].as_str().unwrap_or_default().to_owned(),
    )
}

/// A relay (re)started while its upstream is down knows it from the start's capability probe
/// and says so everywhere at once, without waiting for a delivery: the status, the gauges
/// (`upstream_up` 0; the breaker, which the probe leaves alone, closed) and `upstream_down`.
/// The first delivery that gets through brings it up again.
#[test]
fn an_upstream_the_start_probe_cannot_reach_is_down_at_once_until_a_delivery_reaches_it() {
    let receiver = WebhookReceiver::start();
    let upstream_port = free_port(); // nothing listens there
    let admin = free_port();
    let relay = Relay::start(&config(upstream_port, &receiver.url(), admin));
    assert!(http::wait_accepting(admin, WAIT));
    let (up, breaker_open, error) = status_upstream(admin, "up");
    assert!(!up && !breaker_open, "{up} {breaker_open}");
    assert!(error.contains("refused"), "last error: {error}");
    assert_eq!(
        http::metric(admin, "portcullis_upstream_up{upstream=\"up\"}"),
        "0"
    );
    assert_eq!(
        http::metric(admin, "portcullis_upstream_breaker_open{upstream=\"up\"}"),
        "0"
    );
    assert!(
        receiver.wait_for("upstream_down", "firing", WAIT),
        "{:?}",
        receiver.states()
    );

    // The breaker was never opened: the first message goes out at once.
    let sink = Sink::start_on(upstream_port, SinkConfig::default());
    send_one(&relay);
    assert!(sink.wait_for(1, WAIT), "the message was not delivered");
    assert!(status_upstream(admin, "up").0);
    assert_eq!(
        http::metric(admin, "portcullis_upstream_up{upstream=\"up\"}"),
        "1"
    );
    assert!(
        receiver.wait_for("upstream_down", "resolved", WAIT),
        "{:?}",
        receiver.states()
    );
}

/// `since` (Unix seconds) and `value` of `alert` in `/api/status`, if it fires.
fn status_alert(admin: u16, alert: &str) -> Option<(u64, String)> {
    let status = http::get(admin, "/api/status", &[]);
    assert_eq!(status.status, 200);
    let json: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    json["alerts"]
        .as_array()
        .unwrap()
        .iter()
        .find(|a| a["alert"] == alert)
        .map(|a| {
            (
                a["since"].as_u64().unwrap(),
                a["value"].as_str().unwrap().to_owned(),
            )
        })
}

/// "Starts once, ends once" holds across restarts: an alert firing when the relay stops is
/// kept under the spool (0600); restarted while its condition still holds, the relay carries
/// it on (same `since`, gauge 1, nothing sent); restarted once it is clear, it sends the one
/// `resolved`.
#[test]
fn a_firing_alert_survives_a_restart_without_a_second_firing_and_resolves_after_one() {
    use std::os::unix::fs::PermissionsExt as _;
    let receiver = WebhookReceiver::start();
    let upstream_port = free_port(); // nothing listens there
    let admin = free_port();
    let mut relay = Relay::start(&config(upstream_port, &receiver.url(), admin));
    assert!(http::wait_accepting(admin, WAIT));
    assert!(receiver.wait_for("upstream_down", "firing", WAIT));
    let (since, _) = status_alert(admin, "upstream_down").expect("upstream_down on the status");
    let kept = relay.spool.join("alerts.json");
    let mode = std::fs::metadata(&kept).unwrap().permissions().mode();
    assert_eq!(mode & 0o777, 0o600, "{}", kept.display());

    // Still down after the restart: carried on from the start, with its since, past the
    // moment (threshold after the start) a fresh alert would have started.
    relay.stop();
    relay.restart();
    assert!(http::wait_accepting(admin, WAIT));
    assert_eq!(http::alert_gauge(admin, "upstream_down"), "1");
    let carried_past_threshold = common::wait_until(WAIT, || {
        status_alert(admin, "upstream_down").is_some_and(|(s, value)| {
            assert_eq!(s, since, "a new since: announced again");
            value.trim_end_matches('s').parse::<u64>().unwrap() >= 3
        })
    });
    assert!(
        carried_past_threshold,
        "{:?}",
        status_alert(admin, "upstream_down")
    );

    // Up while the relay is stopped: the next start's probe finds it, the alert ends once.
    relay.stop();
    let _sink = Sink::start_on(upstream_port, SinkConfig::default());
    relay.restart();
    assert!(
        receiver.wait_for("upstream_down", "resolved", WAIT),
        "{:?}",
        receiver.states()
    );
    assert_eq!(http::alert_gauge(admin, "upstream_down"), "0");
    relay.stop();
    // Notifications go out in order, so any second firing was sent before the resolved.
    let pair = |a: &str, s: &str| (a.to_owned(), s.to_owned());
    assert_eq!(
        receiver.states(),
        [
            pair("upstream_down", "firing"),
            pair("upstream_down", "resolved")
        ]
    );
}
