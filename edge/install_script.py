"""The one-line installer an edge serves at ``/v1/agent/install.sh``.

``curl -sfL http://EDGE:8000/v1/agent/install.sh | INFERQ_TOKEN=... sh -s -- [options]``
makes the venv, installs the cluster's inferq wheel into it and hands over to
``inferq agent install`` (same options), which joins and writes the rest. The script
is POSIX sh (dash, busybox ash): a Jetson's /bin/sh is dash.
"""

from __future__ import annotations

SCRIPT = r"""#!/bin/sh
# inferq edge-node agent installer, served by the edge at __SERVER__/v1/agent/install.sh
#   curl -sfL __SERVER__/v1/agent/install.sh | INFERQ_TOKEN=<join token> sh -s -- [options]
# Options: --root DIR  --no-start  --python PATH  --system-site-packages  --node NAME  --capacity N  --wheel FILE|URL
set -eu
SERVER="${INFERQ_SERVER:-__SERVER__}"
TOKEN="${INFERQ_TOKEN:-}"
ROOT=""
PYTHON="python3"
SITE=""
WHEEL=""
while [ $# -gt 0 ]; do
  case "$1" in
    --root) ROOT="$2"; shift 2 ;;
    --python) PYTHON="$2"; shift 2 ;;
    --wheel) WHEEL="$2"; shift 2 ;;
    --system-site-packages) SITE="--system-site-packages"; shift ;;
    --token) TOKEN="$2"; shift 2 ;;
    --server) SERVER="$2"; shift 2 ;;
    *) REST="${REST:-} $1"; shift ;;
  esac
done
[ -n "$TOKEN" ] || { echo "inferq install: set INFERQ_TOKEN (inferq agent token create prints one)" >&2; exit 2; }
if [ -z "$SITE" ] && [ -f "$ROOT/etc/nv_tegra_release" ]; then
  SITE="--system-site-packages"  # Jetson: keep NVIDIA's onnxruntime-gpu from the system Python
fi
VENV="$ROOT/opt/inferq/venv"
MADE=""  # directories made here, for the uninstall script to remove too
for dir in "$ROOT" "$ROOT/opt" "$ROOT/opt/inferq"; do
  if [ -n "$dir" ] && [ ! -d "$dir" ]; then MADE="$MADE --made-dir $dir"; fi
done
mkdir -p "$ROOT/opt/inferq"
"$PYTHON" -m venv $SITE "$VENV"
TMP="$(mktemp -d)"
trap 'rm -rf "$TMP"' EXIT
case "$WHEEL" in
  "") NAME="$(curl -sfLI "$SERVER/v1/agent/inferq.whl" | tr -d '\r' | sed -n 's/^[Xx]-[Ii]nferq-[Ww]heel: *//p' | tail -n 1)"
      [ -n "$NAME" ] || { echo "inferq install: $SERVER serves no inferq wheel; pass --wheel FILE" >&2; exit 2; }
      curl -sfL -o "$TMP/$NAME" "$SERVER/v1/agent/inferq.whl"; WHEEL="$TMP/$NAME" ;;
  http://*|https://*) curl -sfL -o "$TMP/$(basename "$WHEEL")" "$WHEEL"; WHEEL="$TMP/$(basename "$WHEEL")" ;;
esac
"$VENV/bin/python" -m pip install -q --upgrade "$WHEEL"
if ! "$VENV/bin/python" -c "import onnxruntime" 2>/dev/null; then
  "$VENV/bin/python" -m pip install -q "onnxruntime>=1.17"
fi
# The wheel's own server extra (less onnxruntime, handled above), never a copy of the list kept here.
"$VENV/bin/python" -m inferq.agent_install | xargs "$VENV/bin/python" -m pip install -q
SET_ROOT=""
[ -z "$ROOT" ] || SET_ROOT="--root $ROOT"
# shellcheck disable=SC2086  # REST, SET_ROOT and MADE are word lists on purpose
exec "$VENV/bin/inferq" agent install --server "$SERVER" --token "$TOKEN" --venv-ready $SET_ROOT $MADE ${REST:-}
"""


def render_install_script(server: str) -> str:
    """The installer with ``server`` (the edge's URL as the node reaches it) as its default server."""
    return SCRIPT.replace("__SERVER__", server.rstrip("/"))
