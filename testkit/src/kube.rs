//! A real Kubernetes API server for the agent's tests ([`ApiServer`]: kube-apiserver v1.20.2 and etcd, as
//! `cargo xtask setup` builds and fetches them, on loopback ports of their own), an admin client over it
//! ([`Kube`]), the objects of `deploy/` ([`manifest_objects`], [`chart_objects`]) and a test kubelet
//! ([`Kubelet`]) that gives pod objects a network namespace, a sandbox process in the cgroup the kubelet
//! would use, and a status; a [`Cluster`] puts them together for one test, and [`Cluster::burst`] runs
//! many pods at once and times how long the agent takes to capture each.
//!
//! The API server has no controllers and no kubelet: a pod stays as the test writes it. Everything is
//! stopped and removed on drop.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, TcpListener},
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use k8s_openapi::api::core::v1::Pod as PodObject;
use kube::{
    Client,
    api::{Api, ApiResource, DeleteParams, DynamicObject, GroupVersionKind, Patch, PatchParams, PostParams},
};
use serde_json::{Value, json};

use crate::{Agent, BpfPins, Cgroup, Pod, Sandbox, unique};

/// The kube-apiserver binary `cargo xtask test` hands the tests.
pub const KUBE_APISERVER_ENV: &str = "CAPTURE_KUBE_APISERVER";
/// The etcd binary `cargo xtask test` hands the tests.
pub const ETCD_ENV: &str = "CAPTURE_ETCD";
/// How long a start may take to `/readyz` (≈ 7.5 s measured on 2 cores; see [`crate::patient`]).
const READY_TIMEOUT: Duration = Duration::from_secs(90);

/// A Kubernetes service account: the agent runs as one, with a static token.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ServiceAccount {
    pub namespace: String,
    pub name: String,
}

impl ServiceAccount {
    /// The user name RBAC matches to the account's bindings.
    fn user(&self) -> String {
        format!("system:serviceaccount:{}:{}", self.namespace, self.name)
    }

    /// Its static token in the servers' token file.
    fn token(&self) -> String {
        format!("sa-{}-{}", self.namespace, self.name)
    }
}

/// The admin's static token (group `system:masters`).
const ADMIN_TOKEN: &str = "admin-token";

fn binary(env: &str) -> PathBuf {
    std::env::var_os(env)
        .map(PathBuf::from)
        .unwrap_or_else(|| panic!("{env} is not set: run the tests with `cargo xtask test`, which builds it"))
}

/// A port free on 127.0.0.1 now.
fn free_port() -> u16 {
    TcpListener::bind((Ipv4Addr::LOCALHOST, 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port()
}

/// Kills and reaps `child`.
fn end(child: &mut Child) {
    let _ = child.kill();
    let _ = child.wait();
}

/// etcd and a kube-apiserver in front of it, on loopback, with a directory of their own; or a second
/// kube-apiserver on another's etcd ([`ApiServer::beside`]). RBAC is on; the admin and the service accounts
/// given at start have static tokens.
pub struct ApiServer {
    dir: PathBuf,
    /// Only the server that started etcd owns it.
    etcd: Option<Child>,
    etcd_url: String,
    process: Option<Child>,
    port: u16,
    accounts: Vec<ServiceAccount>,
}

impl ApiServer {
    /// Starts etcd and kube-apiserver, and waits until the server is ready.
    pub fn start(tag: &str, accounts: &[ServiceAccount]) -> ApiServer {
        let dir = std::env::temp_dir().join(unique(&format!("kube-{tag}")));
        std::fs::create_dir_all(&dir).expect("create the API server's directory");
        let (client, peer) = (free_port(), free_port());
        let etcd_url = format!("http://127.0.0.1:{client}");
        let peer_url = format!("http://127.0.0.1:{peer}");
        let etcd = Command::new(binary(ETCD_ENV))
            .arg("--name=test")
            .arg(format!("--data-dir={}", dir.join("etcd").display()))
            .arg(format!("--listen-client-urls={etcd_url}"))
            .arg(format!("--advertise-client-urls={etcd_url}"))
            .arg(format!("--listen-peer-urls={peer_url}"))
            .arg(format!("--initial-advertise-peer-urls={peer_url}"))
            .arg(format!("--initial-cluster=test={peer_url}"))
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(dir.join("etcd.log")).expect("etcd log"))
            .spawn()
            .expect("start etcd");
        let key = dir.join("service-accounts.key");
        crate::run(Command::new("openssl").args(["genrsa", "-out"]).arg(&key).arg("2048"));
        let mut tokens = format!("{ADMIN_TOKEN},admin,admin,\"system:masters\"\n");
        for (i, a) in accounts.iter().enumerate() {
            tokens.push_str(&format!(
                "{},{},sa-{i},\"system:serviceaccounts,system:serviceaccounts:{}\"\n",
                a.token(),
                a.user(),
                a.namespace
            ));
        }
        std::fs::write(dir.join("tokens.csv"), tokens).expect("write the token file");
        let mut server = ApiServer {
            dir,
            etcd: Some(etcd),
            etcd_url,
            process: None,
            port: free_port(),
            accounts: accounts.to_vec(),
        };
        server.start_again();
        server
    }

    /// Another kube-apiserver on this one's etcd, with the same tokens: the cluster as seen through a
    /// second control-plane node, which stays up while this one is stopped.
    pub fn beside(&self) -> ApiServer {
        let dir = self.dir.join(unique("beside"));
        std::fs::create_dir_all(&dir).expect("create the second server's directory");
        for file in ["service-accounts.key", "tokens.csv"] {
            std::fs::copy(self.dir.join(file), dir.join(file)).expect("copy the server's key and tokens");
        }
        let mut server = ApiServer {
            dir,
            etcd: None,
            etcd_url: self.etcd_url.clone(),
            process: None,
            port: free_port(),
            accounts: self.accounts.clone(),
        };
        server.start_again();
        server
    }

    /// Starts kube-apiserver (again: after [`ApiServer::stop`], on the same port) and waits for `/readyz`.
    pub fn start_again(&mut self) {
        assert!(self.process.is_none(), "the API server is running");
        let key = self.dir.join("service-accounts.key");
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.dir.join("kube-apiserver.log"))
            .expect("kube-apiserver log");
        let child = Command::new(binary(KUBE_APISERVER_ENV))
            .arg(format!("--etcd-servers={}", self.etcd_url))
            .arg("--bind-address=127.0.0.1")
            .arg("--advertise-address=127.0.0.1")
            .arg(format!("--secure-port={}", self.port))
            // v1.20 also serves plain HTTP on localhost:8080 unless told not to; two servers would clash.
            .arg("--insecure-port=0")
            .arg(format!("--cert-dir={}", self.dir.join("certs").display()))
            .arg("--service-account-issuer=https://kubernetes.default.svc")
            .arg(format!("--service-account-key-file={}", key.display()))
            .arg(format!("--service-account-signing-key-file={}", key.display()))
            .arg("--service-cluster-ip-range=10.0.0.0/24")
            .arg(format!("--token-auth-file={}", self.dir.join("tokens.csv").display()))
            .arg("--authorization-mode=RBAC")
            // No controller makes service account tokens: the agent's token is a static one.
            .arg("--disable-admission-plugins=ServiceAccount")
            .arg("--endpoint-reconciler-type=none")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .expect("start kube-apiserver");
        self.process = Some(child);
        let deadline = Instant::now() + crate::patient(READY_TIMEOUT);
        let admin = self.admin();
        while !admin.ready() {
            if let Some(status) = self.process.as_mut().and_then(|c| c.try_wait().ok().flatten()) {
                panic!("kube-apiserver exited ({status}): {}", self.log());
            }
            assert!(Instant::now() < deadline, "kube-apiserver not ready: {}", self.log());
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// Stops kube-apiserver (SIGKILL: as a crashed control-plane node); etcd stays.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.process.take() {
            end(&mut child);
        }
    }

    /// The server's log (the last 4 KiB).
    pub fn log(&self) -> String {
        let text = std::fs::read_to_string(self.dir.join("kube-apiserver.log")).unwrap_or_default();
        text[text.len().saturating_sub(4096)..].to_owned()
    }

    /// A kubeconfig for this server with `token`.
    fn kubeconfig_with(&self, token: &str) -> String {
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: test\n  cluster:\n    server: https://127.0.0.1:{}\n    \
             insecure-skip-tls-verify: true\nusers:\n- name: test\n  user:\n    token: {token}\ncontexts:\n- name: test\n  \
             context:\n    cluster: test\n    user: test\ncurrent-context: test\n",
            self.port
        )
    }

    /// A kubeconfig for this server as service account `account` (one given at start).
    pub fn kubeconfig(&self, account: &ServiceAccount) -> String {
        assert!(self.accounts.contains(account), "{account:?} has no token");
        self.kubeconfig_with(&account.token())
    }

    /// Writes what a pod running as `account` finds in `/var/run/secrets/kubernetes.io/serviceaccount/`
    /// into `dir`: its token, the server's CA (the self-signed chain the server made in its cert dir) and
    /// its namespace; with `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT` set to [`Self::address`],
    /// a client's in-cluster configuration then reaches this server and checks its certificate.
    pub fn write_service_account_dir(&self, account: &ServiceAccount, dir: &Path) {
        assert!(self.accounts.contains(account), "{account:?} has no token");
        std::fs::create_dir_all(dir).expect("create the service account directory");
        let ca = self.dir.join("certs/apiserver.crt");
        std::fs::copy(&ca, dir.join("ca.crt")).unwrap_or_else(|e| panic!("copy {}: {e}", ca.display()));
        std::fs::write(dir.join("token"), account.token()).expect("write the token");
        std::fs::write(dir.join("namespace"), &account.namespace).expect("write the namespace");
    }

    /// The server's host and port, as `KUBERNETES_SERVICE_HOST` and `KUBERNETES_SERVICE_PORT` give them.
    pub fn address(&self) -> (&'static str, u16) {
        ("127.0.0.1", self.port)
    }

    /// A client with the admin's rights.
    pub fn admin(&self) -> Kube {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("a runtime for the admin client");
        let kubeconfig = kube::config::Kubeconfig::from_yaml(&self.kubeconfig_with(ADMIN_TOKEN)).expect("kubeconfig");
        let client = rt.block_on(async {
            let config = kube::Config::from_custom_kubeconfig(kubeconfig, &Default::default())
                .await
                .expect("client config");
            Client::try_from(config).expect("client")
        });
        Kube { rt, client }
    }
}

impl Drop for ApiServer {
    fn drop(&mut self) {
        self.stop();
        if let Some(mut etcd) = self.etcd.take() {
            end(&mut etcd);
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// A blocking client over the API server.
pub struct Kube {
    rt: tokio::runtime::Runtime,
    client: Client,
}

impl Kube {
    /// Whether the server answers `/readyz` with ok.
    fn ready(&self) -> bool {
        let request = http::Request::get("/readyz").body(Vec::new()).expect("request");
        self.rt
            .block_on(async { tokio::time::timeout(Duration::from_secs(5), self.client.request_text(request)).await })
            .is_ok_and(|r| r.is_ok_and(|body| body.trim() == "ok"))
    }

    fn pods(&self, namespace: &str) -> Api<PodObject> {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Creates `object` (any kind whose plural is its lower-cased kind + "s"; namespaced if its metadata
    /// names a namespace).
    pub fn create(&self, object: &Value) {
        let (group, version) = match object["apiVersion"].as_str().expect("apiVersion").split_once('/') {
            Some((g, v)) => (g, v),
            None => ("", object["apiVersion"].as_str().unwrap_or_default()),
        };
        let kind = object["kind"].as_str().expect("kind");
        let resource = ApiResource::from_gvk_with_plural(
            &GroupVersionKind::gvk(group, version, kind),
            &format!("{}s", kind.to_lowercase()),
        );
        let api: Api<DynamicObject> = match object["metadata"]["namespace"].as_str() {
            Some(ns) => Api::namespaced_with(self.client.clone(), ns, &resource),
            None => Api::all_with(self.client.clone(), &resource),
        };
        let dynamic: DynamicObject = serde_json::from_value(object.clone()).expect("an object");
        self.rt
            .block_on(api.create(&PostParams::default(), &dynamic))
            .unwrap_or_else(|e| panic!("create {kind} {}: {e}", object["metadata"]["name"]));
    }

    /// Creates a pod; returns it as the server stored it (with its UID).
    pub fn create_pod(&self, pod: &Value) -> PodObject {
        let namespace = pod["metadata"]["namespace"].as_str().unwrap_or("default");
        let pod: PodObject = serde_json::from_value(pod.clone()).expect("a pod");
        self.rt
            .block_on(self.pods(namespace).create(&PostParams::default(), &pod))
            .unwrap_or_else(|e| panic!("create pod {:?}: {e}", pod.metadata.name))
    }

    /// Pod `namespace/name`, if it exists.
    pub fn pod(&self, namespace: &str, name: &str) -> Option<PodObject> {
        self.rt
            .block_on(self.pods(namespace).get_opt(name))
            .unwrap_or_else(|e| panic!("get pod {namespace}/{name}: {e}"))
    }

    /// A JSON merge patch of pod `namespace/name`'s metadata or spec.
    pub fn patch_pod(&self, namespace: &str, name: &str, patch: &Value) {
        self.rt
            .block_on(
                self.pods(namespace)
                    .patch(name, &PatchParams::default(), &Patch::Merge(patch)),
            )
            .unwrap_or_else(|e| panic!("patch pod {namespace}/{name}: {e}"));
    }

    /// A JSON merge patch of pod `namespace/name`'s status, as the kubelet writes it.
    pub fn patch_pod_status(&self, namespace: &str, name: &str, status: &Value) {
        let patch = json!({ "status": status });
        self.rt
            .block_on(
                self.pods(namespace)
                    .patch_status(name, &PatchParams::default(), &Patch::Merge(&patch)),
            )
            .unwrap_or_else(|e| panic!("patch the status of pod {namespace}/{name}: {e}"));
    }

    /// Deletes pod `namespace/name` at once (grace period 0, as the kubelet confirms a deletion).
    pub fn delete_pod(&self, namespace: &str, name: &str) {
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            ..DeleteParams::default()
        };
        self.rt
            .block_on(self.pods(namespace).delete(name, &params))
            .unwrap_or_else(|e| panic!("delete pod {namespace}/{name}: {e}"));
    }
}

/// The repository's `deploy/` directory.
fn deploy() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy")
}

/// The objects of a multi-document YAML text, as JSON; empty documents skipped.
fn documents(yaml: &str) -> Vec<Value> {
    use serde::Deserialize as _;
    serde_yaml::Deserializer::from_str(yaml)
        .map(|doc| Value::deserialize(doc).expect("a YAML document"))
        .filter(|v| !v.is_null())
        .collect()
}

/// The objects of the plain manifest, `deploy/kubernetes/capture.yaml`.
pub fn manifest_objects() -> Vec<Value> {
    let path = deploy().join("kubernetes/capture.yaml");
    documents(&std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display())))
}

/// The objects the Helm chart `deploy/helm/capture` renders with its default values (`helm template`,
/// with the helm `cargo xtask test` installed, `$CAPTURE_HELM`).
pub fn chart_objects() -> Vec<Value> {
    let helm = binary("CAPTURE_HELM");
    let out = crate::run(
        Command::new(helm)
            .args(["template", "capture"])
            .arg(deploy().join("helm/capture")),
    );
    documents(&String::from_utf8_lossy(&out.stdout))
}

/// The service account the DaemonSet among `objects` runs as.
fn daemonset_account(objects: &[Value]) -> ServiceAccount {
    let ds = objects.iter().find(|o| o["kind"] == "DaemonSet").expect("a DaemonSet");
    ServiceAccount {
        namespace: ds["metadata"]["namespace"].as_str().expect("namespace").to_owned(),
        name: ds["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .expect("serviceAccountName")
            .to_owned(),
    }
}

/// How the kubelet names a pod's cgroups (its `--cgroup-driver`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum CgroupDriver {
    /// `kubepods/besteffort/pod<UID>/<container>`.
    Cgroupfs,
    /// `kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod<UID, _ for ->.slice/cri-containerd-<container>.scope`.
    Systemd,
}

impl CgroupDriver {
    /// The sandbox container's cgroup, relative to the node's cgroup root.
    pub fn sandbox_cgroup(self, uid: &str, container: &str) -> PathBuf {
        match self {
            Self::Cgroupfs => format!("kubepods/besteffort/pod{uid}/{container}").into(),
            Self::Systemd => format!(
                "kubepods.slice/kubepods-besteffort.slice/kubepods-besteffort-pod{}.slice/cri-containerd-{container}.scope",
                uid.replace('-', "_")
            )
            .into(),
        }
    }
}

/// A pod the test kubelet runs: its network namespace (the pod's, joined by veth to a remote host's, as
/// [`Pod`]), and its sandbox process in the pod's cgroup.
pub struct RunningPod {
    /// Dropped first (fields drop in order): killed and reaped before its cgroup and namespace go.
    sandbox: Sandbox,
    _cgroup: Cgroup,
    pub uid: String,
    pub net: Pod,
}

impl RunningPod {
    /// The sandbox's PID.
    pub fn pid(&self) -> u32 {
        self.sandbox.pid()
    }
}

/// A test kubelet for node `node`: pods under `root` (the node's cgroup root, the test's own cgroup), named
/// by `driver`.
pub struct Kubelet<'a> {
    node: String,
    root: &'a Cgroup,
    driver: CgroupDriver,
    pods: BTreeMap<String, RunningPod>,
    sandboxes: u32,
}

impl<'a> Kubelet<'a> {
    pub fn new(node: &str, root: &'a Cgroup, driver: CgroupDriver) -> Kubelet<'a> {
        Kubelet {
            node: node.to_owned(),
            root,
            driver,
            pods: BTreeMap::new(),
            sandboxes: 0,
        }
    }

    /// Runs pod `namespace/name` (which must be on this node): a new network namespace and sandbox
    /// (replacing any it had: a sandbox restart), then the status a running pod has.
    pub fn run(&mut self, api: &Kube, namespace: &str, name: &str) -> &RunningPod {
        let pod = api.pod(namespace, name).expect("the pod exists");
        assert_eq!(
            pod.spec.as_ref().and_then(|s| s.node_name.as_deref()),
            Some(self.node.as_str())
        );
        let uid = pod.metadata.uid.clone().expect("a UID");
        let id = format!("{namespace}/{name}");
        // The old sandbox ends before the new one starts, as when a runtime recreates it.
        drop(self.pods.remove(&id));
        self.sandboxes += 1;
        let net = Pod::new(&format!("k{}", self.sandboxes));
        let cgroup = self
            .root
            .child(self.driver.sandbox_cgroup(&uid, &format!("sandbox{}", self.sandboxes)));
        let sandbox = Sandbox::start_in(&net.pod, &cgroup);
        // Nothing reads the start times; a fixed one keeps the status simple.
        let started = "2026-01-01T00:00:00Z";
        let containers: Vec<Value> = pod
            .spec
            .iter()
            .flat_map(|s| &s.containers)
            .map(|c| {
                json!({
                    "name": c.name, "ready": true, "started": true, "restartCount": 0,
                    "image": c.image, "imageID": "", "state": { "running": { "startedAt": started } },
                })
            })
            .collect();
        api.patch_pod_status(
            namespace,
            name,
            &json!({
                "phase": "Running",
                "podIP": crate::POD_V4.to_string(),
                "podIPs": [{ "ip": crate::POD_V4.to_string() }],
                "hostIP": "127.0.0.1",
                "startTime": started,
                "containerStatuses": containers,
            }),
        );
        self.pods.entry(id).or_insert(RunningPod {
            uid,
            net,
            sandbox,
            _cgroup: cgroup,
        })
    }

    /// The pod's containers ended with exit 0 (a finished Job's pod): status `Succeeded`, sandbox gone.
    pub fn finish(&mut self, api: &Kube, namespace: &str, name: &str) {
        drop(self.pods.remove(&format!("{namespace}/{name}")));
        api.patch_pod_status(namespace, name, &json!({ "phase": "Succeeded" }));
    }

    /// Deletes the pod: its sandbox ends, then the object goes (grace period 0).
    pub fn delete(&mut self, api: &Kube, namespace: &str, name: &str) {
        drop(self.pods.remove(&format!("{namespace}/{name}")));
        api.delete_pod(namespace, name);
    }

    /// Pod `namespace/name` as it runs now.
    pub fn running(&self, namespace: &str, name: &str) -> &RunningPod {
        &self.pods[&format!("{namespace}/{name}")]
    }
}

/// A pod object from the injector's output (`capture-userspace/tests/data/pods/<recorded>.json`, as an
/// API server returned it), renamed `namespace/name` and scheduled on `node`, without what the server
/// fills in (UID, resource version, status).
pub fn pod_object(recorded: &str, namespace: &str, name: &str, node: &str) -> Value {
    let path = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../capture-userspace/tests/data/pods")
        .join(format!("{recorded}.json"));
    let text = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()));
    let mut pod: Value = serde_json::from_str(&text).unwrap_or_else(|e| panic!("parse {}: {e}", path.display()));
    let meta = pod["metadata"].as_object_mut().expect("metadata");
    for server_side in ["uid", "resourceVersion", "creationTimestamp", "ownerReferences"] {
        meta.remove(server_side);
    }
    meta.insert("name".into(), name.into());
    meta.insert("namespace".into(), namespace.into());
    pod.as_object_mut().expect("a pod").remove("status");
    pod["spec"]["nodeName"] = node.into();
    pod
}

/// A namespace object.
fn namespace_object(name: &str) -> Value {
    json!({ "apiVersion": "v1", "kind": "Namespace", "metadata": { "name": name } })
}

/// The namespace of the tests' pods.
pub const NS: &str = "shop";

/// A cluster for one test: the API server with `objects` (deploy/'s, RBAC included) and namespace [`NS`],
/// this node's cgroup root and bpffs pins, and the service account the DaemonSet among `objects` runs as.
pub struct Cluster {
    pub api: ApiServer,
    pub admin: Kube,
    pub account: ServiceAccount,
    pub node: String,
    pub cgroup: Cgroup,
    pub pins: BpfPins,
}

impl Cluster {
    pub fn new(tag: &str, objects: Vec<Value>) -> Cluster {
        let account = daemonset_account(&objects);
        let api = ApiServer::start(tag, std::slice::from_ref(&account));
        let admin = api.admin();
        for object in &objects {
            admin.create(object);
        }
        admin.create(&namespace_object(NS));
        Cluster {
            api,
            admin,
            account,
            node: format!("node-{tag}"),
            cgroup: Cgroup::new(&format!("k8s-{tag}")),
            pins: BpfPins::new(&format!("k8s-{tag}")),
        }
    }

    /// The agent for this node, as the service account, on `api` (this cluster's, or one beside it).
    pub fn agent_on(&self, tag: &str, api: &ApiServer) -> Agent {
        Agent::start_kubernetes(
            tag,
            &self.pins,
            &self.cgroup,
            &self.node,
            &api.kubeconfig(&self.account),
        )
    }

    /// Creates pod [`NS`]/`name` from recorded pod `recorded`, on `node` (this one if None), through
    /// `admin`.
    pub fn create(&self, admin: &Kube, recorded: &str, name: &str, node: Option<&str>) {
        admin.create_pod(&pod_object(recorded, NS, name, node.unwrap_or(&self.node)));
    }

    /// `count` injected pods created at once, then run by `kubelet` one after the other; returns, for each,
    /// the time from its Running status to the agent's `registered` line for it (negative if the agent found
    /// the sandbox before the status said Running), in pod order. Panics if the agent has not captured them
    /// all within `wait`.
    pub fn burst(&self, agent: &Agent, kubelet: &mut Kubelet, count: usize, wait: Duration) -> Vec<f64> {
        let names: Vec<String> = (0..count).map(|i| format!("burst-{i}")).collect();
        for name in &names {
            self.create(&self.admin, "cni-classic-sidecar", name, None);
        }
        let running: Vec<std::time::SystemTime> = names
            .iter()
            .map(|name| {
                kubelet.run(&self.admin, NS, name);
                std::time::SystemTime::now()
            })
            .collect();
        crate::wait_until(
            "every pod of the burst captured",
            wait,
            || {
                captured(agent)
                    .keys()
                    .filter(|id| id.starts_with(&format!("{NS}/burst-")))
                    .count()
                    == count
            },
            || agent.log(),
        );
        let log = agent.log();
        names
            .iter()
            .zip(running)
            .map(|(name, running)| {
                let field = format!("pod={NS}/{name} ");
                let line = log
                    .lines()
                    .find(|l| l.contains(" registered ") && l.contains(&field))
                    .unwrap_or_else(|| panic!("no registered line for {name}: {log}"));
                seconds_between(running, line)
            })
            .collect()
    }
}

/// Seconds from `at` to the time of day that opens the agent's log line `line` (`…THH:MM:SS.ffffffZ`, UTC):
/// both taken as times of day, so within a day of each other.
fn seconds_between(at: std::time::SystemTime, line: &str) -> f64 {
    const DAY: f64 = 86_400.0;
    let clock = line
        .split_whitespace()
        .next()
        .and_then(|stamp| stamp.split_once('T'))
        .map(|(_, clock)| clock.trim_end_matches('Z'))
        .unwrap_or_else(|| panic!("no timestamp opens {line:?}"));
    let logged = clock
        .split(':')
        .map(|part| part.parse::<f64>().unwrap_or_else(|e| panic!("{line:?}: {e}")))
        .fold(0.0, |acc, part| acc * 60.0 + part);
    let at = at
        .duration_since(std::time::UNIX_EPOCH)
        .expect("after 1970")
        .as_secs_f64()
        % DAY;
    // The nearest difference modulo a day: a burst that spans midnight still measures right.
    (logged - at + DAY / 2.0).rem_euclid(DAY) - DAY / 2.0
}

/// The pods the agent has captured, by id, with the rest of their line in `capture pod list`.
pub fn captured(agent: &Agent) -> BTreeMap<String, String> {
    agent
        .list()
        .lines()
        .filter_map(|l| l.split_once('\t'))
        .map(|(id, rest)| (id.to_owned(), rest.to_owned()))
        .collect()
}
