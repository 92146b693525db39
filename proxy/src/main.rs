//! The `ferry` binary: `sidecar`, `gateway` and `iptables` subcommands.
fn main() {}
