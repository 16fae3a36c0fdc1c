#!/bin/sh
# qnet-hookd's default NAT network, a tiny guest on it through
# qnet-bridge-helper, a port forward host:8080 -> guest:80 and a fetch
# through it from an "outside" namespace; all inside private namespaces
# (see tests/src/bin/qnet-demo.rs).
# Installs the packages it needs first (scripts/setup-host: apt-get, through
# sudo if you are not root; the list is scripts/packages), and needs network
# access to Debian's archive once, to fetch the guest kernel.
set -eu
cd "$(dirname "$0")"
scripts/setup-host demo
cargo build --quiet --workspace --bins
if [ "$(id -u)" -ne 0 ]; then
    exec sudo target/debug/qnet-demo
fi
exec target/debug/qnet-demo
