//! Real PostgreSQL servers for tests: `initdb` into a temporary directory, then `postgres` on a free loopback port
//! with trust authentication and its unix socket in that directory.
//!
//! The binaries are Debian's (`apt-get install postgresql`), in `/usr/lib/postgresql/<version>/bin`, off `PATH`;
//! the newest version there is used. PostgreSQL refuses to run as root, so when the tests run as root both
//! `initdb` and `postgres` run as the `postgres` user (`runuser`), in a directory that user owns. A server is
//! stopped (an immediate shutdown) and its directory removed when its handle drops or, should the test process die
//! first, by a watchdog shell that outlives it by at most half a second.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One `postgres` server (the postmaster and its backends).
pub struct PostgresServer {
    pub port: u16,
    dir: PathBuf,
    child: Child,
    settings: Vec<String>,
}

impl Drop for PostgresServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// The directory holding `initdb` and `postgres`: the newest `/usr/lib/postgresql/<version>/bin`.
fn bin_dir() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let versions = std::fs::read_dir("/usr/lib/postgresql").into_iter().flatten().flatten();
        let mut found: Vec<(u32, PathBuf)> = versions
            .filter_map(|entry| {
                let version = entry.file_name().to_str()?.parse::<u32>().ok()?;
                let bin = entry.path().join("bin");
                (bin.join("initdb").is_file() && bin.join("postgres").is_file()).then_some((version, bin))
            })
            .collect();
        found.sort();
        match found.pop() {
            Some((_, bin)) => bin,
            None => panic!(
                "PostgreSQL is not installed: these tests run against a real PostgreSQL server and found no \
                 /usr/lib/postgresql/<version>/bin/initdb. Install it with \
                 `apt-get install --no-install-recommends postgresql` (or run `bash .ci/run`)."
            ),
        }
    })
}

fn running_as_root() -> bool {
    let output = Command::new("id").arg("-u").output().expect("run id -u");
    String::from_utf8_lossy(&output.stdout).trim() == "0"
}

/// `program` from the PostgreSQL bin directory, as the `postgres` user when running as root.
fn pg_command(program: &str) -> Command {
    let path = bin_dir().join(program);
    if running_as_root() {
        let mut command = Command::new("runuser");
        command.args(["-u", "postgres", "--"]).arg(path);
        command
    } else {
        Command::new(path)
    }
}

fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()) * 7919 + NEXT.fetch_add(1, Ordering::Relaxed) * 104_729;
    for attempt in 0..2000u64 {
        let port = 40_000 + ((seed + attempt * 7_561) % 20_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port found");
}

impl PostgresServer {
    /// A fresh cluster (`initdb`) served on a free loopback port. `fsync` is off: a stopped server loses nothing (the
    /// operating system still holds what it wrote), only a power cut would. Commits stay synchronous, so every
    /// acknowledged write survives [`PostgresServer::stop`].
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A server with extra settings, each `name=value` (passed as `-c name=value`), e.g.
    /// `shared_preload_libraries=pg_stat_statements`.
    pub fn start_with(settings: &[&str]) -> Self {
        let port = free_port();
        let dir = std::env::temp_dir().join(format!("idem-postgres-{}-{port}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("create a scratch directory");
        if running_as_root() {
            let status = Command::new("chown").arg("postgres:").arg(&dir).status().expect("run chown");
            assert!(status.success(), "chown postgres: {}", dir.display());
        }
        let output = pg_command("initdb")
            .args(["-D", "data", "-U", "postgres", "-A", "trust", "-E", "UTF8", "--no-sync", "--no-instructions"])
            .current_dir(&dir)
            .output()
            .expect("run initdb");
        assert!(
            output.status.success(),
            "initdb failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let settings: Vec<String> = settings.iter().map(ToString::to_string).collect();
        let child = spawn_watched(&dir, port, &settings);
        let server = Self { port, dir, child, settings };
        server.wait_until_ready();
        server
    }

    /// `postgres://postgres@127.0.0.1:<port>/postgres`.
    pub fn url(&self) -> String {
        format!("postgres://postgres@127.0.0.1:{}/postgres", self.port)
    }

    fn postmaster_pid(&self) -> Option<String> {
        let pid = std::fs::read_to_string(self.dir.join("data/postmaster.pid")).ok()?;
        pid.lines().next().map(|line| line.trim().to_owned()).filter(|pid| !pid.is_empty())
    }

    /// Stops the server at once (an immediate shutdown, SIGQUIT: every backend exits without a goodbye, as in a
    /// crash) and waits until it is gone. Its data stays for [`PostgresServer::start_again`].
    pub fn stop(&mut self) {
        if let Some(pid) = self.postmaster_pid() {
            let _ = Command::new("kill").args(["-QUIT", &pid]).stderr(Stdio::null()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            while Command::new("kill").args(["-0", &pid]).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
                assert!(Instant::now() < deadline, "postgres {pid} did not exit within 20 s of SIGQUIT");
                std::thread::sleep(Duration::from_millis(10));
            }
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Starts the server again on the same port with the same data after [`PostgresServer::stop`].
    pub fn start_again(&mut self) {
        self.child = spawn_watched(&self.dir, self.port, &self.settings);
        self.wait_until_ready();
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            let ready = Command::new(bin_dir().join("pg_isready"))
                .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string(), "-U", "postgres"])
                .status()
                .is_ok_and(|status| status.success());
            if ready {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let log = std::fs::read_to_string(self.dir.join("postgres.log")).unwrap_or_default();
        panic!("postgres on port {} did not accept connections within 30 s:\n{log}", self.port);
    }
}

/// Starts `postgres` under a shell that stops it (and removes its directory) when this test process exits, even
/// by a crash or SIGKILL.
fn spawn_watched(dir: &Path, port: u16, settings: &[String]) -> Child {
    let script = r#"
        parent=$1; shift
        "$@" >>postgres.log 2>&1 &
        child=$!
        stop() {
            pid=$(head -n 1 data/postmaster.pid 2>/dev/null)
            [ -n "$pid" ] && kill -QUIT "$pid" 2>/dev/null
            wait $child 2>/dev/null
        }
        trap 'stop; exit 0' TERM INT
        while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
        if ! kill -0 "$parent" 2>/dev/null; then stop; rm -rf "$PWD"; fi
    "#;
    let mut postgres = pg_command("postgres");
    postgres.args(["-D", "data", "-p", &port.to_string(), "-k"]).arg(dir).args([
        "-c",
        "listen_addresses=127.0.0.1",
        "-c",
        "max_connections=300",
        "-c",
        "fsync=off",
        "-c",
        "full_page_writes=off",
    ]);
    for setting in settings {
        postgres.arg("-c").arg(setting);
    }
    let program = postgres.get_program().to_owned();
    let args: Vec<_> = postgres.get_args().map(ToOwned::to_owned).collect();
    Command::new("sh")
        .arg("-c")
        .arg(script)
        .arg("watchdog")
        .arg(std::process::id().to_string())
        .arg(program)
        .args(args)
        .current_dir(dir)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn postgres")
}

/// A server shared by every test of this binary (stopped by its watchdog when the binary exits).
pub fn shared_server() -> &'static PostgresServer {
    static SERVER: OnceLock<PostgresServer> = OnceLock::new();
    SERVER.get_or_init(PostgresServer::start)
}

/// A table name no other store of this test process uses: `idem_test_<n>`.
pub fn fresh_table() -> String {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    format!("idem_test_{}", NEXT.fetch_add(1, Ordering::Relaxed))
}

/// A store on the shared server, on a table of its own (migrated), so tests never see each other's rows.
pub async fn shared_store() -> idem::PostgresStore {
    store_on(shared_server(), idem::PostgresStore::builder()).await
}

/// A store on `server` made by `builder` (which may set timeouts), on a fresh migrated table.
pub async fn store_on(server: &PostgresServer, builder: idem::store::PostgresStoreBuilder) -> idem::PostgresStore {
    let store = builder
        .table(&fresh_table())
        .max_connections(4)
        .connect(&server.url())
        .await
        .expect("connect to the test postgres");
    store.migrate().await.expect("create the table");
    store
}
