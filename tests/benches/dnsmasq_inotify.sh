#!/bin/bash
# dnsmasq's own CPU per new hosts file, with N files already in its
# directories: what one guest connecting costs dnsmasq, apart from qnet.
#
#   sudo tests/benches/dnsmasq_inotify.sh [N...]     (default: 100 1000 3000)
#
# For each N: a network namespace of its own with a bridge, a dnsmasq with
# qnet's options (dhcp-hostsdir, hostsdir, log-dhcp) and N reservations and
# N names; then 200 more reservation files, 200 more name files, and 200
# more of both, one every 10 ms, renamed into place as qnet writes them.
# Prints dnsmasq's utime+stime per file added (clock ticks: 10 ms, over 200
# files). Touches nothing outside that namespace and a directory in
# /dev/shm; both go on exit, and dnsmasq is stopped by its pid.
set -euo pipefail
[ $# -gt 0 ] || set -- 100 1000 3000
ADDED=200

mac() { printf '52:54:00:%02x:%02x:%02x' $(($1 >> 16 & 255)) $(($1 >> 8 & 255)) $(($1 & 255)); }
ip4() { echo "10.99.$((($1 + 2) >> 8 & 255)).$((($1 + 2) & 255))"; }
dhcp_file() { echo "$(mac "$1"),$(ip4 "$1"),g$1" > "$DIR/t"; mv "$DIR/t" "$DIR/dhcp/$(mac "$1")"; }
dns_file() { echo "$(ip4 "$1") g$1.lab.qnet g$1" > "$DIR/t"; mv "$DIR/t" "$DIR/dns/g$1"; }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$PID/stat"; }

measure() { # N KIND: dhcp | dns | both
    local n=$1 kind=$2
    NS=qnet-bench-dnsmasq-$$ DIR=$(mktemp -d /dev/shm/qnet-bench-dnsmasq.XXXXXX) PID=
    ip netns add "$NS"
    ip -n "$NS" link set lo up
    ip -n "$NS" link add br0 type bridge
    ip -n "$NS" addr add 10.99.0.1/16 dev br0
    ip -n "$NS" link set br0 up
    mkdir "$DIR/dhcp" "$DIR/dns"
    for i in $(seq 1 "$n"); do dhcp_file "$i"; dns_file "$i"; done
    cat > "$DIR/conf" <<CONF
interface=br0
bind-dynamic
listen-address=10.99.0.1
no-hosts
domain=lab.qnet
local=/lab.qnet/
dhcp-range=10.99.0.2,10.99.255.254,255.255.0.0,12h
dhcp-authoritative
dhcp-lease-max=65000
dhcp-hostsdir=$DIR/dhcp
hostsdir=$DIR/dns
dhcp-leasefile=$DIR/leases
pid-file=$DIR/pid
log-facility=$DIR/log
log-dhcp
user=root
CONF
    ip netns exec "$NS" dnsmasq --conf-file="$DIR/conf"
    sleep 1
    PID=$(cat "$DIR/pid")
    local before after
    before=$(cpu_ticks)
    for i in $(seq $((n + 1)) $((n + ADDED))); do
        [ "$kind" = dns ] || dhcp_file "$i"
        [ "$kind" = dhcp ] || dns_file "$i"
        sleep 0.01
    done
    sleep 1
    after=$(cpu_ticks)
    awk -v n="$n" -v k="$kind" -v t=$((after - before)) -v hz="$(getconf CLK_TCK)" -v m=$ADDED \
        'BEGIN { printf "| %d | %s | %.2f ms |\n", n, k, t * 1000 / hz / m }'
    cleanup
}

cleanup() {
    [ -z "${PID:-}" ] || kill "$PID" 2>/dev/null || true
    PID=
    [ -z "${NS:-}" ] || ip netns del "$NS" 2>/dev/null || true
    [ -z "${DIR:-}" ] || rm -rf "$DIR"
    NS= DIR=
}
trap cleanup EXIT

dnsmasq --version | head -1
echo "| files already there (of each kind) | files added per guest | dnsmasq CPU per guest |"
echo "|---|---|---|"
for n in "$@"; do
    for kind in dhcp dns both; do measure "$n" "$kind"; done
done
