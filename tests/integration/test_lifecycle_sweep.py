"""The periodic sweep (the real check-instance-health) finishing lifecycle work that
a call left: a worker killed mid-provision, a failure after its backoff, an owed
welcome email. The sweep only asks; the lifecycle's lease decides who works."""
import time

import pytest

import mr
from lifecycle_helpers import (kill_workers_mid_provision, instance, new_subscription,
                               owed, provision, stack_env, wait_status, wait_until)

FUNCS = ["provision-instance", "deprovision-instance", "check-instance-health"]


@pytest.fixture(scope="module")
def stack(pg, prov, resend):
    env = stack_env(prov, resend,
                    MINDROOM_BASE_DOMAIN=prov.domain,
                    # Probes of the stand-in's URLs cannot succeed here; they must
                    # not turn into redeploys while these tests look at the sweep.
                    HEALTH_FAILURE_THRESHOLD="1000", HEALTH_TIMEOUT_MS="300",
                    SWEEP_CALL_TIMEOUT_MS="2000")
    with mr.Stack(pg, env=env, functions=FUNCS) as s:
        yield s


@pytest.fixture(autouse=True)
def fresh(stack, prov, resend):
    stack.sql("DELETE FROM public.instances")
    prov.reset()
    resend.reset()
    yield
    prov.release()


def sweep(stack):
    r = stack.call("POST", "check-instance-health", json={}, token=stack.jwt())
    assert r.status == 200, r
    return r.json["sweep"]


def items_for(result, sid, stack):
    iid = str(instance(stack, sid)["id"])
    return [i for i in result["items"] if i["instance_id"] == iid]


def test_the_sweep_finishes_a_provision_whose_worker_was_killed(stack, prov):
    sid = new_subscription(stack, "starter")
    kill_workers_mid_provision(stack, prov, sid)

    # The dead worker's lease is live: the sweep asks nobody.
    assert items_for(sweep(stack), sid, stack) == []
    assert len(prov.create_calls()) == 1
    # Once it has expired, the sweep asks and the instance is finished, with one app.
    wait_until(lambda: owed(stack, sid), timeout=6, what="lease expiry")
    asked = items_for(sweep(stack), sid, stack)
    assert [(i["action"], i["function"], i["http_status"]) for i in asked] == \
        [("create", "provision-instance", 202)]
    inst = wait_status(stack, sid, "running")
    assert list(prov.apps) == [inst["dokku_app_name"]]
    assert len(prov.create_calls()) == 2


def test_the_sweep_retries_a_failure_only_after_its_backoff(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("fail")
    assert provision(stack, sid).status == 202
    wait_status(stack, sid, "failed")
    assert items_for(sweep(stack), sid, stack) == []      # backoff: 1 s
    assert len(prov.create_calls()) == 1
    time.sleep(1.1)
    asked = items_for(sweep(stack), sid, stack)
    assert [i["action"] for i in asked] == ["create"]
    inst = wait_status(stack, sid, "running")
    assert inst["attempts"] == 0 and inst["last_error"] is None
    assert items_for(sweep(stack), sid, stack) == []


def test_the_sweep_leaves_a_rejected_request_to_an_operator(stack, prov):
    sid = new_subscription(stack, "starter")
    prov.next("reject")
    assert provision(stack, sid).status == 202
    wait_status(stack, sid, "failed")
    time.sleep(1.1)
    assert items_for(sweep(stack), sid, stack) == []
    assert len(prov.create_calls()) == 1


def test_the_sweep_sends_an_owed_welcome_email_once(stack, prov, resend):
    sid = new_subscription(stack, "starter")
    resend.behave("fail")
    assert provision(stack, sid).status == 202
    wait_until(lambda: instance(stack, sid)["welcome_email_error"], what="email failure")
    wait_status(stack, sid, "running")
    resend.behave("ok")
    wait_until(lambda: owed(stack, sid), timeout=3, what="email due")
    asked = items_for(sweep(stack), sid, stack)
    assert [i["action"] for i in asked] == ["email"]
    wait_until(lambda: instance(stack, sid)["welcome_email_sent_at"], what="email sent")
    assert len(resend.delivered) == 1
    n = len(resend.requests)
    assert items_for(sweep(stack), sid, stack) == []
    time.sleep(0.3)
    assert len(resend.requests) == n
    assert len(prov.create_calls()) == 1
