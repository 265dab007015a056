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
# botocore (s3fs's) describes every AWS service; a bucket run_dir uses S3, and STS/SSO for credentials.
if [ -d "$site/botocore/data" ]; then
    find "$site/botocore/data" -mindepth 1 -maxdepth 1 -type d ! -name s3 ! -name sts ! -name sso \
        ! -name sso-oidc -exec rm -rf {} +
fi
if [ "${1:-}" = "--no-installers" ]; then
    # Hugging Face's Xet transfer backend (11 MB): huggingface_hub (accelerate's dependency) uses it
    # only to download from the Hub, and downloads over HTTP without it.
    rm -rf "$site"/hf_xet "$site"/hf_xet-*.dist-info
    # wandb's parquet reader (10 MB): its public API reads runs' histories with it; logging never does.
    rm -f "$site/wandb/bin/librust_parquet_ffi.so"
    python -m pip uninstall --yes --quiet pip setuptools wheel 2>/dev/null || true
    find "$site" -path "*.dist-info/RECORD" -delete  # what pip would delete on uninstall: no pip here
    rm -f /opt/venv/bin/pip /opt/venv/bin/pip3*
    python -c 'import torch, distributed_train.cli, s3fs, botocore.session; torch.ones(1)
botocore.session.get_session().create_client("s3", region_name="us-east-1")'
    # Bytecode is a cache (~126 MB): the image sets PYTHONPYCACHEPREFIX=/tmp/pycache, so a
    # container compiles what it imports once, there, and its later processes reuse it.
    find /opt/venv -depth -type d -name __pycache__ -exec rm -rf {} +
else
    python -c 'import torch; torch.ones(1)'
fi
