"""Stain colour: normalisation (Macenko, Reinhard, through torchstain) and HED jitter.

Why: BreakHis slides were stained and scanned in batches, and H&E colour drifts from batch
to batch. A frozen ImageNet backbone sees colour, so a head can learn the batch instead of
the tissue, and a patient-disjoint split then pays for it. Two remedies, both applied once
per image on the full decoded RGB image, before the backbone's resize/crop/normalise, so the
feature cache keeps its one-pass cost:

* normalisation maps every image onto one reference appearance (`StainNormaliser`);
* augmentation shows the head several plausible stainings of every training image
  (`stain_view`: Tellez et al.'s HED jitter, deterministic per seed, image and view).

The reference is always explicit and recorded in `identity()`:

* Macenko without `ref` uses torchstain's built-in reference, the stain matrix and maximum
  concentrations that every Macenko port carries (HERef = [[0.5626, 0.2159], [0.7201, 0.8012],
  [0.4062, 0.5581]], maxCRef = [1.9705, 1.0308]; Macenko et al., ISBI 2009, via
  github.com/mitkovetta/staining-normalization): recorded as `ref=library-default`.
* Reinhard has no built-in target in torchstain 1.4.1 (its normaliser must be fitted), so it
  needs a reference image.
* With a reference image (`--stain-ref PATH`), the normaliser is fitted on it once, here, and
  the file is recorded by the sha256 of its bytes (`ref=sha256:...`), not by its path.
"""

from __future__ import annotations

import functools
import hashlib
import logging
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from PIL import Image

from breakhis_tl.data.identity import sha256_file
from breakhis_tl.errors import UserError

if TYPE_CHECKING:  # torch is imported only when a normaliser is built
    import torch

log = logging.getLogger(__name__)

FORMAT = "breakhis_tl.data.stain/1"
METHODS = ("none", "macenko", "reinhard")
LIBRARY_DEFAULT = "library-default"
# The fitted target of each method (torchstain's attribute names): all a normaliser needs.
PARAMS = {"macenko": ("HERef", "maxCRef"), "reinhard": ("target_means", "target_stds")}
# torchstain's Macenko defaults: transmitted light, angle percentile, transparency threshold.
IO, ALPHA, BETA = 240, 1, 0.15
# A pixel is tissue when its optical density is >= BETA in every channel (Macenko's own test).
MIN_TISSUE = 0.01  # below 1% tissue pixels there is nothing to estimate stains from
# Second-largest eigenvalue of the tissue's optical-density covariance: below it the colours
# lie on one line (a flat or one-stain image), so two stain vectors cannot be separated.
# Measured on the 14 sample images: 1.0e-3 to 1.5e-2, so this leaves a 100x margin.
MIN_SPREAD = 1e-5


class StainError(ValueError):
    """Normalisation failed for one image; the message names the file and says why."""

    def __init__(self, name: str, method: str, reason: str):
        self.name, self.method, self.reason = name, method, reason
        super().__init__(f"Stain normalisation ({method}) failed for {name}: {reason}.")


def torchstain_version() -> str:
    """From the installed distribution: torchstain 1.4.1 still says 1.3.0 in __version__."""
    try:
        return version("torchstain")
    except PackageNotFoundError:
        return "absent"


def _chw(rgb: np.ndarray) -> torch.Tensor:
    """uint8 [H, W, 3] -> uint8 tensor [3, H, W], the layout torchstain's torch backend wants."""
    import torch

    return torch.from_numpy(np.array(rgb, dtype=np.uint8)).permute(2, 0, 1).contiguous()


@functools.lru_cache(maxsize=1)
def _od_lut() -> np.ndarray:
    """Optical density of the 256 byte values, computed as torchstain does (float32)."""
    import torch

    return (-torch.log((torch.arange(256).float() + 1) / IO)).numpy().astype(np.float64)


def check_tissue(rgb: np.ndarray, name: str, method: str) -> None:
    """Refuse images the methods cannot handle: nearly no tissue, or a single colour.

    `rgb` is uint8 [H, W, 3]. Through a 256-entry table, so it costs a few ms, not a pass of
    float maths over the image.
    """
    od = _od_lut()
    pixels = rgb.reshape(-1, 3)
    is_tissue = (od >= BETA)[pixels].all(axis=1)
    frac = float(is_tissue.mean()) if len(pixels) else 0.0
    if frac < MIN_TISSUE:
        raise StainError(
            name, method, f"nearly no tissue ({100 * frac:.2f}% of pixels, need {MIN_TISSUE:.0%})"
        )
    tissue = od[pixels[is_tissue]]
    spread = np.linalg.eigvalsh(np.cov(tissue.T)) if len(tissue) > 1 else np.zeros(3)
    if not np.isfinite(spread).all() or spread[1] < MIN_SPREAD:
        raise StainError(
            name, method, "its tissue is one flat colour (a singular stain matrix; no spread)"
        )


def _fit(method: str, ref: str | Path | None):
    """A torchstain torch-backend normaliser, fitted on `ref` when one is given."""
    import torchstain

    if method == "macenko":
        norm = torchstain.normalizers.MacenkoNormalizer(backend="torch")
    else:
        norm = torchstain.normalizers.ReinhardNormalizer(backend="torch")
    if ref is None:
        return norm
    from breakhis_tl.data.images import ImageError, load_rgb

    try:
        rgb = np.asarray(load_rgb(ref))
    except ImageError as exc:
        raise UserError(f"Stain reference: {exc}") from None
    try:
        check_tissue(rgb, str(ref), method)
    except StainError as exc:
        raise UserError(
            f"Stain reference {ref} cannot be used: {exc.reason}; choose an H&E image of tissue."
        ) from None
    if method == "macenko":
        norm.fit(_chw(rgb), Io=IO, alpha=ALPHA, beta=BETA)
    else:
        norm.fit(_chw(rgb))
    return norm


class StainNormaliser:
    """Callable PIL RGB -> PIL RGB; picklable, so DataLoader workers get a fitted copy.

    `method` is one of METHODS; `ref` is a reference image file, fitted once here (None:
    torchstain's built-in Macenko reference; Reinhard has none and needs a file).
    """

    def __init__(self, method: str = "none", ref: str | Path | None = None):
        if method not in METHODS:
            raise UserError(f"Unknown stain method {method!r}; choose {', '.join(METHODS)}.")
        if method == "none" and ref is not None:
            raise UserError("A stain reference needs --stain macenko or --stain reinhard.")
        if method == "reinhard" and ref is None:
            raise UserError(
                f"torchstain {torchstain_version()} has no built-in Reinhard target; "
                "pass --stain-ref PATH with a reference H&E image."
            )
        if ref is not None and not Path(ref).is_file():
            raise UserError(f"Stain reference {ref} does not exist.")
        self.method = method
        self.ref_path = str(ref) if ref is not None else None
        # the reference's bytes: a moved or renamed file keeps its identity
        self.ref = f"sha256:{sha256_file(ref)}" if ref is not None else LIBRARY_DEFAULT
        self._norm = None if method == "none" else _fit(method, ref)

    def __repr__(self) -> str:
        return f"StainNormaliser({self.method!r}, ref={self.ref_path or self.ref!r})"

    def params(self) -> dict[str, torch.Tensor]:
        """The fitted target, so a head file can rebuild this normaliser without `ref`."""
        if self._norm is None:
            return {}
        names = PARAMS[self.method]
        return {n: getattr(self._norm, n).detach().float().clone() for n in names}

    @classmethod
    def from_params(
        cls, method: str, ref: str, params: dict[str, torch.Tensor], ref_path: str | None = None
    ) -> StainNormaliser:
        """The normaliser a head was trained with, from its recorded target (`params`)."""
        self = cls.__new__(cls)
        self.method, self.ref, self.ref_path = method, ref, ref_path
        self._norm = None
        if method != "none":
            missing = [n for n in PARAMS[method] if n not in params]
            if missing:
                raise UserError(f"The {method} stain target lacks {', '.join(missing)}.")
            self._norm = _fit(method, None)
            for n in PARAMS[method]:
                setattr(self._norm, n, params[n].float())
        return self

    def identity(self) -> str:
        """What the output depends on: for the feature-cache key and the head metadata."""
        if self.method == "none":
            return "none"
        import torch  # its eigh/lstsq/LAB kernels compute the result

        parts = [FORMAT, f"method={self.method}", f"torchstain={torchstain_version()}"]
        parts += [f"torch={torch.__version__.split('+')[0]}", f"ref={self.ref}"]
        if self.method == "macenko":
            parts.append(f"Io={IO},alpha={ALPHA},beta={BETA}")
        return ";".join(parts)

    def __call__(self, image: Image.Image, name: str = "<image>") -> Image.Image:
        """The normalised image, same size; StainError (naming `name`) when it cannot be."""
        if self._norm is None:
            return image
        import torch

        rgb = np.asarray(image.convert("RGB"))
        check_tissue(rgb, name, self.method)
        chw = _chw(rgb)
        try:
            with torch.inference_mode():
                if self.method == "macenko":
                    out, _, _ = self._norm.normalize(
                        chw, Io=IO, alpha=ALPHA, beta=BETA, stains=False
                    )
                else:
                    out = self._norm.normalize(chw)
        except (RuntimeError, ValueError, IndexError) as exc:  # LinAlgError is a RuntimeError
            raise StainError(name, self.method, f"torchstain raised {exc}") from None
        # Macenko casts to int32, where NaN becomes INT_MIN. Reinhard casts to uint8, which
        # hides NaN; its NaN comes from a zero colour spread, which check_tissue refuses.
        if out.dtype.is_floating_point or int(out.min()) < 0 or int(out.max()) > 255:
            raise StainError(name, self.method, "the output is not finite (NaN or inf)")
        return Image.fromarray(out.to(torch.uint8).numpy(), "RGB")

    def apply(
        self, image: Image.Image, name: str, strict: bool = False
    ) -> tuple[Image.Image, str | None]:
        """(normalised image, None), or (the image unchanged, the message) unless `strict`."""
        try:
            return self(image, name), None
        except StainError as exc:
            if strict:
                raise
            return image, str(exc)


# ---- HED jitter (Tellez et al. 2018, 2019) ------------------------------------------------
# Ruifrok & Johnston's H&E-DAB colour-deconvolution matrix (Anal Quant Cytol Histol 23:291,
# 2001; the matrix of scikit-image's rgb2hed), in the stain units of Tellez et al.'s own
# implementation (Radboud DIAG's HedColorAugmenter): s = -ln(rgb + 2) @ inv(M), rgb in [0, 1]
# (not optical density proper). The +2 keeps the logarithm finite, nothing is clipped, so the
# round trip is exact and sigma = 0 is the identity; and in these units the published sigmas
# keep their published strength. (In
# scikit-image's units, OD / ln(1e6) floored at 0, sigma = 0.05 turns the white background
# grey: mean change per pixel, 14 sample images x 7 views, median 46 grey levels against 21
# here; HED-strong gives 63 here.)
RGB_FROM_HED = np.array([[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]])
HED_FROM_RGB = np.linalg.inv(RGB_FROM_HED)
_LOG_LUT = -np.log(np.arange(256) / 255.0 + 2.0)  # -ln(rgb + 2) for the 256 byte values
_LOG_LUT32 = _LOG_LUT.astype(np.float32)

HED_LIGHT = 0.05  # Tellez et al. 2019, "HED-light": alpha in [0.95, 1.05], beta in [-0.05, 0.05]
HED_STRONG = 0.2  # Tellez et al. 2019, "HED-strong": alpha in [0.8, 1.2], beta in [-0.2, 0.2]
_STREAM = 0x48454431  # "HED1": keeps these random streams apart from any other use of a seed


def rgb_to_hed(rgb: np.ndarray) -> np.ndarray:
    """uint8 [..., 3] -> float64 stain amounts (H, E, D) [..., 3], Tellez's units."""
    return _LOG_LUT[rgb] @ HED_FROM_RGB


def hed_to_rgb(hed: np.ndarray) -> np.ndarray:
    """Stain amounts -> uint8 RGB, clipped to [0, 255] and rounded to the nearest byte."""
    rgb = np.exp(-(hed @ RGB_FROM_HED)) - 2.0
    return np.rint(np.clip(rgb, 0.0, 1.0) * 255.0).astype(np.uint8)


def hed_jitter(
    image: Image.Image, rng: np.random.Generator | int, sigma: float = HED_LIGHT
) -> Image.Image:
    """Tellez's HED augmentation: each stain channel c of H, E, D becomes alpha * c + beta.

    alpha ~ U(1 - sigma, 1 + sigma) and beta ~ U(-sigma, sigma), per image and per channel,
    drawn in the order alpha(H, E, D), beta(H, E, D). sigma = 0.05 is Tellez's HED-light, the
    default: the milder of the two HED settings Tellez et al. 2019 compared, since a frozen
    ImageNet backbone cannot adapt to stainings far from real ones; 0.2 is HED-strong.
    """
    if not 0 <= sigma < 1:
        raise ValueError(f"HED jitter sigma {sigma} is not in [0, 1).")
    rng = np.random.default_rng(rng)
    alpha = rng.uniform(1 - sigma, 1 + sigma, 3)
    beta = rng.uniform(-sigma, sigma, 3)
    # hed_to_rgb(rgb_to_hed(x) * alpha + beta), folded into one 3x3 matrix and one offset on
    # -ln(rgb + 2), in float32 and in place: 5 ms instead of 26 ms for a 700x460 image.
    mix = ((HED_FROM_RGB * alpha) @ RGB_FROM_HED).astype(np.float32)
    shift = (beta @ RGB_FROM_HED).astype(np.float32)
    x = _LOG_LUT32[np.asarray(image.convert("RGB"))] @ mix
    x += shift
    np.negative(x, out=x)
    np.exp(x, out=x)
    x -= 2.0
    np.clip(x, 0.0, 1.0, out=x)
    x *= 255.0
    np.rint(x, out=x)
    return Image.fromarray(x.astype(np.uint8), "RGB")


def view_rng(seed: int, key: str, view: int) -> np.random.Generator:
    """The random stream of one (seed, image, view): no shared state, so neither the order
    in which images are processed nor the worker that does it changes the draw."""
    if seed < 0 or view < 0:
        raise ValueError(f"seed {seed} and view {view} must be >= 0.")
    digest = hashlib.sha256(key.encode()).digest()
    words = np.frombuffer(digest, dtype=np.uint32).tolist()
    return np.random.default_rng(np.random.SeedSequence([_STREAM, seed, view, *words]))


def stain_view(
    image: Image.Image, seed: int, key: str, view: int, sigma: float = HED_LIGHT
) -> Image.Image:
    """Stain view `view` of an image; view 0 is the image itself, views >= 1 HED-jittered.

    `key` names the image independently of where and when it is processed: its content id
    (sha1 of the file) or its path relative to the archive, so that the K cached copies of
    every training image are the same in every run with the same seed.
    """
    if view == 0:
        return image
    return hed_jitter(image, view_rng(seed, key, view), sigma)


def stain_views(
    image: Image.Image, seed: int, key: str, k: int, sigma: float = HED_LIGHT
) -> list[Image.Image]:
    """Views 0..k-1 of `stain_view`, from one decode."""
    return [stain_view(image, seed, key, v, sigma) for v in range(k)]


def jitter_identity(sigma: float = HED_LIGHT) -> str:
    """What a jittered view depends on besides (seed, key, view): for the cache key."""
    return (
        f"{FORMAT};hed-jitter;sigma={sigma!r};matrix=ruifrok-johnston;"
        f"rng=pcg64-seedsequence;numpy={np.__version__}"
    )


# ---- A run's stain settings ---------------------------------------------------------------
class StainSetup:
    """One normaliser for every image, and `views` HED-jittered copies of each training image.

    Stain view 0 is the (normalised) image itself; views 1..`views` are its jittered copies,
    drawn from (seed, image content id, view), so they are the same in every run with the same
    seed and can be cached like the dihedral views.
    """

    def __init__(
        self,
        normaliser: StainNormaliser | None = None,
        views: int = 0,
        seed: int = 0,
        sigma: float = HED_LIGHT,
    ):
        if views < 0:
            raise UserError(f"--stain-views must be 0 or more, not {views}.")
        self.normaliser = normaliser or StainNormaliser()
        self.views, self.seed, self.sigma = views, seed, sigma

    @property
    def method(self) -> str:
        return self.normaliser.method

    def key(self, view: int = 0) -> str:
        """The feature-cache part of stain view `view`; untouched images keep the key "none"
        they had before stain options existed, so their cached features stay valid."""
        base = self.normaliser.identity()
        if view == 0:
            return base
        return f"{base}|{jitter_identity(self.sigma)};seed={self.seed};view={view}"

    def prepare(
        self, image: Image.Image, name: str, key: str, n_views: int = 1
    ) -> tuple[list[Image.Image], str]:
        """Stain views 0..n_views-1 of one decoded image, and the fallback message ("" when
        normalisation worked or was not asked for): a failed image goes on unnormalised."""
        image, note = self.normaliser.apply(image, name)
        return [stain_view(image, self.seed, key, v, self.sigma) for v in range(n_views)], (
            note or ""
        )

    def record(self) -> dict:
        """What a head file keeps (with `params()` as tensors) to normalise as in training."""
        return {
            "method": self.method, "ref": self.normaliser.ref,
            "ref_path": self.normaliser.ref_path, "identity": self.key(0),
            "views": self.views, "sigma": self.sigma, "seed": self.seed,
        }  # fmt: skip

    def params(self) -> dict:
        return {f"stain.{k}": v for k, v in self.normaliser.params().items()}

    @classmethod
    def from_record(cls, record: dict | None, tensors: dict | None = None) -> StainSetup:
        """The setup a head was trained with; a head from before stain options: none."""
        if not record or record.get("method", "none") == "none":
            return cls()
        params = {k.removeprefix("stain."): v for k, v in (tensors or {}).items()
                  if k.startswith("stain.")}  # fmt: skip
        norm = StainNormaliser.from_params(
            record["method"], record["ref"], params, record.get("ref_path")
        )
        if norm.identity() != record.get("identity", norm.identity()):
            log.warning(
                "This head's stain normalisation was computed with %s; this machine has %s, "
                "so its normalised images may differ slightly.", record["identity"],
                norm.identity(),
            )  # fmt: skip
        return cls(norm, int(record.get("views", 0)), int(record.get("seed", 0)),
                   float(record.get("sigma", HED_LIGHT)))  # fmt: skip
