//! Builds the kernel programs (capture-ebpf) for the bpf target and leaves the object in OUT_DIR, where
//! `src/ebpf` embeds it, so that `cargo build` yields one self-contained `capture` binary.
use std::path::PathBuf;

use anyhow::Context as _;
use aya_build::{Package, Toolchain};

fn main() -> anyhow::Result<()> {
    let manifest_dir = PathBuf::from(std::env::var("CARGO_MANIFEST_DIR").context("CARGO_MANIFEST_DIR")?);
    let ebpf_dir = manifest_dir.join("../capture-ebpf");
    let ebpf_dir = ebpf_dir.to_str().context("capture-ebpf path is not UTF-8")?;
    aya_build::build_ebpf(
        [Package {
            name: "capture-ebpf",
            root_dir: ebpf_dir,
            ..Default::default()
        }],
        Toolchain::default(),
    )
}
