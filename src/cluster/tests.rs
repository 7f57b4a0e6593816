use std::sync::Arc;
use std::time::Duration;

use super::testing::TestRedis;
use super::*;
use crate::config::{Cluster as Settings, OnError, RedisUrl};
use crate::observe::alerts::AlertName;

fn cluster(url: &str, on_error: OnError) -> (Arc<Cluster>, Arc<Telemetry>) {
    let telemetry = Arc::new(Telemetry::new("edge-1"));
    let settings = Settings {
        redis: Some(RedisUrl::parse(url).unwrap()),
        node: "edge-1".into(),
        on_error,
        timeout: Duration::from_millis(250),
    };
    (
        Cluster::new(&settings, telemetry.clone()).unwrap(),
        telemetry,
    )
}

fn fallback_raised(telemetry: &Telemetry) -> bool {
    telemetry.alerts.external_conditions().iter().any(|c| {
        c.alert == AlertName::ClusterFallback && c.level == crate::observe::alerts::Level::Firing
    })
}

#[test]
fn a_redis_url_never_shows_its_password() {
    let url = RedisUrl::parse("redis://relay:s3cret@127.0.0.1:6379/2").unwrap();
    assert_eq!(url.to_string(), "redis://relay:***@127.0.0.1:6379/2");
    assert_eq!(
        format!("{url:?}"),
        "RedisUrl(redis://relay:***@127.0.0.1:6379/2)"
    );
    let socket = RedisUrl::parse("redis+unix:///run/redis/redis.sock?db=2&pass=s3cret").unwrap();
    assert_eq!(
        socket.to_string(),
        "redis+unix:///run/redis/redis.sock?db=2&pass=***"
    );
    let user_only = RedisUrl::parse("redis://relay@127.0.0.1/0").unwrap();
    assert_eq!(user_only.to_string(), "redis://relay@127.0.0.1/0");
    let encoded = RedisUrl::parse("redis+unix:///run/redis.sock?db=1&%70ass=s3cret").unwrap();
    assert_eq!(
        encoded.to_string(),
        "redis+unix:///run/redis.sock?db=1&%70ass=***"
    );
    let odd = RedisUrl::parse("redis://relay:s3c@r:et@127.0.0.1:6379/0?password=s3cret").unwrap();
    assert!(!odd.to_string().contains("s3c"), "{odd}");
    let bare = RedisUrl::parse("redis://127.0.0.1:6379/0").unwrap();
    assert_eq!(bare.to_string(), "redis://127.0.0.1:6379/0");
    let error = RedisUrl::parse("rediss://relay:s3cret@127.0.0.1/0").unwrap_err();
    assert!(!error.contains("s3cret"), "{error}");
    let error = RedisUrl::parse("http://relay:s3cret@127.0.0.1/0").unwrap_err();
    assert!(!error.contains("s3cret"), "{error}");
}

#[tokio::test]
async fn a_store_that_goes_away_falls_back_and_comes_back_by_itself() {
    let Some(mut redis) = TestRedis::start() else {
        return;
    };
    let (cluster, telemetry) = cluster(&redis.url(), OnError::Local);
    let pong: String = cluster.command(&redis::cmd("PING")).await.unwrap();
    assert_eq!(pong, "PONG");
    assert!(cluster.is_up());
    redis.stop();
    let err = cluster
        .command::<String>(&redis::cmd("PING"))
        .await
        .unwrap_err();
    assert!(matches!(err, Unavailable::Redis(_)), "{err:?}");
    assert!(!cluster.is_up());
    assert!(fallback_raised(&telemetry));
    // Within the retry interval the store is not asked: the answer is at once.
    let err = cluster
        .command::<String>(&redis::cmd("PING"))
        .await
        .unwrap_err();
    assert!(matches!(err, Unavailable::Down), "{err:?}");
    redis.restart();
    tokio::time::sleep(RETRY_INTERVAL).await;
    let pong: String = cluster.command(&redis::cmd("PING")).await.unwrap();
    assert_eq!(pong, "PONG");
    assert!(cluster.is_up());
    assert!(!fallback_raised(&telemetry));
}

#[tokio::test]
async fn an_evicting_store_is_refused() {
    let Some(redis) = TestRedis::start_with("allkeys-lru") else {
        return;
    };
    let (cluster, telemetry) = cluster(&redis.url(), OnError::Local);
    let err = cluster
        .command::<String>(&redis::cmd("PING"))
        .await
        .unwrap_err();
    assert!(
        matches!(&err, Unavailable::Evicting(p) if p == "allkeys-lru"),
        "{err:?}"
    );
    assert!(fallback_raised(&telemetry));
}

#[tokio::test]
async fn an_unreachable_store_fails_within_the_timeout() {
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let (cluster, _t) = cluster(&format!("redis://127.0.0.1:{port}/0"), OnError::Tempfail);
    let started = std::time::Instant::now();
    assert!(
        cluster
            .command::<String>(&redis::cmd("PING"))
            .await
            .is_err()
    );
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!cluster.is_up());
}
