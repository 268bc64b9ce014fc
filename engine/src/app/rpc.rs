//! Agent RPC (Faust's `agent.ask`, `map`, `kvmap`, `join`, `kvjoin`): a question is a record
//! sent to the agent's topic with two headers, the asking worker's reply topic and a
//! correlation id; the agent handles it like any event, and each value it emits for it
//! ([`Sinks::emit`](crate::Sinks::emit)) goes to its sinks and, with the correlation id, to
//! the reply topic. Each worker reads its own reply topic (`{id}-reply-{instance}`, one
//! partition, created when the worker starts if the app has an agent that can reply) from
//! its end, on core 0, and hands each reply to the question waiting for it.
//!
//! A question is at least once, like any event: an agent that fails and is restarted on it
//! may reply twice, and the asker takes the first reply. Under `exactly_once`, a reply is
//! visible to the asker once the replying worker commits.

use std::collections::{HashMap, VecDeque};
use std::rc::Rc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use faust_transport::{OffsetSpec, TopicPartition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::Agent;
use crate::error::AskError;
use crate::runtime::CoreRuntime;
use crate::runtime::context::{CORRELATION_HEADER, REPLY_TO_HEADER};
use crate::topic::SendOptions;
use crate::util::lock;

/// The questions of this process waiting for replies, and where replies come back.
#[derive(Default)]
pub(crate) struct Replies {
    /// Set when an agent that can reply is registered: the worker then makes a reply topic.
    wanted: std::sync::atomic::AtomicBool,
    /// The running worker's reply topic.
    topic: Mutex<Option<Arc<str>>>,
    next_id: AtomicU64,
    /// By correlation id: the inbox of the question and its index there.
    waiting: Mutex<HashMap<u64, (Arc<Inbox>, usize)>>,
}

/// Where the replies of one `ask`, `map` or `join` arrive, with the index of the question
/// each answers.
#[derive(Default)]
struct Inbox {
    arrived: Mutex<VecDeque<(usize, Bytes)>>,
    ready: event_listener::Event,
}

impl Replies {
    pub(crate) fn want(&self) {
        self.wanted.store(true, Ordering::Release);
    }

    pub(crate) fn wanted(&self) -> bool {
        self.wanted.load(Ordering::Acquire)
    }

    /// The worker's reply topic, while it runs.
    pub(crate) fn topic(&self) -> Option<Arc<str>> {
        lock(&self.topic).clone()
    }

    /// Sets the worker's reply topic (`None` once it stops).
    pub(crate) fn set_topic(&self, topic: Option<Arc<str>>) {
        *lock(&self.topic) = topic;
    }

    /// Hands a reply to the question `correlation`, if one waits for it (a reply to a question
    /// that gave up, or a second reply, is dropped).
    pub(crate) fn deliver(&self, correlation: &[u8], value: Bytes) {
        let Some(id) = std::str::from_utf8(correlation).ok().and_then(|s| s.parse::<u64>().ok()) else { return };
        let Some((inbox, index)) = lock(&self.waiting).remove(&id) else { return };
        lock(&inbox.arrived).push_back((index, value));
        inbox.ready.notify(usize::MAX);
    }

    fn register(&self, inbox: &Arc<Inbox>, index: usize) -> u64 {
        // Ids need only be unique within this process: replies come to its own topic.
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        lock(&self.waiting).insert(id, (inbox.clone(), index));
        id
    }

    fn forget(&self, ids: &[u64]) {
        let mut waiting = lock(&self.waiting);
        for id in ids {
            waiting.remove(id);
        }
    }
}

/// Reads the worker's reply topic from its end until the worker stops, handing each reply
/// to the question waiting for it (core 0).
pub(crate) async fn read_replies(core: Rc<CoreRuntime>, topic: Arc<str>, replies: Arc<Replies>) {
    let tp = TopicPartition::new(topic, 0);
    let mut next = match core.transport().list_offset(&tp, OffsetSpec::Latest).await {
        Ok(end) => end,
        Err(e) => {
            tracing::error!(topic = %tp, error = %e, "cannot read the reply topic: asks will time out");
            return;
        }
    };
    while !core.stopping().is_cancelled() {
        let fetched = futures_lite::future::or(
            async { Some(core.transport().fetch(&tp, next, 1 << 20, Duration::from_millis(200)).await) },
            async {
                core.stopped().await;
                None
            },
        )
        .await;
        let fetched = match fetched {
            None => return,
            Some(Ok(fetched)) => fetched,
            Some(Err(e)) => {
                tracing::warn!(topic = %tp, error = %e, "reading replies failed; retrying");
                if !core.sleep_unless_stopped(Duration::from_millis(200)).await {
                    return;
                }
                continue;
            }
        };
        for record in &fetched.records {
            let correlation = record.headers().find(|(name, _)| *name == CORRELATION_HEADER).and_then(|(_, v)| v);
            if let (Some(correlation), Some(value)) = (correlation, &record.value) {
                replies.deliver(correlation, value.clone());
            }
        }
        next = next.max(fetched.next_offset);
    }
}

/// Decodes a reply to the question at an index into what the asker gets.
type Decode<T> = Box<dyn Fn(usize, &Bytes) -> Result<T, AskError> + Send + Sync>;

/// The replies of [`Agent::map`] and [`Agent::kvmap`], as they arrive.
pub struct AskStream<T> {
    agent: String,
    replies: Arc<Replies>,
    inbox: Arc<Inbox>,
    ids: Vec<u64>,
    left: usize,
    deadline: Instant,
    timeout: Duration,
    decode: Decode<T>,
}

impl<T> std::fmt::Debug for AskStream<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AskStream").field("agent", &self.agent).field("left", &self.left).finish()
    }
}

impl<T> AskStream<T> {
    /// The next reply to arrive; `None` once every question was answered.
    /// [`AskError::Timeout`] when the time given runs out first (the questions not answered
    /// by then are given up).
    pub async fn next(&mut self) -> Option<Result<T, AskError>> {
        if self.left == 0 {
            return None;
        }
        match wait(&self.inbox, self.deadline).await {
            Some((index, bytes)) => {
                self.left -= 1;
                Some((self.decode)(index, &bytes))
            }
            None => {
                self.left = 0;
                Some(Err(AskError::Timeout { agent: self.agent.clone(), after: self.timeout }))
            }
        }
    }
}

impl<T> Drop for AskStream<T> {
    fn drop(&mut self) {
        self.replies.forget(&self.ids);
    }
}

/// The next reply in `inbox`, or `None` at `deadline`.
async fn wait(inbox: &Inbox, deadline: Instant) -> Option<(usize, Bytes)> {
    loop {
        let listener = inbox.ready.listen();
        if let Some(reply) = lock(&inbox.arrived).pop_front() {
            return Some(reply);
        }
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return None;
        }
        futures_lite::future::or(
            async {
                listener.await;
            },
            async {
                futures_timer::Delay::new(left).await;
            },
        )
        .await;
    }
}

impl<K: Serialize + 'static, V: Serialize + 'static> Agent<K, V> {
    /// Sends `value` to the agent and waits for its reply (Faust's `agent.ask`): the first
    /// value the agent emits for it ([`Sinks::emit`](crate::Sinks::emit)), decoded as `O`
    /// with the app's value codec. The agent must be registered with
    /// [`App::agent_with_sinks`](crate::App::agent_with_sinks) (its sinks may be empty), and
    /// the worker must be running; the question may come from an agent, a timer or another
    /// thread.
    ///
    /// ```no_run
    /// # use std::time::Duration;
    /// # use faust::{App, Settings};
    /// # let app = App::new(Settings::new("doc"));
    /// let numbers = app.topic::<String, u64>("numbers");
    /// let double = app.agent_with_sinks("double", &numbers, vec![], |mut stream, replies| async move {
    ///     while let Some(n) = stream.next().await {
    ///         replies.emit(&(n * 2))?;
    ///     }
    ///     Ok(())
    /// });
    /// app.task(move || {
    ///     let double = double.clone();
    ///     async move {
    ///         let four: u64 = double.ask(None, &2, Duration::from_secs(5)).await?;
    ///         assert_eq!(four, 4);
    ///         Ok(())
    ///     }
    /// });
    /// ```
    pub async fn ask<O: DeserializeOwned + 'static>(
        &self,
        key: Option<&K>,
        value: &V,
        timeout: Duration,
    ) -> Result<O, AskError> {
        let mut replies = self.ask_all([(key, value)], timeout, |_, o| o).await?;
        match replies.next().await {
            Some(reply) => reply,
            None => Err(AskError::Timeout { agent: self.name(), after: timeout }),
        }
    }

    /// Sends every value to the agent and yields the replies as they arrive (Faust's
    /// `agent.map`), within `timeout` for all of them.
    pub async fn map<O: DeserializeOwned + 'static>(
        &self,
        values: impl IntoIterator<Item = V>,
        timeout: Duration,
    ) -> Result<AskStream<O>, AskError> {
        let values: Vec<V> = values.into_iter().collect();
        self.ask_all(values.iter().map(|v| (None, v)), timeout, |_, o| o).await
    }

    /// [`map`](Agent::map) with keys: each reply comes with the key of its question (Faust's
    /// `agent.kvmap`).
    pub async fn kvmap<O: DeserializeOwned + 'static>(
        &self,
        items: impl IntoIterator<Item = (K, V)>,
        timeout: Duration,
    ) -> Result<AskStream<(K, O)>, AskError>
    where
        K: Clone + Send + Sync,
    {
        let items: Vec<(K, V)> = items.into_iter().collect();
        let keys: Vec<K> = items.iter().map(|(k, _)| k.clone()).collect();
        self.ask_all(items.iter().map(|(k, v)| (Some(k), v)), timeout, move |i, o| (keys[i].clone(), o)).await
    }

    /// Sends every value to the agent and returns the replies in the order of the values
    /// (Faust's `agent.join`), once all arrived within `timeout`.
    pub async fn join<O: DeserializeOwned + 'static>(
        &self,
        values: impl IntoIterator<Item = V>,
        timeout: Duration,
    ) -> Result<Vec<O>, AskError> {
        let values: Vec<V> = values.into_iter().collect();
        let stream = self.ask_all(values.iter().map(|v| (None, v)), timeout, |i, o| (i, o)).await?;
        in_order(stream, values.len()).await
    }

    /// [`join`](Agent::join) with keys: the replies with their keys, in the order given
    /// (Faust's `agent.kvjoin`).
    pub async fn kvjoin<O: DeserializeOwned + 'static>(
        &self,
        items: impl IntoIterator<Item = (K, V)>,
        timeout: Duration,
    ) -> Result<Vec<(K, O)>, AskError>
    where
        K: Clone + Send + Sync,
    {
        let items: Vec<(K, V)> = items.into_iter().collect();
        let keys: Vec<K> = items.iter().map(|(k, _)| k.clone()).collect();
        let stream = self.ask_all(items.iter().map(|(k, v)| (Some(k), v)), timeout, |i, o| (i, o)).await?;
        let replies: Vec<O> = in_order(stream, items.len()).await?;
        Ok(keys.into_iter().zip(replies).collect())
    }

    fn name(&self) -> String {
        lock(&self.app.agents).get(self.index).map_or_else(|| "?".to_string(), |a| a.name.clone())
    }

    /// Sends each question with its reply headers; the stream yields `shape(index, reply)`.
    async fn ask_all<'a, O: DeserializeOwned + 'static, T>(
        &self,
        questions: impl IntoIterator<Item = (Option<&'a K>, &'a V)>,
        timeout: Duration,
        shape: impl Fn(usize, O) -> T + Send + Sync + 'static,
    ) -> Result<AskStream<T>, AskError> {
        let agent = self.name();
        let replies = self.app.replies.clone();
        let Some(topic) = replies.topic() else {
            let reason = if replies.wanted() {
                "the worker is not running"
            } else {
                "no agent of the app can reply (register it with agent_with_sinks)"
            };
            return Err(AskError::NotRunning { agent, reason });
        };
        let inbox = Arc::new(Inbox::default());
        let codec = self.app.settings.value_serializer.clone();
        let mut stream = AskStream {
            agent: agent.clone(),
            replies: replies.clone(),
            inbox: inbox.clone(),
            ids: Vec::new(),
            left: 0,
            deadline: Instant::now() + timeout,
            timeout,
            decode: {
                let agent = agent.clone();
                Box::new(move |index, bytes| {
                    let value = codec
                        .decode_bytes::<O>(bytes)
                        .map_err(|source| AskError::Decode { agent: agent.clone(), source })?;
                    Ok(shape(index, value))
                })
            },
        };
        for (index, (key, value)) in questions.into_iter().enumerate() {
            let id = replies.register(&inbox, index);
            stream.ids.push(id);
            stream.left += 1;
            let options = SendOptions {
                headers: vec![
                    (String::from_utf8_lossy(REPLY_TO_HEADER).into_owned(), topic.as_bytes().to_vec()),
                    (String::from_utf8_lossy(CORRELATION_HEADER).into_owned(), id.to_string().into_bytes()),
                ],
                ..SendOptions::default()
            };
            self.topic
                .send_with(key, value, &options)
                .await
                .map_err(|source| AskError::Send { agent: agent.clone(), source: Box::new(source) })?;
        }
        Ok(stream)
    }
}

/// All the replies of `stream`, placed by the index of their question.
async fn in_order<O>(mut stream: AskStream<(usize, O)>, n: usize) -> Result<Vec<O>, AskError> {
    let mut slots: Vec<Option<O>> = (0..n).map(|_| None).collect();
    while let Some(reply) = stream.next().await {
        let (index, value) = reply?;
        slots[index] = Some(value);
    }
    let agent = stream.agent.clone();
    slots.into_iter().map(|s| s.ok_or(AskError::Timeout { agent: agent.clone(), after: stream.timeout })).collect()
}

/// The name of the reply topic of the worker whose instance id is `instance`.
pub(crate) fn reply_topic(app_id: &str, instance: &str) -> String {
    format!("{app_id}-reply-{instance}")
}

/// A reply topic's settings: one partition, replies kept a day (Faust's `reply_expires`).
pub(crate) fn reply_topic_config() -> faust_transport::TopicConfig {
    faust_transport::TopicConfig {
        retention: Some(Duration::from_secs(86_400)),
        ..faust_transport::TopicConfig::new(1)
    }
}
