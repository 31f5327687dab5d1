//! The container image (`deploy/Dockerfile`): a static `capture` and nothing else, built with podman — no
//! Docker daemon, and no base image to pull (this machine reaches no container registry) — into podman
//! storage of the project's own under `target/podman`, so neither the host's podman storage nor anything
//! outside the target directory changes. `cargo xtask image` builds it and prints its size; `cargo xtask
//! test` builds it through the same [`build`] and hands the tests its name and the podman configuration.

use std::{
    path::{Path, PathBuf},
    process::Command,
};

use anyhow::{Context as _, Result, bail};

use crate::{cargo, checked, target_dir};

/// The image's name in the project's podman storage.
pub const IMAGE: &str = "localhost/capture:dev";
/// The target the static binary is built for: given explicitly so that RUSTFLAGS reach only the binary,
/// not build scripts and proc macros (which cannot be static).
const TARGET: &str = "x86_64-unknown-linux-gnu";
/// The cargo profile of the image's binary (the workspace's Cargo.toml: release, stripped).
const PROFILE: &str = "image";

/// What [`build`] made.
pub struct Image {
    /// The static binary the image holds.
    pub binary: PathBuf,
    /// The image's size as podman reports it, in bytes.
    pub size: u64,
}

/// Environment variables that point podman at the project's configuration and storage ([`configure`]):
/// podman's own `CONTAINERS_CONF`, and the storage's two roots, which every podman command of xtask and of
/// the tests passes as `--root` and `--runroot`. (Not as a storage.conf in `CONTAINERS_STORAGE_CONF`: with
/// that set, podman 4.3 waits 20 s for each container's exit, "Exceeded conmon timeout".)
pub fn podman_env() -> Result<[(&'static str, PathBuf); 3]> {
    let dir = configure()?;
    Ok([
        ("CONTAINERS_CONF", dir.join("containers.conf")),
        ("CAPTURE_PODMAN_ROOT", dir.join("storage")),
        ("CAPTURE_PODMAN_RUNROOT", dir.join("run")),
    ])
}

/// Writes podman's configuration for this machine under `target/podman` and returns that directory.
fn configure() -> Result<PathBuf> {
    let dir = target_dir().join("podman");
    std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let path = |name: &str| dir.join(name).display().to_string();
    // Podman as root gives a container RLIMIT_NOFILE and RLIMIT_NPROC of 1048576 unless told otherwise;
    // raising a hard limit needs CAP_SYS_RESOURCE, which root lacks on machines like this one (a sandboxed
    // VM), and the runtime then fails with "setrlimit: Operation not permitted". So the container gets this
    // process's hard limits, NPROC at most 32768: podman 4.3 lowers its own to that when it starts.
    let (nofile, nproc) = (
        hard_limit(libc::RLIMIT_NOFILE)?,
        hard_limit(libc::RLIMIT_NPROC)?.min(32768),
    );
    let containers = format!(
        "[containers]\n\
         default_ulimits = [\"nofile={nofile}:{nofile}\", \"nproc={nproc}:{nproc}\"]\n\
         [network]\n\
         # Podman takes a lock (cni.lock) there even for --network=none: the project's, not /etc/cni.\n\
         network_config_dir = \"{networks}\"\n\
         [engine]\n\
         # No systemd as PID 1 here: podman makes the containers' cgroups itself.\n\
         cgroup_manager = \"cgroupfs\"\n\
         # No journald here, and nothing reads the events.\n\
         events_logger = \"none\"\n\
         # crun, Debian's default, refuses hybrid cgroup hosts whose v2 hierarchy has a controller\n\
         # (\"cgroups in hybrid mode not supported, drop all controllers from cgroupv2\"); runc runs there.\n\
         runtime = \"runc\"\n\
         # Podman's own state (locks, exit codes): the project's, not the host's /run/libpod.\n\
         tmp_dir = \"{tmp}\"\n",
        networks = path("networks"),
        tmp = path("tmp"),
    );
    let conf = dir.join("containers.conf");
    std::fs::write(&conf, containers).with_context(|| format!("write {}", conf.display()))?;
    Ok(dir)
}

/// This process's hard limit of `resource`.
fn hard_limit(resource: libc::__rlimit_resource_t) -> Result<u64> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit writes only the struct it is given.
    if unsafe { libc::getrlimit(resource, &mut limit) } != 0 {
        return Err(std::io::Error::last_os_error()).context("getrlimit");
    }
    Ok(limit.rlim_max)
}

/// A podman command with the project's configuration and storage.
pub fn podman() -> Result<Command> {
    let [conf, root, runroot] = podman_env()?;
    let mut cmd = Command::new("podman");
    cmd.env(conf.0, conf.1)
        .arg("--root")
        .arg(root.1)
        .arg("--runroot")
        .arg(runroot.1);
    Ok(cmd)
}

/// Unmounts the project's podman storage's `overlay` directory, which podman's overlay driver mounts on
/// itself (a private bind mount) and leaves mounted when it exits: without this, removing a checkout after
/// `cargo xtask test` or `image` fails with "Device or resource busy". Podman mounts it again when it next
/// runs. Lazily (`MNT_DETACH`), so a container still running cannot make it fail.
pub fn release_storage() -> Result<()> {
    let overlay = target_dir().join("podman/storage/overlay");
    // /proc/self/mountinfo escapes these in paths as octal.
    let escaped = overlay
        .to_str()
        .context("the target directory's path is not UTF-8")?
        .replace('\\', "\\134")
        .replace(' ', "\\040")
        .replace('\t', "\\011")
        .replace('\n', "\\012");
    let mounts = std::fs::read_to_string("/proc/self/mountinfo").context("read /proc/self/mountinfo")?;
    // The mount point is the fifth field; a directory mounted more than once is listed once per mount.
    let stacked = mounts
        .lines()
        .filter(|l| l.split(' ').nth(4) == Some(escaped.as_str()))
        .count();
    let path = std::ffi::CString::new(overlay.as_os_str().as_encoded_bytes()).context("a path with a NUL")?;
    for _ in 0..stacked {
        // SAFETY: a NUL-terminated path that outlives the call.
        if unsafe { libc::umount2(path.as_ptr(), libc::MNT_DETACH) } != 0 {
            return Err(std::io::Error::last_os_error()).with_context(|| format!("unmount {}", overlay.display()));
        }
    }
    Ok(())
}

/// Builds the static `capture` (release, stripped, glibc linked in) and the image from it with
/// `deploy/Dockerfile`; returns the binary and the image's size.
pub fn build() -> Result<Image> {
    println!("image: building a static capture ({PROFILE} profile, {TARGET})");
    checked(
        cargo()
            .args(["build", "--quiet", "--profile", PROFILE, "--target", TARGET])
            .args(["--package", "capture-userspace", "--bin", "capture"])
            .env("RUSTFLAGS", "-C target-feature=+crt-static"),
    )?;
    let binary = target_dir().join(TARGET).join(PROFILE).join("capture");
    ensure_static(&binary)?;

    // The build context holds the binary only: nothing else can end up in the image. (Not target/image:
    // that is where cargo keeps the profile's build scripts and proc macros.)
    let context = target_dir().join("podman/context");
    let _ = std::fs::remove_dir_all(&context);
    std::fs::create_dir_all(&context).with_context(|| format!("create {}", context.display()))?;
    std::fs::copy(&binary, context.join("capture")).with_context(|| format!("stage {}", binary.display()))?;
    let dockerfile = Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/Dockerfile");
    checked(
        podman()?
            .args(["build", "--quiet", "--network=none", "--tag", IMAGE, "--file"])
            .arg(&dockerfile)
            .arg(&context)
            .stdout(std::process::Stdio::null()),
    )?;
    // The image this one replaced, if any, is left without a name: remove it, so the storage keeps one.
    checked(
        podman()?
            .args(["image", "prune", "--force"])
            .stdout(std::process::Stdio::null()),
    )?;
    let out = podman()?
        .args(["image", "inspect", "--format", "{{.Size}}", IMAGE])
        .output()
        .context("spawn podman image inspect")?;
    if !out.status.success() {
        bail!(
            "podman image inspect {IMAGE}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    let size = String::from_utf8_lossy(&out.stdout).trim().parse().with_context(|| {
        format!(
            "podman image inspect {IMAGE}: size {:?}",
            String::from_utf8_lossy(&out.stdout)
        )
    })?;
    Ok(Image { binary, size })
}

/// An error unless `binary` is a static executable: `FROM scratch` has no dynamic loader and no libraries.
/// A dynamic executable names its loader in a `PT_INTERP` program header; a static one (also static-pie,
/// what rustc makes with `crt-static`) has none.
fn ensure_static(binary: &Path) -> Result<()> {
    use object::read::elf::{ElfFile64, ProgramHeader as _};

    let data = std::fs::read(binary).with_context(|| format!("read {}", binary.display()))?;
    let elf = ElfFile64::<object::Endianness>::parse(&*data)
        .with_context(|| format!("{} is not a 64-bit ELF executable", binary.display()))?;
    let endian = elf.endian();
    if elf
        .elf_program_headers()
        .iter()
        .any(|header| header.p_type(endian) == object::elf::PT_INTERP)
    {
        bail!(
            "{} is not static: it asks for a dynamic loader (PT_INTERP)",
            binary.display()
        );
    }
    Ok(())
}

/// One line: the image, its size, and the binary's.
pub fn describe(image: &Image) -> String {
    let mb = |bytes: u64| bytes as f64 / 1e6;
    let binary = std::fs::metadata(&image.binary).map_or(0, |m| m.len());
    format!(
        "image: {IMAGE}, {:.1} MB (the static capture: {:.1} MB); podman storage in {}",
        mb(image.size),
        mb(binary),
        target_dir().join("podman").display()
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dynamic_executable_is_refused() {
        // Debian's shell is linked dynamically.
        let err = ensure_static(Path::new("/bin/sh")).expect_err("/bin/sh is dynamic");
        assert!(err.to_string().contains("PT_INTERP"), "{err:#}");
        let err = ensure_static(Path::new("/etc/hostname")).expect_err("not ELF");
        assert!(err.to_string().contains("not a 64-bit ELF"), "{err:#}");
    }
}
