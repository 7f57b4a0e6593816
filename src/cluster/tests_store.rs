//! Two nodes (two links, two sets of local tables) on one real Redis: the budgets and AUTH
//! records are shared, expire on their own, and fall back as `on_error` says.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::auth::{self, Begun, Keys};
use super::store::{Gate, SharedStore, Taken};
use super::testing::TestRedis;
use super::*;
use crate::config::{Cluster as Settings, OnError, RedisUrl};
use crate::policy::limits::RateLimit;
use crate::policy::lockout::Settings as LockoutSettings;
use crate::policy::store::{RateKey, Store};

/// One node: its link and its own local tables, under one policy.
struct Node {
    cluster: Arc<Cluster>,
    store: Store,
    _dir: tempfile::TempDir,
}

impl Node {
    fn new(redis: &TestRedis, on_error: OnError, policy: &str) -> Node {
        let settings = Settings {
            redis: Some(RedisUrl::parse(&redis.url()).unwrap()),
            node: "edge".into(),
            on_error,
            timeout: Duration::from_millis(250),
        };
        let cluster = Cluster::new(&settings, Arc::new(Telemetry::new("edge"))).unwrap();
        let (dir, config) = crate::policy::store::alice_policy(policy);
        Node {
            cluster,
            store: Store::new(&config, None, Instant::now()),
            _dir: dir,
        }
    }

    /// Two nodes on `redis` under one policy.
    fn pair(redis: &TestRedis, on_error: OnError, policy: &str) -> (Node, Node) {
        (
            Node::new(redis, on_error, policy),
            Node::new(redis, on_error, policy),
        )
    }

    fn stores(&self) -> SharedStore<'_> {
        SharedStore::new(&self.store, Some(&self.cluster))
    }

    async fn take(&self, limit: RateLimit, key: &RateKey) -> Taken {
        self.stores().take(limit, key, Instant::now()).await
    }

    /// Begin an AUTH and settle it with `success`; `None` when the gate did not let it
    /// through (then the gate's answer).
    async fn auth(&self, client: &str, login: &str, success: bool) -> Result<FailureReport, Gate> {
        match self
            .stores()
            .auth_gate(ip(client), login, Instant::now())
            .await
        {
            Gate::Proceed(attempt) => Ok(attempt.settle(success, Instant::now()).await),
            other => Err(other),
        }
    }
}

use crate::policy::lockout::FailureReport;

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn client(s: &str) -> RateKey {
    RateKey::Client(ip(s))
}

fn limited(rule: &str) -> impl Fn(&Taken) -> bool + '_ {
    move |t| matches!(t, Taken::Limited(l) if l.rule == rule)
}

/// `count` takes alternating between the nodes: what each answered.
async fn alternate(nodes: [&Node; 2], limit: RateLimit, key: &RateKey, count: usize) -> Vec<Taken> {
    let mut answers = Vec::new();
    for i in 0..count {
        answers.push(nodes[i % 2].take(limit, key).await);
    }
    answers
}

#[tokio::test]
async fn a_per_ip_message_budget_of_n_gives_n_across_two_nodes_not_2n() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let policy = "max_failures = 3\n[rate_limits]\nmessages_per_ip = \"4/hour\"";
    let (a, b) = Node::pair(&redis, OnError::Local, policy);
    let key = client("192.0.2.7");
    let answers = alternate([&a, &b], RateLimit::MessagesPerIp, &key, 6).await;
    assert_eq!(answers[..4], [Taken::Allowed; 4]);
    assert!(
        answers[4..]
            .iter()
            .all(limited("rate_limits.messages_per_ip"))
    );
    // Each node's own tables saw only 2 or 3: they would have allowed more.
    let rate_key = "portcullis:rate:messages_per_ip:192.0.2.7";
    let pttl: i64 = redis.command(&["PTTL", rate_key]).unwrap().parse().unwrap();
    // Four of 4/hour taken: the budget is whole again in one hour.
    assert!((3_599_000..=3_600_000).contains(&pttl), "{pttl}");
    // Another client has its own budget.
    assert_eq!(
        b.take(RateLimit::MessagesPerIp, &client("192.0.2.8")).await,
        Taken::Allowed
    );
}

#[tokio::test]
async fn a_per_user_budget_is_shared_and_ipv6_is_keyed_by_its_64() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let policy = "[rate_limits]\nmessages_per_user = \"3/hour\"\nrecipients_per_ip = \"2/hour\"";
    let (a, b) = Node::pair(&redis, OnError::Local, policy);
    let alice = RateKey::Login("alice".into());
    let answers = alternate([&a, &b], RateLimit::MessagesPerUser, &alice, 4).await;
    assert_eq!(answers[..3], [Taken::Allowed; 3]);
    assert!(limited("rate_limits.messages_per_user")(&answers[3]));
    assert_ne!(
        redis.command(&["PTTL", "portcullis:rate:messages_per_user:alice"]),
        Some("-2".into())
    );
    // Two addresses of one /64 share a budget; the next /64 has its own.
    let (first, second) = (client("2001:db8:1:2::1"), client("2001:db8:1:2:ffff::9"));
    assert_eq!(
        a.take(RateLimit::RecipientsPerIp, &first).await,
        Taken::Allowed
    );
    assert_eq!(
        b.take(RateLimit::RecipientsPerIp, &second).await,
        Taken::Allowed
    );
    assert!(limited("rate_limits.recipients_per_ip")(
        &a.take(RateLimit::RecipientsPerIp, &second).await
    ));
    let other = client("2001:db8:1:3::1");
    assert_eq!(
        b.take(RateLimit::RecipientsPerIp, &other).await,
        Taken::Allowed
    );
    let pttl = redis
        .command(&[
            "PTTL",
            "portcullis:rate:recipients_per_ip:2001:db8:1:2::/64",
        ])
        .unwrap();
    assert!(pttl.parse::<i64>().unwrap() > 0, "{pttl}");
    // A login's budget is not a client's and the other way round.
    assert_eq!(
        a.take(RateLimit::MessagesPerUser, &first).await,
        Taken::Allowed
    );
}

#[tokio::test]
async fn budgets_refill_one_event_every_per_over_n_and_their_keys_expire_when_whole() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let policy = "[rate_limits]\nmessages_per_ip = \"5/s\"";
    let (a, b) = Node::pair(&redis, OnError::Local, policy);
    let key = client("198.51.100.4");
    let burst = alternate([&a, &b], RateLimit::MessagesPerIp, &key, 6).await;
    assert_eq!(burst[..5], [Taken::Allowed; 5]);
    assert!(limited("rate_limits.messages_per_ip")(&burst[5]));
    // One event every 200 ms: after 250 ms exactly one more fits.
    tokio::time::sleep(Duration::from_millis(250)).await;
    let refill = alternate([&b, &a], RateLimit::MessagesPerIp, &key, 3).await;
    assert_eq!(refill[0], Taken::Allowed);
    assert!(
        refill[1..]
            .iter()
            .all(limited("rate_limits.messages_per_ip"))
    );
    let rate_key = "portcullis:rate:messages_per_ip:198.51.100.4";
    let pttl: i64 = redis.command(&["PTTL", rate_key]).unwrap().parse().unwrap();
    assert!((1..=1000).contains(&pttl), "{pttl}");
    // Whole again one second after the last event taken: the key is gone.
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(redis.command(&["EXISTS", rate_key]).as_deref(), Some("0"));
    let again = alternate([&a, &b], RateLimit::MessagesPerIp, &key, 6).await;
    assert_eq!(again[..5], [Taken::Allowed; 5]);
    assert!(limited("rate_limits.messages_per_ip")(&again[5]));
}

#[tokio::test]
async fn a_lockout_earned_on_one_node_refuses_on_the_other_and_expires() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let policy = "max_failures = 2\nlockout = \"1s\"\nfailure_window = \"10m\"";
    let (a, b) = Node::pair(&redis, OnError::Local, policy);
    assert_eq!(
        a.auth("192.0.2.9", "alice", false)
            .await
            .unwrap()
            .locked_out,
        None
    );
    let report = b.auth("192.0.2.9", "alice", false).await.unwrap();
    assert_eq!(report.locked_out, Some(2));
    // Node a's own tables saw one failure only; the shared lock refuses it there too.
    assert!(matches!(
        a.auth("192.0.2.9", "bob", true).await,
        Err(Gate::LockedOut)
    ));
    let pttl: i64 = redis
        .command(&["PTTL", "portcullis:auth:lock:192.0.2.9"])
        .unwrap()
        .parse()
        .unwrap();
    assert!((1..=1000).contains(&pttl), "{pttl}");
    // The lockout started a new window: the client hash holds nothing.
    assert_eq!(
        redis
            .command(&["EXISTS", "portcullis:auth:client:192.0.2.9"])
            .as_deref(),
        Some("0")
    );
    tokio::time::sleep(Duration::from_millis(1100)).await;
    assert_eq!(
        a.auth("192.0.2.9", "alice", true).await.unwrap(),
        FailureReport::default()
    );
}

#[tokio::test]
async fn spraying_is_counted_across_nodes_and_a_success_clears_only_its_own_login() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let policy = "max_failures = 3\nfailure_window = \"10m\"";
    let (a, b) = Node::pair(&redis, OnError::Local, policy);
    a.auth("192.0.2.1", "alice", false).await.unwrap();
    b.auth("192.0.2.2", "alice", false).await.unwrap();
    let report = a.auth("192.0.2.3", "alice", false).await.unwrap();
    assert_eq!(report.spraying, Some((3, 3)));
    let login = "portcullis:auth:login:alice";
    assert_eq!(redis.command(&["HGET", login, "f"]).as_deref(), Some("3"));
    assert_eq!(redis.command(&["HGET", login, "n"]).as_deref(), Some("3"));
    let pttl: i64 = redis.command(&["PTTL", login]).unwrap().parse().unwrap();
    assert!((590_000..=600_000).contains(&pttl), "{pttl}");
    // The sprayed login's next AUTH waits (on any node).
    match b
        .stores()
        .auth_gate(ip("192.0.2.50"), "alice", Instant::now())
        .await
    {
        Gate::Proceed(attempt) => {
            assert_eq!(attempt.delay, crate::policy::lockout::SPRAY_BASE_DELAY);
            attempt.release().await;
        }
        other => panic!("{other:?}"),
    }

    // One client fails bob on node a and carol on node b, then alice succeeds on node a.
    let c = "192.0.2.77";
    a.auth(c, "bob", false).await.unwrap();
    b.auth(c, "carol", false).await.unwrap();
    let hash = "portcullis:auth:client:192.0.2.77";
    assert_eq!(redis.command(&["HGET", hash, "f"]).as_deref(), Some("2"));
    b.auth(c, "bob", true).await.unwrap();
    assert_eq!(redis.command(&["HGET", hash, "f"]).as_deref(), Some("1"));
    assert_eq!(redis.command(&["HGET", hash, "l:bob"]).as_deref(), Some(""));
    assert_eq!(
        redis.command(&["HGET", hash, "l:carol"]).as_deref(),
        Some("1")
    );
    let in_flight = "portcullis:auth:inflight:192.0.2.77";
    assert_eq!(redis.command(&["ZCARD", in_flight]).as_deref(), Some("0"));
}

#[tokio::test]
async fn concurrent_begins_from_two_nodes_never_exceed_max_failures() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let policy = "max_failures = 3";
    let (a, b) = Node::pair(&redis, OnError::Local, policy);
    let settings = LockoutSettings {
        max_failures: 3,
        failure_window: Duration::from_secs(600),
        lockout: Duration::from_secs(900),
    };
    let keys = Keys::new(ip("203.0.113.5"), "alice");
    let hold = auth::RESERVATION_HOLD;
    let begins = (0..20).map(|i| {
        let cluster = if i % 2 == 0 { &a.cluster } else { &b.cluster };
        auth::begin(cluster, &keys, settings, hold)
    });
    let answers: Vec<Begun> = futures_util::future::join_all(begins)
        .await
        .into_iter()
        .map(Result::unwrap)
        .collect();
    let ids: Vec<String> = (answers.iter())
        .filter_map(|b| match b {
            Begun::Reserved { id, .. } => Some(id.clone()),
            _ => None,
        })
        .collect();
    assert_eq!(ids.len(), 3);
    assert_eq!(answers.iter().filter(|b| **b == Begun::Busy).count(), 17);
    // Two settle as failures, one is released: one more may begin.
    auth::settle(&a.cluster, &keys, &ids[0], settings, false)
        .await
        .unwrap();
    auth::settle(&b.cluster, &keys, &ids[1], settings, false)
        .await
        .unwrap();
    auth::release(&a.cluster, &keys, &ids[2]).await.unwrap();
    assert!(matches!(
        auth::begin(&b.cluster, &keys, settings, hold).await,
        Ok(Begun::Reserved { .. })
    ));
    assert_eq!(
        auth::begin(&a.cluster, &keys, settings, hold)
            .await
            .unwrap(),
        Begun::Busy
    );

    // Through the composed gate: a reservation held on node a holds node b back.
    let held = match a
        .stores()
        .auth_gate(ip("203.0.113.9"), "alice", Instant::now())
        .await
    {
        Gate::Proceed(attempt) => attempt,
        other => panic!("{other:?}"),
    };
    let b1 = Node::new(&redis, OnError::Local, "max_failures = 1");
    let a1 = Node::new(&redis, OnError::Local, "max_failures = 1");
    drop(held);
    // Dropped without a result, it is recorded as a failure by a task, and its reservation
    // is gone.
    let client_hash = "portcullis:auth:client:203.0.113.9";
    let recorded = || redis.command(&["HGET", client_hash, "f"]).as_deref() == Some("1");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !recorded() {
        assert!(
            Instant::now() < deadline,
            "the dropped attempt was not recorded"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(
        redis
            .command(&["ZCARD", "portcullis:auth:inflight:203.0.113.9"])
            .as_deref(),
        Some("0")
    );
    let first = a1
        .stores()
        .auth_gate(ip("203.0.113.10"), "alice", Instant::now())
        .await;
    assert!(matches!(first, Gate::Proceed(_)), "{first:?}");
    let second = b1
        .stores()
        .auth_gate(ip("203.0.113.10"), "alice", Instant::now())
        .await;
    assert!(matches!(second, Gate::Busy { shared: true }), "{second:?}");
}

#[tokio::test]
async fn redis_stopped_falls_back_to_local_or_tempfails_and_redis_back_is_shared_again() {
    let Some(mut redis) = TestRedis::start() else {
        return;
    };
    let policy = "max_failures = 1\n[rate_limits]\nmessages_per_ip = \"2/hour\"";
    let local = Node::new(&redis, OnError::Local, policy);
    let tempfail = Node::new(&redis, OnError::Tempfail, policy);
    let key = client("192.0.2.30");
    assert_eq!(
        local.take(RateLimit::MessagesPerIp, &key).await,
        Taken::Allowed
    );
    redis.stop();
    // Local: this node's own tables, which counted the first message too.
    assert_eq!(
        local.take(RateLimit::MessagesPerIp, &key).await,
        Taken::Allowed
    );
    assert!(limited("rate_limits.messages_per_ip")(
        &local.take(RateLimit::MessagesPerIp, &key).await
    ));
    assert!(local.auth("192.0.2.31", "alice", false).await.is_ok());
    assert!(matches!(
        local.auth("192.0.2.31", "alice", true).await,
        Err(Gate::LockedOut)
    ));
    assert!(!local.cluster.is_up());
    // Tempfail: no budget is "unlimited"; AUTH is refused; a connection too, even with no
    // connect limit configured, once the store is known to be down.
    assert_eq!(
        tempfail.take(RateLimit::MessagesPerIp, &key).await,
        Taken::Unavailable
    );
    assert!(matches!(
        tempfail.auth("192.0.2.32", "alice", true).await,
        Err(Gate::Unavailable)
    ));
    assert_eq!(
        tempfail.take(RateLimit::ConnectionsPerIp, &key).await,
        Taken::Unavailable
    );
    // The tempfail node's failed attempt gave its local reservation back.
    assert_eq!(
        tempfail
            .store
            .client_state(ip("192.0.2.32"), None, Instant::now())
            .locked_out_secs,
        None
    );

    redis.restart();
    tokio::time::sleep(RETRY_INTERVAL + Duration::from_millis(100)).await;
    assert_eq!(
        tempfail.take(RateLimit::MessagesPerIp, &key).await,
        Taken::Allowed
    );
    assert!(tempfail.cluster.is_up());
    assert_eq!(
        tempfail.take(RateLimit::ConnectionsPerIp, &key).await,
        Taken::Allowed
    );
    assert_eq!(
        local
            .take(RateLimit::MessagesPerIp, &client("192.0.2.40"))
            .await,
        Taken::Allowed
    );
    assert_eq!(
        redis
            .command(&["EXISTS", "portcullis:rate:messages_per_ip:192.0.2.30"])
            .as_deref(),
        Some("1")
    );
    // Shared again: the restarted (empty) store counts from zero across both nodes.
    assert_eq!(
        local.take(RateLimit::MessagesPerIp, &key).await,
        Taken::Allowed
    );
    assert!(limited("rate_limits.messages_per_ip")(
        &tempfail.take(RateLimit::MessagesPerIp, &key).await
    ));
}

#[tokio::test]
async fn the_explained_state_reads_the_shared_budgets_and_lockout_and_says_when_it_cannot() {
    let Some(mut redis) = TestRedis::start() else {
        return;
    };
    let policy = "max_failures = 1\nlockout = \"1h\"\n[rate_limits]\nmessages_per_ip = \"4/hour\"\n\
                  messages_per_user = \"3/hour\"";
    let (a, b) = Node::pair(&redis, OnError::Local, policy);
    let client_ip = ip("192.0.2.60");
    let key = RateKey::Client(client_ip);
    a.take(RateLimit::MessagesPerIp, &key).await;
    a.take(RateLimit::MessagesPerIp, &key).await;
    a.take(RateLimit::MessagesPerUser, &RateKey::Login("alice".into()))
        .await;
    a.auth("192.0.2.60", "alice", false).await.unwrap();
    // Node b saw none of it; what it explains is the shared view.
    let state = read(&b, client_ip).await;
    assert_eq!(state.store.as_deref(), Some("shared"));
    let available = |rule: &str| {
        state
            .budgets
            .iter()
            .find(|x| x.rule == rule)
            .unwrap()
            .available
    };
    assert_eq!(available("rate_limits.messages_per_ip"), 2);
    assert_eq!(available("rate_limits.messages_per_user"), 2);
    assert_eq!(state.locked_out_secs, Some(3600));
    // Reading took nothing.
    assert_eq!(read(&b, client_ip).await, state);

    redis.stop();
    let state = read(&b, client_ip).await;
    let store = state.store.as_deref().unwrap();
    assert!(store.starts_with("local (shared store"), "{store}");
    let available = |rule: &str| {
        state
            .budgets
            .iter()
            .find(|x| x.rule == rule)
            .unwrap()
            .available
    };
    assert_eq!(available("rate_limits.messages_per_ip"), 4);
    assert_eq!(state.locked_out_secs, None);
}

/// What node `node` explains of `client` (and alice): its own view, then the shared one.
async fn read(node: &Node, client: IpAddr) -> crate::policy::store::ClientState {
    let mut state = node
        .store
        .client_state(client, Some("alice"), Instant::now());
    node.stores()
        .read_shared(&mut state, client, Some("alice"))
        .await;
    state
}

#[tokio::test]
async fn a_hostile_login_is_keyed_by_its_first_256_octets_and_cannot_reach_other_keys() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let policy = "max_failures = 2\n[rate_limits]\nmessages_per_user = \"1/hour\"";
    let (a, b) = Node::pair(&redis, OnError::Local, policy);
    // Separators, glob characters, a Lua quote and 12 KiB: one login, cut like locally.
    let login = format!("x:*'\\\n]{}", "é".repeat(6 * 1024));
    let cut = crate::policy::lockout::login_key(&login);
    assert_eq!(cut.len(), 255, "cut on a character boundary");
    a.auth("192.0.2.90", &login, false).await.unwrap();
    // The same 256 octets from another client, on the other node: the same login record.
    let longer = format!("{login}tail");
    b.auth("192.0.2.91", &longer, false).await.unwrap();
    let key = format!("portcullis:auth:login:{}", key_part(cut));
    assert!(
        key.starts_with("portcullis:auth:login:x:*'\\%0A]%C3%A9"),
        "{key}"
    );
    assert_eq!(redis.command(&["HGET", &key, "f"]).as_deref(), Some("2"));
    let user = RateKey::Login(login.clone());
    assert_eq!(
        a.take(RateLimit::MessagesPerUser, &user).await,
        Taken::Allowed
    );
    let user = RateKey::Login(longer);
    assert!(limited("rate_limits.messages_per_user")(
        &b.take(RateLimit::MessagesPerUser, &user).await
    ));
    // Nothing else was written: the two clients' records, the login's and its budget.
    assert_eq!(redis.command(&["DBSIZE"]).as_deref(), Some("4"));
    for client in ["192.0.2.90", "192.0.2.91"] {
        let hash = format!("portcullis:auth:client:{client}");
        assert_eq!(redis.command(&["HGET", &hash, "f"]).as_deref(), Some("1"));
    }
    let budget = format!("portcullis:rate:messages_per_user:{}", key_part(cut));
    assert_eq!(redis.command(&["EXISTS", &budget]).as_deref(), Some("1"));
}

/// Set `redis`'s `maxmemory` below what it uses now, so every write is refused (`OOM` under
/// noeviction) while reads still answer.
fn fill(redis: &TestRedis) {
    let used: u64 = redis
        .command(&["INFO", "memory"])
        .unwrap()
        .lines()
        .find_map(|l| l.strip_prefix("used_memory:"))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    let limit = (used / 2).to_string();
    assert_eq!(
        redis
            .command(&["CONFIG", "SET", "maxmemory", &limit])
            .as_deref(),
        Some("OK")
    );
    let refused = redis.command(&["SET", "portcullis:filler", "x"]);
    assert!(
        refused.as_deref().is_some_and(|r| r.contains("OOM")),
        "{refused:?}"
    );
}

#[tokio::test]
async fn a_full_store_still_holds_a_lockout_and_a_spent_budget_earned_on_another_node() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let policy = "max_failures = 2\nlockout = \"1m\"\nfailure_window = \"10m\"";
    let rates = "[rate_limits]\nmessages_per_ip = \"2/hour\"";
    let policy = format!("{policy}\n{rates}");
    let (a, b) = Node::pair(&redis, OnError::Local, &policy);
    for _ in 0..2 {
        b.auth("192.0.2.70", "alice", false).await.unwrap();
    }
    let key = client("192.0.2.71");
    for _ in 0..2 {
        assert_eq!(b.take(RateLimit::MessagesPerIp, &key).await, Taken::Allowed);
    }
    fill(&redis);
    // First a write the full store refuses: a client it knows nothing of falls back to node
    // a's own tables (on_error local), and node a says the store is full. It must not take the
    // store for gone: reads still answer.
    assert_eq!(
        a.take(RateLimit::MessagesPerIp, &client("192.0.2.72"))
            .await,
        Taken::Allowed
    );
    assert!(!a.cluster.is_up());
    // Node a never saw these clients; the store refuses every write, yet what it holds holds.
    assert!(matches!(
        a.auth("192.0.2.70", "alice", true).await,
        Err(Gate::LockedOut)
    ));
    let spent = a.take(RateLimit::MessagesPerIp, &key).await;
    assert!(limited("rate_limits.messages_per_ip")(&spent), "{spent:?}");
}

#[tokio::test]
async fn a_store_switched_to_an_eviction_policy_while_in_use_is_refused() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let a = Node::new(&redis, OnError::Tempfail, "max_failures = 3");
    let stop = tokio_util::sync::CancellationToken::new();
    tokio::spawn(Arc::clone(&a.cluster).watch(stop.clone()));
    assert_eq!(
        a.auth("192.0.2.80", "alice", false).await.unwrap(),
        FailureReport::default()
    );
    assert!(a.cluster.is_up());
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "allkeys-lru"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while a.cluster.is_up() {
        assert!(
            Instant::now() < deadline,
            "the eviction policy was not noticed"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(matches!(
        a.auth("192.0.2.80", "alice", true).await,
        Err(Gate::Unavailable)
    ));
    redis.command(&["CONFIG", "SET", "maxmemory-policy", "noeviction"]);
    let deadline = Instant::now() + Duration::from_secs(5);
    while !a.cluster.is_up() {
        assert!(Instant::now() < deadline, "the store did not come back");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
}

#[tokio::test]
async fn a_hung_store_holds_no_operation_longer_than_the_timeout() {
    // A listener that accepts and never answers: a hung Redis.
    let hung = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = hung.local_addr().unwrap().port();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((socket, _)) = hung.accept().await {
            held.push(socket);
        }
    });
    let settings = Settings {
        redis: Some(RedisUrl::parse(&format!("redis://127.0.0.1:{port}/0")).unwrap()),
        node: "edge".into(),
        on_error: OnError::Local,
        timeout: Duration::from_millis(250),
    };
    let cluster = Cluster::new(&settings, Arc::new(Telemetry::new("edge"))).unwrap();
    let started = Instant::now();
    let calls = (0..40).map(|_| {
        let cluster = Arc::clone(&cluster);
        tokio::spawn(async move {
            let begun = Instant::now();
            let result = cluster.command::<String>(&redis::cmd("PING")).await;
            (begun.elapsed(), result.is_err())
        })
    });
    for call in calls.collect::<Vec<_>>() {
        let (took, failed) = call.await.unwrap();
        assert!(failed);
        // One connect attempt within the timeout; the sessions queued behind it fail at once.
        assert!(took < Duration::from_millis(400), "{took:?}");
    }
    assert!(started.elapsed() < Duration::from_millis(600));
}

#[tokio::test]
async fn a_reservation_never_settled_lapses_after_its_hold_and_a_lowered_limit_locks_out() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let a = Node::new(&redis, OnError::Local, "max_failures = 1");
    let settings = LockoutSettings {
        max_failures: 1,
        failure_window: Duration::from_secs(600),
        lockout: Duration::from_secs(900),
    };
    let keys = Keys::new(ip("203.0.113.30"), "alice");
    // A node that reserved and then lost its settle (died, or the store did not answer it).
    let hold = Duration::from_millis(300);
    let lost = auth::begin(&a.cluster, &keys, settings, hold)
        .await
        .unwrap();
    assert!(matches!(lost, Begun::Reserved { .. }), "{lost:?}");
    assert_eq!(
        auth::begin(&a.cluster, &keys, settings, hold)
            .await
            .unwrap(),
        Begun::Busy
    );
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match auth::begin(&a.cluster, &keys, settings, hold)
            .await
            .unwrap()
        {
            Begun::Reserved { .. } => break,
            Begun::Busy => assert!(
                Instant::now() < deadline,
                "the lost reservation never lapsed"
            ),
            other => panic!("{other:?}"),
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // Failures at or above a lowered max_failures (a reload, or nodes mid-change) lock out
    // rather than answer "busy" for the rest of the window.
    let other = Keys::new(ip("203.0.113.31"), "alice");
    let loose = LockoutSettings {
        max_failures: 3,
        ..settings
    };
    for _ in 0..2 {
        let Begun::Reserved { id, .. } =
            auth::begin(&a.cluster, &other, loose, hold).await.unwrap()
        else {
            panic!("not reserved");
        };
        auth::settle(&a.cluster, &other, &id, loose, false)
            .await
            .unwrap();
    }
    assert_eq!(
        auth::begin(&a.cluster, &other, settings, hold)
            .await
            .unwrap(),
        Begun::LockedOut
    );
}
