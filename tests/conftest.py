import os

# Two cores: idle OpenMP threads must sleep rather than spin, or parallel test processes starve each other.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture(autouse=True)
def _torch_threads_restored():
    """Each test starts with the process's thread count: ``LLM(threads=1)`` and the CLIs' ``--threads`` set torch's
    global, and a later test's float results (and what a short training run learns) depend on it."""
    n = torch.get_num_threads()
    yield
    if torch.get_num_threads() != n:
        torch.set_num_threads(n)


@pytest.fixture
def load_benchmark(monkeypatch):
    """``load_benchmark("sizes")`` → benchmarks/sizes.py as a module. Benchmarks import their neighbours
    (``_report``, ``engine``), so their directory goes on sys.path for the test (restored after)."""
    import importlib.util
    from pathlib import Path

    bench = Path(__file__).resolve().parent.parent / "benchmarks"
    monkeypatch.syspath_prepend(str(bench))

    def load(name: str):
        spec = importlib.util.spec_from_file_location(f"bench_{name}", bench / f"{name}.py")
        mod = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(mod)
        return mod

    return load
