//! Message assembly: one message from DATA to its commit, as its own type.
//!
//! [`Assembly`] builds the [`Envelope`] from the session, writes the `Received:` header
//! (RFC 5321 §4.4) first into a new spool file, passes every message octet through the one
//! header reader ([`HeaderFilter`]: hop count, header firewall, the `From:` check), notes
//! 8-bit octets (RFC 6152), keeps the free-space reservation ahead of what is written
//! ([`crate::queue::reserve`]), and at the final dot records the MAIL parameters the message
//! turned out to need and commits the file off the reactor.
//!
//! It decides nothing: what the end-of-data checks need it exposes as plain values
//! ([`Assembly::header_too_large`], [`Assembly::received_count`], [`Assembly::write_failed`],
//! [`Assembly::take_from_check`], [`Assembly::header_utf8`], [`Assembly::eight_bit`],
//! [`Assembly::size`]); the driver asks the policy and refuses or commits. Dropping an
//! assembly without committing removes its spool file.
//!
//! Every spool error keeps its type up to the reply, and its class decides the reply
//! ([`SpoolErrorClass`]): a full file system or quota (`ENOSPC`, `EDQUOT`) is `452 4.3.1`
//! (rule `min_free_space`, RFC 3463 "mail system full"), other trouble a retry may cure
//! `451 4.3.0`, an error no retry cures `554 5.3.0`.

use std::net::SocketAddr;
use std::sync::Arc;

use tracing::{debug, info, warn};

use crate::envelope::{Address, Body, Envelope, MailParams, QueueId, Recipient, TlsInfo, unix_now};
use crate::policy::Refusal;
use crate::policy::senders::FromCheck;
use crate::policy::stage::WriteFailure;
use crate::queue::reserve::Reservation;
use crate::queue::{Committed, Spool, SpoolError, SpoolWriter, WrittenMessage};
use crate::smtp::headers::{HeaderFilter, StripRules};
use crate::smtp::received::{self, Trace};
use crate::smtp::{Transaction, reply};

/// Where a message comes from: what the session knows at DATA.
#[derive(Debug, Clone, Copy)]
pub struct Arrival<'a> {
    /// The listener's name (`[[listeners]] name`).
    pub listener: &'a str,
    /// The client's address and port.
    pub peer: SocketAddr,
    /// The EHLO/HELO name as given (empty when none was).
    pub helo: &'a str,
    /// EHLO rather than HELO (the `with` protocol of `Received:`, RFC 3848).
    pub extended: bool,
    /// The TLS session, when there is one.
    pub tls: Option<&'a TlsInfo>,
    /// The authenticated login, if any.
    pub auth_user: Option<&'a str>,
    /// The reverse-path, MAIL parameters and forward-paths accepted.
    pub transaction: &'a Transaction,
    /// The relay's own name (`[server] hostname`), the `by` of `Received:`.
    pub hostname: &'a str,
    /// This node's name (`[cluster] node`), named in `Received:` when it differs from
    /// `hostname`.
    pub node: &'a str,
}

/// What an assembly is told of the free space: the transaction's reservation (taken from the
/// driver only once the spool file exists) and `[limits] min_free_space` in bytes (0: no
/// reserve).
#[derive(Debug)]
pub struct Space<'a> {
    /// Held since MAIL; `None` when nothing was reserved.
    pub reservation: &'a mut Option<Reservation>,
    /// `[limits] min_free_space`, bytes.
    pub min_free: u64,
}

/// The failure class of a spool write error while the message is received: a full file
/// system or quota is [`WriteFailure::StorageFull`] (`452 4.3.1`), anything else
/// [`WriteFailure::Io`] (`451 4.3.0`); the end-of-data stage decides the reply.
pub fn write_failure(error: &SpoolError) -> WriteFailure {
    match SpoolErrorClass::of(error) {
        SpoolErrorClass::StorageFull => WriteFailure::StorageFull,
        SpoolErrorClass::Temporary | SpoolErrorClass::Permanent => WriteFailure::Io,
    }
}

/// What kind of trouble a [`SpoolError`] is, which decides the reply.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpoolErrorClass {
    /// No room on the file system (ENOSPC) or in the relay user's quota (EDQUOT).
    StorageFull,
    /// A retry may succeed ([`SpoolError::is_temporary`]): other I/O errors, an id collision.
    Temporary,
    /// A retry fails the same way (an envelope that cannot be encoded).
    Permanent,
}

impl SpoolErrorClass {
    /// The class of `error`.
    pub fn of(error: &SpoolError) -> SpoolErrorClass {
        if let SpoolError::Io { source, .. } = error
            && matches!(
                source.kind(),
                std::io::ErrorKind::StorageFull | std::io::ErrorKind::QuotaExceeded
            )
        {
            SpoolErrorClass::StorageFull
        } else if error.is_temporary() {
            SpoolErrorClass::Temporary
        } else {
            SpoolErrorClass::Permanent
        }
    }

    /// The refusal for an error of this class at a step whose own rule is `rule` (the rule of
    /// a full file system is always `min_free_space`, like the reserve's own refusals).
    pub fn refusal(self, rule: &'static str) -> Refusal {
        match self {
            SpoolErrorClass::StorageFull => {
                Refusal::new(reply::INSUFFICIENT_STORAGE, "min_free_space")
            }
            SpoolErrorClass::Temporary => Refusal::new(reply::LOCAL_ERROR, rule),
            SpoolErrorClass::Permanent => Refusal::new(reply::LOCAL_ERROR_PERMANENT, rule),
        }
    }
}

/// Why a message could not be spooled at the start or at the end of its data.
#[derive(Debug, thiserror::Error)]
pub enum AssemblyError {
    /// The spool file could not be created or its header written (rule `spool_create`).
    #[error("cannot create spool file: {0}")]
    Create(#[source] SpoolError),
    /// The MAIL parameters the message needs could not be recorded (rule `spool_write`).
    #[error("cannot record the message's MAIL parameters in the spool file: {0}")]
    Rewrite(#[source] SpoolError),
    /// The fields added above the message (`Authentication-Results:`, `DKIM-Signature:`)
    /// could not be written (rule `spool_write`).
    #[error("cannot add header fields to the spool file: {0}")]
    Prepend(#[source] SpoolError),
    /// The spool has no room for the copy that adding header fields makes (rule
    /// `min_free_space`, `452 4.3.1`).
    #[error("no spool space to add header fields: {0}")]
    PrependSpace(crate::queue::reserve::Insufficient),
    /// Flush, fsync, rename or the directory fsync failed (rule `spool_commit`).
    #[error("spool commit failed: {0}")]
    Commit(#[source] SpoolError),
    /// The blocking task running the commit panicked or was cancelled (rule `spool_commit`,
    /// `451 4.3.0`): whether the file reached `queue/` is unknown, so the client retries.
    #[error("spool commit task failed: {0}")]
    CommitTask(#[source] tokio::task::JoinError),
}

impl AssemblyError {
    /// The reply and rule the message is refused with, decided by the error's class.
    pub fn refusal(&self) -> Refusal {
        let (error, rule) = match self {
            AssemblyError::Create(e) => (e, "spool_create"),
            AssemblyError::Rewrite(e) => (e, "spool_write"),
            AssemblyError::Commit(e) => (e, "spool_commit"),
            AssemblyError::Prepend(e) => (e, "spool_write"),
            AssemblyError::PrependSpace(_) => {
                return SpoolErrorClass::StorageFull.refusal("min_free_space");
            }
            AssemblyError::CommitTask(_) => {
                return SpoolErrorClass::Temporary.refusal("spool_commit");
            }
        };
        SpoolErrorClass::of(error).refusal(rule)
    }
}

/// One message being received: its spool file, header reader and what was seen so far.
#[derive(Debug)]
pub struct Assembly {
    writer: SpoolWriter,
    /// The one header reader: hop count, header firewall and the `From:` check.
    filter: HeaderFilter<Option<FromCheck>>,
    /// The envelope written at the head of the spool file (rewritten at the final dot when
    /// the message needs other MAIL parameters than declared).
    envelope: Envelope,
    /// An octet over 127 was received (RFC 6152): decided while receiving, so nothing reads
    /// the message again.
    eight_bit: bool,
    /// Set when writing failed: the rest of the message is dropped.
    failure: Option<WriteFailure>,
    /// The transaction's free-space reservation, grown as the message outgrows it.
    reservation: Option<Reservation>,
    spool: Spool,
    min_free: u64,
    scratch: Vec<u8>,
}

impl Assembly {
    /// Start a message: build its envelope under a new queue id, create its spool file and
    /// write the `Received:` header into it. `rules` are the header fields to remove for this
    /// client, `from_check` the `From:` ownership check (RFC 5322 §3.6.2) when it applies.
    /// On success the reservation is taken from `space`; on error it is left there.
    ///
    /// # Errors
    /// [`AssemblyError::Create`] when the file cannot be created or written.
    pub fn start(
        spool: &Spool,
        arrival: &Arrival<'_>,
        rules: Arc<StripRules>,
        from_check: Option<FromCheck>,
        space: Space<'_>,
    ) -> Result<Assembly, AssemblyError> {
        let envelope = envelope(arrival, QueueId::generate(), unix_now());
        let header = received_header(arrival, &envelope);
        let mut writer = spool.create(&envelope).map_err(AssemblyError::Create)?;
        writer
            .write(header.as_bytes())
            .map_err(AssemblyError::Create)?;
        Ok(Assembly {
            writer,
            filter: HeaderFilter::with_inspector(rules, from_check),
            envelope,
            eight_bit: false,
            failure: None,
            reservation: space.reservation.take(),
            spool: spool.clone(),
            min_free: space.min_free,
            scratch: Vec::new(),
        })
    }

    /// The queue id the message will have.
    pub fn id(&self) -> &QueueId {
        &self.envelope.id
    }

    /// The envelope as it will be spooled (sender, recipients, client), for the events of
    /// a message refused after its spool file was created.
    pub fn envelope(&self) -> &Envelope {
        &self.envelope
    }

    /// The message's `Message-ID:` value (see [`HeaderFilter::message_id`]), once the header
    /// section has been read (after [`Assembly::finish`] at the latest).
    pub fn message_id(&self) -> Option<&str> {
        self.filter.message_id()
    }

    /// Take the next message octets (un-dot-stuffed, in order). After a write failure they
    /// are dropped.
    pub fn push(&mut self, chunk: &[u8]) {
        if self.failure.is_some() {
            return;
        }
        self.scratch.clear();
        let result = if self.filter.push(chunk, &mut self.scratch) {
            self.eight_bit = self.eight_bit || !self.scratch.is_ascii();
            self.writer.write(&self.scratch)
        } else {
            self.eight_bit = self.eight_bit || !chunk.is_ascii();
            self.writer.write(chunk)
        };
        if let Err(e) = result {
            warn!(queue_id = %self.envelope.id, error = %e,
                "spool write failed; the message will be refused");
            self.failure = Some(write_failure(&e));
        }
        if !self.hold_space() {
            self.failure = Some(WriteFailure::StorageFull);
        }
    }

    /// The final dot: write what the header reader still holds (a header section without
    /// a body, or one cut short).
    pub fn finish(&mut self) {
        self.scratch.clear();
        self.filter.finish(&mut self.scratch);
        self.eight_bit = self.eight_bit || !self.scratch.is_ascii();
        if self.failure.is_none()
            && let Err(e) = self
                .writer
                .write(&self.scratch)
                .and_then(|()| self.writer.flush())
        {
            warn!(error = %e, "spool write failed");
            self.failure = Some(write_failure(&e));
        }
    }

    /// The message as written (our `Received:` first), after [`Assembly::finish`], for the
    /// checks that read it whole: from memory when small, else the spool file mapped.
    ///
    /// # Errors
    /// [`SpoolError`] when the file cannot be mapped.
    pub fn message(&self) -> Result<WrittenMessage, SpoolError> {
        self.writer.message()
    }

    /// Keep the space reservation ahead of what is written (a message larger than its
    /// declared SIZE grows it; see [`crate::queue::reserve`]). False when it cannot grow.
    fn hold_space(&mut self) -> bool {
        let Some(reservation) = self.reservation.as_mut() else {
            return true;
        };
        let written = self.writer.written();
        match self
            .spool
            .hold_reservation(reservation, written, self.min_free)
        {
            Ok(Ok(())) => true,
            Ok(Err(short)) => {
                warn!(
                    queue_id = %self.envelope.id,
                    free = short.free,
                    reserved = short.reserved,
                    bytes = short.bytes,
                    min_free = self.min_free,
                    rule = "min_free_space",
                    "message outgrew its SIZE and the spool has no room for more; it will be refused"
                );
                false
            }
            Err(e) => {
                warn!(queue_id = %self.envelope.id, error = %e, "cannot read spool free space");
                false
            }
        }
    }

    /// The name (cut to 64 characters) of a header field longer than
    /// [`crate::smtp::headers::MAX_WHOLE_FIELD`]: refuse with `552 5.3.4`.
    pub fn header_too_large(&self) -> Option<&str> {
        self.filter.too_large()
    }

    /// The `Received:` fields in the message's header section, not counting the relay's own
    /// (the hop count of RFC 5321 §6.3).
    pub fn received_count(&self) -> usize {
        self.filter.received_count() as usize
    }

    /// Why writing failed, if it did.
    pub fn write_failed(&self) -> Option<WriteFailure> {
        self.failure
    }

    /// The `From:` ownership check with what it saw, once (after [`Assembly::finish`]).
    pub fn take_from_check(&mut self) -> Option<FromCheck> {
        self.filter.inspector_mut().take()
    }

    /// The header section as written has a non-ASCII octet (RFC 6532).
    pub fn header_utf8(&self) -> bool {
        self.filter.non_ascii()
    }

    /// The message has an octet over 127 (RFC 6152).
    pub fn eight_bit(&self) -> bool {
        self.eight_bit
    }

    /// Message octets written, in bytes (the relay's `Received:` header included).
    pub fn size(&self) -> u64 {
        self.writer.written()
    }

    /// Make the message durable and visible: record the MAIL parameters it needs
    /// ([`needed_params`]), then flush, fsync and rename off the reactor
    /// ([`SpoolWriter::commit_and_keep`]). Only after `Ok` may the client be told `250`.
    ///
    /// # Errors
    /// [`AssemblyError::Rewrite`], [`AssemblyError::Commit`] or [`AssemblyError::CommitTask`];
    /// the spool file is then gone (unless a crash comes first, see [`SpoolWriter::commit`]),
    /// never half-written in `queue/`.
    pub async fn commit(self) -> Result<Committed, AssemblyError> {
        self.commit_with(String::new()).await
    }

    /// [`Assembly::commit`], with `fields` (whole header fields, CRLF-terminated: our
    /// `Authentication-Results:`, the quarantine field, `DKIM-Signature:`s) put above the
    /// message first ([`SpoolWriter::prepend`]), off the reactor. Free space for the copy
    /// that makes is reserved first (`452 4.3.1` when there is none).
    ///
    /// # Errors
    /// As [`Assembly::commit`], and [`AssemblyError::Prepend`] /
    /// [`AssemblyError::PrependSpace`].
    pub async fn commit_with(mut self, fields: String) -> Result<Committed, AssemblyError> {
        if !fields.is_empty() {
            self.hold_copy_space(fields.len() as u64)?;
        }
        let declared = &self.envelope.mail_params;
        let needed = needed_params(&self.envelope, self.header_utf8(), self.eight_bit);
        if needed != *declared {
            debug!(params = ?needed, "MAIL parameters as the message needs them");
            self.writer
                .rewrite_mail_params(&self.envelope, needed)
                .map_err(AssemblyError::Rewrite)?;
        }
        if self.filter.stripped_count() > 0 {
            info!(headers = ?self.filter.stripped(),
                count = self.filter.stripped_count(), "removed untrusted headers");
        }
        let auth_user = self.envelope.auth_user.clone();
        let mut writer = self.writer;
        // The copy, fsync, rename and directory fsync block: run them off the reactor.
        let (id, loaded) = tokio::task::spawn_blocking(move || {
            writer
                .prepend(fields.as_bytes())
                .map_err(AssemblyError::Prepend)?;
            writer.commit_and_keep().map_err(AssemblyError::Commit)
        })
        .await
        .map_err(AssemblyError::CommitTask)??;
        Ok(Committed {
            id,
            loaded,
            auth_user,
        })
    }

    /// Hold space for two copies of the message plus `extra` octets while
    /// [`SpoolWriter::prepend`] copies it (the old file goes once the new one is written).
    fn hold_copy_space(&mut self, extra: u64) -> Result<(), AssemblyError> {
        let Some(reservation) = self.reservation.as_mut() else {
            return Ok(());
        };
        let peak = self
            .writer
            .written()
            .saturating_mul(2)
            .saturating_add(extra);
        match self
            .spool
            .hold_reservation(reservation, peak, self.min_free)
        {
            Ok(Ok(())) => Ok(()),
            Ok(Err(short)) => Err(AssemblyError::PrependSpace(short)),
            Err(e) => Err(AssemblyError::Prepend(SpoolError::Io {
                op: "statvfs",
                path: self.spool.root().to_path_buf(),
                source: e,
            })),
        }
    }
}

/// The envelope of a message arriving as `arrival`, under `id`, received at `now` (seconds
/// since the Unix epoch).
fn envelope(arrival: &Arrival<'_>, id: QueueId, now: u64) -> Envelope {
    let tx = arrival.transaction;
    Envelope {
        id,
        received_at: now,
        listener: arrival.listener.to_string(),
        client_ip: crate::policy::access::normalize(arrival.peer.ip()),
        client_port: arrival.peer.port(),
        helo: arrival.helo.to_string(),
        tls: arrival.tls.cloned(),
        auth_user: arrival.auth_user.map(str::to_string),
        mail_from: tx.from.clone(),
        mail_params: tx.params.clone(),
        recipients: tx.recipients.iter().cloned().map(Recipient::new).collect(),
    }
}

/// The relay's `Received:` header for `envelope` (RFC 5321 §4.4).
fn received_header(arrival: &Arrival<'_>, envelope: &Envelope) -> String {
    let recipients = &arrival.transaction.recipients;
    let single = (recipients.len() == 1).then(|| recipients[0].to_string());
    received::header(&Trace {
        helo: &envelope.helo,
        client_ip: envelope.client_ip,
        hostname: arrival.hostname,
        node: arrival.node,
        extended: arrival.extended,
        tls: arrival.tls,
        authenticated: envelope.auth_user.is_some(),
        queue_id: envelope.id.as_str(),
        single_recipient: single.as_deref(),
        now: envelope.received_at,
    })
}

/// The MAIL parameters a message needs, recorded once in its envelope so delivery declares
/// exactly these upstream: `BODY=8BITMIME` for 8-bit octets MAIL did not declare (RFC 6152),
/// and no `SMTPUTF8` when the envelope and the header section are ASCII whatever was declared
/// (RFC 6531 §3.4: any upstream can then take it).
pub fn needed_params(envelope: &Envelope, header_utf8: bool, eight_bit: bool) -> MailParams {
    let declared = &envelope.mail_params;
    let mut needed = declared.clone();
    if eight_bit {
        needed.body = Some(Body::EightBitMime);
    }
    let utf8_address = envelope.mail_from.address().is_some_and(Address::is_utf8)
        || envelope.recipients.iter().any(|r| r.address.is_utf8());
    needed.smtputf8 = declared.smtputf8 && (header_utf8 || utf8_address);
    needed
}

#[cfg(test)]
mod tests;
