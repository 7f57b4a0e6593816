//! Our `Authentication-Results:` field (RFC 8601).

use std::net::IpAddr;

use super::verify::{
    ArcResult, DkimResult, DmarcPolicy, DmarcResult, IprevCheck, IprevResult, MessageChecks,
    SpfCheck, SpfIdentity, SpfResult,
};

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
    let mut resinfos: Vec<Vec<String>> = Vec::new();
    if let Some(spf) = recorded.spf {
        let property = match spf.identity {
            SpfIdentity::MailFrom => "smtp.mailfrom",
            SpfIdentity::Helo => "smtp.helo",
        };
        resinfos.push(vec![
            format!("spf={}", spf_result(spf.result)),
            format!("{property}={}", pvalue(&spf.subject)),
        ]);
    }
    if let Some(message) = recorded.message {
        message_resinfos(message, &mut resinfos);
    }
    if let Some(iprev) = recorded.iprev {
        let mut resinfo = vec![
            format!("iprev={}", iprev_result(iprev.result)),
            format!("policy.iprev={}", pvalue(&recorded.client_ip.to_string())),
        ];
        if let Some(name) = &iprev.name {
            resinfo.push(comment(name));
        }
        resinfos.push(resinfo);
    }
    fold(recorded.authserv_id, &resinfos)
}

fn message_resinfos(message: &MessageChecks, resinfos: &mut Vec<Vec<String>>) {
    for dkim in &message.dkim {
        let mut resinfo = vec![format!("dkim={}", dkim_result(dkim.result))];
        if dkim.result == DkimResult::Policy
            && let Some(detail) = &dkim.detail
        {
            resinfo.push(format!("reason={}", quoted(detail)));
        }
        resinfo.push(format!("header.d={}", pvalue(&dkim.domain)));
        resinfo.push(format!("header.s={}", pvalue(&dkim.selector)));
        resinfo.push(format!("header.a={}", pvalue(&dkim.algorithm)));
        resinfo.push(format!("header.b={}", pvalue(&dkim.b)));
        resinfos.push(resinfo);
    }
    if let Some(arc) = &message.arc {
        if message.dkim.is_empty() {
            // ARC runs exactly when DKIM does: DKIM ran and found no signature.
            resinfos.push(vec!["dkim=none".to_string()]);
        }
        resinfos.push(vec![format!("arc={}", arc_result(arc.result))]);
    }
    if let Some(dmarc) = &message.dmarc {
        resinfos.push(vec![
            format!("dmarc={}", dmarc_result(dmarc.result)),
            format!("(p={})", dmarc_policy(dmarc.policy)),
            format!("header.from={}", pvalue(&dmarc.domain)),
        ]);
    }
}

/// The field, each resinfo on its own line, words folded at [`FOLD_COLUMNS`].
fn fold(authserv_id: &str, resinfos: &[Vec<String>]) -> String {
    let mut field = format!("Authentication-Results: {}", pvalue(authserv_id));
    if resinfos.is_empty() {
        field.push_str("; none\r\n");
        return field;
    }
    for (i, resinfo) in resinfos.iter().enumerate() {
        field.push_str(";\r\n");
        let mut line = String::from(" ");
        for (j, word) in resinfo.iter().enumerate() {
            let last = i + 1 == resinfos.len() && j + 1 == resinfo.len();
            // The ';' that follows the resinfo's last word stays on its line.
            let width = line.len() + usize::from(j > 0) + word.len() + usize::from(!last);
            if j > 0 && width > FOLD_COLUMNS {
                field.push_str(&line);
                field.push_str("\r\n");
                line = String::from("  ");
            } else if j > 0 {
                line.push(' ');
            }
            line.push_str(word);
        }
        field.push_str(&line);
    }
    field.push_str("\r\n");
    field
}

/// Columns a line of the field may take (RFC 5322 §2.1.1 recommends 78).
pub const FOLD_COLUMNS: usize = 78;

/// RFC 2045 `tspecials`, which a token may not hold.
const TSPECIALS: &[u8] = b"()<>@,;:\\\"/[]?=";

fn is_token(value: &str) -> bool {
    !value.is_empty()
        && value
            .bytes()
            .all(|b| b.is_ascii_graphic() && !TSPECIALS.contains(&b))
}

/// A property value (RFC 8601 §2.2 `pvalue`): a token, `local@domain` of atoms, or else a
/// quoted-string.
fn pvalue(value: &str) -> String {
    let address_of_tokens = value
        .rsplit_once('@')
        .is_some_and(|(local, domain)| (local.is_empty() || is_token(local)) && is_token(domain));
    if is_token(value) || address_of_tokens {
        value.to_string()
    } else {
        quoted(value)
    }
}

/// An RFC 5322 quoted-string; control characters are dropped.
fn quoted(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('"');
    for c in value.chars().filter(|c| !c.is_control()) {
        if c == '"' || c == '\\' {
            out.push('\\');
        }
        out.push(c);
    }
    out.push('"');
    out
}

/// An RFC 5322 comment; control characters are dropped.
fn comment(value: &str) -> String {
    let mut out = String::with_capacity(value.len() + 2);
    out.push('(');
    for c in value.chars().filter(|c| !c.is_control()) {
        if matches!(c, '(' | ')' | '\\') {
            out.push('\\');
        }
        out.push(c);
    }
    out.push(')');
    out
}

fn spf_result(result: SpfResult) -> &'static str {
    match result {
        SpfResult::Pass => "pass",
        SpfResult::Fail => "fail",
        SpfResult::SoftFail => "softfail",
        SpfResult::Neutral => "neutral",
        SpfResult::None => "none",
        SpfResult::TempError => "temperror",
        SpfResult::PermError => "permerror",
    }
}

fn iprev_result(result: IprevResult) -> &'static str {
    match result {
        IprevResult::Pass => "pass",
        IprevResult::Fail => "fail",
        IprevResult::None => "none",
        IprevResult::TempError => "temperror",
        IprevResult::PermError => "permerror",
    }
}

fn dkim_result(result: DkimResult) -> &'static str {
    match result {
        DkimResult::Pass => "pass",
        DkimResult::Fail => "fail",
        DkimResult::Neutral => "neutral",
        DkimResult::Policy => "policy",
        DkimResult::TempError => "temperror",
        DkimResult::PermError => "permerror",
    }
}

fn arc_result(result: ArcResult) -> &'static str {
    match result {
        ArcResult::Pass => "pass",
        ArcResult::Fail => "fail",
        ArcResult::None => "none",
        ArcResult::TempError => "temperror",
        ArcResult::PermError => "permerror",
    }
}

fn dmarc_result(result: DmarcResult) -> &'static str {
    match result {
        DmarcResult::Pass => "pass",
        DmarcResult::Fail => "fail",
        DmarcResult::None => "none",
        DmarcResult::TempError => "temperror",
        DmarcResult::PermError => "permerror",
    }
}

fn dmarc_policy(policy: DmarcPolicy) -> &'static str {
    match policy {
        DmarcPolicy::None => "none",
        DmarcPolicy::Quarantine => "quarantine",
        DmarcPolicy::Reject => "reject",
    }
}

#[cfg(test)]
mod tests;
