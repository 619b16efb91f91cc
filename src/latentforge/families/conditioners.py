"""How each kind of model is conditioned: one small object per kind builds ``Cond`` (context, vector,
concat) from encoded text and the task's inputs, for generation, training and export alike.

Nothing elsewhere branches on the kind of model: a family names its conditioner, and callers ask it.

- ``Conditioner`` itself (SD1, SD2, the demo model): the text context alone.
- ``SDXLConditioner``: context + the vector of pooled bigG text and six size numbers (original
  height, width, crop top, crop left, target height, width); an empty negative prompt is zeroed, as the
  original sampling code does.
- ``RefinerConditioner``: the vector's numbers are original height, width, crop top, crop left and an
  aesthetic score.
- ``InpaintConditioner``: 5 extra input channels (mask, masked-image latent); without a mask the whole
  image is repainted (mask 1, latent of a grey image), as A1111 does.
- ``DepthConditioner``, ``UpscaleConditioner``: extra channels that txt2img/img2img cannot supply (a
  depth map; a low-resolution image and its noise level).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
from torch import Tensor

from latentforge.conditioning.vectors import sdxl_vector
from latentforge.models.midas import sd2_depth_condition
from latentforge.sampling.denoisers import Cond


@dataclass(frozen=True)
class Conditioner:
    """Models conditioned on the text context alone (SD1.x, SD2.x, the demo model)."""

    kind: ClassVar[str] = "text"
    concat_channels: ClassVar[int] = 0  # extra UNet input channels after the latent
    needs: ClassVar[str] = ""  # an input txt2img/img2img cannot give; refused there when set
    zero_empty_negative: ClassVar[bool] = False  # SDXL base: empty negative prompt -> zero conditioning

    def size_numbers(self, width: int, height: int, aesthetic: float) -> list[float]:
        """The numbers embedded into the vector input (none for plain text models)."""
        return []

    @property
    def number_count(self) -> int:
        return len(self.size_numbers(1, 1, 1.0))

    def vector(self, pooled: Tensor | None, adm_channels: int | None, width: int, height: int, aesthetic: float):
        """The UNet's vector input ``y`` for a batch of pooled text vectors, or None."""
        numbers = self.size_numbers(width, height, aesthetic)
        if not numbers:
            return None
        if pooled is None or adm_channels is None:
            raise ValueError(f"{type(self).__name__} needs a pooled text vector and a UNet with a vector input")
        dim = (adm_channels - pooled.shape[-1]) // len(numbers)
        ids = torch.tensor([numbers], dtype=torch.float32, device=pooled.device).expand(pooled.shape[0], -1)
        return sdxl_vector(pooled.float(), ids, dim)

    def default_concat(self, vae, width: int, height: int, device) -> Tensor | None:
        """The extra input channels when the task gives none (1 image; None for models without them)."""
        return None

    def build(
        self,
        context: Tensor,
        pooled: Tensor | None,
        *,
        width: int,
        height: int,
        adm_channels: int | None,
        aesthetic: float = 6.0,
        empty_negative: bool = False,
        concat: Tensor | None = None,
        batch: int | None = None,
    ) -> Cond:
        """``Cond`` for encoded text (context (B or 1, T, C), pooled (B or 1, P)) at an output size.

        ``empty_negative``: this is the negative side of CFG and its prompt is empty. ``batch`` expands
        a single encoded prompt (and a single concat image) to the batch."""
        if empty_negative and self.zero_empty_negative:
            context = torch.zeros_like(context)
            pooled = None if pooled is None else torch.zeros_like(pooled)
        vector = self.vector(pooled, adm_channels, width, height, aesthetic)
        if batch is not None:
            context = context.expand(batch, -1, -1)
            vector = None if vector is None else vector.expand(batch, -1)
            concat = None if concat is None else concat.expand(batch, -1, -1, -1)
        return Cond(context, vector, concat)

    def diffusers_index(self) -> dict:
        """Entries of a diffusers ``model_index.json`` that follow from the conditioning."""
        return {}


@dataclass(frozen=True)
class SDXLConditioner(Conditioner):
    kind: ClassVar[str] = "sdxl"
    zero_empty_negative: ClassVar[bool] = True

    def size_numbers(self, width: int, height: int, aesthetic: float) -> list[float]:
        # original size = target size, no crop (what A1111, ComfyUI and diffusers send by default)
        return [height, width, 0, 0, height, width]

    def diffusers_index(self) -> dict:
        return {"force_zeros_for_empty_prompt": True}


@dataclass(frozen=True)
class RefinerConditioner(Conditioner):
    kind: ClassVar[str] = "refiner"

    def size_numbers(self, width: int, height: int, aesthetic: float) -> list[float]:
        return [height, width, 0, 0, aesthetic]

    def diffusers_index(self) -> dict:
        return {"force_zeros_for_empty_prompt": False, "requires_aesthetics_score": True}


@dataclass(frozen=True)
class InpaintConditioner(Conditioner):
    kind: ClassVar[str] = "inpaint"
    concat_channels: ClassVar[int] = 5

    def default_concat(self, vae, width: int, height: int, device) -> Tensor:
        """No mask: repaint everything (mask 1 and the latent of an empty, grey image), as A1111."""
        grey = torch.zeros(1, 3, height, width, device=device)
        return self.masked_image_concat(vae, grey, torch.ones(1, 1, height, width, device=device))

    def masked_image_concat(self, vae, image: Tensor, mask: Tensor, weight: float = 1.0) -> Tensor:
        """The 5 extra channels of an inpainting model: the mask (1, 1, H, W; 1 = repaint, rounded) at
        latent size (nearest), then the latent of the image with the masked area cleared:
        ``lerp(image, image * (1 - mask), weight)`` (A1111's "conditional mask weight"; 1 = cleared, as
        the original code and diffusers do)."""
        with torch.inference_mode():
            cleared = torch.lerp(image, image * (1 - mask), weight)
            latent = vae.encode(cleared.to(vae.dtype)).float()
        small = torch.nn.functional.interpolate(mask.float(), size=latent.shape[-2:]).to(latent.device)
        return torch.cat([small, latent], dim=1)


@dataclass(frozen=True)
class DepthConditioner(Conditioner):
    kind: ClassVar[str] = "depth"
    concat_channels: ClassVar[int] = 1
    needs: ClassVar[str] = "a depth map"

    def depth_concat(self, depth: Tensor, latent_size: tuple[int, int]) -> Tensor:
        """The depth model's extra channel: a depth map (B, 1, H, W; larger = nearer, as MiDaS gives it)
        resized to latent size (bicubic) and scaled to [-1, 1] per image, as the original depth2img code
        and diffusers do."""
        flat = depth.flatten(1)
        if bool((flat.amax(dim=1) - flat.amin(dim=1) <= 0).any()):
            raise ValueError("the depth map is flat (one value everywhere); depth-to-image needs a map with depth")
        return sd2_depth_condition(depth, latent_size)


@dataclass(frozen=True)
class UpscaleConditioner(Conditioner):
    """The x4 upscaler (Stable Diffusion 2 ``ImageConcatWithNoiseAugmentation``): the low-resolution
    image in [-1, 1], noised to ``noise_level`` with the DDPM schedule of betas 0.0001 .. 0.02 ("linear"
    in the original, i.e. linear in sqrt(beta); at most 350), is concatenated after the scaled latent,
    and the level is the UNet's class label ``y``."""

    kind: ClassVar[str] = "x4"
    concat_channels: ClassVar[int] = 3
    needs: ClassVar[str] = "a low-resolution image"
    max_noise_level: ClassVar[int] = 350
    low_res_betas: ClassVar[tuple[float, float]] = (0.0001, 0.02)

    def noise_augment(self, image: Tensor, noise_level: int, noise: Tensor) -> Tensor:
        """q(x_t | x_0) at t = ``noise_level``: sqrt(abar_t) image + sqrt(1 - abar_t) noise (DDPM, Ho et al.
        2020, eq. 4), abar computed in float64 as the original."""
        if not 0 <= noise_level <= self.max_noise_level:
            raise ValueError(f"noise_level must be 0 to {self.max_noise_level}, got {noise_level}")
        lo, hi = self.low_res_betas
        betas = torch.linspace(lo**0.5, hi**0.5, 1000, dtype=torch.float64) ** 2
        abar = float(torch.cumprod(1 - betas, 0)[noise_level])
        return abar**0.5 * image.float() + (1 - abar) ** 0.5 * noise.float()

    def build(
        self,
        context: Tensor,
        pooled: Tensor | None,
        *,
        width: int,
        height: int,
        adm_channels: int | None,
        aesthetic: float = 6.0,
        empty_negative: bool = False,
        concat: Tensor | None = None,
        batch: int | None = None,
        noise_level: int = 20,
    ) -> Cond:
        """The text context and the noise level as class label (B,); the noised low-res images come per
        batch as ``concat`` (the x4 task's pass supplies them)."""
        n = batch or context.shape[0]
        if batch is not None:
            context = context.expand(batch, -1, -1)
            concat = None if concat is None else concat.expand(batch, -1, -1, -1)
        labels = torch.full((n,), int(noise_level), dtype=torch.long, device=context.device)
        return Cond(context, labels, concat)
