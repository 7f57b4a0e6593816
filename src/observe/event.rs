//! One event of a message's life, as counted by the metrics and flow and written to the
//! journal behind `portcullis trace` (one JSON object per line; fields left out when empty).

use std::net::IpAddr;
use std::time::{SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};

/// What happened. The journal's `kind` field; `trace` prints it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum EventKind {
    /// A client connected and passed the connect stage (a refusal at connect is `Refused`).
    Connect,
    /// A command, a message or a connection was refused: `rule` fired, `reply` was sent.
    Refused,
    /// A message was committed to the spool and acknowledged with `250` (`id`,
    /// `message_id`, `from`, `rcpts`, `client`, `listener`, `tls`, `size`).
    Queued,
    /// An upstream accepted `rcpts` of message `id` (`upstream`, its `reply`, and the
    /// upstream's own id in `upstream_id` when its reply names one).
    Delivered,
    /// An attempt to `upstream` left `rcpts` for later (`reply`: the upstream's reply or the
    /// connection error).
    Deferred,
    /// `upstream` refused `rcpts` for good (`reply`); a bounce follows unless disabled.
    Failed,
    /// A bounce (RFC 3464 DSN) for message `id` was queued as `bounce_id`, or could not be
    /// sent (`bounce_id` absent: the sender is `<>`, or `[queue] bounces = false`).
    Bounced,
    /// Message `id` reached `[queue] max_age` with `rcpts` still pending.
    Expired,
    /// Every recipient of message `id` is done: it left the queue.
    Finished,
    /// `queue delete` removed message `id`.
    Deleted,
    /// `queue purge` removed message `id`.
    Purged,
    /// `queue purge --quarantine` put message `id` aside.
    Quarantined,
    /// Message `id` was held (not attempted, bounced or expired until released).
    Held,
    /// Message `id` was released: due now.
    Released,
    /// `queue restore` put quarantined message `id` back into the queue: due now.
    Restored,
    /// `queue adopt` imported message `id` from another node's spool, where its id was
    /// `adopted_from` (set only when it differs): due now unless held.
    Adopted,
}

impl EventKind {
    /// The name used in the journal and by `trace`.
    pub fn as_str(self) -> &'static str {
        match self {
            EventKind::Connect => "connect",
            EventKind::Refused => "refused",
            EventKind::Queued => "queued",
            EventKind::Delivered => "delivered",
            EventKind::Deferred => "deferred",
            EventKind::Failed => "failed",
            EventKind::Bounced => "bounced",
            EventKind::Expired => "expired",
            EventKind::Finished => "finished",
            EventKind::Deleted => "deleted",
            EventKind::Purged => "purged",
            EventKind::Quarantined => "quarantined",
            EventKind::Held => "held",
            EventKind::Released => "released",
            EventKind::Restored => "restored",
            EventKind::Adopted => "adopted",
        }
    }
}

/// One event. Only `at` and `kind` are always set; the others as the kind says.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Event {
    /// When, in Unix milliseconds.
    pub at: u64,
    pub kind: EventKind,
    /// The queue id.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// The message's `Message-ID:` field body, angle brackets included, as received.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message_id: Option<String>,
    /// The client's address (after a PROXY header, the address in it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub client: Option<IpAddr>,
    /// `[[listeners]] name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub listener: Option<String>,
    /// The authenticated login.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub login: Option<String>,
    /// TLS version of the session (`"1.2"`, `"1.3"`), absent for plaintext.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tls: Option<String>,
    /// The reverse-path, without angle brackets (empty for `<>`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub from: Option<String>,
    /// Forward-paths this event concerns.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub rcpts: Vec<String>,
    /// The rule that refused (the log's `rule=`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rule: Option<String>,
    /// The reply sent (a refusal) or received (delivery), one line.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reply: Option<String>,
    /// `[[upstreams]] name`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream: Option<String>,
    /// The upstream's own id for the message, from its reply: Exchange's `InternalId=…`, or
    /// a `queued as ID`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upstream_id: Option<String>,
    /// Message size in octets as spooled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub size: Option<u64>,
    /// The queue id of the bounce this event queued.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bounce_id: Option<String>,
    /// Seconds the delivery transaction took (connection to reply to the final dot).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seconds: Option<f64>,
    /// The id an adopted message had in the spool it came from, when its id was taken here.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adopted_from: Option<String>,
    /// The `[cluster] node` that recorded it (set by the journal with `[cluster]`; absent in
    /// older journals and without `[cluster]`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node: Option<String>,
}

impl Event {
    /// An event of `kind` at `at` (Unix milliseconds), every other field empty.
    pub fn at(kind: EventKind, at: u64) -> Event {
        Event {
            at,
            kind,
            id: None,
            message_id: None,
            client: None,
            listener: None,
            login: None,
            tls: None,
            from: None,
            rcpts: Vec::new(),
            rule: None,
            reply: None,
            upstream: None,
            upstream_id: None,
            size: None,
            bounce_id: None,
            seconds: None,
            adopted_from: None,
            node: None,
        }
    }

    /// An event of `kind` now (the system clock).
    pub fn now(kind: EventKind) -> Event {
        Event::at(kind, unix_millis())
    }
}

/// The system clock in Unix milliseconds (0 before 1970).
pub fn unix_millis() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
}
