"""The migrations on a database prepared the way Supabase prepares one: the roles, the
`auth` schema with auth.users and auth.uid()/role()/jwt() already exist and belong to
another role (supabase_auth_admin), Supabase's default privileges grant everything in
public to anon/authenticated/service_role, and the migrations run as a non-superuser
database owner (Supabase's `postgres`). 000 must change nothing there, every migration
must apply unchanged, applying twice must be a no-op, and the whole pgTAP suite must
pass on the result."""
import os
import subprocess

import pytest

from schema_cluster import Cluster, MIGRATIONS, ROOT, SEED

PREPARE_CLUSTER = """
CREATE ROLE supabase_auth_admin LOGIN NOINHERIT CREATEROLE;
CREATE ROLE anon NOLOGIN NOINHERIT;
CREATE ROLE authenticated NOLOGIN NOINHERIT;
CREATE ROLE service_role NOLOGIN NOINHERIT BYPASSRLS;
CREATE ROLE authenticator LOGIN NOINHERIT;
GRANT anon, authenticated, service_role TO authenticator;
-- Supabase's `postgres`: owns the database, is not a superuser.
CREATE ROLE app_owner LOGIN CREATEROLE;
GRANT anon, authenticated, service_role TO app_owner;
"""

PREPARE_DB = """
CREATE SCHEMA supabase_migrations AUTHORIZATION app_owner;
CREATE TABLE supabase_migrations.schema_migrations (version text PRIMARY KEY, name text, statements text[]);
ALTER TABLE supabase_migrations.schema_migrations OWNER TO app_owner;

CREATE SCHEMA auth AUTHORIZATION supabase_auth_admin;
SET ROLE supabase_auth_admin;
CREATE TABLE auth.users (
    instance_id uuid,
    id uuid NOT NULL PRIMARY KEY,
    aud varchar(255),
    role varchar(255),
    email varchar(255),
    encrypted_password varchar(255),
    email_confirmed_at timestamptz,
    raw_app_meta_data jsonb,
    raw_user_meta_data jsonb,
    is_super_admin boolean,
    created_at timestamptz,
    updated_at timestamptz,
    phone text UNIQUE DEFAULT NULL,
    is_sso_user boolean NOT NULL DEFAULT false,
    deleted_at timestamptz,
    is_anonymous boolean NOT NULL DEFAULT false
);
CREATE UNIQUE INDEX users_email_partial_key ON auth.users (email) WHERE is_sso_user = false;
CREATE FUNCTION auth.uid() RETURNS uuid LANGUAGE sql STABLE AS $$
  select coalesce(nullif(current_setting('request.jwt.claim.sub', true), ''),
                  (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'sub'))::uuid $$;
CREATE FUNCTION auth.role() RETURNS text LANGUAGE sql STABLE AS $$
  select coalesce(nullif(current_setting('request.jwt.claim.role', true), ''),
                  (nullif(current_setting('request.jwt.claims', true), '')::jsonb ->> 'role'))::text $$;
CREATE FUNCTION auth.jwt() RETURNS jsonb LANGUAGE sql STABLE AS $$
  select coalesce(nullif(current_setting('request.jwt.claim', true), ''),
                  nullif(current_setting('request.jwt.claims', true), ''))::jsonb $$;
GRANT USAGE ON SCHEMA auth TO anon, authenticated, service_role, app_owner;
GRANT ALL ON auth.users TO app_owner;
RESET ROLE;

-- Supabase's default privileges for objects the project owner creates in public.
ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA public GRANT ALL ON TABLES TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA public GRANT ALL ON FUNCTIONS TO anon, authenticated, service_role;
ALTER DEFAULT PRIVILEGES FOR ROLE app_owner IN SCHEMA public GRANT ALL ON SEQUENCES TO anon, authenticated, service_role;
GRANT USAGE ON SCHEMA public TO anon, authenticated, service_role;

-- Realtime's publication, created empty with the project and owned by `postgres`;
-- the Dashboard's "enable Realtime" adds tables to it.
SET ROLE app_owner;
CREATE PUBLICATION supabase_realtime;
RESET ROLE;

-- pgTAP for the suite run at the end (as Supabase offers it: an extension).
CREATE EXTENSION pgtap;
"""

ROLES_SNAPSHOT = """
SELECT r.rolname, r.rolsuper, r.rolinherit, r.rolcreaterole, r.rolcanlogin, r.rolbypassrls,
       ARRAY(SELECT g.rolname || ':' || m.admin_option FROM pg_auth_members m
               JOIN pg_roles g ON g.oid = m.roleid WHERE m.member = r.oid ORDER BY 1)
  FROM pg_roles r WHERE r.rolname NOT LIKE 'pg\\_%' ORDER BY r.rolname
"""


@pytest.fixture(scope="module")
def supa():
    c = Cluster()
    try:
        c.sql("postgres", PREPARE_CLUSTER)
        c.sql("postgres", "CREATE DATABASE supa OWNER app_owner TEMPLATE template0")
        c.sql("supa", PREPARE_DB)
        yield c
    finally:
        c.close()


def migrations_only(tmp_path, *names):
    d = tmp_path / "only"
    d.mkdir()
    for n in names:
        (d / n).write_text(open(os.path.join(MIGRATIONS, n)).read())
    return str(d)


def test_000_changes_nothing_on_a_supabase_database(supa, tmp_path):
    roles = supa.sql("supa", ROLES_SNAPSHOT)
    dump = supa.dump_schema("supa")
    r = supa.migrate("supa", user="app_owner", migrations_dir=migrations_only(tmp_path, "000_supabase_compat.sql"))
    assert r.returncode == 0, r.stderr
    assert "migrate: 1 applied" in r.stdout
    assert supa.sql("supa", ROLES_SNAPSHOT) == roles
    assert supa.dump_schema("supa") == dump
    owner = supa.sql("supa", """SELECT pg_get_userbyid(p.proowner), p.prosrc LIKE '%claim.sub%claims%'
                                FROM pg_proc p WHERE p.oid = 'auth.uid()'::regprocedure""")
    assert owner == [("supabase_auth_admin", True)], "Supabase's own auth.uid() stays"


def test_all_migrations_apply_unchanged_as_the_non_superuser_owner(supa):
    r = supa.migrate("supa", user="app_owner")
    assert r.returncode == 0, r.stderr
    versions = [v for (v,) in supa.sql("supa", "SELECT version FROM supabase_migrations.schema_migrations ORDER BY 1")]
    assert versions == sorted(f.split("_")[0] for f in os.listdir(MIGRATIONS) if f.endswith(".sql"))
    # Supabase's default privileges granted ALL to anon on every new table; 002 took it back.
    assert supa.sql("supa", """SELECT count(*) FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
                                WHERE n.nspname = 'public' AND c.relkind = 'r'
                                  AND has_table_privilege('anon', c.oid, 'SELECT,INSERT,UPDATE,DELETE')""") == [(0,)]
    assert supa.sql("supa", "SELECT has_function_privilege('authenticated', 'public.track_usage(uuid,text,text)', 'EXECUTE')") == [(False,)]
    # The account trigger works for the auth admin writing auth.users.
    supa.sql("supa", "INSERT INTO auth.users (id, email, raw_user_meta_data) VALUES "
                     "('dddddddd-0000-4000-8000-000000000001', 'd@example.com', '{\"full_name\": \"D\"}')",
             user="supabase_auth_admin")
    assert supa.sql("supa", "SELECT email, full_name FROM public.accounts WHERE id = 'dddddddd-0000-4000-8000-000000000001'") \
        == [("d@example.com", "D")]
    supa.sql("supa", "DELETE FROM auth.users WHERE id = 'dddddddd-0000-4000-8000-000000000001'", user="supabase_auth_admin")


def test_an_sso_user_with_a_password_users_email_signs_up_and_gets_an_account(supa):
    """Supabase Auth keeps email unique among non-SSO users only (is_sso_user): an SSO
    identity may carry the email of a password user, and its sign-up (the insert into
    auth.users, whose trigger creates the account) must not fail on our side."""
    pw, sso = "dddddddd-0000-4000-8000-000000000002", "dddddddd-0000-4000-8000-000000000003"
    try:
        supa.sql("supa", "INSERT INTO auth.users (id, email) VALUES (%s, 'same@example.com')", (pw,),
                 user="supabase_auth_admin")
        supa.sql("supa", "INSERT INTO auth.users (id, email, is_sso_user) VALUES (%s, 'same@example.com', true)",
                 (sso,), user="supabase_auth_admin")
        assert supa.sql("supa", "SELECT id::text, email FROM public.accounts WHERE id IN (%s, %s) ORDER BY id",
                        (pw, sso)) == [(pw, "same@example.com"), (sso, "same@example.com")]
        # An email change follows to the account, whoever else has that email.
        supa.sql("supa", "UPDATE auth.users SET email = 'other@example.com' WHERE id = %s", (sso,),
                 user="supabase_auth_admin")
        supa.sql("supa", "UPDATE auth.users SET email = 'same@example.com' WHERE id = %s", (sso,),
                 user="supabase_auth_admin")
        assert supa.sql("supa", "SELECT email FROM public.accounts WHERE id = %s", (sso,)) \
            == [("same@example.com",)]
    finally:
        supa.sql("supa", "DELETE FROM auth.users WHERE id IN (%s, %s)", (pw, sso), user="supabase_auth_admin")

def test_a_user_supabase_auth_deletes_softly_loses_its_account(supa):
    """The admin API's should_soft_delete keeps the auth.users row: Supabase Auth's one
    UPDATE (as supabase_auth_admin) sets deleted_at and obfuscates the email. The
    account goes as with a delete (its customer recorded for what Stripe sends later),
    and the obfuscated email makes no account."""
    uid = "dddddddd-0000-4000-8000-000000000004"
    try:
        supa.sql("supa", "INSERT INTO auth.users (id, email) VALUES (%s, 'soft@example.com')", (uid,),
                 user="supabase_auth_admin")
        supa.sql("supa", "UPDATE public.accounts SET stripe_customer_id = 'cus_soft' WHERE id = %s", (uid,))
        supa.sql("supa", "UPDATE auth.users SET updated_at = now() WHERE id = %s", (uid,),
                 user="supabase_auth_admin")
        assert supa.sql("supa", "SELECT count(*) FROM public.accounts WHERE id = %s", (uid,)) == [(1,)]
        supa.sql("supa", "UPDATE auth.users SET email = 'obfuscated@example.invalid', phone = NULL, "
                         "deleted_at = now() WHERE id = %s", (uid,), user="supabase_auth_admin")
        assert supa.sql("supa", "SELECT count(*) FROM public.accounts WHERE id = %s", (uid,)) == [(0,)]
        assert supa.sql("supa", "SELECT stripe_customer_id FROM public.deleted_account_customers "
                                "WHERE account_id = %s", (uid,)) == [("cus_soft",)]
        supa.sql("supa", "UPDATE auth.users SET raw_user_meta_data = '{}' WHERE id = %s", (uid,),
                 user="supabase_auth_admin")
        assert supa.sql("supa", "SELECT count(*) FROM public.accounts WHERE id = %s", (uid,)) == [(0,)]
    finally:
        supa.sql("supa", "DELETE FROM auth.users WHERE id = %s", (uid,), user="supabase_auth_admin")
        supa.sql("supa", "DELETE FROM public.deleted_account_customers WHERE account_id = %s", (uid,))


def test_applying_twice_is_a_no_op(supa):
    roles = supa.sql("supa", ROLES_SNAPSHOT)
    dump = supa.dump_schema("supa")
    r = supa.migrate("supa", user="app_owner")
    assert r.returncode == 0, r.stderr
    assert "migrate: 0 applied" in r.stdout
    assert supa.dump_schema("supa") == dump
    assert supa.sql("supa", ROLES_SNAPSHOT) == roles


def test_instances_status_is_published_for_realtime_and_tenants_see_no_secret(supa):
    """Live status: instances (status columns only) is in supabase_realtime, nothing
    else of ours is, and what it publishes is what a tenant's RLS view shows."""
    rows = supa.sql("supa", "SELECT schemaname, tablename, attnames FROM pg_publication_tables "
                            "WHERE pubname = 'supabase_realtime' ORDER BY 1, 2")
    assert [(sch, t) for sch, t, _ in rows] == [("public", "instances")], rows
    published = set(rows[0][2])
    assert {"id", "subscription_id", "status", "desired_status", "owed_action", "health_status",
            "frontend_url", "restart_requested_at", "updated_at"} <= published, published
    secret = {"environment_vars", "claimed_by", "claim_expires_at", "config", "dokku_app_name"}
    assert not published & secret, published
    # Every published column is one a tenant may read (Realtime would drop the others).
    readable = {c for (c,) in supa.sql("supa", """
        SELECT a.attname FROM pg_attribute a WHERE a.attrelid = 'public.instances'::regclass
           AND a.attnum > 0 AND NOT a.attisdropped
           AND has_column_privilege('authenticated', a.attrelid, a.attname, 'SELECT')""")}
    assert published <= readable, published - readable
    assert not readable & {"environment_vars", "claimed_by"}

    # A tenant's view under RLS: its own instance's published columns, nobody else's.
    assert supa.psql_file("supa", SEED).returncode == 0            # the plans
    a, b = "eeeeeeee-0000-4000-8000-000000000001", "ffffffff-0000-4000-8000-000000000001"
    conn = supa.connect("supa", autocommit=False)      # everything below is rolled back
    try:
        with conn.cursor() as cur:
            for u in (a, b):
                cur.execute("INSERT INTO auth.users (id, email) VALUES (%s, %s)", (u, u[:8] + "@example.com"))
                cur.execute("""WITH s AS (INSERT INTO public.subscriptions (account_id, tier, status)
                                          VALUES (%s, 'free', 'active') RETURNING id)
                               INSERT INTO public.instances (subscription_id, dokku_app_name, subdomain,
                                                             status, environment_vars)
                               SELECT s.id, n.dokku_app_name, n.subdomain, 'running', '{"API_KEY": "sk-live"}'
                                 FROM s, public.instance_names(s.id) n""", (u,))
            cur.execute("SELECT set_config('role', 'authenticated', true), "
                        "set_config('request.jwt.claims', %s, true)",
                        ('{"role": "authenticated", "sub": "%s"}' % a,))
            cur.execute("SELECT %s FROM public.instances" % ", ".join(sorted(published)))
            seen = cur.fetchall()
            assert len(seen) == 1 and "sk-live" not in repr(seen), seen
            cur.execute("SAVEPOINT x")
            for query in ("SELECT environment_vars FROM public.instances",
                          "SELECT count(*) FROM public.instance_tokens",
                          "SELECT count(*) FROM public.instance_secrets"):
                with pytest.raises(Exception) as e:
                    cur.execute(query)
                assert "permission denied" in str(e.value), query
                cur.execute("ROLLBACK TO SAVEPOINT x")
    finally:
        conn.rollback()
        conn.close()


def test_pgtap_suite_passes_on_the_supabase_database(supa):
    r = supa.psql_file("supa", SEED)
    assert r.returncode == 0, r.stderr
    r = supa.psql_file("supa", SEED)
    assert r.returncode == 0, r.stderr
    env = dict(os.environ, PGHOST=supa.dir, PGDATABASE="supa", PGUSER="postgres")
    p = subprocess.run(["pg_prove", "--ext", ".sql", "-r", os.path.join(ROOT, "tests", "sql")],
                       env=env, capture_output=True, text=True)
    assert p.returncode == 0 and "Result: PASS" in p.stdout, p.stdout + p.stderr
