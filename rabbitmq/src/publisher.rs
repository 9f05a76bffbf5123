//! [`ConfirmingPublisher`]: a message counts as published only when the broker confirms it and did not
//! return it.
//!
//! Every publish sets `mandatory`, so a message no queue is bound for comes back instead of vanishing. The
//! broker confirms a returned message too: only an `Ack` with nothing returned is success. A confirm can hang
//! when the socket dies, so each batch has a deadline, and a timeout means "unknown": the caller publishes
//! again later and consumers deduplicate.

use std::collections::HashMap;
use std::future::Future;
use std::pin::Pin;
use std::task::Poll;
use std::time::Duration;

use choreo_messages::EncodedEnvelope;
use futures_util::future::{MaybeDone, maybe_done};
use lapin::message::BasicReturnMessage;
use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::{BasicProperties, Channel, Confirmation, PublisherConfirm};
use tokio::sync::Mutex;

use crate::codec::{properties_for, short};
use crate::connection::{BrokerPool, open_channel};
use crate::{BrokerError, PublishError};

/// A `basic_publish` under way: done once lapin's I/O thread wrote its frames.
type Sending<'a> = Pin<Box<dyn Future<Output = lapin::Result<PublisherConfirm>> + Send + 'a>>;

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
        channel.confirm_select(ConfirmSelectOptions::default()).await.map_err(BrokerError::amqp("confirm.select"))?;
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
        // Every message is queued for lapin's I/O thread before any is waited for: lapin's `basic_publish`
        // resolves only once that thread wrote the frames, so awaiting each in turn costs one hand-off
        // between the threads per message, and the frames go out one write at a time. Each first poll
        // registers the message's confirm and queues its frames before the next message's does, so
        // confirms and frames keep the order of `messages`.
        let mut sends: Vec<MaybeDone<Sending<'_>>> = messages
            .iter()
            .map(|message| {
                let options = BasicPublishOptions { mandatory: true, immediate: false };
                let publish = channel.basic_publish(
                    short(message.exchange),
                    short(message.routing_key),
                    options,
                    message.body,
                    message.properties.clone(),
                );
                maybe_done(Box::pin(publish) as Sending<'_>)
            })
            .collect();
        written_in_order(&mut sends, &mut deadline, next_deadline).await;
        let pending: Vec<Result<PublisherConfirm, PublishError>> = sends
            .iter_mut()
            .zip(messages)
            .map(|(send, message)| match Pin::new(send).take_output() {
                Some(sent) => sent.map_err(|e| PublishError::from(BrokerError::amqp("basic.publish")(e))),
                None => Err(PublishError::ConfirmTimeout {
                    message_id: message.message_id.clone(),
                    timeout_ms: timeout.as_millis(),
                }),
            })
            .collect();
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
        let broken =
            results.iter().any(|r| matches!(r, Err(PublishError::Broker(_) | PublishError::ConfirmTimeout { .. })));
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

/// Drive every send until all are written or `deadline` passes without one completing. Each pass polls the
/// sends in order, so the first poll of each (which queues its frames) follows the previous one's.
async fn written_in_order<F: Future + Unpin>(
    sends: &mut [MaybeDone<F>],
    deadline: &mut tokio::time::Instant,
    next_deadline: impl Fn() -> tokio::time::Instant,
) {
    let expiry = tokio::time::sleep_until(*deadline);
    tokio::pin!(expiry);
    let mut written = 0;
    std::future::poll_fn(|cx| {
        let mut done = 0;
        for send in sends.iter_mut() {
            if Pin::new(send).poll(cx).is_ready() {
                done += 1;
            }
        }
        if done == sends.len() {
            return Poll::Ready(());
        }
        if done > written {
            written = done;
            *deadline = next_deadline();
            expiry.as_mut().reset(*deadline);
        }
        expiry.as_mut().poll(cx)
    })
    .await;
}

fn note_returned(returned: &mut HashMap<String, String>, message: Option<BasicReturnMessage>) {
    if let Some(m) = message {
        let id = m.delivery.properties.message_id().as_ref().map(|i| i.to_string()).unwrap_or_default();
        returned.insert(id, format!("{} {}", m.reply_code, m.reply_text));
    }
}
