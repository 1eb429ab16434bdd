//! Eviction and placement as pure functions: given the models that hold a
//! place, the limits and the GPU readings, which must go before a pending
//! model may start, and on which GPU it goes. The core applies the answer;
//! nothing here has effects, so every rule is a unit test.
//!
//! Two rules, applied in turn by the core: [`plan`] (groups and
//! `max_loaded`) and then, for a model that needs GPU memory while GPU
//! readings exist, [`place`] (measured free memory per GPU, less the
//! reserve and what starting models have been promised).
//!
//! Pinned residents are never chosen. When the start needs a pinned one
//! gone (it shares the group, or too few unpinned places can be freed
//! under `max_loaded`), the answer is [`Plan::Blocked`]: waiting would not
//! help, because nothing but an operator frees that place.

use std::time::Instant;

/// A loaded model as the eviction planner sees it.
#[derive(Debug, Clone)]
pub struct Resident<'a> {
    pub name: &'a str,
    pub group: Option<&'a str>,
    /// Ready and accepting requests (only these can be chosen to go).
    pub ready: bool,
    /// Already draining or stopping.
    pub leaving: bool,
    pub busy: bool,
    /// `pin = true`: never evicted.
    pub pinned: bool,
    pub last_used: Instant,
}

/// Which rule a [`Plan::Blocked`] start runs into.
#[derive(Debug, PartialEq, Eq)]
pub enum Rule<'a> {
    Group(&'a str),
    MaxLoaded(usize),
}

/// What a pending model needs before it can start.
#[derive(Debug, PartialEq, Eq)]
pub enum Plan<'a> {
    Start,
    /// Drain and stop these first, then ask again.
    Evict(Vec<&'a str>),
    /// Nothing can be evicted yet (models still starting or leaving).
    Wait,
    /// Only evicting these pinned models would make room.
    Blocked {
        pinned: Vec<&'a str>,
        rule: Rule<'a>,
    },
}

/// Decides whether a model of `group` can start beside `loaded`, or which
/// residents must go first: every ready model of the same group, and then
/// as many least recently used ready models as `max_loaded` requires, idle
/// ones before busy ones; pinned ones never.
pub fn plan<'a>(group: Option<&'a str>, loaded: &[Resident<'a>], max_loaded: usize) -> Plan<'a> {
    let same_group = |r: &Resident<'_>| group.is_some() && r.group == group;
    if loaded.len() < max_loaded && !loaded.iter().any(same_group) {
        return Plan::Start;
    }
    // A pinned resident that is not already leaving stays.
    let pinned_staying = |r: &&Resident<'a>| r.pinned && !r.leaving;
    let pinned_peers: Vec<&'a str> = loaded
        .iter()
        .filter(|r| same_group(r))
        .filter(pinned_staying)
        .map(|r| r.name)
        .collect();
    if let (false, Some(g)) = (pinned_peers.is_empty(), group) {
        return Plan::Blocked {
            pinned: pinned_peers,
            rule: Rule::Group(g),
        };
    }
    let mut evict: Vec<&Resident<'a>> = loaded
        .iter()
        .filter(|r| same_group(r) && r.ready && !r.leaving)
        .collect();
    let staying = loaded
        .iter()
        .filter(|r| !r.leaving && !same_group(r))
        .count();
    let excess = (staying + 1).saturating_sub(max_loaded);
    let pinned_others: Vec<&'a str> = loaded
        .iter()
        .filter(|r| !same_group(r))
        .filter(pinned_staying)
        .map(|r| r.name)
        .collect();
    if staying.saturating_sub(pinned_others.len()) < excess {
        return Plan::Blocked {
            pinned: pinned_others,
            rule: Rule::MaxLoaded(max_loaded),
        };
    }
    let mut candidates: Vec<&Resident<'a>> = loaded
        .iter()
        .filter(|r| r.ready && !r.leaving && !r.pinned && !same_group(r))
        .collect();
    candidates.sort_by_key(|r| (r.busy, r.last_used));
    evict.extend(candidates.into_iter().take(excess));
    if evict.is_empty() {
        Plan::Wait
    } else {
        Plan::Evict(evict.into_iter().map(|r| r.name).collect())
    }
}

/// One GPU as [`place`] sees it: its last reading.
#[derive(Debug, Clone)]
pub struct Room {
    pub gpu: u32,
    pub total: u64,
    /// In use by every process on it, as last read.
    pub used: u64,
}

/// A model's child that holds GPU memory, or has been promised some.
#[derive(Debug, Clone)]
pub struct Occupant<'a> {
    pub name: &'a str,
    pub gpu: u32,
    /// What it was measured to use in the last reading.
    pub measured: u64,
    /// What it will take beyond `measured` (a model still loading: its
    /// need less what it has allocated so far); 0 once loaded.
    pub promised: u64,
    pub ready: bool,
    /// Already draining or stopping: its memory is on its way back.
    pub leaving: bool,
    pub busy: bool,
    pub pinned: bool,
    pub last_used: Instant,
}

impl Occupant<'_> {
    /// What its going gives back.
    fn holds(&self) -> u64 {
        self.measured + self.promised
    }

    fn evictable(&self) -> bool {
        self.ready && !self.leaving && !self.pinned
    }
}

/// Where a model that needs GPU memory goes.
#[derive(Debug, PartialEq, Eq)]
pub enum Placement<'a> {
    /// Start it on this GPU.
    On(u32),
    /// Drain and stop these first (all on one GPU), then ask again.
    Evict(Vec<&'a str>),
    /// Memory is on its way back (models leaving) or will become
    /// evictable (models still starting): ask again when that changes.
    Wait,
    /// It cannot fit even with every unpinned model gone: why, in numbers.
    NeverFits(String),
}

/// Chooses a GPU for a model that needs `need` bytes, on one of `allowed`
/// (all when `None`), keeping `reserve` free on each: the fullest GPU it
/// fits on as things are (so larger holes stay for larger models); else
/// the GPU where evicting ready, unpinned models frees enough, idle before
/// busy and least recently used first, with the fewest busy and then the
/// fewest victims; else wait while memory is coming back; else it never
/// fits, and the answer says what occupies each GPU.
pub fn place<'a>(
    need: u64,
    allowed: Option<&[u32]>,
    rooms: &[Room],
    occupants: &[Occupant<'a>],
    reserve: u64,
) -> Placement<'a> {
    let rooms: Vec<&Room> = rooms
        .iter()
        .filter(|r| allowed.is_none_or(|a| a.contains(&r.gpu)))
        .collect();
    if rooms.is_empty() {
        return Placement::NeverFits(match allowed {
            Some(a) => format!(
                "none of its GPUs ({}) is present",
                a.iter().map(u32::to_string).collect::<Vec<_>>().join(", ")
            ),
            None => "no GPU is present".into(),
        });
    }
    let gpus = Gpus { occupants, reserve };
    let need_i = i128::from(need);
    if let Some(r) = rooms
        .iter()
        .filter(|r| gpus.free(r) >= need_i)
        .min_by_key(|r| (gpus.free(r), r.gpu))
    {
        return Placement::On(r.gpu);
    }
    if rooms
        .iter()
        .any(|r| gpus.free(r) + gpus.coming_back(r) >= need_i)
    {
        return Placement::Wait;
    }
    if let Some(victims) = gpus.fewest_victims(&rooms, need_i) {
        return Placement::Evict(victims);
    }
    // Could it fit once every unpinned model has gone? Then what blocks it
    // is still starting: wait.
    if rooms.iter().any(|r| gpus.capacity(r) >= need_i) {
        return Placement::Wait;
    }
    Placement::NeverFits(format!(
        "needs {} MiB of GPU memory; {}",
        mib(need),
        rooms
            .iter()
            .map(|r| gpus.describe(r))
            .collect::<Vec<_>>()
            .join("; ")
    ))
}

/// The occupants and the reserve, asked about one GPU at a time.
struct Gpus<'o, 'a> {
    occupants: &'o [Occupant<'a>],
    reserve: u64,
}

impl<'o, 'a> Gpus<'o, 'a> {
    fn on(&self, gpu: u32) -> impl Iterator<Item = &'o Occupant<'a>> + '_ {
        self.occupants.iter().filter(move |o| o.gpu == gpu)
    }

    /// Free now, less the reserve and what starting models will still take.
    fn free(&self, r: &Room) -> i128 {
        let promised: u64 = self.on(r.gpu).map(|o| o.promised).sum();
        i128::from(r.total) - i128::from(self.reserve) - i128::from(r.used) - i128::from(promised)
    }

    /// What models already leaving will give back.
    fn coming_back(&self, r: &Room) -> i128 {
        self.on(r.gpu)
            .filter(|o| o.leaving)
            .map(|o| i128::from(o.holds()))
            .sum()
    }

    /// Memory held by processes that are none of ours.
    fn foreign(&self, r: &Room) -> u64 {
        let ours: u64 = self.on(r.gpu).map(|o| o.measured).sum();
        r.used.saturating_sub(ours)
    }

    /// What it would have with every unpinned model gone.
    fn capacity(&self, r: &Room) -> i128 {
        let pinned: u64 = self
            .on(r.gpu)
            .filter(|o| o.pinned && !o.leaving)
            .map(Occupant::holds)
            .sum();
        i128::from(r.total)
            - i128::from(self.reserve)
            - i128::from(self.foreign(r))
            - i128::from(pinned)
    }

    /// The GPU where evicting frees `need` with the fewest busy and then
    /// the fewest victims (idle before busy, least recently used first).
    fn fewest_victims(&self, rooms: &[&Room], need: i128) -> Option<Vec<&'a str>> {
        let mut best: Option<(usize, usize, Vec<&'a str>)> = None;
        for r in rooms {
            let mut candidates: Vec<&Occupant<'a>> =
                self.on(r.gpu).filter(|o| o.evictable()).collect();
            candidates.sort_by_key(|o| (o.busy, o.last_used));
            let mut room = self.free(r) + self.coming_back(r);
            let mut victims = Vec::new();
            let mut busy = 0;
            for o in candidates {
                if room >= need {
                    break;
                }
                room += i128::from(o.holds());
                busy += usize::from(o.busy);
                victims.push(o.name);
            }
            if room >= need
                && best
                    .as_ref()
                    .is_none_or(|b| (busy, victims.len()) < (b.0, b.1))
            {
                best = Some((busy, victims.len(), victims));
            }
        }
        best.map(|(_, _, victims)| victims)
    }

    /// What occupies a GPU, for a model that never fits.
    fn describe(&self, r: &Room) -> String {
        let mut parts = vec![format!(
            "GPU {}: {} MiB total, {} MiB reserved",
            r.gpu,
            mib(r.total),
            mib(self.reserve)
        )];
        for o in self.on(r.gpu).filter(|o| o.pinned && !o.leaving) {
            parts.push(format!("{} pinned ({} MiB)", o.name, mib(o.holds())));
        }
        let foreign = self.foreign(r);
        if foreign > 0 {
            parts.push(format!("other processes {} MiB", mib(foreign)));
        }
        parts.push(format!(
            "at most {} MiB could be freed for it",
            mib(u64::try_from(self.capacity(r).max(0)).unwrap_or(0))
        ));
        parts.join(", ")
    }
}

/// Whole MiB, rounded up (a need is never shown smaller than it is).
pub fn mib(bytes: u64) -> u64 {
    bytes.div_ceil(1 << 20)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn r<'a>(name: &'a str, group: Option<&'a str>, busy: bool, age_s: u64) -> Resident<'a> {
        Resident {
            name,
            group,
            ready: true,
            leaving: false,
            busy,
            pinned: false,
            last_used: Instant::now() - Duration::from_secs(age_s),
        }
    }

    fn pinned(mut r: Resident<'_>) -> Resident<'_> {
        r.pinned = true;
        r
    }

    #[test]
    fn a_pinned_model_is_never_chosen_and_an_unpinned_one_goes_instead() {
        let loaded = [
            pinned(r("old-pinned", None, false, 100)),
            r("new", None, true, 1),
        ];
        assert_eq!(plan(None, &loaded, 2), Plan::Evict(vec!["new"]));
    }

    #[test]
    fn a_start_that_needs_a_pinned_model_gone_is_blocked_not_waiting() {
        let loaded = [pinned(r("p", None, false, 100))];
        assert_eq!(
            plan(None, &loaded, 1),
            Plan::Blocked {
                pinned: vec!["p"],
                rule: Rule::MaxLoaded(1)
            }
        );
        // Also while the pinned one is still starting: it will stay.
        let mut starting = pinned(r("p", None, false, 1));
        starting.ready = false;
        assert!(matches!(plan(None, &[starting], 1), Plan::Blocked { .. }));
        // One unpinned place is enough; two places needed is not.
        let loaded = [pinned(r("p", None, false, 5)), r("u", None, false, 5)];
        assert_eq!(plan(None, &loaded, 2), Plan::Evict(vec!["u"]));
        assert_eq!(
            plan(None, &loaded, 1),
            Plan::Blocked {
                pinned: vec!["p"],
                rule: Rule::MaxLoaded(1)
            }
        );
        // A pinned model already leaving (admin stop) is waited for.
        let mut leaving = pinned(r("p", None, false, 5));
        leaving.leaving = true;
        assert_eq!(plan(None, &[leaving], 1), Plan::Wait);
    }

    #[test]
    fn a_pinned_model_of_the_same_group_blocks_regardless_of_room() {
        let loaded = [
            pinned(r("a", Some("g"), false, 1)),
            r("b", Some("g"), false, 9),
        ];
        assert_eq!(
            plan(Some("g"), &loaded, 10),
            Plan::Blocked {
                pinned: vec!["a"],
                rule: Rule::Group("g")
            }
        );
        assert_eq!(plan(Some("other"), &loaded, 10), Plan::Start);
    }

    #[test]
    fn starts_when_there_is_room() {
        assert_eq!(plan(None, &[], 1), Plan::Start);
        assert_eq!(plan(None, &[r("a", None, false, 1)], 2), Plan::Start);
    }

    #[test]
    fn evicts_least_recently_used_idle_first() {
        let loaded = [
            r("old-busy", None, true, 100),
            r("new-idle", None, false, 1),
            r("old-idle", None, false, 50),
        ];
        assert_eq!(plan(None, &loaded, 3), Plan::Evict(vec!["old-idle"]));
        assert_eq!(
            plan(None, &loaded, 2),
            Plan::Evict(vec!["old-idle", "new-idle"])
        );
        // Only busy ones left: the least recently used is drained.
        assert_eq!(plan(None, &loaded[..1], 1), Plan::Evict(vec!["old-busy"]));
    }

    #[test]
    fn same_group_is_exclusive_regardless_of_max_loaded() {
        let loaded = [r("a", Some("g"), false, 1), r("b", None, false, 100)];
        assert_eq!(plan(Some("g"), &loaded, 10), Plan::Evict(vec!["a"]));
        assert_eq!(plan(Some("other"), &loaded, 10), Plan::Start);
    }

    #[test]
    fn waits_while_residents_are_starting_or_leaving() {
        let mut starting = r("s", None, false, 1);
        starting.ready = false;
        assert_eq!(plan(None, &[starting.clone()], 1), Plan::Wait);
        let mut leaving = r("l", None, false, 1);
        leaving.leaving = true;
        assert_eq!(
            plan(None, &[leaving], 1),
            Plan::Wait,
            "no second eviction while one is under way"
        );
        let mut g = starting;
        g.group = Some("g");
        assert_eq!(plan(Some("g"), &[g], 5), Plan::Wait);
    }
}

#[cfg(test)]
mod placement_tests {
    use super::*;
    use std::time::Duration;

    const GB: u64 = 1 << 30;
    const RESERVE: u64 = GB / 2;

    fn room(gpu: u32, total_gb: u64, used_gb: u64) -> Room {
        Room {
            gpu,
            total: total_gb * GB,
            used: used_gb * GB,
        }
    }

    /// A ready, idle, unpinned model using `gb` on `gpu`, last used
    /// `age_s` ago.
    fn occ(name: &str, gpu: u32, gb: u64, age_s: u64) -> Occupant<'_> {
        Occupant {
            name,
            gpu,
            measured: gb * GB,
            promised: 0,
            ready: true,
            leaving: false,
            busy: false,
            pinned: false,
            last_used: Instant::now() - Duration::from_secs(age_s),
        }
    }

    fn busy(mut o: Occupant<'_>) -> Occupant<'_> {
        o.busy = true;
        o
    }

    fn pinned(mut o: Occupant<'_>) -> Occupant<'_> {
        o.pinned = true;
        o
    }

    fn leaving(mut o: Occupant<'_>) -> Occupant<'_> {
        o.leaving = true;
        o
    }

    fn starting(mut o: Occupant<'_>, promised_gb: u64) -> Occupant<'_> {
        o.ready = false;
        o.promised = promised_gb * GB;
        o
    }

    struct Row<'a> {
        what: &'a str,
        need_gb: u64,
        allowed: Option<&'a [u32]>,
        rooms: Vec<Room>,
        occupants: Vec<Occupant<'a>>,
        expect: Placement<'a>,
    }

    #[test]
    fn placement_table() {
        let rows = [
            Row {
                what: "one GPU with room",
                need_gb: 4,
                allowed: None,
                rooms: vec![room(0, 24, 2)],
                occupants: vec![],
                expect: Placement::On(0),
            },
            Row {
                what: "two GPUs: the fullest that fits, leaving the larger hole",
                need_gb: 4,
                allowed: None,
                rooms: vec![room(0, 24, 2), room(1, 24, 16)],
                occupants: vec![],
                expect: Placement::On(1),
            },
            Row {
                what: "the reserve counts: 24 - 19.5 used - 0.5 reserve < 4.5",
                need_gb: 5,
                allowed: None,
                rooms: vec![room(0, 24, 19)],
                occupants: vec![occ("a", 0, 19, 5)],
                expect: Placement::Evict(vec!["a"]),
            },
            Row {
                what: "gpus restricts the choice",
                need_gb: 6,
                allowed: Some(&[0]),
                rooms: vec![room(0, 24, 18), room(1, 24, 0)],
                occupants: vec![occ("a", 0, 18, 5)],
                expect: Placement::Evict(vec!["a"]),
            },
            Row {
                what: "a starting model's promise is not free memory",
                need_gb: 8,
                allowed: None,
                rooms: vec![room(0, 24, 2)],
                occupants: vec![starting(occ("s", 0, 2, 0), 14)],
                expect: Placement::Wait,
            },
            Row {
                what: "idle least recently used first, only as many as needed",
                need_gb: 10,
                allowed: None,
                rooms: vec![room(0, 24, 20)],
                occupants: vec![
                    occ("new", 0, 6, 1),
                    occ("old", 0, 6, 100),
                    occ("mid", 0, 8, 50),
                ],
                expect: Placement::Evict(vec!["old", "mid"]),
            },
            Row {
                what: "idle before busy, even if the busy one is older",
                need_gb: 8,
                allowed: None,
                rooms: vec![room(0, 24, 20)],
                occupants: vec![busy(occ("busy-old", 0, 10, 100)), occ("idle", 0, 10, 1)],
                expect: Placement::Evict(vec!["idle"]),
            },
            Row {
                what: "a busy model drains when nothing idle frees enough",
                need_gb: 8,
                allowed: None,
                rooms: vec![room(0, 24, 20)],
                occupants: vec![busy(occ("busy", 0, 20, 1))],
                expect: Placement::Evict(vec!["busy"]),
            },
            Row {
                what: "of two GPUs, the one where only idle models go",
                need_gb: 8,
                allowed: None,
                rooms: vec![room(0, 24, 20), room(1, 24, 20)],
                occupants: vec![busy(occ("b0", 0, 20, 100)), occ("i1", 1, 20, 1)],
                expect: Placement::Evict(vec!["i1"]),
            },
            Row {
                what: "pinned models stay; an unpinned one goes instead",
                need_gb: 8,
                allowed: None,
                rooms: vec![room(0, 24, 20)],
                occupants: vec![pinned(occ("p", 0, 10, 100)), occ("u", 0, 10, 1)],
                expect: Placement::Evict(vec!["u"]),
            },
            Row {
                what: "memory on its way back: wait, evict nothing more",
                need_gb: 8,
                allowed: None,
                rooms: vec![room(0, 24, 20)],
                occupants: vec![leaving(occ("l", 0, 10, 1)), occ("u", 0, 10, 100)],
                expect: Placement::Wait,
            },
            Row {
                what: "still starting, not evictable, but it will fit later: wait",
                need_gb: 8,
                allowed: None,
                rooms: vec![room(0, 24, 20)],
                occupants: vec![starting(occ("s", 0, 20, 1), 0)],
                expect: Placement::Wait,
            },
        ];
        for row in rows {
            let got = place(
                row.need_gb * GB,
                row.allowed,
                &row.rooms,
                &row.occupants,
                RESERVE,
            );
            assert_eq!(got, row.expect, "{}", row.what);
        }
    }

    #[test]
    fn never_fits_says_what_occupies_each_gpu() {
        let rooms = [room(0, 24, 10), room(1, 16, 1)];
        let occupants = [pinned(occ("p", 0, 8, 1))];
        let Placement::NeverFits(why) = place(30 * GB, None, &rooms, &occupants, RESERVE) else {
            panic!("30 GB fits on neither");
        };
        assert_eq!(
            why,
            "needs 30720 MiB of GPU memory; GPU 0: 24576 MiB total, 512 MiB reserved, \
             p pinned (8192 MiB), other processes 2048 MiB, at most 13824 MiB could be freed for it; \
             GPU 1: 16384 MiB total, 512 MiB reserved, other processes 1024 MiB, \
             at most 14848 MiB could be freed for it"
        );
        // Blocked by a pinned model alone is "never" too.
        let Placement::NeverFits(_) = place(20 * GB, Some(&[0]), &rooms, &occupants, RESERVE)
        else {
            panic!("only the pinned model's going would make room");
        };
        assert_eq!(
            place(4 * GB, Some(&[7]), &rooms, &occupants, RESERVE),
            Placement::NeverFits("none of its GPUs (7) is present".into())
        );
        assert_eq!(
            place(4 * GB, None, &[], &[], RESERVE),
            Placement::NeverFits("no GPU is present".into())
        );
    }
}
