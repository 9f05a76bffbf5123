//! Reading a dead-letter queue without taking anything off it.
//!
//! RabbitMQ has no "peek". We consume the messages without acknowledging them, then give them back:
//! the broker returns every unacknowledged message to the queue, in the order they were delivered, which is
//! their order in the queue (we return them one by one, in order). What it costs: each message travels to us and back; while we hold them, other
//! consumers of the queue (normally none for a dead-letter queue) do not see them; a quorum queue puts
//! returned messages at its back, so every command holds the whole queue and gives all of it back in order,
//! even to show only its head (at most 65,535 messages, the largest AMQP prefetch; a longer queue is read in
//! part and its head moves to the back); the broker sets the
//! `redelivered` flag and, on quorum queues, counts one more delivery (`x-delivery-count`). Dead-letter
//! queues are declared with a delivery limit high enough that reading never drops a message.

use std::time::Duration;

use anyhow::Context;
use choreo_rabbitmq::BrokerPool;
use choreo_rabbitmq::connection::open_channel;
use choreo_rabbitmq::lapin::Channel;
use choreo_rabbitmq::lapin::message::Delivery;
use choreo_rabbitmq::lapin::options::{
    BasicCancelOptions, BasicConsumeOptions, BasicNackOptions, BasicQosOptions, QueueDeclareOptions,
};
use choreo_rabbitmq::lapin::types::FieldTable;
use futures_util::StreamExt;

use super::filter::Filter;
use super::letter::{Story, story};

/// Most messages held at once (the AMQP prefetch is a 16-bit number).
pub const MAX_BROWSE: usize = 65_535;
/// A pause in deliveries after which the queue is looked at again.
const IDLE: Duration = Duration::from_secs(3);
/// Longest a read of the queue goes on while messages are still ready for it.
const READ_DEADLINE: Duration = Duration::from_secs(120);
/// Longest a command waits, after giving messages back, for the broker to count them as ready again.
const SETTLE_DEADLINE: Duration = Duration::from_secs(15);
/// How often the queue is looked at while waiting for given-back messages to be ready again.
const SETTLE_POLL: Duration = Duration::from_millis(20);

/// Messages of a queue held unacknowledged on one channel.
pub struct Browse {
    pub channel: Channel,
    queue: String,
    /// Our consumer; cancelled before anything is given back, or the broker would hand the first returned
    /// message straight back to it and the order would change.
    consumer_tag: Option<String>,
    pub deliveries: Vec<Delivery>,
    /// Messages in the queue when the browse started.
    pub queue_depth: u32,
}

/// How many messages wait in `queue`; a clear error when it does not exist.
pub async fn depth(pool: &BrokerPool, queue: &str) -> anyhow::Result<u32> {
    let channel = open_channel(pool).await?;
    let ready = ready_on(&channel, queue).await;
    let _ = channel.close(200, "ok".into()).await;
    ready
}

/// Messages ready in `queue`, asked on `channel` (a failed passive declare closes the channel).
async fn ready_on(channel: &Channel, queue: &str) -> anyhow::Result<u32> {
    let options = QueueDeclareOptions { passive: true, ..QueueDeclareOptions::default() };
    let q = channel
        .queue_declare(queue.into(), options, FieldTable::default())
        .await
        .with_context(|| format!("queue `{queue}` does not exist (check the name and CHOREO_NAMESPACE)"))?;
    Ok(q.message_count())
}

/// Hold up to `limit` messages of `queue` (all of them by default).
pub async fn browse(pool: &BrokerPool, queue: &str, limit: Option<usize>) -> anyhow::Result<Browse> {
    let queue_depth = depth(pool, queue).await?;
    let wanted = (queue_depth as usize).min(limit.unwrap_or(MAX_BROWSE)).min(MAX_BROWSE);
    let channel = open_channel(pool).await?;
    if wanted == 0 {
        return Ok(Browse {
            channel,
            queue: queue.to_owned(),
            consumer_tag: None,
            deliveries: Vec::new(),
            queue_depth,
        });
    }
    channel.basic_qos(wanted as u16, BasicQosOptions::default()).await.context("basic.qos")?;
    let mut consumer = channel
        .basic_consume(queue.into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
        .await
        .with_context(|| format!("reading `{queue}`"))?;
    let mut deliveries = Vec::with_capacity(wanted);
    let deadline = tokio::time::Instant::now() + READ_DEADLINE;
    while deliveries.len() < wanted {
        match tokio::time::timeout(IDLE, consumer.next()).await {
            Ok(Some(Ok(delivery))) => deliveries.push(delivery),
            Ok(Some(Err(e))) => return Err(e).context("reading the queue"),
            Ok(None) => break,
            // Nothing for a while. Fewer messages than counted is normal when another reader took some: stop
            // when the queue has none ready left for us. A busy broker can pause longer than `IDLE`: while
            // messages are still ready, keep reading (until the deadline).
            Err(_) => {
                let ready = depth(pool, queue).await?;
                if ready == 0 || tokio::time::Instant::now() >= deadline {
                    if ready > 0 {
                        eprintln!(
                            "warning: read {} of {wanted} messages of `{queue}` in {} s while {ready} are still \
                             ready; the rest is left in the queue (run the command again)",
                            deliveries.len(),
                            READ_DEADLINE.as_secs()
                        );
                    }
                    break;
                }
            }
        }
    }
    let consumer_tag = Some(consumer.tag().to_string());
    Ok(Browse { channel, queue: queue.to_owned(), consumer_tag, deliveries, queue_depth })
}

impl Browse {
    /// The held messages `filter` selects, each with its story, in queue order.
    pub fn select(&self, filter: &Filter) -> Vec<(&Delivery, Story)> {
        self.deliveries.iter().map(|d| (d, story(d))).filter(|(_, s)| filter.matches(s)).collect()
    }

    /// Give back every message not acknowledged, one by one in queue order: returned messages go back to
    /// the head of the queue in the order they are returned (closing the channel would return them in no
    /// particular order). Acknowledged messages are skipped (lapin does not send a second settlement).
    ///
    /// Then wait until the broker counts them as ready again. A returned message is not ready the moment
    /// the return is sent: a quorum queue first writes the return to its log. Without this wait, a command
    /// run right after this one (`dlq show`, then `dlq export --all`) could count fewer messages than the
    /// queue holds and read only those.
    pub async fn release(self) {
        if let Some(tag) = &self.consumer_tag {
            let _ = self.channel.basic_cancel(tag.as_str().into(), BasicCancelOptions::default()).await;
        }
        // Ready before anything is given back: messages that arrived while we held ours.
        let ready_before =
            if self.deliveries.is_empty() { None } else { ready_on(&self.channel, &self.queue).await.ok() };
        let requeue = BasicNackOptions { multiple: false, requeue: true };
        let mut returned = 0u32;
        for delivery in &self.deliveries {
            match delivery.acker.nack(requeue).await {
                Ok(true) => returned += 1,
                // Settled already (acknowledged by the command), or the channel is closed: the broker
                // returns whatever a closed channel held by itself.
                Ok(false) => {}
                // The channel died while this nack was under way.
                Err(_) => break,
            }
        }
        if let (Some(before), true) = (ready_before, returned > 0) {
            self.wait_ready(before.saturating_add(returned), returned).await;
        }
        let _ = self.channel.close(200, "browse done".into()).await;
    }

    /// Poll until at least `expected` messages are ready, or say on stderr that the broker has not caught up.
    async fn wait_ready(&self, expected: u32, returned: u32) {
        let deadline = tokio::time::Instant::now() + SETTLE_DEADLINE;
        loop {
            let ready = match ready_on(&self.channel, &self.queue).await {
                Ok(ready) => ready,
                // The channel or the queue is gone: nothing left to wait for here.
                Err(_) => return,
            };
            if ready >= expected {
                return;
            }
            if tokio::time::Instant::now() >= deadline {
                eprintln!(
                    "warning: gave back {returned} messages to `{}`, but after {} s the broker counts {ready} ready \
                     where {expected} were expected; the rest are still being returned (or another consumer took \
                     them). Check with `choreoctl dlq list` before the next command.",
                    self.queue,
                    SETTLE_DEADLINE.as_secs()
                );
                return;
            }
            tokio::time::sleep(SETTLE_POLL).await;
        }
    }
}
