//! Agents subscribed to topic patterns (Faust's `app.topic(pattern=...)`, Kafka's pattern
//! subscription): every topic whose name matches is consumed, those there when the worker
//! starts and those created later.
//!
//! A pattern is resolved against the transport's topic list by core 0 before the worker
//! creates its topics, so the first run already consumes what exists. While the worker runs,
//! core 0 lists the topics again every `topic_pattern_refresh`; a new match is declared and
//! added to the agent's topics, and the worker restarts its run (as for a `group_by` met
//! inside an agent) to take the new subscription: offsets committed so far are kept, nothing
//! is lost or processed twice.

use std::marker::PhantomData;
use std::rc::Rc;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::app::{App, lock};
use crate::codec::Codec;
use crate::runtime::CoreRuntime;
use crate::topic::{Topic, TopicKind};

/// A topic pattern that does not compile.
#[derive(Debug, thiserror::Error)]
#[error("topic pattern {pattern:?}: {reason}")]
pub struct PatternError {
    /// The pattern as given.
    pub pattern: String,
    /// Why it does not compile.
    pub reason: String,
}

/// Every topic whose name matches a regular expression: give it to [`App::agent`] to consume
/// them all in one stream. Made by [`App::topics_matching`].
pub struct TopicPattern<K, V> {
    regex: regex::Regex,
    key_codec: Codec,
    value_codec: Codec,
    types: PhantomData<fn() -> (K, V)>,
}

impl<K, V> std::fmt::Debug for TopicPattern<K, V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TopicPattern").field("pattern", &self.regex.as_str()).finish()
    }
}

impl<K, V> TopicPattern<K, V> {
    /// Decodes the matching topics' keys and values with these codecs instead of the app's.
    pub fn with_codecs(mut self, key_codec: Codec, value_codec: Codec) -> Self {
        self.key_codec = key_codec;
        self.value_codec = value_codec;
        self
    }
}

/// Declares a matching topic with the pattern's codecs (and the agent's decoding check).
type DeclareMatch = Arc<dyn Fn(&App, &str) + Send + Sync>;

/// An agent's pattern, as its spec keeps it.
#[derive(Clone)]
pub(crate) struct Subscription {
    regex: regex::Regex,
    declare: DeclareMatch,
}

impl App {
    /// Every topic whose whole name matches the regular expression `pattern` (Faust's
    /// `app.topic(pattern=...)`; matched as Kafka's Java client does, against the whole
    /// name), decoded with the app's codecs. An agent given it consumes the matching topics
    /// that exist when the worker starts and those created while it runs (looked for every
    /// [`topic_pattern_refresh`](crate::Settings::topic_pattern_refresh)), in one stream; its own
    /// topic, `{id}-{agent}`, is where [`Agent::send`](crate::Agent::send) puts events.
    /// Topics the app keeps for itself (changelogs, repartition and reply topics, the leader
    /// topic, the dead-letter topic) never match.
    ///
    /// Tables written by the agent must be co-partitioned with every matching topic: give
    /// them the same partition count.
    ///
    /// ```
    /// use faust::{App, Settings};
    ///
    /// let app = App::new(Settings::new("shop"));
    /// let orders = app.topics_matching::<String, String>(r"orders-[a-z]+")?;
    /// app.agent("audit", &orders, |mut stream| async move {
    ///     while let Some(event) = stream.next_event().await {
    ///         println!("{} from {}", event.value, event.tp.topic);
    ///     }
    ///     Ok(())
    /// });
    /// # Ok::<(), faust::PatternError>(())
    /// ```
    pub fn topics_matching<K, V>(&self, pattern: &str) -> Result<TopicPattern<K, V>, PatternError> {
        let regex = regex::Regex::new(&format!("^(?:{pattern})$"))
            .map_err(|e| PatternError { pattern: pattern.to_string(), reason: e.to_string() })?;
        let settings = self.settings();
        Ok(TopicPattern {
            regex,
            key_codec: settings.key_serializer.clone(),
            value_codec: settings.value_serializer.clone(),
            types: PhantomData,
        })
    }
}

impl<K, V> crate::app::group_by::sealed::Sealed for TopicPattern<K, V> {}

impl<K, V> crate::app::group_by::Source<K, V> for TopicPattern<K, V>
where
    K: DeserializeOwned + 'static,
    V: DeserializeOwned + 'static,
{
    fn consumed_by(&self, app: &App, agent: &str) -> Topic<K, V> {
        let own = format!("{}-{agent}", app.settings().id);
        app.declare::<K, V>(&own, self.key_codec.clone(), self.value_codec.clone(), TopicKind::Log)
    }

    fn subscribe(&self, app: &App, agent: usize) {
        let (key_codec, value_codec) = (self.key_codec.clone(), self.value_codec.clone());
        let declare: DeclareMatch = Arc::new(move |app: &App, name: &str| {
            let topic = app.declare::<K, V>(name, key_codec.clone(), value_codec.clone(), TopicKind::Log);
            topic.inner.add_check(crate::app::decode_check::<K, V>(&key_codec, &value_codec, true));
        });
        if let Some(spec) = lock(&app.inner.agents).get_mut(agent) {
            spec.patterns.push(Subscription { regex: self.regex.clone(), declare });
        }
    }
}

/// Whether any agent of `app` subscribes to a pattern.
pub(crate) fn has_patterns(app: &App) -> bool {
    lock(&app.inner.agents).iter().any(|spec| !spec.patterns.is_empty())
}

/// At start: subscribes the agents with patterns to the topics among `existing` that match,
/// and to the log topics the app declares (the worker creates them next).
pub(crate) fn subscribe_at_start(app: &App, mut existing: Vec<String>) {
    let declared = lock(&app.inner.topics);
    existing.extend(declared.iter().filter(|t| t.kind == TopicKind::Log).map(|t| t.name.to_string()));
    drop(declared);
    subscribe_matching(app, &existing);
}

/// Subscribes the agents with patterns to the topics among `names` that match and that they
/// do not consume yet (declaring each); returns how many subscriptions were added.
pub(crate) fn subscribe_matching(app: &App, names: &[String]) -> usize {
    let settings = app.settings();
    let kept = kept_by_app(settings);
    let mut added = 0;
    let mut agents = lock(&app.inner.agents);
    for spec in agents.iter_mut().filter(|spec| !spec.patterns.is_empty()) {
        for name in names.iter().filter(|name| !kept(name)) {
            if *spec.topic == **name || spec.also.iter().any(|t| **t == **name) {
                continue;
            }
            let Some(pattern) = spec.patterns.iter().find(|p| p.regex.is_match(name)) else {
                continue;
            };
            (pattern.declare)(app, name);
            spec.also.push(Arc::from(name.as_str()));
            tracing::info!(app = %settings.id, agent = %spec.name, topic = %name, pattern = %pattern.regex.as_str(),
                "subscribing to a topic that matches the agent's pattern");
            added += 1;
        }
    }
    added
}

/// Core 0's look for new matching topics while the worker runs: every
/// `topic_pattern_refresh` it lists the topics; when some match a pattern, it subscribes the
/// agents to them and restarts the run, which then consumes them (cancelled at shutdown).
pub(crate) async fn watch_for_new_matches(runtime: Rc<CoreRuntime>, app: App) {
    let refresh = app.settings().topic_pattern_refresh;
    loop {
        glommio::timer::sleep(refresh).await;
        match runtime.transport().topic_names().await {
            Ok(names) => {
                if subscribe_matching(&app, &names) > 0 {
                    app.inner.stop.restart();
                    return;
                }
            }
            // Looked for again at the next refresh.
            Err(e) => tracing::warn!(app = %app.settings().id, error = %e, "listing topics for the agents' patterns"),
        }
    }
}

/// Which topic names the app keeps for itself: its changelogs, repartition topics and their
/// positions, reply topics, leader topic and dead-letter topic.
fn kept_by_app(settings: &crate::settings::Settings) -> impl Fn(&str) -> bool {
    let prefix = format!("{}-", settings.id);
    let reply = crate::app::rpc::reply_topic(&settings.id, "");
    let leader = crate::app::services::leader_topic(settings);
    let dead_letter = settings.dead_letter_topic();
    move |name: &str| {
        (name.starts_with(&prefix) && (name.ends_with("-changelog") || name.ends_with("-repartition")))
            || name.starts_with(&reply)
            || leader.as_deref() == Some(name)
            || dead_letter.as_deref() == Some(name)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::settings::{BadRecordPolicy, Settings};

    fn app() -> App {
        let mut settings = Settings::new("shop");
        settings.bad_record_policy = BadRecordPolicy::DeadLetter { topic: None };
        App::new(settings)
    }

    fn names(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn a_pattern_matches_whole_names_and_never_the_app_s_own_topics() {
        let app = app();
        let orders = app.topics_matching::<String, String>("orders-.*").expect("compiles");
        let everything = app.topics_matching::<String, String>(".*").expect("compiles");
        app.agent("audit", &orders, |_| async { Ok(()) });
        app.agent("all", &everything, |_| async { Ok(()) });
        let found = names(&[
            "orders-eu",
            "orders-us",
            "old-orders-eu",
            "shop-counts-changelog",
            "shop-audit-orders-account-repartition",
            "shop-reply-1234",
            "shop-__assignor-__leader",
            "shop-dead-letter",
            "payments",
        ]);
        // `audit` takes the two orders topics; `all` takes every user topic but its own and
        // `audit`'s (`shop-audit`).
        assert_eq!(subscribe_matching(&app, &found), 2 + 4);
        let agents = lock(&app.inner.agents);
        let also = |i: usize| agents[i].also.iter().map(|t| t.to_string()).collect::<Vec<_>>();
        assert_eq!(also(0), ["orders-eu", "orders-us"]);
        assert_eq!(also(1), ["orders-eu", "orders-us", "old-orders-eu", "payments"]);
        drop(agents);
        assert_eq!(subscribe_matching(&app, &found), 0, "already subscribed");
        let declared = lock(&app.inner.topics).iter().map(|t| t.name.to_string()).collect::<Vec<_>>();
        assert!(declared.contains(&"payments".to_string()), "a match is declared: {declared:?}");
    }

    #[test]
    fn a_bad_pattern_is_a_typed_error() {
        let err = app().topics_matching::<String, String>("orders-(").expect_err("does not compile");
        assert_eq!(err.pattern, "orders-(");
        assert!(err.to_string().starts_with("topic pattern \"orders-(\":"), "{err}");
    }
}
