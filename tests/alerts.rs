//! End to end: the real relay's alerts reach a local webhook receiver when the upstream is
//! down and mail is stuck, and are resolved once delivery works again.

mod common;

use std::time::Duration;

use common::sink::{Sink, SinkConfig};
use common::webhook::WebhookReceiver;
use common::{Relay, SmtpClient, free_port, listener, queue_id};

/// Longest wait for one alert transition: the 2 s threshold (or clear time), the 1 s
/// evaluation, and slack for a loaded machine.
const WAIT: Duration = Duration::from_secs(8);

/// One MX listener, loopback may relay, one upstream `up` at `upstream_port` whose breaker
/// stays open (backoff 1h) and whose messages wait (retry 1h) until `queue retry`, and both
/// alerts at 2 s.
fn config(upstream_port: u16, webhook: &str) -> String {
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n\
         [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{upstream_port}\"\ntls = \"none\"\n\
         backoff = \"1h\"\nconnect_timeout = \"2s\"\n\n\
         [relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n[queue]\nretry = [\"1h\"]\n\n\
         [alerts]\nupstream_down = \"2s\"\nno_delivery = \"2s\"\nwebhook = \"{webhook}\"\n",
        listener("mx", free_port(), "none")
    )
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
    let mut relay = Relay::start(&config(upstream_port, &receiver.url()));
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
    assert_eq!(firing["node"], "relay.test");
    assert_eq!(firing["threshold"], "2s");
    let since = firing["since"].as_str().unwrap();
    assert!(
        since.len() == 20 && since.ends_with('Z') && &since[10..11] == "T",
        "since is RFC 3339 UTC: {since}"
    );
    assert!(
        firing["text"]
            .as_str()
            .unwrap()
            .starts_with("circuit breaker open: up down for "),
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

    // Once the relay has stopped nothing more can arrive: each alert started and ended once.
    relay.sigterm();
    assert!(relay.wait_exit(Duration::from_secs(10)).is_some());
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
