//! Instances of the reference service (`examples/orders`, package `idem-example-orders`) as real processes.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::time::{Duration, Instant};

/// One running `orders` process, killed when dropped.
pub struct Service {
    pub base: String,
    child: Child,
}

impl Drop for Service {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Builds the service once per test binary (a no-op when it is up to date) and returns its path.
fn binary() -> &'static PathBuf {
    static BINARY: OnceLock<PathBuf> = OnceLock::new();
    BINARY.get_or_init(|| {
        // Selecting the root package and this test target (already built) makes cargo resolve features as it did
        // for the tests, dev-dependencies included: the service then links the dependencies the tests were built
        // with. `cargo build -p idem-example-orders` alone would compile tokio, hyper, redis and sqlx once more with
        // the service's narrower features.
        let test = env!("CARGO_CRATE_NAME");
        let args = ["build", "--quiet", "-p", "axum-idem", "-p", "idem-example-orders", "--bin", "orders"];
        let status = Command::new(env!("CARGO"))
            .args(args)
            .args(["--test", test])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --bin orders");
        assert!(status.success(), "cargo build --bin orders failed");
        let deps = std::env::current_exe().expect("the test binary's path");
        let profile = deps.parent().and_then(|deps| deps.parent()).expect("target/<profile>");
        profile.join("orders")
    })
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

impl Service {
    /// Starts an instance with `env` (e.g. `REDIS_URL`) and waits until it answers.
    pub async fn start(env: &[(&str, String)]) -> Self {
        let port = free_port();
        let mut command = Command::new(binary());
        command.env("BIND", format!("127.0.0.1:{port}")).env("RUST_LOG", "warn").stdout(Stdio::null());
        for (name, value) in env {
            command.env(name, value);
        }
        let child = command.spawn().expect("start the orders example");
        let service = Self { base: format!("http://127.0.0.1:{port}"), child };
        let client = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if client.get(format!("{}/stats", service.base)).send().await.is_ok() {
                return service;
            }
            assert!(Instant::now() < deadline, "the orders service did not start within 20 s");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn executions(&self) -> u64 {
        let stats: serde_json::Value =
            reqwest::get(format!("{}/stats", self.base)).await.unwrap().json().await.unwrap();
        stats["executions"].as_u64().expect("executions")
    }

    /// The process id, for signals.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Kills the instance now with SIGKILL (a crash: no graceful shutdown, handlers stop mid-way) and reaps it.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the instance with SIGSTOP: its sockets stay open and the kernel still accepts connections, but nothing
    /// in it runs (no handler, no lease renewal) until [`Service::thaw`], like a process stuck in a long GC pause or
    /// a VM that was suspended.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Resumes an instance stopped by [`Service::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    /// Asks the instance to shut down (SIGTERM, what a deploy sends) and waits up to `within` for it to exit:
    /// `Some(exit status)`, or `None` if it was still running (it is then killed).
    pub fn terminate(&mut self, within: Duration) -> Option<std::process::ExitStatus> {
        self.signal("-TERM");
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = self.child.try_wait().expect("poll the instance") {
                return Some(status);
            }
            if Instant::now() >= deadline {
                self.kill();
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn signal(&self, signal: &str) {
        let status = Command::new("kill").args([signal, &self.pid().to_string()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {}", self.pid());
    }

    /// How many times handler bodies ran for requests with this `Idempotency-Key` (`GET /stats/keys/{key}`; the
    /// count lives in Redis when the instance uses it, so any instance can read another's). `key` must be URL-safe.
    pub async fn key_executions(&self, key: &str) -> u64 {
        let response = reqwest::get(format!("{}/stats/keys/{key}", self.base)).await.expect("GET /stats/keys");
        assert!(response.status().is_success(), "GET /stats/keys/{key}: {}", response.status());
        let stats: serde_json::Value = response.json().await.expect("a JSON body");
        stats["executions"].as_u64().expect("executions")
    }
}
