"""The systemd units and the install layout, as `make install` writes them into a
scratch root (the build under test; the host's own units beside them, so that
dependencies such as sysinit.target resolve): every unit passes
`systemd-analyze verify`, every service scores <= 2.0 in `systemd-analyze
security --offline`, stop timeouts are the deadline table's, sockets are 0660 for
nginx's group, and paths move with PREFIX/SYSCONFDIR. `make package-test` checks
the same inside a real Debian 12 root with the package installed by apt."""
import os
import re
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

import mr

ROOT = mr.ROOT
UNITS = ROOT / "packaging/systemd"


def make_install(dest, **vars):
    san = "1" if mr.build_dir().name == "san" else "0"
    args = ["make", "-s", "--no-print-directory", "SAN=" + san, "install", "DESTDIR=%s" % dest]
    args += ["%s=%s" % kv for kv in vars.items()]
    p = subprocess.run(args, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                       timeout=600)
    assert p.returncode == 0, p.stdout


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    r = tmp_path_factory.mktemp("root")
    make_install(r, PREFIX="/usr", SYSCONFDIR="/etc", UNITDIR="/lib/systemd/system")
    unitdir = r / "lib/systemd/system"
    for f in Path("/lib/systemd/system").iterdir():
        if not (unitdir / f.name).exists() and (f.is_file() or f.is_symlink()):
            shutil.copy(f, unitdir / f.name, follow_symlinks=True) if f.is_file() else None
    return r


def functions(root):
    return sorted(p.name for p in (root / "usr/lib/mindroom/functions").iterdir())


def all_units(root):
    units = ["mindroom.target", "mindroom-lifecycle.service", "mindroom-provisioner.service",
             "mindroom-provisioner.socket"]
    for f in functions(root):
        units += ["mindroom-function@%s.service" % f, "mindroom-function@%s.socket" % f]
    return units


def analyze(root, *args):
    return subprocess.run(["systemd-analyze", "--root=%s" % root] + list(args), capture_output=True,
                          text=True, timeout=60)


def test_every_unit_verifies(root):
    assert "handle-stripe-webhook" in functions(root) and "mindroom-admin" in functions(root)
    assert "mindroom-lifecycle" not in functions(root) and "dokku-provisioner" not in functions(root)
    for u in all_units(root):
        p = analyze(root, "verify", u)
        assert p.returncode == 0 and p.stdout + p.stderr == "", (u, p.stdout, p.stderr)


def test_every_service_scores_2_or_better(root):
    for u in all_units(root):
        if not u.endswith(".service"):
            continue
        p = analyze(root, "security", "--offline=true", "--no-pager", "--threshold=20", u)
        m = re.search(r"Overall exposure level for \S+: (\d+\.\d)", p.stdout + p.stderr)
        assert m and p.returncode == 0, (u, p.stdout[-2000:], p.stderr)
        assert float(m.group(1)) <= 2.0, (u, m.group(1))


def test_a_broken_unit_is_caught(root, tmp_path):
    # The checks above can fail: a unit naming a missing binary does not verify, and
    # one without the sandbox scores far above 2.
    unitdir = root / "lib/systemd/system"
    (unitdir / "mr-check.service").write_text("[Service]\nExecStart=/usr/lib/mindroom/nothere\n")
    try:
        assert analyze(root, "verify", "mr-check.service").returncode != 0
        p = analyze(root, "security", "--offline=true", "--no-pager", "--threshold=20", "mr-check.service")
        assert p.returncode != 0
    finally:
        (unitdir / "mr-check.service").unlink()


def setting(unit, key):
    vals = re.findall(r"^%s=(.*)$" % re.escape(key), (UNITS / unit).read_text(), re.M)
    assert len(vals) == 1, (unit, key, vals)
    return vals[0]


def deadlines():
    text = (ROOT / "lib/mr_deadlines.h").read_text()
    return {k: int(v) for k, v in re.findall(r"#define (MR_DL_[A-Z_]+) (\d+)", text)}


def test_stop_timeouts_outlast_each_process_s_longest_deadline():
    d = deadlines()
    # The worker: exactly the table's row, which its stop grace is checked against.
    assert int(setting("mindroom-lifecycle.service", "TimeoutStopSec")) == d["MR_DL_WORKER_STOP_S"]
    # A function drains its requests in flight: the longest is cut by nginx.
    longest = max(d["MR_DL_NGINX_LIFECYCLE_S"], d["MR_DL_NGINX_WEBHOOK_S"], d["MR_DL_NGINX_HEALTH_S"])
    assert int(setting("mindroom-function@.service", "TimeoutStopSec")) > longest
    # The provisioner's requests end before nginx's read timeout on its listener.
    prov = int(setting("mindroom-provisioner.service", "TimeoutStopSec"))
    assert prov > d["MR_DL_NGINX_PROVISIONER_S"] > d["MR_DL_PROVISIONER_REQUEST_MS"] / 1000
    for u in ("mindroom-function@.service", "mindroom-lifecycle.service", "mindroom-provisioner.service"):
        assert setting(u, "Type") == "notify" and setting(u, "KillMode") == "mixed"


def test_sockets_are_for_nginx_s_group_at_the_paths_nginx_uses():
    site = (ROOT / "nginx/mindroom.conf").read_text() + (ROOT / "nginx/api.conf").read_text()
    used = set(re.findall(r"fastcgi_pass unix:/run/mindroom/([^;$]+|\$mr_fn)\.sock;", site))
    for sock in ("mindroom-function@.socket", "mindroom-provisioner.socket"):
        assert setting(sock, "SocketMode") == "0660"
        assert setting(sock, "SocketGroup") == "mindroom-web"
        assert setting(sock, "ListenStream").startswith("/run/mindroom/")
    assert setting("mindroom-provisioner.socket", "ListenStream") == "/run/mindroom/dokku-provisioner.sock"
    assert setting("mindroom-function@.socket", "ListenStream") == "/run/mindroom/%i.sock"
    assert {"dokku-provisioner", "mindroom-admin", "handle-stripe-webhook"} <= used
    sysusers = (ROOT / "packaging/sysusers.d/mindroom.conf").read_text()
    assert re.search(r"^m\s+www-data\s+mindroom-web$", sysusers, re.M)


def test_a_local_postgresql_stops_after_the_services_that_use_it():
    # At shutdown systemd stops units in the reverse of their After= order: without
    # it a PostgreSQL on this host may go first, and the worker could not hand back
    # its lease nor a function finish its request. Ordering only: the database may
    # be on another host, where no postgresql.service exists to require.
    for u in ("mindroom-function@.service", "mindroom-lifecycle.service"):
        text = (UNITS / u).read_text()
        after = " ".join(re.findall(r"^After=(.*)$", text, re.M)).split()
        assert "postgresql.service" in after, (u, after)
        assert not re.search(r"^(Requires|Wants|BindsTo|Requisite)=.*postgresql", text, re.M), u


def unit_env_files(unit):
    return re.findall(r"^EnvironmentFile=(.*)$", (UNITS / unit).read_text(), re.M)


def test_the_provisioner_reads_its_own_configuration_not_the_control_plane_s(root):
    # mindroom.env holds DATABASE_URL with its password, the Stripe keys and the
    # sealing key; the provisioner needs none of them, and in DOKKU_MODE=local it
    # runs as root outside the sandbox.
    assert unit_env_files("mindroom-provisioner.service") == ["/etc/mindroom/provisioner.env"]
    for u in ("mindroom-lifecycle.service", "mindroom-function@.service"):
        assert unit_env_files(u) == ["/etc/mindroom/mindroom.env"]
    env = root / "etc/mindroom/provisioner.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert env.read_text() == (ROOT / "packaging/provisioner.env").read_text()


def test_the_target_wants_every_function(root):
    wants = re.findall(r"^Wants=mindroom-function@(.+)\.service$", (UNITS / "mindroom.target").read_text(), re.M)
    assert sorted(wants) == functions(root)


def test_install_layout_and_modes(root):
    env = root / "etc/mindroom/mindroom.env"
    assert stat.S_IMODE(env.stat().st_mode) == 0o600
    assert env.read_text() == (ROOT / ".env.example").read_text()
    # The templates the package's postinst makes the configuration from.
    share = root / "usr/share/mindroom"
    assert (share / "mindroom.env.example").read_text() == (ROOT / ".env.example").read_text()
    assert (share / "provisioner.env.example").read_text() == (ROOT / "packaging/provisioner.env").read_text()
    assert stat.S_IMODE((root / "usr/bin/mindroomctl").stat().st_mode) == 0o755
    for f in (root / "usr/lib/mindroom/functions").iterdir():
        assert stat.S_IMODE(f.stat().st_mode) == 0o755
    for p in root.rglob("*"):
        assert p.is_symlink() or not p.stat().st_mode & stat.S_IWOTH, p
    ctl = (root / "usr/bin/mindroomctl").read_text()
    assert "\nINSTALLED_LIBEXEC=/usr/lib/mindroom\n" in ctl
    assert "\nINSTALLED_ENV=/etc/mindroom/mindroom.env\n" in ctl
    version = (mr.build_dir() / "version.stamp").read_text().split()[0]
    p = subprocess.run([str(root / "usr/bin/mindroomctl"), "version"], capture_output=True, text=True)
    assert p.stdout == "mindroomctl %s\n" % version
    migrate = (root / "usr/lib/mindroom/migrate.sh").read_text()
    assert "\nINSTALLED_MIGRATIONS=/usr/share/mindroom/migrations\n" in migrate
    assert "\nINSTALLED_LIBEXEC=/usr/lib/mindroom\n" in migrate   # its mr-pgservice
    assert sorted(p.name for p in (root / "usr/share/mindroom/migrations").iterdir()) == \
        sorted(p.name for p in (ROOT / "sql/migrations").glob("*.sql"))


def test_other_prefixes_are_substituted_and_a_config_is_never_overwritten(tmp_path):
    make_install(tmp_path, PREFIX="/opt/mr", SYSCONFDIR="/etc/opt/mr")
    unit = (tmp_path / "opt/mr/lib/systemd/system/mindroom-lifecycle.service").read_text()
    assert "ExecStart=/opt/mr/lib/mindroom/mindroom-lifecycle" in unit
    assert "EnvironmentFile=/etc/opt/mr/mindroom/mindroom.env" in unit
    prov = (tmp_path / "opt/mr/lib/systemd/system/mindroom-provisioner.service").read_text()
    assert "EnvironmentFile=/etc/opt/mr/mindroom/provisioner.env" in prov
    for u in (tmp_path / "opt/mr/lib/systemd/system").rglob("*"):
        if u.is_file():
            assert "/usr/lib/mindroom" not in u.read_text() and "/etc/mindroom" not in u.read_text(), u
    site = tmp_path / "etc/opt/mr/nginx/sites-available/mindroom.conf"
    assert "include /opt/mr/share/mindroom/nginx/api.conf;" in site.read_text()
    api = (tmp_path / "opt/mr/share/mindroom/nginx/api.conf").read_text()
    assert "include /opt/mr/share/mindroom/nginx/fastcgi.conf;" in api and "/usr/share/mindroom" not in api
    env = tmp_path / "etc/opt/mr/mindroom/mindroom.env"
    env.write_text("DATABASE_URL=mine\n")
    prov_env = tmp_path / "etc/opt/mr/mindroom/provisioner.env"
    prov_env.write_text("DOKKU_MODE=ssh\n")
    site.write_text("server_name mine;\n")
    make_install(tmp_path, PREFIX="/opt/mr", SYSCONFDIR="/etc/opt/mr")
    assert env.read_text() == "DATABASE_URL=mine\n"
    assert site.read_text() == "server_name mine;\n"
    assert prov_env.read_text() == "DOKKU_MODE=ssh\n"


def deb_version(tree):
    """The package's version for a source tree: scripts/version.sh made a Debian
    version the way packaging/deb/build.sh makes it."""
    assert "version=$(scripts/version.sh | tr -- '-_' '++')" in (ROOT / "packaging/deb/build.sh").read_text()
    v = subprocess.run([str(tree / "scripts/version.sh")], capture_output=True, text=True,
                       check=True).stdout.strip()
    return v.replace("-", "+").replace("_", "+")


@pytest.mark.skipif(not shutil.which("dpkg"), reason="no dpkg")
def test_each_later_commit_packages_as_an_upgrade(tmp_path):
    """apt installs a later commit's package over an earlier one's only if dpkg
    orders it after: untagged commits, a tag, commits after the tag, and from an
    install of the older form VERSION+g<hash>. Fixed dates and names make the
    hashes the same on every run."""
    repo = tmp_path / "repo"
    (repo / "scripts").mkdir(parents=True)
    shutil.copy(ROOT / "scripts/version.sh", repo / "scripts/version.sh")
    (repo / "VERSION").write_text("0.1.0\n")
    env = dict(os.environ, GIT_AUTHOR_NAME="t", GIT_AUTHOR_EMAIL="t@example.com",
               GIT_COMMITTER_NAME="t", GIT_COMMITTER_EMAIL="t@example.com",
               GIT_CONFIG_GLOBAL="/dev/null", GIT_CONFIG_NOSYSTEM="1")

    def git(*args):
        return subprocess.run(["git", "-C", str(repo)] + list(args), env=env, capture_output=True,
                              text=True, check=True).stdout.strip()

    git("init", "-q")
    git("add", ".")
    versions = []
    for i in range(24):
        env["GIT_AUTHOR_DATE"] = env["GIT_COMMITTER_DATE"] = "2026-01-01T00:%02d:00Z" % i
        git("commit", "-q", "--allow-empty", "-m", "c%d" % i)
        if i == 0:
            h = git("rev-parse", "--short=12", "HEAD")
            versions.append("0.1.0+g%s" % h)   # a package built before the count
        if i == 16:
            git("tag", "v0.2.0")
        versions.append(deb_version(repo))
    assert "0.2.0" in versions and any(v.startswith("0.2.0+1+g") for v in versions), versions
    downgrades = [(older, newer) for older, newer in zip(versions, versions[1:])
                  if subprocess.run(["dpkg", "--compare-versions", newer, "gt", older]).returncode != 0]
    assert downgrades == [], "apt would see these upgrades as downgrades: %s" % downgrades
    # Local changes: a package of them is after the commit's own.
    (repo / "VERSION").write_text("0.2.0\n")
    dirty = deb_version(repo)
    assert dirty.endswith(".dirty") or dirty.endswith("+dirty"), dirty
    assert subprocess.run(["dpkg", "--compare-versions", dirty, "gt", versions[-1]]).returncode == 0
