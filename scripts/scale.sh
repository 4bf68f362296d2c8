#!/usr/bin/env bash
# The scale run (benches/scale.rs): the simulator with 1,000 guilds, a local Redis Cluster,
# 3 gateways, 3 web replicas, ~2,000 streams and faults on a schedule; writes
# docs/scale-run.json and docs/scale-run.svg. Flags: --seconds, --clients, --guilds,
# --rate, --lease-ttl, --out DIR (docs/benchmarks.md, "The scale run").
set -euo pipefail
cd "$(dirname "$0")/.."
exec cargo bench --bench scale -- "$@"
