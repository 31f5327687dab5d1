//! The bpf(2) link commands the loader needs and aya 0.14 does not offer for every program type: create a
//! cgroup link for a loaded program, pin it so the attachment outlives the loader, open a pinned link, and
//! swap the program behind a link (a new loader replaces the programs with no moment unattached); and
//! attach a program to a pinned sockhash, which aya would detach again when the loader exits.

use std::{
    ffi::CString,
    io,
    os::fd::{AsRawFd, BorrowedFd, FromRawFd, OwnedFd},
    path::Path,
};

/// bpf(2) commands (include/uapi/linux/bpf.h).
const BPF_OBJ_PIN: libc::c_long = 6;
const BPF_OBJ_GET: libc::c_long = 7;
const BPF_PROG_ATTACH: libc::c_long = 8;
const BPF_LINK_CREATE: libc::c_long = 28;
const BPF_LINK_UPDATE: libc::c_long = 29;

/// Attach types (enum bpf_attach_type) of the hooks capture uses.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u32)]
pub enum AttachType {
    /// BPF_CGROUP_SOCK_OPS.
    SockOps = 3,
    /// BPF_SK_MSG_VERDICT (attached to a sockhash).
    SkMsgVerdict = 7,
    /// BPF_CGROUP_INET4_CONNECT.
    Connect4 = 10,
    /// BPF_CGROUP_INET6_CONNECT.
    Connect6 = 11,
    /// BPF_CGROUP_UDP4_SENDMSG.
    Sendmsg4 = 14,
    /// BPF_CGROUP_UDP6_SENDMSG.
    Sendmsg6 = 15,
    /// BPF_CGROUP_UDP4_RECVMSG.
    Recvmsg4 = 19,
    /// BPF_CGROUP_UDP6_RECVMSG.
    Recvmsg6 = 20,
    /// BPF_CGROUP_GETSOCKOPT.
    GetSockopt = 21,
    /// BPF_SK_LOOKUP (attached to a network namespace).
    SkLookup = 36,
}

/// `union bpf_attr`, as a zeroed buffer big enough for the commands used here; the kernel requires every
/// byte past the fields it knows to be zero.
#[repr(C, align(8))]
struct Attr([u8; 64]);

fn bpf(cmd: libc::c_long, attr: &mut Attr) -> io::Result<libc::c_long> {
    // SAFETY: `attr` is a valid, initialised buffer of the size passed.
    let rc = unsafe { libc::syscall(libc::SYS_bpf, cmd, attr.0.as_mut_ptr(), size_of::<Attr>()) };
    if rc < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(rc)
    }
}

fn put_u32(attr: &mut Attr, offset: usize, value: u32) {
    attr.0[offset..offset + 4].copy_from_slice(&value.to_ne_bytes());
}

/// Attaches `prog` to `target` (a cgroup directory, or a network namespace for sk_lookup) with a BPF link
/// (multi-attach: other programs on the same hook keep running). Kernel ≥ 5.7 (5.9 for sk_lookup).
pub fn link_create(prog: BorrowedFd<'_>, target: BorrowedFd<'_>, attach: AttachType) -> io::Result<OwnedFd> {
    let mut attr = Attr([0; 64]);
    // link_create: prog_fd, target_fd, attach_type, flags.
    put_u32(&mut attr, 0, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 4, target.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach as u32);
    let fd = bpf(BPF_LINK_CREATE, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Attaches `prog` to the sockhash `map` (sk_msg). The attachment lives as long as the map; attaching again
/// replaces the program atomically. (BPF links for sockmap programs only came in Linux 6.10.)
pub fn map_attach(prog: BorrowedFd<'_>, map: BorrowedFd<'_>, attach: AttachType) -> io::Result<()> {
    let mut attr = Attr([0; 64]);
    // prog_attach: target_fd, attach_bpf_fd, attach_type, attach_flags.
    put_u32(&mut attr, 0, map.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    put_u32(&mut attr, 8, attach as u32);
    bpf(BPF_PROG_ATTACH, &mut attr).map(drop)
}

fn c_path(path: &Path) -> io::Result<CString> {
    CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path contains NUL"))
}

/// Pins the BPF object `fd` (here, a link) at `path` on a bpffs.
pub fn obj_pin(fd: BorrowedFd<'_>, path: &Path) -> io::Result<()> {
    let c_path = c_path(path)?;
    let mut attr = Attr([0; 64]);
    // obj_pin: pathname (u64 pointer), bpf_fd, file_flags.
    attr.0[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    put_u32(&mut attr, 8, fd.as_raw_fd() as u32);
    bpf(BPF_OBJ_PIN, &mut attr).map(drop)
}

/// Opens the BPF object pinned at `path`.
pub fn obj_get(path: &Path) -> io::Result<OwnedFd> {
    let c_path = c_path(path)?;
    let mut attr = Attr([0; 64]);
    attr.0[0..8].copy_from_slice(&(c_path.as_ptr() as u64).to_ne_bytes());
    let fd = bpf(BPF_OBJ_GET, &mut attr)?;
    // SAFETY: the kernel returned a new file descriptor that nothing else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd as i32) })
}

/// Makes `link` run `prog` instead of its current program, atomically.
pub fn link_update(link: BorrowedFd<'_>, prog: BorrowedFd<'_>) -> io::Result<()> {
    let mut attr = Attr([0; 64]);
    // link_update: link_fd, new_prog_fd, flags, old_prog_fd.
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, prog.as_raw_fd() as u32);
    bpf(BPF_LINK_UPDATE, &mut attr).map(drop)
}
