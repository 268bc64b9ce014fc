//! A test harness in the spirit of Faust's `agent.test_context()`: the app's agents run on a
//! real worker (one core, `memory://`) on a background thread, and the test puts events in
//! and reads what came out, without a broker or a data directory of its own.

use std::sync::Arc;
use std::thread::JoinHandle;

use faust_transport::{CoreTransport, MemoryTransport, Produced, TopicPartition};
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::{App, AppInner, Probe, Reply, SendError, StopSignal, Topic, TopicKind};
use crate::codec::CodecError;
use crate::worker::WorkerError;

/// What went wrong in a [`TestContext`].
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum TestError {
    /// The event could not be sent.
    #[error(transparent)]
    Send(#[from] SendError),
    /// Reading a topic failed.
    #[error(transparent)]
    Transport(#[from] faust_transport::Error),
    /// A record of the topic does not decode as the topic's types.
    #[error("{tp} offset {offset}: {source}")]
    Decode {
        /// Where the record is.
        tp: TopicPartition,
        /// Its offset.
        offset: u64,
        /// The codec's error.
        #[source]
        source: CodecError,
    },
    /// The worker stopped with an error.
    #[error(transparent)]
    Worker(#[from] WorkerError),
    /// The worker thread could not be started.
    #[error("starting the worker thread: {0}")]
    Spawn(#[source] std::io::Error),
    /// The worker thread panicked.
    #[error("the worker thread panicked")]
    Panicked,
}

/// The app's worker running for a test: see [`App::test_context`].
pub struct TestContext {
    transport: MemoryTransport,
    inner: Arc<AppInner>,
    stop: Arc<StopSignal>,
    worker: Option<JoinHandle<Result<(), WorkerError>>>,
}

impl std::fmt::Debug for TestContext {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestContext").field("app", &self.inner.settings.id).finish()
    }
}

impl App {
    /// Starts the app's worker for a test (Faust's `agent.test_context()`): one core, on a
    /// fresh `memory://` transport, whatever the settings say about the broker and cores.
    /// [`TestContext::put`] sends an event and returns once every agent has processed it;
    /// [`TestContext::records`] reads what a topic holds. Stopped by [`TestContext::stop`] or
    /// when dropped.
    ///
    /// ```
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("doubler"));
    /// let numbers = app.topic::<String, u64>("numbers");
    /// let doubled = app.topic::<String, u64>("doubled");
    /// let out = doubled.clone();
    /// app.agent("double", &numbers, move |stream| {
    ///     let out = out.clone();
    ///     async move {
    ///         let mut stream = stream.map(|n| n * 2);
    ///         while let Some((key, n)) = stream.next_item().await {
    ///             out.send_soon(key.as_ref(), &n)?;
    ///         }
    ///         Ok(())
    ///     }
    /// });
    ///
    /// let test = app.test_context()?;
    /// test.put(&numbers, Some(&"a".to_string()), &21)?;
    /// assert_eq!(test.records(&doubled)?, vec![(Some("a".to_string()), 42)]);
    /// test.stop()?;
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn test_context(&self) -> Result<TestContext, TestError> {
        let transport = MemoryTransport::new();
        // A context started after an earlier one stopped starts afresh: not stopped, and
        // taking sends at once (the worker thread may not have started when `put` is called).
        self.inner.stop.reset();
        self.inner.outbox.open();
        let mut settings = self.inner.settings.clone();
        settings.broker = "memory://".into();
        settings.cores = Some(1);
        // Tables start empty with the transport: in memory.
        settings.store = "memory://".into();
        // The same topics, agents, stop signal and outbox (which the topic handles send to),
        // with the test's settings and transport.
        let app = self.with_settings(settings);
        *crate::util::lock(&app.inner.memory) = Some(transport.clone());
        let inner = app.inner.clone();
        let worker = std::thread::Builder::new()
            .name(format!("{}-test", inner.settings.id))
            .spawn(move || app.run())
            .map_err(TestError::Spawn)?;
        Ok(TestContext { transport, stop: inner.stop.clone(), inner, worker: Some(worker) })
    }
}

impl TestContext {
    /// Sends an event to `topic` (or channel) and waits until every agent consuming it has
    /// processed it (moved past it or acked it) and what they sent for it is written.
    pub fn put<K: Serialize + 'static, V: Serialize + 'static>(
        &self,
        topic: &Topic<K, V>,
        key: Option<&K>,
        value: &V,
    ) -> Result<Produced, TestError> {
        futures_lite::future::block_on(async {
            let produced = topic.send(key, value).await?;
            let reply = Arc::new(Reply::default());
            let tp = TopicPartition::new(topic.inner.name.clone(), produced.partition);
            self.inner.outbox.probe(Probe { tp, offset: produced.base_offset, reply: reply.clone(), commit: false });
            reply.wait().await?;
            self.settle_repartitioned().await?;
            Ok(produced)
        })
    }

    /// Waits until the agents have processed every record now in the topics they consume,
    /// whoever sent them (a send from another thread, a [`SetTable`](crate::SetTable)
    /// operation, an agent's own sends).
    pub fn settle(&self) -> Result<(), TestError> {
        let consumed: Vec<Arc<str>> = crate::util::lock(&self.inner.agents)
            .iter()
            .flat_map(|a| std::iter::once(a.topic.clone()).chain(a.also.iter().cloned()))
            .filter(|t| !t.is_empty())
            .collect();
        futures_lite::future::block_on(self.settle_topics(consumed))
    }

    /// Waits until the agents consuming repartition topics (`group_by`) have processed every
    /// record in them, so that `put` also covers what the event became after re-keying.
    async fn settle_repartitioned(&self) -> Result<(), TestError> {
        let repartitioned: Vec<Arc<str>> = crate::util::lock(&self.inner.topics)
            .iter()
            .filter(|t| t.partitions_like.is_some())
            .map(|t| t.name.clone())
            .collect();
        self.settle_topics(repartitioned).await
    }

    /// Waits until the agents consuming `topics` processed every record now in them.
    async fn settle_topics(&self, topics: Vec<Arc<str>>) -> Result<(), TestError> {
        for name in topics {
            let Some(meta) = self.transport.topic_metadata(&name).await? else { continue };
            for p in 0..meta.config.partitions {
                let tp = TopicPartition::new(name.clone(), p);
                let high_watermark = self.transport.high_watermark(&tp)?;
                if high_watermark == 0 {
                    continue;
                }
                let reply = Arc::new(Reply::default());
                self.inner.outbox.probe(Probe { tp, offset: high_watermark - 1, reply: reply.clone(), commit: false });
                reply.wait().await?;
            }
        }
        Ok(())
    }

    /// Every record of `topic`, decoded: partition 0 first, each partition in offset order.
    /// (A channel holds no records: this is empty for one.)
    pub fn records<K: DeserializeOwned, V: DeserializeOwned>(
        &self,
        topic: &Topic<K, V>,
    ) -> Result<Vec<(Option<K>, V)>, TestError> {
        let name = &topic.inner.name;
        if topic.inner.kind == TopicKind::Channel {
            return Ok(Vec::new());
        }
        let Some(meta) = futures_lite::future::block_on(self.transport.topic_metadata(name))? else {
            return Ok(Vec::new());
        };
        let mut out = Vec::new();
        for p in 0..meta.config.partitions {
            let tp = TopicPartition::new(name.clone(), p);
            for r in self.transport.records(&tp)? {
                let decode_err = |source| TestError::Decode { tp: tp.clone(), offset: r.offset, source };
                let key = match &r.key {
                    Some(k) => Some(topic.inner.key_codec.decode_bytes(k).map_err(decode_err)?),
                    None => None,
                };
                let value = match &r.value {
                    Some(v) => topic.inner.value_codec.decode_bytes(v),
                    None => topic.inner.value_codec.decode(&[]),
                }
                .map_err(decode_err)?;
                out.push((key, value));
            }
        }
        Ok(out)
    }

    /// The committed contents of `table`: commits now (as the commit interval would), then
    /// reads the table's changelog, so what it shows is what a restarted worker recovers.
    pub fn table<K, V>(&self, table: &crate::Table<K, V>) -> Result<std::collections::HashMap<K, V>, TestError>
    where
        K: DeserializeOwned + std::hash::Hash + Eq,
        V: DeserializeOwned,
    {
        futures_lite::future::block_on(async {
            let reply = Arc::new(Reply::default());
            let tp = TopicPartition::new(table.changelog_topic(), 0);
            self.inner.outbox.probe(Probe { tp, offset: 0, reply: reply.clone(), commit: true });
            reply.wait().await
        })?;
        let name = table.changelog_topic();
        let (key_codec, value_codec) = table.codecs();
        let mut out = std::collections::HashMap::new();
        let Some(meta) = futures_lite::future::block_on(self.transport.topic_metadata(name))? else {
            return Ok(out);
        };
        for p in 0..meta.config.partitions {
            let tp = TopicPartition::new(name, p);
            for r in self.transport.records(&tp)? {
                let decode_err = |source| TestError::Decode { tp: tp.clone(), offset: r.offset, source };
                let Some(k) = &r.key else { continue };
                let key: K = key_codec.decode_bytes(k).map_err(decode_err)?;
                match &r.value {
                    Some(v) => {
                        out.insert(key, value_codec.decode_bytes(v).map_err(decode_err)?);
                    }
                    None => {
                        out.remove(&key);
                    }
                }
            }
        }
        Ok(out)
    }

    /// The committed windows of a windowed table, by key and window (commits first, as
    /// [`table`](TestContext::table) does). For hopping windows combined per pane, the open
    /// windows are there as their panes.
    pub fn windows<K, V>(
        &self,
        table: &crate::WindowedTable<K, V>,
    ) -> Result<std::collections::BTreeMap<(K, crate::WindowRange), V>, TestError>
    where
        K: Serialize + DeserializeOwned + std::hash::Hash + Eq + Ord + Clone + 'static,
        V: Serialize + DeserializeOwned + Clone + 'static,
    {
        Ok(self
            .table(table.windows_table())?
            .into_iter()
            .map(|(k, v)| (((*k.key).clone(), crate::WindowRange::new(k.start, k.end)), v))
            .collect())
    }

    /// The transport the worker runs on, for what [`records`](TestContext::records) does not
    /// show (headers, offsets, committed offsets).
    pub fn transport(&self) -> &MemoryTransport {
        &self.transport
    }

    /// Stops the worker (committing, as any stop does) and reports how it ended.
    pub fn stop(mut self) -> Result<(), TestError> {
        self.finish()
    }

    fn finish(&mut self) -> Result<(), TestError> {
        self.stop.stop();
        match self.worker.take() {
            Some(worker) => worker.join().map_err(|_| TestError::Panicked)?.map_err(TestError::from),
            None => Ok(()),
        }
    }
}

impl Drop for TestContext {
    fn drop(&mut self) {
        let _ = self.finish();
    }
}
