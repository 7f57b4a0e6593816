//! The real session driver over an in-memory pipe (`tokio::io::duplex`), with paused time
//! and a spool in a temporary directory: what the driver answers, in what order, and when.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch};
use tokio::task::JoinHandle;
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

use std::future::Future;
use std::task::Poll;

use super::Runtime;
use super::connection::{SessionDriver, Shared};
use super::effects::Effects;
use super::verifier::Verifier;
use crate::config::Config;
use crate::observe::kept::KeptEvents;
use crate::policy::limits::RateLimit;
use crate::policy::lockout::{AuthAttempt, GateDecision};
use crate::policy::stage::{Check, Evaluation, Input, Lookup, StageFacts};
use crate::policy::store::RateKey;
use crate::policy::{Policy, SessionFacts};
use crate::queue::Committed;
use crate::queue::Spool;
use crate::routes::{CapabilityBook, RouteCapabilities};
use crate::smtp::{Reply, reply};

/// The client's end of the pipe, plain or TLS.
trait ClientIo: AsyncRead + AsyncWrite + Unpin + Send {}

impl<S: AsyncRead + AsyncWrite + Unpin + Send> ClientIo for S {}

/// The client address every session comes from.
const PEER: &str = "192.0.2.1:40000";

/// What sessions share, with the ends of its channels the relay would hold.
struct Parts {
    shared: Shared,
    queued: mpsc::UnboundedReceiver<Committed>,
    stress: watch::Sender<bool>,
    /// Every event the sessions recorded, in order.
    events: KeptEvents,
}

impl Parts {
    /// A spool under `dir`, one verifier thread, no stress; containment of its own unless
    /// `containment` is given (sessions sharing suspensions).
    fn new(
        dir: &std::path::Path,
        runtime: &Runtime,
        containment: Option<Arc<crate::policy::containment::Containment>>,
    ) -> Parts {
        let book = CapabilityBook::load(&runtime.config.upstreams, None);
        let (stress, stress_rx) = watch::channel(false);
        let (queued_tx, queued) = mpsc::unbounded_channel();
        let events = KeptEvents::default();
        let telemetry =
            crate::observe::Telemetry::new("relay.test").with_journal(Box::new(events.clone()));
        let spool = Spool::open(&dir.join("spool")).unwrap();
        let telemetry = Arc::new(telemetry);
        let containment = containment.unwrap_or_else(|| {
            Arc::new(
                crate::policy::containment::Containment::open(
                    spool.clone(),
                    telemetry.clone(),
                    None,
                )
                .unwrap(),
            )
        });
        let shared = Shared {
            spool,
            shutdown: CancellationToken::new(),
            verifier: Arc::new(Verifier::start(1, 4).unwrap()),
            queued: queued_tx,
            capabilities: RouteCapabilities::new(Arc::new(book)),
            stress: stress_rx,
            verifications: Arc::new(tokio::sync::Semaphore::new(2)),
            telemetry,
            containment,
            cluster: None,
        };
        Parts {
            shared,
            queued,
            stress,
            events,
        }
    }
}

/// One session of the real driver, and the client's end of its pipe.
struct Harness {
    io: Box<dyn ClientIo>,
    runtime: Arc<Runtime>,
    shutdown: CancellationToken,
    verifier: Arc<Verifier>,
    /// The message verification slots the session shares.
    verifications: Arc<tokio::sync::Semaphore>,
    queued: mpsc::UnboundedReceiver<Committed>,
    session: JoinHandle<()>,
    _stress: watch::Sender<bool>,
    dir: tempfile::TempDir,
    /// What the session records: metrics, flow, and (in `events`) the journal.
    telemetry: Arc<crate::observe::Telemetry>,
    /// The suspended logins and trigger counters the session uses.
    containment: Arc<crate::policy::containment::Containment>,
    events: KeptEvents,
}

/// The runtime for a policy file made of a minimal relay and `more` (extra tables and keys,
/// appended; `listener` is added to the one listener's table). `{dir}` in either stands for
/// the temporary directory.
fn runtime(dir: &std::path::Path, listener: &str, more: &str) -> Runtime {
    let dir = dir.display().to_string();
    let text = format!(
        "[server]\nhostname = \"relay.test\"\n[[listeners]]\nname = \"mx\"\n\
         bind = \"127.0.0.1:2525\"\n{listener}\n[relay]\naccepted_domains = [\"example.com\"]\n\
         [[upstreams]]\naddress = \"127.0.0.1:25\"\n{more}\n"
    )
    .replace("{dir}", &dir);
    let config = Config::from_toml(&text, None).expect("valid test policy");
    let tls = config
        .tls
        .as_ref()
        .map(|t| super::tls::server_config(t, &config.server.hostname).expect("test certificate"));
    Runtime {
        policy: Policy::new(&config, None, std::time::Instant::now()),
        config: Arc::new(config),
        tls,
        resolver: Some(loopback_resolver()),
    }
}

/// A resolver whose one name server is a loopback port nobody serves: every answer a test
/// needs is pre-filled in its caches, and anything else fails at once (never a query
/// leaving the machine).
fn loopback_resolver() -> crate::dns::Resolver {
    let dns = crate::config::Dns {
        nameservers: vec!["127.0.0.1:9".parse().unwrap()],
        timeout: Duration::from_secs(1),
    };
    crate::dns::Resolver::new(&dns).expect("a resolver over loopback")
}

impl Harness {
    /// Start a session under the policy of [`runtime`].
    fn start(listener: &str, more: &str) -> Harness {
        let dir = tempfile::tempdir().unwrap();
        if more.contains("{dir}/users.toml") {
            write_users(dir.path());
        }
        if listener.contains("starttls") {
            super::tls::write_cert_files(dir.path(), "localhost").unwrap();
        }
        let runtime = Arc::new(runtime(dir.path(), listener, more));
        Harness::with_runtime(dir, runtime)
    }

    fn with_runtime(dir: tempfile::TempDir, runtime: Arc<Runtime>) -> Harness {
        Harness::sharing(dir, runtime, None)
    }

    /// [`Harness::with_runtime`], with `containment` shared with other sessions.
    fn sharing(
        dir: tempfile::TempDir,
        runtime: Arc<Runtime>,
        containment: Option<Arc<crate::policy::containment::Containment>>,
    ) -> Harness {
        let parts = Parts::new(dir.path(), &runtime, containment);
        let (client, server) = tokio::io::duplex(64 * 1024);
        let listener = runtime.config.listeners[0].clone();
        let peer: SocketAddr = PEER.parse().unwrap();
        let driver_runtime = Arc::clone(&runtime);
        let shared = parts.shared.clone();
        let session = tokio::spawn(async move {
            let mut driver = SessionDriver::new(driver_runtime, listener, Arc::new(shared), peer);
            driver.run(server).await;
        });
        Harness::assemble(dir, runtime, parts, Box::new(client), session)
    }

    /// The harness of the session task `session` over `parts`, the client's end of its pipe
    /// being `io`.
    fn assemble(
        dir: tempfile::TempDir,
        runtime: Arc<Runtime>,
        parts: Parts,
        io: Box<dyn ClientIo>,
        session: JoinHandle<()>,
    ) -> Harness {
        Harness {
            io,
            runtime,
            shutdown: parts.shared.shutdown,
            verifier: parts.shared.verifier,
            verifications: parts.shared.verifications,
            queued: parts.queued,
            session,
            _stress: parts.stress,
            dir,
            telemetry: parts.shared.telemetry,
            containment: parts.shared.containment,
            events: parts.events,
        }
    }

    /// The next complete reply (every line up to the one with a space after the code).
    async fn reply(&mut self) -> String {
        let mut text = Vec::new();
        loop {
            let mut octet = [0u8; 1];
            if self.io.read(&mut octet).await.unwrap() == 0 {
                break;
            }
            text.push(octet[0]);
            let line_start = text[..text.len() - 1]
                .iter()
                .rposition(|&b| b == b'\n')
                .map_or(0, |i| i + 1);
            let line = &text[line_start..];
            if line.ends_with(b"\r\n") && line.get(3) == Some(&b' ') {
                break;
            }
        }
        String::from_utf8(text).unwrap()
    }

    async fn send(&mut self, line: &str) {
        self.io
            .write_all(format!("{line}\r\n").as_bytes())
            .await
            .unwrap();
    }

    async fn cmd(&mut self, line: &str) -> String {
        self.send(line).await;
        self.reply().await
    }

    /// Greeting, EHLO, MAIL and one accepted recipient, then DATA accepted: the client is
    /// ready to send the message.
    async fn ready_for_data(&mut self) {
        self.reply().await;
        self.cmd("EHLO client.test").await;
        self.cmd("MAIL FROM:<a@sender.test>").await;
        assert!(
            self.cmd("RCPT TO:<u@example.com>")
                .await
                .starts_with("250 ")
        );
        assert!(self.cmd("DATA").await.starts_with("354 "));
    }

    /// STARTTLS, trusting the certificate [`Harness::start`] wrote.
    async fn starttls(&mut self) {
        assert!(self.cmd("STARTTLS").await.starts_with("220 "));
        self.tls_handshake().await;
    }

    /// The client's TLS handshake, trusting the certificate in the test's directory.
    async fn tls_handshake(&mut self) {
        let pem = std::fs::read(self.dir.path().join("cert.pem")).unwrap();
        let mut roots = rustls::RootCertStore::empty();
        use rustls::pki_types::pem::PemObject;
        roots
            .add(rustls::pki_types::CertificateDer::from_pem_slice(&pem).unwrap())
            .unwrap();
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth();
        let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
        let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
        let plain = std::mem::replace(&mut self.io, Box::new(tokio::io::empty()));
        self.io = Box::new(connector.connect(name, plain).await.unwrap());
    }

    /// Everything until the driver closes the connection, then wait for the session's end.
    async fn until_closed(&mut self) -> String {
        let mut rest = Vec::new();
        let _ = self.io.read_to_end(&mut rest).await;
        (&mut self.session).await.unwrap();
        String::from_utf8(rest).unwrap()
    }
}

/// `users.toml` with the one user `alice`.
fn write_users(dir: &std::path::Path) {
    let hash = crate::policy::credentials::DUMMY_HASH;
    let users = format!("[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\n");
    std::fs::write(dir.join("users.toml"), users).unwrap();
}

/// A reply as the client reads it off the wire.
fn wire(r: &Reply) -> String {
    let mut out = Vec::new();
    r.write_to(&mut out);
    String::from_utf8(out).unwrap()
}

const NO_TLS: &str = "tls = \"none\"";

#[tokio::test(start_paused = true)]
async fn the_greeting_names_the_host_and_ehlo_is_answered() {
    let mut h = Harness::start(NO_TLS, "");
    let greeting = h.reply().await;
    assert!(greeting.starts_with("220 relay.test "), "{greeting}");
    let ehlo = h.cmd("EHLO client.test").await;
    assert!(ehlo.starts_with("250-relay.test"), "{ehlo}");
    assert_eq!(h.cmd("QUIT").await.get(..3), Some("221"));
    h.until_closed().await;
}

#[tokio::test(start_paused = true)]
async fn a_relay_attempt_gets_the_relay_denied_reply_and_nothing_is_queued() {
    let mut h = Harness::start(NO_TLS, "");
    h.reply().await;
    h.cmd("EHLO client.test").await;
    assert!(h.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250 "));
    assert_eq!(
        h.cmd("RCPT TO:<u@other.test>").await,
        wire(&reply::RELAY_DENIED)
    );
    // The transaction has no recipient: DATA is refused and nothing reaches the queue.
    assert!(h.cmd("DATA").await.starts_with("554 "));
    h.cmd("QUIT").await;
    h.until_closed().await;
    assert!(h.queued.try_recv().is_err());
}

#[tokio::test(start_paused = true)]
async fn a_message_for_an_accepted_domain_is_queued_and_announced() {
    let mut h = Harness::start(NO_TLS, "");
    h.ready_for_data().await;
    let queued = h.cmd("Subject: hi\r\n\r\nbody\r\n.").await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let announced = h.queued.recv().await.expect("delivery is told");
    assert!(queued.contains(announced.id.as_str()));
    h.cmd("QUIT").await;
    h.until_closed().await;
}

#[tokio::test(start_paused = true)]
async fn a_message_over_the_hop_limit_is_refused_after_the_final_dot_and_nothing_is_queued() {
    let mut h = Harness::start(NO_TLS, "[limits]\nhop_limit = 1\n");
    h.ready_for_data().await;
    let looped = "Received: from a\r\nReceived: from b\r\nSubject: hi\r\n\r\nbody\r\n.";
    assert_eq!(h.cmd(looped).await, wire(&reply::TOO_MANY_HOPS));
    h.cmd("QUIT").await;
    h.until_closed().await;
    assert!(h.queued.try_recv().is_err());
    // Neither committed nor left behind: the refused message's file went with it.
    for dir in ["spool/queue", "spool/tmp"] {
        let files = std::fs::read_dir(h.dir.path().join(dir)).unwrap().count();
        assert_eq!(files, 0, "{dir}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_locked_out_client_is_refused_before_any_password_is_verified() {
    let mut h = Harness::start(
        "tls = \"starttls\"\nauth = \"optional\"",
        "[tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n\
         [auth]\nusers_file = \"{dir}/users.toml\"\nmax_failures = 1\n",
    );
    // One failure from this client (recorded as the verifier would) locks it out.
    let ip = PEER.parse::<SocketAddr>().unwrap().ip();
    let now = tokio::time::Instant::now().into_std();
    let GateDecision::Proceed(attempt) = h.runtime.policy.store().auth_gate(ip, "alice", now)
    else {
        panic!("a fresh client is let through");
    };
    assert_eq!(attempt.settle(false, now).locked_out, Some(1));
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.starttls().await;
    h.cmd("EHLO client.test").await;
    // The right password, and still the lockout reply: nothing was verified.
    let auth = h.cmd("AUTH PLAIN AGFsaWNlAHNlY3JldA==").await;
    assert_eq!(auth, wire(&reply::AUTH_LOCKED_OUT));
    assert_eq!(h.verifier.verified(), 0);
    assert!(h.cmd("QUIT").await.starts_with("221 "));
}

#[tokio::test(start_paused = true)]
async fn an_idle_client_is_told_421_at_the_command_timeout_without_real_waiting() {
    let mut h = Harness::start(NO_TLS, "[limits]\ncommand_timeout = \"5m\"\n");
    h.reply().await;
    let started = tokio::time::Instant::now();
    assert_eq!(h.reply().await, wire(&reply::TIMEOUT));
    assert_eq!(started.elapsed().as_secs(), 300);
    h.until_closed().await;
}

#[tokio::test(start_paused = true)]
async fn a_busy_session_is_closed_with_421_at_its_time_limit() {
    let mut h = Harness::start(
        NO_TLS,
        "[limits]\ncommand_timeout = \"5m\"\nsession_timeout = \"10m\"\n",
    );
    h.reply().await;
    let started = tokio::time::Instant::now();
    // A command every four minutes never meets the command timeout…
    for _ in 0..2 {
        tokio::time::sleep(Duration::from_secs(240)).await;
        assert!(h.cmd("NOOP").await.starts_with("250 "));
    }
    // …and the session's time limit ends it while it waits for the third.
    assert_eq!(h.reply().await, wire(&reply::SESSION_TOO_LONG));
    assert_eq!(started.elapsed().as_secs(), 600);
    h.until_closed().await;
}

#[tokio::test(start_paused = true)]
async fn a_client_that_talks_before_the_greeting_is_refused() {
    let mut h = Harness::start(NO_TLS, "[limits]\npregreet_wait = \"3s\"\n");
    h.send("EHLO early.test").await;
    assert_eq!(h.until_closed().await, wire(&reply::EARLY_TALKER));
}

#[tokio::test(start_paused = true)]
async fn a_patient_client_is_greeted_after_the_pregreet_wait() {
    let mut h = Harness::start(NO_TLS, "[limits]\npregreet_wait = \"3s\"\n");
    let started = tokio::time::Instant::now();
    assert!(h.reply().await.starts_with("220 "));
    assert_eq!(started.elapsed().as_secs(), 3);
}

#[tokio::test(start_paused = true)]
async fn shutdown_tells_an_idle_session_421_and_closes_it() {
    let mut h = Harness::start(NO_TLS, "");
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.shutdown.cancel();
    assert_eq!(h.until_closed().await, wire(&reply::SHUTTING_DOWN));
}

#[tokio::test(start_paused = true)]
async fn a_denied_client_is_refused_at_the_greeting_and_then_at_every_command() {
    let mut h = Harness::start("tls = \"none\"\ndeny = [\"192.0.2.0/24\"]", "");
    assert_eq!(h.reply().await, wire(&reply::ACCESS_DENIED));
    assert!(h.cmd("EHLO client.test").await.starts_with("503 5.7.1"));
    assert!(h.cmd("QUIT").await.starts_with("221 "));
}

#[tokio::test(start_paused = true)]
async fn a_client_over_its_connection_rate_gets_421_and_is_closed() {
    let mut h = Harness::start(NO_TLS, "[rate_limits]\nconnections_per_ip = \"1/hour\"\n");
    let first = h.reply().await;
    assert!(first.starts_with("220 "), "{first}");
    // A second session of the same runtime, from the same address.
    let dir = tempfile::tempdir().unwrap();
    let mut again = Harness::with_runtime(dir, Arc::clone(&h.runtime));
    assert_eq!(again.until_closed().await, wire(&reply::CONNECTION_RATE));
}

#[tokio::test(start_paused = true)]
async fn a_client_over_its_connection_rate_that_does_not_read_is_closed_after_the_refusal_timeout()
{
    let dir = tempfile::tempdir().unwrap();
    let more =
        "[rate_limits]\nconnections_per_ip = \"1/hour\"\n[limits]\ncommand_timeout = \"5m\"\n";
    let runtime = Arc::new(runtime(dir.path(), NO_TLS, more));
    let parts = Parts::new(dir.path(), &runtime, None);
    let peer: SocketAddr = PEER.parse().unwrap();
    // An earlier connection spent the budget.
    let now = tokio::time::Instant::now().into_std();
    let (limit, key) = (RateLimit::ConnectionsPerIp, RateKey::Client(peer.ip()));
    assert!(runtime.policy.store().take(limit, &key, now).is_ok());
    let listener = runtime.config.listeners[0].clone();
    let mut driver =
        SessionDriver::new(Arc::clone(&runtime), listener, Arc::new(parts.shared), peer);
    // This one's pipe holds less than the `421`, and the client never reads.
    let (mut client, server) = tokio::io::duplex(8);
    let started = tokio::time::Instant::now();
    driver.run(server).await;
    assert_eq!(started.elapsed(), super::listener::REFUSAL_WRITE_TIMEOUT);
    let mut head = [0u8; 3];
    client.read_exact(&mut head).await.unwrap();
    assert_eq!(&head, b"421");
}

/// The AUTH stage of a client whose one verification in flight (`in_flight`) is still
/// unsettled, under `max_failures = 1`: it waits. `end` ends that attempt once the stage is
/// waiting; the stage's rule and how long it waited.
async fn auth_held_back_by(end: impl FnOnce(AuthAttempt)) -> (&'static str, Duration) {
    let dir = tempfile::tempdir().unwrap();
    write_users(dir.path());
    let more = "[auth]\nusers_file = \"{dir}/users.toml\"\nmax_failures = 1\n";
    let runtime = runtime(dir.path(), "tls = \"none\"\nauth = \"optional\"", more);
    let parts = Parts::new(dir.path(), &runtime, None);
    let ip = PEER.parse::<SocketAddr>().unwrap().ip();
    let now = tokio::time::Instant::now().into_std();
    let GateDecision::Proceed(in_flight) = runtime.policy.store().auth_gate(ip, "alice", now)
    else {
        panic!("a fresh client is let through");
    };
    let facts = StageFacts {
        session: SessionFacts {
            client_ip: ip,
            user: None,
        },
        listener: &runtime.config.listeners[0],
        input: Input::Auth {
            login: "alice",
            password: "secret",
        },
    };
    let mut effects = Effects::default();
    let started = tokio::time::Instant::now();
    let decide = effects.decide(&runtime, &parts.shared, &facts);
    tokio::pin!(decide);
    // One poll: the gate says the budget is in flight and the stage waits.
    let first = std::future::poll_fn(|cx| Poll::Ready(decide.as_mut().poll(cx))).await;
    assert!(first.is_pending());
    end(in_flight);
    let refusal = decide.await.expect_err("refused");
    (refusal.rule, started.elapsed())
}

#[tokio::test(start_paused = true)]
async fn an_auth_waiting_for_an_attempt_in_flight_is_woken_when_it_is_settled() {
    let settle = |attempt: AuthAttempt| {
        attempt.settle(false, tokio::time::Instant::now().into_std());
    };
    // Woken at once (no polling interval, no timeout) and finds the client locked out.
    assert_eq!(
        auth_held_back_by(settle).await,
        ("auth_lockout", Duration::ZERO)
    );
}

#[tokio::test(start_paused = true)]
async fn an_auth_waiting_for_an_attempt_in_flight_is_woken_when_it_is_dropped() {
    // An attempt dropped without a result counts as a failure, and wakes the waiters too.
    assert_eq!(
        auth_held_back_by(drop).await,
        ("auth_lockout", Duration::ZERO)
    );
}

#[tokio::test(start_paused = true)]
async fn an_auth_whose_client_stays_busy_gets_454_after_auth_wait() {
    let mut kept = None;
    let (rule, waited) = auth_held_back_by(|attempt| kept = Some(attempt)).await;
    assert_eq!((rule, waited), ("auth_busy", super::effects::AUTH_WAIT));
}

#[tokio::test(start_paused = true)]
async fn a_lookup_started_at_connect_is_read_at_rcpt_from_the_sessions_pending_effects() {
    const AT_CONNECT: &[Check] = &[Check::Start(Lookup::Echo(7))];
    const AT_RCPT: &[Check] = &[Check::Await(Lookup::Echo(7))];
    let dir = tempfile::tempdir().unwrap();
    let runtime = runtime(dir.path(), NO_TLS, "");
    let parts = Parts::new(dir.path(), &runtime, None);
    let facts = StageFacts {
        session: SessionFacts {
            client_ip: PEER.parse::<SocketAddr>().unwrap().ip(),
            user: None,
        },
        listener: &runtime.config.listeners[0],
        input: Input::Connect,
    };
    let mut effects = Effects::default();
    let shared = &parts.shared;
    let connect = effects.decide_with(Evaluation::of(AT_CONNECT), &runtime, shared, &facts);
    assert_eq!(connect.await, Ok(()));
    assert_eq!(effects.pending_lookups(), 1);
    let rcpt = effects.decide_with(Evaluation::of(AT_RCPT), &runtime, shared, &facts);
    assert_eq!(rcpt.await, Ok(()));
    assert_eq!(effects.pending_lookups(), 0);
}

/// A session under the policy of [`runtime`] with `change` made to the compiled
/// configuration (the mail-authentication sections), over [`loopback_resolver`] whose caches
/// `records` pre-fills.
fn start_checked(
    change: impl FnOnce(&mut Config),
    records: impl FnOnce(&crate::dns::cache::Caches),
) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let base = runtime(dir.path(), NO_TLS, "");
    let mut config = (*base.config).clone();
    change(&mut config);
    let resolver = loopback_resolver();
    records(resolver.caches());
    client_records(resolver.caches());
    let runtime = Runtime {
        policy: Policy::new(&config, None, std::time::Instant::now()),
        config: Arc::new(config),
        tls: None,
        resolver: Some(resolver),
    };
    Harness::with_runtime(dir, Arc::new(runtime))
}

fn later() -> std::time::Instant {
    std::time::Instant::now() + Duration::from_secs(3600)
}

/// The client's PTR and A records (iprev passes), and `sender.test`'s SPF record, which
/// authorises nobody.
fn client_records(caches: &crate::dns::cache::Caches) {
    let ip = PEER.parse::<SocketAddr>().unwrap().ip();
    caches.add_ptr(ip, vec!["client.test."], later());
    caches.add_ipv4("client.test", vec!["192.0.2.1".parse().unwrap()], later());
    caches.add_txt::<mail_auth::spf::Spf>("sender.test", b"v=spf1 -all", later());
}

/// `_dmarc.DOMAIN` publishing `record`.
fn dmarc_record(caches: &crate::dns::cache::Caches, domain: &str, record: &str) {
    let name = format!("_dmarc.{domain}");
    caches.add_txt::<mail_auth::dmarc::Dmarc>(&name, record.as_bytes(), later());
    // The DMARC tree walk (RFC 9989 §4.10) asks every parent up to the top-level domain.
    let mut parent = domain;
    while let Some((_, rest)) = parent.split_once('.') {
        caches.add_no_txt(&format!("_dmarc.{rest}"), later());
        parent = rest;
    }
}

impl Harness {
    /// The committed message `id`'s bytes as queued.
    fn queued_message(&self, id: &crate::envelope::QueueId) -> String {
        let spool = Spool::open_existing(&self.dir.path().join("spool")).unwrap();
        String::from_utf8(spool.read_message(id).unwrap()).unwrap()
    }

    /// Nothing was queued and no spool file is left behind.
    fn nothing_queued(&mut self) {
        assert!(self.queued.try_recv().is_err());
        for dir in ["spool/queue", "spool/tmp"] {
            let files = std::fs::read_dir(self.dir.path().join(dir))
                .unwrap()
                .count();
            assert_eq!(files, 0, "{dir}");
        }
    }
}

#[tokio::test(start_paused = true)]
async fn an_spf_fail_is_refused_at_mail_under_enforce_and_the_transaction_never_starts() {
    let mut h = start_checked(|c| c.spf.verify = crate::config::Verify::Enforce, |_| {});
    h.reply().await;
    h.cmd("EHLO client.test").await;
    let mail = h.cmd("MAIL FROM:<a@sender.test>").await;
    assert!(mail.starts_with("550 5.7.23 "), "{mail}");
    assert!(h.cmd("RCPT TO:<u@example.com>").await.starts_with("503 "));
    h.cmd("QUIT").await;
    h.until_closed().await;
    h.nothing_queued();
}

#[tokio::test(start_paused = true)]
async fn a_listed_client_is_refused_at_every_rcpt_but_postmaster() {
    let zones = |c: &mut Config| {
        c.dnsbl.zones = vec![crate::config::DnsblZone {
            zone: "key.bl.test".into(),
            name: "bl.test".into(),
            weight: 1,
            answers: None,
        }];
    };
    let listed = |caches: &crate::dns::cache::Caches| {
        let name = "1.2.0.192.key.bl.test";
        caches.add_ipv4(name, vec!["127.0.0.2".parse().unwrap()], later());
    };
    let mut h = start_checked(zones, listed);
    h.reply().await;
    h.cmd("EHLO client.test").await;
    assert!(h.cmd("MAIL FROM:<a@sender.test>").await.starts_with("250 "));
    let blocked = "550 5.7.1 Service unavailable; client [192.0.2.1] blocked using bl.test\r\n";
    assert_eq!(h.cmd("RCPT TO:<u@example.com>").await, blocked);
    assert_eq!(h.cmd("RCPT TO:<v@example.com>").await, blocked);
    assert!(
        h.cmd("RCPT TO:<postmaster@example.com>")
            .await
            .starts_with("250 ")
    );
    h.cmd("QUIT").await;
    h.until_closed().await;
}

/// A DMARC-enforcing session sending `From: x@FROM_DOMAIN` with a body: the reply to the
/// final dot.
async fn dmarc_enforced(h: &mut Harness, from_domain: &str) -> String {
    h.ready_for_data().await;
    let message = format!(
        "From: x@{from_domain}\r\nX-Portcullis-Quarantine: forged\r\nSubject: hi\r\n\r\nbody\r\n."
    );
    h.cmd(&message).await
}

fn dmarc_enforce(c: &mut Config) {
    c.dmarc.verify = crate::config::Verify::Enforce;
}

#[tokio::test(start_paused = true)]
async fn dmarc_reject_refuses_the_message_after_the_final_dot_and_nothing_is_queued() {
    let records = |caches: &crate::dns::cache::Caches| {
        dmarc_record(caches, "spoof.test", "v=DMARC1; p=reject");
    };
    let mut h = start_checked(dmarc_enforce, records);
    assert_eq!(
        dmarc_enforced(&mut h, "spoof.test").await,
        wire(&reply::DMARC_REJECT)
    );
    h.cmd("QUIT").await;
    h.until_closed().await;
    h.nothing_queued();
}

#[tokio::test(start_paused = true)]
async fn dmarc_quarantine_is_queued_with_our_results_and_quarantine_field_above_received() {
    let records = |caches: &crate::dns::cache::Caches| {
        dmarc_record(caches, "quar.test", "v=DMARC1; p=quarantine");
    };
    let mut h = start_checked(dmarc_enforce, records);
    let queued = dmarc_enforced(&mut h, "quar.test").await;
    assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
    let committed = h.queued.recv().await.expect("delivery is told");
    let message = h.queued_message(&committed.id);
    assert!(
        message.starts_with("Authentication-Results: relay.test;"),
        "{message}"
    );
    let received = message.find("Received: ").expect("our Received:");
    let quarantine = message
        .find("X-Portcullis-Quarantine: dmarc\r\n")
        .unwrap_or_else(|| panic!("the quarantine field: {message}"));
    assert!(quarantine < received, "{message}");
    assert!(message.contains("dmarc=fail"), "{message}");
    assert!(message.contains("spf=fail"), "{message}");
    // The sender's own field of that name is removed.
    assert!(!message.contains("forged"), "{message}");
    h.cmd("QUIT").await;
    h.until_closed().await;
}

#[tokio::test(start_paused = true)]
async fn untrusted_mail_gets_one_authentication_results_field_from_us_and_trusted_none() {
    let record = |c: &mut Config| c.spf.verify = crate::config::Verify::Record;
    let mut h = start_checked(record, |_| {});
    h.ready_for_data().await;
    let queued = h
        .cmd("From: x@sender.test\r\nSubject: hi\r\n\r\nbody\r\n.")
        .await;
    assert!(queued.starts_with("250 "), "{queued}");
    let committed = h.queued.recv().await.unwrap();
    let message = h.queued_message(&committed.id);
    assert_eq!(
        message.matches("Authentication-Results:").count(),
        1,
        "{message}"
    );
    assert!(
        message.starts_with("Authentication-Results: relay.test;"),
        "{message}"
    );
    assert!(message.contains("smtp.mailfrom=a@sender.test"), "{message}");

    // From relay_networks: trusted, not checked, nothing added.
    let trusted = |c: &mut Config| {
        c.spf.verify = crate::config::Verify::Record;
        c.relay.relay_networks = vec!["192.0.2.0/24".parse().unwrap()];
    };
    let mut h = start_checked(trusted, |_| {});
    h.ready_for_data().await;
    h.cmd("From: x@sender.test\r\nSubject: hi\r\n\r\nbody\r\n.")
        .await;
    let committed = h.queued.recv().await.unwrap();
    let message = h.queued_message(&committed.id);
    assert!(message.starts_with("Received: "), "{message}");
}

/// A session from a `relay_networks` client, with an Ed25519 `[[dkim.sign]]` key for
/// example.com; the default route (`smarthost`) signs, example.com's (`exchange`) does not.
fn signing_session() -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let key = rcgen::KeyPair::generate_for(&rcgen::PKCS_ED25519).unwrap();
    std::fs::write(dir.path().join("dkim.pem"), key.serialize_pem()).unwrap();
    let more = "[[upstreams]]\nname = \"exchange\"\naddress = \"127.0.0.1:26\"\n\
                domains = [\"example.com\"]\n\
                [[dkim.sign]]\ndomain = \"example.com\"\nselector = \"s1\"\n\
                key = \"{dir}/dkim.pem\"\n";
    let base = runtime(dir.path(), NO_TLS, more);
    let mut config = (*base.config).clone();
    config.upstreams[0].sign = true;
    config.relay.relay_networks = vec!["192.0.2.0/24".parse().unwrap()];
    let runtime = Runtime {
        policy: Policy::new(&config, None, std::time::Instant::now()),
        config: Arc::new(config),
        tls: None,
        resolver: None,
    };
    Harness::with_runtime(dir, Arc::new(runtime))
}

/// Send one message from alice@example.com to `rcpt`: the queued bytes.
async fn signed_to(h: &mut Harness, rcpt: &str) -> String {
    h.reply().await;
    h.cmd("EHLO client.test").await;
    h.cmd("MAIL FROM:<alice@example.com>").await;
    let accepted = h.cmd(&format!("RCPT TO:<{rcpt}>")).await;
    assert!(accepted.starts_with("250 "), "{accepted}");
    assert!(h.cmd("DATA").await.starts_with("354 "));
    let queued = h
        .cmd("From: Alice <alice@example.com>\r\nTo: x\r\nSubject: hi\r\n\r\nbody\r\n.")
        .await;
    assert!(queued.starts_with("250 "), "{queued}");
    let committed = h.queued.recv().await.unwrap();
    h.queued_message(&committed.id)
}

#[tokio::test(start_paused = true)]
async fn trusted_mail_routed_to_a_signing_upstream_is_signed_once_before_queuing() {
    let mut h = signing_session();
    let message = signed_to(&mut h, "x@internet.test").await;
    assert!(message.starts_with("DKIM-Signature: "), "{message}");
    assert_eq!(message.matches("DKIM-Signature:").count(), 1, "{message}");
    assert!(message.contains("d=example.com"), "{message}");
    assert!(!message.contains("Authentication-Results:"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn trusted_mail_for_exchange_only_is_not_signed() {
    let mut h = signing_session();
    let message = signed_to(&mut h, "u@example.com").await;
    assert!(message.starts_with("Received: "), "{message}");
    assert!(!message.contains("DKIM-Signature:"), "{message}");
}

#[tokio::test(start_paused = true)]
async fn a_message_waits_for_a_verification_slot_at_most_the_data_timeout_then_gets_451() {
    let verify = |c: &mut Config| {
        c.dkim.verify = true;
        c.limits.data_timeout = Duration::from_secs(60);
    };
    let mut h = start_checked(verify, |_| {});
    // Every slot is taken by other sessions' verifications.
    let slots = Arc::clone(&h.verifications);
    let _taken = slots.acquire_many_owned(2).await.unwrap();
    h.ready_for_data().await;
    let started = tokio::time::Instant::now();
    let reply = h.cmd("From: x@sender.test\r\n\r\nbody\r\n.").await;
    assert_eq!(reply, wire(&reply::AUTHENTICATION_BUSY));
    assert_eq!(started.elapsed(), Duration::from_secs(60));
    h.cmd("QUIT").await;
    h.until_closed().await;
    h.nothing_queued();
}

#[tokio::test(start_paused = true)]
async fn a_dnsbl_server_that_never_answers_neither_delays_the_greeting_nor_refuses() {
    // A name server on loopback that reads nothing and answers nothing.
    let silent = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
    let dns = crate::config::Dns {
        nameservers: vec![silent.local_addr().unwrap()],
        timeout: Duration::from_secs(5),
    };
    let dir = tempfile::tempdir().unwrap();
    let base = runtime(dir.path(), NO_TLS, "");
    let mut config = (*base.config).clone();
    config.dnsbl.zones = vec![crate::config::DnsblZone {
        zone: "bl.test".into(),
        name: "bl.test".into(),
        weight: 1,
        answers: None,
    }];
    let runtime = Runtime {
        policy: Policy::new(&config, None, std::time::Instant::now()),
        config: Arc::new(config),
        tls: None,
        resolver: Some(crate::dns::Resolver::new(&dns).unwrap()),
    };
    let mut h = Harness::with_runtime(dir, Arc::new(runtime));
    let started = tokio::time::Instant::now();
    assert!(h.reply().await.starts_with("220 "));
    assert_eq!(
        started.elapsed(),
        Duration::ZERO,
        "the greeting never waits"
    );
    h.cmd("EHLO client.test").await;
    h.cmd("MAIL FROM:<a@sender.test>").await;
    // The lookup times out: not listed.
    assert!(h.cmd("RCPT TO:<u@example.com>").await.starts_with("250 "));
    let bound = dns.timeout * crate::dns::verify::CHECK_DEADLINE_QUERIES;
    assert!(started.elapsed() <= bound, "{:?}", started.elapsed());
    h.cmd("QUIT").await;
    h.until_closed().await;
    drop(silent);
}

mod cluster;
mod containment;
mod observe;
mod proxy;
