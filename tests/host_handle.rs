//! The Rust API against this machine's kernel, which has XFRM netlink but no
//! SAs (and no ESP): errors and the event socket. Needs CAP_NET_ADMIN, like
//! everything that talks XFRM netlink; the SA checks run in the VM.

use std::os::fd::AsRawFd;

use xfrmsync::{AeUpdate, Error, Handle, SaId};

fn unknown_sa() -> SaId {
    SaId::esp("10.9.0.2".parse().unwrap(), 0xdead)
}

#[test]
fn unknown_sa_is_esrch_with_the_request_named() {
    let handle = Handle::open().expect("open (needs CAP_NET_ADMIN)");
    let err = handle.query(&unknown_sa()).unwrap_err();
    assert!(matches!(err, Error::Kernel { errno: libc::ESRCH, .. }), "{err:?}");
    assert_eq!(err.errno(), libc::ESRCH);
    assert!(err.to_string().contains("XFRM_MSG_GETAE"), "{err}");
    let err = handle.set_thresholds(&unknown_sa().with_mark(7, 0xff), 4, 1000).unwrap_err();
    assert_eq!(err.errno(), libc::ESRCH, "{err}");
}

#[test]
fn empty_update_is_refused_before_the_kernel() {
    let handle = Handle::builder().events(false).open().unwrap();
    let err = handle.update(&unknown_sa(), &AeUpdate::default()).unwrap_err();
    assert!(matches!(err, Error::InvalidArgument(_)), "{err:?}");
}

#[test]
fn event_socket_is_pollable_and_drains_at_once() {
    let handle = Handle::builder().receive_buffer(1 << 20).open().unwrap();
    // SAFETY: fcntl on an fd the handle owns and keeps open.
    let flags = unsafe { libc::fcntl(handle.as_raw_fd(), libc::F_GETFL) };
    assert_ne!(flags & libc::O_NONBLOCK, 0);
    assert_eq!(handle.events().count(), 0);
    assert_eq!(handle.dispatch().unwrap(), 0);
}

#[test]
fn netns_by_path_and_fd() {
    let by_path = Handle::builder().netns_path("/proc/self/ns/net").open();
    assert!(by_path.is_ok(), "{:?}", by_path.err());
    let ns = std::fs::File::open("/proc/self/ns/net").unwrap();
    let by_fd = Handle::builder().netns_fd(&ns).open();
    assert!(by_fd.is_ok(), "{:?}", by_fd.err());
    let missing = Handle::builder().netns_path("/nonexistent").open().err().unwrap();
    assert_eq!(missing.errno(), libc::ENOENT);
}

#[test]
fn handle_moves_between_threads() {
    fn assert_send<T: Send>() {}
    assert_send::<Handle>();
    let handle = Handle::open().unwrap();
    let moved = std::thread::spawn(move || handle.dispatch().map(|_| handle)).join().unwrap();
    assert!(moved.is_ok());
}
