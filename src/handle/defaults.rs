//! A network namespace's event thresholds for new SAs: the sysctls
//! `net.core.xfrm_aevent_etime` (timer, in 100 ms steps) and
//! `net.core.xfrm_aevent_rseqth` (replay, in packets), read and written in
//! the units of the rest of the library: milliseconds and packets.
//!
//! The kernel copies them into an SA when the SA is created through XFRM
//! netlink (`ip xfrm state add`, IKE daemons): changing them changes no SA
//! that exists already; set those with [`crate::Handle::set_thresholds`].
//! Each network namespace has its own pair (10 = 1 s and 2 packets in a new
//! one). In a namespace owned by a user namespace other than the initial
//! one the kernel does not show them, and reading fails with `ENOENT`.
//!
//! ```no_run
//! use xfrmsync::defaults::{self, NamespaceDefaults};
//! use xfrmsync::NetnsRef;
//! let b = NetnsRef::Path("/run/netns/b".as_ref());
//! defaults::write(b, &NamespaceDefaults { timer_ms: 2_000, replay_packets: 32 })?;
//! assert_eq!(defaults::read(b)?.timer_ms, 2_000);
//! # Ok::<(), xfrmsync::Error>(())
//! ```

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};

use crate::error::{Error, Result};
use crate::netns::NetnsRef;
use crate::timer::HZ_RANGE;

const ETIME: &str = "/proc/sys/net/core/xfrm_aevent_etime";
const RSEQTH: &str = "/proc/sys/net/core/xfrm_aevent_rseqth";
/// The sysctl's unit, in milliseconds.
const STEP_MS: u32 = 100;

/// The thresholds a namespace gives the SAs created in it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct NamespaceDefaults {
    /// Timer threshold in milliseconds, a multiple of 100 (the sysctl's
    /// step); 0: no timer events. A sysctl value beyond `u32::MAX` ms reads
    /// as `u32::MAX`.
    pub timer_ms: u32,
    /// Replay threshold in packets; 0: no events for replay-counter progress.
    pub replay_packets: u32,
}

/// The defaults of `netns`, read in that namespace (on a helper thread for
/// another one, see [`crate::netns`]).
pub fn read(netns: NetnsRef<'_>) -> Result<NamespaceDefaults> {
    netns.run(|| {
        let steps = read_u32(ETIME, "read net.core.xfrm_aevent_etime")?;
        Ok(NamespaceDefaults {
            timer_ms: steps.saturating_mul(STEP_MS),
            replay_packets: read_u32(RSEQTH, "read net.core.xfrm_aevent_rseqth")?,
        })
    })
}

/// Sets the defaults of `netns` for SAs created from now on. A timer that is
/// not a whole number of 100 ms steps is refused, not rounded, so that a
/// read gives back what was written; so is one the kernel would overflow
/// (it computes 100 ms steps × HZ in 32 bits: about 119 hours at HZ 1000).
/// That check needs HZ, learnt as for timer thresholds ([`crate::hz`]);
/// where no source has it, the largest HZ the library accepts is assumed.
/// Both values are checked, and both files opened, before either is
/// written. Needs `CAP_NET_ADMIN`, and `CAP_SYS_ADMIN` for another
/// namespace.
pub fn write(netns: NetnsRef<'_>, defaults: &NamespaceDefaults) -> Result<()> {
    let steps = timer_steps(defaults.timer_ms, hz_bound())?;
    let packets = defaults.replay_packets;
    netns.run(move || {
        let mut etime = open_for_write(ETIME, "open net.core.xfrm_aevent_etime")?;
        let mut rseqth = open_for_write(RSEQTH, "open net.core.xfrm_aevent_rseqth")?;
        etime
            .write_all(format!("{steps}\n").as_bytes())
            .map_err(|e| Error::from_io("write net.core.xfrm_aevent_etime", &e))?;
        rseqth
            .write_all(format!("{packets}\n").as_bytes())
            .map_err(|e| Error::from_io("write net.core.xfrm_aevent_rseqth", &e))
    })
}

/// HZ for the overflow check. Without one known, the largest HZ the library
/// accepts, which refuses more than it must but never lets a value wrap.
fn hz_bound() -> u32 {
    match crate::hz::kernel_hz_without_sa() {
        Ok((hz, _)) => hz,
        Err(why) => {
            log::debug!("kernel HZ unknown ({why}): checking the default timer against HZ {}", HZ_RANGE.end());
            *HZ_RANGE.end()
        }
    }
}

/// Milliseconds to the sysctl's 100 ms steps.
fn timer_steps(ms: u32, hz: u32) -> Result<u32> {
    if ms % STEP_MS != 0 {
        let below = ms / STEP_MS * STEP_MS;
        return Err(Error::invalid(format!(
            "net.core.xfrm_aevent_etime counts 100 ms steps: {ms} ms is not a multiple of 100 ms \
             (the nearest are {below} and {} ms)",
            u64::from(below) + u64::from(STEP_MS)
        )));
    }
    let steps = ms / STEP_MS;
    if u64::from(steps) * u64::from(hz) > u64::from(u32::MAX) {
        return Err(Error::invalid(format!(
            "a default timer of {ms} ms would overflow in the kernel, which computes 100 ms steps × HZ \
             ({hz}) in 32 bits: at most {} ms",
            u32::MAX / hz * STEP_MS
        )));
    }
    Ok(steps)
}

fn read_u32(path: &str, operation: &'static str) -> Result<u32> {
    let mut text = String::new();
    File::open(path).and_then(|mut f| f.read_to_string(&mut text)).map_err(|e| Error::from_io(operation, &e))?;
    let text = text.trim();
    // Kernels before proc_douintvec print these with %d: a value above
    // INT_MAX shows as negative there.
    text.parse::<u32>()
        .or_else(|_| text.parse::<i32>().map(|v| v as u32))
        .map_err(|_| Error::Os { operation, errno: libc::EIO })
}

fn open_for_write(path: &str, operation: &'static str) -> Result<File> {
    OpenOptions::new().write(true).open(path).map_err(|e| Error::from_io(operation, &e))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn whole_steps_convert_and_others_are_refused() {
        assert_eq!(timer_steps(0, 250).unwrap(), 0);
        assert_eq!(timer_steps(1_000, 250).unwrap(), 10);
        assert_eq!(timer_steps(2_300, 1000).unwrap(), 23);
        let err = timer_steps(250, 250).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains("200 and 300 ms"), "{err}");
        assert!(timer_steps(99, 250).unwrap_err().to_string().contains("0 and 100 ms"));
    }

    #[test]
    fn a_timer_the_kernel_would_overflow_is_refused() {
        let err = timer_steps(u32::MAX / 100 * 100, 250).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
        assert!(err.to_string().contains("at most 1717986900 ms"), "{err}");
        assert_eq!(timer_steps(1_717_986_900, 250).unwrap(), 17_179_869);
        // At HZ 1000: 4,294,967 steps fit, one more does not.
        assert_eq!(timer_steps(429_496_700, 1000).unwrap(), 4_294_967);
        assert!(timer_steps(429_496_800, 1000).is_err());
    }
}
