//! `xfrmsync monitor`: aevents as they come, optionally only those of some
//! SAs or of the SAs one rule governs.

use std::collections::HashMap;
use std::net::IpAddr;
use std::os::fd::AsRawFd;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use xfrmsync::registry::{Direction, RuleSet, SaFacts, Source};
use xfrmsync::wire::SaInfo;
use xfrmsync::{Aevent, Error, Handle, SaChange, SaId, SaNotice};

use crate::{output, parse, rules_file, sys, Failure, Global, Listening, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// Print JSON lines (every bitmap word; "esn_flag", "replay_form" and
    /// "seq_bits" as in `get --json`)
    #[arg(long)]
    json: bool,
    /// Only events of this SA (any protocol and mark); may be given again
    #[arg(long, num_args = 2, value_names = ["DST", "SPI"], action = clap::ArgAction::Append)]
    sa: Vec<String>,
    /// The rules file --rule is read from
    #[arg(long, value_name = "FILE", requires = "rule")]
    rule_file: Option<PathBuf>,
    /// Only events of SAs this rule governs: those `apply` with the same
    /// file gives this rule's thresholds (the most specific rule wins)
    #[arg(long, value_name = "NAME", requires = "rule_file")]
    rule: Option<String>,
    /// Stop after this many seconds
    #[arg(long, value_name = "N")]
    seconds: Option<u64>,
    /// Stop after printing this many events
    #[arg(long, value_name = "N")]
    count: Option<u64>,
    #[command(flatten)]
    listening: Listening,
}

/// What the printing callback needs; shared with the SA notifications,
/// which keep it current. Both run on this thread, inside dispatch.
struct State {
    json: bool,
    sas: Vec<(IpAddr, u32)>,
    rule: Option<(RuleSet, String)>,
    local: Vec<IpAddr>,
    /// ESN flag and direction of each SA seen, from the dump at the start
    /// and the SA notifications after it. Keyed by what the kernel's lookup
    /// uses, so that an event finds its SA whatever mark or interface id
    /// attributes either message carried.
    known: HashMap<Key, (bool, Option<u8>)>,
    printed: u64,
    /// --count: one dispatch may read more events than are still wanted.
    limit: Option<u64>,
}

type Key = (IpAddr, u32, u8);

fn key(sa: &SaId) -> Key {
    (sa.daddr, sa.spi, sa.proto)
}

impl State {
    fn learn(&mut self, info: &SaInfo) {
        self.known.insert(key(&info.sa), (info.esn(), info.direction));
    }

    fn wanted(&self, ev: &Aevent) -> bool {
        if !self.sas.is_empty() && !self.sas.iter().any(|(dst, spi)| *dst == ev.sa.daddr && *spi == ev.sa.spi) {
            return false;
        }
        let Some((rules, name)) = &self.rule else { return true };
        let direction_attr = self.known.get(&key(&ev.sa)).and_then(|k| k.1);
        let facts = SaFacts {
            sa: ev.sa,
            saddr: Some(ev.saddr),
            reqid: ev.reqid,
            direction: Direction::of_sa(direction_attr, Some(ev.saddr), ev.sa.daddr, &self.local),
        };
        matches!(rules.resolve(&facts), Some((Source::Rule(r), _)) if r == name)
    }

    fn done(&self) -> bool {
        self.limit.is_some_and(|n| self.printed >= n)
    }

    fn print(&mut self, ev: &Aevent) {
        if self.done() || !self.wanted(ev) {
            return;
        }
        let esn = self.known.get(&key(&ev.sa)).map(|k| k.0);
        if self.json {
            output::line(&output::json(ev, esn));
        } else {
            output::line(&output::event_line(ev, esn));
        }
        self.printed += 1;
    }
}

fn sa_filters(words: &[String]) -> Result<Vec<(IpAddr, u32)>, Failure> {
    words
        .chunks(2)
        .map(|pair| {
            let dst = pair[0].parse().map_err(|_| Failure::usage(format!("--sa: '{}' is not an address", pair[0])))?;
            let spi = parse::u32_any(&pair[1]).map_err(|e| Failure::usage(format!("--sa: SPI {e}")))?;
            Ok((dst, spi))
        })
        .collect()
}

pub fn run(global: &Global, args: &Args) -> Outcome {
    let sas = sa_filters(&args.sa)?;
    let rule = match (&args.rule_file, &args.rule) {
        (Some(file), Some(name)) => {
            let rules = rules_file::load(file, xfrmsync::timer::kernel_hz()).map_err(Failure::new)?;
            if !rules.iter().any(|r| &r.name == name) {
                return Err(Failure::new(format!("{}: no rule named '{name}'", file.display())));
            }
            let mut set = RuleSet::new();
            set.replace_rules(rules);
            Some((set, name.clone()))
        }
        _ => None,
    };
    // Before any thread starts (the handle's netns helper is one).
    // SIGHUP keeps its default action (or nohup's SIG_IGN).
    let signals =
        sys::Signals::take(&[libc::SIGINT, libc::SIGTERM]).map_err(|e| Failure::new(format!("taking signals: {e}")))?;
    let handle = global.open_listening(true, &args.listening)?;
    let local = if rule.as_ref().is_some_and(|(set, _)| set.needs_direction()) {
        handle
            .local_addresses()
            .map_err(|e| Failure::new(format!("{}: listing local addresses: {e}", global.where_())))?
    } else {
        Vec::new()
    };
    let state = Arc::new(Mutex::new(State {
        json: args.json,
        sas,
        rule,
        local,
        known: HashMap::new(),
        printed: 0,
        limit: args.count,
    }));
    // Joined before the dump, so no SA falls between the two.
    handle.watch_sas(true).map_err(|e| Failure::new(format!("{}: {e}", global.where_())))?;
    {
        let mut s = lock(&state);
        handle
            .dump_sas(|info| s.learn(info))
            .map_err(|e| Failure::new(format!("{}: listing SAs: {e}", global.where_())))?;
    }
    let printer = Arc::clone(&state);
    handle
        .on_event(Some(Box::new(move |_: &Handle, ev: &Aevent| lock(&printer).print(ev))))
        .map_err(|e| Failure::new(e.to_string()))?;

    let until = sys::deadline(args.seconds);
    loop {
        if lock(&state).done() {
            return Ok(());
        }
        let [events, signal] = sys::wait_readable([handle.as_raw_fd(), signals.as_raw_fd()], until)
            .map_err(|e| Failure::new(format!("poll: {e}")))?;
        if !events && !signal {
            return Ok(()); // --seconds passed
        }
        if signal && signals.next().map_err(|e| Failure::new(format!("reading signals: {e}")))?.is_some() {
            return Ok(());
        }
        if events {
            let dispatched = handle.dispatch_with(&mut |_: &Handle, notice: &SaNotice| {
                let mut s = lock(&state);
                match notice.change {
                    SaChange::New | SaChange::Updated => s.learn(&notice.info),
                    SaChange::Deleted | SaChange::Expired { hard: true } => {
                        s.known.remove(&key(&notice.info.sa));
                    }
                    SaChange::Expired { hard: false } => {}
                }
            });
            match dispatched {
                Ok(_) => {}
                Err(Error::EventsLost) => {
                    eprintln!(
                        "xfrmsync: monitor: the kernel dropped events (receive buffer full); some are missing above"
                    );
                    // SA notifications may be among them: list the SAs again.
                    let mut s = lock(&state);
                    if let Err(e) = handle.dump_sas(|info| s.learn(info)) {
                        eprintln!("xfrmsync: monitor: listing SAs again: {e}");
                    }
                }
                Err(e) => eprintln!("xfrmsync: monitor: {e}"),
            }
        }
    }
}

/// The state, even after a panic elsewhere poisoned the lock: printing goes
/// on with what is there.
fn lock(state: &Mutex<State>) -> std::sync::MutexGuard<'_, State> {
    state.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}
