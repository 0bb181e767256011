#!/usr/bin/env bash
# Builds the Debian package nats-fs-worker (both binaries, the systemd unit, the /etc/default
# file, maintainer scripts) with cargo-deb, from the [package.metadata.deb] section of
# supervisor/Cargo.toml.
#
#   packaging/build-deb.sh          from any folder; prints the path of the .deb last, on stdout
#
# Progress goes to stderr, so `deb=$(packaging/build-deb.sh | tail -n1)` works. Honours
# CARGO_TARGET_DIR and the usual cargo configuration. Installs cargo-deb when it is missing.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/.." && pwd)
cd "$root"

say() { printf 'build-deb: %s\n' "$*" >&2; }

if ! cargo deb --version >/dev/null 2>&1; then
    say "cargo-deb is missing: installing it with 'cargo install cargo-deb --locked' (about 2 minutes)"
    cargo install cargo-deb --locked >&2
fi
say "using $(cargo deb --version 2>/dev/null)"

# Both binaries, explicitly: the runner belongs to another workspace member, and cargo-deb
# only builds the package it packages. --no-build below then packages exactly these.
say "building release binaries"
cargo build --release --locked -p nats-fs-supervisor -p nats-fs-runner >&2

say "packaging"
# cargo-deb prints the path of the .deb on stdout (strips the binaries in its own copies).
out=$(cargo deb --no-build --locked -p nats-fs-supervisor)
deb=$(printf '%s\n' "$out" | tail -n1)
if [[ "$deb" != *.deb || ! -f "$deb" ]]; then
    say "cargo deb did not report a .deb file (output: $out)"
    exit 1
fi
say "built $deb"
printf '%s\n' "$deb"
