"""FusedEMA(..., non_blocking=True) with the EMA in host memory: the update runs on a worker
thread, at most one deep; every reader through FusedEMA waits for it; the optimizer's
pre-step hook (attach) waits before it writes the parameters the worker reads.

Same bits as the synchronous update (the same plans run, on another thread), with both
engines: the fallback runs on the worker too.
"""
import copy
import gc
import pickle
import threading
import time

import pytest
import torch
from torch import nn

from fused_ema import FusedEMA, binding, worker
from fused_ema.schedules import Warmup
from test_fused_ema import assert_same, train_step

OPTIMIZERS = {
    "sgd": lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9),
    "adam-fused": lambda p: torch.optim.Adam(p, lr=0.01, fused=True),
}


def make_model(seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(5, 70), nn.BatchNorm1d(70), nn.ReLU(), nn.Linear(70, 300),
                         nn.Linear(300, 3))


def snapshot(ema, k=0):
    return {n: t.clone() for n, t in ema.modules[k].state_dict().items()}


def perturb(model, g):
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g))
        for b in model.buffers():
            if b.is_floating_point():
                b.add_(torch.randn(b.shape, generator=g))
            else:
                b.add_(1)


@pytest.fixture
def gated(monkeypatch):
    """Makes every worker job wait for ``gate.set()`` before it runs the update, so a test
    can act while an update is pending, deterministically. The gate opens by itself after
    10 s (a test that forgot to open it fails instead of hanging)."""
    gate = threading.Event()
    run = binding.Binding.run
    on_worker = []

    def slow_run(self, *args, **kwargs):
        if threading.current_thread().name == worker.NAME:
            on_worker.append(True)
            gate.wait(10)
        return run(self, *args, **kwargs)

    monkeypatch.setattr(binding.Binding, "run", slow_run)
    gate.on_worker = on_worker
    return gate


# ----------------------------------------------------------------------------- same bits

SETTINGS = [
    dict(decay=0.9),
    dict(decays=[0.5, Warmup(0.99, power=0.75)], update_after_step=2),
    dict(decay=lambda s: 0.5 + 0.01 * s, update_every=2, buffers="average"),
]


@pytest.mark.parametrize("settings", range(len(SETTINGS)))
def test_same_bits_as_the_synchronous_update(engine, settings):
    kw = SETTINGS[settings]
    model = make_model()
    sync = FusedEMA(model, **kw)
    queued = FusedEMA(model, non_blocking=True, **kw)
    g = torch.Generator().manual_seed(1)
    for s in range(9):
        perturb(model, g)
        skip = torch.tensor(s == 4)  # a CPU flag: read on the training thread, not counted
        sync.update(skip=skip)
        queued.update(skip=skip)
        queued.synchronize()  # before the model is written again
    assert queued._worker is not None and queued._worker.thread is not None
    assert queued.step == sync.step == 8
    for k in range(sync.num_decays):
        assert_same(snapshot(queued, k), snapshot(sync, k))


def test_close_to_a_float64_reference(engine):
    model = make_model()
    ema = FusedEMA(model, decay=0.75, non_blocking=True)
    ref = {n: p.detach().double().clone() for n, p in model.named_parameters()}
    g = torch.Generator().manual_seed(2)
    for _ in range(5):
        perturb(model, g)
        ema.update()
        for n, p in model.named_parameters():
            ref[n] = 0.75 * ref[n] + 0.25 * p.detach().double()
        ema.synchronize()
    for n, e in ema.module.named_parameters():
        torch.testing.assert_close(e.double(), ref[n], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", list(OPTIMIZERS))
def test_attach_same_bits_and_grad_scaler_skips(engine, name):
    """The hook queues the update; the pre-step hook waits before the optimizer writes.
    A step the GradScaler skipped (found inf) updates neither."""
    results = []
    for non_blocking in (False, True):
        model = make_model()
        opt = OPTIMIZERS[name](model.parameters())
        scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
        ema = FusedEMA(model, decays=[0.8, 0.6], non_blocking=non_blocking)
        ema.attach(opt, scaler=scaler)
        g = torch.Generator().manual_seed(0)
        for s in range(6):
            train_step(model, opt, g, scaler=scaler, inf=s in (2, 3))
        results.append((snapshot(ema, 0), snapshot(ema, 1), ema.step))
    assert results[0][2] == results[1][2] == 4
    assert_same(results[1][0], results[0][0])
    assert_same(results[1][1], results[0][1])


def test_removing_the_hook_waits_for_its_update(gated):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = FusedEMA(model, decay=0.5, non_blocking=True)
    handle = ema.attach(opt)
    train_step(model, opt, torch.Generator().manual_seed(0))
    assert ema._worker.pending
    threading.Timer(0.05, gated.set).start()
    handle.remove()
    assert not ema._worker.pending
    assert not opt._optimizer_step_pre_hooks and not opt._optimizer_step_post_hooks


def test_the_pre_step_hook_waits_before_the_optimizer_writes(gated):
    model = make_model()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    ema = FusedEMA(model, decay=0.5, non_blocking=True)
    ema.attach(opt)
    seen = []
    # registered after attach's hooks, so it runs after the EMA's pre-step hook
    opt.register_step_pre_hook(
        lambda *a: seen.append(ema._worker is not None and ema._worker.pending))
    g = torch.Generator().manual_seed(0)
    train_step(model, opt, g)  # queues an update (pending: the gate is closed)
    assert ema._worker.pending
    threading.Timer(0.05, gated.set).start()
    train_step(model, opt, g)
    assert seen == [False, False]  # the first step had nothing pending; the second waited


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_the_forward_after_an_update_does_not_reach_it(gated, buffers):
    """BatchNorm's buffers are written by the forward, not by the optimizer: the update
    reads them when it is queued (copied on the calling thread), so the forward that comes
    next (the next step's, or a teacher's in the same step) while it is pending changes
    nothing of it. Every update is compared with the synchronous one's."""
    runs = []
    for non_blocking in (False, True):
        model = make_model()
        opt = torch.optim.SGD(model.parameters(), lr=0.1)
        ema = FusedEMA(model, decays=[0.5, 0.8], buffers=buffers, non_blocking=non_blocking)
        g = torch.Generator().manual_seed(0)
        seen = []
        for _ in range(3):
            train_step(model, opt, g)
            ema.update()  # queued; the gate holds the worker
            model(torch.randn(8, 5, generator=g))  # the next forward: BatchNorm writes
            gated.set()
            seen.append((snapshot(ema, 0), snapshot(ema, 1)))  # a reader: waits
            gated.clear()
        runs.append(seen)
    for (a0, a1), (b0, b1) in zip(*runs):
        assert_same(b0, a0)
        assert_same(b1, a1)


# ----------------------------------------------------------------------------- readers wait

def _readers():
    return {
        "synchronize": lambda ema, model: ema.synchronize(),
        "update": lambda ema, model: ema.update(),
        "swapped": lambda ema, model: ema.swapped().__enter__(),
        "copy_to": lambda ema, model: ema.copy_to(make_model(3)),
        "state_dict": lambda ema, model: ema.state_dict(),
        "load_state_dict": lambda ema, model: ema.load_state_dict(
            FusedEMA(model, decay=0.5).state_dict()),
        "set": lambda ema, model: ema.set(),
        "reset": lambda ema, model: ema.reset(),
        "store": lambda ema, model: ema.store(),
        "pickle": lambda ema, model: pickle.dumps(ema),
        "deepcopy": lambda ema, model: copy.deepcopy(ema),
        "to": lambda ema, model: ema.to(dtype=torch.float64),
        "module": lambda ema, model: ema.module,
        "modules": lambda ema, model: ema.modules,
        "parameters": lambda ema, model: ema.parameters(),
        "named_pairs": lambda ema, model: list(ema.named_pairs()),
        "replan": lambda ema, model: ema.replan(),
        "step=": lambda ema, model: setattr(ema, "step", 3),
        "call": lambda ema, model: ema(torch.randn(4, 5)),
    }


@pytest.mark.parametrize("reader", list(_readers()))
def test_every_reader_waits_for_the_pending_update(gated, reader):
    model = make_model()
    g = torch.Generator().manual_seed(3)
    perturb(model, g)
    ema = FusedEMA(model, decay=0.5, non_blocking=True)
    want = FusedEMA(model, decay=0.5)
    perturb(model, g)
    want.update()
    ema.update()
    assert ema._worker.pending
    threading.Timer(0.05, gated.set).start()
    _readers()[reader](ema, model)
    assert gated.on_worker  # the update ran on the worker
    assert not ema._worker.pending or reader == "update"  # update() queues the next one
    if reader in ("synchronize", "state_dict", "module", "modules", "parameters",
                  "named_pairs", "store", "pickle", "deepcopy", "call", "step=", "swapped"):
        ema.synchronize()
        assert_same(snapshot(ema), snapshot(want))  # the queued update, whole


def test_restore_waits_too(gated):
    model = make_model()
    ema = FusedEMA(model, decay=0.5, non_blocking=True)
    ema.store()
    before = [p.detach().clone() for p in model.parameters()]
    ema.update()
    threading.Timer(0.05, gated.set).start()
    ema.restore()
    assert not ema._worker.pending
    assert all(torch.equal(p, b) for p, b in zip(model.parameters(), before))


# ----------------------------------------------------------------------------- errors

def test_a_worker_exception_is_raised_on_the_next_call_with_nothing_written():
    model = make_model()
    # a decay outside [0, 1] at step 2: the engine refuses it before writing anything
    ema = FusedEMA(model, decay=lambda s: 1.5 if s == 2 else 0.5, non_blocking=True)
    g = torch.Generator().manual_seed(4)
    for _ in range(2):
        perturb(model, g)
        ema.update()
    ema.synchronize()
    before = snapshot(ema)
    ema.update()  # returns: the error happens on the worker
    with pytest.raises(ValueError, match="decay") as info:
        ema.state_dict()
    assert "worker thread" in "".join(getattr(info.value, "__notes__", []))
    assert ema.step == 2  # set back: the failed update is not counted
    assert_same(snapshot(ema), before)
    ema.synchronize()  # raised once
    ema.step = 3
    ema.update()
    ema.synchronize()
    assert ema.step == 4


def test_a_tensor_replaced_while_pending_is_finished_on_the_training_thread(engine, gated):
    """The worker's plan finds the stale tensor and writes nothing of its group;
    synchronize() binds again and updates from the new tensor (same bits as the
    synchronous path given the same change)."""
    results = []
    for non_blocking in (False, True):
        model = make_model()
        ema = FusedEMA(model, decay=0.5, non_blocking=non_blocking)
        g = torch.Generator().manual_seed(5)
        perturb(model, g)
        new = model[3].weight.detach() * 2
        if non_blocking:
            ema.update()  # queued, held at the gate
            model[3].weight.data = new
            gated.set()
            ema.synchronize()
        else:
            model[3].weight.data = new
            ema.update()
        results.append(snapshot(ema))
    assert_same(results[1], results[0])


def test_updates_from_another_model_or_a_parameter_list_are_queued_too(engine):
    model, other = make_model(), make_model(7)
    results = []
    for non_blocking in (False, True):
        ema = FusedEMA(model, decay=0.5, non_blocking=non_blocking)
        ema.update(other)  # matched by name, through a binding for this update only
        ema.update(list(model.parameters()))  # torch_ema's update(parameters)
        results.append(snapshot(ema))
        assert ema.step == 2
    assert_same(results[1], results[0])


def test_options():
    model = make_model()
    with pytest.raises(ValueError, match="non_blocking=True .* capturable=True"):
        FusedEMA(model, decay=0.5, non_blocking=True, capturable=True)
    with pytest.raises(TypeError, match="non_blocking must be True or False"):
        FusedEMA(model, decay=0.5, non_blocking=1)


# ----------------------------------------------------------------------------- thread lifetime

def test_no_thread_left_per_fused_ema_dropped():
    model = make_model()
    threads = []
    for _ in range(12):
        ema = FusedEMA(model, decay=0.5, non_blocking=True)
        ema.update()
        threads.append(ema._worker.thread)
        ema = copy.deepcopy(ema)  # the copy has no thread until it queues
        assert ema._worker is None
        ema.update()
        threads.append(ema._worker.thread)
    assert all(t.daemon for t in threads)
    del ema
    gc.collect()
    deadline = time.monotonic() + 10
    while any(t.is_alive() for t in threads) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in threads)


def test_no_thread_until_an_update_is_queued():
    ema = FusedEMA(make_model(), decay=0.5, non_blocking=True)
    assert ema._worker is None
    ema.state_dict()
    assert ema._worker is None
