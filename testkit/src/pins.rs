//! A private bpffs mount per test for capture's pins ([`BpfPins`]), unpinned and unmounted on drop.

use std::{path::PathBuf, process::Command, time::Duration};

use crate::{run, unique};

/// A private bpffs for one test's `capture --backend ebpf --pin-dir`: mounted on a fresh directory under
/// /run, so tests neither share nor disturb /sys/fs/bpf (nor leave a bpffs mounted there). On drop,
/// whatever is still pinned is unpinned (links too, which detaches the programs) and the bpffs unmounted.
pub struct BpfPins {
    mount: PathBuf,
    dir: PathBuf,
}

impl BpfPins {
    /// Mounts the bpffs; the pin directory inside it does not exist yet (capture creates it).
    pub fn new(tag: &str) -> BpfPins {
        let mount = PathBuf::from("/run/capture-tests").join(unique(tag));
        std::fs::create_dir_all(&mount).unwrap_or_else(|e| panic!("create {}: {e}", mount.display()));
        run(Command::new("mount").args(["-t", "bpf", "bpf"]).arg(&mount));
        let dir = mount.join("capture");
        BpfPins { mount, dir }
    }

    /// The pin directory to give capture.
    pub fn path(&self) -> &std::path::Path {
        &self.dir
    }
}

impl Drop for BpfPins {
    fn drop(&mut self) {
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for entry in entries.flatten() {
                let _ = std::fs::remove_file(entry.path());
            }
        }
        let _ = std::fs::remove_dir(&self.dir);
        // The kernel may still be releasing what was pinned: retry, then detach lazily as a last resort.
        let unmounted = (0..20).any(|_| {
            let ok = Command::new("umount")
                .arg(&self.mount)
                .stderr(std::process::Stdio::null())
                .status()
                .is_ok_and(|s| s.success());
            if !ok {
                std::thread::sleep(Duration::from_millis(50));
            }
            ok
        });
        if !unmounted {
            let _ = Command::new("umount").arg("-l").arg(&self.mount).status();
        }
        let _ = std::fs::remove_dir(&self.mount);
    }
}
