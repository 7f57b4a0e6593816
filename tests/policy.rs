//! The hardening policy against the real binary on loopback: rate limits, AUTH lockout and
//! password spraying, sender ownership (envelope and `From:` header), reload keeping limiter
//! state, and the classic open-relay matrix cases `protocol.rs` does not already cover.
//!
//! Each test asserts exact reply codes, that refused mail never reaches the spool, and the
//! rule named in the log. Per-IP rules are exercised from distinct 127/8 addresses (the
//! harness's readiness probe comes from 127.0.0.1, so tests avoid counting on that one).
//! AUTH over TLS with swaks, AUTH before TLS and identical replies for unknown users and wrong
//! passwords are covered in `swaks.rs`; deny/allow lists and the header firewall in
//! `protocol.rs` and `swaks.rs`.

mod common;

use std::fs;
use std::process::Output;

use common::*;

/// A plaintext MX listener for example.com with `extra` tables appended.
fn mx(extra: &str) -> Relay {
    let l = listener("mx", free_port(), "none");
    Relay::start(&config(
        &[l],
        free_port(),
        &format!("[relay]\naccepted_domains = [\"example.com\"]\n\n{extra}"),
    ))
}

/// A submission listener (STARTTLS, TLS and AUTH required) with two users: `alice` owning
/// `alice@example.com` and all of `@example.org`, and `bob@example.com` with no `senders`
/// (so he owns his login). Both have the password `secret`. `extra` goes after `[auth]`'s
/// keys (more `[auth]` keys, then other tables).
fn submission(auth_keys: &str, extra: &str) -> Relay {
    let dir = TestDir::new();
    let hash = secret_hash();
    dir.write(
        "users.toml",
        format!(
            "[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n\
             senders = [\"alice@example.com\", \"@example.org\"]\n\n\
             [[users]]\nname = \"bob@example.com\"\npassword_hash = \"{hash}\"\n"
        ),
    );
    let toml = config(
        &[listener("submission", free_port(), "starttls")
            + "require_tls = true\nauth = \"required\"\n"],
        free_port(),
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n{auth_keys}\n{extra}"
        ),
    );
    Relay::start_in(dir, &toml)
}

/// Connected from `ip` over TLS and authenticated as `user` with `secret`.
fn authed(relay: &Relay, ip: &str, user: &str) -> SmtpClient {
    let mut c = tls_from(relay, ip);
    assert_reply(&c.cmd(&auth_plain(user, "secret")), 235, "2.7.0");
    c
}

fn swaks_text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

// --- Rate limits ----------------------------------------------------------------------------

#[test]
fn connections_per_ip_over_the_rate_get_421_at_the_greeting() {
    let relay = mx("[rate_limits]\nconnections_per_ip = \"3/hour\"\n");
    for _ in 0..3 {
        let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
        c.expect_reply(220);
        c.expect("QUIT", 221);
    }
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    assert_reply(&c.read_reply(), 421, "4.7.0");
    assert!(
        c.read_to_close().is_empty(),
        "421 must close the connection"
    );
    // Another client has its own budget.
    let mut c = SmtpClient::connect_from("127.0.0.3", relay.port(0));
    c.expect_reply(220);
    assert_log_fields(
        &relay,
        &[
            ("rule", "rate_limits.connections_per_ip"),
            ("limit", "3/hour"),
        ],
    );
}

#[test]
fn messages_per_ip_over_the_rate_get_451_at_mail_and_nothing_is_queued() {
    let relay = mx("[rate_limits]\nmessages_per_ip = \"2/hour\"\n");
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    for _ in 0..2 {
        let reply = c.send_message(
            "a@other.test",
            &["b@example.com"],
            "Subject: x\r\n\r\nhi\r\n",
        );
        assert_eq!(reply.0, 250, "{reply:?}");
    }
    assert_reply(&c.cmd("MAIL FROM:<a@other.test>"), 451, "4.7.1");
    assert_reply(&c.cmd("RCPT TO:<b@example.com>"), 503, "5.5.1");
    assert_eq!(relay.queued_messages().len(), 2);
    // The same budget applies to a new connection from that address, not to another.
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    assert_reply(&c.cmd("MAIL FROM:<a@other.test>"), 451, "4.7.1");
    let mut c = SmtpClient::connect_from("127.0.0.3", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    assert_reply(&c.cmd("MAIL FROM:<a@other.test>"), 250, "2.1.0");
    assert_log_fields(
        &relay,
        &[("rule", "rate_limits.messages_per_ip"), ("limit", "2/hour")],
    );
    assert_eq!(relay.queued_messages().len(), 2);
}

#[test]
fn compromised_account_is_stopped_at_its_budget_from_any_address() {
    let relay = submission("", "[rate_limits]\nmessages_per_user = \"2/hour\"\n");
    let mut c = authed(&relay, "127.0.0.2", "alice");
    for _ in 0..2 {
        let reply = c.send_message(
            "alice@example.com",
            &["x@elsewhere.test"],
            "From: alice@example.com\r\nSubject: x\r\n\r\nhi\r\n",
        );
        assert_eq!(reply.0, 250, "{reply:?}");
    }
    assert_reply(&c.cmd("MAIL FROM:<alice@example.com>"), 451, "4.7.1");
    // Moving to another address does not give the account a fresh budget…
    let mut c = authed(&relay, "127.0.0.3", "alice");
    assert_reply(&c.cmd("MAIL FROM:<alice@example.com>"), 451, "4.7.1");
    // …while another user from that address is not affected.
    let mut c = authed(&relay, "127.0.0.3", "bob@example.com");
    assert_reply(&c.cmd("MAIL FROM:<bob@example.com>"), 250, "2.1.0");
    assert_log_fields(
        &relay,
        &[
            ("rule", "rate_limits.messages_per_user"),
            ("limit", "2/hour"),
        ],
    );
    assert_eq!(relay.queued_messages().len(), 2);
}

#[test]
fn recipients_per_ip_over_the_rate_get_451_at_rcpt_and_are_not_queued() {
    let relay = mx("[rate_limits]\nrecipients_per_ip = \"3/hour\"\n");
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<a@other.test>", 250);
    for r in ["r1", "r2", "r3"] {
        assert_reply(&c.cmd(&format!("RCPT TO:<{r}@example.com>")), 250, "2.1.5");
    }
    assert_reply(&c.cmd("RCPT TO:<r4@example.com>"), 451, "4.7.1");
    c.expect("DATA", 354);
    c.send_raw(b"Subject: x\r\n\r\nhi\r\n.\r\n");
    c.expect_reply(250);
    c.expect("MAIL FROM:<a@other.test>", 250);
    assert_reply(&c.cmd("RCPT TO:<r5@example.com>"), 451, "4.7.1");
    assert_reply(&c.cmd("DATA"), 554, "5.5.1");
    assert_log_fields(
        &relay,
        &[
            ("rule", "rate_limits.recipients_per_ip"),
            ("limit", "3/hour"),
        ],
    );
    let queued = relay.queued_messages();
    assert_eq!(queued.len(), 1);
    let rcpts = queued[0].0["recipients"].to_string();
    assert!(rcpts.contains("r3@example.com"), "{rcpts}");
    assert!(!rcpts.contains("r4@example.com"), "{rcpts}");
}

#[test]
fn reload_keeps_limiter_state_for_unchanged_quotas_and_resets_changed_ones() {
    let port = free_port();
    let upstream = free_port();
    let policy = |limits: &str, rate: &str| {
        config(
            &[listener("mx", port, "none")],
            upstream,
            &format!(
                "[relay]\naccepted_domains = [\"example.com\"]\n\n{limits}\n\
                 [rate_limits]\nmessages_per_ip = \"{rate}\"\n"
            ),
        )
    };
    let relay = Relay::start(&policy("", "1/hour"));
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    let reply = c.send_message(
        "a@other.test",
        &["b@example.com"],
        "Subject: x\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.0, 250, "{reply:?}");
    assert_reply(&c.cmd("MAIL FROM:<a@other.test>"), 451, "4.7.1");

    let reload = |text: String, times: usize| {
        fs::write(relay.config_path(), relay.dir().expand(&text)).unwrap();
        relay.sighup();
        assert!(
            wait_until(LOG_WAIT, || count_log_fields(
                &relay.log(),
                &[("rule", "reload")]
            ) >= times),
            "no reload:\n{}",
            relay.log()
        );
    };
    // Another setting changes, the quota does not: the spent budget stays spent.
    reload(policy("[limits]\nmax_errors = 9\n", "1/hour"), 1);
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    assert_reply(&c.cmd("MAIL FROM:<a@other.test>"), 451, "4.7.1");
    // The quota changes: it starts afresh.
    reload(policy("[limits]\nmax_errors = 9\n", "2/hour"), 2);
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    assert_reply(&c.cmd("MAIL FROM:<a@other.test>"), 250, "2.1.0");
    assert_eq!(relay.queued_messages().len(), 1);
}

// --- AUTH -------------------------------------------------------------------------------------

#[test]
fn brute_force_locks_the_client_out_even_for_the_right_password() {
    let relay = submission(
        "max_failures = 3\nfailure_window = \"10m\"\nlockout = \"15m\"\n",
        "",
    );
    let mut c = tls_from(&relay, "127.0.0.2");
    for pass in ["guess1", "guess2", "guess3"] {
        assert_reply(&c.cmd(&auth_plain("alice", pass)), 535, "5.7.8");
    }
    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 454, "4.7.0");
    assert_reply(&c.cmd("MAIL FROM:<alice@example.com>"), 530, "5.7.0");
    // A new connection from the same address is still locked out, whatever the login.
    let mut c = tls_from(&relay, "127.0.0.2");
    assert_reply(
        &c.cmd(&auth_plain("bob@example.com", "secret")),
        454,
        "4.7.0",
    );
    // The owner from another address is not.
    authed(&relay, "127.0.0.3", "alice");
    assert_log_fields(&relay, &[("rule", "auth_lockout")]);
    assert_log_fields(&relay, &[("rule", "auth_lockout"), ("reply", "454 4.7.0")]);
    assert!(relay.queued_messages().is_empty());
}

#[test]
fn password_spraying_is_logged_and_slowed_without_locking_the_owner_out() {
    let relay = submission("max_failures = 3\n", "");
    // One wrong password per address, each under the per-address lockout.
    for ip in ["127.0.0.2", "127.0.0.3", "127.0.0.4", "127.0.0.5"] {
        let mut c = tls_from(&relay, ip);
        assert_reply(&c.cmd(&auth_plain("alice", "Summer2026!")), 535, "5.7.8");
    }
    assert_log_fields(&relay, &[("rule", "auth_spraying")]);
    assert_log_fields(&relay, &[("rule", "auth_spraying"), ("distinct_ips", "3")]);
    // The owner, from a clean address, gets in (after a delay) and can send.
    let mut c = authed(&relay, "127.0.0.9", "alice");
    assert_log_fields(&relay, &[("rule", "auth_spraying"), ("delay_ms", "*")]);
    let reply = c.send_message(
        "alice@example.com",
        &["x@elsewhere.test"],
        "From: alice@example.com\r\nSubject: x\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.0, 250, "{reply:?}");
    // A sprayer's attempt with the right password would be slowed too, but not refused:
    // the delay applies to the login, the lockout to addresses.
    assert!(!relay.has_fields(&[("rule", "auth_lockout")]));
}

// --- Sender ownership -------------------------------------------------------------------------

#[test]
fn envelope_sender_not_owned_after_auth_gets_553() {
    let relay = submission("", "");
    let mut c = authed(&relay, "127.0.0.2", "alice");
    assert_reply(&c.cmd("MAIL FROM:<ceo@example.com>"), 553, "5.7.1");
    assert_reply(
        &c.cmd("MAIL FROM:<alice@example.com.evil.test>"),
        553,
        "5.7.1",
    );
    // Addresses compare as everywhere else: an ASCII local part ignoring case (docs/policy.md,
    // Address forms).
    assert_reply(&c.cmd("MAIL FROM:<Alice@example.com>"), 250, "2.1.0");
    c.expect("RSET", 250);
    assert_reply(&c.cmd("MAIL FROM:<alice@EXAMPLE.com>"), 250, "2.1.0");
    c.expect("RSET", 250);
    assert_reply(&c.cmd("MAIL FROM:<anyone@Example.ORG>"), 250, "2.1.0");
    c.expect("RSET", 250);
    // The null sender is allowed (read receipts); its From: header is still checked.
    assert_reply(&c.cmd("MAIL FROM:<>"), 250, "2.1.0");
    c.expect("RSET", 250);
    // A user without `senders` owns its login when that is an address.
    let mut b = authed(&relay, "127.0.0.2", "bob@example.com");
    assert_reply(&b.cmd("MAIL FROM:<alice@example.com>"), 553, "5.7.1");
    assert_reply(&b.cmd("MAIL FROM:<bob@example.com>"), 250, "2.1.0");
    assert_log_fields(&relay, &[("rule", "sender_not_owned")]);
    assert!(relay.queued_messages().is_empty());
}

#[test]
fn from_header_not_owned_gets_550_and_is_not_queued() {
    let relay = submission("", "");
    let send = |mech: &str, from_header: &str| {
        let server = format!("127.0.0.1:{}", relay.port(0));
        let header = format!("From: {from_header}");
        swaks_text(&swaks(&[
            "--server",
            &server,
            "--timeout",
            "10",
            "--tls",
            "--auth",
            mech,
            "--auth-user",
            "alice",
            "--auth-password",
            "secret",
            "--from",
            "alice@example.com",
            "--to",
            "bob@elsewhere.test",
            "--header",
            &header,
        ]))
    };
    for mech in ["PLAIN", "LOGIN"] {
        let out = send(mech, "The CEO <ceo@example.com>");
        assert!(out.contains("<~  235 "), "{mech}:\n{out}");
        assert!(out.contains("<~* 550 5.7.1 "), "{mech}:\n{out}");
        assert!(!out.contains("queued as"), "{mech}:\n{out}");
    }
    assert!(relay.queued_messages().is_empty());
    assert_log_fields(
        &relay,
        &[
            ("from_header", "ceo@example.com"),
            ("rule", "from_header_not_owned"),
        ],
    );

    for mech in ["PLAIN", "LOGIN"] {
        let out = send(mech, "Alice <alice@example.com>");
        assert!(
            out.contains("<~  250 2.0.0 Ok: queued as "),
            "{mech}:\n{out}"
        );
    }
    assert_eq!(relay.queued_messages().len(), 2);
}

#[test]
fn missing_or_second_from_header_is_refused_after_auth() {
    let relay = submission("", "");
    let mut c = authed(&relay, "127.0.0.2", "alice");
    let cases = [
        "Subject: no author\r\n\r\nhi\r\n",
        "From: alice@example.com\r\nFrom: ceo@example.com\r\n\r\nhi\r\n",
        "From: alice@example.com, ceo@example.com\r\nSender: alice@example.com\r\n\r\nhi\r\n",
    ];
    for body in cases {
        let reply = c.send_message("alice@example.com", &["x@elsewhere.test"], body);
        assert_reply(&reply, 550, "5.7.1");
    }
    assert_log_fields(&relay, &[("rule", "from_header_missing")]);
    assert!(relay.queued_messages().is_empty());
    // The session goes on: an honest message is accepted.
    let reply = c.send_message(
        "alice@example.com",
        &["x@elsewhere.test"],
        "From: alice@example.com, other@example.org\r\n\r\nhi\r\n",
    );
    assert_eq!(reply.0, 250, "{reply:?}");
    assert_eq!(relay.queued_messages().len(), 1);
}

// --- Relay matrix -----------------------------------------------------------------------------

#[test]
fn classic_open_relay_probes_are_refused_and_normalised_addresses_accepted() {
    let relay = mx("");
    let mut c = SmtpClient::connect_from("127.0.0.2", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<probe@other.test>", 250);
    let refused: &[(&str, u16, &str)] = &[
        // Quoted local parts hiding a route.
        ("<\"x%other.test\"@example.com>", 550, "5.7.1"),
        ("<\"x!other.test\"@example.com>", 550, "5.7.1"),
        // Percent hack with the accepted domain in a different case.
        ("<x%other.test@EXAMPLE.COM>", 550, "5.7.1"),
        // Address literals, v4 and v6 (even our own loopback), are not taken at all.
        ("<x@[127.0.0.1]>", 553, "5.1.3"),
        ("<x@[IPv6:::1]>", 553, "5.1.3"),
        // Trailing dot on a foreign domain is still foreign.
        ("<x@other.test.>", 550, "5.7.1"),
        // Multi-hop source route through our domain: the route is ignored (RFC 5321 §3.6.1)
        // and the final address is foreign.
        ("<@example.com,@other.test:x@third.test>", 550, "5.7.1"),
    ];
    for (rcpt, code, enhanced) in refused {
        let reply = c.cmd(&format!("RCPT TO:{rcpt}"));
        assert!(
            reply.0 == *code && reply.1[4..].starts_with(enhanced),
            "{rcpt}: expected {code} {enhanced}, got {reply:?}"
        );
    }
    assert_reply(&c.cmd("DATA"), 554, "5.5.1");
    assert!(relay.queued_messages().is_empty());
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<probe@other.test>", 250);
    // Normalisation: case of the domain and a trailing dot.
    assert_reply(&c.cmd("RCPT TO:<x@EXAMPLE.com.>"), 250, "2.1.5");
}

#[test]
fn unknown_local_recipients_get_550_5_1_1_at_rcpt_and_nothing_is_queued() {
    let dir = TestDir::new();
    dir.write(
        "recipients.txt",
        "alice@example.com\n# the whole sales domain\n@sales.example.com\n",
    );
    let relay = Relay::start_in(
        dir,
        &config(
            &[listener("mx", free_port(), "none")],
            free_port(),
            "[relay]\naccepted_domains = [\"example.com\", \"sales.example.com\"]\n\
             recipients_file = \"{dir}/recipients.txt\"\n",
        ),
    );
    let mut c = SmtpClient::connect_from("127.0.0.3", relay.port(0));
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    c.expect("MAIL FROM:<someone@elsewhere.test>", 250);
    assert_reply(&c.cmd("RCPT TO:<random123@example.com>"), 550, "5.1.1");
    // Exchange treats local parts case-insensitively; so does the recipients list.
    assert_reply(&c.cmd("RCPT TO:<Alice@EXAMPLE.com>"), 250, "2.1.5");
    assert_reply(&c.cmd("RCPT TO:<alice@Example.COM.>"), 250, "2.1.5");
    assert_reply(&c.cmd("RCPT TO:<anyone@sales.example.com>"), 250, "2.1.5");
    c.cmd("RSET");
    c.expect("MAIL FROM:<someone@elsewhere.test>", 250);
    assert_reply(&c.cmd("RCPT TO:<nobody@example.com>"), 550, "5.1.1");
    assert_eq!(c.cmd("DATA").0, 554);
    assert_log_fields(&relay, &[("rule", "*")]);
    assert!(relay.spool_files().is_empty());
}
