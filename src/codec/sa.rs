//! SA identity: what names one SA to the kernel's state lookup, and what an
//! event is routed by.

use std::fmt;
use std::net::IpAddr;

/// IPsec protocol numbers the kernel keys SAs by.
pub const IPPROTO_ESP: u8 = 50;
pub const IPPROTO_AH: u8 = 51;
pub const IPPROTO_COMP: u8 = 108;

/// An XFRM mark. `{0, 0}` is "no mark": the kernel neither sends nor expects
/// `XFRMA_MARK` then.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct Mark {
    pub value: u32,
    pub mask: u32,
}

impl Mark {
    pub const NONE: Mark = Mark { value: 0, mask: 0 };

    pub fn is_set(&self) -> bool {
        self.value != 0 || self.mask != 0
    }
}

/// One SA as the kernel finds it: destination address, SPI, protocol, and
/// the mark it was installed with. `if_id` is carried for routing events of
/// SAs bound to an XFRM interface; the kernel's aevent lookup ignores it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaId {
    pub daddr: IpAddr,
    /// In host byte order, as `ip xfrm` prints it.
    pub spi: u32,
    pub proto: u8,
    pub mark: Mark,
    pub if_id: u32,
}

/// Every field, in few wide words: events are routed by this hash, once
/// per event.
impl std::hash::Hash for SaId {
    #[inline]
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        let tail = (u64::from(self.if_id) << 8) | u64::from(self.proto);
        match self.daddr {
            IpAddr::V4(a) => state.write_u64((u64::from(self.spi) << 32) | u64::from(u32::from(a))),
            IpAddr::V6(a) => {
                let bits = u128::from(a);
                state.write_u64(bits as u64);
                state.write_u64((bits >> 64) as u64 ^ (u64::from(self.spi) << 32) ^ 1);
            }
        }
        state.write_u64((u64::from(self.mark.value) << 32) | u64::from(self.mark.mask));
        state.write_u64(tail);
    }
}

impl SaId {
    /// An ESP SA without mark or interface id.
    pub fn esp(daddr: IpAddr, spi: u32) -> SaId {
        SaId { daddr, spi, proto: IPPROTO_ESP, mark: Mark::NONE, if_id: 0 }
    }

    pub fn with_mark(self, value: u32, mask: u32) -> SaId {
        SaId { mark: Mark { value, mask }, ..self }
    }

    pub fn with_if_id(self, if_id: u32) -> SaId {
        SaId { if_id, ..self }
    }

    /// `AF_INET` or `AF_INET6`, derived from the address.
    pub fn family(&self) -> u16 {
        family_of(&self.daddr)
    }
}

/// An [`SaId`] as five words, the form events are routed by: built from a
/// message's bytes without making an `IpAddr`, hashed and compared a word
/// at a time. Equal exactly when the `SaId`s are.
pub(crate) type RouteKey = [u64; 5];

/// The [`RouteKey`] of an SA given as its fields; `spi` as on the wire
/// (network order). Only the first 4 address bytes of an IPv4 SA count.
#[inline]
pub(crate) fn route_key(daddr: &[u8; 16], v6: bool, spi: [u8; 4], proto: u8, mark: Mark, if_id: u32) -> RouteKey {
    let mut addr = [0u8; 16];
    if v6 {
        addr = *daddr;
    } else {
        addr[..4].copy_from_slice(&daddr[..4]);
    }
    let lo = u64::from_ne_bytes([addr[0], addr[1], addr[2], addr[3], addr[4], addr[5], addr[6], addr[7]]);
    let hi = u64::from_ne_bytes([addr[8], addr[9], addr[10], addr[11], addr[12], addr[13], addr[14], addr[15]]);
    let rest = u64::from(u32::from_ne_bytes(spi)) | (u64::from(proto) << 32) | (u64::from(v6) << 40);
    [lo, hi, rest, (u64::from(mark.value) << 32) | u64::from(mark.mask), u64::from(if_id)]
}

impl SaId {
    #[inline]
    pub(crate) fn route_key(&self) -> RouteKey {
        let (addr, v6) = match self.daddr {
            IpAddr::V4(a) => {
                let mut addr = [0u8; 16];
                addr[..4].copy_from_slice(&a.octets());
                (addr, false)
            }
            IpAddr::V6(a) => (a.octets(), true),
        };
        route_key(&addr, v6, self.spi.to_be_bytes(), self.proto, self.mark, self.if_id)
    }
}

pub(crate) fn family_of(addr: &IpAddr) -> u16 {
    match addr {
        IpAddr::V4(_) => libc::AF_INET as u16,
        IpAddr::V6(_) => libc::AF_INET6 as u16,
    }
}

pub(crate) fn proto_name(proto: u8) -> &'static str {
    match proto {
        IPPROTO_ESP => "esp",
        IPPROTO_AH => "ah",
        IPPROTO_COMP => "comp",
        _ => "proto",
    }
}

impl fmt::Display for SaId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let name = proto_name(self.proto);
        if name == "proto" {
            write!(f, "proto {} ", self.proto)?;
        } else {
            write!(f, "{name} ")?;
        }
        write!(f, "dst {} spi 0x{:08x}", self.daddr, self.spi)?;
        if self.mark.is_set() {
            write!(f, " mark 0x{:x}/0x{:x}", self.mark.value, self.mark.mask)?;
        }
        if self.if_id != 0 {
            write!(f, " if_id 0x{:x}", self.if_id)?;
        }
        Ok(())
    }
}
