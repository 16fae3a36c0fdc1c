//! Exec → fd-received latency of qnet-macvtap-helper next to
//! qnet-bridge-helper, measured alternately in one run.
//!
//! Run as root: `make helpers && cargo build --release --workspace &&
//! cargo bench -p qnet-tests --bench macvtap_latency [ROUNDS]`.
//!
//! The parent makes a network namespace with a bridge (`qbrbench`) and a
//! veth pair (`qvbench`/`qvbench-p`, the macvtap's lower device), a config
//! dir allowing both, and re-runs itself as a worker inside the sandbox
//! (its own netns, `/etc/qemu` and sysfs), so the timed spawns pay no
//! namespace set-up. Each sample acts as QEMU does: socketpair, spawn
//! `HELPER [ARGS] --use-vnet --fd=N --br=DEV`, receive the fd, wait for the
//! exit. `/bin/true` is timed the same way as the floor of starting any
//! process.
//!
//! A macvtap outlives its fd, and the worker plays QEMU for every sample, so
//! each sample's macvtap is deleted by the worker after the sample (outside
//! the timing); that keeps every sample at the same cost (`qmvtap0` is
//! free again). The reapers the samples leave wait for the worker and exit
//! with it. Results are printed as a Markdown table.

use std::os::fd::{AsFd, OwnedFd};

use qnet_hostnet::link::LinkSocket;
use qnet_hostnet::tap::tap_info;
use qnet_tests::helper_bench::{
    bench_main, helper_from_env, installed_helper, measure_and_print, run_sandboxed, Candidate,
    BRIDGE,
};

const LOWER: &str = "qvbench";

fn main() {
    bench_main(300, parent, worker);
}

fn parent(rounds: usize) {
    let macvtap = installed_helper("qnet-macvtap-helper");
    let bridge = installed_helper("qnet-bridge-helper");
    let helpers = [
        ("QNET_BENCH_MACVTAP", macvtap.as_path()),
        ("QNET_BENCH_BRIDGE", bridge.as_path()),
    ];
    // The macvtap's lower device, a veth, and an ACL allowing it.
    run_sandboxed(
        "mvbench",
        &helpers,
        |netns, config| {
            netns.ip(&[
                "link",
                "add",
                LOWER,
                "type",
                "veth",
                "peer",
                "name",
                "qvbench-p",
            ]);
            netns.ip(&["link", "set", LOWER, "up"]);
            config.write("macvtap.conf", &format!("allow {LOWER}\n"));
        },
        rounds,
    );
}

fn worker(rounds: usize) {
    let mut netlink = LinkSocket::new().expect("netlink");
    let mut macvtap = Candidate::new(
        "qnet-macvtap-helper (bridge mode)",
        &helper_from_env("QNET_BENCH_MACVTAP"),
        Some(LOWER),
    );
    macvtap.args = vec!["--mode=bridge".into(), "--mac=52:54:00:be:0c:01".into()];
    let mut candidates = [
        macvtap,
        Candidate::new(
            "qnet-bridge-helper",
            &helper_from_env("QNET_BENCH_BRIDGE"),
            Some(BRIDGE),
        ),
        Candidate::process_floor(),
    ];
    // A macvtap outlives its fd: delete it, so that every sample finds
    // `qmvtap0` free again.
    let delete_macvtap = |c: &Candidate, fd: OwnedFd| {
        if c.br == Some(LOWER) {
            let (name, _) = tap_info(fd.as_fd()).unwrap();
            let link = netlink.link_by_name(&name).unwrap().unwrap();
            netlink.delete(link.index).unwrap();
        }
    };
    measure_and_print(
        "helper latency",
        "devices in a private netns",
        &mut candidates,
        rounds,
        delete_macvtap,
        (1, "qnet-bridge-helper"),
    );
}
