"""The CPU wheel, installed in a fresh venv, run where no compiler is found (.ci/run, stage 2).

Argument: the commit the wheel was built from (its build record must say so).
"""
import shutil
import subprocess
import sys

import torch

import fused_ema
from fused_ema import _ext

compilers = [c for c in ("cc", "c++", "gcc", "g++", "clang", "clang++", "nvcc") if shutil.which(c)]
assert not compilers, f"a compiler is on PATH: {compilers}"
assert fused_ema.__file__.startswith(sys.prefix), f"not the installed wheel: {fused_ema.__file__}"
assert fused_ema.backend("cpu") == "cpp", f"the compiled module did not load: {_ext.LOAD_ERROR}"

# One fused call over tensors of several sizes and dtypes (the compiled CPU kernel),
# against torch.lerp one tensor at a time.
g = torch.Generator().manual_seed(0)
params = [torch.randn(n, generator=g) for n in (1, 1000, 70_001)]
params += [torch.randn(3, 300, generator=g).to(torch.bfloat16)]
emas = [torch.randn(p.shape, generator=g) for p in params]
expected = [e.lerp(p.float(), 1 - 0.99) for e, p in zip(emas, params)]
fused_ema.ema_update_(emas, params, 0.99)
for i, (e, x) in enumerate(zip(emas, expected)):
    torch.testing.assert_close(e, x, msg=lambda m: f"tensor {i}: {m}")

info = subprocess.run([sys.executable, "-m", "fused_ema.info"], capture_output=True, text=True,
                      check=True).stdout
print(info, end="")
fields = dict(line.split(":", 1) for line in info.splitlines() if not line.startswith("WARNING"))
fields = {key: value.strip() for key, value in fields.items()}
assert "WARNING" not in info
assert fields["built against torch"] == torch.__version__, fields["built against torch"]
assert fields["commit"].startswith(sys.argv[1]), (fields["commit"], sys.argv[1])  # "-dirty"
print("wheel smoke test: passed")
