//! Per-program event counters, kept in a BPF array indexed by [`Counter`].

/// What a counter slot counts. The discriminant is the slot's index in the counters map.
#[repr(u32)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Counter {
    /// connect4 calls seen by the cgroup connect4 program.
    Connect4Calls = 0,
}

impl Counter {
    /// Every counter, in slot order.
    pub const ALL: [Counter; 1] = [Counter::Connect4Calls];

    /// The map slot this counter lives in.
    pub const fn index(self) -> u32 {
        self as u32
    }

    /// A stable name for status output and metrics.
    pub const fn name(self) -> &'static str {
        match self {
            Counter::Connect4Calls => "connect4_calls",
        }
    }
}

/// Number of slots in the counters map.
pub const COUNTER_SLOTS: u32 = Counter::ALL.len() as u32;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slots_are_dense_and_in_order() {
        for (i, c) in Counter::ALL.iter().enumerate() {
            assert_eq!(c.index() as usize, i, "{} is out of place", c.name());
        }
        assert_eq!(COUNTER_SLOTS as usize, Counter::ALL.len());
    }
}
