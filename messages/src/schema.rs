//! JSON Schemas of every body, generated from the Rust types.
//!
//! The checked-in copies under `messages/schema/` are what non-Rust clients read; a test keeps them in step
//! with the code (`CHOREO_UPDATE_SCHEMAS=1 cargo test -p choreo-messages` rewrites them).

use schemars::{JsonSchema, schema_for};

use crate::MessageType;
use crate::payloads::*;

/// The file name of a type's schema: `order.place.v1.schema.json`.
pub fn file_name(message_type: MessageType) -> String {
    format!("{}.v{}.schema.json", message_type.as_str(), message_type.schema_version())
}

/// The schema of a type's body, as pretty JSON with a trailing newline.
pub fn schema_json(message_type: MessageType) -> String {
    fn render<T: JsonSchema>(message_type: MessageType) -> String {
        let mut schema = schema_for!(T);
        schema.insert("$id".into(), file_name(message_type).into());
        schema.insert(
            "description".into(),
            format!(
                "Body of `{}` (schema version {}). AMQP type and routing key: `{}`.",
                message_type.as_str(),
                message_type.schema_version(),
                message_type.as_str()
            )
            .into(),
        );
        let mut text =
            serde_json::to_string_pretty(&schema).unwrap_or_else(|e| unreachable!("a schema is plain JSON: {e}"));
        text.push('\n');
        text
    }
    match message_type {
        MessageType::OrderPlace => render::<PlaceOrder>(message_type),
        MessageType::OrderCreated => render::<OrderCreated>(message_type),
        MessageType::PaymentSucceeded => render::<PaymentSucceeded>(message_type),
        MessageType::PaymentFailed => render::<PaymentFailed>(message_type),
        MessageType::InventoryReserved => render::<InventoryReserved>(message_type),
        MessageType::InventoryFailed => render::<InventoryFailed>(message_type),
        MessageType::PaymentRefunded => render::<PaymentRefunded>(message_type),
        MessageType::OrderConfirmed => render::<OrderConfirmed>(message_type),
        MessageType::OrderCancelled => render::<OrderCancelled>(message_type),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;

    #[test]
    fn checked_in_schemas_match_the_code() {
        let dir = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("schema");
        let update = std::env::var_os("CHOREO_UPDATE_SCHEMAS").is_some();
        let mut stale = Vec::new();
        for message_type in MessageType::ALL {
            let path = dir.join(file_name(message_type));
            let expected = schema_json(message_type);
            if update {
                std::fs::write(&path, &expected).expect("write schema");
            } else if std::fs::read_to_string(&path).ok().as_deref() != Some(expected.as_str()) {
                stale.push(path.display().to_string());
            }
        }
        assert!(
            stale.is_empty(),
            "schemas out of date: {stale:?}; run `CHOREO_UPDATE_SCHEMAS=1 cargo test -p choreo-messages`"
        );
        let files = std::fs::read_dir(&dir).expect("schema dir").count();
        assert_eq!(files, MessageType::ALL.len(), "a stale schema file is left in {}", dir.display());
    }

    #[test]
    fn schemas_forbid_unknown_fields() {
        let schema: serde_json::Value = serde_json::from_str(&schema_json(MessageType::OrderPlace)).expect("json");
        assert_eq!(schema["additionalProperties"], serde_json::Value::Bool(false));
        assert_eq!(schema["required"].as_array().map(Vec::len), Some(4));
    }
}
