//! Budgets of one live session, sans-IO: model tokens, session time and tool calls, each capped
//! per session and per user per UTC day ([`crate::config::budget`]).
//!
//! The builder makes a [`BudgetPlan`] at the start of a session from the configured limits (the
//! character's overriding the global ones) and the user's usage so far today (the store's
//! `session_usage` rows, [`UsageTotals`]): each kind's cap on *this* session is the smaller of the
//! per-session limit and what is left of the user's day. The conversation core
//! ([`super::conversation`]) keeps a [`Budget`] from it, feeds it usage and asks it on every input
//! whether a cap was reached ([`Budget::check`]); the first cap reached is reported once
//! (`budget.exceeded`) and the session ends or degrades ([`OnLimit`]).
//!
//! Tokens: the provider's reported usage where it reports it ([`crate::providers::ProviderEvent::Usage`],
//! OpenAI Realtime's `response.done.usage.total_tokens`); from a provider that never reports,
//! an estimate of one token per [`BYTES_PER_TOKEN`] bytes of every final user and agent turn
//! ("one token is about 4 characters of English text", OpenAI's tokenizer guide). Once a report
//! arrived, only reports count. Time: media time since the session started. Tool calls: counted
//! where tools run ([`ToolCallCounter`], shared with the session's tool registry), which also
//! refuses calls past the cap so a model can never exceed it.
//!
//! A user's live sessions on one node share their daily token budget ([`UserTokens`]): each adds
//! what it uses to the user's counter and checks the daily cap against the counter, so two
//! concurrent sessions cannot each spend the whole day's tokens. (Across nodes the day is shared
//! through the store only, as sessions end.)

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use signaling::events::ServerEvent;

pub use crate::config::budget::OnLimit;
use crate::config::budget::{BudgetLimits, on, on_minutes};

/// Bytes of transcript text per estimated token (OpenAI: "one token generally corresponds to ~4
/// characters of text for common English text").
pub const BYTES_PER_TOKEN: u64 = 4;

/// Which budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// Model tokens.
    Tokens,
    /// Session time.
    Minutes,
    /// Tool calls.
    ToolCalls,
}

impl Kind {
    /// The wire name (`budget.exceeded.kind`).
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Tokens => "tokens",
            Kind::Minutes => "minutes",
            Kind::ToolCalls => "tool_calls",
        }
    }

    /// The unit of `limit`/`used` in `budget.exceeded`.
    pub fn unit(self) -> &'static str {
        match self {
            Kind::Tokens => "tokens",
            Kind::Minutes => "seconds",
            Kind::ToolCalls => "calls",
        }
    }
}

/// Whose budget set a cap.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The per-session limit.
    Session,
    /// What was left of the user's daily limit.
    UserDay,
}

impl Scope {
    /// The wire name (`budget.exceeded.scope`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Session => "session",
            Scope::UserDay => "user_day",
        }
    }
}

/// What one user used today before this session (from the store), or what one session used.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct UsageTotals {
    /// Model tokens (reported or estimated).
    pub tokens: u64,
    /// Session time, milliseconds.
    pub duration_ms: u64,
    /// Tool calls made.
    pub tool_calls: u64,
}

/// One session's usage, stored when it ends (`session_usage`, migration 0007).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SessionUsage {
    /// What was used.
    pub totals: UsageTotals,
    /// Whether `tokens` is the provider's report (false: the text estimate).
    pub tokens_reported: bool,
    /// The budget that was reached, if one was.
    pub exceeded: Option<Kind>,
}

/// One kind's cap on this session.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Cap {
    /// This session may use this much (in the kind's unit: tokens, ms, calls).
    pub max: u64,
    /// Which limit set it.
    pub scope: Scope,
    /// The limit as reported to the client (the daily one for `UserDay`), in the kind's unit.
    pub limit: u64,
    /// Used before this session under that limit (today's usage for `UserDay`, else 0).
    pub before: u64,
}

impl Cap {
    /// The smaller of a per-session limit and what `used_today` leaves of a daily one.
    fn of(session: Option<u64>, daily: Option<u64>, used_today: u64) -> Option<Cap> {
        let s = session.map(|max| Cap { max, scope: Scope::Session, limit: max, before: 0 });
        let d = daily.map(|limit| Cap {
            max: limit.saturating_sub(used_today),
            scope: Scope::UserDay,
            limit,
            before: used_today,
        });
        match (s, d) {
            (Some(s), Some(d)) => Some(if d.max < s.max { d } else { s }),
            (s, d) => s.or(d),
        }
    }
}

/// Tool calls of one session: counted and capped where tools run, read by the core.
#[derive(Debug)]
pub struct ToolCallCounter {
    cap: Option<Cap>,
    calls: AtomicU64,
    refused: AtomicU64,
}

impl ToolCallCounter {
    /// A counter with an optional cap.
    pub fn new(cap: Option<Cap>) -> Self {
        Self { cap, calls: AtomicU64::new(0), refused: AtomicU64::new(0) }
    }

    /// Count one call; false (and counted as refused) when the cap is used up.
    pub fn try_call(&self) -> bool {
        let max = self.cap.map_or(u64::MAX, |c| c.max);
        let admitted = self.calls.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| (n < max).then_some(n + 1));
        if admitted.is_err() {
            self.refused.fetch_add(1, Ordering::Relaxed);
        }
        admitted.is_ok()
    }

    /// Calls made.
    pub fn calls(&self) -> u64 {
        self.calls.load(Ordering::Relaxed)
    }

    /// Calls refused for the cap.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }
}

/// The tokens one user used today, shared by that user's live sessions on this node: the store's
/// count when the first of them started, plus what each of them (live or ended since) used.
#[derive(Debug)]
pub struct UserTokens {
    used: AtomicU64,
}

impl UserTokens {
    /// A counter starting at `stored` (the user's tokens of ended sessions today).
    pub fn new(stored: u64) -> Self {
        Self { used: AtomicU64::new(stored) }
    }

    /// The user's tokens today.
    pub fn total(&self) -> u64 {
        self.used.load(Ordering::Relaxed)
    }

    fn adjust(&self, from: u64, to: u64) {
        if to >= from {
            self.used.fetch_add(to - from, Ordering::Relaxed);
        } else {
            let less = from - to;
            let _ = self.used.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| Some(n.saturating_sub(less)));
        }
    }
}

/// The caps of one session, made at its start.
#[derive(Debug, Clone)]
pub struct BudgetPlan {
    /// Token cap.
    pub tokens: Option<Cap>,
    /// The user's daily token cap checked against the counter the user's live sessions share
    /// (then `tokens` is the per-session cap only).
    pub user_tokens: Option<(Cap, Arc<UserTokens>)>,
    /// Time cap (milliseconds).
    pub minutes: Option<Cap>,
    /// Tool calls, counted (and capped) by the session's tool registry.
    pub tool_calls: Arc<ToolCallCounter>,
    /// What reaching a cap does.
    pub on_limit: OnLimit,
}

fn minutes_ms(m: Option<f64>) -> Option<u64> {
    on_minutes(m).map(|m| (m * 60_000.0).round() as u64)
}

impl BudgetPlan {
    /// No caps: usage is only counted.
    pub fn unlimited() -> BudgetPlan {
        BudgetPlan {
            tokens: None,
            user_tokens: None,
            minutes: None,
            tool_calls: Arc::new(ToolCallCounter::new(None)),
            on_limit: OnLimit::End,
        }
    }

    /// Whether any cap applies.
    pub fn is_limited(&self) -> bool {
        self.tokens.is_some() || self.user_tokens.is_some() || self.minutes.is_some() || self.tool_calls.cap.is_some()
    }

    /// The plan for `limits` (already merged with the character's) given what the user used
    /// today before this session (`None`: no user id, daily limits do not apply); with no limit
    /// set, [`BudgetPlan::unlimited`].
    pub fn new(limits: &BudgetLimits, today: Option<UsageTotals>) -> BudgetPlan {
        let t = today.unwrap_or_default();
        let daily = |limit| if today.is_some() { limit } else { None };
        let tokens = Cap::of(on(limits.tokens), daily(on(limits.user_tokens_per_day)), t.tokens);
        let minutes =
            Cap::of(minutes_ms(limits.minutes), daily(minutes_ms(limits.user_minutes_per_day)), t.duration_ms);
        let tools = Cap::of(on(limits.tool_calls), daily(on(limits.user_tool_calls_per_day)), t.tool_calls);
        BudgetPlan {
            tokens,
            user_tokens: None,
            minutes,
            tool_calls: Arc::new(ToolCallCounter::new(tools)),
            on_limit: limits.on_limit.unwrap_or_default(),
        }
    }

    /// [`Self::new`] for a session whose user's daily tokens are counted in `shared` (with
    /// the user's other live sessions): the daily token cap is checked against it.
    pub fn shared(limits: &BudgetLimits, today: UsageTotals, shared: Arc<UserTokens>) -> BudgetPlan {
        let mut plan = Self::new(limits, Some(today));
        if let Some(limit) = on(limits.user_tokens_per_day) {
            plan.tokens = Cap::of(on(limits.tokens), None, 0);
            plan.user_tokens = Some((Cap { max: limit, scope: Scope::UserDay, limit, before: 0 }, shared));
        }
        plan
    }
}

/// A cap that was reached.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Exceeded {
    /// Which budget.
    pub kind: Kind,
    /// Whose.
    pub scope: Scope,
    /// The limit (the kind's unit; seconds for time).
    pub limit: u64,
    /// Used (same unit), counting what was used before this session under a daily limit.
    pub used: u64,
    /// What happens now.
    pub action: OnLimit,
}

impl Exceeded {
    /// The client's `budget.exceeded` event.
    pub fn event(&self) -> ServerEvent {
        ServerEvent::BudgetExceeded {
            kind: self.kind.as_str().into(),
            scope: self.scope.as_str().into(),
            limit: self.limit,
            used: self.used,
            unit: self.kind.unit().into(),
            action: self.action.as_str().into(),
        }
    }
}

/// A session's budget state (owned by the conversation core).
#[derive(Debug)]
pub struct Budget {
    plan: BudgetPlan,
    reported_tokens: u64,
    estimated_tokens: u64,
    provider_reports: bool,
    exceeded: Option<Exceeded>,
    /// This session's tokens already added to the user's shared counter.
    shared_tokens: u64,
}

impl Budget {
    /// Budget state at the session's start.
    pub fn new(plan: BudgetPlan) -> Self {
        Self {
            plan,
            reported_tokens: 0,
            estimated_tokens: 0,
            provider_reports: false,
            exceeded: None,
            shared_tokens: 0,
        }
    }

    /// The provider reported `tokens` more (one response's usage).
    pub fn on_reported(&mut self, tokens: u64) {
        self.provider_reports = true;
        self.reported_tokens = self.reported_tokens.saturating_add(tokens);
    }

    /// A final turn's text (the estimate, used while the provider reports nothing).
    pub fn on_text(&mut self, text: &str) {
        self.estimated_tokens = self.estimated_tokens.saturating_add((text.len() as u64).div_ceil(BYTES_PER_TOKEN));
    }

    /// Tokens used so far.
    pub fn tokens(&self) -> u64 {
        if self.provider_reports { self.reported_tokens } else { self.estimated_tokens }
    }

    /// When the time cap is reached (media time), while none was reached yet.
    pub fn deadline(&self) -> Option<Duration> {
        let cap = self.plan.minutes.filter(|_| self.exceeded.is_none())?;
        Some(Duration::from_millis(cap.max))
    }

    /// The cap reached at `now`, once (later calls: `None`).
    pub fn check(&mut self, now: Duration) -> Option<Exceeded> {
        if self.exceeded.is_some() {
            return None;
        }
        let action = self.plan.on_limit;
        let hit = |kind: Kind, cap: Cap, used: u64, scale: u64| Exceeded {
            kind,
            scope: cap.scope,
            limit: cap.limit / scale,
            used: (cap.before + used) / scale,
            action,
        };
        let tokens = self.tokens();
        let user_total = self.plan.user_tokens.as_ref().map(|(cap, shared)| {
            shared.adjust(self.shared_tokens, tokens);
            (*cap, shared.total())
        });
        self.shared_tokens = tokens;
        let elapsed = now.as_millis() as u64;
        let tools = &self.plan.tool_calls;
        let found = if let Some(c) = self.plan.tokens.filter(|c| tokens >= c.max) {
            Some(hit(Kind::Tokens, c, tokens, 1))
        } else if let Some((c, total)) = user_total.filter(|(c, total)| *total >= c.max) {
            Some(hit(Kind::Tokens, c, total, 1))
        } else if let Some(c) = self.plan.minutes.filter(|c| elapsed >= c.max) {
            Some(hit(Kind::Minutes, c, elapsed, 1000))
        } else {
            tools.cap.filter(|_| tools.refused() > 0).map(|c| hit(Kind::ToolCalls, c, tools.calls(), 1))
        };
        self.exceeded = found;
        found
    }

    /// Whether a cap was reached.
    pub fn exceeded(&self) -> Option<Exceeded> {
        self.exceeded
    }

    /// What this session used by media time `now`.
    pub fn usage(&self, now: Duration) -> SessionUsage {
        SessionUsage {
            totals: UsageTotals {
                tokens: self.tokens(),
                duration_ms: now.as_millis() as u64,
                tool_calls: self.plan.tool_calls.calls(),
            },
            tokens_reported: self.provider_reports,
            exceeded: self.exceeded.map(|e| e.kind),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> BudgetLimits {
        BudgetLimits::default()
    }

    #[test]
    fn the_smaller_of_the_session_limit_and_the_users_remaining_day_caps_the_session() {
        let l = BudgetLimits { tokens: Some(1000), user_tokens_per_day: Some(1500), ..limits() };
        let today = UsageTotals { tokens: 1200, ..Default::default() };
        let plan = BudgetPlan::new(&l, Some(today));
        assert_eq!(plan.tokens, Some(Cap { max: 300, scope: Scope::UserDay, limit: 1500, before: 1200 }));
        // Without a user id the daily limit does not apply.
        let plan = BudgetPlan::new(&l, None);
        assert_eq!(plan.tokens.unwrap().scope, Scope::Session);
        assert!(!BudgetPlan::new(&BudgetLimits { tokens: Some(0), ..limits() }, None).is_limited(), "0 is off");
    }

    #[test]
    fn reported_tokens_replace_the_estimate_and_the_cap_is_reported_once() {
        let plan = BudgetPlan::new(&BudgetLimits { tokens: Some(100), ..limits() }, None);
        let mut b = Budget::new(plan);
        b.on_text(&"a".repeat(40));
        assert_eq!(b.tokens(), 10);
        assert_eq!(b.check(Duration::ZERO), None);
        b.on_reported(60);
        assert_eq!(b.tokens(), 60, "a report replaces the estimate");
        b.on_reported(45);
        let e = b.check(Duration::ZERO).expect("105 >= 100");
        assert_eq!(
            (e.kind, e.scope, e.limit, e.used, e.action),
            (Kind::Tokens, Scope::Session, 100, 105, OnLimit::End)
        );
        assert_eq!(b.check(Duration::ZERO), None, "once");
        assert_eq!(b.usage(Duration::from_secs(3)).exceeded, Some(Kind::Tokens));
    }

    #[test]
    fn tool_calls_past_the_cap_are_refused_and_reach_the_budget() {
        let l = BudgetLimits { user_tool_calls_per_day: Some(3), on_limit: Some(OnLimit::Degrade), ..limits() };
        let plan = BudgetPlan::new(&l, Some(UsageTotals { tool_calls: 1, ..Default::default() }));
        let counter = Arc::clone(&plan.tool_calls);
        let mut b = Budget::new(plan);
        assert!(counter.try_call() && counter.try_call());
        assert_eq!(b.check(Duration::ZERO), None, "the cap is used, not exceeded");
        assert!(!counter.try_call());
        let e = b.check(Duration::ZERO).unwrap();
        assert_eq!(
            (e.kind, e.scope, e.limit, e.used, e.action),
            (Kind::ToolCalls, Scope::UserDay, 3, 3, OnLimit::Degrade)
        );
        assert_eq!(b.usage(Duration::ZERO).totals.tool_calls, 2);
    }

    #[test]
    fn a_users_live_sessions_share_the_daily_tokens() {
        let l = BudgetLimits { tokens: Some(1000), user_tokens_per_day: Some(500), ..limits() };
        let shared = Arc::new(UserTokens::new(100));
        let today = UsageTotals { tokens: 100, ..Default::default() };
        let mut a = Budget::new(BudgetPlan::shared(&l, today, Arc::clone(&shared)));
        let mut b = Budget::new(BudgetPlan::shared(&l, today, Arc::clone(&shared)));
        a.on_reported(250);
        assert_eq!(a.check(Duration::ZERO), None, "100 + 250 < 500");
        b.on_reported(100);
        assert_eq!(b.check(Duration::ZERO), None, "450 < 500");
        b.on_reported(60);
        let e = b.check(Duration::ZERO).expect("100 + 250 + 160 >= 500: the other session's tokens count");
        assert_eq!((e.kind, e.scope, e.limit, e.used), (Kind::Tokens, Scope::UserDay, 500, 510));
        assert_eq!(a.check(Duration::ZERO).map(|e| e.used), Some(510), "the first session is over the day too");
        assert_eq!(shared.total(), 510);
        let mut solo = Budget::new(BudgetPlan::shared(&BudgetLimits { tokens: Some(50), ..l }, today, shared));
        solo.on_reported(50);
        assert_eq!(solo.check(Duration::ZERO).map(|e| e.scope), Some(Scope::Session), "the session cap still holds");
    }

    #[test]
    fn time_has_a_deadline_in_media_time() {
        let plan = BudgetPlan::new(&BudgetLimits { minutes: Some(0.5), ..limits() }, None);
        let mut b = Budget::new(plan);
        assert_eq!(b.deadline(), Some(Duration::from_secs(30)));
        assert_eq!(b.check(Duration::from_secs(29)), None);
        let e = b.check(Duration::from_secs(30)).unwrap();
        assert_eq!((e.kind, e.limit, e.used, e.kind.unit()), (Kind::Minutes, 30, 30, "seconds"));
        assert_eq!(b.deadline(), None);
    }
}
