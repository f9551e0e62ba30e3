//! The handle: two `NETLINK_XFRM` sockets, requests, and event dispatch.
//!
//! Requests and events use separate sockets so that a query never has to
//! step over (or buffer) events, and so that `ENOBUFS` on the event socket
//! means exactly "events were lost". The event socket is the one fd handed
//! out for poll/epoll; nothing blocks on it and no thread is started.

pub mod defaults;
pub mod events;
pub(crate) mod fasthash;
pub mod hz;
mod listing;
pub mod netns;
pub mod timer;

use std::cell::{Cell, RefCell};
use std::fs::File;
use std::os::fd::{AsFd, AsRawFd, FromRawFd, IntoRawFd, OwnedFd, RawFd};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use netlink_sys::{protocols::NETLINK_XFRM, Socket, SocketAddr};

use crate::aevent::{AeUpdate, Aevent, Cause, Replay};
use crate::error::{Error, Result};
use crate::events::{Candidate, Router};
use crate::sa::{RouteKey, SaId};
use crate::view::AeventView;
use crate::wire::{self, GetaeAsk, Messages, NewAe, NlMsg, SaInfo, Sender};

pub use listing::ListingStep;

/// A callback for events: runs inside [`Handle::dispatch`], on its thread,
/// and gets the handle, so it may query and configure SAs through it.
pub type Callback = crate::events::Callback<Handle>;

/// A callback for events read in place (see [`AeventView`]): nothing is
/// copied for it, which makes it the fastest way to consume events.
pub type ViewCallback = crate::events::ViewCallback<Handle>;

/// Netlink multicast datagrams of this group are single small messages;
/// 32 KiB leaves room for anything a kernel sends on it.
const EVENT_BUFFER: usize = 32 * 1024;
/// The kernel sizes dump datagrams by the largest receive buffer it has
/// seen, up to 32 KiB less overhead: this always holds one.
const REQUEST_BUFFER: usize = 32 * 1024;
/// `NEWAE` requests sent in one datagram by [`Handle::set_thresholds_many`];
/// the kernel answers the last one and those that fail, about 1 KiB each in
/// the socket's accounting, which must fit the request socket's receive
/// buffer when all fail.
const BATCH: usize = 64;
const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(5);
/// Datagrams one `dispatch` reads at most. The kernel sends one event per
/// datagram, and decoding plus routing one takes a few microseconds, so a
/// call returns within a millisecond or so even while events keep coming.
pub const DEFAULT_DISPATCH_LIMIT: usize = 128;
/// Address dumps tried while the kernel says each was interrupted.
const ADDRESS_DUMP_ATTEMPTS: u32 = 3;
/// HZ assumed to undo an HZ probe whose measurement failed: with the usual
/// HZ of 100-1000 it can only make the restored timer longer, never shorter.
const UNDO_GUESS_HZ: u32 = 1000;

enum Netns {
    Current,
    Path(PathBuf),
    /// A duplicate of the caller's fd, taken when it was given.
    Fd(std::io::Result<OwnedFd>),
}

/// Options for [`Handle`]; `Handle::builder().open()` gives the defaults.
pub struct HandleBuilder {
    netns: Netns,
    events: bool,
    receive_buffer: Option<usize>,
    request_timeout: Duration,
    dispatch_limit: usize,
}

impl HandleBuilder {
    /// Open the sockets inside the network namespace at `path`
    /// (`/run/netns/NAME`, `/proc/PID/ns/net`). Needs `CAP_SYS_ADMIN`.
    pub fn netns_path(mut self, path: impl AsRef<Path>) -> Self {
        self.netns = Netns::Path(path.as_ref().to_path_buf());
        self
    }

    /// Open the sockets inside the network namespace `fd` refers to. The fd
    /// stays the caller's: the builder keeps a duplicate until `open`.
    pub fn netns_fd(mut self, fd: impl AsFd) -> Self {
        self.netns = Netns::Fd(fd.as_fd().try_clone_to_owned());
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

    /// How long one call may wait for the kernel in all (default 5 s): one
    /// deadline per public call, however many requests it makes. Zero is
    /// refused by `open`.
    pub fn request_timeout(mut self, timeout: Duration) -> Self {
        self.request_timeout = timeout;
        self
    }

    /// How many datagrams one [`Handle::dispatch`] reads at most (default
    /// [`DEFAULT_DISPATCH_LIMIT`]). Zero is refused by `open`.
    pub fn dispatch_limit(mut self, datagrams: usize) -> Self {
        self.dispatch_limit = datagrams;
        self
    }

    pub fn open(self) -> Result<Handle> {
        self.check()?;
        let sockets = match &self.netns {
            Netns::Current => open_sockets()?,
            Netns::Path(path) => {
                let ns = File::open(path).map_err(|e| Error::from_io("open netns", &e))?;
                open_sockets_in(ns.as_fd())?
            }
            Netns::Fd(Ok(ns)) => open_sockets_in(ns.as_fd())?,
            Netns::Fd(Err(e)) => return Err(Error::from_io("duplicate netns fd", e)),
        };
        let mut address = SocketAddr::new(0, 0);
        sockets.requests.get_address(&mut address).map_err(|e| Error::from_io("read request socket address", &e))?;
        self.assemble(sockets, address.port_number(), true)
    }

    /// Builds a handle on sockets the caller made, for tests that put a fake
    /// kernel behind a socket pair (joining groups does nothing on them). `port_id` is what the handle's requests
    /// carry as their sender (a kernel socket's own port id in real use).
    /// Without a listing socket, the registry lists every SA in one call.
    #[doc(hidden)]
    pub fn open_with_sockets(
        self,
        requests: OwnedFd,
        events: OwnedFd,
        listing: Option<OwnedFd>,
        port_id: u32,
    ) -> Result<Handle> {
        self.check()?;
        // SAFETY: the OwnedFds are ours; Socket takes over closing them.
        let sockets = unsafe {
            Sockets {
                requests: Socket::from_raw_fd(requests.into_raw_fd()),
                events: Socket::from_raw_fd(events.into_raw_fd()),
                listing: listing.map(|fd| Socket::from_raw_fd(fd.into_raw_fd())),
                route: None,
            }
        };
        self.assemble(sockets, port_id, false)
    }

    fn check(&self) -> Result<()> {
        if self.request_timeout.is_zero() {
            return Err(Error::invalid("a request timeout of 0 would wait forever or not at all"));
        }
        if self.dispatch_limit == 0 {
            return Err(Error::invalid("a dispatch limit of 0 would never read an event"));
        }
        Ok(())
    }

    /// `netlink`: the sockets are the kernel's (else a socket pair with a
    /// fake behind it, which has no multicast groups to join).
    fn assemble(self, sockets: Sockets, port_id: u32, netlink: bool) -> Result<Handle> {
        let Sockets { requests, events, listing, route } = sockets;
        // Both options are best effort: without them errors still arrive,
        // just with the request echoed and no explanatory text.
        let _ = requests.set_ext_ack(true);
        let _ = requests.set_cap_ack(true);
        events.set_non_blocking(true).map_err(|e| Error::from_io("set event socket non-blocking", &e))?;
        let handle = Handle {
            requests: RefCell::new(Requests {
                socket: requests,
                seq: 0,
                port_id,
                out: Vec::with_capacity(1024),
                buf: vec![0; REQUEST_BUFFER],
            }),
            events: RefCell::new(EventReader {
                socket: events,
                buf: vec![0; 2 * EVENT_BUFFER].into_boxed_slice(),
                ends: [0; READ_AHEAD],
                datagrams: 0,
                next: Cell::new(Cursor::default()),
                loss_unreported: false,
            }),
            listing: listing.map(|socket| RefCell::new(listing::Listing::new(socket))),
            route: route.map(RefCell::new),
            router: RefCell::new(Router::default()),
            dispatching: Cell::new(false),
            deadline: Cell::new(None),
            request_timeout: self.request_timeout,
            dispatch_limit: Cell::new(self.dispatch_limit),
            netlink,
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

/// The sockets of a handle, all made in its namespace.
struct Sockets {
    requests: Socket,
    events: Socket,
    /// Dumps read in steps (see `listing`); `None` on a fake transport
    /// without one.
    listing: Option<Socket>,
    /// `NETLINK_ROUTE`, for the namespace's own addresses (which SAs are
    /// outbound); `None` on a fake transport.
    route: Option<Socket>,
}

fn open_sockets() -> Result<Sockets> {
    let open = |protocol, what| -> Result<Socket> {
        let mut s = Socket::new(protocol).map_err(|e| Error::from_io(what, &e))?;
        s.bind_auto().map_err(|e| Error::from_io("bind netlink socket", &e))?;
        Ok(s)
    };
    Ok(Sockets {
        requests: open(NETLINK_XFRM, "open NETLINK_XFRM socket")?,
        events: open(NETLINK_XFRM, "open NETLINK_XFRM socket")?,
        listing: Some(open(NETLINK_XFRM, "open NETLINK_XFRM socket")?),
        route: Some(open(netlink_sys::protocols::NETLINK_ROUTE, "open NETLINK_ROUTE socket")?),
    })
}

/// Opens the sockets on a short-lived thread that enters `ns` (see
/// [`crate::netns`]): sockets keep the namespace they were made in.
fn open_sockets_in(ns: std::os::fd::BorrowedFd<'_>) -> Result<Sockets> {
    crate::netns::run_in(ns, open_sockets)
}

/// Milliseconds for poll(2), rounded up so that a wait never ends early.
fn poll_ms(wait: Duration) -> libc::c_int {
    let ms = wait.as_nanos().div_ceil(1_000_000);
    libc::c_int::try_from(ms).unwrap_or(libc::c_int::MAX)
}

struct Requests {
    socket: Socket,
    seq: u32,
    port_id: u32,
    out: Vec<u8>,
    buf: Vec<u8>,
}

/// What a request waits for.
enum Expect {
    Aevent,
    Ack,
}

impl Requests {
    fn next_sender(&mut self) -> Sender {
        self.seq = self.seq.wrapping_add(1).max(1);
        Sender { seq: self.seq, port_id: self.port_id }
    }

    /// Sends `self.out` and waits until `deadline` for the answer with
    /// `seq`. Answers to earlier requests that timed out are skipped, as is
    /// anything not from the kernel; neither extends the wait.
    fn transact(
        &mut self,
        operation: &'static str,
        seq: u32,
        expect: Expect,
        deadline: Instant,
    ) -> Result<Option<Aevent>> {
        send(&self.socket, &self.out, operation)?;
        receive(&self.socket, &mut self.buf, operation, deadline, None, |msg| {
            if msg.seq != seq {
                return None;
            }
            match (msg.kind, &expect) {
                (wire::NLMSG_ERROR, _) => match kernel_answer(operation, msg) {
                    Err(e) => Some(Err(e)),
                    Ok(()) => matches!(expect, Expect::Ack).then_some(Ok(None)),
                },
                (wire::XFRM_MSG_NEWAE, Expect::Aevent) => Some(wire::decode_aevent(msg).map(Some)),
                _ => None,
            }
        })
    }

    /// Sends the dump request in `self.out` and hands each answer of `kind`
    /// to `each`, until the kernel's `NLMSG_DONE`.
    ///
    /// An error from `each` ends nothing early: the rest of the dump is read
    /// (and passed over) first, since a dump left running in the kernel
    /// makes the socket's next one fail with `EBUSY`. A dump the kernel
    /// marks interrupted (`NLM_F_DUMP_INTR`: its list changed meanwhile, so
    /// entries may be missing) is an error too, `EINTR`, after its end. A
    /// dump refused with `EBUSY` (an earlier one timed out and still runs)
    /// is sent again once that one has been read to its end.
    fn dump(
        &mut self,
        socket: Option<&Socket>,
        operation: &'static str,
        seq: u32,
        kind: u16,
        timeout: Duration,
        mut each: impl FnMut(&NlMsg<'_>) -> Result<()>,
    ) -> Result<()> {
        let socket = socket.unwrap_or(&self.socket);
        let deadline = Instant::now() + timeout;
        let mut sent_again = false;
        loop {
            send(socket, &self.out, operation)?;
            let mut failed = None;
            let mut interrupted = false;
            let answer = receive(socket, &mut self.buf, operation, deadline, Some(timeout), |msg| {
                if msg.seq != seq {
                    return None;
                }
                interrupted |= msg.flags & wire::NLM_F_DUMP_INTR != 0;
                match msg.kind {
                    wire::NLMSG_DONE => Some(Ok(())),
                    wire::NLMSG_ERROR => Some(kernel_answer(operation, msg)),
                    k if k == kind && failed.is_none() => {
                        failed = each(msg).err();
                        None
                    }
                    _ => None,
                }
            });
            match answer {
                Err(Error::Kernel { errno, .. }) if errno == libc::EBUSY && !sent_again => {
                    sent_again = true;
                    finish_abandoned_dump(socket, &mut self.buf, operation, seq, deadline)?;
                }
                Err(e) => return Err(e),
                Ok(()) => {
                    return match failed {
                        Some(e) => Err(e),
                        None if interrupted => Err(dump_interrupted(operation)),
                        None => Ok(()),
                    };
                }
            }
        }
    }
}

/// The `NEWAE` attributes of `update`, its timer in jiffies at `hz` (known
/// whenever the update has a timer); an empty update is refused.
fn newae_of(update: &AeUpdate, hz: Option<u32>) -> Result<NewAe<'_>> {
    if update.is_empty() {
        return Err(Error::invalid("an update must set at least one value or threshold"));
    }
    let etimer_jiffies = match (update.timer_threshold_ms, hz) {
        (Some(ms), Some(hz)) => Some(timer::ms_to_jiffies(ms, hz)?),
        (Some(_), None) => return Err(Error::invalid("a timer threshold needs the kernel's HZ")),
        (None, _) => None,
    };
    Ok(NewAe {
        replay_threshold: update.replay_threshold,
        etimer_jiffies,
        replay: update.replay.as_ref(),
        lifetime: update.lifetime.as_ref(),
    })
}

/// A dump the kernel marked `NLM_F_DUMP_INTR`: its list changed while it
/// ran, so entries may be missing.
fn dump_interrupted(operation: &'static str) -> Error {
    Error::Kernel {
        operation,
        errno: libc::EINTR,
        ext_ack: Some("dump interrupted (NLM_F_DUMP_INTR): the list changed while it ran".into()),
    }
}

/// Reads a dump that an earlier call left running (it timed out) to its
/// end, so that the kernel takes a new one: anything up to an `NLMSG_DONE`
/// or `NLMSG_ERROR` that answers another request than `seq`.
fn finish_abandoned_dump(
    socket: &Socket,
    buf: &mut [u8],
    operation: &'static str,
    seq: u32,
    deadline: Instant,
) -> Result<()> {
    receive(socket, buf, operation, deadline, None, |msg| {
        (msg.seq != seq && matches!(msg.kind, wire::NLMSG_DONE | wire::NLMSG_ERROR)).then_some(Ok(()))
    })
}

fn send(socket: &Socket, datagram: &[u8], operation: &'static str) -> Result<()> {
    socket.send(datagram, 0).map_err(|e| Error::from_io(operation, &e))?;
    Ok(())
}

/// What an `NLMSG_ERROR` says, as a result.
fn kernel_answer(operation: &'static str, msg: &NlMsg<'_>) -> Result<()> {
    let ack = wire::decode_ack(msg)?;
    if ack.errno == 0 {
        return Ok(());
    }
    Err(Error::Kernel { operation, errno: ack.errno, ext_ack: ack.ext_ack.map(str::to_owned) })
}

/// Waits until `deadline` for datagrams from the kernel on `socket`, and
/// shows `take` each of their messages in order until it returns an answer.
/// Signals and datagrams from elsewhere do not extend the wait.
fn receive<T>(
    socket: &Socket,
    buf: &mut [u8],
    operation: &'static str,
    mut deadline: Instant,
    progress: Option<Duration>,
    mut take: impl FnMut(&NlMsg<'_>) -> Option<Result<T>>,
) -> Result<T> {
    // Reads first and waits only when nothing is there: answers that are
    // already queued (a batch's) cost one system call each, not two.
    let mut wait = false;
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(Error::TimedOut(operation));
        }
        if wait {
            let mut ready = libc::pollfd { fd: socket.as_raw_fd(), events: libc::POLLIN, revents: 0 };
            // SAFETY: one valid pollfd, alive for the call.
            if unsafe { libc::poll(&mut ready, 1, poll_ms(left)) } < 0 {
                let err = std::io::Error::last_os_error();
                if err.kind() == std::io::ErrorKind::Interrupted {
                    continue;
                }
                return Err(Error::from_io(operation, &err));
            }
        }
        let mut window = &mut buf[..];
        let (size, from) = match socket.recv_from(&mut window, libc::MSG_TRUNC | libc::MSG_DONTWAIT) {
            Ok(r) => {
                wait = false;
                r
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                wait = true;
                continue;
            }
            Err(e) => return Err(Error::from_io(operation, &e)),
        };
        if from.port_number() != 0 {
            continue;
        }
        if size > buf.len() {
            return Err(Error::Truncated { size, buffer: buf.len() });
        }
        // A long dump may take longer than one timeout in all: each part
        // from the kernel gives it another.
        if let Some(more) = progress {
            deadline = Instant::now() + more;
        }
        for msg in Messages::new(&buf[..size]) {
            if let Some(answer) = take(&msg?) {
                return answer;
            }
        }
    }
}

/// Datagrams `dispatch` reads before it routes their events, so that the
/// lookups of several events overlap (see `Batch`). Each read has a window
/// of [`EVENT_BUFFER`] bytes, as when there was one datagram a buffer.
const READ_AHEAD: usize = 32;

/// Where reading the buffered datagrams has got to: the datagram, and the
/// offset of its next message in the buffer.
#[derive(Clone, Copy, Default)]
struct Cursor {
    datagram: usize,
    at: usize,
}

struct EventReader {
    socket: Socket,
    /// Room for datagrams read ahead, one window's worth beyond the data.
    buf: Box<[u8]>,
    /// Where each buffered datagram ends; the next begins 4-aligned after.
    ends: [usize; READ_AHEAD],
    datagrams: usize,
    /// The next message not yet handed out. A `Cell`, so that dispatch can
    /// move it on as it runs callbacks, which share the reader.
    next: Cell<Cursor>,
    /// The kernel said ENOBUFS and the socket has not been read empty since.
    loss_unreported: bool,
}

/// What the event socket carries: aevents (read in place), and SA
/// notifications when the handle watches SAs. Dispatch routes events
/// without it (see `Batch`), so its size costs only the rare
/// SA notice and `Handle::next_event`.
#[allow(clippy::large_enum_variant)]
enum Item<'a> {
    Aevent(AeventView<'a>),
    Sa(SaNotice),
    /// Anything else the kernel may send there: passed over.
    Skip,
}

/// The item one message of the event socket is.
fn item(bytes: &[u8]) -> Result<Item<'_>> {
    let (msg, _) = wire::parse_message(bytes)?;
    let change = match msg.kind {
        wire::XFRM_MSG_NEWAE => return AeventView::parse(&msg).map(Item::Aevent),
        wire::NLMSG_OVERRUN => return Err(Error::EventsLost),
        wire::XFRM_MSG_NEWSA => SaChange::New,
        wire::XFRM_MSG_UPDSA => SaChange::Updated,
        wire::XFRM_MSG_DELSA => SaChange::Deleted,
        wire::XFRM_MSG_EXPIRE => SaChange::Expired { hard: false },
        _ => return Ok(Item::Skip),
    };
    let info = wire::decode_sa_message(&msg)?;
    let change = match change {
        SaChange::Expired { .. } => SaChange::Expired { hard: info.hard_expire.unwrap_or(false) },
        other => other,
    };
    Ok(Item::Sa(SaNotice { change, info }))
}

/// An SA came, changed or went (`XFRMNLGRP_SA`, `XFRMNLGRP_EXPIRE`).
#[derive(Debug, Clone)]
pub struct SaNotice {
    pub change: SaChange,
    pub info: SaInfo,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SaChange {
    /// `XFRM_MSG_NEWSA`: installed.
    New,
    /// `XFRM_MSG_UPDSA`: replaced in place (e.g. a larval SA completed).
    Updated,
    /// `XFRM_MSG_DELSA`: deleted.
    Deleted,
    /// `XFRM_MSG_EXPIRE`: a lifetime ran out; a hard expiry removes the SA.
    Expired { hard: bool },
}

impl EventReader {
    fn start(&self, datagram: usize) -> usize {
        match datagram {
            0 => 0,
            n => (self.ends[n - 1] + 3) & !3,
        }
    }

    /// The message at `from`, if any is left, and where the one after it
    /// is. A message whose framing is broken ends its datagram: the error
    /// comes with the cursor behind that datagram, so that it is reported
    /// once and reading goes on after it.
    #[allow(clippy::type_complexity)]
    fn message_at(
        &self,
        mut from: Cursor,
    ) -> std::result::Result<Option<(NlMsg<'_>, std::ops::Range<usize>, Cursor)>, (Error, Cursor)> {
        while from.datagram < self.datagrams {
            from.at = from.at.max(self.start(from.datagram));
            if from.at < self.ends[from.datagram] {
                break;
            }
            from.datagram += 1;
        }
        if from.datagram >= self.datagrams {
            return Ok(None);
        }
        let end = self.ends[from.datagram];
        match wire::parse_message(&self.buf[from.at..end]) {
            Ok((msg, consumed)) => {
                let range = from.at..from.at + wire::NLMSG_HDRLEN + msg.payload.len();
                let next = Cursor { at: from.at + consumed, ..from };
                Ok(Some((msg, range, next)))
            }
            Err(e) => Err((e, Cursor { datagram: from.datagram + 1, at: end })),
        }
    }

    /// Where the next message left in the datagrams already read lies, if
    /// any. The position moves past it first, so a bad message is reported
    /// once and the next call goes on behind it.
    fn next_message(&self) -> Result<Option<std::ops::Range<usize>>> {
        match self.message_at(self.next.get()) {
            Ok(Some((_, range, next))) => {
                self.next.set(next);
                Ok(Some(range))
            }
            Ok(None) => Ok(None),
            Err((e, next)) => {
                self.next.set(next);
                Err(e)
            }
        }
    }

    /// Whether every buffered message has been handed out.
    fn drained(&self) -> bool {
        matches!(self.message_at(self.next.get()), Ok(None))
    }

    /// Forgets the datagrams read (all handed out) before reading more.
    fn clear(&mut self) {
        self.datagrams = 0;
        self.next.set(Cursor::default());
    }

    /// Whether another datagram fits behind those read: a full window left.
    fn has_room(&self) -> bool {
        self.datagrams < READ_AHEAD && self.start(self.datagrams) + EVENT_BUFFER <= self.buf.len()
    }

    /// Reads one datagram without blocking, behind those buffered (there
    /// must be room); `false` when there is none. A datagram not from the
    /// kernel is read and dropped.
    ///
    /// [`Error::EventsLost`] comes where the socket reads empty after the
    /// kernel said ENOBUFS, not where it said so: the kernel says it once,
    /// then drops every later event for this socket without a word until a
    /// read finds its queue empty (netlink's `NETLINK_S_CONGESTED`). Only
    /// from that point on is a resync sure to miss nothing, and another
    /// ENOBUFS on the way there is part of the same loss.
    fn read_datagram(&mut self) -> Result<bool> {
        let start = self.start(self.datagrams);
        let mut window = &mut self.buf[start..start + EVENT_BUFFER];
        let (size, from) = loop {
            match self.socket.recv_from(&mut window, libc::MSG_TRUNC | libc::MSG_DONTWAIT) {
                Ok(r) => break r,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                    return match std::mem::take(&mut self.loss_unreported) {
                        true => Err(Error::EventsLost),
                        false => Ok(false),
                    };
                }
                // Only here does ENOBUFS mean what it means: the kernel could
                // not queue events for this socket and dropped them.
                Err(e) if e.raw_os_error() == Some(libc::ENOBUFS) => self.loss_unreported = true,
                Err(e) => return Err(Error::from_io("receive events", &e)),
            }
        };
        if from.port_number() != 0 {
            log::debug!("dropped a datagram from port {}, not the kernel", from.port_number());
            return Ok(true);
        }
        if size > EVENT_BUFFER {
            return Err(Error::Truncated { size, buffer: EVENT_BUFFER });
        }
        self.ends[self.datagrams] = start + size;
        self.datagrams += 1;
        Ok(true)
    }

    /// The next `NEWAE`, reading datagrams until one has it or the socket
    /// is drained. Never blocks. SA notifications are passed over.
    fn next(&mut self) -> Result<Option<Aevent>> {
        loop {
            match self.next_message()? {
                Some(range) => match item(&self.buf[range])? {
                    Item::Aevent(view) => return Ok(Some(view.to_aevent())),
                    Item::Sa(_) | Item::Skip => continue,
                },
                None => {
                    self.clear();
                    if !self.read_datagram()? {
                        return Ok(None);
                    }
                }
            }
        }
    }
}

/// Clears a flag or a deadline when a call ends, on unwind too.
struct Restore<'a, T: Copy> {
    cell: &'a Cell<T>,
    value: T,
}

impl<T: Copy> Drop for Restore<'_, T> {
    fn drop(&mut self) {
        self.cell.set(self.value);
    }
}

/// A connection to the kernel's XFRM netlink in one network namespace.
///
/// Methods take `&self`, so a callback running inside [`Handle::dispatch`]
/// may query and configure SAs through the handle it is given; dispatching
/// or (un)registering callbacks from inside a callback gives
/// [`Error::Busy`]. A handle may move between threads and is used by one at
/// a time.
pub struct Handle {
    requests: RefCell<Requests>,
    events: RefCell<EventReader>,
    listing: Option<RefCell<listing::Listing>>,
    route: Option<RefCell<Socket>>,
    router: RefCell<Router<Handle>>,
    dispatching: Cell<bool>,
    /// When the public call in progress must end; `None` between calls.
    deadline: Cell<Option<Instant>>,
    request_timeout: Duration,
    dispatch_limit: Cell<usize>,
    /// On netlink sockets (not a test's socket pair): groups can be joined.
    netlink: bool,
}

impl Handle {
    pub fn builder() -> HandleBuilder {
        HandleBuilder {
            netns: Netns::Current,
            events: true,
            receive_buffer: None,
            request_timeout: DEFAULT_REQUEST_TIMEOUT,
            dispatch_limit: DEFAULT_DISPATCH_LIMIT,
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

    /// The port id this handle's requests are sent from. The kernel copies
    /// it into the update events they cause (see [`Handle::caused`]).
    pub fn port_id(&self) -> u32 {
        self.requests.borrow().port_id
    }

    /// Whether `event` is an update event caused by a request of this
    /// handle: an HA daemon mirroring updates skips its own this way.
    pub fn caused(&self, event: &Aevent) -> bool {
        event.cause() == Some(Cause::Update) && event.nlmsg_pid == self.port_id()
    }

    /// Join or leave `XFRMNLGRP_AEVENTS`.
    pub fn subscribe(&self, join: bool) -> Result<()> {
        if !self.netlink {
            return Ok(());
        }
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
        let value = libc::c_int::try_from(bytes).map_err(|_| Error::invalid("receive buffer larger than INT_MAX"))?;
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
        events.socket.set_rx_buf_sz(value).map_err(|e| Error::from_io("set receive buffer", &e))
    }

    /// How many datagrams one [`Handle::dispatch`] reads at most.
    pub fn set_dispatch_limit(&self, datagrams: usize) -> Result<()> {
        if datagrams == 0 {
            return Err(Error::invalid("a dispatch limit of 0 would never read an event"));
        }
        self.dispatch_limit.set(datagrams);
        Ok(())
    }

    /// Starts a public call: the first one in a nest sets the deadline all
    /// its requests share.
    fn call(&self) -> Restore<'_, Option<Instant>> {
        let outer = self.deadline.get();
        if outer.is_none() {
            self.deadline.set(Some(Instant::now() + self.request_timeout));
        }
        Restore { cell: &self.deadline, value: outer }
    }

    /// A deadline of its own, for undoing a change after the call's time may
    /// already be spent.
    fn undo_call(&self) -> Restore<'_, Option<Instant>> {
        let outer = self.deadline.replace(Some(Instant::now() + self.request_timeout));
        Restore { cell: &self.deadline, value: outer }
    }

    fn requests(&self) -> Result<std::cell::RefMut<'_, Requests>> {
        self.requests.try_borrow_mut().map_err(|_| Error::Busy("a request is in progress on this handle"))
    }

    fn request(
        &self,
        operation: &'static str,
        expect: Expect,
        encode: impl FnOnce(&mut Vec<u8>, Sender),
    ) -> Result<Option<Aevent>> {
        let _call = self.call();
        let deadline = self.deadline.get().unwrap_or_else(|| Instant::now() + self.request_timeout);
        let mut req = self.requests()?;
        let from = req.next_sender();
        encode(&mut req.out, from);
        req.transact(operation, from.seq, expect, deadline)
    }

    fn getae(&self, sa: &SaId, ask: GetaeAsk) -> Result<Aevent> {
        self.request("XFRM_MSG_GETAE", Expect::Aevent, |out, from| wire::encode_getae(out, from, sa, ask))?
            .ok_or(Error::Malformed("GETAE answered without an aevent"))
    }

    fn newae(&self, sa: &SaId, set: &NewAe<'_>) -> Result<()> {
        self.request("XFRM_MSG_NEWAE", Expect::Ack, |out, from| wire::encode_newae(out, from, sa, set)).map(|_| ())
    }

    /// A request the caller encodes, answered by an ack: the HZ probe's
    /// own SA (`crate::hz`).
    pub(crate) fn request_ack(&self, operation: &'static str, encode: impl FnOnce(&mut Vec<u8>, Sender)) -> Result<()> {
        self.request(operation, Expect::Ack, encode).map(|_| ())
    }

    /// Runs `steps` as one call: their requests share one deadline.
    pub(crate) fn one_call<T>(&self, steps: impl FnOnce() -> Result<T>) -> Result<T> {
        let _call = self.call();
        steps()
    }

    /// Current replay state and lifetime counters of `sa`.
    pub fn query(&self, sa: &SaId) -> Result<Aevent> {
        self.getae(sa, GetaeAsk::Counters)
    }

    /// Like [`Handle::query`], with both thresholds filled in.
    ///
    /// A marked SA is read in two requests, one threshold each, so that no
    /// kernel is asked for more than it makes room for (Debian 11's 5.10
    /// panics otherwise on an SA with a mark and an `if_id`: see
    /// [`wire::threshold_reads`]). The counters are then those of the second
    /// answer. Name an SA installed with a mark by its mark, even one of
    /// value 0.
    pub fn query_with_thresholds(&self, sa: &SaId) -> Result<Aevent> {
        let _call = self.call();
        let mut merged: Option<Aevent> = None;
        for &ask in wire::threshold_reads(sa) {
            let answer = self.getae(sa, ask)?;
            merged = Some(match merged {
                None => answer,
                Some(earlier) => Aevent {
                    flags: earlier.flags | answer.flags,
                    replay_threshold: answer.replay_threshold.or(earlier.replay_threshold),
                    timer_threshold_ms: answer.timer_threshold_ms.or(earlier.timer_threshold_ms),
                    ..answer
                },
            });
        }
        merged.ok_or(Error::Malformed("no GETAE reads the thresholds"))
    }

    /// `sa`'s timer threshold in milliseconds (100 ms steps), read alone:
    /// one request whatever the SA's mark and `if_id`.
    pub(crate) fn timer_threshold_ms(&self, sa: &SaId) -> Result<u32> {
        self.getae(sa, GetaeAsk::TimerThreshold)?
            .timer_threshold_ms
            .ok_or(Error::Malformed("GETAE answer without the timer threshold"))
    }

    /// Sets values and thresholds of `sa` in one `XFRM_MSG_NEWAE`: all or
    /// nothing of `update` is applied.
    ///
    /// A replay value must have the SA's form (legacy or ESN, with the SA's
    /// bitmap length): the kernel silently ignores a legacy value on an ESN
    /// SA, so this is checked first with a query and refused with
    /// `InvalidArgument`. The first timer threshold set in the process
    /// learns the kernel's HZ ([`crate::hz`]); only where no source without
    /// an SA has it, it is measured on `sa` (see [`Handle::calibrate_hz`]).
    pub fn update(&self, sa: &SaId, update: &AeUpdate) -> Result<()> {
        let _call = self.call();
        let hz = match update.timer_threshold_ms {
            Some(_) => Some(self.hz_for(sa)?),
            None => None,
        };
        let set = newae_of(update, hz)?;
        if let Some(replay) = &update.replay {
            self.check_replay_form(sa, replay)?;
        }
        self.newae(sa, &set)
    }

    /// Deletes `sa` (`XFRM_MSG_DELSA`).
    pub fn delete_sa(&self, sa: &SaId) -> Result<()> {
        self.request("XFRM_MSG_DELSA", Expect::Ack, |out, from| wire::encode_delsa(out, from, sa)).map(|_| ())
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

    /// The kernel's HZ, learned without touching any SA (see [`crate::hz`]);
    /// an error when no such source answers.
    pub fn kernel_hz(&self) -> Result<u32> {
        if let Some(hz) = timer::kernel_hz() {
            return Ok(hz);
        }
        let _call = self.call();
        let deadline = self.deadline.get().unwrap_or_else(|| Instant::now() + self.request_timeout);
        crate::hz::learn_until(deadline).map(|(hz, _)| hz)
    }

    fn hz_for(&self, sa: &SaId) -> Result<u32> {
        if let Some(hz) = timer::kernel_hz() {
            return Ok(hz);
        }
        let deadline = self.deadline.get().unwrap_or_else(|| Instant::now() + self.request_timeout);
        match crate::hz::learn_until(deadline) {
            Ok((hz, _)) => Ok(hz),
            Err(why) => {
                log::warn!(
                    "kernel HZ not known without an SA ({why}); measuring it on the live SA {sa}, whose \
                     timer is rewritten and restored: listeners see two update events"
                );
                self.calibrate_hz(sa)
            }
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
    ///
    /// Once the probe may have reached the kernel, the original is restored
    /// on every path, with a timeout of its own; should that fail, the error
    /// is [`Error::RestoreFailed`]. An SA whose timer reads 0 (off, or under
    /// 100 ms) is refused: its value cannot be read, so it could not be
    /// written back.
    pub fn calibrate_hz(&self, sa: &SaId) -> Result<u32> {
        let _call = self.call();
        let before_ms = self.timer_threshold_ms(sa)?;
        if before_ms == 0 {
            return Err(Error::invalid(format!(
                "{sa}: its timer threshold reads 0 (off, or under the kernel's 100 ms step), so it could not \
                 be restored after measuring HZ on it; declare HZ (set_kernel_hz) or measure on another SA"
            )));
        }
        let probe = NewAe { etimer_jiffies: Some(timer::CALIBRATION_JIFFIES), ..NewAe::default() };
        match self.newae(sa, &probe) {
            Ok(()) => {}
            // The kernel refused it: the SA is as it was.
            Err(refused @ Error::Kernel { .. }) => return Err(refused),
            // No answer: the probe may have been applied.
            Err(unknown) => {
                self.restore_timer(sa, before_ms, None)?;
                return Err(unknown);
            }
        }
        let measured = self.timer_threshold_ms(sa).and_then(|ms| {
            timer::hz_from_readback(timer::CALIBRATION_JIFFIES, ms / 100)
                .ok_or(Error::Malformed("timer threshold read back unusable for HZ calibration"))
        });
        self.restore_timer(sa, before_ms, measured.as_ref().ok().copied())?;
        let hz = measured?;
        timer::remember_hz(hz);
        log::info!("kernel HZ measured on {sa}: {hz}");
        Ok(hz)
    }

    /// Sets `sa`'s timer back to `ms` after an HZ probe.
    fn restore_timer(&self, sa: &SaId, ms: u32, measured_hz: Option<u32>) -> Result<()> {
        let _undo = self.undo_call();
        let hz = measured_hz.or_else(timer::kernel_hz).unwrap_or_else(|| {
            log::warn!("restoring {sa}'s timer threshold of {ms} ms without knowing HZ: assuming {UNDO_GUESS_HZ}");
            UNDO_GUESS_HZ
        });
        let left = |cause: Error| Error::RestoreFailed {
            state: format!(
                "{sa}: its timer threshold may be left at {} jiffies by the HZ probe instead of {ms} ms",
                timer::CALIBRATION_JIFFIES
            ),
            cause: Box::new(cause),
        };
        let restore = NewAe { etimer_jiffies: Some(timer::ms_to_jiffies(ms, hz).map_err(left)?), ..NewAe::default() };
        self.newae(sa, &restore).map_err(left)
    }

    /// The next pending event, or `None` when the socket is drained.
    /// Never blocks. [`Error::EventsLost`] comes where the socket is read
    /// empty after the kernel dropped events (see [`Handle::dispatch`]).
    pub fn next_event(&self) -> Result<Option<Aevent>> {
        if self.dispatching.get() {
            return Err(Error::Busy("reading events from inside dispatch"));
        }
        self.events.try_borrow_mut().map_err(|_| Error::Busy("event socket in use"))?.next()
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

    /// Like [`Handle::on_sa_event`], with the event read in place: no owned
    /// [`Aevent`] (and no 128-word bitmap) is built for it. Replaces the
    /// SA's callback of either kind.
    pub fn on_sa_event_view(&self, sa: SaId, callback: Option<ViewCallback>) -> Result<()> {
        self.router
            .try_borrow_mut()
            .map_err(|_| Error::Busy("callbacks cannot change inside dispatch"))?
            .set_sa_view(sa, callback);
        Ok(())
    }

    /// Like [`Handle::on_event`], with the event read in place.
    pub fn on_event_view(&self, callback: Option<ViewCallback>) -> Result<()> {
        self.router
            .try_borrow_mut()
            .map_err(|_| Error::Busy("callbacks cannot change inside dispatch"))?
            .set_any_view(callback);
        Ok(())
    }

    /// Reads pending events and runs their callbacks; returns how many
    /// events were read. Never blocks, and reads at most the dispatch limit
    /// of datagrams (each of the kernel's events comes in its own), so that
    /// a steady stream of events cannot keep the caller's loop here: what is
    /// left keeps the fd readable for the next poll.
    ///
    /// [`Error::EventsLost`] (`ENOBUFS`): the kernel dropped events. It drops
    /// every later one too, without saying so, until the socket has been
    /// read empty; so this comes from the call that reads it empty (the
    /// events read before it reach their callbacks), which with the
    /// dispatch limit may be a later call than the one that met the loss:
    /// the fd stays readable until then. Query your SAs when it comes:
    /// nothing after that point is lost unseen. On another error the events
    /// behind it stay pending: call again.
    pub fn dispatch(&self) -> Result<usize> {
        self.dispatch_with(&mut |_, _| {})
    }

    /// Like [`Handle::dispatch`], also handing SA notifications (see
    /// [`Handle::watch_sas`]) to `on_sa`; they count among the events.
    pub fn dispatch_with(&self, on_sa: &mut dyn FnMut(&Handle, &SaNotice)) -> Result<usize> {
        if self.dispatching.replace(true) {
            return Err(Error::Busy("dispatch called from inside dispatch"));
        }
        let _done = Restore { cell: &self.dispatching, value: false };
        let mut router = self.router.try_borrow_mut().map_err(|_| Error::Busy("callbacks in use"))?;
        let mut datagrams_left = self.dispatch_limit.get();
        let mut count = 0;
        loop {
            // Reading takes the reader mutably, so it reads ahead only when
            // every message read before has been handed out.
            let mut failed = None;
            {
                let mut reader = self.events.try_borrow_mut().map_err(|_| Error::Busy("event socket in use"))?;
                if reader.drained() {
                    // A datagram is always finished, so no event waits in
                    // our buffer where poll cannot see it.
                    if datagrams_left == 0 {
                        break;
                    }
                    reader.clear();
                    while datagrams_left > 0 && reader.has_room() {
                        match reader.read_datagram() {
                            Ok(true) => datagrams_left -= 1,
                            Ok(false) => break,
                            // After the events read before it, as when
                            // datagrams were read one by one; EventsLost
                            // comes with the socket read empty, so a resync
                            // the caller starts after this misses nothing.
                            Err(e) => {
                                failed = Some(e);
                                break;
                            }
                        }
                    }
                    if reader.drained() {
                        match failed {
                            Some(e) => return Err(e),
                            None if datagrams_left > 0 && !reader.has_room() => continue,
                            None => break,
                        }
                    }
                }
            }
            // Decoding and the callbacks share the reader, so a callback may
            // still use the event socket's settings (subscribe, watch_sas,
            // the receive buffer).
            let reader = self.events.try_borrow().map_err(|_| Error::Busy("event socket in use"))?;
            match self.deliver_buffered(&mut router, &reader, on_sa) {
                Ok(events) => count += events,
                // Read ahead, the socket may have reported lost events (or
                // another failure) already: that report must not give way
                // to one about a single message, which is passed over.
                Err(e) if failed.is_some() => {
                    log::warn!("passed over a bad event message, to report lost events or a read error: {e}")
                }
                Err(e) => return Err(e),
            }
            if let Some(e) = failed {
                return Err(e);
            }
        }
        Ok(count)
    }

    /// Hands every message buffered in `reader` to its callback, in order,
    /// events in batches; returns how many were events. The reader's
    /// position moves past each message as its callback starts, so that on
    /// an error (or a panic in a callback) what is behind stays pending.
    fn deliver_buffered(
        &self,
        router: &mut Router<Handle>,
        reader: &EventReader,
        on_sa: &mut dyn FnMut(&Handle, &SaNotice),
    ) -> Result<usize> {
        let mut batch = Batch::new(Some(&reader.next));
        let mut count = 0;
        let mut at = reader.next.get();
        loop {
            let (msg, range, next) = match reader.message_at(at) {
                Ok(Some(found)) => found,
                Ok(None) => break,
                Err((e, next)) => {
                    batch.run(self, router);
                    reader.next.set(next);
                    return Err(e);
                }
            };
            at = next;
            if msg.kind == wire::XFRM_MSG_NEWAE {
                match AeventView::parse(&msg) {
                    Ok(event) => batch.push(self, router, event, next),
                    Err(e) => {
                        batch.run(self, router);
                        reader.next.set(next);
                        return Err(e);
                    }
                }
                count += 1;
            } else {
                // Anything else keeps its place among the events.
                batch.run(self, router);
                reader.next.set(next);
                count += usize::from(self.deliver_other(router, &reader.buf[range], on_sa)?);
            }
        }
        batch.run(self, router);
        reader.next.set(at);
        Ok(count)
    }

    /// Hands a message other than an event (events go through `Batch`) to
    /// its callback: an SA notice to `on_sa`. Returns whether it counts as
    /// an event.
    fn deliver_other(
        &self,
        router: &mut Router<Handle>,
        bytes: &[u8],
        on_sa: &mut dyn FnMut(&Handle, &SaNotice),
    ) -> Result<bool> {
        match item(bytes)? {
            Item::Aevent(view) => {
                router.route(self, &view);
            }
            Item::Sa(notice) => on_sa(self, &notice),
            Item::Skip => return Ok(false),
        };
        Ok(true)
    }

    /// Runs the messages of `datagram` through what `dispatch` does with a
    /// datagram it has read (decoding in place, routing, callbacks), without
    /// a socket: for benchmarks of the event path. Returns the events.
    #[doc(hidden)]
    pub fn dispatch_datagram(&self, datagram: &[u8]) -> Result<usize> {
        self.dispatch_datagrams(std::iter::once(datagram))
    }

    /// [`Handle::dispatch_datagram`] for several datagrams in one call, as
    /// one `dispatch` call handles up to its limit of them.
    #[doc(hidden)]
    pub fn dispatch_datagrams<'d>(&self, datagrams: impl IntoIterator<Item = &'d [u8]>) -> Result<usize> {
        if self.dispatching.replace(true) {
            return Err(Error::Busy("dispatch called from inside dispatch"));
        }
        let _done = Restore { cell: &self.dispatching, value: false };
        let mut router = self.router.try_borrow_mut().map_err(|_| Error::Busy("callbacks in use"))?;
        let mut batch = Batch::new(None);
        let mut count = 0;
        for datagram in datagrams {
            let mut at = 0;
            while at < datagram.len() {
                // Events before a bad message still reach their callbacks,
                // as they would one by one.
                let (msg, consumed) = match wire::parse_message(&datagram[at..]) {
                    Ok(parsed) => parsed,
                    Err(e) => {
                        batch.run(self, &mut router);
                        return Err(e);
                    }
                };
                if msg.kind == wire::XFRM_MSG_NEWAE {
                    match AeventView::parse(&msg) {
                        Ok(event) => batch.push(self, &mut router, event, Cursor::default()),
                        Err(e) => {
                            batch.run(self, &mut router);
                            return Err(e);
                        }
                    }
                    count += 1;
                } else {
                    // Anything else keeps its place among the events.
                    batch.run(self, &mut router);
                    let bytes = &datagram[at..at + wire::NLMSG_HDRLEN + msg.payload.len()];
                    count += usize::from(self.deliver_other(&mut router, bytes, &mut |_, _| {})?);
                }
                at += consumed;
            }
        }
        batch.run(self, &mut router);
        Ok(count)
    }

    /// Join or leave the groups that announce SAs as they come and go
    /// (`XFRMNLGRP_SA`, `XFRMNLGRP_EXPIRE`); [`Handle::dispatch_with`] hands
    /// their notifications over, [`Handle::dispatch`] passes them by.
    pub fn watch_sas(&self, join: bool) -> Result<()> {
        if !self.netlink {
            return Ok(());
        }
        let events = self.events.try_borrow().map_err(|_| Error::Busy("event socket in use"))?;
        for group in [wire::XFRMNLGRP_SA, wire::XFRMNLGRP_EXPIRE] {
            let result = if join { events.socket.add_membership(group) } else { events.socket.drop_membership(group) };
            result.map_err(|e| Error::from_io("join XFRMNLGRP_SA/EXPIRE", &e))?;
        }
        Ok(())
    }

    /// Every SA of the namespace, from one `GETSA` dump. The timeout applies
    /// to each part of the dump, so a long one is not cut short.
    pub fn dump_sas(&self, mut each: impl FnMut(&SaInfo)) -> Result<()> {
        let mut req = self.requests()?;
        let from = req.next_sender();
        wire::encode_getsa_dump(&mut req.out, from);
        req.dump(None, "XFRM_MSG_GETSA dump", from.seq, wire::XFRM_MSG_NEWSA, self.request_timeout, |msg| {
            each(&wire::decode_sa_message(msg)?);
            Ok(())
        })
    }

    /// The namespace's own addresses (`RTM_GETADDR` dump): an SA whose
    /// source is one of them is outbound, one whose destination is, inbound.
    pub fn local_addresses(&self) -> Result<Vec<std::net::IpAddr>> {
        let Some(route) = &self.route else { return Ok(Vec::new()) };
        let route = route.try_borrow().map_err(|_| Error::Busy("route socket in use"))?;
        let mut req = self.requests()?;
        // An address added or removed during the dump interrupts it (the
        // kernel says so); the next one is likely whole.
        let mut attempts = 0;
        loop {
            attempts += 1;
            let from = req.next_sender();
            wire::encode_getaddr_dump(&mut req.out, from);
            let mut addresses = Vec::new();
            match req.dump(Some(&route), "RTM_GETADDR dump", from.seq, wire::RTM_NEWADDR, self.request_timeout, |msg| {
                addresses.extend(wire::decode_newaddr(msg)?);
                Ok(())
            }) {
                Ok(()) => return Ok(addresses),
                Err(Error::Kernel { errno, .. }) if errno == libc::EINTR && attempts < ADDRESS_DUMP_ATTEMPTS => {}
                Err(e) => return Err(e),
            }
        }
    }

    /// Sets the thresholds of many SAs: `(sa, replay packets, timer ms)`.
    /// Requests go out [`BATCH`] to a datagram, the kernel confirming each
    /// (an acknowledgement for the last, an error for any that fails);
    /// `each` learns every SA's result by its index in `items`. The timeout
    /// applies to each datagram's answers.
    pub fn set_thresholds_many(&self, items: &[(SaId, u32, u32)], each: impl FnMut(usize, Result<()>)) -> Result<()> {
        let Some((first, _, _)) = items.first() else { return Ok(()) };
        let hz = self.hz_for(first)?;
        self.newae_many(
            items.len(),
            |i| {
                let (sa, replay, ms) = &items[i];
                let jiffies = timer::ms_to_jiffies(*ms, hz)?;
                Ok((sa, NewAe { replay_threshold: Some(*replay), etimer_jiffies: Some(jiffies), ..NewAe::default() }))
            },
            each,
        )
    }

    /// Writes many updates, batched and confirmed as
    /// [`Handle::set_thresholds_many`] does; `each` learns every SA's result
    /// by its index in `items`.
    ///
    /// Unlike [`Handle::update`], a replay value's form is not checked
    /// against the SA first: that would cost a query per SA. The caller
    /// builds each value from the SA's own state (a standby's commit does,
    /// from the listing it plans against); the kernel ignores a value of
    /// the wrong form without an error.
    pub fn update_many(&self, items: &[(SaId, AeUpdate)], each: impl FnMut(usize, Result<()>)) -> Result<()> {
        let hz = match items.iter().find(|(_, update)| update.timer_threshold_ms.is_some()) {
            Some((sa, _)) => Some(self.hz_for(sa)?),
            None => None,
        };
        self.newae_many(
            items.len(),
            |i| {
                let (sa, update) = &items[i];
                Ok((sa, newae_of(update, hz)?))
            },
            each,
        )
    }

    /// Sends `count` `NEWAE`s, `request(i)` building the i-th, [`BATCH`] to a
    /// datagram; a request that cannot be built is reported and skipped.
    fn newae_many<'i>(
        &self,
        count: usize,
        request: impl Fn(usize) -> Result<(&'i SaId, NewAe<'i>)>,
        mut each: impl FnMut(usize, Result<()>),
    ) -> Result<()> {
        let mut batch: Vec<(&SaId, NewAe<'_>, usize)> = Vec::with_capacity(BATCH);
        let mut seqs = Vec::with_capacity(BATCH);
        let mut answered = Vec::with_capacity(BATCH);
        for base in (0..count).step_by(BATCH) {
            batch.clear();
            for index in base..count.min(base + BATCH) {
                match request(index) {
                    Ok((sa, set)) => batch.push((sa, set, index)),
                    Err(e) => each(index, Err(e)),
                }
            }
            if batch.is_empty() {
                continue;
            }
            // Only the last request asks for an acknowledgement; the kernel
            // answers the others only when they fail, in order, so that
            // acknowledgement means the rest succeeded (see
            // wire::append_newae_unacked). One answer per datagram, not 64.
            let mut req = self.requests()?;
            req.out.clear();
            seqs.clear();
            for (n, (sa, set, index)) in batch.iter().enumerate() {
                let from = req.next_sender();
                if n + 1 == batch.len() {
                    wire::append_newae(&mut req.out, from, sa, set);
                } else {
                    wire::append_newae_unacked(&mut req.out, from, sa, set);
                }
                seqs.push((from.seq, *index));
            }
            answered.clear();
            answered.resize(seqs.len(), false);
            let operation = "XFRM_MSG_NEWAE";
            let req = &mut *req;
            let last = seqs.len() - 1;
            let sent = send(&req.socket, &req.out, operation).and_then(|()| {
                let deadline = Instant::now() + self.request_timeout;
                receive(&req.socket, &mut req.buf, operation, deadline, None, |msg| {
                    let slot = seqs.iter().position(|(seq, _)| *seq == msg.seq)?;
                    if msg.kind != wire::NLMSG_ERROR || answered[slot] {
                        return None;
                    }
                    answered[slot] = true;
                    each(seqs[slot].1, kernel_answer(operation, msg));
                    (slot == last).then_some(Ok(()))
                })
            });
            for (slot, (_, index)) in seqs.iter().enumerate() {
                if !answered[slot] {
                    // After the last one's answer, silence is success.
                    each(*index, sent.clone());
                }
            }
        }
        Ok(())
    }
}

/// Events parsed ahead of their callbacks, so that the memory their
/// lookups need is fetched for all of them at once instead of one miss
/// after another: a lookup among 100,000 SAs misses the cache twice (an
/// index line, then an entry line), and alone each miss is a wait.
struct Batch<'d> {
    events: [Option<AeventView<'d>>; BATCH_AHEAD],
    keys: [(RouteKey, u64); BATCH_AHEAD],
    /// Where the reader goes on after each event.
    after: [Cursor; BATCH_AHEAD],
    len: usize,
    /// The reader's position, moved past each event as its callback starts.
    position: Option<&'d Cell<Cursor>>,
}

/// Events looked up together: enough to overlap the misses, few enough
/// that the lines fetched for the first are still cached when its turn
/// comes. Measured: 16 and 32 alike, 64 slower.
const BATCH_AHEAD: usize = 32;

impl<'d> Batch<'d> {
    fn new(position: Option<&'d Cell<Cursor>>) -> Self {
        Batch {
            events: [None; BATCH_AHEAD],
            keys: [([0; 5], 0); BATCH_AHEAD],
            after: [Cursor::default(); BATCH_AHEAD],
            len: 0,
            position,
        }
    }

    /// Queues an event, hashing its SA and fetching its index line; runs
    /// the batch when full.
    #[inline]
    fn push(&mut self, handle: &Handle, router: &mut Router<Handle>, event: AeventView<'d>, after: Cursor) {
        let n = self.len % BATCH_AHEAD;
        if router.is_empty() {
            self.events[n] = None;
        } else {
            let key = event.route_key();
            let hash = router.hash(&key);
            router.prefetch_index(hash);
            self.events[n] = Some(event);
            self.keys[n] = (key, hash);
        }
        self.after[n] = after;
        self.len = n + 1;
        if self.len == BATCH_AHEAD {
            self.run(handle, router);
        }
    }

    /// Fetches the entries (their index lines have come meanwhile), then
    /// runs the callbacks in the events' order. The router stays borrowed
    /// for the whole dispatch call (callbacks cannot change it), so what
    /// was looked up ahead still holds.
    fn run(&mut self, handle: &Handle, router: &mut Router<Handle>) {
        let n = std::mem::take(&mut self.len);
        let mut found = [Candidate::Absent; BATCH_AHEAD];
        for ((event, (_, hash)), found) in self.events[..n].iter().zip(&self.keys[..n]).zip(&mut found) {
            if event.is_some() {
                *found = router.prefetch_entry(*hash);
            }
        }
        let queued = self.events[..n].iter().zip(&self.keys[..n]).zip(&self.after[..n]).zip(&found[..n]);
        for (((event, (key, hash)), after), found) in queued {
            if let Some(position) = self.position {
                position.set(*after);
            }
            if let Some(event) = event {
                router.route_candidate(handle, event, key, *hash, *found);
            }
        }
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
