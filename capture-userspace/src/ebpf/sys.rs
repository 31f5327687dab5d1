//! The bpf(2) link commands the loader needs and aya 0.14 does not offer for every program type: create a
//! cgroup link for a loaded program, pin it so the attachment outlives the loader, open a pinned link, and
//! swap the program behind a link (a new loader replaces the programs with no moment unattached); attach a
//! program to a pinned sockhash, which aya would detach again when the loader exits; and list the programs
//! attached to a cgroup, with the cgroup's attach flags (aya 0.14 keeps its query private), and the cgroup a
//! link is attached to. Public for the test kit, whose hand-assembled programs attach the same way.

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
const BPF_OBJ_GET_INFO_BY_FD: libc::c_long = 15;
const BPF_PROG_QUERY: libc::c_long = 16;
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

/// `BPF_F_ALLOW_OVERRIDE`: a program attached so gives way to one attached below it.
pub const BPF_F_ALLOW_OVERRIDE: u32 = 1;
/// `BPF_F_ALLOW_MULTI`: programs attached so run with those of the cgroups below (every BPF link is).
pub const BPF_F_ALLOW_MULTI: u32 = 2;

/// What is attached directly to one cgroup on one hook: the cgroup's attach flags for it (0, or
/// `BPF_F_ALLOW_OVERRIDE` / `BPF_F_ALLOW_MULTI`) and the ids of its programs, in the order they run.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Attached {
    pub flags: u32,
    pub ids: Vec<u32>,
}

/// The programs attached directly to the cgroup `cgroup` (not those it inherits) on hook `attach`.
pub fn prog_query(cgroup: BorrowedFd<'_>, attach: AttachType) -> io::Result<Attached> {
    /// More than any cgroup hook holds in practice; the kernel says ENOSPC, with the count, if not.
    const MAX_IDS: usize = 64;
    let mut ids = [0u32; MAX_IDS];
    let mut attr = Attr([0; 64]);
    // query: target_fd, attach_type, query_flags, attach_flags (out), prog_ids, prog_cnt (in and out).
    put_u32(&mut attr, 0, cgroup.as_raw_fd() as u32);
    put_u32(&mut attr, 4, attach as u32);
    attr.0[16..24].copy_from_slice(&(ids.as_mut_ptr() as u64).to_ne_bytes());
    put_u32(&mut attr, 24, MAX_IDS as u32);
    bpf(BPF_PROG_QUERY, &mut attr)?;
    let get = |offset: usize| u32::from_ne_bytes(attr.0[offset..offset + 4].try_into().expect("4 bytes"));
    let count = (get(24) as usize).min(MAX_IDS);
    Ok(Attached {
        flags: get(12),
        ids: ids[..count].to_vec(),
    })
}

/// The id of the cgroup a cgroup link is attached to (`struct bpf_link_info`'s `cgroup.cgroup_id`): the
/// cgroup directory's inode number. 0 once the cgroup is gone.
pub fn link_cgroup_id(link: BorrowedFd<'_>) -> io::Result<u64> {
    /// `struct bpf_link_info`: type, id, prog_id, then (8-aligned) the cgroup link's cgroup_id and
    /// attach_type; room for the kernel's larger unions.
    const CGROUP_ID_OFFSET: usize = 16;
    let mut info = [0u8; 64];
    let mut attr = Attr([0; 64]);
    // info: bpf_fd, info_len, info (u64 pointer).
    put_u32(&mut attr, 0, link.as_raw_fd() as u32);
    put_u32(&mut attr, 4, info.len() as u32);
    attr.0[8..16].copy_from_slice(&(info.as_mut_ptr() as u64).to_ne_bytes());
    bpf(BPF_OBJ_GET_INFO_BY_FD, &mut attr)?;
    Ok(u64::from_ne_bytes(
        info[CGROUP_ID_OFFSET..CGROUP_ID_OFFSET + 8]
            .try_into()
            .expect("8 bytes"),
    ))
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

/// bpf(2) `BPF_PROG_LOAD`, and the sk_lookup program type and attach type it needs here.
const BPF_PROG_LOAD: libc::c_long = 5;
const BPF_PROG_TYPE_SK_LOOKUP: u32 = 30;
/// Where `ingress_ifindex` sits in `struct bpf_sk_lookup` (Linux 5.17).
pub const SK_LOOKUP_INGRESS_IFINDEX: i16 = 64;

/// Whether an sk_lookup program may read the 32-bit context field at `offset`: loads a three-instruction
/// program that reads it and returns SK_PASS, and closes it. The verifier rejects a read of a field the
/// kernel does not have, so this probes context fields that no helper probe covers.
pub fn sk_lookup_reads_field(offset: i16) -> bool {
    /// `struct bpf_insn`: opcode, dst/src registers, offset, immediate.
    fn insn(code: u8, dst: u8, src: u8, off: i16, imm: i32) -> [u8; 8] {
        let mut b = [0u8; 8];
        b[0] = code;
        b[1] = (src << 4) | dst;
        b[2..4].copy_from_slice(&off.to_ne_bytes());
        b[4..8].copy_from_slice(&imm.to_ne_bytes());
        b
    }
    // r2 = *(u32 *)(r1 + offset); r0 = 1 (SK_PASS); exit.
    let program = [
        insn(0x61, 2, 1, offset, 0),
        insn(0xb7, 0, 0, 0, 1),
        insn(0x95, 0, 0, 0, 0),
    ];
    let license = c"GPL";
    #[repr(C, align(8))]
    struct ProgLoadAttr([u8; 128]);
    let mut attr = ProgLoadAttr([0; 128]);
    let mut put = |offset: usize, bytes: &[u8]| attr.0[offset..offset + bytes.len()].copy_from_slice(bytes);
    // prog_load: prog_type, insn_cnt, insns, license, …, expected_attach_type at 68.
    put(0, &BPF_PROG_TYPE_SK_LOOKUP.to_ne_bytes());
    put(4, &(program.len() as u32).to_ne_bytes());
    put(8, &(program.as_ptr() as u64).to_ne_bytes());
    put(16, &(license.as_ptr() as u64).to_ne_bytes());
    put(68, &(AttachType::SkLookup as u32).to_ne_bytes());
    // SAFETY: `attr` is a valid, initialised buffer of the size passed, and the pointers in it (the
    // instructions, the license) outlive the call.
    let fd = unsafe {
        libc::syscall(
            libc::SYS_bpf,
            BPF_PROG_LOAD,
            attr.0.as_mut_ptr(),
            size_of::<ProgLoadAttr>(),
        )
    };
    if fd < 0 {
        return false;
    }
    // SAFETY: the kernel returned a new file descriptor that nothing else owns; dropping it closes it.
    drop(unsafe { OwnedFd::from_raw_fd(fd as i32) });
    true
}
