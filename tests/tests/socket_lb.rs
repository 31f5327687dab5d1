//! Capture beside a socket load balancer (Cilium's kube-proxy replacement, Calico's eBPF dataplane), which
//! rewrites a service VIP to a backend in its own cgroup programs (here `testkit::SocketLb`, attached to a
//! parent cgroup as those attach at the root). Capture attached to a cgroup below sees the VIP first: the
//! app's connection reaches the proxy with the VIP as its original destination, and the proxy's own
//! connection to the VIP is load-balanced. Attached at the load balancer's own cgroup, after it, capture
//! would only see the backend: that is refused, with nothing applied. And the node agent under Kubernetes
//! attaches to the pods' parent cgroup (`kubepods.slice` or `kubepods`) by default, so below such a load
//! balancer at the root.

use std::{
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use testkit::{
    Accepted, BpfPins, Cgroup, Connect, INJECTOR_DEFAULT_FLAGS, Listeners, Netns, POD_V4, Pod, REMOTE_V4, ResolvConf,
    SocketLb, capture, capture_bin, connect_as, exchange, sa,
    sock_addr::{self, Hook},
};

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);
/// The service's ClusterIP (TEST-NET-2: no namespace has it; only the load balancer's rewrite reaches it).
const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const DNS_PORT: u16 = 53;

/// `capture --backend ebpf --cgroup CGROUP --pin-dir PINS` with the injector's flags and `extra`, in `ns`.
fn apply(ns: &Netns, cgroup: &Cgroup, pins: &BpfPins, extra: &[&str]) -> std::process::Output {
    let (cg, pin) = (cgroup.path().display().to_string(), pins.path().display().to_string());
    let mut args = vec!["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin];
    args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    args.extend_from_slice(extra);
    capture(ns, &args)
}

/// Asserts exit code 1 and one line of `stderr` that holds each of `texts`.
fn assert_refused(status: std::process::ExitStatus, stderr: &str, texts: &[&str]) {
    assert_eq!(status.code(), Some(1), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "not one line: {stderr}");
    for text in texts {
        assert!(stderr.contains(text), "{text:?} not in: {stderr}");
    }
}

/// Whether `accepted` is a backend's: its listener, the pod's address as the peer (the connection came over
/// the wire, not through the sidecar).
fn at_backend(accepted: &Accepted) -> bool {
    accepted.listener == BACKEND_PORT && accepted.peer.ip() == POD_V4
}

/// Whether `accepted` is the sidecar's outbound listener's, with the web VIP as the original destination
/// (IPv4 or IPv4-mapped: the app's socket may be either).
fn at_sidecar_with_vip(accepted: &Accepted) -> bool {
    let canonical = |a: SocketAddr| SocketAddr::new(a.ip().to_canonical(), a.port());
    accepted.listener == 15001 && accepted.original_dst.map(canonical) == Some(sa(VIP, VIP_PORT))
}

/// The pod and its remote (the backends' namespace), the load balancer's cgroup and the pods' cgroup below
/// it, the backends, and the sidecar's listeners. Fields drop in order: processes before their cgroups,
/// the load balancer and capture's pins before the cgroups they are attached to, the namespaces last.
struct World {
    sidecar: Listeners,
    backends: Listeners,
    _lbs: [SocketLb; 2],
    pins: BpfPins,
    pods: Cgroup,
    node: Cgroup,
    pod: Pod,
}

impl World {
    /// The load balancer at `node` for the web service (VIP:80 → remote:8080) and the DNS service (VIP:53 →
    /// remote:53); `pods` below it, where the app and the sidecar run.
    fn new(tag: &str) -> World {
        let pod = Pod::new(tag);
        let node = Cgroup::new(tag);
        let pods = node.child("kubepods");
        let pins = BpfPins::new(tag);
        let lbs = [
            SocketLb::attach(
                &node,
                SocketAddrV4::new(VIP, VIP_PORT),
                SocketAddrV4::new(REMOTE_V4, BACKEND_PORT),
            ),
            SocketLb::attach(
                &node,
                SocketAddrV4::new(VIP, DNS_PORT),
                SocketAddrV4::new(REMOTE_V4, DNS_PORT),
            ),
        ];
        let backends = Listeners::start_with_udp(
            &pod.remote,
            None,
            None,
            &[sa(REMOTE_V4, BACKEND_PORT)],
            &[sa(REMOTE_V4, DNS_PORT)],
        );
        // The outbound listener and the DNS proxy, on localhost only as istio-agent's.
        let sidecar = Listeners::start_with_udp(
            &pod.pod,
            Some(&pods),
            Some(PROXY),
            &[sa(Ipv6Addr::UNSPECIFIED, 15001)],
            &[sa(Ipv4Addr::LOCALHOST, 15053)],
        );
        World {
            sidecar,
            backends,
            _lbs: lbs,
            pins,
            pods,
            node,
            pod,
        }
    }

    /// [`apply`] in the pod, with DNS capture of `resolv`'s servers.
    fn capture(&self, cgroup: &Cgroup, resolv: &ResolvConf) -> std::process::Output {
        let conf = resolv.path().display().to_string();
        apply(
            &self.pod.pod,
            cgroup,
            &self.pins,
            &["--redirect-dns", "--resolv-conf", &conf],
        )
    }

    /// Applies capture to the pods' cgroup, and asserts that the app's connection to the VIP then reaches
    /// the sidecar, which reads the VIP as the original destination (the load balancer ran after capture and
    /// saw the redirect, not the VIP).
    fn capture_below_the_load_balancer(&self, resolv: &ResolvConf) {
        let out = self.capture(&self.pods, resolv);
        assert!(
            out.status.success(),
            "capture: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        let accepted = self.tcp_to_vip(APP);
        assert!(at_sidecar_with_vip(&accepted), "{accepted:?}");
    }

    /// A TCP connection from the pods' cgroup as `ids` to the web VIP: what accepted it, the sidecar or a
    /// backend (and that the other saw nothing).
    fn tcp_to_vip(&self, ids: (u32, u32)) -> Accepted {
        self.tcp_to_vip_from(&self.pods, ids, sa(VIP, VIP_PORT))
    }

    /// As [`World::tcp_to_vip`], from an IPv6 socket to the IPv4-mapped VIP (connect6).
    fn tcp_to_mapped_vip(&self, ids: (u32, u32)) -> Accepted {
        self.tcp_to_vip_from(&self.pods, ids, sa(VIP.to_ipv6_mapped(), VIP_PORT))
    }

    /// As [`World::tcp_to_vip`], from `cgroup`, to `vip`.
    fn tcp_to_vip_from(&self, cgroup: &Cgroup, ids: (u32, u32), vip: SocketAddr) -> Accepted {
        connect_as(&self.pod.pod, Some(cgroup), ids, vip).unwrap_or_else(|e| panic!("connect to {vip}: {e}"));
        let (sidecar, backend) = (self.sidecar.next(), self.backends.next());
        match (sidecar, backend) {
            (Some(a), None) | (None, Some(a)) => a,
            (s, b) => panic!("{vip}: accepted by the sidecar {s:?} and by a backend {b:?}"),
        }
    }

    /// An unconnected UDP query from the pods' cgroup as `ids` to the DNS VIP: (the port of the socket that
    /// got it, sidecar's or backend's; where the answer appeared to come from).
    fn dns_to_vip(&self, ids: (u32, u32)) -> (u16, Option<SocketAddr>) {
        let vip = sa(VIP, DNS_PORT);
        let how = Connect {
            udp: true,
            sendto: true,
            ..Connect::default()
        };
        let answer =
            exchange(&self.pod.pod, Some(&self.pods), ids, vip, how).unwrap_or_else(|e| panic!("query {vip}: {e}"));
        let (sidecar, backend) = (self.sidecar.next_datagram(), self.backends.next_datagram());
        let got = match (sidecar, backend) {
            (Some(d), None) | (None, Some(d)) => d,
            (s, b) => panic!("{vip}: received by the sidecar {s:?} and by a backend {b:?}"),
        };
        (got.listener, answer.reply_from)
    }
}

#[test]
fn below_the_load_balancer_the_app_is_captured_with_the_vip_and_the_proxy_is_load_balanced() {
    let world = World::new("vip");
    let resolv = ResolvConf::new("vip", &[&VIP.to_string()]);
    let dns_vip = sa(VIP, DNS_PORT);
    // The load balancer works on its own: the app's connection and query go to the backends, the answer
    // from the VIP.
    let accepted = world.tcp_to_vip(APP);
    assert!(at_backend(&accepted), "{accepted:?}");
    let accepted = world.tcp_to_mapped_vip(APP);
    assert!(at_backend(&accepted), "IPv4-mapped, before capture: {accepted:?}");
    assert_eq!(world.dns_to_vip(APP), (DNS_PORT, Some(dns_vip)));

    world.capture_below_the_load_balancer(&resolv);
    // The same from an IPv6 socket to the IPv4-mapped VIP: connect6 on both sides.
    let accepted = world.tcp_to_mapped_vip(APP);
    assert!(at_sidecar_with_vip(&accepted), "IPv4-mapped: {accepted:?}");
    // The proxy's own connection to the VIP is not captured, and the load balancer takes it to a backend.
    let accepted = world.tcp_to_vip(PROXY);
    assert!(at_backend(&accepted), "{accepted:?}");
    let accepted = world.tcp_to_mapped_vip(PROXY);
    assert!(at_backend(&accepted), "IPv4-mapped: {accepted:?}");
    // DNS to the VIP'd resolver: the app's query goes to the DNS proxy and the answer appears from the
    // VIP; the DNS proxy's own query is load-balanced to the resolver, its answer from the VIP too.
    assert_eq!(world.dns_to_vip(APP), (15053, Some(dns_vip)));
    assert_eq!(world.dns_to_vip(PROXY), (DNS_PORT, Some(dns_vip)));
}

#[test]
fn capture_after_the_load_balancer_at_its_own_cgroup_is_refused_and_applies_nothing() {
    let world = World::new("vip-same");
    let resolv = ResolvConf::new("vip-same", &[&VIP.to_string()]);
    // The opposite order: the load balancer is already on `node`, and capture is asked to attach there too,
    // after it. It would see only the backend's address: refused.
    let node = world.node.path().display().to_string();
    let out = world.capture(&world.node, &resolv);
    assert_refused(
        out.status,
        &String::from_utf8_lossy(&out.stderr),
        &[&node, "test_lb_conn4", "connect4", "--cgroup", "nothing was applied"],
    );
    // Nothing was applied: no pins, and the app's connection still goes straight to the load balancer's
    // backend, from the pods' cgroup and from the load balancer's own.
    assert!(
        !world.pins.path().exists(),
        "{} was left behind",
        world.pins.path().display()
    );
    for cgroup in [&world.pods, &world.node] {
        let accepted = world.tcp_to_vip_from(cgroup, APP, sa(VIP, VIP_PORT));
        assert!(at_backend(&accepted), "from {}: {accepted:?}", cgroup.path().display());
    }
    // Attached below instead, as the error says, capture takes the app's connection with the VIP.
    world.capture_below_the_load_balancer(&resolv);
}

#[test]
fn an_ancestor_program_capture_would_replace_or_that_bars_it_is_refused() {
    // Programs attached to an ancestor the old way (BPF_PROG_ATTACH, as Cilium before 1.14): exclusive (no
    // flag) makes the kernel refuse any program below; BPF_F_ALLOW_OVERRIDE makes one below replace it.
    // Either way capture at the child is refused before it attaches anything.
    let ns = Netns::new("vip-anc");
    let node = Cgroup::new("vip-anc");
    let pods = node.child("kubepods");
    for (flags, says) in [
        (0, "exclusively"),
        (sock_addr::BPF_F_ALLOW_OVERRIDE, "BPF_F_ALLOW_OVERRIDE"),
    ] {
        let pins = BpfPins::new("vip-anc");
        let _lb = sock_addr::attach_legacy(
            &sock_addr::PROCEED,
            "test_lb_legacy",
            Hook::Connect4,
            node.path(),
            flags,
        )
        .unwrap_or_else(|e| panic!("{e:#}"));
        let out = apply(&ns, &pods, &pins, &[]);
        let node = node.path().display().to_string();
        assert_refused(
            out.status,
            &String::from_utf8_lossy(&out.stderr),
            &[&node, "test_lb_legacy", "connect4", says, "nothing was applied"],
        );
        assert!(!pins.path().exists(), "{says}: pins were made");
    }
}

/// A `capture agent --kubernetes` in its own namespace, with the cgroup v2 root given as `root`, private
/// pins, records and socket, and an API server on a closed loopback port (its pod watch retries; the
/// control socket serves meanwhile). Killed on drop, its files removed.
struct Agent {
    child: std::process::Child,
    dir: std::path::PathBuf,
    socket: String,
    _ns: Netns,
}

impl Agent {
    fn start(tag: &str, root: &Cgroup, pins: &BpfPins) -> Agent {
        let ns = Netns::new(tag);
        let dir = std::env::temp_dir().join(format!("capture-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let kubeconfig = dir.join("kubeconfig");
        std::fs::write(
            &kubeconfig,
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: \"http://127.0.0.1:9\"}}]\n\
             users: [{name: u, user: {}}]\ncontexts: [{name: x, context: {cluster: c, user: u}}]\n\
             current-context: x\n",
        )
        .unwrap();
        let socket = dir.join("agent.sock").display().to_string();
        let child = ns
            .command(capture_bin())
            .args(["agent", "--kubernetes", "--listen", "127.0.0.1:0", "--socket", &socket])
            .arg("--cgroup-root")
            .arg(root.path())
            .arg("--pin-dir")
            .arg(pins.path())
            .arg("--state-dir")
            .arg(dir.join("state"))
            .env_clear()
            .env("NODE_NAME", "node")
            .env("KUBECONFIG", &kubeconfig)
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start capture agent");
        Agent {
            child,
            dir,
            socket,
            _ns: ns,
        }
    }

    /// `capture pod ARGS` against this agent.
    fn pod(&self, args: &[&str]) -> std::process::Output {
        Command::new(capture_bin())
            .args(["pod", "--socket", &self.socket])
            .args(args)
            .output()
            .expect("run capture pod")
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[test]
fn the_kubernetes_agent_attaches_to_the_pods_cgroup_by_default() {
    // A test cgroup stands for the host's cgroup v2 root, with the systemd driver's kubepods.slice and a
    // system.slice beside it.
    let pod = Pod::new("vip-agent");
    let root = Cgroup::new("vip-agent");
    let pods = root.child("kubepods.slice/kubepods-besteffort.slice");
    let system = root.child("system.slice");
    let pins = BpfPins::new("vip-agent");
    let agent = Agent::start("vip-agent", &root, &pins);
    let deadline = Instant::now() + testkit::patient(Duration::from_secs(10));
    while !agent.pod(&["list"]).status.success() {
        assert!(Instant::now() < deadline, "the agent did not answer");
        std::thread::sleep(Duration::from_millis(20));
    }
    let netns = pod.pod.path().display().to_string();
    let mut args = vec!["add", "web", &netns, "--"];
    args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let out = agent.pod(&args);
    assert!(
        out.status.success(),
        "pod add: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sidecar = Listeners::start(&pod.pod, Some(&pods), Some(PROXY), &[sa(Ipv6Addr::UNSPECIFIED, 15001)]);
    let remote = Listeners::start(&pod.remote, None, None, &[sa(REMOTE_V4, 80)]);
    // The pod's app in kubepods.slice is captured; the same namespace's process in system.slice is not:
    // the programs are attached to kubepods.slice, not to the root.
    for (cgroup, port) in [(&pods, 15001), (&system, 80)] {
        connect_as(&pod.pod, Some(cgroup), APP, sa(REMOTE_V4, 80)).unwrap();
        let accepted = sidecar.next().or_else(|| remote.next());
        assert_eq!(
            accepted.map(|a| a.listener),
            Some(port),
            "from {}",
            cgroup.path().display()
        );
    }
}

#[test]
fn the_kubernetes_agent_without_a_pods_cgroup_refuses_in_one_line() {
    let root = Cgroup::new("vip-nopods");
    let pins = BpfPins::new("vip-nopods");
    let mut agent = Agent::start("vip-nopods", &root, &pins);
    let status = agent.child.wait().expect("wait for capture agent");
    let mut stderr = String::new();
    std::io::Read::read_to_string(&mut agent.child.stderr.take().unwrap(), &mut stderr).unwrap();
    let path = root.path().display().to_string();
    assert_refused(
        status,
        &stderr,
        &["--cgroup-root", &path, "kubepods.slice", "kubepods", "--cgroup"],
    );
    assert!(!pins.path().exists(), "pins were made");
    assert!(!agent.dir.join("state").exists(), "records were made");
}

#[test]
fn an_apply_that_asks_for_another_cgroup_keeps_the_attachment_and_says_so() {
    // Pins made with capture attached to one cgroup (as a release that attached at the root left them), then
    // an apply asking for another (the agent's new kubepods default): the links stay where they are (moving
    // them would run capture twice for a moment), the apply succeeds, capture keeps working there, and one
    // warning names both places.
    let pod = Pod::new("moved");
    let parent = Cgroup::new("moved");
    let pods = parent.child("pods");
    let pins = BpfPins::new("moved");
    let first = apply(&pod.pod, &pods, &pins, &[]);
    assert!(first.status.success(), "{}", String::from_utf8_lossy(&first.stderr));
    assert!(first.stderr.is_empty(), "{}", String::from_utf8_lossy(&first.stderr));
    let again = apply(&pod.pod, &pods, &pins, &[]);
    assert!(
        again.stderr.is_empty(),
        "the same cgroup: {}",
        String::from_utf8_lossy(&again.stderr)
    );
    let other = apply(&pod.pod, &parent, &pins, &[]);
    let stderr = String::from_utf8_lossy(&other.stderr);
    assert!(other.status.success(), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    assert!(
        stderr.contains("warning: the programs stay attached") && stderr.contains(&parent.path().display().to_string()),
        "{stderr}"
    );
    // Still captured from the cgroup the links are on.
    let sidecar = Listeners::start(&pod.pod, Some(&pods), Some(PROXY), &[sa(Ipv6Addr::UNSPECIFIED, 15001)]);
    connect_as(&pod.pod, Some(&pods), APP, sa(REMOTE_V4, 8080)).expect("connect");
    let got = sidecar.next().expect("the sidecar got the connection");
    assert_eq!(got.original_dst, Some(sa(REMOTE_V4, 8080)));
}
