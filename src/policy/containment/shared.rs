//! Suspensions shared through the store of `[cluster] redis`: the hash
//! `portcullis:suspended`, field = the login, value = a JSON [`Stored`].
//!
//! It is the one thing in the store without a TTL: a suspension lasts until an operator
//! resumes it (`HDEL`), on whichever node. Each node's `SPOOL/suspended/` stays its durable
//! view (what its queue manager, `user list`, `policy explain` and a restart while the store
//! is down read); a record there says whether the store is known to hold it
//! ([`Suspension::shared`], with the store's id). Every poll of
//! [`super::Containment::watch`] brings both in line:
//! - a login in the store and not here: recorded here (shared) and held;
//! - a record here not yet shared: `HSETNX` (the first suspension of a login stays), then
//!   marked shared;
//! - a shared record here whose login the store no longer holds: resumed on another node,
//!   removed here.
//!
//! A record is marked shared only after its login was put in the store (by the relay, under
//! the lock of its exchanges with the store; by `portcullis user suspend`, before it writes
//! the record), and a poll reads `SPOOL/suspended/` before the store: so a shared record is
//! missing from a later read of the store only when someone removed it there (`portcullis
//! user resume`).
//!
//! A store that lost its data (restarted without persistence, flushed) must not read as
//! "every login resumed": the store carries an id (`portcullis:suspended:id`, set by the first
//! node that reads it), each shared record names it, and a record shared with another id is
//! pushed again instead.
//!
//! A value that is not a sound [`Stored`] (damaged, or written by other software) still
//! suspends the login its field names (never fail open), with a reason saying so, logged once;
//! it is left in the store for an operator (`user resume` removes it). A field that is not a
//! login (empty, not UTF-8, longer than [`LOGIN_MAX`]) is logged once and otherwise ignored:
//! no AUTH can name it.
//!
//! Whatever `[cluster] on_error` says, a node that cannot reach the store keeps every
//! suspension it holds (suspensions fail closed) and catches up when the store answers.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use crate::cluster::{self, Cluster, Unavailable};
use crate::queue::suspended::{OPERATOR_RULE, Suspension};

/// Most suspended logins read from the store in one poll; past it the rest are not seen
/// (logged), and no shared record is taken for resumed while it is reached.
pub const READ_MAX: usize = 10_000;

/// Longest value read from the store, in octets (a sound one is a few hundred); a longer one
/// is cut, and so read as damaged.
pub const VALUE_MAX: usize = 4096;

/// Longest field (login) taken from the store, in octets; a longer one is not a login (an
/// AUTH command line could not carry it).
pub const LOGIN_MAX: usize = 4096;

/// Most damaged fields remembered as logged (past it, the memory starts afresh and they are
/// logged again).
const WARNED_MAX: usize = 10_000;

/// The hash of the suspended logins.
pub fn hash_key() -> String {
    cluster::key(&["suspended"])
}

/// The key of the store's id (see the module doc).
pub fn id_key() -> String {
    cluster::key(&["suspended", "id"])
}

/// A suspension as the store holds it (the login is the field).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Stored {
    /// The rule that suspended it (see [`Suspension::rule`]).
    pub rule: String,
    /// One line for a person.
    pub reason: String,
    /// When it was suspended, in milliseconds since the Unix epoch.
    pub since_ms: u64,
    /// The `[cluster] node` that suspended it.
    #[serde(default)]
    pub node: Option<String>,
}

/// What one read of the store found.
#[derive(Debug, Default, Clone, PartialEq, Eq)]
pub struct Remote {
    /// The suspended logins read (at most [`READ_MAX`]), each as a local record
    /// (`shared = true`).
    pub suspensions: HashMap<String, Suspension>,
    /// Fields read whose value is not a sound [`Stored`] (they are in `suspensions` too, as
    /// damaged), and fields that are not logins: `field: why`, for the log.
    pub damaged: Vec<String>,
    /// How many fields the store holds; more than `read` when [`READ_MAX`] was reached.
    pub total: u64,
    /// How many fields were read.
    pub read: u64,
    /// The store's id.
    pub store: String,
}

impl Remote {
    /// Whether every field of the store was read.
    pub fn complete(&self) -> bool {
        self.total <= self.read
    }
}

/// Reads at most ARGV[1] fields of KEYS[1], values cut to ARGV[2] octets, and the store's
/// id KEYS[2] (set to ARGV[3] when it has none): {HLEN, id, {f, v, ...}}.
const READ_SCRIPT: &str = r"
local cap = tonumber(ARGV[1])
local cut = tonumber(ARGV[2])
local id = redis.call('GET', KEYS[2])
if not id then
  id = ARGV[3]
  redis.call('SET', KEYS[2], id)
end
local total = redis.call('HLEN', KEYS[1])
local out = {}
local cursor = '0'
repeat
  local r = redis.call('HSCAN', KEYS[1], cursor, 'COUNT', 1000)
  cursor = r[1]
  for i = 1, #r[2], 2 do
    if #out >= cap * 2 then return {total, id, out} end
    out[#out + 1] = r[2][i]
    out[#out + 1] = string.sub(r[2][i + 1], 1, cut)
  end
until cursor == '0'
return {total, id, out}
";

/// Every suspended login of the store (at most [`READ_MAX`]), in one atomic script.
///
/// # Errors
/// [`Unavailable`]: the store is not reachable (nothing can be said of any login).
pub async fn read(cluster: &Cluster) -> Result<Remote, Unavailable> {
    read_at_most(cluster, READ_MAX).await
}

/// [`read`], at most `cap` logins.
///
/// # Errors
/// As [`read`].
pub async fn read_at_most(cluster: &Cluster, cap: usize) -> Result<Remote, Unavailable> {
    static SCRIPT: std::sync::LazyLock<redis::Script> =
        std::sync::LazyLock::new(|| redis::Script::new(READ_SCRIPT));
    let mut invocation = SCRIPT.key(hash_key());
    // A fresh id, should the store have none: unique enough across nodes and restarts.
    let fresh = format!(
        "{}-{}-{}",
        cluster.node(),
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    );
    invocation.key(id_key()).arg(cap).arg(VALUE_MAX).arg(fresh);
    let (total, store, flat): (u64, String, Vec<Vec<u8>>) =
        cluster.read_script(&invocation).await?;
    let mut remote = Remote {
        total,
        read: (flat.len() / 2) as u64,
        store,
        ..Remote::default()
    };
    for pair in flat.chunks_exact(2) {
        let field = match String::from_utf8(pair[0].clone()) {
            Ok(login) if !login.is_empty() && login.len() <= LOGIN_MAX => login,
            _ => {
                let shown: String = String::from_utf8_lossy(&pair[0]).chars().take(64).collect();
                remote.damaged.push(format!("{shown:?}: not a login"));
                continue;
            }
        };
        let mut suspension = match serde_json::from_slice::<Stored>(&pair[1]) {
            Ok(stored) => local(&field, stored),
            Err(e) => {
                remote.damaged.push(format!("{field}: {e}"));
                damaged(&field)
            }
        };
        suspension.store = Some(remote.store.clone());
        remote.suspensions.insert(field, suspension);
    }
    Ok(remote)
}

/// The local record of `login` for `stored` (shared; the store's id not set).
pub fn local(login: &str, stored: Stored) -> Suspension {
    Suspension {
        login: login.to_owned(),
        rule: stored.rule,
        reason: stored.reason,
        since_ms: stored.since_ms,
        node: stored.node,
        shared: true,
        store: None,
    }
}

/// What a damaged value of the store suspends `login` as.
fn damaged(login: &str) -> Suspension {
    Suspension {
        login: login.to_owned(),
        rule: OPERATOR_RULE.to_owned(),
        reason: "damaged suspension record in the shared store".to_owned(),
        since_ms: 0,
        node: None,
        shared: true,
        store: None,
    }
}

/// Put `s` in the store unless its login is there already (`HSETNX`: the first suspension
/// stays). True when this one was stored.
///
/// # Errors
/// [`Unavailable`]: not stored.
pub async fn push(cluster: &Cluster, s: &Suspension) -> Result<bool, Unavailable> {
    let stored = Stored {
        rule: s.rule.clone(),
        reason: s.reason.clone(),
        since_ms: s.since_ms,
        node: s.node.clone(),
    };
    let value = serde_json::to_string(&stored).unwrap_or_default();
    let set: i64 = cluster
        .command(
            redis::cmd("HSETNX")
                .arg(hash_key())
                .arg(&s.login)
                .arg(value),
        )
        .await?;
    Ok(set == 1)
}

/// `login`'s suspension in the store, if it holds one (a damaged value as [`read`] takes it).
///
/// # Errors
/// [`Unavailable`].
pub async fn get(cluster: &Cluster, login: &str) -> Result<Option<Suspension>, Unavailable> {
    let value: Option<Vec<u8>> = cluster
        .command(redis::cmd("HGET").arg(hash_key()).arg(login))
        .await?;
    Ok(value.map(|v| match serde_json::from_slice::<Stored>(&v) {
        Ok(stored) => local(login, stored),
        Err(_) => damaged(login),
    }))
}

/// The store's id (see the module doc); `None` before a relay first read the store.
///
/// # Errors
/// [`Unavailable`].
pub async fn store_id(cluster: &Cluster) -> Result<Option<String>, Unavailable> {
    cluster.command(redis::cmd("GET").arg(id_key())).await
}

/// Remove `login` from the store (`HDEL`): resumed on every node. True when it was there.
///
/// # Errors
/// [`Unavailable`]: nothing removed.
pub async fn lift(cluster: &Cluster, login: &str) -> Result<bool, Unavailable> {
    let removed: i64 = cluster
        .command(redis::cmd("HDEL").arg(hash_key()).arg(login))
        .await?;
    Ok(removed == 1)
}

impl super::Containment {
    /// One exchange with the store (see the module doc): read it, push the suspensions it
    /// does not hold yet, then bring the spool and memory in line. Nothing without a store,
    /// and nothing while it is unreachable (the link logs that and raises `cluster_fallback`;
    /// every local suspension holds meanwhile).
    pub async fn sync_store(self: &std::sync::Arc<Self>) {
        let Some(cluster) = self.cluster.clone() else {
            return;
        };
        let _sync = self.sync.lock().await;
        let Ok(remote) = read(&cluster).await else {
            return;
        };
        self.note_remote(&remote);
        *self.store_id.lock().unwrap_or_else(|p| p.into_inner()) = Some(remote.store.clone());
        let pushed = self.push_unshared(&cluster, &remote.store).await;
        let this = std::sync::Arc::clone(self);
        let settled = tokio::task::spawn_blocking(move || this.settle(&remote, &pushed)).await;
        if let Err(e) = settled {
            tracing::error!(error = %e, "following the shared suspended logins failed");
        }
    }

    /// Log what [`read`] found wrong, each field once; and the cap, once each time it is
    /// reached.
    fn note_remote(&self, remote: &Remote) {
        let mut warned = self.warned_store.lock().unwrap_or_else(|p| p.into_inner());
        if warned.len() > WARNED_MAX {
            warned.clear();
        }
        for why in &remote.damaged {
            if warned.insert(why.clone()) {
                tracing::warn!(entry = %crate::policy::lockout::login_key(why),
                    "not a sound suspension in the shared store; a login it names stays suspended on every node until resumed");
            }
        }
        let capped = !remote.complete();
        if capped && !self.capped.swap(true, std::sync::atomic::Ordering::Relaxed) {
            tracing::error!(
                total = remote.total,
                read = remote.read,
                limit = READ_MAX,
                "more suspended logins in the shared store than a poll reads; the rest are not seen here, and no suspension is taken for resumed elsewhere until they are fewer"
            );
        } else if !capped {
            self.capped
                .store(false, std::sync::atomic::Ordering::Relaxed);
        }
    }

    /// Push every suspension held here that the store (whose id is `store`) is not known to
    /// hold, then mark each record shared. Stops at the first failure (the store is down: the
    /// rest wait for the next poll). The logins pushed.
    pub(super) async fn push_unshared(
        self: &std::sync::Arc<Self>,
        cluster: &Cluster,
        store: &str,
    ) -> Vec<String> {
        let unshared: Vec<Suspension> = (self.read().values())
            .filter(|h| !known_to(&h.suspension, store))
            .map(|h| h.suspension.clone())
            .collect();
        let mut pushed = Vec::new();
        for s in unshared {
            if push(cluster, &s).await.is_err() {
                break;
            }
            let login = crate::policy::lockout::login_key(&s.login);
            if s.shared {
                // Known to an earlier store: this one lost its data (or was replaced), and the
                // suspension goes back rather than reading as resumed.
                tracing::warn!(%login,
                    "suspension put back into the shared store, which lost its data (its id changed); \
                     `portcullis user resume` lifts it on every node");
            } else {
                tracing::info!(%login, "suspension shared with the other nodes");
            }
            pushed.push(s.login);
        }
        if pushed.is_empty() {
            return pushed;
        }
        let this = std::sync::Arc::clone(self);
        let (logins, store) = (pushed.clone(), store.to_owned());
        let marked = tokio::task::spawn_blocking(move || this.mark_shared(&logins, &store)).await;
        if let Err(e) = marked {
            tracing::error!(error = %e, "marking the suspensions shared failed");
        }
        pushed
    }

    /// Mark `logins`' records shared with the store `store`, on the spool and then in memory.
    /// Blocking.
    fn mark_shared(&self, logins: &[String], store: &str) {
        let _disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        for login in logins {
            match self.spool.mark_shared(login, store) {
                Ok(true) => {
                    if let Some(held) = self.write().get_mut(login) {
                        held.suspension.shared = true;
                        held.suspension.store = Some(store.to_owned());
                    }
                }
                // No sound record (not written yet, or damaged): pushed again next poll.
                Ok(false) => {}
                Err(e) => {
                    tracing::error!(login = %crate::policy::lockout::login_key(login), error = %e,
                        "cannot mark the suspension record shared; it is pushed again at the next poll");
                }
            }
        }
    }

    /// Bring the spool and memory in line with `remote` (read before `pushed` were pushed):
    /// its logins not held here are recorded and held; shared ones it lacks were resumed
    /// elsewhere and are removed. Blocking.
    fn settle(&self, remote: &Remote, pushed: &[String]) {
        let _disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        let mut changed = false;
        let new: Vec<&Suspension> = (remote.suspensions.values())
            .filter(|s| !self.read().contains_key(&s.login))
            .collect();
        for s in new {
            let saved = match self.spool.suspend_login(s) {
                Ok(_) => true,
                Err(e) => {
                    tracing::error!(login = %crate::policy::lockout::login_key(&s.login), error = %e,
                        "cannot record a shared suspension under the spool; it holds in memory");
                    false
                }
            };
            changed |= self.insert(s.clone(), saved);
        }
        let resumed: Vec<String> = if remote.complete() {
            (self.read().iter())
                .filter(|(login, h)| {
                    known_to(&h.suspension, &remote.store)
                        && !remote.suspensions.contains_key(login.as_str())
                        && !pushed.contains(login)
                })
                .map(|(login, _)| login.clone())
                .collect()
        } else {
            Vec::new()
        };
        for login in resumed {
            if let Err(e) = self.spool.resume_login(&login) {
                tracing::error!(login = %crate::policy::lockout::login_key(&login), error = %e,
                    "resumed on another node, but its record here cannot be removed; it stays suspended here until it can");
                continue;
            }
            self.forget(&login);
            tracing::info!(login = %crate::policy::lockout::login_key(&login),
                "account resumed (on another node, through the shared store): AUTH allowed again; its held mail stays held until released");
            changed = true;
        }
        if changed {
            self.published();
        }
    }
}

/// Whether `s` is known to be held by the store whose id is `store`.
fn known_to(s: &Suspension, store: &str) -> bool {
    s.shared && s.store.as_deref() == Some(store)
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::*;
    use crate::cluster::testing::TestRedis;
    use crate::config::{Cluster as Settings, OnError, RedisUrl};
    use crate::observe::Telemetry;
    use crate::policy::containment::{Containment, Trip};
    use crate::queue::Spool;

    /// One node: its spool, its link, its containment.
    struct Node {
        _dir: tempfile::TempDir,
        spool: Spool,
        cluster: Arc<Cluster>,
        containment: Arc<Containment>,
    }

    fn node(redis: &TestRedis, name: &str) -> Node {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let telemetry = Arc::new(Telemetry::new(name));
        let settings = Settings {
            redis: Some(RedisUrl::parse(&redis.url()).unwrap()),
            node: name.into(),
            on_error: OnError::Local,
            timeout: Duration::from_millis(250),
        };
        let cluster = Cluster::new(&settings, telemetry.clone()).unwrap();
        let containment =
            Containment::open(spool.clone(), telemetry, Some(cluster.clone())).unwrap();
        Node {
            _dir: dir,
            spool,
            cluster,
            containment: Arc::new(containment),
        }
    }

    fn trip() -> Trip {
        Trip {
            rule: "containment_client_ips",
            reason: "logins from more than 3 client addresses within an hour".into(),
        }
    }

    /// Poll `node` until `done` (the store was marked down and is asked again after
    /// [`crate::cluster::RETRY_INTERVAL`]); at most 5 s.
    async fn sync_until(node: &Node, done: impl Fn(&Node) -> bool) {
        let deadline = std::time::Instant::now() + Duration::from_secs(5);
        while !done(node) {
            assert!(std::time::Instant::now() < deadline, "not in line in 5 s");
            tokio::time::sleep(Duration::from_millis(100)).await;
            node.containment.sync_store().await;
        }
    }

    #[tokio::test]
    async fn a_suspension_on_one_node_holds_on_the_other_and_a_resume_there_lifts_it_here() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let (one, two) = (node(&redis, "edge-1"), node(&redis, "edge-2"));
        one.containment.sync_store().await;
        two.containment.sync_store().await;
        let changes = two.containment.subscribe();
        one.containment.suspend("alice", trip()).await;
        // Pushed at once, with the node that suspended it.
        let value = redis
            .command(&["HGET", "portcullis:suspended", "alice"])
            .unwrap();
        let stored: Stored = serde_json::from_str(&value).unwrap();
        assert_eq!(stored.rule, "containment_client_ips");
        assert_eq!(stored.node.as_deref(), Some("edge-1"));
        let id = redis.command(&["GET", "portcullis:suspended:id"]).unwrap();
        let mine = one.spool.suspension("alice").unwrap().unwrap();
        assert!(mine.shared);
        assert_eq!(mine.store.as_deref(), Some(id.as_str()));

        // One poll of node 2: recorded on its spool, held, subscribers told.
        assert!(!two.containment.is_suspended("alice"));
        two.containment.sync_store().await;
        assert!(two.containment.is_suspended("alice"));
        assert!(changes.has_changed().unwrap());
        let theirs = two.spool.suspension("alice").unwrap().unwrap();
        assert_eq!(theirs.node.as_deref(), Some("edge-1"));
        assert_eq!(theirs.since_ms, mine.since_ms);
        assert!(theirs.shared);

        // Resumed on node 2 as `user resume` does it: the store first, then its record.
        assert!(lift(&two.cluster, "alice").await.unwrap());
        assert!(two.spool.resume_login("alice").unwrap());
        two.containment.refresh();
        assert!(!two.containment.is_suspended("alice"));
        // Node 1's next poll: resumed elsewhere, its record removed.
        one.containment.sync_store().await;
        assert!(!one.containment.is_suspended("alice"));
        assert_eq!(one.spool.suspension("alice").unwrap(), None);
        // And not pushed back by either. A poll with nothing to push is one operation.
        let before = two.cluster.operations();
        two.containment.sync_store().await;
        assert_eq!(two.cluster.operations() - before, 1);
        assert_eq!(
            redis.command(&["HLEN", "portcullis:suspended"]).unwrap(),
            "0"
        );
    }

    #[tokio::test]
    async fn a_suspension_made_while_the_store_is_down_is_pushed_when_it_returns() {
        let Some(mut redis) = TestRedis::start() else {
            return;
        };
        let one = node(&redis, "edge-1");
        one.containment.sync_store().await;
        one.containment.suspend("carol", trip()).await;
        redis.stop();
        one.containment.suspend("bob", trip()).await;
        // Held here all along, recorded unshared.
        assert!(one.containment.is_suspended("bob"));
        assert!(!one.spool.suspension("bob").unwrap().unwrap().shared);
        one.containment.sync_store().await;
        assert!(one.containment.is_suspended("bob"));
        assert!(one.containment.is_suspended("carol"));
        // It returns empty (no persistence): carol, shared with the store that was, is not
        // taken for resumed but put in the new one; bob is pushed.
        redis.restart();
        sync_until(&one, |n| {
            n.spool.suspension("bob").unwrap().unwrap().shared
                && n.spool.suspension("carol").unwrap().unwrap().store
                    == n.spool.suspension("bob").unwrap().unwrap().store
        })
        .await;
        assert!(one.containment.is_suspended("carol"));
        let mut held = redis
            .command(&["HKEYS", "portcullis:suspended"])
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>();
        held.sort();
        assert_eq!(held, ["bob", "carol"]);
    }

    #[tokio::test]
    async fn a_damaged_value_in_the_store_suspends_its_login_and_is_left_there() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let one = node(&redis, "edge-1");
        redis
            .command(&["HSET", "portcullis:suspended", "mallory", "{not json"])
            .unwrap();
        let huge = format!(
            "{{\"rule\":\"operator\",\"reason\":\"{}\"",
            "x".repeat(10_000)
        );
        redis
            .command(&["HSET", "portcullis:suspended", "oscar", &huge])
            .unwrap();
        redis
            .command(&["HSET", "portcullis:suspended", "", "{}"])
            .unwrap();
        let long = "x".repeat(LOGIN_MAX + 1);
        let sound = r#"{"rule":"operator","reason":"r","since_ms":1}"#;
        redis
            .command(&["HSET", "portcullis:suspended", &long, sound])
            .unwrap();
        let remote = read(&one.cluster).await.unwrap();
        assert_eq!(remote.total, 4);
        assert_eq!(remote.damaged.len(), 4, "{:?}", remote.damaged);
        // Neither the empty field nor the over-long one is a login.
        assert_eq!(remote.suspensions.len(), 2);
        one.containment.sync_store().await;
        for login in ["mallory", "oscar"] {
            assert!(one.containment.is_suspended(login), "{login}");
            let record = one.spool.suspension(login).unwrap().unwrap();
            assert_eq!(
                record.reason,
                "damaged suspension record in the shared store"
            );
            assert_eq!(record.rule, "operator");
        }
        // Left for an operator; a second poll changes nothing.
        one.containment.sync_store().await;
        assert_eq!(
            redis
                .command(&["HGET", "portcullis:suspended", "mallory"])
                .unwrap(),
            "{not json"
        );
        assert_eq!(
            redis.command(&["HLEN", "portcullis:suspended"]).unwrap(),
            "4"
        );
        assert_eq!(one.containment.suspensions().len(), 2);
    }

    #[tokio::test]
    async fn past_the_cap_the_rest_are_not_read_and_nothing_is_taken_for_resumed() {
        let Some(redis) = TestRedis::start() else {
            return;
        };
        let one = node(&redis, "edge-1");
        one.containment.suspend("zed", trip()).await;
        one.containment.sync_store().await;
        assert!(one.spool.suspension("zed").unwrap().unwrap().shared);
        for i in 0..5 {
            let login = format!("user{i}");
            let value = r#"{"rule":"operator","reason":"r","since_ms":1}"#;
            redis
                .command(&["HSET", "portcullis:suspended", &login, value])
                .unwrap();
        }
        let remote = read_at_most(&one.cluster, 3).await.unwrap();
        assert_eq!((remote.total, remote.read), (6, 3));
        assert!(!remote.complete());
        assert_eq!(remote.suspensions.len(), 3);
        // A read that missed zed does not resume it.
        let store = remote.store.clone();
        let missed = Remote {
            suspensions: (remote.suspensions.into_iter())
                .filter(|(login, _)| login != "zed")
                .collect(),
            ..remote
        };
        assert_eq!(missed.store, store);
        one.containment.settle(&missed, &[]);
        assert!(one.containment.is_suspended("zed"));
        assert!(one.spool.suspension("zed").unwrap().is_some());
        // A complete read that lacks it does.
        let complete = Remote {
            total: 0,
            read: 0,
            store,
            ..Remote::default()
        };
        one.containment.settle(&complete, &[]);
        assert!(!one.containment.is_suspended("zed"));
    }
}
