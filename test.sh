#!/bin/sh
# The README's test command: installs the missing prerequisites
# (scripts/setup-host), then runs the whole test suite. The tests need root
# (they create network namespaces, bridges, TAPs and boot QEMU guests, all
# inside namespaces they create and delete): as another user, cargo builds
# as you and runs each test binary through sudo. Extra arguments go to
# `cargo test` (e.g. ./test.sh -p qnet-hookd).
set -eu
cd "$(dirname "$0")"
scripts/setup-host test
if [ "$(id -u)" -ne 0 ]; then
    host=$(rustc -vV | sed -n 's/^host: //p' | tr 'a-z-' 'A-Z_')
    export "CARGO_TARGET_${host}_RUNNER=sudo -E"
fi
exec cargo test --workspace "$@"
