//! Table tests of [`evaluate`] and the hysteresis with given inputs (no clock), and
//! in-process tests of the alert task and the webhook with paused time and a local HTTP
//! receiver.

use std::time::Duration;

use super::task::QueueWatch;
use super::*;
use crate::config;

/// An arbitrary Unix time in milliseconds (2026-12-01T04:00:00Z) for the pure tests.
const T0: u64 = 1_796_097_600_000;
const SEC: u64 = 1000;
const MIN: u64 = 60 * SEC;

fn thresholds() -> config::Alerts {
    config::Alerts {
        no_inbound: Some(Duration::from_secs(15 * 60)),
        no_delivery: Some(Duration::from_secs(5 * 60)),
        queue_depth: Some(100),
        oldest_message: Some(Duration::from_secs(3600)),
        upstream_down: Some(Duration::from_secs(5 * 60)),
        webhook: None,
    }
}

fn condition(inputs: &Inputs, now: u64, alert: AlertName) -> Condition {
    evaluate(inputs, &thresholds(), now)
        .into_iter()
        .find(|c| c.alert == alert)
        .expect("configured alert evaluated")
}

/// (case, inputs, now, alert, level, value)
type Case = (&'static str, Inputs, u64, AlertName, Level, &'static str);

fn started() -> Inputs {
    Inputs {
        started: T0,
        ..Inputs::default()
    }
}

fn queued(n: u64, since: u64, last_delivered: u64) -> Inputs {
    Inputs {
        queued: n,
        queue_nonempty_since: Some(since),
        oldest_arrival: Some(since / 1000),
        last_delivered,
        ..started()
    }
}

fn down(upstreams: &[(&str, u64)]) -> Inputs {
    Inputs {
        down: upstreams
            .iter()
            .map(|(n, since)| Down {
                name: (*n).to_owned(),
                breaker_open: true,
                since: since / 1000,
                error: Some("connection refused".to_owned()),
            })
            .collect(),
        ..started()
    }
}

fn cases() -> Vec<Case> {
    use AlertName::*;
    use Level::*;
    let accepted = Inputs {
        last_accepted: T0 + 10 * MIN,
        ..started()
    };
    vec![
        (
            "nothing accepted, counted from start: just under, cannot tell yet",
            started(),
            T0 + 15 * MIN - 1,
            NoInbound,
            Hold,
            "899s",
        ),
        (
            "queued since start (recovered), nothing delivered, just under: cannot tell yet",
            queued(3, T0, 0),
            T0 + 5 * MIN - 1,
            NoDelivery,
            Hold,
            "299s",
        ),
        (
            "nothing accepted, counted from start: reached",
            started(),
            T0 + 15 * MIN,
            NoInbound,
            Firing,
            "900s",
        ),
        (
            "counted from the last accept",
            accepted.clone(),
            T0 + 24 * MIN,
            NoInbound,
            Clear,
            "840s",
        ),
        (
            "the last accept long enough ago",
            accepted,
            T0 + 25 * MIN,
            NoInbound,
            Firing,
            "900s",
        ),
        (
            "empty queue: never stuck",
            started(),
            T0 + 2 * 3600 * SEC,
            NoDelivery,
            Clear,
            "0s",
        ),
        (
            "queue empty for an hour, one message since 1 s",
            queued(1, T0 + 3600 * SEC, 0),
            T0 + 3601 * SEC,
            NoDelivery,
            Clear,
            "1s",
        ),
        (
            "queued 5 min, nothing delivered since start",
            queued(3, T0 + MIN, 0),
            T0 + 6 * MIN,
            NoDelivery,
            Firing,
            "300s",
        ),
        (
            "queued 10 min, delivered 4 min ago",
            queued(3, T0, T0 + 6 * MIN),
            T0 + 10 * MIN,
            NoDelivery,
            Clear,
            "240s",
        ),
        (
            "queued 10 min, delivered 5 min ago",
            queued(3, T0, T0 + 5 * MIN),
            T0 + 10 * MIN,
            NoDelivery,
            Firing,
            "300s",
        ),
        (
            "depth reached",
            queued(100, T0, 0),
            T0,
            QueueDepth,
            Firing,
            "100",
        ),
        (
            "depth just under: holds",
            queued(99, T0, 0),
            T0,
            QueueDepth,
            Hold,
            "99",
        ),
        (
            "depth at 90 %: holds",
            queued(90, T0, 0),
            T0,
            QueueDepth,
            Hold,
            "90",
        ),
        (
            "depth below 90 %: clear",
            queued(89, T0, 0),
            T0,
            QueueDepth,
            Clear,
            "89",
        ),
        (
            "oldest an hour old",
            queued(1, T0, 0),
            T0 + 3600 * SEC,
            OldestMessage,
            Firing,
            "3600s",
        ),
        (
            "oldest at 90 %: holds",
            queued(1, T0, 0),
            T0 + 3240 * SEC,
            OldestMessage,
            Hold,
            "3240s",
        ),
        (
            "oldest below 90 %: clear",
            queued(1, T0, 0),
            T0 + 3239 * SEC,
            OldestMessage,
            Clear,
            "3239s",
        ),
        (
            "no message: clear",
            started(),
            T0 + 7200 * SEC,
            OldestMessage,
            Clear,
            "0s",
        ),
        (
            "every upstream up",
            started(),
            T0 + 3600 * SEC,
            UpstreamDown,
            Clear,
            "0s",
        ),
        (
            "down 4:59: holds",
            down(&[("a", T0)]),
            T0 + 299 * SEC,
            UpstreamDown,
            Hold,
            "299s",
        ),
        (
            "down 5 min",
            down(&[("a", T0)]),
            T0 + 300 * SEC,
            UpstreamDown,
            Firing,
            "300s",
        ),
        (
            "the longest down counts",
            down(&[("a", T0 + 200 * SEC), ("b", T0)]),
            T0 + 300 * SEC,
            UpstreamDown,
            Firing,
            "300s",
        ),
    ]
}

#[test]
fn each_alert_fires_at_its_threshold_and_clears_below_its_band() {
    for (case, inputs, now, alert, level, value) in cases() {
        let c = condition(&inputs, now, alert);
        assert_eq!((c.level, c.value.as_str()), (level, value), "{case}");
    }
}

#[test]
fn thresholds_clear_times_and_texts_say_what_is_wrong() {
    let c = condition(&queued(3, T0, 0), T0 + 6 * MIN, AlertName::NoDelivery);
    assert_eq!(c.threshold, "5m");
    assert_eq!(c.clear_after, Duration::from_secs(60));
    assert!(
        c.text
            .starts_with("3 messages queued and none delivered for 360s"),
        "{}",
        c.text
    );
    let c = condition(&queued(100, T0, 0), T0, AlertName::QueueDepth);
    assert_eq!((c.threshold.as_str(), c.clear_after), ("100", CLEAR_AFTER));
    let c = condition(
        &down(&[("exchange-a", T0)]),
        T0 + 301 * SEC,
        AlertName::UpstreamDown,
    );
    assert_eq!(
        c.text,
        "circuit breaker open: exchange-a down for 301s (connection refused)"
    );
    let paused = Inputs {
        paused: true,
        ..started()
    };
    let c = condition(&paused, T0 + 20 * MIN, AlertName::NoInbound);
    assert!(c.text.contains("listeners are paused"), "{}", c.text);
    // A threshold shorter than CLEAR_AFTER is also the clear time.
    let short = config::Alerts {
        upstream_down: Some(Duration::from_secs(2)),
        ..config::Alerts::default()
    };
    let all = evaluate(&started(), &short, T0);
    assert_eq!(all.len(), 1, "only configured alerts are evaluated");
    assert_eq!(all[0].clear_after, Duration::from_secs(2));
    assert!(evaluate(&started(), &config::Alerts::default(), T0).is_empty());
}

#[test]
fn durations_are_written_as_the_policy_writes_them() {
    for (secs_ms, text) in [
        (300_000, "5m"),
        (90_000, "90s"),
        (1500, "1500ms"),
        (3_600_000, "1h"),
        (86_400_000, "1d"),
        // Unreachable for a threshold (the configuration refuses zero), written as the
        // policy would write it.
        (0, "0s"),
    ] {
        assert_eq!(format_duration(Duration::from_millis(secs_ms)), text);
    }
}

fn cond(alert: AlertName, level: Level, clear_after_s: u64) -> Condition {
    Condition {
        alert,
        level,
        value: format!("{level:?}"),
        threshold: "5m".into(),
        text: "t".into(),
        clear_after: Duration::from_secs(clear_after_s),
    }
}

/// Step `engine` once a second from `from` (seconds after T0) with the levels given; the
/// seconds at which something started (+) or ended (-).
fn run(engine: &mut Engine, from: u64, levels: &[Level], clear_after_s: u64) -> Vec<String> {
    let mut out = Vec::new();
    for (i, level) in levels.iter().enumerate() {
        let second = from + i as u64;
        let c = cond(AlertName::QueueDepth, *level, clear_after_s);
        for t in engine.step(&[c], T0 + second * SEC) {
            out.push(match t {
                Transition::Started(_) => format!("+{second}"),
                Transition::Grew(_) => format!("^{second}"),
                Transition::Ended { .. } => format!("-{second}"),
            });
        }
    }
    out
}

#[test]
fn an_alert_starts_once_and_ends_once_after_its_clear_time() {
    use Level::*;
    let mut engine = Engine::default();
    let levels = [
        Clear, Hold, Firing, Firing, Hold, Clear, Clear, Clear, Clear, Firing,
    ];
    // Starts at 2; clear from 5, ended at 5 + 3 = 8; starts again at 9.
    assert_eq!(run(&mut engine, 0, &levels, 3), ["+2", "-8", "+9"]);
    assert_eq!(engine.active().len(), 1);
    assert_eq!(engine.active()[0].since, T0 / 1000 + 9);
}

#[test]
fn a_hold_or_firing_evaluation_restarts_the_clear_time() {
    use Level::*;
    let mut engine = Engine::default();
    let levels = [
        Firing, Clear, Clear, Hold, Clear, Clear, Firing, Clear, Clear, Clear,
    ];
    // Clear from 7 on: 3 s of it only at 10.
    assert_eq!(run(&mut engine, 0, &levels, 3), ["+0"]);
    assert_eq!(run(&mut engine, 10, &[Clear], 3), ["-10"]);
    // A quiet alert in the band stays quiet.
    assert_eq!(
        run(&mut engine, 20, &[Hold, Hold, Clear], 3),
        Vec::<String>::new()
    );
}

#[test]
fn the_ended_alert_carries_its_start_and_the_values_that_ended_it() {
    let mut engine = Engine::default();
    let firing = cond(AlertName::NoDelivery, Level::Firing, 0);
    assert!(
        matches!(&engine.step(&[firing], T0)[..], [Transition::Started(a)] if a.since == T0 / 1000)
    );
    let t = engine.step(
        &[cond(AlertName::NoDelivery, Level::Clear, 0)],
        T0 + 7 * SEC,
    );
    let [Transition::Ended { alert, at }] = &t[..] else {
        panic!("{t:?}")
    };
    assert_eq!(
        (alert.since, *at, alert.value.as_str()),
        (T0 / 1000, T0 / 1000 + 7, "Clear")
    );
    assert!(engine.active().is_empty());
}

#[test]
fn an_alert_removed_by_a_reload_ends_at_once() {
    let mut engine = Engine::default();
    engine.step(&[cond(AlertName::UpstreamDown, Level::Firing, 60)], T0);
    let t = engine.step(&[], T0 + SEC);
    let [Transition::Ended { alert, .. }] = &t[..] else {
        panic!("{t:?}")
    };
    assert_eq!(alert.text, "upstream_down is no longer configured");
}

#[test]
fn external_alerts_start_when_raised_and_end_when_cleared() {
    let board = AlertBoard::default();
    let mut engine = Engine::default();
    assert!(engine.step(&board.external_conditions(), T0).is_empty());
    let raised = External {
        value: "1".into(),
        threshold: "3".into(),
        text: "login x suspended".into(),
    };
    board.set_external(AlertName::UserSuspended, Some(raised));
    board.set_external(
        AlertName::NoInbound,
        Some(External {
            value: String::new(),
            threshold: String::new(),
            text: "ignored: evaluated from [alerts]".into(),
        }),
    );
    let t = engine.step(&board.external_conditions(), T0 + SEC);
    assert!(
        matches!(&t[..], [Transition::Started(a)] if a.alert == AlertName::UserSuspended && a.text == "login x suspended"),
        "{t:?}"
    );
    // A second login suspended while the first still is: announced again, since unchanged.
    let second = External {
        value: "2".into(),
        threshold: "0".into(),
        text: "logins x, y suspended".into(),
    };
    board.set_external(AlertName::UserSuspended, Some(second));
    let t = engine.step(&board.external_conditions(), T0 + 2 * SEC);
    assert!(
        matches!(&t[..], [Transition::Grew(a)] if a.value == "2" && a.since == (T0 + SEC) / 1000),
        "{t:?}"
    );
    // Fewer is not news; nor is the same again.
    let one = External {
        value: "1".into(),
        threshold: "0".into(),
        text: "login y suspended".into(),
    };
    board.set_external(AlertName::UserSuspended, Some(one));
    assert_eq!(engine.step(&board.external_conditions(), T0 + 3 * SEC), []);
    assert_eq!(engine.step(&board.external_conditions(), T0 + 4 * SEC), []);
    board.set_external(AlertName::UserSuspended, None);
    let t = engine.step(&board.external_conditions(), T0 + 5 * SEC);
    assert!(
        matches!(&t[..], [Transition::Ended { alert, .. }] if alert.alert == AlertName::UserSuspended),
        "{t:?}"
    );
}

#[test]
fn the_queue_is_stuck_since_it_became_non_empty_not_since_the_last_delivery() {
    let mut watch = QueueWatch::new(T0);
    // Messages recovered from the spool at start, arrived long before: counted from start.
    assert_eq!(watch.observe(2, Some(T0 / 1000 - 3600), T0), Some(T0));
    assert_eq!(watch.observe(0, None, T0 + MIN), None);
    // Empty for an hour, then a message arrives between two evaluations.
    assert_eq!(watch.observe(0, None, T0 + 61 * MIN), None);
    let arrival = T0 / 1000 + 61 * 60 + 1;
    assert_eq!(
        watch.observe(1, Some(arrival), T0 + 61 * MIN + 2 * SEC),
        Some(arrival * 1000)
    );
    // Still non-empty: the moment stays, whatever arrives.
    assert_eq!(
        watch.observe(5, Some(arrival + 30), T0 + 70 * MIN),
        Some(arrival * 1000)
    );
    // A held message released after an hour: arrived long ago, queued since the release.
    assert_eq!(watch.observe(0, None, T0 + 80 * MIN), None);
    assert_eq!(
        watch.observe(1, Some(T0 / 1000), T0 + 80 * MIN + SEC),
        Some(T0 + 80 * MIN)
    );
}

mod live {
    //! The alert task and the webhook over real loopback HTTP, with paused time.

    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};
    use std::time::Duration;

    use http_body_util::{BodyExt, Empty};
    use hyper::body::Bytes;
    use tokio::time::{Instant, sleep};
    use tokio_util::sync::CancellationToken;

    use super::super::AlertName;
    use super::super::task::{Clock, spawn_with_clock};
    use crate::config::Config;
    use crate::observe::webhook::{Body, State, Webhook};
    use crate::observe::{Event, EventKind, QueueCensus, Telemetry, UpstreamCount};

    /// What a receiver answers to one request.
    #[derive(Debug, Clone, Copy)]
    enum Answer {
        Status(u16),
        Never,
    }

    /// One request a receiver got: when (since the test started), its Content-Type, its body.
    #[derive(Debug, Clone)]
    struct Got {
        at: Duration,
        content_type: String,
        body: Body,
    }

    /// A local HTTP receiver answering its `script` in order, then `then` for ever.
    struct Receiver {
        url: String,
        got: Arc<Mutex<Vec<Got>>>,
    }

    impl Receiver {
        async fn start(script: Vec<Answer>, then: Answer) -> Receiver {
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let url = format!("http://{}/hook", listener.local_addr().unwrap());
            let got = Arc::new(Mutex::new(Vec::new()));
            let count = Arc::new(AtomicUsize::new(0));
            let epoch = Instant::now();
            let (got2, script) = (got.clone(), Arc::new(script));
            tokio::spawn(async move {
                loop {
                    let (stream, _) = listener.accept().await.unwrap();
                    let (got, count, script) = (got2.clone(), count.clone(), script.clone());
                    let service = hyper::service::service_fn(
                        move |req: hyper::Request<hyper::body::Incoming>| {
                            let (got, count, script) = (got.clone(), count.clone(), script.clone());
                            async move {
                                let content_type = req
                                    .headers()
                                    .get("content-type")
                                    .map(|v| v.to_str().unwrap().to_owned())
                                    .unwrap_or_default();
                                let bytes = req.into_body().collect().await?.to_bytes();
                                got.lock().unwrap().push(Got {
                                    at: epoch.elapsed(),
                                    content_type,
                                    body: serde_json::from_slice(&bytes).expect("a webhook body"),
                                });
                                let n = count.fetch_add(1, Ordering::SeqCst);
                                match script.get(n).copied().unwrap_or(then) {
                                    Answer::Status(code) => Ok::<_, hyper::Error>(
                                        hyper::Response::builder()
                                            .status(code)
                                            .body(Empty::<Bytes>::new())
                                            .unwrap(),
                                    ),
                                    Answer::Never => std::future::pending().await,
                                }
                            }
                        },
                    );
                    tokio::spawn(async move {
                        let io = hyper_util::rt::TokioIo::new(stream);
                        let _ = hyper::server::conn::http1::Builder::new()
                            .serve_connection(io, service)
                            .await;
                    });
                }
            });
            Receiver { url, got }
        }

        fn got(&self) -> Vec<Got> {
            self.got.lock().unwrap().clone()
        }

        /// (alert, state) of each request, in order.
        fn states(&self) -> Vec<(AlertName, State)> {
            self.got()
                .iter()
                .map(|g| (g.body.alert, g.body.state))
                .collect()
        }
    }

    /// Wall-clock milliseconds that follow tokio's (paused) clock from `base`.
    fn paused_clock(base: u64) -> Clock {
        let epoch = Instant::now();
        Arc::new(move || base + u64::try_from(epoch.elapsed().as_millis()).unwrap())
    }

    const BASE: u64 = 1_796_097_600_000;

    /// The alert task for `telemetry` on `config`, on `clock`: its stop token and handle.
    fn start(
        telemetry: &Arc<Telemetry>,
        config: Arc<Config>,
        clock: &Clock,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let task = spawn_with_clock(
            telemetry.clone(),
            Arc::new(move || config.clone()),
            stop.clone(),
            clock.clone(),
            None,
        );
        (stop, task)
    }

    fn config(alerts: &str) -> Arc<Config> {
        let text = format!(
            "[server]\nhostname = \"relay.test\"\n[[listeners]]\nbind = \"127.0.0.1:2525\"\n\
             tls = \"none\"\n[[upstreams]]\naddress = \"127.0.0.1:25\"\n[alerts]\n{alerts}"
        );
        Arc::new(Config::from_toml(&text, None).expect("valid test policy"))
    }

    fn census(queued: u64, oldest: Option<u64>) -> QueueCensus {
        QueueCensus {
            by_upstream: vec![UpstreamCount {
                upstream: "exchange".into(),
                queued,
                held: 0,
            }],
            oldest: oldest.map(|at| ("Q1".to_owned(), at)),
            top_senders: Vec::new(),
            loading: false,
        }
    }

    fn alert_gauge(telemetry: &Telemetry, alert: &str) -> String {
        let text = telemetry.metrics.encode();
        let prefix = format!("portcullis_alert_active{{alert=\"{alert}\"}} ");
        text.lines()
            .find_map(|l| l.strip_prefix(&prefix))
            .unwrap_or("(none)")
            .to_owned()
    }

    /// The alert task on `config` and `clock` keeping its state in `file`.
    fn start_kept(
        telemetry: &Arc<Telemetry>,
        config: Arc<Config>,
        clock: &Clock,
        file: &std::path::Path,
    ) -> (CancellationToken, tokio::task::JoinHandle<()>) {
        let stop = CancellationToken::new();
        let task = spawn_with_clock(
            telemetry.clone(),
            Arc::new(move || config.clone()),
            stop.clone(),
            clock.clone(),
            Some(file.to_path_buf()),
        );
        (stop, task)
    }

    /// `no_inbound` counts from the start: after a restart it cannot fire again before its
    /// threshold, yet a firing one carried over must neither end in the meantime nor start
    /// again; it ends once, when a message is accepted.
    #[tokio::test(start_paused = true)]
    async fn a_no_inbound_carried_over_a_restart_neither_ends_nor_starts_again_until_mail_comes() {
        let receiver = Receiver::start(vec![], Answer::Status(200)).await;
        let config = config(&format!(
            "no_inbound = \"2m\"\nwebhook = \"{}\"\n",
            receiver.url
        ));
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(super::super::state::FILE_NAME);
        let clock = paused_clock(BASE);
        let first = Arc::new(Telemetry::new("edge-1"));
        let (stop, task) = start_kept(&first, config.clone(), &clock, &file);
        sleep(Duration::from_millis(120_500)).await;
        assert_eq!(receiver.states(), [(AlertName::NoInbound, State::Firing)]);
        let since = first.alerts.active()[0].since;
        stop.cancel();
        task.await.unwrap();

        // Restarted 10 s later: a new start, nothing accepted since.
        sleep(Duration::from_secs(10)).await;
        let second = Arc::new(Telemetry::new("edge-1"));
        let (stop, task) = start_kept(&second, config, &clock, &file);
        assert_eq!(alert_gauge(&second, "no_inbound"), "1");
        assert_eq!(second.alerts.active()[0].since, since);
        // Past the clear time (60 s) and the threshold (2 m) after the start: carried on.
        sleep(Duration::from_secs(125)).await;
        assert_eq!(second.alerts.active()[0].since, since);
        assert_eq!(receiver.states().len(), 1);
        // Mail every second: clear from the next evaluation, ended 60 s later.
        for _ in 0..62 {
            second.record(&Event::at(EventKind::Queued, clock()));
            sleep(Duration::from_secs(1)).await;
        }
        assert!(second.alerts.active().is_empty());
        assert_eq!(
            receiver.states(),
            [
                (AlertName::NoInbound, State::Firing),
                (AlertName::NoInbound, State::Resolved)
            ]
        );
        stop.cancel();
        task.await.unwrap();
        assert!(super::super::state::load(&file).is_empty());
    }

    /// A damaged state file is ignored: nothing is carried over, the alerts work as without
    /// one, and the file is replaced at the next start or end.
    #[tokio::test(start_paused = true)]
    async fn a_damaged_alert_state_file_is_ignored_and_replaced() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join(super::super::state::FILE_NAME);
        std::fs::write(&file, b"[{\"alert\": \"no_inb").unwrap();
        let telemetry = Arc::new(Telemetry::new("edge-1"));
        let clock = paused_clock(BASE);
        let (stop, task) = start_kept(&telemetry, config("no_inbound = \"5s\"\n"), &clock, &file);
        assert!(telemetry.alerts.active().is_empty());
        assert_eq!(alert_gauge(&telemetry, "no_inbound"), "0");
        sleep(Duration::from_millis(5500)).await;
        stop.cancel();
        task.await.unwrap();
        let kept = super::super::state::load(&file);
        assert_eq!(kept.len(), 1);
        assert_eq!(kept[0].alert, AlertName::NoInbound);
    }

    #[tokio::test(start_paused = true)]
    async fn no_delivery_fires_then_resolves_exactly_once_on_the_webhook() {
        let receiver = Receiver::start(vec![], Answer::Status(200)).await;
        let config = config(&format!(
            "no_delivery = \"5s\"\nwebhook = \"{}\"\n",
            receiver.url
        ));
        let telemetry = Arc::new(Telemetry::new("edge-1"));
        let clock = paused_clock(BASE);
        let (stop, task) = start(&telemetry, config, &clock);
        assert_eq!(alert_gauge(&telemetry, "no_delivery"), "0");
        assert_eq!(alert_gauge(&telemetry, "cluster_fallback"), "0");
        telemetry.record(&Event::at(EventKind::Queued, clock()));
        telemetry.set_queue(census(1, Some(clock() / 1000)), clock() / 1000);

        sleep(Duration::from_millis(4500)).await;
        assert!(telemetry.alerts.active().is_empty());
        assert!(receiver.got().is_empty());
        sleep(Duration::from_secs(1)).await; // 5.5 s: the evaluation at 5 s found it
        let active = telemetry.alerts.active();
        assert_eq!(active.len(), 1);
        assert_eq!(
            (
                active[0].alert,
                active[0].since,
                active[0].threshold.as_str()
            ),
            (AlertName::NoDelivery, BASE / 1000 + 5, "5s")
        );
        assert_eq!(alert_gauge(&telemetry, "no_delivery"), "1");
        let got = receiver.got();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].at, Duration::from_secs(5));
        assert_eq!(got[0].content_type, "application/json");
        assert_eq!(
            got[0].body,
            Body {
                alert: AlertName::NoDelivery,
                state: State::Firing,
                since: "2026-12-01T04:00:05Z".into(),
                node: "edge-1".into(),
                value: "5s".into(),
                threshold: "5s".into(),
                text: "1 message queued and none delivered for 5s: see portcullis status for the upstreams' last errors".into(),
            }
        );

        // Delivered at 5.5 s: clear from the evaluation at 6 s, ended 5 s later at 11 s.
        telemetry.record(&Event::at(EventKind::Delivered, clock()));
        telemetry.set_queue(census(0, None), clock() / 1000);
        sleep(Duration::from_secs(5)).await; // 10.5 s
        assert_eq!(telemetry.alerts.active().len(), 1);
        sleep(Duration::from_secs(1)).await; // 11.5 s
        assert!(telemetry.alerts.active().is_empty());
        assert_eq!(alert_gauge(&telemetry, "no_delivery"), "0");
        sleep(Duration::from_secs(30)).await;
        assert_eq!(
            receiver.states(),
            [
                (AlertName::NoDelivery, State::Firing),
                (AlertName::NoDelivery, State::Resolved)
            ]
        );
        let resolved = &receiver.got()[1];
        assert_eq!(
            (resolved.at, resolved.body.since.as_str()),
            (Duration::from_secs(11), "2026-12-01T04:00:11Z")
        );
        assert_eq!(resolved.body.text, "the queue is empty");
        stop.cancel();
        task.await.unwrap();
    }

    #[tokio::test(start_paused = true)]
    async fn a_reload_applies_new_thresholds_at_the_next_evaluation() {
        let telemetry = Arc::new(Telemetry::new("edge-1"));
        let running = Arc::new(Mutex::new(config("no_inbound = \"1h\"\n")));
        let source = {
            let running = running.clone();
            Arc::new(move || running.lock().unwrap().clone())
        };
        let stop = CancellationToken::new();
        spawn_with_clock(
            telemetry.clone(),
            source,
            stop.clone(),
            paused_clock(BASE),
            None,
        );
        sleep(Duration::from_millis(10_500)).await;
        assert!(telemetry.alerts.active().is_empty());
        *running.lock().unwrap() = config("no_inbound = \"10s\"\n");
        sleep(Duration::from_secs(1)).await;
        let active = telemetry.alerts.active();
        assert_eq!(
            (active.len(), active[0].alert, active[0].value.as_str()),
            (1, AlertName::NoInbound, "11s")
        );
        stop.cancel();
    }

    fn body(alert: AlertName) -> Body {
        Body {
            alert,
            state: State::Firing,
            since: "2026-12-01T04:00:00Z".into(),
            node: "edge-1".into(),
            value: "1".into(),
            threshold: "1".into(),
            text: "t".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_webhook_answering_500_twice_gets_a_third_attempt_and_no_fourth() {
        let receiver = Receiver::start(
            vec![Answer::Status(500), Answer::Status(500)],
            Answer::Status(204),
        )
        .await;
        let stop = CancellationToken::new();
        let (webhook, _task) = Webhook::spawn(stop.clone());
        webhook.send(&receiver.url, body(AlertName::QueueDepth));
        sleep(Duration::from_secs(60)).await;
        let at: Vec<Duration> = receiver.got().iter().map(|g| g.at).collect();
        // One pause of a second between attempts.
        assert_eq!(at, [0, 1, 2].map(Duration::from_secs));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_webhook_that_never_answers_costs_each_notification_at_most_29_s() {
        let hung = Receiver::start(vec![], Answer::Never).await;
        let good = Receiver::start(vec![], Answer::Status(200)).await;
        let stop = CancellationToken::new();
        let (webhook, _task) = Webhook::spawn(stop.clone());
        webhook.send(&hung.url, body(AlertName::NoInbound));
        webhook.send(&good.url, body(AlertName::NoDelivery));
        sleep(Duration::from_secs(120)).await;
        let at: Vec<Duration> = hung.got().iter().map(|g| g.at).collect();
        // Five attempts of 5 s, a second apart.
        assert_eq!(at, [0, 6, 12, 18, 24].map(Duration::from_secs));
        let got = good.got();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].at, Duration::from_secs(29));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn a_hung_webhook_delays_neither_the_alerts_nor_their_metrics() {
        let hung = Receiver::start(vec![], Answer::Never).await;
        let config = config(&format!(
            "no_inbound = \"2s\"\nqueue_depth = 1\nwebhook = \"{}\"\n",
            hung.url
        ));
        let telemetry = Arc::new(Telemetry::new("edge-1"));
        let clock = paused_clock(BASE);
        let (stop, _task) = start(&telemetry, config, &clock);
        sleep(Duration::from_millis(2500)).await;
        assert_eq!(alert_gauge(&telemetry, "no_inbound"), "1");
        telemetry.set_queue(census(1, Some(clock() / 1000)), clock() / 1000);
        sleep(Duration::from_secs(1)).await;
        let names: Vec<AlertName> = telemetry.alerts.active().iter().map(|a| a.alert).collect();
        assert_eq!(names, [AlertName::NoInbound, AlertName::QueueDepth]);
        assert_eq!(alert_gauge(&telemetry, "queue_depth"), "1");
        // The second notification waits behind the first's five attempts (29 s).
        assert_eq!(hung.states(), [(AlertName::NoInbound, State::Firing)]);
        sleep(Duration::from_secs(30)).await;
        assert_eq!(hung.got()[5].body.alert, AlertName::QueueDepth);
        assert_eq!(hung.got()[5].at, Duration::from_secs(31));
        stop.cancel();
    }

    #[tokio::test(start_paused = true)]
    async fn without_a_webhook_upstream_down_still_shows_on_the_board_and_in_metrics() {
        let config = config("upstream_down = \"3s\"\n");
        let telemetry = Arc::new(Telemetry::new("edge-1"));
        let clock = paused_clock(BASE);
        let names = ["exchange".to_owned()];
        telemetry
            .upstreams
            .configure(&names, clock() / 1000, &telemetry.metrics);
        let (stop, _task) = start(&telemetry, config, &clock);
        let (metrics, upstreams) = (&telemetry.metrics, &telemetry.upstreams);
        upstreams.set_up(
            "exchange",
            false,
            Some("connection refused"),
            clock() / 1000,
            metrics,
        );
        sleep(Duration::from_millis(2500)).await;
        assert!(telemetry.alerts.active().is_empty());
        sleep(Duration::from_secs(1)).await; // 3.5 s: the evaluation at 3 s found it
        let active = telemetry.alerts.active();
        assert_eq!(active.len(), 1);
        assert_eq!(
            active[0].text,
            "circuit breaker open: exchange down for 3s (connection refused)"
        );
        assert_eq!(alert_gauge(&telemetry, "upstream_down"), "1");
        upstreams.set_up("exchange", true, None, clock() / 1000, metrics);
        // Up from 3.5 s: clear at 4 s, ended 3 s later.
        sleep(Duration::from_secs(3)).await; // 6.5 s
        assert_eq!(alert_gauge(&telemetry, "upstream_down"), "1");
        sleep(Duration::from_secs(1)).await; // 7.5 s
        assert_eq!(alert_gauge(&telemetry, "upstream_down"), "0");
        assert!(telemetry.alerts.active().is_empty());
        stop.cancel();
    }

    /// A TLS server on loopback with a self-signed certificate for 127.0.0.1 (outside the
    /// system's roots); counts the handshakes it saw fail.
    async fn self_signed_https() -> (String, Arc<AtomicUsize>) {
        use tokio_rustls::rustls;
        let cert = rcgen::generate_simple_self_signed(vec!["127.0.0.1".to_owned()]).unwrap();
        let key = rustls_pki_types::PrivateKeyDer::Pkcs8(cert.signing_key.serialize_der().into());
        let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(vec![cert.cert.der().clone()], key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("https://{}/hook", listener.local_addr().unwrap());
        let failed = Arc::new(AtomicUsize::new(0));
        let count = failed.clone();
        tokio::spawn(async move {
            loop {
                let (stream, _) = listener.accept().await.unwrap();
                if acceptor.accept(stream).await.is_err() {
                    count.fetch_add(1, Ordering::SeqCst);
                }
            }
        });
        (url, failed)
    }

    #[tokio::test(start_paused = true)]
    async fn an_https_webhook_whose_certificate_the_system_does_not_trust_gets_nothing() {
        let (url, failed) = self_signed_https().await;
        let stop = CancellationToken::new();
        let (webhook, _task) = Webhook::spawn(stop.clone());
        webhook.send(&url, body(AlertName::UpstreamDown));
        sleep(Duration::from_secs(60)).await;
        // Every attempt ended in the handshake: the body never left.
        assert_eq!(failed.load(Ordering::SeqCst), 5);
        stop.cancel();
    }
}
