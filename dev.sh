#!/usr/bin/env bash
# One entry point for a fresh Debian/Ubuntu or Raspberry Pi OS machine.
#   ./dev.sh demo   install, start the twin and let the agent drive it with the shipped autopilot
#   ./dev.sh train-model   retrain models/pilot.tflite with DonkeyCar's trainer, pack it as a bundle (out/pilot-bundle)
#   ./dev.sh test   install what the tests need (Debian packages too, when run as root) and run them all
#   ./dev.sh bench  run the benchmarks under bench/
#   ./dev.sh lint   ruff and mypy only
#   ./dev.sh provision [ansible-playbook args]   provision the cars of an inventory (ansible/site.yml)
set -euo pipefail
cd "$(dirname "$0")"

PYTHON=${PYTHON:-python3}
VENV=${VENV:-.venv}
# Debian packages the tests use: systemd (systemd-analyze), util-linux (setpriv, prlimit, nsenter),
# debootstrap and systemd-container (a real systemd for the unit, in systemd-nspawn), mosquitto (a real broker),
# python3-gpg (keylime/signing.py imports gpg and no wheel of it exists; the attestation tests use Keylime's code).
TEST_DEBS=(python3-venv python3-dev systemd util-linux debootstrap systemd-container mosquitto mosquitto-clients
           python3-gpg)
DEMO_DEBS=(python3-venv)

say() { printf '\033[1m==> %s\033[0m\n' "$*" >&2; }

install_debs() {
    local missing=()
    for pkg in "$@"; do
        dpkg-query -W -f='${Status}' "$pkg" 2>/dev/null | grep -q "install ok installed" || missing+=("$pkg")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    if [ "$(id -u)" -eq 0 ] && command -v apt-get >/dev/null; then
        say "installing Debian packages: ${missing[*]}"
        apt-get update -qq
        DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
    elif ! "$PYTHON" -c 'import ensurepip, venv' 2>/dev/null; then
        echo "missing Debian packages: ${missing[*]}; run: sudo apt-get install ${missing[*]}" >&2
        exit 1
    fi
}

# Create the virtualenv and install the project with the given extras, once per pyproject change.
ensure_env() {
    local extras=$1
    command -v dpkg-query >/dev/null && install_debs "${@:2}"
    if [ ! -x "$VENV/bin/python" ]; then
        say "creating $VENV with $("$PYTHON" --version)"
        "$PYTHON" -m venv "$VENV"
    fi
    local stamp="$VENV/.installed-${extras:-base}"
    if [ ! -f "$stamp" ] || [ pyproject.toml -nt "$stamp" ]; then
        say "installing donkey-edge-agent${extras:+[$extras]} into $VENV"
        "$VENV/bin/python" -m pip install -q --upgrade pip
        "$VENV/bin/python" -m pip install -q -e ".${extras:+[$extras]}"
        touch "$stamp"
    fi
}

demo() {
    ensure_env "" "${DEMO_DEBS[@]}"
    local port=${DEMO_PORT:-9091} seconds=${DEMO_SECONDS:-65}
    mkdir -p out
    # The demo's car keeps its safety state (latched faults, how the last run ended) and its model store in
    # out/demo-state, fresh each time: a demo interrupted the hard way must not hold the next one at neutral.
    rm -rf out/demo-state out/demo-bundle out/demo-keys
    export XDG_STATE_HOME="$PWD/out/demo-state"
    demo_signed_model
    say "starting the twin on 127.0.0.1:$port (generated_track)"
    "$VENV/bin/donkey-sim" serve --port "$port" --track generated_track --summary out/demo-summary.json &
    local twin=$!
    trap 'kill -TERM $twin 2>/dev/null || true' EXIT
    say "donkey-agent drives for ${seconds}s with the shipped autopilot, as a signed bundle; Ctrl-C stops it safely"
    "$VENV/bin/donkey-agent" run --config out/demo-agent.toml --sim "127.0.0.1:$port" --duration "$seconds" \
        --record out/demo-tub
    kill -TERM "$twin"
    wait "$twin" || true
    trap - EXIT
    say "twin summary (out/demo-summary.json):"
    cat out/demo-summary.json
}

# The shipped autopilot the way a fleet delivers it: packed as a bundle, signed with a throw-away key made here
# (a real fleet's key never leaves its build machine), verified and staged into the demo car's store, whose trust
# store holds the public half. The car then starts with it as its first, signed model (docs/models.md).
demo_signed_model() {
    say "packing and signing models/pilot.tflite with a throw-away key (out/demo-keys), installing it"
    mkdir -p out/demo-keys/trust
    "$VENV/bin/python" - <<'PY'
from pathlib import Path
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
key = ec.generate_private_key(ec.SECP256R1())
Path("out/demo-keys/demo.key").write_bytes(key.private_bytes(
    serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
Path("out/demo-keys/trust/demo.pem").write_bytes(key.public_key().public_bytes(
    serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
PY
    printf '[models]\ntrust_dir = "%s/out/demo-keys/trust"\n' "$PWD" > out/demo-agent.toml
    "$VENV/bin/donkey-agent" model pack out/demo-bundle --model models/pilot.tflite --name pilot \
        --version "demo-$(date -u +%Y%m%d%H%M)" >/dev/null
    "$VENV/bin/donkey-agent" model sign out/demo-bundle --key out/demo-keys/demo.key >/dev/null
    "$VENV/bin/donkey-agent" model install out/demo-bundle --config out/demo-agent.toml | grep '^staged:'
}

lint() {
    "$VENV/bin/ruff" check .
    "$VENV/bin/mypy"
}

# Every benchmark, one after another (about 25 min on a 2-core machine); figures in bench/results/, written up in
# docs/performance.md. Nothing else should run meanwhile: they measure time.
run_benchmarks() {
    for bench in twin_frame twin_isolation drive_loop mqtt_publish soak; do
        say "bench/$bench.py"
        "$VENV/bin/python" -m "bench.$bench"
    done
}

# Retrain the shipped autopilot, then pack it as a signed-model bundle with its provenance filled in (the tubs'
# digests, DonkeyCar's version, the twin evaluation): out/pilot-bundle. Signed when SIGNING_KEY names an ECDSA
# private key (PEM); such a key never belongs in this repository (docs/models.md).
train_model() {
    ensure_env "train" "${TEST_DEBS[@]}"
    NO_ALBUMENTATIONS_UPDATE=1 "$VENV/bin/python" models/train.py
    pack_trained_model
}

pack_trained_model() {
    local bundle=out/pilot-bundle version
    version=$(date -u +%Y.%m.%d.%H%M)
    mkdir -p out
    rm -rf "$bundle"
    "$VENV/bin/python" -m agent.bundle.provenance --train-manifest models/manifest.json \
        --command "python models/train.py" build/train/tub_* > out/provenance.json
    "$VENV/bin/donkey-agent" model pack "$bundle" --model models/pilot.tflite --name pilot --version "$version" \
        --provenance out/provenance.json
    if [ -n "${SIGNING_KEY:-}" ]; then
        "$VENV/bin/donkey-agent" model sign "$bundle" --key "$SIGNING_KEY"
    else
        say "not signed: set SIGNING_KEY=/path/to/key.pem, or run: donkey-agent model sign $bundle --key KEY"
    fi
}

# The Ansible collections the playbook and ansible-lint need, from the PyPI `ansible` wheel (Galaxy is not
# reachable from CI), into ansible/collections/ (not committed).
vendor_collections() {
    PIP="$(cd "$VENV" && pwd)/bin/python -m pip" ansible/vendor-collections.sh
}

run_tests() {
    ensure_env "dev" "${TEST_DEBS[@]}"
    vendor_collections
    say "lint"
    lint
    say "tests"
    "$VENV/bin/python" -m pytest "$@"
}

case "${1:-}" in
    demo) demo ;;
    test) shift; run_tests "$@" ;;
    train-model) train_model ;;
    bench) ensure_env "dev" "${TEST_DEBS[@]}"; run_benchmarks ;;
    lint) ensure_env "dev" "${TEST_DEBS[@]}"; lint ;;
    provision) shift; ensure_env "ansible" "${DEMO_DEBS[@]}"; vendor_collections
               playbook="$(cd "$VENV" && pwd)/bin/ansible-playbook"; cd ansible && exec "$playbook" site.yml "$@" ;;
    *) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 2 ;;
esac
