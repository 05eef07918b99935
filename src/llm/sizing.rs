//! How much of a job's budget one call may reserve.
//!
//! The input is bounded by its size: a token is at least one byte of the request, so the body's
//! length bounds the input tokens from above without a tokenizer. The output is bounded by
//! `max_tokens`, which the gateway clamps (or sets) to what the budget left can pay. The worst
//! case of the two is what is reserved.

use crate::jobs::{JobUsage, NanoUsd, Prices, Refusal};

/// What one call may use, and what is reserved for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CallSize {
    /// The `max_tokens` sent upstream.
    pub max_output_tokens: u64,
    pub reserved_tokens: u64,
    pub reserved_cost: NanoUsd,
}

/// Size a call of `input_bound` input tokens that asked for `requested` output tokens (or the
/// model's default), within what `usage` says the budget has left.
pub fn size(
    input_bound: u64,
    requested: Option<u64>,
    default_output: u64,
    prices: &Prices,
    usage: Option<&JobUsage>,
    budget: &crate::jobs::Budget,
) -> Result<CallSize, Refusal> {
    let mut output = requested.unwrap_or(default_output).max(1);
    let tokens_left = match usage {
        Some(usage) => usage.tokens_left,
        None => budget.max_tokens,
    };
    if let Some(left) = tokens_left {
        let room = left.checked_sub(input_bound).filter(|room| *room >= 1).ok_or(Refusal::JobTokens)?;
        output = output.min(room);
    }
    let cost_left = match usage {
        Some(usage) => usage.cost_left,
        None => budget.max_cost,
    };
    let input_cost = input_bound.saturating_mul(prices.input);
    if let Some(left) = cost_left {
        let room = left.0.checked_sub(input_cost).ok_or(Refusal::JobCost)?;
        if let Some(affordable) = room.checked_div(prices.output) {
            output = output.min(affordable);
        }
        if output == 0 {
            return Err(Refusal::JobCost);
        }
    }
    Ok(CallSize {
        max_output_tokens: output,
        reserved_tokens: input_bound + output,
        reserved_cost: NanoUsd(input_cost + output.saturating_mul(prices.output)),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::jobs::Budget;

    const PRICES: Prices = Prices { input: 1000, output: 4000, cached_input: 500 };

    #[test]
    fn without_limits_the_request_or_the_default_decides() {
        let none = Budget::default();
        assert_eq!(size(500, Some(100), 4096, &PRICES, None, &none).unwrap().max_output_tokens, 100);
        let call = size(500, None, 4096, &PRICES, None, &none).unwrap();
        assert_eq!(
            call,
            CallSize {
                max_output_tokens: 4096,
                reserved_tokens: 4596,
                reserved_cost: NanoUsd(500 * 1000 + 4096 * 4000)
            }
        );
    }

    #[test]
    fn max_tokens_is_clamped_to_what_the_budget_pays() {
        let budget = Budget { max_tokens: Some(1000), max_cost: None };
        assert_eq!(size(600, Some(800), 4096, &PRICES, None, &budget).unwrap().max_output_tokens, 400);
        let budget = Budget { max_tokens: None, max_cost: Some(NanoUsd(1_000_000)) };
        // 600 input tokens cost 600,000; 400,000 left buys 100 output tokens.
        assert_eq!(size(600, None, 4096, &PRICES, None, &budget).unwrap().max_output_tokens, 100);
    }

    #[test]
    fn a_call_the_budget_cannot_pay_is_refused_by_the_limit_that_fails() {
        let tokens = Budget { max_tokens: Some(600), max_cost: None };
        assert_eq!(size(600, None, 10, &PRICES, None, &tokens), Err(Refusal::JobTokens));
        let cost = Budget { max_tokens: None, max_cost: Some(NanoUsd(600_000 + 3_999)) };
        assert_eq!(size(600, None, 10, &PRICES, None, &cost), Err(Refusal::JobCost));
        let spent = JobUsage { tokens_left: Some(10), ..JobUsage::default() };
        assert_eq!(size(20, None, 10, &PRICES, Some(&spent), &tokens), Err(Refusal::JobTokens));
    }
}
