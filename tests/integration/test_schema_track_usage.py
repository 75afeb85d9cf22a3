"""track_usage under concurrent calls from many connections, made the way the functions
make them: log in as `authenticator`, switch to service_role per transaction."""
import threading
import uuid

import psycopg2
import pytest

from schema_cluster import Cluster, SEED

SEED_SUB = "5eed5eed-0000-4000-8000-000000000101"
THREADS = 8


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
    """A running instance of the seed's starter subscription (1000 messages a day),
    counters reset; removed afterwards."""
    iid = str(uuid.uuid4())
    cluster.sql("mindroom", """
        UPDATE subscriptions SET current_messages_today = 0, last_reset_at = CURRENT_DATE,
               max_messages_per_day = 1000 WHERE id = %s;
        INSERT INTO instances (id, subscription_id, dokku_app_name, subdomain, status)
        SELECT %s, %s, n.dokku_app_name, n.subdomain, 'running' FROM instance_names(%s) n""",
                (SEED_SUB, iid, SEED_SUB, SEED_SUB))
    yield iid
    cluster.sql("mindroom", "DELETE FROM instances WHERE id = %s", (iid,))


def hammer(cluster, iid, calls_per_thread, agent_of, tool_of):
    """Runs THREADS connections concurrently, each calling track_usage calls_per_thread
    times in its own transactions; returns every (allowed, remaining) answer."""
    answers, errors = [], []
    lock = threading.Lock()
    barrier = threading.Barrier(THREADS)

    def worker(t):
        try:
            conn = psycopg2.connect(cluster.conninfo("mindroom", "authenticator"))
            cur = conn.cursor()
            barrier.wait()
            for i in range(calls_per_thread):
                cur.execute("SELECT set_config('role', 'service_role', true), "
                            "set_config('request.jwt.claims', '{\"role\":\"service_role\"}', true)")
                cur.execute("SELECT allowed, remaining FROM public.track_usage(%s, %s, %s)",
                            (iid, agent_of(t, i), tool_of(t, i)))
                row = cur.fetchone()
                conn.commit()
                with lock:
                    answers.append(row)
            conn.close()
        except Exception as e:  # surfaced below
            with lock:
                errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(THREADS)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert not errors, errors
    return answers


def test_concurrent_calls_lose_no_counts(cluster, instance):
    per = 50
    answers = hammer(cluster, instance, per, lambda t, i: f"agent{t % 2}", lambda t, i: f"tool{i % 5}")
    n = THREADS * per
    assert len(answers) == n
    assert all(a for a, _ in answers)
    # Every call saw a distinct remaining count: the calls were serialized, none lost.
    assert sorted(r for _, r in answers) == list(range(1000 - n, 1000))
    (sent, agents, tools), = cluster.sql("mindroom", """SELECT messages_sent, agents_used, tools_used
        FROM usage_metrics WHERE instance_id = %s AND date = CURRENT_DATE""", (instance,))
    assert sent == n
    assert agents == {"agent0": n // 2, "agent1": n // 2}
    assert tools == {f"tool{k}": THREADS * (per // 5) for k in range(5)}
    assert cluster.sql("mindroom", "SELECT current_messages_today FROM subscriptions WHERE id = %s",
                       (SEED_SUB,)) == [(n,)]


def test_concurrent_calls_stop_exactly_at_the_limit(cluster, instance):
    cluster.sql("mindroom", "UPDATE subscriptions SET max_messages_per_day = 100 WHERE id = %s", (SEED_SUB,))
    answers = hammer(cluster, instance, 30, lambda t, i: "a", lambda t, i: None)
    assert sum(1 for a, _ in answers if a) == 100
    assert sum(1 for a, _ in answers if not a) == THREADS * 30 - 100
    assert all(r == 0 for a, r in answers if not a)
    assert cluster.sql("mindroom", "SELECT messages_sent FROM usage_metrics WHERE instance_id = %s",
                       (instance,)) == [(100,)]
    assert cluster.sql("mindroom", "SELECT current_messages_today FROM subscriptions WHERE id = %s",
                       (SEED_SUB,)) == [(100,)]


def test_concurrent_first_calls_of_a_new_day_reset_once(cluster, instance):
    cluster.sql("mindroom", """UPDATE subscriptions SET current_messages_today = 1000,
                               last_reset_at = CURRENT_DATE - 1 WHERE id = %s""", (SEED_SUB,))
    answers = hammer(cluster, instance, 10, lambda t, i: None, lambda t, i: None)
    n = THREADS * 10
    assert all(a for a, _ in answers), "yesterday's full counter must not block today"
    assert sorted(r for _, r in answers) == list(range(1000 - n, 1000))
    assert cluster.sql("mindroom", "SELECT current_messages_today, last_reset_at = CURRENT_DATE FROM subscriptions "
                                   "WHERE id = %s", (SEED_SUB,)) == [(n, True)]


def test_authenticator_alone_has_no_privileges(cluster, instance):
    conn = psycopg2.connect(cluster.conninfo("mindroom", "authenticator"))
    cur = conn.cursor()
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        cur.execute("SELECT * FROM public.track_usage(%s)", (instance,))
    conn.rollback()
    with pytest.raises(psycopg2.errors.InsufficientPrivilege):
        cur.execute("SELECT id FROM public.accounts")
    conn.close()


def test_user_request_sees_own_rows_only(cluster, instance):
    conn = psycopg2.connect(cluster.conninfo("mindroom", "authenticator"))
    cur = conn.cursor()
    cur.execute("SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                ('{"sub":"5eed5eed-0000-4000-8000-000000000001","role":"authenticated"}',))
    cur.execute("SELECT subdomain FROM public.instances")
    assert len(cur.fetchall()) == 1
    cur.execute("SELECT instance_id FROM public.get_user_instance(%s)", ("5eed5eed-0000-4000-8000-000000000001",))
    assert cur.fetchall() == [(instance,)]
    conn.rollback()
    cur.execute("SELECT set_config('role', 'authenticated', true), set_config('request.jwt.claims', %s, true)",
                ('{"sub":"%s","role":"authenticated"}' % uuid.uuid4(),))
    cur.execute("SELECT subdomain FROM public.instances")
    assert cur.fetchall() == []
    conn.close()
