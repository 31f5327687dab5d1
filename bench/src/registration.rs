//! Pod registration through the node agent: how long `capture agent` takes to register a pod, as its own
//! `registered … micros=` log line says (flags checked, the pod's namespace entered, map entries written,
//! the pod's sk_lookup copy attached, the record saved); pods added one at a time as a node's pods arrive,
//! then in a burst of back-to-back adds; and the agent's resident memory after. The agent runs in a cgroup
//! and a bpffs mount of its own; its pods are throwaway namespaces.

use std::{
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};
use testkit::{BpfPins, Cgroup, Netns};

use crate::{Progress, topology::default_flags};

/// The pause between adds of the paced series: pods arriving on a node over time, each one after the agent
/// had time to load its next spare copy.
pub const PACE: Duration = Duration::from_millis(100);
/// How long the agent gets to come up.
const READY: Duration = Duration::from_secs(30);

/// Registration times (milliseconds, in order) and the agent's memory.
#[derive(Clone, Debug, Default)]
pub struct Registration {
    /// One pod at a time, [`PACE`] apart.
    pub paced: Vec<f64>,
    /// Back to back.
    pub burst: Vec<f64>,
    /// VmRSS after every pod was registered, KiB.
    pub rss_kib: u64,
}

/// The agent under measurement; killed on drop, before its pins and cgroup go.
struct Agent {
    child: Child,
    dir: PathBuf,
}

impl Agent {
    fn start(capture: &str, pins: &BpfPins, cgroup: &Cgroup) -> Result<Agent> {
        let dir = std::env::temp_dir().join(format!("capture-bench-agent-{}", std::process::id()));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
        let log = std::fs::File::create(dir.join("agent.log")).context("agent log")?;
        let child = Command::new(capture)
            .arg("agent")
            .arg("--socket")
            .arg(dir.join("agent.sock"))
            .arg("--pin-dir")
            .arg(pins.path())
            .arg("--cgroup")
            .arg(cgroup.path())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(["--listen", "127.0.0.1:0"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("start capture agent")?;
        let agent = Agent { child, dir };
        let deadline = Instant::now() + READY;
        while !agent.pod(capture, &["list"])?.status.success() {
            if Instant::now() > deadline {
                bail!("the agent did not come up: {}", agent.log());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(agent)
    }

    fn pod(&self, capture: &str, args: &[&str]) -> Result<Output> {
        Command::new(capture)
            .arg("pod")
            .arg("--socket")
            .arg(self.dir.join("agent.sock"))
            .args(args)
            .output()
            .context("run capture pod")
    }

    fn add(&self, capture: &str, id: &str, netns: &Path) -> Result<()> {
        let netns = netns.display().to_string();
        let mut args = vec!["add", id, &netns, "--"];
        let flags = default_flags();
        args.extend(flags.iter().map(String::as_str));
        let out = self.pod(capture, &args)?;
        if !out.status.success() {
            bail!("pod add {id}: {}", String::from_utf8_lossy(&out.stderr).trim());
        }
        Ok(())
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("agent.log")).unwrap_or_default()
    }

    /// The registration times the agent logged, in order, in milliseconds.
    fn registrations(&self) -> Vec<f64> {
        self.log()
            .lines()
            .filter(|l| l.contains("registered"))
            .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("micros=")))
            .filter_map(|m| m.parse::<f64>().ok())
            .map(|micros| micros / 1000.0)
            .collect()
    }

    fn rss_kib(&self) -> Result<u64> {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.child.id()))?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .context("VmRSS in the agent's /proc status")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Registers `pods` pods paced, then `pods` in a burst.
pub fn measure(capture: &str, pods: usize, progress: &mut Progress) -> Result<Registration> {
    let cgroup = Cgroup::new("bench-agent");
    let pins = BpfPins::new("bench-agent");
    let namespaces: Vec<Netns> = (0..2 * pods).map(|_| Netns::new("bench-pod")).collect();
    let agent = Agent::start(capture, &pins, &cgroup)?;
    let (paced, burst) = namespaces.split_at(pods);
    for (i, ns) in paced.iter().enumerate() {
        agent.add(capture, &format!("bench/paced-{i}"), &ns.path())?;
        std::thread::sleep(PACE);
    }
    for (i, ns) in burst.iter().enumerate() {
        agent.add(capture, &format!("bench/burst-{i}"), &ns.path())?;
    }
    let times = agent.registrations();
    if times.len() != 2 * pods {
        bail!(
            "the agent logged {} registrations for {} pods: {}",
            times.len(),
            2 * pods,
            agent.log()
        );
    }
    let rss_kib = agent.rss_kib()?;
    progress.step(
        pods as f64 * (PACE.as_secs_f64() + 2.0 * crate::NAMESPACE_SECONDS),
        &format!("agent: {} pods registered", 2 * pods),
    );
    Ok(Registration {
        paced: times[..pods].to_vec(),
        burst: times[pods..].to_vec(),
        rss_kib,
    })
}
