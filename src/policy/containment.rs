//! Containment of a compromised account (`[containment]`): the triggers that suspend an
//! authenticated login automatically, and the running relay's view of the suspended logins.
//!
//! # Triggers
//!
//! Each is off unless set, counted per login over a sliding hour, and only for logins that
//! authenticated (so the table holds at most one entry per user of the users file):
//! - `rate_limit_hits = N`: the login's N-th `messages_per_user` refusal within the hour;
//! - `recipient_domains_per_hour = N`: a recipient that would make the login's distinct
//!   recipient domains within the hour more than N (that RCPT is answered `421 4.7.0`);
//! - `client_ips_per_hour = N`: a successful AUTH that would make the login's distinct client
//!   addresses within the hour more than N, counted as the rate limits count them
//!   ([`ClientKey`]: IPv4 by address, IPv6 by /64); that AUTH is answered as a wrong password.
//!
//! A trip clears the login's counters (a login resumed later starts afresh, as it does when an
//! operator resumes it).
//!
//! # Suspensions
//!
//! The suspended logins are files under the spool ([`crate::queue::suspended`]), written by
//! this module when a trigger trips and by `portcullis user suspend|resume`. [`Containment`]
//! keeps them in memory for the sessions (one atomic load per command when none is
//! suspended), follows the directory every [`POLL_INTERVAL`] ([`Containment::watch`]), tells
//! the queue manager of every change ([`Containment::subscribe`]) so that it holds the login's
//! queued mail, and raises the `user_suspended` alert while any login is suspended. A
//! suspension that cannot be written is kept in memory (logged) and written again at each
//! poll: a disk error never lifts one.
//!
//! With `[cluster] redis` the suspensions are shared by every node through the store
//! ([`shared`]): each poll also brings `SPOOL/suspended/` in line with it, and a suspension
//! made here is pushed to it at once when it is reachable (else at the next poll that reaches
//! it). Without the store nothing is shared and nothing else changes.

use std::collections::{HashMap, HashSet, VecDeque};
use std::net::IpAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant};

use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use super::limits::ClientKey;
use crate::cluster::Cluster;
use crate::config;
use crate::observe::Telemetry;
use crate::observe::alerts::{AlertName, External};
use crate::queue::suspended::{Listing, Suspension};
use crate::queue::{Spool, SpoolError};

pub mod shared;

/// How often the relay reads `SPOOL/suspended/` for changes made by `portcullis user`.
pub const POLL_INTERVAL: Duration = Duration::from_millis(500);

/// The window every trigger counts over.
pub const WINDOW: Duration = Duration::from_secs(3600);

/// The rule of a suspension made by `portcullis user suspend`.
pub const OPERATOR: &str = crate::queue::suspended::OPERATOR_RULE;

/// A trigger that tripped: the suspension's rule and reason.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Trip {
    /// `containment_rate_limit_hits`, `containment_recipient_domains` or
    /// `containment_client_ips`.
    pub rule: &'static str,
    /// What tripped it, for a person.
    pub reason: String,
}

/// One login's counters, each bounded by its trigger (plus one).
#[derive(Debug, Default)]
struct Counters {
    /// When each `messages_per_user` refusal came, oldest first.
    rate_hits: VecDeque<Instant>,
    /// Recipient domains and when each was last seen.
    domains: HashMap<String, Instant>,
    /// Client addresses of successful logins and when each was last seen.
    clients: HashMap<ClientKey, Instant>,
    /// Messages accepted, per minute: (minute since `Containment::epoch`, count), oldest
    /// first, at most 60.
    messages: VecDeque<(u64, u32)>,
}

impl Counters {
    fn prune(&mut self, now: Instant) {
        let fresh = |at: &Instant| now.saturating_duration_since(*at) < WINDOW;
        while self.rate_hits.front().is_some_and(|at| !fresh(at)) {
            self.rate_hits.pop_front();
        }
        self.domains.retain(|_, at| fresh(at));
        self.clients.retain(|_, at| fresh(at));
    }

    /// A trip starts the login afresh; the message counts stay (they are what it sent).
    fn clear_triggers(&mut self) {
        self.rate_hits.clear();
        self.domains.clear();
        self.clients.clear();
    }
}

/// A suspension as the relay holds it.
#[derive(Debug, Clone)]
struct Held {
    suspension: Suspension,
    /// Written to the spool (false: writing failed; written again at each poll).
    saved: bool,
}

/// The relay's containment: trigger counters and the suspended logins (see the module doc).
#[derive(Debug)]
pub struct Containment {
    spool: Spool,
    telemetry: Arc<Telemetry>,
    suspended: RwLock<HashMap<String, Held>>,
    /// `suspended.len()`, read without the lock by every session command.
    count: AtomicUsize,
    /// Serialises the spool side: a suspension's write and the poll's read of the directory.
    disk: Mutex<()>,
    /// The entries of `suspended/` that are not sound records, already logged.
    warned: Mutex<HashSet<String>>,
    counters: Mutex<HashMap<String, Counters>>,
    /// Bumped at every change of the suspended set.
    changed: tokio::sync::watch::Sender<u64>,
    /// Minutes of the message counts are counted from here.
    epoch: Instant,
    /// The shared store (`[cluster] redis`), if any.
    cluster: Option<Arc<Cluster>>,
    /// Serialises the exchanges with the store: a poll's read, pushes and their settling, and
    /// a new suspension's push (so a poll never takes a suspension pushed after its read of
    /// the store for one resumed elsewhere).
    sync: tokio::sync::Mutex<()>,
    /// The store's fields already logged as damaged or not logins.
    warned_store: Mutex<HashSet<String>>,
    /// Whether the last poll's read stopped at [`shared::READ_MAX`] (logged once per episode).
    capped: std::sync::atomic::AtomicBool,
    /// The store's id as the last poll read it (`None` before the first one that reached it).
    store_id: Mutex<Option<String>>,
}

impl Containment {
    /// Containment over `spool`, with the suspensions recorded there now, shared through
    /// `cluster` when given (`[cluster] redis`). Blocking; the store is not asked yet.
    ///
    /// # Errors
    /// `SPOOL/suspended/` cannot be read: the relay must not start without knowing whom it
    /// suspended.
    pub fn open(
        spool: Spool,
        telemetry: Arc<Telemetry>,
        cluster: Option<Arc<Cluster>>,
    ) -> Result<Containment, SpoolError> {
        let listing = spool.list_suspended()?;
        let containment = Containment {
            spool,
            telemetry,
            suspended: RwLock::new(HashMap::new()),
            count: AtomicUsize::new(0),
            disk: Mutex::new(()),
            warned: Mutex::new(HashSet::new()),
            counters: Mutex::new(HashMap::new()),
            changed: tokio::sync::watch::Sender::new(0),
            epoch: Instant::now(),
            cluster,
            sync: tokio::sync::Mutex::new(()),
            warned_store: Mutex::new(HashSet::new()),
            capped: std::sync::atomic::AtomicBool::new(false),
            store_id: Mutex::new(None),
        };
        containment.follow(listing);
        Ok(containment)
    }

    /// Whether `login` is suspended.
    pub fn is_suspended(&self, login: &str) -> bool {
        self.count.load(Ordering::Acquire) != 0 && self.read().contains_key(login)
    }

    /// Every suspension the relay holds now.
    pub fn suspensions(&self) -> Vec<Suspension> {
        let mut all: Vec<Suspension> = self.read().values().map(|h| h.suspension.clone()).collect();
        all.sort_by(|a, b| a.login.cmp(&b.login));
        all
    }

    /// A receiver that sees a new value at every change of the suspended set.
    pub fn subscribe(&self) -> tokio::sync::watch::Receiver<u64> {
        self.changed.subscribe()
    }

    /// Suspend `login` for `trip` now: in memory at once (every session sees it from here
    /// on), then on the spool, off the reactor, then in the shared store when there is one
    /// and it is reachable (else at the next poll that reaches it). Logged with the login; a
    /// write that fails is logged and retried at the next poll.
    pub async fn suspend(self: &Arc<Self>, login: &str, trip: Trip) {
        let suspension = Suspension {
            login: login.to_string(),
            rule: trip.rule.to_string(),
            reason: trip.reason,
            since_ms: crate::observe::event::unix_millis(),
            node: self.cluster.as_ref().map(|c| c.node().to_owned()),
            shared: false,
            store: None,
        };
        // Not yet saved: a poll meanwhile neither takes it for resumed nor loses it.
        if !self.insert(suspension.clone(), false) {
            return;
        }
        self.published();
        let this = Arc::clone(self);
        let saved = tokio::task::spawn_blocking(move || {
            let _disk = this.disk.lock().unwrap_or_else(|p| p.into_inner());
            let saved = this.save(&suspension);
            if let Some(held) = this.write().get_mut(&suspension.login) {
                held.saved |= saved;
            }
        })
        .await;
        if let Err(e) = saved {
            error!(login = %super::lockout::login_key(login), error = %e, "suspension task failed");
        }
        // Pushed now unless a poll is exchanging with the store (the session does not wait
        // for it): that poll, or the next, pushes it.
        let store = (self.store_id.lock().unwrap_or_else(|p| p.into_inner())).clone();
        if let (Some(cluster), Some(store)) = (self.cluster.clone(), store)
            && cluster.is_up()
            && let Ok(_sync) = self.sync.try_lock()
        {
            self.push_unshared(&cluster, &store).await;
        }
    }

    /// Hold `suspension` (`saved`: its record is on the spool), logged; false when its login
    /// was suspended already.
    fn insert(&self, suspension: Suspension, saved: bool) -> bool {
        let mut suspended = self.write();
        if suspended.contains_key(&suspension.login) {
            return false;
        }
        let by_node = (suspension.node.as_deref())
            .map(|n| tracing::field::display(super::lockout::login_key(n)));
        warn!(login = %super::lockout::login_key(&suspension.login), rule = %suspension.rule,
            reason = %super::lockout::login_key(&suspension.reason), by_node,
            "account suspended: AUTH refused, open sessions closed, queued mail held");
        suspended.insert(suspension.login.clone(), Held { suspension, saved });
        true
    }

    fn save(&self, suspension: &Suspension) -> bool {
        match self.spool.suspend_login(suspension) {
            Ok(_) => true,
            Err(e) => {
                error!(login = %super::lockout::login_key(&suspension.login), error = %e,
                    "cannot record the suspension under the spool; it holds in memory and is written again in a moment");
                false
            }
        }
    }

    /// Bring the suspended set in line with `SPOOL/suspended/`: logins suspended there by
    /// `user suspend` are added, logins resumed there by `user resume` removed (with their
    /// counters), suspensions not yet written are written again. Blocking.
    pub fn refresh(&self) {
        let _disk = self.disk.lock().unwrap_or_else(|p| p.into_inner());
        match self.spool.list_suspended() {
            Ok(listing) => self.follow(listing),
            Err(e) => warn!(error = %e, "cannot read the suspended logins; keeping those known"),
        }
    }

    /// [`Containment::refresh`] with `listing` read: each entry that is not a sound record
    /// is logged once.
    fn follow(&self, listing: Listing) {
        let Listing {
            suspensions: on_disk,
            strays,
        } = listing;
        {
            let mut warned = self.warned.lock().unwrap_or_else(|p| p.into_inner());
            for stray in strays {
                if !warned.contains(&stray) {
                    warn!(entry = %super::lockout::login_key(&stray),
                        "not a sound suspension record in the spool's suspended/; a login its name encodes stays suspended");
                    warned.insert(stray);
                }
            }
        }
        let unsaved: Vec<Suspension> = (self.read().values())
            .filter(|h| !h.saved)
            .map(|h| h.suspension.clone())
            .collect();
        let saved: Vec<(String, bool)> = unsaved
            .iter()
            .map(|s| (s.login.clone(), self.save(s)))
            .collect();
        let mut changed = false;
        {
            let mut suspended = self.write();
            for (login, ok) in saved {
                if let Some(held) = suspended.get_mut(&login) {
                    held.saved = ok;
                }
            }
            let listed: HashMap<&str, &Suspension> =
                on_disk.iter().map(|s| (s.login.as_str(), s)).collect();
            // Written by this refresh, after the listing: not resumed.
            let retried: HashSet<&str> = unsaved.iter().map(|s| s.login.as_str()).collect();
            let resumed: Vec<String> = (suspended.iter())
                .filter(|(login, h)| {
                    h.saved
                        && !listed.contains_key(login.as_str())
                        && !retried.contains(login.as_str())
                })
                .map(|(login, _)| login.clone())
                .collect();
            for login in resumed {
                suspended.remove(&login);
                self.clear_triggers(&login);
                info!(login = %super::lockout::login_key(&login), "account resumed: AUTH allowed again; its held mail stays held until released");
                changed = true;
            }
        }
        for s in on_disk {
            changed |= self.insert(s, true);
        }
        if changed {
            self.published();
        }
    }

    /// Follow `SPOOL/suspended/` every [`POLL_INTERVAL`] until `stop`, and after each read of
    /// it the shared store, when there is one ([`Containment::sync_store`]).
    pub async fn watch(self: Arc<Self>, stop: CancellationToken) {
        let mut tick = tokio::time::interval(POLL_INTERVAL);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                () = stop.cancelled() => return,
                _ = tick.tick() => {}
            }
            let this = Arc::clone(&self);
            if let Err(e) = tokio::task::spawn_blocking(move || this.refresh()).await {
                error!(error = %e, "reading the suspended logins failed");
            }
            self.sync_store().await;
        }
    }

    /// The set changed: count, alert, wake the subscribers.
    fn published(&self) {
        let all = self.suspensions();
        self.count.store(all.len(), Ordering::Release);
        let raised = (!all.is_empty()).then(|| {
            let shown: Vec<String> = (all.iter().take(5))
                .map(|s| format!("{} ({})", super::lockout::login_key(&s.login), s.rule))
                .collect();
            let more = all.len().saturating_sub(shown.len());
            let more = if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            };
            External {
                value: all.len().to_string(),
                threshold: "0".into(),
                text: format!(
                    "{} account(s) suspended: {}{more}",
                    all.len(),
                    shown.join(", ")
                ),
            }
        });
        (self.telemetry.alerts).set_external(AlertName::UserSuspended, raised);
        self.changed.send_modify(|n| *n = n.wrapping_add(1));
    }

    /// A `messages_per_user` refusal of `login` at `now`: the trip when it is the
    /// `rate_limit_hits`-th within the hour.
    pub fn rate_limited(
        &self,
        settings: &config::Containment,
        login: &str,
        now: Instant,
    ) -> Option<Trip> {
        let limit = settings.rate_limit_hits? as usize;
        self.counting(login, now, |c| {
            c.rate_hits.push_back(now);
            (c.rate_hits.len() >= limit).then(|| Trip {
                rule: "containment_rate_limit_hits",
                reason: format!("{limit} messages_per_user refusals within an hour"),
            })
        })
    }

    /// A recipient in `domain` (lower case, as [`crate::envelope::Address::domain`] gives it)
    /// accepted for `login` at `now`: the trip when it would make
    /// more than `recipient_domains_per_hour` distinct domains within the hour (the domain is
    /// then not counted).
    pub fn recipient(
        &self,
        settings: &config::Containment,
        login: &str,
        domain: &str,
        now: Instant,
    ) -> Option<Trip> {
        let limit = settings.recipient_domains_per_hour? as usize;
        self.counting(login, now, |c| {
            if let Some(seen) = c.domains.get_mut(domain) {
                *seen = now;
                return None;
            }
            if c.domains.len() >= limit {
                return Some(Trip {
                    rule: "containment_recipient_domains",
                    reason: format!("more than {limit} recipient domains within an hour"),
                });
            }
            c.domains.insert(domain.to_owned(), now);
            None
        })
    }

    /// A successful AUTH of `login` from `ip` at `now`: the trip when it would make more than
    /// `client_ips_per_hour` distinct client addresses within the hour.
    pub fn authenticated(
        &self,
        settings: &config::Containment,
        login: &str,
        ip: IpAddr,
        now: Instant,
    ) -> Option<Trip> {
        let limit = settings.client_ips_per_hour? as usize;
        let client = ClientKey::new(ip);
        self.counting(login, now, |c| {
            if let Some(seen) = c.clients.get_mut(&client) {
                *seen = now;
                return None;
            }
            if c.clients.len() >= limit {
                return Some(Trip {
                    rule: "containment_client_ips",
                    reason: format!(
                        "logins from more than {limit} client addresses within an hour"
                    ),
                });
            }
            c.clients.insert(client, now);
            None
        })
    }

    /// A message from `login` was queued at `now` (counted for `portcullis user list`).
    pub fn accepted(&self, login: &str, now: Instant) {
        let minute = self.minute(now);
        let mut counters = self.lock_counters();
        let c = counters_of(&mut counters, login);
        match c.messages.back_mut() {
            Some((m, n)) if *m == minute => *n = n.saturating_add(1),
            _ => c.messages.push_back((minute, 1)),
        }
        while c
            .messages
            .front()
            .is_some_and(|(m, _)| minute.saturating_sub(*m) >= 60)
        {
            c.messages.pop_front();
        }
    }

    /// Messages queued from each login within the hour before `now` (logins that sent none
    /// left out).
    pub fn messages_last_hour(&self, now: Instant) -> std::collections::BTreeMap<String, u64> {
        let minute = self.minute(now);
        (self.lock_counters().iter())
            .map(|(login, c)| {
                let n = (c.messages.iter())
                    .filter(|(m, _)| minute.saturating_sub(*m) < 60)
                    .map(|(_, n)| u64::from(*n))
                    .sum();
                (login.clone(), n)
            })
            .filter(|(_, n)| *n > 0)
            .collect()
    }

    fn minute(&self, now: Instant) -> u64 {
        now.saturating_duration_since(self.epoch).as_secs() / 60
    }

    /// Run `count` on `login`'s pruned counters; a trip clears its triggers.
    fn counting(
        &self,
        login: &str,
        now: Instant,
        count: impl FnOnce(&mut Counters) -> Option<Trip>,
    ) -> Option<Trip> {
        let mut counters = self.lock_counters();
        let c = counters_of(&mut counters, login);
        c.prune(now);
        let trip = count(c);
        if trip.is_some() {
            c.clear_triggers();
        }
        trip
    }

    /// Stop holding `login` (its record is gone), and start its counters afresh.
    fn forget(&self, login: &str) {
        self.write().remove(login);
        self.clear_triggers(login);
    }

    fn clear_triggers(&self, login: &str) {
        if let Some(c) = self.lock_counters().get_mut(login) {
            c.clear_triggers();
        }
    }

    fn read(&self) -> std::sync::RwLockReadGuard<'_, HashMap<String, Held>> {
        self.suspended.read().unwrap_or_else(|p| p.into_inner())
    }

    fn write(&self) -> std::sync::RwLockWriteGuard<'_, HashMap<String, Held>> {
        self.suspended.write().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_counters(&self) -> std::sync::MutexGuard<'_, HashMap<String, Counters>> {
        self.counters.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// `login`'s counters, made on first use (an allocation only then).
fn counters_of<'a>(counters: &'a mut HashMap<String, Counters>, login: &str) -> &'a mut Counters {
    if !counters.contains_key(login) {
        counters.insert(login.to_owned(), Counters::default());
    }
    counters.get_mut(login).expect("just inserted")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn containment() -> (tempfile::TempDir, Arc<Containment>) {
        let dir = tempfile::tempdir().unwrap();
        let spool = Spool::open(dir.path()).unwrap();
        let telemetry = Arc::new(Telemetry::new("test"));
        (
            dir,
            Arc::new(Containment::open(spool, telemetry, None).unwrap()),
        )
    }

    fn settings(hits: u32, domains: u32, ips: u32) -> config::Containment {
        config::Containment {
            rate_limit_hits: Some(hits),
            recipient_domains_per_hour: Some(domains),
            client_ips_per_hour: Some(ips),
        }
    }

    #[test]
    fn the_nth_rate_limit_refusal_within_an_hour_trips_and_older_ones_do_not_count() {
        let (_dir, c) = containment();
        let s = settings(3, 10, 10);
        let t0 = Instant::now();
        assert_eq!(c.rate_limited(&s, "alice", t0), None);
        assert_eq!(
            c.rate_limited(&s, "alice", t0 + Duration::from_secs(60)),
            None
        );
        // The first one has left the window: two within the hour, not three.
        let later = t0 + WINDOW + Duration::from_secs(1);
        assert_eq!(c.rate_limited(&s, "alice", later), None);
        let trip = c
            .rate_limited(&s, "alice", later + Duration::from_secs(1))
            .unwrap();
        assert_eq!(trip.rule, "containment_rate_limit_hits");
        // Another login has its own count; a trip starts the login afresh.
        assert_eq!(c.rate_limited(&s, "bob", later), None);
        assert_eq!(
            c.rate_limited(&s, "alice", later + Duration::from_secs(2)),
            None
        );
        // Off unless set.
        let off = config::Containment::default();
        for i in 0..10 {
            assert_eq!(
                c.rate_limited(&off, "carol", t0 + Duration::from_secs(i)),
                None
            );
        }
    }

    #[test]
    fn recipient_domains_trip_past_the_limit_and_a_known_domain_never_does() {
        let (_dir, c) = containment();
        let s = settings(3, 2, 10);
        let now = Instant::now();
        assert_eq!(c.recipient(&s, "alice", "a.example", now), None);
        assert_eq!(c.recipient(&s, "alice", "b.example", now), None);
        for _ in 0..5 {
            assert_eq!(c.recipient(&s, "alice", "b.example", now), None);
        }
        let trip = c.recipient(&s, "alice", "c.example", now).unwrap();
        assert_eq!(trip.rule, "containment_recipient_domains");
        assert_eq!(trip.reason, "more than 2 recipient domains within an hour");
    }

    #[test]
    fn client_addresses_count_ipv6_by_64_and_trip_past_the_limit() {
        let (_dir, c) = containment();
        let s = settings(3, 10, 2);
        let now = Instant::now();
        let ip = |s: &str| s.parse::<IpAddr>().unwrap();
        assert_eq!(c.authenticated(&s, "alice", ip("2001:db8::1"), now), None);
        // The same /64: the same client.
        assert_eq!(
            c.authenticated(&s, "alice", ip("2001:db8::ffff:1"), now),
            None
        );
        assert_eq!(c.authenticated(&s, "alice", ip("192.0.2.1"), now), None);
        let trip = c.authenticated(&s, "alice", ip("192.0.2.2"), now).unwrap();
        assert_eq!(trip.rule, "containment_client_ips");
    }

    #[tokio::test]
    async fn a_suspension_is_seen_at_once_saved_and_raises_the_alert_until_resumed() {
        let (dir, c) = containment();
        let mut changes = c.subscribe();
        assert!(!c.is_suspended("alice"));
        let trip = Trip {
            rule: "containment_client_ips",
            reason: "test".into(),
        };
        c.suspend("alice", trip).await;
        assert!(c.is_suspended("alice"));
        assert!(changes.has_changed().unwrap());
        changes.borrow_and_update();
        let spool = Spool::open(dir.path()).unwrap();
        let saved = spool.suspension("alice").unwrap().unwrap();
        assert_eq!(saved.rule, "containment_client_ips");
        let alerts = c.telemetry.alerts.external_conditions();
        let raised = alerts
            .iter()
            .find(|a| a.alert == AlertName::UserSuspended)
            .unwrap();
        assert_eq!(raised.value, "1");
        assert_eq!(
            raised.text,
            "1 account(s) suspended: alice (containment_client_ips)"
        );
        // `user resume` from another process: seen at the next refresh.
        assert!(spool.resume_login("alice").unwrap());
        c.refresh();
        assert!(!c.is_suspended("alice"));
        assert!(changes.has_changed().unwrap());
        let alerts = c.telemetry.alerts.external_conditions();
        let cleared = alerts
            .iter()
            .find(|a| a.alert == AlertName::UserSuspended)
            .unwrap();
        assert_eq!(cleared.level, crate::observe::alerts::Level::Clear);
        // `user suspend` from another process, and a relay started afterwards.
        let by_hand = Suspension {
            login: "bob".into(),
            rule: OPERATOR.into(),
            reason: "phished".into(),
            since_ms: 1,
            node: None,
            shared: false,
            store: None,
        };
        spool.suspend_login(&by_hand).unwrap();
        c.refresh();
        assert!(c.is_suspended("bob"));
        let restarted = Containment::open(spool, Arc::new(Telemetry::new("t")), None).unwrap();
        assert_eq!(restarted.suspensions(), vec![by_hand]);
    }

    #[tokio::test]
    async fn a_suspension_that_cannot_be_written_holds_and_is_written_later() {
        let (dir, c) = containment();
        let suspended = dir.path().join(crate::queue::suspended::DIR);
        std::fs::remove_dir(&suspended).unwrap();
        std::fs::write(&suspended, b"not a directory").unwrap();
        let trip = Trip {
            rule: "containment_rate_limit_hits",
            reason: "test".into(),
        };
        c.suspend("alice", trip).await;
        assert!(c.is_suspended("alice"));
        // The poll cannot read the directory either: nothing is lifted.
        c.refresh();
        assert!(c.is_suspended("alice"));
        std::fs::remove_file(&suspended).unwrap();
        std::fs::create_dir(&suspended).unwrap();
        c.refresh();
        assert!(c.is_suspended("alice"));
        let spool = Spool::open(dir.path()).unwrap();
        assert_eq!(spool.suspension("alice").unwrap().unwrap().login, "alice");
    }
}
