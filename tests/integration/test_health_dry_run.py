"""The health round and a provisioner in dry-run mode, as `make run` runs them on a
machine without dokku (DOKKU_MODE unset, no MINDROOM_BASE_DOMAIN for the probes).

A dry run deploys nothing, so nothing answers at the URLs it hands back. What a
user of the local stack would notice if those instances were probed: every one of
them marked failed at the threshold and redeployed, again and again. Instead the
round leaves them out, and an explicit probe of one says why.
"""
import re
import time

import pytest

import mr
from lifecycle_helpers import (FAST_ENV, WORKER, instance, new_subscription, provision,
                               wait_status, wait_until)

INTERVAL_S = 1
THRESHOLD = 2
FUNCS = ["provision-instance", "check-instance-health", "dokku-provisioner", WORKER]


@pytest.fixture(scope="module")
def stack(pg):
    env = dict(FAST_ENV, HEALTH_INTERVAL_S=str(INTERVAL_S),
               HEALTH_FAILURE_THRESHOLD=str(THRESHOLD))
    with mr.Stack(pg, env=env, functions=FUNCS) as s:
        yield s


def rounds(s):
    """The worker's health rounds so far: the number each one checked."""
    return [int(n) for n in re.findall(r'"msg":"health round: (\d+) checked', s.log(WORKER))]


def test_a_dry_run_instance_is_left_out_of_the_rounds_and_never_redeployed(stack):
    s = stack
    assert "dry_run: true" in s.log("dokku-provisioner")
    sid = new_subscription(s)
    r = provision(s, sid)
    assert r.status in (200, 201, 202), r
    inst = wait_status(s, sid, "running", timeout=10)
    iid = str(inst["id"])
    assert inst["backend_url"] and inst["matrix_server_url"]
    assert s.sql("SELECT dry_run FROM public.instances WHERE id = %s", iid) == [(True,)]

    # More rounds than the threshold, each an interval apart, with the instance running.
    seen = len(rounds(s))
    wait_until(lambda: len(rounds(s)) >= seen + THRESHOLD + 2, timeout=(THRESHOLD + 2) * INTERVAL_S + 10,
               what="%d more health rounds" % (THRESHOLD + 2))
    checked = rounds(s)[seen:]
    assert checked == [0] * len(checked)        # none of them probed it
    now = instance(s, sid)
    assert now["status"] == "running" and now["owed_action"] in (None, "email"), now
    assert s.sql("SELECT consecutive_failures, last_health_check, health_status FROM public.instances"
                 " WHERE id = %s", iid) == [(0, None, None)]
    changes = s.sql("SELECT details->>'to' FROM public.audit_logs WHERE action = 'instance.status_changed'"
                    " AND details->>'instance_id' = %s", iid)
    assert "failed" not in [c for (c,) in changes], changes
    created = [line for line in s.log("dokku-provisioner").splitlines()
               if 'would run: dokku apps:create %s"' % inst["dokku_app_name"] in line]
    assert len(created) == 1, created           # created once, never redeployed

    # An operator asking for this instance is told why it is not probed.
    r = s.call("GET", "check-instance-health?instance_id=%s" % iid, token=s.jwt())
    assert r.status == 409, r
    assert r.json["error"]["code"] == "not_running"
    assert "dry-run" in r.json["error"]["message"], r.json
    assert s.sql("SELECT consecutive_failures, last_health_check FROM public.instances WHERE id = %s",
                 iid) == [(0, None)]
