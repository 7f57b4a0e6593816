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
//! - [`envelope`]: domain types: [`envelope::QueueId`], [`envelope::Address`],
//!   [`envelope::Envelope`].
//! - [`smtp`]: the sans-IO protocol engine: bytes in, events and replies out. No tokio, no
//!   clock, no sockets. Also the one streaming header-field reader every header check uses
//!   (hop count, header firewall, the `From:` fields for the ownership check) and the
//!   `Received:` header, both pure.
//! - [`policy`]: pure decisions compiled from `Config`, named after SMTP stages.
//! - [`inbound`]: listeners, the per-connection driver, TLS, connection accounting with stress
//!   mode, and the bounded pool of threads that verify passwords.
//! - [`queue`]: the durable spool, recovery, the operator control files behind the `queue`
//!   commands (retry, delete, purge; hold and release), the reuse of finished message files,
//!   the free-space reserve for messages in flight, the bounces (RFC 3464: built and queued),
//!   and the queue manager: scheduling decisions as pure functions (`queue::schedule`: plan
//!   an attempt, record its results, next attempt, expiry, bounce or not, hold) carried out by
//!   one task (`queue::manager`, one attempt's bookkeeping in `queue::attempt`). A new queue
//!   state goes into `DeliveryState` (`queue/state.rs`) and is decided in `schedule::plan`.
//! - [`outbound`]: the upstream SMTP client, routing with failover and circuit breakers,
//!   connection pools, the sending of one attempt (`outbound::deliver`, the queue manager's
//!   `Courier`: it sends and reports per-recipient results, it writes nothing), and the
//!   capabilities each upstream announced (shared with the inbound checks at RCPT and DATA).
//! - [`stream`]: a connection that is plain TCP or TLS, for both directions.
//! - [`text`]: Unicode hygiene for network text: characters that display as nothing, and
//!   look-alikes of `@` and `.` (one table for the queue commands, the log and the checks).
//! - [`app`]: wires the above together and owns shutdown and reload.
//!
//! # One message
//!
//! listener accepts → policy connect check → greeting → session events (EHLO, STARTTLS, AUTH,
//! MAIL, RCPT), each checked by policy → DATA streamed into a spool file under the size cap →
//! end-of-data checks → `Received:` header → commit (fsync, rename, directory fsync shared
//! with concurrent commits) → `250 2.0.0 Ok: queued as ID` → the message, still in memory when
//! small, to the queue manager → an attempt: plan (`queue::schedule`), send (`outbound`),
//! record (bounce, then state or removal) → the file leaves the queue (kept for reuse).

pub mod app;
pub mod config;
pub mod envelope;
pub mod inbound;
pub mod outbound;
pub mod policy;
pub mod queue;
pub mod smtp;
pub mod stream;
pub mod text;
