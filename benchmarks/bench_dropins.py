"""Each library's own EMA at its best settings next to fused_ema's drop-in for it, on
the parameter sets of ``models.py``; one update per call, both updating the same weights.

    python benchmarks/bench_dropins.py                      # resnet50 and many_small, CPU
    python benchmarks/bench_dropins.py --models gpt2_small --device cuda --seconds 2

The two methods of a pair are timed in alternating rounds of
``torch.utils.benchmark.Timer.blocked_autorange`` (the machine may be shared: a load
change hits both), and the table gives each one's median time per update and the ratio
(library / drop-in: above 1, the drop-in is faster). Libraries that are not installed are
skipped. timm is loaded from its own ``utils/model_ema.py`` when ``import timm`` fails
(timm needs torchvision, which may be missing). Results are measured, never assumed.

The table is printed and written to bench_dropins.md under --out (default runs/ at the
repository root, ignored by git); --update-results writes it to benchmarks/results/, the
committed reference results.
"""
import argparse
import importlib.util
import statistics
import sys
from pathlib import Path
from typing import Callable, Dict, List, Optional, Tuple

import torch
import torch.utils.benchmark as benchmark
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))
import models  # noqa: E402
from outputs import add_output_args  # noqa: E402

DECAY = 0.999


class Params(nn.Module):
    def __init__(self, shapes, dtype, device, seed):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.p = nn.ParameterList([nn.Parameter(torch.randn(s, generator=g).to(device, dtype))
                                   for s in shapes])


def _timm_model_ema():
    try:
        import timm.utils.model_ema as m
        return m
    except Exception:
        spec = importlib.util.find_spec("timm")
        if spec is None:
            return None
        path = Path(spec.origin).parent / "utils" / "model_ema.py"
        s = importlib.util.spec_from_file_location("timm_model_ema_standalone", path)
        m = importlib.util.module_from_spec(s)
        s.loader.exec_module(m)
        return m


def pairs(model: nn.Module) -> Dict[str, Tuple[Callable[[], Callable], Callable[[], Callable]]]:
    """library -> (build the library's update, build the drop-in's update); each builder
    returns a zero-argument step function."""
    params = list(model.parameters())
    out = {}

    if importlib.util.find_spec("stable_baselines3"):
        def sb3_lib():
            from stable_baselines3.common.utils import polyak_update
            targets = [p.detach().clone() for p in params]
            return lambda: polyak_update(params, targets, 1 - DECAY)

        def sb3_ours():
            from fused_ema.integrations.sb3 import polyak_update
            targets = [p.detach().clone() for p in params]
            return lambda: polyak_update(params, targets, 1 - DECAY)
        out["stable-baselines3 polyak_update"] = (sb3_lib, sb3_ours)

    if importlib.util.find_spec("torch_ema"):
        def te_lib():
            import torch_ema
            ema = torch_ema.ExponentialMovingAverage(params, DECAY, use_num_updates=False)
            return ema.update

        def te_ours():
            from fused_ema.integrations import torch_ema
            ema = torch_ema.ExponentialMovingAverage(params, DECAY, use_num_updates=False)
            return ema.update
        out["torch_ema ExponentialMovingAverage"] = (te_lib, te_ours)

    if importlib.util.find_spec("ema_pytorch"):
        kw = dict(beta=DECAY, update_after_step=0, update_every=1)

        def ep_lib():
            import ema_pytorch
            ema = ema_pytorch.EMA(model, use_foreach=True, **kw)
            ema.update()  # the first call copies
            return ema.update

        def ep_ours():
            from fused_ema.integrations import ema_pytorch
            ema = ema_pytorch.EMA(model, **kw)
            ema.update()
            return ema.update
        out["ema-pytorch EMA (use_foreach)"] = (ep_lib, ep_ours)

    if importlib.util.find_spec("diffusers"):
        def df_lib():
            from diffusers.training_utils import EMAModel
            ema = EMAModel(params, decay=DECAY, foreach=True)
            ema.optimization_step = 10 ** 6  # past the warmup
            return lambda: ema.step(params)

        def df_ours():
            from fused_ema.integrations.diffusers import EMAModel
            ema = EMAModel(params, decay=DECAY)
            ema.optimization_step = 10 ** 6
            return lambda: ema.step(params)
        out["diffusers EMAModel (foreach)"] = (df_lib, df_ours)

    timm_ema = _timm_model_ema()
    if timm_ema is not None:
        def timm_lib():
            ema = timm_ema.ModelEmaV3(model, decay=DECAY, foreach=True)
            return lambda: ema.update(model, step=10 ** 6)

        def timm_ours():
            from fused_ema.integrations.timm import ModelEmaV3
            ema = ModelEmaV3(model, decay=DECAY)
            return lambda: ema.update(model, step=10 ** 6)
        out["timm ModelEmaV3 (foreach)"] = (timm_lib, timm_ours)

    if importlib.util.find_spec("lightning"):
        def pl_lib():
            # what Lightning 2.6's EMAWeightAveraging runs after each optimizer step
            from torch.optim.swa_utils import AveragedModel, get_ema_avg_fn
            avg = AveragedModel(model, avg_fn=get_ema_avg_fn(DECAY), use_buffers=True)
            avg.update_parameters(model)  # the first call copies
            return lambda: avg.update_parameters(model)

        def pl_ours():
            from fused_ema import FusedEMA  # what our callback runs after each step
            ema = FusedEMA(model, decay=DECAY, update_after_step=1, buffers="average")
            ema.update()
            return ema.update
        out["Lightning EMAWeightAveraging (AveragedModel)"] = (pl_lib, pl_ours)
    return out


def time_pair(lib: Callable, ours: Callable, seconds: float, rounds: int, device: str):
    """Median seconds per call of each, from ``rounds`` alternating blocked_autoranges."""
    times: Dict[str, List[float]] = {"lib": [], "ours": []}
    for step in (lib, ours):  # warm up (plans, caches, allocator)
        for _ in range(3):
            step()
    if device == "cuda":
        torch.cuda.synchronize()
    for _ in range(rounds):
        for key, step in (("lib", lib), ("ours", ours)):
            m = benchmark.Timer("step()", globals={"step": step}).blocked_autorange(
                min_run_time=seconds / rounds)
            times[key].append(m.median)
    return statistics.median(times["lib"]), statistics.median(times["ours"])


def main(argv: Optional[List[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="resnet50,many_small",
                    help="comma-separated parameter sets of models.py")
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--seconds", type=float, default=1.0, help="timing per method and pair")
    ap.add_argument("--rounds", type=int, default=4)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--only", default=None, help="substring of the library names to run")
    add_output_args(ap, __file__)
    args = ap.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    import fused_ema
    dtype = getattr(torch, args.dtype)
    lines = []

    def emit(line: str) -> None:
        lines.append(line)
        print(line, flush=True)
    emit(f"# fused_ema drop-ins vs the libraries: device={args.device}, params {args.dtype}, "
         f"decay={DECAY}, torch {torch.__version__}, {torch.get_num_threads()} threads, "
         f"fused_ema backend={fused_ema.backend(args.device)}")
    emit("")
    emit("Command: `python benchmarks/bench_dropins.py "
         + " ".join(sys.argv[1:] if argv is None else argv) + "`")
    emit("")
    emit("| parameter set | library | library ms | drop-in ms | library / drop-in |")
    emit("|---|---|---:|---:|---:|")
    for name in args.models.split(","):
        shapes = [shape for _, shape in models.spec(name)]
        for lib_name in pairs(nn.Module()):
            if args.only and args.only not in lib_name:
                continue
            model = Params(shapes, dtype, args.device, 0)  # fresh weights for each pair
            build_lib, build_ours = pairs(model)[lib_name]
            lib, ours = build_lib(), build_ours()
            t_lib, t_ours = time_pair(lib, ours, args.seconds, args.rounds, args.device)
            emit(f"| {models.label(name)} | {lib_name} | {t_lib * 1e3:.3f} | "
                 f"{t_ours * 1e3:.3f} | {t_lib / t_ours:.2f}x |")
            del lib, ours, model
    path = Path(args.out) / "bench_dropins.md"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print(f"written: {path}")


if __name__ == "__main__":
    main()
