//! What the eBPF backend needs from the kernel, the first Linux release that has each piece, and the
//! probes that check them before anything is applied.
//!
//! Each probe asks the running kernel itself (a tiny program or map is created and closed), so a distro
//! kernel with backports passes wherever it really has the feature, whatever its version says.

use aya::{
    maps::MapType,
    programs::ProgramType,
    sys::{BpfHelper, is_helper_supported, is_map_supported, is_program_supported},
};

/// `CAPTURE_ASSUME_MISSING`: a comma list of [`Feature::name`]s to treat as missing, to see what `capture`
/// does on a kernel without them (the error, or `--backend auto`'s fallback) on one that has them all.
pub const ASSUME_MISSING_ENV: &str = "CAPTURE_ASSUME_MISSING";

/// What to ask the kernel.
#[derive(Clone, Copy, Debug)]
pub enum Probe {
    /// Can a program of this type be loaded?
    Program(ProgramType),
    /// Can a map of this type be created?
    Map(MapType),
    /// Can a program of this type call this helper?
    Helper(ProgramType, BpfHelper),
    /// Can an sk_lookup program read the context field at this offset?
    SkLookupField(i16),
}

/// One kernel feature the eBPF backend relies on.
#[derive(Clone, Copy, Debug)]
pub struct Feature {
    /// A short name, as the error shows it and `CAPTURE_ASSUME_MISSING` takes it.
    pub name: &'static str,
    /// The first Linux release that has it.
    pub since: &'static str,
    /// What capture uses it for.
    pub used_for: &'static str,
    /// How to ask the kernel.
    pub probe: Probe,
}

const fn feature(name: &'static str, since: &'static str, used_for: &'static str, probe: Probe) -> Feature {
    Feature {
        name,
        since,
        used_for,
        probe,
    }
}

/// Everything the programs and their maps need, most basic first, so the first one missing is the one to
/// report. The README's kernel table lists the same.
pub const FEATURES: &[Feature] = &[
    feature(
        "cgroup_sock_addr",
        "4.17",
        "outbound capture at connect/sendmsg/recvmsg",
        Probe::Program(ProgramType::CgroupSockAddr),
    ),
    feature(
        "sockops",
        "4.13",
        "tracking redirected connections",
        Probe::Program(ProgramType::SockOps),
    ),
    feature(
        "cgroup_sockopt",
        "5.3",
        "answering SO_ORIGINAL_DST",
        Probe::Program(ProgramType::CgroupSockopt),
    ),
    feature(
        "sk_lookup",
        "5.9",
        "inbound capture",
        Probe::Program(ProgramType::SkLookup),
    ),
    feature(
        "sk_msg",
        "4.17",
        "loopback acceleration",
        Probe::Program(ProgramType::SkMsg),
    ),
    feature(
        "hash_map",
        "3.19",
        "per-namespace configuration",
        Probe::Map(MapType::Hash),
    ),
    feature(
        "array_map",
        "3.19",
        "which namespace each inbound copy serves",
        Probe::Map(MapType::Array),
    ),
    feature(
        "percpu_hash_map",
        "4.6",
        "per-namespace counters",
        Probe::Map(MapType::PerCpuHash),
    ),
    feature(
        "lru_hash_map",
        "4.10",
        "original destinations from connect to SYN and during the handshake",
        Probe::Map(MapType::LruHash),
    ),
    feature(
        "sk_storage_map",
        "5.2",
        "original destinations kept with each socket",
        Probe::Map(MapType::SkStorage),
    ),
    feature("lpm_trie_map", "4.11", "CIDR sets", Probe::Map(MapType::LpmTrie)),
    feature(
        "sockhash_map",
        "4.18",
        "the proxy's listeners",
        Probe::Map(MapType::SockHash),
    ),
    feature(
        "ringbuf_map",
        "5.8",
        "the programs' log records (aya-log)",
        Probe::Map(MapType::RingBuf),
    ),
    feature(
        "netns_cookie_sock_addr",
        "5.7",
        "telling pod namespaces apart at connect",
        Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_netns_cookie),
    ),
    feature(
        "netns_cookie_sockops",
        "5.15",
        "telling pod namespaces apart in sockops",
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_netns_cookie),
    ),
    feature(
        "netns_cookie_sockopt",
        "5.15",
        "telling pod namespaces apart in getsockopt",
        Probe::Helper(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_get_netns_cookie),
    ),
    feature(
        "sk_storage_sock_addr",
        "5.3",
        "keeping a redirected UDP socket's DNS server with it",
        Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_sk_storage_get),
    ),
    feature(
        "socket_cookie_sock_addr",
        "5.7",
        "keeping a redirected TCP socket's original destination until its SYN",
        Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_get_socket_cookie),
    ),
    feature(
        "socket_cookie_sockops",
        "5.7",
        "finding a redirected TCP socket's original destination at its SYN",
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_get_socket_cookie),
    ),
    feature(
        "sk_storage_sockops",
        "5.10",
        "handing the original destination to the proxy's socket",
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sk_storage_get),
    ),
    feature(
        "sk_storage_sockopt",
        "5.3",
        "reading the proxy's socket's original destination",
        Probe::Helper(ProgramType::CgroupSockopt, BpfHelper::BPF_FUNC_sk_storage_get),
    ),
    feature(
        "sock_hash_update",
        "4.18",
        "keeping the proxy's listeners",
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_hash_update),
    ),
    feature(
        "msg_redirect_hash",
        "4.18",
        "loopback acceleration: a send handed to the peer socket",
        Probe::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_msg_redirect_hash),
    ),
    feature(
        "netns_cookie_sk_msg",
        "5.15",
        "telling pod namespaces apart in loopback acceleration",
        Probe::Helper(ProgramType::SkMsg, BpfHelper::BPF_FUNC_get_netns_cookie),
    ),
    feature(
        "sock_ops_cb_flags_set",
        "4.16",
        "seeing a redirected connection's handshake fail",
        Probe::Helper(ProgramType::SockOps, BpfHelper::BPF_FUNC_sock_ops_cb_flags_set),
    ),
    feature(
        "sk_assign",
        "5.9",
        "handing inbound connections to the proxy",
        Probe::Helper(ProgramType::SkLookup, BpfHelper::BPF_FUNC_sk_assign),
    ),
    feature(
        "sk_lookup_ingress_ifindex",
        "5.17",
        "-c/-k interfaces, inbound",
        Probe::SkLookupField(super::sys::SK_LOOKUP_INGRESS_IFINDEX),
    ),
    feature(
        "ringbuf_output",
        "5.8",
        "the programs' log records (aya-log)",
        Probe::Helper(ProgramType::CgroupSockAddr, BpfHelper::BPF_FUNC_ringbuf_output),
    ),
];

/// The feature the kernel lacks, as one line for the user.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
#[error("this kernel ({kernel}) lacks {name} (Linux {since}+), needed for {used_for}")]
pub struct Missing {
    /// `uname -r`.
    pub kernel: String,
    /// [`Feature::name`].
    pub name: &'static str,
    /// [`Feature::since`].
    pub since: &'static str,
    /// [`Feature::used_for`].
    pub used_for: &'static str,
}

/// The first of `features` that `has` says is missing, or that `assume_missing` names.
pub fn first_missing<'a>(
    features: &'a [Feature],
    has: impl Fn(Probe) -> bool,
    assume_missing: &[&str],
) -> Option<&'a Feature> {
    features
        .iter()
        .find(|f| assume_missing.contains(&f.name) || !has(f.probe))
}

/// Asks the running kernel. A probe that cannot tell counts as missing: better a clear error than a
/// half-applied capture.
pub fn kernel_has(probe: Probe) -> bool {
    match probe {
        Probe::Program(ty) => is_program_supported(ty).unwrap_or(false),
        Probe::Map(ty) => is_map_supported(ty).unwrap_or(false),
        Probe::Helper(ty, helper) => is_helper_supported(ty, helper).unwrap_or(false),
        Probe::SkLookupField(offset) => super::sys::sk_lookup_reads_field(offset),
    }
}

/// Checks every feature on this kernel (honouring `CAPTURE_ASSUME_MISSING`).
pub fn check() -> Result<(), Missing> {
    let assumed = std::env::var(ASSUME_MISSING_ENV).unwrap_or_default();
    let assumed: Vec<&str> = assumed.split(',').map(str::trim).filter(|s| !s.is_empty()).collect();
    match first_missing(FEATURES, kernel_has, &assumed) {
        None => Ok(()),
        Some(f) => Err(Missing {
            kernel: kernel_release(),
            name: f.name,
            since: f.since,
            used_for: f.used_for,
        }),
    }
}

/// The running kernel's release (`uname -r`).
fn kernel_release() -> String {
    std::fs::read_to_string("/proc/sys/kernel/osrelease")
        .map(|r| r.trim().to_owned())
        .unwrap_or_else(|_| "unknown".to_owned())
}

/// The README's table of kernel features, from [`FEATURES`] (a test keeps the two the same).
pub fn markdown_table() -> String {
    let mut out = String::from(
        "| Feature (`CAPTURE_ASSUME_MISSING` name) | Kind | First Linux | Used for |\n|---|---|---|---|\n",
    );
    for f in FEATURES {
        let kind = match f.probe {
            Probe::Program(ty) => format!("program type `{ty:?}`"),
            Probe::Map(ty) => format!("map type `{ty:?}`"),
            Probe::Helper(ty, helper) => format!(
                "helper `{}` in `{ty:?}`",
                format!("{helper:?}").trim_start_matches("BPF_FUNC_")
            ),
            Probe::SkLookupField(_) => "context field `ingress_ifindex` in `SkLookup`".to_owned(),
        };
        out.push_str(&format!("| `{}` | {kind} | {} | {} |\n", f.name, f.since, f.used_for));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_missing_feature_is_reported() {
        let lacks_sk_lookup = |p: Probe| !matches!(p, Probe::Program(ProgramType::SkLookup));
        assert_eq!(
            first_missing(FEATURES, lacks_sk_lookup, &[]).map(|f| f.name),
            Some("sk_lookup")
        );
        assert_eq!(first_missing(FEATURES, |_| true, &[]).map(|f| f.name), None);
        assert_eq!(
            first_missing(FEATURES, |_| true, &["sk_assign", "lru_hash_map"]).map(|f| f.name),
            Some("lru_hash_map")
        );
    }

    #[test]
    fn the_field_probe_tells_a_field_the_kernel_has_from_one_it_lacks() {
        // `ingress_ifindex` is the last field of struct bpf_sk_lookup: 4 bytes further is past its end.
        assert!(super::super::sys::sk_lookup_reads_field(
            super::super::sys::SK_LOOKUP_INGRESS_IFINDEX
        ));
        assert!(!super::super::sys::sk_lookup_reads_field(
            super::super::sys::SK_LOOKUP_INGRESS_IFINDEX + 4
        ));
    }

    #[test]
    fn readme_lists_every_feature() {
        let readme = std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../README.md")).expect("README.md");
        let table = markdown_table();
        assert!(
            readme.contains(&table),
            "README.md's kernel feature table is out of date; it should contain exactly:\n{table}"
        );
    }

    #[test]
    fn feature_names_are_unique_and_versions_are_releases() {
        for (i, f) in FEATURES.iter().enumerate() {
            assert!(FEATURES[..i].iter().all(|g| g.name != f.name), "{} twice", f.name);
            let (major, minor) = f.since.split_once('.').expect("major.minor");
            assert!(
                major.parse::<u32>().is_ok() && minor.parse::<u32>().is_ok(),
                "{}",
                f.since
            );
        }
    }
}
