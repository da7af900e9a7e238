#!/usr/bin/env bash
# deploy/e2e.sh: the real images and compose file, end to end, on this machine's Docker engine.
#
# Builds deploy/docker/Dockerfile's two targets, starts a coordinator and 6 workers with
# deploy/compose.yaml (tokens on), runs a suite from the host, and mid-run kills one worker
# (docker kill), cuts another off the network (docker network disconnect) and restarts the
# coordinator's container. Passes only if the run ends passed with every test counted once,
# and a worker stopped with docker stop drains and deregisters. Cleans up its containers,
# networks, volumes and images whatever happens.
#
# Without a registry (no public base image can be pulled), it makes the base images itself: a
# Debian root from debootstrap, imported with docker import, and a builder image with the
# host's Rust toolchain on top; they reach the Dockerfile through its build arguments.
#
# Usage: deploy/e2e.sh   (needs docker, docker-compose or docker compose, cargo; root for
# debootstrap when no registry is reachable)
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
WORK=$(mktemp -d)
TAG=e2e-$$
PROJECT=sg$$
WORKERS=6
TESTS=60
log() { printf '== e2e: %s\n' "$*" >&2; }
fail() { printf '== e2e FAILED: %s\n' "$*" >&2; exit 1; }

if docker compose version >/dev/null 2>&1; then
    COMPOSE=(docker compose)
elif command -v docker-compose >/dev/null 2>&1; then
    COMPOSE=(docker-compose)
else
    fail "docker compose (or docker-compose) is required"
fi
compose() { "${COMPOSE[@]}" -p "$PROJECT" -f "$WORK/compose.yaml" "$@"; }

cleanup() {
    local code=$?
    if [ "$code" -ne 0 ] && [ -f "$WORK/compose.yaml" ]; then
        compose logs --no-color --tail 40 >&2 2>/dev/null || true
    fi
    [ -f "$WORK/compose.yaml" ] && compose down -v --remove-orphans >/dev/null 2>&1 || true
    docker rmi -f "shardgate-coordinator:$TAG" "shardgate-worker:$TAG" \
        "shardgate-e2e/base:$TAG" "shardgate-e2e/builder:$TAG" >/dev/null 2>&1 || true
    rm -rf "$WORK"
    exit "$code"
}
trap cleanup EXIT

# The client on the host.
cargo build --quiet --locked --bin shardgate
SHARDGATE=${CARGO_TARGET_DIR:-$ROOT/target}/debug/shardgate
[ -x "$SHARDGATE" ] || fail "the client was not built at $SHARDGATE"

# 1. Base images: the registry's, or made here.
BUILDER=rust:1.89-bookworm
RUNTIME=debian:bookworm-slim
if [ -n "${SHARDGATE_E2E_REUSE:-}" ]; then
    :
elif ! { docker image inspect "$BUILDER" >/dev/null 2>&1 || timeout 60 docker pull -q "$BUILDER" >/dev/null 2>&1; } ||
   ! { docker image inspect "$RUNTIME" >/dev/null 2>&1 || timeout 60 docker pull -q "$RUNTIME" >/dev/null 2>&1; }; then
    log "no registry: making the base images (debootstrap + docker import)"
    if ! command -v debootstrap >/dev/null 2>&1; then
        export DEBIAN_FRONTEND=noninteractive
        apt-get install -y -qq debootstrap >/dev/null 2>&1 ||
            { apt-get update -qq && apt-get install -y -qq debootstrap >/dev/null; }
    fi
    debootstrap --variant=minbase --include=ca-certificates,tini,bash,gcc,libc6-dev \
        bookworm "$WORK/rootfs" http://deb.debian.org/debian >"$WORK/debootstrap.log" 2>&1 ||
        { tail -20 "$WORK/debootstrap.log" >&2; fail "debootstrap"; }
    tar -C "$WORK/rootfs" -c . | docker import - "shardgate-e2e/base:$TAG" >/dev/null
    rm -rf "$WORK/rootfs"
    # The host's toolchain (binaries and libraries; no docs) as the builder.
    SYSROOT=$(rustc --print sysroot)
    mkdir -p "$WORK/toolchain"
    cp -a "$SYSROOT/bin" "$SYSROOT/lib" "$WORK/toolchain/"
    [ -d "$SYSROOT/libexec" ] && cp -a "$SYSROOT/libexec" "$WORK/toolchain/"
    # The host's CA bundle too: where crates.io is reached through an intercepting proxy, the
    # host trusts its CA and the build must as well.
    cp /etc/ssl/certs/ca-certificates.crt "$WORK/toolchain/host-ca.crt"
    printf 'FROM shardgate-e2e/base:%s\nCOPY . /opt/rust\nENV PATH=/opt/rust/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin CARGO_HOME=/usr/local/cargo CARGO_HTTP_CAINFO=/opt/rust/host-ca.crt SSL_CERT_FILE=/opt/rust/host-ca.crt\n' \
        "$TAG" >"$WORK/Dockerfile.builder"
    docker build -q -f "$WORK/Dockerfile.builder" -t "shardgate-e2e/builder:$TAG" "$WORK/toolchain" >/dev/null
    rm -rf "$WORK/toolchain"
    BUILDER=shardgate-e2e/builder:$TAG
    RUNTIME=shardgate-e2e/base:$TAG
fi

# 2. The real Dockerfile, both targets.
COMMIT=$(git rev-parse --short=12 HEAD 2>/dev/null || echo e2e)
for target in coordinator worker; do
    # (While working on this script: SHARDGATE_E2E_REUSE=TAG uses images built before.)
    if [ -n "${SHARDGATE_E2E_REUSE:-}" ]; then
        docker tag "shardgate-$target:$SHARDGATE_E2E_REUSE" "shardgate-$target:$TAG"
        continue
    fi
    log "building the $target image"
    docker build -q -f deploy/docker/Dockerfile --target "$target" \
        --build-arg "BUILDER_IMAGE=$BUILDER" --build-arg "RUNTIME_IMAGE=$RUNTIME" \
        --build-arg "SHARDGATE_COMMIT=$COMMIT" -t "shardgate-$target:$TAG" . >/dev/null
done
[ -n "${SHARDGATE_E2E_REUSE:-}" ] ||
    docker run --rm "shardgate-coordinator:$TAG" --version | grep -q "$COMMIT" || fail "--version has no commit"

# 3. The compose file with tokens, a suite, and host ports of its own.
mkdir -p "$WORK/secrets" "$WORK/examples" "$WORK/tests/t"
secret_of() {
    "$SHARDGATE" token new --name "$1" --role "$2" >"$WORK/$1.out" || fail "shardgate token new failed"
    head -1 "$WORK/$1.out"
}
FLEET=$(secret_of fleet worker)
CI=$(secret_of ci trigger)
[ -n "$FLEET" ] && [ -n "$CI" ] || fail "no token secrets from shardgate token new"
{ tail -n +2 "$WORK/fleet.out"; echo; tail -n +2 "$WORK/ci.out"; } | grep -v '^#' >"$WORK/secrets/tokens.toml"
printf '%s' "$FLEET" >"$WORK/secrets/fleet.token"
chmod 0644 "$WORK/secrets/"*
printf '[runners.exec]\nkind = "exec"\nroot = "/srv/tests"\n' >"$WORK/examples/runners.toml"
for i in $(seq -w 1 "$TESTS"); do
    printf '#!/bin/sh\necho test %s\nsleep 1\n' "$i" >"$WORK/tests/t/$i.sh"
    chmod 0755 "$WORK/tests/t/$i.sh"
    echo "t/$i.sh"
done >"$WORK/tests.txt"
chmod -R a+rX "$WORK"
# Free host ports on loopback (fixed for the run, so a restart keeps them), and the suite
# mounted into every worker.
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
GRPC_PORT=$(free_port)
HTTP_PORT=$(free_port)
sed -e "s|\"7070:7070\"|\"127.0.0.1:$GRPC_PORT:7070\"|" -e "s|\"7080:7080\"|\"127.0.0.1:$HTTP_PORT:7080\"|" \
    -e "s|      - ./examples/runners.toml:/etc/shardgate/runners.toml:ro|&\n      - $WORK/tests:/srv/tests:ro|" \
    deploy/compose.yaml >"$WORK/compose.yaml"
export SHARDGATE_COORDINATOR_IMAGE=shardgate-coordinator:$TAG SHARDGATE_WORKER_IMAGE=shardgate-worker:$TAG

log "starting a coordinator and $WORKERS workers"
compose up -d --no-build --scale "worker=$WORKERS" >/dev/null 2>&1 || { compose up -d --no-build --scale "worker=$WORKERS"; fail "compose up"; }
URL=http://127.0.0.1:$GRPC_PORT
export SHARDGATE_TOKEN=$CI
live_workers() { "$SHARDGATE" workers --json --coordinator "$URL" 2>/dev/null | grep -c '"state": "live"' || true; }
for _ in $(seq 120); do [ "$(live_workers)" -ge "$WORKERS" ] && break; sleep 1; done
[ "$(live_workers)" -ge "$WORKERS" ] || fail "only $(live_workers) of $WORKERS workers live"

# 4. A run, with faults in the middle of it.
log "running $TESTS tests; killing a worker, cutting one off, restarting the coordinator"
"$SHARDGATE" run --coordinator "$URL" --runner exec --suite e2e --revision "$COMMIT" \
    --tests-file "$WORK/tests.txt" --retries 0 --json --reconnect-for 180s \
    >"$WORK/report.json" 2>"$WORK/client.log" &
CLIENT=$!
done_count() { "$SHARDGATE" runs --json --coordinator "$URL" 2>/dev/null |
    python3 -c 'import json,sys; r=json.load(sys.stdin); print(sum(r[0]["counts"][k] for k in ("passed","failed","flaky","timed_out","infra_error","skipped")) if r else 0)' 2>/dev/null || echo 0; }
for _ in $(seq 60); do [ "$(done_count)" -ge 6 ] && break; sleep 1; done
mapfile -t IDS < <(compose ps -q worker)
docker kill "${IDS[0]}" >/dev/null
docker network disconnect "${PROJECT}_default" "${IDS[1]}"
compose restart coordinator >/dev/null 2>&1
for _ in $(seq 300); do kill -0 "$CLIENT" 2>/dev/null || break; sleep 1; done
kill -0 "$CLIENT" 2>/dev/null && { kill "$CLIENT"; fail "the run did not end within 300 s"; }
CODE=0; wait "$CLIENT" || CODE=$?
[ "$CODE" -eq 0 ] || { cat "$WORK/client.log" >&2; fail "the client exited $CODE"; }
python3 - "$WORK/report.json" "$TESTS" <<'EOF' || fail "the report"
import collections, json, sys
report = json.load(open(sys.argv[1]))
want = int(sys.argv[2])
ids = collections.Counter(t["id"] for t in report["tests"])
assert report["verdict"] == "passed", report["verdict"]
assert len(ids) == want and all(n == 1 for n in ids.values()), "each test once"
assert all(t["outcome"] == "passed" for t in report["tests"]), "all passed"
assert report["counts"]["total"] == want and report["counts"]["passed"] == want, report["counts"]
print(f"== e2e: {want} tests, each counted once, verdict passed, {report['shards']} shards")
EOF

# 5. docker stop drains a worker: it deregisters and exits 0.
VICTIM=${IDS[2]}
docker stop -t 75 "$VICTIM" >/dev/null
[ "$(docker inspect -f '{{.State.ExitCode}}' "$VICTIM")" = 0 ] || fail "a stopped worker exited $(docker inspect -f '{{.State.ExitCode}}' "$VICTIM")"
docker logs "$VICTIM" 2>&1 | grep -q deregistered || fail "the stopped worker did not deregister"
log "passed"
