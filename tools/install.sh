#!/usr/bin/env bash
# Create (or reuse) the project's virtual environment with the exact stack that
# works on torch 2.14: see README "Installation". Idempotent: when the stamp
# matches this script and setup.py, nothing is installed.
set -euo pipefail

root=$(cd "$(dirname "$0")/.." && pwd)
venv=${GPLQ_VENV:-$root/.venv}
python=${PYTHON:-python3.11}
stamp=$venv/.gplq-installed
want=$(cat "$root/tools/install.sh" "$root/setup.py" | sha256sum | cut -d' ' -f1)

if [ -f "$stamp" ] && [ "$(cat "$stamp")" = "$want" ]; then
  exit 0
fi

if ! command -v "$python" >/dev/null 2>&1; then
  echo "install.sh: $python not found; set PYTHON=/path/to/python3.11" >&2
  exit 1
fi

echo "install.sh: setting up $venv (a few minutes; mmcv builds from source" \
  "when no prebuilt wheel is cached, about 15 minutes on 2 cores)" >&2
[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --disable-pip-version-check)

# setuptools < 81 keeps pkg_resources, which mmengine uses for `mmdet::` bases
# and mmcv's setup.py imports; torch 2.14 needs >= 77.
"${pip[@]}" "setuptools>=77,<81" wheel ninja
"${pip[@]}" torch==2.14.1 torchvision==0.29.1 "setuptools>=77,<81"
"${pip[@]}" mmengine==0.10.7 numpy "opencv-python-headless<4.13" \
  pycocotools "setuptools>=77,<81"

# mmcv 2.1.0 ships only a source distribution on PyPI. Its setup.py hard-codes
# -std=c++14/17 but torch >= 2.10 headers need C++20, so compile through
# wrappers that swap the flag. A cached wheel (../shared/wheels) is used when
# present; pip's own cache makes a second build instant.
if ! "$venv/bin/python" -c "import mmcv, mmcv.ops" >/dev/null 2>&1; then
  wrap=$(mktemp -d)
  trap 'rm -rf "$wrap"' EXIT
  for pair in gcc:cc g++:cxx; do
    real=${pair%%:*}; name=${pair##*:}
    cat > "$wrap/$name" <<WRAP
#!/usr/bin/env bash
args=()
for a in "\$@"; do
  case "\$a" in -std=c++14|-std=c++17) a=-std=c++20 ;; esac
  args+=("\$a")
done
exec $real "\${args[@]}"
WRAP
    chmod +x "$wrap/$name"
  done
  links=()
  shared_wheels=$root/../shared/wheels
  [ -d "$shared_wheels" ] && links=(--find-links "$shared_wheels")
  cuda=0
  if command -v nvcc >/dev/null 2>&1 && command -v nvidia-smi >/dev/null 2>&1 \
    && nvidia-smi -L >/dev/null 2>&1; then
    cuda=1
  fi
  MMCV_WITH_OPS=1 FORCE_CUDA=$cuda MAX_JOBS=${MAX_JOBS:-2} \
    CC="$wrap/cc" CXX="$wrap/cxx" \
    "${pip[@]}" --no-build-isolation "${links[@]}" mmcv==2.1.0
fi

"${pip[@]}" mmdet==3.3.0 timm==1.0.31 pytest ruff matplotlib onnx onnxruntime \
  "setuptools>=77,<81"
"${pip[@]}" --no-deps --no-build-isolation -e "$root"

"$venv/bin/python" -c "import mmcv.ops, mmdet, timm, gplq_mmdet" || {
  echo "install.sh: the environment does not import; see the log above" >&2
  exit 1
}
echo "$want" > "$stamp"
echo "install.sh: environment ready in $venv" >&2
