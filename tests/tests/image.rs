//! The container image (`deploy/Dockerfile`, built by `cargo xtask test` as `cargo xtask image` builds it):
//! `capture agent` run from it with podman the way the DaemonSet (`deploy/kubernetes/capture.yaml`) runs
//! it — the host's PID namespace, only the manifest's five capabilities (not privileged), a read-only root,
//! seccomp and AppArmor unconfined, and bpffs, the cgroup v2 root (read-only) and the state directory
//! mounted where the manifest mounts them — captures a test pod registered over its control socket, and
//! capture stays when the container stops. The podman options and the agent's arguments are read from the
//! manifest, so the test follows it; a field it cannot translate fails it. And the same agent with
//! `--kubernetes` and the in-cluster configuration, against a real API server (testkit's), captures a pod.
//!
//! Safety: where the DaemonSet mounts the host's /sys/fs/bpf, the container gets the test's private bpffs,
//! and `--cgroup` (the manifest's own way to choose the attach point) names the test's child cgroup. So the
//! agent pins only in the test's bpffs and attaches only to the test's cgroup; the host's cgroup root and
//! its processes are never captured.

use std::{
    path::{Path, PathBuf},
    process::{Command, Output, Stdio},
    time::Duration,
};

use serde_json::Value;
use testkit::{
    BpfPins, Cgroup, INJECTOR_DEFAULT_FLAGS, Pod, Sandbox, capture_bin,
    kube::{CgroupDriver, Cluster, Kubelet, NS, manifest_objects},
    lands, listening, wait_until,
};

/// Where the DaemonSet mounts the host's cgroup v2 root.
const HOST_CGROUP: &str = "/host/sys/fs/cgroup";
/// How long the agent may take to start in its container and answer on its socket.
const READY_TIMEOUT: Duration = Duration::from_secs(30);

/// The image `cargo xtask test` built, in the podman storage its environment names.
fn image() -> String {
    std::env::var("CAPTURE_IMAGE")
        .expect("CAPTURE_IMAGE is not set: run `cargo xtask test image`, which builds the image")
}

/// A podman command on the project's storage (`cargo xtask test` sets these; `CONTAINERS_CONF`, podman's
/// configuration for this machine, comes with them).
fn podman() -> Command {
    let var =
        |name: &str| std::env::var(name).unwrap_or_else(|_| panic!("{name} is not set: run `cargo xtask test image`"));
    let mut cmd = Command::new("podman");
    cmd.args([
        "--root",
        &var("CAPTURE_PODMAN_ROOT"),
        "--runroot",
        &var("CAPTURE_PODMAN_RUNROOT"),
    ]);
    cmd
}

/// `podman ARGS`, which must succeed; its standard output.
fn podman_ok(args: &[&str]) -> String {
    let out = podman().args(args).output().expect("run podman");
    assert!(
        out.status.success(),
        "podman {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
    String::from_utf8_lossy(&out.stdout).trim().to_owned()
}

/// The agent's container, its state directory on the host and its cgroups: on drop the container is
/// removed (killed if it still runs), then the cgroup directories podman made for it and the state.
struct Container {
    name: String,
    /// `--cgroup-parent`: without systemd, podman makes this directory in every cgroup hierarchy (v1 and
    /// v2 on a hybrid host) and leaves it when the container goes; a name of the test's own, so it can be
    /// removed, instead of podman's shared `libpod_parent`.
    cgroup_parent: String,
    /// Mounted at /run/capture, as the DaemonSet's `state` volume: the control socket and the records.
    state: PathBuf,
}

impl Container {
    fn new(tag: &str) -> Container {
        let name = format!("capture-{tag}-{}", std::process::id());
        let state = std::env::temp_dir().join(&name);
        std::fs::create_dir_all(&state).expect("create the state directory");
        Container {
            cgroup_parent: name.clone(),
            name,
            state,
        }
    }

    /// Starts `capture agent` from the image as the DaemonSet's pod spec (`deploy/kubernetes/capture.yaml`)
    /// says, read from the manifest, attaching to `cgroup` and pinning in `pins` (mounted at the container's
    /// /sys/fs/bpf); with `kubernetes`, watching that cluster's pods as the manifest's service account with
    /// the in-cluster configuration, as in a cluster, else without `--kubernetes`.
    fn start_agent(&self, pins: &BpfPins, cgroup: &Cgroup, kubernetes: Option<&InCluster>) {
        let root = capture::cgroup::cgroup2_root().expect("cgroup v2 root");
        let bpffs = pins.path().parent().expect("the pin dir is in the bpffs");
        // The host paths of the DaemonSet's volumes, here: the test's own.
        let source = |volume: &str| match volume {
            "bpffs" => bpffs.to_owned(),
            "cgroup" => root.clone(),
            "state" => self.state.clone(),
            other => panic!("the DaemonSet has a volume {other:?} this test does not know"),
        };
        let mut args = vec!["--detach".to_owned()];
        args.extend(daemonset_options(source, kubernetes));
        let attach = Path::new(HOST_CGROUP).join(cgroup.path().strip_prefix(&root).expect("a cgroup under the root"));
        args.push(image());
        args.extend(agent_args(&attach, kubernetes.is_some()));
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let out = self.run(&args);
        assert!(
            out.status.success(),
            "podman run: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );

        // Ready when it answers on its socket (at the default path, in the state volume).
        wait_until(
            "the agent answers on its control socket",
            READY_TIMEOUT,
            || {
                assert!(self.running(), "the agent's container exited: {}", self.logs());
                self.pod(&["list"]).status.success()
            },
            || self.logs(),
        );
    }

    /// `podman run` of this container with `args`: options, the image, its arguments.
    fn run(&self, args: &[&str]) -> Output {
        podman()
            .args(["run", "--name", &self.name, "--cgroup-parent", &self.cgroup_parent])
            .args(args)
            .output()
            .expect("run podman run")
    }

    /// `capture pod ARGS` against the agent's control socket, from the host.
    fn pod(&self, args: &[&str]) -> Output {
        Command::new(capture_bin())
            .arg("pod")
            .arg("--socket")
            .arg(self.state.join("agent.sock"))
            .args(args)
            .output()
            .expect("run capture pod")
    }

    fn running(&self) -> bool {
        podman_ok(&["inspect", "--format", "{{.State.Running}}", &self.name]) == "true"
    }

    fn logs(&self) -> String {
        let out = podman().args(["logs", &self.name]).output().expect("run podman logs");
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    }
}

/// The DaemonSet's pod spec and its one container, from the manifest.
fn daemonset() -> (Value, Value) {
    let daemonset = manifest_objects()
        .into_iter()
        .find(|o| o["kind"] == "DaemonSet")
        .expect("a DaemonSet in deploy/kubernetes/capture.yaml");
    let spec = daemonset["spec"]["template"]["spec"].clone();
    let container = spec["containers"][0].clone();
    (spec, container)
}

/// What the agent's container gets in a cluster to reach the API server: the service account's token, CA
/// and namespace (mounted where Kubernetes mounts them), the service's address, and the node's name.
struct InCluster {
    service_account: PathBuf,
    address: (&'static str, u16),
    node: String,
}

/// Where Kubernetes mounts a pod's service account token, CA and namespace.
const SERVICE_ACCOUNT_MOUNT: &str = "/var/run/secrets/kubernetes.io/serviceaccount";

/// `podman run` options doing what the DaemonSet's pod spec says, with each volume's host path from
/// `source`, and what a cluster gives the pod when `kubernetes`; a field this does not translate fails the
/// test rather than being left out.
fn daemonset_options(source: impl Fn(&str) -> PathBuf, kubernetes: Option<&InCluster>) -> Vec<String> {
    let (spec, container) = daemonset();
    let security = &container["securityContext"];
    let mut options = vec![
        // Kubernetes mounts no tmpfs on /run or /tmp of a read-only root; podman would.
        "--read-only-tmpfs=false".to_owned(),
    ];
    match kubernetes {
        // The pod's network is the CNI's. Without Kubernetes the test needs none: it talks to the agent over
        // the control socket in the state volume. (Podman's own bridge would add rules to the host's
        // namespace.)
        None => options.push("--network=none".into()),
        Some(cluster) => {
            // The test's API server listens on the host's loopback, as the service's address would be
            // reachable from the pod's network.
            options.push("--network=host".into());
            let env = container["env"].as_array().expect("env");
            assert!(
                env.iter()
                    .any(|e| e["name"] == "NODE_NAME" && e["valueFrom"]["fieldRef"]["fieldPath"] == "spec.nodeName"),
                "NODE_NAME from spec.nodeName: {env:?}"
            );
            options.push(format!("--env=NODE_NAME={}", cluster.node));
            options.push(format!("--env=KUBERNETES_SERVICE_HOST={}", cluster.address.0));
            options.push(format!("--env=KUBERNETES_SERVICE_PORT={}", cluster.address.1));
            assert!(
                spec["serviceAccountName"].is_string() && spec["automountServiceAccountToken"] != false,
                "the DaemonSet's service account token is mounted"
            );
            options.push(format!(
                "--mount=type=bind,src={},dst={SERVICE_ACCOUNT_MOUNT},ro=true",
                cluster.service_account.display()
            ));
        }
    }
    assert_eq!(spec["hostPID"], true, "hostPID");
    options.push("--pid=host".into());
    assert_eq!(security["privileged"], false, "privileged");
    assert_eq!(security["readOnlyRootFilesystem"], true, "readOnlyRootFilesystem");
    options.push("--read-only".into());
    options.push(format!("--user={}", security["runAsUser"].as_u64().expect("runAsUser")));
    assert_eq!(
        security["capabilities"]["drop"],
        serde_json::json!(["ALL"]),
        "capabilities.drop"
    );
    options.push("--cap-drop=all".into());
    for cap in security["capabilities"]["add"].as_array().expect("capabilities.add") {
        options.push(format!("--cap-add={}", cap.as_str().expect("a capability")));
    }
    assert_eq!(security["seccompProfile"]["type"], "Unconfined", "seccompProfile");
    options.push("--security-opt=seccomp=unconfined".into());
    assert_eq!(security["appArmorProfile"]["type"], "Unconfined", "appArmorProfile");
    options.push("--security-opt=apparmor=unconfined".into());
    for mount in container["volumeMounts"].as_array().expect("volumeMounts") {
        let name = mount["name"].as_str().expect("a volume name");
        let mut option = format!(
            "type=bind,src={},dst={}",
            source(name).display(),
            mount["mountPath"].as_str().expect("mountPath")
        );
        if mount["readOnly"] == true {
            option.push_str(",ro=true");
        }
        match mount["mountPropagation"].as_str() {
            None => {}
            Some("HostToContainer") => option.push_str(",bind-propagation=rslave"),
            Some(other) => panic!("mountPropagation {other} of {name}"),
        }
        options.push(format!("--mount={option}"));
    }
    options
}

/// The DaemonSet's container arguments, with `--cgroup` (the manifest's own way to choose the attach
/// point) naming `attach`; without `--kubernetes` unless `kubernetes` (then pods come over the control
/// socket). In the host's network (with `kubernetes`) the endpoints listen on a free loopback port
/// rather than the manifest's 0.0.0.0:15081, on every interface of the host.
fn agent_args(attach: &Path, kubernetes: bool) -> Vec<String> {
    let (_, container) = daemonset();
    let mut args: Vec<String> = container["args"]
        .as_array()
        .expect("args")
        .iter()
        .map(|a| a.as_str().expect("an argument").to_owned())
        .filter(|a| kubernetes || a != "--kubernetes")
        .map(|a| match a.strip_prefix("--listen=") {
            Some(_) if kubernetes => "--listen=127.0.0.1:0".to_owned(),
            _ => a,
        })
        .collect();
    assert!(
        args.contains(&"--kubernetes".to_owned()) == kubernetes,
        "the DaemonSet runs the agent with --kubernetes: {args:?}"
    );
    assert!(
        args.contains(&format!("--cgroup-root={HOST_CGROUP}")),
        "the DaemonSet's cgroup root is no longer {HOST_CGROUP}: {args:?}"
    );
    args.push(format!("--cgroup={}", attach.display()));
    args
}

impl Drop for Container {
    fn drop(&mut self) {
        let _ = podman()
            .args(["rm", "--force", "--time=0", &self.name])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let mounts = std::fs::read_to_string("/proc/mounts").unwrap_or_default();
        for line in mounts.lines() {
            let mut fields = line.split_whitespace().skip(1);
            if let (Some(mount), Some("cgroup" | "cgroup2")) = (fields.next(), fields.next()) {
                testkit::cgroup::remove_tree(&Path::new(mount).join(&self.cgroup_parent));
            }
        }
        let _ = std::fs::remove_dir_all(&self.state);
    }
}

#[test]
fn the_agent_run_from_the_image_as_the_daemonset_runs_it_captures_a_pod() {
    let pod = Pod::new("image");
    let cgroup = Cgroup::new("image");
    let pins = BpfPins::new("image");
    // The agent opens the pod's namespace as `/proc/PID/ns/net` of its sandbox (the container has the
    // host's PIDs).
    let sandbox = Sandbox::start_in(&pod.pod, &cgroup);
    let (sidecar, remote) = listening(&pod, &cgroup);

    let container = Container::new("image");
    container.start_agent(&pins, &cgroup, None);
    assert_eq!(
        lands(&pod, &cgroup, &sidecar, &remote),
        "remote",
        "before the pod is added"
    );

    let netns = sandbox.netns().display().to_string();
    let mut add = vec!["add", "default/app", netns.as_str(), "--"];
    add.extend_from_slice(INJECTOR_DEFAULT_FLAGS);
    let added = container.pod(&add);
    assert!(
        added.status.success(),
        "pod add: {}{}",
        String::from_utf8_lossy(&added.stderr),
        container.logs()
    );
    let listed = String::from_utf8_lossy(&container.pod(&["list"]).stdout).into_owned();
    assert!(listed.starts_with(&format!("default/app\t{netns}\t")), "{listed}");
    // Captured: the app's connection reaches the sidecar, with the remote service as original destination.
    assert_eq!(lands(&pod, &cgroup, &sidecar, &remote), "sidecar", "after pod add");

    // Attached to the test's cgroup, pinned in the test's bpffs.
    let attached = Command::new("bpftool")
        .arg("cgroup")
        .arg("show")
        .arg(cgroup.path())
        .output()
        .expect("run bpftool");
    let attached = String::from_utf8_lossy(&attached.stdout);
    assert_eq!(
        attached.matches("capture_").count(),
        8,
        "exactly our eight cgroup programs attached to the test's cgroup:\n{attached}"
    );
    assert!(
        std::fs::read_dir(pins.path()).is_ok_and(|mut d| d.next().is_some()),
        "nothing pinned in {}",
        pins.path().display()
    );

    // Stopped as Kubernetes stops it (SIGTERM): it exits 0, and capture stays in the kernel.
    podman_ok(&["stop", "--time=10", &container.name]);
    assert_eq!(
        podman_ok(&["inspect", "--format", "{{.State.ExitCode}}", &container.name]),
        "0",
        "{}",
        container.logs()
    );
    assert_eq!(
        lands(&pod, &cgroup, &sidecar, &remote),
        "sidecar",
        "after the agent stopped"
    );
}

/// The image as a drop-in init container command (its entrypoint is `capture`): a dry run of istio's
/// flags without `-u`, so the proxy's uid comes from looking up istio-proxy, for which the image has no
/// /etc/passwd: 1337, istio's default. (glibc is linked in; without an /etc/nsswitch.conf it reads only
/// files and loads no NSS module, which a static binary could not.)
#[test]
fn the_image_runs_capture_as_an_init_container_command() {
    let container = Container::new("image-init");
    let out = container.run(&[
        "--rm",
        "--network=none",
        &image(),
        "-n",
        "-p",
        "15001",
        "-i",
        "*",
        "-b",
        "*",
    ]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(stdout.contains("uids: [1337, 0,"), "{stdout}");
}

/// The agent from the image exactly as in a cluster: `--kubernetes`, the in-cluster configuration (the
/// service account's token and CA mounted where Kubernetes mounts them, the service's address in the
/// environment: the static binary's TLS checks the real API server's certificate) and `NODE_NAME`, with
/// the manifest's RBAC. A pod the test kubelet runs on the node is captured, and released when deleted.
#[test]
fn the_agent_from_the_image_captures_a_kubernetes_pod_with_the_in_cluster_configuration() {
    let cluster = Cluster::new("image", manifest_objects());
    let mut kubelet = Kubelet::new(&cluster.node, &cluster.cgroup, CgroupDriver::Cgroupfs);
    cluster.create(&cluster.admin, "cni-classic-sidecar", "app", None);
    kubelet.run(&cluster.admin, NS, "app");

    let container = Container::new("image-kube");
    let service_account = container.state.join("serviceaccount");
    cluster
        .api
        .write_service_account_dir(&cluster.account, &service_account);
    let in_cluster = InCluster {
        service_account,
        address: cluster.api.address(),
        node: cluster.node.clone(),
    };
    container.start_agent(&cluster.pins, &cluster.cgroup, Some(&in_cluster));
    let pod = format!("{NS}/app");
    wait_until(
        "the pod captured by the agent in the container",
        Duration::from_secs(15),
        || String::from_utf8_lossy(&container.pod(&["list"]).stdout).starts_with(&format!("{pod}\t")),
        || container.logs(),
    );
    let app = &kubelet.running(NS, "app").net;
    let (sidecar, remote) = listening(app, &cluster.cgroup);
    assert_eq!(lands(app, &cluster.cgroup, &sidecar, &remote), "sidecar");

    kubelet.delete(&cluster.admin, NS, "app");
    wait_until(
        "the deleted pod released",
        Duration::from_secs(15),
        || container.pod(&["list"]).stdout.is_empty(),
        || container.logs(),
    );
    let logs = container.logs();
    assert!(
        !logs.contains("bypassed"),
        "the server's certificate was not checked: {logs}"
    );
}
