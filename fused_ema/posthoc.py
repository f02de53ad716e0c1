"""``PostHocEMA``: choose the EMA length after training (EDM2, Karras et al. 2024).

During training K power-function EMAs (``schedules.PowerFunction``, default sigma_rel 0.05
and 0.10) are updated in one fused pass by a ``FusedEMA`` with K decays, and every
``snapshot_every`` steps all K are copied by one fused call (``torch._foreach_copy_``) into
a staging buffer that a background thread writes to disk. Afterwards
``synthesize(sigma_rel=...)`` combines the snapshots with the least-squares coefficients of
``_posthoc_math.fit``, streaming the files one at a time.

Files in ``directory``: ``posthoc.json`` (settings and the model's tensor names and shapes:
a directory of another model or settings is refused) and one file per (snapshot, profile),
``{index:06d}-p{k}-step{t:010d}.pt`` (``-rank{r:05d}`` added when distributed: each rank
writes its own shards). A file is written to a temporary name and renamed when complete,
and carries its length and CRC-32; a file that fails the check is skipped with a warning.
"""
import json
import os
import re
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import torch
from torch import nn

from . import _posthoc_math, distributed
from .ema import FusedEMA
from .schedules import PowerFunction

__all__ = ["PostHocEMA", "Synthesis"]

_FORMAT = "fused_ema.PostHocEMA/1"
_SNAPSHOT_DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16)
_NAME = re.compile(r"^(\d{6})-p(\d+)-step(\d{10})(?:-rank(\d{5}))?\.pt$")


def _rank_world() -> Tuple[int, int]:
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _crc32(tensors: Sequence[torch.Tensor]) -> Tuple[int, int]:
    """CRC-32 and byte count of CPU tensors' memory (read through a uint8 view)."""
    crc, nbytes = 0, 0
    for t in tensors:
        raw = t.detach().contiguous().reshape(-1).view(torch.uint8)
        crc = zlib.crc32(raw.numpy().data, crc) if raw.numel() else crc
        nbytes += raw.numel()
    return crc, nbytes


@dataclass
class Synthesis:
    """What ``synthesize`` combined, and how well: ``relative_error`` is the L2 distance of the
    combined profile to the target profile relative to the target's norm; the EMA it gives
    differs from the true target EMA by at most ``relative_error * target_norm *
    ||theta||_2`` per element (``theta``: that element's trajectory over the steps)."""
    sigma_rel: float
    gamma: float
    step: int
    relative_error: float
    target_norm: float
    gain: float  # sum |c_i|: snapshot rounding is amplified at most this much
    files: List[str] = field(default_factory=list)
    coefficients: List[float] = field(default_factory=list)
    skipped: List[str] = field(default_factory=list)  # unreadable files left out


class PostHocEMA:
    """Tracks K power-function EMAs of ``model`` and saves snapshots of them so that an EMA
    of any length can be synthesized after training.

    >>> ph = PostHocEMA(model, sigma_rels=(0.05, 0.10), snapshot_every=1000,
    ...                 directory="ema_snapshots")
    >>> ph.attach(optimizer)                   # or ph.update() after each optimizer step
    >>> state = ph.synthesize(sigma_rel=0.07)  # a state dict for the model
    >>> ph.last_synthesis.relative_error       # how well the target profile was matched

    Args:
        model: the ``nn.Module`` to average (DDP / ``torch.compile`` wrappers and FSDP2
            shards as in ``FusedEMA``).
        sigma_rels: the tracked profiles (2 to 8, distinct) by relative width; exactly one
            of ``sigma_rels`` and ``gammas``.
        gammas: the tracked profiles by exponent instead.
        snapshot_every: a snapshot after every this many updates.
        directory: where the snapshots go (created if needed).
        snapshot_dtype: float32 (default: exact copies of fp32 EMAs), float64, or a 16-bit
            type to halve the disk: the synthesized EMA then carries an error of at most
            ``gain`` times the rounding of one snapshot value (2**-11 relative for float16,
            2**-8 for bfloat16; ``gain = sum |c_i|`` is in ``last_synthesis``, 1 to 2 for
            targets inside the tracked range, more outside).
        max_profile_error: ``synthesize`` refuses a target whose profile the snapshots match
            with a larger relative L2 error (a sigma_rel far outside the tracked ones, or too
            few snapshots): raise it to accept rougher fits.
        ema_dtype: as in ``FusedEMA``.
        buffers: as in ``FusedEMA``.
        exclude: as in ``FusedEMA``.
        capturable: as in ``FusedEMA``.
        device: as in ``FusedEMA``.

    Training waits for the disk only when a snapshot comes before the previous one is
    written. ``state_dict()`` (put it in the training checkpoint) holds the live profiles
    and the snapshot index; ``load_state_dict`` resumes, removing snapshots written after
    the checkpoint, so the directory ends up as after an uninterrupted run.
    """

    def __init__(
        self,
        model: nn.Module,
        sigma_rels: Optional[Sequence[float]] = (0.05, 0.10),
        *,
        gammas: Optional[Sequence[float]] = None,
        snapshot_every: int = 1000,
        directory: str = "ema_snapshots",
        snapshot_dtype: torch.dtype = torch.float32,
        max_profile_error: float = 0.1,
        ema_dtype: Optional[torch.dtype] = None,
        buffers: str = "copy",
        exclude=None,
        capturable: bool = False,
        device=None,
    ):
        if gammas is not None:
            profiles = [PowerFunction(g) for g in gammas]
        elif sigma_rels is not None:
            profiles = [PowerFunction.from_sigma_rel(s) for s in sigma_rels]
        else:
            raise ValueError("fused_ema: give sigma_rels= or gammas=")
        if not 2 <= len(profiles) <= 8:
            raise ValueError(f"fused_ema: PostHocEMA tracks 2 to 8 profiles, got {len(profiles)}")
        if len({p.gamma for p in profiles}) != len(profiles):
            raise ValueError("fused_ema: the tracked profiles must be distinct")
        if isinstance(snapshot_every, bool) or not isinstance(snapshot_every, int) or \
                snapshot_every < 1:
            raise ValueError(f"fused_ema: snapshot_every must be an integer >= 1, got "
                             f"{snapshot_every!r}")
        if snapshot_dtype not in _SNAPSHOT_DTYPES:
            raise TypeError(f"fused_ema: snapshot_dtype must be one of {_SNAPSHOT_DTYPES}, got "
                            f"{snapshot_dtype}")
        if not (isinstance(max_profile_error, (int, float)) and max_profile_error > 0):
            raise ValueError(f"fused_ema: max_profile_error must be > 0, got "
                             f"{max_profile_error!r}")
        if not isinstance(model, nn.Module):
            raise TypeError(f"fused_ema: PostHocEMA averages an nn.Module, got "
                            f"{type(model).__name__}")
        self.gammas = [p.gamma for p in profiles]
        self.sigma_rels = [p.sigma_rel for p in profiles]
        self.snapshot_every = snapshot_every
        self.snapshot_dtype = snapshot_dtype
        self.max_profile_error = float(max_profile_error)
        self.directory = os.fspath(directory)
        self.capturable = bool(capturable)
        self.ema = FusedEMA(model, decays=profiles, ema_dtype=ema_dtype, buffers=buffers,
                            exclude=exclude, capturable=capturable, device=device)
        self.rank, self.world_size = _rank_world()
        self._layout()
        self._next_index = 0
        self._last_snapshot_step = 0
        self._calls = 0
        self._reconciled = False  # existing snapshots checked against this run's position
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fused_ema-posthoc")
        self._pending: Optional[Future] = None
        self._staging: Optional[List[torch.Tensor]] = None
        self.last_synthesis: Optional[Synthesis] = None
        self._check_directory()

    # ------------------------------------------------------------------ layout

    def _layout(self) -> None:
        """Sorts the EMA's state_dict entries into averaged (float, combined by synthesis) and
        kept (copied buffers, integers, excluded tensors: taken from the newest snapshot)."""
        averaged_ptrs = set()
        for _, ema_t, src in self.ema.named_pairs(0):
            is_param = isinstance(src, nn.Parameter)
            if src.is_floating_point() and ((is_param and src.requires_grad) or
                                            (not is_param and self.ema.buffers == "average")):
                averaged_ptrs.add(distributed.local(ema_t).data_ptr())
        sd = self.ema.modules[0].state_dict()
        self._names = list(sd)
        self._averaged = [n for n, t in sd.items()
                          if t.is_floating_point() and t.numel() > 0
                          and distributed.local(t).data_ptr() in averaged_ptrs]
        averaged = set(self._averaged)
        self._kept = [n for n in self._names if n not in averaged]
        local = {n: distributed.local(t) for n, t in sd.items()}
        self._shapes = {n: list(local[n].shape) for n in self._names}
        self._numels = [local[n].numel() for n in self._averaged]
        self._offsets = [0]
        for n in self._numels:
            self._offsets.append(self._offsets[-1] + n)

    def _fingerprint(self) -> Dict[str, Any]:
        return {
            "format": _FORMAT,
            "gammas": self.gammas,
            "snapshot_every": self.snapshot_every,
            "snapshot_dtype": str(self.snapshot_dtype),
            "world_size": self.world_size,
            "averaged": self._averaged,
            "kept": self._kept,
            "shapes": self._shapes,
        }

    def _manifest_path(self) -> str:
        name = "posthoc.json" if self.world_size == 1 else f"posthoc-rank{self.rank:05d}.json"
        return os.path.join(self.directory, name)

    def _check_directory(self) -> None:
        os.makedirs(self.directory, exist_ok=True)
        path = self._manifest_path()
        ours = self._fingerprint()
        if os.path.exists(path):
            with open(path) as f:
                try:
                    theirs = json.load(f)
                except json.JSONDecodeError:
                    raise ValueError(f"fused_ema: {path} is not a PostHocEMA manifest") from None
            diffs = [k for k in ours if theirs.get(k) != ours[k]]
            if diffs:
                detail = "; ".join(
                    f"{k}: directory has {_short(theirs.get(k))}, this PostHocEMA {_short(ours[k])}"
                    for k in diffs)
                raise ValueError(
                    f"fused_ema: {self.directory} holds snapshots of another model or other "
                    f"settings ({detail}); use another directory")
        else:
            tmp = path + ".tmp"
            with open(tmp, "w") as f:
                json.dump(ours, f)
            os.replace(tmp, path)

    # ------------------------------------------------------------------ training

    @property
    def step(self) -> int:
        """Updates so far (a host sync when ``capturable=True``)."""
        return self.ema.step

    def update(self, *, skip: Optional[torch.Tensor] = None) -> None:
        """One fused update of the K profiles, then a snapshot when one is due."""
        self.ema.update(skip=skip)
        self._after_update()

    def _after_update(self) -> None:
        self._calls += 1
        # capturable: the device step counter is not read every step (it would sync);
        # snapshots follow the calls and are labelled with the true step when taken.
        s = self._calls if self.capturable else self.ema.step
        if s % self.snapshot_every == 0 and s != self._last_snapshot_step:
            self.snapshot()

    def attach(self, optimizer: torch.optim.Optimizer, scaler=None):
        """Updates after every ``optimizer.step()`` (through ``FusedEMA.attach``, so a step
        the GradScaler skips is skipped here too) and snapshots when due."""
        ema_handle = self.ema.attach(optimizer, scaler)
        hook = optimizer.register_step_post_hook(lambda opt, args, kwargs: self._after_update())
        return _Handle(ema_handle, hook)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copies the K profiles (one fused call) and hands them to the writer thread."""
        if not self._reconciled:
            self._refuse_stale()
        t = self.ema.step
        if t == 0:
            raise RuntimeError("fused_ema: no update yet; a snapshot of step 0 averages nothing")
        self._wait()  # the staging buffer is free again
        sds = [m.state_dict() for m in self.ema.modules]
        if self._staging is None:
            first = distributed.local(sds[0][self._averaged[0]]) if self._averaged else None
            dev = first.device if first is not None else torch.device("cpu")
            self._staging = [torch.empty(self._offsets[-1], dtype=self.snapshot_dtype, device=dev)
                             for _ in sds]
        views, sources = [], []
        for k, sd in enumerate(sds):
            for i, name in enumerate(self._averaged):
                src = distributed.local(sd[name])
                views.append(self._staging[k][self._offsets[i]:self._offsets[i + 1]]
                             .view(src.shape))
                sources.append(src)
        # One fused copy (ATen's multi-tensor copy, converting to the snapshot dtype); the
        # staging buffer starts uninitialized (NaN/inf bits included) and is overwritten.
        torch._foreach_copy_(views, sources)
        kept = [{n: distributed.local(sd[n]).detach().to("cpu", copy=True) for n in self._kept}
                for sd in sds]
        event = None
        if self._staging and self._staging[0].is_cuda:
            event = torch.cuda.Event()
            event.record()
        index = self._next_index
        self._pending = self._writer.submit(self._write, index, t, kept, event)
        self._next_index += 1
        self._last_snapshot_step = t if not self.capturable else self._calls

    def _write(self, index: int, step: int, kept, event) -> None:
        """Writer thread: one file per profile, to a temporary name, renamed when complete."""
        for k, flat in enumerate(self._staging):
            if event is not None:
                side = torch.cuda.Stream(device=flat.device)
                with torch.cuda.stream(side):
                    side.wait_event(event)
                    flat = flat.to("cpu")
            crc, nbytes = _crc32([flat] + list(kept[k].values()))
            payload = {
                "format": _FORMAT, "index": index, "step": step, "profile": k,
                "gamma": self.gammas[k], "rank": self.rank, "names": self._averaged,
                "data": flat, "kept": kept[k], "crc32": crc, "nbytes": nbytes,
            }
            path = os.path.join(self.directory, self._file_name(index, k, step))
            tmp = path + ".tmp"
            with open(tmp, "wb") as f:
                torch.save(payload, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)

    def _file_name(self, index: int, k: int, step: int) -> str:
        rank = f"-rank{self.rank:05d}" if self.world_size > 1 else ""
        return f"{index:06d}-p{k}-step{step:010d}{rank}.pt"

    def _wait(self) -> None:
        pending, self._pending = self._pending, None
        if pending is not None:
            pending.result()  # re-raises a failed write here, in the training thread

    def flush(self) -> None:
        """Waits until every snapshot taken so far is on disk."""
        self._wait()

    def close(self) -> None:
        self._wait()
        self._writer.shutdown(wait=True)

    def __del__(self):
        try:
            self._writer.shutdown(wait=True)
        except Exception:
            pass

    # ------------------------------------------------------------------ files

    def _files(self) -> List[Tuple[int, int, int, str]]:
        """(index, profile, step, path) of this rank's snapshot files, oldest first."""
        out = []
        for name in os.listdir(self.directory):
            m = _NAME.match(name)
            if not m:
                continue
            rank = int(m.group(4)) if m.group(4) is not None else 0
            if (m.group(4) is not None) != (self.world_size > 1) or rank != self.rank:
                continue
            out.append((int(m.group(1)), int(m.group(2)), int(m.group(3)),
                        os.path.join(self.directory, name)))
        return sorted(out)

    def _refuse_stale(self) -> None:
        later = [p for i, _, _, p in self._files() if i >= self._next_index]
        if later:
            raise RuntimeError(
                f"fused_ema: {self.directory} already holds {len(later)} snapshot file(s) from "
                f"index {self._next_index} on (e.g. {os.path.basename(later[0])}); to resume "
                "that run call load_state_dict() with its checkpoint first, otherwise use an "
                "empty directory")
        self._reconciled = True

    def _load(self, path: str, k: int, step: int):
        """A snapshot file's payload if it is complete and intact, else None."""
        try:
            payload = torch.load(path, map_location="cpu", mmap=True, weights_only=True)
        except Exception as exc:  # truncated zip, not a torch file...
            return None, f"{os.path.basename(path)} ({type(exc).__name__}: {exc})"
        ok = (isinstance(payload, dict) and payload.get("format") == _FORMAT
              and payload.get("profile") == k and payload.get("step") == step
              and payload.get("names") == self._averaged
              and isinstance(payload.get("data"), torch.Tensor)
              and payload["data"].numel() == self._offsets[-1])
        if not ok:
            return None, f"{os.path.basename(path)} (not a snapshot of this PostHocEMA)"
        crc, nbytes = _crc32([payload["data"]] + list(payload["kept"].values()))
        if (crc, nbytes) != (payload["crc32"], payload["nbytes"]):
            return None, f"{os.path.basename(path)} (checksum mismatch)"
        return payload, None

    # ------------------------------------------------------------------ synthesis

    def profile_fit(self, sigma_rel: Optional[float] = None, step: Optional[int] = None, *,
                    gamma: Optional[float] = None) -> Synthesis:
        """The coefficients and the profile match of a synthesis, without reading the
        snapshots. Raises ValueError for a target the snapshots cannot represent."""
        return self._fit(sigma_rel, step, gamma)[0]

    def _fit(self, sigma_rel, step, gamma, exclude=()) -> Tuple[Synthesis, list]:
        if (sigma_rel is None) == (gamma is None):
            raise ValueError("fused_ema: give sigma_rel= or gamma=")
        target = (PowerFunction.from_sigma_rel(sigma_rel) if sigma_rel is not None
                  else PowerFunction(gamma))
        self._wait()
        files = [f for f in self._files() if f[3] not in exclude]
        if not files:
            raise ValueError(f"fused_ema: no snapshot in {self.directory} yet")
        first, last = min(f[2] for f in files), max(f[2] for f in files)
        if step is None:
            step = last
        if isinstance(step, bool) or not isinstance(step, int) or step < first:
            raise ValueError(f"fused_ema: step {step!r} is before the first snapshot (step "
                             f"{first}); snapshots span steps {first} to {last}")
        used = [f for f in files if f[2] <= step]
        result = _posthoc_math.fit([f[2] for f in used], [self.gammas[f[1]] for f in used],
                                   step, target.gamma)
        synthesis = Synthesis(sigma_rel=target.sigma_rel, gamma=target.gamma, step=step,
                              relative_error=result.relative_error,
                              target_norm=result.target_norm, gain=result.gain,
                              files=[os.path.basename(f[3]) for f in used],
                              coefficients=result.coefficients)
        if result.relative_error > self.max_profile_error:
            tracked = ", ".join(f"{s:.4g}" for s in self.sigma_rels)
            raise ValueError(
                f"fused_ema: sigma_rel {target.sigma_rel:.4g} at step {step} is outside what the "
                f"tracked profiles (sigma_rel {tracked}, {len(used)} snapshot files up to step "
                f"{step}) can represent: the best combination misses the target profile by "
                f"{result.relative_error:.1%} (max_profile_error={self.max_profile_error:.1%})")
        return synthesis, used

    @torch.no_grad()
    def synthesize(self, sigma_rel: Optional[float] = None, step: Optional[int] = None, *,
                   gamma: Optional[float] = None) -> Dict[str, torch.Tensor]:
        """The EMA with profile ``sigma_rel`` (or ``gamma``) at ``step`` (default: the newest
        snapshot), as a state dict for the model, from the snapshots up to ``step``.

        Streams the files one by one (peak memory: the result plus one snapshot of one
        profile, memory-mapped). Averaged tensors are accumulated in float32 (float64 for
        float64 snapshots) and returned in the EMA's dtype; copied buffers and integer
        tensors come from the newest snapshot used. ``self.last_synthesis`` says how well the profile was matched. A file that
        fails its length/checksum check is skipped (with a warning) and the coefficients are
        solved again without it: no partial file is ever used.
        """
        skipped: List[str] = []
        bad = set()
        while True:
            synthesis, used = self._fit(sigma_rel, step, gamma, bad)
            acc_dtype = torch.promote_types(self.snapshot_dtype, torch.float32)
            acc = torch.zeros(self._offsets[-1], dtype=acc_dtype)
            kept = None
            failed = None
            for (_, k, s, path), c in zip(used, synthesis.coefficients):
                payload, why = self._load(path, k, s)
                if payload is None:
                    failed = (path, why)
                    break
                acc.add_(payload["data"].to(acc_dtype), alpha=c)
                # the newest file's (files come oldest first); cloned, as a view would keep
                # that file's whole memory map alive
                kept = {n: v.clone() for n, v in payload["kept"].items()}
                del payload
            if failed is None:
                break
            bad.add(failed[0])
            skipped.append(failed[1])
            warnings.warn(f"fused_ema: skipping snapshot file {failed[1]}; the coefficients are "
                          "solved again without it", RuntimeWarning, stacklevel=2)
        synthesis.skipped = skipped
        self.last_synthesis = synthesis
        live = self.ema.modules[0].state_dict()
        out: Dict[str, torch.Tensor] = {}
        for i, n in enumerate(self._averaged):
            ref = live[n]
            value = acc[self._offsets[i]:self._offsets[i + 1]].view(self._shapes[n])
            out[n] = _like(ref, value)
        for n in self._kept:
            out[n] = _like(live[n], kept[n])
        return {n: out[n] for n in self._names}

    def synthesize_module(self, sigma_rel: Optional[float] = None, step: Optional[int] = None,
                          *, gamma: Optional[float] = None) -> nn.Module:
        """A copy of the EMA module holding ``synthesize(...)`` (not for sharded models: load
        ``synthesize()`` into your own sharded model there)."""
        if distributed.is_sharded(self.ema.modules[0]):
            raise NotImplementedError("fused_ema: synthesize_module makes an unsharded copy; "
                                      "with FSDP2 load synthesize() into a sharded model")
        import copy
        state = self.synthesize(sigma_rel, step, gamma=gamma)
        module = copy.deepcopy(self.ema.modules[0])
        module.load_state_dict(state)
        return module

    # ------------------------------------------------------------------ checkpoints

    def state_dict(self) -> Dict[str, Any]:
        """The live profiles (``FusedEMA.state_dict``), the snapshot position and settings;
        waits for the snapshot being written so the checkpoint never runs ahead of it."""
        self._wait()
        return {"format": _FORMAT, "ema": self.ema.state_dict(),
                "next_index": self._next_index, "last_snapshot_step": self._last_snapshot_step,
                "calls": self._calls, "settings": self._fingerprint()}

    def load_state_dict(self, state_dict: Dict[str, Any]) -> None:
        """Resumes from ``state_dict()``; snapshot files written after that checkpoint (by the
        interrupted run) are removed, as the resumed run writes them again."""
        if not isinstance(state_dict, dict) or state_dict.get("format") != _FORMAT:
            raise ValueError("fused_ema: not a PostHocEMA state_dict")
        saved, ours = state_dict["settings"], self._fingerprint()
        diffs = [k for k in ours if saved.get(k) != ours[k]]
        if diffs:
            raise ValueError(f"fused_ema: the checkpoint was saved with other settings or "
                             f"another model ({', '.join(diffs)} differ)")
        self._wait()
        self.ema.load_state_dict(state_dict["ema"])
        self._next_index = int(state_dict["next_index"])
        self._last_snapshot_step = int(state_dict["last_snapshot_step"])
        self._calls = int(state_dict["calls"])
        stale = [p for i, _, _, p in self._files() if i >= self._next_index]
        if stale:
            warnings.warn(f"fused_ema: removing {len(stale)} snapshot file(s) written after the "
                          f"checkpoint (from index {self._next_index} on); the resumed run "
                          "writes them again", UserWarning, stacklevel=2)
            for p in stale:
                os.remove(p)
        self._reconciled = True

    def __repr__(self) -> str:
        tracked = ", ".join(f"{s:.4g}" for s in self.sigma_rels)
        return (f"PostHocEMA(sigma_rels=({tracked}), snapshot_every={self.snapshot_every}, "
                f"directory={self.directory!r}, snapshots={self._next_index})")


class _Handle:
    """Returned by ``PostHocEMA.attach``: ``remove()`` detaches both hooks."""

    def __init__(self, ema_handle, hook):
        self._ema_handle, self._hook = ema_handle, hook

    def remove(self) -> None:
        self._hook.remove()
        self._ema_handle.remove()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.remove()


def _like(ref: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` in ``ref``'s dtype and device (a DTensor with ref's placements for shards)."""
    local_ref = distributed.local(ref)
    # a view of the accumulator when dtype and device already match: no second copy
    value = value.to(device=local_ref.device, dtype=local_ref.dtype)
    if distributed.is_dtensor(ref):
        from torch.distributed.tensor import DTensor
        return DTensor.from_local(value, ref.device_mesh, ref.placements, run_check=False,
                                  shape=ref.shape, stride=ref.stride())
    return value


def _short(v) -> str:
    text = repr(v)
    return text if len(text) <= 80 else text[:77] + "..."
