//! What a job may spend on model calls, and what it has spent.
//!
//! Money is counted in billionths of a US dollar ([`NanoUsd`]) so that sums across replicas and
//! calls are exact: a price of $2.50 per million tokens is exactly 2,500 nano-dollars per token.

use std::fmt;

/// An amount of money in billionths of a US dollar.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct NanoUsd(pub u64);

impl NanoUsd {
    const PER_USD: f64 = 1e9;

    /// Dollars as written in a request or a file; `None` for negative, non-finite or absurd
    /// amounts (more than a billion dollars).
    pub fn from_usd(usd: f64) -> Option<Self> {
        (usd.is_finite() && (0.0..=1e9).contains(&usd)).then(|| Self((usd * Self::PER_USD).round() as u64))
    }

    pub fn as_usd(self) -> f64 {
        self.0 as f64 / Self::PER_USD
    }

    pub fn saturating_sub(self, other: Self) -> Self {
        Self(self.0.saturating_sub(other.0))
    }
}

impl fmt::Display for NanoUsd {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "${:.6}", self.as_usd())
    }
}

/// Prices of one model, per million tokens, in the exact unit the ledger uses.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Prices {
    /// Nano-dollars per input token (= dollars per million tokens x 1000).
    pub input: u64,
    pub output: u64,
    /// Input tokens the provider served from its prompt cache.
    pub cached_input: u64,
}

impl Prices {
    /// From dollars per million tokens.
    pub fn per_million(input: f64, output: f64, cached_input: f64) -> Option<Self> {
        let each = |usd: f64| NanoUsd::from_usd(usd).map(|n| n.0 / 1_000_000);
        Some(Self { input: each(input)?, output: each(output)?, cached_input: each(cached_input)? })
    }

    /// What `tokens` cost: cached input at the cached price, the rest of the input and all output
    /// at theirs.
    pub fn cost(&self, tokens: &TokenCounts) -> NanoUsd {
        let cached = tokens.cached_input.min(tokens.input);
        NanoUsd(
            (tokens.input - cached).saturating_mul(self.input)
                + cached.saturating_mul(self.cached_input)
                + tokens.output.saturating_mul(self.output),
        )
    }
}

/// Tokens of one call or of many, as the upstream reported them.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct TokenCounts {
    pub input: u64,
    pub output: u64,
    /// Part of `input` served from the provider's prompt cache.
    pub cached_input: u64,
    /// Part of `output` spent on reasoning.
    pub reasoning: u64,
}

impl TokenCounts {
    pub fn total(&self) -> u64 {
        self.input + self.output
    }
}

/// The most a job may spend; `None` is no limit of that kind. `max_turns` caps its calls.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct Budget {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_cost: Option<NanoUsd>,
}

impl Budget {
    pub fn is_unlimited(&self) -> bool {
        self.max_tokens.is_none() && self.max_cost.is_none()
    }

    /// Each limit of `self`, or `fallback`'s where `self` sets none.
    pub fn or(self, fallback: Budget) -> Budget {
        Budget { max_tokens: self.max_tokens.or(fallback.max_tokens), max_cost: self.max_cost.or(fallback.max_cost) }
    }

    /// The limits of `self` that exceed `ceiling`, named for an error message.
    pub fn exceeds(&self, ceiling: &Budget) -> Option<String> {
        if let (Some(asked), Some(most)) = (self.max_tokens, ceiling.max_tokens)
            && asked > most
        {
            return Some(format!("budget.max_tokens {asked} is above this tenant's ceiling of {most}"));
        }
        if let (Some(asked), Some(most)) = (self.max_cost, ceiling.max_cost)
            && asked > most
        {
            return Some(format!("budget.max_cost_usd {asked} is above this tenant's ceiling of {most}"));
        }
        None
    }
}

/// Why the gateway refused a job's call; the job's final reason when it stopped because of it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Refusal {
    /// The job's token budget cannot pay for the call.
    JobTokens,
    /// The job's cost budget cannot pay for the call.
    JobCost,
    /// The tenant's spend limit for the day is reached.
    TenantDailySpend,
    /// The job made `max_turns` calls already.
    CallCap,
    /// Too many of the job's calls are in flight at once.
    InFlight,
}

impl Refusal {
    pub const ALL: [Refusal; 5] =
        [Self::JobTokens, Self::JobCost, Self::TenantDailySpend, Self::CallCap, Self::InFlight];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::JobTokens => "job_tokens",
            Self::JobCost => "job_cost",
            Self::TenantDailySpend => "tenant_daily_spend",
            Self::CallCap => "call_cap",
            Self::InFlight => "in_flight",
        }
    }

    pub fn parse(text: &str) -> Option<Self> {
        Self::ALL.into_iter().find(|r| r.as_str() == text)
    }
}

/// What a job has spent on model calls so far, and what its budget has left.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct JobUsage {
    /// Calls forwarded to a provider (refused calls are not counted).
    pub model_calls: u64,
    pub tokens: TokenCounts,
    pub cost: NanoUsd,
    /// Tokens the budget has left, when it limits tokens.
    pub tokens_left: Option<u64>,
    pub cost_left: Option<NanoUsd>,
    /// The first refusal the gateway gave the job, if any.
    pub refused: Option<Refusal>,
}

/// Spend of one tenant on one model on one UTC day (settled calls), for chargeback.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DailySpend {
    pub tenant: String,
    pub model: String,
    /// `YYYY-MM-DD`.
    pub day: String,
    pub calls: u64,
    pub tokens: TokenCounts,
    pub cost: NanoUsd,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prices_are_exact_in_nano_dollars() {
        let prices = Prices::per_million(2.5, 10.0, 1.25).unwrap();
        assert_eq!(prices, Prices { input: 2500, output: 10_000, cached_input: 1250 });
        let tokens = TokenCounts { input: 1000, output: 100, cached_input: 400, reasoning: 0 };
        // 600 x 2500 + 400 x 1250 + 100 x 10000
        assert_eq!(prices.cost(&tokens), NanoUsd(3_000_000));
        assert_eq!(NanoUsd(3_000_000).as_usd(), 0.003);
    }

    #[test]
    fn bad_amounts_are_refused() {
        assert_eq!(NanoUsd::from_usd(-1.0), None);
        assert_eq!(NanoUsd::from_usd(f64::NAN), None);
        assert_eq!(NanoUsd::from_usd(0.25), Some(NanoUsd(250_000_000)));
    }

    #[test]
    fn a_budget_above_the_ceiling_names_the_limit() {
        let ceiling = Budget { max_tokens: Some(1000), max_cost: None };
        assert!(Budget { max_tokens: Some(1001), max_cost: None }.exceeds(&ceiling).unwrap().contains("max_tokens"));
        assert_eq!(Budget { max_tokens: Some(1000), max_cost: Some(NanoUsd(5)) }.exceeds(&ceiling), None);
    }
}
