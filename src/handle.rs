//! The handle: two `NETLINK_XFRM` sockets, requests, and event dispatch.
//!
//! Requests and events use separate sockets so that a query never has to
//! step over (or buffer) events, and so that `ENOBUFS` on the event socket
//! means exactly "events were lost". The event socket is the one fd handed
//! out for poll/epoll; nothing blocks on it and no thread is started.

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, BorrowedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::Duration;

use netlink_sys::{protocols::NETLINK_XFRM, Socket};

use crate::aevent::{AeUpdate, Aevent, Replay};
use crate::error::{Error, Result};
use crate::events::{Callback, Router};
use crate::sa::SaId;
use crate::timer;
use crate::wire::{self, Messages, NewAe};

/// Netlink multicast datagrams of this group are single small messages;
/// 32 KiB leaves room for anything a kernel sends on it.
const EVENT_BUFFER: usize = 32 * 1024;
const REQUEST_BUFFER: usize = 16 * 1024;
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);

enum Netns {
    Current,
    Path(PathBuf),
    Fd(RawFd),
}

/// Options for [`Handle`]; `Handle::builder().open()` gives the defaults.
pub struct HandleBuilder {
    netns: Netns,
    events: bool,
    receive_buffer: Option<usize>,
    request_timeout: Duration,
}

impl HandleBuilder {
    /// Open the sockets inside the network namespace at `path`
    /// (`/run/netns/NAME`, `/proc/PID/ns/net`). Needs `CAP_SYS_ADMIN`.
    pub fn netns_path(mut self, path: impl AsRef<Path>) -> Self {
        self.netns = Netns::Path(path.as_ref().to_path_buf());
        self
    }

    /// Open the sockets inside the network namespace `fd` refers to. The fd
    /// is only used during `open` and stays the caller's.
    pub fn netns_fd(mut self, fd: RawFd) -> Self {
        self.netns = Netns::Fd(fd);
        self
    }

    /// Join `XFRMNLGRP_AEVENTS` (the default). The kernel generates events
    /// only while somebody has joined, so a query-only tool can say `false`.
    pub fn events(mut self, join: bool) -> Self {
        self.events = join;
        self
    }

    /// Receive buffer of the event socket, in bytes.
    pub fn receive_buffer(mut self, bytes: usize) -> Self {
        self.receive_buffer = Some(bytes);
        self
    }

    /// How long a request waits for the kernel's answer.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    pub fn open(self) -> Result<Handle> {
        let (requests, events) = match &self.netns {
            Netns::Current => open_sockets()?,
            Netns::Path(path) => {
                let ns = File::open(path).map_err(|e| Error::from_io("open netns", &e))?;
                in_netns(ns.as_fd(), open_sockets)?
            }
            Netns::Fd(fd) => {
                if *fd < 0 {
                    return Err(Error::invalid("negative netns fd"));
                }
                // SAFETY: the caller lends an open fd for the duration of
                // this call; we neither keep nor close it.
                let ns = unsafe { BorrowedFd::borrow_raw(*fd) };
                in_netns(ns, open_sockets)?
            }
        };
        set_receive_timeout(&requests, self.request_timeout)?;
        // Both options are best effort: without them errors still arrive,
        // just with the request echoed and no explanatory text.
        let _ = requests.set_ext_ack(true);
        let _ = requests.set_cap_ack(true);
        events
            .set_non_blocking(true)
            .map_err(|e| Error::from_io("set event socket non-blocking", &e))?;
        let handle = Handle {
            requests: RefCell::new(Requests {
                socket: requests,
                seq: 0,
                out: Vec::with_capacity(1024),
                buf: vec![0; REQUEST_BUFFER],
            }),
            events: RefCell::new(EventReader {
                socket: events,
                buf: vec![0; EVENT_BUFFER].into_boxed_slice(),
                len: 0,
                pos: 0,
            }),
            router: RefCell::new(Router::default()),
            dispatching: Cell::new(false),
        };
        if let Some(bytes) = self.receive_buffer {
            handle.set_receive_buffer(bytes)?;
        }
        if self.events {
            handle.subscribe(true)?;
        }
        Ok(handle)
    }
}

fn open_sockets() -> Result<(Socket, Socket)> {
    let open = || -> Result<Socket> {
        let mut s = Socket::new(NETLINK_XFRM).map_err(|e| Error::from_io("open NETLINK_XFRM socket", &e))?;
        s.bind_auto().map_err(|e| Error::from_io("bind netlink socket", &e))?;
        Ok(s)
    };
    Ok((open()?, open()?))
}

/// Runs `f` with the calling thread inside the namespace `ns`, then moves
/// the thread back. Sockets keep the namespace they were created in.
fn in_netns<T>(ns: BorrowedFd<'_>, f: impl FnOnce() -> Result<T>) -> Result<T> {
    let home = File::open("/proc/thread-self/ns/net").map_err(|e| Error::from_io("open own netns", &e))?;
    // SAFETY: setns only reads the fd, which `ns` keeps open for the call.
    if unsafe { libc::setns(ns.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        return Err(Error::last_os("enter netns"));
    }
    let result = f();
    // SAFETY: as above, `home` is an open namespace fd we own.
    if unsafe { libc::setns(home.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
        let err = Error::last_os("return to own netns");
        log::error!("{err}: this thread stays in the other network namespace");
        return Err(err);
    }
    result
}

fn set_receive_timeout(socket: &Socket, timeout: Duration) -> Result<()> {
    let tv = libc::timeval {
        tv_sec: timeout.as_secs().min(i32::MAX as u64) as libc::time_t,
        tv_usec: libc::suseconds_t::from(timeout.subsec_micros() as i32),
    };
    // SAFETY: the pointer and length describe `tv`, alive for the call.
    let rc = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVTIMEO,
            (&tv as *const libc::timeval).cast(),
            std::mem::size_of::<libc::timeval>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(Error::last_os("set request timeout"));
    }
    Ok(())
}

struct Requests {
    socket: Socket,
    seq: u32,
    out: Vec<u8>,
    buf: Vec<u8>,
}

/// What a request waits for.
enum Expect {
    Aevent,
    Ack,
}

impl Requests {
    fn next_seq(&mut self) -> u32 {
        self.seq = self.seq.wrapping_add(1).max(1);
        self.seq
    }

    /// Sends `self.out` and waits for the answer with `seq`. Answers to
    /// earlier requests that timed out are skipped, as is anything not from
    /// the kernel.
    fn transact(&mut self, operation: &'static str, seq: u32, expect: Expect) -> Result<Option<Aevent>> {
        self.socket
            .send(&self.out, 0)
            .map_err(|e| Error::from_io(operation, &e))?;
        loop {
            let mut window = &mut self.buf[..];
            let (size, from) = match self.socket.recv_from(&mut window, libc::MSG_TRUNC) {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return Err(Error::TimedOut(operation))
                }
                Err(e) => return Err(Error::from_io(operation, &e)),
            };
            if from.port_number() != 0 {
                continue;
            }
            if size > self.buf.len() {
                return Err(Error::Truncated {
                    size,
                    buffer: self.buf.len(),
                });
            }
            for msg in Messages::new(&self.buf[..size]) {
                let msg = msg?;
                if msg.seq != seq {
                    continue;
                }
                match (msg.kind, &expect) {
                    (wire::NLMSG_ERROR, _) => {
                        let ack = wire::decode_ack(&msg)?;
                        if ack.errno != 0 {
                            return Err(Error::Kernel {
                                operation,
                                errno: ack.errno,
                                ext_ack: ack.ext_ack.map(str::to_owned),
                            });
                        }
                        if let Expect::Ack = expect {
                            return Ok(None);
                        }
                    }
                    (wire::XFRM_MSG_NEWAE, Expect::Aevent) => {
                        return wire::decode_aevent(msg.payload).map(Some)
                    }
                    _ => {}
                }
            }
        }
    }
}

struct EventReader {
    socket: Socket,
    buf: Box<[u8]>,
    len: usize,
    pos: usize,
}

impl EventReader {
    /// The next `NEWAE` in the socket, without blocking.
    fn next(&mut self) -> Result<Option<Aevent>> {
        loop {
            if self.pos < self.len {
                let parsed = wire::parse_message(&self.buf[self.pos..self.len]);
                // Advance before decoding, so a bad message is reported once
                // and the next call goes on behind it.
                self.pos = match &parsed {
                    Ok((_, consumed)) => self.pos + consumed,
                    Err(_) => self.len,
                };
                let (msg, _) = parsed?;
                match msg.kind {
                    wire::XFRM_MSG_NEWAE => return wire::decode_aevent(msg.payload).map(Some),
                    wire::NLMSG_OVERRUN => return Err(Error::EventsLost),
                    _ => continue,
                }
            }
            let mut window = &mut self.buf[..];
            let (size, from) = match self
                .socket
                .recv_from(&mut window, libc::MSG_TRUNC | libc::MSG_DONTWAIT)
            {
                Ok(r) => r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => return Ok(None),
                // Only here does ENOBUFS mean what it means: the kernel could
                // not queue events for this socket and dropped them.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => return Err(Error::EventsLost),
                Err(e) => return Err(Error::from_io("receive events", &e)),
            };
            self.len = 0;
            self.pos = 0;
            if from.port_number() != 0 {
                log::debug!("dropped a datagram from port {}, not the kernel", from.port_number());
                continue;
            }
            if size > self.buf.len() {
                return Err(Error::Truncated {
                    size,
                    buffer: self.buf.len(),
                });
            }
            self.len = size;
        }
    }
}

/// A connection to the kernel's XFRM netlink in one network namespace.
///
/// Methods take `&self`, so a callback running inside [`Handle::dispatch`]
/// may query and configure SAs through the same handle; dispatching or
/// (un)registering callbacks from inside a callback gives [`Error::Busy`].
/// A handle may move between threads and is used by one at a time.
pub struct Handle {
    requests: RefCell<Requests>,
    events: RefCell<EventReader>,
    router: RefCell<Router>,
    dispatching: Cell<bool>,
}

impl Handle {
    pub fn builder() -> HandleBuilder {
        HandleBuilder {
            netns: Netns::Current,
            events: true,
            receive_buffer: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    /// A handle in the current network namespace, joined to the aevents group.
    pub fn open() -> Result<Handle> {
        Handle::builder().open()
    }

    /// The fd to poll for events (readable = call [`Handle::dispatch`]).
    pub fn event_fd(&self) -> RawFd {
        self.events.borrow().socket.as_raw_fd()
    }

    /// Join or leave `XFRMNLGRP_AEVENTS`.
    pub fn subscribe(&self, join: bool) -> Result<()> {
        let events = self.events.try_borrow().map_err(|_| Error::Busy("event socket in use"))?;
        let result = if join {
            events.socket.add_membership(wire::XFRMNLGRP_AEVENTS)
        } else {
            events.socket.drop_membership(wire::XFRMNLGRP_AEVENTS)
        };
        result.map_err(|e| Error::from_io("join XFRMNLGRP_AEVENTS", &e))
    }

    /// Sets the event socket's receive buffer; as root the system limit
    /// (`net.core.rmem_max`) is bypassed.
    pub fn set_receive_buffer(&self, bytes: usize) -> Result<()> {
        let events = self.events.try_borrow().map_err(|_| Error::Busy("event socket in use"))?;
        let value = libc::c_int::try_from(bytes)
            .map_err(|_| Error::invalid("receive buffer larger than INT_MAX"))?;
        // SAFETY: the pointer and length describe `value`, alive for the call.
        let forced = unsafe {
            libc::setsockopt(
                events.socket.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_RCVBUFFORCE,
                (&value as *const libc::c_int).cast(),
                std::mem::size_of::<libc::c_int>() as libc::socklen_t,
            )
        };
        if forced == 0 {
            return Ok(());
        }
        events
            .socket
            .set_rx_buf_sz(value)
            .map_err(|e| Error::from_io("set receive buffer", &e))
    }

    fn requests(&self) -> Result<std::cell::RefMut<'_, Requests>> {
        self.requests
            .try_borrow_mut()
            .map_err(|_| Error::Busy("a request is in progress on this handle"))
    }

    fn getae(&self, sa: &SaId, thresholds: bool) -> Result<Aevent> {
        let mut req = self.requests()?;
        let seq = req.next_seq();
        wire::encode_getae(&mut req.out, seq, sa, thresholds);
        req.transact("XFRM_MSG_GETAE", seq, Expect::Aevent)?
            .ok_or(Error::Malformed("GETAE answered without an aevent"))
    }

    fn newae(&self, sa: &SaId, set: &NewAe<'_>) -> Result<()> {
        let mut req = self.requests()?;
        let seq = req.next_seq();
        wire::encode_newae(&mut req.out, seq, sa, set);
        req.transact("XFRM_MSG_NEWAE", seq, Expect::Ack).map(|_| ())
    }

    /// Current replay state and lifetime counters of `sa`.
    pub fn query(&self, sa: &SaId) -> Result<Aevent> {
        self.getae(sa, false)
    }

    /// Like [`Handle::query`], with both thresholds filled in.
    pub fn query_with_thresholds(&self, sa: &SaId) -> Result<Aevent> {
        self.getae(sa, true)
    }

    /// Sets values and thresholds of `sa` in one `XFRM_MSG_NEWAE`.
    ///
    /// A replay value must have the SA's form (legacy or ESN, with the SA's
    /// bitmap length): the kernel silently ignores a legacy value on an ESN
    /// SA, so this is checked first with a query and refused with
    /// `InvalidArgument`. The first timer threshold set in the process
    /// measures the kernel's HZ on `sa` (see [`Handle::calibrate_hz`]).
    pub fn update(&self, sa: &SaId, update: &AeUpdate) -> Result<()> {
        if update.is_empty() {
            return Err(Error::invalid("an update must set at least one value or threshold"));
        }
        if let Some(replay) = &update.replay {
            self.check_replay_form(sa, replay)?;
        }
        let etimer_jiffies = match update.timer_threshold_ms {
            Some(ms) => Some(timer::ms_to_jiffies(ms, self.hz_for(sa)?)?),
            None => None,
        };
        self.newae(
            sa,
            &NewAe {
                replay_threshold: update.replay_threshold,
                etimer_jiffies,
                replay: update.replay.as_ref(),
                lifetime: update.lifetime.as_ref(),
            },
        )
    }

    /// Sets both thresholds: replay in packets, timer in milliseconds.
    pub fn set_thresholds(&self, sa: &SaId, replay_packets: u32, timer_ms: u32) -> Result<()> {
        self.update(
            sa,
            &AeUpdate {
                replay_threshold: Some(replay_packets),
                timer_threshold_ms: Some(timer_ms),
                ..AeUpdate::default()
            },
        )
    }

    fn check_replay_form(&self, sa: &SaId, replay: &Replay) -> Result<()> {
        let current = self.query(sa)?;
        match (&current.replay, replay) {
            (Replay::Legacy(_), Replay::Legacy(_)) => Ok(()),
            (Replay::Esn(have), Replay::Esn(want)) if have.bitmap().len() == want.bitmap().len() => Ok(()),
            (Replay::Esn(have), Replay::Esn(want)) => Err(Error::invalid(format!(
                "{sa} keeps a {}-word ESN bitmap; the value has {} words",
                have.bitmap().len(),
                want.bitmap().len()
            ))),
            (Replay::Esn(_), Replay::Legacy(_)) => Err(Error::invalid(format!(
                "{sa} uses ESN replay state; a legacy replay value would be ignored by the kernel"
            ))),
            (Replay::Legacy(_), Replay::Esn(_)) => Err(Error::invalid(format!(
                "{sa} uses legacy replay state; an ESN replay value would be ignored by the kernel"
            ))),
        }
    }

    fn hz_for(&self, sa: &SaId) -> Result<u32> {
        match timer::kernel_hz() {
            Some(hz) => Ok(hz),
            None => self.calibrate_hz(sa),
        }
    }

    /// Measures the kernel's HZ on `sa` and remembers it for the process.
    ///
    /// Method: read the SA's timer threshold (100 ms units), set it to
    /// 1,000,000 jiffies, read it back (`1,000,000 * 10 / HZ`, rounded down),
    /// invert that (exact for any HZ up to ~3000), and set the original
    /// threshold again. The original is restored to the nearest jiffy of its
    /// 100 ms reading, which is exact unless someone set it to a value that
    /// is not a whole number of 100 ms. Listeners see two update (`CU`)
    /// events on `sa`.
    pub fn calibrate_hz(&self, sa: &SaId) -> Result<u32> {
        let before_ms = self
            .query_with_thresholds(sa)?
            .timer_threshold_ms
            .ok_or(Error::Malformed("GETAE answer without the timer threshold"))?;
        let probe = NewAe {
            etimer_jiffies: Some(timer::CALIBRATION_JIFFIES),
            ..NewAe::default()
        };
        self.newae(sa, &probe)?;
        let read_ms = self.query_with_thresholds(sa)?.timer_threshold_ms;
        let hz = read_ms.and_then(|ms| timer::hz_from_readback(timer::CALIBRATION_JIFFIES, ms / 100));
        // Restore before judging the measurement. Should it have failed, HZ is
        // unknown and 1000 (jiffies = ms) is the guess that can only make the
        // restored timer longer, never shorter, on kernels with a lower HZ.
        let restore_hz = hz.unwrap_or(1000);
        let restore = NewAe {
            etimer_jiffies: Some(timer::ms_to_jiffies(before_ms, restore_hz)?),
            ..NewAe::default()
        };
        self.newae(sa, &restore)?;
        let hz = hz.ok_or(Error::Malformed("timer threshold read back unusable for HZ calibration"))?;
        timer::remember_hz(hz);
        log::info!("kernel HZ measured on {sa}: {hz}");
        Ok(hz)
    }

    /// The next pending event, or `None` when the socket is drained.
    /// Never blocks.
    pub fn next_event(&self) -> Result<Option<Aevent>> {
        if self.dispatching.get() {
            return Err(Error::Busy("reading events from inside dispatch"));
        }
        self.read_event()
    }

    fn read_event(&self) -> Result<Option<Aevent>> {
        self.events
            .try_borrow_mut()
            .map_err(|_| Error::Busy("event socket in use"))?
            .next()
    }

    /// Iterates over the pending events; ends when the socket is drained.
    pub fn events(&self) -> Events<'_> {
        Events { handle: self }
    }

    /// Calls `callback` for events of `sa`; `None` removes it.
    pub fn on_sa_event(&self, sa: SaId, callback: Option<Callback>) -> Result<()> {
        self.router
            .try_borrow_mut()
            .map_err(|_| Error::Busy("callbacks cannot change inside dispatch"))?
            .set_sa(sa, callback);
        Ok(())
    }

    /// Calls `callback` for events of SAs without their own; `None` removes it.
    pub fn on_event(&self, callback: Option<Callback>) -> Result<()> {
        self.router
            .try_borrow_mut()
            .map_err(|_| Error::Busy("callbacks cannot change inside dispatch"))?
            .set_any(callback);
        Ok(())
    }

    /// Reads every pending event and runs its callback; returns how many
    /// events were read. Never blocks. On an error (notably
    /// [`Error::EventsLost`]) the events behind it stay pending: call again.
    pub fn dispatch(&self) -> Result<usize> {
        if self.dispatching.replace(true) {
            return Err(Error::Busy("dispatch called from inside dispatch"));
        }
        // Cleared on unwind too, so a panicking callback does not leave the
        // handle busy forever.
        struct Done<'a>(&'a Cell<bool>);
        impl Drop for Done<'_> {
            fn drop(&mut self) {
                self.0.set(false);
            }
        }
        let _done = Done(&self.dispatching);
        self.dispatch_pending()
    }

    fn dispatch_pending(&self) -> Result<usize> {
        let mut router = self
            .router
            .try_borrow_mut()
            .map_err(|_| Error::Busy("callbacks in use"))?;
        let mut count = 0;
        while let Some(event) = self.read_event()? {
            router.route(&event);
            count += 1;
        }
        Ok(count)
    }
}

impl AsRawFd for Handle {
    fn as_raw_fd(&self) -> RawFd {
        self.event_fd()
    }
}

/// Pending events of a handle; see [`Handle::events`].
pub struct Events<'h> {
    handle: &'h Handle,
}

impl Iterator for Events<'_> {
    type Item = Result<Aevent>;

    fn next(&mut self) -> Option<Self::Item> {
        self.handle.next_event().transpose()
    }
}
