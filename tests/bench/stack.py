#!/usr/bin/env python3
"""A stack for scripts/bench.sh: the integration harness's cluster (fsync on)
and Stack, with the release build, `noop`, `bare` and three bench-only locations:

    /bench/static   nginx answers `return 200` itself (the ceiling)
    /bench/bare     libfcgi alone (tests/bench/bare.c): the reference for a function
    /bench/noop     the noop function (libmindroom's own cost per request)

Writes shell `export` lines describing the stack to ENVFILE, then runs until
SIGTERM/SIGINT, when it stops everything.

    python3 tests/bench/stack.py ENVFILE
"""
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "tests/integration"))
os.environ.setdefault("MR_BUILD", "build/release")
import mr  # noqa: E402

BENCH_LOCATIONS = """
location = /bench/static {
    access_log off;
    default_type application/json;
    return 200 '{"ok":true}';
}
location = /bench/bare {
    access_log off;
    fastcgi_pass unix:@RUN@/sock/bare.sock;
    include @ROOT@/nginx/fastcgi.conf;
}
location = /bench/noop {
    access_log off;
    fastcgi_pass unix:@RUN@/sock/noop.sock;
    include @ROOT@/nginx/fastcgi.conf;
    fastcgi_param SCRIPT_NAME /bench/noop;
    fastcgi_param PATH_INFO "";
}
"""


def main():
    envfile = Path(sys.argv[1])
    signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))
    pg = mr.Cluster(fsync=True)
    try:
        pg.make_template()
        workers = int(os.environ.get("MR_WORKERS", os.cpu_count() or 2))
        with mr.Stack(pg, workers=workers, extra_functions=("noop", "bare"),
                      nginx_extra=BENCH_LOCATIONS) as s:
            lines = {
                "BENCH_API": s.base_url,
                "BENCH_PROVISIONER": s.provisioner_url,
                "BENCH_DB": s.pg.conninfo(s.db),
                "BENCH_RUN": str(s.run),
                "BENCH_FUNCTIONS": " ".join(s.functions),
                "SERVICE_TOKEN": s.jwt(exp_in=86400),
            }
            for k in ("SUPABASE_JWT_SECRET", "STRIPE_WEBHOOK_SECRET", "DOKKU_PROVISIONER_TOKEN",
                      "MR_WORKERS"):
                lines[k] = s.env[k]
            lines["BENCH_PID_nginx"] = str(s.nginx.pid)
            for name in s.functions:
                lines["BENCH_PID_" + name.replace("-", "_")] = str(s.master_pid(name))
            tmp = envfile.with_suffix(".tmp")
            tmp.write_text("".join("export %s='%s'\n" % kv for kv in lines.items()))
            tmp.rename(envfile)
            while True:
                time.sleep(3600)
    finally:
        pg.destroy()


if __name__ == "__main__":
    main()
