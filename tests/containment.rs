//! Loopback tests of containment against the real binary: a login driven over each
//! `[containment]` trigger is suspended; its open session is closed with `421 4.7.0` at its
//! next command; its AUTH is answered byte for byte as a wrong password; its queued mail is
//! held (and stays held over a restart and a kill -9) while other mail is delivered; the
//! `user_suspended` alert fires; a login suspended while the relay was stopped has its mail
//! held before anything is attempted; and resuming it releases nothing until `queue release`.

mod common;

use std::collections::BTreeMap;
use std::process::Output;
use std::time::Duration;

use common::queue::{accept, delivered, listed, refusing_sink, wait_state};
use common::sink::{Sink, SinkConfig};
use common::*;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// A relay forwarding to `upstream_port`, retrying every second, with `containment` as its
/// `[containment]` table and `more` appended: listener 0 is submission (STARTTLS, AUTH
/// required; `alice` and `bob`, password `secret`, each sending as LOGIN@example.com),
/// listener 1 an open MX for 127.0.0.0/8; the admin listener on the port returned.
fn relay(upstream_port: u16, containment: &str, more: &str) -> (Relay, u16) {
    let dir = TestDir::new();
    write_alice_and_bob(&dir);
    let admin = free_port();
    let toml = config(
        &[
            listener("submission", free_port(), "starttls") + "auth = \"required\"\n",
            listener("mx", free_port(), "none"),
        ],
        upstream_port,
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\nrelay_networks = [\"127.0.0.0/8\"]\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n\n[queue]\nretry = [\"1s\"]\n\n\
             [admin]\nbind = \"127.0.0.1:{admin}\"\n\n[containment]\n{containment}\n{more}"
        ),
    )
    .replace(
        "tls = \"none\"\n\n[relay]",
        "tls = \"none\"\nbackoff = \"1s\"\n\n[relay]",
    );
    (Relay::start_in(dir, &toml), admin)
}

/// An authenticated session of `login` from `ip`.
fn session(relay: &Relay, login: &str, ip: &str) -> SmtpClient {
    let mut c = tls_from(relay, ip);
    assert_reply(&c.cmd(&auth_plain(login, "secret")), 235, "2.7.0");
    c
}

/// The raw reply to AUTH as `login` with `password` from `ip`, in a new session.
fn auth_reply(relay: &Relay, login: &str, password: &str, ip: &str) -> (u16, String) {
    let mut c = tls_from(relay, ip);
    c.cmd(&auth_plain(login, password))
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// `portcullis_alert_active{alert="user_suspended"}` on `/metrics`.
fn suspended_gauge(admin: u16) -> String {
    let metrics = http::get(admin, "/metrics", &[]).body;
    let series = "portcullis_alert_active{alert=\"user_suspended\"} ";
    (metrics.lines())
        .find_map(|l| l.strip_prefix(series))
        .unwrap_or("absent")
        .to_string()
}

#[track_caller]
fn wait_gauge(admin: u16, value: &str) {
    assert!(
        wait_until(WAIT, || suspended_gauge(admin) == value),
        "user_suspended is {}, not {value}",
        suspended_gauge(admin)
    );
}

/// `user list --json`, by login.
fn user_list(relay: &Relay) -> BTreeMap<String, Value> {
    let out = run(relay, &["user", "list", "--json"]);
    let all: Vec<Value> = serde_json::from_slice(&out.stdout).unwrap();
    (all.into_iter())
        .map(|u| (u["login"].as_str().unwrap().to_string(), u))
        .collect()
}

fn run(relay: &Relay, args: &[&str]) -> Output {
    let out = relay.command(args);
    assert_eq!(out.status.code(), Some(0), "{args:?}: {}", show(&out));
    out
}

#[test]
fn a_login_over_its_recipient_domains_is_suspended_its_sessions_closed_and_its_mail_held() {
    let sink = refusing_sink();
    let (mut relay, admin) = relay(sink.port(), "recipient_domains_per_hour = 3", "");
    let a1 = send_as(&relay, "alice", "A1");
    let a2 = send_as(&relay, "alice", "A2");
    let b1 = send_as(&relay, "bob", "B1");
    wait_state(&relay, &[&a1, &a2, &b1], "queued");
    assert_eq!(suspended_gauge(admin), "0");
    let users = user_list(&relay);
    assert_eq!(users["alice"]["messages_last_hour"], 2);
    assert_eq!(users["bob"]["messages_last_hour"], 1);
    assert_eq!(users["alice"]["suspended"], false);
    let wrong = auth_reply(&relay, "alice", "not the password", "127.0.0.1");
    assert_reply(&wrong, 535, "5.7.8");

    // An idle session of alice's, and one that goes over: dest.example, one, two, three.
    let mut idle = session(&relay, "alice", "127.0.0.1");
    let mut spammer = session(&relay, "alice", "127.0.0.1");
    spammer.expect("MAIL FROM:<alice@example.com>", 250);
    spammer.expect("RCPT TO:<a@one.test>", 250);
    spammer.expect("RCPT TO:<b@two.test>", 250);
    assert_reply(&spammer.cmd("RCPT TO:<c@three.test>"), 421, "4.7.0");
    assert_eq!(spammer.read_to_close(), "");
    assert_reply(&idle.cmd("NOOP"), 421, "4.7.0");
    assert_eq!(idle.read_to_close(), "");
    assert!(relay.wait_for_fields(
        &[
            ("login", "alice"),
            ("rule", "containment_recipient_domains")
        ],
        WAIT
    ));
    assert_log(&relay, "account suspended");
    // The right password now gets exactly the wrong password's reply.
    assert_eq!(auth_reply(&relay, "alice", "secret", "127.0.0.1"), wrong);
    wait_state(&relay, &[&a1, &a2], "held");
    wait_gauge(admin, "1");
    let users = user_list(&relay);
    assert_eq!(users["alice"]["suspended"], true);
    assert_eq!(users["alice"]["rule"], "containment_recipient_domains");
    assert_eq!(users["bob"]["suspended"], false);

    // The upstream takes mail again: bob's is delivered, alice's stays held.
    accept(&sink);
    assert!(sink.wait_for(1, WAIT));
    assert_eq!(sorted(delivered(&sink)), ["B1"]);
    assert!(!listed(&relay).contains_key(&b1));
    wait_state(&relay, &[&a1, &a2], "held");

    // Over a restart and a crash: still suspended, still held.
    relay.restart();
    assert_eq!(auth_reply(&relay, "alice", "secret", "127.0.0.1"), wrong);
    relay.kill9();
    relay.restart();
    assert_eq!(auth_reply(&relay, "alice", "secret", "127.0.0.1"), wrong);
    wait_state(&relay, &[&a1, &a2], "held");
    wait_gauge(admin, "1");

    // Resumed: alice may send again; her held mail stays held until released.
    run(&relay, &["user", "resume", "alice"]);
    assert!(wait_until(WAIT, || auth_reply(
        &relay,
        "alice",
        "secret",
        "127.0.0.1"
    )
    .0 == 235));
    wait_gauge(admin, "0");
    send_as(&relay, "alice", "A3");
    assert!(sink.wait_for(2, WAIT));
    assert_eq!(sorted(delivered(&sink)), ["A3", "B1"]);
    wait_state(&relay, &[&a1, &a2], "held");
    run(&relay, &["queue", "release", "--user", "alice"]);
    assert!(sink.wait_for(4, WAIT));
    assert_eq!(sorted(delivered(&sink)), ["A1", "A2", "A3", "B1"]);
    assert!(relay.wait_for_queue_len(0, WAIT));
}

#[test]
fn repeated_user_rate_refusals_suspend_the_login() {
    let sink = Sink::start(SinkConfig::default());
    let (relay, admin) = relay(
        sink.port(),
        "rate_limit_hits = 2",
        "[rate_limits]\nmessages_per_user = \"1/hour\"\n",
    );
    send_as(&relay, "alice", "A1");
    let wrong = auth_reply(&relay, "alice", "not the password", "127.0.0.1");
    let mut c = session(&relay, "alice", "127.0.0.1");
    assert_reply(&c.cmd("MAIL FROM:<alice@example.com>"), 451, "4.7.1");
    // The second refusal within the hour suspends, and closes the session.
    assert_reply(&c.cmd("MAIL FROM:<alice@example.com>"), 421, "4.7.0");
    assert_eq!(c.read_to_close(), "");
    assert!(relay.wait_for_fields(
        &[("login", "alice"), ("rule", "containment_rate_limit_hits")],
        WAIT
    ));
    wait_gauge(admin, "1");
    assert_eq!(auth_reply(&relay, "alice", "secret", "127.0.0.1"), wrong);
    // bob is not alice.
    send_as(&relay, "bob", "B1");
    assert!(sink.wait_for(2, WAIT));
}

#[test]
fn logins_from_too_many_addresses_suspend_the_login() {
    let sink = Sink::start(SinkConfig::default());
    let (relay, admin) = relay(sink.port(), "client_ips_per_hour = 2", "");
    let wrong = auth_reply(&relay, "alice", "not the password", "127.0.0.3");
    session(&relay, "alice", "127.0.0.1");
    session(&relay, "alice", "127.0.0.2");
    // Again from a known address: still two.
    session(&relay, "alice", "127.0.0.1");
    assert_eq!(auth_reply(&relay, "alice", "secret", "127.0.0.3"), wrong);
    assert!(relay.wait_for_fields(
        &[("login", "alice"), ("rule", "containment_client_ips")],
        WAIT
    ));
    assert_eq!(auth_reply(&relay, "alice", "secret", "127.0.0.1"), wrong);
    wait_gauge(admin, "1");
}

#[test]
fn a_login_suspended_while_the_relay_was_stopped_has_its_mail_held_before_any_attempt() {
    let sink = refusing_sink();
    let (mut relay, admin) = relay(sink.port(), "", "");
    let a1 = send_as(&relay, "alice", "A1");
    let b1 = send_as(&relay, "bob", "B1");
    wait_state(&relay, &[&a1, &b1], "queued");
    relay.stop();
    let out = run(&relay, &["user", "suspend", "alice", "--reason", "phished"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("alice"));
    accept(&sink);
    relay.restart();
    assert!(sink.wait_for(1, WAIT));
    wait_state(&relay, &[&a1], "held");
    // A later message of bob's is delivered while alice's stays held: it was never tried.
    send_as(&relay, "bob", "B2");
    assert!(sink.wait_for(2, WAIT));
    assert_eq!(sorted(delivered(&sink)), ["B1", "B2"]);
    wait_state(&relay, &[&a1], "held");
    wait_gauge(admin, "1");
    assert_reply(
        &auth_reply(&relay, "alice", "secret", "127.0.0.1"),
        535,
        "5.7.8",
    );
}

#[test]
fn an_operator_suspension_reaches_the_running_relay_within_a_second() {
    let sink = refusing_sink();
    let (relay, admin) = relay(sink.port(), "", "");
    let a1 = send_as(&relay, "alice", "A1");
    let b1 = send_as(&relay, "bob", "B1");
    wait_state(&relay, &[&a1, &b1], "queued");
    let wrong = auth_reply(&relay, "alice", "not the password", "127.0.0.1");
    let mut idle = session(&relay, "alice", "127.0.0.1");
    let asked = std::time::Instant::now();
    let out = run(&relay, &["user", "suspend", "alice", "--reason", "phished"]);
    assert!(String::from_utf8_lossy(&out.stdout).starts_with("suspended alice"));
    wait_state(&relay, &[&a1], "held");
    assert!(
        asked.elapsed() < Duration::from_secs(3),
        "{:?}",
        asked.elapsed()
    );
    assert_reply(&idle.cmd("NOOP"), 421, "4.7.0");
    assert_eq!(idle.read_to_close(), "");
    assert_eq!(auth_reply(&relay, "alice", "secret", "127.0.0.1"), wrong);
    assert!(relay.wait_for_fields(&[("login", "alice"), ("rule", "operator")], WAIT));
    wait_gauge(admin, "1");
    // bob's mail is not touched.
    assert_eq!(listed(&relay)[&b1]["state"], "queued");
}
