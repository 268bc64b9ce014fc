//! Assignment of partitions to members: sticky, balanced by weight, and co-partition aware.
//!
//! One algorithm serves two places: a worker placing the partitions it was given on its cores
//! (the members are cores, each of weight 1), and a consumer-group leader assigning the
//! partitions of the group's topics to workers (the members are workers, weighted by their core
//! counts).
//!
//! # Slots
//!
//! Some topics must be *co-partitioned*: a source topic, its repartition topics and the
//! changelogs of the tables it updates. Partition `p` of all of them must land on the same
//! member, so that a table write for an event goes to the shard on the event's own member. The
//! unit assigned is therefore a *slot*: one partition number `p` of one co-partitioned group,
//! standing for every listed [`TopicPartition`] `(t, p)` of the group's topics (topics with
//! fewer partitions simply have no part in the higher slots). Groups that share a topic are
//! one group (co-partitioning is transitive); a topic in no group is a group of its own. The
//! slots are only those of the partitions listed, not `0..n`: a worker holding partitions
//! {1, 3} of a 4-partition topic has 2 slots and uses 2 cores.
//!
//! # Invariants
//!
//! With `S` slots and member weights `w_i` summing to `W`:
//!
//! 1. *Complete and exclusive*: every listed partition goes to exactly one member.
//! 2. *Co-partitioned*: all partitions of a slot go to the same member.
//! 3. *Balanced*: member `i` gets `floor(S·w_i/W)` or `ceil(S·w_i/W)` slots (its *quota*), and
//!    the quotas add up to `S`. Everyone gets the floor; the `L = S − Σ floor` leftover slots
//!    go one each to members whose share has a fractional part (the largest remainder
//!    method, which is what keeps every quota within one of the exact share while the totals
//!    match). Who gets a leftover is decided by, in order: members whose floor is 0 first (a
//!    member that just (re)joined is not starved — Faust bug #93: with equal weights and
//!    `S ≥` the number of members every member gets at least one slot), then members that
//!    held more than their floor before (giving them the extra saves a move), then the larger
//!    remainder, then member order.
//! 4. *Sticky*: a slot stays with the member it was with (the member holding most of its
//!    partitions in the previous assignment) whenever that member still exists and is under
//!    its quota, so a rebalance moves only what it must: only members over their new quota
//!    give slots away. Re-running with the result as the previous assignment gives the same
//!    result. When all weights are equal, adding a member moves only the slots that fill its
//!    quota and removing one moves only its own slots (with unequal weights, a member's quota
//!    can also grow by one when another joins, which moves a slot more).
//! 5. *Deterministic*: the result depends on the inputs only, not on their order nor on hash
//!    iteration order (members, slots and partitions are sorted; the previous assignment is
//!    only looked up, never iterated).
//!
//! # Passes
//!
//! 1. *Keep*: each member keeps its previous slots up to its quota; a member over its quota
//!    keeps them round-robin over its groups (the first of each group, then the second…), so
//!    what it keeps stays spread.
//! 2. *Fill*: the other slots — new ones, those of vanished members and those given away —
//!    are dealt round-robin over the groups (first slot of each group, then the second…), each
//!    to the member under quota with the least of that slot's group relative to its weight,
//!    then the most room left, then member order. Every member ends exactly at its quota, and
//!    each group is spread over the members.

use std::cmp::{Ordering, Reverse};
use std::collections::{BTreeMap, HashMap};
use std::hash::Hash;
use std::sync::Arc;

use crate::types::TopicPartition;

/// What [`assign`] works from.
#[derive(Debug)]
pub struct AssignInput<'a, M> {
    /// The members and their weights (at least 1 each; a worker's weight is its core count).
    /// Their order does not matter: ties are broken by the members' own order (`M: Ord`).
    pub members: &'a [(M, u32)],
    /// The co-partitioned groups, each a list of topics. Groups that share a topic are merged;
    /// topics in no group are a group of their own; topics listed here but without any
    /// partition in `partitions` are ignored.
    pub groups: &'a [Vec<Arc<str>>],
    /// Every partition to assign (duplicates count once). Only these are assigned.
    pub partitions: &'a [TopicPartition],
    /// Where partitions were before, for stickiness. Entries for partitions not listed or for
    /// members no longer present are ignored.
    pub previous: &'a HashMap<TopicPartition, M>,
}

impl<M> Clone for AssignInput<'_, M> {
    fn clone(&self) -> Self {
        *self
    }
}

impl<M> Copy for AssignInput<'_, M> {}

/// Why [`assign`] could not assign.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AssignError {
    /// There is no member to assign to.
    #[error("cannot assign partitions: there are no members")]
    NoMembers,
    /// A member has weight 0.
    #[error("member #{index} has weight 0; every member needs a weight of at least 1")]
    ZeroWeight {
        /// Its position in [`AssignInput::members`].
        index: usize,
    },
    /// A member is listed twice.
    #[error("member #{index} is the same as member #{first}; list each member once")]
    DuplicateMember {
        /// The position of its first listing in [`AssignInput::members`].
        first: usize,
        /// The position of the repeated listing.
        index: usize,
    },
}

/// One partition number of one co-partitioned group, with the listed partitions it stands for.
struct Slot {
    /// Index of the group, in the groups' order (by their smallest topic name).
    group: usize,
    /// The partitions of the slot, sorted.
    partitions: Vec<TopicPartition>,
}

/// Assigns `input.partitions` to `input.members`: sticky, balanced by weight and
/// co-partition aware.
///
/// The unit assigned is a *slot*: one partition number of one co-partitioned group, i.e. all
/// the listed partitions `(t, p)` of the group's topics for one `p`. With `S` slots and
/// weights `w_i` summing to `W`:
///
/// - every listed partition goes to exactly one member, and a slot's partitions to the same one;
/// - member `i` gets `floor(S·w_i/W)` or `ceil(S·w_i/W)` slots (largest remainder method;
///   members whose share is below one are served first from the leftover slots, so with equal
///   weights and at least as many slots as members, every member gets some);
/// - a slot stays with its previous member (the present member holding most of its partitions
///   in `input.previous`) whenever that member is under its quota: only members over their
///   quota give slots away, and assigning again from the result changes nothing;
/// - the rest is dealt round-robin over the groups, so each group is spread over the members;
/// - the result depends on the inputs only, not on their order.
///
/// Returns every member, each with its partitions sorted (possibly none). Fails when there is
/// no member, a member has weight 0 or a member is listed twice.
///
/// # Example
///
/// A worker with 2 cores holds partitions 1 and 3 of topics `a` and `b`, which are
/// co-partitioned: each core gets one partition number of both topics.
///
/// ```
/// use std::collections::HashMap;
/// use std::sync::Arc;
///
/// use faust_transport::{AssignInput, TopicPartition, assign};
///
/// let cores = [(0usize, 1), (1, 1)];
/// let groups = vec![vec![Arc::<str>::from("a"), Arc::from("b")]];
/// let held: Vec<TopicPartition> =
///     [1, 3].into_iter().flat_map(|p| [TopicPartition::new("a", p), TopicPartition::new("b", p)]).collect();
/// let previous = HashMap::new();
/// let input = AssignInput { members: &cores, groups: &groups, partitions: &held, previous: &previous };
/// let placed = assign(&input)?;
/// assert_eq!(placed[&0], [TopicPartition::new("a", 1), TopicPartition::new("b", 1)]);
/// assert_eq!(placed[&1], [TopicPartition::new("a", 3), TopicPartition::new("b", 3)]);
///
/// // Sticky: assigning again from this result changes nothing.
/// let previous: HashMap<TopicPartition, usize> =
///     placed.iter().flat_map(|(core, tps)| tps.iter().map(|tp| (tp.clone(), *core))).collect();
/// assert_eq!(assign(&AssignInput { previous: &previous, ..input })?, placed);
/// # Ok::<(), faust_transport::AssignError>(())
/// ```
pub fn assign<M: Clone + Ord + Hash>(
    input: &AssignInput<'_, M>,
) -> Result<BTreeMap<M, Vec<TopicPartition>>, AssignError> {
    let members = sorted_members(input.members)?;
    let n = members.len();
    let weights: Vec<u32> = members.iter().map(|&(_, w)| w).collect();
    let index: HashMap<&M, usize> = members.iter().enumerate().map(|(i, &(m, _))| (m, i)).collect();
    let slots = slots(input.groups, input.partitions);

    // Where each slot was: the present member holding most of its partitions (ties: member order).
    let was: Vec<Option<usize>> = slots.iter().map(|slot| previous_owner(slot, input.previous, &index)).collect();
    let mut held = vec![0usize; n];
    for &m in was.iter().flatten() {
        held[m] += 1;
    }
    let quota = quotas(&weights, slots.len(), &held);

    let mut owner: Vec<Option<usize>> = vec![None; slots.len()];
    let mut count = vec![0usize; n];
    let mut group_count: HashMap<(usize, usize), usize> = HashMap::new();

    // Keep: each member keeps its previous slots up to its quota, spread over its groups.
    let mut kept_by: Vec<Vec<usize>> = vec![Vec::new(); n];
    for (slot, m) in was.iter().enumerate() {
        if let Some(m) = *m {
            kept_by[m].push(slot);
        }
    }
    for (m, mine) in kept_by.iter().enumerate() {
        for slot in round_robin(mine, &slots).into_iter().take(quota[m]) {
            owner[slot] = Some(m);
            count[m] += 1;
            *group_count.entry((slots[slot].group, m)).or_default() += 1;
        }
    }

    // Fill: the rest, round-robin over the groups, to the member under quota with the least of
    // the slot's group (relative to its weight), then the most room left, then member order.
    let rest: Vec<usize> = (0..slots.len()).filter(|&slot| owner[slot].is_none()).collect();
    for slot in round_robin(&rest, &slots) {
        let group = slots[slot].group;
        let in_group = |m: usize| group_count.get(&(group, m)).copied().unwrap_or(0) as u128;
        let best = (0..n).filter(|&m| count[m] < quota[m]).min_by(|&a, &b| {
            // in_group(a) / w_a against in_group(b) / w_b, exactly.
            (in_group(a) * u128::from(weights[b]))
                .cmp(&(in_group(b) * u128::from(weights[a])))
                .then_with(|| (quota[b] - count[b]).cmp(&(quota[a] - count[a])))
                .then(a.cmp(&b))
        });
        // The quotas add up to the number of slots and the keep pass stays within them, so the
        // room left equals the slots left: some member always has room.
        let m = best.expect("a member under quota for every slot left");
        owner[slot] = Some(m);
        count[m] += 1;
        *group_count.entry((group, m)).or_default() += 1;
    }

    let mut out: Vec<Vec<TopicPartition>> = vec![Vec::new(); n];
    for (slot, m) in slots.into_iter().zip(owner) {
        out[m.expect("every slot assigned")].extend(slot.partitions);
    }
    Ok(members
        .into_iter()
        .zip(out)
        .map(|((m, _), mut tps)| {
            tps.sort();
            (m.clone(), tps)
        })
        .collect())
}

/// The members sorted by id, checked: at least one, weights of at least 1, no repeats.
fn sorted_members<M: Ord>(members: &[(M, u32)]) -> Result<Vec<(&M, u32)>, AssignError> {
    if members.is_empty() {
        return Err(AssignError::NoMembers);
    }
    if let Some(index) = members.iter().position(|&(_, w)| w == 0) {
        return Err(AssignError::ZeroWeight { index });
    }
    let mut order: Vec<usize> = (0..members.len()).collect();
    order.sort_by(|&a, &b| members[a].0.cmp(&members[b].0).then(a.cmp(&b)));
    if let Some(pair) = order.windows(2).find(|pair| members[pair[0]].0 == members[pair[1]].0) {
        return Err(AssignError::DuplicateMember { first: pair[0], index: pair[1] });
    }
    Ok(order.into_iter().map(|i| (&members[i].0, members[i].1)).collect())
}

/// The slots of `partitions`, sorted by group (by the group's smallest topic name), then
/// partition number.
fn slots(groups: &[Vec<Arc<str>>], partitions: &[TopicPartition]) -> Vec<Slot> {
    // Union-find over the grouped topics; a root is always the smallest name of its set.
    let mut id: HashMap<&str, usize> = HashMap::new();
    let mut name: Vec<&Arc<str>> = Vec::new();
    let mut parent: Vec<usize> = Vec::new();
    fn root(parent: &mut [usize], mut i: usize) -> usize {
        while parent[i] != i {
            parent[i] = parent[parent[i]];
            i = parent[i];
        }
        i
    }
    for group in groups {
        let mut first = None;
        for topic in group {
            let i = *id.entry(topic).or_insert_with(|| {
                name.push(topic);
                parent.push(parent.len());
                parent.len() - 1
            });
            let Some(f) = first else {
                first = Some(i);
                continue;
            };
            let (a, b) = (root(&mut parent, f), root(&mut parent, i));
            match name[a].cmp(name[b]) {
                Ordering::Less => parent[b] = a,
                Ordering::Greater => parent[a] = b,
                Ordering::Equal => {}
            }
        }
    }

    let mut by_slot: BTreeMap<(Arc<str>, u32), Vec<TopicPartition>> = BTreeMap::new();
    for tp in partitions {
        let group = match id.get(&*tp.topic) {
            Some(&i) => name[root(&mut parent, i)].clone(),
            None => tp.topic.clone(),
        };
        by_slot.entry((group, tp.partition)).or_default().push(tp.clone());
    }
    let mut out: Vec<Slot> = Vec::with_capacity(by_slot.len());
    let mut last: Option<Arc<str>> = None;
    let mut group = 0;
    for ((key, _), mut partitions) in by_slot {
        if last.as_ref().is_some_and(|last| *last != key) {
            group += 1;
        }
        last = Some(key);
        partitions.sort();
        partitions.dedup();
        out.push(Slot { group, partitions });
    }
    out
}

/// The present member holding most partitions of `slot` in `previous` (ties: member order).
fn previous_owner<M: Hash + Eq>(
    slot: &Slot,
    previous: &HashMap<TopicPartition, M>,
    index: &HashMap<&M, usize>,
) -> Option<usize> {
    let mut votes: Vec<(usize, usize)> = Vec::new();
    for tp in &slot.partitions {
        if let Some(&m) = previous.get(tp).and_then(|m| index.get(m)) {
            match votes.iter_mut().find(|(v, _)| *v == m) {
                Some((_, count)) => *count += 1,
                None => votes.push((m, 1)),
            }
        }
    }
    votes.into_iter().max_by_key(|&(m, count)| (count, Reverse(m))).map(|(m, _)| m)
}

/// The number of slots of each member: the floor of its share, plus one of the leftover slots
/// for some of those whose share has a fractional part — those with a floor of 0 first (no
/// starvation), then those that held more than their floor (fewer moves), then the largest
/// remainder, then member order.
fn quotas(weights: &[u32], slots: usize, held: &[usize]) -> Vec<usize> {
    let total: u128 = weights.iter().map(|&w| u128::from(w)).sum();
    let s = slots as u128;
    let share = |m: usize| s * u128::from(weights[m]);
    // share(m) / total <= s, so the floors fit in a usize.
    let mut quota: Vec<usize> = (0..weights.len()).map(|m| (share(m) / total) as usize).collect();
    let leftover = slots - quota.iter().sum::<usize>();
    let mut extra: Vec<usize> = (0..weights.len()).filter(|&m| share(m) % total != 0).collect();
    extra.sort_by_key(|&m| (quota[m] != 0, held[m] <= quota[m], Reverse(share(m) % total), m));
    // Σ remainders = leftover · total with each remainder < total, so there are enough.
    debug_assert!(extra.len() >= leftover);
    for m in extra.into_iter().take(leftover) {
        quota[m] += 1;
    }
    quota
}

/// `chosen` (slot indices in slot order) reordered round-robin over their groups: the first
/// of each group, then the second of each group, and so on.
fn round_robin(chosen: &[usize], slots: &[Slot]) -> Vec<usize> {
    let mut ranked: Vec<(usize, usize)> = Vec::with_capacity(chosen.len());
    let mut rank = 0;
    for (i, &slot) in chosen.iter().enumerate() {
        rank = if i > 0 && slots[chosen[i - 1]].group == slots[slot].group { rank + 1 } else { 0 };
        ranked.push((rank, slot));
    }
    ranked.sort_unstable();
    ranked.into_iter().map(|(_, slot)| slot).collect()
}

#[cfg(test)]
mod tests {
    use std::collections::{BTreeSet, HashSet};

    use proptest::prelude::*;

    use super::*;

    type Out = BTreeMap<u32, Vec<TopicPartition>>;

    /// Inputs for one property test: members (id, weight), groups, partitions, previous.
    #[derive(Debug, Clone)]
    struct Case {
        members: Vec<(u32, u32)>,
        groups: Vec<Vec<Arc<str>>>,
        partitions: Vec<TopicPartition>,
        previous: HashMap<TopicPartition, u32>,
    }

    impl Case {
        fn run(&self) -> Result<Out, AssignError> {
            self.run_with(&self.previous)
        }

        fn run_with(&self, previous: &HashMap<TopicPartition, u32>) -> Result<Out, AssignError> {
            assign(&AssignInput {
                members: &self.members,
                groups: &self.groups,
                partitions: &self.partitions,
                previous,
            })
        }

        /// The slot of `tp`, computed naively: (the smallest topic of its merged group, p).
        fn slot_of(&self, tp: &TopicPartition) -> (Arc<str>, u32) {
            let mut component: BTreeSet<Arc<str>> = BTreeSet::from([tp.topic.clone()]);
            loop {
                let before = component.len();
                for group in &self.groups {
                    if group.iter().any(|t| component.contains(t)) {
                        component.extend(group.iter().cloned());
                    }
                }
                if component.len() == before {
                    break;
                }
            }
            (component.into_iter().next().expect("the topic itself"), tp.partition)
        }

        fn slots(&self) -> BTreeMap<(Arc<str>, u32), Vec<TopicPartition>> {
            let mut slots: BTreeMap<_, Vec<TopicPartition>> = BTreeMap::new();
            for tp in &self.partitions {
                slots.entry(self.slot_of(tp)).or_default().push(tp.clone());
            }
            slots
        }

        /// The previous member of each slot: the present member with most of its partitions,
        /// ties to the smallest id.
        fn was(&self, previous: &HashMap<TopicPartition, u32>) -> BTreeMap<(Arc<str>, u32), u32> {
            let present: HashSet<u32> = self.members.iter().map(|&(m, _)| m).collect();
            let mut out = BTreeMap::new();
            for (slot, tps) in self.slots() {
                let mut votes: BTreeMap<u32, usize> = BTreeMap::new();
                for tp in tps.iter().collect::<BTreeSet<_>>() {
                    if let Some(m) = previous.get(tp).filter(|m| present.contains(m)) {
                        *votes.entry(*m).or_default() += 1;
                    }
                }
                if let Some((m, _)) = votes.into_iter().max_by_key(|&(m, c)| (c, Reverse(m))) {
                    out.insert(slot, m);
                }
            }
            out
        }
    }

    fn flatten(out: &Out) -> HashMap<TopicPartition, u32> {
        out.iter().flat_map(|(m, tps)| tps.iter().map(|tp| (tp.clone(), *m))).collect()
    }

    fn slot_owners(case: &Case, out: &Out) -> BTreeMap<(Arc<str>, u32), u32> {
        flatten(out).into_iter().map(|(tp, m)| (case.slot_of(&tp), m)).collect()
    }

    const TOPICS: [&str; 6] = ["t0", "t1", "t2", "t3", "t4", "zz-unlisted"];

    /// Up to 6 members (ids out of order, weights 1 to 4 or all 1), 5 topics of 0 to 8 (often
    /// at most 2) partitions of which only some are held, up to 3 possibly overlapping groups (possibly
    /// naming a topic with no partition), and a previous assignment that may point at vanished
    /// members and may split slots.
    fn arb_case(equal_weights: bool) -> impl Strategy<Value = Case> {
        (
            prop::collection::btree_set(0u32..50, 1..=6),
            prop::collection::vec(1u32..=4, 6),
            prop::collection::vec(prop_oneof![0u32..=2, 0u32..=8], 5),
            prop::collection::vec(prop::collection::vec(0usize..6, 0..=3), 0..=3),
            prop::collection::vec(prop::bool::weighted(0.8), 40),
            prop::collection::vec(prop::option::weighted(0.7, 0usize..8), 40),
            any::<bool>(),
        )
            .prop_map(move |(ids, weights, counts, groups, held, prev, per_slot)| {
                let members: Vec<(u32, u32)> =
                    ids.iter().zip(&weights).map(|(&m, &w)| (m, if equal_weights { 1 } else { w })).collect();
                let groups: Vec<Vec<Arc<str>>> =
                    groups.into_iter().map(|g| g.into_iter().map(|t| Arc::from(TOPICS[t])).collect()).collect();
                let mut partitions = Vec::new();
                for (t, &count) in counts.iter().enumerate() {
                    for p in 0..count {
                        if held[t * 8 + p as usize] {
                            partitions.push(TopicPartition::new(TOPICS[t], p));
                        }
                    }
                }
                // Previous owners: a present member, or a vanished one (ids 100 and up).
                let who = |k: usize| ids.iter().nth(k).copied().unwrap_or(100 + k as u32);
                let mut case = Case { members, groups, partitions, previous: HashMap::new() };
                let mut by_slot: HashMap<(Arc<str>, u32), Option<u32>> = HashMap::new();
                for (i, tp) in case.partitions.iter().enumerate() {
                    let mine = prev[i].map(who);
                    // Either co-partition consistent (the slot's first partition decides) or not.
                    let owner = if per_slot { *by_slot.entry(case.slot_of(tp)).or_insert(mine) } else { mine };
                    if let Some(m) = owner {
                        case.previous.insert(tp.clone(), m);
                    }
                }
                case
            })
    }

    /// Properties 1 to 4 of the module documentation for one run.
    fn check(case: &Case, out: &Out) -> Result<(), TestCaseError> {
        // Every member listed, each with sorted partitions.
        let ids: BTreeSet<u32> = case.members.iter().map(|&(m, _)| m).collect();
        prop_assert_eq!(out.keys().copied().collect::<BTreeSet<_>>(), ids);
        for tps in out.values() {
            prop_assert!(tps.is_sorted());
        }
        // 1. Complete and exclusive.
        let mut all: Vec<TopicPartition> = out.values().flatten().cloned().collect();
        all.sort();
        let mut want = case.partitions.clone();
        want.sort();
        want.dedup();
        prop_assert_eq!(&all, &want);
        // 2. Co-partitioned.
        let owner = flatten(out);
        for tps in case.slots().values() {
            prop_assert!(tps.iter().all(|tp| owner[tp] == owner[&tps[0]]), "slot {:?} split", tps);
        }
        // 3. Balanced: floor or ceil of the weighted share; no member starved when it can be helped.
        let per_member = slot_owners(case, out).into_values().fold(BTreeMap::<u32, usize>::new(), |mut acc, m| {
            *acc.entry(m).or_default() += 1;
            acc
        });
        let s = case.slots().len() as u64;
        let total: u64 = case.members.iter().map(|&(_, w)| u64::from(w)).sum();
        let (mut below_one, mut starved, mut floors) = (0u64, 0u64, 0u64);
        for &(m, w) in &case.members {
            let got = per_member.get(&m).copied().unwrap_or(0) as u64;
            let (floor, ceil) = (s * u64::from(w) / total, (s * u64::from(w)).div_ceil(total));
            prop_assert!(floor <= got && got <= ceil, "member {m} got {got}, share {floor}..={ceil}");
            floors += floor;
            if floor == 0 && ceil == 1 {
                below_one += 1;
                starved += u64::from(got == 0);
            }
        }
        // The members with a share below one are served first from the leftover slots.
        let leftover = s - floors;
        prop_assert_eq!(starved, below_one.saturating_sub(leftover), "starved members");
        if case.members.iter().all(|&(_, w)| w == case.members[0].1) && s >= case.members.len() as u64 {
            prop_assert_eq!(per_member.len(), case.members.len(), "equal members starved");
        }
        // 4. Sticky: a member keeps all its previous slots, or as many as its quota lets it.
        let now = slot_owners(case, out);
        let was = case.was(&case.previous);
        for &(m, _) in &case.members {
            let held = was.values().filter(|&&w| w == m).count();
            let kept = was.iter().filter(|&(slot, &w)| w == m && now[slot] == m).count();
            let got = per_member.get(&m).copied().unwrap_or(0);
            prop_assert_eq!(kept, held.min(got), "member {} kept {} of {} with {} slots", m, kept, held, got);
        }
        Ok(())
    }

    proptest! {
        #[test]
        fn assign_is_complete_copartitioned_balanced_sticky(case in arb_case(false)) {
            let out = case.run().expect("members are valid");
            check(&case, &out)?;
            // Idempotent: from its own result, the assignment does not change.
            let again = case.run_with(&flatten(&out)).expect("members are valid");
            prop_assert_eq!(&again, &out);
        }

        #[test]
        fn assign_is_deterministic(
            (case, members, groups, partitions) in arb_case(false).prop_flat_map(|case| {
                let members = Just(case.members.clone()).prop_shuffle();
                let groups = Just(case.groups.clone()).prop_shuffle();
                let partitions = Just(case.partitions.clone()).prop_shuffle();
                (Just(case), members, groups, partitions)
            })
        ) {
            let shuffled = Case { members, groups, partitions, previous: case.previous.clone() };
            prop_assert_eq!(case.run(), shuffled.run());
        }

        #[test]
        fn any_balanced_previous_assignment_is_kept(
            (case, ids) in arb_case(true).prop_flat_map(|case| {
                let ids: Vec<u32> = case.members.iter().map(|&(m, _)| m).collect();
                (Just(case), Just(ids).prop_shuffle())
            })
        ) {
            // Relabel a balanced assignment: still balanced (equal weights), so nothing moves,
            // whichever members hold the extra slots.
            let out = case.run().expect("members are valid");
            let relabel: HashMap<u32, u32> = out.keys().copied().zip(ids).collect();
            let relabeled: Out = out.into_iter().map(|(m, tps)| (relabel[&m], tps)).collect();
            prop_assert_eq!(&case.run_with(&flatten(&relabeled)).expect("members are valid"), &relabeled);
        }

        #[test]
        fn adding_a_member_moves_only_what_fills_it(case in arb_case(true), new in 0u32..60) {
            let new = if case.members.iter().any(|&(m, _)| m == new) { 200 + new } else { new };
            let before = case.run().expect("members are valid");
            let mut grown = case.clone();
            grown.members.push((new, 1));
            let after = grown.run_with(&flatten(&before)).expect("members are valid");
            check(&Case { previous: flatten(&before), ..grown.clone() }, &after)?;
            let (was, now) = (slot_owners(&case, &before), slot_owners(&grown, &after));
            let moved = was.iter().filter(|&(slot, m)| now[slot] != *m).count();
            let filled = now.values().filter(|&&m| m == new).count();
            prop_assert_eq!(moved, filled, "moved {} slots to fill {}", moved, filled);
        }

        #[test]
        fn adding_a_weighted_member_moves_only_from_members_over_quota(
            case in arb_case(false),
            new in 0u32..60,
            weight in 1u32..=4,
        ) {
            let new = if case.members.iter().any(|&(m, _)| m == new) { 200 + new } else { new };
            let before = case.run().expect("members are valid");
            let mut grown = case.clone();
            grown.members.push((new, weight));
            let previous = flatten(&before);
            let after = grown.run_with(&previous).expect("members are valid");
            check(&Case { previous, ..grown }, &after)?;
        }

        #[test]
        fn removing_a_member_moves_only_its_slots(case in arb_case(true), which in any::<prop::sample::Index>()) {
            if case.members.len() < 2 {
                return Ok(());
            }
            let before = case.run().expect("members are valid");
            let mut shrunk = case.clone();
            let (gone, _) = shrunk.members.remove(which.index(case.members.len()));
            let after = shrunk.run_with(&flatten(&before)).expect("members are valid");
            let (was, now) = (slot_owners(&case, &before), slot_owners(&shrunk, &after));
            let moved = was.iter().filter(|&(slot, m)| now[slot] != *m).count();
            prop_assert_eq!(moved, was.values().filter(|&&m| m == gone).count());
        }
    }

    fn tps(spec: &[(&str, u32)]) -> Vec<TopicPartition> {
        spec.iter().map(|&(t, p)| TopicPartition::new(t, p)).collect()
    }

    fn run(
        members: &[(u32, u32)],
        groups: &[&[&str]],
        partitions: &[TopicPartition],
        previous: &[(&str, u32, u32)],
    ) -> Out {
        let groups: Vec<Vec<Arc<str>>> = groups.iter().map(|g| g.iter().map(|&t| Arc::from(t)).collect()).collect();
        let previous = previous.iter().map(|&(t, p, m)| (TopicPartition::new(t, p), m)).collect();
        assign(&AssignInput { members, groups: &groups, partitions, previous: &previous }).expect("members are valid")
    }

    #[test]
    fn bad_members_are_refused() {
        let previous = HashMap::new();
        let input = |members| AssignInput { members, groups: &[], partitions: &[], previous: &previous };
        assert_eq!(assign(&input(&[])), Err(AssignError::NoMembers));
        assert_eq!(assign(&input(&[(0u32, 1), (1, 0)])), Err(AssignError::ZeroWeight { index: 1 }));
        assert_eq!(
            assign(&input(&[(5u32, 1), (1, 1), (5, 2)])),
            Err(AssignError::DuplicateMember { first: 0, index: 2 })
        );
    }

    #[test]
    fn no_slots_gives_every_member_nothing() {
        let out = run(&[(0, 1), (1, 3)], &[&["a", "b"]], &[], &[("a", 0, 1)]);
        assert_eq!(out, BTreeMap::from([(0, vec![]), (1, vec![])]));
    }

    #[test]
    fn each_group_is_spread_over_the_members() {
        let parts: Vec<TopicPartition> = (0..4).flat_map(|p| tps(&[("a", p), ("b", p)])).collect();
        let out = run(&[(0, 1), (1, 1)], &[], &parts, &[]);
        for tps in out.values() {
            assert_eq!(tps.iter().filter(|tp| &*tp.topic == "a").count(), 2, "{out:?}");
            assert_eq!(tps.iter().filter(|tp| &*tp.topic == "b").count(), 2, "{out:?}");
        }
    }

    #[test]
    fn a_rejoining_member_is_not_starved() {
        // Everything was on member 0 while member 1 was away (Faust bug #93).
        let parts = tps(&[("a", 0), ("a", 1), ("a", 2), ("a", 3)]);
        let previous: Vec<(&str, u32, u32)> = (0..4).map(|p| ("a", p, 0)).collect();
        let out = run(&[(0, 1), (1, 1)], &[], &parts, &previous);
        assert_eq!(out[&0], tps(&[("a", 0), ("a", 1)]));
        assert_eq!(out[&1], tps(&[("a", 2), ("a", 3)]));
        // A light member still gets a slot when the floor/ceil rule allows it.
        let out = run(&[(0, 100), (1, 1)], &[], &parts[..2], &previous);
        assert_eq!((out[&0].len(), out[&1].len()), (1, 1));
    }

    #[test]
    fn a_member_over_quota_keeps_a_spread_of_its_groups() {
        let parts = tps(&[("a", 0), ("a", 1), ("b", 0), ("b", 1)]);
        let previous: Vec<(&str, u32, u32)> = parts.iter().map(|tp| (&*tp.topic, tp.partition, 0)).collect();
        let out = run(&[(0, 1), (1, 1)], &[], &parts, &previous);
        assert_eq!(out[&0], tps(&[("a", 0), ("b", 0)]));
        assert_eq!(out[&1], tps(&[("a", 1), ("b", 1)]));
    }

    #[test]
    fn weights_give_proportional_shares() {
        let parts: Vec<TopicPartition> = (0..12).map(|p| TopicPartition::new("a", p)).collect();
        let out = run(&[(0, 1), (1, 2), (2, 3)], &[], &parts, &[]);
        assert_eq!(out.values().map(Vec::len).collect::<Vec<_>>(), [2, 4, 6]);
    }

    #[test]
    fn vanished_members_and_partitions_in_previous_are_ignored() {
        let parts = tps(&[("a", 0), ("a", 1), ("a-changelog", 0), ("a-changelog", 1)]);
        let previous = [("a", 0, 7), ("a-changelog", 0, 7), ("a", 1, 1), ("a-changelog", 1, 1), ("a", 9, 0)];
        let out = run(&[(0, 1), (1, 1)], &[&["a", "a-changelog"]], &parts, &previous);
        assert_eq!(out[&0], tps(&[("a", 0), ("a-changelog", 0)]));
        assert_eq!(out[&1], tps(&[("a", 1), ("a-changelog", 1)]));
    }

    #[test]
    fn groups_sharing_a_topic_are_one_group_and_counts_may_differ() {
        // a and b share c: all three are co-partitioned; c has only partition 0.
        let parts = tps(&[("a", 0), ("a", 1), ("b", 0), ("b", 1), ("c", 0)]);
        let out = run(&[(0, 1), (1, 1)], &[&["a", "c"], &["c", "b"]], &parts, &[("b", 0, 1)]);
        assert_eq!(out[&1], tps(&[("a", 0), ("b", 0), ("c", 0)]));
        assert_eq!(out[&0], tps(&[("a", 1), ("b", 1)]));
    }
}
