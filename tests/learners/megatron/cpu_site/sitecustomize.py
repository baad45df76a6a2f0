"""TEST-ONLY: with this folder on PYTHONPATH and ASYNC_RL_MEGATRON_CPU_SHIM=1, a process that imports
`learners.megatron` gets the CPU shim (../cpu_shim.py) installed first, so `async-rl launch` can run the
Megatron learner on a CPU in the end-to-end test. Other processes (hub, engine, generator) only pay for
one meta-path hook that never fires. The production path never imports this."""
import os
import sys

if os.environ.get("ASYNC_RL_MEGATRON_CPU_SHIM") == "1":
    import importlib.abc

    class _InstallShimFirst(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name == "learners.megatron":
                sys.meta_path.remove(self)
                sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
                import cpu_shim
                cpu_shim.install()
            return None  # the normal import goes on

    sys.meta_path.insert(0, _InstallShimFirst())
