//! The proxy's own settings, as plain values, validated. The agent composes them into its
//! configuration; every component reads the value it is given, never these defaults.
use std::time::Duration;

use serde::Serialize;

/// A proxy setting out of range, named by its flag.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ConfigError {
    #[error("{flag}: {reason}")]
    Setting { flag: &'static str, reason: String },
}

impl ConfigError {
    pub fn kind(&self) -> &'static str {
        match self {
            ConfigError::Setting { .. } => "flag",
        }
    }
}

/// Default time a connection may carry nothing before the proxy closes it.
pub const DEFAULT_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);
/// Default time open connections get to finish on shutdown.
pub const DEFAULT_DRAIN_GRACE: Duration = Duration::from_secs(30);

fn as_text<S: serde::Serializer>(d: &Duration, s: S) -> Result<S::Ok, S::Error> {
    s.collect_str(&humantime::format_duration(*d))
}

/// How a connection between two pods of this agent is carried.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, clap::ValueEnum)]
#[serde(rename_all = "kebab-case")]
pub enum SameNode {
    /// Inside the agent: admitted by the destination's policy with the caller's configured
    /// identity, then copied between the two pods' sockets, without TLS or HTTP/2.
    #[default]
    InProcess,
    /// In an HBONE tunnel (mutual TLS), as between nodes.
    Hbone,
}

/// The proxy's connection handling.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct ProxyConfig {
    /// A connection that carries no byte either way for this long is closed.
    #[serde(serialize_with = "as_text")]
    pub idle_timeout: Duration,
    /// On SIGTERM, how long open connections get to finish before they are cut.
    #[serde(serialize_with = "as_text")]
    pub drain_grace: Duration,
    /// How connections between two pods of this agent are carried.
    pub same_node: SameNode,
    /// On HTTP ports, one request in this many gets an access-log line.
    pub access_log_every: u64,
    /// On HTTP ports: path normalization, and what refused callers are told.
    pub http: crate::l7::HttpConfig,
    /// Threads of the proxy's own that serve the pods' connections, each connection on one
    /// ([`crate::serving`]); 0: the agent's runtime serves them.
    pub threads: usize,
    /// Send L7 requests to meshed pods of other nodes as streams of the pooled HBONE
    /// connection when their proxy takes them (`crate::hbone::requests`); off, each goes
    /// in a CONNECT tunnel.
    pub request_streams: bool,
}

impl Default for ProxyConfig {
    fn default() -> Self {
        ProxyConfig {
            idle_timeout: DEFAULT_IDLE_TIMEOUT,
            drain_grace: DEFAULT_DRAIN_GRACE,
            same_node: SameNode::InProcess,
            access_log_every: 1,
            http: crate::l7::HttpConfig::default(),
            threads: crate::serving::default_threads(),
            request_streams: true,
        }
    }
}

impl ProxyConfig {
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.idle_timeout.is_zero() {
            return Err(ConfigError::Setting {
                flag: "--idle-timeout",
                reason: "must be longer than 0s".into(),
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_zero_idle_timeout_is_refused_and_durations_serialize_as_text() {
        let zero = ProxyConfig {
            idle_timeout: Duration::ZERO,
            ..ProxyConfig::default()
        };
        let e = zero.validate().expect_err("a zero idle timeout is refused");
        assert_eq!(e.kind(), "flag");
        assert!(e.to_string().contains("--idle-timeout"), "{e}");
        let text = serde_json::to_string(&ProxyConfig::default()).expect("json");
        assert!(text.contains(r#""idle_timeout":"1h""#), "{text}");
        assert!(text.contains(r#""same_node":"in-process""#), "{text}");
    }
}
