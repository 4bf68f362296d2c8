//! Fair shares: which shards a gateway process should take or hand over, from who is
//! alive (`P:gateways`) and who holds each shard's lease. A pure function of what every
//! process reads alike, so processes agree without talking to each other.
//!
//! The rule: nobody holds more than ceil(shards / live processes), and loads differ by
//! at most one. A free shard (its lease expired or released) is taken by a least-loaded
//! process below its share; when nothing is free and some process holds two or more
//! shards more than another, the most loaded (the first by name among equals) hands one
//! over, one per round, and the least loaded takes it. Handing over one at a time, and
//! only from the most loaded, keeps two processes from giving up shards at once and
//! taking them back.
//!
//! Owns nothing in Redis; must not act (that is [`super::run`]).

use std::collections::{BTreeMap, BTreeSet};

/// What this process should do this round.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Plan {
    /// Free shards to try to take, in order, as many as `room` allows.
    pub take: Vec<u32>,
    /// How many of them it may take.
    pub room: usize,
    /// A shard of its own to hand over.
    pub give: Option<u32>,
}

/// The holder named in a lease's token (`<epoch>:<holder>`).
pub fn holder_of(token: &str) -> &str {
    token.split_once(':').map_or(token, |(_, holder)| holder)
}

/// `holders[i]`: who holds shard i's lease (None: free). `live`: the processes alive,
/// `me` among them. `mine`: the shards this process holds (its own truth, which the
/// leases read may lag).
pub fn plan(
    me: &str,
    count: u32,
    live: &[String],
    holders: &[Option<String>],
    mine: &BTreeSet<u32>,
) -> Plan {
    let processes = live.len().max(1);
    let share = (count as usize).div_ceil(processes);
    let mut load: BTreeMap<&str, usize> = live.iter().map(|p| (p.as_str(), 0)).collect();
    for holder in holders.iter().flatten() {
        if let Some(n) = load.get_mut(holder.as_str()) {
            *n += 1;
        }
    }
    load.insert(me, mine.len());
    let least = load.values().copied().min().unwrap_or(0);
    let most = load.values().copied().max().unwrap_or(0);
    let free: Vec<u32> = holders
        .iter()
        .enumerate()
        .filter(|(i, h)| h.is_none() && !mine.contains(&(*i as u32)))
        .map(|(i, _)| i as u32)
        .collect();
    let mut plan = Plan::default();
    if mine.len() > share {
        // More live processes than when these were taken: give back the excess.
        plan.give = mine.last().copied();
        return plan;
    }
    if !free.is_empty() {
        if mine.len() < share && mine.len() == least {
            plan.room = share - mine.len();
            plan.take = free;
        }
        return plan;
    }
    let first_of_most = load.iter().find(|(_, n)| **n == most).map(|(p, _)| *p);
    if most >= least + 2 && first_of_most == Some(me) {
        plan.give = mine.last().copied();
    }
    plan
}

#[cfg(test)]
mod tests {
    use super::*;

    fn names(n: usize) -> Vec<String> {
        (0..n).map(|i| format!("p{i}")).collect()
    }

    /// Plays rounds of every process in turn until nothing changes; answers the loads.
    fn settle(count: u32, live: &[String], holders: &mut [Option<String>]) -> Vec<usize> {
        for _round in 0..200 {
            let mut changed = false;
            for me in live {
                let mine: BTreeSet<u32> = holders
                    .iter()
                    .enumerate()
                    .filter(|(_, h)| h.as_deref() == Some(me))
                    .map(|(i, _)| i as u32)
                    .collect();
                let p = plan(me, count, live, holders, &mine);
                if let Some(s) = p.give {
                    holders[s as usize] = None;
                    changed = true;
                }
                for s in p.take.into_iter().take(p.room) {
                    if holders[s as usize].is_none() {
                        holders[s as usize] = Some(me.clone());
                        changed = true;
                    }
                }
            }
            if !changed {
                break;
            }
        }
        live.iter()
            .map(|p| holders.iter().filter(|h| h.as_deref() == Some(p)).count())
            .collect()
    }

    #[test]
    fn a_cold_start_spreads_every_shard_within_one_of_even() {
        for (count, procs) in [(4, 3), (16, 3), (1, 2), (5, 5), (3, 7), (64, 5)] {
            let live = names(procs);
            let mut holders = vec![None; count as usize];
            let loads = settle(count, &live, &mut holders);
            assert!(holders.iter().all(Option::is_some), "{count}/{procs}");
            let (min, max) = (loads.iter().min().unwrap(), loads.iter().max().unwrap());
            assert!(max - min <= 1, "{count}/{procs}: {loads:?}");
            assert!(*max <= (count as usize).div_ceil(procs));
        }
    }

    #[test]
    fn a_joining_process_gets_its_share_from_the_most_loaded() {
        let mut holders: Vec<Option<String>> = vec![Some("p0".into()); 4];
        let loads = settle(4, &names(2), &mut holders);
        assert_eq!(loads, vec![2, 2]);
        let loads = settle(4, &names(3), &mut holders);
        assert_eq!(loads.iter().sum::<usize>(), 4);
        assert!(loads.iter().all(|n| (1..=2).contains(n)), "{loads:?}");
    }

    #[test]
    fn a_dead_process_s_shards_go_to_the_survivors() {
        let mut holders: Vec<Option<String>> = ["p0", "p0", "p1", "p1", "p2", "p2"]
            .map(|p| Some(p.into()))
            .into();
        // p2 died: its leases ran out.
        holders[4] = None;
        holders[5] = None;
        let live = vec!["p0".to_owned(), "p1".to_owned()];
        let loads = settle(6, &live, &mut holders);
        assert_eq!(loads, vec![3, 3]);
    }

    #[test]
    fn nobody_hands_over_when_loads_differ_by_one() {
        let holders: Vec<Option<String>> = ["p0", "p0", "p1"].map(|p| Some(p.into())).into();
        let mine = BTreeSet::from([0, 1]);
        assert_eq!(plan("p0", 3, &names(2), &holders, &mine), Plan::default());
    }

    #[test]
    fn only_the_first_of_the_most_loaded_hands_over() {
        let holders: Vec<Option<String>> = ["p0", "p0", "p1", "p1"].map(|p| Some(p.into())).into();
        let live = names(3);
        let p0 = plan("p0", 4, &live, &holders, &BTreeSet::from([0, 1]));
        let p1 = plan("p1", 4, &live, &holders, &BTreeSet::from([2, 3]));
        assert_eq!(p0.give, Some(1));
        assert_eq!(p1.give, None);
    }

    #[test]
    fn a_process_above_the_least_loaded_leaves_a_free_shard_to_it() {
        let holders: Vec<Option<String>> = vec![Some("p0".into()), None, Some("p1".into())];
        let live = names(3);
        // p2 holds none: only it takes shard 1.
        assert!(
            plan("p0", 3, &live, &holders, &BTreeSet::from([0]))
                .take
                .is_empty()
        );
        assert_eq!(
            plan("p2", 3, &live, &holders, &BTreeSet::new()).take,
            vec![1]
        );
    }

    #[test]
    fn the_holder_is_read_from_a_lease_token() {
        assert_eq!(holder_of("17:host-42-ab12"), "host-42-ab12");
        assert_eq!(holder_of("odd"), "odd");
    }
}
