//! Faust's first example: an agent that prints the greetings sent to its topic.
//!
//! ```text
//! cargo run --example hello -- worker                        # terminal 1: prints greetings
//! cargo run --example hello -- send @greet "Hello Faust"     # terminal 2
//! cargo run --example hello -- send greetings "Hello again" --repeat 3
//! ```
//!
//! `@greet` names the agent's topic, as in Faust (`faust -A hello_world send @greet ...`).
//! Values are raw strings (`value_serializer = "raw"`), so any text is a greeting.

use faust::{App, Settings};

fn main() -> std::process::ExitCode {
    let mut settings = Settings::new("hello-world");
    settings.value_serializer = faust::Codec::RAW;
    settings.topic_partitions = 4;
    let app = App::new(settings);
    let greetings = app.topic::<String, String>("greetings");
    app.agent("greet", &greetings, |mut stream| async move {
        while let Some(greeting) = stream.next().await {
            println!("{greeting}");
        }
        Ok(())
    });
    app.main()
}
