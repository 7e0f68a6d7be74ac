//! The moderation endpoint on the speech-to-speech path: a layer around a provider session that
//! asks the policy's OpenAI-compatible `/v1/moderations` endpoint about text before the session
//! sees it.
//!
//! The session core checks the local lists synchronously; an endpoint answers asynchronously, so
//! for providers that do not check text themselves ([`crate::providers::RealtimeProvider::moderates_text`]
//! false: OpenAI Realtime, Gemini Live, Nova Sonic) this layer sits between the provider and the
//! core:
//! - agent transcripts are checked sentence by sentence (the same [`super::sentence_end`]); a
//!   transcript event and every non-audio event after it are held until its check is answered
//!   (audio keeps flowing, so playout never starves). A flagged sentence becomes
//!   [`ProviderEvent::Moderated`] with `replaced: false`: the core cuts the reply where the
//!   user is (barge-in mechanism) and has the fallback said; later text of that item is dropped.
//!   Because the audio runs on while the endpoint thinks, up to one answer's latency (at most
//!   `timeout_ms`) of the flagged sentence's audio may be heard before the cut; its text never.
//! - with `check_user_input`, final user transcripts are checked the same way (a flag cancels
//!   the reply the model began and replaces it: the model heard the audio, but no reply to it
//!   is heard), and typed text ([`ProviderCommand::Text`]) is checked before it is sent: a
//!   flagged one never reaches the model.
//!
//! A failed or late answer follows the policy's `fail_closed` (see [`Moderator::check_endpoint`]).

use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use futures::stream::{FuturesOrdered, StreamExt};
use tokio::sync::mpsc;

use super::{Moderator, Source, Verdict};
use crate::providers::{ProviderCommand, ProviderEvent, ProviderSession, Speaker};

/// Capacity of the layer's channels (events are mostly audio; the same order as the providers').
const CHANNEL_CAPACITY: usize = 256;

/// `inner` behind the endpoint checks of `moderator` (returned unchanged when it has no endpoint).
pub fn guard(inner: ProviderSession, moderator: Arc<Moderator>) -> ProviderSession {
    if !moderator.has_endpoint() {
        return inner;
    }
    let (commands_tx, commands_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let (events_tx, events_rx) = mpsc::channel(CHANNEL_CAPACITY);
    let fallback_asked = Arc::new(AtomicBool::new(false));
    let commands = Commands {
        to: inner.commands,
        events: events_tx.downgrade(),
        moderator: Arc::clone(&moderator),
        fallback_asked: Arc::clone(&fallback_asked),
    };
    tokio::spawn(commands.run(commands_rx));
    let events = Events {
        moderator,
        fallback_asked,
        trusted: HashSet::new(),
        out: events_tx,
        held: VecDeque::new(),
        checks: FuturesOrdered::new(),
        checked: HashMap::new(),
        cut: HashSet::new(),
    };
    tokio::spawn(events.run(inner.events));
    ProviderSession { commands: commands_tx, events: events_rx }
}

/// Commands to the provider; typed user text is checked first when the policy says so.
struct Commands {
    to: mpsc::Sender<ProviderCommand>,
    /// Weak: the session's event stream ends when the provider's does.
    events: mpsc::WeakSender<ProviderEvent>,
    moderator: Arc<Moderator>,
    /// Set when the session asks for the fallback line: that reply is the operator's words and
    /// is not checked (a fail-closed endpoint that is down would flag it again and again).
    fallback_asked: Arc<AtomicBool>,
}

impl Commands {
    async fn run(self, mut from: mpsc::Receiver<ProviderCommand>) {
        while let Some(cmd) = from.recv().await {
            if let ProviderCommand::Text(text) = &cmd
                && self.moderator.checks_user_input()
                && let Some(v) = self.moderator.check_endpoint(text).await
            {
                let ev = flagged(&self.moderator, String::new(), v, text.trim().to_owned(), Source::User);
                match self.events.upgrade() {
                    Some(events) if events.send(ev).await.is_ok() => continue,
                    _ => return,
                }
            }
            if let ProviderCommand::GenerateReply { instructions: Some(i) } = &cmd
                && i.contains(self.moderator.fallback())
            {
                self.fallback_asked.store(true, Ordering::Release);
            }
            if self.to.send(cmd).await.is_err() {
                return;
            }
        }
    }
}

fn flagged(moderator: &Moderator, item_id: String, v: Verdict, text: String, source: Source) -> ProviderEvent {
    ProviderEvent::Moderated {
        item_id,
        category: v.category,
        text,
        policy_version: moderator.version().to_owned(),
        source,
        replaced: false,
    }
}

/// A held event, or the place of a pending check (answered in order by `checks`).
enum Held {
    Event(ProviderEvent),
    Check { item_id: String, text: String, source: Source },
}

type Check = futures::future::BoxFuture<'static, Option<Verdict>>;

struct Events {
    moderator: Arc<Moderator>,
    /// See [`Commands::fallback_asked`]: the next new agent item is trusted.
    fallback_asked: Arc<AtomicBool>,
    /// Agent items that are the fallback line.
    trusted: HashSet<String>,
    out: mpsc::Sender<ProviderEvent>,
    /// Non-empty only while a check is pending; its front is then a [`Held::Check`].
    held: VecDeque<Held>,
    checks: FuturesOrdered<Check>,
    /// Bytes of each agent item's cumulative text already sent for checking.
    checked: HashMap<String, usize>,
    /// Items flagged: their later text is dropped.
    cut: HashSet<String>,
}

impl Events {
    async fn run(mut self, mut from: mpsc::Receiver<ProviderEvent>) {
        loop {
            tokio::select! {
                ev = from.recv() => match ev {
                    Some(ev) => {
                        if !self.on_event(ev).await {
                            return;
                        }
                    }
                    None => break,
                },
                Some(verdict) = self.checks.next(), if !self.checks.is_empty() => {
                    if !self.on_verdict(verdict).await {
                        return;
                    }
                }
            }
        }
        // The provider is gone: answer what is pending, then close.
        while let Some(verdict) = self.checks.next().await {
            if !self.on_verdict(verdict).await {
                return;
            }
        }
    }

    /// The next part of `ev`'s text to check, if any.
    fn to_check(&mut self, ev: &ProviderEvent) -> Option<(String, String, Source)> {
        let ProviderEvent::Transcript { speaker, item_id, text, is_final } = ev else { return None };
        match speaker {
            Speaker::Agent if self.trusted.contains(item_id) => None,
            Speaker::Agent
                if !self.checked.contains_key(item_id) && self.fallback_asked.swap(false, Ordering::AcqRel) =>
            {
                self.trusted.insert(item_id.clone());
                None
            }
            Speaker::Agent => {
                let done = *self.checked.entry(item_id.clone()).or_insert(0);
                let end = if *is_final { text.len() } else { super::sentence_end(text)? };
                let fresh = text.get(done.min(end)..end).filter(|t| !t.trim().is_empty())?.to_owned();
                self.checked.insert(item_id.clone(), end);
                Some((item_id.clone(), fresh, Source::Agent))
            }
            Speaker::User if *is_final && self.moderator.checks_user_input() => {
                Some((item_id.clone(), text.clone(), Source::User))
            }
            Speaker::User => None,
        }
    }

    async fn on_event(&mut self, ev: ProviderEvent) -> bool {
        if let ProviderEvent::Transcript { item_id, .. } = &ev
            && self.cut.contains(item_id)
        {
            return true;
        }
        if let Some((item_id, text, source)) = self.to_check(&ev) {
            let moderator = Arc::clone(&self.moderator);
            let check = text.clone();
            self.checks.push_back(Box::pin(async move { moderator.check_endpoint(&check).await }));
            self.held.push_back(Held::Check { item_id, text, source });
        }
        let audio = matches!(ev, ProviderEvent::AudioDelta { .. });
        if self.held.is_empty() || audio {
            return self.out.send(ev).await.is_ok();
        }
        self.held.push_back(Held::Event(ev));
        true
    }

    /// The oldest pending check answered: release what waited on it, up to the next check.
    async fn on_verdict(&mut self, verdict: Option<Verdict>) -> bool {
        if let Some(Held::Check { item_id, text, source }) = self.held.pop_front()
            && let Some(v) = verdict
            && !self.cut.contains(&item_id)
        {
            tracing::info!(item_id = %item_id, category = %v.category, source = source.as_str(), "moderation endpoint flagged text");
            self.cut.insert(item_id.clone());
            // Held text of the flagged item is dropped (checks of it still answer in order).
            self.held
                .retain(|h| !matches!(h, Held::Event(ProviderEvent::Transcript { item_id: i, .. }) if *i == item_id));
            if self.out.send(flagged(&self.moderator, item_id, v, text.trim().to_owned(), source)).await.is_err() {
                return false;
            }
        }
        while let Some(Held::Event(_)) = self.held.front() {
            let Some(Held::Event(ev)) = self.held.pop_front() else { break };
            if self.out.send(ev).await.is_err() {
                return false;
            }
        }
        true
    }
}
