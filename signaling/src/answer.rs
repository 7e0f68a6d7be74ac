//! Checks on the SDP answer the WebRTC stack produced, against the offer it answers, before the
//! answer goes out with 201.
//!
//! The offer was checked by [`crate::sdp::validate_offer`]; the answer is the stack's, and a
//! stack's defaults differ from Chrome's in ways that only show after the 201: an offer with
//! `a=setup:active` answered `active` (ICE connects, DTLS never starts), or an offer without
//! BUNDLE answered with every m-line rejected. [`check_answer`] refuses such an answer with a
//! specific [`AnswerError`] (422, problem `code` from [`AnswerError::code`]). The rules:
//!
//! * one answer section per offer section, in order, with the same `a=mid` (RFC 3264 §6,
//!   RFC 8843 §7.2);
//! * the audio section the validator chose is accepted (port != 0), `sendrecv`, lists Opus
//!   (by name, `opus/48000`), and carries the server's track (`a=msid` or `a=ssrc`); no other
//!   accepted section carries a track (the agent's voice goes out on the user's audio m-line);
//! * the data-channel section is accepted (port != 0, `UDP/DTLS/SCTP webrtc-datachannel`);
//! * `a=setup` is `active` or `passive` (RFC 8842 §5.2: never `actpass` in an answer) and
//!   complements the offer: `active` is answered `passive`, `passive` is answered `active`;
//! * BUNDLE only as offered (RFC 8843 §7.3): the answer's BUNDLE mids are offered BUNDLE mids and
//!   include the audio and data sections;
//! * ICE credentials and a DTLS fingerprint are present.

use rtc_sdp::{MediaDescription, SessionDescription};

use crate::problem::ApiError;
use crate::sdp::{
    Direction, SdpError, SetupRole, ValidOffer, bundle_mids, direction_of, is_sctp_data_channel, opus_payload_type,
    parse, session_attribute, session_direction,
};

/// Why an answer the stack produced cannot be sent. Every variant is 422: the offer asked for
/// something this server cannot negotiate (the client can fix its offer), never a 500.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum AnswerError {
    /// The answer did not parse (a stack bug triggered by the offer's shape).
    #[error("the WebRTC stack produced an unparsable answer to this offer: {0}")]
    Unparsable(String),
    /// Sections missing, added or out of order relative to the offer.
    #[error("the answer's m-lines do not match the offer's ({0})")]
    Sections(String),
    /// The audio section was rejected (port 0).
    #[error("the WebRTC stack rejected the offer's audio m-line (mid `{0}`)")]
    AudioRejected(String),
    /// The audio section is not `sendrecv`.
    #[error("the answer's audio is {}, not sendrecv", .0.as_str())]
    AudioDirection(Direction),
    /// The audio section lists no Opus.
    #[error("the answer's audio m-line does not carry opus/48000")]
    NoOpus,
    /// The server's track is not on the audio section.
    #[error("the agent's track is not on the audio m-line (mid `{0}`)")]
    NoTrack(String),
    /// A track on an accepted section other than the chosen audio one.
    #[error("the answer puts a track on m-line `{0}`, not on the chosen audio m-line")]
    TrackOnWrongSection(String),
    /// The data-channel section was rejected.
    #[error("the WebRTC stack rejected the offer's data channel m-line (mid `{0}`)")]
    DataRejected(String),
    /// `a=setup` does not complement the offer (both sides would take the same DTLS role).
    #[error("DTLS roles do not complement: offer a=setup:{offer}, answer a=setup:{answer}")]
    SetupConflict {
        /// The offer's role.
        offer: &'static str,
        /// The answer's value (`missing` when absent).
        answer: String,
    },
    /// BUNDLE not as offered.
    #[error("the answer's BUNDLE group does not match the offer's: {0}")]
    Bundle(String),
    /// No ICE credentials or no fingerprint in the answer.
    #[error("the answer has no {0}")]
    Incomplete(&'static str),
}

impl AnswerError {
    /// Stable problem `code`.
    pub fn code(&self) -> &'static str {
        match self {
            AnswerError::Unparsable(_) => "answer_unparsable",
            AnswerError::Sections(_) => "answer_sections",
            AnswerError::AudioRejected(_) => "audio_rejected",
            AnswerError::AudioDirection(_) => "answer_audio_direction",
            AnswerError::NoOpus => "answer_no_opus",
            AnswerError::NoTrack(_) => "answer_no_track",
            AnswerError::TrackOnWrongSection(_) => "track_on_wrong_section",
            AnswerError::DataRejected(_) => "data_rejected",
            AnswerError::SetupConflict { .. } => "setup_conflict",
            AnswerError::Bundle(_) => "bundle_mismatch",
            AnswerError::Incomplete(_) => "answer_incomplete",
        }
    }
}

impl From<AnswerError> for ApiError {
    fn from(e: AnswerError) -> Self {
        ApiError::unprocessable(e.code(), e.to_string())
    }
}

/// Check `answer` (SDP text) against `offer` (see the module docs for the rules).
pub fn check_answer(offer: &ValidOffer, answer: &str) -> Result<(), AnswerError> {
    if let Some(role) = offer.whip_role() {
        return crate::whip::check_whip_answer(offer, answer, role);
    }
    let unparsable = |e: SdpError| AnswerError::Unparsable(e.to_string());
    let offered = parse(offer.sdp()).map_err(unparsable)?;
    let answered = parse(answer).map_err(unparsable)?;
    check_sections(&offered, &answered)?;
    let audio_mid = offer.audio_mid().unwrap_or_default();
    let data_mid = offer.data_channel_mid().unwrap_or_default();
    let audio = section(&answered, audio_mid).ok_or_else(|| AnswerError::AudioRejected(audio_mid.to_owned()))?;
    check_audio(&answered, audio, audio_mid)?;
    check_tracks(&answered, audio_mid)?;
    let data = section(&answered, data_mid).ok_or_else(|| AnswerError::DataRejected(data_mid.to_owned()))?;
    if data.media_name.port.value == 0 || !is_sctp_data_channel(data) {
        return Err(AnswerError::DataRejected(data_mid.to_owned()));
    }
    check_setup(offer.setup(), &answered, audio)?;
    check_bundle(&offered, &answered, [audio_mid, data_mid])?;
    let has = |key: &str| {
        session_attribute(&answered, key).is_some() || audio.attribute(key).flatten().is_some_and(|v| !v.is_empty())
    };
    for key in ["ice-ufrag", "ice-pwd", "fingerprint"] {
        if !has(key) {
            return Err(AnswerError::Incomplete(match key {
                "fingerprint" => "DTLS fingerprint (a=fingerprint)",
                _ => "ICE credentials (a=ice-ufrag / a=ice-pwd)",
            }));
        }
    }
    Ok(())
}

pub(crate) fn mid_of(m: &MediaDescription) -> Option<&str> {
    m.attribute("mid").flatten()
}

pub(crate) fn section<'a>(desc: &'a SessionDescription, mid: &str) -> Option<&'a MediaDescription> {
    desc.media_descriptions.iter().find(|m| mid_of(m) == Some(mid))
}

pub(crate) fn check_sections(offered: &SessionDescription, answered: &SessionDescription) -> Result<(), AnswerError> {
    let (o, a) = (&offered.media_descriptions, &answered.media_descriptions);
    if o.len() != a.len() {
        return Err(AnswerError::Sections(format!("{} offered, {} answered", o.len(), a.len())));
    }
    for (i, (om, am)) in o.iter().zip(a).enumerate() {
        if om.media_name.media != am.media_name.media {
            return Err(AnswerError::Sections(format!(
                "m-line {i}: {} answered as {}",
                om.media_name.media, am.media_name.media
            )));
        }
        // A rejected section may omit its mid; an accepted one must repeat the offer's.
        if am.media_name.port.value != 0 && mid_of(om) != mid_of(am) {
            return Err(AnswerError::Sections(format!(
                "m-line {i}: mid {:?} answered as {:?}",
                mid_of(om),
                mid_of(am)
            )));
        }
    }
    Ok(())
}

fn check_audio(answered: &SessionDescription, audio: &MediaDescription, mid: &str) -> Result<(), AnswerError> {
    if audio.media_name.port.value == 0 && !audio.has_attribute("bundle-only") {
        return Err(AnswerError::AudioRejected(mid.to_owned()));
    }
    match direction_of(audio).or_else(|| session_direction(answered)).unwrap_or(Direction::SendRecv) {
        Direction::SendRecv => {}
        other => return Err(AnswerError::AudioDirection(other)),
    }
    if opus_payload_type(audio).is_none() {
        return Err(AnswerError::NoOpus);
    }
    Ok(())
}

pub(crate) fn carries_track(m: &MediaDescription) -> bool {
    m.attributes.iter().any(|a| a.key == "msid" || a.key == "ssrc")
}

fn check_tracks(answered: &SessionDescription, audio_mid: &str) -> Result<(), AnswerError> {
    for m in &answered.media_descriptions {
        let mid = mid_of(m).unwrap_or_default();
        if mid == audio_mid {
            if !carries_track(m) {
                return Err(AnswerError::NoTrack(audio_mid.to_owned()));
            }
        } else if m.media_name.port.value != 0 && carries_track(m) {
            return Err(AnswerError::TrackOnWrongSection(mid.to_owned()));
        }
    }
    Ok(())
}

pub(crate) fn check_setup(
    offer: SetupRole,
    answered: &SessionDescription,
    audio: &MediaDescription,
) -> Result<(), AnswerError> {
    let value = audio.attribute("setup").flatten().or_else(|| session_attribute(answered, "setup"));
    let conflict = |answer: &str| AnswerError::SetupConflict { offer: offer.as_str(), answer: answer.to_owned() };
    let role = match value {
        None => return Err(conflict("missing")),
        Some(v) => SetupRole::parse(v).map_err(|_| conflict(v))?,
    };
    let ok = matches!(
        (offer, role),
        (SetupRole::ActPass, SetupRole::Active | SetupRole::Passive)
            | (SetupRole::Active, SetupRole::Passive)
            | (SetupRole::Passive, SetupRole::Active)
    );
    if ok { Ok(()) } else { Err(conflict(role.as_str())) }
}

fn check_bundle(
    offered: &SessionDescription,
    answered: &SessionDescription,
    needed: [&str; 2],
) -> Result<(), AnswerError> {
    let offer: Vec<&str> = bundle_mids(offered).collect();
    let answer: Vec<&str> = bundle_mids(answered).collect();
    if let Some(extra) = answer.iter().find(|m| !offer.contains(m)) {
        return Err(AnswerError::Bundle(format!("mid `{extra}` bundled but not offered in a bundle")));
    }
    if let Some(missing) = needed.iter().find(|m| !answer.contains(m)) {
        return Err(AnswerError::Bundle(format!("mid `{missing}` is not in the answer's bundle")));
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn setup_roles_must_complement() {
        let sdp = |role: &str| {
            let text = format!("v=0\r\no=- 1 1 IN IP4 0.0.0.0\r\ns=-\r\nt=0 0\r\na=setup:{role}\r\n");
            parse(&text).unwrap()
        };
        let audio = MediaDescription::default();
        assert!(check_setup(SetupRole::ActPass, &sdp("active"), &audio).is_ok());
        assert!(check_setup(SetupRole::ActPass, &sdp("passive"), &audio).is_ok());
        assert!(check_setup(SetupRole::Active, &sdp("passive"), &audio).is_ok());
        assert!(check_setup(SetupRole::Passive, &sdp("active"), &audio).is_ok());
        let err = check_setup(SetupRole::Active, &sdp("active"), &audio).unwrap_err();
        assert_eq!(err.code(), "setup_conflict");
        assert!(check_setup(SetupRole::ActPass, &sdp("actpass"), &audio).is_err(), "actpass is offer-only");
        assert!(check_setup(SetupRole::Passive, &sdp("passive"), &audio).is_err());
    }
}
