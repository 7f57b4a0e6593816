//! portcullis: a hardened SMTP edge relay.
//!
//! It accepts mail on port 25 (from the internet) and 587/465 (submission from users), enforces
//! TLS, authentication, access lists and limits, writes every accepted message durably to its
//! own spool before answering `250`, and forwards it to the mail server behind it.
//!
//! # Layout
//!
//! - [`config`]: the policy file. `raw` mirrors the TOML; `Config` is the validated, typed
//!   policy compiled from it, with every error reported at once.
//! - [`dns`]: the relay's resolver (`[dns]`, bounded TTL caches) and the glue to mail-auth:
//!   SPF, iprev, a message's DKIM signatures, ARC chain and DMARC policy (each answering what
//!   it found, never a reply), DNSBL lookups, our `Authentication-Results:` field, DKIM signing
//!   and the `doctor` pre-flight. What a result means for the session is decided in `policy`
//!   (`policy::mailauth`), and carried out by `inbound::effects`.
//! - [`envelope`]: domain types: [`envelope::QueueId`], [`envelope::Address`],
//!   [`envelope::Envelope`].
//! - [`smtp`]: the sans-IO protocol engine: bytes in, events and replies out. No tokio, no
//!   clock, no sockets. Also the one streaming header-field reader every header check uses
//!   (hop count, header firewall, the `From:` fields for the ownership check) and the
//!   `Received:` header, both pure.
//! - [`policy`]: pure decisions compiled from `Config`. Every SMTP stage (connect, HELO, AUTH,
//!   MAIL, RCPT, end of data) is evaluated by `policy::stage`: its checks are listed once, in
//!   order, in `Stage::checks`, and each step answers one `Verdict`: accept, refuse (reply and
//!   rule), or an `Effect` for the driver (a rate budget, the AUTH lockout gate, a password
//!   verification, spool space, a lookup started at one stage and awaited at a later one).
//!   Rate budgets and AUTH failure records live in `policy::store::Store` (in this process;
//!   shared through [`cluster`] when configured). A new check is a `Check` in its stage's list; one that needs I/O is also a new
//!   `Effect`, carried out once in `inbound::effects`.
//! - [`inbound`]: listeners (one `session` tracing span per connection; the PROXY protocol
//!   header of a listener's `trusted_proxies`, `proxy`), the session driver
//!   (`connection`: generic over its byte stream, one method per stage, only moving bytes),
//!   the effect runner (`effects`), TLS, connection accounting with stress mode (`pressure`),
//!   message assembly ([`inbound::assembly::Assembly`]: envelope, `Received:`, header filter,
//!   spool writer, commit; a new per-message header or check of the message's content lands
//!   there), the bounded pool of threads that verify passwords, and what the receiving side
//!   records (`record`: every refusal logged and counted by one function; connect, queued,
//!   sessions, AUTH outcomes, DNS errors), and `explain` (`portcullis policy explain`: a
//!   session played through the same engine and stage checks without a socket, its effects
//!   answered from the running relay's state). [`inbound::start`] binds the listeners. It hands
//!   each committed message on as a [`queue::Committed`] and never names `outbound`.
//! - [`queue`]: the durable spool, recovery, the operator control files behind the `queue`
//!   commands (retry, delete, purge; hold and release, with the filters that select messages:
//!   `queue::select`; quarantine and restore, `queue::quarantine`: `SPOOL/quarantine/`, outside
//!   the queue), the reuse of finished message files,
//!   `queue adopt` (another node's spool imported once, then marked: `queue::adopt`),
//!   the free-space reserve for messages in flight, the bounces (RFC 3464: built and queued),
//!   and the queue manager: scheduling decisions as pure functions (`queue::schedule`: plan
//!   an attempt, record its results, next attempt, expiry, bounce or not, hold) carried out by
//!   one task (`queue::manager`, one attempt's bookkeeping in `queue::attempt`). A new queue
//!   state goes into `DeliveryState` (`queue/state.rs`), is decided in `schedule::plan` and
//!   followed up in `schedule::after_attempt` (see the `queue` module's "Hold"). The message
//!   journal behind `portcullis trace` is `queue::journal` (event segments under the spool,
//!   each sealed with a Bloom-filter index, written by one thread that never blocks a sender).
//! - [`outbound`]: the upstream SMTP client, failover and circuit breakers, connection pools,
//!   and the sending of one attempt (`outbound::deliver`, the queue manager's `Courier`: it
//!   sends and reports per-recipient results, it writes nothing). What can go wrong with an
//!   upstream is a kind of `outbound::error::ClientError` (a new kind goes there, with its
//!   effect on the breaker in `ClientError::is_upstream_fault`); replies that concern one
//!   message are per-recipient outcomes carrying the upstream's reply unchanged into the DSN.
//!   `outbound::Delivery::reload` applies a reloaded `[[upstreams]]` and `[queue]` to new
//!   attempts.
//! - [`observe`]: what the relay knows about itself at run time, recorded by every layer
//!   through `observe::Telemetry::record` (one [`observe::Event`] per step of a message's
//!   life): the Prometheus metrics, the flow per minute over the last hour, each upstream's
//!   state, the queue census, the alerts and their webhook, whether the listeners are paused;
//!   each event also goes to the journal (through the `observe::EventSink` trait, so this
//!   module never names `queue`). A leaf: recording never blocks and never refuses mail.
//! - [`admin`]: the `[admin]` HTTP listener (`/metrics`, `/healthz`, `/readyz`, the status
//!   page `/`, `/api/status`, `/api/explain-state`, `/api/users`) reading `observe` (and, for
//!   explain-state and users, functions `app` gives it); `portcullis status` (`admin::client`:
//!   the running relay's API, else `admin::offline` from the spool and the journal); the
//!   `SPOOL/paused` marker behind `portcullis listeners pause|resume` (`admin::pause`); and
//!   `portcullis user list|suspend|resume` (`admin::users`, over `queue::suspended`).
//! - [`cluster`]: the store several nodes share (`[cluster] redis`): the link (bounded
//!   operations, down/up with the `cluster_fallback` alert), the Lua scripts of the shared
//!   rate budgets (`cluster::limits`) and AUTH failure records (`cluster::auth`), and their
//!   composition with `policy::store` and `on_error` (`cluster::store`), which
//!   `inbound::effects` asks.
//! - [`routes`]: the routing table and the capabilities each upstream announced, shared by
//!   delivery and the inbound checks at RCPT and DATA (the one module both sides use).
//! - [`stream`]: a connection that is plain TCP or TLS, for both directions.
//! - [`failpoint`]: the named steps (spool commit, state, removal, control files, recovery,
//!   delivery) where the failpoint build of the reliability tests fails an operation or kills
//!   the process; nothing at all in any other build.
//! - [`text`]: Unicode hygiene for network text: characters that display as nothing, and
//!   look-alikes of `@` and `.` (one table for the queue commands, the log and the checks).
//! - [`app`]: wires the above together (the only module that names both `inbound` and
//!   `outbound`; it also opens the journal and hands it to `observe`, and starts `admin`)
//!   and owns shutdown and reload.
//!
//! # One message
//!
//! listener accepts → policy connect check → greeting → session events (EHLO, STARTTLS, AUTH,
//! MAIL, RCPT), each checked by policy → DATA: an assembly writes the `Received:` header, then
//! streams the message through the header filter into a spool file under the size cap →
//! end-of-data checks on what the assembly read → commit (fsync, rename, directory fsync shared
//! with concurrent commits) → `250 2.0.0 Ok: queued as ID` → the message, still in memory when
//! small, to the queue manager → an attempt: plan (`queue::schedule`), send (`outbound`),
//! record (bounce, then state or removal) → the file leaves the queue (kept for reuse). Each
//! step (connect, queued or refused, deferred, delivered or failed, bounced, finished) is an
//! `observe::Event`, counted by `observe` and appended to `queue::journal`, where `portcullis
//! trace` finds it.

pub mod admin;
pub mod app;
pub mod cluster;
pub mod config;
pub mod dns;
pub mod envelope;
pub mod failpoint;
pub mod inbound;
pub mod observe;
pub mod outbound;
pub mod policy;
pub mod queue;
pub mod routes;
pub mod smtp;
pub mod stream;
pub mod text;
