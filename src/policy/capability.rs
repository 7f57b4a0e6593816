//! What a route to the upstream can carry, decided at SMTP time so that nothing is accepted
//! that can only be bounced later (backscatter to forged senders).
//!
//! [`Capabilities`] is what the upstreams of one route announced in their EHLO replies: only the
//! extensions that decide whether a message can be relayed at all (SMTPUTF8, 8BITMIME, SIZE).
//! [`rcpt`] runs per recipient, since the route is known per recipient; [`data`] runs after
//! the final dot, before the message is committed. Both are pure: the caller looks the route's
//! capabilities up and logs the rule.
//!
//! portcullis never converts a message (no 8-bit to 7-bit downgrade, no SMTPUTF8 downgrade,
//! RFC 6152 §3 allows refusing instead), so a mismatch is a refusal:
//!
//! | what                                               | when            | reply       | rule                       |
//! |----------------------------------------------------|-----------------|-------------|----------------------------|
//! | non-ASCII local part of the reverse-path or forward-path, route without SMTPUTF8 | RCPT | `553 5.6.7` (RFC 6531 §3.5) | `route_smtputf8` |
//! | `BODY=8BITMIME`, route without 8BITMIME            | RCPT            | `550 5.6.3` | `route_8bitmime`           |
//! | `SIZE=` over the route's SIZE                      | RCPT            | `552 5.3.4` | `route_size`               |
//! | SMTPUTF8 declared and a non-ASCII header section, route without SMTPUTF8 | end of data | `554 5.6.9` (RFC 6531 §3.5) | `route_smtputf8_headers` |
//! | message over the route's SIZE                      | end of data     | `552 5.3.4` | `route_size`               |
//! | 8-bit octets without `BODY=8BITMIME`, route without 8BITMIME | end of data | `554 5.6.3` | `route_8bit_undeclared` |
//!
//! 8-bit content that was not declared is otherwise passed on with `BODY=8BITMIME` (decided on
//! the octets received, not on `Content-Transfer-Encoding`).
//!
//! `550` rather than `554` for 8BITMIME: RFC 5321 §4.3.2 does not list 554 among the replies
//! to RCPT; 5.6.3 is RFC 3463's "conversion required but not supported".

use crate::envelope::{Address, Body, MailParams, ReversePath};
use crate::smtp::reply;

use super::Refusal;

/// The extensions of one upstream, or the meet of every upstream of a route, that decide
/// whether a message can be relayed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Capabilities {
    /// SMTPUTF8 (RFC 6531).
    pub smtputf8: bool,
    /// 8BITMIME (RFC 6152).
    pub eightbitmime: bool,
    /// The SIZE limit in octets (RFC 1870); `None`: no fixed limit announced (no SIZE, or
    /// `SIZE 0`).
    pub size: Option<u64>,
}

impl Capabilities {
    /// What an upstream not yet seen is assumed to offer: no SMTPUTF8 (refusing what might
    /// have been relayable is recoverable by the sender; accepting what must bounce is
    /// backscatter), 8BITMIME (which nearly every server has offered for decades), no limit.
    pub const UNKNOWN: Capabilities = Capabilities {
        smtputf8: false,
        eightbitmime: true,
        size: None,
    };

    /// What both `self` and `other` can carry: a route offers an extension only when every
    /// upstream in it does, since failover may hand the message to any of them.
    pub fn meet(self, other: Capabilities) -> Capabilities {
        Capabilities {
            smtputf8: self.smtputf8 && other.smtputf8,
            eightbitmime: self.eightbitmime && other.eightbitmime,
            size: match (self.size, other.size) {
                (Some(a), Some(b)) => Some(a.min(b)),
                (a, b) => a.or(b),
            },
        }
    }

    fn too_big(&self, size: u64) -> bool {
        self.size.is_some_and(|limit| size > limit)
    }
}

/// True when a local part needs SMTPUTF8. Only local parts count: a domain in U-label form
/// goes upstream as its A-label.
fn utf8_local(address: &Address) -> bool {
    !address.local().is_ascii()
}

/// RCPT stage: can the route of `to`, with capabilities `caps`, carry this transaction?
pub fn rcpt(
    caps: &Capabilities,
    from: &ReversePath,
    params: &MailParams,
    to: &Address,
) -> Result<(), Refusal> {
    if !caps.smtputf8 && (utf8_local(to) || from.address().is_some_and(utf8_local)) {
        return Err(Refusal::new(reply::ROUTE_NEEDS_SMTPUTF8, "route_smtputf8"));
    }
    if params.body == Some(Body::EightBitMime) && !caps.eightbitmime {
        return Err(Refusal::new(reply::ROUTE_NO_8BITMIME, "route_8bitmime"));
    }
    if let Some(size) = params.size
        && caps.too_big(size)
    {
        return Err(Refusal::new(reply::ROUTE_SIZE, "route_size"));
    }
    Ok(())
}

/// End of data, before the commit: can the route with capabilities `caps` carry the message
/// received? `header_utf8`: its header section has a non-ASCII octet; `size`: its size in
/// octets as it would be sent. A header section that is all ASCII needs no SMTPUTF8 even when
/// the client declared it: the message is then sent without the parameter. `eight_bit`: the
/// message has an octet over 127.
pub fn data(
    caps: &Capabilities,
    params: &MailParams,
    header_utf8: bool,
    eight_bit: bool,
    size: u64,
) -> Result<(), Refusal> {
    if eight_bit && params.body != Some(Body::EightBitMime) && !caps.eightbitmime {
        return Err(Refusal::new(
            reply::UNDECLARED_8BIT_UNDELIVERABLE,
            "route_8bit_undeclared",
        ));
    }
    if params.smtputf8 && header_utf8 && !caps.smtputf8 {
        return Err(Refusal::new(
            reply::UTF8_HEADERS_UNDELIVERABLE,
            "route_smtputf8_headers",
        ));
    }
    if caps.too_big(size) {
        return Err(Refusal::new(reply::ROUTE_SIZE, "route_size"));
    }
    Ok(())
}

/// End of data, before the commit: [`rcpt`] again for one recipient, since what the route can
/// carry may have been learnt anew while the message was being received (another session's
/// connection saw a new EHLO). The same rules, with the replies a client may get after the
/// final dot (RFC 5321 §4.3.2 lists no 553 there): `554 5.6.7` for an address that needs
/// SMTPUTF8; `550 5.6.3` and `552 5.3.4` as at RCPT.
pub fn rcpt_at_data(
    caps: &Capabilities,
    from: &ReversePath,
    params: &MailParams,
    to: &Address,
) -> Result<(), Refusal> {
    rcpt(caps, from, params, to).map_err(|r| match r.rule {
        "route_smtputf8" => Refusal::new(reply::ADDRESS_NEEDS_SMTPUTF8_AT_DATA, r.rule),
        _ => r,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn addr(s: &str) -> Address {
        Address::parse(s).unwrap()
    }

    const NONE: Capabilities = Capabilities {
        smtputf8: false,
        eightbitmime: false,
        size: Some(1000),
    };
    const ALL: Capabilities = Capabilities {
        smtputf8: true,
        eightbitmime: true,
        size: None,
    };

    fn params(body: Option<Body>, smtputf8: bool, size: Option<u64>) -> MailParams {
        MailParams {
            body,
            smtputf8,
            size,
        }
    }

    #[test]
    fn rcpt_refuses_what_the_route_cannot_carry() {
        let ascii = ReversePath::Address(addr("a@third.test"));
        let utf8 = ReversePath::Address(addr("jörg@third.test"));
        let p = params(None, true, None);
        let rule = |caps: &Capabilities, from: &ReversePath, p: &MailParams, to: &str| {
            rcpt(caps, from, p, &addr(to))
                .err()
                .map(|r| (r.rule, r.reply.code, r.reply.enhanced))
        };
        let smtputf8 = Some(("route_smtputf8", 553, "5.6.7"));
        assert_eq!(rule(&NONE, &utf8, &p, "kate@example.com"), smtputf8);
        assert_eq!(rule(&NONE, &ascii, &p, "käte@example.com"), smtputf8);
        assert_eq!(
            rule(&Capabilities::UNKNOWN, &utf8, &p, "k@example.com"),
            smtputf8
        );
        assert_eq!(rule(&NONE, &ascii, &p, "kate@example.com"), None);
        assert_eq!(
            rule(&NONE, &ReversePath::Null, &p, "kate@example.com"),
            None
        );
        assert_eq!(rule(&ALL, &utf8, &p, "käte@example.com"), None);

        let eight = params(Some(Body::EightBitMime), false, None);
        assert_eq!(
            rule(&NONE, &ascii, &eight, "k@example.com"),
            Some(("route_8bitmime", 550, "5.6.3"))
        );
        assert_eq!(
            rule(&Capabilities::UNKNOWN, &ascii, &eight, "k@example.com"),
            None
        );
        let seven = params(Some(Body::SevenBit), false, None);
        assert_eq!(rule(&NONE, &ascii, &seven, "k@example.com"), None);

        let big = params(None, false, Some(1001));
        assert_eq!(
            rule(&NONE, &ascii, &big, "k@example.com"),
            Some(("route_size", 552, "5.3.4"))
        );
        assert_eq!(
            rule(
                &NONE,
                &ascii,
                &params(None, false, Some(1000)),
                "k@example.com"
            ),
            None
        );
        assert_eq!(rule(&ALL, &ascii, &big, "k@example.com"), None);
    }

    #[test]
    fn data_refuses_utf8_headers_only_when_declared_and_unsupported() {
        let declared = params(None, true, None);
        let undeclared = params(None, false, None);
        let rule = |caps: &Capabilities, p: &MailParams, utf8: bool, size: u64| {
            data(caps, p, utf8, false, size)
                .err()
                .map(|r| (r.rule, r.reply.code, r.reply.enhanced))
        };
        assert_eq!(
            rule(&NONE, &declared, true, 10),
            Some(("route_smtputf8_headers", 554, "5.6.9"))
        );
        assert_eq!(rule(&NONE, &declared, false, 10), None);
        assert_eq!(rule(&NONE, &undeclared, true, 10), None);
        assert_eq!(rule(&ALL, &declared, true, 10), None);
        assert_eq!(
            rule(&NONE, &undeclared, false, 1001),
            Some(("route_size", 552, "5.3.4"))
        );
    }

    #[test]
    fn the_end_of_data_recheck_answers_with_data_phase_codes() {
        let utf8 = ReversePath::Address(addr("jörg@third.test"));
        let p = params(Some(Body::EightBitMime), true, None);
        let r = rcpt_at_data(&NONE, &utf8, &p, &addr("k@example.com")).unwrap_err();
        assert_eq!(
            (r.rule, r.reply.code, r.reply.enhanced),
            ("route_smtputf8", 554, "5.6.7")
        );
        let ascii = ReversePath::Address(addr("a@third.test"));
        let r = rcpt_at_data(&NONE, &ascii, &p, &addr("k@example.com")).unwrap_err();
        assert_eq!(
            (r.rule, r.reply.code, r.reply.enhanced),
            ("route_8bitmime", 550, "5.6.3")
        );
        assert!(rcpt_at_data(&ALL, &utf8, &p, &addr("k@example.com")).is_ok());
    }

    #[test]
    fn data_refuses_undeclared_8bit_only_for_a_route_without_8bitmime() {
        let rule = |caps: &Capabilities, p: &MailParams, eight_bit: bool| {
            data(caps, p, false, eight_bit, 10)
                .err()
                .map(|r| (r.rule, r.reply.code, r.reply.enhanced))
        };
        let undeclared = params(None, false, None);
        let seven = params(Some(Body::SevenBit), false, None);
        let declared = params(Some(Body::EightBitMime), false, None);
        let refused = Some(("route_8bit_undeclared", 554, "5.6.3"));
        assert_eq!(rule(&NONE, &undeclared, true), refused);
        assert_eq!(rule(&NONE, &seven, true), refused);
        assert_eq!(rule(&NONE, &undeclared, false), None);
        assert_eq!(rule(&ALL, &undeclared, true), None);
        // Declared 8BITMIME was decided at RCPT already.
        assert_eq!(rule(&NONE, &declared, true), None);
    }

    #[test]
    fn a_route_offers_what_every_upstream_in_it_offers() {
        let a = Capabilities {
            smtputf8: true,
            eightbitmime: true,
            size: Some(5000),
        };
        assert_eq!(
            a.meet(NONE),
            Capabilities {
                smtputf8: false,
                eightbitmime: false,
                size: Some(1000)
            }
        );
        assert_eq!(ALL.meet(a), a);
        assert_eq!(ALL.meet(ALL), ALL);
    }
}
