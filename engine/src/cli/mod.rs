//! The command line behind [`App::main`](crate::App::main): Faust's `worker`, `send`,
//! `agents`, `tables`, `reset` and user commands, plus `topics`, `table get|dump` and shell
//! completions. Commands that need the worker reach it through the control socket in the data
//! directory ([`crate::control`]).

use std::ffi::OsString;
use std::io::{BufRead, IsTerminal, Write};
use std::os::unix::ffi::OsStringExt;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};
use serde_json::{Value, json};

use crate::app::{App, TopicKind, UserCommand};
use crate::control::{self, ClientError, Failure, Payload, Request};
use crate::util::lock;

/// The command worked.
pub(crate) const EXIT_OK: u8 = 0;
/// The command failed (the worker stopped with an error, a request failed).
pub(crate) const EXIT_FAILED: u8 = 1;
/// The command line or its input is wrong (also clap's code for usage errors).
pub(crate) const EXIT_USAGE: u8 = 2;
/// The command needs a running worker and none answers on the control socket.
pub(crate) const EXIT_NO_WORKER: u8 = 3;
/// The topic, table or key does not exist.
pub(crate) const EXIT_NOT_FOUND: u8 = 4;

#[derive(Parser, Debug)]
#[command(version, about = "A faust stream-processing app", propagate_version = true, disable_version_flag = true)]
struct Cli {
    /// Print the version (`--version` only, as in Faust: `-V` is `send --value-type`).
    #[arg(long, action = clap::ArgAction::Version, global = true)]
    version: Option<bool>,
    /// The data directory (default: the app's `datadir`, `{id}-data`, or APP_DATADIR).
    #[arg(long, global = true, value_name = "DIR")]
    datadir: Option<PathBuf>,
    /// The transport: local://PATH, memory:// or kafka://HOST:PORT (default: the app's
    /// broker, `local://` in the data directory, or BROKER_URL).
    #[arg(long, short = 'b', global = true, value_name = "URL")]
    broker: Option<String>,
    /// Log level (error, warn, info, debug, trace) or a filter such as `faust=debug,info`
    /// [default: info for the worker, warn for other commands; RUST_LOG when set].
    #[arg(long, short = 'l', global = true, value_name = "LEVEL", visible_alias = "loglevel")]
    log_level: Option<String>,
    /// Print results and listings as JSON.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

/// Partition numbers, one value of `--partitions` (an alias: clap would take a `Vec` field
/// as a list of values).
type PartitionList = Vec<u32>;

#[derive(Subcommand, Debug)]
enum Command {
    /// Run a worker: the app's agents on this machine's cores, until Ctrl-C or SIGTERM
    /// (a graceful stop; a second signal exits at once).
    Worker {
        /// Cores to run on [default: every CPU the process may use].
        #[arg(long, short = 'c')]
        cores: Option<usize>,
        /// Port of the web server (kept in the settings; the web server is not built yet).
        #[arg(long, short = 'p')]
        web_port: Option<u16>,
        /// On kafka:// only: the partitions this worker takes of every topic it consumes,
        /// such as `0-3,6`, without joining the app's consumer group, so several workers can
        /// split an app by hand [default: join the group, or WORKER_PARTITIONS].
        #[arg(long, value_name = "LIST", value_parser = crate::settings::parse_partitions)]
        partitions: Option<PartitionList>,
    },
    /// Send records to a topic: through the running worker, or, with none running, as a
    /// producer of its own (on local:// and kafka://).
    ///
    /// VALUE is the record's value as text: a JSON document for a JSON topic, the bytes of
    /// the text for a raw one. Without VALUE, every non-empty line of stdin is a value.
    Send {
        /// The topic, or `@AGENT` for the topic an agent consumes.
        topic: String,
        /// The value [default: one per line of stdin].
        value: Option<OsString>,
        /// The key (for a JSON key, text that is not JSON is sent as a JSON string).
        #[arg(long, short = 'k')]
        key: Option<OsString>,
        /// Send the whole content of FILE as one value (any bytes: with `--value-serializer
        /// raw`, a binary value).
        #[arg(long, value_name = "FILE", conflicts_with = "value")]
        value_file: Option<PathBuf>,
        /// Send values even if the worker's agents would drop them as bad records (a value
        /// that does not decode as the topic's type, or larger than max_record_bytes); by
        /// default such a send is refused and nothing is written.
        #[arg(long)]
        unchecked: bool,
        /// The partition [default: by the key's hash, round-robin without a key].
        #[arg(long)]
        partition: Option<u32>,
        /// Send every value this many times.
        #[arg(long, short = 'r', default_value_t = 1)]
        repeat: u64,
        /// Encode the key with this codec rather than the topic's (`raw` sends the text's
        /// bytes). `-K`/`--key-type` (Faust's names) say the same: a type here is a codec.
        #[arg(long, value_name = "CODEC", short = 'K', visible_alias = "key-type")]
        key_serializer: Option<String>,
        /// Encode the value with this codec rather than the topic's (`raw` sends the text's
        /// bytes as they are, valid for the topic or not). `-V`/`--value-type` too.
        #[arg(long, value_name = "CODEC", short = 'V', visible_alias = "value-type")]
        value_serializer: Option<String>,
    },
    /// List the app's agents.
    Agents,
    /// List the app's tables.
    Tables,
    /// List the Faust record models the app registered (`App::model`): namespace and type.
    Models,
    /// Show a registered model: its Rust type and its fields (Faust's `faust model NAME`).
    Model {
        /// The model's namespace, as `models` lists it (e.g. `orders.Order`).
        name: String,
    },
    /// List the app's topics; with a running worker, with their record counts.
    Topics,
    /// Read a table through the running worker.
    Table {
        #[command(subcommand)]
        command: TableCommand,
    },
    /// Delete this machine's table state (rebuilt from the changelogs at the next start);
    /// with --all, the whole data directory (on local://, every topic and offset too).
    Reset {
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
        /// Delete the whole data directory.
        #[arg(long)]
        all: bool,
    },
    /// Delete the table stores of the app's other versions (`version` in the settings) from
    /// the data directory.
    #[command(visible_alias = "clean_versions")]
    CleanVersions,
    /// The running worker's counters (rebalances, partitions, shards recovered, bad records,
    /// failing writes) and its current problems.
    Stats,
    /// Repair a topic's damaged log on the embedded transport: every batch is checked, and a
    /// damaged one is dropped (the originals are kept in the partition's `damaged/`
    /// directory); the other records keep their offsets. What was lost is printed. Works on
    /// a running worker (which then processes the partition again) or on a stopped one.
    Repair {
        /// The topic.
        topic: String,
        /// Only this partition [default: every partition].
        #[arg(long)]
        partition: Option<u32>,
        /// Do not ask for confirmation.
        #[arg(long, short = 'y')]
        yes: bool,
    },
    /// Print a shell completion script (bash, zsh, fish, elvish, powershell).
    #[command(visible_alias = "completion")]
    Completions {
        /// The shell.
        shell: clap_complete::Shell,
    },
}

#[derive(Subcommand, Debug)]
enum TableCommand {
    /// The value of KEY (exit code 4 when there is none).
    Get {
        /// The table.
        table: String,
        /// The key, as text (see `send --help`).
        key: String,
    },
    /// Every key and value.
    Dump {
        /// The table.
        table: String,
    },
}

/// A command's failure: what to print and the exit code.
#[derive(Debug)]
struct Failed {
    code: u8,
    message: String,
}

impl Failed {
    fn new(code: u8, message: impl Into<String>) -> Failed {
        Failed { code, message: message.into() }
    }
}

impl From<ClientError> for Failed {
    fn from(e: ClientError) -> Failed {
        let code = match &e {
            ClientError::NoWorker { .. } => EXIT_NO_WORKER,
            ClientError::Refused(Failure::NotFound | Failure::Elsewhere, _) => EXIT_NOT_FOUND,
            ClientError::Refused(Failure::BadRequest, _) => EXIT_USAGE,
            ClientError::Refused(Failure::Failed, _) | ClientError::Io { .. } => EXIT_FAILED,
        };
        Failed::new(code, e.to_string())
    }
}

/// A registered model as `model NAME` shows it: namespace, Rust type and fields (`null` for
/// a model that is not a plain struct); an unknown name is an error listing the known ones.
fn describe_model(models: &crate::Models, name: &str) -> Result<Value, Failed> {
    let list = models.list();
    let Some((namespace, rust_type)) = list.iter().find(|(ns, _)| *ns == name) else {
        let known: Vec<&str> = list.iter().map(|(ns, _)| *ns).collect();
        return Err(Failed::new(EXIT_NOT_FOUND, format!("no model named {name:?} (registered: {known:?})")));
    };
    Ok(json!({ "namespace": namespace, "type": rust_type, "fields": models.fields(name) }))
}

/// The program's name, as it was called.
fn program_name(args: &[OsString], app: &App) -> String {
    args.first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_else(|| app.settings().id.clone())
}

/// The clap command: the built-in commands and the app's own.
fn clap_command(name: String, users: &[UserCommand]) -> clap::Command {
    let mut cmd = Cli::command().name(name.clone()).bin_name(name);
    for u in users {
        cmd = cmd.subcommand(
            clap::Command::new(u.name.clone()).about(u.about.clone()).arg(
                clap::Arg::new("args")
                    .num_args(0..)
                    .trailing_var_arg(true)
                    .allow_hyphen_values(true)
                    .help("Arguments for the command"),
            ),
        );
    }
    cmd
}

/// Parses `args` (the program name first) and runs the command.
pub(crate) fn main(app: &App, args: Vec<OsString>) -> ExitCode {
    let users: Vec<UserCommand> = lock(&app.inner.commands).clone();
    let name = program_name(&args, app);
    let matches = match clap_command(name.clone(), &users).try_get_matches_from(&args) {
        Ok(m) => m,
        Err(e) => {
            // Help and version go to stdout with 0; usage errors to stderr with 2.
            let _ = e.print();
            return ExitCode::from(e.exit_code() as u8);
        }
    };
    let cli = |matches: &clap::ArgMatches| -> (Option<PathBuf>, Option<String>, Option<String>, bool) {
        (
            matches.get_one::<PathBuf>("datadir").cloned(),
            matches.get_one::<String>("broker").cloned(),
            matches.get_one::<String>("log_level").cloned(),
            matches.get_flag("json"),
        )
    };
    let (datadir, broker, log_level, json) = cli(&matches);
    let mut settings = app.settings().clone();
    if let Some(d) = datadir {
        settings.datadir = d;
    }
    if let Some(b) = broker {
        settings.broker = b;
    }
    let is_worker = matches.subcommand_name() == Some("worker");
    if let Err(e) = init_logging(log_level.as_deref(), if is_worker { "info" } else { "warn" }) {
        eprintln!("error: {e}");
        return ExitCode::from(EXIT_USAGE);
    }
    let result = match matches.subcommand() {
        Some((sub, sub_matches)) if users.iter().any(|u| u.name == sub) => {
            let user = users.iter().find(|u| u.name == sub).map(|u| u.run.clone());
            let rest: Vec<String> = sub_matches.get_many::<String>("args").into_iter().flatten().cloned().collect();
            let app = app.with_settings(settings);
            match user {
                Some(run) => run(&app, &rest).map_err(|e| Failed::new(EXIT_FAILED, e.to_string())),
                None => Ok(()),
            }
        }
        _ => match Cli::from_arg_matches(&matches) {
            Ok(parsed) => run(app, settings, parsed.command, json, &name, &users),
            Err(e) => {
                let _ = e.print();
                return ExitCode::from(EXIT_USAGE);
            }
        },
    };
    match result {
        Ok(()) => ExitCode::from(EXIT_OK),
        Err(Failed { code, message }) => {
            if !message.is_empty() {
                eprintln!("error: {message}");
            }
            ExitCode::from(code)
        }
    }
}

/// Shows the worker working through a backlog (events processed against the lag, with the
/// rate and the time left) until `done`: a bar on a terminal, log lines otherwise
/// (`crate::progress`). A worker that keeps up shows nothing.
fn watch_backlog(app: App, done: Arc<AtomicBool>) -> Option<std::thread::JoinHandle<()>> {
    let watch = move || {
        // The backlog being shown: events processed when it was first seen, and its meter.
        let mut backlog: Option<(u64, crate::progress::Progress)> = None;
        while !done.load(Ordering::Relaxed) {
            std::thread::sleep(std::time::Duration::from_millis(250));
            let stats = app.stats();
            match &mut backlog {
                None if stats.lag > 0 => {
                    let meter = crate::progress::Progress::new("processing the backlog", Some(stats.lag));
                    backlog = Some((stats.events_processed, meter));
                }
                None => {}
                Some((base, meter)) => {
                    let done_now = stats.events_processed.saturating_sub(*base);
                    meter.set(done_now, Some(done_now + stats.lag));
                    if stats.lag == 0 {
                        meter.finish();
                        backlog = None;
                    }
                }
            }
        }
    };
    std::thread::Builder::new().name("faust-progress".into()).spawn(watch).ok()
}

/// Logs through `tracing` to stderr, at `level` (or RUST_LOG, or `default`), above the
/// progress bars.
fn init_logging(level: Option<&str>, default: &str) -> Result<(), String> {
    use tracing_subscriber::EnvFilter;
    let filter = match level {
        Some(l) => EnvFilter::try_new(l).map_err(|e| format!("--log-level {l}: {e}"))?,
        None => {
            EnvFilter::try_from_default_env().or_else(|_| EnvFilter::try_new(default)).map_err(|e| e.to_string())?
        }
    };
    // A program that installed its own subscriber keeps it.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(crate::progress::log_writer)
        .with_ansi(std::io::stderr().is_terminal())
        .try_init();
    Ok(())
}

fn run(
    app: &App,
    settings: crate::Settings,
    command: Command,
    json: bool,
    name: &str,
    users: &[UserCommand],
) -> Result<(), Failed> {
    let datadir = settings.datadir.clone();
    match command {
        Command::Worker { cores, web_port, partitions } => {
            let mut settings = settings;
            if cores.is_some() {
                settings.cores = cores;
            }
            if partitions.is_some() {
                settings.partitions = partitions;
            }
            if let Some(p) = web_port {
                settings.web_port = p;
            }
            let app = app.with_settings(settings);
            app.stop_on_signals().map_err(|e| Failed::new(EXIT_FAILED, format!("installing signal handlers: {e}")))?;
            let s = app.settings();
            let cores = s.cores.map_or_else(|| "every CPU".to_string(), |n| n.to_string());
            let partitions = s.partitions.as_ref().map_or_else(|| "all".to_string(), |p| format!("{p:?}"));
            tracing::info!(app = %s.id, transport = %s.broker_url(), datadir = %s.datadir.display(), %cores, %partitions,
                control_socket = %control::socket_path(&s.datadir).display(), "starting the worker (Ctrl-C stops it)");
            let done = Arc::new(AtomicBool::new(false));
            let watcher = watch_backlog(app.clone(), done.clone());
            let ran = app.run();
            done.store(true, Ordering::Relaxed);
            if let Some(w) = watcher {
                let _ = w.join();
            }
            ran.map_err(|e| Failed::new(EXIT_FAILED, format!("the worker stopped: {e}")))?;
            tracing::info!("the worker stopped");
            Ok(())
        }
        Command::Send {
            topic,
            value,
            key,
            value_file,
            unchecked,
            partition,
            repeat,
            key_serializer,
            value_serializer,
        } => {
            // `@agent` is the agent's topic, as in Faust.
            let topic = match topic.strip_prefix('@') {
                Some(agent) => lock(&app.inner.agents)
                    .iter()
                    .find(|a| a.name == agent && !a.topic.is_empty())
                    .map(|a| a.topic.to_string())
                    .ok_or_else(|| {
                        Failed::new(EXIT_NOT_FOUND, format!("no agent `{agent}` (see the `agents` command)"))
                    })?,
                None => topic,
            };
            let values = match (value, value_file) {
                (Some(v), _) => vec![Payload::from_bytes(v.into_vec())],
                (None, Some(file)) => {
                    let bytes = std::fs::read(&file)
                        .map_err(|e| Failed::new(EXIT_USAGE, format!("reading {}: {e}", file.display())))?;
                    vec![Payload::from_bytes(bytes)]
                }
                (None, None) => read_values()?,
            };
            let request = Request::Send {
                topic: topic.clone(),
                key: key.map(|k| Payload::from_bytes(k.into_vec())),
                values,
                partition,
                repeat,
                key_serializer,
                value_serializer,
                unchecked,
            };
            // A send needs no worker: on Kafka the CLI produces like any other client; on
            // local:// it writes the log itself, holding the log's lock as a worker would (a
            // worker starting meanwhile waits for it or is refused, never interleaves).
            let url = settings.broker_url();
            let result = match control::request(&datadir, &request) {
                Err(ClientError::NoWorker { .. })
                    if ["kafka://", "aiokafka://", "local://"].iter().any(|p| url.starts_with(p)) =>
                {
                    control::send_without_worker(app, &settings, request)?
                }
                other => other?,
            };
            if json {
                return out(format_args!("{result}"));
            }
            let sent = result["sent"].as_u64().unwrap_or(0);
            match (result["partition"].as_u64(), result["offset"].as_u64()) {
                (Some(p), Some(o)) => out(format_args!("sent 1 record to {topic} (partition {p}, offset {o})")),
                _ => out(format_args!("sent {sent} records to {topic}")),
            }
        }
        Command::Agents => {
            let agents: Vec<Value> = lock(&app.inner.agents)
                .iter()
                .filter(|a| !a.topic.is_empty())
                .map(|a| json!({ "agent": a.name, "topic": a.topics(), "concurrency": a.concurrency }))
                .collect();
            print_rows(json, &["agent", "topic", "concurrency"], &agents)
        }
        Command::Models => {
            let models: Vec<Value> = lock(&app.inner.models)
                .list()
                .into_iter()
                .map(|(namespace, rust_type)| json!({ "namespace": namespace, "type": rust_type }))
                .collect();
            print_rows(json, &["namespace", "type"], &models)
        }
        Command::Model { name } => {
            let model = describe_model(&lock(&app.inner.models), &name)?;
            if json {
                out(format_args!("{model}"))
            } else {
                out(format_args!("{name}: {}", model["type"].as_str().unwrap_or("?")))?;
                let fields: Vec<Value> = model["fields"]
                    .as_array()
                    .map(|f| f.iter().map(|name| json!({ "field": name })).collect())
                    .unwrap_or_default();
                if fields.is_empty() {
                    out(format_args!("(not a struct: no fields to list)"))
                } else {
                    print_rows(false, &["field"], &fields)
                }
            }
        }
        Command::Tables => {
            let tables: Vec<Value> = lock(&app.inner.tables)
                .iter()
                .map(|t| {
                    let (key, value) = t.codecs();
                    json!({
                        "table": &**t.name(),
                        "changelog": &**t.changelog(),
                        "key_codec": key.name(),
                        "value_codec": value.name(),
                        "store": if t.in_memory() || settings.store == "memory://" { "memory" } else { "mmap" },
                    })
                })
                .collect();
            print_rows(json, &["table", "changelog", "key_codec", "value_codec", "store"], &tables)
        }
        Command::Topics => {
            let topics = match control::request(&datadir, &Request::Topics) {
                Ok(Value::Array(live)) => live,
                Ok(other) => return Err(Failed::new(EXIT_FAILED, format!("unexpected answer: {other}"))),
                Err(ClientError::NoWorker { .. }) => {
                    if !json {
                        eprintln!("(no worker is running: partitions as declared, no record counts)");
                    }
                    declared_topics(app, &settings)
                }
                Err(e) => return Err(e.into()),
            };
            // Partitions whose records could not be counted (a damaged log) are named, so the
            // records column is never a silent under-count.
            let topics: Vec<Value> = topics
                .into_iter()
                .map(|mut t| {
                    if t["uncounted"].as_array().is_some_and(Vec::is_empty) {
                        t["uncounted"] = Value::Null;
                    } else if let Some(list) = t["uncounted"].as_array().filter(|_| !json) {
                        let names: Vec<&str> = list.iter().filter_map(Value::as_str).collect();
                        t["uncounted"] = Value::String(format!("partitions {}", names.join(", ")));
                    }
                    t
                })
                .collect();
            print_rows(json, &["topic", "kind", "partitions", "records", "uncounted"], &topics)
        }
        Command::Table { command: TableCommand::Get { table, key } } => {
            let request = Request::TableGet { table: table.clone(), key: key.clone() };
            let value = match control::request(&datadir, &request) {
                // Another worker of the group holds the key: ask it, when it runs on this host.
                Err(ClientError::Refused(Failure::Elsewhere, url)) => match control::datadir_of(&url) {
                    Some(other) => control::request(&other, &request)?,
                    None => {
                        return Err(Failed::new(
                            EXIT_NOT_FOUND,
                            format!("table `{table}`: key {key} is held by the worker at {url}"),
                        ));
                    }
                },
                other => other?,
            };
            if json {
                out(format_args!("{}", json!({ "table": table, "key": key, "value": value })))
            } else {
                out(format_args!("{value}"))
            }
        }
        Command::Table { command: TableCommand::Dump { table } } => {
            let items = control::request(&datadir, &Request::TableDump { table })?;
            let items: Vec<Value> = items
                .as_array()
                .map(|a| a.iter().map(|kv| json!({ "key": kv[0], "value": kv[1] })).collect())
                .unwrap_or_default();
            if json {
                return out(format_args!("{}", Value::Array(items)));
            }
            for item in items {
                out(format_args!("{}\t{}", item["key"], item["value"]))?;
            }
            Ok(())
        }
        Command::Reset { yes, all } => reset(&settings, yes, all, json),
        Command::CleanVersions => {
            let deleted = clean_versions(&settings)?;
            if json {
                return out(format_args!("{}", json!({ "deleted": deleted })));
            }
            if deleted.is_empty() {
                return out(format_args!("no other version's state in {}", datadir.display()));
            }
            deleted.iter().try_for_each(|path| out(format_args!("deleted {path}")))
        }
        Command::Repair { topic, partition, yes } => repair(&settings, &topic, partition, yes, json),
        Command::Stats => {
            let stats = control::request(&datadir, &Request::Stats)?;
            if json {
                return out(format_args!("{stats}"));
            }
            if let Some(fields) = stats.as_object() {
                let width = fields.keys().map(String::len).max().unwrap_or(0);
                for (name, value) in fields {
                    match value {
                        // One line per problem, under the name.
                        Value::Array(lines) if name == "problems" => {
                            let none = if lines.is_empty() { "none" } else { "" };
                            out(format_args!("{name:<width$}  {none}"))?;
                            for line in lines {
                                out(format_args!("  {}", line.as_str().unwrap_or_default()))?;
                            }
                        }
                        _ => out(format_args!("{name:<width$}  {value}"))?,
                    }
                }
            }
            Ok(())
        }
        Command::Completions { shell } => {
            let mut cmd = clap_command(name.to_string(), users);
            clap_complete::generate(shell, &mut cmd, name.to_string(), &mut std::io::stdout());
            Ok(())
        }
    }
}

/// The values to send, one per non-empty line of stdin (any bytes but the newline: a line
/// need not be UTF-8).
fn read_values() -> Result<Vec<Payload>, Failed> {
    let stdin = std::io::stdin();
    if stdin.is_terminal() {
        return Err(Failed::new(EXIT_USAGE, "give a VALUE (or --value-file), or pipe values on stdin (one per line)"));
    }
    let mut values = Vec::new();
    let mut input = stdin.lock();
    let mut line = Vec::new();
    loop {
        line.clear();
        let n =
            input.read_until(b'\n', &mut line).map_err(|e| Failed::new(EXIT_FAILED, format!("reading stdin: {e}")))?;
        if n == 0 {
            break;
        }
        let trimmed = line.strip_suffix(b"\n").unwrap_or(&line);
        let trimmed = trimmed.strip_suffix(b"\r").unwrap_or(trimmed);
        if !trimmed.iter().all(u8::is_ascii_whitespace) {
            values.push(Payload::from_bytes(trimmed.to_vec()));
        }
    }
    if values.is_empty() {
        return Err(Failed::new(EXIT_USAGE, "stdin held no values"));
    }
    Ok(values)
}

/// Prints one line of a command's output. A reader that went away (`| head`) ends the command
/// quietly, with success, instead of a panic.
fn out(line: std::fmt::Arguments<'_>) -> Result<(), Failed> {
    let mut stdout = std::io::stdout().lock();
    match writeln!(stdout, "{line}") {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Err(Failed::new(EXIT_OK, "")),
        Err(e) => Err(Failed::new(EXIT_FAILED, format!("writing the output: {e}"))),
    }
}

/// The topics as declared, for when no worker runs.
fn declared_topics(app: &App, settings: &crate::Settings) -> Vec<Value> {
    let declared = lock(&app.inner.topics).clone();
    let count = |name: &str| -> Option<u32> {
        let d = declared.iter().find(|t| &*t.name == name)?;
        if d.kind == TopicKind::Channel {
            return None;
        }
        let like = d.partitions_like.as_ref().and_then(|l| declared.iter().find(|t| t.name == *l));
        Some(d.partitions.or(like.and_then(|l| l.partitions)).unwrap_or(settings.topic_partitions))
    };
    let tables = lock(&app.inner.tables).clone();
    control::topic_names(app)
        .into_iter()
        .map(|(name, kind)| {
            let partitions = count(&name).or_else(|| {
                let t = tables.iter().find(|t| **t.changelog() == *name)?;
                Some(t.partitions().unwrap_or(settings.topic_partitions))
            });
            json!({ "topic": name, "kind": kind, "partitions": partitions })
        })
        .collect()
}

/// Prints `rows` (JSON objects) as a JSON array or as aligned columns.
fn print_rows(json: bool, columns: &[&str], rows: &[Value]) -> Result<(), Failed> {
    if json {
        return out(format_args!("{}", Value::Array(rows.to_vec())));
    }
    let cell = |row: &Value, c: &str| match &row[c] {
        Value::Null => "-".to_string(),
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let widths: Vec<usize> = columns
        .iter()
        .map(|c| rows.iter().map(|r| cell(r, c).chars().count()).max().unwrap_or(0).max(c.len()))
        .collect();
    let line = |cells: Vec<String>| {
        let padded: Vec<String> = cells.iter().zip(&widths).map(|(c, w)| format!("{c:<w$}")).collect();
        padded.join("  ").trim_end().to_string()
    };
    out(format_args!("{}", line(columns.iter().map(|c| c.to_string()).collect())))?;
    for row in rows {
        out(format_args!("{}", line(columns.iter().map(|c| cell(row, c)).collect())))?;
    }
    Ok(())
}

/// `repair`: through the running worker, or on the files when none runs.
fn repair(
    settings: &crate::Settings,
    topic: &str,
    partition: Option<u32>,
    yes: bool,
    json: bool,
) -> Result<(), Failed> {
    let url = settings.broker_url();
    let Some(root) = url.strip_prefix("local://") else {
        return Err(Failed::new(
            EXIT_USAGE,
            format!("repair is for the embedded log (local://), not {url}: a Kafka broker repairs its own logs"),
        ));
    };
    let what = match partition {
        Some(p) => format!("{topic}/{p}"),
        None => format!("every partition of {topic}"),
    };
    confirm(yes, &format!("Repair {what}, dropping its damaged batches (they are kept aside)?"))?;
    let reports = match control::request(&settings.datadir, &Request::Repair { topic: topic.to_string(), partition }) {
        Ok(Value::Array(reports)) => reports,
        Ok(other) => return Err(Failed::new(EXIT_FAILED, format!("unexpected answer: {other}"))),
        Err(ClientError::NoWorker { .. }) => repair_files(std::path::Path::new(root), topic, partition)?,
        Err(e) => return Err(e.into()),
    };
    if json {
        return out(format_args!("{}", Value::Array(reports)));
    }
    for r in &reports {
        match r["segments_repaired"].as_u64() {
            Some(0) => out(format_args!(
                "{}: no damage ({} segments checked)",
                r["partition"].as_str().unwrap_or("?"),
                r["segments_checked"]
            ))?,
            _ => out(format_args!(
                "{}: repaired {} of {} segments, dropped {} damaged batches; offsets lost: {} ({}); damaged files kept: {}",
                r["partition"].as_str().unwrap_or("?"),
                r["segments_repaired"],
                r["segments_checked"],
                r["batches_dropped"],
                r["lost"].as_str().unwrap_or("?"),
                r["lost_offsets"],
                r["quarantined"]
            ))?,
        }
    }
    Ok(())
}

/// Repairs the logs of `topic` under the embedded transport's directory `root` (no worker
/// holds them).
fn repair_files(root: &std::path::Path, topic: &str, partition: Option<u32>) -> Result<Vec<Value>, Failed> {
    let dir = root.join(topic);
    if faust_transport::validate_topic_name(topic).is_err() || !dir.is_dir() {
        return Err(Failed::new(EXIT_NOT_FOUND, format!("no topic `{topic}` in {}", root.display())));
    }
    let mut partitions: Vec<u32> = match partition {
        Some(p) => vec![p],
        None => std::fs::read_dir(&dir)
            .map_err(|e| Failed::new(EXIT_FAILED, format!("listing {}: {e}", dir.display())))?
            .filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
            .collect(),
    };
    partitions.sort_unstable();
    let mut reports = Vec::new();
    for p in partitions {
        let path = dir.join(p.to_string());
        if !path.is_dir() {
            return Err(Failed::new(EXIT_NOT_FOUND, format!("no partition {p} of `{topic}` in {}", dir.display())));
        }
        let report = faust_storage::Log::repair(&path, faust_storage::LogConfig::default())
            .map_err(|e| Failed::new(EXIT_FAILED, format!("repairing {topic}/{p}: {e}")))?;
        reports.push(control::repair_json(&faust_transport::TopicPartition::new(topic, p), &report));
    }
    Ok(reports)
}

/// Asks `question` on the terminal unless `yes`; without a terminal, refuses without `--yes`.
fn confirm(yes: bool, question: &str) -> Result<(), Failed> {
    if yes {
        return Ok(());
    }
    let stdin = std::io::stdin();
    if !stdin.is_terminal() {
        return Err(Failed::new(EXIT_USAGE, format!("{question} Not without --yes")));
    }
    eprint!("{question} [y/N] ");
    let _ = std::io::stderr().flush();
    let mut answer = String::new();
    stdin.lock().read_line(&mut answer).map_err(|e| Failed::new(EXIT_FAILED, format!("reading stdin: {e}")))?;
    match answer.trim() {
        "y" | "Y" | "yes" => Ok(()),
        _ => Err(Failed::new(EXIT_FAILED, "not done")),
    }
}

/// Refuses when a worker runs on the data directory: `doing` would pull its state from under it.
fn no_worker_running(datadir: &std::path::Path, doing: &str) -> Result<(), Failed> {
    match control::request(datadir, &Request::Ping) {
        Ok(_) => Err(Failed::new(
            EXIT_FAILED,
            format!("a worker is running on {}: stop it before {doing}", datadir.display()),
        )),
        Err(_) => Ok(()),
    }
}

/// `clean-versions`: deletes the table stores of versions other than the settings' (Faust's
/// `clean_versions`): `{datadir}/v{n}`, and `{datadir}/tables` (version 1's) when the app is
/// at a later version; never under a running worker. Returns what it deleted.
fn clean_versions(settings: &crate::Settings) -> Result<Vec<String>, Failed> {
    let datadir = &settings.datadir;
    no_worker_running(datadir, "deleting old versions' state")?;
    let entries = match std::fs::read_dir(datadir) {
        Ok(entries) => entries,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => return Err(Failed::new(EXIT_FAILED, format!("reading {}: {e}", datadir.display()))),
    };
    let current = settings.version.max(1);
    let mut old = Vec::new();
    for entry in entries.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        let version = match name.strip_prefix('v').and_then(|n| n.parse::<u32>().ok()) {
            Some(n) => n,
            None if name == "tables" => 1,
            None => continue,
        };
        if version != current && entry.path().is_dir() {
            old.push(entry.path());
        }
    }
    old.sort();
    let mut deleted = Vec::new();
    for path in old {
        std::fs::remove_dir_all(&path)
            .map_err(|e| Failed::new(EXIT_FAILED, format!("deleting {}: {e}", path.display())))?;
        deleted.push(path.display().to_string());
    }
    Ok(deleted)
}

/// `reset`: deletes the table stores (or the whole data directory), never under a running
/// worker, after confirmation.
fn reset(settings: &crate::Settings, yes: bool, all: bool, json: bool) -> Result<(), Failed> {
    let datadir = &settings.datadir;
    no_worker_running(datadir, "resetting its state")?;
    let target = if all { datadir.to_path_buf() } else { settings.table_dir() };
    if !target.exists() {
        return match json {
            true => out(format_args!("{}", json!({ "deleted": Value::Null }))),
            false => out(format_args!("nothing to delete: {} does not exist", target.display())),
        };
    }
    confirm(yes, &format!("Delete {}?", target.display()))?;
    std::fs::remove_dir_all(&target)
        .map_err(|e| Failed::new(EXIT_FAILED, format!("deleting {}: {e}", target.display())))?;
    match json {
        true => out(format_args!("{}", json!({ "deleted": target.display().to_string() }))),
        false => out(format_args!("deleted {}", target.display())),
    }
}

impl App {
    /// Runs the app's command line (Faust's `app.main()`) on the process's arguments and
    /// returns the exit code, for `fn main() -> ExitCode { app.main() }`.
    ///
    /// | command | what it does |
    /// |---|---|
    /// | `worker [--cores N] [--web-port P] [--partitions 0-3,6]` | runs the worker until Ctrl-C / SIGTERM (graceful; a second signal exits at once); `--partitions` (kafka:// only) takes only those partitions of each topic, joining no group |
    /// | `send TOPIC [VALUE] [--key K] [--partition P] [--repeat N]` | sends records through the running worker; without VALUE, one per line of stdin |
    /// | `table get TABLE KEY`, `table dump TABLE` | reads a table of the running worker |
    /// | `agents`, `tables`, `topics` | lists what the app declares (`topics` adds record counts when a worker runs) |
    /// | `stats` | the running worker's counters ([`WorkerStats`](crate::WorkerStats)) and current problems |
    /// | `repair TOPIC [--partition P] [--yes]` | repairs a damaged log of the embedded transport (drops its damaged batches, keeps them aside, reports what was lost) |
    /// | `reset [--all] [--yes]` | deletes the table stores (with `--all`, the whole data directory), never under a running worker |
    /// | `model NAME` | a registered model's Rust type and fields ([`Models::fields`](crate::Models::fields)) |
    /// | `clean-versions` | deletes the table stores of the app's other [versions](crate::Settings::version) |
    /// | `completions SHELL` | prints a shell completion script |
    /// | the app's own | see [`App::command`] |
    ///
    /// Options for every command: `--datadir DIR`, `--broker URL`, `--log-level LEVEL` (logs go
    /// to stderr through `tracing`; default `info` for the worker and `warn` otherwise, or
    /// `RUST_LOG`), `--json` (results and listings as JSON). A worker that keeps state in its
    /// data directory listens on `{datadir}/control.sock`; `send` and `table` reach it there
    /// (on `local://` the worker owns the log).
    ///
    /// Exit codes: 0 done; 1 failed (the worker stopped with an error, a request failed);
    /// 2 usage or bad input (a value that is not valid JSON for a JSON topic, a partition out
    /// of range); 3 no worker is running for the data directory; 4 no such topic, table or
    /// key; 130 / 143 a second SIGINT / SIGTERM during a graceful stop.
    ///
    /// ```no_run
    /// use faust::{App, Settings};
    ///
    /// fn main() -> std::process::ExitCode {
    ///     let app = App::new(Settings::new("greetings"));
    ///     let greetings = app.topic::<String, String>("greetings");
    ///     app.agent("print", &greetings, |mut stream| async move {
    ///         while let Some(greeting) = stream.next().await {
    ///             println!("{greeting}");
    ///         }
    ///         Ok(())
    ///     });
    ///     app.main()
    /// }
    /// ```
    pub fn main(&self) -> std::process::ExitCode {
        // Arguments as the OS gave them: one that is not UTF-8 is a usage error or a binary
        // key or value, never a panic.
        self.main_from(std::env::args_os())
    }

    /// [`App::main`] on these arguments (the program's name first).
    pub fn main_from<I, T>(&self, args: I) -> std::process::ExitCode
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString>,
    {
        main(self, args.into_iter().map(Into::into).collect())
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;

    #[test]
    fn the_command_line_is_consistent() {
        clap_command("app".into(), &[]).debug_assert();
    }

    #[test]
    fn worker_partitions_are_parsed() {
        let parse = |args: &[&str]| Cli::try_parse_from(args.iter().copied());
        let cli = parse(&["app", "worker", "--partitions", "0-3,6"]).unwrap();
        assert!(matches!(cli.command, Command::Worker { partitions: Some(p), .. } if p == [0, 1, 2, 3, 6]));
        let cli = parse(&["app", "worker"]).unwrap();
        assert!(matches!(cli.command, Command::Worker { partitions: None, .. }));
        for bad in ["", "3-1", "a", "0-3,,6", "-2"] {
            let err = parse(&["app", "worker", &format!("--partitions={bad}")]).unwrap_err();
            assert_eq!(err.kind(), clap::error::ErrorKind::ValueValidation, "{bad}: {err}");
        }
    }

    #[test]
    fn a_model_is_described_by_its_fields_and_an_unknown_one_is_not_found() {
        #[derive(serde::Serialize, serde::Deserialize)]
        struct Order {
            account_id: String,
            amount: u64,
        }
        impl crate::FaustRecord for Order {
            const NAMESPACE: &'static str = "orders.Order";
        }
        let mut models = crate::Models::new();
        models.register::<Order>();
        let model = describe_model(&models, "orders.Order").unwrap();
        assert_eq!(model["fields"], json!(["account_id", "amount"]));
        assert!(model["type"].as_str().unwrap().ends_with("Order"), "{model}");
        let err = describe_model(&models, "orders.Refund").unwrap_err();
        assert_eq!(err.code, EXIT_NOT_FOUND);
        assert!(err.message.contains("registered: [\"orders.Order\"]"), "{}", err.message);
        let cli = Cli::try_parse_from(["app", "model", "orders.Order"]).unwrap();
        assert!(matches!(cli.command, Command::Model { name } if name == "orders.Order"));
    }

    #[test]
    fn clean_versions_deletes_the_stores_of_other_versions_only() {
        let dir = tempfile::tempdir().unwrap();
        let mut settings = crate::Settings::new("shop");
        settings.datadir = dir.path().to_path_buf();
        settings.version = 3;
        let settings = settings.versioned();
        assert_eq!(settings.id, "shop-v3");
        assert_eq!(settings.table_dir(), dir.path().join("v3").join("tables"));
        for sub in ["tables/counts/0", "v2/tables/counts/0", "v3/tables/counts/0", "topics/orders/0", "vx"] {
            std::fs::create_dir_all(dir.path().join(sub)).unwrap();
        }
        let deleted = clean_versions(&settings).unwrap();
        let expected: Vec<String> = ["tables", "v2"].iter().map(|d| dir.path().join(d).display().to_string()).collect();
        assert_eq!(deleted, expected);
        for kept in ["v3/tables/counts/0", "topics/orders/0", "vx"] {
            assert!(dir.path().join(kept).is_dir(), "{kept} is kept");
        }
        assert!(clean_versions(&settings).unwrap().is_empty(), "nothing left to delete");
        assert_eq!(settings.clone().versioned().id, "shop-v3", "applied once");
        let cli = Cli::try_parse_from(["app", "clean_versions"]).unwrap();
        assert!(matches!(cli.command, Command::CleanVersions));
    }

    #[test]
    fn user_commands_take_their_arguments() {
        let user = UserCommand { name: "hello".into(), about: "greets".into(), run: Arc::new(|_, _| Ok(())) };
        let matches = clap_command("app".into(), &[user])
            .try_get_matches_from(["app", "--datadir", "d", "hello", "world", "--loud"])
            .unwrap();
        let (sub, m) = matches.subcommand().unwrap();
        assert_eq!(sub, "hello");
        let args: Vec<&String> = m.get_many::<String>("args").unwrap().collect();
        assert_eq!(args, ["world", "--loud"]);
    }
}
