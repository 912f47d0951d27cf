//! The `quilt` command line: a thin layer over the `quilt` library.
//! `anyhow` is used here and nowhere else.

#![deny(unsafe_code)]

mod cli;

fn main() -> std::process::ExitCode {
    cli::main()
}
