//! Sessions of the real driver with `[cluster]`: what each stage costs in operations on the
//! shared store (the link's counter), with all four `[rate_limits]` budgets and `[auth]`.

use super::*;
use crate::cluster::Cluster;
use crate::cluster::testing::TestRedis;

/// All four budgets, STARTTLS and AUTH for alice (password `secret`).
const POLICY: &str = "[tls]\ncert = \"{dir}/cert.pem\"\nkey = \"{dir}/key.pem\"\n\
     [auth]\nusers_file = \"{dir}/users.toml\"\nmax_failures = 3\n\
     [rate_limits]\nconnections_per_ip = \"100/min\"\nmessages_per_ip = \"100/min\"\n\
     recipients_per_ip = \"100/min\"\nmessages_per_user = \"100/min\"\n";

/// A session of the driver under `runtime` whose sessions share `cluster`.
fn clustered(dir: tempfile::TempDir, runtime: Arc<Runtime>, cluster: &Arc<Cluster>) -> Harness {
    let mut parts = Parts::new(dir.path(), &runtime, None);
    parts.shared.cluster = Some(Arc::clone(cluster));
    let (client, server) = tokio::io::duplex(64 * 1024);
    let listener = runtime.config.listeners[0].clone();
    let peer: SocketAddr = PEER.parse().unwrap();
    let (driver_runtime, shared) = (Arc::clone(&runtime), parts.shared.clone());
    let session = tokio::spawn(async move {
        let mut driver = SessionDriver::new(driver_runtime, listener, Arc::new(shared), peer);
        driver.run(server).await;
    });
    Harness::assemble(dir, runtime, parts, Box::new(client), session)
}

fn start(redis: &TestRedis) -> (Harness, Arc<Cluster>) {
    let dir = tempfile::tempdir().unwrap();
    let hash = crate::policy::credentials::hash_password("secret").unwrap();
    let users = format!(
        "[[users]]\nname = \"alice\"\npassword_hash = \"{hash}\"\nsenders = [\"alice@example.com\"]\n"
    );
    std::fs::write(dir.path().join("users.toml"), users).unwrap();
    super::super::tls::write_cert_files(dir.path(), "localhost").unwrap();
    let listener = "tls = \"starttls\"\nauth = \"optional\"";
    let runtime = Arc::new(runtime(dir.path(), listener, POLICY));
    let settings = crate::config::Cluster {
        redis: Some(crate::config::RedisUrl::parse(&redis.url()).unwrap()),
        node: "edge-1".into(),
        on_error: crate::config::OnError::Local,
        timeout: Duration::from_secs(1),
    };
    let telemetry = Arc::new(crate::observe::Telemetry::new("edge-1"));
    let cluster = Cluster::new(&settings, telemetry).unwrap();
    (clustered(dir, runtime, &cluster), cluster)
}

/// Operations since `*before`, which moves on.
fn spent(cluster: &Cluster, before: &mut u64) -> u64 {
    let now = cluster.operations();
    std::mem::replace(before, now).abs_diff(now)
}

#[tokio::test]
async fn a_message_costs_one_operation_per_budget_and_auth_two() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let (mut h, cluster) = start(&redis);
    // The connection is opened on first use: connect and the eviction policy check.
    let mut ops = 0;
    assert!(h.reply().await.starts_with("220 "));
    assert_eq!(
        spent(&cluster, &mut ops),
        2 + 1,
        "connect: connections_per_ip"
    );
    h.cmd("EHLO client.test").await;
    h.starttls().await;
    h.cmd("EHLO client.test").await;
    assert_eq!(spent(&cluster, &mut ops), 0, "EHLO, STARTTLS");
    let encoded = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "\0alice\0secret",
    );
    let auth = h.cmd(&format!("AUTH PLAIN {encoded}")).await;
    assert!(auth.starts_with("235 "), "{auth}");
    assert_eq!(spent(&cluster, &mut ops), 2, "AUTH: begin and settle");
    for _ in 0..2 {
        assert!(
            h.cmd("MAIL FROM:<alice@example.com>")
                .await
                .starts_with("250 ")
        );
        assert_eq!(
            spent(&cluster, &mut ops),
            2,
            "MAIL: the user's and the client's"
        );
        assert!(h.cmd("RCPT TO:<u@example.com>").await.starts_with("250 "));
        assert!(h.cmd("RCPT TO:<v@example.com>").await.starts_with("250 "));
        assert_eq!(spent(&cluster, &mut ops), 2, "RCPT: one each");
        assert!(h.cmd("DATA").await.starts_with("354 "));
        let queued = h
            .cmd("From: <alice@example.com>\r\nSubject: t\r\n\r\nhi\r\n.")
            .await;
        assert!(queued.starts_with("250 "), "{queued}");
        assert_eq!(spent(&cluster, &mut ops), 0, "DATA");
    }
    // What the store holds for this session: one TAT per budget, each expiring.
    for key in [
        "portcullis:rate:connections_per_ip:192.0.2.1",
        "portcullis:rate:messages_per_ip:192.0.2.1",
        "portcullis:rate:recipients_per_ip:192.0.2.1",
        "portcullis:rate:messages_per_user:alice",
    ] {
        let pttl: i64 = redis.command(&["PTTL", key]).unwrap().parse().unwrap();
        assert!((1..=60_000).contains(&pttl), "{key}: {pttl}");
    }
}

#[tokio::test]
async fn an_auth_held_back_by_another_nodes_verifications_goes_on_once_they_end() {
    let Some(redis) = TestRedis::start() else {
        return;
    };
    let (mut h, cluster) = start(&redis);
    // Another node verifies three passwords of this client: its whole failure budget.
    let settings = crate::policy::lockout::Settings {
        max_failures: 3,
        failure_window: Duration::from_secs(600),
        lockout: Duration::from_secs(900),
    };
    let other = Arc::clone(&cluster);
    let keys = crate::cluster::auth::Keys::new(PEER.parse::<SocketAddr>().unwrap().ip(), "bob");
    let mut ids = Vec::new();
    for _ in 0..3 {
        let begun = crate::cluster::auth::begin(&other, &keys, settings, Duration::from_secs(60));
        match begun.await {
            Ok(crate::cluster::auth::Begun::Reserved { id, .. }) => ids.push(id),
            other => panic!("{other:?}"),
        }
    }
    assert!(h.reply().await.starts_with("220 "));
    h.cmd("EHLO client.test").await;
    h.starttls().await;
    h.cmd("EHLO client.test").await;
    let release = tokio::spawn(async move {
        tokio::time::sleep(Duration::from_millis(300)).await;
        for id in &ids {
            crate::cluster::auth::release(&other, &keys, id)
                .await
                .unwrap();
        }
    });
    let started = std::time::Instant::now();
    let encoded = base64::Engine::encode(
        &base64::engine::general_purpose::STANDARD,
        "\0alice\0secret",
    );
    let auth = h.cmd(&format!("AUTH PLAIN {encoded}")).await;
    assert!(auth.starts_with("235 "), "{auth}");
    // Answered within a poll or two of the release, not at the end of AUTH_WAIT.
    let waited = started.elapsed();
    assert!(
        waited >= Duration::from_millis(300) && waited < Duration::from_secs(2),
        "{waited:?}"
    );
    release.await.unwrap();
}
