//! [`ConfirmingPublisher`]: a message counts as published only when the broker confirms it and did not
//! return it.
//!
//! Every publish sets `mandatory`, so a message no queue is bound for comes back instead of vanishing. The
//! broker confirms a returned message too: only an `Ack` with nothing returned is success. A confirm can hang
//! when the socket dies, so each wait has a deadline, and a timeout means "unknown": the caller publishes
//! again later and consumers deduplicate.

use std::time::Duration;

use choreo_messages::EncodedEnvelope;
use futures_util::future::join_all;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation};
use tokio::sync::Mutex;

use crate::codec::{properties_for, short};
use crate::connection::{BrokerPool, open_channel};
use crate::{BrokerError, PublishError};

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
    confirm_timeout: Duration,
}

impl ConfirmingPublisher {
    pub fn new(pool: BrokerPool, confirm_timeout: Duration) -> Self {
        ConfirmingPublisher { pool, channel: Mutex::new(None), confirm_timeout }
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
    pub async fn publish_batch(&self, messages: &[Outgoing<'_>]) -> Vec<Result<(), PublishError>> {
        let channel = match self.channel().await {
            Ok(channel) => channel,
            Err(e) => {
                let text = e.to_string();
                return messages.iter().map(|_| Err(BrokerError::Pool(text.clone()).into())).collect();
            }
        };
        let mut pending = Vec::with_capacity(messages.len());
        for message in messages {
            let options = BasicPublishOptions { mandatory: true, immediate: false };
            let sent = channel
                .basic_publish(
                    short(message.exchange),
                    short(message.routing_key),
                    options,
                    message.body,
                    message.properties.clone(),
                )
                .await
                .map_err(BrokerError::amqp("basic.publish"));
            pending.push(sent);
        }
        let timeout = self.confirm_timeout;
        let results = join_all(pending.into_iter().zip(messages).map(|(sent, message)| async move {
            let confirm = sent?;
            match tokio::time::timeout(timeout, confirm).await {
                Err(_) => Err(PublishError::ConfirmTimeout {
                    message_id: message.message_id.clone(),
                    timeout_ms: timeout.as_millis(),
                }),
                Ok(Err(e)) => Err(BrokerError::Amqp { operation: "publisher confirm", source: e }.into()),
                Ok(Ok(Confirmation::Ack(None))) => Ok(()),
                Ok(Ok(Confirmation::Ack(Some(returned)) | Confirmation::Nack(Some(returned)))) => {
                    Err(PublishError::Unroutable {
                        message_id: message.message_id.clone(),
                        exchange: message.exchange.to_owned(),
                        routing_key: message.routing_key.to_owned(),
                        reply: format!("{} {}", returned.reply_code, returned.reply_text),
                    })
                }
                Ok(Ok(Confirmation::Nack(None) | Confirmation::NotRequested)) => {
                    Err(PublishError::Nacked { message_id: message.message_id.clone() })
                }
            }
        }))
        .await;
        let broken = results
            .iter()
            .any(|r| matches!(r, Err(PublishError::Broker(_) | PublishError::ConfirmTimeout { .. })));
        if broken {
            self.discard(&channel).await;
        }
        results
    }
}
