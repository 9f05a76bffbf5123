#!/usr/bin/env node
// Place one order: publish an `order.place` command to choreo, as docs/contract.md describes.
//
//   npm install amqplib
//   ORDER_ID=$(node place-order.mjs --customer cust-1 --sku sku-001 --quantity 2 --price-cents 1250)
//
// Prints only the order id on stdout. Exit codes: 0 confirmed and routed; 1 not accepted by the broker
// (unroutable, nacked, exchange missing, broker error); 2 bad arguments; 3 cannot connect.
// Publishing again with the same --order-id is safe: placing one order id twice creates one order.
import { randomUUID } from 'node:crypto';
import { parseArgs } from 'node:util';
import amqp from 'amqplib';

const MESSAGE_TYPE = 'order.place';
const PRODUCER = 'place-order.mjs';
const UUID_RE = /^[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}$/i;

function fail(message, code) {
  process.stderr.write(`place-order: ${message}\n`);
  process.exit(code);
}

let opts;
try {
  ({ values: opts } = parseArgs({
    options: {
      'amqp-url': { type: 'string', default: process.env.AMQP_URL || 'amqp://guest:guest@127.0.0.1:5672/%2f' },
      namespace: { type: 'string', default: process.env.CHOREO_NAMESPACE || 'choreo' },
      customer: { type: 'string' },
      sku: { type: 'string' },
      quantity: { type: 'string', default: '1' },
      'price-cents': { type: 'string', default: '1000' },
      currency: { type: 'string', default: 'EUR' },
      'order-id': { type: 'string' },
    },
  }));
} catch (e) {
  fail(e.message, 2);
}

// The rules of messages/src/payloads.rs, checked before publishing: a bad body would only be dead-lettered.
const idOk = (s) => s !== undefined && Buffer.byteLength(s) >= 1 && Buffer.byteLength(s) <= 128 && !/\p{Cc}/u.test(s);
const intIn = (s, lo, hi) => /^\d+$/.test(s) && Number(s) >= lo && Number(s) <= hi;
if (!idOk(opts.customer)) fail('--customer is required: 1 to 128 bytes, no control characters', 2);
if (!idOk(opts.sku)) fail('--sku is required: 1 to 128 bytes, no control characters', 2);
if (!intIn(opts.quantity, 1, 10000)) fail('--quantity must be an integer from 1 to 10000', 2);
if (!intIn(opts['price-cents'], 0, 100000000)) fail('--price-cents must be an integer from 0 to 100000000', 2);
if (!/^[A-Z]{3}$/.test(opts.currency)) fail('--currency must be three upper-case letters (ISO 4217)', 2);
if (opts['order-id'] !== undefined && !UUID_RE.test(opts['order-id'])) fail('--order-id must be a UUID', 2);

const orderId = (opts['order-id'] ?? randomUUID()).toLowerCase();
const exchange = `${opts.namespace}.events`;
const now = new Date();
const body = Buffer.from(JSON.stringify({
  order_id: orderId,
  customer_id: opts.customer,
  currency: opts.currency,
  lines: [{ sku: opts.sku, quantity: Number(opts.quantity), unit_price_cents: Number(opts['price-cents']) }],
}));
const properties = {
  mandatory: true,
  messageId: randomUUID(),
  correlationId: orderId, // the workflow id; choreoctl uses the order id too
  type: MESSAGE_TYPE,
  contentType: 'application/json',
  timestamp: Math.floor(now.getTime() / 1000),
  deliveryMode: 2,
  appId: PRODUCER,
  headers: {
    'schema-version': 1,
    producer: PRODUCER,
    'occurred-at': now.toISOString(),
  },
};

let conn;
try {
  conn = await amqp.connect(opts['amqp-url']);
} catch (e) {
  fail(`cannot connect to the broker: ${e.message}`, 3);
}
conn.on('error', () => {}); // failures surface as rejected promises below
try {
  const ch = await conn.createConfirmChannel();
  ch.on('error', () => {});
  try {
    await ch.checkExchange(exchange);
  } catch (e) {
    fail(`exchange \`${exchange}\` does not exist: is the namespace \`${opts.namespace}\` right, `
      + `and has a worker (order-worker) started once? (${e.message})`, 1);
  }
  let returned = false;
  ch.on('return', () => { returned = true; }); // the broker sends basic.return before the confirm
  await new Promise((resolve, reject) => {
    ch.publish(exchange, MESSAGE_TYPE, body, properties, (err) => (err ? reject(new Error('nacked by the broker')) : resolve()));
  });
  if (returned) {
    fail(`order ${orderId} was returned unroutable: no queue is bound to \`${MESSAGE_TYPE}\` on \`${exchange}\`; `
      + 'start order-worker once so that it declares its queue, then retry', 1);
  }
  await ch.close();
} catch (e) {
  fail(`publishing order ${orderId} failed: ${e.message}; retry with --order-id ${orderId}`, 1);
}
await conn.close().catch(() => {});
process.stdout.write(`${orderId}\n`);
