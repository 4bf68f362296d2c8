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
# The client-library suite (tests/it/clients.rs) runs discord.py in a virtual environment.
if ! command -v python3 >/dev/null 2>&1; then
  missing+=(python3 python3-venv)
elif ! python3 -m venv --help >/dev/null 2>&1 || ! python3 -c 'import ensurepip' >/dev/null 2>&1; then
  missing+=(python3-venv)
fi
# The discord.js suite (tests/it/clients_js.rs) runs on node; npm installs discord.js.
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
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

# discord.py, pinned in tests/clients/requirements.txt, in a virtual environment of its
# own beside the build (remade when the pins change); tests/it/clients.rs runs it through
# COVEN_CLIENTS_PYTHON. The same discord.py with zstd (requirements-zstd.txt) asks for
# zstd-stream; it runs through COVEN_CLIENTS_PYTHON_ZSTD.
pinned_venv() { # pinned_venv PINS DIR
  local pins=$1 venv=$2
  if ! cmp -s "$pins" "$venv/requirements.txt" 2>/dev/null; then
    say "making a virtual environment for $pins ($venv)"
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$pins"
    cp "$pins" "$venv/requirements.txt"
  fi
}
clients_venv="${CARGO_TARGET_DIR:-target}/clients-venv"
clients_venv_zstd="${CARGO_TARGET_DIR:-target}/clients-venv-zstd"
pinned_venv tests/clients/requirements.txt "$clients_venv"
pinned_venv tests/clients/requirements-zstd.txt "$clients_venv_zstd"
COVEN_CLIENTS_PYTHON="$(cd "$clients_venv" && pwd)/bin/python"
COVEN_CLIENTS_PYTHON_ZSTD="$(cd "$clients_venv_zstd" && pwd)/bin/python"
export COVEN_CLIENTS_PYTHON COVEN_CLIENTS_PYTHON_ZSTD

# discord.js, pinned in tests/clients/discordjs/package-lock.json, installed by npm ci
# beside the build (again when the lock changes); tests/it/clients_js.rs runs it with
# node, finding it through COVEN_CLIENTS_NODE_MODULES.
clients_node="${CARGO_TARGET_DIR:-target}/clients-node"
clients_lock=tests/clients/discordjs/package-lock.json
if ! cmp -s "$clients_lock" "$clients_node/installed-package-lock.json" 2>/dev/null; then
  say "installing discord.js for the client suite ($clients_node)"
  rm -rf "$clients_node"
  mkdir -p "$clients_node"
  cp tests/clients/discordjs/package.json "$clients_lock" "$clients_node/"
  (cd "$clients_node" && npm ci --no-audit --no-fund --loglevel=error)
  cp "$clients_lock" "$clients_node/installed-package-lock.json"
fi
COVEN_CLIENTS_NODE_MODULES="$(cd "$clients_node" && pwd)/node_modules"
export COVEN_CLIENTS_NODE_MODULES

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
# CI shows the tail of a failing run, where backtraces would push out what failed: the
# panics are printed again last, each without its backtrace.
log=target/test-output.log
mkdir -p target
if ! cargo test --locked --lib --bins --tests 2>&1 | tee "$log"; then
  say "what each failing test said (all of it is above and in $log)"
  awk '/^thread .* panicked at /{n=40} /^stack backtrace:|^note: run with/{n=0} n>0{print; n--}' "$log"
  exit 1
fi
