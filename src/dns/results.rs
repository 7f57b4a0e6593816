//! Our `Authentication-Results:` field (RFC 8601).

use std::net::IpAddr;

use super::verify::{IprevCheck, MessageChecks, SpfCheck};

/// Everything one `Authentication-Results:` field reports.
#[derive(Debug, Clone, Copy)]
pub struct Recorded<'a> {
    /// `[server] authserv_id`.
    pub authserv_id: &'a str,
    pub client_ip: IpAddr,
    pub spf: Option<&'a SpfCheck>,
    pub iprev: Option<&'a IprevCheck>,
    pub message: Option<&'a MessageChecks>,
}

/// The whole field, `Authentication-Results: authserv-id; method=result ptype.property=value
/// …` folded at 78 columns and ending in CRLF (RFC 8601 §2.2). A method not run is left
/// out; nothing run at all gives `; none` (§2.2).
pub fn authentication_results(recorded: &Recorded<'_>) -> String {
    let _ = recorded;
    todo!()
}
