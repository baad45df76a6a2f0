"""TEST HARNESS stub of `sgl_kernel` (SGLang's CUDA/CPU kernel package; its CPU build is not on PyPI).

It only satisfies imports so SGLang can start with SGLANG_USE_CPU_ENGINE=1 on a CPU-only machine; none of
its functions is called on that path. Any attribute is a function that raises if it ever is called.
"""


def __getattr__(name):
    if name.startswith("__"):
        raise AttributeError(name)

    def _not_available(*args, **kwargs):
        raise NotImplementedError(f"sgl_kernel.{name}: stub of the SGLang CPU test harness; not available")
    _not_available.__name__ = name
    return _not_available
