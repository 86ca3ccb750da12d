//! The `rename_all` rules that derive wire names from Rust identifiers.

/// A naming convention for derived wire names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum RenameRule {
    /// `OpenedAccount` → `opened_account` (the default).
    Snake,
    /// `OpenedAccount` → `opened-account`.
    Kebab,
    /// `OpenedAccount` → `openedAccount`.
    Camel,
    /// `OpenedAccount` → `OpenedAccount`.
    Pascal,
    /// `OpenedAccount` → `openedaccount`.
    Lower,
    /// `OpenedAccount` → `OPENED_ACCOUNT`.
    ScreamingSnake,
}

impl RenameRule {
    /// Every accepted spelling, for error messages.
    pub(crate) const ACCEPTED: &'static str = "\"snake_case\", \"kebab-case\", \"camelCase\", \"PascalCase\", \"lowercase\" or \"SCREAMING_SNAKE_CASE\"";

    pub(crate) fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "snake_case" => Self::Snake,
            "kebab-case" => Self::Kebab,
            "camelCase" => Self::Camel,
            "PascalCase" => Self::Pascal,
            "lowercase" => Self::Lower,
            "SCREAMING_SNAKE_CASE" => Self::ScreamingSnake,
            _ => return None,
        })
    }

    /// Applies the rule to a Rust identifier (PascalCase or snake_case).
    pub(crate) fn apply(self, ident: &str) -> String {
        let ident = ident.strip_prefix("r#").unwrap_or(ident);
        let words = words(ident);
        match self {
            Self::Snake => words.join("_"),
            Self::Kebab => words.join("-"),
            Self::Lower => words.concat(),
            Self::ScreamingSnake => words.join("_").to_uppercase(),
            Self::Pascal => words.iter().map(|w| capitalise(w)).collect(),
            Self::Camel => words
                .iter()
                .enumerate()
                .map(|(i, w)| if i == 0 { w.clone() } else { capitalise(w) })
                .collect(),
        }
    }
}

/// Splits an identifier into lowercase words: `HTTPRequestV2` → `http`, `request`, `v2`.
fn words(ident: &str) -> Vec<String> {
    let chars: Vec<char> = ident.chars().collect();
    let mut words = Vec::new();
    let mut current = String::new();
    for (i, &c) in chars.iter().enumerate() {
        if c == '_' {
            if !current.is_empty() {
                words.push(std::mem::take(&mut current));
            }
            continue;
        }
        if c.is_uppercase() && !current.is_empty() {
            let prev = chars[i - 1];
            let next_is_lower = chars.get(i + 1).is_some_and(|n| n.is_lowercase());
            // A new word starts at `aB` and at the last capital of an acronym (`HTTPRequest`).
            if prev.is_lowercase()
                || prev.is_ascii_digit()
                || (prev.is_uppercase() && next_is_lower)
            {
                words.push(std::mem::take(&mut current));
            }
        }
        current.extend(c.to_lowercase());
    }
    if !current.is_empty() {
        words.push(current);
    }
    words
}

fn capitalise(word: &str) -> String {
    let mut chars = word.chars();
    match chars.next() {
        Some(first) => first.to_uppercase().chain(chars).collect(),
        None => String::new(),
    }
}

#[cfg(test)]
mod tests {
    use super::RenameRule::*;
    use super::*;

    #[test]
    fn rules() {
        assert_eq!(Snake.apply("MoneyDeposited"), "money_deposited");
        assert_eq!(Kebab.apply("MoneyDeposited"), "money-deposited");
        assert_eq!(Camel.apply("MoneyDeposited"), "moneyDeposited");
        assert_eq!(Pascal.apply("money_deposited"), "MoneyDeposited");
        assert_eq!(Lower.apply("MoneyDeposited"), "moneydeposited");
        assert_eq!(ScreamingSnake.apply("MoneyDeposited"), "MONEY_DEPOSITED");
        assert_eq!(Snake.apply("Opened"), "opened");
        assert_eq!(Snake.apply("HTTPRequestV2"), "http_request_v2");
        assert_eq!(Snake.apply("r#Type"), "type");
    }

    #[test]
    fn parse() {
        assert_eq!(RenameRule::parse("kebab-case"), Some(Kebab));
        assert_eq!(RenameRule::parse("Kebab"), None);
    }
}
