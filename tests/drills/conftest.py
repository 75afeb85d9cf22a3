"""Failure drills (`make drills`, scripts/drills.sh): the integration harness
(tests/integration/mr.py and its helpers) shared rather than copied.
tests/integration/conftest.py is loaded under another name (two modules called
conftest would collide) for its failure-report hook; `pg` is the same cluster
with one difference that matters when the database is killed: commits are
durable against a server crash (synchronous_commit on, as in production)."""
import importlib.util
import os
import sys

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
INTEGRATION = os.path.join(HERE, "..", "integration")
sys.path.insert(0, HERE)
sys.path.insert(0, INTEGRATION)
sys.path.insert(0, os.path.join(HERE, "..", "standins"))

_spec = importlib.util.spec_from_file_location("integration_conftest",
                                               os.path.join(INTEGRATION, "conftest.py"))
_ic = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(_ic)

import mr  # noqa: E402


@pytest.fixture(scope="session")
def pg():
    """The integration cluster (fsync off for speed: only an OS crash could lose
    data) with synchronous_commit back on: with it off, a commit is acknowledged
    before its WAL leaves shared memory, and killing the server loses the last
    ~200 ms of acknowledged commits. The PostgreSQL drill found exactly that."""
    cluster = mr.Cluster()
    try:
        cluster.sql("ALTER SYSTEM SET synchronous_commit = on")
        cluster.sql("SELECT pg_reload_conf()")
        cluster.make_template()
        yield cluster
    finally:
        cluster.destroy()


pytest_runtest_makereport = _ic.pytest_runtest_makereport
prov = _ic.prov  # the provisioner stand-in, one per drill module
