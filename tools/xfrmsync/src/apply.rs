//! `xfrmsync apply FILE`: the rules of a file given to every SA there is,
//! then to each SA as it appears, until SIGTERM or SIGINT; SIGHUP reloads.
//!
//! The library's registry does the work (listing, matching, batched
//! `NEWAE`s with both thresholds in each, so no SA is left with one of
//! them); this loop only feeds it events and signals, and prints what it
//! applied.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use xfrmsync::registry::Applied;
use xfrmsync::{Error, Handle, Registry, Rule};

use crate::{output, rules_file, sys, Failure, Global, Listening, Outcome};

#[derive(clap::Args)]
pub struct Args {
    /// The rules file (TOML, one [[rule]] table per rule)
    #[arg(value_name = "FILE")]
    file: PathBuf,
    /// Apply the rules to the SAs there are, then exit: status 1 if any SA
    /// could not be given its thresholds
    #[arg(long)]
    once: bool,
    /// Only check the file and print its rules in the order they are tried;
    /// no SA is touched
    #[arg(long, conflicts_with = "once")]
    check: bool,
    #[command(flatten)]
    listening: Listening,
}

/// Counts of what the registry applied, shared with its callback.
#[derive(Default)]
struct Tally {
    ok: AtomicUsize,
    failed: AtomicUsize,
}

pub fn run(global: &Global, args: &Args) -> Outcome {
    let file = args.file.display().to_string();
    if args.check {
        let rules = load(&args.file)?;
        output::line(&format!("{file}: {} rules, in the order they are tried:", rules.len()));
        for rule in rules_file::in_order(&rules) {
            output::line(&format!("  {}", describe(&rule)));
        }
        return Ok(());
    }
    // Before any thread starts (the handle's netns helper is one), so that
    // no thread is left where these signals would kill the process.
    let signals = if args.once {
        None
    } else {
        Some(
            sys::Signals::take(&[libc::SIGHUP, libc::SIGTERM, libc::SIGINT])
                .map_err(|e| Failure::new(format!("taking signals: {e}")))?,
        )
    };
    // HZ now (declared, CONFIG_HZ, or a probe in a private namespace; never
    // a live SA), so that every load of the file refuses, with its line, a
    // timer this kernel cannot hold. Without it the check is the
    // conservative one, and the SA being set is the last resort later.
    if let Err(e) = xfrmsync::hz::kernel_hz_without_sa() {
        log::info!("kernel HZ not learnt before reading the rules: {e}");
    }
    let mut rules = load(&args.file)?;
    // Only SA notifications are wanted: without aevents joined the kernel
    // does not generate them for us.
    let registry = Registry::new(global.open_listening(false, &args.listening)?);
    let tally = Arc::new(Tally::default());
    let counts = Arc::clone(&tally);
    registry
        .on_applied(Some(Box::new(move |_: &Handle, applied: &Applied<'_>| report(&counts, applied))))
        .map_err(|e| Failure::new(e.to_string()))?;
    registry
        .set_rules(rules.clone())
        .map_err(|e| Failure::new(format!("{}: applying the rules of {file}: {}", global.where_(), with_hint(&e))))?;
    output::line(&format!(
        "xfrmsync apply: ready: {} rules from {file}; {} SAs in {}, {} given thresholds, {} failed",
        rules.len(),
        registry.tracked_count(),
        global.where_(),
        tally.ok.load(Ordering::Relaxed),
        tally.failed.load(Ordering::Relaxed)
    ));
    let Some(signals) = signals else {
        let failed = tally.failed.load(Ordering::Relaxed);
        return match failed {
            0 => Ok(()),
            n => Err(Failure::new(format!("{n} SAs could not be given their thresholds (see above)"))),
        };
    };

    loop {
        // An owed listing of every SA (one that failed) is the registry's to
        // retry, inside dispatch, once it is due: wake for it.
        let [events, signal] =
            sys::wait_readable([registry.handle().as_raw_fd(), signals.as_raw_fd()], registry.relist_due())
                .map_err(|e| Failure::new(format!("poll: {e}")))?;
        if signal {
            while let Some(s) = signals.next().map_err(|e| Failure::new(format!("reading signals: {e}")))? {
                if s != libc::SIGHUP {
                    output::line(&format!("xfrmsync apply: {}: exiting", sys::signal_name(s)));
                    return Ok(());
                }
                match rules_file::load(&args.file, xfrmsync::timer::kernel_hz()) {
                    Err(report) => {
                        eprintln!(
                            "xfrmsync apply: SIGHUP: {file} refused; the {} rules in force stay in force:",
                            rules.len()
                        );
                        eprintln!("{report}");
                    }
                    Ok(new) => {
                        output::line(&format!("xfrmsync apply: SIGHUP: {} rules from {file}", new.len()));
                        rules = new;
                        if let Err(e) = registry.set_rules(rules.clone()) {
                            relist_failed(&registry, &e, global);
                        }
                        output::line(&format!("xfrmsync apply: reloaded: {} rules in force", rules.len()));
                    }
                }
            }
        }
        let relist_due = registry.relist_due().is_some_and(|t| Instant::now() >= t);
        if events || relist_due {
            match registry.dispatch() {
                Ok(_) => {}
                // The registry lists every SA again, a step per call, from
                // the next call on (relist_due says now meanwhile).
                Err(Error::EventsLost) => {
                    eprintln!("xfrmsync apply: SA notifications were lost; every SA is being listed again")
                }
                Err(e) => relist_failed(&registry, &e, global),
            }
        }
    }
}

fn load(path: &Path) -> Result<Vec<Rule>, Failure> {
    // With HZ known (--kernel-hz, or measured on an earlier reload), timers
    // that HZ cannot hold are refused with their line too.
    rules_file::load(path, xfrmsync::timer::kernel_hz()).map_err(Failure::new)
}

/// A failure of the registry's work: the rules stay in force for new SAs,
/// and an owed listing is retried by the registry itself, with backoff.
fn relist_failed(registry: &Registry, e: &Error, global: &Global) {
    match registry.relist_due() {
        Some(_) => eprintln!(
            "xfrmsync apply: {}: applying the rules to every SA: {}; trying again in {} (attempt {} failed)",
            global.where_(),
            with_hint(e),
            wait_text(registry),
            registry.relist_failures()
        ),
        None => eprintln!("xfrmsync apply: {}: {}", global.where_(), with_hint(e)),
    }
}

fn wait_text(registry: &Registry) -> String {
    let wait = registry.relist_due().map_or(Duration::ZERO, |t| t.saturating_duration_since(Instant::now()));
    format!("{:.1} s", wait.as_secs_f64())
}

fn with_hint(e: &Error) -> String {
    if xfrmsync::timer::kernel_hz().is_none() && e.to_string().contains("HZ") {
        format!("{e} (--kernel-hz HZ skips measuring it)")
    } else {
        e.to_string()
    }
}

fn report(tally: &Tally, applied: &Applied<'_>) {
    let t = applied.thresholds;
    match applied.result {
        Ok(()) => {
            tally.ok.fetch_add(1, Ordering::Relaxed);
            output::line(&format!(
                "applied replay-threshold {} timer {} ms to {}{}",
                t.replay_packets,
                t.timer_ms,
                applied.sa,
                by_rule(applied)
            ));
        }
        Err(e) => {
            tally.failed.fetch_add(1, Ordering::Relaxed);
            eprintln!(
                "xfrmsync: {}: replay-threshold {} timer {} ms{} not applied: {e}",
                applied.sa,
                t.replay_packets,
                t.timer_ms,
                by_rule(applied)
            );
        }
    }
}

fn by_rule(applied: &Applied<'_>) -> String {
    applied.rule.map(|name| format!(" by rule {name}")).unwrap_or_default()
}

fn describe(rule: &Rule) -> String {
    format!(
        "{}: {} -> replay-threshold {} timer {} ms",
        rule.name,
        rules_file::describe(&rule.matches),
        rule.thresholds.replay_packets,
        rule.thresholds.timer_ms
    )
}
