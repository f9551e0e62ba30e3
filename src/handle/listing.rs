//! Listing every SA in steps: a `GETSA` dump on a socket of its own, read a
//! few datagrams a call, so that a caller's loop (the registry's dispatch
//! after lost notifications) is never held for a dump as long as the SA
//! table. The kernel makes each part of a dump when the part before it has
//! been read, so a step costs what its datagrams hold, at most.

use std::time::Instant;

use netlink_sys::Socket;

use super::{dump_interrupted, kernel_answer, send, Handle, REQUEST_BUFFER};
use crate::error::{Error, Result};
use crate::wire::{self, Messages, SaInfo, Sender};

const OPERATION: &str = "XFRM_MSG_GETSA dump (in steps)";

/// The listing socket and the dump on it, if one runs.
pub(crate) struct Listing {
    socket: Socket,
    buf: Vec<u8>,
    out: Vec<u8>,
    seq: u32,
    running: Option<Running>,
    /// A dump abandoned before its end (a timeout, a bad message) that the
    /// kernel may still be running: the next start reads it to its end
    /// first, or the kernel refuses the new one with EBUSY.
    abandoned: Option<u32>,
}

struct Running {
    seq: u32,
    /// When the kernel last sent a part: a listing that stalls for a
    /// request timeout is given up.
    progress: Instant,
    /// The kernel marked a part `NLM_F_DUMP_INTR`: its list changed.
    interrupted: bool,
}

/// Where a listing is after a step.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ListingStep {
    /// More datagrams to read: call again.
    More,
    /// The kernel's `NLMSG_DONE` came: every SA was listed.
    Done,
}

impl Listing {
    pub(crate) fn new(socket: Socket) -> Listing {
        Listing {
            socket,
            buf: vec![0; REQUEST_BUFFER],
            out: Vec::with_capacity(64),
            seq: 0,
            running: None,
            abandoned: None,
        }
    }

    /// Reads what a dump left running sends, without waiting, up to its end.
    fn finish_abandoned(&mut self) {
        let Some(seq) = self.abandoned else { return };
        loop {
            let mut window = &mut self.buf[..];
            match self.socket.recv_from(&mut window, libc::MSG_DONTWAIT) {
                Ok((size, _)) => {
                    let ended = Messages::new(&self.buf[..size.min(self.buf.len())])
                        .flatten()
                        .any(|m| m.seq == seq && matches!(m.kind, wire::NLMSG_DONE | wire::NLMSG_ERROR));
                    if ended {
                        self.abandoned = None;
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                // Not over yet: the new dump meets EBUSY, and is owed again.
                Err(_) => return,
            }
        }
    }
}

impl Handle {
    /// Whether this handle lists in steps ([`Handle::start_listing`]): a
    /// handle on a test's socket pair may have no listing socket.
    pub fn lists_in_steps(&self) -> bool {
        self.listing.is_some()
    }

    /// Starts listing every SA (a `GETSA` dump) on the handle's listing
    /// socket, to be read by [`Handle::listing_step`]. [`Error::Busy`] if
    /// one runs; [`Error::InvalidArgument`] without a listing socket.
    pub fn start_listing(&self) -> Result<()> {
        let listing = self.listing.as_ref().ok_or_else(|| Error::invalid("this handle has no listing socket"))?;
        let mut listing = listing.try_borrow_mut().map_err(|_| Error::Busy("the listing socket is in use"))?;
        if listing.running.is_some() {
            return Err(Error::Busy("a listing runs already"));
        }
        listing.finish_abandoned();
        listing.seq = listing.seq.wrapping_add(1).max(1);
        let seq = listing.seq;
        wire::encode_getsa_dump(&mut listing.out, Sender { seq, port_id: 0 });
        send(&listing.socket, &listing.out, OPERATION)?;
        listing.running = Some(Running { seq, progress: Instant::now(), interrupted: false });
        Ok(())
    }

    /// Reads at most `datagrams` datagrams of the running listing without
    /// waiting, handing each SA to `each`. [`ListingStep::Done`] when the
    /// kernel's end came; then, or on an error, the listing is over. A
    /// listing whose list changed while it ran (`NLM_F_DUMP_INTR`) ends
    /// with `EINTR`; one that stalls for the request timeout with
    /// [`Error::TimedOut`].
    pub fn listing_step(&self, datagrams: usize, mut each: impl FnMut(&SaInfo)) -> Result<ListingStep> {
        let listing = self.listing.as_ref().ok_or_else(|| Error::invalid("this handle has no listing socket"))?;
        let mut listing = listing.try_borrow_mut().map_err(|_| Error::Busy("the listing socket is in use"))?;
        let Some(mut running) = listing.running.take() else {
            return Err(Error::invalid("no listing runs"));
        };
        let outcome = step(&mut listing, &mut running, datagrams, self.request_timeout, &mut each);
        match outcome {
            Ok(ListingStep::More) => listing.running = Some(running),
            Ok(ListingStep::Done) => {}
            Err(_) => listing.abandoned = Some(running.seq),
        }
        outcome
    }
}

fn step(
    listing: &mut Listing,
    running: &mut Running,
    datagrams: usize,
    timeout: std::time::Duration,
    each: &mut dyn FnMut(&SaInfo),
) -> Result<ListingStep> {
    for _ in 0..datagrams {
        let mut window = &mut listing.buf[..];
        let (size, from) = match listing.socket.recv_from(&mut window, libc::MSG_TRUNC | libc::MSG_DONTWAIT) {
            Ok(r) => r,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if running.progress.elapsed() >= timeout {
                    return Err(Error::TimedOut(OPERATION));
                }
                return Ok(ListingStep::More);
            }
            Err(e) => return Err(Error::from_io(OPERATION, &e)),
        };
        if from.port_number() != 0 {
            continue;
        }
        if size > listing.buf.len() {
            return Err(Error::Truncated { size, buffer: listing.buf.len() });
        }
        running.progress = Instant::now();
        for msg in Messages::new(&listing.buf[..size]) {
            let msg = msg?;
            if msg.seq != running.seq {
                continue;
            }
            running.interrupted |= msg.flags & wire::NLM_F_DUMP_INTR != 0;
            match msg.kind {
                wire::NLMSG_DONE if running.interrupted => return Err(dump_interrupted(OPERATION)),
                wire::NLMSG_DONE => return Ok(ListingStep::Done),
                wire::NLMSG_ERROR => {
                    kernel_answer(OPERATION, &msg)?;
                    return Ok(ListingStep::Done);
                }
                wire::XFRM_MSG_NEWSA => each(&wire::decode_sa_message(&msg)?),
                _ => {}
            }
        }
    }
    Ok(ListingStep::More)
}
