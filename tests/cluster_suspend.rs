//! Suspended logins shared through `[cluster] redis`, against the real binary: two relays
//! (two spools) on one real redis-server, each reached directly. A login suspended with node
//! 1's `user suspend` has its AUTH refused (`535 5.7.8`), its open session closed (`421
//! 4.7.0`) and its queued mail held on node 2;
//! `user resume` on node 2 lifts it on both; `user resume` while the store is down refuses
//! (exit 1) and changes nothing, while `user suspend` then records it on the node alone and
//! says so. Each node names itself in its JSON log lines, its journal (`trace --json`) and the
//! `Received:` field of what it delivers. Skipped when redis-server is not installed
//! (required in CI: `PORTCULLIS_REQUIRE_REDIS=1`).

mod common;

use std::process::{Command, Output};
use std::time::Duration;

use common::queue::{listed, refusing_sink, wait_state};
use common::sink::{Sink, SinkConfig};
use common::*;
use portcullis::cluster::testing::TestRedis;
use serde_json::Value;

const WAIT: Duration = Duration::from_secs(15);

/// A relay named `node` (hostname `relay.test`) sharing `redis`, forwarding to
/// `upstream_port` and retrying every second, logging in `format`: listener 0 is submission
/// (STARTTLS, AUTH required; `alice` and `bob`, password `secret`).
fn node(redis: &str, node: &str, upstream_port: u16, format: &str) -> Relay {
    let dir = TestDir::new();
    write_alice_and_bob(&dir);
    let toml = config(
        &[listener("submission", free_port(), "starttls") + "auth = \"required\"\n"],
        upstream_port,
        &format!(
            "[relay]\naccepted_domains = [\"example.com\"]\n\n\
             [auth]\nusers_file = \"{{dir}}/users.toml\"\n\n[queue]\nretry = [\"1s\"]\n\n\
             [log]\nformat = \"{format}\"\n\n\
             [cluster]\nredis = \"{redis}\"\nnode = \"{node}\"\n"
        ),
    )
    .replace(
        "tls = \"none\"\n\n[relay]",
        "tls = \"none\"\nbackoff = \"1s\"\n\n[relay]",
    );
    Relay::start_in(dir, &toml)
}

/// The reply to AUTH as `login` (right password) in a new session.
fn auth(relay: &Relay, login: &str) -> (u16, String) {
    tls_from(relay, "127.0.0.1").cmd(&auth_plain(login, "secret"))
}

fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// `user list --json` of `relay`: login → row.
fn users(relay: &Relay) -> std::collections::BTreeMap<String, Value> {
    let out = relay.command(&["user", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let rows: Vec<Value> = serde_json::from_str(&stdout(&out)).unwrap();
    (rows.into_iter())
        .map(|r| (r["login"].as_str().unwrap().to_owned(), r))
        .collect()
}

#[test]
fn a_suspension_on_one_node_holds_on_the_other_and_a_resume_there_lifts_it_on_both() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let sink = refusing_sink();
    let one = node(&redis.url(), "edge-1", sink.port(), "text");
    let two = node(&redis.url(), "edge-2", sink.port(), "text");
    let queued = send_as(&two, "alice", "A2");
    let other = send_as(&two, "bob", "B2");
    wait_state(&two, &[&queued, &other], "queued");

    // The relays have read the store (and given it its id).
    assert!(wait_until(WAIT, || redis
        .command(&["GET", "portcullis:suspended:id"])
        .is_some_and(|id| !id.is_empty())));
    // An authenticated session of alice's on node 2, open across the suspension.
    let mut open = tls_from(&two, "127.0.0.1");
    assert_reply(&open.cmd(&auth_plain("alice", "secret")), 235, "2.7.0");
    let asked = std::time::Instant::now();
    let out = one.command(&["user", "suspend", "alice", "--reason", "phished"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out).contains(&format!(
            "shared through the store {}: every node holds it within a second",
            redis.url()
        )),
        "{}",
        show(&out)
    );
    // Recorded on node 1 as held by the store (its id: the relays read it before).
    let record: Value = serde_json::from_slice(
        &std::fs::read(one.dir().join("spool/suspended/616c696365")).unwrap(),
    )
    .unwrap();
    assert_eq!(record["shared"], true);
    assert_eq!(record["node"], "edge-1");
    assert_eq!(
        record["store"].as_str(),
        redis
            .command(&["GET", "portcullis:suspended:id"])
            .as_deref()
    );
    // Node 2 holds alice's queued mail, and only hers, and refuses her AUTH.
    wait_state(&two, &[&queued], "held");
    // Within a poll of node 2 (500 ms) plus the queue manager's hold; 3 s leaves room for a
    // loaded machine.
    let took = asked.elapsed();
    eprintln!("suspended on node 1, held on node 2 after {took:?}");
    assert!(took < Duration::from_secs(3), "{took:?}");
    let list = listed(&two);
    assert_eq!(
        list[&queued]["hold"]["reason"], "login suspended",
        "{list:#?}"
    );
    assert_eq!(list[&other]["state"], "queued");
    assert_reply(&auth(&two, "alice"), 535, "5.7.8");
    assert_reply(&open.cmd("NOOP"), 421, "4.7.0");
    // Node 1 follows its own spool (within a poll too).
    assert!(wait_until(WAIT, || auth(&one, "alice").0 == 535));
    assert_reply(&auth(&one, "alice"), 535, "5.7.8");
    assert_reply(&auth(&two, "bob"), 235, "2.7.0");
    let row = &users(&two)["alice"];
    assert_eq!(row["suspended"], true);
    assert_eq!(row["reason"], "phished");

    // A dry run touches neither the store nor the spool.
    let out = one.command(&["user", "suspend", "bob", "--dry-run"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    let out = two.command(&["user", "resume", "alice", "--dry-run"]);
    assert!(
        stdout(&out).starts_with("would resume alice"),
        "{}",
        show(&out)
    );
    assert_eq!(
        redis.command(&["HKEYS", "portcullis:suspended"]),
        Some("alice".into())
    );
    assert_eq!(users(&two)["alice"]["suspended"], true);

    // Resumed on node 2: both accept her again; her held mail stays held.
    let out = two.command(&["user", "resume", "alice"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(stdout(&out).starts_with("resumed alice"), "{}", show(&out));
    assert_eq!(
        redis.command(&["HEXISTS", "portcullis:suspended", "alice"]),
        Some("0".into())
    );
    // Node 2 follows its own spool, node 1 the store: each within a poll.
    for relay in [&one, &two] {
        assert!(wait_until(WAIT, || auth(relay, "alice").0 == 235));
    }
    assert!(one.wait_for_log("account resumed (on another node", WAIT));
    assert_eq!(users(&one)["alice"]["suspended"], false);
    assert_eq!(listed(&two)[&queued]["state"], "held");

    // A damaged value written into the store by hand suspends its login on every node; `user
    // resume` removes it, though the login is in no users file.
    redis.command(&["HSET", "portcullis:suspended", "mallory", "{not json"]);
    assert!(wait_until(WAIT, || users(&one).get("mallory").is_some_and(
        |r| r["reason"] == "damaged suspension record in the shared store"
    )));
    let out = one.command(&["user", "resume", "mallory"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert_eq!(
        redis.command(&["HLEN", "portcullis:suspended"]),
        Some("0".into())
    );
    for relay in [&one, &two] {
        assert!(wait_until(WAIT, || !users(relay).contains_key("mallory")));
    }
}

#[test]
fn resume_with_the_store_down_refuses_and_suspend_records_on_this_node_alone() {
    let Some(mut redis) = TestRedis::start() else {
        return;
    };
    let dir = TestDir::new();
    write_alice_and_bob(&dir);
    // A password in the URL is never shown (the store asks none: it is stopped before use).
    let url = redis.url().replace("redis://", "redis://default:s3cret@");
    let text = dir.expand(&config(
        &[listener("submission", free_port(), "none")],
        free_port(),
        &format!(
            "[auth]\nusers_file = \"{{dir}}/users.toml\"\n\n\
             [cluster]\nredis = \"{url}\"\nnode = \"edge-1\"\ntimeout = \"200ms\"\n"
        ),
    ));
    let policy = dir.write("portcullis.toml", text);
    portcullis::queue::Spool::open(&dir.join("spool")).unwrap();
    // Every command's output is checked for the password.
    let run = |args: &[&str]| -> Output {
        let out = Command::new(BIN)
            .args(args)
            .arg("--config")
            .arg(&policy)
            .output()
            .unwrap();
        assert!(!show(&out).contains("s3cret"), "{args:?}: {}", show(&out));
        out
    };
    redis.stop();
    let record = dir.join("spool/suspended").join("616c696365");

    let out = run(&["user", "suspend", "alice"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stdout(&out).starts_with("suspended alice"),
        "{}",
        show(&out)
    );
    let shown = redis.url().replace("redis://", "redis://default:***@");
    assert!(
        stderr(&out).contains(&format!("the shared store {shown} cannot be reached ("))
            && stderr(&out).contains("suspended on this node only for now"),
        "{}",
        show(&out)
    );
    let saved: Value = serde_json::from_slice(&std::fs::read(&record).unwrap()).unwrap();
    assert_eq!(saved.get("shared"), None, "not shared: left out");
    assert_eq!(saved["node"], "edge-1");

    let out = run(&["user", "resume", "alice"]);
    assert_eq!(out.status.code(), Some(1), "{}", show(&out));
    assert_eq!(stdout(&out), "");
    assert!(
        stderr(&out).contains(&format!("the shared store {shown} cannot be reached"))
            && stderr(&out).contains("nothing was changed"),
        "{}",
        show(&out)
    );
    assert!(record.exists(), "the local record stays");
    // A dry run asks the store too, and refuses the same way.
    assert_eq!(
        run(&["user", "resume", "alice", "--dry-run"]).status.code(),
        Some(1)
    );
    // The list shows this node's view, and says why.
    let out = run(&["user", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    assert!(
        stderr(&out).contains("this node's suspensions only"),
        "{}",
        show(&out)
    );
}

#[test]
fn each_node_names_itself_in_its_json_log_its_journal_and_received() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let sink = Sink::start(SinkConfig::default());
    let one = node(&redis.url(), "edge-1", sink.port(), "json");
    let id = send_as(&one, "bob", "B1");
    assert!(sink.wait_for(1, WAIT));
    let data = String::from_utf8_lossy(&sink.messages()[0].data).into_owned();
    assert!(
        data.contains(&format!(
            "\tby relay.test (portcullis node edge-1) with ESMTPSA id {id}"
        )),
        "{data}"
    );
    // Every JSON line names the node, the lines of sessions and deliveries included.
    let log = one.log();
    let lines: Vec<Value> = (log.lines())
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    for line in &lines {
        assert_eq!(line["node"], "edge-1", "{line}");
    }
    // Exactly one `node` key per line (a JSON object with two is read differently by each
    // parser).
    for l in log.lines() {
        assert_eq!(l.matches("\"node\":").count(), 1, "{l}");
    }
    assert!(
        lines
            .iter()
            .any(|l| l["queue_id"] == id.as_str() || l["spans"].to_string().contains(&id))
    );
    // The journal: trace --json shows the node on each event.
    assert!(wait_until(WAIT, || {
        let out = one.command(&["trace", &id, "--json"]);
        stdout(&out).contains("\"finished\"")
    }));
    let out = one.command(&["trace", &id, "--json"]);
    let events: Vec<Value> = (stdout(&out).lines())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert!(events.len() >= 3, "{}", show(&out));
    for e in &events {
        assert_eq!(e["node"], "edge-1", "{e}");
    }
    let text = stdout(&one.command(&["trace", &id]));
    assert!(text.contains(" node=edge-1"), "{text}");
}
