//! The few eSpeak NG entry points we use, declared by hand against Debian's 1.51 `speak_lib.h`.
//!
//! Only the synchronous retrieval mode is used: `espeak_Synth` returns once the text is spoken,
//! having called the synth callback with audio buffers and the events (words, phonemes) that
//! fall in them. Every function here touches eSpeak's process-global engine; callers must
//! serialise all calls (see `espeak.rs`: one worker thread owns the engine).
#![allow(non_camel_case_types, dead_code)]

use std::os::raw::{c_char, c_int, c_short, c_uint, c_void};

/// `espeak_AUDIO_OUTPUT::AUDIO_OUTPUT_SYNCHRONOUS`.
pub const AUDIO_OUTPUT_SYNCHRONOUS: c_int = 2;
/// `espeakINITIALIZE_PHONEME_EVENTS`: deliver `espeakEVENT_PHONEME` events.
pub const INITIALIZE_PHONEME_EVENTS: c_int = 0x0001;
/// `espeakINITIALIZE_DONT_EXIT`: return an error instead of calling `exit()` when the data is missing.
pub const INITIALIZE_DONT_EXIT: c_int = 0x8000;
/// `espeakCHARS_UTF8`.
pub const CHARS_UTF8: c_uint = 1;
/// `espeak_POSITION_TYPE::POS_CHARACTER`.
pub const POS_CHARACTER: c_int = 1;
/// `espeak_PARAMETER::espeakRATE` (words per minute).
pub const PARAM_RATE: c_int = 1;
/// `espeak_PARAMETER::espeakPITCH` (0..100).
pub const PARAM_PITCH: c_int = 3;

/// `espeak_EVENT_TYPE` values we read.
pub const EVENT_LIST_TERMINATED: c_int = 0;
pub const EVENT_WORD: c_int = 1;
pub const EVENT_PHONEME: c_int = 7;

/// `espeak_ERROR::EE_OK`.
pub const EE_OK: c_int = 0;

/// `espeak_EVENT.id`: a union of an int, a C string pointer and 8 phoneme-name bytes.
#[repr(C)]
#[derive(Clone, Copy)]
pub union espeak_EVENT_id {
    pub number: c_int,
    pub name: *const c_char,
    pub string: [u8; 8],
}

/// `espeak_EVENT` (layout as in speak_lib.h 1.51).
#[repr(C)]
#[derive(Clone, Copy)]
pub struct espeak_EVENT {
    /// `espeak_EVENT_TYPE` (a C enum: int-sized).
    pub type_: c_int,
    pub unique_identifier: c_uint,
    pub text_position: c_int,
    pub length: c_int,
    /// Milliseconds from the start of the synthesised message.
    pub audio_position: c_int,
    pub sample: c_int,
    pub user_data: *mut c_void,
    pub id: espeak_EVENT_id,
}

/// `t_espeak_callback`: returns 0 to continue, 1 to abort synthesis.
pub type SynthCallback = unsafe extern "C" fn(wav: *mut c_short, numsamples: c_int, events: *mut espeak_EVENT) -> c_int;

unsafe extern "C" {
    pub fn espeak_Initialize(output: c_int, buflength: c_int, path: *const c_char, options: c_int) -> c_int;
    pub fn espeak_SetSynthCallback(cb: Option<SynthCallback>);
    pub fn espeak_SetVoiceByName(name: *const c_char) -> c_int;
    pub fn espeak_SetParameter(parameter: c_int, value: c_int, relative: c_int) -> c_int;
    pub fn espeak_Synth(
        text: *const c_void,
        size: usize,
        position: c_uint,
        position_type: c_int,
        end_position: c_uint,
        flags: c_uint,
        unique_identifier: *mut c_uint,
        user_data: *mut c_void,
    ) -> c_int;
    pub fn espeak_Terminate() -> c_int;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn event_layout_matches_the_c_header() {
        // 6 ints/uints (24 bytes) + pointer (8) + union of 8 bytes = 40 on LP64.
        assert_eq!(std::mem::size_of::<espeak_EVENT>(), 40);
        assert_eq!(std::mem::offset_of!(espeak_EVENT, user_data), 24);
        assert_eq!(std::mem::offset_of!(espeak_EVENT, id), 32);
    }
}
