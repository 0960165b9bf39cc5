//! `rediss://`: the certificates a [`RedisStoreBuilder`] carries, how they reach each kind of connection (node,
//! Cluster, Sentinel and the primary it names), the rustls crypto provider, and the error a `rediss://` URL gets
//! when the `tls` feature is off.
//!
//! [`RedisStoreBuilder`]: crate::store::redis::builder::RedisStoreBuilder

use crate::store::error::StoreError;
use crate::store::redis::connection::invalid_config;
use redis::cluster::ClusterClientBuilder;
use redis::sentinel::{SentinelClient, SentinelServerType};
use redis::{Client, ConnectionInfo, IntoConnectionInfo};

/// The answer to a `rediss://` URL in a build without TLS: redis-rs's own error names its features, not ours.
#[cfg(not(feature = "tls"))]
const TLS_FEATURE_OFF: &str = "a `rediss://` URL needs TLS, which this build leaves out: enable the `tls` feature of \
                               axum-idem (`cargo add axum-idem --features tls`, or `tls-webpki-roots` for root \
                               certificates compiled in)";

/// Parses a URL (or takes a ready [`ConnectionInfo`]), naming the `tls` feature when a `rediss://` URL needs it.
pub(super) fn connection_info(url: impl IntoConnectionInfo) -> Result<ConnectionInfo, StoreError> {
    url.into_connection_info().map_err(|error| {
        // redis-rs refuses the scheme itself when built without TLS; no other parse error mentions TLS.
        #[cfg(not(feature = "tls"))]
        if error.kind() == redis::ErrorKind::InvalidClientConfig && error.to_string().contains("TLS") {
            return StoreError::InvalidConfig(format!("redis: {TLS_FEATURE_OFF}").into());
        }
        invalid_config(error)
    })
}

#[cfg(feature = "tls")]
fn is_tls(info: &ConnectionInfo) -> bool {
    matches!(info.addr(), redis::ConnectionAddr::TcpTls { .. })
}

/// The certificates set on a builder: roots to trust instead of the default ones, and a client certificate.
#[derive(Debug, Clone, Default)]
pub(super) struct TlsSettings {
    #[cfg(feature = "tls")]
    certificates: Option<redis::TlsCertificates>,
}

#[cfg(feature = "tls")]
impl TlsSettings {
    fn certificates(&mut self) -> &mut redis::TlsCertificates {
        self.certificates.get_or_insert(redis::TlsCertificates { client_tls: None, root_cert: None })
    }

    pub(super) fn set_root_certificates(&mut self, pem: Vec<u8>) {
        self.certificates().root_cert = Some(pem);
    }

    pub(super) fn set_client_certificate(&mut self, certificate: Vec<u8>, key: Vec<u8>) {
        self.certificates().client_tls = Some(redis::ClientTlsConfig { client_cert: certificate, client_key: key });
    }
}

impl TlsSettings {
    /// A client for one node. With certificates set, the URL must be `rediss://` (redis-rs says so otherwise).
    pub(super) fn node_client(&self, info: ConnectionInfo) -> Result<Client, StoreError> {
        install_crypto_provider();
        #[cfg(feature = "tls")]
        if let Some(certificates) = &self.certificates {
            return Client::build_with_tls(info, certificates.clone()).map_err(invalid_config);
        }
        Client::open(info).map_err(invalid_config)
    }

    /// A Cluster builder over `nodes`: TLS when the nodes' URLs are `rediss://` or certificates are set.
    pub(super) fn cluster_builder(&self, nodes: Vec<ConnectionInfo>) -> ClusterClientBuilder {
        let builder = ClusterClientBuilder::new(nodes);
        #[cfg(feature = "tls")]
        if let Some(certificates) = &self.certificates {
            return builder.certs(certificates.clone());
        }
        builder
    }

    /// A Sentinel client for the primary of `service`.
    ///
    /// With TLS (a `rediss://` Sentinel URL, or certificates set), the primary the Sentinels name is reached over
    /// TLS too, trusting the same roots: a deployment that encrypts its Sentinels encrypts its data nodes.
    pub(super) fn sentinel_client(
        &self,
        sentinels: Vec<ConnectionInfo>,
        service: &str,
    ) -> Result<SentinelClient, StoreError> {
        install_crypto_provider();
        #[cfg(feature = "tls")]
        if self.certificates.is_some() || sentinels.iter().any(is_tls) {
            return self.tls_sentinel_client(sentinels, service);
        }
        // A `String`: redis-rs without TLS takes one (with TLS, `impl AsRef<str>`, which makes the copy needless).
        #[cfg_attr(feature = "tls", allow(clippy::unnecessary_to_owned))]
        let service = service.to_owned();
        SentinelClient::build(sentinels, service, None, SentinelServerType::Master).map_err(invalid_config)
    }

    #[cfg(feature = "tls")]
    fn tls_sentinel_client(&self, sentinels: Vec<ConnectionInfo>, service: &str) -> Result<SentinelClient, StoreError> {
        use redis::TlsMode;
        use redis::sentinel::SentinelClientBuilder;
        // The builder takes bare addresses: the Sentinels' credentials come from the first URL, as redis-rs's
        // `SentinelClient::build` would send each URL's own.
        let credentials = sentinels.first().map(|info| info.redis_settings().clone()).unwrap_or_default();
        let sentinels_use_tls = sentinels.iter().any(is_tls);
        let addresses = sentinels.iter().map(|info| info.addr().clone());
        let mut builder = SentinelClientBuilder::new(addresses, service, SentinelServerType::Master)
            .map_err(invalid_config)?
            .set_client_to_redis_tls_mode(TlsMode::Secure);
        if let Some(username) = credentials.username() {
            builder = builder.set_client_to_sentinel_username(username);
        }
        if let Some(password) = credentials.password() {
            builder = builder.set_client_to_sentinel_password(password);
        }
        if let Some(certificates) = &self.certificates {
            builder = builder.set_client_to_redis_certificates(certificates.clone());
            if sentinels_use_tls {
                builder = builder.set_client_to_sentinel_certificates(certificates.clone());
            }
        }
        builder.build().map_err(invalid_config)
    }
}

/// Makes sure rustls has a crypto provider before a connection needs one: redis-rs builds its TLS configuration
/// with the process-wide default, which rustls picks by itself only when exactly one provider is compiled in (an
/// app that also pulls in `aws-lc-rs` would otherwise panic at the first `rediss://` connection). An app that
/// installed its own provider first keeps it.
pub(super) fn install_crypto_provider() {
    #[cfg(feature = "tls")]
    if rustls::crypto::CryptoProvider::get_default().is_none() {
        // Losing a race with another thread installing one is fine: any installed provider will do.
        let _ = rustls::crypto::ring::default_provider().install_default();
    }
}
