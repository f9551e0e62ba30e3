//! The C ABI: a thin translation of the Rust API in `handle`, `registry`
//! and (in [`sync`]) `crate::sync`. Nothing here decides anything; it
//! converts types, checks pointers, maps errors to negative errno, and keeps
//! panics from crossing into C.

#![allow(non_camel_case_types)]

use std::cell::{Cell, RefCell};
use std::ffi::{c_char, c_int, c_void, CStr, CString};
use std::fmt::{self, Write as _};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use crate::aevent::{AeUpdate, Aevent, EsnReplay, LegacyReplay, Lifetime, Replay, MAX_BITMAP_WORDS};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::registry::{Direction, Prefix, Registry, Rule, SaMatch, Thresholds};
use crate::sa::{Mark, SaId};
use crate::sync::SyncRecord;
use crate::timer;
use crate::view::AeventView;

mod sync;

/// Event cause: a replay counter moved by the replay threshold (`XFRM_AE_CR`).
pub const XFRMSYNC_CAUSE_REPLAY: u32 = 16;
/// Event cause: the timer threshold elapsed, or the first packet after idle (`XFRM_AE_CE`).
pub const XFRMSYNC_CAUSE_TIMER: u32 = 32;
/// Event cause: values or thresholds were set (`XFRM_AE_CU`).
pub const XFRMSYNC_CAUSE_UPDATE: u32 = 64;

/// `xfrmsync_query` flag: also fetch both thresholds.
pub const XFRMSYNC_QUERY_THRESHOLDS: u32 = 1;

/// `xfrmsync_aevent.present`: `replay_threshold` is valid.
pub const XFRMSYNC_HAS_REPLAY_THRESHOLD: u32 = 1;
/// `xfrmsync_aevent.present`: `timer_threshold_ms` is valid.
pub const XFRMSYNC_HAS_TIMER_THRESHOLD: u32 = 2;

/// `xfrmsync_ae_update.set`: apply `replay_threshold`.
pub const XFRMSYNC_SET_REPLAY_THRESHOLD: u32 = 1;
/// `xfrmsync_ae_update.set`: apply `timer_threshold_ms`.
pub const XFRMSYNC_SET_TIMER_THRESHOLD: u32 = 2;
/// `xfrmsync_ae_update.set`: apply `replay`.
pub const XFRMSYNC_SET_REPLAY: u32 = 4;
/// `xfrmsync_ae_update.set`: apply `lifetime`.
pub const XFRMSYNC_SET_LIFETIME: u32 = 8;

/// Longest ESN bitmap, in 32-bit words (the kernel's 4096-bit limit).
pub const XFRMSYNC_MAX_BITMAP_WORDS: usize = 128;

/// A connection to XFRM netlink in one network namespace. Opaque.
pub struct xfrmsync_handle {
    _private: [u8; 0],
}

/// Names one SA, as the kernel looks it up.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_sa_id {
    /// Destination address, network byte order; IPv4 uses the first 4 bytes.
    pub daddr: [u8; 16],
    /// SPI in host byte order, as `ip xfrm state` prints it.
    pub spi: u32,
    /// `AF_INET` or `AF_INET6`.
    pub family: u16,
    /// `IPPROTO_ESP` (50), `IPPROTO_AH` (51) or `IPPROTO_COMP` (108).
    pub proto: u8,
    /// The SA's mark; value and mask 0 mean "no mark".
    pub mark_value: u32,
    pub mark_mask: u32,
    /// XFRM interface id, 0 for none. Used to route events; the kernel's
    /// aevent lookup ignores it.
    pub if_id: u32,
}

/// `struct xfrm_lifetime_cur`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_lifetime {
    pub bytes: u64,
    pub packets: u64,
    /// Seconds since the epoch.
    pub add_time: u64,
    /// Seconds since the epoch, 0 before the first packet.
    pub use_time: u64,
}

/// Replay state. With `esn` 0 it is the legacy `xfrm_replay_state`: `oseq`,
/// `seq`, and its 32-bit bitmap in `bmp[0]` (`bmp_len` 1; `*_hi` and
/// `replay_window` 0). With `esn` 1 it is `xfrm_replay_state_esn`, whose
/// `bmp_len` must equal the SA's when set.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_replay {
    pub esn: u32,
    pub oseq: u32,
    pub seq: u32,
    pub oseq_hi: u32,
    pub seq_hi: u32,
    pub replay_window: u32,
    pub bmp_len: u32,
    pub bmp: [u32; XFRMSYNC_MAX_BITMAP_WORDS],
}

/// An event from the kernel, or the answer to `xfrmsync_query`.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_aevent {
    pub sa: xfrmsync_sa_id,
    /// Source address of the SA, laid out like `sa.daddr`.
    pub saddr: [u8; 16],
    pub reqid: u32,
    /// Raw `XFRM_AE_*` flags.
    pub flags: u32,
    /// One `XFRMSYNC_CAUSE_*`, or 0 for the answer to a query.
    pub cause: u32,
    pub replay: xfrmsync_replay,
    pub lifetime: xfrmsync_lifetime,
    /// `XFRMSYNC_HAS_*` bits saying which thresholds are filled in.
    pub present: u32,
    /// Packets.
    pub replay_threshold: u32,
    /// Milliseconds, in the kernel's 100 ms steps (rounded down).
    pub timer_threshold_ms: u32,
    /// The netlink header's sequence number: in an update event, the one of
    /// the request that caused it; 0 in traffic events.
    pub nlmsg_seq: u32,
    /// The netlink header's port id: in an update event, the port of the
    /// socket whose request caused it (see `xfrmsync_caused`); meaningless
    /// in traffic events.
    pub nlmsg_pid: u32,
}

/// What `xfrmsync_update` sets: the fields named by the `XFRMSYNC_SET_*`
/// bits in `set`, all in one kernel message.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_ae_update {
    pub set: u32,
    /// Packets.
    pub replay_threshold: u32,
    /// Milliseconds; meant as milliseconds on any kernel HZ.
    pub timer_threshold_ms: u32,
    pub replay: xfrmsync_replay,
    pub lifetime: xfrmsync_lifetime,
}

/// Receives one event. `event` is valid only during the call. It must
/// return normally: a C++ exception or a longjmp out of it is undefined
/// behaviour.
pub type xfrmsync_event_cb = Option<unsafe extern "C" fn(user_data: *mut c_void, event: *const xfrmsync_aevent)>;

/// Room for the last error message. A fixed buffer per thread, so the
/// pointer `xfrmsync_last_error` hands out never dangles: a later failure
/// changes the text, never the storage.
const LAST_ERROR_SIZE: usize = 512;

thread_local! {
    static LAST_ERROR: RefCell<[u8; LAST_ERROR_SIZE]> = const { RefCell::new([0; LAST_ERROR_SIZE]) };
}

fn remember(message: &str) {
    LAST_ERROR.with(|e| {
        let mut buf = e.borrow_mut();
        // Cut at a character boundary, leaving room for the NUL.
        let mut len = message.len().min(LAST_ERROR_SIZE - 1);
        while !message.is_char_boundary(len) {
            len -= 1;
        }
        for (dst, src) in buf.iter_mut().zip(message[..len].bytes()) {
            *dst = if src == 0 { b' ' } else { src };
        }
        buf[len] = 0;
    });
}

/// Runs one exported call: its error becomes `-errno` and the thread's last
/// error message, a panic becomes `-EIO`.
fn boundary(call: impl FnOnce() -> Result<c_int>) -> c_int {
    match catch_unwind(AssertUnwindSafe(call)) {
        Ok(Ok(value)) => value,
        Ok(Err(err)) => {
            remember(&err.to_string());
            -err.errno()
        }
        Err(_) => {
            remember("internal error: xfrmsync panicked; the handle may be unusable");
            -libc::EIO
        }
    }
}

fn required<'a, T>(ptr: *const T, what: &'static str) -> Result<&'a T> {
    // SAFETY: the C caller passes either NULL or a pointer to a live, aligned
    // T for the duration of the call (the header's contract).
    unsafe { ptr.as_ref() }.ok_or_else(|| Error::invalid(format!("{what} is NULL")))
}

/// An object behind an opaque C pointer that C may free from inside one of
/// the object's own callbacks (`CHandle`, `sync::CActive`): calls that may
/// run those callbacks hold an `InCall`, and `release` frees the object at
/// once or leaves that to the last `InCall`.
///
/// # Safety
///
/// `calls` and `is_closing` give one counter and one flag of the object
/// itself (the same each time), which only `InCall`, `release` and
/// `mark_closing` change; and every pointer to the type that C holds comes
/// from `Box::into_raw`, so `InCall` and `release` may free it with
/// `Box::from_raw`.
unsafe trait Reentrant {
    /// The pointer argument's name, for "NAME is NULL".
    const NAME: &'static str;
    /// The error of a call on an object freed from inside a callback.
    const FREED: &'static str;
    /// Calls in progress on the object that may run its callbacks (more
    /// than one when a callback calls in again).
    fn calls(&self) -> &Cell<u32>;
    /// The object was freed while such a call was in progress: the
    /// outermost one frees it when it returns. Until then no callback of
    /// it runs and calls on it fail with -EINVAL.
    fn is_closing(&self) -> bool;
    fn mark_closing(&self);
}

/// The object a C pointer points to, unless the pointer is NULL or the
/// object was freed from inside one of its callbacks.
fn live<'a, T: Reentrant>(ptr: *const T) -> Result<&'a T> {
    let c = required(ptr, T::NAME)?;
    if c.is_closing() {
        return Err(Error::invalid(T::FREED));
    }
    Ok(c)
}

/// Marks a call that may run the object's callbacks; the last one to end
/// frees an object that was freed meanwhile from inside a callback.
struct InCall<T: Reentrant>(*mut T);

impl<T: Reentrant> InCall<T> {
    fn enter<'a>(ptr: *mut T) -> Result<(InCall<T>, &'a T)> {
        let c = live(ptr)?;
        c.calls().set(c.calls().get() + 1);
        Ok((InCall(ptr), c))
    }
}

impl<T: Reentrant> Drop for InCall<T> {
    fn drop(&mut self) {
        // SAFETY: the object stays allocated while `calls` counts this call:
        // `release` only marks it then.
        let c = unsafe { &*self.0 };
        let left = c.calls().get() - 1;
        c.calls().set(left);
        if left == 0 && c.is_closing() {
            // SAFETY: from Box::into_raw (the `Reentrant` contract); the
            // caller gave it up with `release`, and no call on it is in
            // progress.
            drop(unsafe { Box::from_raw(self.0) });
        }
    }
}

/// Frees the object C gives up (NULL is a no-op), or, from inside one of
/// its callbacks, marks it for the last `InCall` on it to free.
fn release<T: Reentrant>(ptr: *mut T) {
    if ptr.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a non-NULL pointer came from Box::into_raw (the
        // `Reentrant` contract) and is alive until freed here or by the
        // last `InCall` on it.
        let in_callback = unsafe { (*ptr).calls().get() } > 0;
        if in_callback {
            // SAFETY: as above; the last `InCall` frees it.
            unsafe { (*ptr).mark_closing() };
        } else {
            // SAFETY: as above, and the caller gives up its pointer here.
            drop(unsafe { Box::from_raw(ptr) });
        }
    }));
}

/// What an `xfrmsync_handle` points to: a registry (a handle that also
/// gives SAs their thresholds once rules exist, and costs nothing before),
/// and what makes freeing it from inside one of its own callbacks safe.
struct CHandle {
    registry: Registry,
    /// Calls in progress on this handle that may run its callbacks (more
    /// than one when a callback calls in again).
    active: Cell<u32>,
    /// `xfrmsync_handle_free` was called while such a call was in progress:
    /// the outermost one frees the handle when it returns. Until then no
    /// callback of the handle runs and calls on it fail with -EINVAL.
    closing: Arc<AtomicBool>,
}

// SAFETY: `calls` and `is_closing` give the handle's own counter and flag,
// and every `xfrmsync_handle` comes from Box::into_raw in `publish`.
unsafe impl Reentrant for CHandle {
    const NAME: &'static str = "handle";
    const FREED: &'static str = "the handle was freed from inside one of its callbacks";

    fn calls(&self) -> &Cell<u32> {
        &self.active
    }

    fn is_closing(&self) -> bool {
        self.closing.load(Ordering::Relaxed)
    }

    fn mark_closing(&self) {
        self.closing.store(true, Ordering::Relaxed);
    }
}

fn chandle<'a>(ptr: *const xfrmsync_handle) -> Result<&'a CHandle> {
    live(ptr.cast::<CHandle>())
}

fn registry<'a>(ptr: *const xfrmsync_handle) -> Result<&'a Registry> {
    chandle(ptr).map(|c| &c.registry)
}

fn handle<'a>(ptr: *const xfrmsync_handle) -> Result<&'a Handle> {
    registry(ptr).map(Registry::handle)
}

/// A C string argument as UTF-8 text.
fn text<'a>(ptr: *const c_char, what: &'static str) -> Result<&'a str> {
    if ptr.is_null() {
        return Err(Error::invalid(format!("{what} is NULL")));
    }
    // SAFETY: non-NULL, and by the header's contract a NUL-terminated
    // string that lives for the call.
    unsafe { CStr::from_ptr(ptr) }.to_str().map_err(|_| Error::invalid(format!("{what} is not UTF-8")))
}

fn handle_and_sa<'a>(handle: *const xfrmsync_handle, sa: *const xfrmsync_sa_id) -> Result<(&'a Handle, SaId)> {
    Ok((self::handle(handle)?, required(sa, "sa")?.to_rust()?))
}

fn write_out<T>(out: *mut T, value: T) -> Result<()> {
    if out.is_null() {
        return Err(Error::invalid("output pointer is NULL"));
    }
    // SAFETY: non-NULL and, by the header's contract, valid for writes of T.
    unsafe { out.write(value) };
    Ok(())
}

fn ip_from_c(family: u16, raw: &[u8; 16]) -> Result<IpAddr> {
    match i32::from(family) {
        libc::AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        libc::AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(*raw))),
        _ => Err(Error::invalid(format!("address family {family} is neither AF_INET nor AF_INET6"))),
    }
}

fn ip_to_c(addr: &IpAddr) -> [u8; 16] {
    let mut raw = [0u8; 16];
    match addr {
        IpAddr::V4(a) => raw[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => raw = a.octets(),
    }
    raw
}

impl xfrmsync_sa_id {
    fn to_rust(self) -> Result<SaId> {
        Ok(SaId {
            daddr: ip_from_c(self.family, &self.daddr)?,
            spi: self.spi,
            proto: self.proto,
            mark: Mark { value: self.mark_value, mask: self.mark_mask },
            if_id: self.if_id,
        })
    }

    fn from_rust(sa: &SaId) -> xfrmsync_sa_id {
        xfrmsync_sa_id {
            daddr: ip_to_c(&sa.daddr),
            spi: sa.spi,
            family: sa.family(),
            proto: sa.proto,
            mark_value: sa.mark.value,
            mark_mask: sa.mark.mask,
            if_id: sa.if_id,
        }
    }
}

impl xfrmsync_lifetime {
    fn to_rust(self) -> Lifetime {
        Lifetime { bytes: self.bytes, packets: self.packets, add_time: self.add_time, use_time: self.use_time }
    }

    fn from_rust(l: &Lifetime) -> xfrmsync_lifetime {
        xfrmsync_lifetime { bytes: l.bytes, packets: l.packets, add_time: l.add_time, use_time: l.use_time }
    }
}

impl xfrmsync_replay {
    fn to_rust(self) -> Result<Replay> {
        if self.esn == 0 {
            return Ok(Replay::Legacy(LegacyReplay { oseq: self.oseq, seq: self.seq, bitmap: self.bmp[0] }));
        }
        let words = self
            .bmp
            .get(..self.bmp_len as usize)
            .ok_or_else(|| Error::invalid(format!("bmp_len {} above 128", self.bmp_len)))?;
        EsnReplay::new(self.oseq, self.seq, self.oseq_hi, self.seq_hi, self.replay_window, words)
            .map(Replay::Esn)
            .map_err(Error::invalid)
    }

    fn from_rust(replay: &Replay) -> xfrmsync_replay {
        let mut out = xfrmsync_replay {
            esn: 0,
            oseq: 0,
            seq: 0,
            oseq_hi: 0,
            seq_hi: 0,
            replay_window: 0,
            bmp_len: 1,
            bmp: [0; XFRMSYNC_MAX_BITMAP_WORDS],
        };
        match replay {
            Replay::Legacy(r) => {
                out.oseq = r.oseq;
                out.seq = r.seq;
                out.bmp[0] = r.bitmap;
            }
            Replay::Esn(r) => {
                let bitmap = r.bitmap();
                out.esn = 1;
                out.oseq = r.oseq;
                out.seq = r.seq;
                out.oseq_hi = r.oseq_hi;
                out.seq_hi = r.seq_hi;
                out.replay_window = r.replay_window;
                out.bmp_len = bitmap.len() as u32;
                out.bmp[..bitmap.len()].copy_from_slice(bitmap);
            }
        }
        out
    }
}

impl xfrmsync_aevent {
    fn from_rust(ev: &Aevent) -> xfrmsync_aevent {
        let mut present = 0;
        if ev.replay_threshold.is_some() {
            present |= XFRMSYNC_HAS_REPLAY_THRESHOLD;
        }
        if ev.timer_threshold_ms.is_some() {
            present |= XFRMSYNC_HAS_TIMER_THRESHOLD;
        }
        xfrmsync_aevent {
            sa: xfrmsync_sa_id::from_rust(&ev.sa),
            saddr: ip_to_c(&ev.saddr),
            reqid: ev.reqid,
            flags: ev.flags,
            cause: ev.flags & (XFRMSYNC_CAUSE_REPLAY | XFRMSYNC_CAUSE_TIMER | XFRMSYNC_CAUSE_UPDATE),
            replay: xfrmsync_replay::from_rust(&ev.replay),
            lifetime: xfrmsync_lifetime::from_rust(&ev.lifetime),
            present,
            replay_threshold: ev.replay_threshold.unwrap_or(0),
            timer_threshold_ms: ev.timer_threshold_ms.unwrap_or(0),
            nlmsg_seq: ev.nlmsg_seq,
            nlmsg_pid: ev.nlmsg_pid,
        }
    }

    /// Fills an event from one read in place. Only the bitmap words the
    /// event has are written; `dirty` (how many the previous event wrote)
    /// says which words past them to clear, so every word past `bmp_len`
    /// reads 0 without clearing all 128 each time.
    fn fill(&mut self, ev: &AeventView<'_>, dirty: &mut usize) {
        let flags = ev.flags();
        self.sa = xfrmsync_sa_id::from_rust(&ev.sa());
        self.saddr = ip_to_c(&ev.saddr());
        self.reqid = ev.reqid();
        self.flags = flags;
        self.cause = flags & (XFRMSYNC_CAUSE_REPLAY | XFRMSYNC_CAUSE_TIMER | XFRMSYNC_CAUSE_UPDATE);
        let replay = ev.replay();
        let r = &mut self.replay;
        r.esn = u32::from(replay.is_esn());
        r.oseq = replay.oseq();
        r.seq = replay.seq();
        r.oseq_hi = replay.oseq_hi();
        r.seq_hi = replay.seq_hi();
        r.replay_window = replay.replay_window();
        let words = replay.bitmap_len();
        r.bmp_len = words as u32;
        for (dst, word) in r.bmp.iter_mut().zip(replay.bitmap_words()) {
            *dst = word;
        }
        if *dirty > words {
            r.bmp[words..*dirty].fill(0);
        }
        *dirty = words;
        self.lifetime = xfrmsync_lifetime::from_rust(&ev.lifetime());
        let (replay_threshold, timer_threshold_ms) = (ev.replay_threshold(), ev.timer_threshold_ms());
        self.present = if replay_threshold.is_some() { XFRMSYNC_HAS_REPLAY_THRESHOLD } else { 0 }
            | if timer_threshold_ms.is_some() { XFRMSYNC_HAS_TIMER_THRESHOLD } else { 0 };
        self.replay_threshold = replay_threshold.unwrap_or(0);
        self.timer_threshold_ms = timer_threshold_ms.unwrap_or(0);
        self.nlmsg_seq = ev.nlmsg_seq();
        self.nlmsg_pid = ev.nlmsg_pid();
    }

    fn to_rust(self) -> Result<Aevent> {
        let has = |bit| self.present & bit != 0;
        Ok(Aevent {
            sa: self.sa.to_rust()?,
            saddr: ip_from_c(self.sa.family, &self.saddr)?,
            reqid: self.reqid,
            flags: self.flags,
            replay: self.replay.to_rust()?,
            lifetime: self.lifetime.to_rust(),
            replay_threshold: has(XFRMSYNC_HAS_REPLAY_THRESHOLD).then_some(self.replay_threshold),
            timer_threshold_ms: has(XFRMSYNC_HAS_TIMER_THRESHOLD).then_some(self.timer_threshold_ms),
            nlmsg_seq: self.nlmsg_seq,
            nlmsg_pid: self.nlmsg_pid,
        })
    }
}

impl xfrmsync_ae_update {
    fn to_rust(self) -> Result<AeUpdate> {
        let known =
            XFRMSYNC_SET_REPLAY_THRESHOLD | XFRMSYNC_SET_TIMER_THRESHOLD | XFRMSYNC_SET_REPLAY | XFRMSYNC_SET_LIFETIME;
        if self.set & !known != 0 {
            return Err(Error::invalid(format!("unknown bits 0x{:x} in update.set", self.set & !known)));
        }
        let has = |bit| self.set & bit != 0;
        Ok(AeUpdate {
            replay_threshold: has(XFRMSYNC_SET_REPLAY_THRESHOLD).then_some(self.replay_threshold),
            timer_threshold_ms: has(XFRMSYNC_SET_TIMER_THRESHOLD).then_some(self.timer_threshold_ms),
            replay: if has(XFRMSYNC_SET_REPLAY) { Some(self.replay.to_rust()?) } else { None },
            lifetime: has(XFRMSYNC_SET_LIFETIME).then(|| self.lifetime.to_rust()),
        })
    }
}

/// The library version, e.g. "0.1.0"; matches the `XFRMSYNC_VERSION_*` macros
/// of the header it was built with.
#[no_mangle]
pub extern "C" fn xfrmsync_version() -> *const c_char {
    concat!(env!("CARGO_PKG_VERSION"), "\0").as_ptr().cast()
}

/// The message of the most recent failed call on this thread ("" if none).
/// The pointer stays valid for the thread's life; the text changes with the
/// next failed call on this thread.
#[no_mangle]
pub extern "C" fn xfrmsync_last_error() -> *const c_char {
    LAST_ERROR.with(|e| e.as_ptr().cast::<c_char>().cast_const())
}

fn publish(built: Result<Handle>, out: *mut *mut xfrmsync_handle) -> Result<c_int> {
    if out.is_null() {
        return Err(Error::invalid("output pointer is NULL"));
    }
    let handle =
        CHandle { registry: Registry::new(built?), active: Cell::new(0), closing: Arc::new(AtomicBool::new(false)) };
    let raw = Box::into_raw(Box::new(handle)).cast::<xfrmsync_handle>();
    write_out(out, raw)?;
    Ok(0)
}

/// Opens a handle in the current network namespace, joined to the aevents
/// group. Writes `*out` only on success. Free with `xfrmsync_handle_free`.
#[no_mangle]
pub extern "C" fn xfrmsync_handle_new(out: *mut *mut xfrmsync_handle) -> c_int {
    boundary(|| publish(Handle::open(), out))
}

/// Like `xfrmsync_handle_new`, inside the network namespace at `netns_path`
/// (e.g. "/run/netns/NAME"). Needs CAP_SYS_ADMIN.
#[no_mangle]
pub extern "C" fn xfrmsync_handle_new_netns_path(netns_path: *const c_char, out: *mut *mut xfrmsync_handle) -> c_int {
    boundary(|| publish(Handle::builder().netns_path(text(netns_path, "netns path")?).open(), out))
}

/// Like `xfrmsync_handle_new`, inside the network namespace `netns_fd`
/// refers to. The fd stays the caller's.
#[no_mangle]
pub extern "C" fn xfrmsync_handle_new_netns_fd(netns_fd: c_int, out: *mut *mut xfrmsync_handle) -> c_int {
    boundary(|| {
        if netns_fd < 0 {
            return Err(Error::invalid("negative netns fd"));
        }
        // SAFETY: by the header's contract `netns_fd` is an open fd for the
        // duration of the call; the builder only duplicates it.
        let ns = unsafe { std::os::fd::BorrowedFd::borrow_raw(netns_fd) };
        publish(Handle::builder().netns_fd(ns).open(), out)
    })
}

/// Closes the handle's sockets and frees it. NULL is a no-op. Events still
/// pending are dropped with it. From inside one of the handle's own
/// callbacks it is safe too: the handle is then freed when the call that
/// ran the callback (xfrmsync_dispatch, xfrmsync_rule_add, ...) returns;
/// until then no further callback of it runs and calls on it give -EINVAL.
/// Either way the caller must not use the pointer afterwards.
#[no_mangle]
pub extern "C" fn xfrmsync_handle_free(handle: *mut xfrmsync_handle) {
    release(handle.cast::<CHandle>());
}

/// The event fd to poll for readability (non-blocking, close-on-exec), or a
/// negative errno.
#[no_mangle]
pub extern "C" fn xfrmsync_handle_fd(handle: *const xfrmsync_handle) -> c_int {
    boundary(|| Ok(self::handle(handle)?.event_fd()))
}

/// The port id the handle's requests are sent from: the kernel copies it
/// into the nlmsg_pid of the update events they cause, so a program with
/// two handles (one for aevents, one for rules) can tell the echoes of the
/// other's updates from everyone else's. It never changes; a negative
/// errno for an invalid handle.
#[no_mangle]
pub extern "C" fn xfrmsync_handle_port_id(handle: *const xfrmsync_handle) -> i64 {
    match catch_unwind(AssertUnwindSafe(|| self::handle(handle).map(Handle::port_id))) {
        Ok(Ok(port)) => i64::from(port),
        Ok(Err(err)) => {
            remember(&err.to_string());
            -i64::from(err.errno())
        }
        Err(_) => -i64::from(libc::EIO),
    }
}

/// Joins (`join` true) or leaves the aevents group. The kernel generates
/// events only while some socket has joined.
#[no_mangle]
pub extern "C" fn xfrmsync_handle_subscribe(handle: *mut xfrmsync_handle, join: bool) -> c_int {
    boundary(|| self::handle(handle)?.subscribe(join).map(|_| 0))
}

/// Sets the event socket's receive buffer in bytes (as root, beyond
/// net.core.rmem_max).
#[no_mangle]
pub extern "C" fn xfrmsync_handle_set_rcvbuf(handle: *mut xfrmsync_handle, bytes: usize) -> c_int {
    boundary(|| self::handle(handle)?.set_receive_buffer(bytes).map(|_| 0))
}

/// Limits how many datagrams one `xfrmsync_dispatch` reads (default 128;
/// the kernel sends each event in a datagram of its own). 0 gives -EINVAL.
#[no_mangle]
pub extern "C" fn xfrmsync_handle_set_dispatch_limit(handle: *mut xfrmsync_handle, datagrams: usize) -> c_int {
    boundary(|| self::handle(handle)?.set_dispatch_limit(datagrams).map(|_| 0))
}

/// 1 if `event` is an update event that a request of this handle caused
/// (its nlmsg_pid is the handle's port id), 0 if not, -EINVAL for NULL.
/// An HA daemon that mirrors updates skips its own with it.
#[no_mangle]
pub extern "C" fn xfrmsync_caused(handle: *const xfrmsync_handle, event: *const xfrmsync_aevent) -> c_int {
    boundary(|| {
        let handle = self::handle(handle)?;
        let event = required(event, "event")?.to_rust()?;
        Ok(c_int::from(handle.caused(&event)))
    })
}

/// Reads the SA's replay state and lifetime counters into `*out`; with
/// `XFRMSYNC_QUERY_THRESHOLDS` in `flags`, both thresholds too.
/// -ESRCH: no such SA (a marked SA needs its mark).
/// For a marked SA the thresholds are read in two requests, one each:
/// asked for both at once, Linux before 7081d46d3231 (Debian 11's 5.10)
/// can panic on an SA with a mark and an if_id. Give a marked SA's mark,
/// even one of value 0, so that it is read that way.
#[no_mangle]
pub extern "C" fn xfrmsync_query(
    handle: *mut xfrmsync_handle,
    sa: *const xfrmsync_sa_id,
    flags: u32,
    out: *mut xfrmsync_aevent,
) -> c_int {
    boundary(|| {
        let (handle, sa) = handle_and_sa(handle, sa)?;
        if flags & !XFRMSYNC_QUERY_THRESHOLDS != 0 {
            return Err(Error::invalid(format!("unknown query flags 0x{flags:x}")));
        }
        let event = if flags & XFRMSYNC_QUERY_THRESHOLDS != 0 {
            handle.query_with_thresholds(&sa)?
        } else {
            handle.query(&sa)?
        };
        write_out(out, xfrmsync_aevent::from_rust(&event))?;
        Ok(0)
    })
}

/// Sets what `update->set` names in one acknowledged XFRM_MSG_NEWAE. A replay
/// value of the wrong form for the SA (legacy vs ESN, or another bitmap
/// length) is refused with -EINVAL, since the kernel would silently ignore
/// it. The first timer threshold set in a process learns the kernel's HZ
/// (see `xfrmsync_learn_kernel_hz`), and measures it on this SA (see
/// `xfrmsync_calibrate_hz`) only where that finds no source.
#[no_mangle]
pub extern "C" fn xfrmsync_update(
    handle: *mut xfrmsync_handle,
    sa: *const xfrmsync_sa_id,
    update: *const xfrmsync_ae_update,
) -> c_int {
    boundary(|| {
        let (handle, sa) = handle_and_sa(handle, sa)?;
        let update = required(update, "update")?.to_rust()?;
        handle.update(&sa, &update).map(|_| 0)
    })
}

/// Sets the replay threshold (packets) and the timer threshold
/// (milliseconds, rounded to the nearest kernel tick) of one SA.
#[no_mangle]
pub extern "C" fn xfrmsync_set_thresholds(
    handle: *mut xfrmsync_handle,
    sa: *const xfrmsync_sa_id,
    replay_packets: u32,
    timer_ms: u32,
) -> c_int {
    boundary(|| {
        let (handle, sa) = handle_and_sa(handle, sa)?;
        handle.set_thresholds(&sa, replay_packets, timer_ms).map(|_| 0)
    })
}

/// Measures the kernel's HZ on `sa` by setting and reading back its timer
/// threshold, then restores it; listeners see two update events. The result
/// is kept for the whole process. `hz_out` may be NULL.
#[no_mangle]
pub extern "C" fn xfrmsync_calibrate_hz(
    handle: *mut xfrmsync_handle,
    sa: *const xfrmsync_sa_id,
    hz_out: *mut u32,
) -> c_int {
    boundary(|| {
        let (handle, sa) = handle_and_sa(handle, sa)?;
        let hz = handle.calibrate_hz(&sa)?;
        if !hz_out.is_null() {
            write_out(hz_out, hz)?;
        }
        Ok(0)
    })
}

/// Declares the kernel's HZ instead of measuring it.
#[no_mangle]
pub extern "C" fn xfrmsync_set_kernel_hz(hz: u32) -> c_int {
    boundary(|| timer::set_kernel_hz(hz).map(|_| 0))
}

/// The kernel HZ in use for timer thresholds, 0 if not known yet.
#[no_mangle]
pub extern "C" fn xfrmsync_kernel_hz() -> u32 {
    timer::kernel_hz().unwrap_or(0)
}

/// `xfrmsync_kernel_hz_source`: HZ is not known yet.
pub const XFRMSYNC_HZ_SOURCE_NONE: c_int = 0;
/// HZ was declared with `xfrmsync_set_kernel_hz`.
pub const XFRMSYNC_HZ_SOURCE_DECLARED: c_int = 1;
/// HZ is CONFIG_HZ from the running kernel's config file (/proc/config.gz,
/// /boot/config-RELEASE or /usr/lib/modules/RELEASE/config).
pub const XFRMSYNC_HZ_SOURCE_KERNEL_CONFIG: c_int = 2;
/// HZ was measured on a throw-away SA in a private network namespace.
pub const XFRMSYNC_HZ_SOURCE_PRIVATE_PROBE: c_int = 3;
/// HZ was measured on a live SA: `xfrmsync_calibrate_hz`, or a timer
/// threshold set when no other source had HZ.
pub const XFRMSYNC_HZ_SOURCE_LIVE_SA: c_int = 4;

fn hz_source_to_c(source: Option<&timer::HzSource>) -> c_int {
    use timer::HzSource;
    match source {
        None => XFRMSYNC_HZ_SOURCE_NONE,
        Some(HzSource::Declared) => XFRMSYNC_HZ_SOURCE_DECLARED,
        Some(HzSource::KernelConfig(_)) => XFRMSYNC_HZ_SOURCE_KERNEL_CONFIG,
        Some(HzSource::PrivateProbe) => XFRMSYNC_HZ_SOURCE_PRIVATE_PROBE,
        Some(HzSource::LiveSa) => XFRMSYNC_HZ_SOURCE_LIVE_SA,
    }
}

/// Where the HZ of `xfrmsync_kernel_hz` came from: one of
/// `XFRMSYNC_HZ_SOURCE_*`.
#[no_mangle]
pub extern "C" fn xfrmsync_kernel_hz_source() -> c_int {
    boundary(|| Ok(hz_source_to_c(timer::kernel_hz_source().as_ref())))
}

/// Learns the kernel's HZ without touching any SA of the caller: the
/// declared value, else CONFIG_HZ from the kernel's config file, else a
/// probe on a throw-away SA in a private network namespace (needs
/// CAP_SYS_ADMIN and ESP in the kernel). The first timer threshold set does
/// the same by itself, and measures on the SA only when this fails. The
/// result is kept for the process. Returns the `XFRMSYNC_HZ_SOURCE_*` it
/// came from and writes `*hz_out` (may be NULL), or the probe's negative
/// errno when no source has HZ.
#[no_mangle]
pub extern "C" fn xfrmsync_learn_kernel_hz(hz_out: *mut u32) -> c_int {
    boundary(|| {
        let (hz, source) = crate::hz::kernel_hz_without_sa()?;
        if !hz_out.is_null() {
            write_out(hz_out, hz)?;
        }
        Ok(hz_source_to_c(Some(&source)))
    })
}

/// A network namespace's thresholds for the SAs created in it from then on
/// (sysctls net.core.xfrm_aevent_etime and net.core.xfrm_aevent_rseqth).
/// Changing them changes no SA that exists already.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_netns_defaults {
    /// Milliseconds, a multiple of 100 (the sysctl counts 100 ms steps);
    /// 0: no timer events.
    pub timer_ms: u32,
    /// Packets; 0: no events for replay-counter progress.
    pub replay_packets: u32,
}

/// NULL: the calling thread's namespace; else a path to one.
fn netns_arg<'a>(netns_path: *const c_char) -> crate::NetnsRef<'a> {
    use std::os::unix::ffi::OsStrExt;
    if netns_path.is_null() {
        return crate::NetnsRef::Current;
    }
    // SAFETY: non-NULL, and by contract a NUL-terminated string that lives
    // for the call.
    let bytes = unsafe { CStr::from_ptr(netns_path) }.to_bytes();
    crate::NetnsRef::Path(std::path::Path::new(std::ffi::OsStr::from_bytes(bytes)))
}

/// Reads the defaults of the network namespace at `netns_path` (e.g.
/// "/run/netns/NAME"; needs CAP_SYS_ADMIN), or of the calling thread's own
/// if it is NULL. -ENOENT where the kernel does not show them (XFRM
/// missing, or a namespace of an unprivileged user namespace).
#[no_mangle]
pub extern "C" fn xfrmsync_netns_defaults_read(netns_path: *const c_char, out: *mut xfrmsync_netns_defaults) -> c_int {
    boundary(|| {
        let read = crate::defaults::read(netns_arg(netns_path))?;
        write_out(out, xfrmsync_netns_defaults { timer_ms: read.timer_ms, replay_packets: read.replay_packets })?;
        Ok(0)
    })
}

/// Sets the defaults of a network namespace (`netns_path` as for
/// `xfrmsync_netns_defaults_read`) for SAs created from now on. A timer
/// that is not a multiple of 100 ms, or that the kernel would overflow, is
/// refused with -EINVAL; both values are checked before either is written.
#[no_mangle]
pub extern "C" fn xfrmsync_netns_defaults_write(
    netns_path: *const c_char,
    defaults: *const xfrmsync_netns_defaults,
) -> c_int {
    boundary(|| {
        let given = required(defaults, "defaults")?;
        let set = crate::defaults::NamespaceDefaults { timer_ms: given.timer_ms, replay_packets: given.replay_packets };
        crate::defaults::write(netns_arg(netns_path), &set).map(|_| 0)
    })
}

/// A C function and its user pointer, called from `dispatch` with events
/// read in place and written into one event struct it keeps.
struct CCallback {
    function: unsafe extern "C" fn(*mut c_void, *const xfrmsync_aevent),
    user_data: *mut c_void,
    /// The handle's: once it is being freed, the callback no longer runs.
    closing: Arc<AtomicBool>,
    event: Box<xfrmsync_aevent>,
    /// Bitmap words the last event wrote into `event`.
    dirty: usize,
}

// SAFETY: the header makes the caller responsible for `user_data` being
// usable from whichever thread calls xfrmsync_dispatch; we only pass it back.
unsafe impl Send for CCallback {}

impl CCallback {
    fn boxed(
        function: xfrmsync_event_cb,
        user_data: *mut c_void,
        closing: &Arc<AtomicBool>,
    ) -> Option<crate::ViewCallback> {
        let mut cb = CCallback {
            function: function?,
            user_data,
            closing: closing.clone(),
            // SAFETY: xfrmsync_aevent is plain integers and arrays, for
            // which all-zero bytes are a valid value.
            event: Box::new(unsafe { std::mem::zeroed() }),
            dirty: 0,
        };
        Some(Box::new(move |_: &Handle, event: &AeventView<'_>| cb.call(event)))
    }

    fn call(&mut self, event: &AeventView<'_>) {
        if self.closing.load(Ordering::Relaxed) {
            return;
        }
        self.event.fill(event, &mut self.dirty);
        // SAFETY: the caller registered a function taking these arguments;
        // the event lives until it returns (and is only read meanwhile: a
        // nested dispatch, which could call this again, is refused).
        unsafe { (self.function)(self.user_data, &*self.event) }
    }
}

/// Sets the callback for events of SAs that have none of their own; NULL
/// removes it. -EBUSY from inside a callback.
#[no_mangle]
pub extern "C" fn xfrmsync_on_event(
    handle: *mut xfrmsync_handle,
    callback: xfrmsync_event_cb,
    user_data: *mut c_void,
) -> c_int {
    boundary(|| {
        let c = chandle(handle)?;
        c.registry.handle().on_event_view(CCallback::boxed(callback, user_data, &c.closing)).map(|_| 0)
    })
}

/// Sets the callback for events of one SA (matched on daddr, SPI, proto,
/// mark and if_id); NULL removes it. -EBUSY from inside a callback.
#[no_mangle]
pub extern "C" fn xfrmsync_on_sa_event(
    handle: *mut xfrmsync_handle,
    sa: *const xfrmsync_sa_id,
    callback: xfrmsync_event_cb,
    user_data: *mut c_void,
) -> c_int {
    boundary(|| {
        let (handle_ref, sa) = handle_and_sa(handle, sa)?;
        let closing = &chandle(handle)?.closing;
        handle_ref.on_sa_event_view(sa, CCallback::boxed(callback, user_data, closing)).map(|_| 0)
    })
}

/// Reads pending events without blocking and runs their callbacks on this
/// thread: at most the dispatch limit of datagrams per call (see
/// `xfrmsync_handle_set_dispatch_limit`), so a steady stream of events
/// cannot hold the caller here; what is left keeps the fd readable. Returns
/// the number of events read, or a negative errno.
///
/// -ENOBUFS means the kernel dropped events. It then drops every later one
/// without a word until the socket has been read empty, so -ENOBUFS comes
/// from the call that reads it empty (with the dispatch limit, maybe a
/// later call than the one that met the loss; the fd stays readable until
/// then). Query your SAs when it comes and nothing is missed. After other
/// errors the events behind them stay pending, so call again.
///
/// With rules or registrations (see `xfrmsync_rule_add`), dispatch does
/// more than read: it sends NEWAE for the SAs that appeared, in batches of
/// 64, waiting for each batch's answer (up to 5 seconds; a NEWAE the kernel
/// misses during a resize of its SA tables is asked again after 20 ms).
/// After lost notifications it returns -ENOBUFS and lists every SA again in
/// steps, one step in each later call: a step reads at most 8 datagrams of
/// the kernel's GETSA dump (up to 32 KiB, about 100 SAs, each) and gives
/// the SAs there that lack their thresholds theirs. So one call handles at
/// most 128 event datagrams and some 800 listed SAs, however many SAs the
/// namespace holds. While a listing runs, `xfrmsync_relist_due_ms` is 0:
/// call again without waiting for the fd. A listing that fails is owed and
/// tried again after a growing wait (100 ms, doubling to 30 s), and the
/// call that met the failure returns its error.
#[no_mangle]
pub extern "C" fn xfrmsync_dispatch(handle: *mut xfrmsync_handle) -> c_int {
    boundary(|| {
        let (_in_call, c) = InCall::enter(handle.cast::<CHandle>())?;
        let count = c.registry.dispatch()?;
        Ok(c_int::try_from(count).unwrap_or(c_int::MAX))
    })
}

/// Milliseconds until `xfrmsync_dispatch` should be called even if the fd
/// is not readable: a listing of every SA runs (0: its next step is due) or
/// is owed (one failed, or thresholds could not reach the kernel) and is
/// tried by dispatch once due. -1: nothing owed, wait for the fd alone. Use
/// it as the poll timeout.
#[no_mangle]
pub extern "C" fn xfrmsync_relist_due_ms(handle: *const xfrmsync_handle) -> c_int {
    boundary(|| {
        Ok(match registry(handle)?.relist_due() {
            None => -1,
            Some(due) => {
                let ms = due.saturating_duration_since(std::time::Instant::now()).as_nanos().div_ceil(1_000_000);
                c_int::try_from(ms).unwrap_or(c_int::MAX)
            }
        })
    })
}

/// A sync record (HA, issue 13): one SA's state as an active node saw it,
/// for a standby. `direction`: 0 unknown, 1 inbound, 2 outbound. `esn` is
/// the SA's ESN flag (not the replay state's form). The thresholds count
/// only with `has_thresholds`. `sent_at_ms` is the sender's clock, ms since
/// the Unix epoch; `rate_per_ks` its estimate of the SA's packet rate, in
/// packets per 1,000 s.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_sync_record {
    pub sa: xfrmsync_sa_id,
    /// Source address, laid out like `sa.daddr`.
    pub saddr: [u8; 16],
    pub reqid: u32,
    pub direction: u32,
    pub esn: bool,
    pub replay: xfrmsync_replay,
    pub lifetime_bytes: u64,
    pub lifetime_packets: u64,
    pub has_thresholds: bool,
    pub replay_threshold: u32,
    pub timer_threshold_ms: u32,
    pub epoch: u64,
    pub counter: u64,
    pub sent_at_ms: u64,
    pub rate_per_ks: u64,
}

/// The longest encoded sync record, in bytes.
pub const XFRMSYNC_MAX_SYNC_RECORD: usize = 656;
const _: () = assert!(XFRMSYNC_MAX_SYNC_RECORD == crate::sync::MAX_RECORD_LEN);

impl xfrmsync_sync_record {
    fn to_rust(self) -> Result<SyncRecord> {
        let direction = match self.direction {
            0 => None,
            1 => Some(Direction::In),
            2 => Some(Direction::Out),
            other => return Err(Error::invalid(format!("direction {other} is not 0, 1 or 2"))),
        };
        Ok(SyncRecord {
            sa: self.sa.to_rust()?,
            saddr: ip_from_c(self.sa.family, &self.saddr)?,
            reqid: self.reqid,
            direction,
            esn: self.esn,
            replay: self.replay.to_rust()?,
            lifetime_bytes: self.lifetime_bytes,
            lifetime_packets: self.lifetime_packets,
            thresholds: self
                .has_thresholds
                .then_some(Thresholds { replay_packets: self.replay_threshold, timer_ms: self.timer_threshold_ms }),
            epoch: self.epoch,
            counter: self.counter,
            sent_at_ms: self.sent_at_ms,
            rate_per_ks: self.rate_per_ks,
        })
    }

    fn from_rust(r: &SyncRecord) -> xfrmsync_sync_record {
        xfrmsync_sync_record {
            sa: xfrmsync_sa_id::from_rust(&r.sa),
            saddr: ip_to_c(&r.saddr),
            reqid: r.reqid,
            direction: match r.direction {
                None => 0,
                Some(Direction::In) => 1,
                Some(Direction::Out) => 2,
            },
            esn: r.esn,
            replay: xfrmsync_replay::from_rust(&r.replay),
            lifetime_bytes: r.lifetime_bytes,
            lifetime_packets: r.lifetime_packets,
            has_thresholds: r.thresholds.is_some(),
            replay_threshold: r.thresholds.map_or(0, |t| t.replay_packets),
            timer_threshold_ms: r.thresholds.map_or(0, |t| t.timer_ms),
            epoch: r.epoch,
            counter: r.counter,
            sent_at_ms: r.sent_at_ms,
            rate_per_ks: r.rate_per_ks,
        }
    }
}

/// Encodes `record` into `buf` (`capacity` bytes; `XFRMSYNC_MAX_SYNC_RECORD`
/// always suffices). Returns the length written, -ENOSPC when it does not
/// fit (nothing written), -EINVAL for a record that is not one (addresses
/// of two families, a bitmap over 128 words).
#[no_mangle]
pub extern "C" fn xfrmsync_sync_record_encode(
    record: *const xfrmsync_sync_record,
    buf: *mut u8,
    capacity: usize,
) -> c_int {
    boundary(|| {
        let record = required(record, "record")?.to_rust()?;
        if buf.is_null() {
            return Err(Error::invalid("buf is NULL"));
        }
        let mut out = Vec::with_capacity(record.encoded_len());
        record.encode(&mut out)?;
        if out.len() > capacity {
            return Err(Error::NoRoom { need: out.len(), have: capacity });
        }
        // SAFETY: the caller gave `capacity` writable bytes at `buf`, and
        // `out` is no longer than that.
        unsafe { std::ptr::copy_nonoverlapping(out.as_ptr(), buf, out.len()) };
        Ok(out.len() as c_int)
    })
}

/// Decodes the sync record at the start of `buf` (`len` bytes; a batch
/// holds several in a row) into `out`. Returns its length, or -EBADMSG for
/// bytes that are not a whole record of a known version (cut short, too
/// long, unknown flags, family or protocol, a bitmap over 128 words):
/// `out` is then untouched.
#[no_mangle]
pub extern "C" fn xfrmsync_sync_record_decode(buf: *const u8, len: usize, out: *mut xfrmsync_sync_record) -> c_int {
    boundary(|| {
        if buf.is_null() || out.is_null() {
            return Err(Error::invalid("buf or out is NULL"));
        }
        // SAFETY: the caller gave `len` readable bytes at `buf`.
        let bytes = unsafe { std::slice::from_raw_parts(buf, len) };
        let (record, used) = SyncRecord::decode_prefix(bytes)?;
        // SAFETY: `out` is non-NULL and points to a writable record.
        unsafe { out.write(xfrmsync_sync_record::from_rust(&record)) };
        Ok(used as c_int)
    })
}

/// Writes into a caller's buffer like snprintf: always NUL-terminated when
/// it has room for one byte, counting the full length.
struct Truncating<'a> {
    buf: &'a mut [u8],
    written: usize,
    needed: usize,
}

impl fmt::Write for Truncating<'_> {
    fn write_str(&mut self, s: &str) -> fmt::Result {
        let room = self.buf.len().saturating_sub(1).saturating_sub(self.written);
        let take = room.min(s.len());
        self.buf[self.written..self.written + take].copy_from_slice(&s.as_bytes()[..take]);
        self.written += take;
        self.needed += s.len();
        Ok(())
    }
}

/// Formats an event on one line, human-readable or (`json` true) as one JSON
/// object, into `buf` of `len` bytes, like snprintf: returns the length of
/// the whole line (without NUL), so a result >= `len` means it was cut.
#[no_mangle]
pub extern "C" fn xfrmsync_aevent_format(
    event: *const xfrmsync_aevent,
    json: bool,
    buf: *mut c_char,
    len: usize,
) -> c_int {
    boundary(|| {
        let event = required(event, "event")?.to_rust()?;
        if buf.is_null() && len > 0 {
            return Err(Error::invalid("buffer is NULL"));
        }
        let slice: &mut [u8] = if len == 0 {
            &mut []
        } else {
            // SAFETY: non-NULL, and by contract `len` writable bytes.
            unsafe { std::slice::from_raw_parts_mut(buf.cast::<u8>(), len) }
        };
        let mut out = Truncating { buf: slice, written: 0, needed: 0 };
        let _ = if json { write!(out, "{}", event.json()) } else { write!(out, "{event}") };
        if !out.buf.is_empty() {
            out.buf[out.written] = 0;
        }
        Ok(c_int::try_from(out.needed).unwrap_or(c_int::MAX))
    })
}

/// `xfrmsync_rule.match`: `reqid` is a criterion.
pub const XFRMSYNC_MATCH_REQID: u32 = 1;
/// `xfrmsync_rule.match`: `src`/`src_len` (of `family`) is a criterion.
pub const XFRMSYNC_MATCH_SRC: u32 = 2;
/// `xfrmsync_rule.match`: `dst`/`dst_len` (of `family`) is a criterion.
pub const XFRMSYNC_MATCH_DST: u32 = 4;
/// `xfrmsync_rule.match`: `spi` is a criterion.
pub const XFRMSYNC_MATCH_SPI: u32 = 8;
/// `xfrmsync_rule.match`: `proto` is a criterion.
pub const XFRMSYNC_MATCH_PROTO: u32 = 16;
/// `xfrmsync_rule.match`: `family` is a criterion.
pub const XFRMSYNC_MATCH_FAMILY: u32 = 32;
/// `xfrmsync_rule.match`: `mark_value`/`mark_mask` is a criterion.
pub const XFRMSYNC_MATCH_MARK: u32 = 64;
/// `xfrmsync_rule.match`: `if_id` is a criterion.
pub const XFRMSYNC_MATCH_IF_ID: u32 = 128;
/// `xfrmsync_rule.match`: `direction` is a criterion.
pub const XFRMSYNC_MATCH_DIRECTION: u32 = 256;
/// `xfrmsync_rule.direction`: inbound (the destination is local, or the SA
/// was installed with direction "in").
pub const XFRMSYNC_DIR_IN: u8 = 1;
/// `xfrmsync_rule.direction`: outbound (the source is local, or the SA was
/// installed with direction "out").
pub const XFRMSYNC_DIR_OUT: u8 = 2;

/// A threshold rule: the criteria named by `match` bits, all of which an SA
/// must meet, and the thresholds it then gets. The most specific rule wins
/// (README: SPI, reqid, longer destination prefix, longer source prefix,
/// mark, if_id, direction, protocol, family; then the one added first).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_rule {
    /// Unique name, NUL-terminated; a rule of the same name is replaced.
    pub name: *const c_char,
    /// `XFRMSYNC_MATCH_*` bits.
    pub r#match: u32,
    pub reqid: u32,
    /// `AF_INET` or `AF_INET6`: of the prefixes, and the family criterion.
    pub family: u16,
    /// Prefixes in network byte order (IPv4 in the first 4 bytes).
    pub src: [u8; 16],
    pub src_len: u8,
    pub dst: [u8; 16],
    pub dst_len: u8,
    /// Host byte order, as `ip xfrm state` prints it.
    pub spi: u32,
    pub proto: u8,
    /// An SA matches when its mark under `mark_mask` equals `mark_value`.
    pub mark_value: u32,
    pub mark_mask: u32,
    pub if_id: u32,
    /// `XFRMSYNC_DIR_IN` or `XFRMSYNC_DIR_OUT`.
    pub direction: u8,
    /// Packets.
    pub replay_threshold: u32,
    /// Milliseconds.
    pub timer_threshold_ms: u32,
}

impl xfrmsync_rule {
    fn to_rust(self) -> Result<Rule> {
        let known = XFRMSYNC_MATCH_REQID
            | XFRMSYNC_MATCH_SRC
            | XFRMSYNC_MATCH_DST
            | XFRMSYNC_MATCH_SPI
            | XFRMSYNC_MATCH_PROTO
            | XFRMSYNC_MATCH_FAMILY
            | XFRMSYNC_MATCH_MARK
            | XFRMSYNC_MATCH_IF_ID
            | XFRMSYNC_MATCH_DIRECTION;
        if self.r#match & !known != 0 {
            return Err(Error::invalid(format!("unknown bits 0x{:x} in rule.match", self.r#match & !known)));
        }
        let name = text(self.name, "rule name")?.to_owned();
        let has = |bit| self.r#match & bit != 0;
        let prefix = |raw: &[u8; 16], len: u8| -> Result<Prefix> { Prefix::new(ip_from_c(self.family, raw)?, len) };
        let direction = match self.direction {
            XFRMSYNC_DIR_IN => Direction::In,
            XFRMSYNC_DIR_OUT => Direction::Out,
            other if has(XFRMSYNC_MATCH_DIRECTION) => {
                return Err(Error::invalid(format!("rule direction {other} is neither in (1) nor out (2)")))
            }
            _ => Direction::In,
        };
        Ok(Rule {
            name,
            matches: SaMatch {
                reqid: has(XFRMSYNC_MATCH_REQID).then_some(self.reqid),
                src: if has(XFRMSYNC_MATCH_SRC) { Some(prefix(&self.src, self.src_len)?) } else { None },
                dst: if has(XFRMSYNC_MATCH_DST) { Some(prefix(&self.dst, self.dst_len)?) } else { None },
                spi: has(XFRMSYNC_MATCH_SPI).then_some(self.spi),
                proto: has(XFRMSYNC_MATCH_PROTO).then_some(self.proto),
                family: has(XFRMSYNC_MATCH_FAMILY).then_some(self.family),
                mark: has(XFRMSYNC_MATCH_MARK).then_some(Mark { value: self.mark_value, mask: self.mark_mask }),
                if_id: has(XFRMSYNC_MATCH_IF_ID).then_some(self.if_id),
                direction: has(XFRMSYNC_MATCH_DIRECTION).then_some(direction),
            },
            thresholds: Thresholds { replay_packets: self.replay_threshold, timer_ms: self.timer_threshold_ms },
        })
    }
}

/// Adds a rule, or replaces the rule of the same name, and applies the rules
/// to every SA of the namespace at once (a GETSA dump, batched NEWAE). From
/// then on `xfrmsync_dispatch` gives each SA that appears its thresholds.
/// Results reach the `xfrmsync_on_applied` callback.
#[no_mangle]
pub extern "C" fn xfrmsync_rule_add(handle: *mut xfrmsync_handle, rule: *const xfrmsync_rule) -> c_int {
    boundary(|| {
        let (_in_call, c) = InCall::enter(handle.cast::<CHandle>())?;
        c.registry.add_rule(required(rule, "rule")?.to_rust()?).map(|_| 0)
    })
}

/// Removes the rule named `name` and applies the remaining rules; returns 1
/// if it existed, 0 if not. SAs no rule matches keep their thresholds.
#[no_mangle]
pub extern "C" fn xfrmsync_rule_remove(handle: *mut xfrmsync_handle, name: *const c_char) -> c_int {
    boundary(|| {
        let (_in_call, c) = InCall::enter(handle.cast::<CHandle>())?;
        c.registry.remove_rule(text(name, "rule name")?).map(c_int::from)
    })
}

/// Gives exactly this SA these thresholds, before every rule, now if it
/// exists and whenever it appears. `xfrmsync_unregister_sa` undoes it.
#[no_mangle]
pub extern "C" fn xfrmsync_register_sa(
    handle: *mut xfrmsync_handle,
    sa: *const xfrmsync_sa_id,
    replay_packets: u32,
    timer_ms: u32,
) -> c_int {
    boundary(|| {
        let (_in_call, c) = InCall::enter(handle.cast::<CHandle>())?;
        let sa = required(sa, "sa")?.to_rust()?;
        let thresholds = Thresholds { replay_packets, timer_ms };
        c.registry.register_sa(sa, Some(thresholds)).map(|_| 0)
    })
}

/// Removes the registration of one SA.
#[no_mangle]
pub extern "C" fn xfrmsync_unregister_sa(handle: *mut xfrmsync_handle, sa: *const xfrmsync_sa_id) -> c_int {
    boundary(|| {
        let (_in_call, c) = InCall::enter(handle.cast::<CHandle>())?;
        c.registry.register_sa(required(sa, "sa")?.to_rust()?, None).map(|_| 0)
    })
}

/// Learns of each application of thresholds: the SA, what it was given, and
/// 0 or the negative errno the kernel answered.
pub type xfrmsync_applied_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        sa: *const xfrmsync_sa_id,
        replay_threshold: u32,
        timer_threshold_ms: u32,
        result: c_int,
    ),
>;

/// Sets the callback for applications of thresholds; NULL removes it. It
/// runs inside xfrmsync_rule_add, xfrmsync_rule_remove,
/// xfrmsync_register_sa and xfrmsync_dispatch, on their thread, and must
/// return normally; those four calls return -EBUSY when made from it.
/// There is one such callback: this and xfrmsync_on_applied_rule replace
/// each other.
#[no_mangle]
pub extern "C" fn xfrmsync_on_applied(
    handle: *mut xfrmsync_handle,
    callback: xfrmsync_applied_cb,
    user_data: *mut c_void,
) -> c_int {
    set_applied_callback(handle, callback.map(AppliedFunction::Plain), user_data)
}

/// Learns of each application of thresholds like `xfrmsync_applied_cb`,
/// and also of the rule that gave them: its name, or NULL when they were
/// registered for the SA itself (`xfrmsync_register_sa`). The name lives
/// until the callback returns.
pub type xfrmsync_applied_rule_cb = Option<
    unsafe extern "C" fn(
        user_data: *mut c_void,
        sa: *const xfrmsync_sa_id,
        replay_threshold: u32,
        timer_threshold_ms: u32,
        result: c_int,
        rule: *const c_char,
    ),
>;

/// Like xfrmsync_on_applied, for a callback that also learns the rule's
/// name. Replaces the callback set by either.
#[no_mangle]
pub extern "C" fn xfrmsync_on_applied_rule(
    handle: *mut xfrmsync_handle,
    callback: xfrmsync_applied_rule_cb,
    user_data: *mut c_void,
) -> c_int {
    set_applied_callback(handle, callback.map(AppliedFunction::WithRule), user_data)
}

/// The two shapes of C callback for applications.
#[derive(Clone, Copy)]
enum AppliedFunction {
    Plain(unsafe extern "C" fn(*mut c_void, *const xfrmsync_sa_id, u32, u32, c_int)),
    WithRule(unsafe extern "C" fn(*mut c_void, *const xfrmsync_sa_id, u32, u32, c_int, *const c_char)),
}

fn set_applied_callback(
    handle: *mut xfrmsync_handle,
    function: Option<AppliedFunction>,
    user_data: *mut c_void,
) -> c_int {
    boundary(|| {
        let c = chandle(handle)?;
        let registry = &c.registry;
        let closing = c.closing.clone();
        let callback = function.map(|function| {
            let user = UserData(user_data);
            Box::new(move |_: &Handle, applied: &crate::registry::Applied<'_>| {
                if closing.load(Ordering::Relaxed) {
                    return;
                }
                let sa = xfrmsync_sa_id::from_rust(applied.sa);
                let result = applied.result.as_ref().map_or_else(|e| -e.errno(), |_| 0);
                let t = applied.thresholds;
                match function {
                    // SAFETY: the caller registered a function taking these
                    // arguments; `sa` lives until it returns.
                    AppliedFunction::Plain(f) => unsafe { f(user.ptr(), &sa, t.replay_packets, t.timer_ms, result) },
                    AppliedFunction::WithRule(f) => {
                        // Rule names come from C strings or a rules file;
                        // one with a NUL inside cannot be passed whole, and
                        // is passed as far as C would read it.
                        let name = applied
                            .rule
                            .map(|n| CString::new(n.split('\0').next().unwrap_or_default()).unwrap_or_default());
                        let rule = name.as_ref().map_or(std::ptr::null(), |n| n.as_ptr());
                        // SAFETY: as above; `name` outlives the call.
                        unsafe { f(user.ptr(), &sa, t.replay_packets, t.timer_ms, result, rule) }
                    }
                }
            }) as crate::registry::AppliedCallback
        });
        registry.on_applied(callback).map(|_| 0)
    })
}

/// Appends `XFRMA_REPLAY_THRESH` and `XFRMA_ETIMER_THRESH` to an
/// `XFRM_MSG_NEWSA` or `XFRM_MSG_UPDSA` the caller is building in `msg`
/// (`capacity` bytes, the message's `nlmsg_len` filled in), with the
/// thresholds the SA's registration or rules give it, in the kernel's units
/// (the timer in jiffies: the kernel's HZ must be known, see
/// `xfrmsync_set_kernel_hz`). Updates `nlmsg_len`. Returns the new length,
/// 0 when no rule matches (the message is unchanged), -ENOSPC when
/// `capacity` has no room for the 16 bytes, -EINVAL for a message that is
/// not such an SA or already carries thresholds.
#[no_mangle]
pub extern "C" fn xfrmsync_newsa_add_thresholds(
    handle: *mut xfrmsync_handle,
    msg: *mut c_void,
    capacity: usize,
) -> c_int {
    boundary(|| {
        let registry = registry(handle)?;
        if msg.is_null() {
            return Err(Error::invalid("message is NULL"));
        }
        // SAFETY: non-NULL, and by contract `capacity` bytes the caller lets
        // us read and write for the call.
        let buf = unsafe { std::slice::from_raw_parts_mut(msg.cast::<u8>(), capacity) };
        let info = crate::wire::decode_sa_request(buf)?;
        let facts = registry.facts(&info)?;
        let Some(thresholds) = registry.thresholds_for(&facts) else { return Ok(0) };
        let jiffies = timer::ms_to_jiffies(thresholds.timer_ms, registry.handle().kernel_hz()?)?;
        let len = crate::wire::append_thresholds(buf, thresholds.replay_packets, jiffies)?;
        c_int::try_from(len).map_err(|_| Error::invalid("message longer than INT_MAX"))
    })
}

/// A C user pointer, handed back to the caller's callback only.
struct UserData(*mut c_void);

impl UserData {
    fn ptr(&self) -> *mut c_void {
        self.0
    }
}

// SAFETY: the header makes the caller responsible for `user_data` being
// usable from whichever thread runs the callback; we only pass it back.
unsafe impl Send for UserData {}

// The C constant is a literal so cbindgen can print it; keep it the Rust one.
const _: () = assert!(XFRMSYNC_MAX_BITMAP_WORDS == MAX_BITMAP_WORDS);
