//! How and where capture is applied, beside the capture rules themselves: the action, the backend and its
//! settings, and their defaults. Every backend and the command line take these from here.

use std::{path::PathBuf, time::Duration};

use super::Config;

/// Where the eBPF backend pins its programs and maps unless `--pin-dir` says otherwise.
pub const DEFAULT_PIN_DIR: &str = "/sys/fs/bpf/capture";
/// Where DNS servers are read from unless `--resolv-conf` says otherwise.
pub const DEFAULT_RESOLV_CONF: &str = "/etc/resolv.conf";

/// Which backend applies the capture (`--backend`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// Kernel programs attached to a cgroup, configured through maps.
    Ebpf,
    /// The iptables rules istio-iptables writes.
    Iptables,
    /// eBPF if the kernel has every feature it needs, else iptables; decided when `capture` runs.
    Auto,
}

/// iptables binary flavour (`--force-iptables-binary`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum IptablesFlavour {
    /// The system default (`iptables-restore`): the empty value, as in istio.
    #[value(skip)]
    Auto,
    /// `iptables-legacy-restore`.
    Legacy,
    /// `iptables-nft-restore`.
    Nft,
}

/// How much the kernel programs log (`--log-level`): compiled in, off unless asked.
#[repr(u8)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LogLevel {
    /// No records (the default): the programs only test a global and go on.
    Off = 0,
    /// aya-log's levels, in its numbering.
    Error = 1,
    /// See [`LogLevel::Error`].
    Warn = 2,
    /// See [`LogLevel::Error`].
    Info = 3,
    /// One record per connect judged in a registered namespace.
    Debug = 4,
    /// See [`LogLevel::Error`].
    Trace = 5,
}

impl LogLevel {
    /// The matching userspace filter.
    pub fn filter(self) -> log::LevelFilter {
        match self {
            LogLevel::Off => log::LevelFilter::Off,
            LogLevel::Error => log::LevelFilter::Error,
            LogLevel::Warn => log::LevelFilter::Warn,
            LogLevel::Info => log::LevelFilter::Info,
            LogLevel::Debug => log::LevelFilter::Debug,
            LogLevel::Trace => log::LevelFilter::Trace,
        }
    }
}

/// What to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// Apply capture to the namespace (the default, like istio-iptables).
    Apply,
    /// Remove capture from the namespace (`capture clean`, `--cleanup-only`).
    Clean,
    /// Show what is applied (`capture status`).
    Status,
}

/// Everything besides the capture rules themselves: how and where to apply them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Options {
    /// What to do.
    pub action: Action,
    /// `--backend`.
    pub backend: Backend,
    /// `--cgroup`: where the eBPF programs attach (default: the cgroup v2 root, found at run time).
    pub cgroup: Option<PathBuf>,
    /// `--pin-dir`: the eBPF backend's bpffs directory.
    pub pin_dir: PathBuf,
    /// `--log-level`: the eBPF programs' logging, forwarded while `capture` runs.
    pub log_level: LogLevel,
    /// `--resolv-conf`: where DNS servers are read from.
    pub resolv_conf: PathBuf,
    /// `-n/--dry-run`.
    pub dry_run: bool,
    /// `DRY_RUN_FILE_PATH`: write the dry-run output here instead of stdout.
    pub dry_run_file: Option<PathBuf>,
    /// `--network-namespace`.
    pub network_namespace: Option<PathBuf>,
    /// `--run-validation`.
    pub run_validation: bool,
    /// `--skip-rule-apply`.
    pub skip_rule_apply: bool,
    /// `--iptables-probe-port`.
    pub probe_port: u16,
    /// `--probe-timeout`.
    pub probe_timeout: Duration,
    /// `--native-nftables`.
    pub native_nftables: bool,
    /// `--force-iptables-binary`.
    pub iptables_flavour: IptablesFlavour,
}

/// A parsed invocation.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Invocation {
    /// The capture configuration.
    pub config: Config,
    /// How and where to apply it.
    pub options: Options,
}
