//! [`AsyncApi`]: the AsyncAPI 3.0 document of one namespace, generated from what its participants declare,
//! so that the document a client or another team reads is what the workers do.

use std::collections::BTreeMap;
use std::collections::btree_map::Entry;

use choreo_messages::contract::{Contract, TypeSchema};
use choreo_messages::envelope::CONTENT_TYPE_JSON;
use choreo_messages::headers;
use choreo_rabbitmq::lapin::types::AMQPValue;
use choreo_rabbitmq::{Topology, WorkerQueue};
use serde::Serialize;
use serde_json::{Value, json};

use crate::plain::PlainHandler;
use crate::service::Service;

/// The AsyncAPI version of the documents written here.
const ASYNCAPI_VERSION: &str = "3.0.0";
/// The version of the AMQP bindings that AsyncAPI 3.0.0 defines.
const AMQP_BINDING_VERSION: &str = "0.3.0";
/// Key of the one server of the document.
const SERVER: &str = "broker";
/// Key of the correlation id every message shares.
const CORRELATION_ID: &str = "workflow";
/// AMQP `delivery_mode` of every publish: persistent.
const PERSISTENT: u8 = 2;

/// Builder of the AsyncAPI 3.0 document of one namespace: add each participant, then write it out.
///
/// - every message type is a channel of the topic exchange `{ns}.events` whose address is its routing key
///   (the type), and one message of `components.messages`: the type's JSON Schema as its payload, the
///   contract's headers, the workflow as its correlation id;
/// - every participant that consumes something has its quorum queue `{ns}.{participant}` as a channel;
/// - a participant *receives* each type it consumes from its queue and *sends* each type it emits to the
///   type's channel.
///
/// A type that one participant emits and others consume is one channel and one message; the emitter's schema
/// describes it (a consumer may read it with a struct of its own). Every participant that declares a type
/// must speak the same schema version of it, or the document is refused ([`AsyncApiError`]): the consumer
/// would dead-letter every such message as `unsupported_schema_version`.
///
/// ```
/// use choreo::schemars::JsonSchema;
/// use choreo::serde::{Deserialize, Serialize};
/// use choreo::{AsyncApi, Payload, contract};
///
/// /// Command `audit.request`.
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// #[serde(crate = "choreo::serde")]
/// #[schemars(crate = "choreo::schemars")]
/// struct AuditRequest { subject: String }
/// impl Payload for AuditRequest { const TYPE: &'static str = "audit.request"; }
///
/// /// Event `audit.done`.
/// #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
/// #[serde(crate = "choreo::serde")]
/// #[schemars(crate = "choreo::schemars")]
/// struct AuditDone { subject: String }
/// impl Payload for AuditDone { const TYPE: &'static str = "audit.done"; }
///
/// contract! { enum Audit { AuditRequest(AuditRequest), AuditDone(AuditDone) } }
///
/// let yaml = AsyncApi::new("acme")
///     .participant::<Audit>("audit", &["audit.request"], &["audit.done"], &["audit.done"])
///     .to_yaml()
///     .unwrap();
/// assert!(yaml.starts_with("asyncapi: 3.0.0\n"));
/// assert!(yaml.contains("audit.send.audit.done:"));
/// ```
#[derive(Debug, Clone)]
pub struct AsyncApi {
    topology: Topology,
    version: String,
    participants: Vec<Participant>,
}

/// What one participant declares, with the schemas of its contract.
#[derive(Debug, Clone)]
struct Participant {
    name: String,
    consumes: Vec<String>,
    emits: Vec<String>,
    outcomes: Vec<String>,
    schemas: Vec<TypeSchema>,
}

/// Why a document cannot be written: the participants' declarations contradict each other or themselves.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AsyncApiError {
    /// A participant consumes, emits or ends workflows with a type its contract does not hold.
    #[error("participant `{participant}` declares `{type_name}`, which its contract does not hold")]
    NotInContract {
        /// The participant.
        participant: String,
        /// The type.
        type_name: String,
    },
    /// A participant declares an outcome it does not emit.
    #[error("participant `{participant}` declares `{type_name}` as an outcome but does not emit it")]
    OutcomeNotEmitted {
        /// The participant.
        participant: String,
        /// The type.
        type_name: String,
    },
    /// Two participants declare one type at different schema versions.
    #[error("`{type_name}` is version {first_version} for `{first}` but version {second_version} for `{second}`")]
    VersionMismatch {
        /// The type.
        type_name: String,
        /// The first participant that declares it.
        first: String,
        /// Its version there.
        first_version: u32,
        /// A participant that declares another version.
        second: String,
        /// Its version there.
        second_version: u32,
    },
    /// Two participants have one name.
    #[error("two participants are named `{0}`")]
    DuplicateParticipant(String),
    /// One id would name two channels or two operations (a type named like a queue, say).
    #[error("the {kind} id `{id}` would name two things")]
    NameClash {
        /// `channel` or `operation`.
        kind: &'static str,
        /// The id.
        id: String,
    },
}

impl AsyncApi {
    /// A document of namespace `namespace` (the `CHOREO_NAMESPACE` of its workers), without participants.
    /// Its `info.version` is this crate's version until [`AsyncApi::version`] says otherwise.
    pub fn new(namespace: impl Into<String>) -> Self {
        AsyncApi {
            topology: Topology::new(namespace),
            version: env!("CARGO_PKG_VERSION").to_owned(),
            participants: Vec::new(),
        }
    }

    /// The document's `info.version`.
    pub fn version(mut self, version: impl Into<String>) -> Self {
        self.version = version.into();
        self
    }

    /// Adds participant `name` with contract `M`: the types it consumes (its queue's bindings), the types
    /// it emits, and those of them that end a workflow (routed to the outcomes feed).
    pub fn participant<M: Contract>(
        mut self,
        name: &str,
        consumes: &[&str],
        emits: &[&str],
        outcomes: &[&str],
    ) -> Self {
        let owned = |types: &[&str]| types.iter().map(|t| (*t).to_owned()).collect();
        self.participants.push(Participant {
            name: name.to_owned(),
            consumes: owned(consumes),
            emits: owned(emits),
            outcomes: owned(outcomes),
            schemas: M::schemas(),
        });
        self
    }

    /// Adds a [`Service`] by its declarations. It is taken to emit every type of its contract that it does
    /// not consume, which holds for a contract of exactly what the worker reads and writes; for one shared
    /// by several workers, say what it emits with [`AsyncApi::participant`].
    pub fn service<S: Service>(self) -> Self {
        let emits = emitted(S::Message::TYPES, S::CONSUMES);
        self.participant::<S::Message>(S::NAME, S::CONSUMES, &emits, S::OUTCOMES)
    }

    /// Adds a [`PlainHandler`] by its declarations; what it emits is inferred as for
    /// [`AsyncApi::service`].
    pub fn plain<H: PlainHandler>(self) -> Self {
        let emits = emitted(H::Message::TYPES, H::CONSUMES);
        self.participant::<H::Message>(H::NAME, H::CONSUMES, &emits, H::OUTCOMES)
    }

    /// The document as YAML, keys in a fixed order, so that a checked-in copy changes only when the
    /// namespace does.
    pub fn to_yaml(&self) -> Result<String, AsyncApiError> {
        let document = self.document()?;
        // Plain data with string keys always serialises.
        Ok(serde_yaml_ng::to_string(&document).unwrap_or_else(|e| unreachable!("a document is plain data: {e}")))
    }

    fn document(&self) -> Result<Document, AsyncApiError> {
        let uses = self.uses()?;
        let ns = self.topology.namespace();
        let mut document = Document {
            asyncapi: ASYNCAPI_VERSION,
            info: Info {
                title: format!("choreo: {ns}"),
                version: self.version.clone(),
                description: info_description(&self.topology),
            },
            default_content_type: CONTENT_TYPE_JSON,
            servers: BTreeMap::from([(SERVER, Server::broker())]),
            channels: BTreeMap::new(),
            operations: BTreeMap::new(),
            components: Components {
                messages: BTreeMap::new(),
                schemas: BTreeMap::new(),
                correlation_ids: BTreeMap::from([(CORRELATION_ID, CorrelationId::workflow())]),
            },
        };
        let mut schemas = BTreeMap::new();
        for (type_name, usage) in &uses {
            let (payload, defs) = payload_schema(type_name, &usage.schema.schema, &schemas);
            schemas.extend(defs);
            document.components.messages.insert(type_name.clone(), message(usage.schema.version, type_name, payload));
            let channel = Channel::routing_key(&self.topology, type_name, self.type_description(type_name, usage));
            insert_unique(&mut document.channels, "channel", type_name.clone(), channel)?;
        }
        for participant in &self.participants {
            if !participant.consumes.is_empty() {
                let queue = self.topology.worker_queue(&participant.name);
                let channel = Channel::queue(&self.topology, participant);
                insert_unique(&mut document.channels, "channel", queue.clone(), channel)?;
                for type_name in &participant.consumes {
                    let id = format!("{}.receive.{type_name}", participant.name);
                    let operation = Operation::new(Action::Receive, &queue, type_name, &participant.name);
                    insert_unique(&mut document.operations, "operation", id, operation)?;
                }
            }
            for type_name in &participant.emits {
                let id = format!("{}.send.{type_name}", participant.name);
                let operation = Operation::new(Action::Send, type_name, type_name, &participant.name);
                insert_unique(&mut document.operations, "operation", id, operation)?;
            }
        }
        document.components.schemas = schemas.into_iter().map(|(name, schema)| (name, ordered(schema))).collect();
        Ok(document)
    }

    /// Every type some participant consumes or emits, with who does what with it, after checking that the
    /// declarations hold together.
    fn uses(&self) -> Result<BTreeMap<String, TypeUse<'_>>, AsyncApiError> {
        let mut uses: BTreeMap<String, TypeUse<'_>> = BTreeMap::new();
        for (index, participant) in self.participants.iter().enumerate() {
            if self.participants[..index].iter().any(|p| p.name == participant.name) {
                return Err(AsyncApiError::DuplicateParticipant(participant.name.clone()));
            }
            if let Some(outcome) = participant.outcomes.iter().find(|o| !participant.emits.contains(o)) {
                return Err(AsyncApiError::OutcomeNotEmitted {
                    participant: participant.name.clone(),
                    type_name: outcome.clone(),
                });
            }
            let declared =
                participant.consumes.iter().map(|t| (t, false)).chain(participant.emits.iter().map(|t| (t, true)));
            for (type_name, emitted) in declared {
                let schema = participant.schemas.iter().find(|s| s.type_name == type_name).ok_or_else(|| {
                    AsyncApiError::NotInContract { participant: participant.name.clone(), type_name: type_name.clone() }
                })?;
                let usage = uses.entry(type_name.clone()).or_insert_with(|| TypeUse {
                    schema,
                    schema_from: &participant.name,
                    emitters: Vec::new(),
                    consumers: Vec::new(),
                    outcome_of: Vec::new(),
                });
                if usage.schema.version != schema.version {
                    return Err(AsyncApiError::VersionMismatch {
                        type_name: type_name.clone(),
                        first: usage.schema_from.to_owned(),
                        first_version: usage.schema.version,
                        second: participant.name.clone(),
                        second_version: schema.version,
                    });
                }
                if emitted {
                    // The emitter's schema is the contract; a consumer's is its reading of it.
                    if usage.emitters.is_empty() {
                        usage.schema = schema;
                        usage.schema_from = &participant.name;
                    }
                    usage.emitters.push(&participant.name);
                    if participant.outcomes.contains(type_name) {
                        usage.outcome_of.push(&participant.name);
                    }
                } else {
                    usage.consumers.push(&participant.name);
                }
            }
        }
        Ok(uses)
    }

    /// Who emits and who consumes a type, in words.
    fn type_description(&self, type_name: &str, usage: &TypeUse<'_>) -> String {
        let list = |names: &[&str]| names.iter().map(|n| format!("`{n}`")).collect::<Vec<_>>().join(", ");
        let mut text = if usage.emitters.is_empty() {
            format!("`{type_name}`: emitted by no participant of the namespace (published by clients).")
        } else {
            format!("`{type_name}`: emitted by {}.", list(&usage.emitters))
        };
        if !usage.consumers.is_empty() {
            let queues = usage.consumers.iter().map(|c| format!("`{}`", self.topology.worker_queue(c)));
            let queues = queues.collect::<Vec<_>>().join(", ");
            text.push_str(&format!(
                " Consumed by {} ({} {queues}).",
                list(&usage.consumers),
                if usage.consumers.len() == 1 { "queue" } else { "queues" }
            ));
        }
        if !usage.outcome_of.is_empty() {
            text.push_str(&format!(
                " Ends a workflow of {}: also routed to the bounded feed `{}` for downstream systems.",
                list(&usage.outcome_of),
                self.topology.outcomes_queue()
            ));
        }
        text
    }
}

/// Who does what with one type.
#[derive(Debug)]
struct TypeUse<'a> {
    /// The schema the document shows: the first emitter's, else the first consumer's.
    schema: &'a TypeSchema,
    /// Whose schema it is.
    schema_from: &'a str,
    emitters: Vec<&'a str>,
    consumers: Vec<&'a str>,
    /// The emitters that declare it as an outcome.
    outcome_of: Vec<&'a str>,
}

/// The types of a contract that a worker does not consume: what it emits, when its contract holds exactly
/// what it reads and writes.
fn emitted<'a>(types: &[&'a str], consumes: &[&str]) -> Vec<&'a str> {
    types.iter().copied().filter(|t| !consumes.contains(t)).collect()
}

fn insert_unique<V>(
    map: &mut BTreeMap<String, V>,
    kind: &'static str,
    id: String,
    value: V,
) -> Result<(), AsyncApiError> {
    match map.entry(id) {
        Entry::Vacant(entry) => {
            entry.insert(value);
            Ok(())
        }
        Entry::Occupied(entry) => Err(AsyncApiError::NameClash { kind, id: entry.key().clone() }),
    }
}

/// `text` as one token of a JSON pointer (RFC 6901).
fn pointer_token(text: &str) -> String {
    text.replace('~', "~0").replace('/', "~1")
}

fn info_description(topology: &Topology) -> String {
    format!(
        "Commands and events of the choreo namespace `{ns}`, generated from what its participants declare. \
         Every message is one JSON body published to the topic exchange `{exchange}` with the routing key equal \
         to its type, persistent (`delivery_mode` 2), with publisher confirms and the mandatory flag. AMQP \
         properties: `message_id` (a UUID, unique per message: consumers apply a message id once), `type` (the \
         type, equal to the routing key), `content_type` (`{CONTENT_TYPE_JSON}`), `correlation_id` (the \
         workflow) and `timestamp`; headers as each message says. Each participant consumes from its own quorum \
         queue `{ns}.<participant>`, bound to exactly the types it consumes; what breaks the contract ends in \
         its dead-letter queue `{ns}.<participant>.dlq`.",
        ns = topology.namespace(),
        exchange = topology.events_exchange(),
    )
}

/// A message of `components.messages`.
fn message(version: u32, type_name: &str, payload: Value) -> Message {
    let title = payload.get("title").and_then(Value::as_str).map(str::to_owned);
    Message {
        name: type_name.to_owned(),
        title,
        content_type: CONTENT_TYPE_JSON,
        correlation_id: Reference::to(&["components", "correlationIds", CORRELATION_ID]),
        headers: ordered(headers_schema(version)),
        payload: ordered(payload),
        bindings: MessageBindings {
            amqp: AmqpMessageBinding { message_type: type_name.to_owned(), binding_version: AMQP_BINDING_VERSION },
        },
    }
}

/// The contract's headers, with the schema version of this type.
fn headers_schema(version: u32) -> Value {
    json!({
        "type": "object",
        "required": [headers::SCHEMA_VERSION],
        "properties": {
            (headers::SCHEMA_VERSION): {
                "description": "Schema version of the body; any AMQP integer width.",
                "type": "integer",
                "const": version,
            },
            (headers::CAUSATION_ID): {
                "description": "`message_id` of the message that caused this one; absent on commands from clients.",
                "type": "string",
                "format": "uuid",
            },
            (headers::PRODUCER): {
                "description": "Name of the participant that produced the message (default: the `app_id` property).",
                "type": "string",
            },
            (headers::OCCURRED_AT): {
                "description": "RFC 3339 time at which the producer created the message (default: the `timestamp` property).",
                "type": "string",
                "format": "date-time",
            },
            (headers::TRACEPARENT): {
                "description": "W3C trace context of the producer, copied onto every event the message causes.",
                "type": "string",
            },
        },
    })
}

/// A type's JSON Schema as an AsyncAPI payload: AsyncAPI's Schema Object is a superset of JSON Schema draft
/// 07, and a reference in it points into the whole document, so the draft 2020-12 `$schema` goes, the `$id`
/// (a file name, which would rebase its references) goes, and the `$defs` move to `components.schemas`,
/// under their own name unless another schema took it with other content. Returns the payload and the
/// definitions to add.
fn payload_schema(
    type_name: &str,
    schema: &schemars::Schema,
    taken: &BTreeMap<String, Value>,
) -> (Value, BTreeMap<String, Value>) {
    let mut payload = schema.as_value().clone();
    let mut defs = BTreeMap::new();
    let Some(object) = payload.as_object_mut() else { return (payload, defs) };
    object.remove("$schema");
    object.remove("$id");
    let local = match object.remove("$defs") {
        Some(Value::Object(local)) => local,
        _ => serde_json::Map::new(),
    };
    let mut renamed = BTreeMap::new();
    for (name, def) in &local {
        let unique = match taken.get(name) {
            Some(existing) if existing != def => format!("{type_name}.{name}"),
            _ => name.clone(),
        };
        renamed.insert(name.clone(), unique);
    }
    for (name, mut def) in local {
        rewrite_refs(&mut def, &renamed);
        defs.insert(renamed[&name].clone(), def);
    }
    rewrite_refs(&mut payload, &renamed);
    (payload, defs)
}

/// A schema as written: schemars puts `title`, `description` and `type` first, where a reader looks.
fn ordered(value: Value) -> schemars::Schema {
    schemars::Schema::try_from(value).unwrap_or_else(|e| unreachable!("a schema is an object or a boolean: {e}"))
}

/// Points every `#/$defs/X` reference at `#/components/schemas/{renamed X}`.
fn rewrite_refs(value: &mut Value, renamed: &BTreeMap<String, String>) {
    match value {
        Value::Object(object) => {
            for (key, inner) in object.iter_mut() {
                if key == "$ref"
                    && let Value::String(target) = inner
                    && let Some(name) = target.strip_prefix("#/$defs/")
                    && let Some(new) = renamed.get(name)
                {
                    *target = format!("#/components/schemas/{}", pointer_token(new));
                } else {
                    rewrite_refs(inner, renamed);
                }
            }
        }
        Value::Array(items) => items.iter_mut().for_each(|item| rewrite_refs(item, renamed)),
        _ => {}
    }
}

/// The document; field order is the order written.
#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Document {
    asyncapi: &'static str,
    info: Info,
    default_content_type: &'static str,
    servers: BTreeMap<&'static str, Server>,
    channels: BTreeMap<String, Channel>,
    operations: BTreeMap<String, Operation>,
    components: Components,
}

#[derive(Debug, Serialize)]
struct Info {
    title: String,
    version: String,
    description: String,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Server {
    host: &'static str,
    protocol: &'static str,
    protocol_version: &'static str,
    description: &'static str,
    variables: BTreeMap<&'static str, ServerVariable>,
}

impl Server {
    fn broker() -> Self {
        Server {
            host: "{host}",
            protocol: "amqp",
            protocol_version: "0.9.1",
            description: "The RabbitMQ broker every participant of the namespace connects to (`AMQP_URL`).",
            variables: BTreeMap::from([(
                "host",
                ServerVariable { default: "localhost:5672", description: "Host and port of the broker." },
            )]),
        }
    }
}

#[derive(Debug, Serialize)]
struct ServerVariable {
    default: &'static str,
    description: &'static str,
}

#[derive(Debug, Serialize)]
struct Channel {
    address: String,
    description: String,
    messages: BTreeMap<String, Reference>,
    bindings: ChannelBindings,
}

impl Channel {
    /// The channel of one type: its routing key on the events exchange.
    fn routing_key(topology: &Topology, type_name: &str, description: String) -> Self {
        Channel {
            address: type_name.to_owned(),
            description,
            messages: BTreeMap::from([(type_name.to_owned(), message_ref(type_name))]),
            bindings: ChannelBindings {
                amqp: AmqpChannelBinding::RoutingKey {
                    exchange: Exchange {
                        name: topology.events_exchange(),
                        kind: "topic",
                        durable: true,
                        auto_delete: false,
                    },
                    binding_version: AMQP_BINDING_VERSION,
                },
            },
        }
    }

    /// The channel of a participant's queue: the types it consumes.
    fn queue(topology: &Topology, participant: &Participant) -> Self {
        let name = topology.worker_queue(&participant.name);
        let declared = WorkerQueue {
            worker: participant.name.clone(),
            routing_keys: participant.consumes.clone(),
            outcomes: participant.outcomes.clone(),
            delivery_limit: 0,
            retry_delays: Vec::new(),
        };
        let arguments = topology
            .worker_queue_arguments(&declared)
            .inner()
            .iter()
            // A setting of each deployment (`CHOREO_DELIVERY_LIMIT`), told in the description instead.
            .filter(|(key, _)| key.as_str() != "x-delivery-limit")
            .map(|(key, value)| (key.to_string(), amqp_value(value)))
            .collect();
        Channel {
            address: name.clone(),
            description: format!(
                "Queue of participant `{}`, bound to `{}` with the types it consumes. A quorum queue whose \
                 `x-delivery-limit` is the worker's `CHOREO_DELIVERY_LIMIT` (default 10); its dead letters go to \
                 `{}`, its delayed retries wait in `{}.retry.<delay>ms`.",
                participant.name,
                topology.events_exchange(),
                topology.dead_letter_queue(&participant.name),
                name,
            ),
            messages: participant.consumes.iter().map(|t| (t.clone(), message_ref(t))).collect(),
            bindings: ChannelBindings {
                amqp: AmqpChannelBinding::Queue {
                    queue: Queue { name, durable: true, exclusive: false, auto_delete: false },
                    arguments,
                    binding_version: AMQP_BINDING_VERSION,
                },
            },
        }
    }
}

/// A queue argument as the broker is told it.
fn amqp_value(value: &AMQPValue) -> Value {
    match value {
        AMQPValue::LongString(text) => Value::String(text.to_string()),
        AMQPValue::ShortString(text) => Value::String(text.to_string()),
        AMQPValue::LongLongInt(number) => json!(number),
        AMQPValue::LongInt(number) => json!(number),
        AMQPValue::Boolean(flag) => json!(flag),
        other => Value::String(format!("{other:?}")),
    }
}

fn message_ref(type_name: &str) -> Reference {
    Reference::to(&["components", "messages", type_name])
}

#[derive(Debug, Serialize)]
struct ChannelBindings {
    amqp: AmqpChannelBinding,
}

#[derive(Debug, Serialize)]
#[serde(tag = "is", rename_all = "camelCase")]
enum AmqpChannelBinding {
    #[serde(rename_all = "camelCase")]
    RoutingKey { exchange: Exchange, binding_version: &'static str },
    #[serde(rename_all = "camelCase")]
    Queue {
        queue: Queue,
        /// The arguments the queue is declared with: the binding has no field of its own for them.
        #[serde(rename = "x-arguments")]
        arguments: BTreeMap<String, Value>,
        binding_version: &'static str,
    },
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Exchange {
    name: String,
    #[serde(rename = "type")]
    kind: &'static str,
    durable: bool,
    auto_delete: bool,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Queue {
    name: String,
    durable: bool,
    exclusive: bool,
    auto_delete: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
enum Action {
    Send,
    Receive,
}

#[derive(Debug, Serialize)]
struct Operation {
    action: Action,
    channel: Reference,
    summary: String,
    messages: Vec<Reference>,
    bindings: OperationBindings,
}

impl Operation {
    /// `participant` sends or receives `type_name` on channel `channel`.
    fn new(action: Action, channel: &str, type_name: &str, participant: &str) -> Self {
        let (summary, amqp) = match action {
            Action::Send => (
                format!("`{participant}` emits `{type_name}`, through its outbox."),
                AmqpOperationBinding {
                    delivery_mode: Some(PERSISTENT),
                    mandatory: Some(true),
                    timestamp: Some(true),
                    ack: None,
                    binding_version: AMQP_BINDING_VERSION,
                },
            ),
            Action::Receive => (
                format!("`{participant}` consumes `{type_name}`; acknowledged once its effects are committed."),
                AmqpOperationBinding {
                    delivery_mode: None,
                    mandatory: None,
                    timestamp: None,
                    ack: Some(true),
                    binding_version: AMQP_BINDING_VERSION,
                },
            ),
        };
        Operation {
            action,
            channel: Reference::to(&["channels", channel]),
            summary,
            messages: vec![Reference::to(&["channels", channel, "messages", type_name])],
            bindings: OperationBindings { amqp },
        }
    }
}

#[derive(Debug, Serialize)]
struct OperationBindings {
    amqp: AmqpOperationBinding,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AmqpOperationBinding {
    #[serde(skip_serializing_if = "Option::is_none")]
    delivery_mode: Option<u8>,
    #[serde(skip_serializing_if = "Option::is_none")]
    mandatory: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    timestamp: Option<bool>,
    #[serde(skip_serializing_if = "Option::is_none")]
    ack: Option<bool>,
    binding_version: &'static str,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Components {
    messages: BTreeMap<String, Message>,
    schemas: BTreeMap<String, schemars::Schema>,
    correlation_ids: BTreeMap<&'static str, CorrelationId>,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct Message {
    name: String,
    #[serde(skip_serializing_if = "Option::is_none")]
    title: Option<String>,
    content_type: &'static str,
    correlation_id: Reference,
    headers: schemars::Schema,
    payload: schemars::Schema,
    bindings: MessageBindings,
}

#[derive(Debug, Serialize)]
struct MessageBindings {
    amqp: AmqpMessageBinding,
}

#[derive(Debug, Serialize)]
#[serde(rename_all = "camelCase")]
struct AmqpMessageBinding {
    message_type: String,
    binding_version: &'static str,
}

#[derive(Debug, Serialize)]
struct CorrelationId {
    description: &'static str,
    location: &'static str,
}

impl CorrelationId {
    fn workflow() -> Self {
        CorrelationId {
            description: "The workflow this message belongs to, in the AMQP property `correlation_id` (a UUID; \
                          when absent, the message's own `message_id`). Every message a workflow causes carries \
                          it unchanged.",
            location: "$message.header#/correlation_id",
        }
    }
}

#[derive(Debug, Serialize)]
struct Reference {
    #[serde(rename = "$ref")]
    target: String,
}

impl Reference {
    /// A reference to the document's node at `path`.
    fn to(path: &[&str]) -> Self {
        let tokens: Vec<String> = path.iter().map(|p| pointer_token(p)).collect();
        Reference { target: format!("#/{}", tokens.join("/")) }
    }
}

#[cfg(test)]
mod tests {
    use choreo_messages::{Payload, contract};
    use schemars::JsonSchema;
    use serde::{Deserialize, Serialize};
    use serde_yaml_ng::Value as Yaml;

    use super::*;

    /// Command `job.start`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    struct Start {
        job: String,
        steps: Vec<Step>,
    }
    impl Payload for Start {
        const TYPE: &'static str = "job.start";
    }

    /// One step of a job.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    struct Step {
        name: String,
    }

    /// Event `job.started`, as its emitter writes it.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    struct Started {
        job: String,
        at: String,
    }
    impl Payload for Started {
        const TYPE: &'static str = "job.started";
    }

    /// Event `job.started`, as a consumer reads it: fewer fields.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    struct StartedSeen {
        job: String,
    }
    impl Payload for StartedSeen {
        const TYPE: &'static str = "job.started";
    }

    /// Event `job.started` at a version its emitter does not speak.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    struct StartedV2 {
        job: String,
    }
    impl Payload for StartedV2 {
        const TYPE: &'static str = "job.started";
        const VERSION: u32 = 2;
    }

    /// Event `job.logged`.
    #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
    struct Logged {
        job: String,
    }
    impl Payload for Logged {
        const TYPE: &'static str = "job.logged";
    }

    contract! { enum Runner { Start(Start), Started(Started) } }
    contract! { enum Logger { Started(StartedSeen), Logged(Logged) } }
    contract! { enum LoggerV2 { Started(StartedV2), Logged(Logged) } }

    fn namespace() -> AsyncApi {
        AsyncApi::new("acme")
            .participant::<Runner>("runner", &["job.start"], &["job.started"], &[])
            .participant::<Logger>("logger", &["job.started"], &["job.logged"], &["job.logged"])
    }

    fn parsed(api: &AsyncApi) -> Yaml {
        serde_yaml_ng::from_str(&api.to_yaml().unwrap()).unwrap()
    }

    fn keys(node: &Yaml) -> Vec<String> {
        node.as_mapping().unwrap().keys().map(|k| k.as_str().unwrap().to_owned()).collect()
    }

    #[test]
    fn a_worker_emits_what_its_contract_holds_and_it_does_not_consume() {
        assert_eq!(emitted(&["a", "b", "c"], &["b"]), ["a", "c"]);
        assert!(emitted(&["a"], &["a"]).is_empty());
    }

    #[test]
    fn consumed_types_are_received_from_the_queue_and_emitted_ones_sent_to_their_channel() {
        let doc = parsed(&namespace());
        assert_eq!(
            keys(&doc["operations"]),
            [
                "logger.receive.job.started",
                "logger.send.job.logged",
                "runner.receive.job.start",
                "runner.send.job.started",
            ]
        );
        let receive = &doc["operations"]["logger.receive.job.started"];
        assert_eq!(receive["action"], "receive");
        assert_eq!(receive["channel"]["$ref"], "#/channels/acme.logger");
        assert_eq!(receive["messages"][0]["$ref"], "#/channels/acme.logger/messages/job.started");
        assert_eq!(receive["bindings"]["amqp"]["ack"], true);
        let send = &doc["operations"]["runner.send.job.started"];
        assert_eq!(send["action"], "send");
        assert_eq!(send["channel"]["$ref"], "#/channels/job.started");
        assert_eq!(send["bindings"]["amqp"]["deliveryMode"], 2);
        assert_eq!(send["bindings"]["amqp"]["mandatory"], true);
    }

    #[test]
    fn a_type_one_participant_emits_and_another_consumes_is_one_channel_and_one_message() {
        let doc = parsed(&namespace());
        assert_eq!(keys(&doc["channels"]), ["acme.logger", "acme.runner", "job.logged", "job.start", "job.started"]);
        assert_eq!(keys(&doc["components"]["messages"]), ["job.logged", "job.start", "job.started"]);
        let channel = &doc["channels"]["job.started"];
        assert_eq!(channel["address"], "job.started");
        assert_eq!(channel["bindings"]["amqp"]["is"], "routingKey");
        assert_eq!(channel["bindings"]["amqp"]["exchange"]["name"], "acme.events");
        assert_eq!(channel["bindings"]["amqp"]["exchange"]["type"], "topic");
        let description = channel["description"].as_str().unwrap();
        assert!(description.contains("emitted by `runner`"), "{description}");
        assert!(description.contains("Consumed by `logger` (queue `acme.logger`)"), "{description}");
        let start = doc["channels"]["job.start"]["description"].as_str().unwrap();
        assert!(start.contains("emitted by no participant"), "{start}");
        let logged = doc["channels"]["job.logged"]["description"].as_str().unwrap();
        assert!(logged.contains("`acme.outcomes`"), "{logged}");
    }

    #[test]
    fn the_emitters_schema_describes_a_shared_type() {
        // The consumer comes first, so that its schema is seen first and must give way.
        let api = AsyncApi::new("acme")
            .participant::<Logger>("logger", &["job.started"], &["job.logged"], &[])
            .participant::<Runner>("runner", &["job.start"], &["job.started"], &[]);
        let doc = parsed(&api);
        let payload = &doc["components"]["messages"]["job.started"]["payload"];
        assert_eq!(payload["title"], "Started");
        assert!(payload["properties"]["at"].is_mapping());
    }

    #[test]
    fn a_queue_is_a_quorum_queue_bound_to_what_its_participant_consumes() {
        let doc = parsed(&namespace());
        let queue = &doc["channels"]["acme.logger"];
        assert_eq!(queue["address"], "acme.logger");
        assert_eq!(keys(&queue["messages"]), ["job.started"]);
        let binding = &queue["bindings"]["amqp"];
        assert_eq!(binding["is"], "queue");
        assert_eq!(binding["queue"]["name"], "acme.logger");
        assert_eq!(binding["x-arguments"]["x-queue-type"], "quorum");
        assert_eq!(binding["x-arguments"]["x-dead-letter-routing-key"], "acme.logger.dlq");
        assert!(binding["x-arguments"].get("x-delivery-limit").is_none());
    }

    #[test]
    fn a_message_carries_its_schema_headers_and_correlation_id() {
        let doc = parsed(&namespace());
        let message = &doc["components"]["messages"]["job.start"];
        assert_eq!(message["name"], "job.start");
        assert_eq!(message["contentType"], "application/json");
        assert_eq!(message["bindings"]["amqp"]["messageType"], "job.start");
        assert_eq!(message["correlationId"]["$ref"], "#/components/correlationIds/workflow");
        assert_eq!(message["headers"]["required"][0], "schema-version");
        assert_eq!(message["headers"]["properties"]["schema-version"]["const"], 1);
        for header in ["causation-id", "producer", "occurred-at", "traceparent"] {
            assert!(message["headers"]["properties"][header].is_mapping(), "{header}");
        }
        // Draft 2020-12's markers go; its definitions move where a document-wide reference finds them.
        let payload = &message["payload"];
        assert!(payload.get("$schema").is_none() && payload.get("$id").is_none() && payload.get("$defs").is_none());
        assert_eq!(payload["properties"]["steps"]["items"]["$ref"], "#/components/schemas/Step");
        assert_eq!(doc["components"]["schemas"]["Step"]["properties"]["name"]["type"], "string");
    }

    #[test]
    fn a_definition_named_like_another_with_other_content_is_renamed() {
        let mut taken = BTreeMap::new();
        taken.insert("Step".to_owned(), json!({"type": "integer"}));
        let (payload, defs) = payload_schema("job.start", &TypeSchema::of::<Start>().schema, &taken);
        assert_eq!(payload["properties"]["steps"]["items"]["$ref"], "#/components/schemas/job.start.Step");
        assert_eq!(defs.keys().collect::<Vec<_>>(), ["job.start.Step"]);
        taken.insert("Step".to_owned(), defs["job.start.Step"].clone());
        let (payload, _) = payload_schema("job.start", &TypeSchema::of::<Start>().schema, &taken);
        assert_eq!(payload["properties"]["steps"]["items"]["$ref"], "#/components/schemas/Step");
    }

    #[test]
    fn declarations_that_contradict_each_other_are_refused() {
        let err = |api: AsyncApi| api.to_yaml().unwrap_err();
        assert_eq!(
            err(AsyncApi::new("acme").participant::<Runner>("runner", &["job.start"], &["job.logged"], &[])),
            AsyncApiError::NotInContract { participant: "runner".into(), type_name: "job.logged".into() }
        );
        assert_eq!(
            err(AsyncApi::new("acme").participant::<Runner>("runner", &["job.start"], &[], &["job.started"])),
            AsyncApiError::OutcomeNotEmitted { participant: "runner".into(), type_name: "job.started".into() }
        );
        assert_eq!(
            err(namespace().participant::<Runner>("runner", &[], &[], &[])),
            AsyncApiError::DuplicateParticipant("runner".into())
        );
        assert_eq!(
            err(namespace().participant::<LoggerV2>("auditor", &["job.started"], &[], &[])),
            AsyncApiError::VersionMismatch {
                type_name: "job.started".into(),
                first: "runner".into(),
                first_version: 1,
                second: "auditor".into(),
                second_version: 2,
            }
        );
        // A participant named so that its queue is called like a type.
        assert_eq!(
            err(AsyncApi::new("job").participant::<Logger>("started", &["job.started"], &[], &[])),
            AsyncApiError::NameClash { kind: "channel", id: "job.started".into() }
        );
    }

    struct Logging;

    impl PlainHandler for Logging {
        type Message = Logger;
        const NAME: &'static str = "logger";
        const CONSUMES: &'static [&'static str] = &["job.started"];
        const OUTCOMES: &'static [&'static str] = &["job.logged"];

        async fn handle(
            &self,
            _: &mut sqlx::PgConnection,
            _: &choreo_messages::Envelope<Logger>,
        ) -> Result<Vec<Logger>, crate::ServiceError> {
            Ok(Vec::new())
        }
    }

    struct Running;

    impl Service for Running {
        type Message = Runner;
        const NAME: &'static str = "runner";
        const CONSUMES: &'static [&'static str] = &["job.start"];

        async fn decide(
            &self,
            _: &mut sqlx::PgConnection,
            _: &[(&choreo_messages::Envelope<Runner>, tracing::Span)],
            _: &mut crate::Change,
        ) -> Result<Vec<crate::Effects<Runner>>, crate::ServiceError> {
            Ok(Vec::new())
        }
    }

    #[test]
    fn handlers_are_described_by_their_declarations() {
        let by_declarations = AsyncApi::new("acme").service::<Running>().plain::<Logging>();
        assert_eq!(by_declarations.to_yaml().unwrap(), namespace().to_yaml().unwrap());
    }

    #[test]
    fn references_escape_what_a_json_pointer_reserves() {
        assert_eq!(Reference::to(&["channels", "a/b~c"]).target, "#/channels/a~1b~0c");
    }
}
