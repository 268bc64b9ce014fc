//! Sinks: where the values an agent yields go (Faust's `@app.agent(..., sink=[...])`).
//!
//! Rust agents have no `yield`; an agent registered with [`App::agent_with_sinks`] gets a
//! [`Sinks`] handle next to its stream and calls [`Sinks::emit`] where a Faust agent would
//! `yield`. Each value goes to every sink in order: a topic (sent with `send_soon`, so it is
//! durable before the event behind it is committed), another agent (`cast`), or a callback
//! — and, when the event was a question ([`Agent::ask`]), to the asker.

use std::future::Future;
use std::sync::Arc;

use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::app::{Agent, AgentError, App, SendError, Topic};
use crate::stream::Stream;

type Deliver<O> = Arc<dyn Fn(&O) -> Result<(), SendError> + Send + Sync>;

/// One destination for an agent's values.
pub struct Sink<O> {
    deliver: Deliver<O>,
}

impl<O> Clone for Sink<O> {
    fn clone(&self) -> Self {
        Sink { deliver: self.deliver.clone() }
    }
}

impl<O> std::fmt::Debug for Sink<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Sink")
    }
}

impl<O: Serialize + 'static> Sink<O> {
    /// Values are sent to `topic` without a key (as Faust's sinks do), with `send_soon`.
    pub fn topic<K: Serialize + 'static>(topic: &Topic<K, O>) -> Sink<O> {
        let topic = topic.clone();
        Sink { deliver: Arc::new(move |value: &O| topic.send_soon(None, value)) }
    }

    /// Values are cast to `agent` (sent to its topic without a key, without waiting).
    pub fn agent<K: Serialize + 'static>(agent: &Agent<K, O>) -> Sink<O> {
        let agent = agent.clone();
        Sink { deliver: Arc::new(move |value: &O| agent.cast(None, value)) }
    }
}

impl<O> Sink<O> {
    /// `callback` is called with every value, on the core of the agent that emitted it.
    pub fn callback(callback: impl Fn(&O) + Send + Sync + 'static) -> Sink<O> {
        Sink {
            deliver: Arc::new(move |value: &O| {
                callback(value);
                Ok(())
            }),
        }
    }
}

/// Encodes a value an agent emits as the reply to an asked event.
type EncodeReply<O> = Arc<dyn Fn(&O) -> Result<Vec<u8>, crate::codec::CodecError> + Send + Sync>;

/// An agent's sinks, handed to it beside its stream.
pub struct Sinks<O> {
    sinks: Arc<[Sink<O>]>,
    /// Encodes a reply to an asked event (the app's value codec).
    reply: EncodeReply<O>,
}

impl<O> Clone for Sinks<O> {
    fn clone(&self) -> Self {
        Sinks { sinks: self.sinks.clone(), reply: self.reply.clone() }
    }
}

impl<O> std::fmt::Debug for Sinks<O> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sinks").field("count", &self.sinks.len()).finish()
    }
}

impl<O> Sinks<O> {
    /// Hands `value` to every sink, in the order they were given (Faust's `yield`), and,
    /// when the event being processed was asked ([`Agent::ask`]), to the asker: buffered
    /// like [`Topic::send_soon`], durable before the event's offset is committed. Stops at
    /// the first sink that fails (a value that does not encode, a stopped worker).
    pub fn emit(&self, value: &O) -> Result<(), SendError> {
        self.sinks.iter().try_for_each(|sink| (sink.deliver)(value))?;
        if let Some(reply) = crate::runtime::context::current_reply()
            && let Some(core) = crate::runtime::CoreRuntime::current()
        {
            let bytes =
                (self.reply)(value).map_err(|source| SendError::Codec { topic: reply.topic.to_string(), source })?;
            let correlation: faust_storage::Header<'_> =
                (crate::runtime::context::CORRELATION_HEADER, Some(&reply.correlation[..]));
            core.buffer(
                faust_transport::TopicPartition::new(reply.topic.clone(), 0),
                None,
                None,
                &bytes,
                &[correlation],
            );
        }
        Ok(())
    }
}

impl App {
    /// Forwards every record of `source`, as it was read, to `target` (Faust's
    /// `stream.through(target)`, declared on the app rather than on a stream because `target`
    /// must be consumed from the start): agents registered on `target` then get the records on
    /// the cores that own `target`'s partitions — the way to move events to where their new
    /// key lives. `source` offsets are committed only once the forwarded records are durable.
    /// Records that do not decode as `K`, `V` are logged and skipped, as for any agent.
    pub fn through<K, V, K2, V2>(&self, source: &Topic<K, V>, target: &Topic<K2, V2>) -> Agent<K, V>
    where
        K: DeserializeOwned + 'static,
        V: DeserializeOwned + 'static,
        K2: 'static,
        V2: 'static,
    {
        let target = target.clone();
        let name = format!("through:{}->{}", source.name(), target.name());
        self.agent(&name, source, move |mut stream| {
            let target = target.clone();
            async move {
                while let Some(event) = stream.next_event().await {
                    event.forward_soon(&target)?;
                }
                Ok(())
            }
        })
    }

    /// Registers an agent whose values go to `sinks` (Faust's `sink=[...]`): `f` gets the
    /// stream and a [`Sinks`] handle, and calls [`Sinks::emit`] for each value it yields.
    /// Otherwise as [`App::agent`] (`source` is a topic or a [`Topic::group_by`]). Such an
    /// agent can be asked ([`Agent::ask`]): what it emits for a question is also the reply.
    ///
    /// ```
    /// use std::sync::{Arc, Mutex};
    /// use faust::{App, Settings, Sink};
    ///
    /// let app = App::new(Settings::new("sinks-doc"));
    /// let words = app.topic::<String, String>("words");
    /// let lengths = app.topic::<String, usize>("lengths");
    /// let seen = Arc::new(Mutex::new(Vec::new()));
    /// let log = seen.clone();
    /// let sinks = vec![Sink::topic(&lengths), Sink::callback(move |n: &usize| log.lock().unwrap().push(*n))];
    /// app.agent_with_sinks("lengths", &words, sinks, |mut stream, sinks| async move {
    ///     while let Some(word) = stream.next().await {
    ///         sinks.emit(&word.len())?;
    ///     }
    ///     Ok(())
    /// });
    /// let test = app.test_context()?;
    /// test.put(&words, None, &"hello".to_string())?;
    /// assert_eq!(test.records(&lengths)?, vec![(None, 5)]);
    /// assert_eq!(*seen.lock().unwrap(), vec![5]);
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn agent_with_sinks<K, V, S, O, F, Fut>(&self, name: &str, source: &S, sinks: Vec<Sink<O>>, f: F) -> Agent<K, V>
    where
        K: DeserializeOwned + 'static,
        V: DeserializeOwned + 'static,
        S: crate::Source<K, V>,
        O: Serialize + 'static,
        F: Fn(Stream<K, V>, Sinks<O>) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<(), AgentError>> + 'static,
    {
        // The agent can reply: the worker reads replies.
        self.inner.replies.want();
        let codec = self.inner.settings.value_serializer.clone();
        let reply = Arc::new(move |value: &O| {
            let mut out = Vec::new();
            codec.encode(value, &mut out).map(|()| out)
        });
        let sinks = Sinks { sinks: sinks.into(), reply };
        self.agent(name, source, move |stream| f(stream, sinks.clone()))
    }
}
