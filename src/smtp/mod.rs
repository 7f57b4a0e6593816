//! The sans-IO SMTP protocol engine: bytes in, events and replies out.
//!
//! [`Session`] owns the input buffer, the line framing, the session state machine and the
//! output buffer. It never touches a socket, a clock or the disk: the driver
//! (`inbound::connection`) feeds it bytes with [`Session::receive`], calls [`Session::poll`]
//! for the next [`Event`], writes [`Session::output`] to the client, and answers the events
//! that need a decision (policy, spool, password check) with [`Session::accept`],
//! [`Session::reject`], [`Session::queued`]. Everything here is deterministic, which is what
//! makes it table-testable and fuzzable.
//!
//! What this module decides by itself, because it is protocol rather than policy: command
//! syntax, sequence, line framing, ESMTP parameters, PIPELINING group rules, the smuggling
//! rule in DATA, STARTTLS injection, the error budget, size and recipient caps, and the
//! `require_tls` / `auth = "required"` gates.
//!
//! [`upstream_reply`] is the other direction: replies an upstream sends us, parsed and
//! classified (the upstream client and the DSN builder use it).

pub mod data;
pub mod headers;
pub mod line;
pub mod received;
pub mod reply;
pub mod sasl;
mod session;
pub mod upstream_reply;

pub use data::DataFault;
pub use reply::Reply;
pub use sasl::{Credentials, Mechanism};
pub use session::{Event, STRESS_JUNK_LIMIT, Session, SessionConfig, Transaction};
