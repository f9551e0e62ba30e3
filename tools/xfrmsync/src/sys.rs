//! The few system calls the tool makes itself: signals as an fd, and
//! polling it next to the handle's.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// `NAME` is `/run/netns/NAME` (what `ip netns add` makes); anything with a
/// slash is a path (`/proc/PID/ns/net`).
pub fn netns_path(arg: &str) -> PathBuf {
    if arg.contains('/') {
        PathBuf::from(arg)
    } else {
        PathBuf::from("/run/netns").join(arg)
    }
}

/// Signals taken from their default action and read from an fd instead, so
/// that the poll loop handles them between two dispatches, never inside one.
pub struct Signals {
    fd: OwnedFd,
}

impl Signals {
    /// Blocks `signals` for this thread and every thread started after, and
    /// opens a signalfd for them. Call it before any thread is started (the
    /// library starts one to enter a namespace), or a signal could be
    /// delivered to a thread that still has its default action.
    ///
    /// Their disposition is set back to the default: the kernel discards an
    /// ignored signal even while it is blocked, and a shell starts
    /// background commands with SIGINT ignored, so `kill -INT` would never
    /// reach the fd. Blocked, the default action never runs.
    pub fn take(signals: &[libc::c_int]) -> io::Result<Signals> {
        // SAFETY: sigset_t is plain data; sigemptyset initialises it before
        // any other use.
        let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
        // SAFETY: `set` is a valid sigset_t for both calls.
        unsafe {
            libc::sigemptyset(&mut set);
            for s in signals {
                libc::sigaddset(&mut set, *s);
            }
        }
        // SAFETY: `set` is valid; the old mask is not asked for.
        let rc = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
        if rc != 0 {
            return Err(io::Error::from_raw_os_error(rc));
        }
        for s in signals {
            // SAFETY: SIG_DFL installs no handler; the signal is blocked
            // already, so its default action cannot run.
            if unsafe { libc::signal(*s, libc::SIG_DFL) } == libc::SIG_ERR {
                return Err(io::Error::last_os_error());
            }
        }
        // SAFETY: -1 asks for a new fd; `set` is valid for the call.
        let fd = unsafe { libc::signalfd(-1, &set, libc::SFD_CLOEXEC | libc::SFD_NONBLOCK) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: signalfd returned a new fd that nothing else owns.
        Ok(Signals { fd: unsafe { OwnedFd::from_raw_fd(fd) } })
    }

    /// The next pending signal, or `None`.
    pub fn next(&self) -> io::Result<Option<libc::c_int>> {
        // SAFETY: signalfd_siginfo is plain data, filled by read below.
        let mut info: libc::signalfd_siginfo = unsafe { std::mem::zeroed() };
        let size = std::mem::size_of::<libc::signalfd_siginfo>();
        loop {
            // SAFETY: the buffer is `info`, `size` bytes, alive for the call.
            let n = unsafe { libc::read(self.fd.as_raw_fd(), (&mut info as *mut libc::signalfd_siginfo).cast(), size) };
            if n == size as isize {
                return Ok(Some(info.ssi_signo as libc::c_int));
            }
            let err = io::Error::last_os_error();
            match err.kind() {
                io::ErrorKind::Interrupted => continue,
                io::ErrorKind::WouldBlock => return Ok(None),
                _ if n >= 0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "short read from signalfd")),
                _ => return Err(err),
            }
        }
    }
}

impl AsRawFd for Signals {
    fn as_raw_fd(&self) -> RawFd {
        self.fd.as_raw_fd()
    }
}

pub fn signal_name(signal: libc::c_int) -> &'static str {
    match signal {
        libc::SIGHUP => "SIGHUP",
        libc::SIGINT => "SIGINT",
        libc::SIGTERM => "SIGTERM",
        _ => "signal",
    }
}

/// Waits until one of `fds` is readable or `until` passes (`None`: no
/// limit); returns which are readable, all false on timeout.
pub fn wait_readable<const N: usize>(fds: [RawFd; N], until: Option<Instant>) -> io::Result<[bool; N]> {
    let mut polls = fds.map(|fd| libc::pollfd { fd, events: libc::POLLIN, revents: 0 });
    loop {
        let timeout = match until {
            None => -1,
            Some(t) => {
                let left = t.saturating_duration_since(Instant::now());
                if left.is_zero() {
                    return Ok([false; N]);
                }
                // Rounded up, so that a wait never ends before `until`.
                left.as_millis().saturating_add(1).min(i32::MAX as u128) as i32
            }
        };
        // SAFETY: `polls` is an array of N valid pollfds, alive for the call.
        let n = unsafe { libc::poll(polls.as_mut_ptr(), N as libc::nfds_t, timeout) };
        if n < 0 {
            let err = io::Error::last_os_error();
            if err.kind() == io::ErrorKind::Interrupted {
                continue;
            }
            return Err(err);
        }
        // Errors and hangups count as readable: the read that follows
        // reports them.
        return Ok(polls.map(|p| p.revents & (libc::POLLIN | libc::POLLERR | libc::POLLHUP) != 0));
    }
}

/// `until` for a run limited to `seconds`.
pub fn deadline(seconds: Option<u64>) -> Option<Instant> {
    seconds.map(|s| Instant::now() + Duration::from_secs(s))
}
