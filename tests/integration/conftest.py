"""Fixtures shared by every integration test (the API is in mr.py's docstring).

    def test_x(pg): ...                               # the session cluster
    @pytest.fixture(scope="module")
    def stack(pg):
        with mr.Stack(pg, env={"DOKKU_PROVISIONER_URL": ...}) as s:
            yield s
"""

import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mr  # noqa: E402


@pytest.fixture(scope="session")
def pg():
    """A throwaway PostgreSQL cluster (fsync off, unix socket only) holding
    `mindroom_template`: every migration applied and the seed loaded. Stacks
    clone it, so each starts from the same fresh database."""
    cluster = mr.Cluster()
    try:
        cluster.make_template()
        yield cluster
    finally:
        cluster.destroy()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    """When a test fails, attach the tails of every running stack's logs
    (function stderr, nginx errors) to its report."""
    outcome = yield
    rep = outcome.get_result()
    if rep.failed and mr.LIVE_STACKS:
        for s in mr.LIVE_STACKS:
            rep.sections.append(("stack logs %s" % s.run, s.all_logs()))
