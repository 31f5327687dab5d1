//! What is compared: each mode is one entry of [`MODES`], built the same way, differing only in how (and
//! whether) capture is applied.

/// How a mode applies capture.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// No capture: the app connects to the sidecar itself (the limit of this topology).
    None,
    /// `capture --backend iptables`: istio's rules.
    Iptables,
    /// `capture --backend ebpf`, attached to the mode's own cgroup, pinned in its own bpffs.
    Ebpf,
}

/// One mode of the benchmark.
#[derive(Clone, Copy, Debug)]
pub struct Mode {
    /// Short name: report rows, plot legends, progress lines.
    pub name: &'static str,
    /// What it is, for the report.
    pub about: &'static str,
    pub backend: Backend,
    /// `capture` arguments after the backend's own and before the injector's default flags.
    pub extra_args: &'static [&'static str],
}

/// Every mode, in the order they run in each round. Ratios are taken against the modes named
/// [`FLOOR`] and [`IPTABLES`]; every eBPF mode gets its own ratios and kernel-time table.
pub const MODES: &[Mode] = &[
    Mode {
        name: FLOOR,
        about: "no capture: the app connects to the sidecar directly",
        backend: Backend::None,
        extra_args: &[],
    },
    Mode {
        name: IPTABLES,
        about: "istio's rules (`--backend iptables`)",
        backend: Backend::Iptables,
        extra_args: &[],
    },
    Mode {
        name: EBPF,
        about: "the eBPF backend (`--backend ebpf`)",
        backend: Backend::Ebpf,
        extra_args: &[],
    },
    // Loopback acceleration: the same backend with one more flag. Another variant is one more entry.
    Mode {
        name: EBPF_ACCEL,
        about: "the eBPF backend with loopback acceleration (`--loopback-accel`: sockops + sk_msg)",
        backend: Backend::Ebpf,
        extra_args: &["--loopback-accel"],
    },
];

pub const FLOOR: &str = "floor";
pub const IPTABLES: &str = "iptables";
pub const EBPF: &str = "ebpf";
pub const EBPF_ACCEL: &str = "ebpf+accel";
