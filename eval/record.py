"""The result of one cell: :class:`CellRecord` (its JSON file) and :class:`ArmResult` (record + routing).

A record is built in one place (:meth:`CellRecord.build`), written by the sweep as
``cells/<cell_id>.json`` (:meth:`CellRecord.to_dict`, keys in declaration order; optional keys
left out when unset) and read back by the report (:meth:`CellRecord.from_dict`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from chronovisor.eval.baselines import LossFloor, NgramBaselines

if TYPE_CHECKING:  # pragma: no cover
    from chronovisor.eval.specs import CellSpec

#: ``field(metadata=OPTIONAL)``: the key is left out of the JSON when the value is None.
OPTIONAL = {"omit_if_none": True}


def _plain(value: Any) -> Any:
    """Records as JSON-able data: dataclasses as dicts in field order, containers copied."""
    if dataclasses.is_dataclass(value):
        return {f.name: _plain(getattr(value, f.name)) for f in dataclasses.fields(value)
                if not (f.metadata.get("omit_if_none") and getattr(value, f.name) is None)}
    if isinstance(value, list):
        return [_plain(item) for item in value]
    if isinstance(value, dict):
        return {key: _plain(item) for key, item in value.items()}
    return value


@dataclass
class Pairing:
    """What both arms of a seed must share: the weights they start from and the token stream.

    Attributes:
        init_hash: :func:`~chronovisor.eval.inputs.state_hash` of the weights the arm starts from.
        data_hash: :func:`~chronovisor.eval.inputs.schedule_hash` of the stream it trains or warms up on.
    """

    init_hash: str
    data_hash: str | None


@dataclass
class ModelSummary:
    """The wrapped model's family and controller shape (``L`` MoE layers × ``E`` experts, top-k).

    Attributes:
        num_layers: the MoE layers the controller hooks (an encoder–decoder model: its decoder's).
        stacks: the stacks the controller hooks when not every router (``["decoder"]`` for an
            encoder–decoder model); left out (None) when every router is hooked.
    """

    family: str
    num_layers: int
    num_experts: int
    top_k: int
    stacks: list[str] | None = field(default=None, metadata=OPTIONAL)

    @classmethod
    def of(cls, info: Any, stacks: Any = None) -> ModelSummary:
        """From a :class:`~chronovisor.wrappers.ModelInfo` and the ``stacks`` it was wrapped with."""
        return cls(info.family, info.num_layers, info.num_experts, info.top_k,
                   None if stacks is None else list(stacks))


@dataclass
class LayerMeans:
    """Routing metrics of the held-out tokens, mean over the analysed MoE layers."""

    separation: float
    null_mean: float
    excess_separation: float
    uncertainty_coefficient: float
    max_vio: float
    load_cv: float
    load_entropy: float
    dead_fraction: float


@dataclass
class LayerMetrics:
    """Routing metrics of one MoE layer on the held-out tokens (see :mod:`~chronovisor.eval.metrics`)."""

    layer: str
    separation: float
    null_mean: float
    null_std: float
    excess_separation: float
    excess_z: float
    separation_p: float
    uncertainty_coefficient: float
    max_vio: float
    load_cv: float
    load_entropy: float
    dead_fraction: float
    load: list[float]


@dataclass
class HeldoutMetrics:
    """Held-out loss (mean next-token CE over real targets) and routing metrics.

    Attributes:
        loss: mean CE over every scored target; ``tokens`` of them.
        per_conversation_loss: mean CE of each held-out conversation, in order.
        streaming: whether the evaluation ran turn by turn with ticks.
        routing_layers: names of the analysed layers (the keys of the routing file).
        phase_order_fixed: every held-out conversation visits the phases in one order, so
            separation cannot be told apart from position (see :func:`~chronovisor.eval.metrics.separation_test`).
        layers, mean_over_layers: per layer, and their mean.
        noncausal_loss: Expert Choice models only (else None): the same held-out loss with
            capacity routing, where the experts' choice reads each sequence's later tokens. ``loss``
            is always the causal one (threshold routing); the gap is the size of the future-token leak.
    """

    loss: float
    tokens: int
    per_conversation_loss: list[float]
    streaming: bool
    routing_layers: list[str]
    phase_order_fixed: bool
    layers: list[LayerMetrics]
    mean_over_layers: LayerMeans
    noncausal_loss: float | None = None

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> HeldoutMetrics:
        return cls(**{**data, "layers": [LayerMetrics(**layer) for layer in data["layers"]],
                      "mean_over_layers": LayerMeans(**data["mean_over_layers"])})


@dataclass
class TrainSummary:
    """The in-sample training loss of a protocol that trains (not comparable across arms: use heldout)."""

    note: str
    steps: int
    final_loss: float | None
    curve_every: int
    curve: list[float]


@dataclass
class FieldSummary:
    """The controller's fields at the end of an on arm, and their trajectory.

    Attributes:
        T_bar_variance: variance of T̄_global across experts (the reference's number).
        T_bar_local_variance: variance of T̄_local across experts, mean over layers.
        pressure_mean_abs: mean |b|.
        ticks: controller ticks in total.
        trajectory: :class:`~chronovisor.eval.fields.FieldTrajectory` rows (column -> values).
        offsets: ``controller_only``: mean |offset| per learnable parameter.
    """

    T_bar_variance: float
    T_bar_local_variance: float
    pressure_mean_abs: float
    ticks: int
    trajectory: dict[str, list[float]]
    offsets: dict[str, float] | None = field(default=None, metadata=OPTIONAL)


@dataclass
class CellRecord:
    """Everything one cell produced, as written to ``cells/<cell_id>.json``.

    Attributes:
        cell_id: :attr:`CellSpec.cell_id`; ``spec``: its :meth:`CellSpec.relevant_settings`.
        variant: the arm label (one of :data:`~chronovisor.eval.specs.VARIANTS`); ``arm``: on/off.
        paired_off_cell: the cell id of this seed's off arm.
        pairing, model_info, heldout: see their types.
        loss_floor: the synthetic data's loss floors (None for jsonl data).
        baselines: unigram and count-bigram losses on the held-out tokens, fit on the training tokens.
        train: the in-sample training loss (None when the protocol trains nothing).
        fields: the controller's fields (None for the off arm).
        base_params_changed: frozen protocols: base tensors that changed (always 0: a change raises).
        numerics: device and thread count (see :func:`numerics`); ``compiled: true`` with ``train.compile``.
        wall_time_s: seconds this cell took (its share of a stacked run).
        process_index: the sweep process that ran it (set by the sweep).
    """

    cell_id: str
    spec: dict[str, Any]
    variant: str
    arm: str
    paired_off_cell: str
    pairing: Pairing
    model_info: ModelSummary
    heldout: HeldoutMetrics
    loss_floor: LossFloor | None
    baselines: NgramBaselines
    train: TrainSummary | None
    fields: FieldSummary | None
    base_params_changed: int | None
    numerics: dict[str, Any]
    wall_time_s: float
    process_index: int | None = field(default=None, metadata=OPTIONAL)

    @classmethod
    def build(cls, cell: CellSpec, *, pairing: Pairing, model_info: ModelSummary, heldout: HeldoutMetrics,
              loss_floor: LossFloor | None, baselines: NgramBaselines, train: TrainSummary | None,
              fields: FieldSummary | None,
              base_params_changed: int | None, device: torch.device, wall_time_s: float) -> CellRecord:
        """The record of ``cell`` (its identity fields are derived from the spec)."""
        return cls(
            cell_id=cell.cell_id,
            spec=cell.relevant_settings(),
            variant=cell.variant,
            arm="off" if cell.is_off else "on",
            paired_off_cell=cell.paired_off().cell_id,
            pairing=pairing,
            model_info=model_info,
            heldout=heldout,
            loss_floor=loss_floor,
            baselines=baselines,
            train=train,
            fields=fields,
            base_params_changed=base_params_changed,
            numerics=numerics(device) | ({"compiled": True} if cell.train.compile else {}),
            wall_time_s=wall_time_s,
        )

    # -- spec shortcuts ------------------------------------------------------------------------
    @property
    def protocol(self) -> str:
        return self.spec["protocol"]

    @property
    def model(self) -> str:
        return self.spec["model"]

    @property
    def seed(self) -> int:
        return self.spec["seed"]

    @property
    def is_on(self) -> bool:
        return self.arm == "on"

    # -- JSON ----------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """The JSON-able record (nested records as dicts; optional keys only when set)."""
        return _plain(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> CellRecord:
        """Inverse of :meth:`to_dict` (a record read back from its JSON file)."""
        return cls(**{
            **data,
            "pairing": Pairing(**data["pairing"]),
            "model_info": ModelSummary(**data["model_info"]),
            "heldout": HeldoutMetrics.from_dict(data["heldout"]),
            "loss_floor": None if data.get("loss_floor") is None else LossFloor(**data["loss_floor"]),
            "baselines": NgramBaselines(**data["baselines"]),
            "train": None if data.get("train") is None else TrainSummary(**data["train"]),
            "fields": None if data.get("fields") is None else FieldSummary(**data["fields"]),
        })


@dataclass
class ArmResult:
    """What one cell produced.

    Attributes:
        record: the :class:`CellRecord`.
        routing: held-out routing per analysed MoE layer, ``routing[layer_name]`` = ``[N_real, k]``
            int expert ids over the real (unpadded) held-out tokens in a fixed order, so the arms of
            a seed can be compared token by token (routing preservation).
    """

    record: CellRecord
    routing: dict[str, np.ndarray]


def numerics(device: torch.device) -> dict[str, Any]:
    """What decides the floating-point reduction order: device type and intra-op thread count.

    Training is bit-reproducible only under equal numerics; over hundreds of steps a different
    thread count alone moves the held-out loss by as much as a controller might (float-order
    chaos), so the report flags pairs whose arms ran under different numerics.
    """
    return {"device": device.type, "torch_threads": torch.get_num_threads(),
            "cuda": torch.version.cuda if device.type == "cuda" else None}
