"""Validation of drafter folders and drafter/target pairs, before any model or GPU memory is used.

Everything a user can get wrong is checked here and reported as one ``MassvConfigError`` that
lists every problem found: missing or corrupt files, pickle weights, config/schema errors, tensor
shapes, and (with a target) family, vocab, tokenizer, image token and projector width.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from massv_vllm.families import FAMILIES, family_of_target
from massv_vllm.serving.config import MassvConfig, MassvConfigError, load_massv_config

PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
ALLOW_PICKLE_ENV = "MASSV_ALLOW_PICKLE"


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
        base = AutoModelForCausalLM.from_config(base_config)
    shapes = {k: tuple(v.shape) for k, v in base.state_dict().items()}
    if getattr(base_config, "tie_word_embeddings", False):
        shapes.pop("lm_head.weight", None)
    if massv.projector is not None:
        with torch.device("meta"):
            proj = Projector(massv.projector, base_config.hidden_size)
        shapes |= {f"projector.{k}": tuple(v.shape) for k, v in proj.state_dict().items()}
    return shapes


def load_base_config(folder: Path, subject: str) -> Any:
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder))
    except Exception as e:  # transformers raises ValueError/KeyError/OSError for unknown types
        raise MassvConfigError(subject, f"config.json is not a valid transformers config: {e}") from e


def check_drafter(folder: str | Path, *, allow_pickle: bool | None = None) -> DrafterInfo:
    """Validate a drafter folder on its own: files, schema, base config, tensor names and shapes."""
    path = Path(folder)
    subject = f"MASSV drafter {path}"
    if not path.is_dir():
        raise MassvConfigError(subject, f"{path} is not a directory")
    massv = load_massv_config(path)
    base = load_base_config(path, subject)
    problems = massv.check_base(base)
    if problems:
        raise MassvConfigError(subject, problems)
    allow = allow_pickle_default() if allow_pickle is None else allow_pickle
    files = weight_files(path, subject, allow)
    if all(f.suffix == ".safetensors" for f in files):
        have = tensor_shapes(files, subject)
        want = expected_shapes(base, massv)
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
        problems.append("no tokenizer files (tokenizer.json / tokenizer_config.json)")
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
        problems += compare_tokenizers(info.path, Path(target_tokenizer))
    if problems:
        raise MassvConfigError(subject, problems)
    return info


def compare_tokenizers(drafter_dir: Path, target_dir: Path) -> list[str]:
    """Drafter and target must share token ids exactly: vLLM passes ids between them unchanged."""
    a, b = _vocab(drafter_dir), _vocab(target_dir)
    if a is None:
        return ["drafter has no loadable tokenizer"]
    if b is None or a == b:
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


def _vocab(folder: Path) -> dict[str, int] | None:
    tj = folder / "tokenizer.json"
    if tj.is_file():
        from tokenizers import Tokenizer

        return Tokenizer.from_file(str(tj)).get_vocab(with_added_tokens=True)
    if not _tokenizer_files(folder):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder)).get_vocab()


def _tokenizer_files(folder: Path) -> bool:
    return any((folder / n).is_file() for n in ("tokenizer.json", "tokenizer.model", "vocab.json"))


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
    try:
        json.loads((path / "config.json").read_text())
    except json.JSONDecodeError as e:
        raise MassvConfigError(f"target {path}", f"config.json is not valid JSON: {e}") from e
    return load_base_config(path, f"target {path}")
