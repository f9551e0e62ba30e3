//! The kernel's HZ without touching a live SA.
//!
//! Setting a timer threshold in milliseconds needs HZ (see [`crate::timer`]).
//! Measuring it on one of the caller's SAs rewrites that SA's timer for a
//! moment, and everyone listening sees two update events. So HZ is learnt
//! from the first of these that has it, none of which touches an SA:
//!
//! 1. the value the caller declared ([`crate::timer::set_kernel_hz`]), or
//!    one learnt earlier in the process;
//! 2. `CONFIG_HZ` in the running kernel's configuration: `/proc/config.gz`,
//!    `/boot/config-$(uname -r)`, `/usr/lib/modules/$(uname -r)/config`;
//! 3. a probe on a throw-away SA in a private network namespace: a helper
//!    thread unshares its network namespace, installs an ESP SA with the null
//!    cipher there, sets its timer to 1,000,000 jiffies, reads it back and
//!    inverts the kernel's formula. No one else can see that namespace, and
//!    it goes away, SA and all, with the thread. It needs `CAP_SYS_ADMIN`
//!    and a kernel with ESP.
//!
//! Only when all of them fail does [`crate::Handle`] measure on the live SA
//! ([`crate::Handle::calibrate_hz`]), with a warning in the log. The result
//! and its [`HzSource`] are kept for the whole process, and so is a failure
//! of all three (a timeout aside): it is not tried again.

use std::io::Read;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::netns;
use crate::sa::SaId;
use crate::timer::{self, CALIBRATION_JIFFIES, HZ_RANGE};
use crate::wire::{self, NewAe, NewSa};

pub use crate::timer::HzSource;

/// How long the probe may wait for the kernel when no caller's deadline
/// bounds it (the handle's default request timeout).
const PROBE_TIMEOUT: Duration = Duration::from_secs(5);
/// A kernel config is a few hundred KiB; anything far larger is not one.
const MAX_CONFIG_BYTES: usize = 16 << 20;
/// The null cipher: no key, nothing computed, and the `crypto_null` module
/// it lives in is one that ESP's `authenc` needs anyway.
const PROBE_CIPHER: &str = "ecb(cipher_null)";
const PROBE_SPI: u32 = 0x485a;

/// Learning is serialised so that threads starting at once probe once.
static LEARNING: Mutex<()> = Mutex::new(());
/// Why learning failed, when it did for a reason that lasts (no config
/// file, no probe): every later call answers this at once rather than
/// read the files and start the probe's thread again, which a daemon
/// registering SAs one by one would otherwise pay each time.
static FAILED: Mutex<Option<Error>> = Mutex::new(None);
/// Config files and probe for tests; `None`: the real ones.
static TEST_SOURCES: Mutex<Option<(Vec<PathBuf>, bool)>> = Mutex::new(None);

/// The kernel's HZ and where it came from, from the first source that has
/// it (see the module documentation); never from one of the caller's SAs.
/// Once learnt it is kept for the process, and later calls return it with
/// its source, which is [`HzSource::LiveSa`] if a live SA was measured
/// before. When every source fails, the error is the probe's.
pub fn kernel_hz_without_sa() -> Result<(u32, HzSource)> {
    learn_until(Instant::now() + PROBE_TIMEOUT)
}

/// Like [`kernel_hz_without_sa`], with the probe's requests bounded by
/// `deadline` (a calling [`Handle`]'s own).
pub(crate) fn learn_until(deadline: Instant) -> Result<(u32, HzSource)> {
    let _one_at_a_time = LEARNING.lock().unwrap_or_else(PoisonError::into_inner);
    let known = timer::known_hz();
    if known.is_none() {
        if let Some(why) = FAILED.lock().unwrap_or_else(PoisonError::into_inner).clone() {
            return Err(why);
        }
    }
    let (configs, probe) = match TEST_SOURCES.lock().unwrap_or_else(PoisonError::into_inner).clone() {
        Some(sources) => sources,
        None => (config_paths(), true),
    };
    let learnt = learn_with(known.clone(), &configs, || {
        if probe {
            probe_until(deadline)
        } else {
            Err(Error::Os { operation: "learn kernel HZ (no config file; probe disabled)", errno: libc::ENOENT })
        }
    })
    .inspect_err(|why| {
        // A caller's short deadline is no reason to give up for good.
        if !matches!(why, Error::TimedOut(_)) {
            *FAILED.lock().unwrap_or_else(PoisonError::into_inner) = Some(why.clone());
        }
    })?;
    if known.is_some() {
        return Ok(learnt);
    }
    let kept = timer::remember_unless_known(learnt.0, learnt.1);
    log::info!("kernel HZ {}: {}", kept.0, kept.1);
    Ok(kept)
}

/// Forgets the HZ learnt so far and takes HZ from `sources` from now on:
/// these config files, then the probe if `true`; `None` restores the real
/// ones. For tests of the order of sources, which need a fresh start.
#[doc(hidden)]
pub fn restart_for_tests(sources: Option<(Vec<PathBuf>, bool)>) {
    let _one_at_a_time = LEARNING.lock().unwrap_or_else(PoisonError::into_inner);
    *TEST_SOURCES.lock().unwrap_or_else(PoisonError::into_inner) = sources;
    *FAILED.lock().unwrap_or_else(PoisonError::into_inner) = None;
    timer::forget();
}

/// The order of the sources, apart from where they are and what is kept.
fn learn_with(
    known: Option<(u32, HzSource)>,
    configs: &[PathBuf],
    probe: impl FnOnce() -> Result<u32>,
) -> Result<(u32, HzSource)> {
    if let Some(known) = known {
        return Ok(known);
    }
    for path in configs {
        match config_hz(path) {
            Ok(hz) => return Ok((hz, HzSource::KernelConfig(path.clone()))),
            Err(why) => log::debug!("kernel HZ not in {}: {why}", path.display()),
        }
    }
    probe().map(|hz| (hz, HzSource::PrivateProbe))
}

/// Where distributions keep the running kernel's config.
fn config_paths() -> Vec<PathBuf> {
    let mut paths = vec![PathBuf::from("/proc/config.gz")];
    // What uname(2) calls the release, without unsafe code.
    match std::fs::read_to_string("/proc/sys/kernel/osrelease") {
        Ok(release) if !release.trim().is_empty() && !release.contains('/') => {
            let release = release.trim();
            paths.push(PathBuf::from(format!("/boot/config-{release}")));
            paths.push(PathBuf::from(format!("/usr/lib/modules/{release}/config")));
        }
        Ok(release) => log::debug!("kernel release {release:?} names no config file"),
        Err(e) => log::debug!("kernel release unknown: {e}"),
    }
    paths
}

/// `CONFIG_HZ` of the config file at `path`, plain or gzip-compressed.
fn config_hz(path: &Path) -> std::result::Result<u32, String> {
    let mut data = Vec::new();
    std::fs::File::open(path)
        .and_then(|f| f.take(MAX_CONFIG_BYTES as u64 + 1).read_to_end(&mut data))
        .map_err(|e| e.to_string())?;
    if data.len() > MAX_CONFIG_BYTES {
        return Err(format!("larger than {MAX_CONFIG_BYTES} bytes"));
    }
    if data.starts_with(&GZIP_MAGIC) {
        data = gunzip(&data)?;
    }
    parse_config_hz(&String::from_utf8_lossy(&data))
}

fn parse_config_hz(config: &str) -> std::result::Result<u32, String> {
    let value =
        config.lines().find_map(|line| line.trim_end().strip_prefix("CONFIG_HZ=")).ok_or("no CONFIG_HZ line")?;
    let hz: u32 = value.parse().map_err(|_| format!("CONFIG_HZ={value} is not a number"))?;
    if !HZ_RANGE.contains(&hz) {
        return Err(format!("CONFIG_HZ={hz} out of range"));
    }
    Ok(hz)
}

const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// One gzip member (RFC 1952), as the kernel builds `/proc/config.gz`; the
/// header is ours to parse, the deflate data miniz_oxide's. The trailer's
/// CRC and length are checked, since deflate itself has no checksum.
fn gunzip(data: &[u8]) -> std::result::Result<Vec<u8>, String> {
    const DEFLATE: u8 = 8;
    const FHCRC: u8 = 0x02;
    const FEXTRA: u8 = 0x04;
    const FNAME: u8 = 0x08;
    const FCOMMENT: u8 = 0x10;
    const HEADER: usize = 10;
    const TRAILER: usize = 8;
    if data.len() < HEADER + TRAILER || !data.starts_with(&GZIP_MAGIC) {
        return Err("not gzip data".into());
    }
    if data[2] != DEFLATE {
        return Err(format!("gzip compression method {} is not deflate", data[2]));
    }
    let flags = data[3];
    if flags & 0xe0 != 0 {
        return Err("gzip header has reserved flags set".into());
    }
    let end = data.len() - TRAILER;
    let mut at = HEADER;
    if flags & FEXTRA != 0 {
        let len = data.get(at..at + 2).ok_or("gzip extra field truncated")?;
        at += 2 + usize::from(u16::from_le_bytes([len[0], len[1]]));
    }
    for field in [FNAME, FCOMMENT] {
        if flags & field != 0 {
            let len = data
                .get(at..end)
                .and_then(|rest| rest.iter().position(|b| *b == 0))
                .ok_or("gzip name or comment unterminated")?;
            at += len + 1;
        }
    }
    if flags & FHCRC != 0 {
        at += 2;
    }
    let deflated = data.get(at..end).ok_or("gzip header runs into the trailer")?;
    let text = miniz_oxide::inflate::decompress_to_vec_with_limit(deflated, MAX_CONFIG_BYTES)
        .map_err(|e| format!("gzip data corrupt ({:?})", e.status))?;
    let crc = u32::from_le_bytes([data[end], data[end + 1], data[end + 2], data[end + 3]]);
    let size = u32::from_le_bytes([data[end + 4], data[end + 5], data[end + 6], data[end + 7]]);
    if crc32(&text) != crc || size != text.len() as u32 {
        return Err("gzip checksum or length does not match the data".into());
    }
    Ok(text)
}

/// CRC-32 (IEEE 802.3, reflected), bit by bit: a config is read once per
/// process, so a table would buy nothing.
fn crc32(data: &[u8]) -> u32 {
    let mut crc = !0u32;
    for &byte in data {
        crc ^= u32::from(byte);
        for _ in 0..8 {
            crc = (crc >> 1) ^ (0xedb8_8320 & (crc & 1).wrapping_neg());
        }
    }
    !crc
}

/// Measures HZ on a throw-away SA in a private network namespace (see the
/// module documentation), without looking at or keeping any other source.
/// Fails with the kernel's refusal of the SA where it has no ESP (`Kernel`
/// for `XFRM_MSG_NEWSA`), or `EPERM` without `CAP_SYS_ADMIN`.
pub fn probe_private_netns() -> Result<u32> {
    probe_until(Instant::now() + PROBE_TIMEOUT)
}

fn probe_until(deadline: Instant) -> Result<u32> {
    netns::run_in_private(move || {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::TimedOut("HZ probe in a private netns"));
        }
        // Documentation addresses (RFC 5737): they name no real peer.
        let sa = SaId::esp(Ipv4Addr::new(192, 0, 2, 2).into(), PROBE_SPI);
        let new = NewSa::new(&sa, Ipv4Addr::new(192, 0, 2, 1).into(), PROBE_CIPHER, &[])?;
        let probe = NewAe { etimer_jiffies: Some(CALIBRATION_JIFFIES), ..NewAe::default() };
        // Dropped (its sockets closed) before the thread ends, so nothing
        // keeps the namespace alive after it.
        let handle = Handle::builder().events(false).request_timeout(left).open()?;
        handle.one_call(|| {
            handle.request_ack("XFRM_MSG_NEWSA (HZ probe)", |out, from| wire::encode_newsa(out, from, &new))?;
            handle.request_ack("XFRM_MSG_NEWAE (HZ probe)", |out, from| wire::encode_newae(out, from, &sa, &probe))?;
            let ms = handle.timer_threshold_ms(&sa)?;
            timer::hz_from_readback(CALIBRATION_JIFFIES, ms / 100)
                .ok_or(Error::Malformed("HZ probe: timer threshold read back unusable"))
        })
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::Cell;

    /// A file in a directory of this test process's own, removed on drop.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &[u8]) -> TempFile {
            let dir = std::env::temp_dir().join(format!("xfrmsync-hz-{}", std::process::id()));
            std::fs::create_dir_all(&dir).unwrap();
            let path = dir.join(name);
            std::fs::write(&path, contents).unwrap();
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    const CONFIG: &str = "#\n# Linux/x86 6.1.0 Kernel Configuration\n#\nCONFIG_HZ_PERIODIC=y\n\
                          # CONFIG_HZ_100 is not set\nCONFIG_HZ_300=y\nCONFIG_HZ=300\nCONFIG_SCHED_HRTICK=y\n";

    /// gzip as gzip(1) writes it, with the optional name field when given.
    fn gzip(data: &[u8], name: Option<&str>) -> Vec<u8> {
        let mut out = vec![0x1f, 0x8b, 8, if name.is_some() { 0x08 } else { 0 }, 0, 0, 0, 0, 2, 3];
        if let Some(name) = name {
            out.extend_from_slice(name.as_bytes());
            out.push(0);
        }
        out.extend_from_slice(&miniz_oxide::deflate::compress_to_vec(data, 9));
        out.extend_from_slice(&crc32(data).to_le_bytes());
        out.extend_from_slice(&(data.len() as u32).to_le_bytes());
        out
    }

    #[test]
    fn crc32_check_value() {
        assert_eq!(crc32(b"123456789"), 0xcbf4_3926);
    }

    #[test]
    fn config_hz_from_a_plain_file() {
        let file = TempFile::new("config-plain", CONFIG.as_bytes());
        assert_eq!(config_hz(&file.0), Ok(300));
    }

    #[test]
    fn config_hz_from_a_gzip_file() {
        let file = TempFile::new("config.gz", &gzip(CONFIG.as_bytes(), None));
        assert_eq!(config_hz(&file.0), Ok(300));
        let named = TempFile::new("config-named.gz", &gzip(CONFIG.as_bytes(), Some("config")));
        assert_eq!(config_hz(&named.0), Ok(300));
    }

    #[test]
    fn damaged_gzip_is_refused_not_misread() {
        let good = gzip(CONFIG.as_bytes(), None);
        let mut flipped = good.clone();
        let last_data = good.len() - 9;
        flipped[last_data] ^= 0x55;
        assert!(gunzip(&flipped).is_err(), "a changed byte must not pass the CRC");
        assert!(gunzip(&good[..good.len() - 3]).is_err(), "cut trailer");
        assert!(gunzip(&good[..12]).is_err(), "cut data");
        let mut method = good.clone();
        method[2] = 7;
        assert!(gunzip(&method).unwrap_err().contains("not deflate"));
        let mut unterminated = good;
        unterminated[3] = 0x08;
        assert!(gunzip(&unterminated[..20]).is_err());
    }

    #[test]
    fn config_without_a_usable_hz_line() {
        assert_eq!(parse_config_hz("CONFIG_HZ_250=y\nCONFIG_HZ_PERIODIC=y\n"), Err("no CONFIG_HZ line".into()));
        assert!(parse_config_hz("CONFIG_HZ=fast\n").unwrap_err().contains("not a number"));
        assert!(parse_config_hz("CONFIG_HZ=0\n").unwrap_err().contains("out of range"));
        assert_eq!(parse_config_hz("CONFIG_HZ=1000\r\n"), Ok(1000));
        let missing = Path::new("/nonexistent/config");
        assert!(config_hz(missing).is_err());
    }

    fn no_probe() -> Result<u32> {
        panic!("the probe must not run while an earlier source has HZ")
    }

    #[test]
    fn declared_hz_comes_first() {
        let config = TempFile::new("config-declared", CONFIG.as_bytes());
        let got = learn_with(Some((1000, HzSource::Declared)), std::slice::from_ref(&config.0), no_probe);
        assert_eq!(got, Ok((1000, HzSource::Declared)));
    }

    #[test]
    fn first_config_that_has_hz_wins() {
        let empty = TempFile::new("config-empty", b"# no HZ here\n");
        let plain = TempFile::new("config-100", b"CONFIG_HZ=100\n");
        let packed = TempFile::new("config-1000.gz", &gzip(b"CONFIG_HZ=1000\n", None));
        let missing = PathBuf::from("/nonexistent/config.gz");
        let order = [missing, empty.0.clone(), packed.0.clone(), plain.0.clone()];
        assert_eq!(learn_with(None, &order, no_probe), Ok((1000, HzSource::KernelConfig(packed.0.clone()))));
        let order = [plain.0.clone(), packed.0.clone()];
        assert_eq!(learn_with(None, &order, no_probe), Ok((100, HzSource::KernelConfig(plain.0.clone()))));
    }

    #[test]
    fn the_probe_comes_last_and_its_error_is_the_answer() {
        let empty = TempFile::new("config-none", b"CONFIG_HZ_PERIODIC=y\n");
        let probed = Cell::new(0);
        let probe = || {
            probed.set(probed.get() + 1);
            Ok(250)
        };
        assert_eq!(learn_with(None, std::slice::from_ref(&empty.0), probe), Ok((250, HzSource::PrivateProbe)));
        assert_eq!(probed.get(), 1);
        let refused = Error::Kernel { operation: "XFRM_MSG_NEWSA (HZ probe)", errno: libc::ENOPROTOOPT, ext_ack: None };
        let failing = || Err(refused.clone());
        assert_eq!(learn_with(None, &[], failing), Err(refused));
    }

    #[test]
    fn config_paths_follow_the_running_release() {
        let release = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap();
        let paths = config_paths();
        assert_eq!(paths[0], Path::new("/proc/config.gz"));
        assert_eq!(paths[1], PathBuf::from(format!("/boot/config-{}", release.trim())));
        assert_eq!(paths[2], PathBuf::from(format!("/usr/lib/modules/{}/config", release.trim())));
    }
}
