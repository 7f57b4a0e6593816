//! An upstream that misbehaves, on loopback: it resets the connection at DATA, stalls after the
//! final dot until the relay's timeout, answers `250` and then closes, loses its reply to the
//! final dot, flaps between up and down under load, or goes away and comes back (its circuit
//! breaker opens, mail waits, and is delivered once it returns). Nothing acknowledged is lost; a message
//! reaches the upstream twice only when the cut came after its final dot (the relay cannot know
//! the upstream took it), never otherwise; the relay retries by itself and its queue empties.

mod common;

use std::collections::BTreeMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use common::queue::delivery_counts;
use common::sink::{AfterDot, Sink, SinkConfig, Stage};
use common::*;

const WAIT: Duration = Duration::from_secs(20);

/// A relay for loopback to `sink`, with short upstream timers: a 2 s command timeout, a 1 s
/// back-off, retries every second.
fn relay(sink: &Sink) -> Relay {
    let port = free_port();
    let text = format!(
        "[server]\nhostname = \"relay.test\"\nspool_dir = \"{{dir}}/spool\"\n\n{}\n\
         [relay]\nrelay_networks = [\"127.0.0.0/8\"]\n\n\
         [[upstreams]]\nname = \"up\"\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n\
         backoff = \"1s\"\ntimeout = \"2s\"\nconnect_timeout = \"2s\"\n\n\
         [queue]\nretry = [\"1s\"]\n",
        listener("mx", port, "none"),
        sink.port()
    );
    Relay::start(&text)
}

/// Send one message tagged `tag` in its own session from `ip`; the relay's `250` is asserted.
fn send(port: u16, ip: &str, tag: &str) {
    let mut c = SmtpClient::connect_from(ip, port);
    c.expect_reply(220);
    c.expect("EHLO client.test", 250);
    let (code, text) = c.send_message(
        "a@example.org",
        &["b@example.com"],
        &format!("From: <a@example.org>\r\nSubject: {tag}\r\n\r\n{tag} body\r\n"),
    );
    assert_eq!(code, 250, "{tag}: {text}");
    c.expect("QUIT", 221);
}

/// With the upstream behaving as `fault`, one message is sent; the relay's log shows the
/// attempt failing with `error`; then the upstream behaves and the message arrives `times`.
fn fault_then_recovery(fault: SinkConfig, error: &str, times: usize) {
    let sink = Sink::start(fault);
    let relay = relay(&sink);
    send(relay.port(0), "127.0.0.1", "chaos");
    assert!(
        relay.wait_for_log(error, WAIT),
        "no {error:?} in the log:\n{}",
        relay.log()
    );
    sink.set_config(SinkConfig::default());
    assert!(relay.wait_for_queue_len(0, WAIT), "{}", relay.log());
    assert_eq!(
        delivery_counts(&sink),
        BTreeMap::from([("chaos".to_owned(), times)]),
        "{}",
        relay.log()
    );
}

#[test]
fn a_reset_at_data_is_retried_and_delivered_once() {
    fault_then_recovery(
        SinkConfig {
            drop_after: Some(Stage::Data),
            ..SinkConfig::default()
        },
        "connection closed by the upstream",
        1,
    );
}

#[test]
fn an_upstream_stalled_after_the_final_dot_times_out_and_is_retried() {
    // The sink stalls before taking the message: the relay's 2 s timeout ends the attempt.
    fault_then_recovery(
        SinkConfig {
            stall_at: Some(Stage::Dot),
            ..SinkConfig::default()
        },
        "no reply within",
        1,
    );
}

#[test]
fn a_reply_lost_after_the_final_dot_is_the_one_duplicate() {
    // The upstream took the message but its reply never came: the relay cannot know, retries,
    // and the upstream gets it twice. That is the only duplicate the relay may cause.
    fault_then_recovery(
        SinkConfig {
            after_dot: AfterDot::CloseWithoutReply,
            ..SinkConfig::default()
        },
        "connection closed by the upstream",
        2,
    );
}

#[test]
fn an_upstream_that_answers_250_and_closes_gets_each_message_once() {
    let sink = Sink::start(SinkConfig {
        after_dot: AfterDot::ReplyThenClose,
        ..SinkConfig::default()
    });
    let relay = relay(&sink);
    // Messages one after another: each may find the previous one's connection closed (a pooled
    // connection the upstream dropped), which must cost neither a message nor a duplicate.
    for i in 0..5 {
        send(relay.port(0), "127.0.0.1", &format!("m{i}"));
        assert!(sink.wait_for(i + 1, WAIT), "{}", relay.log());
    }
    assert!(relay.wait_for_queue_len(0, WAIT));
    let expected: BTreeMap<String, usize> = (0..5).map(|i| (format!("m{i}"), 1)).collect();
    assert_eq!(delivery_counts(&sink), expected, "{}", relay.log());
}

#[test]
fn a_flapping_upstream_under_load_loses_nothing_and_duplicates_nothing() {
    let sink = Arc::new(Sink::start(SinkConfig::default()));
    let relay = relay(&sink);
    let port = relay.port(0);
    // Every 100 ms another behaviour, none of them after the final dot: down (connection
    // refused at the greeting), a reset in DATA, a stall at MAIL, up.
    let faults = [
        SinkConfig {
            drop_after: Some(Stage::Greeting),
            ..SinkConfig::default()
        },
        SinkConfig {
            drop_after: Some(Stage::Data),
            ..SinkConfig::default()
        },
        SinkConfig {
            stall_at: Some(Stage::Mail),
            ..SinkConfig::default()
        },
        SinkConfig::default(),
    ];
    let done = Arc::new(AtomicBool::new(false));
    let flapper = {
        let (sink, done) = (Arc::clone(&sink), Arc::clone(&done));
        std::thread::spawn(move || {
            for fault in faults.iter().cycle() {
                if done.load(Ordering::SeqCst) {
                    break;
                }
                sink.set_config(fault.clone());
                std::thread::sleep(Duration::from_millis(100));
            }
            sink.set_config(SinkConfig::default());
        })
    };
    let senders: Vec<_> = (0..4)
        .map(|c| {
            std::thread::spawn(move || {
                for m in 0..15 {
                    send(
                        port,
                        &format!("127.0.0.{}", c + 2),
                        &format!("c{c}-m{m:02}"),
                    );
                }
            })
        })
        .collect();
    for s in senders {
        s.join().unwrap();
    }
    std::thread::sleep(Duration::from_millis(1500));
    done.store(true, Ordering::SeqCst);
    flapper.join().unwrap();
    assert!(
        sink.wait_for(60, Duration::from_secs(40)),
        "{}",
        relay.log()
    );
    assert!(relay.wait_for_queue_len(0, WAIT), "{}", relay.log());
    let expected: BTreeMap<String, usize> = (0..4)
        .flat_map(|c| (0..15).map(move |m| (format!("c{c}-m{m:02}"), 1)))
        .collect();
    assert_eq!(delivery_counts(&sink), expected, "{}", relay.log());
}

#[test]
fn an_upstream_gone_opens_the_breaker_and_its_return_delivers_the_queue_once() {
    // The upstream goes away (its port refuses connections): the breaker opens (logged
    // rule=upstream_down), mail queued meanwhile waits for it without an attempt of its own
    // reaching the upstream (`(circuit breaker)` as its last error), and once the upstream is
    // back on its port the back-off (1 s) and the retry schedule (1 s) deliver everything,
    // each message once, with no restart and no operator.
    let sink = Sink::start(SinkConfig::default());
    let port = sink.port();
    let relay = relay(&sink);
    sink.stop();
    for i in 0..3 {
        send(relay.port(0), "127.0.0.1", &format!("while-down-{i}"));
    }
    assert!(
        relay.wait_for_fields(&[("rule", "upstream_down"), ("upstream", "up")], WAIT),
        "{}",
        relay.log()
    );
    let held_by_breaker = || {
        common::queue::listed(&relay).values().any(|m| {
            m["last_error"]
                .as_str()
                .is_some_and(|e| e.contains("(circuit breaker)"))
        })
    };
    assert!(
        wait_until(WAIT, held_by_breaker),
        "no message deferred by the breaker: {:#?}",
        common::queue::listed(&relay)
    );
    let sink = Sink::start_on(port, SinkConfig::default());
    assert!(relay.wait_for_queue_len(0, WAIT), "{}", relay.log());
    let expected: BTreeMap<String, usize> =
        (0..3).map(|i| (format!("while-down-{i}"), 1)).collect();
    assert_eq!(delivery_counts(&sink), expected, "{}", relay.log());
}
