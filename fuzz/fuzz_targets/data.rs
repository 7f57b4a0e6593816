//! Differential fuzzing of the streaming DATA decoder against a naive whole-input reference.
//!
//! Input: byte 0 picks the size limit, byte 1 seeds the chunk sizes, the rest is the octet
//! stream after `DATA<CRLF>`. The same input also goes through the normalising decoder
//! (`bare_lf = "normalize"`), which must end the message at the same place.

#![no_main]

use libfuzzer_sys::fuzz_target;
use portcullis::smtp::data::DataDecoder;

mod common;

fuzz_target!(|data: &[u8]| {
    if data.len() < 2 {
        return;
    }
    let max = [0, 1, 5, 64, 1 << 20][usize::from(data[0]) % 5];
    let mut chunks = common::Chunks::new(data[1]);
    let input = &data[2..];

    let expected = common::reference_decode(input, max);

    let mut decoder = DataDecoder::new(max);
    let mut out = Vec::new();
    let mut offset = 0;
    let mut end = None;
    while offset < input.len() {
        let n = chunks.next_len().min(input.len() - offset);
        let r = decoder.decode(&input[offset..offset + n], &mut out);
        assert!(r.consumed <= n);
        offset += r.consumed;
        if r.finished {
            end = Some(offset);
            break;
        }
        // Unfinished: the whole chunk must have been taken (nothing is left for the driver).
        assert_eq!(r.consumed, n);
    }
    assert_eq!(end, expected.end, "end of data");
    assert_eq!(out, expected.out, "decoded octets");
    assert_eq!(decoder.size(), expected.size, "size");
    if end.is_some() {
        assert_eq!(decoder.fault(), expected.fault, "fault");
    }

    // `bare_lf = "normalize"`: storing a bare LF as CRLF never moves the end of the message
    // (the smuggling rule), and a message it does not refuse holds no bare LF.
    let mut chunks = common::Chunks::new(data[1]);
    let mut normalizing = DataDecoder::normalizing(1 << 20);
    let mut stored = Vec::new();
    let mut offset = 0;
    let mut normalized_end = None;
    while offset < input.len() {
        let n = chunks.next_len().min(input.len() - offset);
        let r = normalizing.decode(&input[offset..offset + n], &mut stored);
        offset += r.consumed;
        if r.finished {
            normalized_end = Some(offset);
            break;
        }
        assert_eq!(r.consumed, n);
    }
    assert_eq!(normalized_end, expected.end, "normalizing moved the end of data");
    if normalized_end.is_some() && normalizing.fault().is_none() {
        let bare_lf = stored
            .iter()
            .enumerate()
            .any(|(i, &b)| b == b'\n' && (i == 0 || stored[i - 1] != b'\r'));
        assert!(!bare_lf, "a bare LF was stored");
    }
});
