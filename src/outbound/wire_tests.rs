//! The upstream client against a scripted upstream on a loopback port: each kind of
//! [`ClientError`] and what the caller does with it (stale retry, plaintext retry, circuit
//! breaker), and per-recipient outcomes carrying the upstream's reply.

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::TcpListener;

use super::client::{
    DotGate, Incapable, MailTransaction, MessageSource, RcptOutcome, Rejection, Sent,
    UpstreamConnection,
};
use super::error::{ClientError, TlsFailure, UpstreamStage, Wait};
use super::upstream::UpstreamRt;
use crate::config::{Upstream, UpstreamTls};
use crate::envelope::{Address, MailParams, ReversePath};
use crate::queue::bounce::Diagnostic;
use crate::routes::CapabilityBook;
use crate::smtp::upstream_reply::{GarbledReply, UpstreamReply};

/// What the scripted upstream does with a command line.
enum Act {
    /// Send these reply lines (CRLF added after each `\n`-separated line).
    Reply(&'static str),
    /// Send the reply, then close the connection without reading further.
    ReplyThenClose(&'static str),
    /// Say nothing and keep the connection open.
    Silent,
}

/// Command lines each connection received, in order (the message itself left out).
type Seen = Arc<Mutex<Vec<Vec<String>>>>;

/// A scripted upstream: greets each connection with `220`, then answers each command line
/// with `script(connection number, line)`; after a `354` it reads the message up to the
/// final dot and answers `script(n, ".")`. Returns its port and what it saw.
async fn responder(script: fn(usize, &str) -> Act) -> (u16, Seen) {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::default();
    let log = seen.clone();
    tokio::spawn(async move {
        for n in 0.. {
            let Ok((tcp, _)) = listener.accept().await else {
                return;
            };
            log.lock().unwrap().push(Vec::new());
            tokio::spawn(converse(tcp, n, script, log.clone()));
        }
    });
    (port, seen)
}

async fn converse(tcp: tokio::net::TcpStream, n: usize, script: fn(usize, &str) -> Act, log: Seen) {
    let (read, mut write) = tcp.into_split();
    let mut lines = BufReader::new(read).lines();
    let send = |text: &str| format!("{}\r\n", text.replace('\n', "\r\n"));
    let _ = write.write_all(b"220 up.test ESMTP\r\n").await;
    let mut in_data = false;
    while let Ok(Some(line)) = lines.next_line().await {
        let line = line.trim_end_matches('\r').to_owned();
        if in_data && line != "." {
            continue;
        }
        in_data = false;
        log.lock().unwrap()[n].push(line.clone());
        match script(n, &line) {
            Act::Reply(text) => {
                in_data = line == "DATA" && text.starts_with("354");
                let _ = write.write_all(send(text).as_bytes()).await;
            }
            Act::ReplyThenClose(text) => {
                let _ = write.write_all(send(text).as_bytes()).await;
                return;
            }
            Act::Silent => {}
        }
    }
}

/// The usual answers of a pipelining upstream with SIZE 1000.
fn usual(line: &str) -> Act {
    match line.split(' ').next().unwrap_or("") {
        "EHLO" => Act::Reply("250-up.test\n250-PIPELINING\n250-SIZE 1000\n250 8BITMIME"),
        "DATA" => Act::Reply("354 go ahead"),
        "." => Act::Reply("250 2.0.0 queued as 1"),
        "QUIT" => Act::ReplyThenClose("221 bye"),
        _ => Act::Reply("250 2.0.0 ok"),
    }
}

fn upstream(port: u16, tls: UpstreamTls) -> Upstream {
    Upstream {
        name: "up".into(),
        address: format!("127.0.0.1:{port}"),
        tls,
        ca: None,
        tls_name: None,
        domains: Vec::new(),
        auth_user: None,
        auth_password_file: None,
        auth_password: None,
        max_connections: 2,
        connect_timeout: Duration::from_secs(5),
        timeout: Duration::from_secs(5),
        backoff: Duration::from_secs(30),
        sign: false,
    }
}

fn upstream_rt(config: &Upstream) -> UpstreamRt {
    let book = Arc::new(CapabilityBook::load(std::slice::from_ref(config), None));
    UpstreamRt::new(
        0,
        config,
        book,
        Arc::new(crate::observe::Telemetry::new("relay.test")),
    )
    .unwrap()
}

struct AlwaysSend;

impl DotGate for AlwaysSend {
    fn allow(&mut self) -> bool {
        true
    }
}

/// Send a small message from `a@example.org` to `rcpts` on `conn`.
async fn send(conn: &mut UpstreamConnection, rcpts: &[&str]) -> Result<Sent, ClientError> {
    send_sized(conn, rcpts, 30).await
}

async fn send_sized(
    conn: &mut UpstreamConnection,
    rcpts: &[&str],
    size: u64,
) -> Result<Sent, ClientError> {
    let from = ReversePath::Address(Address::parse("a@example.org").unwrap());
    let params = MailParams::default();
    let addresses: Vec<Address> = rcpts.iter().map(|r| Address::parse(r).unwrap()).collect();
    let rcpts: Vec<&Address> = addresses.iter().collect();
    let tx = MailTransaction {
        from: &from,
        params: &params,
        rcpts: &rcpts,
        size,
    };
    let message = b"Subject: test\r\n\r\nhello\r\n".to_vec();
    let mut source = MessageSource::Memory(Arc::new(message));
    conn.send(&tx, &mut source, &mut AlwaysSend).await
}

async fn open(port: u16) -> Result<UpstreamConnection, ClientError> {
    UpstreamConnection::open(&upstream(port, UpstreamTls::None), None, "relay.test", true).await
}

#[tokio::test]
async fn a_refused_recipient_carries_the_upstreams_multi_line_reply_to_its_dsn_diagnostic() {
    let (port, _) = responder(|_, line| match line {
        "RCPT TO:<nobody@example.com>" => {
            Act::Reply("550-5.1.1 <nobody@example.com>: no such user\n550 5.1.1 see the directory")
        }
        "RCPT TO:<later@example.com>" => Act::Reply("450 4.2.1 mailbox busy"),
        _ => usual(line),
    })
    .await;
    let mut conn = open(port).await.unwrap();
    let rcpts = ["b@example.com", "nobody@example.com", "later@example.com"];
    let sent = send(&mut conn, &rcpts).await.unwrap();
    let refusal = UpstreamReply {
        code: 550,
        lines: vec![
            "5.1.1 <nobody@example.com>: no such user".into(),
            "5.1.1 see the directory".into(),
        ],
    };
    assert!(matches!(&sent.rcpts[0], RcptOutcome::Delivered(r) if r.code == 250));
    let RcptOutcome::Failed(rejection) = &sent.rcpts[1] else {
        panic!("{:?}", sent.rcpts[1]);
    };
    assert_eq!(
        rejection,
        &Rejection::Reply {
            stage: UpstreamStage::Rcpt,
            reply: refusal.clone()
        }
    );
    assert_eq!(rejection.status(), "5.1.1");
    assert!(rejection.is_remote());
    assert_eq!(rejection.diagnostic(), Diagnostic::Smtp(refusal));
    let RcptOutcome::Deferred(deferral) = &sent.rcpts[2] else {
        panic!("{:?}", sent.rcpts[2]);
    };
    assert_eq!(deferral.to_string(), "RCPT: 450 4.2.1 mailbox busy");
    assert!(conn.reusable);
}

#[tokio::test]
async fn a_message_the_upstream_cannot_carry_fails_with_our_reason_before_anything_is_sent() {
    let (port, seen) = responder(|_, line| usual(line)).await;
    let mut conn = open(port).await.unwrap();
    let sent = send_sized(&mut conn, &["b@example.com"], 5000)
        .await
        .unwrap();
    let RcptOutcome::Failed(rejection) = &sent.rcpts[0] else {
        panic!("{:?}", sent.rcpts[0]);
    };
    let why = Incapable::TooBig {
        size: 5000,
        limit: 1000,
    };
    assert_eq!(rejection, &Rejection::Incapable(why));
    assert_eq!(rejection.status(), "5.3.4");
    assert!(!rejection.is_remote());
    assert_eq!(rejection.diagnostic(), Diagnostic::Local(why.to_string()));
    assert_eq!(seen.lock().unwrap()[0], ["EHLO relay.test"]);
}

#[tokio::test]
async fn back_pressure_at_mail_fails_the_transaction_and_opens_the_breaker() {
    let (port, _) = responder(|_, line| match line {
        l if l.starts_with("MAIL") => Act::Reply("421 4.3.2 too busy"),
        _ => usual(line),
    })
    .await;
    let up = upstream_rt(&upstream(port, UpstreamTls::None));
    let pass = up.available(Instant::now()).unwrap();
    let mut lease = up.lease("relay.test").await.unwrap();
    let error = send(&mut lease.conn, &["b@example.com"]).await.unwrap_err();
    let ClientError::BackPressure { stage, reply } = &error else {
        panic!("not back-pressure: {error:?}");
    };
    assert_eq!((*stage, reply.code), (UpstreamStage::Mail, 421));
    assert_eq!(error.to_string(), "MAIL: 421 4.3.2 too busy");
    up.failed(Instant::now(), &error, pass);
    assert!(up.down().is_some());
    assert!(up.available(Instant::now()).is_none());
}

/// After an upstream restart every pooled connection is dead: the one found closed at its
/// RSET is stale, which leaves the breaker closed, and the retry runs on a new connection.
#[tokio::test]
async fn a_pooled_connection_closed_while_idle_is_stale_and_the_retry_gets_a_fresh_one() {
    let (port, seen) = responder(|n, line| match line {
        // The first connection closes after its first message, as at an upstream's idle
        // timeout.
        "." if n == 0 => Act::ReplyThenClose("250 2.0.0 queued as 1"),
        _ => usual(line),
    })
    .await;
    let up = upstream_rt(&upstream(port, UpstreamTls::None));
    let mut lease = up.lease("relay.test").await.unwrap();
    send(&mut lease.conn, &["b@example.com"]).await.unwrap();
    up.release(lease);

    let pass = up.available(Instant::now()).unwrap();
    let mut lease = up.lease("relay.test").await.unwrap();
    assert_eq!(lease.conn.transactions, 1, "not the pooled connection");
    let error = send(&mut lease.conn, &["c@example.com"]).await.unwrap_err();
    up.release(lease);
    let ClientError::Stale(inner) = &error else {
        panic!("not stale: {error:?}");
    };
    assert_eq!(inner.stage(), UpstreamStage::Rset);
    up.failed(Instant::now(), &error, pass);
    assert!(
        up.down().is_none(),
        "a stale connection tripped the breaker"
    );

    up.discard_idle();
    let mut lease = up.lease("relay.test").await.unwrap();
    assert_eq!(lease.conn.transactions, 0, "not a fresh connection");
    let sent = send(&mut lease.conn, &["c@example.com"]).await.unwrap();
    assert!(matches!(sent.rcpts[0], RcptOutcome::Delivered(_)));
    assert_eq!(seen.lock().unwrap().len(), 2);
}

fn starttls_then(line: &str, after_220: Act) -> Act {
    match line {
        l if l.starts_with("EHLO") => Act::Reply("250-up.test\n250 STARTTLS"),
        "STARTTLS" => after_220,
        _ => usual(line),
    }
}

#[tokio::test]
async fn a_failed_opportunistic_tls_handshake_is_retried_in_plaintext() {
    // The upstream says 220 to STARTTLS and then closes instead of a TLS handshake.
    let (port, seen) =
        responder(|_, line| starttls_then(line, Act::ReplyThenClose("220 2.0.0 go ahead"))).await;
    let config = upstream(port, UpstreamTls::Opportunistic);
    let tls = super::tls::client_tls(&config).unwrap();
    let error = UpstreamConnection::open(&config, tls.as_ref(), "relay.test", true)
        .await
        .err()
        .expect("the handshake cannot succeed");
    assert!(error.is_tls_handshake(), "{error:?}");
    assert!(error.to_string().starts_with("TLS handshake: "), "{error}");

    let up = upstream_rt(&config);
    let mut lease = up.lease("relay.test").await.unwrap();
    assert!(!lease.conn.tls);
    let sent = send(&mut lease.conn, &["b@example.com"]).await.unwrap();
    assert!(matches!(sent.rcpts[0], RcptOutcome::Delivered(_)));
    let seen = seen.lock().unwrap();
    // The direct attempt, the lease's TLS attempt, then its plaintext retry.
    assert_eq!(seen.len(), 3);
    assert!(seen[1].contains(&"STARTTLS".to_owned()));
    assert!(!seen[2].contains(&"STARTTLS".to_owned()), "{:?}", seen[2]);
}

/// Bytes after the 220 to STARTTLS are an injection attempt, not a broken TLS stack: no
/// plaintext retry.
#[tokio::test]
async fn an_upstream_talking_before_the_tls_handshake_is_not_retried_in_plaintext() {
    let (port, seen) =
        responder(|_, line| starttls_then(line, Act::Reply("220 go ahead\n250 injected"))).await;
    let up = upstream_rt(&upstream(port, UpstreamTls::Opportunistic));
    let error = up.lease("relay.test").await.err().expect("refused");
    assert!(
        matches!(error, ClientError::Tls(TlsFailure::TalkedEarly)),
        "{error:?}"
    );
    assert!(!error.is_tls_handshake());
    assert_eq!(seen.lock().unwrap().len(), 1);
}

#[tokio::test]
async fn a_silent_upstream_times_out_at_the_stage_it_was_waiting_at() {
    let (port, _) = responder(|_, line| match line {
        l if l.starts_with("EHLO") => Act::Silent,
        _ => usual(line),
    })
    .await;
    let config = Upstream {
        timeout: Duration::from_millis(200),
        ..upstream(port, UpstreamTls::None)
    };
    let error = UpstreamConnection::open(&config, None, "relay.test", true)
        .await
        .err()
        .expect("no reply to EHLO");
    assert!(
        matches!(
            error,
            ClientError::Timeout {
                stage: UpstreamStage::Ehlo,
                wait: Wait::Reply,
                ..
            }
        ),
        "{error:?}"
    );
    assert_eq!(error.to_string(), "EHLO: no reply within 200ms");
}

#[tokio::test]
async fn a_garbled_reply_is_an_error_of_its_stage() {
    let (port, _) = responder(|_, line| match line {
        l if l.starts_with("EHLO") => Act::Reply("250-up.test\n251 PIPELINING"),
        _ => usual(line),
    })
    .await;
    let error = open(port).await.err().expect("garbled EHLO reply");
    assert!(
        matches!(
            error,
            ClientError::Garbled {
                stage: UpstreamStage::Ehlo,
                kind: GarbledReply::Inconsistent
            }
        ),
        "{error:?}"
    );
    assert!(error.is_upstream_fault());
}

/// An upstream on a loopback port that offers STARTTLS and then does a TLS handshake with the
/// self-signed certificate `cert` for 127.0.0.1, answering the EHLO after it.
async fn tls_responder(cert: &str, key: &str) -> u16 {
    use rustls_pki_types::pem::PemObject;
    use rustls_pki_types::{CertificateDer, PrivateKeyDer};
    use tokio_rustls::rustls::{ServerConfig, crypto::aws_lc_rs};

    let chain = vec![CertificateDer::from_pem_slice(cert.as_bytes()).unwrap()];
    let key = PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap();
    let config = ServerConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        let (mut tcp, _) = listener.accept().await.unwrap();
        let mut line = String::new();
        let script = [
            "220 up.test ESMTP\r\n",
            "250-up.test\r\n250 STARTTLS\r\n",
            "220 2.0.0 go ahead\r\n",
        ];
        for reply in script {
            tcp.write_all(reply.as_bytes()).await.unwrap();
            if !reply.starts_with("220 2") {
                read_line(&mut tcp, &mut line).await;
            }
        }
        let Ok(mut tls) = acceptor.accept(tcp).await else {
            return;
        };
        read_line(&mut tls, &mut line).await;
        let _ = tls.write_all(b"250 up.test\r\n").await;
        read_line(&mut tls, &mut line).await;
    });
    port
}

/// Read up to and including the next LF, one octet at a time (nothing after it is consumed).
async fn read_line(io: &mut (impl tokio::io::AsyncRead + Unpin), line: &mut String) {
    use tokio::io::AsyncReadExt;
    line.clear();
    let mut byte = [0u8; 1];
    while io.read(&mut byte).await.unwrap_or(0) == 1 {
        line.push(char::from(byte[0]));
        if byte[0] == b'\n' {
            return;
        }
    }
}

fn write_ca(dir: &std::path::Path, pem: &str) -> std::path::PathBuf {
    let path = dir.join("ca.pem");
    std::fs::write(&path, pem).unwrap();
    path
}

/// `tls = "required"`: the upstream's certificate is verified against `ca`; one signed by
/// another key fails as a certificate error, and is never retried in plaintext.
#[tokio::test]
async fn required_tls_verifies_the_certificate_and_a_wrong_one_is_a_certificate_error() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = crate::inbound::tls::generate_self_signed("127.0.0.1").unwrap();
    let (other, _) = crate::inbound::tls::generate_self_signed("127.0.0.1").unwrap();

    let port = tls_responder(&cert, &key).await;
    let config = Upstream {
        ca: Some(write_ca(dir.path(), &cert)),
        ..upstream(port, UpstreamTls::Required)
    };
    let up = upstream_rt(&config);
    let lease = up.lease("relay.test").await.unwrap();
    assert!(lease.conn.tls);

    let port = tls_responder(&cert, &key).await;
    let config = Upstream {
        ca: Some(write_ca(dir.path(), &other)),
        ..upstream(port, UpstreamTls::Required)
    };
    let up = upstream_rt(&config);
    let error = up
        .lease("relay.test")
        .await
        .err()
        .expect("a wrong certificate");
    assert!(
        matches!(error, ClientError::Tls(TlsFailure::Certificate(_))),
        "{error:?}"
    );
    assert!(error.is_upstream_fault());
}

/// An unreadable spool file is our problem, not the upstream's: the breaker stays closed.
#[test]
fn a_spool_error_leaves_the_breaker_closed() {
    let up = upstream_rt(&upstream(9, UpstreamTls::None));
    let pass = up.available(Instant::now()).unwrap();
    let gone = crate::queue::SpoolError::NotFound(crate::envelope::QueueId::generate());
    let error = ClientError::Spool(gone);
    assert!(
        error
            .to_string()
            .starts_with("DATA: reading the spool file: ")
    );
    up.failed(Instant::now(), &error, pass);
    assert!(up.down().is_none());
    assert!(up.available(Instant::now()).is_some());
}
