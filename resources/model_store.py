"""Model acquisition: a candidate's files from an installed package, a local folder or the Hugging Face Hub,
and GGUF weights de-quantized once into a safetensors folder. Plain Python (no Dagster), so that scripts such as
benchmarks/ run where only the training stack is installed; resources/models.py is the Dagster resource.
"""

from __future__ import annotations

import contextlib
import functools
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.core.errors import ModelSourceError
from pipelines.core.files import atomic_path
from pipelines.core.sections import LocalModelConfig, PackageModelConfig
from pipelines.core.selection import ModelLocation
from pipelines.core.sources import packaged_path

# Code files come along so that a trusted remote-code model can load; they run only with trust_remote_code.
HUB_FILES = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.py", "README.md", "1_Pooling/*"]


@dataclass(frozen=True)
class ModelStore:
    """Where base models come from: packages, local folders (relative to project_root) and the Hub; GGUF
    conversions are kept in cache_dir. Plain Python, so that scripts (benchmarks/) need no Dagster; the Dagster
    resource is ModelStoreResource (resources/models.py)."""

    project_root: str
    cache_dir: str

    def locate(self, location: ModelLocation, allow_pickle: bool) -> tuple[Path, str | None]:
        """The model's local folder, and the revision it was taken at (when known)."""
        if isinstance(location, PackageModelConfig):
            try:
                folder, version = packaged_path(location.package, location.path, folder=True)
            except LookupError as exc:
                raise ModelSourceError(f"package / path: {exc}") from None
            return folder, f"{location.package}=={version}"
        if isinstance(location, LocalModelConfig):
            folder = Path(location.path)
            folder = folder if folder.is_absolute() else Path(self.project_root) / folder
            if not folder.is_dir():
                raise ModelSourceError(f"path: {location.path!r} is not a folder (looked at {folder})")
            return folder, None
        from huggingface_hub import snapshot_download

        patterns = [location.gguf_file, "README.md", "*.json"] if location.gguf_file else (
            HUB_FILES + ["pytorch_model*.bin"] if allow_pickle else HUB_FILES)
        try:
            folder = Path(snapshot_download(location.name, revision=location.revision, allow_patterns=patterns))
        except Exception as exc:
            raise ModelSourceError(
                f"cannot reach {location.name!r} at revision {location.revision!r} on the Hugging Face Hub: "
                f"{type(exc).__name__}: {str(exc).splitlines()[0]}. The Hub must be reachable (or the model in the "
                "local Hugging Face cache); otherwise download it once and use `source: local` with its folder "
                "(or `source: package`)") from None
        # The snapshot folder is named after the resolved commit, which pins a branch name like 'main'.
        return folder, folder.name

    def dequantize(self, folder: Path, gguf_file: str, sha256: str, license_id: str, name: str) -> Path:
        """The GGUF file's weights as a safetensors folder under cache_dir, keyed by the file's digest."""
        slug = re.sub(r"[^A-Za-z0-9_.-]+", "_", name).strip("_")
        return convert_gguf(folder, gguf_file, Path(self.cache_dir) / f"{slug}-{sha256[:12]}", license_id, name)


@contextlib.contextmanager
def _gguf_parsed_once() -> Iterator[None]:
    """While converting, gguf-py's file reader and tensor-name maps are built once instead of on every call.

    transformers parses the whole GGUF file (the tokenizer's 49k strings, element by element) for the tokenizer, the
    config and the tensors, ~4 s each for SmolLM2, and builds the tensor-name map of the architecture again for every
    submodule (397 times, ~7 s). Both are pure functions of their arguments and read-only afterwards, so they are
    memoized for the duration of the conversion and the originals put back afterwards: 19 s -> ~5 s."""
    import gguf

    reader_class, name_map = gguf.GGUFReader, gguf.get_tensor_name_map
    readers: dict[tuple[str, str], Any] = {}

    def reader(path: Any, mode: str = "r") -> Any:
        key = (str(Path(path).resolve()), mode)
        if key not in readers:
            readers[key] = reader_class(path, mode)
        return readers[key]

    gguf.GGUFReader, gguf.get_tensor_name_map = reader, functools.lru_cache(maxsize=None)(name_map)
    try:
        yield
    finally:
        gguf.GGUFReader, gguf.get_tensor_name_map = reader_class, name_map


def convert_gguf(folder: Path, gguf_file: str, target: Path, license_id: str, name: str) -> Path:
        """De-quantize a GGUF model once into a safetensors folder with its tokenizer (and chat template).

        Loading the GGUF takes ~15 s and transformers marks the model as quantized, which Trainer, TRL and
        save_pretrained refuse; the weights are already de-quantized to fp32, so the marker is removed and the
        folder reloads in well under a second. Written to a temporary sibling, then renamed.
        """
        if (target / "config.json").is_file():
            return target
        from transformers import AutoModelForCausalLM, AutoTokenizer

        with _gguf_parsed_once():
            tokenizer = AutoTokenizer.from_pretrained(str(folder), gguf_file=gguf_file)
            model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=gguf_file)
        if getattr(model, "hf_quantizer", None) is not None:
            model.hf_quantizer.remove_quantization_config(model)
        with atomic_path(target) as tmp:
            model.save_pretrained(str(tmp))
            tokenizer.save_pretrained(str(tmp))
            (tmp / "README.md").write_text(
                f"---\nlicense: {license_id}\nbase_model: {name}\n---\n\n# {name}\n\nDe-quantized by tuneline from "
                f"the GGUF file `{gguf_file}` (fp32 weights, safetensors).\n", encoding="utf-8")
        return target
