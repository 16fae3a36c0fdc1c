//! Tells the benchmarks the host triple, where `make helpers` puts the
//! statically linked helpers (target/<triple>/release).
fn main() {
    let host = std::env::var("HOST").expect("cargo sets HOST");
    println!("cargo:rustc-env=QNET_HOST_TRIPLE={host}");
}
