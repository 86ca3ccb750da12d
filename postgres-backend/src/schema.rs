//! The validated name of the schema that holds the store's tables.

use std::fmt;

use factum::Error;

/// The PostgreSQL schema the store's objects live in (default `factum`).
///
/// Validated on construction — a lowercase letter or `_`, then up to 62 lowercase letters,
/// digits or `_` — and always quoted in SQL, so a schema name can never inject SQL:
///
/// ```
/// use factum_postgres::SchemaName;
///
/// assert_eq!(SchemaName::default().as_str(), "factum");
/// assert!(SchemaName::new("billing_v2").is_ok());
/// assert!(SchemaName::new("x; DROP TABLE events").is_err());
/// assert!(SchemaName::new("Billing").is_err());
/// ```
#[derive(Clone, PartialEq, Eq, Hash, Debug)]
pub struct SchemaName(String);

impl SchemaName {
    /// The default schema, `factum`.
    pub const DEFAULT: &'static str = "factum";

    /// Validates a schema name: `^[a-z_][a-z0-9_]{0,62}$`, and not a reserved `pg_` name.
    pub fn new(name: impl Into<String>) -> Result<Self, Error> {
        let name = name.into();
        let mut chars = name.chars();
        let valid = chars
            .next()
            .is_some_and(|c| c.is_ascii_lowercase() || c == '_')
            && chars.all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
            && name.len() <= 63
            && !name.starts_with("pg_");
        if valid {
            Ok(Self(name))
        } else {
            Err(Error::InvalidArgument(format!(
                "schema name {name:?} is invalid: use 1 to 63 lowercase ASCII letters, digits or `_`, starting with a letter or `_` (and not `pg_`)"
            )))
        }
    }

    /// The name, unquoted.
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// The name as a quoted SQL identifier, e.g. `"factum"`.
    pub(crate) fn quoted(&self) -> String {
        // Validation leaves nothing to escape; quoting also keeps keywords (`user`) usable.
        format!("\"{}\"", self.0)
    }
}

impl Default for SchemaName {
    fn default() -> Self {
        Self(Self::DEFAULT.to_owned())
    }
}

impl fmt::Display for SchemaName {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl std::str::FromStr for SchemaName {
    type Err = Error;
    fn from_str(s: &str) -> Result<Self, Error> {
        Self::new(s)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rejects_injection_and_odd_names() {
        for bad in [
            "",
            "x; DROP TABLE events",
            "a\"b",
            "1abc",
            "Abc",
            "a-b",
            "pg_catalog",
            "é",
        ] {
            assert!(SchemaName::new(bad).is_err(), "{bad:?} was accepted");
        }
        assert!(SchemaName::new("a".repeat(64)).is_err());
        assert_eq!(
            SchemaName::new("a".repeat(63))
                .expect("valid")
                .as_str()
                .len(),
            63
        );
        assert_eq!(SchemaName::new("_x1").expect("valid").quoted(), "\"_x1\"");
    }
}
