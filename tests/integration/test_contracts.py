"""Rules that live in two languages and must not drift apart: the owed-work
vocabulary (SQL's lifecycle_action domain and C's mr_action), the Stripe event
types the webhook handles (SQL's stripe_event_kind and the metrics' labels), and
the deadline table (lib/mr_deadlines.h) against nginx's read timeouts and against
itself."""
import base64
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def c_vocabulary():
    """The words of lib/mr_action.c's names table, in enum order, without "none"."""
    text = (ROOT / "lib/mr_action.c").read_text()
    words = re.findall(r'\[MR_ACTION_[A-Z_]+\] = "([a-z_]+)"', text)
    assert words and words[0] == "none", words
    return words[1:]


def test_c_and_sql_speak_one_vocabulary(pg):
    (defn,) = pg.sql("SELECT pg_get_constraintdef(c.oid) FROM pg_constraint c "
                     "WHERE c.conname = 'lifecycle_action_check' "
                     "AND c.contypid = 'public.lifecycle_action'::regtype",
                     dbname="mindroom_template")[0]
    sql_words = re.findall(r"'([a-z_]+)'::text", defn)
    assert sql_words == c_vocabulary()


def test_the_metrics_name_every_stripe_type_the_webhook_handles(pg):
    # mindroom_stripe_events_total's type label is a bounded set (lib/mr_metrics.c):
    # the types stripe_event_kind handles, then "other" and "unknown". A type handled
    # but not named there would be counted as "other", out of its alert's sight.
    text = (ROOT / "lib/mr_metrics.c").read_text()
    table = re.search(r"stripe_types\[\] = \{(.*?)\};", text, re.S)
    labels = re.findall(r'"([^"]+)"', table.group(1))
    assert labels[-2:] == ["other", "unknown"], labels
    (defn,) = pg.sql("SELECT pg_get_functiondef('public.stripe_event_kind(text)'::regprocedure)",
                     dbname="mindroom_template")[0]
    handled = {t for t in re.findall(r"'([a-z_.]+)'", defn) if "." in t}
    assert handled and sorted(labels[:-2]) == sorted(handled)


def lifecycle_sources():
    """The C files that deal with owed work: the worker, and whatever uses the
    vocabulary, the edges or the provisioner client."""
    sources = sorted((ROOT / "lib").glob("*.[ch]")) + sorted((ROOT / "functions").glob("*/*.[ch]"))
    marks = ("mr_action.h", "mr_instance.h", "mr_provisioner.h", "mr_health.h", "worker.h")
    return [p for p in sources if p.name != "mr_action.c" and (
            "mindroom-lifecycle" in str(p) or p.name in ("mr_instance.c", "mr_provisioner.c", "mr_health.c")
            or any('#include "%s"' % m in p.read_text() for m in marks))]


def test_no_second_vocabulary_of_owed_work():
    # The words the webhook once returned for its callers to map ("provision",
    # "resume") exist nowhere in the C code any more, and no C file that deals with
    # owed work (other than mr_action.c) spells an action as a string literal:
    # actions travel as mr_action.
    everything = sorted((ROOT / "lib").glob("*.[ch]")) + sorted((ROOT / "functions").glob("*/*.[ch]"))
    for path in everything:
        text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)
        assert '"provision"' not in text and '"resume"' not in text, path
    words = c_vocabulary()
    sources = lifecycle_sources()
    assert ROOT / "functions/mindroom-lifecycle/steps.c" in sources
    assert ROOT / "functions/deprovision-instance/main.c" in sources
    for path in sources:
        text = re.sub(r"/\*.*?\*/", "", path.read_text(), flags=re.S)  # code, not comments
        literals = set(re.findall(r'"([a-z_]+)"', text))
        assert not literals & set(words), (path, literals & set(words))


def header_defaults():
    text = (ROOT / "lib/mr_deadlines.h").read_text()
    return {k: int(v) for k, v in re.findall(r"#define (MR_DL_[A-Z_]+) (\d+)", text)}


def nginx_read_timeouts(*confs):
    """{location pattern: seconds} of every location with a fastcgi_read_timeout."""
    out, current = {}, None
    lines = [l for conf in confs for l in (ROOT / "nginx" / conf).read_text().splitlines()]
    for line in lines:
        m = re.match(r"\s*location\s+(.*?)\s*\{", line)
        if m:
            current = m.group(1)
        m = re.match(r"\s*fastcgi_read_timeout\s+(\d+)s;", line)
        if m:
            out.setdefault(current, []).append(int(m.group(1)))
    return out


def timeout_for(timeouts, needle):
    hits = [v for loc, vs in timeouts.items() if needle in loc for v in vs]
    assert hits, (needle, timeouts)
    return hits


def test_nginx_read_timeouts_are_the_table_rows():
    d = header_defaults()
    # The public server's locations (api.conf), then the loopback listeners'.
    prod = nginx_read_timeouts("api.conf", "mindroom.conf")
    assert timeout_for(prod, "= /functions/v1/handle-stripe-webhook") == [d["MR_DL_NGINX_WEBHOOK_S"]]
    assert timeout_for(prod, "provision-instance|deprovision-instance")[0] == d["MR_DL_NGINX_LIFECYCLE_S"]
    assert timeout_for(prod, "check-instance-health")[0] == d["MR_DL_NGINX_HEALTH_S"]
    assert timeout_for(prod, "/")[-1] == d["MR_DL_NGINX_PROVISIONER_S"]
    assert timeout_for(prod, "= /functions/v1/track-usage") == [d["MR_DL_NGINX_TENANT_S"]]
    assert timeout_for(prod, "my-instance")[0] == d["MR_DL_NGINX_TENANT_S"]
    dev = nginx_read_timeouts("dev.conf")
    assert timeout_for(dev, "= /functions/v1/track-usage") == [d["MR_DL_NGINX_TENANT_S"]]
    assert timeout_for(dev, "my-instance")[0] >= d["MR_DL_NGINX_TENANT_S"]
    # The local stack serves every function from one location: it must cover each.
    assert timeout_for(dev, "check-instance-health")[0] >= max(
        d["MR_DL_NGINX_WEBHOOK_S"], d["MR_DL_NGINX_LIFECYCLE_S"], d["MR_DL_NGINX_HEALTH_S"])
    assert timeout_for(dev, "/")[-1] == d["MR_DL_NGINX_PROVISIONER_S"]


def test_the_default_deadlines_nest():
    d = header_defaults()
    # The provisioner: a command and a deploy fit in a request, which ends before
    # nginx gives up on its listener, which gives up before the worker's call does.
    assert d["MR_DL_DOKKU_COMMAND_MS"] <= d["MR_DL_PROVISIONER_REQUEST_MS"]
    assert d["MR_DL_DOKKU_DEPLOY_MS"] <= d["MR_DL_PROVISIONER_REQUEST_MS"]
    assert d["MR_DL_PROVISIONER_REQUEST_MS"] < d["MR_DL_NGINX_PROVISIONER_S"] * 1000
    assert d["MR_DL_NGINX_PROVISIONER_S"] * 1000 < d["MR_DL_PROVISION_CALL_MS"]
    # The lease outlives the longest step plus the time to record it.
    longest = max(d["MR_DL_PROVISION_CALL_MS"] + d["MR_DL_PROVISION_CONNECT_MS"], d["MR_DL_RESEND_MS"])
    assert longest + d["MR_DL_RECORD_MARGIN_MS"] <= d["MR_DL_LIFECYCLE_LEASE_S"] * 1000
    # Edges answer before nginx gives up on them, the wait's last poll included.
    assert (d["MR_DL_WAIT_MS"] + d["MR_DL_DB_STATEMENT_MS"] + d["MR_DL_DB_ANSWER_SLACK_MS"]
            < d["MR_DL_NGINX_LIFECYCLE_S"] * 1000)
    # The webhook: a batch's statements, each again alone after a failed batch, and a
    # connection left for after the batch.
    assert (2 * d["MR_DL_WEBHOOK_BATCH"] * d["MR_DL_DB_STATEMENT_MS"] + d["MR_DL_FCGI_READ_MS"]
            < d["MR_DL_NGINX_WEBHOOK_S"] * 1000)
    # track-usage's two statements at most (a credential's first use), my-instance's one.
    assert 2 * d["MR_DL_DB_STATEMENT_MS"] < d["MR_DL_NGINX_TENANT_S"] * 1000
    assert d["MR_DL_HEALTH_PROBE_MS"] < d["MR_DL_NGINX_HEALTH_S"] * 1000 / 2
    # A round's probing ends within HEALTH_ROUND_MS (no instance's probes start later
    # than two probes before its end); the rest is the recording's.
    assert 2 * d["MR_DL_HEALTH_PROBE_MS"] <= d["MR_DL_HEALTH_ROUND_MS"] <= d["MR_DL_NGINX_HEALTH_S"] * 1000 / 2
    # A stopping worker ends before the service manager kills it.
    assert d["MR_DL_LIFECYCLE_STOP_GRACE_MS"] + d["MR_DL_RECORD_MARGIN_MS"] < d["MR_DL_WORKER_STOP_S"] * 1000


@pytest.mark.parametrize("env, message", [
    ({"MR_LIFECYCLE_LEASE_S": "60", "MR_PROVISION_TIMEOUT_MS": "60000"}, "MR_LIFECYCLE_LEASE_S"),
    ({"MR_LIFECYCLE_STOP_GRACE_MS": "59000"}, "MR_LIFECYCLE_STOP_GRACE_MS"),
    ({"MR_PROVISION_BACKOFF_BASE_S": "100", "MR_PROVISION_BACKOFF_CAP_S": "10"}, "BACKOFF_CAP"),
    ({"DATABASE_POOLER": "sometimes"}, "DATABASE_POOLER"),
    # Else every welcome email would be held as refused (libcurl's unsupported scheme).
    ({"RESEND_BASE_URL": "ftp://api.resend.com"}, "RESEND_BASE_URL must be an http:// or https://"),
    ({"RESEND_BASE_URL": "htps://api.resend.com"}, "RESEND_BASE_URL is not an absolute URL"),
])
def test_the_worker_refuses_settings_it_cannot_work_with(env, message, tmp_path):
    import subprocess
    import mr
    full = {"PATH": "/usr/bin:/bin", "DATABASE_URL": "host=/nonexistent dbname=x",
            "DOKKU_PROVISIONER_TOKEN": "t" * 32,
            "MINDROOM_SECRETS_KEY": base64.b64encode(b"k" * 32).decode()}
    full.update(env)
    p = subprocess.run([str(mr.build_dir() / "bin/mindroom-lifecycle")], env=full,
                       capture_output=True, text=True, timeout=10, cwd=tmp_path)
    assert p.returncode == 2, p
    assert message in p.stderr, p.stderr


@pytest.mark.parametrize("binary, env, message", [
    ("provision-instance", {"MR_PROVISION_WAIT_MS": "900000"}, "MR_PROVISION_WAIT_MS"),
    # Its last poll, answered at worst after 5 + 2 s, would end past nginx's 900 s.
    ("provision-instance", {"MR_PROVISION_WAIT_MS": "895000"}, "last poll's answer window"),
    ("deprovision-instance", {"MR_PROVISION_WAIT_MS": "880000",
                              "MR_DB_STATEMENT_TIMEOUT_MS": "20000"}, "MR_PROVISION_WAIT_MS"),
    ("dokku-provisioner", {"PROVISIONER_REQUEST_TIMEOUT_MS": "600000"}, "PROVISIONER_REQUEST_TIMEOUT_MS"),
    ("check-instance-health", {"HEALTH_TIMEOUT_MS": "160000"}, "HEALTH_TIMEOUT_MS"),
    # A round's probing past half of nginx's timeout, or shorter than one probe.
    ("check-instance-health", {"HEALTH_ROUND_MS": "160000"}, "HEALTH_ROUND_MS"),
    ("check-instance-health", {"HEALTH_ROUND_MS": "4000"}, "shorter than HEALTH_TIMEOUT_MS"),
])
def test_functions_refuse_deadlines_past_nginx(binary, env, message, tmp_path):
    import subprocess
    import mr
    full = {"PATH": "/usr/bin:/bin", "SUPABASE_JWT_SECRET": "s" * 40,
            "DOKKU_PROVISIONER_TOKEN": "t" * 32, "DOKKU_MODE": "dry-run",
            "PROVISIONER_STATE_DIR": str(tmp_path / "state"),
            "MR_SOCKET": str(tmp_path / "x.sock")}
    full.update(env)
    p = subprocess.run([str(mr.build_dir() / "bin" / binary)], env=full, capture_output=True,
                       text=True, timeout=10, cwd=tmp_path)
    assert p.returncode == 2, p
    assert message in p.stderr, p.stderr


def test_a_long_probe_timeout_alone_still_starts(tmp_path):
    """HEALTH_TIMEOUT_MS up to half of nginx's timeout was always allowed: set alone
    above HEALTH_ROUND_MS's default, the round's default follows it instead of
    refusing to start."""
    import subprocess
    import time
    import mr
    full = {"PATH": "/usr/bin:/bin", "SUPABASE_JWT_SECRET": "s" * 40,
            "MR_SOCKET": str(tmp_path / "x.sock"), "HEALTH_TIMEOUT_MS": "130000"}
    p = subprocess.Popen([str(mr.build_dir() / "bin/check-instance-health")], env=full,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path)
    try:
        deadline = time.monotonic() + 10
        while not (tmp_path / "x.sock").exists() and p.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (tmp_path / "x.sock").exists() and p.poll() is None, p
    finally:
        p.terminate()
        out, errs = p.communicate(timeout=10)
    assert "HEALTH_ROUND_MS" not in errs, errs
