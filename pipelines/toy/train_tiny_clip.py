"""Recipe: train ``clipes-tiny`` on image-text pairs of the toy world.

    python pipelines/toy/train_tiny_clip.py --out runs/tiny   # 30-44 min on 2 cores; then copy runs/tiny/last.pt
                                                              # to clip_es/model/weights/clipes-tiny.pt

Supervision is image-level only: captions and class prompts about whole images or
crops. A crop's caption and labels name only the objects still clearly visible in it
(the caption writer's rule, in pipelines/toy/views.py); objects cut to a sliver are left
out of the loss, not called absent. No pixel-level target ever enters a loss.

Losses, each on both poolings (mean of patch tokens, as CLIP-ES pools; CLS, as
open_clip pools):
  * caption InfoNCE (image <-> caption, in-batch negatives, identical captions positive);
  * multi-label sigmoid loss against per-word prompts ``a photo of a {word}.`` for every
    foreground and background word;
  * multiple-instance term (``--mil``): each projected patch token is scored against the
    word prompts and a log-sum-exp over the patches must agree with the same image-level
    labels. It asks "is the class somewhere in here", never "where";
  * box terms: ``--regions`` boxes on each view's patch grid, labelled by the same
    crop rule (what is clearly visible in the box), but pooled inside the whole view's
    forward pass, so nothing outside a box may leak into it. ``--region-ml`` scores the
    box's mean-pooled patch embedding; ``--attn-region`` pools the detached final patch
    embeddings through the box's mean attention rows (self excluded), so its gradient
    reaches only the attention CAA later reads;
  * attention consistency (``--attn-consistency``): the same attention rows pool the other
    patches' class beliefs (the model's own, detached, softmax over the words the view's
    labels name), and the pooled belief must match the patch's own, so a patch attends to
    patches of its own class rather than merely to its neighbours (what CAA needs).

These are the terms the shipped checkpoint was trained with. Terms that were measured and
left off (attention sharpening and purity, tied query/key init, deep MIL, attention
avoidance, boxes pooled through CAA's transition, a shared-colour world) are in
pipelines/toy/RESULTS.md and in git history. No term uses labels beyond the image-level
ones above: a box's labels are a crop's labels, and the consistency term's targets are the
model's own patch beliefs restricted to the words a view's labels name.

The scenes come from seeds the evaluation splits never use (``--seed`` offsets them),
so ``clipes toy make --seed 1`` images are held out. Deterministic for a seed (fixed
step count; single-threaded data generation).
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from clip_es.data.toy import TOY_CLASSES, scene_for  # noqa: E402
from clip_es.model import dense  # noqa: E402
from clip_es.model.tiny import TinyClipConfig, build_tiny_clip  # noqa: E402
from clip_es.model.zeroshot import mean_average_precision  # noqa: E402
from clip_es.rundir import library_versions  # noqa: E402
from pipelines.toy.views import WORDS, sample_regions, sample_view, visible_labels  # noqa: E402,F401

MEAN = np.array([0.48145466, 0.4578275, 0.40821073], np.float32) * 255
STD = np.array([0.26862954, 0.26130258, 0.27577711], np.float32) * 255
#: Training resolutions, cycled over steps.
SIZES = [(64, 64), (96, 96), (128, 128), (160, 160), (128, 192), (96, 160)]
#: Prompt templates for the per-word prompts, cycled over steps, so the text tower
#: reads a class name in many phrasings (CLIP-ES's "a clean origami {}." included).
TEMPLATES = ["a photo of a {}.", "a clean origami {}.", "a picture of a {}.", "an image with a {}.",
             "a {} in the scene.", "there is a {} here.", "a close-up photo of the {}.", "{}."]


def to_tensor(images: list[np.ndarray]) -> torch.Tensor:
    arr = (np.stack(images).astype(np.float32) - MEAN) / STD
    return torch.from_numpy(arr).permute(0, 3, 1, 2).contiguous()


def masked_bce(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    valid = labels >= 0
    loss = F.binary_cross_entropy_with_logits(logits, labels.clamp(min=0), reduction="none")
    return (loss * valid).sum() / valid.sum().clamp(min=1)


def project_patches(visual, tokens: torch.Tensor) -> torch.Tensor:
    """``(B, 1+N, C)`` block output -> ``(B, N, D)`` unit-norm patch embeddings in the text space."""
    return F.normalize(visual.ln_post(tokens[:, 1:]) @ visual.proj, dim=-1)


def offdiag_affinity(attn_maps: list[torch.Tensor]) -> torch.Tensor:
    """The blocks' mean patch-to-patch attention (as CAA averages it), self excluded, rows renormalised."""
    aff = torch.stack(attn_maps).mean(0)
    aff = aff * (1 - torch.eye(aff.shape[-1], device=aff.device))
    return aff / aff.sum(-1, keepdim=True).clamp(min=1e-12)


def contrastive(img: torch.Tensor, txt: torch.Tensor, scale: torch.Tensor, same: torch.Tensor) -> torch.Tensor:
    logits = scale * img @ txt.t()
    target = same / same.sum(1, keepdim=True)
    return 0.5 * (-(target * logits.log_softmax(1)).sum(1).mean() - (target * logits.t().log_softmax(1)).sum(1).mean())


@torch.no_grad()
def evaluate_map(model, tokenizer, scenes, template: str = "a clean origami {}.") -> dict[str, float]:
    """Zero-shot multi-label mAP (softmax over foreground classes) on full scenes, both poolings."""
    import cv2

    model.eval()
    dev = next(model.parameters()).device
    poolings = ("mean", "cls")
    scores: dict[str, list] = {p: [] for p in poolings}
    gts = []
    with torch.no_grad():
        t = F.normalize(dense.encode_text(model, tokenizer([template.format(c) for c in TOY_CLASSES]).to(dev)),
                        dim=-1)
        for s in scenes:
            H, W = s.mask.shape
            h, w = math.ceil(H / 16) * 16, math.ceil(W / 16) * 16
            x = to_tensor([cv2.resize(s.image, (w, h), interpolation=cv2.INTER_CUBIC)]).to(dev)
            tokens = dense.final_tokens(model.visual, x)  # one forward serves both poolings
            for pooling in poolings:
                e = F.normalize(dense.pool_tokens(model.visual, tokens, pooling), dim=-1)
                scores[pooling].append((model.logit_scale.exp() * e @ t.t()).softmax(-1)[0].cpu().numpy())
            g = np.zeros(len(TOY_CLASSES))
            g[[c - 1 for c in s.labels]] = 1
            gts.append(g)
    model.train()
    return {p: mean_average_precision(np.stack(scores[p]), np.stack(gts))[0] for p in poolings}


def save_openai_fp16(model, path: Path) -> None:
    sd = {k: v.detach().to(torch.float16) if v.is_floating_point() else v for k, v in model.state_dict().items()
          if k != "attn_mask"}
    tmp = path.with_suffix(".tmp")
    torch.save(sd, tmp)
    tmp.replace(path)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=None, help="folder for checkpoints and the log (required to train)")
    ap.add_argument("--steps", type=int, default=2400, help="optimizer steps")
    ap.add_argument("--batch", type=int, default=64, help="images per step")
    ap.add_argument("--lr", type=float, default=5e-4, help="peak learning rate (AdamW, cosine)")
    ap.add_argument("--scenes", type=int, default=6000, help="size of the pre-rendered scene pool")
    ap.add_argument("--held", type=int, default=200, help="monitor scenes (world seed + 1) for the mAP log")
    ap.add_argument("--seed", type=int, default=1000, help="world seed of the training scenes (eval uses 1..)")
    ap.add_argument("--full-p", type=float, default=0.4, help="share of views that are whole images")
    ap.add_argument("--mil", type=float, default=0.5, help="weight of the multiple-instance patch term (0=off)")
    ap.add_argument("--region-ml", type=float, default=1.0,
                    help="weight of the in-context region term: boxes on the patch grid, pooled from the whole "
                         "view's tokens, scored against what is visible in each box (0=off)")
    ap.add_argument("--attn-region", type=float, default=10.0,
                    help="weight of the attention-pooled region term: a box's mean attention rows (self excluded) "
                         "pool the detached patch embeddings and must score as what is visible in it (0=off)")
    ap.add_argument("--attn-consistency", type=float, default=2.0,
                    help="weight of the belief-consistency term: the class beliefs a patch's attention row "
                         "pools (the model's own, detached, over the view's labelled words) must match its own "
                         "(0=off)")
    ap.add_argument("--regions", type=int, default=6, help="boxes per view for --region-ml and --attn-region")
    ap.add_argument("--vision-width", type=int, default=TinyClipConfig.vision_width,
                    help="vision tower width (a multiple of 64; heads = width / 64)")
    ap.add_argument("--vision-layers", type=int, default=TinyClipConfig.vision_layers, help="vision tower blocks")
    ap.add_argument("--eval-every", type=int, default=250, help="steps between mAP evaluations/checkpoints")
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args(argv)
    if args.out is None:
        ap.error("--out is required")
    train(args)


def train(args: argparse.Namespace) -> None:
    import open_clip

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    t0 = time.time()
    scenes = [scene_for(args.seed, i) for i in range(args.scenes)]
    held = [scene_for(args.seed + 1, i) for i in range(args.held)]
    print(f"rendered {len(scenes)} scenes in {time.time() - t0:.0f}s", flush=True)

    dev = torch.device(args.device)
    model = build_tiny_clip(TinyClipConfig(vision_width=args.vision_width, vision_layers=args.vision_layers)
                            ).to(dev).train()
    need_attn = args.attn_region > 0 or args.attn_consistency > 0
    use_regions = args.region_ml > 0 or args.attn_region > 0
    tokenizer = open_clip.get_tokenizer("ViT-B-16")
    word_tokens = [tokenizer([t.format(w) for w in WORDS]).to(dev) for t in TEMPLATES]
    ml_scale = torch.nn.Parameter(torch.tensor(10.0, device=dev))
    ml_bias = torch.nn.Parameter(torch.full((len(WORDS),), -2.0, device=dev))
    mil_temp = 10.0
    decay, no_decay = [], []
    for n, p in model.named_parameters():
        (no_decay if p.ndim < 2 or "embedding" in n or "ln" in n else decay).append(p)
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.05},
                             {"params": no_decay + [ml_scale, ml_bias], "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.98), eps=1e-6)
    warm = max(1, args.steps // 20)
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min(1.0, (s + 1) / warm) * 0.5 * (1 + math.cos(math.pi * min(1.0, s / args.steps))))
    log = []
    # bytes are reproducible for a seed on one CPU kernel path; another path (e.g. AVX-512 vs AVX2) rounds
    # differently, so the log says which one trained this checkpoint
    platform = {**library_versions(), "cpu_capability": torch.backends.cpu.get_cpu_capability()}
    t_train = time.time()
    for step in range(args.steps):
        size = SIZES[step % len(SIZES)]
        idx = rng.integers(0, len(scenes), size=args.batch)
        views = [sample_view(scenes[i], rng, size, args.full_p) for i in idx]
        x = to_tensor([v[0] for v in views]).to(dev)
        labels = torch.from_numpy(np.stack([v[1] for v in views])).to(dev)
        captions = [v[2] for v in views]
        same = torch.tensor([[a == b for b in captions] for a in captions], dtype=torch.float32, device=dev)
        if use_regions:
            grid = (size[0] // 16, size[1] // 16)
            regions = [sample_regions(scenes[i], v[3], grid, rng, args.regions) for i, v in zip(idx, views)]
            region_w = torch.from_numpy(np.stack([r[0] for r in regions])).to(dev)  # (B, R, N)
            region_labels = torch.from_numpy(np.stack([r[1] for r in regions])).to(dev)  # (B, R, W)

        tok, _ = dense.embed(model.visual, x)
        attn_maps = []  # patch-to-patch attention per block (when a term needs it)
        for blk in model.visual.transformer.resblocks:
            tok, _, probs = dense.block_forward(blk, tok, need_weights=need_attn)
            if probs is not None:
                attn_maps.append(probs[:, 1:, 1:])
        txt = F.normalize(dense.encode_text(model, tokenizer(captions).to(dev)), dim=-1)
        words = F.normalize(dense.encode_text(model, word_tokens[step % len(TEMPLATES)]), dim=-1)
        scale = model.logit_scale.exp().clamp(max=100)
        loss = torch.zeros((), device=dev)
        parts = {}
        for pooling in ("mean", "cls"):
            img = F.normalize(dense.pool_tokens(model.visual, tok, pooling), dim=-1)
            lc = contrastive(img, txt, scale, same)
            lm = masked_bce(ml_scale * img @ words.t() + ml_bias, labels)
            loss = loss + lc + lm
            parts[f"cap_{pooling}"] = lc.item()
            parts[f"ml_{pooling}"] = lm.item()
        if args.mil > 0:
            cos = project_patches(model.visual, tok) @ words.t()  # (B, N, W)
            # smooth max over patches: (1/T) log mean exp(T cos), scaled like the image-level logits
            pooled = ml_scale * (torch.logsumexp(mil_temp * cos, 1) - math.log(cos.shape[1])) / mil_temp
            lmil = masked_bce(pooled + ml_bias, labels)
            loss = loss + args.mil * lmil
            parts["mil"] = lmil.item()
        if args.region_ml > 0 or args.attn_region > 0 or args.attn_consistency > 0:
            patches = model.visual.ln_post(tok[:, 1:]) @ model.visual.proj  # (B, N, D), as mean pooling sums
        if args.attn_consistency > 0:  # unit patch embeddings for the belief targets (no gradient)
            with torch.no_grad():
                unit = F.normalize(patches, dim=-1)
        if args.region_ml > 0:
            reg = F.normalize(region_w @ patches, dim=-1)  # (B, R, D): each box's mean-pooled embedding
            lreg = masked_bce(ml_scale * reg @ words.t() + ml_bias, region_labels)
            loss = loss + args.region_ml * lreg
            parts["region"] = lreg.item()
        if need_attn:  # every term that reads where the patches look
            aff = offdiag_affinity(attn_maps)  # (B, N, N)
        if args.attn_region > 0:
            # what the rows gather, detached: a target only, so the gradient reaches the attention alone
            reg = F.normalize(region_w @ aff @ patches.detach(), dim=-1)  # (B, R, D)
            lar = masked_bce(ml_scale.detach() * reg @ words.detach().t() + ml_bias.detach(), region_labels)
            loss = loss + args.attn_region * lar
            parts["attn_region"] = lar.item()
        if args.attn_consistency > 0:
            with torch.no_grad():  # the model's own per-patch belief among the view's labelled words; a target only
                logits = ml_scale * unit @ words.t() + ml_bias  # (B, N, W)
                belief = logits.masked_fill(labels[:, None, :] <= 0, float("-inf")).softmax(-1)
                belief = torch.nan_to_num(belief)  # a view with no labelled word: no target
            lcon = -(belief * (aff @ belief).clamp(min=1e-6).log()).sum(-1).mean()
            loss = loss + args.attn_consistency * lcon
            parts["attn_consistency"] = lcon.item()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        with torch.no_grad():
            model.logit_scale.clamp_(0, math.log(100))
        if step % 25 == 0 or step == args.steps - 1:
            el = time.time() - t_train
            print(f"step {step} loss {loss.item():.3f} " + " ".join(f"{k} {v:.3f}" for k, v in parts.items())
                  + f" scale {scale.item():.1f} | {el / (step + 1):.2f}s/step, {el / 60:.1f} min", flush=True)
        if (step + 1) % args.eval_every == 0 or step == args.steps - 1:
            m = evaluate_map(model, tokenizer, held)
            rec = {"step": step + 1, "minutes": (time.time() - t_train) / 60, "loss": loss.item(), **parts,
                   "map_mean": m["mean"], "map_cls": m["cls"]}
            log.append(rec)
            print("EVAL", json.dumps(rec), flush=True)
            save_openai_fp16(model, args.out / f"step{step + 1}.pt")
            save_openai_fp16(model, args.out / "last.pt")
            (args.out / "log.json").write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()},
                                                           "platform": platform, "evals": log}, indent=1))
    print(f"done in {(time.time() - t0) / 60:.1f} min", flush=True)


if __name__ == "__main__":
    main()
