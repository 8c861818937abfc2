"""Which native ops (torch.ops.dmax) a piece of code runs, recorded at the dispatcher: the model
calls the ops directly (model/native.py), so a test that wants to know whether a module took its
native form watches the dispatcher rather than the dmax_ext.ops wrappers."""
from contextlib import contextmanager

from torch.utils._python_dispatch import TorchDispatchMode


class _Recorder(TorchDispatchMode):
    def __init__(self, calls: list):
        super().__init__()
        self.calls = calls

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.namespace == "dmax":
            self.calls.append((func.overloadpacket.__name__, args))
        return func(*args, **(kwargs or {}))


@contextmanager
def dmax_calls():
    """with dmax_calls() as calls: ... -> calls holds (op name, args) of each dmax op run."""
    calls: list = []
    with _Recorder(calls):
        yield calls
