//! Rebuilds the kernel programs when the linker changes (see `main`).

use which::which;

/// Rebuild the kernel programs when bpf-linker changes: it is our linker, so a new one can change the object.
fn main() {
    let bpf_linker = which("bpf-linker").expect("bpf-linker not found: run `cargo xtask setup`");
    println!("cargo:rerun-if-changed={}", bpf_linker.display());
}
