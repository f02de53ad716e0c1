"""What an adapter does not accelerate comes from the library it replaces, so the adapter
module offers every public name of that library's module(s): its own classes, and for any
other public name a module-level ``__getattr__`` (PEP 562) that imports the library on
first use and returns the library's own object (so the delegation imports nothing until
such a name is used).

>>> __getattr__, __dir__ = delegate(__name__, ["ema_pytorch"], "ema-pytorch==0.8.3")
"""
import importlib
import sys
from typing import Callable, List, Sequence, Tuple


def delegate(adapter: str, libraries: Sequence[str], pin: str) -> Tuple[Callable, Callable]:
    """``(__getattr__, __dir__)`` for the module ``adapter``: a name is looked up in each
    of ``libraries`` in turn (the module that defines the EMA class first, then the one
    users import it from, where they differ)."""

    def __getattr__(name: str):
        # private and dunder names stay private: probes such as __path__ or __wrapped__
        # must not import the library
        if name.startswith("_"):
            raise AttributeError(f"module {adapter!r} has no attribute {name!r}")
        for library in libraries:
            try:
                real = importlib.import_module(library)
            except ImportError as exc:
                raise ImportError(f"{adapter}.{name} is {library}'s own (fused_ema does not "
                                  f"accelerate it): it needs {pin} installed") from exc
            if hasattr(real, name):
                return getattr(real, name)
        raise AttributeError(f"module {adapter!r} has no attribute {name!r} (nor has "
                             f"{' or '.join(libraries)})")

    def __dir__() -> List[str]:
        names = set(vars(sys.modules[adapter]))
        for library in libraries:
            try:
                names.update(n for n in dir(importlib.import_module(library))
                             if not n.startswith("_"))
            except ImportError:
                pass
        return sorted(names)

    return __getattr__, __dir__
