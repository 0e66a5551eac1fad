#!/usr/bin/env bash
# Install mamba_ssm and flash_attn from their sources without their CUDA builds into a venv
# (default .venv), so tests/export/test_mamba_ssm_runs.py loads hybridlab's mamba_ssm exports in
# mamba_ssm's own MambaLMHeadModel on CPU (through the torch references both packages ship).
# Without them that test skips. hybridlab itself never imports either package on CPU.
set -euo pipefail
venv="${1:-.venv}"
"$venv/bin/pip" install -q wheel einops
# FORCE_BUILD: otherwise setup.py looks for a prebuilt CUDA wheel and fails on a CPU torch.
MAMBA_SKIP_CUDA_BUILD=TRUE MAMBA_FORCE_BUILD=TRUE \
  "$venv/bin/pip" install -q --no-build-isolation --no-deps mamba-ssm==2.3.2.post1
FLASH_ATTENTION_SKIP_CUDA_BUILD=TRUE FLASH_ATTENTION_FORCE_BUILD=TRUE \
  "$venv/bin/pip" install -q --no-build-isolation --no-deps flash-attn==2.8.3.post2
