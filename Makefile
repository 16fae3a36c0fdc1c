# Convenience targets around cargo. The helpers are built statically
# linked for installation: they are one-shot processes run for every guest
# NIC, and static linking removes the dynamic loader's work from each run
# (see BENCHMARKS.md). crt-static needs an explicit --target so that proc
# macros are still built for the host as usual.

HOST := $(shell rustc -vV | sed -n 's/^host: //p')
STATIC := target/$(HOST)/release
PREFIX ?= /usr/local
LIBEXEC ?= $(PREFIX)/libexec
BIN ?= $(PREFIX)/bin

.PHONY: all helpers test bench demo install install-setcap clean fuzz fuzz-smoke

all:
	cargo build --release --workspace
	$(MAKE) helpers

helpers:
	RUSTFLAGS="-C target-feature=+crt-static" cargo build --release --target $(HOST) \
		-p qnet-bridge-helper -p qnet-macvtap-helper

test:
	cargo test --workspace

bench: helpers
	cargo build --release --workspace
	cargo bench -p qnet-tests --bench helper_latency
	cargo bench -p qnet-tests --bench macvtap_latency

demo:
	./demo.sh

# Coverage-guided fuzzing of every parser that sees untrusted input (see
# fuzz/README.md): needs the nightly toolchain and cargo-fuzz. Each target
# runs FUZZ_SECONDS, one after the other, on one core.
FUZZ_SECONDS ?= 600
fuzz:
	fuzz/run.sh $(FUZZ_SECONDS)

# What CI runs: about 20 s per target.
fuzz-smoke:
	fuzz/run.sh 20

# Setuid-root install (what qemu-bridge-helper does on most distributions).
install: helpers
	install -d $(DESTDIR)$(LIBEXEC)
	install -o root -g root -m 4755 $(STATIC)/qnet-bridge-helper $(DESTDIR)$(LIBEXEC)/qnet-bridge-helper
	install -o root -g root -m 4755 $(STATIC)/qnet-macvtap-helper $(DESTDIR)$(LIBEXEC)/qnet-macvtap-helper

# File-capability install: the bridge helper gets CAP_NET_ADMIN and nothing
# else; the macvtap helper also needs CAP_DAC_OVERRIDE to open the root-only
# /dev/tapN, and CAP_MKNOD and CAP_CHOWN for a private node when /dev/tapN
# belongs to another network namespace (kept permitted but not effective,
# dropped once the device is open; see SECURITY.md).
install-setcap: helpers
	install -d $(DESTDIR)$(LIBEXEC)
	install -o root -g root -m 0755 $(STATIC)/qnet-bridge-helper $(DESTDIR)$(LIBEXEC)/qnet-bridge-helper
	install -o root -g root -m 0755 $(STATIC)/qnet-macvtap-helper $(DESTDIR)$(LIBEXEC)/qnet-macvtap-helper
	setcap cap_net_admin+ep $(DESTDIR)$(LIBEXEC)/qnet-bridge-helper
	setcap cap_net_admin,cap_dac_override,cap_mknod,cap_chown+ep $(DESTDIR)$(LIBEXEC)/qnet-macvtap-helper

clean:
	cargo clean
