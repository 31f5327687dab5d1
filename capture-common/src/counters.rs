//! Per-namespace counters, kept per CPU by the kernel programs and summed by `capture status`.

/// What a namespace's counters count. The discriminant is the index in [`NetnsCounters::0`].
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// Outbound connections redirected to the proxy (proxy→pod IP and DNS included).
    Redirected = 0,
    /// Connections judged and left alone.
    Passed = 1,
    /// `SO_ORIGINAL_DST` answered.
    OrigDstLookups = 2,
    /// `SO_ORIGINAL_DST` asked for a connection we did not redirect (left to the kernel).
    OrigDstMisses = 3,
    /// Sockets joined to loopback acceleration (`--loopback-accel`), both ends of a pair counting.
    Accelerated = 4,
    /// Accelerated sockets whose send found no peer to hand data to, and went back to TCP for good.
    AccelFallbacks = 5,
    /// Of the redirected: DNS to the DNS proxy (TCP connections and UDP sockets).
    Dns = 6,
    /// Inbound connections handed to the proxy's listener (sk_lookup).
    Inbound = 7,
    /// Inbound connections for the proxy that found it not listening, and were reset.
    InboundResets = 8,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 9] = [
        Counter::Redirected,
        Counter::Passed,
        Counter::OrigDstLookups,
        Counter::OrigDstMisses,
        Counter::Accelerated,
        Counter::AccelFallbacks,
        Counter::Dns,
        Counter::Inbound,
        Counter::InboundResets,
    ];

    /// The slot this counter lives in.
    pub const fn index(self) -> usize {
        self as usize
    }

    /// A stable name for status output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Redirected => "redirected",
            Counter::Passed => "passed",
            Counter::OrigDstLookups => "original_dst_lookups",
            Counter::OrigDstMisses => "original_dst_misses",
            Counter::Accelerated => "accelerated_sockets",
            Counter::AccelFallbacks => "accel_fallbacks",
            Counter::Dns => "dns",
            Counter::Inbound => "inbound",
            Counter::InboundResets => "inbound_resets",
        }
    }
}

/// Number of counters.
pub const COUNTERS: usize = Counter::ALL.len();

/// One namespace's counters (value of the per-CPU `NETNS_COUNTERS` map, keyed by netns cookie).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct NetnsCounters(pub [u64; COUNTERS]);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dense_and_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index(), i, "{} is out of place", c.name());
        }
    }
}
