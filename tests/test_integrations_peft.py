"""FusedEMA of a real peft LoRA model (issue 17): with frozen="share" (the default) the EMA
owns the adapters' averages only, its update touches the adapters only, whatever the size
of the frozen base, and ``ema.module`` is the whole model with the EMA'd adapters."""
import copy

import pytest
import torch
from torch import nn

peft = pytest.importorskip("peft")

from fused_ema import FusedEMA  # noqa: E402


class MLP(nn.Module):
    """A base model built in code: a trunk of ``depth`` layers (frozen by peft, not
    adapted) and two adapted layers."""

    def __init__(self, depth=1, width=32):
        super().__init__()
        self.trunk = nn.Sequential(*[nn.Linear(width, width) for _ in range(depth)])
        self.q = nn.Linear(width, width)
        self.v = nn.Linear(width, 8)

    def forward(self, x):
        return self.v(torch.relu(self.q(torch.relu(self.trunk(x)))))


def lora_model(depth=1, seed=0):
    torch.manual_seed(seed)
    base = MLP(depth).to(torch.bfloat16)  # a bf16 base; peft keeps the adapters in fp32
    model = peft.get_peft_model(base, peft.LoraConfig(target_modules=["q", "v"], r=4))
    with torch.no_grad():  # lora_B starts at zero: give the adapters a value
        for n, p in model.named_parameters():
            if p.requires_grad:
                p.normal_(0, 0.1)
    return model


def adapters(model):
    return [p for p in model.parameters() if p.requires_grad]


def train(model, ema, steps, seed=1):
    opt = torch.optim.SGD(adapters(model), lr=0.5)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        x = torch.randn(16, 32, generator=g).to(torch.bfloat16)
        loss = model(x).float().pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        ema.update()


def plan_elements(ema):
    """Elements the bound plans read and write per update."""
    return sum(p.numel() for _, _, ps, _ in ema._ensure_bound().groups for p in ps)


def test_the_ema_owns_the_adapters_averages_only():
    model = lora_model()
    ema = FusedEMA(model, decay=0.9)
    owned = sum(t.numel() * t.element_size() for t in ema.state_dict()["emas"][0].values())
    assert owned == sum(p.numel() * 4 for p in adapters(model))  # fp32 EMAs
    base = [p for p in model.parameters() if not p.requires_grad]
    held = dict(ema.module.named_parameters())
    for n, p in model.named_parameters():
        assert (held[n] is p) == (not p.requires_grad), n
    copied = FusedEMA(model, decay=0.9, frozen="copy").state_dict()["emas"][0]
    assert sum(t.numel() * t.element_size() for t in copied.values()) == \
        owned + sum(p.numel() * 4 for p in base)  # what "copy" costs (fp32 copies)


def test_the_update_does_not_grow_with_the_base():
    small, large = lora_model(depth=1), lora_model(depth=4)
    assert sum(p.numel() for p in large.parameters()) > \
        2 * sum(p.numel() for p in small.parameters())
    n_adapters = sum(p.numel() for p in adapters(small))
    assert n_adapters == sum(p.numel() for p in adapters(large))
    for model in (small, large):
        assert plan_elements(FusedEMA(model, decay=0.9)) == n_adapters
    # copying the base is what grows
    assert plan_elements(FusedEMA(large, decay=0.9, frozen="copy")) > \
        plan_elements(FusedEMA(small, decay=0.9, frozen="copy")) > n_adapters


def test_the_ema_module_is_the_model_with_the_emas_adapters():
    model = lora_model()
    ema = FusedEMA(model, decay=0.8)
    train(model, ema, 5)
    model.eval()
    x = torch.randn(4, 32).to(torch.bfloat16)
    with torch.no_grad():
        online = model(x)
        with ema.swapped():
            want = model(x)
        got = ema.module(x)
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert not torch.equal(got, online)  # the adapters' EMA is not the adapters
    torch.testing.assert_close(model(x), online, rtol=0, atol=0)  # the swap was undone


def test_saving_and_loading_the_ema_of_a_lora_model():
    model = lora_model()
    ema = FusedEMA(model, decay=0.8)
    train(model, ema, 3)
    full = ema.module.state_dict()  # the whole model: the shared base included
    assert list(full) == list(model.state_dict())
    adapter_sd = peft.get_peft_model_state_dict(ema.module)  # peft's adapter checkpoint
    assert len(adapter_sd) == len(adapters(model))
    twin = copy.deepcopy(model)  # the same base, loaded again
    twin_ema = FusedEMA(twin, decay=0.8)
    twin_ema.load_state_dict(ema.state_dict())
    x = torch.randn(4, 32).to(torch.bfloat16)
    with torch.no_grad():
        torch.testing.assert_close(twin_ema.module(x), ema.module(x), rtol=0, atol=0)
