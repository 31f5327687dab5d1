//! Capture beside a socket load balancer (Cilium's kube-proxy replacement, Calico's eBPF dataplane), which
//! rewrites a service VIP to a backend in its own cgroup programs (here `testkit::SocketLb`, attached to a
//! parent cgroup as those attach at the root). Capture attached to a cgroup below sees the VIP first: the
//! app's connection reaches the proxy with the VIP as its original destination, and the proxy's own
//! connection to the VIP is load-balanced. Attached at the load balancer's own cgroup, after it, capture
//! would only see the backend: that is refused, with nothing applied.

use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr, SocketAddrV4};

use testkit::{
    Accepted, BpfPins, Cgroup, Connect, INJECTOR_DEFAULT_FLAGS, Listeners, POD_V4, Pod, REMOTE_V4, ResolvConf,
    SocketLb, capture, connect_as, exchange, sa,
};

const APP: (u32, u32) = (1000, 1000);
const PROXY: (u32, u32) = (1337, 1337);
/// The service's ClusterIP (TEST-NET-2: no namespace has it; only the load balancer's rewrite reaches it).
const VIP: Ipv4Addr = Ipv4Addr::new(198, 51, 100, 10);
const VIP_PORT: u16 = 80;
const BACKEND_PORT: u16 = 8080;
const DNS_PORT: u16 = 53;

/// Whether `accepted` is a backend's: its listener, the pod's address as the peer (the connection came over
/// the wire, not through the sidecar).
fn at_backend(accepted: &Accepted) -> bool {
    accepted.listener == BACKEND_PORT && accepted.peer.ip() == POD_V4
}

/// Whether `accepted` is the sidecar's outbound listener's, with the web VIP as the original destination.
fn at_sidecar_with_vip(accepted: &Accepted) -> bool {
    accepted.listener == 15001 && accepted.original_dst == Some(sa(VIP, VIP_PORT))
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

    /// `capture --backend ebpf --cgroup CGROUP --pin-dir …` with the injector's flags and DNS capture of
    /// `resolv`'s servers, in the pod.
    fn capture(&self, cgroup: &Cgroup, resolv: &ResolvConf) -> std::process::Output {
        let (cg, pin, conf) = (
            cgroup.path().display().to_string(),
            self.pins.path().display().to_string(),
            resolv.path().display().to_string(),
        );
        let mut args = vec!["--backend", "ebpf", "--cgroup", &cg, "--pin-dir", &pin];
        args.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
        args.extend(["--redirect-dns", "--resolv-conf", &conf]);
        capture(&self.pod.pod, &args)
    }

    /// A TCP connection from the pods' cgroup as `ids` to the web VIP: what accepted it, the sidecar or a
    /// backend (and that the other saw nothing).
    fn tcp_to_vip(&self, ids: (u32, u32)) -> Accepted {
        self.tcp_to_vip_from(&self.pods, ids)
    }

    /// As [`World::tcp_to_vip`], from `cgroup`.
    fn tcp_to_vip_from(&self, cgroup: &Cgroup, ids: (u32, u32)) -> Accepted {
        let vip = sa(VIP, VIP_PORT);
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
    assert_eq!(world.dns_to_vip(APP), (DNS_PORT, Some(dns_vip)));

    let out = world.capture(&world.pods, &resolv);
    assert!(
        out.status.success(),
        "capture: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The app's connection reaches the sidecar, which reads the VIP as the original destination (the
    // load balancer ran after capture and saw the redirect, not the VIP).
    let accepted = world.tcp_to_vip(APP);
    assert!(at_sidecar_with_vip(&accepted), "{accepted:?}");
    // The proxy's own connection to the VIP is not captured, and the load balancer takes it to a backend.
    let accepted = world.tcp_to_vip(PROXY);
    assert!(at_backend(&accepted), "{accepted:?}");
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
    let out = world.capture(&world.node, &resolv);
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(1),
        "capture at the load balancer's cgroup: {stderr}"
    );
    assert_eq!(stderr.lines().count(), 1, "one line: {stderr}");
    let node = world.node.path().display().to_string();
    for text in [
        node.as_str(),
        "test_lb_conn4",
        "connect4",
        "--cgroup",
        "nothing was applied",
    ] {
        assert!(stderr.contains(text), "{text:?} not in: {stderr}");
    }
    // Nothing was applied: no pins, and the app's connection still goes straight to the load balancer's
    // backend, from the pods' cgroup and from the load balancer's own.
    assert!(
        !world.pins.path().exists(),
        "{} was left behind",
        world.pins.path().display()
    );
    for cgroup in [&world.pods, &world.node] {
        let accepted = world.tcp_to_vip_from(cgroup, APP);
        assert!(at_backend(&accepted), "from {}: {accepted:?}", cgroup.path().display());
    }
    // Attached below instead, as the error says, capture takes the app's connection with the VIP.
    let out = world.capture(&world.pods, &resolv);
    assert!(
        out.status.success(),
        "capture: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let accepted = world.tcp_to_vip(APP);
    assert!(at_sidecar_with_vip(&accepted), "{accepted:?}");
}
