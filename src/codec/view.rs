//! An aevent read in place: [`AeventView`] borrows the message it was
//! parsed from and copies nothing. Parsing checks every length once (the
//! same checks as the owned decoder, which is built on it); the accessors
//! then read fixed offsets of slices whose sizes are already known.
//!
//! This is the event path's form: `dispatch` hands views to view callbacks
//! (`Handle::on_sa_event_view`) and builds an owned [`Aevent`] only for
//! callbacks that take one. An ESN bitmap is read word by word from the
//! message, never copied into a 128-word array.

// `ok_or(Error::Malformed(..))` builds and drops an `Error` (which has drop
// glue) on every success; measured at half the decoder's instructions, so
// the lazy form stays wherever clippy would have the eager one.
#![allow(clippy::unnecessary_lazy_evaluations)]

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::aevent::{Aevent, Cause, EsnReplay, LegacyReplay, Lifetime, Replay, MAX_BITMAP_WORDS};
use crate::error::{Error, Result};
use crate::sa::{Mark, SaId};
// The layouts are the wire codec's: one meaning, one place.
use crate::wire::{
    Attrs, NlMsg, AEVENT_ID_LEN, ESN_HEADER_LEN, LEGACY_REPLAY_LEN as LEGACY_LEN, LIFETIME_LEN, XFRMA_ETIMER_THRESH,
    XFRMA_IF_ID, XFRMA_LTIME_VAL, XFRMA_MARK, XFRMA_REPLAY_ESN_VAL, XFRMA_REPLAY_THRESH, XFRMA_REPLAY_VAL,
};

#[inline]
fn u32_at<const N: usize>(buf: &[u8; N], at: usize) -> u32 {
    u32::from_ne_bytes([buf[at], buf[at + 1], buf[at + 2], buf[at + 3]])
}

#[inline]
fn u64_at<const N: usize>(buf: &[u8; N], at: usize) -> u64 {
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&buf[at..at + 8]);
    u64::from_ne_bytes(raw)
}

/// The first `N` bytes of `payload` as an array, or `err`.
#[inline]
fn head<'a, const N: usize>(payload: &'a [u8], err: &'static str) -> Result<&'a [u8; N]> {
    payload.get(..N).and_then(|b| b.try_into().ok()).ok_or_else(|| Error::Malformed(err))
}

#[inline]
fn first_u32(payload: &[u8], err: &'static str) -> Result<u32> {
    head::<4>(payload, err).map(|b| u32::from_ne_bytes(*b))
}

/// Replay state as it lies in the message.
#[derive(Clone, Copy)]
enum Raw<'a> {
    /// `struct xfrm_replay_state`.
    Legacy(&'a [u8; LEGACY_LEN]),
    /// `struct xfrm_replay_state_esn`'s fixed part, and its bitmap of
    /// `bmp_len` words (checked to lie inside the attribute).
    Esn(&'a [u8; ESN_HEADER_LEN], &'a [u8]),
}

/// Replay state read in place; see [`Replay`] for its meaning.
#[derive(Clone, Copy)]
pub struct ReplayView<'a>(Raw<'a>);

impl<'a> ReplayView<'a> {
    /// Whether the state has the ESN-format structure.
    #[inline]
    pub fn is_esn(&self) -> bool {
        matches!(self.0, Raw::Esn(..))
    }

    #[inline]
    pub fn oseq(&self) -> u32 {
        match self.0 {
            Raw::Legacy(r) => u32_at(r, 0),
            Raw::Esn(h, _) => u32_at(h, 4),
        }
    }

    #[inline]
    pub fn seq(&self) -> u32 {
        match self.0 {
            Raw::Legacy(r) => u32_at(r, 4),
            Raw::Esn(h, _) => u32_at(h, 8),
        }
    }

    /// 0 for the legacy form.
    #[inline]
    pub fn oseq_hi(&self) -> u32 {
        match self.0 {
            Raw::Legacy(_) => 0,
            Raw::Esn(h, _) => u32_at(h, 12),
        }
    }

    /// 0 for the legacy form.
    #[inline]
    pub fn seq_hi(&self) -> u32 {
        match self.0 {
            Raw::Legacy(_) => 0,
            Raw::Esn(h, _) => u32_at(h, 16),
        }
    }

    /// The ESN form's window; 0 for the legacy form.
    #[inline]
    pub fn replay_window(&self) -> u32 {
        match self.0 {
            Raw::Legacy(_) => 0,
            Raw::Esn(h, _) => u32_at(h, 20),
        }
    }

    #[inline]
    pub fn oseq64(&self) -> u64 {
        (u64::from(self.oseq_hi()) << 32) | u64::from(self.oseq())
    }

    #[inline]
    pub fn seq64(&self) -> u64 {
        (u64::from(self.seq_hi()) << 32) | u64::from(self.seq())
    }

    /// Bitmap words: 1 for the legacy form, `bmp_len` for ESN.
    #[inline]
    pub fn bitmap_len(&self) -> usize {
        match self.0 {
            Raw::Legacy(_) => 1,
            Raw::Esn(_, words) => words.len() / 4,
        }
    }

    /// Word `i` of the bitmap, `None` past its end.
    #[inline]
    pub fn bitmap_word(&self, i: usize) -> Option<u32> {
        match self.0 {
            Raw::Legacy(r) => (i == 0).then(|| u32_at(r, 8)),
            Raw::Esn(_, words) => words.get(4 * i..4 * i + 4).map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]])),
        }
    }

    /// The bitmap's words in order.
    #[inline]
    pub fn bitmap_words(&self) -> impl Iterator<Item = u32> + 'a {
        let (legacy, words): (Option<u32>, &'a [u8]) = match self.0 {
            Raw::Legacy(r) => (Some(u32_at(r, 8)), &[]),
            Raw::Esn(_, words) => (None, words),
        };
        legacy.into_iter().chain(words.chunks_exact(4).map(|w| u32::from_ne_bytes([w[0], w[1], w[2], w[3]])))
    }

    /// The owned value (the ESN bitmap copied into its fixed array).
    #[inline]
    pub fn to_replay(&self) -> Replay {
        match self.0 {
            Raw::Legacy(r) => {
                Replay::Legacy(LegacyReplay { oseq: u32_at(r, 0), seq: u32_at(r, 4), bitmap: u32_at(r, 8) })
            }
            Raw::Esn(h, words) => {
                let mut bmp = [0u32; MAX_BITMAP_WORDS];
                for (word, raw) in bmp.iter_mut().zip(words.chunks_exact(4)) {
                    *word = u32::from_ne_bytes([raw[0], raw[1], raw[2], raw[3]]);
                }
                // Built directly rather than through EsnReplay::new: the
                // kernel's state as it is, even a window the bitmap could
                // not hold.
                Replay::Esn(EsnReplay {
                    oseq: u32_at(h, 4),
                    seq: u32_at(h, 8),
                    oseq_hi: u32_at(h, 12),
                    seq_hi: u32_at(h, 16),
                    replay_window: u32_at(h, 20),
                    bmp_len: (words.len() / 4) as u32,
                    bmp,
                })
            }
        }
    }
}

impl fmt::Debug for ReplayView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_replay().fmt(f)
    }
}

/// One `XFRM_MSG_NEWAE` read in place, borrowed from its datagram.
#[derive(Clone, Copy)]
pub struct AeventView<'a> {
    id: &'a [u8; AEVENT_ID_LEN],
    replay: ReplayView<'a>,
    lifetime: &'a [u8; LIFETIME_LEN],
    replay_threshold: Option<u32>,
    etimer_100ms: Option<u32>,
    mark: Mark,
    if_id: u32,
    nlmsg_seq: u32,
    nlmsg_pid: u32,
}

#[inline]
fn legacy(payload: &[u8]) -> Result<Raw<'_>> {
    head::<LEGACY_LEN>(payload, "XFRMA_REPLAY_VAL shorter than xfrm_replay_state").map(Raw::Legacy)
}

#[inline]
fn esn(payload: &[u8]) -> Result<Raw<'_>> {
    let header = head::<ESN_HEADER_LEN>(payload, "XFRMA_REPLAY_ESN_VAL shorter than its header")?;
    let bmp_len = u32_at(header, 0) as usize;
    if bmp_len > MAX_BITMAP_WORDS {
        return Err(Error::Malformed("ESN bmp_len above the kernel's 128-word limit"));
    }
    let words = payload
        .get(ESN_HEADER_LEN..ESN_HEADER_LEN + 4 * bmp_len)
        .ok_or_else(|| Error::Malformed("ESN bmp_len past the end of its attribute"))?;
    Ok(Raw::Esn(header, words))
}

impl<'a> AeventView<'a> {
    /// Reads an `XFRM_MSG_NEWAE` (event or query answer) in place. Fails on
    /// what the owned decoder fails on: a short `xfrm_aevent_id`, an unknown
    /// address family, an attribute running past the message or shorter
    /// than its structure, an ESN `bmp_len` above 128 or past its attribute,
    /// no replay state or no lifetime counters.
    #[inline]
    pub fn parse(msg: &NlMsg<'a>) -> Result<AeventView<'a>> {
        let payload = msg.payload;
        let id: &'a [u8; AEVENT_ID_LEN] = head(payload, "xfrm_aevent_id truncated")?;
        match i32::from(u16::from_ne_bytes([id[20], id[21]])) {
            libc::AF_INET | libc::AF_INET6 => {}
            _ => return Err(Error::Malformed("unknown address family")),
        }
        let mut replay = None;
        let mut lifetime = None;
        let mut replay_threshold = None;
        let mut etimer_100ms = None;
        let mut mark = Mark::NONE;
        let mut if_id = 0;
        for attr in Attrs::new(&payload[AEVENT_ID_LEN..]) {
            let (kind, payload) = attr?;
            match kind {
                XFRMA_REPLAY_VAL => replay = Some(legacy(payload)?),
                XFRMA_REPLAY_ESN_VAL => replay = Some(esn(payload)?),
                XFRMA_LTIME_VAL => {
                    lifetime = Some(head::<LIFETIME_LEN>(payload, "XFRMA_LTIME_VAL shorter than xfrm_lifetime_cur")?)
                }
                XFRMA_REPLAY_THRESH => replay_threshold = Some(first_u32(payload, "field past the end of its buffer")?),
                XFRMA_ETIMER_THRESH => etimer_100ms = Some(first_u32(payload, "field past the end of its buffer")?),
                XFRMA_MARK => {
                    let raw = head::<8>(payload, "field past the end of its buffer")?;
                    mark = Mark { value: u32_at(raw, 0), mask: u32_at(raw, 4) };
                }
                XFRMA_IF_ID => if_id = first_u32(payload, "field past the end of its buffer")?,
                _ => {} // XFRMA_PAD and everything we do not use
            }
        }
        Ok(AeventView {
            id,
            replay: ReplayView(replay.ok_or_else(|| Error::Malformed("aevent without replay state"))?),
            lifetime: lifetime.ok_or_else(|| Error::Malformed("aevent without lifetime counters"))?,
            replay_threshold,
            etimer_100ms,
            mark,
            if_id,
            nlmsg_seq: msg.seq,
            nlmsg_pid: msg.port_id,
        })
    }

    /// `AF_INET` or `AF_INET6` (checked by `parse`).
    #[inline]
    pub fn family(&self) -> u16 {
        u16::from_ne_bytes([self.id[20], self.id[21]])
    }

    #[inline]
    fn addr(&self, at: usize) -> IpAddr {
        let raw: [u8; 16] = self.id[at..at + 16].try_into().expect("16 bytes");
        if i32::from(self.family()) == libc::AF_INET {
            IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))
        } else {
            IpAddr::V6(Ipv6Addr::from(raw))
        }
    }

    #[inline]
    pub fn daddr(&self) -> IpAddr {
        self.addr(0)
    }

    /// In host byte order.
    #[inline]
    pub fn spi(&self) -> u32 {
        u32::from_be_bytes([self.id[16], self.id[17], self.id[18], self.id[19]])
    }

    #[inline]
    pub fn proto(&self) -> u8 {
        self.id[22]
    }

    /// [`AeventView::sa`] as the router keys it, read from the bytes.
    #[inline]
    pub(crate) fn route_key(&self) -> crate::sa::RouteKey {
        let daddr: &[u8; 16] = self.id[..16].try_into().expect("16 bytes");
        let v6 = i32::from(self.family()) == libc::AF_INET6;
        let spi = [self.id[16], self.id[17], self.id[18], self.id[19]];
        crate::sa::route_key(daddr, v6, spi, self.proto(), self.mark, self.if_id)
    }

    /// The SA's identity, as events are routed by it.
    #[inline]
    pub fn sa(&self) -> SaId {
        SaId { daddr: self.daddr(), spi: self.spi(), proto: self.proto(), mark: self.mark, if_id: self.if_id }
    }

    #[inline]
    pub fn saddr(&self) -> IpAddr {
        self.addr(24)
    }

    /// The raw `XFRM_AE_*` flags.
    #[inline]
    pub fn flags(&self) -> u32 {
        u32_at(self.id, 40)
    }

    #[inline]
    pub fn reqid(&self) -> u32 {
        u32_at(self.id, 44)
    }

    #[inline]
    pub fn cause(&self) -> Option<Cause> {
        Cause::from_flags(self.flags())
    }

    #[inline]
    pub fn replay(&self) -> ReplayView<'a> {
        self.replay
    }

    #[inline]
    pub fn lifetime(&self) -> Lifetime {
        Lifetime {
            bytes: u64_at(self.lifetime, 0),
            packets: u64_at(self.lifetime, 8),
            add_time: u64_at(self.lifetime, 16),
            use_time: u64_at(self.lifetime, 24),
        }
    }

    /// Packets; present in the answer to a query that asked for it.
    #[inline]
    pub fn replay_threshold(&self) -> Option<u32> {
        self.replay_threshold
    }

    /// Milliseconds (the kernel reports 100 ms steps).
    #[inline]
    pub fn timer_threshold_ms(&self) -> Option<u32> {
        self.etimer_100ms.map(|units| units.saturating_mul(100))
    }

    #[inline]
    pub fn nlmsg_seq(&self) -> u32 {
        self.nlmsg_seq
    }

    #[inline]
    pub fn nlmsg_pid(&self) -> u32 {
        self.nlmsg_pid
    }

    /// The owned event, for keeping.
    #[inline]
    pub fn to_aevent(&self) -> Aevent {
        Aevent {
            sa: self.sa(),
            saddr: self.saddr(),
            reqid: self.reqid(),
            flags: self.flags(),
            replay: self.replay.to_replay(),
            lifetime: self.lifetime(),
            replay_threshold: self.replay_threshold,
            timer_threshold_ms: self.timer_threshold_ms(),
            nlmsg_seq: self.nlmsg_seq,
            nlmsg_pid: self.nlmsg_pid,
        }
    }
}

impl fmt::Debug for AeventView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_aevent().fmt(f)
    }
}

/// The same line as the owned event's.
impl fmt::Display for AeventView<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.to_aevent().fmt(f)
    }
}
