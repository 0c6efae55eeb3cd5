//! Checks that the committed `include/ferry.h` matches what cbindgen generates from `ffi/`.
//!
//! Regenerate the header with `FERRY_BLESS=1 cargo test --test header_drift`.

use std::path::{Path, PathBuf};

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn generate(ffi_dir: &Path) -> Vec<u8> {
    let config = cbindgen::Config::from_file(ffi_dir.join("cbindgen.toml"))
        .unwrap_or_else(|e| panic!("reading ffi/cbindgen.toml: {e}"));
    let bindings = cbindgen::Builder::new()
        .with_config(config)
        .with_crate(ffi_dir)
        .generate()
        .unwrap_or_else(|e| panic!("cbindgen failed on ffi/: {e}"));
    let mut out = Vec::new();
    bindings.write(&mut out);
    out
}

/// The 1-based number and the text of the first line where `a` and `b` differ.
fn first_difference(a: &str, b: &str) -> (usize, String, String) {
    let mut a_lines = a.lines();
    let mut b_lines = b.lines();
    let mut line = 1;
    loop {
        match (a_lines.next(), b_lines.next()) {
            (Some(x), Some(y)) if x == y => line += 1,
            (None, None) => {
                // Same lines, different bytes: line endings or a trailing newline.
                return (line, "<end of file>".into(), "<end of file>".into());
            }
            (x, y) => {
                let show = |l: Option<&str>| l.map_or("<end of file>".into(), |l| format!("{l:?}"));
                return (line, show(x), show(y));
            }
        }
    }
}

#[test]
fn header_is_current() {
    let root = root();
    let header_path = root.join("include").join("ferry.h");
    let generated = generate(&root.join("ffi"));

    if std::env::var_os("FERRY_BLESS").is_some_and(|v| v == "1") {
        std::fs::create_dir_all(root.join("include")).expect("creating include/");
        std::fs::write(&header_path, &generated).expect("writing include/ferry.h");
        eprintln!("header_drift: wrote {}", header_path.display());
        return;
    }

    let committed = std::fs::read(&header_path).unwrap_or_default();
    if committed != generated {
        let committed = String::from_utf8_lossy(&committed);
        let generated = String::from_utf8_lossy(&generated);
        let (line, have, want) = first_difference(&committed, &generated);
        panic!(
            "include/ferry.h is out of date with ffi/src.\n\
             Regenerate it with: FERRY_BLESS=1 cargo test --test header_drift\n\
             first difference at line {line}:\n  committed: {have}\n  generated: {want}"
        );
    }
}
