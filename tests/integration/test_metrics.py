"""mindroom-admin on its loopback listener, through real nginx and PostgreSQL:
GET /live, GET /ready (the database, the migrations, the functions' processes)
and GET /metrics (every process's shared-memory counters, and what the database
says at scrape time), checked by `promtool check metrics` and against what the
tests did: N requests spread over both workers are N counted."""
import json
import os
import re
import signal
import subprocess
import time
import uuid

import pytest

import mr
from mr import metric_samples as samples, metric_value as value
from lifecycle_helpers import (PRICES, WORKER, instance, link_customer, new_account, new_subscription,
                               provision, stack_env, wait_until)
from provisioner import ProvisionerStandin

PROBE_ENV = {"MINDROOM_BASE_DOMAIN": "mindroom.test", "HEALTH_ALLOW_LOOPBACK": "1",
             "HEALTH_TIMEOUT_MS": "1000"}


@pytest.fixture(scope="module")
def stack(pg, prov, resend):
    # Every function, the lifecycle worker and mindroom-admin.
    with mr.Stack(pg, env=stack_env(prov, resend, **PROBE_ENV)) as s:
        assert "mindroom-admin" in s.functions and WORKER in s.functions
        yield s


def scrape(s):
    r = s.call_admin("/metrics")
    assert r.status == 200, r
    assert r.headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return r.text


def promtool(text):
    p = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True,
                       timeout=60)
    assert p.returncode == 0 and p.stdout.strip() == "" and p.stderr.strip() == "", p.stdout + p.stderr


def signed_event(s, account, type_="customer.subscription.created", status="active", customer=None):
    """A signed event of `customer` (a new one when None), claiming `account` in its
    metadata when given (a claim the customer must back: docs/webhook.md)."""
    t = int(time.time())
    obj = {"id": "sub_" + uuid.uuid4().hex[:14], "object": "subscription",
           "customer": customer or "cus_" + uuid.uuid4().hex[:14], "status": status,
           "metadata": {"account_id": account} if account else {}, "cancel_at_period_end": False,
           "items": {"object": "list", "data": [{"id": "si_" + uuid.uuid4().hex[:10],
                                                "price": {"id": PRICES["starter"], "object": "price"},
                                                "current_period_end": t + 30 * 86400}]}}
    ev = {"id": "evt_" + uuid.uuid4().hex, "object": "event", "type": type_, "created": t,
          "api_version": "2025-03-31.basil", "livemode": False, "data": {"object": obj}}
    raw = json.dumps(ev).encode()
    return raw, s.stripe_headers(raw)


def test_live_says_the_version(stack):
    r = stack.call_admin("/live")
    version = (mr.build_dir() / "version.stamp").read_text().split()[0]
    assert r.status == 200 and r.json == {"status": "live", "version": version}, r
    assert stack.call_admin("/nope").status == 404
    assert stack.call_admin("/metrics", method="POST").status == 405


def test_n_requests_across_both_workers_are_n_counted(stack):
    n = 40
    before = scrape(stack)
    ids = []
    for _ in range(n):
        r = stack.call("GET", "list-plans")
        assert r.status == 200
        ids.append(r.headers["X-Request-Id"])
    pids = {json.loads(l)["pid"] for l in stack.log("list-plans").splitlines()
            if '"msg":"request"' in l and json.loads(l)["request_id"] in ids}
    assert len(pids) == 2, pids  # both workers served
    after = scrape(stack)
    fn = {"function": "list-plans"}
    assert value(after, "mindroom_http_requests_total", code="2xx", **fn) - \
        value(before, "mindroom_http_requests_total", code="2xx", **fn) == n
    assert value(after, "mindroom_http_request_duration_seconds_count", **fn) - \
        value(before, "mindroom_http_request_duration_seconds_count", **fn) == n
    # Buckets are cumulative and end at the count.
    buckets = [(float(l["le"]), v) for name, l, v in samples(after)
               if name == "mindroom_http_request_duration_seconds_bucket" and l["function"] == "list-plans"]
    assert buckets == sorted(buckets) and buckets[-1][1] == value(
        after, "mindroom_http_request_duration_seconds_count", **fn)
    assert value(after, "mindroom_http_request_duration_seconds_sum", **fn) > 0


def test_every_function_exercised_then_promtool_accepts_the_exposition(stack, prov):
    before = scrape(stack)
    account, _ = new_account(stack)
    customer = link_customer(stack, account, "cus_" + uuid.uuid4().hex[:14])
    raw, headers = signed_event(stack, account, customer=customer)
    assert stack.call("POST", "handle-stripe-webhook", body=raw, headers=headers).status == 200
    assert stack.call("POST", "handle-stripe-webhook", body=raw, headers=headers).json["duplicate"]
    assert stack.call("POST", "handle-stripe-webhook", body=raw,
                      headers={"Stripe-Signature": "t=1,v1=00"}).status == 400
    dispute = json.loads((mr.ROOT / "tests/fixtures/stripe_charge_dispute_created.json").read_text())
    dispute["id"] = "evt_" + uuid.uuid4().hex
    raw_dispute = json.dumps(dispute).encode()
    assert stack.call("POST", "handle-stripe-webhook", body=raw_dispute,
                      headers=stack.stripe_headers(raw_dispute)).json == {"received": True}
    sid = wait_until(lambda: stack.sql("SELECT s.id::text FROM public.subscriptions s "
                                       "JOIN public.instances i ON i.subscription_id = s.id "
                                       "WHERE s.account_id = %s AND i.status = 'running'", account),
                     timeout=10, what="running")[0][0]
    tok = stack.jwt()
    assert stack.call("POST", "provision-instance", json={"subscription_id": sid, "wait": True},
                      token=tok).status == 200
    assert stack.call("POST", "deprovision-instance", json={"subscription_id": sid, "mode": "stop",
                                                             "wait": True}, token=tok).status == 200
    assert stack.call("GET", "check-instance-health", token=tok).status == 200
    for fn in ("create-checkout-session", "create-portal-session"):
        assert stack.call("POST", fn, json={}, token=stack.jwt(role="authenticated",
                                                                sub=account)).status in (400, 404, 503)
    assert stack.call("GET", "list-plans").status == 200
    assert stack.call_provisioner("GET", "/apps/mindroom-000000000000").status in (200, 404)
    assert stack.call_admin("/ready").status == 200

    after = scrape(stack)
    promtool(after)
    for fn in ("handle-stripe-webhook", "provision-instance", "deprovision-instance",
               "check-instance-health", "create-checkout-session", "create-portal-session",
               "list-plans", "dokku-provisioner", "mindroom-admin"):
        assert sum(v for name, l, v in samples(after) if name == "mindroom_http_requests_total"
                   and l["function"] == fn) > 0, fn
        assert value(after, "mindroom_build_info", function=fn,
                     version=(mr.build_dir() / "version.stamp").read_text().split()[0]) == 1
    # What the webhook saw, by type and outcome.
    t = "customer.subscription.created"
    for outcome, n in (("processed", 1), ("duplicate", 1)):
        assert value(after, "mindroom_stripe_events_total", type=t, outcome=outcome) - \
            value(before, "mindroom_stripe_events_total", type=t, outcome=outcome) == n
    assert value(after, "mindroom_stripe_events_total", type="unknown", outcome="invalid") - \
        value(before, "mindroom_stripe_events_total", type="unknown", outcome="invalid") == 1
    # A dispute has a type of its own, for an alert to count.
    assert value(after, "mindroom_stripe_events_total", type="charge.dispute.created",
                 outcome="processed") - value(before, "mindroom_stripe_events_total",
                                              type="charge.dispute.created", outcome="processed") == 1
    assert value(after, "mindroom_http_requests_total", function="handle-stripe-webhook", code="4xx") - \
        value(before, "mindroom_http_requests_total", function="handle-stripe-webhook", code="4xx") == 1
    # The worker's provisioner calls: the create, the stop.
    for route in ("POST /apps", "POST /apps/{app}/stop"):
        assert value(after, "mindroom_provisioner_calls_total", route=route, outcome="ok") > \
            value(before, "mindroom_provisioner_calls_total", route=route, outcome="ok"), route
        assert value(after, "mindroom_provisioner_call_duration_seconds_count", route=route) > 0
    # The operator's health round, counted where it ran.
    assert value(after, "mindroom_health_rounds_total", function="check-instance-health") - \
        value(before, "mindroom_health_rounds_total", function="check-instance-health") == 1


def test_owed_work_and_deferred_events_are_read_from_the_database(stack, prov):
    stack.sql("UPDATE public.lifecycle_limits SET max_in_flight = 0 WHERE scope = 'global'")
    try:
        sid = new_subscription(stack, "starter")
        r = stack.call("POST", "provision-instance", json={"subscription_id": sid}, token=stack.jwt())
        assert r.status == 202, r
        time.sleep(1.1)
        text = scrape(stack)
        promtool(text)
        assert value(text, "mindroom_owed_work", action="create") >= 1
        assert value(text, "mindroom_owed_work_oldest_seconds", action="create") >= 1.0
        assert value(text, "mindroom_owed_work_in_flight", action="create") == 0
    finally:
        stack.sql("UPDATE public.lifecycle_limits SET max_in_flight = 8 WHERE scope = 'global'")
    wait_until(lambda: stack.sql("SELECT status::text FROM public.instances WHERE subscription_id = %s",
                                 sid) == [("running",)], timeout=10, what="running")
    # An event of a customer no account is linked to yet is deferred: Stripe retries it.
    deferred = value(scrape(stack), "mindroom_stripe_events_stored", status="deferred")
    raw, headers = signed_event(stack, None)
    assert stack.call("POST", "handle-stripe-webhook", body=raw, headers=headers).status == 503
    text = scrape(stack)
    assert value(text, "mindroom_stripe_events_stored", status="deferred") == deferred + 1
    assert value(text, "mindroom_stripe_events_oldest_seconds", status="deferred") >= 0
    assert value(text, "mindroom_instances", status="running") >= 1
    assert value(text, "mindroom_database_up") == 1 and value(text, "mindroom_schema_migrations_missing") == 0


def test_each_provisioner_target_says_whether_it_answers_its_instances_and_its_room(pg, resend):
    # Two targets: "spare", which stopped answering, and "full", where new instances
    # go while it has room (targets that answer first). Three instances are made on
    # "full", one of them is deprovisioned (it holds no room), and its capacity is
    # set to leave 500 MB; then one instance's plan is upgraded past what is free
    # there (placement never overfills a host, an upgrade in place can). /metrics
    # says per target what `mindroomctl target list` says, in bytes.
    full, spare = ProvisionerStandin().start(), ProvisionerStandin().start()
    env = stack_env(full, resend, FULL_TOKEN=full.token, SPARE_TOKEN=spare.token,
                    DOKKU_PROVISIONER_URL="http://127.0.0.1:9")
    try:
        with mr.Stack(pg, env=env, functions=["provision-instance", WORKER, "mindroom-admin"],
                      test_target=False) as s:
            text = scrape(s)
            promtool(text)
            assert not [x for x in samples(text) if x[0].startswith("mindroom_target_")]
            for name, p in (("full", full), ("spare", spare)):
                s.sql("INSERT INTO public.provisioner_targets (name, url, token_ref, capacity_mb) "
                      "VALUES (%s, %s, %s, 100000)", name, p.url, "env:%s_TOKEN" % name.upper())
            s.sql("UPDATE public.provisioner_targets SET unanswered_since = now() - interval '5 min' "
                  "WHERE name = 'spare'")
            sids = [new_subscription(s, "starter") for _ in range(3)]
            for sid in sids:
                assert provision(s, sid).status == 202
                wait_until(lambda: instance(s, sid)["status"] == "running", timeout=20,
                           what="instance of %s running" % sid)
            assert len(full.create_calls()) == 3 and spare.recorded() == []
            s.sql("UPDATE public.instances SET status = 'deprovisioning' WHERE subscription_id = %s",
                  sids[2])
            s.sql("UPDATE public.instances SET status = 'deprovisioned', deprovisioned_at = now() "
                  "WHERE subscription_id = %s", sids[2])
            reserved = s.sql("SELECT coalesce(memory_limit_mb, 0) + coalesce(homeserver_memory_mb, 0) "
                             "FROM public.instances WHERE subscription_id = %s", sids[0])[0][0]
            assert reserved > 0
            capacity = 2 * reserved + 500
            s.sql("UPDATE public.provisioner_targets SET capacity_mb = %s WHERE name = 'full'",
                  capacity)

            text = scrape(s)
            promtool(text)
            mib = 1048576
            for name, answering, n, cap, free, over in (
                    ("full", 1, 2, capacity, 500, 0),
                    ("spare", 0, 0, 100000, 100000, 0)):
                assert value(text, "mindroom_target_answering", target=name) == answering, name
                assert value(text, "mindroom_target_instances", target=name) == n, name
                assert value(text, "mindroom_target_memory_capacity_bytes", target=name) == cap * mib
                assert value(text, "mindroom_target_memory_free_bytes", target=name) == free * mib
                assert value(text, "mindroom_target_overfilled", target=name) == over, name

            # An upgrade in place on the full host: 1000 MB more where 500 are free.
            s.sql("UPDATE public.instances SET memory_limit_mb = memory_limit_mb + 1000 "
                  "WHERE subscription_id = %s", sids[0])
            text = scrape(s)
            promtool(text)
            assert value(text, "mindroom_target_overfilled", target="full") == 1
            assert value(text, "mindroom_target_memory_free_bytes", target="full") == -500 * mib
            assert value(text, "mindroom_target_overfilled", target="spare") == 0
            # `mindroomctl target list` reads the same summary.
            listed = {r[0]: r[1:] for r in s.sql(
                "SELECT name, free_mb, instances FROM public.target_summary()")}
            assert listed == {"full": (-500, 2), "spare": (100000, 0)}
    finally:
        full.stop()
        spare.stop()


def test_the_documented_alerts_are_rules_over_metrics_we_export(stack, tmp_path):
    doc = (mr.ROOT / "docs" / "install.md").read_text()
    m = re.search(r"alerts to start from:\n\n```yaml\n(.*?)```", doc, re.S)
    assert m, "docs/install.md has no alert rules"
    rules = tmp_path / "alerts.yml"
    rules.write_text(m.group(1))
    p = subprocess.run(["promtool", "check", "rules", str(rules)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr
    exported = set(re.findall(r"^# TYPE (\S+) ", scrape(stack), re.M))
    used = set(re.findall(r"\b(mindroom_[a-z_]+)", m.group(1)))
    assert used and used <= exported, used - exported


def documented_alerts_fire(tmp_path, tests):
    """Runs promtool's rule tests (`tests`: its `tests` list) against the alert
    rules docs/install.md documents."""
    doc = (mr.ROOT / "docs" / "install.md").read_text()
    (tmp_path / "alerts.yml").write_text(
        re.search(r"alerts to start from:\n\n```yaml\n(.*?)```", doc, re.S).group(1))
    spec = tmp_path / "alerts_test.yml"
    spec.write_text(json.dumps({"rule_files": ["alerts.yml"], "tests": tests}))
    p = subprocess.run(["promtool", "test", "rules", str(spec)], capture_output=True, text=True,
                       timeout=30)
    assert p.returncode == 0, p.stdout + p.stderr


def test_the_failing_checks_alert_fires_for_a_flapping_instance_not_a_blip(tmp_path):
    """The documented alert on failing health checks: one instance failing every
    other round for an hour (never marked failed) and one failing for good fire it;
    one check that failed once does not."""
    series = {"flapping": "0 1 " * 35, "down": "0 " + "1 " * 70, "blip": "0 " * 20 + "1 " + "0 " * 50}
    documented_alerts_fire(tmp_path, [{
        "interval": "1m",
        "input_series": [{"series": 'mindroom_instances_running{health="failing"}',
                          "values": values.strip()}],
        "alert_rule_test": [{
            "eval_time": "70m", "alertname": "MindRoomInstancesFailingChecks",
            "exp_alerts": [] if name == "blip" else [{
                "exp_labels": {"severity": "ticket", "health": "failing"},
                "exp_annotations": {"summary": "Running instances failed their health checks "
                                               "for half of the last hour or more"}}]}]}
        for name, values in series.items()])


def test_a_failed_or_refused_stripe_event_pages_a_processed_one_does_not(tmp_path):
    """The documented alert on Stripe events that cannot apply fires for an event
    recorded failed (an unknown price) or refused, on whichever worker counted it,
    and not for processed events."""
    def counter(type_, outcome, fn, values):
        return {"series": 'mindroom_stripe_events_total{function="%s",type="%s",outcome="%s"}'
                          % (fn, type_, outcome), "values": values}
    t = "customer.subscription.created"
    documented_alerts_fire(tmp_path, [{
        "interval": "1m",
        "input_series": [counter(t, "processed", "w1", "0+5x30"),
                         counter(t, "failed", "w2", "0 0 0 0 0 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1 1")],
        "alert_rule_test": [
            {"eval_time": "10m", "alertname": "MindRoomStripeEventFailed", "exp_alerts": [{
                "exp_labels": {"severity": "page", "type": t, "outcome": "failed"},
                "exp_annotations": {"summary": "Stripe %s events failed in the last 15 minutes" % t}}]},
            {"eval_time": "29m", "alertname": "MindRoomStripeEventFailed", "exp_alerts": []}]}])


def test_ready_names_missing_migrations_and_dead_functions(stack, tmp_path):
    r = stack.call_admin("/ready")
    assert r.status == 200 and r.json["status"] == "ready", r
    assert r.json["checks"]["schema"]["missing"] == [] and r.json["checks"]["database"] == "ok"
    assert r.json["checks"]["functions"]["handle-stripe-webhook"] == "running"
    # A migration not applied.
    row = stack.sql("SELECT version, name, statements FROM supabase_migrations.schema_migrations "
                    "WHERE version = '090'")
    stack.sql("DELETE FROM supabase_migrations.schema_migrations WHERE version = '090'")
    try:
        r = stack.call_admin("/ready")
        assert r.status == 503 and r.json["error"]["code"] == "not_ready", r
        assert r.json["checks"]["schema"]["missing"] == ["090"]
    finally:
        stack.sql("INSERT INTO supabase_migrations.schema_migrations (version, name, statements) "
                  "VALUES (%s, %s, %s)", *row[0])
    assert stack.call_admin("/ready").status == 200
    # A process that was killed leaves its counters: not ready until it is back.
    e = {k: os.environ[k] for k in mr.INHERITED_ENV if k in os.environ}
    e.update(MR_METRICS_DIR=str(stack.run / "metrics"), MR_SOCKET=str(tmp_path / "noop.sock"),
             MR_WORKERS="1")
    log = tmp_path / "noop.log"
    p = mr.start_by_hand([str(mr.build_dir() / "bin/noop")], e, log, start_new_session=True)
    try:
        wait_until(lambda: (stack.run / "metrics/noop.metrics").exists(), timeout=10, what="segment")
        assert stack.call_admin("/ready").json["checks"]["functions"]["noop"] == "running"
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
        r = stack.call_admin("/ready")
        assert r.status == 503 and r.json["checks"]["functions"]["noop"] == "dead", r
        assert 'function="noop"' not in scrape(stack)  # a dead process's counters are not exported
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
        (stack.run / "metrics/noop.metrics").unlink(missing_ok=True)
    mr.assert_no_sanitizer_report(log)   # what it did before it was killed
    assert stack.call_admin("/ready").status == 200


def test_a_schema_older_than_schema_versions_counts_as_missing_migrations(stack):
    """A database older than migration 090 has no public.schema_versions(): /ready
    says the schema is older than this build, and /metrics must not say that no
    migration is missing (an alert on mindroom_schema_migrations_missing > 0 would
    stay silent)."""
    known = value(scrape(stack), "mindroom_schema_migrations_missing")
    assert known == 0
    stack.sql("ALTER FUNCTION public.schema_versions() RENAME TO schema_versions_gone")
    try:
        r = stack.call_admin("/ready")
        assert r.status == 503 and "older than this build" in r.json["error"]["message"], r
        text = scrape(stack)
        promtool(text)
        assert value(text, "mindroom_database_up") == 1
        # Every migration this build knows.
        assert value(text, "mindroom_schema_migrations_missing") == \
            len(list((mr.ROOT / "sql/migrations").glob("*.sql"))), text
    finally:
        stack.sql("ALTER FUNCTION public.schema_versions_gone() RENAME TO schema_versions")
    assert stack.call_admin("/ready").status == 200
    assert value(scrape(stack), "mindroom_schema_migrations_missing") == 0


def test_ready_requires_the_functions_it_is_told_to(stack):
    stack.env["MR_READY_FUNCTIONS"] = "list-plans,handle-stripe-webhook,no-such-function"
    try:
        stack.restart_function("mindroom-admin")
        r = stack.call_admin("/ready")
        assert r.status == 503 and r.json["checks"]["functions"]["no-such-function"] == "not running", r
    finally:
        del stack.env["MR_READY_FUNCTIONS"]
        stack.restart_function("mindroom-admin")
    assert stack.call_admin("/ready").status == 200


def test_ready_follows_the_database(stack):
    # Last in this module: it stops the session's PostgreSQL for a moment.
    assert stack.call_admin("/ready").status == 200
    before = scrape(stack)
    stack.stop_db()
    try:
        r = stack.call_admin("/ready")
        assert r.status == 503 and r.json["error"]["code"] == "not_ready", r
        assert "database unavailable" in r.json["error"]["message"]
        assert r.json["checks"]["database"].startswith("database unavailable")
        text = scrape(stack)   # the counters do not need the database
        promtool(text)
        assert value(text, "mindroom_database_up") == 0
        assert value(text, "mindroom_db_errors_total", function="mindroom-admin", **{"class": "08"}) > \
            value(before, "mindroom_db_errors_total", function="mindroom-admin", **{"class": "08"})
    finally:
        stack.start_db()
    wait_until(lambda: stack.call_admin("/ready").status == 200, timeout=15, interval=0.2,
               what="/ready back to 200")
    assert value(scrape(stack), "mindroom_database_up") == 1
