//! The agent's pods: which are captured, under which namespace cookie, from which source; registering and
//! unregistering them with the eBPF backend; and the state file that lets a restarted agent take over the
//! pods the kernel still captures (the pins outlive the agent) without touching them.

use std::{
    collections::BTreeMap,
    fs::File,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use serde::{Deserialize, Serialize};

use super::PodSpec;
use crate::{
    config::{Backend, Invocation},
    ebpf, flags, namespace,
};

/// Flags the agent sets itself: a pod may not choose where the programs live or how they are applied.
const AGENT_OWNED_FLAGS: [&str; 6] = [
    "--backend",
    "--pin-dir",
    "--cgroup",
    "--network-namespace",
    "--log-level",
    "--cleanup-only",
];

/// Which source told the agent about a pod; a source's resync only releases its own pods.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Source {
    /// The local control socket (`capture pod add`).
    Control,
    /// The Kubernetes pod watch.
    Kubernetes,
}

/// One captured pod.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct PodRecord {
    /// What the source asked for.
    pub spec: PodSpec,
    /// Who asked.
    pub source: Source,
    /// The cookie of the namespace it was registered under.
    pub cookie: u64,
    /// Which namespace that was, beyond its path: a path such as `/proc/PID/ns/net` can lead to another
    /// namespace once the PID is reused, so a record is only ever trusted for the namespace it names.
    #[serde(default)]
    pub identity: NetnsIdentity,
}

/// What identifies a network namespace across an agent restart: the boot (cookies and inodes start over
/// with each), the nsfs device and inode of its file, and its cookie (never reused within a boot).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetnsIdentity {
    /// `/proc/sys/kernel/random/boot_id` when the record was made.
    pub boot_id: String,
    /// `st_dev` of the namespace's file.
    pub dev: u64,
    /// `st_ino` of the namespace's file.
    pub ino: u64,
}

/// Where the programs are and where the agent keeps its records.
#[derive(Clone, Debug)]
pub struct Settings {
    /// bpffs directory of the programs and maps.
    pub pin_dir: PathBuf,
    /// cgroup the programs are attached to.
    pub cgroup: PathBuf,
    /// Directory of the state file (on tmpfs, like the pins: both go with a reboot).
    pub state_dir: PathBuf,
}

/// The captured pods, by id.
pub struct Registry {
    settings: Settings,
    pods: BTreeMap<String, PodRecord>,
    /// sk_lookup copies loaded ahead, so that registering a pod only hands one over.
    spares: Arc<ebpf::Spares>,
    /// The record file could not be read: rebuild the records from the kernel's registrations.
    rebuild: bool,
}

/// What the agent keeps in the kernel beside each pod's registration (`FLAGS_TEXT`, which `capture status`
/// shows): enough to rebuild the pod's record if the record file is lost or corrupt.
#[derive(Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Label {
    pod: String,
    source: Source,
    netns: PathBuf,
    flags: Vec<String>,
}

/// How a label starts, telling the agent's registrations from those `capture` made itself.
const LABEL_PREFIX: &str = "agent pod ";

impl Label {
    fn text(spec: &PodSpec, source: Source) -> String {
        let label = Label {
            pod: spec.id.clone(),
            source,
            netns: spec.netns.clone(),
            flags: spec.flags.clone(),
        };
        format!(
            "{LABEL_PREFIX}{}",
            serde_json::to_string(&label).expect("labels serialize")
        )
    }

    /// The label in a registration's text; None for `capture`'s own registrations, or a label cut short by
    /// the kernel's 1 KiB.
    fn parse(text: &str) -> Option<Label> {
        serde_json::from_str(text.strip_prefix(LABEL_PREFIX)?).ok()
    }
}

/// What a reconcile at start found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Reconciled {
    /// Pods still there and still registered: left untouched.
    pub kept: usize,
    /// Pods still there whose registration was missing: registered again.
    pub restored: usize,
    /// Pods whose namespace is gone: unregistered.
    pub released: usize,
}

impl Registry {
    /// The registry as the state file left it, not yet reconciled with the kernel; new pods get their
    /// sk_lookup copies from `spares`.
    pub fn load(settings: Settings, spares: Arc<ebpf::Spares>) -> Result<Registry> {
        let path = state_file(&settings.state_dir);
        let mut rebuild = false;
        let pods = match std::fs::read(&path) {
            Ok(bytes) => match serde_json::from_slice::<Vec<PodRecord>>(&bytes) {
                Ok(list) => list.into_iter().map(|r| (r.spec.id.clone(), r)).collect(),
                Err(e) => {
                    // Set aside for a post-mortem; the kernel's registrations say what was captured.
                    let aside = path.with_extension("json.corrupt");
                    std::fs::rename(&path, &aside)
                        .with_context(|| format!("set {} aside as {}", path.display(), aside.display()))?;
                    tracing::warn!(file = %aside.display(), error = %e, "the records are corrupt; set aside, rebuilding them from the kernel");
                    rebuild = true;
                    BTreeMap::new()
                }
            },
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => BTreeMap::new(),
            Err(e) => return Err(e).with_context(|| format!("read {}", path.display())),
        };
        Ok(Registry {
            settings,
            pods,
            spares,
            rebuild,
        })
    }

    /// Where the programs and records are.
    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Every captured pod.
    pub fn pods(&self) -> impl Iterator<Item = &PodRecord> {
        self.pods.values()
    }

    /// The pod that has namespace cookie `cookie`.
    pub fn by_cookie(&self, cookie: u64) -> Option<&PodRecord> {
        self.pods.values().find(|r| r.cookie == cookie)
    }

    /// Makes the kernel's registrations match the records after a start: a pod whose namespace is still
    /// the one recorded (same boot, same nsfs inode, same cookie) and still registered is left alone, so
    /// its connections never notice the restart; one whose registration went missing is registered again.
    /// A record whose path is gone or now leads to another namespace (the PID was reused while the agent
    /// was down), or that was made before a reboot, is released by its cookie and forgotten: its flags are
    /// never applied to a namespace it did not name.
    pub fn reconcile(&mut self) -> Result<Reconciled> {
        let kernel = ebpf::registered(&self.settings.pin_dir)?;
        let mut out = Reconciled::default();
        if std::mem::take(&mut self.rebuild) {
            out.released += self.rebuild_records(&kernel)?;
        }
        let registered: Vec<u64> = kernel.iter().map(|r| r.netns).collect();
        let records: Vec<PodRecord> = self.pods.values().cloned().collect();
        for record in records {
            // A record written before identities were kept: its cookie alone tells (the records live on
            // tmpfs, so it is of this boot), and it gets its identity now.
            let legacy = record.identity == NetnsIdentity::default();
            // The namespace the path leads to now (this boot's id included), if it is still the recorded one.
            let still = identify(&record.spec.netns)
                .ok()
                .filter(|(cookie, id)| *cookie == record.cookie && (legacy || *id == record.identity));
            let Some((_, identity)) = still else {
                tracing::warn!(pod = %record.spec.id, netns = %record.spec.netns.display(), "the recorded namespace is gone; released");
                ebpf::unregister(&self.settings.pin_dir, record.cookie)?;
                self.pods.remove(&record.spec.id);
                out.released += 1;
                continue;
            };
            if let Some(r) = self.pods.get_mut(&record.spec.id) {
                r.identity = identity;
            }
            if registered.contains(&record.cookie) {
                out.kept += 1;
                continue;
            }
            // One pod that cannot be registered again must not keep the agent from starting.
            let id = record.spec.id.clone();
            match self.register(record.spec, record.source) {
                Ok(_) => out.restored += 1,
                Err(e) => {
                    tracing::warn!(pod = %id, error = %format!("{e:#}"), "could not register again; released");
                    ebpf::unregister(&self.settings.pin_dir, record.cookie)?;
                    self.pods.remove(&id);
                    out.released += 1;
                }
            }
        }
        self.save()?;
        Ok(out)
    }

    /// Makes records again for the agent's registrations in the kernel (those with a [`Label`]), after the
    /// record file was lost: each under its pod's id, source and flags, in the namespace that has its
    /// cookie. One whose namespace is nowhere to be found any more is released. `capture`'s own
    /// registrations are not the agent's and are left alone. Returns how many were released.
    fn rebuild_records(&mut self, kernel: &[ebpf::Registered]) -> Result<usize> {
        let mut released = 0;
        for registration in kernel {
            let Some(label) = Label::parse(&registration.flags) else {
                continue;
            };
            let cookie = registration.netns;
            let found = std::iter::once(label.netns.clone())
                .chain(namespace_files())
                .find_map(|path| {
                    identify(&path)
                        .ok()
                        .filter(|(c, _)| *c == cookie)
                        .map(|(_, id)| (path, id))
                });
            let Some((netns, identity)) = found else {
                tracing::warn!(pod = %label.pod, cookie, "no namespace has the recorded cookie any more; released");
                ebpf::unregister(&self.settings.pin_dir, cookie)?;
                released += 1;
                continue;
            };
            tracing::info!(pod = %label.pod, netns = %netns.display(), "record rebuilt from the kernel");
            let spec = PodSpec {
                id: label.pod,
                netns,
                flags: label.flags,
            };
            let record = PodRecord {
                spec,
                source: label.source,
                cookie,
                identity,
            };
            self.pods.insert(record.spec.id.clone(), record);
        }
        Ok(released)
    }

    /// Captures `spec` for `source` (or updates it). Adding the same pod twice changes nothing. Returns how
    /// long the kernel registration took (zero when there was nothing to do).
    pub fn upsert(&mut self, spec: PodSpec, source: Source) -> Result<Duration> {
        if self.pods.get(&spec.id).is_some_and(|r| r.spec == spec) {
            return Ok(Duration::ZERO);
        }
        let started = Instant::now();
        let old_cookie = self.pods.get(&spec.id).map(|r| r.cookie);
        let cookie = self.register(spec, source)?;
        if let Some(old) = old_cookie.filter(|&old| old != cookie) {
            // The pod moved to another namespace: release the old one.
            ebpf::unregister(&self.settings.pin_dir, old)?;
        }
        self.save()?;
        Ok(started.elapsed())
    }

    /// Releases pod `id`; releasing a pod that is not captured is not an error.
    pub fn remove(&mut self, id: &str) -> Result<bool> {
        let Some(record) = self.pods.remove(id) else {
            return Ok(false);
        };
        ebpf::unregister(&self.settings.pin_dir, record.cookie)?;
        self.save()?;
        Ok(true)
    }

    /// Releases every pod of `source` that is not in `present` (after that source re-listed its pods).
    pub fn retain(&mut self, source: Source, present: &[String]) -> Result<usize> {
        let gone: Vec<String> = self
            .pods
            .values()
            .filter(|r| r.source == source && !present.contains(&r.spec.id))
            .map(|r| r.spec.id.clone())
            .collect();
        for id in &gone {
            self.remove(id)?;
        }
        Ok(gone.len())
    }

    /// Registers `spec` in its namespace and records it; returns the namespace's cookie. Refuses the
    /// agent's own namespace (the host's) and a namespace another pod's record holds.
    fn register(&mut self, spec: PodSpec, source: Source) -> Result<u64> {
        let inv = invocation(&spec, &self.settings)?;
        let label = Label::text(&spec, source);
        let netns = File::open(&spec.netns).with_context(|| format!("open {}", spec.netns.display()))?;
        let identity = identity_of(&netns, boot_id()?)?;
        let resolv_conf = inv.options.resolv_conf.clone();
        let pin_dir = self.settings.pin_dir.clone();
        let spares = self.spares.clone();
        let own = namespace::cookie().context("the agent's own namespace")?;
        let held: Vec<(u64, String)> = self
            .pods
            .values()
            .filter(|r| r.spec.id != spec.id)
            .map(|r| (r.cookie, r.spec.id.clone()))
            .collect();
        // setns changes only the calling thread's network namespace: a thread of its own enters the pod's.
        let cookie = std::thread::spawn(move || -> Result<u64> {
            nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).context("enter the pod's namespace")?;
            let cookie = namespace::cookie()?;
            if cookie == own {
                bail!("its namespace is the agent's own (the host's): never captured");
            }
            if let Some((_, other)) = held.iter().find(|(c, _)| *c == cookie) {
                bail!("its namespace is already captured for pod {other}");
            }
            let mut env = namespace::detect(&inv.config, &resolv_conf)?;
            ebpf::register_here(&inv, &mut env, &pin_dir, &spares, &label)
        })
        .join()
        .map_err(|_| anyhow::anyhow!("the registration thread panicked"))?
        .with_context(|| format!("register pod {}", spec.id))?;
        self.pods.insert(
            spec.id.clone(),
            PodRecord {
                spec,
                source,
                cookie,
                identity,
            },
        );
        Ok(cookie)
    }

    /// Writes the records (to a new file, then renamed over the old one: never half-written).
    fn save(&self) -> Result<()> {
        let dir = &self.settings.state_dir;
        std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
        let path = state_file(dir);
        let tmp = path.with_extension("json.new");
        let list: Vec<&PodRecord> = self.pods.values().collect();
        std::fs::write(&tmp, serde_json::to_vec_pretty(&list)?).with_context(|| format!("write {}", tmp.display()))?;
        std::fs::rename(&tmp, &path).with_context(|| format!("replace {}", path.display()))
    }
}

fn state_file(dir: &Path) -> PathBuf {
    dir.join("pods.json")
}

/// The invocation for a pod: its flags, checked as `capture` checks them, on the agent's programs.
pub fn invocation(spec: &PodSpec, settings: &Settings) -> Result<Invocation> {
    if let Some(flag) = spec
        .flags
        .iter()
        .find(|f| AGENT_OWNED_FLAGS.iter().any(|own| f.split('=').next() == Some(own)))
    {
        bail!("{flag}: set by the agent, not per pod");
    }
    let mut args: Vec<String> = vec!["capture".into()];
    args.extend(spec.flags.iter().cloned());
    // A pod in /proc/PID/ns/net reads its own resolv.conf unless it names one.
    if let Some(pid) = proc_pid(&spec.netns)
        && !spec.flags.iter().any(|f| f.starts_with("--resolv-conf"))
    {
        args.push(format!("--resolv-conf=/proc/{pid}/root/etc/resolv.conf"));
    }
    args.extend([
        "--backend".into(),
        "ebpf".into(),
        "--pin-dir".into(),
        settings.pin_dir.display().to_string(),
        "--cgroup".into(),
        settings.cgroup.display().to_string(),
    ]);
    // The environment is the agent's: pods give everything as flags.
    let inv = flags::parse(args, &|_| None).map_err(|e| anyhow::anyhow!("{e}"))?;
    if inv.options.backend != Backend::Ebpf || inv.options.dry_run {
        bail!("pod {}: the agent applies the eBPF backend, for real", spec.id);
    }
    Ok(inv)
}

/// The PID of a `/proc/PID/ns/net` path.
fn proc_pid(netns: &Path) -> Option<u32> {
    let mut parts = netns.strip_prefix("/proc").ok()?.components();
    let pid = parts.next()?.as_os_str().to_str()?.parse().ok()?;
    (parts.as_path() == Path::new("ns/net")).then_some(pid)
}

/// Every file that names a network namespace: `/run/netns/*` and each process's `/proc/PID/ns/net`, one
/// path per namespace.
fn namespace_files() -> impl Iterator<Item = PathBuf> {
    let named = std::fs::read_dir("/run/netns")
        .into_iter()
        .flatten()
        .flatten()
        .map(|e| e.path());
    let processes = std::fs::read_dir("/proc")
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| {
            e.file_name()
                .to_str()
                .is_some_and(|n| n.bytes().all(|b| b.is_ascii_digit()))
        })
        .map(|e| e.path().join("ns/net"));
    let mut seen = std::collections::HashSet::new();
    named.chain(processes).filter(move |path| {
        std::fs::metadata(path).is_ok_and(|m| {
            use std::os::unix::fs::MetadataExt as _;
            seen.insert((m.dev(), m.ino()))
        })
    })
}

/// This boot's id: cookies and nsfs inodes start over with each boot.
fn boot_id() -> Result<String> {
    const PATH: &str = "/proc/sys/kernel/random/boot_id";
    Ok(std::fs::read_to_string(PATH)
        .with_context(|| format!("read {PATH}"))?
        .trim()
        .to_owned())
}

/// The identity of the namespace `netns` is a file of, in boot `boot_id`.
fn identity_of(netns: &File, boot_id: String) -> Result<NetnsIdentity> {
    let stat = nix::sys::stat::fstat(netns).context("stat the namespace")?;
    Ok(NetnsIdentity {
        boot_id,
        dev: stat.st_dev,
        ino: stat.st_ino,
    })
}

/// The cookie and identity of the namespace at `path` now (the cookie from a thread that enters it).
fn identify(path: &Path) -> Result<(u64, NetnsIdentity)> {
    let netns = File::open(path).with_context(|| format!("open {}", path.display()))?;
    let identity = identity_of(&netns, boot_id()?)?;
    let cookie = std::thread::spawn(move || -> Result<u64> {
        nix::sched::setns(&netns, nix::sched::CloneFlags::CLONE_NEWNET).context("enter the namespace")?;
        namespace::cookie()
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the cookie thread panicked"))??;
    Ok((cookie, identity))
}

/// Settings for unit tests: paths only, nothing is opened.
#[cfg(test)]
pub(crate) fn test_settings() -> Settings {
    Settings {
        pin_dir: "/run/pins".into(),
        cgroup: "/sys/fs/cgroup/x".into(),
        state_dir: "/run/state".into(),
    }
}

#[cfg(test)]
mod tests {
    use super::{test_settings as settings, *};

    fn spec(netns: &str, flags: &[&str]) -> PodSpec {
        PodSpec {
            id: "default/app".into(),
            netns: netns.into(),
            flags: flags.iter().map(|f| f.to_string()).collect(),
        }
    }

    #[test]
    fn a_pods_flags_are_checked_as_capture_checks_them_and_the_agent_places_the_programs() {
        let inv = invocation(&spec("/run/netns/x", &["-p", "15001", "-u", "1337"]), &settings()).unwrap();
        assert_eq!(inv.options.pin_dir, Path::new("/run/pins"));
        assert_eq!(inv.options.cgroup.as_deref(), Some(Path::new("/sys/fs/cgroup/x")));
        assert_eq!(inv.options.backend, Backend::Ebpf);
        let err = invocation(&spec("/run/netns/x", &["-p", "99999"]), &settings()).unwrap_err();
        assert!(err.to_string().contains("99999"), "{err}");
        let err = invocation(&spec("/run/netns/x", &["--pin-dir=/tmp"]), &settings()).unwrap_err();
        assert_eq!(err.to_string(), "--pin-dir=/tmp: set by the agent, not per pod");
    }

    #[test]
    fn a_pod_in_a_process_namespace_reads_that_process_resolv_conf() {
        let inv = invocation(&spec("/proc/42/ns/net", &[]), &settings()).unwrap();
        assert_eq!(inv.options.resolv_conf, Path::new("/proc/42/root/etc/resolv.conf"));
        let inv = invocation(&spec("/run/netns/x", &[]), &settings()).unwrap();
        assert_eq!(inv.options.resolv_conf, Path::new("/etc/resolv.conf"));
        assert_eq!(proc_pid(Path::new("/proc/42/ns/mnt")), None);
    }
}
