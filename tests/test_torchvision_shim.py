"""torchvision on the CPU torch: the start-up hook makes it importable in every interpreter."""
from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)


def test_torchvision_imports_in_a_fresh_interpreter():
    """A new process (like a vLLM engine core or a Ray worker) gets the hook from the .pth."""
    res = _run("import torch, torchvision\n"
               "from torchvision.transforms import v2\n"
               "import transformers.models.qwen2_vl.image_processing_qwen2_vl\n"
               "print('cuda' if torch.version.cuda else 'cpu', torchvision.__version__)")
    assert res.returncode == 0, res.stderr[-2000:]
    assert res.stdout.split()[0] in ("cpu", "cuda")


def test_hook_is_lazy():
    """Start-up does not import torch; only the first `import torchvision` does."""
    res = _run("import sys; print('torch' in sys.modules)")
    assert res.returncode == 0 and res.stdout.strip() == "False", res.stderr[-2000:]


def test_install_writes_hook(tmp_path):
    from avar_ray.compat import torchvision_shim

    pth = torchvision_shim.install(str(tmp_path))
    assert pth.read_text().strip() == f"import {torchvision_shim.HOOK_MODULE}"
    assert "install_finder" in (tmp_path / f"{torchvision_shim.HOOK_MODULE}.py").read_text()
