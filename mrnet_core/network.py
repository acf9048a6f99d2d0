"""MR-Nets: S-Net, L-Net and M-Net, batched over images; and a Fourier-feature MLP baseline.

One `MRNet` holds the weights of B images of one architecture; every weight has a leading image dimension
and a forward pass evaluates all B networks with batched matrix products. Stage i is a small sinusoidal MLP
g_i, and the network is f(x, t) = sum_i c_i(t) g_i(x) with c_i(t) = clamp(t - i, 0, 1).

The Fourier-feature MLP ("f", Tancik et al. 2020) is built like an L-Net, but each stage's first layer is a fixed
random embedding [sin, cos](omega_0 x W), W ~ N(0, 1), followed by ReLU hidden layers.
"""
import json
import math
from dataclasses import asdict, dataclass

import torch
from torch import nn

MODELS = {"s": "S-Net", "l": "L-Net", "m": "M-Net", "f": "Fourier-feature MLP"}


@dataclass(frozen=True)
class StageSpec:
    first: int  # first-layer width: the number of sinusoidal frequencies
    hidden: tuple = ()  # hidden-layer widths; empty for S-Net
    omega_0: float = 30.0  # first-layer frequency scale: the stage's band limit


@dataclass(frozen=True)
class Architecture:
    model: str  # "s", "l", "m" or "f"
    channels: int
    stages: tuple
    omega_hidden: float = 30.0
    in_features: int = 2
    # Periodic first layers: integer frequencies over the domain's period 2, fixed, so f tiles exactly.
    periodic: bool = False

    def __post_init__(self):
        if self.model not in MODELS:
            raise ValueError(f"model must be one of {sorted(MODELS)}, not {self.model!r}")
        if not self.stages:
            raise ValueError("an MR-Net needs at least one stage")
        if self.channels < 1 or self.in_features < 1:
            raise ValueError(f"channels and in_features must be positive, not {self.channels}, {self.in_features}")
        for s in self.stages:
            if (self.model == "s") != (len(s.hidden) == 0):
                raise ValueError(f"{MODELS[self.model]} stages "
                                 f"{'have no' if self.model == 's' else 'need'} hidden layers")
            if s.first < 1 or any(h < 1 for h in s.hidden):
                raise ValueError(f"layer widths must be positive: {s}")
        if self.periodic and self.model == "f":
            raise ValueError("a Fourier-feature MLP draws its own first-layer frequencies: it cannot be periodic")

    def layer_shapes(self, i: int) -> list[tuple[int, int]]:
        """(fan_in, fan_out) of every layer of stage i, first to output."""
        s = self.stages[i]
        widths = [s.first, *s.hidden]
        fan_ins = [self.in_features, *widths[:-1]]
        if self.model == "m" and i > 0:  # the first hidden layer also reads the previous stage's basis
            fan_ins[1] += self.stages[i - 1].hidden[-1]
        return list(zip(fan_ins, widths)) + [(widths[-1], self.channels)]

    def stage_params(self, i: int) -> int:
        return sum((fi + 1) * fo for fi, fo in self.layer_shapes(i))

    def params(self) -> int:
        return sum(self.stage_params(i) for i in range(len(self.stages)))

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "Architecture":
        d = dict(d)
        d["stages"] = tuple(StageSpec(s["first"], tuple(s["hidden"]), float(s["omega_0"])) for s in d["stages"])
        d["periodic"] = bool(d.get("periodic", False))
        return cls(**d)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)


def periodic_frequencies(arch: Architecture, generator: torch.Generator) -> list[torch.Tensor]:
    """Integer frequency vectors k (first-layer rows), per stage, none repeated across stages.

    Stage i draws from the frequencies within its band limit (max |k| <= omega_0 / pi, widened only when the band
    holds too few), skipping those earlier stages took. k and -k give the same sinusoids up to phase, so only one
    of each pair is a candidate, and k = 0 (a constant) is left to the biases.
    """
    taken, out = set(), []
    for s in arch.stages:
        limit = max(1, round(s.omega_0 / math.pi))
        while True:
            r = torch.arange(-limit, limit + 1)
            grid = torch.stack(torch.meshgrid(r, r, indexing="ij"), -1).reshape(-1, 2).tolist()
            free = [tuple(k) for k in grid if (k[0] > 0 or (k[0] == 0 and k[1] > 0)) and tuple(k) not in taken]
            if len(free) >= s.first:
                break
            limit += 1
        chosen = [free[p] for p in torch.randperm(len(free), generator=generator)[: s.first].tolist()]
        taken.update(chosen)
        out.append(torch.tensor(chosen))
    return out


def snap_periodic(model: "MRNet") -> "MRNet":
    """Round a periodic model's first-layer weights back onto integer frequencies (after float16 storage)."""
    with torch.no_grad():
        for stage in model.stages:
            w, omega = stage.weights[0], stage.omegas[0]
            w.copy_(torch.round(w * omega / math.pi) * math.pi / omega)
    return model


def fourier_embedding(fan_in: int, fan_out: int, omega_0: float,
                      generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """First-layer (w, b) of a Fourier-feature stage: sin(omega_0 (x w + b)) gives sin and cos pairs.

    The first half of the features is sin(omega_0 x W), the second half the same frequencies shifted by a quarter
    period, i.e. cos; W ~ N(0, 1), so omega_0 plays the role of 2 pi sigma.
    """
    half = (fan_out + 1) // 2
    w = torch.randn(fan_in, half, generator=generator)
    w = torch.cat([w, w], dim=1)[:, :fan_out]
    b = torch.zeros(fan_out)
    b[half:] = math.pi / (2 * omega_0)
    return w, b


class Stage(nn.Module):
    """One MLP, B copies. Weights are [B, fan_in, fan_out] so that x @ W is a batched product.

    Layer j computes z = omega_j (h W_j + b_j), h' = activation_j(z), then a linear output layer. MR-Net stages
    use sin throughout; a Fourier-feature stage (`fourier`) has a fixed random sin/cos first layer, never trained
    (`fixed_first`), then ReLU layers with omega 1.
    """

    def __init__(self, shapes, omega_0, omega_hidden, batch, generator, frequencies=None, fourier=False):
        super().__init__()
        hidden = len(shapes) - 2
        self.omegas = [omega_0] + [1.0 if fourier else omega_hidden] * hidden
        self.activations = ["sin"] + ["relu" if fourier else "sin"] * hidden
        self.fixed_first = fourier
        self.weights, self.biases = nn.ParameterList(), nn.ParameterList()
        for j, (fan_in, fan_out) in enumerate(shapes):
            # SIREN initialisation: the first layer spans [-1, 1] so that frequencies fill [-omega_0, omega_0];
            # later layers keep activations in sin's well-behaved range. ReLU layers get Kaiming's range, which
            # keeps the activations' scale; their output layer a smaller one, so the fit starts near 0, not at noise.
            bound = 1.0 if j == 0 else math.sqrt(6 / fan_in) / omega_hidden
            if fourier and j > 0:
                bound = math.sqrt((6 if j < len(shapes) - 1 else 1) / fan_in)
            w = (torch.rand(fan_in, fan_out, generator=generator) * 2 - 1) * bound
            if j == 0 and frequencies is not None:  # periodic: omega_0 * w = pi * k, k integer, one period on [-1, 1]
                w = frequencies.t().float() * math.pi / omega_0
            b = (torch.rand(fan_out, generator=generator) * 2 - 1) / math.sqrt(fan_in)
            if j == 0 and fourier:
                w, b = fourier_embedding(fan_in, fan_out, omega_0, generator)
            # Every image of the batch starts from the same draw, so a batched fit equals B single fits.
            self.weights.append(nn.Parameter(w.expand(batch, -1, -1).clone()))
            self.biases.append(nn.Parameter(b.expand(batch, -1).clone()))

    def forward(self, x: torch.Tensor, basis: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """x: [B, N, in] coordinates; basis: [B, N, H] previous-stage features (M-Net). Returns (g, features)."""
        h = x
        for j, (omega, activation) in enumerate(zip(self.omegas, self.activations)):
            w, b = self.weights[j], self.biases[j].unsqueeze(1)
            if j == 1 and basis is not None:
                # Same as concatenating [h, basis] before one product, without materialising the concatenation.
                own = h.shape[-1]
                z = torch.baddbmm(b, h, w[:, :own]).baddbmm_(basis, w[:, own:])
                h = torch.sin(omega * z)
            elif activation == "sin":
                h = torch.sin(torch.baddbmm(b, h, w, beta=omega, alpha=omega))
            else:
                h = torch.relu(torch.baddbmm(b, h, w, beta=omega, alpha=omega))
        out = torch.baddbmm(self.biases[-1].unsqueeze(1), h, self.weights[-1])
        return out, h


class MRNet(nn.Module):
    def __init__(self, arch: Architecture, batch=1, seed=0):
        super().__init__()
        self.arch = arch
        generator = torch.Generator().manual_seed(seed)
        frequencies = periodic_frequencies(arch, generator) if arch.periodic else [None] * len(arch.stages)
        fourier = arch.model == "f"
        self.stages = nn.ModuleList(
            Stage(arch.layer_shapes(i), s.omega_0, arch.omega_hidden, batch, generator, frequencies[i], fourier)
            for i, s in enumerate(arch.stages)
        )

    @property
    def batch(self) -> int:
        return self.stages[0].weights[0].shape[0]

    def stage_outputs(self, x: torch.Tensor, count: int | None = None) -> tuple[list[torch.Tensor], torch.Tensor]:
        """The first `count` stage outputs g_i(x), each [B, N, C], and the last one's features."""
        x = x.expand(self.batch, -1, -1) if x.dim() == 2 else x
        outputs, basis = [], None
        for stage in self.stages[: count or len(self.stages)]:
            g, h = stage(x, basis if self.arch.model == "m" else None)
            outputs.append(g)
            basis = h
        return outputs, basis

    def forward(self, x: torch.Tensor, t: float | None = None) -> torch.Tensor:
        """f(x, t) = sum_i c_i(t) g_i(x); t=None is the full network (t = N). Stages with c_i(t) = 0 are skipped."""
        n = len(self.stages)
        t = float(n if t is None else t)
        if not 0 <= t <= n:
            raise ValueError(f"level of detail t must lie in [0, {n}], not {t}")
        count = min(n, math.ceil(t)) or 1
        outputs, _ = self.stage_outputs(x, count)
        weights = [min(max(t - i, 0.0), 1.0) for i in range(count)]
        return sum(c * g for c, g in zip(weights, outputs))
