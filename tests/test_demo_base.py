"""The demo base's pretraining script: runs, is deterministic, writes weights the policy loads."""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from editr1 import demo_base
from editr1.policies import FluxKontextPolicy
from editr1.policies.base import resolve_asset

ROOT = Path(__file__).resolve().parents[1]


def test_short_pretraining_is_deterministic_and_loadable(tmp_path):
    digests = []
    for name in ("a", "b"):
        demo_base.main(["--out", str(tmp_path / name), "--vae-steps", "2", "--editor-steps", "2", "--batch", "4",
                        "--eval-every", "0", "--eval-count", "4"])
        digests.append(hashlib.sha256((tmp_path / name / "model.safetensors").read_bytes()).hexdigest())
    assert digests[0] == digests[1]
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
