//! Throwaway network namespaces ([`Netns`]) and the pod topology built from two of them ([`Pod`]): a pod
//! joined by veth to a "remote", with the addresses of both ends. Deleted on drop.

use std::{
    fs::File,
    net::{Ipv4Addr, Ipv6Addr},
    os::unix::process::CommandExt as _,
    path::PathBuf,
    process::{Command, Output},
    thread::JoinHandle,
};

use crate::{run, unique};

/// Pod side of the veth pair.
pub const POD_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 1);
/// Remote side of the veth pair.
pub const REMOTE_V4: Ipv4Addr = Ipv4Addr::new(192, 0, 2, 2);
/// Pod side, IPv6.
pub const POD_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 1);
/// Remote side, IPv6.
pub const REMOTE_V6: Ipv6Addr = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 2);

/// A network namespace made with `ip netns add`, deleted on drop.
pub struct Netns {
    name: String,
}

impl Netns {
    /// A new namespace with `lo` up.
    pub fn new(tag: &str) -> Netns {
        let ns = Netns { name: unique(tag) };
        run(Command::new("ip").args(["netns", "add", &ns.name]));
        ns.ip(&["link", "set", "lo", "up"]);
        ns
    }

    /// The namespace's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The namespace's bind mount, as `--network-namespace` takes it.
    pub fn path(&self) -> PathBuf {
        PathBuf::from("/run/netns").join(&self.name)
    }

    /// `ip -n NAME ARGS`.
    pub fn ip(&self, args: &[&str]) -> Output {
        run(Command::new("ip").arg("-n").arg(&self.name).args(args))
    }

    fn file(&self) -> File {
        File::open(self.path()).unwrap_or_else(|e| panic!("open {}: {e}", self.path().display()))
    }

    /// A command that runs inside this namespace (only the network namespace changes: bpffs and cgroupfs
    /// stay visible, unlike with `ip netns exec`).
    pub fn command(&self, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let ns = self.file();
        let mut cmd = Command::new(program);
        // SAFETY: setns is async-signal-safe; the closure only makes that one system call.
        unsafe {
            cmd.pre_exec(move || {
                nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).map_err(std::io::Error::from)
            });
        }
        cmd
    }

    /// Runs `f` on a new thread inside this namespace, as `ids` (uid, gid) if given. Credentials and
    /// namespace change only for that thread (raw syscalls, not libc's process-wide wrappers); the cgroup
    /// does not, so cgroup BPF programs never see its sockets. Only the in-process sidecar uses this: test
    /// clients and servers are `capture-probe` processes ([`crate::Listeners`], [`crate::connect_as`]).
    pub fn spawn<T: Send + 'static>(
        &self,
        ids: Option<(u32, u32)>,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> JoinHandle<T> {
        let ns = self.file();
        std::thread::spawn(move || {
            nix::sched::setns(&ns, nix::sched::CloneFlags::CLONE_NEWNET).expect("setns");
            if let Some((uid, gid)) = ids {
                // SAFETY: raw setresgid/setresuid change only the calling thread's credentials.
                unsafe {
                    assert_eq!(libc::syscall(libc::SYS_setresgid, gid, gid, gid), 0, "setresgid");
                    assert_eq!(libc::syscall(libc::SYS_setresuid, uid, uid, uid), 0, "setresuid");
                }
            }
            f()
        })
    }

    /// Capture rules and user chains in this namespace, as `iptables-save` shows them (counters and
    /// comments dropped), for both families.
    pub fn iptables_rules(&self) -> Vec<String> {
        ["iptables-save", "ip6tables-save"]
            .iter()
            .flat_map(|bin| {
                let out = run(&mut self.command(bin));
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter(|l| l.starts_with("-A ") || (l.starts_with(':') && l.contains(" - ")))
                    .map(|l| format!("{bin}: {l}"))
                    .collect::<Vec<_>>()
            })
            .collect()
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip").args(["netns", "del", &self.name]).status();
    }
}

/// A pod namespace joined by a veth pair to a "remote" namespace, both with `eth0`, IPv4 and IPv6.
pub struct Pod {
    /// The pod's namespace (the app and its sidecar run here).
    pub pod: Netns,
    /// The other end of the wire.
    pub remote: Netns,
}

impl Pod {
    /// Builds the topology.
    pub fn new(tag: &str) -> Pod {
        let pod = Netns::new(&format!("{tag}-p"));
        let remote = Netns::new(&format!("{tag}-r"));
        pod.ip(&[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "eth0",
            "netns",
            remote.name(),
        ]);
        for (ns, v4, v6) in [(&pod, POD_V4, POD_V6), (&remote, REMOTE_V4, REMOTE_V6)] {
            ns.ip(&["addr", "add", &format!("{v4}/24"), "dev", "eth0"]);
            ns.ip(&["addr", "add", &format!("{v6}/64"), "dev", "eth0", "nodad"]);
            ns.ip(&["link", "set", "eth0", "up"]);
        }
        Pod { pod, remote }
    }
}
