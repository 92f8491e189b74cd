"""What a cell is: the settings of one arm of one seed, and the identity derived from them.

A *cell* is one arm of one seed: the controller on (a :class:`PTConfig` with a mode other than
``off``) or off (identity routing; the same hooks record the same statistics). The two arms of a
seed share everything else (initial weights, data and its order). Because ``mode="off"`` is
identity, the off arm depends on no controller field, so one off arm serves every η × P cell of a
seed (:meth:`CellSpec.paired_off`).

Every spec validates itself at construction (a ValueError naming the key); :mod:`.config` builds
them from a YAML sweep config and names the config key on failure.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from chronovisor.controllers import MODES, PTConfig
from chronovisor.eval import metrics, synthetic

PROTOCOLS = ("joint", "frozen", "controller_only")
DATA_SOURCES = ("synthetic", "jsonl")
OFF = "off"
LOSS_FREE = "loss_free"
PLACEBO = "placebo"
#: The standard baseline arm: controller off (identity routing), trained on CE plus the family's own
#: auxiliary load-balancing loss (and router z-loss) with the model config's coefficients
#: (:mod:`.router_losses`). ``joint`` only: the other protocols train no model weights.
AUX_LOSS = "aux_loss"
#: Training objectives of an arm: plain next-token CE, or CE + the router losses (:data:`AUX_LOSS`).
CE = "ce"
OBJECTIVES = (CE, AUX_LOSS)
#: The placebo arm's pressure scale: about one float32 rounding unit of a logit of order 1. The arm
#: runs the whole controller path (hooks, re-selection, ticks) but its bias only changes how some
#: logits round, so its Δloss is the protocol's own noise (in bfloat16 it is an exact no-op).
PLACEBO_PRESSURE = 1e-7
#: Every arm label of the package, in report order: the PTConfig modes, DeepSeek's comparator, then
#: the auxiliary-loss baseline.
VARIANTS = (MODES[0], PLACEBO, *MODES[1:], LOSS_FREE, AUX_LOSS)


@dataclass(frozen=True)
class DataSpec:
    """Where the conversations come from.

    Attributes:
        source: ``synthetic`` (:class:`~chronovisor.eval.data.ConversationGenerator`) or ``jsonl``.
        num_train: training conversations (synthetic); ``joint``/``controller_only`` cycle over them,
            ``frozen`` pretrains the base on them.
        num_heldout: held-out conversations (synthetic): same world, an independent sample stream.
        num_warmup: ``frozen`` only: conversations of the warm-up stream (the next samples of the
            training stream, unseen in pretraining; for ``jsonl`` the training split).
        generator: :class:`~chronovisor.eval.data.ConversationConfig` fields (synthetic).
        path, tokenizer, max_length, heldout_fraction: the ``jsonl`` source: a file of
            ``{"turns": [...]}`` lines, a local tokenizer directory (default: the model directory),
            truncation length and the share of conversations held out (seeded split).
    """

    source: str = "synthetic"
    num_train: int = 10
    num_heldout: int = 10
    num_warmup: int = 10
    generator: dict[str, Any] = field(default_factory=dict)
    path: str | None = None
    tokenizer: str | None = None
    max_length: int = 1024
    heldout_fraction: float = 0.2

    def __post_init__(self) -> None:
        if self.source not in DATA_SOURCES:
            raise ValueError(f"data.source must be one of {', '.join(DATA_SOURCES)} (got {self.source!r})")
        for name in ("num_train", "num_heldout"):
            if getattr(self, name) < 1:
                raise ValueError(f"data.{name} must be at least 1 (got {getattr(self, name)})")
        if self.num_warmup < 0:
            raise ValueError(f"data.num_warmup must be >= 0 (got {self.num_warmup})")
        if self.source == "synthetic":
            try:
                synthetic.ConversationConfig(**self.generator)
            except TypeError as error:
                raise ValueError(f"data: {error}") from None
        elif self.path is None:
            raise ValueError("data.path is required when data.source is 'jsonl'")

    @property
    def conversation_config(self) -> synthetic.ConversationConfig:
        return synthetic.ConversationConfig(**self.generator)


def identifying_train_settings(train: dict[str, Any]) -> dict[str, Any]:
    """The ``train`` settings that identify a result, for cell ids and the config hash alike.

    ``compile`` is an execution setting (see :class:`TrainSpec`) and is left out; so is
    ``lr_warmup_steps`` at its default 0, so that cells and runs written before the setting existed
    keep their ids and hash.
    """
    return {key: value for key, value in train.items()
            if key != "compile" and not (key == "lr_warmup_steps" and not value)}


@dataclass(frozen=True)
class TrainSpec:
    """Optimisation settings (AdamW, plain next-token cross-entropy; the ``aux_loss`` arm adds the
    router losses, see :class:`CellSpec`).

    Attributes:
        steps: ``joint``: training steps of model and live controller; ``controller_only``: steps
            training the controller offsets. One step = one forward = one tick.
        lr: AdamW learning rate of the model weights (``joint`` training and base pretraining);
            the reference uses 1e-4.
        weight_decay: AdamW weight decay (PyTorch's default 0.01).
        batch_size: conversations per step (the reference uses 1).
        pretrain_steps: ``frozen``/``controller_only``: steps pretraining the base without a
            controller before it is frozen (0 = use the model's weights as they are, e.g. a
            pretrained model directory).
        controller_lr: ``controller_only``: AdamW learning rate of the offsets.
        lr_warmup_steps: linear learning-rate warm-up over the first steps of every training phase
            (joint training, base pretraining, the offsets); 0 = the full rate from the first step.
        compile: ``joint`` and ``controller_only``: run each training step's forward and backward
            through ``torch.compile`` (inductor; router hooks traced in). An execution setting,
            like ``batch_configs``: equal to eager up to float rounding (the held-out loss within
            1e-4 relative after a short run; see tests/test_compile.py), so it is left out of the
            cell ids and the config hash, and recorded in each cell's ``numerics``.
    """

    steps: int = 500
    lr: float = 1e-4
    weight_decay: float = 0.01
    batch_size: int = 1
    pretrain_steps: int = 0
    controller_lr: float = 1e-2
    lr_warmup_steps: int = 0
    compile: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("steps", 0), ("batch_size", 1), ("pretrain_steps", 0), ("lr_warmup_steps", 0)):
            if getattr(self, name) < minimum:
                raise ValueError(f"train.{name} must be >= {minimum} (got {getattr(self, name)})")
        for name in ("lr", "weight_decay", "controller_lr"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"train.{name} must be a finite number >= 0 (got {value})")


@dataclass(frozen=True)
class EvalSpec:
    """Held-out evaluation settings.

    Attributes:
        batch_size: held-out conversations per forward (padding is masked everywhere).
        null_permutations: turn-label permutations for the separation null.
        trajectory_every: record the fields every this many ticks.
        streaming: evaluate turn by turn through the KV cache and tick the controller after every
            turn (the fields keep adapting online). Off: one forward per batch with the fields
            frozen. Decoder-only models, batch 1.
    """

    batch_size: int = 1
    null_permutations: int = metrics.DEFAULT_PERMUTATIONS
    trajectory_every: int = 5
    streaming: bool = False

    def __post_init__(self) -> None:
        for name, minimum in (("batch_size", 1), ("null_permutations", 2), ("trajectory_every", 1)):
            if getattr(self, name) < minimum:
                raise ValueError(f"eval.{name} must be >= {minimum} (got {getattr(self, name)})")
        if self.streaming and self.batch_size != 1:
            raise ValueError(f"eval.streaming runs one conversation at a time: eval.batch_size must be 1 "
                             f"(got {self.batch_size})")


@dataclass(frozen=True)
class LoadSpec:
    """How model directories / hub ids are loaded (toy presets are built in memory on ``device``).

    Attributes:
        device_map: passed to ``from_pretrained`` (e.g. ``"auto"``); None = load, then move the
            model to the process's device.
        torch_dtype: e.g. ``"bfloat16"``; None = the checkpoint's dtype.
    """

    device_map: str | None = None
    torch_dtype: str | None = None

    def __post_init__(self) -> None:
        if self.torch_dtype is not None and not isinstance(getattr(torch, self.torch_dtype, None), torch.dtype):
            raise ValueError(f"load.torch_dtype: {self.torch_dtype!r} is not a torch dtype (e.g. float32, bfloat16, "
                             f"float16)")


def variant_config(label: str, **fields: Any) -> PTConfig:
    """The PTConfig of an arm label (one of :data:`VARIANTS` but ``off`` and ``aux_loss``): a PTConfig
    mode, ``placebo`` (``mode="pressure"`` at :data:`PLACEBO_PRESSURE`) or ``loss_free`` (DeepSeek's
    auxiliary-loss-free sign rule: ``dynamics="loss_free"``, ``mode="pressure"``).

    ``aux_loss`` is not a controller but a training objective: see :func:`variant_arm`.
    """
    if label == AUX_LOSS:
        raise ValueError("aux_loss is a training objective with the controller off, not a PTConfig; "
                         "use variant_arm('aux_loss')")
    if label == LOSS_FREE:
        return PTConfig(**{**fields, "dynamics": LOSS_FREE, "mode": "pressure"})
    if label == PLACEBO:
        return PTConfig(**{**fields, "mode": "pressure", "pressure_scale": PLACEBO_PRESSURE})
    return PTConfig(**{**fields, "mode": label})


def variant_arm(label: str, **fields: Any) -> tuple[PTConfig | None, str]:
    """``(pt_config, objective)`` of any arm label of :data:`VARIANTS`: ``off`` is ``(None, "ce")``,
    ``aux_loss`` is ``(None, "aux_loss")`` (controller off, so ``fields`` are ignored), every other
    label is ``(variant_config(label, **fields), "ce")``. Inverse: :func:`arm_name`."""
    if label == OFF:
        return None, CE
    if label == AUX_LOSS:
        return None, AUX_LOSS
    return variant_config(label, **fields), CE


def variant_label(config: PTConfig) -> str:
    """Inverse of :func:`variant_config`: ``loss_free``, ``placebo``, else the mode."""
    if config.mode != OFF and config.dynamics == LOSS_FREE:
        return LOSS_FREE
    if config.mode == "pressure" and config.pressure_scale == PLACEBO_PRESSURE:
        return PLACEBO
    return config.mode


@dataclass(frozen=True)
class Contrast:
    """A paired comparison of two arms across seeds, written ``"<arm> - <arm>"`` (e.g. ``pt - off``:
    the per-seed Δloss % of pt against its paired off arm; ``pt - pressure``: pt's Δloss minus
    pressure's, seed by seed). Arms are named by :func:`arm_name`."""

    arm: str
    against: str

    @classmethod
    def parse(cls, text: Any) -> Contrast:
        """From ``"<arm> - <arm>"``; a ValueError saying the expected form otherwise."""
        parts = text.split(" - ") if isinstance(text, str) else []
        if len(parts) != 2 or not all(part.strip() for part in parts) or parts[0].strip() == parts[1].strip():
            raise ValueError(f"expected '<arm> - <other arm>' (e.g. 'pt - off'), got {text!r}")
        return cls(parts[0].strip(), parts[1].strip())

    @property
    def name(self) -> str:
        return f"{self.arm} - {self.against}"


def arm_name(config: PTConfig | None, objective: str = CE) -> str:
    """How reports and ``primary:`` contrasts name an arm: ``off``, ``aux_loss`` (the objective
    :data:`AUX_LOSS` with the controller off), the variant label, and ``+<dynamics>`` for a dynamics
    preset other than the reference's (e.g. ``pt+delayed``)."""
    if objective == AUX_LOSS:
        return AUX_LOSS
    if config is None:
        return OFF
    return arm_label(variant_label(config), config.dynamics)


def arm_label(variant: str, dynamics: str) -> str:
    """An arm's name from its variant label and its dynamics preset (see :func:`arm_name`)."""
    return variant + (f"+{dynamics}" if dynamics not in (PTConfig().dynamics, LOSS_FREE) else "")


@dataclass(frozen=True)
class CellSpec:
    """One arm of one seed: everything that determines its result.

    Attributes:
        protocol: one of :data:`PROTOCOLS` (see :mod:`.protocols`).
        model: a toy preset name, a model directory or a hub id.
        seed: the seed of the weights, the data and the controller.
        pt_config: the controller of the on arm; None for the off arm (``mode="off"``: no
            controller field matters) and for the ``aux_loss`` arm. Stored under the key
            ``controller`` of :meth:`relevant_settings`.
        data, train, eval, load: the shared settings.
        objective: the training objective, one of :data:`OBJECTIVES`: ``ce`` (every arm but one)
            or ``aux_loss`` (the auxiliary-loss baseline arm: ``pt_config`` None, ``joint`` only).
            Stored under the key ``objective`` of :meth:`relevant_settings` only when it is not
            ``ce``, so the ids of every other arm are those they had before the key existed.
    """

    protocol: str
    model: str
    seed: int
    pt_config: PTConfig | None
    data: DataSpec = field(default_factory=DataSpec)
    train: TrainSpec = field(default_factory=TrainSpec)
    eval: EvalSpec = field(default_factory=EvalSpec)
    load: LoadSpec = field(default_factory=LoadSpec)
    objective: str = CE

    def __post_init__(self) -> None:
        if self.protocol not in PROTOCOLS:
            raise ValueError(f"protocol must be one of {', '.join(PROTOCOLS)} (got {self.protocol!r})")
        if self.objective not in OBJECTIVES:
            raise ValueError(f"objective must be one of {', '.join(OBJECTIVES)} (got {self.objective!r})")
        if self.objective == AUX_LOSS:
            if self.pt_config is not None:
                raise ValueError("the aux_loss arm runs with the controller off: pt_config must be None")
            if self.protocol != "joint":
                raise ValueError(f"aux_loss needs protocol joint: protocol {self.protocol} trains no model weights, "
                                 f"so a training loss on the router cannot act")
        if self.pt_config is not None:
            if self.pt_config.mode == OFF:
                raise ValueError("an off arm has pt_config=None, not a PTConfig with mode='off'")
            if self.pt_config.seed != self.seed:
                raise ValueError(f"controller.seed ({self.pt_config.seed}) must equal the cell seed ({self.seed})")
            if self.protocol == "controller_only" and not self.pt_config.learnable:
                raise ValueError("protocol controller_only trains the offsets: the PTConfig needs learnable=True")
            if self.protocol != "controller_only" and self.pt_config.learnable:
                raise ValueError(f"protocol {self.protocol} trains no controller offsets: set learnable=False")

    @property
    def is_off(self) -> bool:
        """The seed's off arm: no controller and the plain CE objective."""
        return self.pt_config is None and self.objective == CE

    @property
    def variant(self) -> str:
        if self.objective == AUX_LOSS:
            return AUX_LOSS
        return OFF if self.pt_config is None else variant_label(self.pt_config)

    @property
    def arm(self) -> str:
        """The arm's name in reports and ``primary:`` contrasts (:func:`arm_name`)."""
        return arm_name(self.pt_config, self.objective)

    def arm_config(self) -> PTConfig:
        """The PTConfig this arm wraps the model with (``mode="off"`` for the off and aux_loss arms)."""
        if self.pt_config is not None:
            return self.pt_config
        return PTConfig(mode=OFF, seed=self.seed, learnable=False)

    def paired_off(self) -> CellSpec:
        """The off arm paired with this cell (itself for an off arm)."""
        return dataclasses.replace(self, pt_config=None, objective=CE)

    # --------------------------------------------------------------------- identity
    def relevant_settings(self) -> dict[str, Any]:
        """The settings that can change this arm's result (and nothing else), as plain data.

        Settings a protocol never reads are left out, so editing them does not invalidate
        finished cells; the off arm leaves out every controller setting.
        """
        train = identifying_train_settings(dataclasses.asdict(self.train))
        data = dataclasses.asdict(self.data)
        if self.data.source == "synthetic":
            for name in ("path", "tokenizer", "max_length", "heldout_fraction"):
                data.pop(name)
        else:
            for name in ("num_train", "num_heldout", "generator"):
                data.pop(name)
        if self.protocol == "joint":
            unused = ["pretrain_steps", "controller_lr"]
        elif self.protocol == "frozen":
            unused = ["steps", "controller_lr"]
        else:
            unused = [] if not self.is_off else ["steps", "controller_lr"]
        if self.protocol != "frozen":
            data.pop("num_warmup")
        for name in unused:
            train.pop(name)
        # The aux_loss arm records the mode-off controller it is wrapped with (its fields are observed,
        # never applied), so a report reads it like any on arm.
        controller = None if self.is_off else self.arm_config().to_dict()
        settings = {
            "protocol": self.protocol,
            "model": self.model,
            "seed": self.seed,
            "controller": controller,
            "data": data,
            "train": train,
            "eval": dataclasses.asdict(self.eval),
            "load": dataclasses.asdict(self.load),
        }
        if self.objective != CE:
            settings["objective"] = self.objective
        return settings

    @property
    def digest(self) -> str:
        return stable_hash(self.relevant_settings())

    @property
    def cell_id(self) -> str:
        """Readable name plus a short hash of :meth:`relevant_settings`, e.g.
        ``joint_mixtral-2l8e_s0_pt_eta0.015_P0.5_3f9c2a1b`` (a file-name-safe string)."""
        parts = [self.protocol, model_tag(self.model), f"s{self.seed}", self.variant]
        if self.pt_config is not None:
            default = PTConfig()
            parts += [f"eta{self.pt_config.eta:g}", f"P{self.pt_config.pressure_scale:g}"]
            if self.pt_config.usage != default.usage:
                parts.append(self.pt_config.usage)
            if self.pt_config.dynamics not in (default.dynamics, LOSS_FREE):
                parts.append(self.pt_config.dynamics)
        return "_".join(parts + [self.digest[:8]])


def stable_hash(value: Any) -> str:
    """SHA-256 hex digest of a JSON-able value (keys sorted, so the same content gives the same hash)."""
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def model_tag(model: str) -> str:
    """A file-name-safe short name of a preset, model directory or hub id."""
    tag = Path(model.rstrip("/")).name or model
    return "".join(c if c.isalnum() or c in "-." else "-" for c in tag)
