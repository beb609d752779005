# Shared by the tpu/*.sh scripts (sourced, not run): flag parsing, the gcloud target flags, and `run`,
# which prints a command instead of running it under --dry-run.
#
# A script sets USAGE (its --help text) and FLAGS (the flags it accepts, without dashes; a trailing '!'
# marks a boolean flag), then calls `parse_flags "$@"`. Each flag lands in a variable opt_<name> with dashes
# turned into underscores (--accelerator-type -> opt_accelerator_type); booleans are 0 or 1. --set may be
# repeated and collects into the array SETS; everything after `--` collects into EXTRA.
set -euo pipefail

REMOTE_DIR="vlm_jax"  # the project's folder in the home directory of every TPU worker
SCRIPT="$(basename "$0")"
SETS=()
EXTRA=()

die() {
  echo "$SCRIPT: $*" >&2
  exit 2
}

# Prints its arguments as one shell-ready line: plain words as they are, anything else single-quoted
# (only the value of a --flag=value word, so it reads like what one would type).
quote() {
  local out="" word flag
  for word in "$@"; do
    flag=""
    if [[ "$word" =~ ^(--[A-Za-z0-9-]+=)(.*)$ ]]; then
      flag="${BASH_REMATCH[1]}"; word="${BASH_REMATCH[2]}"
    fi
    if [[ "$word" =~ ^[A-Za-z0-9_@%+=:,./~-]+$ ]]; then
      out+="$flag$word "
    else
      out+="$flag'${word//\'/\'\\\'\'}' "
    fi
  done
  echo "${out% }"
}

# Runs a command; under --dry-run prints it instead (one line, copy-pasteable).
run() {
  if [[ "${opt_dry_run:-0}" == 1 ]]; then
    quote "$@"
  else
    echo "+ $(quote "$@")" >&2
    "$@"
  fi
}

_flag_spec() {  # prints "bool" or "value" for an accepted flag name, nothing otherwise
  local f
  for f in "${FLAGS[@]}" dry-run! help!; do
    if [[ "$f" == "$1!" ]]; then echo bool; return; fi
    if [[ "$f" == "$1" ]]; then echo value; return; fi
  done
}

parse_flags() {
  local f var
  for f in "${FLAGS[@]}" dry-run! help!; do  # defaults: empty values, booleans off
    var="opt_${f%!}"; var="${var//-/_}"
    if [[ "$f" == *! ]]; then printf -v "$var" 0; else printf -v "$var" ''; fi
  done
  while (($#)); do
    local arg="$1" name value spec
    shift
    if [[ "$arg" == "--" ]]; then EXTRA=("$@"); break; fi
    [[ "$arg" == --* ]] || die "unexpected argument '$arg' (see --help)"
    name="${arg#--}"; name="${name%%=*}"
    spec="$(_flag_spec "$name")"
    [[ -n "$spec" ]] || die "unknown flag --$name (see --help)"
    var="opt_${name//-/_}"
    if [[ "$spec" == bool ]]; then
      [[ "$arg" != *=* ]] || die "--$name takes no value"
      printf -v "$var" 1
      continue
    fi
    if [[ "$arg" == *=* ]]; then
      value="${arg#*=}"
    else
      (($#)) || die "--$name needs a value"
      value="$1"; shift
    fi
    if [[ "$name" == set ]]; then SETS+=("$value"); else printf -v "$var" '%s' "$value"; fi
  done
  if [[ "$opt_help" == 1 ]]; then
    echo "$USAGE"
    exit 0
  fi
}

# Fails with a message naming every missing flag, e.g. `require name zone`.
require() {
  local f var missing=()
  for f in "$@"; do
    var="opt_${f//-/_}"
    [[ -n "${!var}" ]] || missing+=("--$f")
  done
  ((${#missing[@]} == 0)) || die "missing required flag(s): ${missing[*]} (see --help)"
}

# gcloud flags that pick the TPU's zone (and project, when given; otherwise gcloud's default project).
target_flags() {
  TARGET=(--zone="$opt_zone")
  if [[ -n "${opt_project:-}" ]]; then TARGET+=(--project="$opt_project"); fi
}

# Runs one shell command line on TPU workers (default: all of them, in parallel).
on_workers() {
  local workers="$1" command="$2"
  run gcloud compute tpus tpu-vm ssh "$opt_name" "${TARGET[@]}" --worker="$workers" --command="$command"
}
