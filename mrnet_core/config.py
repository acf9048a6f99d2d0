"""Fitting configuration: named presets, overrides from a file or flags, and validation with clear errors."""
import json
import tomllib
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from .network import MODELS, Architecture, StageSpec


class ConfigError(ValueError):
    """A bad configuration: the message is one line that names the key and the reason."""


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

    def validate(self):
        choices = {"model": MODELS, "target": ("gaussian", "laplacian"), "border": ("reflect", "wrap"),
                   "weight_bits": (32, 16, 8, 7, 6, 5, 4, 3, 2)}
        for key, allowed in choices.items():
            if getattr(self, key) not in allowed:
                raise ConfigError(f"{key}: must be one of {', '.join(map(str, allowed))}, not {getattr(self, key)!r}")
        if self.periodic and self.weight_bits <= 8:
            raise ConfigError("weight_bits: periodic models keep float weights (32 or 16): their frequencies stay "
                              "integers")
        if self.target == "laplacian" and self.model == "m":
            raise ConfigError("target: M-Net stages build on each other and need gaussian targets")
        if self.periodic and self.model == "f":
            raise ConfigError("periodic: a Fourier-feature MLP draws its own random frequencies; use model s, l or m")
        positive = {"levels": self.levels, "lr_final": self.lr_final, "omega_hidden": self.omega_hidden,
                    "qat_lr": self.qat_lr}
        for key, value in positive.items():
            if not value > 0:
                raise ConfigError(f"{key}: must be positive, not {value!r}")
        for key in ("first", "omega_0", "max_epochs", "lr") + (("hidden",) if self.model != "s" else ()):
            values = getattr(self, key)
            if not values or any(not (isinstance(v, (int, float)) and v > 0) for v in values):
                raise ConfigError(f"{key}: must be a non-empty list of positive numbers, not {list(values)!r}")
        if self.hidden_layers < 0 or (self.model != "s" and self.hidden_layers == 0):
            raise ConfigError(f"hidden_layers: {MODELS[self.model]} needs at least one, not {self.hidden_layers}")
        for key in ("batch_pixels", "stall_epochs", "qat_epochs", "target_bpp", "target_psnr"):
            if getattr(self, key) < 0:
                raise ConfigError(f"{key}: must be 0 or more, not {getattr(self, key)}")
        return self

    def per_stage(self, key):
        """A per-stage list of `levels` entries, finest-aligned (see the note on `first`)."""
        values = list(getattr(self, key))[-self.levels :]
        while len(values) < self.levels:
            values.insert(0, values[0] / 2 if key == "omega_0" else values[0])
        return values

    def architecture(self, channels):
        hidden = self.per_stage("hidden") if self.model != "s" else [0] * self.levels
        layers = self.hidden_layers if self.model != "s" else 0
        stages = tuple(
            StageSpec(int(f), (int(h),) * layers, float(w))
            for f, h, w in zip(self.per_stage("first"), hidden, self.per_stage("omega_0"))
        )
        return Architecture(self.model, channels, stages, float(self.omega_hidden), periodic=self.periodic)

    def to_dict(self):
        return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(self).items()}


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


def _coerce(key, value, kind):
    if kind is tuple:
        value = list(value) if isinstance(value, (list, tuple)) else [value]
        return tuple(value)
    if kind is int and isinstance(value, float) and value.is_integer():
        return int(value)
    if kind is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, kind) or (isinstance(value, bool) and kind is not bool):
        raise ConfigError(f"{key}: must be {kind.__name__}, not {value!r}")
    return value


def load_file(path):
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


def make_config(preset="default", overrides=None, model=None):
    """Resolve preset, then model defaults, then overrides (a dict, e.g. from `load_file` and CLI flags)."""
    if preset not in PRESETS:
        raise ConfigError(f"preset: unknown preset {preset!r}; choose one of {', '.join(PRESETS)}")
    overrides = dict(overrides or {})
    if not isinstance(overrides, dict):
        raise ConfigError("config: must be a table of keys")
    model = model or overrides.get("model") or "m"
    if model not in MODELS:
        raise ConfigError(f"model: must be one of {', '.join(MODELS)}, not {model!r}")
    kinds = {f.name: f.type for f in fields(FitConfig)}
    merged = {**_MODEL_DEFAULTS[model], **PRESETS[preset], **overrides, "model": model}
    values = {}
    for key, value in merged.items():
        if key not in kinds:
            raise ConfigError(f"{key}: unknown config key; known keys: {', '.join(kinds)}")
        values[key] = _coerce(key, value, kinds[key])
    return replace(FitConfig(), **values).validate()
