//! Two relays on one Redis (`[cluster]`), over direct loopback connections: a per-IP message
//! budget and an AUTH lockout are shared by both nodes; with Redis stopped, `on_error =
//! "tempfail"` answers temporary refusals (`421 4.3.0` at the greeting, `454 4.7.0` to AUTH,
//! `451 4.3.0` at MAIL and RCPT) and `"local"` keeps accepting mail with the
//! `cluster_fallback` alert raised; with Redis back, both are shared again.

mod common;

use std::time::Duration;

use common::*;
use portcullis::cluster::testing::TestRedis;

const WAIT: Duration = Duration::from_secs(10);

/// A node: an `mx` listener (no TLS) and a `submission` listener (STARTTLS, AUTH required),
/// `alice` and `bob` (password `secret`), the admin listener on `admin`, `rates` under
/// `[rate_limits]`, and `[cluster]` on `redis` with `on_error`.
fn node(redis: &TestRedis, name: &str, on_error: &str, rates: &str, admin: u16) -> Relay {
    let dir = TestDir::new();
    write_alice_and_bob(&dir);
    let toml = config(
        &[
            listener("mx", free_port(), "none"),
            listener("submission", free_port(), "starttls")
                + "require_tls = true\nauth = \"required\"\n",
        ],
        free_port(),
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\nmax_failures = 2\n\
             failure_window = \"10m\"\nlockout = \"1h\"\n\n\
             [rate_limits]\n{rates}\n\n\
             [admin]\nbind = \"127.0.0.1:{admin}\"\n\n\
             [cluster]\nredis = \"{}\"\nnode = \"{name}\"\non_error = \"{on_error}\"\n",
            redis.url()
        ),
    );
    let relay = Relay::start_in(dir, &toml);
    assert!(http::wait_accepting(admin, WAIT), "admin not accepting");
    relay
}

/// Greeted and through EHLO on the `mx` listener, from `ip`.
fn mx_from(relay: &Relay, ip: &str) -> SmtpClient {
    let mut c = SmtpClient::connect_from(ip, relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c
}

/// Through STARTTLS and EHLO again on the `submission` listener, from `ip`: ready for AUTH.
fn submission_from(relay: &Relay, ip: &str) -> SmtpClient {
    let mut c = SmtpClient::connect_from(ip, relay.port(1));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c.starttls(&relay.cert_path());
    c.expect("EHLO client.test", 250);
    c
}

/// One message from a stranger to `user@example.com`: the final reply.
fn send(relay: &Relay, ip: &str) -> (u16, String) {
    let mut c = mx_from(relay, ip);
    c.send_message(
        "someone@sender.test",
        &["user@example.com"],
        "Subject: t\r\n\r\nhi\r\n",
    )
}

#[test]
fn a_message_budget_and_a_lockout_are_shared_by_two_nodes() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let rates = "messages_per_ip = \"2/hour\"";
    let one = node(&redis, "edge-1", "local", rates, free_port());
    let admin = free_port();
    let two = node(&redis, "edge-2", "local", rates, admin);

    assert_eq!(send(&one, "127.0.0.5").0, 250);
    assert_eq!(send(&two, "127.0.0.5").0, 250);
    // The third message of 2/hour, whichever node it goes to.
    let mut c = mx_from(&one, "127.0.0.5");
    assert_reply(&c.cmd("MAIL FROM:<someone@sender.test>"), 451, "4.7.1");
    assert_log_fields(
        &one,
        &[
            ("rule", "rate_limits.messages_per_ip"),
            ("reply", "451 4.7.1"),
        ],
    );
    assert_eq!(
        redis.command(&["EXISTS", "portcullis:rate:messages_per_ip:127.0.0.5"]),
        Some("1".into())
    );

    // Node two explains the shared budget: spent, though it took only one message itself.
    let explained = http::get(admin, "/api/explain-state?ip=127.0.0.5", &[]);
    assert_eq!(explained.status, 200);
    let state: serde_json::Value = serde_json::from_str(&explained.body).unwrap();
    assert_eq!(state["store"], "shared");
    assert_eq!(state["budgets"][0]["rule"], "rate_limits.messages_per_ip");
    assert_eq!(state["budgets"][0]["available"], 0);

    // Two wrong passwords on node one lock the client out of node two too, unverified.
    let mut c = submission_from(&one, "127.0.0.6");
    assert_reply(&c.cmd(&auth_plain("bob", "guess-1")), 535, "5.7.8");
    assert_reply(&c.cmd(&auth_plain("bob", "guess-2")), 535, "5.7.8");
    assert_log_fields(&one, &[("rule", "auth_lockout"), ("failures", "2")]);
    let mut c = submission_from(&two, "127.0.0.6");
    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 454, "4.7.0");
    assert_log_fields(&two, &[("rule", "auth_lockout"), ("reply", "454 4.7.0")]);
    let log = two.log();
    assert_eq!(
        count_log_fields(&log, &[("rule", "auth_bad_password")]),
        0,
        "{log}"
    );
    // Another client still gets in on either node.
    let mut c = submission_from(&two, "127.0.0.7");
    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");
}

#[test]
fn tempfail_with_redis_stopped_refuses_temporarily_and_recovers() {
    let Some(mut redis) = TestRedis::start() else {
        return;
    };
    let rates = "messages_per_ip = \"100/hour\"\nrecipients_per_ip = \"100/hour\"";
    let relay = node(&redis, "edge-1", "tempfail", rates, free_port());
    // Sessions opened while the store answers.
    let mut auth = submission_from(&relay, "127.0.0.8");
    let mut rcpt = mx_from(&relay, "127.0.0.8");
    rcpt.expect("MAIL FROM:<someone@sender.test>", 250);
    let mut mail = mx_from(&relay, "127.0.0.8");

    redis.stop();
    assert_reply(&rcpt.cmd("RCPT TO:<user@example.com>"), 451, "4.3.0");
    assert_reply(&mail.cmd("MAIL FROM:<someone@sender.test>"), 451, "4.3.0");
    assert_reply(&auth.cmd(&auth_plain("alice", "secret")), 454, "4.7.0");
    assert_log_fields(
        &relay,
        &[("rule", "cluster_unavailable"), ("reply", "451 4.3.0")],
    );
    assert_log_fields(
        &relay,
        &[("rule", "cluster_unavailable"), ("reply", "454 4.7.0")],
    );
    // A new session: no connect limit is configured, yet it is refused at the greeting.
    let mut c = SmtpClient::connect_from("127.0.0.9", relay.port(0));
    assert_reply(&c.read_reply(), 421, "4.3.0");
    assert_log_fields(
        &relay,
        &[("rule", "cluster_unavailable"), ("reply", "421 4.3.0")],
    );

    redis.restart();
    // The node finds the store again by itself (it pings it while down).
    let greeted = wait_until(WAIT, || {
        SmtpClient::connect_from("127.0.0.9", relay.port(0))
            .read_reply()
            .0
            == 220
    });
    assert!(greeted, "no greeting after Redis came back");
    assert_eq!(send(&relay, "127.0.0.9").0, 250);
    assert_eq!(
        redis.command(&["EXISTS", "portcullis:rate:messages_per_ip:127.0.0.9"]),
        Some("1".into())
    );
    assert_log(&relay, "shared store reachable again");
}

#[test]
fn local_fallback_with_redis_stopped_keeps_accepting_mail_and_raises_the_alert() {
    let Some(mut redis) = TestRedis::start() else {
        return;
    };
    let admin = free_port();
    let relay = node(
        &redis,
        "edge-1",
        "local",
        "messages_per_ip = \"100/hour\"",
        admin,
    );
    assert_eq!(send(&relay, "127.0.0.10").0, 250);
    assert_eq!(http::alert_gauge(admin, "cluster_fallback"), "0");

    redis.stop();
    assert_eq!(send(&relay, "127.0.0.10").0, 250);
    assert!(relay.wait_for_fields(&[("rule", "cluster_fallback")], WAIT));
    assert_log(&relay, "shared store unavailable");
    // The alert is published by the relay's next evaluation of its alerts.
    assert!(
        wait_until(WAIT, || http::alert_gauge(admin, "cluster_fallback") == "1"),
        "cluster_fallback not raised"
    );

    redis.restart();
    assert!(
        wait_until(WAIT, || http::alert_gauge(admin, "cluster_fallback") == "0"),
        "cluster_fallback still raised with Redis back"
    );
    assert_eq!(send(&relay, "127.0.0.10").0, 250);
    let tat = redis.command(&["GET", "portcullis:rate:messages_per_ip:127.0.0.10"]);
    assert!(
        tat.is_some_and(|t| t.parse::<u64>().is_ok()),
        "no shared budget"
    );
}
