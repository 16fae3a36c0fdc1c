//! Exec → fd-received latency of bridge helpers, ours against the anchor
//! (`/usr/lib/qemu/qemu-bridge-helper`), measured alternately in one run
//! on the same bridge with the same ACL.
//!
//! Run as root: `make bench` (builds the helpers as installed, statically
//! linked, then runs `cargo bench -p qnet-tests --bench helper_latency`).
//!
//! The parent makes a network namespace with a bridge and a config dir
//! holding `allow qbrbench`, then re-runs itself as a worker inside the
//! sandbox (its own netns and `/etc/qemu`), so the timed spawns pay no
//! namespace set-up. Each sample acts exactly as QEMU does: socketpair,
//! spawn `HELPER --use-vnet --fd=N --br=qbrbench`, receive the fd, wait for
//! the exit. `/bin/true` is timed the same way as the floor of starting any
//! process. Results are printed as a Markdown table.

use std::path::{Path, PathBuf};

use qnet_tests::helper_bench::{
    bench_main, helper_from_env, installed_helper, measure_and_print, run_sandboxed, Candidate,
    BRIDGE,
};
use qnet_tests::require_tool;

const ANCHOR: &str = "/usr/lib/qemu/qemu-bridge-helper";

fn main() {
    bench_main(400, parent, worker);
}

fn parent(rounds: usize) {
    require_tool(ANCHOR, "qemu-system-common");
    let ours = helper_under_test();
    run_sandboxed("bench", &[("QNET_BENCH_OURS", &ours)], |_, _| {}, rounds);
}

/// The helper as installed (or `QNET_BENCH_HELPER`).
fn helper_under_test() -> PathBuf {
    match std::env::var_os("QNET_BENCH_HELPER") {
        Some(path) => PathBuf::from(path),
        None => installed_helper("qnet-bridge-helper"),
    }
}

fn worker(rounds: usize) {
    let ours = helper_from_env("QNET_BENCH_OURS");
    let mut candidates = [
        Candidate::new("qnet-bridge-helper", &ours, Some(BRIDGE)),
        Candidate::new(
            "qemu-bridge-helper (anchor)",
            Path::new(ANCHOR),
            Some(BRIDGE),
        ),
        Candidate::process_floor(),
    ];
    measure_and_print(
        "bridge helper latency",
        "bridge in a private netns, same ACL",
        &mut candidates,
        rounds,
        |_, _| {},
        (1, "anchor"),
    );
}
