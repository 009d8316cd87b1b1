"""One weight resolver for every CLIP the library runs.

Precedence (first match wins):

1. an explicit local file — ``--pretrained PATH`` (or ``--model PATH``): an OpenAI-layout
   state dict or TorchScript archive (``.pt``), or an open_clip checkpoint (``.bin``,
   ``.pt``, ``.safetensors``; then ``--model`` must name its open_clip architecture);
2. ``clipes-tiny``: the small CLIP shipped inside the package (trained on the toy world);
3. an open_clip name + pretrained tag (``ViT-B-16`` + ``openai``): taken from the local
   cache when it is there, downloaded when the hub is reachable, and otherwise refused
   within seconds with a message that says how to pass a local file.

Pickled checkpoints load with ``torch.load(weights_only=True)``: a file that would run
code on load is refused, never executed.
"""

from __future__ import annotations

import difflib
import logging
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn.functional as F

from clip_es.errors import RegistryError, WeightsError, first_line
from clip_es.model.tiny import TINY_CHECKPOINT, TINY_NAME

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)
_OPENAI_KEYS = ("visual.conv1.weight", "visual.proj", "text_projection", "token_embedding.weight")


@dataclass
class ClipModel:
    """A frozen CLIP ready for the stages.

    Attributes:
        model: open_clip ``CLIP`` in eval mode, fp32, parameters frozen.
        tokenizer: ``list[str] -> (N, 77) int64``.
        name: architecture name (``clipes-tiny``, ``ViT-B-16``...).
        source: where the weights came from (file path or ``name:tag``).
        sha256: checksum of the weight file when known.
        mean, std: input normalisation (RGB, 0..1 scale).
    """

    model: torch.nn.Module
    tokenizer: Callable[[list[str]], torch.Tensor]
    name: str
    source: str
    sha256: str | None = None
    mean: tuple[float, float, float] = OPENAI_MEAN
    std: tuple[float, float, float] = OPENAI_STD
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def visual(self) -> torch.nn.Module:
        return self.model.visual

    @property
    def patch_size(self) -> int:
        return int(self.model.visual.conv1.kernel_size[0])

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def logit_scale(self) -> float:
        return float(self.model.logit_scale.exp())

    @torch.no_grad()
    def encode_text(self, texts: list[str]) -> torch.Tensor:
        """L2-normalised text embeddings ``(N, D)``."""
        from clip_es.model.dense import encode_text

        tokens = self.tokenizer(texts).to(self.device)
        return F.normalize(encode_text(self.model, tokens).float(), dim=-1)

    def describe(self) -> dict[str, Any]:
        """What a run manifest records about the model."""
        return {"name": self.name, "source": self.source, "sha256": self.sha256,
                "patch_size": self.patch_size, "embed_dim": int(self.model.text_projection.shape[1])}


def _is_openai_layout(sd: dict) -> bool:
    return all(k in sd for k in _OPENAI_KEYS)


def _unwrap(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not obj or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise WeightsError(f"{path}: not a state dict of tensors; pass a CLIP checkpoint file")
    if all(k.startswith("module.") for k in obj):
        obj = {k[len("module."):]: v for k, v in obj.items()}
    return obj


def read_state_dict(path: str | Path) -> dict[str, torch.Tensor]:
    """Load tensors from a checkpoint file without executing code.

    Handles ``.safetensors``, pickled state dicts (``weights_only=True``) and TorchScript
    archives (OpenAI's original release format).

    Raises:
        WeightsError: missing, truncated, code-carrying or non-checkpoint file.
    """
    path = Path(path)
    if not path.is_file():
        raise WeightsError(f"checkpoint {path} does not exist; pass an existing file")
    if path.suffix == ".safetensors":
        try:
            from safetensors.torch import load_file

            return _unwrap(load_file(str(path)), path)
        except WeightsError:
            raise
        except Exception as e:  # safetensors raises its own error types
            raise WeightsError(f"{path}: cannot read safetensors file ({e})") from e
    try:
        return _unwrap(torch.load(path, map_location="cpu", weights_only=True), path)
    except WeightsError:
        raise
    except Exception as e:
        msg = str(e)
        if "TorchScript" in msg or "constants.pkl" in msg or "torch.jit" in msg:
            try:
                return _unwrap(torch.jit.load(str(path), map_location="cpu").state_dict(), path)
            except Exception as e2:
                raise WeightsError(f"{path}: TorchScript archive could not be read ({e2})") from e2
        if "weights_only" in msg or "Unsupported global" in msg or "Unsupported operand" in msg:
            raise WeightsError(f"{path}: refused: the file holds Python objects beyond tensors and loading it "
                               "could run code; re-save it as a plain state dict") from e
        raise WeightsError(f"{path}: not a readable checkpoint ({type(e).__name__}: {first_line(e)})") \
            from e


def _build_openai(sd: dict[str, torch.Tensor]) -> torch.nn.Module:
    from open_clip.model import build_model_from_openai_state_dict

    sd = {k: v for k, v in sd.items() if k not in ("input_resolution", "context_length", "vocab_size")}
    try:
        return build_model_from_openai_state_dict(sd, cast_dtype=torch.float32).float()
    except (RuntimeError, KeyError) as e:
        raise WeightsError(f"OpenAI-layout checkpoint does not fit a CLIP built from its own shapes: "
                           f"{first_line(e, 300)}") from e


def _openai_shapes(sd: dict[str, torch.Tensor]) -> dict[str, int]:
    """Architecture numbers of an OpenAI-layout state dict (as open_clip's builder infers them)."""
    return {"vision width": int(sd["visual.conv1.weight"].shape[0]),
            "vision layers": len({k.split(".")[3] for k in sd if k.startswith("visual.transformer.resblocks.")}),
            "patch size": int(sd["visual.conv1.weight"].shape[-1]),
            "embed dim": int(sd["text_projection"].shape[1]),
            "text width": int(sd["ln_final.weight"].shape[0]),
            "text layers": len({k.split(".")[2] for k in sd if k.startswith("transformer.resblocks.")})}


def _check_architecture(sd: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    """Refuse an OpenAI-layout checkpoint whose shapes are not those of open_clip's ``arch``."""
    import open_clip

    cfg = open_clip.get_model_config(arch) or {}
    v, t = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    want = {"vision width": v.get("width"), "vision layers": v.get("layers"), "patch size": v.get("patch_size"),
            "embed dim": cfg.get("embed_dim"), "text width": t.get("width"), "text layers": t.get("layers")}
    have = _openai_shapes(sd)
    diff = [f"{k} {have[k]} (not {want[k]})" for k in want if isinstance(want[k], int) and want[k] != have[k]]
    if diff:
        raise WeightsError(f"{path} is not a {arch} checkpoint: {', '.join(diff)}; pass the --model it was "
                           f"trained as, or leave --model out (--model {path} loads it by its own shapes)")


def _build_open_clip(name: str, sd: dict[str, torch.Tensor], path: Path) -> torch.nn.Module:
    import open_clip

    if name not in open_clip.list_models():
        raise WeightsError(f"{path} is an open_clip checkpoint; name its architecture with --model "
                           f"(e.g. ViT-B-16); {name!r} is not one of open_clip's models")
    model = open_clip.create_model(name, pretrained=None)
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise WeightsError(f"{path} does not match architecture {name}: {first_line(e, 300)}; "
                           "pass the --model this checkpoint was trained with") from e
    return model


def _finish(model: torch.nn.Module, name: str, source: str, sha: str | None, device: str) -> ClipModel:
    import open_clip

    model = model.float().eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    if not hasattr(model, "visual") or not hasattr(model.visual, "conv1"):
        raise WeightsError(f"{source}: only ViT CLIP image towers are supported (dense CAMs need patch tokens)")
    tok_name = name if name in open_clip.list_models() else "ViT-B-16"
    tokenizer = open_clip.get_tokenizer(tok_name)
    mean = tuple(getattr(model.visual, "image_mean", None) or OPENAI_MEAN)
    std = tuple(getattr(model.visual, "image_std", None) or OPENAI_STD)
    return ClipModel(model, tokenizer, name, source, sha, mean, std)


def load_checkpoint_file(path: str | Path, arch: str | None = None, device: str = "cpu") -> ClipModel:
    """Load a CLIP from a local file (OpenAI layout, or open_clip layout with ``arch``)."""
    from clip_es.rundir import file_sha256

    path = Path(path)
    sd = read_state_dict(path)
    if _is_openai_layout(sd):
        named = bool(arch) and arch not in (str(path), TINY_NAME)
        if named and arch in _open_clip_models():
            _check_architecture(sd, arch, path)
        model = _build_openai(sd)
        name = arch if named else path.stem
    else:
        if not arch or arch == str(path):
            raise WeightsError(f"{path} is not in the OpenAI layout; name its open_clip architecture with "
                               "--model NAME (e.g. --model ViT-B-16 --pretrained {path})")
        model = _build_open_clip(arch, sd, path)
        name = arch
    return _finish(model, name, str(path), file_sha256(path), device)


def _open_clip_models() -> list[str]:
    import open_clip

    return open_clip.list_models()


def _hub_reachable(host: str = "huggingface.co", timeout: float = 3.0) -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("CLIPES_OFFLINE") == "1":
        return False
    try:
        with socket.create_connection((host, 443), timeout=timeout):
            return True
    except OSError:
        return False


def _cached_file(name: str, tag: str, cache_dir: str | None) -> Path | None:
    """The local file holding ``name``/``tag`` if a previous download left it, else ``None``."""
    import open_clip

    cfg = open_clip.get_pretrained_cfg(name, tag) or {}
    hub = cfg.get("hf_hub")
    if hub:
        try:
            from huggingface_hub import try_to_load_from_cache
        except ImportError:  # pragma: no cover
            return None
        parts = hub.rstrip("/").split("/")
        repo_id, prefix = "/".join(parts[:2]), "/".join(parts[2:])
        for fname in ("open_clip_model.safetensors", "open_clip_pytorch_model.bin"):
            f = try_to_load_from_cache(repo_id, f"{prefix}/{fname}" if prefix else fname, cache_dir=cache_dir)
            if isinstance(f, str) and Path(f).is_file():
                return Path(f)
    url = cfg.get("url")
    if url:
        root = Path(cache_dir or os.path.expanduser("~/.cache/clip"))
        f = root / os.path.basename(url.split("?")[0])
        if f.is_file():
            return f
    return None


#: File suffixes of CLIP checkpoints: a --model / --pretrained value ending so is taken for a path.
CHECKPOINT_SUFFIXES = (".pt", ".pth", ".bin", ".safetensors", ".ckpt")


def looks_like_path(value: str) -> bool:
    """Whether a ``--model``/``--pretrained`` value names a file rather than a registry name: it has a
    path separator (``hf-hub:`` names aside), starts with ``~`` or ``.``, or ends in a checkpoint suffix."""
    if value.startswith("hf-hub:"):
        return False
    return ("/" in value or os.sep in value or value.startswith(("~", "."))
            or value.lower().endswith(CHECKPOINT_SUFFIXES))


def load_clip(model: str = TINY_NAME, pretrained: str | None = None, device: str = "cpu",
              cache_dir: str | None = None) -> ClipModel:
    """Resolve and load a CLIP (see the module doc for the precedence).

    Args:
        model: ``clipes-tiny``, an open_clip architecture name, or a checkpoint path.
        pretrained: open_clip pretrained tag, or a checkpoint path.
        device: ``cpu`` or ``cuda``.
        cache_dir: where downloads are cached / looked up.

    Raises:
        WeightsError: file problems, or a tag neither cached nor downloadable (offline).
        RegistryError: unknown architecture or tag (the message lists valid ones).
    """
    if pretrained and Path(pretrained).expanduser().is_file():
        return load_checkpoint_file(Path(pretrained).expanduser(), arch=model, device=device)
    if Path(model).expanduser().is_file():
        return load_checkpoint_file(Path(model).expanduser(), arch=None, device=device)
    if looks_like_path(model):
        what = "is a folder, not a checkpoint file" if Path(model).expanduser().is_dir() else \
            "checkpoint file does not exist"
        raise WeightsError(f"--model {model}: {what}; pass an existing checkpoint file, "
                           f"{TINY_NAME}, or an open_clip model name such as ViT-B-16")
    if model == TINY_NAME:
        if pretrained not in (None, "", TINY_NAME):
            raise WeightsError(f"{TINY_NAME} takes no --pretrained tag (got {pretrained!r}); "
                               "pass a file path to use other weights")
        if not TINY_CHECKPOINT.is_file():
            raise WeightsError(f"the bundled {TINY_NAME} weights are missing at {TINY_CHECKPOINT}; reinstall "
                               "clip_es or train them with pipelines/toy/train_tiny_clip.py")
        clip = load_checkpoint_file(TINY_CHECKPOINT, arch=None, device=device)
        clip.name, clip.source = TINY_NAME, f"bundled:{TINY_CHECKPOINT.name}"
        return clip
    if pretrained and looks_like_path(pretrained):
        raise WeightsError(f"checkpoint file {pretrained} does not exist; pass an existing file")
    import open_clip

    models = open_clip.list_models()
    if model not in models:
        close = difflib.get_close_matches(model, models, n=5, cutoff=0.5)
        raise RegistryError(f"unknown model {model!r}; use {TINY_NAME}, a checkpoint path, or an open_clip name"
                            + (f" such as {', '.join(close)}" if close else " (see open_clip.list_models())"))
    tags = open_clip.list_pretrained_tags_by_model(model)
    if not pretrained:
        raise RegistryError(f"model {model} needs --pretrained: one of {', '.join(tags) or '(none)'}, "
                            "or a local checkpoint path")
    if pretrained not in tags:
        raise RegistryError(f"unknown pretrained tag {pretrained!r} for {model}; valid: {', '.join(tags)}")
    cached = _cached_file(model, pretrained, cache_dir)
    if cached is not None:
        log.info("using cached weights %s", cached)
        return load_checkpoint_file(cached, arch=model, device=device)
    if not _hub_reachable():
        raise WeightsError(f"{model}:{pretrained} is not in the local cache and the download hub is unreachable "
                           f"(offline); download the checkpoint where you have network and pass it with "
                           f"--model {model} --pretrained /path/to/checkpoint")
    m = open_clip.create_model(model, pretrained=pretrained, cache_dir=cache_dir)
    return _finish(m, model, f"{model}:{pretrained}", None, device)
