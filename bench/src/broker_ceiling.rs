//! The broker's ceiling: persistent messages through a quorum queue, with publisher confirms and consumer
//! acks, using lapin like the workers do (pipelined confirms, bounded prefetch).

use std::time::{Duration, Instant};

use anyhow::Context;
use choreo_rabbitmq::lapin::BasicProperties;
use choreo_rabbitmq::lapin::options::{
    BasicAckOptions, BasicConsumeOptions, BasicQosOptions, QueueDeclareOptions, QueueDeleteOptions,
};
use choreo_rabbitmq::lapin::types::{AMQPValue, FieldTable, LongString};
use choreo_rabbitmq::publisher::Outgoing;
use choreo_rabbitmq::{ConfirmingPublisher, connect_pool};
use futures_util::StreamExt;
use serde::Serialize;

#[derive(Debug, Clone, Serialize)]
pub struct BrokerCeiling {
    pub messages: usize,
    pub seconds: f64,
    pub messages_per_second: f64,
}

pub async fn measure(amqp_url: &str, messages: usize) -> anyhow::Result<BrokerCeiling> {
    let pool = connect_pool(amqp_url, "choreo-bench", 4)?;
    let queue = format!("bench.ceiling.{}", uuid::Uuid::new_v4().simple());
    let channel = choreo_rabbitmq::connection::open_channel(&pool).await?;
    let mut args = FieldTable::default();
    args.insert("x-queue-type".into(), AMQPValue::LongString(LongString::from("quorum")));
    channel
        .queue_declare(queue.as_str().into(), QueueDeclareOptions { durable: true, ..Default::default() }, args)
        .await
        .context("declaring the ceiling queue")?;

    // Consumers: like a worker, prefetch 64 and ack each message.
    let consumers = 2;
    let mut consuming = Vec::new();
    for _ in 0..consumers {
        let ch = choreo_rabbitmq::connection::open_channel(&pool).await?;
        ch.basic_qos(64, BasicQosOptions::default()).await?;
        let mut consumer = ch
            .basic_consume(queue.as_str().into(), "".into(), BasicConsumeOptions::default(), FieldTable::default())
            .await?;
        let share = messages / consumers;
        consuming.push(tokio::spawn(async move {
            let _keep = ch;
            let mut n = 0usize;
            while n < share {
                match consumer.next().await {
                    Some(Ok(d)) => {
                        d.acker.ack(BasicAckOptions::default()).await?;
                        n += 1;
                    }
                    Some(Err(e)) => return Err(anyhow::Error::from(e)),
                    None => break,
                }
            }
            Ok::<usize, anyhow::Error>(n)
        }));
    }

    let body = vec![b'x'; 300];
    let started = Instant::now();
    let publishers = 2;
    let mut publishing = Vec::new();
    for _ in 0..publishers {
        let publisher = ConfirmingPublisher::new(pool.clone(), Duration::from_secs(30));
        let queue = queue.clone();
        let body = body.clone();
        let share = messages / publishers;
        publishing.push(tokio::spawn(async move {
            let properties = BasicProperties::default().with_delivery_mode(2);
            let mut sent = 0;
            while sent < share {
                let n = (share - sent).min(256);
                let batch: Vec<Outgoing<'_>> = (0..n)
                    .map(|_| Outgoing {
                        exchange: "",
                        routing_key: &queue,
                        properties: properties.clone(),
                        body: &body,
                        message_id: String::new(),
                    })
                    .collect();
                for r in publisher.publish_batch(&batch).await {
                    r?;
                }
                sent += n;
            }
            Ok::<(), anyhow::Error>(())
        }));
    }
    for p in publishing {
        p.await??;
    }
    let mut consumed = 0;
    for c in consuming {
        consumed += c.await??;
    }
    let seconds = started.elapsed().as_secs_f64();
    let _ = channel.queue_delete(queue.as_str().into(), QueueDeleteOptions::default()).await;
    Ok(BrokerCeiling { messages: consumed, seconds, messages_per_second: consumed as f64 / seconds })
}
