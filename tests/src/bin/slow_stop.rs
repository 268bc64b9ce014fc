//! A worker for the signal tests: its agent holds its first event for a while (a minute by
//! default), so a graceful stop (SIGINT/SIGTERM) has to wait for it — up to
//! `shutdown_timeout` (30 s here) — and a second signal must end the process at once.
//!
//! ```text
//! slow_stop DATADIR [HOLD_MS]    prints "holding" once the agent holds its event, "stopped"
//!                                after a graceful stop
//! ```

use std::time::Duration;

use faust::{App, Settings};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let datadir = std::env::args().nth(1).ok_or("usage: slow_stop DATADIR [HOLD_MS]")?;
    let hold = Duration::from_millis(std::env::args().nth(2).and_then(|ms| ms.parse().ok()).unwrap_or(60_000));
    let mut settings = Settings::new("slow-stop");
    settings.datadir = datadir.into();
    settings.topic_partitions = 1;
    settings.cores = Some(1);
    settings.shutdown_timeout = Duration::from_secs(30);
    let app = App::new(settings);
    app.stop_on_signals()?;
    let topic = app.topic::<String, u64>("work");
    app.agent("hold", &topic, move |mut stream| async move {
        while stream.next().await.is_some() {
            println!("holding");
            glommio::timer::sleep(hold).await;
        }
        Ok(())
    });
    app.task(move || {
        let topic = topic.clone();
        async move {
            topic.send(None, &1).await?;
            Ok(())
        }
    });
    app.run()?;
    println!("stopped");
    Ok(())
}
