#!/usr/bin/env bash
# Install everything blockswap-plugin needs into .venv at the repository root.
#
# Safe to run again: each step is skipped when its result is already there.
# mmcv 2.1.0 (the newest mmcv that mmdet 3.3.0 accepts) has no wheel for
# torch 2.14, and its sdist asks the compiler for C++14/C++17 while torch
# 2.14's headers need C++20. This script builds it from the sdist with its
# compiled ops and C++20, then caches the wheel under
# ${BLOCKSWAP_CACHE:-~/.cache/blockswap-plugin}/mmcv-2.1.0-torch<version>/
# so the next install on the same machine takes seconds. It also compiles
# the package's compiled scoring helpers once per machine (about 80 s).
#
# Usage: bash tools/install.sh [--no-mmcv]
#   --no-mmcv   skip step 2 (the mmcv build): enough for the timm path and the
#               CIFAR-10 main job, which do not use mmcv
#
# Environment:
#   PYTHON          interpreter used to create .venv (default: python3.11 if
#                   found, else python3)
#   BLOCKSWAP_CACHE folder for the built mmcv wheel
#   MAX_JOBS        parallel compile jobs for the mmcv build (default: nproc)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
venv="$root/.venv"
cache="${BLOCKSWAP_CACHE:-$HOME/.cache/blockswap-plugin}"
torch_version="2.14.1"
torchvision_version="0.29.1"
mmcv_version="2.1.0"

log() { printf '[install] %s\n' "$*" >&2; }

with_mmcv=1
for arg in "$@"; do
    case "$arg" in
        --no-mmcv) with_mmcv=0 ;;
        -h|--help) sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d; s/^# \{0,1\}//'; exit 0 ;;
        *) log "error: unknown option '$arg'; the only option is --no-mmcv"; exit 2 ;;
    esac
done

if [ ! -x "$venv/bin/python" ]; then
    python="${PYTHON:-}"
    if [ -z "$python" ]; then
        python="$(command -v python3.11 || command -v python3)"
    fi
    log "creating $venv with $python"
    "$python" -m venv "$venv"
fi
py="$venv/bin/python"
pip=("$py" -m pip install --disable-pip-version-check -q)
# pip warns about every local index folder that lacks a package; keep only
# the lines that matter.
quiet() { "$@" 2> >(grep -v "^WARNING: Location" >&2); }

# 1. torch, torchvision and the pure-Python stack.
if ! "$py" -c "import torch, torchvision; assert torch.__version__.split('+')[0] == '$torch_version'" 2>/dev/null; then
    log "installing torch $torch_version and torchvision $torchvision_version (large download on first run)"
    quiet "${pip[@]}" "torch==$torch_version" "torchvision==$torchvision_version"
fi
# mmdet is looked up, not imported: importing it needs mmcv, which step 2 builds.
if ! "$py" -c "import timm, mmengine, pytest, tqdm, yaml, matplotlib, pycocotools, pkg_resources, importlib.util as u; assert u.find_spec('mmdet')" 2>/dev/null; then
    log "installing timm, mmengine, mmdet and the test tools"
    # mmdet lists mmcv only as an optional requirement, so this does not try
    # to build mmcv; that happens below. numpy stays below 2 because mmcv
    # 2.1.0 and mmdet 3.3.0 were released against numpy 1.x. torch is named
    # again so that no other requirement can make pip swap it for another
    # release. setuptools 81 dropped pkg_resources, which mmengine 0.10.7
    # needs to resolve 'mmdet::' base configs, and torch 2.14 needs >=77.0.3.
    quiet "${pip[@]}" "torch==$torch_version" "torchvision==$torchvision_version" \
        "timm>=1.0.20" "mmengine>=0.10,<0.11" "mmdet==3.3.0" "numpy<2" \
        "pytest" "tqdm" "pyyaml" "matplotlib" "pycocotools" "scipy" "psutil" \
        "wheel" "ninja" "setuptools>=77.0.3,<81"
fi

# 2. mmcv 2.1.0 with its compiled ops.
if [ "$with_mmcv" = 0 ]; then
    log "skipping the mmcv build (--no-mmcv); run tools/install.sh without --no-mmcv before using the mmdet adapter"
elif "$py" -c "from mmcv.ops import nms" 2>/dev/null; then
    log "mmcv with ops already works, skipping its build"
else
    torch_tag="$("$py" -c "import torch; print(torch.__version__.replace('+', '_'))")"
    wheel_dir="$cache/mmcv-$mmcv_version-torch$torch_tag"
    wheel="$(ls "$wheel_dir"/mmcv-"$mmcv_version"-*.whl 2>/dev/null | head -n 1 || true)"
    if [ -z "$wheel" ]; then
        log "building mmcv $mmcv_version with ops and C++20 (about 12 minutes on 2 cores)"
        work="$(mktemp -d)"
        trap 'rm -rf "$work"' EXIT
        # mmcv's setup.py needs setuptools<70, but torch 2.14 requires
        # setuptools>=77, so the old setuptools goes to a side folder that only
        # the build sees (PYTHONPATH) and the venv keeps the one torch wants.
        quiet "$py" -m pip install --disable-pip-version-check -q \
            --target "$work/build-tools" "setuptools<70"
        export PYTHONPATH="$work/build-tools${PYTHONPATH:+:$PYTHONPATH}"
        # --no-build-isolation lets pip read the sdist's metadata with the
        # venv's torch instead of a fresh build environment without it.
        quiet "$py" -m pip download --disable-pip-version-check -q --no-deps \
            --no-binary mmcv --no-build-isolation -d "$work" "mmcv==$mmcv_version"
        tar -xzf "$work"/mmcv-"$mmcv_version".tar.gz -C "$work"
        src="$work/mmcv-$mmcv_version"
        sed -i -E 's/-std=c\+\+1[47]/-std=c++20/g; s/c\+\+1[47]/c++20/g' "$src/setup.py"
        if ! grep -q 'c++20' "$src/setup.py"; then
            log "error: no C++ standard flag found to patch in $src/setup.py"
            exit 1
        fi
        ( cd "$src" && MMCV_WITH_OPS=1 FORCE_CUDA=0 MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
            quiet "$py" -m pip wheel --disable-pip-version-check -q --no-deps \
            --no-build-isolation -w "$work/dist" . )
        unset PYTHONPATH
        mkdir -p "$wheel_dir"
        built="$(ls "$work"/dist/mmcv-*.whl | head -n 1)"
        # Copy under a temporary name first, so an interrupted copy never
        # looks like a finished cache entry.
        cp "$built" "$wheel_dir/.partial"
        mv "$wheel_dir/.partial" "$wheel_dir/$(basename "$built")"
        wheel="$wheel_dir/$(basename "$built")"
        log "cached $wheel"
    fi
    log "installing $wheel"
    quiet "${pip[@]}" --no-deps "$wheel"
    quiet "${pip[@]}" "addict" "yapf" "opencv-python-headless" "packaging" "pillow"
    "$py" -c "from mmcv.ops import nms" || { log "error: mmcv ops failed to import after install"; exit 1; }
fi

# 3. This package, editable, so the console script 'blockswap' exists.
if ! "$py" -c "import blockswap_plugin" 2>/dev/null || [ ! -x "$venv/bin/blockswap" ]; then
    log "installing blockswap-plugin (editable)"
    quiet "${pip[@]}" --no-deps --no-build-isolation -e "$root"
fi
# 4. The fused batch norm + ReLU kernel that speeds up scoring on CPU
# (about 80 s to compile, cached under $cache/extensions). Without a working
# compiler the search still runs, more slowly, so a failure here only warns.
if ! BLOCKSWAP_CACHE="$cache" "$venv/bin/blockswap" kernel >/dev/null 2>&1; then
    log "warning: could not build the fused scoring kernel; searches on CPU will be slower"
    log "         (run '$venv/bin/blockswap kernel' to see why)"
fi
log "environment ready: $venv"
