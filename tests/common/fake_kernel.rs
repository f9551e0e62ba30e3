//! A fake kernel behind a socket pair, for the paths a real kernel rarely
//! takes: it keeps one SA the way `xfrm_get_ae`/`xfrm_new_ae` do (timer
//! stored in jiffies, read back as `jiffies * 10 / HZ`), answers a handle's
//! requests, multicasts an update event for each `NEWAE` (with the request's
//! seq and port id, before the ack, as the kernel does), and injects faults
//! request by request. Like Linux before 7081d46d3231 (Debian 11's 5.10),
//! it makes room for an aevent without its `XFRMA_IF_ID` and, where the
//! answer outgrows that, "panics": it never answers again, and says so
//! ([`FakeKernel::panicked`]). It has no allocator slack to hide that.

use std::collections::VecDeque;
use std::net::IpAddr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use xfrmsync::aevent::flags;
use xfrmsync::wire::{self, Attrs, Messages};
use xfrmsync::{Handle, HandleBuilder, SaId};

const NLMSG_ERROR: u16 = 2;
const XFRMA_LTIME_VAL: u16 = 9;
const XFRMA_REPLAY_VAL: u16 = 10;
const XFRMA_REPLAY_THRESH: u16 = 11;
const XFRMA_ETIMER_THRESH: u16 = 12;
const XFRMA_MARK: u16 = 21;
const XFRMA_IF_ID: u16 = 31;

/// `xfrm_aevent_msgsize()` of Linux 5.10 for an SA with legacy replay
/// state: the aevent id, the replay state, the lifetime, the mark and both
/// thresholds; no `XFRMA_IF_ID`.
pub const AEVENT_ROOM_5_10: usize = 48 + (4 + 12) + (4 + 32) + (4 + 8) + 8 + 8;

/// What the fake does with the next request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fault {
    /// Answers as the kernel would.
    Pass,
    /// Refuses with this errno; nothing is applied.
    Errno(i32),
    /// Applies it but never answers (a lost or late answer).
    Silent,
    /// Answers as the kernel would, after this many milliseconds.
    Delay(u64),
    /// Never answers; sends an answer with a wrong seq every 100 ms instead,
    /// this many times.
    Stale(u32),
    /// Answers with the next datagrams queued by [`FakeKernel::script`],
    /// as they are, except that a message whose seq is [`REQUEST_SEQ`]
    /// gets the request's. Nothing is applied.
    Script,
}

/// In a scripted answer: "the seq of the request this answers".
pub const REQUEST_SEQ: u32 = u32::MAX;

/// The fake's one SA.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaState {
    pub sa: SaId,
    pub hz: u32,
    pub timer_jiffies: u32,
    pub replay_threshold: u32,
    pub oseq: u32,
    pub seq: u32,
    pub bitmap: u32,
    pub packets: u64,
}

impl SaState {
    pub fn new(timer_jiffies: u32) -> SaState {
        SaState {
            sa: SaId::esp("10.9.0.2".parse().unwrap(), 0x1001),
            hz: 250,
            timer_jiffies,
            replay_threshold: 2,
            oseq: 0,
            seq: 0,
            bitmap: 0,
            packets: 0,
        }
    }
}

/// One request as the fake received it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Seen {
    pub kind: u16,
    pub seq: u32,
    pub port_id: u32,
    pub timer_jiffies: Option<u32>,
    pub replay_threshold: Option<u32>,
    /// The `xfrm_aevent_id` flags of a GETAE or NEWAE.
    pub ae_flags: u32,
    /// The SPI a GETAE or NEWAE names.
    pub spi: u32,
}

struct Shared {
    state: SaState,
    faults: VecDeque<Fault>,
    seen: Vec<Seen>,
    scripts: VecDeque<Vec<Vec<u8>>>,
    panicked: bool,
}

pub struct FakeKernel {
    shared: Arc<Mutex<Shared>>,
    requests: Arc<OwnedFd>,
    /// The handle's listing socket (dumps read in steps), served alike.
    listing: Arc<OwnedFd>,
    events: OwnedFd,
    servers: Vec<JoinHandle<()>>,
}

fn seqpacket_pair() -> (OwnedFd, OwnedFd) {
    let mut fds = [0; 2];
    // SAFETY: socketpair writes two fds into the array we pass.
    let rc = unsafe { libc::socketpair(libc::AF_UNIX, libc::SOCK_SEQPACKET | libc::SOCK_CLOEXEC, 0, fds.as_mut_ptr()) };
    assert_eq!(rc, 0, "socketpair: {}", std::io::Error::last_os_error());
    // SAFETY: both fds are new and ours.
    unsafe { (OwnedFd::from_raw_fd(fds[0]), OwnedFd::from_raw_fd(fds[1])) }
}

fn send(fd: &OwnedFd, bytes: &[u8], flags: i32) -> bool {
    // SAFETY: the pointer and length describe `bytes`.
    unsafe {
        libc::send(fd.as_raw_fd(), bytes.as_ptr().cast(), bytes.len(), flags | libc::MSG_NOSIGNAL)
            == bytes.len() as isize
    }
}

fn header(out: &mut Vec<u8>, kind: u16, flags: u16, seq: u32, port_id: u32) {
    out.extend_from_slice(&0u32.to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&flags.to_ne_bytes());
    out.extend_from_slice(&seq.to_ne_bytes());
    out.extend_from_slice(&port_id.to_ne_bytes());
}

fn attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    out.extend_from_slice(&((4 + payload.len()) as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize((out.len() + 3) & !3, 0);
}

fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// An `XFRM_MSG_NEWAE` from the kernel about `s`, appended to `out`.
pub fn aevent(out: &mut Vec<u8>, s: &SaState, ae_flags: u32, seq: u32, port_id: u32) {
    let start = out.len();
    header(out, wire::XFRM_MSG_NEWAE, 0, seq, port_id);
    let IpAddr::V4(daddr) = s.sa.daddr else { panic!("the fake keeps an IPv4 SA") };
    let mut id = [0u8; 48];
    id[..4].copy_from_slice(&daddr.octets());
    id[16..20].copy_from_slice(&s.sa.spi.to_be_bytes());
    id[20..22].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    id[22] = s.sa.proto;
    id[24..28].copy_from_slice(&[10, 9, 0, 1]);
    id[40..44].copy_from_slice(&ae_flags.to_ne_bytes());
    id[44..48].copy_from_slice(&1u32.to_ne_bytes());
    out.extend_from_slice(&id);
    let replay: Vec<u8> = [s.oseq, s.seq, s.bitmap].iter().flat_map(|v| v.to_ne_bytes()).collect();
    attr(out, XFRMA_REPLAY_VAL, &replay);
    let lifetime: Vec<u8> =
        [s.packets * 64, s.packets, 1_700_000_000, 0].iter().flat_map(|v| v.to_ne_bytes()).collect();
    attr(out, XFRMA_LTIME_VAL, &lifetime);
    if ae_flags & flags::RTHR != 0 {
        attr(out, XFRMA_REPLAY_THRESH, &s.replay_threshold.to_ne_bytes());
    }
    if ae_flags & flags::ETHR != 0 {
        let reported = (u64::from(s.timer_jiffies) * 10 / u64::from(s.hz)) as u32;
        attr(out, XFRMA_ETIMER_THRESH, &reported.to_ne_bytes());
    }
    let mark = s.sa.mark;
    if mark.is_set() {
        let raw: Vec<u8> = [mark.value, mark.mask].iter().flat_map(|v| v.to_ne_bytes()).collect();
        attr(out, XFRMA_MARK, &raw);
    }
    if s.sa.if_id != 0 {
        attr(out, XFRMA_IF_ID, &s.sa.if_id.to_ne_bytes());
    }
    finish(out, start);
}

fn error(out: &mut Vec<u8>, errno: i32, request: &wire::NlMsg<'_>) {
    let start = out.len();
    header(out, NLMSG_ERROR, 0x100, request.seq, 0); // NLM_F_CAPPED: only the header echoed
    out.extend_from_slice(&(-errno).to_ne_bytes());
    header(out, request.kind, request.flags, request.seq, request.port_id);
    let echoed = out.len() - 16;
    out[echoed..echoed + 4].copy_from_slice(&(16 + request.payload.len() as u32).to_ne_bytes());
    finish(out, start);
}

impl FakeKernel {
    /// A fake kernel keeping `state`, and a handle talking to it. The handle
    /// does not join a multicast group (a socket pair has none).
    pub fn start(state: SaState, builder: HandleBuilder, port_id: u32) -> (FakeKernel, Handle) {
        let (user_requests, kernel_requests) = seqpacket_pair();
        let (user_listing, kernel_listing) = seqpacket_pair();
        let (user_events, kernel_events) = seqpacket_pair();
        let shared = Arc::new(Mutex::new(Shared {
            state,
            faults: VecDeque::new(),
            seen: Vec::new(),
            scripts: VecDeque::new(),
            panicked: false,
        }));
        let requests = Arc::new(kernel_requests);
        let listing = Arc::new(kernel_listing);
        let servers = [requests.clone(), listing.clone()]
            .into_iter()
            .map(|socket| {
                let (shared, events) = (shared.clone(), kernel_events.try_clone().unwrap());
                std::thread::spawn(move || serve(&shared, &socket, &events))
            })
            .collect();
        let handle = builder
            .events(false)
            .open_with_sockets(user_requests, user_events, Some(user_listing), port_id)
            .expect("handle on a socket pair");
        let fake = FakeKernel { shared, requests, listing, events: kernel_events, servers };
        (fake, handle)
    }

    /// What the next requests meet, in order; after these, `Pass`.
    pub fn faults(&self, faults: &[Fault]) {
        self.shared.lock().unwrap().faults.extend(faults);
    }

    /// The next request is answered with `datagrams` (see [`Fault::Script`]).
    pub fn script(&self, datagrams: Vec<Vec<u8>>) {
        let mut s = self.shared.lock().unwrap();
        s.faults.push_back(Fault::Script);
        s.scripts.push_back(datagrams);
    }

    /// Puts one datagram, whatever it holds, on the event socket.
    pub fn send_event_datagram(&self, datagram: &[u8]) -> bool {
        send(&self.events, datagram, libc::MSG_DONTWAIT)
    }

    pub fn state(&self) -> SaState {
        self.shared.lock().unwrap().state
    }

    /// The SA's state from now on: what a GETAE answers.
    pub fn set_state(&self, state: SaState) {
        self.shared.lock().unwrap().state = state;
    }

    /// Whether a request made the fake outgrow its answer's room, as
    /// `BUG_ON(err < 0)` in 5.10's `xfrm_get_ae` does.
    pub fn panicked(&self) -> bool {
        self.shared.lock().unwrap().panicked
    }

    pub fn seen(&self) -> Vec<Seen> {
        self.shared.lock().unwrap().seen.clone()
    }

    /// Queues traffic events (cause replay), `per_datagram` to a datagram,
    /// without blocking; returns how many datagrams went out.
    pub fn send_events(&self, datagrams: usize, per_datagram: usize) -> usize {
        let mut state = self.state();
        for n in 0..datagrams {
            let mut out = Vec::new();
            for _ in 0..per_datagram {
                state.seq += 1;
                aevent(&mut out, &state, flags::CR, 0, 0);
            }
            if !send(&self.events, &out, libc::MSG_DONTWAIT) {
                return n;
            }
        }
        datagrams
    }
}

impl Drop for FakeKernel {
    fn drop(&mut self) {
        for socket in [&self.requests, &self.listing] {
            // SAFETY: shutdown on an fd we own; it wakes the server's recv.
            unsafe { libc::shutdown(socket.as_raw_fd(), libc::SHUT_RDWR) };
        }
        for server in self.servers.drain(..) {
            let _ = server.join();
        }
    }
}

fn serve(shared: &Mutex<Shared>, requests: &OwnedFd, events: &OwnedFd) {
    let mut buf = vec![0u8; 65536];
    loop {
        // SAFETY: the pointer and length describe `buf`.
        let n = unsafe { libc::recv(requests.as_raw_fd(), buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n <= 0 {
            return;
        }
        // As the kernel does: the messages of a datagram in order, each
        // meeting the next fault.
        for msg in Messages::new(&buf[..n as usize]).map_while(|m| m.ok()) {
            serve_one(shared, requests, events, &msg);
        }
    }
}

fn serve_one(shared: &Mutex<Shared>, requests: &OwnedFd, events: &OwnedFd, msg: &wire::NlMsg<'_>) {
    let word = |at: usize| msg.payload.get(at..at + 4).map_or(0, |raw| u32::from_ne_bytes(raw.try_into().unwrap()));
    let ae_flags = word(40);
    let mut seen = Seen {
        kind: msg.kind,
        seq: msg.seq,
        port_id: msg.port_id,
        timer_jiffies: None,
        replay_threshold: None,
        ae_flags,
        spi: u32::from_be(word(16)),
    };
    if msg.kind == wire::XFRM_MSG_NEWAE {
        for (kind, payload) in Attrs::new(&msg.payload[48..]).flatten() {
            let value = Some(u32::from_ne_bytes(payload[..4].try_into().unwrap()));
            match kind {
                XFRMA_ETIMER_THRESH => seen.timer_jiffies = value,
                XFRMA_REPLAY_THRESH => seen.replay_threshold = value,
                _ => {}
            }
        }
    }
    let fault = {
        let mut s = shared.lock().unwrap();
        if s.panicked {
            return;
        }
        s.seen.push(seen);
        s.faults.pop_front().unwrap_or(Fault::Pass)
    };
    if fault == Fault::Script {
        let script = shared.lock().unwrap().scripts.pop_front().unwrap_or_default();
        for mut datagram in script {
            let mut at = 0;
            while at + 16 <= datagram.len() {
                let len = u32::from_ne_bytes(datagram[at..at + 4].try_into().unwrap()) as usize;
                if datagram[at + 8..at + 12] == REQUEST_SEQ.to_ne_bytes() {
                    datagram[at + 8..at + 12].copy_from_slice(&msg.seq.to_ne_bytes());
                }
                if len < 16 {
                    break;
                }
                at += (len + 3) & !3;
            }
            send(requests, &datagram, 0);
        }
        return;
    }
    let mut answer = Vec::new();
    match fault {
        Fault::Errno(errno) => error(&mut answer, errno, msg),
        Fault::Stale(times) => {
            let state = shared.lock().unwrap().state;
            for _ in 0..times {
                let mut stale = Vec::new();
                aevent(&mut stale, &state, 0, msg.seq.wrapping_sub(1000), msg.port_id);
                send(requests, &stale, 0);
                std::thread::sleep(Duration::from_millis(100));
            }
            return;
        }
        Fault::Script => unreachable!("answered above"),
        Fault::Pass | Fault::Silent | Fault::Delay(_) => {
            let mut s = shared.lock().unwrap();
            if msg.kind == wire::XFRM_MSG_GETAE {
                aevent(&mut answer, &s.state, ae_flags, msg.seq, msg.port_id);
                if answer.len() - 16 > AEVENT_ROOM_5_10 {
                    s.panicked = true;
                    return;
                }
            } else if msg.flags & wire::NLM_F_REPLACE == 0 {
                error(&mut answer, libc::EINVAL, msg);
            } else {
                if let Some(j) = seen.timer_jiffies {
                    s.state.timer_jiffies = j;
                }
                if let Some(t) = seen.replay_threshold {
                    s.state.replay_threshold = t;
                }
                let mut update = Vec::new();
                aevent(&mut update, &s.state, flags::CU, msg.seq, msg.port_id);
                send(events, &update, libc::MSG_DONTWAIT);
                // Netlink acknowledges a success only when asked to.
                if msg.flags & wire::NLM_F_ACK != 0 {
                    error(&mut answer, 0, msg);
                }
            }
        }
    }
    if answer.is_empty() {
        return;
    }
    match fault {
        Fault::Silent => {}
        Fault::Delay(ms) => {
            std::thread::sleep(Duration::from_millis(ms));
            send(requests, &answer, 0);
        }
        _ => {
            send(requests, &answer, 0);
        }
    }
}
