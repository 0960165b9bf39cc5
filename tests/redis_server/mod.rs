//! Real `redis-server` processes for tests: a single node, a 3-master Cluster, a primary + replica + Sentinel.
//!
//! Each server listens on a free loopback port, in its own temporary directory, and is killed when its handle drops
//! or, should the test process die first, by a watchdog shell that outlives it by at most half a second.
#![allow(dead_code)]

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

/// One `redis-server` process (a node or a Sentinel).
pub struct RedisServer {
    pub port: u16,
    child: Child,
    dir: PathBuf,
    args: Vec<String>,
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn binary(name: &str) -> String {
    let found = Command::new("sh").arg("-c").arg(format!("command -v {name}")).output();
    match found {
        Ok(output) if output.status.success() => String::from_utf8_lossy(&output.stdout).trim().to_owned(),
        _ => panic!(
            "`{name}` is not installed: these tests run against real Redis processes. \
             Install it with `apt-get install redis-server redis-tools` (or run `bash .ci/run`)."
        ),
    }
}

/// A free loopback port whose Cluster bus port (+10000) is free too.
fn free_port() -> u16 {
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let seed = u64::from(std::process::id()) * 7919 + NEXT.fetch_add(1, Ordering::Relaxed) * 104_729;
    for attempt in 0..2000u64 {
        let port = 20_000 + ((seed + attempt * 7_561) % 20_000) as u16;
        if TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok() {
            return port;
        }
    }
    panic!("no free loopback port pair found");
}

fn scratch_dir(port: u16) -> PathBuf {
    let dir = std::env::temp_dir().join(format!("idem-redis-{}-{port}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create a scratch directory");
    dir
}

impl RedisServer {
    /// A standalone node.
    pub fn start() -> Self {
        Self::start_with(&[])
    }

    /// A node with extra `redis-server` arguments (e.g. `["--replicaof", "127.0.0.1", "6379"]`).
    pub fn start_with(extra: &[&str]) -> Self {
        let port = free_port();
        let dir = scratch_dir(port);
        let mut args: Vec<String> =
            ["--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--protected-mode", "no"]
                .iter()
                .map(ToString::to_string)
                .collect();
        args.extend(["--port".to_owned(), port.to_string(), "--dir".to_owned(), dir.display().to_string()]);
        args.extend(extra.iter().map(ToString::to_string));
        let child = spawn_watched(&binary("redis-server"), &args, &dir);
        let server = Self { port, child, dir, args };
        server.wait_until_ready();
        server
    }

    /// Starts the server again, on the same port, after [`RedisServer::kill`] (an empty dataset: nothing persists).
    pub fn restart(&mut self) {
        self.child = spawn_watched(&binary("redis-server"), &self.args, &self.dir);
        self.wait_until_ready();
    }

    /// A Sentinel watching `primary` under the name `service`.
    pub fn sentinel(service: &str, primary: &RedisServer) -> Self {
        let port = free_port();
        let dir = scratch_dir(port);
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n\
                 sentinel monitor {service} 127.0.0.1 {primary} 1\n\
                 sentinel down-after-milliseconds {service} 1000\n\
                 sentinel failover-timeout {service} 3000\n\
                 sentinel parallel-syncs {service} 1\n",
                dir = dir.display(),
                primary = primary.port,
            ),
        )
        .expect("write sentinel.conf");
        let args = vec![config.display().to_string(), "--sentinel".to_owned()];
        let child = spawn_watched(&binary("redis-server"), &args, &dir);
        let server = Self { port, child, dir, args };
        server.wait_until_ready();
        server
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}/", self.port)
    }

    /// Runs `redis-cli` against this server and returns its output.
    pub fn cli(&self, args: &[&str]) -> String {
        let output = Command::new(binary("redis-cli"))
            .args(["-h", "127.0.0.1", "-p", &self.port.to_string()])
            .args(args)
            .output()
            .expect("run redis-cli");
        String::from_utf8_lossy(&output.stdout).into_owned()
    }

    /// Kills the server now with SIGKILL (a crash, not a shutdown), then its watchdog.
    pub fn kill(&mut self) {
        if let Ok(pid) = std::fs::read_to_string(self.dir.join("redis.pid")) {
            let _ = Command::new("kill").args(["-KILL", pid.trim()]).status();
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Stops the server with SIGSTOP: it keeps its port and accepts TCP connections (the kernel does), but answers
    /// nothing, like a host that hangs or a network that drops packets.
    pub fn freeze(&self) {
        self.signal("-STOP");
    }

    /// Resumes a server stopped by [`RedisServer::freeze`] (SIGCONT).
    pub fn thaw(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, signal: &str) {
        let pid = std::fs::read_to_string(self.dir.join("redis.pid")).expect("redis.pid");
        let status = Command::new("kill").args([signal, pid.trim()]).status().expect("run kill");
        assert!(status.success(), "kill {signal} {}", pid.trim());
    }

    /// Whether this node replicates another (`role:slave`).
    pub fn is_replica(&self) -> bool {
        self.cli(&["INFO", "replication"]).contains("role:slave")
    }

    fn wait_until_ready(&self) {
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if self.cli(&["PING"]).trim() == "PONG" {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        panic!("redis-server on port {} did not answer PING within 10 s", self.port);
    }

    /// A node that writes every change to its append-only file before answering (`appendfsync always`), so a
    /// [`RedisServer::restart`] after [`RedisServer::kill`] finds every acknowledged claim, record and counter again,
    /// with its expiry (kept as an absolute time: a lease keeps running out while the server is down).
    pub fn start_persistent() -> Self {
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }
}

/// Starts `program` under a shell that kills it when this test process exits, even by a crash or SIGKILL.
fn spawn_watched(program: &str, args: &[String], dir: &std::path::Path) -> Child {
    let script = r#"
        parent=$1; shift
        "$@" &
        child=$!
        echo $child > redis.pid
        trap 'kill $child 2>/dev/null; exit 0' TERM INT
        while kill -0 "$parent" 2>/dev/null && kill -0 "$child" 2>/dev/null; do sleep 0.5; done
        kill $child 2>/dev/null
        wait $child 2>/dev/null
    "#;
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
        .expect("spawn redis-server")
}

/// Three masters, every slot assigned; with [`RedisCluster::start_with_replicas`], a replica for each.
pub struct RedisCluster {
    pub nodes: Vec<RedisServer>,
}

impl RedisCluster {
    /// Three masters, no replicas.
    pub fn start() -> Self {
        Self::start_with(0)
    }

    /// Three masters and one replica of each, every replica in sync with its master.
    pub fn start_with_replicas() -> Self {
        Self::start_with(1)
    }

    fn start_with(replicas_per_master: usize) -> Self {
        let nodes: Vec<RedisServer> = (0..3 * (1 + replicas_per_master))
            .map(|_| {
                RedisServer::start_with(&[
                    "--cluster-enabled",
                    "yes",
                    "--cluster-config-file",
                    "nodes.conf",
                    "--cluster-node-timeout",
                    "2000",
                ])
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|node| format!("127.0.0.1:{}", node.port)).collect();
        let output = Command::new(binary("redis-cli"))
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", &replicas_per_master.to_string(), "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let cluster = Self { nodes };
        let deadline = Instant::now() + Duration::from_secs(30);
        // Every node knows every other, with its role (a client reads the topology from some of them: one that does
        // not list a replica yet would route no read to it), and every replica is in sync.
        let ready = |node: &RedisServer| {
            let known = node.cli(&["CLUSTER", "NODES"]);
            let replicas_known = known
                .lines()
                .filter(|line| {
                    let fields: Vec<&str> = line.split(' ').collect();
                    fields.len() > 7 && fields[2].contains("slave") && fields[3] != "-" && fields[7] == "connected"
                })
                .count();
            node.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")
                && known.lines().count() == cluster.nodes.len()
                && replicas_known == 3 * replicas_per_master
                && (!node.is_replica() || node.cli(&["INFO", "replication"]).contains("master_link_status:up"))
        };
        while !cluster.nodes.iter().all(ready) {
            assert!(Instant::now() < deadline, "the cluster did not reach cluster_state:ok within 30 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        if replicas_per_master > 0 {
            // Redis 7 leaves out of `CLUSTER SLOTS` (the topology a client reads) a replica whose replication offset
            // it knows as 0: one write per primary moves every offset, and gossip spreads them within a second or so.
            for primary in cluster.primaries() {
                primary.cli(&["FLUSHALL"]);
            }
            let listed = |node: &RedisServer| node.cli(&["CLUSTER", "SLOTS"]).matches("127.0.0.1").count();
            while !cluster.nodes.iter().all(|node| listed(node) == cluster.nodes.len()) {
                assert!(Instant::now() < deadline, "CLUSTER SLOTS did not list every replica within 30 s");
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        cluster
    }

    /// The nodes that serve slots.
    pub fn primaries(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|node| !node.is_replica())
    }

    /// The nodes that replicate a primary.
    pub fn replicas(&self) -> impl Iterator<Item = &RedisServer> {
        self.nodes.iter().filter(|node| node.is_replica())
    }

    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(RedisServer::url).collect()
    }

    /// Sum of `cmdstat_<command>` calls over every node.
    pub fn command_calls(&self, command: &str) -> u64 {
        self.nodes.iter().map(|node| command_calls(node, command)).sum()
    }
}

/// `calls` of `cmdstat_<command>` in `INFO commandstats` (0 when never called).
pub fn command_calls(server: &RedisServer, command: &str) -> u64 {
    let stats = server.cli(&["INFO", "commandstats"]);
    let prefix = format!("cmdstat_{command}:calls=");
    stats
        .lines()
        .find_map(|line| line.strip_prefix(&prefix))
        .and_then(|rest| rest.split(',').next())
        .map_or(0, |calls| calls.parse().expect("a call count"))
}

/// Every command's call count, for asserting that nothing else was sent.
pub fn all_command_calls(server: &RedisServer) -> Vec<(String, u64)> {
    server
        .cli(&["INFO", "commandstats"])
        .lines()
        .filter_map(|line| {
            let rest = line.strip_prefix("cmdstat_")?;
            let (name, stats) = rest.split_once(':')?;
            let calls = stats.strip_prefix("calls=")?.split(',').next()?.parse().ok()?;
            Some((name.to_owned(), calls))
        })
        .collect()
}

/// A store on one `redis-server` shared by every test of this binary (stopped by its watchdog when the binary
/// exits), each store with its own key prefix so tests never see each other's records.
pub async fn shared_node_store() -> idem::RedisStore {
    static SERVER: std::sync::OnceLock<RedisServer> = std::sync::OnceLock::new();
    static NEXT: AtomicU64 = AtomicU64::new(0);
    let server = SERVER.get_or_init(RedisServer::start);
    let prefix = format!("idem-test-{}:", NEXT.fetch_add(1, Ordering::Relaxed));
    idem::RedisStore::builder().prefix(prefix).open(server.url()).await.expect("connect to the test redis-server")
}

impl RedisServer {
    /// A node that makes every write durable before acknowledging it (AOF with `appendfsync always`), so after
    /// [`RedisServer::terminate`] and [`RedisServer::restart_keeping_data`] it holds every write it acknowledged.
    pub fn start_durable() -> Self {
        // Later arguments override the `--appendonly no` of `start_with`.
        Self::start_with(&["--appendonly", "yes", "--appendfsync", "always"])
    }

    /// Stops the server with SIGTERM, a graceful shutdown (it syncs its AOF and exits), and waits until it is gone.
    /// Its data directory stays. Unlike [`RedisServer::kill`] (SIGKILL, a crash), no acknowledged write is lost;
    /// but the replies to commands it executed in its last event-loop turn can be: Redis 7 writes replies just
    /// before it next waits for input, and shuts down from its timer in between, so such a command is durable
    /// while its client sees the connection close. [`RedisServer::drain_and_terminate`] avoids that.
    pub fn terminate(&mut self) {
        let pid = std::fs::read_to_string(self.dir.join("redis.pid")).expect("redis.pid");
        let pid = pid.trim();
        let status = Command::new("kill").args(["-TERM", pid]).status().expect("run kill");
        assert!(status.success(), "kill -TERM {pid}");
        let deadline = Instant::now() + Duration::from_secs(20);
        while Command::new("kill").args(["-0", pid]).stderr(Stdio::null()).status().is_ok_and(|s| s.success()) {
            assert!(Instant::now() < deadline, "redis-server {pid} did not exit within 20 s of SIGTERM");
            std::thread::sleep(Duration::from_millis(10));
        }
        // Its watchdog shell notices within half a second.
        let _ = self.child.wait();
    }

    /// A maintenance shutdown: `CLIENT PAUSE WRITE` first (write commands from then on wait, and are never run),
    /// then [`RedisServer::terminate`]. Every write the server ran had its reply sent before the pause was
    /// acknowledged, so a client never sees an error for a write that took effect.
    pub fn drain_and_terminate(&mut self) {
        let paused = self.cli(&["CLIENT", "PAUSE", "60000", "WRITE"]);
        assert_eq!(paused.trim(), "OK", "CLIENT PAUSE WRITE");
        self.terminate();
    }

    /// Starts the server again on the same port and in the same directory after [`RedisServer::terminate`] or
    /// [`RedisServer::kill`]; a server from [`RedisServer::start_durable`] loads its AOF and comes back with its
    /// data.
    pub fn restart_keeping_data(&mut self) {
        self.restart();
    }

    /// A Sentinel watching the primary at `127.0.0.1:primary_port` under the name `service`, with `extra` lines of
    /// configuration (e.g. a TLS port, and `tls-replication yes` to reach a primary's TLS port).
    pub fn sentinel_with(service: &str, primary_port: u16, extra: &str) -> Self {
        let port = free_port();
        let dir = scratch_dir(port);
        let config = dir.join("sentinel.conf");
        std::fs::write(
            &config,
            format!(
                "port {port}\nbind 127.0.0.1\nprotected-mode no\ndir {dir}\n{extra}\n\
                 sentinel monitor {service} 127.0.0.1 {primary_port} 1\n\
                 sentinel down-after-milliseconds {service} 1000\n",
                dir = dir.display(),
            ),
        )
        .expect("write sentinel.conf");
        let args = vec![config.display().to_string(), "--sentinel".to_owned()];
        let child = spawn_watched(&binary("redis-server"), &args, &dir);
        let server = Self { port, child, dir, args };
        server.wait_until_ready();
        server
    }
}
