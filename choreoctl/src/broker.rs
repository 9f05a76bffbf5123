//! Broker settings shared by the commands that talk to RabbitMQ.

use anyhow::Context;
use choreo_rabbitmq::{BrokerPool, Topology, connect_pool};

#[derive(Debug, Clone, clap::Args)]
pub struct BrokerArgs {
    /// AMQP URL of the broker.
    #[arg(long, env = "AMQP_URL", default_value = "amqp://guest:guest@127.0.0.1:5672/%2f", hide_env_values = true)]
    pub amqp_url: String,
    /// Prefix of exchange and queue names.
    #[arg(long, env = "CHOREO_NAMESPACE", default_value = "choreo")]
    pub namespace: String,
}

impl BrokerArgs {
    pub fn topology(&self) -> Topology {
        Topology::new(self.namespace.clone())
    }

    pub fn pool(&self) -> anyhow::Result<BrokerPool> {
        connect_pool(&self.amqp_url, "choreoctl", 2).context("broker connection (check AMQP_URL)")
    }
}
