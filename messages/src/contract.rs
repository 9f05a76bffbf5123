//! Open message types: [`Payload`] for one command or event, [`Contract`] for the set a worker knows.
//!
//! A team defines its bodies as plain serde structs, says what each is called on the wire with [`Payload`],
//! and gathers the ones a worker consumes and emits into one enum with [`contract!`](crate::contract!). The
//! runtime decodes, dead-letters, labels metrics and generates JSON Schemas through [`Contract`], the same way
//! for every team's types as for the reference workflow's.
//!
//! ```
//! use choreo_messages::{Contract, Payload, contract};
//! use schemars::JsonSchema;
//! use serde::{Deserialize, Serialize};
//!
//! /// Event `shipment.scheduled`.
//! #[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
//! #[serde(deny_unknown_fields)]
//! pub struct ShipmentScheduled {
//!     pub order_id: uuid::Uuid,
//!     pub carrier: String,
//! }
//!
//! impl Payload for ShipmentScheduled {
//!     const TYPE: &'static str = "shipment.scheduled";
//!     fn validate(&self) -> Result<(), String> {
//!         if self.carrier.is_empty() { Err("carrier is empty".into()) } else { Ok(()) }
//!     }
//! }
//!
//! contract! {
//!     /// Everything the shipping worker reads or writes.
//!     pub enum Shipping {
//!         ShipmentScheduled(ShipmentScheduled),
//!     }
//! }
//!
//! let body = br#"{"order_id":"0190f5a2-6d3c-7cc0-8000-000000000001","carrier":"dhl"}"#;
//! let decoded = Shipping::decode("shipment.scheduled", 1, body).unwrap();
//! assert_eq!(decoded.type_name(), "shipment.scheduled");
//! assert!(Shipping::decode("shipment.scheduled", 2, body).is_err());
//! assert_eq!(Shipping::label_for("something.else"), "unknown");
//! ```

use std::fmt::Debug;

use schemars::JsonSchema;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::DecodeError;

/// One command or event: its name on the wire, the schema version this build speaks, and its rules.
///
/// The struct should reject unknown fields (`#[serde(deny_unknown_fields)]`): a field this build does not
/// know belongs to a contract version it does not have, and dropping it silently would lose data.
pub trait Payload:
    Serialize + DeserializeOwned + JsonSchema + Clone + Debug + PartialEq + Send + Sync + 'static
{
    /// The AMQP `type` property and routing key, e.g. `order.created`.
    const TYPE: &'static str;
    /// The schema version this build produces and accepts.
    const VERSION: u32 = 1;

    /// Business rules that serde cannot express; a body that breaks one is dead-lettered as
    /// `validation_failed` with this reason.
    fn validate(&self) -> Result<(), String> {
        Ok(())
    }
}

/// The message types one worker knows, as one enum: written with [`contract!`](crate::contract!) for a
/// team's own types.
pub trait Contract: Clone + Debug + PartialEq + Send + Sync + Sized + 'static {
    /// The wire names of every type of the contract.
    const TYPES: &'static [&'static str];

    /// This message's wire name.
    fn type_name(&self) -> &'static str;

    /// The schema version this message is written with.
    fn schema_version(&self) -> u32;

    /// Strict decoding of a body of `type_name` at `version`: known type, supported version, no unknown
    /// field, business rules kept.
    fn decode(type_name: &str, version: u32, body: &[u8]) -> Result<Self, DecodeError>;

    /// The body as JSON.
    fn to_json(&self) -> Vec<u8>;

    /// The JSON Schema of every type, with its wire name and version.
    fn schemas() -> Vec<TypeSchema>;

    /// The entity this message is about (an order, say), if it names one: two messages about one entity are
    /// never decided together in one batch, so that the second sees the first's change. Without one, the
    /// workflow (correlation id) stands for it.
    fn entity_id(&self) -> Option<uuid::Uuid> {
        None
    }

    /// `text` as a metrics label: the type's name when it is one of the contract, else `unknown`, so that
    /// whatever a client sends cannot multiply label values.
    fn label_for(text: &str) -> &'static str {
        Self::TYPES.iter().copied().find(|t| *t == text).unwrap_or("unknown")
    }
}

/// The JSON Schema of one message type.
#[derive(Debug, Clone)]
pub struct TypeSchema {
    /// Wire name, e.g. `order.created`.
    pub type_name: &'static str,
    /// Schema version.
    pub version: u32,
    /// The schema, with `$id` (its file name) and a description naming the type.
    pub schema: schemars::Schema,
}

impl TypeSchema {
    /// The schema of payload `P`.
    pub fn of<P: Payload>() -> Self {
        let mut schema = schemars::schema_for!(P);
        schema.insert("$id".into(), Self::file_name_of(P::TYPE, P::VERSION).into());
        schema.insert(
            "description".into(),
            format!("Body of `{}` (schema version {}). AMQP type and routing key: `{}`.", P::TYPE, P::VERSION, P::TYPE)
                .into(),
        );
        TypeSchema { type_name: P::TYPE, version: P::VERSION, schema }
    }

    /// The file name of this schema: `order.place.v1.schema.json`.
    pub fn file_name(&self) -> String {
        Self::file_name_of(self.type_name, self.version)
    }

    fn file_name_of(type_name: &str, version: u32) -> String {
        format!("{type_name}.v{version}.schema.json")
    }

    /// The schema as pretty JSON with a trailing newline, as checked in.
    pub fn to_pretty_json(&self) -> String {
        let mut text =
            serde_json::to_string_pretty(&self.schema).unwrap_or_else(|e| unreachable!("a schema is plain JSON: {e}"));
        text.push('\n');
        text
    }
}

/// Strict decoding of one payload: used by [`contract!`](crate::contract!); public for its expansion.
#[doc(hidden)]
pub fn decode_payload<P: Payload>(version: u32, body: &[u8]) -> Result<P, DecodeError> {
    if version != P::VERSION {
        return Err(DecodeError::UnsupportedSchemaVersion {
            message_type: P::TYPE.to_owned(),
            version,
            supported: P::VERSION,
        });
    }
    let payload: P = serde_json::from_slice(body)
        .map_err(|source| DecodeError::MalformedBody { message_type: P::TYPE.to_owned(), source })?;
    payload.validate().map_err(|reason| DecodeError::ValidationFailed { message_type: P::TYPE.to_owned(), reason })?;
    Ok(payload)
}

/// A payload as JSON: used by [`contract!`](crate::contract!); public for its expansion.
#[doc(hidden)]
pub fn encode_payload<P: Payload>(payload: &P) -> Vec<u8> {
    // Structs of plain data with string keys always serialise.
    serde_json::to_vec(payload).unwrap_or_else(|e| unreachable!("contract types always serialise: {e}"))
}

/// An unknown type's error, its name cut short: used by [`contract!`](crate::contract!).
#[doc(hidden)]
pub fn unknown_type(type_name: &str) -> DecodeError {
    DecodeError::UnknownType(type_name.chars().take(128).collect())
}

/// Declares an enum of [`Payload`]s and implements [`Contract`] for it, and `From` each payload.
///
/// See the [module's example](crate::contract).
#[macro_export]
macro_rules! contract {
    ($(#[$meta:meta])* $vis:vis enum $name:ident { $($(#[$vmeta:meta])* $variant:ident($payload:ty)),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, PartialEq)]
        $vis enum $name {
            $($(#[$vmeta])* #[allow(missing_docs)] $variant($payload)),+
        }

        impl $crate::Contract for $name {
            const TYPES: &'static [&'static str] = &[$(<$payload as $crate::Payload>::TYPE),+];

            fn type_name(&self) -> &'static str {
                match self { $(Self::$variant(_) => <$payload as $crate::Payload>::TYPE),+ }
            }

            fn schema_version(&self) -> u32 {
                match self { $(Self::$variant(_) => <$payload as $crate::Payload>::VERSION),+ }
            }

            fn decode(type_name: &str, version: u32, body: &[u8]) -> Result<Self, $crate::DecodeError> {
                $(
                    if type_name == <$payload as $crate::Payload>::TYPE {
                        return $crate::contract::decode_payload::<$payload>(version, body).map(Self::$variant);
                    }
                )+
                Err($crate::contract::unknown_type(type_name))
            }

            fn to_json(&self) -> Vec<u8> {
                match self { $(Self::$variant(p) => $crate::contract::encode_payload(p)),+ }
            }

            fn schemas() -> Vec<$crate::TypeSchema> {
                vec![$($crate::TypeSchema::of::<$payload>()),+]
            }
        }

        $(
            impl From<$payload> for $name {
                fn from(payload: $payload) -> Self {
                    Self::$variant(payload)
                }
            }
        )+
    };
}
