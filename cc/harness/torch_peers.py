"""What a PyTorch user gets today: one AdamW step on one large bf16 parameter, CUDA events.

The peers of tf_bf16's fused Adam kernels (cc/harness/bf16_harness.cu), on the
same GPU, in the same run, at the same size (--log2n, default 2^28 = 268M
parameters): torch's fused AdamW in bf16 (round to nearest), torch's fused
AdamW on float32 master weights and moments (mixed precision; timed alone and
with the copy to the bf16 weights), torchao's _AdamW with bf16 stochastic
rounding (torch.compile'd), and optimi's AdamW (Triton) with and without Kahan
summation. Each runs 5 warm-up steps, then `--reps` timed steps; the median
is printed with the effective bandwidth on the fewest bytes the step must move
(each tensor read once, each state written once), and a device copy of 2^n
bf16 elements as the same-run baseline. A peer that fails prints its error;
the others still run. Needs torch with CUDA; torchao==0.18.0 and
torch-optimi==0.3.3 (cc/harness/fetch_wheels.sh) for their rows.

    python3 cc/harness/torch_peers.py [--log2n 28] [--reps 20] [--json FILE]
"""

import argparse
import json
import statistics
import sys
import time
import traceback


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--log2n", type=int, default=28)
    parser.add_argument("--reps", type=int, default=20)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()

    import torch

    assert torch.cuda.is_available(), "torch sees no GPU"
    n = 1 << args.log2n
    dev = torch.device("cuda")
    print(f"torch_peers: torch {torch.__version__}, {torch.cuda.get_device_name(0)}, "
          f"n = {n} (2^{args.log2n}), {args.reps} reps", flush=True)
    gen = torch.Generator(device=dev).manual_seed(0)
    lr, betas, eps, wd = 1e-3, (0.9, 0.999), 1e-8, 0.01

    def time_ms(step):
        for _ in range(5):
            step()
        torch.cuda.synchronize()
        times = []
        for _ in range(args.reps):
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            step()
            stop.record()
            stop.synchronize()
            times.append(start.elapsed_time(stop))
        return statistics.median(times)

    def param(dtype):
        p = torch.nn.Parameter(torch.randn(n, device=dev, generator=gen).to(dtype))
        p.grad = (torch.randn(n, device=dev, generator=gen) * 1e-2).to(dtype)
        return p

    rows = []

    def run(name, bytes_per_param, make_step):
        t0 = time.time()
        try:
            step = make_step()
            ms = time_ms(step)
            tbps = bytes_per_param * n / (ms * 1e-3) / 1e12
            rows.append({"name": name, "ms": ms, "bytes_per_param": bytes_per_param,
                         "tbps": tbps})
            print(f"  {name:<58} {ms:8.3f} ms  {bytes_per_param:3d} B/param  {tbps:6.3f} TB/s"
                  f"  [{time.time() - t0:.0f} s]", flush=True)
        except Exception as e:  # a missing or failing peer must not stop the others
            rows.append({"name": name, "error": repr(e)})
            print(f"  {name:<58} FAILED: {e!r}", flush=True)
            traceback.print_exc(limit=3)
        torch.cuda.empty_cache()

    # Same-run baseline: a device-to-device copy of n bf16 elements (4 B per
    # element read + written).
    src = torch.randn(n, device=dev, generator=gen).to(torch.bfloat16)
    dst = torch.empty_like(src)
    run("device copy (bf16, read + write)", 4, lambda: (lambda: dst.copy_(src)))
    del src, dst

    def torch_fused_bf16():
        p = param(torch.bfloat16)
        opt = torch.optim.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd, fused=True)
        return opt.step

    # bf16 param, m, v read and written (12 B), bf16 grad read (2 B).
    run("torch AdamW(fused=True), bf16 params and state", 14, torch_fused_bf16)

    def torch_fused_master(with_copy):
        def make():
            master = param(torch.float32)
            weights = torch.empty(n, device=dev, dtype=torch.bfloat16)
            opt = torch.optim.AdamW([master], lr=lr, betas=betas, eps=eps, weight_decay=wd,
                                    fused=True)

            def step():
                opt.step()
                if with_copy:
                    weights.copy_(master)
            return step
        return make

    # float32 param, m, v read and written (24 B), float32 grad (4 B); the
    # copy reads the float32 master (4 B) and writes bf16 weights (2 B).
    run("torch AdamW(fused=True), float32 master + state (step)", 28, torch_fused_master(False))
    run("torch AdamW(fused=True), float32 master + state + bf16 copy", 34,
        torch_fused_master(True))

    def torchao_sr():
        from torchao.optim import _AdamW

        p = param(torch.bfloat16)
        opt = _AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd,
                     bf16_stochastic_round=True)
        return opt.step

    run("torchao 0.18 _AdamW(bf16_stochastic_round=True)", 14, torchao_sr)

    def optimi_adamw(kahan):
        def make():
            import optimi

            p = param(torch.bfloat16)
            opt = optimi.AdamW([p], lr=lr, betas=betas, eps=eps, weight_decay=wd,
                               kahan_sum=kahan, triton=True)
            return opt.step
        return make

    # Kahan: a bf16 compensation buffer read and written (4 B more).
    run("optimi 0.3.3 AdamW(kahan_sum=True, triton=True)", 18, optimi_adamw(True))
    run("optimi 0.3.3 AdamW(kahan_sum=False, triton=True)", 14, optimi_adamw(False))

    if args.json:
        with open(args.json, "w") as f:
            json.dump({"n": n, "reps": args.reps, "torch": torch.__version__,
                       "device": torch.cuda.get_device_name(0), "rows": rows}, f, indent=1)
    failed = [r["name"] for r in rows if "error" in r]
    print(f"torch_peers: {len(rows) - len(failed)} of {len(rows)} rows measured"
          + (f"; failed: {', '.join(failed)}" if failed else ""), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
