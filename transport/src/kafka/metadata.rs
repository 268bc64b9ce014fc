//! The cluster as one core knows it: brokers, and the leader of each partition of the topics
//! it has used. Refreshed on demand (a topic not known yet, a leader moved, a connection
//! failed) and on CreateTopics.

use std::collections::HashMap;
use std::rc::Rc;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kafka_protocol::messages::{
    ApiKey, CreateTopicsRequest, MetadataRequest,
    create_topics_request::{CreatableTopic, CreatableTopicConfig},
    metadata_request::MetadataRequestTopic,
};
use kafka_protocol::protocol::StrBytes;

use super::connection::{About, Connection};
use super::protocol::code;
use super::{KafkaCore, Lane, topic_name};
use crate::error::{Error, Result};
use crate::types::{TopicConfig, TopicMetadata, TopicPartition};

/// What one core knows of the cluster.
#[derive(Debug, Default)]
pub(crate) struct Cluster {
    /// Broker addresses by node id.
    brokers: HashMap<i32, Arc<str>>,
    /// The controller's node id (CreateTopics goes there).
    controller: Option<i32>,
    /// Per topic, the leader's node id of each partition (-1 while there is none).
    topics: HashMap<Arc<str>, Vec<i32>>,
}

impl Cluster {
    pub(crate) fn brokers(&self) -> impl Iterator<Item = &Arc<str>> {
        self.brokers.values()
    }

    /// Forgets the leaders (brokers are kept as connection candidates).
    pub(crate) fn invalidate(&mut self) {
        self.topics.clear();
    }
}

impl KafkaCore {
    /// Asks a broker for the metadata of `topics` and records it. Topics the broker does not
    /// know are forgotten.
    async fn refresh_metadata(&self, topics: &[&str]) -> Result<()> {
        let conn = self.any_connection().await?;
        let req = MetadataRequest::default()
            .with_topics(Some(
                topics.iter().map(|t| MetadataRequestTopic::default().with_name(Some(topic_name(t)))).collect(),
            ))
            .with_allow_auto_topic_creation(false);
        let (_, resp) = conn.request(ApiKey::Metadata, &req, self.options().request_timeout, About::default()).await?;
        let mut cluster = self.st.cluster.borrow_mut();
        for b in &resp.brokers {
            cluster.brokers.insert(b.node_id.0, Arc::from(format!("{}:{}", b.host.as_str(), b.port)));
        }
        cluster.controller = (resp.controller_id.0 >= 0).then_some(resp.controller_id.0);
        for t in &resp.topics {
            let Some(name) = &t.name else { continue };
            if t.error_code != code::NONE {
                cluster.topics.remove(name.0.as_str());
                continue;
            }
            let mut leaders = vec![-1; t.partitions.len()];
            for p in &t.partitions {
                if let Some(slot) = usize::try_from(p.partition_index).ok().and_then(|i| leaders.get_mut(i)) {
                    *slot = if p.error_code == code::NONE { p.leader_id.0 } else { -1 };
                }
            }
            cluster.topics.insert(Arc::from(name.0.as_str()), leaders);
        }
        Ok(())
    }

    /// The number of partitions of `name`, or `None` if the cluster has no such topic.
    /// With `fresh`, asks the cluster even if the topic is known.
    pub(super) async fn partition_count(&self, name: &str, fresh: bool) -> Result<Option<u32>> {
        if fresh || !self.st.cluster.borrow().topics.contains_key(name) {
            self.refresh_metadata(&[name]).await?;
        }
        Ok(self.st.cluster.borrow().topics.get(name).map(|l| l.len() as u32))
    }

    /// The names of every topic the cluster has, sorted: one Metadata request for all topics
    /// (`topics: None`). Left out: topics the answer gives an error for (one being created
    /// or deleted, one this client may not describe), since they cannot be subscribed to
    /// yet, and internal ones, by the broker's `is_internal` flag (every Metadata version
    /// this client uses has it) and by the `__` prefix (a broker may not flag them all).
    /// The cluster cache is left as it is: this is a listing, not a refresh of the leaders.
    pub(super) async fn topic_names_once(&self) -> Result<Vec<String>> {
        let conn = self.any_connection().await?;
        let req = MetadataRequest::default().with_topics(None).with_allow_auto_topic_creation(false);
        let (_, resp) = conn.request(ApiKey::Metadata, &req, self.options().request_timeout, About::default()).await?;
        let mut names: Vec<String> = resp
            .topics
            .iter()
            .filter(|t| t.error_code == code::NONE && !t.is_internal)
            .filter_map(|t| t.name.as_ref().map(|name| name.0.to_string()))
            .filter(|name| !crate::is_internal_topic(name))
            .collect();
        names.sort_unstable();
        names.dedup();
        Ok(names)
    }

    /// A connection to the leader of `tp`, on `lane`.
    pub(super) async fn leader(&self, tp: &TopicPartition, lane: &Lane) -> Result<Rc<Connection>> {
        let mut refreshed = false;
        loop {
            let addr = {
                let cluster = self.st.cluster.borrow();
                match cluster.topics.get(&*tp.topic) {
                    None => None,
                    Some(leaders) => match leaders.get(tp.partition as usize) {
                        None if refreshed => return Err(Error::UnknownPartition { tp: tp.clone() }),
                        None => None,
                        Some(&id) => cluster.brokers.get(&id).cloned(),
                    },
                }
            };
            if let Some(addr) = addr {
                return self.connection(&addr, lane).await;
            }
            if refreshed {
                let known = self.st.cluster.borrow().topics.contains_key(&*tp.topic);
                if !known {
                    return Err(Error::UnknownTopic { topic: tp.topic.to_string() });
                }
                // The partition has no leader right now: retriable.
                let conn = self.any_connection().await?;
                return Err(conn.broker_error(
                    ApiKey::Metadata,
                    About::partition(&tp.topic, tp.partition),
                    code::LEADER_NOT_AVAILABLE,
                    None,
                ));
            }
            self.refresh_metadata(&[&tp.topic]).await?;
            refreshed = true;
        }
    }

    pub(super) async fn create_topic_once(&self, name: &str, config: &TopicConfig) -> Result<TopicMetadata> {
        let controller = {
            let cluster = self.st.cluster.borrow();
            cluster.controller.and_then(|id| cluster.brokers.get(&id).cloned())
        };
        let conn = match controller {
            Some(addr) => self.connection(&addr, &Lane::Main).await?,
            None => self.any_connection().await?,
        };
        let mut configs = Vec::new();
        let mut set = |k: &'static str, v: String| {
            if config.broker_config.iter().any(|(name, _)| name == k) {
                return;
            }
            configs.push(
                CreatableTopicConfig::default()
                    .with_name(StrBytes::from_static_str(k))
                    .with_value(Some(StrBytes::from_string(v))),
            );
        };
        if config.compacted {
            set("cleanup.policy", "compact".to_string());
        }
        if let Some(r) = config.retention {
            set("retention.ms", r.as_millis().to_string());
        }
        if let Some(b) = config.retention_bytes {
            set("retention.bytes", b.to_string());
        }
        if let Some(d) = config.delete_retention {
            set("delete.retention.ms", d.as_millis().to_string());
        }
        for (k, v) in &config.broker_config {
            configs.push(
                CreatableTopicConfig::default()
                    .with_name(StrBytes::from_string(k.clone()))
                    .with_value(Some(StrBytes::from_string(v.clone()))),
            );
        }
        let timeout = self.options().request_timeout;
        let req = CreateTopicsRequest::default()
            .with_topics(vec![
                CreatableTopic::default()
                    .with_name(topic_name(name))
                    .with_num_partitions(config.partitions as i32)
                    .with_replication_factor(config.replicas.unwrap_or(self.options().replication_factor))
                    .with_configs(configs),
            ])
            .with_timeout_ms(timeout.as_millis().min(i32::MAX as u128) as i32);
        let about = About::topic(name);
        let (_, resp) = conn.request(ApiKey::CreateTopics, &req, timeout, about).await?;
        let result = resp.topics.iter().find(|t| t.name.0.as_str() == name).ok_or_else(|| {
            conn.protocol_error(ApiKey::CreateTopics, about, "the answer does not name the topic".into())
        })?;
        match result.error_code {
            code::NONE | code::TOPIC_ALREADY_EXISTS => {}
            c => {
                let message = result.error_message.as_ref().map(|m| m.to_string());
                return Err(conn.broker_error(ApiKey::CreateTopics, about, c, message));
            }
        }
        let existed = result.error_code == code::TOPIC_ALREADY_EXISTS;
        // Wait (bounded) until the metadata shows every partition with a leader.
        let deadline = Instant::now() + timeout;
        loop {
            self.refresh_metadata(&[name]).await?;
            let state = self.st.cluster.borrow().topics.get(name).cloned();
            if let Some(leaders) = state {
                let existing = leaders.len() as u32;
                if existed && existing != config.partitions {
                    return Err(Error::PartitionMismatch {
                        topic: name.to_string(),
                        existing,
                        requested: config.partitions,
                    });
                }
                if existing == config.partitions && leaders.iter().all(|&l| l >= 0) {
                    let config = if existed { TopicConfig::new(existing) } else { config.clone() };
                    return Ok(TopicMetadata { name: Arc::from(name), config });
                }
            }
            if Instant::now() >= deadline {
                return Err(Error::KafkaTimeout {
                    broker: conn.broker().to_string(),
                    api: "CreateTopics",
                    topic: Some(std::sync::Arc::from(name)),
                    partition: None,
                    timeout,
                });
            }
            glommio::timer::sleep(Duration::from_millis(20)).await;
        }
    }
}
