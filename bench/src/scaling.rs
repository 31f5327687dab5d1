//! Scaling: the short-connection rate as capture's configuration grows. iptables walks its rules for every
//! new connection, so its cost grows with excluded CIDRs; the eBPF backend looks up maps (an LPM trie for
//! CIDRs, a hash by namespace cookie), which should not.
//!
//! - Excluded CIDRs (`-x`): 1, 16, 256, 4096 generated CIDRs that never match the remote server, for
//!   iptables and every eBPF mode.
//! - Registered namespaces: 1 (the pod), 100, 1000: throwaway namespaces registered with the same capture
//!   (same cgroup, same pins), eBPF modes only: iptables rules are per namespace, so another namespace's
//!   rules never touch this pod's connections.
//!
//! The floor runs in every round too, unchanged by either axis: on a shared machine the rate drifts with
//! the load, and a mode's rate divided by the floor's in the same round takes that drift out.

use std::{
    net::Ipv4Addr,
    time::{Duration, Instant},
};

use anyhow::Result;
use testkit::Netns;

use crate::{
    Progress,
    modes::Backend,
    report::{Series, median},
    topology::{Topology, default_flags},
    workloads,
};

/// `n` disjoint CIDRs for `-x`: /27s of 198.18.0.0/15 (RFC 2544's benchmarking range), which holds 4096 of
/// them; none covers the remote server (192.0.2.2) or loopback.
pub fn excluded_cidrs(n: usize) -> String {
    assert!(n <= 4096, "198.18.0.0/15 holds 4096 /27s");
    let base = u32::from(Ipv4Addr::new(198, 18, 0, 0));
    (0..n as u32)
        .map(|i| format!("{}/27", Ipv4Addr::from(base + i * 32)))
        .collect::<Vec<_>>()
        .join(",")
}

/// The injector's default flags with `-x` set to `cidrs`.
pub fn flags_with_excluded(cidrs: String) -> Vec<String> {
    let mut flags = default_flags();
    let at = flags.iter().position(|f| f == "-x").expect("the default flags have -x") + 1;
    flags[at] = cidrs;
    flags
}

/// The points of an axis, how many short-connection runs each gets, and how long each lasts.
#[derive(Clone, Copy, Debug)]
pub struct Sweep<'a> {
    pub points: &'a [usize],
    pub repeats: usize,
    pub duration: Duration,
}

/// One point of a scaling curve for one mode.
#[derive(Clone, Debug)]
pub struct Point {
    /// CIDRs or namespaces.
    pub x: usize,
    /// Short connections/s of each round.
    pub rates: Vec<f64>,
    /// iptables: `-A` rules in the pod; eBPF: none.
    pub rules: Option<usize>,
    /// Namespaces: how long registering the namespaces added for this point took.
    pub setup: Option<Duration>,
}

impl Point {
    pub fn median(&self) -> f64 {
        median(self.rates.clone())
    }
}

/// Short-connection rate with each number of excluded CIDRs, for every mode (the floor as the reference),
/// rounds interleaved between modes at each point; the injector's flags are applied again at the end.
pub fn cidrs(topologies: &[Topology], sweep: Sweep, progress: &mut Progress) -> Result<Vec<Series<Point>>> {
    let Sweep {
        points,
        repeats,
        duration,
    } = sweep;
    // Every mode: the floor has no capture to configure, and is the reference for machine drift.
    let chosen: Vec<&Topology> = topologies.iter().collect();
    let mut series = empty_series(&chosen, points);
    // Rounds outside, points inside (1, 16, … 4096, 1, 16, …), each point applied anew: a drift of the
    // machine over the run, or state that builds up with connections (TIME_WAIT), then spreads over
    // every point instead of weighing on the last ones.
    for round in 1..=repeats {
        for (k, &n) in points.iter().enumerate() {
            let flags = flags_with_excluded(excluded_cidrs(n));
            for (t, s) in chosen.iter().zip(&mut series) {
                t.apply(&flags)?;
                if t.mode.backend == Backend::Iptables {
                    s.points[k].rules = Some(t.rule_count());
                }
            }
            progress.step(crate::APPLY_SECONDS, &format!("scaling: {n} excluded CIDRs applied"));
            let what = format!("{n} excluded CIDRs, round {round}/{repeats}");
            measure(&chosen, &mut series, k, duration, progress, &what)?;
        }
    }
    for t in &chosen {
        t.apply(&default_flags())?;
    }
    Ok(series)
}

/// Short-connection rate with each number of registered namespaces (the pod included), for the eBPF modes.
pub fn namespaces(topologies: &[Topology], sweep: Sweep, progress: &mut Progress) -> Result<Vec<Series<Point>>> {
    let Sweep {
        points,
        repeats,
        duration,
    } = sweep;
    // The eBPF modes, and the floor as the reference for machine drift.
    let chosen: Vec<&Topology> = topologies
        .iter()
        .filter(|t| matches!(t.mode.backend, Backend::Ebpf | Backend::None))
        .collect();
    let mut series = empty_series(&chosen, points);
    // Removed (`ip netns del`) when this returns, also on failure.
    let mut extra: Vec<Netns> = Vec::new();
    for (k, &n) in points.iter().enumerate() {
        let started = Instant::now();
        let before = extra.len();
        let added: Vec<Netns> = (extra.len() + 1..n).map(|_| Netns::new("bench-ns")).collect();
        for t in chosen.iter().filter(|t| t.mode.backend == Backend::Ebpf) {
            t.register(&added)?;
        }
        extra.extend(added);
        let setup = started.elapsed();
        if extra.len() > before {
            progress.step(
                (extra.len() - before) as f64 * crate::NAMESPACE_SECONDS,
                &format!(
                    "scaling: {} namespaces made and registered in {:.1} s",
                    extra.len() - before,
                    setup.as_secs_f64()
                ),
            );
        }
        for s in &mut series {
            s.points[k].setup = Some(setup);
        }
        for round in 1..=repeats {
            let what = format!("{n} registered namespaces, round {round}/{repeats}");
            measure(&chosen, &mut series, k, duration, progress, &what)?;
        }
    }
    Ok(series)
}

/// One series per topology, with a point (no rates yet) for each of `points`.
fn empty_series(chosen: &[&Topology], points: &[usize]) -> Vec<Series<Point>> {
    chosen
        .iter()
        .map(|t| Series {
            mode: t.mode.name,
            points: points
                .iter()
                .map(|&x| Point {
                    x,
                    rates: Vec::new(),
                    rules: None,
                    setup: None,
                })
                .collect(),
        })
        .collect()
}

/// One short-connection run in each topology, its rate added to point `k` of its series; `what` names the
/// point and round on the progress line.
fn measure(
    chosen: &[&Topology],
    series: &mut [Series<Point>],
    k: usize,
    duration: Duration,
    progress: &mut Progress,
    what: &str,
) -> Result<()> {
    for (t, s) in chosen.iter().zip(series) {
        let r = workloads::short(t, duration)?;
        progress.step(
            duration.as_secs_f64(),
            &format!("scaling: {what}, {:<10} {:>7.0} conn/s", t.mode.name, r.per_second()),
        );
        s.points[k].rates.push(r.per_second());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn excluded_cidrs_are_disjoint_and_miss_the_remote() {
        let all = excluded_cidrs(4096);
        let starts: Vec<u32> = all
            .split(',')
            .map(|c| {
                let (ip, len) = c.split_once('/').unwrap();
                assert_eq!(len, "27");
                u32::from(ip.parse::<Ipv4Addr>().unwrap())
            })
            .collect();
        assert_eq!(starts.len(), 4096);
        assert!(
            starts.windows(2).all(|w| w[0] + 32 == w[1]),
            "consecutive, disjoint /27s"
        );
        assert_eq!(all.rsplit(',').next(), Some("198.19.255.224/27"));
        for ip in [testkit::REMOTE_V4, Ipv4Addr::LOCALHOST] {
            let ip = u32::from(ip);
            assert!(starts.iter().all(|s| ip < *s || ip >= s + 32), "{ip} is excluded");
        }
    }
}
