"""scripts/migrate.sh on a real cluster: records files like the Supabase CLI, applies
nothing twice, applies nothing of a failing file, tolerates concurrent runners, the
statements it records rebuild the same schema, and what the previous release's
binaries call still works once the new migrations are applied."""
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time

import psycopg2
import pytest

from schema_cluster import Cluster, MIGRATE, MIGRATIONS, SEED, migration_files


@pytest.fixture(scope="module")
def cluster():
    c = Cluster()
    yield c
    c.close()


def test_fresh_database_applies_every_file_and_records_it(cluster):
    db = cluster.new_db()
    r = cluster.migrate(db)
    assert r.returncode == 0, r.stderr
    files = migration_files()
    assert f"migrate: {len(files)} applied" in r.stdout
    rows = cluster.sql(db, "SELECT version, name, statements FROM supabase_migrations.schema_migrations ORDER BY version")
    expected = [re.match(r"^(\d+)_(.+)\.sql$", f).groups() for f in files]
    assert [(v, n) for v, n, _ in rows] == expected
    for (v, n, stmts), f in zip(rows, files):
        assert stmts, f"{f}: no statements recorded"
        assert all(s.strip() == s and s and not s.endswith(";") for s in stmts), f
    # Columns exactly as the Supabase CLI's table (its DDL adds statements, then name).
    cols = cluster.sql(db, """SELECT column_name, data_type FROM information_schema.columns
                              WHERE table_schema = 'supabase_migrations' AND table_name = 'schema_migrations'
                              ORDER BY ordinal_position""")
    assert cols == [("version", "text"), ("statements", "ARRAY"), ("name", "text")]
    pk = cluster.sql(db, """SELECT a.attname FROM pg_index i JOIN pg_attribute a
                            ON a.attrelid = i.indrelid AND a.attnum = ANY (i.indkey)
                            WHERE i.indrelid = 'supabase_migrations.schema_migrations'::regclass AND i.indisprimary""")
    assert pk == [("version",)]
    # Plain PostgreSQL has no Realtime: the migrations publish nothing.
    assert cluster.sql(db, "SELECT pubname FROM pg_publication") == []


def test_recorded_statements_rebuild_the_same_schema(cluster):
    db = cluster.new_db()
    assert cluster.migrate(db).returncode == 0
    stmts = cluster.sql(db, "SELECT version, statements FROM supabase_migrations.schema_migrations ORDER BY version")
    db2 = cluster.new_db()
    conn = cluster.connect(db2, autocommit=False)
    with conn.cursor() as cur:
        # The runner's own bookkeeping table, as it creates it (the rest must come
        # from the recorded statements alone).
        cur.execute("CREATE SCHEMA supabase_migrations; CREATE TABLE supabase_migrations.schema_migrations"
                    " (version text NOT NULL PRIMARY KEY, statements text[], name text)")
        for _, ss in stmts:
            for s in ss:
                try:
                    cur.execute(s)
                except psycopg2.ProgrammingError as e:
                    # A comment-only piece (the CLI records a trailing comment too):
                    # the server answers "empty query", which psycopg2 reports as an error.
                    if "empty query" not in str(e):
                        raise
    conn.commit()
    conn.close()
    assert cluster.dump_schema(db2) == cluster.dump_schema(db)


def test_second_run_applies_nothing(cluster):
    db = cluster.new_db()
    assert cluster.migrate(db).returncode == 0
    assert cluster.psql_file(db, os.path.join(os.path.dirname(MIGRATIONS), "seed.sql")).returncode == 0
    before = cluster.dump_schema(db)
    rows_before = cluster.sql(db, "SELECT * FROM supabase_migrations.schema_migrations ORDER BY version")
    r = cluster.migrate(db)
    assert r.returncode == 0, r.stderr
    assert "migrate: 0 applied" in r.stdout
    assert cluster.dump_schema(db) == before
    assert cluster.sql(db, "SELECT * FROM supabase_migrations.schema_migrations ORDER BY version") == rows_before


def test_seed_twice_is_harmless(cluster):
    db = cluster.new_db()
    assert cluster.migrate(db).returncode == 0
    seed = os.path.join(os.path.dirname(MIGRATIONS), "seed.sql")
    q = """SELECT (SELECT count(*) FROM auth.users), (SELECT count(*) FROM accounts),
                  (SELECT count(*) FROM subscriptions), (SELECT count(*) FROM plans),
                  (SELECT count(*) FROM audit_logs)"""
    r1 = cluster.psql_file(db, seed)
    assert r1.returncode == 0, r1.stderr
    after1 = cluster.sql(db, q)
    r2 = cluster.psql_file(db, seed)
    assert r2.returncode == 0, r2.stderr
    assert cluster.sql(db, q) == after1 == [(1, 1, 1, 7, 1)]


def test_failing_file_applies_nothing_of_itself_and_stops(cluster, tmp_path):
    db = cluster.new_db()
    d = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, d)
    (d / "900_bad.sql").write_text(
        "CREATE TABLE public.half_done (id int);\n"
        "INSERT INTO public.half_done VALUES (1);\n"
        "SELECT 1 / 0;\n")
    (d / "901_after.sql").write_text("CREATE TABLE public.after_bad (id int);\n")
    r = cluster.migrate(db, migrations_dir=str(d))
    assert r.returncode != 0
    assert "division by zero" in r.stderr  # PostgreSQL's own error
    assert "900_bad.sql" in r.stderr
    assert cluster.sql(db, "SELECT to_regclass('public.half_done'), to_regclass('public.after_bad')") == [(None, None)]
    versions = [v for (v,) in cluster.sql(db, "SELECT version FROM supabase_migrations.schema_migrations ORDER BY 1")]
    assert versions == [f.split("_")[0] for f in migration_files()]
    # Fixed, the next run applies exactly the two remaining files.
    (d / "900_bad.sql").write_text("CREATE TABLE public.half_done (id int);\n")
    r = cluster.migrate(db, migrations_dir=str(d))
    assert r.returncode == 0, r.stderr
    assert "migrate: 2 applied" in r.stdout
    assert cluster.sql(db, "SELECT count(*) FROM supabase_migrations.schema_migrations WHERE version IN ('900', '901')") == [(2,)]


def test_statement_splitting_honours_quotes_comments_and_dollar_quotes(cluster, tmp_path):
    db = cluster.new_db()
    d = tmp_path / "m"
    d.mkdir()
    (d / "1_tricky.sql").write_text(
        "-- a comment; with a semicolon\n"
        "CREATE TABLE t (a text DEFAULT 'x;y''z', \"b;c\" int);\n"
        "/* block; /* nested; */ still comment; */\n"
        "CREATE FUNCTION f() RETURNS text LANGUAGE plpgsql AS $body$ BEGIN RETURN 'a;b'; END $body$;\n"
        "INSERT INTO t (a) VALUES (E'back\\\\slash\\'; quote'), ($$dollar;$$);\n"
        "-- trailing comment only\n")
    r = cluster.migrate(db, migrations_dir=str(d))
    assert r.returncode == 0, r.stderr
    (stmts,) = cluster.sql(db, "SELECT statements FROM supabase_migrations.schema_migrations WHERE version = '1'")[0]
    # Split as the Supabase CLI splits (tests/integration/test_supabase_cli.py compares
    # with the CLI itself): its tokenizer knows no E'' backslash escapes, so from \' on
    # the rest of the file is one statement, and a trailing comment-only piece is kept.
    assert len(stmts) == 3, stmts
    assert stmts[0].startswith("-- a comment; with a semicolon\nCREATE TABLE t")
    assert stmts[1].endswith("END $body$")
    assert stmts[2].startswith("INSERT INTO t (a) VALUES (E'back")
    assert stmts[2].endswith("($$dollar;$$);\n-- trailing comment only")
    assert cluster.sql(db, "SELECT a FROM t ORDER BY a") == [("back\\slash'; quote",), ("dollar;",)]
    assert cluster.sql(db, "SELECT f()") == [("a;b",)]


def test_bad_file_name_is_refused(cluster, tmp_path):
    db = cluster.new_db()
    d = tmp_path / "m"
    d.mkdir()
    (d / "init.sql").write_text("CREATE TABLE x (a int);\n")
    r = cluster.migrate(db, migrations_dir=str(d))
    assert r.returncode != 0
    assert "<digits>_<name>.sql" in r.stderr
    assert cluster.sql(db, "SELECT to_regclass('public.x')") == [(None,)]


def test_concurrent_runners_apply_each_file_once(cluster):
    db = cluster.new_db()
    results = []

    def run():
        results.append(cluster.migrate(db))

    threads = [threading.Thread(target=run) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert all(r.returncode == 0 for r in results), [r.stderr for r in results]
    applied = sum(int(re.search(r"migrate: (\d+) applied", r.stdout).group(1)) for r in results)
    assert applied == len(migration_files())
    assert cluster.sql(db, "SELECT count(*) FROM supabase_migrations.schema_migrations") == [(len(migration_files()),)]


def start_migrate(cluster, db, migrations_dir, **settings):
    env = dict(os.environ, MR_MIGRATIONS_DIR=str(migrations_dir), **settings)
    return subprocess.Popen([MIGRATE, cluster.conninfo(db)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_migrate(p):
    """migrate.sh and its psql (which would otherwise wait on)."""
    try:
        os.killpg(p.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    p.wait()


@pytest.fixture
def held_plans(cluster, tmp_path):
    """A migrated database, a new migration that alters public.plans, and an open
    transaction that has read public.plans, as the previous release's binaries keep
    while migrate.sh runs during an upgrade (docs/install.md)."""
    db = cluster.new_db()
    assert cluster.migrate(db).returncode == 0
    d = tmp_path / "migrations"
    shutil.copytree(MIGRATIONS, d)
    (d / "900_alter.sql").write_text("CREATE TABLE public.half_done (id int);\n"
                                     "ALTER TABLE public.plans ADD COLUMN extra int;\n")
    holder = cluster.connect(db, autocommit=False)
    holder.cursor().execute("SELECT count(*) FROM public.plans")
    yield db, d, holder
    holder.close()


def test_a_migration_waiting_for_a_lock_holds_up_no_query_and_stops_with_nothing_applied(cluster, held_plans):
    db, d, holder = held_plans
    p = start_migrate(cluster, db, d, MR_MIGRATE_LOCK_TIMEOUT_MS="200", MR_MIGRATE_LOCK_TRIES="3",
                      MR_MIGRATE_LOCK_PAUSE_S="1")
    try:
        # Meanwhile the table answers other queries (the webhook's): a migration
        # queued for its lock without a timeout would hold each of them behind it.
        reader = cluster.connect(db)
        with reader.cursor() as cur:
            cur.execute("SET statement_timeout = '2s'")
            end = time.monotonic() + 2.5
            while time.monotonic() < end:
                cur.execute("SELECT count(*) FROM public.plans")
                time.sleep(0.05)
        reader.close()
        out, err = p.communicate(timeout=60)
    finally:
        kill_migrate(p)
    assert p.returncode == 1, (out, err)
    assert "migrate: 900_alter.sql waited 200 ms for a lock (try 1 of 3)" in err, err
    assert "900_alter.sql could not get a lock it needs within 200 ms, 3 times" in err, err
    assert "lock timeout" in err, err   # PostgreSQL's own error
    assert cluster.sql(db, "SELECT to_regclass('public.half_done')") == [(None,)]
    assert cluster.sql(db, "SELECT count(*) FROM supabase_migrations.schema_migrations WHERE version = '900'") == [(0,)]
    cols = cluster.sql(db, "SELECT count(*) FROM information_schema.columns "
                           "WHERE table_name = 'plans' AND column_name = 'extra'")
    assert cols == [(0,)]


def test_a_migration_gets_its_lock_once_the_old_transaction_ends(cluster, held_plans):
    db, d, holder = held_plans
    p = start_migrate(cluster, db, d, MR_MIGRATE_LOCK_TIMEOUT_MS="200", MR_MIGRATE_LOCK_TRIES="10",
                      MR_MIGRATE_LOCK_PAUSE_S="1")
    killer = threading.Timer(60, kill_migrate, (p,))
    killer.start()
    try:
        first = p.stderr.readline()   # the first try given up
        holder.rollback()
        out, err = p.communicate(timeout=60)
    finally:
        killer.cancel()
        kill_migrate(p)
    assert "migrate: 900_alter.sql waited 200 ms for a lock (try 1 of 10)" in first, (first, err)
    assert p.returncode == 0, err
    assert "migrate: 1 applied" in out, (out, err)
    assert cluster.sql(db, "SELECT to_regclass('public.half_done') IS NOT NULL") == [(True,)]


@pytest.mark.parametrize("setting,value", [("MR_MIGRATE_LOCK_TIMEOUT_MS", "0"), ("MR_MIGRATE_LOCK_TRIES", "0"),
                                           ("MR_MIGRATE_LOCK_PAUSE_S", "1s")])
def test_bad_lock_settings_are_refused_before_anything_is_applied(cluster, setting, value):
    db = cluster.new_db()
    p = start_migrate(cluster, db, MIGRATIONS, **{setting: value})
    out, err = p.communicate(timeout=60)
    assert p.returncode == 2 and setting in err, err
    assert cluster.sql(db, "SELECT to_regnamespace('supabase_migrations')") == [(None,)]


# What the lifecycle worker built before migration 123 sends for every step of an
# instance with a legacy plaintext environment (its payload.c, take_env_stmt).
WORKER_BEFORE_123 = "SELECT public.instance_take_plain_env(%s::uuid)::text"


def test_the_worker_built_before_123_keeps_working_on_the_new_schema(cluster, tmp_path):
    """docs/install.md's upgrade: the new migrations are applied while the previous
    release's worker still runs; it must keep working until it is restarted."""
    db = cluster.new_db()
    old = tmp_path / "old"
    old.mkdir()
    for f in migration_files():
        if f < "123_":
            shutil.copy(os.path.join(MIGRATIONS, f), old)
    r = cluster.migrate(db, migrations_dir=str(old))
    assert r.returncode == 0, r.stderr
    assert cluster.psql_file(db, SEED).returncode == 0
    ((iid,),) = cluster.sql(db, "SELECT (public.lifecycle_provision('5eed5eed-0000-4000-8000-000000000101')"
                                " #>> '{instance,id}')")

    def old_worker_step(env):
        cluster.sql(db, "UPDATE public.instances SET environment_vars = %s WHERE id = %s",
                    (json.dumps(env), iid))
        conn = cluster.connect(db, autocommit=False)
        try:
            with conn.cursor() as cur:
                cur.execute("SET LOCAL ROLE service_role")
                cur.execute(WORKER_BEFORE_123, (iid,))
                (taken,) = cur.fetchone()
            conn.commit()
        finally:
            conn.close()
        assert json.loads(taken) == env
        assert cluster.sql(db, "SELECT environment_vars FROM public.instances WHERE id = %s", (iid,)) == [({},)]

    old_worker_step({"LEGACY": "before"})   # the old release on its own schema
    r = cluster.migrate(db)                  # the upgrade: the new migrations first
    assert r.returncode == 0, r.stderr
    old_worker_step({"LEGACY": "after"})    # the old worker's next step, before its restart



def test_a_restart_held_behind_a_rejected_update_is_carried_out_after_the_upgrade(cluster, tmp_path):
    """A tenant's restart that a release before 164 left pending behind an update the
    provisioner rejected is due once the new migrations are applied; the update stays
    held for an operator."""
    db = cluster.new_db()
    old = tmp_path / "old"
    old.mkdir()
    for f in migration_files():
        if f < "164_":
            shutil.copy(os.path.join(MIGRATIONS, f), old)
    r = cluster.migrate(db, migrations_dir=str(old))
    assert r.returncode == 0, r.stderr
    assert cluster.psql_file(db, SEED).returncode == 0
    ((iid,),) = cluster.sql(db, "SELECT (public.lifecycle_provision('5eed5eed-0000-4000-8000-000000000101')"
                                " #>> '{instance,id}')")

    chained = []

    def step(result):
        """Claims the next step (or takes the one chained) and finishes it with result."""
        ((f,),) = cluster.sql(db, """
            SELECT public.lifecycle_finish((c #>> '{step,instance_id}')::uuid, c #>> '{step,token}',
                       %s::jsonb || jsonb_build_object(
                           'config_version', (c #>> '{step,config_version}')::bigint,
                           'restart_version', (c #>> '{step,restart_version}')::bigint),
                       60, 30, 3600)
              FROM (SELECT coalesce(%s::jsonb, public.lifecycle_claim('w1', 60)) c) x""",
                              (json.dumps(result), chained.pop() if chained else None))
        if f["outcome"] == "claimed":
            chained.append(json.dumps(f))
        return f["outcome"]

    def owed():
        return cluster.sql(db, "SELECT owed_action::text, owed_due_at IS NOT NULL,"
                               " restart_version > applied_restart_version"
                               " FROM public.instances WHERE id = %s", (iid,))[0]

    assert step({"ok": True, "welcome_email": {"ok": True}}) == "done"
    cluster.sql(db, "UPDATE public.instances SET storage_gb = storage_gb + 1 WHERE id = %s", (iid,))
    assert step({"ok": False, "rejected": True, "error": "HTTP 422: storage cannot shrink"}) == "failed"
    cluster.sql(db, "UPDATE public.instances SET restart_version = restart_version + 1,"
                    " restart_requested_at = now() WHERE id = %s", (iid,))
    assert owed() == ("update", False, True)   # the old release: the restart waits for good
    r = cluster.migrate(db)
    assert r.returncode == 0, r.stderr
    assert owed() == ("restart", True, True)
    assert step({"ok": True}) == "claimed"     # the restart done, the update tried again
    assert step({"ok": False, "rejected": True, "error": "HTTP 422: storage cannot shrink"}) == "failed"
    assert owed() == ("update", False, False)

def test_service_conninfo_migrates_the_service_database(cluster, tmp_path):
    """`migrate.sh service=NAME` (a libpq conninfo, the usual way to keep a password
    out of arguments) migrates the database the operator's service file names; one
    that names a service and holds a password too is refused, nothing applied."""
    db = cluster.new_db()
    svc = tmp_path / "pg_service.conf"
    svc.write_text("[target]\n" + "\n".join(cluster.conninfo(db).split()) + "\n")
    svc.chmod(0o600)
    env = dict(os.environ, PGSERVICEFILE=str(svc))
    r = subprocess.run([MIGRATE, "service=target password=not-here"], env=env,
                       capture_output=True, text=True)
    assert r.returncode == 2 and "not-here" not in r.stderr, r
    r = subprocess.run([MIGRATE, "service=target"], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    n = cluster.sql(db, "SELECT count(*) FROM supabase_migrations.schema_migrations")[0][0]
    assert n == len(migration_files())
