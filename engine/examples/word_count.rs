//! Faust's word count: a timer feeds words into a topic, an agent counts them in a table, and a
//! crontab prints a report of the most frequent words every five seconds — on the app's leader
//! only, however many workers run.
//!
//! ```text
//! cargo run --release --example word_count -- worker
//! cargo run --release --example word_count -- table dump word_counts   # another terminal
//! ```
//!
//! The worker runs on one core so that the report, which reads the table's shards on its own
//! core (`Table::local_items`), sees every word; with more cores each core holds its own
//! partitions, and a per-core timer (`App::timer_on_every_core`) would gather them.

use std::time::Duration;

use faust::{App, Crontab, Settings};

const TEXT: &str = "the quick brown fox jumps over the lazy dog while the dog sleeps and the fox runs";

fn main() -> std::process::ExitCode {
    let mut settings = Settings::new("word-count");
    settings.topic_partitions = 4;
    settings.cores = Some(1);
    let app = App::new(settings);
    let words = app.topic::<String, String>("words");
    let counts = app.table::<String, u64>("word_counts").with_default(|| 0);

    // Words keyed by themselves, so that a word always lands in the same partition (and
    // table shard).
    let feed: Vec<String> = TEXT.split(' ').map(str::to_string).collect();
    let source = words.clone();
    let cursor = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    app.timer(Duration::from_millis(100), move || {
        let (source, feed, cursor) = (source.clone(), feed.clone(), cursor.clone());
        async move {
            for _ in 0..10 {
                let i = cursor.fetch_add(1, std::sync::atomic::Ordering::Relaxed) % feed.len();
                source.send(Some(&feed[i]), &feed[i]).await?;
            }
            Ok(())
        }
    });

    let table = counts.clone();
    app.agent("count", &words, move |stream| {
        let counts = table.clone();
        stream.for_each(move |word| {
            counts.update(&word, |n| *n += 1)?;
            Ok(())
        })
    });

    // Every five seconds (croniter's sixth field is the seconds), on the leader.
    let report = Crontab::parse("* * * * * */5").expect("a valid crontab").on_leader();
    let table = counts.clone();
    let scheduled = app.crontab(report, move || {
        let counts = table.clone();
        async move {
            let mut top = counts.local_items()?;
            top.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
            let line: Vec<String> = top.iter().take(5).map(|(w, n)| format!("{w}={n}")).collect();
            println!("top words: {}", line.join(" "));
            Ok(())
        }
    });
    if let Err(e) = scheduled {
        eprintln!("{e}");
        return std::process::ExitCode::FAILURE;
    }
    app.main()
}
