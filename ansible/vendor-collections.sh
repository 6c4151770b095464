#!/usr/bin/env bash
# Fill ansible/collections/ with the collections the playbook and ansible-lint need, taken from the PyPI `ansible`
# wheel (Galaxy is not reachable from CI). Run by ./dev.sh test and ./dev.sh provision; idempotent: a stamp file
# records the wheel's version, so a second run does nothing. The collections are not committed (.gitignore).
#   ANSIBLE_BUNDLE=ansible==12.3.0   the wheel to take them from (ansible 12.x pairs with ansible-core 2.19)
#   PIP="python3 -m pip"             the pip that downloads it
set -euo pipefail
cd "$(dirname "$0")"

BUNDLE=${ANSIBLE_BUNDLE:-ansible==12.3.0}
PIP=${PIP:-python3 -m pip}
# ansible.posix (authorized_key, mount...), community.general (modprobe, ini_file...), community.docker (the nsenter
# connection the end-to-end test uses to reach a booted systemd-nspawn container).
WANTED=(ansible/posix community/general community/docker)
TARGET=collections/ansible_collections
STAMP=collections/.vendored

if [ -f "$STAMP" ] && [ "$(cat "$STAMP")" = "$BUNDLE" ]; then
    exit 0
fi
scratch=$(mktemp -d)
trap 'rm -rf "$scratch"' EXIT
# shellcheck disable=SC2086  # PIP may be several words
$PIP download -q --no-deps --only-binary=:all: -d "$scratch" "$BUNDLE"
wheel=$(ls "$scratch"/ansible-*.whl)
patterns=()
for name in "${WANTED[@]}"; do
    patterns+=("ansible_collections/$name/*")
done
rm -rf collections
mkdir -p collections
python3 - "$wheel" collections "${patterns[@]}" <<'PY'
import fnmatch
import sys
import zipfile

wheel, target, *patterns = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    names = [name for name in archive.namelist() if any(fnmatch.fnmatch(name, pattern) for pattern in patterns)]
    if not names:
        sys.exit(f"{wheel}: none of {patterns}")
    archive.extractall(target, names)
PY
for name in "${WANTED[@]}"; do
    [ -d "$TARGET/$name" ] || { echo "vendor-collections: $name missing from $BUNDLE" >&2; exit 1; }
done
echo "$BUNDLE" > "$STAMP"
echo "vendored ${WANTED[*]} from $BUNDLE into ansible/$TARGET" >&2
