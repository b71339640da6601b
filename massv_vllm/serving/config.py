"""The MASSV drafter checkpoint schema: the one definition both transformers and vLLM read.

A drafter folder is a regular HF checkpoint of its small LM (``model_type`` "qwen2" or
"gemma3_text", so AutoConfig and vLLM parse it natively) whose ``config.json`` also carries:

    "architectures": ["MassvQwen2DrafterForCausalLM"],
    "vocab_size": <the target's text vocab size; rows past base_vocab_size are padding>,
    "massv": {
      "schema_version": 1,
      "massv_vllm_version": "0.1.0",
      "base_architecture": "Qwen2ForCausalLM",
      "base_vocab_size": 151936,
      "target": {"family": "qwen2_5_vl", "architecture": "Qwen2_5_VLForConditionalGeneration",
                 "image_token_id": 151655, "image_embed_dim": 3584, "vocab_size": 152064},
      "projector": {"input_dim": 3584, "hidden_dim": 1536, "depth": 2, "activation": "gelu"}
    }

``projector`` is null for a text-only drafter (the baseline): same model class, images ignored.
Keys are deliberately not named ``projection_*``: vLLM reads those to size its embedding buffers.

The folder is also a *speculators*-format model (vllm-project/speculators), so ``vllm serve
DRAFTER`` and ``LLM(model=DRAFTER)`` start its target with MASSV (``speculators_fields``):

    "speculators_model_type": "massv",
    "transformer_layer_config": {<the small LM's own config>},
    "speculators_config": {"proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": 5}],
                           "default_proposal_method": "greedy",
                           "verifier": {"name_or_path": "/abs/path/of/the/target", "architectures": [...]}}

``model_type`` stays the small LM's, so transformers and vLLM never read the folder as a
``SpeculatorsConfig``. ``pard_token`` (top level, where vLLM reads it) names the mask token of a
drafter trained for parallel drafting (training/parallel.py).
"""

from __future__ import annotations

import dataclasses
import json
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from massv_vllm import __version__
from massv_vllm.families import DRAFTER_ARCHITECTURES, FAMILIES

SCHEMA_VERSION = 1
CONFIG_KEY = "massv"
ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")

# Bounds on the sizes a drafter config may declare. Real checkpoints are far inside them (Qwen2.5
# and Gemma 3: hidden sizes <= 8192, vocabularies <= 262208, 2-layer projectors); a value outside
# is a broken or hostile config.json that would otherwise overflow, allocate without end, divide
# by zero or loop for hours while the checks build the model's shapes.
MAX_WIDTH = 2**16  # hidden sizes, projector widths, image-embedding widths
MAX_VOCAB = 2**22
MAX_PROJECTOR_DEPTH = 16  # LLaVA-style projectors have 2 layers
# The drafter's positions: vLLM builds a rotary table of max_position_embeddings x head_dim
# entries when the worker loads the drafter, so 1e18 passed the checks and failed at allocation
# after the engine had started. 2**22 (4M) is 4x the longest context of any Qwen2.5 (1M) or
# Gemma 3 (128k) release and keeps that table below a few GiB.
MAX_POSITIONS = 2**22
MAX_CONFIG_BYTES = 16 * 2**20  # config.json files are a few KiB
LIMIT_REASONS = {
    "max_position_embeddings": "vLLM allocates a rotary table of that many positions for the drafter",
}


def int_problems(
    values: Mapping[str, Any], limits: Mapping[str, tuple[int, int]], prefix: str = ""
) -> list[str]:
    """Each key of ``limits`` present (and not null) in ``values`` must be an int in [lo, hi]."""
    problems = []
    for name, (lo, hi) in limits.items():
        val = values.get(name)
        if val is None:
            continue
        if not isinstance(val, int) or isinstance(val, bool):
            problems.append(f"'{prefix}{name}' must be an integer, got {_brief(val)}")
        elif not lo <= val <= hi:
            why = f" ({LIMIT_REASONS[name]})" if name in LIMIT_REASONS else ""
            problems.append(f"'{prefix}{name}' is {_brief(val)}, outside the allowed range {lo}..{hi}{why}")
    return problems


def _brief(val: Any, n: int = 60) -> str:
    text = repr(val)
    return text if len(text) <= n else text[:n] + "..."


def special_file_problems(folder: Path) -> list[str]:
    """Entries of ``folder`` that are not regular files or folders (FIFOs, sockets, devices).

    Opening a FIFO blocks until someone writes to it (a ``model.safetensors`` FIFO hung the
    checks forever) and a device like /dev/zero never ends, so such entries are refused before
    anything in the folder is opened. Symlinks are followed: Hugging Face cache snapshots are
    symlinks into ``../../blobs``, so a link leaving the folder is normal; what it points to must
    still be a regular file.
    """
    problems = []
    try:
        entries = sorted(os.scandir(folder), key=lambda e: e.name)
    except OSError as e:
        return [f"cannot list {folder}: {e}"]
    for entry in entries:
        try:
            mode = os.stat(entry.path).st_mode  # follows symlinks
        except OSError:
            continue  # a dangling link: reported by whatever check needs that file
        if not (stat.S_ISREG(mode) or stat.S_ISDIR(mode)):
            kind = "a FIFO" if stat.S_ISFIFO(mode) else "a socket" if stat.S_ISSOCK(mode) else "a device"
            problems.append(f"{entry.name} is {kind}, not a regular file; massv-vllm does not open it")
    return problems


class MassvConfigError(ValueError):
    """A MASSV drafter (or its pairing with a target) is unusable; the message says why."""

    def __init__(self, subject: str, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        lines = "\n".join(f"  - {p}" for p in self.problems)
        super().__init__(f"{subject}:\n{lines}")


@dataclass
class ProjectorConfig:
    """MLP from the target's image-embedding width to the drafter's hidden size.

    ``depth`` Linear layers: input_dim -> hidden_dim -> ... -> (drafter hidden size), with
    ``activation`` between them (LLaVA-style 2-layer GELU MLP by default).
    """

    input_dim: int
    hidden_dim: int
    depth: int = 2
    activation: str = "gelu"


@dataclass
class TargetInfo:
    """What the drafter was built against; checked against the served target at start-up."""

    family: str
    architecture: str
    image_token_id: int
    image_embed_dim: int
    vocab_size: int


@dataclass
class MassvConfig:
    target: TargetInfo
    base_architecture: str
    base_vocab_size: int
    projector: ProjectorConfig | None
    schema_version: int = SCHEMA_VERSION
    massv_vllm_version: str = field(default=__version__)

    @property
    def text_only(self) -> bool:
        return self.projector is None

    @property
    def family(self):
        return FAMILIES[self.target.family]

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: Any, subject: str = "MASSV drafter config") -> MassvConfig:
        """Parse and type-check the ``massv`` section; every problem is reported at once."""
        if not isinstance(d, dict):
            raise MassvConfigError(subject, f"'{CONFIG_KEY}' must be an object, got {type(d).__name__}")
        version = d.get("schema_version")
        if version != SCHEMA_VERSION:
            writer = d.get("massv_vllm_version", "unknown")
            raise MassvConfigError(
                subject,
                f"schema_version {version!r} (written by massv-vllm {writer}); this massv-vllm "
                f"{__version__} reads schema_version {SCHEMA_VERSION}. Rebuild or convert the drafter "
                "with a matching massv-vllm.",
            )
        problems: list[str] = []
        target = _parse(TargetInfo, d.get("target"), "target", problems)
        proj_raw = d.get("projector")
        projector = None if proj_raw is None else _parse(ProjectorConfig, proj_raw, "projector", problems)
        known = {f.name for f in dataclasses.fields(cls)}
        problems += [f"unknown key '{k}'" for k in d if k not in known]
        for key, typ in (("base_architecture", str), ("base_vocab_size", int)):
            if not isinstance(d.get(key), typ):
                problems.append(f"'{key}' must be a {typ.__name__}, got {d.get(key)!r}")
        if isinstance(d.get("base_vocab_size"), int):
            problems += int_problems(d, {"base_vocab_size": (1, MAX_VOCAB)})
        if target is not None:
            if target.family not in FAMILIES:
                problems.append(f"target.family {target.family!r} is not one of {sorted(FAMILIES)}")
            target_limits = {
                "image_token_id": (0, MAX_VOCAB - 1),
                "image_embed_dim": (1, MAX_WIDTH),
                "vocab_size": (1, MAX_VOCAB),
            }
            problems += int_problems(dataclasses.asdict(target), target_limits, "target.")
        if projector is not None:
            if projector.activation not in ACTIVATIONS:
                problems.append(f"projector.activation {projector.activation!r} is not one of {ACTIVATIONS}")
            if projector.depth < 1:
                problems.append(f"projector.depth must be >= 1, got {projector.depth}")
            elif projector.depth > MAX_PROJECTOR_DEPTH:
                problems.append(
                    f"projector.depth {_brief(projector.depth)} exceeds the limit of {MAX_PROJECTOR_DEPTH} "
                    "layers (MASSV projectors have 2)"
                )
            for k in ("input_dim", "hidden_dim"):
                if getattr(projector, k) < 1:
                    problems.append(f"projector.{k} must be positive")
                elif getattr(projector, k) > MAX_WIDTH:
                    problems.append(f"projector.{k} {getattr(projector, k)} exceeds the limit of {MAX_WIDTH}")
        if problems:
            raise MassvConfigError(subject, problems)
        assert target is not None
        return cls(
            target=target,
            base_architecture=d["base_architecture"],
            base_vocab_size=d["base_vocab_size"],
            projector=projector,
            schema_version=version,
            massv_vllm_version=d.get("massv_vllm_version", "unknown"),
        )

    def check_base(self, base_cfg: Any) -> list[str]:
        """Problems between this section and the small-LM part of the same config.json."""
        problems = []
        fam = FAMILIES[self.target.family]
        model_type = getattr(base_cfg, "model_type", None)
        if model_type not in fam.base_model_types:
            problems.append(
                f"base model_type {model_type!r} is not a {fam.name} small LM "
                f"(expected one of {list(fam.base_model_types)})"
            )
        if self.base_architecture != fam.base_architecture:
            problems.append(
                f"unknown base_architecture {self.base_architecture!r} for family {fam.name} "
                f"(expected {fam.base_architecture!r})"
            )
        archs = getattr(base_cfg, "architectures", None) or []
        if archs != [fam.drafter_architecture]:
            known = sorted(DRAFTER_ARCHITECTURES)
            problems.append(f"architectures {archs} must be [{fam.drafter_architecture!r}] (known: {known})")
        vocab = getattr(base_cfg, "vocab_size", None)
        if vocab != self.target.vocab_size:
            problems.append(
                f"vocab_size {vocab} != target vocab size {self.target.vocab_size} (the drafter's "
                "embedding and lm_head must be padded to the target vocab)"
            )
        if self.base_vocab_size > (vocab or 0):
            problems.append(f"base_vocab_size {self.base_vocab_size} exceeds vocab_size {vocab}")
        if self.projector is not None and self.projector.input_dim != self.target.image_embed_dim:
            problems.append(
                f"projector.input_dim {self.projector.input_dim} != target.image_embed_dim "
                f"{self.target.image_embed_dim}"
            )
        return problems


def _parse(cls: type, raw: Any, name: str, problems: list[str]):
    """Build dataclass ``cls`` from ``raw``, appending type/key problems; None if unusable."""
    if not isinstance(raw, dict):
        problems.append(f"'{name}' must be an object, got {raw!r}")
        return None
    before = len(problems)
    fields = {f.name: f for f in dataclasses.fields(cls)}
    problems += [f"unknown key '{name}.{k}'" for k in raw if k not in fields]
    kwargs = {}
    for fname, f in fields.items():
        if fname not in raw:
            if f.default is dataclasses.MISSING:
                problems.append(f"missing key '{name}.{fname}'")
            continue
        want = int if f.type in ("int", int) else str  # annotations are strings here
        val = raw[fname]
        if not isinstance(val, want) or isinstance(val, bool):
            problems.append(f"'{name}.{fname}' must be {want.__name__}, got {val!r}")
        kwargs[fname] = val
    return cls(**kwargs) if len(problems) == before else None


SPECULATORS_TYPE = "massv"
SPECULATORS_KEYS = ("speculators_model_type", "transformer_layer_config", "speculators_config")
DEFAULT_GAMMA = 5
MAX_GAMMA = 64


def speculators_fields(
    base_config: Mapping[str, Any], massv: MassvConfig, *, gamma: int, verifier: str
) -> dict[str, Any]:
    """The top-level config.json keys of the speculators format for this drafter.

    ``verifier`` is the target as the drafter was built or trained against it (an absolute local
    path or a hub id); ``gamma`` the number of draft tokens vLLM uses when none is given."""
    if not isinstance(gamma, int) or not 1 <= gamma <= MAX_GAMMA:
        raise MassvConfigError(
            "speculators config", f"speculative_tokens must be 1..{MAX_GAMMA}, got {gamma!r}"
        )
    layer = {k: v for k, v in base_config.items() if k not in (CONFIG_KEY, *SPECULATORS_KEYS)}
    return {
        "speculators_model_type": SPECULATORS_TYPE,
        "transformer_layer_config": layer,
        "speculators_config": {
            "proposal_methods": [{"proposal_type": "greedy", "speculative_tokens": gamma}],
            "default_proposal_method": "greedy",
            "verifier": {"name_or_path": verifier, "architectures": [massv.target.architecture]},
        },
    }


def recorded_gamma(raw: Mapping[str, Any]) -> int | None:
    """The number of draft tokens a drafter folder records (its speculators section), if any."""
    try:
        gamma = raw["speculators_config"]["proposal_methods"][0]["speculative_tokens"]
    except (KeyError, IndexError, TypeError):
        return None
    return (
        gamma if isinstance(gamma, int) and not isinstance(gamma, bool) and 1 <= gamma <= MAX_GAMMA else None
    )


def recorded_verifier(raw: Mapping[str, Any]) -> str | None:
    """The target a drafter folder names as its verifier, if any."""
    try:
        name = raw["speculators_config"]["verifier"]["name_or_path"]
    except (KeyError, TypeError):
        return None
    return name if isinstance(name, str) and name else None


def read_config_json(folder: str | Path, subject: str | None = None) -> dict[str, Any]:
    """``folder``/config.json as a dict; a missing, special, huge, invalid or too deeply nested
    file (json raises RecursionError past ~1000 levels) is a ``MassvConfigError``."""
    subject = subject or f"MASSV drafter {folder}"
    path = Path(folder) / "config.json"
    if not path.is_file():  # follows symlinks; False for FIFOs and devices, which are never opened
        what = "is not a regular file" if path.exists() else "does not exist"
        raise MassvConfigError(subject, f"no config.json in {folder} ({path.name} {what})")
    size = path.stat().st_size
    if size > MAX_CONFIG_BYTES:
        raise MassvConfigError(subject, f"config.json is {size} bytes, over the limit of {MAX_CONFIG_BYTES}")
    try:
        raw = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise MassvConfigError(subject, f"config.json is not valid JSON: {e}") from e
    except RecursionError as e:
        raise MassvConfigError(subject, "config.json is nested too deeply to be a model config") from e
    if not isinstance(raw, dict):
        raise MassvConfigError(subject, f"config.json must hold a JSON object, got {type(raw).__name__}")
    return raw


def is_massv_folder(folder: str | Path) -> bool:
    """True when ``folder`` holds a config.json with a ``massv`` section (cheap, no validation)."""
    try:
        return CONFIG_KEY in read_config_json(folder)
    except MassvConfigError:
        return False


def load_massv_config(folder: str | Path) -> MassvConfig:
    """Read and validate the ``massv`` section of a drafter folder's config.json."""
    return massv_config_from_json(read_config_json(folder), f"MASSV drafter {folder}")


def massv_config_from_json(raw: dict[str, Any], subject: str) -> MassvConfig:
    """The ``massv`` section of an already-read config.json, validated."""
    if CONFIG_KEY not in raw:
        raise MassvConfigError(
            subject,
            f"config.json has no '{CONFIG_KEY}' section: this is not a MASSV drafter "
            "(build one with `massv-build-drafter`)",
        )
    return MassvConfig.from_dict(raw[CONFIG_KEY], subject)


def massv_config_from_hf(hf_config: Any) -> MassvConfig:
    """The MASSV section of an already-parsed HF config (vLLM's ``hf_config``)."""
    raw = getattr(hf_config, CONFIG_KEY, None)
    if raw is None:
        raise MassvConfigError("MASSV drafter config", f"hf_config has no '{CONFIG_KEY}' section")
    return MassvConfig.from_dict(raw)
