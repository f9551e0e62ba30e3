//! What the kernel says about one SA: replay state, lifetime counters,
//! thresholds, and why it said it. Plain values, no heap: an event is decoded
//! into one of these without allocating.

use std::fmt;
use std::net::IpAddr;

use crate::sa::SaId;

/// `XFRM_AE_*` flags of `struct xfrm_aevent_id`.
pub mod flags {
    pub const RTHR: u32 = 1;
    pub const RVAL: u32 = 2;
    pub const LVAL: u32 = 4;
    pub const ETHR: u32 = 8;
    pub const CR: u32 = 16;
    pub const CE: u32 = 32;
    pub const CU: u32 = 64;
}

/// The kernel's limit on an ESN replay bitmap (`XFRMA_REPLAY_ESN_MAX`, 4096
/// bits), in 32-bit words.
pub const MAX_BITMAP_WORDS: usize = 128;

/// Why the kernel sent an event.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Cause {
    /// A replay counter moved by at least the replay threshold (`XFRM_AE_CR`).
    Replay,
    /// The timer threshold elapsed with changes, or the first packet after an
    /// idle period arrived (`XFRM_AE_CE`).
    Timer,
    /// Someone set values or thresholds with `XFRM_MSG_NEWAE` (`XFRM_AE_CU`).
    Update,
}

impl Cause {
    pub fn from_flags(value: u32) -> Option<Cause> {
        if value & flags::CU != 0 {
            Some(Cause::Update)
        } else if value & flags::CR != 0 {
            Some(Cause::Replay)
        } else if value & flags::CE != 0 {
            Some(Cause::Timer)
        } else {
            None
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Cause::Replay => "replay",
            Cause::Timer => "timer",
            Cause::Update => "update",
        }
    }
}

/// `struct xfrm_lifetime_cur`: running counters of an SA. In a traffic
/// event of an inbound SA they do not yet count the packet that triggered
/// the event (the kernel advances the replay state first).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Lifetime {
    pub bytes: u64,
    pub packets: u64,
    /// Seconds since the epoch.
    pub add_time: u64,
    /// Seconds since the epoch; 0 until the first packet.
    pub use_time: u64,
}

/// `struct xfrm_replay_state`: the state of SAs without ESN and with a
/// window of at most 32.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct LegacyReplay {
    pub oseq: u32,
    pub seq: u32,
    pub bitmap: u32,
}

/// `struct xfrm_replay_state_esn`: the state of ESN or wide-window SAs.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct EsnReplay {
    pub oseq: u32,
    pub seq: u32,
    pub oseq_hi: u32,
    pub seq_hi: u32,
    pub replay_window: u32,
    pub(crate) bmp_len: u32,
    pub(crate) bmp: [u32; MAX_BITMAP_WORDS],
}

impl EsnReplay {
    /// Fails when the bitmap is longer than the kernel allows or shorter
    /// than the window.
    pub fn new(
        oseq: u32,
        seq: u32,
        oseq_hi: u32,
        seq_hi: u32,
        replay_window: u32,
        bitmap: &[u32],
    ) -> Result<EsnReplay, &'static str> {
        if bitmap.len() > MAX_BITMAP_WORDS {
            return Err("ESN bitmap longer than 128 words");
        }
        if u64::from(replay_window) > bitmap.len() as u64 * 32 {
            return Err("ESN replay window larger than its bitmap");
        }
        let mut bmp = [0u32; MAX_BITMAP_WORDS];
        bmp[..bitmap.len()].copy_from_slice(bitmap);
        Ok(EsnReplay { oseq, seq, oseq_hi, seq_hi, replay_window, bmp_len: bitmap.len() as u32, bmp })
    }

    /// The bitmap words, `bmp_len` of them.
    pub fn bitmap(&self) -> &[u32] {
        &self.bmp[..self.bmp_len as usize]
    }

    /// The full 64-bit outbound sequence number.
    pub fn oseq64(&self) -> u64 {
        (u64::from(self.oseq_hi) << 32) | u64::from(self.oseq)
    }

    /// The full 64-bit highest inbound sequence number.
    pub fn seq64(&self) -> u64 {
        (u64::from(self.seq_hi) << 32) | u64::from(self.seq)
    }
}

impl fmt::Debug for EsnReplay {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("EsnReplay")
            .field("oseq", &self.oseq)
            .field("seq", &self.seq)
            .field("oseq_hi", &self.oseq_hi)
            .field("seq_hi", &self.seq_hi)
            .field("replay_window", &self.replay_window)
            .field("bitmap", &self.bitmap())
            .finish()
    }
}

/// Replay state in whichever form the SA keeps it. The kernel ignores a
/// legacy value sent to an ESN SA, so the form is part of the value.
///
/// The form is not the SA's ESN flag: an SA without it but with a window
/// above 32 keeps the ESN-format structure too, its high halves always 0,
/// and its sequence numbers wrap at 2^32. Only `NEWSA`/`GETSA` tell the
/// flag ([`crate::wire::SaInfo::esn`]); text and JSON say "esn-format" /
/// `"format":"esn"` for the structure.
// The ESN variant is large on purpose: a fixed array keeps decoding free of
// heap allocation on the event path.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Replay {
    Legacy(LegacyReplay),
    Esn(EsnReplay),
}

impl Replay {
    /// Whether the state has the ESN-format structure (not whether the SA
    /// has the ESN flag: see the type's documentation).
    pub fn is_esn(&self) -> bool {
        matches!(self, Replay::Esn(_))
    }

    /// Outbound sequence number, 64 bits wide for ESN.
    pub fn oseq64(&self) -> u64 {
        match self {
            Replay::Legacy(r) => u64::from(r.oseq),
            Replay::Esn(r) => r.oseq64(),
        }
    }

    /// Highest inbound sequence number, 64 bits wide for ESN.
    pub fn seq64(&self) -> u64 {
        match self {
            Replay::Legacy(r) => u64::from(r.seq),
            Replay::Esn(r) => r.seq64(),
        }
    }
}

/// One `XFRM_MSG_NEWAE` from the kernel: an event, or the answer to a query.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Aevent {
    pub sa: SaId,
    pub saddr: IpAddr,
    pub reqid: u32,
    /// The raw `XFRM_AE_*` flags.
    pub flags: u32,
    pub replay: Replay,
    pub lifetime: Lifetime,
    /// Packets; present when asked for with a query.
    pub replay_threshold: Option<u32>,
    /// Milliseconds; present when asked for with a query. The kernel reports
    /// it in 100 ms steps, rounded down.
    pub timer_threshold_ms: Option<u32>,
    /// The netlink header's sequence number. In an update event, the one of
    /// the request that caused it; in traffic events 0 (meaningless).
    pub nlmsg_seq: u32,
    /// The netlink header's port id. In an update event, the port id of the
    /// socket whose request caused it (see `Handle::caused`); in traffic
    /// events meaningless.
    pub nlmsg_pid: u32,
}

impl Aevent {
    pub fn cause(&self) -> Option<Cause> {
        Cause::from_flags(self.flags)
    }

    /// This event as one JSON object on one line.
    pub fn json(&self) -> JsonLine<'_> {
        JsonLine(self)
    }
}

/// The values and thresholds one `XFRM_MSG_NEWAE` sets; `None` leaves a
/// field as the kernel has it. All are applied together, atomically.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct AeUpdate {
    pub replay_threshold: Option<u32>,
    /// Milliseconds, meant as milliseconds on any kernel HZ.
    pub timer_threshold_ms: Option<u32>,
    pub replay: Option<Replay>,
    pub lifetime: Option<Lifetime>,
}

impl AeUpdate {
    pub fn is_empty(&self) -> bool {
        self.replay_threshold.is_none()
            && self.timer_threshold_ms.is_none()
            && self.replay.is_none()
            && self.lifetime.is_none()
    }
}

/// One human-readable line, the format of the examples.
impl fmt::Display for Aevent {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let cause = self.cause().map_or("query", |c| c.name());
        write!(f, "{cause} {} src {} reqid {}", self.sa, self.saddr, self.reqid)?;
        match &self.replay {
            Replay::Legacy(r) => write!(f, " oseq 0x{:x} seq 0x{:x} bitmap 0x{:08x}", r.oseq, r.seq, r.bitmap)?,
            Replay::Esn(r) => {
                write!(
                    f,
                    " esn-format oseq-hi 0x{:x} oseq 0x{:x} seq-hi 0x{:x} seq 0x{:x} window {} bitmap",
                    r.oseq_hi, r.oseq, r.seq_hi, r.seq, r.replay_window
                )?;
                for word in r.bitmap() {
                    write!(f, " {word:08x}")?;
                }
            }
        }
        let l = &self.lifetime;
        write!(f, " bytes {} packets {}", l.bytes, l.packets)?;
        if let Some(t) = self.replay_threshold {
            write!(f, " replay-threshold {t}")?;
        }
        if let Some(t) = self.timer_threshold_ms {
            write!(f, " timer-threshold {t}ms")?;
        }
        if self.cause() == Some(Cause::Update) {
            write!(f, " by port {} seq {}", self.nlmsg_pid, self.nlmsg_seq)?;
        }
        Ok(())
    }
}

/// An [`Aevent`] formatted as a JSON object; every string in it is an
/// address or a fixed word, so nothing needs escaping.
pub struct JsonLine<'a>(&'a Aevent);

impl fmt::Display for JsonLine<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ev = self.0;
        let cause = ev.cause().map_or("query", |c| c.name());
        write!(
            f,
            "{{\"cause\":\"{cause}\",\"flags\":{},\"daddr\":\"{}\",\"spi\":{},\"proto\":{},\
             \"mark\":{},\"mark_mask\":{},\"if_id\":{},\"saddr\":\"{}\",\"reqid\":{}",
            ev.flags,
            ev.sa.daddr,
            ev.sa.spi,
            ev.sa.proto,
            ev.sa.mark.value,
            ev.sa.mark.mask,
            ev.sa.if_id,
            ev.saddr,
            ev.reqid
        )?;
        match &ev.replay {
            Replay::Legacy(r) => write!(
                f,
                ",\"replay\":{{\"format\":\"legacy\",\"oseq\":{},\"seq\":{},\"bitmap\":[{}]}}",
                r.oseq, r.seq, r.bitmap
            )?,
            Replay::Esn(r) => {
                write!(
                    f,
                    ",\"replay\":{{\"format\":\"esn\",\"oseq\":{},\"seq\":{},\"oseq_hi\":{},\"seq_hi\":{},\
                     \"replay_window\":{},\"bitmap\":[",
                    r.oseq, r.seq, r.oseq_hi, r.seq_hi, r.replay_window
                )?;
                for (i, word) in r.bitmap().iter().enumerate() {
                    let sep = if i == 0 { "" } else { "," };
                    write!(f, "{sep}{word}")?;
                }
                f.write_str("]}")?;
            }
        }
        let l = &ev.lifetime;
        write!(
            f,
            ",\"lifetime\":{{\"bytes\":{},\"packets\":{},\"add_time\":{},\"use_time\":{}}}",
            l.bytes, l.packets, l.add_time, l.use_time
        )?;
        write!(f, ",\"nlmsg_seq\":{},\"nlmsg_pid\":{}", ev.nlmsg_seq, ev.nlmsg_pid)?;
        if let Some(t) = ev.replay_threshold {
            write!(f, ",\"replay_threshold\":{t}")?;
        }
        if let Some(t) = ev.timer_threshold_ms {
            write!(f, ",\"timer_threshold_ms\":{t}")?;
        }
        f.write_str("}")
    }
}
