//! The C ABI of HA sync (`crate::sync`): an active node's side that turns
//! kernel events into encoded sync records, and a standby's side that holds
//! them and commits them at takeover. Like the rest of `ffi`, it only
//! translates: which record wins, what a commit writes and when a node is
//! replaced are decided in `crate::sync`.

use std::cell::{Cell, RefCell, RefMut};
use std::ffi::{c_char, c_int, c_void, CString};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::time::{Duration, Instant};

use super::{
    boundary, handle, live, release, required, text, write_out, xfrmsync_handle, xfrmsync_sa_id, InCall, Reentrant,
};
use crate::error::{Error, Result};
use crate::handle::Handle;
use crate::registry::{Direction, Thresholds};
use crate::sync::{
    Active, ActiveConfig, CommitOptions, InboundPolicy, Lag, MarginPolicy, Mismatch, Outcome, Outgoing, Received,
    SaCommit, Standby, SyncRecord,
};

/// `xfrmsync_standby_receive`: the record is now the one held for its SA.
pub const XFRMSYNC_RECORD_HELD: c_int = 0;
/// `xfrmsync_standby_receive`: the record held for its SA is as new or
/// newer (a retransmission, or one that arrived late); nothing changed.
pub const XFRMSYNC_RECORD_OLDER: c_int = 1;
/// `xfrmsync_standby_receive`: the record's epoch is below the highest the
/// standby knows: its sender was replaced; nothing changed.
pub const XFRMSYNC_RECORD_LOWER_EPOCH: c_int = 2;

/// `xfrmsync_standby_lag`: the record held is `*packets` behind the sample,
/// and a commit at the sample's time would add `*margin`.
pub const XFRMSYNC_LAG_BEHIND: c_int = 0;
/// `xfrmsync_standby_lag`: no record of the sample's SA is held.
pub const XFRMSYNC_LAG_NOT_HELD: c_int = 1;
/// `xfrmsync_standby_lag`: the sample's epoch is below the highest the
/// standby knows: its sender was replaced, and it measures nothing.
pub const XFRMSYNC_LAG_LOWER_EPOCH: c_int = 2;

/// `xfrmsync_commit_options.inbound`: inbound SAs continue from the synced
/// state, so packets the active node had not seen yet are accepted.
pub const XFRMSYNC_INBOUND_ACCEPT: u32 = 0;
/// `xfrmsync_commit_options.inbound`: inbound SAs advance by the margin
/// too, so anything the peer sent before the takeover is refused.
pub const XFRMSYNC_INBOUND_STRICT: u32 = 1;

/// `xfrmsync_sa_commit.outcome`: written; the moving number went from
/// `local` to `written` (the record held `synced`, `margin` was added).
pub const XFRMSYNC_COMMIT_WRITTEN: u32 = 1;
/// `xfrmsync_sa_commit.outcome`: not written, because `synced` plus `margin`
/// (giving `next`) passes 2^32 - 1 and the SA has no ESN. Rekey it; it was
/// left as it was so that it is retired first.
pub const XFRMSYNC_COMMIT_NEEDS_REKEY: u32 = 2;
/// `xfrmsync_sa_commit.outcome`: not written, because the record does not
/// fit the local SA; `mismatch` says how.
pub const XFRMSYNC_COMMIT_MISMATCH: u32 = 3;
/// `xfrmsync_sa_commit.outcome`: the kernel refused the write; `error` and
/// `error_message` say why.
pub const XFRMSYNC_COMMIT_FAILED: u32 = 4;
/// `xfrmsync_sa_commit.outcome`: a record is held for an SA that is not
/// installed here; nothing was written. Only `sa`, `direction`,
/// `record_age_ms` and `rate_per_ks` are filled in.
pub const XFRMSYNC_COMMIT_MISSING: u32 = 5;

/// `xfrmsync_sa_commit.mismatch`: the record is for another SA.
pub const XFRMSYNC_MISMATCH_OTHER_SA: u32 = 1;
/// `xfrmsync_sa_commit.mismatch`: the record's ESN flag or replay format
/// differs from the local SA's: the two were not installed alike.
pub const XFRMSYNC_MISMATCH_REPLAY_FORM: u32 = 2;
/// `xfrmsync_sa_commit.mismatch`: the SA's direction is known neither from
/// the record nor locally.
pub const XFRMSYNC_MISMATCH_NO_DIRECTION: u32 = 3;

/// The standby node's side of HA sync: the latest sync record of every SA,
/// in memory only until `xfrmsync_standby_commit`. Opaque.
pub struct xfrmsync_standby {
    _private: [u8; 0],
}

/// The active node's side of HA sync, on a handle of its own. Opaque.
pub struct xfrmsync_active {
    _private: [u8; 0],
}

/// How `xfrmsync_standby_commit` writes. Start from
/// `xfrmsync_commit_options_default()` and change what you need: a zeroed
/// struct is refused (its `safety_factor` is below 1).
///
/// The margin added to each synced number covers what the active node may
/// have sent since its record: its rate times (the record's age plus
/// `detection_ms`), plus its replay threshold, times `safety_factor`; then
/// held between `margin_floor` and `margin_ceiling` packets.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_commit_options {
    /// How long the failure took to notice and act on, ms (default 3000).
    pub detection_ms: u64,
    /// Multiplies the estimate; at least 1 (default 2).
    pub safety_factor: f64,
    /// Packets (default 1024).
    pub margin_floor: u64,
    /// Packets (default 2^30).
    pub margin_ceiling: u64,
    /// `XFRMSYNC_INBOUND_ACCEPT` (default) or `XFRMSYNC_INBOUND_STRICT`.
    pub inbound: u32,
    /// The commit's time, ms since the Unix epoch: records' ages, and so the
    /// margins, count to it. 0: now (default).
    pub now_ms: u64,
}

/// What a commit did to one SA. Which numbers are filled in depends on
/// `outcome`; the others are 0. The numbers are the ones that move with
/// the SA's traffic: the outbound sequence number of an outbound SA, the
/// highest inbound one seen of an inbound SA, 64 bits wide with ESN.
#[repr(C)]
#[derive(Clone, Copy)]
pub struct xfrmsync_sa_commit {
    pub sa: xfrmsync_sa_id,
    /// 0 unknown, `XFRMSYNC_DIR_IN` or `XFRMSYNC_DIR_OUT`: as the standby
    /// knows it, else as the record says.
    pub direction: u32,
    /// One `XFRMSYNC_COMMIT_*`.
    pub outcome: u32,
    /// With `XFRMSYNC_COMMIT_MISMATCH`, one `XFRMSYNC_MISMATCH_*`; else 0.
    pub mismatch: u32,
    /// The number in the record (written, needs rekey).
    pub synced: u64,
    /// The number the local SA had before the commit (written).
    pub local: u64,
    /// The number written: at least `synced` plus `margin` for an outbound
    /// SA, and never below `local` (written).
    pub written: u64,
    /// Packets added to the synced number (written, needs rekey).
    pub margin: u64,
    /// The number the SA would have needed (needs rekey).
    pub next: u64,
    /// The record's age at the commit's time, ms.
    pub record_age_ms: u64,
    /// The record's estimate of the SA's rate, packets per 1,000 s.
    pub rate_per_ks: u64,
    /// With `XFRMSYNC_COMMIT_FAILED`, the kernel's negative errno; else 0.
    pub error: c_int,
    /// With `XFRMSYNC_COMMIT_FAILED`, the message (valid until the callback
    /// returns); else NULL.
    pub error_message: *const c_char,
}

/// Learns what a commit did to one SA. `sa_commit` is valid only during
/// the call.
pub type xfrmsync_sa_commit_cb =
    Option<unsafe extern "C" fn(user_data: *mut c_void, sa_commit: *const xfrmsync_sa_commit)>;

/// Receives one encoded sync record (`len` bytes at `record`, valid only
/// during the call), to be sent to the standby as it is.
pub type xfrmsync_record_cb = Option<unsafe extern "C" fn(user_data: *mut c_void, record: *const u8, len: usize)>;

/// Learns that an SA is gone (deleted, or hard-expired): the standby should
/// forget it (`xfrmsync_standby_forget`). `sa` is valid only during the call.
pub type xfrmsync_gone_cb = Option<unsafe extern "C" fn(user_data: *mut c_void, sa: *const xfrmsync_sa_id)>;

/// The defaults of `xfrmsync_standby_commit` (what a NULL `options` gives):
/// 3000 ms to detect, a safety factor of 2, margins of 1024 to 2^30
/// packets, `XFRMSYNC_INBOUND_ACCEPT`, now.
#[no_mangle]
pub extern "C" fn xfrmsync_commit_options_default() -> xfrmsync_commit_options {
    let margin = MarginPolicy::default();
    xfrmsync_commit_options {
        detection_ms: margin.detection_ms,
        safety_factor: margin.safety_factor,
        margin_floor: margin.floor,
        margin_ceiling: margin.ceiling,
        inbound: XFRMSYNC_INBOUND_ACCEPT,
        now_ms: 0,
    }
}

impl xfrmsync_commit_options {
    fn to_rust(self) -> Result<CommitOptions> {
        // The engine would take a factor below 1 as 1; refusing it instead
        // catches a zeroed struct that skipped xfrmsync_commit_options_default.
        if !self.safety_factor.is_finite() || self.safety_factor < 1.0 {
            return Err(Error::invalid(format!("safety_factor {} is not a number of at least 1", self.safety_factor)));
        }
        let inbound = match self.inbound {
            XFRMSYNC_INBOUND_ACCEPT => InboundPolicy::Accept,
            XFRMSYNC_INBOUND_STRICT => InboundPolicy::Strict,
            other => return Err(Error::invalid(format!("inbound {other} is neither accept (0) nor strict (1)"))),
        };
        Ok(CommitOptions {
            margin: MarginPolicy {
                detection_ms: self.detection_ms,
                safety_factor: self.safety_factor,
                floor: self.margin_floor,
                ceiling: self.margin_ceiling,
            },
            inbound,
            now_ms: (self.now_ms != 0).then_some(self.now_ms),
        })
    }
}

fn direction_to_c(direction: Option<Direction>) -> u32 {
    match direction {
        None => 0,
        Some(Direction::In) => u32::from(super::XFRMSYNC_DIR_IN),
        Some(Direction::Out) => u32::from(super::XFRMSYNC_DIR_OUT),
    }
}

/// Milliseconds from now until `due`, rounded up (0 once due), as a poll
/// timeout.
fn ms_until(due: Instant) -> c_int {
    let ms = due.saturating_duration_since(Instant::now()).as_nanos().div_ceil(1_000_000);
    c_int::try_from(ms).unwrap_or(c_int::MAX)
}

/// One SA's report, and the message its `error_message` points into.
struct Report {
    c: xfrmsync_sa_commit,
    message: Option<CString>,
}

impl Report {
    fn blank(sa: &crate::sa::SaId, direction: Option<Direction>, record_age_ms: u64, rate_per_ks: u64) -> Report {
        Report {
            c: xfrmsync_sa_commit {
                sa: xfrmsync_sa_id::from_rust(sa),
                direction: direction_to_c(direction),
                outcome: 0,
                mismatch: 0,
                synced: 0,
                local: 0,
                written: 0,
                margin: 0,
                next: 0,
                record_age_ms,
                rate_per_ks,
                error: 0,
                error_message: std::ptr::null(),
            },
            message: None,
        }
    }

    fn from_rust(s: &SaCommit) -> Report {
        let mut r = Report::blank(&s.sa, s.direction, s.record_age_ms, s.rate_per_ks);
        let c = &mut r.c;
        match &s.outcome {
            Outcome::Written { synced, local, written, margin } => {
                c.outcome = XFRMSYNC_COMMIT_WRITTEN;
                (c.synced, c.local, c.written, c.margin) = (*synced, *local, *written, *margin);
            }
            Outcome::NeedsRekey { synced, next, margin } => {
                c.outcome = XFRMSYNC_COMMIT_NEEDS_REKEY;
                (c.synced, c.next, c.margin) = (*synced, *next, *margin);
            }
            Outcome::Mismatch(m) => {
                c.outcome = XFRMSYNC_COMMIT_MISMATCH;
                c.mismatch = match m {
                    Mismatch::OtherSa => XFRMSYNC_MISMATCH_OTHER_SA,
                    Mismatch::ReplayForm => XFRMSYNC_MISMATCH_REPLAY_FORM,
                    Mismatch::NoDirection => XFRMSYNC_MISMATCH_NO_DIRECTION,
                };
            }
            Outcome::Failed(e) => {
                c.outcome = XFRMSYNC_COMMIT_FAILED;
                c.error = -e.errno();
                // A kernel's ext-ack text could hold a NUL; C would stop there.
                r.message = CString::new(e.to_string().replace('\0', " ")).ok();
            }
        }
        r
    }
}

/// A standby the C caller holds: no callback runs while the library holds
/// a reference to it (commit reports after its work is done), so a plain
/// box is enough.
fn standby<'a>(ptr: *const xfrmsync_standby) -> Result<&'a Standby> {
    required(ptr.cast::<Standby>(), "standby")
}

fn standby_mut<'a>(ptr: *mut xfrmsync_standby) -> Result<&'a mut Standby> {
    // SAFETY: the C caller passes NULL or a pointer from
    // xfrmsync_standby_new that it has not freed, used by one thread at a
    // time (the header's contract); no other reference to it is live while
    // a call runs, since its callbacks run only after the last use.
    unsafe { ptr.cast::<Standby>().as_mut() }.ok_or_else(|| Error::invalid("standby is NULL"))
}

/// Creates a standby whose own epoch is `epoch`: the epoch the node last
/// committed, kept by the caller across restarts (it must never go back;
/// 0 for a node that never committed). Writes `*out` only on success.
/// Free with `xfrmsync_standby_free`.
#[no_mangle]
pub extern "C" fn xfrmsync_standby_new(epoch: u64, out: *mut *mut xfrmsync_standby) -> c_int {
    boundary(|| {
        if out.is_null() {
            return Err(Error::invalid("output pointer is NULL"));
        }
        let raw = Box::into_raw(Box::new(Standby::new(epoch))).cast::<xfrmsync_standby>();
        write_out(out, raw)?;
        Ok(0)
    })
}

/// Frees a standby and the records it holds. NULL is a no-op.
#[no_mangle]
pub extern "C" fn xfrmsync_standby_free(standby: *mut xfrmsync_standby) {
    if standby.is_null() {
        return;
    }
    let _ = catch_unwind(AssertUnwindSafe(|| {
        // SAFETY: a non-NULL standby came from Box::into_raw in
        // xfrmsync_standby_new, and the caller gives up its pointer here.
        drop(unsafe { Box::from_raw(standby.cast::<Standby>()) });
    }));
}

/// Takes one encoded sync record (exactly `len` bytes, as an active node's
/// `xfrmsync_record_cb` got it; split a batch with
/// `xfrmsync_sync_record_decode`). Returns `XFRMSYNC_RECORD_HELD` (0) when
/// it is now the SA's latest, `XFRMSYNC_RECORD_OLDER` or
/// `XFRMSYNC_RECORD_LOWER_EPOCH` (positive) when it was ignored, or
/// -EBADMSG for bytes that are not one whole record of a known version:
/// the standby is then unchanged. A record of a higher epoch raises the
/// standby's epoch.
#[no_mangle]
pub extern "C" fn xfrmsync_standby_receive(standby: *mut xfrmsync_standby, record: *const u8, len: usize) -> c_int {
    boundary(|| {
        let standby = standby_mut(standby)?;
        if record.is_null() {
            return Err(Error::invalid("record is NULL"));
        }
        // SAFETY: non-NULL, and by the header's contract `len` readable
        // bytes for the call.
        let bytes = unsafe { std::slice::from_raw_parts(record, len) };
        Ok(match standby.receive(SyncRecord::decode(bytes)?)? {
            Received::Held => XFRMSYNC_RECORD_HELD,
            Received::Older => XFRMSYNC_RECORD_OLDER,
            Received::LowerEpoch => XFRMSYNC_RECORD_LOWER_EPOCH,
        })
    })
}

/// How far the record held for an SA is behind `sample`, one encoded
/// sample (exactly `len` bytes) from the active node's
/// `xfrmsync_active_sample`. The sample is not held. On
/// `XFRMSYNC_LAG_BEHIND` (0), writes the packets behind into `*packets`
/// and the margin a commit at the sample's time would add, under
/// `options`' margin settings (NULL: the defaults), into `*margin` (either
/// may be NULL). A lag above the margin means a takeover then would have
/// reused sequence numbers. Returns `XFRMSYNC_LAG_NOT_HELD` or
/// `XFRMSYNC_LAG_LOWER_EPOCH` (positive) when there is nothing to compare,
/// or -EBADMSG for bytes that are not one whole record.
#[no_mangle]
pub extern "C" fn xfrmsync_standby_lag(
    standby: *const xfrmsync_standby,
    sample: *const u8,
    len: usize,
    options: *const xfrmsync_commit_options,
    packets: *mut u64,
    margin: *mut u64,
) -> c_int {
    boundary(|| {
        let standby = self::standby(standby)?;
        if sample.is_null() {
            return Err(Error::invalid("sample is NULL"));
        }
        // SAFETY: non-NULL, and by the header's contract `len` readable
        // bytes for the call.
        let bytes = unsafe { std::slice::from_raw_parts(sample, len) };
        let sample = SyncRecord::decode(bytes)?;
        let policy = match options.is_null() {
            true => xfrmsync_commit_options_default(),
            false => *required(options, "options")?,
        }
        .to_rust()?
        .margin;
        Ok(match standby.lag(&sample, &policy) {
            Lag::Behind { packets: behind, margin: added } => {
                if !packets.is_null() {
                    write_out(packets, behind)?;
                }
                if !margin.is_null() {
                    write_out(margin, added)?;
                }
                XFRMSYNC_LAG_BEHIND
            }
            Lag::NotHeld => XFRMSYNC_LAG_NOT_HELD,
            Lag::LowerEpoch => XFRMSYNC_LAG_LOWER_EPOCH,
        })
    })
}

/// Forgets the record held for `sa` (the active node said it is gone).
/// Returns 1 if one was held, 0 if not.
#[no_mangle]
pub extern "C" fn xfrmsync_standby_forget(standby: *mut xfrmsync_standby, sa: *const xfrmsync_sa_id) -> c_int {
    boundary(|| {
        let standby = standby_mut(standby)?;
        let sa = required(sa, "sa")?.to_rust()?;
        Ok(c_int::from(standby.forget(&sa)))
    })
}

/// Writes into `*out` the highest epoch the standby knows: its own, or a
/// higher one a record carried; after a commit, the commit's new epoch.
#[no_mangle]
pub extern "C" fn xfrmsync_standby_epoch(standby: *const xfrmsync_standby, out: *mut u64) -> c_int {
    boundary(|| {
        let epoch = self::standby(standby)?.epoch();
        write_out(out, epoch)?;
        Ok(0)
    })
}

/// The number of SAs the standby holds a record for.
#[no_mangle]
pub extern "C" fn xfrmsync_standby_count(standby: *const xfrmsync_standby) -> c_int {
    boundary(|| Ok(c_int::try_from(self::standby(standby)?.len()).unwrap_or(c_int::MAX)))
}

/// The takeover: writes every held record into the local SA it belongs to
/// (the SAs of `handle`'s namespace, listed once; batched NEWAE, each
/// acknowledged) and starts an epoch above every one the standby knew,
/// written to `*new_epoch` (may be NULL; `xfrmsync_standby_epoch` has it
/// too). Keep that epoch before sending anything, and give it to this
/// node's active side. An SA is never deleted or re-added. `options` NULL
/// means `xfrmsync_commit_options_default()`.
///
/// Then `callback` (may be NULL) runs once per SA, on this thread, after
/// all writing is done: first every local SA that has a record, in listing
/// order, then every record whose SA is not installed here
/// (`XFRMSYNC_COMMIT_MISSING`). From it any call may be made, including on
/// this standby and this handle, and freeing them. Returns the number of
/// SAs reported. One SA that fails does not stop the others; a negative
/// errno means the kernel could not be listed or written at all: no
/// callback ran and the epoch was not raised, though some SAs may have
/// been written already.
#[no_mangle]
pub extern "C" fn xfrmsync_standby_commit(
    standby: *mut xfrmsync_standby,
    handle: *mut xfrmsync_handle,
    options: *const xfrmsync_commit_options,
    callback: xfrmsync_sa_commit_cb,
    user_data: *mut c_void,
    new_epoch: *mut u64,
) -> c_int {
    boundary(|| {
        let (mut reports, epoch) = {
            let standby = standby_mut(standby)?;
            let handle: &Handle = self::handle(handle)?;
            let mut options = match options.is_null() {
                true => xfrmsync_commit_options_default(),
                false => *required(options, "options")?,
            }
            .to_rust()?;
            // Fixed here so that missing SAs' ages count to the same time.
            let now = *options.now_ms.get_or_insert_with(crate::sync::now_ms);
            let commit = standby.commit(handle, &options)?;
            let mut reports: Vec<Report> = commit.sas.iter().map(Report::from_rust).collect();
            for sa in &commit.missing_locally {
                let Some(record) = standby.get(sa) else { continue };
                let age = now.saturating_sub(record.sent_at_ms);
                let mut report = Report::blank(sa, record.direction, age, record.rate_per_ks);
                report.c.outcome = XFRMSYNC_COMMIT_MISSING;
                reports.push(report);
            }
            (reports, commit.epoch)
        };
        if !new_epoch.is_null() {
            write_out(new_epoch, epoch)?;
        }
        if let Some(callback) = callback {
            for report in &mut reports {
                report.c.error_message = report.message.as_ref().map_or(std::ptr::null(), |m| m.as_ptr());
                // SAFETY: the caller registered a function taking these
                // arguments; the report (and its message) outlives the call.
                // Neither the standby nor the handle is referenced any more,
                // so the callback may use or free them.
                unsafe { callback(user_data, &report.c) };
            }
        }
        Ok(c_int::try_from(reports.len()).unwrap_or(c_int::MAX))
    })
}

/// What an `xfrmsync_active` points to.
struct CActive {
    /// Borrowed mutably for the whole of every call, so a call from inside
    /// dispatch's callbacks finds it taken and gets -EBUSY instead of a
    /// second mutable reference.
    engine: RefCell<Active>,
    /// Dispatch calls in progress (more than one only while a nested one is
    /// being refused).
    dispatching: Cell<u32>,
    /// `xfrmsync_active_free` was called from a callback: the dispatch that
    /// ran it frees the object when it returns; until then no further
    /// callback runs and calls give -EINVAL.
    closing: Cell<bool>,
}

// SAFETY: `calls` and `is_closing` give the object's own counter and flag,
// and every `xfrmsync_active` comes from Box::into_raw in
// xfrmsync_active_new.
unsafe impl Reentrant for CActive {
    const NAME: &'static str = "active";
    const FREED: &'static str = "the active side was freed from inside one of its callbacks";

    fn calls(&self) -> &Cell<u32> {
        &self.dispatching
    }

    fn is_closing(&self) -> bool {
        self.closing.get()
    }

    fn mark_closing(&self) {
        self.closing.set(true);
    }
}

fn cactive<'a>(ptr: *const xfrmsync_active) -> Result<&'a CActive> {
    live(ptr.cast::<CActive>())
}

fn engine<'a>(ptr: *const xfrmsync_active) -> Result<RefMut<'a, Active>> {
    cactive(ptr)?.engine.try_borrow_mut().map_err(|_| Error::Busy("called from inside xfrmsync_active_dispatch"))
}

/// Starts the active node's side at `epoch` in the network namespace at
/// `netns_path` (e.g. "/run/netns/NAME"; needs CAP_SYS_ADMIN), or in the
/// calling thread's own if it is NULL, on a handle of its own. Every SA
/// there gets thresholds, which bound how far behind a standby can be:
/// `replay_packets` packets and `timer_ms` ms (0: 256 packets, 1000 ms);
/// every SA's record is sent again each `refresh_ms` (0: 10000 ms). The
/// first dispatch calls list every SA, so the standby gets a snapshot.
/// Writes `*out` only on success. Free with `xfrmsync_active_free`.
#[no_mangle]
pub extern "C" fn xfrmsync_active_new(
    netns_path: *const c_char,
    epoch: u64,
    replay_packets: u32,
    timer_ms: u32,
    refresh_ms: u32,
    out: *mut *mut xfrmsync_active,
) -> c_int {
    boundary(|| {
        if out.is_null() {
            return Err(Error::invalid("output pointer is NULL"));
        }
        let handle = match netns_path.is_null() {
            true => Handle::open()?,
            false => Handle::builder().netns_path(text(netns_path, "netns path")?).open()?,
        };
        let defaults = ActiveConfig::default();
        let or = |given: u32, default: u32| if given == 0 { default } else { given };
        let config = ActiveConfig {
            rules: Vec::new(),
            default_thresholds: Thresholds {
                replay_packets: or(replay_packets, defaults.default_thresholds.replay_packets),
                timer_ms: or(timer_ms, defaults.default_thresholds.timer_ms),
            },
            refresh: match refresh_ms {
                0 => defaults.refresh,
                ms => Duration::from_millis(u64::from(ms)),
            },
        };
        let active = CActive {
            engine: RefCell::new(Active::new(handle, epoch, config)?),
            dispatching: Cell::new(0),
            closing: Cell::new(false),
        };
        write_out(out, Box::into_raw(Box::new(active)).cast::<xfrmsync_active>())?;
        Ok(0)
    })
}

/// Stops syncing, closes the handle and frees the object. NULL is a no-op.
/// From inside one of `xfrmsync_active_dispatch`'s callbacks it is safe
/// too: the object is then freed when that dispatch returns; until then no
/// further callback runs and calls on it give -EINVAL. Either way the
/// caller must not use the pointer afterwards.
#[no_mangle]
pub extern "C" fn xfrmsync_active_free(active: *mut xfrmsync_active) {
    release(active.cast::<CActive>());
}

/// The fd to poll for readability (non-blocking, close-on-exec), or a
/// negative errno. It belongs to the object.
#[no_mangle]
pub extern "C" fn xfrmsync_active_fd(active: *const xfrmsync_active) -> c_int {
    boundary(|| Ok(engine(active)?.registry().handle().event_fd()))
}

/// Milliseconds until `xfrmsync_active_dispatch` is due even if the fd is
/// quiet (0: now), for a listing step or the periodic refresh. Use it as
/// the poll timeout; it is never more than the refresh period.
#[no_mangle]
pub extern "C" fn xfrmsync_active_next_due_ms(active: *const xfrmsync_active) -> c_int {
    boundary(|| Ok(ms_until(engine(active)?.next_due())))
}

/// Reads what the kernel announced, without waiting, and hands each SA's
/// new state to `on_record` as an encoded sync record (send it to the
/// standby as it is; `xfrmsync_standby_receive` takes it), and each SA
/// that is gone to `on_gone`. Both are required; they run on this thread,
/// inside this call only. Returns how many records and departures were
/// handed out, or a negative errno.
///
/// -ENOBUFS is informative: the kernel dropped events, and a listing that
/// sends every SA again is under way (in steps: `xfrmsync_active_next_due_ms`
/// is 0 while it runs); nothing else is needed. Whatever reached the
/// callbacks before an error counts as sent: send it on. Once the node was
/// replaced (`xfrmsync_active_learn_epoch`) nothing is handed out any more.
///
/// From the callbacks, calls on this object give -EBUSY, except
/// `xfrmsync_active_free` (see there). They must return normally: a C++
/// exception or a longjmp out of one is undefined behaviour.
#[no_mangle]
pub extern "C" fn xfrmsync_active_dispatch(
    active: *mut xfrmsync_active,
    on_record: xfrmsync_record_cb,
    on_gone: xfrmsync_gone_cb,
    user_data: *mut c_void,
) -> c_int {
    boundary(|| {
        let (_dispatching, c) = InCall::enter(active.cast::<CActive>())?;
        let (Some(on_record), Some(on_gone)) = (on_record, on_gone) else {
            return Err(Error::invalid("on_record or on_gone is NULL"));
        };
        let mut engine = engine(active)?;
        let mut encoded = Vec::with_capacity(crate::sync::MAX_RECORD_LEN);
        let mut handed = 0usize;
        let mut unencodable = None;
        let dispatched = engine.dispatch(&mut |outgoing: Outgoing<'_>| {
            if c.closing.get() {
                return;
            }
            match outgoing {
                Outgoing::Record(record) => {
                    encoded.clear();
                    if let Err(e) = record.encode(&mut encoded) {
                        unencodable.get_or_insert(e);
                        return;
                    }
                    handed += 1;
                    // SAFETY: the caller passed a function taking these
                    // arguments; `encoded` outlives the call and is not
                    // touched during it.
                    unsafe { on_record(user_data, encoded.as_ptr(), encoded.len()) }
                }
                Outgoing::Gone(sa) => {
                    let sa = xfrmsync_sa_id::from_rust(sa);
                    handed += 1;
                    // SAFETY: as above, for `sa`.
                    unsafe { on_gone(user_data, &sa) }
                }
            }
        });
        // Released before `_dispatching` may free the object.
        drop(engine);
        dispatched?;
        // The engine builds records only from states the kernel gave, whose
        // addresses share a family; one that fails to encode is a bug to
        // report, not to skip in silence.
        if let Some(e) = unencodable {
            return Err(e);
        }
        Ok(c_int::try_from(handed).unwrap_or(c_int::MAX))
    })
}

/// Reads the kernel's state now of up to `count` SAs this node has sent
/// records of, taken in turn so that successive calls go round every one,
/// and hands each to `on_sample` as an encoded record, for the standbys to
/// measure how far behind their records are (`xfrmsync_standby_lag`).
/// Send them apart from records: a standby must not hold one. Every
/// sample is read before the first callback, so the callback may make any
/// call, on this object too. Returns the number handed; a replaced node
/// hands none.
#[no_mangle]
pub extern "C" fn xfrmsync_active_sample(
    active: *mut xfrmsync_active,
    count: usize,
    on_sample: xfrmsync_record_cb,
    user_data: *mut c_void,
) -> c_int {
    boundary(|| {
        let Some(on_sample) = on_sample else { return Err(Error::invalid("on_sample is NULL")) };
        let samples = engine(active)?.sample(count);
        let mut encoded = Vec::with_capacity(crate::sync::MAX_RECORD_LEN);
        for sample in &samples {
            encoded.clear();
            sample.encode(&mut encoded)?;
            // SAFETY: the caller passed a function taking these arguments;
            // `encoded` outlives the call and is not touched during it.
            unsafe { on_sample(user_data, encoded.as_ptr(), encoded.len()) }
        }
        Ok(c_int::try_from(samples.len()).unwrap_or(c_int::MAX))
    })
}

/// Asks for every SA to be sent again, in steps from the next dispatch on:
/// for a standby that (re)joined.
#[no_mangle]
pub extern "C" fn xfrmsync_active_snapshot(active: *mut xfrmsync_active) -> c_int {
    boundary(|| engine(active)?.snapshot().map(|_| 0))
}

/// Learns that some node holds `epoch` (a standby's commit, seen on the
/// caller's link). A higher one than this node's means this node was
/// replaced: from then on its dispatch hands out nothing, so that two
/// nodes never send on one SA. Returns 1 when this call learned that the
/// node was replaced, 0 otherwise (a lower or equal epoch, or already
/// known).
#[no_mangle]
pub extern "C" fn xfrmsync_active_learn_epoch(active: *mut xfrmsync_active, epoch: u64) -> c_int {
    boundary(|| Ok(c_int::from(engine(active)?.learn_epoch(epoch))))
}

/// Returns 1 and writes into `*epoch` (may be NULL) the epoch that replaced
/// this node once it learned one, or 0 (`*epoch` untouched) while it was
/// not replaced.
#[no_mangle]
pub extern "C" fn xfrmsync_active_replaced_by(active: *const xfrmsync_active, epoch: *mut u64) -> c_int {
    boundary(|| match engine(active)?.replaced_by() {
        None => Ok(0),
        Some(by) => {
            if !epoch.is_null() {
                write_out(epoch, by)?;
            }
            Ok(1)
        }
    })
}
