//! Ids that cross module boundaries. Each is its own type, so a user id
//! passed where a chat id belongs does not compile. All are positive
//! 64-bit integers on the wire (serialized as plain numbers).

use std::fmt;

use serde::{Deserialize, Serialize};

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(
            Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
        )]
        #[serde(transparent)]
        pub struct $name(pub i64);

        impl $name {
            /// The raw value, for storage and wire formats.
            pub const fn get(self) -> i64 {
                self.0
            }
        }

        impl fmt::Display for $name {
            fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                self.0.fmt(f)
            }
        }

        impl From<$name> for i64 {
            fn from(id: $name) -> i64 {
                id.0
            }
        }
    };
}

id_type!(
    /// An account.
    UserId
);
id_type!(
    /// A chat (direct or group).
    ChatId
);
id_type!(
    /// A message, and its position in the deployment-wide timeline: ids
    /// grow in commit order, so "every id above N" is a resume point.
    MessageId
);

/// Parses a positive 64-bit id (`1` ..= `9223372036854775807`, digits
/// only); `what` names the value in the error.
pub fn parse_positive(what: &str, raw: &str) -> Result<i64, String> {
    match raw.parse::<i64>() {
        Ok(id) if id > 0 && raw.bytes().all(|b| b.is_ascii_digit()) => Ok(id),
        _ => Err(format!(
            "{what} must be a positive integer no greater than 9223372036854775807, got {raw:?}"
        )),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_serialize_as_plain_numbers() {
        assert_eq!(serde_json::to_string(&ChatId(7)).unwrap(), "7");
        assert_eq!(serde_json::from_str::<UserId>("3").unwrap(), UserId(3));
    }

    #[test]
    fn positive_ids_parse_and_others_are_refused() {
        assert_eq!(parse_positive("chat_id", "42"), Ok(42));
        for bad in ["0", "-1", "+1", "abc", "9223372036854775808", "1.0", ""] {
            assert!(parse_positive("chat_id", bad).is_err(), "{bad}");
        }
    }
}
