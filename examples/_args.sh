# Argument handling shared by the example scripts (sourced, not run).
#
# parse_example_args DEFAULT_DIR "$@"
#   With no argument, -h or --help: prints the calling script's header comment and exits 2.
#   Otherwise sets ROOT (the first argument), DIR (the second, unless it looks like a Hydra override
#   key=value; default DEFAULT_DIR) and OVERRIDES (an array of the remaining arguments).
parse_example_args() {
  local default_dir=$1
  shift
  if [ "$#" -lt 1 ] || [ "$1" = "-h" ] || [ "$1" = "--help" ]; then
    sed -n '2,/^set -euo/p' "$0" | sed '$d' | sed 's/^# \{0,1\}//'
    exit 2
  fi
  ROOT=$1
  shift
  DIR=$default_dir
  if [ "$#" -gt 0 ] && [[ "$1" != *=* ]]; then
    DIR=$1
    shift
  fi
  OVERRIDES=("$@")
}
