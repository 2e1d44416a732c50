# shellcheck shell=bash
# Helpers shared by every script in scripts/ (sourced, not run): one-line usage errors and shell quoting.

# die MESSAGE: one-line usage error on stderr, exit status 2.
die() {
  echo "$(basename "$0"): $*" >&2
  exit 2
}

# need FLAG ARG-COUNT VALUE: fails unless FLAG has a value (`need "$1" "$#" "${2:-}"` in a parse loop).
need() {
  [[ "$2" -ge 2 && "${3:-}" != --* ]] || die "$1 needs a value"
}

# require FLAG VALUE: fails when a required flag was not given.
require() {
  [[ -n "$2" ]] || die "missing required argument $1 (see --help)"
}

# once FLAG [WHAT]: fails when FLAG, or another flag that sets WHAT (default: FLAG's own value), was given
# before; call it in a parse loop for options that take one value (`once "$1" "the setup command"`).
declare -gA _lib_given=()
once() {
  local what="${2:-$1}" earlier
  earlier="${_lib_given[$what]:-}"
  if [[ -n "$earlier" ]]; then
    [[ "$earlier" != "$1" ]] || die "$1 given twice: give it once"
    die "$earlier and $1 both set $what: give one of them"
  fi
  _lib_given[$what]="$1"
}

# plain_name FLAG VALUE: fails unless VALUE is a plain name (letters, digits, '_', '.', '-'), safe in paths.
plain_name() {
  [[ "$2" =~ ^[A-Za-z0-9_.-]+$ ]] || die "$1 must be letters, digits, '_', '.', '-': got $2"
}

# quote ARG: ARG as one shell word; plain words stay bare, anything else is single-quoted.
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    local squote="'"
    printf "'%s'" "${1//${squote}/${squote}\\${squote}${squote}}"
  fi
}

# quote_all ARGS...: the arguments as one line of shell words.
quote_all() {
  local out="" arg
  for arg in "$@"; do
    out+="${out:+ }$(quote "$arg")"
  done
  printf '%s' "$out"
}
