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

FFA-LoRA (Sun, Li, Wang, Wang, "Improving LoRA in Privacy-preserving Federated Learning",
ICLR 2024, arXiv 2403.12313; ``LoRASpec(variant="ffa")``) freezes every A ("down") matrix
at a public initialisation drawn from the run seed (:func:`init_frozen_a`), identical on
every site and on the server, and trains only B ("up"). The tree then holds the B tensors
only: d, the released dimension over which C bounds a delta, is about halved, and the server's
mean of the B deltas is exactly the mean of the sites' adapters' updates (sum_k B_k A / K =
(sum_k B_k / K) A, since A is shared), which averaging A and B separately is not.
"""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Mapping

import torch

from common.config import LORA_VARIANTS, RunConfig
from common.paths import derive_seed

LORA_FILE = "pytorch_lora_weights.safetensors"
UNET_TARGETS = RunConfig().lora_target_list  # the run config's default targets
TEXT_TARGETS = ("q_proj", "k_proj", "v_proj", "out_proj")
COMPONENTS = ("unet", "text_encoder")

Tree = dict[str, torch.Tensor]


@dataclass(frozen=True)
class LoRASpec:
    """Shape of the adapter: rank r, scale alpha, which UNet layers, text encoder or not, and
    the variant: ``"lora"`` trains A and B, ``"ffa"`` (FFA-LoRA) only B, A frozen."""

    rank: int = RunConfig.lora_rank
    alpha: float = RunConfig.lora_alpha
    targets: tuple[str, ...] = UNET_TARGETS
    text_encoder: bool = RunConfig.lora_text_encoder
    variant: str = RunConfig.lora_variant

    def __post_init__(self) -> None:
        if self.rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {self.rank}")
        if not self.alpha > 0:
            raise ValueError(f"LoRA alpha must be > 0, got {self.alpha}")
        if not self.targets or any(not t.strip() for t in self.targets):
            raise ValueError(f"LoRA target modules must be non-empty names, got {self.targets!r}")
        if self.variant not in LORA_VARIANTS:
            raise ValueError(f"LoRA variant must be one of {LORA_VARIANTS}, got {self.variant!r}")

    @property
    def frozen_a(self) -> bool:
        """FFA-LoRA: the A matrices are frozen (public), only B trains and is released."""
        return self.variant == "ffa"

    def trains(self, name: str) -> bool:
        """Whether the adapter tensor ``name`` (tree key or peft parameter name) is trained, sent
        and released: every A and B, or under FFA-LoRA the B matrices only."""
        return not (self.frozen_a and ".lora_A." in name)

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
    ``seed`` (B = 0). Only the adapter's trained matrices require gradients afterwards: A and
    B, or under FFA-LoRA B alone, A frozen at its public initialisation (:func:`init_frozen_a`)."""
    devices = torch.cuda.device_count() and [pipe.unet.device] or []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        for name, module in components(pipe, spec).items():
            try:
                module.add_adapter(spec.config(name))
            except ValueError as err:
                raise ValueError(f"cannot attach LoRA to the {name} (targets {spec.config(name).target_modules}): "
                                 f"{err}") from err
    if spec.frozen_a:
        init_frozen_a(pipe, spec, seed=seed)


def _tree_key(component: str, param_name: str) -> str:
    """The tree key of a peft parameter: peft's names carry the adapter's ("...lora_A.default.weight")."""
    return f"{component}.{param_name.replace('.default.', '.')}"


def init_frozen_a(pipe, spec: LoRASpec, *, seed: int) -> None:
    """Set every A of an FFA-LoRA adapter to its public initialisation and freeze it.

    Each A is drawn from N(0, 1/r^2) (the distribution of peft's ``"gaussian"`` init, which the
    plain variant uses) in float32 on the CPU by its own generator, seeded with
    ``derive_seed(seed, "ffa-lora-A", <tree key>)``: its value is a function of the seed, the
    tensor's name and shape only (not of the device, the order modules are visited in, or any
    draw made before), so every site and the server hold the same A bit for bit. Idempotent;
    pass the run's public seed (:func:`common.settings.lora_init_seed`).

    Notes:
        A is public, like the base model's weights: it is NOT privacy randomness (the rule that
        noise and privacy sampling come from the OS CSPRNG does not apply to it), nothing about
        it depends on data, and knowing the seed reveals nothing about any site. Only B is
        clipped, noised and covered by the guarantee.
    """
    if not spec.frozen_a:
        raise ValueError(f"only FFA-LoRA freezes A (variant 'ffa'), not variant {spec.variant!r}")
    for component, module in components(pipe, spec).items():
        for name, param in module.named_parameters():
            if "lora_" in name and not spec.trains(name):
                key = _tree_key(component, name)
                draw = torch.Generator().manual_seed(derive_seed(seed, "ffa-lora-A", key))
                value = torch.randn(tuple(param.shape), generator=draw, dtype=torch.float32) / spec.rank
                with torch.no_grad():
                    param.copy_(value.to(param))
                param.requires_grad_(False)


def lora_parameters(pipe, spec: LoRASpec) -> list[torch.nn.Parameter]:
    """The trained adapter parameters (FFA-LoRA: the B matrices only), in a fixed order."""
    return [p for module in components(pipe, spec).values() for n, p in module.named_parameters()
            if "lora_" in n and spec.trains(n)]


@contextmanager
def training_adapter(pipe, spec: LoRASpec) -> Iterator[list[torch.nn.Parameter]]:
    """Inside, exactly the trained adapter parameters require gradients (FFA-LoRA's A does
    not, so no gradient of it is computed, per-sample or not); yields them. Afterwards every
    adapter parameter's flag is as found and its gradient cleared."""
    params = [p for module in components(pipe, spec).values() for n, p in module.named_parameters() if "lora_" in n]
    trained = {id(p) for p in lora_parameters(pipe, spec)}
    flags = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(id(p) in trained)
    try:
        yield [p for p in params if id(p) in trained]
    finally:
        for p, flag in zip(params, flags):
            p.grad = None
            p.requires_grad_(flag)


def _adapter_tree(pipe, spec: LoRASpec, *, trained: bool) -> Tree:
    from peft.utils import get_peft_model_state_dict

    tree: Tree = {}
    for name, module in components(pipe, spec).items():
        for key, value in get_peft_model_state_dict(module).items():
            if spec.trains(key) == trained:
                tree[f"{name}.{key}"] = value.detach().to("cpu", torch.float32).clone()
    return tree


def lora_state(pipe, spec: LoRASpec) -> Tree:
    """The trained adapter as one flat tree (float32 copies on the CPU): what a site trains and
    sends and the server releases. Under FFA-LoRA the B matrices only (see :func:`frozen_state`)."""
    return _adapter_tree(pipe, spec, trained=True)


def frozen_state(pipe, spec: LoRASpec) -> Tree:
    """The adapter's frozen tensors (FFA-LoRA's public A; empty for plain LoRA), as :func:`lora_state`.
    Never sent: each side draws them from the run seed; the export holds them next to B."""
    return _adapter_tree(pipe, spec, trained=False)


def tree_digest(tree: Mapping[str, torch.Tensor]) -> str:
    """16 hex digits of SHA-256 over the keys, shapes and float32 bytes of a tree, in key order:
    two sides holding the same tensors bit for bit get the same digest."""
    h = hashlib.sha256()
    for key, value in tree.items():
        h.update(f"{key}={tuple(value.shape)};".encode())
        h.update(value.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


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
    """Copy a flat tree into the attached adapter, in place; the keys and shapes must be
    :func:`lora_state`'s (under FFA-LoRA the B matrices only: A stays as drawn)."""
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
