//! `portcullis policy explain` against the real binary: for each case, the verdict explain
//! prints (its last line) is the reply a real session on loopback gets from the relay
//! running the same policy, driven with the same client address, EHLO, TLS, login, sender and
//! recipients. Stateful rules: the relay is driven into a spent rate budget and an AUTH
//! lockout with real sessions, then explain (reading the relay's admin API) and the next real
//! session must give the same refusal, and explain itself never takes a budget. DNSBL
//! answers come from a real `nsd` on loopback.

mod common;

use std::process::Output;

use common::dns::{Nsd, Zone};
use common::*;

/// The listeners of [`policy`], in order: their index is their port's in the relay.
const LISTENERS: [&str; 4] = ["mx", "closed", "internal", "submission"];

/// A policy with four listeners: `mx` (open), `closed` (denies 127.0.0.66), `internal`
/// (allows only 127.0.0.5), `submission` (STARTTLS, `require_tls`, AUTH required); example.com
/// accepted with a recipients file (u@ and v@ only); alice (password `secret`) owning
/// alice@example.com; then `extra`.
fn policy(dir: &TestDir, extra: &str) -> String {
    dir.write("recipients.txt", "u@example.com\nv@example.com\n");
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{}\"\nsenders = [\"alice@example.com\"]\n",
            secret_hash()
        ),
    );
    config(
        &[
            listener(LISTENERS[0], free_port(), "none"),
            listener(LISTENERS[1], free_port(), "none") + "deny = [\"127.0.0.66/32\"]\n",
            listener(LISTENERS[2], free_port(), "none") + "allow = [\"127.0.0.5/32\"]\n",
            listener(LISTENERS[3], free_port(), "starttls")
                + "require_tls = true\nauth = \"required\"\n",
        ],
        free_port(),
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\
             recipients_file = \"{{dir}}/recipients.txt\"\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n{extra}"
        ),
    )
}

/// One client: what explain is told and what the real session does.
#[derive(Debug, Clone)]
struct Case {
    listener: &'static str,
    ip: &'static str,
    tls: bool,
    user: Option<&'static str>,
    from: &'static str,
    rcpts: &'static [&'static str],
}

/// A client of `mx` from 127.0.0.2, no TLS, no login, from a@sender.test to `rcpts`.
fn mx(rcpts: &'static [&'static str]) -> Case {
    Case {
        listener: "mx",
        ip: "127.0.0.2",
        tls: false,
        user: None,
        from: "a@sender.test",
        rcpts,
    }
}

/// `portcullis policy explain` for `case` (plus `more` options), which must exit 0.
fn explain(relay: &Relay, case: &Case, more: &[&str]) -> String {
    let out = explain_output(relay, case, more);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    String::from_utf8(out.stdout).expect("UTF-8 output")
}

fn explain_output(relay: &Relay, case: &Case, more: &[&str]) -> Output {
    let mut args = vec![
        "policy",
        "explain",
        "--listener",
        case.listener,
        "--ip",
        case.ip,
        "--from",
        case.from,
    ];
    for rcpt in case.rcpts {
        args.extend(["--rcpt", rcpt]);
    }
    if case.tls {
        args.push("--tls");
    }
    if let Some(user) = case.user {
        args.extend(["--user", user]);
    }
    args.extend(more);
    relay.command(&args)
}

/// The verdict: the last line of explain's text output.
fn verdict(output: &str) -> String {
    output.lines().last().unwrap_or_default().to_string()
}

/// Play `case` as a real client: the first refusal (greeting, EHLO, STARTTLS, AUTH with the
/// right password, MAIL, or a RCPT), else the last RCPT's reply, as its first line.
fn real(relay: &Relay, case: &Case) -> String {
    let index = LISTENERS
        .iter()
        .position(|l| *l == case.listener)
        .expect("a listener of the policy");
    let mut c = SmtpClient::connect_from(case.ip, relay.port(index));
    let first = |reply: (u16, String)| reply.1.lines().next().unwrap_or_default().to_string();
    let greeting = c.read_reply();
    if greeting.0 != 220 {
        return first(greeting);
    }
    let mut commands = vec!["EHLO client.invalid".to_string()];
    if case.tls {
        c.expect("EHLO client.invalid", 250);
        c.starttls(&relay.cert_path());
    }
    if let Some(user) = case.user {
        commands.push(auth_plain(user, "secret"));
    }
    commands.push(format!("MAIL FROM:<{}>", case.from));
    for command in commands {
        let reply = c.cmd(&command);
        if reply.0 >= 400 {
            return first(reply);
        }
    }
    let mut last = String::new();
    for rcpt in case.rcpts {
        let reply = c.cmd(&format!("RCPT TO:<{rcpt}>"));
        if reply.0 >= 400 {
            return first(reply);
        }
        last = first(reply);
    }
    last
}

#[test]
fn explain_gives_the_reply_a_real_session_gets_for_each_rule() {
    let dir = TestDir::new();
    let toml = policy(&dir, "");
    let relay = Relay::start_in(dir, &toml);
    let submission = |tls, user, from| Case {
        listener: "submission",
        ip: "127.0.0.2",
        tls,
        user,
        from,
        rcpts: &["someone@elsewhere.test"],
    };
    let cases = [
        ("relay denied", mx(&["x@elsewhere.test"]), "550 5.7.1"),
        (
            "accepted domain",
            mx(&["u@example.com", "v@example.com"]),
            "250 2.1.5",
        ),
        (
            "unknown recipient",
            mx(&["nobody@example.com"]),
            "550 5.1.1",
        ),
        (
            "listener deny",
            Case {
                listener: "closed",
                ip: "127.0.0.66",
                ..mx(&["u@example.com"])
            },
            "554 5.7.1",
        ),
        (
            "listener allow",
            Case {
                listener: "internal",
                ip: "127.0.0.6",
                ..mx(&["u@example.com"])
            },
            "554 5.7.1",
        ),
        (
            "listener allow passes",
            Case {
                listener: "internal",
                ip: "127.0.0.5",
                ..mx(&["u@example.com"])
            },
            "250 2.1.5",
        ),
        (
            "require_tls without --tls",
            submission(false, None, "alice@example.com"),
            "530 5.7.0",
        ),
        (
            "AUTH required without --user",
            submission(true, None, "alice@example.com"),
            "530 5.7.0",
        ),
        (
            "sender not owned",
            submission(true, Some("alice"), "ceo@example.com"),
            "553 5.7.1",
        ),
        (
            "unknown login",
            submission(true, Some("mallory"), "alice@example.com"),
            "535 5.7.8",
        ),
        (
            "owned sender relays",
            submission(true, Some("alice"), "alice@example.com"),
            "250 2.1.5",
        ),
    ];
    for (name, case, expected) in cases {
        let output = explain(&relay, &case, &[]);
        let explained = verdict(&output);
        let got = real(&relay, &case);
        assert!(
            explained.starts_with(&format!("{expected} ")),
            "{name}: explain said {explained:?}, expected {expected}\n{output}"
        );
        assert_eq!(
            explained, got,
            "{name}: explain differs from the real session\n{output}"
        );
        assert!(
            output.contains("empty state: no [admin] listener configured"),
            "{name}: {output}"
        );
    }
}

#[test]
fn explain_names_the_rule_and_says_what_it_did_not_check() {
    let dir = TestDir::new();
    let toml = policy(&dir, "");
    let relay = Relay::start_in(dir, &toml);
    let case = Case {
        listener: "submission",
        ip: "127.0.0.2",
        tls: true,
        user: Some("alice"),
        from: "ceo@example.com",
        rcpts: &["u@example.com"],
    };
    let output = explain(&relay, &case, &[]);
    assert!(
        output.contains("  decided by: sender_not_owned\n"),
        "{output}"
    );
    assert!(
        output.contains("AUTH as alice (assumed authenticated: the password is not checked)"),
        "{output}"
    );
    assert!(
        output.contains(
            "not evaluated (needs the message): From: ownership, DKIM, DMARC, header firewall"
        ),
        "{output}"
    );
    let json: serde_json::Value =
        serde_json::from_str(explain(&relay, &case, &["--json"]).trim()).expect("one JSON object");
    assert_eq!(
        json["reply"],
        "553 5.7.1 Sender address rejected: not owned by user"
    );
    assert_eq!(json["rule"], "sender_not_owned");
    assert_eq!(json["password_checked"], false);
    assert_eq!(json["state"]["live"], false);
    let stages: Vec<&str> = json["steps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["stage"].as_str().unwrap())
        .collect();
    assert_eq!(
        stages,
        ["connect", "ehlo", "starttls", "ehlo", "auth", "mail"]
    );
    assert_eq!(json["steps"][5]["rule"], "sender_not_owned");
}

#[test]
fn explain_refuses_bad_input_with_exit_2() {
    let dir = TestDir::new();
    let toml = policy(&dir, "");
    let relay = Relay::start_in(dir, &toml);
    let bad = [
        (
            Case {
                listener: "nope",
                ..mx(&["u@example.com"])
            },
            "no listener named \"nope\"",
        ),
        (
            Case {
                ip: "300.1.2.3",
                ..mx(&["u@example.com"])
            },
            "--ip \"300.1.2.3\": not an IP address",
        ),
        (
            Case {
                from: "not an address",
                ..mx(&["u@example.com"])
            },
            "--from \"not an address\"",
        ),
        (mx(&["@example.com"]), "--rcpt \"@example.com\""),
    ];
    for (case, message) in bad {
        let out = explain_output(&relay, &case, &[]);
        assert_eq!(out.status.code(), Some(2), "{}", show(&out));
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert!(stderr.contains(message), "{stderr}");
        assert!(out.stdout.is_empty(), "{}", show(&out));
    }
    // An invalid policy: exit 2 too.
    let broken = relay.dir().write("broken.toml", "[server]\nhostname = 5\n");
    let out = std::process::Command::new(BIN)
        .args(["policy", "explain", "--listener", "mx", "--ip", "127.0.0.2"])
        .args(["--from", "a@b.test", "--rcpt", "u@example.com", "--config"])
        .arg(&broken)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", show(&out));
}

/// The zone of the DNSBL `bl.test`: 127.0.0.9 is listed.
fn dnsbl_zone() -> Zone {
    Zone::new("test")
        .record("9.0.0.127.bl IN A 127.0.0.2")
        .record("9.0.0.127.bl IN TXT \"listed for testing\"")
}

#[test]
fn explain_looks_the_client_up_in_the_dnsbl_as_a_session_does_unless_no_dns() {
    let nsd = Nsd::start(&[dnsbl_zone()]);
    let dir = TestDir::new();
    let extra = format!(
        "[dns]\nnameservers = [\"{}\"]\ntimeout = \"1s\"\n\n\
         [dnsbl]\nthreshold = 1\n[[dnsbl.zones]]\nzone = \"bl.test\"\nname = \"blocklist.example\"\nweight = 1\n",
        nsd.address()
    );
    let toml = policy(&dir, &extra);
    let relay = Relay::start_in(dir, &toml);
    let listed = Case {
        ip: "127.0.0.9",
        ..mx(&["u@example.com"])
    };
    let output = explain(&relay, &listed, &[]);
    let explained = verdict(&output);
    assert!(explained.starts_with("550 5.7.1 "), "{output}");
    assert!(explained.contains("blocklist.example"), "{output}");
    assert_eq!(explained, real(&relay, &listed), "{output}");
    assert!(output.contains("  decided by: dnsbl\n"), "{output}");
    assert!(output.contains("DNS checks: performed\n"), "{output}");
    // A client listed nowhere passes.
    let clean = mx(&["u@example.com"]);
    assert_eq!(verdict(&explain(&relay, &clean, &[])), real(&relay, &clean));
    // --no-dns: not looked up, and said so.
    let output = explain(&relay, &listed, &["--no-dns"]);
    assert_eq!(verdict(&output), "250 2.1.5 Recipient ok", "{output}");
    assert!(
        output.contains("DNS checks: skipped (--no-dns)\n"),
        "{output}"
    );
    assert!(
        output.contains("  start(dnsbl): skipped (--no-dns)\n"),
        "{output}"
    );
}

/// A relay on [`policy`] with `[admin]`, `messages_per_ip = "2/hour"` and an AUTH lockout
/// after 2 failures.
fn stateful_relay() -> (Relay, u16) {
    let dir = TestDir::new();
    dir.write("admin.token", format!("{TOKEN}\n"));
    let admin = free_port();
    let extra = format!(
        "max_failures = 2\nfailure_window = \"10m\"\nlockout = \"1h\"\n\n\
         [rate_limits]\nmessages_per_ip = \"2/hour\"\n\n\
         [admin]\nbind = \"127.0.0.1:{admin}\"\ntoken_file = \"{{dir}}/admin.token\"\n"
    );
    let toml = policy(&dir, &extra);
    let relay = Relay::start_in(dir, &toml);
    assert!(
        common::http::wait_accepting(admin, std::time::Duration::from_secs(10)),
        "admin listener not accepting on {admin}"
    );
    (relay, admin)
}

/// The admin token of [`stateful_relay`].
const TOKEN: &str = "explain-token";

#[test]
fn the_explain_state_route_needs_the_token_and_reads_without_taking() {
    use common::http::{get, get_bearer};
    let (relay, admin) = stateful_relay();
    let path = "/api/explain-state?ip=127.0.0.12&user=alice";
    assert_eq!(get(admin, path, &[]).status, 401);
    assert_eq!(get_bearer(admin, path, "wrong").status, 401);
    assert_eq!(
        get_bearer(admin, "/api/explain-state?ip=not-an-ip", TOKEN).status,
        400
    );
    for _ in 0..3 {
        let response = get_bearer(admin, path, TOKEN);
        assert_eq!(response.status, 200, "{response:?}");
        let state: serde_json::Value = serde_json::from_str(&response.body).unwrap();
        assert_eq!(
            state,
            serde_json::json!({
                "at_accept": null,
                "locked_out_secs": null,
                "budgets": [{"rule": "rate_limits.messages_per_ip", "available": 2, "limit": "2/hour"}]
            })
        );
    }
    let case = Case {
        ip: "127.0.0.12",
        ..mx(&["u@example.com"])
    };
    assert_eq!(real(&relay, &case), "250 2.1.5 Recipient ok");
    let response = get_bearer(admin, path, TOKEN);
    let state: serde_json::Value = serde_json::from_str(&response.body).unwrap();
    assert_eq!(state["budgets"][0]["available"], 1, "{state}");
}

#[test]
fn a_rate_limited_client_is_explained_as_the_next_real_session_is_refused_and_explain_takes_nothing()
 {
    let (relay, _admin) = stateful_relay();
    let case = Case {
        ip: "127.0.0.7",
        ..mx(&["u@example.com"])
    };
    // Explained three times over a budget of two: it takes nothing.
    for _ in 0..3 {
        let output = explain(&relay, &case, &[]);
        assert_eq!(verdict(&output), "250 2.1.5 Recipient ok", "{output}");
        assert!(
            output.contains("from the running relay at 127.0.0.1:"),
            "{output}"
        );
        assert!(
            output.contains("  rate_limits.messages_per_ip: allowed (1 left of 2/hour)\n"),
            "{output}"
        );
    }
    let json: serde_json::Value =
        serde_json::from_str(explain(&relay, &case, &["--json"]).trim()).expect("one JSON object");
    assert_eq!(json["state"]["live"], true, "{json}");
    assert_eq!(json["reply"], "250 2.1.5 Recipient ok", "{json}");
    assert_eq!(json["rule"], serde_json::Value::Null, "{json}");
    // Two real messages spend the budget.
    for _ in 0..2 {
        assert_eq!(real(&relay, &case), "250 2.1.5 Recipient ok");
    }
    let output = explain(&relay, &case, &[]);
    let explained = verdict(&output);
    assert_eq!(
        explained, "451 4.7.1 Rate limit exceeded, try again later",
        "{output}"
    );
    assert!(
        output.contains("  decided by: rate_limits.messages_per_ip\n"),
        "{output}"
    );
    assert_eq!(explained, real(&relay, &case));
    // Another client's budget is untouched.
    let other = Case {
        ip: "127.0.0.8",
        ..case.clone()
    };
    assert_eq!(
        verdict(&explain(&relay, &other, &[])),
        "250 2.1.5 Recipient ok"
    );
    // With the relay gone, the budgets are evaluated on empty state, and that is said.
    let mut relay = relay;
    relay.stop();
    let output = explain(&relay, &case, &[]);
    assert_eq!(verdict(&output), "250 2.1.5 Recipient ok", "{output}");
    assert!(
        output.contains(
            "pause, connection caps, rate limits, AUTH lockout: empty state: relay not answering on 127.0.0.1:"
        ),
        "{output}"
    );
}

#[test]
fn a_locked_out_client_is_explained_as_the_next_real_session_is_refused() {
    let (relay, _admin) = stateful_relay();
    let case = Case {
        listener: "submission",
        ip: "127.0.0.9",
        tls: true,
        user: Some("alice"),
        from: "alice@example.com",
        rcpts: &["someone@elsewhere.test"],
    };
    assert_eq!(
        verdict(&explain(&relay, &case, &[])),
        "250 2.1.5 Recipient ok"
    );
    // Two wrong passwords lock the address out.
    for _ in 0..2 {
        let mut c = SmtpClient::connect_from(case.ip, relay.port(3));
        c.expect_reply(220);
        c.expect("EHLO client.test", 250);
        c.starttls(&relay.cert_path());
        c.expect("EHLO client.test", 250);
        assert_reply(&c.cmd(&auth_plain("alice", "wrong")), 535, "5.7.8");
    }
    let output = explain(&relay, &case, &[]);
    let explained = verdict(&output);
    assert_eq!(
        explained, "454 4.7.0 Too many authentication failures, try again later",
        "{output}"
    );
    assert!(output.contains("  decided by: auth_lockout\n"), "{output}");
    assert!(
        output.contains("  auth_lockout: locked out for "),
        "{output}"
    );
    assert_eq!(explained, real(&relay, &case));
    // The lockout holds for the address, not for others.
    let other = Case {
        ip: "127.0.0.10",
        ..case.clone()
    };
    assert_eq!(
        verdict(&explain(&relay, &other, &[])),
        "250 2.1.5 Recipient ok"
    );
}

#[test]
fn a_client_over_its_connection_cap_or_a_paused_relay_is_explained_as_the_next_connection_is_refused()
 {
    let dir = TestDir::new();
    let admin = free_port();
    let extra = format!(
        "\n[limits]\nmax_connections_per_ip = 2\n\n[admin]\nbind = \"127.0.0.1:{admin}\"\n"
    );
    let toml = policy(&dir, &extra);
    let relay = Relay::start_in(dir, &toml);
    assert!(common::http::wait_accepting(
        admin,
        std::time::Duration::from_secs(10)
    ));
    let case = Case {
        ip: "127.0.0.14",
        ..mx(&["u@example.com"])
    };
    assert_eq!(
        verdict(&explain(&relay, &case, &[])),
        "250 2.1.5 Recipient ok"
    );
    // Two sessions open (greeted, so counted) from the client: the cap is reached.
    let open: Vec<SmtpClient> = (0..2)
        .map(|_| {
            let mut c = SmtpClient::connect_from(case.ip, relay.port(0));
            c.expect_reply(220);
            c
        })
        .collect();
    let output = explain(&relay, &case, &[]);
    let explained = verdict(&output);
    assert_eq!(
        explained, "421 4.7.0 Too many connections from your address, try again later",
        "{output}"
    );
    assert!(
        output.contains("  decided by: max_connections_per_ip\n"),
        "{output}"
    );
    assert_eq!(explained, real(&relay, &case));
    drop(open);
    // Paused: every new connection is refused, and so is the explained one.
    let out = relay.command(&["listeners", "pause"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let paused = "421 4.3.2 Service not available, closing transmission channel";
    assert!(
        wait_until(std::time::Duration::from_secs(5), || real(&relay, &case)
            == paused),
        "the relay did not pause"
    );
    let output = explain(&relay, &case, &[]);
    assert_eq!(verdict(&output), paused, "{output}");
    assert!(output.contains("  decided by: paused\n"), "{output}");
}
