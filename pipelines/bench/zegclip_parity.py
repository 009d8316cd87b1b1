"""The zegclip family against ZegCLIP's own modules, on the same random ViT-B/16 weights.

    python pipelines/bench/zegclip_parity.py OFFICIAL_CHECKOUT [--size 512] [--batch 2] [--classes 15]

OFFICIAL_CHECKOUT is a checkout of github:ZiqinZhou66/ZegCLIP (nothing of it is copied here: this
script imports its files from that path). Only what it imports from mmcv/mmseg (registries, the
decode-head base class, ``resize``/``Upsample``, ``accuracy``), and the unused plotting/GUI modules
it imports (``matplotlib``, ``curses``, ``tkinter``) when absent, are stubbed, in memory; no file of the checkout
is changed. Built at ViT-B/16 size with random weights (open_clip ``ViT-B-16-quickgelu``, no
download), the same weights go into both:

* encoder: ZegCLIP's ``VPTCLIPVisionTransformer`` (10 deep prompts on all 12 blocks) and our
  frozen CLIP + ``DeepPrompts`` + ``out_norm`` (prompt tokens, projection and norm copied across);
* head: ZegCLIP's ``ATMSingleHeadSeg`` (3 layers, 8 heads) and our descriptor + decoder + scorer;
* loss: ZegCLIP's ``SegLossPlus`` (focal 100, dice 1) and our ``focal_dice_loss(unsure="negative")``.

Intended differences, switched off on our side for the comparison (``decode(background=False,
memory=False)``): the background query (learnt or text) and the decoder-memory projection. One
quirk of the official encoder is matched by its input, not by our code: its forward adds the class
embedding twice to the CLS token (as the token and again to its position embedding), so it is given
half of it.
Every module runs in eval mode (no dropout, no drop-path). Prints the max abs differences.
"""

from __future__ import annotations

import argparse
import importlib.util
import subprocess
import sys
import types
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn


def _stub_mm() -> None:
    """Empty stand-ins for the mmcv/mmseg names the official files import at module level."""

    class Registry:
        def register_module(self, *a, **k):
            return lambda cls: cls

    class BaseDecodeHead(nn.Module):  # what ATMSingleHeadSeg reads of mmseg's base class
        def __init__(self, in_channels, channels, num_classes, loss_decode=None, ignore_index=255,
                     align_corners=False, **kw):
            super().__init__()
            self.in_channels, self.channels, self.num_classes = in_channels, channels, num_classes
            self.ignore_index, self.align_corners = ignore_index, align_corners
            self.conv_seg = nn.Identity()

    mods = {
        "mmcv": {}, "mmcv.cnn": {"ConvModule": object},
        "mmcv.runner": {"auto_fp16": lambda *a, **k: (lambda f: f), "force_fp32": lambda *a, **k: (lambda f: f)},
        "mmseg": {}, "mmseg.ops": {"Upsample": object, "resize": F.interpolate},
        "mmseg.models": {"accuracy": lambda *a, **k: 0},
        "mmseg.models.builder": {"HEADS": Registry(), "BACKBONES": Registry(), "LOSSES": Registry()},
        "mmseg.models.decode_heads": {}, "mmseg.models.decode_heads.decode_head": {"BaseDecodeHead": BaseDecodeHead},
        "mmseg.models.losses": {"accuracy": lambda *a, **k: 0},
        "mmseg.models.backbones": {"ResNet": object, "VisionTransformer": object},
        "curses": {"A_ALTCHARSET": 0}, "tkinter": {"OUTSIDE": "outside"},
        "matplotlib": {}, "matplotlib.pyplot": {},
    }
    import timm.layers
    import timm.models.layers as old_layers  # newer timm moved the `drop` module the official file imports

    if not hasattr(old_layers, "drop"):
        old_layers.drop = importlib.import_module("timm.layers.drop")
    present = {m for m in ("curses", "tkinter", "matplotlib") if importlib.util.find_spec(m) is not None}
    for name, attrs in mods.items():
        if name.split(".")[0] in present:
            continue
        m = types.ModuleType(name)
        m.__dict__.update(attrs)
        sys.modules[name] = m


def _load(root: Path, dotted: str):
    """Import ``root/<dotted as path>.py`` as module ``dotted`` (parent packages created empty, so the
    checkout's own ``models/__init__.py``, which imports the whole mmseg stack, is never run)."""
    parts = dotted.split(".")
    for i in range(1, len(parts)):
        pkg = ".".join(parts[:i])
        if pkg not in sys.modules:
            m = types.ModuleType(pkg)
            m.__path__ = [str(root.joinpath(*parts[:i]))]
            sys.modules[pkg] = m
    spec = importlib.util.spec_from_file_location(dotted, root.joinpath(*parts).with_suffix(".py"))
    mod = importlib.util.module_from_spec(spec)
    sys.modules[dotted] = mod
    spec.loader.exec_module(mod)
    return mod


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("official", type=Path, help="checkout of github:ZiqinZhou66/ZegCLIP")
    ap.add_argument("--size", type=int, default=512, help="square input side (ZegCLIP's head assumes square)")
    ap.add_argument("--batch", type=int, default=2)
    ap.add_argument("--classes", type=int, default=15, help="class queries (VOC's 15 seen)")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)
    root = args.official.resolve()
    if not (root / "models" / "decode_heads" / "decode_seg.py").is_file():
        ap.error(f"{root}: not a ZegCLIP checkout (no models/decode_heads/decode_seg.py)")
    _stub_mm()
    enc_mod = _load(root, "models.backbone.img_encoder")
    head_mod = _load(root, "models.decode_heads.decode_seg")
    loss_mod = _load(root, "models.losses.atm_loss")

    import open_clip

    from clip_es.train.losses import focal_dice_loss
    from clip_es.train.zegclip import ZegClipArch, ZegClipSegmenter

    torch.manual_seed(args.seed)
    visual = open_clip.create_model("ViT-B-16-quickgelu").visual.float().eval()
    ours = ZegClipSegmenter(ZegClipArch(text_dim=512, prompts=10, heads=8), visual).eval()
    with torch.no_grad():  # random, non-trivial head weights (ours starts as an identity)
        for name, p in ours.named_parameters():
            if p.requires_grad and not name.startswith("prompts.tokens"):
                scale = p.shape[-1] ** -0.5 if p.ndim > 1 else 0.1  # unit-scale activations, O(1) logits
                p.copy_(torch.randn_like(p) * scale + (1.0 if "norm" in name and name.endswith("weight") else 0.0))
    grid = args.size // 16
    off = enc_mod.VPTCLIPVisionTransformer(input_resolution=args.size, patch_size=16, width=768, layers=12, heads=12,
                                           output_dim=512, drop_path_rate=0.1, out_indices=[11], get_embeddings=True,
                                           num_tokens=10, prompt_dim=768, total_d_layer=11).eval()
    sd = {k: v.clone() for k, v in visual.state_dict().items()}
    cls_pos, spatial = sd["positional_embedding"][:1], sd["positional_embedding"][1:]
    side = int(spatial.shape[0] ** 0.5)  # 14: ZegCLIP resizes it to the input grid when it loads CLIP
    spatial = F.interpolate(spatial.reshape(1, side, side, -1).permute(0, 3, 1, 2), size=(grid, grid),
                            mode="bilinear", align_corners=False).reshape(768, -1).T
    sd["positional_embedding"] = torch.cat([cls_pos, spatial])
    sd["class_embedding"] = sd["class_embedding"] / 2  # its forward adds it twice (see the docstring)
    sd["prompt_embeddings"] = ours.prompts.tokens.data[:1].clone()
    sd["deep_prompt_embeddings"] = ours.prompts.tokens.data[1:].clone()
    sd["prompt_proj.weight"], sd["prompt_proj.bias"] = ours.prompts.proj.weight.data, ours.prompts.proj.bias.data
    sd["prompt_norm.weight"], sd["prompt_norm.bias"] = ours.out_norm.weight.data, ours.out_norm.bias.data
    missing, unexpected = off.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise SystemExit(f"encoder weights did not map: missing {missing}, unexpected {unexpected}")

    k = args.classes
    head = head_mod.ATMSingleHeadSeg(img_size=args.size, in_channels=512, seen_idx=list(range(k)),
                                     all_idx=list(range(k)), channels=512, num_classes=k, num_layers=3, num_heads=8,
                                     use_proj=False, use_stages=1, embed_dims=512, loss_decode=None)
    hs = {"q_proj.weight": ours.relation.weight, "q_proj.bias": ours.relation.bias}
    for i in range(3):
        pre = f"decoder_1.layers.{i}."
        if i < 2:
            ln = ours.decoder[i]
            wq, wk, wv = ln.attn.in_proj_weight.chunk(3)
            bq, bk, bv = ln.attn.in_proj_bias.chunk(3)
            hs.update({pre + "multihead_attn.q.weight": wq, pre + "multihead_attn.q.bias": bq,
                       pre + "multihead_attn.k.weight": wk, pre + "multihead_attn.k.bias": bk,
                       pre + "multihead_attn.v.weight": wv, pre + "multihead_attn.v.bias": bv,
                       pre + "multihead_attn.proj.weight": ln.attn.out_proj.weight,
                       pre + "multihead_attn.proj.bias": ln.attn.out_proj.bias,
                       pre + "norm2.weight": ln.norm1.weight, pre + "norm2.bias": ln.norm1.bias,
                       pre + "linear1.weight": ln.ffn[0].weight, pre + "linear1.bias": ln.ffn[0].bias,
                       pre + "linear2.weight": ln.ffn[-1].weight, pre + "linear2.bias": ln.ffn[-1].bias,
                       pre + "norm3.weight": ln.norm2.weight, pre + "norm3.bias": ln.norm2.bias})
        else:  # the last layer only scores: its q and k are our scorer's
            hs.update({pre + "multihead_attn.q.weight": ours.scorer.q.weight, pre + "multihead_attn.q.bias":
                       ours.scorer.q.bias, pre + "multihead_attn.k.weight": ours.scorer.k.weight,
                       pre + "multihead_attn.k.bias": ours.scorer.k.bias})
    missing, unexpected = head.load_state_dict({n: v.detach().clone() for n, v in hs.items()}, strict=False)
    # its layers keep self_attn/norm1 that their forward never runs, and the last layer's update goes unused
    used = [m for m in missing if "self_attn" not in m and ".norm1." not in m
            and (not m.startswith("decoder_1.layers.2.") or "multihead_attn.q" in m or "multihead_attn.k" in m)]
    if used or unexpected:
        raise SystemExit(f"head weights did not map: missing {used}, unexpected {unexpected}")
    head.train()  # its forward returns raw mask logits only in training mode...
    for m in head.modules():
        if isinstance(m, nn.Dropout):
            m.eval()  # ...and every dropout off

    g = torch.Generator().manual_seed(args.seed + 1)
    x = torch.rand(args.batch, 3, args.size, args.size, generator=g)
    xn = (x - ours.mean) / ours.std
    text = F.normalize(torch.randn(k, 512, generator=g), dim=-1)
    with torch.no_grad():
        feats, cls = off(xn)
        theirs = head([[feats, cls], text])["pred_masks"]
        patches, gcls, grd = ours.encode(xn)
        mine = ours.decode(patches, gcls, text, grd, (args.size, args.size), background=False, memory=False)
    label = torch.randint(0, 4, (args.batch, args.size, args.size), generator=g)  # 4 of the k classes present
    label[:, : args.size // 4] = 255  # ignored rows: negatives for every class in both losses
    crit = loss_mod.SegLossPlus(num_classes=k, dec_layers=3, mask_weight=100.0, dice_weight=1.0)
    parts = crit({"pred_masks": theirs}, label.clone(), ignore_index=255)
    loss_theirs = float(sum(parts.values()))
    loss_mine = float(focal_dice_loss(theirs, label, unsure="negative"))
    try:
        commit = subprocess.run(["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True,
                                check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "(not a git checkout)"
    d_enc = max((patches - F.normalize(feats[0].flatten(2).transpose(1, 2), dim=-1)).abs().max().item(),
                (gcls - cls).abs().max().item())
    print(f"official: {root} @ {commit}")
    print(f"input {args.batch}x3x{args.size}x{args.size}, {k} classes, ViT-B/16 random weights (seed {args.seed})")
    print(f"encoder (patch tokens, CLS) max |diff|  {d_enc:.3e}")
    print(f"mask logits max |diff|              {(mine - theirs).abs().max().item():.3e}  "
          f"(logit range {theirs.min().item():.2f}..{theirs.max().item():.2f})")
    print(f"loss: official {loss_theirs:.6f}  ours {loss_mine:.6f}  |diff| {abs(loss_theirs - loss_mine):.3e}")
    ok = (mine - theirs).abs().max().item() <= 1e-4 and abs(loss_theirs - loss_mine) <= 1e-5
    print("parity:", "OK (logits <= 1e-4, loss <= 1e-5)" if ok else "FAILED")
    return 0 if ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
