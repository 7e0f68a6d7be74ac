//! The WHIP / WHEP offer profile (RFC 9725 and its egress twin, draft-ietf-wish-whep): one-way
//! audio without a data channel, checked before it reaches the WebRTC stack, and the stack's
//! answer checked before it goes out.
//!
//! API v1 offers ([`crate::sdp::validate_offer`]) must be `sendrecv` with an SCTP data channel;
//! WHIP publishers (OBS, GStreamer `simple-whip-client`, `@eyevinn/whip-web-client`) send their
//! microphone **send-only with no data channel**, and WHEP players offer **receive-only** (a data
//! channel is optional; a player that opens `events` gets the session's events on it). The rules
//! of [`validate_whip_offer`]:
//!
//! * exactly one enabled `m=audio` section offering Opus at 48 kHz (by name, never by payload
//!   number); other sections (a publisher's video) are answered rejected;
//! * its direction ([`WhipRole::Publish`]: `sendonly` or `sendrecv`; [`WhipRole::Play`]:
//!   `recvonly` or `sendrecv`), else 422 `whip_direction`;
//! * a DTLS fingerprint (any certificate type: GStreamer's RSA certificates are accepted, the
//!   fingerprint is a digest of whatever certificate the publisher presents), ICE credentials
//!   and `a=setup` as for API v1;
//! * BUNDLE only when there is something to bundle: a lone audio section needs no group (GStreamer
//!   webrtcbin's default `bundle-policy=none` offers none), audio plus a data channel must be in
//!   one group (the server runs one ICE/DTLS transport).
//!
//! [`check_whip_answer`] is [`crate::answer::check_answer`] for these offers (it dispatches here
//! on [`crate::sdp::ValidOffer::whip_role`]): sections match, the audio section is accepted in
//! the right direction with Opus, a WHEP answer carries the agent's track on it, an offered data
//! channel is accepted, the DTLS roles complement, credentials and fingerprint are present.

use rtc_sdp::MediaDescription;

use crate::answer::{AnswerError, carries_track, check_sections, check_setup, section};
use crate::problem::ApiError;
use crate::sdp::{
    Direction, SdpError, SetupRole, ValidOffer, bundle_mids, check_fingerprints, direction_of, is_sctp_data_channel,
    opus_payload_type, parse, session_attribute, session_direction,
};

/// Which side of a one-way session the offerer is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WhipRole {
    /// A WHIP publisher: it sends its microphone (`sendonly`) to the character.
    Publish,
    /// A WHEP player: it receives the character's voice (`recvonly`).
    Play,
}

impl WhipRole {
    /// `whip` or `whep`.
    pub fn as_str(self) -> &'static str {
        match self {
            WhipRole::Publish => "whip",
            WhipRole::Play => "whep",
        }
    }

    /// The offer directions this role accepts (RFC 8866 §6.7).
    fn accepts(self, d: Direction) -> bool {
        matches!(
            (self, d),
            (_, Direction::SendRecv) | (WhipRole::Publish, Direction::SendOnly) | (WhipRole::Play, Direction::RecvOnly)
        )
    }

    /// The answer directions that carry this role's media.
    fn answer_accepts(self, d: Direction) -> bool {
        matches!(
            (self, d),
            (_, Direction::SendRecv) | (WhipRole::Publish, Direction::RecvOnly) | (WhipRole::Play, Direction::SendOnly)
        )
    }
}

/// Why a WHIP/WHEP offer was refused: the API v1 SDP errors that apply (400/422, their own
/// codes), or an audio direction this role cannot use (422 `whip_direction`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum WhipOfferError {
    /// Not SDP, or SDP without what every WebRTC offer needs (see [`SdpError`]).
    #[error(transparent)]
    Sdp(#[from] SdpError),
    /// The audio section's direction does not fit the endpoint.
    #[error("{} offers must be {} audio (or sendrecv); this offer's audio is {}", .role.as_str().to_uppercase(), match .role { WhipRole::Publish => "sendonly", WhipRole::Play => "recvonly" }, .got.as_str())]
    Direction {
        /// The endpoint's role.
        role: WhipRole,
        /// What the offer said.
        got: Direction,
    },
}

impl WhipOfferError {
    /// Stable problem `code`.
    pub fn code(&self) -> &'static str {
        match self {
            WhipOfferError::Sdp(e) => e.code(),
            WhipOfferError::Direction { .. } => "whip_direction",
        }
    }
}

impl From<WhipOfferError> for ApiError {
    fn from(e: WhipOfferError) -> Self {
        match e {
            WhipOfferError::Sdp(e) => e.into(),
            other => ApiError::unprocessable(other.code(), other.to_string()),
        }
    }
}

/// Validate a WHIP (`Publish`) or WHEP (`Play`) offer body (rules in the module docs).
pub fn validate_whip_offer(body: &[u8], role: WhipRole) -> Result<ValidOffer, WhipOfferError> {
    let text = std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?;
    if !text.trim_start().starts_with("v=0") {
        return Err(SdpError::NotSdp.into());
    }
    let desc = parse(text)?;
    let enabled = |m: &&MediaDescription| m.media_name.port.value != 0 || m.has_attribute("bundle-only");
    let audio: Vec<&MediaDescription> =
        desc.media_descriptions.iter().filter(|m| m.media_name.media == "audio").filter(enabled).collect();
    let audio = match audio.as_slice() {
        [] => return Err(SdpError::NoAudio.into()),
        [one] => *one,
        many => return Err(SdpError::MultipleAudio(many.len()).into()),
    };
    let direction = direction_of(audio).or_else(|| session_direction(&desc)).unwrap_or(Direction::SendRecv);
    if !role.accepts(direction) {
        return Err(WhipOfferError::Direction { role, got: direction });
    }
    let opus = opus_payload_type(audio).ok_or(SdpError::NoOpus)?;
    let data = desc.media_descriptions.iter().filter(enabled).find(|m| is_sctp_data_channel(m));
    check_fingerprints(&desc)?;
    let has = |key: &str| {
        desc.attributes.iter().any(|a| a.key == key && a.value.is_some()) || audio.attribute(key).flatten().is_some()
    };
    if !has("ice-ufrag") || !has("ice-pwd") {
        return Err(SdpError::NoIceCredentials.into());
    }
    let setup = match audio.attribute("setup").flatten().or_else(|| session_attribute(&desc, "setup")) {
        Some(value) => SetupRole::parse(value)?,
        None => SetupRole::ActPass,
    };
    let audio_mid = audio.attribute("mid").flatten().map(str::to_owned);
    let data_mid = data.and_then(|d| d.attribute("mid").flatten().map(str::to_owned));
    if data.is_some() {
        let bundled = |mid: &Option<String>| mid.as_deref().is_some_and(|m| bundle_mids(&desc).any(|b| b == m));
        if !bundled(&audio_mid) || !bundled(&data_mid) {
            return Err(SdpError::NoBundle.into());
        }
    }
    Ok(ValidOffer::whip_offer(text.to_owned(), audio_mid, opus, data_mid, setup, role))
}

/// Check the stack's `answer` to a WHIP/WHEP `offer` (rules in the module docs).
pub fn check_whip_answer(offer: &ValidOffer, answer: &str, role: WhipRole) -> Result<(), AnswerError> {
    let unparsable = |e: SdpError| AnswerError::Unparsable(e.to_string());
    let offered = parse(offer.sdp()).map_err(unparsable)?;
    let answered = parse(answer).map_err(unparsable)?;
    check_sections(&offered, &answered)?;
    let audio_mid = offer.audio_mid().unwrap_or_default();
    let audio = section(&answered, audio_mid)
        .filter(|m| m.media_name.port.value != 0 || m.has_attribute("bundle-only"))
        .ok_or_else(|| AnswerError::AudioRejected(audio_mid.to_owned()))?;
    let direction = direction_of(audio).or_else(|| session_direction(&answered)).unwrap_or(Direction::SendRecv);
    if !role.answer_accepts(direction) {
        return Err(AnswerError::AudioDirection(direction));
    }
    if opus_payload_type(audio).is_none() {
        return Err(AnswerError::NoOpus);
    }
    if role == WhipRole::Play && !carries_track(audio) {
        return Err(AnswerError::NoTrack(audio_mid.to_owned()));
    }
    if let Some(data_mid) = offer.data_channel_mid() {
        let data = section(&answered, data_mid).ok_or_else(|| AnswerError::DataRejected(data_mid.to_owned()))?;
        if data.media_name.port.value == 0 || !is_sctp_data_channel(data) {
            return Err(AnswerError::DataRejected(data_mid.to_owned()));
        }
    }
    check_setup(offer.setup(), &answered, audio)?;
    let has = |key: &str| {
        session_attribute(&answered, key).is_some() || audio.attribute(key).flatten().is_some_and(|v| !v.is_empty())
    };
    if !has("ice-ufrag") || !has("ice-pwd") {
        return Err(AnswerError::Incomplete("ICE credentials (a=ice-ufrag / a=ice-pwd)"));
    }
    if !has("fingerprint") {
        return Err(AnswerError::Incomplete("DTLS fingerprint (a=fingerprint)"));
    }
    Ok(())
}

/// The offer as the WebRTC stack must see it when it has no BUNDLE group at all (GStreamer
/// webrtcbin's default `bundle-policy=none`, one audio section): webrtc-rs answers only the
/// sections of the offer's BUNDLE group and would reject the lone audio section (port 0). Returns
/// a copy with `a=group:BUNDLE <audio mid>` added at session level, or `None` when the offer needs
/// nothing (it has a group, a data channel or no audio mid). The client's answer must then lose
/// the group again ([`one_way_answer`] with `drop_bundle`): RFC 8843 §7.3 allows BUNDLE in an
/// answer only as offered.
pub fn with_lone_bundle(offer: &ValidOffer) -> Option<ValidOffer> {
    let role = offer.whip_role()?;
    let mid = offer.audio_mid()?;
    if offer.data_channel_mid().is_some() || offer.sdp().lines().any(|l| l.starts_with("a=group:BUNDLE")) {
        return None;
    }
    let mut sdp = String::with_capacity(offer.sdp().len() + 32);
    let mut added = false;
    for line in offer.sdp().lines().map(|l| l.trim_end_matches('\r')) {
        if !added && line.starts_with("m=") {
            sdp.push_str(&format!("a=group:BUNDLE {mid}\r\n"));
            added = true;
        }
        sdp.push_str(line);
        sdp.push_str("\r\n");
    }
    Some(ValidOffer::whip_offer(sdp, Some(mid.to_owned()), offer.opus_payload_type(), None, offer.setup(), role))
}

/// The answer as it goes to a one-way client: webrtc-rs answers `sendrecv` once the server's
/// track is on the transceiver, but RFC 3264 §6.1 allows only `recvonly` (or `inactive`) for a
/// `sendonly` offer and `sendonly` for a `recvonly` one. The audio section's direction becomes the
/// role's, and a publisher's answer loses the track lines (`a=msid`, `a=ssrc`: nothing is sent on
/// it). With `drop_bundle` (the stack saw [`with_lone_bundle`]'s offer) the session's
/// `a=group:BUNDLE` goes too. Other sections are unchanged; lines end in CRLF.
pub fn one_way_answer(answer: &str, audio_mid: Option<&str>, role: WhipRole, drop_bundle: bool) -> String {
    let mut out = String::with_capacity(answer.len());
    let mut in_audio = false;
    let mut section: Vec<&str> = Vec::new();
    let flush = |section: &mut Vec<&str>, in_audio: bool, out: &mut String| {
        let is_ours =
            in_audio && audio_mid.is_none_or(|mid| section.iter().any(|l| l.strip_prefix("a=mid:") == Some(mid)));
        for line in section.drain(..) {
            let line = if is_ours && line == "a=sendrecv" {
                match role {
                    WhipRole::Publish => "a=recvonly",
                    WhipRole::Play => "a=sendonly",
                }
            } else {
                line
            };
            if is_ours && role == WhipRole::Publish && (line.starts_with("a=msid:") || line.starts_with("a=ssrc:")) {
                continue;
            }
            out.push_str(line);
            out.push_str("\r\n");
        }
    };
    for line in answer.lines().map(|l| l.trim_end_matches('\r')) {
        if drop_bundle && line.starts_with("a=group:BUNDLE") {
            continue;
        }
        if line.starts_with("m=") {
            flush(&mut section, in_audio, &mut out);
            in_audio = line.starts_with("m=audio");
        }
        section.push(line);
    }
    flush(&mut section, in_audio, &mut out);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    const FP: &str =
        "sha-256 AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99:AA:BB:CC:DD:EE:FF:00:11:22:33:44:55:66:77:88:99";

    fn offer(direction: &str, with_dc: bool) -> String {
        let mut s = format!(
            "v=0\r\no=- 1 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\n{}m=audio 9 UDP/TLS/RTP/SAVPF 0 96\r\n\
             c=IN IP4 0.0.0.0\r\na=mid:a\r\na=ice-ufrag:u\r\na=ice-pwd:pwpwpwpwpwpwpwpwpwpwpwpw\r\n\
             a=fingerprint:{FP}\r\na=setup:actpass\r\na=rtpmap:0 PCMU/8000\r\na=rtpmap:96 OPUS/48000/2\r\na={direction}\r\n",
            if with_dc { "a=group:BUNDLE a d\r\n" } else { "" }
        );
        if with_dc {
            s.push_str("m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\nc=IN IP4 0.0.0.0\r\na=mid:d\r\na=sctp-port:5000\r\n");
        }
        s
    }

    #[test]
    fn a_send_only_publisher_without_data_channel_or_bundle_is_accepted() {
        let v = validate_whip_offer(offer("sendonly", false).as_bytes(), WhipRole::Publish).unwrap();
        assert_eq!(v.whip_role(), Some(WhipRole::Publish));
        assert_eq!(v.opus_payload_type(), 96, "Opus found by name, not position");
        assert_eq!(v.audio_mid(), Some("a"));
        assert_eq!(v.data_channel_mid(), None);
    }

    #[test]
    fn a_receive_only_player_may_bring_a_bundled_data_channel() {
        let v = validate_whip_offer(offer("recvonly", true).as_bytes(), WhipRole::Play).unwrap();
        assert_eq!(v.data_channel_mid(), Some("d"));
        let unbundled = offer("recvonly", true).replace("a=group:BUNDLE a d\r\n", "");
        assert_eq!(validate_whip_offer(unbundled.as_bytes(), WhipRole::Play).unwrap_err().code(), "no_bundle");
    }

    #[test]
    fn the_wrong_direction_is_a_named_422() {
        let e = validate_whip_offer(offer("recvonly", false).as_bytes(), WhipRole::Publish).unwrap_err();
        assert_eq!(e.code(), "whip_direction");
        assert!(e.to_string().contains("sendonly"), "{e}");
        let e = validate_whip_offer(offer("sendonly", false).as_bytes(), WhipRole::Play).unwrap_err();
        assert_eq!(e.code(), "whip_direction");
        assert_eq!(ApiError::from(e).status(), http::StatusCode::UNPROCESSABLE_ENTITY);
        assert!(validate_whip_offer(offer("sendrecv", false).as_bytes(), WhipRole::Play).is_ok());
    }

    #[test]
    fn not_sdp_is_400_and_missing_parts_are_their_own_422s() {
        let e = validate_whip_offer(b"hello", WhipRole::Publish).unwrap_err();
        assert_eq!(ApiError::from(e).status(), http::StatusCode::BAD_REQUEST);
        let no_opus = offer("sendonly", false).replace("a=rtpmap:96 OPUS/48000/2\r\n", "");
        assert_eq!(validate_whip_offer(no_opus.as_bytes(), WhipRole::Publish).unwrap_err().code(), "no_opus");
        let no_fp = offer("sendonly", false).replace(&format!("a=fingerprint:{FP}\r\n"), "");
        assert_eq!(validate_whip_offer(no_fp.as_bytes(), WhipRole::Publish).unwrap_err().code(), "no_fingerprint");
        let no_audio = offer("sendonly", false).replace("m=audio 9", "m=audio 0");
        assert_eq!(validate_whip_offer(no_audio.as_bytes(), WhipRole::Publish).unwrap_err().code(), "no_audio");
    }

    #[test]
    fn the_answer_must_carry_the_role_s_direction() {
        let o = validate_whip_offer(offer("sendonly", false).as_bytes(), WhipRole::Publish).unwrap();
        let answer = |dir: &str| {
            format!(
                "v=0\r\no=- 2 1 IN IP4 127.0.0.1\r\ns=-\r\nt=0 0\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\nc=IN IP4 0.0.0.0\r\n\
                 a=mid:a\r\na=ice-ufrag:s\r\na=ice-pwd:spspspspspspspspspspspsp\r\na=fingerprint:{FP}\r\n\
                 a=setup:active\r\na=rtpmap:96 opus/48000/2\r\na={dir}\r\n"
            )
        };
        assert!(check_answer_via_dispatch(&o, &answer("recvonly")).is_ok());
        assert_eq!(check_answer_via_dispatch(&o, &answer("sendonly")).unwrap_err().code(), "answer_audio_direction");
        let play = validate_whip_offer(offer("recvonly", false).as_bytes(), WhipRole::Play).unwrap();
        assert_eq!(check_answer_via_dispatch(&play, &answer("sendonly")).unwrap_err().code(), "answer_no_track");
        let with_track = answer("sendonly") + "a=msid:kotodama agent-voice\r\n";
        assert!(check_answer_via_dispatch(&play, &with_track).is_ok());
    }

    #[test]
    fn a_publisher_s_answer_is_receive_only_without_track_lines() {
        let answer = "v=0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=msid:k v\r\na=ssrc:1 cname:k\r\n\
                      a=sendrecv\r\nm=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\na=sendrecv\r\n";
        let got = one_way_answer(answer, Some("0"), WhipRole::Publish, false);
        assert_eq!(
            got,
            "v=0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 111\r\na=mid:0\r\na=recvonly\r\n\
             m=application 9 UDP/DTLS/SCTP webrtc-datachannel\r\na=mid:1\r\na=sendrecv\r\n"
        );
        let play = one_way_answer(answer, Some("0"), WhipRole::Play, false);
        assert!(play.contains("a=msid:k v\r\n") && play.contains("a=sendonly\r\n"), "{play}");
    }

    #[test]
    fn a_lone_unbundled_section_is_bundled_for_the_stack_only() {
        let o = validate_whip_offer(offer("sendonly", false).as_bytes(), WhipRole::Publish).unwrap();
        let stack = with_lone_bundle(&o).expect("GStreamer's shape needs the group");
        assert!(stack.sdp().contains("t=0 0\r\na=group:BUNDLE a\r\nm=audio"), "{}", stack.sdp());
        assert_eq!((stack.whip_role(), stack.opus_payload_type()), (Some(WhipRole::Publish), 96));
        assert!(with_lone_bundle(&stack).is_none(), "already bundled");
        let with_dc = validate_whip_offer(offer("recvonly", true).as_bytes(), WhipRole::Play).unwrap();
        assert!(with_lone_bundle(&with_dc).is_none());
        let answer = "v=0\r\ns=-\r\na=group:BUNDLE a\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:a\r\na=sendrecv\r\n";
        assert_eq!(
            one_way_answer(answer, Some("a"), WhipRole::Publish, true),
            "v=0\r\ns=-\r\nm=audio 9 UDP/TLS/RTP/SAVPF 96\r\na=mid:a\r\na=recvonly\r\n"
        );
    }

    fn check_answer_via_dispatch(offer: &ValidOffer, answer: &str) -> Result<(), AnswerError> {
        crate::answer::check_answer(offer, answer)
    }
}
