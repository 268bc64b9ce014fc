//! Set tables (Faust's `app.SetTable`): a table whose values are sets, changed by operations
//! (add, discard, clear, ...) that anyone may send and that are applied on the worker and core
//! owning the key's partition.
//!
//! An operation is a record of the set manager topic `{app}-{table}-setmanager`, keyed by the
//! set's key (so it lands in the key's partition), consumed by an agent the app registers with
//! the table; the table's changelog is created with the manager topic's partition count, so
//! the agent's shard is the key's. Like any event, an operation is applied at least once and
//! its table write exactly once (the agent's writes stand or fall with its ack).

use std::collections::BTreeSet;
use std::hash::Hash;
use std::sync::Arc;

use serde::de::DeserializeOwned;
use serde::{Deserialize, Serialize};

use crate::app::{App, Topic};
use crate::error::{SendError, TableError};
use crate::table::Table;

/// One operation on a set (what the manager topic carries), Faust's set manager operations.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", content = "members", rename_all = "snake_case")]
enum SetOperation<M> {
    Add(Vec<M>),
    Discard(Vec<M>),
    Clear,
    IntersectionUpdate(Vec<M>),
    SymmetricDifferenceUpdate(Vec<M>),
}

impl<M: Ord + Clone> SetOperation<M> {
    fn apply(self, set: &mut BTreeSet<M>) {
        match self {
            SetOperation::Add(members) => set.extend(members),
            SetOperation::Discard(members) => {
                for m in &members {
                    set.remove(m);
                }
            }
            SetOperation::Clear => set.clear(),
            SetOperation::IntersectionUpdate(members) => {
                let keep: BTreeSet<M> = members.into_iter().collect();
                set.retain(|m| keep.contains(m));
            }
            SetOperation::SymmetricDifferenceUpdate(members) => {
                for m in members.into_iter().collect::<BTreeSet<M>>() {
                    if !set.remove(&m) {
                        set.insert(m);
                    }
                }
            }
        }
    }
}

/// A table of sets (Faust's `SetTable`): see [`App::set_table`]. Changes are sent as
/// operations and applied where the key lives; reads are those of a [`Table`] of sets.
pub struct SetTable<K, M> {
    table: Table<K, BTreeSet<M>>,
    manager: Topic<K, SetOperation<M>>,
}

impl<K, M> Clone for SetTable<K, M> {
    fn clone(&self) -> Self {
        SetTable { table: self.table.clone(), manager: self.manager.clone() }
    }
}

impl<K, M> std::fmt::Debug for SetTable<K, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetTable").field("table", &self.table.name()).finish()
    }
}

impl<K, M> SetTable<K, M>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    M: Serialize + DeserializeOwned + Ord + Clone + 'static,
{
    /// The table of sets itself, for reads (`get`, `local_items`, a partition's items).
    pub fn table(&self) -> &Table<K, BTreeSet<M>> {
        &self.table
    }

    /// The set of `key` (empty when it has none), in the current event's partition.
    pub fn members(&self, key: &K) -> Result<BTreeSet<M>, TableError> {
        Ok(self.table.get(key)?.unwrap_or_default())
    }

    /// Whether `member` is in the set of `key`, in the current event's partition.
    pub fn contains(&self, key: &K, member: &M) -> Result<bool, TableError> {
        Ok(self.table.get(key)?.is_some_and(|set| set.contains(member)))
    }

    /// Adds `members` to the set of `key` (Faust's `manager.add`): sent to the key's
    /// partition, where the table's agent applies it. Resolves once the operation is durable.
    pub async fn add(&self, key: &K, members: impl IntoIterator<Item = M>) -> Result<(), SendError> {
        self.send(key, SetOperation::Add(members.into_iter().collect())).await
    }

    /// Removes `members` from the set of `key` (Faust's `manager.discard`).
    pub async fn discard(&self, key: &K, members: impl IntoIterator<Item = M>) -> Result<(), SendError> {
        self.send(key, SetOperation::Discard(members.into_iter().collect())).await
    }

    /// Empties the set of `key` (Faust's `manager.clear`).
    pub async fn clear(&self, key: &K) -> Result<(), SendError> {
        self.send(key, SetOperation::Clear).await
    }

    /// Keeps only the members also in `members` (Faust's `manager.intersection_update`).
    pub async fn intersection_update(&self, key: &K, members: impl IntoIterator<Item = M>) -> Result<(), SendError> {
        self.send(key, SetOperation::IntersectionUpdate(members.into_iter().collect())).await
    }

    /// Keeps the members in exactly one of the set and `members` (Faust's
    /// `manager.symmetric_difference_update`).
    pub async fn symmetric_difference_update(
        &self,
        key: &K,
        members: impl IntoIterator<Item = M>,
    ) -> Result<(), SendError> {
        self.send(key, SetOperation::SymmetricDifferenceUpdate(members.into_iter().collect())).await
    }

    async fn send(&self, key: &K, operation: SetOperation<M>) -> Result<(), SendError> {
        self.manager.send(Some(key), &operation).await.map(drop)
    }
}

impl App {
    /// Declares a table of sets (Faust's `app.SetTable`) with keys `K` and members `M`, and
    /// the agent that applies its operations: [`SetTable::add`], `discard`, `clear`, ... may
    /// be called from anywhere (agents, timers, other threads), and each is applied on the
    /// core that owns the key's partition. Reads go through [`SetTable::table`] as for any
    /// table.
    ///
    /// ```
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("presence"));
    /// let online = app.set_table::<String, String>("online");
    /// let test = app.test_context()?;
    /// let room = "lobby".to_string();
    /// futures_lite::future::block_on(online.add(&room, ["ada".to_string(), "grace".to_string()]))?;
    /// futures_lite::future::block_on(online.discard(&room, ["ada".to_string()]))?;
    /// test.settle()?; // the operations are applied
    /// let sets = test.table(online.table())?;
    /// assert_eq!(sets[&room].iter().collect::<Vec<_>>(), ["grace"]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn set_table<K, M>(&self, name: &str) -> SetTable<K, M>
    where
        K: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static,
        M: Serialize + DeserializeOwned + Ord + Clone + Send + Sync + 'static,
    {
        let manager_name = format!("{}-{name}-setmanager", self.inner.settings.id);
        let key_codec = self.inner.settings.key_serializer.clone();
        let manager = self.topic_with::<K, SetOperation<M>>(&manager_name, key_codec, crate::Codec::JSON);
        let table = self
            .table::<K, BTreeSet<M>>(name)
            .with_default(BTreeSet::new)
            .with_partitions_like(Arc::from(manager_name.as_str()));
        let sets = table.clone();
        self.agent(&format!("{name}-setmanager"), &manager, move |stream| {
            let sets = sets.clone();
            stream.for_each_item(move |key, operation| {
                if let Some(key) = key {
                    sets.update(&key, |set| operation.apply(set))?;
                }
                Ok(())
            })
        });
        SetTable { table, manager }
    }
}

/// A set table every worker reads whole (Faust's `SetGlobalTable`): changed by operations,
/// as a [`SetTable`], and read from a replica of every partition on every worker, as a
/// [`GlobalTable`](crate::GlobalTable). See [`App::set_global_table`].
pub struct SetGlobalTable<K, M> {
    set: SetTable<K, M>,
    global: crate::app::global_table::GlobalTable<K, BTreeSet<M>>,
}

impl<K, M> Clone for SetGlobalTable<K, M> {
    fn clone(&self) -> Self {
        SetGlobalTable { set: self.set.clone(), global: self.global.clone() }
    }
}

impl<K, M> std::fmt::Debug for SetGlobalTable<K, M> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SetGlobalTable").field("table", &self.set.table.name()).finish()
    }
}

impl<K, M> SetGlobalTable<K, M>
where
    K: Serialize + DeserializeOwned + Hash + Eq + Clone + 'static,
    M: Serialize + DeserializeOwned + Ord + Clone + 'static,
{
    /// The set of `key` in this worker's replica (empty when it has none), from any core or
    /// thread.
    pub fn members(&self, key: &K) -> BTreeSet<M> {
        self.global.get(key).unwrap_or_default()
    }

    /// Whether `member` is in the set of `key`, in this worker's replica.
    pub fn contains(&self, key: &K, member: &M) -> bool {
        self.global.get(key).is_some_and(|set| set.contains(member))
    }

    /// The replica (readiness, every set).
    pub fn global(&self) -> &crate::app::global_table::GlobalTable<K, BTreeSet<M>> {
        &self.global
    }

    /// The operations: [`SetTable::add`], [`discard`](SetTable::discard), ...
    pub fn operations(&self) -> &SetTable<K, M> {
        &self.set
    }
}

impl App {
    /// Declares a set table every worker reads whole (Faust's `app.SetGlobalTable`): see
    /// [`App::set_table`] for the operations and [`App::global_table`] for the reads.
    pub fn set_global_table<K, M>(&self, name: &str) -> SetGlobalTable<K, M>
    where
        K: Serialize + DeserializeOwned + Hash + Eq + Clone + Send + Sync + 'static,
        M: Serialize + DeserializeOwned + Ord + Clone + Send + Sync + 'static,
    {
        let set = self.set_table::<K, M>(name);
        let global = self.global_of(set.table.clone());
        SetGlobalTable { set, global }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn operations_do_what_fausts_do() {
        let set = |items: &[u32]| items.iter().copied().collect::<BTreeSet<u32>>();
        let mut s = set(&[1, 2, 3]);
        SetOperation::Add(vec![3, 4]).apply(&mut s);
        assert_eq!(s, set(&[1, 2, 3, 4]));
        SetOperation::Discard(vec![1, 9]).apply(&mut s);
        assert_eq!(s, set(&[2, 3, 4]));
        SetOperation::IntersectionUpdate(vec![3, 4, 5]).apply(&mut s);
        assert_eq!(s, set(&[3, 4]));
        SetOperation::SymmetricDifferenceUpdate(vec![4, 5, 5]).apply(&mut s);
        assert_eq!(s, set(&[3, 5]));
        SetOperation::<u32>::Clear.apply(&mut s);
        assert!(s.is_empty());
        // The operation's record.
        let json = serde_json::to_string(&SetOperation::Add(vec!["a"])).unwrap();
        assert_eq!(json, r#"{"action":"add","members":["a"]}"#);
    }
}
