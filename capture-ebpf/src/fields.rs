//! Reading kernel context and socket fields the way the verifier accepts.

/// Reads the four words of an IPv6 address field of a context or socket, one volatile load each: the
/// verifier only accepts loads at a constant offset from the context or socket pointer and rejects any
/// derived pointer, which is what copying the array (as aya's `local_ip6()` does) compiles to.
#[inline(always)]
pub fn words(field: &[u32; 4]) -> [u32; 4] {
    // SAFETY: each pointer is to a u32 of the kernel's context, valid for the program's lifetime.
    unsafe {
        [
            core::ptr::read_volatile(&field[0]),
            core::ptr::read_volatile(&field[1]),
            core::ptr::read_volatile(&field[2]),
            core::ptr::read_volatile(&field[3]),
        ]
    }
}
