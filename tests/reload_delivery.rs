//! SIGHUP applies `[[upstreams]]` and `[queue]`: new delivery attempts use the new routes and
//! upstreams, and the checks at RCPT see the new routing table.

mod common;

use std::time::Duration;

use common::sink::{Sink, SinkConfig};
use common::*;

const WAIT: Duration = Duration::from_secs(15);

/// An open MX listener relaying for loopback, and the given `[[upstreams]]` tables.
fn policy(port: u16, upstreams: &str) -> String {
    format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n{upstreams}\n\
         [relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n[queue]\nretry = [\"1s\"]\n",
        listener("mx", port, "none")
    )
}

/// One `[[upstreams]]` table without TLS and with short timers.
fn upstream(name: &str, port: u16, domains: &[&str]) -> String {
    let domains: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "[[upstreams]]\nname = \"{name}\"\naddress = \"127.0.0.1:{port}\"\ntls = \"none\"\n\
         domains = [{}]\nbackoff = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"2s\"\n\n",
        domains.join(", ")
    )
}

/// Send one message in its own session; returns the final reply.
fn send(relay: &Relay, rcpt: &str) -> (u16, String) {
    let mut c = SmtpClient::greeted(relay.port(0));
    let reply = c.send_message(
        "a@example.org",
        &[rcpt],
        "From: <a@example.org>\r\nSubject: reload\r\n\r\nhello\r\n",
    );
    c.cmd("QUIT");
    reply
}

#[test]
fn sighup_moves_queued_mail_to_new_upstreams_and_routes_new_domains() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port();
    let dead = free_port();
    let relay = Relay::start(&policy(port, &upstream("up", dead, &["example.com"])));

    let (code, text) = send(&relay, "b@example.com");
    assert_eq!(code, 250, "{text}");
    let id = queue_id(&text).expect("queue id in the 250");
    assert!(
        relay.wait_for_log(&format!("delivery attempt failed queue_id={id}"), WAIT),
        "the only upstream is down, yet no attempt failed"
    );
    let (code, _) = send(&relay, "c@new.example");
    assert_eq!(code, 550, "a domain no upstream serves is refused at RCPT");
    assert_log(&relay, "rule=\"no_route\"");

    let upstreams = format!(
        "{}{}",
        upstream("up", sink.port(), &["example.com"]),
        upstream("second", sink.port(), &["new.example"])
    );
    std::fs::write(
        relay.config_path(),
        relay.dir().expand(&policy(port, &upstreams)),
    )
    .unwrap();
    relay.sighup();
    assert!(
        relay.wait_for_log("configuration reloaded", WAIT),
        "no reload in the log"
    );

    assert!(
        sink.wait_for(1, WAIT),
        "queued message not delivered after the reload"
    );
    assert!(
        relay.wait_for_queue_len(0, WAIT),
        "the message left the queue"
    );
    let (code, text) = send(&relay, "c@new.example");
    assert_eq!(
        code, 250,
        "the domain routed by the new config is refused: {text}"
    );
    assert!(
        sink.wait_for(2, WAIT),
        "the newly routed message was not delivered"
    );
    let rcpts: Vec<String> = sink
        .messages()
        .iter()
        .flat_map(|m| m.rcpts.clone())
        .collect();
    assert_eq!(rcpts, ["b@example.com", "c@new.example"]);
}

#[test]
fn sighup_with_an_upstream_tls_client_that_cannot_be_built_is_refused_whole() {
    let port = free_port();
    let dead = free_port();
    let relay = Relay::start(&policy(port, &upstream("up", dead, &["example.com"])));
    // A PEM file without a certificate: it passes the config check, and is no usable CA.
    let ca = relay.dir().expand("{dir}/no-cert.pem");
    std::fs::write(
        &ca,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let up = upstream("up", dead, &["example.com"]).replace(
        "tls = \"none\"",
        &format!("tls = \"required\"\nca = \"{ca}\""),
    );
    // The same file denies the client: applied, it would be refused at connect.
    let text = policy(port, &up).replace(
        "tls = \"none\"\n",
        "tls = \"none\"\ndeny = [\"127.0.0.2/32\"]\n",
    );
    std::fs::write(relay.config_path(), relay.dir().expand(&text)).unwrap();
    relay.sighup();
    assert!(
        relay.wait_for_fields(&[("rule", "reload_refused")], WAIT),
        "the reload was not refused"
    );
    let mut c = SmtpClient::connect_from("127.0.0.2", port);
    c.expect_reply(220);
    c.expect("QUIT", 221);
}

#[test]
fn sighup_reads_an_upstream_ca_bundle_replaced_under_the_same_path() {
    let dir = TestDir::new();
    let (cert, key) = write_certs(&dir.join("upstream-certs"));
    let (other_ca, _) = write_certs(&dir.join("other-ca"));
    let ca = dir.join("ca.pem");
    std::fs::copy(&other_ca, &ca).unwrap();
    let sink = Sink::start(SinkConfig {
        starttls: true,
        cert: Some((cert.clone(), key)),
        ..SinkConfig::default()
    });
    let up = upstream("up", sink.port(), &[])
        .replace("127.0.0.1", "localhost")
        .replace(
            "tls = \"none\"",
            &format!("tls = \"required\"\nca = \"{}\"", ca.display()),
        );
    let relay = Relay::start_in(dir, &policy(free_port(), &up));
    let (code, text) = send(&relay, "b@example.com");
    assert_eq!(code, 250, "{text}");
    let id = queue_id(&text).expect("queue id in the 250");
    // Refused by the bundle it was started with: the upstream's certificate is not from it.
    assert!(
        relay.wait_for_fields(&[("queue_id", &id), ("error", "TLS handshake*")], WAIT),
        "no failed TLS attempt for {id}"
    );
    // The bundle is replaced under the same path; the policy file does not change.
    std::fs::copy(&cert, &ca).unwrap();
    relay.sighup();
    assert!(
        wait_until(WAIT, || sink.messages().len() == 1),
        "not delivered with the replaced bundle"
    );
    assert!(
        relay.wait_for_queue_len(0, WAIT),
        "the message left the queue"
    );
}
