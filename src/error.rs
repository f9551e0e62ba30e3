//! The one error type of the crate. Every failure maps to exactly one errno,
//! because our C users (netlink people) expect negative errno, and
//! `EventsLost` must stay distinguishable from every other failure.

use std::fmt;

/// Why an operation failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Error {
    /// The kernel refused a request. `errno` is positive; `ext_ack` is the
    /// kernel's extended-ack text when it sent one.
    Kernel { operation: &'static str, errno: i32, ext_ack: Option<String> },
    /// The event socket overflowed (`ENOBUFS`): events were dropped by the
    /// kernel and per-SA state must be re-read (resync) with queries.
    EventsLost,
    /// A system call failed.
    Os { operation: &'static str, errno: i32 },
    /// The caller passed something we will not send to the kernel.
    InvalidArgument(String),
    /// A received message (netlink, or a sync record) does not parse;
    /// nothing of it was used.
    Malformed(&'static str),
    /// A datagram was larger than the receive buffer and was cut.
    Truncated { size: usize, buffer: usize },
    /// The handle is already inside `dispatch` (called from a callback).
    Busy(&'static str),
    /// The kernel did not answer a request in time.
    TimedOut(&'static str),
    /// A change the library made to an SA for its own purposes (the HZ
    /// probe) could not be undone: `state` says what the SA is left with,
    /// `cause` why the undo failed.
    RestoreFailed { state: String, cause: Box<Error> },
    /// A caller's buffer has no room for what was to be written into it.
    NoRoom { need: usize, have: usize },
}

/// The crate's result type.
pub type Result<T> = std::result::Result<T, Error>;

impl Error {
    /// The positive errno this error stands for. `ENOBUFS` is reserved for
    /// [`Error::EventsLost`]: a request that fails for lack of kernel buffer
    /// space reports `ENOMEM`, so a C caller never mistakes it for lost events.
    pub fn errno(&self) -> i32 {
        match self {
            Error::Kernel { errno, .. } | Error::Os { errno, .. } if *errno == libc::ENOBUFS => libc::ENOMEM,
            Error::Kernel { errno, .. } | Error::Os { errno, .. } => *errno,
            Error::EventsLost => libc::ENOBUFS,
            Error::InvalidArgument(_) => libc::EINVAL,
            Error::Malformed(_) => libc::EBADMSG,
            Error::Truncated { .. } => libc::EMSGSIZE,
            Error::Busy(_) => libc::EBUSY,
            Error::TimedOut(_) => libc::ETIMEDOUT,
            Error::RestoreFailed { .. } => libc::ENOTRECOVERABLE,
            Error::NoRoom { .. } => libc::ENOSPC,
        }
    }

    pub(crate) fn last_os(operation: &'static str) -> Error {
        Error::from_io(operation, &std::io::Error::last_os_error())
    }

    pub(crate) fn from_io(operation: &'static str, err: &std::io::Error) -> Error {
        match err.raw_os_error() {
            Some(errno) => Error::Os { operation, errno },
            None => Error::Os { operation, errno: libc::EIO },
        }
    }

    pub(crate) fn invalid(message: impl Into<String>) -> Error {
        Error::InvalidArgument(message.into())
    }
}

fn strerror(errno: i32) -> String {
    let text = std::io::Error::from_raw_os_error(errno).to_string();
    // std appends " (os error N)"; the errno is the return value already.
    match text.find(" (os error") {
        Some(end) => text[..end].to_string(),
        None => text,
    }
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::Kernel { operation, errno, ext_ack: Some(text) } => {
                write!(f, "{operation}: kernel: {} ({text})", strerror(*errno))
            }
            Error::Kernel { operation, errno, .. } => write!(f, "{operation}: kernel: {}", strerror(*errno)),
            Error::EventsLost => {
                f.write_str("events lost: the event socket overflowed (ENOBUFS); resync needed (query every SA)")
            }
            Error::Os { operation, errno } => write!(f, "{operation}: {}", strerror(*errno)),
            Error::InvalidArgument(why) => write!(f, "invalid argument: {why}"),
            Error::Malformed(why) => write!(f, "malformed message: {why}"),
            Error::Truncated { size, buffer } => {
                write!(f, "netlink datagram of {size} bytes truncated to the {buffer}-byte receive buffer")
            }
            Error::Busy(why) => write!(f, "busy: {why}"),
            Error::TimedOut(operation) => write!(f, "{operation}: no answer from the kernel in time"),
            Error::RestoreFailed { state, cause } => write!(f, "{state}; restoring it failed: {cause}"),
            Error::NoRoom { need, have } => write!(f, "the buffer holds {have} bytes; {need} are needed"),
        }
    }
}

impl std::error::Error for Error {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn enobufs_means_only_lost_events() {
        assert_eq!(Error::EventsLost.errno(), libc::ENOBUFS);
        let send = Error::from_io("send", &std::io::Error::from_raw_os_error(libc::ENOBUFS));
        assert_eq!(send.errno(), libc::ENOMEM);
        let kernel = Error::Kernel { operation: "XFRM_MSG_NEWAE", errno: libc::ENOBUFS, ext_ack: None };
        assert_eq!(kernel.errno(), libc::ENOMEM);
    }

    #[test]
    fn kernel_errors_show_the_ext_ack_text() {
        let e = Error::Kernel {
            operation: "XFRM_MSG_NEWAE",
            errno: libc::EINVAL,
            ext_ack: Some("NLM_F_REPLACE flag is required".into()),
        };
        assert_eq!(e.to_string(), "XFRM_MSG_NEWAE: kernel: Invalid argument (NLM_F_REPLACE flag is required)");
    }
}
