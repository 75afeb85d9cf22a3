"""The configuration template, .env.example (installed as /etc/mindroom/mindroom.env),
serves two readers: bash's `source` (scripts/stack.sh, mindroomctl) and systemd's
EnvironmentFile= (the units). With every setting uncommented both must read the
same values, and neither may choke on a line. The provisioner's own template,
packaging/provisioner.env (/etc/mindroom/provisioner.env), holds exactly what the
provisioner reads, as .env.example documents it, and none of the control plane's
secrets; an upgrade's postinst copies exactly those settings out of mindroom.env.

systemd's reading is reproduced from systemd.exec(5), EnvironmentFile=: lines
starting with '#' or ';' and lines without '=' are ignored; an unquoted value is
taken with its interior white space (a trailing "# comment" is part of it), a
backslash keeps the next character, leading and trailing white space is dropped;
a '...' value is verbatim; a "..." value knows the shell's escapes \\" \\\\ \\` \\$
and backslash-newline; a line ending in a backslash goes on.
"""
import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TEMPLATE = ROOT / ".env.example"
PROVISIONER_TEMPLATE = ROOT / "packaging/provisioner.env"
SETTING = re.compile(r"^#\s?([A-Z][A-Z0-9_]*=.*)$")
NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def uncommented(text):
    """The template with every commented-out setting ("# NAME=...") made live."""
    return "\n".join(SETTING.sub(r"\1", line) for line in text.split("\n"))


def systemd_env(text):
    """NAME -> value as systemd.exec(5)'s EnvironmentFile= rules read text."""
    env, pos, n = {}, 0, len(text)

    def rest_of_line_is_blank(p):
        e = text.find("\n", p)
        e = n if e < 0 else e
        assert text[p:e].strip(" \t\r") == "", "text after a closing quote: %r" % text[p:e]
        return e + 1

    while pos < n:
        while pos < n and text[pos] in " \t\r":
            pos += 1
        if pos >= n:
            break
        if text[pos] == "\n":
            pos += 1
            continue
        if text[pos] in "#;":
            e = text.find("\n", pos)
            pos = n if e < 0 else e + 1
            continue
        eq, nl = text.find("=", pos), text.find("\n", pos)
        nl = n if nl < 0 else nl
        if eq < 0 or eq > nl:
            pos = nl + 1  # no '=': ignored
            continue
        key = text[pos:eq].strip(" \t")
        assert NAME.fullmatch(key), "bad variable name %r" % key
        pos = eq + 1
        while pos < n and text[pos] in " \t":
            pos += 1
        if pos < n and text[pos] == "'":
            end = text.index("'", pos + 1)
            value, pos = text[pos + 1:end], rest_of_line_is_blank(end + 1)
        elif pos < n and text[pos] == '"':
            out, pos = [], pos + 1
            while text[pos] != '"':
                if text[pos] == "\\" and text[pos + 1] in '"\\`$\n':
                    if text[pos + 1] != "\n":
                        out.append(text[pos + 1])
                    pos += 2
                else:
                    out.append(text[pos])
                    pos += 1
            value, pos = "".join(out), rest_of_line_is_blank(pos + 1)
        else:
            out = []
            while pos < n and text[pos] != "\n":
                if text[pos] == "\\" and pos + 1 < n:
                    if text[pos + 1] != "\n":
                        out.append(text[pos + 1])
                    pos += 2
                else:
                    out.append(text[pos])
                    pos += 1
            value, pos = "".join(out).rstrip(" \t\r"), pos + 1
        env[key] = value
    return env


def bash_env(path):
    """NAME -> value of what `set -a; . FILE` exports in an empty bash."""
    p = subprocess.run(["env", "-i", "/bin/bash", "--noprofile", "--norc", "-c",
                        'set -a; . "$1" || exit 3; env -0', "bash", str(path)],
                       stdout=subprocess.PIPE, stderr=subprocess.PIPE, timeout=30)
    assert p.returncode == 0 and p.stderr == b"", p.stderr.decode()
    env = dict(item.split("=", 1) for item in p.stdout.decode().split("\0") if item)
    for k in ("PWD", "SHLVL", "_", "OLDPWD"):
        env.pop(k, None)
    return env


def test_every_setting_reads_the_same_in_bash_and_systemd(tmp_path):
    text = TEMPLATE.read_text()
    live = uncommented(text)
    f = tmp_path / "mindroom.env"
    f.write_text(live)
    by_systemd, by_bash = systemd_env(live), bash_env(f)
    settings = [SETTING.match(l).group(1).split("=", 1)[0] for l in text.split("\n") if SETTING.match(l)]
    assert len(settings) > 100, "the template lost its settings"
    assert len(settings) == len(set(settings)), "a setting appears twice: %s" % sorted(
        s for s in set(settings) if settings.count(s) > 1)
    assert set(by_systemd) == set(settings) | {"SUPABASE_AUTH_MODE"}
    assert by_bash == by_systemd
    # The values that need quoting to survive both.
    assert by_systemd["RESEND_FROM"] == "MindRoom <hello@mindroom.chat>"
    assert by_systemd["DATABASE_URL"].count(" ") == 3
    assert by_systemd["PROVISIONER_FRONTEND_URL"] == "{scheme}://{subdomain}.{domain}"


def test_the_template_as_shipped_reads_the_same(tmp_path):
    f = tmp_path / "mindroom.env"
    f.write_text(TEMPLATE.read_text())
    assert systemd_env(f.read_text()) == bash_env(f) == {"SUPABASE_AUTH_MODE": "jwks"}


def test_the_readers_differ_where_the_format_forbids(tmp_path):
    # What the format rules out, and why: a trailing comment is part of a systemd
    # value; an unquoted "<" is a redirection to bash.
    f = tmp_path / "bad.env"
    f.write_text("A=1   # one\n")
    assert systemd_env(f.read_text()) == {"A": "1   # one"} and bash_env(f) == {"A": "1"}
    f.write_text("B=MindRoom <hello@mindroom.chat>\n")
    p = subprocess.run(["env", "-i", "/bin/bash", "--noprofile", "--norc", "-c", '. "$1"', "b", str(f)],
                       capture_output=True, text=True)
    assert p.returncode != 0 and systemd_env(f.read_text()) == {"B": "MindRoom <hello@mindroom.chat>"}


def provisioner_reads():
    """What dokku-provisioner reads: its own settings (mr_config_* in its sources)
    and the settings of the FastCGI runtime it runs on that its unit leaves to the
    configuration (the socket is the socket unit's, the metrics directory the
    unit's; it opens no database)."""
    names = set()
    for f in (ROOT / "functions/dokku-provisioner").glob("*.c"):
        names |= set(re.findall(r'mr_config_[a-z_]+\(\s*"([A-Z][A-Z0-9_]*)"', f.read_text()))
    assert {"DOKKU_MODE", "DOKKU_PROVISIONER_TOKEN", "MINDROOM_BASE_DOMAIN"} <= names, names
    runtime = {"MR_WORKERS", "MR_MAX_BODY", "MR_READ_TIMEOUT_MS", "MR_LOG_LEVEL"}
    lib = "".join(p.read_text() for p in (ROOT / "lib").glob("*.c"))
    assert all('"%s"' % n in lib for n in runtime)
    return names | runtime


def settings(text):
    return [SETTING.match(l).group(1) for l in text.split("\n") if SETTING.match(l)]


def test_the_provisioner_template_holds_what_the_provisioner_reads_and_no_other_secret(tmp_path):
    text = PROVISIONER_TEMPLATE.read_text()
    mine = settings(text)
    names = [l.split("=", 1)[0] for l in mine]
    assert len(names) == len(set(names))
    assert set(names) == provisioner_reads()
    # Documented once: each setting as .env.example has it, default included.
    assert set(mine) <= set(settings(TEMPLATE.read_text()))
    for secret in ("DATABASE_URL", "STRIPE_SECRET_KEY", "STRIPE_WEBHOOK_SECRET", "MINDROOM_SECRETS_KEY",
                   "RESEND_API_KEY", "SUPABASE_JWT_SECRET", "MINDROOM_INTERNAL_SECRET"):
        assert not re.search(r"^[#\s]*%s=" % secret, text, re.M), secret
    f = tmp_path / "provisioner.env"
    f.write_text(text)
    assert systemd_env(text) == bash_env(f) == {}
    f.write_text(uncommented(text))
    assert systemd_env(uncommented(text)) == bash_env(f)
    assert set(bash_env(f)) == set(names)


def test_an_upgrade_copies_exactly_the_provisioner_s_settings():
    """packaging/deb/postinst's pattern, with grep -E as the postinst runs it, over
    every setting of .env.example made live: it takes the provisioner's and leaves
    the rest (DATABASE_URL, the Stripe and sealing keys, the worker's
    DOKKU_PROVISIONER_URL)."""
    postinst = (ROOT / "packaging/deb/postinst").read_text()
    (pattern,) = re.findall(r"^PROVISIONER_SETTING='([^']+)'$", postinst, re.M)
    live = uncommented(TEMPLATE.read_text())
    p = subprocess.run(["grep", "-E", pattern], input=live, capture_output=True, text=True)
    copied = {l.split("=", 1)[0] for l in p.stdout.splitlines()}
    assert copied == provisioner_reads()
