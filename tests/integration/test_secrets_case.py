"""mr-secrets (mindroomctl env set, rotate-secrets-key) against a real database: an
instance id typed in upper case (which mindroomctl, mr-secrets and PostgreSQL all
accept) seals for the id as the database gives it back, so the worker and a key
rotation open it; a MINDROOM_SECRETS_KEY that is not the key the stored secrets are
sealed with is refused before anything is written, while a rotation goes through."""
import base64
import os
import subprocess

import mr

IID = "abcdef01-0000-4000-8000-0000000000aa"
USER = "aaaaaaaa-0000-4000-8000-000000000001"


def _database(pg, db):
    """A fresh database from the template, with one running instance (IID)."""
    pg.sql("DROP DATABASE IF EXISTS %s" % db)
    pg.sql("CREATE DATABASE %s TEMPLATE mindroom_template" % db)
    pg.sql("INSERT INTO auth.users (id, email) VALUES (%s, 'a@example.com')", USER, dbname=db)
    pg.sql("""WITH s AS (INSERT INTO public.subscriptions (account_id, tier, status)
                         VALUES (%s, 'free', 'active') RETURNING id)
              INSERT INTO public.instances (id, subscription_id, dokku_app_name, subdomain, status)
              SELECT %s, s.id, n.dokku_app_name, n.subdomain, 'running'
                FROM s, public.instance_names(s.id) n""", USER, IID, dbname=db)


def _ctl(pg, db, *args, stdin=None, **env):
    """scripts/mindroomctl as an operator runs it, on this database (no .env, no stack)."""
    e = {k: os.environ[k] for k in ("PATH", "HOME", "LANG") if k in os.environ}
    e.update(DATABASE_URL=pg.conninfo(db), MR_BIN_DIR=str(mr.build_dir() / "bin"),
             MR_RUN_DIR="/nonexistent-mindroomctl-stack", MR_ENV_FILE="/nonexistent-mindroomctl.env")
    e.update({k: v for k, v in env.items() if v is not None})
    return subprocess.run([str(mr.ROOT / "scripts/mindroomctl"), *args], input=stdin or "",
                          capture_output=True, text=True, env=e, timeout=60)


def _key():
    return base64.b64encode(os.urandom(32)).decode()


def _mrs(pg, db, *args, stdin=None, **env):
    e = dict(os.environ, DATABASE_URL=pg.conninfo(db), **env)
    return subprocess.run([str(mr.build_dir() / "bin/mr-secrets"), *args], input=stdin,
                          capture_output=True, text=True, env=e)


def test_a_secret_set_for_an_upper_case_instance_id_opens_after_a_key_rotation(pg):
    db = "secrets_uuid_case"
    _database(pg, db)
    old = base64.b64encode(os.urandom(32)).decode()
    new = base64.b64encode(os.urandom(32)).decode()
    p = _mrs(pg, db, "set", IID.upper(), "OPENAI_API_KEY", stdin="sk-test\n",
             MINDROOM_SECRETS_KEY=old)
    assert p.returncode == 0, p          # accepted, stored for the instance
    # A rotation (or the worker) opens rows by the id the database returns.
    p = _mrs(pg, db, "reseal", MINDROOM_SECRETS_KEY=new, MINDROOM_SECRETS_KEY_PREVIOUS=old)
    assert p.returncode == 0, p.stderr


def test_env_set_refuses_a_key_the_stored_secrets_are_not_sealed_with(pg):
    """A value sealed under a key the lifecycle worker does not have makes every
    update of the instance fail ("cannot be opened with the configured
    MINDROOM_SECRETS_KEY"). The stored secrets name the keys they are sealed with:
    when none of them is MINDROOM_SECRETS_KEY or one of MINDROOM_SECRETS_KEY_PREVIOUS,
    `env set` refuses (exit 2, one line naming the variable) and writes nothing.
    The first secret ever stored has nothing to be compared with; a rotation in
    progress (the new key current, the old one previous) goes through."""
    db = "secrets_wrong_key"
    _database(pg, db)

    def state():
        return (pg.sql("SELECT kind, name, ciphertext, digest FROM public.instance_secrets "
                       "ORDER BY kind, name", dbname=db),
                pg.sql("SELECT config_version FROM public.instances WHERE id = %s", IID, dbname=db))

    real, other, new = _key(), _key(), _key()
    # Nothing stored yet: whatever key is given is the first.
    p = _ctl(pg, db, "env", "set", IID, "FOO", stdin="v1\n", MINDROOM_SECRETS_KEY=real)
    assert p.returncode == 0 and "owes an update" in p.stdout, p
    before = state()
    for env in ({"MINDROOM_SECRETS_KEY": other},
                {"MINDROOM_SECRETS_KEY": other, "MINDROOM_SECRETS_KEY_PREVIOUS": new}):
        for name in ("FOO2", "FOO"):          # a new variable, and one already set
            p = _ctl(pg, db, "env", "set", IID, name, stdin="x\n", **env)
            assert p.returncode == 2, (env.keys(), name, p)
            assert "MINDROOM_SECRETS_KEY" in p.stderr and len(p.stderr.strip().splitlines()) == 1, p.stderr
            assert "owes an update" not in p.stdout and "unchanged" not in p.stdout, p.stdout
            assert state() == before
    # Nor does a re-seal start with a keyring that opens none of them.
    p = _ctl(pg, db, "rotate-secrets-key", MINDROOM_SECRETS_KEY=other)
    assert p.returncode == 2 and "MINDROOM_SECRETS_KEY" in p.stderr, p
    assert state() == before
    # A rotation: the new key current and the old one previous set, re-seal, the old key dropped.
    p = _ctl(pg, db, "env", "set", IID, "FOO3", stdin="v3\n",
             MINDROOM_SECRETS_KEY=new, MINDROOM_SECRETS_KEY_PREVIOUS=real)
    assert p.returncode == 0 and "owes an update" in p.stdout, p
    p = _ctl(pg, db, "rotate-secrets-key", MINDROOM_SECRETS_KEY=new, MINDROOM_SECRETS_KEY_PREVIOUS=real)
    assert p.returncode == 0 and " 1 re-sealed" in p.stdout, p
    p = _ctl(pg, db, "env", "set", IID, "FOO4", stdin="v4\n", MINDROOM_SECRETS_KEY=new)
    assert p.returncode == 0 and "owes an update" in p.stdout, p
    # Now the old key alone is the stranger.
    before = state()
    p = _ctl(pg, db, "env", "set", IID, "FOO5", stdin="v5\n", MINDROOM_SECRETS_KEY=real)
    assert p.returncode == 2 and "MINDROOM_SECRETS_KEY" in p.stderr, p
    assert state() == before
