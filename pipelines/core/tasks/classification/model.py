"""The classifier and its inputs: pooling token states the way the model declares, the linear head, frozen lower
blocks computed once, frozen embeddings (cached across steps) and the linear probe that starts the head (LP-FT)."""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from pipelines.core.records import BaseModelRecord
from pipelines.core.sections import SpecView
from pipelines.core.splitting import sample_split
from pipelines.core.tasks.base import ProbeResult
from pipelines.core.tasks.classification.linear_probe import LinearProbe, fit_probe
from pipelines.core.training.compute import ComputeSettings
from pipelines.core.training.model import transformer_blocks



# ------------------------------------------------------------------------------------------ the model
def pool(hidden: torch.Tensor, mask: torch.Tensor, mode: str) -> torch.Tensor:
    """One vector per row from token states: 'mean' over real tokens, 'cls' (first token), 'max', or 'last'
    (the last real token, which in a decoder has seen the whole text; works with left or right padding)."""
    if mode == "cls":
        return hidden[:, 0]
    if mode == "last":
        last = mask.shape[1] - 1 - mask.flip(1).to(torch.long).argmax(dim=1)
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    keep = mask.unsqueeze(-1).to(hidden.dtype)
    if mode == "max":
        return hidden.masked_fill(keep == 0, torch.finfo(hidden.dtype).min).max(dim=1).values
    return (hidden * keep).sum(dim=1) / keep.sum(dim=1).clamp(min=1.0)


class PooledClassifier(nn.Module):
    """Encoder -> pooling -> dropout -> linear head."""

    def __init__(self, encoder: nn.Module, pooling: str, num_labels: int, hidden_size: int,
                 dropout: float = 0.1, label_smoothing: float = 0.0) -> None:
        super().__init__()
        self.label_smoothing = label_smoothing
        self.encoder = encoder
        self.pooling = pooling
        self.dropout = nn.Dropout(dropout)
        self.head = nn.Linear(hidden_size, num_labels)
        self.frozen_lower: FrozenLowerBlocks | None = None

    def embed(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
              token_type_ids: torch.Tensor | None = None) -> torch.Tensor:
        extra = {"token_type_ids": token_type_ids} if token_type_ids is not None else {}
        out = self.encoder(input_ids=input_ids, attention_mask=attention_mask, **extra)
        return pool(out.last_hidden_state, attention_mask, self.pooling)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                rows: torch.Tensor | None = None) -> Any:
        """`rows`: the batch's row numbers, while training on cached frozen blocks (FrozenLowerBlocks)."""
        from transformers.modeling_outputs import SequenceClassifierOutput

        if rows is not None and self.frozen_lower is not None:
            self.frozen_lower.select(rows, attention_mask)

        logits = self.head(self.dropout(self.embed(input_ids, attention_mask, token_type_ids)))
        loss = (F.cross_entropy(logits.float(), labels, label_smoothing=self.label_smoothing if self.training else 0.0)
                if labels is not None else None)
        return SequenceClassifierOutput(loss=loss, logits=logits)


class _PassThrough(nn.Module):
    """Stands in for a frozen block whose output is cached: returns its input hidden states."""

    def forward(self, hidden_states: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        return hidden_states


class FrozenLowerBlocks:
    """The outputs of the frozen blocks below the first adapted one, computed once for every row and fed to that
    block during training instead of recomputing them at every step.

    The blocks below `cut` have no trainable weights, so their output for a text is the same every epoch (in eval
    mode: the frozen blocks' dropout is off). `append` runs them once over the next rows (length-sorted batches,
    alone or within the linear probe's embedding pass); `attached()` swaps them for pass-throughs and makes block
    `cut` read the cached states of the rows the model is given (`select(rows, attention_mask)`), placed at the
    mask's real-token positions (left or right padding).
    """

    def __init__(self, encoder: nn.Module, cut: int) -> None:
        self.blocks = transformer_blocks(encoder)[1]
        self.cut = cut
        self.states: list[torch.Tensor] = []
        self.batch: tuple[torch.Tensor, torch.Tensor] | None = None
        self._flat: torch.Tensor | None = None  # every row's states, end to end, where the model computes
        self._offsets: torch.Tensor | None = None  # where each row's states start in _flat

    @torch.no_grad()
    def append(self, encoder: nn.Module, tokenizer: Any, texts: Sequence[str], max_length: int,
               compute: ComputeSettings, batch_size: int = 128, pooling: str | None = None) -> np.ndarray | None:
        """Compute the frozen blocks' outputs for `texts` (the next rows) and keep them. With `pooling`, the whole
        model runs and its pooled embeddings are returned, exactly as `embed_texts` computes them (same batches);
        without, the blocks above are skipped."""
        self._flat = self._offsets = None  # built again from every row's states when next fed
        captured: list[torch.Tensor] = []
        masks: list[torch.Tensor] = []
        hook = self.blocks[self.cut - 1].register_forward_hook(
            lambda module, args, output: captured.append(output[0] if isinstance(output, tuple) else output))
        upper = list(self.blocks[self.cut:])

        def fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
            masks.append(inputs["attention_mask"].bool())
            return pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"], pooling or "mean")

        device = torch.device(compute.device)
        encoder.eval().to(device)
        try:
            if pooling is None:
                for i in range(self.cut, len(self.blocks)):
                    self.blocks[i] = _PassThrough()
            result = _forward_batches(fn, tokenizer, texts, max_length, batch_size, compute, device)
        finally:
            hook.remove()
            for offset, block in enumerate(upper):
                self.blocks[self.cut + offset] = block
        lengths = [len(ids) for ids in tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]]
        dtype = torch.bfloat16 if compute.precision == "bf16" else torch.float32
        states: list[torch.Tensor | None] = [None] * len(texts)
        for batch, hidden, mask in zip(_batches_by_length(lengths, batch_size), captured, masks, strict=True):
            for row, i in enumerate(batch):  # the batches _forward_batches ran, in its order
                states[i] = hidden[row][mask[row].to(hidden.device)].to(dtype).cpu()
        self.states.extend(states)  # type: ignore[arg-type]
        return result if pooling is not None else None

    @property
    def megabytes(self) -> float:
        return sum(t.numel() * t.element_size() for t in self.states) / 2**20

    def select(self, rows: torch.Tensor, attention_mask: torch.Tensor) -> None:
        self.batch = (rows, attention_mask)

    def _stored_on(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """The states as one tensor on `device` (built once per attachment; on a CPU the rows become views of it,
        so the memory is not held twice) and each row's offset in it."""
        if self._flat is None or self._flat.device != device:
            lengths = torch.tensor([len(t) for t in self.states], dtype=torch.long)
            self._flat = torch.cat(self.states).to(device)
            self._offsets = (torch.cumsum(lengths, 0) - lengths).to(device)
            if self._flat.device.type == "cpu":
                self.states = list(torch.split(self._flat, lengths.tolist()))
        return self._flat, self._offsets  # type: ignore[return-value]

    def _feed(self, module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
        if self.batch is None:
            raise RuntimeError("FrozenLowerBlocks: the model was called without the rows of the batch")
        rows, mask = self.batch
        hidden = args[0] if args else kwargs["hidden_states"]
        flat, offsets = self._stored_on(hidden.device)
        # A gather computed where the model runs: each real token's place in its row's states (left or right
        # padding alike), no per-row copies and nothing that waits for a GPU to finish.
        real = mask.to(hidden.device).bool()
        within = (real.long().cumsum(1) - 1).clamp(min=0)
        fed = flat[offsets[rows.to(hidden.device)].unsqueeze(1) + within].to(hidden.dtype)
        fed = fed * real.unsqueeze(-1).to(hidden.dtype)
        if args:
            return (fed, *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": fed}

    @contextmanager
    def attached(self) -> Iterator[None]:
        lower = list(self.blocks[:self.cut])
        for i in range(self.cut):
            self.blocks[i] = _PassThrough()
        hook = self.blocks[self.cut].register_forward_pre_hook(self._feed, with_kwargs=True)
        try:
            yield
        finally:
            hook.remove()
            for i, block in enumerate(lower):
                self.blocks[i] = block
            self.batch = None
            if self._flat is not None and self._flat.device.type != "cpu":
                self._flat = self._offsets = None  # the device's memory back; the rows stay on the host


def load_encoder(base: BaseModelRecord) -> nn.Module:
    """The base model's encoder, without the task-specific pooler that sentence encoders never trained."""
    from transformers import AutoModel

    encoder = AutoModel.from_pretrained(base.local_path, trust_remote_code=base.trust_remote_code)
    if getattr(encoder, "pooler", None) is not None:
        encoder.pooler = None
    return encoder


def load_tokenizer(path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


# ------------------------------------------------------------------------------------ embeddings
def _batches_by_length(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    order = np.argsort(np.asarray(lengths), kind="stable")
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


@torch.no_grad()
def _forward_batches(fn: Callable[[dict[str, torch.Tensor]], torch.Tensor], tokenizer: Any,
                     texts: Sequence[str], max_length: int, batch_size: int, compute: ComputeSettings,
                     device: torch.device) -> np.ndarray:
    encoded = tokenizer(list(texts), truncation=True, max_length=max_length)
    lengths = [len(ids) for ids in encoded["input_ids"]]
    outputs: list[np.ndarray | None] = [None] * len(texts)
    for batch in _batches_by_length(lengths, batch_size):  # length-sorted batches: little padding
        features = [{k: encoded[k][i] for k in encoded.keys()} for i in batch]
        padded = tokenizer.pad(features, return_tensors="pt")
        inputs = {k: v.to(device) for k, v in padded.items()}
        with compute.autocast():
            result = fn(inputs).float().cpu().numpy()
        for row, i in enumerate(batch):
            outputs[i] = result[row]
    return np.stack(outputs) if outputs else np.zeros((0, 0), dtype=np.float32)  # type: ignore[arg-type]


def embed_texts(encoder: nn.Module, tokenizer: Any, texts: Sequence[str], pooling: str, max_length: int,
                compute: ComputeSettings, batch_size: int = 128) -> np.ndarray:
    """Frozen pooled embeddings of `texts` (float32, one row per text, in order)."""
    device = torch.device(compute.device)
    encoder.eval().to(device)

    def fn(inputs: dict[str, torch.Tensor]) -> torch.Tensor:
        return pool(encoder(**inputs).last_hidden_state, inputs["attention_mask"], pooling)

    return _forward_batches(fn, tokenizer, texts, max_length, batch_size, compute, device)


EMBEDDING_CACHE_FILES = 32  # the newest files kept in the embedding cache


FROZEN_STATES_BUDGET_MB = 4096  # the most memory the cached outputs of frozen blocks may take


def _embedding_path(base: BaseModelRecord, texts: Sequence[str], max_length: int, compute: ComputeSettings,
                    batch_size: int, pooling: str, variant: str | None) -> Path | None:
    """Where frozen_embeddings keeps these embeddings: a digest of everything they depend on (None: no cache)."""
    import hashlib

    if not compute.cache_dir:
        return None
    digest = hashlib.sha256("\0".join([base.weights_sha256, pooling, str(max_length), compute.precision,
                                       compute.device, str(batch_size), torch.__version__]
                                      + ([variant] if variant else [])).encode())
    digest.update(b"\1".join(t.encode("utf-8", "surrogatepass") for t in texts))
    return Path(compute.cache_dir) / "embeddings" / f"{digest.hexdigest()[:32]}.npy"


def cached_embeddings(base: BaseModelRecord, texts: Sequence[str], max_length: int, compute: ComputeSettings,
                      batch_size: int = 128, pooling: str | None = None,
                      variant: str | None = None) -> np.ndarray | None:
    """The embeddings frozen_embeddings computed earlier for exactly these arguments, or None (nothing computed)."""
    return _load_cached(_embedding_path(base, texts, max_length, compute, batch_size, pooling or base.pooling,
                                        variant), len(texts))


def _load_cached(path: Path | None, rows: int) -> np.ndarray | None:
    if path is None or not path.is_file():
        return None
    try:
        found = np.load(path, allow_pickle=False)
    except (OSError, ValueError):  # a damaged file is recomputed and replaced
        return None
    if found.shape[0] != rows:
        return None
    path.touch()
    return found


def frozen_embeddings(base: BaseModelRecord, texts: Sequence[str], max_length: int, compute: ComputeSettings,
                      batch_size: int = 128, load: Callable[[], tuple[nn.Module, Any]] | None = None,
                      pooling: str | None = None, lower: FrozenLowerBlocks | None = None,
                      variant: str | None = None) -> np.ndarray:
    """Pooled embeddings of `texts` by the frozen base model, kept in compute.cache_dir so that the steps which
    need the same ones (the linear-probe head of training, the linear-probe baseline of evaluation) compute them
    once. The cache key is everything the result depends on (weights digest, pooling, length, precision, device,
    batch size, torch version and the texts in order), so a hit returns exactly what computing would.
    `load` returns the (encoder, tokenizer), called on a miss only (default: load them from the base model).
    With `lower`, the outputs of its frozen blocks for `texts` are kept too (from the same pass on a miss).
    `variant` names a `load` whose model differs from the base model as loaded (e.g. cast to bf16): part of the key."""
    from pipelines.core.files import write_bytes_atomic

    pooling = pooling or base.pooling
    load = load or (lambda: (load_encoder(base), load_tokenizer(base.local_path)))
    path = _embedding_path(base, texts, max_length, compute, batch_size, pooling, variant)
    found = _load_cached(path, len(texts))
    if found is not None:
        if lower is not None:  # the embeddings are known; the frozen blocks still run for their states
            lower.append(*load(), texts, max_length, compute, batch_size)
        return found
    cache = path.parent if path is not None else None
    encoder, tokenizer = load()
    result = (lower.append(encoder, tokenizer, texts, max_length, compute, batch_size, pooling) if lower
              else embed_texts(encoder, tokenizer, texts, pooling, max_length, compute, batch_size))
    if path is not None:
        import io

        buffer = io.BytesIO()
        np.save(buffer, result, allow_pickle=False)
        try:
            write_bytes_atomic(path, buffer.getvalue())
            for old in sorted(cache.glob("*.npy"), key=lambda p: p.stat().st_mtime)[:-EMBEDDING_CACHE_FILES]:
                old.unlink(missing_ok=True)
        except OSError:  # a cache that cannot be written costs time, never the result
            pass
    return result


def frozen_reader(record: BaseModelRecord, compute: ComputeSettings) -> tuple[Callable[[], tuple[nn.Module, Any]],
                                                                             str | None]:
    """(load, variant) for frozen_embeddings of a model that is only read (the selection probe, the data doctor):
    loaded once and only on a cache miss. Under bf16 it holds bf16 weights, since autocast would cast every weight
    again for every batch (a quarter of SmolLM2's probe); such embeddings are kept under their own cache key."""
    variant = "bf16-weights" if compute.precision == "bf16" else None

    @functools.cache
    def load() -> tuple[nn.Module, Any]:
        encoder = load_encoder(record)
        return (encoder.to(torch.bfloat16) if variant else encoder), load_tokenizer(record.local_path)

    return load, variant


def fit_linear_probe(train_x: np.ndarray, train_y: np.ndarray, val_x: np.ndarray | None,
                     val_y: np.ndarray | None, device: str = "cpu") -> LinearProbe:
    """Logistic regression on standardized frozen embeddings (linear_probe.py, fitted in torch on
    `device`); C chosen on validation when there is one.

    Standardizing matters for decoders: their hidden states have a few dimensions hundreds of times larger than the
    rest, and L-BFGS on them took 7 s where it takes 1 s on standardized features (SmolLM2, 1,024 rows)."""
    candidates = (0.01, 0.1, 1.0) if val_x is not None and len(val_x) else (0.1,)
    best, best_score = None, -1.0
    for c in candidates:
        probe = fit_probe(train_x, train_y, c, device)
        score = probe.score(val_x, val_y) if len(candidates) > 1 else 0.0
        if score > best_score:
            best, best_score = probe, score
    return best


def _head_from_probe(head: nn.Linear, probe: LinearProbe, num_labels: int) -> None:
    """Start the head from the fitted probe: the scaler folded into the regression's weights, so that the head on
    raw embeddings computes the probe's logits (w / scale, b - w . mean / scale). A label the probe never saw in
    training gets no weight and a bias below every other, so the head starts by never predicting it."""
    weight = np.asarray(probe.coef_, dtype=np.float64) / probe.scale_
    intercept = np.asarray(probe.intercept_, dtype=np.float64) - weight @ probe.mean_
    rows = np.asarray(probe.classes_, dtype=np.int64)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.fill_(float(intercept.min()) - 10.0 if len(rows) < num_labels else 0.0)
        head.weight[torch.as_tensor(rows)] = torch.tensor(weight, dtype=head.weight.dtype)
        head.bias[torch.as_tensor(rows)] = torch.tensor(intercept, dtype=head.bias.dtype)


def mean_tokens(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame) -> float:
    """Mean tokens per training text with this model's tokenizer (a train sample, at most max_length)."""
    sample = sample_split(splits, "train", 256, spec.training.seed)
    encoded = load_tokenizer(record.local_path)(sample["text"].tolist(), truncation=True,
                                                max_length=spec.training.max_length)
    return float(np.mean([len(ids) for ids in encoded["input_ids"]])) if len(sample) else 1.0


def probe_candidate(record: BaseModelRecord, spec: SpecView, splits: pd.DataFrame,
                    compute: ComputeSettings) -> ProbeResult:
    """A logistic regression on frozen embeddings of the train split (up to probe.train_rows), scored on the
    validation split (up to probe.sample_rows), with the score on 1,000 bootstrap resamples of the validation rows
    (the same resamples for every candidate).

    Whole splits are embedded in split order, with the arguments the linear-probe head of training and the
    linear-probe baseline use, so the winner's embeddings are computed once for all three (the embedding cache)."""
    from pipelines.core.tasks.classification.metrics import bootstrap_metric, classification_metrics

    probe, seed = spec.base_model.probe, spec.training.seed
    validation = sample_split(splits, "validation", probe.sample_rows, seed)
    train = sample_split(splits, "train", probe.train_rows, seed)
    labels = sorted(set(splits["label"]))
    index = {label: i for i, label in enumerate(labels)}
    load, variant = frozen_reader(record, compute)

    def embed(frame: pd.DataFrame) -> np.ndarray:  # kept in the embedding cache: probing again is instant
        # The whole split's embeddings when a step has computed them (the data doctor, when its model is this
        # candidate, embeds every split): the sample's rows are taken from them instead of run again.
        whole = splits[splits["split"] == frame["split"].iloc[0]] if len(frame) else frame
        found = cached_embeddings(record, whole["text"].tolist(), spec.training.max_length, compute,
                                  variant=variant) if whole.index.is_unique and len(frame) else None
        if found is not None:
            return found[whole.index.get_indexer(frame.index)]
        return frozen_embeddings(record, frame["text"].tolist(), spec.training.max_length, compute,
                                 load=load, variant=variant)

    fitted = fit_linear_probe(embed(train), train["label"].map(index).to_numpy(), None, None, compute.device)
    metric = spec.evaluation.primary_metric
    truth = validation["label"].map(index).to_numpy()
    predicted = fitted.predict(embed(validation))
    value = classification_metrics(truth, predicted, len(labels))[metric]
    replicates = bootstrap_metric(truth, predicted, len(labels), metric, seed)
    return ProbeResult(f"linear_probe_{metric}", value, value, replicates)
