//! JSON Schemas of every body, generated from the Rust types.
//!
//! The checked-in copies under `messages/schema/` are what non-Rust clients read; a test keeps them in step
//! with the code (`CHOREO_UPDATE_SCHEMAS=1 cargo test -p choreo-messages` rewrites them).

use crate::MessageType;
use crate::contract::{Payload, TypeSchema};
use crate::payloads::*;

/// The file name of a type's schema: `order.place.v1.schema.json`.
pub fn file_name(message_type: MessageType) -> String {
    type_schema(message_type).file_name()
}

/// The schema of a type's body, as pretty JSON with a trailing newline.
pub fn schema_json(message_type: MessageType) -> String {
    type_schema(message_type).to_pretty_json()
}

/// The schema of one type of the reference workflow.
pub(crate) fn type_schema(message_type: MessageType) -> TypeSchema {
    fn of<P: Payload>() -> TypeSchema {
        TypeSchema::of::<P>()
    }
    match message_type {
        MessageType::OrderPlace => of::<PlaceOrder>(),
        MessageType::OrderCreated => of::<OrderCreated>(),
        MessageType::PaymentSucceeded => of::<PaymentSucceeded>(),
        MessageType::PaymentFailed => of::<PaymentFailed>(),
        MessageType::InventoryReserved => of::<InventoryReserved>(),
        MessageType::InventoryFailed => of::<InventoryFailed>(),
        MessageType::PaymentRefunded => of::<PaymentRefunded>(),
        MessageType::OrderConfirmed => of::<OrderConfirmed>(),
        MessageType::OrderCancelled => of::<OrderCancelled>(),
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
