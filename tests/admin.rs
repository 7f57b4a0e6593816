//! The admin HTTP listener end to end, with the real binary: the token (Bearer and Basic, and
//! a reloaded one), the open probes, readiness (`listeners pause|resume`, free space across a
//! reload), `/metrics` exposing exactly the contract's families from the start, and the bounds
//! that hold against hostile clients (connections, head size, bodies, methods, slow requests).

mod common;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::time::{Duration, Instant};

use common::http::{self, Response, basic, get, get_bearer};
use common::sink::{Sink, SinkConfig};
use common::*;

const TOKEN: &str = "correct-horse-battery";
const WAIT: Duration = Duration::from_secs(10);

/// A relay with an open `mx` listener (loopback may relay anywhere), upstream `up` at
/// `upstream_port` retried every second, and `[admin]` on a free port with the token in
/// `{dir}/admin.token`; `extra` follows (more tables). Returns the relay and the admin port.
fn start(upstream_port: u16, extra: &str) -> (Relay, u16) {
    let dir = TestDir::new();
    dir.write("admin.token", format!("{TOKEN}\n"));
    let admin = free_port();
    let toml = config(
        &[listener("mx", free_port(), "none")],
        upstream_port,
        &format!(
            "[relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n[queue]\nretry = [\"1s\"]\n\n\
             [admin]\nbind = \"127.0.0.1:{admin}\"\ntoken_file = \"{{dir}}/admin.token\"\n\n{extra}"
        ),
    );
    let relay = Relay::start_in(dir, &toml);
    assert!(
        http::wait_accepting(admin, WAIT),
        "admin listener not accepting on {admin}"
    );
    assert_log_fields(&relay, &[("bind", &format!("127.0.0.1:{admin}"))]);
    assert_log(&relay, "admin listening");
    (relay, admin)
}

#[track_caller]
fn assert_unauthorized(response: &Response) {
    assert_eq!(response.status, 401, "{response:?}");
    assert_eq!(
        response.header("www-authenticate"),
        Some("Basic realm=\"portcullis\""),
        "{response:?}"
    );
}

#[test]
fn the_token_is_required_as_bearer_or_basic_password_except_for_the_probes() {
    let (relay, admin) = start(free_port(), "");
    for path in ["/metrics", "/api/status", "/", "/no-such-page"] {
        assert_unauthorized(&get(admin, path, &[]));
        assert_unauthorized(&get_bearer(admin, path, "wrong"));
        assert_unauthorized(&get_bearer(admin, path, &format!("{TOKEN}x")));
        assert_unauthorized(&get(admin, path, &[&basic(TOKEN, "wrong")]));
        assert_unauthorized(&get(admin, path, &[&format!("Authorization: {TOKEN}")]));
    }
    // The refusal is logged with the peer's address itself (not `Some(ADDR)`).
    assert_log_fields(
        &relay,
        &[
            ("peer", "127.0.0.1:*"),
            ("path", "/metrics"),
            ("status", "401"),
        ],
    );
    // Paths that lead to a protected route by way of an open probe, or spell one otherwise,
    // never pass without the token; nor does HEAD, nor an absolute-form request target.
    for path in [
        "/healthz/../metrics",
        "/readyz/../api/status",
        "//metrics",
        "/metrics/",
        "/%6detrics",
        "/metrics?x=1",
        "/api/status%00",
    ] {
        assert_unauthorized(&get(admin, path, &[]));
    }
    assert_unauthorized(&http::request(admin, "HEAD", "/metrics", &[]));
    assert_unauthorized(&http::raw(
        admin,
        format!(
            "GET http://127.0.0.1:{admin}/metrics HTTP/1.1\r\nHost: 127.0.0.1:{admin}\r\n\
             Connection: close\r\n\r\n"
        )
        .as_bytes(),
    ));

    let bearer = get_bearer(admin, "/metrics", TOKEN);
    assert_eq!(bearer.status, 200, "{bearer:?}");
    let basic_any_user = get(admin, "/metrics", &[&basic("anyone", TOKEN)]);
    assert_eq!(basic_any_user.status, 200, "{basic_any_user:?}");
    let status = get_bearer(admin, "/api/status", TOKEN);
    assert_eq!(status.status, 200, "{status:?}");
    assert_eq!(status.header("content-type"), Some("application/json"));
    let json: serde_json::Value = serde_json::from_str(&status.body).expect("status is JSON");
    assert_eq!(json["node"], "relay.test");
    assert_eq!(json["live"], true);
    assert_eq!(json["ready"], true);
    assert_eq!(json["not_ready"], serde_json::Value::Null);
    assert_eq!(json["paused"], false);
    let page = get(admin, "/", &[&basic("", TOKEN)]);
    assert_eq!(page.status, 200, "{page:?}");
    assert_eq!(
        page.header("content-type"),
        Some("text/html; charset=utf-8")
    );
    let unknown = get_bearer(admin, "/no-such-page", TOKEN);
    assert_eq!(unknown.status, 404, "{unknown:?}");

    // The probes are open.
    let health = get(admin, "/healthz", &[]);
    assert_eq!((health.status, health.body.as_str()), (200, "ok\n"));
    let ready = get(admin, "/readyz", &[]);
    assert_eq!((ready.status, ready.body.as_str()), (200, "ready\n"));

    // A reload with another token file: the new token applies at once, the old one no more.
    relay.dir().write("new.token", "another-token\n");
    let text = std::fs::read_to_string(relay.config_path()).unwrap();
    std::fs::write(
        relay.config_path(),
        text.replace("admin.token", "new.token"),
    )
    .unwrap();
    relay.sighup();
    assert!(relay.wait_for_fields(&[("rule", "reload")], WAIT));
    assert_unauthorized(&get_bearer(admin, "/metrics", TOKEN));
    assert_eq!(get_bearer(admin, "/metrics", "another-token").status, 200);
    // Never the token in the log.
    let log = relay.log();
    assert!(
        !log.contains(TOKEN) && !log.contains("another-token"),
        "{log}"
    );
}

#[test]
fn metrics_expose_exactly_the_contract_families_from_the_start() {
    let (_relay, admin) = start(free_port(), "");
    let response = get_bearer(admin, "/metrics", TOKEN);
    assert_eq!(response.status, 200, "{response:?}");
    assert_eq!(
        response.header("content-type"),
        Some(portcullis::observe::metrics::CONTENT_TYPE)
    );
    assert_eq!(
        response.header("content-type"),
        Some("application/openmetrics-text; version=1.0.0; charset=utf-8")
    );
    let exposed: BTreeSet<String> = response
        .body
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let (name, kind) = l.split_once(' ').expect("# TYPE name kind");
            // OpenMetrics names a counter's family without the _total of its samples.
            if kind == "counter" {
                format!("{name}_total")
            } else {
                name.to_owned()
            }
        })
        .collect();
    // DESIGN.md, "Metric names", spelled out here so that a family renamed in the code (and
    // in its FAMILY_NAMES) fails this test.
    let contract: BTreeSet<String> = [
        "portcullis_sessions_total",
        "portcullis_refusals_total",
        "portcullis_messages_accepted_total",
        "portcullis_messages_delivered_total",
        "portcullis_messages_deferred_total",
        "portcullis_messages_bounced_total",
        "portcullis_messages_expired_total",
        "portcullis_messages_removed_total",
        "portcullis_queue_messages",
        "portcullis_queue_oldest_seconds",
        "portcullis_upstream_up",
        "portcullis_upstream_breaker_open",
        "portcullis_upstream_last_success_timestamp_seconds",
        "portcullis_delivery_seconds",
        "portcullis_auth_successes_total",
        "portcullis_auth_failures_total",
        "portcullis_dns_errors_total",
        "portcullis_alert_active",
    ]
    .into_iter()
    .map(str::to_owned)
    .collect();
    assert_eq!(exposed, contract, "{}", response.body);
    let named: BTreeSet<String> = portcullis::observe::metrics::FAMILY_NAMES
        .iter()
        .map(|s| (*s).to_owned())
        .collect();
    assert_eq!(named, contract, "observe::metrics::FAMILY_NAMES");
    assert!(response.body.ends_with("# EOF\n"), "{}", response.body);
    // HEAD: the same head, no body.
    let head = http::request(
        admin,
        "HEAD",
        "/metrics",
        &[&format!("Authorization: Bearer {TOKEN}")],
    );
    assert_eq!(head.status, 200);
    assert_eq!(head.body, "");
}

/// Send one message through `relay` (asserting its 250); its queue id.
fn send(relay: &Relay) -> String {
    let mut c = SmtpClient::greeted(relay.port(0));
    let (code, text) = c.send_message(
        "a@example.org",
        &["b@example.com"],
        "Subject: drained\r\n\r\nstill delivered\r\n",
    );
    assert_eq!(code, 250, "{text}");
    c.cmd("QUIT");
    queue_id(&text).expect("queue id in the 250")
}

#[track_caller]
fn assert_not_ready(admin: u16, reason: &str) {
    let ready = get(admin, "/readyz", &[]);
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (503, reason),
        "{ready:?}"
    );
}

#[track_caller]
fn assert_ready(admin: u16) {
    let ready = get(admin, "/readyz", &[]);
    assert_eq!(
        (ready.status, ready.body.as_str()),
        (200, "ready\n"),
        "{ready:?}"
    );
}

/// Within a second and a half, `/readyz` answers `status`.
fn readyz_turns(admin: u16, status: u16) -> bool {
    wait_until(Duration::from_millis(1500), || {
        get(admin, "/readyz", &[]).status == status
    })
}

#[test]
fn a_paused_relay_answers_421_and_is_not_ready_while_its_queue_is_delivered() {
    let sink = Sink::start(SinkConfig {
        data_reply: Some("451 4.3.0 not now".to_owned()),
        ..SinkConfig::default()
    });
    let (mut relay, admin) = start(sink.port(), "");
    let id = send(&relay);
    // The `deferred` line of the first attempt.
    assert!(
        relay.wait_for_fields(
            &[("queue_id", &id), ("attempts", "1"), ("pending", "1")],
            WAIT
        ),
        "first attempt deferred"
    );

    let out = relay.command(&["listeners", "pause"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    let marker = relay.spool.join("paused");
    assert_eq!(
        String::from_utf8_lossy(&out.stdout),
        format!(
            "listeners paused ({} written): the running relay answers new connections \
             421 4.3.2 within a second; delivery goes on\n",
            marker.display()
        )
    );
    assert!(
        readyz_turns(admin, 503),
        "not ready within a second of the pause"
    );
    assert_not_ready(admin, "listeners paused (portcullis listeners resume)\n");
    assert_log_fields(&relay, &[("paused", "true"), ("marker", "paused")]);
    let mut c = SmtpClient::connect(relay.port(0));
    let reply = c.read_reply();
    assert_reply(&reply, 421, "4.3.2");
    assert_eq!(
        reply.1,
        "421 4.3.2 Service not available, closing transmission channel"
    );
    assert!(
        c.try_read_reply().unwrap().is_none(),
        "closed after the 421"
    );
    let metrics = get_bearer(admin, "/metrics", TOKEN).body;
    assert!(
        metrics.contains("\nportcullis_refusals_total{rule=\"paused\"} 1\n"),
        "{metrics}"
    );
    let status = get_bearer(admin, "/api/status", TOKEN);
    let json: serde_json::Value = serde_json::from_str(&status.body).unwrap();
    assert_eq!(json["paused"], true);
    assert_eq!(json["ready"], false);

    // Delivery goes on: the queued message reaches the upstream once it accepts.
    sink.set_config(SinkConfig::default());
    assert!(
        sink.wait_for(1, WAIT),
        "queued message delivered while paused"
    );
    assert!(wait_until(WAIT, || relay.queued_messages().is_empty()));

    // The `queue` commands leave the marker alone, and a restart keeps the pause.
    let purge = relay.command(&["queue", "purge", "--all"]);
    assert_eq!(purge.status.code(), Some(0), "{purge:?}");
    assert!(marker.is_file());
    assert_eq!(
        String::from_utf8_lossy(&relay.command(&["listeners", "pause"]).stdout),
        format!("listeners already paused ({} exists)\n", marker.display())
    );
    relay.restart();
    // The restart waits for the SMTP listeners; the admin listener is bound after them.
    assert!(http::wait_accepting(admin, WAIT), "admin listener back");
    assert_not_ready(admin, "listeners paused (portcullis listeners resume)\n");
    let reply = SmtpClient::connect(relay.port(0)).read_reply();
    assert_eq!(reply.0, 421, "{reply:?}");

    let out = relay.command(&["listeners", "resume"]);
    assert_eq!(out.status.code(), Some(0), "{out:?}");
    assert!(!marker.exists());
    assert!(
        readyz_turns(admin, 200),
        "ready within a second of the resume"
    );
    assert_log_fields(&relay, &[("paused", "false"), ("marker", "paused")]);
    send(&relay);
    assert!(sink.wait_for(2, WAIT), "accepting and delivering again");
    assert_eq!(
        String::from_utf8_lossy(&relay.command(&["listeners", "resume"]).stdout),
        format!("listeners not paused (no {})\n", marker.display())
    );
}

#[test]
fn listeners_pause_without_a_spool_is_a_usage_error() {
    let dir = TestDir::new();
    let out = std::process::Command::new(BIN)
        .args(["listeners", "pause", "--spool"])
        .arg(dir.join("nowhere"))
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{out:?}");
    assert!(!dir.join("nowhere/paused").exists());
}

#[test]
fn readyz_follows_min_free_space_across_a_reload() {
    let (relay, admin) = start(free_port(), "[limits]\nmin_free_space = \"1000000TiB\"\n");
    let ready = get(admin, "/readyz", &[]);
    assert_eq!(ready.status, 503, "{ready:?}");
    assert!(
        ready.body.starts_with("spool free space ")
            && ready
                .body
                .ends_with(" below limits.min_free_space 1000000TiB\n"),
        "{ready:?}"
    );
    let text = std::fs::read_to_string(relay.config_path()).unwrap();
    std::fs::write(relay.config_path(), text.replace("1000000TiB", "1MiB")).unwrap();
    relay.sighup();
    assert!(relay.wait_for_fields(&[("rule", "reload")], WAIT));
    assert_ready(admin);
}

#[test]
fn probes_stay_answerable_while_the_general_slots_are_held() {
    let (_relay, admin) = start(free_port(), "");
    // 64 connections, each shown served (so each holds its general slot).
    let mut open: Vec<_> = (0..64)
        .map(|_| {
            let mut tcp = http::connect(admin);
            let r = http::get_on(&mut tcp, "/healthz");
            assert_eq!(r.status, 200);
            tcp
        })
        .collect();
    // 16 idle connections take the probe slots: the next connection is refused outright.
    let mut idle: Vec<_> = (0..16).map(|_| http::connect(admin)).collect();
    let accepted = Instant::now();
    let busy = http::raw(admin, b"GET /healthz HTTP/1.1\r\nHost: a\r\n\r\n");
    assert_eq!(busy.status, 503, "{busy:?}");
    assert_eq!(busy.body, "too many connections\n");
    assert_eq!(busy.header("connection"), Some("close"));
    // ... but not for long: an idle probe connection is closed after two seconds, not ten.
    for tcp in &mut idle {
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out);
    }
    let waited = accepted.elapsed();
    assert!(
        waited < Duration::from_secs(5),
        "idle probe connections held {waited:?}"
    );
    // Then the probes answer, on connections of their own; anything else is 503.
    assert!(
        wait_until(WAIT, || get(admin, "/readyz", &[]).status == 200),
        "/readyz answers with the general slots held"
    );
    assert_ready(admin);
    assert_eq!(get(admin, "/healthz", &[]).status, 200);
    let other = get_bearer(admin, "/metrics", TOKEN);
    assert_eq!(
        (other.status, other.body.as_str()),
        (503, "too many connections\n"),
        "{other:?}"
    );
    drop(open.pop());
    assert!(
        wait_until(WAIT, || get_bearer(admin, "/metrics", TOKEN).status == 200),
        "a freed general slot serves everything again"
    );
    drop(open);
}

#[test]
fn a_request_followed_by_a_half_close_is_answered() {
    let (_relay, admin) = start(free_port(), "");
    for path in ["/readyz", "/healthz", "/metrics"] {
        for i in 0..100 {
            let mut tcp = http::connect(admin);
            let request = format!("GET {path} HTTP/1.0\r\nAuthorization: Bearer {TOKEN}\r\n\r\n");
            tcp.write_all(request.as_bytes()).unwrap();
            tcp.shutdown(std::net::Shutdown::Write).unwrap();
            let mut out = Vec::new();
            let _ = tcp.read_to_end(&mut out);
            let text = String::from_utf8_lossy(&out);
            assert!(
                text.starts_with("HTTP/1.") && text[8..].starts_with(" 200 "),
                "{path}, attempt {i}: {text:?}"
            );
        }
    }
}

#[test]
fn oversized_heads_bodies_and_other_methods_are_refused() {
    let (_relay, admin) = start(free_port(), "");
    let big = format!("X-Filler: {}", "a".repeat(9 * 1024));
    let r = get(admin, "/healthz", &[&big]);
    assert_eq!(r.status, 431, "{r:?}");

    let r = http::raw(
        admin,
        b"GET /healthz HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nConnection: close\r\n\r\nhello",
    );
    assert_eq!(r.status, 413, "{r:?}");
    let r = http::raw(
        admin,
        b"GET /metrics HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nConnection: close\r\n\r\n5\r\nhello\r\n0\r\n\r\n",
    );
    assert_eq!(r.status, 413, "{r:?}");
    let r = get(admin, "/healthz", &["Content-Length: 0"]);
    assert_eq!(r.status, 200, "an empty body is no body: {r:?}");

    for method in ["POST", "PUT", "DELETE", "OPTIONS"] {
        let r = http::request(admin, method, "/healthz", &["Content-Length: 0"]);
        assert_eq!(r.status, 405, "{method}: {r:?}");
        assert_eq!(r.header("allow"), Some("GET, HEAD"), "{method}");
    }
}

#[test]
fn a_request_head_not_finished_within_ten_seconds_is_closed() {
    let (_relay, admin) = start(free_port(), "");
    let mut tcp = http::connect(admin);
    let started = Instant::now();
    tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: a\r\n")
        .unwrap();
    let mut out = Vec::new();
    let _ = tcp.read_to_end(&mut out);
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_secs(9) && waited < Duration::from_secs(13),
        "closed after {waited:?}"
    );
    // hyper closes a connection whose head timed out without a response.
    assert!(
        out.is_empty() || String::from_utf8_lossy(&out).starts_with("HTTP/1.1 408"),
        "{:?}",
        String::from_utf8_lossy(&out)
    );
}

#[test]
fn without_a_token_the_loopback_admin_listener_is_open() {
    let admin = free_port();
    let relay = Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        free_port(),
        &format!("[admin]\nbind = \"127.0.0.1:{admin}\"\n"),
    ));
    assert!(http::wait_accepting(admin, WAIT));
    for path in ["/metrics", "/api/status", "/"] {
        let r = get(admin, path, &[]);
        assert_eq!(r.status, 200, "{path}: {r:?}");
    }
    drop(relay);
}

/// `GET path` with exactly `Host: host` (none when empty) and `headers`.
fn get_with_host(admin: u16, path: &str, host: &str, headers: &[&str]) -> Response {
    let mut head = format!("GET {path} HTTP/1.1\r\nConnection: close\r\n");
    if !host.is_empty() {
        head.push_str(&format!("Host: {host}\r\n"));
    }
    for h in headers {
        head.push_str(&format!("{h}\r\n"));
    }
    head.push_str("\r\n");
    http::raw(admin, head.as_bytes())
}

#[test]
fn without_a_token_a_host_that_is_not_local_is_refused_against_dns_rebinding() {
    let admin = free_port();
    let relay = Relay::start(&config(
        &[listener("mx", free_port(), "none")],
        free_port(),
        &format!("[admin]\nbind = \"127.0.0.1:{admin}\"\n"),
    ));
    assert!(http::wait_accepting(admin, WAIT));
    for path in ["/api/status", "/metrics", "/"] {
        let r = get_with_host(admin, path, &format!("rebind.example:{admin}"), &[]);
        assert_eq!(r.status, 403, "{path}: {r:?}");
    }
    assert_log_fields(&relay, &[("path", "/api/status"), ("status", "403")]);
    for host in [
        format!("127.0.0.1:{admin}"),
        format!("localhost:{admin}"),
        "[::1]".to_owned(),
        String::new(),
    ] {
        let r = get_with_host(admin, "/api/status", &host, &[]);
        assert_eq!(r.status, 200, "Host {host:?}: {r:?}");
    }
    // The probes answer whatever the Host (a load balancer may send its own name).
    let r = get_with_host(admin, "/readyz", "node-1.example", &[]);
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn with_a_token_any_host_is_served() {
    let (_relay, admin) = start(free_port(), "");
    let auth = format!("Authorization: Bearer {TOKEN}");
    let r = get_with_host(admin, "/api/status", "relay.example:9025", &[&auth]);
    assert_eq!(r.status, 200, "{r:?}");
}

#[test]
fn an_admin_bind_that_fails_stops_the_start_with_exit_status_1() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let dir = TestDir::new();
    let toml = dir.expand(&config(
        &[listener("mx", free_port(), "none")],
        free_port(),
        &format!("[admin]\nbind = \"127.0.0.1:{port}\"\n"),
    ));
    let path = dir.write("portcullis.toml", toml);
    let mut child = std::process::Command::new(BIN)
        .args(["run", "--config"])
        .arg(&path)
        .current_dir(dir.path())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let exited = wait_until(WAIT, || child.try_wait().unwrap().is_some());
    if !exited {
        let _ = child.kill();
    }
    assert!(exited, "the relay kept running without its admin listener");
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(1));
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(
        stderr.contains(&format!(
            "portcullis: admin listener: cannot bind 127.0.0.1:{port}: "
        )),
        "{stderr}"
    );
    drop(taken);
}
