//! Self-tests of the test upstream ([`common::sink::Sink`]) and the private Postfix
//! ([`common::postfix::Postfix`]) that the delivery tests rely on.

mod common;

use common::sink::{Sink, SinkConfig};

#[test]
fn smoke() {
    let sink = Sink::start(SinkConfig::default());
    let mut c = common::SmtpClient::connect(sink.port());
    c.expect_reply(220);
    c.expect("EHLO x", 250);
    let r = c.send_message("a@b", &["c@d"], "Subject: x\n\n.hi\n");
    assert_eq!(r.0, 250);
    assert_eq!(sink.messages().len(), 1);
}
