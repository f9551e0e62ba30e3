//! Threshold rules: which thresholds an SA gets, decided from what the
//! kernel says about it. Pure data and matching, no socket: the registry
//! feeds it SAs as they appear.
//!
//! Precedence, first difference wins:
//! 1. a registration for the SA's exact identity ([`RuleSet::register_sa`]);
//! 2. then the rule that is most specific, compared criterion by criterion
//!    in this order: SPI given; reqid given; longer destination prefix;
//!    longer source prefix; mark given; if_id given; direction given;
//!    protocol given; family given;
//! 3. among equally specific rules, the one added first.

use std::collections::HashMap;
use std::fmt;
use std::net::IpAddr;
use std::str::FromStr;

use crate::error::{Error, Result};
use crate::sa::{family_of, Mark, SaId};

/// What an SA is given: an event every `replay_packets` packets, and at the
/// latest every `timer_ms` milliseconds while it changes.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Thresholds {
    pub replay_packets: u32,
    pub timer_ms: u32,
}

/// Which way an SA carries traffic, seen from this host.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Direction {
    In,
    Out,
}

impl Direction {
    /// How the registry decides an SA's direction: the kernel's
    /// `XFRMA_SA_DIR` when it sent one (6.10 and later, for SAs installed
    /// with it), else which end is one of the namespace's `local`
    /// addresses: a local source is outbound, a local destination inbound.
    pub fn of_sa(kernel_dir: Option<u8>, saddr: Option<IpAddr>, daddr: IpAddr, local: &[IpAddr]) -> Option<Direction> {
        match kernel_dir {
            Some(crate::wire::XFRM_SA_DIR_IN) => Some(Direction::In),
            Some(crate::wire::XFRM_SA_DIR_OUT) => Some(Direction::Out),
            _ if saddr.is_some_and(|a| local.contains(&a)) => Some(Direction::Out),
            _ if local.contains(&daddr) => Some(Direction::In),
            _ => None,
        }
    }

    pub fn name(&self) -> &'static str {
        match self {
            Direction::In => "in",
            Direction::Out => "out",
        }
    }
}

impl FromStr for Direction {
    type Err = Error;

    fn from_str(s: &str) -> Result<Direction> {
        match s {
            "in" => Ok(Direction::In),
            "out" => Ok(Direction::Out),
            _ => Err(Error::invalid(format!("direction '{s}' is neither 'in' nor 'out'"))),
        }
    }
}

/// An address prefix, `10.9.0.0/24` or `fd00:9::/64`; a bare address is a
/// full-length prefix.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Prefix {
    addr: IpAddr,
    len: u8,
}

impl Prefix {
    pub fn new(addr: IpAddr, len: u8) -> Result<Prefix> {
        let max = if addr.is_ipv4() { 32 } else { 128 };
        if len > max {
            return Err(Error::invalid(format!("prefix length {len} is longer than {max}")));
        }
        Ok(Prefix { addr, len })
    }

    pub fn len(&self) -> u8 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn contains(&self, addr: &IpAddr) -> bool {
        let keep = |bits: u32| if self.len == 0 { 0 } else { u128::MAX << (bits - u32::from(self.len)) };
        match (self.addr, addr) {
            (IpAddr::V4(net), IpAddr::V4(a)) => {
                let mask = keep(32) as u32;
                u32::from(net) & mask == u32::from(*a) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(a)) => {
                let mask = keep(128);
                u128::from(net) & mask == u128::from(*a) & mask
            }
            _ => false,
        }
    }
}

impl FromStr for Prefix {
    type Err = Error;

    fn from_str(s: &str) -> Result<Prefix> {
        let (addr, len) = match s.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (s, None),
        };
        let addr: IpAddr =
            addr.parse().map_err(|_| Error::invalid(format!("'{addr}' is not an IPv4 or IPv6 address")))?;
        let len = match len {
            Some(len) => {
                len.parse::<u8>().map_err(|_| Error::invalid(format!("prefix length '{len}' is not a number")))?
            }
            None if addr.is_ipv4() => 32,
            None => 128,
        };
        Prefix::new(addr, len)
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.addr, self.len)
    }
}

/// What a rule matches; `None` matches anything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SaMatch {
    pub reqid: Option<u32>,
    pub src: Option<Prefix>,
    pub dst: Option<Prefix>,
    pub spi: Option<u32>,
    pub proto: Option<u8>,
    /// `AF_INET` or `AF_INET6`.
    pub family: Option<u16>,
    /// Matches an SA whose mark, under this mask, has this value.
    pub mark: Option<Mark>,
    pub if_id: Option<u32>,
    pub direction: Option<Direction>,
}

/// What is known of an SA when it is matched.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct SaFacts {
    pub sa: SaId,
    pub saddr: Option<IpAddr>,
    pub reqid: u32,
    /// From `XFRMA_SA_DIR`, else from whether an address is local; `None`
    /// when neither tells.
    pub direction: Option<Direction>,
}

impl SaMatch {
    pub fn matches(&self, sa: &SaFacts) -> bool {
        fn ok<T>(want: &Option<T>, test: impl FnOnce(&T) -> bool) -> bool {
            want.as_ref().map_or(true, test)
        }
        ok(&self.reqid, |r| *r == sa.reqid)
            && ok(&self.spi, |s| *s == sa.sa.spi)
            && ok(&self.proto, |p| *p == sa.sa.proto)
            && ok(&self.family, |f| *f == family_of(&sa.sa.daddr))
            && ok(&self.dst, |p| p.contains(&sa.sa.daddr))
            && ok(&self.src, |p| sa.saddr.is_some_and(|a| p.contains(&a)))
            && ok(&self.mark, |m| sa.sa.mark.value & m.mask == m.value & m.mask)
            && ok(&self.if_id, |i| *i == sa.sa.if_id)
            && ok(&self.direction, |d| sa.direction == Some(*d))
    }

    /// Whether the rule needs to know which addresses are local.
    pub fn needs_direction(&self) -> bool {
        self.direction.is_some()
    }

    /// Greater is more specific; compared lexicographically (module docs).
    fn specificity(&self) -> [u8; 9] {
        let given = |b: bool| u8::from(b);
        [
            given(self.spi.is_some()),
            given(self.reqid.is_some()),
            self.dst.map_or(0, |p| p.len() + 1),
            self.src.map_or(0, |p| p.len() + 1),
            given(self.mark.is_some()),
            given(self.if_id.is_some()),
            given(self.direction.is_some()),
            given(self.proto.is_some()),
            given(self.family.is_some()),
        ]
    }
}

/// A named rule. Names are unique in a set: adding a rule under a name that
/// exists replaces it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule {
    pub name: String,
    pub matches: SaMatch,
    pub thresholds: Thresholds,
}

/// Where an SA's thresholds came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source<'a> {
    /// Registered for exactly this SA.
    Sa,
    /// The rule of this name.
    Rule(&'a str),
}

/// Thresholds registered for one SA identity, and by how many owners.
#[derive(Debug, Clone, Copy)]
struct Registration {
    thresholds: Thresholds,
    owners: u32,
}

/// Rules and per-SA registrations, kept most specific first.
#[derive(Debug, Default)]
pub struct RuleSet {
    rules: Vec<Rule>,
    per_sa: HashMap<SaId, Registration>,
    /// Insertion counter, so equally specific rules keep their order.
    added: Vec<u64>,
    next: u64,
}

impl RuleSet {
    pub fn new() -> RuleSet {
        RuleSet::default()
    }

    /// Adds `rule`, or replaces the rule of the same name (which keeps its
    /// place among equals).
    pub fn add(&mut self, rule: Rule) {
        let order = match self.rules.iter().position(|r| r.name == rule.name) {
            Some(at) => {
                self.rules.remove(at);
                self.added.remove(at)
            }
            None => {
                self.next += 1;
                self.next
            }
        };
        let key = |m: &SaMatch, added: u64| (std::cmp::Reverse(m.specificity()), added);
        let at = self
            .rules
            .iter()
            .zip(&self.added)
            .position(|(r, a)| key(&r.matches, *a) > key(&rule.matches, order))
            .unwrap_or(self.rules.len());
        self.rules.insert(at, rule);
        self.added.insert(at, order);
    }

    /// Removes the rule named `name`; whether there was one.
    pub fn remove(&mut self, name: &str) -> bool {
        match self.rules.iter().position(|r| r.name == name) {
            Some(at) => {
                self.rules.remove(at);
                self.added.remove(at);
                true
            }
            None => false,
        }
    }

    /// Replaces every rule (not the per-SA registrations) at once.
    pub fn replace_rules(&mut self, rules: Vec<Rule>) {
        self.rules.clear();
        self.added.clear();
        for rule in rules {
            self.add(rule);
        }
    }

    /// `Some`: one more owner registers `sa` (its thresholds are the latest
    /// given); `None`: one owner lets it go. The registration ends with its
    /// last owner, so two daemons' (or two IKEv1 Quick Modes') claims on
    /// one SA identity do not end each other's. Returns how many owners
    /// are left.
    pub fn register_sa(&mut self, sa: SaId, thresholds: Option<Thresholds>) -> u32 {
        match thresholds {
            Some(t) => {
                let entry = self.per_sa.entry(sa).or_insert(Registration { thresholds: t, owners: 0 });
                entry.thresholds = t;
                entry.owners += 1;
                entry.owners
            }
            None => match self.per_sa.get_mut(&sa) {
                Some(entry) if entry.owners > 1 => {
                    entry.owners -= 1;
                    entry.owners
                }
                Some(_) => {
                    self.per_sa.remove(&sa);
                    0
                }
                None => 0,
            },
        }
    }

    /// How many owners have registered `sa`.
    pub fn owners(&self, sa: &SaId) -> u32 {
        self.per_sa.get(sa).map_or(0, |r| r.owners)
    }

    /// The rules, most specific first: the order they are tried in.
    pub fn rules(&self) -> &[Rule] {
        &self.rules
    }

    pub fn is_empty(&self) -> bool {
        self.rules.is_empty() && self.per_sa.is_empty()
    }

    /// Whether some rule needs the SA's direction.
    pub fn needs_direction(&self) -> bool {
        self.rules.iter().any(|r| r.matches.needs_direction())
    }

    /// The thresholds `sa` gets, and from where.
    pub fn resolve(&self, sa: &SaFacts) -> Option<(Source<'_>, Thresholds)> {
        self.resolve_at(sa).map(|(rule, t)| (rule.map_or(Source::Sa, |at| Source::Rule(&self.rules[at].name)), t))
    }

    /// [`RuleSet::resolve`] with the rule as its place in
    /// [`RuleSet::rules`] (`None`: registered for this SA), which a caller
    /// can keep without borrowing the set.
    pub(crate) fn resolve_at(&self, sa: &SaFacts) -> Option<(Option<usize>, Thresholds)> {
        if let Some(r) = self.per_sa.get(&sa.sa) {
            return Some((None, r.thresholds));
        }
        self.rules.iter().position(|r| r.matches.matches(sa)).map(|at| (Some(at), self.rules[at].thresholds))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn facts(daddr: &str, saddr: &str, spi: u32, reqid: u32) -> SaFacts {
        SaFacts {
            sa: SaId::esp(daddr.parse().unwrap(), spi),
            saddr: Some(saddr.parse().unwrap()),
            reqid,
            direction: None,
        }
    }

    fn rule(name: &str, matches: SaMatch, replay: u32) -> Rule {
        Rule { name: name.into(), matches, thresholds: Thresholds { replay_packets: replay, timer_ms: 1000 } }
    }

    fn winner<'a>(set: &'a RuleSet, sa: &SaFacts) -> Option<Source<'a>> {
        set.resolve(sa).map(|(s, _)| s)
    }

    #[test]
    fn prefixes_parse_and_contain() {
        let p: Prefix = "10.9.0.0/24".parse().unwrap();
        assert!(p.contains(&"10.9.0.200".parse().unwrap()));
        assert!(!p.contains(&"10.9.1.1".parse().unwrap()));
        assert!(!p.contains(&"fd00:9::1".parse().unwrap()));
        let all: Prefix = "::/0".parse().unwrap();
        assert!(all.contains(&"fd00:9::1".parse().unwrap()));
        assert_eq!("10.9.0.1".parse::<Prefix>().unwrap().len(), 32);
        assert!("10.9.0.1/33".parse::<Prefix>().is_err());
        assert!("10.9.0.x/8".parse::<Prefix>().is_err());
    }

    #[test]
    fn the_most_specific_rule_wins_whatever_the_order() {
        let by_dst = SaMatch { dst: Some("10.9.0.0/16".parse().unwrap()), ..Default::default() };
        let by_longer_dst = SaMatch { dst: Some("10.9.0.0/24".parse().unwrap()), ..Default::default() };
        let by_reqid = SaMatch { reqid: Some(7), ..Default::default() };
        let by_spi = SaMatch { spi: Some(0x1001), ..Default::default() };
        let everything = SaMatch::default();
        let sa = facts("10.9.0.2", "10.9.0.1", 0x1001, 7);
        let mut set = RuleSet::new();
        for r in [
            rule("all", everything.clone(), 1),
            rule("dst16", by_dst, 2),
            rule("dst24", by_longer_dst, 3),
            rule("reqid", by_reqid, 4),
        ] {
            set.add(r);
        }
        assert_eq!(winner(&set, &sa), Some(Source::Rule("reqid")));
        set.add(rule("spi", by_spi, 5));
        assert_eq!(winner(&set, &sa), Some(Source::Rule("spi")));
        assert_eq!(winner(&set, &facts("10.9.0.2", "10.9.0.1", 0x2001, 8)), Some(Source::Rule("dst24")));
        assert_eq!(winner(&set, &facts("10.9.7.2", "10.9.0.1", 0x2001, 8)), Some(Source::Rule("dst16")));
        assert_eq!(winner(&set, &facts("192.0.2.1", "10.9.0.1", 0x2001, 8)), Some(Source::Rule("all")));
        set.register_sa(sa.sa, Some(Thresholds { replay_packets: 9, timer_ms: 9 }));
        assert_eq!(winner(&set, &sa), Some(Source::Sa));
        assert!(set.remove("spi") && !set.remove("spi"));
    }

    #[test]
    fn equals_keep_the_order_they_were_added_in_even_when_replaced() {
        let mut set = RuleSet::new();
        let reqid = SaMatch { reqid: Some(7), ..Default::default() };
        set.add(rule("first", reqid.clone(), 1));
        set.add(rule("second", reqid.clone(), 2));
        let sa = facts("10.9.0.2", "10.9.0.1", 1, 7);
        assert_eq!(winner(&set, &sa), Some(Source::Rule("first")));
        set.add(rule("first", reqid, 10));
        assert_eq!(set.resolve(&sa), Some((Source::Rule("first"), Thresholds { replay_packets: 10, timer_ms: 1000 })));
    }

    #[test]
    fn marks_directions_and_sources() {
        let marked = SaMatch { mark: Some(Mark { value: 7, mask: 0xff }), ..Default::default() };
        let mut sa = facts("10.9.0.2", "10.9.0.1", 1, 1);
        assert!(!marked.matches(&sa));
        sa.sa = sa.sa.with_mark(0x107, 0xffff);
        assert!(marked.matches(&sa));
        let out = SaMatch { direction: Some(Direction::Out), ..Default::default() };
        assert!(!out.matches(&sa), "unknown direction matches no direction rule");
        sa.direction = Some(Direction::Out);
        assert!(out.matches(&sa));
        let src = SaMatch { src: Some("10.9.0.0/24".parse().unwrap()), ..Default::default() };
        assert!(src.matches(&sa));
        sa.saddr = None;
        assert!(!src.matches(&sa), "an unknown source matches no source rule");
        let v6 = SaMatch { family: Some(libc::AF_INET6 as u16), ..Default::default() };
        assert!(!v6.matches(&sa));
    }
}
