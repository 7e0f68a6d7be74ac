//! `[budget]`: what one session, and one user per day, may spend (model tokens, session minutes,
//! tool calls), and what happens when a limit is reached (see [`crate::session::budget`]).
//!
//! The same shape is the per-character override (`[characters.budget]`): a limit a character
//! sets replaces the global one; a limit it leaves unset keeps the global one.

use serde::{Deserialize, Serialize};

use super::{ConfigError, Section, env, err};

/// What a session does when it reaches a limit.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Deserialize, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OnLimit {
    /// The client gets `budget.exceeded`, then the session ends (`end_reason` `budget_exceeded`);
    /// an agent reply being spoken is cut there and its heard part stored.
    #[default]
    End,
    /// The client gets `budget.exceeded` and the session stays connected, but the character no
    /// longer answers: user audio, typed text and reply requests stop reaching the model (typed
    /// text gets an `error` `budget_exceeded`), and tool calls past the limit are refused.
    Degrade,
}

impl OnLimit {
    /// The wire name (`end`, `degrade`).
    pub fn as_str(self) -> &'static str {
        match self {
            OnLimit::End => "end",
            OnLimit::Degrade => "degrade",
        }
    }
}

/// Limits; every one optional (unset or 0: no limit).
#[derive(Debug, Clone, Default, PartialEq, Deserialize, Serialize)]
#[serde(deny_unknown_fields, default)]
pub struct BudgetLimits {
    /// Model tokens per session (`KOTODAMA_BUDGET_TOKENS`): the provider's reported usage where
    /// it reports it (OpenAI Realtime `response.done.usage.total_tokens`), else an estimate of
    /// one token per 4 bytes of transcript text (OpenAI's rule of thumb for English).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tokens: Option<u64>,
    /// Session minutes (`KOTODAMA_BUDGET_MINUTES`; fractions allowed, e.g. `0.5`), counted from
    /// the session's start.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub minutes: Option<f64>,
    /// Tool calls per session (`KOTODAMA_BUDGET_TOOL_CALLS`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tool_calls: Option<u64>,
    /// Model tokens per user per UTC day (`KOTODAMA_BUDGET_USER_TOKENS_PER_DAY`), over the user's
    /// ended sessions of the day plus the live one. Sessions without a user id are not counted.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_tokens_per_day: Option<u64>,
    /// Session minutes per user per UTC day (`KOTODAMA_BUDGET_USER_MINUTES_PER_DAY`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_minutes_per_day: Option<f64>,
    /// Tool calls per user per UTC day (`KOTODAMA_BUDGET_USER_TOOL_CALLS_PER_DAY`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user_tool_calls_per_day: Option<u64>,
    /// What reaching a limit does (`KOTODAMA_BUDGET_ON_LIMIT`: `end`, default, or `degrade`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub on_limit: Option<OnLimit>,
}

impl BudgetLimits {
    /// These limits with `over`'s set ones replacing them (a character's override).
    pub fn overridden_by(&self, over: Option<&BudgetLimits>) -> BudgetLimits {
        let Some(o) = over else { return self.clone() };
        BudgetLimits {
            tokens: o.tokens.or(self.tokens),
            minutes: o.minutes.or(self.minutes),
            tool_calls: o.tool_calls.or(self.tool_calls),
            user_tokens_per_day: o.user_tokens_per_day.or(self.user_tokens_per_day),
            user_minutes_per_day: o.user_minutes_per_day.or(self.user_minutes_per_day),
            user_tool_calls_per_day: o.user_tool_calls_per_day.or(self.user_tool_calls_per_day),
            on_limit: o.on_limit.or(self.on_limit),
        }
    }

    /// Whether any per-user daily limit is set (the store is asked for the day's usage).
    pub fn has_user_limits(&self) -> bool {
        on(self.user_tokens_per_day).is_some()
            || on_minutes(self.user_minutes_per_day).is_some()
            || on(self.user_tool_calls_per_day).is_some()
    }

    /// Check the values (`key` prefixes the error's key: `budget`, `characters.<id>.budget`).
    pub fn check(&self, key: &str) -> Result<(), ConfigError> {
        for (name, m) in [("minutes", self.minutes), ("user_minutes_per_day", self.user_minutes_per_day)] {
            if let Some(m) = m
                && !(m.is_finite() && m >= 0.0)
            {
                return Err(err(
                    &format!("{key}.{name}"),
                    format!("`{m}` is not a number of minutes"),
                    "use e.g. 30 or 0.5",
                ));
            }
        }
        Ok(())
    }
}

/// A count limit that is on (`0` is off).
pub fn on(limit: Option<u64>) -> Option<u64> {
    limit.filter(|n| *n > 0)
}

/// A minutes limit that is on (`0` is off).
pub fn on_minutes(limit: Option<f64>) -> Option<f64> {
    limit.filter(|m| *m > 0.0)
}

impl Section for BudgetLimits {
    fn apply_env(&mut self, get: &dyn Fn(&str) -> Option<String>) -> Result<(), ConfigError> {
        let count = |key: &str| env::parse::<u64>(get, key, "a whole number", "e.g. 20000 (0: no limit)");
        let minutes = |key: &str| env::parse::<f64>(get, key, "a number of minutes", "e.g. 30 or 0.5 (0: no limit)");
        if let Some(v) = count("KOTODAMA_BUDGET_TOKENS")? {
            self.tokens = Some(v);
        }
        if let Some(v) = minutes("KOTODAMA_BUDGET_MINUTES")? {
            self.minutes = Some(v);
        }
        if let Some(v) = count("KOTODAMA_BUDGET_TOOL_CALLS")? {
            self.tool_calls = Some(v);
        }
        if let Some(v) = count("KOTODAMA_BUDGET_USER_TOKENS_PER_DAY")? {
            self.user_tokens_per_day = Some(v);
        }
        if let Some(v) = minutes("KOTODAMA_BUDGET_USER_MINUTES_PER_DAY")? {
            self.user_minutes_per_day = Some(v);
        }
        if let Some(v) = count("KOTODAMA_BUDGET_USER_TOOL_CALLS_PER_DAY")? {
            self.user_tool_calls_per_day = Some(v);
        }
        if let Some(v) = env::value(get, "KOTODAMA_BUDGET_ON_LIMIT") {
            self.on_limit = Some(match v.as_str() {
                "end" => OnLimit::End,
                "degrade" => OnLimit::Degrade,
                other => {
                    return Err(err(
                        "KOTODAMA_BUDGET_ON_LIMIT",
                        format!("`{other}` is not an action"),
                        "use end or degrade",
                    ));
                }
            });
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        self.check("budget")
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::tests::env as table;

    #[test]
    fn environment_sets_limits_and_bad_values_name_the_variable() {
        let mut b = BudgetLimits::default();
        b.apply_env(&table(&[
            ("KOTODAMA_BUDGET_TOKENS", "5000"),
            ("KOTODAMA_BUDGET_MINUTES", "0.5"),
            ("KOTODAMA_BUDGET_USER_TOOL_CALLS_PER_DAY", "7"),
            ("KOTODAMA_BUDGET_ON_LIMIT", "degrade"),
        ]))
        .unwrap();
        assert_eq!((b.tokens, b.minutes, b.user_tool_calls_per_day), (Some(5000), Some(0.5), Some(7)));
        assert_eq!(b.on_limit, Some(OnLimit::Degrade));
        assert!(b.has_user_limits());
        let e = BudgetLimits::default().apply_env(&table(&[("KOTODAMA_BUDGET_TOKENS", "lots")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_BUDGET_TOKENS");
        let e = BudgetLimits::default().apply_env(&table(&[("KOTODAMA_BUDGET_ON_LIMIT", "explode")])).unwrap_err();
        assert_eq!(e.key, "KOTODAMA_BUDGET_ON_LIMIT");
        let bad = BudgetLimits { minutes: Some(-1.0), ..Default::default() };
        assert_eq!(bad.validate().unwrap_err().key, "budget.minutes");
    }

    #[test]
    fn a_character_overrides_only_what_it_sets() {
        let global = BudgetLimits { tokens: Some(100), tool_calls: Some(3), ..Default::default() };
        let character = BudgetLimits { tokens: Some(10), on_limit: Some(OnLimit::Degrade), ..Default::default() };
        let b = global.overridden_by(Some(&character));
        assert_eq!((b.tokens, b.tool_calls, b.on_limit), (Some(10), Some(3), Some(OnLimit::Degrade)));
        assert_eq!(global.overridden_by(None), global);
        assert!(!b.has_user_limits());
    }
}
