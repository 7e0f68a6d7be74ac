//! Links the native speech engines of the `local` feature (eSpeak NG, PocketSphinx + SphinxBase).
//!
//! Our bindings are hand-written `extern "C"` blocks (src/providers/cascade/local/*_ffi.rs), so all
//! this does is ask the linker for the system libraries Debian's `libespeak-ng-dev`,
//! `libpocketsphinx-dev` and `libsphinxbase-dev` install, and say plainly what to install when they
//! are missing (instead of an opaque linker error).

use std::path::Path;

const LIBS: &[(&str, &str)] =
    &[("espeak-ng", "libespeak-ng-dev"), ("pocketsphinx", "libpocketsphinx-dev"), ("sphinxbase", "libsphinxbase-dev")];

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBRARY_PATH");
    if std::env::var_os("CARGO_FEATURE_LOCAL").is_none() {
        return;
    }
    let mut dirs: Vec<String> = vec![
        "/usr/lib".into(),
        "/usr/local/lib".into(),
        "/usr/lib64".into(),
        format!("/usr/lib/{}-linux-gnu", std::env::var("CARGO_CFG_TARGET_ARCH").unwrap_or_default()),
    ];
    if let Ok(p) = std::env::var("LIBRARY_PATH") {
        dirs.extend(p.split(':').filter(|s| !s.is_empty()).map(str::to_owned));
    }
    for (lib, package) in LIBS {
        let file = format!("lib{lib}.so");
        if !dirs.iter().any(|d| Path::new(d).join(&file).exists()) {
            println!(
                "cargo:warning={file} not found: install the Debian package `{package}` (./run.sh and \
                 ./test.sh do: see .ci/setup.sh), or build without the offline engines: \
                 --no-default-features"
            );
        }
        println!("cargo:rustc-link-lib=dylib={lib}");
    }
}
