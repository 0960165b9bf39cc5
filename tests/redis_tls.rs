//! `rediss://`: the Redis store over TLS, against real `redis-server` processes listening on a TLS port with a
//! certificate from a throwaway CA the test makes with the `openssl` command.
//!
//! Built with the `tls` feature (`cargo test --features tls --test redis_tls`, a line of `.ci/run`), it runs the
//! TLS cases; built without it (`cargo test --workspace`), it checks the error a `rediss://` URL gets instead.

mod redis_server;

#[cfg(not(feature = "tls"))]
mod without_the_feature {
    use idem::RedisStore;
    use idem::store::StoreError;

    /// The message every constructor must give, so the user learns which feature to turn on.
    #[track_caller]
    fn assert_names_the_feature(result: Result<RedisStore, StoreError>, constructor: &str) {
        let error = result.expect_err("a rediss:// URL cannot work without the `tls` feature");
        assert!(matches!(error, StoreError::InvalidConfig(_)), "{constructor}: {error:?}");
        let message = error.to_string();
        assert!(message.contains("the `tls` feature of axum-idem"), "{constructor}: {message}");
    }

    #[tokio::test]
    async fn a_rediss_url_is_refused_with_an_error_naming_the_tls_feature() {
        // Nothing listens on port 1: the URL must be refused before any connection is tried.
        assert_names_the_feature(RedisStore::open("rediss://127.0.0.1:1").await, "open");
        assert_names_the_feature(RedisStore::builder().open("rediss://127.0.0.1:1/0").await, "builder().open");
        assert_names_the_feature(RedisStore::cluster(["rediss://127.0.0.1:1"]).await, "cluster");
        assert_names_the_feature(RedisStore::sentinel(["rediss://127.0.0.1:1"], "orders").await, "sentinel");
    }
}

#[cfg(feature = "tls")]
mod over_tls {
    use super::redis_server::RedisServer;
    use idem::RedisStore;
    use idem::store::{Claimed, Entry, Fingerprint, OwnerToken, Record, Store, StoreKey, Stored, Write};
    use std::net::TcpListener;
    use std::path::{Path, PathBuf};
    use std::process::Command;
    use std::sync::OnceLock;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::time::{Duration, Instant};

    /// A CA, a server certificate for `127.0.0.1` and a client certificate, all signed by the CA, as PEM files.
    pub struct Certificates {
        dir: PathBuf,
    }

    impl Certificates {
        /// Made once per test binary, in its own directory under Cargo's scratch directory for integration tests.
        pub fn get() -> &'static Self {
            static CERTIFICATES: OnceLock<Certificates> = OnceLock::new();
            CERTIFICATES.get_or_init(|| {
                let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join(format!("redis-tls-{}", std::process::id()));
                let _ = std::fs::remove_dir_all(&dir);
                std::fs::create_dir_all(&dir).expect("create the certificate directory");
                let certificates = Self { dir };
                certificates.make();
                certificates
            })
        }

        fn make(&self) {
            let p256 = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"];
            let mut ca = vec!["req", "-x509"];
            ca.extend(p256);
            ca.extend(["-keyout", "ca.key", "-out", "ca.pem", "-days", "2", "-subj", "/CN=idem test CA"]);
            ca.extend([
                "-addext",
                "basicConstraints=critical,CA:TRUE",
                "-addext",
                "keyUsage=critical,keyCertSign,cRLSign",
            ]);
            self.openssl(&ca);
            // Cluster nodes present the server certificate as clients of each other's TLS bus, which checks it.
            for (name, usage) in [("server", "serverAuth,clientAuth"), ("client", "clientAuth")] {
                let extensions = format!(
                    "subjectAltName=IP:127.0.0.1,DNS:localhost\nbasicConstraints=critical,CA:FALSE\n\
                     keyUsage=critical,digitalSignature\nextendedKeyUsage={usage}\n"
                );
                std::fs::write(self.dir.join(format!("{name}.ext")), extensions).expect("write the extensions");
                let (key, csr, pem, ext) =
                    (format!("{name}.key"), format!("{name}.csr"), format!("{name}.pem"), format!("{name}.ext"));
                let subject = format!("/CN=idem test {name}");
                let mut request = vec!["req"];
                request.extend(p256);
                request.extend(["-keyout", &key, "-out", &csr, "-subj", &subject]);
                self.openssl(&request);
                self.openssl(&[
                    "x509",
                    "-req",
                    "-in",
                    &csr,
                    "-CA",
                    "ca.pem",
                    "-CAkey",
                    "ca.key",
                    "-CAcreateserial",
                    "-out",
                    &pem,
                    "-days",
                    "2",
                    "-extfile",
                    &ext,
                ]);
            }
        }

        fn openssl(&self, args: &[&str]) {
            let output = Command::new("openssl").args(args).current_dir(&self.dir).output().unwrap_or_else(|error| {
                panic!(
                    "run `openssl` ({error}): the TLS tests make their certificates with it (apt-get install openssl)"
                )
            });
            assert!(
                output.status.success(),
                "openssl {args:?} failed: {}{}",
                String::from_utf8_lossy(&output.stdout),
                String::from_utf8_lossy(&output.stderr)
            );
        }

        pub fn path(&self, name: &str) -> String {
            self.dir.join(name).display().to_string()
        }

        pub fn pem(&self, name: &str) -> Vec<u8> {
            std::fs::read(self.dir.join(name)).expect("read a PEM file")
        }

        /// `redis-server` arguments for a TLS port with these certificates.
        pub fn server_args(&self, tls_port: u16, auth_clients: bool) -> Vec<String> {
            [
                "--tls-port",
                &tls_port.to_string(),
                "--tls-cert-file",
                &self.path("server.pem"),
                "--tls-key-file",
                &self.path("server.key"),
                "--tls-ca-cert-file",
                &self.path("ca.pem"),
                "--tls-auth-clients",
                if auth_clients { "yes" } else { "no" },
            ]
            .map(str::to_owned)
            .to_vec()
        }
    }

    /// A free loopback port whose Cluster bus port (+10000) is free too.
    pub fn free_tls_port() -> u16 {
        static NEXT: AtomicU64 = AtomicU64::new(0);
        let seed = u64::from(std::process::id()) * 6_151 + NEXT.fetch_add(1, Ordering::Relaxed) * 98_317;
        for attempt in 0..2000u64 {
            let port = 20_000 + ((seed + attempt * 7_919) % 20_000) as u16;
            if TcpListener::bind(("127.0.0.1", port)).is_ok() && TcpListener::bind(("127.0.0.1", port + 10_000)).is_ok()
            {
                return port;
            }
        }
        panic!("no free loopback port pair found");
    }

    /// A node with its plain port (for `redis-cli` and the readiness check) and a TLS port (for the store).
    pub struct TlsNode {
        pub server: RedisServer,
        pub tls_port: u16,
    }

    impl TlsNode {
        pub fn start(auth_clients: bool) -> Self {
            Self::start_with(auth_clients, &[])
        }

        pub fn start_with(auth_clients: bool, extra: &[&str]) -> Self {
            let tls_port = free_tls_port();
            let mut args = Certificates::get().server_args(tls_port, auth_clients);
            args.extend(extra.iter().map(ToString::to_string));
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            Self { server: RedisServer::start_with(&args), tls_port }
        }

        pub fn url(&self) -> String {
            format!("rediss://127.0.0.1:{}/", self.tls_port)
        }
    }

    /// A TLS node shared by the tests of this binary that need nothing special from it.
    pub fn shared_node() -> &'static TlsNode {
        static NODE: OnceLock<TlsNode> = OnceLock::new();
        NODE.get_or_init(|| TlsNode::start(false))
    }

    /// A store on `url` trusting the test CA.
    pub async fn store_on(url: String) -> RedisStore {
        RedisStore::builder()
            .tls_root_certificates(Certificates::get().pem("ca.pem"))
            .open(url)
            .await
            .expect("connect over TLS, trusting the test CA")
    }

    fn fp(text: &str) -> Fingerprint {
        Fingerprint::builder().field(text.as_bytes()).finish()
    }

    fn record(body: &'static str) -> Record {
        Record {
            fingerprint: fp("a"),
            stored: Stored::Response(idem::store::StoredResponse { status: 201, headers: vec![], body: body.into() }),
        }
    }

    fn fresh_key(label: &str) -> StoreKey {
        StoreKey::derive(&[b"tls", label.as_bytes(), format!("{:?}", Instant::now()).as_bytes()])
    }

    /// Claim, a second owner turned away, a waiter on the other instance woken by the completion's pub/sub
    /// notification, and the replay: every step over TLS, the waiter on a connection of its own.
    pub async fn claim_wait_complete_replay(first: RedisStore, second: RedisStore) {
        let key = fresh_key("round-trip");
        let owner = OwnerToken::generate();
        assert_eq!(first.claim(&key, &fp("a"), &owner, Duration::from_secs(30)).await.unwrap(), Claimed::Owned);
        assert_eq!(
            second.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap(),
            Claimed::Existing(Entry::InFlight { fingerprint: fp("a") })
        );
        let waiter = tokio::spawn({
            let key = key.clone();
            async move {
                let started = Instant::now();
                second.wait(&key, Duration::from_secs(30)).await.unwrap();
                let waited = started.elapsed();
                (waited, second.claim(&key, &fp("a"), &OwnerToken::generate(), Duration::from_secs(30)).await.unwrap())
            }
        });
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiter.is_finished(), "the waiter waits while the claim is in flight");
        assert_eq!(
            first.complete(&key, &owner, &record("order 1"), Duration::from_secs(60)).await.unwrap(),
            Write::Applied
        );
        let (waited, seen) = tokio::time::timeout(Duration::from_secs(10), waiter).await.unwrap().unwrap();
        assert!(waited < Duration::from_secs(5), "woken by the notification, not the 30 s timeout: {waited:?}");
        assert_eq!(seen, Claimed::Existing(Entry::Completed(record("order 1"))), "the replay reads the record");
    }

    /// A store on the shared TLS node, for the conformance suite.
    async fn shared_node_store() -> RedisStore {
        store_on(shared_node().url()).await
    }

    // The whole behaviour table and store contract over TLS: duplicates woken by pub/sub on a TLS connection,
    // records read back over TLS byte for byte.
    idem::test_kit::conformance_tests!(node_conformance, shared_node_store);

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_node_over_tls_claims_completes_replays_and_wakes_waiters() {
        let node = shared_node();
        claim_wait_complete_replay(store_on(node.url()).await, store_on(node.url()).await).await;
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_certificate_from_an_unknown_ca_is_refused() {
        let node = shared_node();
        // The default roots (the system's) do not hold the test CA: the handshake must fail, not fall back.
        let error = RedisStore::open(node.url()).await.expect_err("the server's CA is not trusted");
        assert!(error.to_string().contains("UnknownIssuer"), "a certificate error: {error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn certificates_need_a_rediss_url() {
        let node = shared_node();
        let error = RedisStore::builder()
            .tls_root_certificates(Certificates::get().pem("ca.pem"))
            .open(node.server.url())
            .await
            .expect_err("certificates on a redis:// URL are a mistake, not a silent plain connection");
        assert!(error.to_string().contains("rediss://"), "{error}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_server_that_authenticates_clients_gets_the_client_certificate() {
        let node = TlsNode::start(true);
        let certificates = Certificates::get();
        let without = RedisStore::builder().tls_root_certificates(certificates.pem("ca.pem")).open(node.url()).await;
        let refused = without.expect_err("the server requires a client certificate").to_string();
        assert!(refused.contains("CertificateRequired"), "refused for want of a client certificate: {refused}");
        let with = || async {
            RedisStore::builder()
                .tls_root_certificates(certificates.pem("ca.pem"))
                .tls_client_certificate(certificates.pem("client.pem"), certificates.pem("client.key"))
                .open(node.url())
                .await
                .expect("connect with a client certificate")
        };
        claim_wait_complete_replay(with().await, with().await).await;
    }

    /// Three TLS masters whose Cluster bus is TLS too (`tls-cluster yes`, on the plain port + 10000): `CLUSTER
    /// SLOTS` asked over TLS names the TLS ports, so the store's connections to every node are TLS.
    fn start_tls_cluster() -> Vec<TlsNode> {
        let nodes: Vec<TlsNode> = (0..3)
            .map(|_| {
                TlsNode::start_with(
                    false,
                    &[
                        "--cluster-enabled",
                        "yes",
                        "--cluster-config-file",
                        "nodes.conf",
                        "--cluster-node-timeout",
                        "2000",
                        "--tls-cluster",
                        "yes",
                    ],
                )
            })
            .collect();
        let addresses: Vec<String> = nodes.iter().map(|node| format!("127.0.0.1:{}", node.server.port)).collect();
        let output = Command::new("redis-cli")
            .arg("--cluster")
            .arg("create")
            .args(&addresses)
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            output.status.success(),
            "redis-cli --cluster create failed: {}{}",
            String::from_utf8_lossy(&output.stdout),
            String::from_utf8_lossy(&output.stderr)
        );
        let deadline = Instant::now() + Duration::from_secs(20);
        while !nodes.iter().all(|node| node.server.cli(&["CLUSTER", "INFO"]).contains("cluster_state:ok")) {
            assert!(Instant::now() < deadline, "the cluster did not reach cluster_state:ok within 20 s");
            std::thread::sleep(Duration::from_millis(50));
        }
        nodes
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_cluster_over_tls_claims_completes_replays_and_wakes_waiters_with_sharded_pubsub() {
        let nodes = start_tls_cluster();
        let urls: Vec<String> = nodes.iter().map(TlsNode::url).collect();
        let store = || async {
            RedisStore::builder()
                .tls_root_certificates(Certificates::get().pem("ca.pem"))
                .cluster(urls.clone())
                .await
                .expect("connect to the cluster over TLS")
        };
        claim_wait_complete_replay(store().await, store().await).await;
        // Refused without the test CA: the nodes are reached over TLS, with verification.
        let untrusted = RedisStore::cluster(urls.clone()).await.expect_err("the CA is not trusted");
        assert!(untrusted.to_string().contains("UnknownIssuer"), "{untrusted}");
    }

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_primary_found_through_sentinel_over_tls_is_reached_over_tls() {
        let primary = TlsNode::start(false);
        let certificates = Certificates::get();
        // The Sentinel listens on a TLS port too, and reaches the primary's TLS port (`tls-replication yes`), so
        // the address it answers with is the primary's TLS port.
        let sentinel_tls_port = free_tls_port();
        let extra = format!(
            "tls-port {sentinel_tls_port}\ntls-cert-file {}\ntls-key-file {}\ntls-ca-cert-file {}\n\
             tls-auth-clients no\ntls-replication yes",
            certificates.path("server.pem"),
            certificates.path("server.key"),
            certificates.path("ca.pem"),
        );
        let _sentinel = RedisServer::sentinel_with("orders", primary.tls_port, &extra);
        let sentinels = || vec![format!("rediss://127.0.0.1:{sentinel_tls_port}")];
        let store = || async {
            RedisStore::builder()
                .tls_root_certificates(certificates.pem("ca.pem"))
                .sentinel(sentinels(), "orders")
                .await
                .expect("connect through the Sentinel over TLS")
        };
        claim_wait_complete_replay(store().await, store().await).await;
        // Refused without the test CA: the constructor connects, so it is the one that fails.
        let refused = RedisStore::sentinel(sentinels(), "orders").await;
        let refused = refused.expect_err("without the test CA, neither the Sentinel nor the primary is trusted");
        assert!(refused.to_string().contains("UnknownIssuer"), "{refused}");
    }
}
