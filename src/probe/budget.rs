//! How many probes may be in flight at once. Each probe holds one socket, and a process that
//! runs out of file descriptors fails every probe together, which would mark healthy hosts not
//! ready. So the soft open-files limit is raised to the hard one (systemd starts services at
//! 1024) and probes get what is left after a reserve for API clients, watches and files.

use nix::sys::resource::{Resource, getrlimit, setrlimit};

/// Descriptors kept back from probes: API connections and watches per cluster, watched
/// folders, the status server and its clients (at most 64 at once).
const RESERVED: u64 = 256;

/// Probes in flight at once, from the configured value (if any) and the open-files limit.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ProbeSlots {
    pub slots: usize,
    /// The configured value, when the open-files limit forced it lower.
    pub lowered_from: Option<usize>,
    /// The soft open-files limit the slots were taken from.
    pub open_files: u64,
}

/// Raises the soft open-files limit as far as allowed and returns the probe slots.
pub fn probe_slots(configured: Option<usize>) -> ProbeSlots {
    slots_for(raise_open_files(), configured)
}

/// The soft open-files limit after raising it to the hard limit (unchanged if not allowed).
fn raise_open_files() -> u64 {
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 1024;
    };
    if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
        return hard;
    }
    soft
}

/// Every descriptor beyond the reserve may hold a probe, up to what is configured.
fn slots_for(open_files: u64, configured: Option<usize>) -> ProbeSlots {
    let budget = usize::try_from(open_files.saturating_sub(RESERVED))
        .unwrap_or(usize::MAX)
        .max(1);
    let (slots, lowered_from) = match configured {
        Some(wanted) if wanted > budget => (budget, Some(wanted)),
        Some(wanted) => (wanted, None),
        None => (budget, None),
    };
    ProbeSlots {
        slots,
        lowered_from,
        open_files,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_setting_probes_get_every_descriptor_beyond_the_reserve() {
        assert_eq!(slots_for(524_288, None).slots, 524_288 - 256);
        assert_eq!(slots_for(1024, None).slots, 768);
    }

    #[test]
    fn a_setting_above_the_open_files_limit_is_lowered_and_says_so() {
        let slots = slots_for(1024, Some(1000));
        assert_eq!(slots.slots, 768);
        assert_eq!(slots.lowered_from, Some(1000));
        assert_eq!(slots_for(65_536, Some(1000)).slots, 1000);
        assert_eq!(slots_for(65_536, Some(1000)).lowered_from, None);
    }

    #[test]
    fn a_tiny_limit_still_leaves_one_probe() {
        assert_eq!(slots_for(100, None).slots, 1);
    }

    #[test]
    fn the_soft_limit_is_raised_to_the_hard_one() {
        let open_files = raise_open_files();
        let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).unwrap();
        assert_eq!(open_files, soft);
        assert_eq!(soft, hard);
    }
}
