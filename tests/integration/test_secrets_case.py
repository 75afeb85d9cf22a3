"""mr-secrets (mindroomctl env set, rotate-secrets-key) against a real database: an
instance id typed in upper case (which mindroomctl, mr-secrets and PostgreSQL all
accept) seals for the id as the database gives it back, so the worker and a key
rotation open it."""
import base64
import os
import subprocess

import mr

IID = "abcdef01-0000-4000-8000-0000000000aa"
USER = "aaaaaaaa-0000-4000-8000-000000000001"


def _mrs(pg, db, *args, stdin=None, **env):
    e = dict(os.environ, DATABASE_URL=pg.conninfo(db), **env)
    return subprocess.run([str(mr.build_dir() / "bin/mr-secrets"), *args], input=stdin,
                          capture_output=True, text=True, env=e)


def test_a_secret_set_for_an_upper_case_instance_id_opens_after_a_key_rotation(pg):
    db = "secrets_uuid_case"
    pg.sql("DROP DATABASE IF EXISTS %s" % db)
    pg.sql("CREATE DATABASE %s TEMPLATE mindroom_template" % db)
    pg.sql("INSERT INTO auth.users (id, email) VALUES (%s, 'a@example.com')", USER, dbname=db)
    pg.sql("""WITH s AS (INSERT INTO public.subscriptions (account_id, tier, status)
                         VALUES (%s, 'free', 'active') RETURNING id)
              INSERT INTO public.instances (id, subscription_id, dokku_app_name, subdomain, status)
              SELECT %s, s.id, n.dokku_app_name, n.subdomain, 'running'
                FROM s, public.instance_names(s.id) n""", USER, IID, dbname=db)
    old = base64.b64encode(os.urandom(32)).decode()
    new = base64.b64encode(os.urandom(32)).decode()
    p = _mrs(pg, db, "set", IID.upper(), "OPENAI_API_KEY", stdin="sk-test\n",
             MINDROOM_SECRETS_KEY=old)
    assert p.returncode == 0, p          # accepted, stored for the instance
    # A rotation (or the worker) opens rows by the id the database returns.
    p = _mrs(pg, db, "reseal", MINDROOM_SECRETS_KEY=new, MINDROOM_SECRETS_KEY_PREVIOUS=old)
    assert p.returncode == 0, p.stderr
