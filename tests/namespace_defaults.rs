//! A namespace's thresholds for new SAs (src/defaults.rs), on this
//! machine's kernel: read here, written only in private namespaces made for
//! the test, so the host's own values never change. That they reach new
//! SAs and spare existing ones is checked in the VM (tests/vm_hz.rs).

use std::ffi::{c_char, c_int, CString};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd};
use std::path::PathBuf;

use xfrmsync::defaults::{self, NamespaceDefaults};
use xfrmsync::{Error, NetnsRef};

/// A new network namespace, kept by an fd after the thread that made it ended.
fn private_netns() -> File {
    std::thread::spawn(|| {
        // SAFETY: a plain syscall; it moves this short-lived thread only.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", std::io::Error::last_os_error());
        File::open("/proc/thread-self/ns/net").unwrap()
    })
    .join()
    .unwrap()
}

fn netns_of_this_thread() -> PathBuf {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap()
}

fn sysctl(name: &str) -> u32 {
    std::fs::read_to_string(format!("/proc/sys/net/core/{name}")).unwrap().trim().parse().unwrap()
}

#[test]
fn reads_this_namespace_in_milliseconds_and_packets() {
    let here = defaults::read(NetnsRef::Current).unwrap();
    assert_eq!(here.timer_ms, sysctl("xfrm_aevent_etime") * 100);
    assert_eq!(here.replay_packets, sysctl("xfrm_aevent_rseqth"));
}

#[test]
fn writes_only_the_namespace_it_is_given() {
    let home = netns_of_this_thread();
    let host_before = defaults::read(NetnsRef::Current).unwrap();
    let ns = private_netns();
    let theirs = NetnsRef::Fd(ns.as_fd());
    // A new namespace starts from the kernel's defaults: 10 × 100 ms, 2 packets.
    assert_eq!(defaults::read(theirs).unwrap(), NamespaceDefaults { timer_ms: 1_000, replay_packets: 2 });

    let wanted = NamespaceDefaults { timer_ms: 2_300, replay_packets: 32 };
    defaults::write(theirs, &wanted).unwrap();
    assert_eq!(defaults::read(theirs).unwrap(), wanted);
    let by_path = format!("/proc/self/fd/{}", ns.as_raw_fd());
    assert_eq!(defaults::read(NetnsRef::Path(by_path.as_ref())).unwrap(), wanted);
    defaults::write(theirs, &NamespaceDefaults { timer_ms: 0, replay_packets: 0 }).unwrap();
    assert_eq!(defaults::read(theirs).unwrap(), NamespaceDefaults { timer_ms: 0, replay_packets: 0 });

    assert_eq!(defaults::read(NetnsRef::Current).unwrap(), host_before, "the host's values are untouched");
    assert_eq!(netns_of_this_thread(), home, "the calling thread never moved");
}

#[test]
fn refused_values_change_nothing() {
    let ns = private_netns();
    let theirs = NetnsRef::Fd(ns.as_fd());
    let before = defaults::read(theirs).unwrap();
    for timer_ms in [250, 1, u32::MAX / 100 * 100] {
        let err = defaults::write(theirs, &NamespaceDefaults { timer_ms, replay_packets: 77 }).unwrap_err();
        assert!(matches!(err, Error::InvalidArgument(_)), "{timer_ms} ms: {err:?}");
        assert_eq!(err.errno(), libc::EINVAL);
        println!("{timer_ms} ms: {err}");
    }
    assert_eq!(defaults::read(theirs).unwrap(), before, "the replay value was not written either");
    let missing = defaults::read(NetnsRef::Path("/nonexistent/netns".as_ref())).unwrap_err();
    assert_eq!(missing.errno(), libc::ENOENT);
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
struct CDefaults {
    timer_ms: u32,
    replay_packets: u32,
}

extern "C" {
    fn xfrmsync_netns_defaults_read(netns_path: *const c_char, out: *mut CDefaults) -> c_int;
    fn xfrmsync_netns_defaults_write(netns_path: *const c_char, defaults: *const CDefaults) -> c_int;
}

#[test]
fn the_c_pair_is_the_same() {
    let ns = private_netns();
    let path = CString::new(format!("/proc/self/fd/{}", ns.as_raw_fd())).unwrap();
    let mut out = CDefaults::default();
    // SAFETY: valid NUL-terminated strings and structs of the header's layout.
    unsafe {
        assert_eq!(xfrmsync_netns_defaults_read(std::ptr::null(), &mut out), 0);
        assert_eq!(out.timer_ms, sysctl("xfrm_aevent_etime") * 100);
        let set = CDefaults { timer_ms: 4_000, replay_packets: 9 };
        assert_eq!(xfrmsync_netns_defaults_write(path.as_ptr(), &set), 0);
        assert_eq!(xfrmsync_netns_defaults_read(path.as_ptr(), &mut out), 0);
        assert_eq!(out, set);
        let odd = CDefaults { timer_ms: 4_050, replay_packets: 9 };
        assert_eq!(xfrmsync_netns_defaults_write(path.as_ptr(), &odd), -libc::EINVAL);
        assert_eq!(xfrmsync_netns_defaults_write(path.as_ptr(), std::ptr::null()), -libc::EINVAL);
        assert_eq!(xfrmsync_netns_defaults_read(path.as_ptr(), std::ptr::null_mut()), -libc::EINVAL);
    }
}
