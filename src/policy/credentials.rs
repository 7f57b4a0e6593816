//! Hashed secrets: argon2id password hashes in PHC string form.
//!
//! Hashing and verifying are deliberately slow (that is the point of argon2); callers on the
//! async reactor must run them on a blocking thread. This module holds no state and does no I/O.

use argon2::Argon2;
use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{PasswordHash, PasswordHasher, PasswordVerifier, SaltString};

/// A valid argon2id hash (default parameters) of a random password nobody knows. Logins for
/// unknown users are verified against it, so "no such user" and "wrong password" take the same
/// time and give the same reply.
pub const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$3C056/yWongzKuiNtDZD6w$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE";

/// Hash `password` with argon2id (v19, default parameters m=19456 KiB, t=2, p=1) and a random
/// salt, returning the PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`). Used by
/// `portcullis passwd`.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Whether `password` matches the PHC string `hash`. The parameters stored in the hash are
/// used; a malformed hash or an unsupported algorithm never matches.
pub fn verify_password(hash: &str, password: &str) -> bool {
    let Ok(parsed) = PasswordHash::new(hash) else {
        return false;
    };
    Argon2::default()
        .verify_password(password.as_bytes(), &parsed)
        .is_ok()
}

/// Like [`verify_password`], but tells a wrong password (`Ok(false)`) from a check that
/// could not be made (`Err`): a malformed hash, parameters argon2 refuses (`m=1`), memory it
/// cannot get. The latter is a local failure, answered `454 4.7.0` and not counted against the
/// client (RFC 4954 §6).
pub fn check_password(hash: &str, password: &str) -> Result<bool, argon2::password_hash::Error> {
    let parsed = PasswordHash::new(hash)?;
    match Argon2::default().verify_password(password.as_bytes(), &parsed) {
        Ok(()) => Ok(true),
        Err(argon2::password_hash::Error::Password) => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A PHC string that parses as argon2id but whose parameters argon2 refuses (m=1 KiB).
    const UNUSABLE_HASH: &str = "$argon2id$v=19$m=1,t=1,p=1$c29tZXNhbHRzb21lc2FsdA$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE";

    #[test]
    fn a_check_that_cannot_be_made_is_an_error_not_a_wrong_password() {
        assert!(check_password(UNUSABLE_HASH, "x").is_err());
        assert!(check_password("not a hash", "x").is_err());
        assert_eq!(check_password(DUMMY_HASH, "guess").ok(), Some(false));
        let hash = hash_password("pw").unwrap();
        assert_eq!(check_password(&hash, "pw").ok(), Some(true));
    }

    #[test]
    fn hash_verifies_and_wrong_password_does_not() {
        let hash = hash_password("correct horse").unwrap();
        assert!(
            hash.starts_with("$argon2id$v=19$m=19456,t=2,p=1$"),
            "{hash}"
        );
        assert!(verify_password(&hash, "correct horse"));
        assert!(!verify_password(&hash, "correct horse "));
        assert!(!verify_password(&hash, ""));
    }

    #[test]
    fn dummy_hash_is_a_real_argon2id_hash_with_default_parameters() {
        assert!(PasswordHash::new(DUMMY_HASH).is_ok());
        let real = hash_password("x").unwrap();
        assert_eq!(real[..30], DUMMY_HASH[..30]);
        assert!(!verify_password(DUMMY_HASH, ""));
    }

    #[test]
    fn salts_differ() {
        assert_ne!(hash_password("x").unwrap(), hash_password("x").unwrap());
    }

    #[test]
    fn malformed_hash_never_matches() {
        assert!(!verify_password("", ""));
        assert!(!verify_password("plaintext", "plaintext"));
        assert!(!verify_password("$argon2id$garbage", "x"));
    }
}
