"""The demo base's pretraining script: runs, is deterministic, writes weights the policy loads."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import torch

from editr1 import demo_base
from editr1.asset_paths import resolve_asset
from editr1.policies import FluxKontextPolicy

ROOT = Path(__file__).resolve().parents[1]


def test_short_pretraining_is_deterministic_and_loadable(tmp_path):
    # The same command gives the same weights up to float summation order. Each run is its own process, as
    # users run it. (Bitwise equality held in a quiet process but not always: see data/demo_base/README.md.)
    from safetensors import safe_open
    from safetensors.torch import load_file

    states, metas = [], []
    for name in ("a", "b"):
        out = subprocess.run(
            [
                sys.executable,
                "-m",
                "editr1.demo_base",
                "--out",
                str(tmp_path / name),
                "--vae-steps",
                "2",
                "--editor-steps",
                "2",
                "--batch",
                "4",
                "--eval-every",
                "0",
                "--eval-count",
                "4",
            ],
            capture_output=True,
            text=True,
            timeout=300,
        )
        assert out.returncode == 0, out.stderr[-3000:]
        states.append(load_file(str(tmp_path / name / "model.safetensors")))
        with safe_open(str(tmp_path / name / "model.safetensors"), "pt") as f:
            metas.append({k: float(v) for k, v in f.metadata().items()})
    a, b = states
    assert metas[0].keys() == metas[1].keys() == {"shift_factor", "scaling_factor"}
    for k in metas[0]:  # the VAE's latent normalisation, measured on a batch: equal up to float rounding
        assert abs(metas[0][k] - metas[1][k]) <= 1e-6 * max(1.0, abs(metas[0][k])), metas
    assert a.keys() == b.keys()
    diff = max(float((a[k] - b[k]).abs().max()) for k in a)
    print(f"largest weight difference between the two runs: {diff:.3g}")
    assert diff < 1e-4
    tiny = demo_base.DEMO_TINY
    tiny = type(tiny)(**{**tiny.__dict__, "weights": str(tmp_path / "a" / "model.safetensors")})
    policy = FluxKontextPolicy(resolution=32, max_sequence_length=16, tiny=tiny)
    assert policy.vae.config.scaling_factor != 1.0  # latent normalisation came from the file's metadata


def test_shipped_base_beats_returning_the_source():
    path = resolve_asset("asset:demo_base/model.safetensors")
    assert Path(path).stat().st_size < 20e6
    tiny = type(demo_base.DEMO_TINY)(**{**demo_base.DEMO_TINY.__dict__, "weights": "asset:demo_base/model.safetensors"})
    policy = FluxKontextPolicy(resolution=32, max_sequence_length=16, tiny=tiny)
    torch.manual_seed(0)
    r = demo_base.evaluate(policy, "heldout", count=16)
    assert r["identity"] == 0.5
    assert r["mean"] > 0.75 and r["ceiling"] > 0.95
