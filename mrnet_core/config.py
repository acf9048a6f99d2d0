"""Fitting configuration: named presets, overrides from a file or flags, and validation with clear errors."""
import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .latent import MAX_GRID_CHANNELS, LatentArchitecture
from .network import MODELS as MRNET_MODELS
from .network import Architecture, StageSpec

MODELS = {**MRNET_MODELS, "g": "latent pyramid"}  # what `model` may name: the MR-Nets and latent.py's pyramids


class ConfigError(ValueError):
    """A bad configuration: the message is one line that names the key and the reason."""


# Bounds of the numeric keys. A config is a file anyone may write: nothing in one may make a fit run for ever,
# allocate gigabytes, or store weights that cannot be read back.
MAX_LEVELS = 16  # stages; also the most entries of a per-stage list
MAX_WIDTH = 4096  # neurons in one layer of one stage
MAX_HIDDEN_LAYERS = 16
MAX_PARAMS = 1 << 24  # per image (RGB): 64 MiB of float32 weights, four times that with gradients and Adam's moments
MAX_EPOCHS = 100_000
MAX_BATCH_PIXELS = 1 << 20
# batch_pixels x a stage's summed widths: one step's activations, ~400 MB kept in float32. batch_pixels = 0 (the
# whole level) grows with the image instead, which the fit's memory model (`fit.max_batch`) accounts for.
MAX_STEP_VALUES = 1 << 25
MAX_OMEGA = 1024.0  # first-layer band limits and the hidden-layer frequency scale
MAX_LR = 1.0
MAX_TARGET_BPP = 64.0  # more than raw 16-bit RGB (48 bpp)
MAX_TARGET_PSNR = 100.0  # dB
MAX_SEED = 2**32 - 1
MAX_PRIOR_PATH = 4096


@dataclass(frozen=True)
class Bound:
    """The numbers a key allows: `kind` (int or float) from `low` (excluded when `above_low`) to `high`."""

    kind: type
    low: float
    high: float
    above_low: bool = False  # a learning rate or frequency of 0 would do nothing

    def __contains__(self, value):
        return (self.low < value if self.above_low else self.low <= value) and value <= self.high  # nan: False

    def __str__(self):
        low, high = (f"{v:g}" if isinstance(v, float) else str(v) for v in (self.low, self.high))
        kind = "an integer" if self.kind is int else "a number"
        return f"{kind} above {low} and at most {high}" if self.above_low else f"{kind} from {low} to {high}"


# Per-stage keys (first, hidden, omega_0, lr, max_epochs, grid_channels) hold a list; each entry is checked.
BOUNDS = {
    "levels": Bound(int, 1, MAX_LEVELS),
    "first": Bound(int, 1, MAX_WIDTH),
    "hidden": Bound(int, 1, MAX_WIDTH),
    "hidden_layers": Bound(int, 0, MAX_HIDDEN_LAYERS),
    "omega_0": Bound(float, 0, MAX_OMEGA, above_low=True),
    "omega_hidden": Bound(float, 0, MAX_OMEGA, above_low=True),
    "lr": Bound(float, 0, MAX_LR, above_low=True),
    "lr_final": Bound(float, 0, MAX_LR, above_low=True),
    "max_epochs": Bound(int, 1, MAX_EPOCHS),
    "batch_pixels": Bound(int, 0, MAX_BATCH_PIXELS),
    "loss_tol": Bound(float, 0, 1),  # a mean squared error of pixels in [0, 1]
    "stall_epochs": Bound(int, 0, MAX_EPOCHS),
    "stall_tol": Bound(float, 0, 1),
    "seed": Bound(int, 0, MAX_SEED),
    "weight_bits": Bound(int, 2, 32),  # and one of the widths `validate` lists
    "qat_epochs": Bound(int, 0, MAX_EPOCHS),
    "qat_lr": Bound(float, 0, MAX_LR, above_low=True),
    "target_bpp": Bound(float, 0, MAX_TARGET_BPP),
    "target_psnr": Bound(float, 0, MAX_TARGET_PSNR),
    "rate_weight": Bound(float, 0, 1),
    "coarse_weight": Bound(float, 0, 1),
    "grid_channels": Bound(int, 1, MAX_GRID_CHANNELS),
}
PER_STAGE = ("first", "hidden", "omega_0", "lr", "max_epochs", "grid_channels")


def _show(value):
    """A value as the error message shows it: its repr, cut short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_number(key: str, value: object, bound: Bound) -> int | float:
    """`value` as `bound.kind` when it is a number within `bound`; ConfigError naming the key otherwise.

    Booleans are not numbers, and an int key takes a float only when it is a whole number (JSON may write 2.0).
    """
    is_number = isinstance(value, (int, float)) and not isinstance(value, bool)
    # The range first: a huge int must not reach float(), and nan or inf fail it.
    if not (is_number and value in bound and (bound.kind is float or float(value).is_integer())):
        raise ConfigError(f"{key}: must be {bound}, not {_show(value)}")
    return bound.kind(value)


def _checked(key, value):
    if key not in PER_STAGE:
        return check_number(key, value, BOUNDS[key])
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not 1 <= len(values) <= MAX_LEVELS:
        raise ConfigError(f"{key}: must be a list of 1 to {MAX_LEVELS} entries (one per stage), not {_show(value)}")
    return tuple(check_number(key, v, BOUNDS[key]) for v in values)


@dataclass(frozen=True)
class FitConfig:
    model: str = "m"
    levels: int = 3
    # Per-stage widths and band limits, coarse to fine. Another level count keeps the finest entries and extends
    # coarser ones by repeating the widths and halving omega_0, so `--levels` works with every preset.
    first: tuple = (64, 128, 192)
    hidden: tuple = (128, 192, 256)
    hidden_layers: int = 1
    omega_0: tuple = (8.0, 16.0, 32.0)
    omega_hidden: float = 30.0
    target: str = "gaussian"  # "gaussian" (all models) or "laplacian" (L-Net, S-Net)
    border: str = "reflect"  # "reflect" for photos, "wrap" for tileable textures
    periodic: bool = False  # fixed integer first-layer frequencies: the network tiles exactly (textures)
    # Per stage: Adam's learning rate, cosine-decayed to lr_final over max_epochs. Coarse stages see few pixels,
    # so they afford many epochs and a larger rate; the finest stage costs most and gets the fewest epochs.
    lr: tuple = (3e-3, 2e-3, 1e-3)
    lr_final: float = 1e-5
    max_epochs: tuple = (500, 100, 40)
    batch_pixels: int = 4096  # pixels per Adam step (a random subset of the level each step); 0: the whole level
    loss_tol: float = 0.0  # stop an image's stage once its loss is below this
    stall_epochs: int = 0  # stop once the loss has not improved by stall_tol (relative) for this many epochs; 0: never
    stall_tol: float = 1e-3
    seed: int = 0
    # How model files store weights: 32 or 16 (float), or 2 to 8 (quantised, entropy-coded; see quantize.py).
    weight_bits: int = 32
    # Quantisation-aware fine-tuning after the fit (bits 8 and below): epochs over the finest level, and the rate.
    qat_epochs: int = 10
    qat_lr: float = 1e-4
    # Rate control (0: off): size each image's widths so its stored model is at most target_bpp bits per pixel,
    # and/or the smallest that reaches target_psnr dB at full resolution (see rate.py). Quantises at weight_bits,
    # or 8 when weight_bits is a float width.
    target_bpp: float = 0.0
    target_psnr: float = 0.0
    # Where each image starts: "auto" (the shipped default prior for quantised encodes it has rungs for, else
    # none; for latent pyramids the shipped start, if it has their shape), "none" (a random draw, fitted stage by
    # stage), "default", or the path of a prior file (`prior.py`).
    prior: str = "auto"
    # Latent pyramids (model "g") only: the weight of the latents' bits per pixel against the squared error (lambda
    # of the rate-distortion loss). Higher: smaller files. Their MLP has hidden_layers layers of the finest `hidden`
    # width, and fits for the finest max_epochs (steps) at the finest lr.
    rate_weight: float = 0.003
    # Latent pyramids only: the weight of each coarser level of detail's squared error against the finest's 1. Lower
    # spends more of the file on the finest level: at 0.03, -2.6 to +1.4 dB at full resolution (+0.1 on average) and
    # up to 5.6 dB less on the coarser levels (docs/performance.md, "the coarse levels' weight"); 0 weighs the finest
    # alone.
    coarse_weight: float = 0.1
    # Latent pyramids only: the latents' probability model, "context" (a small network over the latents decoded before,
    # in the file) or "factorised" (one Laplace per grid).
    entropy: str = "context"
    # Latent pyramids only: grids per level of detail, per stage like `hidden` (the MLP reads one input per grid): 2
    # gives every level two grids, [2, 1, 1] the coarser levels two and the finest two levels one.
    grid_channels: tuple = (1,)

    def validate(self) -> "FitConfig":
        """This config with every number checked against BOUNDS (per-stage keys as tuples), and the keys checked
        together; ConfigError naming the key, the value and what is allowed otherwise."""
        checked = {key: _checked(key, getattr(self, key)) for key in BOUNDS}
        if len(set(checked["grid_channels"])) == 1:  # [2, 2] is 2: one model, one config id
            checked["grid_channels"] = checked["grid_channels"][:1]
        cfg = replace(self, **checked)
        choices = {"model": MODELS, "target": ("gaussian", "laplacian"), "border": ("reflect", "wrap"),
                   "weight_bits": (32, 16, 8, 7, 6, 5, 4, 3, 2), "entropy": ("context", "factorised")}
        for key, allowed in choices.items():
            value = getattr(cfg, key)
            if value not in tuple(allowed):  # a tuple: a list value must not be hashed
                raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}, not {_show(value)}")
        if not (isinstance(cfg.prior, str) and 0 < len(cfg.prior) <= MAX_PRIOR_PATH
                and cfg.prior.isprintable()):
            raise ConfigError(f"prior: must be auto, none, default or a prior file's path, not {_show(cfg.prior)}")
        if not isinstance(cfg.periodic, bool):
            raise ConfigError(f"periodic: must be true or false, not {_show(cfg.periodic)}")
        if cfg.model == "g":
            return cfg._validate_latent()
        if cfg.grid_channels != (1,):
            raise ConfigError(f"grid_channels: only a latent pyramid (model g) has grids; leave it at 1 for "
                              f"{MODELS[cfg.model]}, not {_show(list(cfg.grid_channels))}")
        if cfg.periodic and cfg.weight_bits <= 8:
            raise ConfigError("weight_bits: periodic models keep float weights (32 or 16): their frequencies stay "
                              "integers")
        if cfg.target == "laplacian" and cfg.model == "m":
            raise ConfigError("target: M-Net stages build on each other and need gaussian targets")
        if cfg.periodic and cfg.model == "f":
            raise ConfigError("periodic: a Fourier-feature MLP draws its own random frequencies; use model s, l or m")
        if cfg.model != "s" and cfg.hidden_layers == 0:
            raise ConfigError(f"hidden_layers: {MODELS[cfg.model]} needs at least one, not 0")
        arch = cfg.architecture(3)  # RGB: the most channels an image has
        if arch.params() > MAX_PARAMS:
            raise ConfigError(f"first, hidden, hidden_layers, levels: {arch.params():,} parameters per image, over the "
                              f"limit of {MAX_PARAMS:,}; use narrower or fewer layers")
        step = cfg.batch_pixels * max(s.first + sum(s.hidden) for s in arch.stages)
        if step > MAX_STEP_VALUES:
            raise ConfigError(f"batch_pixels: {cfg.batch_pixels} pixels a step through these widths is {step:,} "
                              f"activations, over the limit of {MAX_STEP_VALUES:,}; use fewer pixels or narrower "
                              "layers")
        return cfg

    def _validate_latent(self) -> "FitConfig":
        """The checks of a latent pyramid's config (`validate` has checked every number already)."""
        if self.weight_bits != 32:
            raise ConfigError(f"weight_bits: a latent pyramid stores integers on steps of its own fit; weight_bits "
                              f"does not apply to model g (leave it at 32), not {self.weight_bits}")
        if self.target_psnr:
            raise ConfigError("target_psnr: a latent pyramid's quality is set by rate_weight or target_bpp; a PSNR "
                              "target for model g is not built yet")
        if self.target_bpp and not self.rate_weight:
            raise ConfigError("rate_weight: a bpp target steers a latent pyramid's rate weight from rate_weight by "
                              "multiplying it, so it must be above 0 (the default is 0.003)")
        if self.target != "gaussian" or self.hidden_layers < 1:
            raise ConfigError("target, hidden_layers: a latent pyramid fits gaussian levels with at least one hidden "
                              "layer")
        if self.hidden_layers > 4 or self.per_stage("hidden")[-1] > 1024:
            raise ConfigError("hidden_layers, hidden: a latent pyramid's MLP has at most 4 layers of at most 1024")
        return self

    def latent_architecture(self, channels: int, height: int, width: int) -> LatentArchitecture:
        """The latent pyramid (model "g") of this config for an image of height x width."""
        return LatentArchitecture(channels, width, height, self.levels, self.latent_hidden(), self.periodic,
                                  self.entropy == "context", grid_channels=tuple(self.per_stage("grid_channels")))

    def latent_hidden(self) -> tuple:
        """A latent pyramid's MLP widths: hidden_layers layers of the finest `hidden`."""
        return (int(self.per_stage("hidden")[-1]),) * self.hidden_layers

    def per_stage(self, key: str) -> list:
        """A per-stage list of `levels` entries, finest-aligned (see the note on `first`)."""
        values = list(getattr(self, key))[-self.levels :]
        while len(values) < self.levels:
            values.insert(0, values[0] / 2 if key == "omega_0" else values[0])
        return values

    def architecture(self, channels: int) -> Architecture:
        hidden = self.per_stage("hidden") if self.model != "s" else [0] * self.levels
        layers = self.hidden_layers if self.model != "s" else 0
        stages = tuple(
            StageSpec(int(f), (int(h),) * layers, float(w))
            for f, h, w in zip(self.per_stage("first"), hidden, self.per_stage("omega_0"))
        )
        return Architecture(self.model, channels, stages, float(self.omega_hidden), periodic=self.periodic)

    def to_dict(self) -> dict:
        out = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}
        if self.model != "g":  # keys MR-Nets do not read: left out, so their config ids stay as they were
            del out["rate_weight"], out["entropy"], out["coarse_weight"], out["grid_channels"]
            return out
        # Keys at the value they had before they were keys: left out, so the ids of earlier jobs stay.
        if self.coarse_weight == 0.1:
            del out["coarse_weight"]
        if self.grid_channels == (1,):
            del out["grid_channels"]
        elif len(self.grid_channels) == 1:  # one count for every level, as the key was written before lists
            out["grid_channels"] = self.grid_channels[0]
        return out


# Model-specific defaults: similar parameter budgets (about 160K for RGB at 3 levels).
_MODEL_DEFAULTS = {
    "m": {},
    "l": {"first": (96, 128, 160), "hidden": (160, 224, 272)},
    "s": {"first": (512, 1024, 2048), "omega_0": (16.0, 32.0, 64.0)},
    # Fourier features: a fixed first layer (half sin, half cos) and ReLU hidden layers; about 120K parameters,
    # under 2K of them the fixed embedding. ReLU layers train slowly at SIREN's rates: 1e-2 gains 6 dB or more
    # over 1e-3 in the same epochs (astronaut, 64 to 256 px).
    "f": {"first": (128, 192, 256), "hidden": (128, 192, 256), "omega_0": (10.0, 20.0, 40.0),
          "lr": (1e-2, 1e-2, 1e-2)},
    # Latent pyramids: 7 grids (a 256 px image down to 4 px), an MLP of two layers of 16, 3,000 Adam steps at 1e-2
    # (bench/latent_probe.py; about 4 minutes for a 256 px photo on one CPU core).
    "g": {"levels": 7, "hidden": (16,), "hidden_layers": 2, "max_epochs": (3000,), "lr": (1e-2,)},
}

PRESETS = {
    # Tileable textures: periodic first layers and wrap borders, so every level tiles without a seam.
    "texture": {"periodic": True, "border": "wrap"},
    # Full quality on photos (about 160K parameters for RGB at 3 levels).
    "default": {},
    # Seconds, for smoke tests: small widths and few epochs.
    "fast": {"first": (16, 24, 32), "hidden": (24, 32, 48), "max_epochs": (300, 100, 50), "lr": (5e-3, 3e-3, 2e-3),
             "lr_final": 1e-4, "batch_pixels": 1024},
    # Small files, for rate-controlled encodes (`--target-bpp`): 8-bit weights, and after the fit a long joint phase
    # through the quantiser (every stage, every level), worth 0.5-1 dB at low rates. About 2 minutes per 256 px image
    # on 2 CPU cores; the joint phase's cost grows with the pixel count.
    "compact": {"first": (16, 24, 32), "hidden": (24, 32, 48), "max_epochs": (400, 300, 300),
                "lr": (5e-3, 3e-3, 2e-3), "lr_final": 1e-4, "weight_bits": 8, "qat_epochs": 1000, "qat_lr": 3e-3},
}


# What the presets above mean for a latent pyramid, whose widths, steps and learning rate are its own: `fast` is a
# short fit (a tenth of the steps); `compact` is `default` (its files are rate-controlled and entropy-coded already);
# `texture` is as for any model.
_LATENT_PRESETS = {"default": {}, "fast": {"max_epochs": (300,)}, "compact": {}, "texture": PRESETS["texture"]}


def load_file(path: Path | str) -> tuple[dict, dict]:
    """(fit keys, other tables) from a TOML or JSON config file.

    Fit keys sit at the top level or in a [fit] table; other tables (such as the pipeline's [job]) come back as
    they are, for their own readers to check.
    """
    path = Path(path)
    try:
        text = path.read_text()
        data = json.loads(text) if path.suffix == ".json" else tomllib.loads(text)
    except (OSError, ValueError) as e:
        raise ConfigError(f"{path}: cannot read config: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path}: must be a table of keys")
    tables = {k: v for k, v in data.items() if isinstance(v, dict)}
    flat = {k: v for k, v in data.items() if k not in tables}
    fit = tables.pop("fit", None)
    if fit is not None and flat:
        raise ConfigError(f"{path}: {', '.join(flat)}: put fit keys in the [fit] table or at the top, not both")
    return (flat if fit is None else fit), tables


def make_config(preset: str = "default", overrides: dict | None = None, model: str | None = None) -> FitConfig:
    """The model's defaults, then the preset's keys (for model g, `_LATENT_PRESETS`), then overrides (a dict, e.g.
    from `load_file` and CLI flags), each over the last."""
    if not isinstance(preset, str) or preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {_show(preset)}; choose one of {', '.join(PRESETS)}")
    if not isinstance(overrides, (dict, type(None))):
        raise ConfigError("config: must be a table of keys")
    overrides = dict(overrides or {})
    model = model or overrides.get("model", "m")
    if not isinstance(model, str) or model not in MODELS:
        raise ConfigError(f"model: must be one of {', '.join(MODELS)}, not {_show(model)}")
    known = [f.name for f in fields(FitConfig)]
    for key in overrides:
        if key not in known:
            raise ConfigError(f"{key}: unknown config key; known keys: {', '.join(known)}")
    preset_keys = (_LATENT_PRESETS if model == "g" else PRESETS)[preset]
    merged = {**_MODEL_DEFAULTS[model], **preset_keys, **overrides, "model": model}
    return replace(FitConfig(), **merged).validate()
