#!/usr/bin/env python3
"""Writes the committed seed corpus, fuzz/corpus/<target>/<name>.

A handful of meaningful inputs per target, in each target's input format
(see the comment at the top of fuzz/fuzz_targets/<target>.rs): the manual's
routes example (docs/src/proxy.md), real frame headers, real JWTs. Run it
from anywhere; it rewrites the seeds it names and leaves any other file
alone. Seed names are never 40 characters long: those (libFuzzer's SHA-1
names) are git-ignored.
"""

import base64
import hashlib
import hmac
import json
import os
import re
import struct
import zlib

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)


def seed(target, name, data):
    if isinstance(data, str):
        data = data.encode()
    assert len(name) != 40, name
    d = os.path.join(HERE, "corpus", target)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, name), "wb") as f:
        f.write(data)


def readme_routes_example():
    text = open(os.path.join(ROOT, "docs", "src", "proxy.md"), encoding="utf-8").read()
    m = re.search(r"```json\n(\{\n  \"version\": 1,.*?)```", text, re.S)
    assert m, "the manual's routes example (docs/src/proxy.md)"
    return m.group(1)


# --- routes_file ----------------------------------------------------------

BACKEND = {"host": "ws://localhost", "port": 3000}


def router(**extra):
    r = {
        "protocol": "websocket",
        "backends": [BACKEND],
        "external_path": "/ws/chat",
        "internal_path": "/ws",
        "methods": ["GET"],
    }
    r.update(extra)
    return r


def routes(*routers, jwt=None):
    f = {"version": 1, "routers": list(routers)}
    if jwt:
        f["jwt"] = jwt
    return json.dumps(f, indent=1)


JWT = {"secret": "at-least-32-bytes-of-secret-material!!", "issuer": "i", "audience": "a"}

seed("routes_file", "readme-example.json", readme_routes_example())
seed("routes_file", "seed-minimal.json", routes(router()))
seed(
    "routes_file",
    "every-field.json",
    routes(
        router(
            external_path="/secure",
            internal_path="/in/",
            methods=["GET", "POST"],
            auth_required=True,
            forward_access_token=True,
            sticky={"by": "header", "name": "X-User"},
            health_check={"type": "websocket", "interval_ms": 100, "timeout_ms": 10, "path": "/h"},
            circuit_breaker={"failures": 1, "cooldown_ms": 100},
            connect_timeout_ms=10,
            max_connections=1,
            max_message_bytes=16,
            rate_limit={"messages_per_sec": 0.5, "burst": 1},
            allowed_origins=["https://app.example", "null"],
            backends=[
                {"name": "a", "host": "wss://[::1]", "port": 443, "weight": 1000},
                {"name": "b", "host": "ws://10.0.0.1/", "port": 65535},
            ],
        ),
        router(external_path="/", internal_path="/", balance="least_connections",
               health_check={"type": "tcp"}),
        jwt=JWT,
    ),
)
seed("routes_file", "bad-port.json", routes(router(backends=[{"host": "ws://h", "port": 70000}])))
seed("routes_file", "bad-field.json", routes(router(unknown=1)))
seed("routes_file", "not-json.txt", '{"version": 1, "routers": [')

# --- path_mapping ---------------------------------------------------------

for name, text in [
    ("prefix-with-query", "/good/secret?x=1&access_token=abc&access%5Ftoken=d"),
    ("longest-wins", "/good/deeper/x"),
    ("slash-route", "/app/x/y;z"),
    ("catch-all", "/x/y/z"),
    ("root", "/"),
    ("empty-segment", "/good//secret"),
    ("encoded-dots", "/good/%2e%2E;jsessionid=1/admin"),
    ("double-encoded", "/good/%252e%252e/admin"),
    ("stray-percent", "/good/%2%65%2%65/admin"),
    ("encoded-semicolon", "/good/..%3b/admin"),
    ("own-route", "/chat\n/ws/chat\n/chat/room1?access_token=t&b=%20+x"),
    ("own-catch-all", "/\n/in/\n/foo/bar"),
    ("form-query", "/x?a=1&&=2&k&k=%ff%e9x&access_token=a%20b+c"),
]:
    seed("path_mapping", name, text)

# --- frame_scan -----------------------------------------------------------

KEY = bytes([0x37, 0xFA, 0x21, 0x3D])


def frame(first, payload, masked=True, length=None):
    n = len(payload) if length is None else length
    m = 0x80 if masked else 0
    if n < 126:
        h = bytes([first, m | n])
    elif n < 65536:
        h = bytes([first, m | 126]) + struct.pack(">H", n)
    else:
        h = bytes([first, m | 127]) + struct.pack(">Q", n)
    if masked:
        h += KEY
        payload = bytes(b ^ KEY[i % 4] for i, b in enumerate(payload))
    return h + payload


def deflated(data, flush=zlib.Z_SYNC_FLUSH):
    c = zlib.compressobj(wbits=-15)
    out = c.compress(data) + c.flush(flush)
    return out[:-4] if out.endswith(b"\x00\x00\xff\xff") else out


def scan_input(stream, ext=0, rate=None, limit=1000, cuts=()):
    flags = ext
    if rate:
        flags |= 4 | ((rate - 1) << 3)
    words = max(0, (limit - 16) // 4)
    return bytes([flags]) + struct.pack("<H", words) + bytes([len(cuts)]) + bytes(cuts) + stream


hello = frame(0x81, b"Hello")
seed("frame_scan", "text-hello", scan_input(hello, cuts=(1, 1, 3)))
seed("frame_scan", "unmasked-server-frames", scan_input(
    frame(0x81, b"Hi", masked=False) + frame(0x8A, b"", masked=False), cuts=(0, 2)))
seed("frame_scan", "control-frames", scan_input(
    frame(0x89, b"ping") + frame(0x8A, b"pong") + frame(0x88, struct.pack(">H", 1000) + b"bye"),
    cuts=(7, 1, 1)))
seed("frame_scan", "fragmented", scan_input(
    frame(0x01, b"frag") + frame(0x89, b"") + frame(0x00, b"ment") + frame(0x80, b"ed"), limit=16))
seed("frame_scan", "len16", scan_input(frame(0x82, bytes(range(200))), cuts=(2, 2, 100)))
seed("frame_scan", "len64-partial", scan_input(
    frame(0x82, b"", length=70000) + bytes(300), limit=100000, cuts=(5, 9)))
seed("frame_scan", "too-big", scan_input(frame(0x82, bytes(20)) + hello, limit=16))
seed("frame_scan", "rate-limited", scan_input(hello * 4, rate=2, cuts=(11, 11)))
# RFC 7692, 7.2.3.1: "Hello" compressed.
seed("frame_scan", "deflate-hello", scan_input(
    frame(0xC1, bytes([0xF2, 0x48, 0xCD, 0xC9, 0xC9, 0x07, 0x00])) * 2, ext=1, cuts=(3, 4)))
seed("frame_scan", "deflate-fragmented", scan_input(
    frame(0x41, deflated(b"a" * 300)[:3]) + frame(0x80, deflated(b"a" * 300)[3:]), ext=1, limit=400))
seed("frame_scan", "deflate-bomb", scan_input(frame(0xC2, deflated(b"a" * 100000)), ext=1, limit=1000))
seed("frame_scan", "deflate-no-takeover", scan_input(
    frame(0xC1, deflated(b"z" * 50, zlib.Z_FINISH)) + frame(0xC1, b""), ext=2, cuts=(1,)))
seed("frame_scan", "deflate-garbage", scan_input(frame(0xC1, b"\xff\xff\xff\xff"), ext=1))
seed("frame_scan", "other-extension", scan_input(frame(0xC1, b"x") + hello, ext=3))

# --- pubsub_command -------------------------------------------------------

for name, line in [
    ("ping", "ping"),
    ("register-name", "register-name:Client1"),
    ("register-session", "register-session: session-A "),
    ("subscribe", "subscribe:NetworkConnectedEvent|session-A"),
    ("unsubscribe", "unsubscribe:NetworkConnectedEvent | session-A"),
    ("publish-json", 'publish-json:{"publisher_name":"Client1","topic":"NetworkConnectedEvent",'
     '"payload":"Network connected","timestamp":"2024-01-24T10:25:37Z","session_id":"session-A"}'),
    ("missing-bar", "subscribe:topic"),
    ("bad-topic", "subscribe:a*b|s"),
    ("bad-session", "subscribe:t|s:x"),
    ("unknown", "frobnicate:x"),
    ("long-unicode", "x" + "\u00e9" * 20),
]:
    seed("pubsub_command", name, line)

# --- bearer_token ---------------------------------------------------------

for name, flags, header, query in [
    ("header", 1, b"Bearer abc", b""),
    ("header-spaces", 1, b"bearer \t tok \t", b""),
    ("header-wins", 3, b"Bearer h", b"q"),
    ("query", 2, b"", b" q "),
    ("basic", 1, b"Basic dXNlcjpwYXNz", b""),
    ("no-token", 1, b"Bearer ", b""),
    ("obs-text", 1, b"Bearer \xe9t\xe9", b""),
    ("too-long", 2, b"", b"x" * 4097),
]:
    seed("bearer_token", name, bytes([flags]) + header + b"\n" + query)

# --- jwt ------------------------------------------------------------------

SECRET = b"fuzz-secret-fuzz-secret-fuzz-secret!"  # as in fuzz_targets/jwt.rs
FAR = 4102444800  # 2100-01-01


def b64(data):
    return base64.urlsafe_b64encode(data).rstrip(b"=")


def jwt(header, claims, secret=SECRET, alg=hashlib.sha256):
    msg = b64(json.dumps(header).encode()) + b"." + b64(json.dumps(claims).encode())
    sig = hmac.new(secret, msg, alg).digest()
    return msg + b"." + b64(sig)


GOOD = {"sub": "alice", "sid": "s", "exp": FAR, "iat": 1700000000, "iss": "iss", "aud": "aud"}
HS256 = {"alg": "HS256", "typ": "JWT"}
seed("jwt", "raw-valid", b"\x00" + jwt(HS256, GOOD))
seed("jwt", "raw-hs512", b"\x00" + jwt({"alg": "HS512"}, GOOD, alg=hashlib.sha512))
seed("jwt", "raw-wrong-secret", b"\x00" + jwt(HS256, GOOD, secret=b"x" * 32))
seed("jwt", "raw-alg-none", b"\x00" + b64(b'{"alg":"none"}') + b"." + b64(json.dumps(GOOD).encode()) + b".")
seed("jwt", "raw-crit", b"\x00" + jwt({"alg": "HS256", "crit": ["exp-ext"]}, GOOD))
seed("jwt", "raw-garbage", b"\x00" + b"a.b.c.d")
for name, header, claims in [
    ("parts-valid", HS256, GOOD),
    ("parts-aud-list", HS256, dict(GOOD, aud=["x", "aud"])),
    ("parts-expired", HS256, dict(GOOD, exp=1000000000)),
    ("parts-nbf-future", HS256, dict(GOOD, nbf=FAR - 10)),
    ("parts-huge-exp", HS256, dict(GOOD, exp=2**64 - 1)),
    ("parts-float-exp", HS256, dict(GOOD, exp=4102444800.5)),
    ("parts-no-sub", HS256, {k: v for k, v in GOOD.items() if k != "sub"}),
    ("parts-crit", dict(HS256, crit=["b64"]), GOOD),
    ("parts-kid-jwk", dict(HS256, kid="k", jwk={"kty": "oct", "k": "AA"}), GOOD),
]:
    seed("jwt", name, b"\x01" + json.dumps(header).encode() + b"\x00" + json.dumps(claims).encode())
seed("jwt", "parts-bad-signature", b"\x01" + json.dumps(HS256).encode() + b"\x00"
     + json.dumps(GOOD).encode() + b"\x00" + b"\x01" * 32)

# --- config ---------------------------------------------------------------


def cli_flags():
    """The Cli's long flags, sorted, as the target numbers them."""
    text = open(os.path.join(ROOT, "src", "config.rs"), encoding="utf-8").read()
    body = text[text.index("pub struct Cli {"):]
    body = body[: body.index("\n}\n")]
    return sorted(f.replace("_", "-") for f in re.findall(r"\n    pub (\w+): ", body)
                  if f != "command")


FLAGS = cli_flags()


def settings(*pairs):
    out = b""
    for flag, value, inline in pairs:
        pick = (FLAGS.index(flag) << 1 | (1 if inline else 0)) if flag else 0xFE
        out += bytes([pick]) + value.encode() + b"\x00"
    return out


seed("config", "port", settings(("port", "8080", False)))
seed("config", "bad-port", settings(("port", "70000", True)))
seed("config", "redis-url", settings(("redis-url", "redis://u:p@[::1]:6379/2", False)))
seed("config", "jwt", settings(("jwt-secret", "s" * 32, False), ("jwt-ttl-secs", "59", True),
                               ("jwt-issuer", " ", False)))
seed("config", "origins", settings(("ws-allowed-origins", "https://a.example, null", True),
                                   ("cors-allowed-origins", "*,http://x", False)))
seed("config", "tls-half", settings(("tls-cert-file", "/c.pem", False)))
seed("config", "metrics-token", settings(("metrics-token", "short", True)))
seed("config", "workers", settings(("workers", "auto", False), ("log-format", "JSON", True),
                                   ("pubsub-allow-anonymous", "yes", False)))
seed("config", "subcommand", settings((None, "secret", False)))

# --- origin ---------------------------------------------------------------

KEY_OK = "dGhlIHNhbXBsZSBub25jZQ=="
for name, lines in [
    ("listed", ["https://App.example, http://localhost:3000", "https://app.example", "gw:8080", KEY_OK]),
    ("same-origin", ["", "http://gw.example:8080", "gw.example:8080", KEY_OK]),
    ("default-port", ["", "https://GW.example", "gw.example:443"]),
    ("ipv6", ["", "http://[::1]:9", "[::1]:9", "AAAAAAAAAAAAAAAAAAAAAA=="]),
    ("any", ["*", "https://evil.example", "gw", "short"]),
    ("null", ["null", "null", "gw"]),
    ("no-origin", ["https://a.example"]),
    ("bad-list", ["https://a/b", "https://a", "a"]),
]:
    seed("origin", name, "\n".join(lines))

# --- upgrade_response -----------------------------------------------------

ACCEPT = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="  # for the target's key, as in RFC 6455


def upgrade(flags, protocols, extensions, response):
    return bytes([flags]) + protocols.encode() + b"\n" + extensions.encode() + b"\n" + response


def head(status, *headers, crlf="\r\n"):
    return (crlf.join([f"HTTP/1.1 {status}", *headers]) + crlf + crlf).encode()


SWITCH = ("Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Accept: {ACCEPT}")
for name, flags, protocols, extensions, response in [
    ("plain-101", 1, "", "", head("101 Switching Protocols", *SWITCH)),
    ("with-frame", 1, "", "", head("101 Switching Protocols", *SWITCH) + b"\x81\x05Hello"),
    ("subprotocol", 1, "chat, superchat", "",
     head("101 Switching Protocols", *SWITCH, "Sec-WebSocket-Protocol: superchat")),
    ("subprotocol-not-offered", 1, "chat", "",
     head("101 Switching Protocols", *SWITCH, "Sec-WebSocket-Protocol: other")),
    ("deflate", 1, "", "permessage-deflate; client_max_window_bits",
     head("101 Switching Protocols", *SWITCH,
          "Sec-WebSocket-Extensions: permessage-deflate; server_no_context_takeover")),
    ("two-extension-lines", 1, "", "permessage-deflate, x-foo",
     head("101 Switching Protocols", *SWITCH, "Sec-WebSocket-Extensions: x-foo",
          "Sec-WebSocket-Extensions: permessage-deflate")),
    ("health-check", 0, "", "", head("101 Switching Protocols", *SWITCH, "Sec-WebSocket-Protocol: any")),
    ("wrong-accept", 1, "", "", head("101 Switching Protocols", "Upgrade: websocket",
                                     "Sec-WebSocket-Accept: dGhlIHNhbXBsZSBub25jZQ==")),
    ("forbidden", 1, "", "", head("403 Forbidden", "Content-Length: 0")),
    ("server-error", 1, "", "", head("502 Bad Gateway")),
    ("lf-only", 1, "", "", head("101 Switching Protocols", *SWITCH, crlf="\n") + b"\x81\x04\r\n\r\n"),
    ("http10", 1, "", "", head("101 Switching Protocols", *SWITCH).replace(b"HTTP/1.1", b"HTTP/1.0")),
    ("partial", 1, "", "", head("101 Switching Protocols", *SWITCH)[:40]),
    ("not-http", 1, "", "", b"SSH-2.0-OpenSSH_9.6\r\n\r\n"),
]:
    seed("upgrade_response", name, upgrade(flags, protocols, extensions, response))

# --- users_file -----------------------------------------------------------

# `wsproxy hash-password` output for "s3cret" and "hunter2".
H1 = "$argon2id$v=19$m=19456,t=2,p=1$rxVRGoBrvL4b+1V5sMqq8Q$F4dDGebuGctBGYowVRg+WASlNqb12crouZmJhwhJr+4"
H2 = "$argon2id$v=19$m=19456,t=2,p=1$OaCxNNmvPM5r1LnW8SmCig$sgyBlprY4WQwqK9LEvr5XzTGZiZD+clPnjgUOJyjFTI"
for name, text in [
    ("two-users", f"# users\nalice:{H1}\n\n  bob : {H2}  \r\n"),
    ("argon2i", "carol:$argon2i$v=19$m=4096,t=3,p=1$c29tZXNhbHQ$iWh06vD8Fy27wf9npn6FXWiCX4K6pW6Ue1Bnzz07Z8A\n"),
    ("no-colon", f"alice:{H1}\nbob\n"),
    ("twice", f"alice:{H1}\nalice:{H2}\n"),
    ("plaintext", "alice:hunter2\n"),
    ("other-algorithm", "alice:$scrypt$ln=16,r=8,p=1$aM15713r3Xsvxbi31lqr1Q$nFNh2CVHVjNldFVKDHDlm4CbdRSCdEBsjjJxD+iCs5E\n"),
    ("no-output", "alice:$argon2id$v=19$m=19456,t=2,p=1$rxVRGoBrvL4b+1V5sMqq8Q\n"),
    ("bad-params", "alice:$argon2id$v=19$m=1,t=0,p=1$rxVRGoBrvL4b+1V5sMqq8Q$F4dDGebuGctBGYowVRg+WASlNqb12crouZmJhwhJr+4\n"),
    ("control-in-name", f"al\x07ice:{H1}\n"),
]:
    seed("users_file", name, text)

# --- publish_json ---------------------------------------------------------


def publish(flags, message):
    return bytes([flags]) + (message if isinstance(message, str) else json.dumps(message)).encode()


MSG = {"publisher_name": "Client1", "topic": "NetworkConnectedEvent", "payload": "Network connected",
       "timestamp": "2024-01-24T10:25:37Z", "session_id": "session-A"}
for name, flags, message in [
    ("full", 0xFE, MSG),
    ("minimal", 0xFF, {"topic": "t", "payload": {"b": 1, "a": [1, 2.5, None, True]}}),
    ("nulls", 0xFF, {"topic": "t", "payload": None, "session_id": None, "publisher_name": None}),
    ("escaped", 0xFF, '{"topic":"\\u0074","payload":"\\ud83d\\ude00 \\n","publisher_name":"\\u00e9"}'),
    ("too-large", 0x08, MSG),
    ("bad-topic", 0xFF, dict(MSG, topic="a:b")),
    ("bad-session", 0xFF, dict(MSG, session_id="s|t")),
    ("control-publisher", 0xFF, dict(MSG, publisher_name="a\u0007")),
    ("empty-publisher", 0xFE, dict(MSG, publisher_name="")),
    ("duplicate-topic", 0xFF, '{"topic":"a","topic":"b","payload":1}'),
    ("unknown-field", 0xFF, '{"topic":"a","payload":1,"extra":[]}'),
    ("wrong-type", 0xFF, '{"topic":5,"payload":1}'),
    ("not-json", 0xFF, '{"topic":"a","payload":'),
]:
    seed("publish_json", name, publish(flags, message))

# --- reliable_client ------------------------------------------------------

for name, text in [
    ("message", '{"type":"message","id":"c-1","data":{"b":1, "a":[2]}}'),
    ("message-string", '{"data":"hi","id":"A.b_c-9","type":"message"}'),
    ("escaped-type", '{"type":"mess\\u0061ge","id":"c\\u002d1","data":null}'),
    ("bad-id", '{"type":"message","id":"a b","data":1}'),
    ("long-id", '{"type":"message","id":"' + "x" * 129 + '","data":1}'),
    ("no-data", '{"type":"message","id":"c-1"}'),
    ("other-type", '{"type":"ack","id":"c-1","data":1}'),
    ("duplicate-id", '{"type":"message","id":"a","id":"b","data":1}'),
    ("big-number", '{"type":"message","id":"a","data":1e400}'),
    ("not-json", '{"type":"message",'),
]:
    seed("reliable_client", "frame-" + name, b"\x00" + text.encode())
for name, flags, epoch, offset in [
    ("both", 7, "1700000000123456", "1700000000123-0"),
    ("fresh", 1, "", ""),
    ("epoch-only", 3, "1700000000123456", ""),
    ("offset-only", 5, "", "1-0"),
    ("empty-epoch", 7, "", "1700000000123-0"),
    ("empty-offset", 7, "1700000000123456", ""),
    ("zero", 7, "1", "0-0"),
    ("signed", 7, "1", "+1-2"),
    ("too-long", 7, "9" * 65, "1-0"),
    ("huge", 7, "1", "99999999999999999999-0"),
]:
    seed("reliable_client", "position-" + name, bytes([flags]) + epoch.encode() + b"\x00" + offset.encode())

# --- sse_position ---------------------------------------------------------

# Ids as tests/sse.rs and src/session/sse.rs use them, and what a client may send
# instead: the whole input is the Last-Event-ID.
for name, data in [
    ("valid", "1764600000123456:1764600000000-0"),
    ("valid-short", "17:5-0"),
    ("valid-unknown-offset", "1764600000123456:99999999999999-0"),
    ("empty", ""),
    ("no-colon", "garbage"),
    ("colon-only", ":"),
    ("empty-epoch", ":1-0"),
    ("empty-offset", "e:"),
    ("two-colons", "17:5-0:extra"),
    ("longest", "1" * 64 + ":" + "2" * 64),
    ("epoch-too-long", "9" * 65 + ":1-0"),
    ("huge-numbers", "9" * 40 + ":18446744073709551616-18446744073709551616"),
    ("unicode", "\u00e9p\u043ech:1-0\u200b"),
    ("emoji-offset", "1764600000123456:\U0001F600-0"),
    ("not-utf8", b"\xff\xfe:1-0"),
]:
    seed("sse_position", name, data)

# --- control (the new targets' reference checks) -------------------------

for name, text in [
    ("nulls", '{"type":"disconnect","session_id":"s1","code":null,"reason":null}'),
    ("normal-close", '{"type":"disconnect","session_id":"s1","code":1000,"reason":""}'),
    ("escaped", '{"type":"disconn\\u0065ct","session_id":"s\\u0031"}'),
    ("unknown-field", '{"type":"disconnect","session_id":"s1","extra":1}'),
    ("duplicate", '{"type":"disconnect","session_id":"s1","session_id":"s2"}'),
    ("float-code", '{"type":"disconnect","session_id":"s1","code":4001.0}'),
    ("long-reason", '{"type":"disconnect","session_id":"s1","reason":"' + "r" * 124 + '"}'),
]:
    seed("control", name, text)

print("seeds written under", os.path.join(HERE, "corpus"))
