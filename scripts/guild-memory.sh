#!/usr/bin/env bash
# Redis memory per guild: a private redis-server, `coven sim` with SIM_GUILDS=N generated
# guilds (plus its three seeded ones, two with the bot), and one `coven gateway` serving
# every guild of its session. Prints Redis `used_memory` before the gateway starts and
# once every guild is registered and written (the registry `coven:guilds` holds N+2 and
# memory has settled), and the difference per guild.
#
#   scripts/guild-memory.sh [N]      # N generated guilds, default 1000
#
# Uses target/debug/coven (COVEN=path to use another build), and redis-server, redis-cli,
# curl and python3 from PATH.
# Everything it starts runs in a temporary directory and is stopped on exit.
set -euo pipefail

N=${1:-1000}
COVEN=${COVEN:-$(cd "$(dirname "$0")/.." && pwd)/target/debug/coven}
[[ -x $COVEN ]] || { echo "no $COVEN: run cargo build" >&2; exit 1; }
command -v redis-server >/dev/null || { echo "redis-server is not installed" >&2; exit 1; }

dir=$(mktemp -d)
pids=()
cleanup() {
    for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$dir"
}
trap cleanup EXIT

free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'
}

redis_port=$(free_port)
redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --dir "$dir" >"$dir/redis.log" 2>&1 &
pids+=($!)
rc() { redis-cli -p "$redis_port" "$@"; }
for _ in $(seq 50); do rc ping >/dev/null 2>&1 && break; sleep 0.1; done
rc ping >/dev/null

used() { rc info memory | tr -d '\r' | awk -F: '$1=="used_memory"{print $2}'; }

sim_port=$(free_port)
SIM_GUILDS=$N BIND=127.0.0.1:$sim_port LOG_LEVEL=warn "$COVEN" sim >"$dir/sim.log" 2>&1 &
pids+=($!)
for _ in $(seq 300); do
    curl -fs "http://127.0.0.1:$sim_port/_sim/state" >/dev/null 2>&1 && break
    sleep 0.2
done
curl -fs "http://127.0.0.1:$sim_port/_sim/state" >/dev/null ||
    { echo "coven sim did not start:" >&2; cat "$dir/sim.log" >&2; exit 1; }

before=$(used)

REDIS_URL=redis://127.0.0.1:$redis_port \
    DISCORD_BOT_TOKEN=sim-bot-token \
    DISCORD_GATEWAY_URL=ws://127.0.0.1:$sim_port \
    DISCORD_API_URL=http://127.0.0.1:$sim_port/api \
    BIND=127.0.0.1:0 METRICS_BIND=127.0.0.1:0 LOG_LEVEL=warn \
    "$COVEN" gateway >"$dir/gateway.log" 2>&1 &
gateway=$!
pids+=($gateway)

want=$((N + 2))
start=$(date +%s)
while :; do
    have=$(rc hlen coven:guilds)
    [[ $have -ge $want ]] && break
    kill -0 "$gateway" 2>/dev/null ||
        { echo "coven gateway stopped:" >&2; tail -20 "$dir/gateway.log" >&2; exit 1; }
    (($(date +%s) - start < 600)) ||
        { echo "only $have of $want guilds registered after 10 minutes" >&2; exit 1; }
    sleep 1
done
registered=$(($(date +%s) - start))

# The registry is written with each GUILD_CREATE; the guilds' logs and snapshots follow.
# Settled: used_memory unchanged (within 1 KiB) over three seconds.
last=$(used)
while :; do
    sleep 3
    now=$(used)
    ((now - last < 1024 && last - now < 1024)) && break
    last=$now
done
after=$(used)

keys=$(rc dbsize)
echo "guilds registered: $(rc hlen coven:guilds) ($N generated + 2 seeded), in ${registered}s"
echo "redis keys: $keys"
echo "used_memory before the gateway: $before bytes"
echo "used_memory with every guild:   $after bytes"
echo "per guild: $(((after - before) / want)) bytes"
