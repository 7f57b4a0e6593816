#!/usr/bin/python3
"""dkimpy (Debian's python3-dkim) as the independent DKIM and ARC implementation of the
mail-authentication tests (tests/mail_auth.rs, through tests/common/dns.rs).

Reads a message on stdin. Every DNS lookup goes to the test's nsd on 127.0.0.1:--dns-port,
never to the system resolver.

  sign --key PEM --domain D --selector S --algorithm rsa-sha256|rsa-sha1|ed25519-sha256
      prints the message with a DKIM-Signature prepended (relaxed/relaxed)
  arc-sign --key PEM --domain D --selector S --srv-id ID
      prints the message with an ARC set prepended (it must carry ID's Authentication-Results)
  verify
      prints one line per DKIM-Signature, in header order: "d s a pass|fail"
"""

import argparse
import base64
import sys

import dkim
import dkim.util
import dns.resolver

SIGNED = [b"from", b"to", b"subject", b"date", b"message-id"]


def make_dnsfunc(port):
    resolver = dns.resolver.Resolver(configure=False)
    resolver.nameservers = ["127.0.0.1"]
    resolver.port = port
    resolver.lifetime = 5

    def dnsfunc(name, timeout=5):
        try:
            answer = resolver.resolve(name.decode(), "TXT")
        except (dns.resolver.NXDOMAIN, dns.resolver.NoAnswer):
            return b""
        return b"".join(answer[0].strings)

    return dnsfunc


def private_key(path):
    """dkimpy takes RSA keys as PEM and Ed25519 keys as the base64 of the 32-octet seed,
    which is the last 32 octets of the PKCS#8 DER."""
    pem = open(path, "rb").read()
    if b"BEGIN RSA PRIVATE KEY" in pem:
        return pem
    body = b"".join(l for l in pem.splitlines() if not l.startswith(b"-----"))
    der = base64.b64decode(body)
    return base64.b64encode(der[-32:])


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--dns-port", type=int, required=True)
    sub = parser.add_subparsers(dest="cmd", required=True)
    sign = sub.add_parser("sign")
    arc = sub.add_parser("arc-sign")
    for p in (sign, arc):
        p.add_argument("--key", required=True)
        p.add_argument("--domain", required=True)
        p.add_argument("--selector", required=True)
    sign.add_argument("--algorithm", default="rsa-sha256")
    arc.add_argument("--srv-id", required=True)
    sub.add_parser("verify")
    args = parser.parse_args()

    message = sys.stdin.buffer.read()
    dnsfunc = make_dnsfunc(args.dns_port)
    out = sys.stdout.buffer
    if args.cmd == "sign":
        header = dkim.sign(
            message,
            args.selector.encode(),
            args.domain.encode(),
            private_key(args.key),
            canonicalize=(b"relaxed", b"relaxed"),
            signature_algorithm=args.algorithm.encode(),
            include_headers=SIGNED,
        )
        out.write(header + message)
    elif args.cmd == "arc-sign":
        headers = dkim.arc_sign(
            message,
            args.selector.encode(),
            args.domain.encode(),
            private_key(args.key),
            args.srv_id.encode(),
            include_headers=SIGNED,
        )
        if not headers:
            sys.exit("arc_sign produced no ARC set (no Authentication-Results of --srv-id?)")
        out.write(b"".join(headers) + message)
    else:
        headers, _ = dkim.rfc822_parse(message)
        sigs = [v for (k, v) in headers if k.lower() == b"dkim-signature"]
        d = dkim.DKIM(message, minkey=1024)
        for idx, value in enumerate(sigs):
            tags = dkim.util.parse_tag_value(value)
            try:
                ok = d.verify(idx=idx, dnsfunc=dnsfunc)
            except dkim.DKIMException as e:
                print("signature %d: %s" % (idx, e), file=sys.stderr)
                ok = False
            fields = [tags.get(t, b"-").decode() for t in (b"d", b"s", b"a")]
            print(" ".join(fields + ["pass" if ok else "fail"]))


if __name__ == "__main__":
    main()
