//! The daemon's link to the other nodes, whichever carries it: the UDP
//! transport (two nodes, acked, sealed with the shared key; the default)
//! or a Corosync CPG group (any number of nodes, over corosync's ring).
//! The daemon drives either through one set of calls, and learns from it
//! who sent each message and which peers appeared, which it answers with
//! a snapshot when it is the active node.

use std::fmt;
use std::io;
use std::net::SocketAddr;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::cpg::Member;
use super::cpg_link::{self, CpgLink};
use super::metrics;
use super::transport::{self, Kind, SessionId, Transport};

// One per daemon, made once and never moved after: the sizes do not matter.
#[allow(clippy::large_enum_variant)]
pub enum Link {
    Udp(UdpLink),
    Cpg(CpgLink),
}

/// The UDP transport, and what the daemon was last told of the peer's session.
pub struct UdpLink {
    transport: Transport,
    local: SocketAddr,
    peer: SocketAddr,
    session: Option<SessionId>,
    appeared: Option<Joined>,
}

impl UdpLink {
    pub fn new(transport: Transport, local: SocketAddr, peer: SocketAddr) -> UdpLink {
        UdpLink { transport, local, peer, session: None, appeared: None }
    }
}

/// Who sent a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum PeerId {
    /// The one peer of the UDP link, by its configured address.
    Udp(SocketAddr),
    /// A member of the CPG group.
    Cpg(Member),
}

impl fmt::Display for PeerId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            PeerId::Udp(addr) => write!(f, "{addr}"),
            PeerId::Cpg(member) => write!(f, "{member}"),
        }
    }
}

/// A peer that appeared: it knows nothing it was sent before.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Joined {
    pub peer: PeerId,
    /// The UDP peer came back with a new session: it restarted.
    pub restarted: bool,
}

/// Peers that appeared and left since last asked.
#[derive(Debug, Default)]
pub struct Changes {
    pub joined: Vec<Joined>,
    pub left: Vec<PeerId>,
}

#[derive(Debug)]
pub enum SendError {
    Udp(transport::SendError),
    Cpg(cpg_link::SendError),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::Udp(e) => e.fmt(f),
            SendError::Cpg(e) => e.fmt(f),
        }
    }
}

impl std::error::Error for SendError {}

impl Link {
    /// The fd to poll; -1 (which poll skips) when there is none now.
    pub fn fd(&self) -> RawFd {
        match self {
            Link::Udp(udp) => udp.transport.fd(),
            Link::Cpg(cpg) => cpg.fd(),
        }
    }

    /// The link in a few words, for the daemon's first line.
    pub fn describe(&self) -> String {
        match self {
            Link::Udp(udp) => format!("link {} <-> {}", udp.local, udp.peer),
            Link::Cpg(cpg) => format!("CPG group '{}' as {}", cpg.group(), cpg.local()),
        }
    }

    pub fn max_payload(&self) -> usize {
        match self {
            Link::Udp(udp) => udp.transport.max_payload(),
            Link::Cpg(cpg) => cpg.max_payload(),
        }
    }

    /// Whether the link takes more now; a sender with much to send waits
    /// while it does not.
    pub fn ready(&self) -> bool {
        match self {
            Link::Udp(udp) => udp.transport.ready(),
            Link::Cpg(cpg) => cpg.ready(),
        }
    }

    /// A message that must arrive.
    pub fn send(&mut self, kind: Kind, payload: &[u8], now: Instant) -> Result<(), SendError> {
        match self {
            Link::Udp(udp) => udp.transport.send(kind, payload, now).map_err(SendError::Udp),
            Link::Cpg(cpg) => cpg.send(kind, payload, now).map_err(SendError::Cpg),
        }
    }

    /// A message the next one supersedes (heartbeats). CPG delivers every
    /// message it takes, so there it is a [`Link::send`].
    pub fn send_unreliable(&mut self, kind: Kind, payload: &[u8], now: Instant) -> Result<(), SendError> {
        match self {
            Link::Udp(udp) => udp.transport.send_unreliable(kind, payload).map_err(SendError::Udp),
            Link::Cpg(cpg) => cpg.send(kind, payload, now).map_err(SendError::Cpg),
        }
    }

    /// Reads what arrived and calls `each` for every message, with its
    /// sender. Returns how many there were.
    pub fn receive(&mut self, mut each: impl FnMut(PeerId, Kind, &[u8])) -> io::Result<usize> {
        match self {
            Link::Udp(udp) => {
                let peer = PeerId::Udp(udp.peer);
                let delivered = udp.transport.receive(|kind, payload| each(peer, kind, payload));
                let session = udp.transport.peer_session().map(|s| s.id);
                if session.is_some() && session != udp.session {
                    udp.appeared = Some(Joined { peer, restarted: udp.session.is_some() });
                    udp.session = session;
                }
                delivered
            }
            Link::Cpg(cpg) => {
                Ok(cpg.receive(Instant::now(), |member, kind, payload| each(PeerId::Cpg(member), kind, payload)))
            }
        }
    }

    /// Peers that appeared (the UDP peer's new session; CPG members that
    /// joined, or were seen again after corosync was lost) and left (CPG)
    /// since last asked.
    pub fn take_changes(&mut self) -> Changes {
        match self {
            Link::Udp(udp) => Changes { joined: udp.appeared.take().into_iter().collect(), left: Vec::new() },
            Link::Cpg(cpg) => {
                let changes = cpg.take_changes();
                Changes {
                    joined: changes
                        .joined
                        .into_iter()
                        .map(|m| Joined { peer: PeerId::Cpg(m), restarted: false })
                        .collect(),
                    left: changes.left.into_iter().map(PeerId::Cpg).collect(),
                }
            }
        }
    }

    pub fn on_timer(&mut self, now: Instant) -> io::Result<()> {
        match self {
            Link::Udp(udp) => udp.transport.on_timer(now),
            Link::Cpg(cpg) => {
                cpg.on_timer(now);
                Ok(())
            }
        }
    }

    /// When [`Link::on_timer`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        match self {
            Link::Udp(udp) => udp.transport.next_deadline(),
            Link::Cpg(cpg) => cpg.next_deadline(),
        }
    }

    /// Whether peers are one (the UDP link's) or the members of a group.
    pub fn is_group(&self) -> bool {
        matches!(self, Link::Cpg(_))
    }

    /// The `link:` line of `xfrmsync sync status`.
    pub fn status_text(&self) -> String {
        match self {
            Link::Udp(udp) => {
                let t = udp.transport.stats();
                let d = &t.dropped;
                format!(
                    "link: sent {}, received {}, retransmitted {}, given up {}, outstanding {}; dropped {} (not from \
                     peer {}, auth failed {}, malformed {}, replayed {}, too old {}, from future {}, old session {})",
                    t.sent,
                    t.received,
                    t.retransmitted,
                    t.given_up,
                    udp.transport.outstanding(),
                    d.total(),
                    d.not_from_peer,
                    d.auth_failed,
                    d.malformed,
                    d.replayed,
                    d.too_old,
                    d.from_future,
                    d.old_session
                )
            }
            Link::Cpg(cpg) => {
                let s = cpg.stats();
                let state = match cpg.connected() {
                    true => format!("as {}, {} other members", cpg.local(), cpg.members()),
                    false => format!(
                        "NOT CONNECTED to corosync, joining again every {} s",
                        cpg_link::RECONNECT_AFTER.as_secs()
                    ),
                };
                format!(
                    "link: CPG group '{}' {state}; sent {}, received {}, own dropped {}, try again {}, queued {} ({} \
                     bytes), longest wait in the queue {} ms, longest ring wait {} ms, given up {}, malformed {}, \
                     reconnects {}",
                    cpg.group(),
                    s.sent,
                    s.received,
                    s.looped_back,
                    s.try_again,
                    cpg.queued(),
                    cpg.queued_bytes(),
                    cpg.queue_wait_longest(Instant::now()).as_millis(),
                    cpg.ring_wait_longest(Instant::now()).as_millis(),
                    s.given_up,
                    s.malformed,
                    s.reconnects
                )
            }
        }
    }

    /// The `link` object of `xfrmsync sync status --json`.
    pub fn status_json(&self) -> serde_json::Value {
        match self {
            Link::Udp(udp) => {
                let t = udp.transport.stats();
                let d = &t.dropped;
                serde_json::json!({
                    "transport": "udp",
                    "sent": t.sent, "received": t.received, "retransmitted": t.retransmitted, "acked": t.acked,
                    "given_up": t.given_up, "outstanding": udp.transport.outstanding(),
                    "dropped": { "not_from_peer": d.not_from_peer, "auth_failed": d.auth_failed,
                                 "malformed": d.malformed, "replayed": d.replayed, "too_old": d.too_old,
                                 "from_future": d.from_future, "old_session": d.old_session },
                })
            }
            Link::Cpg(cpg) => {
                let s = cpg.stats();
                serde_json::json!({
                    "transport": "cpg",
                    "group": cpg.group(), "connected": cpg.connected(),
                    "nodeid": cpg.local().nodeid, "pid": cpg.local().pid,
                    "members": cpg.members(), "max_message": cpg.max_message(),
                    "sent": s.sent, "received": s.received, "looped_back": s.looped_back,
                    "try_again": s.try_again, "outstanding": cpg.queued(), "queued": cpg.queued(),
                    "queued_bytes": cpg.queued_bytes(),
                    "queue_wait_longest_ms": millis(cpg.queue_wait_longest(Instant::now())),
                    "ring_wait_longest_ms": millis(cpg.ring_wait_longest(Instant::now())),
                    "given_up": s.given_up, "disconnects": s.disconnects, "reconnects": s.reconnects,
                    "dropped": { "malformed": s.malformed },
                })
            }
        }
    }

    /// The link's part of the metrics.
    pub fn metrics(&self, v: &mut metrics::Values) {
        match self {
            Link::Udp(udp) => {
                let t = udp.transport.stats();
                let d = &t.dropped;
                v.link_sent = t.sent;
                v.link_received = t.received;
                v.link_retransmitted = t.retransmitted;
                v.link_given_up = t.given_up;
                v.link_dropped = vec![
                    ("not_from_peer", d.not_from_peer),
                    ("auth_failed", d.auth_failed),
                    ("malformed", d.malformed),
                    ("replayed", d.replayed),
                    ("too_old", d.too_old),
                    ("from_future", d.from_future),
                    ("old_session", d.old_session),
                ];
            }
            Link::Cpg(cpg) => {
                let s = cpg.stats();
                v.link_sent = s.sent;
                v.link_received = s.received;
                v.link_given_up = s.given_up;
                v.link_dropped = vec![("malformed", s.malformed)];
                v.cpg = Some(metrics::CpgValues {
                    try_again: s.try_again,
                    queued: cpg.queued() as u64,
                    queue_wait_longest: cpg.queue_wait_longest(Instant::now()),
                    ring_wait_longest: cpg.ring_wait_longest(Instant::now()),
                    members: cpg.members() as u64,
                    connected: cpg.connected(),
                });
            }
        }
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}
