//! Our assignor inside Kafka's classic group protocol: what members tell the group when they
//! join, how the leader computes the assignment with [`assign`](crate::assign()), and what it
//! sends back.
//!
//! # Two steps, as in Kafka's cooperative protocol
//!
//! Each member's subscription lists the partitions it owns now (including those it is still
//! revoking). The leader computes the balanced, sticky, co-partitioned *target* over the
//! members, then grants each member only the target partitions that nobody else owns: a
//! partition owned by one member and targeted at another is withheld from both. Its owner sees
//! it missing from its assignment, revokes it (stops, commits, releases), and rejoins; in that
//! next generation the partition is owned by nobody, and goes to its target. So two members
//! are never granted the same partition, and the new owner starts from what the old one
//! committed.
//!
//! A partition nobody owns (its owner left or died) goes, when the balance allows, to a
//! member that follows it as a standby: that member holds its state.
//!
//! When two members claim the same partition (one was dropped from the group and has not
//! noticed yet), the claim of the later generation counts; with equal generations neither
//! counts, and the partition is assigned as if free (the stale claimant learns it was dropped
//! when it next talks to the coordinator, and drops everything it holds).
//!
//! # Standby replicas
//!
//! Each partition of a changelog topic (members list which of their topics are changelogs)
//! gets up to `standby_replicas` standbys, never on the member its target places the active
//! on: first where its state already is (the member that owns it now or held it as standby),
//! then the members with the fewest partitions (active and standby) for their weight — the
//! members a dead member's partitions would go to.
//!
//! # Wire formats
//!
//! The subscription and assignment are Kafka's `ConsumerProtocolSubscription` (version 2:
//! topics, owned partitions, generation) and `ConsumerProtocolAssignment`, so other tools can
//! read them; our own data (weight, URL, partition counts, co-partitioned groups, changelogs,
//! standbys) is in their user data, in the versioned binary form of [`MemberData`] and
//! [`AssignmentData`].

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use kafka_protocol::messages::{
    ConsumerProtocolAssignment, ConsumerProtocolSubscription, consumer_protocol_assignment,
};
use kafka_protocol::protocol::{Decodable, Encodable, StrBytes};

use crate::assign::{AssignInput, assign};
use crate::types::TopicPartition;

/// The protocol name of our assignor in JoinGroup (a group's members must all offer it).
pub(crate) const PROTOCOL: &str = "faust-rs";
/// The protocol type: Kafka's consumer protocol (so tools can describe the group).
pub(crate) const PROTOCOL_TYPE: &str = "consumer";
/// Version of the subscription layout written.
const SUBSCRIPTION_VERSION: i16 = 2;
/// Version of the assignment layout written.
const ASSIGNMENT_VERSION: i16 = 1;
/// Version of our user data written.
const DATA_VERSION: u8 = 1;

/// What a member's subscription or assignment bytes were, when they cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{what}: {reason}")]
pub(crate) struct BadData {
    what: &'static str,
    reason: String,
}

/// What a member tells the group about itself when it joins.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct MemberData {
    /// Its share of the work (its core count), at least 1.
    pub(crate) weight: u32,
    /// Where others reach it (its web or control address; may be empty).
    pub(crate) url: String,
    /// The topics whose partitions it takes, with their partition counts.
    pub(crate) topics: Vec<(String, u32)>,
    /// Groups of co-partitioned topics.
    pub(crate) copartitioned: Vec<Vec<String>>,
    /// Which of its topics are table changelogs (they get standbys).
    pub(crate) changelogs: Vec<String>,
    /// The standby partitions it follows now.
    pub(crate) standbys: Vec<TopicPartition>,
}

/// What the leader sends each member beside its partitions.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub(crate) struct AssignmentData {
    /// The changelog partitions it follows as a standby.
    pub(crate) standbys: Vec<TopicPartition>,
    /// Every member's URL with the partitions its target holds (for routing lookups).
    pub(crate) owners: Vec<(String, Vec<TopicPartition>)>,
}

/// One member as the leader sees it in the JoinGroup answer.
#[derive(Debug, Clone)]
pub(crate) struct Joined {
    /// Its member id.
    pub(crate) id: Arc<str>,
    /// The generation of the partitions it claims (-1: none).
    pub(crate) generation: i32,
    /// The partitions it owns now.
    pub(crate) owned: Vec<TopicPartition>,
    /// Its data.
    pub(crate) data: MemberData,
}

/// The leader's decision for one generation.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub(crate) struct Plan {
    /// Per member, the partitions granted now (its target minus what others still own).
    pub(crate) granted: BTreeMap<Arc<str>, Vec<TopicPartition>>,
    /// Per member, where the group is heading (granted plus what it waits for).
    pub(crate) target: BTreeMap<Arc<str>, Vec<TopicPartition>>,
    /// Per member, its standby partitions.
    pub(crate) standbys: BTreeMap<Arc<str>, Vec<TopicPartition>>,
}

impl Plan {
    /// The assignment bytes for `member`.
    pub(crate) fn assignment_for(&self, member: &str, urls: &HashMap<Arc<str>, String>) -> Bytes {
        let owners = self
            .target
            .iter()
            .map(|(m, tps)| (urls.get(m).cloned().unwrap_or_default(), tps.clone()))
            .collect::<Vec<_>>();
        let data = AssignmentData { standbys: self.standbys.get(member).cloned().unwrap_or_default(), owners };
        encode_assignment(self.granted.get(member).map(Vec::as_slice).unwrap_or(&[]), &data)
    }
}

/// Computes the plan for the members of one generation (see the module documentation).
/// Members are taken in id order; the result depends on the inputs only.
pub(crate) fn plan(members: &[Joined], standby_replicas: u32) -> Plan {
    let mut members: Vec<&Joined> = members.iter().collect();
    members.sort_by(|a, b| a.id.cmp(&b.id));
    members.dedup_by(|a, b| a.id == b.id);
    if members.is_empty() {
        return Plan::default();
    }
    // Every partition of every topic any member takes (the largest count wins if members
    // disagree: a topic that grew).
    let mut counts: BTreeMap<&str, u32> = BTreeMap::new();
    for m in &members {
        for (t, n) in &m.data.topics {
            let c = counts.entry(t.as_str()).or_default();
            *c = (*c).max(*n);
        }
    }
    let partitions: Vec<TopicPartition> =
        counts.iter().flat_map(|(t, n)| (0..*n).map(move |p| TopicPartition::new(*t, p))).collect();
    let known: BTreeSet<&TopicPartition> = partitions.iter().collect();
    let mut groups: Vec<Vec<Arc<str>>> = members
        .iter()
        .flat_map(|m| m.data.copartitioned.iter())
        .map(|g| g.iter().map(|t| Arc::from(t.as_str())).collect())
        .collect();
    groups.sort();
    groups.dedup();

    // Who owns what now: the latest generation's claim; a tie claims nothing.
    let mut claims: HashMap<&TopicPartition, (i32, Option<Arc<str>>)> = HashMap::new();
    for m in &members {
        for tp in m.owned.iter().filter(|tp| known.contains(tp)) {
            match claims.get_mut(tp) {
                None => {
                    claims.insert(tp, (m.generation, Some(m.id.clone())));
                }
                Some((g, owner)) if m.generation > *g => {
                    *g = m.generation;
                    *owner = Some(m.id.clone());
                }
                Some((g, owner)) if m.generation == *g => *owner = None,
                Some(_) => {}
            }
        }
    }
    let owner: HashMap<TopicPartition, Arc<str>> =
        claims.into_iter().filter_map(|(tp, (_, m))| m.map(|m| (tp.clone(), m))).collect();

    let weighted: Vec<(Arc<str>, u32)> = members.iter().map(|m| (m.id.clone(), m.data.weight.max(1))).collect();
    let input = AssignInput { members: &weighted, groups: &groups, partitions: &partitions, previous: &owner };
    // Members are distinct (deduplicated), present (not empty) and weighted at least 1.
    let mut target = match assign(&input) {
        Ok(target) => target,
        Err(e) => {
            tracing::error!(error = %e, "the group's assignment failed; assigning nothing this generation");
            return Plan::default();
        }
    };
    prefer_standbys(&members, &groups, &owner, &mut target);
    let granted = target
        .iter()
        .map(|(m, tps)| {
            let free = tps.iter().filter(|tp| owner.get(*tp).is_none_or(|o| o == m)).cloned().collect();
            (m.clone(), free)
        })
        .collect();
    let standbys = standbys(&members, &target, &owner, &partitions, standby_replicas);
    Plan { granted, target, standbys }
}

/// Deals the slots nobody owns (their owner left or died) again among the members `assign`
/// gave them to, each member keeping its count: first to a member that follows one of the
/// slot's partitions as a standby (it holds the state: a takeover then replays only its
/// tail), then the rest in order. Balance and co-partitioning are untouched (whole slots
/// change hands, counts do not), and owned slots never move here.
fn prefer_standbys(
    members: &[&Joined],
    groups: &[Vec<Arc<str>>],
    owner: &HashMap<TopicPartition, Arc<str>>,
    target: &mut BTreeMap<Arc<str>, Vec<TopicPartition>>,
) {
    // Co-partitioned groups, merged where they share a topic: a topic's group index.
    let mut group_of: HashMap<Arc<str>, usize> = HashMap::new();
    for (i, g) in groups.iter().enumerate() {
        let joined: BTreeSet<usize> = g.iter().filter_map(|t| group_of.get(t).copied()).collect();
        let id = joined.iter().next().copied().unwrap_or(i);
        for v in group_of.values_mut() {
            if joined.contains(v) {
                *v = id;
            }
        }
        for t in g {
            group_of.insert(t.clone(), id);
        }
    }
    // A topic in no group is a group of its own (keyed past the groups).
    let slot = |tp: &TopicPartition, group_of: &HashMap<Arc<str>, usize>| -> (Option<usize>, Arc<str>, u32) {
        match group_of.get(&tp.topic) {
            Some(&g) => (Some(g), Arc::from(""), tp.partition),
            None => (None, tp.topic.clone(), tp.partition),
        }
    };
    type Slot = (Option<usize>, Arc<str>, u32);
    let mut slots: BTreeMap<Slot, (Arc<str>, Vec<TopicPartition>)> = BTreeMap::new();
    for (m, tps) in target.iter() {
        for tp in tps {
            slots.entry(slot(tp, &group_of)).or_insert_with(|| (m.clone(), Vec::new())).1.push(tp.clone());
        }
    }
    let free: Vec<Slot> = slots
        .iter()
        .filter(|(_, (_, tps))| tps.iter().all(|tp| !owner.contains_key(tp)))
        .map(|(k, _)| k.clone())
        .collect();
    if free.is_empty() {
        return;
    }
    let mut room: BTreeMap<Arc<str>, usize> = BTreeMap::new();
    for k in &free {
        *room.entry(slots[k].0.clone()).or_default() += 1;
    }
    let mut placed: BTreeMap<Slot, Arc<str>> = BTreeMap::new();
    for k in &free {
        let tps = &slots[k].1;
        let holder = members
            .iter()
            .find(|m| room.get(&m.id).is_some_and(|&r| r > 0) && m.data.standbys.iter().any(|s| tps.contains(s)));
        if let Some(m) = holder {
            if let Some(r) = room.get_mut(&m.id) {
                *r -= 1;
            }
            placed.insert(k.clone(), m.id.clone());
        }
    }
    for k in &free {
        if placed.contains_key(k) {
            continue;
        }
        if let Some((m, r)) = room.iter_mut().find(|(_, r)| **r > 0) {
            *r -= 1;
            placed.insert(k.clone(), m.clone());
        }
    }
    for (k, to) in placed {
        let (from, tps) = &slots[&k];
        if *from == to {
            continue;
        }
        if let Some(list) = target.get_mut(from) {
            list.retain(|tp| !tps.contains(tp));
        }
        if let Some(list) = target.get_mut(&to) {
            list.extend(tps.iter().cloned());
            list.sort();
        }
    }
}

/// The standby partitions of each member (see the module documentation).
fn standbys(
    members: &[&Joined],
    target: &BTreeMap<Arc<str>, Vec<TopicPartition>>,
    owner: &HashMap<TopicPartition, Arc<str>>,
    partitions: &[TopicPartition],
    replicas: u32,
) -> BTreeMap<Arc<str>, Vec<TopicPartition>> {
    let mut out: BTreeMap<Arc<str>, Vec<TopicPartition>> = members.iter().map(|m| (m.id.clone(), Vec::new())).collect();
    let replicas = (replicas as usize).min(members.len().saturating_sub(1));
    if replicas == 0 {
        return out;
    }
    let changelogs: BTreeSet<&str> =
        members.iter().flat_map(|m| m.data.changelogs.iter()).map(String::as_str).collect();
    let active: HashMap<&TopicPartition, &Arc<str>> =
        target.iter().flat_map(|(m, tps)| tps.iter().map(move |tp| (tp, m))).collect();
    let had: HashMap<&Arc<str>, BTreeSet<&TopicPartition>> =
        members.iter().map(|m| (&m.id, m.data.standbys.iter().collect())).collect();
    // A member's load: its active partitions and its standbys. The least loaded are also
    // those the group gives a dead member's partitions to (they are under their share), so a
    // standby there is the one a takeover promotes.
    let mut load: HashMap<&Arc<str>, usize> = target.iter().map(|(m, tps)| (m, tps.len())).collect();
    for tp in partitions.iter().filter(|tp| changelogs.contains(&*tp.topic)) {
        let Some(&active) = active.get(tp) else { continue };
        let mut candidates: Vec<&&Joined> = members.iter().filter(|m| m.id != *active).collect();
        // Where the state is first, then the least loaded for its weight, then id order.
        candidates.sort_by_key(|m| {
            let holds = owner.get(tp) == Some(&m.id) || had.get(&m.id).is_some_and(|s| s.contains(tp));
            let load = load.get(&m.id).copied().unwrap_or(0) as u64 * 1_000_000 / u64::from(m.data.weight.max(1));
            (!holds, load, m.id.clone())
        });
        for m in candidates.into_iter().take(replicas) {
            *load.entry(&m.id).or_default() += 1;
            out.entry(m.id.clone()).or_default().push(tp.clone());
        }
    }
    out
}

/// Encodes a member's subscription: Kafka's consumer subscription with our data inside.
pub(crate) fn encode_subscription(owned: &[TopicPartition], generation: i32, data: &MemberData) -> Bytes {
    let topics = data.topics.iter().map(|(t, _)| StrBytes::from_string(t.clone())).collect();
    let owned_partitions = group_by_topic(owned)
        .into_iter()
        .map(|(topic, partitions)| {
            kafka_protocol::messages::consumer_protocol_subscription::TopicPartition::default()
                .with_topic(super::topic_name(&topic))
                .with_partitions(partitions)
        })
        .collect();
    let sub = ConsumerProtocolSubscription::default()
        .with_topics(topics)
        .with_user_data(Some(encode_member_data(data)))
        .with_owned_partitions(owned_partitions)
        .with_generation_id(generation);
    let mut buf = BytesMut::new();
    buf.put_i16(SUBSCRIPTION_VERSION);
    // Encoding into memory fails only on values out of the format's range (a string longer
    // than i16::MAX bytes): topic names are at most 249 bytes.
    if let Err(e) = sub.encode(&mut buf, SUBSCRIPTION_VERSION) {
        tracing::error!(error = %e, "encoding the group subscription failed");
    }
    buf.freeze()
}

/// Reads a member's subscription (any version Kafka defines).
pub(crate) fn decode_subscription(id: Arc<str>, mut bytes: Bytes) -> Result<Joined, BadData> {
    let bad = |reason: String| BadData { what: "subscription", reason };
    if bytes.remaining() < 2 {
        return Err(bad("shorter than its version".into()));
    }
    let version = bytes.get_i16().clamp(0, 3);
    let sub = ConsumerProtocolSubscription::decode(&mut bytes, version).map_err(|e| bad(e.to_string()))?;
    let owned = sub
        .owned_partitions
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |&p| TopicPartition::new(t.topic.0.as_str(), p.max(0) as u32)))
        .collect();
    let data = match sub.user_data {
        Some(user) => decode_member_data(user)?,
        None => return Err(bad("no user data: the member does not run our assignor".into())),
    };
    Ok(Joined { id, generation: if version >= 2 { sub.generation_id } else { -1 }, owned, data })
}

/// Encodes an assignment: Kafka's consumer assignment with our data inside.
pub(crate) fn encode_assignment(granted: &[TopicPartition], data: &AssignmentData) -> Bytes {
    let assigned_partitions = group_by_topic(granted)
        .into_iter()
        .map(|(topic, partitions)| {
            consumer_protocol_assignment::TopicPartition::default()
                .with_topic(super::topic_name(&topic))
                .with_partitions(partitions)
        })
        .collect();
    let mut user = BytesMut::new();
    user.put_u8(DATA_VERSION);
    put_partitions(&mut user, &data.standbys);
    put_len(&mut user, data.owners.len());
    for (url, tps) in &data.owners {
        put_str(&mut user, url);
        put_partitions(&mut user, tps);
    }
    let assignment = ConsumerProtocolAssignment::default()
        .with_assigned_partitions(assigned_partitions)
        .with_user_data(Some(user.freeze()));
    let mut buf = BytesMut::new();
    buf.put_i16(ASSIGNMENT_VERSION);
    if let Err(e) = assignment.encode(&mut buf, ASSIGNMENT_VERSION) {
        tracing::error!(error = %e, "encoding a group assignment failed");
    }
    buf.freeze()
}

/// Reads an assignment: the partitions granted and our data. An empty assignment (the
/// leader gave this member nothing, or a member without partitions) is valid.
pub(crate) fn decode_assignment(mut bytes: Bytes) -> Result<(Vec<TopicPartition>, AssignmentData), BadData> {
    let bad = |reason: String| BadData { what: "assignment", reason };
    if bytes.is_empty() {
        return Ok((Vec::new(), AssignmentData::default()));
    }
    if bytes.remaining() < 2 {
        return Err(bad("shorter than its version".into()));
    }
    let version = bytes.get_i16().clamp(0, 3);
    let assignment = ConsumerProtocolAssignment::decode(&mut bytes, version).map_err(|e| bad(e.to_string()))?;
    let granted = assignment
        .assigned_partitions
        .iter()
        .flat_map(|t| t.partitions.iter().map(move |&p| TopicPartition::new(t.topic.0.as_str(), p.max(0) as u32)))
        .collect();
    let mut data = AssignmentData::default();
    if let Some(mut user) = assignment.user_data {
        let mut r = Reader { buf: &mut user, what: "assignment data" };
        let version = r.u8()?;
        if version != DATA_VERSION {
            return Err(bad(format!("our data is of version {version}; this worker reads version {DATA_VERSION}")));
        }
        data.standbys = r.partitions()?;
        let n = r.len()?;
        for _ in 0..n {
            let url = r.string()?;
            data.owners.push((url, r.partitions()?));
        }
    }
    Ok((granted, data))
}

fn encode_member_data(data: &MemberData) -> Bytes {
    let mut b = BytesMut::new();
    b.put_u8(DATA_VERSION);
    b.put_u32(data.weight);
    put_str(&mut b, &data.url);
    put_len(&mut b, data.topics.len());
    for (t, n) in &data.topics {
        put_str(&mut b, t);
        b.put_u32(*n);
    }
    put_len(&mut b, data.copartitioned.len());
    for g in &data.copartitioned {
        put_len(&mut b, g.len());
        for t in g {
            put_str(&mut b, t);
        }
    }
    put_len(&mut b, data.changelogs.len());
    for t in &data.changelogs {
        put_str(&mut b, t);
    }
    put_partitions(&mut b, &data.standbys);
    b.freeze()
}

fn decode_member_data(mut bytes: Bytes) -> Result<MemberData, BadData> {
    let mut r = Reader { buf: &mut bytes, what: "member data" };
    let version = r.u8()?;
    if version != DATA_VERSION {
        return Err(BadData {
            what: "member data",
            reason: format!("version {version}; this worker reads version {DATA_VERSION}"),
        });
    }
    let weight = r.u32()?;
    let url = r.string()?;
    let mut topics = Vec::new();
    for _ in 0..r.len()? {
        let t = r.string()?;
        topics.push((t, r.u32()?));
    }
    let mut copartitioned = Vec::new();
    for _ in 0..r.len()? {
        let mut g = Vec::new();
        for _ in 0..r.len()? {
            g.push(r.string()?);
        }
        copartitioned.push(g);
    }
    let mut changelogs = Vec::new();
    for _ in 0..r.len()? {
        changelogs.push(r.string()?);
    }
    let standbys = r.partitions()?;
    Ok(MemberData { weight, url, topics, copartitioned, changelogs, standbys })
}

/// Partitions grouped by topic, topics and partitions sorted.
fn group_by_topic(tps: &[TopicPartition]) -> BTreeMap<String, Vec<i32>> {
    let mut out: BTreeMap<String, Vec<i32>> = BTreeMap::new();
    for tp in tps {
        out.entry(tp.topic.to_string()).or_default().push(tp.partition as i32);
    }
    for ps in out.values_mut() {
        ps.sort_unstable();
        ps.dedup();
    }
    out
}

fn put_len(b: &mut BytesMut, n: usize) {
    b.put_u32(u32::try_from(n).unwrap_or(u32::MAX));
}

fn put_str(b: &mut BytesMut, s: &str) {
    put_len(b, s.len());
    b.put_slice(s.as_bytes());
}

fn put_partitions(b: &mut BytesMut, tps: &[TopicPartition]) {
    let grouped = group_by_topic(tps);
    put_len(b, grouped.len());
    for (t, ps) in grouped {
        put_str(b, &t);
        put_len(b, ps.len());
        for p in ps {
            b.put_u32(p as u32);
        }
    }
}

/// Reads our user data, with every length checked against what is left.
struct Reader<'a> {
    buf: &'a mut Bytes,
    what: &'static str,
}

impl Reader<'_> {
    fn need(&self, n: usize) -> Result<(), BadData> {
        if self.buf.remaining() < n {
            return Err(BadData { what: self.what, reason: format!("truncated: {n} more bytes needed") });
        }
        Ok(())
    }

    fn u8(&mut self) -> Result<u8, BadData> {
        self.need(1)?;
        Ok(self.buf.get_u8())
    }

    fn u32(&mut self) -> Result<u32, BadData> {
        self.need(4)?;
        Ok(self.buf.get_u32())
    }

    /// A count of items that follow, each at least one byte (bounds allocation).
    fn len(&mut self) -> Result<usize, BadData> {
        let n = self.u32()? as usize;
        self.need(n.min(self.buf.remaining() + 1).min(n))?;
        Ok(n)
    }

    fn string(&mut self) -> Result<String, BadData> {
        let n = self.u32()? as usize;
        self.need(n)?;
        let bytes = self.buf.split_to(n);
        String::from_utf8(bytes.to_vec())
            .map_err(|_| BadData { what: self.what, reason: "a string is not UTF-8".into() })
    }

    fn partitions(&mut self) -> Result<Vec<TopicPartition>, BadData> {
        let mut out = Vec::new();
        for _ in 0..self.len()? {
            let topic: Arc<str> = Arc::from(self.string()?);
            for _ in 0..self.len()? {
                out.push(TopicPartition::new(topic.clone(), self.u32()?));
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    use proptest::prelude::*;

    use super::*;

    fn data(weight: u32, topics: &[(&str, u32)], changelogs: &[&str]) -> MemberData {
        MemberData {
            weight,
            url: format!("http://w{weight}"),
            topics: topics.iter().map(|(t, n)| (t.to_string(), *n)).collect(),
            copartitioned: vec![vec!["orders".into(), "counts-changelog".into()]],
            changelogs: changelogs.iter().map(|t| t.to_string()).collect(),
            standbys: Vec::new(),
        }
    }

    #[test]
    fn subscriptions_and_assignments_round_trip() {
        let mut d = data(2, &[("orders", 4), ("counts-changelog", 4)], &["counts-changelog"]);
        d.standbys = vec![TopicPartition::new("counts-changelog", 3)];
        let owned = vec![TopicPartition::new("orders", 1), TopicPartition::new("counts-changelog", 1)];
        let joined = decode_subscription("m".into(), encode_subscription(&owned, 7, &d)).unwrap();
        assert_eq!(joined.data, d);
        assert_eq!(joined.generation, 7);
        let mut got = joined.owned.clone();
        got.sort();
        let mut want = owned.clone();
        want.sort();
        assert_eq!(got, want);

        let a = AssignmentData {
            standbys: vec![TopicPartition::new("counts-changelog", 0)],
            owners: vec![("http://a".into(), owned.clone())],
        };
        let (granted, back) = decode_assignment(encode_assignment(&owned, &a)).unwrap();
        assert_eq!(granted.len(), 2);
        assert_eq!(back.standbys, a.standbys);
        assert_eq!(back.owners[0].0, "http://a");
        assert_eq!(decode_assignment(Bytes::new()).unwrap(), (Vec::new(), AssignmentData::default()));
    }

    #[test]
    fn damaged_data_is_an_error_not_a_panic() {
        let d = data(1, &[("orders", 4)], &[]);
        let full = encode_subscription(&[], 1, &d);
        for cut in 0..full.len() {
            let _ = decode_subscription("m".into(), full.slice(..cut));
        }
        let mut huge = BytesMut::new();
        huge.put_u8(DATA_VERSION);
        huge.put_u32(1);
        huge.put_u32(u32::MAX); // a URL of 4 GiB
        assert!(decode_member_data(huge.freeze()).is_err());
    }

    /// Members of one group, in id order: (weight, generation, owned).
    fn joined(specs: &[(u32, i32, Vec<TopicPartition>)], standbys: &[Vec<TopicPartition>]) -> Vec<Joined> {
        specs
            .iter()
            .enumerate()
            .map(|(i, (w, g, owned))| {
                let mut d = data(*w, &[("orders", 6), ("counts-changelog", 6), ("other", 3)], &["counts-changelog"]);
                d.standbys = standbys.get(i).cloned().unwrap_or_default();
                Joined { id: Arc::from(format!("m{i}")), generation: *g, owned: owned.clone(), data: d }
            })
            .collect()
    }

    #[test]
    fn a_partition_moves_in_two_generations() {
        let all: Vec<TopicPartition> = (0..6)
            .flat_map(|p| [TopicPartition::new("orders", p), TopicPartition::new("counts-changelog", p)])
            .chain((0..3).map(|p| TopicPartition::new("other", p)))
            .collect();
        // m0 owns everything; m1 joins.
        let members = joined(&[(1, 1, all.clone()), (1, -1, Vec::new())], &[]);
        let first = plan(&members, 1);
        assert!(first.granted[&Arc::from("m1")].is_empty(), "nothing is granted while m0 owns it");
        let kept = first.granted[&Arc::from("m0")].clone();
        assert!(kept.len() < all.len());
        // m0 revoked what it lost and rejoins; now m1 gets its target.
        let standbys = vec![first.standbys[&Arc::from("m0")].clone(), first.standbys[&Arc::from("m1")].clone()];
        let members = joined(&[(1, 2, kept.clone()), (1, 2, Vec::new())], &standbys);
        let second = plan(&members, 1);
        assert_eq!(second.granted[&Arc::from("m0")], kept);
        assert_eq!(second.granted[&Arc::from("m1")], first.target[&Arc::from("m1")]);
        // The moved changelog partitions are m0's standbys (it has their state).
        for tp in second.granted[&Arc::from("m1")].iter().filter(|tp| &*tp.topic == "counts-changelog") {
            assert!(second.standbys[&Arc::from("m0")].contains(tp), "{tp}");
        }
    }

    /// A dead member's slots go to the members following them as standbys, when the balance
    /// lets them (each still gets its share).
    #[test]
    fn orphaned_slots_go_to_their_standbys() {
        let tp = |t: &str, p| TopicPartition::new(t, p);
        let member = |id: &str, owned: Vec<TopicPartition>, standbys: Vec<TopicPartition>| Joined {
            id: Arc::from(id),
            generation: 5,
            owned,
            data: MemberData {
                weight: 1,
                url: String::new(),
                topics: vec![("orders".into(), 4), ("counts-changelog".into(), 4)],
                copartitioned: vec![vec!["orders".into(), "counts-changelog".into()]],
                changelogs: vec!["counts-changelog".into()],
                standbys,
            },
        };
        for (a_standby, b_standby) in [(3, 2), (2, 3)] {
            let members = [
                member("a", vec![tp("orders", 0), tp("counts-changelog", 0)], vec![tp("counts-changelog", a_standby)]),
                member("b", vec![tp("orders", 1), tp("counts-changelog", 1)], vec![tp("counts-changelog", b_standby)]),
            ];
            let p = plan(&members, 1);
            assert!(p.granted[&Arc::from("a")].contains(&tp("orders", a_standby)), "{p:?}");
            assert!(p.granted[&Arc::from("a")].contains(&tp("counts-changelog", a_standby)), "{p:?}");
            assert!(p.granted[&Arc::from("b")].contains(&tp("orders", b_standby)), "{p:?}");
            assert_eq!(p.granted[&Arc::from("a")].len(), 4);
        }
    }

    proptest! {
        /// Rounds of a group whose members join, leave and rejoin after revoking: at every
        /// round no partition is granted to a member while another owns it; once members stop
        /// changing, two rounds settle it: every partition granted exactly once, balanced by
        /// weight, co-partitioned, standbys never with their active and at most the replicas
        /// asked for.
        #[test]
        fn rounds_never_grant_an_owned_partition_and_settle(
            weights in prop::collection::vec(1u32..4, 1..5),
            changes in prop::collection::vec((any::<bool>(), 1u32..4), 0..6),
            replicas in 0u32..3,
        ) {
            // (id, weight, owned, generation)
            let mut members: Vec<(Arc<str>, u32, Vec<TopicPartition>, i32)> =
                weights.iter().enumerate().map(|(i, w)| (Arc::from(format!("m{i:02}")), *w, Vec::new(), -1)).collect();
            let mut next = members.len();
            let mut generation = 0;
            let mut standbys: HashMap<Arc<str>, Vec<TopicPartition>> = HashMap::new();
            let round = |members: &mut Vec<(Arc<str>, u32, Vec<TopicPartition>, i32)>, generation: &mut i32,
                             standbys: &mut HashMap<Arc<str>, Vec<TopicPartition>>| -> Plan {
                *generation += 1;
                let js: Vec<Joined> = members.iter().map(|(id, w, owned, g)| {
                    let mut d = data(*w, &[("orders", 6), ("counts-changelog", 6), ("other", 3)], &["counts-changelog"]);
                    d.standbys = standbys.get(id).cloned().unwrap_or_default();
                    Joined { id: id.clone(), generation: *g, owned: owned.clone(), data: d }
                }).collect();
                let p = plan(&js, replicas);
                // Granted only what nobody else owns.
                for (id, granted) in &p.granted {
                    for tp in granted {
                        for (other, _, owned, _) in members.iter() {
                            assert!(other == id || !owned.contains(tp), "{tp} granted to {id} while {other} owns it");
                        }
                    }
                }
                // Each member keeps what is granted (revoking the rest) and records standbys.
                for (id, _, owned, g) in members.iter_mut() {
                    *owned = p.granted.get(id).cloned().unwrap_or_default();
                    *g = *generation;
                }
                *standbys = p.standbys.iter().map(|(m, s)| (m.clone(), s.clone())).collect();
                p
            };
            round(&mut members, &mut generation, &mut standbys);
            for (join, w) in changes {
                if join || members.len() == 1 {
                    members.push((Arc::from(format!("m{next:02}")), w, Vec::new(), -1));
                    next += 1;
                } else {
                    members.remove(w as usize % members.len());
                }
                round(&mut members, &mut generation, &mut standbys);
            }
            round(&mut members, &mut generation, &mut standbys);
            let settled = round(&mut members, &mut generation, &mut standbys);
            prop_assert_eq!(&settled.granted, &settled.target, "settled after two rounds");
            let mut all: Vec<TopicPartition> = settled.granted.values().flatten().cloned().collect();
            all.sort();
            prop_assert_eq!(all.len(), 15);
            all.dedup();
            prop_assert_eq!(all.len(), 15, "each partition granted once");
            // Co-partitioned: orders/p and counts-changelog/p together.
            let owner_of: HashMap<&TopicPartition, &Arc<str>> =
                settled.granted.iter().flat_map(|(m, tps)| tps.iter().map(move |tp| (tp, m))).collect();
            for p in 0..6 {
                prop_assert_eq!(
                    owner_of[&TopicPartition::new("orders", p)],
                    owner_of[&TopicPartition::new("counts-changelog", p)]
                );
            }
            // Balanced: 6 slots of the co-partitioned group plus 3 of `other`, within one of
            // each member's share.
            let total_weight: u32 = members.iter().map(|m| m.1).sum();
            for (id, w, _, _) in &members {
                let slots = settled.granted[id].iter().filter(|tp| &*tp.topic != "counts-changelog").count() as f64;
                let share = 9.0 * f64::from(*w) / f64::from(total_weight);
                prop_assert!((slots - share).abs() < 1.0 + 1e-9, "{id}: {slots} slots, share {share}");
            }
            // Standbys: never with their active, as many as asked (or members - 1).
            let want = (replicas as usize).min(members.len() - 1);
            for p in 0..6 {
                let tp = TopicPartition::new("counts-changelog", p);
                let holders: Vec<&Arc<str>> =
                    settled.standbys.iter().filter(|(_, s)| s.contains(&tp)).map(|(m, _)| m).collect();
                prop_assert_eq!(holders.len(), want);
                prop_assert!(!holders.contains(&owner_of[&tp]));
            }
            // Sticky: another round changes nothing.
            let again = round(&mut members, &mut generation, &mut standbys);
            prop_assert_eq!(again, settled);
        }
    }
}
