//! The deployment manifests (deploy/) parse as the Kubernetes objects they claim to be and keep the
//! properties the agent depends on; the Helm chart passes `helm lint --strict` and renders objects with the
//! same properties. (Schema validation: `kubernetes-validate --strict`, see the README.)

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use k8s_openapi::api::{
    apps::v1::DaemonSet,
    core::v1::{Container, ServiceAccount},
    rbac::v1::{ClusterRole, ClusterRoleBinding},
};
use serde::Deserialize as _;

fn deploy(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy").join(path)
}

/// Every document of a multi-document YAML file, as JSON values.
fn documents(path: &Path) -> Vec<serde_json::Value> {
    let text = std::fs::read_to_string(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    parse(&text, &path.display().to_string())
}

/// Every document of multi-document YAML `text` (from `what`), as JSON values.
fn parse(text: &str, what: &str) -> Vec<serde_json::Value> {
    serde_yaml::Deserializer::from_str(text)
        .map(|doc| serde_yaml::Value::deserialize(doc).unwrap_or_else(|e| panic!("{what}: {e}")))
        .filter(|v| !v.is_null())
        .map(|v| serde_json::to_value(v).unwrap())
        .collect()
}

fn object<T: serde::de::DeserializeOwned>(docs: &[serde_json::Value], kind: &str) -> T {
    let doc = docs
        .iter()
        .find(|d| d["kind"] == kind)
        .unwrap_or_else(|| panic!("no {kind}"));
    serde_json::from_value(doc.clone()).unwrap_or_else(|e| panic!("{kind}: {e}"))
}

#[test]
fn daemonset_has_what_the_agent_needs_and_no_more() {
    check_daemonset(&documents(&deploy("kubernetes/capture.yaml")));
}

#[test]
fn rbac_reads_pods_only() {
    check_rbac(&documents(&deploy("kubernetes/capture.yaml")));
}

/// The helm binary `cargo xtask test` installed.
fn helm() -> PathBuf {
    std::env::var_os("CAPTURE_HELM")
        .map(PathBuf::from)
        .expect("CAPTURE_HELM is not set: run `cargo xtask test`, which installs helm")
}

#[test]
fn the_chart_lints_and_renders_what_the_agent_needs() {
    let chart = deploy("helm/capture");
    let lint = Command::new(helm())
        .args(["lint", "--strict"])
        .arg(&chart)
        .output()
        .expect("run helm lint");
    assert!(
        lint.status.success(),
        "helm lint:\n{}{}",
        String::from_utf8_lossy(&lint.stdout),
        String::from_utf8_lossy(&lint.stderr)
    );
    let docs = template(&chart, "image.repository=registry.example/capture,image.tag=9.9.9");
    check_daemonset(&docs);
    check_rbac(&docs);
    // attachCgroup names the attach point below the host's cgroup root.
    let attached = template(&chart, "agent.attachCgroup=/kubepods.slice/kubepods-burstable.slice");
    assert_eq!(
        agent_args(&attached)
            .iter()
            .filter(|a| a.starts_with("--cgroup="))
            .collect::<Vec<_>>(),
        ["--cgroup=/host/sys/fs/cgroup/kubepods.slice/kubepods-burstable.slice"]
    );
    let ds: DaemonSet = object(&docs, "DaemonSet");
    let image = ds.spec.unwrap().template.spec.unwrap().containers[0].image.clone();
    assert_eq!(
        image.as_deref(),
        Some("registry.example/capture:9.9.9"),
        "values reach the image"
    );
}

/// The objects `helm template` renders from `chart` with `--set values`.
fn template(chart: &Path, values: &str) -> Vec<serde_json::Value> {
    let rendered = Command::new(helm())
        .args(["template", "capture"])
        .arg(chart)
        .args(["--set", values])
        .output()
        .expect("run helm template");
    assert!(
        rendered.status.success(),
        "helm template --set {values}: {}",
        String::from_utf8_lossy(&rendered.stderr)
    );
    parse(&String::from_utf8_lossy(&rendered.stdout), "helm template")
}

/// What the agent's DaemonSet must have: the host's PIDs (not its network), every taint tolerated, the node
/// name from the downward API, named capabilities instead of privileged, the host's bpffs and cgroup root.
fn check_daemonset(docs: &[serde_json::Value]) {
    let ds: DaemonSet = object(docs, "DaemonSet");
    let pod = ds.spec.unwrap().template.spec.unwrap();
    assert_eq!(pod.host_pid, Some(true), "the namespace lookup reads the host's /proc");
    assert_ne!(
        pod.host_network,
        Some(true),
        "the agent does not need the host's network"
    );
    let tolerations = pod.tolerations.unwrap();
    assert!(
        tolerations
            .iter()
            .any(|t| t.operator.as_deref() == Some("Exists") && t.key.is_none()),
        "every taint"
    );
    assert_eq!(pod.service_account_name.as_deref(), Some("capture"));

    let [container]: [Container; 1] = pod.containers.try_into().unwrap();
    let args = container.args.unwrap();
    assert_eq!(&args[..2], ["agent", "--kubernetes"]);
    let env = container.env.unwrap();
    let node = env.iter().find(|e| e.name == "NODE_NAME").expect("NODE_NAME");
    let field = node
        .value_from
        .as_ref()
        .and_then(|v| v.field_ref.as_ref())
        .expect("from the downward API");
    assert_eq!(field.field_path, "spec.nodeName");

    let security = container.security_context.unwrap();
    assert_ne!(security.privileged, Some(true));
    let caps = security.capabilities.unwrap();
    assert_eq!(caps.drop.unwrap(), ["ALL"]);
    assert_eq!(
        caps.add.unwrap(),
        ["BPF", "PERFMON", "NET_ADMIN", "SYS_ADMIN", "SYS_PTRACE"]
    );

    let volumes = pod.volumes.unwrap();
    let host_path = |name: &str| {
        let volume = volumes
            .iter()
            .find(|v| v.name == name)
            .unwrap_or_else(|| panic!("volume {name}"));
        volume.host_path.as_ref().unwrap().path.clone()
    };
    assert_eq!(host_path("bpffs"), "/sys/fs/bpf");
    assert_eq!(host_path("cgroup"), "/sys/fs/cgroup");
    let mounts = container.volume_mounts.unwrap();
    let cgroup = mounts.iter().find(|m| m.name == "cgroup").unwrap();
    assert!(
        args.contains(&format!("--cgroup-root={}", cgroup.mount_path)),
        "--cgroup-root points at the host's root"
    );
    assert!(
        !args.iter().any(|a| a.starts_with("--cgroup=")),
        "no --cgroup: the agent attaches to the pods' cgroup it finds, not to the root"
    );
}

/// The agent container's arguments.
fn agent_args(docs: &[serde_json::Value]) -> Vec<String> {
    let ds: DaemonSet = object(docs, "DaemonSet");
    let [container]: [Container; 1] = ds.spec.unwrap().template.spec.unwrap().containers.try_into().unwrap();
    container.args.unwrap()
}

/// The agent's account may only get, list and watch pods.
fn check_rbac(docs: &[serde_json::Value]) {
    let _: ServiceAccount = object(docs, "ServiceAccount");
    let role: ClusterRole = object(docs, "ClusterRole");
    let [rule] = <[_; 1]>::try_from(role.rules.unwrap()).unwrap();
    assert_eq!(rule.api_groups.unwrap(), [""]);
    assert_eq!(rule.resources.unwrap(), ["pods"]);
    assert_eq!(rule.verbs, ["list", "watch"]);
    let binding: ClusterRoleBinding = object(docs, "ClusterRoleBinding");
    assert_eq!(binding.role_ref.name, "capture");
    assert_eq!(binding.subjects.unwrap()[0].name, "capture");
}

/// Every value the templates use exists in values.yaml (helm renders a missing one as empty, silently).
#[test]
fn chart_values_cover_the_templates() {
    let chart = &documents(&deploy("helm/capture/Chart.yaml"))[0];
    assert_eq!(chart["apiVersion"], "v2");
    assert_eq!(chart["name"], "capture");
    let values = &documents(&deploy("helm/capture/values.yaml"))[0];
    let templates = std::fs::read_dir(deploy("helm/capture/templates")).unwrap();
    for template in templates {
        let path = template.unwrap().path();
        let text = std::fs::read_to_string(&path).unwrap();
        for (at, _) in text.match_indices(".Values.") {
            let name: String = text[at + ".Values.".len()..]
                .chars()
                .take_while(|c| c.is_alphanumeric() || *c == '.')
                .collect();
            let pointer = format!("/{}", name.trim_end_matches('.').replace('.', "/"));
            assert!(
                values.pointer(&pointer).is_some(),
                "{}: .Values.{name} is not in values.yaml",
                path.display()
            );
        }
    }
}
