//! The CPG link: the daemon's messages multicast to a Corosync closed
//! process group, for clusters of more than two nodes where corosync runs
//! already. Every daemon of the cluster joins one group; every message
//! reaches every member, in one order for all (`CPG_TYPE_AGREED`).
//!
//! # Messages
//!
//! One message a CPG message: a byte, the kind (the UDP link's numbers,
//! [`Kind`]), then the payload. Nothing of our own seals it: corosync's
//! knet transport authenticates and encrypts the ring (`crypto_cipher`
//! and `crypto_hash` in corosync.conf, with a shared authkey), so only
//! nodes with that key are members, and a group's members are processes
//! that corosync let join. A ring without crypto carries records that
//! rewrite a standby's IPsec state in clear and unauthenticated: do not.
//!
//! Every member receives its own messages too; those of this process
//! (this node's id and our pid) are dropped. Corosync has no state
//! transfer: the link reports members that appeared
//! ([`CpgLink::take_changes`]), and the daemon on the active node answers
//! with a full snapshot.
//!
//! # Flow control
//!
//! `cpg_mcast_joined` says `CS_ERR_TRY_AGAIN` when corosync takes no more
//! for now: its queue towards the ring is full, for instance while the
//! ring is blocked during failure detection (seconds, with the default
//! token). The link never waits for it: the message is queued, and tried
//! again at [`CpgLink::next_deadline`] (every [`RETRY_AFTER`]) and after
//! each dispatch, in order. A corosync that reads nothing at all (stopped,
//! hung) is answered for the same way by the binding, which would
//! otherwise spin in libqb ([`super::cpg`] says how). [`CpgLink::ready`] turns false while the queue
//! holds `queue_ready_bytes` or more, and the daemon then stops taking
//! kernel events, as it does while the UDP link waits for acks; past
//! `queue_max_bytes` the oldest messages are given up (counted), which
//! only a snapshot repairs. How long a message waited in the queue is
//! measured: the longest wait is in `status` and the metrics.
//!
//! A ring that blocks with little traffic (heartbeats while corosync
//! detects a failure) does not fill corosync's queue, so nothing waits in
//! ours: corosync takes the messages and holds them. What shows that block
//! is the time from corosync taking a message of ours to delivering it back
//! to us, in the group's order; the link measures it too (the longest
//! "ring wait"), pairing each of its own messages coming back with the
//! oldest sent one of the same bytes (corosync delivers a sender's
//! messages in the order it sent them).
//!
//! # Losing corosync
//!
//! When a call fails otherwise (corosync stopped or restarted), the
//! handle is closed, the queue given up, every member reported gone, and
//! joining is tried again every [`RECONNECT_AFTER`]. Once back, the
//! members reappear, so that an active node sends everything again.

use std::collections::{BTreeSet, VecDeque};
use std::fmt;
use std::os::fd::RawFd;
use std::time::{Duration, Instant};

use super::cpg::{self, Cpg, CsError, Event, Member, OpenError};
use super::transport::Kind;

/// The kind byte before the payload.
pub const HEADER_LEN: usize = 1;
/// How soon a message corosync refused is offered again.
pub const RETRY_AFTER: Duration = Duration::from_millis(5);
/// How often joining is tried again after corosync was lost.
pub const RECONNECT_AFTER: Duration = Duration::from_secs(1);
/// Own messages remembered until they come back; beyond, the oldest are
/// forgotten (the ring wait then misses them).
const IN_FLIGHT_MOST: usize = 1 << 16;

/// How long joining may answer `CS_ERR_TRY_AGAIN` at start (corosync
/// syncing) before the daemon gives up.
const START_PATIENCE: Duration = Duration::from_secs(5);

/// What the link needs of a joined CPG handle: [`Cpg`], or a stand-in in
/// tests (the seam through which they say `CS_ERR_TRY_AGAIN`).
pub trait Ring {
    fn fd(&self) -> RawFd;
    fn local(&self) -> Member;
    fn max_atomic(&self) -> usize;
    fn dispatch(&mut self, events: &mut Vec<Event>) -> Result<(), CsError>;
    fn mcast(&mut self, message: &[u8]) -> Result<(), CsError>;
}

impl Ring for Cpg {
    fn fd(&self) -> RawFd {
        Cpg::fd(self)
    }

    fn local(&self) -> Member {
        Cpg::local(self)
    }

    fn max_atomic(&self) -> usize {
        Cpg::max_atomic(self)
    }

    fn dispatch(&mut self, events: &mut Vec<Event>) -> Result<(), CsError> {
        Cpg::dispatch(self, events)
    }

    fn mcast(&mut self, message: &[u8]) -> Result<(), CsError> {
        Cpg::mcast(self, message)
    }
}

/// Opens and joins a ring: at start, and again after corosync was lost.
pub type Connect = Box<dyn FnMut() -> Result<Box<dyn Ring>, OpenError>>;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct CpgConfig {
    pub group: String,
    /// The longest message, kind byte included; cut to corosync's atomic
    /// size if that is less.
    pub max_message: usize,
    /// [`CpgLink::ready`] while less than this is queued.
    pub queue_ready_bytes: usize,
    /// Beyond this, the oldest queued messages are given up.
    pub queue_max_bytes: usize,
}

impl CpgConfig {
    /// The queue's bounds follow `max_message`: at least 1 MiB or four
    /// messages before the daemon holds back, eight times that in all.
    pub fn new(group: &str, max_message: usize) -> CpgConfig {
        let ready = (1 << 20).max(4 * max_message);
        CpgConfig { group: group.into(), max_message, queue_ready_bytes: ready, queue_max_bytes: 8 * ready }
    }
}

/// Counters, from the start.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct CpgStats {
    /// Messages corosync took.
    pub sent: u64,
    /// Messages of other members delivered to the daemon.
    pub received: u64,
    /// Our own messages, which corosync delivers to us too, dropped.
    pub looped_back: u64,
    /// The longest from corosync taking a message of ours to delivering it
    /// back to us.
    pub ring_wait_longest: Duration,
    /// `CS_ERR_TRY_AGAIN` answers to `cpg_mcast_joined`.
    pub try_again: u64,
    /// Messages never handed to corosync: the queue overflowed, or
    /// corosync was lost while they waited.
    pub given_up: u64,
    /// Messages without a kind we know.
    pub malformed: u64,
    /// The longest time a message waited in the queue before corosync took it.
    pub queue_wait_longest: Duration,
    /// Times corosync was lost, and joined again.
    pub disconnects: u64,
    pub reconnects: u64,
}

#[derive(Debug)]
pub enum SendError {
    /// The payload is longer than [`CpgLink::max_payload`].
    TooLarge { len: usize, max: usize },
    /// Corosync is not reachable now; joining is tried again.
    Disconnected,
    /// Corosync refused the message for a reason other than flow control;
    /// the link reconnects.
    Failed(CsError),
}

impl fmt::Display for SendError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            SendError::TooLarge { len, max } => {
                write!(f, "a message of {len} bytes does not fit a CPG message (at most {max})")
            }
            SendError::Disconnected => f.write_str("not connected to corosync (trying again every second)"),
            SendError::Failed(e) => write!(f, "cpg_mcast_joined: {e}"),
        }
    }
}

impl std::error::Error for SendError {}

/// The kind byte, then the payload.
pub fn frame(kind: Kind, payload: &[u8]) -> Vec<u8> {
    let mut message = Vec::with_capacity(HEADER_LEN + payload.len());
    message.push(kind.wire());
    message.extend_from_slice(payload);
    message
}

/// The kind and payload of a message; `None` for an empty message or an
/// unknown kind (the UDP link's ack, 1, included: CPG has none).
pub fn unframe(message: &[u8]) -> Option<(Kind, &[u8])> {
    let (&kind, payload) = message.split_first()?;
    Some((Kind::from_wire(kind)?, payload))
}

struct Queued {
    message: Vec<u8>,
    since: Instant,
}

/// A message corosync took, until it comes back.
struct InFlight {
    fingerprint: u64,
    taken: Instant,
}

/// The message's length and an FNV-1a hash of its first and last bytes
/// (a record's SA is near its start): enough to pair a message with its
/// copy coming back among those in flight, at a cost that does not grow
/// with the message. A wrong pairing only misreads a wait.
fn fingerprint(message: &[u8]) -> u64 {
    const ENDS: usize = 256;
    let head = &message[..message.len().min(ENDS)];
    let tail = &message[message.len().saturating_sub(ENDS).max(head.len())..];
    let hash = head
        .iter()
        .chain(tail)
        .fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x100_0000_01b3));
    hash ^ (message.len() as u64).rotate_left(32)
}

/// Members that appeared and left since last asked.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Changes {
    pub joined: Vec<Member>,
    pub left: Vec<Member>,
}

pub struct CpgLink {
    group: String,
    /// `None` while corosync is lost.
    ring: Option<Box<dyn Ring>>,
    connect: Connect,
    reconnect_at: Instant,
    local: Member,
    max_message: usize,
    queue_ready_bytes: usize,
    queue_max_bytes: usize,
    queue: VecDeque<Queued>,
    queued_bytes: usize,
    retry_at: Instant,
    /// Taken by corosync, not delivered back yet, oldest first.
    in_flight: VecDeque<InFlight>,
    /// The group's other members, as the last membership said.
    members: BTreeSet<Member>,
    changes: Changes,
    events: Vec<Event>,
    stats: CpgStats,
    /// Of [`cpg::callback_panics`], those already reported.
    panics_seen: u64,
}

impl CpgLink {
    /// Joins `config.group` through libcpg. Corosync must be running:
    /// otherwise this fails at once, rather than leave a daemon that syncs
    /// nothing; while corosync is starting (`CS_ERR_TRY_AGAIN`), it is
    /// tried for a few seconds.
    pub fn join(config: CpgConfig) -> Result<CpgLink, OpenError> {
        let group = config.group.clone();
        let connect: Connect = Box::new(move || Cpg::open(&group).map(|cpg| Box::new(cpg) as Box<dyn Ring>));
        let until = Instant::now() + START_PATIENCE;
        let mut link = CpgLink::with(config, connect);
        loop {
            match link.try_connect() {
                Ok(()) => return Ok(link),
                Err(e) if e.is_try_again() && Instant::now() < until => {
                    std::thread::sleep(Duration::from_millis(100));
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// A link not connected yet: the first [`CpgLink::on_timer`] connects.
    fn with(config: CpgConfig, connect: Connect) -> CpgLink {
        let now = Instant::now();
        CpgLink {
            group: config.group,
            ring: None,
            connect,
            reconnect_at: now,
            local: Member { nodeid: 0, pid: std::process::id() },
            max_message: config.max_message,
            queue_ready_bytes: config.queue_ready_bytes,
            queue_max_bytes: config.queue_max_bytes,
            queue: VecDeque::new(),
            queued_bytes: 0,
            retry_at: now,
            in_flight: VecDeque::new(),
            members: BTreeSet::new(),
            changes: Changes::default(),
            events: Vec::new(),
            stats: CpgStats::default(),
            panics_seen: 0,
        }
    }

    /// A link over `connect`'s rings, connected once (tests).
    #[cfg(test)]
    fn joined_with(config: CpgConfig, connect: Connect) -> CpgLink {
        let mut link = CpgLink::with(config, connect);
        link.try_connect().expect("the test's ring");
        link
    }

    fn try_connect(&mut self) -> Result<(), OpenError> {
        let ring = (self.connect)()?;
        self.local = ring.local();
        if ring.max_atomic() > HEADER_LEN && ring.max_atomic() < self.max_message {
            log::warn!(
                "CPG: max_message {} is more than corosync sends whole ({} bytes): messages are cut to that, since a \
                 longer one is sent in fragments by a call that waits",
                self.max_message,
                ring.max_atomic()
            );
            self.max_message = ring.max_atomic();
        }
        self.ring = Some(ring);
        Ok(())
    }

    /// The fd to poll; -1 (which poll skips) while corosync is lost.
    pub fn fd(&self) -> RawFd {
        self.ring.as_ref().map_or(-1, |ring| ring.fd())
    }

    pub fn group(&self) -> &str {
        &self.group
    }

    /// This process as the group knows it.
    pub fn local(&self) -> Member {
        self.local
    }

    pub fn connected(&self) -> bool {
        self.ring.is_some()
    }

    /// The group's other members now.
    pub fn members(&self) -> usize {
        self.members.len()
    }

    pub fn max_message(&self) -> usize {
        self.max_message
    }

    pub fn max_payload(&self) -> usize {
        self.max_message - HEADER_LEN
    }

    /// Messages waiting for corosync to take them.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    pub fn queued_bytes(&self) -> usize {
        self.queued_bytes
    }

    /// The longest time a message waited in the queue, the one waiting now
    /// included: a ring that blocks shows here while it blocks.
    pub fn queue_wait_longest(&self, now: Instant) -> Duration {
        let waiting = self.queue.front().map_or(Duration::ZERO, |q| now.saturating_duration_since(q.since));
        self.stats.queue_wait_longest.max(waiting)
    }

    /// The longest ring wait (the module's text), the oldest message in
    /// flight now included: a ring that blocks shows here while it blocks.
    pub fn ring_wait_longest(&self, now: Instant) -> Duration {
        let waiting = self.in_flight.front().map_or(Duration::ZERO, |m| now.saturating_duration_since(m.taken));
        self.stats.ring_wait_longest.max(waiting)
    }

    pub fn stats(&self) -> &CpgStats {
        &self.stats
    }

    /// Whether the daemon may hand over more (see the module's text).
    pub fn ready(&self) -> bool {
        self.queued_bytes < self.queue_ready_bytes
    }

    /// Sends `payload` to every member, now or, if corosync asks us to
    /// wait, from the queue.
    pub fn send(&mut self, kind: Kind, payload: &[u8], now: Instant) -> Result<(), SendError> {
        if payload.len() > self.max_payload() {
            return Err(SendError::TooLarge { len: payload.len(), max: self.max_payload() });
        }
        if self.ring.is_none() {
            self.stats.given_up += 1;
            return Err(SendError::Disconnected);
        }
        let message = frame(kind, payload);
        self.flush(now);
        if !self.queue.is_empty() {
            self.enqueue(message, now);
            return Ok(());
        }
        let Some(ring) = self.ring.as_mut() else {
            // Lost while offering the queue.
            self.stats.given_up += 1;
            return Err(SendError::Disconnected);
        };
        match ring.mcast(&message) {
            Ok(()) => {
                self.stats.sent += 1;
                self.taken(&message, now);
                Ok(())
            }
            Err(e) if e == CsError::TRY_AGAIN => {
                self.stats.try_again += 1;
                self.retry_at = now + RETRY_AFTER;
                self.enqueue(message, now);
                Ok(())
            }
            Err(e) => {
                self.stats.given_up += 1;
                self.lose(&format!("cpg_mcast_joined: {e}"), now);
                Err(SendError::Failed(e))
            }
        }
    }

    fn enqueue(&mut self, message: Vec<u8>, now: Instant) {
        while self.queued_bytes + message.len() > self.queue_max_bytes {
            let Some(oldest) = self.queue.pop_front() else { break };
            self.queued_bytes -= oldest.message.len();
            self.stats.given_up += 1;
        }
        self.queued_bytes += message.len();
        self.queue.push_back(Queued { message, since: now });
    }

    /// Hands corosync what waits, in order, until it says to wait again.
    fn flush(&mut self, now: Instant) {
        while let Some(front) = self.queue.front() {
            let Some(ring) = self.ring.as_mut() else { return };
            match ring.mcast(&front.message) {
                Ok(()) => {
                    let waited = now.saturating_duration_since(front.since);
                    self.stats.queue_wait_longest = self.stats.queue_wait_longest.max(waited);
                    self.stats.sent += 1;
                    self.queued_bytes -= front.message.len();
                    if let Some(sent) = self.queue.pop_front() {
                        self.taken(&sent.message, now);
                    }
                }
                Err(e) if e == CsError::TRY_AGAIN => {
                    self.stats.try_again += 1;
                    self.retry_at = now + RETRY_AFTER;
                    return;
                }
                Err(e) => {
                    self.lose(&format!("cpg_mcast_joined: {e}"), now);
                    return;
                }
            }
        }
    }

    /// Remembers a message corosync took, to time it when it comes back.
    fn taken(&mut self, message: &[u8], now: Instant) {
        if self.in_flight.len() >= IN_FLIGHT_MOST {
            self.in_flight.pop_front();
        }
        self.in_flight.push_back(InFlight { fingerprint: fingerprint(message), taken: now });
    }

    /// Our own message came back: its ring wait.
    fn came_back(&mut self, message: &[u8], now: Instant) {
        let fingerprint = fingerprint(message);
        // Any older one not back yet never will be: corosync delivers a
        // sender's messages in order.
        if let Some(at) = self.in_flight.iter().position(|m| m.fingerprint == fingerprint) {
            let waited = now.saturating_duration_since(self.in_flight[at].taken);
            self.in_flight.drain(..=at);
            self.stats.ring_wait_longest = self.stats.ring_wait_longest.max(waited);
        }
    }

    /// When [`CpgLink::on_timer`] has something to do: a queued message to
    /// offer again, or corosync to join again.
    pub fn next_deadline(&self) -> Option<Instant> {
        if self.ring.is_none() {
            Some(self.reconnect_at)
        } else if !self.queue.is_empty() {
            Some(self.retry_at)
        } else {
            None
        }
    }

    pub fn on_timer(&mut self, now: Instant) {
        if self.ring.is_none() {
            if now < self.reconnect_at {
                return;
            }
            match self.try_connect() {
                Ok(()) => {
                    self.stats.reconnects += 1;
                    log::warn!("CPG: joined group '{}' again as {}", self.group, self.local);
                }
                Err(e) => {
                    log::debug!("CPG: joining again: {e}");
                    self.reconnect_at = now + RECONNECT_AFTER;
                }
            }
            return;
        }
        if !self.queue.is_empty() && self.retry_at <= now {
            self.flush(now);
        }
    }

    /// Runs what corosync delivered: each message of another member goes
    /// to `each`, with its sender; membership is kept for
    /// [`CpgLink::take_changes`]. Returns how many messages were delivered.
    pub fn receive(&mut self, now: Instant, mut each: impl FnMut(Member, Kind, &[u8])) -> usize {
        let Some(ring) = self.ring.as_mut() else { return 0 };
        let mut events = std::mem::take(&mut self.events);
        let dispatched = ring.dispatch(&mut events);
        let mut delivered = 0;
        for event in events.drain(..) {
            match event {
                Event::Message { from, data } => {
                    if from == self.local {
                        self.stats.looped_back += 1;
                        self.came_back(&data, now);
                        continue;
                    }
                    match unframe(&data) {
                        Some((kind, payload)) => {
                            self.stats.received += 1;
                            delivered += 1;
                            each(from, kind, payload);
                        }
                        None => self.stats.malformed += 1,
                    }
                }
                Event::Membership { members } => {
                    let now_in: BTreeSet<Member> = members.into_iter().filter(|m| *m != self.local).collect();
                    self.changes.joined.extend(now_in.difference(&self.members));
                    self.changes.left.extend(self.members.difference(&now_in));
                    self.members = now_in;
                }
            }
        }
        self.events = events;
        let panics = cpg::callback_panics();
        if panics > self.panics_seen {
            log::error!("CPG: {} callbacks panicked; what they carried is lost", panics - self.panics_seen);
            self.panics_seen = panics;
        }
        match dispatched {
            // Corosync may take what waits now.
            Ok(()) => self.flush(now),
            Err(e) => self.lose(&format!("cpg_dispatch: {e}"), now),
        }
        delivered
    }

    /// Members that joined and left since last asked (never this process).
    pub fn take_changes(&mut self) -> Changes {
        std::mem::take(&mut self.changes)
    }

    /// Corosync was lost: everything that waited is given up, every member
    /// is gone as far as we know, and joining is tried again.
    fn lose(&mut self, why: &str, now: Instant) {
        log::warn!(
            "CPG: lost corosync ({why}); {} queued messages given up; joining group '{}' again every {} s",
            self.queue.len(),
            self.group,
            RECONNECT_AFTER.as_secs()
        );
        self.ring = None;
        self.stats.given_up += self.queue.len() as u64;
        self.stats.disconnects += 1;
        self.queue.clear();
        self.queued_bytes = 0;
        self.in_flight.clear();
        let members = std::mem::take(&mut self.members);
        self.changes.left.extend(members);
        self.reconnect_at = now + RECONNECT_AFTER;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::cell::RefCell;
    use std::rc::Rc;

    const KINDS: [Kind; 6] =
        [Kind::Records, Kind::SnapshotRequest, Kind::SnapshotDone, Kind::Heartbeat, Kind::Gone, Kind::Samples];
    const ME: Member = Member { nodeid: 1, pid: 100 };
    const B: Member = Member { nodeid: 2, pid: 200 };
    const C: Member = Member { nodeid: 3, pid: 300 };

    #[test]
    fn framing_is_the_kind_byte_then_the_payload() {
        for kind in KINDS {
            let message = frame(kind, b"payload");
            assert_eq!(message[0], kind.wire());
            assert_eq!(&message[1..], b"payload");
            assert_eq!(unframe(&message), Some((kind, &b"payload"[..])));
            assert_eq!(unframe(&frame(kind, &[])), Some((kind, &[][..])), "an empty payload");
        }
        assert_eq!(frame(Kind::Heartbeat, b"x"), [5, b'x']);
        assert_eq!(unframe(&[]), None, "no kind");
        assert_eq!(unframe(&[1, 0, 0]), None, "the UDP link's ack is no CPG message");
        assert_eq!(unframe(&[0]), None);
        assert_eq!(unframe(&[8, 1]), None);
        assert_eq!(unframe(&[255]), None);
    }

    /// The stand-in ring's script and record, shared with the test.
    #[derive(Default)]
    struct Script {
        /// `CS_ERR_TRY_AGAIN` for the next this many mcasts.
        try_again: u32,
        /// Fails the next mcast or dispatch with this.
        fail: Option<CsError>,
        /// Taken by the next dispatch.
        pending: Vec<Event>,
        /// What corosync took, in order.
        taken: Vec<Vec<u8>>,
        mcast_calls: u32,
        connects: u32,
        /// Refuses connects while set.
        refuse: Option<CsError>,
    }

    struct FakeRing(Rc<RefCell<Script>>);

    impl Ring for FakeRing {
        fn fd(&self) -> RawFd {
            7
        }

        fn local(&self) -> Member {
            ME
        }

        fn max_atomic(&self) -> usize {
            4096
        }

        fn dispatch(&mut self, events: &mut Vec<Event>) -> Result<(), CsError> {
            let mut s = self.0.borrow_mut();
            if let Some(e) = s.fail.take() {
                return Err(e);
            }
            events.append(&mut s.pending);
            Ok(())
        }

        fn mcast(&mut self, message: &[u8]) -> Result<(), CsError> {
            let mut s = self.0.borrow_mut();
            s.mcast_calls += 1;
            if let Some(e) = s.fail.take() {
                return Err(e);
            }
            if s.try_again > 0 {
                s.try_again -= 1;
                return Err(CsError::TRY_AGAIN);
            }
            s.taken.push(message.to_vec());
            Ok(())
        }
    }

    fn link(config: CpgConfig) -> (CpgLink, Rc<RefCell<Script>>) {
        let script = Rc::new(RefCell::new(Script::default()));
        let shared = Rc::clone(&script);
        let connect: Connect = Box::new(move || {
            let mut s = shared.borrow_mut();
            if let Some(e) = s.refuse {
                return Err(OpenError::Call("cpg_model_initialize", e));
            }
            s.connects += 1;
            Ok(Box::new(FakeRing(Rc::clone(&shared))) as Box<dyn Ring>)
        });
        (CpgLink::joined_with(config, connect), script)
    }

    fn members(list: &[Member]) -> Event {
        Event::Membership { members: list.to_vec() }
    }

    #[test]
    fn try_again_queues_in_order_and_the_timer_retries() {
        let (mut link, script) = link(CpgConfig::new("g", 1024));
        let t0 = Instant::now();
        script.borrow_mut().try_again = 3;
        link.send(Kind::Records, b"first", t0).unwrap();
        assert_eq!((link.queued(), link.stats().try_again, link.stats().sent), (1, 1, 0));
        assert_eq!(link.next_deadline(), Some(t0 + RETRY_AFTER), "retried a few ms on");
        // A send while one waits offers the queue first: refused again,
        // and the new message waits behind the first.
        let t1 = t0 + Duration::from_millis(2);
        link.send(Kind::Heartbeat, b"second", t1).unwrap();
        assert_eq!((link.queued(), link.stats().try_again), (2, 2));
        assert_eq!(link.queued_bytes(), 6 + 7);
        assert!(link.ready(), "a short queue does not hold the daemon back");
        // Not due yet: nothing offered.
        link.on_timer(t1 + Duration::from_millis(1));
        assert_eq!(script.borrow().mcast_calls, 2);
        let t2 = t1 + RETRY_AFTER;
        link.on_timer(t2);
        assert_eq!((link.queued(), link.stats().try_again), (2, 3));
        assert_eq!(link.queue_wait_longest(t2), t2 - t0, "the waiting message counts while it waits");
        assert_eq!(link.stats().queue_wait_longest, Duration::ZERO, "none taken yet");
        let t3 = t2 + RETRY_AFTER;
        link.on_timer(t3);
        assert_eq!(link.queued(), 0);
        assert_eq!(link.queued_bytes(), 0);
        assert_eq!(link.next_deadline(), None);
        assert_eq!(script.borrow().taken, [frame(Kind::Records, b"first"), frame(Kind::Heartbeat, b"second")]);
        assert_eq!(link.stats().sent, 2);
        assert_eq!(link.stats().try_again, 3);
        assert_eq!(link.stats().queue_wait_longest, t3 - t0, "the first message waited longest");
        assert_eq!(link.queue_wait_longest(t3 + Duration::from_secs(9)), t3 - t0);
        assert_eq!(link.stats().given_up, 0);
    }

    #[test]
    fn fingerprints_tell_messages_apart_by_their_ends_and_length() {
        let long = |at: usize| {
            let mut m = vec![0u8; 4096];
            m[at] = 1;
            m
        };
        assert_ne!(fingerprint(&long(0)), fingerprint(&long(4095)));
        assert_ne!(fingerprint(&long(10)), fingerprint(&long(4000)));
        assert_eq!(fingerprint(&long(2000)), fingerprint(&vec![0u8; 4096]), "the middle is not read");
        assert_ne!(fingerprint(&[0u8; 300]), fingerprint(&[0u8; 301]));
        assert_ne!(fingerprint(b"ab"), fingerprint(b"ba"));
        assert_ne!(fingerprint(&frame(Kind::Heartbeat, b"x")), fingerprint(&frame(Kind::Records, b"x")));
    }

    #[test]
    fn the_ring_wait_is_from_corosync_taking_a_message_to_its_return() {
        let (mut link, script) = link(CpgConfig::new("g", 1024));
        let t0 = Instant::now();
        let heartbeat = frame(Kind::Heartbeat, b"same");
        link.send(Kind::Heartbeat, b"same", t0).unwrap();
        link.send(Kind::Records, b"r", t0 + Duration::from_millis(10)).unwrap();
        link.send(Kind::Heartbeat, b"same", t0 + Duration::from_millis(20)).unwrap();
        assert_eq!(link.ring_wait_longest(t0 + Duration::from_secs(3)), Duration::from_secs(3), "the oldest waits");
        assert_eq!(link.stats().ring_wait_longest, Duration::ZERO);
        // The ring was blocked for 3 s; then all three come back, in order.
        script.borrow_mut().pending = vec![
            Event::Message { from: ME, data: heartbeat.clone() },
            Event::Message { from: ME, data: frame(Kind::Records, b"r") },
            Event::Message { from: ME, data: heartbeat.clone() },
        ];
        let t3 = t0 + Duration::from_secs(3);
        link.receive(t3, |_, _, _| panic!("our own"));
        assert_eq!(link.stats().ring_wait_longest, Duration::from_secs(3), "paired with the first, not the last");
        assert_eq!(link.ring_wait_longest(t3 + Duration::from_secs(60)), Duration::from_secs(3), "none in flight");
        // One that never comes back is dropped when a later one does.
        let t4 = t3 + Duration::from_secs(1);
        link.send(Kind::Records, b"lost", t4).unwrap();
        link.send(Kind::Records, b"back", t4).unwrap();
        script.borrow_mut().pending = vec![Event::Message { from: ME, data: frame(Kind::Records, b"back") }];
        link.receive(t4 + Duration::from_millis(5), |_, _, _| {});
        assert_eq!(link.ring_wait_longest(t4 + Duration::from_secs(60)), Duration::from_secs(3));
        // Try-again: the wait starts when corosync takes it, not before.
        script.borrow_mut().try_again = 1;
        let t5 = t4 + Duration::from_secs(1);
        link.send(Kind::Records, b"late", t5).unwrap();
        link.on_timer(t5 + Duration::from_secs(5));
        script.borrow_mut().pending = vec![Event::Message { from: ME, data: frame(Kind::Records, b"late") }];
        link.receive(t5 + Duration::from_secs(5) + Duration::from_millis(1), |_, _, _| {});
        assert_eq!(link.stats().queue_wait_longest, Duration::from_secs(5));
        assert_eq!(link.stats().ring_wait_longest, Duration::from_secs(3));
    }

    #[test]
    fn a_dispatch_offers_the_queue_again() {
        let (mut link, script) = link(CpgConfig::new("g", 1024));
        let t0 = Instant::now();
        script.borrow_mut().try_again = 1;
        link.send(Kind::Records, b"r", t0).unwrap();
        assert_eq!(link.queued(), 1);
        link.receive(t0 + Duration::from_millis(1), |_, _, _| panic!("nothing delivered"));
        assert_eq!(link.queued(), 0, "taken after the dispatch, before the timer");
        assert_eq!(link.stats().queue_wait_longest, Duration::from_millis(1));
    }

    #[test]
    fn a_long_queue_holds_the_daemon_back_and_a_full_one_gives_up_the_oldest() {
        let config = CpgConfig { queue_ready_bytes: 3 * 101, queue_max_bytes: 5 * 101, ..CpgConfig::new("g", 1024) };
        let (mut link, script) = link(config);
        let t0 = Instant::now();
        script.borrow_mut().try_again = u32::MAX;
        let payload = [0u8; 100];
        for i in 0..3 {
            assert!(link.ready(), "{i} queued");
            link.send(Kind::Records, &payload, t0).unwrap();
        }
        assert!(!link.ready(), "three messages reach queue_ready_bytes");
        link.send(Kind::Records, &payload, t0).unwrap();
        link.send(Kind::Records, &payload, t0).unwrap();
        assert_eq!((link.queued(), link.stats().given_up), (5, 0));
        let mut marked = payload;
        marked[0] = 1;
        link.send(Kind::Gone, &marked, t0).unwrap();
        assert_eq!((link.queued(), link.queued_bytes(), link.stats().given_up), (5, 5 * 101, 1), "the oldest gone");
        script.borrow_mut().try_again = 0;
        link.on_timer(t0 + RETRY_AFTER);
        let taken = &script.borrow().taken;
        assert_eq!(taken.len(), 5);
        assert_eq!(taken[4], frame(Kind::Gone, &marked), "the newest kept, last");
        assert!(link.ready());
    }

    #[test]
    fn a_payload_longer_than_a_message_is_refused() {
        let (mut link, _) = link(CpgConfig::new("g", 1024));
        assert_eq!(link.max_payload(), 1023);
        assert!(link.send(Kind::Records, &[0; 1023], Instant::now()).is_ok());
        assert!(matches!(
            link.send(Kind::Records, &[0; 1024], Instant::now()),
            Err(SendError::TooLarge { len: 1024, max: 1023 })
        ));
        // Cut to what corosync sends whole (the stand-in: 4096 bytes).
        let (link, _) = super::tests::link(CpgConfig::new("g", 1 << 20));
        assert_eq!(link.max_message(), 4096);
    }

    #[test]
    fn own_messages_are_dropped_and_senders_named() {
        let (mut link, script) = link(CpgConfig::new("g", 1024));
        script.borrow_mut().pending = vec![
            Event::Message { from: ME, data: frame(Kind::Heartbeat, b"mine") },
            Event::Message { from: B, data: frame(Kind::Heartbeat, b"b's") },
            // Our node, another process: a member like any other.
            Event::Message { from: Member { nodeid: 1, pid: 101 }, data: frame(Kind::Records, b"r") },
            Event::Message { from: C, data: vec![] },
            Event::Message { from: C, data: vec![42, 0] },
        ];
        let mut got = Vec::new();
        let n = link.receive(Instant::now(), |from, kind, payload| got.push((from, kind, payload.to_vec())));
        assert_eq!(n, 2);
        assert_eq!(
            got,
            [(B, Kind::Heartbeat, b"b's".to_vec()), (Member { nodeid: 1, pid: 101 }, Kind::Records, b"r".to_vec())]
        );
        let s = link.stats();
        assert_eq!((s.received, s.looped_back, s.malformed), (2, 1, 2));
    }

    #[test]
    fn membership_reports_who_appeared_and_left_but_never_us() {
        let (mut link, script) = link(CpgConfig::new("g", 1024));
        // Our own join: the members already there appear.
        script.borrow_mut().pending = vec![members(&[B, ME])];
        link.receive(Instant::now(), |_, _, _| {});
        assert_eq!(link.take_changes(), Changes { joined: vec![B], left: vec![] });
        assert_eq!(link.take_changes(), Changes::default(), "reported once");
        script.borrow_mut().pending = vec![members(&[B, ME, C]), members(&[ME, C])];
        link.receive(Instant::now(), |_, _, _| {});
        assert_eq!(link.take_changes(), Changes { joined: vec![C], left: vec![B] });
        assert_eq!(link.members(), 1);
    }

    #[test]
    fn losing_corosync_gives_up_the_queue_and_joins_again() {
        let (mut link, script) = link(CpgConfig::new("g", 1024));
        let t0 = Instant::now();
        script.borrow_mut().pending = vec![members(&[ME, B, C])];
        link.receive(t0, |_, _, _| {});
        link.take_changes();
        script.borrow_mut().try_again = 1;
        link.send(Kind::Records, b"r", t0).unwrap();
        assert_eq!(link.queued(), 1);
        // The next dispatch finds corosync gone.
        script.borrow_mut().fail = Some(CsError::LIBRARY);
        link.receive(t0, |_, _, _| {});
        assert!(!link.connected());
        assert_eq!(link.fd(), -1, "nothing to poll");
        assert_eq!(link.queued(), 0);
        assert_eq!(link.stats().given_up, 1);
        assert_eq!(link.stats().disconnects, 1);
        assert_eq!(link.take_changes(), Changes { joined: vec![], left: vec![B, C] });
        assert!(matches!(link.send(Kind::Heartbeat, b"h", t0), Err(SendError::Disconnected)));
        assert_eq!(link.stats().given_up, 2);
        assert!(link.ready(), "a lost link does not hold the daemon back");
        // Joining is tried at the deadline, not before; refused once.
        assert_eq!(link.next_deadline(), Some(t0 + RECONNECT_AFTER));
        link.on_timer(t0 + RECONNECT_AFTER / 2);
        assert_eq!(script.borrow().connects, 1);
        script.borrow_mut().refuse = Some(CsError::LIBRARY);
        link.on_timer(t0 + RECONNECT_AFTER);
        assert!(!link.connected());
        assert_eq!(link.next_deadline(), Some(t0 + 2 * RECONNECT_AFTER));
        script.borrow_mut().refuse = None;
        link.on_timer(t0 + 2 * RECONNECT_AFTER);
        assert!(link.connected());
        assert_eq!((script.borrow().connects, link.stats().reconnects), (2, 1));
        // The members, seen again, appear again: the active node sends them everything.
        script.borrow_mut().pending = vec![members(&[ME, B, C])];
        link.receive(t0, |_, _, _| {});
        assert_eq!(link.take_changes(), Changes { joined: vec![B, C], left: vec![] });
        link.send(Kind::Heartbeat, b"h", t0).unwrap();
        assert_eq!(script.borrow().taken.last(), Some(&frame(Kind::Heartbeat, b"h")));
    }

    #[test]
    fn another_error_from_mcast_reconnects() {
        let (mut link, script) = link(CpgConfig::new("g", 1024));
        script.borrow_mut().fail = Some(CsError(9));
        let err = link.send(Kind::Records, b"r", Instant::now()).unwrap_err();
        assert_eq!(err.to_string(), "cpg_mcast_joined: CS_ERR_BAD_HANDLE (9)");
        assert!(!link.connected());
        assert_eq!(link.stats().given_up, 1);
    }
}

/// A flood through a real corosync, to see its flow control: run where
/// corosync serves (its network namespace), for instance
/// `unshare -n sh -c 'ip link set lo up; <start corosync as tests/sync_cpg.rs does>; cargo test -p xfrmsync-tool
/// --release -- --ignored --nocapture bench_cpg'`. `XFRMSYNC_BENCH_COROSYNC_PID`: corosync is stopped
/// (SIGSTOP) for 2 s in the middle, as a blocked ring would hold it.
#[cfg(test)]
mod bench {
    use super::*;

    #[test]
    #[ignore = "a benchmark: needs a running corosync; prints figures"]
    fn bench_cpg_flood() {
        let pid: Option<libc::pid_t> = std::env::var("XFRMSYNC_BENCH_COROSYNC_PID").ok().and_then(|p| p.parse().ok());
        for max_message in [1024, 8192, 65536] {
            let mut link = CpgLink::join(CpgConfig::new("xfrmsync-bench", max_message)).expect("a running corosync");
            let payload = vec![0x5a; link.max_payload()];
            let (mut offered, mut longest_send) = (0u64, Duration::ZERO);
            let start = Instant::now();
            let run = Duration::from_secs(6);
            let mut paused = false;
            while start.elapsed() < run {
                if let Some(pid) = pid {
                    let t = start.elapsed();
                    if !paused && t >= Duration::from_secs(2) && t < Duration::from_secs(4) {
                        // SAFETY: a signal to the corosync named by the caller.
                        unsafe { libc::kill(pid, libc::SIGSTOP) };
                        paused = true;
                    } else if paused && t >= Duration::from_secs(4) {
                        // SAFETY: as above.
                        unsafe { libc::kill(pid, libc::SIGCONT) };
                        paused = false;
                    }
                }
                if !link.ready() {
                    let soon = Instant::now() + Duration::from_millis(10);
                    let until = link.next_deadline().map_or(soon, |d| d.min(soon));
                    crate::sys::wait_readable([link.fd()], Some(until)).unwrap();
                }
                // Our own copies come back: read them, as the daemon does.
                link.receive(Instant::now(), |_, _, _| {});
                link.on_timer(Instant::now());
                while link.ready() && start.elapsed() < run {
                    let before = Instant::now();
                    link.send(Kind::Records, &payload, before).unwrap();
                    longest_send = longest_send.max(before.elapsed());
                    offered += 1;
                    if offered % 64 == 0 {
                        break;
                    }
                }
            }
            if paused {
                // SAFETY: as above.
                unsafe { libc::kill(pid.unwrap(), libc::SIGCONT) };
            }
            let seconds = start.elapsed().as_secs_f64();
            let s = link.stats();
            println!(
                "max_message {max_message}: offered {offered}, taken {} ({:.0} msgs/s, {:.1} MB/s), try again {}, \
                 longest wait in the queue {} ms, longest ring wait {} ms, longest send() call {} us, given up {}, \
                 own copies back {}",
                s.sent,
                s.sent as f64 / seconds,
                s.sent as f64 * link.max_message() as f64 / seconds / 1e6,
                s.try_again,
                link.queue_wait_longest(Instant::now()).as_millis(),
                s.ring_wait_longest.as_millis(),
                longest_send.as_micros(),
                s.given_up,
                s.looped_back
            );
        }
    }
}
