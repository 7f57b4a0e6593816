//! What can go wrong talking to an upstream, by kind.
//!
//! A [`ClientError`] concerns a connection or the upstream as a whole: every recipient of the
//! transaction stays pending. What the caller does depends on the kind, never on the text:
//!
//! - [`ClientError::Stale`]: a pooled connection the upstream closed while it was idle (found
//!   at RSET). Says nothing about the upstream's health: the delivery retries on a new
//!   connection ([`super::upstream`]).
//! - [`ClientError::Tls`] from the handshake ([`ClientError::is_tls_handshake`]): an
//!   opportunistic upstream is retried in plaintext.
//! - [`ClientError::Local`], [`ClientError::Spool`]: the spool file could not be read; not the
//!   upstream's fault, so it does not count against the circuit breaker
//!   ([`ClientError::is_upstream_fault`]).
//! - every other kind opens the circuit breaker and the delivery tries the next upstream.
//!
//! Replies that concern one message (a 5xx to RCPT, a 4xx to DATA) are not errors but
//! per-recipient outcomes ([`super::client::RcptOutcome`]), carrying the upstream's reply.
//!
//! `Display` is the text of the log lines and of the queue's `last_error`: `STAGE: what`
//! (`RSET: connection closed by the upstream`, `TLS handshake: timed out`).
//!
//! A new kind of failure goes here as a variant, with its effect on the breaker decided in
//! [`ClientError::is_upstream_fault`].

use std::fmt;
use std::time::Duration;

use crate::smtp::upstream_reply::{GarbledReply, UpstreamReply};

/// The step of the conversation with an upstream (RFC 5321 §4.1, RFC 3207, RFC 4954).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum UpstreamStage {
    /// The TCP connection.
    Connect,
    /// The `220` greeting (RFC 5321 §4.3.1).
    Greeting,
    Ehlo,
    /// HELO after a refused EHLO (RFC 5321 §4.1.4).
    Helo,
    /// The STARTTLS command (RFC 3207); the handshake after it is [`ClientError::Tls`].
    StartTls,
    Auth,
    Mail,
    Rcpt,
    /// The DATA command and the message content.
    Data,
    /// The final dot and its reply (RFC 5321 §4.1.1.4).
    Dot,
    Rset,
    Quit,
}

impl UpstreamStage {
    /// The stage as the log names it.
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamStage::Connect => "connect",
            UpstreamStage::Greeting => "greeting",
            UpstreamStage::Ehlo => "EHLO",
            UpstreamStage::Helo => "HELO",
            UpstreamStage::StartTls => "STARTTLS",
            UpstreamStage::Auth => "AUTH",
            UpstreamStage::Mail => "MAIL",
            UpstreamStage::Rcpt => "RCPT",
            UpstreamStage::Data => "DATA",
            UpstreamStage::Dot => "end of data",
            UpstreamStage::Rset => "RSET",
            UpstreamStage::Quit => "QUIT",
        }
    }
}

impl fmt::Display for UpstreamStage {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// What the client was waiting for when a time limit ran out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wait {
    /// The TCP connection (`connect_timeout`).
    Connect,
    /// Room to write (`timeout`).
    Write,
    /// A reply (`timeout`, twice that after the final dot).
    Reply,
}

/// Which way an I/O error happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    Read,
    Write,
}

impl fmt::Display for Direction {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Direction::Read => "read",
            Direction::Write => "write",
        })
    }
}

/// What went wrong with TLS towards an upstream (RFC 3207).
#[derive(Debug, thiserror::Error)]
pub enum TlsFailure {
    /// The handshake failed for another reason than the certificate.
    #[error("TLS handshake: {0}")]
    Handshake(#[source] std::io::Error),
    /// The certificate did not verify (`tls = "required"` only).
    #[error("TLS handshake: {0}")]
    Certificate(#[source] std::io::Error),
    /// The handshake did not finish within `timeout`.
    #[error("TLS handshake: timed out")]
    TimedOut,
    /// Bytes after the `220` to STARTTLS, before the handshake: an injection attempt, never
    /// read as replies of the TLS session (RFC 3207 §6).
    #[error("STARTTLS: the upstream sent data after its 220 before the TLS handshake")]
    TalkedEarly,
    /// `tls = "required"` and the upstream does not announce STARTTLS.
    #[error("STARTTLS: the upstream does not offer STARTTLS and tls = \"required\"")]
    NotOffered,
}

impl TlsFailure {
    /// The handshake failure of `error`: [`TlsFailure::Certificate`] when rustls says the
    /// certificate is at fault.
    pub fn from_handshake(error: std::io::Error) -> TlsFailure {
        let certificate = error
            .get_ref()
            .and_then(|e| e.downcast_ref::<tokio_rustls::rustls::Error>())
            .is_some_and(|e| {
                matches!(
                    e,
                    tokio_rustls::rustls::Error::InvalidCertificate(_)
                        | tokio_rustls::rustls::Error::NoCertificatesPresented
                )
            });
        match certificate {
            true => TlsFailure::Certificate(error),
            false => TlsFailure::Handshake(error),
        }
    }
}

/// A step the upstream cannot do as configured: nothing was sent that depends on it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
pub enum Unsupported {
    /// `auth_user` is set and the connection is not encrypted.
    #[error("AUTH: no TLS to the upstream: portcullis does not send the password in plaintext")]
    AuthWithoutTls,
    /// `auth_user` is set and the upstream offers no mechanism portcullis speaks.
    #[error("AUTH: the upstream offers neither AUTH PLAIN nor AUTH LOGIN")]
    AuthMechanism,
}

/// What went wrong with a connection or with the upstream as a whole.
#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    /// The TCP connection was refused or the upstream is unreachable.
    #[error("connect: {0}")]
    Connect(#[source] std::io::Error),
    /// A time limit ran out at `stage`, waiting for `wait`; `after` is the limit.
    #[error("{stage}: {}", timeout_text(*.wait, *.after))]
    Timeout {
        stage: UpstreamStage,
        wait: Wait,
        after: Duration,
    },
    /// Reading or writing failed at `stage` (a reset, a broken pipe).
    #[error("{stage}: {direction}: {source}")]
    Io {
        stage: UpstreamStage,
        direction: Direction,
        source: std::io::Error,
    },
    /// The upstream closed the connection at `stage`.
    #[error("{stage}: connection closed by the upstream")]
    Closed { stage: UpstreamStage },
    /// STARTTLS or the handshake after it failed.
    #[error(transparent)]
    Tls(#[from] TlsFailure),
    /// The upstream refused a step that concerns the whole connection (greeting, EHLO,
    /// STARTTLS with `tls = "required"`, AUTH, RSET) with `reply`.
    #[error("{stage}: {reply}")]
    Refused {
        stage: UpstreamStage,
        reply: UpstreamReply,
    },
    /// `421`, or `452 4.3.1`, at `stage`: the upstream as a whole is too busy
    /// ([`UpstreamReply::is_back_pressure`]).
    #[error("{stage}: {reply}")]
    BackPressure {
        stage: UpstreamStage,
        reply: UpstreamReply,
    },
    /// The upstream's bytes at `stage` are not a valid reply.
    #[error("{stage}: {kind}")]
    Garbled {
        stage: UpstreamStage,
        kind: GarbledReply,
    },
    /// The upstream cannot do what its configuration asks.
    #[error(transparent)]
    Unsupported(#[from] Unsupported),
    /// A pooled connection that the upstream closed while it was idle: what failed (at RSET)
    /// on it. Retried once on a new connection.
    #[error(transparent)]
    Stale(Box<ClientError>),
    /// The message could not be read from the spool at `stage`.
    #[error("{stage}: reading the spool file: {source}")]
    Local {
        stage: UpstreamStage,
        source: std::io::Error,
    },
    /// The message could not be opened in the spool for this transaction.
    #[error("DATA: reading the spool file: {0}")]
    Spool(#[source] crate::queue::SpoolError),
    /// The pool is closed: the relay is shutting down.
    #[error("connect: shutting down")]
    ShuttingDown,
}

fn timeout_text(wait: Wait, after: Duration) -> String {
    match wait {
        Wait::Connect => format!("timed out after {after:?}"),
        Wait::Write => "write timed out".into(),
        Wait::Reply => format!("no reply within {after:?}"),
    }
}

impl ClientError {
    /// The stage it happened at.
    pub fn stage(&self) -> UpstreamStage {
        match self {
            ClientError::Connect(_) | ClientError::ShuttingDown => UpstreamStage::Connect,
            ClientError::Timeout { stage, .. }
            | ClientError::Io { stage, .. }
            | ClientError::Closed { stage }
            | ClientError::Refused { stage, .. }
            | ClientError::BackPressure { stage, .. }
            | ClientError::Garbled { stage, .. }
            | ClientError::Local { stage, .. } => *stage,
            ClientError::Tls(_) => UpstreamStage::StartTls,
            ClientError::Spool(_) => UpstreamStage::Data,
            ClientError::Unsupported(_) => UpstreamStage::Auth,
            ClientError::Stale(inner) => inner.stage(),
        }
    }

    /// The TLS handshake failed or timed out: an opportunistic upstream may be retried in
    /// plaintext (RFC 7435 §3). Not for [`TlsFailure::TalkedEarly`] (an attack, not a broken
    /// TLS stack) nor [`TlsFailure::NotOffered`].
    pub fn is_tls_handshake(&self) -> bool {
        matches!(
            self,
            ClientError::Tls(
                TlsFailure::Handshake(_) | TlsFailure::Certificate(_) | TlsFailure::TimedOut
            )
        )
    }

    /// Does it count against the upstream's circuit breaker? False for a stale pooled
    /// connection (the upstream closed it while idle, which is its right) and for a local
    /// error (the spool file), which say nothing about the upstream's health.
    pub fn is_upstream_fault(&self) -> bool {
        !matches!(
            self,
            ClientError::Stale(_)
                | ClientError::Local { .. }
                | ClientError::Spool(_)
                | ClientError::ShuttingDown
        )
    }

    /// The upstream's reply, when it answered with one.
    pub fn reply(&self) -> Option<&UpstreamReply> {
        match self {
            ClientError::Refused { reply, .. } | ClientError::BackPressure { reply, .. } => {
                Some(reply)
            }
            ClientError::Stale(inner) => inner.reply(),
            _ => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn reply(code: u16, text: &str) -> UpstreamReply {
        UpstreamReply {
            code,
            lines: vec![text.into()],
        }
    }

    fn timeout(stage: UpstreamStage, wait: Wait, secs: u64) -> ClientError {
        ClientError::Timeout {
            stage,
            wait,
            after: Duration::from_secs(secs),
        }
    }

    /// The log and `last_error` read as before the errors had kinds.
    #[test]
    fn display_is_the_stage_then_what_happened() {
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        let cases: Vec<(ClientError, String)> = vec![
            (
                ClientError::Connect(refused),
                "connect: connection refused".into(),
            ),
            (
                timeout(UpstreamStage::Connect, Wait::Connect, 5),
                "connect: timed out after 5s".into(),
            ),
            (
                timeout(UpstreamStage::Ehlo, Wait::Reply, 2),
                "EHLO: no reply within 2s".into(),
            ),
            (
                timeout(UpstreamStage::Data, Wait::Write, 2),
                "DATA: write timed out".into(),
            ),
            (
                ClientError::Stale(Box::new(ClientError::Closed {
                    stage: UpstreamStage::Rset,
                })),
                "RSET: connection closed by the upstream".into(),
            ),
            (
                TlsFailure::TimedOut.into(),
                "TLS handshake: timed out".into(),
            ),
            (
                ClientError::BackPressure {
                    stage: UpstreamStage::Rcpt,
                    reply: reply(452, "4.3.1 Insufficient system resources"),
                },
                "RCPT: 452 4.3.1 Insufficient system resources".into(),
            ),
            (
                ClientError::Garbled {
                    stage: UpstreamStage::Dot,
                    kind: GarbledReply::LineTooLong,
                },
                "end of data: reply line too long".into(),
            ),
            (
                Unsupported::AuthMechanism.into(),
                "AUTH: the upstream offers neither AUTH PLAIN nor AUTH LOGIN".into(),
            ),
        ];
        for (error, text) in cases {
            assert_eq!(error.to_string(), text);
        }
    }

    #[test]
    fn only_the_upstreams_own_failures_count_against_its_breaker() {
        let closed = || ClientError::Closed {
            stage: UpstreamStage::Rset,
        };
        assert!(closed().is_upstream_fault());
        assert!(!ClientError::Stale(Box::new(closed())).is_upstream_fault());
        let local = ClientError::Local {
            stage: UpstreamStage::Data,
            source: std::io::Error::other("gone"),
        };
        assert!(!local.is_upstream_fault());
        assert!(ClientError::from(TlsFailure::TimedOut).is_tls_handshake());
        assert!(!ClientError::from(TlsFailure::TalkedEarly).is_tls_handshake());
        assert!(!ClientError::from(TlsFailure::NotOffered).is_tls_handshake());
    }
}
