//! Finding where the eBPF programs attach: the cgroup v2 hierarchy's root by default, and under Kubernetes
//! the agent's default, the pods' parent cgroup (`kubepods`). The hierarchy is not always at
//! /sys/fs/cgroup (hybrid hosts mount it at /sys/fs/cgroup/unified), so it is read from /proc/mounts.

use std::path::{Path, PathBuf};

use anyhow::{Context as _, Result, bail};

/// The first cgroup2 mount point in `mounts` (the text of /proc/mounts).
pub fn cgroup2_mount(mounts: &str) -> Option<PathBuf> {
    mounts.lines().find_map(|line| {
        let mut fields = line.split_whitespace();
        let (_source, target, fstype) = (fields.next()?, fields.next()?, fields.next()?);
        (fstype == "cgroup2").then(|| PathBuf::from(unescape(target)))
    })
}

/// /proc/mounts escapes space, tab, newline and backslash as octal (`\040`).
fn unescape(field: &str) -> String {
    let mut out = String::with_capacity(field.len());
    let mut rest = field;
    while let Some(i) = rest.find('\\') {
        out.push_str(&rest[..i]);
        let code = rest.get(i + 1..i + 4).and_then(|o| u8::from_str_radix(o, 8).ok());
        match code {
            Some(c) => {
                out.push(char::from(c));
                rest = &rest[i + 4..];
            }
            None => {
                out.push('\\');
                rest = &rest[i + 1..];
            }
        }
    }
    out.push_str(rest);
    out
}

/// The cgroup v2 root of this machine.
pub fn cgroup2_root() -> Result<PathBuf> {
    let mounts = std::fs::read_to_string("/proc/mounts").context("read /proc/mounts")?;
    match cgroup2_mount(&mounts) {
        Some(root) => Ok(root),
        None => bail!("no cgroup v2 hierarchy is mounted (none in /proc/mounts); the eBPF backend needs one"),
    }
}

/// The kubelet's parent cgroup of every pod, under the cgroup v2 root `root`: `kubepods.slice` with the
/// systemd cgroup driver, `kubepods` with cgroupfs. The node agent attaches there by default: below a
/// socket load balancer at the root (Cilium's, Calico's), so that capture sees a service VIP before it is
/// rewritten to a backend, and the node's own processes outside the pods never run capture's programs.
/// Both present, or neither, is an error: the agent would guess where pods are.
pub fn kubepods(root: &Path) -> Result<PathBuf> {
    let found: Vec<PathBuf> = ["kubepods.slice", "kubepods"]
        .iter()
        .map(|name| root.join(name))
        .filter(|dir| dir.is_dir())
        .collect();
    match found.as_slice() {
        [one] => Ok(one.clone()),
        [] => bail!(
            "--cgroup-root {}: neither kubepods.slice (systemd cgroup driver) nor kubepods (cgroupfs) is there; \
             give the pods' parent cgroup with --cgroup",
            root.display()
        ),
        _ => bail!(
            "--cgroup-root {}: both kubepods.slice and kubepods are there; give the one the kubelet uses with \
             --cgroup",
            root.display()
        ),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A temporary directory tree with the given subdirectories, removed on drop.
    struct Tree(PathBuf);

    impl Tree {
        fn new(tag: &str, dirs: &[&str]) -> Tree {
            let root = std::env::temp_dir().join(format!("capture-cgroup-{tag}-{}", std::process::id()));
            for dir in dirs {
                std::fs::create_dir_all(root.join(dir)).unwrap();
            }
            std::fs::create_dir_all(&root).unwrap();
            Tree(root)
        }
    }

    impl Drop for Tree {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    #[test]
    fn finds_kubepods_for_both_cgroup_drivers() {
        let systemd = Tree::new("systemd", &["kubepods.slice/kubepods-besteffort.slice", "system.slice"]);
        assert_eq!(kubepods(&systemd.0).unwrap(), systemd.0.join("kubepods.slice"));
        let cgroupfs = Tree::new("cgroupfs", &["kubepods/besteffort", "system.slice"]);
        assert_eq!(kubepods(&cgroupfs.0).unwrap(), cgroupfs.0.join("kubepods"));
    }

    #[test]
    fn no_kubepods_or_both_is_one_line_naming_the_flag() {
        let none = Tree::new("none", &["system.slice", "kubepods.slice.d"]);
        let err = kubepods(&none.0).unwrap_err().to_string();
        assert!(
            err.starts_with("--cgroup-root ") && err.contains("--cgroup") && !err.contains('\n'),
            "{err}"
        );
        assert!(err.contains("neither"), "{err}");
        // A file of that name is no cgroup.
        std::fs::write(none.0.join("kubepods"), "").unwrap();
        assert!(kubepods(&none.0).is_err());
        let both = Tree::new("both", &["kubepods.slice", "kubepods"]);
        let err = kubepods(&both.0).unwrap_err().to_string();
        assert!(err.contains("both"), "{err}");
    }

    #[test]
    fn finds_cgroup2_wherever_it_is_mounted() {
        let hybrid = "tmpfs /sys/fs/cgroup tmpfs rw 0 0\ncgroup /sys/fs/cgroup/cpu cgroup rw,cpu 0 0\n\
                      cgroup2 /sys/fs/cgroup/unified cgroup2 rw 0 0\n";
        assert_eq!(cgroup2_mount(hybrid), Some(PathBuf::from("/sys/fs/cgroup/unified")));
        assert_eq!(
            cgroup2_mount("cgroup2 /sys/fs/cgroup cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/sys/fs/cgroup"))
        );
        assert_eq!(
            cgroup2_mount("cgroup2 /mnt/my\\040cg cgroup2 rw 0 0\n"),
            Some(PathBuf::from("/mnt/my cg"))
        );
        assert_eq!(cgroup2_mount("cgroup /sys/fs/cgroup/cpu cgroup rw 0 0\n"), None);
    }
}
