//! Hashed secrets: argon2id password hashes in PHC string form.
//!
//! Hashing and verifying are deliberately slow (that is the point of argon2); callers on the
//! async reactor must run them on a blocking thread. This module holds no state and does no
//! I/O: [`verify_with_memory`] works in memory blocks its caller owns, so a pool of verifier
//! threads can reuse the same blocks for every verification instead of asking the allocator
//! for tens of MiB each time.

use std::collections::HashMap;
use std::fmt;

use argon2::password_hash::rand_core::OsRng;
use argon2::password_hash::{Output, PasswordHash, PasswordHasher, SaltString};
use argon2::{Algorithm, Argon2, Block, Params, Version};
use rand::RngCore;

/// A valid argon2id hash (default parameters) of a random password nobody knows.
#[cfg(test)]
pub const DUMMY_HASH: &str = "$argon2id$v=19$m=19456,t=2,p=1$3C056/yWongzKuiNtDZD6w$MyPqlOLCva2ktGsHp6KlygtFPfGTe5FCWyJ6XljeRlE";

/// The OWASP Password Storage Cheat Sheet's weakest argon2id configuration in memory: 7 MiB
/// (7,168 KiB) with t=5. Hashes with less memory are reported by `check-config`.
pub const OWASP_MIN_M_KIB: u32 = 7_168;

/// Every argon2id configuration of the OWASP cheat sheet has m × t ≥ 35,840 KiB·passes
/// (e.g. 19 MiB × 2, 7 MiB × 5); hashes below it are reported by `check-config`.
pub const OWASP_MIN_M_T: u64 = 35_840;

/// The cost parameters of one hash: what a verification against it costs in time and memory.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct HashParams {
    /// `argon2id`, `argon2i` or `argon2d`.
    pub algorithm: Algorithm,
    /// Memory in KiB (`m`).
    pub m_kib: u32,
    /// Passes (`t`).
    pub t: u32,
    /// Lanes (`p`).
    pub p: u32,
    /// Length of the hash output in octets.
    pub output_len: usize,
}

impl HashParams {
    /// The parameters of a PHC string, or `None` when it is not an argon2 hash.
    pub fn of(hash: &str) -> Option<HashParams> {
        let parsed = PasswordHash::new(hash).ok()?;
        let algorithm = Algorithm::try_from(parsed.algorithm).ok()?;
        let params = Params::try_from(&parsed).ok()?;
        Some(HashParams {
            algorithm,
            m_kib: params.m_cost(),
            t: params.t_cost(),
            p: params.p_cost(),
            output_len: params.output_len().unwrap_or(Params::DEFAULT_OUTPUT_LEN),
        })
    }

    /// Weaker than every argon2id configuration of the OWASP Password Storage Cheat Sheet
    /// ([`OWASP_MIN_M_KIB`], [`OWASP_MIN_M_T`]), or not argon2id at all.
    pub fn below_owasp(&self) -> bool {
        self.algorithm != Algorithm::Argon2id
            || self.m_kib < OWASP_MIN_M_KIB
            || u64::from(self.m_kib) * u64::from(self.t) < OWASP_MIN_M_T
    }

    /// What `portcullis passwd` writes: argon2id, m=19456 KiB, t=2, p=1, 32 octets.
    pub fn default_set() -> HashParams {
        HashParams {
            algorithm: Algorithm::Argon2id,
            m_kib: Params::DEFAULT_M_COST,
            t: Params::DEFAULT_T_COST,
            p: Params::DEFAULT_P_COST,
            output_len: Params::DEFAULT_OUTPUT_LEN,
        }
    }
}

// `Algorithm` is not `Hash`; its name stands for it.
impl std::hash::Hash for HashParams {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        (
            self.algorithm.as_str(),
            self.m_kib,
            self.t,
            self.p,
            self.output_len,
        )
            .hash(state);
    }
}

impl fmt::Display for HashParams {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "{} m={},t={},p={}",
            self.algorithm, self.m_kib, self.t, self.p
        )
    }
}

/// The parameter set most of `hashes` use (ties go to the costlier set, so the dummy is never
/// the cheap one); [`HashParams::default_set`] when there are none.
pub fn most_common_params<'a>(hashes: impl IntoIterator<Item = &'a str>) -> HashParams {
    let mut counts: HashMap<HashParams, usize> = HashMap::new();
    for p in hashes.into_iter().filter_map(HashParams::of) {
        *counts.entry(p).or_default() += 1;
    }
    counts
        .into_iter()
        .max_by_key(|&(p, n)| (n, u64::from(p.m_kib) * u64::from(p.t), p))
        .map_or_else(HashParams::default_set, |(p, _)| p)
}

/// A hash that no password matches, with the parameters most of `hashes` use: unknown logins
/// are verified against it, so "no such user" and "wrong password" take the same time and
/// give the same reply. Salt and output are random (made fresh at each load; nobody knows a
/// password for it, and finding one is as hard as inverting argon2).
pub fn dummy_hash<'a>(hashes: impl IntoIterator<Item = &'a str>) -> String {
    let p = most_common_params(hashes);
    let salt = SaltString::generate(&mut OsRng);
    let mut out = vec![0u8; p.output_len];
    rand::rng().fill_bytes(&mut out);
    let output = Output::new(&out).expect("output length comes from a valid hash");
    format!(
        "${}$v=19$m={},t={},p={}${}${}",
        p.algorithm,
        p.m_kib,
        p.t,
        p.p,
        salt.as_str(),
        output
    )
}

/// Hash `password` with argon2id (v19, default parameters m=19456 KiB, t=2, p=1) and a random
/// salt, returning the PHC string (`$argon2id$v=19$m=19456,t=2,p=1$…`). Used by
/// `portcullis passwd`.
pub fn hash_password(password: &str) -> Result<String, argon2::password_hash::Error> {
    let salt = SaltString::generate(&mut OsRng);
    Ok(Argon2::default()
        .hash_password(password.as_bytes(), &salt)?
        .to_string())
}

/// Why a password could not be checked at all: a local failure, not a wrong password. The
/// client gets `454 4.7.0` and the attempt is not counted against it (RFC 4954 §6).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CheckError {
    /// The stored hash is not an argon2 PHC string this build can read.
    #[error("the stored hash is not a usable argon2 PHC string: {0}")]
    Malformed(String),
    /// argon2 refused the stored parameters (e.g. `m=1`) or could not run with them.
    #[error("argon2 refused the stored parameters: {0}")]
    Refused(String),
    /// The verification panicked (the verifier thread survives it).
    #[error("the password verifier failed: panicked")]
    VerifierPanicked,
    /// The verifier thread is gone before it answered.
    #[error("the password verifier failed: gone")]
    VerifierGone,
}

/// Whether `password` matches the PHC string `hash`, allocating the argon2 memory for this
/// one check. A malformed hash or an unsupported algorithm never matches.
pub fn verify_password(hash: &str, password: &str) -> bool {
    verify_with_memory(hash, password, &mut Vec::new()).unwrap_or(false)
}

/// Like [`verify_password`], but tells a wrong password (`Ok(false)`) from a check that
/// could not be made ([`CheckError`]).
#[cfg(test)]
pub fn check_password(hash: &str, password: &str) -> Result<bool, CheckError> {
    verify_with_memory(hash, password, &mut Vec::new())
}

/// Whether `password` matches the PHC string `hash` (`Ok(false)`: a wrong password), with
/// the argon2 working memory taken from `blocks`: grown to the hash's `m` (in 1 KiB blocks)
/// when shorter, never shrunk, so a caller that keeps `blocks` holds at most the largest `m`
/// it has met. The comparison is constant-time.
///
/// # Errors
/// [`CheckError::Malformed`] for a hash that cannot be read, [`CheckError::Refused`] for
/// parameters argon2 will not run with.
pub fn verify_with_memory(
    hash: &str,
    password: &str,
    blocks: &mut Vec<Block>,
) -> Result<bool, CheckError> {
    let malformed = |e: &dyn std::fmt::Display| CheckError::Malformed(e.to_string());
    let parsed = PasswordHash::new(hash).map_err(|e| malformed(&e))?;
    let algorithm = Algorithm::try_from(parsed.algorithm).map_err(|e| malformed(&e))?;
    let params = Params::try_from(&parsed).map_err(|e| CheckError::Refused(e.to_string()))?;
    let (Some(expected), Some(salt)) = (parsed.hash, parsed.salt) else {
        return Err(CheckError::Malformed("no salt or no hash".into()));
    };
    let version = match parsed.version.map(Version::try_from) {
        None => Version::default(),
        Some(Ok(v)) => v,
        Some(Err(e)) => return Err(malformed(&e)),
    };
    let mut salt_buf = [0u8; 64];
    let salt = salt.decode_b64(&mut salt_buf).map_err(|e| malformed(&e))?;
    let needed = params.block_count();
    if blocks.len() < needed {
        blocks.resize(needed, Block::default());
    }
    let mut out = vec![0u8; expected.len()];
    Argon2::new(algorithm, version, params)
        .hash_password_into_with_memory(password.as_bytes(), salt, &mut out, &mut blocks[..])
        .map_err(|e| CheckError::Refused(e.to_string()))?;
    // Output's equality is constant-time.
    Ok(Output::new(&out).is_ok_and(|computed| computed == expected))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hash_with(m: u32, t: u32, password: &str) -> String {
        let params = Params::new(m, t, 1, None).unwrap();
        let salt = SaltString::generate(&mut OsRng);
        Argon2::new(Algorithm::Argon2id, Version::V0x13, params)
            .hash_password(password.as_bytes(), &salt)
            .unwrap()
            .to_string()
    }

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
    fn reused_memory_verifies_hashes_of_any_size_and_keeps_the_largest() {
        let small = hash_with(8, 1, "a");
        let large = hash_with(64, 2, "b");
        let mut blocks = Vec::new();
        assert!(verify_with_memory(&small, "a", &mut blocks).unwrap());
        assert_eq!(blocks.len(), 8);
        assert!(verify_with_memory(&large, "b", &mut blocks).unwrap());
        assert!(!verify_with_memory(&large, "a", &mut blocks).unwrap());
        assert!(verify_with_memory(&small, "a", &mut blocks).unwrap());
        assert_eq!(blocks.len(), 64);
        // The same result as the argon2 crate's own verifier.
        use argon2::password_hash::PasswordVerifier;
        let parsed = PasswordHash::new(&large).unwrap();
        assert!(Argon2::default().verify_password(b"b", &parsed).is_ok());
    }

    #[test]
    fn dummy_hash_follows_the_most_common_parameters() {
        let a = hash_with(65536, 3, "x");
        let b = hash_with(65536, 3, "y");
        let c = hash_with(19456, 2, "z");
        let dummy = dummy_hash([a.as_str(), c.as_str(), b.as_str()]);
        assert!(
            dummy.starts_with("$argon2id$v=19$m=65536,t=3,p=1$"),
            "{dummy}"
        );
        assert_eq!(HashParams::of(&dummy), HashParams::of(&a));
        assert!(!verify_password(&dummy, ""));
        assert!(!verify_password(&dummy, "x"));
        // Without users, the parameters `portcullis passwd` uses; a tie goes to the costlier.
        assert_eq!(
            HashParams::of(&dummy_hash([])),
            Some(HashParams::default_set())
        );
        assert_eq!(HashParams::of(DUMMY_HASH), Some(HashParams::default_set()));
        let tie = dummy_hash([c.as_str(), a.as_str()]);
        assert_eq!(HashParams::of(&tie), HashParams::of(&a));
        // Fresh salt and output each time.
        assert_ne!(dummy_hash([]), dummy_hash([]));
    }

    #[test]
    fn parameters_below_every_owasp_configuration_are_recognised() {
        let p = |m, t| HashParams {
            m_kib: m,
            t,
            ..HashParams::default_set()
        };
        assert!(!HashParams::default_set().below_owasp());
        // The OWASP set: 47104/1, 19456/2, 12288/3, 9216/4, 7168/5.
        for (m, t) in [(47104, 1), (19456, 2), (12288, 3), (9216, 4), (7168, 5)] {
            assert!(!p(m, t).below_owasp(), "m={m} t={t}");
        }
        assert!(p(8, 1).below_owasp());
        assert!(p(7167, 100).below_owasp());
        assert!(p(19456, 1).below_owasp());
        assert!(
            HashParams {
                algorithm: Algorithm::Argon2i,
                ..HashParams::default_set()
            }
            .below_owasp()
        );
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
        assert!(!verify_password(
            "$argon2id$v=19$m=8,t=1,p=1$c2FsdHNhbHQ",
            "x"
        ));
    }
}
