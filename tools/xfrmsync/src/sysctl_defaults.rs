//! The namespace's aevent defaults, `net.core.xfrm_aevent_etime` and
//! `net.core.xfrm_aevent_rseqth`, which SAs get when they are installed.
//!
//! Stand-in until the library has an API for them: everything the
//! `defaults` command needs is behind `read` and `write` in this one file,
//! so it can be swapped for the library's call.
//!
//! Both sysctls belong to a network namespace, and /proc/sys/net shows the
//! namespace of the thread that opens a file there. So the files are opened
//! on a short-lived helper thread that enters the namespace, the way the
//! library opens its sockets: the caller's thread never moves.

use std::fs::File;
use std::io::{Read as _, Write as _};
use std::os::fd::AsRawFd;
use std::path::Path;

const ETIME: &str = "/proc/sys/net/core/xfrm_aevent_etime";
const RSEQTH: &str = "/proc/sys/net/core/xfrm_aevent_rseqth";

/// The kernel keeps the default timer in 100 ms units
/// (`XFRM_AE_ETIME` = 10 is one second).
pub const ETIME_UNIT_MS: u32 = 100;

/// The largest default timer taken: the kernel multiplies the value by HZ
/// in 32 bits when an SA is installed, so at HZ 1000 this is the most it
/// holds (the rules file has the same limit).
pub const MAX_TIMER_MS: u32 = u32::MAX / 10;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Defaults {
    /// `xfrm_aevent_etime` times 100.
    pub timer_ms: u64,
    /// `xfrm_aevent_rseqth`.
    pub replay_packets: u32,
}

/// What `write` sets; `None` leaves a value as it is.
#[derive(Debug, Clone, Copy, Default)]
pub struct Change {
    pub timer_ms: Option<u32>,
    pub replay_packets: Option<u32>,
}

/// Checks a timer default before anything is written.
pub fn check_timer_ms(ms: u32) -> Result<u32, String> {
    if ms % ETIME_UNIT_MS != 0 {
        return Err(format!("timer {ms} ms: the kernel keeps this default in 100 ms units; give a multiple of 100"));
    }
    if ms > MAX_TIMER_MS {
        return Err(format!("timer {ms} ms is beyond what the kernel can hold (at most {MAX_TIMER_MS} ms)"));
    }
    Ok(ms / ETIME_UNIT_MS)
}

pub fn read(netns: Option<&Path>) -> Result<Defaults, String> {
    in_netns(netns, || {
        Ok(Defaults {
            timer_ms: u64::from(read_u32(ETIME)?) * u64::from(ETIME_UNIT_MS),
            replay_packets: read_u32(RSEQTH)?,
        })
    })
}

/// Sets what `change` gives, both or neither: values are checked first,
/// and if the second write fails the first is put back. The error says
/// whether anything was left changed.
pub fn write(netns: Option<&Path>, change: Change) -> Result<(), String> {
    let etime = change.timer_ms.map(check_timer_ms).transpose().map_err(|e| format!("{e}; nothing was changed"))?;
    in_netns(netns, || {
        // Every old value is read before anything is written, so that a
        // failed write can always be undone.
        let mut writes = Vec::new();
        for (path, value) in [(RSEQTH, change.replay_packets), (ETIME, etime)] {
            if let Some(value) = value {
                let before = read_u32(path).map_err(|e| format!("{e}; nothing was changed"))?;
                writes.push((path, value, before));
            }
        }
        for (at, (path, value, _)) in writes.iter().enumerate() {
            if let Err(e) = write_u32(path, *value) {
                for (undo_path, _, old) in writes[..at].iter().rev() {
                    if let Err(undo) = write_u32(undo_path, *old) {
                        return Err(format!("{e}; and {undo_path} could not be set back to {old}: {undo}"));
                    }
                }
                return Err(format!("{e}; nothing was changed"));
            }
        }
        Ok(())
    })
}

fn read_u32(path: &str) -> Result<u32, String> {
    let mut text = String::new();
    File::open(path)
        .and_then(|mut f| f.read_to_string(&mut text))
        .map_err(|e| format!("{path}: {}", crate::parse::io_reason(&e)))?;
    text.trim().parse().map_err(|_| format!("{path}: unexpected content '{}'", text.trim()))
}

fn write_u32(path: &str, value: u32) -> Result<(), String> {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .and_then(|mut f| f.write_all(format!("{value}\n").as_bytes()))
        .map_err(|e| format!("{path}: setting {value}: {}", crate::parse::io_reason(&e)))
}

/// Runs `f` on a helper thread inside `netns` (or here when `None`).
fn in_netns<T: Send>(netns: Option<&Path>, f: impl FnOnce() -> Result<T, String> + Send) -> Result<T, String> {
    let Some(path) = netns else { return f() };
    let ns = File::open(path).map_err(|e| format!("{}: {}", path.display(), crate::parse::io_reason(&e)))?;
    std::thread::scope(|scope| {
        scope
            .spawn(|| {
                // SAFETY: setns only reads the fd, which `ns` keeps open for
                // the call; it moves this helper thread alone, which ends
                // right after.
                if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                    let e = std::io::Error::last_os_error();
                    return Err(format!("entering netns {}: {}", path.display(), crate::parse::io_reason(&e)));
                }
                f()
            })
            .join()
            .unwrap_or_else(|_| Err("the netns helper thread panicked".into()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn timer_defaults_are_whole_100ms_units_within_range() {
        assert_eq!(check_timer_ms(1000), Ok(10));
        assert_eq!(check_timer_ms(0), Ok(0));
        assert!(check_timer_ms(250).unwrap_err().contains("multiple of 100"));
        assert!(check_timer_ms(u32::MAX - 95).unwrap_err().contains("beyond"));
    }

    #[test]
    fn reads_this_namespace() {
        // The host kernel has XFRM, so the files exist; the values are
        // whatever this machine has.
        if Path::new(ETIME).exists() {
            let d = read(None).unwrap();
            assert_eq!(d.timer_ms % 100, 0);
        }
    }
}
