//! Binaries the kit runs as another user (the app's uid 1000, the proxy's 1337): that user must be able to
//! reach them. A checkout in root's home (mode 0700) or in a `mktemp -d` folder is not reachable, so a binary
//! there is hard-linked (or copied, across filesystems) once per process into a directory under the temp dir
//! that every user can enter, and that directory is removed when the process exits.

use std::{
    collections::HashMap,
    os::unix::fs::{DirBuilderExt as _, PermissionsExt as _},
    path::{Path, PathBuf},
    sync::{Mutex, OnceLock},
};

/// The permission bit "others may search this directory / execute this file".
const OTHER_X: u32 = 0o001;

/// Why a user who is neither `path`'s owner nor in its group cannot execute it (a file) or enter it (a
/// directory), if they cannot: the first directory on the way (as given and after resolving links) that
/// others may not search, or the file itself.
pub fn unreachable_by_others(path: &Path) -> Option<String> {
    let given = std::path::absolute(path).unwrap_or_else(|_| path.to_owned());
    let real = std::fs::canonicalize(path).unwrap_or_else(|_| given.clone());
    for chain in [&given, &real] {
        // Outermost first, so the message names the directory that actually blocks the way.
        for p in chain.ancestors().collect::<Vec<_>>().into_iter().rev() {
            let meta = match std::fs::metadata(p) {
                Ok(m) => m,
                Err(e) => return Some(format!("{}: {e}", p.display())),
            };
            let mode = meta.permissions().mode();
            if mode & OTHER_X == 0 {
                let what = if meta.is_dir() {
                    "not searchable"
                } else {
                    "not executable"
                };
                return Some(format!(
                    "{} (mode {:o}) is {what} by other users",
                    p.display(),
                    mode & 0o7777
                ));
            }
        }
    }
    None
}

/// `bin` if every user can execute it where it is, else the same program in this process's shared directory
/// (made on first use, removed at exit). Panics with one line if that cannot be done, naming why.
pub fn runnable_by_all(bin: &Path) -> PathBuf {
    if unreachable_by_others(bin).is_none() {
        return bin.to_owned();
    }
    static SHARED: Mutex<Option<HashMap<PathBuf, PathBuf>>> = Mutex::new(None);
    let mut shared = SHARED.lock().unwrap_or_else(|e| e.into_inner());
    let shared = shared.get_or_insert_default();
    if let Some(path) = shared.get(bin) {
        return path.clone();
    }
    let name = bin
        .file_name()
        .unwrap_or_else(|| panic!("{} names no file", bin.display()));
    let path = shared_dir().join(name);
    let _ = std::fs::remove_file(&path);
    let executable = std::fs::metadata(bin).is_ok_and(|m| m.permissions().mode() & OTHER_X != 0);
    // A hard link is instant (debug binaries are 100+ MB) and keeps the mode; it needs the same filesystem
    // and a file others may already execute.
    if !(executable && std::fs::hard_link(bin, &path).is_ok()) {
        std::fs::copy(bin, &path)
            .and_then(|_| std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o755)))
            .unwrap_or_else(|e| panic!("copy {} to {} for other users: {e}", bin.display(), path.display()));
    }
    if let Some(why) = unreachable_by_others(&path) {
        panic!("{} cannot be shared with other users: {why}", bin.display());
    }
    shared.insert(bin.to_owned(), path.clone());
    path
}

/// This process's directory for binaries shared with other users: `$TMPDIR/capture-tests-bin-<pid>`, mode
/// 0755, removed at exit. Panics with one line if other users could not enter it.
fn shared_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("capture-tests-bin-{}", std::process::id()));
        // A leftover of an earlier process with the same pid.
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::DirBuilder::new()
            .mode(0o755)
            .create(&dir)
            .and_then(|()| std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)))
            .unwrap_or_else(|e| panic!("create {}: {e}", dir.display()));
        if let Some(why) = unreachable_by_others(&dir) {
            let _ = std::fs::remove_dir(&dir);
            panic!("cannot share test binaries with other users: {why}; set TMPDIR to a directory all can enter");
        }
        extern "C" fn remove_shared_dir() {
            if let Some(dir) = DIR.get() {
                let _ = std::fs::remove_dir_all(dir);
            }
        }
        // SAFETY: registers a plain function, which only removes the directory, to run at exit.
        unsafe { libc::atexit(remove_shared_dir) };
        dir
    })
}

#[cfg(test)]
mod tests {
    use std::{os::unix::fs::DirBuilderExt as _, path::Path, process::Command};

    use super::{runnable_by_all, unreachable_by_others};

    /// A checkout in a 0700 folder (root's home, `mktemp -d`): the binary is shared, and another user can
    /// run the shared one — as root, actually runs it as `nobody`, which starts in `/` (see `run_as`).
    #[test]
    fn a_binary_in_a_private_folder_is_shared_with_other_users() {
        let private = std::env::temp_dir().join(format!("capture-private-{}", std::process::id()));
        std::fs::DirBuilder::new().mode(0o700).create(&private).unwrap();
        let bin = private.join("pwd");
        std::fs::copy("/bin/pwd", &bin).unwrap();
        let why = unreachable_by_others(&bin).expect("a 0700 folder blocks other users");
        assert!(why.starts_with(&format!("{} (mode 700)", private.display())), "{why}");

        let shared = runnable_by_all(&bin);
        assert_ne!(shared, bin);
        assert_eq!(unreachable_by_others(&shared), None);
        for dir in shared.ancestors().skip(1) {
            use std::os::unix::fs::PermissionsExt as _;
            let mode = std::fs::metadata(dir).unwrap().permissions().mode();
            assert_ne!(mode & 0o001, 0, "{} is not searchable by others", dir.display());
        }
        assert_eq!(runnable_by_all(&bin), shared, "shared once per process");
        if nix::unistd::geteuid().is_root() {
            let mut cmd = Command::new(&shared);
            crate::run_as(&mut cmd, (65534, 65534));
            let out = cmd.output().expect("run the shared binary as nobody");
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            assert_eq!(String::from_utf8_lossy(&out.stdout), "/\n");
        }
        std::fs::remove_dir_all(&private).unwrap();
    }

    #[test]
    fn a_system_binary_is_used_where_it_is() {
        assert_eq!(runnable_by_all(Path::new("/bin/true")), Path::new("/bin/true"));
    }
}
