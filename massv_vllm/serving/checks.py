"""Validation of drafter folders and drafter/target pairs, before any model or GPU memory is used.

Everything a user can get wrong is checked here and reported as one ``MassvConfigError`` that
lists every problem found: missing or corrupt files, pickle weights, config/schema errors, tensor
shapes, and (with a target) family, vocab, tokenizer, image token and projector width.

A drafter folder is data, never code: configs and tokenizers are loaded with
``trust_remote_code=False`` (a ``config.json`` whose ``auto_map`` points at a ``.py`` file made
transformers ask "run the custom code? [y/N]"), FIFOs and devices are refused before anything is
opened, and every size the checks build shapes from is bounded first (``config.py``).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from massv_vllm.families import FAMILIES, family_of_target
from massv_vllm.serving.config import (
    MAX_POSITIONS,
    MAX_VOCAB,
    MAX_WIDTH,
    MassvConfig,
    MassvConfigError,
    int_problems,
    massv_config_from_json,
    read_config_json,
    special_file_problems,
)

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ALLOW_PICKLE_ENV = "MASSV_ALLOW_PICKLE"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json")
# The small-LM fields the checks build tensor shapes from (see config.py for the bounds' reasons).
BASE_LIMITS = {
    "hidden_size": (1, MAX_WIDTH),
    "intermediate_size": (1, 4 * MAX_WIDTH),
    "num_hidden_layers": (1, 512),
    "num_attention_heads": (1, 1024),
    "num_key_value_heads": (1, 1024),
    "head_dim": (1, 2048),
    "vocab_size": (1, MAX_VOCAB),
    "max_position_embeddings": (1, MAX_POSITIONS),
    "sliding_window": (1, MAX_POSITIONS),
}


@dataclass
class DrafterInfo:
    path: Path
    massv: MassvConfig
    base_config: Any  # transformers PretrainedConfig of the small LM (with vocab padded)
    weight_files: list[Path]


def allow_pickle_default() -> bool:
    return os.environ.get(ALLOW_PICKLE_ENV, "") not in ("", "0", "false", "False")


def weight_files(folder: Path, subject: str, allow_pickle: bool) -> list[Path]:
    """The safetensors files of ``folder``; pickle-only checkpoints are refused unless allowed."""
    st = sorted(folder.glob("*.safetensors"))
    if st:
        return st
    pickles = sorted(p for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if pickles and not allow_pickle:
        raise MassvConfigError(
            subject,
            f"weights are pickle files ({', '.join(p.name for p in pickles)}), which can run code "
            f"when loaded; convert them to safetensors, or set {ALLOW_PICKLE_ENV}=1 / "
            "allow_pickle=True if you trust them",
        )
    if pickles:
        return pickles
    raise MassvConfigError(subject, f"no weight files (*.safetensors) in {folder}")


def tensor_shapes(files: list[Path], subject: str) -> dict[str, tuple[int, ...]]:
    """Names and shapes of every tensor, read from safetensors headers (no data loaded)."""
    from safetensors import safe_open

    shapes: dict[str, tuple[int, ...]] = {}
    for f in files:
        if f.suffix != ".safetensors":
            continue
        try:
            with safe_open(str(f), framework="pt") as h:
                for k in h.keys():  # noqa: SIM118 (safe_open is not a dict)
                    shapes[k] = tuple(h.get_slice(k).get_shape())
        except Exception as e:  # safetensors raises its own error types for bad headers/sizes
            raise MassvConfigError(subject, f"corrupt or truncated safetensors file {f.name}: {e}") from e
    return shapes


def expected_shapes(base_config: Any, massv: MassvConfig) -> dict[str, tuple[int, ...]]:
    """Every tensor a complete drafter checkpoint holds, from its configs (meta device, no memory)."""
    import torch
    from transformers import AutoModelForCausalLM

    from massv_vllm.serving.projector import Projector

    with torch.device("meta"):
        base = AutoModelForCausalLM.from_config(base_config, trust_remote_code=False)
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    if getattr(base_config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    if massv.projector is not None:
        with torch.device("meta"):
            proj = Projector(massv.projector, base_config.hidden_size)
        shapes |= {f"projector.{k}": tuple(v.shape) for k, v in proj.state_dict().items()}
    return shapes


def model_type_problems(raw: dict[str, Any]) -> list[str]:
    """config.json must name a model type this transformers knows: an unknown one is only loadable
    with the folder's own code (``auto_map``), which massv-vllm never runs."""
    from transformers import CONFIG_MAPPING, __version__

    model_type = raw.get("model_type")
    if isinstance(model_type, str) and model_type in CONFIG_MAPPING:
        return []
    code = (
        f" (its auto_map names code in the folder: {str(raw['auto_map'])[:120]})" if "auto_map" in raw else ""
    )
    return [
        f"config.json model_type {repr(model_type)[:80]} is not a model type transformers {__version__} knows"
        f"{code}; massv-vllm loads configs with trust_remote_code=False and never runs code "
        "shipped in a model folder"
    ]


def base_config_problems(raw: dict[str, Any]) -> list[str]:
    """Types and ranges of the small-LM fields, checked before transformers or torch see them."""
    problems = model_type_problems(raw) + int_problems(raw, BASE_LIMITS)
    if problems:
        return problems
    heads, kv_heads = raw.get("num_attention_heads"), raw.get("num_key_value_heads")
    if heads is not None and kv_heads is not None and heads % kv_heads:
        problems.append(f"num_attention_heads {heads} is not a multiple of num_key_value_heads {kv_heads}")
    hidden = raw.get("hidden_size")
    if raw.get("head_dim") is None and hidden is not None and heads is not None and hidden % heads:
        problems.append(f"hidden_size {hidden} is not a multiple of num_attention_heads {heads}")
    return problems


def load_base_config(folder: Path, subject: str) -> Any:
    """The transformers config of ``folder``, loaded without running any code of the folder."""
    from transformers import AutoConfig

    folder = Path(folder)
    if folder.is_dir():
        problems = special_file_problems(folder)
        if problems:
            raise MassvConfigError(subject, problems)
    problems = model_type_problems(read_config_json(folder, subject))
    if problems:
        raise MassvConfigError(subject, problems)
    try:
        return AutoConfig.from_pretrained(str(folder), trust_remote_code=False)
    except Exception as e:  # transformers raises ValueError/KeyError/OSError/TypeError for bad configs
        raise MassvConfigError(subject, f"config.json is not a valid transformers config: {e}") from e


def check_drafter(folder: str | Path, *, allow_pickle: bool | None = None) -> DrafterInfo:
    """Validate a drafter folder on its own: files, schema, base config, tensor names and shapes."""
    path = Path(folder)
    subject = f"MASSV drafter {path}"
    if not path.is_dir():
        raise MassvConfigError(subject, f"{path} is not a directory")
    problems = special_file_problems(path)  # before anything in the folder is opened
    if problems:
        raise MassvConfigError(subject, problems)
    raw = read_config_json(path, subject)
    massv = None
    try:
        massv = massv_config_from_json(raw, subject)
    except MassvConfigError as e:
        problems += e.problems
    problems += base_config_problems(raw)
    if problems or massv is None:
        raise MassvConfigError(subject, problems)
    base = load_base_config(path, subject)
    problems = massv.check_base(base)
    if problems:
        raise MassvConfigError(subject, problems)
    allow = allow_pickle_default() if allow_pickle is None else allow_pickle
    files = weight_files(path, subject, allow)
    if all(f.suffix == ".safetensors" for f in files):
        have = tensor_shapes(files, subject)
        try:
            want = expected_shapes(base, massv)
        except Exception as e:  # bounded sizes can still be inconsistent in ways transformers rejects
            raise MassvConfigError(
                subject, f"config.json describes a model transformers cannot build: {e}"
            ) from e
        missing = sorted(set(want) - set(have))
        if missing:
            problems.append(f"missing tensors: {_short(missing)}")
        for k in sorted(set(want) & set(have)):
            if want[k] != have[k]:
                problems.append(f"tensor {k} has shape {list(have[k])}, config implies {list(want[k])}")
        extra = sorted(set(have) - set(want))
        if extra:
            problems.append(f"unexpected tensors (wrong architecture?): {_short(extra)}")
    if not _tokenizer_files(path):
        problems.append(f"no tokenizer files ({' / '.join(TOKENIZER_FILES)})")
    if problems:
        raise MassvConfigError(subject, problems)
    return DrafterInfo(path=path, massv=massv, base_config=base, weight_files=files)


def check_pair(
    drafter: str | Path | DrafterInfo,
    target_config: Any,
    target_tokenizer: str | Path | None,
    *,
    allow_pickle: bool | None = None,
) -> DrafterInfo:
    """Validate that ``drafter`` can draft for the target described by ``target_config``.

    ``target_config`` is the target's HF config (vLLM's ``model_config.hf_config`` or
    ``AutoConfig.from_pretrained(target)``); ``target_tokenizer`` its tokenizer folder.
    """
    info = drafter if isinstance(drafter, DrafterInfo) else check_drafter(drafter, allow_pickle=allow_pickle)
    m = info.massv
    subject = f"MASSV drafter {info.path} cannot draft for target {_name(target_config)}"
    fam = family_of_target(target_config)
    if fam is None:
        supported = sorted(a for f in FAMILIES.values() for a in f.target_architectures)
        raise MassvConfigError(
            subject,
            f"the target ({getattr(target_config, 'architectures', None)}, model_type "
            f"{getattr(target_config, 'model_type', None)!r}) is not a vision-language model MASSV "
            f"supports; supported targets: {supported}",
        )
    problems = []
    if fam.name != m.target.family:
        problems.append(f"family mismatch: drafter is for {m.target.family}, target is {fam.name}")
        raise MassvConfigError(subject, problems)
    vocab = fam.text_vocab_size(target_config)
    if vocab != info.base_config.vocab_size:
        problems.append(f"vocab size {info.base_config.vocab_size} != target text vocab size {vocab}")
    image_tok = fam.image_token_id(target_config)
    if image_tok != m.target.image_token_id:
        problems.append(
            f"image token id {m.target.image_token_id} != target's {fam.image_token_attr} {image_tok}"
        )
    embed_dim = fam.image_embed_dim(target_config)
    if m.projector is not None and m.projector.input_dim != embed_dim:
        problems.append(
            f"projector input width {m.projector.input_dim} != target image-embedding width {embed_dim}"
        )
    if target_tokenizer is not None:
        try:
            problems += compare_tokenizers(info.path, target_tokenizer_dir(target_tokenizer))
        except TokenizerNotFound as e:
            problems.append(str(e))
    if problems:
        raise MassvConfigError(subject, problems)
    return info


class TokenizerNotFound(Exception):
    """The target's tokenizer files are not on this machine (and could not be fetched)."""


def target_tokenizer_dir(tokenizer: str | Path) -> Path:
    """The local folder of the tokenizer vLLM resolved for the target (``ModelConfig.tokenizer``).

    That is a folder, or a hub id such as ``Qwen/Qwen2.5-VL-7B-Instruct`` (the README's example):
    for a hub id the tokenizer files are taken from the Hugging Face cache, or fetched into it the
    way vLLM is about to fetch them anyway (``HF_HUB_OFFLINE=1``: the cache only). Before, a hub id
    was never read and a drafter with another family's tokenizer passed.

    Not finding them is an error, not a warning: with another vocabulary every draft is rejected
    (outputs stay exact, the speed-up is silently lost), and the error reaches only setups where
    vLLM could not load that tokenizer either: an offline user with the target in the hub cache
    has its tokenizer there and runs.
    """
    path = Path(tokenizer).expanduser()
    if path.is_dir():
        return path
    from huggingface_hub import snapshot_download
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    name = str(tokenizer)
    try:
        validate_repo_id(name)
    except HFValidationError as e:
        raise TokenizerNotFound(
            f"target tokenizer {name!r} is neither a local folder nor a Hugging Face hub id"
        ) from e
    patterns = [*TOKENIZER_FILES, "tokenizer_config.json", "merges.txt", "special_tokens_map.json"]
    try:
        snapshot = Path(snapshot_download(name, allow_patterns=patterns))
    except Exception as e:  # offline and not cached, no network, unknown or gated repo
        from huggingface_hub import constants

        if constants.HF_HUB_OFFLINE:
            why = "is not in the Hugging Face cache and HF_HUB_OFFLINE=1 forbids fetching it"
        else:
            detail = (str(e).strip().splitlines() or [""])[0][:200]
            why = f"is not in the Hugging Face cache and could not be fetched ({type(e).__name__}: {detail})"
        raise TokenizerNotFound(
            f"the target's tokenizer {name!r} {why}, so the drafter's tokenizer cannot be compared "
            f"with it; download the target first (`huggingface-cli download {name}`) or serve it "
            "from a local folder"
        ) from e
    if not _tokenizer_files(snapshot):
        raise TokenizerNotFound(
            f"the target {name!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}) in its hub "
            f"snapshot {snapshot}, so the drafter's tokenizer cannot be compared with it"
        )
    return snapshot


def compare_tokenizers(drafter_dir: Path, target_dir: Path) -> list[str]:
    """Drafter and target must share token ids exactly: vLLM passes ids between them unchanged."""
    try:
        a = _vocab(Path(drafter_dir))
    except TokenizerLoadError as e:
        return [f"drafter tokenizer: {e}"]
    try:
        b = _vocab(Path(target_dir))
    except TokenizerLoadError as e:
        return [f"target tokenizer: {e}"]
    if a is None:
        return ["drafter has no loadable tokenizer"]
    if b is None:
        return [
            f"the target's tokenizer folder {target_dir} has no tokenizer files "
            f"({', '.join(TOKENIZER_FILES)}), so the drafter's tokenizer cannot be compared with it"
        ]
    if a == b:
        return []
    only_a = sorted(set(a) - set(b))
    moved = sorted(k for k in set(a) & set(b) if a[k] != b[k])
    detail = []
    if only_a:
        detail.append(f"{len(only_a)} drafter tokens unknown to the target (e.g. {only_a[:3]})")
    if moved:
        detail.append(f"{len(moved)} tokens with other ids (e.g. {moved[:3]})")
    if len(a) != len(b):
        detail.append(f"{len(a)} vs {len(b)} tokens")
    return [f"tokenizer differs from the target's ({'; '.join(detail)}): not the same model family/vocab"]


class TokenizerLoadError(Exception):
    """A tokenizer file exists but cannot be loaded; the message names the file."""


def _vocab(folder: Path) -> dict[str, int] | None:
    """Token -> id of the tokenizer in ``folder`` (None: no tokenizer files there)."""
    special = special_file_problems(folder)
    if special:
        raise TokenizerLoadError(f"{folder}: {'; '.join(special)}")
    tj = folder / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        try:
            return Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True)
        except Exception as e:  # the Rust library raises a bare Exception ("key must be a string")
            raise TokenizerLoadError(f"{tj} is not a valid tokenizer.json: {e}") from e
    if not _tokenizer_files(folder):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(folder), trust_remote_code=False).get_vocab()
    except Exception as e:
        files = ", ".join(n for n in TOKENIZER_FILES if (folder / n).is_file())
        raise TokenizerLoadError(f"the tokenizer in {folder} ({files}) cannot be loaded: {e}") from e


def _tokenizer_files(folder: Path) -> bool:
    return any((folder / n).is_file() for n in TOKENIZER_FILES)


def _name(cfg: Any) -> str:
    return str(getattr(cfg, "_name_or_path", None) or getattr(cfg, "architectures", "?"))


def _short(keys: list[str], n: int = 4) -> str:
    more = f" and {len(keys) - n} more" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def target_config_from_dir(target_dir: str | Path) -> Any:
    """The target's HF config, with a clear error when the folder is missing or not a model."""
    path = Path(target_dir)
    if not (path / "config.json").is_file():
        raise MassvConfigError(f"target {path}", "no config.json (not a model folder)")
    return load_base_config(path, f"target {path}")
