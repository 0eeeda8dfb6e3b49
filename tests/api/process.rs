//! `BinApp`: the compiled `shindensen` binary as a child process, for what
//! only a real process shows (signals, crashes, exported traces, logs).

use std::process::{ExitStatus, Stdio};
use std::sync::{Arc, Mutex};

use tempfile::TempDir;
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::oneshot;

use crate::helpers::{Api, DEADLINE, TEST_SECRET};

pub struct BinApp {
    pub api: Api,
    pub child: Child,
    pub dir: Arc<TempDir>,
    /// Everything the process wrote to stdout and stderr.
    pub logs: Arc<Mutex<String>>,
}

impl std::ops::Deref for BinApp {
    type Target = Api;
    fn deref(&self) -> &Api {
        &self.api
    }
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_shindensen")
}

/// A command for the binary with a clean environment: only PATH and the
/// test's database and secret.
pub fn command(dir: &TempDir) -> Command {
    with_env(Command::new(bin()), dir)
}

fn with_env(mut cmd: Command, dir: &TempDir) -> Command {
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("DATABASE_URL", crate::db::database_url(dir.path()))
        .env("JWT_SECRET", TEST_SECRET)
        .env("SHINDENSEN_SERVER__LISTEN", "127.0.0.1:0")
        .env("SHINDENSEN_LOG__FORMAT", "json")
        .current_dir(dir.path());
    cmd
}

impl BinApp {
    pub async fn spawn(dir: Arc<TempDir>, envs: &[(&str, &str)]) -> BinApp {
        let cmd = command(&dir);
        Self::spawn_command(cmd, dir, envs).await
    }

    /// The binary under `prlimit`, with an open-files limit of `nofile`
    /// (soft and hard).
    pub async fn spawn_with_nofile(
        dir: Arc<TempDir>,
        envs: &[(&str, &str)],
        nofile: u64,
    ) -> BinApp {
        let mut cmd = Command::new("prlimit");
        cmd.arg(format!("--nofile={nofile}:{nofile}"))
            .arg("--")
            .arg(bin());
        let cmd = with_env(cmd, &dir);
        Self::spawn_command(cmd, dir, envs).await
    }

    async fn spawn_command(mut cmd: Command, dir: Arc<TempDir>, envs: &[(&str, &str)]) -> BinApp {
        crate::db::ensure_database(dir.path()).await;
        for (k, v) in envs {
            cmd.env(k, v);
        }
        let mut child = cmd
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .kill_on_drop(true)
            .spawn()
            .expect("binary starts");
        let logs = Arc::new(Mutex::new(String::new()));
        let (addr_tx, addr_rx) = oneshot::channel::<String>();
        let mut addr_tx = Some(addr_tx);
        let stdout = child.stdout.take().unwrap();
        let stderr = child.stderr.take().unwrap();
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stdout).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    if line.contains("shindensen listening") {
                        let v: serde_json::Value = serde_json::from_str(&line).unwrap_or_default();
                        if let (Some(tx), Some(addr)) = (addr_tx.take(), v["addr"].as_str()) {
                            let _ = tx.send(addr.to_string());
                        }
                    }
                    let mut l = logs.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        {
            let logs = logs.clone();
            tokio::spawn(async move {
                let mut lines = BufReader::new(stderr).lines();
                while let Ok(Some(line)) = lines.next_line().await {
                    let mut l = logs.lock().unwrap();
                    l.push_str(&line);
                    l.push('\n');
                }
            });
        }
        let addr = match tokio::time::timeout(DEADLINE, addr_rx).await {
            Ok(Ok(addr)) => addr,
            _ => panic!(
                "the binary did not start; output:\n{}",
                logs.lock().unwrap()
            ),
        };
        BinApp {
            api: Api::new(&addr),
            child,
            dir,
            logs,
        }
    }

    fn signal(&self, sig: &str) {
        let pid = self.child.id().expect("running").to_string();
        let status = std::process::Command::new("kill")
            .args([sig, &pid])
            .status()
            .expect("kill runs");
        assert!(status.success());
    }

    pub fn sigterm(&self) {
        self.signal("-TERM");
    }

    /// SIGKILL and wait for the process to be gone.
    pub async fn kill9(mut self) -> Arc<TempDir> {
        self.signal("-KILL");
        let _ = self.child.wait().await;
        self.dir.clone()
    }

    pub async fn wait(&mut self) -> ExitStatus {
        tokio::time::timeout(DEADLINE, self.child.wait())
            .await
            .expect("the process exits within the deadline")
            .expect("wait works")
    }

    pub fn logs(&self) -> String {
        self.logs.lock().unwrap().clone()
    }
}
