//! Opening a handle in another network namespace never moves the caller's
//! thread, even where it could not move back: a process that is root only
//! in its own user namespace can enter a namespace that namespace owns, but
//! not return to the one it came from, which belongs to the parent.
//!
//! Plain `main` (no test harness): unshare(CLONE_NEWUSER) needs a process
//! with one thread.

use std::fs::File;

use xfrmsync::{Error, Handle, SaId};

fn netns_of_this_thread() -> String {
    std::fs::read_link("/proc/thread-self/ns/net").unwrap().display().to_string()
}

fn main() {
    // SAFETY: plain syscall; this process has one thread here.
    if unsafe { libc::unshare(libc::CLONE_NEWUSER) } != 0 {
        eprintln!("netns_userns: unshare(CLONE_NEWUSER) failed: {}", std::io::Error::last_os_error());
        println!("netns_userns: 0 passed, 1 failed");
        std::process::exit(1);
    }
    // A namespace of our own user namespace, made on a thread that ends.
    let theirs: File = std::thread::spawn(|| {
        // SAFETY: plain syscall; it moves this short-lived thread only.
        assert_eq!(unsafe { libc::unshare(libc::CLONE_NEWNET) }, 0, "{}", std::io::Error::last_os_error());
        File::open("/proc/thread-self/ns/net").unwrap()
    })
    .join()
    .unwrap();
    let home = netns_of_this_thread();

    let (mut passed, mut failed) = (0, 0);
    let mut check = |ok: bool, what: &str| {
        println!("{} - {what}", if ok { "ok" } else { "not ok" });
        if ok {
            passed += 1;
        } else {
            failed += 1;
        }
    };
    let opened = Handle::builder().netns_fd(&theirs).events(false).open();
    check(opened.is_ok(), &format!("open in a namespace we could not return from: {:?}", opened.as_ref().err()));
    check(netns_of_this_thread() == home, "the calling thread stayed in its own namespace");
    if let Ok(handle) = opened {
        // Answered from the other namespace, where we hold CAP_NET_ADMIN.
        let unknown = handle.query(&SaId::esp("10.9.0.2".parse().unwrap(), 0xdead));
        check(
            matches!(unknown, Err(Error::Kernel { errno: libc::ESRCH, .. })),
            &format!("the handle talks to the other namespace's kernel: {unknown:?}"),
        );
    }
    println!("netns_userns: {passed} passed, {failed} failed");
    std::process::exit(i32::from(failed > 0));
}
