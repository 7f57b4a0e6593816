//! Two relay nodes behind a real HAProxy, sharing a real Redis: the scale-out scenario end to
//! end, on loopback, with the real binary.
//!
//! Node `edge-1` and node `edge-2` (hostnames `edge-1.test`, `edge-2.test`, so the greeting and
//! the `Received:` field show which node a session reached) have their own ports and spools,
//! the same Redis (`[cluster]`), the same users (alice and bob, password `secret`) and the same
//! upstream (a sink). Each trusts HAProxy (127.0.0.1) for the PROXY protocol. HAProxy has two
//! round-robin frontends over both nodes, one sending PROXY v2 (health checks: SMTP `EHLO`
//! over a v2 `LOCAL` header), one PROXY v1 (health checks: TCP connect over a v1 header), both
//! checking every 200 ms and redispatching a session a dead node refuses; and one v2 frontend
//! pinned to each node. Clients connect from their own loopback addresses (127.0.0.2, …), so
//! the address each node believes is the one in the PROXY header.
//!
//! What it shows: the client's address (PROXY v1 and v2) decides `deny` and `relay_networks`
//! and is the one in `Received:`, the logs and the journal (each naming its node), on both
//! nodes, and a PROXY line a client sends itself is a command, never believed; a per-IP
//! message limit, an AUTH lockout and a suspension hold across the nodes (shared through
//! Redis); with Redis stopped, mail
//! flows on each node's own state (`on_error = "local"`) or is refused for now (`"tempfail"`),
//! and with Redis back the nodes share again; a node killed with SIGKILL mid-load: HAProxy
//! sends new sessions to the survivor, and once the survivor has adopted the dead node's spool
//! (`queue adopt`) every message acknowledged with `250` reaches the upstream, once.
//!
//! Skipped when haproxy or redis-server is missing, unless `PORTCULLIS_REQUIRE_HAPROXY=1` or
//! `PORTCULLIS_REQUIRE_REDIS=1` (both set by `.ci/run`).

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{self, BufRead, BufReader, Write};
use std::net::{IpAddr, SocketAddr, TcpStream};
use std::path::Path;
use std::sync::Mutex;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use common::haproxy::{self, Haproxy, proxy_warnings, skip_without_haproxy};
use common::queue::{accept, refusing_sink, wait_state};
use common::sink::{Received, Sink, SinkConfig};
use common::*;
use portcullis::cluster::testing::TestRedis;

/// How long a test waits for the nodes (delivery, a state change).
const WAIT: Duration = Duration::from_secs(15);

/// The nodes' names, in order: `Edge::nodes[0]` is edge-1.
const NODES: [&str; 2] = ["edge-1", "edge-2"];

/// A client outside every list.
const STRANGER: &str = "127.0.0.2";
/// A client in `relay_networks`.
const NEIGHBOUR: &str = "127.0.0.3";
/// A client on the listeners' `deny` list.
const DENIED: &str = "127.0.0.4";

/// The whole edge: Redis, the upstream, both nodes and HAProxy in front of them.
struct Edge {
    haproxy: Haproxy,
    /// edge-1, edge-2.
    nodes: Vec<Relay>,
    /// Each node's `[admin]` port.
    admin: [u16; 2],
    /// The round-robin frontend speaking PROXY v2 to the nodes.
    v2: u16,
    /// The round-robin frontend speaking PROXY v1 to the nodes.
    v1: u16,
    /// A v2 frontend to edge-1 only, one to edge-2 only.
    pinned: [u16; 2],
    redis: TestRedis,
    sink: Sink,
    /// HAProxy's configuration and log, the certificate both nodes present.
    dir: TestDir,
}

impl Edge {
    /// Redis, both nodes (forwarding to `sink`, with `policy`) and HAProxy; `None` when `test`
    /// is skipped (haproxy or redis-server missing and not required).
    fn start(test: &str, sink: Sink, policy: Policy) -> Option<Edge> {
        if skip_without_haproxy(test) {
            return None;
        }
        let redis = TestRedis::start()?;
        let dir = TestDir::new();
        write_certs(&dir.join("certs"));
        let ports = [free_port(), free_port()];
        let admin = [free_port(), free_port()];
        let nodes = (0..2)
            .map(|i| {
                let node_dir = TestDir::new();
                write_alice_and_bob(&node_dir);
                let policy = node_policy(
                    &Node {
                        name: NODES[i],
                        port: ports[i],
                        admin: admin[i],
                        upstream: sink.port(),
                        redis: &redis.url(),
                        certs: &dir.join("certs"),
                    },
                    policy,
                );
                Relay::start_in(node_dir, &policy)
            })
            .collect();
        let (ready, v2, v1) = (free_port(), free_port(), free_port());
        let pinned = [free_port(), free_port()];
        let cfg = haproxy_cfg(ready, v2, v1, pinned, ports);
        let haproxy = Haproxy::start(&dir, &cfg, ready);
        Some(Edge {
            haproxy,
            nodes,
            admin,
            v2,
            v1,
            pinned,
            redis,
            sink,
            dir,
        })
    }

    /// The node called `name`.
    fn node(&self, name: &str) -> &Relay {
        &self.nodes[node_index(name)]
    }
}

/// What a test adds to both nodes' policies.
#[derive(Clone, Copy)]
struct Policy<'a> {
    /// More `[auth]` keys.
    auth: &'a str,
    /// More tables.
    tables: &'a str,
    /// `[cluster] on_error`.
    on_error: &'a str,
}

impl Default for Policy<'_> {
    fn default() -> Self {
        Policy {
            auth: "",
            tables: "",
            on_error: "local",
        }
    }
}

/// `[rate_limits] messages_per_ip = "3/hour"`.
const THREE_PER_HOUR: &str = "[rate_limits]\nmessages_per_ip = \"3/hour\"\n";

/// What differs between the two nodes' policies.
struct Node<'a> {
    name: &'a str,
    port: u16,
    admin: u16,
    upstream: u16,
    redis: &'a str,
    certs: &'a Path,
}

/// One node's policy: hostname `NAME.test`, one listener `mx` (STARTTLS, AUTH optional, PROXY
/// from 127.0.0.1, [`DENIED`] denied), example.com accepted, [`NEIGHBOUR`] in relay_networks,
/// retries every second, `[cluster] node = NAME`; then what `policy` adds.
fn node_policy(node: &Node, policy: Policy) -> String {
    let mx = listener("mx", node.port, "starttls")
        + "auth = \"optional\"\ntrusted_proxies = [\"127.0.0.1/32\"]\n"
        + &format!("deny = [\"{DENIED}/32\"]\n");
    let certs = node.certs.display();
    config(
        &[mx],
        node.upstream,
        &format!(
            "[tls]\ncert = \"{certs}/cert.pem\"\nkey = \"{certs}/key.pem\"\n\n\
             [relay]\naccepted_domains = [\"example.com\"]\nrelay_networks = [\"{NEIGHBOUR}/32\"]\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n{auth}\n\
             [queue]\nretry = [\"1s\"]\n\n[admin]\nbind = \"127.0.0.1:{admin}\"\n\n\
             [cluster]\nredis = \"{redis}\"\nnode = \"{name}\"\non_error = \"{on_error}\"\n\n{tables}",
            auth = policy.auth,
            on_error = policy.on_error,
            tables = policy.tables,
            admin = node.admin,
            redis = node.redis,
            name = node.name,
        ),
    )
    .replace(
        "hostname = \"relay.test\"",
        &format!("hostname = \"{}.test\"", node.name),
    )
    .replace(
        "tls = \"none\"\n\n[tls]",
        "tls = \"none\"\nbackoff = \"1s\"\n\n[tls]",
    )
}

/// HAProxy in front of the nodes on `nodes` (edge-1's port, edge-2's): the round-robin
/// frontends `v2` and `v1`, a frontend `pinned` to each node, the monitor on `ready`.
fn haproxy_cfg(ready: u16, v2: u16, v1: u16, pinned: [u16; 2], nodes: [u16; 2]) -> String {
    let [p1, p2] = nodes;
    // Checked every 200 ms, down at the first failed check; a session a node refuses (it
    // died) is tried again on the other node at once.
    let check = "check inter 200ms fall 1 rise 1";
    let mut cfg = haproxy::preamble(ready);
    cfg.push_str(&format!(
        "frontend v2\n    bind 127.0.0.1:{v2}\n    default_backend round_robin_v2\n\
         backend round_robin_v2\n    balance roundrobin\n    option redispatch 1\n    retries 2\n    \
         option smtpchk EHLO checker.test\n    \
         server edge-1 127.0.0.1:{p1} send-proxy-v2 {check}\n    \
         server edge-2 127.0.0.1:{p2} send-proxy-v2 {check}\n\
         frontend v1\n    bind 127.0.0.1:{v1}\n    default_backend round_robin_v1\n\
         backend round_robin_v1\n    balance roundrobin\n    option redispatch 1\n    retries 2\n    \
         server edge-1 127.0.0.1:{p1} send-proxy {check}\n    \
         server edge-2 127.0.0.1:{p2} send-proxy {check}\n"
    ));
    for ((name, front), port) in NODES.iter().zip(pinned).zip(nodes) {
        cfg.push_str(&format!(
            "frontend only_{name}\n    bind 127.0.0.1:{front}\n    default_backend only_{name}\n\
             backend only_{name}\n    server {name} 127.0.0.1:{port} send-proxy-v2\n"
        ));
    }
    cfg
}

fn node_index(name: &str) -> usize {
    NODES
        .iter()
        .position(|n| *n == name)
        .unwrap_or_else(|| panic!("no node {name:?}"))
}

/// The node named by a greeting (`220 edge-1.test ESMTP ready`).
fn greeting_node(greeting: &str) -> String {
    let host = greeting.split(' ').nth(1).unwrap_or_default();
    let node = host.strip_suffix(".test").unwrap_or(host);
    assert!(NODES.contains(&node), "greeting from no node: {greeting:?}");
    node.to_string()
}

/// A session from `ip` through the frontend on `port`, greeted with `220` and past `EHLO`:
/// the node it reached and the client.
fn greeted(ip: &str, port: u16) -> (String, SmtpClient) {
    let mut c = SmtpClient::connect_from(ip, port);
    let node = greeting_node(&c.expect_reply(220));
    c.expect("EHLO client.test", 250);
    (node, c)
}

/// The same, after `STARTTLS` (trusting the nodes' certificate, in `edge`'s directory) and
/// `EHLO` again: ready for AUTH.
fn greeted_tls(edge: &Edge, ip: &str, port: u16) -> (String, SmtpClient) {
    let (node, mut c) = greeted(ip, port);
    c.starttls(&edge.dir.join("certs/cert.pem"));
    c.expect("EHLO client.test", 250);
    (node, c)
}

/// A message with `Subject: tag` and `Message-ID: <tag@src.test>`.
fn body(tag: &str) -> String {
    format!("Subject: {tag}\nMessage-ID: <{tag}@src.test>\n\nhello from {tag}\n")
}

/// The value of the first `name:` field of `message`.
fn field(message: &Received, name: &str) -> String {
    let text = String::from_utf8_lossy(&message.data);
    let prefix = format!("{name}: ");
    text.lines()
        .find_map(|l| l.strip_prefix(&prefix))
        .unwrap_or_else(|| panic!("no {name}: in {text}"))
        .to_string()
}

/// The start of the `Received:` field `node` adds to a message from `ip` (EHLO client.test):
/// its hostname, and its `[cluster] node` name (which differs from it here).
fn received_by(ip: &str, node: &str) -> String {
    format!("Received: from client.test ([{ip}])\r\n\tby {node}.test (portcullis node {node}) ")
}

/// How many of the sink's messages carry [`received_by`] `ip` and `node`.
fn received_count(sink: &Sink, ip: &str, node: &str) -> usize {
    let needle = received_by(ip, node);
    (sink.messages().iter())
        .filter(|m| String::from_utf8_lossy(&m.data).contains(&needle))
        .count()
}

// --- 1. Client addresses through PROXY v1 and v2 on both nodes --------------------------------

/// On each node, over the frontend `port`: a stranger's message for example.com is accepted
/// and its relaying refused, a neighbour relays, a denied client is refused at the greeting.
/// The nodes each session reached, in order.
fn three_clients(port: u16, round: usize) -> Vec<String> {
    let (node_a, mut c) = greeted(STRANGER, port);
    let tag = format!("stranger-{port}-{round}");
    assert_reply(
        &c.send_message("a@sender.test", &["u@example.com"], &body(&tag)),
        250,
        "2.0.0",
    );
    assert_reply(&c.cmd("MAIL FROM:<a@sender.test>"), 250, "2.1.0");
    assert_reply(&c.cmd("RCPT TO:<x@elsewhere.test>"), 550, "5.7.1");
    c.expect("QUIT", 221);

    let (node_b, mut c) = greeted(NEIGHBOUR, port);
    let tag = format!("neighbour-{port}-{round}");
    assert_reply(
        &c.send_message("n@sender.test", &["x@elsewhere.test"], &body(&tag)),
        250,
        "2.0.0",
    );
    c.expect("QUIT", 221);

    let mut c = SmtpClient::connect_from(DENIED, port);
    assert_reply(&c.read_reply(), 554, "5.7.1");
    vec![node_a, node_b]
}

#[test]
fn client_addresses_through_proxy_v1_and_v2_decide_the_rules_and_the_received_field_on_both_nodes()
{
    let test = "client_addresses_through_proxy_v1_and_v2_decide_the_rules_and_the_received_field_on_both_nodes";
    let Some(edge) = Edge::start(test, Sink::start(SinkConfig::default()), Policy::default())
    else {
        return;
    };
    for port in [edge.v2, edge.v1] {
        // Two rounds of three sessions: round robin puts each kind of client once on each node.
        let mut reached = three_clients(port, 0);
        reached.extend(three_clients(port, 1));
        let distinct: BTreeSet<&String> = reached.iter().collect();
        assert_eq!(distinct.len(), 2, "{reached:?}");
    }
    assert!(edge.sink.wait_for(8, WAIT), "{:?}", edge.sink.messages());
    assert_eq!(edge.sink.messages().len(), 8);
    for node in NODES {
        // Per node: one stranger and one neighbour message per frontend, each Received: field
        // naming the client's own address, and no other.
        assert_eq!(received_count(&edge.sink, STRANGER, node), 2, "{node}");
        assert_eq!(received_count(&edge.sink, NEIGHBOUR, node), 2, "{node}");
        let relay = edge.node(node);
        let log = relay.log();
        let deny = [
            ("rule", "listener_deny"),
            ("peer", DENIED),
            ("proxy", "127.0.0.1"),
        ];
        assert_eq!(count_log_fields(&log, &deny), 2, "{node}:\n{log}");
        let queued = [
            ("peer", STRANGER),
            ("proxy", "127.0.0.1"),
            ("from", "a@sender.test"),
        ];
        assert_eq!(count_log_fields(&log, &queued), 2, "{node}:\n{log}");
        let relaying = [("rule", "relay_denied"), ("peer", STRANGER)];
        assert_eq!(count_log_fields(&log, &relaying), 2, "{node}:\n{log}");
        // HAProxy's health checks (both frontends' backends check every node) reached the
        // node, and left nothing above info in its log: sessions from HAProxy itself (the
        // readiness probe of the harness is one more).
        let checked = wait_until(WAIT, || {
            (relay.log().lines())
                .filter(|l| {
                    l.ends_with(": session start") && line_has_field(l, "peer", "127.0.0.1")
                })
                .count()
                >= 5
        });
        assert!(checked, "{node}: no health checks\n{}", relay.log());
        let log = relay.log();
        assert_eq!(proxy_warnings(&log), Vec::<&str>::new(), "{node}:\n{log}");
    }
    for m in edge.sink.messages() {
        let text = String::from_utf8_lossy(&m.data);
        assert!(!text.contains("[127.0.0.1]"), "{text}");
    }
    // Each node's journal (`portcullis trace CLIENT`) has the stranger's two messages under
    // the stranger's address and the node's name.
    for node in NODES {
        let journaled = || traced(edge.node(node), STRANGER);
        assert!(
            wait_until(WAIT, || journaled().len() == 2),
            "{node}: {:?}",
            journaled()
        );
        for event in journaled() {
            assert_eq!(event["client"], STRANGER, "{event}");
            assert_eq!(event["node"], node, "{event}");
        }
    }
    let log = edge.haproxy.log();
    assert!(!log.contains("is DOWN"), "{log}");
}

/// The `queued` events of `portcullis trace QUERY --json` on `relay`'s journal.
fn traced(relay: &Relay, query: &str) -> Vec<serde_json::Value> {
    let out = relay.command(&["trace", query, "--json", "--since", "1h"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    (String::from_utf8_lossy(&out.stdout).lines())
        .map(|l| serde_json::from_str::<serde_json::Value>(l).expect("one JSON object per line"))
        .filter(|e| e["kind"] == "queued")
        .collect()
}

#[test]
fn a_proxy_header_a_client_sends_through_haproxy_is_a_command_never_believed() {
    let test = "a_proxy_header_a_client_sends_through_haproxy_is_a_command_never_believed";
    let Some(edge) = Edge::start(test, Sink::start(SinkConfig::default()), Policy::default())
    else {
        return;
    };
    // The stranger claims to be the neighbour (in relay_networks): before the greeting, right
    // behind HAProxy's own header, and again after it.
    let forged = "PROXY TCP4 127.0.0.3 127.0.0.1 40000 25";
    for port in [edge.v2, edge.v1, edge.v2, edge.v1] {
        let mut c = SmtpClient::connect_from(STRANGER, port);
        c.send_raw(format!("{forged}\r\n").as_bytes());
        greeting_node(&c.expect_reply(220));
        assert_reply(&c.read_reply(), 500, "5.5.1");
        c.expect("EHLO client.test", 250);
        assert_reply(&c.cmd(forged), 500, "5.5.1");
        assert_reply(&c.cmd("MAIL FROM:<a@sender.test>"), 250, "2.1.0");
        assert_reply(&c.cmd("RCPT TO:<x@elsewhere.test>"), 550, "5.7.1");
        c.expect("QUIT", 221);
    }
    for node in NODES {
        let log = edge.node(node).log();
        let refused = [("rule", "relay_denied"), ("peer", STRANGER)];
        assert_eq!(count_log_fields(&log, &refused), 2, "{node}:\n{log}");
        assert_eq!(count_log_fields(&log, &[("peer", NEIGHBOUR)]), 0, "{log}");
    }
    assert_eq!(edge.sink.messages().len(), 0);
}

// --- 2. A per-IP message limit shared by both nodes -------------------------------------------

#[test]
fn a_per_ip_message_limit_counts_the_messages_of_both_nodes() {
    let test = "a_per_ip_message_limit_counts_the_messages_of_both_nodes";
    let policy = Policy {
        tables: THREE_PER_HOUR,
        ..Policy::default()
    };
    let Some(edge) = Edge::start(test, Sink::start(SinkConfig::default()), policy) else {
        return;
    };
    let client = "127.0.0.5";
    let mut replies = Vec::new();
    let mut reached = Vec::new();
    for i in 0..6 {
        let (node, mut c) = greeted(client, edge.v2);
        let reply = c.send_message("a@sender.test", &["u@example.com"], &body(&format!("m{i}")));
        replies.push((reply.0, reply.1.get(4..9).unwrap_or_default().to_string()));
        c.expect("QUIT", 221);
        reached.push(node);
    }
    // Round robin: three sessions on each node.
    assert_eq!(reached.iter().filter(|n| *n == "edge-1").count(), 3);
    let accepted = (250, "2.0.0".to_string());
    let limited = (451, "4.7.1".to_string());
    let mut expected = vec![accepted; 3];
    expected.extend(vec![limited; 3]);
    assert_eq!(replies, expected, "reached {reached:?}");
    for node in NODES {
        let refused = [("rule", "rate_limits.messages_per_ip"), ("peer", client)];
        let on_node = count_log_fields(&edge.node(node).log(), &refused);
        let expected = reached[3..].iter().filter(|n| *n == node).count();
        assert_eq!(on_node, expected, "{node}:\n{}", edge.node(node).log());
    }
    assert!(edge.sink.wait_for(3, WAIT));
    let total: usize = NODES
        .iter()
        .map(|n| received_count(&edge.sink, client, n))
        .sum();
    assert_eq!(total, 3);
    assert_eq!(edge.sink.messages().len(), 3);
}

// --- 3. An AUTH lockout earned on one node holds on the other ---------------------------------

#[test]
fn an_auth_lockout_earned_on_edge_1_refuses_on_edge_2_without_verifying() {
    let test = "an_auth_lockout_earned_on_edge_1_refuses_on_edge_2_without_verifying";
    let policy = Policy {
        auth: "max_failures = 3\nfailure_window = \"10m\"\nlockout = \"15m\"\n",
        ..Policy::default()
    };
    let Some(edge) = Edge::start(test, Sink::start(SinkConfig::default()), policy) else {
        return;
    };
    let guesser = "127.0.0.6";
    let (node, mut c) = greeted_tls(&edge, guesser, edge.pinned[0]);
    assert_eq!(node, "edge-1");
    for guess in ["guess1", "guess2", "guess3"] {
        assert_reply(&c.cmd(&auth_plain("alice", guess)), 535, "5.7.8");
    }
    c.expect("QUIT", 221);
    let (node, mut c) = greeted_tls(&edge, guesser, edge.pinned[1]);
    assert_eq!(node, "edge-2");
    // The right password, and another login: refused before any password is looked at.
    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 454, "4.7.0");
    assert_reply(&c.cmd(&auth_plain("bob", "secret")), 454, "4.7.0");
    assert_reply(&c.cmd("MAIL FROM:<alice@example.com>"), 250, "2.1.0");
    assert_reply(&c.cmd("RCPT TO:<x@elsewhere.test>"), 550, "5.7.1");
    let edge2 = edge.node("edge-2");
    let locked = [
        ("rule", "auth_lockout"),
        ("peer", guesser),
        ("reply", "454 4.7.0"),
    ];
    assert_eq!(
        count_log_fields(&edge2.log(), &locked),
        2,
        "{}",
        edge2.log()
    );
    let verified = [("rule", "auth_bad_password"), ("peer", guesser)];
    assert_eq!(count_log_fields(&edge2.log(), &verified), 0);
    let edge1 = edge.node("edge-1");
    assert_eq!(
        count_log_fields(&edge1.log(), &verified),
        3,
        "{}",
        edge1.log()
    );
    // Another address logs in on edge-2 as usual.
    let (_, mut c) = greeted_tls(&edge, "127.0.0.7", edge.pinned[1]);
    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");
}

// --- 4. A suspension on one node holds on the other -------------------------------------------

#[test]
fn a_suspension_made_with_edge_1_s_policy_holds_on_edge_2() {
    let test = "a_suspension_made_with_edge_1_s_policy_holds_on_edge_2";
    let Some(edge) = Edge::start(test, refusing_sink(), Policy::default()) else {
        return;
    };
    let client = "127.0.0.8";
    // alice queues a message on edge-2 while the upstream refuses it.
    let (node, mut c) = greeted_tls(&edge, client, edge.pinned[1]);
    assert_eq!(node, "edge-2");
    assert_reply(&c.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");
    let (code, reply) = c.send_message(
        "alice@example.com",
        &["rcpt@dest.example"],
        &format!("From: <alice@example.com>\n{}", body("alice-1")),
    );
    assert_eq!(code, 250, "{reply}");
    let id = queue_id(&reply).expect("queue id");
    c.expect("QUIT", 221);
    let edge2 = edge.node("edge-2");
    wait_state(edge2, &[&id], "queued");
    // An idle session of alice's on edge-2.
    let (_, mut idle) = greeted_tls(&edge, client, edge.pinned[1]);
    assert_reply(&idle.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");

    let out = edge
        .node("edge-1")
        .command(&["user", "suspend", "alice", "--reason", "phished"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let said = String::from_utf8_lossy(&out.stdout).into_owned();
    assert!(
        said.lines().any(|l| l.starts_with("suspended alice")),
        "{}",
        show(&out)
    );

    wait_state(edge2, &[&id], "held");
    let state = std::fs::read_to_string(edge2.spool.join("queue").join(format!("{id}.state")))
        .expect("state file");
    assert!(state.contains("\"reason\":\"login suspended\""), "{state}");
    assert_reply(&idle.cmd("NOOP"), 421, "4.7.0");
    assert_eq!(idle.read_to_close(), "");
    let shared = edge
        .redis
        .command(&["HEXISTS", "portcullis:suspended", "alice"]);
    assert_eq!(shared.as_deref(), Some("1"));
    for port in edge.pinned {
        let (_, mut c) = greeted_tls(&edge, client, port);
        assert_reply(&c.cmd(&auth_plain("alice", "secret")), 535, "5.7.8");
        assert_reply(&c.cmd(&auth_plain("bob", "secret")), 235, "2.7.0");
    }
    assert_eq!(edge.sink.messages().len(), 0);
}

// --- 5. Redis stopped mid-run, then back ------------------------------------------------------

/// One message from `ip` through the frontend `port`: the reply's code and enhanced code.
fn one_message(ip: &str, port: u16, tag: &str) -> (u16, String) {
    let (_, mut c) = greeted(ip, port);
    let reply = c.send_message("a@sender.test", &["u@example.com"], &body(tag));
    c.expect("QUIT", 221);
    (reply.0, reply.1.get(4..9).unwrap_or_default().to_string())
}

#[test]
fn with_redis_gone_mail_flows_on_local_state_and_is_shared_again_when_it_returns() {
    let test = "with_redis_gone_mail_flows_on_local_state_and_is_shared_again_when_it_returns";
    let policy = Policy {
        tables: THREE_PER_HOUR,
        ..Policy::default()
    };
    let Some(mut edge) = Edge::start(test, Sink::start(SinkConfig::default()), policy) else {
        return;
    };
    let accepted = (250, "2.0.0".to_string());
    edge.redis.stop();
    for (i, port) in edge.pinned.into_iter().enumerate() {
        assert_eq!(
            one_message("127.0.0.9", port, &format!("down-{i}")),
            accepted
        );
    }
    assert!(edge.sink.wait_for(2, WAIT));
    for (i, node) in NODES.iter().enumerate() {
        let relay = edge.node(node);
        assert_log_fields(relay, &[("rule", "cluster_fallback"), ("node", node)]);
        assert_log(relay, "shared store unavailable");
        // Named once, by the log writer: the store's own lines add no second `node`.
        let log = relay.log();
        let fallback = (log.lines())
            .find(|l| l.contains("shared store unavailable"))
            .unwrap();
        assert_eq!(fallback.matches("node=").count(), 1, "{fallback}");
        assert_eq!(received_count(&edge.sink, "127.0.0.9", node), 1);
        let admin = edge.admin[i];
        assert!(
            wait_until(WAIT, || http::alert_gauge(admin, "cluster_fallback") == "1"),
            "{node}: cluster_fallback {}",
            http::alert_gauge(admin, "cluster_fallback")
        );
    }

    edge.redis.restart();
    for (i, node) in NODES.iter().enumerate() {
        let relay = edge.node(node);
        let back = wait_until(Duration::from_secs(5), || {
            (relay.log().lines())
                .any(|l| l.contains("reachable again") && line_has_field(l, "node", node))
        });
        assert!(back, "{node}:\n{}", relay.log());
        let admin = edge.admin[i];
        assert!(wait_until(WAIT, || http::alert_gauge(
            admin,
            "cluster_fallback"
        ) == "0"));
    }
    // Shared again: a new client's budget of 3 is spent across both nodes.
    let limited = (451, "4.7.1".to_string());
    let client = "127.0.0.10";
    let replies: Vec<_> = (0..5)
        .map(|i| one_message(client, edge.pinned[i % 2], &format!("up-{i}")))
        .collect();
    let mut expected = vec![accepted; 3];
    expected.extend(vec![limited; 2]);
    assert_eq!(replies, expected);
    assert!(edge.sink.wait_for(5, WAIT));
    assert_eq!(received_count(&edge.sink, client, "edge-1"), 2);
    assert_eq!(received_count(&edge.sink, client, "edge-2"), 1);
}

#[test]
fn with_redis_gone_and_on_error_tempfail_both_nodes_refuse_for_now_until_it_returns() {
    let test = "with_redis_gone_and_on_error_tempfail_both_nodes_refuse_for_now_until_it_returns";
    let policy = Policy {
        tables: "[rate_limits]\nconnections_per_ip = \"100/min\"\nmessages_per_ip = \"3/hour\"\n",
        on_error: "tempfail",
        ..Policy::default()
    };
    let Some(mut edge) = Edge::start(test, Sink::start(SinkConfig::default()), policy) else {
        return;
    };
    let client = "127.0.0.16";
    edge.redis.stop();
    for (i, port) in edge.pinned.into_iter().enumerate() {
        let mut c = SmtpClient::connect_from(client, port);
        assert_reply(&c.read_reply(), 421, "4.3.0");
        assert_eq!(c.read_to_close(), "");
        let relay = &edge.nodes[i];
        assert_log_fields(relay, &[("rule", "cluster_fallback"), ("node", NODES[i])]);
        let admin = edge.admin[i];
        assert!(wait_until(WAIT, || http::alert_gauge(
            admin,
            "cluster_fallback"
        ) == "1"));
    }
    edge.redis.restart();
    for (i, port) in edge.pinned.into_iter().enumerate() {
        let back = wait_until(Duration::from_secs(5), || {
            let log = edge.nodes[i].log();
            (log.lines())
                .any(|l| l.contains("reachable again") && line_has_field(l, "node", NODES[i]))
        });
        assert!(back, "{}", edge.nodes[i].log());
        assert_eq!(
            one_message(client, port, &format!("back-{i}")),
            (250, "2.0.0".to_string())
        );
    }
    assert!(edge.sink.wait_for(2, WAIT));
    assert_eq!(edge.sink.messages().len(), 2);
}

// --- 6. A node killed mid-load; its spool adopted by the survivor ------------------------------

/// One message accepted by a node: which node, its queue id there, its Message-ID tag.
#[derive(Debug, Clone)]
struct Acked {
    node: String,
    id: String,
    tag: String,
}

/// What became of one attempt to send a message while a node may die.
#[derive(Debug)]
enum Attempt {
    /// `250` to the final dot.
    Acked(Acked),
    /// The connection failed or closed before the `250`: the message may or may not have
    /// been committed.
    Lost { tag: String, error: io::Error },
}

/// Read one SMTP reply (multi-line joined) from `reader`.
fn read_reply(reader: &mut impl BufRead) -> io::Result<(u16, String)> {
    let mut text = String::new();
    loop {
        let mut line = String::new();
        if reader.read_line(&mut line)? == 0 {
            return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "closed"));
        }
        let code = line.get(..3).and_then(|c| c.parse::<u16>().ok());
        let Some(code) = code else {
            panic!("malformed reply line {line:?}");
        };
        text.push_str(&line);
        if line.as_bytes().get(3) != Some(&b'-') {
            return Ok((code, text));
        }
    }
}

/// Send `line` (if any) and read a reply, which must have `code`: a different reply is a
/// failure of the relay and panics; a failed connection is an `Err`.
fn step(
    stream: &mut TcpStream,
    reader: &mut impl BufRead,
    line: &[u8],
    code: u16,
) -> io::Result<String> {
    stream.write_all(line)?;
    let (got, text) = read_reply(reader)?;
    assert_eq!(
        got,
        code,
        "after {:?}: {text}",
        String::from_utf8_lossy(line)
    );
    Ok(text)
}

/// One message tagged `tag`, in its own session from `ip` through the frontend on `port`.
/// Unlike [`SmtpClient`], a connection that fails is an outcome here, not a panic.
fn attempt(ip: &str, port: u16, tag: &str) -> Attempt {
    let result = (|| -> io::Result<Acked> {
        let local: IpAddr = ip.parse().expect("an address");
        let socket = socket2::Socket::new(socket2::Domain::IPV4, socket2::Type::STREAM, None)?;
        socket.bind(&SocketAddr::new(local, 0).into())?;
        socket.connect(&SocketAddr::from(([127, 0, 0, 1], port)).into())?;
        let mut stream: TcpStream = socket.into();
        stream.set_read_timeout(Some(READ_TIMEOUT))?;
        let mut reader = BufReader::new(stream.try_clone()?);
        let greeting = step(&mut stream, &mut reader, b"", 220)?;
        let node = greeting_node(greeting.trim_end());
        step(&mut stream, &mut reader, b"EHLO client.test\r\n", 250)?;
        step(&mut stream, &mut reader, b"MAIL FROM:<s@src.test>\r\n", 250)?;
        step(
            &mut stream,
            &mut reader,
            b"RCPT TO:<u@example.com>\r\n",
            250,
        )?;
        step(&mut stream, &mut reader, b"DATA\r\n", 354)?;
        let mut data = dot_stuff(&body(tag));
        data.extend_from_slice(b".\r\n");
        let reply = step(&mut stream, &mut reader, &data, 250)?;
        let id = queue_id(&reply).expect("queue id");
        // The message is acknowledged: what happens to the session now changes nothing.
        let _ = stream.write_all(b"QUIT\r\n");
        Ok(Acked {
            node,
            id,
            tag: tag.to_string(),
        })
    })();
    match result {
        Ok(acked) => Attempt::Acked(acked),
        Err(error) => Attempt::Lost {
            tag: tag.to_string(),
            error,
        },
    }
}

/// Every Message-ID tag the sink received, with how many times.
fn delivered_tags(sink: &Sink) -> BTreeMap<String, usize> {
    let mut tags = BTreeMap::new();
    for m in sink.messages() {
        let id = field(&m, "Message-ID");
        let tag = id.trim_start_matches('<').trim_end_matches("@src.test>");
        *tags.entry(tag.to_string()).or_insert(0) += 1;
    }
    tags
}

/// Clients sending concurrently through the v2 frontend, one message per session.
const CLIENTS: [&str; 4] = ["127.0.0.11", "127.0.0.12", "127.0.0.13", "127.0.0.14"];
/// Messages each client sends.
const PER_CLIENT: usize = 10;
/// Acknowledged messages after which edge-1 is killed.
const KILL_AFTER: usize = 16;

/// 40 messages from [`CLIENTS`] through the v2 frontend, edge-1 killed with SIGKILL after
/// [`KILL_AFTER`] acknowledgements: every attempt, and whether it started after the kill.
fn load_with_a_kill(edge: &mut Edge) -> Vec<(bool, Attempt)> {
    let acked = AtomicUsize::new(0);
    let killed = AtomicBool::new(false);
    let attempts = Mutex::new(Vec::new());
    let v2 = edge.v2;
    std::thread::scope(|s| {
        for (c, ip) in CLIENTS.iter().enumerate() {
            let (acked, killed, attempts) = (&acked, &killed, &attempts);
            s.spawn(move || {
                for n in 0..PER_CLIENT {
                    let after_kill = killed.load(Ordering::SeqCst);
                    let outcome = attempt(ip, v2, &format!("load-{c}-{n}"));
                    if matches!(outcome, Attempt::Acked(_)) {
                        acked.fetch_add(1, Ordering::SeqCst);
                    }
                    attempts.lock().unwrap().push((after_kill, outcome));
                }
            });
        }
        let reached = wait_until(WAIT, || acked.load(Ordering::SeqCst) >= KILL_AFTER);
        assert!(reached, "{:?}", attempts.lock().unwrap());
        edge.nodes[0].kill9();
        killed.store(true, Ordering::SeqCst);
    });
    attempts.into_inner().unwrap()
}

#[test]
fn a_node_killed_mid_load_loses_nothing_once_the_survivor_adopts_its_spool() {
    let test = "a_node_killed_mid_load_loses_nothing_once_the_survivor_adopts_its_spool";
    // The upstream refuses at MAIL: every message stays queued on the node that took it.
    let Some(mut edge) = Edge::start(test, refusing_sink(), Policy::default()) else {
        return;
    };
    let attempts = load_with_a_kill(&mut edge);
    assert_eq!(attempts.len(), CLIENTS.len() * PER_CLIENT);
    let acked: Vec<&Acked> = (attempts.iter())
        .filter_map(|(_, a)| match a {
            Attempt::Acked(acked) => Some(acked),
            Attempt::Lost { .. } => None,
        })
        .collect();
    let lost: Vec<&String> = (attempts.iter())
        .filter_map(|(_, a)| match a {
            Attempt::Lost { tag, error } => {
                // The connection went with the node; a reply other than the expected one
                // would have failed the test in `step`.
                use io::ErrorKind::*;
                let kinds = [
                    UnexpectedEof,
                    ConnectionReset,
                    BrokenPipe,
                    ConnectionAborted,
                ];
                assert!(kinds.contains(&error.kind()), "{tag}: {error:?}");
                Some(tag)
            }
            Attempt::Acked(_) => None,
        })
        .collect();
    // Only sessions edge-1 held while it died are lost (those it held at the signal, and any
    // its listening socket still took until the process was gone); a session begun after it
    // was gone reached the survivor and was accepted.
    let after_kill = attempts.iter().filter(|(after, _)| *after).count();
    assert!(
        after_kill > 0,
        "no session began after the kill: {attempts:?}"
    );
    for (after_kill, a) in &attempts {
        if *after_kill {
            assert!(
                matches!(a, Attempt::Acked(x) if x.node == "edge-2"),
                "a session after the kill: {a:?}"
            );
        }
    }
    let on_dead: Vec<&&Acked> = acked.iter().filter(|a| a.node == "edge-1").collect();
    let on_survivor = acked.len() - on_dead.len();
    assert!(!on_dead.is_empty() && on_survivor > 0, "{acked:?}");
    for _ in 0..2 {
        let (node, mut c) = greeted("127.0.0.15", edge.v2);
        assert_eq!(node, "edge-2");
        c.expect("QUIT", 221);
    }

    let dead_spool = edge.nodes[0].spool.clone();
    let survivor = &edge.nodes[1];
    let out = survivor.command(&["queue", "adopt", dead_spool.to_str().unwrap()]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let report = String::from_utf8_lossy(&out.stdout).into_owned();
    for a in &on_dead {
        let line = format!("imported {}", a.id);
        assert!(
            report.lines().any(|l| l.starts_with(&line)),
            "{}: {report}",
            a.id
        );
    }
    // What edge-1 committed: every message it acknowledged, and perhaps some whose 250 went
    // with it.
    let imported: usize = (report.lines())
        .find_map(|l| {
            l.strip_suffix(
                " messages imported (0 held, 0 under a new id), 0 already here, 0 refused",
            )
        })
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("no summary: {report}"));
    assert!(
        (on_dead.len()..=on_dead.len() + lost.len()).contains(&imported),
        "{report}"
    );
    accept(&edge.sink);
    let all_there = wait_until(WAIT, || {
        let tags = delivered_tags(&edge.sink);
        acked.iter().all(|a| tags.contains_key(&a.tag))
    });
    assert!(all_there, "{:?}\n{acked:?}", delivered_tags(&edge.sink));
    assert!(
        survivor.wait_for_queue_len(0, WAIT),
        "{:?}",
        survivor.spool_files()
    );
    // Nothing was delivered before the kill (the upstream refused), so nothing may arrive
    // twice: every acknowledged message exactly once, and a message whose 250 was lost with
    // the node (committed, unanswered) at most once.
    let tags = delivered_tags(&edge.sink);
    for a in &acked {
        assert_eq!(tags[&a.tag], 1, "{a:?}");
    }
    for (tag, count) in &tags {
        assert_eq!(*count, 1, "{tag}");
        assert!(
            acked.iter().any(|a| &a.tag == tag) || lost.contains(&tag),
            "{tag}"
        );
    }
    // The adopted ones still carry the Received: field of the node that accepted them.
    for m in edge.sink.messages() {
        let tag = field(&m, "Subject");
        if let Some(a) = on_dead.iter().find(|a| a.tag == tag) {
            let text = String::from_utf8_lossy(&m.data);
            assert!(
                text.contains("\tby edge-1.test (portcullis node edge-1) "),
                "{a:?}: {text}"
            );
        }
    }
    for relay in &edge.nodes {
        let log = relay.log();
        assert_eq!(proxy_warnings(&log), Vec::<&str>::new(), "{log}");
    }
}
