//! A small binding of Corosync's libcpg (closed process groups), opened at
//! run time with `dlopen`: the build needs no libcpg-dev, and a node
//! without corosync runs the UDP link as before. Only what the CPG link
//! uses is bound.
//!
//! Every type and value below is transcribed from corosync 3.1.7's
//! `corosync/cpg.h` and `corosync/corotypes.h` (Debian 12, libcpg4
//! 3.1.7); `the_binding_matches_the_installed_header` compiles a C program
//! against the installed header and compares.
//!
//! One handle, used from one thread at a time. Callbacks run only inside
//! [`Cpg::dispatch`], on the calling thread: they copy what libcpg hands
//! them into the handle's inbox and return; they call nothing back.
//!
//! Which calls may wait on corosync: `cpg_model_initialize`, `cpg_join`,
//! `cpg_local_get` and `cpg_finalize` send a request and wait for the
//! reply (only at [`Cpg::open`] and drop). `cpg_mcast_joined` of a message
//! no longer than [`Cpg::max_atomic`] writes to the shared-memory ring and
//! returns `CS_ERR_TRY_AGAIN` when corosync asks clients to hold back (its
//! flow-control flag, set while its queue to the ring is full); a longer
//! message is sent in fragments by a call that sleeps and waits for
//! replies, which is why the CPG link never sends one. But after writing
//! to the ring, libqb (2.0.6, `qb_ipcc_sendv`) pokes corosync with a byte
//! on the socket [`Cpg::fd`] names, retrying while that socket is full:
//! a corosync that reads nothing (stopped, hung) and has not raised its
//! flag would keep the caller spinning there until it reads again.
//! [`Cpg::mcast`] therefore answers `CS_ERR_TRY_AGAIN` itself, without
//! calling libcpg, while that socket is not writable.
//! `cpg_dispatch(CS_DISPATCH_ALL)` reads what is pending and returns.

use std::ffi::{c_char, c_int, c_uint, c_void};
use std::fmt;
use std::os::fd::RawFd;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::OnceLock;

/// The library's file name, with the ABI version (its SONAME).
pub const LIBRARY: &str = "libcpg.so.4";

type CpgHandle = u64;

/// `cs_error_t` (corotypes.h): an enum of positive values, which C gives
/// the type `unsigned int`.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct CsError(pub c_uint);

pub const CS_OK: c_uint = 1;
pub const CS_ERR_LIBRARY: c_uint = 2;
pub const CS_ERR_TRY_AGAIN: c_uint = 6;

impl CsError {
    pub const TRY_AGAIN: CsError = CsError(CS_ERR_TRY_AGAIN);
    pub const LIBRARY: CsError = CsError(CS_ERR_LIBRARY);

    fn check(rc: c_uint) -> Result<(), CsError> {
        match rc {
            CS_OK => Ok(()),
            other => Err(CsError(other)),
        }
    }

    /// The enumerator's name in corotypes.h.
    pub fn name(self) -> &'static str {
        match self.0 {
            1 => "CS_OK",
            2 => "CS_ERR_LIBRARY",
            3 => "CS_ERR_VERSION",
            4 => "CS_ERR_INIT",
            5 => "CS_ERR_TIMEOUT",
            6 => "CS_ERR_TRY_AGAIN",
            7 => "CS_ERR_INVALID_PARAM",
            8 => "CS_ERR_NO_MEMORY",
            9 => "CS_ERR_BAD_HANDLE",
            10 => "CS_ERR_BUSY",
            11 => "CS_ERR_ACCESS",
            12 => "CS_ERR_NOT_EXIST",
            13 => "CS_ERR_NAME_TOO_LONG",
            14 => "CS_ERR_EXIST",
            15 => "CS_ERR_NO_SPACE",
            16 => "CS_ERR_INTERRUPT",
            17 => "CS_ERR_NAME_NOT_FOUND",
            18 => "CS_ERR_NO_RESOURCES",
            19 => "CS_ERR_NOT_SUPPORTED",
            20 => "CS_ERR_BAD_OPERATION",
            21 => "CS_ERR_FAILED_OPERATION",
            22 => "CS_ERR_MESSAGE_ERROR",
            23 => "CS_ERR_QUEUE_FULL",
            24 => "CS_ERR_QUEUE_NOT_AVAILABLE",
            25 => "CS_ERR_BAD_FLAGS",
            26 => "CS_ERR_TOO_BIG",
            27 => "CS_ERR_NO_SECTIONS",
            28 => "CS_ERR_CONTEXT_NOT_FOUND",
            30 => "CS_ERR_TOO_MANY_GROUPS",
            100 => "CS_ERR_SECURITY",
            _ => "an unknown cs_error_t",
        }
    }
}

impl fmt::Display for CsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} ({})", self.name(), self.0)
    }
}

impl fmt::Debug for CsError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "CsError({self})")
    }
}

/// `cs_dispatch_flags_t`: `CS_DISPATCH_ALL` reads every pending callback
/// without waiting.
pub const CS_DISPATCH_ALL: c_uint = 2;
/// `cpg_guarantee_t`: the only order corosync 3 implements (FIFO is the
/// same, SAFE and UNORDERED are not implemented).
pub const CPG_TYPE_AGREED: c_uint = 2;
/// `cpg_model_t`.
pub const CPG_MODEL_V1: c_uint = 1;
pub const CPG_MAX_NAME_LENGTH: usize = 128;
/// The most entries a confchg list has (`CPG_MEMBERS_MAX`).
pub const CPG_MEMBERS_MAX: usize = 128;

/// `struct cpg_name`.
#[repr(C)]
pub struct CpgName {
    pub length: u32,
    pub value: [c_char; CPG_MAX_NAME_LENGTH],
}

/// `struct cpg_address`.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CpgAddress {
    pub nodeid: u32,
    pub pid: u32,
    /// `cpg_reason_t`: 1 join, 2 leave, 3 node down, 4 node up, 5 process down.
    pub reason: u32,
}

/// `struct cpg_ring_id`, passed by value to the totem callback (which
/// this binding leaves unset).
#[repr(C)]
pub struct CpgRingId {
    pub nodeid: u32,
    pub seq: u64,
}

type DeliverFn = unsafe extern "C" fn(
    handle: CpgHandle,
    group_name: *const CpgName,
    nodeid: u32,
    pid: u32,
    msg: *mut c_void,
    msg_len: usize,
);

type ConfchgFn = unsafe extern "C" fn(
    handle: CpgHandle,
    group_name: *const CpgName,
    member_list: *const CpgAddress,
    member_list_entries: usize,
    left_list: *const CpgAddress,
    left_list_entries: usize,
    joined_list: *const CpgAddress,
    joined_list_entries: usize,
);

type TotemConfchgFn =
    unsafe extern "C" fn(handle: CpgHandle, ring_id: CpgRingId, member_list_entries: u32, member_list: *const u32);

/// `cpg_model_v1_data_t`.
#[repr(C)]
pub struct CpgModelV1Data {
    pub model: c_uint,
    pub cpg_deliver_fn: Option<DeliverFn>,
    pub cpg_confchg_fn: Option<ConfchgFn>,
    pub cpg_totem_confchg_fn: Option<TotemConfchgFn>,
    pub flags: c_uint,
}

// The layouts the C compiler gives cpg.h's types on LP64 Linux; the test
// against the header checks the same numbers.
const _: () = assert!(std::mem::size_of::<CpgName>() == 132);
const _: () = assert!(std::mem::size_of::<CpgAddress>() == 12);
const _: () = assert!(std::mem::size_of::<CpgRingId>() == 16);
const _: () = assert!(std::mem::size_of::<CpgModelV1Data>() == 40);

type ModelInitializeFn = unsafe extern "C" fn(
    handle: *mut CpgHandle,
    model: c_uint,
    model_data: *mut CpgModelV1Data,
    context: *mut c_void,
) -> c_uint;
type FinalizeFn = unsafe extern "C" fn(handle: CpgHandle) -> c_uint;
type FdGetFn = unsafe extern "C" fn(handle: CpgHandle, fd: *mut c_int) -> c_uint;
type ContextGetFn = unsafe extern "C" fn(handle: CpgHandle, context: *mut *mut c_void) -> c_uint;
type DispatchFn = unsafe extern "C" fn(handle: CpgHandle, dispatch_types: c_uint) -> c_uint;
type JoinFn = unsafe extern "C" fn(handle: CpgHandle, group: *const CpgName) -> c_uint;
type McastJoinedFn =
    unsafe extern "C" fn(handle: CpgHandle, guarantee: c_uint, iovec: *const libc::iovec, iov_len: c_uint) -> c_uint;
type LocalGetFn = unsafe extern "C" fn(handle: CpgHandle, local_nodeid: *mut c_uint) -> c_uint;
type MaxAtomicMsgsizeGetFn = unsafe extern "C" fn(handle: CpgHandle, size: *mut u32) -> c_uint;

/// The functions this binding calls, from the library loaded once.
struct Api {
    model_initialize: ModelInitializeFn,
    finalize: FinalizeFn,
    fd_get: FdGetFn,
    context_get: ContextGetFn,
    dispatch: DispatchFn,
    join: JoinFn,
    mcast_joined: McastJoinedFn,
    local_get: LocalGetFn,
    max_atomic_msgsize_get: MaxAtomicMsgsizeGetFn,
    /// Kept, never dropped: the pointers above stay valid while it is
    /// loaded, and the callbacks reach `context_get` through it at any time.
    _library: libloading::Library,
}

static API: OnceLock<Result<Api, String>> = OnceLock::new();

/// libcpg, loaded at the first call; the process keeps it.
fn api() -> Result<&'static Api, String> {
    API.get_or_init(load).as_ref().map_err(Clone::clone)
}

fn load() -> Result<Api, String> {
    // SAFETY: loading libcpg runs its initialisers (libqb's and its own
    // handle databases), which have no preconditions on the caller.
    let library = unsafe { libloading::Library::new(LIBRARY) }
        .map_err(|e| format!("cannot load {LIBRARY} ({e}); install corosync's libcpg (Debian: libcpg4)"))?;
    macro_rules! symbol {
        ($name:literal) => {
            // SAFETY: the function pointer type is the C declaration of
            // the symbol in cpg.h 3.1.7, transcribed above and checked by
            // the_binding_matches_the_installed_header; the pointer is used
            // only while `library` is loaded, which is for good.
            *unsafe { library.get(concat!($name, "\0").as_bytes()) }
                .map_err(|e| format!("{LIBRARY}: no {} ({e})", $name))?
        };
    }
    Ok(Api {
        model_initialize: symbol!("cpg_model_initialize"),
        finalize: symbol!("cpg_finalize"),
        fd_get: symbol!("cpg_fd_get"),
        context_get: symbol!("cpg_context_get"),
        dispatch: symbol!("cpg_dispatch"),
        join: symbol!("cpg_join"),
        mcast_joined: symbol!("cpg_mcast_joined"),
        local_get: symbol!("cpg_local_get"),
        max_atomic_msgsize_get: symbol!("cpg_max_atomic_msgsize_get"),
        _library: library,
    })
}

/// One process in the group, as corosync names it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Member {
    pub nodeid: u32,
    pub pid: u32,
}

impl fmt::Display for Member {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "node {} pid {}", self.nodeid, self.pid)
    }
}

/// What a callback reported, copied out of libcpg's buffers.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A message multicast to the group, ours included.
    Message { from: Member, data: Vec<u8> },
    /// The group's membership changed: who is in it now.
    Membership { members: Vec<Member> },
}

/// Where the callbacks put what they are given: the handle's context.
#[derive(Default)]
struct Inbox {
    events: Vec<Event>,
}

/// Callbacks that panicked (and were caught): the event is lost.
static CALLBACK_PANICS: AtomicU64 = AtomicU64::new(0);

/// The inbox registered as `handle`'s context.
///
/// # Safety
///
/// Call only from a callback, that is inside `cpg_dispatch` on `handle`,
/// whose caller ([`Cpg::dispatch`]) holds the [`Cpg`] mutably and touches
/// the inbox only after the call returns: the `&mut` made here is the only
/// reference to it while it lives.
unsafe fn inbox_of<'a>(handle: CpgHandle) -> Option<&'a mut Inbox> {
    let api = API.get()?.as_ref().ok()?;
    let mut context: *mut c_void = std::ptr::null_mut();
    // SAFETY: `context` is a valid out-pointer for the call.
    if unsafe { (api.context_get)(handle, &mut context) } != CS_OK {
        return None;
    }
    // SAFETY: the context is the `Box<Inbox>` leaked by Cpg::open for this
    // handle, freed only after cpg_finalize, so after the last callback;
    // the function's contract rules out any other reference to it.
    unsafe { context.cast::<Inbox>().as_mut() }
}

/// Copies `count` addresses from a confchg list (libcpg passes its own
/// stack arrays, valid for the callback only).
///
/// # Safety
///
/// `list` points to `count` initialised `cpg_address`es, or `count` is 0.
unsafe fn members(list: *const CpgAddress, count: usize) -> Vec<Member> {
    if list.is_null() || count == 0 {
        return Vec::new();
    }
    // SAFETY: as the caller promises; the count is capped at what libcpg's
    // arrays hold, so a wrong count cannot read past them.
    let list = unsafe { std::slice::from_raw_parts(list, count.min(CPG_MEMBERS_MAX)) };
    list.iter().map(|a| Member { nodeid: a.nodeid, pid: a.pid }).collect()
}

unsafe extern "C" fn on_deliver(
    handle: CpgHandle,
    _group_name: *const CpgName,
    nodeid: u32,
    pid: u32,
    msg: *mut c_void,
    msg_len: usize,
) {
    // No panic may unwind into libcpg's frames.
    let caught = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a callback, inside cpg_dispatch on `handle` (inbox_of's contract).
        let Some(inbox) = (unsafe { inbox_of(handle) }) else { return };
        let data = if msg.is_null() || msg_len == 0 {
            Vec::new()
        } else {
            // SAFETY: libcpg passes the message's `msg_len` bytes, valid for
            // the callback; they are copied before it returns.
            unsafe { std::slice::from_raw_parts(msg.cast::<u8>(), msg_len) }.to_vec()
        };
        inbox.events.push(Event::Message { from: Member { nodeid, pid }, data });
    }));
    if caught.is_err() {
        CALLBACK_PANICS.fetch_add(1, Ordering::Relaxed);
    }
}

#[allow(clippy::too_many_arguments)] // cpg_confchg_fn_t's signature
unsafe extern "C" fn on_confchg(
    handle: CpgHandle,
    _group_name: *const CpgName,
    member_list: *const CpgAddress,
    member_list_entries: usize,
    _left_list: *const CpgAddress,
    _left_list_entries: usize,
    _joined_list: *const CpgAddress,
    _joined_list_entries: usize,
) {
    let caught = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a callback, inside cpg_dispatch on `handle` (inbox_of's contract).
        let Some(inbox) = (unsafe { inbox_of(handle) }) else { return };
        // SAFETY: libcpg passes its member array and its length.
        let members = unsafe { members(member_list, member_list_entries) };
        inbox.events.push(Event::Membership { members });
    }));
    if caught.is_err() {
        CALLBACK_PANICS.fetch_add(1, Ordering::Relaxed);
    }
}

/// Callbacks that panicked since the process started.
pub fn callback_panics() -> u64 {
    CALLBACK_PANICS.load(Ordering::Relaxed)
}

/// Why [`Cpg::open`] failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OpenError {
    /// libcpg is not installed, or not the one bound here.
    Library(String),
    /// A call failed: which, and how.
    Call(&'static str, CsError),
    /// The group name does not fit a `cpg_name`.
    Name(String),
}

impl OpenError {
    /// Worth trying again soon: corosync is starting or syncing.
    pub fn is_try_again(&self) -> bool {
        matches!(self, OpenError::Call(_, e) if *e == CsError::TRY_AGAIN)
    }
}

impl fmt::Display for OpenError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OpenError::Library(why) => f.write_str(why),
            OpenError::Call("cpg_model_initialize", e) if *e == CsError::LIBRARY => write!(
                f,
                "cannot reach corosync (cpg_model_initialize: {e}): is corosync running on this node, in this \
                 network namespace?"
            ),
            OpenError::Call(call, e) => write!(f, "{call}: {e}"),
            OpenError::Name(why) => f.write_str(why),
        }
    }
}

/// A joined CPG handle.
pub struct Cpg {
    api: &'static Api,
    handle: CpgHandle,
    fd: RawFd,
    local: Member,
    max_atomic: usize,
    /// The handle's context; freed in drop, after `cpg_finalize`.
    inbox: *mut Inbox,
}

impl fmt::Debug for Cpg {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Cpg").field("handle", &self.handle).field("fd", &self.fd).field("local", &self.local).finish()
    }
}

/// `group` as a `cpg_name`: 1 to 127 bytes (one is kept for the NUL that
/// corosync's tools print names with), no NUL.
pub fn group_name(group: &str) -> Result<CpgName, String> {
    let bytes = group.as_bytes();
    if bytes.is_empty() || bytes.len() >= CPG_MAX_NAME_LENGTH || bytes.contains(&0) {
        return Err(format!(
            "the CPG group name must be 1 to {} bytes without NUL, not {} bytes",
            CPG_MAX_NAME_LENGTH - 1,
            bytes.len()
        ));
    }
    let mut name = CpgName { length: bytes.len() as u32, value: [0; CPG_MAX_NAME_LENGTH] };
    for (to, from) in name.value.iter_mut().zip(bytes) {
        *to = *from as c_char;
    }
    Ok(name)
}

impl Cpg {
    /// Loads libcpg, connects to corosync and joins `group`.
    pub fn open(group: &str) -> Result<Cpg, OpenError> {
        let api = api().map_err(OpenError::Library)?;
        let name = group_name(group).map_err(OpenError::Name)?;
        let inbox = Box::into_raw(Box::<Inbox>::default());
        let mut model = CpgModelV1Data {
            model: CPG_MODEL_V1,
            cpg_deliver_fn: Some(on_deliver),
            cpg_confchg_fn: Some(on_confchg),
            cpg_totem_confchg_fn: None,
            flags: 0,
        };
        let mut handle: CpgHandle = 0;
        // SAFETY: `handle` and `model` are valid for the call (libcpg copies
        // the model); the context is the inbox, which lives until drop.
        let rc = unsafe { (api.model_initialize)(&mut handle, CPG_MODEL_V1, &mut model, inbox.cast()) };
        if let Err(e) = CsError::check(rc) {
            // SAFETY: made by Box::into_raw above; no handle holds it.
            drop(unsafe { Box::from_raw(inbox) });
            return Err(OpenError::Call("cpg_model_initialize", e));
        }
        // From here on, drop finalizes the handle and frees the inbox.
        let mut cpg =
            Cpg { api, handle, fd: -1, local: Member { nodeid: 0, pid: std::process::id() }, max_atomic: 0, inbox };
        let mut fd: c_int = -1;
        // SAFETY: a valid handle and out-pointer.
        CsError::check(unsafe { (api.fd_get)(handle, &mut fd) }).map_err(|e| OpenError::Call("cpg_fd_get", e))?;
        cpg.fd = fd;
        let mut nodeid: c_uint = 0;
        // SAFETY: a valid handle and out-pointer.
        CsError::check(unsafe { (api.local_get)(handle, &mut nodeid) })
            .map_err(|e| OpenError::Call("cpg_local_get", e))?;
        cpg.local.nodeid = nodeid;
        let mut atomic: u32 = 0;
        // SAFETY: a valid handle and out-pointer.
        CsError::check(unsafe { (api.max_atomic_msgsize_get)(handle, &mut atomic) })
            .map_err(|e| OpenError::Call("cpg_max_atomic_msgsize_get", e))?;
        cpg.max_atomic = atomic as usize;
        // SAFETY: a valid handle; `name` lives for the call.
        CsError::check(unsafe { (api.join)(handle, &name) }).map_err(|e| OpenError::Call("cpg_join", e))?;
        Ok(cpg)
    }

    /// The fd to poll; readable when callbacks are pending.
    pub fn fd(&self) -> RawFd {
        self.fd
    }

    /// This process: the node's id and the process's pid.
    pub fn local(&self) -> Member {
        self.local
    }

    /// The longest message corosync sends whole.
    pub fn max_atomic(&self) -> usize {
        self.max_atomic
    }

    /// Runs the pending callbacks and appends what they reported to `events`.
    pub fn dispatch(&mut self, events: &mut Vec<Event>) -> Result<(), CsError> {
        // SAFETY: a valid handle; the callbacks touch only the inbox, and
        // nothing else refers to it during the call (`&mut self`).
        let rc = unsafe { (self.api.dispatch)(self.handle, CS_DISPATCH_ALL) };
        // SAFETY: the inbox lives until drop; the callbacks are done.
        let inbox = unsafe { &mut *self.inbox };
        events.append(&mut inbox.events);
        CsError::check(rc)
    }

    /// Multicasts one message to the group, in agreed order; our own copy
    /// comes back too. `CS_ERR_TRY_AGAIN`: corosync takes no more now.
    pub fn mcast(&mut self, message: &[u8]) -> Result<(), CsError> {
        if !self.writable() {
            return Err(CsError::TRY_AGAIN);
        }
        let iov = libc::iovec { iov_base: message.as_ptr() as *mut c_void, iov_len: message.len() };
        // SAFETY: a valid handle; one iovec over `message`, which libcpg
        // only reads (the const in its prototype), during the call.
        CsError::check(unsafe { (self.api.mcast_joined)(self.handle, CPG_TYPE_AGREED, &iov, 1) })
    }
}

impl Cpg {
    /// Whether the socket libqb pokes corosync through takes a byte now
    /// (the module's text says why it matters).
    fn writable(&self) -> bool {
        let mut poll = libc::pollfd { fd: self.fd, events: libc::POLLOUT, revents: 0 };
        // SAFETY: one valid pollfd, alive for the call; no wait.
        let n = unsafe { libc::poll(&mut poll, 1, 0) };
        // A closed or failed socket: let libcpg report it.
        n != 0 && (poll.revents & libc::POLLOUT != 0 || poll.revents & (libc::POLLERR | libc::POLLHUP) != 0)
    }
}

impl Drop for Cpg {
    fn drop(&mut self) {
        // SAFETY: the handle is valid and finalized once; libcpg frees it
        // whatever the outcome (a dead corosync just fails the request).
        let rc = unsafe { (self.api.finalize)(self.handle) };
        if rc != CS_OK {
            log::debug!("cpg_finalize: {}", CsError(rc));
        }
        // SAFETY: made by Box::into_raw in open; no callback can run after
        // cpg_finalize, so nothing refers to it any more.
        drop(unsafe { Box::from_raw(self.inbox) });
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::fmt::Write as _;
    use std::mem::{offset_of, size_of};

    /// What the C program below prints, from this binding's definitions.
    fn rust_side() -> String {
        let mut s = String::new();
        let mut line = |name: &str, value: usize| writeln!(s, "{name} {value}").unwrap();
        line("CS_OK", CS_OK as usize);
        line("CS_ERR_LIBRARY", CS_ERR_LIBRARY as usize);
        line("CS_ERR_TRY_AGAIN", CS_ERR_TRY_AGAIN as usize);
        line("CS_DISPATCH_ALL", CS_DISPATCH_ALL as usize);
        line("CPG_TYPE_AGREED", CPG_TYPE_AGREED as usize);
        line("CPG_MODEL_V1", CPG_MODEL_V1 as usize);
        line("CPG_MAX_NAME_LENGTH", CPG_MAX_NAME_LENGTH);
        line("CPG_MEMBERS_MAX", CPG_MEMBERS_MAX);
        line("sizeof(cs_error_t)", size_of::<c_uint>());
        line("cs_error_t_is_unsigned", 1);
        line("sizeof(cpg_handle_t)", size_of::<CpgHandle>());
        line("sizeof(struct cpg_name)", size_of::<CpgName>());
        line("offsetof(struct cpg_name, value)", offset_of!(CpgName, value));
        line("sizeof(struct cpg_address)", size_of::<CpgAddress>());
        line("offsetof(struct cpg_address, pid)", offset_of!(CpgAddress, pid));
        line("offsetof(struct cpg_address, reason)", offset_of!(CpgAddress, reason));
        line("sizeof(struct cpg_ring_id)", size_of::<CpgRingId>());
        line("offsetof(struct cpg_ring_id, seq)", offset_of!(CpgRingId, seq));
        line("sizeof(cpg_model_v1_data_t)", size_of::<CpgModelV1Data>());
        line("offsetof(cpg_model_v1_data_t, cpg_deliver_fn)", offset_of!(CpgModelV1Data, cpg_deliver_fn));
        line("offsetof(cpg_model_v1_data_t, cpg_confchg_fn)", offset_of!(CpgModelV1Data, cpg_confchg_fn));
        line("offsetof(cpg_model_v1_data_t, cpg_totem_confchg_fn)", offset_of!(CpgModelV1Data, cpg_totem_confchg_fn));
        line("offsetof(cpg_model_v1_data_t, flags)", offset_of!(CpgModelV1Data, flags));
        s
    }

    const C_SIDE: &str = r#"
#include <corosync/cpg.h>
#include <stddef.h>
#include <stdio.h>

#define SAME(a, b) _Static_assert(__builtin_types_compatible_p(a, b), #a " is not " #b)
/* The prototypes and callback types as cpg.rs declares them. */
SAME(__typeof__(&cpg_model_initialize), cs_error_t (*)(cpg_handle_t *, cpg_model_t, cpg_model_data_t *, void *));
SAME(__typeof__(&cpg_finalize), cs_error_t (*)(cpg_handle_t));
SAME(__typeof__(&cpg_fd_get), cs_error_t (*)(cpg_handle_t, int *));
SAME(__typeof__(&cpg_context_get), cs_error_t (*)(cpg_handle_t, void **));
SAME(__typeof__(&cpg_dispatch), cs_error_t (*)(cpg_handle_t, cs_dispatch_flags_t));
SAME(__typeof__(&cpg_join), cs_error_t (*)(cpg_handle_t, const struct cpg_name *));
SAME(__typeof__(&cpg_mcast_joined), cs_error_t (*)(cpg_handle_t, cpg_guarantee_t, const struct iovec *, unsigned int));
SAME(__typeof__(&cpg_local_get), cs_error_t (*)(cpg_handle_t, unsigned int *));
SAME(__typeof__(&cpg_max_atomic_msgsize_get), cs_error_t (*)(cpg_handle_t, uint32_t *));
SAME(cpg_deliver_fn_t, void (*)(cpg_handle_t, const struct cpg_name *, uint32_t, uint32_t, void *, size_t));
SAME(cpg_confchg_fn_t, void (*)(cpg_handle_t, const struct cpg_name *, const struct cpg_address *, size_t,
                                const struct cpg_address *, size_t, const struct cpg_address *, size_t));
SAME(cpg_totem_confchg_fn_t, void (*)(cpg_handle_t, struct cpg_ring_id, uint32_t, const uint32_t *));
/* The enums, passed as c_uint. */
SAME(cs_error_t, unsigned int);
SAME(cs_dispatch_flags_t, unsigned int);
SAME(cpg_guarantee_t, unsigned int);
SAME(cpg_model_t, unsigned int);
SAME(cpg_handle_t, uint64_t);

#define N(x) printf("%s %zu\n", #x, (size_t)(x))
int main(void) {
    N(CS_OK);
    N(CS_ERR_LIBRARY);
    N(CS_ERR_TRY_AGAIN);
    N(CS_DISPATCH_ALL);
    N(CPG_TYPE_AGREED);
    N(CPG_MODEL_V1);
    N(CPG_MAX_NAME_LENGTH);
    N(CPG_MEMBERS_MAX);
    N(sizeof(cs_error_t));
    printf("cs_error_t_is_unsigned %d\n", (cs_error_t)-1 > 0);
    N(sizeof(cpg_handle_t));
    N(sizeof(struct cpg_name));
    N(offsetof(struct cpg_name, value));
    N(sizeof(struct cpg_address));
    N(offsetof(struct cpg_address, pid));
    N(offsetof(struct cpg_address, reason));
    N(sizeof(struct cpg_ring_id));
    N(offsetof(struct cpg_ring_id, seq));
    N(sizeof(cpg_model_v1_data_t));
    N(offsetof(cpg_model_v1_data_t, cpg_deliver_fn));
    N(offsetof(cpg_model_v1_data_t, cpg_confchg_fn));
    N(offsetof(cpg_model_v1_data_t, cpg_totem_confchg_fn));
    N(offsetof(cpg_model_v1_data_t, flags));
    return 0;
}
"#;

    /// Compiles a program against the installed cpg.h (Debian: libcpg-dev)
    /// that checks the bound prototypes and prints the values and layouts
    /// this binding assumes. Only the test needs the header; the build
    /// does not.
    #[test]
    fn the_binding_matches_the_installed_header() {
        let header = std::path::Path::new("/usr/include/corosync/cpg.h");
        assert!(header.exists(), "{} is needed to check the binding (Debian: libcpg-dev)", header.display());
        let dir = std::env::temp_dir().join(format!("xfrmsync-cpg-abi-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("abi.c");
        let program = dir.join("abi");
        std::fs::write(&source, C_SIDE).unwrap();
        // Checked at compile time; nothing is called, so no -lcpg.
        let cc = std::process::Command::new("cc")
            .args(["-std=gnu11", "-Wall", "-Werror"])
            .arg(&source)
            .arg("-o")
            .arg(&program)
            .output()
            .expect("cc");
        assert!(cc.status.success(), "cc: {}", String::from_utf8_lossy(&cc.stderr));
        let out = std::process::Command::new(&program).output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8(out.stdout).unwrap(), rust_side());
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn group_names() {
        let name = group_name("xfrmsync").unwrap();
        assert_eq!(name.length, 8);
        assert_eq!(name.value[..9].iter().map(|c| *c as u8).collect::<Vec<_>>(), b"xfrmsync\0");
        assert!(group_name(&"g".repeat(127)).is_ok());
        assert!(group_name(&"g".repeat(128)).is_err());
        assert!(group_name("").is_err());
        assert!(group_name("a\0b").is_err());
    }

    #[test]
    fn error_names() {
        assert_eq!(CsError::TRY_AGAIN.to_string(), "CS_ERR_TRY_AGAIN (6)");
        assert_eq!(CsError(100).name(), "CS_ERR_SECURITY");
        assert_eq!(CsError(29).name(), "an unknown cs_error_t");
        let e = OpenError::Call("cpg_model_initialize", CsError::LIBRARY);
        assert!(e.to_string().contains("is corosync running"), "{e}");
    }
}
