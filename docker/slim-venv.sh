#!/bin/sh
# Removes from /opt/venv what the image's runtime never runs; run after each `pip install` of the
# build stages (docker/Dockerfile), with --no-installers after the last one. Each step touches only
# what is still there, so a later layer does not copy torch's libraries again. Fails if torch or
# the package no longer imports.
set -eu
site=$(python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
if [ -d "$site/torch/include" ]; then  # torch just installed: its build and test files, its symbols
    rm -rf "$site/torch/include" "$site/torch/share" "$site/torch/test" "$site/torch/lib/"*_test*.so
    find "$site/torch/bin" -mindepth 1 ! -name torch_shm_manager -exec rm -rf {} +
    # The symbol tables only (~90 MB on CPU): the dynamic symbols that loading and linking use stay.
    if command -v strip >/dev/null; then
        strip --strip-unneeded "$site/torch/lib/"*.so*
    fi
fi
find "$site" -depth -type d -name tests -path "$site/*/*" ! -path "$site/torch/*" -exec rm -rf {} +
if [ "${1:-}" = "--no-installers" ]; then
    python -m pip uninstall --yes --quiet pip setuptools wheel 2>/dev/null || true
    rm -f /opt/venv/bin/pip /opt/venv/bin/pip3*
    python -c 'import torch, distributed_train.cli; torch.ones(1)'
else
    python -c 'import torch; torch.ones(1)'
fi
