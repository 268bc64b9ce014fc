//! Running the examples' command lines as processes: a worker in one, the other commands in
//! others, talking through the control socket in the data directory.

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// Runs `bin --datadir DATADIR ARGS...` with `stdin` fed in.
pub fn cli(bin: &str, datadir: &Path, args: &[&str], stdin: Option<&str>) -> Output {
    let mut child = Command::new(bin)
        .arg("--datadir")
        .arg(datadir)
        .args(args)
        .env_remove("RUST_LOG")
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("start the command");
    let mut input = child.stdin.take().expect("stdin");
    if let Some(text) = stdin {
        input.write_all(text.as_bytes()).expect("write stdin");
    }
    drop(input);
    child.wait_with_output().expect("wait for the command")
}

/// The command's exit code (-1 when a signal ended it).
pub fn code(output: &Output) -> i32 {
    output.status.code().unwrap_or(-1)
}

/// What the command printed on stdout.
pub fn stdout(output: &Output) -> String {
    String::from_utf8_lossy(&output.stdout).into_owned()
}

/// What the command printed on stderr.
pub fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// The command's stdout as JSON (panics, with both outputs, when it is not).
pub fn json(output: &Output) -> Value {
    serde_json::from_slice(&output.stdout)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {}\nstderr: {}", stdout(output), stderr(output)))
}

/// A worker process, killed if the test ends without stopping it.
pub struct Worker {
    child: Child,
    bin: &'static str,
    datadir: PathBuf,
    out: PathBuf,
    err: PathBuf,
}

impl Worker {
    /// Starts `bin --datadir DATADIR worker` (commits every 100 ms) with `env`, and waits
    /// until it answers.
    pub fn start(bin: &'static str, datadir: &Path, env: &[(&str, &str)]) -> Worker {
        std::fs::create_dir_all(datadir).unwrap();
        let name = format!("worker-{}", std::fs::read_dir(datadir.parent().unwrap()).unwrap().count());
        let (out, err) = (datadir.with_file_name(format!("{name}.out")), datadir.with_file_name(format!("{name}.err")));
        let mut cmd = Command::new(bin);
        cmd.arg("--datadir")
            .arg(datadir)
            .arg("worker")
            .env("BROKER_COMMIT_INTERVAL", "0.1")
            .env_remove("RUST_LOG")
            .stdout(std::fs::File::create(&out).unwrap())
            .stderr(std::fs::File::create(&err).unwrap());
        for (k, v) in env {
            cmd.env(k, v);
        }
        let child = cmd.spawn().expect("start the worker");
        let mut worker = Worker { child, bin, datadir: datadir.to_path_buf(), out, err };
        worker.wait_ready();
        worker
    }

    /// Until the worker answers on its control socket (it created its topics by then), or
    /// exits.
    pub fn wait_ready(&mut self) {
        let start = Instant::now();
        while start.elapsed() < Duration::from_secs(60) {
            if self.child.try_wait().unwrap().is_some() {
                return;
            }
            let topics = cli(self.bin, &self.datadir, &["topics", "--json"], None);
            if code(&topics) == 0 && json(&topics).as_array().is_some_and(|t| t.iter().all(|t| t["records"].is_u64())) {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("the worker did not answer within 60 s; its log:\n{}", self.log());
    }

    /// What the worker printed on stdout so far.
    pub fn stdout(&self) -> String {
        std::fs::read_to_string(&self.out).unwrap_or_default()
    }

    /// The worker's log (stderr) so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.err).unwrap_or_default()
    }

    /// Sends SIGTERM and waits (bounded) for the exit code.
    pub fn stop(mut self) -> i32 {
        // SAFETY: signalling the child this test started, by its PID.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.wait(Duration::from_secs(60))
    }

    /// Waits (bounded) for the worker to exit by itself.
    pub fn wait(&mut self, timeout: Duration) -> i32 {
        let start = Instant::now();
        while start.elapsed() < timeout {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status.code().unwrap_or(-1);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("the worker did not exit within {timeout:?}; its log:\n{}", self.log());
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// Polls `check` every 50 ms for up to 30 s.
pub fn eventually(what: &str, mut check: impl FnMut() -> bool) {
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(30) {
        if check() {
            return;
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    panic!("{what}: not within 30 s");
}

/// `count` orders per account, `accounts` accounts, as JSON lines.
pub fn order_lines(count: usize, accounts: usize, offset: usize) -> (String, std::collections::BTreeMap<String, u64>) {
    let mut lines = String::new();
    let mut expected = std::collections::BTreeMap::new();
    for i in offset..offset + count {
        let account = format!("account-{}", i % accounts);
        lines.push_str(&format!(
            "{{\"account_id\": \"{account}\", \"product_id\": \"product-{i}\", \"amount\": 1, \"price\": 2.5}}\n"
        ));
        *expected.entry(account).or_insert(0) += 1;
    }
    (lines, expected)
}

/// The `order_count` table of the orders worker running on `datadir`.
pub fn dump(bin: &str, datadir: &Path) -> std::collections::BTreeMap<String, u64> {
    let out = cli(bin, datadir, &["table", "dump", "order_count", "--json"], None);
    assert_eq!(code(&out), 0, "{}", stderr(&out));
    json(&out)
        .as_array()
        .unwrap()
        .iter()
        .map(|kv| (kv["key"].as_str().unwrap().to_string(), kv["value"].as_u64().unwrap()))
        .collect()
}
