//! Every map the kernel programs use, with its key, value, size and writer.

use aya_ebpf::{macros::map, maps::PerCpuArray};
use capture_common::counters::COUNTER_SLOTS;

/// Event counters.
/// - key: `u32` slot, a `capture_common::counters::Counter` discriminant
/// - value: `u64` count, per CPU (summed by the reader)
/// - size: `COUNTER_SLOTS`
/// - written by: the kernel programs; read by `capture status`.
#[map]
pub static COUNTERS: PerCpuArray<u64> = PerCpuArray::with_max_entries(COUNTER_SLOTS, 0);

/// Adds one to `counter`.
#[inline(always)]
pub fn bump(counter: capture_common::counters::Counter) {
    if let Some(slot) = COUNTERS.get_ptr_mut(counter.index()) {
        // SAFETY: the pointer is this CPU's slot of a live map value; no other program touches it concurrently.
        unsafe { *slot += 1 };
    }
}
