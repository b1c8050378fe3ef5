"""Performance benchmarks P1–P6 of the training loop (issue 8), each measured side by side in one run
(cases interleaved, best of the repeats). CPU by default; every figure is a ratio, printed with its target.

    python benchmarks/perf.py                 # all of P1–P6
    python benchmarks/perf.py --only P1 P3    # some of them
    python benchmarks/perf.py --quick         # fewer repeats and smaller problems (a smoke run)

P1  NFT training step vs a plain flow-matching step: same model, samples, micro-batches, timesteps
    and noise (target <= 1.7x).
P2  rollout of one group of K = 12 (encode once, batched denoising) vs 12 calls of diffusers'
    FluxKontextPipeline on the same transformer at the same steps (target <= 0.5x).
P3  a step with half the groups filtered vs none filtered (target <= 0.6x).
P4  memory: extra parameters for θ_old and the reference vs the LoRA (target <= 2x, no copy of the
    base); checkpoint bytes vs trainable-parameter bytes.
P5  DPM-Solver++(2M) vs Euler: Euler steps needed to match DPM-Solver++ at 6 steps in error against
    a 100-step reference, on the demo's trained base (target >= 2x).
P6  share of a training step spent in the model's forward/backward at the "small" size (hidden 256,
    128² images) (target >= 85%).
"""

from __future__ import annotations

import argparse
import io
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
warnings.filterwarnings("ignore")
logging.getLogger("lightning.pytorch").setLevel(logging.ERROR)

import torch  # noqa: E402

from editr1.module import EditR1Module, NFTSettings, RolloutSettings  # noqa: E402
from editr1.policies import lora  # noqa: E402
from editr1.policies.lora import LoraSettings  # noqa: E402
from perf_common import (  # noqa: E402
    detach_from_trainer,
    flux_policy,
    fm_step,
    fmt_ratio,
    interleaved,
    model_time,
    nft_step,
    scenes,
    step_data,
    timed,
)

PAPER_LORA = LoraSettings(rank=32, alpha=64.0)


def module_for(size: str, resolution: int, micro: int, kl: float = 1e-4, **kw) -> EditR1Module:
    m = EditR1Module(
        policy=flux_policy(size, resolution),
        lora=PAPER_LORA,
        nft=NFTSettings(micro_batch_size=micro, kl_weight=kl),
        seed=1,
        **kw,
    )
    detach_from_trainer(m)
    return m


def best(times: list[float]) -> float:
    return min(times)


# ------------------------------------------------------------------------------------------------ P1
def p1(args) -> None:
    print("\n== P1  NFT step vs flow-matching step (same samples, micro-batches, timesteps, noise)")
    size, res = ("tiny", 32) if args.quick else ("small", 128)
    groups, k, steps = (2, 2, 3) if args.quick else (2, 2, 6)
    for kl in (1e-4, 0.0):
        m = module_for(size, res, micro=4, kl=kl)
        data = step_data(m, groups, k, steps)
        t = interleaved({"nft": lambda: nft_step(m, data), "fm": lambda: fm_step(m, data)}, args.repeats)
        # per-call costs: forward without grad, forward with grad, backward (LoRA on a frozen base)
        ro = data.rollout
        x = ro.x0[:4]
        tt = torch.full((x.shape[0],), 0.5)
        cond = ro.cond.select(ro.group_index[:4])
        pol = m.policy

        def fwd_nograd():
            with torch.no_grad():
                pol.velocity(x, tt, cond)

        def fwd_bwd():
            pol.velocity(x, tt, cond).square().mean().backward()

        c = interleaved({"F": fwd_nograd, "FB": fwd_bwd}, args.repeats)
        m.optimizers().zero_grad(set_to_none=True)
        f, fb = best(c["F"]), best(c["FB"])
        fwd_per_step = 3 if kl > 0 else 2  # θ_old, reference (when λ_KL > 0), θ
        floor = ((fwd_per_step - 1) * f + fb) / fb
        ratio = best(t["nft"]) / best(t["fm"])
        print(
            f"[{size}, {res}px, {groups}x{k} samples, {steps - 1} timesteps, micro-batch 4, LoRA r32, kl_weight {kl:g}]"
        )
        print(
            f"  NFT step {best(t['nft']):.3f} s   flow-matching step {best(t['fm']):.3f} s   "
            f"ratio {fmt_ratio(ratio, 1.7, '<=')}"
        )
        print(
            f"  one forward (no grad) {f * 1e3:.1f} ms, forward+backward {fb * 1e3:.1f} ms "
            f"(backward = {(fb - f) / f:.2f} forwards): floor {fwd_per_step - 1} F + (F+B) over (F+B) = {floor:.2f}x; "
            f"measured / floor = {ratio / floor:.2f}"
        )


# ------------------------------------------------------------------------------------------------ P2
def p2(args) -> None:
    from editr1.editing import edit_images

    print("\n== P2  one group of K = 12: batched rollout vs 12 diffusers pipeline calls (same steps)")
    res, steps, k = (32, 6, 12)
    size = "tiny"
    m = module_for(size, res, micro=4)
    pol = m.policy
    pol.pipe.set_progress_bar_config(disable=True)
    images, prompts = scenes(1, res, seed=3)
    src = pol.preprocess(images)
    seeds = list(range(k))

    def ours(batch_size: int, solver: str):
        def run():
            with pol.adapter(lora.OLD):
                edit_images(pol, src, prompts, seeds, steps=steps, solver=solver, batch_size=batch_size, group_size=k)

        return run

    def ours_separately(solver: str):
        def run():
            with pol.adapter(lora.OLD):
                for s in seeds:
                    edit_images(pol, src, prompts, [s], steps=steps, solver=solver, batch_size=1)

        return run

    def pipeline():
        with pol.adapter(lora.OLD):
            for s in seeds:
                pol.pipe(
                    image=images[0],
                    prompt=prompts[0],
                    height=res,
                    width=res,
                    max_area=res * res,
                    _auto_resize=False,
                    num_inference_steps=steps,
                    guidance_scale=2.5,
                    max_sequence_length=pol.max_sequence_length,
                    generator=torch.Generator().manual_seed(s),
                    output_type="pt",
                )

    cases = {
        "pipeline x12": pipeline,
        "ours, 12 separate calls (euler)": ours_separately("euler"),
        "ours, one group (euler)": ours(12, "euler"),
        "ours, one group (dpmpp_2m)": ours(12, "dpmpp_2m"),
    }
    t = interleaved(cases, args.repeats)
    base = best(t["pipeline x12"])
    print(f"[FLUX.1-Kontext {size}, {res}px, {steps} steps, K = {k}, decode included]")
    for name, v in t.items():
        print(f"  {name:34s} {best(v):.3f} s   {best(v) / base:.2f}x of the pipeline")
    print(f"  group rollout / 12 pipeline calls: {fmt_ratio(best(t['ours, one group (dpmpp_2m)']) / base, 0.5, '<=')}")


# ------------------------------------------------------------------------------------------------ P3
def p3(args) -> None:
    print("\n== P3  step with half the groups filtered vs none filtered")
    configs = [("tiny", 32, 4, 4, 4)] if args.quick else [("tiny", 32, 4, 4, 4), ("small", 128, 4, 2, 4)]
    for size, res, groups, k, micro in configs:
        m = module_for(size, res, micro=micro)
        full = step_data(m, groups, k, 3)
        half = step_data(m, groups, k, 3, keep_groups=groups // 2)
        t = interleaved({"none": lambda: nft_step(m, full), "half": lambda: nft_step(m, half)}, args.repeats)
        with model_time(m) as acc:
            nft_step(m, half)
        calls = acc  # forward count is not tracked; time is enough
        ratio = best(t["half"]) / best(t["none"])
        print(f"[{size}, {res}px, {groups} groups x {k}, micro-batch {micro}, 2 timesteps]")
        print(
            f"  none filtered {best(t['none']):.3f} s   half filtered {best(t['half']):.3f} s   "
            f"ratio {fmt_ratio(ratio, 0.6, '<=')}   (model share of the half step "
            f"{(calls['forward'] + calls['backward']) / best(t['half']):.0%})"
        )


# ------------------------------------------------------------------------------------------------ P4
def p4(args) -> None:
    import lightning as L

    print("\n== P4  memory: the old and reference policies, and checkpoints")
    for size, res in [("tiny", 32)] if args.quick else [("tiny", 32), ("small", 128)]:
        pol = flux_policy(size, res)
        base = sum(p.numel() for p in pol.transformer.parameters())
        ptrs = {p.data_ptr() for p in pol.transformer.parameters()}
        m = EditR1Module(policy=pol, lora=PAPER_LORA, seed=1)
        after = sum(p.numel() for p in pol.transformer.parameters())
        base_after = sum(p.numel() for n, p in pol.transformer.named_parameters() if "lora_" not in n)
        shared = all(p.data_ptr() in ptrs for n, p in pol.transformer.named_parameters() if "lora_" not in n)
        lora_size = sum(p.numel() for p in lora.adapter_parameters(pol.transformer, lora.DEFAULT).values())
        extra = after - base - lora_size  # what θ_old and the reference add beyond θ
        print(f"[{size}: transformer {base / 1e6:.2f} M parameters, LoRA r32 {lora_size / 1e6:.3f} M]")
        print(
            f"  base parameters after adding adapters: {base_after / 1e6:.2f} M (same tensors: {shared}); "
            f"extra for θ_old + reference: {extra / 1e6:.3f} M = {fmt_ratio(extra / lora_size, 2.0, '<=')} "
            "of the LoRA (reference = adapters off: 0)"
        )

    # checkpoint of a real one-step fit on the tiny model
    from editr1.callbacks import RewardCallback
    from editr1.data import EditDataModule, SceneConfig
    from editr1.rewards import SceneReward

    pol = flux_policy("tiny", 32)
    m = EditR1Module(
        policy=pol,
        lora=PAPER_LORA,
        nft=NFTSettings(micro_batch_size=8),
        seed=1,
        rollout=RolloutSettings(group_size=4, steps=4, batch_size=8),
    )
    data = EditDataModule(scenes=SceneConfig(size=32), batch_size=2, train_size=8, val_size=2)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = L.Trainer(
            accelerator="cpu",
            devices=1,
            max_steps=1,
            logger=False,
            enable_checkpointing=False,
            enable_progress_bar=False,
            enable_model_summary=False,
            limit_val_batches=0,
            default_root_dir=tmp,
            callbacks=[RewardCallback(model=SceneReward(), log_images_every_n_steps=0)],
        )
        trainer.fit(m, datamodule=data)
        path = Path(tmp) / "one.ckpt"
        trainer.save_checkpoint(str(path))
        size_ck = path.stat().st_size
        ck = torch.load(path, weights_only=True)
    trainable = sum(p.numel() * p.element_size() for p in pol.trainable_parameters())

    def nbytes(obj) -> int:
        buf = io.BytesIO()
        torch.save(obj, buf)
        return buf.getbuffer().nbytes

    sd, opt = nbytes(ck["state_dict"]), nbytes(ck["optimizer_states"])
    print(f"[checkpoint after one step, tiny, LoRA r32: trainable {trainable / 1e6:.2f} MB]")
    print(
        f"  file {size_ck / 1e6:.2f} MB = {size_ck / trainable:.2f}x the trainable bytes: adapters θ + θ_old "
        f"{sd / 1e6:.2f} MB ({sd / trainable:.2f}x), AdamW moments {opt / 1e6:.2f} MB ({opt / trainable:.2f}x), "
        f"rest {(size_ck - sd - opt) / 1e3:.0f} kB; no base weights"
    )


# ------------------------------------------------------------------------------------------------ P5
def p5(args) -> None:
    from editr1.demo_base import DEMO_TINY, MAX_SEQUENCE_LENGTH
    from editr1.policies import FluxKontextPolicy, TinyFlux
    from editr1.sampling import sample
    from editr1.seeding import per_sample_randn

    print("\n== P5  DPM-Solver++(2M) vs Euler: steps for equal error against a 100-step reference")
    tiny = TinyFlux(**{**vars(DEMO_TINY), "weights": "asset:demo_base/model.safetensors"})
    pol = FluxKontextPolicy(resolution=32, max_sequence_length=MAX_SEQUENCE_LENGTH, tiny=tiny)
    n = 4 if args.quick else 16
    images, prompts = scenes(n, 32, seed=11)
    cond = pol.encode(pol.preprocess(images), prompts)
    noise = per_sample_randn(pol.latent_shape(), list(range(n)))

    def run(steps: int, solver: str, first_order_second_to_last: bool = False) -> torch.Tensor:
        return sample(
            lambda x, t: pol.velocity(x, t, cond), noise, pol.sigmas(steps), solver, first_order_second_to_last
        )

    def err(x: torch.Tensor, ref: torch.Tensor) -> float:
        return float(((x - ref) ** 2).mean().sqrt() / (ref**2).mean().sqrt())

    refs = {"dpmpp_2m": run(100, "dpmpp_2m"), "euler": run(100, "euler")}
    print(
        f"[the demo's trained base (hidden 128), 32px, {n} edits; error = RMS(x - ref) / RMS(ref) of final latents; "
        f"the two 100-step references differ by {err(refs['euler'], refs['dpmpp_2m']):.4f}]"
    )
    euler_errs = {name: {} for name in refs}
    for ref_name, ref in refs.items():
        for lower in (False, True):
            target = err(run(6, "dpmpp_2m", lower), ref)
            errs = euler_errs[ref_name]
            needed = None
            for steps in range(6, 61):
                if steps not in errs:
                    errs[steps] = err(run(steps, "euler"), ref)
                if errs[steps] <= target:
                    needed = steps
                    break
            got = f"{needed} steps = {fmt_ratio(needed / 6, 2.0, '>=')}" if needed else "more than 60 steps"
            rule = "also first order on the 2nd-to-last step (earlier rule)" if lower else "orders 1,2,..,2,1 (default)"
            print(f"  ref {ref_name}-100, DPM-Solver++ 6 steps, {rule}: error {target:.4f}; Euler needs {got}")
    grid = [3, 4, 6, 8, 12] if args.quick else [3, 4, 6, 8, 12, 16, 24]
    print(f"  error against the dpmpp_2m-100 reference by steps: {grid}")
    ref = refs["dpmpp_2m"]
    for label, solver, lower in (
        ("Euler", "euler", False),
        ("DPM-Solver++ (default: 1,2,..,2,1)", "dpmpp_2m", False),
        ("DPM-Solver++ (earlier rule: 1,2,..,1,1)", "dpmpp_2m", True),
    ):
        print(f"    {label:42s} " + "  ".join(f"{err(run(s, solver, lower), ref):.4f}" for s in grid))
    print(f"  6-step schedule: {[round(float(s), 3) for s in pol.sigmas(6)]}")


# ------------------------------------------------------------------------------------------------ P6
def p6(args) -> None:
    print("\n== P6  share of a training step inside the model's forward/backward")
    configs = [("tiny", 32)] if args.quick else [("small", 128), ("tiny", 32)]
    for size, res in configs:
        m = module_for(size, res, micro=4)
        data = step_data(m, 2, 2, 4)
        nft_step(m, data)  # warm-up
        shares, totals = [], []
        for _ in range(args.repeats):
            with model_time(m) as acc:
                total = timed(lambda: nft_step(m, data))
            shares.append((acc["forward"] + acc["backward"]) / total)
            totals.append(total)
        share = statistics.median(shares)
        print(
            f"[{size}, {res}px, 2x2 samples, 3 timesteps, micro-batch 4]  step {min(totals):.3f} s, "
            f"forward+backward {share:.1%} (median of {args.repeats}; target >= 85%: "
            f"{'met' if share >= 0.85 else 'NOT met'})"
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", nargs="*", default=["P1", "P2", "P3", "P4", "P5", "P6"])
    ap.add_argument("--quick", action="store_true", help="fewer repeats, smaller problems")
    ap.add_argument("--repeats", type=int, default=None, help="timed repeats per case (default 5, quick 2)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1: stable timings on a shared machine)")
    args = ap.parse_args()
    args.repeats = args.repeats or (2 if args.quick else 5)
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {args.threads} thread(s), {'quick' if args.quick else 'full'} run")
    t0 = time.perf_counter()
    for name in args.only:
        {"P1": p1, "P2": p2, "P3": p3, "P4": p4, "P5": p5, "P6": p6}[name.upper()](args)
    print(f"\n({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
