//! `cargo xtask vm`: the test suite on another kernel, in a QEMU guest booted by virtme-ng.
//!
//! The test binaries are built here, on the host; the guest sees the host's files (9p) and runs them as
//! root in its own kernel, writing their output to a directory it may write to (`--rwdir`). vng's own
//! exit status is not reliable (it falls back to the serial console when it finds no virtio-serial port
//! for the script's output), so the result is read from that output: the `test result:` lines and a line
//! per binary with its exit status, closed by a marker the guest writes last.

use std::{
    fs,
    io::{Read as _, Seek as _, SeekFrom, Write as _},
    os::unix::process::CommandExt as _,
    path::{Path, PathBuf},
    process::{Command, Stdio},
    time::{Duration, Instant},
};

use anyhow::{Context as _, Result, bail};

use crate::{Built, cargo, checked, count_results, setup, target_dir};

/// The Debian 12 (bookworm) generic kernel packages: `linux-image-6.1.0-<abi>-amd64-unsigned`. The
/// `-cloud-` flavour lacks 9p and cannot see the host's files.
const DEFAULT_KERNEL_PREFIX: &str = "linux-image-6.1.0-";
const DEFAULT_KERNEL_SUFFIX: &str = "-amd64-unsigned";
/// Debian 12's codename, for the private apt source used when the host's sources have no bookworm.
const BOOKWORM: &str = "bookworm";
/// The guest's size: as many CPUs as the machine has (2), and room for the tests' processes.
const GUEST_CPUS: &str = "2";
const GUEST_MEMORY: &str = "2G";
/// How many times slower than the host the tests run in the guest (QEMU's TCG emulates the CPU): the
/// harness stretches its waits and shrinks its load tests by this (`CAPTURE_TEST_TIME_SCALE`).
const GUEST_TIME_SCALE: u32 = 10;
/// Written by the guest after the last test binary; without it the run did not finish.
const DONE_MARKER: &str = "vm: all test binaries ran";

/// One test executable and the directory cargo would run it in (its package's).
struct TestBinary {
    name: String,
    exe: PathBuf,
    cwd: PathBuf,
}

/// Boots `kernel` (a Debian package name or a bzImage path; Debian 12's generic kernel by default) and
/// runs the test binaries in it (only `filter`'s, as `cargo xtask test <filter>` does), within `timeout`.
pub fn run(built: &Built, kernel: Option<&str>, filter: Option<&str>, timeout: Duration) -> Result<()> {
    setup::ensure_vm()?;
    let tests = test_binaries(filter)?;
    let image = match kernel {
        Some(k) if Path::new(k).is_file() => PathBuf::from(k),
        Some(package) => debian_kernel(package)?,
        None => debian_kernel(&default_kernel_package()?)?,
    };
    let dir = target_dir().join("vm/run");
    if dir.exists() {
        fs::remove_dir_all(&dir).with_context(|| format!("remove {}", dir.display()))?;
    }
    fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;
    let script = dir.join("guest.sh");
    fs::write(&script, guest_script(built, &tests, filter, &dir)).context("write the guest's script")?;
    make_executable(&script)?;

    println!(
        "vm: booting {} under QEMU (TCG, {GUEST_CPUS} CPUs, {GUEST_MEMORY}); {} test binaries; timeout {} min",
        image.display(),
        tests.len(),
        timeout.as_secs() / 60
    );
    let console = fs::File::create(dir.join("console.log")).context("create console.log")?;
    let mut vng = Command::new(setup::vng());
    vng.arg("--run")
        .arg(&image)
        .args(["--disable-kvm", "--force-9p", "--force-initramfs", "--verbose"])
        .args(["--cpus", GUEST_CPUS, "--memory", GUEST_MEMORY])
        .arg(format!("--rwdir={}", dir.display()))
        .arg("--exec")
        .arg(&script)
        .stdin(Stdio::null())
        .stdout(console.try_clone()?)
        .stderr(console)
        // Its own process group, so a timeout ends QEMU too.
        .process_group(0);
    let started = Instant::now();
    let mut child = vng.spawn().context("start vng")?;
    let output = dir.join("output.txt");
    let mut shown = 0u64;
    let timed_out = loop {
        let before = shown;
        shown = show_new(&output, shown)?;
        if before == 0 && shown > 0 {
            println!("vm: the guest was up {} s after the start", started.elapsed().as_secs());
        }
        if child.try_wait().context("wait for vng")?.is_some() {
            break false;
        }
        if started.elapsed() > timeout {
            // SAFETY: kill(2) on the process group vng leads; no memory is involved.
            unsafe { libc::kill(-(child.id() as i32), libc::SIGKILL) };
            let _ = child.wait();
            break true;
        }
        std::thread::sleep(Duration::from_secs(1));
    };
    show_new(&output, shown)?;
    let text = fs::read_to_string(&output).unwrap_or_default();
    let (passed, failed) = count_results(text.lines());
    let failed_binaries: Vec<&str> = text
        .lines()
        .filter_map(|l| {
            let mut words = l.strip_prefix("vm: exit ")?.split(' ');
            let (name, status) = (words.next()?, words.next()?);
            (status != "0").then_some(name)
        })
        .collect();
    println!(
        "vm: {} in {} s (guest console: {})",
        if timed_out { "timed out" } else { "finished" },
        started.elapsed().as_secs(),
        dir.join("console.log").display()
    );
    println!("{passed} passed, {failed} failed");
    if timed_out {
        bail!("the VM run did not finish within {} min", timeout.as_secs() / 60);
    }
    if !text.contains(DONE_MARKER) {
        bail!(
            "the guest stopped before running every test binary; see {}",
            dir.join("console.log").display()
        );
    }
    if !failed_binaries.is_empty() || failed > 0 {
        bail!("failed in the VM: {}", failed_binaries.join(", "));
    }
    Ok(())
}

/// Prints what `path` has past `from`; returns the new offset.
fn show_new(path: &Path, from: u64) -> Result<u64> {
    let Ok(mut file) = fs::File::open(path) else {
        return Ok(from);
    };
    file.seek(SeekFrom::Start(from))?;
    let mut new = Vec::new();
    file.read_to_end(&mut new)?;
    std::io::stdout().write_all(&new)?;
    std::io::stdout().flush()?;
    Ok(from + new.len() as u64)
}

fn make_executable(path: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt as _;
    fs::set_permissions(path, fs::Permissions::from_mode(0o755)).with_context(|| format!("chmod {}", path.display()))
}

/// The test file run against a real API server (`tests/tests/kubernetes.rs`).
const KUBERNETES_TESTS: &str = "kubernetes";
/// Test targets the guest cannot run: the image test runs podman, whose storage under the target
/// directory the guest sees read-only.
const HOST_ONLY: &[&str] = &["image"];

/// Builds every test target (as `cargo xtask test` would run them) and lists the executables, leaving out
/// [`HOST_ONLY`]'s, and [`KUBERNETES_TESTS`] unless `filter` names it.
fn test_binaries(filter: Option<&str>) -> Result<Vec<TestBinary>> {
    let mut cmd = cargo();
    cmd.args(["test", "--no-run", "--message-format=json-render-diagnostics"]);
    match filter {
        Some(f) if crate::is_test_file(f) => cmd.args(["--package", "tests", "--test", f]),
        _ => cmd.arg("--all-targets"),
    };
    let out = cmd.stderr(Stdio::inherit()).output().context("cargo test --no-run")?;
    if !out.status.success() {
        bail!("building the tests failed");
    }
    let mut tests = Vec::new();
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let Ok(msg) = serde_json::from_str::<serde_json::Value>(line) else {
            continue;
        };
        let (Some(exe), Some(manifest), Some(name)) = (
            msg["executable"].as_str(),
            msg["manifest_path"].as_str(),
            msg["target"]["name"].as_str(),
        ) else {
            continue;
        };
        if HOST_ONLY.contains(&name) {
            println!("vm: leaving out {name}: it runs only under `cargo xtask test`");
            continue;
        }
        // The real API server's tests exercise Kubernetes, not the kernel, and its start alone takes minutes
        // under emulation: only when asked for by name.
        let asked = filter == Some(KUBERNETES_TESTS);
        if name == KUBERNETES_TESTS && !asked {
            continue;
        }
        if msg["reason"] == "compiler-artifact" && msg["profile"]["test"] == true {
            tests.push(TestBinary {
                name: name.to_owned(),
                exe: exe.into(),
                cwd: Path::new(manifest).parent().unwrap_or(Path::new("/")).to_owned(),
            });
        }
    }
    if tests.is_empty() {
        bail!("no test binaries were built");
    }
    Ok(tests)
}

/// The guest's script: each test binary in turn, its output appended to output.txt with its exit status.
fn guest_script(built: &Built, tests: &[TestBinary], filter: Option<&str>, dir: &Path) -> String {
    let apiserver = crate::apiserver::binaries();
    let quote = |s: &str| format!("'{}'", s.replace('\'', r"'\''"));
    let out = quote(&dir.join("output.txt").display().to_string());
    let filter = match filter {
        Some(f) if !crate::is_test_file(f) => quote(f),
        _ => String::new(),
    };
    let mut script = format!(
        "#!/bin/sh\n\
         # Written by `cargo xtask vm`; runs inside the guest.\n\
         export PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin RUST_BACKTRACE=1\n\
         export CAPTURE_BIN={} CAPTURE_PROBE_BIN={} CAPTURE_HELM={} CAPTURE_TEST_TIME_SCALE={GUEST_TIME_SCALE}\n\
         export CAPTURE_KUBE_APISERVER={} CAPTURE_ETCD={}\n\
         echo \"vm: kernel $(uname -r)\" >> {out}\n",
        quote(&built.capture.display().to_string()),
        quote(&built.probe.display().to_string()),
        quote(&crate::setup::helm().display().to_string()),
        quote(&apiserver.kube_apiserver.display().to_string()),
        quote(&apiserver.etcd.display().to_string()),
    );
    for t in tests {
        script.push_str(&format!(
            "echo \"vm: running {name}\" >> {out}\n\
             start=$(date +%s)\n\
             (cd {cwd} && {exe} {filter}) >> {out} 2>&1\n\
             echo \"vm: exit {name} $? after $(( $(date +%s) - start )) s\" >> {out}\n",
            name = t.name,
            cwd = quote(&t.cwd.display().to_string()),
            exe = quote(&t.exe.display().to_string()),
        ));
    }
    script.push_str(&format!("echo {} >> {out}\n", quote(DONE_MARKER)));
    script
}

/// Debian 12's newest generic kernel package: from the host's apt sources if they have bookworm, else
/// from a private apt source for bookworm (see [`apt`]).
fn default_kernel_package() -> Result<String> {
    let pattern = format!(
        "^{}[0-9]+{}$",
        DEFAULT_KERNEL_PREFIX.replace('.', r"\."),
        DEFAULT_KERNEL_SUFFIX
    );
    let newest = |apt_args: &[String]| -> Result<Option<String>> {
        let out = Command::new("apt-cache")
            .args(apt_args)
            .args(["search", "--names-only", &pattern])
            .output()
            .context("apt-cache search")?;
        Ok(String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.split_whitespace().next())
            .max_by_key(|name| {
                name.strip_prefix(DEFAULT_KERNEL_PREFIX)
                    .and_then(|r| r.strip_suffix(DEFAULT_KERNEL_SUFFIX))
                    .and_then(|abi| abi.parse::<u32>().ok())
                    .unwrap_or(0)
            })
            .map(str::to_owned))
    };
    if let Some(name) = newest(&[])? {
        return Ok(name);
    }
    let private = apt()?;
    newest(&private)?.context("no Debian 12 generic kernel package found, even in a bookworm apt source")
}

/// apt options for downloads: none if the host's sources have bookworm, else a private apt directory
/// (under target/vm/apt) whose only sources are the host's Debian sources switched to bookworm, updated
/// once. The host's own apt configuration is left alone.
fn apt() -> Result<Vec<String>> {
    let has_bookworm = Command::new("apt-cache")
        .args(["policy"])
        .output()
        .is_ok_and(|o| String::from_utf8_lossy(&o.stdout).contains(&format!("n={BOOKWORM},")));
    if has_bookworm {
        return Ok(Vec::new());
    }
    let dir = target_dir().join("vm/apt");
    let lists = dir.join("lists");
    fs::create_dir_all(lists.join("partial"))?;
    fs::create_dir_all(dir.join("cache/archives/partial"))?;
    let sources = dir.join("bookworm.sources");
    let args = vec![
        format!("-o=Dir::Etc::SourceList={}", sources.display()),
        "-o=Dir::Etc::SourceParts=-".to_owned(),
        format!("-o=Dir::State::Lists={}", lists.display()),
        format!("-o=Dir::Cache={}", dir.join("cache").display()),
    ];
    if !sources.exists() {
        fs::write(&sources, bookworm_sources()?).context("write the bookworm apt source")?;
        checked(Command::new("apt-get").args(&args).args(["update", "-qq"]))?;
        println!(
            "setup: added a private apt source for Debian 12 (bookworm) in {}",
            dir.display()
        );
    }
    Ok(args)
}

/// The host's Debian apt sources (deb822 `.sources` files), with every suite switched to bookworm's.
fn bookworm_sources() -> Result<String> {
    let mut out = String::new();
    for entry in fs::read_dir("/etc/apt/sources.list.d").context("read /etc/apt/sources.list.d")? {
        let path = entry?.path();
        if path.extension().is_none_or(|e| e != "sources") {
            continue;
        }
        let text = fs::read_to_string(&path)?;
        if text.contains("debian-archive-keyring") {
            out.push_str(&switch_suites(&text, BOOKWORM));
            out.push('\n');
        }
    }
    if out.trim().is_empty() {
        bail!("no Debian apt source (deb822, signed by the Debian archive keyring) to derive a bookworm one from");
    }
    Ok(out)
}

/// A deb822 apt source with every suite switched to `codename`'s (`trixie-security` → `bookworm-security`).
fn switch_suites(deb822: &str, codename: &str) -> String {
    let mut out = String::new();
    for line in deb822.lines() {
        match line.split_once(':') {
            Some(("Suites", suites)) => {
                let switched: Vec<String> = suites
                    .split_whitespace()
                    .map(|s| match s.split_once('-') {
                        Some((_, tail)) => format!("{codename}-{tail}"),
                        None => codename.to_owned(),
                    })
                    .collect();
                out.push_str(&format!("Suites: {}\n", switched.join(" ")));
            }
            _ => {
                out.push_str(line);
                out.push('\n');
            }
        }
    }
    out
}

/// Downloads and unpacks Debian kernel `package` (once, under target/vm/kernels), installs its modules in
/// /lib/modules/<version> where the guest looks for them, and returns its bzImage.
fn debian_kernel(package: &str) -> Result<PathBuf> {
    let dir = target_dir().join("vm/kernels").join(package);
    let root = dir.join("root");
    let find_image = || -> Option<PathBuf> {
        fs::read_dir(root.join("boot"))
            .ok()?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("vmlinuz-"))
            })
    };
    if find_image().is_none() {
        setup::unpack_deb(package, &apt()?, &dir)?;
        println!("setup: downloaded {package} (apt-get download) into {}", dir.display());
    }
    let image = find_image().with_context(|| format!("{package} has no /boot/vmlinuz-*"))?;
    let version = image
        .file_name()
        .and_then(|n| n.to_string_lossy().strip_prefix("vmlinuz-").map(str::to_owned))
        .context("kernel version")?;
    let modules = Path::new("/lib/modules").join(&version);
    if !modules.join("modules.dep").exists() {
        if modules.exists() {
            fs::remove_dir_all(&modules).with_context(|| format!("remove the partial {}", modules.display()))?;
        }
        fs::create_dir_all("/lib/modules")?;
        checked(
            Command::new("cp")
                .arg("-a")
                .arg(root.join("lib/modules").join(&version))
                .arg(&modules),
        )?;
        checked(Command::new("depmod").args(["-a", &version]))?;
        println!("setup: installed the modules of {version} in {}", modules.display());
    }
    Ok(image)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_trixie_source_becomes_a_bookworm_one() {
        let trixie = "Types: deb\nURIs: http://mirror.example/debian\nSuites: trixie trixie-updates\n\
                      Components: main\nSigned-By: /usr/share/keyrings/debian-archive-keyring.gpg\n\n\
                      Types: deb\nURIs: http://mirror.example/debian-security\nSuites: trixie-security\n";
        let bookworm = switch_suites(trixie, BOOKWORM);
        assert!(bookworm.contains("Suites: bookworm bookworm-updates\n"), "{bookworm}");
        assert!(bookworm.contains("Suites: bookworm-security\n"), "{bookworm}");
        assert!(
            bookworm.contains("URIs: http://mirror.example/debian-security\n"),
            "{bookworm}"
        );
        assert!(!bookworm.contains("trixie"), "{bookworm}");
    }

    #[test]
    fn the_guest_script_runs_every_binary_in_its_package_and_marks_the_end() {
        let built = Built {
            capture: "/t/capture".into(),
            probe: "/t/capture-probe".into(),
        };
        let tests = [TestBinary {
            name: "outbound_diff".into(),
            exe: "/t/deps/outbound_diff-1".into(),
            cwd: "/w/tests".into(),
        }];
        let script = guest_script(&built, &tests, Some("ipv6"), Path::new("/t/vm/run"));
        assert!(
            script.contains("(cd '/w/tests' && '/t/deps/outbound_diff-1' 'ipv6') >> '/t/vm/run/output.txt'"),
            "{script}"
        );
        assert!(script.contains("CAPTURE_TEST_TIME_SCALE=10"), "{script}");
        assert!(
            script
                .trim_end()
                .ends_with(&format!("echo '{DONE_MARKER}' >> '/t/vm/run/output.txt'")),
            "{script}"
        );
    }
}
