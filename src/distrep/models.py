"""The model family as one registry, built from short spec strings.

Grammar
-------
A spec is a dash-separated list of layers, read left to right::

    spec   := layer ("-" layer)*
    layer  := "linear" ["+bias" | "+nobias"] | "offsetl2" | head | activation
    head   := rbf | mahalanobis | gmlvq | cosine            (distrep.heads)
    activation := relu | abs | neg | tanh | sigmoid | gelu | softplus | elu | identity

``linear``, ``offsetl2`` and the heads are the *affine* layers (and any a user registers with
:func:`register_layer`). The first takes the input features (784 for
MNIST), the last gives one output per class, and every other one has ``width`` outputs.
Hidden ``linear`` layers carry a bias; the output ``linear`` has none unless it says ``+bias``:
without it, a final ``neg`` cannot be undone by a bias shift, which is the paper's point.
``neg`` is y = -x. Examples::

    linear-relu-linear-relu-neg     # the paper's ReLU2-Neg
    linear-abs-linear+bias-abs      # Abs2 with an output bias
    linear-abs-offsetl2-neg         # Abs-L2-Neg
    linear-relu-linear-relu-linear  # a deeper variant of ReLU

The paper's model names are aliases (:data:`ALIASES`), as are short names for the heads on a
ReLU hidden layer (:data:`HEAD_ALIASES`); names are matched case-insensitively and
``_`` counts as ``-``.

Initialisation
--------------
``create_model(..., seed=s)`` initialises every affine layer k from its own generator, seeded by
``(s, k)`` alone. So run i of every variant that shares a first layer starts from identical
first-layer weights (the paired design), whatever else is in the model or in the batch. The
distributions are PyTorch's ``nn.Linear`` defaults (weight and bias ~ U(-1/sqrt(fan_in),
1/sqrt(fan_in))) and the author's OffsetL2 init (mu ~ N(0, 0.1^2), alpha = 1).
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from distrep.errors import DistrepError
from distrep.heads import HEADS
from distrep.layers import ACTIVATIONS, OffsetL2, linear_init_bound

# Layers with parameters that map in_features -> out_features, by spec name. ``linear`` and
# ``offsetl2`` are built specially (bias, OffsetL2 form); the rest as ``cls(in, out)``. A user
# adds to this and to ACTIVATIONS with :func:`register_layer`.
AFFINE_LAYERS: dict[str, type[nn.Module]] = {"linear": nn.Linear, "offsetl2": OffsetL2, **HEADS}

ALIASES: dict[str, str] = {
    # Table 1: output layer without bias
    "Abs": "linear-abs-linear",
    "ReLU": "linear-relu-linear",
    "Abs2": "linear-abs-linear-abs",
    "Abs2-Neg": "linear-abs-linear-abs-neg",
    "ReLU2": "linear-relu-linear-relu",
    "ReLU2-Neg": "linear-relu-linear-relu-neg",
    # Table 2: the same with an output bias
    "Abs-Bias": "linear-abs-linear+bias",
    "ReLU-Bias": "linear-relu-linear+bias",
    "Abs2-Bias": "linear-abs-linear+bias-abs",
    "Abs2-Neg-Bias": "linear-abs-linear+bias-abs-neg",
    "ReLU2-Bias": "linear-relu-linear+bias-relu",
    "ReLU2-Neg-Bias": "linear-relu-linear+bias-relu-neg",
    # Table 3: OffsetL2 output layers
    "ReLU-L2": "linear-relu-offsetl2",
    "ReLU-L2-Neg": "linear-relu-offsetl2-neg",
    "Abs-L2": "linear-abs-offsetl2",
    "Abs-L2-Neg": "linear-abs-offsetl2-neg",
    # Linear -> OffsetL2 with no activation in between
    "Linear-L2": "linear-offsetl2",
    "Linear-L2-Neg": "linear-offsetl2-neg",
}

# Names for the prior-art heads on a ReLU hidden layer (distrep.heads; not the paper's): the
# distances read through neg (logit = -d), the cosine classifier a similarity read directly.
HEAD_ALIASES: dict[str, str] = {
    "ReLU-RBF-Neg": "linear-relu-rbf-neg",
    "ReLU-Mahalanobis-Neg": "linear-relu-mahalanobis-neg",
    "ReLU-GMLVQ-Neg": "linear-relu-gmlvq-neg",
    "ReLU-Cosine": "linear-relu-cosine",
}
NAMES: dict[str, str] = ALIASES | HEAD_ALIASES     # every model name distrep knows

TABLE1 = ("Abs", "ReLU", "Abs2", "Abs2-Neg", "ReLU2", "ReLU2-Neg")
TABLE2 = tuple(f"{name}-Bias" for name in TABLE1)
TABLE3 = ("ReLU-L2", "ReLU-L2-Neg", "Abs-L2", "Abs-L2-Neg")
HEAD_MODELS = tuple(HEAD_ALIASES)

_ALIAS_KEYS = {name.lower(): name for name in NAMES}


@dataclass(frozen=True)
class LayerSpec:
    """One layer: ``kind`` is 'linear', 'offsetl2' or an activation name."""

    kind: str
    in_features: int = 0
    out_features: int = 0
    bias: bool = False

    @property
    def affine(self) -> bool:
        return self.kind in AFFINE_LAYERS

    def describe(self) -> str:
        if self.kind == "linear":
            return f"Linear({self.in_features}→{self.out_features}{'' if self.bias else ', no bias'})"
        if self.affine:
            return f"{AFFINE_LAYERS[self.kind].__name__}({self.in_features}→{self.out_features})"
        return {"relu": "ReLU", "abs": "Abs", "neg": "Neg"}.get(self.kind, self.kind.capitalize())


def resolve(name_or_spec: str) -> tuple[str | None, str]:
    """``(alias or None, spec)`` for a paper name or a spec string (spec checked by :func:`parse`)."""
    key = name_or_spec.strip().lower().replace("_", "-")
    if key in _ALIAS_KEYS:
        alias = _ALIAS_KEYS[key]
        return alias, NAMES[alias]
    return None, key


def parse(name_or_spec: str, width: int = 128, in_features: int = 784,
          num_classes: int = 10) -> tuple[LayerSpec, ...]:
    """The layers of a model, with their sizes resolved. Raises :class:`DistrepError`."""
    if width < 1 or in_features < 1 or num_classes < 1:
        raise DistrepError(f"width, input features and classes must be positive "
                           f"(got {width}, {in_features}, {num_classes})")
    _, spec = resolve(name_or_spec)
    tokens = spec.split("-") if spec else []
    if len(tokens) > 1 and "" in tokens:
        where = ("a leading" if tokens[0] == "" else "a trailing" if tokens[-1] == "" else "a doubled")
        raise DistrepError(f"empty layer in {name_or_spec!r} ({where} '-'); layers are joined by "
                           f"single dashes, e.g. linear-relu-linear")
    kinds = []
    for token in tokens:
        kind, _, modifier = token.partition("+")
        if kind not in AFFINE_LAYERS and kind not in ACTIVATIONS:
            raise DistrepError(_unknown_message(name_or_spec, token if len(tokens) > 1 else None))
        if modifier and (kind != "linear" or modifier not in ("bias", "nobias")):
            raise DistrepError(f"bad modifier '+{modifier}' on '{kind}' in {name_or_spec!r}; "
                               f"only linear takes +bias or +nobias")
        kinds.append((kind, modifier))
    affine_positions = [i for i, (k, _) in enumerate(kinds) if k in AFFINE_LAYERS]
    if not affine_positions:
        raise DistrepError(_unknown_message(name_or_spec, None))
    layers, fan_in = [], in_features
    for i, (kind, modifier) in enumerate(kinds):
        if kind not in AFFINE_LAYERS:
            layers.append(LayerSpec(kind))
            continue
        is_output = i == affine_positions[-1]
        out = num_classes if is_output else width
        bias = kind == "linear" and (modifier == "bias" or (not is_output and modifier != "nobias"))
        layers.append(LayerSpec(kind, fan_in, out, bias))
        fan_in = out
    return tuple(layers)


def canonical_spec(name_or_spec: str) -> str:
    """The spec string of a name, with defaults left implicit (``ReLU2-Neg`` -> its spec)."""
    layers = parse(name_or_spec)
    last_affine = max(i for i, layer in enumerate(layers) if layer.affine)
    tokens = []
    for i, layer in enumerate(layers):
        token = layer.kind
        if layer.kind == "linear":
            default_bias = i != last_affine
            if layer.bias != default_bias:
                token += "+bias" if layer.bias else "+nobias"
        tokens.append(token)
    return "-".join(tokens)


def display_name(name_or_spec: str) -> str:
    """The paper's name if the spec has one, else the canonical spec."""
    spec = canonical_spec(name_or_spec)
    return next((alias for alias, s in NAMES.items() if s == spec), spec)


def name_digest(name: str) -> str:
    """The SHA-256 of a model's name, in hex: what tags a name too long to show whole, in its
    folder (:func:`distrep.sweep.model_dir`) and in figures (:func:`distrep.plots.figure_label`)."""
    return hashlib.sha256(name.encode()).hexdigest()


class Net(nn.Sequential):
    """A model of the family: an ``nn.Sequential`` that remembers its spec and layer specs."""

    def __init__(self, layers: tuple[LayerSpec, ...], spec: str, offsetl2_form: str = "paper"):
        super().__init__(*(_build(layer, offsetl2_form) for layer in layers))
        self.layer_specs, self.spec, self.offsetl2_form = layers, spec, offsetl2_form

    def extra_repr(self) -> str:
        return f"spec={self.spec!r}"


def _build(layer: LayerSpec, offsetl2_form: str) -> nn.Module:
    if layer.kind == "linear":
        return nn.Linear(layer.in_features, layer.out_features, bias=layer.bias)
    if layer.kind == "offsetl2":
        return OffsetL2(layer.in_features, layer.out_features, form=offsetl2_form)
    if layer.affine:
        return AFFINE_LAYERS[layer.kind](layer.in_features, layer.out_features)
    return ACTIVATIONS[layer.kind]()


def register_layer(name: str, layer: type[nn.Module], affine: bool) -> None:
    """Make ``name`` a layer of the spec grammar (so ``linear-relu-NAME-neg`` builds, trains in
    sweeps on the engine's autograd path, and reports like any model).

    An affine layer is built as ``layer(in_features, out_features)`` and must draw its
    parameters in ``reset_parameters(generator)`` from the generator it is given (that is what
    makes a seed reproducible and the paired design pair); an activation is built as
    ``layer()`` and has no parameters."""
    if not (name.isascii() and name.isalnum() and name.islower()):
        raise DistrepError(f"layer names are lower-case letters and digits, got {name!r}")
    if name in AFFINE_LAYERS or name in ACTIVATIONS:
        raise DistrepError(f"a layer named {name!r} exists already")
    if affine and "generator" not in _parameters_of(getattr(layer, "reset_parameters", None)):
        raise DistrepError(f"{layer.__name__} needs reset_parameters(generator) to be seeded")
    (AFFINE_LAYERS if affine else ACTIVATIONS)[name] = layer


def _parameters_of(method) -> tuple[str, ...]:
    """The parameter names of ``method`` (defined on the class or inherited), () if none."""
    try:
        return tuple(inspect.signature(method).parameters)
    except (TypeError, ValueError):
        return ()


def create_model(name_or_spec: str, width: int = 128, *, in_features: int = 784,
                 num_classes: int = 10, offsetl2_form: str = "paper",
                 seed: int | None = None) -> Net:
    """Build a model from a paper name or a spec string (see the module docstring).

    With ``seed`` the parameters come from :func:`init_parameters`; without, from PyTorch's
    global generator as ``nn.Linear`` would draw them.
    """
    layers = parse(name_or_spec, width, in_features, num_classes)
    model = Net(layers, canonical_spec(name_or_spec), offsetl2_form)
    if seed is not None:
        init_parameters(model, seed)
    return model


def layer_generator(seed: int, layer_index: int) -> torch.Generator:
    """A CPU generator for affine layer ``layer_index`` of run ``seed``, independent of all others.

    NumPy's SeedSequence mixes the pair into a well-spread 63-bit seed.
    """
    if seed < 0:
        raise DistrepError(f"seeds must be non-negative, got {seed}")
    state = np.random.SeedSequence([seed, layer_index]).generate_state(2, dtype=np.uint32)
    return torch.Generator().manual_seed(int(state[0]) << 31 | int(state[1]) >> 1)


def init_parameters(model: Net, seed: int) -> Net:
    """Draw every affine layer's parameters from :func:`layer_generator` (on the CPU, so the
    same seed gives the same weights on every device)."""
    affine = [m for m, spec in zip(model, model.layer_specs) if spec.affine]
    with torch.no_grad():
        for k, module in enumerate(affine):
            g = layer_generator(seed, k)
            if isinstance(module, nn.Linear):
                bound = linear_init_bound(module.in_features)
                module.weight.copy_(torch.empty(module.weight.shape).uniform_(-bound, bound, generator=g))
                if module.bias is not None:
                    module.bias.copy_(torch.empty(module.bias.shape).uniform_(-bound, bound, generator=g))
            else:
                module.reset_parameters(generator=g)
    return model


def describe(name_or_spec: str, width: int = 128, in_features: int = 784,
             num_classes: int = 10) -> str:
    """``Linear(784→128) → ReLU → Linear(128→10, no bias) → ReLU``."""
    return describe_layers(parse(name_or_spec, width, in_features, num_classes))


def describe_layers(layers: tuple[LayerSpec, ...]) -> str:
    """The layers as :func:`describe` shows them."""
    return " → ".join(layer.describe() for layer in layers)


def layer_specs_of(model: nn.Module) -> tuple[tuple[LayerSpec, ...], str]:
    """``(layer specs, OffsetL2 form)`` of a model of the family: a :class:`Net`, or an
    ``nn.Sequential`` of the family's layer modules built by hand (``nn.Linear``, ``OffsetL2``,
    the heads, the activations with their default settings; ``inplace`` changes no value).

    So a model written without :func:`create_model` can be stacked for the analyses. Raises
    :class:`DistrepError` naming the first module that is not such a layer, or a layer whose
    input width is not its predecessor's output width."""
    if isinstance(model, Net):
        return model.layer_specs, model.offsetl2_form
    if not isinstance(model, nn.Sequential):
        raise DistrepError(f"a model of the family is an nn.Sequential of its layers, "
                           f"got a {type(model).__name__}")
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    layers, forms, width = [], set(), None
    for k, module in enumerate(model):
        kind = next((name for name, cls in AFFINE_LAYERS.items() if type(module) is cls), None)
        if kind is None:
            kind = names.get(type(module))
            if kind is None or _settings(module) != _settings(ACTIVATIONS[kind]()):
                hint = ("; the analyses take flat inputs: pass model[1:]"
                        if k == 0 and isinstance(module, nn.Flatten) else "")
                raise DistrepError(f"layer {k} of the model, {module}, is not a layer of the family "
                                   f"({_layer_names()}, "
                                   f"activations with their default settings){hint}")
            layers.append(LayerSpec(kind))
            continue
        if width is not None and module.in_features != width:
            raise DistrepError(f"layer {k} of the model takes {module.in_features} features but "
                               f"the layer before it gives {width}")
        bias = kind == "linear" and module.bias is not None
        layers.append(LayerSpec(kind, module.in_features, module.out_features, bias))
        width = module.out_features
        if kind == "offsetl2":
            forms.add(module.form)
    if width is None:
        raise DistrepError("the model has no layer with parameters (linear, offsetl2 or a head)")
    if len(forms) > 1:
        raise DistrepError("the model's OffsetL2 layers compute different forms (paper and coded)")
    return tuple(layers), forms.pop() if forms else "paper"


def _settings(module: nn.Module) -> str:
    """A module's settings as its repr shows them, less ``inplace`` (which changes no value)."""
    return ", ".join(part for part in module.extra_repr().split(", ")
                     if part and not part.startswith("inplace="))


def parameter_count(name_or_spec: str, width: int = 128, in_features: int = 784,
                    num_classes: int = 10) -> int:
    layers = parse(name_or_spec, width, in_features, num_classes)
    with torch.device("meta"):          # sizes only: nothing is allocated or drawn
        return sum(p.numel() for p in Net(layers, canonical_spec(name_or_spec)).parameters())


def _unknown_message(name: str, token: str | None) -> str:
    what = f"unknown layer {token!r} in {name!r}" if token else f"unknown model {name!r}"
    return (f"{what}; valid names: {', '.join(NAMES)}; or a spec of layers "
            f"{_layer_names()} joined by '-' (see `distrep models`)")


def _layer_names() -> str:
    """Every layer the grammar knows, a user's registered ones included: ``linear/offsetl2/...``."""
    return "/".join(tuple(AFFINE_LAYERS) + tuple(ACTIVATIONS))
