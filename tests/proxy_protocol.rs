//! The relay behind a real HAProxy (Debian `haproxy`, TCP mode) on loopback: `send-proxy`
//! (PROXY v1) and `send-proxy-v2` frontends in front of listeners with `trusted_proxies`.
//! The client connects to HAProxy from 127.0.0.2, HAProxy to the relay from 127.0.0.1, so
//! the address the relay uses shows which one it believed: the `Received:` field at the
//! upstream, the session's log lines and `deny` must all name 127.0.0.2. HAProxy's own health
//! checks (`option smtpchk` over v2, whose checks send a `LOCAL` header, and a plain TCP
//! check over v1) must leave no warning or error in the relay's log.
//!
//! Skipped when haproxy is missing, unless `PORTCULLIS_REQUIRE_HAPROXY=1` (set by `.ci/run`).

mod common;

use std::time::Duration;

use common::haproxy::{self, Haproxy, proxy_warnings, skip_without_haproxy};
use common::sink::{Sink, SinkConfig};
use common::*;

/// The client's address; HAProxy connects to the relay from 127.0.0.1.
const CLIENT: &str = "127.0.0.2";

/// The HAProxy configuration: a monitor frontend on `ready`, then for each `(name, frontend
/// port, relay port, backend option, server options)` a TCP frontend and its backend of one
/// server.
fn haproxy_cfg(ready: u16, routes: &[(&str, u16, u16, &str, &str)]) -> String {
    let mut cfg = haproxy::preamble(ready);
    for (name, front, relay, option, server) in routes {
        cfg.push_str(&format!(
            "frontend {name}\n    bind 127.0.0.1:{front}\n    default_backend {name}_relays\n\
             backend {name}_relays\n    {option}\n    server r1 127.0.0.1:{relay} {server}\n"
        ));
    }
    cfg
}

#[test]
fn clients_behind_haproxy_are_seen_by_their_own_address() {
    if skip_without_haproxy("clients_behind_haproxy_are_seen_by_their_own_address") {
        return;
    }
    let sink = Sink::start(SinkConfig::default());
    let (mx, fenced) = (free_port(), free_port());
    let trusted = "trusted_proxies = [\"127.0.0.1\"]\n";
    let relay = Relay::start(&config(
        &[
            listener("mx", mx, "none") + trusted,
            listener("fenced", fenced, "none") + trusted + "deny = [\"127.0.0.2/32\"]\n",
        ],
        sink.port(),
        "[relay]\naccepted_domains = [\"example.com\"]\n",
    ));
    let (ready, v1, v2, v2_fenced) = (free_port(), free_port(), free_port(), free_port());
    let dir = TestDir::new();
    let cfg = haproxy_cfg(
        ready,
        &[
            // A plain TCP check over v1; SMTP checks (EHLO, then 250 expected) over v2.
            ("v1", v1, mx, "", "send-proxy check inter 250ms"),
            (
                "v2",
                v2,
                mx,
                "option smtpchk EHLO checker.test",
                "send-proxy-v2 check inter 250ms",
            ),
            ("fenced", v2_fenced, fenced, "", "send-proxy-v2"),
        ],
    );
    let haproxy = Haproxy::start(&dir, &cfg, ready);

    for (front, subject) in [(v1, "through v1"), (v2, "through v2")] {
        let mut client = SmtpClient::connect_from(CLIENT, front);
        client.expect_reply(220);
        client.expect("EHLO client.test", 250);
        let body = format!("Subject: {subject}\r\n\r\nhello\r\n");
        let (code, text) = client.send_message("a@sender.test", &["u@example.com"], &body);
        assert_eq!(code, 250, "{text}\n{}", relay.log());
        let id = queue_id(&text).expect("queue id");
        client.expect("QUIT", 221);
        // The session's lines name the client as its peer, the load balancer as its proxy.
        assert_log_fields(
            &relay,
            &[("queue_id", &id), ("proxy", "127.0.0.1"), ("peer", CLIENT)],
        );
    }
    assert!(sink.wait_for(2, Duration::from_secs(10)), "{}", relay.log());
    for message in sink.messages() {
        let text = String::from_utf8_lossy(&message.data);
        assert!(
            text.contains("Received: from client.test ([127.0.0.2])\r\n\tby relay.test"),
            "{text}"
        );
        assert!(!text.contains("[127.0.0.1]"), "{text}");
    }

    // `deny` judges the client, not the load balancer.
    let mut denied = SmtpClient::connect_from(CLIENT, v2_fenced);
    let (code, text) = denied.read_reply();
    assert_eq!(code, 554, "{text}");
    assert!(text.starts_with("554 5.7.1 "), "{text}");
    assert_log_fields(
        &relay,
        &[
            ("rule", "listener_deny"),
            ("proxy", "127.0.0.1"),
            ("peer", CLIENT),
        ],
    );

    // The health checks ran (HAProxy's sessions: the v1 TCP check sends its header and
    // closes, the v2 SMTP check a LOCAL header, EHLO and a close), and left nothing above
    // info in the relay's log.
    let checked = wait_until(Duration::from_secs(5), || {
        count_log_fields(&relay.log(), &[("listener", "mx"), ("peer", "127.0.0.1")]) >= 3
    });
    assert!(checked, "no health check sessions:\n{}", relay.log());
    let log = relay.log();
    assert_eq!(proxy_warnings(&log), Vec::<&str>::new(), "{log}");
    assert!(!log_has_fields(&log, &[("rule", "proxy_header")]), "{log}");
    let haproxy_log = haproxy.log();
    assert!(!haproxy_log.contains("is DOWN"), "{haproxy_log}");
}
