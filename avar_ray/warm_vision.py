"""The first half of the warm base: dense pre-training of the tiny vision tower on scene labels
(the toy world's stand-in for the contrastive pre-training every real VLM's encoder has had).

Measured on the random tiny model: trained end to end on short answers, the language model
learns to ignore the image (held-out loss with shuffled images equal to the true one to four
decimals after 150-450 steps; accuracy at chance). The random vision tower does not separate a
circle from a square, so the only gradient the image gets is through the answer tokens, and the
text prior wins. Here the tower (patch embedding, blocks, merger) is trained alone, with one
linear probe per label, to name the shape and the colour of the object centred in each merged
visual token ("none" for background): 300 steps of 32 images take ~1-2 CPU minutes and reach
~90 % shape and ~98 % colour accuracy per object token on held-out scenes. The probes are thrown
away; the language model then learns to read these features (warm_base.train).
"""
from __future__ import annotations

import random
import time
from typing import Sequence

import torch

# Procedural seed of the vision pre-training scenes (disjoint from the other streams).
VISION_SEED_OFFSET = 700_000
HELD_OUT = 128  # scenes kept aside to report the probes' accuracy
POOL_DRAWS = 3000  # procedural draws (~2,000 shape scenes): enough that 300 x 32 samples rarely overfit


def _classes():
    from avar_ray.data.scenes import COLOURS, SHAPES

    return ("none", *SHAPES), ("none", *COLOURS)


def token_labels(scene: dict, grid: tuple[int, int]) -> tuple[list[int], list[int]]:
    """Per merged token (raster order over ``grid`` = (rows, cols)): the index of the shape and of
    the colour of the object whose centre lies in the token's cell, 0 where none does."""
    shapes, colours = _classes()
    rows, cols = grid
    shape = [0] * (rows * cols)
    colour = [0] * (rows * cols)
    for o in scene.get("objects", []):
        r = min(rows - 1, o["y"] * rows // scene["height"])
        c = min(cols - 1, o["x"] * cols // scene["width"])
        shape[r * cols + c] = shapes.index(o["shape"])
        colour[r * cols + c] = colours.index(o["colour"])
    return shape, colour


def _batch(processor, samples: Sequence, merge: int):
    from avar_ray.data.schema import pil_images

    enc = processor.image_processor(images=[pil_images(s)[0] for s in samples], return_tensors="pt")
    shape, colour = [], []
    for s, (_, h, w) in zip(samples, enc["image_grid_thw"].tolist()):
        a, b = token_labels(s.meta["scene"], (h // merge, w // merge))
        shape += a
        colour += b
    return enc["pixel_values"], enc["image_grid_thw"], torch.tensor(shape), torch.tensor(colour)


def pretrain_vision(model, processor, wb, image_size: int, log_every: int = 50) -> dict:
    """``wb.vision_steps`` AdamW steps on the vision tower of ``model`` (in place); returns the
    held-out per-object-token accuracy of the shape and colour probes."""
    from avar_ray.data.procedural import make_sample

    visual = model.model.visual
    merge = model.config.vision_config.spatial_merge_size
    # Shape scenes only: charts and triangles carry no per-object labels.
    pool = [s for s in (make_sample(i, wb.seed + VISION_SEED_OFFSET, image_size) for i in range(POOL_DRAWS))
            if s.meta["scene"]["kind"] == "shapes"]
    held, pool = _batch(processor, pool[:HELD_OUT], merge), pool[HELD_OUT:]
    shapes, colours = _classes()
    width = model.config.vision_config.out_hidden_size
    probes = torch.nn.ModuleList([torch.nn.Linear(width, len(shapes)), torch.nn.Linear(width, len(colours))])
    # Background tokens outnumber object tokens ~4:1; down-weight "none" so objects dominate.
    weights = [torch.tensor([0.2] + [1.0] * (len(c) - 1)) for c in (shapes, colours)]
    params = list(visual.parameters()) + list(probes.parameters())
    opt = torch.optim.AdamW(params, lr=wb.vision_lr, weight_decay=0.01)
    rng = random.Random(wb.seed)
    visual.train()
    start = time.perf_counter()
    for step in range(wb.vision_steps):
        pixels, grid, *labels = _batch(processor, rng.sample(pool, wb.vision_batch_size), merge)
        feats = visual(pixels, grid_thw=grid).pooler_output
        loss = sum(torch.nn.functional.cross_entropy(p(feats), y, weight=w)
                   for p, y, w in zip(probes, labels, weights))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if (step + 1) % log_every == 0 or step + 1 == wb.vision_steps:
            print(f"warm base: vision step {step + 1}/{wb.vision_steps} loss {loss.item():.3f} "
                  f"({time.perf_counter() - start:.0f}s)", flush=True)
    with torch.no_grad():
        feats = visual(held[0], grid_thw=held[1]).pooler_output
        objects = held[2] > 0
        acc = {name: float((p(feats).argmax(-1)[objects] == y[objects]).float().mean())
               for name, p, y in zip(("shape", "colour"), probes, held[2:])}
    print(f"warm base: vision probes on {HELD_OUT} held-out scenes: shape {acc['shape']:.3f}, "
          f"colour {acc['colour']:.3f} per object token", flush=True)
    return acc
