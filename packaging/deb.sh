#!/bin/sh
# DEB_COMPRESS: dpkg-deb compressor (xz; the tests use gzip: quicker).
# Wraps a staged install (make install DESTDIR=ROOT PREFIX=/usr ...) into
# OUTDIR/qnet_VERSION_ARCH.deb: control file, conffiles, md5sums and the
# maintainer scripts of packaging/debian/. Run by `make deb`.
set -eu
root=$1
out=$2
here=$(dirname "$0")
version=$(sed -n 's/^version = "\(.*\)"/\1/p' "$here/../Cargo.toml" | head -n 1)
arch=$(dpkg --print-architecture)
mkdir -p "$root/DEBIAN" "$root/usr/share/doc/qnet"
# What dh_strip and dh_compress do for a package: no symbols (the test
# suite packages its debug build) and man pages gzip -9n.
find "$root/usr/bin" "$root/usr/libexec" -type f \
    -exec strip --remove-section=.comment --remove-section=.note {} +
find "$root/usr/share/man" -type f ! -name '*.gz' -exec gzip -9nf {} +
cat > "$root/usr/share/doc/qnet/copyright" <<'COPYRIGHT'
Format: https://www.debian.org/doc/packaging-manuals/copyright-format/1.0/
Upstream-Name: qnet

Files: *
Copyright: 2025-2026 qnet developers
License: GPL-2.0-or-later
 On Debian systems, the full text of the GNU General Public License
 version 2 can be found in /usr/share/common-licenses/GPL-2.
COPYRIGHT
# The helpers are static-pie executables (they start for every guest NIC:
# no dynamic loader, see BENCHMARKS.md); lintian takes an ELF of type DYN
# without NEEDED entries for a shared library that lacks them.
mkdir -p "$root/usr/share/lintian/overrides"
cat > "$root/usr/share/lintian/overrides/qnet" <<'OVERRIDES'
qnet: shared-library-lacks-prerequisites [usr/libexec/qnet-bridge-helper]
qnet: shared-library-lacks-prerequisites [usr/libexec/qnet-macvtap-helper]
OVERRIDES
# A native package's changelog: this version, dated by the last commit
# (or SOURCE_DATE_EPOCH), so that a rebuild is the same package.
when=${SOURCE_DATE_EPOCH:-$(git -C "$here" log -1 --format=%ct 2>/dev/null || date +%s)}
gzip -9n > "$root/usr/share/doc/qnet/changelog.gz" <<CHANGELOG
qnet ($version) unstable; urgency=medium

  * Built from the qnet source tree; its history is the git log.

 -- qnet developers <qnet@example.invalid>  $(date -R -u -d "@$when")
CHANGELOG
size=$(du -sk --exclude=DEBIAN "$root" | cut -f1)
sed -e "s/@VERSION@/$version/" -e "s/@ARCH@/$arch/" -e "s/@SIZE@/$size/" \
    "$here/debian/control.in" > "$root/DEBIAN/control"
echo /etc/qnet/hookd.toml > "$root/DEBIAN/conffiles"
for script in postinst prerm postrm; do
    install -m 0755 "$here/debian/$script" "$root/DEBIAN/$script"
done
(cd "$root" && find . -path ./DEBIAN -prune -o -type f -printf '%P\0' | sort -z |
    xargs -0 md5sum) > "$root/DEBIAN/md5sums"
mkdir -p "$out"
dpkg-deb --root-owner-group -Z"${DEB_COMPRESS:-xz}" --build "$root" "$out/qnet_${version}_${arch}.deb"
