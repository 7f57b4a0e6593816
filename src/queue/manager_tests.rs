//! The queue manager in process, with paused time, a real spool in a temporary directory and
//! a scripted [`Courier`] (the manager is under test, not delivery).

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::sync::{Semaphore, mpsc};
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;

use super::Committed;
use super::attempt::{Consignment, Courier, MessageBytes};
use super::manager::{CONTROL_INTERVAL, Clock, Manager};
use super::schedule::{AttemptReport, FailedRcpt, RcptResult};
use super::{DeliveryState, PurgeFilter, RemovedHow, RetryTarget, Spool};
use crate::config;
use crate::envelope::{QueueId, RcptStatus, ReversePath, sample_envelope};
use crate::observe::kept::KeptEvents;
use crate::observe::metrics::{HowLabel, QueueLabels, UpstreamLabel};
use crate::observe::{Event, EventKind, QueueCensus, Telemetry};

/// The Unix time the tests' clock starts at (the sample envelope's reception).
const T0: u64 = 1_700_000_000;

/// What the scripted courier answers for each recipient.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Answer {
    Deliver,
    Defer,
    Refuse,
}

/// One call of [`Courier::send`], as seen by the courier.
#[derive(Debug)]
struct Seen {
    id: QueueId,
    rcpts: Vec<usize>,
    /// The manager's clock when the attempt was sent (Unix seconds).
    at: u64,
    /// The same, in milliseconds.
    at_ms: u64,
    null_sender: bool,
    /// The message bytes (every test message is small enough to be held in memory).
    bytes: Vec<u8>,
}

struct Scripted {
    queue: config::Queue,
    max_in_flight: usize,
    clock: Clock,
    answer: Mutex<Answer>,
    sent: mpsc::UnboundedSender<Seen>,
    /// When set, each send waits for a permit (to keep attempts in flight).
    gate: Option<Arc<Semaphore>>,
    in_flight: AtomicUsize,
    most_in_flight: AtomicUsize,
}

impl Courier for Scripted {
    fn queue(&self) -> &config::Queue {
        &self.queue
    }
    fn hostname(&self) -> &str {
        "relay.example"
    }
    /// `b.example` goes to `beta`, every other domain to `alpha`.
    fn route(&self, domain: &str) -> Vec<usize> {
        vec![usize::from(domain == "b.example")]
    }
    fn upstream_name(&self, index: usize) -> Option<&str> {
        UPSTREAMS.get(index).copied()
    }
    fn upstream_names(&self) -> Vec<String> {
        UPSTREAMS.iter().map(|&n| n.to_owned()).collect()
    }
    fn max_in_flight(&self) -> usize {
        self.max_in_flight
    }
    async fn send<'a>(&'a self, job: Consignment<'a>) -> AttemptReport {
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.most_in_flight.fetch_max(now, Ordering::SeqCst);
        let rcpts: Vec<usize> = job.groups.iter().flat_map(|g| g.rcpts.clone()).collect();
        let _ = self.sent.send(Seen {
            id: job.msg.id().clone(),
            rcpts: rcpts.clone(),
            at: self.clock.now(),
            at_ms: self.clock.now_millis(),
            null_sender: job.msg.envelope.mail_from == ReversePath::Null,
            bytes: match job.bytes {
                MessageBytes::Memory(b) => b.to_vec(),
                MessageBytes::Spooled => Vec::new(),
            },
        });
        if let Some(gate) = &self.gate {
            gate.acquire().await.expect("gate open").forget();
        }
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let answer = *self.answer.lock().unwrap();
        let results = rcpts
            .into_iter()
            .map(|i| (i, result(answer, i, job)))
            .collect();
        AttemptReport {
            results,
            errors: vec!["upstream up: 451 4.3.0 later".into()],
            ..AttemptReport::default()
        }
    }
    fn upkeep(&self) {}
    fn reset_all(&self) {}
    fn reset_route(&self, _route: &[usize]) {}
}

fn result(answer: Answer, index: usize, job: Consignment<'_>) -> RcptResult {
    match answer {
        Answer::Deliver => RcptResult::Delivered,
        Answer::Defer => RcptResult::Deferred,
        Answer::Refuse => RcptResult::Failed(FailedRcpt {
            index,
            address: job.msg.envelope.recipients[index].address.clone(),
            status: "5.1.1".into(),
            diagnostic: crate::queue::bounce::smtp("550 5.1.1 no such user"),
            upstream: None,
        }),
    }
}

/// The scripted courier's upstreams.
const UPSTREAMS: [&str; 2] = ["alpha", "beta"];

/// A running manager over a fresh spool.
struct Harness {
    _dir: tempfile::TempDir,
    spool: Spool,
    courier: Arc<Scripted>,
    sent: mpsc::UnboundedReceiver<Seen>,
    wake: mpsc::UnboundedSender<Committed>,
    stop: CancellationToken,
    /// Until [`Harness::run`].
    manager: Option<Manager<Scripted>>,
    /// What the manager records.
    telemetry: Arc<Telemetry>,
    journal: KeptEvents,
}

/// A manager with the retry schedule `retry` (seconds) and `max_age` ten times its sum.
fn start(retry: &[u64], max_in_flight: usize, gate: Option<Arc<Semaphore>>) -> Harness {
    let dir = tempfile::tempdir().unwrap();
    let spool = Spool::open(&dir.path().join("spool")).unwrap();
    let (sent_tx, sent) = mpsc::unbounded_channel();
    let clock = Clock::tokio_at(T0);
    let courier = Arc::new(Scripted {
        queue: config::Queue {
            retry: retry.iter().map(|s| Duration::from_secs(*s)).collect(),
            max_age: Duration::from_secs(10 * retry.iter().sum::<u64>()),
            bounces: true,
            delivery_grace: Duration::from_secs(10),
            quarantine_keep: Duration::from_secs(7 * 86_400),
        },
        max_in_flight,
        clock,
        answer: Mutex::new(Answer::Deliver),
        sent: sent_tx,
        gate,
        in_flight: AtomicUsize::new(0),
        most_in_flight: AtomicUsize::new(0),
    });
    let (wake, incoming) = mpsc::unbounded_channel();
    let stop = CancellationToken::new();
    let journal = KeptEvents::default();
    let telemetry =
        Arc::new(Telemetry::new("relay.example").with_journal(Box::new(journal.clone())));
    let manager = Manager::new(
        spool.clone(),
        Arc::new(ArcSwap::new(courier.clone())),
        incoming,
        stop.clone(),
        TaskTracker::new(),
    )
    .with_clock(clock)
    .with_telemetry(telemetry.clone());
    Harness {
        _dir: dir,
        spool,
        courier,
        sent,
        wake,
        stop,
        manager: Some(manager),
        telemetry,
        journal,
    }
}

impl Harness {
    /// Start the manager (it lists the spool first).
    fn run(&mut self) {
        tokio::spawn(self.manager.take().expect("started once").run());
    }

    /// Commit a message to `rcpts`, due at `due` (Unix seconds; `None`: fresh, told to the
    /// manager at once).
    fn queue(&self, rcpts: &[&str], due: Option<u64>) -> QueueId {
        let mut env = sample_envelope(rcpts);
        env.received_at = self.courier.clock.now();
        let id = self
            .spool
            .enqueue(&env, b"Subject: t\r\n\r\nhi\r\n")
            .unwrap();
        match due {
            Some(at) => {
                let mut state = DeliveryState::fresh(env.received_at);
                state.next_attempt = at;
                self.spool.write_state(&id, &state).unwrap();
            }
            None => self
                .wake
                .send(Committed {
                    id: id.clone(),
                    loaded: None,
                    auth_user: None,
                })
                .unwrap(),
        }
        id
    }

    /// The next attempt the courier sees (fails the test after an hour of paused time).
    async fn next_sent(&mut self) -> Seen {
        tokio::time::timeout(Duration::from_secs(3600), self.sent.recv())
            .await
            .expect("an attempt within the hour")
            .expect("the courier lives")
    }

    /// Wait until `id` has left the spool.
    async fn gone(&self, id: &QueueId) {
        for _ in 0..1000 {
            if !self.spool.contains(id) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("{id} never left the queue");
    }

    /// Wait until `control/` is empty: the manager has taken every request (and recorded
    /// every hold).
    async fn requests_taken(&self) {
        let control = self.spool.root().join("control");
        for _ in 0..1000 {
            if std::fs::read_dir(&control).unwrap().next().is_none() {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the requests were never taken");
    }

    /// Wait until `id`'s state satisfies `check`.
    async fn state_until(&self, id: &QueueId, check: impl Fn(&DeliveryState) -> bool) {
        for _ in 0..1000 {
            if self.spool.load(id).is_ok_and(|m| check(&m.state)) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the state of {id} never got there");
    }
}

impl Drop for Harness {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

#[tokio::test(start_paused = true)]
async fn queued_messages_are_attempted_in_due_order_at_their_due_time() {
    let mut h = start(&[60], 1, None);
    let late = h.queue(&["a@example.com"], Some(T0 + 30));
    let first = h.queue(&["b@example.com"], Some(T0 + 10));
    let middle = h.queue(&["c@example.com"], Some(T0 + 20));
    h.run();
    let a = h.next_sent().await;
    let b = h.next_sent().await;
    let c = h.next_sent().await;
    assert_eq!([&a.id, &b.id, &c.id], [&first, &middle, &late]);
    assert_eq!([a.at, b.at, c.at], [T0 + 10, T0 + 20, T0 + 30]);
    h.gone(&late).await;
}

#[tokio::test(start_paused = true)]
async fn a_deferred_message_is_attempted_again_after_each_retry_interval() {
    let mut h = start(&[60, 300], 1, None);
    *h.courier.answer.lock().unwrap() = Answer::Defer;
    h.run();
    let id = h.queue(&["a@example.com", "b@example.com"], None);
    let times = [
        h.next_sent().await,
        h.next_sent().await,
        h.next_sent().await,
    ];
    assert!(times.iter().all(|s| s.id == id && s.rcpts == [0, 1]));
    let first = times[0].at;
    assert_eq!([times[1].at, times[2].at], [first + 60, first + 360]);
    let state = h.spool.load(&id).unwrap().state;
    assert_eq!(
        state.last_error.as_deref(),
        Some("upstream up: 451 4.3.0 later")
    );
    assert!(state.attempts >= 2);

    *h.courier.answer.lock().unwrap() = Answer::Deliver;
    assert_eq!(h.next_sent().await.at, first + 660);
    h.gone(&id).await;
}

#[tokio::test(start_paused = true)]
async fn at_most_max_in_flight_attempts_run_at_once_and_all_finish() {
    let gate = Arc::new(Semaphore::new(0));
    let mut h = start(&[60], 2, Some(gate.clone()));
    h.run();
    let ids: Vec<QueueId> = (0..5).map(|_| h.queue(&["a@example.com"], None)).collect();
    let first = [h.next_sent().await, h.next_sent().await];
    // Two are in flight and held there: the sync point for "no third one started".
    assert_eq!(h.courier.in_flight.load(Ordering::SeqCst), 2);
    assert!(h.sent.try_recv().is_err(), "a third attempt started");
    gate.add_permits(5);
    let mut seen: Vec<QueueId> = first.into_iter().map(|s| s.id).collect();
    for _ in 0..3 {
        seen.push(h.next_sent().await.id);
    }
    seen.sort();
    assert_eq!(seen, ids, "each message attempted exactly once");
    for id in &ids {
        h.gone(id).await;
    }
    assert_eq!(h.courier.most_in_flight.load(Ordering::SeqCst), 2);
}

#[tokio::test(start_paused = true)]
async fn a_retry_requested_during_an_attempt_makes_it_due_again_when_it_ends() {
    let gate = Arc::new(Semaphore::new(0));
    let mut h = start(&[3600], 4, Some(gate.clone()));
    *h.courier.answer.lock().unwrap() = Answer::Defer;
    h.run();
    let id = h.queue(&["a@example.com"], None);
    let first = h.next_sent().await;
    h.spool
        .request_retry(&RetryTarget::Ids(vec![id.clone()]))
        .unwrap();
    // The manager takes the request while the attempt is still in flight.
    h.requests_taken().await;
    gate.add_permits(2);
    let again = h.next_sent().await;
    assert_eq!(again.id, id);
    assert!(
        again.at < first.at + 60,
        "retried at +{}s instead of at once",
        again.at - first.at
    );
}

#[tokio::test(start_paused = true)]
async fn a_refused_recipient_is_bounced_and_the_bounce_is_attempted() {
    let mut h = start(&[60], 2, None);
    *h.courier.answer.lock().unwrap() = Answer::Refuse;
    h.run();
    let id = h.queue(&["a@example.com"], None);
    assert_eq!(h.next_sent().await.id, id);
    let bounce = h.next_sent().await;
    assert!(bounce.null_sender, "the second attempt is the DSN, from <>");
    let dsn = String::from_utf8_lossy(&bounce.bytes);
    assert!(dsn.contains("550 5.1.1 no such user"), "{dsn}");
    h.gone(&id).await;
    // The DSN itself is refused: from <>, it is not bounced again, and leaves the queue.
    h.gone(&bounce.id).await;
    assert!(h.spool.list().unwrap().is_empty(), "a bounce of the bounce");
}

#[tokio::test(start_paused = true)]
async fn a_held_message_is_neither_attempted_nor_expired_until_released() {
    let mut h = start(&[5], 1, None);
    let held = h.queue(&["held@example.com"], Some(T0 + 5));
    h.spool.request_hold(&held, true).unwrap();
    h.run();
    h.state_until(&held, |s| s.hold.is_some()).await;
    // Past its due time, every retry and max_age (50 s).
    tokio::time::sleep(Duration::from_secs(120)).await;
    // Sync point: a message queued now is attempted; the held one never was before it.
    let other = h.queue(&["other@example.com"], None);
    assert_eq!(h.next_sent().await.id, other);
    h.gone(&other).await;
    let msg = h.spool.load(&held).unwrap();
    assert_eq!(msg.state.status_of(0), RcptStatus::Pending);
    assert_eq!(msg.state.attempts, 0);
    assert_eq!(
        h.spool.list().unwrap().len(),
        1,
        "no bounce for a held message"
    );

    h.spool.request_hold(&held, false).unwrap();
    let sent = h.next_sent().await;
    assert_eq!((&sent.id, sent.rcpts.as_slice()), (&held, &[0][..]));
    h.gone(&held).await;
}

#[tokio::test(start_paused = true)]
async fn the_last_of_a_hold_and_a_release_both_pending_at_start_wins_in_either_order() {
    let mut h = start(&[5], 1, None);
    let (a, b) = (
        h.queue(&["a@example.com"], Some(T0)),
        h.queue(&["b@example.com"], Some(T0)),
    );
    // A: held, then released; B: released, then held. Both due, neither request taken yet.
    h.spool
        .request_holds(std::slice::from_ref(&a), true)
        .unwrap();
    h.spool
        .request_holds(&[b.clone(), a.clone()], false)
        .unwrap();
    h.spool
        .request_holds(std::slice::from_ref(&b), true)
        .unwrap();
    h.run();
    let sent = h.next_sent().await;
    assert_eq!(sent.id, a);
    h.gone(&a).await;
    h.state_until(&b, |s| s.hold.is_some()).await;
    // Sync point: a message queued now is attempted; B never was.
    let other = h.queue(&["other@example.com"], None);
    assert_eq!(h.next_sent().await.id, other);
    h.gone(&other).await;
    let state = h.spool.load(&b).unwrap().state;
    assert_eq!((state.attempts, state.hold.map(|h| h.since)), (0, Some(T0)));
    assert_eq!(h.events(EventKind::Held).len(), 1);
}

/// A message file as the previous version wrote it: each recipient with `"status":"pending"`.
fn write_previous_version_file(spool: &Spool, rcpts: &[&str]) -> QueueId {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt as _;
    let env = sample_envelope(rcpts);
    let mut json = serde_json::to_value(&env).unwrap();
    for r in json["recipients"].as_array_mut().unwrap() {
        r["status"] = "pending".into();
    }
    let mut bytes = super::MAGIC.to_vec();
    bytes.extend_from_slice(json.to_string().as_bytes());
    bytes.extend_from_slice(b"\nSubject: old\r\n\r\nwritten by the previous version\r\n");
    let path = spool.root().join("queue").join(env.id.as_str());
    let mut file = std::fs::OpenOptions::new()
        .create_new(true)
        .write(true)
        .mode(0o600)
        .open(path)
        .unwrap();
    file.write_all(&bytes).unwrap();
    env.id
}

#[tokio::test(start_paused = true)]
async fn a_spool_file_of_the_previous_version_is_recovered_and_delivered() {
    let mut h = start(&[60], 1, None);
    let id = write_previous_version_file(&h.spool, &["a@example.com", "b@example.com"]);
    let report = h.spool.recover().unwrap();
    assert!(report.rejected.is_empty(), "{report}");
    assert_eq!(report.queued, 1);
    let msg = h.spool.load(&id).unwrap();
    let addresses: Vec<String> = msg.pending().map(ToString::to_string).collect();
    assert_eq!(addresses, ["a@example.com", "b@example.com"]);
    // Written back, the recipients no longer carry a status of their own.
    let json = serde_json::to_string(&msg.envelope).unwrap();
    assert!(!json.contains("status"), "{json}");

    h.run();
    let sent = h.next_sent().await;
    assert_eq!((&sent.id, sent.rcpts.as_slice()), (&id, &[0, 1][..]));
    assert!(sent.bytes.ends_with(b"written by the previous version\r\n"));
    h.gone(&id).await;
}

#[tokio::test(start_paused = true)]
async fn a_hold_in_the_state_file_survives_a_restart() {
    let mut h = start(&[5], 1, None);
    let held = h.queue(&["held@example.com"], Some(T0));
    let mut state = h.spool.load(&held).unwrap().state;
    state.hold(T0, "contained");
    h.spool.write_state(&held, &state).unwrap();
    h.run();
    // Sync point: a message queued after the start is attempted; the held one never was.
    tokio::time::sleep(Duration::from_secs(120)).await;
    let other = h.queue(&["other@example.com"], None);
    assert_eq!(h.next_sent().await.id, other);
    h.gone(&other).await;
    assert_eq!(h.spool.load(&held).unwrap().state, state);
}

#[tokio::test(start_paused = true)]
async fn a_hold_requested_during_an_attempt_holds_the_message_when_it_ends() {
    let gate = Arc::new(Semaphore::new(0));
    let mut h = start(&[60], 4, Some(gate.clone()));
    *h.courier.answer.lock().unwrap() = Answer::Defer;
    h.run();
    let id = h.queue(&["a@example.com"], None);
    h.next_sent().await;
    h.spool.request_hold(&id, true).unwrap();
    // The manager takes the request while the attempt is still in flight: three control
    // passes of paused time. The request file stays until the hold is recorded.
    tokio::time::sleep(CONTROL_INTERVAL * 3).await;
    assert_eq!(h.spool.pending_holds().unwrap().len(), 1);
    gate.add_permits(10);
    h.state_until(&id, |s| s.hold.is_some() && s.attempts == 1)
        .await;
    h.requests_taken().await;
    // Past its retry time (60 s): a message queued now is the next one attempted.
    tokio::time::sleep(Duration::from_secs(120)).await;
    *h.courier.answer.lock().unwrap() = Answer::Deliver;
    let other = h.queue(&["other@example.com"], None);
    assert_eq!(h.next_sent().await.id, other);
    h.gone(&other).await;
    assert_eq!(h.spool.load(&id).unwrap().state.attempts, 1);

    h.spool.request_hold(&id, false).unwrap();
    assert_eq!(h.next_sent().await.id, id);
    h.gone(&id).await;
}

/// An id made `secs` seconds after `T0` (the epoch of ids), distinct by `n`.
fn id_at(secs: u64, n: u128) -> QueueId {
    QueueId::from_bits(u128::from(secs * 1_000_000) << 30 | n)
}

impl Harness {
    /// Commit a message with id `id` to `rcpts`, due at `due` (Unix seconds), before the
    /// manager runs.
    fn queue_as(&self, id: &QueueId, rcpts: &[&str], due: u64) {
        let mut env = sample_envelope(rcpts);
        env.id = id.clone();
        env.received_at = T0;
        self.spool
            .enqueue(&env, b"Subject: t\r\n\r\nhi\r\n")
            .unwrap();
        let mut state = DeliveryState::fresh(T0);
        state.next_attempt = due;
        self.spool.write_state(id, &state).unwrap();
    }

    /// The events of `kind` recorded so far.
    fn events(&self, kind: EventKind) -> Vec<Event> {
        let all = self.journal.all();
        all.into_iter().filter(|e| e.kind == kind).collect()
    }

    /// Wait until the published census satisfies `check`.
    async fn census_until(&self, check: impl Fn(&QueueCensus) -> bool) -> QueueCensus {
        for _ in 0..1000 {
            let census = self.telemetry.queue();
            if check(&census) {
                return census;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!("the census never got there: {:?}", self.telemetry.queue());
    }

    /// Wait until `kind` has been recorded `n` times.
    async fn events_until(&self, kind: EventKind, n: usize) -> Vec<Event> {
        for _ in 0..1000 {
            let events = self.events(kind);
            if events.len() >= n {
                return events;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        panic!(
            "{kind:?} recorded {} times, not {n}",
            self.events(kind).len()
        );
    }

    /// `portcullis_queue_messages{upstream, state}`.
    fn gauge(&self, upstream: &str, state: &str) -> i64 {
        let labels = QueueLabels {
            upstream: upstream.into(),
            state: state.into(),
        };
        self.telemetry
            .metrics
            .queue_messages
            .get_or_create(&labels)
            .get()
    }

    /// (queued, held) gauges of each upstream of the courier.
    fn gauges(&self) -> [(i64, i64); 2] {
        UPSTREAMS.map(|u| (self.gauge(u, "queued"), self.gauge(u, "held")))
    }
}

#[tokio::test(start_paused = true)]
async fn the_census_counts_queued_and_held_messages_per_upstream_and_the_oldest() {
    let mut h = start(&[600], 4, None);
    *h.courier.answer.lock().unwrap() = Answer::Defer;
    let (old, held, beta) = (id_at(0, 1), id_at(10, 2), id_at(30, 3));
    h.queue_as(&old, &["a@example.com"], T0 + 3600);
    h.queue_as(&held, &["a@example.com"], T0 + 3600);
    h.queue_as(&beta, &["x@b.example"], T0 + 3600);
    let mut state = h.spool.load(&held).unwrap().state;
    state.hold(T0, "contained");
    h.spool.write_state(&held, &state).unwrap();
    h.run();

    let census = h.census_until(|c| c.queued() == 2).await;
    assert_eq!(h.gauges(), [(1, 1), (1, 0)]);
    assert_eq!(census.oldest, Some((old.to_string(), T0)));
    assert_eq!(census.top_senders, [("sender@example.org".into(), 2)]);
    // The age of the oldest moves on with the clock, though nothing else changes.
    tokio::time::sleep(Duration::from_millis(100_200)).await;
    assert_eq!(h.telemetry.metrics.queue_oldest_seconds.get(), 100);

    // Released: waiting (and due at once), one `released` event; then held again.
    h.spool.request_hold(&held, false).unwrap();
    h.census_until(|c| c.held() == 0).await;
    assert_eq!(h.gauges(), [(2, 0), (1, 0)]);
    assert_eq!(h.events(EventKind::Released).len(), 1);
    h.spool.request_hold(&old, true).unwrap();
    h.census_until(|c| c.held() == 1).await;
    assert_eq!(h.gauges(), [(1, 1), (1, 0)]);
    assert_eq!(
        h.events(EventKind::Held)[0].id.as_deref(),
        Some(old.as_str())
    );
    let census = h.telemetry.queue();
    assert_eq!(census.oldest.map(|(id, _)| id), Some(held.to_string()));
}

#[tokio::test(start_paused = true)]
async fn a_removal_notice_is_counted_once_and_empties_the_upstreams_gauges() {
    let mut h = start(&[600], 4, None);
    let (a, b) = (id_at(0, 1), id_at(1, 2));
    h.queue_as(&a, &["x@b.example"], T0 + 3600);
    h.queue_as(&b, &["x@b.example"], T0 + 3600);
    h.run();
    h.census_until(|c| c.queued() == 2).await;
    assert_eq!(h.gauges(), [(0, 0), (2, 0)]);

    assert_eq!(h.spool.delete(&a).unwrap(), super::DeleteOutcome::Deleted);
    h.spool
        .notify_removed(RemovedHow::Delete, std::slice::from_ref(&a))
        .unwrap();
    let purged = h.spool.purge(&PurgeFilter::All, false).unwrap();
    assert_eq!(purged.len(), 1);
    h.spool
        .notify_removed(RemovedHow::Purge, std::slice::from_ref(&b))
        .unwrap();
    h.census_until(|c| c.queued() == 0).await;
    assert_eq!(h.gauges(), [(0, 0), (0, 0)]);
    // Sync point: a later notice is recorded, so the manager has read past the first two.
    let later = id_at(2, 3);
    h.spool
        .notify_removed(RemovedHow::Delete, std::slice::from_ref(&later))
        .unwrap();
    let deleted = h.events_until(EventKind::Deleted, 2).await;
    let ids: Vec<Option<&str>> = deleted.iter().map(|e| e.id.as_deref()).collect();
    assert_eq!(ids, [Some(a.as_str()), Some(later.as_str())]);
    let removed = |how: &str| {
        let labels = HowLabel { how: how.into() };
        h.telemetry.metrics.removed.get_or_create(&labels).get()
    };
    assert_eq!((removed("delete"), removed("purge")), (2, 1));
    assert_eq!(
        h.events(EventKind::Purged)[0].id.as_deref(),
        Some(b.as_str())
    );
    assert!(
        h.spool
            .take_requests(&Default::default())
            .unwrap()
            .is_empty()
    );
}

#[tokio::test(start_paused = true)]
async fn an_expired_message_is_counted_under_its_upstream_bounced_and_finished() {
    // max_age: 50 s.
    let mut h = start(&[5], 1, None);
    *h.courier.answer.lock().unwrap() = Answer::Defer;
    h.run();
    let id = h.queue(&["x@b.example"], None);
    tokio::time::sleep(Duration::from_secs(60)).await;
    let bounced = h.events_until(EventKind::Bounced, 1).await;
    let expired = h.events(EventKind::Expired);
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].upstream.as_deref(), Some("beta"));
    assert_eq!(expired[0].rcpts, ["x@b.example"]);
    let expired_total = |u: &str| {
        let labels = UpstreamLabel { upstream: u.into() };
        h.telemetry.metrics.expired.get_or_create(&labels).get()
    };
    assert_eq!((expired_total("alpha"), expired_total("beta")), (0, 1));
    assert_eq!(h.telemetry.metrics.bounced.get(), 1);
    let bounce_id = bounced[0].bounce_id.clone().expect("a bounce was queued");
    h.gone(&id).await;
    let finished = h.events_until(EventKind::Finished, 1).await;
    assert_eq!(finished[0].id.as_deref(), Some(id.as_str()));
    // The bounce goes to sender@example.org: counted under alpha, from <>.
    let census = h
        .census_until(|c| c.top_senders.first().is_some_and(|s| s.0 == "<>"))
        .await;
    assert_eq!(census.oldest.map(|(id, _)| id), Some(bounce_id));
    assert_eq!(h.gauges(), [(1, 0), (0, 0)]);
}

#[tokio::test(start_paused = true)]
async fn a_bounce_that_cannot_be_bounced_is_counted_without_a_bounce_id() {
    let mut h = start(&[60], 2, None);
    *h.courier.answer.lock().unwrap() = Answer::Refuse;
    h.run();
    let id = h.queue(&["a@example.com"], None);
    let bounced = h.events_until(EventKind::Bounced, 2).await;
    assert_eq!(bounced[0].id.as_deref(), Some(id.as_str()));
    let bounce_id = bounced[0].bounce_id.clone().expect("a DSN was queued");
    assert_eq!(bounced[1].id.as_deref(), Some(bounce_id.as_str()));
    assert_eq!(bounced[1].bounce_id, None, "no bounce of a bounce");
    // The sender as every event carries it: bare, empty for `<>` (as `trace` reads it).
    assert_eq!(bounced[0].from.as_deref(), Some("sender@example.org"));
    assert_eq!(bounced[1].from.as_deref(), Some(""));
    assert_eq!(h.telemetry.metrics.bounced.get(), 2);
    h.events_until(EventKind::Finished, 2).await;
    h.census_until(|c| c.queued() == 0 && c.oldest.is_none())
        .await;
}

#[tokio::test(start_paused = true)]
async fn a_quarantined_message_leaves_the_census_and_once_restored_is_attempted_at_once() {
    use super::quarantine::{Record, RestoreOutcome};
    let mut h = start(&[600], 4, None);
    let a = id_at(0, 1);
    // Due in an hour: only the restore can make it due sooner.
    h.queue_as(&a, &["x@b.example"], T0 + 3600);
    h.run();
    h.census_until(|c| c.queued() == 1).await;

    let record = Record::now(
        "queue purge",
        &["--all".into(), "--quarantine".into()],
        Vec::new(),
    );
    let moved = h.spool.purge_quarantine(|_| true, &record, false);
    assert_eq!(
        moved.unwrap()[0].outcome,
        Some(super::DeleteOutcome::Deleted)
    );
    h.spool
        .notify_removed(RemovedHow::Quarantine, std::slice::from_ref(&a))
        .unwrap();
    let quarantined = h.events_until(EventKind::Quarantined, 1).await;
    assert_eq!(quarantined[0].id.as_deref(), Some(a.as_str()));
    h.census_until(|c| c.queued() == 0).await;
    let labels = HowLabel {
        how: "quarantine".into(),
    };
    assert_eq!(h.telemetry.metrics.removed.get_or_create(&labels).get(), 1);

    let restored_at = h.courier.clock.now();
    assert_eq!(
        h.spool.restore(&a, false).unwrap(),
        RestoreOutcome::Restored
    );
    h.spool.finish_restore().unwrap();
    h.spool.request_restore(std::slice::from_ref(&a)).unwrap();
    let seen = h.next_sent().await;
    assert_eq!(seen.id, a);
    assert!(seen.at <= restored_at + 1, "attempted at {}", seen.at);
    assert_eq!(h.events(EventKind::Restored).len(), 1);
    h.gone(&a).await;
    assert!(h.spool.quarantined().unwrap().is_empty());
}

/// Commit a message from `login` (authenticated) to one recipient, due now; told to the
/// manager when `fresh`.
fn queue_from(h: &Harness, login: &str, fresh: bool) -> QueueId {
    let mut env = sample_envelope(&["rcpt@example.com"]);
    env.received_at = h.courier.clock.now();
    env.auth_user = Some(login.to_owned());
    let id = h.spool.enqueue(&env, b"Subject: t\r\n\r\nhi\r\n").unwrap();
    if fresh {
        let committed = Committed {
            id: id.clone(),
            loaded: None,
            auth_user: Some(login.to_owned()),
        };
        h.wake.send(committed).unwrap();
    } else {
        let mut state = DeliveryState::fresh(env.received_at);
        state.next_attempt = T0;
        h.spool.write_state(&id, &state).unwrap();
    }
    id
}

#[tokio::test(start_paused = true)]
async fn a_suspended_logins_mail_is_held_whatever_brings_it_due_and_never_sent() {
    let mut h = start(&[5], 1, None);
    let containment = Arc::new(
        crate::policy::containment::Containment::open(h.spool.clone(), h.telemetry.clone(), None)
            .unwrap(),
    );
    let trip = crate::policy::containment::Trip {
        rule: crate::policy::containment::OPERATOR,
        reason: "test".into(),
    };
    containment.suspend("mallory", trip).await;
    // Queued before the start, not held: held by the load.
    let queued = queue_from(&h, "mallory", false);
    h.manager = h
        .manager
        .take()
        .map(|m| m.with_containment(containment.clone()));
    h.run();
    h.state_until(&queued, |s| s.hold.is_some()).await;
    // Committed while suspended: held on arrival.
    let fresh = queue_from(&h, "mallory", true);
    h.state_until(&fresh, |s| s.hold.is_some()).await;
    // Released by hand while still suspended: its attempt sends nothing and holds it again.
    h.spool.request_hold(&queued, false).unwrap();
    let kinds = |h: &Harness| -> Vec<EventKind> {
        let all = h.journal.all();
        let mine = all
            .iter()
            .filter(|e| e.id.as_deref() == Some(queued.as_str()));
        mine.map(|e| e.kind).collect()
    };
    for _ in 0..1000 {
        if kinds(&h).len() >= 3 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let held_again = [EventKind::Held, EventKind::Released, EventKind::Held];
    assert_eq!(kinds(&h), held_again);
    let reason = h.spool.load(&queued).unwrap().state.hold.unwrap().reason;
    assert_eq!(reason, super::manager::SUSPENDED_REASON);
    // Sync point: another login's message is sent, and is the only one ever sent.
    let other = queue_from(&h, "bob", true);
    assert_eq!(h.next_sent().await.id, other);
    h.gone(&other).await;
    assert!(h.sent.try_recv().is_err());
    for id in [&queued, &fresh] {
        assert_eq!(h.spool.load(id).unwrap().state.attempts, 0, "{id}");
    }
}

#[tokio::test(start_paused = true)]
async fn mail_committed_during_the_recovery_and_held_before_delivery_stays_held() {
    // The relay accepts mail while the queue is recovered; the manager waits for it. A
    // message committed then is listed by the load and its arrival, with the copy kept at
    // commit, is still in the channel when the hold comes: that copy must not reschedule it.
    let mut h = start(&[5], 1, None);
    let (recovered_tx, recovered) = tokio::sync::watch::channel(false);
    h.manager = h.manager.take().map(|m| m.after_recovery(recovered));
    h.run();
    let env = sample_envelope(&["held@example.com"]);
    let mut w = h.spool.create(&env).unwrap();
    w.write(b"Subject: t\r\n\r\nhi\r\n").unwrap();
    let (held, kept) = w.commit_and_keep().unwrap();
    let committed = Committed {
        id: held.clone(),
        loaded: kept,
        auth_user: None,
    };
    h.wake.send(committed).unwrap();
    h.spool.request_hold(&held, true).unwrap();
    recovered_tx.send(true).unwrap();
    h.state_until(&held, |s| s.hold.is_some()).await;
    // Sync point: a message queued now is attempted; the held one never was.
    let other = h.queue(&["other@example.com"], None);
    assert_eq!(h.next_sent().await.id, other);
    h.gone(&other).await;
    let state = h.spool.load(&held).unwrap().state;
    assert_eq!((state.attempts, state.hold.is_some()), (0, true));
}

#[tokio::test(start_paused = true)]
async fn new_mail_goes_ahead_of_a_backlog_retried_with_retry_all() {
    // The upstream was down for hours; the operator asks for the backlog with `queue retry
    // --all` while new mail keeps coming: the new mail is sent first, then the backlog by age.
    let gate = Arc::new(Semaphore::new(0));
    let mut h = start(&[3600], 1, Some(gate.clone()));
    let (a, b) = (
        h.queue(&["a@example.com"], Some(T0 + 3600)),
        h.queue(&["b@example.com"], Some(T0 + 3600)),
    );
    h.run();
    // One attempt in flight, held at the gate, fills the one slot.
    let blocker = h.queue(&["blocker@example.com"], None);
    assert_eq!(h.next_sent().await.id, blocker);
    h.spool.request_retry(&RetryTarget::All).unwrap();
    h.requests_taken().await;
    let new = h.queue(&["new@example.com"], None);
    gate.add_permits(10);
    let order = [
        h.next_sent().await.id,
        h.next_sent().await.id,
        h.next_sent().await.id,
    ];
    assert_eq!(order, [new, a, b]);
}

#[tokio::test(start_paused = true)]
async fn while_new_mail_arrives_the_backlog_keeps_to_a_quarter_of_the_attempts_in_flight() {
    // A backlog comes due while new mail arrives: the new mail first, the backlog in at most a
    // quarter of the slots until NEW_MAIL_WINDOW has passed without new mail.
    let gate = Arc::new(Semaphore::new(0));
    let mut h = start(&[3600], 8, Some(gate.clone()));
    let backlog: Vec<QueueId> = (0..10)
        .map(|_| h.queue(&["old@example.com"], Some(T0 + 5)))
        .collect();
    h.run();
    // Long after the manager has loaded the spool (paused time moves on only when every task
    // waits), so this one arrives as new mail.
    tokio::time::sleep(Duration::from_millis(4500)).await;
    let new = h.queue(&["new@example.com"], None);
    assert_eq!(h.next_sent().await.id, new);
    // Due at T0 + 5 s, within the window: two of the eight slots (a quarter), though seven
    // are free.
    for _ in 0..2 {
        let seen = h.next_sent().await;
        assert!(backlog.contains(&seen.id));
        assert_eq!(seen.at_ms, (T0 + 5) * 1000);
    }
    // The other five go to the backlog when the window closes, a second after the new mail.
    for _ in 0..5 {
        let seen = h.next_sent().await;
        assert!(backlog.contains(&seen.id));
        assert_eq!(seen.at_ms, T0 * 1000 + 5500);
    }
    assert_eq!(h.courier.in_flight.load(Ordering::SeqCst), 8);
    gate.add_permits(20);
    for id in backlog.iter().chain([&new]) {
        h.gone(id).await;
    }
    assert_eq!(h.courier.most_in_flight.load(Ordering::SeqCst), 8);
}
