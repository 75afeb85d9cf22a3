"""Both nginx configurations: `nginx -t` on each, and the production server
block actually serving (TLS, rate limits with JSON 429, the provisioner kept off
the public listener) in front of a test stack's functions.

The production site is nginx/site.conf (the operator's, installed once) including
the package's nginx/mindroom.conf, api.conf, redirect.conf and snippets, written
for /usr/share/mindroom/nginx, /run/mindroom and ports 80/443; the test rewrites
only those paths and ports, so what runs is the files as shipped.
"""

import json
import math
import os
import re
import ssl
import subprocess
import time
from http import client as httpclient

import pytest

import mr
from lifecycle_helpers import wait_until


def nginx_t(conf, prefix):
    p = subprocess.run(["nginx", "-t", "-p", str(prefix), "-c", str(conf),
                        "-e", str(prefix / "error.log")],
                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    return p.returncode, p.stdout


def self_signed(dirpath):
    cert, key = dirpath / "cert.pem", dirpath / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1",
                    "-subj", "/CN=api.mindroom.example", "-keyout", str(key), "-out", str(cert)],
                   check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return cert, key


def production_conf(tmp, sockdir, ports):
    """The site (nginx/site.conf) and the package's files it includes, with their
    system paths and ports moved into tmp, inside a minimal nginx.conf (as
    /etc/nginx/nginx.conf includes sites-enabled)."""
    cert, key = self_signed(tmp)
    (tmp / "log").mkdir(exist_ok=True)
    share = tmp / "share"
    share.mkdir(exist_ok=True)
    subs = [
        ("/etc/letsencrypt/live/api.mindroom.example/fullchain.pem", str(cert)),
        ("/etc/letsencrypt/live/api.mindroom.example/privkey.pem", str(key)),
        ("/usr/share/mindroom/nginx/", str(share) + "/"),
        ("/run/mindroom/", str(sockdir) + "/"),
        ("/var/log/nginx/", str(tmp / "log") + "/"),
        ("listen 127.0.0.1:54321;", "listen 127.0.0.1:%d;" % ports["internal"]),
        ("listen 127.0.0.1:8002;", "listen 127.0.0.1:%d;" % ports["provisioner"]),
        ("listen 127.0.0.1:8003;", "listen 127.0.0.1:%d;" % ports["admin"]),
        ("listen 443 ssl http2;", "listen 127.0.0.1:%d ssl http2;" % ports["https"]),
        ("listen 80;", "listen 127.0.0.1:%d;" % ports["http"]),
    ]
    files = {f.name: f.read_text() for f in (mr.ROOT / "nginx").glob("*.conf") if f.name != "dev.conf"}
    for old, new in subs:
        assert any(old in text for text in files.values()), "the nginx files no longer have %r" % old
        files = {name: text.replace(old, new) for name, text in files.items()}
    for name, text in files.items():
        text = re.sub(r"\n\s*listen \[::\]:\d+[^;]*;", "", text)  # no IPv6 in the sandbox
        (share / name).write_text(text)
    user = "user root root;" if os.geteuid() == 0 else ""
    wrapper = tmp / "nginx.conf"
    wrapper.write_text("""%s
daemon off;
pid %s/nginx.pid;
error_log %s/log/error.log warn;
events { worker_connections 512; }
http {
    client_body_temp_path %s/body;
    fastcgi_temp_path %s/fastcgi;
    proxy_temp_path %s/proxy;
    scgi_temp_path %s/scgi;
    uwsgi_temp_path %s/uwsgi;
    include %s/site.conf;
}
""" % ((user,) + (tmp,) * 7 + (share,)))
    return wrapper


def test_dev_conf_passes_nginx_t(tmp_path):
    s = mr.Stack.__new__(mr.Stack)  # only for render_nginx
    s.run = tmp_path
    for d in ("log", "nginx", "conf.d"):
        (tmp_path / d).mkdir()
    conf = tmp_path / "nginx.conf"
    conf.write_text(s.render_nginx(*("127.0.0.1:%d" % p for p in mr.free_ports(3))))
    assert "@" not in re.sub(r"#.*", "", conf.read_text()), "unreplaced placeholder"
    rc, out = nginx_t(conf, tmp_path / "nginx")
    assert rc == 0, out
    assert "test is successful" in out


def test_production_conf_passes_nginx_t(tmp_path):
    ports = dict(zip(("http", "https", "internal", "provisioner", "admin"), mr.free_ports(5)))
    conf = production_conf(tmp_path, tmp_path / "sock", ports)
    rc, out = nginx_t(conf, tmp_path)
    assert rc == 0, out
    assert "test is successful" in out


def test_body_caps_agree():
    """nginx's client_max_body_size in both configs equals the C default cap."""
    hdr = (mr.ROOT / "lib/mr_http.h").read_text()
    cap = int(re.search(r"#define MR_DEFAULT_MAX_BODY (\d+)", hdr).group(1))
    for name in ("dev.conf", "mindroom.conf", "api.conf"):
        sizes = re.findall(r"client_max_body_size (\d+)k;", (mr.ROOT / "nginx" / name).read_text())
        assert sizes and all(int(s) * 1024 == cap for s in sizes), (name, sizes)


def test_each_zones_retry_after_is_when_it_lets_the_next_request_through():
    """Every location with a rate limit answers its 429 with the Retry-After of its
    slowest zone: the seconds between two requests it lets through, rounded up
    (json-errors.conf's default, 1, unless the location sets $mr_retry_after)."""
    zones = {}
    for name in ("dev.conf", "mindroom.conf"):
        for zone, n, unit in re.findall(r"limit_req_zone \S+\s+zone=(\w+):\S+\s+rate=(\d+)r/(s|m);",
                                        (mr.ROOT / "nginx" / name).read_text()):
            zones[zone] = int(n) / (60 if unit == "m" else 1)
    checked = 0
    for name in ("dev.conf", "api.conf"):
        for block in re.findall(r"location [^{]*\{(.*?)\n\s*\}", (mr.ROOT / "nginx" / name).read_text(), re.S):
            used = re.findall(r"limit_req zone=(\w+)", block)
            if not used:
                continue
            wanted = max(math.ceil(1 / zones[z]) for z in used)
            said = re.search(r"set \$mr_retry_after (\d+);", block)
            assert (int(said.group(1)) if said else 1) == wanted, (name, used, block)
            checked += 1
    assert checked >= 8, checked


def test_both_configurations_log_alike():
    """dev.conf and mindroom.conf write the same access-log line: one format (only
    its name differs) and the same maps for its method and path."""
    def log_part(name):
        text = re.sub(r"(?m)^\s*#.*$", "", (mr.ROOT / "nginx" / name).read_text())
        maps = [" ".join(m.split()) for m in re.findall(r"map \$\w+ \$mr_log_\w+ \{[^}]*\}", text)]
        fmt = re.search(r"log_format \w+ (escape=json[^;]*);", text).group(1)
        return maps, " ".join(fmt.split())
    dev, prod = log_part("dev.conf"), log_part("mindroom.conf")
    assert len(dev[0]) == 3 and "$mr_log_method" in dev[1] and "$mr_log_path" in dev[1], dev
    assert dev == prod


@pytest.fixture(scope="module")
def prod(pg, tmp_path_factory):
    """The production config serving a test stack's function sockets."""
    with mr.Stack(pg) as s:
        tmp = tmp_path_factory.mktemp("prod")
        names = ("http", "https", "internal", "provisioner", "admin")
        p, ports = mr.start_nginx(lambda ports: production_conf(tmp, s.run / "sock", dict(zip(names, ports))),
                                  len(names), tmp, tmp / "log/error.log", tmp / "nginx.stderr.log")
        ports = dict(zip(names, ports))
        try:
            yield s, ports, tmp
        finally:
            mr.Stack._terminate(p)


def https(ports, method, path, body=None, headers=None):
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    c = httpclient.HTTPSConnection("127.0.0.1", ports["https"], context=ctx, timeout=30)
    try:
        c.request(method, path, body=body, headers=headers or {})
        r = c.getresponse()
        return mr.Response(r.status, r.headers, r.read())
    finally:
        c.close()


def test_production_serves_functions_over_tls(prod):
    s, ports, _ = prod
    r = https(ports, "POST", "/functions/v1/provision-instance", body=b"{}",
              headers={"Authorization": "Bearer " + s.jwt(role="anon")})
    assert r.status == 403, r  # reached the function, which judged the role
    assert r.headers.get("Strict-Transport-Security")
    r = mr.http("GET", "http://127.0.0.1:%d/functions/v1/x" % ports["http"])
    assert r.status == 301 and r.headers["Location"].startswith("https://")


def tls12_handshake(ports, cipher):
    """Whether a TLS 1.2 client offering only `cipher` gets a session."""
    p = subprocess.run(["openssl", "s_client", "-connect", "127.0.0.1:%d" % ports["https"], "-tls1_2",
                        "-cipher", cipher], input=b"", capture_output=True, timeout=20)
    return p.returncode == 0 and ("Cipher is " + cipher).encode() in p.stdout


def test_production_tls12_takes_only_forward_secret_aead_suites(prod):
    """Mozilla's intermediate ciphers: a TLS 1.2 client that offers only static-RSA
    key exchange (no forward secrecy), CBC with SHA-1 or Camellia is refused."""
    _, ports, _ = prod
    weak = [c for c in ("AES128-SHA", "AES256-SHA", "AES128-GCM-SHA256", "CAMELLIA256-SHA",
                        "ECDHE-RSA-AES128-SHA", "ECDHE-RSA-AES256-SHA384")
            if tls12_handshake(ports, c)]
    assert weak == [], weak
    for good in ("ECDHE-RSA-AES128-GCM-SHA256", "ECDHE-RSA-AES256-GCM-SHA384",
                 "ECDHE-RSA-CHACHA20-POLY1305"):
        assert tls12_handshake(ports, good), good


def test_production_nginx_own_answers_keep_hsts_and_hide_the_version(prod):
    """Every answer over TLS carries Strict-Transport-Security, nginx's own errors
    (JSON, nginx/json-errors.conf) included; plain HTTP answers never do; no
    listener names nginx's version."""
    s, ports, _ = prod
    for r in (https(ports, "GET", "/no-such-path"),
              https(ports, "POST", "/functions/v1/list-plans", body=b"x" * 70000),
              https(ports, "GET", "/functions/v1/list-plans?x=" + "a" * 9000)):
        assert r.status in (404, 413, 414) and set(r.json["error"]) == {"code", "message"}, r
        assert r.headers.get("Strict-Transport-Security") == "max-age=63072000", r
    r = mr.http("GET", "http://127.0.0.1:%d/nope" % ports["internal"])
    assert r.status == 404 and "Strict-Transport-Security" not in r.headers, r
    r = mr.http("GET", "http://127.0.0.1:%d/functions/v1/list-plans" % ports["http"])
    assert r.status == 301 and r.headers.get("Server") == "nginx", r.headers
    assert b"nginx/" not in r.body, r.body


def test_production_provisioner_only_on_loopback_listener(prod):
    s, ports, _ = prod
    tok = s.env["DOKKU_PROVISIONER_TOKEN"]
    for path in ("/apps", "/functions/v1/dokku-provisioner"):
        r = https(ports, "GET", path, headers={"Authorization": "Bearer " + tok})
        assert r.status == 404 and r.json["error"]["code"] == "not_found", r
    r = mr.http("GET", "http://127.0.0.1:%d/apps/x" % ports["provisioner"], token=tok)
    assert len([l for l in s.log("dokku-provisioner").splitlines()
                if r.headers["X-Request-Id"] in l]) == 1


def test_production_rate_limits_provision_with_json_429(prod):
    s, ports, _ = prod
    statuses = []
    for _ in range(25):
        r = https(ports, "POST", "/functions/v1/deprovision-instance", body=b"{}",
                  headers={"Authorization": "Bearer " + s.jwt(role="anon")})
        statuses.append(r.status)
        if r.status == 429:
            assert r.json == {"error": {"code": "rate_limited", "message": "too many requests"}}
            assert r.headers["Content-Type"] == "application/json"
            assert r.headers.get("Retry-After")
            # A browser's script may read it, and the request id.
            exposed = {h.strip().lower() for h in r.headers.get("Access-Control-Expose-Headers", "").split(",")}
            assert {"x-request-id", "retry-after"} <= exposed, r.headers
    # burst=10 at 30 r/min: the first ~11 pass, the rest are limited.
    assert 403 in statuses and statuses.count(429) >= 10, statuses
    # A client that waits the Retry-After it was given is let through: at 30 r/min
    # the next slot is 2 s away (after 1 s it would be refused again).
    assert r.status == 429 and r.headers["Retry-After"] == "2", r.headers
    time.sleep(int(r.headers["Retry-After"]))
    r = https(ports, "POST", "/functions/v1/deprovision-instance", body=b"{}",
              headers={"Authorization": "Bearer " + s.jwt(role="anon")})
    assert r.status == 403, r
    # At 5 r/s (my-instance) the next slot is within the second.
    for _ in range(40):
        r = https(ports, "GET", "/functions/v1/my-instance")
        if r.status == 429:
            break
    assert r.status == 429 and r.headers["Retry-After"] == "1", r
    time.sleep(1)
    assert https(ports, "GET", "/functions/v1/my-instance").status == 401
    # The webhook's zone is separate and generous.
    for _ in range(30):
        r = https(ports, "POST", "/functions/v1/handle-stripe-webhook", body=b"{}")
        assert r.status != 429, r
    # The loopback listener (FUNCTIONS_URL) is not limited.
    for _ in range(15):
        r = mr.http("POST", "http://127.0.0.1:%d/functions/v1/deprovision-instance" % ports["internal"],
                    json={}, token=s.jwt(role="anon"))
        assert r.status == 403, r


# ---- the access log: the request as the client sent it -----------------------

def access_log_lines(text, rid):
    """The JSON access-log lines of one request id."""
    out = []
    for line in text.splitlines():
        try:
            entry = json.loads(line)
        except ValueError:
            continue
        if entry.get("request_id") == rid:
            out.append(entry)
    return out


def logged_as(read_log, rid):
    """The one access-log line of request `rid` (the log is buffered: written
    within a second)."""
    lines = wait_until(lambda: access_log_lines(read_log(), rid), timeout=10.0, interval=0.05,
                       what="the access-log line of %s" % rid)
    assert len(lines) == 1, lines
    return lines[0]


def test_access_log_names_the_method_and_path_of_nginx_own_answers(prod):
    """nginx's own answers (json-errors.conf: an internal redirect to
    /.mr-error/<status>, which nginx makes a GET) are logged with the method and
    path the client sent, without the query string, in both configurations; the
    bodies stay the JSON errors."""
    s, ports, tmp = prod
    tag = "alog-%d" % time.time_ns()
    # dev.conf (the test stack's own nginx).
    cases = [
        ("/functions/v1/provision-instance?apikey=secret", b"x" * 70000, 413, "too_big"),
        ("/functions/v1/no-such-function", b"{}", 404, "not_found"),
    ]
    for i, (path, body, status, code) in enumerate(cases):
        rid = "%s-dev-%d" % (tag, i)
        r = s.call("POST", path, body=body, headers={"X-Request-Id": rid})
        assert r.status == status and r.json["error"]["code"] == code, r
        line = logged_as(lambda: s.log("nginx.access"), rid)
        assert (line["method"], line["uri"], line["status"]) == ("POST", path.split("?")[0], status), line
    # Production (mindroom.conf, api.conf): a body too large, and the lifecycle
    # zone's rate limit (30 r/min, burst 10).
    prod_log = lambda: (tmp / "log/mindroom.access.log").read_text(errors="replace")
    rid = tag + "-prod-413"
    r = https(ports, "POST", "/functions/v1/list-plans?apikey=secret", body=b"x" * 70000,
              headers={"X-Request-Id": rid})
    assert r.status == 413 and r.json == {"error": {"code": "too_big",
                                                    "message": "request body too large"}}, r
    line = logged_as(prod_log, rid)
    assert (line["method"], line["uri"], line["status"]) == ("POST", "/functions/v1/list-plans", 413), line
    for i in range(25):
        rid = "%s-prod-429-%d" % (tag, i)
        r = https(ports, "POST", "/functions/v1/deprovision-instance", body=b"{}",
                  headers={"Authorization": "Bearer " + s.jwt(role="anon"), "X-Request-Id": rid})
        if r.status == 429:
            break
    assert r.status == 429 and r.json == {"error": {"code": "rate_limited",
                                                    "message": "too many requests"}}, r
    line = logged_as(prod_log, rid)
    assert (line["method"], line["uri"], line["status"]) == \
        ("POST", "/functions/v1/deprovision-instance", 429), line
    assert "secret" not in prod_log() and "apikey" not in s.log("nginx.access")
