//! Screen and camera frames for models that take images (issue 15 item 6; seed 000's
//! "screen/camera images to multimodal models").
//!
//! A client sends a frame as a data URL (`data:image/jpeg;base64,...` or `data:image/png;...`):
//! the api-v1 `image` event (data channel or WebSocket) or N.E.K.O.'s `stream_data
//! {input_type: "screen"|"camera", data}`. The session core checks it here ([`ImageFrame::
//! from_data_url`]: type, base64, at most [`MAX_IMAGE_BYTES`] decoded), passes at most one per
//! [`MIN_IMAGE_INTERVAL`] ([`ImageGate`]) and hands it to the provider as
//! `ProviderCommand::Image`: OpenAI Realtime as a user `conversation.item.create` with an
//! `input_image` content part (`image_url`: the data URL; PNG or JPEG, OpenAI's Realtime
//! reference), Gemini Live as `realtimeInput.video {data, mimeType}` (protocols.md). Providers
//! without images (`Capabilities::images` false: the cascade, Nova Sonic, scripted) make the
//! core answer one `error` `images_unsupported` and drop every frame.

use std::time::Duration;

use base64::Engine as _;

/// Largest image accepted, decoded bytes (32 KiB: a 640x360 JPEG at ordinary quality; its data
/// URL fits the 63 KiB `image` message limit, `signaling::events::MAX_IMAGE_MESSAGE`).
pub const MAX_IMAGE_BYTES: usize = 32 * 1024;

/// At most one image per this interval reaches the model (1 frame/s, the rate Gemini Live
/// samples video at); the rest are dropped and counted.
pub const MIN_IMAGE_INTERVAL: Duration = Duration::from_secs(1);

/// Image types every image-taking provider accepts (OpenAI Realtime: PNG or JPEG).
const MIME_TYPES: [&str; 2] = ["image/jpeg", "image/png"];

/// A checked image frame, still base64 (the form both providers take).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageFrame {
    /// `image/jpeg` or `image/png`.
    pub mime_type: &'static str,
    /// The image bytes, standard base64 with padding.
    pub base64: String,
}

/// Why an image was refused; [`ImageError::code`] is the `error` event's code.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ImageError {
    /// Not `data:<type>;base64,<data>`.
    #[error("an image must be a data URL: data:image/jpeg;base64,... or data:image/png;base64,...")]
    NotDataUrl,
    /// A type other than JPEG or PNG.
    #[error("image type `{0}` is not supported (image/jpeg or image/png)")]
    Type(String),
    /// The base64 does not decode.
    #[error("the image's base64 does not decode")]
    Base64,
    /// Larger than [`MAX_IMAGE_BYTES`] decoded.
    #[error("image of {bytes} bytes exceeds the limit of {limit} bytes")]
    TooLarge {
        /// Decoded size.
        bytes: usize,
        /// [`MAX_IMAGE_BYTES`].
        limit: usize,
    },
}

impl ImageError {
    /// The api-v1 `error.code`: `image_too_large` or `bad_image`.
    pub fn code(&self) -> &'static str {
        match self {
            ImageError::TooLarge { .. } => "image_too_large",
            _ => "bad_image",
        }
    }
}

impl ImageFrame {
    /// Check a data URL (type, base64, decoded size).
    pub fn from_data_url(url: &str) -> Result<Self, ImageError> {
        let rest = url.strip_prefix("data:").ok_or(ImageError::NotDataUrl)?;
        let (mime, data) = rest.split_once(";base64,").ok_or(ImageError::NotDataUrl)?;
        let mime_type = MIME_TYPES
            .iter()
            .find(|m| m.eq_ignore_ascii_case(mime))
            .ok_or_else(|| ImageError::Type(mime.chars().take(40).collect()))?;
        // The decoded size from the length first: an oversized image is refused before decoding.
        let bytes = data.len() / 4 * 3;
        if bytes > MAX_IMAGE_BYTES + 3 {
            return Err(ImageError::TooLarge { bytes, limit: MAX_IMAGE_BYTES });
        }
        let decoded = base64::engine::general_purpose::STANDARD.decode(data).map_err(|_| ImageError::Base64)?;
        if decoded.len() > MAX_IMAGE_BYTES {
            return Err(ImageError::TooLarge { bytes: decoded.len(), limit: MAX_IMAGE_BYTES });
        }
        Ok(Self { mime_type, base64: data.to_owned() })
    }

    /// The frame as a data URL again (OpenAI's `image_url`).
    pub fn data_url(&self) -> String {
        format!("data:{};base64,{}", self.mime_type, self.base64)
    }
}

/// The per-session image rate limit on media time: one frame per [`MIN_IMAGE_INTERVAL`].
#[derive(Debug, Default)]
pub struct ImageGate {
    next_at: Duration,
    /// Frames dropped by the limit so far.
    pub dropped: u64,
}

impl ImageGate {
    /// Whether a frame arriving at `now` may pass (it then starts the next interval).
    pub fn admit(&mut self, now: Duration) -> bool {
        if now < self.next_at {
            self.dropped += 1;
            return false;
        }
        self.next_at = now + MIN_IMAGE_INTERVAL;
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn url(mime: &str, bytes: usize) -> String {
        let data = base64::engine::general_purpose::STANDARD.encode(vec![0x5a; bytes]);
        format!("data:{mime};base64,{data}")
    }

    #[test]
    fn a_data_url_is_checked_for_type_base64_and_size() {
        let ok = ImageFrame::from_data_url(&url("image/jpeg", 1000)).unwrap();
        assert_eq!(ok.mime_type, "image/jpeg");
        assert_eq!(ok.data_url(), url("image/jpeg", 1000));
        assert!(ImageFrame::from_data_url(&url("image/png", MAX_IMAGE_BYTES)).is_ok());
        let big = ImageFrame::from_data_url(&url("image/png", MAX_IMAGE_BYTES + 1)).unwrap_err();
        assert_eq!(big.code(), "image_too_large");
        assert_eq!(ImageFrame::from_data_url(&url("image/gif", 10)), Err(ImageError::Type("image/gif".into())));
        assert_eq!(ImageFrame::from_data_url("data:image/jpeg;base64,@@@@"), Err(ImageError::Base64));
        assert_eq!(ImageFrame::from_data_url("https://example.com/a.jpg"), Err(ImageError::NotDataUrl));
        assert_eq!(ImageFrame::from_data_url("data:image/jpeg,abc").unwrap_err().code(), "bad_image");
    }

    #[test]
    fn one_image_per_second_passes() {
        let mut g = ImageGate::default();
        let ms = Duration::from_millis;
        assert!(g.admit(ms(0)));
        assert!(!g.admit(ms(10)));
        assert!(!g.admit(ms(999)));
        assert!(g.admit(ms(1000)));
        assert!(!g.admit(ms(1500)));
        assert!(g.admit(ms(2600)));
        assert_eq!(g.dropped, 3);
    }
}
