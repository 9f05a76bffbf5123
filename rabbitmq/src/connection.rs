//! One pool of broker connections per process.
//!
//! The pool hands out connections, not channels. Long-lived users (a consumer, the relay's publisher) hold a
//! channel on a pooled connection and, when it breaks, drop it and take a fresh one: the pool discards a
//! connection that is no longer connected.

use deadpool_lapin::{Config, Runtime};
use lapin::ConnectionProperties;

use crate::BrokerError;

pub type BrokerPool = deadpool_lapin::Pool;

/// A pool of at most `max_size` connections to `url`, named `connection_name` in the broker's UI.
pub fn connect_pool(url: &str, connection_name: &str, max_size: usize) -> Result<BrokerPool, BrokerError> {
    let mut config = Config { url: Some(url.to_owned()), ..Config::default() };
    config.pool = Some(deadpool_lapin::PoolConfig::new(max_size));
    let name = connection_name.to_owned();
    config
        .create_pool(move || ConnectionProperties::default().with_connection_name(name.clone().into()), Runtime::Tokio1)
        .map_err(|e| BrokerError::Pool(e.to_string()))
}

/// Open a channel on a pooled connection.
pub async fn open_channel(pool: &BrokerPool) -> Result<lapin::Channel, BrokerError> {
    let connection = pool.get().await.map_err(|e| BrokerError::Pool(redact(&e.to_string())))?;
    connection.create_channel().await.map_err(BrokerError::amqp("channel.open"))
}

/// Strip a password out of any URL that an error message might echo.
pub fn redact(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut rest = text;
    while let Some(scheme_end) = rest.find("://") {
        let (head, tail) = rest.split_at(scheme_end + 3);
        out.push_str(head);
        let authority_end = tail.find(['/', ' ', '"', '\'']).unwrap_or(tail.len());
        match tail[..authority_end].rfind('@') {
            Some(at) => {
                let userinfo = &tail[..at];
                let user = userinfo.split(':').next().unwrap_or("");
                out.push_str(user);
                out.push_str(":***");
                rest = &tail[at..];
            }
            None => rest = tail,
        }
    }
    out.push_str(rest);
    out
}

#[cfg(test)]
mod tests {
    use super::redact;

    #[test]
    fn passwords_never_reach_messages() {
        assert_eq!(
            redact("failed amqp://guest:secret@127.0.0.1:5672/%2f now"),
            "failed amqp://guest:***@127.0.0.1:5672/%2f now"
        );
        assert_eq!(redact("postgres://u:p@h/db"), "postgres://u:***@h/db");
        assert_eq!(redact("no url here"), "no url here");
        assert_eq!(redact("amqp://host:5672/"), "amqp://host:5672/");
    }
}
