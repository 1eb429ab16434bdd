//! What the core asks the [`planner`] for one pending model, and what it
//! learns from GPU readings.
//!
//! The planner's inputs are built here from the slots: residents for
//! groups and `max_loaded` ([`rules`]), GPU rooms and occupants for memory
//! ([`placement`]), and its answers turned into a [`Decision`]. A GPU
//! reading ([`GpuView::reading`]) measures every loaded model's process tree
//! (the shell works the trees out from /proc and hands them in with the
//! reading) and is what placement goes by.
//!
//! Invariant: a model is placed only by a reading taken after it began to
//! wait (`pending_reading`), in which no child that went away is still
//! listed (`gone`), so its memory is not counted twice or missed.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::core::Effect;
use super::planner::{mib, place, plan, Occupant, Placement, Plan, Resident, Room, Rule};
use super::slot::{Phase, Slot};
use super::{AcquireError, PinReason};
use crate::events::Event;
use crate::gpu::Snapshot;

/// How long a child that went away may still be listed in GPU readings
/// before placement stops waiting for it to vanish (a process the driver
/// keeps listing, say).
const GONE_LISTED_AT_MOST: Duration = Duration::from_secs(10);
/// How long placement waits for the sampler's first reading (it samples
/// at once on start) before starting models unplaced.
pub(super) const FIRST_READING_AT_MOST: Duration = Duration::from_secs(5);

/// What the core does for one pending model.
#[derive(Debug)]
pub(super) enum Decision {
    Start,
    /// Start it on this GPU.
    StartOn(u32),
    /// Retire these first (none: wait).
    Evict(Vec<Arc<str>>),
    /// Fail its waiters: only evicting pinned models would make room, or
    /// it never fits.
    Blocked(AcquireError),
}

/// A GPU reading as the core takes it: the snapshot, and the memory each
/// loaded child's process tree holds in it, per GPU (by the child's pid;
/// the shell reads the trees from /proc).
#[derive(Debug, Clone, Default)]
pub(crate) struct Reading {
    pub(crate) snapshot: Option<Arc<Snapshot>>,
    pub(crate) trees: HashMap<u32, Vec<(u32, u64)>>,
}

/// The GPU readings the core places by.
#[derive(Debug, Default)]
pub(super) struct GpuView {
    /// The last reading (none without NVML).
    pub(super) snapshot: Option<Arc<Snapshot>>,
    /// Readings received so far.
    pub(super) count: u64,
    /// Children that went away while readings exist, with when: their
    /// memory shows in readings (one may have been under way as they
    /// went) until one no longer lists them, so placement waits for that.
    pub(super) gone: Vec<(u32, Instant)>,
    /// GPU readings are expected (NVML loaded) but none has come yet:
    /// nothing is placed until the first, or until then at most. A model
    /// started before it would go unplaced, its GPU unknown to its gate
    /// (and so to its first requests' history rows) until measured.
    pub(super) first_due: Option<Instant>,
}

impl GpuView {
    /// Whether GPU readings exist (and so are worth refreshing).
    pub(super) fn present(&self) -> bool {
        self.snapshot.is_some()
    }

    /// Whether readings exist or the first is awaited: worth a refresh.
    pub(super) fn expected(&self) -> bool {
        self.present() || self.first_due.is_some()
    }

    /// A child (`pid`) went away: placement waits until a reading no
    /// longer lists it. True if a fresh reading should be asked for.
    pub(super) fn child_gone(&mut self, pid: Option<u32>, now: Instant) -> bool {
        match (pid, self.present()) {
            (Some(pid), true) => {
                self.gone.push((pid, now));
                true
            }
            _ => false,
        }
    }

    /// Takes a new reading: each loaded model's use is taken from it; a
    /// model using more than its `vram_mb` is warned about once a run.
    pub(super) fn reading(
        &mut self,
        reading: Reading,
        slots: &mut HashMap<Arc<str>, Slot>,
        now: Instant,
        out: &mut Vec<Effect>,
    ) {
        self.count += 1;
        self.first_due = None;
        self.snapshot = reading.snapshot;
        let Some(snap) = self.snapshot.clone() else {
            return;
        };
        self.gone.retain(|(pid, since)| {
            now.saturating_duration_since(*since) < GONE_LISTED_AT_MOST
                && snap.processes.iter().any(|p| p.pid == *pid)
        });
        for (name, slot) in slots.iter_mut() {
            let Some(pid) = slot.pid.filter(|_| slot.phase.is_loaded()) else {
                continue;
            };
            let usage = reading.trees.get(&pid).map_or(&[][..], Vec::as_slice);
            measure(name, slot, usage, out);
        }
    }
}

/// One loaded model's use in a reading (`usage`: per GPU, of its tree).
fn measure(name: &Arc<str>, slot: &mut Slot, usage: &[(u32, u64)], out: &mut Vec<Effect>) {
    let total: u64 = usage.iter().map(|(_, b)| b).sum();
    if slot.gpu.is_none() {
        slot.gpu = usage.iter().max_by_key(|(_, b)| *b).map(|(g, _)| *g);
        if slot.has_gate {
            out.push(Effect::SetGateGpu {
                model: name.clone(),
                gpu: slot.gpu,
            });
        }
    }
    if slot.phase == Phase::Ready {
        slot.measured_ready = true;
    }
    if slot.vram_now != total {
        out.push(Effect::Emit(Event::Vram {
            model: name.clone(),
            gpu: slot.gpu,
            bytes: total,
        }));
    }
    slot.vram_now = total;
    slot.vram_peak = slot.vram_peak.max(total);
    if let Some(declared) = slot.config.vram_bytes {
        if total > declared && !slot.warned_over {
            slot.warned_over = true;
            tracing::warn!(model = %name, measured_mib = mib(total),
                vram_mb = mib(declared),
                "model uses more GPU memory than its vram_mb declares; raise vram_mb or leave it out to use the measurement");
        }
    }
}

/// What groups and `max_loaded` say of starting `name` now.
pub(super) fn rules(
    slots: &HashMap<Arc<str>, Slot>,
    name: &Arc<str>,
    max_loaded: usize,
) -> Decision {
    let group = slots.get(name).and_then(|s| s.config.group.as_deref());
    let loaded: Vec<Resident<'_>> = slots
        .iter()
        .filter(|(_, s)| s.phase.is_loaded())
        .map(|(n, s)| Resident {
            name: n,
            group: s.config.group.as_deref(),
            ready: s.phase == Phase::Ready,
            leaving: matches!(s.phase, Phase::Draining | Phase::Stopping),
            busy: s.in_use(),
            pinned: s.config.pin,
            last_used: s.last_used,
        })
        .collect();
    match plan(group, &loaded, max_loaded) {
        Plan::Start => Decision::Start,
        Plan::Wait => Decision::Evict(Vec::new()),
        Plan::Evict(names) => Decision::Evict(names.into_iter().map(Arc::<str>::from).collect()),
        Plan::Blocked { pinned, rule } => {
            let mut pinned: Vec<String> = pinned.into_iter().map(str::to_string).collect();
            pinned.sort();
            Decision::Blocked(AcquireError::Pinned {
                model: name.to_string(),
                pinned,
                why: match rule {
                    Rule::Group(g) => PinReason::Group(g.to_string()),
                    Rule::MaxLoaded(n) => PinReason::MaxLoaded(n),
                },
            })
        }
    }
}

/// Where `name` goes by GPU memory, once the rules let it start: with
/// no GPU readings, or no need known, anywhere (no placement).
pub(super) fn placement(
    gpus: &GpuView,
    slots: &HashMap<Arc<str>, Slot>,
    name: &Arc<str>,
    reserve: u64,
) -> Decision {
    if gpus.snapshot.is_none() && gpus.first_due.is_some() {
        return Decision::Evict(Vec::new());
    }
    let (Some(snap), Some(slot)) = (&gpus.snapshot, slots.get(name)) else {
        return Decision::Start;
    };
    if snap.gpus.is_empty() {
        return Decision::Start;
    }
    let need = match slot.vram_need() {
        Some((0, _)) => return Decision::Start,
        Some((need, _)) => need,
        // Its estimate is still being worked out: Estimated follows.
        None if slot.estimate.is_none() => return Decision::Evict(Vec::new()),
        None => return Decision::Start,
    };
    // Placed by a reading taken after it began to wait, in which no
    // child that went away still holds memory.
    if gpus.count <= slot.pending_reading || !gpus.gone.is_empty() {
        return Decision::Evict(Vec::new());
    }
    let rooms: Vec<Room> = snap
        .gpus
        .iter()
        .map(|g| Room {
            gpu: g.index,
            total: g.total_bytes,
            used: g.used_bytes,
        })
        .collect();
    let occupants: Vec<Occupant<'_>> = slots
        .iter()
        .filter(|(n, s)| *n != name && s.phase.is_loaded())
        .filter_map(|(n, s)| occupant(n, s))
        .collect();
    let allowed = slot.allowed_gpus();
    match place(need, allowed.as_deref(), &rooms, &occupants, reserve) {
        Placement::On(gpu) => Decision::StartOn(gpu),
        Placement::Evict(names) => {
            Decision::Evict(names.into_iter().map(Arc::<str>::from).collect())
        }
        Placement::Wait => Decision::Evict(Vec::new()),
        Placement::NeverFits(detail) => Decision::Blocked(AcquireError::NoRoom {
            model: name.to_string(),
            detail,
        }),
    }
}

/// A loaded model with a known GPU as placement sees it: a model still
/// loading (or not yet measured since its Ready) is taken to hold its
/// whole need.
fn occupant<'a>(name: &'a str, s: &Slot) -> Option<Occupant<'a>> {
    let gpu = s.gpu?;
    let loading = s.phase == Phase::Starting || (s.phase == Phase::Ready && !s.measured_ready);
    let promised = if loading {
        s.vram_need()
            .map_or(0, |(need, _)| need.saturating_sub(s.vram_now))
    } else {
        0
    };
    Some(Occupant {
        name,
        gpu,
        measured: s.vram_now,
        promised,
        ready: s.phase == Phase::Ready,
        leaving: matches!(s.phase, Phase::Draining | Phase::Stopping),
        busy: s.in_use(),
        pinned: s.config.pin,
        last_used: s.last_used,
    })
}

/// One more model to evict after `model` ran out of memory while
/// starting: the least recently used idle, unpinned, ready one, on the
/// GPU it was placed on if it was.
pub(super) fn oom_victim(
    slots: &HashMap<Arc<str>, Slot>,
    model: &str,
    gpu: Option<u32>,
) -> Option<Arc<str>> {
    slots
        .iter()
        .filter(|(n, s)| {
            &***n != model
                && s.phase == Phase::Ready
                && !s.config.pin
                && !s.in_use()
                && (gpu.is_none() || s.gpu == gpu)
        })
        .min_by_key(|(_, s)| s.last_used)
        .map(|(n, _)| n.clone())
}
