# load-env.sh: sourced by scripts/stack.sh and scripts/mindroomctl (`make install`
# puts its text into the installed mindroomctl), so both read their configuration
# the same way.
#
# load_env FILE...: sources each existing file with `set -a`, lowest precedence
# first; what was already exported wins over every file (its value is put back
# afterwards). A file that cannot be read or sourced ends the script (status 2).
load_env() {
  local f name
  local -A before=()
  for name in $(compgen -e); do before[$name]=${!name}; done
  for f in "$@"; do
    [ -f "$f" ] || continue
    [ -r "$f" ] || load_env_die "cannot read $f"
    set -a
    # shellcheck disable=SC1090
    . "$f" || load_env_die "$f is not a valid env file"
    set +a
  done
  for name in "${!before[@]}"; do  # only those a file changed (a readonly one cannot be)
    [ "${!name-}" = "${before[$name]}" ] || printf -v "$name" '%s' "${before[$name]}"
  done
}

load_env_die() { printf '%s: %s\n' "${PROG:-${0##*/}}" "$*" >&2; exit 2; }
