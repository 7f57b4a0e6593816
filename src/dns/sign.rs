//! DKIM signing (RFC 6376 §5, relaxed/relaxed) of trusted outbound mail.

use crate::config::DkimSign;

/// A message could not be signed.
#[derive(Debug, thiserror::Error)]
pub enum SignError {
    /// mail-auth refused (no header section, a key failure).
    #[error("DKIM signing for {domain} (selector {selector}) failed: {reason}")]
    Failed {
        domain: String,
        selector: String,
        reason: String,
    },
}

/// The `DKIM-Signature:` fields (each folded, ending in CRLF), one per entry in `entries`
/// order, over `message` (header section and body, CRLF), to be prepended to it.
///
/// # Errors
/// [`SignError`] when an entry cannot sign.
pub fn sign(message: &[u8], entries: &[&DkimSign]) -> Result<String, SignError> {
    let _ = (message, entries);
    todo!()
}

/// The entries that sign `message`: those whose `domain` is the domain of its one `From:`
/// address (compared as lower-case A-labels), in configuration order; none when `From:` is
/// missing or names several domains.
pub fn signers_for<'a>(message: &[u8], entries: &'a [DkimSign]) -> Vec<&'a DkimSign> {
    let _ = (message, entries);
    todo!()
}
