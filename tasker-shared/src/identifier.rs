//! Validated identifiers: namespaces, template, step and handler names.
//!
//! The rule (lowercase ASCII letter, then letters, digits or `_`, at most 48
//! characters) is the same as `tasker.is_identifier()` in the schema. Namespaces
//! become part of NOTIFY channel names, so an [`Identifier`] can always be used
//! there without quoting: it can never inject SQL or name another channel.

use std::fmt;
use std::str::FromStr;

/// The longest identifier accepted (fits a channel name within PostgreSQL's 63 bytes).
pub const MAX_IDENTIFIER_LEN: usize = 48;

/// A string that satisfies the identifier rule.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, serde::Serialize)]
#[serde(transparent)]
pub struct Identifier(String);

/// Why a string is not an identifier.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "`{found}` is not a valid identifier: expected 1 to {MAX_IDENTIFIER_LEN} characters of \
     lowercase letters, digits and `_`, starting with a letter"
)]
pub struct InvalidIdentifier {
    /// The rejected input (truncated when very long).
    pub found: String,
}

impl Identifier {
    /// Validates `value`.
    pub fn new(value: impl Into<String>) -> Result<Self, InvalidIdentifier> {
        let value = value.into();
        if is_identifier(&value) {
            Ok(Identifier(value))
        } else {
            Err(InvalidIdentifier { found: value.chars().take(80).collect() })
        }
    }

    /// The identifier as a string slice.
    pub fn as_str(&self) -> &str {
        &self.0
    }
}

/// The identifier rule, without allocating.
pub fn is_identifier(value: &str) -> bool {
    let mut bytes = value.bytes();
    matches!(bytes.next(), Some(b'a'..=b'z'))
        && value.len() <= MAX_IDENTIFIER_LEN
        && bytes.all(|b| matches!(b, b'a'..=b'z' | b'0'..=b'9' | b'_'))
}

impl fmt::Display for Identifier {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Identifier {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

impl FromStr for Identifier {
    type Err = InvalidIdentifier;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Identifier::new(s)
    }
}

impl TryFrom<String> for Identifier {
    type Error = InvalidIdentifier;

    fn try_from(value: String) -> Result<Self, Self::Error> {
        Identifier::new(value)
    }
}

impl<'de> serde::Deserialize<'de> for Identifier {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        Identifier::new(String::deserialize(deserializer)?).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn accepts_lowercase_names_with_digits_and_underscores() {
        for ok in ["a", "fulfillment", "order_2", "a_b_c", &"x".repeat(48)] {
            assert!(Identifier::new(ok).is_ok(), "{ok} should be accepted");
        }
    }

    #[test]
    fn rejects_anything_that_could_escape_a_channel_name() {
        for bad in
            ["", "9lives", "_x", "Upper", "has space", "semi;colon", "quote\"", "dash-ed", "ünïcode", &"x".repeat(49)]
        {
            let err = Identifier::new(bad).expect_err(bad);
            assert!(err.to_string().contains("not a valid identifier"));
        }
    }
}
