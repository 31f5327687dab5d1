//! capture's test kit (package `capture-testkit`), the harness of its integration tests (`tests/`), the demo
//! and the benchmark: throwaway network namespaces joined by veth, child cgroups
//! and bpffs pin directories; client and listener processes (`capture-probe`) inside them as a chosen
//! uid/gid, the listeners reporting what they accepted; and the `capture` binary run inside a namespace.
//! Everything created here is removed on drop, also when a test fails.
//!
//! Traffic only ever goes to loopback or to addresses inside namespaces made here (TEST-NET-1 and the IPv6
//! documentation prefix), never through the host's namespace.

//!
//! One module per concern: [`time`] (the time scale), [`agent`] (a `capture agent` process), [`kube`] (a real
//! Kubernetes API server and a test kubelet), [`netns`] (namespaces, the pod topology),
//! [`cgroup`], [`pins`] (private bpffs mounts), [`probe`] (the client/listener process), [`protocol`] (its output, line by line), [`capture`] (the
//! binary under test), plus [`diff`] (both backends side by side), [`echo`], [`hold`], [`runnable`],
//! [`resolv`], [`sidecar`], [`sock_addr`] (hand-assembled cgroup programs) and [`socket_lb`] (a socket load balancer
//! built from them). Everything is re-exported here.

use std::{
    net::{IpAddr, SocketAddr},
    process::{Command, Output},
    sync::atomic::{AtomicUsize, Ordering},
};

pub mod agent;
pub mod capture;
pub mod cgroup;
pub mod diff;
pub mod echo;
pub mod hold;
pub mod kube;
pub mod netns;
pub mod pins;
pub mod probe;
pub mod protocol;
pub mod resolv;
pub mod runnable;
pub mod sidecar;
pub mod sock_addr;
pub mod socket_lb;
pub mod time;

pub use crate::{
    agent::{APP, Agent, Sandbox, accepted_by, lands, listening, wait_until},
    capture::{INJECTOR_DEFAULT_FLAGS, assert_validation, capture, capture_bin, capture_with_env},
    cgroup::{Cgroup, InCgroup},
    netns::{Netns, POD_V4, POD_V6, Pod, REMOTE_V4, REMOTE_V6},
    pins::BpfPins,
    probe::{Connect, Exchange, Listeners, connect_as, connect_with, exchange, probe_bin, run_as},
    protocol::{Accepted, Datagram},
    resolv::ResolvConf,
    socket_lb::SocketLb,
    time::{CONNECT_TIMEOUT, TIME_SCALE_ENV, connect_timeout, patient, time_scale},
};

/// Runs a command and panics with its output if it fails.
pub fn run(cmd: &mut Command) -> Output {
    let out = cmd.output().unwrap_or_else(|e| panic!("spawn {cmd:?}: {e}"));
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn unique(tag: &str) -> String {
    static NEXT: AtomicUsize = AtomicUsize::new(0);
    format!(
        "cap-{tag}-{}-{}",
        std::process::id(),
        NEXT.fetch_add(1, Ordering::Relaxed)
    )
}

/// `addr:port`.
pub fn sa(addr: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(addr.into(), port)
}
