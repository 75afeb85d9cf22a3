"""The configuration template, .env.example (installed as /etc/mindroom/mindroom.env),
serves two readers: bash's `source` (scripts/stack.sh, mindroomctl) and systemd's
EnvironmentFile= (the units). With every setting uncommented both must read the
same values, and neither may choke on a line.

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
