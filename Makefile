# Convenience targets around cargo, and the installation. The helpers are
# built statically linked: they are one-shot processes run for every guest
# NIC, and static linking removes the dynamic loader's work from each run
# (see BENCHMARKS.md). crt-static needs an explicit --target so that proc
# macros are still built for the host as usual.
#
# make install works as non-root into DESTDIR (packagers); run as root it
# also applies the helpers' privileges (HELPER_MODE) and creates group qnet.

HOST := $(shell rustc -vV 2>/dev/null | sed -n 's/^host: //p')
# Cargo profile of `make all`/`make install`; `make deb` uses `deb`
# (release without fat LTO: a fraction of the build time).
PROFILE ?= release
# Where the binaries are taken from (the test suite points these at
# target/debug and sets BUILD= to install what it already built).
BIN_SRC ?= target/$(PROFILE)
HELPER_SRC ?= target/$(HOST)/$(PROFILE)
BUILD ?= build
XTASK ?= cargo run --quiet -p xtask --
DIST ?= target/dist

PREFIX ?= /usr/local
BINDIR ?= $(PREFIX)/bin
LIBEXECDIR ?= $(PREFIX)/libexec
DATADIR ?= $(PREFIX)/share
MANDIR ?= $(DATADIR)/man
SYSCONFDIR ?= /etc
UNITDIR ?= $(PREFIX)/lib/systemd/system
TMPFILESDIR ?= $(PREFIX)/lib/tmpfiles.d
SYSUSERSDIR ?= $(PREFIX)/lib/sysusers.d
BASHCOMPDIR ?= $(DATADIR)/bash-completion/completions
ZSHCOMPDIR ?= $(DATADIR)/zsh/vendor-completions
FISHCOMPDIR ?= $(DATADIR)/fish/vendor_completions.d
LIBVIRT_HOOKDIR ?= $(SYSCONFDIR)/libvirt/hooks/qemu.d
# Which helpers to install (each grants privileges; see SECURITY.md):
#   bridge   qnet-bridge-helper: CAP_NET_ADMIN (TAPs on allowed bridges)
#   macvtap  qnet-macvtap-helper: CAP_NET_ADMIN, CAP_DAC_OVERRIDE,
#            CAP_MKNOD, CAP_CHOWN (macvtaps on allowed host NICs)
HELPERS ?= bridge macvtap
# setuid (root, 4755, as qemu-bridge-helper), setcap (file capabilities,
# 0755) or none (0755 without privileges: a package's postinst applies them).
HELPER_MODE ?= setuid
ROOT := $(shell [ "$$(id -u)" -eq 0 ] && echo yes)

CAPS_bridge := cap_net_admin+ep
CAPS_macvtap := cap_net_admin,cap_dac_override,cap_mknod,cap_chown+ep

.PHONY: all build helpers test bench demo dist install install-setcap helper-privileges uninstall deb clean fuzz fuzz-smoke

all: build

build:
	cargo build --profile $(PROFILE) --workspace --bins
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --profile $(PROFILE) --target $(HOST) \
		-p qnet-bridge-helper -p qnet-macvtap-helper

helpers:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target $(HOST) \
		-p qnet-bridge-helper -p qnet-macvtap-helper

test:
	./test.sh

bench: helpers
	cargo build --release --workspace
	cargo bench -p qnet-tests --bench helper_latency
	cargo bench -p qnet-tests --bench macvtap_latency

demo:
	./demo.sh

# Man pages and completions, generated from the binaries' clap definitions.
dist:
	$(XTASK) dist $(DIST)

# Coverage-guided fuzzing of every parser that sees untrusted input (see
# fuzz/README.md): needs the nightly toolchain and cargo-fuzz. Each target
# runs FUZZ_SECONDS, one after the other, on one core; with FUZZ_RUNS=N
# each stops after N executions if that comes first (the figures in
# SECURITY.md: make fuzz FUZZ_SECONDS=3600 FUZZ_RUNS=10000000).
FUZZ_SECONDS ?= 600
FUZZ_RUNS ?=
fuzz:
	FUZZ_RUNS=$(FUZZ_RUNS) fuzz/run.sh $(FUZZ_SECONDS)

# What CI runs: about 20 s per target.
fuzz-smoke:
	fuzz/run.sh 20

install: $(BUILD) dist
	install -d $(DESTDIR)$(BINDIR) $(DESTDIR)$(LIBEXECDIR) $(DESTDIR)$(UNITDIR) \
		$(DESTDIR)$(TMPFILESDIR) $(DESTDIR)$(SYSUSERSDIR) $(DESTDIR)$(SYSCONFDIR)/qnet \
		$(DESTDIR)$(SYSCONFDIR)/qnet/networks.d $(DESTDIR)$(MANDIR)/man1 $(DESTDIR)$(MANDIR)/man5 $(DESTDIR)$(MANDIR)/man8 \
		$(DESTDIR)$(BASHCOMPDIR) $(DESTDIR)$(ZSHCOMPDIR) $(DESTDIR)$(FISHCOMPDIR)
	install -m 0755 $(BIN_SRC)/qnet-hookd $(BIN_SRC)/qnetctl $(DESTDIR)$(BINDIR)/
	install -m 0755 $(BIN_SRC)/qnet-libvirt-hook $(DESTDIR)$(LIBEXECDIR)/
	for h in $(HELPERS); do \
		install -m 0755 $(HELPER_SRC)/qnet-$$h-helper $(DESTDIR)$(LIBEXECDIR)/ || exit 1; done
	for u in qnet-hookd.service qnet-hookd.socket qnet-hookd-qmp.socket; do \
		sed 's|@BINDIR@|$(BINDIR)|g' dist/systemd/$$u > $(DESTDIR)$(UNITDIR)/$$u && \
		chmod 0644 $(DESTDIR)$(UNITDIR)/$$u || exit 1; done
	install -m 0644 dist/tmpfiles/qnet.conf $(DESTDIR)$(TMPFILESDIR)/qnet.conf
	install -m 0644 dist/sysusers/qnet.conf $(DESTDIR)$(SYSUSERSDIR)/qnet.conf
	# The example config never replaces an existing one.
	[ -e $(DESTDIR)$(SYSCONFDIR)/qnet/hookd.toml ] || \
		install -m 0644 dist/hookd.toml $(DESTDIR)$(SYSCONFDIR)/qnet/hookd.toml
	install -m 0644 $(DIST)/man/man1/* $(DESTDIR)$(MANDIR)/man1/
	install -m 0644 $(DIST)/man/man5/* $(DESTDIR)$(MANDIR)/man5/
	install -m 0644 $(DIST)/man/man8/* $(DESTDIR)$(MANDIR)/man8/
	install -m 0644 $(DIST)/completions/bash/* $(DESTDIR)$(BASHCOMPDIR)/
	install -m 0644 $(DIST)/completions/zsh/* $(DESTDIR)$(ZSHCOMPDIR)/
	install -m 0644 $(DIST)/completions/fish/* $(DESTDIR)$(FISHCOMPDIR)/
	# libvirt runs hooks from qemu.d: link ours when libvirt is installed.
	if [ -d $(DESTDIR)$(SYSCONFDIR)/libvirt ]; then install -d $(DESTDIR)$(LIBVIRT_HOOKDIR) && \
		ln -sf $(LIBEXECDIR)/qnet-libvirt-hook $(DESTDIR)$(LIBVIRT_HOOKDIR)/qnet; fi
ifeq ($(ROOT),yes)
	$(MAKE) --no-print-directory helper-privileges
	if [ -z "$(DESTDIR)" ]; then systemd-sysusers $(SYSUSERSDIR)/qnet.conf 2>/dev/null || \
		getent group qnet >/dev/null || groupadd --system qnet; fi
else
	@echo "make install: not root: helpers installed without privileges; run 'make helper-privileges' as root (HELPER_MODE=$(HELPER_MODE))"
endif

# What each helper is granted, per HELPER_MODE.
helper-privileges:
	for h in $(HELPERS); do f=$(DESTDIR)$(LIBEXECDIR)/qnet-$$h-helper; \
		case "$(HELPER_MODE)" in \
		setuid) chown root:root $$f && chmod 4755 $$f && echo "$$f: setuid root";; \
		setcap) chown root:root $$f && chmod 0755 $$f && \
			if [ $$h = bridge ]; then c='$(CAPS_bridge)'; else c='$(CAPS_macvtap)'; fi && \
			setcap $$c $$f && echo "$$f: $$c";; \
		none) echo "$$f: no privileges";; \
		*) echo "HELPER_MODE must be setuid, setcap or none" >&2; exit 1;; \
		esac || exit 1; done

install-setcap:
	$(MAKE) install HELPER_MODE=setcap

uninstall:
	rm -f $(DESTDIR)$(BINDIR)/qnet-hookd $(DESTDIR)$(BINDIR)/qnetctl
	rm -f $(DESTDIR)$(LIBEXECDIR)/qnet-libvirt-hook $(DESTDIR)$(LIBEXECDIR)/qnet-bridge-helper \
		$(DESTDIR)$(LIBEXECDIR)/qnet-macvtap-helper
	rm -f $(DESTDIR)$(UNITDIR)/qnet-hookd.service $(DESTDIR)$(UNITDIR)/qnet-hookd.socket \
		$(DESTDIR)$(UNITDIR)/qnet-hookd-qmp.socket
	rm -f $(DESTDIR)$(TMPFILESDIR)/qnet.conf $(DESTDIR)$(SYSUSERSDIR)/qnet.conf
	rm -f $(DESTDIR)$(MANDIR)/man1/qnetctl.1 $(DESTDIR)$(MANDIR)/man5/qnet-hookd.toml.5 \
		$(DESTDIR)$(MANDIR)/man8/qnet-hookd.8 $(DESTDIR)$(MANDIR)/man8/qnet-bridge-helper.8 \
		$(DESTDIR)$(MANDIR)/man8/qnet-macvtap-helper.8 $(DESTDIR)$(MANDIR)/man8/qnet-libvirt-hook.8
	rm -f $(DESTDIR)$(BASHCOMPDIR)/qnetctl $(DESTDIR)$(BASHCOMPDIR)/qnet-hookd \
		$(DESTDIR)$(ZSHCOMPDIR)/_qnetctl $(DESTDIR)$(ZSHCOMPDIR)/_qnet-hookd \
		$(DESTDIR)$(FISHCOMPDIR)/qnetctl.fish $(DESTDIR)$(FISHCOMPDIR)/qnet-hookd.fish
	if [ -L $(DESTDIR)$(LIBVIRT_HOOKDIR)/qnet ]; then rm -f $(DESTDIR)$(LIBVIRT_HOOKDIR)/qnet; fi
	# Kept: /etc/qnet/hookd.toml (yours), /etc/qnet/networks.d (networks
	# created at run time), /var/lib/qnet (state) and group qnet.
	@echo "make uninstall: kept $(SYSCONFDIR)/qnet/hookd.toml, $(SYSCONFDIR)/qnet/networks.d, /var/lib/qnet and group qnet"

# target/debian/qnet_VERSION_ARCH.deb: a staged install with Debian's paths,
# helpers without privileges (the postinst grants them), wrapped by
# packaging/deb.sh. Built with the `deb` profile (no fat LTO).
DEB_PROFILE ?= deb
DEB_COMPRESS ?= xz
DEB_ROOT := target/debian/root
deb:
	rm -rf $(DEB_ROOT)
	$(MAKE) --no-print-directory install PROFILE=$(DEB_PROFILE) DESTDIR=$(CURDIR)/$(DEB_ROOT) \
		PREFIX=/usr LIBEXECDIR=/usr/libexec UNITDIR=/lib/systemd/system \
		TMPFILESDIR=/usr/lib/tmpfiles.d SYSUSERSDIR=/usr/lib/sysusers.d HELPER_MODE=none
	DEB_COMPRESS=$(DEB_COMPRESS) packaging/deb.sh $(DEB_ROOT) target/debian

clean:
	cargo clean
