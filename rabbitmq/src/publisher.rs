//! [`ConfirmingPublisher`]: a message counts as published only when the broker confirms it and did not
//! return it.
//!
//! Every publish sets `mandatory`, so a message no queue is bound for comes back instead of vanishing. The
//! broker confirms a returned message too: only an `Ack` with nothing returned is success. A confirm can hang
//! when the socket dies, so each batch has a deadline, and a timeout means "unknown": the caller publishes
//! again later and consumers deduplicate.

use std::collections::HashMap;
use std::time::Duration;

use choreo_messages::EncodedEnvelope;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::message::BasicReturnMessage;
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::Mutex;

use crate::codec::{properties_for, short};
use crate::connection::{BrokerPool, open_channel};
use crate::{BrokerError, PublishError};

/// The longest a batch may take, in confirm timeouts, however steadily its confirms come.
const BATCH_TIMEOUTS: u32 = 3;

/// One message to publish.
#[derive(Debug, Clone)]
pub struct Outgoing<'a> {
    pub exchange: &'a str,
    pub routing_key: &'a str,
    pub properties: BasicProperties,
    pub body: &'a [u8],
    /// For error messages and logs.
    pub message_id: String,
}

impl<'a> Outgoing<'a> {
    /// An envelope of the contract, routed by its type.
    pub fn envelope(exchange: &'a str, envelope: &'a EncodedEnvelope) -> Self {
        Outgoing {
            exchange,
            routing_key: &envelope.meta.message_type,
            properties: properties_for(&envelope.meta),
            body: &envelope.body,
            message_id: envelope.meta.message_id.to_string(),
        }
    }
}

/// Publishes with confirms on one long-lived channel, reopened after any failure.
pub struct ConfirmingPublisher {
    pool: BrokerPool,
    channel: Mutex<Option<Channel>>,
    /// One batch at a time on the channel, so returns can be told apart.
    turn: Mutex<()>,
    confirm_timeout: Duration,
}

impl ConfirmingPublisher {
    pub fn new(pool: BrokerPool, confirm_timeout: Duration) -> Self {
        ConfirmingPublisher { pool, channel: Mutex::new(None), turn: Mutex::new(()), confirm_timeout }
    }

    async fn channel(&self) -> Result<Channel, BrokerError> {
        let mut slot = self.channel.lock().await;
        if let Some(channel) = slot.as_ref().filter(|c| c.status().connected()) {
            return Ok(channel.clone());
        }
        let channel = open_channel(&self.pool).await?;
        channel
            .confirm_select(ConfirmSelectOptions::default())
            .await
            .map_err(BrokerError::amqp("confirm.select"))?;
        *slot = Some(channel.clone());
        Ok(channel)
    }

    /// Drop the channel so the next publish opens a fresh one.
    async fn discard(&self, channel: &Channel) {
        let mut slot = self.channel.lock().await;
        if slot.as_ref().is_some_and(|c| c.id() == channel.id()) {
            *slot = None;
        }
    }

    /// Publish one message and wait for its confirm.
    pub async fn publish(&self, message: Outgoing<'_>) -> Result<(), PublishError> {
        let mut results = self.publish_batch(std::slice::from_ref(&message)).await;
        results.pop().unwrap_or(Ok(()))
    }

    /// Publish a batch pipelined (all frames first, then all confirms), one result per message, in order.
    ///
    /// Batches are serialised on the channel, and a returned message is matched to its publish by message
    /// id rather than by which confirm it arrived with: lapin hands returns to whichever confirm resolves
    /// next, which under pipelining can be another message's.
    ///
    /// The batch gives up after `confirm_timeout` without progress (each write and each confirm push the
    /// deadline on), and after `BATCH_TIMEOUTS` timeouts in all however it progresses; once the deadline
    /// passes, everything still outstanding fails at once. A broker that stops answering fails the batch
    /// after one timeout, not one per message, and one that trickles cannot hold it for long: the relay
    /// holds its rows' locks and handlers wait behind it to dead-letter. A large batch to a slow but working
    /// broker is not cut short.
    pub async fn publish_batch(&self, messages: &[Outgoing<'_>]) -> Vec<Result<(), PublishError>> {
        let _turn = self.turn.lock().await;
        let timeout = self.confirm_timeout;
        let started = tokio::time::Instant::now();
        let last_chance = started + timeout * BATCH_TIMEOUTS;
        let next_deadline = || (tokio::time::Instant::now() + timeout).min(last_chance);
        let mut deadline = started + timeout;
        let channel = match tokio::time::timeout_at(deadline, self.channel()).await {
            Ok(Ok(channel)) => channel,
            failed => {
                let text = match failed {
                    Ok(Err(e)) => e.to_string(),
                    _ => format!("no channel to the broker within {} ms", timeout.as_millis()),
                };
                return messages.iter().map(|_| Err(BrokerError::Pool(text.clone()).into())).collect();
            }
        };
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let options = BasicPublishOptions { mandatory: true, immediate: false };
            let publish = channel.basic_publish(
                short(message.exchange),
                short(message.routing_key),
                options,
                message.body,
                message.properties.clone(),
            );
            let sent = match tokio::time::timeout_at(deadline, publish).await {
                Ok(sent) => {
                    deadline = next_deadline();
                    sent.map_err(|e| PublishError::from(BrokerError::amqp("basic.publish")(e)))
                }
                Err(_) => Err(PublishError::ConfirmTimeout { message_id: message.message_id.clone(), timeout_ms: timeout.as_millis() }),
            };
            pending.push(sent);
        }
        let mut returned: HashMap<String, String> = HashMap::new();
        let mut results = Vec::with_capacity(messages.len());
        for (sent, message) in pending.into_iter().zip(messages) {
            let result = match sent {
                Err(e) => Err(e),
                Ok(confirm) => match tokio::time::timeout_at(deadline, confirm).await.inspect(|_| {
                    deadline = next_deadline();
                }) {
                    Err(_) => Err(PublishError::ConfirmTimeout {
                        message_id: message.message_id.clone(),
                        timeout_ms: timeout.as_millis(),
                    }),
                    Ok(Err(e)) => Err(BrokerError::Amqp { operation: "publisher confirm", source: e }.into()),
                    Ok(Ok(Confirmation::Ack(r))) => {
                        note_returned(&mut returned, r);
                        Ok(())
                    }
                    Ok(Ok(Confirmation::Nack(r))) => {
                        note_returned(&mut returned, r);
                        Err(PublishError::Nacked { message_id: message.message_id.clone() })
                    }
                    Ok(Ok(Confirmation::NotRequested)) => {
                        Err(PublishError::Nacked { message_id: message.message_id.clone() })
                    }
                },
            };
            results.push(result);
        }
        let broken = results
            .iter()
            .any(|r| matches!(r, Err(PublishError::Broker(_) | PublishError::ConfirmTimeout { .. })));
        if broken {
            self.discard(&channel).await;
        } else {
            // Returns not handed to any confirm of this batch.
            if let Ok(Ok(rest)) = tokio::time::timeout_at(deadline, channel.wait_for_confirms()).await {
                for r in rest {
                    note_returned(&mut returned, Some(r));
                }
            }
        }
        for (result, message) in results.iter_mut().zip(messages) {
            if result.is_ok()
                && let Some(reply) = returned.get(&message.message_id)
            {
                *result = Err(PublishError::Unroutable {
                    message_id: message.message_id.clone(),
                    exchange: message.exchange.to_owned(),
                    routing_key: message.routing_key.to_owned(),
                    reply: reply.clone(),
                });
            }
        }
        results
    }
}

fn note_returned(returned: &mut HashMap<String, String>, message: Option<BasicReturnMessage>) {
    if let Some(m) = message {
        let id = m.delivery.properties.message_id().as_ref().map(|i| i.to_string()).unwrap_or_default();
        returned.insert(id, format!("{} {}", m.reply_code, m.reply_text));
    }
}
