"""Where the held-out tokens went: per arm, the share of top-k slots each expert received, by layer and by turn.

The expert ids come from the routing file every cell writes (``cells/<cell_id>.routing.npz``:
``[N_real, k]`` per analysed layer, the real held-out tokens in order). Their turn labels are not
in that file: the held-out conversations are a function of the data spec and the seed alone, so
they are rebuilt here (:func:`~chronovisor.eval.inputs.heldout_conversations`) and their real
positions flattened in the same order (for an encoder–decoder model, the turn each decoder position
reads). When they cannot be rebuilt (a JSONL file or tokenizer that is not on this machine) or do
not match the routing file, the arm has no turn map and says why.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np

from chronovisor.eval.contrasts import Group, arm_labels, by_group
from chronovisor.eval.inputs import decoder_turn_ids, heldout_conversations
from chronovisor.eval.pairing import Run, SettingSummary
from chronovisor.eval.record import CellRecord
from chronovisor.eval.specs import DataSpec
from chronovisor.eval.synthetic import PHASES


@dataclass
class CellRouting:
    """One cell's held-out routing as shares of top-k slots.

    Attributes:
        load: ``[L, E]``: row l = the share of layer l's slots that went to each expert (sums to 1).
        by_turn: ``[T, E]``: row t = the share of turn t's slots, over every analysed layer, that
            went to each expert (NaN for a turn without tokens); None when the turns are unknown.
        reason: why ``by_turn`` is None ("" otherwise).
    """

    load: np.ndarray
    by_turn: np.ndarray | None
    reason: str = ""


@dataclass
class ArmRouting:
    """One arm of a (protocol, model) group, over its seeds.

    Columns are experts ranked by their seed's off-arm load (see :func:`arm_routing`).

    Attributes:
        label: ``off`` or the setting's label (:func:`~chronovisor.eval.contrasts.arm_labels`).
        layers: the analysed layer names (rows of ``load``).
        load: ``[L, E]`` mean over seeds of :attr:`CellRouting.load`.
        expert_load: ``[S, E]`` per seed, the share of slots per expert averaged over layers.
        by_turn: ``[T, E]`` mean over the seeds whose turns are known (None if none is).
        turns: the names of the rows of ``by_turn`` (:func:`turn_names`).
        reason: why ``by_turn`` is None ("" otherwise).
    """

    label: str
    layers: list[str]
    load: np.ndarray
    expert_load: np.ndarray
    by_turn: np.ndarray | None
    turns: tuple[str, ...]
    reason: str = ""


def turn_names(record: CellRecord) -> tuple[str, ...]:
    """The row labels of a turn map: the synthetic phases, or ``turn 0 … turn 6+`` for JSONL data."""
    if record.spec["data"].get("source", "synthetic") == "synthetic":
        return PHASES
    return tuple(f"turn {t}" for t in range(len(PHASES) - 1)) + (f"turn {len(PHASES) - 1}+",)


def _shares(experts: np.ndarray, num_experts: int) -> np.ndarray:
    counts = np.bincount(experts.reshape(-1).astype(np.int64), minlength=num_experts).astype(float)
    total = counts.sum()
    return counts / total if total else np.full(num_experts, np.nan)


def heldout_turns(record: CellRecord) -> np.ndarray:
    """The turn label of every real held-out position of ``record``'s seed, in routing-file order.

    Raises:
        OSError: the data (a JSONL file or its tokenizer) is not on this machine.
    """
    heldout = heldout_conversations(DataSpec(**record.spec["data"]), record.seed, record.model)
    turns = heldout.turn_ids
    if record.model_info.stacks == ["decoder"]:
        turns = decoder_turn_ids(turns, heldout.attention_mask)
    flat = turns.reshape(-1).numpy()
    return flat[flat >= 0]


def cell_routing(routing: dict[str, np.ndarray], turns: np.ndarray | None, num_experts: int,
                 reason: str = "") -> CellRouting:
    """The shares of one cell.

    Args:
        routing: ``[N_real, k]`` expert ids per layer (:meth:`~chronovisor.eval.rundir.RunDir.read_routing`).
        turns: ``[N_real]`` turn labels (:func:`heldout_turns`), or None when unknown.
        num_experts: E.
        reason: why ``turns`` is None.
    """
    load = np.stack([_shares(ids, num_experts) for ids in routing.values()])
    if turns is None:
        return CellRouting(load, None, reason)
    sizes = {len(ids) for ids in routing.values()}
    if sizes != {len(turns)}:
        return CellRouting(load, None, f"the rebuilt held-out data has {len(turns)} tokens, the routing file "
                                       f"{'/'.join(map(str, sorted(sizes)))}")
    stacked = np.concatenate(list(routing.values()), axis=1)  # [N, L·k]
    by_turn = np.stack([_shares(stacked[turns == t], num_experts) for t in range(len(PHASES))])
    return CellRouting(load, by_turn)


def run_routing(run: Run) -> dict[str, CellRouting]:
    """:func:`cell_routing` of every finished cell of ``run`` (held-out data rebuilt once per seed)."""
    turns: dict[str, tuple[np.ndarray | None, str]] = {}
    result = {}
    for cell_id, record in run.records.items():
        key = json.dumps([record.spec["data"], record.seed, record.model, record.model_info.stacks], sort_keys=True)
        if key not in turns:
            try:
                turns[key] = (heldout_turns(record), "")
            except OSError as error:
                turns[key] = (None, f"the held-out data could not be rebuilt here ({error})")
        labels, reason = turns[key]
        result[cell_id] = cell_routing(run.run_dir.read_routing(cell_id), labels, record.model_info.num_experts, reason)
    return result


def _mean_over_seeds(maps: list[np.ndarray]) -> np.ndarray:
    """Mean of ``[T, E]`` maps ignoring a seed's empty (NaN) turn; NaN where no seed has the turn."""
    stacked = np.stack(maps)
    seen = np.isfinite(stacked)
    counts = seen.sum(axis=0)
    return np.where(counts > 0, np.where(seen, stacked, 0.0).sum(axis=0) / np.maximum(counts, 1), np.nan)


def _ranked(cell: CellRouting, order: np.ndarray) -> CellRouting:
    return CellRouting(cell.load[:, order], None if cell.by_turn is None else cell.by_turn[:, order], cell.reason)


def _arm(label: str, records: list[CellRecord], cells: dict[str, CellRouting],
         orders: dict[int, np.ndarray]) -> ArmRouting:
    maps = [_ranked(cells[record.cell_id], orders[record.seed]) for record in records]
    known = [m.by_turn for m in maps if m.by_turn is not None]
    return ArmRouting(label=label, layers=records[0].heldout.routing_layers,
                      load=np.mean([m.load for m in maps], axis=0),
                      expert_load=np.stack([m.load.mean(axis=0) for m in maps]),
                      by_turn=_mean_over_seeds(known) if known else None, turns=turn_names(records[0]),
                      reason="" if known else maps[0].reason)


def arm_routing(summaries: list[SettingSummary], cells: dict[str, CellRouting]) -> dict[Group, list[ArmRouting]]:
    """Per (protocol, model): the off arm (every seed paired in the group), then each setting's on arm.

    Each seed is a different model, so expert k of one seed has nothing to do with expert k of
    another: the experts of every arm of a seed are put in the order of that seed's off-arm load
    (mean over layers, largest first) before the seeds are averaged. Column j is "the j-th most
    loaded expert of the off arm".
    """
    labels = arm_labels(summaries)
    groups = {}
    for group, members in by_group(summaries).items():
        offs = sorted({seed.off.cell_id: seed.off for member in members for seed in member.seeds}.values(),
                      key=lambda record: record.seed)
        orders = {off.seed: np.argsort(-cells[off.cell_id].load.mean(axis=0), kind="stable") for off in offs}
        groups[group] = [_arm("off", offs, cells, orders)] + [
            _arm(labels[member.setting], [seed.on for seed in member.seeds], cells, orders) for member in members]
    return groups
