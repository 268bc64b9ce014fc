//! A Kafka-protocol broker (tansu, in memory) that a benchmark starts for itself.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// A broker this run started; stopped (that PID only, through `scripts/broker stop` with the
/// same private state directory) when dropped, so also on error and on panic.
pub struct OwnBroker {
    script: PathBuf,
    state: tempfile::TempDir,
    /// Its address, `127.0.0.1:PORT`.
    pub addr: String,
}

impl OwnBroker {
    /// Starts one with `scripts/broker start` (installing tansu the first time).
    pub fn start() -> Result<OwnBroker, String> {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).parent().ok_or("no repository root")?;
        let script = root.join("scripts").join("broker");
        let state = tempfile::tempdir().map_err(|e| format!("temp dir: {e}"))?;
        let mut child = Command::new(&script)
            .arg("start")
            .env("FAUST_BROKER_STATE", state.path())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .map_err(|e| format!("running {}: {e}", script.display()))?;
        // The script bounds its own wait to 10 s; installing tansu (a 15 MB download) the
        // first time may take longer, but not this long.
        let deadline = Instant::now() + Duration::from_secs(180);
        let status = loop {
            match child.try_wait().map_err(|e| format!("waiting for scripts/broker: {e}"))? {
                Some(status) => break status,
                None if Instant::now() > deadline => {
                    let _ = child.kill();
                    let _ = child.wait();
                    // It may have started tansu before it hung.
                    drop(OwnBroker { script, state, addr: String::new() });
                    return Err("scripts/broker start did not finish within 180 s".into());
                }
                None => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut out = String::new();
        if let Some(mut stdout) = child.stdout.take() {
            use std::io::Read;
            stdout.read_to_string(&mut out).map_err(|e| format!("reading scripts/broker: {e}"))?;
        }
        let broker = OwnBroker { script, state, addr: out.trim().to_string() };
        if !status.success() || broker.addr.is_empty() {
            return Err(format!("scripts/broker start failed ({status})"));
        }
        Ok(broker)
    }
}

impl Drop for OwnBroker {
    fn drop(&mut self) {
        let _ = Command::new(&self.script)
            .arg("stop")
            .env("FAUST_BROKER_STATE", self.state.path())
            .stdout(Stdio::null())
            .status();
    }
}
