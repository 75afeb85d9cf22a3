"""`mindroomctl env unset` while the worker stores the legacy plaintext environment's
value of that very name: whichever takes the instance's row first, the unset stands.
Two real connections, made the way the worker and mr-secrets make them."""
import uuid

import pytest

from test_schema_account_locks import SEED_SUB, cluster, in_thread, session, wait_blocked  # noqa: F401


@pytest.fixture
def instance(cluster):
    iid = str(uuid.uuid4())
    cluster.sql("mindroom", """
        INSERT INTO instances (id, subscription_id, dokku_app_name, subdomain, status, environment_vars)
        SELECT %s, %s, n.dokku_app_name, n.subdomain, 'running', '{"LEAKED": "sk-leaked"}'
          FROM instance_names(%s) n""", (iid, SEED_SUB, SEED_SUB))
    yield iid
    cluster.sql("mindroom", "DELETE FROM instances WHERE id = %s", (iid,))


def sealed(cluster, iid):
    return cluster.sql("mindroom", "SELECT count(*) FROM instance_secrets WHERE instance_id = %s "
                                   "AND kind = 'env' AND name = 'LEAKED'", (iid,))[0][0]


def test_an_unset_while_the_worker_stores_the_name_removes_what_it_stored(cluster, instance):
    # The worker read the column and stores LEAKED: its transaction is not committed yet ...
    worker, wcur = session(cluster, "service_role", '{"role": "service_role"}')
    wcur.execute("SELECT encode(sha256(convert_to(public.instance_plain_env(%s)::text, 'UTF8')), 'hex')",
                 (instance,))
    was = wcur.fetchone()[0]
    wcur.execute("SELECT public.instance_plain_env_put(%s, 'LEAKED', 'mrs1:00000000:L', 'mrd1:00000000:l', %s)",
                 (instance, was))
    assert wcur.fetchone()[0] == "mrs1:00000000:L"
    # ... when the operator unsets it: the unset waits for the store ...
    op, ocur = session(cluster, "service_role", '{"role": "service_role"}')
    t, out = in_thread(op, ocur, "SELECT public.instance_secret_delete(%s, 'env', 'LEAKED')", (instance,))
    wait_blocked(cluster, op.get_backend_pid())
    worker.commit()
    t.join()
    worker.close()
    op.close()
    # ... and removes what it stored.
    assert out == [True], out
    assert sealed(cluster, instance) == 0
    assert cluster.sql("mindroom", "SELECT environment_vars FROM instances WHERE id = %s",
                       (instance,)) == [({},)]


def test_a_store_while_the_unset_runs_stores_nothing(cluster, instance):
    was = cluster.sql("mindroom", "SELECT encode(sha256(convert_to(public.instance_plain_env(%s)::text, "
                                  "'UTF8')), 'hex')", (instance,))[0][0]
    # The unset holds the row, not committed yet ...
    op, ocur = session(cluster, "service_role", '{"role": "service_role"}')
    ocur.execute("SELECT public.instance_secret_delete(%s, 'env', 'LEAKED')", (instance,))
    assert ocur.fetchone()[0] is True
    # ... when the worker stores the value it read before: it waits, then stores nothing.
    worker, wcur = session(cluster, "service_role", '{"role": "service_role"}')
    t, out = in_thread(worker, wcur, "SELECT public.instance_plain_env_put(%s, 'LEAKED', 'mrs1:00000000:L', "
                                     "'mrd1:00000000:l', %s)", (instance, was))
    wait_blocked(cluster, worker.get_backend_pid())
    op.commit()
    t.join()
    worker.close()
    op.close()
    assert out == [None], out
    assert sealed(cluster, instance) == 0
