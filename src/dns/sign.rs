//! DKIM signing (RFC 6376 §5, relaxed/relaxed) of trusted outbound mail.
//!
//! Which entries sign a message is decided by its one `From:` field ([`signers_for`]); each
//! entry adds its own signature ([`sign`]), so a domain with an RSA and an Ed25519 key is
//! verifiable by receivers that know only RSA (RFC 8463 §4). Signatures carry `t=` and no
//! `l=` (a body length limit lets anyone append to the signed body, RFC 6376 §8.2). The keys
//! are borrowed from the policy, never copied per message.

use mail_auth::common::crypto::{Algorithm, DkimKey, SigningKey};
use mail_auth::common::headers::{HeaderWriter, Writable};
use mail_auth::dkim::{Canonicalization, DkimSigner};

use super::verify::FromDomain;
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

/// mail-auth's signer owns its key; this lends it ours for one message.
struct KeyRef<'a>(&'a DkimKey);

impl SigningKey for KeyRef<'_> {
    type Hasher = <DkimKey as SigningKey>::Hasher;

    fn sign(&self, input: impl Writable) -> mail_auth::Result<Vec<u8>> {
        self.0.sign(input)
    }

    fn algorithm(&self) -> Algorithm {
        self.0.algorithm()
    }
}

/// The `DKIM-Signature:` fields (each folded, ending in CRLF), one per entry in `entries`
/// order, over `message` (header section and body, CRLF), to be prepended to it. Each signs
/// the entry's `headers` that the message has, plus every name listed more often than the
/// message has that field (an oversigned name: an added field of that name breaks the
/// signature, RFC 6376 §8.15).
///
/// # Errors
/// [`SignError`] when an entry cannot sign (the message has none of the entry's header
/// fields, or the key fails); no signature is returned then.
pub fn sign(message: &[u8], entries: &[&DkimSign]) -> Result<String, SignError> {
    let mut fields = String::with_capacity(entries.len() * 512);
    for entry in entries {
        let signature = DkimSigner::from_key(KeyRef(entry.key.dkim_key()))
            .domain(entry.domain.as_str())
            .selector(entry.selector.as_str())
            .headers(entry.headers.iter().map(String::as_str))
            .header_canonicalization(Canonicalization::Relaxed)
            .body_canonicalization(Canonicalization::Relaxed)
            .sign(message)
            .map_err(|e| SignError::Failed {
                domain: entry.domain.clone(),
                selector: entry.selector.clone(),
                reason: e.to_string(),
            })?;
        fields.push_str(&signature.to_header());
    }
    Ok(fields)
}

/// The entries that sign `message`: those whose `domain` is its `From:` domain as DMARC
/// judges it (`dns::verify::from_domain`: one `From:` field, one domain, a host name in
/// lower-case A-labels), in configuration order; none when that is missing or several. The
/// verifier and the signer read the one function, so the relay never signs for a domain it
/// would not judge a message as coming from (a trailing dot, a literal); a message with
/// several `From:` fields is signed by nobody, since receivers disagree on which one DMARC
/// judges.
pub fn signers_for<'a>(message: &[u8], entries: &'a [DkimSign]) -> Vec<&'a DkimSign> {
    if entries.is_empty() {
        return Vec::new();
    }
    // The header section alone (mail-auth's own splitter is private; mail-parser's splits
    // the same way, and its offsets give the raw name and value mail-auth would see).
    let Some(parsed) = mail_parser::MessageParser::new().parse_headers(message) else {
        return Vec::new();
    };
    let fields = parsed.root_part().headers().iter().filter_map(|h| {
        let name =
            message.get(h.offset_field as usize..(h.offset_start as usize).checked_sub(1)?)?;
        Some((
            name,
            message.get(h.offset_start as usize..h.offset_end as usize)?,
        ))
    });
    match super::verify::from_domain(fields) {
        FromDomain::One(domain) => entries.iter().filter(|e| e.domain == domain).collect(),
        FromDomain::Missing | FromDomain::Several => Vec::new(),
    }
}

#[cfg(test)]
pub(crate) mod tests;
