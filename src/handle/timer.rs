//! Milliseconds for `XFRMA_ETIMER_THRESH` on any kernel.
//!
//! The kernel stores the value it is *set* to as jiffies (`replay_maxage`)
//! but reports it as `replay_maxage * 10 / HZ`, in 100 ms units. So a set
//! needs HZ, which userspace cannot read directly (`sysconf(_SC_CLK_TCK)` is
//! USER_HZ, always 100). [`crate::hz`] learns it from the caller or the
//! kernel's config where it can; otherwise we measure it: set a large, known
//! number of jiffies on an SA, read back the 100 ms count, and invert the
//! kernel's formula.
//! What is measured is "set units per second": should a kernel one day store
//! milliseconds, the same measurement yields 1000 and everything still holds.

use std::fmt;
use std::ops::RangeInclusive;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Mutex, PoisonError};

use crate::error::{Error, Result};

/// The probe value: large enough that the kernel's truncating division
/// leaves one whole HZ value, small enough that `* 10` fits in 32 bits.
pub(crate) const CALIBRATION_JIFFIES: u32 = 1_000_000;

/// The kernel computes `replay_maxage * 10` in 32 bits; a larger value would
/// read back wrapped, so we refuse to set it.
const MAX_JIFFIES: u32 = u32::MAX / 10;

/// HZ values we accept from anyone: a caller, a config file, a measurement.
pub(crate) const HZ_RANGE: RangeInclusive<u32> = 1..=100_000;

/// HZ is a property of the running kernel, not of a handle or namespace, so
/// one measurement serves the whole process. 0 = not measured yet.
static KERNEL_HZ: AtomicU32 = AtomicU32::new(0);
/// Where `KERNEL_HZ` came from. Written together with it, under this lock;
/// `KERNEL_HZ` stays an atomic so the hot path reads it without locking.
static SOURCE: Mutex<Option<HzSource>> = Mutex::new(None);

/// Where the HZ in use came from (see [`crate::hz`]), in the order the
/// library tries them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum HzSource {
    /// The caller declared it ([`set_kernel_hz`]).
    Declared,
    /// `CONFIG_HZ` of the running kernel's configuration, read from this file.
    KernelConfig(PathBuf),
    /// Measured on a throw-away SA in a private network namespace.
    PrivateProbe,
    /// Measured on one of the caller's SAs ([`crate::Handle::calibrate_hz`]),
    /// which rewrote its timer briefly.
    LiveSa,
}

impl fmt::Display for HzSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            HzSource::Declared => f.write_str("declared by the caller"),
            HzSource::KernelConfig(path) => write!(f, "CONFIG_HZ in {}", path.display()),
            HzSource::PrivateProbe => f.write_str("measured on a throw-away SA in a private network namespace"),
            HzSource::LiveSa => f.write_str("measured on a live SA"),
        }
    }
}

/// The kernel's HZ, if measured or set.
pub fn kernel_hz() -> Option<u32> {
    match KERNEL_HZ.load(Ordering::Relaxed) {
        0 => None,
        hz => Some(hz),
    }
}

/// Where the HZ of [`kernel_hz`] came from, if it is known.
pub fn kernel_hz_source() -> Option<HzSource> {
    SOURCE.lock().unwrap_or_else(PoisonError::into_inner).clone()
}

/// The HZ in use and its source, read together.
pub(crate) fn known_hz() -> Option<(u32, HzSource)> {
    let recorded = SOURCE.lock().unwrap_or_else(PoisonError::into_inner);
    Some((kernel_hz()?, recorded.clone()?))
}

/// Use `hz` instead of measuring it (for a caller that knows `CONFIG_HZ`).
pub fn set_kernel_hz(hz: u32) -> Result<()> {
    if !HZ_RANGE.contains(&hz) {
        return Err(Error::invalid(format!("kernel HZ {hz} out of range")));
    }
    remember(hz, HzSource::Declared);
    Ok(())
}

/// Inverts `read = set * 10 / HZ` (integer division): HZ lies in
/// `(set*10/(read+1), set*10/read]`. With the probe value that interval
/// holds exactly one integer for any HZ up to about 3000; above that it may
/// hold several, and then HZ is unknown rather than guessed.
pub fn hz_from_readback(set_jiffies: u32, read_100ms: u32) -> Option<u32> {
    if read_100ms == 0 {
        return None;
    }
    let scaled = u64::from(set_jiffies) * 10;
    let highest = scaled / u64::from(read_100ms);
    let below_lowest = scaled / (u64::from(read_100ms) + 1);
    (highest == below_lowest + 1).then(|| u32::try_from(highest).ok()).flatten()
}

/// Milliseconds to jiffies, rounded to the nearest jiffy; a non-zero time
/// never becomes 0, which would switch the timer off.
pub fn ms_to_jiffies(ms: u32, hz: u32) -> Result<u32> {
    let jiffies = (u64::from(ms) * u64::from(hz) + 500) / 1000;
    let jiffies = if ms > 0 { jiffies.max(1) } else { 0 };
    u32::try_from(jiffies).ok().filter(|j| *j <= MAX_JIFFIES).ok_or_else(|| {
        Error::invalid(format!("timer threshold {ms} ms is too large for the kernel to report back at HZ {hz}"))
    })
}

/// What [`crate::Handle::calibrate_hz`] measured on a live SA.
pub(crate) fn remember_hz(hz: u32) {
    remember(hz, HzSource::LiveSa);
}

fn remember(hz: u32, source: HzSource) {
    let mut recorded = SOURCE.lock().unwrap_or_else(PoisonError::into_inner);
    KERNEL_HZ.store(hz, Ordering::Relaxed);
    *recorded = Some(source);
}

/// Keeps `hz` unless HZ became known meanwhile (declared while it was
/// being learnt, say); returns what is kept.
pub(crate) fn remember_unless_known(hz: u32, source: HzSource) -> (u32, HzSource) {
    let mut recorded = SOURCE.lock().unwrap_or_else(PoisonError::into_inner);
    if let (Some(known), Some(known_source)) = (kernel_hz(), recorded.as_ref()) {
        return (known, known_source.clone());
    }
    KERNEL_HZ.store(hz, Ordering::Relaxed);
    *recorded = Some(source.clone());
    (hz, source)
}

/// Back to "not known", for tests that walk the sources from the start.
pub(crate) fn forget() {
    let mut recorded = SOURCE.lock().unwrap_or_else(PoisonError::into_inner);
    KERNEL_HZ.store(0, Ordering::Relaxed);
    *recorded = None;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn readback_inverts_for_common_hz() {
        for hz in [100u32, 250, 300, 1000, 1024, 1200] {
            let read = (u64::from(CALIBRATION_JIFFIES) * 10 / u64::from(hz)) as u32;
            assert_eq!(hz_from_readback(CALIBRATION_JIFFIES, read), Some(hz), "HZ {hz}");
        }
    }

    #[test]
    fn readback_never_names_a_wrong_hz() {
        let mut exact = 0;
        for hz in 1..=20_000u32 {
            let read = (u64::from(CALIBRATION_JIFFIES) * 10 / u64::from(hz)) as u32;
            match hz_from_readback(CALIBRATION_JIFFIES, read) {
                Some(found) => {
                    assert_eq!(found, hz, "reading {read} named HZ {found}, the kernel's is {hz}");
                    exact += 1;
                }
                None => assert!(hz >= 3000, "HZ {hz} should be measurable"),
            }
        }
        assert!(exact >= 3000);
    }

    #[test]
    fn readback_of_zero_is_no_answer() {
        assert_eq!(hz_from_readback(CALIBRATION_JIFFIES, 0), None);
    }

    #[test]
    fn corpus_fact_250_jiffies_reads_10() {
        // Debian 6.1, HZ=250: setting 250 reads back 10 (DEVELOPERS.md).
        assert_eq!(ms_to_jiffies(1000, 250).unwrap(), 250);
        assert_eq!(250 * 10 / 250, 10);
        // So small a probe cannot tell HZ 228 to 250 apart; the real probe can.
        assert_eq!(hz_from_readback(250, 10), None);
        assert_eq!(hz_from_readback(CALIBRATION_JIFFIES, 40_000), Some(250));
    }

    #[test]
    fn ms_round_to_nearest_jiffy_and_never_to_zero() {
        assert_eq!(ms_to_jiffies(250, 250).unwrap(), 63); // 62.5
        assert_eq!(ms_to_jiffies(1, 100).unwrap(), 1);
        assert_eq!(ms_to_jiffies(0, 250).unwrap(), 0);
        assert_eq!(ms_to_jiffies(1500, 300).unwrap(), 450);
    }

    #[test]
    fn whole_100ms_multiples_read_back_exactly() {
        for hz in [100u32, 250, 300, 1000] {
            for ms in (100..=10_000).step_by(100) {
                let j = ms_to_jiffies(ms, hz).unwrap();
                let read = (u64::from(j) * 10 / u64::from(hz)) as u32;
                assert_eq!(read * 100, ms, "HZ {hz} ms {ms}");
            }
        }
    }

    #[test]
    fn a_declared_hz_is_not_overwritten_by_one_learnt_meanwhile() {
        // The only test of this binary that touches the process-wide HZ.
        forget();
        set_kernel_hz(300).unwrap();
        assert_eq!(remember_unless_known(250, HzSource::PrivateProbe), (300, HzSource::Declared));
        assert_eq!(known_hz(), Some((300, HzSource::Declared)));
        forget();
        assert_eq!(remember_unless_known(250, HzSource::PrivateProbe), (250, HzSource::PrivateProbe));
        assert_eq!((kernel_hz(), kernel_hz_source()), (Some(250), Some(HzSource::PrivateProbe)));
        forget();
    }

    #[test]
    fn too_large_is_refused() {
        assert!(ms_to_jiffies(u32::MAX, 1000).is_err());
    }
}
