//! Eviction as a pure function: given the models that hold a place and the
//! limits, which must go before a pending model may start. The actor applies
//! the answer; nothing here has effects, so every rule is a unit test.
//!
//! Pinned residents are never chosen. When the start needs a pinned one
//! gone (it shares the group, or too few unpinned places can be freed
//! under `max_loaded`), the answer is [`Plan::Blocked`]: waiting would not
//! help, because nothing but an operator frees that place.

use tokio::time::Instant;

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
