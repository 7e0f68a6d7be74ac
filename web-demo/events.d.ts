// Generated from signaling::events (the Rust schema) by signaling::codegen. Do not edit:
// run `KOTODAMA_BLESS=1 cargo test -p signaling --test codegen` after changing the schema.

/** The agent's conversational state. */
export type AgentState = "initializing" | "listening" | "thinking" | "speaking";

export type Emotion = "neutral" | "happy" | "sad" | "angry" | "surprised" | "fearful" | "disgusted" | "thinking" | "relaxed" | (string & {});

/** Who produced a piece of conversation. */
export type Role = "user" | "agent";

/** A tool the client declares and runs (OpenAI Realtime's function tool: `name`, `description`, JSON-schema `parameters`). */
export type ToolDeclaration = { description?: string; name: string; parameters?: unknown };

/** A mouth shape: the 15 Oculus/Meta Lipsync visemes, serialised with exactly these names. */
export type Viseme = "sil" | "PP" | "FF" | "TH" | "DD" | "kk" | "CH" | "SS" | "nn" | "RR" | "aa" | "E" | "ih" | "oh" | "ou";

/** Sent once, when the `events` channel opens: which session, protocol, character and provider. */
export interface SessionReadyEvent {
  type: "session.ready";
  /** Character id. */
  character: string;
  /** Always [`PROTOCOL_VERSION`] for this schema. */
  protocol: number;
  /** Provider name. */
  provider: string;
  /** The session is being recorded (audio and events, for replay and export; extension, sent only when true). */
  recording?: boolean;
  /** The session this channel belongs to. */
  session_id: string;
}

/** The agent's state changed. */
export interface StateEvent {
  type: "state";
  /** The new state. */
  state: AgentState;
}

/** Voice activity detection saw the user start speaking. */
export interface UserSpeechStartedEvent {
  type: "user.speech_started";
  /** Milliseconds since the session started. */
  at_ms: number;
}

/** Voice activity detection saw the user stop speaking. */
export interface UserSpeechStoppedEvent {
  type: "user.speech_stopped";
  /** Milliseconds since the session started. */
  at_ms: number;
}

/** Transcript of an utterance: partials carry the cumulative text (`final: false`), then exactly one final per utterance. */
export interface TranscriptEvent {
  type: "transcript";
  /** `true` exactly once per utterance, on the last message. */
  final: boolean;
  /** The conversation item (utterance) this text belongs to. */
  item_id: string;
  /** Who spoke. */
  role: Role;
  /** Cumulative text so far (or the final text). */
  text: string;
}

/** The character's emotion changed. */
export interface EmotionEvent {
  type: "emotion";
  /** The new emotion. */
  emotion: Emotion;
  /** The agent item the emotion belongs to, when known. */
  item_id?: string | null;
}

/** A mouth shape for lip sync, timed relative to the start of that item's audio. */
export interface VisemeEvent {
  type: "viseme";
  /** Duration in milliseconds. */
  duration_ms: number;
  /** The agent item whose audio this viseme belongs to. */
  item_id: string;
  /** Start, in milliseconds from the start of the item's audio. */
  start_ms: number;
  /** The mouth shape. */
  viseme: Viseme;
}

/** Barge-in cut the agent's speech; only `played_ms` of the item's audio was sent. */
export interface AgentInterruptedEvent {
  type: "agent.interrupted";
  /** The interrupted agent item. */
  item_id: string;
  /** Milliseconds of that item's audio that were actually played out. */
  played_ms: number;
}

/** Moderation stopped the agent's reply before it was spoken, or the user's text before it reached the model (extension): the audio was cut where the flagged sentence began (or the reply to the flagged user turn was cancelled) and the character's safe fallback line follows. The denied text is never sent, here or in any transcript. */
export interface ModerationEvent {
  type: "moderation";
  /** The policy category that matched (e.g. `deny`, `credentials`). */
  category: string;
  /** The agent item that was cut, or the user's item (`""` for typed text). */
  item_id: string;
  /** Whose text was flagged: `agent` or `user`. */
  source: string;
}

/** Something the client should know went wrong (e.g. a malformed client message). */
export interface ErrorEvent {
  type: "error";
  /** Machine-readable code, e.g. `bad_message`, `message_too_large`. */
  code: string;
  /** Human-readable explanation. */
  message: string;
}

/** Reply to a client `ping`. */
export interface PongEvent {
  type: "pong";
}

/** The character makes a gesture (extension of api-v1): `nod`, `wave`, `shrug`, ... as the model names it; released with the speech it accompanies. */
export interface GestureEvent {
  type: "gesture";
  /** The gesture's name. */
  gesture: string;
  /** The agent item it belongs to, when known. */
  item_id?: string | null;
}

/** The session is ending (extension of api-v1): sent just before the server closes the connection, so the client can tell a shutdown or a time limit from a network failure. */
export interface SessionEndedEvent {
  type: "session.ended";
  /** Why, as in `GET /v1/sessions/{id}`'s `end_reason` (e.g. `server_shutdown`, `max_duration`). */
  reason: string;
}

/** An external agent's result reached the session (extension, `POST /v1/sessions/{id}/agent-results`; N.E.K.O.'s `agent_notification`): it is in the model's context for the next turn, or spoken at once. */
export interface AgentNotificationEvent {
  type: "agent_notification";
  /** Which agent produced it (e.g. `browser-agent`). */
  source: string;
  /** Its status as the agent reports it (e.g. `completed`, `failed`). */
  status: string;
  /** The result. */
  text: string;
}

/** A translation of a final transcript for subtitles (extension, issue 15): sent after the `transcript` with `final: true` of `item_id` when the user's language differs from the character's and a translation endpoint is configured (`[translation]`). */
export interface TranscriptTranslationEvent {
  type: "transcript.translation";
  /** The item of the final transcript translated. */
  item_id: string;
  /** The language translated into (BCP 47 tag, e.g. `ja`): the user's. */
  language: string;
  /** Whose words (today: the agent's). */
  role: Role;
  /** The translated text. */
  text: string;
}

/** The session reached one of its budgets (extension): model tokens, session time or tool calls, per session or per user per day. With `action` `end` the session ends next (`session.ended {reason: "budget_exceeded"}`); with `degrade` it stays connected but the character no longer answers. */
export interface BudgetExceededEvent {
  type: "budget.exceeded";
  /** What happens now: `end` or `degrade`. */
  action: string;
  /** Which budget: `tokens`, `minutes` or `tool_calls`. */
  kind: string;
  /** The limit, in `unit`. */
  limit: number;
  /** Whose budget: `session` or `user_day` (the user's UTC day). */
  scope: string;
  /** Unit of `limit` and `used`: `tokens`, `seconds` (for `minutes`) or `calls`. */
  unit: string;
  /** What was used when it was reached, in `unit`. */
  used: number;
}

/** The model called a tool the client declared (extension: `session.update {tools}`); the client runs it and answers with `tool.output` under the same `call_id` (the model waits for it, at most [`CLIENT_TOOL_TIMEOUT_MS`], then gets an error output). Shape of OpenAI Realtime's `function_call` item (`call_id`, `name`, `arguments`). */
export interface ToolCallEvent {
  type: "tool.call";
  /** The arguments as the model wrote them: a JSON object as text (it may not match the schema; the client validates). */
  arguments: string;
  /** The call's id, echoed in `tool.output`. */
  call_id: string;
  /** The declared tool's name. */
  name: string;
}

export type ServerEvent =
  | SessionReadyEvent
  | StateEvent
  | UserSpeechStartedEvent
  | UserSpeechStoppedEvent
  | TranscriptEvent
  | EmotionEvent
  | VisemeEvent
  | AgentInterruptedEvent
  | ModerationEvent
  | ErrorEvent
  | PongEvent
  | GestureEvent
  | SessionEndedEvent
  | AgentNotificationEvent
  | TranscriptTranslationEvent
  | BudgetExceededEvent
  | ToolCallEvent;

/** A typed user message, handled like a spoken turn. */
export interface ClientTextEvent {
  type: "text";
  /** The message text. */
  text: string;
}

/** Stop the agent now (barge-in without speech). */
export interface ClientInterruptEvent {
  type: "interrupt";
}

/** Liveness check; the server answers `pong`. */
export interface ClientPingEvent {
  type: "ping";
}

/** A screen or camera frame for models that take images (extension, issue 15): a data URL `data:image/jpeg;base64,...` or `data:image/png;base64,...`. The message may be up to [`MAX_IMAGE_MESSAGE`] bytes; the server limits the image's size and rate and answers an `error` (`images_unsupported` once, `image_too_large`, `bad_image`, `image_rate_limited`) when it drops one. */
export interface ClientImageEvent {
  type: "image";
  /** The image as a data URL. */
  data: string;
}

/** Change the running session (extension; OpenAI Realtime's `session.update`): absent fields stay as they are. `instructions` are added to the character's persona, `voice` replaces its voice where the provider allows it (OpenAI: before the character first spoke), `tools` replaces the tools the client declared (the character's own tools stay), `language` sets the user's language for translated subtitles (issue 15). A provider that cannot take a change answers an `error` (`session_update_unsupported`). */
export interface ClientSessionUpdateEvent {
  type: "session.update";
  /** Instructions for the rest of the session (at most [`MAX_CLIENT_INSTRUCTIONS`] bytes). */
  instructions?: string | null;
  /** The user's language (BCP 47 tag, e.g. `ja`, `en-US`): agent transcripts get a `transcript.translation` into it when it differs from the character's. */
  language?: string | null;
  /** Tools the model may call and the client runs (`tool.call` -> `tool.output`); at most [`MAX_CLIENT_TOOLS`]. */
  tools?: ToolDeclaration[] | null;
  /** A provider voice name (e.g. OpenAI's `marin`). */
  voice?: string | null;
}

/** The result of a `tool.call` (extension): the model continues with it once every call of its response is answered. */
export interface ClientToolOutputEvent {
  type: "tool.output";
  /** The `call_id` of the `tool.call`. */
  call_id: string;
  /** The result as text (JSON or plain words), at most [`MAX_TOOL_OUTPUT`] bytes. */
  output: string;
}

export type ClientEvent =
  | ClientTextEvent
  | ClientInterruptEvent
  | ClientPingEvent
  | ClientImageEvent
  | ClientSessionUpdateEvent
  | ClientToolOutputEvent;

