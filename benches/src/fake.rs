//! A kernel stand-in behind socket pairs, for what needs no real kernel:
//! the dispatch path through a socket, and a registry tracking many SAs
//! (it answers a GETSA dump with N SAs and acknowledges every NEWAE).

use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::time::Duration;

use xfrmsync::{Handle, Registry, Rule, SaMatch, Thresholds};

use crate::alloc;
use crate::corpus::{datagrams, Stream};

fn pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0);
    for fd in fds {
        let big: libc::c_int = 64 << 20;
        for opt in [libc::SO_SNDBUFFORCE, libc::SO_RCVBUFFORCE] {
            // SAFETY: an int option on our fd.
            unsafe {
                libc::setsockopt(fd, libc::SOL_SOCKET, opt, (&big as *const libc::c_int).cast(), 4);
            }
        }
    }
    // SAFETY: both fds are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send(fd: &OwnedFd, bytes: &[u8]) {
    // SAFETY: pointer and length of `bytes`.
    let n = unsafe { libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), libc::MSG_NOSIGNAL) };
    assert_eq!(n, bytes.len() as isize, "send: {}", std::io::Error::last_os_error());
}

#[allow(dead_code)] // the request end stays open for the handle
pub struct Kernel {
    pub requests: OwnedFd,
    pub events: OwnedFd,
}

/// A handle on socket pairs; the other ends are the "kernel".
pub fn handle() -> (Kernel, Handle) {
    let (user_req, kernel_req) = pair();
    let (user_ev, kernel_ev) = pair();
    let handle = Handle::builder()
        .events(false)
        .dispatch_limit(1 << 20)
        .open_with_sockets(user_req, user_ev, None, 0x4242)
        .unwrap();
    (Kernel { requests: kernel_req, events: kernel_ev }, handle)
}

/// CPU time (user and system) this thread has used.
pub fn thread_cpu() -> Duration {
    // SAFETY: getrusage fills the struct we pass.
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    unsafe { libc::getrusage(libc::RUSAGE_THREAD, &mut ru) };
    let tv = |t: libc::timeval| Duration::new(t.tv_sec as u64, t.tv_usec as u32 * 1000);
    tv(ru.ru_utime) + tv(ru.ru_stime)
}

/// Events of `stream` queued on the event socket, a datagram each, as the
/// kernel queues them in a storm; then `Handle::dispatch` reads the backlog.
/// Returns the reading thread's CPU time (user and system: what the reader
/// costs, whatever else shares the cores), events, allocations per event.
pub fn through_socket(kernel: &Kernel, handle: &Handle, stream: &Stream) -> (Duration, usize, f64) {
    // What a 64 MiB socket buffer holds of them.
    let msgs: Vec<&[u8]> = stream.messages().take(40_000).collect();
    (0..3)
        .map(|_| {
            for m in &msgs {
                send(&kernel.events, m);
            }
            let start = thread_cpu();
            let before = alloc::count();
            let mut got = 0;
            while got < msgs.len() {
                got += handle.dispatch().unwrap();
            }
            let t = thread_cpu() - start;
            (t, got, (alloc::count() - before) as f64 / got as f64)
        })
        .min_by_key(|r| r.0)
        .unwrap()
}

/// NEWSA template: the first SA the corpus saw added.
fn newsa_template() -> Vec<u8> {
    let d = datagrams("events-sa-add.bin").remove(0);
    let len = u32::from_ne_bytes(d[..4].try_into().unwrap()) as usize;
    d[..len].to_vec()
}

const MSG_DAADR: usize = 16 + 56;
const MSG_SPI: usize = 16 + 72;

fn header(out: &mut Vec<u8>, len: u32, kind: u16, flags: u16, seq: u32) {
    out.extend_from_slice(&len.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes());
}

/// Serves `n` SAs: a GETSA dump lists them, every NEWAE is acknowledged.
/// Its buffers come from the caller, allocated before the measurement
/// starts (the counting allocator counts every thread).
fn serve_registry(fd: OwnedFd, n: usize, template: Vec<u8>, mut buf: Vec<u8>, mut out: Vec<u8>) {
    loop {
        // SAFETY: our buffer.
        let got = unsafe { libc::recv(fd.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if got <= 0 {
            return;
        }
        let mut at = 0;
        let got = got as usize;
        while at + 16 <= got {
            let len = u32::from_ne_bytes(buf[at..at + 4].try_into().unwrap()) as usize;
            let kind = u16::from_ne_bytes([buf[at + 4], buf[at + 5]]);
            let seq = u32::from_ne_bytes(buf[at + 8..at + 12].try_into().unwrap());
            match kind {
                0x12 => {
                    out.clear();
                    for i in 0..n {
                        let start = out.len();
                        out.extend_from_slice(&template);
                        let m = &mut out[start..];
                        m[6..8].copy_from_slice(&2u16.to_ne_bytes()); // NLM_F_MULTI
                        m[8..12].copy_from_slice(&seq.to_ne_bytes());
                        m[MSG_DAADR..MSG_DAADR + 4]
                            .copy_from_slice(&(0x0a00_0000u32 | (i as u32 & 0xff_ffff)).to_be_bytes());
                        m[MSG_SPI..MSG_SPI + 4].copy_from_slice(&(0x1000_0000 + i as u32).to_be_bytes());
                        out.resize((out.len() + 3) & !3, 0);
                        if out.len() > 28 << 10 {
                            send(&fd, &out);
                            out.clear();
                        }
                    }
                    if !out.is_empty() {
                        send(&fd, &out);
                    }
                    out.clear();
                    header(&mut out, 20, 3, 2, seq);
                    out.extend_from_slice(&0i32.to_ne_bytes());
                    send(&fd, &out);
                }
                _ => {
                    // An ack, capped: errno 0 and the request's header.
                    let mut ack = [0u8; 36];
                    ack[..4].copy_from_slice(&36u32.to_ne_bytes());
                    ack[4..6].copy_from_slice(&2u16.to_ne_bytes());
                    ack[6..8].copy_from_slice(&0x100u16.to_ne_bytes());
                    ack[8..12].copy_from_slice(&seq.to_ne_bytes());
                    ack[20..36].copy_from_slice(&buf[at..at + 16]);
                    send(&fd, &ack);
                }
            }
            at += (len.max(16) + 3) & !3;
        }
    }
}

pub struct Memory {
    /// Heap bytes live after the registry tracks the SAs, less before.
    pub live: usize,
    /// Highest heap use while it listed them and applied thresholds.
    pub peak: usize,
    pub rss: usize,
}

/// A registry on a fake kernel with `n` SAs: one rule for all of them, so
/// it lists every SA (GETSA dump), tracks each, and applies thresholds to
/// each (batched NEWAE).
pub fn registry_memory(n: usize) -> Memory {
    xfrmsync::timer::set_kernel_hz(250).ok();
    let (user_req, kernel_req) = pair();
    let (user_ev, _kernel_ev) = pair();
    let (template, buf, out) = (newsa_template(), vec![0u8; 1 << 20], Vec::with_capacity(64 << 10));
    let server = std::thread::spawn(move || serve_registry(kernel_req, n, template, buf, out));
    let handle = Handle::builder()
        .events(false)
        .request_timeout(Duration::from_secs(30))
        .open_with_sockets(user_req, user_ev, None, 0x4343)
        .unwrap();
    let registry = Registry::new(handle);
    let (live0, rss0) = (alloc::live(), alloc::rss());
    alloc::reset_peak();
    registry
        .add_rule(Rule {
            name: "all".into(),
            matches: SaMatch::default(),
            thresholds: Thresholds { replay_packets: 5, timer_ms: 1000 },
        })
        .expect("the rule applies on the fake kernel");
    assert_eq!(registry.tracked_count(), n);
    let sa = xfrmsync::SaId::esp(std::net::Ipv4Addr::from(0x0a00_0000u32 | 7).into(), 0x1000_0007);
    assert!(registry.tracked(&sa).and_then(|t| t.applied).is_some(), "thresholds applied and remembered");
    let m = Memory {
        live: (alloc::live() - live0).max(0) as usize,
        peak: (alloc::peak() - live0).max(0) as usize,
        rss: alloc::rss().saturating_sub(rss0),
    };
    drop(registry);
    let _ = server.join();
    m
}
