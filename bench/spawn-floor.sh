#!/usr/bin/env bash
# What each descriptor the service holds open costs a spawn: bench/spawn-floor.c (a C loop
# of posix_spawn + wait of /bin/true with two pipes) with 0, 1,000 and 2,000 descriptors
# more, by turns, ROUNDS times (default 2). Needs gcc.
#
#   bench/spawn-floor.sh [ROUNDS] [COUNT]
set -euo pipefail
rounds=${1:-2}
count=${2:-2000}
here=$(cd "$(dirname "$0")" && pwd)
binary=$(mktemp)
trap 'rm -f "$binary"' EXIT
gcc -O2 -o "$binary" "$here/spawn-floor.c"
for _ in $(seq "$rounds"); do
  for extra in 0 1000 2000; do
    "$binary" "$count" "$extra"
  done
done
