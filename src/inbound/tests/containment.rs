//! Containment in the session: a suspended login's AUTH is answered as a wrong password and
//! not counted, its open sessions are closed at their next command or final dot, and each
//! trigger suspends the login that trips it. Real time: passwords are verified on the
//! verifier's own thread.

use base64::Engine as _;

use super::*;
use crate::policy::containment::Trip;

/// A policy with STARTTLS, AUTH for `alice@example.com` (password `secret`) and `more`.
fn policy(more: &str) -> String {
    format!(
        "[tls]\ncert = \"{{dir}}/cert.pem\"\nkey = \"{{dir}}/key.pem\"\n\
         [auth]\nusers_file = \"{{dir}}/users.toml\"\nmax_failures = 2\n{more}"
    )
}

const LISTENER: &str = "tls = \"starttls\"\nauth = \"optional\"";

fn start(more: &str) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let hash = crate::policy::credentials::hash_password("secret").unwrap();
    let users = format!("[[users]]\nname = \"alice@example.com\"\npassword_hash = \"{hash}\"\n");
    std::fs::write(dir.path().join("users.toml"), users).unwrap();
    super::super::tls::write_cert_files(dir.path(), "localhost").unwrap();
    let runtime = Arc::new(runtime(dir.path(), LISTENER, &policy(more)));
    Harness::with_runtime(dir, runtime)
}

/// A second session under `h`'s runtime and containment (the same relay).
fn beside(h: &Harness) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(h.dir.path().join("cert.pem"), dir.path().join("cert.pem")).unwrap();
    let runtime = Arc::clone(&h.runtime);
    Harness::sharing(dir, runtime, Some(Arc::clone(&h.containment)))
}

fn plain(login: &str, password: &str) -> String {
    let response = format!("\0{login}\0{password}");
    let encoded = base64::engine::general_purpose::STANDARD.encode(response);
    format!("AUTH PLAIN {encoded}")
}

/// Greeting, EHLO, STARTTLS, EHLO, then AUTH as alice with `password`: its reply.
async fn auth(h: &mut Harness, password: &str) -> String {
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.starttls().await;
    h.cmd("EHLO client.test").await;
    h.cmd(&plain("alice@example.com", password)).await
}

/// [`auth`] with the right password, then `MAIL FROM:<alice@example.com>`, both accepted.
async fn authenticated_mail(h: &mut Harness) {
    assert!(auth(h, "secret").await.starts_with("235 "));
    let mail = h.cmd("MAIL FROM:<alice@example.com>").await;
    assert!(mail.starts_with("250 "), "{mail}");
}

fn operator() -> Trip {
    Trip {
        rule: crate::policy::containment::OPERATOR,
        reason: "test".into(),
    }
}

#[tokio::test]
async fn a_suspended_logins_right_password_neither_counts_as_a_failure_nor_clears_them() {
    let mut h = start("");
    h.containment.suspend("alice@example.com", operator()).await;
    let ip = PEER.parse::<SocketAddr>().unwrap().ip();
    let gate = |h: &Harness| {
        let now = tokio::time::Instant::now().into_std();
        h.runtime
            .policy
            .store()
            .auth_gate(ip, "alice@example.com", now)
    };
    // max_failures = 2: one wrong password, then the suspended right one.
    assert_eq!(auth(&mut h, "wrong").await, wire(&reply::AUTH_FAILED));
    let mut right = beside(&h);
    assert_eq!(auth(&mut right, "secret").await, wire(&reply::AUTH_FAILED));
    match gate(&h) {
        GateDecision::Proceed(attempt) => attempt.release(),
        other => panic!("not counted as a failure: {other:?}"),
    }
    // Nor as a success: the first failure still counts, and one more locks the client out.
    let mut again = beside(&h);
    assert_eq!(auth(&mut again, "wrong").await, wire(&reply::AUTH_FAILED));
    assert!(matches!(gate(&h), GateDecision::LockedOut { .. }));
}

#[tokio::test]
async fn other_logins_and_strangers_carry_on_while_one_login_is_suspended() {
    let mut h = start("");
    h.containment
        .suspend("mallory@example.com", operator())
        .await;
    authenticated_mail(&mut h).await;
    assert!(h.cmd("RCPT TO:<u@example.com>").await.starts_with("250 "));
    assert!(h.cmd("DATA").await.starts_with("354 "));
    let queued = h.cmd("From: alice@example.com\r\n\r\nbody\r\n.").await;
    assert!(queued.starts_with("250 "), "{queued}");
    let mut stranger = beside(&h);
    stranger.reply().await;
    assert!(stranger.cmd("EHLO client.test").await.starts_with("250"));
    assert!(
        stranger
            .cmd("MAIL FROM:<x@sender.test>")
            .await
            .starts_with("250 ")
    );
    assert!(
        stranger
            .cmd("RCPT TO:<u@example.com>")
            .await
            .starts_with("250 ")
    );
    assert!(stranger.cmd("NOOP").await.starts_with("250 "));
}

#[tokio::test]
async fn a_suspended_login_gets_the_wrong_password_reply_and_its_right_password_counts_nothing() {
    let mut h = start("");
    h.containment.suspend("alice@example.com", operator()).await;
    let mut wrong = beside(&h);
    // Byte for byte the reply of a wrong password.
    let suspended = auth(&mut h, "secret").await;
    let refused = auth(&mut wrong, "not the password").await;
    assert_eq!(suspended, wire(&reply::AUTH_FAILED));
    assert_eq!(suspended, refused);
    // The right password was checked (same cost) and counted as nothing: with max_failures
    // = 2, a wrong one and two right ones would have locked the client out.
    let mut again = beside(&h);
    assert_eq!(auth(&mut again, "secret").await, wire(&reply::AUTH_FAILED));
    let ip = PEER.parse::<SocketAddr>().unwrap().ip();
    let now = tokio::time::Instant::now().into_std();
    match h
        .runtime
        .policy
        .store()
        .auth_gate(ip, "alice@example.com", now)
    {
        GateDecision::Proceed(attempt) => attempt.release(),
        other => panic!("the client is not locked out: {other:?}"),
    }
    // Lifted, the same password authenticates.
    let spool = Spool::open(&h.dir.path().join("spool")).unwrap();
    assert!(spool.resume_login("alice@example.com").unwrap());
    h.containment.refresh();
    let mut after = beside(&h);
    assert!(auth(&mut after, "secret").await.starts_with("235 "));
}

#[tokio::test]
async fn an_open_session_of_a_suspended_login_gets_421_at_its_next_command() {
    let mut h = start("");
    assert!(auth(&mut h, "secret").await.starts_with("235 "));
    assert!(h.cmd("NOOP").await.starts_with("250 "));
    h.containment.suspend("alice@example.com", operator()).await;
    assert_eq!(h.cmd("NOOP").await, wire(&reply::ACCOUNT_SUSPENDED));
    assert_eq!(h.until_closed().await, "");
}

#[tokio::test]
async fn commands_after_the_suspension_are_refused_pipelined_or_not() {
    let mut h = start("");
    authenticated_mail(&mut h).await;
    h.containment.suspend("alice@example.com", operator()).await;
    // RCPT and DATA in one write: refused at once, the session closed; neither is decided.
    h.send("RCPT TO:<u@example.com>\r\nDATA").await;
    assert_eq!(h.reply().await, wire(&reply::ACCOUNT_SUSPENDED));
    assert_eq!(h.until_closed().await, "");
}

#[tokio::test]
async fn a_message_whose_login_is_suspended_during_data_is_not_queued() {
    let mut h = start("");
    authenticated_mail(&mut h).await;
    assert!(h.cmd("RCPT TO:<u@example.com>").await.starts_with("250 "));
    assert!(h.cmd("DATA").await.starts_with("354 "));
    h.send("From: alice@example.com\r\nSubject: hi\r\n\r\nbody")
        .await;
    h.containment.suspend("alice@example.com", operator()).await;
    assert_eq!(h.cmd(".").await, wire(&reply::ACCOUNT_SUSPENDED));
    h.until_closed().await;
    assert!(h.queued.try_recv().is_err());
    for dir in ["spool/queue", "spool/tmp"] {
        let files = std::fs::read_dir(h.dir.path().join(dir)).unwrap().count();
        assert_eq!(files, 0, "{dir}");
    }
}

#[tokio::test]
async fn too_many_recipient_domains_suspend_the_login_at_the_rcpt_that_goes_over() {
    let mut h = start("[containment]\nrecipient_domains_per_hour = 2\n");
    authenticated_mail(&mut h).await;
    for rcpt in ["a@one.test", "b@two.test", "c@ONE.test"] {
        let reply = h.cmd(&format!("RCPT TO:<{rcpt}>")).await;
        assert!(reply.starts_with("250 "), "{rcpt}: {reply}");
    }
    assert_eq!(
        h.cmd("RCPT TO:<d@three.test>").await,
        wire(&reply::ACCOUNT_SUSPENDED)
    );
    h.until_closed().await;
    assert!(h.containment.is_suspended("alice@example.com"));
    let spool = Spool::open(&h.dir.path().join("spool")).unwrap();
    let recorded = spool.suspension("alice@example.com").unwrap().unwrap();
    assert_eq!(recorded.rule, "containment_recipient_domains");
}

#[tokio::test]
async fn repeated_user_rate_refusals_suspend_the_login_and_close_its_session() {
    let mut h = start(
        "[rate_limits]\nmessages_per_user = \"1/hour\"\n[containment]\nrate_limit_hits = 2\n",
    );
    authenticated_mail(&mut h).await;
    assert!(h.cmd("RSET").await.starts_with("250 "));
    let limited = h.cmd("MAIL FROM:<alice@example.com>").await;
    assert!(limited.starts_with("451 4.7.1"), "{limited}");
    assert!(!h.containment.is_suspended("alice@example.com"));
    // The second refusal within the hour suspends, and closes the session.
    let suspended = h.cmd("MAIL FROM:<alice@example.com>").await;
    assert_eq!(suspended, wire(&reply::ACCOUNT_SUSPENDED));
    assert!(h.containment.is_suspended("alice@example.com"));
    assert_eq!(h.until_closed().await, "");
}

#[tokio::test]
async fn logins_from_too_many_addresses_suspend_the_login_at_the_one_that_goes_over() {
    let mut h = start("[containment]\nclient_ips_per_hour = 1\n");
    // Another address logged in within the hour (as the session would have counted it).
    let settings = h.runtime.config.containment;
    let other = "198.51.100.7".parse().unwrap();
    let now = tokio::time::Instant::now().into_std();
    assert_eq!(
        (h.containment).authenticated(&settings, "alice@example.com", other, now),
        None
    );
    // The right password from a second address: refused as a wrong one, and suspended.
    assert_eq!(auth(&mut h, "secret").await, wire(&reply::AUTH_FAILED));
    assert!(h.containment.is_suspended("alice@example.com"));
    let spool = Spool::open(&h.dir.path().join("spool")).unwrap();
    let recorded = spool.suspension("alice@example.com").unwrap().unwrap();
    assert_eq!(recorded.rule, "containment_client_ips");
}

#[tokio::test]
async fn without_containment_nothing_is_counted_or_suspended() {
    let mut h = start("[rate_limits]\nmessages_per_user = \"1/hour\"\n");
    authenticated_mail(&mut h).await;
    for domain in ["one", "two", "three", "four"] {
        let reply = h.cmd(&format!("RCPT TO:<x@{domain}.test>")).await;
        assert!(reply.starts_with("250 "), "{reply}");
    }
    assert!(h.cmd("RSET").await.starts_with("250 "));
    for _ in 0..5 {
        let limited = h.cmd("MAIL FROM:<alice@example.com>").await;
        assert!(limited.starts_with("451 4.7.1"), "{limited}");
    }
    assert!(!h.containment.is_suspended("alice@example.com"));
    assert!(h.cmd("NOOP").await.starts_with("250 "));
}
