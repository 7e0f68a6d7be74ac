//! SDP editing shared by the signaling tests: make broken variants of real offers.
#![allow(dead_code)]

/// Remove every line for which `drop` is true (keeps CRLF line ends).
pub fn without_lines(sdp: &str, drop: impl Fn(&str) -> bool) -> String {
    sdp.split_inclusive('\n').filter(|l| !drop(l.trim_end())).collect()
}

/// Remove an entire m-section whose m= line starts with `prefix`.
pub fn without_section(sdp: &str, prefix: &str) -> String {
    let mut out = String::new();
    let mut skipping = false;
    for line in sdp.split_inclusive('\n') {
        if line.starts_with("m=") {
            skipping = line.starts_with(prefix);
        }
        if !skipping {
            out.push_str(line);
        }
    }
    out
}
