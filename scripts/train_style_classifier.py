"""Train the emoji style classifier used for KID and style accuracy (evaluation/features.py).

Twemoji (``emoji-datasource-twitter``, CC-BY 4.0) is label 0, Noto emoji
(``emoji-datasource-google``, Apache 2.0) label 1, both at 32x32 flattened onto white, without
skin-tone variants. The split is by *concept*: every emoji whose short name hashes into the
held-out fifth, and every concept of the demo's private set (data/demo), is kept out of
training in both styles, so the test accuracy measures style, not remembered pictures.
Augmentation: mirror images and shifts of up to 2 pixels. A few minutes on 2 CPU cores.

    nice -n 15 python scripts/train_style_classifier.py \
        --twitter-dir PATH/emoji-datasource-twitter/package --google-dir PATH/emoji-datasource-google/package
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

from common.emoji import list_emoji, load_pixels  # noqa: E402
from evaluation.features import DEFAULT_DIR, StyleNet, save_style_net, to_batch  # noqa: E402


def held_out(key: str, demo_keys: set[str]) -> bool:
    return key in demo_keys or hashlib.sha256(key.encode()).digest()[0] % 5 == 0


def demo_concepts(data_dir: Path) -> set[str]:
    return {p.stem.replace("-", "_") for p in data_dir.glob("site-*/*.png")}


def export_heldout(twemoji: list, demo_keys: set[str], out: Path, count: int = 48) -> None:
    """Every k-th held-out Twemoji concept (not in the demo set), as 32x32 PNGs."""
    from PIL import Image

    from common.emoji import load_rgb

    pool = [im for im in twemoji if held_out(im.key, demo_keys) and im.key not in demo_keys]
    out.mkdir(parents=True, exist_ok=True)
    for im in pool[:: len(pool) // count][:count]:
        Image.fromarray(load_rgb(im.path, 32)).save(out / f"{im.key.replace('_', '-')}.png", optimize=True)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    padded = F.pad(x, (2, 2, 2, 2), value=1.0)  # white border, like the emoji background
    dx, dy = torch.randint(0, 5, (2,), generator=gen).tolist()
    return padded[:, :, dy:dy + x.shape[2], dx:dx + x.shape[3]]


@torch.no_grad()
def accuracy(net: StyleNet, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((torch.cat([net(c).argmax(-1) for c in x.split(512)]) == y).double().mean())


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--twitter-dir", type=Path, required=True)
    p.add_argument("--google-dir", type=Path, required=True)
    p.add_argument("--out", type=Path, default=DEFAULT_DIR)
    p.add_argument("--demo-data", type=Path, default=REPO_ROOT / "data" / "demo")
    p.add_argument("--epochs", type=int, default=30)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--export-heldout", type=Path, default=None,
                   help="also write 48 held-out Twemoji images (32x32 PNG) here, for the tests")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    started = time.time()

    demo_keys = demo_concepts(args.demo_data)
    sets = {0: list_emoji(args.twitter_dir, "twitter", skin_tones=False),
            1: list_emoji(args.google_dir, "google", skin_tones=False)}
    split: dict[str, list[torch.Tensor]] = {"train_x": [], "train_y": [], "test_x": [], "test_y": []}
    for label, images in sets.items():
        for part, keep in (("train", False), ("test", True)):
            chosen = [im for im in images if held_out(im.key, demo_keys) == keep]
            split[f"{part}_x"].append(to_batch(load_pixels(chosen, 32)))
            split[f"{part}_y"].append(torch.full((len(chosen),), label))
    if args.export_heldout:
        export_heldout(sets[0], demo_keys, args.export_heldout)
    xtr, ytr = torch.cat(split["train_x"]), torch.cat(split["train_y"])
    xte, yte = torch.cat(split["test_x"]), torch.cat(split["test_y"])
    print(f"train {len(xtr)} images, test {len(xte)} images (held-out concepts)")

    net = StyleNet()
    opt = torch.optim.AdamW(net.parameters(), lr=args.lr, weight_decay=1e-4)
    gen = torch.Generator().manual_seed(args.seed)
    steps_per_epoch = len(xtr) // args.batch_size
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, args.lr, total_steps=args.epochs * steps_per_epoch)
    history = []
    for epoch in range(args.epochs):
        net.train()
        order = torch.randperm(len(xtr), generator=gen)
        losses = []
        for i in tqdm(range(steps_per_epoch), desc=f"epoch {epoch + 1}/{args.epochs}", unit="step"):
            idx = order[i * args.batch_size:(i + 1) * args.batch_size]
            loss = F.cross_entropy(net(augment(xtr[idx], gen)), ytr[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
            losses.append(float(loss))
        net.eval()
        history.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)),
                        "test_accuracy": accuracy(net, xte, yte)})
        print(history[-1])

    demo = to_batch(load_pixels([im for im in sets[1] if im.key in demo_keys], 32))
    report = {
        "train_images": len(xtr), "test_images": len(xte),
        "train_accuracy": accuracy(net, xtr, ytr), "test_accuracy": accuracy(net, xte, yte),
        "test_accuracy_twemoji": accuracy(net, xte[yte == 0], yte[yte == 0]),
        "test_accuracy_noto": accuracy(net, xte[yte == 1], yte[yte == 1]),
        "demo_private_set_noto_accuracy": accuracy(net, demo, torch.ones(len(demo), dtype=torch.long)),
        "epochs": args.epochs, "seconds": round(time.time() - started, 1), "history": history,
        "sources": ["emoji-datasource-twitter@16.0.0 (Twemoji, CC-BY 4.0)",
                    "emoji-datasource-google@16.0.0 (Noto Color Emoji, Apache 2.0)"],
        "command": "python scripts/train_style_classifier.py --twitter-dir PATH/package --google-dir PATH/package",
    }
    save_style_net(net, args.out, training=report)
    print(json.dumps({k: v for k, v in report.items() if k != "history"}, indent=1))


if __name__ == "__main__":
    main()
