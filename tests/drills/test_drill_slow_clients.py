"""Drill 4: slowloris-style clients and oversized requests are cut off by nginx's
limits (client_header_timeout, client_body_timeout, client_max_body_size) and
never tie up a function worker.

200 slow connections are held open (half trickling their headers a byte at a
time, half sending headers and part of a body, then stalling) against functions
with two workers each. Meanwhile normal requests answer fast, nothing of the
slow requests reaches a function, and nginx closes every slow connection within
its timeouts. Oversized bodies get nginx's JSON 413 and write nothing."""
import json
import re
import socket
import statistics
import time
import uuid

import pytest

import mr

SLOW = 200
FUNCS = ["handle-stripe-webhook", "check-instance-health"]


@pytest.fixture(scope="module")
def stack(pg):
    with mr.Stack(pg, env={"MR_WORKERS": "2"}, functions=FUNCS) as s:
        yield s


def nginx_setting(stack, name):
    m = re.search(r"^\s*%s\s+(\d+)s;" % name, (stack.run / "nginx.conf").read_text(), re.M)
    assert m, "%s not set in nginx/dev.conf" % name
    return int(m.group(1))


def requests_seen(stack, name):
    return sum(1 for l in stack.log(name).splitlines() if '"msg":"request"' in l)


def seen_since(stack, before, expected):
    """Requests each function logged since `before`, once they are `expected` or
    after 5 s. A function logs a request's line after its answer has gone out,
    so the last answer's line may still be on its way when the client has it."""
    end = time.monotonic() + 5.0
    while True:
        seen = {f: requests_seen(stack, f) - before[f] for f in FUNCS}
        if seen == expected or time.monotonic() > end:
            return seen
        time.sleep(0.05)


def open_slow(stack, kind, i):
    s = socket.create_connection(("127.0.0.1", stack.port), timeout=5)
    if kind == "header":
        s.sendall(b"POST /functions/v1/handle-stripe-webhook HTTP/1.1\r\nHost: x\r\n")
    else:
        s.sendall(b"POST /functions/v1/handle-stripe-webhook HTTP/1.1\r\nHost: x\r\n"
                  b"Content-Type: application/json\r\nStripe-Signature: t=1,v1=00\r\n"
                  b"Content-Length: 4000\r\n\r\n{\"id\":\"evt_slow_%d\"," % i)
    return s


def closed_by_server(s):
    """True once the server has closed (EOF or reset); reads any answer it sent."""
    s.setblocking(False)
    try:
        while True:
            data = s.recv(65536)
            if not data:
                return True
    except BlockingIOError:
        return False
    except OSError:
        return True


def normal_event(stack):
    raw = json.dumps({"id": "evt_normal_" + uuid.uuid4().hex, "object": "event",
                      "type": "invoice.created", "created": int(time.time()),
                      "data": {"object": {"id": "in_1", "object": "invoice"}}}).encode()
    return stack.call("POST", "handle-stripe-webhook", body=raw, headers=stack.stripe_headers(raw),
                      timeout=10)


def test_slow_clients_tie_up_no_worker_and_are_cut_off(stack):
    header_to = nginx_setting(stack, "client_header_timeout")
    body_to = nginx_setting(stack, "client_body_timeout")
    before = {f: requests_seen(stack, f) for f in FUNCS}
    slow = [(k, open_slow(stack, k, i)) for i in range(SLOW // 2) for k in ("header", "body")]
    opened = time.monotonic()

    # While they are all open: normal requests answer at their usual speed.
    latencies = []
    tok = stack.jwt()
    for i in range(40):
        t0 = time.monotonic()
        r = normal_event(stack) if i % 2 == 0 else stack.call(
            "GET", "check-instance-health", token=tok, timeout=10)
        latencies.append(time.monotonic() - t0)
        assert r.status == 200, r
        # Keep the header tricklers trickling (a byte at a time, slower than any
        # function would wait for).
        if i % 10 == 0:
            for k, s in slow:
                if k == "header":
                    try:
                        s.sendall(b"X")
                    except OSError:
                        pass
    still_open = sum(1 for _, s in slow if not closed_by_server(s))
    p50, worst = statistics.median(latencies), max(latencies)
    # Every normal request and nothing else reached the functions.
    seen = seen_since(stack, before, {"handle-stripe-webhook": 20, "check-instance-health": 20})
    assert seen == {"handle-stripe-webhook": 20, "check-instance-health": 20}, seen
    assert still_open == SLOW, "slow connections closed before their timeout: %d open" % still_open
    assert worst < 1.0, "a normal request waited %.2fs behind slow clients" % worst

    # nginx cuts them off: headers after client_header_timeout, stalled bodies
    # after client_body_timeout (from their last byte).
    deadline = opened + max(header_to, body_to) + 5
    open_now = list(slow)
    while open_now and time.monotonic() < deadline:
        open_now = [(k, s) for k, s in open_now if not closed_by_server(s)]
        time.sleep(0.25)
    cut_after = time.monotonic() - opened
    for _, s in slow:
        s.close()
    print("\ndrill slow-clients: %d slow connections open; 40 normal requests meanwhile: "
          "p50 %.1f ms, max %.1f ms; all slow connections closed by nginx %.1fs after opening "
          "(client_header_timeout %ds, client_body_timeout %ds); requests reaching functions %s"
          % (SLOW, p50 * 1000, worst * 1000, cut_after, header_to, body_to, seen))
    assert not open_now, "%d slow connections still open after %.0fs" % (len(open_now), cut_after)
    assert {f: requests_seen(stack, f) - before[f] for f in FUNCS} == seen


def test_oversized_requests_get_413_and_never_reach_a_function(stack):
    before = {f: requests_seen(stack, f) for f in FUNCS}
    events_before = stack.sql("SELECT count(*) FROM public.stripe_events")[0][0]
    big = b'{"id":"evt_big","type":"x","created":1,"data":{"object":{"pad":"' + b"a" * (1 << 20) + b'"}}}'
    r = stack.call("POST", "handle-stripe-webhook", body=big, headers=stack.stripe_headers(big))
    assert r.status == 413 and r.json["error"]["code"] == "too_big", r
    # A declared length over the cap is refused from the headers alone, before
    # any body is sent.
    s = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    s.sendall(b"POST /functions/v1/handle-stripe-webhook HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\nContent-Length: 104857600\r\n\r\n")
    head = s.recv(4096)
    s.close()
    assert head.startswith(b"HTTP/1.1 413"), head[:200]
    # Chunked, no length: cut once past the cap.
    s = socket.create_connection(("127.0.0.1", stack.port), timeout=10)
    s.sendall(b"POST /functions/v1/handle-stripe-webhook HTTP/1.1\r\nHost: x\r\n"
              b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n")
    chunk = b"%x\r\n%s\r\n" % (16384, b"b" * 16384)
    answer = b""
    try:
        for _ in range(8):
            s.sendall(chunk)
    except OSError:
        pass
    try:
        answer = s.recv(4096)
    except OSError:
        pass
    s.close()
    assert answer.startswith(b"HTTP/1.1 413"), answer[:200]
    # A header block over nginx's buffers: refused by nginx too.
    r = stack.call("POST", "handle-stripe-webhook", body=b"{}",
                   headers={"Stripe-Signature": "t=1,v1=" + "0" * 40000})
    assert r.status in (400, 494), r
    # A body right at the cap still gets through to the function (its own 400:
    # the signature is wrong), so the cap is where it is documented.
    at_cap = b"{" + b" " * (65536 - 2) + b"}"
    r = stack.call("POST", "handle-stripe-webhook", body=at_cap,
                   headers={"Content-Type": "application/json", "Stripe-Signature": "t=1,v1=00"})
    assert r.status == 400 and r.json["error"]["code"] == "invalid_signature", r
    seen = seen_since(stack, before, {"handle-stripe-webhook": 1, "check-instance-health": 0})
    assert seen == {"handle-stripe-webhook": 1, "check-instance-health": 0}, seen
    assert stack.sql("SELECT count(*) FROM public.stripe_events")[0][0] == events_before
