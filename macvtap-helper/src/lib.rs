//! The helper's command line as a library, so that `xtask` builds the man
//! page and shell completions from the same clap definition the binary
//! parses with.

pub mod cli;
