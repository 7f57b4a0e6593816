//! The policy loader (`config::Config::from_toml`) on hostile text.
//!
//! Input: any octets; UTF-8 ones are compiled as a policy file. Checks: no panic and no hang,
//! whatever the keys, types, units, addresses and patterns (a file it names is read to at most
//! `config::files::MAX_FILE` octets); every error names a key and says something; a policy that
//! compiles gives its summary and warnings without panicking, and compiling it again gives the
//! same summary (compiling is deterministic).

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::config::Config;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml(text, None) {
        Err(errors) => {
            for e in &errors.0 {
                assert!(!e.key.is_empty() && !e.message.is_empty(), "{e:?}");
            }
        }
        Ok(config) => {
            let summary = config.summary();
            let _ = config.warnings();
            let again = Config::from_toml(text, None).expect("compiles twice");
            assert_eq!(again.summary(), summary);
        }
    }
});
