// Generated from signaling::events (the Rust schema) by signaling::codegen. Do not edit:
// run `KOTODAMA_BLESS=1 cargo test -p signaling --test codegen` after changing the schema.
export const PROTOCOL_VERSION = 1;
export const SERVER_EVENT_TYPES = ["session.ready","state","user.speech_started","user.speech_stopped","transcript","emotion","viseme","agent.interrupted","error","pong","session.ended","gesture","agent_notification","moderation","budget.exceeded","transcript.translation","tool.call"];
export const CLIENT_EVENT_TYPES = ["text","interrupt","ping","image","session.update","tool.output"];
export const AGENT_STATES = ["initializing","listening","thinking","speaking"];
export const ROLES = ["user","agent"];
export const EMOTIONS = ["neutral","happy","sad","angry","surprised","fearful","disgusted","thinking","relaxed"];
export const VISEMES = ["sil","PP","FF","TH","DD","kk","CH","SS","nn","RR","aa","E","ih","oh","ou"];
