//! The PROXY protocol header reader (`inbound::proxy::progress`), fed as the reader feeds it.
//!
//! Input: one octet that sets how short the reads are, then what a trusted proxy sends. The
//! octets are handed over in reads of at most what `progress` asks for (shorter ones too, as
//! TCP may deliver them). Checks: no panic; every request is for at least one octet and never
//! reaches past the header's limit (107 octets for v1, `V2_MAX_LEN` for v2), so the reader
//! never reads what follows a header; a complete header is judged the same whatever the
//! read sizes were; a client address is never an IPv4-mapped IPv6 address.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::inbound::proxy::{Origin, Progress, V1_MAX_LEN, V2_MAX_LEN, progress};

/// Feed `data` in reads of at most `step` octets: the outcome and how many octets it took.
fn feed(data: &[u8], step: usize) -> (Option<Result<Origin, String>>, usize) {
    let mut at = 0;
    loop {
        match progress(&data[..at]) {
            Ok(Progress::Need(n)) => {
                assert!(n > 0);
                let limit = if data.first() == Some(&b'P') { V1_MAX_LEN } else { V2_MAX_LEN };
                assert!(at + n <= limit, "asks for {n} after {at} of {data:?}");
                if at == data.len() {
                    return (None, at);
                }
                at += n.min(step).min(data.len() - at);
            }
            Ok(Progress::Done(origin)) => return (Some(Ok(origin)), at),
            Err(e) => return (Some(Err(e.to_string())), at),
        }
    }
}

fuzz_target!(|input: &[u8]| {
    let Some((&seed, data)) = input.split_first() else {
        return;
    };
    let (whole, used) = feed(data, usize::MAX);
    let (short, used_short) = feed(data, usize::from(seed % 16) + 1);
    if let Some(Ok(origin)) = &whole {
        assert_eq!(short.as_ref(), whole.as_ref(), "{data:?}");
        assert_eq!(used, used_short);
        if let Origin::Client(addr) = origin {
            if let std::net::IpAddr::V6(v6) = addr.ip() {
                assert!(v6.to_ipv4_mapped().is_none(), "{addr}");
            }
        }
    }
});
