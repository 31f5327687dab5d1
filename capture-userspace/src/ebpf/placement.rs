//! Where the eBPF backend's state would live, and refusing places where it would silently do nothing.
//!
//! An apply attaches programs to a cgroup and pins them in a bpffs, so that capture outlives the `capture`
//! process. Run the init-container way inside a container, both can be the container's own: the cgroup
//! root it finds is its cgroup namespace's (the container's own cgroup), and a bpffs it mounts is its
//! mount namespace's. Both go with the container, and the pod would be captured by nothing while
//! `capture` had exited 0. So an apply refuses there, with one line saying what to use instead; `--backend
//! auto` takes iptables.

use std::{os::unix::fs::MetadataExt as _, path::Path};

use super::pins::needs_bpffs_mount;

/// `PROC_CGROUP_INIT_INO` (linux/proc_ns.h): the inode of the initial cgroup namespace, fixed since the
/// cgroup namespace exists (Linux 4.6).
const CGROUP_INIT_INO: u64 = 0xEFFF_FFFB;
/// `PROC_PID_INIT_INO`: the inode of the initial PID namespace.
const PID_INIT_INO: u64 = 0xEFFF_FFFC;
/// In the initial PID namespace, PID 2 is the kernel's thread creator, whose namespaces are the initial
/// ones (PID 1 may not let itself be inspected).
const KTHREADD: &str = "/proc/2";

/// Why an apply with pins in `pin_dir` would vanish with this process's container, if it would.
pub fn vanishing(pin_dir: &Path) -> Option<String> {
    const USE: &str = "use the node agent (capture agent) or --backend iptables";
    if !in_host_cgroup_namespace() {
        return Some(format!(
            "capture runs in a cgroup namespace of its own (a container's): the programs would attach to the \
             container's cgroup and go with it; {USE}"
        ));
    }
    if needs_bpffs_mount(pin_dir) && !in_host_mount_namespace() {
        return Some(format!(
            "--pin-dir {} is not on a bpffs, and one mounted from this mount namespace (a container's) would \
             go with it; mount the host's bpffs there, or {USE}",
            pin_dir.display()
        ));
    }
    None
}

fn ino(path: &str) -> Option<u64> {
    std::fs::metadata(path).ok().map(|m| m.ino())
}

fn in_host_cgroup_namespace() -> bool {
    ino("/proc/self/ns/cgroup") == Some(CGROUP_INIT_INO)
}

/// The initial PID namespace, and the mount namespace the kernel's own threads have. Unknown counts as
/// no: refusing is the safe side.
fn in_host_mount_namespace() -> bool {
    let is_kthreadd = std::fs::read_to_string(format!("{KTHREADD}/comm")).is_ok_and(|c| c.trim() == "kthreadd");
    let same = |ns: &str| {
        let mine = std::fs::metadata(format!("/proc/self/ns/{ns}"));
        let init = std::fs::metadata(format!("{KTHREADD}/ns/{ns}"));
        matches!((mine, init), (Ok(a), Ok(b)) if (a.dev(), a.ino()) == (b.dev(), b.ino()))
    };
    ino("/proc/self/ns/pid") == Some(PID_INIT_INO) && is_kthreadd && same("mnt")
}
