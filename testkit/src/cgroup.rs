//! Child cgroups of the cgroup v2 root for one test ([`Cgroup`], nested ones with [`Cgroup::child`]), and
//! moving this process into one for a while ([`InCgroup`]). Removed on drop, their processes killed.

use std::{
    fs::File,
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::Command,
    time::Duration,
};

use crate::unique;

/// A child cgroup of the cgroup v2 root, made for one test and removed on drop (after its processes exit);
/// or a cgroup nested under such a one ([`Cgroup::child`]).
pub struct Cgroup {
    path: PathBuf,
    /// Directories made above `path` for it (a nested child's), innermost first: removed after it.
    parents: Vec<PathBuf>,
}

impl Cgroup {
    /// Creates it.
    pub fn new(tag: &str) -> Cgroup {
        let root = ::capture::cgroup::cgroup2_root().expect("cgroup v2 root");
        let path = root.join(unique(tag));
        std::fs::create_dir(&path).unwrap_or_else(|e| panic!("create {}: {e}", path.display()));
        Cgroup {
            path,
            parents: Vec::new(),
        }
    }

    /// A cgroup nested under this one at the relative path `rel` (e.g. the kubelet's
    /// `kubepods/besteffort/pod<UID>/<container>`), made with the directories it needs. Programs attached
    /// to this cgroup apply inside it too. On drop its processes are killed and it is removed, then the
    /// directories made for it (innermost first); drop it before this one.
    pub fn child(&self, rel: impl AsRef<Path>) -> Cgroup {
        let rel = rel.as_ref();
        assert!(
            rel.components().count() > 0 && rel.components().all(|c| matches!(c, std::path::Component::Normal(_))),
            "not a relative path of plain names: {}",
            rel.display()
        );
        let mut path = self.path.clone();
        let mut made = Vec::new();
        for part in rel.components() {
            path.push(part);
            match std::fs::create_dir(&path) {
                Ok(()) => made.push(path.clone()),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => {}
                Err(e) => panic!("create {}: {e}", path.display()),
            }
        }
        // The innermost is the cgroup itself; the rest, innermost first, go after it.
        made.retain(|dir| *dir != path);
        made.reverse();
        Cgroup { path, parents: made }
    }

    /// Its directory.
    pub fn path(&self) -> &std::path::Path {
        &self.path
    }

    /// Makes `cmd` start inside this cgroup.
    pub fn enter(&self, cmd: &mut Command) {
        let procs = File::options()
            .write(true)
            .open(self.path.join("cgroup.procs"))
            .expect("open cgroup.procs");
        // SAFETY: write(2) is async-signal-safe; "0" means the writing process itself.
        unsafe {
            cmd.pre_exec(move || {
                let n = libc::write(std::os::fd::AsRawFd::as_raw_fd(&procs), b"0".as_ptr().cast(), 1);
                if n == 1 {
                    Ok(())
                } else {
                    Err(std::io::Error::last_os_error())
                }
            });
        }
    }
}

impl Cgroup {
    /// Moves this whole process into the cgroup until the guard drops, for code that must run in it on
    /// threads (the demo's in-process sidecar). Drop the guard before the cgroup.
    pub fn enter_self(&self) -> InCgroup {
        let own = std::fs::read_to_string("/proc/self/cgroup").expect("read /proc/self/cgroup");
        let rel = own
            .lines()
            .find_map(|l| l.strip_prefix("0::"))
            .expect("this process is in a cgroup v2 hierarchy");
        let root = ::capture::cgroup::cgroup2_root().expect("cgroup v2 root");
        let back = root.join(rel.trim_start_matches('/'));
        std::fs::write(self.path.join("cgroup.procs"), std::process::id().to_string()).expect("join the cgroup");
        InCgroup { back }
    }
}

/// While it lives, this process is in a test cgroup; on drop it returns where it was.
pub struct InCgroup {
    back: PathBuf,
}

impl Drop for InCgroup {
    fn drop(&mut self) {
        let _ = std::fs::write(self.back.join("cgroup.procs"), std::process::id().to_string());
    }
}

impl Drop for Cgroup {
    fn drop(&mut self) {
        // Whatever still runs in it is a leftover of a failed test: end it (cgroup.kill, Linux 5.14+).
        let _ = std::fs::write(self.path.join("cgroup.kill"), "1");
        // Processes started in it may take a moment to be reaped. Cgroups below it (a test kubelet's
        // `kubepods/besteffort`, which its first pod made and a later pod still used) go with it.
        for _ in 0..50 {
            remove_tree(&self.path);
            if !self.path.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        for dir in &self.parents {
            let _ = std::fs::remove_dir(dir);
        }
    }
}

/// Removes the cgroup `dir` and every cgroup below it, innermost first; those that still hold a process
/// stay (and so do their ancestors).
pub fn remove_tree(dir: &Path) {
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        if entry.file_type().is_ok_and(|t| t.is_dir()) {
            remove_tree(&entry.path());
        }
    }
    let _ = std::fs::remove_dir(dir);
}
