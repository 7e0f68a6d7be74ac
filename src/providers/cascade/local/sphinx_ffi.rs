//! The few PocketSphinx / SphinxBase entry points we use, declared by hand against Debian's
//! `0.8+5prealpha` headers (`pocketsphinx.h`, `sphinxbase/cmd_ln.h`, `sphinxbase/err.h`).
//!
//! A `ps_decoder_t` may be moved between threads but used by one at a time. SphinxBase's logger
//! is process-global: it is silenced once, before the first decoder is made.
#![allow(non_camel_case_types, dead_code)]

use std::os::raw::{c_char, c_int, c_void};

/// Opaque `ps_decoder_t`.
#[repr(C)]
pub struct ps_decoder_t {
    _p: [u8; 0],
}
/// Opaque `cmd_ln_t`.
#[repr(C)]
pub struct cmd_ln_t {
    _p: [u8; 0],
}
/// Opaque `arg_t`.
#[repr(C)]
pub struct arg_t {
    _p: [u8; 0],
}

unsafe extern "C" {
    pub fn ps_args() -> *const arg_t;
    pub fn ps_init(config: *mut cmd_ln_t) -> *mut ps_decoder_t;
    pub fn ps_free(ps: *mut ps_decoder_t) -> c_int;
    pub fn ps_start_utt(ps: *mut ps_decoder_t) -> c_int;
    pub fn ps_process_raw(
        ps: *mut ps_decoder_t,
        data: *const i16,
        n_samples: usize,
        no_search: c_int,
        full_utt: c_int,
    ) -> c_int;
    pub fn ps_end_utt(ps: *mut ps_decoder_t) -> c_int;
    pub fn ps_get_hyp(ps: *mut ps_decoder_t, out_best_score: *mut i32) -> *const c_char;

    pub fn cmd_ln_parse_r(
        inout_cmdln: *mut cmd_ln_t,
        defn: *const arg_t,
        argc: i32,
        argv: *mut *mut c_char,
        strict: i32,
    ) -> *mut cmd_ln_t;
    pub fn cmd_ln_free_r(cmdln: *mut cmd_ln_t) -> c_int;
    pub fn err_set_logfp(stream: *mut c_void);
}
