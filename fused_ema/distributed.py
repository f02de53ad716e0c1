"""Distributed training: the EMA of DDP replicas and of FSDP2 / DTensor shards.

DDP needs nothing here: ``FusedEMA`` looks through the wrapper (``module.`` names match),
each rank updates its own replica with no communication, and the replicas stay identical
because the weights are. Save from one rank (``if dist.get_rank() == 0: torch.save(...)``).

FSDP2 (``fully_shard``) and other DTensor models: every EMA tensor is a DTensor with the
parameter's mesh and placements; the engine sees only the local shards (``to_local()``
views), so an update is one fused call per rank over its shards, with no communication and
1/world_size of the EMA's memory per rank (for ``Shard`` placements). This module holds the
details ``FusedEMA`` calls through a few seams:

- :func:`is_sharded`, :func:`ema_module`: the EMA's tensors are made from the parameters
  (``DTensor.to(copy=True)``, a local copy) and held in a module tree of the same names
  whose ``forward`` raises: a module copy cannot run without the FSDP hooks; use
  ``with ema.swapped(): model(x)``.
- :func:`local`: the local shard (a view) of a DTensor, what the engine's plans hold.
- :func:`reshard`: FSDP2 keeps the root's gathered parameters after a forward without
  backward; before matching tensors and after a swap they are resharded so the sharded
  parameters are the ones read and written.
- ``ema.state_dict()`` then holds DTensors: ``torch.distributed.checkpoint`` saves and loads
  it on any number of ranks (or into an unsharded ``FusedEMA`` in one process);
  :func:`full_state_dict` gathers a plain state dict on rank 0 for export;
  :func:`load_full_state_dict` loads a plain one into a sharded EMA;
  :func:`latest_checkpoint` finds the newest complete DCP checkpoint.
"""
import os
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn

__all__ = ["is_dtensor", "is_sharded", "local", "reshard", "ema_module", "ShardedEMAModule",
           "full_state_dict", "load_full_state_dict", "local_numel", "latest_checkpoint"]

_DTENSOR = False  # not looked up yet


def _dtensor_type():
    """``DTensor``, or None in a torch built without distributed support."""
    global _DTENSOR
    if _DTENSOR is False:
        _DTENSOR = None
        if torch.distributed.is_available():
            from torch.distributed.tensor import DTensor
            _DTENSOR = DTensor
    return _DTENSOR


def _fsdp_module_type():
    """FSDP2's ``FSDPModule``, or None in a torch built without distributed support."""
    if not torch.distributed.is_available():
        return None
    from torch.distributed.fsdp import FSDPModule
    return FSDPModule


def _fully_shard():
    """FSDP2's ``fully_shard``."""
    from torch.distributed.fsdp import fully_shard
    return fully_shard


def is_dtensor(t: Any) -> bool:
    cls = _dtensor_type()
    return cls is not None and isinstance(t, cls)


def local(t: torch.Tensor) -> torch.Tensor:
    """The local shard of a DTensor (a view: writes reach the DTensor), else ``t``."""
    if is_dtensor(t):
        with torch.no_grad():
            return t.to_local()
    return t


def is_sharded(module: nn.Module) -> bool:
    """True when any parameter or buffer is a DTensor (FSDP2, tensor parallel)."""
    if _dtensor_type() is None:
        return False
    return any(is_dtensor(t) for t in module.parameters()) or any(
        is_dtensor(t) for t in module.buffers())


def _fsdp_modules(module: nn.Module) -> Iterator[nn.Module]:
    cls = _fsdp_module_type()
    if cls is None:
        return iter(())
    return (m for m in module.modules() if isinstance(m, cls))


def reshard(module: Optional[nn.Module]) -> None:
    """Reshards every FSDP2 module of ``module`` (no-op for other models): the sharded
    parameters are registered again and gathered copies are freed."""
    if module is None:
        return
    for m in _fsdp_modules(module):
        m.reshard()


_FORWARD_ERROR = (
    "fused_ema: the EMA of a sharded model (FSDP2 / DTensor) holds only this rank's shards "
    "and has no FSDP hooks to gather them, so ema.module cannot run forward. Run the online "
    "model with the EMA weights swapped in (it gathers them as in training):\n"
    "    with torch.no_grad(), ema.swapped():\n"
    "        out = model(x)\n"
    "or export a full copy with fused_ema.distributed.full_state_dict(ema) (on rank 0) and "
    "load it into an unsharded model.")


class ShardedEMAModule(nn.Module):
    """Holds the EMA of a sharded model under the model's names (``state_dict`` gives
    DTensors); ``forward`` raises, saying what to do instead."""

    def __init__(self, like: str = ""):
        super().__init__()
        self._like = like

    def forward(self, *args, **kwargs):
        raise RuntimeError(_FORWARD_ERROR)

    def extra_repr(self) -> str:
        return f"EMA of {self._like} (sharded; no forward)" if self._like else ""


def ema_module(model: nn.Module, memo: Dict[int, torch.Tensor]) -> nn.Module:
    """A module tree with ``model``'s names whose tensors are ``memo[id(model tensor)]``
    (tied tensors stay tied); used instead of ``copy.deepcopy`` for sharded models, whose
    FSDP state (hooks, process groups, gathered buffers) must not be copied."""
    built: Dict[int, nn.Module] = {}

    def build(mod: nn.Module) -> nn.Module:
        if id(mod) in built:  # a submodule shared under two names stays shared
            return built[id(mod)]
        out = ShardedEMAModule(type(mod).__name__)
        built[id(mod)] = out
        for key, t in mod._parameters.items():
            out._parameters[key] = None if t is None else memo[id(t)]
        for key, t in mod._buffers.items():
            out._buffers[key] = None if t is None else memo[id(t)]
        out._non_persistent_buffers_set = set(mod._non_persistent_buffers_set)
        for key, child in mod._modules.items():
            out._modules[key] = None if child is None else build(child)
        out.training = mod.training
        return out

    return build(model)


def check_device(model_device: torch.device, ema_device: torch.device, srcs) -> None:
    """A sharded EMA lives where its shards do: the engine updates local shards in place."""
    if model_device != ema_device and any(is_dtensor(t) for t in srcs):
        raise ValueError(
            f"fused_ema: device={ema_device} is not supported for a sharded (DTensor) model on "
            f"{model_device}: the EMA shards live with the parameter shards (each rank already "
            "holds 1/world_size of the EMA); leave device= unset")


def watch_entries(tensors) -> List[tuple]:
    """``(dtensor, "_local_tensor", local tensor)`` for the DTensors among ``tensors``: the
    per-step check that FSDP did not give a shard a new local tensor (e.g. ``to_empty``)."""
    return [(t, "_local_tensor", t._local_tensor) for t in tensors if is_dtensor(t)]


# ----------------------------------------------------------------------------- state dicts

def _map_tensors(obj, fn):
    if isinstance(obj, dict):
        return type(obj)((k, _map_tensors(v, fn)) for k, v in obj.items())
    if isinstance(obj, list):
        return [_map_tensors(v, fn) for v in obj]
    if isinstance(obj, torch.Tensor):
        return fn(obj)
    return obj


def full_state_dict(ema, *, rank0_only: bool = True, cpu: bool = True) -> Optional[Dict[str, Any]]:
    """``ema.state_dict()`` with every DTensor gathered into a plain tensor: loadable by the
    ``FusedEMA`` of an unsharded model (``load_state_dict``) or with ``torch.save``.

    Collective: every rank must call it. The tensors are gathered one at a time and (with
    ``cpu=True``) moved to host memory, so the accelerator holds one full tensor at a time.
    With ``rank0_only`` (default) ranks other than 0 get ``None``."""
    rank = torch.distributed.get_rank() if (torch.distributed.is_available()
                                            and torch.distributed.is_initialized()) else 0
    keep = rank == 0 or not rank0_only

    def gather(t):
        if is_dtensor(t):
            t = t.full_tensor()
        if not keep:
            return None
        return t.detach().cpu().clone() if cpu else t.detach().clone()

    out = _map_tensors(ema.state_dict(), gather)
    return out if keep else None


def load_full_state_dict(ema, state_dict: Dict[str, Any]) -> None:
    """Loads a plain (full) state dict, e.g. from :func:`full_state_dict` or an unsharded run,
    into a sharded ``FusedEMA``: each rank keeps its own part of every tensor, with no
    communication. Every rank must pass the full state dict (e.g. ``torch.load`` on each
    rank). The same as ``ema.load_state_dict(state_dict)``, which calls :func:`like`."""
    ema.load_state_dict(state_dict)


def like(target: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
    """``value`` as ``target`` holds it: this rank's part of a full tensor when ``target`` is
    a DTensor and ``value`` is not (``FusedEMA.load_state_dict``); else ``value``."""
    if is_dtensor(target) and not is_dtensor(value):
        return _distribute_like(value, target)
    return value


def _distribute_like(v: torch.Tensor, like) -> Any:
    """The DTensor with ``like``'s mesh and placements holding this rank's part of the full
    tensor ``v`` (present on every rank); no communication."""
    from torch.distributed.tensor import DTensor, Shard, Replicate
    if tuple(v.shape) != tuple(like.shape):
        raise ValueError(f"fused_ema: a tensor of shape {list(v.shape)} cannot be loaded into "
                         f"an EMA tensor of shape {list(like.shape)}")
    mesh = like.device_mesh
    piece = v
    coord = mesh.get_coordinate()
    for dim, p in enumerate(like.placements):
        if isinstance(p, Replicate):
            continue
        if not isinstance(p, Shard):
            raise ValueError(f"fused_ema: loading a full tensor into placement {p} is not "
                             "supported; load a sharded checkpoint with "
                             "torch.distributed.checkpoint instead")
        chunks = torch.chunk(piece, mesh.size(dim), dim=p.dim)  # torch.chunk: as Shard does
        i = coord[dim]
        piece = chunks[i] if i < len(chunks) else piece.narrow(p.dim, 0, 0)
    piece = piece.to(device=like.to_local().device, dtype=like.dtype).contiguous()
    return DTensor.from_local(piece, mesh, like.placements, run_check=False,
                              shape=like.shape, stride=like.stride())


def local_numel(ema, index: int = 0) -> int:
    """Elements of the EMA's parameters held by this rank (local shards of DTensors, whole
    plain tensors; not the frozen ones it shares with the model)."""
    owned = {id(t) for t in ema._owned(index)}
    return sum(local(t).numel() for t in ema.parameters(index) if id(t) in owned)


def latest_checkpoint(root: str) -> Optional[str]:
    """The subfolder of ``root`` holding the most recently completed
    ``torch.distributed.checkpoint`` (its ``.metadata`` file is written last, after every
    rank's data, so a run killed while saving leaves a folder without it); None if none."""
    if not os.path.isdir(root):
        return None
    done = [os.path.join(root, d, ".metadata") for d in os.listdir(root)]
    done = [m for m in done if os.path.isfile(m)]
    return os.path.dirname(max(done, key=os.path.getmtime)) if done else None
