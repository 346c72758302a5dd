"""The frontend process never imports torch (checked in fresh interpreters)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def run_python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)


def test_server_modules_import_without_torch() -> None:
    result = run_python(
        "import sys\n"
        "import lmserve.server.app, lmserve.server.serve, lmserve.cli, lmserve.workers.router\n"
        "print(sorted(m for m in ('torch', 'transformers') if m in sys.modules))\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_frontend_tokenizer_loads_with_torch_forbidden(tiny_model_dir: Path) -> None:
    result = run_python(
        "from lmserve.server.loading import forbid_torch\n"
        "forbid_torch()\n"
        "from lmserve.engine.tokenizer import Tokenizer\n"
        f"tok = Tokenizer({str(tiny_model_dir)!r})\n"
        "print(tok.decode(tok.encode('hello world')), tok.chat_prompt_ids([{'role': 'user', 'content': 'hi'}]) != [])\n"
        "try:\n    import torch\nexcept ImportError:\n    print('torch blocked')\n"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split("\n")[:2] == ["hello world True", "torch blocked"]
    assert "PyTorch was not found" not in result.stderr
