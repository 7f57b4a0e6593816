//! DKIM private keys: PEM files holding PKCS#8 (RSA or Ed25519) or PKCS#1 (RSA, what most
//! OpenDKIM keys are), as `[[dkim.sign]] key` names them.

/// A loaded DKIM signing key.
pub struct SigningKey {}

impl std::fmt::Debug for SigningKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SigningKey").finish_non_exhaustive()
    }
}
