#!/usr/bin/env bash
# Builds the Debian package nats-fs-worker (both binaries, their manual pages and shell
# completions, the systemd unit, the /etc/default file, maintainer scripts, changelog,
# copyright, lintian overrides) with cargo-deb, from the [package.metadata.deb] section of
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

# Manual pages and completions, from each binary's own clap definition (`--generate`, hidden
# from --help), into <target dir>/release/deb-assets/: cargo-deb maps the target/release/
# prefix of the asset paths in supervisor/Cargo.toml to the real target folder, whatever
# CARGO_TARGET_DIR or the cargo configuration say. cargo metadata tells us that folder too.
target=$(cargo metadata --format-version 1 --no-deps --locked |
    sed -n 's/.*"target_directory":"\([^"]*\)".*/\1/p')
if [[ -z $target || ! -d $target/release ]]; then
    say "cannot find cargo's target folder (cargo metadata said '$target')"
    exit 1
fi
assets=$target/release/deb-assets
say "generating manual pages and completions into $assets"
# Into a private folder first, then renamed into place file by file: another build-deb.sh run
# on the same tree (a test, CI) may be packaging from $assets at this very moment.
fresh=$(mktemp -d "$target/release/.deb-assets.XXXXXX")
staging=
trap 'rm -rf "$fresh" ${staging:+"$staging"}' EXIT
for bin in nats-fs-supervisor nats-fs-runner; do
    exe=$target/release/$bin
    # gzip -n: no name or time stamp in the header, so the same build gives the same bytes.
    "$exe" --generate man | gzip -9n >"$fresh/$bin.1.gz"
    "$exe" --generate complete-bash >"$fresh/$bin.bash"
    "$exe" --generate complete-zsh >"$fresh/_$bin"
    "$exe" --generate complete-fish >"$fresh/$bin.fish"
done
mkdir -p "$assets"
for file in "$fresh"/*; do
    # A binary that printed nothing (or only gzip's header) must not make an empty page.
    if [[ $(wc -c <"$file") -lt 100 ]]; then
        say "generated ${file##*/} is (almost) empty"
        exit 1
    fi
    chmod 0644 "$file"
    mv -f "$file" "$assets/"
done

say "packaging"
# cargo-deb prints the path of the .deb on stdout (strips the binaries in its own copies). It
# writes into a private folder, and the finished .deb is renamed into target/debian/: a
# concurrent run (another test) never leaves a half-written .deb under the final name.
mkdir -p "$target/debian"
staging=$(mktemp -d "$target/debian/.build.XXXXXX")
out=$(cargo deb --no-build --locked -p nats-fs-supervisor --output "$staging/")
built=$(printf '%s\n' "$out" | tail -n1)
if [[ "$built" != *.deb || ! -f "$built" ]]; then
    say "cargo deb did not report a .deb file (output: $out)"
    exit 1
fi
deb=$target/debian/${built##*/}
mv -f "$built" "$deb"
say "built $deb"
printf '%s\n' "$deb"
