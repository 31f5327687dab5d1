//! Pod registration through the node agent: how long `capture agent` takes to register a pod, as its own
//! `registered … micros=` log line says (flags checked, the pod's namespace entered, map entries written,
//! the pod's sk_lookup copy attached, the record saved); pods added one at a time as a node's pods arrive,
//! then in a burst of back-to-back adds; and the agent's resident memory after. The agent runs in a cgroup
//! and a bpffs mount of its own; its pods are throwaway namespaces.

use std::{path::Path, time::Duration};

use anyhow::{Context as _, Result, bail};
use testkit::{Agent, BpfPins, Cgroup, Netns};

use crate::{Progress, topology::default_flags};

/// The pause between adds of the paced series: pods arriving on a node over time, each one after the agent
/// had time to load its next spare copy.
pub const PACE: Duration = Duration::from_millis(100);

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

/// Adds pod `id` (namespace `netns`) with the injector's flags.
fn add(agent: &Agent, id: &str, netns: &Path) -> Result<()> {
    let flags = default_flags();
    let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
    let out = agent.add(id, netns, &flags);
    if !out.status.success() {
        bail!("pod add {id}: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(())
}

/// The registration times the agent logged, in order, in milliseconds.
fn registrations(agent: &Agent) -> Vec<f64> {
    agent
        .log()
        .lines()
        .filter(|l| l.contains("registered"))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("micros=")))
        .filter_map(|m| m.parse::<f64>().ok())
        .map(|micros| micros / 1000.0)
        .collect()
}

/// The agent's resident memory, KiB.
fn rss_kib(agent: &Agent) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{}/status", agent.pid()))?;
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .context("VmRSS in the agent's /proc status")
}

/// Registers `pods` pods paced, then `pods` in a burst.
pub fn measure(pods: usize, progress: &mut Progress) -> Result<Registration> {
    let cgroup = Cgroup::new("bench-agent");
    let pins = BpfPins::new("bench-agent");
    let namespaces: Vec<Netns> = (0..2 * pods).map(|_| Netns::new("bench-pod")).collect();
    let agent = Agent::start("bench", &pins, &cgroup);
    let (paced, burst) = namespaces.split_at(pods);
    for (i, ns) in paced.iter().enumerate() {
        add(&agent, &format!("bench/paced-{i}"), &ns.path())?;
        std::thread::sleep(PACE);
    }
    for (i, ns) in burst.iter().enumerate() {
        add(&agent, &format!("bench/burst-{i}"), &ns.path())?;
    }
    let times = registrations(&agent);
    if times.len() != 2 * pods {
        bail!(
            "the agent logged {} registrations for {} pods: {}",
            times.len(),
            2 * pods,
            agent.log()
        );
    }
    let rss_kib = rss_kib(&agent)?;
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
