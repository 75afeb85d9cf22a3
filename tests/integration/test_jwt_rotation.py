"""Rotating SUPABASE_JWT_SECRET without downtime: SUPABASE_JWT_SECRET_PREVIOUS is
accepted alongside it, through real nginx, in the order README "operations"
gives (accept the new one first, then sign with it, then drop the old one)."""
import secrets
import subprocess
import time

import mr

OLD, NEW, OTHER = (secrets.token_urlsafe(40) for _ in range(3))
FN = "check-instance-health"


def token(secret):
    now = int(time.time())
    return mr.make_jwt({"role": "service_role", "iat": now, "exp": now + 600}, secret)


def status(s, secret):
    return s.call("GET", FN, token=token(secret)).status


def test_rotation_steps_each_accept_what_they_should(pg):
    with mr.Stack(pg, env={"SUPABASE_JWT_SECRET": OLD}, functions=[FN]) as s:
        assert (status(s, OLD), status(s, NEW)) == (200, 401)
        # 1. Accept the new secret too, still signing with the old one.
        s.env["SUPABASE_JWT_SECRET_PREVIOUS"] = NEW
        s.restart_function(FN)
        assert (status(s, OLD), status(s, NEW), status(s, OTHER)) == (200, 200, 401)
        # 2. Sign with the new one; tokens of the old one stay valid until they expire.
        s.env.update(SUPABASE_JWT_SECRET=NEW, SUPABASE_JWT_SECRET_PREVIOUS=OLD)
        s.restart_function(FN)
        assert (status(s, OLD), status(s, NEW), status(s, OTHER)) == (200, 200, 401)
        # 3. Drop the old one.
        del s.env["SUPABASE_JWT_SECRET_PREVIOUS"]
        s.restart_function(FN)
        assert (status(s, OLD), status(s, NEW)) == (401, 200)


def test_a_short_previous_secret_stops_start_up():
    env = {"PATH": "/usr/bin:/bin", "SUPABASE_JWT_SECRET": NEW,
           "SUPABASE_JWT_SECRET_PREVIOUS": "q7Zx9-tiny", "MR_SOCKET": "/nonexistent/x.sock"}
    p = subprocess.run([str(mr.build_dir() / "bin" / FN)], env=env, stdout=subprocess.PIPE,
                       stderr=subprocess.PIPE, text=True, timeout=30)
    assert p.returncode == 2, (p.returncode, p.stderr)
    assert "SUPABASE_JWT_SECRET_PREVIOUS" in p.stderr and "q7Zx9" not in p.stderr, p.stderr
