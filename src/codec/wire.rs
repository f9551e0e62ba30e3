//! The wire codec: netlink and XFRM message layouts, on byte slices only.
//!
//! Decoding walks a borrowed buffer and checks every length before using it
//! (libmnl's discipline): a short header, an attribute running past its
//! message, or an ESN bitmap longer than its attribute is an error, never a
//! panic or an out-of-bounds read. Unknown attributes are skipped.

// `ok_or(Error::Malformed(..))` builds and drops an `Error` (which has drop
// glue) on every success; measured at half the decoder's instructions, so
// the lazy form stays wherever clippy would have the eager one.
#![allow(clippy::unnecessary_lazy_evaluations)]

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use crate::aevent::{flags, Aevent, EsnReplay, LegacyReplay, Lifetime, Replay, MAX_BITMAP_WORDS};
use crate::error::{Error, Result};
use crate::sa::{family_of, Mark, SaId};

// Netlink framing (linux/netlink.h).
pub const NLMSG_HDRLEN: usize = 16;
pub const NLMSG_NOOP: u16 = 1;
pub const NLMSG_ERROR: u16 = 2;
pub const NLMSG_DONE: u16 = 3;
pub const NLMSG_OVERRUN: u16 = 4;
pub const NLM_F_REQUEST: u16 = 0x1;
pub const NLM_F_MULTI: u16 = 0x2;
pub const NLM_F_ACK: u16 = 0x4;
/// On a dump's answers: the list changed while the dump ran.
pub const NLM_F_DUMP_INTR: u16 = 0x10;
pub const NLM_F_REPLACE: u16 = 0x100;
pub const NLM_F_DUMP: u16 = 0x300;
/// In an `NLMSG_ERROR`: the echoed request was cut to its header.
const NLM_F_CAPPED: u16 = 0x100;
/// In an `NLMSG_ERROR`: extended-ack attributes follow.
const NLM_F_ACK_TLVS: u16 = 0x200;
const NLMSGERR_ATTR_MSG: u16 = 1;
const NLA_HDRLEN: usize = 4;
const NLA_TYPE_MASK: u16 = 0x3fff;

// XFRM (linux/xfrm.h).
pub const XFRM_MSG_NEWSA: u16 = 0x10;
pub const XFRM_MSG_DELSA: u16 = 0x11;
pub const XFRM_MSG_GETSA: u16 = 0x12;
pub const XFRM_MSG_EXPIRE: u16 = 0x18;
pub const XFRM_MSG_UPDSA: u16 = 0x1a;
pub const XFRM_MSG_NEWAE: u16 = 0x1e;
pub const XFRM_MSG_GETAE: u16 = 0x1f;
pub const XFRMNLGRP_EXPIRE: u32 = 2;
pub const XFRMNLGRP_SA: u32 = 3;
pub const XFRMNLGRP_AEVENTS: u32 = 5;
/// `xfrm_usersa_info.flags`: the SA uses extended sequence numbers.
pub const XFRM_STATE_ESN: u8 = 0x80;
/// `XFRMA_SA_DIR` values (Linux 6.10+).
pub const XFRM_SA_DIR_IN: u8 = 1;
pub const XFRM_SA_DIR_OUT: u8 = 2;

// Route netlink, for the namespace's own addresses (linux/rtnetlink.h).
pub const RTM_NEWADDR: u16 = 20;
pub const RTM_GETADDR: u16 = 22;
const IFADDRMSG_LEN: usize = 8;
const IFA_ADDRESS: u16 = 1;
const IFA_LOCAL: u16 = 2;

const XFRMA_ALG_CRYPT: u16 = 2;
const XFRMA_SA: u16 = 6;
pub(crate) const XFRMA_LTIME_VAL: u16 = 9;
pub(crate) const XFRMA_REPLAY_VAL: u16 = 10;
pub(crate) const XFRMA_REPLAY_THRESH: u16 = 11;
pub(crate) const XFRMA_ETIMER_THRESH: u16 = 12;
pub(crate) const XFRMA_MARK: u16 = 21;
pub(crate) const XFRMA_REPLAY_ESN_VAL: u16 = 23;
pub(crate) const XFRMA_IF_ID: u16 = 31;
const XFRMA_SA_DIR: u16 = 33;

/// `struct xfrm_usersa_id`: daddr(16) spi(4, big endian) family(2) proto(1), padded.
const USERSA_ID_LEN: usize = 24;
/// `struct xfrm_aevent_id`: sa_id(24) saddr(16) flags(4) reqid(4).
pub const AEVENT_ID_LEN: usize = 48;
/// `struct xfrm_usersa_info`, and the offsets we read in it.
const USERSA_INFO_LEN: usize = 224;
const SA_INFO_ID: usize = 56;
const SA_INFO_SADDR: usize = 80;
const SA_INFO_LFT: usize = 96;
const SA_INFO_CURLFT: usize = 160;
const SA_INFO_REQID: usize = 208;
const SA_INFO_FAMILY: usize = 212;
const SA_INFO_MODE: usize = 214;
const SA_INFO_REPLAY_WINDOW: usize = 215;
const SA_INFO_FLAGS: usize = 216;
pub(crate) const LIFETIME_LEN: usize = 32;
/// `struct xfrm_algo`: alg_name[64], alg_key_len (bits), then the key.
const ALGO_NAME_LEN: usize = 64;
/// Longest cipher key we encode; the kernel's longest (AES-256 with nonce)
/// is 36 bytes.
const MAX_KEY_LEN: usize = 64;
/// `XFRM_INF`: no limit, in `struct xfrm_lifetime_cfg`.
const XFRM_INF: u64 = u64::MAX;
pub(crate) const LEGACY_REPLAY_LEN: usize = 12;
pub(crate) const ESN_HEADER_LEN: usize = 24;

const fn align4(len: usize) -> usize {
    (len + 3) & !3
}

#[inline]
fn bytes<const N: usize>(buf: &[u8], at: usize) -> Result<[u8; N]> {
    buf.get(at..at + N)
        .and_then(|b| b.try_into().ok())
        .ok_or_else(|| Error::Malformed("field past the end of its buffer"))
}

#[inline]
fn u16_at(buf: &[u8], at: usize) -> Result<u16> {
    bytes::<2>(buf, at).map(u16::from_ne_bytes)
}

#[inline]
fn u32_at(buf: &[u8], at: usize) -> Result<u32> {
    bytes::<4>(buf, at).map(u32::from_ne_bytes)
}

#[inline]
fn u64_at(buf: &[u8], at: usize) -> Result<u64> {
    bytes::<8>(buf, at).map(u64::from_ne_bytes)
}

fn addr_at(buf: &[u8], at: usize, family: u16) -> Result<IpAddr> {
    let raw = bytes::<16>(buf, at)?;
    match i32::from(family) {
        libc::AF_INET => Ok(IpAddr::V4(Ipv4Addr::new(raw[0], raw[1], raw[2], raw[3]))),
        libc::AF_INET6 => Ok(IpAddr::V6(Ipv6Addr::from(raw))),
        _ => Err(Error::Malformed("unknown address family")),
    }
}

/// `xfrm_address_t`: IPv4 in the first 4 bytes.
fn addr16(addr: &IpAddr) -> [u8; 16] {
    let mut raw = [0u8; 16];
    match addr {
        IpAddr::V4(a) => raw[..4].copy_from_slice(&a.octets()),
        IpAddr::V6(a) => raw.copy_from_slice(&a.octets()),
    }
    raw
}

fn put_addr(out: &mut Vec<u8>, addr: &IpAddr) {
    out.extend_from_slice(&addr16(addr));
}

/// One netlink message, borrowed from a datagram.
#[derive(Debug, Clone, Copy)]
pub struct NlMsg<'a> {
    pub kind: u16,
    pub flags: u16,
    pub seq: u32,
    pub port_id: u32,
    pub payload: &'a [u8],
}

/// The messages of one datagram, in order. After the first malformed one
/// the iterator yields its error and stops.
pub struct Messages<'a> {
    rest: &'a [u8],
}

impl<'a> Messages<'a> {
    #[inline]
    pub fn new(datagram: &'a [u8]) -> Messages<'a> {
        Messages { rest: datagram }
    }
}

impl<'a> Iterator for Messages<'a> {
    type Item = Result<NlMsg<'a>>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = parse_message(self.rest);
        match parsed {
            Ok((msg, consumed)) => {
                self.rest = self.rest.get(consumed..).unwrap_or(&[]);
                Some(Ok(msg))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

#[inline]
pub(crate) fn parse_message(buf: &[u8]) -> Result<(NlMsg<'_>, usize)> {
    if buf.len() < NLMSG_HDRLEN {
        return Err(Error::Malformed("netlink header truncated"));
    }
    let len = u32_at(buf, 0)? as usize;
    if len < NLMSG_HDRLEN {
        return Err(Error::Malformed("netlink length shorter than its header"));
    }
    if len > buf.len() {
        return Err(Error::Malformed("netlink length past the end of the datagram"));
    }
    let msg = NlMsg {
        kind: u16_at(buf, 4)?,
        flags: u16_at(buf, 6)?,
        seq: u32_at(buf, 8)?,
        port_id: u32_at(buf, 12)?,
        payload: &buf[NLMSG_HDRLEN..len],
    };
    Ok((msg, align4(len).min(buf.len())))
}

/// The attributes in a buffer, as (type without flag bits, payload).
pub struct Attrs<'a> {
    rest: &'a [u8],
}

impl<'a> Attrs<'a> {
    #[inline]
    pub fn new(buf: &'a [u8]) -> Attrs<'a> {
        Attrs { rest: buf }
    }
}

impl<'a> Iterator for Attrs<'a> {
    type Item = Result<(u16, &'a [u8])>;

    #[inline]
    fn next(&mut self) -> Option<Self::Item> {
        if self.rest.is_empty() {
            return None;
        }
        let parsed = (|| {
            let len = usize::from(u16_at(self.rest, 0)?);
            if len < NLA_HDRLEN {
                return Err(Error::Malformed("attribute length shorter than its header"));
            }
            if len > self.rest.len() {
                return Err(Error::Malformed("attribute length past the end of its message"));
            }
            let kind = u16_at(self.rest, 2)? & NLA_TYPE_MASK;
            Ok((kind, &self.rest[NLA_HDRLEN..len], align4(len)))
        })();
        match parsed {
            Ok((kind, payload, consumed)) => {
                self.rest = self.rest.get(consumed..).unwrap_or(&[]);
                Some(Ok((kind, payload)))
            }
            Err(e) => {
                self.rest = &[];
                Some(Err(e))
            }
        }
    }
}

fn attr_u32(payload: &[u8]) -> Result<u32> {
    u32_at(payload, 0)
}

fn decode_lifetime(payload: &[u8]) -> Result<Lifetime> {
    if payload.len() < LIFETIME_LEN {
        return Err(Error::Malformed("XFRMA_LTIME_VAL shorter than xfrm_lifetime_cur"));
    }
    Ok(Lifetime {
        bytes: u64_at(payload, 0)?,
        packets: u64_at(payload, 8)?,
        add_time: u64_at(payload, 16)?,
        use_time: u64_at(payload, 24)?,
    })
}

fn decode_legacy_replay(payload: &[u8]) -> Result<Replay> {
    if payload.len() < LEGACY_REPLAY_LEN {
        return Err(Error::Malformed("XFRMA_REPLAY_VAL shorter than xfrm_replay_state"));
    }
    Ok(Replay::Legacy(LegacyReplay {
        oseq: u32_at(payload, 0)?,
        seq: u32_at(payload, 4)?,
        bitmap: u32_at(payload, 8)?,
    }))
}

fn decode_esn_replay(payload: &[u8]) -> Result<Replay> {
    if payload.len() < ESN_HEADER_LEN {
        return Err(Error::Malformed("XFRMA_REPLAY_ESN_VAL shorter than its header"));
    }
    let bmp_len = u32_at(payload, 0)? as usize;
    if bmp_len > MAX_BITMAP_WORDS {
        return Err(Error::Malformed("ESN bmp_len above the kernel's 128-word limit"));
    }
    if payload.len() < ESN_HEADER_LEN + 4 * bmp_len {
        return Err(Error::Malformed("ESN bmp_len past the end of its attribute"));
    }
    let mut bmp = [0u32; MAX_BITMAP_WORDS];
    for (i, word) in bmp.iter_mut().take(bmp_len).enumerate() {
        *word = u32_at(payload, ESN_HEADER_LEN + 4 * i)?;
    }
    // Built directly rather than through EsnReplay::new: a query reports the
    // kernel's state as it is, even a window the bitmap could not hold.
    Ok(Replay::Esn(EsnReplay {
        oseq: u32_at(payload, 4)?,
        seq: u32_at(payload, 8)?,
        oseq_hi: u32_at(payload, 12)?,
        seq_hi: u32_at(payload, 16)?,
        replay_window: u32_at(payload, 20)?,
        bmp_len: bmp_len as u32,
        bmp,
    }))
}

/// Attributes shared by the SA-carrying messages.
#[derive(Default)]
struct SaAttrs {
    replay: Option<Replay>,
    lifetime: Option<Lifetime>,
    replay_threshold: Option<u32>,
    etimer_100ms: Option<u32>,
    mark: Mark,
    if_id: u32,
    direction: Option<u8>,
}

fn decode_sa_attrs(buf: &[u8]) -> Result<SaAttrs> {
    let mut out = SaAttrs::default();
    for attr in Attrs::new(buf) {
        let (kind, payload) = attr?;
        match kind {
            XFRMA_REPLAY_VAL => out.replay = Some(decode_legacy_replay(payload)?),
            XFRMA_REPLAY_ESN_VAL => out.replay = Some(decode_esn_replay(payload)?),
            XFRMA_LTIME_VAL => out.lifetime = Some(decode_lifetime(payload)?),
            XFRMA_REPLAY_THRESH => out.replay_threshold = Some(attr_u32(payload)?),
            XFRMA_ETIMER_THRESH => out.etimer_100ms = Some(attr_u32(payload)?),
            XFRMA_MARK => out.mark = Mark { value: u32_at(payload, 0)?, mask: u32_at(payload, 4)? },
            XFRMA_IF_ID => out.if_id = attr_u32(payload)?,
            XFRMA_SA_DIR => out.direction = payload.first().copied(),
            _ => {} // XFRMA_PAD and everything we do not use
        }
    }
    Ok(out)
}

fn decode_usersa_id(buf: &[u8]) -> Result<SaId> {
    let family = u16_at(buf, 20)?;
    Ok(SaId {
        daddr: addr_at(buf, 0, family)?,
        spi: u32::from_be_bytes(bytes::<4>(buf, 16)?),
        proto: *buf.get(22).ok_or_else(|| Error::Malformed("xfrm_usersa_id truncated"))?,
        mark: Mark::NONE,
        if_id: 0,
    })
}

/// Decodes an `XFRM_MSG_NEWAE` (event or query answer) into an owned
/// value: [`crate::view::AeventView`] read in place, then copied.
pub fn decode_aevent(msg: &NlMsg<'_>) -> Result<Aevent> {
    crate::view::AeventView::parse(msg).map(|view| view.to_aevent())
}

/// The SA carried by `NEWSA`/`UPDSA`/`EXPIRE`/`GETSA` answers and `DELSA`
/// events: what a standby needs to know an SA came or went.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaInfo {
    pub sa: SaId,
    pub saddr: Option<IpAddr>,
    pub reqid: u32,
    pub mode: u8,
    pub replay_window: u8,
    pub flags: u8,
    pub lifetime: Option<Lifetime>,
    pub replay: Option<Replay>,
    /// `EXPIRE` only: a hard expiry (the SA is gone) rather than a soft one.
    pub hard_expire: Option<bool>,
    /// `XFRMA_SA_DIR` (Linux 6.10+): `XFRM_SA_DIR_IN` or `XFRM_SA_DIR_OUT`.
    pub direction: Option<u8>,
}

impl SaInfo {
    /// Whether the SA was installed with extended sequence numbers. Without
    /// the flag its sequence numbers wrap at 2^32, even where a window above
    /// 32 makes the kernel report them in the ESN-format structure.
    pub fn esn(&self) -> bool {
        self.flags & XFRM_STATE_ESN != 0
    }
}

fn decode_usersa_info(buf: &[u8], attrs: &[u8]) -> Result<SaInfo> {
    if buf.len() < USERSA_INFO_LEN {
        return Err(Error::Malformed("xfrm_usersa_info truncated"));
    }
    let family = u16_at(buf, SA_INFO_FAMILY)?;
    let id = &buf[SA_INFO_ID..];
    let extra = decode_sa_attrs(attrs)?;
    let sa = SaId {
        daddr: addr_at(id, 0, family)?,
        spi: u32::from_be_bytes(bytes::<4>(id, 16)?),
        proto: id[20],
        mark: extra.mark,
        if_id: extra.if_id,
    };
    Ok(SaInfo {
        sa,
        saddr: Some(addr_at(buf, SA_INFO_SADDR, family)?),
        reqid: u32_at(buf, SA_INFO_REQID)?,
        mode: buf[SA_INFO_MODE],
        replay_window: buf[SA_INFO_REPLAY_WINDOW],
        flags: buf[SA_INFO_FLAGS],
        lifetime: Some(decode_lifetime(&buf[SA_INFO_CURLFT..])?),
        replay: extra.replay,
        hard_expire: None,
        direction: extra.direction,
    })
}

/// Decodes an SA announcement (`NEWSA`, `UPDSA`, `EXPIRE`, `DELSA`).
pub fn decode_sa_message(msg: &NlMsg<'_>) -> Result<SaInfo> {
    match msg.kind {
        XFRM_MSG_NEWSA | XFRM_MSG_UPDSA => {
            decode_usersa_info(msg.payload, msg.payload.get(USERSA_INFO_LEN..).unwrap_or(&[]))
        }
        XFRM_MSG_EXPIRE => {
            // struct xfrm_user_expire { xfrm_usersa_info state; __u8 hard; } padded to 232.
            let hard =
                *msg.payload.get(USERSA_INFO_LEN).ok_or_else(|| Error::Malformed("xfrm_user_expire truncated"))?;
            let attrs = msg.payload.get(USERSA_INFO_LEN + 8..).unwrap_or(&[]);
            let mut info = decode_usersa_info(msg.payload, attrs)?;
            info.hard_expire = Some(hard != 0);
            Ok(info)
        }
        XFRM_MSG_DELSA => {
            if msg.payload.len() < USERSA_ID_LEN {
                return Err(Error::Malformed("xfrm_usersa_id truncated"));
            }
            let attrs = &msg.payload[USERSA_ID_LEN..];
            // A DELSA event carries the whole SA in XFRMA_SA; use it when present.
            for attr in Attrs::new(attrs) {
                let (kind, payload) = attr?;
                if kind == XFRMA_SA {
                    return decode_usersa_info(payload, attrs);
                }
            }
            let mut sa = decode_usersa_id(msg.payload)?;
            let extra = decode_sa_attrs(attrs)?;
            sa.mark = extra.mark;
            sa.if_id = extra.if_id;
            Ok(SaInfo {
                sa,
                saddr: None,
                reqid: 0,
                mode: 0,
                replay_window: 0,
                flags: 0,
                lifetime: extra.lifetime,
                replay: extra.replay,
                hard_expire: None,
                direction: extra.direction,
            })
        }
        _ => Err(Error::Malformed("not an SA message")),
    }
}

/// The SA of an `XFRM_MSG_NEWSA`/`UPDSA` a caller is building in `buf`,
/// whose `nlmsg_len` must be filled in.
pub fn decode_sa_request(buf: &[u8]) -> Result<SaInfo> {
    let (msg, _) = parse_message(buf)?;
    if !matches!(msg.kind, XFRM_MSG_NEWSA | XFRM_MSG_UPDSA) {
        return Err(Error::invalid(format!("message type {} is neither XFRM_MSG_NEWSA nor XFRM_MSG_UPDSA", msg.kind)));
    }
    decode_sa_message(&msg)
}

/// Appends both thresholds to the `NEWSA`/`UPDSA` in `buf` (the timer in
/// jiffies, the unit the kernel takes them in) and updates its length;
/// returns the new length. Refuses a message that carries either already.
pub fn append_thresholds(buf: &mut [u8], replay_packets: u32, etimer_jiffies: u32) -> Result<usize> {
    let (msg, _) = parse_message(buf)?;
    if !matches!(msg.kind, XFRM_MSG_NEWSA | XFRM_MSG_UPDSA) {
        return Err(Error::invalid(format!("message type {} is neither XFRM_MSG_NEWSA nor XFRM_MSG_UPDSA", msg.kind)));
    }
    // Attributes appended to a message shorter than its xfrm_usersa_info
    // would land inside the structure (found by fuzzing).
    let Some(attrs) = msg.payload.get(USERSA_INFO_LEN..) else {
        return Err(Error::invalid("the message is shorter than its xfrm_usersa_info"));
    };
    for attr in Attrs::new(attrs) {
        let (kind, _) = attr?;
        if matches!(kind, XFRMA_REPLAY_THRESH | XFRMA_ETIMER_THRESH) {
            return Err(Error::invalid("the message already carries a threshold"));
        }
    }
    let start = align4(u32_at(buf, 0)? as usize);
    let mut tail = Vec::with_capacity(16);
    put_attr(&mut tail, XFRMA_REPLAY_THRESH, &replay_packets.to_ne_bytes());
    put_attr(&mut tail, XFRMA_ETIMER_THRESH, &etimer_jiffies.to_ne_bytes());
    let end = start + tail.len();
    let room = buf.len();
    let Some(dst) = buf.get_mut(start..end) else {
        return Err(Error::NoRoom { need: end, have: room });
    };
    dst.copy_from_slice(&tail);
    // The padding up to the aligned start is part of the message now.
    let len = u32_at(buf, 0)? as usize;
    buf[len..start].fill(0);
    buf[..4].copy_from_slice(&(end as u32).to_ne_bytes());
    Ok(end)
}

/// What an `NLMSG_ERROR` says: `errno` 0 is an acknowledgement.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Ack<'a> {
    /// Positive errno, 0 for success.
    pub errno: i32,
    /// The kernel's extended-ack text, when it sent one.
    pub ext_ack: Option<&'a str>,
    /// Header of the request this answers, as echoed; 0 where the echo was
    /// cut short (the errno is still reported then).
    pub request_kind: u16,
    pub request_seq: u32,
}

pub fn decode_ack<'a>(msg: &NlMsg<'a>) -> Result<Ack<'a>> {
    let p = msg.payload;
    // The errno is what matters: it is reported even when the echoed
    // request behind it is cut short (the outer header's seq already says
    // which request this answers).
    let error = i32::from_ne_bytes(bytes::<4>(p, 0).map_err(|_| Error::Malformed("nlmsgerr without its errno"))?);
    let echoed_whole = p.len() >= 4 + NLMSG_HDRLEN;
    let request_len = if echoed_whole { u32_at(p, 4)? as usize } else { 0 };
    let request_kind = if echoed_whole { u16_at(p, 8)? } else { 0 };
    let request_seq = if echoed_whole { u32_at(p, 12)? } else { 0 };
    let mut ext_ack = None;
    if echoed_whole && msg.flags & NLM_F_ACK_TLVS != 0 {
        // Success acks and capped errors echo only the request header.
        let echoed =
            if error == 0 || msg.flags & NLM_F_CAPPED != 0 { NLMSG_HDRLEN } else { request_len.max(NLMSG_HDRLEN) };
        let tlvs = p.get(4 + align4(echoed)..).unwrap_or(&[]);
        for attr in Attrs::new(tlvs) {
            // Broken extended-ack attributes lose their text, not the errno.
            let Ok((kind, payload)) = attr else { break };
            if kind == NLMSGERR_ATTR_MSG {
                let text = payload.split(|b| *b == 0).next().unwrap_or(&[]);
                ext_ack = std::str::from_utf8(text).ok().filter(|t| !t.is_empty());
            }
        }
    }
    Ok(Ack { errno: error.checked_neg().unwrap_or(libc::EINVAL).max(0), ext_ack, request_kind, request_seq })
}

/// Who sends a request: its sequence number and the sending socket's port id.
/// The kernel copies both into the update event a `NEWAE` causes, which is
/// how a handle recognises its own updates among everybody's.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sender {
    pub seq: u32,
    pub port_id: u32,
}

/// Starts a message at the end of `out`; returns where it starts, for
/// [`finish`]. Several messages may go into one datagram this way.
fn begin(out: &mut Vec<u8>, kind: u16, flags: u16, from: Sender) -> usize {
    let start = out.len();
    out.extend_from_slice(&0u32.to_ne_bytes()); // length, set by finish()
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(&(flags | NLM_F_REQUEST).to_ne_bytes());
    out.extend_from_slice(&from.seq.to_ne_bytes());
    // The kernel does not fill this in: it multicasts it as it is.
    out.extend_from_slice(&from.port_id.to_ne_bytes());
    start
}

fn put_aevent_id(out: &mut Vec<u8>, sa: &SaId, ae_flags: u32) {
    put_addr(out, &sa.daddr);
    out.extend_from_slice(&sa.spi.to_be_bytes());
    out.extend_from_slice(&family_of(&sa.daddr).to_ne_bytes());
    out.push(sa.proto);
    out.push(0);
    out.extend_from_slice(&[0u8; 16]); // saddr: not part of the lookup
    out.extend_from_slice(&ae_flags.to_ne_bytes());
    out.extend_from_slice(&0u32.to_ne_bytes()); // reqid: not part of the lookup
}

fn put_attr(out: &mut Vec<u8>, kind: u16, payload: &[u8]) {
    let len = NLA_HDRLEN + payload.len();
    out.extend_from_slice(&(len as u16).to_ne_bytes());
    out.extend_from_slice(&kind.to_ne_bytes());
    out.extend_from_slice(payload);
    out.resize(align4(out.len()), 0);
}

fn put_identity_attrs(out: &mut Vec<u8>, sa: &SaId) {
    if sa.mark.is_set() {
        let mut mark = [0u8; 8];
        mark[..4].copy_from_slice(&sa.mark.value.to_ne_bytes());
        mark[4..].copy_from_slice(&sa.mark.mask.to_ne_bytes());
        put_attr(out, XFRMA_MARK, &mark);
    }
    if sa.if_id != 0 {
        put_attr(out, XFRMA_IF_ID, &sa.if_id.to_ne_bytes());
    }
}

fn finish(out: &mut [u8], start: usize) {
    let len = (out.len() - start) as u32;
    out[start..start + 4].copy_from_slice(&len.to_ne_bytes());
}

/// What one `XFRM_MSG_GETAE` asks the kernel to add to the SA's counters.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GetaeAsk {
    /// The counters alone.
    Counters,
    /// Both thresholds in one answer: only where [`threshold_reads`] says so.
    BothThresholds,
    ReplayThreshold,
    TimerThreshold,
}

impl GetaeAsk {
    pub fn ae_flags(self) -> u32 {
        match self {
            GetaeAsk::Counters => 0,
            GetaeAsk::BothThresholds => flags::RTHR | flags::ETHR,
            GetaeAsk::ReplayThreshold => flags::RTHR,
            GetaeAsk::TimerThreshold => flags::ETHR,
        }
    }
}

/// The GETAEs that read `sa`'s counters with both thresholds, in the order
/// to send them: the kernel must never be asked for an answer larger than
/// the buffer it allocates for it.
///
/// That buffer (`xfrm_aevent_msgsize`) counts the mark and both thresholds
/// but, before upstream 7081d46d3231, not `XFRMA_IF_ID`; the answer is
/// built under `BUG_ON(err < 0)`. An SA with a mark *and* an `if_id` asked
/// for both thresholds overflows it where the allocation has no slack
/// (Debian 11's 5.10.0-32 panics on ESN window 256). Without a mark, the
/// 12 bytes counted for it hold the `if_id`'s 8; asking for one threshold
/// at a time leaves 8 counted bytes free. The `if_id` cannot be known from
/// an `SaId` (the kernel's lookup ignores it) and a kernel's version cannot
/// prove the fix (stable and vendor backports), so every marked SA is read
/// in two requests, on every kernel; an unmarked one keeps its single one.
/// An SA installed with a mark of value 0 is found by an unmarked query as
/// well: name it with its mark (mask included) to be read safely.
pub fn threshold_reads(sa: &SaId) -> &'static [GetaeAsk] {
    if sa.mark.is_set() {
        &[GetaeAsk::ReplayThreshold, GetaeAsk::TimerThreshold]
    } else {
        &[GetaeAsk::BothThresholds]
    }
}

/// `XFRM_MSG_GETAE` for one SA, asking for what `ask` names. Reading both
/// thresholds of a marked SA in one request can crash older kernels: see
/// [`threshold_reads`].
pub fn encode_getae(out: &mut Vec<u8>, from: Sender, sa: &SaId, ask: GetaeAsk) {
    out.clear();
    let start = begin(out, XFRM_MSG_GETAE, 0, from);
    put_aevent_id(out, sa, ask.ae_flags());
    put_identity_attrs(out, sa);
    finish(out, start);
}

/// The attributes of one user → kernel `XFRM_MSG_NEWAE`. The timer is in the
/// kernel's *set* unit (jiffies), already converted by the caller.
#[derive(Debug, Clone, Copy, Default)]
pub struct NewAe<'a> {
    pub replay_threshold: Option<u32>,
    pub etimer_jiffies: Option<u32>,
    pub replay: Option<&'a Replay>,
    pub lifetime: Option<&'a Lifetime>,
}

/// `XFRM_MSG_NEWAE` with `NLM_F_REPLACE` (the kernel refuses it without) and
/// `NLM_F_ACK`, so success is confirmed too.
pub fn encode_newae(out: &mut Vec<u8>, from: Sender, sa: &SaId, set: &NewAe<'_>) {
    out.clear();
    append_newae(out, from, sa, set);
}

/// Like [`encode_newae`], appended to what `out` holds: the kernel handles
/// the messages of one datagram in order and acknowledges each.
pub fn append_newae(out: &mut Vec<u8>, from: Sender, sa: &SaId, set: &NewAe<'_>) {
    append_newae_with(out, from, sa, set, true);
}

/// Like [`append_newae`], without `NLM_F_ACK`: the kernel answers only if
/// it fails (netlink acknowledges every error). In a datagram whose last
/// message asks for an acknowledgement, that acknowledgement arriving
/// means every message before it without an error of its own succeeded:
/// the kernel handles them in order and answers in order.
pub fn append_newae_unacked(out: &mut Vec<u8>, from: Sender, sa: &SaId, set: &NewAe<'_>) {
    append_newae_with(out, from, sa, set, false);
}

fn append_newae_with(out: &mut Vec<u8>, from: Sender, sa: &SaId, set: &NewAe<'_>, ack: bool) {
    let flags = if ack { NLM_F_REPLACE | NLM_F_ACK } else { NLM_F_REPLACE };
    let start = begin(out, XFRM_MSG_NEWAE, flags, from);
    let mut ae_flags = 0;
    if set.replay_threshold.is_some() {
        ae_flags |= flags::RTHR;
    }
    if set.etimer_jiffies.is_some() {
        ae_flags |= flags::ETHR;
    }
    if set.replay.is_some() {
        ae_flags |= flags::RVAL;
    }
    if set.lifetime.is_some() {
        ae_flags |= flags::LVAL;
    }
    put_aevent_id(out, sa, ae_flags);
    if let Some(t) = set.replay_threshold {
        put_attr(out, XFRMA_REPLAY_THRESH, &t.to_ne_bytes());
    }
    if let Some(t) = set.etimer_jiffies {
        put_attr(out, XFRMA_ETIMER_THRESH, &t.to_ne_bytes());
    }
    match set.replay {
        Some(Replay::Legacy(r)) => {
            let mut raw = [0u8; LEGACY_REPLAY_LEN];
            raw[0..4].copy_from_slice(&r.oseq.to_ne_bytes());
            raw[4..8].copy_from_slice(&r.seq.to_ne_bytes());
            raw[8..12].copy_from_slice(&r.bitmap.to_ne_bytes());
            put_attr(out, XFRMA_REPLAY_VAL, &raw);
        }
        Some(Replay::Esn(r)) => {
            let bitmap = r.bitmap();
            let mut raw = [0u8; ESN_HEADER_LEN + 4 * MAX_BITMAP_WORDS];
            let fields = [bitmap.len() as u32, r.oseq, r.seq, r.oseq_hi, r.seq_hi, r.replay_window];
            for (i, v) in fields.iter().chain(bitmap).enumerate() {
                raw[4 * i..4 * i + 4].copy_from_slice(&v.to_ne_bytes());
            }
            put_attr(out, XFRMA_REPLAY_ESN_VAL, &raw[..ESN_HEADER_LEN + 4 * bitmap.len()]);
        }
        None => {}
    }
    if let Some(l) = set.lifetime {
        let mut raw = [0u8; LIFETIME_LEN];
        for (i, v) in [l.bytes, l.packets, l.add_time, l.use_time].iter().enumerate() {
            raw[8 * i..8 * i + 8].copy_from_slice(&v.to_ne_bytes());
        }
        put_attr(out, XFRMA_LTIME_VAL, &raw);
    }
    put_identity_attrs(out, sa);
    finish(out, start);
}

/// `XFRM_MSG_DELSA` for one SA (`struct xfrm_usersa_id`), acknowledged. An
/// HA node that learns it was replaced deletes its outbound SAs with it, so
/// that two nodes never send under one key.
pub fn encode_delsa(out: &mut Vec<u8>, from: Sender, sa: &SaId) {
    out.clear();
    let start = begin(out, XFRM_MSG_DELSA, NLM_F_ACK, from);
    put_addr(out, &sa.daddr);
    out.extend_from_slice(&sa.spi.to_be_bytes());
    out.extend_from_slice(&family_of(&sa.daddr).to_ne_bytes());
    out.push(sa.proto);
    out.push(0);
    put_identity_attrs(out, sa);
    finish(out, start);
}

/// `XFRM_MSG_GETSA` as a dump of every SA: answered with `NEWSA` messages
/// (`NLM_F_MULTI`) and an `NLMSG_DONE`. The kernel parses a dump request
/// before the message's fixed part, so none is sent.
pub fn encode_getsa_dump(out: &mut Vec<u8>, from: Sender) {
    out.clear();
    let start = begin(out, XFRM_MSG_GETSA, NLM_F_DUMP, from);
    finish(out, start);
}

/// `RTM_GETADDR` as a dump of every address of the namespace (on a
/// `NETLINK_ROUTE` socket): `struct ifaddrmsg` with family `AF_UNSPEC`.
pub fn encode_getaddr_dump(out: &mut Vec<u8>, from: Sender) {
    out.clear();
    let start = begin(out, RTM_GETADDR, NLM_F_DUMP, from);
    out.extend_from_slice(&[0u8; IFADDRMSG_LEN]);
    finish(out, start);
}

/// The address of an `RTM_NEWADDR`: `IFA_LOCAL` where the interface has one
/// (point-to-point), else `IFA_ADDRESS`.
pub fn decode_newaddr(msg: &NlMsg<'_>) -> Result<Option<IpAddr>> {
    let family = u16::from(*msg.payload.first().ok_or_else(|| Error::Malformed("ifaddrmsg truncated"))?);
    let attrs = msg.payload.get(IFADDRMSG_LEN..).ok_or_else(|| Error::Malformed("ifaddrmsg truncated"))?;
    let (mut local, mut address) = (None, None);
    for attr in Attrs::new(attrs) {
        let (kind, payload) = attr?;
        let parse = |raw: &[u8]| -> Option<IpAddr> {
            match i32::from(family) {
                libc::AF_INET => <[u8; 4]>::try_from(raw).ok().map(|a| IpAddr::V4(a.into())),
                libc::AF_INET6 => <[u8; 16]>::try_from(raw).ok().map(|a| IpAddr::V6(a.into())),
                _ => None,
            }
        };
        match kind {
            IFA_ADDRESS => address = parse(payload),
            IFA_LOCAL => local = parse(payload),
            _ => {}
        }
    }
    Ok(local.or(address))
}

/// What one user → kernel `XFRM_MSG_NEWSA` installs: a transport-mode SA
/// with one cipher and no authentication, no lifetime limits and no replay
/// window. Enough for an SA that carries no traffic (the HZ probe's
/// throw-away SA).
#[derive(Debug, Clone, Copy)]
pub struct NewSa<'a> {
    sa: &'a SaId,
    saddr: IpAddr,
    cipher: &'a str,
    key: &'a [u8],
}

impl<'a> NewSa<'a> {
    /// `sa` gives destination, SPI and protocol (a mark or interface id goes
    /// along); `cipher` is a name the kernel's algorithm table knows, such
    /// as `ecb(cipher_null)`. What the kernel's structures cannot hold is
    /// refused here, so that encoding cannot fail.
    pub fn new(sa: &'a SaId, saddr: IpAddr, cipher: &'a str, key: &'a [u8]) -> Result<NewSa<'a>> {
        if cipher.len() >= ALGO_NAME_LEN || cipher.contains('\0') {
            return Err(Error::invalid(format!("cipher name {cipher:?} does not fit the kernel's 64 bytes")));
        }
        if key.len() > MAX_KEY_LEN {
            return Err(Error::invalid(format!("cipher key longer than {MAX_KEY_LEN} bytes")));
        }
        if family_of(&sa.daddr) != family_of(&saddr) {
            return Err(Error::invalid("source and destination of an SA must be of one family"));
        }
        Ok(NewSa { sa, saddr, cipher, key })
    }
}

/// `XFRM_MSG_NEWSA` with `NLM_F_ACK`. The selector is left empty: the
/// kernel gives it the SA's family, so the SA matches no particular traffic.
pub fn encode_newsa(out: &mut Vec<u8>, from: Sender, new: &NewSa<'_>) {
    out.clear();
    let start = begin(out, XFRM_MSG_NEWSA, NLM_F_ACK, from);
    let info = out.len();
    out.resize(info + USERSA_INFO_LEN, 0);
    let mut put = |at: usize, bytes: &[u8]| out[info + at..info + at + bytes.len()].copy_from_slice(bytes);
    put(SA_INFO_ID, &addr16(&new.sa.daddr));
    put(SA_INFO_ID + 16, &new.sa.spi.to_be_bytes());
    put(SA_INFO_ID + 20, &[new.sa.proto]);
    put(SA_INFO_SADDR, &addr16(&new.saddr));
    // Byte and packet limits (soft, hard) of 0 would be limits of 0; the
    // four time limits after them mean "none" at 0.
    for i in 0..4 {
        put(SA_INFO_LFT + 8 * i, &XFRM_INF.to_ne_bytes());
    }
    put(SA_INFO_FAMILY, &family_of(&new.sa.daddr).to_ne_bytes());
    let mut algo = [0u8; ALGO_NAME_LEN + 4 + MAX_KEY_LEN];
    algo[..new.cipher.len()].copy_from_slice(new.cipher.as_bytes());
    let key_bits = (new.key.len() * 8) as u32;
    algo[ALGO_NAME_LEN..ALGO_NAME_LEN + 4].copy_from_slice(&key_bits.to_ne_bytes());
    algo[ALGO_NAME_LEN + 4..][..new.key.len()].copy_from_slice(new.key);
    put_attr(out, XFRMA_ALG_CRYPT, &algo[..ALGO_NAME_LEN + 4 + new.key.len()]);
    put_identity_attrs(out, new.sa);
    finish(out, start);
}
