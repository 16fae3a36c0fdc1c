#!/bin/bash
# Builds the tiny qnet test guest: OUTDIR/vmlinuz and OUTDIR/initrd.gz.
#
#   tests/guest/build-guest.sh OUTDIR
#
# Kernel: Debian's cloud kernel (the newest linux-image-<ver>-cloud-amd64 that
# linux-image-cloud-amd64 depends on), fetched with apt-get download. Set
# QNET_GUEST_KERNEL_DEB=/path/to/linux-image-...deb to use a local package.
# Initramfs: static busybox, /init (this directory's `init`), the udhcpc
# script, the virtio-net modules with their dependencies, and a static UDP
# echo server when a C compiler with a static libc is at hand.
#
# Idempotent and safe to run from parallel test processes: it exits at once
# when OUTDIR holds a build of the current inputs (this script and its
# sibling files), builds under an flock on OUTDIR.lock, in a temporary
# directory renamed into place at the end, so a half build is never seen.
#
# Needs: apt-get/dpkg (Debian), busybox-static, cpio, gzip, util-linux (flock).
set -euo pipefail

die() { echo "build-guest: error: $*" >&2; exit 1; }
note() { echo "build-guest: $*" >&2; }

[ $# -eq 1 ] || die "usage: $0 OUTDIR"
HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
OUTDIR=$(realpath -m "$1")

# Everything the guest is made of; a change to any of it means a rebuild.
INPUTS=(build-guest.sh init udhcpc.script udpecho.c)
STAMP=$(cd "$HERE" && cat "${INPUTS[@]}" | sha256sum | cut -d' ' -f1)

up_to_date() {
    [ -s "$OUTDIR/vmlinuz" ] && [ -s "$OUTDIR/initrd.gz" ] &&
        [ "$(cat "$OUTDIR/inputs.sha256" 2>/dev/null)" = "$STAMP" ]
}
up_to_date && exit 0

# --- prerequisites: say which package provides what is missing -------------
need() { # need COMMAND PACKAGE
    command -v "$1" >/dev/null 2>&1 || die "'$1' not found: apt-get install $2"
}
need apt-get apt
need apt-cache apt
need dpkg dpkg
need cpio cpio
need gzip gzip
need flock util-linux
need sha256sum coreutils
BUSYBOX=/bin/busybox
[ -x "$BUSYBOX" ] || die "$BUSYBOX not found: apt-get install busybox-static"
# The initramfs has no shared libraries: a dynamic busybox cannot run there.
if LC_ALL=C ldd "$BUSYBOX" >/dev/null 2>&1; then
    die "$BUSYBOX is dynamically linked: apt-get install busybox-static"
fi

# --- one builder at a time ----------------------------------------------------
mkdir -p "$(dirname "$OUTDIR")"
exec 9>"$OUTDIR.lock"
flock 9
up_to_date && exit 0 # another process built it while we waited

WORK=$(mktemp -d "$OUTDIR.tmp.XXXXXX")
trap 'rm -rf "$WORK"' EXIT
# apt-get download fetches as the _apt user when it may write the directory.
chmod 755 "$WORK"
mkdir "$WORK/dl" "$WORK/kernel" "$WORK/root" "$WORK/out"
chown _apt "$WORK/dl" 2>/dev/null || true

# --- kernel ----------------------------------------------------------------
kernel_package() {
    apt-cache depends linux-image-cloud-amd64 2>/dev/null |
        awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
if [ -n "${QNET_GUEST_KERNEL_DEB:-}" ]; then
    DEB=$(realpath "$QNET_GUEST_KERNEL_DEB")
else
    KPKG=$(kernel_package)
    if [ -z "$KPKG" ]; then
        note "apt-cache knows no linux-image-cloud-amd64; running apt-get update"
        apt-get update -qq >&2 || die "apt-get update failed"
        KPKG=$(kernel_package)
    fi
    [ -n "$KPKG" ] || die "cannot find the package linux-image-cloud-amd64 depends on"
    note "downloading $KPKG"
    (cd "$WORK/dl" && apt-get download -q "$KPKG" >&2) || die "apt-get download $KPKG failed"
    DEB=$(ls "$WORK"/dl/*.deb)
fi
dpkg -x "$DEB" "$WORK/kernel"
VMLINUZ=$(ls "$WORK"/kernel/boot/vmlinuz-* 2>/dev/null | head -n1)
[ -n "$VMLINUZ" ] || die "no /boot/vmlinuz-* in $DEB"
KVER=${VMLINUZ##*/vmlinuz-}
MODDIR=
for d in "$WORK/kernel/lib/modules/$KVER" "$WORK/kernel/usr/lib/modules/$KVER"; do
    [ -d "$d" ] && MODDIR=$d
done
[ -n "$MODDIR" ] || die "no modules directory for $KVER in $DEB"
note "kernel $KVER"

# --- modules: virtio-net and what it needs, in load order --------------------
# The .deb has no modules.dep (depmod runs at install time), so dependencies
# are read from each module's own "depends=" modinfo field. Module names use
# '_' where file names may use '-'.
find "$MODDIR/kernel" -name '*.ko*' >"$WORK/modules.list"
norm() { echo "${1//-/_}"; }
module_file() { # module_file NAME -> path of NAME.ko[.xz|.zst|.gz], or nothing
    local f base
    while read -r f; do
        base=${f##*/}
        base=${base%%.ko*}
        if [ "$(norm "$base")" = "$1" ]; then
            echo "$f"
            return 0
        fi
    done <"$WORK/modules.list"
    return 0
}
is_builtin() {
    tr '-' '_' <"$MODDIR/modules.builtin" | grep -q "/$1\.ko\$"
}
MODOUT=$WORK/root/lib/modules/qnet
mkdir -p "$MODOUT"
declare -A SEEN=()
load_module() { # appends NAME (after its dependencies) to the load order
    local name src deps dep
    name=$(norm "$1")
    [ -z "${SEEN[$name]:-}" ] || return 0
    SEEN[$name]=1
    src=$(module_file "$name")
    if [ -z "$src" ]; then
        is_builtin "$name" || die "module $name is neither in $DEB nor built in"
        note "module $name: built in"
        return 0
    fi
    case "$src" in
    *.ko) cp "$src" "$MODOUT/$name.ko" ;;
    *.ko.xz) xz -dc "$src" >"$MODOUT/$name.ko" || die "need xz-utils to unpack $src" ;;
    *.ko.zst) zstd -qdc "$src" >"$MODOUT/$name.ko" || die "need zstd to unpack $src" ;;
    *.ko.gz) gzip -dc "$src" >"$MODOUT/$name.ko" ;;
    *) die "unknown module format: $src" ;;
    esac
    deps=$(tr '\0' '\n' <"$MODOUT/$name.ko" | sed -n 's/^depends=//p' | head -n1)
    for dep in ${deps//,/ }; do
        load_module "$dep"
    done
    echo "$name.ko" >>"$MODOUT/order"
}
# af_packet: udhcpc needs packet sockets (built in on Debian, checked anyway).
for m in af_packet virtio_pci virtio_net; do
    load_module "$m"
done
touch "$MODOUT/order"
note "modules: $(tr '\n' ' ' <"$MODOUT/order")"

# --- root file system --------------------------------------------------------
ROOT=$WORK/root
mkdir -p "$ROOT"/{bin,dev,proc,sys,run,tmp,www,etc}
cp "$BUSYBOX" "$ROOT/bin/busybox"
for applet in $("$BUSYBOX" --list); do
    [ "$applet" = busybox ] || ln -sf busybox "$ROOT/bin/$applet"
done
install -m 755 "$HERE/init" "$ROOT/init"
install -m 755 "$HERE/udhcpc.script" "$ROOT/udhcpc.script"
# The kernel opens /dev/console before /init runs; /init copes without it.
mknod -m 600 "$ROOT/dev/console" c 5 1 2>/dev/null || true

# UDP echo: optional, Debian's busybox nc cannot do UDP.
CC=${CC:-cc}
if command -v "$CC" >/dev/null 2>&1 &&
    "$CC" -static -Os -s -o "$ROOT/bin/udpecho" "$HERE/udpecho.c" 2>"$WORK/cc.log"; then
    :
else
    rm -f "$ROOT/bin/udpecho"
    note "warning: no static C toolchain (gcc + libc6-dev): the guest has no UDP echo"
    if [ -s "$WORK/cc.log" ]; then sed "s/^/build-guest:   /" "$WORK/cc.log" >&2; fi
fi

(cd "$ROOT" && find . | LC_ALL=C sort | cpio -o -H newc -R 0:0 --quiet) |
    gzip -9 >"$WORK/out/initrd.gz"
cp "$VMLINUZ" "$WORK/out/vmlinuz"
echo "$KVER" >"$WORK/out/kernel-version"
echo "$STAMP" >"$WORK/out/inputs.sha256"

# --- publish: rename, never copy, into place ---------------------------------
if [ -e "$OUTDIR" ]; then
    mv "$OUTDIR" "$WORK/old"
fi
mv "$WORK/out" "$OUTDIR"
note "built $OUTDIR (kernel $KVER, initrd $(du -k "$OUTDIR/initrd.gz" | cut -f1) KiB)"
