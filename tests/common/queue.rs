//! What the queue tests share: an upstream that keeps mail queued until told otherwise, what
//! it accepted, and the queue as `queue list --json` shows it.

use std::collections::BTreeMap;
use std::time::Duration;

use serde_json::Value;

use super::sink::{Sink, SinkConfig};
use super::{Relay, show, wait_until};

/// How long the helpers here wait for the relay.
const WAIT: Duration = Duration::from_secs(15);

/// A sink that answers MAIL with `451`: the relay keeps everything queued, retrying each
/// message at its retry interval, until [`accept`] turns it into a plain accepting server.
pub fn refusing_sink() -> Sink {
    Sink::start(SinkConfig {
        mail_reply: Some("451 4.3.0 try again later".into()),
        ..SinkConfig::default()
    })
}

/// Make `sink` accept everything from now on.
pub fn accept(sink: &Sink) {
    sink.set_config(SinkConfig::default());
}

/// The subjects of the messages `sink` accepted, in order.
pub fn delivered(sink: &Sink) -> Vec<String> {
    sink.messages()
        .iter()
        .map(|m| {
            let text = String::from_utf8_lossy(&m.data);
            let line = text.lines().find(|l| l.starts_with("Subject: ")).unwrap();
            line["Subject: ".len()..].to_string()
        })
        .collect()
}

/// How many times `sink` accepted each subject.
pub fn delivery_counts(sink: &Sink) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    for subject in delivered(sink) {
        *counts.entry(subject).or_insert(0) += 1;
    }
    counts
}

/// `queue list --json`, by id.
#[track_caller]
pub fn listed(relay: &Relay) -> BTreeMap<String, Value> {
    let out = relay.command(&["queue", "list", "--json"]);
    assert_eq!(out.status.code(), Some(0), "{}", show(&out));
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["id"].as_str().unwrap().to_string(), v)
        })
        .collect()
}

/// Wait until `queue list --json` says `state` for each of `ids`.
#[track_caller]
pub fn wait_state(relay: &Relay, ids: &[&String], state: &str) {
    let ok = wait_until(WAIT, || {
        let list = listed(relay);
        ids.iter()
            .all(|id| list.get(*id).is_some_and(|v| v["state"] == state))
    });
    assert!(ok, "not all {state}: {ids:?}\n{:#?}", listed(relay));
}
