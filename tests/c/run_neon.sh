#!/bin/sh
# Build maskparam's tap kernel for ARM64 (NEON) with a cross compiler and run its standalone
# test (tests/c/test_tapconv.c) under qemu-aarch64. On Debian/Ubuntu, as root:
#   apt-get update && apt-get install -y gcc-aarch64-linux-gnu qemu-user
# Then, from anywhere: sh tests/c/run_neon.sh   (exit 0: every case matches the naive conv)
set -eu
here=$(cd "$(dirname "$0")" && pwd)
cc=${AARCH64_CC:-aarch64-linux-gnu-gcc}
out=$(mktemp -d)
trap 'rm -rf "$out"' EXIT
"$cc" -O2 -fopenmp -std=c11 -ffp-contract=fast -Wall -Wextra -Werror -static \
    -o "$out/test_tapconv" "$here/test_tapconv.c" -lm
qemu-aarch64 "$out/test_tapconv"
