//! Checks on SDP offers and trickle-ICE fragments, before anything reaches the WebRTC stack.
//!
//! [`validate_offer`] answers 400 for what is not SDP at all and 422 for SDP we will not
//! negotiate, each with its own [`SdpError`] variant and problem `code`. Parsing uses
//! `rtc-sdp`, the parser webrtc-rs itself uses, so an offer accepted here is one the peer
//! connection can parse. The rules (API v1 asks for "one audio m-line (sendrecv, Opus) and an
//! SCTP data channel"):
//!
//! * exactly one enabled `m=audio` section (port 0 without `a=bundle-only` counts as disabled);
//! * its direction is `sendrecv` (explicit, inherited from the session level, or the RFC 8866
//!   default when absent). `sendonly`, `recvonly` and `inactive` are 422: the client sends its
//!   microphone *and* hears the character, and a half-duplex session is not a voice session;
//! * it offers Opus at 48 kHz (`a=rtpmap:<pt> opus/48000[/2]` for a payload type listed on the
//!   m-line);
//! * an enabled `m=application ... UDP/DTLS/SCTP webrtc-datachannel` section (SCTP data channel);
//! * a well-formed `a=fingerprint` at session level or in a media section (DTLS), and no two
//!   different ones (webrtc-rs refuses those too);
//! * ICE credentials (`a=ice-ufrag` and `a=ice-pwd`, session or media level);
//! * `a=setup` (RFC 8842 §5, media or session level) is `actpass`, `active` or `passive`
//!   (absent = `actpass`); `holdconn` or anything else is 422;
//! * the audio and data sections are in one `a=group:BUNDLE` (RFC 8843). The server runs one
//!   ICE/DTLS transport per session (webrtc-rs has no per-m-line transports), so an offer that
//!   does not bundle them (GStreamer webrtcbin's default `bundle-policy=none`) cannot be served:
//!   it gets 422 `no_bundle` naming the fix instead of an answer that rejects every m-line.
//!
//! Video sections are not an error: the answer rejects them (port 0), which is ordinary
//! offer/answer and not a partial acceptance of what the client needs.
//!
//! [`crate::answer::check_answer`] verifies the answer the WebRTC stack produced against the offer before it
//! goes out (see [`crate::answer::AnswerError`]): an answer that cannot work (both sections rejected, the same
//! DTLS role on both sides, the agent's track on the wrong m-line) is refused with 422 rather than
//! sent with 201 and left to time out.
//!
//! [`parse_trickle_sdpfrag`] reads RFC 8840 `application/trickle-ice-sdpfrag` bodies (PATCH).

use std::io::Cursor;

use rtc_sdp::{MediaDescription, SessionDescription};

use crate::problem::ApiError;

/// Largest SDP offer body accepted (64 KiB); larger is 413.
pub const MAX_OFFER_BYTES: usize = 64 * 1024;
/// Largest trickle-ICE sdpfrag body accepted (64 KiB); larger is 413.
pub const MAX_SDPFRAG_BYTES: usize = 64 * 1024;
/// `Content-Type` of offers and answers.
pub const APPLICATION_SDP: &str = "application/sdp";
/// `Content-Type` of trickle-ICE fragments (RFC 8840).
pub const TRICKLE_ICE_SDPFRAG: &str = "application/trickle-ice-sdpfrag";

/// Media direction of an SDP section.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// `a=sendrecv` (also the default).
    SendRecv,
    /// `a=sendonly`.
    SendOnly,
    /// `a=recvonly`.
    RecvOnly,
    /// `a=inactive`.
    Inactive,
}

impl Direction {
    /// The attribute name.
    pub fn as_str(self) -> &'static str {
        match self {
            Direction::SendRecv => "sendrecv",
            Direction::SendOnly => "sendonly",
            Direction::RecvOnly => "recvonly",
            Direction::Inactive => "inactive",
        }
    }

    fn from_attribute(key: &str) -> Option<Self> {
        match key {
            "sendrecv" => Some(Direction::SendRecv),
            "sendonly" => Some(Direction::SendOnly),
            "recvonly" => Some(Direction::RecvOnly),
            "inactive" => Some(Direction::Inactive),
            _ => None,
        }
    }
}

/// Why an offer or sdpfrag was refused. [`SdpError::is_unparsable`] ones are 400, the rest 422.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum SdpError {
    /// The body is not UTF-8.
    #[error("SDP is not valid UTF-8")]
    NotUtf8,
    /// The body does not start with `v=0`.
    #[error("body is not SDP (it must start with v=0)")]
    NotSdp,
    /// The SDP parser refused it.
    #[error("unparsable SDP: {0}")]
    Unparsable(String),
    /// A malformed sdpfrag line.
    #[error("unparsable sdpfrag line {line}: {reason}")]
    BadFragLine {
        /// 1-based line number.
        line: usize,
        /// What is wrong with it.
        reason: &'static str,
    },
    /// No enabled `m=audio` section.
    #[error("offer has no audio m-line")]
    NoAudio,
    /// More than one enabled `m=audio` section.
    #[error("offer has {0} audio m-lines; exactly one is supported")]
    MultipleAudio(usize),
    /// Audio without Opus at 48 kHz.
    #[error("audio m-line does not offer opus/48000")]
    NoOpus,
    /// Audio not `sendrecv`.
    #[error("audio must be sendrecv, offer says {}", .0.as_str())]
    AudioDirection(Direction),
    /// No SCTP data channel section.
    #[error("offer has no SCTP data channel (m=application ... webrtc-datachannel)")]
    NoDataChannel,
    /// No DTLS fingerprint anywhere.
    #[error("offer has no DTLS fingerprint (a=fingerprint)")]
    NoFingerprint,
    /// A fingerprint attribute that is not `<hash-function> <hex pairs>`.
    #[error("malformed a=fingerprint")]
    BadFingerprint,
    /// Two sections with different fingerprints.
    #[error("offer has conflicting DTLS fingerprints")]
    ConflictingFingerprints,
    /// No ICE ufrag/pwd for the audio section.
    #[error("offer has no ICE credentials (a=ice-ufrag / a=ice-pwd)")]
    NoIceCredentials,
    /// `a=setup` is not `actpass`, `active` or `passive` (RFC 8842 §5).
    #[error("a=setup must be actpass, active or passive; the offer says `{0}`")]
    BadSetup(String),
    /// Audio and data are not in one BUNDLE group (RFC 8843).
    #[error(
        "offer does not BUNDLE its audio and data sections (a=group:BUNDLE <audio mid> <data mid>); this server \
         runs one ICE/DTLS transport per session: offer with bundlePolicy max-bundle or balanced \
         (GStreamer webrtcbin: bundle-policy=max-bundle)"
    )]
    NoBundle,
}

impl SdpError {
    /// True for 400 (not SDP at all), false for 422 (SDP we will not negotiate).
    pub fn is_unparsable(&self) -> bool {
        matches!(self, SdpError::NotUtf8 | SdpError::NotSdp | SdpError::Unparsable(_) | SdpError::BadFragLine { .. })
    }

    /// Stable problem `code`.
    pub fn code(&self) -> &'static str {
        match self {
            SdpError::NotUtf8 => "sdp_not_utf8",
            SdpError::NotSdp => "not_sdp",
            SdpError::Unparsable(_) => "sdp_unparsable",
            SdpError::BadFragLine { .. } => "sdpfrag_unparsable",
            SdpError::NoAudio => "no_audio",
            SdpError::MultipleAudio(_) => "multiple_audio",
            SdpError::NoOpus => "no_opus",
            SdpError::AudioDirection(_) => "audio_not_sendrecv",
            SdpError::NoDataChannel => "no_data_channel",
            SdpError::NoFingerprint => "no_fingerprint",
            SdpError::BadFingerprint => "bad_fingerprint",
            SdpError::ConflictingFingerprints => "conflicting_fingerprints",
            SdpError::NoIceCredentials => "no_ice_credentials",
            SdpError::BadSetup(_) => "bad_setup",
            SdpError::NoBundle => "no_bundle",
        }
    }
}

impl From<SdpError> for ApiError {
    fn from(e: SdpError) -> Self {
        if e.is_unparsable() {
            ApiError::bad_request(e.code(), e.to_string())
        } else {
            ApiError::unprocessable(e.code(), e.to_string())
        }
    }
}

/// An offer that passed [`validate_offer`]; only this module can make one, so a host that
/// receives it knows the checks ran.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ValidOffer {
    sdp: String,
    audio_mid: Option<String>,
    opus_payload_type: u8,
    data_channel_mid: Option<String>,
    setup: SetupRole,
    /// Set for WHIP/WHEP offers ([`crate::whip::validate_whip_offer`]): one-way audio, the data
    /// channel optional; the answer is checked by [`crate::whip::check_whip_answer`].
    whip: Option<crate::whip::WhipRole>,
}

/// The DTLS role an offer proposes (`a=setup`, RFC 8842 §5); the answer must complement it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SetupRole {
    /// `actpass` (or absent): the answerer picks.
    ActPass,
    /// `active`: the offerer is the DTLS client, so the answer must be `passive`.
    Active,
    /// `passive`: the offerer is the DTLS server, so the answer must be `active`.
    Passive,
}

impl SetupRole {
    /// The attribute value.
    pub fn as_str(self) -> &'static str {
        match self {
            SetupRole::ActPass => "actpass",
            SetupRole::Active => "active",
            SetupRole::Passive => "passive",
        }
    }

    pub(crate) fn parse(value: &str) -> Result<Self, SdpError> {
        match value.trim().to_ascii_lowercase().as_str() {
            "actpass" => Ok(SetupRole::ActPass),
            "active" => Ok(SetupRole::Active),
            "passive" => Ok(SetupRole::Passive),
            _ => Err(SdpError::BadSetup(truncate(value.trim(), 40))),
        }
    }
}

impl ValidOffer {
    /// The offer, unchanged.
    pub fn sdp(&self) -> &str {
        &self.sdp
    }

    /// The offer, unchanged, by value.
    pub fn into_sdp(self) -> String {
        self.sdp
    }

    /// `a=mid` of the audio section.
    pub fn audio_mid(&self) -> Option<&str> {
        self.audio_mid.as_deref()
    }

    /// The payload type the offer gives Opus.
    pub fn opus_payload_type(&self) -> u8 {
        self.opus_payload_type
    }

    /// `a=mid` of the data-channel section.
    pub fn data_channel_mid(&self) -> Option<&str> {
        self.data_channel_mid.as_deref()
    }

    /// The DTLS role the offer proposes for the audio section (absent = `actpass`).
    pub fn setup(&self) -> SetupRole {
        self.setup
    }

    /// The WHIP/WHEP role of an offer validated by [`crate::whip::validate_whip_offer`]; `None`
    /// for an API v1 offer.
    pub fn whip_role(&self) -> Option<crate::whip::WhipRole> {
        self.whip
    }

    /// A WHIP/WHEP offer (only [`crate::whip`] builds these, after its own checks).
    pub(crate) fn whip_offer(
        sdp: String,
        audio_mid: Option<String>,
        opus_payload_type: u8,
        data_channel_mid: Option<String>,
        setup: SetupRole,
        role: crate::whip::WhipRole,
    ) -> Self {
        ValidOffer { sdp, audio_mid, opus_payload_type, data_channel_mid, setup, whip: Some(role) }
    }
}

/// Validate an SDP offer body (see the module docs for the rules).
pub fn validate_offer(body: &[u8]) -> Result<ValidOffer, SdpError> {
    let text = std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?;
    if !text.trim_start().starts_with("v=0") {
        return Err(SdpError::NotSdp);
    }
    let desc = parse(text)?;

    let enabled = |m: &&MediaDescription| m.media_name.port.value != 0 || m.has_attribute("bundle-only");
    let audio: Vec<&MediaDescription> =
        desc.media_descriptions.iter().filter(|m| m.media_name.media == "audio").filter(enabled).collect();
    let audio = match audio.as_slice() {
        [] => return Err(SdpError::NoAudio),
        [one] => *one,
        many => return Err(SdpError::MultipleAudio(many.len())),
    };

    let direction = direction_of(audio).or_else(|| session_direction(&desc));
    match direction.unwrap_or(Direction::SendRecv) {
        Direction::SendRecv => {}
        other => return Err(SdpError::AudioDirection(other)),
    }

    let opus_payload_type = opus_payload_type(audio).ok_or(SdpError::NoOpus)?;

    let data = desc
        .media_descriptions
        .iter()
        .filter(enabled)
        .find(|m| is_sctp_data_channel(m))
        .ok_or(SdpError::NoDataChannel)?;

    check_fingerprints(&desc)?;

    let has = |key: &str| {
        desc.attributes.iter().any(|a| a.key == key && a.value.is_some()) || audio.attribute(key).flatten().is_some()
    };
    if !has("ice-ufrag") || !has("ice-pwd") {
        return Err(SdpError::NoIceCredentials);
    }
    let setup = match audio.attribute("setup").flatten().or_else(|| session_attribute(&desc, "setup")) {
        Some(value) => SetupRole::parse(value)?,
        None => SetupRole::ActPass,
    };
    let audio_mid = audio.attribute("mid").flatten().map(str::to_owned);
    let data_channel_mid = data.attribute("mid").flatten().map(str::to_owned);
    let bundled = |mid: &Option<String>| mid.as_deref().is_some_and(|m| bundle_mids(&desc).any(|b| b == m));
    if !bundled(&audio_mid) || !bundled(&data_channel_mid) {
        return Err(SdpError::NoBundle);
    }

    Ok(ValidOffer { sdp: text.to_owned(), audio_mid, opus_payload_type, data_channel_mid, setup, whip: None })
}

pub(crate) fn session_attribute<'a>(desc: &'a SessionDescription, key: &str) -> Option<&'a str> {
    desc.attributes.iter().find(|a| a.key == key).and_then(|a| a.value.as_deref())
}

/// The mids of every `a=group:BUNDLE` line (RFC 8843 §7.1; an SDP may carry other groups, e.g.
/// `LS`, which are not bundles).
pub(crate) fn bundle_mids(desc: &SessionDescription) -> impl Iterator<Item = &str> {
    desc.attributes
        .iter()
        .filter(|a| a.key == "group")
        .filter_map(|a| a.value.as_deref())
        .filter_map(|v| {
            let mut tokens = v.split_whitespace();
            (tokens.next() == Some("BUNDLE")).then_some(tokens)
        })
        .flatten()
}

pub(crate) fn parse(text: &str) -> Result<SessionDescription, SdpError> {
    // rtc-sdp returns errors for bad input; the catch_unwind only guarantees that a parser bug
    // on hostile input becomes a 400 rather than a dead request task.
    let result = std::panic::catch_unwind(|| SessionDescription::unmarshal(&mut Cursor::new(text.as_bytes())));
    match result {
        Ok(Ok(desc)) => Ok(desc),
        Ok(Err(e)) => Err(SdpError::Unparsable(truncate(&e.to_string(), 200))),
        Err(_) => Err(SdpError::Unparsable("parser failure".to_owned())),
    }
}

fn truncate(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => format!("{}...", &s[..i]),
        None => s.to_owned(),
    }
}

pub(crate) fn direction_of(m: &MediaDescription) -> Option<Direction> {
    m.attributes.iter().find_map(|a| Direction::from_attribute(&a.key))
}

pub(crate) fn session_direction(desc: &SessionDescription) -> Option<Direction> {
    desc.attributes.iter().find_map(|a| Direction::from_attribute(&a.key))
}

pub(crate) fn opus_payload_type(audio: &MediaDescription) -> Option<u8> {
    audio.attributes.iter().find_map(|a| {
        if a.key != "rtpmap" {
            return None;
        }
        let value = a.value.as_deref()?;
        let (pt, encoding) = value.trim().split_once(char::is_whitespace)?;
        let mut parts = encoding.trim().split('/');
        let name = parts.next()?;
        let clock = parts.next()?;
        let is_opus = name.eq_ignore_ascii_case("opus") && clock == "48000";
        let listed = audio.media_name.formats.iter().any(|f| f == pt);
        if is_opus && listed { pt.parse::<u8>().ok() } else { None }
    })
}

pub(crate) fn is_sctp_data_channel(m: &MediaDescription) -> bool {
    m.media_name.media == "application"
        && m.media_name.protos.iter().any(|p| p == "SCTP")
        && m.media_name.formats.iter().any(|f| f == "webrtc-datachannel")
}

pub(crate) fn check_fingerprints(desc: &SessionDescription) -> Result<(), SdpError> {
    let session = desc.attributes.iter().filter(|a| a.key == "fingerprint").map(|a| a.value.as_deref());
    let media = desc
        .media_descriptions
        .iter()
        .flat_map(|m| m.attributes.iter())
        .filter(|a| a.key == "fingerprint")
        .map(|a| a.value.as_deref());
    let mut first: Option<(String, String)> = None;
    for value in session.chain(media) {
        let parsed = parse_fingerprint(value.unwrap_or(""))?;
        match &first {
            None => first = Some(parsed),
            Some(seen) if *seen == parsed => {}
            // Several hash functions for one certificate are legal (RFC 8122); two different
            // digests with the same function are not one certificate.
            Some(seen) if seen.0 == parsed.0 => return Err(SdpError::ConflictingFingerprints),
            Some(_) => {}
        }
    }
    first.map(|_| ()).ok_or(SdpError::NoFingerprint)
}

/// `<hash-function> <XX:XX:...>` with a known hash function and the right digest length.
fn parse_fingerprint(value: &str) -> Result<(String, String), SdpError> {
    let mut fields = value.split_whitespace();
    let (Some(hash), Some(digest), None) = (fields.next(), fields.next(), fields.next()) else {
        return Err(SdpError::BadFingerprint);
    };
    let hash = hash.to_ascii_lowercase();
    let bytes = match hash.as_str() {
        "sha-1" => 20,
        "sha-224" => 28,
        "sha-256" => 32,
        "sha-384" => 48,
        "sha-512" => 64,
        _ => return Err(SdpError::BadFingerprint),
    };
    let pairs: Vec<&str> = digest.split(':').collect();
    let well_formed =
        pairs.len() == bytes && pairs.iter().all(|p| p.len() == 2 && p.bytes().all(|b| b.is_ascii_hexdigit()));
    if !well_formed {
        return Err(SdpError::BadFingerprint);
    }
    Ok((hash, digest.to_ascii_uppercase()))
}

/// One `a=candidate` line of a trickle-ICE fragment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TrickleCandidate {
    /// `a=mid` of the m-section the candidate appeared under, if any.
    pub mid: Option<String>,
    /// The attribute value with its `candidate:` prefix, as in `RTCIceCandidateInit.candidate`.
    pub candidate: String,
}

/// A parsed `application/trickle-ice-sdpfrag` body (RFC 8840).
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SdpFrag {
    /// `a=ice-ufrag` (session or media level).
    pub ice_ufrag: Option<String>,
    /// `a=ice-pwd` (session or media level).
    pub ice_pwd: Option<String>,
    /// Candidates in body order.
    pub candidates: Vec<TrickleCandidate>,
    /// `a=end-of-candidates` was present.
    pub end_of_candidates: bool,
}

impl SdpFrag {
    /// New ICE credentials: with `If-Match: "*"` this is an ICE restart (RFC 9725 §4.3.2).
    pub fn has_credentials(&self) -> bool {
        self.ice_ufrag.is_some() && self.ice_pwd.is_some()
    }

    /// Render as an sdpfrag body (for the 200 answer to an ICE restart).
    pub fn to_sdpfrag(&self, mid: Option<&str>) -> String {
        let mut out = String::new();
        if let Some(mid) = mid {
            out.push_str("m=audio 9 UDP/TLS/RTP/SAVPF 0\r\n");
            out.push_str(&format!("a=mid:{mid}\r\n"));
        }
        if let Some(ufrag) = &self.ice_ufrag {
            out.push_str(&format!("a=ice-ufrag:{ufrag}\r\n"));
        }
        if let Some(pwd) = &self.ice_pwd {
            out.push_str(&format!("a=ice-pwd:{pwd}\r\n"));
        }
        for c in &self.candidates {
            out.push_str(&format!("a={}\r\n", c.candidate));
        }
        if self.end_of_candidates {
            out.push_str("a=end-of-candidates\r\n");
        }
        out
    }
}

/// Parse an RFC 8840 sdpfrag: `a=` and `m=` lines (others are skipped), candidates attributed
/// to the `a=mid` of their m-section.
pub fn parse_trickle_sdpfrag(body: &[u8]) -> Result<SdpFrag, SdpError> {
    let text = std::str::from_utf8(body).map_err(|_| SdpError::NotUtf8)?;
    let mut frag = SdpFrag::default();
    // Candidates of the current m-section wait here until its a=mid (which may come after them).
    let mut section: Vec<String> = Vec::new();
    let mut mid: Option<String> = None;
    let flush = |frag: &mut SdpFrag, section: &mut Vec<String>, mid: &Option<String>| {
        frag.candidates.extend(section.drain(..).map(|candidate| TrickleCandidate { mid: mid.clone(), candidate }));
    };
    for (index, raw) in text.split('\n').enumerate() {
        let line = raw.strip_suffix('\r').unwrap_or(raw).trim_end();
        let number = index + 1;
        if line.is_empty() {
            continue;
        }
        let Some((kind, value)) = line.split_once('=') else {
            return Err(SdpError::BadFragLine { line: number, reason: "expected <type>=<value>" });
        };
        if kind.len() != 1 || !kind.bytes().all(|b| b.is_ascii_lowercase()) {
            return Err(SdpError::BadFragLine { line: number, reason: "type must be one lowercase letter" });
        }
        match kind {
            "m" => {
                flush(&mut frag, &mut section, &mid);
                mid = None;
            }
            "a" => {
                let (key, attr_value) = match value.split_once(':') {
                    Some((k, v)) => (k, Some(v)),
                    None => (value, None),
                };
                match (key, attr_value) {
                    ("mid", Some(v)) => mid = Some(v.trim().to_owned()),
                    ("ice-ufrag", Some(v)) => frag.ice_ufrag = Some(non_empty(v, number)?),
                    ("ice-pwd", Some(v)) => frag.ice_pwd = Some(non_empty(v, number)?),
                    ("candidate", Some(v)) => {
                        if v.split_whitespace().count() < 8 {
                            return Err(SdpError::BadFragLine {
                                line: number,
                                reason: "candidate needs at least 8 fields",
                            });
                        }
                        section.push(format!("candidate:{}", v.trim()));
                    }
                    ("end-of-candidates", None) => frag.end_of_candidates = true,
                    _ => {}
                }
            }
            _ => {}
        }
    }
    flush(&mut frag, &mut section, &mid);
    Ok(frag)
}

fn non_empty(value: &str, line: usize) -> Result<String, SdpError> {
    let value = value.trim();
    if value.is_empty() || value.contains(char::is_whitespace) {
        return Err(SdpError::BadFragLine { line, reason: "empty or spaced ICE credential" });
    }
    Ok(value.to_owned())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fingerprint_shapes() {
        let ok = format!("sha-256 {}", vec!["AB"; 32].join(":"));
        assert!(parse_fingerprint(&ok).is_ok());
        assert_eq!(parse_fingerprint("sha-256"), Err(SdpError::BadFingerprint));
        assert_eq!(parse_fingerprint("md5 AB:CD"), Err(SdpError::BadFingerprint));
        let short = format!("sha-256 {}", vec!["AB"; 31].join(":"));
        assert_eq!(parse_fingerprint(&short), Err(SdpError::BadFingerprint));
        let nonhex = format!("sha-1 {}", vec!["ZZ"; 20].join(":"));
        assert_eq!(parse_fingerprint(&nonhex), Err(SdpError::BadFingerprint));
    }

    #[test]
    fn truncate_respects_char_boundaries() {
        assert_eq!(truncate("ééé", 2), "éé...");
        assert_eq!(truncate("ab", 5), "ab");
    }
}
