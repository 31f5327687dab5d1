//! The pod's cgroups, one per mode, so that the CPU each mode spends is its own (`cpu.stat`) and the eBPF
//! programs of one mode never run for another's sockets.
//!
//! The app and the sidecar are threads of this process. cgroup v2's threaded mode lets threads of one
//! process sit in different cgroups: this process moves into a fresh cgroup (the threaded domain), each mode
//! gets a threaded child, and a thread moves into a mode's child just while it starts that mode's app or
//! sidecar threads (or the HAProxy process), which inherit it. The echo servers and this main thread stay in
//! the domain, so they are counted in no mode.

use std::{
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, Result};

/// The threaded domain and its children; removed on drop, the process back where it was.
pub struct Cgroups {
    domain: PathBuf,
    back: PathBuf,
    children: Vec<PathBuf>,
}

impl Cgroups {
    /// Creates the domain under the cgroup v2 root and moves this process into it.
    pub fn new(tag: &str) -> Result<Cgroups> {
        let root = capture::cgroup::cgroup2_root().context("cgroup v2 root")?;
        let own = std::fs::read_to_string("/proc/self/cgroup").context("read /proc/self/cgroup")?;
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .context("this process is in no cgroup v2 hierarchy")?;
        let back = root.join(rel.trim_start_matches('/'));
        let domain = root.join(format!("cap-{tag}-{}", std::process::id()));
        std::fs::create_dir(&domain).with_context(|| format!("create {}", domain.display()))?;
        let cgroups = Cgroups {
            domain,
            back,
            children: Vec::new(),
        };
        write(&cgroups.domain.join("cgroup.procs"), &std::process::id().to_string())?;
        Ok(cgroups)
    }

    /// A new threaded child named `name`.
    pub fn child(&mut self, name: &str) -> Result<PathBuf> {
        let path = self.domain.join(name);
        std::fs::create_dir(&path).with_context(|| format!("create {}", path.display()))?;
        self.children.push(path.clone());
        write(&path.join("cgroup.type"), "threaded")?;
        Ok(path)
    }

    /// Whether `path` is one of the children this made.
    pub fn owns(&self, path: &Path) -> bool {
        self.children.iter().any(|c| c == path)
    }
}

/// Moves the calling thread into `child` (a cgroup made by [`Cgroups::child`]) until the guard drops, then
/// back to the domain. Threads and processes it starts meanwhile start there.
pub fn enter(child: &Path) -> Result<InChild> {
    let domain = child.parent().context("a mode's cgroup has a parent")?.to_owned();
    write(&child.join("cgroup.threads"), "0")?;
    Ok(InChild { domain })
}

impl Drop for Cgroups {
    fn drop(&mut self) {
        let _ = std::fs::write(self.back.join("cgroup.procs"), std::process::id().to_string());
        // Threads that served the last connections may take a moment to exit.
        for dir in self.children.iter().rev().chain([&self.domain]) {
            for _ in 0..100 {
                if std::fs::remove_dir(dir).is_ok() || !dir.exists() {
                    break;
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// While it lives, the thread that made it is in a mode's cgroup.
pub struct InChild {
    domain: PathBuf,
}

impl Drop for InChild {
    fn drop(&mut self) {
        let _ = std::fs::write(self.domain.join("cgroup.threads"), "0");
    }
}

/// CPU time spent by the tasks of cgroup `dir` so far (`usage_usec` of its `cpu.stat`; the kernel keeps it
/// with no controller enabled).
pub fn cpu_usage(dir: &Path) -> Result<Duration> {
    let path = dir.join("cpu.stat");
    let text = std::fs::read_to_string(&path).with_context(|| format!("read {}", path.display()))?;
    text.lines()
        .find_map(|l| l.strip_prefix("usage_usec "))
        .and_then(|v| v.trim().parse().ok())
        .map(Duration::from_micros)
        .with_context(|| format!("no usage_usec in {}", path.display()))
}

fn write(path: &Path, value: &str) -> Result<()> {
    std::fs::write(path, value).with_context(|| format!("write {value:?} to {}", path.display()))
}
