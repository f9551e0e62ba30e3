//! Work in another network namespace on a short-lived helper thread.
//!
//! A namespace is a property of the thread. Sockets keep the namespace they
//! were made in, and `/proc/sys/net` shows the namespace of the thread that
//! opens a file there, so the helper enters the namespace, does the work,
//! and ends; its namespace ends with it. The caller's thread never moves,
//! so there is nothing to move back, which could fail (a process that is
//! root only in its own user namespace may enter a namespace it cannot
//! leave).

use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd};
use std::path::Path;

use crate::error::{Error, Result};

/// A network namespace to work in.
#[derive(Debug, Clone, Copy)]
pub enum NetnsRef<'a> {
    /// The calling thread's own; the work runs on the calling thread.
    Current,
    /// The namespace at this path (`/run/netns/NAME`, `/proc/PID/ns/net`).
    Path(&'a Path),
    /// The namespace this fd refers to; the fd stays the caller's.
    Fd(BorrowedFd<'a>),
}

impl NetnsRef<'_> {
    /// Runs `work` in this namespace. Entering another one needs
    /// `CAP_SYS_ADMIN`.
    pub(crate) fn run<T: Send>(self, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        match self {
            NetnsRef::Current => work(),
            NetnsRef::Path(path) => {
                let ns = File::open(path).map_err(|e| Error::from_io("open netns", &e))?;
                run_in(ns.as_fd(), work)
            }
            NetnsRef::Fd(ns) => run_in(ns, work),
        }
    }
}

/// Runs `work` on a helper thread that first enters the namespace `ns`.
pub(crate) fn run_in<T: Send>(ns: BorrowedFd<'_>, work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    on_helper_thread(
        || {
            // SAFETY: setns only reads the fd, which `ns` keeps open for the
            // call; it changes the calling (helper) thread alone.
            if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(Error::last_os("enter netns"));
            }
            Ok(())
        },
        work,
    )
}

/// Runs `work` on a helper thread in a new network namespace of its own.
/// Nothing else can see into it, and it goes away once the thread and
/// whatever `work` opened in it are gone.
pub(crate) fn run_in_private<T: Send>(work: impl FnOnce() -> Result<T> + Send) -> Result<T> {
    on_helper_thread(
        || {
            // SAFETY: a plain syscall; without CLONE_NEWUSER or CLONE_FS it
            // is allowed in a multi-threaded process and moves only the
            // calling (helper) thread.
            if unsafe { libc::unshare(libc::CLONE_NEWNET) } != 0 {
                return Err(Error::last_os("create a private netns (unshare)"));
            }
            Ok(())
        },
        work,
    )
}

fn on_helper_thread<T: Send>(
    enter: impl FnOnce() -> Result<()> + Send,
    work: impl FnOnce() -> Result<T> + Send,
) -> Result<T> {
    std::thread::scope(|scope| {
        std::thread::Builder::new()
            .name("xfrmsync-netns".into())
            .spawn_scoped(scope, || {
                enter()?;
                work()
            })
            .map_err(|e| Error::from_io("start a netns helper thread", &e))?
            .join()
            .unwrap_or_else(|_| {
                Err(Error::Os { operation: "work in another netns (helper thread panicked)", errno: libc::EIO })
            })
    })
}
