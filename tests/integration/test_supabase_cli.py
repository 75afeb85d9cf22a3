"""The Supabase CLI (npm package `supabase`, pinned by scripts/supabase-cli.sh) and the
project's runner (scripts/migrate.sh) agree on what is applied: each sees the other's
work as done, and both record the same rows in supabase_migrations.schema_migrations.
The CLI also loads supabase/config.toml as a Supabase project's config.

The CLI is installed on demand from the npm registry; if that fails these tests fail
(they are the issue's acceptance tests, not optional). The CLI talks TCP only, so this
module runs its own cluster with a TCP port (scripts/pg.sh init DIR PORT), where
`postgres` logs in with a password (scram), as on any real server."""
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import tempfile
import tomllib

import psycopg2
import pytest

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PG_SH = os.path.join(ROOT, "scripts", "pg.sh")
MIGRATE = os.path.join(ROOT, "scripts", "migrate.sh")
CLI_SH = os.path.join(ROOT, "scripts", "supabase-cli.sh")
MIGRATIONS = os.path.join(ROOT, "sql", "migrations")
SEED = os.path.join(ROOT, "sql", "seed.sql")


def migration_files(d=MIGRATIONS):
    return sorted(f for f in os.listdir(d) if f.endswith(".sql"))


def expected_rows(d=MIGRATIONS):
    """(version, name) per file, by the CLI's rule ^([0-9]+)_(.*)\\.sql$."""
    return [re.match(r"^([0-9]+)_(.*)\.sql$", f).groups() for f in migration_files(d)]


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class TcpCluster:
    """A throwaway cluster listening on 127.0.0.1:<free port> (and its own socket)."""

    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mr-supabase-")
        self.password = secrets.token_hex(16)
        env = dict(os.environ, PG_FSYNC="off", PG_PASSWORD=self.password)
        for attempt in range(5):  # the free port may be taken before the server binds it
            self.port = free_port()
            r = subprocess.run([PG_SH, "init", self.dir, str(self.port)], env=env,
                               capture_output=True, text=True)
            if r.returncode == 0:
                break
            subprocess.run([PG_SH, "stop", self.dir], check=False)
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = tempfile.mkdtemp(prefix="mr-supabase-")
        else:
            raise RuntimeError(f"pg.sh init failed: {r.stderr}")
        self.n = 0

    def conninfo(self, db):
        return f"host={self.dir} port={self.port} dbname={db} user=postgres"

    def db_url(self, db):
        """What a user passes to `supabase ... --db-url` for a local cluster."""
        return f"postgresql://postgres:{self.password}@127.0.0.1:{self.port}/{db}?sslmode=disable"

    def new_db(self):
        self.n += 1
        name = f"s{self.n}"
        self.sql("postgres", f"CREATE DATABASE {name} TEMPLATE template0")
        return name

    def sql(self, db, query, params=None):
        conn = psycopg2.connect(self.conninfo(db))
        conn.autocommit = True
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def history(self, db):
        return self.sql(db, "SELECT version, name, statements FROM supabase_migrations.schema_migrations"
                            " ORDER BY version")

    def migrate(self, db, migrations_dir=None):
        env = dict(os.environ)
        if migrations_dir:
            env["MR_MIGRATIONS_DIR"] = migrations_dir
        return subprocess.run([MIGRATE, self.conninfo(db)], env=env, capture_output=True, text=True)

    def dump_schema(self, db):
        out = subprocess.run(["pg_dump", "--schema-only", self.conninfo(db)], check=True,
                             capture_output=True, text=True).stdout
        # pg_dump >= 15.14 brackets the dump with a random \restrict key.
        return "\n".join(l for l in out.splitlines() if not l.startswith(("\\restrict ", "\\unrestrict ")))

    def close(self):
        subprocess.run([PG_SH, "stop", self.dir], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture(scope="module")
def cluster():
    c = TcpCluster()
    yield c
    c.close()


@pytest.fixture(scope="module")
def cli():
    r = subprocess.run([CLI_SH], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, f"installing the Supabase CLI from the npm registry failed:\n{r.stderr}"
    path = r.stdout.strip().splitlines()[-1]
    home = tempfile.mkdtemp(prefix="mr-supabase-home-")

    def run(*args, workdir=ROOT, env=None, check=True):
        e = dict(os.environ, HOME=home, SUPABASE_TELEMETRY_DISABLED="1", DO_NOT_TRACK="1",
                 SUPABASE_NO_UPDATE_NOTIFIER="1")
        # The config's env(...) values; tests that need them unset pass env=... explicitly.
        e.setdefault("MINDROOM_SITE_URL", "http://127.0.0.1:3000")
        e.setdefault("MINDROOM_REDIRECT_URLS", "http://127.0.0.1:3000/auth/callback")
        if env is not None:
            e = {k: v for k, v in e.items() if not k.startswith("MINDROOM_")}
            e.update(env)
        p = subprocess.run([path, *args], cwd=workdir, env=e, capture_output=True, text=True, timeout=300)
        if check:
            assert p.returncode == 0, f"supabase {' '.join(args)} exited {p.returncode}:\n{p.stdout}\n{p.stderr}"
        return p

    yield run
    shutil.rmtree(home, ignore_errors=True)


def migration_list(cli, url, workdir=ROOT, **kw):
    """`supabase migration list` as rows (local, remote)."""
    p = cli("migration", "list", "--db-url", url, "--output-format", "json", workdir=workdir, **kw)
    return [(m["local"], m["remote"]) for m in json.loads(p.stdout)["migrations"]], p


def test_cli_is_the_pinned_version(cli):
    assert cli("--version").stdout.strip() == "2.117.0"


def test_after_the_runner_the_cli_lists_every_migration_applied_and_nothing_pending(cluster, cli):
    db = cluster.new_db()
    r = cluster.migrate(db)
    assert r.returncode == 0, r.stderr
    versions = [v for v, _ in expected_rows()]
    rows, _ = migration_list(cli, cluster.db_url(db))
    assert rows == [(v, v) for v in versions]
    # And the CLI has nothing to push.
    p = cli("db", "push", "--db-url", cluster.db_url(db), "--dry-run", "--yes")
    assert "Would push" not in p.stdout + p.stderr
    assert "Remote database is up to date" in p.stdout + p.stderr


def test_migration_list_reports_what_the_runner_has_not_applied(cluster, cli, tmp_path):
    # Control for the test above: the runner applies only the first two files;
    # the CLI must show the rest as local only.
    part = tmp_path / "m"
    part.mkdir()
    files = migration_files()
    for f in files[:2]:
        shutil.copy(os.path.join(MIGRATIONS, f), part / f)
    db = cluster.new_db()
    assert cluster.migrate(db, migrations_dir=str(part)).returncode == 0
    versions = [v for v, _ in expected_rows()]
    rows, _ = migration_list(cli, cluster.db_url(db))
    assert rows == [(v, v) for v in versions[:2]] + [(v, "") for v in versions[2:]]


def test_db_push_on_a_fresh_database_applies_everything_and_then_the_runner_applies_nothing(cluster, cli):
    db = cluster.new_db()
    p = cli("db", "push", "--db-url", cluster.db_url(db), "--yes")
    for f in migration_files():
        assert f"Applying migration {f}" in p.stdout + p.stderr
    assert [(v, n) for v, n, _ in cluster.history(db)] == expected_rows()
    before = cluster.dump_schema(db)
    r = cluster.migrate(db)
    assert r.returncode == 0, r.stderr
    assert "migrate: 0 applied" in r.stdout
    assert cluster.dump_schema(db) == before
    # The CLI's push built exactly the schema the runner builds.
    ref = cluster.new_db()
    assert cluster.migrate(ref).returncode == 0
    assert cluster.dump_schema(db) == cluster.dump_schema(ref)
    # The project's seed runs on it (and again, harmlessly).
    for _ in range(2):
        s = subprocess.run(["psql", cluster.conninfo(db), "-X", "-q", "-v", "ON_ERROR_STOP=1", "-f", SEED],
                           capture_output=True, text=True)
        assert s.returncode == 0, s.stderr
    assert cluster.sql(db, """SELECT a.email, s.tier::text, s.status::text, s.max_agents, s.max_messages_per_day
                              FROM accounts a JOIN subscriptions s ON s.account_id = a.id""") == \
        [("test@example.com", "starter", "active", 3, 1000)]


def test_db_push_with_the_seed_uses_the_configured_seed_file(cluster, cli):
    db = cluster.new_db()
    p = cli("db", "push", "--db-url", cluster.db_url(db), "--include-seed", "--dry-run", "--yes")
    assert re.search(r"Would seed these files:\s*\n\s*\S+ sql/seed\.sql", p.stdout + p.stderr), p.stdout + p.stderr
    cli("db", "push", "--db-url", cluster.db_url(db), "--include-seed", "--yes")
    assert cluster.sql(db, "SELECT email, full_name, stripe_customer_id FROM accounts") == \
        [("test@example.com", "Test User", "cus_test123")]
    # The runner then sees everything applied.
    r = cluster.migrate(db)
    assert r.returncode == 0 and "migrate: 0 applied" in r.stdout, r.stdout + r.stderr


def test_runner_and_cli_record_identical_history_rows(cluster, cli):
    by_runner, by_cli = cluster.new_db(), cluster.new_db()
    assert cluster.migrate(by_runner).returncode == 0
    cli("db", "push", "--db-url", cluster.db_url(by_cli), "--yes")
    a, b = cluster.history(by_runner), cluster.history(by_cli)
    assert len(a) == len(migration_files())
    assert a == b
    # The table itself too (columns, types, order, key), whichever tool created it.
    q = """SELECT column_name, data_type, is_nullable FROM information_schema.columns
           WHERE table_schema = 'supabase_migrations' AND table_name = 'schema_migrations'
           ORDER BY ordinal_position"""
    assert cluster.sql(by_runner, q) == cluster.sql(by_cli, q)


# Statements the CLI's splitter and a naive one would cut differently, all valid SQL
# (the CLI runs each piece it cuts as one statement).
TRICKY = {
    "100_quotes.sql": (
        "-- leading comment; with a semicolon\n"
        "CREATE TABLE probe (id int PRIMARY KEY, note text DEFAULT 'semi;colon', \"odd;name\" text);\n"
        "INSERT INTO probe VALUES (1, 'it''s; here', E'back\\\\slash'), (2, $$dollar;$$, $q1$tag;$q1$);\n"
        "/* block ; comment /* nested ; */ still comment ; */\n"
        "SELECT 3 - 1 AS minus, 4 /2 AS slash, $$$$ AS empty;;\n"
        "\tSELECT 'é;' AS \"ü;x\"  ;  \n"
        "-- trailing comment; with semicolon\n"
        "-- and another\n"),
    "101_bodies.sql": (
        "CREATE FUNCTION probe_atomic_body() RETURNS int LANGUAGE sql\n"
        "BEGIN ATOMIC\n  SELECT 1;\n  SELECT 2;\nEND;\n"
        "CREATE FUNCTION probe_plpgsql() RETURNS text LANGUAGE plpgsql AS $body$\n"
        "BEGIN RETURN 'x;y'; END\n$body$;\n"
        "DO $$ BEGIN PERFORM 1; END $$;\r\n"
        "SELECT (SELECT ';' || ';') AS two;\n"),
    "102_no_final_newline.sql": "SELECT 1 -- a comment ending the file;",
    "103_empty.sql": "  \n\n",
    "104_comment_only.sql": "/* nothing but a comment */\n",
}


def test_runner_records_tricky_statements_exactly_as_the_cli(cluster, cli, tmp_path):
    project = tmp_path / "project"
    mig = project / "supabase" / "migrations"
    mig.mkdir(parents=True)
    for name, text in TRICKY.items():
        (mig / name).write_bytes(text.encode())
    by_runner, by_cli = cluster.new_db(), cluster.new_db()
    r = cluster.migrate(by_runner, migrations_dir=str(mig))
    assert r.returncode == 0, r.stderr
    cli("db", "push", "--db-url", cluster.db_url(by_cli), "--yes", "--workdir", str(project),
        workdir=str(project))
    a, b = cluster.history(by_runner), cluster.history(by_cli)
    assert [(v, n) for v, n, _ in b] == expected_rows(str(mig))
    for ra, rb in zip(a, b):
        assert ra == rb, f"migration {rb[0]}: runner recorded {ra[2]!r}, CLI recorded {rb[2]!r}"
    assert len(a) == len(b)
    # Spot checks of the CLI's rules, so a change in either tool shows up here.
    stm = {v: s for v, _, s in b}
    assert stm["100"][-1] == "-- trailing comment; with semicolon\n-- and another"
    assert stm["100"][-2] == "SELECT 'é;' AS \"ü;x\""
    assert stm["101"][0].endswith("SELECT 2;\nEND")
    assert stm["102"] == ["SELECT 1 -- a comment ending the file"]
    assert stm["103"] == []
    assert stm["104"] == ["/* nothing but a comment */"]
    # Both databases hold the same data.
    q = "SELECT id, note, \"odd;name\" FROM probe ORDER BY id"
    assert cluster.sql(by_runner, q) == cluster.sql(by_cli, q)


def copy_project(dst):
    """supabase/ and sql/ of this repository (the migrations link stays a link)."""
    shutil.copytree(os.path.join(ROOT, "supabase"), os.path.join(dst, "supabase"), symlinks=True,
                    ignore=shutil.ignore_patterns(".temp", ".branches"))
    shutil.copytree(os.path.join(ROOT, "sql"), os.path.join(dst, "sql"))
    return os.path.join(dst, "supabase", "config.toml")


def test_cli_accepts_the_project_config(cluster, cli, tmp_path):
    db = cluster.new_db()
    assert cluster.migrate(db).returncode == 0
    versions = [v for v, _ in expected_rows()]
    # With the env(...) variables set, and without them.
    for env in (None, {}):
        rows, p = migration_list(cli, cluster.db_url(db), env=env)
        assert rows == [(v, v) for v in versions]
        assert not re.search(r"config|invalid", p.stderr, re.I), p.stderr
    # The same command run outside any project sees no local migrations: the rows
    # above came from this project's supabase/ (its migrations link included).
    rows, _ = migration_list(cli, cluster.db_url(db), workdir=str(tmp_path))
    assert rows == [("", v) for v in versions]


def test_cli_rejects_a_broken_copy_of_the_config(cluster, cli, tmp_path):
    # Controls for the test above: the CLI really parses and validates this file.
    db = cluster.new_db()
    url = cluster.db_url(db)
    cases = {
        "major_version": (lambda t: t.replace("major_version = 15", "major_version = 11"),
                          "db.major_version"),
        "recovery template": (None, "auth.email.template.recovery.content_path"),
        "toml syntax": (lambda t: t.replace("[auth.email]", "[auth.email"), ""),
    }
    for what, (edit, message) in cases.items():
        d = tmp_path / what.replace(" ", "_")
        d.mkdir()
        cfg = copy_project(str(d))
        assert cli("migration", "list", "--db-url", url, workdir=str(d), check=False).returncode == 0, what
        if edit:
            with open(cfg) as f:
                text = f.read()
            with open(cfg, "w") as f:
                f.write(edit(text))
        else:
            os.remove(os.path.join(d, "supabase", "templates", "recovery.html"))
        p = cli("migration", "list", "--db-url", url, workdir=str(d), check=False)
        assert p.returncode != 0, f"{what}: the CLI accepted a broken config"
        assert message in p.stdout + p.stderr, f"{what}: {p.stdout}{p.stderr}"


def test_cli_substitutes_env_values_in_the_config(cluster, cli, tmp_path):
    # site_url and additional_redirect_urls come from env(...); nothing the CLI can do
    # without Docker shows them, so check the mechanism on a value it validates.
    db = cluster.new_db()
    cfg = copy_project(str(tmp_path))
    with open(cfg) as f:
        text = f.read()
    assert "major_version = 15" in text
    with open(cfg, "w") as f:
        f.write(text.replace("major_version = 15", 'major_version = "env(MRTEST_PG_MAJOR)"'))
    run = lambda env: cli("migration", "list", "--db-url", cluster.db_url(db), workdir=str(tmp_path),
                          env=env, check=False)
    assert run({"MRTEST_PG_MAJOR": "15"}).returncode == 0
    p = run({"MRTEST_PG_MAJOR": "11"})
    assert p.returncode != 0 and "Invalid db.major_version: 11" in p.stderr, p.stderr
    # Unset, the text stays as written (so MINDROOM_SITE_URL must be set for `supabase start`).
    p = run({})
    assert p.returncode != 0 and "Invalid db.major_version: env(MRTEST_PG_MAJOR)" in p.stderr, p.stderr
    # The CLI also reads the project's .env.
    (tmp_path / ".env").write_text("MRTEST_PG_MAJOR=15\n")
    assert run({}).returncode == 0


def test_config_declares_what_the_project_needs():
    with open(os.path.join(ROOT, "supabase", "config.toml"), "rb") as f:
        c = tomllib.load(f)
    assert c["project_id"] == "mindroom"
    assert "public" in c["api"]["schemas"]
    assert c["db"]["major_version"] == 15
    assert c["db"]["seed"]["enabled"] and c["db"]["seed"]["sql_paths"] == ["../sql/seed.sql"]
    auth = c["auth"]
    assert auth["site_url"] == "env(MINDROOM_SITE_URL)"
    assert auth["additional_redirect_urls"] == ["env(MINDROOM_REDIRECT_URLS)"]
    assert auth["email"]["enable_signup"] is True and auth["email"]["enable_confirmations"] is True
    for t in ("confirmation", "recovery"):
        path = auth["email"]["template"][t]["content_path"]
        with open(os.path.join(ROOT, path)) as f:
            assert "{{ .ConfirmationURL }}" in f.read()
    # Only what exists: the functions are this repository's FastCGI binaries, not
    # Deno functions the edge runtime would serve.
    assert "functions" not in c and c["edge_runtime"]["enabled"] is False
    assert not os.path.exists(os.path.join(ROOT, "supabase", "functions"))
    # The CLI's own scratch directory (it writes one whenever it runs here) is not committed.
    tracked = subprocess.run(["git", "-C", ROOT, "ls-files", "supabase/.temp"], capture_output=True,
                             text=True)
    assert tracked.returncode == 0 and tracked.stdout == "", tracked
    # `make run` (54321 API, 54322 PostgreSQL, 8002 provisioner) and `supabase start`
    # run side by side: every port the local Supabase stack binds is another one.
    ports = [c["api"]["port"], c["db"]["port"], c["db"]["shadow_port"], c["studio"]["port"],
             c["local_smtp"]["port"]]
    assert len(set(ports)) == len(ports)
    assert not set(ports) & {54321, 54322, 8002}
    for link, target in (("migrations", "../sql/migrations"), ("tests", "../tests/sql")):
        path = os.path.join(ROOT, "supabase", link)
        assert os.path.islink(path) and os.readlink(path) == target

