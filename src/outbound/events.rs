//! What one delivery transaction tells the telemetry: the journal events of each upstream
//! tried ([`crate::observe::Event`]: delivered, deferred, failed), and the upstream's own id
//! for the message and the Message-ID it names, read from its reply to the final dot
//! ([`upstream_id`], [`reply_message_id`], pure).

use crate::observe::{Event, EventKind};

/// Longest upstream id kept (octets); a longer token is not an id we recognise.
pub const MAX_UPSTREAM_ID: usize = 64;

/// The upstream's own id for the message in its reply to the final dot, when the reply names
/// one in a form we know:
///
/// - Exchange: `250 2.6.0 <msgid@host> [InternalId=123456789, Hostname=EX01] Queued mail for
///   delivery` → `123456789`;
/// - Postfix, and portcullis itself: `250 2.0.0 Ok: queued as 4Xyz` → `4Xyz`;
/// - Exim: `250 OK id=1qAbCd-0001Ab-Cd` → `1qAbCd-0001Ab-Cd`.
///
/// The reply is untrusted text: the id is at most [`MAX_UPSTREAM_ID`] octets of ASCII
/// letters, digits and `-._:+/=@`, else `None`. RFC 5321 §4.2 leaves the text free, so any
/// other form is `None`.
pub fn upstream_id(reply: &str) -> Option<&str> {
    const MARKERS: [(&str, bool); 3] = [
        // (marker, compared without case)
        ("InternalId=", false),
        ("queued as ", true),
        (" id=", true),
    ];
    for (marker, caseless) in MARKERS {
        let found = if caseless {
            find_ascii_caseless(reply, marker)
        } else {
            reply.find(marker)
        };
        if let Some(at) = found {
            return token(&reply[at + marker.len()..]);
        }
    }
    None
}

/// Longest Message-ID kept from a reply, in octets (RFC 5322 §2.1.1 line limit, less room).
pub const MAX_REPLY_MESSAGE_ID: usize = 250;

/// The Message-ID an upstream names in its reply to the final dot, angle brackets included:
/// the word right after the code and enhanced code when it is `<…@…>`, as Exchange's
/// `250 2.6.0 <msgid@host> [InternalId=…] Queued mail for delivery` has it. Untrusted text: at
/// most [`MAX_REPLY_MESSAGE_ID`] octets of printable ASCII, else `None`.
pub fn reply_message_id(reply: &str) -> Option<&str> {
    let mut words = reply.split(' ').filter(|w| !w.is_empty());
    words.next()?;
    let mut word = words.next()?;
    let enhanced =
        |w: &str| w.split('.').count() == 3 && w.bytes().all(|b| b.is_ascii_digit() || b == b'.');
    if enhanced(word) {
        word = words.next()?;
    }
    let inner = word.strip_prefix('<')?.strip_suffix('>')?;
    let printable = inner
        .bytes()
        .all(|b| b.is_ascii_graphic() && b != b'<' && b != b'>');
    (word.len() <= MAX_REPLY_MESSAGE_ID && printable && inner.contains('@')).then_some(word)
}

/// The byte offset of `needle` (ASCII) in `hay`, ignoring ASCII case.
fn find_ascii_caseless(hay: &str, needle: &str) -> Option<usize> {
    let (hay, needle) = (hay.as_bytes(), needle.as_bytes());
    hay.windows(needle.len())
        .position(|w| w.eq_ignore_ascii_case(needle))
}

/// The id at the start of `rest`: up to the first space, comma, `]`, `;` or `)`.
fn token(rest: &str) -> Option<&str> {
    let end = rest.find([' ', ',', ']', ';', ')']).unwrap_or(rest.len());
    let id = &rest[..end];
    let allowed = |b: u8| b.is_ascii_alphanumeric() || b"-._:+/=@".contains(&b);
    (!id.is_empty() && id.len() <= MAX_UPSTREAM_ID && id.bytes().all(allowed)).then_some(id)
}

/// One completed conversation with one upstream, as the journal records it.
#[derive(Debug, Default)]
pub struct Transaction {
    /// Recipients accepted, with the reply to their final dot (one transaction per distinct
    /// reply: a continuation for recipients refused as too many has a dot of its own).
    pub delivered: Vec<(String, String)>,
    /// Recipients left for a later attempt, with why.
    pub deferred: Vec<(String, String)>,
    /// Recipients refused for good, with the reply.
    pub failed: Vec<(String, String)>,
}

/// What each event of a transaction shares.
#[derive(Debug, Clone)]
pub struct Facts<'a> {
    /// Unix milliseconds when the transaction ended.
    pub at: u64,
    /// The queue id.
    pub id: &'a str,
    /// `[[upstreams]] name`.
    pub upstream: &'a str,
    /// Seconds from the start of the connection to the reply to the final dot; `None` when no
    /// transaction took place (connection failure, breaker open).
    pub seconds: Option<f64>,
    /// Message size in octets.
    pub size: u64,
}

impl Facts<'_> {
    fn event(&self, kind: EventKind, rcpts: Vec<String>, reply: String) -> Event {
        let mut event = Event::at(kind, self.at);
        event.id = Some(self.id.to_owned());
        event.upstream = Some(self.upstream.to_owned());
        event.rcpts = rcpts;
        event.reply = Some(reply);
        event
    }

    /// The events of `tx`: a `delivered` per distinct reply to the final dot (with the
    /// upstream's id and the size), one `deferred` and one `failed` with every recipient
    /// concerned and their distinct replies joined by `; `. `seconds` goes on the delivered
    /// events, or on the deferred one when nothing was delivered (so the duration histogram
    /// counts a transaction once), and on the failed one (not counted there).
    pub fn transaction(&self, tx: Transaction) -> Vec<Event> {
        let mut events = Vec::new();
        let mut by_reply: Vec<(String, Vec<String>)> = Vec::new();
        for (rcpt, reply) in tx.delivered {
            match by_reply.iter_mut().find(|(r, _)| *r == reply) {
                Some((_, rcpts)) => rcpts.push(rcpt),
                None => by_reply.push((reply, vec![rcpt])),
            }
        }
        let delivered = !by_reply.is_empty();
        for (reply, rcpts) in by_reply {
            let mut event = self.event(EventKind::Delivered, rcpts, reply);
            let reply = event.reply.as_deref().unwrap_or_default();
            event.upstream_id = upstream_id(reply).map(str::to_owned);
            event.message_id = reply_message_id(reply).map(str::to_owned);
            event.seconds = self.seconds;
            event.size = Some(self.size);
            events.push(event);
        }
        for (kind, list) in [
            (EventKind::Deferred, tx.deferred),
            (EventKind::Failed, tx.failed),
        ] {
            if list.is_empty() {
                continue;
            }
            let (rcpts, replies) = joined(list);
            let mut event = self.event(kind, rcpts, replies);
            if kind == EventKind::Failed || !delivered {
                event.seconds = self.seconds;
            }
            events.push(event);
        }
        events
    }

    /// The event of an upstream that took no message: `rcpts` stay for later because of
    /// `why` (a connection error, an open breaker, no route).
    pub fn deferred(&self, rcpts: Vec<String>, why: String) -> Event {
        let mut event = self.event(EventKind::Deferred, rcpts, why);
        event.seconds = self.seconds;
        event
    }
}

/// The recipients, and their distinct replies joined by `; ` in first-seen order.
fn joined(list: Vec<(String, String)>) -> (Vec<String>, String) {
    let mut replies: Vec<String> = Vec::new();
    let mut rcpts = Vec::with_capacity(list.len());
    for (rcpt, reply) in list {
        if !replies.contains(&reply) {
            replies.push(reply);
        }
        rcpts.push(rcpt);
    }
    (rcpts, replies.join("; "))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn upstream_id_is_read_from_the_replies_of_known_servers() {
        let table: [(&str, Option<&str>); 14] = [
            (
                "250 2.6.0 <a1@ex.example> [InternalId=123456789, Hostname=EX01] Queued mail for delivery",
                Some("123456789"),
            ),
            (
                "250 2.6.0 <x@y> [InternalId=4294967296123, Hostname=EX01.corp.example] 3012 bytes in 0.050, 58.594 KB/sec Queued mail for delivery",
                Some("4294967296123"),
            ),
            ("250 2.0.0 Ok: queued as 4Xyz", Some("4Xyz")),
            (
                "250 2.0.0 Ok: queued as 4QxR2n1ZYkz9tFd",
                Some("4QxR2n1ZYkz9tFd"),
            ),
            (
                "250 2.0.0 Ok: queued as 0123456789ABCDEF",
                Some("0123456789ABCDEF"),
            ),
            ("250 2.0.0 OK: Queued As ABC123", Some("ABC123")),
            ("250 OK id=1qAbCd-0001Ab-Cd", Some("1qAbCd-0001Ab-Cd")),
            // No id in these.
            ("250 2.0.0 Ok", None),
            ("250 OK", None),
            ("250 2.6.0 <a@b> Queued mail for delivery", None),
            // Hostile or damaged text: never an id.
            ("250 Ok: queued as ", None),
            ("250 Ok: queued as <script>", None),
            ("250 [InternalId=, Hostname=x]", None),
            (
                "250 Ok: queued as AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
                None,
            ),
        ];
        for (reply, want) in table {
            assert_eq!(upstream_id(reply), want, "{reply}");
        }
        // Non-ASCII text around the marker does not split a character.
        assert_eq!(upstream_id("250 é queued as é"), None);
        assert_eq!(upstream_id("250 ééé"), None);
    }

    #[test]
    fn the_message_id_is_read_from_an_exchange_reply_only_where_it_stands() {
        let table: [(&str, Option<&str>); 8] = [
            (
                "250 2.6.0 <a1.b2@ex.example> [InternalId=1, Hostname=EX01] Queued mail for delivery",
                Some("<a1.b2@ex.example>"),
            ),
            ("250 <x@y> accepted", Some("<x@y>")),
            ("250 2.0.0 Ok: queued as 4Xyz", None),
            ("250 2.6.0 <no-at-sign> Queued", None),
            ("250 2.6.0 Queued <a@b>", None),
            ("250 2.6.0 <a b@c> Queued", None),
            ("250 2.6.0 <a<b@c> Queued", None),
            ("250", None),
        ];
        for (reply, want) in table {
            assert_eq!(reply_message_id(reply), want, "{reply}");
        }
        let long = format!("250 2.6.0 <{}@example.com> Queued", "a".repeat(300));
        assert_eq!(reply_message_id(&long), None);
    }

    fn facts() -> Facts<'static> {
        Facts {
            at: 1_700_000_000_000,
            id: "0123456789ABCDEF",
            upstream: "exchange",
            seconds: Some(0.25),
            size: 1234,
        }
    }

    #[test]
    fn a_transaction_makes_one_event_per_outcome_with_the_duration_counted_once() {
        let rcpt = |s: &str, r: &str| (s.to_owned(), r.to_owned());
        let events = facts().transaction(Transaction {
            delivered: vec![
                rcpt("a@example.com", "250 2.0.0 Ok: queued as UP1"),
                rcpt("b@example.com", "250 2.0.0 Ok: queued as UP1"),
            ],
            deferred: vec![rcpt("c@example.com", "RCPT: 451 4.3.0 later")],
            failed: vec![
                rcpt("d@example.com", "550 5.1.1 no such user"),
                rcpt("e@example.com", "550 5.1.1 no such user"),
                rcpt("f@example.com", "553 5.1.3 bad address"),
            ],
        });
        let kinds: Vec<EventKind> = events.iter().map(|e| e.kind).collect();
        assert_eq!(
            kinds,
            [EventKind::Delivered, EventKind::Deferred, EventKind::Failed]
        );
        let delivered = &events[0];
        assert_eq!(delivered.rcpts, ["a@example.com", "b@example.com"]);
        assert_eq!(delivered.upstream_id.as_deref(), Some("UP1"));
        assert_eq!(
            (delivered.seconds, delivered.size),
            (Some(0.25), Some(1234))
        );
        assert_eq!(events[1].seconds, None, "the transaction is counted once");
        assert_eq!(
            events[2].reply.as_deref(),
            Some("550 5.1.1 no such user; 553 5.1.3 bad address")
        );
        assert!(events.iter().all(|e| {
            e.id.as_deref() == Some("0123456789ABCDEF") && e.upstream.as_deref() == Some("exchange")
        }));

        let exchange = facts().transaction(Transaction {
            delivered: vec![rcpt(
                "a@example.com",
                "250 2.6.0 <m1@host.example> [InternalId=77, Hostname=EX01] Queued mail for delivery",
            )],
            ..Transaction::default()
        });
        assert_eq!(exchange[0].upstream_id.as_deref(), Some("77"));
        assert_eq!(exchange[0].message_id.as_deref(), Some("<m1@host.example>"));

        let only_deferred = facts().transaction(Transaction {
            deferred: vec![rcpt("c@example.com", "DATA: 452 4.3.1 full")],
            ..Transaction::default()
        });
        assert_eq!(only_deferred.len(), 1);
        assert_eq!(only_deferred[0].seconds, Some(0.25));
    }
}
