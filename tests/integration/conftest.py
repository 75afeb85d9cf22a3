"""Fixtures shared by every integration test (the API is in mr.py's docstring).

    def test_x(pg): ...                               # the session cluster
    @pytest.fixture(scope="module")
    def stack(pg, prov):
        with mr.Stack(pg, env={"DOKKU_PROVISIONER_URL": prov.url, ...}) as s:
            yield s

Stand-ins (tests/standins/), one per test module: `prov` (the provisioner),
`resend` (Resend), `health_standin` (instances' health endpoints);
`fresh_standins` resets the first two around a test of a module whose `stack`
runs the lifecycle.
"""

import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.join(HERE, "..", "standins"))
import mr  # noqa: E402
from health import HealthStandin  # noqa: E402
from provisioner import ProvisionerStandin  # noqa: E402
from resend import ResendStandin  # noqa: E402


@pytest.fixture(scope="session")
def pg():
    """A throwaway PostgreSQL cluster (fsync off, unix socket only) holding
    `mindroom_template`: every migration applied and the seed loaded. Stacks
    clone it, so each starts from the same fresh database. With
    MR_TEST_POOLER=transaction the functions reach it through PgBouncer in
    transaction mode (mr.Pooler)."""
    cluster = mr.Cluster()
    try:
        cluster.make_template()
        if os.environ.get("MR_TEST_POOLER") == "transaction":
            cluster.pooler = mr.Pooler(cluster)
        yield cluster
    finally:
        if getattr(cluster, "pooler", None) is not None:
            cluster.pooler.stop()
        cluster.destroy()


@pytest.fixture(scope="module")
def prov():
    with ProvisionerStandin() as p:
        yield p


@pytest.fixture(scope="module")
def resend():
    with ResendStandin() as r:
        yield r


@pytest.fixture(scope="module")
def health_standin():
    with HealthStandin() as h:
        yield h


@pytest.fixture
def fresh_standins(stack, prov, resend):
    """Each test starts with nothing owed: a worker that finishes its own steps
    drains owed work, and must not pick up what an earlier test left behind."""
    stack.wipe_instances()
    prov.reset()
    resend.reset()
    yield
    prov.release()
    resend.release()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test fails, attach the tails of every running stack's logs
    (function stderr, nginx errors) to its report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and mr.LIVE_STACKS:
        for s in mr.LIVE_STACKS:
            rep.sections.append(("stack logs %s" % s.run, s.all_logs()))


def pytest_configure(config):
    config.addinivalue_line(
        "markers", "database_free: the module's stacks run only functions that never connect "
                   "to PostgreSQL (mr.DATABASE_FREE_FUNCTIONS: the provisioner); the pooler "
                   "suite deselects it")


@pytest.fixture(scope="module", autouse=True)
def database_free(request):
    """A module marked database_free may start stacks of database-free functions
    only (mr.Stack refuses others while this is set), so that deselecting it from
    the pooler suite never drops a test that goes through the pooler."""
    mr.DATABASE_FREE_MODULE = request.node.get_closest_marker("database_free") is not None
    yield
    mr.DATABASE_FREE_MODULE = False


def pytest_collection_modifyitems(config, items):
    """The pooler suite (MR_TEST_POOLER=transaction) repeats only the tests that
    reach the session cluster (`pg`), the one cluster the pooler stands in front
    of, through a function. The others start their own PostgreSQL (stack.sh, the
    migration runner, the Supabase CLI) or none, or run only functions that never
    connect to it (marked database_free: the provisioner's suites), so they cannot
    differ behind a pooler; they ran in the integration suite and are deselected
    here, not skipped."""
    if os.environ.get("MR_TEST_POOLER") != "transaction":
        return
    kept, dropped = [], []
    for i in items:
        (kept if "pg" in getattr(i, "fixturenames", ()) and not i.get_closest_marker("database_free")
         else dropped).append(i)
    if dropped:
        config.hook.pytest_deselected(items=dropped)
        items[:] = kept
