//! Placement of a worker's partitions on its cores: sticky, balanced, and co-partition aware.
//!
//! The unit placed is a *slot*: one partition number of one co-partitioned group (a source
//! topic and the topics derived from it — its repartition topics, the changelogs of the tables
//! it updates). Every topic-partition of a slot goes to the same core, so a table write for an
//! event lands in a shard on the event's own core.
//!
//! Rules, in order:
//! 1. *Balanced*: core `c` gets `floor(S/N)` or `ceil(S/N)` of the `S` slots (the first
//!    `S mod N` cores in order take the extra one), whatever the partition numbers are — a
//!    worker holding partitions {1, 3} still uses both of its 2 cores (not `p mod N`).
//! 2. *Sticky*: a slot stays on the core it was on whenever that core is under its quota, so
//!    a rebalance moves only what it must (tables keep their warm shards).
//! 3. *Spread*: the remaining slots go, group by group in partition order, to the core with
//!    the most room left, so each group is spread over the cores too.
//!
//! Deterministic: the same inputs give the same placement.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use faust_transport::TopicPartition;

/// A slot: (group index, partition number).
type Slot = (usize, u32);

/// Places `partitions` on `cores` cores. `groups` lists the co-partitioned groups (topics
/// that appear in no group are a group of their own); `previous` is where partitions were
/// (entries for cores `>= cores` are ignored). Returns, per core, its partitions, sorted.
pub(crate) fn place(
    partitions: &[TopicPartition],
    cores: usize,
    groups: &[Vec<Arc<str>>],
    previous: &HashMap<TopicPartition, usize>,
) -> Vec<Vec<TopicPartition>> {
    let cores = cores.max(1);
    let mut group_of: HashMap<&str, usize> = HashMap::new();
    for (g, topics) in groups.iter().enumerate() {
        for t in topics {
            group_of.entry(t).or_insert(g);
        }
    }
    // Topics in no group: a group each, numbered after the declared ones, in name order.
    let mut loose: Vec<&str> = partitions.iter().map(|tp| &*tp.topic).filter(|t| !group_of.contains_key(t)).collect();
    loose.sort_unstable();
    loose.dedup();
    for (i, t) in loose.into_iter().enumerate() {
        group_of.insert(t, groups.len() + i);
    }

    // Slots, with their partitions and the core most of them were on.
    let mut slots: BTreeMap<Slot, Vec<TopicPartition>> = BTreeMap::new();
    for tp in partitions {
        slots.entry((group_of[&*tp.topic], tp.partition)).or_default().push(tp.clone());
    }
    let total = slots.len();
    let quota = |core: usize| total / cores + usize::from(core < total % cores);
    let mut load = vec![0usize; cores];
    let mut placed: BTreeMap<Slot, usize> = BTreeMap::new();

    // Sticky pass: keep each slot where it was while that core is under quota.
    for (slot, tps) in &slots {
        let mut votes = vec![0usize; cores];
        for tp in tps {
            if let Some(&c) = previous.get(tp).filter(|&&c| c < cores) {
                votes[c] += 1;
            }
        }
        let best = (0..cores).filter(|&c| votes[c] > 0).max_by_key(|&c| (votes[c], std::cmp::Reverse(c)));
        if let Some(c) = best
            && load[c] < quota(c)
        {
            load[c] += 1;
            placed.insert(*slot, c);
        }
    }
    // Spread pass: the rest, in (group, partition) order, to the core with the most room.
    for slot in slots.keys() {
        if placed.contains_key(slot) {
            continue;
        }
        let c = (0..cores).max_by_key(|&c| (quota(c) as isize - load[c] as isize, std::cmp::Reverse(c))).unwrap_or(0);
        load[c] += 1;
        placed.insert(*slot, c);
    }

    let mut out = vec![Vec::new(); cores];
    for (slot, tps) in slots {
        out[placed[&slot]].extend(tps);
    }
    for core in &mut out {
        core.sort();
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn tps(spec: &[(&str, u32)]) -> Vec<TopicPartition> {
        spec.iter().map(|(t, p)| TopicPartition::new(*t, *p)).collect()
    }

    #[test]
    fn a_worker_with_partitions_1_and_3_uses_both_cores_and_keeps_groups_together() {
        let groups = vec![vec![Arc::from("a"), Arc::from("a-changelog")]];
        let placed =
            place(&tps(&[("a", 1), ("a", 3), ("a-changelog", 1), ("a-changelog", 3)]), 2, &groups, &HashMap::new());
        assert_eq!(placed[0], tps(&[("a", 1), ("a-changelog", 1)]));
        assert_eq!(placed[1], tps(&[("a", 3), ("a-changelog", 3)]));
    }

    #[test]
    fn unrelated_topics_are_placed_independently() {
        // Two loose topics with 2 partitions each on 2 cores: each core gets 2 slots, and each
        // topic is spread over both cores.
        let placed = place(&tps(&[("a", 0), ("a", 1), ("b", 0), ("b", 1)]), 2, &[], &HashMap::new());
        assert_eq!(placed[0].len(), 2);
        assert!(
            placed
                .iter()
                .all(|core| core.iter().map(|tp| &tp.topic).collect::<std::collections::HashSet<_>>().len() == 2)
        );
    }

    /// Partitions, cores, groups, previous placement.
    type Case = (Vec<TopicPartition>, usize, Vec<Vec<Arc<str>>>, HashMap<TopicPartition, usize>);

    fn arb_case() -> impl Strategy<Value = Case> {
        (1usize..5, proptest::collection::vec((0u8..4, 0u32..12), 0..40), 0usize..3, any::<u64>()).prop_map(
            |(cores, raw, grouped, seed)| {
                let mut parts: Vec<TopicPartition> =
                    raw.into_iter().map(|(t, p)| TopicPartition::new(format!("t{t}"), p)).collect();
                parts.sort();
                parts.dedup();
                // t0..t{grouped} form one co-partitioned group.
                let groups = if grouped > 0 {
                    vec![(0..=grouped).map(|t| Arc::from(format!("t{t}"))).collect()]
                } else {
                    vec![]
                };
                // A previous placement from a worker with a different core count.
                let previous = parts
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| (seed >> (i % 64)) & 1 == 1)
                    .map(|(i, tp)| (tp.clone(), (i + seed as usize) % (cores + 1)))
                    .collect();
                (parts, cores, groups, previous)
            },
        )
    }

    fn slot_of(tp: &TopicPartition, groups: &[Vec<Arc<str>>]) -> (String, u32) {
        let group = groups.iter().position(|g| g.iter().any(|t| **t == *tp.topic));
        (group.map_or(tp.topic.to_string(), |g| format!("group{g}")), tp.partition)
    }

    proptest! {
        #[test]
        fn complete_exclusive_copartitioned_balanced_sticky((parts, cores, groups, previous) in arb_case()) {
            let placed = place(&parts, cores, &groups, &previous);
            prop_assert_eq!(placed.len(), cores);
            // Complete and exclusive.
            let mut all: Vec<TopicPartition> = placed.iter().flatten().cloned().collect();
            all.sort();
            prop_assert_eq!(&all, &parts);
            // Co-partitioned: a slot's partitions share a core.
            let mut core_of_slot: HashMap<(String, u32), usize> = HashMap::new();
            for (c, tps) in placed.iter().enumerate() {
                for tp in tps {
                    let prev = core_of_slot.insert(slot_of(tp, &groups), c);
                    prop_assert!(prev.is_none() || prev == Some(c), "{tp} split from its slot");
                }
            }
            // Balanced by slots: within one of each other.
            let mut per_core = vec![0usize; cores];
            for c in core_of_slot.values() {
                per_core[*c] += 1;
            }
            let (min, max) = (per_core.iter().min().copied().unwrap_or(0), per_core.iter().max().copied().unwrap_or(0));
            prop_assert!(max - min <= 1, "unbalanced {per_core:?}");
            // Idempotent: placing again from this placement changes nothing.
            let now: HashMap<TopicPartition, usize> =
                placed.iter().enumerate().flat_map(|(c, tps)| tps.iter().map(move |tp| (tp.clone(), c))).collect();
            prop_assert_eq!(&place(&parts, cores, &groups, &now), &placed);
        }

        #[test]
        fn adding_a_core_moves_only_what_fills_it((parts, cores, groups, _prev) in arb_case()) {
            let before = place(&parts, cores, &groups, &HashMap::new());
            let was: HashMap<TopicPartition, usize> =
                before.iter().enumerate().flat_map(|(c, tps)| tps.iter().map(move |tp| (tp.clone(), c))).collect();
            let after = place(&parts, cores + 1, &groups, &was);
            let slots: std::collections::HashSet<(String, u32)> = parts.iter().map(|tp| slot_of(tp, &groups)).collect();
            let new_core_slots: std::collections::HashSet<(String, u32)> = after[cores].iter().map(|tp| slot_of(tp, &groups)).collect();
            let mut moved = std::collections::HashSet::new();
            for (c, tps) in after.iter().enumerate() {
                for tp in tps {
                    if was[tp] != c {
                        moved.insert(slot_of(tp, &groups));
                    }
                }
            }
            // Only the slots the new core needs move: no reshuffle among the old cores.
            prop_assert_eq!(moved.len(), new_core_slots.len(), "moved {:?} for {} slots", moved, slots.len());
        }
    }
}
