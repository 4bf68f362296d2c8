#!/usr/bin/env bash
# The whole test suite, on a fresh machine or in CI: installs what the tests need when
# it is missing, then checks formatting, lints and runs every test.
set -euo pipefail
cd "$(dirname "$0")/.."

say() { printf '==> %s\n' "$*"; }

sudo_cmd=()
[ "$(id -u)" -eq 0 ] || sudo_cmd=(sudo)

missing=()
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The TLS tests make a throwaway CA with the openssl command.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# Browser end-to-end tests drive headless Chromium through chromedriver.
command -v chromium >/dev/null 2>&1 || missing+=(chromium)
command -v chromedriver >/dev/null 2>&1 || missing+=(chromium-driver)
# The deployment's nginx.conf is run in front of a replica (HTTPS, HTTP/2, a stream).
command -v nginx >/dev/null 2>&1 || missing+=(nginx)
# chromedriver's client (fantoccini) links the system OpenSSL.
command -v pkg-config >/dev/null 2>&1 || missing+=(pkg-config)
dpkg -s libssl-dev >/dev/null 2>&1 || missing+=(libssl-dev)
if ((${#missing[@]})); then
  say "installing ${missing[*]}"
  "${sudo_cmd[@]}" apt-get update -qq
  DEBIAN_FRONTEND=noninteractive "${sudo_cmd[@]}" apt-get install -y -qq "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null 2>&1; then
  echo "cargo is not installed: install Rust with rustup (https://rustup.rs) first" >&2
  exit 1
fi
for component in rustfmt clippy; do
  if ! cargo "${component/rustfmt/fmt}" --version >/dev/null 2>&1; then
    say "adding the $component component"
    rustup component add "$component"
  fi
done

say "cargo fmt --check"
cargo fmt --all -- --check

say "cargo clippy"
cargo clippy --locked --all-targets -- -D warnings

# Every dependency listed must be used.
if ! command -v cargo-machete >/dev/null 2>&1; then
  say "installing cargo-machete"
  cargo install --locked cargo-machete
fi
say "cargo machete"
cargo machete

say "cargo test"
cargo test --locked --lib --bins --tests
