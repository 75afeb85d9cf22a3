"""A request that serializes an account's requests (a tenant's restart, a checkout)
against a concurrent transaction that holds what the request locks next and then
writes a row referencing the account (an audit row): both finish, neither
deadlocks. Two real connections, made the way the functions and the worker make
them."""
import threading
import time
import uuid

import psycopg2
import pytest

from schema_cluster import Cluster, SEED

SEED_ACCOUNT = "5eed5eed-0000-4000-8000-000000000001"
SEED_SUB = "5eed5eed-0000-4000-8000-000000000101"


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    try:
        assert c.migrate("mindroom").returncode == 0
        assert c.psql_file("mindroom", SEED).returncode == 0
        yield c
    finally:
        c.close()


@pytest.fixture
def instance(cluster):
    iid = str(uuid.uuid4())
    cluster.sql("mindroom", """
        INSERT INTO instances (id, subscription_id, dokku_app_name, subdomain, status)
        SELECT %s, %s, n.dokku_app_name, n.subdomain, 'running' FROM instance_names(%s) n""",
                (iid, SEED_SUB, SEED_SUB))
    yield iid
    cluster.sql("mindroom", "DELETE FROM instances WHERE id = %s", (iid,))


def session(cluster, role, claims):
    """A connection as the functions make one: authenticator, the request's role and
    claims for the transaction."""
    conn = psycopg2.connect(cluster.conninfo("mindroom", "authenticator"))
    cur = conn.cursor()
    cur.execute("SET statement_timeout = '20s'")
    conn.commit()
    cur.execute("SELECT set_config('role', %s, true), set_config('request.jwt.claims', %s, true)",
                (role, claims))
    return conn, cur


def in_thread(conn, cur, query, params):
    """Runs query in its own thread and commits; returns (thread, outcome list)."""
    out = []

    def run():
        try:
            cur.execute(query, params)
            out.append(cur.fetchone()[0])
            conn.commit()
        except psycopg2.Error as e:
            out.append(e)

    t = threading.Thread(target=run)
    t.start()
    return t, out


def wait_blocked(cluster, pid):
    """Until the backend pid waits for a lock (the request holds the account and
    waits for what the other transaction holds)."""
    deadline = time.time() + 10
    while time.time() < deadline:
        if cluster.sql("mindroom", "SELECT wait_event_type = 'Lock' FROM pg_stat_activity WHERE pid = %s",
                       (pid,)) == [(True,)]:
            return
        time.sleep(0.05)
    pytest.fail("the request never waited for the held row")


def test_a_restart_while_the_worker_finishes_a_step_of_the_instance_does_not_deadlock(cluster, instance):
    # The worker: holds the instance row (lifecycle_finish) ...
    worker, wcur = session(cluster, "service_role", '{"role": "service_role"}')
    wcur.execute("SELECT 1 FROM public.instances WHERE id = %s FOR UPDATE", (instance,))
    # ... while the tenant asks for a restart (locks the account, then waits for the row) ...
    tenant, tcur = session(cluster, "authenticated",
                           '{"role": "authenticated", "sub": "%s"}' % SEED_ACCOUNT)
    t, out = in_thread(tenant, tcur, "SELECT public.tenant_instance_restart(NULL)", None)
    wait_blocked(cluster, tenant.get_backend_pid())
    # ... and the worker writes the account's audit row and commits.
    wcur.execute("INSERT INTO public.audit_logs (account_id, action, details) "
                 "VALUES (%s, 'instance.status_changed', '{}')", (SEED_ACCOUNT,))
    worker.commit()
    t.join()
    worker.close()
    tenant.close()
    assert len(out) == 1 and not isinstance(out[0], psycopg2.Error), out
    assert out[0]["outcome"] == "ok"
    assert out[0]["my_instance"]["instance"]["restart"]["pending"] is True


def test_a_checkout_while_another_checkout_of_the_account_succeeds_does_not_deadlock(cluster):
    service = '{"role": "service_role"}'
    first, fcur = session(cluster, "service_role", service)
    fcur.execute("SELECT public.billing_attempt_begin(%s, 'checkout', %s)",
                 (SEED_ACCOUNT, uuid.uuid4().hex * 2))
    attempt = fcur.fetchone()[0]["attempt_id"]
    first.commit()
    # The first checkout's answer from Stripe is being recorded (the attempt row held) ...
    fcur.execute("SELECT set_config('role', 'service_role', true), "
                 "set_config('request.jwt.claims', %s, true)", (service,))
    fcur.execute("SELECT 1 FROM public.billing_attempts WHERE id = %s FOR UPDATE", (attempt,))
    # ... while another tab starts a checkout of another plan (locks the account, then
    # waits to mark the first attempt abandoned) ...
    second, scur = session(cluster, "service_role", service)
    t, out = in_thread(second, scur, "SELECT public.billing_attempt_begin(%s, 'checkout', %s)",
                       (SEED_ACCOUNT, uuid.uuid4().hex * 2))
    wait_blocked(cluster, second.get_backend_pid())
    # ... and the first records its session (and its audit row) and commits.
    fcur.execute("SELECT public.billing_attempt_succeeded(%s, 'cs_test_first', "
                 "'https://checkout.stripe.com/c/pay/cs_test_first', "
                 "extract(epoch FROM now() + interval '1 day')::bigint, false)", (attempt,))
    first.commit()
    t.join()
    first.close()
    second.close()
    assert len(out) == 1 and not isinstance(out[0], psycopg2.Error), out
    assert out[0]["state"] == "send" and out[0]["resumed"] is False
    assert cluster.sql("mindroom", "SELECT status, object_id FROM billing_attempts WHERE id = %s",
                       (attempt,)) == [("succeeded", "cs_test_first")]
