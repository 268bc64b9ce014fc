//! Agent RPC, as in Faust's `agent.ask`: agent `square` answers questions (what it emits for
//! an event is the reply), and agent `client` asks it for every number a timer sends, printing
//! the answers; `join` asks for several at once and keeps their order.
//!
//! ```text
//! cargo run --release --example rpc -- worker
//! ```

use std::time::Duration;

use faust::{App, Settings};

fn main() -> std::process::ExitCode {
    let mut settings = Settings::new("rpc-example");
    settings.topic_partitions = 4;
    let app = App::new(settings);
    let questions = app.topic::<String, u64>("questions");
    let numbers = app.topic::<String, u64>("numbers");

    // The answering agent: registered with sinks (none here), so what it emits for an asked
    // event goes back to the asker.
    let square = app.agent_with_sinks("square", &questions, vec![], |mut stream, replies| async move {
        while let Some(n) = stream.next().await {
            replies.emit(&(n * n))?;
        }
        Ok(())
    });

    // The asking agent: one question per number, answered by whichever core (or worker)
    // holds the question's partition.
    let asked = square.clone();
    app.agent("client", &numbers, move |mut stream| {
        let square = asked.clone();
        async move {
            while let Some(n) = stream.next().await {
                let squared: u64 = square.ask(Some(&n.to_string()), &n, Duration::from_secs(10)).await?;
                println!("{n}² = {squared}");
                if n % 5 == 0 {
                    let batch: Vec<u64> = square.join(vec![n, n + 1, n + 2], Duration::from_secs(10)).await?;
                    println!("squares of {n}, {} and {}: {batch:?}", n + 1, n + 2);
                }
            }
            Ok(())
        }
    });

    let counter = std::sync::Arc::new(std::sync::atomic::AtomicU64::new(1));
    app.timer(Duration::from_millis(500), move || {
        let (numbers, counter) = (numbers.clone(), counter.clone());
        async move {
            let n = counter.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
            numbers.send(Some(&n.to_string()), &n).await?;
            Ok(())
        }
    });
    app.main()
}
