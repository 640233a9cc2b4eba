#!/usr/bin/env bash
# Builds target/debian/imgsync_VERSION-1_ARCH.deb: the stripped binary, man
# pages, bash/zsh/fish completions, the README and the nightly sync units;
# and beside it imgsync-dbgsym_VERSION-1_ARCH.ddeb, the binary's debug info
# (/usr/lib/debug/.build-id/..., for gdb and perf).
# Installs cargo-deb first when it is missing. Needs only the Rust toolchain
# and a C compiler (OpenSSL is built from source: no libssl-dev).
set -euo pipefail
cd "$(dirname "$0")/.."

if ! cargo deb --version >/dev/null 2>&1; then
    echo "build-deb: installing cargo-deb" >&2
    cargo install --locked cargo-deb
fi

# The release build with debug info (profile deb); cargo-deb splits it off.
cargo build --locked --profile deb
bin=target/deb/imgsync

gen=target/deb-assets
rm -rf "$gen"
mkdir -p "$gen/man" "$gen/completions"
"$bin" generate man "$gen/man"
gzip -9n "$gen"/man/*.1
"$bin" generate completions bash > "$gen/completions/imgsync"
"$bin" generate completions zsh > "$gen/completions/_imgsync"
"$bin" generate completions fish > "$gen/completions/imgsync.fish"

cargo deb --locked --profile deb --no-build "$@"
ls -l target/debian/*.deb target/debian/*.ddeb
