//! End-of-data checks on the header section, streamed: the loop detector (`Received:` count)
//! and the header firewall (removing headers an untrusted sender must not set).
//!
//! [`HeaderFilter`] buffers only the header section (up to [`MAX_HEADER_SECTION`]); once the
//! blank line that ends it is seen, the kept headers are emitted and the body passes through
//! untouched. A header section longer than the cap is passed on as it is (it still counts
//! `Received:` lines seen so far), so a hostile client cannot make us buffer a whole message.
//!
//! On request ([`HeaderFilter::capture`]) it also keeps a copy of the header section as
//! received, up to a limit, for checks that need to parse it before the message is committed
//! (the `From:` check of authenticated mail).

use std::sync::Arc;

/// Header octets buffered at most before the section is passed through unfiltered.
pub const MAX_HEADER_SECTION: usize = 1024 * 1024;

/// A header-name pattern: exact (case-insensitive) or a prefix ending in `*`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NamePattern {
    prefix: String,
    wildcard: bool,
}

impl NamePattern {
    pub fn new(pattern: &str) -> NamePattern {
        match pattern.strip_suffix('*') {
            Some(prefix) => NamePattern {
                prefix: prefix.to_ascii_lowercase(),
                wildcard: true,
            },
            None => NamePattern {
                prefix: pattern.to_ascii_lowercase(),
                wildcard: false,
            },
        }
    }

    pub fn matches(&self, name: &str) -> bool {
        let head = if self.wildcard {
            name.get(..self.prefix.len())
        } else {
            (name.len() == self.prefix.len()).then_some(name)
        };
        head.is_some_and(|h| h.eq_ignore_ascii_case(&self.prefix))
    }
}

/// What to remove from the header section. Compiled once per policy and shared by every
/// message it applies to.
#[derive(Debug, Clone, Default)]
pub struct StripRules {
    /// Header names to remove.
    pub names: Vec<NamePattern>,
    /// Remove `Authentication-Results:` whose authserv-id is this host (lower case): only
    /// our own server may claim to have authenticated a message.
    pub auth_results_for: Option<String>,
}

#[derive(Debug)]
enum Phase {
    Headers,
    Body,
}

/// Streaming filter over the message octets.
#[derive(Debug)]
pub struct HeaderFilter {
    phase: Phase,
    buf: Vec<u8>,
    rules: Arc<StripRules>,
    received: u32,
    stripped: Vec<String>,
    /// Octets of the header section to keep a copy of (0: none).
    capture_limit: usize,
    captured: Vec<u8>,
}

impl HeaderFilter {
    pub fn new(rules: Arc<StripRules>) -> HeaderFilter {
        HeaderFilter {
            phase: Phase::Headers,
            buf: Vec::new(),
            rules,
            received: 0,
            stripped: Vec::new(),
            capture_limit: 0,
            captured: Vec::new(),
        }
    }

    /// Keep a copy of the first `limit` octets of the header section as received (before
    /// anything is removed), for [`HeaderFilter::captured`].
    pub fn capture(&mut self, limit: usize) {
        self.capture_limit = limit;
    }

    /// The captured header section (empty without [`HeaderFilter::capture`]); complete once
    /// the body started or [`HeaderFilter::finish`] was called.
    pub fn captured(&self) -> &[u8] {
        &self.captured
    }

    fn keep(&mut self, section: &[u8]) {
        let n = section.len().min(self.capture_limit);
        self.captured = section[..n].to_vec();
    }

    /// Number of `Received:` headers in the message.
    pub fn received_count(&self) -> u32 {
        self.received
    }

    /// Names of the headers removed, in order (for the log).
    pub fn stripped(&self) -> &[String] {
        &self.stripped
    }

    /// Feed message octets; octets ready to be written go to `out`. In the body phase this
    /// returns `false` and leaves `out` alone: the caller writes `chunk` itself (no copy).
    pub fn push(&mut self, chunk: &[u8], out: &mut Vec<u8>) -> bool {
        if let Phase::Body = self.phase {
            return false;
        }
        let searched_from = self.buf.len().saturating_sub(3);
        self.buf.extend_from_slice(chunk);
        let end = if self.buf.starts_with(b"\r\n") {
            Some(0)
        } else {
            find(&self.buf[searched_from..], b"\r\n\r\n").map(|p| searched_from + p + 2)
        };
        match end {
            Some(end) => {
                let rest = self.buf.split_off(end);
                let headers = std::mem::take(&mut self.buf);
                self.keep(&headers);
                self.filter(&headers, out);
                out.extend_from_slice(&rest);
                self.phase = Phase::Body;
            }
            None if self.buf.len() > MAX_HEADER_SECTION => {
                // Too long to be a header section: count, then pass everything through.
                let headers = std::mem::take(&mut self.buf);
                self.keep(&headers);
                self.count_only(&headers);
                out.extend_from_slice(&headers);
                self.phase = Phase::Body;
            }
            None => {}
        }
        true
    }

    /// End of message: a message with no body (no blank line) is all header section.
    pub fn finish(&mut self, out: &mut Vec<u8>) {
        if let Phase::Headers = self.phase {
            let headers = std::mem::take(&mut self.buf);
            self.keep(&headers);
            self.filter(&headers, out);
            self.phase = Phase::Body;
        }
    }

    fn count_only(&mut self, section: &[u8]) {
        for field in fields(section) {
            if field_name(field).is_some_and(|n| n.eq_ignore_ascii_case("Received")) {
                self.received += 1;
            }
        }
    }

    fn filter(&mut self, section: &[u8], out: &mut Vec<u8>) {
        for field in fields(section) {
            let Some(name) = field_name(field) else {
                out.extend_from_slice(field);
                continue;
            };
            if name.eq_ignore_ascii_case("Received") {
                self.received += 1;
            }
            if self.should_strip(name, field) {
                self.stripped.push(name.to_string());
            } else {
                out.extend_from_slice(field);
            }
        }
    }

    fn should_strip(&self, name: &str, field: &[u8]) -> bool {
        if self.rules.names.iter().any(|p| p.matches(name)) {
            return true;
        }
        if let Some(host) = &self.rules.auth_results_for
            && name.eq_ignore_ascii_case("Authentication-Results")
        {
            let value = &field[name.len() + 1..];
            let value = String::from_utf8_lossy(value);
            let authserv = value
                .split(';')
                .next()
                .unwrap_or("")
                .split_whitespace()
                .next()
                .unwrap_or("");
            return authserv.eq_ignore_ascii_case(host);
        }
        false
    }
}

/// Split a header section into fields, each with its continuation lines and CRLFs.
fn fields(section: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut pos = 0;
    std::iter::from_fn(move || {
        if pos >= section.len() {
            return None;
        }
        let start = pos;
        loop {
            match find(&section[pos..], b"\r\n") {
                Some(p) => {
                    pos += p + 2;
                    let next = section.get(pos);
                    if !matches!(next, Some(b' ') | Some(b'\t')) {
                        break;
                    }
                }
                None => {
                    pos = section.len();
                    break;
                }
            }
        }
        Some(&section[start..pos])
    })
}

/// The field name, if the field starts with `name:` (printable ASCII, no spaces).
fn field_name(field: &[u8]) -> Option<&str> {
    let colon = field.iter().position(|&b| b == b':')?;
    let name = &field[..colon];
    if name.is_empty() || !name.iter().all(|&b| b.is_ascii_graphic()) {
        return None;
    }
    std::str::from_utf8(name).ok()
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn run(msg: &[u8], rules: StripRules, step: usize) -> (Vec<u8>, HeaderFilter) {
        let mut f = HeaderFilter::new(Arc::new(rules));
        let mut out = Vec::new();
        for chunk in msg.chunks(step) {
            if !f.push(chunk, &mut out) {
                out.extend_from_slice(chunk);
            }
        }
        f.finish(&mut out);
        (out, f)
    }

    fn exchange_rules() -> StripRules {
        StripRules {
            names: vec![
                NamePattern::new("X-MS-Exchange-Organization-*"),
                NamePattern::new("X-MS-Exchange-Forest-*"),
            ],
            auth_results_for: Some("relay.example.com".into()),
        }
    }

    #[test]
    fn counts_received_and_strips_across_chunk_boundaries() {
        let msg = b"Received: from a\r\n\tby b\r\nReceived: x\r\nX-MS-Exchange-Organization-SCL: -1\r\n\
X-Ms-Exchange-Forest-Foo: y\r\n  folded\r\nAuthentication-Results: relay.example.com; spf=pass\r\n\
Authentication-Results: other.example; spf=fail\r\nSubject: hi\r\n\r\nbody\r\nX-MS-Exchange-Organization-SCL: 9\r\n";
        for step in [1, 2, 5, 17, 4096] {
            let (out, f) = run(msg, exchange_rules(), step);
            assert_eq!(f.received_count(), 2, "step {step}");
            let text = String::from_utf8(out).unwrap();
            assert!(!text.contains("SCL: -1"), "step {step}");
            assert!(!text.contains("Forest"), "step {step}");
            assert!(!text.contains("relay.example.com; spf=pass"), "step {step}");
            assert!(text.contains("other.example; spf=fail"), "step {step}");
            // The body is never filtered.
            assert!(text.ends_with("\r\n\r\nbody\r\nX-MS-Exchange-Organization-SCL: 9\r\n"));
            assert_eq!(f.stripped().len(), 3);
        }
    }

    #[test]
    fn no_rules_is_identity() {
        let msg = b"A: 1\r\nB: 2\r\n\r\nbody\r\n";
        let (out, f) = run(msg, StripRules::default(), 3);
        assert_eq!(out, msg);
        assert_eq!(f.received_count(), 0);
    }

    #[test]
    fn message_without_body_and_without_headers() {
        let (out, f) = run(b"Received: x\r\nSubject: y\r\n", StripRules::default(), 4);
        assert_eq!(out, b"Received: x\r\nSubject: y\r\n");
        assert_eq!(f.received_count(), 1);
        let (out, _) = run(b"\r\njust body\r\n", exchange_rules(), 2);
        assert_eq!(out, b"\r\njust body\r\n");
        let (out, _) = run(b"", exchange_rules(), 2);
        assert!(out.is_empty());
    }

    #[test]
    fn captures_the_header_section_as_received_up_to_the_limit() {
        let msg = b"From: a@example.com\r\nX-MS-Exchange-Organization-SCL: -1\r\n\r\nbody\r\n";
        for step in [1, 7, 4096] {
            let mut f = HeaderFilter::new(Arc::new(exchange_rules()));
            f.capture(1000);
            let mut out = Vec::new();
            for chunk in msg.chunks(step) {
                if !f.push(chunk, &mut out) {
                    out.extend_from_slice(chunk);
                }
            }
            f.finish(&mut out);
            assert_eq!(
                f.captured(),
                b"From: a@example.com\r\nX-MS-Exchange-Organization-SCL: -1\r\n"
            );
            assert!(!contains(&out, b"SCL"));
        }
        let mut f = HeaderFilter::new(Arc::new(StripRules::default()));
        f.capture(6);
        let mut out = Vec::new();
        f.push(b"From: a@b\r\n", &mut out);
        f.finish(&mut out);
        assert_eq!(f.captured(), b"From: ");
        // Without capture nothing is kept.
        let (_, f) = run(msg, StripRules::default(), 3);
        assert!(f.captured().is_empty());
    }

    fn contains(haystack: &[u8], needle: &[u8]) -> bool {
        haystack.windows(needle.len()).any(|w| w == needle)
    }

    #[test]
    fn patterns() {
        assert!(
            NamePattern::new("X-MS-Exchange-Organization-*")
                .matches("x-ms-exchange-organization-scl")
        );
        assert!(!NamePattern::new("X-MS-Exchange-Organization-*").matches("X-MS-Exchange-Org"));
        assert!(NamePattern::new("X-Spam").matches("x-spam"));
        assert!(!NamePattern::new("X-Spam").matches("x-spam-score"));
        assert!(!NamePattern::new("X-Spam").matches("x-spa"));
        // Non-ASCII names never panic on a char boundary.
        assert!(!NamePattern::new("X-MS-*").matches("X-Mxé"));
    }
}
