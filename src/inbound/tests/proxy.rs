//! Connections from a listener's `trusted_proxies`, admitted and served as the accept loop
//! does ([`Accepted::serve`]): the PROXY header read first, its client the session's peer for
//! every rule, the proxy counted only towards `max_connections`; and a PROXY line from
//! anyone else, an SMTP command like any other.

use super::*;
use crate::inbound::listener::{Accepted, from_proxy, take_slot};
use crate::inbound::pressure::{ConnectionCounter, Full};
use crate::inbound::proxy::HEADER_TIMEOUT;
use crate::observe::EventKind;

/// The proxy: [`PEER`]'s address, trusted by the listeners below.
const PROXY: &str = "192.0.2.1";

/// The client the proxies below forward.
const CLIENT: &str = "203.0.113.9";

/// A plain listener trusting [`PROXY`], with `more` in its table.
fn behind_proxy(more: &str) -> String {
    format!("{NO_TLS}\ntrusted_proxies = [\"{PROXY}\"]\n{more}")
}

/// A v1 header for `client` (`IP PORT`, IPv4 or IPv6).
fn v1(client: &str) -> Vec<u8> {
    let (ip, port) = client.rsplit_once(' ').unwrap();
    let family = if ip.contains(':') { "TCP6" } else { "TCP4" };
    let to = if ip.contains(':') {
        "2001:db8::25"
    } else {
        "192.0.2.25"
    };
    format!("PROXY {family} {ip} {to} {port} 25\r\n").into_bytes()
}

/// A v2 PROXY (`command` 1) or LOCAL (0) header for the TCP client `client`.
fn v2(command: u8, client: SocketAddr) -> Vec<u8> {
    let mut body = Vec::new();
    let family = match client.ip() {
        std::net::IpAddr::V4(ip) => {
            body.extend_from_slice(&ip.octets());
            body.extend_from_slice(&[192, 0, 2, 25]);
            0x11
        }
        std::net::IpAddr::V6(ip) => {
            body.extend_from_slice(&ip.octets());
            body.extend_from_slice(&[0; 16]);
            0x21
        }
    };
    body.extend_from_slice(&client.port().to_be_bytes());
    body.extend_from_slice(&25u16.to_be_bytes());
    let mut h = ppp::v2::PROTOCOL_PREFIX.to_vec();
    h.extend_from_slice(&[0x20 | command, family]);
    h.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
    h.extend_from_slice(&body);
    h
}

impl Harness {
    /// A connection from `peer` under `listener` and `more` (as [`runtime`] builds them),
    /// admitted into `counter` and served as the accept loop does.
    ///
    /// # Errors
    /// The connection cap that refused it at accept.
    fn accepted(
        listener: &str,
        more: &str,
        peer: &str,
        counter: &ConnectionCounter,
    ) -> Result<Harness, Full> {
        let dir = tempfile::tempdir().unwrap();
        if listener.contains("implicit") {
            super::super::tls::write_cert_files(dir.path(), "localhost").unwrap();
        }
        let runtime = runtime(dir.path(), listener, more);
        Harness::accepted_on(dir, runtime, peer, counter)
    }

    /// [`Harness::accepted`] under `runtime`, made in `dir`.
    fn accepted_on(
        dir: tempfile::TempDir,
        runtime: Runtime,
        peer: &str,
        counter: &ConnectionCounter,
    ) -> Result<Harness, Full> {
        let runtime = Arc::new(runtime);
        let parts = Parts::new(dir.path(), &runtime, None);
        let (client, server) = tokio::io::duplex(64 * 1024);
        let listener = runtime.config.listeners[0].clone();
        let peer: SocketAddr = format!("{peer}:40000").parse().unwrap();
        let proxied = from_proxy(&listener, peer.ip());
        let slot = take_slot(counter, &runtime.config.limits, peer.ip(), proxied)?;
        let accepted = Accepted {
            runtime: runtime.clone(),
            listener,
            shared: Arc::new(parts.shared.clone()),
            peer,
            slot,
        };
        let session = tokio::spawn(accepted.serve(server, proxied));
        Ok(Harness::assemble(
            dir,
            runtime,
            parts,
            Box::new(client),
            session,
        ))
    }

    /// [`Harness::accepted`] from [`PROXY`] under a listener trusting it, with a counter of
    /// its own, having sent `header`.
    async fn proxied(listener_more: &str, more: &str, header: &[u8]) -> Harness {
        let counter = ConnectionCounter::default();
        let mut h = Harness::accepted(&behind_proxy(listener_more), more, PROXY, &counter)
            .expect("admitted");
        h.io.write_all(header).await.unwrap();
        h
    }

    /// The clients of the events recorded so far, as text.
    fn event_clients(&self) -> Vec<String> {
        (self.events.all().iter())
            .map(|e| e.client.map(|c| c.to_string()).unwrap_or_default())
            .collect()
    }

    /// A message from `a@sender.test` to `to`, queued: its text as spooled.
    async fn queue_one(&mut self, to: &str) -> String {
        self.cmd("EHLO client.test").await;
        assert!(
            self.cmd("MAIL FROM:<a@sender.test>")
                .await
                .starts_with("250 ")
        );
        let rcpt = self.cmd(&format!("RCPT TO:<{to}>")).await;
        assert!(rcpt.starts_with("250 "), "{rcpt}");
        assert!(self.cmd("DATA").await.starts_with("354 "));
        let queued = self.cmd("Subject: hi\r\n\r\nbody\r\n.").await;
        assert!(queued.starts_with("250 2.0.0 Ok: queued as "), "{queued}");
        let committed = self.queued.recv().await.expect("delivery is told");
        self.queued_message(&committed.id)
    }
}

#[tokio::test(start_paused = true)]
async fn v1_and_v2_headers_make_their_client_the_peer_of_every_rule_and_record() {
    let cases: [(&str, Vec<u8>, &str); 4] = [
        ("v1 TCP4", v1("203.0.113.9 51000"), "203.0.113.9"),
        ("v1 TCP6", v1("2001:db8::9 51000"), "2001:db8::9"),
        (
            "v2 TCP4",
            v2(1, "203.0.113.9:51000".parse().unwrap()),
            "203.0.113.9",
        ),
        (
            "v2 TCP6",
            v2(1, "[2001:db8::9]:51000".parse().unwrap()),
            "2001:db8::9",
        ),
    ];
    for (what, header, client) in cases {
        let mut h = Harness::proxied("", "", &header).await;
        assert!(h.reply().await.starts_with("220 relay.test "), "{what}");
        let message = h.queue_one("u@example.com").await;
        let literal = if client.contains(':') {
            format!("IPv6:{client}")
        } else {
            client.to_owned()
        };
        let received = format!("Received: from client.test ([{literal}])\r\n");
        assert!(message.starts_with(&received), "{what}: {message}");
        h.cmd("QUIT").await;
        h.until_closed().await;
        // Connect and queued, both the client's: the proxy's address is nowhere.
        assert_eq!(h.event_clients(), [client, client], "{what}");
        let kinds: Vec<EventKind> = h.events.all().iter().map(|e| e.kind).collect();
        assert_eq!(kinds, [EventKind::Connect, EventKind::Queued], "{what}");
    }
}

#[tokio::test(start_paused = true)]
async fn a_v2_local_header_is_a_session_of_the_proxy_itself() {
    let mut h = Harness::proxied("", "", &v2(0, "0.0.0.0:0".parse().unwrap())).await;
    assert!(h.reply().await.starts_with("220 relay.test "));
    assert!(
        h.cmd("EHLO checker.test")
            .await
            .starts_with("250-relay.test")
    );
    assert!(h.cmd("QUIT").await.starts_with("221 "));
    h.until_closed().await;
    assert_eq!(h.event_clients(), [PROXY]);
    // v1 UNKNOWN: the same (and logged).
    let mut h = Harness::proxied("", "", b"PROXY UNKNOWN\r\n").await;
    assert!(h.reply().await.starts_with("220 relay.test "));
    h.cmd("QUIT").await;
    h.until_closed().await;
    assert_eq!(h.event_clients(), [PROXY]);
}

/// The one event of a session closed for its header: `proxy_header`, the proxy's.
fn closed_for_its_header(h: &Harness) {
    let events = h.events.all();
    assert_eq!(events.len(), 1, "{events:?}");
    assert_eq!(events[0].kind, EventKind::Refused);
    assert_eq!(events[0].rule.as_deref(), Some("proxy_header"));
    assert_eq!(events[0].client, Some(PROXY.parse().unwrap()));
    assert_eq!(events[0].reply, None);
}

#[tokio::test(start_paused = true)]
async fn a_malformed_header_from_a_trusted_proxy_closes_the_connection_unanswered() {
    for bad in [
        &b"PROXY TCP4 203.0.113.9 192.0.2.25 51000\r\n"[..],
        b"EHLO client.test\r\n",
        b"\r\n\r\n\0\r\nQUIT\n\x21\x12\x00\x0c\xcb\x00\x71\x09\xc0\x00\x02\x19\xc7\x38\x00\x19",
    ] {
        let mut h = Harness::proxied("", "", bad).await;
        let started = tokio::time::Instant::now();
        assert_eq!(h.until_closed().await, "", "{bad:?}");
        assert_eq!(started.elapsed(), Duration::ZERO, "{bad:?}");
        closed_for_its_header(&h);
    }
}

#[tokio::test(start_paused = true)]
async fn a_truncated_header_then_silence_is_closed_at_the_time_bound() {
    let mut h = Harness::proxied("", "", b"PROXY TCP4 203.0.113.9 192.0").await;
    let started = tokio::time::Instant::now();
    assert_eq!(h.until_closed().await, "");
    assert_eq!(started.elapsed(), HEADER_TIMEOUT);
    closed_for_its_header(&h);
}

#[tokio::test(start_paused = true)]
async fn a_proxy_that_closes_without_a_word_is_no_refusal() {
    let mut h = Harness::proxied("", "", b"").await;
    h.io.shutdown().await.unwrap();
    assert_eq!(h.until_closed().await, "");
    assert!(h.events.all().is_empty(), "{:?}", h.events.all());
    assert_eq!(refusals_counted(&h), 0.0);
}

/// Every refusal counted in `portcullis_refusals_total`.
fn refusals_counted(h: &Harness) -> f64 {
    (h.telemetry.metrics.encode().lines())
        .filter(|l| l.starts_with("portcullis_refusals_total{"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

#[tokio::test(start_paused = true)]
async fn a_proxy_header_from_an_untrusted_peer_is_a_command_like_any_other() {
    // The listener trusts another address; PEER's PROXY line is not believed.
    let listener = format!("{NO_TLS}\ntrusted_proxies = [\"192.0.2.200\"]");
    let counter = ConnectionCounter::default();
    let mut h = Harness::accepted(&listener, "", PROXY, &counter).expect("admitted");
    assert!(h.reply().await.starts_with("220 "));
    let line = String::from_utf8(v1("203.0.113.9 51000")).unwrap();
    let reply = h.cmd(line.trim_end()).await;
    assert!(reply.starts_with("500 5.5.1 "), "{reply}");
    // A v2 header is lines of junk: two empty ones, a NUL, and one whose bare LF never ends
    // it (completed here by a NOOP's CRLF).
    h.io.write_all(&v2(1, "203.0.113.9:51000".parse().unwrap()))
        .await
        .unwrap();
    h.send("NOOP").await;
    let mut replies = Vec::new();
    for _ in 0..4 {
        replies.push(h.reply().await);
    }
    assert!(replies.iter().all(|r| r.starts_with("500 ")), "{replies:?}");
    let message = h.queue_one("u@example.com").await;
    assert!(
        message.starts_with("Received: from client.test ([192.0.2.1])\r\n"),
        "{message}"
    );
    assert!(
        h.event_clients().iter().all(|c| c == PROXY),
        "{:?}",
        h.event_clients()
    );
}

#[tokio::test(start_paused = true)]
async fn deny_allow_and_relay_networks_judge_the_proxied_client() {
    // The proxy itself is outside `allow` and inside `deny`: only the client counts.
    let lists = format!("allow = [\"203.0.113.0/24\"]\ndeny = [\"203.0.113.66\", \"{PROXY}\"]");
    let session = |header: Vec<u8>| {
        let dir = tempfile::tempdir().unwrap();
        let mut runtime = runtime(dir.path(), &behind_proxy(&lists), "");
        let mut config = (*runtime.config).clone();
        config.relay.relay_networks = vec!["203.0.113.0/24".parse().unwrap()];
        runtime.policy = Policy::new(&config, None, std::time::Instant::now());
        runtime.config = Arc::new(config);
        let counter = ConnectionCounter::default();
        let mut h = Harness::accepted_on(dir, runtime, PROXY, &counter).expect("admitted");
        async move {
            h.io.write_all(&header).await.unwrap();
            h
        }
    };
    let mut denied = session(v1("203.0.113.66 51000")).await;
    assert_eq!(denied.reply().await, wire(&reply::ACCESS_DENIED));
    let mut h = session(v1("203.0.113.9 51000")).await;
    assert!(h.reply().await.starts_with("220 "));
    // In relay_networks: it may send to any domain.
    let message = h.queue_one("u@other.test").await;
    assert!(
        message.starts_with("Received: from client.test ([203.0.113.9])"),
        "{message}"
    );
    // The proxy's own session (LOCAL) is judged by the proxy's address: denied, and not in
    // relay_networks.
    let mut local = session(v2(0, "0.0.0.0:0".parse().unwrap())).await;
    assert_eq!(local.reply().await, wire(&reply::ACCESS_DENIED));
    let mut stranger = session(v1("198.51.100.7 51000")).await;
    assert_eq!(stranger.reply().await, wire(&reply::ACCESS_DENIED));
}

#[tokio::test(start_paused = true)]
async fn per_ip_caps_count_the_proxied_client_and_never_the_proxy() {
    let limits = "[limits]\nmax_connections = 6\nmax_connections_per_ip = 1\n";
    let counter = ConnectionCounter::default();
    let listener = behind_proxy("");
    let open = |header: Vec<u8>| {
        let mut h = Harness::accepted(&listener, limits, PROXY, &counter).expect("admitted");
        async move {
            h.io.write_all(&header).await.unwrap();
            h
        }
    };
    // Two clients through the one proxy: one connection each, the proxy's count is none.
    let mut first = open(v1("203.0.113.9 51000")).await;
    assert!(first.reply().await.starts_with("220 "));
    let mut other = open(v2(1, "203.0.113.10:51000".parse().unwrap())).await;
    assert!(other.reply().await.starts_with("220 "));
    // The first client again: over its cap, told so after its header.
    let mut again = open(v1("203.0.113.9 51001")).await;
    assert_eq!(again.until_closed().await, wire(&reply::TOO_MANY_FROM_IP));
    let refused = again.events.all();
    assert_eq!(refused.len(), 1);
    assert_eq!(refused[0].rule.as_deref(), Some("max_connections_per_ip"));
    assert_eq!(refused[0].client, Some(CLIENT.parse().unwrap()));
    // The proxy's own sessions are not held to max_connections_per_ip…
    let mut local = open(v2(0, "0.0.0.0:0".parse().unwrap())).await;
    assert!(local.reply().await.starts_with("220 "));
    let mut local2 = open(v2(0, "0.0.0.0:0".parse().unwrap())).await;
    assert!(local2.reply().await.starts_with("220 "));
    // (nor when a header names the proxy itself, as HAProxy's v1 health check does)…
    let mut named = open(v1("192.0.2.1 40001")).await;
    assert!(named.reply().await.starts_with("220 "));
    // …but every connection counts towards max_connections: 5 open, one more, then full.
    let _sixth = open(v1("203.0.113.11 51000")).await;
    assert_eq!(counter.total(), 6);
    let full = Harness::accepted(&listener, limits, PROXY, &counter).err();
    assert_eq!(full, Some(Full::Total));
    // The client's slot is given back with its session.
    first.cmd("QUIT").await;
    first.until_closed().await;
    let mut back = open(v1("203.0.113.9 51002")).await;
    assert!(back.reply().await.starts_with("220 "));
}

#[tokio::test(start_paused = true)]
async fn the_header_is_not_talking_early() {
    let more = "[limits]\npregreet_wait = \"3s\"\n";
    let mut h = Harness::proxied("", more, &v1("203.0.113.9 51000")).await;
    let started = tokio::time::Instant::now();
    assert!(h.reply().await.starts_with("220 "));
    assert_eq!(started.elapsed().as_secs(), 3);
    // A client that talks before the greeting is still caught, behind the proxy too.
    let mut early = Harness::proxied("", more, &v1("203.0.113.9 51000")).await;
    early.send("EHLO early.test").await;
    assert_eq!(early.until_closed().await, wire(&reply::EARLY_TALKER));
    assert_eq!(early.event_clients(), [CLIENT, CLIENT]);
    let rules: Vec<Option<String>> = early.events.all().into_iter().map(|e| e.rule).collect();
    assert_eq!(rules, [None, Some("pregreet".to_owned())]);
}

#[tokio::test(start_paused = true)]
async fn an_implicit_tls_listener_reads_the_header_before_the_handshake() {
    let listener = format!("tls = \"implicit\"\ntrusted_proxies = [\"{PROXY}\"]");
    let tls = "[tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n";
    let counter = ConnectionCounter::default();
    let mut h = Harness::accepted(&listener, tls, PROXY, &counter).expect("admitted");
    h.io.write_all(&v2(1, "[2001:db8::9]:51000".parse().unwrap()))
        .await
        .unwrap();
    h.tls_handshake().await;
    assert!(h.reply().await.starts_with("220 relay.test "));
    let message = h.queue_one("u@example.com").await;
    assert!(
        message.starts_with("Received: from client.test ([IPv6:2001:db8::9])"),
        "{message}"
    );
    assert!(message.contains("(using TLSv1.3"), "{message}");
}
