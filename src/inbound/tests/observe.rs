//! What sessions record through the telemetry: every refusal counted once under its rule
//! and journaled once with what it concerned; accepted messages with their Message-ID;
//! sessions by listener and TLS version; AUTH outcomes; DNS errors by check.

use super::*;
use crate::observe::{Event, EventKind};

/// The value of `series` (name and labels, as exposed) in the metrics, if it has a sample.
fn sample(h: &Harness, series: &str) -> Option<f64> {
    let text = h.telemetry.metrics.encode();
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' ')?.parse().ok())
}

/// `portcullis_refusals_total{rule}`.
fn refusals(h: &Harness, rule: &str) -> Option<f64> {
    sample(h, &format!("portcullis_refusals_total{{rule=\"{rule}\"}}"))
}

/// The kinds of the events journaled so far, in order.
fn kinds(h: &Harness) -> Vec<EventKind> {
    h.events.all().iter().map(|e| e.kind).collect()
}

/// `rule` refused exactly once: its counter is 1, one `Refused` event of the journal names
/// it (from this session's client and listener), and every refusal journaled was counted.
/// That event.
fn refused_once(h: &Harness, rule: &str) -> Event {
    assert_eq!(refusals(h, rule), Some(1.0), "refusals of {rule}");
    let events = h.events.all();
    let refused: Vec<&Event> = events
        .iter()
        .filter(|e| e.kind == EventKind::Refused)
        .collect();
    let counted: f64 = h
        .telemetry
        .metrics
        .encode()
        .lines()
        .filter(|l| l.starts_with("portcullis_refusals_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(counted, refused.len() as f64, "{refused:?}");
    let of_rule: Vec<&&Event> = refused
        .iter()
        .filter(|e| e.rule.as_deref() == Some(rule))
        .collect();
    assert_eq!(of_rule.len(), 1, "{rule}: {events:?}");
    let event = (*of_rule[0]).clone();
    assert_eq!(event.client, Some("192.0.2.1".parse().unwrap()));
    assert_eq!(event.listener.as_deref(), Some("mx"));
    event
}

#[tokio::test(start_paused = true)]
async fn a_refused_recipient_is_one_refusal_of_its_rule_with_its_sender_and_recipient() {
    let mut h = Harness::start(NO_TLS, "");
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.cmd("MAIL FROM:<a@sender.test>").await;
    let refused = h.cmd("RCPT TO:<u@other.test>").await;
    assert_eq!(refused, wire(&reply::RELAY_DENIED));
    h.cmd("QUIT").await;
    h.until_closed().await;
    let event = refused_once(&h, "relay_denied");
    assert_eq!(event.from.as_deref(), Some("a@sender.test"));
    assert_eq!(event.rcpts, ["u@other.test"]);
    assert_eq!(event.reply, Some(reply::RELAY_DENIED.to_string()));
    assert_eq!((event.id, event.tls, event.login), (None, None, None));
    assert_eq!(kinds(&h), [EventKind::Connect, EventKind::Refused]);
}

#[tokio::test(start_paused = true)]
async fn a_client_denied_at_connect_is_one_refusal_there_then_one_per_command() {
    let mut h = Harness::start("tls = \"none\"\ndeny = [\"192.0.2.0/24\"]", "");
    assert_eq!(h.reply().await, wire(&reply::ACCESS_DENIED));
    assert!(h.cmd("EHLO client.test").await.starts_with("503 5.7.1"));
    h.cmd("QUIT").await;
    h.until_closed().await;
    let at_connect = refused_once(&h, "listener_deny");
    assert_eq!(at_connect.reply, Some(reply::ACCESS_DENIED.to_string()));
    refused_once(&h, "access_denied");
    // Refused at connect: no Connect event, but a session all the same.
    assert_eq!(kinds(&h), [EventKind::Refused, EventKind::Refused]);
    let sessions = "portcullis_sessions_total{listener=\"mx\",tls=\"none\"}";
    assert_eq!(sample(&h, sessions), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn a_client_over_its_connection_rate_is_one_refusal_and_no_session() {
    let h = Harness::start(NO_TLS, "[rate_limits]\nconnections_per_ip = \"1/hour\"\n");
    let mut again = Harness::with_runtime(tempfile::tempdir().unwrap(), Arc::clone(&h.runtime));
    assert_eq!(again.until_closed().await, wire(&reply::CONNECTION_RATE));
    let event = refused_once(&again, "rate_limits.connections_per_ip");
    assert_eq!(event.reply, Some(reply::CONNECTION_RATE.to_string()));
    assert_eq!(kinds(&again), [EventKind::Refused]);
    // Closed before any session started: none is counted.
    assert!(
        !again
            .telemetry
            .metrics
            .encode()
            .contains("portcullis_sessions_total{")
    );
}

#[tokio::test(start_paused = true)]
async fn a_client_talking_before_the_greeting_is_one_pregreet_refusal_after_its_connect() {
    let mut h = Harness::start(NO_TLS, "[limits]\npregreet_wait = \"3s\"\n");
    h.send("EHLO early.test").await;
    assert_eq!(h.until_closed().await, wire(&reply::EARLY_TALKER));
    let event = refused_once(&h, "pregreet");
    assert_eq!(event.reply, Some(reply::EARLY_TALKER.to_string()));
    assert_eq!(kinds(&h), [EventKind::Connect, EventKind::Refused]);
}

/// The loopback resolver fails every lookup it has no cached answer for: SPF is a
/// `temperror`, refused under `enforce`, and counted as a DNS error of SPF.
#[tokio::test(start_paused = true)]
async fn a_sender_refused_at_mail_is_one_refusal_with_its_sender_and_its_dns_error_counted() {
    let mut h = Harness::start(NO_TLS, "[spf]\nverify = \"enforce\"\n");
    h.reply().await;
    h.cmd("EHLO client.test").await;
    let refused = h.cmd("MAIL FROM:<a@sender.test>").await;
    assert_eq!(refused, wire(&reply::SPF_TEMPERROR));
    h.cmd("QUIT").await;
    h.until_closed().await;
    let event = refused_once(&h, "spf");
    assert_eq!(event.from.as_deref(), Some("a@sender.test"));
    assert!(event.rcpts.is_empty());
    let spf_errors = "portcullis_dns_errors_total{check=\"spf\"}";
    assert_eq!(sample(&h, spf_errors), Some(1.0));
}

#[tokio::test(start_paused = true)]
async fn a_dnsbl_zone_that_cannot_be_asked_is_a_dns_error_and_no_refusal() {
    let mut h = Harness::start(
        NO_TLS,
        "[[dnsbl.zones]]\nzone = \"bl.test\"\n[[dnsbl.zones]]\nzone = \"bl2.test\"\n",
    );
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.cmd("MAIL FROM:<a@sender.test>").await;
    assert!(h.cmd("RCPT TO:<u@example.com>").await.starts_with("250 "));
    h.cmd("QUIT").await;
    h.until_closed().await;
    let dnsbl_errors = "portcullis_dns_errors_total{check=\"dnsbl\"}";
    assert_eq!(sample(&h, dnsbl_errors), Some(2.0), "one per zone");
    assert_eq!(kinds(&h), [EventKind::Connect]);
}

#[tokio::test(start_paused = true)]
async fn a_message_refused_after_the_final_dot_is_one_refusal_with_its_queue_id_and_message_id() {
    let mut h = Harness::start(NO_TLS, "[limits]\nhop_limit = 1\n");
    h.ready_for_data().await;
    let looped = "Received: from a\r\nReceived: from b\r\nMessage-ID:\r\n <loop@client.test>\r\n\r\nbody\r\n.";
    assert_eq!(h.cmd(looped).await, wire(&reply::TOO_MANY_HOPS));
    h.cmd("QUIT").await;
    h.until_closed().await;
    let event = refused_once(&h, "hop_limit");
    let id: crate::envelope::QueueId = event.id.as_deref().expect("a queue id").parse().unwrap();
    assert!(!id.as_str().is_empty());
    assert_eq!(event.message_id.as_deref(), Some("<loop@client.test>"));
    assert_eq!(event.from.as_deref(), Some("a@sender.test"));
    assert_eq!(event.rcpts, ["u@example.com"]);
    assert_eq!(event.size, None);
    assert!(
        !h.telemetry
            .metrics
            .encode()
            .contains("portcullis_messages_accepted_total{")
    );
}

#[tokio::test(start_paused = true)]
async fn a_message_over_the_size_limit_is_one_refusal_with_its_queue_id() {
    let mut h = Harness::start(NO_TLS, "[limits]\nmax_message_size = \"1KiB\"\n");
    h.ready_for_data().await;
    let big = format!(
        "Message-ID: <big@client.test>\r\n\r\n{}\r\n.",
        "x".repeat(2048)
    );
    assert_eq!(h.cmd(&big).await, wire(&reply::MESSAGE_TOO_BIG));
    h.cmd("QUIT").await;
    h.until_closed().await;
    let event = refused_once(&h, "max_message_size");
    // Its spool file existed: the queue id; nothing past the limit is read, so whether its
    // header was (and so its Message-ID) depends on how the octets arrived.
    assert!(event.id.is_some());
    assert_eq!(event.from.as_deref(), Some("a@sender.test"));
    assert_eq!(event.rcpts, ["u@example.com"]);
}

#[tokio::test(start_paused = true)]
async fn an_idle_client_is_one_timeout_refusal() {
    let mut h = Harness::start(NO_TLS, "[limits]\ncommand_timeout = \"5m\"\n");
    h.reply().await;
    assert_eq!(h.reply().await, wire(&reply::TIMEOUT));
    h.until_closed().await;
    let event = refused_once(&h, "timeout");
    assert_eq!(event.reply, Some(reply::TIMEOUT.to_string()));
}

#[tokio::test(start_paused = true)]
async fn a_client_reaching_max_errors_is_one_max_errors_refusal_after_its_own() {
    let mut h = Harness::start(NO_TLS, "[limits]\nmax_errors = 2\n");
    h.reply().await;
    assert!(h.cmd("FOO").await.starts_with("500 "));
    h.send("BAR").await;
    let rest = h.until_closed().await;
    assert!(rest.ends_with(&wire(&reply::TOO_MANY_ERRORS)), "{rest}");
    let event = refused_once(&h, "max_errors");
    assert_eq!(event.reply, Some(reply::TOO_MANY_ERRORS.to_string()));
    // The two unknown commands, then the close.
    let rules: Vec<Option<String>> = h.events.all().into_iter().map(|e| e.rule).collect();
    assert_eq!(rules.len(), 4, "{rules:?}");
    assert_eq!(rules[1], rules[2]);
    assert_eq!(rules[3].as_deref(), Some("max_errors"));
}

#[tokio::test(start_paused = true)]
async fn commands_pipelined_after_starttls_are_one_starttls_injection_refusal() {
    let mut h = Harness::start(
        "tls = \"starttls\"",
        "[tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n",
    );
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.send("STARTTLS\r\nMAIL FROM:<a@sender.test>").await;
    assert!(h.reply().await.starts_with("220 "));
    // No handshake follows: the session ends at the handshake timeout.
    h.until_closed().await;
    let event = refused_once(&h, "starttls_injection");
    assert_eq!(event.reply, None);
}

#[tokio::test(start_paused = true)]
async fn an_accepted_message_is_journaled_as_queued_with_its_message_id_and_counted() {
    let mut h = Harness::start(NO_TLS, "");
    h.ready_for_data().await;
    let message = "Message-ID: <m1@client.test>\r\nSubject: hi\r\n\r\nbody\r\n.";
    let queued = h.cmd(message).await;
    let committed = h.queued.recv().await.expect("delivery is told");
    assert!(queued.contains(committed.id.as_str()), "{queued}");
    h.cmd("QUIT").await;
    h.until_closed().await;
    let accepted = "portcullis_messages_accepted_total{listener=\"mx\"}";
    assert_eq!(sample(&h, accepted), Some(1.0));
    assert_eq!(kinds(&h), [EventKind::Connect, EventKind::Queued]);
    let event = h.events.all().remove(1);
    assert_eq!(event.id.as_deref(), Some(committed.id.as_str()));
    assert_eq!(event.message_id.as_deref(), Some("<m1@client.test>"));
    assert_eq!(event.from.as_deref(), Some("a@sender.test"));
    assert_eq!(event.rcpts, ["u@example.com"]);
    assert_eq!(event.client, Some("192.0.2.1".parse().unwrap()));
    assert_eq!(event.listener.as_deref(), Some("mx"));
    assert_eq!((event.login, event.tls, event.rule), (None, None, None));
    let spooled = h.queued_message(&committed.id).len() as u64;
    assert_eq!(event.size, Some(spooled));
}

#[tokio::test(start_paused = true)]
async fn a_message_without_message_id_is_queued_without_one() {
    let mut h = Harness::start(NO_TLS, "");
    h.ready_for_data().await;
    assert!(
        h.cmd("Subject: hi\r\n\r\nbody\r\n.")
            .await
            .starts_with("250 ")
    );
    h.cmd("QUIT").await;
    h.until_closed().await;
    let queued = h.events.all().remove(1);
    assert_eq!(queued.kind, EventKind::Queued);
    assert_eq!(queued.message_id, None);
}

#[tokio::test(start_paused = true)]
async fn sessions_are_counted_at_their_end_by_listener_and_tls_version() {
    let plain = "portcullis_sessions_total{listener=\"mx\",tls=\"none\"}";
    let tls13 = "portcullis_sessions_total{listener=\"mx\",tls=\"1.3\"}";
    let mut h = Harness::start(NO_TLS, "");
    h.reply().await;
    h.cmd("EHLO client.test").await;
    assert_eq!(sample(&h, plain), None, "not before its end");
    h.cmd("QUIT").await;
    h.until_closed().await;
    assert_eq!(sample(&h, plain), Some(1.0));

    let mut h = Harness::start(
        "tls = \"starttls\"",
        "[tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n",
    );
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.starttls().await;
    h.cmd("EHLO client.test").await;
    h.cmd("QUIT").await;
    h.until_closed().await;
    assert_eq!(sample(&h, tls13), Some(1.0));
    assert_eq!(sample(&h, plain), None);
}

/// `users.toml` with `alice`, whose password is `secret` and who sends as a@sender.test.
fn write_alice(dir: &std::path::Path) {
    let hash = crate::policy::credentials::hash_password("secret").unwrap();
    let users = format!(
        "[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\nsenders = [\"a@sender.test\"]\n"
    );
    std::fs::write(dir.join("users.toml"), users).unwrap();
}

/// AUTH over STARTTLS on a listener offering it, with alice's users file.
async fn auth_session(more: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    write_alice(dir.path());
    super::super::tls::write_cert_files(dir.path(), "localhost").unwrap();
    let more = format!(
        "[tls]\ncert = \"{{dir}}/cert.pem\"\nkey = \"{{dir}}/key.pem\"\n\
         [auth]\nusers_file = \"{{dir}}/users.toml\"\n{more}"
    );
    let runtime = runtime(dir.path(), "tls = \"starttls\"\nauth = \"optional\"", &more);
    let mut h = Harness::with_runtime(dir, Arc::new(runtime));
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.starttls().await;
    h.cmd("EHLO client.test").await;
    h
}

/// Real time: the password is verified on the verifier's own thread.
#[tokio::test]
async fn auth_successes_and_failures_are_counted_and_journaled_with_the_login() {
    let mut h = auth_session("").await;
    // alice with a wrong password, then an unknown login, then alice with hers.
    let wrong = h.cmd("AUTH PLAIN AGFsaWNlAHdyb25n").await;
    assert_eq!(wrong, wire(&reply::AUTH_FAILED));
    let unknown = h.cmd("AUTH PLAIN AGJvYgBzZWNyZXQ=").await;
    assert_eq!(unknown, wire(&reply::AUTH_FAILED));
    assert_eq!(sample(&h, "portcullis_auth_failures_total"), Some(2.0));
    assert_eq!(sample(&h, "portcullis_auth_successes_total"), Some(0.0));
    let right = h.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await;
    assert!(right.starts_with("235 "), "{right}");
    assert_eq!(sample(&h, "portcullis_auth_successes_total"), Some(1.0));
    assert_eq!(sample(&h, "portcullis_auth_failures_total"), Some(2.0));
    // What the authenticated session does next carries its login and TLS version.
    h.cmd("MAIL FROM:<a@sender.test>").await;
    h.cmd("RCPT TO:<u@example.com>").await;
    assert!(h.cmd("DATA").await.starts_with("354 "));
    let message = "From: a@sender.test\r\nSubject: hi\r\n\r\nbody\r\n.";
    let queued = h.cmd(message).await;
    assert!(queued.starts_with("250 "), "{queued}");
    h.cmd("QUIT").await;
    h.until_closed().await;
    refused_once(&h, "auth_bad_password");
    refused_once(&h, "auth_unknown_user");
    let tls13 = "portcullis_sessions_total{listener=\"mx\",tls=\"1.3\"}";
    assert_eq!(sample(&h, tls13), Some(1.0));
    let last = h.events.all().pop().unwrap();
    assert_eq!(last.kind, EventKind::Queued);
    assert_eq!(last.login.as_deref(), Some("alice"));
    assert_eq!(last.tls.as_deref(), Some("1.3"));
}

/// A locked-out client still guessing keeps counting as AUTH failures (see
/// `record::AUTH_FAILURE_RULES`).
#[tokio::test(start_paused = true)]
async fn an_auth_refused_by_the_lockout_counts_as_a_failure() {
    let mut h = Harness::start(
        "tls = \"starttls\"\nauth = \"optional\"",
        "[tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n\
         [auth]\nusers_file = \"{dir}/users.toml\"\nmax_failures = 1\n",
    );
    let ip = PEER.parse::<SocketAddr>().unwrap().ip();
    let now = tokio::time::Instant::now().into_std();
    let GateDecision::Proceed(attempt) = h.runtime.policy.store().auth_gate(ip, "alice", now)
    else {
        panic!("a fresh client is let through");
    };
    attempt.settle(false, now);
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.starttls().await;
    h.cmd("EHLO client.test").await;
    let auth = h.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await;
    assert_eq!(auth, wire(&reply::AUTH_LOCKED_OUT));
    h.cmd("QUIT").await;
    h.until_closed().await;
    refused_once(&h, "auth_lockout");
    assert_eq!(sample(&h, "portcullis_auth_failures_total"), Some(1.0));
    assert_eq!(sample(&h, "portcullis_auth_successes_total"), Some(0.0));
}

/// The loopback resolver answers nothing it has not cached: under `[dmarc] verify =
/// "record"` the message is accepted, and its SPF, DMARC and iprev lookups count as DNS
/// errors of their checks, once each; there was no DKIM signature or ARC set to look up.
#[tokio::test(start_paused = true)]
async fn message_checks_whose_lookups_fail_count_dns_errors_by_check() {
    let mut h = Harness::start(NO_TLS, "[dmarc]\nverify = \"record\"\n");
    h.ready_for_data().await;
    let message = "From: x@nowhere.test\r\nSubject: hi\r\n\r\nbody\r\n.";
    assert!(h.cmd(message).await.starts_with("250 "));
    h.cmd("QUIT").await;
    h.until_closed().await;
    let errors = |check: &str| {
        sample(
            &h,
            &format!("portcullis_dns_errors_total{{check=\"{check}\"}}"),
        )
    };
    assert_eq!(errors("spf"), Some(1.0));
    assert_eq!(errors("dmarc"), Some(1.0));
    assert_eq!(errors("dkim"), None);
    assert_eq!(errors("arc"), None);
    // The client's reverse lookup, started at connect for untrusted mail.
    assert_eq!(errors("iprev"), Some(1.0));
}

/// The accept loop refuses a connection over `max_connections` itself, before any session:
/// one refusal of its rule, from that client on that listener, and no session counted.
#[tokio::test]
async fn a_connection_over_the_cap_is_one_refusal_at_connect_and_no_session() {
    let dir = tempfile::tempdir().unwrap();
    let runtime = Arc::new(runtime(
        dir.path(),
        NO_TLS,
        "[limits]\nmax_connections = 1\n",
    ));
    let parts = Parts::new(dir.path(), &runtime, None);
    let socket = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = socket.local_addr().unwrap();
    let (telemetry, events) = (Arc::clone(&parts.shared.telemetry), parts.events.clone());
    let tracker = tokio_util::task::TaskTracker::new();
    let task = super::super::listener::ListenerTask {
        config: runtime.config.listeners[0].clone(),
        socket,
        runtime: Arc::new(arc_swap::ArcSwap::new(Arc::clone(&runtime))),
        shared: Arc::new(parts.shared.clone()),
        counter: super::super::pressure::ConnectionCounter::default(),
        tracker: tracker.clone(),
    };
    let accepting = tokio::spawn(task.run());
    let mut first = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut greeting = [0u8; 4];
    first.read_exact(&mut greeting).await.unwrap();
    assert_eq!(&greeting, b"220 ");
    let mut second = tokio::net::TcpStream::connect(addr).await.unwrap();
    let mut refusal = String::new();
    second.read_to_string(&mut refusal).await.unwrap();
    assert_eq!(refusal, wire(&reply::TOO_MANY_CONNECTIONS));
    let refused: Vec<Event> = events
        .all()
        .into_iter()
        .filter(|e| e.kind == EventKind::Refused)
        .collect();
    assert_eq!(refused.len(), 1, "{refused:?}");
    assert_eq!(refused[0].rule.as_deref(), Some("max_connections"));
    assert_eq!(refused[0].client, Some("127.0.0.1".parse().unwrap()));
    assert_eq!(refused[0].listener.as_deref(), Some("mx"));
    let text = telemetry.metrics.encode();
    assert!(
        text.contains("portcullis_refusals_total{rule=\"max_connections\"} 1\n"),
        "{text}"
    );
    // The first client's session is still open: no session has ended.
    assert!(!text.contains("portcullis_sessions_total{"), "{text}");
    // Shutdown ends it: the one session counted is the first client's.
    parts.shared.shutdown.cancel();
    accepting.await.unwrap();
    tracker.close();
    tracker.wait().await;
    let text = telemetry.metrics.encode();
    let sessions = "portcullis_sessions_total{listener=\"mx\",tls=\"none\"} 1\n";
    assert!(text.contains(sessions), "{text}");
    drop(first);
}
