#!/bin/sh
# Boot a tiny guest on a bridge through qnet-bridge-helper and fetch a page
# from it, all inside a private network namespace (see tests/src/bin/qnet-demo.rs).
# Needs: qemu-system-x86, dnsmasq-base, busybox-static, cpio, iproute2 (and
# network access to Debian's archive once, to fetch the guest kernel).
set -eu
cd "$(dirname "$0")"
cargo build --quiet --workspace --bins
if [ "$(id -u)" -ne 0 ]; then
    exec sudo target/debug/qnet-demo
fi
exec target/debug/qnet-demo
