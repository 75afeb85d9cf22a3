"""Throwaway PostgreSQL clusters for the schema tests (scripts/pg.sh in a temp dir).

Independent of the stack's conftest: each test module creates the cluster it needs,
since roles are cluster-wide and the Supabase-prepared test must own its roles."""
import os
import shutil
import subprocess
import tempfile

import psycopg2

ROOT = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", ".."))
PG_SH = os.path.join(ROOT, "scripts", "pg.sh")
MIGRATE = os.path.join(ROOT, "scripts", "migrate.sh")
SEED = os.path.join(ROOT, "sql", "seed.sql")
MIGRATIONS = os.path.join(ROOT, "sql", "migrations")


class Cluster:
    def __init__(self):
        self.dir = tempfile.mkdtemp(prefix="mr-schema-")
        env = dict(os.environ, PG_FSYNC="off")
        out = subprocess.run([PG_SH, "init", self.dir], env=env, check=True,
                             capture_output=True, text=True).stdout.strip()
        self.base = out  # conninfo of the `mindroom` database
        self.n = 0

    def conninfo(self, db="mindroom", user="postgres"):
        parts = dict(p.split("=", 1) for p in self.base.split())
        parts["dbname"], parts["user"] = db, user
        return " ".join(f"{k}={v}" for k, v in parts.items())

    def connect(self, db="mindroom", user="postgres", autocommit=True):
        conn = psycopg2.connect(self.conninfo(db, user))
        conn.autocommit = autocommit
        return conn

    def new_db(self, owner="postgres"):
        self.n += 1
        name = f"t{self.n}"
        self.sql("postgres", f'CREATE DATABASE {name} OWNER "{owner}" TEMPLATE template0')
        return name

    def sql(self, db, query, params=None, user="postgres"):
        conn = self.connect(db, user)
        try:
            with conn.cursor() as cur:
                cur.execute(query, params)
                return cur.fetchall() if cur.description else None
        finally:
            conn.close()

    def migrate(self, db, user="postgres", migrations_dir=None):
        env = dict(os.environ)
        if migrations_dir:
            env["MR_MIGRATIONS_DIR"] = migrations_dir
        return subprocess.run([MIGRATE, self.conninfo(db, user)], env=env,
                              capture_output=True, text=True)

    def psql_file(self, db, path, user="postgres"):
        return subprocess.run(["psql", self.conninfo(db, user), "-X", "-q", "-v", "ON_ERROR_STOP=1",
                               "-f", path], capture_output=True, text=True)

    def dump_schema(self, db):
        """Schema-only dump (objects, owners, grants) for before/after comparisons."""
        out = subprocess.run(["pg_dump", "--schema-only", self.conninfo(db)], check=True,
                             capture_output=True, text=True).stdout
        # pg_dump >= 15.14 brackets the dump with a random \restrict key.
        return "\n".join(l for l in out.splitlines()
                         if not l.startswith(("\\restrict ", "\\unrestrict ")))

    def close(self):
        subprocess.run([PG_SH, "stop", self.dir], check=False)
        shutil.rmtree(self.dir, ignore_errors=True)


def migration_files():
    return sorted(f for f in os.listdir(MIGRATIONS) if f.endswith(".sql"))
