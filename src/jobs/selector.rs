//! Kubernetes label selector syntax, evaluated in memory over cached jobs.

use super::{FieldError, Labels, spec};

/// A parsed selector such as `team=ml,tier!=batch,env in (dev,prod),!legacy`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LabelSelector(Vec<Requirement>);

#[derive(Debug, Clone, PartialEq, Eq)]
enum Requirement {
    Equals(String, String),
    NotEquals(String, String),
    In(String, Vec<String>),
    NotIn(String, Vec<String>),
    Exists(String),
    NotExists(String),
}

impl LabelSelector {
    /// Longest selector accepted, in bytes.
    pub const MAX_LEN: usize = 1024;

    pub fn parse(text: &str) -> Result<Self, FieldError> {
        let err = |message: String| FieldError::new("label", message);
        if text.len() > Self::MAX_LEN {
            return Err(err(format!("selector is longer than {} bytes", Self::MAX_LEN)));
        }
        let mut requirements = Vec::new();
        for term in split_terms(text) {
            let term = term.trim();
            if term.is_empty() {
                return Err(err(format!("empty term in selector `{text}`")));
            }
            let requirement = parse_term(term).map_err(err)?;
            requirements.push(requirement);
        }
        Ok(Self(requirements))
    }

    /// The `key=value` pairs every match must carry (what an index can look up).
    pub fn required_pairs(&self) -> impl Iterator<Item = (&str, &str)> {
        self.0.iter().filter_map(|r| match r {
            Requirement::Equals(k, v) => Some((k.as_str(), v.as_str())),
            _ => None,
        })
    }

    pub fn matches(&self, labels: &Labels) -> bool {
        self.0.iter().all(|r| match r {
            Requirement::Equals(k, v) => labels.get(k) == Some(v),
            Requirement::NotEquals(k, v) => labels.get(k) != Some(v),
            Requirement::In(k, vs) => labels.get(k).is_some_and(|v| vs.contains(v)),
            Requirement::NotIn(k, vs) => labels.get(k).is_none_or(|v| !vs.contains(v)),
            Requirement::Exists(k) => labels.contains_key(k),
            Requirement::NotExists(k) => !labels.contains_key(k),
        })
    }
}

/// Split on commas that are not inside `( … )`.
fn split_terms(text: &str) -> Vec<&str> {
    let mut terms = Vec::new();
    let (mut depth, mut start) = (0usize, 0usize);
    for (i, c) in text.char_indices() {
        match c {
            '(' => depth += 1,
            ')' => depth = depth.saturating_sub(1),
            ',' if depth == 0 => {
                terms.push(&text[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    terms.push(&text[start..]);
    terms
}

fn parse_term(term: &str) -> Result<Requirement, String> {
    if let Some(key) = term.strip_prefix('!') {
        return Ok(Requirement::NotExists(key_of(key.trim())?));
    }
    if let Some((key, value)) = term.split_once("!=") {
        return Ok(Requirement::NotEquals(key_of(key.trim())?, value_of(value.trim())?));
    }
    if let Some((key, value)) = term.split_once("==").or_else(|| term.split_once('=')) {
        return Ok(Requirement::Equals(key_of(key.trim())?, value_of(value.trim())?));
    }
    for (op, negated) in [(" notin ", true), (" in ", false)] {
        if let Some((key, set)) = term.split_once(op) {
            let set = set.trim();
            let inner = set
                .strip_prefix('(')
                .and_then(|s| s.strip_suffix(')'))
                .ok_or_else(|| format!("`{term}`: the set must be in parentheses"))?;
            let values = inner.split(',').map(|v| value_of(v.trim())).collect::<Result<Vec<_>, _>>()?;
            let key = key_of(key.trim())?;
            return Ok(if negated { Requirement::NotIn(key, values) } else { Requirement::In(key, values) });
        }
    }
    Ok(Requirement::Exists(key_of(term)?))
}

fn key_of(key: &str) -> Result<String, String> {
    spec::check_label_key(key).map_err(|m| format!("`{key}`: {m}"))?;
    Ok(key.to_owned())
}

fn value_of(value: &str) -> Result<String, String> {
    spec::check_label_value(value).map_err(|m| format!("`{value}`: {m}"))?;
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn evaluates_every_operator() {
        let l = labels(&[("team", "ml"), ("env", "dev")]);
        for (selector, expected) in [
            ("team=ml", true),
            ("team==ml", true),
            ("team=web", false),
            ("team!=web", true),
            ("missing!=x", true),
            ("env in (dev, prod)", true),
            ("env notin (dev,prod)", false),
            ("missing notin (a)", true),
            ("team", true),
            ("!team", false),
            ("!missing", true),
            ("team=ml,env=dev", true),
            ("team=ml,env=prod", false),
        ] {
            assert_eq!(LabelSelector::parse(selector).unwrap().matches(&l), expected, "{selector}");
        }
    }

    #[test]
    fn rejects_malformed_selectors() {
        for bad in ["", "a=b,", "bad key=v", "env in dev", "k=has space", &"k".repeat(1025)] {
            assert!(LabelSelector::parse(bad).is_err(), "{bad} accepted");
        }
    }
}
