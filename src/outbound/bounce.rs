//! Queue a delivery status notification (RFC 3464) for recipients that failed for good.

use super::deliver::FailedRcpt;
use crate::envelope::{Envelope, QueueId, unix_now};
use crate::queue::bounce::{
    DsnInput, FailedRecipient, MAX_RETURNED_HEADERS, bounce_envelope, build_dsn,
};
use crate::queue::{Spool, SpoolError};

/// Build the bounce for `failed` recipients of `original` and commit it to the spool (fsync
/// and all, like any accepted message). Blocking: run it in `spawn_blocking`. The caller has
/// already checked that the sender is not `<>`.
pub fn enqueue(
    spool: &Spool,
    hostname: &str,
    original: &Envelope,
    failed: &[FailedRcpt],
) -> Result<QueueId, SpoolError> {
    let head = spool.read_message_head(&original.id, MAX_RETURNED_HEADERS as u64 + 2)?;
    let failed: Vec<FailedRecipient> = failed
        .iter()
        .map(|f| FailedRecipient {
            address: f.address.clone(),
            status: f.status.clone(),
            diagnostic: f.diagnostic.clone(),
            remote_mta: f.upstream.clone(),
        })
        .collect();
    let now = unix_now();
    let input = DsnInput {
        reporting_host: hostname,
        original,
        failed: &failed,
        original_head: &head,
        now,
    };
    let not_bounceable = || SpoolError::Corrupt {
        path: spool.root().to_path_buf(),
        reason: format!("no bounce can be built for {} (sender <>)", original.id),
    };
    let dsn = build_dsn(&input).ok_or_else(not_bounceable)?;
    let envelope = bounce_envelope(original, &dsn, hostname, now).ok_or_else(not_bounceable)?;
    spool.enqueue(&envelope, &dsn)
}
