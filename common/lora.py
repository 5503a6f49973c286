"""LoRA adapters on a Stable Diffusion pipeline: attach, read, write, export.

LoRA (Hu et al., "LoRA: Low-Rank Adaptation of Large Language Models", ICLR 2022) adds
``W + (alpha / r) * B A`` to chosen linear layers; only A and B train. privadapt attaches
it through diffusers' PEFT integration (``unet.add_adapter``), on the UNet's attention
projections by default and optionally on the CLIP text encoder's, exactly as diffusers'
``train_text_to_image_lora.py`` does, so the exported file is what
``StableDiffusionPipeline.load_lora_weights`` expects.

The federated algorithms see an adapter as ONE flat tree of tensors ("a record" for the DP
mechanism): keys ``unet.<peft name>`` and ``text_encoder.<peft name>``. Deltas, clipping
(by the flat L2 norm over every tensor, McMahan et al. 2018) and the wire encoding all use
that tree.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

import torch

from common.config import RunConfig

LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_TARGETS = RunConfig().lora_target_list  # the run config's default targets
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "text_encoder")

Tree = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoRASpec:
    """Shape of the adapter: rank r, scale alpha, which UNet layers, text encoder or not."""

    rank: int = RunConfig.lora_rank
    alpha: float = RunConfig.lora_alpha
    targets: tuple[str, ...] = UNET_TARGETS
    text_encoder: bool = RunConfig.lora_text_encoder

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.targets or any(not t.strip() for t in self.targets):
            raise ValueError(f"LoRA target modules must be non-empty names, got {self.targets!r}")

    def config(self, component: str):
        from peft import LoraConfig

        targets = list(self.targets if component == "unet" else TEXT_TARGETS)
        # "gaussian": A ~ N(0, 1/r), B = 0, so a fresh adapter leaves the model unchanged
        return LoraConfig(r=self.rank, lora_alpha=self.alpha, init_lora_weights="gaussian", target_modules=targets)


def components(pipe, spec: LoRASpec) -> dict[str, torch.nn.Module]:
    out = {"unet": pipe.unet}
    if spec.text_encoder:
        out["text_encoder"] = pipe.text_encoder
    return out


def attach_lora(pipe, spec: LoRASpec, *, seed: int) -> None:
    """Add a LoRA adapter to the pipeline's UNet (and text encoder), initialised under
    ``seed``. Only the adapter's A and B matrices require gradients afterwards."""
    devices = torch.cuda.device_count() and [pipe.unet.device] or []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, module in components(pipe, spec).items():
            try:
                module.add_adapter(spec.config(name))
            except ValueError as err:
                raise ValueError(f"cannot attach LoRA to the {name} (targets {spec.config(name).target_modules}): "
                                 f"{err}") from err


def lora_parameters(pipe, spec: LoRASpec) -> list[torch.nn.Parameter]:
    """The trainable adapter parameters, in a fixed order."""
    return [p for module in components(pipe, spec).values() for n, p in module.named_parameters() if "lora_" in n]


def lora_state(pipe, spec: LoRASpec) -> Tree:
    """The adapter as one flat tree (float32 copies on the CPU)."""
    from peft.utils import get_peft_model_state_dict

    tree: Tree = {}
    for name, module in components(pipe, spec).items():
        for key, value in get_peft_model_state_dict(module).items():
            tree[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).clone()
    return tree


def tree_shapes(tree: Mapping[str, torch.Tensor]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in tree.items()}


def check_tree(tree: Mapping[str, torch.Tensor], shapes: Mapping[str, tuple[int, ...]], what: str) -> None:
    """Raise ValueError naming the first mismatch: missing, unexpected or mis-shaped keys,
    non-float or non-finite values."""
    missing = sorted(set(shapes) - set(tree))
    extra = sorted(set(tree) - set(shapes))
    if missing or extra:
        raise ValueError(f"{what}: missing tensors {missing[:3]}{'...' if len(missing) > 3 else ''}, "
                         f"unexpected tensors {extra[:3]}{'...' if len(extra) > 3 else ''}")
    for key, value in tree.items():
        if tuple(value.shape) != tuple(shapes[key]):
            raise ValueError(f"{what}: {key} has shape {tuple(value.shape)}, expected {tuple(shapes[key])}")
        if not value.is_floating_point():
            raise ValueError(f"{what}: {key} has dtype {value.dtype}, expected a floating-point type")
        if not torch.isfinite(value).all():
            raise ValueError(f"{what}: {key} has NaN or infinite entries")


def load_lora_state(pipe, spec: LoRASpec, tree: Mapping[str, torch.Tensor]) -> None:
    """Copy a flat tree into the attached adapter, in place; the keys and shapes must match."""
    check_tree(tree, tree_shapes(lora_state(pipe, spec)), "LoRA state")
    for name, module in components(pipe, spec).items():
        params = dict(module.named_parameters())
        prefix = f"{name}."
        with torch.no_grad():
            for key, value in tree.items():
                if not key.startswith(prefix):
                    continue
                # peft names drop the adapter name: "...lora_A.weight" is "...lora_A.default.weight"
                inner = key[len(prefix):].replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default.")
                params[inner].copy_(value.to(params[inner]))


def tree_sub(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor]) -> Tree:
    return {k: a[k].to(torch.float64) - b[k].to(torch.float64) for k in a}


def tree_add(a: Mapping[str, torch.Tensor], b: Mapping[str, torch.Tensor], scale: float = 1.0) -> Tree:
    return {k: (a[k].to(torch.float64) + scale * b[k].to(torch.float64)).to(torch.float32) for k in a}


def flat_norm(tree: Mapping[str, torch.Tensor]) -> float:
    """The L2 norm over every entry of every tensor (float64)."""
    return float(torch.sqrt(sum((v.to(torch.float64) ** 2).sum() for v in tree.values())))


def save_lora(out_dir: str | Path, pipe, spec: LoRASpec) -> Path:
    """Write the pipeline's adapter as ``pytorch_lora_weights.safetensors`` in diffusers'
    format, with the LoRA config (rank, alpha, targets) in the file's metadata so that
    ``pipe.load_lora_weights(out_dir)`` rebuilds the same scale alpha / r."""
    from diffusers import StableDiffusionPipeline
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = components(pipe, spec)
    kwargs = {
        "unet_lora_layers": convert_state_dict_to_diffusers(get_peft_model_state_dict(parts["unet"])),
        "unet_lora_adapter_metadata": spec.config("unet").to_dict(),
    }
    if "text_encoder" in parts:
        kwargs["text_encoder_lora_layers"] = convert_state_dict_to_diffusers(get_peft_model_state_dict(parts["text_encoder"]))
        kwargs["text_encoder_lora_adapter_metadata"] = spec.config("text_encoder").to_dict()
    StableDiffusionPipeline.save_lora_weights(str(out_dir), weight_name=LORA_FILE, **kwargs)
    return out_dir / LORA_FILE
